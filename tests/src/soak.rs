//! The soak run behind `scripts/soak` (`tidepool-bench soak DURATION`): the whole pipeline for
//! a long while, with the upstream link faulted every few minutes, and the gateway's footprint
//! printed a row a minute. Not a test: it asserts nothing, it reports.
//!
//! Pipeline: `tidepool-sim` (20 sensors, `SOAK_RATE` events/s, default 1,000) → the embedded
//! broker → three example rules (drop-malformed, threshold alert with state and a local
//! publish, units enrichment; every simulated event passes them) → the store → the
//! forwarder → the fault proxy → Mosquitto, where a subscriber records every `n` it sees.
//! Faults: one episode every `SOAK_FAULT_EVERY` (default 3m; a third of the run when that is
//! shorter), 20–40 s long: flap, blackhole, flap, cut, flap, throttle, and again; lengths
//! seeded by `SOAK_SEED` (printed). The drain after the run is fault-free.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fault_proxy::{Fault, FaultProxy, Schedule};
use crate::*;

/// Which simulator `n` arrived upstream, and how many came again.
struct Arrivals {
    seen: Mutex<Vec<u64>>,
    distinct: AtomicU64,
    dups: AtomicU64,
}

impl Arrivals {
    fn record(&self, payload: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return;
        };
        let Some(events) = v["events"].as_array() else {
            return;
        };
        let mut seen = self.seen.lock().unwrap();
        for n in events.iter().filter_map(|e| e["payload"]["n"].as_u64()) {
            let (word, bit) = ((n / 64) as usize, n % 64);
            if seen.len() <= word {
                seen.resize(word + 1, 0);
            }
            if seen[word] & (1 << bit) == 0 {
                seen[word] |= 1 << bit;
                self.distinct.fetch_add(1, Relaxed);
            } else {
                self.dups.fetch_add(1, Relaxed);
            }
        }
    }

    /// How many of `0..count` are missing.
    fn missing(&self, count: u64) -> u64 {
        let seen = self.seen.lock().unwrap();
        (0..count)
            .filter(|n| {
                seen.get((n / 64) as usize)
                    .is_none_or(|w| w & (1 << (n % 64)) == 0)
            })
            .count() as u64
    }
}

/// One minute's row.
struct Row {
    minute: u64,
    rss_kib: u64,
    fds: u64,
    store: u64,
    backlog: i64,
    written: u64,
    delivered: u64,
    faults: String,
}

fn mib(b: u64) -> f64 {
    b as f64 / 1_048_576.0
}

/// The fault schedule: pass for `first`, then an episode every `every` while a whole one
/// fits in `total`, then pass to the end (the drain after the run is fault-free).
fn schedule(seed: u64, total: Duration, first: Duration, every: Duration) -> Schedule {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut steps = vec![(Fault::Pass, first)];
    let mut at = first;
    let mut i = 0u32;
    while at + every <= total {
        let (fault, len) = match i % 6 {
            1 => (Fault::Blackhole, rng.u64(20..=40)),
            3 => (Fault::Cut, rng.u64(15..=30)),
            5 => (Fault::Throttle(rng.u64(4_000..=16_000)), rng.u64(15..=30)),
            _ => (Fault::Flap, rng.u64(20..=40)),
        };
        let len = Duration::from_secs(len).min(every / 2);
        steps.push((fault, len));
        steps.push((Fault::Pass, every - len));
        at += every;
        i += 1;
    }
    steps.push((Fault::Pass, total.saturating_sub(at)));
    Schedule { seed, steps }
}

/// Runs the soak for `duration`, a fault episode every `every` (at most a third of the
/// run), and prints its table and summary.
pub fn run(duration: Duration, every: Duration) {
    let rate: f64 = std::env::var("SOAK_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000.0);
    let every = every.min(duration / 3).max(Duration::from_secs(20));
    let seed = Schedule::seed_from_env("SOAK_SEED");
    let count = (rate * duration.as_secs_f64()) as u64;
    // Warm-up: the first two minutes (a quarter of a shorter run).
    let warm = Duration::from_secs(120).min(duration / 4);

    let up = Mosquitto::start("");
    let arrivals = Arc::new(Arrivals {
        seen: Mutex::new(Vec::new()),
        distinct: AtomicU64::new(0),
        dups: AtomicU64::new(0),
    });
    let a = arrivals.clone();
    let _listener = listen(up.port, &["tidepool/+/events"], move |_, p| a.record(p));
    let mut proxy = FaultProxy::start(up.port);
    let rules = tempfile::tempdir().unwrap();
    let rule_set = ["05-drop-malformed", "10-threshold-alert", "20-units-enrich"];
    for r in rule_set {
        std::fs::copy(
            root().join(format!("rules/examples/{r}.rhai")),
            rules.path().join(format!("{r}.rhai")),
        )
        .unwrap();
    }
    let gw = Gateway::start(&format!(
        "[rules]\ndir = \"{}\"\n[upstream]\nurl = \"mqtt://127.0.0.1:{}\"\nkeep_alive = \"5s\"\npuback_timeout = \"5s\"\nreconnect_min = \"500ms\"\nreconnect_max = \"5s\"\n",
        rules.path().display(),
        proxy.port
    ));
    let pid = gw.proc.pid();
    let store_file = gw.dir.join("data").join("tidepool.redb");
    let store_size = || std::fs::metadata(&store_file).map_or(0, |m| m.len());
    if !gw.wait_metric("tidepool_upstream_connected", 1.0, Duration::from_secs(20)) {
        eprintln!(
            "soak: the gateway did not connect upstream; log:\n{}",
            gw.log()
        );
        return;
    }
    let plan = schedule(seed, duration, every.min(duration / 3) * 2 / 3, every);
    println!(
        "soak      {rate:.0} events/s for {}s ({count} events), rules {rule_set:?}, a fault every {}s \
         (flap, blackhole, flap, cut, flap, throttle, ...), seed {seed}",
        duration.as_secs(),
        every.as_secs()
    );
    println!(
        "{:>6} {:>8} {:>5} {:>10} {:>8} {:>12} {:>10}  faults in the minute",
        "minute", "RSS MiB", "fds", "store MiB", "backlog", "written MiB", "delivered"
    );
    let started = Instant::now();
    let mut sim = spawn_sim(
        gw.mqtt_port,
        count,
        rate,
        &["--sensors", "20", "--seed", &seed.to_string()],
    );
    proxy.run(&plan);
    let w0 = procfs::write_bytes(pid);
    let mut rows: Vec<Row> = Vec::new();
    let (mut fds, mut stores) = (Vec::new(), Vec::new());
    let mut minute = 0;
    let mut minute_faults = std::collections::BTreeSet::new();
    let mut last_written = w0;
    let sample_every = Duration::from_secs(5);
    let end = started + duration;
    let drain_deadline = end + Duration::from_secs(300);
    loop {
        std::thread::sleep(sample_every);
        let now = Instant::now();
        fds.push(procfs::open_fds(pid));
        stores.push(store_size());
        minute_faults.insert(proxy.fault().name());
        let done = now >= end && arrivals.distinct.load(Relaxed) >= count;
        let next_minute = started + Duration::from_secs(60 * (minute + 1));
        if now >= next_minute || done || now >= drain_deadline {
            minute += 1;
            let written = procfs::write_bytes(pid);
            let row = Row {
                minute,
                rss_kib: procfs::status_kib(pid, "VmRSS:"),
                fds: *fds.last().unwrap(),
                store: *stores.last().unwrap(),
                backlog: gw.metric("tidepool_backlog_events").unwrap_or(-1.0) as i64,
                written: written - last_written,
                delivered: arrivals.distinct.load(Relaxed),
                faults: minute_faults.iter().copied().collect::<Vec<_>>().join(", "),
            };
            last_written = written;
            minute_faults.clear();
            minute_faults.insert(proxy.fault().name());
            println!(
                "{:>6} {:>8.1} {:>5} {:>10.1} {:>8} {:>12.1} {:>10}  {}",
                row.minute,
                row.rss_kib as f64 / 1024.0,
                row.fds,
                mib(row.store),
                row.backlog,
                mib(row.written),
                row.delivered,
                row.faults
            );
            rows.push(row);
        }
        if done || now >= drain_deadline {
            break;
        }
    }
    let sim_ok = sim
        .child
        .take()
        .map(|c| c.wait_with_output().is_ok_and(|o| o.status.success()))
        .unwrap_or(false);
    let missing = arrivals.missing(count);
    let after_warm: Vec<&Row> = rows
        .iter()
        .filter(|r| Duration::from_secs(60 * r.minute) > warm)
        .collect();
    let warm_rss = rows
        .iter()
        .filter(|r| Duration::from_secs(60 * r.minute) <= warm.max(Duration::from_secs(60)))
        .map(|r| r.rss_kib)
        .next_back()
        .unwrap_or(0);
    let peak = after_warm
        .iter()
        .map(|r| r.rss_kib)
        .max()
        .unwrap_or(warm_rss);
    let last = rows.last().map_or(0, |r| r.rss_kib);
    let pct = |x: u64| 100.0 * (x as f64 - warm_rss as f64) / warm_rss.max(1) as f64;
    println!(
        "rss       after warm-up (minute {}): {:.1} MiB; peak after it {:.1} MiB ({:+.1}%), at the end {:.1} MiB ({:+.1}%)",
        warm.as_secs().div_ceil(60).max(1),
        warm_rss as f64 / 1024.0,
        peak as f64 / 1024.0,
        pct(peak),
        last as f64 / 1024.0,
        pct(last)
    );
    println!(
        "fds       min {} max {} (sampled every {}s)",
        fds.iter().min().unwrap_or(&0),
        fds.iter().max().unwrap_or(&0),
        sample_every.as_secs()
    );
    println!(
        "store     file size min {:.1} MiB max {:.1} MiB, at the end {:.1} MiB",
        mib(*stores.iter().min().unwrap_or(&0)),
        mib(*stores.iter().max().unwrap_or(&0)),
        mib(store_size())
    );
    println!(
        "written   {:.1} MiB in {:.0} s ({:.0} B per event)",
        mib(procfs::write_bytes(pid) - w0),
        started.elapsed().as_secs_f64(),
        (procfs::write_bytes(pid) - w0) as f64 / count.max(1) as f64
    );
    println!(
        "delivery  {}: {} of {count} distinct events arrived, {} duplicates, {} PUBACK timeouts, {} connections through the proxy{}",
        if missing == 0 { "every event arrived" } else { "EVENTS MISSING" },
        arrivals.distinct.load(Relaxed),
        arrivals.dups.load(Relaxed),
        gw.metric("tidepool_upstream_puback_timeouts_total").unwrap_or(0.0),
        proxy.accepted(),
        if sim_ok { "" } else { "; the simulator failed" }
    );
}
