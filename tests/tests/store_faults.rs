//! The store under field faults: a full disk, a store from the landed release, a flood of
//! big payloads.

use std::time::{Duration, Instant};

use tidepool_e2e::disk::Tmpfs;
use tidepool_e2e::*;

const TOPIC: &str = "tidepool/test-gw/events";

fn upstream_cfg(port: u16) -> String {
    format!(
        "[upstream]\nurl = \"mqtt://127.0.0.1:{port}\"\nbatch_max_wait = \"100ms\"\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n"
    )
}

/// A gateway (not started yet) whose store is on `disk`, `min_free` 1 MiB, upstream on `port`.
fn gateway_on(disk: &Tmpfs, port: u16) -> (tempfile::TempDir, Gateway) {
    let tmp = tempfile::tempdir().unwrap();
    let gw = Gateway::configure(
        tmp.path().to_path_buf(),
        &format!("{}\n[buffer]\nmin_free = \"1MiB\"\n", upstream_cfg(port)),
    );
    let cfg = std::fs::read_to_string(&gw.config).unwrap().replace(
        &format!("data_dir = \"{}\"", tmp.path().join("data").display()),
        &format!("data_dir = \"{}\"", disk.path().display()),
    );
    std::fs::write(&gw.config, cfg).unwrap();
    (tmp, gw)
}

fn wait(within: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if pred() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    pred()
}

fn healthz(gw: &Gateway) -> Option<u16> {
    http_status(gw.admin_port, "/healthz")
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get_full(port, path).map(|(code, _)| code)
}

fn m(gw: &Gateway, series: &str) -> u64 {
    gw.metric(series).unwrap_or(0.0) as u64
}

/// A 6 MiB disk, upstream down, 60,000 events of ~250 B at 5,000/s; 1.5 s in, something
/// else fills the disk to the last byte while events keep coming; then upstream comes back,
/// and the disk is freed. Every event the embedded broker acknowledged is delivered or
/// counted; the gateway recovers by itself, without a restart.
#[test]
fn full_disk_holds_then_recovers_and_accounts_for_every_event() {
    let disk = Tmpfs::mount("6m");
    let port = free_port();
    let (_tmp, mut gw) = gateway_on(&disk, port);
    gw.launch();
    let pid = gw.proc.pid();
    let started = Instant::now();

    let mqtt = gw.mqtt_port;
    let sim = std::thread::spawn(move || {
        run_sim(
            mqtt,
            60_000,
            5000.0,
            &["--sensors", "20", "--payload-size", "200"],
        )
    });

    // Early on, while the store still grows, something else fills the disk to the last
    // byte: commits fail with an I/O error.
    let seen_503 = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (seen, stop, port) = (seen_503.clone(), stop.clone(), gw.admin_port);
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if http_status(port, "/healthz") == Some(503) {
                    seen.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    let ballast = disk.fill("ballast");
    assert!(disk.available() < 4096, "the disk should be full");
    let failed = wait(Duration::from_secs(20), || {
        m(&gw, "tidepool_store_errors_total") > 0
    });
    let unhealthy_at = started.elapsed();

    // Upstream comes back while the disk is still full: forwarding goes on, and what it
    // acknowledges makes room.
    // The subscriber is in before the gateway's port opens, so no batch is acknowledged to
    // a broker nobody listens to yet.
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let _link = Proxy::start_on(port, up.port);
    std::thread::sleep(Duration::from_secs(3));
    let forwarded_while_full = m(&gw, "tidepool_events_forwarded_total");

    // The disk is freed: the gateway recovers by itself.
    std::fs::remove_file(disk.path().join("ballast")).unwrap();
    let freed = Instant::now();
    let recovered = wait(Duration::from_secs(30), || healthz(&gw) == Some(200));
    let recover_s = freed.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    poller.join().unwrap();
    let went_unhealthy = seen_503.load(std::sync::atomic::Ordering::Relaxed);

    let sim = sim.join().unwrap();
    let acked = sim["acked"].as_u64().unwrap();
    // Everything settles: backlog drained, nothing left in hand.
    assert!(
        wait(Duration::from_secs(60), || {
            m(&gw, "tidepool_backlog_events") == 0
                && m(&gw, "tidepool_events_forwarded_total") as usize >= sub.distinct_n().len()
                && sub.snapshot().len() as u64 >= m(&gw, "tidepool_events_forwarded_total")
        }),
        "backlog did not drain: backlog {}, forwarded {}, received {} ({} distinct); log:\n{}",
        m(&gw, "tidepool_backlog_events"),
        m(&gw, "tidepool_events_forwarded_total"),
        sub.snapshot().len(),
        sub.distinct_n().len(),
        gw.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    let delivered = {
        let got = sub.snapshot();
        got.iter()
            .map(|g| g.id)
            .collect::<std::collections::BTreeSet<_>>()
            .len() as u64
    };
    let drop = |r: &str| {
        m(
            &gw,
            &format!("tidepool_events_dropped_total{{reason=\"{r}\"}}"),
        )
    };
    let (min_free, full, overflow, age) = (
        drop("min_free"),
        drop("buffer_full"),
        drop("ingest_overflow"),
        drop("max_age"),
    );
    println!(
        "full disk: acked {acked}, delivered {delivered}, dropped min_free {min_free} buffer_full {full} \
         ingest_overflow {overflow} max_age {age}; ballast {ballast} B; first store error after {:.1}s, \
         {} in all; forwarded while full {forwarded_while_full}; healthy {recover_s:.1}s after the disk was freed",
        unhealthy_at.as_secs_f64(),
        m(&gw, "tidepool_store_errors_total")
    );
    assert!(
        failed,
        "the full disk never failed a commit; log:\n{}",
        gw.log()
    );
    assert_eq!(
        acked, 60_000,
        "the simulator should be acknowledged throughout"
    );
    assert!(
        went_unhealthy,
        "/healthz never said 503 on a full disk; log:\n{}",
        gw.log()
    );
    assert!(recovered, "/healthz never came back; log:\n{}", gw.log());
    assert_eq!(gw.proc.pid(), pid);
    assert!(
        gw.proc.running(),
        "the gateway must not exit on a full disk"
    );
    // Every acknowledged event is delivered, or counted under a reason. (An event evicted
    // to make room may have been delivered already, its PUBACK not yet committed: then it
    // is both, so the sum may pass what was acknowledged, never fall short.)
    assert!(
        delivered + min_free + full + overflow + age >= acked,
        "unaccounted events; log:\n{}",
        gw.log()
    );
    assert!(delivered <= acked);
    assert!(delivered > 0);
    assert!(
        forwarded_while_full > 0,
        "forwarding must go on while the disk is full"
    );

    // And it goes on: new events are stored and delivered.
    let before = sub.snapshot().len();
    let sim = run_sim(gw.mqtt_port, 1000, 0.0, &[]);
    assert_eq!(sim["acked"], 1000);
    assert!(
        sub.wait_for(Duration::from_secs(30), |g| g.len() >= before + 1000),
        "new events after recovery did not arrive; log:\n{}",
        gw.log()
    );
    gw.proc.terminate(Duration::from_secs(10));
}

/// `min_free` binds before the disk is full: the buffer counts as full at what it holds,
/// the oldest events make room (counted as `min_free`), and no commit ever fails.
#[test]
fn min_free_keeps_the_disk_from_filling() {
    let disk = Tmpfs::mount("6m");
    let port = free_port();
    let (_tmp, mut gw) = gateway_on(&disk, port);
    gw.launch();
    let sim = run_sim(
        gw.mqtt_port,
        40_000,
        0.0,
        &["--sensors", "20", "--payload-size", "200"],
    );
    let acked = sim["acked"].as_u64().unwrap();
    let drop = |r: &str| {
        m(
            &gw,
            &format!("tidepool_events_dropped_total{{reason=\"{r}\"}}"),
        )
    };
    assert!(wait(Duration::from_secs(30), || {
        m(&gw, "tidepool_events_ingested_total{source=\"mqtt\"}") + drop("ingest_overflow") >= acked
    }));
    let avail = disk.available();
    // The subscriber is in before the gateway's port opens, so no batch is acknowledged to
    // a broker nobody listens to yet.
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let _link = Proxy::start_on(port, up.port);
    assert!(wait(Duration::from_secs(60), || m(
        &gw,
        "tidepool_backlog_events"
    ) == 0));
    std::thread::sleep(Duration::from_millis(500));
    let delivered = sub.distinct_n().len() as u64;
    let (min_free, overflow) = (drop("min_free"), drop("ingest_overflow"));
    println!(
        "min_free: acked {acked}, delivered {delivered}, dropped min_free {min_free}, \
         ingest_overflow {overflow}; {avail} B left free on the 6 MiB disk; store errors {}",
        m(&gw, "tidepool_store_errors_total")
    );
    assert_eq!(acked, 40_000);
    assert!(
        min_free > 0,
        "6 MiB cannot hold 40,000 events of 250 B: min_free must bind"
    );
    // Kept to within about one commit group (redb's copy-on-write pages included).
    assert!(
        avail >= 128 * 1024,
        "min_free (1 MiB) must keep the disk from filling"
    );
    assert_eq!(m(&gw, "tidepool_store_errors_total"), 0);
    // (An event evicted while upstream drains may have been delivered already: never short.)
    assert!(
        delivered + min_free + overflow >= acked,
        "log:\n{}",
        gw.log()
    );
    assert!(delivered <= acked);
    assert_eq!(healthz(&gw), Some(200));
}

/// A store that stops answering (a card that hangs) while sensors keep publishing to the
/// embedded broker: nothing is acknowledged and nothing dropped while it hangs (the sensors
/// wait for their PUBACKs); once it answers again, every event is committed and acknowledged.
#[test]
fn a_stalled_store_in_embedded_mode_holds_the_sensors_back() {
    let tmp = tempfile::tempdir().unwrap();
    let stall = tmp.path().join("stall");
    // The sensor would keep 5,000 in flight; the broker's window (200) holds it back. (200
    // per commit is past what the default write budget lets through at this rate, 200 per
    // budget_max_wait: this test is about the stall, so it runs without a budget.)
    let mut gw = Gateway::configure(
        tmp.path().to_path_buf(),
        "[ingest.mqtt]\nreceive_maximum = 200\n\n[buffer]\nwrite_budget = \"0\"\n",
    );
    gw.set_env("TIDEPOOL_FAULT_STALL_FILE", stall.to_str().unwrap());
    gw.launch();
    std::fs::write(&stall, b"").unwrap();
    let log = tmp.path().join("acked.log");
    let mut sim = spawn_sim(
        gw.mqtt_port,
        20_000,
        0.0,
        &[
            "--sensors",
            "20",
            "--payload-size",
            "200",
            "--inflight",
            "5000",
            "--acked-log",
            log.to_str().unwrap(),
        ],
    );
    std::thread::sleep(Duration::from_secs(3));
    let acked_while_stalled = tidepool_e2e::kill_storm::acked_log(&log).len();
    let ingested_while_stalled = m(&gw, "tidepool_events_ingested_total{source=\"mqtt\"}");
    std::fs::remove_file(&stall).unwrap();
    let out = sim.child.take().unwrap().wait_with_output().unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let drop = |r: &str| {
        m(
            &gw,
            &format!("tidepool_events_dropped_total{{reason=\"{r}\"}}"),
        )
    };
    println!(
        "stalled store: {ingested_while_stalled} read, {acked_while_stalled} acknowledged while stalled; then acked {}",
        summary["acked"]
    );
    assert_eq!(
        acked_while_stalled, 0,
        "nothing is acknowledged before its commit"
    );
    assert!(
        ingested_while_stalled > 0 && ingested_while_stalled <= 200,
        "the broker reads no more than its window while nothing commits: {ingested_while_stalled} read"
    );
    assert_eq!(summary["acked"], 20_000, "log:\n{}", gw.log());
    assert_eq!(drop("ingest_overflow"), 0);
    assert!(wait(Duration::from_secs(10), || m(
        &gw,
        "tidepool_events_committed_total"
    ) == 20_000));
    assert_eq!(m(&gw, "tidepool_backlog_events"), 20_000);
}

/// A gateway started on a full disk opens its store without writing, and drains it.
#[test]
fn start_up_on_a_full_disk_opens_and_drains() {
    let disk = Tmpfs::mount("6m");
    let port = free_port();
    let (_tmp, mut gw) = gateway_on(&disk, port);
    gw.launch();
    assert_eq!(run_sim(gw.mqtt_port, 2000, 0.0, &[])["acked"], 2000);
    assert!(wait(Duration::from_secs(20), || m(
        &gw,
        "tidepool_backlog_events"
    ) == 2000));
    assert_eq!(gw.proc.terminate(Duration::from_secs(10)), Some(0));
    disk.fill("ballast");
    gw.launch();
    // The subscriber is in before the gateway's port opens, so no batch is acknowledged to
    // a broker nobody listens to yet.
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let _link = Proxy::start_on(port, up.port);
    assert!(
        sub.wait_for(Duration::from_secs(30), |g| g.len() >= 2000),
        "only {} arrived; log:\n{}",
        sub.snapshot().len(),
        gw.log()
    );
    assert_eq!(check_complete(&sub.snapshot(), 2000).0, 2000);
    gw.proc.terminate(Duration::from_secs(10));
}

/// A store written by the landed release (`tests/fixtures/store-v1.redb`: 40 buffered events,
/// one dead letter, the state of rule `10-count`) is upgraded at open and forwarded whole.
#[test]
fn a_store_from_the_landed_release_is_upgraded_and_forwarded() {
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::copy(
        root().join("tests/fixtures/store-v1.redb"),
        dir.join("data/tidepool.redb"),
    )
    .unwrap();
    // The same rule, now also showing its stored counter.
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::write(
        dir.join("rules/10-count.rhai"),
        "fn on_event(event) {\n let n = state_get(\"n\");\n if n == () { n = 0; }\n state_set(\"n\", n + 1);\n event.payload.count = n + 1;\n event\n}\n",
    )
    .unwrap();
    let mut gw = Gateway::configure(
        dir.clone(),
        &format!(
            "{}\n[rules]\ndir = \"{}\"\n",
            upstream_cfg(up.port),
            dir.join("rules").display()
        ),
    );
    gw.launch();
    assert!(
        sub.wait_for(Duration::from_secs(30), |g| g.len() >= 40),
        "the old store's events did not arrive; log:\n{}",
        gw.log()
    );
    let got = sub.snapshot();
    let ids: Vec<u64> = got.iter().map(|g| g.id).collect();
    assert_eq!(ids, (1..=40).collect::<Vec<_>>());
    let ns: Vec<u64> = got.iter().filter_map(|g| g.n).collect();
    assert_eq!(ns, (1..=40).collect::<Vec<_>>());
    assert_eq!(
        gw.metric("tidepool_dlq_events"),
        Some(1.0),
        "the dead letter survives"
    );
    // New events get new ids, and the rule's state carried over (41 calls before).
    let out = std::process::Command::new("mosquitto_pub")
        .args([
            "-p",
            &gw.mqtt_port.to_string(),
            "-q",
            "1",
            "-t",
            "sensors/1/temp",
        ])
        .args(["-m", "{\"n\":100}"])
        .status()
        .unwrap();
    assert!(out.success());
    assert!(sub.wait_for(Duration::from_secs(10), |g| g.len() >= 41));
    let last = sub.snapshot().pop().unwrap();
    assert_eq!(last.id, 41);
    assert_eq!(last.payload["count"], 42, "rule state from the old store");
    gw.proc.terminate(Duration::from_secs(10));
    // Reopened by this version: no second upgrade, still fine.
    gw.launch();
    assert_eq!(gw.metric("tidepool_dlq_events"), Some(1.0));
    gw.proc.terminate(Duration::from_secs(10));
}

/// Peak RSS of a process, from /proc (kB → bytes).
fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// A flood of 64 KiB payloads while the store is slowed by a full buffer: memory stays
/// bounded by bytes, well under the unit's `MemoryMax=256M`.
#[test]
fn a_flood_of_64k_payloads_keeps_memory_bounded() {
    let port = free_port();
    let gw = Gateway::start(&format!(
        "{}\n[buffer]\nmax_bytes = \"64MiB\"\ncommit_max_events = 2000\ncommit_max_wait = \"50ms\"\n",
        upstream_cfg(port)
    ));
    let pid = gw.proc.pid();
    let sim = run_sim(
        gw.mqtt_port,
        3000,
        0.0,
        &["--sensors", "20", "--payload-size", "60000"],
    );
    let acked = sim["acked"].as_u64().unwrap();
    assert!(wait(Duration::from_secs(60), || {
        m(&gw, "tidepool_events_committed_total")
            + m(
                &gw,
                "tidepool_events_dropped_total{reason=\"ingest_overflow\"}",
            )
            >= acked
    }));
    let rss = peak_rss(pid);
    println!(
        "64 KiB flood: {acked} acknowledged, {} committed, {} ingest_overflow, peak RSS {:.1} MiB",
        m(&gw, "tidepool_events_committed_total"),
        m(
            &gw,
            "tidepool_events_dropped_total{reason=\"ingest_overflow\"}"
        ),
        rss as f64 / 1048576.0
    );
    assert!(rss > 0);
    assert!(
        rss < 160 << 20,
        "peak RSS {} MiB is too close to MemoryMax=256M",
        rss >> 20
    );
}
