//! `[[sink]] kind = "http"`, black-box: a test HTTP function that fails in each way a real one
//! does; two sinks with different filters; `kill -9` of the gateway during both.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tidepool_e2e::http_sink::{HttpFunction, Posted};
use tidepool_e2e::*;

const WAIT: Duration = Duration::from_secs(30);

/// The (source, simulator `n`) of every event in 2xx-answered posts, with how often each came.
fn delivered_n(posted: &[Posted]) -> BTreeMap<(String, u64), usize> {
    let mut m = BTreeMap::new();
    for p in posted.iter().filter(|p| (200..300).contains(&p.status)) {
        for e in p.batch()["events"].as_array().into_iter().flatten() {
            if let Some(n) = e["payload"]["n"].as_u64() {
                let source = e["source"].as_str().unwrap_or("").to_string();
                *m.entry((source, n)).or_default() += 1;
            }
        }
    }
    m
}

fn dlq(g: &Gateway) -> Vec<serde_json::Value> {
    let out = g.cli(&["dlq", "list", "--json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// A function that answers 500, then 429 with `Retry-After: 1`, then 400, then 200: the first
/// batch is kept through the first two (same idempotency key, same body), dead-lettered by the
/// third with the status and body, and `dlq retry` sends its events to this sink again; every
/// other event is delivered. Then a second load with `kill -9` in the middle: every event is
/// delivered at least once, and a batch posted twice carries the same key for the same ids.
#[test]
fn an_http_sink_retries_honours_retry_after_dead_letters_4xx_and_loses_nothing() {
    let f = HttpFunction::start(|n| match n {
        0 => (500, vec![], "boom".into()),
        1 => (
            429,
            vec![("Retry-After".into(), "1".into())],
            "slow down".into(),
        ),
        2 => (400, vec![], "bad batch: field x".into()),
        3 => (401, vec![], "who are you".into()),
        _ => (200, vec![], "ok".into()),
    });
    let mut g = Gateway::start(&format!(
        r#"
[[sink]]
name = "fn"
kind = "http"
url = "{}"
headers = {{ "X-Api-Key" = "s3cret-key" }}
batch_max_events = 50
batch_max_bytes = "4KiB"
batch_max_wait = "100ms"
reconnect_min = "100ms"
reconnect_max = "500ms"
compression = "gzip"
"#,
        f.url()
    ));
    run_sim(g.mqtt_port, 200, 0.0, &["--client-id", "first"]);
    assert!(
        f.wait_for(WAIT, |p| delivered_n(p).len() >= 150),
        "posted: {:?}\n{}",
        f.posted().iter().map(|p| p.status).collect::<Vec<_>>(),
        g.log()
    );
    let p = f.posted();
    let (a, b, c) = (&p[0], &p[1], &p[2]);
    let key = a.header("idempotency-key").unwrap().to_string();
    assert_eq!(
        b.header("idempotency-key"),
        Some(key.as_str()),
        "a retry keeps its key"
    );
    assert_eq!(c.header("idempotency-key"), Some(key.as_str()));
    assert_eq!(
        (a.body.clone(), b.body.clone()),
        (c.body.clone(), c.body.clone())
    );
    let ids = a.ids();
    assert_eq!(key, format!("test-gw-fn-{}-{}", ids[0], ids[ids.len() - 1]));
    assert!(
        c.at.duration_since(b.at) >= Duration::from_millis(950),
        "Retry-After: 1 honoured"
    );
    assert_eq!(a.header("x-api-key"), Some("s3cret-key"));
    assert_eq!(a.header("content-encoding"), Some("gzip"));
    assert_eq!(
        a.header("content-type"),
        Some("application/vnd.tidepool.batch+json")
    );
    assert_eq!(a.batch()["gateway"], "test-gw");
    // The 400's batch is in the dead-letter queue with the status and the body.
    let until = Instant::now() + WAIT;
    while dlq(&g).len() < ids.len() {
        assert!(Instant::now() < until, "dead letters: {:?}", dlq(&g));
        std::thread::sleep(Duration::from_millis(100));
    }
    let letters = dlq(&g);
    assert_eq!(letters.len(), ids.len());
    assert_eq!(letters[0]["rule"], "sink:fn");
    let err = letters[0]["error"].as_str().unwrap();
    assert!(
        err.contains("HTTP 400") && err.contains("bad batch"),
        "{err}"
    );
    // The 401 after it was kept and counted, the batch sent again with its key.
    let d = &p[3];
    assert_eq!(d.status, 401);
    assert_eq!(p[4].header("idempotency-key"), d.header("idempotency-key"));
    assert_eq!(
        g.metric("tidepool_sink_failures_total{sink=\"fn\",reason=\"credentials\"}"),
        Some(1.0)
    );
    let status = g.status();
    let sink = &status["sinks"][0];
    assert_eq!(sink["name"], "fn");
    assert_eq!(sink["dead_lettered"], ids.len());
    assert!(
        sink["headers"][0].as_str().unwrap().contains("redacted"),
        "{sink}"
    );
    assert!(!status.to_string().contains("s3cret-key"));
    let text = String::from_utf8_lossy(&g.cli(&["status"]).stdout).to_string();
    assert!(text.contains("sink      fn (http)"), "{text}");
    assert!(!g.log().contains("s3cret-key"));
    assert!(g.wait_metric("tidepool_backlog_events", 0.0, WAIT));
    // Retried: to this sink, delivered this time.
    let out = g.cli(&["dlq", "retry"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        f.wait_for(WAIT, |p| delivered_n(p).len() == 200),
        "all 200 delivered"
    );

    // A second load, the gateway killed in the middle of it.
    let acked_log = g.dir.join("acked.log");
    let mut sim = spawn_sim(
        g.mqtt_port,
        3_000,
        3_000.0,
        &[
            "--client-id",
            "second",
            "--acked-log",
            acked_log.to_str().unwrap(),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    g.proc.kill9();
    g.launch();
    let until = Instant::now() + WAIT;
    while sim.running() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    sim.kill9();
    let acked = kill_storm::acked_log(&acked_log);
    assert!(
        acked.len() >= 500,
        "the kill must come under load: {}",
        acked.len()
    );
    // Every event the gateway acknowledged to the sensor reaches the function.
    let want: BTreeSet<(String, u64)> = acked
        .iter()
        .map(|n| ("mqtt:second".to_string(), *n))
        .collect();
    let ok = f.wait_for(WAIT, |p| {
        let d = delivered_n(p);
        want.iter().all(|n| d.contains_key(n))
    });
    let d = delivered_n(&f.posted());
    let missing: Vec<_> = want
        .iter()
        .filter(|n| !d.contains_key(n))
        .take(10)
        .collect();
    assert!(ok, "not delivered (first 10): {missing:?}");
    let mut by_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for p in f.posted() {
        let k = p.header("idempotency-key").unwrap().to_string();
        let ids = p.ids();
        if let Some(prev) = by_key.insert(k.clone(), ids.clone()) {
            assert_eq!(prev, ids, "one key, one set of ids: {k}");
        }
    }
    let repeats: usize = d.values().map(|c| c - 1).sum();
    println!(
        "http sink: {} posts, {} events delivered, {repeats} delivered twice (kill -9), {} dead-lettered then retried",
        f.posted().len(),
        d.len(),
        ids.len()
    );
    g.proc.terminate(Duration::from_secs(10));
}

/// Two sinks: the MQTT upstream takes everything, an HTTP function only `sensors/1/#`. While
/// the function is down, the upstream gets everything and the store keeps exactly what the
/// function still owes, across a `kill -9`; when it comes back, it gets those and the store
/// empties. Without the upstream, what the function does not take is dropped, counted.
#[test]
fn two_sinks_with_filters_deletion_waits_for_both() {
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &["tidepool/+/events"]);
    let f = HttpFunction::start(|_| (503, vec![], "down".into()));
    let cfg = |with_upstream: bool| {
        format!(
            r#"
{}
[[sink]]
name = "fn"
kind = "http"
url = "{}"
topics = ["sensors/1/#"]
batch_max_wait = "100ms"
reconnect_min = "100ms"
reconnect_max = "300ms"
"#,
            if with_upstream {
                format!(
                    "[upstream]\nurl = \"mqtt://127.0.0.1:{}\"\nbatch_max_wait = \"100ms\"\n",
                    up.port
                )
            } else {
                String::new()
            },
            f.url()
        )
    };
    let mut g = Gateway::start(&cfg(true));
    run_sim(
        g.mqtt_port,
        400,
        0.0,
        &["--client-id", "a", "--sensors", "4"],
    );
    assert!(sub.wait_for(WAIT, |got| got.len() >= 400), "{}", g.log());
    check_complete(&sub.snapshot(), 400);
    let for_fn = |got: &[Got]| -> BTreeSet<u64> {
        got.iter()
            .filter(|e| e.event["topic"].as_str().unwrap().starts_with("sensors/1/"))
            .filter_map(|e| e.n)
            .collect()
    };
    let owed = for_fn(&sub.snapshot());
    assert!(!owed.is_empty() && owed.len() < 400, "{}", owed.len());
    let backlog = owed.len() as f64;
    assert!(
        g.wait_metric("tidepool_backlog_events", backlog, WAIT),
        "the store keeps what the function owes: {:?} of {backlog}",
        g.metric("tidepool_backlog_events")
    );
    assert!(g
        .metric("tidepool_sink_forwarded_events_total{sink=\"upstream\"}")
        .is_some_and(|n| n >= 400.0));
    // Killed: the ranges the upstream acknowledged are in the store, so it does not send it
    // all again, and the store still holds exactly the function's share.
    let before = sub.snapshot().len();
    g.proc.kill9();
    g.launch();
    assert!(g.wait_metric("tidepool_backlog_events", backlog, WAIT));
    std::thread::sleep(Duration::from_millis(1_000));
    let resent = sub.snapshot().len() - before;
    assert!(
        resent < 100,
        "the upstream resent {resent} events after the restart"
    );
    // Both sinks in /status and under the `sink` label, upstream first.
    let st = g.status();
    assert_eq!(st["sinks"][0]["name"], "upstream");
    assert_eq!(st["sinks"][0]["kind"], "mqtt");
    assert_eq!(st["sinks"][1]["name"], "fn");
    assert_eq!(st["sinks"][1]["up"], true, "{}", st["sinks"][1]);
    assert!(g
        .metric("tidepool_sink_forwarded_events_total{sink=\"upstream\"}")
        .is_some());
    assert!(g
        .metric("tidepool_sink_failures_total{sink=\"fn\",reason=\"retry\"}")
        .is_some_and(|n| n > 0.0));
    // The function comes back: it gets its share, then the store is empty.
    f.answer(|_| (200, vec![], "ok".into()));
    assert!(g.wait_metric("tidepool_backlog_events", 0.0, WAIT));
    let d = delivered_n(&f.posted());
    assert_eq!(d.keys().map(|(_, n)| *n).collect::<BTreeSet<_>>(), owed);
    for p in f.posted() {
        for e in p.batch()["events"].as_array().into_iter().flatten() {
            assert!(
                e["topic"].as_str().unwrap().starts_with("sensors/1/"),
                "{e}"
            );
        }
    }
    // Stored while the function was down: backlog, and flagged so.
    assert!(f
        .posted()
        .iter()
        .filter(|p| p.status == 200)
        .all(|p| p.batch()["backlog"] == true));
    // Without the upstream: the rest of the traffic has nowhere to go.
    g.proc.terminate(Duration::from_secs(10));
    std::fs::write(&g.config, {
        let text = std::fs::read_to_string(&g.config).unwrap();
        let start = text.find("[upstream]").unwrap();
        let end = text[start..].find("[[sink]]").unwrap() + start;
        format!("{}{}", &text[..start], &text[end..])
    })
    .unwrap();
    g.launch();
    let posts_before = f.posted().len();
    run_sim(
        g.mqtt_port,
        200,
        0.0,
        &["--client-id", "b", "--sensors", "4"],
    );
    let until = Instant::now() + WAIT;
    loop {
        let no_sink = g
            .metric("tidepool_events_dropped_total{reason=\"no_sink\"}")
            .unwrap_or(0.0);
        let fn_got: usize = f.posted()[posts_before..]
            .iter()
            .filter(|p| p.status == 200)
            .map(|p| p.ids().len())
            .sum();
        if no_sink > 0.0 && no_sink as usize + fn_got == 200 {
            break;
        }
        assert!(
            Instant::now() < until,
            "no_sink {no_sink}, fn {fn_got}: {:?}",
            f.posted()[posts_before..]
                .iter()
                .map(|p| (p.status, p.ids()))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(g.wait_metric("tidepool_backlog_events", 0.0, WAIT));
    g.proc.terminate(Duration::from_secs(10));
}

/// A second broker as a sink (`kind = "mqtt"`) beside the upstream one: it gets only what its
/// `topics` take, on its own `topic`. Cut off, it holds its share in the store (and only
/// that) across a `kill -9`, while the upstream goes on; back, it drains that share at its
/// `drain_rate` and a `kill -9` in the middle of the drain loses nothing.
#[test]
fn a_second_broker_as_a_sink_holds_only_its_share_across_kill9() {
    let up = Mosquitto::start("");
    let b2 = Mosquitto::start("");
    let sub_up = Subscriber::start(up.port, &["tidepool/+/events"]);
    let sub_b2 = Subscriber::start(b2.port, &["site/test-gw/batches", "tidepool/+/status"]);
    // Between the gateway and the second broker: cut and restored by the test.
    let link = Proxy::start(b2.port);
    let mut g = Gateway::start(&format!(
        r#"
[upstream]
url = "mqtt://127.0.0.1:{}"
batch_max_wait = "100ms"

[[sink]]
name = "b2"
kind = "mqtt"
url = "mqtt://127.0.0.1:{}"
topic = "site/{{gateway}}/batches"
topics = ["sensors/1/#"]
batch_max_events = 50
batch_max_wait = "100ms"
max_packet = "2KiB"
drain_rate = "200/s"
reconnect_min = "100ms"
reconnect_max = "300ms"
"#,
        up.port, link.port
    ));
    let key = |e: &Got| {
        (
            e.event["source"].as_str().unwrap_or("").to_string(),
            e.n.unwrap(),
        )
    };
    let share = |got: &[Got]| -> BTreeSet<(String, u64)> {
        got.iter()
            .filter(|e| e.event["topic"].as_str().unwrap().starts_with("sensors/1/"))
            .map(key)
            .collect()
    };
    // Both up: each gets its own.
    run_sim(
        g.mqtt_port,
        400,
        0.0,
        &["--client-id", "a", "--sensors", "4"],
    );
    assert!(sub_up.wait_for(WAIT, |got| got.len() >= 400), "{}", g.log());
    let want = share(&sub_up.snapshot());
    assert!(!want.is_empty() && want.len() < 400, "{}", want.len());
    assert!(
        sub_b2.wait_for(WAIT, |got| share(got).len() >= want.len()),
        "{}",
        g.log()
    );
    assert!(g.wait_metric("tidepool_backlog_events", 0.0, WAIT));
    let st = g.status();
    let b2_status = &st["sinks"][1];
    assert_eq!(b2_status["name"], "b2", "{st}");
    assert_eq!(b2_status["kind"], "mqtt");
    assert_eq!(b2_status["up"], true, "{b2_status}");
    assert_eq!(b2_status["topics"][0], "sensors/1/#");
    assert_eq!(b2_status["mqtt"]["protocol"], "5", "{b2_status}");
    assert!(g
        .metric("tidepool_sink_forwarded_events_total{sink=\"b2\"}")
        .is_some_and(|n| n >= want.len() as f64));
    assert!(g.metric("tidepool_sink_up{sink=\"b2\"}") == Some(1.0));
    // Its own retained status on its broker.
    assert_eq!(
        sub_b2
            .other
            .lock()
            .unwrap()
            .get("tidepool/test-gw/status")
            .and_then(|v| v.last().cloned()),
        Some("online".to_string())
    );
    // Cut off: the upstream goes on; the store keeps exactly the second broker's share.
    link.sever();
    assert!(
        g.wait_metric("tidepool_sink_up{sink=\"b2\"}", 0.0, WAIT),
        "{}",
        g.log()
    );
    run_sim(
        g.mqtt_port,
        1_600,
        0.0,
        &["--client-id", "b", "--sensors", "4"],
    );
    assert!(
        sub_up.wait_for(WAIT, |got| got.len() >= 2_000),
        "{}",
        g.log()
    );
    let want = share(&sub_up.snapshot());
    let owed = want.len() - share(&sub_b2.snapshot()).len();
    assert!(owed > 200, "{owed}");
    assert!(
        g.wait_metric("tidepool_backlog_events", owed as f64, WAIT),
        "the store keeps what b2 owes: {:?} of {owed}",
        g.metric("tidepool_backlog_events")
    );
    let up_before = sub_up.snapshot().len();
    g.proc.kill9();
    g.launch();
    assert!(g.wait_metric("tidepool_backlog_events", owed as f64, WAIT));
    assert_eq!(g.status()["sinks"][1]["up"], false);
    // Back: it drains its share at 200/s; killed half-way, it goes on from the store.
    link.set_open(true);
    let got_before = sub_b2.snapshot().len();
    assert!(
        sub_b2.wait_for(WAIT, |got| got.len() >= got_before + 100),
        "{}",
        g.log()
    );
    // Killed in the middle of the drain (at 200/s it has seconds to go).
    let before_kill = share(&sub_b2.snapshot()).len();
    g.proc.kill9();
    assert!(
        before_kill < want.len(),
        "the drain was over before the kill"
    );
    g.launch();
    assert!(
        sub_b2.wait_for(WAIT, |got| share(got).len() >= want.len()),
        "{} of {}: {}",
        share(&sub_b2.snapshot()).len(),
        want.len(),
        g.log()
    );
    assert!(g.wait_metric("tidepool_backlog_events", 0.0, WAIT));
    let got = sub_b2.snapshot();
    assert_eq!(
        share(&got),
        want,
        "the second broker got its share, all of it"
    );
    assert!(
        got.iter()
            .all(|e| e.event["topic"].as_str().unwrap().starts_with("sensors/1/")),
        "and nothing else"
    );
    // The same event always comes with the same id, through both sinks.
    let ids: BTreeMap<(String, u64), u64> =
        sub_up.snapshot().iter().map(|e| (key(e), e.id)).collect();
    assert!(got.iter().all(|e| ids.get(&key(e)) == Some(&e.id)));
    // The upstream did not send its share again for the second broker's sake.
    let resent = sub_up.snapshot().len() - up_before;
    assert!(resent < 200, "the upstream resent {resent} events");
    assert!(dlq(&g).is_empty());
    // An event larger than its max_packet: dead-lettered for it (rule `sink:b2`), counted as
    // its own, while the upstream delivers it.
    let big = format!("{{\"n\":0,\"pad\":\"{}\"}}", "x".repeat(3_000));
    mqtt_clients::mosquitto_pub_ok(g.mqtt_port, &["-q", "1", "-t", "sensors/1/big", "-m", &big]);
    assert!(
        g.wait_metric("tidepool_sink_dead_lettered_total{sink=\"b2\"}", 1.0, WAIT),
        "{}",
        g.log()
    );
    let letters = dlq(&g);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["rule"], "sink:b2", "{letters:?}");
    assert!(g.wait_metric("tidepool_backlog_events", 0.0, WAIT));
    g.proc.terminate(Duration::from_secs(10));
}
