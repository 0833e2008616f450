//! A test HTTP function for `[[sink]] kind = "http"`: records every `POST` (headers, body
//! decoded from gzip) and answers each as a script says, on loopback.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Posted {
    /// Its number, from 0.
    pub n: usize,
    /// When it came.
    pub at: Instant,
    /// Headers, names lowercased.
    pub headers: BTreeMap<String, String>,
    /// The body, gunzipped when `Content-Encoding: gzip`.
    pub body: Vec<u8>,
    /// The status it was answered with.
    pub status: u16,
}

impl Posted {
    /// The body as a JSON batch.
    pub fn batch(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The events' ids.
    pub fn ids(&self) -> Vec<u64> {
        self.batch()["events"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["id"].as_u64()).collect())
            .unwrap_or_default()
    }

    /// A header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// How to answer request `n`: (status, extra header lines, body).
pub type Script = dyn Fn(usize) -> (u16, Vec<(String, String)>, String) + Send + Sync;

/// The server. Stops when dropped.
pub struct HttpFunction {
    /// Its port on 127.0.0.1.
    pub port: u16,
    posted: Arc<Mutex<Vec<Posted>>>,
    script: Arc<Mutex<Arc<Script>>>,
    stop: Arc<AtomicBool>,
}

impl HttpFunction {
    /// Starts answering as `script` says.
    pub fn start(
        script: impl Fn(usize) -> (u16, Vec<(String, String)>, String) + Send + Sync + 'static,
    ) -> HttpFunction {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let posted = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Mutex<Arc<Script>>> = Arc::new(Mutex::new(Arc::new(script)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s, st) = (posted.clone(), script.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (p, s, st) = (p.clone(), s.clone(), st.clone());
                        std::thread::spawn(move || serve(conn, p, s, st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        HttpFunction {
            port,
            posted,
            script,
            stop,
        }
    }

    /// The URL to configure.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/ingest", self.port)
    }

    /// Answers from now on as `script` says.
    pub fn answer(
        &self,
        script: impl Fn(usize) -> (u16, Vec<(String, String)>, String) + Send + Sync + 'static,
    ) {
        *self.script.lock().unwrap() = Arc::new(script);
    }

    /// What was posted so far.
    pub fn posted(&self) -> Vec<Posted> {
        self.posted.lock().unwrap().clone()
    }

    /// Waits until `pred` holds on what was posted.
    pub fn wait_for(&self, within: Duration, pred: impl Fn(&[Posted]) -> bool) -> bool {
        let until = Instant::now() + within;
        loop {
            if pred(&self.posted.lock().unwrap()) {
                return true;
            }
            if Instant::now() > until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for HttpFunction {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    conn: TcpStream,
    posted: Arc<Mutex<Vec<Posted>>>,
    script: Arc<Mutex<Arc<Script>>>,
    stop: Arc<AtomicBool>,
) {
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    while !stop.load(Ordering::Relaxed) {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(_) => return,
        }
        if line.trim().is_empty() {
            continue;
        }
        r.get_mut()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        if headers.get("content-encoding").map(String::as_str) == Some("gzip") {
            body = tidepool::forward::compress::decompress_gzip(&body).unwrap_or_default();
        }
        let (status, extra, reply) = {
            let mut p = posted.lock().unwrap();
            let n = p.len();
            let s = script.lock().unwrap().clone();
            let (status, extra, reply) = s(n);
            p.push(Posted {
                n,
                at: Instant::now(),
                headers,
                body,
                status,
            });
            (status, extra, reply)
        };
        let mut head = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n",
            reply.len()
        );
        for (k, v) in extra {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        if w.write_all(head.as_bytes()).is_err() || w.write_all(reply.as_bytes()).is_err() {
            return;
        }
        r.get_mut()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
    }
}
