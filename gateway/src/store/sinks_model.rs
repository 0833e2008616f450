//! Model test of several sinks: per-sink cursors, acknowledgements in any order, dead letters
//! per sink and their retry to that sink only, sinks added and removed across restarts, and
//! power cuts (the simulated disk of `simdisk.rs`) in the middle of any commit.
//!
//! The real side is the commit loop on a store on a simulated disk, with forwarders played by
//! the test: each sink reads its next batch from the real store after its cursor (skipping
//! what it acknowledged and what its filters do not take), and acknowledges batches in any
//! order. The model is plain maps. After every step both must agree on the stored events, the
//! dead letters, the `no_sink` drops and each sink's stored start and acknowledged ranges; and
//! no event is ever deleted while a sink that takes it has not acknowledged it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use tokio::sync::{mpsc, watch};

use super::model::{buffer_cfg, mono, opener, reset_clocks, wall, Caps, Scripted, State};
use super::simdisk::{Keep, SimDisk};
use super::sinks::{self, note_range, SinkSpec};
use super::{commit, schema, CommitLoop, ForwardAck, Plan, Store};
use crate::admin::metrics::Metrics;
use crate::config::WhenFull;
use crate::event::{Event, Payload};
use crate::ingest::Incoming;

/// The sink sets a case moves between (index = configuration).
fn config(c: u8) -> Vec<SinkSpec> {
    let fnk = SinkSpec {
        name: "fn".into(),
        filters: vec!["b/#".into()],
    };
    let x = SinkSpec {
        name: "x".into(),
        filters: vec!["a/#".into(), "b/1/#".into()],
    };
    match c % 5 {
        0 => vec![SinkSpec::all(sinks::UPSTREAM), fnk],
        1 => vec![SinkSpec::all(sinks::UPSTREAM), fnk, x],
        2 => vec![fnk, x],
        // One sink: its acknowledgements delete outright, no ranges are kept.
        3 => vec![SinkSpec::all(sinks::UPSTREAM)],
        _ => vec![fnk],
    }
}

/// A forwarder's view of its sink.
#[derive(Debug, Clone, Default)]
struct View {
    /// What it skips: acknowledged (or dead-lettered) ranges, and ids before its start.
    skip: BTreeMap<u64, u64>,
    cursor: u64,
    /// Batches in flight: (from, to, ids in it).
    inflight: Vec<(u64, u64, Vec<u64>)>,
}

impl View {
    fn skips(&self, id: u64) -> bool {
        matches!(self.skip.range(..=id).next_back(), Some((_, &to)) if to >= id)
    }
}

/// One sink in the model.
#[derive(Debug, Clone)]
struct MSink {
    spec: SinkSpec,
    start: u64,
    /// Acknowledged ranges as the store keeps them (pruned).
    acked: BTreeMap<u64, u64>,
}

impl MSink {
    fn owes(&self, id: u64, topic: &str) -> bool {
        id >= self.start
            && self.spec.takes(topic)
            && !matches!(self.acked.range(..=id).next_back(), Some((_, &to)) if to >= id)
    }
}

#[derive(Debug, Clone)]
struct Model {
    /// id → topic.
    rows: BTreeMap<u64, String>,
    next_id: u64,
    sinks: Vec<MSink>,
    /// (rule, topic) in the order written.
    dlq: Vec<(String, String)>,
    no_sink: u64,
    /// A sink went: the next commit sweeps.
    sweep: bool,
}

impl Model {
    fn owed(&self, id: u64, topic: &str) -> bool {
        self.sinks.iter().any(|s| s.owes(id, topic))
    }

    fn multi(&self) -> bool {
        self.sinks.len() > 1
    }

    /// Sink `s` acknowledged `from..=to`.
    fn ack(&mut self, s: usize, from: u64, to: u64) {
        if self.multi() {
            // What it had acknowledged before changes hands no more (the store passes over it).
            let had = self.sinks[s].acked.clone();
            note_range(&mut self.sinks[s].acked, from, to);
            let gone: Vec<u64> = self
                .rows
                .range(from..=to)
                .filter(
                    |(id, _)| !matches!(had.range(..=**id).next_back(), Some((_, &t)) if t >= **id),
                )
                .filter(|(id, t)| !self.owed(**id, t))
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                self.rows.remove(&id);
            }
        } else {
            let gone: Vec<u64> = self.rows.range(from..=to).map(|(id, _)| *id).collect();
            for id in gone {
                self.rows.remove(&id);
            }
        }
    }

    fn rule(&self, i: usize) -> String {
        match self.sinks[i].spec.name.as_str() {
            sinks::UPSTREAM => commit::UPSTREAM_RULE.into(),
            n => format!("{}{n}", commit::SINK_RULE_PREFIX),
        }
    }

    /// The sweep and the pruning every commit does.
    fn finish_commit(&mut self) {
        if self.sweep {
            let gone: Vec<u64> = self
                .rows
                .iter()
                .filter(|(id, t)| !self.owed(**id, t))
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                let t = self.rows.remove(&id).unwrap();
                // Delivered to a remaining sink that takes it, or dropped.
                if !self.sinks.iter().any(|s| id >= s.start && s.spec.takes(&t)) {
                    self.no_sink += 1;
                }
            }
            self.sweep = false;
        }
        if self.multi() {
            let lowest = self.rows.keys().next().copied().unwrap_or(self.next_id);
            for s in &mut self.sinks {
                sinks::prune(&mut s.acked, lowest);
            }
        }
    }

    fn delete_unowed(&mut self, from: u64, to: u64) {
        let gone: Vec<u64> = self
            .rows
            .range(from..=to)
            .filter(|(id, t)| !self.owed(**id, t))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.rows.remove(&id);
        }
    }

    fn append(&mut self, topic: String) -> Option<u64> {
        if !self.sinks.iter().any(|s| s.spec.takes(&topic)) {
            self.no_sink += 1;
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.rows.insert(id, topic);
        Some(id)
    }

    /// Registration at start with `specs`.
    fn register(&mut self, specs: &[SinkSpec]) {
        let mut list = Vec::new();
        for spec in specs {
            match self.sinks.iter().find(|s| s.spec.name == spec.name) {
                Some(s) => list.push(s.clone()),
                None => list.push(MSink {
                    spec: spec.clone(),
                    start: self.next_id,
                    acked: BTreeMap::new(),
                }),
            }
        }
        if self
            .sinks
            .iter()
            .any(|s| !specs.iter().any(|p| p.name == s.spec.name))
        {
            self.sweep = true;
        }
        self.sinks = list;
    }
}

/// What the store holds, as compared.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    rows: BTreeMap<u64, String>,
    dlq: Vec<(String, String)>,
    no_sink: u64,
    /// name → (start, ranges).
    sinks: BTreeMap<String, (u64, BTreeMap<u64, u64>)>,
}

fn seen_of(m: &Model) -> Seen {
    Seen {
        rows: m.rows.clone(),
        dlq: m.dlq.clone(),
        no_sink: m.no_sink,
        sinks: m
            .sinks
            .iter()
            .map(|s| (s.spec.name.clone(), (s.start, s.acked.clone())))
            .collect(),
    }
}

struct Real {
    store: Store,
    lp: CommitLoop,
    _ends: (
        crate::ingest::channel::IngestTx,
        mpsc::UnboundedSender<commit::ForwardMsg>,
        watch::Receiver<u64>,
    ),
    _rt: tokio::runtime::Runtime,
}

fn caps() -> Caps {
    Caps {
        max_bytes: u64::MAX,
        when_full: WhenFull::DropOldest,
        max_age_ms: 3_600_000,
        dlq_max_bytes: u64::MAX,
    }
}

impl Real {
    fn open(disk: &SimDisk, specs: &[SinkSpec]) -> Real {
        let store = Store::with_opener(opener(disk), &std::env::temp_dir(), 1 << 20).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (tx, rx) = crate::ingest::channel::channel(16, 1 << 20);
        let (atx, arx) = mpsc::unbounded_channel();
        let (ctx, crx) = watch::channel(0);
        let lp = CommitLoop::new(
            store.clone(),
            buffer_cfg(&caps()),
            Arc::new(Metrics::default()),
            Box::new(Scripted::new(Arc::new(Mutex::new(State::new())))),
            rx,
            arx,
            ctx,
            rt.handle().clone(),
        )
        .unwrap()
        .with_clocks(wall, mono)
        .with_sinks(specs)
        .unwrap();
        Real {
            store,
            lp,
            _ends: (tx, atx, crx),
            _rt: rt,
        }
    }

    fn seen(&self, names: &[String]) -> Seen {
        use redb::{ReadableDatabase, ReadableTable};
        let db = self.store.db().unwrap();
        let snap = super::model::snapshot(&*db);
        let mut sinks = BTreeMap::new();
        for n in names {
            sinks.insert(n.clone(), sinks::load(&*db, n).unwrap());
        }
        // Ranges of a sink no longer configured must be gone from the table too.
        let txn = db.begin_read().unwrap();
        if let Ok(t) = txn.open_table(sinks::SINK_ACKS) {
            for r in t.iter().unwrap() {
                let (k, _) = r.unwrap();
                assert!(
                    names.iter().any(|n| n == k.value().0),
                    "ranges of a removed sink {} stayed",
                    k.value().0
                );
            }
        }
        Seen {
            rows: snap
                .events
                .iter()
                .map(|(id, t, _)| (*id, t.clone()))
                .collect(),
            dlq: snap
                .dlq
                .iter()
                .map(|l| (l.rule.clone(), l.event.0.clone()))
                .collect(),
            no_sink: snap.meta.get("dropped.no_sink").copied().unwrap_or(0),
            sinks,
        }
    }
}

/// An operation of a case.
#[derive(Debug, Clone)]
enum Step {
    /// One commit of events on these topics (0: `a/N`, 1: `b/N`, 2: `b/1/N`, 3: `c/N`).
    Ingest(Vec<u8>),
    /// Sink `s` (modulo) reads a batch of at most `n` events.
    Read(usize, usize),
    /// Sink `s` gets the PUBACK (2xx) of its `k`-th batch in flight: one commit.
    Ack(usize, usize),
    /// Sink `s` cannot take the first event of its `k`-th batch: dead-lettered.
    Dead(usize, usize),
    /// Sink `s` reconnects: what was in flight is read again.
    Reconnect(usize),
    /// `tidepool dlq retry`.
    Retry,
    /// The gateway restarts with sink set `c`.
    Restart(u8),
    /// The power goes at the `at`-th write of the next commit of this step, keeping what
    /// `keep` says of the unsynced writes, maybe tearing one.
    Cut {
        step: Box<Step>,
        at: u64,
        keep: Keep,
        tear: bool,
    },
}

struct Run {
    disk: SimDisk,
    real: Real,
    m: Model,
    views: Vec<View>,
    config: u8,
    n: u64,
    batch: u64,
    rng: fastrand::Rng,
    /// What the next cut keeps of the unsynced writes, and whether one is torn.
    cut: (Keep, bool),
    /// Independent of the model: per sink name, the ids it acknowledged or dead-lettered in
    /// commits that took effect, and the ids it never owed (retried for another sink).
    got_by: BTreeMap<String, std::collections::BTreeSet<u64>>,
    exempt: BTreeMap<String, std::collections::BTreeSet<u64>>,
    /// The real store's rows after the last step.
    last_rows: BTreeMap<u64, String>,
}

fn topic(kind: u8, n: u64) -> String {
    match kind % 4 {
        0 => format!("a/{n}"),
        1 => format!("b/{n}"),
        2 => format!("b/1/{n}"),
        _ => format!("c/{n}"),
    }
}

impl Run {
    fn new(seed: u64) -> Run {
        reset_clocks();
        let disk = SimDisk::new();
        let specs = config(0);
        let real = Real::open(&disk, &specs);
        let mut m = Model {
            rows: BTreeMap::new(),
            next_id: 1,
            sinks: Vec::new(),
            dlq: Vec::new(),
            no_sink: 0,
            sweep: false,
        };
        // The first time: `upstream` starts at 0, the others at the next id (1, a new store).
        m.sinks = specs
            .iter()
            .map(|s| MSink {
                spec: s.clone(),
                start: u64::from(s.name != sinks::UPSTREAM),
                acked: BTreeMap::new(),
            })
            .collect();
        let mut r = Run {
            disk,
            real,
            m,
            views: Vec::new(),
            config: 0,
            n: 0,
            batch: 0,
            rng: fastrand::Rng::with_seed(seed),
            cut: (Keep::Nothing, false),
            got_by: BTreeMap::new(),
            exempt: BTreeMap::new(),
            last_rows: BTreeMap::new(),
        };
        r.fresh_views();
        r
    }

    fn names(&self) -> Vec<String> {
        self.m.sinks.iter().map(|s| s.spec.name.clone()).collect()
    }

    /// Forwarders starting: each loads what its sink acknowledged from the store.
    fn fresh_views(&mut self) {
        let db = self.real.store.db().unwrap();
        self.views = self
            .m
            .sinks
            .iter()
            .map(|s| {
                let (start, mut skip) = sinks::load(&*db, &s.spec.name).unwrap();
                if start > 0 {
                    note_range(&mut skip, 0, start - 1);
                }
                View {
                    skip,
                    ..View::default()
                }
            })
            .collect();
    }

    fn check(&mut self, at: &str) {
        let seen = self.real.seen(&self.names());
        assert_eq!(seen, seen_of(&self.m), "at {at}");
        // Whatever left the store left it with every sink that takes it done with it.
        for (id, topic) in &self.last_rows {
            if seen.rows.contains_key(id) {
                continue;
            }
            for s in &self.m.sinks {
                let name = &s.spec.name;
                if *id < s.start || !s.spec.takes(topic) {
                    continue;
                }
                let done = self.got_by.get(name).is_some_and(|g| g.contains(id))
                    || self.exempt.get(name).is_some_and(|g| g.contains(id));
                assert!(
                    done,
                    "{id} ({topic}) left the store before sink {name} had it, at {at}"
                );
            }
        }
        self.last_rows = seen.rows;
    }

    fn got(&mut self, sink: usize, ids: &[u64]) {
        let name = self.m.sinks[sink].spec.name.clone();
        self.got_by
            .entry(name)
            .or_default()
            .extend(ids.iter().copied());
    }

    /// The real commit of `plan` and the model's `f`; a cut during it is recovered.
    /// Whether the commit took effect (returned, or survived the cut).
    fn commit(&mut self, plan: Plan, f: impl FnOnce(&mut Model), at: &str) -> bool {
        let before = self.m.clone();
        let mut after = self.m.clone();
        f(&mut after);
        after.finish_commit();
        match self.real.lp.commit_plan(plan) {
            Ok(_) => {
                self.m = after;
                true
            }
            Err(e) => {
                assert!(
                    self.disk.is_down(),
                    "a commit failed by itself: {e} at {at}"
                );
                self.recover(before, Some(after), at)
            }
        }
    }

    /// Whether the store came back with the commit in flight made.
    fn recover(&mut self, before: Model, after: Option<Model>, at: &str) -> bool {
        self.disk.disarm();
        let (keep, tear) = self.cut;
        self.disk.restore(keep, tear, &mut self.rng);
        {
            let mut db = schema::open_backend(self.disk.backend(), "sim", 1 << 20, None)
                .unwrap_or_else(|e| panic!("reopen after the cut: {e} at {at}"));
            assert!(
                db.check_integrity().unwrap(),
                "integrity after the cut at {at}"
            );
        }
        let specs = config(self.config);
        self.real = Real::open(&self.disk, &specs);
        let names = self.names();
        let got = self.real.seen(&names);
        let made = after.is_some() && got != seen_of(&before);
        self.m = match after {
            Some(a) if got != seen_of(&before) => {
                assert_eq!(
                    got,
                    seen_of(&a),
                    "neither before nor after the commit, at {at}"
                );
                a
            }
            _ => {
                assert_eq!(
                    got,
                    seen_of(&before),
                    "the store lost a commit that returned, at {at}"
                );
                before
            }
        };
        self.fresh_views();
        made
    }

    fn step(&mut self, step: &Step, at: &str) {
        let k = self.m.sinks.len();
        match step {
            Step::Ingest(kinds) => {
                let topics: Vec<String> = kinds
                    .iter()
                    .map(|kind| {
                        self.n += 1;
                        topic(*kind, self.n)
                    })
                    .collect();
                let group = topics
                    .iter()
                    .map(|t| {
                        Incoming::plain(Event {
                            id: 0,
                            ts: wall(),
                            source: "t".into(),
                            topic: t.clone(),
                            payload: Payload::Json("{}".into()),
                            trace: Default::default(),
                            properties: Vec::new(),
                        })
                    })
                    .collect();
                self.commit(
                    Plan::with_group(group),
                    |m| {
                        for t in topics {
                            m.append(t);
                        }
                    },
                    at,
                );
            }
            Step::Read(s, n) => {
                let s = s % k;
                // A forwarder skips what it acknowledged and what the store counts as done
                // for it (a dead letter retried for another sink).
                let mut v = self.views[s].clone();
                let db = self.real.store.db().unwrap();
                for (from, to) in sinks::load(&*db, &self.m.sinks[s].spec.name).unwrap().1 {
                    note_range(&mut v.skip, from, to);
                }
                let mut mv = self.views[s].clone();
                for (from, to) in &self.m.sinks[s].acked {
                    note_range(&mut mv.skip, *from, *to);
                }
                let spec = &self.m.sinks[s].spec;
                let got: Vec<u64> = {
                    use redb::ReadableDatabase;
                    let txn = db.begin_read().unwrap();
                    let t = txn.open_table(super::EVENTS).unwrap();
                    let mut out = Vec::new();
                    for row in t.range(v.cursor + 1..).unwrap() {
                        let (id, val) = row.unwrap();
                        let e = super::decode(id.value(), val.value()).unwrap();
                        if v.skips(e.id) || !spec.takes(&e.topic) {
                            continue;
                        }
                        out.push(e.id);
                        if out.len() >= (*n).max(1) {
                            break;
                        }
                    }
                    out
                };
                // The model: every row it holds that this sink owes, after the cursor.
                let want: Vec<u64> = self
                    .m
                    .rows
                    .range(v.cursor + 1..)
                    .filter(|(id, t)| !mv.skips(**id) && spec.takes(t))
                    .map(|(id, _)| *id)
                    .take((*n).max(1))
                    .collect();
                assert_eq!(got, want, "sink {} reads at {at}", spec.name);
                for id in &want {
                    assert!(
                        self.m.sinks[s].owes(*id, &self.m.rows[id]),
                        "sink {} reads {id} it does not owe, at {at}",
                        spec.name
                    );
                }
                if let Some(&last) = got.last() {
                    let v = &mut self.views[s];
                    v.inflight.push((v.cursor + 1, last, got));
                    v.cursor = last;
                }
            }
            Step::Ack(s, i) => {
                let s = s % k;
                if self.views[s].inflight.is_empty() {
                    return;
                }
                let i = i % self.views[s].inflight.len();
                let (from, to, ids) = self.views[s].inflight.remove(i);
                note_range(&mut self.views[s].skip, from, to);
                self.batch += 1;
                let plan = Plan {
                    acked: vec![ForwardAck {
                        sink: s,
                        from,
                        up_to: to,
                        batch: self.batch,
                    }],
                    ..Plan::default()
                };
                if self.commit(plan, |m| m.ack(s, from, to), at) {
                    self.got(s, &ids);
                }
            }
            Step::Dead(s, i) => {
                let s = s % k;
                if self.views[s].inflight.is_empty() {
                    return;
                }
                let i = i % self.views[s].inflight.len();
                let id = self.views[s].inflight[i].2[0];
                note_range(&mut self.views[s].skip, id, id);
                let plan = Plan {
                    upstream_dead: vec![(s, id, "too big".into())],
                    ..Plan::default()
                };
                let rule = self.m.rule(s);
                let made = self.commit(
                    plan,
                    |m| {
                        if let Some(t) = m.rows.get(&id).cloned() {
                            m.dlq.push((rule, t));
                            if m.multi() {
                                note_range(&mut m.sinks[s].acked, id, id);
                                m.delete_unowed(id, id);
                            } else {
                                m.rows.remove(&id);
                            }
                        }
                    },
                    at,
                );
                if made {
                    self.got(s, &[id]);
                }
            }
            Step::Reconnect(s) => {
                let v = &mut self.views[s % k];
                v.inflight.clear();
                v.cursor = 0;
            }
            Step::Retry => {
                let before = self.m.clone();
                let mut after = self.m.clone();
                let mut stay = Vec::new();
                let mut targets = Vec::new();
                for (rule, t) in std::mem::take(&mut after.dlq) {
                    let name = if rule == commit::UPSTREAM_RULE {
                        sinks::UPSTREAM
                    } else {
                        rule.strip_prefix(commit::SINK_RULE_PREFIX).unwrap()
                    };
                    // Back to its sink only if that sink is here and takes it.
                    let Some(only) = after
                        .sinks
                        .iter()
                        .position(|x| x.spec.name == name && x.spec.takes(&t))
                    else {
                        stay.push((rule, t));
                        continue;
                    };
                    if let Some(id) = after.append(t) {
                        targets.push((id, only));
                        if after.multi() {
                            for (j, x) in after.sinks.iter_mut().enumerate() {
                                if j != only {
                                    note_range(&mut x.acked, id, id);
                                }
                            }
                        }
                    }
                }
                after.dlq = stay;
                let had = !before.dlq.is_empty();
                after.finish_commit();
                let made = match self
                    .real
                    .lp
                    .retry_dead_letters(&commit::DlqRequest::default())
                {
                    Ok(_) => {
                        if had {
                            self.m = after;
                        }
                        had
                    }
                    Err(e) => {
                        assert!(self.disk.is_down(), "a retry failed by itself: {e} at {at}");
                        self.recover(before, had.then_some(after), at)
                    }
                };
                if made {
                    // A letter retried for one sink was never the others' to deliver.
                    for (id, only) in targets {
                        for (j, x) in self.m.sinks.iter().enumerate() {
                            if j != only {
                                self.exempt
                                    .entry(x.spec.name.clone())
                                    .or_default()
                                    .insert(id);
                            }
                        }
                    }
                }
            }
            Step::Restart(c) => {
                drop(std::mem::replace(
                    &mut self.real,
                    Real::open(&SimDisk::new(), &[]),
                ));
                self.config = *c;
                let specs = config(*c);
                self.real = Real::open(&self.disk, &specs);
                self.m.register(&specs);
                self.fresh_views();
            }
            Step::Cut {
                step,
                at: n,
                keep,
                tear,
            } => {
                self.cut = (*keep, *tear);
                self.disk.cut_after(*n);
                self.step(step, at);
                if self.disk.is_down() {
                    // The cut came after the step's commit (or it wrote nothing): the power
                    // goes now, with the step done.
                    let m = self.m.clone();
                    let _ = self.recover(m, None, at);
                } else {
                    self.disk.disarm();
                }
            }
        }
    }
}

fn step() -> impl Strategy<Value = Step> {
    // The steps that are one commit (a cut goes in the middle of one).
    let commits = prop_oneof![
        4 => prop::collection::vec(0u8..4, 1..8).prop_map(Step::Ingest),
        4 => (0usize..3, 0usize..4).prop_map(|(s, i)| Step::Ack(s, i)),
        1 => (0usize..3, 0usize..4).prop_map(|(s, i)| Step::Dead(s, i)),
        1 => Just(Step::Retry),
    ];
    prop_oneof![
        10 => commits.clone(),
        4 => (0usize..3, 1usize..5).prop_map(|(s, n)| Step::Read(s, n)),
        1 => (0usize..3).prop_map(Step::Reconnect),
        1 => (0u8..5).prop_map(Step::Restart),
        2 => (
            commits,
            1u64..40,
            prop_oneof![Just(Keep::Nothing), Just(Keep::Prefix), Just(Keep::Subset)],
            any::<bool>()
        )
            .prop_map(|(s, at, keep, tear)| Step::Cut {
                step: Box::new(s),
                at,
                keep,
                tear,
            }),
    ]
}

fn cases() -> u32 {
    std::env::var("TIDEPOOL_SINK_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(target_arch = "x86_64") {
            1000
        } else {
            100
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn several_sinks_agree_with_their_model(
        steps in prop::collection::vec(step(), 1..40),
        seed in any::<u64>(),
    ) {
        let mut r = Run::new(seed);
        for (i, s) in steps.iter().enumerate() {
            let at = format!("step {i} {s:?}");
            r.step(s, &at);
            r.check(&at);
        }
    }
}
