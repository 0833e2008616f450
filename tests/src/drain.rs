//! Harness for drain tests and benchmarks: a subscriber that records every batch with when
//! it arrived, whether it said it was backlog, and its events' sources and simulator
//! timestamps; and the figures drawn from it (live latency percentiles, drain rate).

use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One event of a received batch.
#[derive(Debug, Clone)]
pub struct Ev {
    /// Gateway id.
    pub id: u64,
    /// The simulator's `n`.
    pub n: Option<u64>,
    /// The event's source (`mqtt:CLIENT_ID`).
    pub source: String,
    /// The simulator's send time (ms since the epoch), from the payload.
    pub sent_ms: Option<i64>,
}

/// One received batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// When it arrived.
    pub at: Instant,
    /// Wall clock when it arrived (ms since the epoch).
    pub at_ms: i64,
    /// `"backlog": true` was in it.
    pub backlog: bool,
    /// Its events.
    pub events: Vec<Ev>,
}

/// Wall clock now, ms since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A QoS 1 subscriber recording batches (JSON encoding).
pub struct BatchLog {
    /// Everything received, in arrival order.
    pub batches: Arc<Mutex<Vec<Batch>>>,
    _rt: tokio::runtime::Runtime,
    task: tokio::task::JoinHandle<()>,
}

impl BatchLog {
    /// Subscribes to `topic` on `port`; returns once the SUBACK arrived.
    pub fn start(port: u16, topic: &str) -> BatchLog {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let b = batches.clone();
        let (rt, task) = crate::listen(port, &[topic], move |_, payload| {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
                return;
            };
            let Some(evs) = v["events"].as_array() else {
                return;
            };
            let events = evs
                .iter()
                .map(|e| Ev {
                    id: e["id"].as_u64().unwrap_or(0),
                    n: e["payload"]["n"].as_u64(),
                    source: e["source"].as_str().unwrap_or("").to_string(),
                    sent_ms: e["payload"]["ts"].as_i64(),
                })
                .collect();
            b.lock().unwrap().push(Batch {
                at: Instant::now(),
                at_ms: now_ms(),
                backlog: v["backlog"] == true,
                events,
            });
        });
        BatchLog {
            batches,
            _rt: rt,
            task,
        }
    }

    /// A copy of what arrived.
    pub fn snapshot(&self) -> Vec<Batch> {
        self.batches.lock().unwrap().clone()
    }

    /// Distinct `n` of the events from `source`.
    pub fn distinct(&self, source: &str) -> std::collections::BTreeSet<u64> {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b.events.iter())
            .filter(|e| e.source == source)
            .filter_map(|e| e.n)
            .collect()
    }

    /// Waits until `pred` holds on the batches or `within` passes; whether it held.
    pub fn wait_for(&self, within: std::time::Duration, pred: impl Fn(&[Batch]) -> bool) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if pred(&self.batches.lock().unwrap()) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        pred(&self.batches.lock().unwrap())
    }
}

impl Drop for BatchLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `p`-th percentile (0–100) of `v` (sorted in place); 0 when empty.
pub fn percentile(v: &mut [i64], p: f64) -> i64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// What a drain looked like from the subscriber's side.
#[derive(Debug, Clone, Default)]
pub struct DrainFigures {
    /// Backlog events received (first copies).
    pub backlog_events: u64,
    /// Seconds from the first backlog batch to the last.
    pub backlog_secs: f64,
    /// Backlog events a second over that span.
    pub backlog_rate: f64,
    /// Live events (from `live_source`) received before the last backlog batch.
    pub live_during: u64,
    /// Latency (ms, arrival minus the simulator's send time) of live events that arrived
    /// while the backlog drained: p50, p99, max.
    pub live_p50_ms: i64,
    /// p99.
    pub live_p99_ms: i64,
    /// Max.
    pub live_max_ms: i64,
}

/// Figures of a drain: backlog is what the batches said was backlog; live events are those
/// from `live_source`.
pub fn drain_figures(batches: &[Batch], live_source: &str) -> DrainFigures {
    let mut seen = std::collections::HashSet::new();
    let backlog: Vec<&Batch> = batches.iter().filter(|b| b.backlog).collect();
    let mut f = DrainFigures::default();
    for b in &backlog {
        for e in &b.events {
            if seen.insert(e.id) {
                f.backlog_events += 1;
            }
        }
    }
    let (Some(first), Some(last)) = (backlog.first(), backlog.last()) else {
        return f;
    };
    f.backlog_secs = last.at.duration_since(first.at).as_secs_f64();
    if f.backlog_secs > 0.0 {
        f.backlog_rate = f.backlog_events as f64 / f.backlog_secs;
    }
    let mut lat = Vec::new();
    for b in batches.iter().filter(|b| b.at <= last.at && !b.backlog) {
        for e in b.events.iter().filter(|e| e.source == live_source) {
            f.live_during += 1;
            if let Some(sent) = e.sent_ms {
                lat.push(b.at_ms - sent);
            }
        }
    }
    f.live_p50_ms = percentile(&mut lat, 50.0);
    f.live_p99_ms = percentile(&mut lat, 99.0);
    f.live_max_ms = lat.iter().copied().max().unwrap_or(0);
    f
}
