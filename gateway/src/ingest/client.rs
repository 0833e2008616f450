//! Client mode: a persistent-session QoS 1 subscriber to an existing broker.
//!
//! `clean_session = false` and a stable client id make the broker keep our subscription and
//! every unacknowledged message while the gateway is away. Acks are manual: a PUBACK is sent
//! only after the commit that stored the event, so from that broker on nothing is lost, even
//! by `kill -9`. A message the broker redelivers (DUP) after we committed it but before our
//! PUBACK reached the broker is recognised by the store (`mqtt_dedup`, see
//! `store::dedup`) and not stored twice.
//!
//! An ack belongs to its connection: each token carries the connection's epoch, and a PUBACK
//! for a message of an earlier connection is never sent on a later one (the broker resends
//! those messages; the store recognises them and their new PUBACK goes out). Without this, a
//! late PUBACK could acknowledge a different, uncommitted message that reuses the packet id.
//! The PUBACKs actually written are reported to the store ([`PubackLog`]), whose redelivery
//! entries are valid only until then (MQTT 3.1.1 §4.3.2).
//!
//! Three tasks, because rumqttc deadlocks if the task polling the event loop also waits on
//! its request channel: the poller (reads, hands events to the commit loop), the acker
//! (sends PUBACKs the commit loop released), and a one-shot subscriber after each CONNACK.
//! The acker and the poller share the [`AckGate`] under a lock: the acker checks the epoch and
//! queues the PUBACK in one step; at a disconnect the poller moves to the next epoch and drains
//! the queue in one step, so no PUBACK of one connection is written on the next.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Outgoing, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{mqtt_event, stable_hash, Incoming, IngestTx, OwnPublishes};
use crate::admin::metrics::Metrics;
use crate::config::{parse_mqtt_url, MqttIngestConfig};
use crate::ingest::Dedup;
use crate::shutdown::Shutdown;
use crate::store::dedup::{MqttKey, PubackLog};

/// A PUBACK to send once the commit is done: for which packet id, on which connection, and
/// which delivery (the store's redelivery entry names it; `None`: nothing was recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    /// The broker's packet id.
    pub pkid: u16,
    /// The connection the message came on.
    pub epoch: u64,
    /// The delivery's tag in the store's redelivery table.
    pub tag: Option<u64>,
}

/// What to do with a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Its connection is the current one: send the PUBACK.
    Send,
    /// Its connection is gone: no PUBACK (the broker resends the message if it kept the
    /// session). `forget`: the session was lost, so nothing will come again: the store can drop
    /// the delivery's redelivery entry.
    Drop {
        /// (packet id, tag) whose entry can go.
        forget: Option<(u16, u64)>,
    },
}

/// Ties PUBACKs to their connection. Pure state; the acker and the poller share it.
#[derive(Debug, Default)]
pub struct AckGate {
    epoch: u64,
    lost_before: u64,
    queued: HashMap<u16, Option<u64>>,
}

impl AckGate {
    /// The current connection's epoch (new messages carry it).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether `t`'s PUBACK may be sent now.
    pub fn admit(&self, t: &AckToken) -> Admit {
        if t.epoch == self.epoch {
            return Admit::Send;
        }
        let forget = if t.epoch < self.lost_before {
            t.tag.map(|tag| (t.pkid, tag))
        } else {
            None
        };
        Admit::Drop { forget }
    }

    /// `t`'s PUBACK was handed to the client.
    pub fn queued(&mut self, t: &AckToken) {
        self.queued.insert(t.pkid, t.tag);
    }

    /// The client wrote the PUBACK for `pkid`: the tag to report, if one was queued on this
    /// connection.
    pub fn written(&mut self, pkid: u16) -> Option<u64> {
        self.queued.remove(&pkid).flatten()
    }

    /// The connection is gone: later tokens of it are dropped; what was queued is not written.
    pub fn disconnected(&mut self) {
        self.epoch += 1;
        self.queued.clear();
    }

    /// A CONNACK; true when the broker kept no session (every redelivery entry can go).
    pub fn connected(&mut self, session_present: bool) -> bool {
        if !session_present {
            self.lost_before = self.epoch;
        }
        !session_present
    }
}

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
    opts.set_keep_alive(cfg.keep_alive.0.max(Duration::from_secs(1)));
    // Larger than max_payload so oversize messages are read, counted and acknowledged instead of
    // breaking the connection over and over.
    let incoming = ((cfg.max_payload.0 as usize) * 4).max(16 << 20);
    opts.set_max_packet_size(incoming, 64 * 1024);
    opts.set_inflight(1000);
    if !cfg.username.is_empty() {
        opts.set_credentials(&cfg.username, &cfg.password);
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<(AckToken, QoS)>();
    let gate = Arc::new(Mutex::new(AckGate::default()));
    let log = Arc::new(PubackLog::default());
    let acker_client = client.clone();
    let (acker_gate, acker_log) = (gate.clone(), log.clone());
    let acker = tokio::spawn(async move {
        while let Some((t, qos)) = ack_rx.recv().await {
            let p = Publish {
                dup: false,
                qos,
                retain: false,
                topic: String::new(),
                pkid: t.pkid,
                payload: Bytes::new(),
            };
            // The request channel may be full for a moment; after a few seconds of that the
            // PUBACK is given up (the broker resends, the store recognises it).
            for _ in 0..2_500 {
                let sent = {
                    let mut g = acker_gate.lock().unwrap();
                    match g.admit(&t) {
                        Admit::Send => {
                            let ok = acker_client.try_ack(&p).is_ok();
                            if ok {
                                g.queued(&t);
                            }
                            ok
                        }
                        Admit::Drop { forget } => {
                            if let Some((pkid, tag)) = forget {
                                acker_log.written(pkid, tag);
                            }
                            true
                        }
                    }
                };
                if sent {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let topics = cfg.topics.clone();
    let max_payload = cfg.max_payload.0 as usize;
    let broker = cfg.broker.clone();
    let publisher = client.clone();
    // Delivery tags: the connection's random nonce in the high 32 bits, a count below.
    let mut conn_nonce: u32 = fastrand::u32(..);
    let mut counter: u32 = 0;
    let mut resends_done = false;
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
                    if gate.lock().unwrap().connected(c.session_present) {
                        log.session_lost();
                    }
                    conn_nonce = conn_nonce.wrapping_add(fastrand::u32(1..));
                    counter = 0;
                    resends_done = false;
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
                Ok(MqttEvent::Outgoing(Outgoing::PubAck(pkid))) => {
                    if let Some(tag) = gate.lock().unwrap().written(pkid) {
                        log.written(pkid, tag);
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let Some(sender) = tx.as_ref() else { continue };
                    let reliable = p.qos != QoS::AtMostOnce;
                    counter = counter.wrapping_add(1);
                    let next_tag = (u64::from(conn_nonce) << 32) | u64::from(counter);
                    let token = AckToken {
                        pkid: p.pkid,
                        epoch: gate.lock().unwrap().epoch(),
                        tag: reliable.then_some(next_tag),
                    };
                    let ack = ack_tx.clone().expect("ack sender lives while tx does");
                    let qos = p.qos;
                    // What is not stored (ours, or oversize and counted) is acknowledged at
                    // once, so the broker does not resend it forever; nothing was recorded.
                    let ack_now = |ack: mpsc::UnboundedSender<(AckToken, QoS)>| {
                        if reliable {
                            let _ = ack.send((AckToken { tag: None, ..token }, qos));
                        }
                    };
                    if own.take(&p.topic, &p.payload) {
                        ack_now(ack);
                        continue;
                    }
                    let Some(ev) = mqtt_event(&p.topic, &p.payload, max_payload, &metrics) else {
                        ack_now(ack);
                        continue;
                    };
                    let first_new = !p.dup && reliable && !resends_done;
                    resends_done |= first_new;
                    let dedup = reliable.then(|| {
                        Dedup::Mqtt(MqttKey {
                            pkid: p.pkid,
                            hash: stable_hash(&[p.topic.as_bytes(), &p.payload]),
                            dup: p.dup,
                            tag: next_tag,
                            first_new,
                            log: log.clone(),
                        })
                    });
                    let incoming = Incoming {
                        event: ev,
                        ack: Some(Box::new(move |_| {
                            if reliable {
                                let _ = ack.send((token, qos));
                            }
                        })),
                        dedup,
                        bad: None,
                    };
                    if sender.send(incoming).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    {
                        // This connection is over: none of its PUBACKs may go out on the next.
                        // rumqttc dropped the PUBACKs it had queued; drain what the acker added
                        // since, under the lock, so none slips through.
                        let mut g = gate.lock().unwrap();
                        g.disconnected();
                        eventloop.clean();
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn token(pkid: u16, epoch: u64, tag: u64) -> AckToken {
        AckToken {
            pkid,
            epoch,
            tag: Some(tag),
        }
    }

    #[test]
    fn an_ack_is_sent_only_on_its_own_connection() {
        let mut g = AckGate::default();
        assert!(g.connected(false), "a first session: nothing to resend");
        let old = token(5, g.epoch(), 1);
        assert_eq!(g.admit(&old), Admit::Send);
        g.disconnected();
        assert!(!g.connected(true));
        // Committed during the reconnect: not sent on the new connection, whose packet id 5
        // may be another message; the broker resends the old one.
        assert_eq!(g.admit(&old), Admit::Drop { forget: None });
        assert_eq!(g.admit(&token(5, g.epoch(), 2)), Admit::Send);
    }

    #[test]
    fn only_written_pubacks_of_this_connection_are_reported() {
        let mut g = AckGate::default();
        let t = token(5, 0, 1);
        g.queued(&t);
        assert_eq!(g.written(5), Some(1));
        assert_eq!(g.written(5), None, "reported once");
        g.queued(&token(6, 0, 2));
        g.queued(&AckToken {
            tag: None,
            ..token(7, 0, 0)
        });
        assert_eq!(g.written(7), None, "nothing recorded, nothing to report");
        g.disconnected();
        // rumqttc drops queued PUBACKs at a disconnect: a late event must not report them.
        assert_eq!(g.written(6), None);
    }

    #[test]
    fn after_a_lost_session_dropped_acks_free_their_entries() {
        let mut g = AckGate::default();
        g.connected(true);
        let old = token(5, g.epoch(), 9);
        g.disconnected();
        assert!(g.connected(false), "the broker lost our session");
        // Nothing will be resent: the entry of that delivery can go.
        assert_eq!(
            g.admit(&old),
            Admit::Drop {
                forget: Some((5, 9))
            }
        );
        assert_eq!(g.admit(&token(5, g.epoch(), 10)), Admit::Send);
    }
}
