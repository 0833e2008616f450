//! Commands from the cloud, black-box: a real Mosquitto upstream sends commands to the
//! gateway's local broker and to serial ptys; every command gets a result; `kill -9` loses none.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidepool_e2e::mqtt_clients::mosquitto_pub_ok;
use tidepool_e2e::{listen, Gateway, Mosquitto, PtyPair};

/// Everything read from the device end of a pty.
struct PtyReader {
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl PtyReader {
    fn start(path: &Path) -> PtyReader {
        let mut f = std::fs::File::open(path).expect("open the pty's device end");
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let b = bytes.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                b.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        PtyReader { bytes }
    }

    /// The JSON lines read so far.
    fn lines(&self) -> Vec<Value> {
        let b = self.bytes.lock().unwrap().clone();
        b.split(|c| *c == b'\n')
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect()
    }

    /// The cobs command frames read so far: (id, payload).
    fn commands(&self) -> Vec<(String, Vec<u8>)> {
        let b = self.bytes.lock().unwrap().clone();
        b.split_inclusive(|c| *c == 0)
            .filter(|f| tidepool_proto::frame_kind(f) == tidepool_proto::FrameKind::Command)
            .filter_map(|f| {
                let mut f = f.to_vec();
                let c: tidepool_proto::Command = tidepool_proto::decode_cobs(&mut f).ok()?;
                Some((c.id.to_string(), c.payload.to_vec()))
            })
            .collect()
    }
}

/// Results (by command id) and local messages (topic, payload) seen on a broker.
#[derive(Clone, Default)]
struct Seen {
    results: Arc<Mutex<Vec<Value>>>,
    local: Arc<Mutex<Vec<(String, String)>>>,
}

impl Seen {
    fn listen(port: u16, filters: &[&str]) -> (Seen, impl Drop) {
        let seen = Seen::default();
        let s = seen.clone();
        let (rt, task) = listen(port, filters, move |topic, payload| {
            if topic.ends_with("/commands/result") {
                if let Ok(v) = serde_json::from_slice(payload) {
                    s.results.lock().unwrap().push(v);
                }
            } else {
                s.local.lock().unwrap().push((
                    topic.to_string(),
                    String::from_utf8_lossy(payload).to_string(),
                ));
            }
        });
        (seen, Stop(rt, task))
    }

    fn result(&self, id: &str) -> Option<Value> {
        self.results
            .lock()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .cloned()
    }

    fn wait_result(&self, id: &str, within: Duration) -> Value {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if let Some(r) = self.result(id) {
                return r;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "no result for {id}; results: {:?}",
            self.results.lock().unwrap()
        );
    }
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

struct Stop(tokio::runtime::Runtime, tokio::task::JoinHandle<()>);
impl Drop for Stop {
    fn drop(&mut self) {
        self.1.abort();
        let _ = &self.0;
    }
}

fn send(port: u16, target: &str, cmd: &Value) {
    mosquitto_pub_ok(
        port,
        &[
            "-q",
            "1",
            "-t",
            &format!("tidepool/test-gw/commands/{target}"),
            "-m",
            &cmd.to_string(),
        ],
    );
}

fn wait_subscribed(g: &Gateway) {
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        if g.status()["commands"]["connected"] == true {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "commands never subscribed: {}\n{}",
        g.status()["commands"],
        g.log()
    );
}

#[test]
fn commands_reach_local_topics_and_serial_ports_and_each_gets_a_result() {
    let mosq = Mosquitto::start("");
    let dir = tempfile::tempdir().unwrap();
    let (lines_dir, cobs_dir) = (dir.path().join("l"), dir.path().join("c"));
    std::fs::create_dir_all(&lines_dir).unwrap();
    std::fs::create_dir_all(&cobs_dir).unwrap();
    let mut lines_pty = PtyPair::start(&lines_dir);
    let mut cobs_pty = PtyPair::start(&cobs_dir);
    let lines_dev = PtyReader::start(&lines_pty.b);
    let cobs_dev = PtyReader::start(&cobs_pty.b);
    let mut g = Gateway::start(&format!(
        r#"
[[ingest.serial]]
name = "uart0"
path = "{}"
[[ingest.serial]]
name = "bus1"
path = "{}"
framing = "cobs"
[upstream]
url = "mqtt://127.0.0.1:{}"
[commands]
enabled = true
allow = ["actuators/#", "serial/uart0", "serial/bus1", "serial/nowhere"]
max_age = "30s"
"#,
        lines_pty.a.display(),
        cobs_pty.a.display(),
        mosq.port
    ));
    let (up, _up) = Seen::listen(mosq.port, &["tidepool/test-gw/commands/result"]);
    let (local, _local) = Seen::listen(g.mqtt_port, &["actuators/#"]);
    wait_subscribed(&g);

    send(
        mosq.port,
        "actuators/valve-3",
        &json!({"id": "c1", "payload": {"open": true}}),
    );
    let r = up.wait_result("c1", Duration::from_secs(10));
    assert_eq!(r["status"], "delivered", "{r}");
    assert_eq!(r["target"], "actuators/valve-3");
    assert_eq!(r["gateway"], "test-gw");
    assert_eq!(
        local.local.lock().unwrap().clone(),
        vec![(
            "actuators/valve-3".to_string(),
            r#"{"open":true}"#.to_string()
        )]
    );

    send(
        mosq.port,
        "serial/uart0",
        &json!({"id": "c2", "payload": "PING"}),
    );
    assert_eq!(
        up.wait_result("c2", Duration::from_secs(10))["status"],
        "delivered"
    );
    assert!(
        lines_dev
            .lines()
            .contains(&json!({"command": "c2", "payload": "PING"})),
        "the line device read {:?}",
        lines_dev.lines()
    );

    send(
        mosq.port,
        "serial/bus1",
        &json!({"id": 3, "payload": "OPEN"}),
    );
    assert_eq!(
        up.wait_result("3", Duration::from_secs(10))["status"],
        "delivered"
    );
    assert_eq!(
        cobs_dev.commands(),
        vec![("3".to_string(), b"OPEN".to_vec())]
    );

    // Refused, expired, failed, bad: each says why.
    send(mosq.port, "doors/front", &json!({"id": "c4", "payload": 1}));
    let r = up.wait_result("c4", Duration::from_secs(10));
    assert_eq!(r["status"], "refused");
    assert!(r["why"].as_str().unwrap().contains("allow"), "{r}");
    let old = tidepool::event::now_ms() - 3_600_000;
    send(
        mosq.port,
        "actuators/valve-3",
        &json!({"id": "c5", "payload": 1, "ts": old}),
    );
    let r = up.wait_result("c5", Duration::from_secs(10));
    assert_eq!(r["status"], "expired", "{r}");
    send(mosq.port, "serial/nowhere", &json!({"id": "c6"}));
    let r = up.wait_result("c6", Duration::from_secs(10));
    assert_eq!(r["status"], "failed", "{r}");
    mosquitto_pub_ok(
        mosq.port,
        &[
            "-q",
            "1",
            "-t",
            "tidepool/test-gw/commands/actuators/x",
            "-m",
            "OPEN",
        ],
    );
    let until = Instant::now() + Duration::from_secs(10);
    while !up.results.lock().unwrap().iter().any(|r| r["id"].is_null()) {
        assert!(Instant::now() < until, "no result for the bad command");
        std::thread::sleep(Duration::from_millis(50));
    }
    let bad = up
        .results
        .lock()
        .unwrap()
        .iter()
        .find(|r| r["id"].is_null())
        .cloned()
        .unwrap();
    assert_eq!(bad["status"], "refused");
    assert!(bad["why"].as_str().unwrap().contains("JSON"), "{bad}");

    // A resend of a command already taken is recognised by its id: not delivered again.
    send(
        mosq.port,
        "actuators/valve-3",
        &json!({"id": "c1", "payload": {"open": true}}),
    );
    assert!(g.wait_metric(
        "tidepool_commands_total{status=\"duplicate\"}",
        1.0,
        Duration::from_secs(10)
    ));
    std::thread::sleep(Duration::from_millis(300));
    let c1_deliveries = local
        .local
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t == "actuators/valve-3")
        .count();
    assert_eq!(c1_deliveries, 1, "c1 is delivered once");

    // A port that is not open: delivery waits for it (within max_age).
    cobs_pty.unplug();
    send(
        mosq.port,
        "serial/bus1",
        &json!({"id": "c7", "payload": "LATER"}),
    );
    std::thread::sleep(Duration::from_millis(1_500));
    assert!(up.result("c7").is_none(), "c7 waits for its port");
    assert!(g.status()["commands"]["pending"].as_u64().unwrap() >= 1);
    cobs_pty.plug();
    let cobs_dev = PtyReader::start(&cobs_pty.b);
    assert_eq!(
        up.wait_result("c7", Duration::from_secs(15))["status"],
        "delivered"
    );
    assert!(cobs_dev.commands().iter().any(|(id, _)| id == "c7"));

    let status = g.cli(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("commands  subscribed"), "{text}");
    assert_eq!(
        g.metric("tidepool_commands_total{status=\"delivered\"}"),
        Some(4.0)
    );
    g.proc.terminate(Duration::from_secs(10));
    lines_pty.unplug();
    cobs_pty.unplug();
}

/// Commands sent while the gateway is killed (`kill -9`) over and over, to a local broker
/// (client-mode ingest on the same Mosquitto, which survives the kills) and to a serial pty:
/// every command is delivered at least once and gets a `delivered` result.
#[test]
fn kill9_loses_no_command() {
    let mosq = Mosquitto::start("");
    let dir = tempfile::tempdir().unwrap();
    let mut pty = PtyPair::start(dir.path());
    let dev = PtyReader::start(&pty.b);
    let gw_dir = tempfile::tempdir().unwrap();
    let mut g = Gateway::configure(
        gw_dir.path().to_path_buf(),
        &format!(
            r#"
[ingest.mqtt]
mode = "client"
broker = "mqtt://127.0.0.1:{port}"
topics = ["sensors/#"]
[[ingest.serial]]
name = "uart0"
path = "{}"
[upstream]
url = "mqtt://127.0.0.1:{port}"
reconnect_max = "1s"
[commands]
enabled = true
allow = ["actuators/#", "serial/uart0"]
"#,
            pty.a.display(),
            port = mosq.port
        ),
    );
    g.launch();
    let (seen, _stop) = Seen::listen(
        mosq.port,
        &["tidepool/test-gw/commands/result", "actuators/#"],
    );
    wait_subscribed(&g);
    // Commands go out from a thread of their own while this one kills the gateway.
    let n = 100;
    let port = mosq.port;
    let sender = std::thread::spawn(move || {
        for i in 0..n {
            let (target, payload) = if i % 2 == 0 {
                (format!("actuators/k/{i}"), json!({"n": i}))
            } else {
                ("serial/uart0".to_string(), json!({"n": i}))
            };
            send(
                port,
                &target,
                &json!({"id": format!("k{i}"), "payload": payload}),
            );
            std::thread::sleep(Duration::from_millis(15));
        }
    });
    let mut kills = 0;
    while !sender.is_finished() {
        std::thread::sleep(Duration::from_millis(fastrand::u64(150..500)));
        g.proc.kill9();
        kills += 1;
        g.launch();
    }
    sender.join().unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    let ids = |s: &Seen| -> BTreeSet<String> {
        s.results
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r["status"] == "delivered")
            .filter_map(|r| r["id"].as_str().map(String::from))
            .collect()
    };
    while ids(&seen).len() < n && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = ids(&seen);
    let missing: Vec<_> = (0..n)
        .map(|i| format!("k{i}"))
        .filter(|k| !got.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "no delivered result for {missing:?} ({} results seen); the gateway's log ends:\n{}",
        seen.results.lock().unwrap().len(),
        tail(&g.log(), 40)
    );
    // Each delivered at least once to its target.
    let mut deliveries: BTreeMap<u64, usize> = BTreeMap::new();
    for (_, p) in seen.local.lock().unwrap().iter() {
        if let Some(k) = serde_json::from_str::<Value>(p)
            .ok()
            .and_then(|v| v["n"].as_u64())
        {
            *deliveries.entry(k).or_default() += 1;
        }
    }
    for l in dev.lines() {
        if let Some(k) = l["payload"]["n"].as_u64() {
            assert_eq!(l["command"], format!("k{k}"));
            *deliveries.entry(k).or_default() += 1;
        }
    }
    let undelivered: Vec<_> = (0..n as u64)
        .filter(|k| !deliveries.contains_key(k))
        .collect();
    assert!(
        undelivered.is_empty(),
        "never reached their target: {undelivered:?}"
    );
    // Every result was acknowledged and recorded: nothing is left pending.
    let until = Instant::now() + Duration::from_secs(20);
    while g.status()["commands"]["pending"] != 0 {
        assert!(
            Instant::now() < until,
            "still pending: {}",
            g.status()["commands"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let repeats: usize = deliveries.values().map(|c| c - 1).sum();
    let results = seen.results.lock().unwrap().len();
    println!(
        "commands under kill -9: {n} commands, {kills} kills, all delivered and answered; {repeats} repeated deliveries, {} repeated results",
        results - n
    );
    g.proc.terminate(Duration::from_secs(10));
    pty.unplug();
}

/// A crash at a chosen step of a command's life (`TIDEPOOL_FAULT_COMMANDS`), once each:
/// after it is stored but before its PUBACK, the broker resends it and it is recognised, so it
/// is delivered once; after its delivery but before its result is stored, it is delivered
/// again (at least once), and each gets one `delivered` result.
#[test]
fn a_crash_between_steps_repeats_only_the_interrupted_one() {
    for (step, deliveries) in [("after_stash", 1), ("after_deliver", 2)] {
        let mosq = Mosquitto::start("");
        let gw_dir = tempfile::tempdir().unwrap();
        let mut g = Gateway::configure(
            gw_dir.path().to_path_buf(),
            &format!(
                r#"
[ingest.mqtt]
mode = "client"
broker = "mqtt://127.0.0.1:{port}"
topics = ["sensors/#"]
[upstream]
url = "mqtt://127.0.0.1:{port}"
reconnect_max = "1s"
[commands]
enabled = true
allow = ["actuators/#"]
"#,
                port = mosq.port
            ),
        );
        let once = gw_dir.path().join("crash-once");
        std::fs::write(&once, "").unwrap();
        g.set_env("TIDEPOOL_FAULT_COMMANDS", step);
        g.set_env("TIDEPOOL_FAULT_COMMANDS_ONCE", once.to_str().unwrap());
        g.launch();
        let (seen, _stop) = Seen::listen(
            mosq.port,
            &["tidepool/test-gw/commands/result", "actuators/#"],
        );
        wait_subscribed(&g);
        send(
            mosq.port,
            "actuators/door",
            &json!({"id": "x1", "payload": "OPEN"}),
        );
        let until = Instant::now() + Duration::from_secs(10);
        while g.proc.running() {
            assert!(Instant::now() < until, "{step}: no crash\n{}", g.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(g.log().contains("crashing on purpose"), "{}", g.log());
        g.launch();
        let r = seen.wait_result("x1", Duration::from_secs(15));
        assert_eq!(r["status"], "delivered", "{step}: {r}");
        std::thread::sleep(Duration::from_millis(500));
        let got = seen
            .local
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, p)| t == "actuators/door" && p == "OPEN")
            .count();
        assert_eq!(got, deliveries, "{step}: delivered {got} times");
        if step == "after_stash" {
            assert_eq!(
                g.metric("tidepool_commands_total{status=\"duplicate\"}"),
                Some(1.0),
                "the resend is recognised"
            );
        }
        g.proc.terminate(Duration::from_secs(10));
    }
}
