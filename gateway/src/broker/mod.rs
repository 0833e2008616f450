//! The embedded broker: the MQTT face sensors and local subscribers connect to, on
//! `[ingest.mqtt] listen` (and `tls_listen`).
//!
//! ```text
//! sensor ──PUBLISH──> conn ──Incoming──> commit loop ──commit──> ack: PUBACK to the sensor,
//!                      │                                          and the publish routed
//!                      └─ topic not ingested: routed, acknowledged at once
//! router (sessions, subscriptions, retained) ──> conn ──PUBLISH──> local subscriber
//! ```
//!
//! - [`codec`] reads and writes MQTT 3.1, 3.1.1 and 5 (on rumqttc's codecs), picked per
//!   connection by the CONNECT's protocol level; [`packet`] is the one set of types both
//!   speak into.
//! - [`session`] is a connection's inbound state without I/O: publishes waiting for their
//!   commit, acknowledgements in order, QoS 2 releases, topic aliases.
//! - [`router`] serves local subscribers without I/O: sessions, subscriptions, retained
//!   messages, bounded queues and in-flight windows.
//! - `conn` is the I/O: one tokio task per connection.
//!
//! A sensor's QoS 1 publish on an ingested topic is acknowledged only after the commit that
//! stored it (or that a rule dropped or dead-lettered it): the PUBACK says the gateway has
//! taken responsibility. QoS 2: PUBREC after the commit, then PUBREL/PUBCOMP. The window of
//! publishes waiting (`receive_maximum`) is the backpressure: while the store cannot keep up
//! or cannot store, sensors wait. Local subscribers get an ingested publish, as it was
//! received, once it is committed; other topics are routed and acknowledged on receipt.
//! Sessions are kept in memory (a restart ends them: `session_present = 0`); retained
//! messages and the inbound dedupe state of persistent sessions are kept in the store.

pub mod codec;
mod conn;
pub mod packet;
pub mod router;
pub mod session;
mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::tokio_rustls;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::admin::metrics::Metrics;
use crate::config::MqttIngestConfig;
use crate::ingest::IngestTx;
use crate::shutdown::Shutdown;
use crate::store::retained::{RetainedLog, RetainedRow};
use packet::{PubProps, Qos};
use router::{Limits, Message, RetainChange, Router};

/// Broker start-up errors.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The listen address is taken or not ours.
    #[error("key `ingest.mqtt.{key}`: cannot listen on {addr}: {source} (is another broker running? pick a free port)")]
    Listen {
        /// `listen` or `tls_listen`.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS listener's certificate or key.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// How the broker is set up (from `[ingest.mqtt]`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Plain MQTT listener.
    pub listen: SocketAddr,
    /// MQTT over TLS listener, with its certificate and key files.
    pub tls: Option<(SocketAddr, std::path::PathBuf, std::path::PathBuf)>,
    /// Filters whose publishes are ingested (stored, acknowledged after the commit).
    pub ingest_topics: Vec<String>,
    /// Largest payload ingested; larger ones are refused (MQTT 5 reason 0x97) and counted.
    pub max_payload: usize,
    /// Largest packet read (announced as MQTT 5 Maximum Packet Size): above `max_payload`, so
    /// an oversize payload reaches us and is refused politely.
    pub max_packet: usize,
    /// username → password; empty: anonymous.
    pub users: HashMap<String, String>,
    /// Most connections at once.
    pub max_connections: usize,
    /// Publishes a sensor may have waiting for their commit.
    pub receive_maximum: u16,
    /// Router limits (queues, retained, in-flight).
    pub limits: Limits,
    /// Longest session expiry granted (seconds).
    pub max_session_expiry: u32,
    /// Time to send CONNECT.
    pub connect_timeout: Duration,
}

impl Settings {
    /// From `[ingest.mqtt]`.
    pub fn from_config(cfg: &MqttIngestConfig) -> Settings {
        let max_payload = cfg.max_payload.0 as usize;
        let tls = match (cfg.tls_listen, &cfg.tls_cert, &cfg.tls_key) {
            (Some(a), Some(c), Some(k)) => Some((a, c.clone(), k.clone())),
            _ => None,
        };
        Settings {
            listen: cfg.listen,
            tls,
            ingest_topics: cfg.topics.clone(),
            max_payload,
            max_packet: (max_payload * 4).max(1 << 20),
            users: cfg
                .users
                .iter()
                .map(|u| (u.username.clone(), u.password.clone()))
                .collect(),
            max_connections: cfg.max_connections,
            receive_maximum: cfg.receive_maximum.max(1),
            limits: Limits {
                max_queued: cfg.max_queued_messages.max(1),
                max_retained: cfg.max_retained,
                default_inflight: cfg.subscriber_inflight.max(1),
            },
            max_session_expiry: cfg.max_session_expiry.0.as_secs().min(u64::from(u32::MAX)) as u32,
            connect_timeout: cfg.connect_timeout.0,
        }
    }

    /// A broker that ingests nothing: every publish is routed and acknowledged on receipt
    /// (the demo's stand-in for a cloud broker).
    pub fn routing_only(listen: SocketAddr) -> Settings {
        Settings {
            listen,
            tls: None,
            ingest_topics: Vec::new(),
            max_payload: 1 << 20,
            max_packet: 4 << 20,
            users: HashMap::new(),
            max_connections: 100,
            receive_maximum: 1000,
            limits: Limits {
                max_queued: 10_000,
                max_retained: 1000,
                default_inflight: 100,
            },
            max_session_expiry: 3600,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// An online connection, as other tasks see it.
struct Online {
    conn: u64,
    /// Something was queued for it.
    wake: Arc<Notify>,
    /// A newer connection took its client id.
    kick: Arc<Notify>,
    /// Set with `kick`: stop touching the session at once.
    superseded: Arc<std::sync::atomic::AtomicBool>,
}

/// What every connection shares.
struct Shared {
    settings: Settings,
    metrics: Arc<Metrics>,
    router: Mutex<Router>,
    online: Mutex<HashMap<Arc<str>, Online>>,
    /// Taken at shutdown, so the commit loop sees ingest end once connections have gone.
    ingest: Mutex<Option<IngestTx>>,
    retained_log: Option<Arc<RetainedLog>>,
    acks_log: Option<Arc<crate::store::dedup::BrokerAckLog>>,
    /// Tells this run's assigned client ids from an earlier run's.
    run: u64,
    next_conn: AtomicU64,
    connections: AtomicU64,
    shutdown: Shutdown,
}

/// What the broker shares with the store: where retained changes are noted (and what was
/// kept from earlier runs), and where written acknowledgements are reported.
pub struct StoreLinks {
    /// Retained changes, written with the next commit.
    pub retained: Arc<RetainedLog>,
    /// The retained messages stored.
    pub kept: Vec<(String, RetainedRow)>,
    /// PUBACKs written for recorded publishes (their dedupe entries go).
    pub acks: Arc<crate::store::dedup::BrokerAckLog>,
}

/// A running broker; cheap to clone. Rules publish through it.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl Broker {
    /// Binds the listeners and serves until `shutdown`. `ingest`: where sensors' events go
    /// (`None`: route only); `retained`: where retained changes are written and what was
    /// kept.
    pub async fn start(
        settings: Settings,
        ingest: Option<IngestTx>,
        metrics: Arc<Metrics>,
        store: Option<StoreLinks>,
        shutdown: Shutdown,
    ) -> Result<(Broker, tokio::task::JoinHandle<()>), BrokerError> {
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| BrokerError::Listen {
                    key: "listen",
                    addr: settings.listen,
                    source,
                })?;
        let addr = listener.local_addr().unwrap_or(settings.listen);
        let tls = match &settings.tls {
            Some((a, cert, key)) => {
                let acceptor = tls::acceptor(cert, key)?;
                let l = TcpListener::bind(a)
                    .await
                    .map_err(|source| BrokerError::Listen {
                        key: "tls_listen",
                        addr: *a,
                        source,
                    })?;
                Some((l, acceptor))
            }
            None => None,
        };
        if settings.users.is_empty() {
            for a in
                std::iter::once(addr).chain(tls.as_ref().and_then(|(l, _)| l.local_addr().ok()))
            {
                if !a.ip().is_loopback() {
                    warn!(listen = %a, "the embedded broker listens beyond loopback and `ingest.mqtt.users` is empty: anyone who can reach it may publish and subscribe");
                }
            }
        }
        let mut router = Router::new(settings.limits.clone());
        let (log, kept, acks) = match store {
            Some(s) => (Some(s.retained), s.kept, Some(s.acks)),
            None => (None, Vec::new(), None),
        };
        let now = Instant::now();
        let wall = crate::event::now_ms();
        router.load_retained(
            kept.into_iter()
                .map(|(t, r)| message_from_row(&t, r, now, wall)),
        );
        metrics
            .broker
            .retained
            .store(router.stats().retained as u64, Relaxed);
        let shared = Arc::new(Shared {
            settings,
            metrics,
            router: Mutex::new(router),
            online: Mutex::new(HashMap::new()),
            ingest: Mutex::new(ingest),
            retained_log: log,
            acks_log: acks,
            run: crate::event::now_ms() as u64 % 1_000_000,
            next_conn: AtomicU64::new(1),
            connections: AtomicU64::new(0),
            shutdown,
        });
        info!(listen = %addr, tls = ?tls.as_ref().and_then(|(l, _)| l.local_addr().ok()), "embedded MQTT broker listening (MQTT 3.1, 3.1.1, 5)");
        let task = tokio::spawn(serve(shared.clone(), listener, tls));
        Ok((Broker { shared, addr }, task))
    }

    /// The plain listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Publishes to local subscribers (rule `publish()`: QoS 1, not retained); returns the
    /// sessions it was queued to.
    pub fn publish(&self, topic: &str, payload: Bytes, qos: Qos, retain: bool) -> usize {
        self.publish_with(topic, payload, qos, retain, Vec::new())
    }

    /// [`Broker::publish`] with MQTT 5 user properties (3.1.1 subscribers get the message
    /// without them).
    pub fn publish_with(
        &self,
        topic: &str,
        payload: Bytes,
        qos: Qos,
        retain: bool,
        user: Vec<(String, String)>,
    ) -> usize {
        let msg = Message {
            topic: topic.into(),
            payload,
            qos,
            retain,
            props: Arc::new(PubProps {
                user,
                ..PubProps::default()
            }),
            expires_at: None,
            from: None,
        };
        self.shared.route(msg)
    }
}

impl Shared {
    /// Routes a message to local subscribers, wakes their connections, notes a retained
    /// change for the store. Returns the sessions it was queued to.
    fn route(&self, msg: Message) -> usize {
        let now = Instant::now();
        let (routed, stats) = {
            let mut r = self.router.lock().unwrap();
            let mut routed = r.publish(msg, now);
            // Noted under the router's lock, so the store gets the changes in their order.
            if let (Some(change), Some(log)) = (routed.retained.take(), &self.retained_log) {
                match change {
                    RetainChange::Set(m) => log.note(&m.topic, Some(row_from_message(&m, now))),
                    RetainChange::Cleared(topic) => log.note(&topic, None),
                }
            }
            (routed, r.stats())
        };
        let b = &self.metrics.broker;
        b.dropped_queue_full
            .store(stats.dropped_queue_full, Relaxed);
        b.dropped_expired.store(stats.dropped_expired, Relaxed);
        b.retained.store(stats.retained as u64, Relaxed);
        if !routed.woken.is_empty() {
            let online = self.online.lock().unwrap();
            for c in &routed.woken {
                if let Some(o) = online.get(c) {
                    o.wake.notify_one();
                }
            }
        }
        routed.matched
    }

    /// Whether `topic` is ingested.
    fn ingested(&self, topic: &str) -> bool {
        self.settings
            .ingest_topics
            .iter()
            .any(|f| router::matches(f, topic))
    }
}

/// Accepts connections until shutdown.
async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
) {
    let mut sd = shared.shutdown.clone();
    let (tls_listener, acceptor) = match tls {
        Some((l, a)) => (Some(l), Some(a)),
        None => (None, None),
    };
    let mut expire = tokio::time::interval(Duration::from_secs(1));
    loop {
        let tls_accept = async {
            match &tls_listener {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sd.wait() => break,
            _ = expire.tick() => {
                let now = Instant::now();
                let mut r = shared.router.lock().unwrap();
                r.expire(now);
                let stats = r.stats();
                shared.metrics.broker.sessions.store(stats.sessions as u64, Relaxed);
                shared.metrics.broker.retained.store(stats.retained as u64, Relaxed);
                shared.metrics.broker.dropped_expired.store(stats.dropped_expired, Relaxed);
                // Noted under the router's lock, as in `route`.
                for topic in r.expire_retained(now) {
                    if let Some(log) = &shared.retained_log {
                        log.note(&topic, None);
                    }
                }
            }
            a = listener.accept() => match a {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(conn::serve(stream, peer, shared.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "embedded broker: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            a = tls_accept => match a {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let acceptor = acceptor.clone().expect("a TLS listener has an acceptor");
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(shared.settings.connect_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => conn::serve(s, peer, shared).await,
                            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "embedded broker: TLS accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    // Connections see the shutdown themselves; new ones cannot come. Ingest ends once the
    // last connection has dropped its sender.
    shared.ingest.lock().unwrap().take();
}

/// A stored retained message back in the router.
fn message_from_row(topic: &str, r: RetainedRow, now: Instant, wall: i64) -> Message {
    let expires_at = r
        .expires_at
        .map(|at| now + Duration::from_millis(at.saturating_sub(wall).max(0) as u64));
    Message {
        topic: topic.into(),
        payload: Bytes::from(r.payload),
        qos: if r.qos >= 1 {
            Qos::AtLeastOnce
        } else {
            Qos::AtMostOnce
        },
        retain: true,
        props: Arc::new(PubProps {
            payload_format: r.payload_format,
            response_topic: r.response_topic,
            correlation_data: r.correlation_data.map(Bytes::from),
            user: r.user,
            content_type: r.content_type,
            ..PubProps::default()
        }),
        expires_at,
        from: None,
    }
}

/// A retained message as stored.
fn row_from_message(m: &Message, now: Instant) -> RetainedRow {
    let wall = crate::event::now_ms();
    RetainedRow {
        payload: m.payload.to_vec(),
        qos: m.qos as u8,
        expires_at: m
            .expires_at
            .map(|at| wall + at.saturating_duration_since(now).as_millis() as i64),
        user: m.props.user.clone(),
        content_type: m.props.content_type.clone(),
        payload_format: m.props.payload_format,
        response_topic: m.props.response_topic.clone(),
        correlation_data: m.props.correlation_data.as_ref().map(|b| b.to_vec()),
    }
}
