//! `tidepool-sim`: simulated sensors publishing numbered JSON events over MQTT.
//!
//! Every event carries `n` (its number in the run, 0-based) and `seq` (per sensor), so a test
//! can count loss and duplicates exactly. Same `seed`, same events.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

mod exact;
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
    /// QoS 1 publishes in flight without a PUBACK.
    pub inflight: u16,
    /// Where the `n` of each acknowledged event is appended, one a line.
    pub acked_log: Option<std::path::PathBuf>,
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
            inflight: 1000,
            acked_log: None,
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
    /// Sensor-side acknowledgement latency of each QoS 1 publish (from its first send to its
    /// PUBACK), in microseconds.
    pub ack_latency_us: std::sync::Mutex<Vec<u32>>,
}

impl SimStats {
    /// The `p` quantile (0..=1) of the acknowledgement latency, in milliseconds.
    pub fn ack_latency_ms(&self, p: f64) -> f64 {
        let mut v = self.ack_latency_us.lock().unwrap().clone();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_unstable();
        f64::from(v[((v.len() - 1) as f64 * p).round() as usize]) / 1000.0
    }
}

/// What a simulated sensor measures; sensor `i` is kind `i % 4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A temperature that wanders (random walk), in °C.
    Temperature,
    /// Relative humidity that wanders, in %.
    Humidity,
    /// A door that now and then opens or closes.
    Door,
    /// A counter that rises (a flow meter, a people counter).
    Counter,
}

impl Kind {
    /// The kind of sensor `i`.
    pub fn of(sensor: u32) -> Kind {
        match sensor % 4 {
            0 => Kind::Temperature,
            1 => Kind::Humidity,
            2 => Kind::Door,
            _ => Kind::Counter,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Temperature => "temperature",
            Kind::Humidity => "humidity",
            Kind::Door => "door",
            Kind::Counter => "counter",
        }
    }
}

/// Generates the events of a run: the same seed, the same events.
#[derive(Debug)]
pub struct Generator {
    rng: fastrand::Rng,
    sensors: u32,
    pad_to: usize,
    value: Vec<f64>,
    open: Vec<bool>,
    count: Vec<u64>,
    seq: Vec<u64>,
}

impl Generator {
    /// For `sensors` sensors, payloads padded to about `pad_to` bytes (0: no padding).
    pub fn new(seed: u64, sensors: u32, pad_to: usize) -> Generator {
        let sensors = sensors.max(1);
        let mut rng = fastrand::Rng::with_seed(seed);
        let value = (0..sensors)
            .map(|i| match Kind::of(i) {
                Kind::Temperature => 18.0 + 6.0 * rng.f64(),
                Kind::Humidity => 35.0 + 20.0 * rng.f64(),
                _ => 0.0,
            })
            .collect();
        Generator {
            rng,
            sensors,
            pad_to,
            value,
            open: vec![false; sensors as usize],
            count: vec![0; sensors as usize],
            seq: vec![0; sensors as usize],
        }
    }

    /// Event `n` of the run (sent at `ts`): (sensor, topic, JSON object).
    pub fn next(&mut self, n: u64, ts: i64) -> (u32, String, serde_json::Value) {
        let sensor = (n % u64::from(self.sensors)) as u32;
        let i = sensor as usize;
        let seq = self.seq[i];
        self.seq[i] += 1;
        let kind = Kind::of(sensor);
        let mut v =
            serde_json::json!({"sensor": format!("sensor-{sensor}"), "n": n, "seq": seq, "ts": ts});
        match kind {
            Kind::Temperature => {
                self.value[i] = (self.value[i] + (self.rng.f64() - 0.5) * 0.2).clamp(-20.0, 60.0);
                v["celsius"] = ((self.value[i] * 100.0).round() / 100.0).into();
            }
            Kind::Humidity => {
                self.value[i] = (self.value[i] + (self.rng.f64() - 0.5) * 0.5).clamp(5.0, 100.0);
                v["rh"] = ((self.value[i] * 10.0).round() / 10.0).into();
            }
            Kind::Door => {
                if self.rng.f64() < 0.05 {
                    self.open[i] = !self.open[i];
                }
                v["open"] = self.open[i].into();
            }
            Kind::Counter => {
                self.count[i] += self.rng.u64(0..4);
                v["count"] = self.count[i].into();
            }
        }
        if self.pad_to > 0 {
            let len = v.to_string().len();
            if self.pad_to > len + 10 {
                v["pad"] = "x".repeat(self.pad_to - len - 9).into();
            }
        }
        (sensor, format!("sensors/{sensor}/{}", kind.name()), v)
    }
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
    if let Some(log) = cfg.acked_log.clone() {
        return exact::run(cfg, stats, stop, &log).await;
    }
    let mut opts = MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_inflight(cfg.inflight.max(1));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let st = stats.clone();
    let poller = tokio::spawn(async move {
        let mut sent_at: std::collections::HashMap<u16, Instant> = std::collections::HashMap::new();
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    st.acked.fetch_add(1, Relaxed);
                    if let Some(t) = sent_at.remove(&a.pkid) {
                        let us = t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                        st.ack_latency_us.lock().unwrap().push(us);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if pkid != 0 {
                        sent_at.entry(pkid).or_insert_with(Instant::now);
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    st.reconnects.fetch_add(1, Relaxed);
                    sent_at.clear();
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
    let mut generator = Generator::new(cfg.seed, cfg.sensors, cfg.payload_size);
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
        let (_, topic, body) = generator.next(n, now_ms());
        tokio::select! {
            r = client.publish(topic, qos, false, body.to_string()) => r?,
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
    fn the_same_seed_gives_the_same_events_of_every_kind() {
        let run = |seed| {
            let mut g = Generator::new(seed, 8, 200);
            (0..400).map(|n| g.next(n, 1000)).collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        assert_ne!(a, run(8));
        for (sensor, topic, v) in &a[..8] {
            assert_eq!(v["sensor"], format!("sensor-{sensor}"));
            assert!(topic.starts_with(&format!("sensors/{sensor}/")));
            let len = v.to_string().len() as i64;
            assert!((len - 200).abs() <= 3, "{len}");
        }
        assert!(a[0].2["celsius"].is_f64() && a[1].2["rh"].is_f64());
        assert!(a[2].2["open"].is_boolean() && a[3].2["count"].is_u64());
        assert!(
            a.iter().filter(|e| e.0 == 2).any(|e| e.2["open"] == true),
            "doors open now and then"
        );
        let seqs: Vec<u64> = a
            .iter()
            .filter(|e| e.0 == 5)
            .map(|e| e.2["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, (0..50).collect::<Vec<_>>());
    }
}
