//! Commands from the cloud (`[commands]`): taken from the upstream broker, stored before their
//! PUBACK, delivered to a local topic or a serial port, answered with a result.
//!
//! ```text
//! upstream ─ tidepool/{gateway}/commands/TARGET ─> store (commands table) ─PUBACK─> upstream
//!                                                   │
//!                         local broker (TARGET) <───┴───> serial/NAME (a line or a cobs frame)
//! result ─ tidepool/{gateway}/commands/result ─> upstream (QoS 1; done when PUBACKed)
//! ```
//! A connection of its own (MQTT 3.1.1, which every broker speaks; `clean_session = false`, a
//! stable client id, manual acks), so the broker keeps the subscription and every unacknowledged
//! command while the gateway is away, and the batch connection's bookkeeping is untouched.
//!
//! A command is a JSON object `{"id": "...", "payload": ANY, "ts"?: ms}` published to
//! `PREFIX/TARGET`. Its life ([`crate::store::commands`]): stored (one commit), then the
//! PUBACK; delivered; its result stored (one commit); the result published at QoS 1; after the
//! broker's PUBACK of the result, done (one commit). A crash anywhere repeats the step it
//! interrupted and nothing before it: a command the broker resends because its PUBACK was lost
//! is recognised by its id and not delivered again; a command delivered but whose result was
//! not stored yet is delivered again (at least once to its target); a result may be published
//! twice. Results carry the command's id, so the cloud dedupes them.
//!
//! Three tasks, as rumqttc wants (the task polling the event loop must not wait on its request
//! channel): the poller, the worker (stores, acknowledges, delivers, publishes results) and a
//! subscriber after each CONNACK. PUBACKs go through the ingest client's [`AckGate`], so a
//! PUBACK for a message of an earlier connection is never written on a later one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, MqttOptions, Outgoing, Packet, Publish, QoS, SubscribeReasonCode,
};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::admin::metrics::{CommandsInfo, Metrics};
use crate::broker::router::{matches, valid_topic};
use crate::config::{CommandsConfig, Config, Framing};
use crate::event::now_ms;
use crate::ingest::client::{AckGate, AckToken, Admit};
use crate::ingest::serial::PortOut;
use crate::shutdown::Shutdown;
use crate::store::commands::{Applied, CommandOp, CommandRow, CommandState};
use crate::store::commit::Control;
use crate::store::Store;

/// The local broker commands go to.
pub enum Local {
    /// The embedded broker: delivered when queued to a session (a subscriber's, online or
    /// with a persistent session); with no subscriber it is tried again until `max_age`.
    Embedded(crate::broker::Broker),
    /// The broker ingest subscribes to (client mode): delivered at its PUBACK, through a
    /// connection of the commands' own.
    Client(LocalClient),
}

/// A QoS 1 publisher on the ingest broker, one publish at a time.
pub struct LocalClient {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<LocalEv>,
    own: crate::ingest::OwnPublishes,
}

enum LocalEv {
    Sent(u16),
    PubAck(u16),
    Lost,
}

impl LocalClient {
    /// Connects to `[ingest.mqtt] broker` as `[commands] client_id` + `-local`.
    pub fn start(
        cfg: &Config,
        own: crate::ingest::OwnPublishes,
        mut shutdown: Shutdown,
    ) -> Result<LocalClient, String> {
        let m = &cfg.ingest.mqtt;
        let url = crate::config::parse_mqtt_url(&m.broker)
            .map_err(|e| format!("key `ingest.mqtt.broker`: {e}"))?;
        let mut opts = MqttOptions::new(
            format!("{}-local", cfg.commands.client_id),
            &url.host,
            url.port,
        );
        opts.set_keep_alive(m.keep_alive.0.max(Duration::from_secs(5)));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        if !m.username.is_empty() {
            opts.set_credentials(&m.username, &m.password);
        }
        let (client, mut el) = AsyncClient::new(opts, 16);
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = el.poll() => ev,
                    _ = shutdown.wait() => return,
                };
                match ev {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        let _ = tx.send(LocalEv::Sent(pkid));
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        let _ = tx.send(LocalEv::PubAck(a.pkid));
                    }
                    Ok(_) => {}
                    Err(_) => {
                        let _ = tx.send(LocalEv::Lost);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Ok(LocalClient {
            client,
            events,
            own,
        })
    }

    async fn publish(&mut self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        while self.events.try_recv().is_ok() {}
        // Noted first: ingest may see it come back before the PUBACK.
        self.own.note(topic, &payload);
        if let Err(e) = self
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, payload.clone())
        {
            self.own.take(topic, &payload);
            return Err(format!("the local broker's client is busy: {e}"));
        }
        let events = &mut self.events;
        let wait = async {
            let mut mine = None;
            while let Some(ev) = events.recv().await {
                match ev {
                    LocalEv::Sent(p) if mine.is_none() => mine = Some(p),
                    LocalEv::PubAck(p) if mine == Some(p) => return Ok(()),
                    LocalEv::Lost => {
                        return Err("the connection to the local broker dropped".to_string())
                    }
                    _ => {}
                }
            }
            Err("the local broker's client stopped".to_string())
        };
        match tokio::time::timeout(Duration::from_secs(5), wait).await {
            Ok(r) => r,
            Err(_) => Err("no PUBACK from the local broker within 5 s".into()),
        }
    }
}

impl Local {
    async fn deliver(&mut self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Local::Embedded(b) => {
                let n = b.publish(
                    topic,
                    bytes::Bytes::from(payload),
                    crate::broker::packet::Qos::AtLeastOnce,
                    false,
                );
                if n == 0 {
                    Err(format!("no local subscriber to {topic}"))
                } else {
                    Ok(())
                }
            }
            Local::Client(c) => c.publish(topic, payload).await,
        }
    }
}

/// The largest command taken (its whole message); larger ones are refused with a result.
pub const MAX_COMMAND: usize = 256 * 1024;

/// A crash on purpose at a step of a command's life, for tests: `TIDEPOOL_FAULT_COMMANDS` =
/// `after_stash` | `after_deliver`, once per file named by `TIDEPOOL_FAULT_COMMANDS_ONCE`
/// (removed by the crash). Unset in production.
fn crash_for_tests(step: &str) {
    if std::env::var("TIDEPOOL_FAULT_COMMANDS").is_ok_and(|v| v == step) {
        if let Ok(f) = std::env::var("TIDEPOOL_FAULT_COMMANDS_ONCE") {
            if std::fs::remove_file(&f).is_err() {
                return;
            }
        }
        eprintln!("crashing on purpose {step} (TIDEPOOL_FAULT_COMMANDS)");
        std::process::abort();
    }
}

/// What the commands task needs from the rest of the gateway.
pub struct Links {
    /// Writes go through the commit loop.
    pub control: mpsc::UnboundedSender<Control>,
    /// For reading what a restart left unfinished.
    pub store: Store,
    /// The local broker (`None` only while commands are off).
    pub local: Option<Local>,
    /// Serial ports by name: their framing and their writer.
    pub serial: HashMap<String, (Framing, mpsc::UnboundedSender<PortOut>)>,
    /// Counters and `status`.
    pub metrics: Arc<Metrics>,
}

/// How long a `Done` command is remembered (a resend of it is recognised): `max_age`, at least
/// an hour.
fn keep_ms(cfg: &CommandsConfig) -> i64 {
    (cfg.max_age.0.as_millis() as i64).max(3_600_000)
}

/// A command's result, as published.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// `delivered`, `failed`, `expired` or `refused`.
    pub status: &'static str,
    /// Why, unless delivered.
    pub why: Option<String>,
}

impl Outcome {
    fn delivered() -> Outcome {
        Outcome {
            status: "delivered",
            why: None,
        }
    }
    fn not(status: &'static str, why: impl Into<String>) -> Outcome {
        Outcome {
            status,
            why: Some(why.into()),
        }
    }
}

/// A command as the cloud sent it, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// Its id.
    pub id: String,
    /// When it was issued (ms), if it said.
    pub ts: Option<i64>,
    /// The payload, JSON.
    pub payload: Value,
}

/// Why a message is not a command: what is wrong, and its id when it had a good one.
#[derive(Debug, Clone, PartialEq)]
pub struct Bad {
    /// The id, if one could be read.
    pub id: Option<String>,
    /// What is wrong, for the result.
    pub why: String,
}

/// Reads `{"id", "payload", "ts"?}`; the error says what is wrong, for the result.
pub fn parse(bytes: &[u8]) -> Result<Parsed, Bad> {
    let bad = |id: Option<&str>, why: &str| Bad {
        id: id.map(String::from),
        why: why.into(),
    };
    let v: Value = serde_json::from_slice(bytes).map_err(|e| Bad {
        id: None,
        why: format!("not a JSON command ({e}); send {{\"id\": \"...\", \"payload\": ...}}"),
    })?;
    let Value::Object(mut o) = v else {
        return Err(bad(
            None,
            "a command is a JSON object {\"id\": \"...\", \"payload\": ...}",
        ));
    };
    let id = match o.remove("id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s,
        Some(Value::Number(n)) => n.to_string(),
        _ => {
            return Err(bad(
                None,
                "a command needs an \"id\": a string of 1 to 256 bytes, or a number",
            ))
        }
    };
    let ts = match o.remove("ts") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_i64().is_some() => n.as_i64(),
        Some(_) => {
            return Err(bad(
                Some(&id),
                "\"ts\" is milliseconds since the Unix epoch, an integer",
            ))
        }
    };
    let payload = o.remove("payload").unwrap_or(Value::Null);
    Ok(Parsed { id, ts, payload })
}

/// The bytes a target gets: a JSON string as its text, anything else as compact JSON.
pub fn payload_bytes(payload: &Value) -> Vec<u8> {
    match payload {
        Value::String(s) => s.clone().into_bytes(),
        v => serde_json::to_vec(v).expect("JSON encodes"),
    }
}

/// The frame for a serial port: `lines`, one JSON object `{"command": ID, "payload": ...}`
/// and `\n`; `cobs`, a [`tidepool_proto::Command`].
pub fn serial_frame(framing: Framing, id: &str, payload: &Value) -> Vec<u8> {
    match framing {
        Framing::Lines => {
            let mut b = serde_json::to_vec(&serde_json::json!({"command": id, "payload": payload}))
                .expect("JSON encodes");
            b.push(b'\n');
            b
        }
        Framing::Cobs => {
            let body = payload_bytes(payload);
            let c = tidepool_proto::Command {
                kind: tidepool_proto::COMMAND,
                id,
                payload: &body,
            };
            postcard::to_stdvec_cobs(&c).expect("a command frame encodes")
        }
    }
}

/// The result document.
pub fn result_json(gateway: &str, id: Option<&str>, target: &str, o: &Outcome) -> Vec<u8> {
    let mut v = serde_json::json!({
        "gateway": gateway,
        "id": id,
        "target": target,
        "status": o.status,
        "ts": now_ms(),
    });
    if let Some(w) = &o.why {
        v["why"] = w.clone().into();
    }
    serde_json::to_vec(&v).expect("JSON encodes")
}

/// What the poller tells the worker.
enum In {
    Command(Publish, u64),
    ConnAck { session_present: bool },
    Subscribed,
    Lost(String),
    Sent(u16),
    PubAck(u16),
}

/// Starts the commands connection and its worker; `None` when `[commands]` is off.
pub fn start(
    cfg: &Config,
    mut links: Links,
    shutdown: Shutdown,
) -> Result<Option<tokio::task::JoinHandle<()>>, String> {
    let c = cfg.commands.clone();
    if !c.enabled {
        return Ok(None);
    }
    let Some(local) = links.local.take() else {
        return Err("commands: no local broker to deliver to".into());
    };
    let url = cfg.upstream.url.as_deref().unwrap_or_default();
    let url = crate::config::parse_mqtt_url(url).map_err(|e| format!("key `upstream.url`: {e}"))?;
    let mut opts = MqttOptions::new(&c.client_id, &url.host, url.port);
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    opts.set_keep_alive(cfg.upstream.keep_alive.0.max(Duration::from_secs(5)));
    // Larger than MAX_COMMAND, so an oversize command is read and refused with a result
    // rather than breaking the connection each time the broker resends it.
    opts.set_max_packet_size(16 << 20, 1 << 20);
    opts.set_inflight(16);
    if !cfg.upstream.username.is_empty() {
        opts.set_credentials(&cfg.upstream.username, &cfg.upstream.password);
    }
    if url.tls {
        let tls = crate::forward::tls::client_config(&cfg.upstream).map_err(|e| e.to_string())?;
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    }
    let (client, el) = AsyncClient::new(opts, 64);
    let gate = Arc::new(Mutex::new(AckGate::default()));
    let (tx, rx) = mpsc::unbounded_channel();
    *links.metrics.commands.lock().unwrap() = Some(CommandsInfo::default());
    let poller = tokio::spawn(poll(
        el,
        client.clone(),
        c.topic.clone(),
        gate.clone(),
        tx,
        cfg.upstream.reconnect_max.0,
        shutdown.clone(),
    ));
    let worker = Worker {
        local,
        cfg: c,
        gateway: cfg.gateway.id.clone(),
        client,
        gate,
        links,
        queue: VecDeque::new(),
        results: VecDeque::new(),
        inflight: InFlight::default(),
        connected: false,
        last_purge: None,
    };
    Ok(Some(tokio::spawn(async move {
        worker.run(rx, shutdown).await;
        poller.abort();
    })))
}

async fn poll(
    mut el: rumqttc::EventLoop,
    client: AsyncClient,
    topic: String,
    gate: Arc<Mutex<AckGate>>,
    tx: mpsc::UnboundedSender<In>,
    backoff_max: Duration,
    mut shutdown: Shutdown,
) {
    let mut failures = 0u32;
    loop {
        let ev = tokio::select! {
            ev = el.poll() => ev,
            _ = shutdown.wait() => return,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(c))) => {
                failures = 0;
                gate.lock().unwrap().connected(c.session_present);
                let _ = tx.send(In::ConnAck {
                    session_present: c.session_present,
                });
                let (client, topic) = (client.clone(), topic.clone());
                tokio::spawn(async move {
                    let _ = client.subscribe(topic, QoS::AtLeastOnce).await;
                });
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                if s.return_codes.contains(&SubscribeReasonCode::Failure) {
                    let _ = tx.send(In::Lost(format!(
                        "the broker refused the subscription to {topic} (not authorized?)"
                    )));
                } else {
                    let _ = tx.send(In::Subscribed);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let epoch = gate.lock().unwrap().epoch();
                let _ = tx.send(In::Command(p, epoch));
            }
            Ok(Event::Incoming(Packet::PubAck(a))) => {
                let _ = tx.send(In::PubAck(a.pkid));
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let _ = tx.send(In::Sent(pkid));
            }
            Ok(Event::Outgoing(Outgoing::PubAck(pkid))) => {
                gate.lock().unwrap().written(pkid);
            }
            Ok(_) => {}
            Err(e) => {
                {
                    // This connection is over: none of its PUBACKs may go out on the next.
                    // What it read before the error is handed on under its own epoch (stored,
                    // not acknowledged: the broker resends it), then rumqttc's queued PUBACKs
                    // are dropped under the lock, so none that the worker adds slips through.
                    let mut g = gate.lock().unwrap();
                    let epoch = g.epoch();
                    while let Some(ev) = el.state.events.pop_front() {
                        if let Event::Incoming(Packet::Publish(p)) = ev {
                            let _ = tx.send(In::Command(p, epoch));
                        }
                    }
                    g.disconnected();
                    el.clean();
                }
                let _ = tx.send(In::Lost(e.to_string()));
                failures = failures.saturating_add(1);
                let wait = Duration::from_millis(
                    (250u64 << failures.min(7)).min(backoff_max.as_millis().max(250) as u64),
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait() => return,
                }
            }
        }
    }
}

/// A command waiting for delivery.
struct Queued {
    id: String,
    row: CommandRow,
    next_try: Instant,
}

/// Results published and not yet acknowledged. rumqttc numbers publishes itself and resends
/// the unacknowledged ones after a reconnect that kept the session (dropping them when the
/// broker kept none), so a PUBACK is matched through the packet id each publish was given,
/// in the order they were handed over.
#[derive(Default)]
struct InFlight {
    /// Results by command id.
    results: HashMap<String, Vec<u8>>,
    /// Ids handed to the client, waiting for their packet id.
    requested: VecDeque<String>,
    /// Packet ids written, and whose result they carry.
    by_pkid: HashMap<u16, String>,
}

/// Results in flight at once.
const MAX_RESULTS_IN_FLIGHT: usize = 8;

struct Worker {
    local: Local,
    cfg: CommandsConfig,
    gateway: String,
    client: AsyncClient,
    gate: Arc<Mutex<AckGate>>,
    links: Links,
    queue: VecDeque<Queued>,
    results: VecDeque<(String, Vec<u8>)>,
    inflight: InFlight,
    connected: bool,
    last_purge: Option<std::time::Instant>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<In>, mut shutdown: Shutdown) {
        self.resume().await;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => self.on(ev, &shutdown).await,
                    None => return,
                },
                _ = tick.tick() => {}
                _ = shutdown.wait() => return,
            }
            self.deliver_due(&shutdown).await;
            self.publish_result().await;
            self.show();
        }
    }

    /// Picks up what a restart interrupted.
    async fn resume(&mut self) {
        // A store read: off the executor.
        let store = self.links.store.clone();
        let rows = tokio::task::spawn_blocking(move || {
            store
                .db()
                .map_err(|e| e.to_string())
                .and_then(|db| crate::store::commands::unfinished(&*db).map_err(|e| e.to_string()))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match rows {
            Ok(rows) => {
                for (id, row) in rows {
                    match &row.state {
                        CommandState::Pending => self.queue.push_back(Queued {
                            id,
                            row,
                            next_try: Instant::now(),
                        }),
                        CommandState::Resolved(r) => self.results.push_back((id, r.clone())),
                        CommandState::Done(_) => {}
                    }
                }
                if !self.queue.is_empty() || !self.results.is_empty() {
                    info!(
                        to_deliver = self.queue.len(),
                        results = self.results.len(),
                        "commands: resuming what the last run left unfinished"
                    );
                }
            }
            Err(e) => {
                warn!(error = %e, "commands: cannot read the stored commands; unfinished ones wait for a restart")
            }
        }
    }

    fn info(&self, f: impl FnOnce(&mut CommandsInfo)) {
        if let Some(i) = self.links.metrics.commands.lock().unwrap().as_mut() {
            f(i);
        }
    }

    fn show(&self) {
        let pending = (self.queue.len() + self.results.len() + self.inflight.results.len()) as u64;
        let connected = self.connected;
        self.info(|i| {
            i.pending = pending;
            i.connected = connected;
        });
    }

    async fn on(&mut self, ev: In, shutdown: &Shutdown) {
        match ev {
            In::Command(p, epoch) => self.take(p, epoch, shutdown).await,
            In::ConnAck { session_present } => {
                if !session_present {
                    // rumqttc dropped what it had not got acknowledged: publish it again.
                    let f = std::mem::take(&mut self.inflight);
                    for (id, r) in f.results {
                        self.results.push_front((id, r));
                    }
                }
            }
            In::Subscribed => {
                if !self.connected {
                    info!(topic = %self.cfg.topic, "commands: subscribed");
                }
                self.connected = true;
                self.info(|i| i.last_error.clear());
            }
            In::Lost(why) => {
                if self.connected {
                    warn!(error = %why, "commands: connection lost; reconnecting");
                }
                self.connected = false;
                self.info(|i| i.last_error = why);
            }
            In::Sent(pkid) => {
                // A resend of a publish not yet acknowledged keeps its packet id.
                if !self.inflight.by_pkid.contains_key(&pkid) {
                    if let Some(id) = self.inflight.requested.pop_front() {
                        self.inflight.by_pkid.insert(pkid, id);
                    }
                }
            }
            In::PubAck(pkid) => {
                let Some(id) = self.inflight.by_pkid.remove(&pkid) else {
                    return;
                };
                if self.inflight.results.remove(&id).is_some() {
                    let purge = self
                        .last_purge
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
                    if purge {
                        self.last_purge = Some(std::time::Instant::now());
                    }
                    let op = CommandOp::Finish {
                        id,
                        now_ms: now_ms(),
                        keep_ms: keep_ms(&self.cfg),
                        purge,
                    };
                    // Not stored: the result goes out again after a restart (a duplicate).
                    let _ = self.write(op, shutdown, 3).await;
                }
            }
        }
    }

    /// One commands-table write through the commit loop, tried up to `tries` times (0: until
    /// it succeeds or the gateway stops).
    async fn write(&self, op: CommandOp, shutdown: &Shutdown, tries: u32) -> Option<Applied> {
        let mut delay = Duration::from_millis(100);
        let mut n = 0;
        loop {
            let (tx, rx) = oneshot::channel();
            if self
                .links
                .control
                .send(Control::Command(op.clone(), tx))
                .is_err()
            {
                return None;
            }
            match rx.await {
                Ok(Ok(a)) => return Some(a),
                Ok(Err(e)) => {
                    warn!(error = %e, "commands: the store cannot write; retrying");
                }
                Err(_) => return None,
            }
            n += 1;
            if (tries > 0 && n >= tries) || shutdown.is_set() {
                return None;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// A command from the broker: stored, then acknowledged, then queued for delivery.
    async fn take(&mut self, p: Publish, epoch: u64, shutdown: &Shutdown) {
        if p.topic == self.cfg.result_topic {
            // Our own results, when the result topic is under the commands filter.
            self.ack(&p, epoch).await;
            return;
        }
        let target = p
            .topic
            .strip_prefix(self.cfg.prefix())
            .unwrap_or_default()
            .to_string();
        let hash = crate::ingest::stable_hash(&[p.topic.as_bytes(), &p.payload]);
        let parsed = if p.payload.len() > MAX_COMMAND {
            Err(Bad {
                id: None,
                why: format!(
                    "the command is {} B; at most {MAX_COMMAND} B are taken",
                    p.payload.len()
                ),
            })
        } else {
            parse(&p.payload)
        };
        let (id, row) = match parsed {
            Ok(c) if !target.is_empty() => (
                c.id,
                CommandRow {
                    received_ms: now_ms(),
                    ts: c.ts,
                    target,
                    payload: serde_json::to_vec(&c.payload).expect("JSON encodes"),
                    hash,
                    state: CommandState::Pending,
                },
            ),
            other => {
                let bad = match other {
                    Err(b) => b,
                    Ok(c) => Bad {
                        id: Some(c.id),
                        why: format!("no target: publish to {}TARGET", self.cfg.prefix()),
                    },
                };
                let result = result_json(
                    &self.gateway,
                    bad.id.as_deref(),
                    &target,
                    &Outcome::not("refused", bad.why.clone()),
                );
                warn!(topic = %p.topic, why = %bad.why, "commands: refused a command");
                (
                    // A key of its own: a resend of the same bad message is recognised.
                    format!("bad-{hash:016x}"),
                    CommandRow {
                        received_ms: now_ms(),
                        ts: None,
                        target,
                        payload: Vec::new(),
                        hash,
                        state: CommandState::Resolved(result),
                    },
                )
            }
        };
        let state = row.state.clone();
        let op = CommandOp::Stash {
            id: id.clone(),
            row: row.clone(),
        };
        let Some(applied) = self.write(op, shutdown, 0).await else {
            return; // stopping: no PUBACK, the broker resends it
        };
        crash_for_tests("after_stash");
        self.ack(&p, epoch).await;
        match applied {
            Applied::Known(_, known) if known != hash => {
                // Another command under an id already taken: refused, said so under that id
                // (not stored: best effort).
                let why = format!(
                    "the id {id} was already used by another command (ids are remembered for max_age, at least an hour)"
                );
                warn!(id = %id, "commands: {why}");
                let result = result_json(
                    &self.gateway,
                    Some(&id),
                    &row.target,
                    &Outcome::not("refused", why),
                );
                self.info(|i| *i.results.entry("refused").or_default() += 1);
                let _ = self.client.try_publish(
                    &self.cfg.result_topic,
                    QoS::AtLeastOnce,
                    false,
                    result,
                );
            }
            Applied::Known(..) => self.info(|i| i.duplicates += 1),
            Applied::Written => {
                self.info(|i| i.received += 1);
                match state {
                    CommandState::Pending => self.queue.push_back(Queued {
                        id,
                        row,
                        next_try: Instant::now(),
                    }),
                    CommandState::Resolved(r) => {
                        self.info(|i| *i.results.entry("refused").or_default() += 1);
                        self.results.push_back((id, r));
                    }
                    CommandState::Done(_) => {}
                }
            }
        }
    }

    /// The PUBACK of `p`, unless its connection is gone (then the broker resends it). The
    /// request channel may be full for a moment: tried for a few seconds.
    async fn ack(&self, p: &Publish, epoch: u64) {
        let t = AckToken {
            pkid: p.pkid,
            epoch,
            tag: None,
        };
        for _ in 0..1_000 {
            {
                let mut g = self.gate.lock().unwrap();
                if g.admit(&t) != Admit::Send {
                    return;
                }
                if self.client.try_ack(p).is_ok() {
                    g.queued(&t);
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Delivers every queued command whose time has come.
    async fn deliver_due(&mut self, shutdown: &Shutdown) {
        let now = Instant::now();
        let mut later = VecDeque::new();
        while let Some(mut q) = self.queue.pop_front() {
            if q.next_try > now {
                later.push_back(q);
                continue;
            }
            match self.deliver(&q.id, &q.row).await {
                Some(o) => {
                    if o.status == "delivered" {
                        crash_for_tests("after_deliver");
                    }
                    let result = result_json(&self.gateway, Some(&q.id), &q.row.target, &o);
                    let op = CommandOp::Resolve {
                        id: q.id.clone(),
                        result: result.clone(),
                    };
                    if self.write(op, shutdown, 0).await.is_none() {
                        return;
                    }
                    let mut line = format!("{} → {}: {}", q.id, q.row.target, o.status);
                    if let Some(w) = &o.why {
                        line.push_str(&format!(" ({w})"));
                    }
                    if o.status == "delivered" {
                        info!(id = %q.id, target = %q.row.target, "command delivered");
                    } else {
                        warn!(id = %q.id, target = %q.row.target, status = o.status, why = o.why.as_deref().unwrap_or(""), "command not delivered");
                    }
                    self.info(|i| {
                        *i.results.entry(o.status).or_default() += 1;
                        i.last = line;
                    });
                    self.results.push_back((q.id, result));
                }
                None => {
                    q.next_try = Instant::now() + Duration::from_secs(1);
                    later.push_back(q);
                }
            }
        }
        self.queue = later;
    }

    /// Delivers one command: its outcome, or `None` to try again later (the target is not
    /// there yet, and the command has not expired).
    async fn deliver(&mut self, id: &str, row: &CommandRow) -> Option<Outcome> {
        // From when it was issued, or stored if that is earlier: a `ts` ahead of our clock
        // (or in the wrong unit) must not keep it alive.
        let since = row.ts.map_or(row.received_ms, |ts| ts.min(row.received_ms));
        let age_ms = (now_ms() - since).max(0);
        let max_ms = self.cfg.max_age.0.as_millis() as i64;
        let expired = |why: String| {
            Some(Outcome::not(
                "expired",
                format!(
                    "{why}: issued {} s ago, max_age is {}",
                    age_ms / 1000,
                    self.cfg.max_age
                ),
            ))
        };
        if age_ms > max_ms {
            return expired("not delivered in time".into());
        }
        if !self.cfg.allow.iter().any(|f| matches(f, &row.target)) {
            return Some(Outcome::not(
                "refused",
                format!("target {} is not in [commands] allow", row.target),
            ));
        }
        let payload: Value = serde_json::from_slice(&row.payload).unwrap_or(Value::Null);
        let tried = if let Some(port) = row.target.strip_prefix("serial/") {
            let Some((framing, tx)) = self.links.serial.get(port) else {
                return Some(Outcome::not(
                    "failed",
                    format!("no serial port named {port} is configured"),
                ));
            };
            let (done, rx) = oneshot::channel();
            let out = PortOut {
                bytes: serial_frame(*framing, id, &payload),
                done,
            };
            if tx.send(out).is_err() {
                Err(format!("serial port {port} is stopped"))
            } else {
                match tokio::time::timeout(Duration::from_secs(5), rx).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err(format!("serial port {port} closed")),
                    Err(_) => Err(format!("serial port {port} did not take it within 5 s")),
                }
            }
        } else {
            let topic = format!("{}{}", self.cfg.local_prefix, row.target);
            if !valid_topic(&topic) {
                return Some(Outcome::not("failed", format!("{topic} is not a topic")));
            }
            self.local.deliver(&topic, payload_bytes(&payload)).await
        };
        match tried {
            Ok(()) => Some(Outcome::delivered()),
            Err(why) if age_ms + 1_000 > max_ms => expired(why),
            Err(_) => None,
        }
    }

    /// Publishes waiting results, a few in flight at a time.
    async fn publish_result(&mut self) {
        while self.connected && self.inflight.results.len() < MAX_RESULTS_IN_FLIGHT {
            let Some((id, result)) = self.results.pop_front() else {
                return;
            };
            if self.inflight.results.contains_key(&id) {
                continue;
            }
            let r = self.client.try_publish(
                &self.cfg.result_topic,
                QoS::AtLeastOnce,
                false,
                result.clone(),
            );
            if r.is_err() {
                self.results.push_front((id, result));
                return;
            }
            self.inflight.requested.push_back(id.clone());
            self.inflight.results.insert(id, result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_say_what_is_wrong() {
        let c = parse(br#"{"id":"c1","payload":{"open":true},"ts":1763785000123}"#).unwrap();
        assert_eq!(c.id, "c1");
        assert_eq!(c.ts, Some(1_763_785_000_123));
        assert_eq!(c.payload, serde_json::json!({"open": true}));
        assert_eq!(parse(br#"{"id":7}"#).unwrap().id, "7");
        assert_eq!(parse(br#"{"id":7}"#).unwrap().payload, Value::Null);
        assert!(parse(b"OPEN")
            .unwrap_err()
            .why
            .contains("not a JSON command"));
        assert!(parse(br#"{"payload":1}"#)
            .unwrap_err()
            .why
            .contains("\"id\""));
        assert!(parse(br#"{"id":""}"#).is_err());
        let bad = parse(br#"{"id":"x","ts":"now"}"#).unwrap_err();
        assert!(bad.why.contains("ts") && bad.id.as_deref() == Some("x"));
        assert!(parse(b"[1]").is_err());
    }

    #[test]
    fn targets_get_text_or_json_and_serial_frames_name_the_command() {
        assert_eq!(payload_bytes(&"OPEN".into()), b"OPEN");
        assert_eq!(payload_bytes(&serde_json::json!({"a": 1})), br#"{"a":1}"#);
        let line = serial_frame(Framing::Lines, "c1", &serde_json::json!({"a": 1}));
        assert_eq!(line, b"{\"command\":\"c1\",\"payload\":{\"a\":1}}\n");
        let mut frame = serial_frame(Framing::Cobs, "c1", &"OPEN".into());
        assert_eq!(*frame.last().unwrap(), 0);
        assert_eq!(
            tidepool_proto::frame_kind(&frame),
            tidepool_proto::FrameKind::Command
        );
        let c: tidepool_proto::Command = tidepool_proto::decode_cobs(&mut frame).unwrap();
        assert_eq!((c.id, c.payload), ("c1", &b"OPEN"[..]));
    }

    #[test]
    fn results_carry_id_target_status_and_why() {
        let v: Value = serde_json::from_slice(&result_json(
            "gw",
            Some("c1"),
            "serial/uart0",
            &Outcome::not("expired", "late"),
        ))
        .unwrap();
        assert_eq!(v["gateway"], "gw");
        assert_eq!(v["id"], "c1");
        assert_eq!(v["target"], "serial/uart0");
        assert_eq!(v["status"], "expired");
        assert_eq!(v["why"], "late");
        let v: Value =
            serde_json::from_slice(&result_json("gw", None, "", &Outcome::delivered())).unwrap();
        assert!(v["id"].is_null() && v.get("why").is_none());
    }
}
