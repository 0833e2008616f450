//! Harness for Tidepool's black-box tests: real processes on loopback ports.
//!
//! Every process started here is owned by a guard that kills it (by PID) when dropped, so a
//! failing test leaves nothing running. Mosquitto must be installed (`.ci/run` installs it);
//! a missing one fails the test loudly instead of skipping it.

pub mod disk;
pub mod drain;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

pub mod admin;
pub mod fault_proxy;
pub mod http_sink;
pub mod ingest;
pub mod kill_storm;
pub mod mqtt_clients;
pub mod pki;
pub mod procfs;
pub mod soak;
pub mod upstream_limits;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A command for one of the project's binaries. `TIDEPOOL_RUNNER` (e.g.
/// `qemu-aarch64-static -L /usr/aarch64-linux-gnu`) runs it under an emulator, for binaries
/// cross-built into `TIDEPOOL_BIN_DIR`. `TIDEPOOL_GATEWAY_BIN` names another `tidepool` binary
/// (the benchmark's side-by-side run of an earlier release), the simulator staying this one.
pub fn command(bin: &str) -> Command {
    let path = match std::env::var("TIDEPOOL_GATEWAY_BIN") {
        Ok(p) if bin == "tidepool" && !p.is_empty() => PathBuf::from(p),
        _ => bin_dir().join(bin),
    };
    match std::env::var("TIDEPOOL_RUNNER")
        .ok()
        .filter(|r| !r.trim().is_empty())
    {
        Some(runner) => {
            let mut parts = runner.split_whitespace();
            let mut c = Command::new(parts.next().unwrap());
            c.args(parts).arg(path);
            c
        }
        None => Command::new(path),
    }
}

/// Builds `tidepool` and `tidepool-sim` once per test binary; returns the folder holding them
/// (or `TIDEPOOL_BIN_DIR`, binaries built elsewhere, e.g. cross-built for the Pi).
pub fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(d) = std::env::var("TIDEPOOL_BIN_DIR") {
            let d = PathBuf::from(d);
            return if d.is_absolute() { d } else { root().join(d) };
        }
        let release = std::env::var("TIDEPOOL_TEST_RELEASE").is_ok();
        let mut cmd = outer_env(Command::new(env!("CARGO")));
        cmd.current_dir(root())
            .args(["build", "-q", "-p", "tidepool", "-p", "tidepool-sim"]);
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "building the binaries failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root().join("target"));
        target.join(if release { "release" } else { "debug" })
    })
    .clone()
}

/// `cmd` without the variables cargo sets for a running test (`CARGO_PKG_NAME`,
/// `CARGO_MANIFEST_DIR`, ...), for a nested `cargo build`: some build scripts (ring's) rerun
/// when those differ, which would rebuild half the tree once inside the tests and again outside.
pub fn outer_env(mut cmd: Command) -> Command {
    const SET_FOR_TESTS: [&str; 7] = [
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
    ];
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if SET_FOR_TESTS.iter().any(|p| k.starts_with(p)) {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something listens on `port`.
pub fn wait_port(port: u16, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A child process killed (SIGKILL, by PID) when dropped.
pub struct Proc {
    /// The child.
    pub child: Option<Child>,
    /// What it is, for messages.
    pub name: String,
}

impl Proc {
    /// PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `within`; returns the exit code (None: had to be killed).
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let until = Instant::now() + within;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > until {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A real Mosquitto on a free loopback port.
pub struct Mosquitto {
    /// Its port.
    pub port: u16,
    /// The process.
    pub proc: Proc,
    dir: tempfile::TempDir,
    extra: String,
}

impl Mosquitto {
    /// Starts one; `extra` is appended to its config (listener and basics are set).
    pub fn start(extra: &str) -> Mosquitto {
        Self::start_on(free_port(), extra)
    }

    /// Starts one on `port`.
    pub fn start_on(port: u16, extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        let has_listener = extra.contains("listener ");
        let mut text = String::new();
        if !has_listener {
            text.push_str(&format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\n"
            ));
        }
        let inflight = if extra.contains("max_inflight_messages") {
            ""
        } else {
            "max_inflight_messages 0\n"
        };
        text.push_str(&format!(
            "# Keep the privileges of the test (files live in private temp dirs).\nuser root\nmax_queued_messages 0\n{inflight}persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n{extra}\n"
        ));
        std::fs::write(&conf, text).unwrap();
        let bin = which("mosquitto").expect(
            "mosquitto is not installed: run .ci/run (it installs it) or `apt-get install mosquitto`",
        );
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("log")).unwrap(),
            ))
            .spawn()
            .expect("start mosquitto");
        let m = Mosquitto {
            port,
            proc: Proc {
                child: Some(child),
                name: "mosquitto".into(),
            },
            dir,
            extra: extra.to_string(),
        };
        assert!(
            wait_port(port, Duration::from_secs(10)),
            "mosquitto did not start on {port}"
        );
        m
    }

    /// Stops it (SIGKILL) and starts a fresh one on the same port, without persistence.
    pub fn restart(&mut self) {
        self.proc.kill9();
        let fresh = Mosquitto::start_on(self.port, &self.extra);
        *self = fresh;
    }

    /// The config folder (for certificates).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Finds an executable on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
    {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    None
}

/// A gateway process with its own data dir and ports.
pub struct Gateway {
    /// The process.
    pub proc: Proc,
    /// Its data and config folder.
    pub dir: PathBuf,
    /// Config file.
    pub config: PathBuf,
    /// Embedded broker port.
    pub mqtt_port: u16,
    /// Admin port.
    pub admin_port: u16,
    log: PathBuf,
    env: Vec<(String, String)>,
    _tmp: Option<tempfile::TempDir>,
}

impl Gateway {
    /// Sets an environment variable for the next [`launch`](Self::launch).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Writes a config (`[gateway]`, `[ingest.mqtt] listen`, `[admin]` filled in; `extra`
    /// appended as is) and starts the daemon, waiting until its admin endpoint answers.
    pub fn start(extra: &str) -> Gateway {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut g = Self::configure(dir, extra);
        g._tmp = Some(tmp);
        g.launch();
        g
    }

    /// Same, in a given folder (kept), without starting.
    pub fn configure(dir: PathBuf, extra: &str) -> Gateway {
        let mqtt_port = free_port();
        let admin_port = free_port();
        let config = dir.join("tidepool.toml");
        let text = format!(
            "[gateway]\nid = \"test-gw\"\ndata_dir = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n{}\n",
            dir.join("data").display(),
            merge_listen(extra, mqtt_port)
        );
        std::fs::write(&config, text).unwrap();
        Gateway {
            proc: Proc {
                child: None,
                name: "tidepool".into(),
            },
            log: dir.join("gateway.log"),
            dir,
            config,
            mqtt_port,
            admin_port,
            env: Vec::new(),
            _tmp: None,
        }
    }

    /// Starts (or restarts) the daemon. A port taken meanwhile by another test (the ports
    /// are picked free, then bound by the daemon: a race with tests running in parallel) is
    /// replaced by a fresh one, up to three times.
    pub fn launch(&mut self) {
        for attempt in 0..3 {
            let from = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0) as usize;
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap();
            let child = command("tidepool")
                .args(["run", "--config"])
                .arg(&self.config)
                .env("TIDEPOOL_LOG", "info")
                .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .expect("start tidepool");
            self.proc.child = Some(child);
            if wait_port(self.admin_port, Duration::from_secs(20)) {
                return;
            }
            let this_run = self.log().get(from..).unwrap_or("").to_string();
            if attempt < 2 && this_run.contains("Address already in use") {
                if let Some(mut c) = self.proc.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                let (mqtt, admin) = (free_port(), free_port());
                let text = std::fs::read_to_string(&self.config)
                    .unwrap()
                    .replace(
                        &format!("127.0.0.1:{}\"", self.mqtt_port),
                        &format!("127.0.0.1:{mqtt}\""),
                    )
                    .replace(
                        &format!("127.0.0.1:{}\"", self.admin_port),
                        &format!("127.0.0.1:{admin}\""),
                    );
                std::fs::write(&self.config, text).unwrap();
                (self.mqtt_port, self.admin_port) = (mqtt, admin);
                continue;
            }
            break;
        }
        panic!("gateway did not start; log:\n{}", self.log());
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/status` as JSON.
    pub fn status(&self) -> serde_json::Value {
        let body = http_get(self.admin_port, "/status").unwrap_or_default();
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
    }

    /// `/metrics` value of one series (exact name with labels).
    pub fn metric(&self, series: &str) -> Option<f64> {
        let body = http_get(self.admin_port, "/metrics")?;
        body.lines()
            .find(|l| l.split_whitespace().next() == Some(series))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    /// Waits up to `within` for `series` to read `value`; whether it did. (Delivered events
    /// leave the store with the next commit, which waits up to `budget_max_wait` while the
    /// write budget is spent.)
    pub fn wait_metric(&self, series: &str, value: f64, within: Duration) -> bool {
        let until = Instant::now() + within;
        loop {
            if self.metric(series) == Some(value) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `tidepool ARGS --config CONFIG`.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        command("tidepool")
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap()
    }
}

fn merge_listen(extra: &str, port: u16) -> String {
    if extra.contains("[ingest.mqtt]") {
        extra.replacen(
            "[ingest.mqtt]",
            &format!("[ingest.mqtt]\nlisten = \"127.0.0.1:{port}\""),
            1,
        )
    } else {
        format!("[ingest.mqtt]\nlisten = \"127.0.0.1:{port}\"\n{extra}")
    }
}

/// A plain HTTP GET on loopback: (status code, body).
pub fn http_get_full(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|x| x.1.to_string())?;
    Some((code, body))
}

/// A plain HTTP GET on loopback: the body.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    http_get_full(port, path).map(|(_, body)| body)
}

/// Runs the simulator to completion; returns its JSON summary.
pub fn run_sim(port: u16, count: u64, rate: f64, extra: &[&str]) -> serde_json::Value {
    let out = sim_command(port, count, rate, extra).output().unwrap();
    assert!(
        out.status.success(),
        "sim failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("sim output: {}", String::from_utf8_lossy(&out.stdout)))
}

/// The simulator command, for running in the background.
pub fn sim_command(port: u16, count: u64, rate: f64, extra: &[&str]) -> Command {
    let mut c = command("tidepool-sim");
    c.args([
        "--broker",
        &format!("mqtt://127.0.0.1:{port}"),
        "--count",
        &count.to_string(),
        "--rate",
        &rate.to_string(),
        "--json",
    ])
    .args(extra)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

/// Starts the simulator in the background.
pub fn spawn_sim(port: u16, count: u64, rate: f64, extra: &[&str]) -> Proc {
    Proc {
        child: Some(
            sim_command(port, count, rate, extra)
                .spawn()
                .expect("start tidepool-sim"),
        ),
        name: "tidepool-sim".into(),
    }
}

/// A QoS 1 subscription to `filters` on `port` (reconnecting, on a runtime of its own) that
/// hands each message's topic and payload to `on_publish`; returns once the SUBACK arrived.
/// Dropping the runtime ends it.
pub fn listen(
    port: u16,
    filters: &[&str],
    mut on_publish: impl FnMut(&str, &[u8]) + Send + 'static,
) -> (tokio::runtime::Runtime, tokio::task::JoinHandle<()>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let filters: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let task = rt.spawn(async move {
        let mut opts =
            MqttOptions::new(format!("test-sub-{}", fastrand::u32(..)), "127.0.0.1", port);
        opts.set_max_packet_size(16 << 20, 64 << 10);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(opts, 100);
        let mut tx = Some(tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let c = client.clone();
                    let f = filters.clone();
                    tokio::spawn(async move {
                        for t in f {
                            let _ = c.subscribe(t, QoS::AtLeastOnce).await;
                        }
                    });
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => on_publish(&p.topic, &p.payload),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(15))
        .expect("no SUBACK from the broker");
    (rt, task)
}

/// One event as received upstream.
#[derive(Debug, Clone)]
pub struct Got {
    /// Gateway id of the event.
    pub id: u64,
    /// Batch number.
    pub batch: u64,
    /// The simulator's `n`, when present.
    pub n: Option<u64>,
    /// The payload.
    pub payload: serde_json::Value,
    /// The whole event object.
    pub event: serde_json::Value,
}

/// A QoS 1 subscriber on a broker, collecting batches.
pub struct Subscriber {
    /// Everything received, in arrival order.
    pub got: Arc<Mutex<Vec<Got>>>,
    /// Other messages by topic (e.g. the retained status).
    pub other: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
    rt: tokio::runtime::Runtime,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Subscribes to `filters` on `port` and returns once the SUBACK arrived.
    pub fn start(port: u16, filters: &[&str]) -> Subscriber {
        let got = Arc::new(Mutex::new(Vec::new()));
        let other = Arc::new(Mutex::new(BTreeMap::new()));
        let (g, o) = (got.clone(), other.clone());
        let (rt, task) = listen(
            port,
            filters,
            move |topic, payload| match serde_json::from_slice::<serde_json::Value>(payload) {
                Ok(v) if v.get("events").is_some() => {
                    let batch = v["batch"].as_u64().unwrap_or(0);
                    let mut g = g.lock().unwrap();
                    for e in v["events"].as_array().unwrap() {
                        g.push(Got {
                            id: e["id"].as_u64().unwrap(),
                            batch,
                            n: e["payload"]["n"].as_u64(),
                            payload: e["payload"].clone(),
                            event: e.clone(),
                        });
                    }
                }
                _ => {
                    o.lock()
                        .unwrap()
                        .entry(topic.to_string())
                        .or_insert_with(Vec::new)
                        .push(String::from_utf8_lossy(payload).to_string());
                }
            },
        );
        Subscriber {
            got,
            other,
            rt,
            task,
        }
    }

    /// Waits until `pred` holds on what was received, or `within` passes; returns whether it held.
    pub fn wait_for(&self, within: Duration, pred: impl Fn(&[Got]) -> bool) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if pred(&self.got.lock().unwrap()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        pred(&self.got.lock().unwrap())
    }

    /// Distinct simulator `n` values received.
    pub fn distinct_n(&self) -> std::collections::BTreeSet<u64> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter_map(|g| g.n)
            .collect()
    }

    /// A copy of what was received.
    pub fn snapshot(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
        let _ = &self.rt;
    }
}

/// Checks at-least-once with stable ids: every n in 0..count arrived, and every repeated n
/// carries the same id. Returns (distinct, duplicates).
pub fn check_complete(got: &[Got], count: u64) -> (u64, u64) {
    let mut by_n: BTreeMap<u64, u64> = BTreeMap::new();
    let mut dups = 0;
    for g in got {
        let n = g.n.expect("simulator event");
        match by_n.get(&n) {
            Some(id) => {
                assert_eq!(*id, g.id, "event n={n} arrived twice with different ids");
                dups += 1;
            }
            None => {
                by_n.insert(n, g.id);
            }
        }
    }
    let missing: Vec<u64> = (0..count)
        .filter(|n| !by_n.contains_key(n))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "missing events (first 10): {missing:?} of {count}; got {}",
        by_n.len()
    );
    (by_n.len() as u64, dups)
}

/// A TCP proxy on loopback that can refuse new connections for a while (to hold a client off
/// while a test rearranges what is behind it).
pub struct Proxy {
    /// The proxy's port.
    pub port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    /// Proxies a free port to `target`.
    pub fn start(target: u16) -> Proxy {
        Proxy::start_on(0, target)
    }

    /// Proxies `listen` (0: a free port) to `target`. Puts a broker behind a port a gateway
    /// already dials only once the test's subscriber is ready there, so no batch can reach
    /// the broker before the subscriber does.
    pub fn start_on(listen: u16, target: u16) -> Proxy {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let listener = std::net::TcpListener::bind(("127.0.0.1", listen)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (o, s) = (open.clone(), stop.clone());
        let conns = Arc::new(Mutex::new(Vec::new()));
        let cs = conns.clone();
        std::thread::spawn(move || {
            while !s.load(SeqCst) {
                match listener.accept() {
                    Ok((inbound, _)) => {
                        if !o.load(SeqCst) {
                            continue; // dropped: the client sees the connection close
                        }
                        let Ok(outbound) = std::net::TcpStream::connect(("127.0.0.1", target))
                        else {
                            continue;
                        };
                        inbound.set_nonblocking(false).unwrap();
                        let (mut a, mut b) =
                            (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
                        cs.lock().unwrap().push(inbound.try_clone().unwrap());
                        let (mut c, mut d) = (inbound, outbound);
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut a, &mut b);
                            let _ = b.shutdown(std::net::Shutdown::Both);
                        });
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut d, &mut c);
                            let _ = c.shutdown(std::net::Shutdown::Both);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Proxy {
            port,
            open,
            stop,
            conns,
        }
    }

    /// Refuses new connections and cuts every open one (both directions, mid-stream).
    pub fn sever(&self) {
        self.set_open(false);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether new connections go through.
    pub fn set_open(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A socat-made pair of linked pseudo-terminals: whatever is written to one end is read at
/// the other, like a serial cable.
pub struct PtyPair {
    /// The process.
    pub proc: Proc,
    /// One end (give it to the gateway).
    pub a: PathBuf,
    /// The other end (give it to the simulator).
    pub b: PathBuf,
}

impl PtyPair {
    /// Creates the pair in `dir`.
    pub fn start(dir: &Path) -> PtyPair {
        let (a, b) = (dir.join("ttyA"), dir.join("ttyB"));
        let mut p = PtyPair {
            proc: Proc {
                child: None,
                name: "socat".into(),
            },
            a,
            b,
        };
        p.plug();
        p
    }

    /// (Re)creates the pair: a cable plugged in.
    pub fn plug(&mut self) {
        let bin = which("socat").expect("socat is not installed: run .ci/run (it installs it)");
        let child = Command::new(bin)
            .arg(format!("pty,raw,echo=0,link={}", self.a.display()))
            // ignoreeof: the simulator's end may be closed and opened again (a flaky cable).
            .arg(format!(
                "pty,raw,echo=0,link={},ignoreeof",
                self.b.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start socat");
        self.proc.child = Some(child);
        let until = Instant::now() + Duration::from_secs(5);
        while !(self.a.exists() && self.b.exists()) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            self.a.exists() && self.b.exists(),
            "socat did not create the ptys"
        );
    }

    /// Removes the pair: the cable pulled.
    pub fn unplug(&mut self) {
        self.proc.kill9();
        let _ = std::fs::remove_file(&self.a);
        let _ = std::fs::remove_file(&self.b);
    }
}
