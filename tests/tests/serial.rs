//! Serial ingest end to end over pty pairs: simulator → serial → gateway → Mosquitto.

use std::io::Write;
use std::time::Duration;

use tidepool_e2e::*;

const TOPIC: &str = "tidepool/test-gw/events";

fn serial_cfg(port: &std::path::Path, framing: &str, ack: bool, up: u16) -> String {
    // A reliable device at 2,000 frames/s with 64 in flight is past what the default write
    // budget lets through (64 frames per budget_max_wait): these tests are about framing and
    // faults, so they run without a budget when acks are on.
    let budget = if ack {
        "\n[buffer]\nwrite_budget = \"0\"\n"
    } else {
        ""
    };
    format!(
        "[[ingest.serial]]\nname = \"uart0\"\npath = \"{}\"\nframing = \"{framing}\"\nack = {ack}\nmax_frame = \"1KiB\"\n\n[upstream]\nurl = \"mqtt://127.0.0.1:{up}\"\nbatch_max_wait = \"100ms\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n{budget}",
        port.display()
    )
}

fn serial_sim(
    port: &std::path::Path,
    framing: &str,
    count: u64,
    rate: f64,
    ack: bool,
) -> std::process::Command {
    let mut c = std::process::Command::new(bin_dir().join("tidepool-sim"));
    c.args([
        "--serial",
        port.to_str().unwrap(),
        "--framing",
        framing,
        "--count",
        &count.to_string(),
        "--rate",
        &rate.to_string(),
        "--json",
    ]);
    if ack {
        c.arg("--ack");
    }
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    c
}

fn end_to_end(framing: &str) {
    let dir = tempfile::tempdir().unwrap();
    let pair = PtyPair::start(dir.path());
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let gw = Gateway::start(&serial_cfg(&pair.a, framing, false, up.port));
    std::thread::sleep(Duration::from_millis(500));
    let out = serial_sim(&pair.b, framing, 3_000, 2_000.0, false)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        sub.wait_for(Duration::from_secs(30), |g| g.len() >= 3_000),
        "{framing}: {} arrived; log:\n{}",
        sub.snapshot().len(),
        gw.log()
    );
    let got = sub.snapshot();
    check_complete(&got, 3_000);
    assert_eq!(got[0].event["source"], "serial:uart0");
    if framing == "lines" {
        assert!(
            got[0].event["topic"]
                .as_str()
                .unwrap()
                .starts_with("sensors/"),
            "the line's topic is used"
        );
    } else {
        assert_eq!(got[0].event["topic"], "serial/uart0");
        assert!(got[0].payload["device"]
            .as_str()
            .unwrap()
            .starts_with("sensor-"));
    }
    assert_eq!(
        gw.metric("tidepool_events_dropped_total{reason=\"bad_frame\"}"),
        Some(0.0)
    );
}

#[test]
fn lines_end_to_end() {
    end_to_end("lines");
}

#[test]
fn cobs_end_to_end() {
    end_to_end("cobs");
}

#[test]
fn bad_frames_are_counted_and_dead_lettered_once_good_ones_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let pair = PtyPair::start(dir.path());
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let gw = Gateway::start(&serial_cfg(&pair.a, "lines", false, up.port));
    std::thread::sleep(Duration::from_millis(500));
    let mut tty = std::fs::OpenOptions::new()
        .write(true)
        .open(&pair.b)
        .unwrap();
    let mut good = 0;
    let (mut bad, mut oversize) = (0, 0);
    for i in 0..50u64 {
        match i % 5 {
            0 => {
                tty.write_all(b"{not json\n").unwrap();
                bad += 1;
            }
            1 => {
                tty.write_all(&[0xff, 0xfe, b'\n']).unwrap();
                bad += 1;
            }
            2 => {
                tty.write_all(format!("{{\"pad\":\"{}\"}}\n", "x".repeat(2000)).as_bytes())
                    .unwrap();
                oversize += 1;
            }
            _ => {
                tty.write_all(format!("{{\"n\":{good}}}\n").as_bytes())
                    .unwrap();
                good += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        sub.wait_for(Duration::from_secs(20), |g| g.len() as u64 >= good),
        "log:\n{}",
        gw.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    check_complete(&sub.snapshot(), good);
    assert_eq!(sub.snapshot().len() as u64, good);
    assert_eq!(
        gw.metric("tidepool_events_dropped_total{reason=\"bad_frame\"}"),
        Some(bad as f64)
    );
    assert_eq!(
        gw.metric("tidepool_events_dropped_total{reason=\"oversize\"}"),
        Some(oversize as f64)
    );
    assert_eq!(
        gw.metric("tidepool_dlq_events"),
        Some((bad + oversize) as f64)
    );
    let out = gw.cli(&["dlq", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["rule"], "serial:uart0");
    assert!(list[0]["error"].as_str().unwrap().starts_with("bad JSON"));
    assert_eq!(
        list[0]["event"]["payload"], "e25vdCBqc29u",
        "raw bytes kept (base64)"
    );
}

#[test]
fn unplug_and_replug_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut pair = PtyPair::start(dir.path());
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let gw = Gateway::start(&serial_cfg(&pair.a, "lines", false, up.port));
    std::thread::sleep(Duration::from_millis(500));
    serial_sim(&pair.b, "lines", 500, 0.0, false)
        .output()
        .unwrap();
    assert!(sub.wait_for(Duration::from_secs(20), |g| g.len() >= 500));
    pair.unplug();
    std::thread::sleep(Duration::from_millis(1500));
    pair.plug();
    // Give the gateway its backoff to find the port again.
    let until = std::time::Instant::now() + Duration::from_secs(15);
    while !gw.log().matches("serial port open").count().ge(&2) && std::time::Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = serial_sim(&pair.b, "lines", 500, 0.0, false)
        .args(["--seed", "2"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        sub.wait_for(Duration::from_secs(20), |g| g.len() >= 1_000),
        "log:\n{}",
        gw.log()
    );
    let log = gw.log();
    assert!(log.contains("serial port closed; retrying"), "{log}");
    assert_eq!(log.matches("serial port open").count(), 2, "{log}");
}

#[test]
fn reliable_serial_survives_kill9() {
    let dir = tempfile::tempdir().unwrap();
    let pair = PtyPair::start(dir.path());
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let mut gw = Gateway::start(&serial_cfg(&pair.a, "cobs", true, up.port));
    std::thread::sleep(Duration::from_millis(500));
    let mut sim = Proc {
        child: Some(
            serial_sim(&pair.b, "cobs", 10_000, 2_000.0, true)
                .spawn()
                .unwrap(),
        ),
        name: "sim".into(),
    };
    let mut rng = fastrand::Rng::with_seed(4);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(rng.u64(400..1200)));
        gw.proc.kill9();
        std::thread::sleep(Duration::from_millis(rng.u64(50..300)));
        gw.launch();
    }
    let out = sim.child.take().unwrap().wait_with_output().unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        sub.wait_for(Duration::from_secs(60), |g| g
            .iter()
            .filter_map(|x| x.n)
            .collect::<std::collections::HashSet<_>>()
            .len()
            >= 10_000),
        "only {} of 10000 distinct frames arrived; sim: {summary}; log:\n{}",
        sub.distinct_n().len(),
        gw.log()
    );
    eprintln!("reliable serial: sim {summary}");
}

fn faults(framing: &str) {
    let dir = tempfile::tempdir().unwrap();
    let pair = PtyPair::start(dir.path());
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let gw = Gateway::start(&serial_cfg(&pair.a, framing, false, up.port));
    std::thread::sleep(Duration::from_millis(500));
    let out = serial_sim(&pair.b, framing, 2_000, 4_000.0, false)
        .args([
            "--faults",
            "garbage=0.02,truncated=0.02,invalid=0.02,oversize=0.01,disconnect=0.002,burst=0.005",
            "--seed",
            "9",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (bad, over) = (
        summary["faults"]["bad"].as_u64().unwrap(),
        summary["faults"]["oversize"].as_u64().unwrap(),
    );
    assert!(bad > 20 && over > 5, "faults were injected: {summary}");
    assert!(
        summary["faults"]["disconnects"].as_u64().unwrap() > 0
            && summary["faults"]["bursts"].as_u64().unwrap() > 0,
        "{summary}"
    );
    assert!(
        sub.wait_for(Duration::from_secs(30), |g| g.len() >= 2_000),
        "{framing}: {} arrived; {summary}; log:\n{}",
        sub.snapshot().len(),
        gw.log()
    );
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while gw.metric("tidepool_dlq_events") != Some((bad + over) as f64)
        && std::time::Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    check_complete(&sub.snapshot(), 2_000);
    assert_eq!(sub.snapshot().len(), 2_000, "no bad frame was forwarded");
    assert_eq!(
        gw.metric("tidepool_events_dropped_total{reason=\"bad_frame\"}"),
        Some(bad as f64),
        "{summary}"
    );
    assert_eq!(
        gw.metric("tidepool_events_dropped_total{reason=\"oversize\"}"),
        Some(over as f64),
        "{summary}"
    );
    assert_eq!(
        gw.metric("tidepool_dlq_events"),
        Some((bad + over) as f64),
        "each bad frame dead-lettered exactly once"
    );
}

#[test]
fn faults_lines() {
    faults("lines");
}

#[test]
fn faults_cobs() {
    faults("cobs");
}

#[test]
fn a_port_missing_at_start_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    // The gateway starts before the port exists: not fatal, it retries.
    let gw = Gateway::start(&serial_cfg(
        &dir.path().join("ttyA"),
        "lines",
        false,
        up.port,
    ));
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        gw.log().contains("cannot open serial port; retrying"),
        "{}",
        gw.log()
    );
    assert_eq!(gw.status()["store_healthy"], true);
    let pair = PtyPair::start(dir.path());
    let until = std::time::Instant::now() + Duration::from_secs(15);
    while !gw.log().contains("serial port open") && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    serial_sim(&pair.b, "lines", 200, 0.0, false)
        .output()
        .unwrap();
    assert!(
        sub.wait_for(Duration::from_secs(20), |g| g.len() >= 200),
        "log:\n{}",
        gw.log()
    );
    assert_eq!(
        gw.log().matches("cannot open serial port").count(),
        1,
        "logged once per state change"
    );
}
