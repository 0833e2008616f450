//! Counters and gauges shared by every stage, rendered as Prometheus text.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Why an event was dropped; the `reason` label of `tidepool_events_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A rule returned `()`.
    Rule,
    /// The buffer reached `max_bytes`.
    BufferFull,
    /// The event got older than `max_age`.
    MaxAge,
    /// The payload or frame was larger than allowed.
    Oversize,
    /// A serial frame could not be decoded.
    BadFrame,
    /// The store's filesystem was below `[buffer] min_free`: the buffer counted as full.
    MinFree,
    /// The embedded broker had acknowledged the event, but its memory log wrapped before the
    /// gateway could take it (the store could not keep up, or could not store).
    IngestOverflow,
    /// A dead letter went (oldest first) to keep the dead-letter queue under `dlq_max_bytes`.
    DlqFull,
    /// Sinks are configured and none of them takes the event's topic (their `topics`).
    NoSink,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 9] = [
        DropReason::Rule,
        DropReason::BufferFull,
        DropReason::MaxAge,
        DropReason::Oversize,
        DropReason::BadFrame,
        DropReason::MinFree,
        DropReason::IngestOverflow,
        DropReason::DlqFull,
        DropReason::NoSink,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Rule => "rule",
            DropReason::BufferFull => "buffer_full",
            DropReason::MaxAge => "max_age",
            DropReason::Oversize => "oversize",
            DropReason::BadFrame => "bad_frame",
            DropReason::MinFree => "min_free",
            DropReason::IngestOverflow => "ingest_overflow",
            DropReason::DlqFull => "dlq_full",
            DropReason::NoSink => "no_sink",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The forwarder's state, as shown in status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum UpstreamState {
    /// No upstream configured.
    Disabled = 0,
    /// Not connected; waiting to retry.
    Offline = 1,
    /// Connecting (TCP, TLS, CONNECT/CONNACK).
    Connecting = 2,
    /// Connected, sending a backlog.
    Draining = 3,
    /// Connected and caught up.
    Live = 4,
}

impl UpstreamState {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            UpstreamState::Disabled => "disabled",
            UpstreamState::Offline => "offline",
            UpstreamState::Connecting => "connecting",
            UpstreamState::Draining => "draining",
            UpstreamState::Live => "live",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => UpstreamState::Offline,
            2 => UpstreamState::Connecting,
            3 => UpstreamState::Draining,
            4 => UpstreamState::Live,
            _ => UpstreamState::Disabled,
        }
    }
}

const COMMIT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// All of the gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    ingested: Mutex<BTreeMap<String, u64>>,
    /// Events written to the store.
    pub committed: AtomicU64,
    /// Events acknowledged by upstream.
    pub forwarded: AtomicU64,
    /// Batches acknowledged by upstream.
    pub batches_forwarded: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    /// Events buffered.
    pub backlog_events: AtomicU64,
    /// Stored bytes buffered.
    pub backlog_bytes: AtomicU64,
    /// ts (ms) of the oldest buffered event; 0 when empty.
    pub oldest_ts: AtomicI64,
    upstream_state: AtomicU8,
    /// The last upstream error, for status.
    pub upstream_error: Mutex<String>,
    rule_errors: Mutex<BTreeMap<String, u64>>,
    rule_reload_errors: Mutex<BTreeMap<String, u64>>,
    /// Events in the dead-letter table.
    pub dlq_events: AtomicU64,
    /// Their stored size.
    pub dlq_bytes: AtomicU64,
    /// False once the store failed to commit.
    pub store_healthy: AtomicBool,
    commit_buckets: [AtomicU64; 12],
    commit_count: AtomicU64,
    commit_sum_us: AtomicU64,
    /// Immediate (fsynced) commits.
    pub fsyncs: AtomicU64,
    /// Commits by why their group ended ([`crate::store::commit::GroupEnd`]).
    pub groups_ended: [AtomicU64; 9],
    /// Store commits that failed (a full disk, an I/O error); each is retried.
    pub store_errors: AtomicU64,
    /// When the process started (ms).
    pub started_ms: i64,
    /// The rule stage's view (rules, counters, refused updates), for `/status`.
    pub rules_status: Mutex<serde_json::Value>,
    /// When the commit loop last went round (ms), for the systemd watchdog.
    pub heartbeat: std::sync::Arc<AtomicI64>,
    /// The forwarder's packet-size limit and what it did about it.
    pub upstream_sizes: UpstreamSizeMetrics,
    /// The upstream protocol, refused publishes and the drain of a backlog.
    pub upstream_info: Mutex<UpstreamInfo>,
    /// The embedded broker's connections, sessions and drops.
    pub broker: BrokerMetrics,
    /// The `[[sink]]` forwarders, in configuration order.
    pub sinks: Mutex<Vec<SinkInfo>>,
    /// The metrics of each `kind = "mqtt"` sink's forwarder, by name (their `upstream_*`
    /// fields; its entry in `sinks` is filled from them when read).
    pub mqtt_sinks: Mutex<BTreeMap<String, std::sync::Arc<Metrics>>>,
    /// `tidepool tap`'s hub: the rule stage's records, for the readers of `/tap`.
    pub tap: crate::tap::Tap,
    /// Commands from the cloud (`[commands]`); `None` while they are off.
    pub commands: Mutex<Option<CommandsInfo>>,
    /// Bytes the store wrote to its file since start (what the card takes).
    pub store_bytes_written: AtomicU64,
    /// The commit window now (µs): `commit_max_wait`, or wider while the write budget is spent.
    pub commit_window_us: AtomicU64,
    /// The wear forecast's samples.
    pub wear: super::wear::Wear,
    /// The store file's length, as last looked at.
    pub store_file_bytes: AtomicU64,
    /// Compactions of the store file.
    pub compactions: AtomicU64,
    /// True while the write budget is spent (commits wait longer than `commit_max_wait`).
    pub budget_spent: AtomicBool,
}

/// The embedded broker: connections now, refusals, and messages local subscribers lost.
#[derive(Debug, Default)]
pub struct BrokerMetrics {
    /// Open MQTT connections.
    pub connections: AtomicU64,
    /// Sessions kept (online and offline).
    pub sessions: AtomicU64,
    /// Retained topics.
    pub retained: AtomicU64,
    /// Connections refused: bad credentials.
    pub refused_auth: AtomicU64,
    /// Connections refused: `max_connections` reached.
    pub refused_full: AtomicU64,
    /// Connections refused or closed for a protocol error (malformed packet, bad protocol).
    pub protocol_errors: AtomicU64,
    /// Messages to local subscribers dropped: their session's queue was full (oldest went).
    pub dropped_queue_full: AtomicU64,
    /// Messages to local subscribers dropped: their MQTT 5 message expiry passed in a queue.
    pub dropped_expired: AtomicU64,
    /// Publishes refused because the client's Maximum Packet Size is smaller.
    pub dropped_too_large: AtomicU64,
}

impl BrokerMetrics {
    fn render(&self, o: &mut String) {
        for (name, help, v) in [
            (
                "tidepool_broker_connections",
                "Open MQTT connections to the embedded broker (sensors and local subscribers).",
                &self.connections,
            ),
            (
                "tidepool_broker_sessions",
                "Sessions the embedded broker keeps, online and offline (memory only).",
                &self.sessions,
            ),
            (
                "tidepool_broker_retained",
                "Retained topics.",
                &self.retained,
            ),
        ] {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP tidepool_broker_refused_total Connections the embedded broker refused, by reason.\n# TYPE tidepool_broker_refused_total counter"
        );
        for (reason, v) in [
            ("auth", &self.refused_auth),
            ("max_connections", &self.refused_full),
            ("protocol", &self.protocol_errors),
        ] {
            let _ = writeln!(
                o,
                "tidepool_broker_refused_total{{reason=\"{reason}\"}} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP tidepool_broker_dropped_total Messages for local subscribers the embedded broker dropped, by reason (events ingested from sensors are counted in tidepool_events_dropped_total, never here).\n# TYPE tidepool_broker_dropped_total counter"
        );
        for (reason, v) in [
            ("queue_full", &self.dropped_queue_full),
            ("expired", &self.dropped_expired),
            ("too_large", &self.dropped_too_large),
        ] {
            let _ = writeln!(
                o,
                "tidepool_broker_dropped_total{{reason=\"{reason}\"}} {}",
                v.load(Relaxed)
            );
        }
    }
}

/// What the forwarder says of its connection beyond its state: the protocol it speaks, the
/// publishes the broker refused (MQTT 5 reason codes) and the drain of a backlog.
#[derive(Debug, Default, Clone)]
pub struct UpstreamInfo {
    /// The broker's URL, as configured.
    pub url: String,
    /// `5`, `3.1.1`, or `3.1.1` with why (a broker that does not speak 5).
    pub protocol: String,
    /// Publishes refused by PUBACK reason code, by reason name.
    pub rejected: BTreeMap<String, u64>,
    /// The last refusal, for people: batch, ids, reason code and the broker's reason string.
    pub last_rejection: String,
    /// The backlog being drained, if any.
    pub drain: Option<DrainProgress>,
}

/// A `[[sink]]`: where it posts, its state, what it delivered and what failed.
#[derive(Debug, Default, Clone)]
pub struct SinkInfo {
    /// Its name (the `sink` label).
    pub name: String,
    /// `http`.
    pub kind: &'static str,
    /// Where it posts.
    pub url: String,
    /// Its topic filters.
    pub topics: Vec<String>,
    /// Its headers, values redacted.
    pub headers: Vec<(String, String)>,
    /// `idle`, `posting`, `delivering`, `retrying`, `credentials refused`, `redirected`,
    /// `unreachable`.
    pub state: String,
    /// The last answer was a status (not a failure to connect), credentials not refused.
    pub up: bool,
    /// The last HTTP status.
    pub last_status: Option<u16>,
    /// The last failure, for people.
    pub last_error: String,
    /// Events delivered (2xx).
    pub events: u64,
    /// Batches delivered.
    pub batches: u64,
    /// Events sent to the dead-letter queue.
    pub dead_lettered: u64,
    /// Failed posts by kind: `retry` (408, 429, 5xx), `credentials` (401, 403), `redirect`
    /// (3xx), `rejected` (other 4xx: dead-lettered), `unreachable` (connect, TLS, timeout).
    pub failures: BTreeMap<&'static str, u64>,
    /// A `kind = "mqtt"` sink's forwarder in detail (protocol, refusals, drain, packet limit),
    /// as `/status` shows `[upstream]`'s under `upstream`.
    pub mqtt: Option<serde_json::Value>,
}

impl SinkInfo {
    fn render(sinks: &[SinkInfo], o: &mut String) {
        if sinks.is_empty() {
            return;
        }
        let mut series = |name: &str, kind: &str, help: &str, value: &dyn Fn(&SinkInfo) -> u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for s in sinks {
                let _ = writeln!(
                    o,
                    "{name}{{sink=\"{}\"}} {}",
                    escape_label(&s.name),
                    value(s)
                );
            }
        };
        series(
            "tidepool_sink_forwarded_events_total",
            "counter",
            "Events a [[sink]] acknowledged (2xx).",
            &|s| s.events,
        );
        series(
            "tidepool_sink_dead_lettered_total",
            "counter",
            "Events a [[sink]] refused for good (4xx), now in the dead-letter queue.",
            &|s| s.dead_lettered,
        );
        series(
            "tidepool_sink_up",
            "gauge",
            "1 while a [[sink]]'s last post got an answer that is neither a refusal of its credentials nor a redirect.",
            &|s| u64::from(s.up),
        );
        let _ = writeln!(
            o,
            "# HELP tidepool_sink_failures_total Posts that failed, by reason: retry (408, 429, 5xx), credentials (401, 403), redirect (3xx), rejected (other 4xx), unreachable (connect, TLS, timeout).\n# TYPE tidepool_sink_failures_total counter"
        );
        for s in sinks {
            for reason in [
                "retry",
                "credentials",
                "redirect",
                "rejected",
                "unreachable",
            ] {
                let _ = writeln!(
                    o,
                    "tidepool_sink_failures_total{{sink=\"{}\",reason=\"{reason}\"}} {}",
                    escape_label(&s.name),
                    s.failures.get(reason).copied().unwrap_or(0)
                );
            }
        }
    }

    /// For `/status`.
    pub fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "name": self.name,
            "kind": self.kind,
            "url": self.url,
            "topics": self.topics,
            "headers": self.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>(),
            "state": self.state,
            "up": self.up,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "forwarded": self.events,
            "batches": self.batches,
            "dead_lettered": self.dead_lettered,
            "failures": self.failures,
        });
        if let Some(m) = &self.mqtt {
            v["mqtt"] = m.clone();
        }
        v
    }
}

/// Commands from the cloud: their connection, what became of them, the last one.
#[derive(Debug, Default, Clone)]
pub struct CommandsInfo {
    /// The commands connection is up and subscribed.
    pub connected: bool,
    /// Commands taken (stored and acknowledged to the broker), resends of known ones not counted.
    pub received: u64,
    /// Results by status: `delivered`, `failed`, `expired`, `refused`.
    pub results: BTreeMap<&'static str, u64>,
    /// Resends of commands already taken (recognised by id, not delivered again).
    pub duplicates: u64,
    /// Commands not yet delivered, and results not yet acknowledged by the broker.
    pub pending: u64,
    /// The last result, for people: "cmd-7 → actuators/valve: delivered".
    pub last: String,
    /// The last connection error.
    pub last_error: String,
}

impl CommandsInfo {
    fn render(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "# HELP tidepool_commands_total Commands from the cloud, by what became of them: received (stored, acknowledged), delivered, failed, expired, refused, duplicate (a resend of one already taken).\n# TYPE tidepool_commands_total counter\ntidepool_commands_total{{status=\"received\"}} {}\ntidepool_commands_total{{status=\"duplicate\"}} {}",
            self.received, self.duplicates
        );
        for status in ["delivered", "failed", "expired", "refused"] {
            let _ = writeln!(
                o,
                "tidepool_commands_total{{status=\"{status}\"}} {}",
                self.results.get(status).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            o,
            "# HELP tidepool_commands_pending Commands not yet delivered plus results not yet acknowledged upstream.\n# TYPE tidepool_commands_pending gauge\ntidepool_commands_pending {}\n# HELP tidepool_commands_connected 1 while the commands connection is up.\n# TYPE tidepool_commands_connected gauge\ntidepool_commands_connected {}",
            self.pending,
            u8::from(self.connected)
        );
    }

    /// For `/status`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "connected": self.connected,
            "received": self.received,
            "results": self.results,
            "duplicates": self.duplicates,
            "pending": self.pending,
            "last": self.last,
            "last_error": self.last_error,
        })
    }
}

/// A backlog drain under way.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DrainProgress {
    /// `live_first` or `fifo`.
    pub mode: &'static str,
    /// `upstream.drain_rate` as configured.
    pub rate_limit: String,
    /// Backlog events when the connection came up.
    pub total: u64,
    /// Of them, not yet acknowledged (estimate: drops on the way are not subtracted).
    pub left: u64,
    /// Backlog events acknowledged per second, recently.
    pub events_per_second: f64,
    /// When it will be done at that rate.
    pub eta_seconds: Option<f64>,
}

impl UpstreamInfo {
    fn render(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "# HELP tidepool_upstream_rejected_total Publishes the upstream broker refused with an MQTT 5 PUBACK reason code of 0x80 or more, by reason; they stay stored and are retried with backoff.\n# TYPE tidepool_upstream_rejected_total counter"
        );
        for (reason, n) in &self.rejected {
            let _ = writeln!(
                o,
                "tidepool_upstream_rejected_total{{reason=\"{}\"}} {n}",
                escape_label(reason)
            );
        }
        let d = self.drain.clone().unwrap_or_default();
        let _ = writeln!(
            o,
            "# HELP tidepool_upstream_backlog_left_events Backlog events (stored before the upstream connection came up) not yet acknowledged; 0 when no drain is under way.\n# TYPE tidepool_upstream_backlog_left_events gauge\ntidepool_upstream_backlog_left_events {}",
            d.left
        );
        let _ = writeln!(
            o,
            "# HELP tidepool_upstream_drain_events_per_second Backlog events acknowledged per second, recently.\n# TYPE tidepool_upstream_drain_events_per_second gauge\ntidepool_upstream_drain_events_per_second {:.1}",
            d.events_per_second
        );
    }

    /// For `/status`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "protocol": self.protocol,
            "rejected": self.rejected,
            "last_rejection": self.last_rejection,
            "drain": self.drain.as_ref().map(|d| serde_json::json!({
                "mode": d.mode,
                "rate_limit": d.rate_limit,
                "backlog_total": d.total,
                "backlog_left": d.left,
                "events_per_second": (d.events_per_second * 10.0).round() / 10.0,
                "eta_seconds": d.eta_seconds.map(|s| s.round()),
            })),
        })
    }
}

/// The forwarder's packet-size limit, refusals, dead letters and PUBACK timeouts.
#[derive(Debug, Default)]
pub struct UpstreamSizeMetrics {
    /// The packet limit batches are built under now (bytes).
    pub packet_limit: AtomicU64,
    /// Drops taken as the broker's size limit (each halved the limit).
    pub size_refusals: AtomicU64,
    /// Events moved to the dead-letter queue because upstream cannot take them.
    pub dead_lettered: AtomicU64,
    /// PUBACKs that did not come within `puback_timeout`.
    pub puback_timeouts: AtomicU64,
}

impl UpstreamSizeMetrics {
    fn render(&self, o: &mut String) {
        for (name, help, v) in [
            (
                "tidepool_upstream_size_refusals_total",
                "Times the upstream broker dropped the connection right after a publish larger than any it had acknowledged; each is taken as its packet size limit and halves the batch size limit.",
                &self.size_refusals,
            ),
            (
                "tidepool_upstream_dead_lettered_total",
                "Events moved to the dead-letter queue (rule `upstream`) because alone they exceed upstream.max_packet or were refused by the broker for their size.",
                &self.dead_lettered,
            ),
            (
                "tidepool_upstream_puback_timeouts_total",
                "PUBACKs not received within upstream.puback_timeout; each counts as a lost connection.",
                &self.puback_timeouts,
            ),
        ] {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP tidepool_upstream_packet_limit_bytes Largest PUBLISH packet batches are built to now: upstream.max_packet, or less once learned from size refusals.\n# TYPE tidepool_upstream_packet_limit_bytes gauge\ntidepool_upstream_packet_limit_bytes {}",
            self.packet_limit.load(Relaxed)
        );
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            ingested: Mutex::default(),
            committed: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            batches_forwarded: AtomicU64::new(0),
            dropped: Default::default(),
            backlog_events: AtomicU64::new(0),
            backlog_bytes: AtomicU64::new(0),
            oldest_ts: AtomicI64::new(0),
            upstream_state: AtomicU8::new(0),
            upstream_error: Mutex::default(),
            rule_errors: Mutex::default(),
            rule_reload_errors: Mutex::default(),
            dlq_events: AtomicU64::new(0),
            dlq_bytes: AtomicU64::new(0),
            store_healthy: AtomicBool::new(true),
            commit_buckets: Default::default(),
            commit_count: AtomicU64::new(0),
            commit_sum_us: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            groups_ended: Default::default(),
            store_errors: AtomicU64::new(0),
            started_ms: crate::event::now_ms(),
            rules_status: Mutex::new(serde_json::json!([])),
            heartbeat: std::sync::Arc::new(AtomicI64::new(crate::event::now_ms())),
            upstream_sizes: UpstreamSizeMetrics::default(),
            upstream_info: Mutex::default(),
            broker: BrokerMetrics::default(),
            commands: Mutex::new(None),
            sinks: Mutex::new(Vec::new()),
            mqtt_sinks: Mutex::default(),
            tap: crate::tap::Tap::default(),
            store_bytes_written: AtomicU64::new(0),
            commit_window_us: AtomicU64::new(0),
            wear: super::wear::Wear::default(),
            store_file_bytes: AtomicU64::new(0),
            compactions: AtomicU64::new(0),
            budget_spent: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Counts `n` events ingested from `source` (`mqtt`, `serial:NAME`).
    pub fn ingested(&self, source: &str, n: u64) {
        let mut m = self.ingested.lock().unwrap();
        match m.get_mut(source) {
            Some(v) => *v += n,
            None => {
                m.insert(source.to_string(), n);
            }
        }
    }

    /// Total ingested over all sources.
    pub fn ingested_total(&self) -> u64 {
        self.ingested.lock().unwrap().values().sum()
    }

    /// Counts `n` events dropped for `reason`.
    pub fn dropped(&self, reason: DropReason, n: u64) {
        self.dropped[reason.index()].fetch_add(n, Relaxed);
    }

    /// Events dropped for `reason` since start.
    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()].load(Relaxed)
    }

    /// Counts one error of `rule`.
    pub fn rule_error(&self, rule: &str) {
        *self
            .rule_errors
            .lock()
            .unwrap()
            .entry(rule.to_string())
            .or_default() += 1;
    }

    /// Counts one refused (non-compiling) new version of `rule`.
    pub fn rule_reload_error(&self, rule: &str) {
        *self
            .rule_reload_errors
            .lock()
            .unwrap()
            .entry(rule.to_string())
            .or_default() += 1;
    }

    /// Records one commit's duration.
    pub fn observe_commit(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in COMMIT_BUCKETS.iter().enumerate() {
            if s <= *b {
                self.commit_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.commit_count.fetch_add(1, Relaxed);
        self.commit_sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Number of commits so far.
    pub fn commits(&self) -> u64 {
        self.commit_count.load(Relaxed)
    }

    /// A wear sample of now (free space as given).
    pub fn wear_sample(&self, fs_avail: Option<u64>) -> super::wear::Sample {
        super::wear::Sample {
            at: std::time::Instant::now(),
            written: self.store_bytes_written.load(Relaxed),
            commits: self.commits(),
            events: self.committed.load(Relaxed),
            backlog_bytes: self.backlog_bytes.load(Relaxed),
            backlog_events: self.backlog_events.load(Relaxed),
            fs_avail,
        }
    }

    /// The wear forecast up to the newest sample.
    pub fn forecast(&self) -> super::wear::Forecast {
        match self.wear.newest() {
            Some(s) => self.wear.forecast(s),
            None => super::wear::Forecast::default(),
        }
    }

    /// Sets the forwarder's state.
    /// A commit's group ended for `why`.
    pub fn group_ended(&self, why: crate::store::commit::GroupEnd) {
        self.groups_ended[why as usize].fetch_add(1, Relaxed);
    }

    pub fn set_upstream(&self, s: UpstreamState) {
        self.upstream_state.store(s as u8, Relaxed);
    }

    /// The forwarder's state.
    pub fn upstream(&self) -> UpstreamState {
        UpstreamState::from_u8(self.upstream_state.load(Relaxed))
    }

    /// Whether upstream is connected.
    pub fn upstream_connected(&self) -> bool {
        matches!(
            self.upstream(),
            UpstreamState::Draining | UpstreamState::Live
        )
    }

    /// Age in seconds of the oldest buffered event.
    pub fn oldest_age_secs(&self) -> f64 {
        let ts = self.oldest_ts.load(Relaxed);
        if ts == 0 {
            0.0
        } else {
            ((crate::event::now_ms() - ts).max(0) as f64) / 1000.0
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(4096);
        let counter = |o: &mut String, name: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
        };
        counter(
            &mut o,
            "tidepool_events_ingested_total",
            "Events received, by source.",
        );
        for (src, n) in self.ingested.lock().unwrap().iter() {
            let src = escape_label(src);
            let _ = writeln!(o, "tidepool_events_ingested_total{{source=\"{src}\"}} {n}");
        }
        counter(
            &mut o,
            "tidepool_events_committed_total",
            "Events written durably to the store.",
        );
        let _ = writeln!(
            o,
            "tidepool_events_committed_total {}",
            self.committed.load(Relaxed)
        );
        counter(
            &mut o,
            "tidepool_events_forwarded_total",
            "Events acknowledged by upstream.",
        );
        let _ = writeln!(
            o,
            "tidepool_events_forwarded_total {}",
            self.forwarded.load(Relaxed)
        );
        counter(
            &mut o,
            "tidepool_batches_forwarded_total",
            "Batches acknowledged by upstream.",
        );
        let _ = writeln!(
            o,
            "tidepool_batches_forwarded_total {}",
            self.batches_forwarded.load(Relaxed)
        );
        counter(
            &mut o,
            "tidepool_events_dropped_total",
            "Events dropped, by reason: rule (a rule returned ()), buffer_full (max_bytes), max_age, \
             oversize, bad_frame, min_free (the disk below [buffer] min_free), ingest_overflow (acknowledged \
             by the embedded broker, lost when its memory log wrapped), dlq_full (the oldest dead letters, \
             past dlq_max_bytes), no_sink (sinks are configured and none takes the event's topic).",
        );
        for r in DropReason::ALL {
            let _ = writeln!(
                o,
                "tidepool_events_dropped_total{{reason=\"{}\"}} {}",
                r.label(),
                self.dropped_count(r)
            );
        }
        counter(
            &mut o,
            "tidepool_rule_errors_total",
            "Rule failures, by rule.",
        );
        for (rule, n) in self.rule_errors.lock().unwrap().iter() {
            let rule = escape_label(rule);
            let _ = writeln!(o, "tidepool_rule_errors_total{{rule=\"{rule}\"}} {n}");
        }
        counter(
            &mut o,
            "tidepool_rule_reload_errors_total",
            "New rule versions refused because they do not compile, by rule.",
        );
        for (rule, n) in self.rule_reload_errors.lock().unwrap().iter() {
            let rule = escape_label(rule);
            let _ = writeln!(
                o,
                "tidepool_rule_reload_errors_total{{rule=\"{rule}\"}} {n}"
            );
        }
        counter(
            &mut o,
            "tidepool_fsyncs_total",
            "Durable (fsynced) store commits.",
        );
        let _ = writeln!(o, "tidepool_fsyncs_total {}", self.fsyncs.load(Relaxed));
        let _ = writeln!(
            o,
            "# HELP tidepool_tap_records_total Tap records handed to `tidepool tap` readers (one per input through the rule stage while someone taps).\n# TYPE tidepool_tap_records_total counter\ntidepool_tap_records_total {}\n# HELP tidepool_tap_lost_total Tap records readers lost by falling behind (events are never held back for them).\n# TYPE tidepool_tap_lost_total counter\ntidepool_tap_lost_total {}\n# HELP tidepool_tap_readers Readers of /tap connected now.\n# TYPE tidepool_tap_readers gauge\ntidepool_tap_readers {}",
            self.tap.sent.load(Relaxed),
            self.tap.lost.load(Relaxed),
            self.tap.readers()
        );
        let _ = writeln!(
            o,
            "# HELP tidepool_commit_groups_total Commits by why their group stopped taking events: full (commit_max_events), bytes, window (commit_max_wait), budget_window (the write budget's wider window), early (enough bytes under a wide window), stalled (the senders went quiet under a wide window), closed, acks (no events: sink acknowledgements), other (no events: ticks, expiries, sweeps).\n# TYPE tidepool_commit_groups_total counter"
        );
        for e in crate::store::commit::GroupEnd::ALL {
            let _ = writeln!(
                o,
                "tidepool_commit_groups_total{{ended=\"{}\"}} {}",
                e.label(),
                self.groups_ended[e as usize].load(Relaxed)
            );
        }
        counter(
            &mut o,
            "tidepool_store_errors_total",
            "Store commits that failed (disk full, I/O error); the store is reopened and the commit retried.",
        );
        let _ = writeln!(
            o,
            "tidepool_store_errors_total {}",
            self.store_errors.load(Relaxed)
        );
        counter(
            &mut o,
            "tidepool_store_bytes_written_total",
            "Bytes the store wrote to its file (whole OS pages, as the card takes them).",
        );
        let _ = writeln!(
            o,
            "tidepool_store_bytes_written_total {}",
            self.store_bytes_written.load(Relaxed)
        );
        counter(
            &mut o,
            "tidepool_store_commits_total",
            "Store commits (one fsync each).",
        );
        let _ = writeln!(o, "tidepool_store_commits_total {}", self.commits());
        counter(
            &mut o,
            "tidepool_store_compactions_total",
            "Compactions of the store file (it shrinks after a backlog drained).",
        );
        let _ = writeln!(
            o,
            "tidepool_store_compactions_total {}",
            self.compactions.load(Relaxed)
        );
        let f = self.forecast();
        let num = |v: Option<f64>| v.map_or("NaN".to_string(), |v| format!("{v:.3}"));
        let gauges: [(&str, &str, String); 15] = [
            (
                "tidepool_store_file_bytes",
                "Length of the store file, as last looked at (every 10 s).",
                self.store_file_bytes.load(Relaxed).to_string(),
            ),
            (
                "tidepool_store_bytes_per_event",
                "Bytes written per event committed, over the last 10 minutes (NaN: no events).",
                num(f.bytes_per_event),
            ),
            (
                "tidepool_store_bytes_per_day",
                "Bytes a day the store writes at the rate of the last 10 minutes.",
                format!("{:.0}", f.bytes_per_day),
            ),
            (
                "tidepool_write_budget_bytes_per_day",
                "The write budget ([buffer] write_budget; 0: none).",
                f.write_budget.to_string(),
            ),
            (
                "tidepool_card_life_years",
                "Years the card lasts at this rate, from [buffer] card_endurance (NaN: endurance unknown, or nothing written).",
                num(f.card_life_years),
            ),
            (
                "tidepool_commit_window_seconds",
                "How long a commit waits for more events now (wider while the write budget is spent).",
                format!("{:.3}", self.commit_window_us.load(Relaxed) as f64 / 1e6),
            ),
            (
                "tidepool_backlog_growth_bytes_per_second",
                "Backlog growth over the last 10 minutes, stored bytes a second (negative: draining).",
                format!("{:.1}", f.backlog_bytes_per_second),
            ),
            (
                "tidepool_buffer_full_seconds",
                "Seconds until max_bytes or min_free is reached at the backlog's growth (+Inf: not growing).",
                f.full_in_seconds.map_or("+Inf".to_string(), |v| format!("{v:.0}")),
            ),
            (
                "tidepool_backlog_events",
                "Events buffered, not yet acknowledged upstream.",
                self.backlog_events.load(Relaxed).to_string(),
            ),
            (
                "tidepool_backlog_bytes",
                "Stored bytes of buffered events.",
                self.backlog_bytes.load(Relaxed).to_string(),
            ),
            (
                "tidepool_backlog_oldest_seconds",
                "Age of the oldest buffered event.",
                format!("{:.3}", self.oldest_age_secs()),
            ),
            (
                "tidepool_upstream_connected",
                "1 while connected upstream.",
                u8::from(self.upstream_connected()).to_string(),
            ),
            (
                "tidepool_dlq_events",
                "Events in the dead-letter queue.",
                self.dlq_events.load(Relaxed).to_string(),
            ),
            (
                "tidepool_dlq_bytes",
                "Stored size of the dead-letter queue (capped by dlq_max_bytes).",
                self.dlq_bytes.load(Relaxed).to_string(),
            ),
            (
                "tidepool_store_healthy",
                "1 while the store accepts commits.",
                u8::from(self.store_healthy.load(Relaxed)).to_string(),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let _ = writeln!(
            o,
            "# HELP tidepool_commit_seconds Duration of one store commit (fsync included).\n# TYPE tidepool_commit_seconds histogram"
        );
        for (i, b) in COMMIT_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "tidepool_commit_seconds_bucket{{le=\"{b}\"}} {}",
                self.commit_buckets[i].load(Relaxed)
            );
        }
        let count = self.commit_count.load(Relaxed);
        let _ = writeln!(o, "tidepool_commit_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            o,
            "tidepool_commit_seconds_sum {:.6}",
            self.commit_sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(o, "tidepool_commit_seconds_count {count}");
        self.upstream_sizes.render(&mut o);
        self.upstream_info.lock().unwrap().render(&mut o);
        self.broker.render(&mut o);
        if let Some(c) = self.commands.lock().unwrap().as_ref() {
            c.render(&mut o);
        }
        SinkInfo::render(&self.all_sinks(), &mut o);
        o
    }

    /// Every sink, `upstream` (the MQTT broker, when configured) first, for the `sink`-labelled
    /// metrics and `/status`.
    pub fn all_sinks(&self) -> Vec<SinkInfo> {
        let mut v = Vec::new();
        if self.upstream() != UpstreamState::Disabled {
            v.push(self.mqtt_sink_info(crate::store::sinks::UPSTREAM, vec!["#".into()]));
        }
        let mqtt = self.mqtt_sinks.lock().unwrap().clone();
        for s in self.sinks.lock().unwrap().iter() {
            match mqtt.get(&s.name) {
                Some(m) => v.push(m.mqtt_sink_info(&s.name, s.topics.clone())),
                None => v.push(s.clone()),
            }
        }
        v
    }

    /// A forwarder's state (this `Metrics`' `upstream_*` fields) as a sink.
    fn mqtt_sink_info(&self, name: &str, topics: Vec<String>) -> SinkInfo {
        let info = self.upstream_info.lock().unwrap();
        let mut failures = BTreeMap::new();
        let rejected: u64 = info.rejected.values().sum();
        if rejected > 0 {
            failures.insert("rejected", rejected);
        }
        SinkInfo {
            name: name.into(),
            kind: "mqtt",
            url: info.url.clone(),
            topics,
            headers: Vec::new(),
            state: self.upstream().name().into(),
            up: self.upstream_connected(),
            last_status: None,
            last_error: self.upstream_error.lock().unwrap().clone(),
            events: self.forwarded.load(Relaxed),
            batches: self.batches_forwarded.load(Relaxed),
            dead_lettered: self.upstream_sizes.dead_lettered.load(Relaxed),
            failures,
            mqtt: (name != crate::store::sinks::UPSTREAM).then(|| {
                let mut d = info.json();
                let z = &self.upstream_sizes;
                d["packet_limit"] = z.packet_limit.load(Relaxed).into();
                d["size_refusals"] = z.size_refusals.load(Relaxed).into();
                d["puback_timeouts"] = z.puback_timeouts.load(Relaxed).into();
                d
            }),
        }
    }

    /// The `/status` document.
    pub fn status_json(&self, gateway: &str, rules: serde_json::Value) -> serde_json::Value {
        let dropped: serde_json::Map<String, serde_json::Value> = DropReason::ALL
            .iter()
            .map(|r| (r.label().to_string(), self.dropped_count(*r).into()))
            .collect();
        let mut upstream = self.upstream_info.lock().unwrap().json();
        upstream["state"] = self.upstream().name().into();
        upstream["connected"] = self.upstream_connected().into();
        upstream["last_error"] = self.upstream_error.lock().unwrap().clone().into();
        serde_json::json!({
            "gateway": gateway,
            "running": true,
            "uptime_seconds": (crate::event::now_ms() - self.started_ms) / 1000,
            "ingested": self.ingested_total(),
            "committed": self.committed.load(Relaxed),
            "forwarded": self.forwarded.load(Relaxed),
            "dropped": dropped,
            "backlog_events": self.backlog_events.load(Relaxed),
            "backlog_bytes": self.backlog_bytes.load(Relaxed),
            "oldest_age_seconds": self.oldest_age_secs(),
            "upstream": upstream,
            "dlq_events": self.dlq_events.load(Relaxed),
            "dlq_bytes": self.dlq_bytes.load(Relaxed),
            "store_healthy": self.store_healthy.load(Relaxed),
            "commits": self.commits(),
            "store_bytes_written": self.store_bytes_written.load(Relaxed),
            "store_file_bytes": self.store_file_bytes.load(Relaxed),
            "commit_window_seconds": self.commit_window_us.load(Relaxed) as f64 / 1e6,
            "budget_spent": self.budget_spent.load(Relaxed),
            "wear": self.forecast(),
            "commands": self.commands.lock().unwrap().as_ref().map(CommandsInfo::json),
            "sinks": self.all_sinks().iter().map(SinkInfo::json).collect::<Vec<_>>(),
            "rules": rules,
        })
    }
}

/// A label value as the Prometheus text format wants it: `\\`, `"` and newline escaped.
pub fn escape_label(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return v.into();
    }
    let mut o = String::with_capacity(v.len() + 8);
    for c in v.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("10-overheat"), "10-overheat");
        assert_eq!(escape_label(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label("two\nlines"), "two\\nlines");
        let m = Metrics::default();
        m.ingested("serial:we\"ird\\port\n", 1);
        m.rule_error("r\"1");
        m.rule_reload_error("r\n2");
        let t = m.render();
        assert!(
            t.contains("tidepool_events_ingested_total{source=\"serial:we\\\"ird\\\\port\\n\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("tidepool_rule_errors_total{rule=\"r\\\"1\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("tidepool_rule_reload_errors_total{rule=\"r\\n2\"} 1"),
            "{t}"
        );
        // Every sample stays on one line: no raw newline inside a label.
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            assert_eq!(l.matches('{').count(), l.matches('}').count(), "{l}");
        }
    }

    #[test]
    fn an_mqtt_sink_is_shown_from_its_own_forwarder_in_configured_order() {
        let m = Metrics::default();
        m.set_upstream(UpstreamState::Live);
        m.forwarded.store(7, Relaxed);
        let own = std::sync::Arc::new(Metrics::default());
        own.set_upstream(UpstreamState::Offline);
        own.forwarded.store(3, Relaxed);
        *own.upstream_error.lock().unwrap() = "connection refused".into();
        own.upstream_info.lock().unwrap().url = "mqtt://b2:1883".into();
        for (name, kind) in [("site", "mqtt"), ("fn", "http")] {
            m.sinks.lock().unwrap().push(SinkInfo {
                name: name.into(),
                kind,
                topics: vec!["a/#".into()],
                ..SinkInfo::default()
            });
        }
        m.mqtt_sinks
            .lock()
            .unwrap()
            .insert("site".into(), own.clone());
        let all = m.all_sinks();
        let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["upstream", "site", "fn"]);
        let site = &all[1];
        assert_eq!(
            (site.kind, site.events, site.up, site.state.as_str()),
            ("mqtt", 3, false, "offline")
        );
        assert_eq!(site.url, "mqtt://b2:1883");
        assert_eq!(site.last_error, "connection refused");
        assert_eq!(site.topics, ["a/#"]);
        assert_eq!(all[0].events, 7, "upstream's own counts");
        own.upstream_sizes.puback_timeouts.store(2, Relaxed);
        let site = &m.all_sinks()[1];
        let d = site.mqtt.as_ref().expect("an mqtt sink's details");
        assert_eq!(d["puback_timeouts"], 2);
        assert!(
            m.all_sinks()[0].mqtt.is_none(),
            "upstream's are under `upstream`"
        );
        assert_eq!(site.json()["mqtt"]["puback_timeouts"], 2);
        let t = m.render();
        assert!(
            t.contains("tidepool_sink_forwarded_events_total{sink=\"site\"} 3"),
            "{t}"
        );
        assert!(t.contains("tidepool_sink_up{sink=\"site\"} 0"), "{t}");
    }

    #[test]
    fn renders_contract_names() {
        let m = Metrics::default();
        m.ingested("mqtt", 3);
        m.dropped(DropReason::Oversize, 2);
        m.observe_commit(Duration::from_millis(2));
        m.rule_error("10-overheat");
        let t = m.render();
        for needle in [
            "tidepool_events_ingested_total{source=\"mqtt\"} 3",
            "tidepool_events_committed_total 0",
            "tidepool_events_forwarded_total 0",
            "tidepool_events_dropped_total{reason=\"oversize\"} 2",
            "tidepool_events_dropped_total{reason=\"bad_frame\"} 0",
            "tidepool_backlog_events 0",
            "tidepool_backlog_bytes 0",
            "tidepool_backlog_oldest_seconds 0.000",
            "tidepool_upstream_connected 0",
            "tidepool_rule_errors_total{rule=\"10-overheat\"} 1",
            "tidepool_dlq_events 0",
            "tidepool_dlq_bytes 0",
            "tidepool_events_dropped_total{reason=\"dlq_full\"} 0",
            "tidepool_commit_seconds_bucket{le=\"0.0025\"} 1",
            "tidepool_commit_seconds_bucket{le=\"0.001\"} 0",
            "tidepool_commit_seconds_count 1",
        ] {
            assert!(t.contains(needle), "missing {needle} in\n{t}");
        }
    }
}
