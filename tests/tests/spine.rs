//! The spine, end to end: simulator → gateway → real Mosquitto upstream.

use std::time::Duration;

use tidepool_e2e::kill_storm::{self, KillStorm};
use tidepool_e2e::*;

fn upstream_cfg(port: u16) -> String {
    format!(
        "[upstream]\nurl = \"mqtt://127.0.0.1:{port}\"\nbatch_max_wait = \"100ms\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n"
    )
}

const TOPIC: &str = "tidepool/test-gw/events";

#[test]
fn online_all_events_arrive_with_rising_ids() {
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let gw = Gateway::start(&upstream_cfg(up.port));
    let sim = run_sim(gw.mqtt_port, 20_000, 0.0, &["--sensors", "20"]);
    assert_eq!(sim["acked"], 20_000);
    assert!(
        sub.wait_for(Duration::from_secs(60), |g| g.len() >= 20_000),
        "only {} arrived; log:\n{}",
        sub.got.lock().unwrap().len(),
        gw.log()
    );
    let got = sub.snapshot();
    let (distinct, dups) = check_complete(&got, 20_000);
    assert_eq!((distinct, dups), (20_000, 0));
    // Ids strictly increase in batch order, and batches number upward.
    for w in got.windows(2) {
        assert!(
            w[1].id > w[0].id,
            "ids not rising: {} then {}",
            w[0].id,
            w[1].id
        );
        assert!(w[1].batch >= w[0].batch);
    }
    // The payload arrives as JSON, with the event fields of the contract.
    let e = &got[0].event;
    for k in ["id", "ts", "source", "topic", "payload"] {
        assert!(e.get(k).is_some(), "missing {k} in {e}");
    }
    assert!(e["topic"].as_str().unwrap().starts_with("sensors/"));
    assert_eq!(gw.metric("tidepool_events_forwarded_total"), Some(20_000.0));
    assert!(gw.wait_metric("tidepool_backlog_events", 0.0, Duration::from_secs(15)));
    // Liveness: retained `online`.
    let status = Subscriber::start(up.port, &["tidepool/test-gw/status"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        status
            .other
            .lock()
            .unwrap()
            .get("tidepool/test-gw/status")
            .and_then(|v| v.last().cloned()),
        Some("online".to_string())
    );
}

#[test]
fn offline_then_online_delivers_everything_once() {
    let port = free_port();
    let gw = Gateway::start(&upstream_cfg(port));
    let sim = run_sim(gw.mqtt_port, 20_000, 0.0, &[]);
    assert_eq!(sim["acked"], 20_000);
    // Everything is committed and buffered while upstream is down.
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while gw.metric("tidepool_backlog_events") != Some(20_000.0)
        && std::time::Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gw.metric("tidepool_backlog_events"), Some(20_000.0));
    assert_eq!(gw.metric("tidepool_upstream_connected"), Some(0.0));
    assert_eq!(gw.status()["upstream"]["state"], "offline");

    // Upstream comes up behind the port the gateway dials only once the subscriber is in.
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let _link = Proxy::start_on(port, up.port);
    assert!(
        sub.wait_for(Duration::from_secs(60), |g| g.len() >= 20_000),
        "only {} arrived",
        sub.got.lock().unwrap().len()
    );
    std::thread::sleep(Duration::from_millis(500));
    let (distinct, dups) = check_complete(&sub.snapshot(), 20_000);
    assert_eq!(
        (distinct, dups),
        (20_000, 0),
        "no duplicates when nothing crashed"
    );
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while gw.metric("tidepool_backlog_events") != Some(0.0) && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gw.metric("tidepool_backlog_events"), Some(0.0));
}

#[test]
fn client_mode_survives_kill9_at_random_moments() {
    let ingress = Mosquitto::start("");
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let cfg = format!(
        "[ingest.mqtt]\nmode = \"client\"\nbroker = \"mqtt://127.0.0.1:{}\"\ntopics = [\"sensors/#\"]\n\n{}",
        ingress.port,
        upstream_cfg(up.port)
    );
    let mut gw = Gateway::start(&cfg);
    // Let the gateway's persistent session subscribe before the sensors publish.
    std::thread::sleep(Duration::from_millis(500));
    let mut sim = spawn_sim(ingress.port, 20_000, 2_000.0, &[]);
    let kills = KillStorm::default().run(&mut gw);
    let out = sim.child.take().unwrap().wait_with_output().unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        summary["acked"], 20_000,
        "the ingress broker took every event"
    );
    assert!(
        sub.wait_for(Duration::from_secs(90), |g| {
            g.iter()
                .filter_map(|x| x.n)
                .collect::<std::collections::HashSet<_>>()
                .len()
                >= 20_000
        }),
        "only {} distinct arrived after {kills} kills; log:\n{}",
        sub.distinct_n().len(),
        gw.log()
    );
    let (distinct, dups) = check_complete(&sub.snapshot(), 20_000);
    assert_eq!(distinct, 20_000);
    eprintln!("client mode: {kills} kill -9, 20000 events, {dups} duplicate deliveries (same ids)");
}

/// Embedded mode: a sensor's PUBACK comes after the commit, so every event the simulator was
/// acknowledged for arrives upstream, whatever moment the gateway is killed at.
#[test]
fn embedded_every_acknowledged_event_survives_a_kill9_storm() {
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let mut gw = Gateway::start(&upstream_cfg(up.port));
    let log = gw.dir.join("acked.log");
    let mut sim = spawn_sim(
        gw.mqtt_port,
        1_000_000,
        5_000.0,
        &["--client-id", "storm", "--acked-log", log.to_str().unwrap()],
    );
    let storm = KillStorm {
        kills: 5,
        up_ms: 800..1600,
        ..KillStorm::default()
    };
    let kills = storm.run(&mut gw);
    std::thread::sleep(Duration::from_millis(1500));
    sim.kill9();
    let acked = kill_storm::acked_log(&log);
    assert!(
        acked.len() > 5_000,
        "the storm must be tested under load: only {} acknowledged; log:\n{}",
        acked.len(),
        gw.log()
    );
    let arrived = |g: &[Got]| {
        let got: std::collections::HashSet<u64> = g.iter().filter_map(|x| x.n).collect();
        acked.iter().filter(|n| !got.contains(n)).count()
    };
    sub.wait_for(Duration::from_secs(60), |g| arrived(g) == 0);
    let missing = arrived(&sub.snapshot());
    assert_eq!(
        missing,
        0,
        "{missing} of {} acknowledged events never arrived after {kills} kills; log:\n{}",
        acked.len(),
        gw.log()
    );
    eprintln!(
        "embedded: {kills} kill -9, {} events acknowledged, all arrived upstream",
        acked.len()
    );
}

#[test]
fn embedded_kill9_never_reuses_ids() {
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let mut gw = Gateway::start(&upstream_cfg(up.port));
    run_sim(gw.mqtt_port, 3_000, 0.0, &["--client-id", "a"]);
    assert!(sub.wait_for(Duration::from_secs(30), |g| g.len() >= 3_000));
    let max_before = sub.snapshot().iter().map(|g| g.id).max().unwrap();
    gw.proc.kill9();
    // `status` reads the store of a crashed daemon (it needs a repair first).
    let out = gw.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "status after kill -9: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(v["running"], false);
    assert!(v["next_id"].as_u64().unwrap() > max_before);
    gw.launch();
    run_sim(
        gw.mqtt_port,
        1_000,
        0.0,
        &["--client-id", "b", "--seed", "2"],
    );
    // What the second sensor sent (source `mqtt:b`); after the kill, events delivered but
    // not yet deleted come again too, under their old ids (at least once).
    let from_b = |g: &[Got]| -> Vec<u64> {
        g.iter()
            .filter(|x| x.event["source"] == "mqtt:b")
            .map(|x| x.id)
            .collect()
    };
    assert!(sub.wait_for(Duration::from_secs(30), |g| from_b(g).len() >= 1_000));
    let after = from_b(&sub.snapshot());
    assert!(
        after.iter().all(|id| *id > max_before),
        "an id was reused after kill -9"
    );
    assert!(
        sub.snapshot()
            .iter()
            .filter(|x| x.event["source"] != "mqtt:b")
            .all(|x| x.id <= max_before),
        "what came again kept its id"
    );
}

#[test]
fn lost_upstream_session_neither_loses_nor_stalls() {
    let mut up = Mosquitto::start("");
    // The gateway reaches the broker through a proxy, so the test can subscribe to a restarted
    // broker before the gateway reconnects (else the test, not the gateway, would miss batches).
    let proxy = Proxy::start(up.port);
    let gw = Gateway::start(&format!(
        "{}max_inflight = 16\nbatch_max_events = 100\n",
        upstream_cfg(proxy.port)
    ));
    let mut sim = spawn_sim(gw.mqtt_port, 20_000, 4_000.0, &[]);
    let sub = std::cell::RefCell::new(Subscriber::start(up.port, &[TOPIC]));
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1200));
        // The link drops with batches in flight, then the broker restarts without persistence:
        // the session and everything unacknowledged are gone. (The link is cut first so that
        // what this broker did acknowledge reaches the test's subscriber before it dies.)
        proxy.sever();
        std::thread::sleep(Duration::from_millis(300));
        for g in sub.borrow().snapshot() {
            seen.insert(g.n.unwrap(), g.id);
        }
        up.restart();
        *sub.borrow_mut() = Subscriber::start(up.port, &[TOPIC]);
        proxy.set_open(true);
    }
    let _ = sim.child.take().unwrap().wait();
    let ok = sub.borrow().wait_for(Duration::from_secs(60), |g| {
        let mut all: std::collections::BTreeSet<u64> = seen.keys().copied().collect();
        all.extend(g.iter().filter_map(|x| x.n));
        all.len() >= 20_000
    });
    for g in sub.borrow().snapshot() {
        if let Some(id) = seen.get(&g.n.unwrap()) {
            assert_eq!(*id, g.id, "a redelivery carries the same id");
        }
        seen.insert(g.n.unwrap(), g.id);
    }
    assert!(
        ok,
        "only {} of 20000 arrived; log:\n{}",
        seen.len(),
        gw.log()
    );
    assert_eq!(gw.metric("tidepool_upstream_connected"), Some(1.0));
}

#[test]
fn caps_drop_oldest_counted_and_the_rest_arrive_later() {
    let mut gw = Gateway::start("[buffer]\nmax_bytes = \"64KiB\"\nwhen_full = \"drop_oldest\"\n");
    run_sim(gw.mqtt_port, 2_000, 0.0, &["--sensors", "1"]);
    std::thread::sleep(Duration::from_millis(500));
    let backlog = gw.metric("tidepool_backlog_events").unwrap() as u64;
    let dropped = gw
        .metric("tidepool_events_dropped_total{reason=\"buffer_full\"}")
        .unwrap() as u64;
    assert!(backlog > 100 && backlog < 2_000, "backlog {backlog}");
    assert_eq!(backlog + dropped, 2_000, "every drop is counted");
    assert!(gw.metric("tidepool_backlog_bytes").unwrap() <= 65536.0);
    assert_eq!(gw.proc.terminate(Duration::from_secs(15)), Some(0));
    // The store keeps the counters for `status` with the daemon stopped.
    let st = gw.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["running"], false);
    assert_eq!(v["backlog_events"], backlog);
    assert_eq!(v["dropped"]["buffer_full"], dropped);

    // Now an upstream appears: the newest `backlog` events arrive.
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let text = std::fs::read_to_string(&gw.config).unwrap() + upstream_cfg(up.port).as_str();
    std::fs::write(&gw.config, text).unwrap();
    gw.launch();
    assert!(sub.wait_for(Duration::from_secs(30), |g| g.len() as u64 >= backlog));
    let ns = sub.distinct_n();
    assert_eq!(ns.len() as u64, backlog);
    assert_eq!(
        *ns.iter().next().unwrap(),
        2_000 - backlog,
        "the oldest went first"
    );
    assert_eq!(*ns.iter().last().unwrap(), 1_999);
}

/// `reject_new` keeps the oldest and refuses the rest: a refused event is counted and never
/// acknowledged (an MQTT 3.1.1 sensor's connection is closed instead), so every event the
/// sensor was acknowledged for is stored.
#[test]
fn caps_reject_new_keeps_the_oldest() {
    let gw = Gateway::start("[buffer]\nmax_bytes = \"64KiB\"\nwhen_full = \"reject_new\"\n");
    let log = gw.dir.join("acked.log");
    run_sim(
        gw.mqtt_port,
        2_000,
        0.0,
        &["--sensors", "1", "--acked-log", log.to_str().unwrap()],
    );
    std::thread::sleep(Duration::from_millis(500));
    let backlog = gw.metric("tidepool_backlog_events").unwrap() as u64;
    let dropped = gw
        .metric("tidepool_events_dropped_total{reason=\"buffer_full\"}")
        .unwrap() as u64;
    let acked = kill_storm::acked_log(&log);
    assert!(
        dropped > 0 && backlog > 0,
        "backlog {backlog}, dropped {dropped}"
    );
    // The first `backlog` events are the ones stored (the oldest kept); none after them was
    // acknowledged. (A PUBACK written just before a refusal closed the connection may never
    // be read by the sensor: acknowledged events are a subset of the stored ones.)
    assert!(!acked.is_empty());
    assert!(
        acked.iter().all(|n| *n < backlog),
        "an event past the {backlog} stored was acknowledged: {:?}",
        acked.iter().rev().take(3).collect::<Vec<_>>()
    );
    let v = gw.status();
    assert_eq!(v["backlog_events"], backlog);
}

#[test]
fn sigterm_stops_cleanly_and_quickly_keeping_what_was_committed() {
    let mut gw = Gateway::start("");
    let mut sim = spawn_sim(gw.mqtt_port, 1_000_000, 3_000.0, &[]);
    std::thread::sleep(Duration::from_millis(1500));
    let started = std::time::Instant::now();
    let code = gw.proc.terminate(Duration::from_secs(15));
    assert_eq!(code, Some(0), "log:\n{}", gw.log());
    assert!(started.elapsed() < Duration::from_secs(12));
    sim.kill9();
    let log = gw.log();
    let committed: u64 = log
        .lines()
        .rev()
        .find(|l| l.contains("stopped") && l.contains("committed="))
        .and_then(|l| l.split("committed=").nth(1))
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .expect("final log line with committed=");
    assert!(committed > 0);
    let st = gw.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(
        v["backlog_events"], committed,
        "everything committed is in the store"
    );
}

/// The default write budget at work: a sustained load widens the commit window, so far fewer
/// commits than events are made; nothing is lost; `status` shows the forecast in words. The
/// same load without a budget commits about once per event.
#[test]
fn the_write_budget_widens_the_commit_window_under_sustained_load() {
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let gw = Gateway::start(&upstream_cfg(up.port));
    // 12 s at 200 events/s from 10 sensors.
    let sim = run_sim(gw.mqtt_port, 2_400, 200.0, &["--sensors", "10"]);
    assert_eq!(sim["acked"], 2_400);
    assert!(sub.wait_for(Duration::from_secs(30), |g| g.len() >= 2_400));
    check_complete(&sub.snapshot(), 2_400);
    let commits = gw.metric("tidepool_store_commits_total").unwrap();
    let written = gw.metric("tidepool_store_bytes_written_total").unwrap();
    eprintln!("budget: {commits} commits for 2,400 events, {written} B written");
    assert!(written > 0.0);
    let out = gw.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    // A forecast takes a minute of samples; until then status says it is measuring.
    assert!(text.contains("wear      measuring"), "{text}");

    // The same without a budget.
    let up2 = Mosquitto::start("");
    let sub2 = Subscriber::start(up2.port, &[TOPIC]);
    let gw2 = Gateway::start(&format!(
        "{}\n[buffer]\nwrite_budget = \"0\"\n",
        upstream_cfg(up2.port)
    ));
    run_sim(gw2.mqtt_port, 600, 200.0, &["--sensors", "10"]);
    assert!(sub2.wait_for(Duration::from_secs(30), |g| g.len() >= 600));
    let commits2 = gw2.metric("tidepool_store_commits_total").unwrap();
    // Per event, the budget commits a small fraction of what the same load commits without
    // one (a slow disk makes bigger groups in both).
    let (with, without) = (commits / 2_400.0, commits2 / 600.0);
    assert!(
        with * 5.0 < without,
        "the spent budget must widen the window: {commits} commits for 2,400 events with it, {commits2} for 600 without"
    );
}
