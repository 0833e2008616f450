//! Upstream size limits and acknowledgement timeouts: a broker's `max_packet_size`, an event
//! too large for it, a broker that never sends PUBACK, and a backlog of large events.

use std::time::{Duration, Instant};

use tidepool_e2e::upstream_limits::SilentFirst;
use tidepool_e2e::*;

const TOPIC: &str = "tidepool/test-gw/events";

fn upstream_cfg(port: u16, extra: &str) -> String {
    format!(
        "[upstream]\nurl = \"mqtt://127.0.0.1:{port}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n{extra}\n"
    )
}

fn wait_metric(gw: &Gateway, series: &str, value: f64, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if gw.metric(series) == Some(value) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    gw.metric(series) == Some(value)
}

/// `count` events of `size` B buffered while upstream is down; then a Mosquitto with
/// `broker_conf` comes up. Returns (gateway, subscriber, broker, seconds from up to drained).
fn drain_after_outage(
    gw_extra: &str,
    broker_conf: &str,
    count: u64,
    size: usize,
    rate: f64,
    within: Duration,
) -> (Gateway, Subscriber, Mosquitto, Proxy, Option<f64>) {
    let port = free_port();
    let gw = Gateway::start(&upstream_cfg(port, gw_extra));
    let sim = run_sim(
        gw.mqtt_port,
        count,
        rate,
        &["--payload-size", &size.to_string()],
    );
    assert_eq!(sim["acked"], count);
    assert!(
        wait_metric(
            &gw,
            "tidepool_backlog_events",
            count as f64,
            Duration::from_secs(60)
        ),
        "not all buffered: {:?}",
        gw.metric("tidepool_backlog_events")
    );
    let up = Mosquitto::start(broker_conf);
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let started = Instant::now();
    let link = Proxy::start_on(port, up.port);
    let done = sub.wait_for(within, |g| {
        g.iter()
            .filter_map(|x| x.n)
            .collect::<std::collections::HashSet<_>>()
            .len() as u64
            >= count
    });
    let secs = done.then(|| started.elapsed().as_secs_f64());
    (gw, sub, up, link, secs)
}

#[test]
fn broker_packet_limits_of_64k_and_128k_deliver_everything() {
    for limit in [65_536, 131_072] {
        let (gw, sub, _up, _link, secs) = drain_after_outage(
            "",
            &format!("max_packet_size {limit}"),
            5_000,
            250,
            0.0,
            Duration::from_secs(30),
        );
        let distinct = sub.distinct_n().len();
        println!(
            "broker max_packet_size {limit}: {distinct} of 5000 delivered, in {secs:?} s; size refusals {:?}",
            gw.metric("tidepool_upstream_size_refusals_total")
        );
        assert!(
            secs.is_some(),
            "broker limit {limit}: only {distinct} of 5000 arrived; log:\n{}",
            gw.log()
        );
        check_complete(&sub.snapshot(), 5_000);
        assert!(wait_metric(
            &gw,
            "tidepool_backlog_events",
            0.0,
            Duration::from_secs(10)
        ));
        assert_eq!(gw.metric("tidepool_dlq_events"), Some(0.0));
    }
}

#[test]
fn an_event_too_large_for_the_broker_is_dead_lettered_the_rest_arrive() {
    // MQTT 3.1.1: no Maximum Packet Size in the CONNACK; the gateway has to learn the limit.
    too_large_for_the_broker("3.1.1");
}

#[test]
fn mqtt5_takes_the_broker_maximum_packet_size_from_its_connack() {
    // MQTT 5: the CONNACK says 64 KiB; no refusal needed to learn it.
    too_large_for_the_broker("5");
}

fn too_large_for_the_broker(protocol: &str) {
    // The embedded broker takes payloads up to 100 KiB; upstream takes packets up to 64 KiB;
    // `max_packet` stays at its default, above that.
    let port = free_port();
    let gw = Gateway::start(&format!(
        "max_payload = \"100KiB\"\n{}",
        upstream_cfg(port, &format!("protocol = \"{protocol}\""))
    ));
    let sim = run_sim(gw.mqtt_port, 2_000, 0.0, &["--payload-size", "250"]);
    assert_eq!(sim["acked"], 2_000);
    let big = run_sim(
        gw.mqtt_port,
        1,
        0.0,
        &[
            "--payload-size",
            "70000",
            "--client-id",
            "big-one",
            "--seed",
            "2",
        ],
    );
    assert_eq!(big["acked"], 1);
    assert!(wait_metric(
        &gw,
        "tidepool_backlog_events",
        2_001.0,
        Duration::from_secs(30)
    ));
    let up = Mosquitto::start("max_packet_size 65536");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let _link = Proxy::start_on(port, up.port);
    let all = sub.wait_for(Duration::from_secs(30), |g| {
        g.iter()
            .filter(|x| x.payload["pad"].as_str().map_or(0, str::len) < 1000)
            .filter_map(|x| x.n)
            .collect::<std::collections::HashSet<_>>()
            .len()
            >= 2_000
    });
    let dlq = wait_metric(&gw, "tidepool_dlq_events", 1.0, Duration::from_secs(20));
    println!(
        "64 KiB broker, one 70 kB event: {} small delivered, dlq {:?}, backlog {:?}, size refusals {:?}",
        sub.distinct_n().len(),
        gw.metric("tidepool_dlq_events"),
        gw.metric("tidepool_backlog_events"),
        gw.metric("tidepool_upstream_size_refusals_total")
    );
    assert!(all, "not every small event arrived; log:\n{}", gw.log());
    assert!(
        dlq,
        "the big event is not in the dead-letter queue; log:\n{}",
        gw.log()
    );
    assert!(wait_metric(
        &gw,
        "tidepool_backlog_events",
        0.0,
        Duration::from_secs(10)
    ));
    assert_eq!(
        gw.metric("tidepool_upstream_dead_lettered_total"),
        Some(1.0)
    );
    let refusals = gw.metric("tidepool_upstream_size_refusals_total");
    if protocol == "5" {
        assert_eq!(refusals, Some(0.0), "the CONNACK said the limit");
    } else {
        assert!(refusals >= Some(1.0));
    }
    assert!(
        gw.metric("tidepool_upstream_packet_limit_bytes") <= Some(65_536.0),
        "learned limit {:?}",
        gw.metric("tidepool_upstream_packet_limit_bytes")
    );
    assert!(
        sub.snapshot()
            .iter()
            .all(|x| x.payload["pad"].as_str().map_or(0, str::len) < 1000),
        "the big event cannot have arrived"
    );
    let out = gw.cli(&["dlq", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["rule"], "upstream");
    let why = list[0]["error"].as_str().unwrap();
    if protocol == "5" {
        assert!(
            why.contains("exceeds the upstream broker's Maximum Packet Size 65536 B"),
            "{why}"
        );
    } else {
        assert!(why.contains("refused by the upstream broker"), "{why}");
    }
}

#[test]
fn a_broker_that_never_acknowledges_is_left_after_puback_timeout() {
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let silent = SilentFirst::start(up.port);
    let gw = Gateway::start(&upstream_cfg(
        silent.port,
        "keep_alive = \"60s\"\npuback_timeout = \"2s\"\nbatch_max_wait = \"100ms\"",
    ));
    let started = Instant::now();
    let sim = run_sim(gw.mqtt_port, 500, 0.0, &[]);
    assert_eq!(sim["acked"], 500);
    let done = sub.wait_for(Duration::from_secs(20), |g| g.len() >= 500);
    println!(
        "silent broker: {} of 500 delivered after {:.1} s, connections {}, PUBACK timeouts {:?}",
        sub.distinct_n().len(),
        started.elapsed().as_secs_f64(),
        silent.accepted.load(std::sync::atomic::Ordering::SeqCst),
        gw.metric("tidepool_upstream_puback_timeouts_total")
    );
    assert!(done, "log:\n{}", gw.log());
    check_complete(&sub.snapshot(), 500);
    assert!(silent.accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert!(gw.metric("tidepool_upstream_puback_timeouts_total") >= Some(1.0));
    assert_eq!(
        gw.metric("tidepool_upstream_size_refusals_total"),
        Some(0.0)
    );
    assert!(wait_metric(
        &gw,
        "tidepool_backlog_events",
        0.0,
        Duration::from_secs(10)
    ));
}

#[test]
fn a_backlog_of_60k_events_drains_in_full_batches() {
    let (gw, sub, _up, _link, secs) = drain_after_outage(
        "batch_max_wait = \"1s\"",
        "",
        3_000,
        60 * 1024,
        // 15 MB/s: what the store takes on a loaded test machine, so the embedded broker's
        // memory never fills while the buffering happens.
        250.0,
        Duration::from_secs(60),
    );
    let distinct = sub.distinct_n().len();
    println!(
        "3000 events of 60 KiB after an outage: {distinct} delivered in {secs:?} s ({:.0} events/s)",
        secs.map_or(0.0, |s| distinct as f64 / s)
    );
    assert!(
        secs.is_some(),
        "only {distinct} of 3000 arrived in 60 s; log:\n{}",
        gw.log()
    );
    check_complete(&sub.snapshot(), 3_000);
    assert!(wait_metric(
        &gw,
        "tidepool_backlog_events",
        0.0,
        Duration::from_secs(10)
    ));
}
