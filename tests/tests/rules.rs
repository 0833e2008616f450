//! Rules in the running gateway: publish, state across restarts and crashes, failures, DLQ,
//! hot reload.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::{Client, MqttOptions, QoS};
use tidepool_e2e::*;

const TOPIC: &str = "tidepool/test-gw/events";

fn with_rules(dir: &Path, up_port: Option<u16>, extra: &str) -> String {
    let mut s = format!(
        "[rules]\ndir = \"{}\"\ntick = \"500ms\"\n{extra}\n",
        dir.display()
    );
    if let Some(p) = up_port {
        s.push_str(&format!(
            "[upstream]\nurl = \"mqtt://127.0.0.1:{p}\"\nbatch_max_wait = \"100ms\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n"
        ));
    }
    s
}

fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

#[test]
fn publish_reaches_local_subscribers_and_is_not_ingested_back() {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(
        rules.path().join("10-alert.rhai"),
        r#"fn on_event(e) { if e.payload.celsius > 30.0 { publish("alerts/hot", #{ c: e.payload.celsius }); } e }"#,
    )
    .unwrap();
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    // topics = ["#"]: the gateway would see its own publish if it did not skip it.
    let gw = Gateway::start(&with_rules(rules.path(), Some(up.port), ""));
    let local = Subscriber::start(gw.mqtt_port, &["alerts/#"]);
    let (c, mut conn) = Client::new(MqttOptions::new("s1", "127.0.0.1", gw.mqtt_port), 10);
    std::thread::spawn(move || for _ in conn.iter() {});
    c.publish(
        "sensors/1/temperature",
        QoS::AtLeastOnce,
        false,
        r#"{"celsius":35.5}"#,
    )
    .unwrap();
    c.publish(
        "sensors/1/temperature",
        QoS::AtLeastOnce,
        false,
        r#"{"celsius":20.0}"#,
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(10), || local
        .other
        .lock()
        .unwrap()
        .contains_key("alerts/hot")));
    assert_eq!(
        local.other.lock().unwrap()["alerts/hot"],
        vec![r#"{"c":35.5}"#.to_string()]
    );
    assert!(sub.wait_for(Duration::from_secs(10), |g| g.len() >= 2));
    std::thread::sleep(Duration::from_millis(500));
    let got = sub.snapshot();
    assert_eq!(
        got.len(),
        2,
        "the alert was not ingested back: {:?}",
        got.iter().map(|g| &g.event).collect::<Vec<_>>()
    );
    assert_eq!(
        gw.metric("tidepool_events_ingested_total{source=\"mqtt\"}"),
        Some(2.0)
    );
}

const COUNTER: &str = r#"
const TOPICS = ["sensors/#"];
fn on_event(e) {
    let n = state_get("count");
    if n == () { n = 0; }
    n += 1;
    state_set("count", n);
    e.payload.count = n;
    e
}
"#;

#[test]
fn state_survives_a_restart() {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("10-count.rhai"), COUNTER).unwrap();
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let mut gw = Gateway::start(&with_rules(rules.path(), Some(up.port), ""));
    run_sim(gw.mqtt_port, 100, 0.0, &["--client-id", "a"]);
    assert!(sub.wait_for(Duration::from_secs(20), |g| g.len() >= 100));
    assert_eq!(gw.proc.terminate(Duration::from_secs(15)), Some(0));
    gw.launch();
    run_sim(gw.mqtt_port, 50, 0.0, &["--client-id", "b"]);
    assert!(sub.wait_for(Duration::from_secs(20), |g| g.len() >= 150));
    let counts: Vec<u64> = sub
        .snapshot()
        .iter()
        .map(|g| g.payload["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, (1..=150).collect::<Vec<_>>());
}

#[test]
fn counting_rule_under_kill9_never_double_counts_or_forgets() {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("10-count.rhai"), COUNTER).unwrap();
    let ingress = Mosquitto::start("");
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let extra = format!(
        "[ingest.mqtt]\nmode = \"client\"\nbroker = \"mqtt://127.0.0.1:{}\"\ntopics = [\"sensors/#\"]\n",
        ingress.port
    );
    let mut gw = Gateway::start(&with_rules(rules.path(), Some(up.port), &extra));
    std::thread::sleep(Duration::from_millis(500));
    let mut sim = spawn_sim(ingress.port, 10_000, 2_000.0, &[]);
    let mut rng = fastrand::Rng::with_seed(77);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(rng.u64(300..1000)));
        gw.proc.kill9();
        std::thread::sleep(Duration::from_millis(rng.u64(50..300)));
        gw.launch();
    }
    let _ = sim.child.take().unwrap().wait();
    assert!(
        sub.wait_for(Duration::from_secs(60), |g| {
            g.iter().filter_map(|x| x.n).collect::<HashSet<_>>().len() >= 10_000
        }),
        "log:\n{}",
        gw.log()
    );
    // Every committed event carries the count of events committed up to and including it:
    // by id, counts are exactly 1, 2, 3, ... (a redelivery repeats an id with its count).
    let mut by_id: BTreeMap<u64, u64> = BTreeMap::new();
    for g in sub.snapshot() {
        let c = g.payload["count"].as_u64().unwrap();
        if let Some(prev) = by_id.insert(g.id, c) {
            assert_eq!(prev, c, "id {} delivered twice with different counts", g.id);
        }
    }
    let counts: Vec<u64> = by_id.values().copied().collect();
    assert_eq!(
        counts,
        (1..=by_id.len() as u64).collect::<Vec<_>>(),
        "count == events committed"
    );
    assert_eq!(
        by_id.len(),
        10_000,
        "each event committed once (client mode, redeliveries deduplicated)"
    );
}

#[test]
fn failing_rules_dead_letter_while_the_rest_flows_and_dlq_retry_drop() {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(
        rules.path().join("10-bad.rhai"),
        "const TOPICS = [\"bad/#\"];\nfn on_event(e) { if e.payload.mode == \"loop\" { loop {} } throw \"no good\"; }",
    )
    .unwrap();
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let gw = Gateway::start(&with_rules(rules.path(), Some(up.port), ""));
    let (c, mut conn) = Client::new(MqttOptions::new("s1", "127.0.0.1", gw.mqtt_port), 100);
    std::thread::spawn(move || for _ in conn.iter() {});
    for i in 0..20 {
        let mode = if i % 2 == 0 { "loop" } else { "throw" };
        c.publish(
            "bad/1",
            QoS::AtLeastOnce,
            false,
            format!("{{\"mode\":\"{mode}\",\"i\":{i}}}"),
        )
        .unwrap();
    }
    // Meanwhile everything else flows.
    run_sim(gw.mqtt_port, 500, 0.0, &[]);
    assert!(
        sub.wait_for(Duration::from_secs(30), |g| g.len() >= 500),
        "log:\n{}",
        gw.log()
    );
    assert!(wait_until(Duration::from_secs(20), || gw
        .metric("tidepool_dlq_events")
        == Some(20.0)));
    assert_eq!(
        gw.metric("tidepool_rule_errors_total{rule=\"10-bad\"}"),
        Some(20.0)
    );
    let out = gw.cli(&["dlq", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 20);
    assert_eq!(list[0]["rule"], "10-bad");
    assert!(
        list[0]["error"].as_str().unwrap().contains("time budget")
            || list[0]["error"].as_str().unwrap().contains("operations"),
        "{}",
        list[0]
    );
    assert!(list[1]["error"].as_str().unwrap().contains("no good"));
    assert!(
        wait_until(Duration::from_secs(5), || gw.status()["rules"][0]["errors"]
            == 20),
        "{}",
        gw.status()
    );
    // Fix the rule, retry two of them, drop the rest.
    std::fs::write(
        rules.path().join("10-bad.rhai"),
        "const TOPICS = [\"bad/#\"];\nfn on_event(e) { e.payload.fixed = true; e }",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(2500)); // hot reload picks it up
    let ids: Vec<String> = list.as_array().unwrap()[..2]
        .iter()
        .map(|d| d["id"].to_string())
        .collect();
    let out = gw.cli(&["dlq", "retry", "--id", &ids[0], "--id", &ids[1]]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("retried 2"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(sub.wait_for(Duration::from_secs(10), |g| g
        .iter()
        .filter(|x| x.payload["fixed"] == true)
        .count()
        == 2));
    let out = gw.cli(&["dlq", "drop"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("dropped 18"));
    assert_eq!(gw.metric("tidepool_dlq_events"), Some(0.0));
}

/// Records which version processed an event; `VER` is replaced (`1 +`: a syntax error).
const VERSION: &str = "fn on_event(e) { let s = e.payload.seen; if s == () { s = []; } s.push(VER); e.payload.seen = s; e }";

#[test]
fn hot_reload_under_load_no_event_by_neither_or_both_and_broken_versions_refused() {
    let rules = tempfile::tempdir().unwrap();
    let rule = rules.path().join("10-version.rhai");
    std::fs::write(&rule, VERSION.replace("VER", "1")).unwrap();
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let gw = Gateway::start(&with_rules(rules.path(), Some(up.port), ""));
    let mut sim = spawn_sim(gw.mqtt_port, 8_000, 2_000.0, &[]);
    std::thread::sleep(Duration::from_millis(1500));
    // A broken version is refused; version 1 keeps running.
    std::fs::write(&rule, VERSION.replace("VER", "1 +")).unwrap();
    assert!(wait_until(Duration::from_secs(5), || gw.status()["rules"]
        [0]["refused_update"]
        .is_string()));
    assert_eq!(
        gw.metric("tidepool_rule_reload_errors_total{rule=\"10-version\"}"),
        Some(1.0)
    );
    std::fs::write(&rule, VERSION.replace("VER", "2")).unwrap();
    let _ = sim.child.take().unwrap().wait();
    assert!(sub.wait_for(Duration::from_secs(30), |g| g.len() >= 8_000));
    let got = sub.snapshot();
    let versions: Vec<i64> = got
        .iter()
        .map(|g| {
            let seen = g.payload["seen"]
                .as_array()
                .expect("every event went through a version");
            assert_eq!(
                seen.len(),
                1,
                "processed by exactly one version: {}",
                g.payload
            );
            seen[0].as_i64().unwrap()
        })
        .collect();
    let first_v2 = versions
        .iter()
        .position(|v| *v == 2)
        .expect("version 2 took over");
    assert!(versions[..first_v2].iter().all(|v| *v == 1));
    assert!(
        versions[first_v2..].iter().all(|v| *v == 2),
        "no event went back to version 1"
    );
    assert!(gw.status()["rules"][0]["refused_update"].is_null());
}

#[test]
fn denial_of_service_rules_fail_fast_other_events_flow_rss_bounded() {
    let rules = tempfile::tempdir().unwrap();
    let cases = [
        ("loop", "loop {}"),
        ("recursion", "f(0)"),
        ("string", "let s = \"x\"; loop { s += s; }"),
        ("array", "let a = []; loop { a.push(a.len()); }"),
        (
            "map",
            "let m = #{}; let i = 0; loop { m[`k${i}`] = i; i += 1; }",
        ),
        (
            "closures",
            "let fs = []; for i in 0..1000000 { fs.push(|x| x + i); } e",
        ),
        ("sleep", "sleep(10); e"),
    ];
    for (name, body) in cases {
        std::fs::write(
            rules.path().join(format!("10-{name}.rhai")),
            format!("const TOPICS = [\"dos/{name}\"];\nfn f(n) {{ f(n + 1) }}\nfn on_event(e) {{ {body} }}\n"),
        )
        .unwrap();
    }
    // Refused at compile time, the others keep running.
    std::fs::write(
        rules.path().join("20-eval.rhai"),
        "fn on_event(e) { eval(\"e\") }",
    )
    .unwrap();
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let gw = Gateway::start(&with_rules(rules.path(), Some(up.port), ""));
    let (c, mut conn) = Client::new(MqttOptions::new("attacker", "127.0.0.1", gw.mqtt_port), 200);
    std::thread::spawn(move || for _ in conn.iter() {});
    for (name, _) in cases {
        for i in 0..5 {
            c.publish(
                format!("dos/{name}"),
                QoS::AtLeastOnce,
                false,
                format!("{{\"i\":{i}}}"),
            )
            .unwrap();
        }
    }
    run_sim(gw.mqtt_port, 1_000, 0.0, &[]);
    assert!(
        sub.wait_for(Duration::from_secs(60), |g| g.len() >= 1_000),
        "log:\n{}",
        gw.log()
    );
    let expected = (cases.len() * 5) as f64;
    assert!(
        wait_until(Duration::from_secs(60), || gw.metric("tidepool_dlq_events")
            == Some(expected)),
        "dlq {:?}",
        gw.metric("tidepool_dlq_events")
    );
    let status = gw.status();
    let refused = status["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "20-eval")
        .unwrap();
    assert!(
        refused["refused_update"].as_str().unwrap().contains("eval"),
        "{refused}"
    );
    let hwm_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", gw.proc.pid()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        hwm_kib < 200 * 1024,
        "peak RSS {hwm_kib} KiB: a rule was not bounded"
    );
    eprintln!("DoS suite: peak RSS {} MiB", hwm_kib / 1024);
}
