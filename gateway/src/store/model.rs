//! Model-based test of the store: random sequences of operations run against the real commit
//! loop (on a [`SimDisk`]) and against a plain in-memory model; after every step both agree
//! on what is buffered, what was delivered, what was dropped (by reason), rule state and
//! dead letters, and the sources' acknowledgements.
//!
//! Operations: ingest groups (sizes, payload sizes) whose events script their rule outcome
//! (keep, drop, fan out, fail, state writes) or are bad frames; forwarder batch reads,
//! PUBACKs (in order for some of the batches in flight or several at once; for one batch
//! whatever is in flight ahead of it, as live data ahead of a backlog; and stale ones
//! again), each deleting its batch's range of ids; reconnects with the session kept or lost,
//! events upstream cannot take; caps (`max_bytes` under both policies, `max_age` as the
//! clocks move, `dlq_max_bytes`, `min_free` as a tight disk with evictions); dead letters
//! dropped; clean restarts; and crashes (a power cut at a random write of a commit, keeping
//! none, a prefix or any subset of the unsynced writes, some torn), after which the store
//! must equal the model either before or after that commit, pass redb's integrity check, and
//! go on.
//!
//! `TIDEPOOL_MODEL_CASES` sets the number of cases (default 2,000).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use redb::{ReadableDatabase, ReadableTable};
use tokio::sync::{mpsc, watch};

use super::simdisk::{Keep, SimDisk};
use super::*;
use crate::admin::metrics::{DropReason, Metrics};
use crate::config::{BufferConfig, ByteSize, HumanDuration, MinFree, WhenFull};
use crate::event::{Event, Payload};
use crate::ingest::{Incoming, Taken};
use crate::rules::{DeadLetter, RuleStage, StateWrite, StepOutput};
use crate::store::commit::{CommitLoop, CommitReport, ForwardAck, Plan};

// ----- Clocks: both move only when a test moves them. -----

thread_local! {
    static WALL: std::cell::Cell<i64> = const { std::cell::Cell::new(T0) };
    static MONO_MS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static BASE: Instant = Instant::now();
}

/// A sane wall-clock time (2026).
const T0: i64 = super::arrivals::SANE_MS + 400 * 86_400_000;

pub(super) fn wall() -> i64 {
    WALL.with(|w| w.get())
}

pub(super) fn mono() -> Instant {
    BASE.with(|b| *b) + Duration::from_millis(MONO_MS.with(|m| m.get()))
}

fn mono_ms() -> u64 {
    MONO_MS.with(|m| m.get())
}

/// Time passes, on both clocks.
pub(super) fn advance(ms: u64) {
    WALL.with(|w| w.set(w.get() + ms as i64));
    MONO_MS.with(|m| m.set(m.get() + ms));
}

/// Both clocks back at their start (each case starts the same way).
pub(super) fn reset_clocks() {
    WALL.with(|w| w.set(T0));
    MONO_MS.with(|m| m.set(0));
}

// ----- A rule stage whose events say what it does with them. -----

/// What the rule stage does with one input; carried in the event's payload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum Act {
    /// Passed on.
    Keep,
    /// Dropped (counted `rule`).
    Drop,
    /// Passed on as this many events.
    Fan(u8),
    /// The rule throws: the input is dead-lettered, its state write is not made.
    Fail,
    /// Writes `state[key] = value`, passes the event on.
    Set(u8, u8),
    /// Deletes `state[key]`, passes the event on.
    Del(u8),
}

/// The name the scripted stage writes state and dead letters under.
pub(super) const RULE: &str = "scripted";

pub(super) type State = BTreeMap<(String, String), Vec<u8>>;

/// The stage: state committed and pending, as the Rhai stage keeps them; `seen` shows the
/// committed state to the test.
pub(super) struct Scripted {
    committed: State,
    pending: BTreeMap<(String, String), Option<Vec<u8>>>,
    seen: Arc<Mutex<State>>,
}

impl Scripted {
    pub(super) fn new(seen: Arc<Mutex<State>>) -> Scripted {
        Scripted {
            committed: State::new(),
            pending: BTreeMap::new(),
            seen,
        }
    }
}

fn act_of(e: &Event) -> Option<Act> {
    let Payload::Json(s) = &e.payload else {
        return None;
    };
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    serde_json::from_value(v.get("a")?.clone()).ok()
}

fn key(k: u8) -> (String, String) {
    (RULE.to_string(), format!("k{k}"))
}

impl RuleStage for Scripted {
    fn on_event(&mut self, event: Event, out: &mut StepOutput) {
        match act_of(&event).unwrap_or(Act::Keep) {
            Act::Keep => out.events.push(event),
            Act::Drop => out.dropped += 1,
            Act::Fan(k) => {
                for i in 0..k {
                    let mut e = event.clone();
                    e.topic = format!("{}/{i}", event.topic);
                    out.events.push(e);
                }
            }
            Act::Fail => out.dead_letters.push(DeadLetter {
                rule: RULE.into(),
                error: "boom".into(),
                at: 0,
                event,
            }),
            Act::Set(k, v) => {
                self.pending
                    .insert(key(k), Some(format!("{v}").into_bytes()));
                out.events.push(event);
            }
            Act::Del(k) => {
                self.pending.insert(key(k), None);
                out.events.push(event);
            }
        }
    }

    fn pending_state(&self) -> Vec<StateWrite> {
        self.pending
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn commit_state(&mut self) {
        for (k, v) in std::mem::take(&mut self.pending) {
            match v {
                Some(v) => self.committed.insert(k, v),
                None => self.committed.remove(&k),
            };
        }
        *self.seen.lock().unwrap() = self.committed.clone();
    }

    fn rollback_state(&mut self) {
        self.pending.clear();
    }

    fn load_state(&mut self, entries: Vec<((String, String), Vec<u8>)>) {
        self.committed = entries.into_iter().collect();
        *self.seen.lock().unwrap() = self.committed.clone();
    }
}

// ----- What the store holds, as plain values. -----

/// A dead letter as compared (its time is the wall clock's, not compared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Letter {
    pub id: u64,
    pub rule: String,
    pub error: String,
    /// The input's topic and payload (a dead letter keeps no event id).
    pub event: (String, String),
}

/// Everything the store holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct Snap {
    /// id → (topic, payload).
    pub events: Vec<(u64, String, String)>,
    pub meta: BTreeMap<String, u64>,
    pub dlq: Vec<Letter>,
    pub state: State,
    pub arrivals: Vec<(u64, i64)>,
}

/// An event's payload and trace id, as the snapshots compare them.
fn payload_text(e: &Event) -> String {
    let p = match &e.payload {
        Payload::Json(s) => s.clone(),
        Payload::Bytes(b) => format!("bytes:{b:?}"),
    };
    format!("{p} trace {}", e.trace)
}

/// Reads every table the commit loop writes.
pub(super) fn snapshot<D: ReadableDatabase>(db: &D) -> Snap {
    let txn = db.begin_read().unwrap();
    let mut s = Snap::default();
    for row in txn.open_table(EVENTS).unwrap().iter().unwrap() {
        let (k, v) = row.unwrap();
        let e = decode(k.value(), v.value()).unwrap();
        s.events.push((e.id, e.topic.clone(), payload_text(&e)));
    }
    for row in txn.open_table(META).unwrap().iter().unwrap() {
        let (k, v) = row.unwrap();
        s.meta.insert(k.value().to_string(), v.value());
    }
    for row in txn.open_table(DEAD_LETTERS).unwrap().iter().unwrap() {
        let (k, v) = row.unwrap();
        let d = dlq::decode(v.value()).unwrap();
        s.dlq.push(Letter {
            id: k.value(),
            rule: d.rule,
            error: d.error,
            event: (d.event.topic.clone(), payload_text(&d.event)),
        });
    }
    for row in txn.open_table(RULE_STATE).unwrap().iter().unwrap() {
        let (k, v) = row.unwrap();
        let (r, key) = k.value();
        s.state
            .insert((r.to_string(), key.to_string()), v.value().to_vec());
    }
    for row in txn.open_table(ARRIVALS).unwrap().iter().unwrap() {
        let (k, v) = row.unwrap();
        s.arrivals.push((k.value(), v.value()));
    }
    s
}

// ----- The real store on a simulated disk. -----

/// The buffer settings of a case.
#[derive(Debug, Clone)]
pub(super) struct Caps {
    pub max_bytes: u64,
    pub when_full: WhenFull,
    pub max_age_ms: u64,
    pub dlq_max_bytes: u64,
}

pub(super) fn buffer_cfg(c: &Caps) -> BufferConfig {
    BufferConfig {
        max_bytes: ByteSize(c.max_bytes),
        max_age: HumanDuration(Duration::from_millis(c.max_age_ms)),
        when_full: c.when_full,
        commit_max_events: 100,
        commit_max_wait: HumanDuration(Duration::from_millis(1)),
        cache_size: ByteSize(1 << 20),
        min_free: MinFree::Bytes(0),
        ingest_max_bytes: ByteSize(1 << 20),
        dlq_max_bytes: ByteSize(c.dlq_max_bytes),
        write_budget: ByteSize(0),
        budget_max_wait: HumanDuration(Duration::from_secs(5)),
        card_endurance: ByteSize(0),
    }
}

/// The commit loop on a store on `disk`, with the scripted rule stage.
pub(super) struct Real {
    pub store: Store,
    pub lp: CommitLoop,
    pub state: Arc<Mutex<State>>,
    _ends: (
        crate::ingest::channel::IngestTx,
        mpsc::UnboundedSender<commit::ForwardMsg>,
        watch::Receiver<u64>,
    ),
    _rt: tokio::runtime::Runtime,
}

pub(super) fn opener(disk: &SimDisk) -> Opener {
    let disk = disk.clone();
    Arc::new(move |hb| schema::open_backend(disk.backend(), "simulated disk", 1 << 20, hb))
}

impl Real {
    /// Opens (creating if empty) the store on `disk`.
    pub fn open(disk: &SimDisk, caps: &Caps) -> Real {
        let store = Store::with_opener(opener(disk), &std::env::temp_dir(), 1 << 20).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (tx, rx) = crate::ingest::channel::channel(16, 1 << 20);
        let (atx, arx) = mpsc::unbounded_channel();
        let (ctx, crx) = watch::channel(0);
        let state = Arc::new(Mutex::new(State::new()));
        let lp = CommitLoop::new(
            store.clone(),
            buffer_cfg(caps),
            Arc::new(Metrics::default()),
            Box::new(Scripted::new(state.clone())),
            rx,
            arx,
            ctx,
            rt.handle().clone(),
        )
        .unwrap()
        .with_clocks(wall, mono);
        Real {
            store,
            lp,
            state,
            _ends: (tx, atx, crx),
            _rt: rt,
        }
    }

    pub fn snap(&self) -> Snap {
        snapshot(&*self.store.db().unwrap())
    }
}

// ----- Inputs and operations. -----

/// One input of an ingest group.
#[derive(Debug, Clone)]
pub(super) enum Input {
    /// An event with this rule outcome and payload padding.
    Event(Act, usize),
    /// A serial frame that could not be decoded (or was too long).
    Bad(bool, usize),
}

/// The event an input carries; `n` numbers inputs through a case.
pub(super) fn input_event(n: u64, input: &Input) -> Event {
    let (topic, payload) = match input {
        Input::Event(act, pad) => (
            format!("m/{n}"),
            Payload::Json(serde_json::json!({"n": n, "a": act, "p": "x".repeat(*pad)}).to_string()),
        ),
        Input::Bad(_, len) => (format!("bad/{n}"), Payload::Bytes(vec![0xA5; *len])),
    };
    Event {
        id: 0,
        ts: wall(),
        source: "uart0".into(),
        topic,
        payload,
        // Every output and dead letter of input n keeps this; the snapshots compare it.
        trace: crate::event::Trace(n + 1),
        properties: Vec::new(),
    }
}

fn bad_of(input: &Input) -> Option<(DropReason, String)> {
    match input {
        Input::Bad(true, _) => Some((DropReason::Oversize, "frame over max_frame".into())),
        Input::Bad(false, _) => Some((DropReason::BadFrame, "bad checksum".into())),
        Input::Event(..) => None,
    }
}

/// An operation of a case.
#[derive(Debug, Clone)]
pub(super) enum Step {
    /// One commit of these inputs (`tight`: the disk is below `min_free`, evicting this many
    /// bytes first).
    Ingest {
        inputs: Vec<Input>,
        tight: Option<u64>,
    },
    /// The forwarder reads a batch of at most this many events after its cursor.
    Read(usize),
    /// PUBACKs for the oldest in-flight batches (this many, at least one): one commit.
    Puback(usize),
    /// A PUBACK for one in-flight batch (the n-th, modulo), whatever is ahead of it: live
    /// data acknowledged ahead of a backlog, or a second sink ahead of the first.
    PubackOne(usize),
    /// The upstream connection is lost and made again. Session kept or lost is one case
    /// here: the forwarder forgets what was in flight either way and sends it again from the
    /// store (a kept session may also make the broker deliver it: a duplicate, never a loss).
    Reconnect,
    /// A PUBACK again for a batch already acknowledged (a resend's): deletes nothing.
    StaleAck,
    /// Upstream cannot take an in-flight event (the n-th, modulo): moved to dead letters.
    TooBig(usize),
    /// Time passes (ms), then the loop commits what is due (expiry).
    Wait(u64),
    /// `tidepool dlq drop --limit n`.
    DropLetters(u64),
    /// The gateway stops cleanly and starts again.
    Restart,
    /// Power is cut at the `at`-th write of the next commit (of these inputs), keeping
    /// what `keep` says of the unsynced writes, maybe tearing one; then the gateway starts.
    Crash {
        inputs: Vec<Input>,
        at: u64,
        keep: Keep,
        tear: bool,
    },
}

// ----- The model. -----

#[derive(Debug, Clone)]
struct Row {
    event: Event,
    size: u64,
}

#[derive(Debug, Clone)]
struct MLetter {
    id: u64,
    letter: DeadLetter,
    size: u64,
}

/// The store as plain data structures, and the forwarder's view of it.
#[derive(Debug, Clone)]
pub(super) struct Model {
    caps: Caps,
    rows: VecDeque<Row>,
    bytes: u64,
    next_id: u64,
    meta: BTreeMap<String, u64>,
    dlq: VecDeque<MLetter>,
    dlq_bytes: u64,
    next_dlq_id: u64,
    state: State,
    /// (first id, wall ms) of each group of arrivals.
    groups: VecDeque<(u64, i64)>,
    /// When this run last started a group (monotonic ms).
    last_mark: Option<u64>,
    /// Forwarder: the highest id read, and the ids each batch in flight covers.
    cursor: u64,
    inflight: VecDeque<(u64, u64)>,
    /// The range of the last batch acknowledged (a stale PUBACK repeats it).
    last_acked: Option<(u64, u64)>,
    /// Events upstream acknowledged, in order.
    pub delivered: Vec<u64>,
    /// Ids given out (all stored events, whatever became of them).
    pub stored_total: u64,
    /// Fate counts, for the model's own bookkeeping.
    evicted: u64,
    upstream_dead: u64,
}

/// What the model expects of one commit.
#[derive(Debug, Default, PartialEq, Eq)]
struct Expect {
    acks: Vec<(u64, Taken)>,
    stored: u64,
    acked: u64,
}

fn interval_ms(max_age_ms: u64) -> u64 {
    super::arrivals::mark_interval(Duration::from_millis(max_age_ms)).as_millis() as u64
}

/// A plan for the model and the real loop alike.
#[derive(Debug, Default, Clone)]
struct MPlan {
    inputs: Vec<(u64, Input)>,
    acked: Vec<ForwardAck>,
    upstream_dead: Vec<(u64, String)>,
    tight: bool,
    evict_bytes: u64,
    dlq_remove: Vec<u64>,
}

impl Model {
    pub fn new(caps: Caps) -> Model {
        let mut meta = BTreeMap::new();
        meta.insert("schema_version".to_string(), schema::SCHEMA_VERSION);
        meta.insert(dlq::DLQ_BYTES.to_string(), 0);
        Model {
            caps,
            rows: VecDeque::new(),
            bytes: 0,
            next_id: 1,
            meta,
            dlq: VecDeque::new(),
            dlq_bytes: 0,
            next_dlq_id: 1,
            state: State::new(),
            groups: VecDeque::new(),
            last_mark: None,
            cursor: 0,
            inflight: VecDeque::new(),
            last_acked: None,
            delivered: Vec::new(),
            stored_total: 0,
            evicted: 0,
            upstream_dead: 0,
        }
    }

    fn count_drop(&mut self, reason: DropReason, n: u64) {
        if n > 0 {
            *self
                .meta
                .entry(format!("dropped.{}", reason.label()))
                .or_insert(0) += n;
        }
    }

    fn pop_front(&mut self) -> Option<Row> {
        let r = self.rows.pop_front()?;
        self.bytes -= r.size;
        Some(r)
    }

    /// One commit, as [`CommitLoop::write`] makes it.
    fn commit(&mut self, p: &MPlan) -> Expect {
        let mut x = Expect::default();
        let wall = wall();
        let (interval, max_age) = (
            interval_ms(self.caps.max_age_ms) as i64,
            self.caps.max_age_ms as i64,
        );
        let due = self
            .groups
            .front()
            .is_some_and(|&(_, t)| wall >= t + interval + max_age);
        let quiet = p.inputs.is_empty()
            && p.acked.is_empty()
            && p.upstream_dead.is_empty()
            && p.dlq_remove.is_empty()
            && p.evict_bytes == 0
            && !due;
        let mut drops: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut cap = if p.tight {
            self.caps.max_bytes.min(self.bytes)
        } else {
            self.caps.max_bytes
        };
        let tight_reason = if p.tight {
            DropReason::MinFree
        } else {
            DropReason::BufferFull
        };
        let drop_n = |drops: &mut BTreeMap<&'static str, u64>, r: DropReason| {
            *drops.entry(r.label()).or_insert(0) += 1;
        };
        // 0. Upstream cannot take these.
        let mut upstream_letters = Vec::new();
        for (id, reason) in &p.upstream_dead {
            let Some(pos) = self.rows.iter().position(|r| r.event.id == *id) else {
                continue;
            };
            let r = self.rows.remove(pos).unwrap();
            self.bytes -= r.size;
            self.upstream_dead += 1;
            upstream_letters.push(DeadLetter {
                rule: commit::UPSTREAM_RULE.into(),
                error: reason.clone(),
                at: crate::event::now_ms(),
                event: r.event,
            });
        }
        // 1. Acknowledged rows go; room is made on a full disk.
        let mut next_batch = None;
        for a in &p.acked {
            let (gone, kept): (VecDeque<Row>, VecDeque<Row>) = std::mem::take(&mut self.rows)
                .into_iter()
                .partition(|r| (a.from..=a.up_to).contains(&r.event.id));
            self.rows = kept;
            for r in gone {
                self.bytes -= r.size;
                self.delivered.push(r.event.id);
                x.acked += 1;
            }
            next_batch = next_batch.max(Some(a.batch + 1));
        }
        if let Some(n) = next_batch {
            let stored = self.meta.get("next_batch").copied().unwrap_or(0);
            self.meta.insert("next_batch".into(), n.max(stored));
        }
        let mut evicted = 0;
        while evicted < p.evict_bytes {
            let Some(r) = self.pop_front() else { break };
            evicted += r.size;
            self.evicted += 1;
            drop_n(&mut drops, DropReason::MinFree);
        }
        if p.evict_bytes > 0 {
            cap = cap.min(self.bytes);
        }
        // 2. The group through the rules, appended under the caps.
        let mut letters = Vec::new();
        let mut pending: BTreeMap<(String, String), Option<Vec<u8>>> = BTreeMap::new();
        let mut first_stored = None;
        for (n, input) in &p.inputs {
            let event = input_event(*n, input);
            let mut outs = Vec::new();
            match input {
                Input::Bad(oversize, _) => {
                    let (_, why) = bad_of(input).unwrap();
                    letters.push(DeadLetter {
                        rule: event.source.clone(),
                        error: why,
                        at: crate::event::now_ms(),
                        event,
                    });
                    drop_n(
                        &mut drops,
                        if *oversize {
                            DropReason::Oversize
                        } else {
                            DropReason::BadFrame
                        },
                    );
                    x.acks.push((*n, Taken::Stored));
                    continue;
                }
                Input::Event(act, _) => match act {
                    Act::Keep => outs.push(event),
                    Act::Drop => drop_n(&mut drops, DropReason::Rule),
                    Act::Fan(k) => {
                        for i in 0..*k {
                            let mut e = event.clone();
                            e.topic = format!("{}/{i}", event.topic);
                            outs.push(e);
                        }
                    }
                    Act::Fail => letters.push(DeadLetter {
                        rule: RULE.into(),
                        error: "boom".into(),
                        at: 0,
                        event,
                    }),
                    Act::Set(k, v) => {
                        pending.insert(key(*k), Some(format!("{v}").into_bytes()));
                        outs.push(event);
                    }
                    Act::Del(k) => {
                        pending.insert(key(*k), None);
                        outs.push(event);
                    }
                },
            }
            let mut refused = false;
            for mut e in outs {
                let size = row_size(encode(&e).len());
                if self.bytes + size > cap {
                    match self.caps.when_full {
                        WhenFull::RejectNew => {
                            drop_n(&mut drops, tight_reason);
                            refused = true;
                            continue;
                        }
                        WhenFull::DropOldest => {
                            while self.bytes + size > cap && self.pop_front().is_some() {
                                self.evicted += 1;
                                drop_n(&mut drops, tight_reason);
                            }
                            if self.bytes + size > cap {
                                drop_n(&mut drops, tight_reason);
                                refused = true;
                                continue;
                            }
                        }
                    }
                }
                e.id = self.next_id;
                self.next_id += 1;
                self.stored_total += 1;
                self.bytes += size;
                first_stored.get_or_insert(e.id);
                self.rows.push_back(Row { event: e, size });
                x.stored += 1;
            }
            x.acks.push((
                *n,
                if refused {
                    Taken::Refused
                } else {
                    Taken::Stored
                },
            ));
        }
        // Dead letters (the group's, then upstream's) under their cap.
        letters.append(&mut upstream_letters);
        let dlq_touched = !p.dlq_remove.is_empty() || !letters.is_empty();
        if dlq_touched {
            for id in &p.dlq_remove {
                if let Some(pos) = self.dlq.iter().position(|l| l.id == *id) {
                    let l = self.dlq.remove(pos).unwrap();
                    self.dlq_bytes -= l.size;
                }
            }
            let first_next = self.next_dlq_id;
            for letter in letters {
                let size = row_size(dlq::encode(&letter).len());
                if size > self.caps.dlq_max_bytes {
                    drop_n(&mut drops, DropReason::DlqFull);
                    continue;
                }
                while self.dlq_bytes + size > self.caps.dlq_max_bytes {
                    let l = self.dlq.pop_front().unwrap();
                    self.dlq_bytes -= l.size;
                    drop_n(&mut drops, DropReason::DlqFull);
                }
                self.dlq.push_back(MLetter {
                    id: self.next_dlq_id,
                    letter,
                    size,
                });
                self.next_dlq_id += 1;
                self.dlq_bytes += size;
            }
            if self.next_dlq_id != first_next {
                self.meta.insert(dlq::NEXT_DLQ_ID.into(), self.next_dlq_id);
            }
            self.meta.insert(dlq::DLQ_BYTES.into(), self.dlq_bytes);
        }
        let state_written = !pending.is_empty();
        for (k, v) in pending {
            match v {
                Some(v) => self.state.insert(k, v),
                None => self.state.remove(&k),
            };
        }
        // 3. Arrivals: this group's time, expiry, groups left empty.
        if let Some(first) = first_stored {
            let now = mono_ms();
            if self.groups.is_empty()
                || self
                    .last_mark
                    .is_none_or(|m| now - m >= interval_ms(self.caps.max_age_ms))
            {
                self.groups.push_back((first, wall));
                self.last_mark = Some(now);
            }
        }
        while let Some(&(_, t)) = self.groups.front() {
            if wall < t + interval + max_age {
                break;
            }
            let bound = self.groups.get(1).map(|g| g.0);
            while self
                .rows
                .front()
                .is_some_and(|r| bound.is_none_or(|b| r.event.id < b))
            {
                self.pop_front();
                self.evicted += 1;
                drop_n(&mut drops, DropReason::MaxAge);
            }
            self.groups.pop_front();
        }
        match self.rows.front().map(|r| r.event.id) {
            None => self.groups.clear(),
            Some(low) => {
                while self.groups.get(1).is_some_and(|g| g.0 <= low) {
                    self.groups.pop_front();
                }
            }
        }
        // 4. Meta, when the commit writes at all.
        let changed = x.stored > 0 || x.acked > 0 || !drops.is_empty() || dlq_touched;
        if !(quiet && !changed && !state_written) {
            self.meta.insert("next_id".into(), self.next_id);
            self.meta.insert("stored_bytes".into(), self.bytes);
            for (label, n) in drops {
                let r = DropReason::ALL
                    .into_iter()
                    .find(|r| r.label() == label)
                    .unwrap();
                self.count_drop(r, n);
            }
        }
        x
    }

    /// The store's contents the model expects.
    fn snap(&self) -> Snap {
        Snap {
            events: self
                .rows
                .iter()
                .map(|r| (r.event.id, r.event.topic.clone(), payload_text(&r.event)))
                .collect(),
            meta: self.meta.clone(),
            dlq: self
                .dlq
                .iter()
                .map(|l| Letter {
                    id: l.id,
                    rule: l.letter.rule.clone(),
                    error: l.letter.error.clone(),
                    event: (l.letter.event.topic.clone(), payload_text(&l.letter.event)),
                })
                .collect(),
            state: self.state.clone(),
            arrivals: self.groups.iter().copied().collect(),
        }
    }

    /// A start: the forwarder starts over, a new run starts its own groups.
    fn restarted(&mut self) {
        self.cursor = 0;
        self.inflight.clear();
        self.last_mark = None;
    }

    /// Every id given out is buffered, delivered, dropped or a dead letter, once.
    fn check_books(&self) {
        assert_eq!(
            self.stored_total,
            self.rows.len() as u64
                + self.delivered.len() as u64
                + self.evicted
                + self.upstream_dead,
            "the model's own books"
        );
        assert_eq!(self.bytes, self.rows.iter().map(|r| r.size).sum::<u64>());
    }
}

// ----- Running a case. -----

fn real_plan(p: &MPlan, acks: &Arc<Mutex<Vec<(u64, Taken)>>>) -> Plan {
    let group = p
        .inputs
        .iter()
        .map(|(n, input)| {
            let log = acks.clone();
            let n = *n;
            Incoming {
                event: input_event(n, input),
                ack: Some(Box::new(move |t| log.lock().unwrap().push((n, t)))),
                dedup: None,
                bad: bad_of(input),
            }
        })
        .collect();
    let mut plan = Plan::with_group(group);
    plan.acked = p.acked.clone();
    plan.upstream_dead = p
        .upstream_dead
        .iter()
        .map(|(id, r)| (0, *id, r.clone()))
        .collect();
    plan.tight = p.tight;
    plan.evict_bytes = p.evict_bytes;
    plan.dlq_remove = p.dlq_remove.clone();
    plan
}

/// A case in progress: both sides, and the power cut's settings.
pub(super) struct Run {
    pub caps: Caps,
    pub disk: SimDisk,
    pub real: Real,
    pub m: Model,
    rng: fastrand::Rng,
    acks: Arc<Mutex<Vec<(u64, Taken)>>>,
    /// What a power cut keeps, and whether it tears a write.
    pub cut: (Keep, bool),
    /// Power cuts recovered from.
    pub cuts: u64,
    n: u64,
    batch: u64,
}

impl Run {
    pub fn new(caps: Caps, seed: u64) -> Run {
        reset_clocks();
        let disk = SimDisk::new();
        Run {
            real: Real::open(&disk, &caps),
            m: Model::new(caps.clone()),
            caps,
            disk,
            rng: fastrand::Rng::with_seed(seed),
            acks: Arc::default(),
            cut: (Keep::Nothing, false),
            cuts: 0,
            n: 0,
            batch: 0,
        }
    }

    fn number(&mut self, inputs: &[Input]) -> Vec<(u64, Input)> {
        inputs
            .iter()
            .map(|i| {
                self.n += 1;
                (self.n, i.clone())
            })
            .collect()
    }

    /// Commits `p` on both sides: `Some` when the commit returned, `None` when the power
    /// went during it (recovery checked, the gateway started again).
    fn commit(&mut self, p: &MPlan, at: &str) -> Option<(CommitReport, Expect)> {
        self.acks.lock().unwrap().clear();
        let before = self.m.clone();
        let r = self.real.lp.commit_plan(real_plan(p, &self.acks));
        let mut after = self.m.clone();
        let x = after.commit(p);
        match r {
            Ok(report) => {
                self.m = after;
                Some((report, x))
            }
            Err(e) => {
                assert!(
                    self.disk.is_down(),
                    "a commit failed by itself: {e} at {at}"
                );
                assert!(
                    self.acks.lock().unwrap().is_empty(),
                    "a failed commit acknowledged its sources at {at}"
                );
                self.recover(before, Some(after), at);
                None
            }
        }
    }

    /// The power is cut now (or was, during a commit that failed): the disk keeps what
    /// `self.cut` says; reopened, redb's integrity check passes and the store equals the
    /// model `before` the commit in flight or, if it may have been made, `after` it.
    pub fn recover(&mut self, before: Model, after: Option<Model>, at: &str) {
        self.disk.disarm();
        // The power goes before the old database is dropped: a clean close must not save it.
        let (keep, tear) = self.cut;
        self.disk.restore(keep, tear, &mut self.rng);
        self.cuts += 1;
        drop(self.take_real());
        {
            let mut db = schema::open_backend(self.disk.backend(), "sim", 1 << 20, None)
                .unwrap_or_else(|e| panic!("reopen after the cut: {e} at {at}"));
            assert!(
                db.check_integrity().unwrap(),
                "integrity after the cut at {at}"
            );
        }
        self.real = Real::open(&self.disk, &self.caps);
        let got = self.real.snap();
        self.m = match after {
            Some(after) if got != before.snap() => {
                assert_eq!(
                    got,
                    after.snap(),
                    "neither before nor after the commit, at {at}"
                );
                after
            }
            _ => {
                assert_eq!(
                    got,
                    before.snap(),
                    "the store lost a commit that returned, at {at}"
                );
                before
            }
        };
        self.m.restarted();
    }

    /// Runs one step; `false` when the power went during it.
    pub fn step(&mut self, step: &Step, at: &str) -> bool {
        // The steps that are one commit say which; it is made after the match.
        let plan = match step {
            Step::Ingest { inputs, tight } => Some(MPlan {
                inputs: self.number(inputs),
                tight: tight.is_some(),
                evict_bytes: tight.unwrap_or(0),
                ..MPlan::default()
            }),
            Step::Read(max) => {
                let m = &mut self.m;
                let got =
                    read_after(&self.real.store.db().unwrap(), m.cursor, *max, u64::MAX).unwrap();
                let want: Vec<&Row> = m
                    .rows
                    .iter()
                    .filter(|r| r.event.id > m.cursor)
                    .take(*max)
                    .collect();
                let got: Vec<(u64, &String, &Payload)> =
                    got.iter().map(|e| (e.id, &e.topic, &e.payload)).collect();
                let want_v: Vec<(u64, &String, &Payload)> = want
                    .iter()
                    .map(|r| (r.event.id, &r.event.topic, &r.event.payload))
                    .collect();
                assert_eq!(got, want_v, "batch read at {at}");
                if let Some(last) = want.last().map(|r| r.event.id) {
                    m.inflight.push_back((m.cursor + 1, last));
                    m.cursor = last;
                }
                None
            }
            Step::Puback(k) => {
                if self.m.inflight.is_empty() {
                    return true;
                }
                let mut plan = MPlan::default();
                for _ in 0..(*k).clamp(1, self.m.inflight.len()) {
                    let range = self.m.inflight.pop_front().unwrap();
                    plan.acked.push(self.ack(range));
                }
                Some(plan)
            }
            Step::PubackOne(n) => {
                if self.m.inflight.is_empty() {
                    return true;
                }
                let range = self.m.inflight.remove(n % self.m.inflight.len()).unwrap();
                Some(MPlan {
                    acked: vec![self.ack(range)],
                    ..MPlan::default()
                })
            }
            Step::Reconnect => {
                self.m.inflight.clear();
                self.m.cursor = 0;
                None
            }
            Step::StaleAck => {
                let Some((from, up_to)) = self.m.last_acked else {
                    return true;
                };
                Some(MPlan {
                    acked: vec![ForwardAck {
                        sink: 0,
                        from,
                        up_to,
                        batch: self.batch,
                    }],
                    ..MPlan::default()
                })
            }
            Step::TooBig(k) => {
                let ids: Vec<u64> = self
                    .m
                    .rows
                    .iter()
                    .map(|r| r.event.id)
                    .filter(|&id| id <= self.m.cursor)
                    .collect();
                if ids.is_empty() {
                    return true;
                }
                let id = ids[k % ids.len()];
                Some(MPlan {
                    upstream_dead: vec![(id, format!("exceeds upstream max_packet: event {id}"))],
                    ..MPlan::default()
                })
            }
            Step::Wait(ms) => {
                advance(*ms);
                Some(MPlan::default())
            }
            Step::DropLetters(k) => {
                let ids: Vec<u64> = self.m.dlq.iter().take(*k as usize).map(|l| l.id).collect();
                if ids.is_empty() {
                    return true;
                }
                let req = commit::DlqRequest {
                    limit: Some(*k),
                    ..Default::default()
                };
                let before = self.m.clone();
                let mut after = self.m.clone();
                after.commit(&MPlan {
                    dlq_remove: ids.clone(),
                    ..MPlan::default()
                });
                match self.real.lp.drop_dead_letters(&req) {
                    Ok(dropped) => {
                        assert_eq!(dropped, ids.len() as u64, "{at}");
                        self.m = after;
                    }
                    Err(e) => {
                        assert!(
                            self.disk.is_down(),
                            "dlq drop failed by itself: {e} at {at}"
                        );
                        self.recover(before, Some(after), at);
                        return false;
                    }
                }
                None
            }
            Step::Restart => {
                drop(self.take_real());
                self.real = Real::open(&self.disk, &self.caps);
                self.m.restarted();
                None
            }
            Step::Crash {
                inputs,
                at: op,
                keep,
                tear,
            } => {
                let p = MPlan {
                    inputs: self.number(inputs),
                    ..MPlan::default()
                };
                self.cut = (*keep, *tear);
                self.disk.cut_after(*op);
                if let Some((report, x)) = self.commit(&p, at) {
                    // It returned before the power went, which goes now.
                    self.check_commit(&report, &x, at);
                    let now = self.m.clone();
                    self.recover(now, None, at);
                }
                None
            }
        };
        if let Some(p) = plan {
            let Some((report, x)) = self.commit(&p, at) else {
                return false;
            };
            self.check_commit(&report, &x, at);
        }
        true
    }

    /// The PUBACK of the batch that covers `from..=up_to` (the forwarder's message).
    fn ack(&mut self, (from, up_to): (u64, u64)) -> ForwardAck {
        self.batch += 1;
        self.m.last_acked = Some((from, up_to));
        ForwardAck {
            sink: 0,
            from,
            up_to,
            batch: self.batch,
        }
    }

    /// The loop and its store, taken out (a stand-in on an empty disk takes their place).
    fn take_real(&mut self) -> Real {
        std::mem::replace(&mut self.real, Real::open(&SimDisk::new(), &self.caps))
    }

    fn check_commit(&self, report: &CommitReport, x: &Expect, at: &str) {
        assert_eq!(*self.acks.lock().unwrap(), x.acks, "acks at {at}");
        assert_eq!(
            (report.stored, report.acked),
            (x.stored, x.acked),
            "stored and acked at {at}"
        );
    }

    /// After every step: the store equals the model, and so does the rule stage's state.
    pub fn check(&self, at: &str) {
        self.m.check_books();
        assert_eq!(
            self.real.snap(),
            self.m.snap(),
            "store and model differ at {at}"
        );
        assert_eq!(
            *self.real.state.lock().unwrap(),
            self.m.state,
            "the rule stage's state at {at}"
        );
    }

    /// Ids still rise: the next event stored gets the id after every id given out.
    pub fn check_ids_rise(&mut self, at: &str) {
        let next = self.m.next_id;
        let r = self
            .real
            .lp
            .commit_plan(Plan::with_group(vec![Incoming::plain(input_event(
                0,
                &Input::Event(Act::Keep, 0),
            ))]))
            .unwrap();
        let snap = self.real.snap();
        assert_eq!(snap.meta["next_id"], next + r.stored, "{at}");
        if r.stored == 1 {
            assert_eq!(snap.events.last().map(|e| e.0), Some(next), "{at}");
        }
    }
}

/// Runs one case; panics (naming the step) where the store and the model disagree.
pub(super) fn run_case(caps: Caps, steps: &[Step], seed: u64) {
    let mut run = Run::new(caps, seed);
    for (i, step) in steps.iter().enumerate() {
        let at = format!("step {i} ({step:?}) of seed {seed}");
        run.step(step, &at);
        run.check(&at);
    }
    run.check_ids_rise(&format!("the end of seed {seed}"));
}

// ----- Generators. -----

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        6 => Just(Act::Keep),
        1 => Just(Act::Drop),
        1 => (2u8..4).prop_map(Act::Fan),
        1 => Just(Act::Fail),
        1 => (0u8..4, any::<u8>()).prop_map(|(k, v)| Act::Set(k, v)),
        1 => (0u8..4).prop_map(Act::Del),
    ]
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        12 => (act(), prop_oneof![3 => 0usize..64, 1 => 64usize..1500])
            .prop_map(|(a, p)| Input::Event(a, p)),
        1 => (any::<bool>(), 1usize..200).prop_map(|(o, l)| Input::Bad(o, l)),
    ]
}

fn inputs() -> impl Strategy<Value = Vec<Input>> {
    prop::collection::vec(input(), 1..12)
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        10 => (inputs(), prop::option::weighted(0.1, 0u64..600))
            .prop_map(|(inputs, tight)| Step::Ingest { inputs, tight }),
        4 => (1usize..8).prop_map(Step::Read),
        2 => (1usize..3).prop_map(Step::Puback),
        2 => any::<usize>().prop_map(Step::PubackOne),
        1 => Just(Step::Reconnect),
        1 => Just(Step::StaleAck),
        1 => any::<usize>().prop_map(Step::TooBig),
        2 => prop_oneof![0u64..150, 150u64..2500].prop_map(Step::Wait),
        1 => (0u64..4).prop_map(Step::DropLetters),
        1 => Just(Step::Restart),
        1 => (
            inputs(),
            1u64..40,
            prop_oneof![Just(Keep::Nothing), Just(Keep::Prefix), Just(Keep::Subset)],
            any::<bool>()
        )
            .prop_map(|(inputs, at, keep, tear)| Step::Crash {
                inputs,
                at,
                keep,
                tear
            }),
    ]
}

fn caps() -> impl Strategy<Value = Caps> {
    (
        prop_oneof![Just(512u64), 2_048u64..16_384, Just(u64::MAX / 2)],
        prop_oneof![Just(WhenFull::DropOldest), Just(WhenFull::RejectNew)],
        prop_oneof![Just(1_600u64), Just(3_600_000u64)],
        prop_oneof![Just(300u64), 600u64..6_000, Just(16u64 << 20)],
    )
        .prop_map(|(max_bytes, when_full, max_age_ms, dlq_max_bytes)| Caps {
            max_bytes,
            when_full,
            max_age_ms,
            dlq_max_bytes,
        })
}

fn cases() -> u32 {
    std::env::var("TIDEPOOL_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_store_agrees_with_its_model(
        caps in caps(),
        steps in prop::collection::vec(step(), 1..40),
        seed in any::<u64>(),
    ) {
        run_case(caps, &steps, seed);
    }
}
