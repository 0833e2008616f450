//! Raw HTTP/1.1 against the admin endpoint, headers and all, for the tests of its guards.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One reply: status code (0 when the connection closed without one), and the body.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// e.g. 200, 403; 0 when closed without a status line.
    pub code: u16,
    /// Everything after the head.
    pub body: String,
}

/// Reads until the server closes (or `within` passes: then `None`).
pub fn read_reply(s: &mut TcpStream, within: Duration) -> Option<Reply> {
    s.set_read_timeout(Some(within)).ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(_) => return None,
        }
    }
    let text = String::from_utf8_lossy(&out).to_string();
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Some(Reply { code, body })
}

/// Sends `METHOD path` with `headers` (plus `Host`, `Content-Length`, `Connection: close`)
/// and `body`; the reply (panics if none comes within 10 s).
pub fn send(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to admin");
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    s.write_all(req.as_bytes()).expect("send to admin");
    read_reply(&mut s, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no reply to {method} {path} within 10 s"))
}

/// `POST path` with a JSON body `{}` and `headers`.
pub fn post_json(port: u16, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut h = vec![("Content-Type", "application/json")];
    h.extend_from_slice(headers);
    send(port, "POST", path, &h, "{}")
}
