//! MQTT 5 upstream with a real Mosquitto: refusals by reason code, the 3.1.1 fallback, and a
//! live-first drain of a 100,000-event backlog with `kill -9` in the middle.

use std::time::{Duration, Instant};

use tidepool_e2e::drain::{drain_figures, BatchLog};
use tidepool_e2e::upstream_limits::Only311;
use tidepool_e2e::*;

const TOPIC: &str = "tidepool/test-gw/events";

fn upstream_cfg(port: u16, extra: &str) -> String {
    format!(
        "[upstream]\nurl = \"mqtt://127.0.0.1:{port}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nbatch_max_wait = \"100ms\"\n{extra}\n"
    )
}

/// A Mosquitto whose ACL lets anonymous clients read everything under `tidepool/` and write
/// only the status topic (or, with `events`, the events topic too).
fn acl_broker(dir: &std::path::Path, port: u16, events: bool) -> Mosquitto {
    let acl = dir.join("acl");
    let mut text = "topic read tidepool/#\ntopic readwrite tidepool/+/status\n".to_string();
    if events {
        text.push_str("topic write tidepool/+/events\n");
    }
    std::fs::write(&acl, text).unwrap();
    Mosquitto::start_on(port, &format!("acl_file {}", acl.display()))
}

#[test]
fn a_publish_the_acl_denies_is_kept_shown_and_sent_once_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let up = acl_broker(tmp.path(), port, false);
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let gw = Gateway::start(&upstream_cfg(port, ""));
    let sim = run_sim(gw.mqtt_port, 300, 0.0, &[]);
    assert_eq!(sim["acked"], 300);
    let until = Instant::now() + Duration::from_secs(20);
    while gw.metric("tidepool_upstream_rejected_total{reason=\"not_authorized\"}") < Some(2.0)
        && Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = gw.status();
    println!(
        "denied by ACL: rejected {:?}, backlog {:?}, status upstream {}",
        gw.metric("tidepool_upstream_rejected_total{reason=\"not_authorized\"}"),
        gw.metric("tidepool_backlog_events"),
        st["upstream"]
    );
    assert!(
        gw.metric("tidepool_upstream_rejected_total{reason=\"not_authorized\"}") >= Some(2.0),
        "refused again after the backoff; log:\n{}",
        gw.log()
    );
    assert_eq!(
        gw.metric("tidepool_backlog_events"),
        Some(300.0),
        "nothing deleted"
    );
    assert_eq!(gw.metric("tidepool_events_forwarded_total"), Some(0.0));
    assert!(sub.snapshot().is_empty(), "the broker delivered nothing");
    let last = st["upstream"]["last_rejection"].as_str().unwrap_or("");
    assert!(last.contains("not authorized (0x87)"), "{last}");
    assert_eq!(st["upstream"]["protocol"], "5");
    let text = String::from_utf8(gw.cli(&["status"]).stdout).unwrap();
    assert!(text.contains("not_authorized"), "{text}");
    assert!(
        gw.log().contains("upstream refused a batch"),
        "{}",
        gw.log()
    );

    // The ACL is fixed: the same events go, once each.
    drop(sub);
    drop(up);
    let up = acl_broker(tmp.path(), port, true);
    let sub = Subscriber::start(up.port, &[TOPIC]);
    assert!(
        sub.wait_for(Duration::from_secs(20), |g| g.len() >= 300),
        "not delivered once allowed; log:\n{}",
        gw.log()
    );
    check_complete(&sub.snapshot(), 300);
    assert!(gw.wait_metric("tidepool_backlog_events", 0.0, Duration::from_secs(10)));
}

#[test]
fn over_mqtt311_the_same_acl_denial_is_acknowledged_and_the_events_are_gone() {
    // Why MQTT 5 is the default: a 3.1.1 broker acknowledges what its ACL drops.
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let up = acl_broker(tmp.path(), port, false);
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let gw = Gateway::start(&upstream_cfg(port, "protocol = \"3.1.1\""));
    assert_eq!(run_sim(gw.mqtt_port, 100, 0.0, &[])["acked"], 100);
    assert!(
        gw.wait_metric("tidepool_backlog_events", 0.0, Duration::from_secs(20)),
        "log:\n{}",
        gw.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(sub.snapshot().is_empty());
    assert_eq!(gw.metric("tidepool_events_forwarded_total"), Some(100.0));
}

#[test]
fn a_broker_that_speaks_only_311_is_used_with_311_and_a_warn() {
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let old = Only311::start(up.port);
    let gw = Gateway::start(&upstream_cfg(old.port, ""));
    assert_eq!(run_sim(gw.mqtt_port, 500, 0.0, &[])["acked"], 500);
    assert!(
        sub.wait_for(Duration::from_secs(20), |g| g.len() >= 500),
        "log:\n{}",
        gw.log()
    );
    check_complete(&sub.snapshot(), 500);
    let log = gw.log();
    assert!(
        log.contains("WARN") && log.contains("does not speak MQTT 5"),
        "{log}"
    );
    assert!(old.refused_v5.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let proto = gw.status()["upstream"]["protocol"].clone();
    assert!(proto.as_str().unwrap_or("").starts_with("3.1.1"), "{proto}");
}

/// Events of the backlog, events arriving during the drain, and the pace.
const BACKLOG: u64 = 100_000;
const LIVE: u64 = 600;
const DRAIN_RATE: f64 = 10_000.0;

#[test]
fn live_events_go_first_while_a_100k_backlog_drains_paced_and_kill9_loses_nothing() {
    // The broker first: a port picked free before it could be handed to it too.
    let up = Mosquitto::start("");
    let port = free_port();
    // No write budget: the 100,000-event burst would spend it, and commits would then wait
    // up to budget_max_wait; what is measured here is the forwarder's order.
    let mut gw = Gateway::start(&format!(
        "[buffer]\nwrite_budget = \"0\"\n{}",
        upstream_cfg(
            port,
            &format!("drain = \"live_first\"\ndrain_rate = \"{DRAIN_RATE}/s\""),
        )
    ));
    let sim = run_sim(gw.mqtt_port, BACKLOG, 0.0, &["--client-id", "backlog"]);
    assert_eq!(sim["acked"], BACKLOG);
    assert!(
        gw.wait_metric(
            "tidepool_backlog_events",
            BACKLOG as f64,
            Duration::from_secs(60)
        ),
        "not all buffered: {:?}",
        gw.metric("tidepool_backlog_events")
    );
    let log = BatchLog::start(up.port, TOPIC);
    let _link = Proxy::start_on(port, up.port);
    assert!(gw.wait_metric("tidepool_upstream_connected", 1.0, Duration::from_secs(10)));
    // The outage ends; live events flow at 100/s while the backlog drains (10 s at 10,000/s).
    let live = spawn_sim(gw.mqtt_port, LIVE / 2, 100.0, &["--client-id", "live"]);
    // Live events arrive while the backlog is still draining.
    let live_first = log.wait_for(Duration::from_secs(15), |b| {
        drain_figures(b, "mqtt:live").live_during >= 100
    });
    let st = gw.status();
    println!("during the drain: {}", st["upstream"]["drain"]);
    assert_eq!(st["upstream"]["drain"]["mode"], "live_first");
    assert!(
        st["upstream"]["drain"]["backlog_left"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );
    drop(live);
    let snap = log.snapshot();
    let early = drain_figures(&snap, "mqtt:live");
    assert!(
        live_first,
        "live events waited behind the backlog: {early:?}; status {}; log:\n{}",
        gw.status(),
        gw.log()
    );
    // Never faster than the pace, measured before the kill so the restart's gap does not
    // hide a pacer running fast. The pace lets the first batch go at once: the rate is of
    // what followed it, with 10% for the clocks.
    let first = snap
        .iter()
        .find(|b| b.backlog)
        .map_or(0, |b| b.events.len()) as f64;
    let paced = (early.backlog_events as f64 - first) / early.backlog_secs.max(0.001);
    assert!(
        paced <= DRAIN_RATE * 1.1,
        "drained at {paced:.0} events/s after the first batch, over drain_rate {DRAIN_RATE}"
    );

    // kill -9 in the middle of the drain.
    let before = log.distinct("mqtt:backlog").len();
    gw.proc.kill9();
    gw.launch();
    let live = spawn_sim(
        gw.mqtt_port,
        LIVE / 2,
        100.0,
        &["--client-id", "live2", "--seed", "2"],
    );
    let all = log.wait_for(Duration::from_secs(90), |b| {
        has(b, "mqtt:backlog", BACKLOG) && has(b, "mqtt:live2", LIVE / 2)
    });
    drop(live);
    let batches = log.snapshot();
    let f = drain_figures(&batches, "mqtt:live2");
    println!(
        "live_first drain of {BACKLOG} at drain_rate {DRAIN_RATE}/s, kill -9 after {before} backlog events: \
         backlog {:.0} events/s before the kill, {:.0} events/s over {:.1} s in all; live latency during the drain p50 {} ms, p99 {} ms, max {} ms ({} live events)",
        early.backlog_rate, f.backlog_rate, f.backlog_secs, f.live_p50_ms, f.live_p99_ms, f.live_max_ms, f.live_during
    );
    assert!(
        all,
        "not everything arrived: backlog {}, live2 {}; log:\n{}",
        log.distinct("mqtt:backlog").len(),
        log.distinct("mqtt:live2").len(),
        gw.log()
    );
    assert!(
        before < BACKLOG as usize,
        "the kill came after the drain ended"
    );
    // Every event once at least, same id on every copy.
    let mut ids = std::collections::HashMap::new();
    for e in batches.iter().flat_map(|b| b.events.iter()) {
        let key = (e.source.clone(), e.n);
        assert_eq!(*ids.entry(key).or_insert(e.id), e.id, "{e:?} with two ids");
    }
    assert!(gw.wait_metric("tidepool_backlog_events", 0.0, Duration::from_secs(20)));
}

fn has(batches: &[tidepool_e2e::drain::Batch], source: &str, count: u64) -> bool {
    let n: std::collections::HashSet<u64> = batches
        .iter()
        .flat_map(|b| b.events.iter())
        .filter(|e| e.source == source)
        .filter_map(|e| e.n)
        .collect();
    n.len() as u64 >= count
}

/// Messages received: payload and properties.
type Received =
    std::sync::Arc<std::sync::Mutex<Vec<(Vec<u8>, rumqttc::v5::mqttbytes::v5::PublishProperties)>>>;

/// A QoS 1 MQTT 5 subscription collecting each message's payload and properties.
fn subscribe_v5(port: u16, topic: &str) -> (tokio::runtime::Runtime, Received) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (g, topic) = (got.clone(), topic.to_string());
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let mut o = MqttOptions::new("test-sub-v5", "127.0.0.1", port);
        o.set_max_packet_size(Some(16 << 20));
        let (client, mut el) = AsyncClient::new(o, 100);
        client
            .subscribe(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => g
                    .lock()
                    .unwrap()
                    .push((p.payload.to_vec(), p.properties.unwrap_or_default())),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(15)).expect("no SUBACK");
    (rt, got)
}

#[test]
fn gzip_batches_carry_their_properties_and_round_trip() {
    use tidepool::forward::compress::decompress_gzip;
    let up = Mosquitto::start("");
    let (_rt, got) = subscribe_v5(up.port, TOPIC);
    let gw = Gateway::start(&upstream_cfg(up.port, "compression = \"gzip\""));
    assert_eq!(run_sim(gw.mqtt_port, 2_000, 0.0, &[])["acked"], 2_000);
    let until = Instant::now() + Duration::from_secs(20);
    let mut events = std::collections::BTreeMap::new();
    let (mut raw, mut packed) = (0usize, 0usize);
    while events.len() < 2_000 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
        for (payload, props) in got.lock().unwrap().drain(..) {
            let user: std::collections::BTreeMap<String, String> =
                props.user_properties.iter().cloned().collect();
            assert_eq!(
                props.content_type.as_deref(),
                Some("application/vnd.tidepool.batch+json")
            );
            assert_eq!(user["gateway"], "test-gw");
            assert_eq!(user["encoding"], "json");
            assert_eq!(user["content-encoding"], "gzip");
            assert_eq!(props.payload_format_indicator, None, "gzip is not UTF-8");
            assert_eq!(&payload[..2], &[0x1f, 0x8b]);
            let json = decompress_gzip(&payload).expect("a gzip member");
            (raw, packed) = (raw + json.len(), packed + payload.len());
            let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
            let evs = v["events"].as_array().unwrap();
            assert_eq!(user["events"], evs.len().to_string());
            assert_eq!(user["first_id"], evs[0]["id"].to_string());
            assert_eq!(user["last_id"], evs[evs.len() - 1]["id"].to_string());
            assert_eq!(user["batch"], v["batch"].to_string());
            for e in evs {
                events.insert(e["payload"]["n"].as_u64().unwrap(), e["id"].as_u64());
            }
        }
    }
    println!(
        "gzip upstream: {} events, {raw} B of JSON in {packed} B ({:.1}x)",
        events.len(),
        raw as f64 / packed.max(1) as f64
    );
    assert_eq!(events.len(), 2_000, "log:\n{}", gw.log());
    assert!(packed * 3 < raw, "gzip should shrink simulator batches");
}
