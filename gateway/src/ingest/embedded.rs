//! Embedded mode: a rumqttd broker on its own thread; the gateway reads through a local link.
//!
//! rumqttd acknowledges a sensor's QoS 1 PUBLISH as soon as it has it in memory, before the
//! gateway has stored anything: a `kill -9` loses what the broker and the commit loop hold
//! but have not committed (see README, "Guarantees"). Its memory is capped by
//! `broker_memory` (segment size × count): when the store cannot keep up (a slow card) or
//! cannot store (a full disk), the reader waits, rumqttd's log wraps and the reader's cursor
//! jumps ahead. The reader sees the jump in the log offsets and counts what was skipped as
//! `dropped{reason="ingest_overflow"}`: acknowledged to a sensor, never stored.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Broker, Config as BrokerConfig, Notification};
use tracing::{error, info};

use super::{mqtt_event, Incoming, IngestTx, OwnPublishes};
use crate::admin::metrics::{DropReason, Metrics};
use crate::config::MqttIngestConfig;
use crate::shutdown::Shutdown;

/// Embedded-broker start-up errors.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// The listen address is taken or not ours.
    #[error("key `ingest.mqtt.listen`: cannot listen on {addr}: {source} (is another broker running? pick a free port)")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The broker refused the local link.
    #[error("embedded broker: {0}")]
    Link(String),
}

/// The rumqttd configuration for `cfg`.
pub fn broker_config(cfg: &MqttIngestConfig) -> BrokerConfig {
    let max_payload = cfg.max_payload.0 as usize;
    // rumqttd closes a connection that sends more than its limit; keep its limit above ours so
    // oversize payloads reach us, are counted and rejected, and the sensor stays connected.
    let broker_max = (max_payload * 4).max(1 << 20);
    let segment = ((cfg.broker_memory.0 as usize) / 4).max(broker_max * 2);
    let auth = if cfg.users.is_empty() {
        None
    } else {
        Some(
            cfg.users
                .iter()
                .map(|u| (u.username.clone(), u.password.clone()))
                .collect::<HashMap<_, _>>(),
        )
    };
    let server = rumqttd::ServerSettings {
        name: "tidepool".into(),
        listen: cfg.listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: broker_max,
            max_inflight_count: 100,
            auth,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    BrokerConfig {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: cfg.max_connections,
            max_outgoing_packet_count: 1000,
            max_segment_size: segment,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}

/// The running broker: a link for local publishes (rules) stays available.
pub struct Embedded {
    /// Publishes to local subscribers.
    pub link_tx: LinkTx,
    /// The reader thread; ends on shutdown, dropping its sender.
    pub reader: std::thread::JoinHandle<()>,
}

/// Starts the broker (thread for the life of the process) and the link reader.
pub fn start(
    cfg: &MqttIngestConfig,
    tx: IngestTx,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    own: OwnPublishes,
) -> Result<Embedded, EmbeddedError> {
    // Fail early and clearly if the port is taken: rumqttd would only log it on its thread.
    std::net::TcpListener::bind(cfg.listen).map_err(|source| EmbeddedError::Listen {
        addr: cfg.listen,
        source,
    })?;
    let mut broker = Broker::new(broker_config(cfg));
    let (mut link_tx, link_rx) = broker
        .link("tidepool-ingest")
        .map_err(|e| EmbeddedError::Link(e.to_string()))?;
    let (pub_tx, mut pub_rx) = broker
        .link("tidepool-publish")
        .map_err(|e| EmbeddedError::Link(e.to_string()))?;
    // The publishing link subscribes to nothing; drain whatever the router tells it.
    std::thread::Builder::new()
        .name("tidepool-publish".into())
        .spawn(move || while pub_rx.recv().is_ok() {})
        .expect("spawn publish-link thread");
    std::thread::Builder::new()
        .name("tidepool-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                error!(error = %e, "embedded broker stopped; sensors cannot connect");
            }
        })
        .expect("spawn broker thread");
    for t in &cfg.topics {
        link_tx
            .subscribe(t.clone())
            .map_err(|e| EmbeddedError::Link(e.to_string()))?;
    }
    info!(listen = %cfg.listen, "embedded MQTT broker listening");
    let max_payload = cfg.max_payload.0 as usize;
    let rt = tokio::runtime::Handle::current();
    let gaps = Gaps::new(&cfg.topics);
    let reader = std::thread::Builder::new()
        .name("tidepool-ingest".into())
        .spawn(move || {
            let link = Link {
                tx,
                rt,
                max_payload,
                metrics,
                own,
            };
            read_link(link_rx, link, gaps, shutdown)
        })
        .expect("spawn ingest thread");
    Ok(Embedded {
        link_tx: pub_tx,
        reader,
    })
}

/// Where the reader hands events.
struct Link {
    tx: IngestTx,
    rt: tokio::runtime::Handle,
    max_payload: usize,
    metrics: Arc<Metrics>,
    own: OwnPublishes,
}

/// Finds what rumqttd skipped: per subscribed filter, the log offset of the next message.
///
/// Each filter has its own log with consecutive absolute offsets; a forward whose offset is
/// past the expected one means the messages between were dropped from the log before the
/// reader got to them. Topics matching more than one filter are not checked (their filter
/// cannot be told from the forward).
#[derive(Debug)]
pub struct Gaps {
    filters: Vec<String>,
    next: HashMap<usize, u64>,
}

impl Gaps {
    /// For these subscriptions.
    pub fn new(filters: &[String]) -> Gaps {
        Gaps {
            filters: filters.to_vec(),
            next: HashMap::new(),
        }
    }

    /// Notes a forward of `topic` at absolute `offset`; returns how many were skipped before it.
    pub fn skipped(&mut self, topic: &str, offset: u64) -> u64 {
        let mut matching = self
            .filters
            .iter()
            .enumerate()
            .filter(|(_, f)| tidepool_rules::topic_matches(f, topic))
            .map(|(i, _)| i);
        let (Some(i), None) = (matching.next(), matching.next()) else {
            return 0;
        };
        let skipped = match self.next.get(&i) {
            Some(&want) if offset > want => offset - want,
            _ => 0,
        };
        self.next.insert(i, offset + 1);
        skipped
    }
}

fn read_link(mut rx: LinkRx, link: Link, mut gaps: Gaps, shutdown: Shutdown) {
    let Link {
        tx,
        rt,
        max_payload,
        metrics,
        own,
    } = link;
    let mut overflow_logged: Option<Instant> = None;
    while !shutdown.is_set() {
        match rx.recv_deadline(Instant::now() + Duration::from_millis(100)) {
            Ok(Some(Notification::Forward(f))) => {
                let topic = match std::str::from_utf8(&f.publish.topic) {
                    Ok(t) => t,
                    Err(_) => continue,
                };
                if let Some((_, offset)) = f.cursor {
                    let lost = gaps.skipped(topic, offset);
                    if lost > 0 {
                        metrics.dropped(DropReason::IngestOverflow, lost);
                        if overflow_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                            error!(
                                lost,
                                total = metrics.dropped_count(DropReason::IngestOverflow),
                                "embedded broker dropped events it had acknowledged: the store could not keep up (or could not store); counted as ingest_overflow"
                            );
                            overflow_logged = Some(Instant::now());
                        }
                    }
                }
                if own.take(topic, &f.publish.payload) {
                    continue;
                }
                if let Some(ev) = mqtt_event(topic, &f.publish.payload, max_payload, &metrics) {
                    if tx.blocking_send(Incoming::plain(ev), &rt).is_err() {
                        return;
                    }
                }
            }
            Ok(Some(Notification::Unschedule)) => {
                if rx.ready().is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(rumqttd::local::LinkError::RecvTimeout(_)) => {}
            Err(e) => {
                error!(error = %e, "embedded broker link closed; MQTT ingest stopped");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jump_in_offsets_is_counted_once() {
        let mut g = Gaps::new(&["sensors/#".to_string(), "other/#".to_string()]);
        assert_eq!(
            g.skipped("sensors/a", 0),
            0,
            "the first forward sets the cursor"
        );
        assert_eq!(g.skipped("sensors/b", 1), 0);
        assert_eq!(g.skipped("other/x", 7), 0, "each filter has its own log");
        assert_eq!(
            g.skipped("sensors/a", 5),
            3,
            "offsets 2, 3 and 4 were dropped"
        );
        assert_eq!(g.skipped("sensors/a", 6), 0);
        assert_eq!(g.skipped("other/x", 8), 0);
    }

    #[test]
    fn overlapping_filters_are_not_checked() {
        let mut g = Gaps::new(&["#".to_string(), "a/#".to_string()]);
        assert_eq!(g.skipped("a/b", 0), 0);
        assert_eq!(g.skipped("a/b", 10), 0);
        assert_eq!(g.skipped("z", 0), 0);
        assert_eq!(g.skipped("z", 4), 3);
    }
}
