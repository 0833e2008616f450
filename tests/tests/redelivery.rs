//! Redelivery at ingest: what a source sends again is stored once, and nothing distinct is
//! taken for a resend. Reliable serial across replugs; client mode with identical payloads
//! across `kill -9`.

use std::time::Duration;

use tidepool_e2e::ingest::{ids_by_n, ids_by_topic, pace, publish_identical};
use tidepool_e2e::*;

const TOPIC: &str = "tidepool/test-gw/events";

fn upstream_cfg(port: u16) -> String {
    format!(
        "[upstream]\nurl = \"mqtt://127.0.0.1:{port}\"\nbatch_max_wait = \"100ms\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n"
    )
}

/// Reliable serial (`ack = true`, cobs) while the cable is pulled and plugged back three times
/// with frames in flight: every frame is acknowledged, none is lost, and none is stored twice
/// (one id per device + seq), though the device resends its whole window after each replug.
#[test]
fn reliable_serial_replug_acks_everything_and_stores_each_frame_once() {
    const N: u64 = 6_000;
    let dir = tempfile::tempdir().unwrap();
    let mut pair = PtyPair::start(dir.path());
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    // 1,500 frames/s with 64 in flight: past what the default write budget lets through
    // (64 frames per budget_max_wait); this test is about replugs, not the budget.
    let gw = Gateway::start(&format!(
        "[[ingest.serial]]\nname = \"uart0\"\npath = \"{}\"\nframing = \"cobs\"\nack = true\n\n{}\n[buffer]\nwrite_budget = \"0\"\n",
        pair.a.display(),
        upstream_cfg(up.port)
    ));
    std::thread::sleep(Duration::from_millis(500));
    let mut sim = Proc {
        child: Some(
            std::process::Command::new(bin_dir().join("tidepool-sim"))
                .args(["--serial", pair.b.to_str().unwrap(), "--framing", "cobs"])
                .args([
                    "--count",
                    &N.to_string(),
                    "--rate",
                    "1500",
                    "--ack",
                    "--json",
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        ),
        name: "sim".into(),
    };
    let mut rng = fastrand::Rng::with_seed(0x9e91);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(rng.u64(600..1000)));
        pair.unplug();
        std::thread::sleep(Duration::from_millis(rng.u64(200..500)));
        pair.plug();
    }
    let out = sim.child.take().unwrap().wait_with_output().unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    sub.wait_for(Duration::from_secs(30), |g| {
        g.iter()
            .filter_map(|x| x.n)
            .collect::<std::collections::HashSet<_>>()
            .len() as u64
            >= N
    });
    std::thread::sleep(Duration::from_millis(500));
    let by_n = ids_by_n(&sub.snapshot());
    let missing = (0..N).filter(|n| !by_n.contains_key(n)).count();
    let stored_twice = by_n.values().filter(|ids| ids.len() > 1).count();
    let committed = gw.metric("tidepool_events_committed_total").unwrap_or(-1.0);
    eprintln!(
        "serial replug x3: sim {summary}; committed {committed}; distinct frames upstream {}, \
         missing {missing}, stored twice {stored_twice}",
        by_n.len()
    );
    assert_eq!(summary["acked"], N, "every frame acknowledged: {summary}");
    assert_eq!(missing, 0, "frames lost; log:\n{}", gw.log());
    assert_eq!(
        stored_twice, 0,
        "resent frames stored again under new ids ({stored_twice} of {N})"
    );
}

/// Client mode: 100,000 messages with the same payload on 5 topics (5 divides 65,535, so the
/// ingress broker reuses each packet id for the same topic and payload after a wrap), the
/// gateway killed with `kill -9` four times once packet ids have wrapped. Every message arrives
/// upstream at least once: per topic, at least as many distinct event ids as messages sent.
#[test]
fn client_mode_identical_payloads_survive_kill9() {
    const PER_TOPIC: u64 = 20_000;
    let topics = ["doors/0", "doors/1", "doors/2", "doors/3", "doors/4"];
    // A bounded in-flight window, as in any real deployment (Mosquitto's default is 20): with
    // none, PUBACKs can fall more than 65,535 messages behind and Mosquitto reuses a packet id
    // still in flight, which no receiver can tell apart.
    let ingress = Mosquitto::start("max_inflight_messages 1000\n");
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let cfg = format!(
        "[ingest.mqtt]\nmode = \"client\"\nbroker = \"mqtt://127.0.0.1:{}\"\ntopics = [\"doors/#\"]\n\n{}",
        ingress.port,
        upstream_cfg(up.port)
    );
    let mut gw = Gateway::start(&cfg);
    // Let the gateway's persistent session subscribe before anything is published.
    std::thread::sleep(Duration::from_millis(500));
    let allowed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // At most 20,000 messages between the publisher and upstream, at a rate the gateway keeps
    // up with: the ingress broker's packet ids for the gateway stay unique among those in flight.
    pace(sub.got.clone(), allowed.clone(), 20_000);
    let publisher = publish_identical(
        ingress.port,
        &topics,
        PER_TOPIC,
        b"{\"door\":\"closed\"}",
        8_000.0,
        allowed,
    );
    let total = PER_TOPIC * topics.len() as u64;
    let mut rng = fastrand::Rng::with_seed(0xd00d);
    for at in [68_000usize, 76_000, 84_000, 92_000] {
        sub.wait_for(Duration::from_secs(60), |g| g.len() >= at);
        std::thread::sleep(Duration::from_millis(rng.u64(0..200)));
        gw.proc.kill9();
        std::thread::sleep(Duration::from_millis(rng.u64(50..300)));
        gw.launch();
    }
    let acked = publisher.join().unwrap();
    assert_eq!(acked, total, "the ingress broker took every message");
    let complete = |g: &[Got]| {
        let m = ids_by_topic(g);
        topics
            .iter()
            .all(|t| m.get(*t).map_or(0, |ids| ids.len() as u64) >= PER_TOPIC)
    };
    let started = std::time::Instant::now();
    sub.wait_for(Duration::from_secs(60), complete);
    eprintln!(
        "client mode: complete {:.1} s after the last publish",
        started.elapsed().as_secs_f64()
    );
    // Let the last batches settle, then count.
    std::thread::sleep(Duration::from_millis(500));
    let by_topic = ids_by_topic(&sub.snapshot());
    let counts: Vec<u64> = topics
        .iter()
        .map(|t| by_topic.get(*t).map_or(0, |ids| ids.len() as u64))
        .collect();
    let lost: u64 = counts.iter().map(|c| PER_TOPIC.saturating_sub(*c)).sum();
    let extra: u64 = counts.iter().map(|c| c.saturating_sub(PER_TOPIC)).sum();
    eprintln!(
        "client mode, identical payloads, 4 x kill -9: sent {total} ({PER_TOPIC} per topic), \
         distinct ids per topic {counts:?}: lost {lost}, stored twice {extra}"
    );
    assert_eq!(
        lost,
        0,
        "messages lost; per topic {counts:?}; backlog {:?}",
        gw.metric("tidepool_backlog_events")
    );
}
