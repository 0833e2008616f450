//! Bad config, bad payloads, an upstream that refuses us: clear messages, no crash, no loss.

use std::process::Command;
use std::time::Duration;

use rumqttc::{Client, MqttOptions, QoS};
use tidepool_e2e::*;

const TOPIC: &str = "tidepool/test-gw/events";

fn check(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, text).unwrap();
    let out = Command::new(bin_dir().join("tidepool"))
        .args(["check", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&out.stderr).replace(&p.display().to_string(), "FILE");
    (out.status.code().unwrap_or(-1), msg)
}

#[test]
fn check_rejects_bad_config_with_file_line_key_and_fix() {
    let cases = [
        (
            "[upstream]\nurl = \"mqtt://h:1\"\nbatch_max_event = 5\n",
            "FILE:3: key `upstream.batch_max_event`: unknown field",
        ),
        (
            "[buffer]\nmax_bytes = \"lots\"\n",
            "FILE:2: key `buffer.max_bytes`",
        ),
        ("[buffer]\nwhen_full = \"panic\"\n", "drop_oldest"),
        (
            "[upstream]\nurl = \"https://x\"\n",
            "must start with mqtt:// or mqtts://",
        ),
        ("[ingest.mqtt]\nmode = \"bridge\"\n", "`embedded`"),
        ("[gateway\n", "not valid TOML"),
        ("[sensors]\nx = 1\n", "unknown field `sensors`"),
        (
            "[upstream]\ncert_file = \"/c.pem\"\n",
            "set both or neither",
        ),
        (
            "[[sink]]\nname = \"site\"\nkind = \"mqtt\"\nurl = \"mqtts://127.0.0.1:1\"\nca_file = \"/nonexistent/ca.pem\"\n",
            "sink `site`: TLS: key `sink[0].ca_file`",
        ),
        (
            "[[sink]]\nname = \"fn\"\nkind = \"http\"\nurl = \"http://127.0.0.1:1/\"\nusername = \"u\"\n",
            "key `sink[0].username`: is for kind = \"mqtt\" sinks",
        ),
    ];
    for (text, want) in cases {
        let (code, msg) = check(text);
        assert_eq!(code, 1, "exit code for {text:?}: {msg}");
        assert!(
            msg.contains(want),
            "for {text:?} expected `{want}` in: {msg}"
        );
    }
    let (code, _) = check("[gateway]\nid = \"ok\"\n");
    assert_eq!(code, 0);
    let out = Command::new(bin_dir().join("tidepool"))
        .args(["check", "--print-defaults"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("batch_max_events = 500") && text.contains("when_full = \"drop_oldest\"")
    );
}

#[test]
fn check_names_a_missing_serial_port_and_exits_1() {
    let text = "[[ingest.serial]]\nname = \"uart0\"\npath = \"/dev/null\"\n\n\
                [[ingest.serial]]\nname = \"uart9\"\npath = \"/dev/tidepool-no-such-port\"\n";
    let (code, msg) = check(text);
    assert_eq!(code, 1, "{msg}");
    assert!(
        msg.contains("FILE:7: key `ingest.serial[1].path`")
            && msg.contains("/dev/tidepool-no-such-port"),
        "{msg}"
    );
    assert!(
        !msg.contains("/dev/null"),
        "the port that exists is fine: {msg}"
    );
}

#[test]
fn check_compiles_rules_with_the_configured_limits() {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(
        rules.path().join("10-two.rhai"),
        "fn helper(x) { x + 1 }\nfn on_event(e) { e.payload.n = helper(e.payload.n); e.payload.tag = \"a longer literal\"; e }\n",
    )
    .unwrap();
    let dir = format!("[rules]\ndir = \"{}\"\n", rules.path().display());
    let (code, msg) = check(&dir);
    assert_eq!(code, 0, "with the default limits the rule compiles: {msg}");
    for (limit, want) in [
        ("max_functions = 1", "Number of functions"),
        ("max_string_size = \"8B\"", "Length of string"),
    ] {
        let (code, msg) = check(&format!("{dir}{limit}\n"));
        assert_eq!(code, 1, "{limit}: {msg}");
        assert!(
            msg.contains("10-two.rhai:") && msg.contains(want),
            "{limit}: {msg}"
        );
    }
}

#[test]
fn check_refuses_a_huge_duration_instead_of_panicking() {
    for (text, key) in [
        (
            "[rules]\ntick = \"99999999999999999999d\"\n",
            "FILE:2: key `rules.tick`",
        ),
        (
            "[buffer]\nmax_age = \"40000d\"\n",
            "FILE:2: key `buffer.max_age`",
        ),
    ] {
        let (code, msg) = check(text);
        assert_eq!(code, 1, "{text}: {msg}");
        assert!(
            msg.contains(key) && msg.contains("too long"),
            "{text}: {msg}"
        );
        assert!(!msg.contains("panicked"), "{msg}");
    }
}

#[test]
fn non_json_and_oversize_payloads() {
    let up = Mosquitto::start("");
    let sub = Subscriber::start(up.port, &[TOPIC]);
    let gw = Gateway::start(&format!(
        "[ingest.mqtt]\nmax_payload = \"1KiB\"\n[upstream]\nurl = \"mqtt://127.0.0.1:{}\"\nbatch_max_wait = \"100ms\"\n",
        up.port
    ));
    let (client, mut conn) = Client::new(
        MqttOptions::new("bad-sensor", "127.0.0.1", gw.mqtt_port),
        10,
    );
    std::thread::spawn(move || for _ in conn.iter() {});
    client
        .publish(
            "sensors/1/raw",
            QoS::AtLeastOnce,
            false,
            vec![0xde, 0xad, 0xbe, 0xef],
        )
        .unwrap();
    client
        .publish("sensors/1/big", QoS::AtLeastOnce, false, vec![b'x'; 2000])
        .unwrap();
    client
        .publish("sensors/1/text", QoS::AtLeastOnce, false, "on")
        .unwrap();
    client
        .publish("sensors/1/json", QoS::AtLeastOnce, false, r#"{"n":1}"#)
        .unwrap();
    assert!(
        sub.wait_for(Duration::from_secs(20), |g| g.len() >= 3),
        "log:\n{}",
        gw.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    let got = sub.snapshot();
    assert_eq!(got.len(), 3, "the oversize payload is not forwarded");
    assert_eq!(got[0].event["payload"], "3q2+7w==");
    assert_eq!(got[0].event["payload_encoding"], "base64");
    assert_eq!(got[1].event["payload"], "b24=");
    assert_eq!(got[2].event["payload"]["n"], 1);
    assert_eq!(
        gw.metric("tidepool_events_dropped_total{reason=\"oversize\"}"),
        Some(1.0)
    );
    assert_eq!(
        gw.metric("tidepool_events_ingested_total{source=\"mqtt\"}"),
        Some(4.0)
    );
    let (code, _) = (gw.status()["store_healthy"].as_bool(), ());
    assert_eq!(code, Some(true));
}

/// A Mosquitto `password_file` in `dir` with one user.
fn password_file(dir: &std::path::Path, user: &str, password: &str) -> std::path::PathBuf {
    let pw = dir.join("passwd");
    let st = Command::new(which("mosquitto_passwd").expect("mosquitto_passwd (package mosquitto)"))
        .args(["-b", "-c"])
        .arg(&pw)
        .args([user, password])
        .status()
        .unwrap();
    assert!(st.success());
    pw
}

#[test]
fn bad_credentials_are_reported_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let pw = password_file(dir.path(), "gw", "right");
    let port = free_port();
    let up = Mosquitto::start_on(
        port,
        &format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
            pw.display()
        ),
    );
    let mut gw = Gateway::start(&format!(
        "[upstream]\nurl = \"mqtt://127.0.0.1:{port}\"\nusername = \"gw\"\npassword = \"wrong\"\nreconnect_max = \"1s\"\n"
    ));
    run_sim(gw.mqtt_port, 500, 0.0, &[]);
    std::thread::sleep(Duration::from_secs(2));
    let v = gw.status();
    assert_eq!(v["upstream"]["state"], "offline", "{v}");
    assert!(
        v["upstream"]["last_error"]
            .as_str()
            .unwrap()
            .contains("username and password"),
        "{v}"
    );
    assert_eq!(
        http_get(gw.admin_port, "/healthz").as_deref(),
        Some("ok\n"),
        "an upstream outage is not ill health"
    );
    assert_eq!(v["backlog_events"], 500);
    let human = String::from_utf8(gw.cli(&["status"]).stdout).unwrap();
    assert!(human.contains("username and password"), "{human}");

    // Fixed credentials: everything arrives.
    assert_eq!(gw.proc.terminate(Duration::from_secs(15)), Some(0));
    let text = std::fs::read_to_string(&gw.config)
        .unwrap()
        .replace("\"wrong\"", "\"right\"");
    std::fs::write(&gw.config, text).unwrap();
    let sub_opts_port = up.port;
    // Subscribing needs credentials too.
    let mut o = MqttOptions::new("checker", "127.0.0.1", sub_opts_port);
    o.set_credentials("gw", "right");
    o.set_max_packet_size(1 << 20, 1 << 16);
    let (c, mut conn) = Client::new(o, 10);
    c.subscribe(TOPIC, QoS::AtLeastOnce).unwrap();
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let k = counter.clone();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = ev {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                k.fetch_add(
                    v["events"].as_array().unwrap().len() as u64,
                    std::sync::atomic::Ordering::SeqCst,
                );
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    gw.launch();
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while counter.load(std::sync::atomic::Ordering::SeqCst) < 500
        && std::time::Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(counter.load(std::sync::atomic::Ordering::SeqCst), 500);
}

/// Replaces the `[upstream]` section of the gateway's config (the last section the harness
/// writes) with `upstream`.
fn set_upstream(gw: &Gateway, upstream: &str) {
    let text = std::fs::read_to_string(&gw.config).unwrap();
    let head = text.split("[upstream]").next().unwrap();
    std::fs::write(&gw.config, format!("{head}[upstream]\n{upstream}")).unwrap();
}

/// Waits up to 10 s for `/status` to show an upstream error; returns the status.
fn wait_upstream_error(gw: &Gateway) -> serde_json::Value {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = gw.status();
        let err = v["upstream"]["last_error"].as_str().unwrap_or("");
        if !err.is_empty() || std::time::Instant::now() >= until {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Upstream TLS against one Mosquitto with a listener per server certificate: a CA that did
/// not sign the broker's certificate, an expired certificate, a certificate for another host,
/// and (against a listener that requires one) no client certificate are each refused while
/// the events stay buffered, and `/status` and `tidepool status` say which it was; with the
/// right CA and the client certificate (mTLS) everything buffered arrives.
#[test]
fn upstream_tls_refusals_are_reported_while_buffering_then_mtls_delivers() {
    let pki = pki::Pki::new();
    let (mtls, expired, wrong_host, plain) = (free_port(), free_port(), free_port(), free_port());
    let listener = |port: u16, server: &pki::CertFiles, extra: &str| {
        format!(
            "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n{extra}",
            pki.ca, server.cert, server.key
        )
    };
    let _up = Mosquitto::start_on(
        mtls,
        &format!(
            "allow_anonymous true\n{}{}{}listener {plain} 127.0.0.1\n",
            listener(mtls, &pki.server, "require_certificate true\n"),
            listener(expired, &pki.expired, ""),
            listener(wrong_host, &pki.wrong_host, ""),
        ),
    );
    assert!(
        wait_port(expired, Duration::from_secs(5)) && wait_port(wrong_host, Duration::from_secs(5))
    );
    let sub = Subscriber::start(plain, &[TOPIC]);
    let client = format!(
        "cert_file = \"{}\"\nkey_file = \"{}\"\n",
        pki.client.cert, pki.client.key
    );
    let upstream = |port: u16, ca: &str, client: &str| {
        format!("url = \"mqtts://127.0.0.1:{port}\"\nca_file = \"{ca}\"\n{client}reconnect_max = \"1s\"\nbatch_max_wait = \"100ms\"\n")
    };
    let cases = [
        (
            "wrong CA",
            upstream(mtls, &pki.other_ca, &client),
            "unknown CA: the broker's certificate is not signed by a CA in upstream.ca_file",
        ),
        (
            "expired",
            upstream(expired, &pki.ca, &client),
            "the broker's certificate expired ",
        ),
        (
            "wrong host",
            upstream(wrong_host, &pki.ca, &client),
            "the broker's certificate is not valid for host 127.0.0.1: it names elsewhere.invalid",
        ),
        (
            "no client certificate",
            upstream(mtls, &pki.ca, ""),
            "the broker requires a client certificate: set upstream.cert_file and key_file",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::configure(dir.path().to_path_buf(), "[upstream]\n");
    for (i, (case, up, names)) in cases.iter().enumerate() {
        set_upstream(&gw, up);
        gw.launch();
        run_sim(gw.mqtt_port, 100, 0.0, &[]);
        let v = wait_upstream_error(&gw);
        let err = v["upstream"]["last_error"].as_str().unwrap_or("");
        assert!(err.contains(names), "{case}: {v}");
        assert_eq!(v["upstream"]["state"], "offline", "{case}: {v}");
        assert_eq!(v["backlog_events"], 100 * (i + 1) as u64, "{case}: {v}");
        let human = String::from_utf8(gw.cli(&["status"]).stdout).unwrap();
        assert!(human.contains(err), "{case}: {human}");
        assert!(sub.snapshot().is_empty(), "{case}: something arrived");
        assert_eq!(gw.proc.terminate(Duration::from_secs(15)), Some(0));
    }

    // The right CA, with the client certificate (mTLS): everything buffered arrives.
    set_upstream(&gw, &upstream(mtls, &pki.ca, &client));
    gw.launch();
    let total = 100 * cases.len();
    assert!(
        sub.wait_for(Duration::from_secs(20), |g| g.len() >= total),
        "got {}; log:\n{}",
        sub.snapshot().len(),
        gw.log()
    );
    let ids: std::collections::BTreeSet<u64> = sub.snapshot().iter().map(|g| g.id).collect();
    assert_eq!(ids.len(), total);
    assert!(gw.wait_metric("tidepool_backlog_events", 0.0, Duration::from_secs(10)));
}

#[test]
fn missing_tls_file_fails_at_start_naming_the_key() {
    let gw = Gateway::configure(
        tempfile::tempdir().unwrap().keep(),
        "[upstream]\nurl = \"mqtts://127.0.0.1:1\"\nca_file = \"/nonexistent/ca.pem\"\n",
    );
    let out = Command::new(bin_dir().join("tidepool"))
        .args(["run", "--config"])
        .arg(&gw.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("upstream.ca_file") && err.contains("/nonexistent/ca.pem"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&gw.dir);
}

#[test]
fn demo_accounts_for_every_event() {
    let out = Command::new(bin_dir().join("tidepool"))
        .args([
            "demo",
            "--events",
            "3000",
            "--rate",
            "1000",
            "--cut-at",
            "1",
            "--cut-for",
            "2",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("every event accounted for"), "{text}");
    assert!(text.contains("lost                0"), "{text}");
    assert!(
        text.contains("upstream offline"),
        "the outage shows: {text}"
    );
}

/// No secret shows anywhere a person or a log shipper reads: with distinctive values for the
/// upstream password (wrong, so the refusal is logged), an embedded-broker user's password
/// (and a sensor's wrong one), the admin token, and TLS private keys (the upstream client
/// key, the TLS listener's key), a run at `trace` through those failures leaves none of them
/// in the log, `/status`, `/metrics`, `tidepool status` or `tidepool check`; nor does `check`
/// of a config with a password in the upstream URL, or one whose password line is broken.
#[test]
fn no_secret_in_logs_status_or_check() {
    const UPSTREAM_PW: &str = "s3cr3t-upstream-7f2a";
    const USER_PW: &str = "s3cr3t-sensor-91c4";
    const WRONG_PW: &str = "s3cr3t-typo-3b8e";
    const INGEST_PW: &str = "s3cr3t-ingest-c2d9";
    const TOKEN: &str = "s3cr3t-admin-5d0e";
    let pki = pki::Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let pw = password_file(dir.path(), "gw", "the-right-one");
    let port = free_port();
    let _up = Mosquitto::start_on(
        port,
        &format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            pw.display(),
            pki.ca,
            pki.server.cert,
            pki.server.key
        ),
    );
    let tls_port = free_port();
    std::fs::create_dir(dir.path().join("gw")).unwrap();
    let mut gw = Gateway::configure(
        dir.path().join("gw"),
        &format!(
            "[ingest.mqtt]\ntopics = [\"sensors/#\"]\nusers = [{{ username = \"sensor\", password = \"{USER_PW}\" }}]\n\
             tls_listen = \"127.0.0.1:{tls_port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\n\
             [upstream]\nurl = \"mqtts://127.0.0.1:{port}\"\nusername = \"gw\"\npassword = \"{UPSTREAM_PW}\"\n\
             ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nreconnect_max = \"1s\"\n",
            pki.server.cert, pki.server.key, pki.ca, pki.client.cert, pki.client.key
        ),
    );
    let text = std::fs::read_to_string(&gw.config).unwrap().replacen(
        "[admin]\n",
        &format!("[admin]\ntoken = \"{TOKEN}\"\n"),
        1,
    );
    std::fs::write(&gw.config, text).unwrap();
    gw.set_env("TIDEPOOL_LOG", "trace");
    gw.launch();

    // A sensor with the right password, one with a wrong one.
    let publish = |password: &str| {
        Command::new(which("mosquitto_pub").expect("mosquitto_pub (package mosquitto-clients)"))
            .args(["-h", "127.0.0.1", "-p", &gw.mqtt_port.to_string()])
            .args([
                "-u",
                "sensor",
                "-P",
                password,
                "-q",
                "1",
                "-t",
                "sensors/a",
                "-m",
                "{}",
            ])
            .output()
            .unwrap()
    };
    assert!(publish(USER_PW).status.success());
    assert!(!publish(WRONG_PW).status.success());
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !gw.status()["upstream"]["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("username and password"))
        && std::time::Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut seen = vec![
        (
            "/status".to_string(),
            http_get(gw.admin_port, "/status").unwrap(),
        ),
        (
            "/metrics".to_string(),
            http_get(gw.admin_port, "/metrics").unwrap(),
        ),
    ];
    assert!(seen[0].1.contains("username and password"), "{}", seen[0].1);
    assert_eq!(gw.status()["backlog_events"], 1, "{}", seen[0].1);
    let output = |what: &str, out: std::process::Output| {
        (
            what.to_string(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    seen.push(output("tidepool status", gw.cli(&["status"])));
    seen.push(output("tidepool check", gw.cli(&["check"])));
    assert!(seen[2].1.contains("username and password"), "{}", seen[2].1);
    assert_eq!(gw.proc.terminate(Duration::from_secs(15)), Some(0));
    seen.push(output("tidepool status (stopped)", gw.cli(&["status"])));
    seen.push(("log".into(), gw.log()));
    assert!(seen[5].1.contains("TRACE"), "the log is at trace level");

    // `check` of configs that go wrong where the secrets are.
    let original = std::fs::read_to_string(&gw.config).unwrap();
    let broken = [
        (
            "password in the URL",
            original.replace(
                &format!("url = \"mqtts://127.0.0.1:{port}\""),
                &format!("url = \"mqtts://gw:{UPSTREAM_PW}@127.0.0.1:{port}\""),
            ),
        ),
        (
            "unterminated password",
            original.replace(&format!("\"{UPSTREAM_PW}\""), &format!("\"{UPSTREAM_PW}")),
        ),
        (
            "client-mode ingest password of a wrong type",
            original.replacen(
                "[ingest.mqtt]\n",
                &format!("[ingest.mqtt]\nmode = \"client\"\nusername = \"i\"\npassword = [\"{INGEST_PW}\"]\n"),
                1,
            ),
        ),
    ];
    for (what, text) in broken {
        std::fs::write(&gw.config, text).unwrap();
        let out = gw.cli(&["check"]);
        assert_eq!(out.status.code(), Some(1), "{what}");
        seen.push(output(&format!("tidepool check ({what})"), out));
    }

    let key_lines = |path: &str| -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::to_string)
            .collect()
    };
    let mut secrets: Vec<String> = [UPSTREAM_PW, USER_PW, WRONG_PW, INGEST_PW, TOKEN]
        .map(String::from)
        .to_vec();
    secrets.extend(key_lines(&pki.client.key));
    secrets.extend(key_lines(&pki.server.key));
    for (what, text) in &seen {
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "{what} shows the secret {s}:\n{text}"
            );
        }
    }
}
