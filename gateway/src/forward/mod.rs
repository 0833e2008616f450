//! The forwarder: store → upstream MQTT broker, in batches, deleting only after PUBACK.
//!
//! An explicit state machine; each state is an `async fn` returning the next:
//!
//! ```text
//!            ┌──────────── error / connection lost / refused ◄────┐
//!            ▼                                                    │
//! Offline ─(backoff)─► Connecting ─(CONNACK)─► Draining ⇄ Live ──┘
//! ```
//! - **Offline**: waits out an exponential backoff with full jitter.
//! - **Connecting**: a fresh client (clean start), TCP/TLS, CONNECT with a retained `offline`
//!   last will; on CONNACK publishes retained `online`. MQTT 5 unless `upstream.protocol =
//!   "3.1.1"`; a broker that does not speak 5 (it refuses the version, answers with a 3.1.1
//!   CONNACK or closes on the CONNECT) is tried at once with 3.1.1, which is then kept until
//!   restart, with a WARN ([`client`]).
//! - **Draining**: a backlog is waiting; **Live**: caught up.
//!
//! Two read cursors per connection. Everything stored when the connection came up (ids up to
//! `top`) is *backlog*; what is committed after is *live*. Under `drain = "live_first"` a live
//! batch goes first (when full, or `batch_max_wait` after its first event) and backlog
//! batches fill the pipeline behind it, leaving one slot free for live data; under `"fifo"`
//! the backlog goes first. Backlog batches say so (`"backlog": true`) and are paced by
//! `drain_rate` (events or bytes a second; a virtual clock that lets one batch ahead of it);
//! live batches never are. Each batch covers a range of ids (from its cursor's position to
//! its last event) and its PUBACK deletes that range, in whatever order PUBACKs come
//! ([`ForwardAck`]); ranges acknowledged and not yet deleted are skipped when read again.
//!
//! Size: a batch is built so its whole PUBLISH packet (MQTT 5 properties included) fits
//! `[upstream] max_packet`, the broker's Maximum Packet Size (MQTT 5 CONNACK), or the smaller
//! limit learned when the broker dropped the connection right after a publish larger than
//! any it had acknowledged (halved per such drop; in memory, until restart). An event that
//! alone exceeds a known limit is dead-lettered through the commit loop
//! ([`ForwardMsg::DeadLetter`]), never retried for ever. See [`limits`].
//!
//! A PUBACK with a reason code of 0x80 or more (MQTT 5: not authorized, quota exceeded,
//! payload format invalid, …) refuses that batch: nothing of it is deleted, the refusal is
//! counted by reason and shown in `status`, and the connection is made again after a backoff
//! that grows until a batch is accepted; the batch is then read from the store again.
//!
//! A PUBACK that does not come within `puback_timeout` counts as a lost connection; the clock
//! of a batch starts when it was queued or at the PUBACK of the oldest batch ahead of it,
//! whichever is later (a slow link that keeps acknowledging is not dead).
//!
//! In flight: a list of published batches, each matched to its packet id as the client sends
//! it and retired by that id's PUBACK. On any disconnect the client is dropped with
//! everything in flight and the next connection resends from the store: a lost session can
//! neither lose nor stall data.

pub mod client;
pub mod compress;
pub mod http;
pub mod limits;
pub mod sink;
pub mod tls;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use redb::Database;
use rumqttc::ConnectionError;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::admin::metrics::{DrainProgress, Metrics, UpstreamState};
use crate::config::{parse_mqtt_url, Drain, DrainRate, Protocol, UpstreamConfig};
use crate::shutdown::Shutdown;
use crate::store::{self, ForwardAck, ForwardMsg};
use client::{Client, ConnAckInfo, ConnEvent, Rejection};
use compress::Compression;
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

/// How often a long drain logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(60);

/// A published, unacknowledged batch.
#[derive(Debug)]
struct InFlight {
    batch: u64,
    /// The lowest id it covers: one past its cursor's position when it was read.
    from: u64,
    first_id: u64,
    last_id: u64,
    count: u64,
    /// Its PUBLISH packet size.
    packet: usize,
    /// Backlog (stored before this connection came up).
    backlog: bool,
    pkid: Option<u16>,
    acked: bool,
    /// When it was handed to the client (the PUBACK timeout counts from here).
    queued: Instant,
    /// When the client wrote it.
    sent_at: Option<Instant>,
}

/// One live connection: the client, its poller's reports, what is in flight, the cursors.
struct Conn {
    client: Client,
    events: mpsc::UnboundedReceiver<ConnEvent>,
    poller: tokio::task::JoinHandle<()>,
    inflight: VecDeque<InFlight>,
    /// Publishes whose packet id is not known yet: `true` batch, `false` status message.
    unsent: VecDeque<bool>,
    status_pkids: Vec<u16>,
    /// Ids up to here were stored when the connection came up: the backlog.
    top: u64,
    /// Highest backlog id read (backlog done when it reaches `top`).
    backlog_read: u64,
    /// Highest live id read (starts at `top`).
    live_read: u64,
    /// When the last PUBACK came (the PUBACK clock of the batch behind it starts there).
    last_ack: Option<Instant>,
    /// Batches in flight at most: `max_inflight`, or the broker's Receive Maximum.
    max_inflight: usize,
}

impl Conn {
    fn new(
        client: Client,
        events: mpsc::UnboundedReceiver<ConnEvent>,
        poller: tokio::task::JoinHandle<()>,
    ) -> Conn {
        Conn {
            client,
            events,
            poller,
            inflight: VecDeque::new(),
            unsent: VecDeque::new(),
            status_pkids: Vec::new(),
            top: 0,
            backlog_read: 0,
            live_read: 0,
            last_ack: None,
            max_inflight: 1,
        }
    }

    /// The client wrote a PUBLISH with `pkid`: the oldest publish without an id gets it.
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

    /// The batch in flight with packet id `pkid`.
    fn batch_of(&self, pkid: u16) -> Option<&InFlight> {
        self.inflight.iter().find(|b| b.pkid == Some(pkid))
    }

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

    /// Removes and returns the acknowledged batches, oldest first. Each covers its own range
    /// of ids, so any of them may be deleted whatever is still in flight ahead of it.
    fn take_acked(&mut self) -> Vec<InFlight> {
        let (done, left): (VecDeque<InFlight>, VecDeque<InFlight>) =
            std::mem::take(&mut self.inflight)
                .into_iter()
                .partition(|b| b.acked);
        self.inflight = left;
        done.into()
    }

    /// Backlog batches in flight.
    fn backlog_inflight(&self) -> usize {
        self.inflight.iter().filter(|b| b.backlog).count()
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

/// Why a connection attempt failed.
struct Refused {
    why: String,
    /// Whether the broker looks like it does not speak the protocol tried.
    protocol_suspect: client::Suspect,
}

/// The backlog drain's pacing and progress.
#[derive(Debug)]
struct DrainState {
    /// A backlog batch may go no sooner than this (`drain_rate`'s virtual clock).
    next_at: Instant,
    /// Backlog events when the connection came up, and acknowledged since.
    total: u64,
    done: u64,
    started: Instant,
    /// Acknowledged backlog events, sampled for the recent rate: (when, `done`).
    samples: VecDeque<(Instant, u64)>,
    last_log: Instant,
    /// A drain is under way (set at connect when there is a backlog).
    active: bool,
}

impl DrainState {
    fn new() -> DrainState {
        let now = Instant::now();
        DrainState {
            next_at: now,
            total: 0,
            done: 0,
            started: now,
            samples: VecDeque::new(),
            last_log: now,
            active: false,
        }
    }

    /// Backlog events acknowledged per second over the last ~30 s.
    fn rate(&self, now: Instant) -> f64 {
        let Some(&(t0, d0)) = self.samples.front() else {
            return 0.0;
        };
        let secs = now.saturating_duration_since(t0).as_secs_f64();
        if secs < 0.5 {
            let all = now.saturating_duration_since(self.started).as_secs_f64();
            return if all > 0.0 {
                self.done as f64 / all
            } else {
                0.0
            };
        }
        (self.done - d0) as f64 / secs
    }

    fn note(&mut self, now: Instant, events: u64) {
        self.done += events;
        self.samples.push_back((now, self.done));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > Duration::from_secs(30))
        {
            self.samples.pop_front();
        }
    }
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
    /// The protocol spoken: `upstream.protocol`, or 3.1.1 after a fallback (until restart).
    protocol: Protocol,
    /// The packet limit, configured and learned.
    guard: SizeGuard,
    /// Events handed to the commit loop for the dead-letter queue, not yet gone from the store.
    dead_sent: BTreeSet<u64>,
    /// Id ranges acknowledged upstream (`from` → `to`, merged), until the store has deleted
    /// them: a read after a reconnect skips them.
    acked: BTreeMap<u64, u64>,
    next_batch: u64,
    failures: u32,
    /// Batches refused by reason code since one was last accepted (the backoff grows with it).
    rejections: u32,
    /// MQTT 5 attempts in a row the broker closed on the CONNECT.
    v5_closed: u32,
    last_error: String,
    /// When the current partial batch was first seen.
    partial_since: Option<Instant>,
    /// Average stored row size, to guess when a batch is full by bytes.
    avg_row: u64,
    drain: DrainState,
    /// Its index among the configured sinks (0 when it is the only one).
    sink: usize,
    /// Its name among the sinks: `upstream`, or a `[[sink]]`'s.
    name: String,
    /// A `[[sink]]`'s topic filters (`None`: all events).
    filters: Option<Vec<String>>,
    /// The gateway's metrics (the backlog count); `metrics` when this is `[upstream]`.
    global: Arc<Metrics>,
    /// The retained `online`/`offline` topic and last will; `None`: none.
    status: Option<String>,
    /// How its keys are named in messages: `upstream`, or `sink[N]`.
    keys: String,
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
        {
            let mut info = metrics.upstream_info.lock().unwrap();
            info.protocol = cfg.protocol.name().into();
            info.url = cfg.url.clone().unwrap_or_default();
        }
        Ok(Forwarder {
            protocol: cfg.protocol,
            cfg,
            db,
            committed,
            acks,
            shutdown,
            tls,
            host,
            port,
            guard,
            dead_sent: BTreeSet::new(),
            acked: BTreeMap::new(),
            next_batch,
            failures: 0,
            rejections: 0,
            v5_closed: 0,
            last_error: String::new(),
            partial_since: None,
            avg_row: 256,
            drain: DrainState::new(),
            sink: 0,
            name: store::sinks::UPSTREAM.into(),
            filters: None,
            global: metrics.clone(),
            status: Some(status_topic(&gateway)),
            keys: "upstream".into(),
            gateway,
            metrics,
        })
    }

    /// This forwarder is sink `index` among several: it skips what the store says it has
    /// acknowledged already, and what came before it was added.
    pub fn with_sink(mut self, index: usize) -> Result<Self, store::StoreError> {
        let (start, acked) = store::sinks::load(&*self.db.db()?, &self.name)?;
        self.sink = index;
        self.acked = acked;
        if start > 0 {
            note_range(&mut self.acked, 0, start - 1);
        }
        Ok(self)
    }

    /// This forwarder is the `[[sink]] kind = "mqtt"` named `name`, sink `index`: its own
    /// ranges, batch numbers and filters; `metrics` (given to [`Forwarder::new`]) are its
    /// own, `global` the gateway's.
    pub fn with_named_sink(
        mut self,
        index: usize,
        position: usize,
        sink: &crate::config::SinkConfig,
        global: Arc<Metrics>,
    ) -> Result<Self, store::StoreError> {
        self.name = sink.name.clone();
        self.filters = (sink.topics != ["#"]).then(|| sink.topics.clone());
        self.global = global;
        self.status = sink.status_topic.clone().filter(|t| !t.is_empty());
        self.keys = format!("sink[{position}]");
        self.next_batch =
            meta_get(&*self.db.db()?, &store::sinks::next_batch_key(&sink.name)).max(1);
        self.with_sink(index)
    }

    /// `what` with `[upstream]`'s keys named as this sink's (its `timeout` is the PUBACK
    /// timeout).
    fn own_keys(&self, what: String) -> String {
        if self.keys == "upstream" {
            return what;
        }
        what.replace("upstream.puback_timeout", &format!("{}.timeout", self.keys))
            .replace("upstream.", &format!("{}.", self.keys))
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
        info!("forwarder stopped");
    }

    /// Waits out the backoff.
    async fn offline(&mut self) -> State {
        self.metrics.set_upstream(UpstreamState::Offline);
        let wait = backoff(
            self.failures.max(self.rejections),
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
        let what = self.own_keys(what);
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

    fn options(&self) -> client::Options {
        client::Options {
            client_id: self.cfg.client_id.clone(),
            host: self.host.clone(),
            port: self.port,
            keep_alive: self.cfg.keep_alive.0.max(Duration::from_secs(5)),
            username: self.cfg.username.clone(),
            password: self.cfg.password.clone(),
            tls: self.tls.clone(),
            // Batches are built to fit `max_packet` exactly; the margin only keeps a sizing
            // slip from turning into a refusal by the client itself.
            max_out: self.cfg.max_packet.0 as usize + 1024,
            inflight: (self.cfg.max_inflight + 4).min(u16::MAX as usize) as u16,
            will_topic: self.status.clone(),
        }
    }

    /// One connection attempt in `protocol`, up to its CONNACK.
    async fn connect_once(
        &mut self,
        protocol: Protocol,
    ) -> Result<Option<(Conn, ConnAckInfo)>, Refused> {
        let (client, mut rx, poller) = client::connect(protocol, &self.options());
        let connack = tokio::select! {
            ev = rx.recv() => ev,
            _ = tokio::time::sleep(Duration::from_secs(20)) => {
                poller.abort();
                return Err(Refused { why: "no CONNACK within 20s".into(), protocol_suspect: client::Suspect::No });
            }
            _ = self.shutdown.wait() => { poller.abort(); return Ok(None) }
        };
        let conn = Conn::new(client, rx, poller);
        match connack {
            Some(ConnEvent::ConnAck(Ok(info))) => Ok(Some((conn, info))),
            Some(ConnEvent::ConnAck(Err(why))) => Err(Refused {
                why,
                protocol_suspect: client::Suspect::No,
            }),
            Some(ConnEvent::Lost {
                why,
                protocol_suspect,
            }) => Err(Refused {
                why,
                protocol_suspect,
            }),
            other => Err(Refused {
                why: format!("unexpected before CONNACK: {other:?}"),
                protocol_suspect: client::Suspect::No,
            }),
        }
    }

    /// Whether a failed MQTT 5 attempt is reason to try 3.1.1: the broker said so, or it
    /// closed the connection on the CONNECT three attempts in a row.
    fn falls_back(&mut self, s: client::Suspect) -> bool {
        match s {
            client::Suspect::Yes => true,
            client::Suspect::Maybe => {
                self.v5_closed = self.v5_closed.saturating_add(1);
                self.v5_closed >= 3
            }
            client::Suspect::No => {
                self.v5_closed = 0;
                false
            }
        }
    }

    /// A fresh client; waits for CONNACK (falling back to 3.1.1 when the broker does not
    /// speak 5); publishes `online`; sets up the cursors.
    async fn connecting(&mut self) -> State {
        self.metrics.set_upstream(UpstreamState::Connecting);
        let (mut conn, info) = match self.connect_once(self.protocol).await {
            Ok(Some(c)) => c,
            Ok(None) => return State::Stopped,
            Err(r) if self.protocol == Protocol::V5 && self.falls_back(r.protocol_suspect) => {
                match self.connect_once(Protocol::V311).await {
                    Ok(Some(c)) => {
                        warn!(
                            host = %self.host,
                            port = self.port,
                            v5_error = %r.why,
                            "the upstream broker does not speak MQTT 5: using MQTT 3.1.1 until restart \
                             (no PUBACK reason codes: a publish the broker's ACL denies may be acknowledged \
                             and deleted; set upstream.protocol = \"3.1.1\" to skip the MQTT 5 attempt)"
                        );
                        self.protocol = Protocol::V311;
                        self.metrics.upstream_info.lock().unwrap().protocol =
                            "3.1.1 (the broker does not speak 5)".into();
                        c
                    }
                    Ok(None) => return State::Stopped,
                    Err(r311) => {
                        return self.fail(format!("{} (with MQTT 3.1.1: {})", r.why, r311.why))
                    }
                }
            }
            Err(r) => return self.fail(r.why),
        };
        self.v5_closed = 0;
        self.guard.set_broker_max(info.max_packet);
        self.metrics
            .upstream_sizes
            .packet_limit
            .store(self.guard.limit() as u64, Relaxed);
        conn.max_inflight = match info.receive_max {
            // One of the broker's slots is for the status message.
            Some(r) => self
                .cfg
                .max_inflight
                .min((r as usize).saturating_sub(1).max(1)),
            None => self.cfg.max_inflight,
        };
        if let Some(topic) = self.status.clone() {
            if conn
                .client
                .publish(&topic, true, "online".into(), None)
                .await
                .is_err()
            {
                return self.fail("client closed before publishing status".into());
            }
            conn.unsent.push_back(false);
        }
        if self.failures > 0 || !self.last_error.is_empty() {
            info!(host = %self.host, port = self.port, protocol = self.protocol.name(), "upstream connected again; resending from the store");
        } else {
            info!(host = %self.host, port = self.port, protocol = self.protocol.name(), "upstream connected");
        }
        self.failures = 0;
        self.last_error.clear();
        self.metrics.upstream_error.lock().unwrap().clear();
        self.partial_since = None;
        // Everything stored now is backlog; what is committed from here on is live.
        let top = *self.committed.borrow();
        conn.top = top;
        conn.backlog_read = 0;
        conn.live_read = top;
        self.start_drain(top);
        State::Draining(conn)
    }

    /// A new connection: what is buffered is the backlog to drain.
    fn start_drain(&mut self, top: u64) {
        let now = Instant::now();
        let total = self.global.backlog_events.load(Relaxed);
        self.drain = DrainState {
            next_at: now,
            total,
            done: 0,
            started: now,
            samples: VecDeque::new(),
            last_log: now,
            active: total > 0,
        };
        if total > 0 {
            info!(
                backlog = total,
                up_to_id = top,
                mode = drain_name(self.cfg.drain),
                rate = %rate_name(self.cfg.drain_rate),
                "draining the backlog"
            );
        }
        self.publish_drain();
    }

    fn publish_drain(&self) {
        let d = &self.drain;
        let now = Instant::now();
        let left = d.total.saturating_sub(d.done);
        let rate = d.rate(now);
        self.metrics.upstream_info.lock().unwrap().drain = d.active.then(|| DrainProgress {
            mode: drain_name(self.cfg.drain),
            rate_limit: rate_name(self.cfg.drain_rate),
            total: d.total,
            left,
            events_per_second: rate,
            eta_seconds: (rate > 0.0).then(|| left as f64 / rate),
        });
    }

    /// The backlog is read and acknowledged: the drain is over.
    fn finish_drain(&mut self, conn: &Conn) {
        if !self.drain.active || conn.backlog_read < conn.top || conn.backlog_inflight() > 0 {
            return;
        }
        let secs = self.drain.started.elapsed().as_secs_f64();
        info!(
            events = self.drain.done,
            seconds = format!("{secs:.1}"),
            events_per_second = format!("{:.0}", self.drain.done as f64 / secs.max(0.001)),
            "backlog drained"
        );
        self.drain.active = false;
        self.publish_drain();
    }

    fn log_progress(&mut self) {
        let now = Instant::now();
        if !self.drain.active || now.duration_since(self.drain.last_log) < PROGRESS_EVERY {
            return;
        }
        self.drain.last_log = now;
        let left = self.drain.total.saturating_sub(self.drain.done);
        let rate = self.drain.rate(now);
        let eta = if rate > 0.0 {
            format!("about {:.0}s left", left as f64 / rate)
        } else {
            "no progress in the last 30s".to_string()
        };
        info!(
            left,
            of = self.drain.total,
            events_per_second = format!("{rate:.0}"),
            "draining the backlog: {eta}"
        );
    }

    /// Whether the backlog comes next: there is one left to read, the pacing allows it and
    /// (under live_first) it leaves a slot for live data.
    fn backlog_due(&self, conn: &Conn, now: Instant) -> bool {
        if conn.backlog_read >= conn.top {
            return false;
        }
        if self.cfg.drain == Drain::LiveFirst
            && conn.max_inflight > 1
            && conn.backlog_inflight() + 1 >= conn.max_inflight
        {
            return false;
        }
        now >= self.drain.next_at
    }

    /// Draining and Live: fill the pipeline, retire PUBACKs, until the connection drops.
    async fn connected(&mut self, mut conn: Conn, label: UpstreamState) -> State {
        self.metrics.set_upstream(label);
        let mut waiting_full = false;
        // A partial live batch not due yet: the backlog may use the wait.
        let mut live_deferred = false;
        // A store read failed: when to read again.
        let mut retry = None;
        // Fill the pipeline.
        while conn.inflight.len() < conn.max_inflight {
            let committed = *self.committed.borrow();
            let now = Instant::now();
            let backlog_first = self.cfg.drain == Drain::Fifo && conn.backlog_read < conn.top;
            let live_pending = committed > conn.live_read && !backlog_first;
            let mut live_ready = live_pending && !live_deferred;
            if live_pending {
                if let Some(since) = self.partial_since {
                    let pending = committed - conn.live_read;
                    let full_by_count = pending >= self.cfg.batch_max_events as u64;
                    let full_by_bytes = pending * self.avg_row >= self.payload_budget() as u64;
                    if !full_by_count
                        && !full_by_bytes
                        && since.elapsed() < self.cfg.batch_max_wait.0
                    {
                        live_ready = false;
                    }
                }
            } else if !backlog_first {
                self.partial_since = None;
            }
            let backlog = if live_ready {
                false
            } else if self.backlog_due(&conn, now) {
                true
            } else {
                break;
            };
            let (after, upper) = if backlog {
                (conn.backlog_read, Some(conn.top))
            } else {
                (conn.live_read, None)
            };
            let p = match self.build_batch(after, upper, backlog).await {
                Ok(Some(p)) => p,
                Ok(None) => {
                    // Rows up to here went (acked or dropped) before we read them.
                    if backlog {
                        conn.backlog_read = conn.top;
                        self.finish_drain(&conn);
                        continue;
                    }
                    conn.live_read = committed;
                    break;
                }
                Err(crate::store::StoreError::Compacting) => {
                    // The file is being compacted (briefly, after a drain): wait quietly, and
                    // read again on a timer (no commit may come to wake the loop).
                    retry = Some(Instant::now() + Duration::from_millis(200));
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "forwarder: store read failed; retrying");
                    retry = Some(Instant::now() + Duration::from_millis(200));
                    break;
                }
            };
            for (id, reason) in &p.dead {
                self.dead_letter(*id, reason);
            }
            let Some(payload) = p.payload else {
                if backlog {
                    conn.backlog_read = conn.backlog_read.max(p.upto);
                    self.finish_drain(&conn);
                } else {
                    conn.live_read = conn.live_read.max(p.upto);
                }
                continue;
            };
            if !backlog && !p.full {
                let since = *self.partial_since.get_or_insert_with(Instant::now);
                if since.elapsed() < self.cfg.batch_max_wait.0 {
                    if self.backlog_due(&conn, now) {
                        live_deferred = true;
                        continue;
                    }
                    break;
                }
            }
            waiting_full |= p.full || backlog;
            let batch = self.next_batch;
            self.next_batch += 1;
            let props = (conn.client.protocol() == Protocol::V5).then(|| {
                client::batch_properties(&client::BatchProps {
                    gateway: &self.gateway,
                    encoding: self.cfg.encoding,
                    compression: if p.compressed {
                        compress::content_encoding(self.cfg.compression)
                    } else {
                        None
                    },
                    batch,
                    first_id: p.first_id,
                    last_id: p.last_id,
                    count: p.count,
                    backlog,
                })
            });
            if conn
                .client
                .publish(&self.cfg.topic, false, payload.into(), props)
                .await
                .is_err()
            {
                return self.closed(conn);
            }
            conn.unsent.push_back(true);
            conn.inflight.push_back(InFlight {
                batch,
                from: after + 1,
                first_id: p.first_id,
                last_id: p.last_id,
                count: p.count,
                packet: p.packet,
                backlog,
                pkid: None,
                acked: false,
                queued: Instant::now(),
                sent_at: None,
            });
            if backlog {
                conn.backlog_read = p.last_id;
                self.drain.next_at =
                    self.drain.next_at.max(now) + pace(self.cfg.drain_rate, p.count, p.packet);
            } else {
                conn.live_read = p.last_id;
                self.partial_since = None;
            }
        }
        self.log_progress();
        let backlog_left = conn.backlog_read < conn.top || conn.backlog_inflight() > 0;
        let next_label = if waiting_full
            || backlog_left
            // (A sink with `topics` reads only what it takes: events of other topics above its
            // cursor are not a backlog.)
            || (self.filters.is_none()
                && *self.committed.borrow() > conn.live_read + self.cfg.batch_max_events as u64)
        {
            UpstreamState::Draining
        } else {
            UpstreamState::Live
        };
        self.metrics.set_upstream(next_label);

        let far = Instant::now() + Duration::from_secs(3600);
        let deadline = self
            .partial_since
            .map(|s| s + self.cfg.batch_max_wait.0)
            .unwrap_or(far);
        let room = conn.inflight.len() < conn.max_inflight;
        // The pacing clock, while a backlog waits for it.
        let paced = (conn.backlog_read < conn.top && self.drain.next_at > Instant::now())
            .then_some(self.drain.next_at);
        let puback_due = conn.puback_due(self.cfg.puback_timeout.0);
        let progress_at = self
            .drain
            .active
            .then(|| self.drain.last_log + PROGRESS_EVERY);
        tokio::select! {
            ev = conn.events.recv() => match ev {
                Some(ConnEvent::Sent(pkid)) => {
                    if !conn.on_sent(pkid) {
                        return self.fail(format!("protocol: PUBLISH {pkid} sent that was never queued"));
                    }
                }
                Some(ConnEvent::PubAck(pkid, None)) => {
                    if conn.on_puback(pkid) {
                        self.retire(&mut conn);
                    }
                }
                Some(ConnEvent::PubAck(pkid, Some(r))) => {
                    if conn.batch_of(pkid).is_some() {
                        return self.refused(&mut conn, pkid, r);
                    }
                    // The status message: not worth a reconnect.
                    conn.on_puback(pkid);
                    debug!(pkid, reason = %r, "upstream refused the status message");
                }
                Some(ConnEvent::Lost { why, .. }) => return self.lost(&conn, why),
                Some(ConnEvent::ConnAck(_)) => return self.fail("unexpected second CONNACK".into()),
                None => return self.fail("connection task ended".into()),
            },
            r = self.committed.changed(), if room => {
                if r.is_err() { return self.stop(conn).await; }
            }
            _ = tokio::time::sleep_until(deadline), if room => {}
            _ = tokio::time::sleep_until(paced.unwrap_or(far)), if room && paced.is_some() => {}
            _ = tokio::time::sleep_until(retry.unwrap_or(far)), if retry.is_some() => {}
            _ = tokio::time::sleep_until(progress_at.unwrap_or(far)), if progress_at.is_some() => {}
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

    /// The broker refused a batch by reason code: nothing of it is deleted; counted, shown,
    /// and the connection made again after a backoff (the batch is read again from the store).
    fn refused(&mut self, conn: &mut Conn, pkid: u16, r: Rejection) -> State {
        let Some(b) = conn.batch_of(pkid) else {
            return State::Offline;
        };
        let what = format!(
            "batch {} (ids {}–{}, {} events): {r}",
            b.batch, b.first_id, b.last_id, b.count
        );
        self.rejections = self.rejections.saturating_add(1);
        {
            let mut info = self.metrics.upstream_info.lock().unwrap();
            *info.rejected.entry(r.name.to_string()).or_default() += 1;
            info.last_rejection = what.clone();
        }
        warn!(
            batch = b.batch,
            first_id = b.first_id,
            last_id = b.last_id,
            reason = %r,
            "upstream refused a batch: kept in the store, retried after a backoff"
        );
        // Batches acknowledged before the refusal still go.
        self.retire(conn);
        self.fail(format!("upstream refused {what}"))
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
                ConnEvent::PubAck(pkid, None) => {
                    if conn.on_puback(pkid) {
                        self.retire(&mut conn);
                    }
                }
                ConnEvent::PubAck(..) => {}
                ConnEvent::Lost { why: e, .. } => why = e,
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
                sink: self.sink,
                id,
                reason: reason.to_string(),
            });
        }
    }

    /// The topic's length plus what the batch properties may take (MQTT 5).
    fn topic_overhead(&self) -> usize {
        self.cfg.topic.len()
            + match self.protocol {
                Protocol::V5 => client::properties_reserve(
                    &self.gateway,
                    self.cfg.encoding,
                    self.cfg.compression != Compression::None,
                ),
                Protocol::V311 => 0,
            }
    }

    /// Largest batch payload under `batch_max_bytes` and the packet limit (uncompressed: a
    /// batch is sent compressed only when that makes it smaller, so it always fits).
    fn payload_budget(&self) -> usize {
        (self.cfg.batch_max_bytes.0 as usize).min(limits::payload_budget(
            self.guard.limit(),
            self.topic_overhead(),
        ))
    }

    /// Retires acknowledged batches, telling the store: each deletes its own range.
    fn retire(&mut self, conn: &mut Conn) {
        let now = Instant::now();
        let mut backlog_acked = false;
        for b in conn.take_acked() {
            self.rejections = 0;
            note_range(&mut self.acked, b.from, b.last_id);
            self.guard.acked(b.first_id, b.packet);
            self.metrics.forwarded.fetch_add(b.count, Relaxed);
            self.metrics.batches_forwarded.fetch_add(1, Relaxed);
            if b.backlog {
                self.drain.note(now, b.count);
                backlog_acked = true;
            }
            let _ = self.acks.send(ForwardMsg::Ack(ForwardAck {
                sink: self.sink,
                from: b.from,
                up_to: b.last_id,
                batch: b.batch,
            }));
        }
        if backlog_acked {
            self.publish_drain();
            self.finish_drain(conn);
        }
        self.metrics
            .upstream_sizes
            .packet_limit
            .store(self.guard.limit() as u64, Relaxed);
    }

    /// Reads and plans the next batch after `after`, up to `upper` (None: no rows there).
    async fn build_batch(
        &mut self,
        after: u64,
        upper: Option<u64>,
        backlog: bool,
    ) -> Result<Option<Planned>, store::StoreError> {
        let db = self.db.clone();
        let compression = self.cfg.compression;
        let topic_len = self.topic_overhead();
        let limits = Limits {
            encoding: self.cfg.encoding,
            topic_len,
            max_events: self.cfg.batch_max_events,
            max_bytes: self.cfg.batch_max_bytes.0 as usize,
            backlog,
        };
        let read_bytes = self.cfg.batch_max_bytes.0;
        let gateway = self.gateway.clone();
        let batch = self.next_batch;
        let guard = self.guard.clone();
        let skip = Skip {
            dead: self.dead_sent.clone(),
            acked: self.acked.clone(),
            filters: self.filters.clone(),
            sink: Some(self.name.clone()),
        };
        let (p, lowest) = tokio::task::spawn_blocking(move || {
            let r = read_batch(
                &*db.db()?,
                after,
                upper.unwrap_or(u64::MAX),
                limits.max_events,
                read_bytes,
                &skip,
            )?;
            if r.events.is_empty() {
                return Ok((None, r.lowest));
            }
            let mut p = limits::plan(&gateway, batch, &r.events, r.more, limits, &guard);
            if compression != Compression::None {
                if let Some(raw) = &p.payload {
                    // Only when it is smaller (it always is for real batches): then it fits
                    // wherever the plain batch fit, and a batch of what does not compress goes
                    // as it is, its properties saying so.
                    let packed = compress::compress(compression, compress::DEFAULT_LEVEL, raw);
                    if packed.len() < raw.len() {
                        p.packet = limits::publish_size(topic_len, packed.len());
                        p.payload = Some(packed);
                        p.compressed = true;
                    }
                }
            }
            Ok::<_, store::StoreError>((Some(p), r.lowest))
        })
        .await
        .expect("batch reader panicked")?;
        // What lies wholly below the oldest stored row is gone from the store: forget it.
        let lowest = lowest.unwrap_or(u64::MAX);
        self.dead_sent = self.dead_sent.split_off(&lowest);
        self.acked.retain(|_, to| *to >= lowest);
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
                Ok(Some(ConnEvent::PubAck(pkid, None))) => {
                    if conn.on_puback(pkid) {
                        self.retire(&mut conn);
                    }
                }
                _ => break,
            }
        }
        if let Some(topic) = self.status.clone() {
            let _ = conn
                .client
                .publish(&topic, true, "offline".into(), None)
                .await;
        }
        conn.client.disconnect().await;
        // Give the poller a moment to flush the status message and DISCONNECT.
        let _ = tokio::time::timeout(Duration::from_millis(300), async {
            while let Some(ev) = conn.events.recv().await {
                if matches!(ev, ConnEvent::Lost { .. }) {
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

fn describe(e: &ConnectionError) -> String {
    if let Some(why) = tls::explain(e) {
        return why;
    }
    match e {
        ConnectionError::Tls(t) => format!(
            "TLS handshake failed: {t} (check upstream.ca_file, cert_file, key_file and the host in upstream.url)"
        ),
        ConnectionError::Io(io) => format!("connection failed: {io}"),
        other => format!("connection lost: {other}"),
    }
}

/// What a read passes over: events handed to the dead-letter queue, ranges acknowledged.
struct Skip {
    dead: BTreeSet<u64>,
    acked: BTreeMap<u64, u64>,
    /// A sink's topic filters: events on other topics are not its own.
    filters: Option<Vec<String>>,
    /// The sink's name: the ranges the store counts as done for it are skipped too (the
    /// commit loop marks a dead letter retried for another sink as done for this one).
    sink: Option<String>,
}

impl Skip {
    /// Whether `id` is to be passed over; the end of its acknowledged range when in one.
    fn skip(&self, id: u64) -> Option<u64> {
        if self.dead.contains(&id) {
            return Some(id);
        }
        match self.acked.range(..=id).next_back() {
            Some((_, &to)) if to >= id => Some(to),
            _ => None,
        }
    }
}

use store::sinks::note_range;

/// A batch read: the events, whether more rows follow them, and the oldest stored id.
struct Read {
    events: Vec<crate::event::Event>,
    more: bool,
    lowest: Option<u64>,
    /// The highest id looked at (a sink's cursor may move past what it does not take).
    scanned: u64,
}

/// Up to `max_events` events with `after` < id <= `upper` (passing over `skip`), stopping
/// before `max_bytes` of stored rows would be passed (always at least one).
fn read_batch(
    db: &Database,
    after: u64,
    upper: u64,
    max_events: usize,
    max_bytes: u64,
    skip: &Skip,
) -> Result<Read, store::StoreError> {
    use redb::{ReadableDatabase, ReadableTable};
    let txn = db.begin_read()?;
    let events = txn.open_table(store::EVENTS)?;
    let lowest = events.first()?.map(|(k, _)| k.value());
    let stored = match &skip.sink {
        Some(name) => store::sinks::ranges_in(&txn, name)?,
        None => BTreeMap::new(),
    };
    let merged;
    let skip = if stored.is_empty() {
        skip
    } else {
        let mut acked = skip.acked.clone();
        for (from, to) in stored {
            note_range(&mut acked, from, to);
        }
        merged = Skip {
            dead: skip.dead.clone(),
            acked,
            filters: skip.filters.clone(),
            sink: None,
        };
        &merged
    };
    let mut out = Vec::new();
    let mut bytes = 0u64;
    let mut from = after.saturating_add(1);
    let mut scanned = after;
    'ranges: while from <= upper {
        for row in events.range(from..=upper)? {
            let (k, v) = row?;
            let id = k.value();
            if let Some(end) = skip.skip(id) {
                scanned = scanned.max(id);
                if end > id {
                    // A whole acknowledged range: jump past it.
                    from = end.saturating_add(1);
                    if end == u64::MAX {
                        break 'ranges;
                    }
                    continue 'ranges;
                }
                continue;
            }
            let len = v.value().len() as u64;
            let e = store::decode(id, v.value())?;
            if let Some(f) = &skip.filters {
                if !f
                    .iter()
                    .any(|f| crate::broker::router::matches(f, &e.topic))
                {
                    scanned = id;
                    continue;
                }
            }
            if out.len() >= max_events || (!out.is_empty() && bytes + len > max_bytes) {
                return Ok(Read {
                    events: out,
                    more: true,
                    lowest,
                    scanned,
                });
            }
            bytes += len;
            scanned = id;
            out.push(e);
        }
        break;
    }
    Ok(Read {
        events: out,
        more: false,
        lowest,
        scanned,
    })
}

fn meta_get(db: &Database, key: &str) -> u64 {
    use redb::ReadableDatabase;
    db.begin_read()
        .ok()
        .and_then(|t| t.open_table(store::META).ok())
        .and_then(|t| t.get(key).ok().flatten().map(|v| v.value()))
        .unwrap_or(0)
}

/// How long the backlog's pacing clock moves for a batch of `count` events in a `packet` of
/// that many bytes under `rate`.
fn pace(rate: DrainRate, count: u64, packet: usize) -> Duration {
    match rate {
        DrainRate::Unlimited => Duration::ZERO,
        DrainRate::Events(n) => Duration::from_secs_f64(count as f64 / n as f64),
        DrainRate::Bytes(n) => Duration::from_secs_f64(packet as f64 / n as f64),
    }
}

fn drain_name(d: Drain) -> &'static str {
    match d {
        Drain::LiveFirst => "live_first",
        Drain::Fifo => "fifo",
    }
}

fn rate_name(r: DrainRate) -> String {
    match r {
        DrainRate::Unlimited => "unlimited".into(),
        DrainRate::Events(n) => format!("{n} events/s"),
        DrainRate::Bytes(n) => format!("{n} B/s"),
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Conn {
        let (client, _el) =
            rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 10);
        let (_tx, events) = mpsc::unbounded_channel();
        Conn::new(Client::V311(client), events, tokio::spawn(async {}))
    }

    fn batch(c: &mut Conn, batch: u64, last_id: u64) {
        c.unsent.push_back(true);
        c.inflight.push_back(InFlight {
            batch,
            from: last_id - 9,
            backlog: false,
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
        c.take_acked();
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
    async fn pubacks_retire_their_own_batch_in_any_order() {
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
        let done: Vec<u64> = c.take_acked().iter().map(|b| b.last_id).collect();
        assert_eq!(
            done,
            vec![20],
            "its own range goes, batch 1 still in flight"
        );
        assert!(!c.on_puback(3), "a repeated PUBACK changes nothing");
        assert!(c.on_puback(2));
        let done: Vec<u64> = c.take_acked().iter().map(|b| b.last_id).collect();
        assert_eq!(done, vec![10]);
        assert!(c.on_puback(4));
        assert_eq!(c.take_acked().len(), 1);
        assert!(c.inflight.is_empty());
    }

    #[test]
    fn acknowledged_ranges_merge_and_are_skipped() {
        let mut r = BTreeMap::new();
        note_range(&mut r, 11, 20);
        note_range(&mut r, 31, 40);
        assert_eq!(r.len(), 2);
        note_range(&mut r, 21, 30);
        assert_eq!(r, BTreeMap::from([(11, 40)]), "adjacent ranges merge");
        note_range(&mut r, 1, 5);
        note_range(&mut r, 3, 12);
        assert_eq!(r, BTreeMap::from([(1, 40)]), "overlaps merge");
        let skip = Skip {
            dead: BTreeSet::from([50]),
            acked: r,
            filters: None,
            sink: None,
        };
        assert_eq!(skip.skip(1), Some(40));
        assert_eq!(skip.skip(40), Some(40));
        assert_eq!(skip.skip(41), None);
        assert_eq!(skip.skip(50), Some(50));
    }

    #[test]
    fn the_drain_pace_is_events_or_bytes_a_second() {
        let (count, packet) = (500, 64 * 1024);
        assert_eq!(pace(DrainRate::Unlimited, count, packet), Duration::ZERO);
        assert_eq!(
            pace(DrainRate::Events(1000), count, packet),
            Duration::from_millis(500)
        );
        assert_eq!(
            pace(DrainRate::Bytes(32 * 1024), count, packet),
            Duration::from_secs(2)
        );
    }
}
