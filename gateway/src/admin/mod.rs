//! The admin endpoint: `GET /metrics`, `/healthz`, `/status` over plain HTTP/1.1.
//!
//! Deliberately tiny (no HTTP framework): one request per connection, GET only.

pub mod metrics;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::shutdown::Shutdown;
use metrics::Metrics;

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
        info!(listen = %a, "admin endpoint: /metrics /healthz /status");
    }
    loop {
        let (mut sock, _) = tokio::select! {
            r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
            _ = shutdown.wait() => return,
        };
        let source = source.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    let k = sock.read(&mut buf[n..]).await?;
                    if k == 0 {
                        break;
                    }
                    n += k;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let req = String::from_utf8_lossy(&buf[..n]);
            let mut parts = req.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            debug!(method, path, "admin request");
            let (path, query) = path.split_once('?').unwrap_or((path, ""));
            let (code, ctype, body) = if path.starts_with("/dlq") {
                dlq(method, path, query, &source).await
            } else {
                respond(method, path, &source)
            };
            let head = format!(
                "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

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
            match rx.await {
                Ok(Ok(m)) => ("200 OK", "text/plain", m + "\n"),
                Ok(Err(e)) => ("500 Internal Server Error", "text/plain", e + "\n"),
                Err(_) => (
                    "503 Service Unavailable",
                    "text/plain",
                    "shutting down\n".into(),
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
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    request(addr, "GET", path).await
}

/// `METHOD http://addr/path` (no body) with a timeout: (status code, body).
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
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
