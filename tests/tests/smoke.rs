//! A short end-to-end run: gateway + simulator + Mosquitto upstream, a few thousand events.
//! `scripts/test` also runs it on the aarch64 binaries under qemu-user (TIDEPOOL_BIN_DIR and
//! TIDEPOOL_RUNNER), to show they work on the Pi's architecture.

use std::time::Duration;

use tidepool_e2e::*;

#[test]
fn smoke_gateway_simulator_upstream() {
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &["tidepool/test-gw/events"]);
    let gw = Gateway::start(&format!(
        "[upstream]\nurl = \"mqtt://127.0.0.1:{}\"\nbatch_max_wait = \"100ms\"\n",
        up.port
    ));
    let sim = run_sim(gw.mqtt_port, 3_000, 1_500.0, &[]);
    assert_eq!(sim["acked"], 3_000);
    assert!(
        sub.wait_for(Duration::from_secs(60), |g| g.len() >= 3_000),
        "{} arrived; log:\n{}",
        sub.snapshot().len(),
        gw.log()
    );
    let (distinct, dups) = check_complete(&sub.snapshot(), 3_000);
    assert_eq!((distinct, dups), (3_000, 0));
    assert!(gw.wait_metric("tidepool_backlog_events", 0.0, Duration::from_secs(15)));
}
