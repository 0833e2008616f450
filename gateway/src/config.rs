//! Configuration: the TOML of CONTRACT.md.
//!
//! The defaults live in `gateway/defaults.toml`, compiled in and printed by
//! `tidepool check --print-defaults`. A user's file is merged over them key by key, then the
//! result is checked: unknown keys are refused, sizes and durations are human-readable, and an
//! error names the file, the key (and its line when it came from the file) and what would be right.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// The built-in defaults, as shipped.
pub const DEFAULTS: &str = include_str!("../defaults.toml");

/// A configuration problem a user can fix.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {what}")]
pub struct ConfigError {
    /// `FILE`, `FILE:LINE`, or `built-in defaults`.
    pub origin: String,
    /// The key and what is wrong with it, and what would be right.
    pub what: String,
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Who this gateway is and where it keeps its data.
    pub gateway: GatewayConfig,
    /// Where events come from.
    pub ingest: IngestConfig,
    /// The Rhai rule stage.
    pub rules: RulesConfig,
    /// Where batches go.
    pub upstream: UpstreamConfig,
    /// The durable buffer.
    pub buffer: BufferConfig,
    /// The admin HTTP endpoint.
    pub admin: AdminConfig,
    /// Commands from the cloud.
    pub commands: CommandsConfig,
    /// `[[sink]]`: more places batches go (HTTP functions), beside `[upstream]`.
    #[serde(default, rename = "sink")]
    pub sinks: Vec<SinkConfig>,
    /// What loading noticed but accepted: renamed or removed keys, each naming the replacement.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// `[gateway]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Appears in every upstream batch; `{hostname}` is expanded at load.
    pub id: String,
    /// Folder holding the store.
    pub data_dir: PathBuf,
}

/// `[ingest]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// `[ingest.mqtt]`.
    pub mqtt: MqttIngestConfig,
    /// `[[ingest.serial]]`, zero or more ports.
    #[serde(default)]
    pub serial: Vec<SerialConfig>,
}

/// How MQTT events come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MqttMode {
    /// Run a broker that sensors publish to.
    Embedded,
    /// Subscribe to an existing broker.
    Client,
}

/// `[ingest.mqtt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttIngestConfig {
    /// Embedded broker or client of an existing one.
    pub mode: MqttMode,
    /// (embedded) listen address for sensors.
    pub listen: SocketAddr,
    /// (client) broker URL, `mqtt://HOST:PORT`.
    pub broker: String,
    /// (client) persistent client id.
    pub client_id: String,
    /// (client) username for the broker; empty for none.
    pub username: String,
    /// (client) password for the broker.
    pub password: String,
    /// (client) MQTT keep-alive with the broker: a silent connection is pinged after this
    /// long and given up when a second period passes without an answer.
    pub keep_alive: HumanDuration,
    /// MQTT filters to ingest.
    pub topics: Vec<String>,
    /// Largest payload accepted.
    pub max_payload: ByteSize,
    /// (embedded) most simultaneous connections.
    pub max_connections: usize,
    /// (embedded) accepted credentials; empty: anonymous.
    pub users: Vec<UserConfig>,
    /// (embedded) QoS 1/2 publishes a sensor may have waiting for their commit (MQTT 5
    /// Receive Maximum); a sensor with this many waits.
    pub receive_maximum: u16,
    /// (embedded) QoS 1 messages in flight to a local subscriber that announced no Receive
    /// Maximum (MQTT 3.1.1).
    pub subscriber_inflight: u16,
    /// (embedded) Messages queued per local subscriber session; beyond it the oldest goes
    /// (counted).
    pub max_queued_messages: usize,
    /// (embedded) Most retained topics.
    pub max_retained: usize,
    /// (embedded) Longest a persistent session outlives its connection.
    pub max_session_expiry: HumanDuration,
    /// (embedded) Seconds a new connection has to send its CONNECT.
    pub connect_timeout: HumanDuration,
    /// (embedded) A second listener speaking MQTT over TLS; unset: none.
    pub tls_listen: Option<SocketAddr>,
    /// (embedded) PEM certificate chain for `tls_listen`.
    pub tls_cert: Option<PathBuf>,
    /// (embedded) PEM private key for `tls_listen`.
    pub tls_key: Option<PathBuf>,
}

/// One username/password pair for the embedded broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// MQTT username.
    pub username: String,
    /// MQTT password.
    pub password: String,
}

/// How a serial port's byte stream is cut into frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    /// One JSON object per `\n`-terminated line.
    Lines,
    /// postcard frames, COBS-encoded, 0x00-delimited.
    Cobs,
}

/// `[[ingest.serial]]`: one serial port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Name used in metrics and the default topic.
    pub name: String,
    /// Device path, e.g. `/dev/ttyUSB0`.
    pub path: PathBuf,
    /// Line speed.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Framing of the byte stream.
    #[serde(default = "default_framing")]
    pub framing: Framing,
    /// Topic of events from this port; default `serial/NAME`.
    #[serde(default)]
    pub topic: Option<String>,
    /// Longest frame accepted.
    #[serde(default = "default_max_frame")]
    pub max_frame: ByteSize,
    /// Answer each frame with an ack after it is committed.
    #[serde(default)]
    pub ack: bool,
}

fn default_baud() -> u32 {
    115_200
}
fn default_framing() -> Framing {
    Framing::Lines
}
fn default_max_frame() -> ByteSize {
    ByteSize(64 * 1024)
}

/// `[rules]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Folder of `*.rhai` rules.
    pub dir: PathBuf,
    /// Period of `on_tick`.
    pub tick: HumanDuration,
    /// Most Rhai operations per call.
    pub max_operations: u64,
    /// Most nested function calls.
    pub max_call_depth: usize,
    /// Most nested expressions.
    pub max_expr_depth: usize,
    /// Longest string a rule may build.
    pub max_string_size: ByteSize,
    /// Most array elements.
    pub max_array_size: usize,
    /// Most map entries.
    pub max_map_size: usize,
    /// Most variables in scope.
    pub max_variables: usize,
    /// Most functions in one rule file.
    pub max_functions: usize,
    /// Wall-clock budget of one call (on_event or on_tick).
    pub max_call_time: HumanDuration,
}

/// Batch encoding upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// JSON, see CONTRACT.md.
    Json,
    /// postcard, same fields.
    Postcard,
}

/// `[upstream] protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    /// MQTT 5: PUBACK reason codes, the broker's Maximum Packet Size, user properties.
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1.
    #[serde(rename = "3.1.1")]
    V311,
}

impl Protocol {
    /// As written in the config.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::V5 => "5",
            Protocol::V311 => "3.1.1",
        }
    }
}

/// `[upstream] drain`: the order a backlog goes out in after an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Drain {
    /// New events first (within `batch_max_wait`), the backlog behind them, paced.
    LiveFirst,
    /// Oldest first, as stored.
    Fifo,
}

/// `[upstream] drain_rate`: `"unlimited"`, `"N/s"` (events a second) or `"SIZE/s"` (bytes a
/// second on the wire, e.g. `"64KiB/s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainRate {
    /// As fast as upstream takes it.
    Unlimited,
    /// Events a second.
    Events(u64),
    /// Bytes a second (whole PUBLISH packets).
    Bytes(u64),
}

impl DrainRate {
    fn parse(s: &str) -> Result<DrainRate, String> {
        let t = s.trim();
        if t == "unlimited" {
            return Ok(DrainRate::Unlimited);
        }
        let what = || {
            format!(
                "`{s}` is not a drain rate: \"unlimited\", events a second (\"2000/s\") or bytes a second (\"64KiB/s\")"
            )
        };
        let per = t.strip_suffix("/s").ok_or_else(what)?.trim();
        let per = per
            .strip_suffix("events")
            .or_else(|| per.strip_suffix("ev"))
            .unwrap_or(per)
            .trim();
        let rate = if let Ok(n) = per.parse::<u64>() {
            DrainRate::Events(n)
        } else {
            DrainRate::Bytes(ByteSize::parse(per).map_err(|_| what())?.0)
        };
        match rate {
            DrainRate::Events(0) | DrainRate::Bytes(0) => Err(format!(
                "`{s}`: a drain rate must be above 0 (or \"unlimited\")"
            )),
            r => Ok(r),
        }
    }
}

impl<'de> Deserialize<'de> for DrainRate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DrainRate::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `[upstream]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `mqtt://` or `mqtts://` URL; `None`: buffer only.
    #[serde(default)]
    pub url: Option<String>,
    /// Topic batches are published to.
    pub topic: String,
    /// MQTT client id upstream.
    pub client_id: String,
    /// Most events per batch.
    pub batch_max_events: usize,
    /// Most encoded bytes per batch.
    pub batch_max_bytes: ByteSize,
    /// Longest an event waits for its batch to fill.
    pub batch_max_wait: HumanDuration,
    /// Wire encoding.
    pub encoding: Encoding,
    /// MQTT protocol version upstream.
    pub protocol: Protocol,
    /// Batch compression.
    pub compression: crate::forward::compress::Compression,
    /// Which events go first after an outage.
    pub drain: Drain,
    /// Most the backlog is sent at.
    pub drain_rate: DrainRate,
    /// Largest whole PUBLISH packet sent upstream (header, topic, packet id, payload).
    pub max_packet: ByteSize,
    /// A PUBACK not received this long after its publish counts as a lost connection.
    pub puback_timeout: HumanDuration,
    /// Batches in flight (published, not yet PUBACKed).
    pub max_inflight: usize,
    /// MQTT keep-alive.
    pub keep_alive: HumanDuration,
    /// First reconnect delay.
    pub reconnect_min: HumanDuration,
    /// Largest reconnect delay.
    pub reconnect_max: HumanDuration,
    /// Username; empty for none.
    pub username: String,
    /// Password.
    pub password: String,
    /// CA certificate (PEM); empty: system roots.
    pub ca_file: PathBuf,
    /// Client certificate (PEM) for mTLS; empty: none.
    pub cert_file: PathBuf,
    /// Client key (PEM) for mTLS.
    pub key_file: PathBuf,
}

/// The largest packet MQTT can express (a 4-byte remaining length, plus the fixed header).
const MQTT_MAX_PACKET: u64 = 268_435_455 + 5;

/// What to do when `max_bytes` is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Delete the oldest buffered events to make room.
    DropOldest,
    /// Refuse the new events.
    RejectNew,
}

/// `[buffer]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Cap on the stored size of buffered events.
    pub max_bytes: ByteSize,
    /// Oldest an event may get before it is dropped.
    pub max_age: HumanDuration,
    /// Policy at the cap.
    pub when_full: WhenFull,
    /// Most events in one commit.
    pub commit_max_events: usize,
    /// Longest a commit waits for more events after the first.
    pub commit_max_wait: HumanDuration,
    /// redb page cache.
    pub cache_size: ByteSize,
    /// Free space the filesystem must keep; below it the buffer counts as full.
    pub min_free: MinFree,
    /// Memory that events between ingest and the store may take (channel and commit group).
    pub ingest_max_bytes: ByteSize,
    /// Cap on the stored size of the dead-letter queue (drop-oldest, counted `dlq_full`).
    pub dlq_max_bytes: ByteSize,
    /// Bytes a day the store may write to the card; commits wait longer to keep to it (0: none).
    pub write_budget: ByteSize,
    /// The longest the write budget may make a commit wait (the ceiling of the window).
    pub budget_max_wait: HumanDuration,
    /// Bytes the card can take in its life (its rated endurance), for the forecast; 0: unknown.
    pub card_endurance: ByteSize,
}

/// What a `[[sink]]` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// `POST` each batch to `url`.
    Http,
    /// Publish each batch to the MQTT broker at `url` (a second broker), as `[upstream]` does.
    Mqtt,
}

impl SinkKind {
    /// Its name in config, `status` and metrics.
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Http => "http",
            SinkKind::Mqtt => "mqtt",
        }
    }
}

fn default_all_topics() -> Vec<String> {
    vec!["#".into()]
}
fn default_batch_max_events() -> usize {
    500
}
fn default_batch_max_bytes() -> ByteSize {
    ByteSize(256 * 1024)
}
fn default_second() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_sink_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_reconnect_min() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}
fn default_reconnect_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_json() -> Encoding {
    Encoding::Json
}
fn default_unlimited() -> DrainRate {
    DrainRate::Unlimited
}

/// `[[sink]]`: an HTTP function or webhook batches are posted to, or another MQTT broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Its name: in `status`, metrics (`sink` label), the dead-letter queue (`sink:NAME`).
    pub name: String,
    /// `http` or `mqtt`.
    pub kind: SinkKind,
    /// `http://` or `https://` URL (`http`); `mqtt://` or `mqtts://` (`mqtt`).
    pub url: String,
    /// `mqtt`: the topic batches are published to; empty: `[upstream]`'s default.
    #[serde(default)]
    pub topic: String,
    /// `mqtt`: the retained `online`/`offline` topic (and last will) on that broker;
    /// default `tidepool/{gateway}/status`; `""`: none.
    #[serde(default)]
    pub status_topic: Option<String>,
    /// `mqtt`: the client id; empty: `tidepool-{gateway}-NAME`.
    #[serde(default)]
    pub client_id: String,
    /// `mqtt`: credentials; empty means none.
    #[serde(default)]
    pub username: String,
    /// `mqtt`: the password.
    #[serde(default)]
    pub password: String,
    /// `mqtt`: MQTT protocol (default `"5"`, falling back to 3.1.1 as `[upstream]` does).
    #[serde(default)]
    pub protocol: Option<Protocol>,
    /// `mqtt`: largest whole PUBLISH packet (default `[upstream]`'s default).
    #[serde(default)]
    pub max_packet: Option<ByteSize>,
    /// `mqtt`: batches published and not yet acknowledged at once.
    #[serde(default)]
    pub max_inflight: Option<usize>,
    /// `mqtt`: `live_first` (default) or `fifo` after an outage.
    #[serde(default)]
    pub drain: Option<Drain>,
    /// Extra request headers (an API key); values are redacted in logs and `status`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Filters of the events it takes.
    #[serde(default = "default_all_topics")]
    pub topics: Vec<String>,
    /// Most events per batch.
    #[serde(default = "default_batch_max_events")]
    pub batch_max_events: usize,
    /// Most bytes of encoded events per batch (the body, before compression).
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: ByteSize,
    /// Longest an event waits for its batch to fill.
    #[serde(default = "default_second")]
    pub batch_max_wait: HumanDuration,
    /// Body encoding.
    #[serde(default = "default_json")]
    pub encoding: Encoding,
    /// Body compression (`Content-Encoding`).
    #[serde(default)]
    pub compression: crate::forward::compress::Compression,
    /// The whole exchange of one `POST` (`http`); the PUBACK timeout (`mqtt`).
    #[serde(default = "default_sink_timeout")]
    pub timeout: HumanDuration,
    /// Most the backlog is sent at.
    #[serde(default = "default_unlimited")]
    pub drain_rate: DrainRate,
    /// First retry delay.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min: HumanDuration,
    /// Largest retry delay.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: HumanDuration,
    /// CA certificate (PEM); empty: system roots.
    #[serde(default)]
    pub ca_file: PathBuf,
    /// Client certificate (PEM) for mTLS; empty: none.
    #[serde(default)]
    pub cert_file: PathBuf,
    /// Client key (PEM) for mTLS.
    #[serde(default)]
    pub key_file: PathBuf,
}

/// `[commands]`: commands from the cloud, delivered to local topics or serial ports.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsConfig {
    /// Off unless set.
    pub enabled: bool,
    /// Subscription on the upstream broker; ends in `/#`, what `#` matched is the target.
    pub topic: String,
    /// Where results go.
    pub result_topic: String,
    /// The commands connection's client id (persistent session).
    pub client_id: String,
    /// MQTT filters a target must match.
    pub allow: Vec<String>,
    /// Commands older than this are dropped with an `expired` result.
    pub max_age: HumanDuration,
    /// Prefix of the local topic a command goes to.
    pub local_prefix: String,
}

impl SinkConfig {
    /// A `kind = "mqtt"` sink as the forwarder takes it: an `[upstream]` of the built-in
    /// defaults with this sink's keys (its `timeout` is the PUBACK timeout).
    pub fn upstream_config(&self) -> UpstreamConfig {
        let d = Config::defaults().upstream;
        UpstreamConfig {
            url: Some(self.url.clone()),
            topic: self.topic.clone(),
            client_id: self.client_id.clone(),
            batch_max_events: self.batch_max_events,
            batch_max_bytes: self.batch_max_bytes,
            batch_max_wait: self.batch_max_wait,
            encoding: self.encoding,
            protocol: self.protocol.unwrap_or(d.protocol),
            compression: self.compression,
            drain: self.drain.unwrap_or(d.drain),
            drain_rate: self.drain_rate,
            max_packet: self.max_packet.unwrap_or(d.max_packet),
            puback_timeout: self.timeout,
            max_inflight: self.max_inflight.unwrap_or(d.max_inflight),
            keep_alive: d.keep_alive,
            reconnect_min: self.reconnect_min,
            reconnect_max: self.reconnect_max,
            username: self.username.clone(),
            password: self.password.clone(),
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        }
    }
}

impl CommandsConfig {
    /// The subscription's prefix: `topic` without its `#` (ends in `/`).
    pub fn prefix(&self) -> &str {
        self.topic.strip_suffix('#').unwrap_or(&self.topic)
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address; empty disables the endpoint.
    pub listen: String,
    /// Bearer token that writes and payload reads must carry; empty: none.
    pub token: String,
    /// File whose first line is the token (keeps it out of the config); empty: none.
    pub token_file: PathBuf,
    /// Most connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Longest a client may take to send its request, and to take the reply.
    pub io_timeout: HumanDuration,
    /// Longest a request waits for the commit loop before it is answered 503.
    pub reply_timeout: HumanDuration,
}

impl AdminConfig {
    /// The address to serve on, if any.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }

    /// The token from `token` or `token_file`, if one is configured; the error names the key.
    pub fn token(&self) -> Result<Option<String>, String> {
        if !self.token.is_empty() {
            return Ok(Some(self.token.clone()));
        }
        if self.token_file.as_os_str().is_empty() {
            return Ok(None);
        }
        let f = self.token_file.display();
        let text = std::fs::read_to_string(&self.token_file)
            .map_err(|e| format!("key `admin.token_file`: cannot read {f}: {e}"))?;
        let t = text.lines().next().unwrap_or("").trim().to_string();
        check_token(&t).map_err(|e| format!("key `admin.token_file`: {f}: {e}"))?;
        Ok(Some(t))
    }

    /// The token for a client (`tidepool status`, `tidepool dlq`): as [`Self::token`], `None`
    /// when the file cannot be read (the daemon then says what it wants).
    pub fn client_token(&self) -> Option<String> {
        self.token().ok().flatten()
    }
}

/// Whether a config line or key path is about a password or token (whose value no message
/// may show).
fn holds_secret(line_or_key: &str) -> bool {
    let l = line_or_key.to_ascii_lowercase();
    // `users` entries hold passwords too, whatever shape a wrong one has.
    // `[[sink]] headers` carry API keys and `Authorization`.
    l.contains("password")
        || l.contains("token")
        || l.contains("users")
        || l.contains("headers")
        || l.contains("authorization")
        || l.contains("key =")
        || l.contains("-key\"")
}

/// A token must fit in an HTTP header unchanged: visible ASCII, no spaces.
fn check_token(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("the token is empty".into());
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "a token is visible ASCII without spaces, e.g. from `openssl rand -hex 32`".into(),
        );
    }
    Ok(())
}

/// A size in bytes, written `512MiB`, `64KiB`, `1000` or `2MB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"256KiB"` and friends.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: f64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size; write e.g. \"64KiB\", \"512MiB\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TiB" | "T" => 1 << 40,
            "TB" => 1_000_000_000_000,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` in `{s}`; use B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB)"
                ))
            }
        };
        let bytes = num * mult as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("`{s}` is too large; at most 16EiB"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
            write!(f, "{}GiB", b >> 30)
        } else if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", b >> 20)
        } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", b >> 10)
        } else {
            write!(f, "{b}B")
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            de::Error::custom("expected a size such as \"64KiB\" or a number of bytes")
        })? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(de::Error::custom),
        }
    }
}

/// Free space to keep on the store's filesystem: a size (`"64MiB"`) or a share (`"5%"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    /// Bytes.
    Bytes(u64),
    /// Percent of the filesystem's size.
    Percent(f64),
}

impl MinFree {
    /// The bytes to keep free on a filesystem of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }
}

impl<'de> Deserialize<'de> for MinFree {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let bad =
            || de::Error::custom("expected a size such as \"64MiB\" or a share such as \"5%\"");
        match Raw::deserialize(d).map_err(|_| bad())? {
            Raw::N(n) => Ok(MinFree::Bytes(n)),
            Raw::S(s) => match s.trim().strip_suffix('%') {
                Some(p) => match p.trim().parse::<f64>() {
                    Ok(p) if (0.0..=100.0).contains(&p) => Ok(MinFree::Percent(p)),
                    _ => Err(bad()),
                },
                None => ByteSize::parse(&s)
                    .map(|b| MinFree::Bytes(b.0))
                    .map_err(de::Error::custom),
            },
        }
    }
}

/// A duration written `250ms`, `1s`, `5m`, `2h`, `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// The longest duration accepted: 100 years (clocks and timers stay far from overflow).
    pub const MAX: Duration = Duration::from_secs(36_500 * 86_400);

    /// Parses `"1s"` and friends; several parts add up (`"1m30s"`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad =
            || format!("`{s}` is not a duration; write e.g. \"250ms\", \"1s\", \"5m\", \"7d\"");
        let mut rest = s.trim();
        if rest.is_empty() {
            return Err(bad());
        }
        let mut total = Duration::ZERO;
        while !rest.is_empty() {
            let n_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(bad)?;
            let n: f64 = rest[..n_end].parse().map_err(|_| bad())?;
            rest = &rest[n_end..];
            let u_end = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let secs = match rest[..u_end].trim() {
                "ms" => n / 1000.0,
                "s" => n,
                "m" | "min" => n * 60.0,
                "h" => n * 3600.0,
                "d" => n * 86400.0,
                _ => return Err(bad()),
            };
            let too_long = || format!("`{s}` is too long; at most 36500d (100 years)");
            let part = Duration::try_from_secs_f64(secs).map_err(|_| too_long())?;
            total = total
                .checked_add(part)
                .filter(|t| *t <= Self::MAX)
                .ok_or_else(too_long)?;
            rest = &rest[u_end..];
        }
        Ok(HumanDuration(total))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            de::Error::custom("expected a duration string such as \"1s\" or \"7d\"")
        })?;
        HumanDuration::parse(&s).map_err(de::Error::custom)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Config {
    /// The built-in defaults, with `{hostname}` and `{gateway}` expanded.
    pub fn defaults() -> Config {
        Self::from_str_named(DEFAULTS_NAME, "").expect("built-in defaults are valid")
    }

    /// Loads `path` over the defaults, or the defaults alone when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            None => Ok(Self::defaults()),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError {
                    origin: p.display().to_string(),
                    what: format!("cannot read the config file: {e}"),
                })?;
                Self::from_str_named(&p.display().to_string(), &text)
            }
        }
    }

    /// Parses `text` (named `name` in messages) over the defaults.
    pub fn from_str_named(name: &str, text: &str) -> Result<Config, ConfigError> {
        Self::from_str_renamed(name, text, renamed::RENAMED)
    }

    /// [`Self::from_str_named`] with a given table of renamed keys.
    fn from_str_renamed(
        name: &str,
        text: &str,
        renames: &[renamed::Renamed],
    ) -> Result<Config, ConfigError> {
        let mut merged: toml::Table = DEFAULTS.parse().expect("built-in defaults parse");
        let user: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            // The parser's message quotes the offending line; not one that holds a secret.
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            // A file with sink headers: any line may be one (`[sink.headers]` tables).
            let headers = text.contains("headers");
            match line.filter(|&l| headers || text.lines().nth(l - 1).is_some_and(holds_secret)) {
                Some(l) => ConfigError {
                    origin: format!("{name}:{l}"),
                    what: format!(
                        "not valid TOML: {} (the line is not shown: it holds a password or token)",
                        e.message()
                    ),
                },
                None => ConfigError {
                    origin: name.to_string(),
                    what: format!("not valid TOML: {}", e.to_string().trim_end()),
                },
            }
        })?;
        let mut user = user;
        let warnings = renamed::apply(&mut user, renames, name, text);
        merge(&mut merged, user);
        let mut cfg: Config = serde_path_to_error::deserialize(toml::Value::Table(merged))
            .map_err(|e| {
                let key = e.path().to_string();
                let line = find_line(text, &key);
                ConfigError {
                    origin: match line {
                        Some(l) => format!("{name}:{l}"),
                        None => name.to_string(),
                    },
                    what: if holds_secret(&key) {
                        // serde's message quotes the value.
                        format!("key `{key}`: must be a string (the value is not shown)")
                    } else {
                        format!("key `{key}`: {}", e.inner())
                    },
                }
            })?;
        cfg.expand(name)?;
        cfg.warnings = warnings;
        Ok(cfg)
    }

    /// Expands placeholders and checks what serde cannot.
    fn expand(&mut self, name: &str) -> Result<(), ConfigError> {
        let err = |key: &str, what: String| ConfigError {
            origin: name.to_string(),
            what: format!("key `{key}`: {what}"),
        };
        if self.gateway.id.contains("{hostname}") {
            self.gateway.id = self.gateway.id.replace("{hostname}", &hostname());
        }
        if self.gateway.id.is_empty() || self.gateway.id.contains(['/', '+', '#']) {
            return Err(err(
                "gateway.id",
                "must be non-empty and free of `/`, `+` and `#` (it is used in MQTT topics)".into(),
            ));
        }
        let id = self.gateway.id.clone();
        for s in self.sinks.iter_mut().filter(|s| s.kind == SinkKind::Mqtt) {
            if s.topic.is_empty() {
                s.topic = "tidepool/{gateway}/events".into();
            }
            if s.client_id.is_empty() {
                s.client_id = format!("tidepool-{{gateway}}-{}", s.name);
            }
            let status = s
                .status_topic
                .get_or_insert_with(|| "tidepool/{gateway}/status".into());
            *status = status.replace("{gateway}", &id);
            s.topic = s.topic.replace("{gateway}", &id);
            s.client_id = s.client_id.replace("{gateway}", &id);
        }
        for s in [
            &mut self.ingest.mqtt.client_id,
            &mut self.upstream.topic,
            &mut self.upstream.client_id,
            &mut self.commands.topic,
            &mut self.commands.result_topic,
            &mut self.commands.client_id,
        ] {
            *s = s.replace("{gateway}", &id);
        }
        if self.upstream.batch_max_events == 0 {
            return Err(err(
                "upstream.batch_max_events",
                "must be at least 1".into(),
            ));
        }
        if !(1024..=MQTT_MAX_PACKET).contains(&self.upstream.max_packet.0) {
            return Err(err(
                "upstream.max_packet",
                format!(
                    "must be between 1KiB and {MQTT_MAX_PACKET} B (MQTT's largest packet), e.g. \"128KB\""
                ),
            ));
        }
        if self.upstream.puback_timeout.0 < Duration::from_millis(100) {
            return Err(err(
                "upstream.puback_timeout",
                "must be at least 100ms, e.g. \"30s\"".into(),
            ));
        }
        // MQTT sends the keep-alive as whole seconds in 16 bits (0 would mean none).
        for (key, d) in [
            ("ingest.mqtt.keep_alive", self.ingest.mqtt.keep_alive.0),
            ("upstream.keep_alive", self.upstream.keep_alive.0),
        ] {
            if d < Duration::from_secs(1)
                || d > Duration::from_secs(u16::MAX.into())
                || d.subsec_nanos() != 0
            {
                return Err(err(
                    key,
                    "must be whole seconds from 1s to 65535s (MQTT's limit), e.g. \"30s\"".into(),
                ));
            }
        }
        if self.upstream.max_inflight == 0 {
            return Err(err("upstream.max_inflight", "must be at least 1".into()));
        }
        if self.buffer.commit_max_events == 0 {
            return Err(err("buffer.commit_max_events", "must be at least 1".into()));
        }
        if self.buffer.budget_max_wait.0 > std::time::Duration::from_secs(20) {
            return Err(err(
                "buffer.budget_max_wait",
                "must be at most 20s: sensors wait that long for acknowledgements, and the systemd watchdog for the commit loop".into(),
            ));
        }
        if let Some(url) = &self.upstream.url {
            parse_mqtt_url(url).map_err(|e| err("upstream.url", e))?;
        }
        if self.ingest.mqtt.mode == MqttMode::Client {
            parse_mqtt_url(&self.ingest.mqtt.broker).map_err(|e| err("ingest.mqtt.broker", e))?;
        }
        if self.ingest.mqtt.topics.is_empty() {
            return Err(err(
                "ingest.mqtt.topics",
                "needs at least one filter, e.g. [\"#\"]".into(),
            ));
        }
        let m = &self.ingest.mqtt;
        if m.tls_listen.is_some() && (m.tls_cert.is_none() || m.tls_key.is_none()) {
            return Err(err(
                "ingest.mqtt.tls_listen",
                "needs tls_cert and tls_key (PEM files) beside it".into(),
            ));
        }
        if !self.admin.listen.is_empty() && self.admin.addr().is_none() {
            return Err(err(
                "admin.listen",
                format!(
                    "`{}` is not an address; write e.g. \"127.0.0.1:9464\", or \"\" to disable",
                    self.admin.listen
                ),
            ));
        }
        if self.upstream.cert_file.as_os_str().is_empty()
            != self.upstream.key_file.as_os_str().is_empty()
        {
            return Err(err(
                "upstream.cert_file",
                "cert_file and key_file go together (mTLS); set both or neither".into(),
            ));
        }
        if !self.admin.token.is_empty() && !self.admin.token_file.as_os_str().is_empty() {
            return Err(err(
                "admin.token",
                "token and token_file are two ways to give one token; set one of them".into(),
            ));
        }
        if !self.admin.token.is_empty() {
            check_token(&self.admin.token).map_err(|e| err("admin.token", e))?;
        }
        if self.admin.max_connections == 0 {
            return Err(err("admin.max_connections", "must be at least 1".into()));
        }
        for (key, d) in [
            ("admin.io_timeout", self.admin.io_timeout),
            ("admin.reply_timeout", self.admin.reply_timeout),
        ] {
            if d.0.is_zero() {
                return Err(err(key, "must be more than 0, e.g. \"5s\"".into()));
            }
        }
        self.check_commands().map_err(|(k, w)| err(k, w))?;
        self.check_sinks().map_err(|(k, w)| err(&k, w))?;
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.ingest.serial.iter().enumerate() {
            if !names.insert(s.name.clone()) {
                return Err(err(
                    &format!("ingest.serial[{i}].name"),
                    format!("`{}` is used by two ports; names must be unique", s.name),
                ));
            }
        }
        Ok(())
    }

    /// `[[sink]]`: what serde cannot check.
    fn check_sinks(&self) -> Result<(), (String, String)> {
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.sinks.iter().enumerate() {
            let key = |k: &str| format!("sink[{i}].{k}");
            if s.name.is_empty()
                || s.name == crate::store::sinks::UPSTREAM
                || !s
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err((
                    key("name"),
                    format!(
                        "`{}`: a sink needs a name of letters, digits, - and _, other than `upstream` (the [upstream] broker's)",
                        s.name
                    ),
                ));
            }
            if !names.insert(s.name.clone()) {
                return Err((key("name"), format!("`{}` is used by two sinks", s.name)));
            }
            if s.kind == SinkKind::Mqtt {
                parse_mqtt_url(&s.url).map_err(|e| (key("url"), e))?;
                if !s.headers.is_empty() {
                    return Err((
                        key("headers"),
                        "headers are for kind = \"http\"; an MQTT sink takes username and password"
                            .into(),
                    ));
                }
                if s.topic.is_empty() || s.topic.contains(['+', '#']) {
                    return Err((
                        key("topic"),
                        format!("`{}` must be a topic without wildcards", s.topic),
                    ));
                }
                if let Some(p) = s.max_packet {
                    if !(1024..=MQTT_MAX_PACKET).contains(&p.0) {
                        return Err((
                            key("max_packet"),
                            format!("must be between 1KiB and {MQTT_MAX_PACKET} B, e.g. \"128KB\""),
                        ));
                    }
                }
                if s.max_inflight == Some(0) {
                    return Err((key("max_inflight"), "must be at least 1".into()));
                }
                if s.status_topic
                    .as_deref()
                    .is_some_and(|t| t.contains(['+', '#']))
                {
                    return Err((
                        key("status_topic"),
                        "must be a topic without wildcards, or \"\" for none".into(),
                    ));
                }
                self.check_mqtt_sink(i, s).map_err(|(k, w)| (key(k), w))?;
            } else {
                // The message may quote the URL, whose query can hold a key (`?code=...`).
                crate::forward::http::HttpUrl::parse(&s.url).map_err(|e| {
                    let e = if s.url.contains('?') {
                        e.replace(&s.url, "<the url, not shown: its query may hold a key>")
                    } else {
                        e
                    };
                    (key("url"), e)
                })?;
                for (k, set) in [
                    ("topic", !s.topic.is_empty()),
                    ("client_id", !s.client_id.is_empty()),
                    ("status_topic", s.status_topic.is_some()),
                    ("username", !s.username.is_empty()),
                    ("password", !s.password.is_empty()),
                    ("protocol", s.protocol.is_some()),
                    ("max_packet", s.max_packet.is_some()),
                    ("max_inflight", s.max_inflight.is_some()),
                    ("drain", s.drain.is_some()),
                ] {
                    if set {
                        return Err((
                            key(k),
                            "is for kind = \"mqtt\" sinks (an HTTP sink sends credentials in headers)"
                                .into(),
                        ));
                    }
                }
            }
            for (h, v) in &s.headers {
                crate::forward::http::check_header(h, v)
                    .map_err(|e| (key("headers"), format!("`{h}`: {e}")))?;
            }
            if s.topics.is_empty() {
                return Err((
                    key("topics"),
                    "needs at least one filter, e.g. [\"#\"]".into(),
                ));
            }
            for f in &s.topics {
                if !crate::broker::router::valid_filter(f) {
                    return Err((key("topics"), format!("`{f}` is not an MQTT topic filter")));
                }
            }
            if s.batch_max_events == 0 {
                return Err((key("batch_max_events"), "must be at least 1".into()));
            }
            if s.timeout.0 < Duration::from_millis(100) {
                return Err((
                    key("timeout"),
                    "must be at least 100ms, e.g. \"10s\"".into(),
                ));
            }
            if s.cert_file.as_os_str().is_empty() != s.key_file.as_os_str().is_empty() {
                return Err((
                    key("cert_file"),
                    "cert_file and key_file go together (mTLS); set both or neither".into(),
                ));
            }
        }
        Ok(())
    }

    /// A `kind = "mqtt"` sink against the other MQTT connections: a client id of its own (a
    /// broker drops a session when another takes its id), and on a broker another sink or
    /// `[upstream]` publishes to, a batch topic and a status topic of its own.
    fn check_mqtt_sink(&self, i: usize, s: &SinkConfig) -> Result<(), (&'static str, String)> {
        let mut ids = vec![
            ("upstream.client_id", self.upstream.client_id.clone()),
            ("ingest.mqtt.client_id", self.ingest.mqtt.client_id.clone()),
        ];
        if self.commands.enabled {
            ids.push(("commands.client_id", self.commands.client_id.clone()));
            ids.push((
                "commands.client_id (its local connection)",
                format!("{}-local", self.commands.client_id),
            ));
        }
        let endpoint = |url: &str| parse_mqtt_url(url).ok().map(|u| (u.host, u.port));
        let mine = endpoint(&s.url);
        // (whose, batch topic, status topic) of every earlier MQTT sink on this broker.
        let mut same_broker = Vec::new();
        if let Some(u) = &self.upstream.url {
            if endpoint(u) == mine {
                same_broker.push((
                    "[upstream]".to_string(),
                    self.upstream.topic.clone(),
                    crate::forward::status_topic(&self.gateway.id),
                ));
            }
        }
        for o in self.sinks[..i].iter().filter(|o| o.kind == SinkKind::Mqtt) {
            ids.push(("the client_id of an earlier sink", o.client_id.clone()));
            if endpoint(&o.url) == mine {
                same_broker.push((
                    format!("sink `{}`", o.name),
                    o.topic.clone(),
                    o.status_topic.clone().unwrap_or_default(),
                ));
            }
        }
        if let Some((whose, _)) = ids.iter().find(|(_, id)| *id == s.client_id) {
            return Err((
                "client_id",
                format!(
                    "`{}` is {whose} too: a broker drops a session when another client takes its id; give this sink its own",
                    s.client_id
                ),
            ));
        }
        for (whose, topic, status) in same_broker {
            if topic == s.topic {
                return Err((
                    "topic",
                    format!(
                        "`{topic}` is where {whose} publishes its batches on the same broker: two batch sequences would interleave on one topic; set another topic"
                    ),
                ));
            }
            if !status.is_empty() && s.status_topic.as_deref() == Some(status.as_str()) {
                return Err((
                    "status_topic",
                    format!(
                        "`{status}` is {whose}'s status topic on the same broker: one connection's last will would say `offline` while the other is up; set another, or \"\" for none"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The sinks in the order the store and the forwarders number them: `upstream` first
    /// when `[upstream] url` is set, then each `[[sink]]`.
    pub fn sink_specs(&self) -> Vec<crate::store::sinks::SinkSpec> {
        let mut v = Vec::new();
        if self.upstream.url.is_some() {
            v.push(crate::store::sinks::SinkSpec::all(
                crate::store::sinks::UPSTREAM,
            ));
        }
        for s in &self.sinks {
            v.push(crate::store::sinks::SinkSpec {
                name: s.name.clone(),
                filters: s.topics.clone(),
            });
        }
        v
    }

    /// `[commands]`: what serde cannot check.
    fn check_commands(&self) -> Result<(), (&'static str, String)> {
        let c = &self.commands;
        if !c.enabled {
            return Ok(());
        }
        if self.upstream.url.is_none() {
            return Err((
                "commands.enabled",
                "commands come over the upstream broker: set [upstream] url too".into(),
            ));
        }
        let prefix = c.prefix();
        if !c.topic.ends_with("/#") || prefix.contains(['+', '#']) || prefix.len() < 2 {
            return Err((
                "commands.topic",
                format!(
                    "`{}` must be a topic ending in \"/#\" with no other wildcard, e.g. \"tidepool/{{gateway}}/commands/#\"",
                    c.topic
                ),
            ));
        }
        if c.result_topic.is_empty() || c.result_topic.contains(['+', '#']) {
            return Err((
                "commands.result_topic",
                "must be a topic without wildcards".into(),
            ));
        }
        if c.client_id.is_empty() || c.client_id == self.upstream.client_id {
            return Err((
                "commands.client_id",
                "must be set and differ from upstream.client_id (commands have a connection of their own)".into(),
            ));
        }
        for f in &c.allow {
            if !crate::broker::router::valid_filter(f) {
                return Err((
                    "commands.allow",
                    format!("`{f}` is not an MQTT topic filter"),
                ));
            }
        }
        if c.local_prefix.contains(['+', '#']) {
            return Err(("commands.local_prefix", "must not hold wildcards".into()));
        }
        if c.max_age.0.is_zero() {
            return Err((
                "commands.max_age",
                "must be more than 0, e.g. \"10m\"".into(),
            ));
        }
        Ok(())
    }

    /// The store file inside `data_dir`.
    pub fn store_path(&self) -> PathBuf {
        self.gateway.data_dir.join("tidepool.redb")
    }
}

const DEFAULTS_NAME: &str = "built-in defaults";

mod renamed;

/// A parsed `mqtt://HOST:PORT` or `mqtts://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttUrl {
    /// Whether to use TLS.
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// Port (1883 / 8883 when not given).
    pub port: u16,
}

/// Parses an MQTT URL; the error says what would be right. A URL is shown in logs, `status`
/// and messages, so credentials in it (`user:password@`) are refused, and that message does
/// not repeat the URL.
pub fn parse_mqtt_url(url: &str) -> Result<MqttUrl, String> {
    if url.contains('@') {
        return Err("holds credentials (`user:password@`); set `username` and `password` beside it instead: a URL is logged, they are not".into());
    }
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!(
            "`{url}` must start with mqtt:// or mqtts://, e.g. \"mqtts://broker.example.com:8883\""
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("`{url}`: port `{p}` is not a number from 1 to 65535"))?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    Ok(MqttUrl {
        tls,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
    })
}

/// Merges `over` into `base`: tables recursively, anything else replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Best-effort line of `key` (dotted path, `ingest.serial[1].path` for the second
/// `[[ingest.serial]]`) in the user's file, for messages.
pub(crate) fn find_line(text: &str, key: &str) -> Option<usize> {
    let parts: Vec<&str> = key.split('.').collect();
    let leaf = parts.last()?.split('[').next()?;
    let section_parts = &parts[..parts.len().saturating_sub(1)];
    // Which occurrence of an array-of-tables header, e.g. `serial[1]`.
    let nth: usize = section_parts
        .last()
        .and_then(|p| p.split_once('['))
        .and_then(|(_, i)| i.trim_end_matches(']').parse().ok())
        .unwrap_or(0);
    let section: Vec<&str> = section_parts
        .iter()
        .map(|p| p.split('[').next().unwrap_or(p))
        .collect();
    let section = section.join(".");
    let mut in_section = section.is_empty();
    let mut seen = 0;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            let name = t.trim_matches(|c| c == '[' || c == ']').trim();
            in_section = name == section;
            if in_section {
                seen += 1;
                in_section = seen == nth + 1;
            }
            if in_section && leaf.is_empty() {
                return Some(i + 1);
            }
            continue;
        }
        if in_section {
            if let Some((k, _)) = t.split_once('=') {
                if k.trim().trim_matches('"') == leaf {
                    return Some(i + 1);
                }
            }
        }
    }
    // The key may be the section itself (e.g. an unknown section).
    text.lines()
        .position(|l| l.trim().trim_matches(|c| c == '[' || c == ']') == key)
        .map(|i| i + 1)
}

/// This machine's hostname, or `tidepool` when it cannot be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "tidepool".to_string())
}

/// A key/value view of the effective config, for `tidepool check`.
pub fn summary(cfg: &Config) -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    m.insert("gateway.id", cfg.gateway.id.clone());
    m.insert(
        "gateway.data_dir",
        cfg.gateway.data_dir.display().to_string(),
    );
    m.insert(
        "ingest.mqtt.mode",
        format!("{:?}", cfg.ingest.mqtt.mode).to_lowercase(),
    );
    m.insert(
        "upstream.url",
        cfg.upstream
            .url
            .clone()
            .unwrap_or_else(|| "(none: buffer only)".into()),
    );
    m.insert("buffer.max_bytes", cfg.buffer.max_bytes.to_string());
    m.insert(
        "commands",
        if cfg.commands.enabled {
            format!(
                "on: {} (allow {:?})",
                cfg.commands.topic, cfg.commands.allow
            )
        } else {
            "off".into()
        },
    );
    m.insert("rules.dir", cfg.rules.dir.display().to_string());
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn upstream_protocol_drain_and_drain_rate_parse() {
        let c = Config::defaults();
        assert_eq!(c.upstream.protocol, Protocol::V5);
        assert_eq!(c.upstream.drain, Drain::LiveFirst);
        assert_eq!(c.upstream.drain_rate, DrainRate::Unlimited);
        assert_eq!(
            c.upstream.compression,
            crate::forward::compress::Compression::None
        );
        for (text, want) in [
            ("2000/s", DrainRate::Events(2000)),
            ("500 events/s", DrainRate::Events(500)),
            ("64KiB/s", DrainRate::Bytes(65_536)),
            ("1MB/s", DrainRate::Bytes(1_000_000)),
            ("unlimited", DrainRate::Unlimited),
        ] {
            assert_eq!(DrainRate::parse(text), Ok(want), "{text}");
        }
        for bad in ["2000", "0/s", "fast", "-1/s", "KiB/s"] {
            assert!(DrainRate::parse(bad).is_err(), "{bad}");
        }
        let c = Config::from_str_named(
            "c.toml",
            "[upstream]\nprotocol = \"3.1.1\"\ndrain = \"fifo\"\ndrain_rate = \"10/s\"\ncompression = \"gzip\"\n",
        )
        .unwrap();
        assert_eq!(c.upstream.protocol, Protocol::V311);
        assert_eq!(c.upstream.drain, Drain::Fifo);
        assert_eq!(c.upstream.drain_rate, DrainRate::Events(10));
        let e = Config::from_str_named("c.toml", "[upstream]\nprotocol = \"4\"\n").unwrap_err();
        assert!(e.to_string().contains("upstream.protocol"), "{e}");
        let e =
            Config::from_str_named("c.toml", "[upstream]\ndrain_rate = \"soon\"\n").unwrap_err();
        assert!(e.to_string().contains("not a drain rate"), "{e}");
    }

    #[test]
    fn sinks_of_each_kind_take_their_own_keys() {
        let c = Config::from_str_named(
            "c.toml",
            "[gateway]\nid = \"g1\"\n[[sink]]\nname = \"b2\"\nkind = \"mqtt\"\nurl = \"mqtts://b2.example:8883\"\n\
             topics = [\"alerts/#\"]\nusername = \"u\"\npassword = \"p\"\nprotocol = \"3.1.1\"\ntimeout = \"5s\"\nmax_packet = \"64KiB\"\n\
             [[sink]]\nname = \"fn\"\nkind = \"http\"\nurl = \"http://127.0.0.1:9/x\"\n",
        )
        .unwrap();
        let b2 = &c.sinks[0];
        assert_eq!(b2.kind, SinkKind::Mqtt);
        // Defaults: [upstream]'s topic, a client id of its own.
        assert_eq!(b2.topic, "tidepool/g1/events");
        assert_eq!(b2.client_id, "tidepool-g1-b2");
        let u = b2.upstream_config();
        assert_eq!(u.url.as_deref(), Some("mqtts://b2.example:8883"));
        assert_eq!(u.protocol, Protocol::V311);
        assert_eq!(u.puback_timeout.0, Duration::from_secs(5));
        assert_eq!((u.username.as_str(), u.password.as_str()), ("u", "p"));
        assert_eq!(u.max_packet, ByteSize(64 * 1024));
        assert_eq!(u.max_inflight, Config::defaults().upstream.max_inflight);
        assert_eq!(u.drain, Drain::LiveFirst);
        assert_eq!(c.sinks[1].kind, SinkKind::Http);
        assert_eq!(
            c.sink_specs()
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["b2", "fn"]
        );
        for (text, key) in [
            ("kind = \"mqtt\"\nurl = \"http://x/y\"", "sink[0].url"),
            (
                "kind = \"mqtt\"\nurl = \"mqtt://x\"\nheaders = { a = \"b\" }",
                "sink[0].headers",
            ),
            (
                "kind = \"mqtt\"\nurl = \"mqtt://x\"\ntopic = \"a/#\"",
                "sink[0].topic",
            ),
            (
                "kind = \"mqtt\"\nurl = \"mqtt://x\"\nmax_inflight = 0",
                "sink[0].max_inflight",
            ),
            (
                "kind = \"http\"\nurl = \"http://x/y\"\ntopic = \"a\"",
                "sink[0].topic",
            ),
            (
                "kind = \"http\"\nurl = \"http://x/y\"\npassword = \"p\"",
                "sink[0].password",
            ),
            ("kind = \"http\"\nurl = \"mqtt://x\"", "sink[0].url"),
            (
                "kind = \"http\"\nurl = \"http://x/y\"\ndrain = \"fifo\"",
                "sink[0].drain",
            ),
            (
                "kind = \"mqtt\"\nurl = \"mqtt://x\"\nstatus_topic = \"a/+\"",
                "sink[0].status_topic",
            ),
            // Another connection's client id.
            (
                "kind = \"mqtt\"\nurl = \"mqtt://x\"\nclient_id = \"tidepool-{gateway}\"",
                "sink[0].client_id",
            ),
        ] {
            let e = Config::from_str_named("c.toml", &format!("[[sink]]\nname = \"s\"\n{text}\n"))
                .unwrap_err();
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn an_mqtt_sink_on_the_upstream_broker_needs_topics_of_its_own() {
        let base = "[gateway]\nid = \"g1\"\n[upstream]\nurl = \"mqtt://h:1883\"\n\
                    [[sink]]\nname = \"b\"\nkind = \"mqtt\"\nurl = \"mqtt://h\"\n";
        let e = Config::from_str_named("c.toml", base)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sink[0].topic") && e.contains("[upstream]"),
            "{e}"
        );
        let e = Config::from_str_named("c.toml", &format!("{base}topic = \"b/{{gateway}}\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sink[0].status_topic"), "{e}");
        let c = Config::from_str_named(
            "c.toml",
            &format!("{base}topic = \"b/{{gateway}}\"\nstatus_topic = \"\"\n"),
        )
        .unwrap();
        assert_eq!(c.sinks[0].topic, "b/g1");
        assert_eq!(c.sinks[0].status_topic.as_deref(), Some(""));
        // Another broker: the defaults are fine.
        let c = Config::from_str_named("c.toml", &base.replace("mqtt://h\"", "mqtt://other\""))
            .unwrap();
        assert_eq!(
            c.sinks[0].status_topic.as_deref(),
            Some("tidepool/g1/status")
        );
        // Two sinks: not one client id, not one topic on one broker.
        let two = "[[sink]]\nname = \"a\"\nkind = \"mqtt\"\nurl = \"mqtt://o\"\nclient_id = \"x\"\n\
                   [[sink]]\nname = \"b\"\nkind = \"mqtt\"\nurl = \"mqtt://p\"\nclient_id = \"x\"\n";
        let e = Config::from_str_named("c.toml", two)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sink[1].client_id"), "{e}");
    }

    #[test]
    fn defaults_parse_and_expand() {
        let c = Config::defaults();
        assert!(!c.gateway.id.contains('{'));
        assert_eq!(c.upstream.batch_max_events, 500);
        assert_eq!(c.upstream.batch_max_bytes, ByteSize(256 * 1024));
        assert_eq!(c.upstream.batch_max_wait.0, Duration::from_secs(1));
        assert_eq!(
            c.upstream.max_packet,
            ByteSize(128_000),
            "under AWS IoT's 128 KB"
        );
        assert_eq!(c.upstream.puback_timeout.0, Duration::from_secs(30));
        assert_eq!(c.buffer.max_age.0, Duration::from_secs(7 * 86400));
        assert_eq!(c.buffer.when_full, WhenFull::DropOldest);
        assert!(c.upstream.url.is_none());
        assert_eq!(c.ingest.mqtt.mode, MqttMode::Embedded);
        assert!(c.upstream.topic.ends_with("/events") && !c.upstream.topic.contains('{'));
    }

    #[test]
    fn user_keys_override_defaults() {
        let c = Config::from_str_named(
            "t.toml",
            "[gateway]\nid = \"pi-1\"\n[upstream]\nurl = \"mqtt://127.0.0.1:1999\"\nbatch_max_events = 10\n",
        )
        .unwrap();
        assert_eq!(c.gateway.id, "pi-1");
        assert_eq!(c.upstream.topic, "tidepool/pi-1/events");
        assert_eq!(c.upstream.batch_max_events, 10);
        assert_eq!(c.upstream.batch_max_wait.0, Duration::from_secs(1));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = Config::from_str_named(
            "t.toml",
            "[upstream]\nurl = \"mqtt://h:1\"\nbatch_max_event = 3\n",
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("t.toml:3: key `upstream.batch_max_event`"),
            "{s}"
        );
        assert!(
            s.contains("unknown field") && s.contains("batch_max_events"),
            "{s}"
        );
    }

    #[test]
    fn bad_values_say_what_would_be_right() {
        let e =
            Config::from_str_named("c.toml", "[buffer]\nmax_bytes = \"12 parsecs\"\n").unwrap_err();
        assert!(e.to_string().contains("buffer.max_bytes"), "{e}");
        assert!(e.to_string().contains("KiB"), "{e}");
        let e = Config::from_str_named("c.toml", "[buffer]\nwhen_full = \"drop_newest\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("drop_oldest"), "{e}");
        let e = Config::from_str_named("c.toml", "[upstream]\nurl = \"http://x\"\n").unwrap_err();
        assert!(e.to_string().contains("mqtt://"), "{e}");
        let e = Config::from_str_named("c.toml", "[upstream]\nmax_packet = 100\n").unwrap_err();
        assert!(e.to_string().contains("upstream.max_packet"), "{e}");
        let e =
            Config::from_str_named("c.toml", "[upstream]\npuback_timeout = \"0s\"\n").unwrap_err();
        assert!(e.to_string().contains("upstream.puback_timeout"), "{e}");
        let e = Config::from_str_named("c.toml", "[ingest.mqtt]\nkeep_alive = \"500ms\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("ingest.mqtt.keep_alive"), "{e}");
        for bad in ["1500ms", "65536s", "1d"] {
            for table in ["ingest.mqtt", "upstream"] {
                let e = Config::from_str_named(
                    "c.toml",
                    &format!("[{table}]\nkeep_alive = \"{bad}\"\n"),
                )
                .unwrap_err();
                assert!(
                    e.to_string().contains(&format!("{table}.keep_alive")),
                    "{e}"
                );
            }
        }
        let e = Config::from_str_named("c.toml", "[rules]\ntick = \"soon\"\n").unwrap_err();
        assert!(e.to_string().contains("rules.tick"), "{e}");
        let e = Config::from_str_named("c.toml", "[gateway\n").unwrap_err();
        assert!(e.to_string().contains("not valid TOML"), "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(ByteSize::parse("64KiB").unwrap().0, 65536);
        assert_eq!(ByteSize::parse("2MB").unwrap().0, 2_000_000);
        assert_eq!(ByteSize::parse("100").unwrap().0, 100);
        assert!(ByteSize::parse("1 XB").is_err());
        assert_eq!(
            HumanDuration::parse("250ms").unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(
            HumanDuration::parse("1m30s").unwrap().0,
            Duration::from_secs(90)
        );
        assert!(HumanDuration::parse("5").is_err());
        assert_eq!(ByteSize(512 << 20).to_string(), "512MiB");
    }

    #[test]
    fn a_tls_listener_without_its_files_is_an_error_naming_the_key() {
        let e =
            Config::from_str_named("c.toml", "[ingest.mqtt]\ntls_listen = \"127.0.0.1:8883\"\n")
                .unwrap_err();
        assert!(e.to_string().contains("ingest.mqtt.tls_listen"), "{e}");
    }

    #[test]
    fn huge_durations_and_sizes_are_errors_naming_the_key() {
        for text in [
            "[rules]\ntick = \"99999999999999999999d\"\n",
            "[rules]\ntick = \"36501d\"\n",
            "[rules]\ntick = \"36500d1s\"\n",
        ] {
            let e = Config::from_str_named("c.toml", text)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("c.toml:2: key `rules.tick`"), "{e}");
            assert!(e.contains("too long") && e.contains("36500d"), "{e}");
        }
        assert_eq!(
            HumanDuration::parse("36500d").unwrap().0,
            HumanDuration::MAX
        );
        let e = Config::from_str_named(
            "c.toml",
            "[buffer]\nmax_bytes = \"99999999999999999999GiB\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("buffer.max_bytes") && e.contains("too large"),
            "{e}"
        );
    }

    #[test]
    fn admin_token_keys() {
        let c = Config::from_str_named("c.toml", "[admin]\ntoken = \"abc123\"\n").unwrap();
        assert_eq!(c.admin.token().unwrap().as_deref(), Some("abc123"));
        assert_eq!(Config::defaults().admin.token().unwrap(), None);
        let e = Config::from_str_named("c.toml", "[admin]\ntoken = \"a b\"\n").unwrap_err();
        assert!(e.to_string().contains("admin.token"), "{e}");
        let e = Config::from_str_named("c.toml", "[admin]\ntoken = \"a\"\ntoken_file = \"/t\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("set one of them"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "from-a-file\n").unwrap();
        let c = Config::from_str_named(
            "c.toml",
            &format!("[admin]\ntoken_file = \"{}\"\n", f.display()),
        )
        .unwrap();
        assert_eq!(c.admin.token().unwrap().as_deref(), Some("from-a-file"));
        std::fs::remove_file(&f).unwrap();
        let e = c.admin.token().unwrap_err();
        assert!(e.starts_with("key `admin.token_file`: cannot read"), "{e}");
        assert_eq!(c.admin.client_token(), None);
    }

    #[test]
    fn lines_of_keys_in_the_nth_array_table() {
        let text = "[[ingest.serial]]\nname = \"a\"\npath = \"/a\"\n\n[[ingest.serial]]\nname = \"b\"\npath = \"/b\"\n";
        assert_eq!(find_line(text, "ingest.serial[0].path"), Some(3));
        assert_eq!(find_line(text, "ingest.serial[1].path"), Some(7));
    }

    #[test]
    fn no_message_shows_a_password_or_token() {
        let secret = "hunter2-x9";
        for text in [
            // Unterminated string: the parser would quote the line.
            "[upstream]\nurl = \"mqtt://h:1\"\npassword = \"hunter2-x9\n",
            "[ingest.mqtt]\nusers = [{ username = \"u\", password = hunter2-x9 }]\n",
            "[admin]\ntoken = \"hunter2-x9\" x\n",
            // A wrong type: serde would quote the value.
            "[upstream]\nusername = \"u\"\npassword = [\"hunter2-x9\"]\n",
            "[ingest.mqtt]\nusers = [{ username = \"u\", password = { v = \"hunter2-x9\" } }]\n",
            "[upstream]\nurl = \"mqtts://u:hunter2-x9@h:8883\"\n",
        ] {
            let e = Config::from_str_named("FILE", text)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("FILE"), "{e}");
            assert!(!e.contains(secret), "{text}: {e}");
        }
        // Other lines are still quoted.
        let e = Config::from_str_named("FILE", "[upstream]\nurl = \"mqtt://h:1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("url = \"mqtt://h:1"), "{e}");
    }

    #[test]
    fn urls() {
        let u = parse_mqtt_url("mqtts://broker.example.com").unwrap();
        assert!(u.tls && u.port == 8883 && u.host == "broker.example.com");
        let u = parse_mqtt_url("mqtt://127.0.0.1:1999").unwrap();
        assert!(!u.tls && u.port == 1999);
        assert!(parse_mqtt_url("tcp://x:1").is_err());
        assert!(parse_mqtt_url("mqtt://x:notaport").is_err());
        for with_password in [
            "mqtts://gw:hunter2@h:8883",
            "mqtt://gw:hunter2@h",
            "gw:hunter2@h",
        ] {
            let e = parse_mqtt_url(with_password).unwrap_err();
            assert!(
                e.contains("`username` and `password`") && !e.contains("hunter2"),
                "{e}"
            );
        }
    }

    #[test]
    fn serial_ports_get_defaults() {
        let c = Config::from_str_named(
            "s.toml",
            "[[ingest.serial]]\nname = \"uart0\"\npath = \"/dev/ttyUSB0\"\n",
        )
        .unwrap();
        assert_eq!(c.ingest.serial[0].baud, 115200);
        assert_eq!(c.ingest.serial[0].framing, Framing::Lines);
    }

    // -- hostile input -----------------------------------------------------------------------

    /// Every (table, key) of the built-in defaults, and a serial port's keys.
    fn known_keys() -> Vec<(String, String)> {
        fn walk(t: &toml::Table, at: &str, out: &mut Vec<(String, String)>) {
            for (k, v) in t {
                match v {
                    toml::Value::Table(sub) => walk(
                        sub,
                        &if at.is_empty() {
                            k.clone()
                        } else {
                            format!("{at}.{k}")
                        },
                        out,
                    ),
                    _ => out.push((at.to_string(), k.clone())),
                }
            }
        }
        let mut out = Vec::new();
        walk(&DEFAULTS.parse().unwrap(), "", &mut out);
        for k in [
            "name",
            "path",
            "baud",
            "framing",
            "topic",
            "max_frame",
            "ack",
            "bogus",
        ] {
            out.push(("ingest.serial[]".into(), k.into()));
        }
        out
    }

    /// A TOML value of any type, leaning to what config values look like.
    fn any_toml() -> impl Strategy<Value = toml::Value> {
        let leaf = prop_oneof![
            prop_oneof![
                Just(""),
                Just("1s"),
                Just("0s"),
                Just("64KiB"),
                Just("0"),
                Just("-1"),
                Just("1e3"),
                Just("18446744073709551616B"),
                Just("9999999999d"),
                Just("mqtt://h:1"),
                Just("mqtts://"),
                Just("127.0.0.1:1"),
                Just("[::1]:99999"),
                Just("{gateway}"),
                Just("{hostname}/x"),
                Just("#"),
                Just("embedded"),
                Just("client"),
                Just("cobs"),
                Just("reject_new"),
                Just("\0"),
                Just("é"),
            ]
            .prop_map(|s| toml::Value::String(s.into())),
            "\\PC{0,20}".prop_map(toml::Value::String),
            any::<i64>().prop_map(toml::Value::Integer),
            prop_oneof![
                Just(0i64),
                Just(1),
                Just(-1),
                Just(65_536),
                Just(u32::MAX as i64 + 1)
            ]
            .prop_map(toml::Value::Integer),
            prop_oneof![
                any::<f64>(),
                Just(f64::NAN),
                Just(f64::INFINITY),
                Just(-0.0)
            ]
            .prop_map(toml::Value::Float),
            any::<bool>().prop_map(toml::Value::Boolean),
        ];
        leaf.prop_recursive(2, 12, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
                proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
            ]
        })
    }

    /// Puts `v` at `table.key` of `doc` (`x[]` tables: into the first of an array of tables),
    /// unless something that is not a table is in the way.
    fn put(doc: &mut toml::Table, table: &str, key: &str, v: toml::Value) {
        let mut t = doc;
        for part in table.split('.').filter(|p| !p.is_empty()) {
            let (name, array) = match part.strip_suffix("[]") {
                Some(n) => (n, true),
                None => (part, false),
            };
            let slot = t.entry(name.to_string()).or_insert_with(|| {
                if array {
                    toml::Value::Array(vec![toml::Value::Table(toml::Table::new())])
                } else {
                    toml::Value::Table(toml::Table::new())
                }
            });
            t = match slot {
                toml::Value::Table(sub) => sub,
                toml::Value::Array(a) => match a.first_mut() {
                    Some(toml::Value::Table(sub)) => sub,
                    _ => return,
                },
                _ => return,
            };
        }
        t.insert(key.to_string(), v);
    }

    /// A config error must say where (the file, maybe a line of it) and name the key.
    fn check_error(e: &ConfigError, name: &str, text: &str) -> Result<(), TestCaseError> {
        prop_assert!(e.origin.starts_with(name), "origin {:?}", e.origin);
        if let Some(line) = e.origin.strip_prefix(&format!("{name}:")) {
            let line: usize = line
                .parse()
                .map_err(|_| TestCaseError::fail(format!("origin {:?}", e.origin)))?;
            prop_assert!(
                line >= 1 && line <= text.lines().count(),
                "line {} of {}",
                line,
                e.origin
            );
        }
        prop_assert!(!e.what.is_empty());
        prop_assert!(!e.to_string().is_empty());
        Ok(())
    }

    proptest! {
        #![proptest_config(crate::fuzz::cases(1000))]

        /// Valid TOML with random keys (known ones, unknown ones, tables where values go and
        /// values where tables go) holding values of random types: loading never panics, and a
        /// refusal names the file (with a line when it has one) and the key.
        #[test]
        fn fuzz_random_toml_documents_load_or_name_the_key(
            entries in proptest::collection::vec(
                (any::<prop::sample::Index>(), "[a-z_]{1,8}", any::<bool>(), any_toml()),
                0..12,
            ),
        ) {
            let keys = known_keys();
            let mut doc = toml::Table::new();
            for (i, unknown, use_unknown, v) in entries {
                let (table, key) = &keys[i.index(keys.len())];
                if use_unknown {
                    // An unknown key in a known table, or a known table's key as a table.
                    put(&mut doc, table, &unknown, v);
                } else {
                    put(&mut doc, table, key, v);
                }
            }
            let text = toml::to_string(&doc).unwrap();
            match Config::from_str_named("fuzz.toml", &text) {
                Ok(_) => {}
                Err(e) => {
                    check_error(&e, "fuzz.toml", &text)?;
                    prop_assert!(e.what.starts_with("key `"), "{}\n--\n{}", e, text);
                }
            }
        }

        /// Random bytes, and the built-in defaults with random bytes changed: never a panic;
        /// a refusal names the file.
        #[test]
        fn fuzz_random_and_mutated_config_text_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let text = String::from_utf8_lossy(&bytes);
            if let Err(e) = Config::from_str_named("fuzz.toml", &text) {
                check_error(&e, "fuzz.toml", &text)?;
            }
            let mut defaults = DEFAULTS.as_bytes().to_vec();
            for (i, b) in &changes {
                let i = i.index(defaults.len());
                defaults[i] = *b;
            }
            let text = String::from_utf8_lossy(&defaults);
            if let Err(e) = Config::from_str_named("fuzz.toml", &text) {
                check_error(&e, "fuzz.toml", &text)?;
            }
        }
    }

    #[test]
    fn a_config_file_that_is_not_utf8_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, b"[gateway]\nid = \"\xff\"\n").unwrap();
        let e = Config::load(Some(&path)).unwrap_err();
        assert_eq!(e.origin, path.display().to_string());
        assert!(e.what.contains("cannot read"), "{e}");
    }

    #[test]
    fn commands_are_off_by_default_and_checked_when_on() {
        let c = Config::from_str_named("c.toml", "[gateway]\nid = \"g1\"\n").unwrap();
        assert!(!c.commands.enabled);
        assert_eq!(c.commands.topic, "tidepool/g1/commands/#");
        assert_eq!(c.commands.prefix(), "tidepool/g1/commands/");
        assert_eq!(c.commands.result_topic, "tidepool/g1/commands/result");
        assert!(c.commands.allow.is_empty());
        let on = |extra: &str| {
            Config::from_str_named(
                "c.toml",
                &format!("[upstream]\nurl = \"mqtt://127.0.0.1:1883\"\n[commands]\nenabled = true\n{extra}"),
            )
        };
        assert!(on("allow = [\"actuators/#\", \"serial/uart0\"]").is_ok());
        let e = Config::from_str_named("c.toml", "[commands]\nenabled = true\n").unwrap_err();
        assert!(e.what.contains("[upstream] url"), "{e}");
        for (extra, key) in [
            ("topic = \"cmds\"", "commands.topic"),
            ("topic = \"a/+/b/#\"", "commands.topic"),
            ("result_topic = \"r/#\"", "commands.result_topic"),
            ("client_id = \"tidepool-{gateway}\"", "commands.client_id"),
            ("allow = [\"a/#/b\"]", "commands.allow"),
            ("max_age = \"0s\"", "commands.max_age"),
        ] {
            let e = on(extra).unwrap_err();
            assert!(e.what.contains(key), "{extra}: {e}");
        }
    }
}
