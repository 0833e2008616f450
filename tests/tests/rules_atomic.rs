//! Rules are all or nothing per input: a rule that fails leaves no state write, no publish
//! and no output of its input (nor of the rules before it on that input); the dead letter
//! keeps the original input; `dlq retry` runs the whole chain on it once. Under
//! `tidepool rules test` and live. Plus the dead-letter queue's own cap under a flood.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rumqttc::{Client, MqttOptions, QoS};
use serde_json::{json, Value};
use tidepool_e2e::*;

const TOPIC: &str = "tidepool/test-gw/events";

/// Counts every input in state, publishes the count, then throws on `fail` inputs.
const COUNT_THEN_THROW: &str = r#"
fn on_event(e) {
    let n = state_get("n");
    if n == () { n = 0; }
    state_set("n", n + 1);
    publish("counts/seen", #{ n: n + 1 });
    if e.payload.fail == true { throw "bad input"; }
    e.payload.n = n + 1;
    e
}
"#;

/// The first of a chain: changes the event and counts in state.
const STAGE: &str = r#"
fn on_event(e) {
    let k = state_get("k");
    if k == () { k = 0; }
    state_set("k", k + 1);
    e.payload.stage = k + 1;
    e
}
"#;

/// The second: throws on `fail` inputs.
const CHECK: &str = r#"fn on_event(e) { if e.payload.fail == true { throw "check failed"; } e }"#;

fn rules_test(rules: &Path, events: &Path) -> (String, String, bool) {
    let out = Command::new(bin_dir().join("tidepool"))
        .args(["rules", "test"])
        .arg(rules)
        .arg("--events")
        .arg(events)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
        out.status.success(),
    )
}

fn write_events(dir: &Path, payloads: &[Value]) -> std::path::PathBuf {
    let p = dir.join("events.jsonl");
    let text: String = payloads
        .iter()
        .map(|v| format!("{}\n", json!({"topic": "sensors/1/t", "payload": v})))
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn rules_test_a_failed_input_leaves_no_state_write_and_no_publish() {
    let dir = tempfile::tempdir().unwrap();
    let rule = dir.path().join("10-count.rhai");
    std::fs::write(&rule, COUNT_THEN_THROW).unwrap();
    let events = write_events(
        dir.path(),
        &[
            json!({"i": 0}),
            json!({"i": 1, "fail": true}),
            json!({"i": 2}),
            json!({"i": 3}),
        ],
    );
    let (out, err, ok) = rules_test(&rule, &events);
    assert!(ok, "{out}{err}");
    eprintln!("rules test output:\n{out}");
    let publishes: Vec<&str> = out.lines().filter(|l| l.contains("publish")).collect();
    assert_eq!(
        publishes.len(),
        3,
        "no publish for the failing input: {out}"
    );
    for (i, n) in [1, 2, 3].iter().enumerate() {
        assert!(
            publishes[i].contains(&format!("{{\"n\":{n}}}")),
            "counter never jumps over the failing input: {out}"
        );
    }
    assert!(
        out.contains("dead letter (10-count): ") && out.contains("bad input"),
        "{out}"
    );
    let ns: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("changed:"))
        .map(|l| l.split("\"n\":").nth(1).unwrap().trim_end_matches('}'))
        .collect();
    assert_eq!(ns, vec!["1", "2", "3"], "{out}");
}

#[test]
fn rules_test_a_chain_failing_in_its_second_rule_keeps_the_original_input() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(rules.join("10-stage.rhai"), STAGE).unwrap();
    std::fs::write(rules.join("20-check.rhai"), CHECK).unwrap();
    let events = write_events(
        dir.path(),
        &[
            json!({"i": 0}),
            json!({"i": 1, "fail": true}),
            json!({"i": 2}),
        ],
    );
    let (out, err, ok) = rules_test(&rules, &events);
    assert!(ok, "{out}{err}");
    eprintln!("rules test output:\n{out}");
    assert!(out.contains("dead letter (20-check): "), "{out}");
    assert!(
        out.contains("input kept: sensors/1/t {\"fail\":true,\"i\":1}"),
        "the dead letter holds the original input, not 10-stage's output: {out}"
    );
    let stages: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("changed:"))
        .map(|l| l.split("\"stage\":").nth(1).unwrap().trim_end_matches('}'))
        .collect();
    assert_eq!(
        stages,
        vec!["1", "2"],
        "10-stage's write for the failed input was not kept: {out}"
    );
}

fn with_rules(dir: &Path, up_port: u16, extra: &str) -> String {
    format!(
        "[rules]\ndir = \"{}\"\n{extra}\n[upstream]\nurl = \"mqtt://127.0.0.1:{up_port}\"\nbatch_max_wait = \"100ms\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n",
        dir.display()
    )
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

fn publisher(port: u16, id: &str) -> Client {
    let (c, mut conn) = Client::new(MqttOptions::new(id, "127.0.0.1", port), 100);
    std::thread::spawn(move || for _ in conn.iter() {});
    c
}

fn dlq_list(gw: &Gateway) -> Vec<Value> {
    let out = gw.cli(&["dlq", "list", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "dlq list: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v.as_array().unwrap().clone()
}

#[test]
fn live_a_failed_input_leaves_no_state_write_no_publish_and_no_output() {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("10-count.rhai"), COUNT_THEN_THROW).unwrap();
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let gw = Gateway::start(&with_rules(rules.path(), up.port, ""));
    let local = Subscriber::start(gw.mqtt_port, &["counts/#"]);
    let c = publisher(gw.mqtt_port, "s1");
    for i in 0..10 {
        let p = if i == 3 || i == 7 {
            json!({"i": i, "fail": true})
        } else {
            json!({"i": i})
        };
        c.publish("sensors/1/t", QoS::AtLeastOnce, false, p.to_string())
            .unwrap();
    }
    assert!(
        sub.wait_for(Duration::from_secs(15), |g| g.len() >= 8),
        "log:\n{}",
        gw.log()
    );
    assert!(wait_until(Duration::from_secs(10), || gw
        .metric("tidepool_dlq_events")
        == Some(2.0)));
    std::thread::sleep(Duration::from_millis(300));
    let mut got: Vec<(u64, u64)> = sub
        .snapshot()
        .iter()
        .map(|g| {
            (
                g.payload["i"].as_u64().unwrap(),
                g.payload["n"].as_u64().unwrap(),
            )
        })
        .collect();
    got.sort();
    let publishes = local
        .other
        .lock()
        .unwrap()
        .get("counts/seen")
        .cloned()
        .unwrap_or_default();
    eprintln!("upstream (i, n): {got:?}\nlocal publishes: {publishes:?}");
    assert_eq!(
        got,
        vec![
            (0, 1),
            (1, 2),
            (2, 3),
            (4, 4),
            (5, 5),
            (6, 6),
            (8, 7),
            (9, 8)
        ],
        "the count never jumps over a failed input"
    );
    assert_eq!(
        publishes,
        (1..=8)
            .map(|n| format!("{{\"n\":{n}}}"))
            .collect::<Vec<_>>(),
        "no publish for a failed input"
    );
    let dl = dlq_list(&gw);
    assert_eq!(dl.len(), 2);
    assert_eq!(dl[0]["rule"], "10-count");
    assert_eq!(dl[0]["event"]["payload"], json!({"i": 3, "fail": true}));
    assert_eq!(
        gw.metric("tidepool_rule_errors_total{rule=\"10-count\"}"),
        Some(2.0)
    );
}

#[test]
fn live_a_chain_failing_in_its_second_rule_dead_letters_the_original_and_retry_runs_it_once() {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("10-stage.rhai"), STAGE).unwrap();
    std::fs::write(rules.path().join("20-check.rhai"), CHECK).unwrap();
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let gw = Gateway::start(&with_rules(rules.path(), up.port, ""));
    let c = publisher(gw.mqtt_port, "s1");
    for p in [
        json!({"i": 0}),
        json!({"i": 1, "fail": true}),
        json!({"i": 2}),
    ] {
        c.publish("sensors/1/t", QoS::AtLeastOnce, false, p.to_string())
            .unwrap();
    }
    assert!(
        sub.wait_for(Duration::from_secs(15), |g| g.len() >= 2),
        "log:\n{}",
        gw.log()
    );
    assert!(wait_until(Duration::from_secs(10), || gw
        .metric("tidepool_dlq_events")
        == Some(1.0)));
    let dl = dlq_list(&gw);
    eprintln!("dead letter: {}", dl[0]);
    assert_eq!(dl[0]["rule"], "20-check");
    assert_eq!(
        dl[0]["event"]["payload"],
        json!({"i": 1, "fail": true}),
        "the original input, not 10-stage's output"
    );
    // Fix the second rule; retry with the daemon running.
    std::fs::write(
        rules.path().join("20-check.rhai"),
        "fn on_event(e) { e.payload.retried = true; e }",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(2500)); // hot reload picks it up
    let out = gw.cli(&["dlq", "retry"]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains("retried 1 dead letters; 0 failed again"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.publish(
        "sensors/1/t",
        QoS::AtLeastOnce,
        false,
        json!({"i": 3}).to_string(),
    )
    .unwrap();
    assert!(sub.wait_for(Duration::from_secs(15), |g| g.len() >= 4));
    std::thread::sleep(Duration::from_millis(300));
    let mut got: Vec<(u64, u64)> = sub
        .snapshot()
        .iter()
        .map(|g| {
            (
                g.payload["i"].as_u64().unwrap(),
                g.payload["stage"].as_u64().unwrap(),
            )
        })
        .collect();
    got.sort();
    eprintln!("upstream (i, stage): {got:?}");
    assert_eq!(
        got,
        vec![(0, 1), (1, 3), (2, 2), (3, 4)],
        "10-stage ran once per successful pass: the failed pass left nothing, the retry once"
    );
    assert_eq!(gw.metric("tidepool_dlq_events"), Some(0.0));
}

#[test]
fn dlq_flood_stays_under_its_cap_counted_with_few_log_lines() {
    const N: u64 = 20_000;
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(
        rules.path().join("10-throw.rhai"),
        "fn on_event(e) { throw \"always fails\"; }",
    )
    .unwrap();
    let up = Mosquitto::start("");
    let gw = Gateway::start(&with_rules(
        rules.path(),
        up.port,
        "[buffer]\ndlq_max_bytes = \"1MiB\"\n",
    ));
    let started = Instant::now();
    run_sim(gw.mqtt_port, N, 0.0, &["--payload-size", "1000"]);
    let settled = wait_until(Duration::from_secs(60), || {
        let dl = gw.metric("tidepool_dlq_events").unwrap_or(0.0);
        let full = gw
            .metric("tidepool_events_dropped_total{reason=\"dlq_full\"}")
            .unwrap_or(0.0);
        dl + full >= N as f64
    });
    let took = started.elapsed();
    let log = gw.log();
    let warns = log.lines().filter(|l| l.contains("WARN")).count();
    let dlq_events = gw.metric("tidepool_dlq_events");
    let dlq_bytes = gw.metric("tidepool_dlq_bytes");
    let dropped = gw.metric("tidepool_events_dropped_total{reason=\"dlq_full\"}");
    let file = std::fs::metadata(gw.dir.join("data").join("tidepool.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!(
        "DLQ flood: {N} events of ~1 KiB in {took:?}: dlq_events {dlq_events:?}, dlq_bytes {dlq_bytes:?}, dropped{{dlq_full}} {dropped:?}, WARN lines {warns}, store file {} KiB",
        file / 1024
    );
    assert!(
        settled,
        "every input is in the DLQ or counted; log tail:\n{}",
        &log[log.len().saturating_sub(2000)..]
    );
    assert!(
        dlq_bytes.unwrap() <= (1 << 20) as f64,
        "the DLQ stays under its cap"
    );
    assert!(dropped.unwrap() > 0.0, "the overflow is counted");
    assert_eq!(
        dlq_events.unwrap() + dropped.unwrap(),
        N as f64,
        "every input either dead-lettered or counted"
    );
    assert!(
        warns < 20,
        "{warns} WARN lines: repeated errors are summarised"
    );
    assert_eq!(
        http_get(gw.admin_port, "/healthz").as_deref(),
        Some("ok\n"),
        "the gateway keeps running"
    );
    // Paging: the CLI lists the whole queue page by page; --limit caps it.
    let all = dlq_list(&gw);
    assert_eq!(all.len() as f64, dlq_events.unwrap());
    let out = gw.cli(&["dlq", "list", "--json", "--limit", "5"]);
    let five: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(five.as_array().unwrap().len(), 5);
    let after = five[4]["id"].as_u64().unwrap();
    let out = gw.cli(&[
        "dlq",
        "list",
        "--json",
        "--limit",
        "2",
        "--after",
        &after.to_string(),
    ]);
    let next: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(next[0]["id"], all[5]["id"]);
    // With the daemon stopped: the dlq_full count persisted, and the CLI pages the store.
    let mut gw = gw;
    assert_eq!(gw.proc.terminate(Duration::from_secs(15)), Some(0));
    let out = gw.cli(&["status", "--json"]);
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["dropped"]["dlq_full"].as_f64(), dropped, "{st}");
    assert_eq!(st["dlq_events"].as_f64(), dlq_events);
    let out = gw.cli(&[
        "dlq",
        "list",
        "--json",
        "--limit",
        "2",
        "--after",
        &after.to_string(),
    ]);
    let offline: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(offline, next, "the same page, offline");
    let out = gw.cli(&["dlq", "drop", "--limit", "3"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("dropped 3 dead letters"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    gw.launch();
    assert_eq!(
        gw.metric("tidepool_dlq_events"),
        Some(dlq_events.unwrap() - 3.0)
    );
    let out = gw.cli(&["dlq", "drop"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("dropped {}", all.len() - 3)),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(gw.metric("tidepool_dlq_events"), Some(0.0));
    assert_eq!(gw.metric("tidepool_dlq_bytes"), Some(0.0));
}
