//! An HTTP sink (`[[sink]] kind = "http"`): batches `POST`ed to a serverless function or a
//! webhook, one at a time, oldest first.
//!
//! Each batch is the same JSON (or postcard) batch the MQTT upstream gets, in one `POST` with
//! `Content-Type: application/vnd.tidepool.batch+json` (`+postcard`), `Content-Encoding: gzip`
//! when compressed, the `[[sink]] headers`, and `Idempotency-Key: GATEWAY-FIRST-LAST` from the
//! batch's first and last event ids: the same batch sent again (a retry, or after a restart,
//! which reads the same events again) carries the same key. The answer decides:
//! - **2xx**: delivered; the commit loop deletes what no other sink still owes.
//! - **408, 429, 5xx, no answer** (connect, TLS, timeout): kept and sent again after a
//!   backoff that grows per failure, and at least the server's `Retry-After`.
//! - **401, 403**: the credentials are refused: kept, retried the same way, shown in `status`.
//! - **Any other 4xx (and 3xx)**: the server will never take it: each of its events goes to
//!   the dead-letter queue (rule `sink:NAME`) with the status and the start of the body, and
//!   the sink goes on with the next batch. `tidepool dlq retry` sends them to this sink only.
//!
//! A batch waits up to `batch_max_wait` to fill. The backlog (what was stored when the sink
//! last came back, or at start) is flagged `"backlog": true` and paced by `drain_rate`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use super::http::{self, HttpClient, HttpUrl, Outcome};
use super::limits::{self, Limits, SizeGuard};
use super::{compress, meta_get, note_range, pace, read_batch, Skip};
use crate::admin::metrics::{Metrics, SinkInfo};
use crate::config::{Config, DrainRate, Encoding, SinkConfig};
use crate::shutdown::Shutdown;
use crate::store::{self, ForwardAck, ForwardMsg};

/// One HTTP sink's forwarder.
pub struct HttpSink {
    cfg: SinkConfig,
    index: usize,
    gateway: String,
    db: store::Store,
    metrics: Arc<Metrics>,
    committed: watch::Receiver<u64>,
    acks: mpsc::UnboundedSender<ForwardMsg>,
    shutdown: Shutdown,
    client: HttpClient,
    /// Ranges this sink acknowledged (or that are not its own: before its start).
    acked: BTreeMap<u64, u64>,
    /// Events handed to the dead-letter queue, not yet gone from the store.
    dead: BTreeSet<u64>,
    /// The highest id covered by a batch that is done (delivered or dead-lettered).
    cursor: u64,
    next_batch: u64,
    failures: u32,
    /// What was stored when the sink last came back: ids up to it are backlog.
    top: u64,
    /// The backlog's pacing clock.
    next_at: Instant,
    /// Since when the partial batch at the cursor has waited.
    partial_since: Option<Instant>,
}

/// A batch ready to post.
struct Ready {
    body: Vec<u8>,
    compressed: bool,
    first_id: u64,
    last_id: u64,
    upto: u64,
    count: u64,
    batch: u64,
    backlog: bool,
    events: Vec<crate::event::Event>,
}

impl HttpSink {
    /// The forwarder of `[[sink]]` `cfg`, sink number `index` among the configured ones.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        all: &Config,
        cfg: SinkConfig,
        index: usize,
        db: store::Store,
        metrics: Arc<Metrics>,
        committed: watch::Receiver<u64>,
        acks: mpsc::UnboundedSender<ForwardMsg>,
        shutdown: Shutdown,
    ) -> Result<HttpSink, String> {
        let key = |k: &str| format!("sink `{}` {k}", cfg.name);
        let url = HttpUrl::parse(&cfg.url).map_err(|e| format!("{}: {e}", key("url")))?;
        let tls = if url.is_tls() {
            // The TLS files as `[upstream]` reads them.
            let mut u = all.upstream.clone();
            u.ca_file = cfg.ca_file.clone();
            u.cert_file = cfg.cert_file.clone();
            u.key_file = cfg.key_file.clone();
            Some(super::tls::client_config(&u).map_err(|e| {
                format!(
                    "sink `{}`: {}",
                    cfg.name,
                    super::tls::error_for(
                        &e,
                        &format!("sink[{}]", index - usize::from(all.upstream.url.is_some()))
                    )
                )
            })?)
        } else {
            None
        };
        let (start, mut acked) =
            store::sinks::load(&*db.db().map_err(|e| e.to_string())?, &cfg.name)
                .map_err(|e| e.to_string())?;
        if start > 0 {
            note_range(&mut acked, 0, start - 1);
        }
        let next_batch = db
            .db()
            .map(|d| meta_get(&d, &store::sinks::next_batch_key(&cfg.name)))
            .unwrap_or(0)
            .max(1);
        let headers: Vec<(String, String)> = cfg
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        metrics.sinks.lock().unwrap().push(SinkInfo {
            name: cfg.name.clone(),
            kind: "http",
            url: url.to_string(),
            topics: cfg.topics.clone(),
            headers: http::redact_headers(&headers),
            state: "starting".into(),
            ..SinkInfo::default()
        });
        Ok(HttpSink {
            client: HttpClient::new(url, tls, cfg.timeout.0),
            cfg,
            index,
            gateway: all.gateway.id.clone(),
            db,
            metrics,
            committed,
            acks,
            shutdown,
            acked,
            dead: BTreeSet::new(),
            cursor: 0,
            next_batch,
            failures: 0,
            top: 0,
            next_at: Instant::now(),
            partial_since: None,
        })
    }

    fn info(&self, f: impl FnOnce(&mut SinkInfo)) {
        let mut sinks = self.metrics.sinks.lock().unwrap();
        if let Some(i) = sinks.iter_mut().find(|s| s.name == self.cfg.name) {
            f(i);
        }
    }

    /// Posts batches until shutdown.
    pub async fn run(mut self) {
        self.top = self.stored_top().await;
        self.info(|i| i.state = "idle".into());
        let mut held: Option<Ready> = None;
        while !self.shutdown.is_set() {
            let (ready, again) = match held.take() {
                Some(r) => (r, true),
                None => match self.next_ready().await {
                    Some(r) => (r, false),
                    None => continue,
                },
            };
            if !again && ready.backlog && self.cfg.drain_rate != DrainRate::Unlimited {
                let now = Instant::now();
                if self.next_at > now {
                    let mut sd = self.shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep_until(self.next_at) => {}
                        _ = sd.wait() => return,
                    }
                }
                let base = self.next_at.max(Instant::now() - Duration::from_secs(1));
                self.next_at = base + pace(self.cfg.drain_rate, ready.count, ready.body.len());
            }
            if let Some(wait) = self.post(&ready).await {
                held = Some(ready);
                let mut sd = self.shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = sd.wait() => return,
                }
            }
        }
    }

    /// The highest id stored now.
    async fn stored_top(&self) -> u64 {
        use redb::{ReadableDatabase, ReadableTable};
        // A store read (it may wait on a reopen): off the executor, as every forwarder read.
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let d = db.db().ok()?;
            let txn = d.begin_read().ok()?;
            let t = txn.open_table(store::EVENTS).ok()?;
            let last = t.last().ok()??;
            Some(last.0.value())
        })
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
    }

    /// Waits for, reads and encodes the next batch; `None` to look again (woken, or a read
    /// failed).
    async fn next_ready(&mut self) -> Option<Ready> {
        let mut committed = self.committed.clone();
        committed.borrow_and_update();
        let read = self.read().await;
        let (planned, events, backlog) = match read {
            Ok(Some(p)) => p,
            Ok(None) => {
                // Nothing: wait for a commit.
                self.partial_since = None;
                let mut sd = self.shutdown.clone();
                tokio::select! {
                    _ = committed.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = sd.wait() => {}
                }
                return None;
            }
            Err(e) => {
                warn!(sink = %self.cfg.name, error = %e, "sink: cannot read the store; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                return None;
            }
        };
        for (id, why) in &planned.dead {
            self.dead_letter(*id, why);
        }
        let Some(payload) = planned.payload.clone() else {
            // Only dead letters: past them.
            self.cursor = self.cursor.max(planned.upto);
            return None;
        };
        if !planned.full {
            let since = *self.partial_since.get_or_insert_with(Instant::now);
            let due = since + self.cfg.batch_max_wait.0;
            if Instant::now() < due {
                let mut sd = self.shutdown.clone();
                tokio::select! {
                    _ = committed.changed() => {}
                    _ = tokio::time::sleep_until(due) => {}
                    _ = sd.wait() => {}
                }
                // Read again: more may have come (full now), or it is due.
                return None;
            }
        }
        self.partial_since = None;
        let (body, compressed) = if self.cfg.compression != compress::Compression::None {
            let packed =
                compress::compress(self.cfg.compression, compress::DEFAULT_LEVEL, &payload);
            if packed.len() < payload.len() {
                (packed, true)
            } else {
                (payload, false)
            }
        } else {
            (payload, false)
        };
        let batch = self.next_batch;
        self.next_batch += 1;
        Some(Ready {
            body,
            compressed,
            first_id: planned.first_id,
            last_id: planned.last_id,
            upto: planned.upto,
            count: planned.count,
            batch,
            backlog,
            events,
        })
    }

    /// Reads the next batch after the cursor.
    async fn read(
        &mut self,
    ) -> Result<Option<(limits::Planned, Vec<crate::event::Event>, bool)>, store::StoreError> {
        let db = self.db.clone();
        let skip = Skip {
            dead: self.dead.clone(),
            acked: self.acked.clone(),
            filters: Some(self.cfg.topics.clone()),
            sink: Some(self.cfg.name.clone()),
        };
        let after = self.cursor;
        let max_events = self.cfg.batch_max_events;
        let max_bytes = self.cfg.batch_max_bytes.0;
        let gateway = self.gateway.clone();
        let batch = self.next_batch;
        let encoding = self.cfg.encoding;
        let top = self.top;
        let r = tokio::task::spawn_blocking(move || {
            let r = read_batch(&*db.db()?, after, u64::MAX, max_events, max_bytes, &skip)?;
            if r.events.is_empty() {
                return Ok((None, r.lowest, r.scanned));
            }
            // A batch that starts in the backlog is backlog.
            let backlog = r.events.first().is_some_and(|e| e.id <= top);
            let limits = Limits {
                encoding,
                topic_len: 0,
                max_events,
                max_bytes: max_bytes as usize,
                backlog,
            };
            let guard = SizeGuard::new(usize::MAX / 4);
            let p = limits::plan(&gateway, batch, &r.events, r.more, limits, &guard);
            // Only what the batch holds (the plan may stop before the read did).
            let events: Vec<_> = r
                .events
                .into_iter()
                .filter(|e| e.id <= p.upto && !p.dead.iter().any(|(d, _)| *d == e.id))
                .collect();
            Ok::<_, store::StoreError>((Some((p, events, backlog)), r.lowest, r.scanned))
        })
        .await
        .expect("sink reader panicked")?;
        let (p, lowest, scanned) = r;
        if p.is_none() {
            // Nothing it takes up to there: the next read starts after it.
            self.cursor = self.cursor.max(scanned);
        }
        let lowest = lowest.unwrap_or(u64::MAX);
        self.dead = self.dead.split_off(&lowest);
        self.acked.retain(|_, to| *to >= lowest);
        Ok(p)
    }

    fn dead_letter(&mut self, id: u64, reason: &str) {
        if self.dead.insert(id) {
            let _ = self.acks.send(ForwardMsg::DeadLetter {
                sink: self.index,
                id,
                reason: reason.to_string(),
            });
            self.info(|i| i.dead_lettered += 1);
        }
    }

    /// The batch's range is done (delivered or dead-lettered): the commit loop deletes it.
    fn done(&mut self, r: &Ready) {
        let from = self.cursor + 1;
        note_range(&mut self.acked, from, r.upto);
        self.cursor = self.cursor.max(r.upto);
        let _ = self.acks.send(ForwardMsg::Ack(ForwardAck {
            sink: self.index,
            from,
            up_to: r.upto,
            batch: r.batch,
        }));
    }

    /// Posts one batch; `None` when it is done, else how long to wait before sending it again.
    async fn post(&mut self, r: &Ready) -> Option<Duration> {
        let content_type = super::client::content_type(self.cfg.encoding);
        let mut headers = vec![
            ("Content-Type".to_string(), content_type.to_string()),
            (
                "Idempotency-Key".to_string(),
                idempotency_key(&self.gateway, &self.cfg.name, r.first_id, r.last_id),
            ),
            ("X-Tidepool-Gateway".to_string(), self.gateway.clone()),
            ("X-Tidepool-Batch".to_string(), r.batch.to_string()),
            ("X-Tidepool-Events".to_string(), r.count.to_string()),
            ("X-Tidepool-Backlog".to_string(), r.backlog.to_string()),
        ];
        if r.compressed {
            headers.push(("Content-Encoding".to_string(), "gzip".to_string()));
        }
        headers.extend(self.cfg.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.info(|i| i.state = "posting".into());
        let answer = self.client.post(&headers, &r.body).await;
        let backoff = |failures: u32, cfg: &SinkConfig| {
            super::backoff(
                failures,
                cfg.reconnect_min.0,
                cfg.reconnect_max.0,
                fastrand::f64(),
            )
        };
        match answer {
            Ok(resp) => match http::classify(resp.status) {
                Outcome::Delivered => {
                    if self.failures > 0 {
                        info!(sink = %self.cfg.name, status = resp.status, "sink: delivering again");
                        // Back: what is stored now is backlog, paced.
                        self.top = self.stored_top().await;
                    }
                    self.failures = 0;
                    self.done(r);
                    let (events, status) = (r.count, resp.status);
                    self.info(|i| {
                        i.events += events;
                        i.batches += 1;
                        i.up = true;
                        i.state = "delivering".into();
                        i.last_status = Some(status);
                        i.last_error.clear();
                    });
                    None
                }
                Outcome::Reject => {
                    let why = format!(
                        "HTTP {} from {}: {}",
                        resp.status,
                        self.client.url(),
                        resp.excerpt.trim()
                    );
                    warn!(sink = %self.cfg.name, batch = r.batch, first_id = r.first_id, last_id = r.last_id, status = resp.status, "sink refused a batch for good: its events go to the dead-letter queue");
                    for e in &r.events {
                        self.dead_letter(e.id, &why);
                    }
                    self.done(r);
                    let status = resp.status;
                    self.info(|i| {
                        i.up = true;
                        i.last_status = Some(status);
                        *i.failures.entry("rejected").or_default() += 1;
                        i.last_error = why;
                    });
                    None
                }
                outcome => {
                    self.failures = self.failures.saturating_add(1);
                    let wait =
                        backoff(self.failures, &self.cfg).max(resp.retry_after.unwrap_or_default());
                    let (what, state, hint) = match outcome {
                        Outcome::Credentials => (
                            "credentials",
                            "credentials refused",
                            " (check the sink's headers or certificate)",
                        ),
                        Outcome::Redirect => (
                            "redirect",
                            "redirected",
                            " (redirects are not followed: fix the sink's url)",
                        ),
                        _ => ("retry", "retrying", ""),
                    };
                    let why = format!("HTTP {}{hint}: {}", resp.status, resp.excerpt.trim());
                    if self.failures == 1 {
                        warn!(sink = %self.cfg.name, status = resp.status, retry_in_ms = wait.as_millis() as u64, "sink: batch not taken; kept and sent again");
                    }
                    let status = resp.status;
                    self.info(|i| {
                        i.up = outcome == Outcome::Retry;
                        i.state = state.into();
                        i.last_status = Some(status);
                        *i.failures.entry(what).or_default() += 1;
                        i.last_error = why;
                    });
                    Some(wait)
                }
            },
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                let wait = backoff(self.failures, &self.cfg);
                if self.failures == 1 {
                    warn!(sink = %self.cfg.name, error = %e, "sink unreachable; batches are kept and sent again");
                }
                let why = e.to_string();
                self.info(|i| {
                    i.up = false;
                    i.state = "unreachable".into();
                    *i.failures.entry("unreachable").or_default() += 1;
                    i.last_error = why;
                });
                Some(wait)
            }
        }
    }
}

/// The `Idempotency-Key` of the batch of events `first..=last` of `gateway` to `sink`: the
/// same for the same events, across retries and restarts; two sinks posting to one endpoint
/// never share one.
pub fn idempotency_key(gateway: &str, sink: &str, first: u64, last: u64) -> String {
    format!("{gateway}-{sink}-{first}-{last}")
}

/// The content type of a sink's body.
pub fn content_type(encoding: Encoding) -> &'static str {
    super::client::content_type(encoding)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idempotency_key_is_the_gateway_and_the_id_range() {
        assert_eq!(
            idempotency_key("pi-1", "fn", 1001, 1500),
            "pi-1-fn-1001-1500"
        );
        assert_ne!(
            idempotency_key("pi-1", "fn", 1, 2),
            idempotency_key("pi-1", "fn", 1, 3)
        );
        assert_ne!(
            idempotency_key("pi-1", "fn", 1, 2),
            idempotency_key("pi-1", "g", 1, 2)
        );
        assert_eq!(
            content_type(Encoding::Json),
            "application/vnd.tidepool.batch+json"
        );
    }
}
