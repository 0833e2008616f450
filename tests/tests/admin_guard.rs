//! The admin endpoint guards itself: no cross-site writes, a token when one is configured, a
//! bounded number of connections, clients that cannot hold a slot, a deadline on a busy store.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::{Client, MqttOptions, QoS};
use tidepool_e2e::admin::{post_json, read_reply, send};
use tidepool_e2e::*;

/// A rule that dead-letters everything on `bad/#`; `slow` inputs first spin until the call's
/// time budget ends.
const FAILING: &str = "const TOPICS = [\"bad/#\"];\n\
    fn on_event(e) { if e.payload.slow == true { loop {} } throw \"no good\"; }";

fn rules_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("10-bad.rhai"), FAILING).unwrap();
    d
}

/// A gateway with `rules` and `rules_extra` in `[rules]`, `admin` keys in `[admin]` (its
/// folder is dropped after it).
fn gateway(rules: &Path, rules_extra: &str, admin: &str) -> (tempfile::TempDir, Gateway) {
    let tmp = tempfile::tempdir().unwrap();
    let mut gw = Gateway::configure(
        tmp.path().to_path_buf(),
        &format!("[rules]\ndir = \"{}\"\n{rules_extra}\n", rules.display()),
    );
    let text = std::fs::read_to_string(&gw.config).unwrap();
    let text = text.replacen("[admin]\n", &format!("[admin]\n{admin}\n"), 1);
    std::fs::write(&gw.config, text).unwrap();
    gw.launch();
    (tmp, gw)
}

fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Publishes `n` events the rule fails on (`slow` ones spin first); waits for `wait_for` dead letters.
fn dead_letters(gw: &Gateway, n: usize, slow: bool, wait_for: Option<f64>) {
    let (c, mut conn) = Client::new(
        MqttOptions::new("bad-sensor", "127.0.0.1", gw.mqtt_port),
        100,
    );
    let t = std::thread::spawn(move || {
        for e in conn.iter() {
            if matches!(
                e,
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect))
            ) {
                break;
            }
        }
    });
    for i in 0..n {
        c.publish(
            "bad/1",
            QoS::AtLeastOnce,
            false,
            format!("{{\"i\":{i},\"slow\":{slow}}}"),
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let _ = c.disconnect();
    let _ = t.join();
    if let Some(want) = wait_for {
        assert!(
            wait_until(Duration::from_secs(20), || gw.metric("tidepool_dlq_events")
                == Some(want)),
            "dead letters: {:?}; log:\n{}",
            gw.metric("tidepool_dlq_events"),
            gw.log()
        );
    }
}

fn dlq_count(gw: &Gateway) -> Option<f64> {
    gw.metric("tidepool_dlq_events")
}

#[test]
fn cross_site_writes_are_refused_and_same_origin_json_is_accepted() {
    let rules = rules_dir();
    let (_dir, gw) = gateway(rules.path(), "", "");
    let port = gw.admin_port;
    dead_letters(&gw, 3, false, Some(3.0));

    // What a web page open on the box can send: a fetch() carrying its Origin...
    let r = post_json(port, "/dlq/drop", &[("Origin", "http://evil.example")]);
    assert_eq!(r.code, 403, "{r:?}");
    assert!(r.body.contains("cross-origin"), "{r:?}");
    // ...or a plain HTML form (no preflight): form-encoded or text/plain, Origin or not.
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let r = send(port, "POST", "/dlq/drop", &form, "ids=1");
    assert_eq!(r.code, 415, "{r:?}");
    let r = send(
        port,
        "POST",
        "/dlq/retry",
        &[("Content-Type", "text/plain"), ("Origin", "null")],
        "{}",
    );
    assert_eq!(r.code, 403, "{r:?}");
    let r = send(
        port,
        "POST",
        "/dlq/drop",
        &[("Content-Type", "text/plain")],
        "{}",
    );
    assert_eq!(r.code, 415, "{r:?}");
    // A DNS name pointed at 127.0.0.1 (rebinding) cannot read or write.
    let rebound = format!("rebind.evil.example:{port}");
    let r = send(port, "GET", "/dlq", &[("Host", &rebound)], "");
    assert_eq!(r.code, 403, "{r:?}");
    let r = post_json(port, "/dlq/drop", &[("Host", &rebound)]);
    assert_eq!(r.code, 403, "{r:?}");
    assert_eq!(dlq_count(&gw), Some(3.0), "nothing was dropped");

    // The endpoint's own origin, or none (curl, the CLI), with a JSON body: accepted.
    let list: serde_json::Value =
        serde_json::from_str(&send(port, "GET", "/dlq", &[], "").body).unwrap();
    let first = list[0]["id"].to_string();
    let own = format!("http://127.0.0.1:{port}");
    let r = post_json(port, &format!("/dlq/drop?ids={first}"), &[("Origin", &own)]);
    assert_eq!((r.code, r.body.trim()), (200, "dropped 1 dead letters"));
    let r = post_json(port, "/dlq/drop", &[]);
    assert_eq!((r.code, r.body.trim()), (200, "dropped 2 dead letters"));
    assert_eq!(dlq_count(&gw), Some(0.0));
    // Reads without payloads stay open to anyone (Prometheus, health checks).
    let r = send(
        port,
        "GET",
        "/metrics",
        &[("Origin", "http://evil.example")],
        "",
    );
    assert_eq!(r.code, 200);
}

#[test]
fn a_configured_token_guards_payloads_and_writes_and_the_cli_finds_it() {
    let rules = rules_dir();
    let secret = tempfile::tempdir().unwrap();
    let token_file = secret.path().join("admin-token");
    std::fs::write(&token_file, "t0ken-for-the-test\n").unwrap();
    let (_dir, gw) = gateway(
        rules.path(),
        "",
        &format!("token_file = \"{}\"", token_file.display()),
    );
    let port = gw.admin_port;
    dead_letters(&gw, 2, false, Some(2.0));
    let right = ("Authorization", "Bearer t0ken-for-the-test");
    let wrong = ("Authorization", "Bearer t0ken-for-the-tesT");

    for h in [vec![], vec![wrong]] {
        let r = send(port, "GET", "/dlq", &h, "");
        assert_eq!(r.code, 401, "GET /dlq with {h:?}: {r:?}");
        assert!(!r.body.contains("no good"), "no payloads without the token");
        let r = post_json(port, "/dlq/drop", &h);
        assert_eq!(r.code, 401, "POST with {h:?}: {r:?}");
    }
    assert_eq!(dlq_count(&gw), Some(2.0), "nothing was dropped");
    let r = send(port, "GET", "/dlq", &[right], "");
    assert_eq!(r.code, 200, "{r:?}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r.body).unwrap()[1]["error"]
            .as_str()
            .map(|e| e.contains("no good")),
        Some(true),
        "{r:?}"
    );
    // Counters stay open.
    assert_eq!(send(port, "GET", "/status", &[], "").code, 200);

    // The CLI reads the token from the config by itself.
    let out = gw.cli(&["dlq", "list", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(list.as_array().map(|a| a.len()), Some(2));
    let out = gw.cli(&["dlq", "drop", "--id", &list[0]["id"].to_string()]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("dropped 1"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = gw.cli(&["status"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("running"));
    // The right token with a JSON body drops the last one.
    let r = post_json(port, "/dlq/drop", &[right]);
    assert_eq!((r.code, r.body.trim()), (200, "dropped 1 dead letters"));
    assert_eq!(dlq_count(&gw), Some(0.0));
}

#[test]
fn idle_and_slow_clients_neither_hold_slots_nor_block_new_requests() {
    let rules = rules_dir();
    let (_dir, gw) = gateway(rules.path(), "", "max_connections = 4\nio_timeout = \"2s\"");
    let port = gw.admin_port;
    // Let the start-up probe's connection finish and free its slot.
    assert_eq!(send(port, "GET", "/healthz", &[], "").code, 200);
    std::thread::sleep(Duration::from_millis(300));
    // Four idle connections take every slot...
    let mut idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // ...so more are answered 503 at once and closed, a request included.
    for _ in 0..3 {
        let mut extra = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let r = read_reply(&mut extra, Duration::from_secs(1)).expect("refused at once");
        assert_eq!(r.code, 503, "{r:?}");
        assert!(r.body.contains("too many"), "{r:?}");
    }
    // (A request sent at once may meet the close before the 503: refused either way.)
    let r = send(port, "GET", "/metrics", &[], "");
    assert!(r.code == 503 || r.code == 0, "{r:?}");
    // The idle ones are closed after io_timeout (408), which frees the slots.
    for s in &mut idle {
        let r = read_reply(s, Duration::from_secs(6)).expect("an idle client is closed");
        assert_eq!(r.code, 408, "{r:?}");
    }
    assert_eq!(send(port, "GET", "/metrics", &[], "").code, 200);

    // Half a request, or one trickled a byte at a time, is cut off too: the deadline is for
    // the whole request, not for each read.
    let mut half = TcpStream::connect(("127.0.0.1", port)).unwrap();
    half.write_all(b"POST /dlq/drop HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    let mut trickle = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let started = Instant::now();
    let mut cut = false;
    for b in b"GET /metrics HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if trickle.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(150));
        if started.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    let r = read_reply(&mut trickle, Duration::from_secs(6)).expect("a trickling client is closed");
    assert!(cut || r.code == 408, "{r:?}");
    let r = read_reply(&mut half, Duration::from_secs(6)).expect("half a request is closed");
    assert_eq!(r.code, 408, "{r:?}");
    assert_eq!(send(port, "GET", "/healthz", &[], "").code, 200);
}

#[test]
fn a_write_waits_for_a_busy_store_at_most_the_reply_deadline() {
    let rules = rules_dir();
    let (_dir, gw) = gateway(
        rules.path(),
        "max_call_time = \"3s\"\nmax_operations = 0",
        "reply_timeout = \"500ms\"",
    );
    let port = gw.admin_port;
    // Two inputs that each hold the commit loop for its whole 3 s call budget.
    dead_letters(&gw, 2, true, None);
    let r = post_json(port, "/dlq/drop", &[]);
    assert_eq!(r.code, 503, "{r:?}");
    assert!(
        r.body.contains("busy") && r.body.contains("reply_timeout"),
        "{r:?}"
    );
    // Reads that do not need the commit loop are answered meanwhile.
    assert_eq!(send(port, "GET", "/status", &[], "").code, 200);
    assert_eq!(send(port, "GET", "/dlq", &[], "").code, 200);
    // Once the store is free the queued drop has run, and writes are answered again.
    assert!(wait_until(Duration::from_secs(20), || {
        post_json(port, "/dlq/drop", &[]).code == 200
    }));
}
