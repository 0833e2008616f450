//! Client mode: a persistent-session QoS 1 subscriber to an existing broker.
//!
//! `clean_session = false` and a stable client id make the broker keep our subscription and
//! every unacknowledged message while the gateway is away. Acks are manual: a PUBACK is sent
//! only after the commit that stored the event, so from that broker on nothing is lost, even
//! by `kill -9`. A message the broker redelivers (DUP) after we committed it but before our
//! PUBACK reached the broker is recognised by the store (`ingest_dedup`) and not stored twice.
//!
//! Three tasks, because rumqttc deadlocks if the task polling the event loop also waits on
//! its request channel: the poller (reads, hands events to the commit loop), the acker
//! (sends PUBACKs the commit loop released), and a one-shot subscriber after each CONNACK.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{mqtt_event, stable_hash, Incoming, IngestTx, OwnPublishes};
use crate::admin::metrics::Metrics;
use crate::config::{parse_mqtt_url, MqttIngestConfig};
use crate::shutdown::Shutdown;
use crate::store::commit::Dedup;

/// Starts the client; the returned task ends after shutdown, once acks are flushed.
pub fn start(
    cfg: &MqttIngestConfig,
    tx: IngestTx,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
    own: OwnPublishes,
) -> Result<(tokio::task::JoinHandle<()>, AsyncClient), String> {
    let url = parse_mqtt_url(&cfg.broker).map_err(|e| format!("key `ingest.mqtt.broker`: {e}"))?;
    if url.tls {
        return Err("key `ingest.mqtt.broker`: mqtts:// is not supported for ingest yet; use mqtt:// on a local broker".into());
    }
    let mut opts = MqttOptions::new(&cfg.client_id, &url.host, url.port);
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    opts.set_keep_alive(Duration::from_secs(30));
    // Larger than max_payload so oversize messages are read, counted and acknowledged instead of
    // breaking the connection over and over.
    let incoming = ((cfg.max_payload.0 as usize) * 4).max(16 << 20);
    opts.set_max_packet_size(incoming, 64 * 1024);
    opts.set_inflight(1000);
    if !cfg.username.is_empty() {
        opts.set_credentials(&cfg.username, &cfg.password);
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Publish>();
    let acker_client = client.clone();
    let acker = tokio::spawn(async move {
        while let Some(p) = ack_rx.recv().await {
            if acker_client.ack(&p).await.is_err() {
                return;
            }
        }
    });
    let topics = cfg.topics.clone();
    let max_payload = cfg.max_payload.0 as usize;
    let broker = cfg.broker.clone();
    let publisher = client.clone();
    let task = tokio::spawn(async move {
        let mut tx = Some(tx);
        let mut ack_tx = Some(ack_tx);
        let mut last_error = String::new();
        let mut failures: u32 = 0;
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        loop {
            let polled = tokio::select! {
                p = eventloop.poll() => p,
                _ = shutdown.wait(), if drain_deadline.is_none() => {
                    // Stop taking messages; keep polling a little so released acks get out.
                    tx = None;
                    ack_tx = None;
                    drain_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(3));
                    continue;
                }
                _ = tokio::time::sleep_until(drain_deadline.unwrap_or_else(tokio::time::Instant::now)), if drain_deadline.is_some() => {
                    break;
                }
                _ = async {
                    // The acker has sent every ack once the store dropped all ack senders.
                    while !acker.is_finished() { tokio::time::sleep(Duration::from_millis(20)).await }
                }, if drain_deadline.is_some() => {
                    // Give the event loop a moment to write them.
                    let _ = tokio::time::timeout(Duration::from_millis(200), async { loop { if eventloop.poll().await.is_err() { break } } }).await;
                    break;
                }
            };
            match polled {
                Ok(MqttEvent::Incoming(Packet::ConnAck(c))) => {
                    failures = 0;
                    if !last_error.is_empty() {
                        info!(broker = %broker, "ingest broker connected again");
                        last_error.clear();
                    } else {
                        info!(broker = %broker, session_present = c.session_present, "ingest broker connected");
                    }
                    let sub = client.clone();
                    let topics = topics.clone();
                    tokio::spawn(async move {
                        for t in topics {
                            if let Err(e) = sub.subscribe(t.clone(), QoS::AtLeastOnce).await {
                                warn!(topic = %t, error = %e, "subscribe failed");
                            }
                        }
                    });
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let Some(sender) = tx.as_ref() else { continue };
                    let token = Publish {
                        dup: false,
                        qos: p.qos,
                        retain: false,
                        topic: String::new(),
                        pkid: p.pkid,
                        payload: Bytes::new(),
                    };
                    let ack = ack_tx.clone().expect("ack sender lives while tx does");
                    let ack_fn: crate::store::commit::AckFn = Box::new(move || {
                        let _ = ack.send(token);
                    });
                    let dedup = (p.qos != QoS::AtMostOnce).then(|| Dedup {
                        pkid: p.pkid,
                        hash: stable_hash(&[p.topic.as_bytes(), &p.payload]),
                        dup: p.dup,
                    });
                    if own.take(&p.topic, &p.payload) {
                        ack_fn();
                        continue;
                    }
                    let incoming = match mqtt_event(&p.topic, &p.payload, max_payload, &metrics) {
                        Some(ev) => Incoming {
                            event: ev,
                            ack: Some(ack_fn),
                            dedup,
                            bad: None,
                        },
                        None => {
                            // Oversize: counted; acknowledge so the broker does not resend it forever.
                            ack_fn();
                            continue;
                        }
                    };
                    if sender.send(incoming).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if drain_deadline.is_some() {
                        break;
                    }
                    failures = failures.saturating_add(1);
                    let msg = e.to_string();
                    if msg != last_error {
                        warn!(broker = %broker, error = %msg, "ingest broker unavailable; retrying");
                        last_error = msg;
                    }
                    let backoff = Duration::from_millis((200u64 << failures.min(5)).min(5000));
                    tokio::time::sleep(backoff).await;
                }
            }
        }
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
    });
    Ok((task, publisher))
}
