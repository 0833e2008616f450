//! `tidepool-sim`: simulated sensors publishing numbered JSON events over MQTT.
//!
//! Every event carries `n` (its number in the run, 0-based) and `seq` (per sensor), so a test
//! can count loss and duplicates exactly. Same `seed`, same events.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

pub mod serial;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Number of sensors (topics `sensors/{i}/temperature`).
    pub sensors: u32,
    /// Events per second over all sensors; 0 = as fast as the broker takes them.
    pub rate: f64,
    /// Events to send in all; `None` = until stopped.
    pub count: Option<u64>,
    /// Seed of the random signals.
    pub seed: u64,
    /// Pad each payload to about this many bytes (0: no padding).
    pub payload_size: usize,
    /// MQTT client id.
    pub client_id: String,
    /// QoS 1 (default) or 0.
    pub qos1: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            host: "127.0.0.1".into(),
            port: 1883,
            sensors: 10,
            rate: 100.0,
            count: None,
            seed: 1,
            payload_size: 0,
            client_id: "tidepool-sim".into(),
            qos1: true,
        }
    }
}

/// Live counters of a run.
#[derive(Debug, Default)]
pub struct SimStats {
    /// Events handed to the MQTT client.
    pub sent: AtomicU64,
    /// Events the broker acknowledged (QoS 1 PUBACK).
    pub acked: AtomicU64,
    /// Connection failures (or serial write failures).
    pub reconnects: AtomicU64,
    /// Frames sent again for want of an ack (reliable serial).
    pub resent: AtomicU64,
}

/// The payload of event `n` of sensor `sensor` (its `seq`-th), deterministic in `seed`.
pub fn payload(seed: u64, n: u64, sensor: u32, seq: u64, ts: i64, pad_to: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(
        seed ^ (u64::from(sensor) << 32) ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let celsius = 18.0 + 8.0 * rng.f64() + (seq % 100) as f64 * 0.01;
    let mut s = format!(
        "{{\"sensor\":\"sensor-{sensor}\",\"n\":{n},\"seq\":{seq},\"ts\":{ts},\"celsius\":{celsius:.2}"
    );
    if pad_to > s.len() + 10 {
        s.push_str(",\"pad\":\"");
        let k = pad_to - s.len() - 2;
        s.extend(std::iter::repeat_n('x', k));
        s.push('"');
    }
    s.push('}');
    s
}

/// The payload of event `n` as a JSON value (see [`payload`]).
pub fn payload_value(seed: u64, n: u64, sensor: u32, seq: u64, ts: i64) -> serde_json::Value {
    serde_json::from_str(&payload(seed, n, sensor, seq, ts, 0)).expect("payload is JSON")
}

/// The topic of a sensor.
pub fn topic(sensor: u32) -> String {
    format!("sensors/{sensor}/temperature")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs the simulation until `count` events are sent and acknowledged (or `stop` resolves).
pub async fn run(
    cfg: SimConfig,
    stats: Arc<SimStats>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut opts = MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_inflight(200);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let st = stats.clone();
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    st.acked.fetch_add(1, Relaxed);
                }
                Ok(Event::Outgoing(Outgoing::Publish(_))) => {}
                Ok(_) => {}
                Err(_) => {
                    st.reconnects.fetch_add(1, Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    let qos = if cfg.qos1 {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    };
    let started = Instant::now();
    let sensors = cfg.sensors.max(1);
    let mut seqs = vec![0u64; sensors as usize];
    tokio::pin!(stop);
    let mut n: u64 = 0;
    loop {
        if cfg.count.is_some_and(|c| n >= c) {
            break;
        }
        if cfg.rate > 0.0 {
            let due = started + Duration::from_secs_f64(n as f64 / cfg.rate);
            let now = Instant::now();
            if due > now {
                tokio::select! {
                    _ = tokio::time::sleep(due - now) => {}
                    _ = &mut stop => break,
                }
            }
        }
        let sensor = (n % u64::from(sensors)) as u32;
        let seq = seqs[sensor as usize];
        seqs[sensor as usize] += 1;
        let body = payload(cfg.seed, n, sensor, seq, now_ms(), cfg.payload_size);
        tokio::select! {
            r = client.publish(topic(sensor), qos, false, body) => r?,
            _ = &mut stop => break,
        }
        stats.sent.fetch_add(1, Relaxed);
        n += 1;
    }
    // Wait for the broker to acknowledge what was sent.
    if cfg.qos1 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while stats.acked.load(Relaxed) < stats.sent.load(Relaxed) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    } else {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    poller.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_deterministic_json_of_the_asked_size() {
        let a = payload(7, 3, 1, 0, 1000, 200);
        assert_eq!(a, payload(7, 3, 1, 0, 1000, 200));
        assert_ne!(a, payload(8, 3, 1, 0, 1000, 200));
        let v: serde_json::Value = serde_json::from_str(&a).unwrap();
        assert_eq!(v["n"], 3);
        assert_eq!(v["sensor"], "sensor-1");
        assert!((a.len() as i64 - 200).abs() <= 2, "{}", a.len());
    }
}
