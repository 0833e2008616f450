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

/// What `/status` reports beyond the metrics.
#[derive(Clone)]
pub struct StatusSource {
    /// `[gateway] id`.
    pub gateway: String,
    /// The counters.
    pub metrics: Arc<Metrics>,
}

impl StatusSource {
    /// The `/status` document.
    pub fn status(&self) -> serde_json::Value {
        self.metrics
            .status_json(&self.gateway, serde_json::json!([]))
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
            let path = path.split('?').next().unwrap_or("");
            debug!(method, path, "admin request");
            let (code, ctype, body) = respond(method, path, &source);
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
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
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
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "admin endpoint timed out")
        })?
}
