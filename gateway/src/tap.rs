//! `tidepool tap`: a live stream of what goes into the rule stage and what comes out.
//!
//! The rule stage, on the store's thread, builds one [`Record`] per input while someone taps
//! ([`Tap::active`]: a reader is connected; otherwise nothing is built, no cost) and hands it
//! over after the commit that stored its outputs, with their ids. The hand-over is a bounded
//! broadcast: it never waits. A reader that falls behind loses the oldest records, and is
//! told how many (`{"lost": N}` in its stream, `tidepool_tap_lost_total`); events are never
//! held back for it.
//!
//! A record (one JSON object, one line of `/tap`):
//! ```json
//! {"at": 1733120000123, "input": {"topic": …, "source": …, "ts": …, "payload": …},
//!  "rules": [{"rule": "10-threshold", "verdict": "changed", "diff": ["+payload.alert: true"],
//!             "us": 41}, …],
//!  "outputs": [{"id": 1042, "topic": …, "payload": …}], "publishes": [{"rule", "topic", "payload"}],
//!  "error": {"rule": …, "error": …}}
//! ```
//! `verdict` is `kept`, `changed` (with `diff`), `dropped`, `fanned_out` (with `count`) or
//! `failed` (with `error`); an output's `id` is `null` when the buffer refused it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::broadcast;

/// Records a slow reader may fall behind by before it loses the oldest.
pub const CAPACITY: usize = 1024;

/// One input through the rule stage, as JSON.
pub type Record = Arc<Value>;

/// The hub between the rule stage and the readers of `/tap`.
#[derive(Debug)]
pub struct Tap {
    tx: broadcast::Sender<Record>,
    /// Records sent to readers.
    pub sent: AtomicU64,
    /// Records readers lost by falling behind.
    pub lost: AtomicU64,
    /// Readers connected (an atomic, so the rule stage's check per input takes no lock).
    readers: Arc<AtomicUsize>,
}

/// A reader of the tap; counted while it lives.
pub struct Reader {
    /// Its records.
    pub rx: broadcast::Receiver<Record>,
    count: Arc<AtomicUsize>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Relaxed);
    }
}

impl Default for Tap {
    fn default() -> Self {
        Tap {
            tx: broadcast::channel(CAPACITY).0,
            sent: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            readers: Arc::default(),
        }
    }
}

impl Tap {
    /// Whether anyone taps (the rule stage records only then).
    pub fn active(&self) -> bool {
        self.readers.load(Relaxed) > 0
    }

    /// Hands a record to every reader; never waits. Counted whether or not a reader is
    /// still there to take it (records are only built while one is).
    pub fn send(&self, r: Value) {
        self.sent.fetch_add(1, Relaxed);
        let _ = self.tx.send(Arc::new(r));
    }

    /// Readers connected now.
    pub fn readers(&self) -> usize {
        self.readers.load(Relaxed)
    }

    /// A new reader.
    pub fn subscribe(&self) -> Reader {
        self.readers.fetch_add(1, Relaxed);
        Reader {
            rx: self.tx.subscribe(),
            count: self.readers.clone(),
        }
    }
}

/// What a reader asked to see (`/tap?rule=…&topic=…&source=…&errors=1&limit=N`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Filter {
    /// Only inputs this rule ran on.
    pub rule: Option<String>,
    /// Only inputs whose topic matches this MQTT filter.
    pub topic: Option<String>,
    /// Only inputs whose source starts with this (`mqtt`, `serial:gps`).
    pub source: Option<String>,
    /// Only inputs a rule failed on.
    pub errors_only: bool,
    /// Stop after this many records.
    pub limit: Option<u64>,
}

impl Filter {
    /// From a query string; unknown keys are refused, naming the key.
    pub fn parse(query: &str) -> Result<Filter, String> {
        let mut f = Filter::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "rule" => f.rule = Some(v),
                "topic" => {
                    if !crate::broker::router::valid_filter(&v) {
                        return Err(format!("`{v}` is not an MQTT topic filter"));
                    }
                    f.topic = Some(v)
                }
                "source" => f.source = Some(v),
                "errors" => f.errors_only = v == "1" || v == "true",
                "limit" => {
                    f.limit = Some(
                        v.parse()
                            .map_err(|_| format!("limit `{v}` is not a number"))?,
                    )
                }
                other => return Err(format!("unknown parameter `{other}`")),
            }
        }
        Ok(f)
    }

    /// The query string for it.
    pub fn query(&self) -> String {
        let mut q = Vec::new();
        if let Some(r) = &self.rule {
            q.push(format!("rule={}", percent_encode(r)));
        }
        if let Some(t) = &self.topic {
            q.push(format!("topic={}", percent_encode(t)));
        }
        if let Some(s) = &self.source {
            q.push(format!("source={}", percent_encode(s)));
        }
        if self.errors_only {
            q.push("errors=1".into());
        }
        if let Some(n) = self.limit {
            q.push(format!("limit={n}"));
        }
        q.join("&")
    }

    /// Whether `r` is to be shown.
    pub fn wants(&self, r: &Value) -> bool {
        let input = &r["input"];
        if let Some(t) = &self.topic {
            if !crate::broker::router::matches(t, input["topic"].as_str().unwrap_or("")) {
                return false;
            }
        }
        if let Some(s) = &self.source {
            if !input["source"]
                .as_str()
                .unwrap_or("")
                .starts_with(s.as_str())
            {
                return false;
            }
        }
        let steps = r["rules"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if let Some(rule) = &self.rule {
            if !steps.iter().any(|s| s["rule"] == rule.as_str()) {
                return false;
            }
        }
        if self.errors_only && r["error"].is_null() {
            return false;
        }
        true
    }
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One record for people: the input, each rule's verdict, the outputs and publishes.
pub fn render(r: &Value) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    if let Some(n) = r["lost"].as_u64() {
        return format!("… {n} tap records lost (this reader fell behind; no event was)\n");
    }
    let input = &r["input"];
    let _ = writeln!(
        o,
        "{} {} {} {}{}",
        tidepool_rules::engine::iso8601(r["at"].as_i64().unwrap_or(0)),
        input["source"].as_str().unwrap_or("?"),
        input["topic"].as_str().unwrap_or("?"),
        input["payload"],
        r["trace"]
            .as_str()
            .map(|t| format!("  trace {t}"))
            .unwrap_or_default()
    );
    for s in r["rules"].as_array().into_iter().flatten() {
        let verdict = s["verdict"].as_str().unwrap_or("?");
        let detail = match verdict {
            "changed" => s["diff"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join("  ")
                })
                .unwrap_or_default(),
            "fanned_out" => match s["count"].as_u64() {
                Some(0) => "into none".to_string(),
                n => format!("into {}", n.unwrap_or(0)),
            },
            "failed" => s["error"].as_str().unwrap_or("").to_string(),
            _ => String::new(),
        };
        let line = format!(
            "  {:<24} {:<10} {:>6} µs  {detail}",
            s["rule"].as_str().unwrap_or("?"),
            verdict,
            s["us"].as_u64().unwrap_or(0)
        );
        let _ = writeln!(o, "{}", line.trim_end());
    }
    for p in r["publishes"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "  publish {} {} (by {})",
            p["topic"].as_str().unwrap_or("?"),
            p["payload"],
            p["rule"].as_str().unwrap_or("?")
        );
    }
    for e in r["outputs"].as_array().into_iter().flatten() {
        let id = match e["id"].as_u64() {
            Some(id) => format!("id {id}"),
            None => "not stored".into(),
        };
        let _ = writeln!(
            o,
            "  → {id} {} {}",
            e["topic"].as_str().unwrap_or("?"),
            e["payload"]
        );
    }
    if r["outputs"].as_array().is_some_and(|a| a.is_empty()) && r["error"].is_null() {
        let _ = writeln!(o, "  → nothing stored");
    }
    if let Some(e) = r["error"].as_object() {
        let _ = writeln!(
            o,
            "  ✗ dead-lettered: {} failed: {}",
            e["rule"].as_str().unwrap_or("?"),
            e["error"].as_str().unwrap_or("")
        );
    }
    o
}

/// `tidepool tap`: connects to the running daemon's `/tap` and prints what comes, each record
/// as people read it or (`json`) as its JSON line, until `limit` records or the daemon stops.
pub async fn run(cfg: &crate::config::Config, filter: &Filter, json: bool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write as _;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let addr = cfg.admin.addr().context(
        "tap reads the running daemon through its admin endpoint, and [admin] listen is off",
    )?;
    let mut sock = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| {
            format!("cannot reach the daemon's admin endpoint at {addr} (is `tidepool run` up?)")
        })?;
    let auth = cfg
        .admin
        .client_token()
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let q = filter.query();
    let path = if q.is_empty() {
        "/tap".to_string()
    } else {
        format!("/tap?{q}")
    };
    sock.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut r = tokio::io::BufReader::new(sock);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    // The headers.
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 || line.trim().is_empty() {
            break;
        }
    }
    if code != 200 {
        let mut body = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut r, &mut body).await;
        anyhow::bail!("the admin endpoint answered {code}: {}", body.trim());
    }
    let mut out = std::io::stdout().lock();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            break;
        }
        if line.trim().is_empty() {
            continue; // the daemon's keep-alive
        }
        let text = if json {
            line.clone()
        } else {
            match serde_json::from_str::<Value>(&line) {
                Ok(v) => render(&v),
                Err(_) => continue,
            }
        };
        // A closed pipe (`| head`) ends the tap quietly.
        if out
            .write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec() -> Value {
        json!({
            "at": 0,
            "input": {"topic": "sensors/1/t", "source": "mqtt", "payload": {"t": 30}},
            "rules": [{"rule": "10-alert", "verdict": "changed", "diff": ["+payload.alert: true"], "us": 3}],
            "outputs": [{"id": 7, "topic": "sensors/1/t", "payload": {"t": 30, "alert": true}}],
            "publishes": [],
            "error": null,
        })
    }

    #[test]
    fn filters_parse_round_trip_and_select() {
        let f = Filter::parse("rule=10-alert&topic=sensors%2F%2B%2Ft&errors=1&limit=5").unwrap();
        assert_eq!(f.rule.as_deref(), Some("10-alert"));
        assert_eq!(f.topic.as_deref(), Some("sensors/+/t"));
        assert!(f.errors_only);
        assert_eq!(f.limit, Some(5));
        assert_eq!(Filter::parse(&f.query()).unwrap(), f);
        assert!(Filter::parse("nope=1").unwrap_err().contains("nope"));
        assert!(Filter::parse("topic=a/#/b").is_err());
        let r = rec();
        assert!(Filter::default().wants(&r));
        assert!(!f.wants(&r), "no error in it");
        let f = Filter::parse("rule=10-alert&source=mq&topic=sensors/+/t").unwrap();
        assert_eq!(
            f.topic.as_deref(),
            Some("sensors/+/t"),
            "a raw + is the wildcard"
        );
        assert!(f.wants(&r));
        assert!(!Filter::parse("rule=20-other").unwrap().wants(&r));
        assert!(!Filter::parse("source=serial").unwrap().wants(&r));
        assert!(!Filter::parse("topic=alerts/%23").unwrap().wants(&r));
    }

    #[test]
    fn a_record_reads_as_input_verdicts_outputs() {
        let text = render(&rec());
        assert!(text.contains("mqtt sensors/1/t {\"t\":30}"), "{text}");
        assert!(
            text.contains("10-alert") && text.contains("changed"),
            "{text}"
        );
        assert!(text.contains("+payload.alert: true"), "{text}");
        assert!(text.contains("→ id 7 sensors/1/t"), "{text}");
        assert!(render(&json!({"lost": 12})).contains("12 tap records lost"));
        let mut traced = rec();
        traced["trace"] = json!("00abcdef01234567");
        traced["rules"]
            .as_array_mut()
            .unwrap()
            .push(json!({"rule": "30-keep", "verdict": "kept", "us": 1}));
        let text = render(&traced);
        assert!(text
            .lines()
            .next()
            .unwrap()
            .ends_with("{\"t\":30}  trace 00abcdef01234567"));
        assert!(text.contains("30-keep"), "{text}");
        assert!(
            text.lines().all(|l| l == l.trim_end()),
            "no trailing blanks: {text:?}"
        );
    }

    #[test]
    fn a_reader_that_falls_behind_loses_records_not_the_sender() {
        let tap = Tap::default();
        assert!(!tap.active(), "nobody taps");
        let mut reader = tap.subscribe();
        assert!(tap.active());
        let rx = &mut reader.rx;
        for n in 0..(CAPACITY as u64 + 10) {
            tap.send(json!({ "n": n }));
        }
        match rx.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(n)) => assert_eq!(n, 10),
            other => panic!("{other:?}"),
        }
        assert_eq!(rx.try_recv().unwrap()["n"], 10);
        drop(reader);
        assert!(!tap.active(), "the reader went");
    }
}
