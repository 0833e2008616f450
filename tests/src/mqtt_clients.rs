//! Harness for the embedded broker's interop tests: the Mosquitto command-line clients, a raw
//! MQTT client on a `TcpStream` (for the packets real clients refuse to send, and for the
//! bytes of a CONNACK), and the paho-mqtt and MQTT.js scripts in `tests/clients/`.
//!
//! Every client process is a [`Proc`], killed by PID when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{root, which, Proc};

/// A message as a Mosquitto subscriber printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// Topic.
    pub topic: String,
    /// QoS it was delivered at.
    pub qos: u8,
    /// The retain flag it was delivered with.
    pub retain: bool,
    /// Payload (UTF-8; the tests send text).
    pub payload: String,
}

/// The format given to `mosquitto_sub -F`: one tab-separated line a message, marked so it
/// stands out among the `-d` lines.
const FORMAT: &str = r"MSG\t%r\t%q\t%t\t%p";

fn mosquitto_bin(name: &str) -> PathBuf {
    which(name).unwrap_or_else(|| {
        panic!("{name} is not installed: run scripts/test (it installs mosquitto-clients)")
    })
}

/// `mosquitto_sub` in the background, its output (with `-d`) in a file.
pub struct MosqSub {
    /// The process.
    pub proc: Proc,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl MosqSub {
    /// Starts `mosquitto_sub -h 127.0.0.1 -p PORT -d ARGS` and waits (5 s at most) until its
    /// SUBACK arrived. `args` carries the version, the topics, the client id.
    pub fn start(port: u16, args: &[&str]) -> MosqSub {
        let s = Self::spawn(port, args);
        s.wait_line("received SUBACK", Duration::from_secs(5))
            .unwrap_or_else(|| {
                panic!(
                    "mosquitto_sub {args:?} got no SUBACK; it printed:\n{}",
                    s.output()
                )
            });
        s
    }

    /// Starts it without waiting.
    pub fn spawn(port: u16, args: &[&str]) -> MosqSub {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let file = std::fs::File::create(&out).unwrap();
        // stdbuf: mosquitto_sub flushes after a message, not after its debug lines (SUBACK).
        let child = Command::new("stdbuf")
            .arg("-oL")
            .arg(mosquitto_bin("mosquitto_sub"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-d",
                "-F",
                FORMAT,
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start mosquitto_sub");
        MosqSub {
            proc: Proc {
                child: Some(child),
                name: format!("mosquitto_sub {args:?}"),
            },
            out,
            _dir: dir,
        }
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits until a line contains `needle`; returns that line.
    pub fn wait_line(&self, needle: &str, within: Duration) -> Option<String> {
        let until = Instant::now() + within;
        loop {
            if let Some(l) = self.output().lines().find(|l| l.contains(needle)) {
                return Some(l.to_string());
            }
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The messages received so far, in order.
    pub fn messages(&self) -> Vec<Msg> {
        self.output()
            .lines()
            .filter_map(|l| {
                let mut f = l.strip_prefix("MSG\t")?.splitn(4, '\t');
                Some(Msg {
                    retain: f.next()? == "1",
                    qos: f.next()?.parse().ok()?,
                    topic: f.next()?.to_string(),
                    payload: f.next().unwrap_or("").to_string(),
                })
            })
            .collect()
    }

    /// Waits until at least `n` messages arrived (or `within` passed); returns them all.
    pub fn wait_count(&self, n: usize, within: Duration) -> Vec<Msg> {
        let until = Instant::now() + within;
        loop {
            let m = self.messages();
            if m.len() >= n || Instant::now() > until {
                return m;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until it exits by itself (`-C`, `-W`, `-E`); its exit code (None: still running
    /// after `within`, then killed).
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let until = Instant::now() + within;
        loop {
            let c = self.proc.child.as_mut()?;
            if let Ok(Some(st)) = c.try_wait() {
                self.proc.child = None;
                return st.code();
            }
            if Instant::now() > until {
                self.proc.kill9();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `cmd` to its end, killing it after `within`; panics if it had to be killed. Its output
/// is read at the end, so it must fit a pipe's buffer (these clients print a few lines).
pub fn run_within(mut cmd: Command, within: Duration) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    let pid = child.id();
    let mut proc = Proc {
        child: Some(child),
        name: what.clone(),
    };
    let until = Instant::now() + within;
    while proc.running() {
        if Instant::now() > until {
            proc.kill9();
            panic!("{what} (pid {pid}) still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    proc.child.take().unwrap().wait_with_output().unwrap()
}

/// `mosquitto_pub -h 127.0.0.1 -p PORT ARGS`, at most 10 s.
pub fn mosquitto_pub(port: u16, args: &[&str]) -> Output {
    let mut c = Command::new(mosquitto_bin("mosquitto_pub"));
    c.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args);
    run_within(c, Duration::from_secs(10))
}

/// Same, and asserts that it succeeded.
pub fn mosquitto_pub_ok(port: u16, args: &[&str]) {
    let out = mosquitto_pub(port, args);
    assert!(
        out.status.success(),
        "mosquitto_pub {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What goes into a hand-written CONNECT.
#[derive(Debug, Clone)]
pub struct RawConnect<'a> {
    /// Protocol level: 4 (3.1.1) or 5.
    pub level: u8,
    /// Client id.
    pub client_id: &'a str,
    /// Keep-alive in seconds (0: none).
    pub keep_alive: u16,
    /// Clean session (3.1.1) / clean start (5).
    pub clean: bool,
    /// MQTT 5 Session Expiry Interval.
    pub session_expiry: Option<u32>,
    /// A QoS 0 will: (topic, payload).
    pub will: Option<(&'a str, &'a str)>,
}

impl RawConnect<'_> {
    /// The packet's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut vh = Vec::new();
        put_str(&mut vh, "MQTT");
        vh.push(self.level);
        let mut flags = 0u8;
        if self.clean {
            flags |= 0x02;
        }
        if self.will.is_some() {
            flags |= 0x04;
        }
        vh.push(flags);
        vh.extend_from_slice(&self.keep_alive.to_be_bytes());
        if self.level == 5 {
            let mut props = Vec::new();
            if let Some(e) = self.session_expiry {
                props.push(0x11);
                props.extend_from_slice(&e.to_be_bytes());
            }
            put_varint(&mut vh, props.len());
            vh.extend_from_slice(&props);
        }
        put_str(&mut vh, self.client_id);
        if let Some((topic, payload)) = self.will {
            if self.level == 5 {
                vh.push(0); // no will properties
            }
            put_str(&mut vh, topic);
            put_str(&mut vh, payload);
        }
        frame(0x10, &vh)
    }
}

/// `PINGREQ`.
pub const PINGREQ: [u8; 2] = [0xC0, 0x00];
/// `PINGRESP`.
pub const PINGRESP: [u8; 2] = [0xD0, 0x00];
/// `DISCONNECT` (3.1.1; in MQTT 5 the same two bytes mean reason 0, normal).
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// A SUBSCRIBE of one filter at `qos`, for protocol `level`.
pub fn subscribe_packet(level: u8, pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if level == 5 {
        body.push(0); // no properties
    }
    put_str(&mut body, filter);
    body.push(qos);
    frame(0x82, &body)
}

/// A PUBACK (MQTT 5: reason 0 and no properties may be left out).
pub fn puback(pkid: u16) -> Vec<u8> {
    let [hi, lo] = pkid.to_be_bytes();
    vec![0x40, 0x02, hi, lo]
}

/// A PUBLISH as received on a raw connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPublish {
    /// DUP flag.
    pub dup: bool,
    /// QoS.
    pub qos: u8,
    /// Topic (after no alias: the broker sends none).
    pub topic: String,
    /// Packet id (0 at QoS 0).
    pub pkid: u16,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Parses a whole PUBLISH packet (fixed header included) of protocol `level`; None if it is
/// not one.
pub fn parse_publish(level: u8, p: &[u8]) -> Option<RawPublish> {
    if p.first()? >> 4 != 3 {
        return None;
    }
    let (dup, qos) = (p[0] & 0x08 != 0, (p[0] >> 1) & 0x03);
    let mut i = 1;
    while p.get(i)? & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let tl = usize::from(u16::from_be_bytes([*p.get(i)?, *p.get(i + 1)?]));
    let topic = String::from_utf8(p.get(i + 2..i + 2 + tl)?.to_vec()).ok()?;
    i += 2 + tl;
    let mut pkid = 0;
    if qos > 0 {
        pkid = u16::from_be_bytes([*p.get(i)?, *p.get(i + 1)?]);
        i += 2;
    }
    if level == 5 {
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let b = *p.get(i)?;
            i += 1;
            len |= usize::from(b & 0x7F) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        i += len;
    }
    Some(RawPublish {
        dup,
        qos,
        topic,
        pkid,
        payload: p.get(i..)?.to_vec(),
    })
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u16).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn put_varint(b: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        b.push(byte);
        if n == 0 {
            return;
        }
    }
}

fn frame(header: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![header];
    put_varint(&mut p, body.len());
    p.extend_from_slice(body);
    p
}

/// A hand-driven MQTT connection.
pub struct Raw {
    /// The socket.
    pub stream: TcpStream,
}

/// What reading one packet gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Read1 {
    /// A whole packet, fixed header included.
    Packet(Vec<u8>),
    /// The server closed the connection.
    Closed,
    /// Nothing within the time given.
    Nothing,
}

impl Raw {
    /// Connects to `port`, sends `connect`, returns the connection and the first packet back
    /// (the CONNACK, whole).
    pub fn connect(port: u16, connect: &RawConnect) -> (Raw, Vec<u8>) {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut r = Raw { stream };
        r.send(&connect.encode());
        match r.read(Duration::from_secs(5)) {
            Read1::Packet(p) => (r, p),
            other => panic!("no CONNACK for {connect:?}: {other:?}"),
        }
    }

    /// Writes bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads one packet, waiting at most `within` for it to start.
    pub fn read(&mut self, within: Duration) -> Read1 {
        self.stream.set_read_timeout(Some(within)).unwrap();
        let mut first = [0u8; 1];
        match self.stream.read(&mut first) {
            Ok(0) => return Read1::Closed,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Read1::Nothing
            }
            Err(_) => return Read1::Closed,
        }
        self.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut packet = vec![first[0]];
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let mut b = [0u8; 1];
            if self.stream.read_exact(&mut b).is_err() {
                return Read1::Closed;
            }
            packet.push(b[0]);
            len |= ((b[0] & 0x7F) as usize) << shift;
            shift += 7;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let start = packet.len();
        packet.resize(start + len, 0);
        if self.stream.read_exact(&mut packet[start..]).is_err() {
            return Read1::Closed;
        }
        Read1::Packet(packet)
    }
}

/// The folder of the client scripts (`tests/clients`).
pub fn clients_dir() -> PathBuf {
    root().join("tests").join("clients")
}

/// Runs a client script (`program` `script` `args`, in `tests/clients`), at most 20 s; fails
/// the test, naming scripts/test, when the program or its MQTT library is missing; returns
/// the JSON summary it printed.
pub fn run_script(program: &str, script: &str, args: &[&str]) -> serde_json::Value {
    let dir = clients_dir();
    let bin = which(program).unwrap_or_else(|| {
        panic!("{program} is not installed: the broker interop tests need it (see scripts/test)")
    });
    let mut c = Command::new(bin);
    c.current_dir(&dir).arg(Path::new(script)).args(args);
    let out = run_within(c, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() != Some(3),
        "{stderr}\n(run scripts/test: it installs paho-mqtt and tests/clients/node_modules)"
    );
    assert!(
        out.status.success(),
        "{program} {script} {args:?} failed ({}): {stderr}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("{script} printed no JSON summary ({e}):\n{stdout}\nstderr:\n{stderr}")
    })
}

/// Waits until `f` gives `want` (or `within` passes); returns the last value.
pub fn wait_value<T: PartialEq + Clone>(within: Duration, want: T, f: impl Fn() -> T) -> T {
    let until = Instant::now() + within;
    loop {
        let v = f();
        if v == want || Instant::now() > until {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
