//! Batch compression against other implementations: a gzip batch from the gateway's encoder
//! is decoded by the Python subscriber example (examples/python/decode_batch.py, standard
//! library `gzip`, which checks the CRC-32 and size trailer), and what gzip(1) and Python
//! write is decoded by the gateway's `decompress_gzip`.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tidepool::config::Encoding;
use tidepool::event::{Event, Payload};
use tidepool::forward::compress::{self, Compression, DEFAULT_LEVEL};
use tidepool::forward::wire::BatchEncoder;
use tidepool_e2e::mqtt_clients::run_within;
use tidepool_e2e::{root, which};

#[path = "../src/sim_events.rs"]
mod sim_events;
use sim_events::sim_events;

fn python3() -> std::path::PathBuf {
    which("python3").expect("python3 is not installed: scripts/test installs it")
}

/// 500 simulator events (as a batch carries them) and one binary payload (base64 on the wire).
fn events() -> Vec<Event> {
    let mut events = sim_events(3, 1000, 500, 1_764_000_000_000);
    events.push(Event {
        id: 1500,
        ts: 1_764_000_000_500,
        source: "serial:uart0".into(),
        topic: "serial/uart0".into(),
        payload: Payload::Bytes(vec![0, 0xff, 0x1f, 0x8b, b'\n']),
        trace: Default::default(),
        properties: Vec::new(),
    });
    events
}

fn batch(events: &[Event]) -> Vec<u8> {
    let mut b = BatchEncoder::new(Encoding::Json, "pi-kitchen-01", 7);
    for e in events {
        assert!(b.push(e, usize::MAX));
    }
    b.finish()
}

/// What decode_batch.py must print for `events`: one JSON line per event, with the gateway.
fn expected_lines(events: &[Event]) -> Vec<serde_json::Value> {
    let batch: serde_json::Value = serde_json::from_slice(&batch(events)).unwrap();
    batch["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut line = serde_json::json!({"gateway": "pi-kitchen-01"});
            line.as_object_mut()
                .unwrap()
                .extend(e.as_object().unwrap().clone());
            line
        })
        .collect()
}

fn parse_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Runs `python3 ARGS` with stdin from `stdin` (a file) and its output into files (a batch's
/// lines do not fit a pipe's buffer); kills it after 20 s. Returns stdout; panics on failure.
fn python(args: &[&std::ffi::OsStr], stdin: Option<&Path>, dir: &Path) -> Vec<u8> {
    let (out, err) = (dir.join("py.out"), dir.join("py.err"));
    let mut c = Command::new(python3());
    c.args(args)
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .stdin(match stdin {
            Some(f) => Stdio::from(File::open(f).unwrap()),
            None => Stdio::null(),
        });
    let mut child = c.spawn().expect("start python3");
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "python3 {args:?} (pid {}) still running after 20 s",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert!(status.success(), "python3 {args:?}: {status}\n{stderr}");
    std::fs::read(&out).unwrap()
}

fn decode_batch_py(file: &Path, flags: &[&str], stdin: bool, dir: &Path) -> Vec<serde_json::Value> {
    let script = root().join("examples/python/decode_batch.py");
    let mut args: Vec<&std::ffi::OsStr> = vec![script.as_os_str()];
    args.extend(flags.iter().map(std::ffi::OsStr::new));
    if !stdin {
        args.push(file.as_os_str());
    }
    parse_lines(&python(&args, stdin.then_some(file), dir))
}

/// The Python example decodes a gzip batch (a file; stdin with `--gzip`, as an HTTP function
/// given `Content-Encoding: gzip` would) and a plain one to exactly the events that went in;
/// the binary payload stays base64, marked so.
#[test]
fn python_example_decodes_gzip_and_plain_batches() {
    let events = events();
    let plain = batch(&events);
    let gz = compress::compress(Compression::Gzip, DEFAULT_LEVEL, &plain);
    assert!(
        gz.len() * 5 < plain.len(),
        "{} of {}",
        gz.len(),
        plain.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let gz_file = dir.path().join("batch.json.gz");
    let plain_file = dir.path().join("batch.json");
    std::fs::write(&gz_file, &gz).unwrap();
    std::fs::write(&plain_file, &plain).unwrap();
    let want = expected_lines(&events);
    assert_eq!(want.len(), 501);
    assert_eq!(want[500]["payload_encoding"], "base64");

    let d = dir.path();
    assert_eq!(decode_batch_py(&gz_file, &[], false, d), want, "gzip file");
    assert_eq!(
        decode_batch_py(&plain_file, &[], false, d),
        want,
        "plain file"
    );
    assert_eq!(
        decode_batch_py(&gz_file, &["--gzip"], true, d),
        want,
        "gzip on stdin"
    );
    assert_eq!(
        decode_batch_py(&plain_file, &[], true, d),
        want,
        "plain on stdin"
    );
}

/// Every level gives a member Python's `gzip` accepts (it checks CRC-32 and ISIZE), and what
/// gzip(1) and Python's `gzip` write (file name, mtime, their own levels) the gateway decodes.
#[test]
fn gzip_interoperates_both_ways() {
    let plain = batch(&events());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let gz = d.join("batch.gz");
    for level in [0u8, 1, DEFAULT_LEVEL, 6, 9] {
        std::fs::write(&gz, compress::compress(Compression::Gzip, level, &plain)).unwrap();
        let inflated = python(
            &[
                "-c".as_ref(),
                "import gzip,sys; sys.stdout.buffer.write(gzip.open(sys.argv[1]).read())".as_ref(),
                gz.as_os_str(),
            ],
            None,
            d,
        );
        assert!(
            inflated == plain,
            "level {level}: Python inflated something else"
        );
    }

    let src = d.join("batch.json");
    std::fs::write(&src, &plain).unwrap();
    let gzip = which("gzip").expect("gzip(1) is part of every Debian base system");
    let mut c = Command::new(gzip);
    c.args(["-9", "-c"]).arg(&src);
    let out = run_within(c, Duration::from_secs(20));
    assert!(out.status.success());
    assert_eq!(out.stdout[3] & 0x08, 0x08, "gzip(1) names the file");
    assert!(
        compress::decompress_gzip(&out.stdout).unwrap() == plain,
        "gzip(1)"
    );

    let py_gz = python(
        &[
            "-c".as_ref(),
            "import gzip,sys; sys.stdout.buffer.write(gzip.compress(open(sys.argv[1],'rb').read(), 1))"
                .as_ref(),
            src.as_os_str(),
        ],
        None,
        d,
    );
    assert!(
        compress::decompress_gzip(&py_gz).unwrap() == plain,
        "Python gzip"
    );
}
