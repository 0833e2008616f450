//! A small HTTP/1.1 client for the HTTP sink: one `POST` at a time over a kept-alive
//! connection, plain or TLS (rustls on ring, as upstream).
//!
//! Hand-rolled rather than hyper: the sink needs a `POST` with a few headers and, back, a
//! status, `Retry-After` and a short body excerpt. hyper, hyper-util, http and httparse would
//! add a few hundred KiB to a Pi binary that is close to its size budget; this needs only
//! tokio and tokio-rustls, both already built for rumqttc.
//!
//! - **Request**: `POST <path> HTTP/1.1` with `Host`, `Content-Length`, `Connection:
//!   keep-alive`, `User-Agent: tidepool/<version>` and the caller's headers (content type,
//!   encoding, idempotency key, API keys). No `Expect: 100-continue`; a `100 Continue` a
//!   server sends anyway is skipped.
//! - **Reuse**: the connection stays open while the server keeps it alive. A kept-alive
//!   connection the server has meanwhile closed (the write fails, or it ends before any byte
//!   of a response) is replaced once and the request sent again: safe because every batch
//!   carries an `Idempotency-Key`.
//! - **Bounds**: the whole exchange (connect, TLS handshake, write, read) within the
//!   client's timeout; a response head of at most 16 KiB and 100 header lines; a body read
//!   to its end (so the connection can be reused) but at most 1 MiB, of which the first
//!   1 KiB is kept as an excerpt for the dead-letter queue and `status`.
//! - **Not done**: redirects are not followed (a 3xx is a refusal, see [`classify`]); no
//!   proxies, no compression of responses, no pipelining.

use std::fmt;
use std::io;
use std::net::Ipv6Addr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Most bytes of a response head (status line and headers, or a chunked body's trailers).
const MAX_HEAD: usize = 16 * 1024;
/// Most header lines in a response head.
const MAX_HEADERS: usize = 100;
/// Most interim (1xx) responses skipped before the final one.
const MAX_INTERIM: usize = 8;
/// Body bytes kept as the excerpt.
const EXCERPT: usize = 1024;
/// Most body bytes read; past this the rest is left unread and the connection dropped.
const MAX_BODY: u64 = 1024 * 1024;
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Header values shown as they are in logs and `status`; every other value is a possible
/// secret (an API key, a bearer token) and redacted.
const SHOWN_HEADERS: [&str; 5] = [
    "content-type",
    "content-encoding",
    "idempotency-key",
    "user-agent",
    "accept",
];

/// Headers the client writes itself; a caller's copy would contradict them.
const OWN_HEADERS: [&str; 5] = [
    "host",
    "content-length",
    "connection",
    "transfer-encoding",
    "expect",
];

/// Where the sink posts: an `http://` or `https://` URL, parsed once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    tls: bool,
    host: String,
    port: u16,
    path: String,
}

impl HttpUrl {
    /// Parses `http[s]://host[:port][/path][?query]`; the host a name, an IPv4 address or an
    /// `[IPv6]` address, the port 80 or 443 by default, the path `/` by default. Credentials
    /// in the URL (`user:password@`) are refused: a URL is logged, headers are redacted.
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        let scheme_end = url.find("://").ok_or_else(|| {
            format!("`{url}` must start with http:// or https://, e.g. \"https://ingest.example.com/batches\"")
        })?;
        let tls = match url[..scheme_end].to_ascii_lowercase().as_str() {
            "https" => true,
            "http" => false,
            other => {
                return Err(format!(
                    "`{url}`: scheme `{other}` is not http or https, e.g. \"https://ingest.example.com/batches\""
                ))
            }
        };
        let rest = &url[scheme_end + 3..];
        // A fragment is never sent.
        let rest = rest.split('#').next().unwrap_or_default();
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.contains('@') {
            return Err("the url holds credentials (`user:password@`, not repeated here); put an API key or an `Authorization` header in the sink's `headers` instead: a URL is logged, headers are redacted".into());
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (inside, after) = bracketed.split_once(']').ok_or_else(|| {
                format!("`{url}`: `[` without `]`; an IPv6 host is written `[::1]`")
            })?;
            inside.parse::<Ipv6Addr>().map_err(|_| {
                format!("`{url}`: `[{inside}]` is not an IPv6 address, e.g. `[fd00::1]`")
            })?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| {
                    format!("`{url}`: after `[{inside}]` comes `:port` or the path")
                })?),
            };
            (inside, port)
        } else {
            match authority.split_once(':') {
                Some((h, p)) if !p.contains(':') => (h, Some(p)),
                Some(_) => {
                    return Err(format!(
                        "`{url}`: an IPv6 host goes in brackets, e.g. \"http://[fd00::1]:8080/\""
                    ))
                }
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!(
                "`{url}` has no host, e.g. \"https://ingest.example.com/batches\""
            ));
        }
        if !host.contains(':')
            && !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            return Err(format!(
                "`{url}`: host `{host}` may hold only letters, digits, `-`, `.` and `_` (an international name in its xn-- form)"
            ));
        }
        let port = match port {
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(format!(
                        "`{url}`: port `{p}` is not a number from 1 to 65535"
                    ))
                }
            },
        };
        if let Some(bad) = path.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(format!(
                "the path or query of the url holds {bad:?}; percent-encode it (a space is %20)"
            ));
        }
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        Ok(HttpUrl {
            tls,
            host: host.to_string(),
            port,
            path,
        })
    }

    /// Whether the scheme is `https`.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The host: a name or an IP address (an IPv6 one without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, 80 or 443 unless the URL gave one.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The request target: the path with its query, `/` at least.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The `Host` header: the host (bracketed if IPv6) with the port unless it is the
    /// scheme's default.
    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == if self.tls { 443 } else { 80 } {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// The URL as logs and `status` show it: without its query, which may hold a key (some
/// functions take `?code=…`).
impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        let (path, query) = match self.path.split_once('?') {
            Some((p, _)) => (p, "?…"),
            None => (self.path.as_str(), ""),
        };
        write!(f, "{scheme}://{}{path}{query}", self.host_header())
    }
}

/// What a failed exchange was, worded for whoever configured the sink.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No TCP connection: the name does not resolve, nothing listens, or the network is down.
    #[error("cannot connect to {url}: {source} (check the host and port in the sink's url, and that the server is up)")]
    Connect {
        /// The sink's URL, as shown.
        url: String,
        /// What the system said.
        source: io::Error,
    },
    /// The TLS handshake failed (unknown CA, expired or wrong-host certificate, client
    /// certificate refused), or an `https` URL came without a TLS config.
    #[error("TLS with {url} failed: {why}")]
    Tls {
        /// The sink's URL, as shown.
        url: String,
        /// The cause and what to check.
        why: String,
    },
    /// The exchange did not finish within the sink's timeout.
    #[error("no answer from {url} within {timeout:?} (while {phase}); raise the sink's `timeout` if the server is slow but alive")]
    Timeout {
        /// The sink's URL, as shown.
        url: String,
        /// The sink's timeout.
        timeout: Duration,
        /// What was going on: connecting, sending, reading the response.
        phase: &'static str,
    },
    /// The connection failed after it was set up: reset, closed before a whole response.
    #[error("connection to {url} failed: {what}")]
    Io {
        /// The sink's URL, as shown.
        url: String,
        /// What happened.
        what: String,
    },
    /// The server's answer is not HTTP/1.x as this client reads it.
    #[error("malformed response from {url}: {what} (is this an HTTP server, and the right port?)")]
    Malformed {
        /// The sink's URL, as shown.
        url: String,
        /// What was wrong, with an excerpt.
        what: String,
    },
    /// A configured header cannot be sent as it is.
    #[error("header `{name}`: {what}")]
    Header {
        /// The header's name.
        name: String,
        /// Why, and what would be right.
        what: String,
    },
}

/// The final response to a `POST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code, 200 to 599 (interim 1xx responses are skipped).
    pub status: u16,
    /// How long the server asks to wait before retrying (`Retry-After`, at most an hour).
    pub retry_after: Option<Duration>,
    /// The start of the body (at most 1 KiB, lossy UTF-8), for the dead-letter queue and logs.
    pub excerpt: String,
}

/// What a status means for the batch that was posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the server has the batch; its events may be deleted.
    Delivered,
    /// A passing fault (408, 429, 5xx): kept and retried with backoff, after `Retry-After`.
    Retry,
    /// 401, 403: the API key or certificate is refused; kept and retried, shown in `status`.
    Credentials,
    /// 3xx: the endpoint moved (redirects are not followed: the sink's url must be fixed);
    /// kept and retried like refused credentials, shown in `status`.
    Redirect,
    /// The server will never take this batch (any other 4xx); dead-lettered.
    Reject,
}

/// What `status` means for the batch (see [`Outcome`]); anything outside 200..=599 (no
/// server sends it as a final status) is retried rather than dead-lettered.
pub fn classify(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Delivered,
        401 | 403 => Outcome::Credentials,
        408 | 429 | 500..=599 => Outcome::Retry,
        300..=399 => Outcome::Redirect,
        400..=499 => Outcome::Reject,
        _ => Outcome::Retry,
    }
}

/// The headers as logs and `status` may show them: each value `<redacted>` except those of
/// `Content-Type`, `Content-Encoding`, `Idempotency-Key`, `User-Agent` and `Accept`.
pub fn redact_headers(headers: &[(String, String)]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let shown = SHOWN_HEADERS.iter().any(|s| s.eq_ignore_ascii_case(name));
            let value = if shown {
                value.clone()
            } else {
                "<redacted>".to_string()
            };
            (name.clone(), value)
        })
        .collect()
}

/// Whether a configured header can be sent: a token for a name, no line break or control
/// character in the value, and none of the headers the client writes itself.
pub fn check_header(name: &str, value: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err("a header name is letters, digits and `-` (e.g. `X-Api-Key`)".into());
    }
    if OWN_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name)) {
        return Err("is set by the gateway itself; remove it from `headers`".into());
    }
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err("the value holds a line break or control character".into());
    }
    Ok(())
}

/// Seconds from 1970-01-01 to the civil date (proleptic Gregorian), any year from 1970.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    // Howard Hinnant's algorithm: years start in March so the leap day comes last.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) as seconds since the Unix epoch.
fn imf_fixdate(s: &str) -> Option<i64> {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (weekday, rest) = s.split_once(", ")?;
    if !DAYS.contains(&weekday) {
        return None;
    }
    let parts: Vec<&str> = rest.split(' ').collect();
    let &[day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let num = |t: &str, len: usize| -> Option<i64> {
        (t.len() == len && t.bytes().all(|b| b.is_ascii_digit())).then(|| t.parse().ok())?
    };
    let day = num(day, 2)?;
    let month = MONTHS.iter().position(|m| *m == month)? as i64 + 1;
    let year = num(year, 4)?;
    let clock: Vec<&str> = time.split(':').collect();
    let &[h, m, sec] = clock.as_slice() else {
        return None;
    };
    let (h, m, sec) = (num(h, 2)?, num(m, 2)?, num(sec, 2)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if day < 1 || day > month_days[month as usize - 1] || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
}

/// A `Retry-After` value (delta-seconds or an IMF-fixdate) as a wait from `now`: a date in
/// the past is no wait, anything over an hour an hour; `None` if it is neither form.
fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still "a long time".
        Duration::from_secs(value.parse().unwrap_or(u64::MAX))
    } else {
        let at = imf_fixdate(value)?;
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        Duration::from_secs(at.saturating_sub(now).max(0) as u64)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// The first bytes of a body as text: lossy UTF-8, without a character cut in half at the end.
fn excerpt(bytes: &[u8]) -> String {
    let whole = match std::str::from_utf8(bytes) {
        Err(e) if e.error_len().is_none() => &bytes[..e.valid_up_to()],
        _ => bytes,
    };
    String::from_utf8_lossy(whole).into_owned()
}

/// A byte string for a message: lossy, at most 80 characters.
fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end();
    match text.char_indices().nth(80) {
        Some((at, _)) => format!("`{}…`", &text[..at]),
        None => format!("`{text}`"),
    }
}

/// A byte stream the client can speak HTTP over: TCP, or TLS over TCP.
trait Stream: AsyncRead + AsyncWrite + Send + Sync + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> Stream for T {}

/// An open connection, buffered for reading (writes pass through).
type Conn = BufReader<Pin<Box<dyn Stream>>>;

/// Why one attempt failed: on a reused connection, `Stale` means the server had closed it
/// and the request may be sent again on a fresh one.
enum Failure {
    Stale(String),
    Fatal(HttpError),
}

/// How the body of a response is delimited (RFC 9112 §6.3).
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A parsed response head.
struct Head {
    status: u16,
    http10: bool,
    framing: Framing,
    close: bool,
    keep_alive: bool,
    retry_after: Option<String>,
}

/// Collects a body: the excerpt and a count, up to [`MAX_BODY`].
struct Body {
    kept: Vec<u8>,
    read: u64,
}

impl Body {
    fn take(&mut self, chunk: &[u8]) {
        let room = EXCERPT.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        self.read += chunk.len() as u64;
    }

    fn full(&self) -> bool {
        self.read >= MAX_BODY
    }
}

/// Posts to one URL, one request at a time, over a connection kept between requests.
pub struct HttpClient {
    url: HttpUrl,
    shown: String,
    tls: Option<TlsConnector>,
    timeout: Duration,
    conn: Option<Conn>,
    phase: &'static str,
}

impl HttpClient {
    /// A client for `url`; `tls` is the rustls config for an `https` URL (unused for
    /// `http`); `timeout` bounds each whole `post`. Connects on the first `post`.
    pub fn new(url: HttpUrl, tls: Option<Arc<rustls::ClientConfig>>, timeout: Duration) -> Self {
        HttpClient {
            shown: url.to_string(),
            url,
            tls: tls.map(TlsConnector::from),
            timeout,
            conn: None,
            phase: "connecting",
        }
    }

    /// The URL posted to.
    pub fn url(&self) -> &HttpUrl {
        &self.url
    }

    /// Posts `body` with `headers` (the caller's: content type and encoding, idempotency key,
    /// API keys) and returns the final response, whatever its status. Sent again once on a
    /// fresh connection if the kept one turns out closed; within the timeout in all.
    pub async fn post(
        &mut self,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<Response, HttpError> {
        for (name, value) in headers {
            check_header(name, value).map_err(|what| HttpError::Header {
                name: name.clone(),
                what,
            })?;
        }
        let request = self.request(headers, body);
        match tokio::time::timeout(self.timeout, self.exchange(&request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                Err(HttpError::Timeout {
                    url: self.shown.clone(),
                    timeout: self.timeout,
                    phase: self.phase,
                })
            }
        }
    }

    /// The request's bytes: head, then body.
    fn request(&self, headers: &[(String, String)], body: &[u8]) -> Vec<u8> {
        let mut head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: keep-alive\r\n",
            self.url.path,
            self.url.host_header(),
            body.len()
        );
        if !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("user-agent"))
        {
            head.push_str(concat!(
                "User-Agent: tidepool/",
                env!("CARGO_PKG_VERSION"),
                "\r\n"
            ));
        }
        for (name, value) in headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value.trim());
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body);
        bytes
    }

    /// One request, on the kept connection if there is one, again on a fresh one if that
    /// was stale.
    async fn exchange(&mut self, request: &[u8]) -> Result<Response, HttpError> {
        if let Some(conn) = self.conn.take() {
            match self.attempt(conn, request).await {
                Ok(response) => return Ok(response),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Stale(why)) => {
                    tracing::debug!(url = %self.shown, %why, "kept-alive connection was closed; reconnecting");
                }
            }
        }
        let conn = self.connect().await?;
        match self.attempt(conn, request).await {
            Ok(response) => Ok(response),
            Err(Failure::Fatal(e)) => Err(e),
            Err(Failure::Stale(what)) => Err(HttpError::Io {
                url: self.shown.clone(),
                what,
            }),
        }
    }

    /// A fresh connection: TCP, then TLS for `https`.
    async fn connect(&mut self) -> Result<Conn, HttpError> {
        let tls_error = |why: String| HttpError::Tls {
            url: self.shown.clone(),
            why,
        };
        let tls = match (&self.tls, self.url.tls) {
            (_, false) => None,
            (Some(connector), true) => {
                let name = ServerName::try_from(self.url.host.clone()).map_err(|e| {
                    tls_error(format!(
                        "`{}` is not a usable TLS server name: {e}",
                        self.url.host
                    ))
                })?;
                Some((connector.clone(), name))
            }
            (None, true) => {
                return Err(tls_error(
                    "an https url needs the sink's TLS settings (none were set up)".into(),
                ))
            }
        };
        self.phase = "connecting";
        let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|source| HttpError::Connect {
                url: self.shown.clone(),
                source,
            })?;
        // Requests are written whole; nothing gains from waiting to coalesce.
        let _ = tcp.set_nodelay(true);
        let Some((connector, name)) = tls else {
            return Ok(BufReader::new(Box::pin(tcp)));
        };
        self.phase = "in the TLS handshake";
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| HttpError::Tls {
                url: self.shown.clone(),
                why: explain_tls(&e),
            })?;
        Ok(BufReader::new(Box::pin(stream)))
    }

    /// Writes the request and reads the response on `conn`, keeping it if the server does.
    async fn attempt(&mut self, mut conn: Conn, request: &[u8]) -> Result<Response, Failure> {
        self.phase = "sending the request";
        let sent = async {
            conn.write_all(request).await?;
            conn.flush().await
        };
        if let Err(e) = sent.await {
            return Err(self.failed("sending the request", e));
        }
        self.phase = "waiting for the response";
        // A kept connection the server closed ends (or resets) before any byte of an answer.
        match conn.fill_buf().await {
            Ok([]) => {
                return Err(Failure::Stale(
                    "the server closed the connection without answering".into(),
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(self.failed("reading the response", e)),
        }
        self.phase = "reading the response";
        let (response, reusable) = self
            .read_response(&mut conn)
            .await
            .map_err(Failure::Fatal)?;
        if reusable {
            self.conn = Some(conn);
        }
        Ok(response)
    }

    /// A write or first read that failed: a TLS alert (with TLS 1.3 a refused client
    /// certificate is told only after the handshake) is a TLS error; anything else may be a
    /// kept connection the server closed.
    fn failed(&self, doing: &str, e: io::Error) -> Failure {
        if rustls_cause(&e).is_some() {
            Failure::Fatal(HttpError::Tls {
                url: self.shown.clone(),
                why: explain_tls(&e),
            })
        } else {
            Failure::Stale(format!("{doing} failed: {e}"))
        }
    }

    fn io(&self, what: impl fmt::Display) -> HttpError {
        HttpError::Io {
            url: self.shown.clone(),
            what: what.to_string(),
        }
    }

    fn malformed(&self, what: impl fmt::Display) -> HttpError {
        HttpError::Malformed {
            url: self.shown.clone(),
            what: what.to_string(),
        }
    }

    /// Reads the final response (skipping interim 1xx ones) and its body; `true` with it if
    /// the connection can carry the next request.
    async fn read_response(&self, conn: &mut Conn) -> Result<(Response, bool), HttpError> {
        let mut interim = 0;
        let head = loop {
            let head = self.read_head(conn).await?;
            match head.status {
                101 => return Err(self.malformed("101 Switching Protocols to a POST")),
                100..=199 if interim < MAX_INTERIM => interim += 1,
                100..=199 => return Err(self.malformed("more than 8 interim (1xx) responses")),
                _ => break head,
            }
        };
        let mut body = Body {
            kept: Vec::new(),
            read: 0,
        };
        let complete = match head.framing {
            Framing::None => true,
            Framing::Length(n) => self.read_exact_body(conn, n, &mut body).await?,
            Framing::Chunked => self.read_chunked(conn, &mut body).await?,
            Framing::UntilClose => {
                self.read_until_close(conn, &mut body).await?;
                false
            }
        };
        // A close-delimited body is never complete: the connection ended it.
        let reusable = complete && !head.close && (!head.http10 || head.keep_alive);
        let response = Response {
            status: head.status,
            retry_after: head
                .retry_after
                .as_deref()
                .and_then(|v| retry_after(v, SystemTime::now())),
            excerpt: excerpt(&body.kept),
        };
        Ok((response, reusable))
    }

    /// One line of a head, without its line end, counted against `budget`.
    async fn line(&self, conn: &mut Conn, budget: &mut usize) -> Result<Vec<u8>, HttpError> {
        let mut line = Vec::new();
        let n = (&mut *conn)
            .take(*budget as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| self.io(format!("reading the response failed: {e}")))?;
        if n > *budget {
            return Err(self.malformed(format!("a response head over {} KiB", MAX_HEAD / 1024)));
        }
        if !line.ends_with(b"\n") {
            return Err(self.io("the server closed the connection in the middle of a response"));
        }
        *budget -= n;
        line.pop();
        if line.ends_with(b"\r") {
            line.pop();
        }
        Ok(line)
    }

    /// The header lines up to the blank line, each as (lower-case name, value).
    async fn header_lines(
        &self,
        conn: &mut Conn,
        budget: &mut usize,
    ) -> Result<Vec<(String, String)>, HttpError> {
        let mut headers = Vec::new();
        loop {
            let line = self.line(conn, budget).await?;
            if line.is_empty() {
                return Ok(headers);
            }
            if headers.len() == MAX_HEADERS {
                return Err(self.malformed(format!("more than {MAX_HEADERS} header lines")));
            }
            if line[0] == b' ' || line[0] == b'\t' {
                return Err(self.malformed(format!("a folded header line {}", shown(&line))));
            }
            let text = String::from_utf8_lossy(&line);
            let Some((name, value)) = text.split_once(':') else {
                return Err(self.malformed(format!("header line {} has no `:`", shown(&line))));
            };
            if name.is_empty() || name.contains([' ', '\t']) {
                return Err(self.malformed(format!("header name in {}", shown(&line))));
            }
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
    }

    /// A status line and headers.
    async fn read_head(&self, conn: &mut Conn) -> Result<Head, HttpError> {
        let mut budget = MAX_HEAD;
        let line = self.line(conn, &mut budget).await?;
        let bad = || {
            self.malformed(format!(
                "status line {} is not `HTTP/1.1 <3-digit status> <reason>`",
                shown(&line)
            ))
        };
        let mut parts = line.splitn(3, |b| *b == b' ');
        let version = parts.next().unwrap_or_default();
        let http10 = match version {
            b"HTTP/1.1" => false,
            b"HTTP/1.0" => true,
            _ => return Err(bad()),
        };
        let code = parts.next().unwrap_or_default();
        let status = match code {
            [a @ b'1'..=b'5', b, c] if b.is_ascii_digit() && c.is_ascii_digit() => {
                u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
            }
            _ => return Err(bad()),
        };
        let headers = self.header_lines(conn, &mut budget).await?;
        let mut head = Head {
            status,
            http10,
            framing: Framing::UntilClose,
            close: false,
            keep_alive: false,
            retry_after: None,
        };
        let mut length: Option<u64> = None;
        let mut chunked = None;
        for (name, value) in headers {
            match name.as_str() {
                "content-length" => {
                    let n = value
                        .parse::<u64>()
                        .map_err(|_| self.malformed(format!("Content-Length `{value}`")))?;
                    if length.is_some_and(|l| l != n) {
                        return Err(self.malformed("two different Content-Length headers"));
                    }
                    length = Some(n);
                }
                "transfer-encoding" => {
                    let last = value.rsplit(',').next().unwrap_or_default().trim();
                    chunked = Some(last.eq_ignore_ascii_case("chunked"));
                }
                "connection" => {
                    for token in value.split(',').map(str::trim) {
                        head.close |= token.eq_ignore_ascii_case("close");
                        head.keep_alive |= token.eq_ignore_ascii_case("keep-alive");
                    }
                }
                "retry-after" => head.retry_after = Some(value),
                _ => {}
            }
        }
        head.framing = if matches!(status, 100..=199 | 204 | 304) {
            Framing::None
        } else {
            match (chunked, length) {
                (Some(true), _) => Framing::Chunked,
                (Some(false), _) => Framing::UntilClose,
                (None, Some(n)) => Framing::Length(n),
                (None, None) => Framing::UntilClose,
            }
        };
        Ok(head)
    }

    /// `n` body bytes; `false` if [`MAX_BODY`] stopped it early.
    async fn read_exact_body(
        &self,
        conn: &mut Conn,
        n: u64,
        body: &mut Body,
    ) -> Result<bool, HttpError> {
        let mut left = n;
        while left > 0 {
            if body.full() {
                return Ok(false);
            }
            let buf = conn
                .fill_buf()
                .await
                .map_err(|e| self.io(format!("reading the response body failed: {e}")))?;
            if buf.is_empty() {
                return Err(self.io(format!(
                    "the server closed the connection {left} bytes before the end of the body"
                )));
            }
            let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            body.take(&buf[..take]);
            conn.consume(take);
            left -= take as u64;
        }
        Ok(true)
    }

    /// A chunked body and its trailers; `false` if [`MAX_BODY`] stopped it early.
    async fn read_chunked(&self, conn: &mut Conn, body: &mut Body) -> Result<bool, HttpError> {
        loop {
            let mut budget = MAX_HEAD;
            let line = self.line(conn, &mut budget).await?;
            let size = line.split(|b| *b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size)
                .ok()
                .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                .ok_or_else(|| self.malformed(format!("chunk size line {}", shown(&line))))?;
            if size == 0 {
                // Trailers, if any, then the blank line; none of them matter here.
                let mut budget = MAX_HEAD;
                self.header_lines(conn, &mut budget).await?;
                return Ok(true);
            }
            if !self.read_exact_body(conn, size, body).await? {
                return Ok(false);
            }
            let mut end = [0; 2];
            conn.read_exact(&mut end)
                .await
                .map_err(|e| self.io(format!("reading the response body failed: {e}")))?;
            if &end != b"\r\n" {
                return Err(self.malformed("a chunk longer than its size"));
            }
        }
    }

    /// A body that ends when the server closes the connection (or at [`MAX_BODY`]).
    async fn read_until_close(&self, conn: &mut Conn, body: &mut Body) -> Result<(), HttpError> {
        while !body.full() {
            let buf = conn
                .fill_buf()
                .await
                .map_err(|e| self.io(format!("reading the response body failed: {e}")))?;
            if buf.is_empty() {
                break;
            }
            let n = buf.len();
            body.take(buf);
            conn.consume(n);
        }
        Ok(())
    }
}

/// The rustls error a TLS stream's I/O error carries, if it is one.
fn rustls_cause(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// A failed handshake for a user: the rustls error (unknown issuer, expired, wrong name,
/// alert from the server) and the keys to check; or a connection that was not TLS at all.
fn explain_tls(e: &io::Error) -> String {
    match rustls_cause(e) {
        Some(rustls_error) => format!(
            "{rustls_error} (check the sink's CA and client certificate settings, and that the host in its url is one its certificate names)"
        ),
        None => format!(
            "{e} during the handshake (is the server speaking TLS on this port?)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    /// A request as the test server read it.
    #[derive(Debug)]
    struct Seen {
        head: String,
        body: Vec<u8>,
    }

    /// What the test server does after an answer.
    #[derive(Clone, Copy)]
    enum After {
        /// Waits for the next request on the same connection.
        Keep,
        /// Closes the connection (an idle timeout, or the end of a close-delimited body).
        Close,
    }

    /// Reads one request (head, then a `Content-Length` body); `None` once the client is gone.
    async fn read_request<S: AsyncRead + Unpin>(conn: &mut BufReader<S>) -> Option<Seen> {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if conn.read_line(&mut line).await.ok()? == 0 {
                return None;
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map_or(0, |v| v.parse().unwrap());
        let mut body = vec![0; len];
        conn.read_exact(&mut body).await.ok()?;
        Some(Seen { head, body })
    }

    /// Answers each request it reads with the next of `answers`; returns the connections it
    /// accepted and the requests it read once every answer is given.
    async fn serve(
        answers: Vec<(Vec<u8>, After)>,
        tls: Option<TlsAcceptor>,
    ) -> (HttpUrl, tokio::task::JoinHandle<(usize, Vec<Seen>)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = HttpUrl::parse(&format!("{scheme}://127.0.0.1:{port}/hook?x=1")).unwrap();
        let task = tokio::spawn(async move {
            let mut answers = answers.into_iter();
            let (mut accepted, mut seen) = (0, Vec::new());
            'accept: loop {
                let (tcp, _) = listener.accept().await.unwrap();
                accepted += 1;
                let stream: Pin<Box<dyn Stream>> = match &tls {
                    Some(acceptor) => Box::pin(acceptor.accept(tcp).await.unwrap()),
                    None => Box::pin(tcp),
                };
                let mut conn = BufReader::new(stream);
                while let Some(request) = read_request(&mut conn).await {
                    seen.push(request);
                    let Some((answer, after)) = answers.next() else {
                        break 'accept;
                    };
                    // The client may hang up on a long body; that is its right.
                    let _ = conn.write_all(&answer).await;
                    let _ = conn.flush().await;
                    if answers.len() == 0 {
                        break 'accept;
                    }
                    if let After::Close = after {
                        let _ = conn.shutdown().await;
                        break;
                    }
                }
            }
            (accepted, seen)
        });
        (url, task)
    }

    fn ok(body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    /// Posts twice to a server that gives `first` (then does `after`) and a plain 200
    /// `next`: the first response, and how many connections the two posts took (1 when the
    /// first left the connection reusable, its body read to its exact end).
    async fn then_next(first: Vec<u8>, after: After) -> (Response, usize) {
        let (url, server) = serve(vec![(first, after), (ok("next"), After::Keep)], None).await;
        let mut c = client(url);
        let response = c.post(&key("a"), b"1").await.unwrap();
        assert_eq!(c.post(&key("b"), b"2").await.unwrap().excerpt, "next");
        (response, server.await.unwrap().0)
    }

    fn client(url: HttpUrl) -> HttpClient {
        HttpClient::new(url, None, Duration::from_secs(2))
    }

    fn key(k: &str) -> Vec<(String, String)> {
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("Idempotency-Key".into(), k.into()),
            ("X-Api-Key".into(), "s3cret".into()),
        ]
    }

    #[test]
    fn urls_parse_with_defaults_and_refusals_say_what_would_be_right() {
        let ok = |u: &str| HttpUrl::parse(u).unwrap();
        let u = ok("https://ingest.example.com/v1/batches?code=abc");
        assert_eq!(
            (u.is_tls(), u.host(), u.port(), u.path()),
            (true, "ingest.example.com", 443, "/v1/batches?code=abc")
        );
        assert_eq!(u.to_string(), "https://ingest.example.com/v1/batches?…");
        let u = ok("http://10.0.0.7:8080");
        assert_eq!(
            (u.is_tls(), u.host(), u.port(), u.path()),
            (false, "10.0.0.7", 8080, "/")
        );
        assert_eq!(u.host_header(), "10.0.0.7:8080");
        let u = ok("HTTP://[fd00::1]:9000?q#frag");
        assert_eq!((u.host(), u.port(), u.path()), ("fd00::1", 9000, "/?q"));
        assert_eq!(u.to_string(), "http://[fd00::1]:9000/?…");
        let u = ok("https://[::1]/x");
        assert_eq!(
            (u.host(), u.port(), u.host_header()),
            ("::1", 443, "[::1]".into())
        );
        assert_eq!(ok("http://h.local:80/a").host_header(), "h.local");

        let cases = [
            ("https://user:pw@ingest.example.com/", "holds credentials"),
            (
                "ftp://files.example.com/",
                "scheme `ftp` is not http or https",
            ),
            (
                "ingest.example.com/batches",
                "must start with http:// or https://",
            ),
            ("http://:8080/", "has no host"),
            ("http:///path", "has no host"),
            ("http://h:0/", "port `0` is not a number from 1 to 65535"),
            ("http://h:99999/", "port `99999`"),
            ("http://h:/", "port ``"),
            ("http://fd00::1/", "an IPv6 host goes in brackets"),
            ("http://[fd00::1/", "`[` without `]`"),
            ("http://[nope]/", "is not an IPv6 address"),
            ("http://[::1]x/", "comes `:port` or the path"),
            ("http://bad host/", "may hold only letters"),
            ("http://h/a b", "percent-encode it"),
        ];
        for (url, want) in cases {
            let e = HttpUrl::parse(url).expect_err(url);
            assert!(e.contains(want), "{url}: {e}\nwants: {want}");
        }
        assert!(!HttpUrl::parse("https://u:pw@h/")
            .unwrap_err()
            .contains("pw"));
    }

    #[tokio::test]
    async fn posts_its_headers_and_body_and_reads_a_content_length_answer() {
        let (url, server) = serve(vec![(ok("stored"), After::Keep)], None).await;
        let port = url.port();
        let response = client(url).post(&key("k1"), b"hello").await.unwrap();
        assert_eq!(
            response,
            Response {
                status: 200,
                retry_after: None,
                excerpt: "stored".into()
            }
        );
        let (_, seen) = server.await.unwrap();
        let head = &seen[0].head;
        for line in [
            "POST /hook?x=1 HTTP/1.1\r\n".to_string(),
            format!("Host: 127.0.0.1:{port}\r\n"),
            "Content-Length: 5\r\n".into(),
            "Connection: keep-alive\r\n".into(),
            concat!("User-Agent: tidepool/", env!("CARGO_PKG_VERSION"), "\r\n").into(),
            "Content-Type: application/json\r\n".into(),
            "Idempotency-Key: k1\r\n".into(),
            "X-Api-Key: s3cret\r\n".into(),
        ] {
            assert!(head.contains(&line), "{head:?} lacks {line:?}");
        }
        assert!(head.starts_with("POST "), "{head}");
        assert_eq!(seen[0].body, b"hello");
    }

    #[tokio::test]
    async fn a_kept_alive_connection_carries_the_next_post() {
        let answers = vec![(ok("one"), After::Keep), (ok("two"), After::Keep)];
        let (url, server) = serve(answers, None).await;
        let mut c = client(url);
        assert_eq!(c.post(&key("a"), b"1").await.unwrap().excerpt, "one");
        assert_eq!(c.post(&key("b"), b"2").await.unwrap().excerpt, "two");
        let (accepted, seen) = server.await.unwrap();
        assert_eq!((accepted, seen.len()), (1, 2));
    }

    #[tokio::test]
    async fn a_chunked_body_with_extensions_and_trailers_is_read_to_its_exact_end() {
        let chunked = b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;name=value\r\nhello\r\n6\r\n world\r\n0;last\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n";
        let (r, connections) = then_next(chunked.to_vec(), After::Keep).await;
        assert_eq!((r.status, r.excerpt.as_str()), (502, "hello world"));
        // The trailers were consumed: the next answer parsed on the same connection.
        assert_eq!(connections, 1);
    }

    #[tokio::test]
    async fn a_close_delimited_body_ends_with_the_connection() {
        let answer = b"HTTP/1.1 400 Bad Request\r\n\r\nno such field";
        let (r, connections) = then_next(answer.to_vec(), After::Close).await;
        assert_eq!((r.status, r.excerpt.as_str()), (400, "no such field"));
        assert_eq!(connections, 2);
    }

    #[tokio::test]
    async fn an_idle_connection_the_server_closed_is_replaced_and_the_post_sent_again() {
        let answers = vec![(ok("one"), After::Close), (ok("two"), After::Keep)];
        let (url, server) = serve(answers, None).await;
        let mut c = client(url);
        c.post(&key("a"), b"1").await.unwrap();
        // Let the server's FIN arrive, as after an idle timeout.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(c.post(&key("b"), b"2").await.unwrap().excerpt, "two");
        let (accepted, seen) = server.await.unwrap();
        assert_eq!((accepted, seen.len()), (2, 2));
        assert!(seen[1].head.contains("Idempotency-Key: b\r\n"));
    }

    #[tokio::test]
    async fn a_fresh_connection_closed_without_an_answer_is_an_error_not_a_loop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let server = tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let first = count.fetch_add(1, Ordering::SeqCst) == 0;
                let mut conn = BufReader::new(tcp);
                read_request(&mut conn).await;
                if first {
                    conn.write_all(&ok("one")).await.unwrap();
                }
            }
        });
        let url = HttpUrl::parse(&format!("http://127.0.0.1:{port}/")).unwrap();
        let mut c = client(url);
        c.post(&key("a"), b"1").await.unwrap();
        let e = c.post(&key("b"), b"2").await.unwrap_err();
        assert!(matches!(e, HttpError::Io { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("closed the connection without answering"),
            "{e}"
        );
        // The stale connection, then one fresh one: no more.
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        server.abort();
    }

    #[tokio::test]
    async fn connection_close_and_http_1_0_without_keep_alive_drop_the_connection() {
        let cases: [(&[u8], usize); 4] = [
            (
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                2,
            ),
            (
                b"HTTP/1.1 200 OK\r\nconnection: Upgrade, Close\r\nContent-Length: 0\r\n\r\n",
                2,
            ),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", 2),
            (
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
                1,
            ),
        ];
        for (answer, connections) in cases {
            let (r, used) = then_next(answer.to_vec(), After::Keep).await;
            let shown = String::from_utf8_lossy(answer);
            assert_eq!((r.status, used), (200, connections), "{shown}");
        }
    }

    #[tokio::test]
    async fn interim_100_continue_answers_are_skipped() {
        let answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n\
            HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok";
        let (r, connections) = then_next(answer.to_vec(), After::Keep).await;
        assert_eq!((r.status, r.excerpt.as_str(), connections), (201, "ok", 1));
    }

    #[tokio::test]
    async fn a_server_that_never_answers_hits_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = BufReader::new(tcp);
            read_request(&mut conn).await;
            // Half an answer, then silence.
            conn.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let url = HttpUrl::parse(&format!("http://127.0.0.1:{port}/")).unwrap();
        let mut c = HttpClient::new(url, None, Duration::from_millis(200));
        let started = std::time::Instant::now();
        let e = c.post(&key("a"), b"1").await.unwrap_err();
        assert!(
            matches!(
                e,
                HttpError::Timeout {
                    phase: "reading the response",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("within 200ms"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(c.conn.is_none(), "a timed-out connection is not reused");
        server.abort();
    }

    #[tokio::test]
    async fn answers_that_are_not_http_1_are_malformed() {
        let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                b"HTTP/1.1 abc OK\r\n\r\n".to_vec(),
                "status line `HTTP/1.1 abc OK`",
            ),
            (
                b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(),
                "status line `SSH-2.0-OpenSSH_9.6`",
            ),
            (b"HTTP/2 200\r\n\r\n".to_vec(), "status line"),
            (b"HTTP/1.1 700 Odd\r\n\r\n".to_vec(), "status line"),
            (
                format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "v".repeat(17_000)).into_bytes(),
                "over 16 KiB",
            ),
            (
                format!("HTTP/1.1 200 OK\r\n{many}\r\n").into_bytes(),
                "more than 100 header lines",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n".to_vec(),
                "Content-Length `lots`",
            ),
            (
                b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n".to_vec(),
                "has no `:`",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
                "chunk size line `zz`",
            ),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec(), "101"),
        ];
        for (answer, want) in cases {
            let (url, server) = serve(vec![(answer, After::Close)], None).await;
            let e = client(url).post(&key("a"), b"1").await.unwrap_err();
            assert!(matches!(e, HttpError::Malformed { .. }), "{e:?}");
            assert!(e.to_string().contains(want), "{e}\nwants: {want}");
            server.await.unwrap();
        }
    }

    #[test]
    fn retry_after_is_seconds_or_a_date_capped_at_an_hour() {
        // RFC 9110's example date.
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        assert_eq!(imf_fixdate(date), Some(784_111_777));
        assert_eq!(
            imf_fixdate("Thu, 29 Feb 2024 00:00:00 GMT"),
            Some(1_709_164_800)
        );
        assert_eq!(
            imf_fixdate("Fri, 31 Dec 1999 23:59:59 GMT"),
            Some(946_684_799)
        );
        let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
        let s = Duration::from_secs;
        assert_eq!(retry_after(date, at(784_111_777 - 30)), Some(s(30)));
        assert_eq!(
            retry_after(date, at(784_111_777 + 100)),
            Some(s(0)),
            "a past date"
        );
        assert_eq!(retry_after(date, at(0)), Some(s(3600)), "capped");
        assert_eq!(retry_after(" 120 ", at(0)), Some(s(120)));
        assert_eq!(retry_after("0", at(0)), Some(s(0)));
        assert_eq!(retry_after("86400", at(0)), Some(s(3600)));
        assert_eq!(retry_after("99999999999999999999999", at(0)), Some(s(3600)));
        for bad in [
            "",
            "soon",
            "-5",
            "1.5",
            "Sun, 31 Feb 1994 08:49:37 GMT",
            "Mon, 29 Feb 2100 00:00:00 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun, 6 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(retry_after(bad, at(0)), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn retry_after_comes_back_with_the_status() {
        let answer =
            b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\nContent-Length: 4\r\n\r\nslow";
        let (url, server) = serve(vec![(answer.to_vec(), After::Keep)], None).await;
        let r = client(url).post(&key("a"), b"1").await.unwrap();
        assert_eq!(
            (r.status, r.retry_after),
            (429, Some(Duration::from_secs(7)))
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn the_excerpt_is_the_first_kibibyte_and_the_rest_is_read_past() {
        // 1 + 2 × 3000 bytes: the 1 KiB cut falls inside an `é`, which is left out whole.
        let body = format!("a{}", "é".repeat(3000));
        let (r, connections) = then_next(ok(&body), After::Keep).await;
        assert_eq!(r.excerpt, format!("a{}", "é".repeat(511)));
        assert_eq!(
            connections, 1,
            "the long body was read past, the connection kept"
        );

        // Over 1 MiB: read no further, and the connection is dropped.
        let huge = "x".repeat(MAX_BODY as usize + 64 * 1024);
        let (r, connections) = then_next(ok(&huge), After::Keep).await;
        assert_eq!((r.status, r.excerpt.len(), connections), (200, EXCERPT, 2));
    }

    #[test]
    fn statuses_are_classified() {
        use Outcome::*;
        let table = [
            (200, Delivered),
            (201, Delivered),
            (204, Delivered),
            (299, Delivered),
            (301, Redirect),
            (307, Redirect),
            (308, Redirect),
            (400, Reject),
            (404, Reject),
            (413, Reject),
            (422, Reject),
            (401, Credentials),
            (403, Credentials),
            (408, Retry),
            (429, Retry),
            (500, Retry),
            (502, Retry),
            (503, Retry),
            (599, Retry),
            (100, Retry),
            (600, Retry),
        ];
        for (status, want) in table {
            assert_eq!(classify(status), want, "{status}");
        }
    }

    #[test]
    fn only_harmless_header_values_are_shown() {
        let pair = |n: &str, v: &str| (n.to_string(), v.to_string());
        let headers = vec![
            pair("content-type", "application/json"),
            pair("Content-Encoding", "zstd"),
            pair("IDEMPOTENCY-KEY", "gw-1-10"),
            pair("User-Agent", "tidepool/1"),
            pair("Accept", "*/*"),
            pair("Authorization", "Bearer abc"),
            pair("X-Api-Key", "s3cret"),
            pair("Cookie", "session=1"),
        ];
        let shown = redact_headers(&headers);
        assert_eq!(&shown[..5], &headers[..5]);
        for (name, value) in &shown[5..] {
            assert_eq!(value, "<redacted>", "{name}");
        }
        assert_eq!(shown[5].0, "Authorization");
    }

    #[tokio::test]
    async fn a_header_that_would_break_the_request_is_refused_before_connecting() {
        // Port 9 (discard) on loopback: nothing is reached, the check comes first.
        let mut c = client(HttpUrl::parse("http://127.0.0.1:9/").unwrap());
        let bad = |n: &str, v: &str| vec![(n.to_string(), v.to_string())];
        for (headers, want) in [
            (bad("X-Key", "a\r\nX-Evil: 1"), "line break"),
            (bad("Bad Name", "v"), "a header name is"),
            (bad("content-length", "3"), "set by the gateway itself"),
            (bad("Host", "elsewhere"), "set by the gateway itself"),
        ] {
            let e = c.post(&headers, b"1").await.unwrap_err();
            assert!(matches!(e, HttpError::Header { .. }), "{e:?}");
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    /// A CA, and a server certificate for 127.0.0.1 it signed, as rustls configs.
    /// The server asks for a client certificate (of the CA) if `client_auth`; the client has
    /// none, and trusts the CA only if `trust_the_ca`.
    fn tls_pair(trust_the_ca: bool, client_auth: bool) -> (TlsAcceptor, Arc<rustls::ClientConfig>) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name
            .push(DnType::CommonName, "sink test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
        let leaf = leaf.signed_by(&key, &ca, &ca_key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let server = if client_auth {
            let mut clients = rustls::RootCertStore::empty();
            clients.add(ca.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(clients),
                provider.clone(),
            )
            .build()
            .unwrap();
            server.with_client_cert_verifier(verifier)
        } else {
            server.with_no_client_auth()
        };
        let server = server
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        if trust_the_ca {
            roots.add(ca.der().clone()).unwrap();
        } else {
            let other_key = KeyPair::generate().unwrap();
            let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
            other
                .distinguished_name
                .push(DnType::CommonName, "another CA");
            roots
                .add(other.self_signed(&other_key).unwrap().der().clone())
                .unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (TlsAcceptor::from(Arc::new(server)), Arc::new(client))
    }

    #[tokio::test]
    async fn https_round_trips_with_a_server_its_ca_vouches_for() {
        let (acceptor, config) = tls_pair(true, false);
        let answers = vec![(ok("secure"), After::Keep), (ok("again"), After::Keep)];
        let (url, server) = serve(answers, Some(acceptor)).await;
        let mut c = HttpClient::new(url, Some(config), Duration::from_secs(2));
        assert_eq!(c.post(&key("a"), b"hello").await.unwrap().excerpt, "secure");
        assert_eq!(c.post(&key("b"), b"2").await.unwrap().excerpt, "again");
        let (accepted, seen) = server.await.unwrap();
        assert_eq!((accepted, seen[0].body.as_slice()), (1, &b"hello"[..]));
    }

    /// The error of a post to a TLS server whose handshake with this client fails.
    async fn tls_refused(trust_the_ca: bool, client_auth: bool) -> (HttpError, HttpUrl) {
        let (acceptor, config) = tls_pair(trust_the_ca, client_auth);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            assert!(acceptor.accept(tcp).await.is_err());
        });
        let url = HttpUrl::parse(&format!("https://127.0.0.1:{port}/")).unwrap();
        let e = HttpClient::new(url.clone(), Some(config), Duration::from_secs(2))
            .post(&key("a"), b"1")
            .await
            .unwrap_err();
        server.await.unwrap();
        assert!(matches!(e, HttpError::Tls { .. }), "{e:?}");
        (e, url)
    }

    #[tokio::test]
    async fn https_to_a_server_of_an_unknown_ca_is_a_tls_error() {
        let (e, url) = tls_refused(false, false).await;
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");
        // And an https url without TLS settings says so rather than sending plain text.
        let e = client(url).post(&key("a"), b"1").await.unwrap_err();
        assert!(
            e.to_string().contains("needs the sink's TLS settings"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_server_wanting_a_client_certificate_is_a_tls_error_even_after_the_handshake() {
        // TLS 1.3: the client's handshake is done before the server refuses it.
        let (e, _) = tls_refused(true, true).await;
        assert!(e.to_string().contains("CertificateRequired"), "{e}");
    }
}
