//! The simulator over a serial line: `lines` (JSON per line) or `cobs` (tidepool-proto frames),
//! to a given tty (`--serial PATH`) or a pseudo-terminal it creates (`--pty`), optionally
//! reliable (`--ack`: a window of unacknowledged frames, resent until the gateway acks them;
//! with `--serial PATH`, a line that fails is opened again and the whole window resent).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Generator, SimConfig, SimStats};

/// Fault kinds `--faults` can inject, each at a ratio per good frame.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Random bytes then a delimiter (one bad frame).
    pub garbage: f64,
    /// A good frame cut short, then a delimiter (one bad frame).
    pub truncated: f64,
    /// A frame longer than the gateway's max_frame (one oversize frame).
    pub oversize: f64,
    /// Well-framed but invalid content: bad JSON, or a COBS frame of junk (one bad frame).
    pub invalid: f64,
    /// Close the line and open it again (no frame lost).
    pub disconnect: f64,
    /// 50 frames back to back, ignoring --rate.
    pub burst: f64,
    /// Size of an oversize frame.
    pub oversize_bytes: usize,
}

impl Faults {
    /// Parses `garbage=0.05,truncated=0.02,...`; a kind alone means 0.01.
    pub fn parse(s: &str) -> Result<Faults, String> {
        let mut f = Faults {
            oversize_bytes: 70_000,
            ..Default::default()
        };
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, "0.01"));
            let v: f64 = v
                .parse()
                .map_err(|_| format!("--faults {part}: ratio must be a number"))?;
            match k {
                "garbage" => f.garbage = v,
                "truncated" => f.truncated = v,
                "oversize" => f.oversize = v,
                "invalid" => f.invalid = v,
                "disconnect" => f.disconnect = v,
                "burst" => f.burst = v,
                "all" => {
                    f.garbage = v;
                    f.truncated = v;
                    f.oversize = v;
                    f.invalid = v;
                    f.disconnect = v;
                    f.burst = v;
                }
                other => {
                    return Err(format!(
                        "--faults: unknown kind `{other}`; use garbage, truncated, oversize, invalid, disconnect, burst or all"
                    ))
                }
            }
        }
        Ok(f)
    }
}

/// Faults injected, by kind.
#[derive(Debug, Default)]
pub struct FaultCounts {
    /// Bad frames sent (garbage, truncated, invalid).
    pub bad: std::sync::atomic::AtomicU64,
    /// Oversize frames sent.
    pub oversize: std::sync::atomic::AtomicU64,
    /// Disconnects.
    pub disconnects: std::sync::atomic::AtomicU64,
    /// Bursts.
    pub bursts: std::sync::atomic::AtomicU64,
}

/// Frames sent and not yet acknowledged: seq → (bytes, last sent).
type Window = Mutex<BTreeMap<u64, (Vec<u8>, Instant)>>;

/// Serial framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One JSON object per line.
    Lines,
    /// postcard frames, COBS, 0x00-delimited.
    Cobs,
}

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn make_raw(fd: libc::c_int, baud: Option<u32>) -> std::io::Result<()> {
    // SAFETY: termios is plain data; fd is an open terminal for the duration of the calls.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        cvt(libc::tcgetattr(fd, &mut t))?;
        libc::cfmakeraw(&mut t);
        if let Some(b) = baud {
            let speed = match b {
                9600 => libc::B9600,
                19200 => libc::B19200,
                38400 => libc::B38400,
                57600 => libc::B57600,
                230400 => libc::B230400,
                460800 => libc::B460800,
                921600 => libc::B921600,
                1000000 => libc::B1000000,
                _ => libc::B115200,
            };
            libc::cfsetspeed(&mut t, speed);
        }
        cvt(libc::tcsetattr(fd, libc::TCSANOW, &t))?;
    }
    Ok(())
}

/// Opens a tty in raw mode at `baud`.
pub fn open_tty(path: &str, baud: u32) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_noctty()
        .open(path)?;
    make_raw(f.as_raw_fd(), Some(baud))?;
    Ok(f)
}

trait NoCtty {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}

impl NoCtty for std::fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOCTTY)
    }
}

/// Creates a pseudo-terminal pair: (master, path of the slave to point the gateway at).
pub fn open_pty() -> std::io::Result<(File, String)> {
    // SAFETY: standard posix_openpt sequence; the fd is owned by the returned File.
    unsafe {
        let fd = cvt(libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY))?;
        let master = File::from_raw_fd(fd);
        cvt(libc::grantpt(fd))?;
        cvt(libc::unlockpt(fd))?;
        let mut name = [0 as libc::c_char; 128];
        cvt(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()))?;
        let path = std::ffi::CStr::from_ptr(name.as_ptr())
            .to_string_lossy()
            .to_string();
        // The slave starts in cooked mode with echo; make it raw so bytes pass untouched.
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags_noctty()
            .open(&path)?;
        make_raw(slave.as_raw_fd(), None)?;
        make_raw(fd, None)?;
        drop(slave);
        Ok((master, path))
    }
}

/// Encodes one generated event for the wire.
pub fn frame(framing: Framing, sensor: u32, topic: &str, v: &serde_json::Value) -> Vec<u8> {
    match framing {
        Framing::Lines => {
            let mut obj = v.clone();
            obj["topic"] = topic.into();
            let mut s = obj.to_string();
            s.push('\n');
            s.into_bytes()
        }
        Framing::Cobs => {
            use tidepool_proto::{Body, Frame, Value};
            let device = format!("sensor-{sensor}");
            let kind = topic.rsplit('/').next().unwrap_or("");
            let kinds = ["celsius", "rh", "open", "count", "n"];
            let kv: Vec<(&str, Value)> = kinds
                .iter()
                .filter_map(|k| {
                    let x = &v[*k];
                    let val = if let Some(b) = x.as_bool() {
                        Value::Bool(b)
                    } else if let Some(i) = x.as_i64() {
                        Value::Int(i)
                    } else {
                        Value::Float(x.as_f64()?)
                    };
                    Some((*k, val))
                })
                .chain(std::iter::once(("kind", Value::Text(kind))))
                .collect();
            let f = Frame {
                ts: v["ts"].as_u64(),
                ..Frame::new(
                    &device,
                    v["n"].as_u64().unwrap_or(0) as u32,
                    Body::KeyValues(&kv),
                )
            };
            postcard::to_stdvec_cobs(&f).expect("frame encodes")
        }
    }
}

/// Reads acks from the port and removes them from `window`, until `stop` or `gone` (this
/// port was replaced by a reconnect).
fn read_acks(
    mut port: File,
    framing: Framing,
    window: Arc<Window>,
    stats: Arc<SimStats>,
    stop: Arc<AtomicBool>,
    gone: Arc<AtomicBool>,
) {
    let mut buf = [0u8; 1024];
    let mut acc = Vec::new();
    while !stop.load(Relaxed) && !gone.load(Relaxed) {
        let n = match port.read(&mut buf) {
            Ok(0) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Ok(n) => n,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        for &b in &buf[..n] {
            let delim = if framing == Framing::Cobs { 0 } else { b'\n' };
            if b != delim {
                acc.push(b);
                continue;
            }
            let seq = match framing {
                Framing::Lines => serde_json::from_slice::<serde_json::Value>(&acc)
                    .ok()
                    .and_then(|v| v["ack"].as_u64()),
                Framing::Cobs => {
                    let mut f = std::mem::take(&mut acc);
                    tidepool_proto::decode_cobs::<tidepool_proto::Ack>(&mut f)
                        .ok()
                        .map(|a| u64::from(a.seq))
                }
            };
            acc.clear();
            if let Some(seq) = seq {
                if window.lock().unwrap().remove(&seq).is_some() {
                    stats.acked.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

/// One fault's bytes (delimiter included).
fn fault_bytes(
    rng: &mut fastrand::Rng,
    framing: Framing,
    kind: &str,
    good: &[u8],
    oversize: usize,
) -> Vec<u8> {
    let delim = if framing == Framing::Cobs { 0u8 } else { b'\n' };
    let mut out = match (kind, framing) {
        ("garbage", Framing::Lines) => {
            // Starts with a byte that is never UTF-8: certainly a bad frame.
            let mut v = vec![0xff];
            v.extend(
                (0..rng.usize(1..40))
                    .map(|_| rng.u8(1..=255))
                    .filter(|b| *b != b'\n'),
            );
            v
        }
        ("garbage", Framing::Cobs) => {
            // A COBS frame of random bytes whose first byte is no known version.
            let mut raw = vec![0x7f];
            raw.extend((0..rng.usize(1..40)).map(|_| rng.u8(..)));
            cobs::encode_vec(&raw)
        }
        ("truncated", _) => good[..(good.len() - 1) / 2].to_vec(),
        ("invalid", Framing::Lines) => b"{\"celsius\": 21.5,,}".to_vec(),
        ("invalid", Framing::Cobs) => cobs::encode_vec(&[
            1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ]),
        ("oversize", Framing::Lines) => {
            format!("{{\"pad\":\"{}\"}}", "x".repeat(oversize)).into_bytes()
        }
        ("oversize", Framing::Cobs) => vec![0x55; oversize],
        _ => Vec::new(),
    };
    out.push(delim);
    out
}

/// Sends `cfg.count` events over `port` (blocking; run it on its own thread).
pub fn run(
    cfg: &SimConfig,
    port: File,
    framing: Framing,
    ack: bool,
    stats: Arc<SimStats>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    run_with_faults(
        cfg,
        port,
        None,
        framing,
        ack,
        &Faults::default(),
        &FaultCounts::default(),
        stats,
        stop,
    )
}

/// Like [`run`], injecting `faults`; `reopen` is the path to reopen on a disconnect fault.
#[allow(clippy::too_many_arguments)]
pub fn run_with_faults(
    cfg: &SimConfig,
    port: File,
    reopen: Option<(&str, u32)>,
    framing: Framing,
    ack: bool,
    faults: &Faults,
    counts: &FaultCounts,
    stats: Arc<SimStats>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let mut rng = fastrand::Rng::with_seed(cfg.seed ^ 0xfa17);
    let mut burst_left = 0u32;
    let mut generator = Generator::new(cfg.seed, cfg.sensors, 0);
    let window: Arc<Window> = Arc::default();
    let mut reader_gone = Arc::new(AtomicBool::new(false));
    let spawn_reader = |port: &File, gone: &Arc<AtomicBool>| -> std::io::Result<()> {
        if ack {
            let (rd, w, s, st, g) = (
                port.try_clone()?,
                window.clone(),
                stats.clone(),
                stop.clone(),
                gone.clone(),
            );
            std::thread::spawn(move || read_acks(rd, framing, w, s, st, g));
        }
        Ok(())
    };
    spawn_reader(&port, &reader_gone)?;
    let mut port = port;
    // A reliable device whose line went away (unplugged) opens it again and resends its window.
    let relink = |port: &mut File, reader_gone: &mut Arc<AtomicBool>| -> std::io::Result<bool> {
        let Some((path, baud)) = reopen.filter(|_| ack) else {
            return Ok(false);
        };
        reader_gone.store(true, Relaxed);
        while !stop.load(Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            if let Ok(p) = open_tty(path, baud) {
                *port = p;
                *reader_gone = Arc::new(AtomicBool::new(false));
                spawn_reader(port, reader_gone)?;
                stats.reconnects.fetch_add(1, Relaxed);
                resend_stale(port, &window, Duration::ZERO, &stats);
                return Ok(true);
            }
        }
        Ok(false)
    };
    let started = Instant::now();
    let count = cfg.count.unwrap_or(u64::MAX);
    let resend_after = Duration::from_millis(1000);
    let mut n = 0;
    while n < count && !stop.load(Relaxed) {
        if burst_left == 0 && rng.f64() < faults.burst {
            burst_left = 50;
            counts.bursts.fetch_add(1, Relaxed);
        }
        if burst_left > 0 {
            burst_left -= 1;
        } else if cfg.rate > 0.0 {
            let due = started + Duration::from_secs_f64(n as f64 / cfg.rate);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        if ack {
            // A small window: wait for acks (resending stale frames) when it is full.
            loop {
                if !resend_stale(&mut port, &window, resend_after, &stats) {
                    relink(&mut port, &mut reader_gone)?;
                }
                if window.lock().unwrap().len() < 64 || stop.load(Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let (sensor, topic, mut v) = generator.next(n, now_ms());
        if ack && framing == Framing::Lines {
            // Acks carry only the seq: make it unique on the line, as the cobs frames' is.
            v["seq"] = n.into();
            v["device"] = format!("sensor-{sensor}").into();
        }
        let bytes = frame(framing, sensor, &topic, &v);
        for (kind, ratio) in [
            ("garbage", faults.garbage),
            ("truncated", faults.truncated),
            ("invalid", faults.invalid),
            ("oversize", faults.oversize),
        ] {
            if ratio > 0.0 && rng.f64() < ratio {
                let fb = fault_bytes(&mut rng, framing, kind, &bytes, faults.oversize_bytes);
                if port.write_all(&fb).is_ok() {
                    if kind == "oversize" {
                        counts.oversize.fetch_add(1, Relaxed);
                    } else {
                        counts.bad.fetch_add(1, Relaxed);
                    }
                }
            }
        }
        if let Some((path, baud)) = reopen {
            if faults.disconnect > 0.0 && rng.f64() < faults.disconnect {
                let _ = port.flush();
                std::thread::sleep(Duration::from_millis(50));
                reader_gone.store(true, Relaxed);
                drop(port);
                std::thread::sleep(Duration::from_millis(200));
                port = open_tty(path, baud)?;
                reader_gone = Arc::new(AtomicBool::new(false));
                spawn_reader(&port, &reader_gone)?;
                counts.disconnects.fetch_add(1, Relaxed);
            }
        }
        if ack {
            window
                .lock()
                .unwrap()
                .insert(n, (bytes.clone(), Instant::now()));
        }
        if port.write_all(&bytes).is_err() && !relink(&mut port, &mut reader_gone)? {
            stats.reconnects.fetch_add(1, Relaxed);
            std::thread::sleep(Duration::from_millis(100));
            if !ack {
                continue; // not reliable: that frame is gone
            }
        }
        stats.sent.fetch_add(1, Relaxed);
        n += 1;
    }
    if ack {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !window.lock().unwrap().is_empty() && Instant::now() < deadline && !stop.load(Relaxed)
        {
            if !resend_stale(&mut port, &window, resend_after, &stats) {
                relink(&mut port, &mut reader_gone)?;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    } else {
        let _ = port.flush();
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Relaxed);
    Ok(())
}

/// Resends what waited longer than `after` for its ack; false when the port failed.
fn resend_stale(port: &mut File, window: &Window, after: Duration, stats: &SimStats) -> bool {
    let stale: Vec<(u64, Vec<u8>)> = window
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, (_, at))| at.elapsed() > after)
        .map(|(k, (b, _))| (*k, b.clone()))
        .collect();
    for (seq, bytes) in stale {
        if port.write_all(&bytes).is_err() {
            return false;
        }
        stats.resent.fetch_add(1, Relaxed);
        if let Some(e) = window.lock().unwrap().get_mut(&seq) {
            e.1 = Instant::now();
        }
    }
    true
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
