//! The admin endpoint: `GET /metrics`, `/healthz`, `/status`, `/dlq` and `POST /dlq/retry|drop`
//! over plain HTTP/1.1.
//!
//! Deliberately tiny (no HTTP framework): one request per connection. Every connection is
//! bounded: at most `[admin] max_connections` at once (more are answered 503 and closed), the
//! request must arrive within `io_timeout` and the reply leave within it again, and a request
//! waits for the commit loop at most `reply_timeout`. Who may read dead letters and who may
//! write is decided by [`guard::Policy`].

pub mod guard;
pub mod metrics;
pub mod wear;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::config::AdminConfig;
use crate::shutdown::Shutdown;
use guard::{Access, Facts, Policy};
use metrics::Metrics;

/// How the endpoint guards itself: access policy, connection limit, timeouts.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Who may read payloads and write.
    pub policy: Policy,
    /// Most connections served at once.
    pub max_connections: usize,
    /// Longest to receive a request, and again to send the reply.
    pub io_timeout: Duration,
    /// Longest a request waits for the commit loop.
    pub reply_timeout: Duration,
}

impl Settings {
    /// The settings of `[admin]` for an endpoint on `listen`; reads the token file (the error
    /// names the key).
    pub fn from_config(cfg: &AdminConfig, listen: SocketAddr) -> Result<Settings, String> {
        Ok(Settings {
            policy: Policy::new(listen, cfg.token()?),
            max_connections: cfg.max_connections,
            io_timeout: cfg.io_timeout.0,
            reply_timeout: cfg.reply_timeout.0,
        })
    }
}

/// What the endpoint serves from.
#[derive(Clone)]
pub struct StatusSource {
    /// `[gateway] id`.
    pub gateway: String,
    /// The counters.
    pub metrics: Arc<Metrics>,
    /// The store, for `/dlq`.
    pub db: Option<crate::store::Store>,
    /// The commit loop, for `POST /dlq/retry|drop`.
    pub control: Option<tokio::sync::mpsc::UnboundedSender<crate::store::commit::Control>>,
    /// Access policy, limits and timeouts.
    pub settings: Settings,
}

/// A dead letter as shown to people and scripts.
pub fn dead_letter_json(id: u64, d: &crate::rules::DeadLetter) -> serde_json::Value {
    use base64::Engine as _;
    let payload = match &d.event.payload {
        crate::event::Payload::Json(s) => {
            serde_json::from_str(s).unwrap_or(serde_json::Value::Null)
        }
        crate::event::Payload::Bytes(b) => {
            base64::engine::general_purpose::STANDARD.encode(b).into()
        }
    };
    serde_json::json!({
        "id": id,
        "rule": d.rule,
        "error": d.error,
        "at": d.at,
        "trace": d.event.trace,
        "event": { "ts": d.event.ts, "source": d.event.source, "topic": d.event.topic, "payload": payload },
    })
}

/// A row of a dead-letter page as JSON; a row that cannot be decoded says why.
pub fn dlq_row_json(id: u64, d: &Result<crate::rules::DeadLetter, String>) -> serde_json::Value {
    match d {
        Ok(d) => dead_letter_json(id, d),
        Err(why) => serde_json::json!({
            "id": id,
            "rule": "(unreadable row)",
            "error": why,
            "event": null,
        }),
    }
}

impl StatusSource {
    /// The `/status` document.
    pub fn status(&self) -> serde_json::Value {
        let rules = self.metrics.rules_status.lock().unwrap().clone();
        self.metrics.status_json(&self.gateway, rules)
    }
}

/// Binds the endpoint (errors name the key) and serves until shutdown.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("key `admin.listen`: cannot listen on {addr}: {e}"))
}

/// Serves requests until shutdown.
pub async fn serve(listener: TcpListener, source: StatusSource, mut shutdown: Shutdown) {
    if let Ok(a) = listener.local_addr() {
        info!(listen = %a, "admin endpoint: /metrics /healthz /status /dlq /tap");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(source.settings.max_connections));
    let mut backoff = Backoff::default();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait() => return,
        };
        let sock = match accepted {
            Ok((sock, _)) => {
                if backoff.errors > 0 {
                    info!(
                        errors = backoff.errors,
                        "admin endpoint accepts connections again"
                    );
                }
                backoff = Backoff::default();
                sock
            }
            Err(e) => {
                // EMFILE and friends: wait instead of spinning on an error that repeats.
                let wait = backoff.next();
                if backoff.errors == 1 {
                    warn!(error = %e, "admin endpoint cannot accept connections; backing off");
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = shutdown.wait() => return,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Full: say so without waiting for this client, and close.
            debug!("admin endpoint: too many connections; refusing one");
            say_and_close(
                sock,
                &reply_bytes(
                    "503 Service Unavailable",
                    "text/plain",
                    "",
                    "too many admin connections; try again\n",
                ),
            );
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            handle(sock, &source).await;
            drop(slot);
        });
    }
}

/// Delays between failed `accept`s: 10 ms doubling up to 1 s; reset by a success.
#[derive(Debug, Default)]
struct Backoff {
    errors: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        self.errors = self.errors.saturating_add(1);
        Duration::from_millis(10u64 << (self.errors - 1).min(7)).min(Duration::from_secs(1))
    }
}

/// Largest request head and body accepted.
const MAX_HEAD: usize = 8 * 1024;
const MAX_BODY: usize = 64 * 1024;

/// One parsed request.
#[derive(Debug, Default)]
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request could not be read.
#[derive(Debug)]
enum ReadError {
    /// The client went away or the socket failed: nothing to answer.
    Gone,
    /// Answer this status and close.
    Bad(&'static str, &'static str),
}

/// Reads one request: the head, then `Content-Length` bytes of body.
async fn read_request<R: tokio::io::AsyncRead + Unpin>(sock: &mut R) -> Result<Request, ReadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(ReadError::Bad(
                "431 Request Header Fields Too Large",
                "request head too large\n",
            ));
        }
        let k = sock.read(&mut chunk).await.map_err(|_| ReadError::Gone)?;
        if k == 0 {
            return Err(ReadError::Gone);
        }
        buf.extend_from_slice(&chunk[..k]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let mut req = Request {
        method: first.next().unwrap_or("").to_string(),
        target: first.next().unwrap_or("").to_string(),
        ..Request::default()
    };
    for l in lines.filter(|l| !l.is_empty()) {
        if let Some((k, v)) = l.split_once(':') {
            req.headers
                .push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    if req.header("transfer-encoding").is_some() {
        return Err(ReadError::Bad(
            "411 Length Required",
            "send the body with Content-Length\n",
        ));
    }
    let len = match req.header("content-length") {
        None => 0,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| ReadError::Bad("400 Bad Request", "bad Content-Length\n"))?,
    };
    if len > MAX_BODY {
        return Err(ReadError::Bad("413 Content Too Large", "body too large\n"));
    }
    req.body = buf[head_end..].to_vec();
    while req.body.len() < len {
        let k = sock.read(&mut chunk).await.map_err(|_| ReadError::Gone)?;
        if k == 0 {
            return Err(ReadError::Gone);
        }
        req.body.extend_from_slice(&chunk[..k]);
    }
    req.body.truncate(len);
    Ok(req)
}

/// Writes what fits in the socket's buffer without waiting, and closes: for clients that are
/// refused or out of time.
fn say_and_close(sock: TcpStream, bytes: &[u8]) {
    use std::io::Write as _;
    if let Ok(mut s) = sock.into_std() {
        let _ = s.write(bytes);
    }
}

fn reply_bytes(code: &str, ctype: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves one connection: read (bounded in time), decide, answer (bounded in time), close.
async fn handle(mut sock: TcpStream, source: &StatusSource) {
    let io = source.settings.io_timeout;
    let req = match tokio::time::timeout(io, read_request(&mut sock)).await {
        Ok(Ok(r)) => r,
        Ok(Err(ReadError::Gone)) => return,
        Ok(Err(ReadError::Bad(code, msg))) => {
            say_and_close(sock, &reply_bytes(code, "text/plain", "", msg));
            return;
        }
        Err(_) => {
            debug!("admin request not received within {io:?}; closing");
            say_and_close(
                sock,
                &reply_bytes(
                    "408 Request Timeout",
                    "text/plain",
                    "",
                    "request not received in time\n",
                ),
            );
            return;
        }
    };
    let (path, query) = req
        .target
        .split_once('?')
        .unwrap_or((req.target.as_str(), ""));
    let method = req.method.as_str();
    debug!(method, path, "admin request");
    let access = Access::of(method, path);
    let facts = Facts {
        method,
        origin: req.header("origin"),
        host: req.header("host"),
        content_type: req.header("content-type"),
        authorization: req.header("authorization"),
        body: &req.body,
    };
    let decision = source.settings.policy.decide(access, &facts);
    if decision.is_ok() && method == "GET" && path == "/tap" {
        return tap_stream(sock, query, source).await;
    }
    let out = match decision {
        Err(refused) => {
            warn!(
                method,
                path,
                origin = facts.origin.unwrap_or(""),
                status = refused.status,
                "admin request refused"
            );
            let extra = if refused.wants_token() {
                "WWW-Authenticate: Bearer\r\n"
            } else {
                ""
            };
            reply_bytes(
                refused.status,
                "text/plain",
                extra,
                &(refused.message + "\n"),
            )
        }
        Ok(()) => {
            let (code, ctype, body) = if path.starts_with("/dlq") {
                dlq(method, path, query, source).await
            } else {
                respond(method, path, source)
            };
            reply_bytes(code, ctype, "", &body)
        }
    };
    let write = async {
        sock.write_all(&out).await?;
        sock.shutdown().await
    };
    if tokio::time::timeout(io, write).await.is_err() {
        debug!("admin reply not taken within {io:?}; closing");
    }
}

/// `GET /tap`: the rule stage's records as they come, one JSON object a line, until the
/// reader goes (or its `limit`). A reader that falls behind loses records, told as
/// `{"lost": N}`; the rule stage never waits for it.
async fn tap_stream(mut sock: TcpStream, query: &str, source: &StatusSource) {
    let io = source.settings.io_timeout;
    let filter = match crate::tap::Filter::parse(query) {
        Ok(f) => f,
        Err(e) => {
            say_and_close(
                sock,
                &reply_bytes("400 Bad Request", "text/plain", "", &format!("{e}\n")),
            );
            return;
        }
    };
    let tap = &source.metrics.tap;
    let mut reader = tap.subscribe();
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n";
    if !matches!(
        tokio::time::timeout(io, sock.write_all(head.as_bytes())).await,
        Ok(Ok(()))
    ) {
        return;
    }
    if filter.limit == Some(0) {
        return;
    }
    info!(filter = %filter.query(), "tap reader connected");
    let (mut rd, mut wr) = sock.into_split();
    let mut shown = 0u64;
    let mut scratch = [0u8; 256];
    loop {
        let line = tokio::select! {
            r = reader.rx.recv() => match r {
                Ok(rec) if filter.wants(&rec) => rec.to_string(),
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tap.lost.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    serde_json::json!({ "lost": n }).to_string()
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            // The reader closed its end: stop (and stop the rule stage recording for it).
            n = rd.read(&mut scratch) => match n {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            },
            // Quiet: a blank line, so a reader that went away without a word (a laptop
            // put to sleep) is found out by the failing write, in TCP's retransmission time,
            // rather than holding a slot, and the rule stage recording, for ever.
            _ = tokio::time::sleep(TAP_KEEPALIVE) => String::new(),
        };
        // A reader that takes nothing for this long is gone; one that is only slow loses
        // records meanwhile (above), never holds anything up.
        let bytes = format!("{line}\n");
        let write = wr.write_all(bytes.as_bytes());
        if !matches!(tokio::time::timeout(TAP_STALL, write).await, Ok(Ok(()))) {
            break;
        }
        if !line.is_empty() && !line.starts_with("{\"lost\"") {
            shown += 1;
            if filter.limit.is_some_and(|l| shown >= l) {
                break;
            }
        }
    }
    let _ = wr.shutdown().await;
    info!(shown, "tap reader gone");
}

/// A quiet tap stream sends a blank line this often.
const TAP_KEEPALIVE: Duration = Duration::from_secs(30);

/// How long a tap reader may take nothing before it is dropped.
const TAP_STALL: Duration = Duration::from_secs(300);

/// `ids=1,2,3` from a query string; `None` for all.
fn parse_ids(query: &str) -> Option<Vec<u64>> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("ids="))
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
}

/// A number `key=N` from a query string.
fn parse_num(query: &str, key: &str) -> Option<u64> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

/// Rows of one `GET /dlq` page unless `limit` says otherwise, and the most it may say.
const DLQ_PAGE: u64 = 100;
const DLQ_PAGE_MAX: u64 = 1000;

async fn dlq(
    method: &str,
    path: &str,
    query: &str,
    source: &StatusSource,
) -> (&'static str, &'static str, String) {
    use crate::store::commit::Control;
    match (method, path) {
        ("GET", "/dlq") => {
            let Some(db) = source.db.clone() else {
                return ("503 Service Unavailable", "text/plain", "no store\n".into());
            };
            // One page: `?after=ID&limit=N` (default 100, at most 1000), oldest first; a
            // client pages on with `after` = the last id until a page comes back short.
            let sel = crate::store::dlq::Select {
                ids: parse_ids(query),
                below: None,
            };
            let after = parse_num(query, "after").unwrap_or(0);
            let limit = parse_num(query, "limit")
                .unwrap_or(DLQ_PAGE)
                .clamp(1, DLQ_PAGE_MAX) as usize;
            let rows = tokio::task::spawn_blocking(move || {
                crate::store::dlq::page(&*db.db()?, &sel, after, limit)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
            match rows {
                Ok(page) => {
                    let v: Vec<_> = page
                        .rows
                        .iter()
                        .map(|(id, d)| dlq_row_json(*id, d))
                        .collect();
                    (
                        "200 OK",
                        "application/json",
                        serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
                    )
                }
                Err(e) => ("500 Internal Server Error", "text/plain", e + "\n"),
            }
        }
        ("POST", "/dlq/retry") | ("POST", "/dlq/drop") => {
            let Some(ctl) = source.control.clone() else {
                return (
                    "503 Service Unavailable",
                    "text/plain",
                    "no commit loop\n".into(),
                );
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            let req = crate::store::commit::DlqRequest {
                ids: parse_ids(query),
                limit: parse_num(query, "limit"),
                page: None,
            };
            let msg = if path.ends_with("retry") {
                Control::DlqRetry(req, tx)
            } else {
                Control::DlqDrop(req, tx)
            };
            if ctl.send(msg).is_err() {
                return (
                    "503 Service Unavailable",
                    "text/plain",
                    "shutting down\n".into(),
                );
            }
            let deadline = source.settings.reply_timeout;
            match tokio::time::timeout(deadline, rx).await {
                Ok(Ok(Ok(m))) => ("200 OK", "text/plain", m + "\n"),
                Ok(Ok(Err(e))) => ("500 Internal Server Error", "text/plain", e + "\n"),
                Ok(Err(_)) => (
                    "503 Service Unavailable",
                    "text/plain",
                    "shutting down\n".into(),
                ),
                Err(_) => (
                    "503 Service Unavailable",
                    "text/plain",
                    format!(
                        "the store is busy: no answer within {deadline:?} ([admin] reply_timeout); \
                         the request stays queued and runs when the store is free (see `tidepool dlq list`)\n"
                    ),
                ),
            }
        }
        _ => (
            "404 Not Found",
            "text/plain",
            "GET /dlq (?after=ID&limit=N&ids=1,2), POST /dlq/retry, POST /dlq/drop (?ids=1,2&limit=N)\n".into(),
        ),
    }
}

fn respond(
    method: &str,
    path: &str,
    source: &StatusSource,
) -> (&'static str, &'static str, String) {
    if method != "GET" {
        return ("405 Method Not Allowed", "text/plain", "GET only\n".into());
    }
    match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            source.metrics.render(),
        ),
        "/healthz" => {
            if source.metrics.store_healthy.load(Relaxed) {
                ("200 OK", "text/plain", "ok\n".into())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "store cannot commit\n".into(),
                )
            }
        }
        "/status" => (
            "200 OK",
            "application/json",
            serde_json::to_string_pretty(&source.status()).unwrap_or_default() + "\n",
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /status\n".into(),
        ),
    }
}

/// `GET http://addr/path` with a short timeout: (status code, body). For `tidepool status`.
/// `token`: sent as `Authorization: Bearer TOKEN`.
pub async fn get(
    addr: SocketAddr,
    token: Option<&str>,
    path: &str,
) -> std::io::Result<(u16, String)> {
    request(addr, token, "GET", path).await
}

/// `METHOD http://addr/path` with a timeout: (status code, body). A `POST` carries an empty
/// JSON object (`{}`), as the endpoint wants of writes.
pub async fn request(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let body = if method == "POST" { "{}" } else { "" };
        let ctype = if body.is_empty() {
            ""
        } else {
            "Content-Type: application/json\r\n"
        };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{ctype}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out).to_string();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default();
        Ok((code, body))
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "admin endpoint timed out")
        })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    #[test]
    fn accept_backoff_grows_to_a_second_and_never_spins() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..10).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        assert!(waits.iter().all(|w| *w >= 10 && *w <= 1000));
    }

    // -- hostile input -----------------------------------------------------------------------

    /// A client that sends `bytes` in pieces of the given sizes (cycled), then closes.
    struct Pieces {
        bytes: Vec<u8>,
        at: usize,
        sizes: Vec<usize>,
        n: usize,
    }

    impl tokio::io::AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let size = self.sizes[self.n % self.sizes.len()];
            self.n += 1;
            let k = size.min(buf.remaining()).min(self.bytes.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.bytes[at..at + k]);
            self.at += k;
            Poll::Ready(Ok(()))
        }
    }

    fn read(bytes: Vec<u8>, sizes: Vec<usize>) -> Result<Request, ReadError> {
        let mut client = Pieces {
            bytes,
            at: 0,
            sizes,
            n: 0,
        };
        crate::fuzz::block_on(read_request(&mut client))
    }

    /// What the endpoint answers a request it read, up to the handlers: the access decision
    /// under a loopback policy with or without a token, or under one beyond loopback.
    fn decision(req: &Request, policy: u8) -> Result<(), guard::Refusal> {
        let (path, _) = req.target.split_once('?').unwrap_or((&req.target, ""));
        let policy = match policy {
            0 => Policy::new("127.0.0.1:9464".parse().unwrap(), None),
            1 => Policy::new(
                "127.0.0.1:9464".parse().unwrap(),
                Some("s3cret-t0ken".into()),
            ),
            _ => Policy::new("0.0.0.0:9464".parse().unwrap(), None),
        };
        let facts = Facts {
            method: &req.method,
            origin: req.header("origin"),
            host: req.header("host"),
            content_type: req.header("content-type"),
            authorization: req.header("authorization"),
            body: &req.body,
        };
        policy.decide(Access::of(&req.method, path), &facts)
    }

    /// An error status the endpoint may answer before any handler runs, as a well-formed
    /// reply.
    fn check_refusal(code: &str, msg: &str) -> Result<(), TestCaseError> {
        prop_assert!(
            ["400 ", "401 ", "403 ", "405 ", "411 ", "413 ", "415 ", "431 "]
                .iter()
                .any(|c| code.starts_with(c)),
            "status {}",
            code
        );
        prop_assert!(!msg.is_empty());
        let reply = reply_bytes(code, "text/plain", "", msg);
        let text = String::from_utf8(reply).unwrap();
        let (start, length, end) = (
            format!("HTTP/1.1 {code}\r\n"),
            format!("Content-Length: {}\r\n", msg.len()),
            format!("\r\n\r\n{msg}"),
        );
        prop_assert!(text.starts_with(&start), "{}", text);
        prop_assert!(text.contains(&length), "{}", text);
        prop_assert!(text.ends_with(&end), "{}", text);
        Ok(())
    }

    /// One header line of a hostile request.
    fn header() -> impl Strategy<Value = Vec<u8>> {
        let cl = prop_oneof![
            Just("0"),
            Just("2"),
            Just("-1"),
            Just("+2"),
            Just(" 2 "),
            Just(""),
            Just("2, 2"),
            Just("0x10"),
            Just("99999999999999999999999"),
            Just("65536"),
            Just("65537"),
            Just("1000000"),
            Just("18446744073709551615"),
        ];
        prop_oneof![
            3 => cl.prop_map(|v| format!("Content-Length: {v}").into_bytes()),
            1 => Just(b"Transfer-Encoding: chunked".to_vec()),
            1 => Just(b"content-length:5".to_vec()),
            2 => prop_oneof![
                Just("Host: localhost:9464"), Just("Host: evil.example"), Just("Host: [::1"),
                Just("Origin: http://127.0.0.1:9464"), Just("Origin: null"), Just("Origin: \u{7f}"),
                Just("Content-Type: application/json"), Just("Content-Type: ;;;"),
                Just("Authorization: Bearer s3cret-t0ken"), Just("Authorization: Bearer"),
                Just("Authorization: "), Just("no colon here"), Just(": empty name"), Just(":"),
            ]
            .prop_map(|h| h.as_bytes().to_vec()),
            1 => (1usize..20_000).prop_map(|n| [b"X-Big: ".to_vec(), vec![b'a'; n]].concat()),
            2 => proptest::collection::vec(any::<u8>(), 0..40),
        ]
    }

    /// A request line.
    fn request_line() -> impl Strategy<Value = Vec<u8>> {
        let method = prop_oneof![
            Just("GET"),
            Just("POST"),
            Just("HEAD"),
            Just("PUT"),
            Just(""),
            Just("G\0T"),
            Just("get"),
            Just("GETT"),
        ];
        let target = prop_oneof![
            Just("/metrics"),
            Just("/healthz"),
            Just("/status"),
            Just("/dlq"),
            Just("/dlq?ids=1,x,"),
            Just("/dlq?limit=99999999999999999999&after=-1"),
            Just("/dlq/retry"),
            Just("/dlq/drop?ids="),
            Just("/dlq/"),
            Just("/%00"),
            Just("*"),
            Just(""),
            Just("/?"),
            Just("/dlq?&&=&"),
        ];
        let version = prop_oneof![
            Just(" HTTP/1.1"),
            Just(" HTTP/1.0"),
            Just(""),
            Just(" HTTP/9 x y")
        ];
        (method, target, version).prop_map(|(m, t, v)| format!("{m} {t}{v}").into_bytes())
    }

    proptest! {
        #![proptest_config(crate::fuzz::cases(1000))]

        /// Random bytes from a client, arriving in random pieces: the endpoint never panics; it
        /// reads a request (only when the head ends within the limit), or answers an error
        /// status, or sees the client gone.
        #[test]
        fn fuzz_random_bytes_are_a_request_an_error_status_or_gone(
            bytes in proptest::collection::vec(any::<u8>(), 0..3000),
            sizes in proptest::collection::vec(1usize..3000, 1..4),
            policy in 0u8..3,
        ) {
            match read(bytes.clone(), sizes) {
                Ok(req) => {
                    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").expect("a head");
                    prop_assert!(end < MAX_HEAD + 2048 + 4);
                    if let Err(r) = decision(&req, policy) {
                        check_refusal(r.status, &r.message)?;
                    }
                }
                Err(ReadError::Bad(code, msg)) => check_refusal(code, msg)?,
                Err(ReadError::Gone) => {}
            }
        }

        /// Hostile requests: odd request lines; bad, huge, negative, doubled and lying
        /// Content-Lengths; Transfer-Encoding; heads over the limit; lines without a colon;
        /// bytes that are not UTF-8; cut off anywhere: never a panic; a head that never ends
        /// is 431 once over the limit; chunked is 411; a Content-Length that is not a number
        /// 400, over the body limit 413; a body shorter than it says is the client gone; else
        /// the request with exactly Content-Length bytes of body, and the access decision
        /// answers it or refuses it with a status.
        #[test]
        fn fuzz_hostile_requests(
            line in request_line(),
            headers in proptest::collection::vec(header(), 0..6),
            body in proptest::collection::vec(any::<u8>(), 0..16),
            cut in proptest::option::of(any::<prop::sample::Index>()),
            sizes in proptest::collection::vec(1usize..3000, 1..4),
            policy in 0u8..3,
        ) {
            let mut bytes = line;
            for h in &headers {
                bytes.extend_from_slice(b"\r\n");
                bytes.extend(h);
            }
            bytes.extend_from_slice(b"\r\n\r\n");
            bytes.extend(&body);
            if let Some(c) = cut {
                let n = c.index(bytes.len());
                bytes.truncate(n);
            }
            match read(bytes.clone(), sizes) {
                Ok(req) => {
                    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    prop_assert!(req.header("transfer-encoding").is_none());
                    let len = req.header("content-length").map_or(Ok(0), |v| v.parse::<usize>());
                    prop_assert_eq!(len.as_ref().ok(), Some(&req.body.len()));
                    prop_assert_eq!(&req.body[..], &bytes[head_end..head_end + req.body.len()]);
                    if let Err(r) = decision(&req, policy) {
                        check_refusal(r.status, &r.message)?;
                    }
                }
                Err(ReadError::Bad(code, msg)) => check_refusal(code, msg)?,
                Err(ReadError::Gone) => {
                    // Only a client that closed before a whole head, or before the body its
                    // Content-Length announced.
                    let head = bytes.windows(4).any(|w| w == b"\r\n\r\n");
                    let has_len = headers
                        .iter()
                        .any(|h| h.to_ascii_lowercase().starts_with(b"content-length"));
                    prop_assert!(!head || has_len, "a whole request taken for gone");
                }
            }
        }
    }

    #[test]
    fn requests_over_the_limits_get_their_status() {
        let status = |bytes: &[u8]| match read(bytes.to_vec(), vec![700]) {
            Ok(_) => "ok",
            Err(ReadError::Gone) => "gone",
            Err(ReadError::Bad(code, _)) => code,
        };
        let big = [
            b"GET / HTTP/1.1\r\nX: ".to_vec(),
            vec![b'a'; 20_000],
            b"\r\n\r\n".to_vec(),
        ]
        .concat();
        assert_eq!(status(&big), "431 Request Header Fields Too Large");
        assert_eq!(
            status(b"POST /dlq/drop HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            "400 Bad Request"
        );
        assert_eq!(
            status(b"POST /dlq/drop HTTP/1.1\r\nContent-Length: 65537\r\n\r\n"),
            "413 Content Too Large"
        );
        assert_eq!(
            status(b"POST /dlq/drop HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            "411 Length Required"
        );
        assert_eq!(
            status(b"POST /dlq/drop HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}"),
            "gone"
        );
        assert_eq!(status(b"GET /status HTTP/1.1\r\nHost: x"), "gone");
        assert_eq!(status(b"GET /status HTTP/1.1\r\n\r\n"), "ok");
    }
}
