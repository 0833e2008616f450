//! Harness for the ingest redelivery tests: a QoS 1 publisher of identical payloads, and
//! counting what arrived upstream per topic and per serial frame.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::Got;

/// Publishes `per_topic` messages to each of `topics`, round robin from one connection (so the
/// broker hands them on in that order), all with the same `payload`, at QoS 1, at most `rate`
/// a second and message `i` only once `i < allowed` (the caller keeps the broker's backlog for
/// its subscriber well under the 65,535 packet ids MQTT has: past that a broker reuses an id
/// still in flight, and no receiver can tell the two messages apart). Runs on a thread of
/// its own; the handle returns how many the broker acknowledged.
pub fn publish_identical(
    port: u16,
    topics: &[&str],
    per_topic: u64,
    payload: &'static [u8],
    rate: f64,
    allowed: Arc<AtomicU64>,
) -> std::thread::JoinHandle<u64> {
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut opts =
                MqttOptions::new(format!("test-pub-{}", fastrand::u32(..)), "127.0.0.1", port);
            opts.set_keep_alive(Duration::from_secs(30));
            opts.set_inflight(500);
            let (client, mut el) = AsyncClient::new(opts, 1000);
            let total = per_topic * topics.len() as u64;
            let publisher = tokio::spawn(async move {
                let mut i: u64 = 0;
                let start = tokio::time::Instant::now();
                for _ in 0..per_topic {
                    for t in &topics {
                        while i >= allowed.load(Relaxed) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        if i.is_multiple_of(100) {
                            let due = start + Duration::from_secs_f64(i as f64 / rate);
                            tokio::time::sleep_until(due).await;
                        }
                        i += 1;
                        if client
                            .publish(t.as_str(), QoS::AtLeastOnce, false, payload)
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                // Keep the client (and so the connection) until the acks are in.
                std::future::pending::<()>().await;
            });
            let mut acked = 0;
            let until = tokio::time::Instant::now() + Duration::from_secs(120);
            while acked < total && tokio::time::Instant::now() < until {
                match tokio::time::timeout(Duration::from_secs(5), el.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(_) => {}
                }
            }
            publisher.abort();
            acked
        })
    })
}

/// Distinct event ids received upstream, by the event's topic.
pub fn ids_by_topic(got: &[Got]) -> BTreeMap<String, BTreeSet<u64>> {
    let mut m: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for g in got {
        let topic = g.event["topic"].as_str().unwrap_or("").to_string();
        m.entry(topic).or_default().insert(g.id);
    }
    m
}

/// Distinct event ids received upstream, by the simulator's `n` (a serial frame's seq).
pub fn ids_by_n(got: &[Got]) -> BTreeMap<u64, BTreeSet<u64>> {
    let mut m: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for g in got {
        if let Some(n) = g.n {
            m.entry(n).or_default().insert(g.id);
        }
    }
    m
}

/// Keeps `allowed` at the number of events `got` holds plus `ahead`, every 20 ms, until the
/// subscriber that fills `got` is gone.
pub fn pace(got: Arc<Mutex<Vec<Got>>>, allowed: Arc<AtomicU64>, ahead: u64) {
    std::thread::spawn(move || loop {
        let n = got.lock().unwrap().len() as u64;
        allowed.store(n + ahead, Relaxed);
        if Arc::strong_count(&got) == 1 {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    });
}
