//! The forwarder: store → upstream MQTT broker, in batches, deleting only after PUBACK.
//!
//! An explicit state machine; each state is an `async fn` returning the next:
//!
//! ```text
//!            ┌──────────── error / connection lost ◄─────────────┐
//!            ▼                                                    │
//! Offline ─(backoff)─► Connecting ─(CONNACK)─► Draining ⇄ Live ──┘
//! ```
//! - **Offline**: waits out an exponential backoff with full jitter.
//! - **Connecting**: a fresh rumqttc client (clean session), TCP/TLS, CONNECT with a retained
//!   `offline` last will; on CONNACK publishes retained `online`.
//! - **Draining**: full batches are waiting; sends them back to back, up to `max_inflight`.
//! - **Live**: caught up; a partial batch goes when it fills or `batch_max_wait` passes.
//!
//! Size: a batch is built so its whole PUBLISH packet fits `[upstream] max_packet`, or the
//! smaller limit learned when the broker dropped the connection right after a publish larger
//! than any it had acknowledged (halved per such drop; in memory, until restart). An event
//! that alone exceeds a known limit is dead-lettered through the commit loop
//! ([`ForwardMsg::DeadLetter`]), never retried for ever. See [`limits`].
//!
//! A full batch (by count, by bytes or by the packet limit) goes at once; only a partial one
//! waits for `batch_max_wait`. A PUBACK that does not come within `puback_timeout` counts as
//! a lost connection; the clock of a batch starts when it was queued or at the PUBACK of the
//! batch ahead of it, whichever is later (a slow link that keeps acknowledging is not dead).
//!
//! In flight: a FIFO of published batches, each matched to its packet id as rumqttc sends it
//! and retired by that id's PUBACK. The store deletes a batch's events only when told of its
//! PUBACK ([`ForwardAck`]). On any disconnect the client is dropped with everything in flight
//! and the next connection resends from the store, starting after the last acknowledged id:
//! a lost session can neither lose nor stall data.

pub mod http;
pub mod limits;
pub mod tls;
pub mod wire;

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use redb::Database;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event as MqttEvent, LastWill, MqttOptions,
    Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::admin::metrics::{Metrics, UpstreamState};
use crate::config::{parse_mqtt_url, UpstreamConfig};
use crate::shutdown::Shutdown;
use crate::store::{self, ForwardAck, ForwardMsg};
use limits::{Limits, Planned, SizeGuard, Unacked, Verdict};

/// Forwarder errors that stop it from starting.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// TLS files unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// URL invalid.
    #[error("key `upstream.url`: {0}")]
    Url(String),
}

/// The retained liveness topic of a gateway.
pub fn status_topic(gateway: &str) -> String {
    format!("tidepool/{gateway}/status")
}

/// What the connection's poller tells the state machine.
#[derive(Debug)]
enum ConnEvent {
    ConnAck(ConnectReturnCode),
    /// rumqttc wrote a PUBLISH with this packet id (in publish order).
    Sent(u16),
    PubAck(u16),
    Lost(String),
}

/// A published, unacknowledged batch.
#[derive(Debug)]
struct InFlight {
    batch: u64,
    first_id: u64,
    last_id: u64,
    count: u64,
    /// Its PUBLISH packet size.
    packet: usize,
    pkid: Option<u16>,
    acked: bool,
    /// When it was handed to the client (the PUBACK timeout counts from here).
    queued: Instant,
    /// When the client wrote it.
    sent_at: Option<Instant>,
}

/// One live connection: the client, its poller's reports, and what is in flight.
struct Conn {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<ConnEvent>,
    poller: tokio::task::JoinHandle<()>,
    inflight: VecDeque<InFlight>,
    /// Publishes whose packet id is not known yet: `Some(index)` batch, `None` status message.
    unsent: VecDeque<bool>,
    status_pkids: Vec<u16>,
    /// Highest id published on this connection.
    next_read: u64,
    /// When the last PUBACK came (the PUBACK clock of the batch behind it starts there).
    last_ack: Option<Instant>,
}

impl Conn {
    /// rumqttc wrote a PUBLISH with `pkid`: the oldest publish without an id gets it.
    /// False when nothing was waiting for an id (a protocol surprise).
    fn on_sent(&mut self, pkid: u16) -> bool {
        match self.unsent.pop_front() {
            Some(true) => {
                if let Some(b) = self.inflight.iter_mut().find(|b| b.pkid.is_none()) {
                    b.pkid = Some(pkid);
                    b.sent_at = Some(Instant::now());
                }
                true
            }
            Some(false) => {
                self.status_pkids.push(pkid);
                true
            }
            None => false,
        }
    }

    /// A PUBACK arrived: marks its batch; true when a batch was newly acknowledged.
    fn on_puback(&mut self, pkid: u16) -> bool {
        if let Some(i) = self.status_pkids.iter().position(|p| *p == pkid) {
            self.status_pkids.swap_remove(i);
            self.last_ack = Some(Instant::now());
            return false;
        }
        match self
            .inflight
            .iter()
            .position(|b| b.pkid == Some(pkid) && !b.acked)
        {
            Some(i) => {
                // Only the oldest batch's PUBACK restarts the clock of the one behind it: an
                // acknowledgement out of order must not hide a batch stuck ahead of it.
                if self.inflight.iter().take(i).all(|b| b.acked) {
                    self.last_ack = Some(Instant::now());
                }
                self.inflight[i].acked = true;
                true
            }
            None => {
                debug!(pkid, "PUBACK for nothing in flight (ignored)");
                false
            }
        }
    }
}

impl Conn {
    /// Batches handed to the client and not acknowledged, oldest first, as of `now`. Those
    /// not reported written count too: when the broker closes the connection on a packet
    /// as it arrives, the client's write fails before it can report the write.
    fn unacked(&self, now: Instant) -> Vec<Unacked> {
        self.inflight
            .iter()
            .filter(|b| !b.acked)
            .map(|b| Unacked {
                first_id: b.first_id,
                count: b.count,
                packet: b.packet,
                age: now.saturating_duration_since(b.sent_at.unwrap_or(b.queued)),
            })
            .collect()
    }

    /// When the oldest unacknowledged batch runs out of time for its PUBACK: `timeout` after
    /// it was queued or after the last PUBACK, whichever is later. PUBACKs come in publish
    /// order, so a batch waits for the link to carry the ones ahead of it; on a slow link
    /// that keeps acknowledging, that wait is not the broker's silence.
    fn puback_due(&self, timeout: Duration) -> Option<Instant> {
        self.inflight
            .iter()
            .find(|b| !b.acked)
            .map(|b| b.queued.max(self.last_ack.unwrap_or(b.queued)) + timeout)
    }

    /// Removes and returns the acknowledged batches at the front, oldest first: only a
    /// contiguous prefix may be deleted from the store.
    fn take_acked_prefix(&mut self) -> Vec<InFlight> {
        let mut out = Vec::new();
        while self.inflight.front().is_some_and(|b| b.acked) {
            out.extend(self.inflight.pop_front());
        }
        out
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

enum State {
    Offline,
    Connecting,
    Draining(Conn),
    Live(Conn),
    Stopped,
}

/// The forwarder task.
pub struct Forwarder {
    cfg: UpstreamConfig,
    gateway: String,
    db: store::Store,
    metrics: Arc<Metrics>,
    committed: watch::Receiver<u64>,
    acks: mpsc::UnboundedSender<ForwardMsg>,
    shutdown: Shutdown,
    tls: Option<Arc<rustls::ClientConfig>>,
    host: String,
    port: u16,
    /// The packet limit, configured and learned.
    guard: SizeGuard,
    /// Events handed to the commit loop for the dead-letter queue, not yet behind an ack.
    dead_sent: BTreeSet<u64>,
    acked_upto: u64,
    next_batch: u64,
    failures: u32,
    last_error: String,
    /// When the current partial batch was first seen.
    partial_since: Option<Instant>,
    /// Average stored row size, to guess when a batch is full by bytes.
    avg_row: u64,
}

impl Forwarder {
    /// Prepares the forwarder; fails on unusable TLS files or URL.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: UpstreamConfig,
        gateway: String,
        db: store::Store,
        metrics: Arc<Metrics>,
        committed: watch::Receiver<u64>,
        acks: mpsc::UnboundedSender<ForwardMsg>,
        shutdown: Shutdown,
    ) -> Result<Forwarder, ForwardError> {
        let (host, port, tls) = match &cfg.url {
            Some(url) => {
                let u = parse_mqtt_url(url).map_err(ForwardError::Url)?;
                let tls = if u.tls {
                    Some(tls::client_config(&cfg)?)
                } else {
                    None
                };
                (u.host, u.port, tls)
            }
            None => (String::new(), 0, None),
        };
        let next_batch = db
            .db()
            .map(|d| meta_get(&d, "next_batch"))
            .unwrap_or(0)
            .max(1);
        let guard = SizeGuard::new(cfg.max_packet.0 as usize);
        metrics
            .upstream_sizes
            .packet_limit
            .store(guard.limit() as u64, Relaxed);
        Ok(Forwarder {
            cfg,
            gateway,
            db,
            metrics,
            committed,
            acks,
            shutdown,
            tls,
            host,
            port,
            guard,
            dead_sent: BTreeSet::new(),
            acked_upto: 0,
            next_batch,
            failures: 0,
            last_error: String::new(),
            partial_since: None,
            avg_row: 256,
        })
    }

    /// Runs the state machine until shutdown.
    pub async fn run(mut self) {
        if self.cfg.url.is_none() {
            self.metrics.set_upstream(UpstreamState::Disabled);
            info!("no [upstream] url: events stay buffered until one is configured");
            self.shutdown.wait().await;
            return;
        }
        let mut state = State::Connecting;
        loop {
            state = match state {
                State::Offline => self.offline().await,
                State::Connecting => self.connecting().await,
                State::Draining(c) => self.connected(c, UpstreamState::Draining).await,
                State::Live(c) => self.connected(c, UpstreamState::Live).await,
                State::Stopped => break,
            };
        }
        self.metrics.set_upstream(UpstreamState::Offline);
        info!(acked_upto = self.acked_upto, "forwarder stopped");
    }

    /// Waits out the backoff.
    async fn offline(&mut self) -> State {
        self.metrics.set_upstream(UpstreamState::Offline);
        let wait = backoff(
            self.failures,
            self.cfg.reconnect_min.0,
            self.cfg.reconnect_max.0,
            fastrand::f64(),
        );
        debug!(
            ?wait,
            failures = self.failures,
            "upstream: waiting before reconnect"
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => State::Connecting,
            _ = self.shutdown.wait() => State::Stopped,
        }
    }

    fn fail(&mut self, what: String) -> State {
        self.failures = self.failures.saturating_add(1);
        if what != self.last_error {
            warn!(error = %what, "upstream unavailable; events stay buffered");
            self.last_error = what.clone();
        } else {
            debug!(error = %what, failures = self.failures, "upstream still unavailable");
        }
        *self.metrics.upstream_error.lock().unwrap() = what;
        State::Offline
    }

    fn options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(&self.cfg.client_id, &self.host, self.port);
        o.set_keep_alive(self.cfg.keep_alive.0.max(Duration::from_secs(5)));
        o.set_clean_session(true);
        // Incoming: acks only. Outgoing: batches are built to fit `max_packet` exactly; the
        // margin only keeps a sizing slip from turning into a refusal by the client itself.
        let out = self.cfg.max_packet.0 as usize + 1024;
        o.set_max_packet_size(1 << 20, out);
        o.set_inflight((self.cfg.max_inflight + 4).min(u16::MAX as usize) as u16);
        o.set_last_will(LastWill::new(
            status_topic(&self.gateway),
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
        if !self.cfg.username.is_empty() {
            o.set_credentials(&self.cfg.username, &self.cfg.password);
        }
        if let Some(tls) = &self.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls.clone(),
            )));
        }
        o
    }

    /// A fresh client; waits for CONNACK.
    async fn connecting(&mut self) -> State {
        self.metrics.set_upstream(UpstreamState::Connecting);
        let (client, mut eventloop) = AsyncClient::new(self.options(), 64);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let poller = tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(Packet::ConnAck(c))) => ConnEvent::ConnAck(c.code),
                    Ok(MqttEvent::Incoming(Packet::PubAck(a))) => ConnEvent::PubAck(a.pkid),
                    Ok(MqttEvent::Outgoing(Outgoing::Publish(pkid))) => ConnEvent::Sent(pkid),
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(ConnEvent::Lost(describe(&e)));
                        return;
                    }
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        let connack = tokio::select! {
            ev = rx.recv() => ev,
            _ = tokio::time::sleep(Duration::from_secs(20)) => Some(ConnEvent::Lost("no CONNACK within 20s".into())),
            _ = self.shutdown.wait() => { poller.abort(); return State::Stopped }
        };
        let mut conn = Conn {
            client,
            events: rx,
            poller,
            inflight: VecDeque::new(),
            unsent: VecDeque::new(),
            status_pkids: Vec::new(),
            next_read: self.acked_upto,
            last_ack: None,
        };
        match connack {
            Some(ConnEvent::ConnAck(ConnectReturnCode::Success)) => {}
            Some(ConnEvent::ConnAck(code)) => return self.fail(refused(code)),
            Some(ConnEvent::Lost(e)) => return self.fail(e),
            other => return self.fail(format!("unexpected before CONNACK: {other:?}")),
        }
        if conn
            .client
            .publish(
                status_topic(&self.gateway),
                QoS::AtLeastOnce,
                true,
                "online",
            )
            .await
            .is_err()
        {
            return self.fail("client closed before publishing status".into());
        }
        conn.unsent.push_back(false);
        if self.failures > 0 || !self.last_error.is_empty() {
            info!(host = %self.host, port = self.port, "upstream connected again; resending from the store");
        } else {
            info!(host = %self.host, port = self.port, "upstream connected");
        }
        self.failures = 0;
        self.last_error.clear();
        self.metrics.upstream_error.lock().unwrap().clear();
        self.partial_since = None;
        State::Draining(conn)
    }

    /// Draining and Live: fill the pipeline, retire PUBACKs, until the connection drops.
    async fn connected(&mut self, mut conn: Conn, label: UpstreamState) -> State {
        self.metrics.set_upstream(label);
        let mut waiting_full = false;
        // Fill the pipeline.
        while conn.inflight.len() < self.cfg.max_inflight {
            let committed = *self.committed.borrow();
            if committed <= conn.next_read {
                self.partial_since = None;
                break;
            }
            if let Some(since) = self.partial_since {
                let pending = committed - conn.next_read;
                let full_by_count = pending >= self.cfg.batch_max_events as u64;
                let full_by_bytes = pending * self.avg_row >= self.payload_budget() as u64;
                if !full_by_count && !full_by_bytes && since.elapsed() < self.cfg.batch_max_wait.0 {
                    break;
                }
            }
            let p = match self.build_batch(conn.next_read).await {
                Ok(Some(p)) => p,
                Ok(None) => {
                    // Rows below `committed` went (acked or dropped) before we read them.
                    conn.next_read = committed;
                    break;
                }
                Err(crate::store::StoreError::Compacting) => {
                    // The file is being compacted (briefly, after a drain): wait quietly.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "forwarder: store read failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            };
            for (id, reason) in &p.dead {
                self.dead_letter(*id, reason);
            }
            let Some(payload) = p.payload else {
                conn.next_read = conn.next_read.max(p.upto);
                continue;
            };
            if !p.full {
                let since = *self.partial_since.get_or_insert_with(Instant::now);
                if since.elapsed() < self.cfg.batch_max_wait.0 {
                    break;
                }
            }
            waiting_full |= p.full;
            let batch = self.next_batch;
            self.next_batch += 1;
            if conn
                .client
                .publish_bytes(
                    self.cfg.topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    payload.into(),
                )
                .await
                .is_err()
            {
                return self.closed(conn);
            }
            conn.unsent.push_back(true);
            conn.inflight.push_back(InFlight {
                batch,
                first_id: p.first_id,
                last_id: p.last_id,
                count: p.count,
                packet: p.packet,
                pkid: None,
                acked: false,
                queued: Instant::now(),
                sent_at: None,
            });
            conn.next_read = p.last_id;
            self.partial_since = None;
        }
        let next_label = if waiting_full
            || *self.committed.borrow() > conn.next_read + self.cfg.batch_max_events as u64
        {
            UpstreamState::Draining
        } else {
            UpstreamState::Live
        };
        self.metrics.set_upstream(next_label);

        let deadline = self
            .partial_since
            .map(|s| s + self.cfg.batch_max_wait.0)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let room = conn.inflight.len() < self.cfg.max_inflight;
        let puback_due = conn.puback_due(self.cfg.puback_timeout.0);
        tokio::select! {
            ev = conn.events.recv() => match ev {
                Some(ConnEvent::Sent(pkid)) => {
                    if !conn.on_sent(pkid) {
                        return self.fail(format!("protocol: PUBLISH {pkid} sent that was never queued"));
                    }
                }
                Some(ConnEvent::PubAck(pkid)) => {
                    if conn.on_puback(pkid) {
                        self.retire(&mut conn);
                    }
                }
                Some(ConnEvent::Lost(e)) => return self.lost(&conn, e),
                Some(ConnEvent::ConnAck(_)) => return self.fail("unexpected second CONNACK".into()),
                None => return self.fail("connection task ended".into()),
            },
            r = self.committed.changed(), if room => {
                if r.is_err() { return self.stop(conn).await; }
            }
            _ = tokio::time::sleep_until(deadline), if room => {}
            _ = tokio::time::sleep_until(puback_due.unwrap_or(deadline)), if puback_due.is_some() => {
                self.metrics.upstream_sizes.puback_timeouts.fetch_add(1, Relaxed);
                return self.fail(format!(
                    "no PUBACK within {:?} (upstream.puback_timeout); reconnecting to resend from the store",
                    self.cfg.puback_timeout.0
                ));
            }
            _ = self.shutdown.wait() => return self.stop(conn).await,
        }
        match next_label {
            UpstreamState::Draining => State::Draining(conn),
            _ => State::Live(conn),
        }
    }

    /// The client refused a publish: its connection ended. Takes in what the poller reported
    /// up to the end (writes, PUBACKs, the error), then judges the drop as [`Self::lost`].
    fn closed(&mut self, mut conn: Conn) -> State {
        let mut why = "client closed while publishing".to_string();
        while let Ok(ev) = conn.events.try_recv() {
            match ev {
                ConnEvent::Sent(pkid) => {
                    conn.on_sent(pkid);
                }
                ConnEvent::PubAck(pkid) => {
                    if conn.on_puback(pkid) {
                        self.retire(&mut conn);
                    }
                }
                ConnEvent::Lost(e) => why = e,
                ConnEvent::ConnAck(_) => {}
            }
        }
        self.lost(&conn, why)
    }

    /// The connection dropped: a size refusal or a network fault (see [`limits`]).
    fn lost(&mut self, conn: &Conn, e: String) -> State {
        let unacked = conn.unacked(Instant::now());
        match self.guard.lost(&unacked) {
            Verdict::Network => self.fail(e),
            Verdict::SizeRefusal { packet, limit } => {
                let m = &self.metrics.upstream_sizes;
                m.size_refusals.fetch_add(1, Relaxed);
                m.packet_limit.store(limit as u64, Relaxed);
                warn!(
                    packet,
                    largest_accepted = self.guard.largest_acked(),
                    limit,
                    "upstream dropped the connection right after a publish larger than any it accepted: \
                     taken as its packet size limit; batches are halved"
                );
                self.fail(format!(
                    "{e} (right after a {packet} B publish; batches now at most {limit} B)"
                ))
            }
        }
    }

    /// Asks the commit loop to move event `id` to the dead-letter queue; it is not read again.
    fn dead_letter(&mut self, id: u64, reason: &str) {
        if self.dead_sent.insert(id) {
            // The commit loop logs the move, one WARN per event.
            debug!(
                id,
                reason, "upstream cannot take this event: dead-lettering it"
            );
            let _ = self.acks.send(ForwardMsg::DeadLetter {
                id,
                reason: reason.to_string(),
            });
        }
    }

    /// Largest batch payload under `batch_max_bytes` and the packet limit.
    fn payload_budget(&self) -> usize {
        (self.cfg.batch_max_bytes.0 as usize).min(limits::payload_budget(
            self.guard.limit(),
            self.cfg.topic.len(),
        ))
    }

    /// Retires acknowledged batches from the front of the FIFO, telling the store.
    fn retire(&mut self, conn: &mut Conn) {
        for b in conn.take_acked_prefix() {
            self.acked_upto = self.acked_upto.max(b.last_id);
            self.guard.acked(b.first_id, b.packet);
            self.metrics.forwarded.fetch_add(b.count, Relaxed);
            self.metrics.batches_forwarded.fetch_add(1, Relaxed);
            let _ = self.acks.send(ForwardMsg::Ack(ForwardAck {
                up_to: b.last_id,
                batch: b.batch,
            }));
        }
        self.dead_sent = self.dead_sent.split_off(&(self.acked_upto + 1));
        self.metrics
            .upstream_sizes
            .packet_limit
            .store(self.guard.limit() as u64, Relaxed);
    }

    /// Reads and plans the next batch after `after` (None: no rows there).
    async fn build_batch(&mut self, after: u64) -> Result<Option<Planned>, store::StoreError> {
        let db = self.db.clone();
        let limits = Limits {
            encoding: self.cfg.encoding,
            topic_len: self.cfg.topic.len(),
            max_events: self.cfg.batch_max_events,
            max_bytes: self.cfg.batch_max_bytes.0 as usize,
        };
        let read_bytes = self.cfg.batch_max_bytes.0;
        let gateway = self.gateway.clone();
        let batch = self.next_batch;
        let guard = self.guard.clone();
        let skip = self.dead_sent.clone();
        let p = tokio::task::spawn_blocking(move || {
            let (events, more) =
                read_batch(&*db.db()?, after, limits.max_events, read_bytes, &skip)?;
            if events.is_empty() {
                return Ok(None);
            }
            Ok::<_, store::StoreError>(Some(limits::plan(
                &gateway, batch, &events, more, limits, &guard,
            )))
        })
        .await
        .expect("batch reader panicked")?;
        if let Some(avg) = p
            .as_ref()
            .and_then(|p| (p.packet as u64).checked_div(p.count))
        {
            self.avg_row = avg.max(1);
        }
        Ok(p)
    }

    /// Orderly stop: wait briefly for in-flight PUBACKs, say `offline`, disconnect.
    async fn stop(&mut self, mut conn: Conn) -> State {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !conn.inflight.is_empty() {
            match tokio::time::timeout_at(deadline, conn.events.recv()).await {
                Ok(Some(ConnEvent::Sent(pkid))) => {
                    conn.on_sent(pkid);
                }
                Ok(Some(ConnEvent::PubAck(pkid))) => {
                    if conn.on_puback(pkid) {
                        self.retire(&mut conn);
                    }
                }
                _ => break,
            }
        }
        let _ = conn
            .client
            .publish(
                status_topic(&self.gateway),
                QoS::AtLeastOnce,
                true,
                "offline",
            )
            .await;
        let _ = conn.client.disconnect().await;
        // Give the poller a moment to flush the status message and DISCONNECT.
        let _ = tokio::time::timeout(Duration::from_millis(300), async {
            while let Some(ev) = conn.events.recv().await {
                if matches!(ev, ConnEvent::Lost(_)) {
                    break;
                }
            }
        })
        .await;
        State::Stopped
    }
}

/// Reconnect delay after `failures` failures: exponential from `min`, capped at `max`, with
/// full jitter (`unit` in [0, 1)) but never below half of `min`, so a flapping broker is not
/// hammered and many gateways do not reconnect in step.
pub fn backoff(failures: u32, min: Duration, max: Duration, unit: f64) -> Duration {
    let cap = min
        .saturating_mul(1u32 << failures.min(20))
        .min(max)
        .max(Duration::from_millis(1));
    min / 2 + cap.mul_f64(unit.clamp(0.0, 1.0))
}

fn refused(code: ConnectReturnCode) -> String {
    let why = match code {
        ConnectReturnCode::BadUserNamePassword => {
            "bad username or password (check [upstream] username and password)"
        }
        ConnectReturnCode::NotAuthorized => {
            "not authorized (check [upstream] username and password, and the broker's ACL)"
        }
        ConnectReturnCode::BadClientId => "client id rejected (check [upstream] client_id)",
        ConnectReturnCode::ServiceUnavailable => "broker unavailable",
        ConnectReturnCode::RefusedProtocolVersion => "MQTT 3.1.1 not accepted by the broker",
        ConnectReturnCode::Success => "success",
    };
    format!("upstream refused the connection: {why}")
}

fn describe(e: &ConnectionError) -> String {
    if let Some(why) = tls::explain(e) {
        return why;
    }
    match e {
        ConnectionError::ConnectionRefused(code) => refused(*code),
        ConnectionError::Tls(t) => format!(
            "TLS handshake failed: {t} (check upstream.ca_file, cert_file, key_file and the host in upstream.url)"
        ),
        ConnectionError::Io(io) => format!("connection failed: {io}"),
        other => format!("connection lost: {other}"),
    }
}

/// Up to `max_events` events with id > `after` (but not in `skip`), stopping before
/// `max_bytes` of stored rows would be passed (always at least one); and whether more rows
/// follow them.
fn read_batch(
    db: &Database,
    after: u64,
    max_events: usize,
    max_bytes: u64,
    skip: &BTreeSet<u64>,
) -> Result<(Vec<crate::event::Event>, bool), store::StoreError> {
    use redb::ReadableDatabase;
    let txn = db.begin_read()?;
    let events = txn.open_table(store::EVENTS)?;
    let mut out = Vec::new();
    let mut bytes = 0u64;
    for row in events.range(after.saturating_add(1)..)? {
        let (k, v) = row?;
        let id = k.value();
        if skip.contains(&id) {
            continue;
        }
        let len = v.value().len() as u64;
        if out.len() >= max_events || (!out.is_empty() && bytes + len > max_bytes) {
            return Ok((out, true));
        }
        bytes += len;
        out.push(store::decode(id, v.value())?);
    }
    Ok((out, false))
}

fn meta_get(db: &Database, key: &str) -> u64 {
    use redb::ReadableDatabase;
    db.begin_read()
        .ok()
        .and_then(|t| t.open_table(store::META).ok())
        .and_then(|t| t.get(key).ok().flatten().map(|v| v.value()))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Conn {
        let (client, _el) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), 10);
        let (_tx, events) = mpsc::unbounded_channel();
        Conn {
            client,
            events,
            poller: tokio::spawn(async {}),
            inflight: VecDeque::new(),
            unsent: VecDeque::new(),
            status_pkids: Vec::new(),
            next_read: 0,
            last_ack: None,
        }
    }

    fn batch(c: &mut Conn, batch: u64, last_id: u64) {
        c.unsent.push_back(true);
        c.inflight.push_back(InFlight {
            batch,
            first_id: last_id - 9,
            last_id,
            count: 10,
            packet: 1000,
            pkid: None,
            acked: false,
            queued: Instant::now(),
            sent_at: None,
        });
    }

    #[tokio::test]
    async fn the_puback_clock_and_the_refusal_suspects_are_the_unacked_batches() {
        let mut c = conn();
        let timeout = Duration::from_secs(30);
        assert_eq!(c.puback_due(timeout), None, "nothing in flight: no clock");
        batch(&mut c, 1, 10);
        batch(&mut c, 2, 20);
        let first_queued = c.inflight[0].queued;
        assert_eq!(c.puback_due(timeout), Some(first_queued + timeout));
        assert!(c.on_sent(1));
        let now = Instant::now();
        let u = c.unacked(now);
        assert_eq!(u.len(), 2, "a batch not reported written still counts");
        assert_eq!((u[0].first_id, u[1].first_id), (1, 11));
        assert!(c.on_puback(1));
        c.take_acked_prefix();
        assert_eq!(c.unacked(now).len(), 1);
        let acked_at = c.last_ack.expect("the PUBACK was noted");
        assert!(acked_at >= c.inflight[0].queued);
        assert_eq!(
            c.puback_due(timeout),
            Some(acked_at + timeout),
            "the clock moves to the next batch and starts at the PUBACK of the one ahead"
        );
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        assert_eq!(backoff(0, min, max, 0.0), Duration::from_millis(250));
        assert_eq!(backoff(0, min, max, 1.0), Duration::from_millis(750));
        assert_eq!(backoff(3, min, max, 1.0), Duration::from_millis(250 + 4000));
        assert_eq!(backoff(30, min, max, 1.0), Duration::from_millis(250) + max);
        assert!(backoff(30, min, max, 0.5) < backoff(30, min, max, 0.9));
    }

    #[tokio::test]
    async fn pubacks_retire_only_a_contiguous_prefix() {
        let mut c = conn();
        c.unsent.push_back(false); // the `online` status message
        batch(&mut c, 1, 10);
        batch(&mut c, 2, 20);
        batch(&mut c, 3, 30);
        for pkid in 1..=4 {
            assert!(c.on_sent(pkid));
        }
        assert!(!c.on_sent(5), "nothing else was queued");
        assert!(!c.on_puback(1), "the status message is not a batch");
        assert!(c.on_puback(3), "batch 2 acknowledged");
        assert!(
            c.take_acked_prefix().is_empty(),
            "batch 1 still in flight: nothing may go"
        );
        assert!(!c.on_puback(3), "a repeated PUBACK changes nothing");
        assert!(c.on_puback(2));
        let done: Vec<u64> = c.take_acked_prefix().iter().map(|b| b.last_id).collect();
        assert_eq!(done, vec![10, 20]);
        assert!(c.on_puback(4));
        assert_eq!(c.take_acked_prefix().len(), 1);
        assert!(c.inflight.is_empty());
    }
}
