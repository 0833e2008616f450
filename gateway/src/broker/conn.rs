//! One MQTT connection: CONNECT, then packets in and out until either side closes.
//!
//! The state lives in [`Inbound`] (this connection's publishes) and the [`super::router`]
//! (its session as a subscriber); this task moves bytes, waits for commits and wakes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tracing::debug;

use super::codec::{self, DecodeError};
use super::packet::{ConnAckProps, ConnCode, Connect, In, Out, Publish, Qos, Version, Will};
use super::router::{self, Message};
use super::session::{self, Accepted, Inbound};
use super::{Online, Shared};
use crate::admin::metrics::DropReason;
use crate::event::{Event, Payload};
use crate::ingest::{stable_hash, Dedup, Incoming, IngestTx, MQTT_SOURCE};
use crate::store::dedup::BrokerKey;

/// Topic aliases a client may set.
const TOPIC_ALIAS_MAX: u16 = 16;
/// MQTT 5 reasons the server disconnects with.
const SESSION_TAKEN_OVER: u8 = 0x8E;
const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
const SHUTTING_DOWN: u8 = 0x8B;
const PACKET_TOO_LARGE: u8 = 0x95;
const MALFORMED: u8 = 0x81;
/// How long a client may keep us from writing to it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a connection ended, for the DEBUG line and the will.
#[derive(Debug)]
enum End {
    /// DISCONNECT from the client; `true`: with its will (MQTT 5 reason 0x04).
    Disconnect(bool),
    /// The socket closed or failed.
    Closed(String),
    /// We closed it (why).
    Server(String),
    /// Gateway shutdown.
    Shutdown,
}

/// Counts the connection while it lives.
struct Count(Arc<Shared>);

impl Drop for Count {
    fn drop(&mut self) {
        let n = self.0.connections.fetch_sub(1, Relaxed) - 1;
        self.0.metrics.broker.connections.store(n, Relaxed);
    }
}

/// Serves one connection to its end.
pub(super) async fn serve<S>(stream: S, peer: SocketAddr, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let n = shared.connections.fetch_add(1, Relaxed) + 1;
    shared.metrics.broker.connections.store(n, Relaxed);
    let _count = Count(shared.clone());
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(4096);
    let max_packet = shared.settings.max_packet;
    let first = tokio::time::timeout(
        shared.settings.connect_timeout,
        read_connect(&mut rd, &mut buf, max_packet),
    )
    .await;
    let connect = match first {
        Ok(Ok(c)) => c,
        Ok(Err(ReadError::Decode(DecodeError::UnsupportedProtocol { name, level }))) => {
            debug!(%peer, name, level, "CONNECT with an unsupported protocol refused");
            shared.metrics.broker.protocol_errors.fetch_add(1, Relaxed);
            let v = if level == 5 {
                Version::V5
            } else {
                Version::V311
            };
            let _ = send(&mut wr, v, &[connack(ConnCode::BadProtocol)]).await;
            return;
        }
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "connection closed before a valid CONNECT");
            if matches!(e, ReadError::Decode(_)) {
                shared.metrics.broker.protocol_errors.fetch_add(1, Relaxed);
            }
            return;
        }
        Err(_) => {
            debug!(%peer, "no CONNECT in time; closed");
            return;
        }
    };
    let v = connect.version;
    let refuse = |code: ConnCode| vec![connack(code)];
    let refused = if shared.shutdown.is_set() {
        Some(ConnCode::Unavailable)
    } else {
        check_connect(&shared, &connect, n)
    };
    if let Some(code) = refused {
        debug!(%peer, client = %connect.client_id, ?code, "CONNECT refused");
        let _ = send(&mut wr, v, &refuse(code)).await;
        return;
    }
    let conn_id = shared.next_conn.fetch_add(1, Relaxed);
    let mut props = ConnAckProps::default();
    let client: Arc<str> = if connect.client_id.is_empty() {
        let id = format!("tidepool-auto-{}-{conn_id}", shared.run);
        if v == Version::V5 {
            props.assigned_client_id = Some(id.clone());
        }
        id.into()
    } else {
        connect.client_id.as_str().into()
    };
    let max = shared.settings.max_session_expiry;
    let expiry = match v {
        Version::V5 => {
            let asked = connect.session_expiry.unwrap_or(0);
            if asked > max {
                props.session_expiry = Some(max);
            }
            asked.min(max)
        }
        _ if connect.clean_start => 0,
        _ => max,
    };
    // A newer connection takes the client id over.
    let wake = Arc::new(Notify::new());
    let kick = Arc::new(Notify::new());
    let superseded = Arc::new(AtomicBool::new(false));
    // Taken over and connected in one step (the `online` lock held over the router's), so
    // two connections racing for one client id end the same way in both.
    let session_present = {
        let mut online = shared.online.lock().unwrap();
        if let Some(old) = online.insert(
            client.clone(),
            Online {
                conn: conn_id,
                wake: wake.clone(),
                kick: kick.clone(),
                superseded: superseded.clone(),
            },
        ) {
            old.superseded.store(true, Relaxed);
            old.kick.notify_one();
        }
        let mut r = shared.router.lock().unwrap();
        let present = r.connect(
            &client,
            conn_id,
            connect.clean_start,
            expiry,
            connect.receive_max,
            Instant::now(),
        );
        shared
            .metrics
            .broker
            .sessions
            .store(r.stats().sessions as u64, Relaxed);
        present
    };
    if v == Version::V5 {
        props.receive_max = Some(shared.settings.receive_maximum);
        props.max_packet = Some(max_packet as u32);
        props.topic_alias_max = Some(TOPIC_ALIAS_MAX);
        props.retain_available = Some(true);
        props.wildcard_available = Some(true);
        props.sub_ids_available = Some(true);
        props.shared_available = Some(false);
    }
    let ack = Out::ConnAck {
        session_present,
        code: ConnCode::Success,
        props,
    };
    let ingest = shared.ingest.lock().unwrap().clone();
    let mut c = Conn {
        shared: shared.clone(),
        client: client.clone(),
        source: format!("{MQTT_SOURCE}:{client}"),
        v,
        persistent: expiry > 0,
        purge_next: connect.clean_start,
        client_max_packet: connect.max_packet.map(|m| m as usize),
        keep_alive: connect.keep_alive,
        will: connect.will.clone(),
        inbound: Inbound::new(
            shared.settings.receive_maximum,
            if v == Version::V5 { TOPIC_ALIAS_MAX } else { 0 },
        ),
        ingest,
        out: BytesMut::with_capacity(4096),
        done: mpsc::unbounded_channel(),
        recorded: std::collections::HashMap::new(),
        superseded,
    };
    debug!(%peer, client = %client, version = ?v, keep_alive = connect.keep_alive, session_present, "MQTT client connected");
    c.encode(&[ack]);
    if session_present {
        let resend = shared
            .router
            .lock()
            .unwrap()
            .resume(&client, Instant::now());
        let outs: Vec<Out> = resend.into_iter().map(Out::Publish).collect();
        c.encode(&outs);
    }
    let end = c.run(&mut rd, &mut wr, &mut buf, &wake, &kick).await;
    // The end: the session goes offline (or away), the will goes out unless the client
    // said goodbye.
    {
        let mut online = shared.online.lock().unwrap();
        if online.get(&client).is_some_and(|o| o.conn == conn_id) {
            online.remove(&client);
        }
    }
    {
        let mut r = shared.router.lock().unwrap();
        r.disconnect(&client, conn_id, Instant::now());
        shared
            .metrics
            .broker
            .sessions
            .store(r.stats().sessions as u64, Relaxed);
    }
    let will = match &end {
        End::Disconnect(with_will) => *with_will,
        End::Shutdown => false,
        End::Closed(_) | End::Server(_) => true,
    };
    let why = match &end {
        End::Disconnect(_) => "DISCONNECT".to_string(),
        End::Closed(why) | End::Server(why) => why.clone(),
        End::Shutdown => "gateway shutdown".to_string(),
    };
    debug!(%peer, client = %client, why, will = will && c.will.is_some(), "MQTT client disconnected");
    if will {
        if let Some(w) = c.will.take() {
            publish_will(shared, client, conn_id, expiry, w, c.ingest.take());
        }
    }
}

/// The first packet: a CONNECT.
async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Connect, ReadError> {
    loop {
        if let Some(c) = codec::decode_connect(buf, max_packet)? {
            return Ok(c);
        }
        if rd.read_buf(buf).await? == 0 {
            return Err(ReadError::Closed);
        }
    }
}

/// Reading failed.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("closed")]
    Closed,
}

fn connack(code: ConnCode) -> Out {
    Out::ConnAck {
        session_present: false,
        code,
        props: ConnAckProps::default(),
    }
}

/// Why a CONNECT is refused, if it is.
fn check_connect(shared: &Shared, c: &Connect, connections: u64) -> Option<ConnCode> {
    let b = &shared.metrics.broker;
    if connections > shared.settings.max_connections as u64 {
        b.refused_full.fetch_add(1, Relaxed);
        return Some(ConnCode::Unavailable);
    }
    if c.auth_method.is_some() {
        b.refused_auth.fetch_add(1, Relaxed);
        return Some(ConnCode::BadAuthMethod);
    }
    if !shared.settings.users.is_empty() {
        let ok = match (&c.username, &c.password) {
            (Some(u), Some(p)) => shared
                .settings
                .users
                .get(u)
                .is_some_and(|want| want.as_bytes() == p.as_ref()),
            _ => false,
        };
        if !ok {
            b.refused_auth.fetch_add(1, Relaxed);
            return Some(ConnCode::BadAuth);
        }
    }
    if c.client_id.is_empty() && c.version != Version::V5 && !c.clean_start {
        return Some(ConnCode::BadClientId); // 3.1.1 §3.1.3.1: a persistent session needs a name
    }
    if c.client_id.is_empty() && c.version == Version::V31 {
        return Some(ConnCode::BadClientId);
    }
    if let Some(w) = &c.will {
        if !router::valid_topic(&w.topic) {
            b.protocol_errors.fetch_add(1, Relaxed);
            return Some(ConnCode::Malformed);
        }
    }
    None
}

async fn send<W: AsyncWrite + Unpin>(wr: &mut W, v: Version, outs: &[Out]) -> std::io::Result<()> {
    let mut b = BytesMut::new();
    for o in outs {
        if codec::encode(o, v, &mut b).is_err() {
            continue;
        }
    }
    wr.write_all(&b).await?;
    wr.flush().await
}

/// A commit's report for one publish: (its number in [`Inbound`], reason code).
type Done = (u64, u8);

/// One connection after its CONNACK.
struct Conn {
    shared: Arc<Shared>,
    client: Arc<str>,
    source: String,
    v: Version,
    persistent: bool,
    /// The next QoS 1/2 publish carries the purge of this client's dedupe entries (a clean
    /// session: nothing of an earlier one will be resent).
    purge_next: bool,
    client_max_packet: Option<usize>,
    keep_alive: u16,
    will: Option<Will>,
    inbound: Inbound,
    ingest: Option<IngestTx>,
    out: BytesMut,
    /// Recorded publishes (persistent session) waiting for their acknowledgement: pkid → hash.
    recorded: std::collections::HashMap<u16, u64>,
    /// A newer connection took the client id: touch the session no more.
    superseded: Arc<AtomicBool>,
    /// Commits report here: (seq, reason).
    done: (mpsc::UnboundedSender<Done>, mpsc::UnboundedReceiver<Done>),
}

impl Conn {
    /// Encodes acknowledgements, reporting those of recorded publishes to the store.
    fn acknowledge(&mut self, outs: Vec<Out>) {
        if let Some(log) = &self.shared.acks_log {
            for o in &outs {
                if let Out::PubAck { pkid, .. } | Out::PubRec { pkid, .. } = o {
                    if let Some(hash) = self.recorded.remove(pkid) {
                        log.written(self.client.clone(), *pkid, hash);
                    }
                }
            }
        }
        self.encode(&outs);
    }

    fn encode(&mut self, outs: &[Out]) {
        for o in outs {
            if let Err(e) = codec::encode(o, self.v, &mut self.out) {
                debug!(client = %self.client, error = %e, "packet not encoded");
            }
        }
    }

    async fn run<R, W>(
        &mut self,
        rd: &mut R,
        wr: &mut W,
        buf: &mut BytesMut,
        wake: &Notify,
        kick: &Notify,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut sd = self.shared.shutdown.clone();
        let mut last_packet = Instant::now();
        self.drain_router();
        loop {
            // What is already read, as far as the window lets us.
            match self.process(buf, &mut last_packet).await {
                Ok(()) => {}
                Err(end) => {
                    let _ = self.flush(wr, &mut sd).await;
                    return end;
                }
            }
            if let Err(e) = self.flush(wr, &mut sd).await {
                return End::Closed(e.to_string());
            }
            let can_read = !self.inbound.full();
            if !can_read {
                // Not reading: the client's PINGREQs wait unread in the socket, so its silence
                // is ours. The keep-alive counts again once the window opens.
                last_packet = Instant::now();
            }
            let deadline =
                session::keep_alive_deadline(self.keep_alive, last_packet).filter(|_| can_read);
            tokio::select! {
                biased;
                _ = sd.wait() => {
                    self.disconnect(SHUTTING_DOWN);
                    let _ = self.flush(wr, &mut sd).await;
                    return End::Shutdown;
                }
                _ = kick.notified() => {
                    self.disconnect(SESSION_TAKEN_OVER);
                    let _ = self.flush(wr, &mut sd).await;
                    return End::Server("session taken over".into());
                }
                Some(first) = self.done.1.recv() => {
                    let mut outs = Vec::new();
                    let mut next = Some(first);
                    while let Some((seq, reason)) = next {
                        if reason == session::QUOTA_EXCEEDED && self.v != Version::V5 {
                            // The buffer refused it, and 3.1.1 cannot say so: no PUBACK,
                            // the connection ends, the sensor keeps the message.
                            self.acknowledge(outs);
                            let _ = self.flush(wr, &mut sd).await;
                            return End::Server("the buffer is full (when_full = reject_new, or the disk below min_free): publish refused, not acknowledged".into());
                        }
                        outs.extend(self.inbound.done(seq, reason));
                        next = self.done.1.try_recv().ok();
                    }
                    self.acknowledge(outs);
                }
                _ = wake.notified() => self.drain_router(),
                r = rd.read_buf(buf), if can_read => match r {
                    Ok(0) => return End::Closed("closed by the client".into()),
                    Ok(_) => {}
                    Err(e) => return End::Closed(e.to_string()),
                },
                _ = sleep_until(deadline) => {
                    self.disconnect(KEEP_ALIVE_TIMEOUT);
                    let _ = self.flush(wr, &mut sd).await;
                    return End::Server("keep-alive expired".into());
                }
            }
        }
    }

    /// Writes what is encoded; a peer that stops reading for [`WRITE_TIMEOUT`] (or a
    /// shutdown meanwhile) ends the connection.
    async fn flush<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        sd: &mut crate::shutdown::Shutdown,
    ) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let write = async {
            wr.write_all(&self.out).await?;
            wr.flush().await
        };
        let r = tokio::select! {
            r = tokio::time::timeout(WRITE_TIMEOUT, write) => match r {
                Ok(r) => r,
                Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading")),
            },
            _ = sd.wait() => Err(std::io::Error::other("gateway shutdown")),
        };
        self.out.clear();
        r
    }

    fn disconnect(&mut self, reason: u8) {
        if self.v == Version::V5 {
            self.encode(&[Out::Disconnect { reason }]);
        }
    }

    /// Decodes and handles what is buffered, while the window has room.
    async fn process(&mut self, buf: &mut BytesMut, last: &mut Instant) -> Result<(), End> {
        while !self.inbound.full() {
            if self.superseded.load(Relaxed) {
                self.disconnect(SESSION_TAKEN_OVER);
                return Err(End::Server("session taken over".into()));
            }
            let p = match codec::decode(buf, self.v, self.shared.settings.max_packet) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(DecodeError::TooLarge { size, max }) => {
                    self.shared
                        .metrics
                        .broker
                        .protocol_errors
                        .fetch_add(1, Relaxed);
                    self.disconnect(PACKET_TOO_LARGE);
                    return Err(End::Server(format!(
                        "packet of {size} B over the {max} B limit"
                    )));
                }
                Err(e) => {
                    self.shared
                        .metrics
                        .broker
                        .protocol_errors
                        .fetch_add(1, Relaxed);
                    self.disconnect(MALFORMED);
                    return Err(End::Server(e.to_string()));
                }
            };
            *last = Instant::now();
            let handled = self.handle(p).await;
            if let Err(End::Server(_)) = &handled {
                // A protocol error the codec could not see (a bad topic or topic alias, a
                // second CONNECT, the window overrun): counted like the ones it sees.
                self.shared
                    .metrics
                    .broker
                    .protocol_errors
                    .fetch_add(1, Relaxed);
            }
            handled?;
        }
        Ok(())
    }

    async fn handle(&mut self, p: In) -> Result<(), End> {
        match p {
            In::Publish(p) => self.publish(p).await?,
            In::PubAck(pkid) => {
                self.shared.router.lock().unwrap().acked(&self.client, pkid);
                self.drain_router();
            }
            In::PubRec(pkid) => self.encode(&[Out::PubRel(pkid)]),
            In::PubComp(_) => {}
            In::PubRel(pkid) => {
                let o = self.inbound.release(pkid);
                self.encode(&[o]);
            }
            In::Subscribe { pkid, filters, id } => {
                let now = Instant::now();
                let codes: Vec<u8> = {
                    let mut r = self.shared.router.lock().unwrap();
                    filters
                        .into_iter()
                        .map(
                            |(f, opts)| match r.subscribe(&self.client, &f, opts, id, now) {
                                Ok(q) => q as u8,
                                Err(e) => e.code(),
                            },
                        )
                        .collect()
                };
                self.encode(&[Out::SubAck { pkid, codes }]);
                self.drain_router();
            }
            In::Unsubscribe { pkid, filters } => {
                let codes: Vec<u8> = {
                    let mut r = self.shared.router.lock().unwrap();
                    filters
                        .iter()
                        .map(|f| {
                            if r.unsubscribe(&self.client, f) {
                                0
                            } else {
                                0x11
                            }
                        })
                        .collect()
                };
                self.encode(&[Out::UnsubAck { pkid, codes }]);
            }
            In::PingReq => self.encode(&[Out::PingResp]),
            In::Disconnect {
                reason,
                session_expiry,
            } => {
                if let Some(e) = session_expiry {
                    let e = e.min(self.shared.settings.max_session_expiry);
                    self.shared
                        .router
                        .lock()
                        .unwrap()
                        .set_expiry(&self.client, e);
                }
                return Err(End::Disconnect(reason == 0x04));
            }
            In::Connect(_) => {
                self.disconnect(session::PROTOCOL_ERROR);
                return Err(End::Server("a second CONNECT".into()));
            }
            In::Auth => {
                self.disconnect(session::PROTOCOL_ERROR);
                return Err(End::Server("AUTH without an authentication method".into()));
            }
        }
        Ok(())
    }

    /// A sensor's PUBLISH.
    async fn publish(&mut self, mut p: Publish) -> Result<(), End> {
        if let Err(reason) = self.inbound.resolve_topic(&mut p) {
            self.disconnect(reason);
            return Err(End::Server("bad topic alias".into()));
        }
        if !router::valid_topic(&p.topic) {
            self.disconnect(session::TOPIC_INVALID);
            return Err(End::Server(format!(
                "topic `{}` is not a valid topic name",
                p.topic
            )));
        }
        let seq = match self.inbound.accept(&p) {
            Ok(Accepted::New(seq)) => seq,
            Ok(Accepted::Duplicate) => {
                // Its PUBREC may be due now (the original's went already).
                let outs = self.inbound.ready();
                self.acknowledge(outs);
                return Ok(());
            }
            Err(reason) => {
                self.disconnect(reason);
                return Err(End::Server("receive maximum exceeded".into()));
            }
        };
        let needs_ack = p.qos != Qos::AtMostOnce;
        let ingest = self.shared.ingested(&p.topic);
        if ingest && self.ingest.is_none() {
            // Shutting down: not stored, so not acknowledged.
            return Err(End::Shutdown);
        }
        if !ingest {
            self.shared.route(Message::from_publish(
                &p,
                Some(&self.client),
                Instant::now(),
            ));
            if needs_ack {
                let outs = self.inbound.done(seq, 0);
                self.acknowledge(outs);
            }
            return Ok(());
        }
        let metrics = &self.shared.metrics;
        metrics.ingested(MQTT_SOURCE, 1);
        if p.payload.len() > self.shared.settings.max_payload {
            metrics.dropped(DropReason::Oversize, 1);
            debug!(client = %self.client, topic = %p.topic, size = p.payload.len(), max_payload = self.shared.settings.max_payload, "payload over max_payload refused");
            if needs_ack {
                let outs = self.inbound.done(seq, session::QUOTA_EXCEEDED);
                self.acknowledge(outs);
            }
            return Ok(());
        }
        let dedup = needs_ack.then(|| {
            let purge = std::mem::take(&mut self.purge_next);
            let hash = stable_hash(&[p.topic.as_bytes(), &p.payload]);
            if self.persistent {
                self.recorded.insert(p.pkid, hash);
            }
            Dedup::Broker(BrokerKey {
                client: self.client.clone(),
                pkid: p.pkid,
                hash,
                dup: p.dup,
                record: self.persistent,
                purge,
            })
        });
        // Routed to local subscribers, as received, once committed.
        let routed = Message::from_publish(&p, Some(&self.client), Instant::now());
        let shared = self.shared.clone();
        let done = self.done.0.clone();
        let ack: crate::ingest::AckFn = Box::new(move |taken| {
            let refused = taken == crate::ingest::Taken::Refused;
            if needs_ack {
                let reason = if refused { session::QUOTA_EXCEEDED } else { 0 };
                let _ = done.send((seq, reason));
            }
            if !refused {
                shared.route(routed);
            }
        });
        let mut event = Event::new(self.source.clone(), p.topic, Payload::from_raw(&p.payload));
        event.properties = p.props.user;
        // A sensor that already has a trace id (MQTT 5 user property `trace`) keeps it.
        if let Some(t) = event
            .properties
            .iter()
            .find(|(k, _)| k == "trace")
            .and_then(|(_, v)| crate::event::Trace::parse(v))
        {
            event.trace = t;
        }
        let incoming = Incoming {
            event,
            ack: Some(ack),
            dedup,
            bad: None,
        };
        let tx = self.ingest.as_ref().expect("checked above");
        if tx.send(incoming).await.is_err() {
            return Err(End::Shutdown);
        }
        Ok(())
    }

    /// Writes what the router has for this session, as far as its window allows.
    fn drain_router(&mut self) {
        if self.superseded.load(Relaxed) {
            return; // the session is the new connection's now
        }
        let now = Instant::now();
        let mut outs = Vec::new();
        {
            let mut r = self.shared.router.lock().unwrap();
            while let Some(p) = r.next_out(&self.client, now) {
                if let Some(max) = self.client_max_packet {
                    if codec::publish_size(&p, self.v) > max {
                        // MQTT 5 §3.1.2.11.4: not sent, as if sent and acknowledged.
                        self.shared
                            .metrics
                            .broker
                            .dropped_too_large
                            .fetch_add(1, Relaxed);
                        if p.qos != Qos::AtMostOnce {
                            r.acked(&self.client, p.pkid);
                        }
                        continue;
                    }
                }
                outs.push(Out::Publish(p));
            }
        }
        self.encode(&outs);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Publishes a will: at once, or after its MQTT 5 delay unless the client is back by then.
/// On an ingested topic it is ingested like any publish (no acknowledgement is owed).
fn publish_will(
    shared: Arc<Shared>,
    client: Arc<str>,
    conn_id: u64,
    expiry: u32,
    w: Will,
    ingest: Option<IngestTx>,
) {
    let who = client.clone();
    let go = move |shared: Arc<Shared>| async move {
        let client = who;
        let p = Publish {
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            dup: false,
            pkid: 0,
            props: w.props,
        };
        let msg = Message::from_publish(&p, Some(&client), Instant::now());
        match ingest {
            Some(tx) if shared.ingested(&p.topic) => {
                shared.metrics.ingested(MQTT_SOURCE, 1);
                let s2 = shared.clone();
                let incoming = Incoming {
                    event: Event::new(
                        format!("{MQTT_SOURCE}:{client}"),
                        p.topic.clone(),
                        Payload::from_raw(&p.payload),
                    ),
                    ack: Some(Box::new(move |taken| {
                        if taken == crate::ingest::Taken::Stored {
                            s2.route(msg);
                        }
                    })),
                    dedup: None,
                    bad: None,
                };
                let _ = tx.send(incoming).await;
            }
            _ => {
                shared.route(msg);
            }
        }
    };
    // MQTT 5 §3.1.3.2.2: sent when the delay or the session ends, whichever is first.
    let delay = w.delay.min(expiry);
    if delay == 0 {
        tokio::spawn(go(shared));
        return;
    }
    let delay = Duration::from_secs(u64::from(delay));
    let mut sd = shared.shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = sd.wait() => return, // nobody to tell, and ingest must be let go
        }
        let back = shared
            .online
            .lock()
            .unwrap()
            .get(&client)
            .is_some_and(|o| o.conn > conn_id);
        if !back {
            go(shared).await;
        }
    });
}
