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

/// Publishes to the local broker (embedded, or the one ingest subscribes to) at QoS 1.
pub type LocalOut = Arc<dyn Fn(&str, Vec<u8>) -> Result<(), String> + Send + Sync>;

/// What the commands task needs from the rest of the gateway.
pub struct Links {
    /// Writes go through the commit loop.
    pub control: mpsc::UnboundedSender<Control>,
    /// For reading what a restart left unfinished.
    pub store: Store,
    /// The local broker.
    pub local: LocalOut,
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

/// Reads `{"id", "payload", "ts"?}`; the error says what is wrong, for the result.
pub fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        format!("not a JSON command ({e}); send {{\"id\": \"...\", \"payload\": ...}}")
    })?;
    let Value::Object(mut o) = v else {
        return Err("a command is a JSON object {\"id\": \"...\", \"payload\": ...}".into());
    };
    let id = match o.remove("id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s,
        Some(Value::Number(n)) => n.to_string(),
        _ => {
            return Err("a command needs an \"id\": a string of 1 to 256 bytes, or a number".into())
        }
    };
    let ts = match o.remove("ts") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_i64().is_some() => n.as_i64(),
        Some(_) => return Err("\"ts\" is milliseconds since the Unix epoch, an integer".into()),
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
    links: Links,
    shutdown: Shutdown,
) -> Result<Option<tokio::task::JoinHandle<()>>, String> {
    let c = cfg.commands.clone();
    if !c.enabled {
        return Ok(None);
    }
    let url = cfg.upstream.url.as_deref().unwrap_or_default();
    let url = crate::config::parse_mqtt_url(url).map_err(|e| format!("key `upstream.url`: {e}"))?;
    let mut opts = MqttOptions::new(&c.client_id, &url.host, url.port);
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    opts.set_keep_alive(cfg.upstream.keep_alive.0.max(Duration::from_secs(5)));
    opts.set_max_packet_size(1 << 20, 1 << 20);
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
        cfg: c,
        gateway: cfg.gateway.id.clone(),
        client,
        gate,
        links,
        queue: VecDeque::new(),
        results: VecDeque::new(),
        inflight: InFlight::default(),
        connected: false,
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
                gate.lock().unwrap().disconnected();
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
    cfg: CommandsConfig,
    gateway: String,
    client: AsyncClient,
    gate: Arc<Mutex<AckGate>>,
    links: Links,
    queue: VecDeque<Queued>,
    results: VecDeque<(String, Vec<u8>)>,
    inflight: InFlight,
    connected: bool,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<In>, mut shutdown: Shutdown) {
        self.resume();
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
    fn resume(&mut self) {
        let rows = self
            .links
            .store
            .db()
            .map_err(|e| e.to_string())
            .and_then(|db| crate::store::commands::unfinished(&*db).map_err(|e| e.to_string()));
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
                    let op = CommandOp::Finish {
                        id,
                        now_ms: now_ms(),
                        keep_ms: keep_ms(&self.cfg),
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
            self.ack(&p, epoch);
            return;
        }
        let target = p
            .topic
            .strip_prefix(self.cfg.prefix())
            .unwrap_or_default()
            .to_string();
        let (id, row) = match parse(&p.payload) {
            Ok(c) if !target.is_empty() => (
                c.id,
                CommandRow {
                    received_ms: now_ms(),
                    ts: c.ts,
                    target,
                    payload: serde_json::to_vec(&c.payload).expect("JSON encodes"),
                    state: CommandState::Pending,
                },
            ),
            other => {
                let why = match other {
                    Err(e) => e,
                    Ok(_) => format!("no target: publish to {}TARGET", self.cfg.prefix()),
                };
                let id = format!(
                    "bad-{:016x}",
                    crate::ingest::stable_hash(&[p.topic.as_bytes(), &p.payload])
                );
                let result = result_json(
                    &self.gateway,
                    None,
                    &target,
                    &Outcome::not("refused", why.clone()),
                );
                warn!(topic = %p.topic, why = %why, "commands: refused a command");
                (
                    id,
                    CommandRow {
                        received_ms: now_ms(),
                        ts: None,
                        target,
                        payload: Vec::new(),
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
        match self.write(op, shutdown, 0).await {
            None => {} // stopping: no PUBACK, the broker resends it
            Some(Applied::Known(_)) => {
                self.info(|i| i.duplicates += 1);
                self.ack(&p, epoch);
            }
            Some(_) => {
                self.ack(&p, epoch);
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

    /// The PUBACK of `p`, unless its connection is gone (then the broker resends it).
    fn ack(&self, p: &Publish, epoch: u64) {
        let t = AckToken {
            pkid: p.pkid,
            epoch,
            tag: None,
        };
        let mut g = self.gate.lock().unwrap();
        if g.admit(&t) == Admit::Send && self.client.try_ack(p).is_ok() {
            g.queued(&t);
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
    async fn deliver(&self, id: &str, row: &CommandRow) -> Option<Outcome> {
        let age_ms = (now_ms() - row.ts.unwrap_or(row.received_ms)).max(0);
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
            (self.links.local)(&topic, payload_bytes(&payload))
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
        assert!(parse(b"OPEN").unwrap_err().contains("not a JSON command"));
        assert!(parse(br#"{"payload":1}"#).unwrap_err().contains("\"id\""));
        assert!(parse(br#"{"id":""}"#).is_err());
        assert!(parse(br#"{"id":"x","ts":"now"}"#)
            .unwrap_err()
            .contains("ts"));
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
