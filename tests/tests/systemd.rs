//! systemd: readiness and watchdog notifications, and the unit's exposure score.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tidepool_e2e::*;

/// The gateway of `gw` run as systemd would, notifying `sock`, with one more variable set.
fn run_notified(gw: &Gateway, sock: &std::path::Path, var: (&str, &str), stderr: Stdio) -> Proc {
    Proc {
        child: Some(
            Command::new(bin_dir().join("tidepool"))
                .args(["run", "--config"])
                .arg(&gw.config)
                .env("NOTIFY_SOCKET", sock)
                .env(var.0, var.1)
                .stderr(stderr)
                .spawn()
                .unwrap(),
        ),
        name: "tidepool".into(),
    }
}

#[test]
fn ready_then_watchdog_pings_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let gw = Gateway::configure(dir.path().to_path_buf(), "");
    let started = Instant::now();
    let mut child = run_notified(&gw, &sock_path, ("WATCHDOG_USEC", "400000"), Stdio::null());
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    let ready = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(ready.starts_with("READY=1"), "{ready}");
    eprintln!(
        "start-up to READY=1: {:?} (debug build, empty store)",
        started.elapsed()
    );
    let mut pings = 0;
    while pings < 3 {
        let n = sock.recv(&mut buf).unwrap();
        if &buf[..n] == b"WATCHDOG=1" {
            pings += 1;
        }
    }
    assert_eq!(child.terminate(Duration::from_secs(15)), Some(0));
    let mut saw_stopping = false;
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Ok(n) = sock.recv(&mut buf) {
        saw_stopping |= &buf[..n] == b"STOPPING=1";
    }
    assert!(saw_stopping);
}

#[test]
fn unit_exposure_is_at_most_2_5() {
    let analyze =
        which("systemd-analyze").expect("systemd-analyze (package systemd): .ci/run installs it");
    let unit = root().join("systemd/tidepool.service");
    let out = Command::new(analyze)
        .args(["security", "--offline=yes"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string()
        + String::from_utf8_lossy(&out.stderr).as_ref();
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("tidepool.service: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in:\n{text}"));
    assert!(score <= 2.5, "exposure {score}:\n{text}");
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    for d in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "StateDirectory=tidepool",
        "ConfigurationDirectory=tidepool",
        "SupplementaryGroups=dialout",
        "After=network-online.target",
    ] {
        assert!(unit_text.contains(d), "unit lacks {d}");
    }
}

#[test]
fn after_kill9_the_repair_extends_the_start_timeout_before_ready() {
    let mut gw = Gateway::start("");
    run_sim(gw.mqtt_port, 2_000, 0.0, &[]);
    assert!(gw.wait_metric("tidepool_backlog_events", 2_000.0, Duration::from_secs(20)));
    gw.proc.kill9();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let log = dir.path().join("log");
    let mut child = run_notified(
        &gw,
        &sock_path,
        ("TIDEPOOL_LOG", "info"),
        std::fs::File::create(&log).unwrap().into(),
    );
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !seen
        .last()
        .is_some_and(|m: &String| m.starts_with("READY=1"))
    {
        let n = sock.recv(&mut buf).expect("READY=1 within 20 s");
        seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert!(
        seen[0].starts_with("EXTEND_TIMEOUT_USEC=") && seen[0].contains("STATUS=repairing"),
        "{seen:?}"
    );
    assert_eq!(child.terminate(Duration::from_secs(15)), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("not closed cleanly"), "{text}");
    gw.launch();
    assert_eq!(gw.status()["backlog_events"], 2_000, "{}", gw.log());
}
