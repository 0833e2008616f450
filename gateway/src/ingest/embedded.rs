//! Embedded mode: a rumqttd broker on its own thread; the gateway reads through a local link.
//!
//! rumqttd acknowledges a sensor's QoS 1 PUBLISH as soon as it has it in memory, before the
//! gateway has stored anything: a `kill -9` loses what the broker and the commit loop hold
//! but have not committed (see README, "Guarantees"). Its memory is capped by
//! `broker_memory` (segment size × count).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Broker, Config as BrokerConfig, Notification};
use tokio::sync::mpsc;
use tracing::{error, info};

use super::{mqtt_event, Incoming, OwnPublishes};
use crate::admin::metrics::Metrics;
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
    tx: mpsc::Sender<Incoming>,
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
    let reader = std::thread::Builder::new()
        .name("tidepool-ingest".into())
        .spawn(move || read_link(link_rx, tx, max_payload, metrics, shutdown, own))
        .expect("spawn ingest thread");
    Ok(Embedded {
        link_tx: pub_tx,
        reader,
    })
}

fn read_link(
    mut rx: LinkRx,
    tx: mpsc::Sender<Incoming>,
    max_payload: usize,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    own: OwnPublishes,
) {
    while !shutdown.is_set() {
        match rx.recv_deadline(Instant::now() + Duration::from_millis(100)) {
            Ok(Some(Notification::Forward(f))) => {
                let topic = match std::str::from_utf8(&f.publish.topic) {
                    Ok(t) => t,
                    Err(_) => continue,
                };
                if own.take(topic, &f.publish.payload) {
                    continue;
                }
                if let Some(ev) = mqtt_event(topic, &f.publish.payload, max_payload, &metrics) {
                    if tx.blocking_send(Incoming::plain(ev)).is_err() {
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
