//! The embedded broker against real clients: Mosquitto's command-line clients (MQTT 3.1, 3.1.1
//! and 5), paho-mqtt (Python), MQTT.js (Node) and a hand-written client on a raw socket for
//! what real clients refuse to send. Every test runs a real gateway in embedded mode on
//! loopback. paho-mqtt and MQTT.js are installed by scripts/test; missing, their tests fail.

use std::time::{Duration, Instant};

use tidepool_e2e::mqtt_clients::*;
use tidepool_e2e::*;

const EVENTS: &str = "tidepool/test-gw/events";
const SHORT: Duration = Duration::from_secs(5);

/// Starts a gateway with `extra` and waits for its MQTT listener.
fn gateway(extra: &str) -> Gateway {
    let gw = Gateway::start(extra);
    assert!(
        wait_port(gw.mqtt_port, SHORT),
        "broker not listening; log:\n{}",
        gw.log()
    );
    gw
}

/// `tidepool_events_committed_total` once it reaches `want` (or the last value, after 5 s).
fn committed(gw: &Gateway, want: f64) -> Option<f64> {
    wait_value(SHORT, Some(want), || {
        gw.metric("tidepool_events_committed_total")
    })
}

fn msg(topic: &str, qos: u8, retain: bool, payload: &str) -> Msg {
    Msg {
        topic: topic.into(),
        qos,
        retain,
        payload: payload.into(),
    }
}

fn sorted(mut m: Vec<Msg>) -> Vec<Msg> {
    m.sort_by(|a, b| (&a.topic, &a.payload).cmp(&(&b.topic, &b.payload)));
    m
}

fn topics(m: &[Msg]) -> Vec<String> {
    let mut t: Vec<String> = m.iter().map(|m| m.topic.clone()).collect();
    t.sort();
    t
}

/// MQTT 3.1, 3.1.1 and 5 publishers at QoS 0, 1 and 2 on an ingested topic: subscribers of
/// every protocol get each publish (at QoS 1 at most), the gateway commits each once, and the
/// event upstream has `source = "mqtt:CLIENTID"`, the topic and the payload.
#[test]
fn every_protocol_and_qos_is_delivered_committed_and_sourced() {
    let up = Mosquitto::start("");
    let upstream = Subscriber::start(up.port, &[EVENTS]);
    let gw = gateway(&format!(
        "[ingest.mqtt]\ntopics = [\"sensors/#\"]\n\n[upstream]\nurl = \"mqtt://127.0.0.1:{}\"\nbatch_max_wait = \"100ms\"\n",
        up.port
    ));
    let versions = ["mqttv31", "mqttv311", "mqttv5"];
    let subs: Vec<MosqSub> = versions
        .iter()
        .map(|v| {
            let id = format!("sub-{v}");
            MosqSub::start(
                gw.mqtt_port,
                &["-V", v, "-i", &id, "-q", "2", "-t", "sensors/#"],
            )
        })
        .collect();
    let mut sent = Vec::new();
    for v in versions {
        for q in 0..=2u8 {
            let (id, topic) = (format!("pub-{v}-q{q}"), format!("sensors/{v}/q{q}"));
            let payload = format!("{{\"v\":\"{v}\",\"q\":{q}}}");
            let qs = q.to_string();
            mosquitto_pub_ok(
                gw.mqtt_port,
                &["-V", v, "-i", &id, "-q", &qs, "-t", &topic, "-m", &payload],
            );
            sent.push((id, topic, payload, q));
        }
    }
    // (a) Every subscriber gets all nine; a QoS 2 subscription is granted 1.
    let want: Vec<Msg> = sent
        .iter()
        .map(|(_, t, p, q)| msg(t, (*q).min(1), false, p))
        .collect();
    for (v, s) in versions.iter().zip(&subs) {
        assert_eq!(
            sorted(s.wait_count(sent.len(), SHORT)),
            sorted(want.clone()),
            "what the {v} subscriber got; it printed:\n{}",
            s.output()
        );
    }
    // (b) Committed, once each: the metric and `tidepool status --json`.
    assert_eq!(committed(&gw, 9.0), Some(9.0), "log:\n{}", gw.log());
    let out = gw.cli(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["committed"], 9, "status: {status}");
    assert_eq!(status["ingested"], 9, "status: {status}");
    // (c) Upstream, each event carries its sensor's client id.
    assert!(
        upstream.wait_for(SHORT, |g| g.len() >= sent.len()),
        "upstream got {} events; log:\n{}",
        upstream.got.lock().unwrap().len(),
        gw.log()
    );
    let got = upstream.snapshot();
    assert_eq!(got.len(), sent.len(), "no event twice: {got:?}");
    for (id, topic, payload, _) in &sent {
        let e = got
            .iter()
            .map(|g| &g.event)
            .find(|e| e["topic"] == topic.as_str())
            .unwrap_or_else(|| panic!("no event upstream for {topic}"));
        assert_eq!(e["source"], format!("mqtt:{id}").as_str(), "event {e}");
        let p: serde_json::Value = serde_json::from_str(payload).unwrap();
        assert_eq!(e["payload"], p, "event {e}");
    }
}

/// `+` matches one level, `#` the level above and every level below, and neither matches a
/// `$` topic as a first level (`#` and `+/...` do not get `$SYS/...`), while `$SYS/#` does;
/// overlapping subscriptions of one client give one copy.
#[test]
fn wildcards_match_and_dollar_topics_stay_out_of_hash() {
    let gw = gateway("");
    let port = gw.mqtt_port;
    let plus = MosqSub::start(port, &["-V", "mqttv311", "-t", "sensors/+/temp"]);
    let below = MosqSub::start(port, &["-V", "mqttv5", "-t", "sensors/#"]);
    let all = MosqSub::start(port, &["-V", "mqttv311", "-t", "#"]);
    let sys = MosqSub::start(port, &["-V", "mqttv5", "-t", "$SYS/#"]);
    let plus_first = MosqSub::start(port, &["-V", "mqttv311", "-t", "+/broker/load"]);
    let overlap = MosqSub::start(
        port,
        &[
            "-V",
            "mqttv5",
            "-t",
            "sensors/#",
            "-t",
            "sensors/+/temp",
            "-t",
            "sensors/a/temp",
        ],
    );
    // The `$` topic first: it is routed at once, so a wrong copy would come before the rest.
    for (topic, payload) in [
        ("$SYS/broker/load", "sys"),
        ("sensors/a/temp", "a"),
        ("sensors/a/b/temp", "ab"),
        ("sensors", "root"),
        ("other/broker/load", "other"),
    ] {
        mosquitto_pub_ok(port, &["-q", "1", "-t", topic, "-m", payload]);
    }
    let cases: [(&str, &MosqSub, &[&str]); 6] = [
        ("sensors/+/temp", &plus, &["sensors/a/temp"]),
        (
            "sensors/#",
            &below,
            &["sensors", "sensors/a/b/temp", "sensors/a/temp"],
        ),
        (
            "#",
            &all,
            &[
                "other/broker/load",
                "sensors",
                "sensors/a/b/temp",
                "sensors/a/temp",
            ],
        ),
        ("$SYS/#", &sys, &["$SYS/broker/load"]),
        ("+/broker/load", &plus_first, &["other/broker/load"]),
        (
            "sensors/# + sensors/+/temp + sensors/a/temp",
            &overlap,
            &["sensors", "sensors/a/b/temp", "sensors/a/temp"],
        ),
    ];
    for (_, s, want) in &cases {
        s.wait_count(want.len(), SHORT);
    }
    std::thread::sleep(Duration::from_millis(300));
    for (filter, s, want) in cases {
        assert_eq!(
            topics(&s.messages()),
            want,
            "filter {filter}; it printed:\n{}",
            s.output()
        );
    }
}

/// A retained message (ingested topic or not) reaches later subscribers with the retain flag
/// (live subscribers without it, unless MQTT 5 Retain As Published), survives a clean
/// restart, is cleared by an empty retained publish, and the clearing and a replacement
/// survive a kill -9 a moment later.
#[test]
fn retained_survive_restarts_and_an_empty_publish_clears_them() {
    let mut gw = gateway("[ingest.mqtt]\ntopics = [\"sensors/#\"]\n");
    let port = gw.mqtt_port;
    let filters = ["-t", "sensors/door", "-t", "lights/hall"];
    let later = |port: u16, v: &str| {
        let mut a = vec!["-V", v, "-q", "1"];
        a.extend(filters);
        MosqSub::start(port, &a)
    };
    let live = later(port, "mqttv311");
    let mut rap = vec!["-V", "mqttv5", "-q", "1", "--retain-as-published"];
    rap.extend(filters);
    let live_rap = MosqSub::start(port, &rap);
    mosquitto_pub_ok(port, &["-r", "-q", "1", "-t", "sensors/door", "-m", "open"]);
    mosquitto_pub_ok(port, &["-r", "-q", "0", "-t", "lights/hall", "-m", "on"]);
    let both = |retain| {
        vec![
            msg("lights/hall", 0, retain, "on"),
            msg("sensors/door", 1, retain, "open"),
        ]
    };
    assert_eq!(
        sorted(live.wait_count(2, SHORT)),
        both(false),
        "a live subscriber"
    );
    assert_eq!(
        sorted(live_rap.wait_count(2, SHORT)),
        both(true),
        "a live MQTT 5 subscriber with Retain As Published"
    );
    for v in ["mqttv31", "mqttv311", "mqttv5"] {
        let s = later(port, v);
        assert_eq!(
            sorted(s.wait_count(2, SHORT)),
            both(true),
            "a later {v} subscriber"
        );
    }

    // A clean restart keeps them.
    assert_eq!(gw.proc.terminate(SHORT), Some(0), "log:\n{}", gw.log());
    gw.launch();
    assert!(wait_port(port, SHORT));
    assert_eq!(gw.metric("tidepool_broker_retained"), Some(2.0));
    let s = later(port, "mqttv311");
    assert_eq!(
        sorted(s.wait_count(2, SHORT)),
        both(true),
        "after a restart"
    );

    // An empty retained publish clears one; a new one replaces the other.
    mosquitto_pub_ok(port, &["-r", "-q", "1", "-t", "sensors/door", "-n"]);
    mosquitto_pub_ok(port, &["-r", "-q", "1", "-t", "lights/hall", "-m", "off"]);
    let only_off = vec![msg("lights/hall", 1, true, "off")];
    let s = later(port, "mqttv5");
    s.wait_count(1, SHORT);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        s.messages(),
        only_off,
        "after clearing; printed:\n{}",
        s.output()
    );

    // Written with the next commit (within a second): then a kill -9 keeps both changes.
    std::thread::sleep(Duration::from_millis(1500));
    gw.proc.kill9();
    gw.launch();
    assert!(wait_port(port, SHORT));
    let s = later(port, "mqttv311");
    s.wait_count(1, SHORT);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        s.messages(),
        only_off,
        "after kill -9; printed:\n{}\nlog:\n{}",
        s.output(),
        gw.log()
    );
}

/// Wills go out when a client dies (kill -9) on 3.1.1 and 5 (one on an ingested topic is
/// committed first), when a newer connection takes its client id over (MQTT 5: DISCONNECT
/// 0x8E to the old one), and when a silent client's keep-alive (1 s) expires, not before and
/// within about 1.5 s (MQTT 5: DISCONNECT 0x8D); no will after a clean DISCONNECT.
#[test]
fn wills_on_abrupt_close_takeover_and_keep_alive_expiry_not_after_disconnect() {
    let gw = gateway("[ingest.mqtt]\ntopics = [\"sensors/#\"]\n");
    let port = gw.mqtt_port;
    let watcher = MosqSub::start(port, &["-V", "mqttv5", "-q", "1", "-t", "wills/#"]);
    let ingested = MosqSub::start(port, &["-V", "mqttv311", "-q", "1", "-t", "sensors/#"]);
    let mut want: Vec<&str> = Vec::new();
    let check = |want: &[&str], what: &str| {
        let got = watcher.wait_count(want.len(), SHORT);
        let mut want = want.to_vec();
        want.sort();
        assert_eq!(
            topics(&got),
            want,
            "wills {what}; watcher printed:\n{}",
            watcher.output()
        );
    };

    // Clean goodbyes first: a will sent for them would arrive before the others.
    for v in ["mqttv311", "mqttv5"] {
        let (id, will) = (format!("clean-{v}"), format!("wills/clean-{v}"));
        let will_args = [
            "-V",
            v,
            "-i",
            &id,
            "--will-topic",
            &will,
            "--will-payload",
            "gone",
        ];
        let mut a = will_args.to_vec();
        a.extend(["-t", "other/x", "-m", "hi"]);
        mosquitto_pub_ok(port, &a);
        let mut a = will_args.to_vec();
        a.extend(["-t", "other/x", "-E"]);
        let mut s = MosqSub::spawn(port, &a);
        assert_eq!(s.wait_exit(SHORT), Some(0), "{}", s.output());
    }

    // kill -9.
    for (v, will) in [
        ("mqttv311", "wills/abrupt-mqttv311"),
        ("mqttv5", "wills/abrupt-mqttv5"),
        ("mqttv5", "sensors/will"),
    ] {
        let id = format!("abrupt-{}", will.replace('/', "-"));
        let mut s = MosqSub::start(
            port,
            &[
                "-V",
                v,
                "-i",
                &id,
                "--will-topic",
                will,
                "--will-payload",
                "gone",
                "--will-qos",
                "1",
                "-t",
                "nothing/here",
            ],
        );
        s.proc.kill9();
    }
    want.extend(["wills/abrupt-mqttv311", "wills/abrupt-mqttv5"]);
    check(&want, "after kill -9");
    assert_eq!(
        ingested.wait_count(1, SHORT),
        [msg("sensors/will", 1, false, "gone")],
        "the will on an ingested topic"
    );
    assert_eq!(
        committed(&gw, 1.0),
        Some(1.0),
        "the will on an ingested topic"
    );

    // Takeover: a second connection with the same client id.
    let connect = |level, client_id, keep_alive, will| RawConnect {
        level,
        client_id,
        keep_alive,
        clean: true,
        session_expiry: None,
        will,
    };
    let (mut old, _) = Raw::connect(port, &connect(5, "taken", 30, Some(("wills/taken", "x"))));
    let (_new, ack) = Raw::connect(port, &connect(5, "taken", 30, None));
    assert_eq!((ack[0], ack[3]), (0x20, 0x00), "CONNACK {ack:02x?}");
    match old.read(SHORT) {
        Read1::Packet(p) => assert_eq!((p[0], p[2]), (0xE0, 0x8E), "DISCONNECT {p:02x?}"),
        other => panic!("the old connection got no DISCONNECT 0x8E: {other:?}"),
    }
    want.push("wills/taken");
    check(&want, "after a takeover");

    // Keep-alive 1 s, then silence.
    let start = Instant::now();
    let mut silent = Vec::new();
    for (level, id, will) in [
        (4u8, "silent-311", "wills/silent-311"),
        (5, "silent-5", "wills/silent-5"),
    ] {
        let (raw, ack) = Raw::connect(port, &connect(level, id, 1, Some((will, "silent"))));
        assert_eq!(ack[..4], [0x20, ack[1], 0x00, 0x00], "CONNACK {ack:02x?}");
        silent.push((level, raw));
    }
    want.extend(["wills/silent-311", "wills/silent-5"]);
    check(&want, "after keep-alive expiry");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "a will {took:?} after CONNECT, within the 1 s keep-alive"
    );
    assert!(
        took < Duration::from_secs(3),
        "wills {took:?} after CONNECT: keep-alive 1 s should close by 1.5 s"
    );
    for (level, mut raw) in silent {
        if level == 5 {
            match raw.read(SHORT) {
                Read1::Packet(p) => assert_eq!(
                    (p[0], p[2]),
                    (0xE0, 0x8D),
                    "MQTT 5 DISCONNECT keep-alive timeout, got {p:02x?}"
                ),
                other => panic!("MQTT 5: no DISCONNECT 0x8D: {other:?}"),
            }
        }
        assert_eq!(raw.read(SHORT), Read1::Closed, "level {level}");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(watcher.messages().len(), want.len(), "{}", watcher.output());
}

/// Keep-alive 0 (none; mosquitto's clients refuse `-k 0`) is accepted on 3.1.1 and 5 (CONNACK
/// return code 0) and such a connection stays open while idle beyond 1.5 s and answers a
/// PINGREQ, while a keep-alive 1 connection idle as long is closed.
#[test]
fn keep_alive_zero_is_accepted_and_never_expires() {
    let gw = gateway("");
    let port = gw.mqtt_port;
    let raw = |level, id, keep_alive| {
        Raw::connect(
            port,
            &RawConnect {
                level,
                client_id: id,
                keep_alive,
                clean: true,
                session_expiry: None,
                will: None,
            },
        )
    };
    let (mut v311, ack) = raw(4, "ka0-311", 0);
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "3.1.1 CONNACK");
    let (mut v5, ack) = raw(5, "ka0-5", 0);
    assert_eq!(
        (ack[0], ack[2], ack[3]),
        (0x20, 0x00, 0x00),
        "MQTT 5 CONNACK {ack:02x?}: no session, success"
    );
    let (mut control, ack) = raw(4, "ka1-311", 1);
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        control.read(Duration::from_millis(200)),
        Read1::Closed,
        "keep-alive 1 s, idle 2.5 s: closed"
    );
    for (name, c) in [("3.1.1", &mut v311), ("5", &mut v5)] {
        assert_eq!(
            c.read(Duration::from_millis(100)),
            Read1::Nothing,
            "{name}: keep-alive 0, idle 2.5 s: still open"
        );
        c.send(&PINGREQ);
        assert_eq!(
            c.read(SHORT),
            Read1::Packet(PINGRESP.to_vec()),
            "{name}: PINGRESP"
        );
    }
}

/// A persistent session (3.1.1 clean session 0; MQTT 5 Session Expiry 60 s) keeps its QoS 1
/// subscriptions while away and delivers what was published meanwhile (ingested or routed)
/// on its return, with session present; a gateway restart ends it (session present 0).
#[test]
fn persistent_sessions_queue_while_away_and_end_at_restart() {
    let mut gw = gateway("[ingest.mqtt]\ntopics = [\"sensors/#\"]\n");
    let port = gw.mqtt_port;
    let clients = [
        ("mqttv311", "away-311", 4u8, vec!["-V", "mqttv311", "-c"]),
        (
            "mqttv5",
            "away-5",
            5,
            vec!["-V", "mqttv5", "-c", "-x", "60"],
        ),
    ];
    let args = |base: &[&'static str], id: &'static str, more: &[&'static str]| {
        let mut a = base.to_vec();
        a.extend(["-i", id, "-q", "1", "-t", "sensors/p/#", "-t", "notes/p"]);
        a.extend(more);
        a
    };
    for (_, id, _, base) in &clients {
        let mut s = MosqSub::spawn(port, &args(base, id, &["-E"]));
        assert_eq!(s.wait_exit(SHORT), Some(0), "{}", s.output());
    }
    mosquitto_pub_ok(port, &["-q", "1", "-t", "sensors/p/1", "-m", "one"]);
    mosquitto_pub_ok(port, &["-q", "2", "-t", "sensors/p/2", "-m", "two"]);
    mosquitto_pub_ok(port, &["-q", "1", "-t", "notes/p", "-m", "three"]);
    let want = vec![
        msg("notes/p", 1, false, "three"),
        msg("sensors/p/1", 1, false, "one"),
        msg("sensors/p/2", 1, false, "two"),
    ];
    for (v, id, level, base) in &clients {
        let mut s = MosqSub::spawn(port, &args(base, id, &["-C", "3", "-W", "5"]));
        assert_eq!(
            s.wait_exit(Duration::from_secs(6)),
            Some(0),
            "{v}: {}",
            s.output()
        );
        assert_eq!(
            sorted(s.messages()),
            want,
            "{v} on its return; printed:\n{}",
            s.output()
        );
        // Still there: session present.
        let (mut raw, ack) = Raw::connect(
            port,
            &RawConnect {
                level: *level,
                client_id: id,
                keep_alive: 30,
                clean: false,
                session_expiry: (*level == 5).then_some(60),
                will: None,
            },
        );
        assert_eq!(
            (ack[0], ack[2], ack[3]),
            (0x20, 0x01, 0x00),
            "{v}: CONNACK {ack:02x?}"
        );
        raw.send(&DISCONNECT);
    }
    // Sessions live in memory: a restart ends them.
    assert_eq!(gw.proc.terminate(SHORT), Some(0), "log:\n{}", gw.log());
    gw.launch();
    assert!(wait_port(port, SHORT));
    for (v, id, level, _) in &clients {
        let (_raw, ack) = Raw::connect(
            port,
            &RawConnect {
                level: *level,
                client_id: id,
                keep_alive: 30,
                clean: false,
                session_expiry: (*level == 5).then_some(60),
                will: None,
            },
        );
        assert_eq!(
            (ack[0], ack[2], ack[3]),
            (0x20, 0x00, 0x00),
            "{v} after a restart: CONNACK {ack:02x?}"
        );
    }
}

/// QoS 1 messages a persistent subscriber had not acknowledged when its connection dropped are
/// resent on its return (3.1.1 and 5), with DUP and the same packet ids, and not again once
/// acknowledged.
#[test]
fn unacknowledged_deliveries_are_resent_with_dup_after_a_reconnect() {
    let gw = gateway("");
    let port = gw.mqtt_port;
    for level in [4u8, 5] {
        let id = format!("inflight-{level}");
        let topic = format!("sensors/inflight/{level}");
        let connect = RawConnect {
            level,
            client_id: &id,
            keep_alive: 30,
            clean: false,
            session_expiry: (level == 5).then_some(60),
            will: None,
        };
        let (mut raw, _) = Raw::connect(port, &connect);
        raw.send(&subscribe_packet(level, 7, &topic, 1));
        match raw.read(SHORT) {
            Read1::Packet(p) => assert_eq!(
                (p[0], p[2], p[3], *p.last().unwrap()),
                (0x90, 0, 7, 1),
                "SUBACK {p:02x?}"
            ),
            other => panic!("no SUBACK: {other:?}"),
        }
        for m in ["m1", "m2"] {
            mosquitto_pub_ok(port, &["-q", "1", "-t", &topic, "-m", m]);
        }
        let read_publishes = |raw: &mut Raw| -> Vec<RawPublish> {
            (0..2)
                .map(|_| match raw.read(SHORT) {
                    Read1::Packet(p) => parse_publish(level, &p)
                        .unwrap_or_else(|| panic!("level {level}: not a PUBLISH: {p:02x?}")),
                    other => panic!("level {level}: no PUBLISH: {other:?}"),
                })
                .collect()
        };
        let first = read_publishes(&mut raw);
        for (p, m) in first.iter().zip(["m1", "m2"]) {
            assert_eq!(
                (p.dup, p.qos, p.topic.as_str(), &p.payload[..]),
                (false, 1, topic.as_str(), m.as_bytes())
            );
        }
        drop(raw); // no PUBACK, no DISCONNECT

        let (mut raw, ack) = Raw::connect(port, &connect);
        assert_eq!(
            (ack[0], ack[2], ack[3]),
            (0x20, 1, 0),
            "level {level}: CONNACK {ack:02x?}"
        );
        let again = read_publishes(&mut raw);
        for (p, f) in again.iter().zip(&first) {
            assert_eq!(
                *p,
                RawPublish {
                    dup: true,
                    ..f.clone()
                },
                "level {level}: resent"
            );
        }
        for p in &again {
            raw.send(&puback(p.pkid));
        }
        raw.send(&DISCONNECT);
        assert_eq!(raw.read(SHORT), Read1::Closed);

        let (mut raw, ack) = Raw::connect(port, &connect);
        assert_eq!(
            (ack[0], ack[2], ack[3]),
            (0x20, 1, 0),
            "level {level}: CONNACK {ack:02x?}"
        );
        assert_eq!(
            raw.read(Duration::from_millis(300)),
            Read1::Nothing,
            "level {level}: nothing left after the PUBACKs"
        );
        raw.send(&DISCONNECT);
    }
}

/// With `users`, a client without credentials or with a wrong password is refused on 3.1,
/// 3.1.1 and 5 (MQTT 5: reason 0x86) and nothing it sent is stored; the right credentials
/// publish and subscribe.
#[test]
fn users_refuse_wrong_credentials_and_accept_right_ones() {
    let gw = gateway(
        "[ingest.mqtt]\ntopics = [\"sensors/#\"]\nusers = [{ username = \"u\", password = \"p\" }]\n",
    );
    let port = gw.mqtt_port;
    let sub = MosqSub::start(
        port,
        &[
            "-V",
            "mqttv5",
            "-u",
            "u",
            "-P",
            "p",
            "-q",
            "1",
            "-t",
            "sensors/#",
        ],
    );
    let mut refused = 0;
    for v in ["mqttv31", "mqttv311", "mqttv5"] {
        let topic = format!("sensors/{v}");
        let base = ["-V", v, "-q", "1", "-t", &topic];
        for creds in [
            &[][..],
            &["-u", "u"],
            &["-u", "u", "-P", "wrong"],
            &["-u", "x", "-P", "p"],
        ] {
            let mut a = base.to_vec();
            a.extend(creds);
            a.extend(["-m", "refused"]);
            let out = mosquitto_pub(port, &a);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!out.status.success(), "{v} {creds:?} accepted: {text}");
            assert!(
                text.to_lowercase().contains("bad user name or password"),
                "{v} {creds:?}: {text}"
            );
            if v == "mqttv5" {
                // mosquitto_pub exits with the MQTT 5 reason code.
                assert_eq!(out.status.code(), Some(0x86), "{v} {creds:?}: {text}");
            }
            refused += 1;
        }
        let mut a = base.to_vec();
        a.extend(["-u", "u", "-P", "p", "-m", "accepted"]);
        mosquitto_pub_ok(port, &a);
    }
    let mut bad_sub = MosqSub::spawn(port, &["-u", "u", "-P", "nope", "-t", "sensors/#"]);
    assert_ne!(bad_sub.wait_exit(SHORT), Some(0), "{}", bad_sub.output());
    refused += 1;
    let want: Vec<Msg> = ["mqttv31", "mqttv311", "mqttv5"]
        .iter()
        .map(|v| msg(&format!("sensors/{v}"), 1, false, "accepted"))
        .collect();
    assert_eq!(sorted(sub.wait_count(3, SHORT)), want, "{}", sub.output());
    assert_eq!(committed(&gw, 3.0), Some(3.0));
    assert_eq!(
        gw.metric("tidepool_broker_refused_total{reason=\"auth\"}"),
        Some(f64::from(refused))
    );
}

/// Without `listen`, the embedded broker takes the shipped default, 127.0.0.1:1883: loopback
/// only. `check --print-defaults` says so, and a daemon started without `listen` binds exactly
/// that address (with it held, here by the test, the daemon refuses to start, naming it).
#[test]
fn default_listener_is_loopback() {
    let out = command("tidepool")
        .args(["check", "--print-defaults"])
        .output()
        .unwrap();
    let defaults = String::from_utf8(out.stdout).unwrap();
    let section: Vec<&str> = defaults
        .split("[ingest.mqtt]")
        .nth(1)
        .expect("an [ingest.mqtt] section")
        .lines()
        .take_while(|l| !l.starts_with('['))
        .filter(|l| l.starts_with("listen"))
        .collect();
    assert_eq!(section, ["listen = \"127.0.0.1:1883\""], "{defaults}");

    // Held by this test, or already by a broker on this machine: either way the daemon's
    // bind to 127.0.0.1:1883 fails, and its message shows which address it took.
    let _held = std::net::TcpListener::bind("127.0.0.1:1883");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tidepool.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"test-gw\"\ndata_dir = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:{}\"\n",
            dir.path().join("data").display(),
            free_port()
        ),
    )
    .unwrap();
    let mut run = command("tidepool");
    run.args(["run", "--config"]).arg(&config);
    let out = run_within(run, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("key `ingest.mqtt.listen`: cannot listen on 127.0.0.1:1883"),
        "{err}"
    );
}

/// The broker warns when it listens beyond loopback with no `users` (anyone on the network
/// may publish and subscribe), and only then: not on loopback, not with `users`.
#[test]
fn beyond_loopback_without_users_warns() {
    const WARNING: &str =
        "the embedded broker listens beyond loopback and `ingest.mqtt.users` is empty";
    let users = "users = [{ username = \"u\", password = \"p\" }]\n";
    let cases = [
        ("0.0.0.0, no users", "0.0.0.0", "", true),
        ("0.0.0.0, users", "0.0.0.0", users, false),
        ("127.0.0.1, no users", "127.0.0.1", "", false),
    ];
    for (case, host, users, warns) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut gw =
            Gateway::configure(dir.path().to_path_buf(), &format!("[ingest.mqtt]\n{users}"));
        let text = std::fs::read_to_string(&gw.config).unwrap().replace(
            &format!("listen = \"127.0.0.1:{}\"", gw.mqtt_port),
            &format!("listen = \"{host}:{}\"", gw.mqtt_port),
        );
        std::fs::write(&gw.config, text).unwrap();
        gw.launch();
        // Served on loopback either way.
        assert!(wait_port(gw.mqtt_port, SHORT), "{case}: {}", gw.log());
        assert_eq!(gw.proc.terminate(SHORT), Some(0), "{case}");
        let log = gw.log();
        let warned: Vec<&str> = log.lines().filter(|l| l.contains(WARNING)).collect();
        if warns {
            assert_eq!(warned.len(), 1, "{case}: {log}");
            assert!(
                warned[0].contains("WARN")
                    && warned[0].contains(&format!("0.0.0.0:{}", gw.mqtt_port)),
                "{case}: {log}"
            );
        } else {
            assert!(warned.is_empty(), "{case}: {log}");
        }
    }
}

/// The TLS listener serves MQTT 3.1.1 and 5 with the configured certificate (verified against
/// its CA, host 127.0.0.1 in its SAN) into the same broker as the plain port; a client trusting
/// another CA, or speaking plain MQTT to it, is not served.
#[test]
fn tls_listener_serves_the_same_broker() {
    let pki = pki::Pki::new();
    let (cert, key, ca) = (&pki.server.cert, &pki.server.key, &pki.ca);
    let tls_port = free_port();
    let gw = gateway(&format!(
        "[ingest.mqtt]\ntopics = [\"sensors/#\"]\ntls_listen = \"127.0.0.1:{tls_port}\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n"
    ));
    assert!(
        wait_port(tls_port, SHORT),
        "no TLS listener; log:\n{}",
        gw.log()
    );
    let tls_sub = MosqSub::start(
        tls_port,
        &["--cafile", ca, "-V", "mqttv5", "-q", "1", "-t", "sensors/#"],
    );
    let plain_sub = MosqSub::start(
        gw.mqtt_port,
        &["-V", "mqttv311", "-q", "1", "-t", "sensors/#"],
    );
    mosquitto_pub_ok(
        tls_port,
        &[
            "--cafile",
            ca,
            "-V",
            "mqttv311",
            "-q",
            "1",
            "-t",
            "sensors/tls/311",
            "-m",
            "a",
        ],
    );
    mosquitto_pub_ok(
        tls_port,
        &[
            "--cafile",
            ca,
            "-V",
            "mqttv5",
            "-q",
            "2",
            "-t",
            "sensors/tls/5",
            "-m",
            "b",
        ],
    );
    mosquitto_pub_ok(gw.mqtt_port, &["-q", "1", "-t", "sensors/plain", "-m", "c"]);
    let want = vec![
        msg("sensors/plain", 1, false, "c"),
        msg("sensors/tls/311", 1, false, "a"),
        msg("sensors/tls/5", 1, false, "b"),
    ];
    assert_eq!(
        sorted(tls_sub.wait_count(3, SHORT)),
        want,
        "TLS subscriber: {}",
        tls_sub.output()
    );
    assert_eq!(
        sorted(plain_sub.wait_count(3, SHORT)),
        want,
        "plain subscriber"
    );
    assert_eq!(committed(&gw, 3.0), Some(3.0));
    for (what, args) in [
        ("another CA", vec!["--cafile", pki.other_ca.as_str()]),
        ("plain MQTT", vec![]),
    ] {
        let mut a = args.clone();
        a.extend(["-q", "1", "-t", "sensors/no", "-m", "no"]);
        let out = mosquitto_pub(tls_port, &a);
        assert!(!out.status.success(), "{what} on the TLS port was served");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(gw.metric("tidepool_events_committed_total"), Some(3.0));
}

/// paho-mqtt 2 (Python) on 3.1.1 and 5: keep-alive 0 and idle 2.5 s, a `+` subscription at
/// QoS 2 granted 1, QoS 1 and 2 publishes acknowledged (reason 0) and delivered back (only
/// the ones the filter matches), and committed.
#[test]
fn paho_mqtt_311_and_5() {
    let gw = gateway("");
    let port = gw.mqtt_port.to_string();
    let runs: Vec<serde_json::Value> = std::thread::scope(|s| {
        let hs: Vec<_> = ["3.1.1", "5"]
            .map(|v| {
                let port = &port;
                s.spawn(move || {
                    let id = format!("paho-{v}");
                    let prefix = format!("paho{}", v.replace('.', ""));
                    run_script(
                        "python3",
                        "paho_check.py",
                        &[
                            "--port",
                            port,
                            "--version",
                            v,
                            "--client-id",
                            &id,
                            "--prefix",
                            &prefix,
                            "--idle",
                            "2.5",
                        ],
                    )
                })
            })
            .into_iter()
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &runs {
        let v = r["protocol"].as_str().unwrap();
        let prefix = format!("paho{}", v.replace('.', ""));
        assert_eq!(r["errors"], serde_json::json!([]), "{v}: {r}");
        assert_eq!(r["connack"]["reason"], 0, "{v}: {r}");
        assert_eq!(r["connack"]["session_present"], false, "{v}: {r}");
        assert_eq!(r["granted"], serde_json::json!([1]), "{v}: {r}");
        assert_eq!(
            r["acked"],
            serde_json::json!({"nomatch": 0, "q1": 0, "q2": 0}),
            "{v}: {r}"
        );
        let mut got: Vec<(String, u64, String)> = r["received"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let p: serde_json::Value =
                    serde_json::from_str(m["payload"].as_str().unwrap()).unwrap();
                (
                    m["topic"].as_str().unwrap().to_string(),
                    m["qos"].as_u64().unwrap(),
                    p["name"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                (format!("{prefix}/q1/data"), 1, "q1".to_string()),
                (format!("{prefix}/q2/data"), 1, "q2".to_string()),
            ],
            "{v}: {r}"
        );
    }
    assert_eq!(committed(&gw, 6.0), Some(6.0), "log:\n{}", gw.log());
}

/// MQTT.js 5 (Node): the CONNACK announces the configured Receive Maximum, the Maximum Packet
/// Size (4 × max_payload) and Topic Alias Maximum 16; a QoS 1 publish, then one through a
/// topic alias, come back with their content type and user properties.
#[test]
fn mqttjs_5_connack_properties_and_topic_alias() {
    let gw = gateway("[ingest.mqtt]\nreceive_maximum = 250\nmax_payload = \"512KiB\"\n");
    let r = run_script(
        "node",
        "mqttjs_check.js",
        &[&gw.mqtt_port.to_string(), "mqttjs-5", "js"],
    );
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    let c = &r["connack"];
    assert_eq!(c["reasonCode"], 0, "{r}");
    assert_eq!(c["sessionPresent"], false, "{r}");
    assert_eq!(c["receiveMaximum"], 250, "{r}");
    assert_eq!(c["maximumPacketSize"], 4 * 512 * 1024, "{r}");
    assert_eq!(c["topicAliasMaximum"], 16, "{r}");
    assert_eq!(c["retainAvailable"], true, "{r}");
    assert_eq!(c["sharedSubscriptionAvailable"], false, "{r}");
    assert_eq!(r["granted"], serde_json::json!([1]), "{r}");
    assert_eq!(r["acked"], serde_json::json!([0, 1]), "{r}");
    let got = r["received"].as_array().unwrap();
    assert_eq!(got.len(), 2, "{r}");
    for (n, m) in got.iter().enumerate() {
        assert_eq!(m["topic"], "js/alias/t", "{r}");
        assert_eq!(m["qos"], 1, "{r}");
        assert_eq!(
            m["payload"],
            format!("{{\"from\":\"mqttjs\",\"n\":{n}}}"),
            "{r}"
        );
        assert_eq!(m["contentType"], "application/json", "{r}");
        assert_eq!(
            m["userProperties"],
            serde_json::json!({"n": n.to_string()}),
            "{r}"
        );
    }
    assert_eq!(committed(&gw, 2.0), Some(2.0), "log:\n{}", gw.log());
}

/// A buffer that cannot take an event (`when_full = "reject_new"` at `max_bytes`) refuses it
/// instead of acknowledging it: MQTT 5 gets PUBACK 0x97, MQTT 3.1.1 (which cannot refuse) no
/// PUBACK and a closed connection. Nothing refused is counted as committed.
#[test]
fn a_full_buffer_refuses_instead_of_acknowledging() {
    let gw = gateway("[buffer]\nmax_bytes = \"2KiB\"\nwhen_full = \"reject_new\"\n");
    let pad = "x".repeat(300);
    let mut reasons = Vec::new();
    for i in 0..10 {
        let body = format!("{{\"pad\":\"{pad}\",\"i\":{i}}}");
        let out = mosquitto_pub(
            gw.mqtt_port,
            &[
                "-V",
                "mqttv5",
                "-q",
                "1",
                "-t",
                "sensors/1/t",
                "-m",
                &body,
                "-d",
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let rc = text
            .split("RC:")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no PUBACK for {i}: {text}"));
        reasons.push(rc);
    }
    let accepted = reasons.iter().filter(|r| *r == "0").count();
    assert!(accepted > 0, "{reasons:?}");
    assert!(
        reasons[accepted..].iter().all(|r| r == "151"),
        "once full, every publish is refused with 0x97: {reasons:?}"
    );
    assert_eq!(committed(&gw, accepted as f64), Some(accepted as f64));
    let body = format!("{{\"pad\":\"{pad}\",\"v311\":1}}");
    let out = mosquitto_pub(
        gw.mqtt_port,
        &[
            "-V",
            "mqttv311",
            "-q",
            "1",
            "-t",
            "sensors/1/t",
            "-m",
            &body,
            "-d",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("received PUBACK"),
        "3.1.1 must not be acknowledged: {text}"
    );
    assert!(!out.status.success(), "the connection is closed: {text}");
    assert_eq!(
        gw.metric("tidepool_events_committed_total"),
        Some(accepted as f64)
    );
    assert_eq!(
        gw.metric("tidepool_events_dropped_total{reason=\"buffer_full\"}"),
        Some((10 - accepted + 1) as f64)
    );
}

/// MQTT 5 user properties reach the rules as `event.properties` (a repeated name as an array);
/// a 3.1.1 publish has none.
#[test]
fn user_properties_reach_rules_as_event_properties() {
    let up = Mosquitto::start("");
    let upstream = Subscriber::start(up.port, &[EVENTS]);
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("10-props.rhai"),
        "fn on_event(event) {\n event.payload.props = event.properties;\n event\n}\n",
    )
    .unwrap();
    let gw = gateway(&format!(
        "[ingest.mqtt]\ntopics = [\"sensors/#\"]\n\n[rules]\ndir = \"{}\"\n\n[upstream]\nurl = \"mqtt://127.0.0.1:{}\"\nbatch_max_wait = \"100ms\"\n",
        rules.display(),
        up.port
    ));
    mosquitto_pub_ok(
        gw.mqtt_port,
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "sensors/5/t",
            "-m",
            "{\"v\":5}",
            "-D",
            "publish",
            "user-property",
            "site",
            "north",
            "-D",
            "publish",
            "user-property",
            "tag",
            "a",
            "-D",
            "publish",
            "user-property",
            "tag",
            "b",
        ],
    );
    mosquitto_pub_ok(
        gw.mqtt_port,
        &[
            "-V",
            "mqttv311",
            "-q",
            "1",
            "-t",
            "sensors/3/t",
            "-m",
            "{\"v\":3}",
        ],
    );
    assert!(
        upstream.wait_for(SHORT, |g| g.len() >= 2),
        "log:\n{}",
        gw.log()
    );
    let got = upstream.snapshot();
    let by_v = |v: i64| {
        got.iter()
            .find(|g| g.payload["v"] == v)
            .map(|g| g.payload["props"].clone())
            .unwrap()
    };
    assert_eq!(
        by_v(5),
        serde_json::json!({"site": "north", "tag": ["a", "b"]})
    );
    assert_eq!(by_v(3), serde_json::json!({}));
}
