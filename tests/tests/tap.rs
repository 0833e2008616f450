//! `tidepool tap` against a running gateway: each rule's verdict and diff for live events,
//! the filters, and a reader too slow to keep up that loses tap records, never events. Trace
//! ids from input to outputs, publishes and dead letters.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tidepool_e2e::mqtt_clients::{mosquitto_pub_ok, MosqSub};
use tidepool_e2e::*;

const TOPIC: &str = "tidepool/test-gw/events";
const WAIT: Duration = Duration::from_secs(30);

fn rules(dir: &Path) {
    for (name, text) in [
        (
            "10-mark",
            r#"fn on_event(e) { if e.payload.v > 5 { e.payload.hot = true; publish("alerts/hot", #{ v: e.payload.v }); } e }"#,
        ),
        (
            "20-drop",
            r#"fn on_event(e) { if e.payload.v == 0 { return (); } e }"#,
        ),
        (
            "30-fail",
            r#"fn on_event(e) { if e.payload.v == 3 { throw "three is not allowed"; } e }"#,
        ),
        (
            "40-fan",
            r#"fn on_event(e) { if e.payload.v == 9 { let b = e; b.topic = "split/b"; [e, b] } else { e } }"#,
        ),
    ] {
        std::fs::write(dir.join(format!("{name}.rhai")), text).unwrap();
    }
}

/// `tidepool tap ARGS` on `g`'s config, its stdout piped.
fn tap(g: &Gateway, args: &[&str]) -> Proc {
    let child = command("tidepool")
        .arg("tap")
        .args(args)
        .arg("--config")
        .arg(&g.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Proc {
        child: Some(child),
        name: "tidepool tap".into(),
    }
}

/// Waits until `n` tap readers are connected.
fn readers(g: &Gateway, n: f64) {
    assert!(
        g.wait_metric("tidepool_tap_readers", n, WAIT),
        "{:?} tap readers",
        g.metric("tidepool_tap_readers")
    );
}

/// What a tap with `--limit` printed, once it exited.
fn output(p: &mut Proc) -> String {
    let mut c = p.child.take().unwrap();
    let until = Instant::now() + WAIT;
    while c.try_wait().unwrap().is_none() {
        assert!(Instant::now() < until, "tap did not stop at its --limit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut s = String::new();
    c.stdout.take().unwrap().read_to_string(&mut s).unwrap();
    assert!(c.wait().unwrap().success(), "{s}");
    s
}

fn records(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn send(g: &Gateway, vs: &[i64]) {
    for v in vs {
        send_one(g, *v, None);
    }
}

/// One event on `sensors/1/v`; over MQTT 5 with the user property `trace` when one is given.
fn send_one(g: &Gateway, v: i64, trace: Option<&str>) {
    let payload = format!("{{\"v\":{v}}}");
    let mut args = vec!["-q", "1", "-t", "sensors/1/v", "-m", &payload];
    if let Some(t) = trace {
        args.extend(["-V", "mqttv5", "-D", "publish", "user-property", "trace", t]);
    }
    mosquitto_pub_ok(g.mqtt_port, &args);
}

/// A gateway with the rules in `dir`, an upstream Mosquitto and a subscriber on it; no write
/// budget, so a commit never waits.
fn gateway(dir: &Path) -> (Mosquitto, Subscriber, Gateway) {
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let g = Gateway::start(&format!(
        "[rules]\ndir = \"{}\"\n[upstream]\nurl = \"mqtt://127.0.0.1:{}\"\nbatch_max_wait = \"100ms\"\n[buffer]\nwrite_budget = \"0\"\n",
        dir.display(),
        up.port
    ));
    (up, sub, g)
}

#[test]
fn tap_shows_each_rules_verdict_diff_outputs_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    rules(dir.path());
    let (_up, sub, mut g) = gateway(dir.path());
    assert_eq!(g.metric("tidepool_tap_readers"), Some(0.0));
    let mut all = tap(&g, &["--json", "--limit", "5"]);
    readers(&g, 1.0);
    send(&g, &[0, 3, 7, 9, 1]);
    let got = records(&output(&mut all));
    assert_eq!(got.len(), 5, "{got:?}");
    let by_v = |v: i64| {
        got.iter()
            .find(|r| r["input"]["payload"]["v"] == v)
            .unwrap_or_else(|| panic!("no record for v={v}: {got:?}"))
    };
    let verdicts = |r: &serde_json::Value| -> Vec<(String, String)> {
        r["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["rule"].as_str().unwrap().to_string(),
                    s["verdict"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let pairs = |p: &[(&str, &str)]| -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    // Dropped by the second rule: the chain stops there, nothing stored.
    let r = by_v(0);
    assert_eq!(
        verdicts(r),
        pairs(&[("10-mark", "kept"), ("20-drop", "dropped")])
    );
    assert_eq!(r["outputs"].as_array().unwrap().len(), 0);
    // Failed: the error, and the input dead-lettered.
    let r = by_v(3);
    assert_eq!(
        verdicts(r)[2],
        ("30-fail".to_string(), "failed".to_string())
    );
    assert_eq!(r["error"]["rule"], "30-fail");
    assert!(r["error"]["error"]
        .as_str()
        .unwrap()
        .contains("three is not allowed"));
    // Changed, with the diff, the publish and the stored output's id.
    let r = by_v(7);
    assert_eq!(
        verdicts(r)[0],
        ("10-mark".to_string(), "changed".to_string())
    );
    assert_eq!(r["rules"][0]["diff"][0], "+payload.hot: true", "{r}");
    assert!(r["rules"][0]["us"].as_u64().is_some());
    assert_eq!(r["publishes"][0]["topic"], "alerts/hot");
    let id = r["outputs"][0]["id"].as_u64().expect("the output's id");
    // Fanned out into two, each stored with an id of its own.
    let r = by_v(9);
    assert_eq!(r["rules"][3]["verdict"], "fanned_out");
    assert_eq!(r["rules"][3]["count"], 2);
    let ids: Vec<u64> = r["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    // The ids are the ones upstream got.
    assert!(sub.wait_for(WAIT, |got| got.len() >= 4));
    let up_ids: Vec<u64> = sub.snapshot().iter().map(|e| e.id).collect();
    for i in ids.iter().chain([&id]) {
        assert!(up_ids.contains(i), "{i} not in {up_ids:?}");
    }

    // --errors-only, and --rule: only what matches.
    let mut errors = tap(&g, &["--json", "--errors-only", "--limit", "1"]);
    let mut fan = tap(&g, &["--json", "--rule", "40-fan", "--limit", "1"]);
    readers(&g, 2.0);
    send(&g, &[1, 3]);
    let e = records(&output(&mut errors));
    assert_eq!(e.len(), 1);
    assert_eq!(e[0]["input"]["payload"]["v"], 3);
    let f = records(&output(&mut fan));
    assert_eq!(f[0]["input"]["payload"]["v"], 1, "v=3 never reached 40-fan");
    // For people: the verdicts and the diff, on lines of their own.
    let mut human = tap(&g, &["--topic", "sensors/+/v", "--limit", "1"]);
    readers(&g, 1.0);
    send(&g, &[8]);
    let text = output(&mut human);
    assert!(text.contains("sensors/1/v {\"v\":8}"), "{text}");
    assert!(
        text.lines().any(|l| l.contains("10-mark")
            && l.contains("changed")
            && l.contains("+payload.hot: true")),
        "{text}"
    );
    assert!(text.contains("publish alerts/hot"), "{text}");
    assert!(text.contains("→ id "), "{text}");
    // Nobody taps: nothing is recorded.
    readers(&g, 0.0);
    let before = g.metric("tidepool_tap_records_total").unwrap();
    send(&g, &[2]);
    assert!(sub.wait_for(WAIT, |got| got.iter().any(|e| e.payload["v"] == 2)));
    assert_eq!(g.metric("tidepool_tap_records_total").unwrap(), before);
    g.proc.terminate(Duration::from_secs(10));
}

/// A tap whose reader takes nothing (its output is never read) while 30,000 events go
/// through: the reader loses records, is told how many, and every event still arrives.
#[test]
fn a_slow_tap_reader_loses_tap_records_never_events() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("10-mark.rhai"),
        r#"fn on_event(e) { e.payload.seen = true; e }"#,
    )
    .unwrap();
    let (_up, sub, mut g) = gateway(dir.path());
    let mut slow = tap(&g, &["--json"]);
    readers(&g, 1.0);
    // Records of ~2 KiB (1 KiB payloads, in and out): far more than socket buffers and a
    // pipe hold, so the reader must fall behind.
    let n = 30_000;
    let sim = run_sim(
        g.mqtt_port,
        n,
        0.0,
        &["--sensors", "10", "--payload-size", "1024"],
    );
    assert_eq!(sim["acked"], n);
    assert!(
        sub.wait_for(Duration::from_secs(60), |got| got.len() as u64 >= n),
        "{} of {n} arrived",
        sub.snapshot().len()
    );
    assert_eq!(
        check_complete(&sub.snapshot(), n).0,
        n,
        "every event arrived"
    );
    // Reading at last (on a thread: a stream that never says so must fail, not hang): the
    // stream says what was lost.
    let mut c = slow.child.take().unwrap();
    let out = BufReader::new(c.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines() {
            let Ok(line) = line else { break };
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(n) = v["lost"].as_u64() {
                let _ = tx.send(n);
                break;
            }
        }
    });
    let told = rx.recv_timeout(WAIT).unwrap_or(0);
    assert!(told > 0, "a {{\"lost\": N}} line");
    // Counted as the reader took the news.
    assert!(
        g.metric("tidepool_tap_lost_total").unwrap_or(0.0) > 0.0,
        "the reader fell behind: {:?} records sent, {:?} lost",
        g.metric("tidepool_tap_records_total"),
        g.metric("tidepool_tap_lost_total")
    );

    let _ = c.kill();
    let _ = c.wait();
    g.proc.terminate(Duration::from_secs(10));
}

fn is_trace(t: &str) -> bool {
    t.len() == 16
        && t.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Trace ids from input to output, publish and dead letter: given at ingest (or taken from the
/// sensor), kept by both outputs of a fan-out, by the rule's publish and by the dead letter,
/// shown by `tap` and `dlq list`, and the same upstream after a `kill -9` (stored, not made up
/// again on the way out).
#[test]
fn trace_ids_follow_an_input_to_its_outputs_publish_and_dead_letter_across_kill9() {
    let dir = tempfile::tempdir().unwrap();
    rules(dir.path());
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    // Upstream unreachable until after the kill: everything waits in the store.
    let proxy = Proxy::start(up.port);
    proxy.set_open(false);
    let mut g = Gateway::start(&format!(
        "[rules]\ndir = \"{}\"\n[upstream]\nurl = \"mqtt://127.0.0.1:{}\"\nbatch_max_wait = \"100ms\"\nreconnect_max = \"500ms\"\n[buffer]\nwrite_budget = \"0\"\n",
        dir.path().display(),
        proxy.port
    ));
    let alerts = MosqSub::start(
        g.mqtt_port,
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "alerts/#",
            "-F",
            "ALERT\t%P\t%p",
        ],
    );
    let mut t = tap(&g, &["--json", "--limit", "4"]);
    readers(&g, 1.0);
    // Fanned out (v = 9) and published (v > 5), with a trace the sensor brought.
    send_one(&g, 9, Some("00000000000000a9"));
    // Dead-lettered, with a trace the sensor brought.
    send_one(&g, 3, Some("00000000000000A3"));
    // Published, and kept: traces of the gateway's own.
    send(&g, &[7, 1]);
    let recs = records(&output(&mut t));
    let trace_of = |v: i64| -> String {
        let r = recs
            .iter()
            .find(|r| r["input"]["payload"]["v"] == v)
            .unwrap_or_else(|| panic!("no tap record for v={v}: {recs:?}"));
        r["trace"]
            .as_str()
            .unwrap_or_else(|| panic!("{r}"))
            .to_string()
    };
    assert_eq!(
        trace_of(9),
        "00000000000000a9",
        "the sensor's trace is kept"
    );
    assert_eq!(trace_of(3), "00000000000000a3");
    let (t7, t1) = (trace_of(7), trace_of(1));
    assert!(is_trace(&t7) && is_trace(&t1), "{t7} {t1}");
    assert_ne!(t7, t1, "each input its own");

    // The publishes carry their input's trace as an MQTT 5 user property.
    let got = alerts
        .wait_line("\"v\":7", WAIT)
        .unwrap_or_else(|| alerts.output());
    assert!(got.contains(&format!("trace:{t7}")), "{got}");
    let got = alerts
        .wait_line("\"v\":9", WAIT)
        .unwrap_or_else(|| alerts.output());
    assert!(got.contains("trace:00000000000000a9"), "{got}");

    // Four outputs stored (two of the fan-out), then the gateway dies.
    assert!(
        g.wait_metric("tidepool_backlog_events", 4.0, WAIT),
        "{:?} stored",
        g.metric("tidepool_backlog_events")
    );
    g.proc.kill9();
    g.launch();
    proxy.set_open(true);
    assert!(
        sub.wait_for(WAIT, |got| got.len() >= 4),
        "{} of 4 arrived",
        sub.snapshot().len()
    );
    let up: Vec<(String, i64, String)> = sub
        .snapshot()
        .iter()
        .map(|e| {
            (
                e.event["topic"].as_str().unwrap().to_string(),
                e.payload["v"].as_i64().unwrap(),
                e.event["trace"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let a9 = "00000000000000a9".to_string();
    for want in [
        ("sensors/1/v".to_string(), 9, a9.clone()),
        ("split/b".to_string(), 9, a9.clone()),
        ("sensors/1/v".to_string(), 7, t7.clone()),
        ("sensors/1/v".to_string(), 1, t1.clone()),
    ] {
        assert!(up.contains(&want), "{want:?} not in {up:?}");
    }
    assert_eq!(up.len(), 4, "{up:?}");

    // The dead letter keeps it, stored.
    let out = g.cli(&["dlq", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["trace"], "00000000000000a3", "{list}");
    let text = String::from_utf8(g.cli(&["dlq", "list"]).stdout).unwrap();
    assert!(text.contains("trace 00000000000000a3"), "{text}");
    g.proc.terminate(Duration::from_secs(10));
}
