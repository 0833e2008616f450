//! End-to-end load benchmark: simulator → embedded broker → gateway → Mosquitto upstream.
//!
//! Prints events/s, ingest-to-upstream latency percentiles, backlog drain rate, RSS and
//! events per fsync, plus the ceiling (simulator → embedded broker, nothing stored).
//! Run it with `scripts/bench` (release build); `scripts/bench serial` for serial ingest,
//! `scripts/bench pi` for start-up time, RSS with rules and bytes written per event,
//! `scripts/bench compress` for the size and CPU cost of batch compression.
//! Not a test: it asserts nothing.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidepool_e2e::*;

#[path = "../sim_events.rs"]
mod sim_events;
use sim_events::sim_events;

const TOPIC: &str = "tidepool/test-gw/events";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A lean subscriber: counts events and records ingest-to-upstream latency per event.
struct Counter {
    events: Arc<AtomicU64>,
    latencies: Arc<Mutex<Vec<i64>>>,
    first_at: Arc<Mutex<Option<Instant>>>,
    _rt: tokio::runtime::Runtime,
}

impl Counter {
    fn start(port: u16) -> Counter {
        let events = Arc::new(AtomicU64::new(0));
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let first_at = Arc::new(Mutex::new(None));
        let (e, l, f) = (events.clone(), latencies.clone(), first_at.clone());
        let (rt, _task) = listen(port, &[TOPIC], move |_, payload| {
            let now = now_ms();
            let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
            let evs = v["events"].as_array().unwrap();
            let mut lat = l.lock().unwrap();
            for ev in evs {
                if let Some(ts) = ev["payload"]["ts"].as_i64() {
                    lat.push(now - ts);
                }
            }
            f.lock().unwrap().get_or_insert_with(Instant::now);
            e.fetch_add(evs.len() as u64, Relaxed);
        });
        Counter {
            events,
            latencies,
            first_at,
            _rt: rt,
        }
    }

    fn wait(&self, n: u64, within: Duration) -> bool {
        let until = Instant::now() + within;
        while self.events.load(Relaxed) < n {
            if Instant::now() > until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    fn reset(&self) {
        self.events.store(0, Relaxed);
        self.latencies.lock().unwrap().clear();
        *self.first_at.lock().unwrap() = None;
    }
}

fn pct(v: &mut [i64], p: f64) -> i64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// The ceiling: the simulator into a bare embedded broker that ingests nothing (each publish
/// is acknowledged on receipt and routed to nobody): events/s as the simulator saw them
/// acknowledged.
fn ceiling(n: u64) -> f64 {
    let port = free_port();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_stop, shutdown) = tidepool::shutdown::channel();
    let _broker = rt
        .block_on(tidepool::broker::Broker::start(
            tidepool::broker::Settings::routing_only(format!("127.0.0.1:{port}").parse().unwrap()),
            None,
            Arc::new(tidepool::admin::metrics::Metrics::default()),
            None,
            shutdown,
        ))
        .unwrap();
    assert!(wait_port(port, Duration::from_secs(5)));
    let sim = run_sim(port, n, 0.0, &["--payload-size", "200", "--sensors", "20"]);
    sim["acked"].as_f64().unwrap_or(0.0) / sim["seconds"].as_f64().unwrap_or(1.0)
}

/// Embedded mode: how many events a `kill -9` loses (PUBACKed by the broker, not committed).
fn kill9_window(rate: f64, runs: usize) -> Vec<u64> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut losses = Vec::new();
    for i in 0..runs {
        let mut gw = Gateway::start("");
        let stats = Arc::new(tidepool_sim::SimStats::default());
        let cfg = tidepool_sim::SimConfig {
            port: gw.mqtt_port,
            sensors: 20,
            rate,
            count: None,
            seed: i as u64,
            payload_size: 200,
            client_id: format!("kill9-{i}"),
            ..Default::default()
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let sim = rt.spawn(tidepool_sim::run(cfg, stats.clone(), async move {
            let _ = stop_rx.await;
        }));
        std::thread::sleep(Duration::from_millis(1500 + 137 * i as u64));
        gw.proc.kill9();
        let acked = stats.acked.load(Relaxed);
        let _ = stop_tx.send(());
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(1), sim).await;
        });
        let out = gw.cli(&["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let stored = v["backlog_events"].as_u64().unwrap();
        losses.push(acked.saturating_sub(stored));
    }
    losses.sort_unstable();
    losses
}

/// CPU seconds (user + system) the process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

/// Serial ingest over a pty pair: frames/s and gateway CPU per 1,000 frames.
fn serial_bench(frames: u64) {
    for baud in [115_200u32, 1_000_000] {
        for framing in ["lines", "cobs"] {
            let dir = tempfile::tempdir().unwrap();
            let pair = PtyPair::start(dir.path());
            let gw = Gateway::start(&format!(
                "[[ingest.serial]]\nname = \"bench\"\npath = \"{}\"\nbaud = {baud}\nframing = \"{framing}\"\n[buffer]\nmax_bytes = \"1GiB\"\n",
                pair.a.display()
            ));
            std::thread::sleep(Duration::from_millis(500));
            let pid = gw.proc.pid();
            let cpu0 = cpu_secs(pid);
            let t = Instant::now();
            let out = std::process::Command::new(bin_dir().join("tidepool-sim"))
                .args([
                    "--serial",
                    pair.b.to_str().unwrap(),
                    "--baud",
                    &baud.to_string(),
                    "--framing",
                    framing,
                ])
                .args(["--count", &frames.to_string(), "--rate", "0", "--json"])
                .output()
                .unwrap();
            assert!(out.status.success());
            while gw.metric("tidepool_events_committed_total").unwrap_or(0.0) < frames as f64
                && t.elapsed() < Duration::from_secs(120)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            let secs = t.elapsed().as_secs_f64();
            let cpu = cpu_secs(pid) - cpu0;
            println!(
                "serial    {framing:<5} at {baud:>7} baud (pty): {:>7.0} frames/s, gateway CPU {:.1} ms per 1,000 frames",
                frames as f64 / secs,
                cpu * 1000.0 / (frames as f64 / 1000.0)
            );
        }
    }
}

/// Seconds from spawning the daemon to its sd_notify READY=1; then it is stopped cleanly,
/// or with `kill -9` if `kill`.
fn time_to_ready(gw: &Gateway, kill: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let t = Instant::now();
    let mut child = Proc {
        child: Some(
            command("tidepool")
                .args(["run", "--config"])
                .arg(&gw.config)
                .env("NOTIFY_SOCKET", &sock_path)
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        ),
        name: "tidepool".into(),
    };
    let mut buf = [0u8; 128];
    let n = sock.recv(&mut buf).expect("the gateway never sent READY=1");
    assert!(buf[..n].starts_with(b"READY=1"), "{:?}", &buf[..n]);
    let secs = t.elapsed().as_secs_f64();
    if kill {
        child.kill9();
    } else {
        child.terminate(Duration::from_secs(20));
    }
    secs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A backlog drain after an outage, `fifo` against `live_first`, unpaced and at a
/// `drain_rate`: how fast the backlog went, and how long live events (100/s from another
/// sensor, sent while the backlog drained) took from the sensor to the upstream subscriber.
/// `BENCH_DRAIN_BACKLOG` (default 200,000) events of backlog; `BENCH_DRAIN_RATE` (default
/// 20000) events a second for the paced runs.
fn drain_bench() {
    use tidepool_e2e::drain::{now_ms, percentile, BatchLog};
    let n: u64 = std::env::var("BENCH_DRAIN_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let rate: u64 = std::env::var("BENCH_DRAIN_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    println!("drain     {n}-event backlog after an outage; live events 100/s from another sensor during the drain");
    for paced in [None, Some(rate)] {
        for mode in ["fifo", "live_first"] {
            // The broker first: a port picked free before it could be handed to it too.
            let up = Mosquitto::start("");
            let port = free_port();
            let rate_cfg = paced.map_or("unlimited".to_string(), |r| format!("{r}/s"));
            let mut gw = Gateway::start(&format!(
                "[buffer]\nmax_bytes = \"4GiB\"\nwrite_budget = \"0\"\n[upstream]\nurl = \"mqtt://127.0.0.1:{port}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\nbatch_max_wait = \"100ms\"\ndrain = \"{mode}\"\ndrain_rate = \"{rate_cfg}\"\n"
            ));
            run_sim(gw.mqtt_port, n, 0.0, &["--client-id", "backlog"]);
            while gw.metric("tidepool_backlog_events").unwrap_or(0.0) < n as f64 {
                std::thread::sleep(Duration::from_millis(100));
            }
            let log = BatchLog::start(up.port, TOPIC);
            let started = Instant::now();
            let _link = Proxy::start_on(port, up.port);
            // Live events are those sent once the connection is up (what came before it is
            // backlog, by definition).
            while gw.metric("tidepool_upstream_connected") != Some(1.0) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let start_ms = now_ms();
            let mut live = spawn_sim(gw.mqtt_port, 1_000_000, 100.0, &["--client-id", "live"]);
            let done = log.wait_for(Duration::from_secs(600), |b| {
                b.iter()
                    .flat_map(|b| b.events.iter())
                    .filter(|e| e.source == "mqtt:backlog")
                    .count() as u64
                    >= n
            });
            let drained = started.elapsed().as_secs_f64();
            let end_ms = now_ms();
            live.kill9();
            // Live events sent while the backlog drained reach the subscriber some time later.
            std::thread::sleep(Duration::from_secs(2));
            let mut lat = Vec::new();
            for b in log.snapshot() {
                for e in b.events.iter().filter(|e| e.source == "mqtt:live") {
                    if let Some(sent) = e.sent_ms.filter(|s| *s >= start_ms && *s <= end_ms) {
                        lat.push(b.at_ms - sent);
                    }
                }
            }
            let sent = lat.len();
            println!(
                "  {mode:<10} drain_rate {rate_cfg:<10} backlog drained in {drained:6.1} s ({:7.0} events/s){}; live latency during it p50 {} ms, p99 {} ms, max {} ms ({sent} live events)",
                n as f64 / drained,
                if done { "" } else { " (not finished)" },
                percentile(&mut lat, 50.0),
                percentile(&mut lat, 99.0),
                lat.iter().max().copied().unwrap_or(0),
            );
            gw.proc.terminate(Duration::from_secs(10));
        }
    }
}

/// Start-up to READY=1 with a 1,000,000-event backlog (`BENCH_BACKLOG`): after a clean
/// stop, and after `kill -9`, when redb first repairs the file (it walks the file's trees to
/// rebuild its free-page state).
fn startup_with_backlog() {
    let n: u64 = std::env::var("BENCH_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut gw = Gateway::start("[buffer]\nmax_bytes = \"4GiB\"\n");
    run_sim(
        gw.mqtt_port,
        n,
        0.0,
        &["--payload-size", "200", "--sensors", "20"],
    );
    while gw.metric("tidepool_backlog_events").unwrap_or(0.0) < n as f64 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let file = std::fs::metadata(gw.config.parent().unwrap().join("data/tidepool.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    // Unclean: each run ends with kill -9, so the next one repairs again.
    gw.proc.kill9();
    let unclean: Vec<f64> = (0..3).map(|_| time_to_ready(&gw, true)).collect();
    // Clean: one start to repair and stop cleanly, then the measured ones.
    time_to_ready(&gw, false);
    let clean: Vec<f64> = (0..3).map(|_| time_to_ready(&gw, false)).collect();
    println!(
        "start-up  to READY=1, {n}-event backlog ({:.0} MiB file): median {:.0} ms after a clean stop, {:.0} ms after kill -9 (redb repair; runs {:?} ms)",
        file as f64 / 1048576.0,
        median(clean) * 1000.0,
        median(unclean.clone()) * 1000.0,
        unclean.iter().map(|s| (s * 1000.0).round() as u64).collect::<Vec<_>>()
    );
}

/// Footprint figures for the Pi issue: start-up, RSS with rules at 1,000 ev/s, bytes written.
fn pi_bench() {
    // Start-up to READY, empty store.
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::configure(dir.path().to_path_buf(), "");
    let empty: Vec<f64> = (0..5)
        .map(|_| {
            let _ = std::fs::remove_dir_all(dir.path().join("data"));
            time_to_ready(&gw, false)
        })
        .collect();
    println!(
        "start-up  to READY=1, empty store: median {:.0} ms",
        median(empty) * 1000.0
    );

    startup_with_backlog();

    // RSS and bytes written at 1,000 events/s through three example rules, upstream online
    // (acknowledged batches are deleted in the next commit, so their writes count too); the
    // default group wait, then a longer one.
    let rules = tempfile::tempdir().unwrap();
    for r in ["05-drop-malformed", "20-units-enrich", "30-deadband"] {
        std::fs::copy(
            root().join(format!("rules/examples/{r}.rhai")),
            rules.path().join(format!("{r}.rhai")),
        )
        .unwrap();
    }
    let up = Mosquitto::start("");
    for wait in ["5ms", "100ms"] {
        let gw = Gateway::start(&format!(
            "[rules]\ndir = \"{}\"\n[upstream]\nurl = \"mqtt://127.0.0.1:{}\"\n[buffer]\ncommit_max_wait = \"{wait}\"\n",
            rules.path().display(),
            up.port
        ));
        let pid = gw.proc.pid();
        std::thread::sleep(Duration::from_secs(2));
        let idle = procfs::status_kib(pid, "VmRSS:");
        let w0 = procfs::write_bytes(pid);
        let c0 = gw.metric("tidepool_events_committed_total").unwrap_or(0.0);
        let f0 = gw.metric("tidepool_fsyncs_total").unwrap_or(0.0);
        let mut sim = spawn_sim(gw.mqtt_port, 20_000, 1_000.0, &["--sensors", "20"]);
        let mut max_rss = 0;
        while sim.running() {
            max_rss = max_rss.max(procfs::status_kib(pid, "VmRSS:"));
            std::thread::sleep(Duration::from_millis(250));
        }
        std::thread::sleep(Duration::from_secs(2));
        let committed = gw.metric("tidepool_events_committed_total").unwrap_or(0.0) - c0;
        let written = procfs::write_bytes(pid) - w0;
        let fsyncs = gw.metric("tidepool_fsyncs_total").unwrap_or(0.0) - f0;
        let forwarded = gw.metric("tidepool_events_forwarded_total").unwrap_or(0.0);
        if wait == "5ms" {
            println!(
                "rss       idle {:.1} MiB; at 1,000 events/s through 3 example rules, upstream online: max {:.1} MiB",
                idle as f64 / 1024.0,
                max_rss as f64 / 1024.0
            );
        }
        println!(
            "disk      at 1,000 events/s, commit_max_wait {wait}: {:.0} bytes written per event committed ({committed} events, {fsyncs} commits, {forwarded} forwarded)",
            written as f64 / committed.max(1.0)
        );
    }
    drop(up);

    // Bytes written per event flat out (bigger groups per fsync).
    let gw = Gateway::start("");
    let pid = gw.proc.pid();
    std::thread::sleep(Duration::from_secs(1));
    let w0 = procfs::write_bytes(pid);
    run_sim(
        gw.mqtt_port,
        200_000,
        0.0,
        &["--payload-size", "200", "--sensors", "20"],
    );
    std::thread::sleep(Duration::from_secs(1));
    let committed = gw.metric("tidepool_events_committed_total").unwrap_or(0.0);
    let fsyncs = gw.metric("tidepool_fsyncs_total").unwrap_or(1.0);
    println!(
        "disk      flat out: {:.0} bytes written per event ({committed} events, {:.0} events per commit)",
        (procfs::write_bytes(pid) - w0) as f64 / committed.max(1.0),
        committed / fsyncs
    );
}

/// SD-card wear at the default config, upstream online, side by side in one run: idle and
/// 10 / 100 / 1,000 events/s: fsyncs per second, bytes written (`/proc/PID/io`
/// `write_bytes`) per event and per day, ingest → upstream latency and the sensors'
/// PUBACK latency, and the commit window (what QoS 0 and serial without acks have at risk).
/// The `ended` labels of `tidepool_commit_groups_total`.
const GROUP_ENDS: [&str; 9] = [
    "full",
    "bytes",
    "window",
    "budget_window",
    "early",
    "stalled",
    "closed",
    "acks",
    "other",
];

fn wear_bench() {
    let up = Mosquitto::start("");
    let counter = Counter::start(up.port);
    let gw = Gateway::start(&format!(
        "[upstream]\nurl = \"mqtt://127.0.0.1:{}\"\n",
        up.port
    ));
    let pid = gw.proc.pid();
    std::thread::sleep(Duration::from_secs(2));
    let sample = || {
        (
            procfs::write_bytes(pid),
            gw.metric("tidepool_fsyncs_total").unwrap_or(0.0),
            gw.metric("tidepool_events_committed_total").unwrap_or(0.0),
            Instant::now(),
            gw.metric("tidepool_store_bytes_written_total"),
            GROUP_ENDS.map(|e| {
                gw.metric(&format!("tidepool_commit_groups_total{{ended=\"{e}\"}}"))
                    .unwrap_or(0.0)
            }),
        )
    };
    println!(
        "wear      {:<14} {:>9} {:>11} {:>10} {:>22} {:>22} {:>22}",
        "load",
        "fsyncs/s",
        "B/event",
        "GB/day",
        "upstream p50/p99",
        "PUBACK p50/p99",
        "window (QoS 0 risk)"
    );
    let a = sample();
    std::thread::sleep(Duration::from_secs(30));
    let b = sample();
    let secs = b.3.duration_since(a.3).as_secs_f64();
    println!(
        "wear      {:<14} {:>9.3} {:>11} {:>10.4} {:>22} {:>22} {:>22}   ({} B in {secs:.0} s)",
        "idle",
        (b.1 - a.1) / secs,
        "–",
        (b.0 - a.0) as f64 / secs * 86_400.0 / 1e9,
        "–",
        "–",
        "–",
        b.0 - a.0,
    );
    // Long enough that the first and last commits of a run (edge effects) weigh little.
    for (rate, warm, run) in [
        (10.0, 20.0, 120.0),
        (100.0, 10.0, 60.0),
        (1_000.0, 5.0, 30.0),
    ] {
        // Warm up (the budget's burst is spent, the window has settled), then measure.
        run_sim(
            gw.mqtt_port,
            (rate * warm) as u64,
            rate,
            &["--sensors", "10"],
        );
        counter.reset();
        let a = sample();
        let windows = Mutex::new(Vec::new());
        let done = std::sync::atomic::AtomicBool::new(false);
        let sim = std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Relaxed) {
                    if let Some(w) = gw.metric("tidepool_commit_window_seconds") {
                        windows.lock().unwrap().push((w * 1e6) as i64);
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            });
            let sim = run_sim(
                gw.mqtt_port,
                (rate * run) as u64,
                rate,
                &["--sensors", "10"],
            );
            done.store(true, Relaxed);
            sim
        });
        // Let the last group and the held upstream acknowledgements commit.
        let sent = (rate * run) as u64;
        counter.wait(sent, Duration::from_secs(30));
        std::thread::sleep(Duration::from_secs(6));
        let b = sample();
        let secs = b.3.duration_since(a.3).as_secs_f64();
        let events = (b.2 - a.2).max(1.0);
        let per_event = (b.0 - a.0) as f64 / events;
        let mut lat = counter.latencies.lock().unwrap().clone();
        let mut w = windows.into_inner().unwrap();
        let window = pct(&mut w, 0.5) as f64 / 1e6;
        let own = match (a.4, b.4) {
            (Some(x), Some(y)) => {
                format!("; the gateway's own count {:.0} B/event", (y - x) / events)
            }
            _ => String::new(),
        };
        // Why each commit's group ended: what sets the events per fsync.
        let ends: Vec<(&str, f64)> = GROUP_ENDS
            .iter()
            .zip(b.5.iter().zip(a.5.iter()))
            .map(|(e, (y, x))| (*e, y - x))
            .filter(|(_, n)| *n > 0.0)
            .collect();
        let commits: f64 = ends.iter().map(|(_, n)| n).sum();
        let with_events: f64 = ends
            .iter()
            .filter(|(e, _)| !matches!(*e, "acks" | "other"))
            .map(|(_, n)| n)
            .sum();
        let groups = ends
            .iter()
            .map(|(e, n)| format!("{e} {:.0}%", n / commits.max(1.0) * 100.0))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "wear      {:<14} {:>9.2} {:>11.0} {:>10.3} {:>22} {:>22} {:>22}   ({events} events in {secs:.0} s{own}; {commits:.0} commits: {groups}; {:.1} events per group)",
            format!("{rate:.0} events/s"),
            (b.1 - a.1) / secs,
            per_event,
            per_event * rate * 86_400.0 / 1e9,
            format!("{} / {} ms", pct(&mut lat, 0.5), pct(&mut lat, 0.99)),
            format!(
                "{:.1} / {:.1} ms",
                sim["ack_p50_ms"].as_f64().unwrap_or(f64::NAN),
                sim["ack_p99_ms"].as_f64().unwrap_or(f64::NAN)
            ),
            format!("{:.3} s ({:.0} events)", window, window * rate),
            events / with_events.max(1.0),
        );
    }
}

/// `fault-proxy LISTEN TARGET`: a fault proxy on loopback port LISTEN in front of TARGET;
/// each line on stdin names the next state (`pass`, `delay:MS`, `throttle:BYTES_PER_S`,
/// `cut`, `blackhole`, `flap`). Ends at end of input.
fn fault_proxy_cli(args: &[String]) {
    let port = |i: usize| -> u16 {
        args.get(i)
            .and_then(|v| v.parse().ok())
            .expect("usage: tidepool-bench fault-proxy LISTEN_PORT TARGET_PORT")
    };
    let proxy = fault_proxy::FaultProxy::start_on(port(0), port(1));
    println!(
        "fault proxy 127.0.0.1:{} -> 127.0.0.1:{}: pass",
        proxy.port,
        port(1)
    );
    for line in std::io::stdin().lines().map_while(Result::ok) {
        match fault_proxy::Fault::parse(line.trim()) {
            Some(f) => {
                proxy.set(f);
                println!("{f:?}");
            }
            None => eprintln!("not a fault: {line:?} (pass, delay:MS, throttle:BYTES_PER_S, cut, blackhole, flap)"),
        }
    }
}

/// Batch compression on simulator data (the simulator's defaults: 10 sensors, unpadded
/// payloads, 1,000 events/s): batches of 500 events in the real wire formats, JSON and
/// postcard, each encoding at each gzip level. Per batch: input and output bytes, ratio,
/// compress µs (median of the runs) and MB/s; inflate MB/s. One core, in this process.
fn compress_bench() {
    use tidepool::config::Encoding;
    use tidepool::event::Payload;
    use tidepool::forward::compress::{self, Compression};
    use tidepool::forward::wire::BatchEncoder;

    const PER_BATCH: usize = 500;
    let batches: usize = env_or("BENCH_BATCHES", 20);
    let runs: usize = env_or("BENCH_RUNS", 15);
    let events = sim_events(1, 1, (batches * PER_BATCH) as u64, 1_764_000_000_000);
    println!(
        "batch compression: {batches} batches of {PER_BATCH} simulator events, median of {runs} runs, one core"
    );
    println!(
        "{:<9} {:<6} {:>9} {:>9} {:>6} {:>10} {:>12} {:>12}",
        "encoding", "level", "in B", "out B", "ratio", "µs/batch", "compr MB/s", "inflate MB/s"
    );
    for encoding in [Encoding::Json, Encoding::Postcard] {
        let payloads: Vec<Vec<u8>> = events
            .chunks(PER_BATCH)
            .enumerate()
            .map(|(i, chunk)| {
                let mut b = BatchEncoder::new(encoding, "pi-kitchen-01", i as u64 + 1);
                for e in chunk {
                    assert!(b.push(e, usize::MAX));
                }
                b.finish()
            })
            .collect();
        let input: usize = payloads.iter().map(Vec::len).sum();
        let name = format!("{encoding:?}").to_lowercase();
        println!(
            "{name:<9} {:<6} {:>9} {:>9} {:>6} {:>10} {:>12} {:>12}",
            "none",
            input / batches,
            input / batches,
            "1.00",
            "-",
            "-",
            "-"
        );
        for level in [1u8, 3, 6, 9] {
            let mut out = Vec::new();
            let compress_s = median(
                (0..runs)
                    .map(|_| {
                        let start = Instant::now();
                        out = payloads
                            .iter()
                            .map(|p| compress::compress(Compression::Gzip, level, p))
                            .collect();
                        start.elapsed().as_secs_f64()
                    })
                    .collect(),
            );
            let inflate_s = median(
                (0..runs)
                    .map(|_| {
                        let start = Instant::now();
                        for (z, p) in out.iter().zip(&payloads) {
                            assert_eq!(compress::decompress_gzip(z).unwrap().len(), p.len());
                        }
                        start.elapsed().as_secs_f64()
                    })
                    .collect(),
            );
            let output: usize = out.iter().map(Vec::len).sum();
            println!(
                "{name:<9} {:<6} {:>9} {:>9} {:>6.2} {:>10.0} {:>12.1} {:>12.1}",
                format!("gzip {level}"),
                input / batches,
                output / batches,
                input as f64 / output as f64,
                compress_s * 1e6 / batches as f64,
                input as f64 / compress_s / 1e6,
                input as f64 / inflate_s / 1e6,
            );
        }
    }
    let all: Vec<u8> = events
        .iter()
        .flat_map(|e| match &e.payload {
            Payload::Json(s) => s.as_bytes().to_vec(),
            Payload::Bytes(b) => b.clone(),
        })
        .collect();
    let crc_s = median(
        (0..runs)
            .map(|_| {
                let start = Instant::now();
                std::hint::black_box(compress::crc32(std::hint::black_box(&all)));
                start.elapsed().as_secs_f64()
            })
            .collect(),
    );
    println!(
        "CRC-32 alone (part of gzip): {:.0} MB/s",
        all.len() as f64 / crc_s / 1e6
    );
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    std::env::set_var("TIDEPOOL_TEST_RELEASE", "1");
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("fault-proxy") {
        fault_proxy_cli(&args[1..]);
        return;
    }
    if args.first().map(String::as_str) == Some("soak") {
        let parse = |what: &str, v: &str| {
            tidepool::config::HumanDuration::parse(v)
                .unwrap_or_else(|e| panic!("{what}: {e}"))
                .0
        };
        let d = parse("soak DURATION", args.get(1).map_or("20m", String::as_str));
        let every = parse(
            "SOAK_FAULT_EVERY",
            &std::env::var("SOAK_FAULT_EVERY").unwrap_or_else(|_| "3m".into()),
        );
        bin_dir();
        soak::run(d, every);
        return;
    }
    if args.first().map(String::as_str) == Some("drain") {
        bin_dir();
        drain_bench();
        return;
    }
    if args.first().map(String::as_str) == Some("compress") {
        compress_bench();
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("wear") {
        std::env::set_var("TIDEPOOL_TEST_RELEASE", "1");
        bin_dir();
        wear_bench();
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("pi") {
        bin_dir();
        pi_bench();
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("restart") {
        bin_dir();
        startup_with_backlog();
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("serial") {
        bin_dir();
        serial_bench(
            std::env::var("BENCH_FRAMES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(50_000),
        );
        return;
    }
    let n: u64 = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let backlog: u64 = std::env::var("BENCH_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    bin_dir();
    println!(
        "tidepool end-to-end benchmark ({} cores), 200-byte JSON events",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    let ceil = ceiling(n);
    println!("ceiling   sim → embedded broker, nothing stored: {ceil:>9.0} events/s ({n} events)");

    // End to end, as fast as the simulator goes.
    let up = Mosquitto::start("");
    let counter = Counter::start(up.port);
    let gw = Gateway::start(&format!(
        "[upstream]\nurl = \"mqtt://127.0.0.1:{}\"\n[buffer]\nmax_bytes = \"2GiB\"\n",
        up.port
    ));
    let pid = gw.proc.pid();
    std::thread::sleep(Duration::from_secs(2));
    let idle = procfs::status_kib(pid, "VmRSS:");
    let started = Instant::now();
    let cpu0 = cpu_secs(pid);
    let sim = run_sim(
        gw.mqtt_port,
        n,
        0.0,
        &["--payload-size", "200", "--sensors", "20"],
    );
    let ok = counter.wait(n, Duration::from_secs(300));
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu0;
    let e2e = counter.events.load(Relaxed) as f64 / secs;
    let mut lat = counter.latencies.lock().unwrap().clone();
    println!(
        "pipeline  sim → gateway → Mosquitto, flat out:      {e2e:>9.0} events/s ({:.0}% of the ceiling){}",
        100.0 * e2e / ceil,
        if ok { "" } else { " INCOMPLETE" }
    );
    println!(
        "          latency under that load: p50 {} ms, p99 {} ms; sensor PUBACK p50 {} ms, p99 {} ms; gateway CPU {:.1} µs/event",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        sim["ack_p50_ms"],
        sim["ack_p99_ms"],
        cpu * 1e6 / n as f64
    );

    // Latency at a steady online rate.
    for rate in [1_000.0, 10_000.0] {
        counter.reset();
        let k = (rate * 10.0) as u64;
        let cpu0 = cpu_secs(pid);
        let sim = run_sim(
            gw.mqtt_port,
            k,
            rate,
            &["--payload-size", "200", "--sensors", "20"],
        );
        counter.wait(k, Duration::from_secs(60));
        let cpu = cpu_secs(pid) - cpu0;
        let mut lat = counter.latencies.lock().unwrap().clone();
        println!(
            "latency   at {rate:>6.0} events/s online: p50 {:>4} ms, p99 {:>4} ms (batch_max_wait 1s, batch_max_events 500); sensor PUBACK p50 {} ms, p99 {} ms; CPU {:.1} µs/event",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            sim["ack_p50_ms"],
            sim["ack_p99_ms"],
            cpu * 1e6 / k as f64
        );
    }
    let committed = gw.metric("tidepool_events_committed_total").unwrap_or(0.0);
    let fsyncs = gw.metric("tidepool_fsyncs_total").unwrap_or(1.0);
    println!("fsync     {:.0} events per fsync over the runs above ({committed} events, {fsyncs} commits)", committed / fsyncs);
    let peak_live = procfs::status_kib(pid, "VmHWM:");

    // The same flat-out run with `tidepool tap --json` attached, its output read and thrown
    // away: what building a tap record per input costs (a reader that falls behind loses
    // records instead, see tests/tests/tap.rs).
    counter.reset();
    let mut tap = command("tidepool")
        .args(["tap", "--json", "--config"])
        .arg(&gw.config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start tidepool tap");
    let until = Instant::now() + Duration::from_secs(10);
    while gw.metric("tidepool_tap_readers") != Some(1.0) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    if gw.metric("tidepool_tap_readers") == Some(1.0) {
        let started = Instant::now();
        let cpu0 = cpu_secs(pid);
        run_sim(
            gw.mqtt_port,
            n,
            0.0,
            &["--payload-size", "200", "--sensors", "20"],
        );
        let ok = counter.wait(n, Duration::from_secs(300));
        let secs = started.elapsed().as_secs_f64();
        let cpu = cpu_secs(pid) - cpu0;
        let tapped = counter.events.load(Relaxed) as f64 / secs;
        let mut lat = counter.latencies.lock().unwrap().clone();
        println!(
            "tap       flat out with a tap attached:             {tapped:>9.0} events/s ({:.0}% of untapped); p50 {} ms, p99 {} ms; gateway CPU {:.1} µs/event; {} records, {} lost{}",
            100.0 * tapped / e2e,
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            cpu * 1e6 / n as f64,
            gw.metric("tidepool_tap_records_total").unwrap_or(0.0),
            gw.metric("tidepool_tap_lost_total").unwrap_or(0.0),
            if ok { "" } else { " INCOMPLETE" }
        );
    } else {
        println!("tap       (this gateway has no tap)");
    }
    let _ = tap.kill();
    let _ = tap.wait();
    drop(gw);
    drop(counter);
    drop(up);

    for rate in [1_000.0, 20_000.0] {
        let l = kill9_window(rate, 5);
        println!(
            "kill -9   embedded mode at {rate:>6.0} events/s: lost (acknowledged to the sensor, not committed) median {}, max {} over {} kills",
            l[l.len() / 2],
            l[l.len() - 1],
            l.len()
        );
    }

    // Backlog drain: fill with upstream down, then bring it up.
    let port = free_port();
    let gw = Gateway::start(&format!(
        "[upstream]\nurl = \"mqtt://127.0.0.1:{port}\"\nreconnect_max = \"1s\"\n[buffer]\nmax_bytes = \"4GiB\"\n"
    ));
    let pid = gw.proc.pid();
    let fill = Instant::now();
    run_sim(
        gw.mqtt_port,
        backlog,
        0.0,
        &["--payload-size", "200", "--sensors", "20"],
    );
    while gw.metric("tidepool_backlog_events").unwrap_or(0.0) < backlog as f64
        && fill.elapsed() < Duration::from_secs(600)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let fill_rate = backlog as f64 / fill.elapsed().as_secs_f64();
    let bytes = gw.metric("tidepool_backlog_bytes").unwrap_or(0.0);
    println!("buffer    {backlog} events stored at {fill_rate:.0} events/s with upstream down ({:.0} MiB, {:.0} B/event)", bytes / 1048576.0, bytes / backlog as f64);
    let up = Mosquitto::start("");
    let counter = Counter::start(up.port);
    let _link = Proxy::start_on(port, up.port);
    let t = Instant::now();
    let cpu0 = cpu_secs(pid);
    let ok = counter.wait(backlog, Duration::from_secs(600));
    let drained = counter.events.load(Relaxed);
    let drain = drained as f64 / t.elapsed().as_secs_f64();
    // CPU per event is the steadier figure on a shared machine, and the one a Pi runs short of.
    let cpu = cpu_secs(pid) - cpu0;
    println!(
        "drain     {backlog}-event backlog: {drain:>9.0} events/s; gateway CPU {:.2} µs/event{}",
        cpu * 1e6 / drained.max(1) as f64,
        if ok { "" } else { " INCOMPLETE" }
    );
    println!(
        "memory    gateway RSS idle {:.1} MiB; peak {:.1} MiB flat out online, {:.1} MiB filling and draining the backlog",
        idle as f64 / 1024.0,
        peak_live as f64 / 1024.0,
        procfs::status_kib(pid, "VmHWM:") as f64 / 1024.0
    );
}
