//! The subscriber examples (examples/python/subscriber.py with paho-mqtt, examples/node/
//! subscriber.js with MQTT.js) against a real gateway publishing to a real Mosquitto: a
//! simulator load, then a second one with the gateway killed (-9) and restarted in the middle,
//! then a batch sent again on purpose. Each example must print every event that arrived
//! exactly once, and count every repeat it dropped. paho-mqtt and MQTT.js are installed by
//! scripts/test; missing, these tests fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidepool::forward::compress::{self, Compression, DEFAULT_LEVEL, GZIP_MAGIC};
use tidepool_e2e::mqtt_clients::{self, clients_dir, mosquitto_pub_ok};
use tidepool_e2e::*;

const TOPIC: &str = "tidepool/test-gw/events";
const WAIT: Duration = Duration::from_secs(30);

/// An example subscriber running, its stdout and stderr in files.
struct Example {
    proc: Proc,
    out: PathBuf,
    err: PathBuf,
    _dir: tempfile::TempDir,
}

impl Example {
    /// Starts `program script` on `port` and waits until it says "subscribed" (SUBACK).
    fn start(program: &str, script: &str, port: u16) -> Example {
        let bin = which(program).unwrap_or_else(|| panic!("{program} is not installed"));
        let dir = tempfile::tempdir().unwrap();
        let (out, err) = (dir.path().join("out"), dir.path().join("err"));
        let port = port.to_string();
        let child = Command::new(bin)
            .arg(root().join(script))
            .args(["--host", "127.0.0.1", "--port", &port])
            .args(["--topic", "tidepool/+/events", "--timeout", "60"])
            // MQTT.js as the tests' clients have it (scripts/test installs it there).
            .env("NODE_PATH", clients_dir().join("node_modules"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("start the example");
        let ex = Example {
            proc: Proc {
                child: Some(child),
                name: script.into(),
            },
            out,
            err,
            _dir: dir,
        };
        let until = Instant::now() + Duration::from_secs(10);
        while !ex.stderr().lines().any(|l| l == "subscribed") {
            assert!(
                Instant::now() < until,
                "{script} did not subscribe (run scripts/test: it installs paho-mqtt and MQTT.js); stderr:\n{}",
                ex.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        ex
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// The complete lines printed so far, parsed.
    fn lines(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

/// (source, n) of a simulator event, as printed or as carried in a batch.
fn key(e: &serde_json::Value) -> (String, u64) {
    (
        e["source"].as_str().unwrap().to_string(),
        e["payload"]["n"].as_u64().unwrap(),
    )
}

/// Every event Mosquitto delivered, repeats included, with its id: an independent record of
/// what the example was sent.
type Raw = Arc<Mutex<Vec<(u64, serde_json::Value)>>>;

fn record(port: u16) -> (Raw, impl Drop) {
    let raw: Raw = Arc::default();
    let r = raw.clone();
    let (rt, task) = listen(port, &[TOPIC], move |_, payload| {
        let json = if payload.starts_with(&GZIP_MAGIC) {
            compress::decompress_gzip(payload).unwrap()
        } else {
            payload.to_vec()
        };
        let batch: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let mut r = r.lock().unwrap();
        for e in batch["events"].as_array().unwrap() {
            r.push((e["id"].as_u64().unwrap(), e.clone()));
        }
    });
    struct Stop {
        _rt: tokio::runtime::Runtime,
        task: tokio::task::JoinHandle<()>,
    }
    impl Drop for Stop {
        fn drop(&mut self) {
            self.task.abort();
        }
    }
    (raw, Stop { _rt: rt, task })
}

/// One example, one compression: see the file's header.
fn example_dedupes_across_a_kill9(program: &str, script: &str, compression: &str) {
    let started = Instant::now();
    let up = Mosquitto::start("");
    let (raw, _recorder) = record(up.port);
    let mut ex = Example::start(program, script, up.port);
    let mut gw = Gateway::start(&format!(
        "[upstream]\nurl = \"mqtt://127.0.0.1:{}\"\ncompression = \"{compression}\"\nbatch_max_wait = \"100ms\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n",
        up.port
    ));

    // A first load, then a second with a kill -9 in its middle.
    run_sim(gw.mqtt_port, 1_000, 0.0, &["--client-id", "first"]);
    let acked_log = gw.dir.join("acked.log");
    let mut sim = spawn_sim(
        gw.mqtt_port,
        2_000,
        2_000.0,
        &[
            "--client-id",
            "second",
            "--acked-log",
            acked_log.to_str().unwrap(),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    gw.proc.kill9();
    gw.launch();
    let until = Instant::now() + Duration::from_secs(10);
    while sim.running() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    sim.kill9();
    let acked = kill_storm::acked_log(&acked_log);
    assert!(
        acked.len() >= 500,
        "the kill must come under load: {} acknowledged",
        acked.len()
    );
    let mut want: BTreeSet<(String, u64)> = (0..1_000).map(|n| ("mqtt:first".into(), n)).collect();
    want.extend(acked.iter().map(|n| ("mqtt:second".to_string(), *n)));
    let printed_all = |ex: &Example| {
        let got: BTreeSet<_> = ex.lines().iter().map(key).collect();
        want.is_subset(&got)
    };
    let until = Instant::now() + WAIT;
    while !printed_all(&ex) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }

    // Then a batch sent again by hand (as a gateway would after a lost PUBACK), encoded as
    // the gateway encodes it: a repeat the example must drop, whatever the kill gave.
    let (first_id, first) = raw.lock().unwrap()[0].clone();
    let again = serde_json::to_vec(
        &serde_json::json!({"gateway": "test-gw", "batch": 1, "events": [first]}),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("again");
    let mut args = vec!["-V", "mqttv5", "-q", "1", "-t", TOPIC];
    args.extend([
        "-D",
        "publish",
        "content-type",
        "application/vnd.tidepool.batch+json",
    ]);
    if compression == "gzip" {
        std::fs::write(
            &file,
            compress::compress(Compression::Gzip, DEFAULT_LEVEL, &again),
        )
        .unwrap();
        args.extend(["-D", "publish", "user-property", "content-encoding", "gzip"]);
    } else {
        std::fs::write(&file, &again).unwrap();
    }
    args.extend(["-f", file.to_str().unwrap()]);
    let before = raw.lock().unwrap().len();
    mosquitto_pub_ok(up.port, &args);
    let until = Instant::now() + Duration::from_secs(5);
    while raw.lock().unwrap().len() == before && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500)); // the example's copy, too
    assert_eq!(
        ex.proc.terminate(Duration::from_secs(5)),
        Some(0),
        "{}",
        ex.stderr()
    );

    // Printed: each event once, all that arrived (every acknowledged one among them).
    let lines = ex.lines();
    let mut by_key: BTreeMap<(String, u64), Vec<u64>> = BTreeMap::new();
    for l in &lines {
        assert_eq!(l["gateway"], "test-gw", "{l}");
        by_key
            .entry(key(l))
            .or_default()
            .push(l["id"].as_u64().unwrap());
    }
    let twice: Vec<_> = by_key.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(twice.is_empty(), "printed more than once: {twice:?}");
    let missing: Vec<_> = want.iter().filter(|k| !by_key.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} never printed (first: {:?}); stderr:\n{}\nlog:\n{}",
        missing.len(),
        missing.first(),
        ex.stderr(),
        gw.log()
    );
    // ... exactly the distinct (gateway, id)s Mosquitto delivered, repeats counted.
    let raw = raw.lock().unwrap();
    let distinct: BTreeSet<u64> = raw.iter().map(|(id, _)| *id).collect();
    let printed: BTreeSet<u64> = lines.iter().map(|l| l["id"].as_u64().unwrap()).collect();
    assert_eq!(printed, distinct, "printed ids vs delivered ids");
    assert!(distinct.contains(&first_id));
    let repeats = raw.len() - distinct.len();
    assert!(repeats >= 1);
    let summary = format!("{} events, {repeats} duplicates", distinct.len());
    assert!(
        ex.stderr().lines().any(|l| l == summary),
        "want `{summary}` on stderr:\n{}",
        ex.stderr()
    );
    eprintln!(
        "{script} ({compression}): {summary} ({} by the kill), {:.1} s",
        repeats - 1,
        started.elapsed().as_secs_f64()
    );
}

/// paho-mqtt (MQTT 5), gzip batches: decoded by the content-encoding property or the magic.
#[test]
fn python_subscriber_gzip() {
    example_dedupes_across_a_kill9("python3", "examples/python/subscriber.py", "gzip");
}

/// paho-mqtt (MQTT 5), plain JSON batches.
#[test]
fn python_subscriber_uncompressed() {
    example_dedupes_across_a_kill9("python3", "examples/python/subscriber.py", "none");
}

/// MQTT.js (MQTT 5), gzip batches, `zlib.gunzipSync`.
#[test]
fn node_subscriber_gzip() {
    example_dedupes_across_a_kill9("node", "examples/node/subscriber.js", "gzip");
}

/// A command example against a gateway with `[commands]` on: (exit status, result printed).
fn send_command(
    program: &str,
    script: &str,
    port: u16,
    target: &str,
    payload: &str,
) -> (i32, serde_json::Value) {
    let bin = which(program).unwrap_or_else(|| panic!("{program} is not installed"));
    let mut c = Command::new(bin);
    c.arg(root().join(script))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--gateway",
            "test-gw",
            "--target",
            target,
            "--payload",
            payload,
        ])
        .args(["--timeout", "20"])
        .env("NODE_PATH", clients_dir().join("node_modules"));
    let out = mqtt_clients::run_within(c, Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "{script} printed no result: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), result)
}

/// Each command example gets its command delivered and its result: with the gateway up, for a
/// refused target, and sent while the gateway is down after a `kill -9` (the broker keeps the
/// command for the gateway's persistent session).
fn command_example(program: &str, script: &str) {
    let up = Mosquitto::start("");
    let mut gw = Gateway::start(&format!(
        // Client-mode ingest on the same Mosquitto: the local broker outlives the kill below.
        "[ingest.mqtt]\nmode = \"client\"\nbroker = \"mqtt://127.0.0.1:{port}\"\ntopics = [\"sensors/#\"]\n[upstream]\nurl = \"mqtt://127.0.0.1:{port}\"\nreconnect_max = \"1s\"\n[commands]\nenabled = true\nallow = [\"actuators/#\"]\n",
        port = up.port
    ));
    let until = Instant::now() + WAIT;
    while gw.status()["commands"]["connected"] != true {
        assert!(
            Instant::now() < until,
            "commands never subscribed:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let local = Arc::new(Mutex::new(Vec::new()));
    let l = local.clone();
    let (_rt, _task) = listen(up.port, &["actuators/#"], move |t, p| {
        l.lock()
            .unwrap()
            .push((t.to_string(), String::from_utf8_lossy(p).to_string()))
    });

    let (code, r) = send_command(
        program,
        script,
        up.port,
        "actuators/valve-3",
        r#"{"open":true}"#,
    );
    assert_eq!((code, r["status"].as_str()), (0, Some("delivered")), "{r}");
    assert_eq!(r["target"], "actuators/valve-3");
    assert!(local
        .lock()
        .unwrap()
        .contains(&("actuators/valve-3".into(), r#"{"open":true}"#.into())));

    let (code, r) = send_command(program, script, up.port, "doors/front", r#""OPEN""#);
    assert_eq!((code, r["status"].as_str()), (1, Some("refused")), "{r}");

    // Sent while the gateway is down: it comes when the gateway does.
    gw.proc.kill9();
    let (p, s, port) = (program.to_string(), script.to_string(), up.port);
    let sender =
        std::thread::spawn(move || send_command(&p, &s, port, "actuators/pump", r#""ON""#));
    std::thread::sleep(Duration::from_millis(1_000));
    gw.launch();
    let until = Instant::now() + WAIT;
    while !local
        .lock()
        .unwrap()
        .iter()
        .any(|(t, _)| t == "actuators/pump")
    {
        assert!(
            Instant::now() < until,
            "the command sent while down never came"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, r) = sender.join().unwrap();
    assert_eq!((code, r["status"].as_str()), (0, Some("delivered")), "{r}");
    assert!(local
        .lock()
        .unwrap()
        .contains(&("actuators/pump".into(), "ON".into())));
    gw.proc.terminate(Duration::from_secs(10));
}

#[test]
fn python_send_command() {
    command_example("python3", "examples/python/send_command.py");
}

#[test]
fn node_send_command() {
    command_example("node", "examples/node/send_command.js");
}

/// The HTTP function example (Python, standard library) behind a gateway's `[[sink]]`: it
/// checks the API key, decodes gzip, and prints each event once, across a `kill -9` of the
/// gateway mid-load (repeated batches recognised by their Idempotency-Key).
#[test]
fn python_http_function_takes_every_batch_once() {
    let bin = which("python3").expect("python3 is not installed");
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let child = Command::new(bin)
        .arg(root().join("examples/python/http_function.py"))
        .args(["--port", "0", "--api-key", "k-123"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("start the HTTP function");
    let mut function = Proc {
        child: Some(child),
        name: "http_function.py".into(),
    };
    let until = Instant::now() + Duration::from_secs(10);
    let port: u16 = loop {
        let e = std::fs::read_to_string(&err).unwrap_or_default();
        if let Some(p) = e.lines().find_map(|l| l.strip_prefix("listening ")) {
            break p.trim().parse().unwrap();
        }
        assert!(Instant::now() < until, "the function did not start: {e}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut gw = Gateway::start(&format!(
        "[[sink]]\nname = \"fn\"\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/ingest\"\nheaders = {{ \"X-Api-Key\" = \"k-123\" }}\ncompression = \"gzip\"\nbatch_max_wait = \"100ms\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n"
    ));
    let printed = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    run_sim(gw.mqtt_port, 1_000, 0.0, &["--client-id", "first"]);
    let acked_log = gw.dir.join("acked.log");
    let mut sim = spawn_sim(
        gw.mqtt_port,
        2_000,
        2_000.0,
        &[
            "--client-id",
            "second",
            "--acked-log",
            acked_log.to_str().unwrap(),
        ],
    );
    std::thread::sleep(Duration::from_millis(400));
    gw.proc.kill9();
    gw.launch();
    let until = Instant::now() + Duration::from_secs(10);
    while sim.running() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    sim.kill9();
    let acked = kill_storm::acked_log(&acked_log);
    let mut want: BTreeSet<(String, u64)> = (0..1_000).map(|n| ("mqtt:first".into(), n)).collect();
    want.extend(acked.iter().map(|n| ("mqtt:second".to_string(), *n)));
    let seen = |p: &[serde_json::Value]| -> BTreeSet<(String, u64)> {
        p.iter()
            .filter_map(|e| {
                Some((
                    e["source"].as_str()?.to_string(),
                    e["payload"]["n"].as_u64()?,
                ))
            })
            .collect()
    };
    let until = Instant::now() + WAIT;
    while !want.is_subset(&seen(&printed())) {
        assert!(
            Instant::now() < until,
            "missing {} events; stderr: {}",
            want.difference(&seen(&printed())).count(),
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let p = printed();
    let ids: BTreeSet<u64> = p.iter().filter_map(|e| e["id"].as_u64()).collect();
    assert_eq!(ids.len(), p.len(), "an id was printed twice");
    assert!(p.iter().all(|e| e["gateway"] == "test-gw"));
    gw.proc.terminate(Duration::from_secs(10));
    function.kill9();
}
