//! The commit loop: the store's only writer, on a thread of its own.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, WriteTransaction};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::{
    decode, encode, row_size, StoreError, DEAD_LETTERS, EVENTS, INGEST_DEDUP, META, RULE_STATE,
};
use crate::admin::metrics::{DropReason, Metrics};
use crate::config::{BufferConfig, WhenFull};
use crate::event::{now_ms, Event};
use crate::rules::{LocalPublish, RuleStage, StepOutput};

/// Called once the event it came with is committed (client-mode PUBACK, serial ack).
pub type AckFn = Box<dyn FnOnce() + Send>;

/// Redelivery detection for a client-mode MQTT message.
#[derive(Debug, Clone, Copy)]
pub struct Dedup {
    /// The broker's packet id.
    pub pkid: u16,
    /// Hash of topic and payload.
    pub hash: u64,
    /// The broker set DUP: this may be a redelivery.
    pub dup: bool,
}

/// One event from ingest, with what to do once it is committed.
pub struct Incoming {
    /// The event (id 0).
    pub event: Event,
    /// Called after the commit that stored it (or decided not to).
    pub ack: Option<AckFn>,
    /// Client-mode redelivery detection.
    pub dedup: Option<Dedup>,
    /// A frame that could not be decoded: dead-lettered (raw bytes in the event) and counted.
    pub bad: Option<(DropReason, String)>,
}

impl Incoming {
    /// An event with no ack and no dedup.
    pub fn plain(event: Event) -> Incoming {
        Incoming {
            event,
            ack: None,
            dedup: None,
            bad: None,
        }
    }
}

/// From the forwarder: upstream acknowledged every event up to `up_to`, in batch `batch`.
#[derive(Debug, Clone, Copy)]
pub struct ForwardAck {
    /// Highest acknowledged id.
    pub up_to: u64,
    /// That batch's number.
    pub batch: u64,
}

/// From the forwarder, in the order it decided them.
#[derive(Debug, Clone)]
pub enum ForwardMsg {
    /// Upstream acknowledged a batch: its events go.
    Ack(ForwardAck),
    /// Upstream cannot take this event (over its packet size limit): move it from `events` to
    /// the dead-letter table (rule `upstream`, the reason as error).
    DeadLetter {
        /// The event's id.
        id: u64,
        /// Why, e.g. "exceeds upstream max_packet 128000 B: packet 140213 B".
        reason: String,
    },
}

/// The store's writer.
pub struct CommitLoop {
    db: Arc<Database>,
    cfg: BufferConfig,
    metrics: Arc<Metrics>,
    rules: Box<dyn RuleStage>,
    input: mpsc::Receiver<Incoming>,
    acks: mpsc::UnboundedReceiver<ForwardMsg>,
    committed: watch::Sender<u64>,
    rt: tokio::runtime::Handle,
    // In-memory mirrors of `meta`, valid between commits.
    next_id: u64,
    stored_bytes: u64,
    backlog: u64,
    last_expiry: Instant,
    publisher: Option<Publisher>,
    control: Option<mpsc::UnboundedReceiver<Control>>,
    dlq_remove: Vec<u64>,
    tick: Duration,
    next_tick: Instant,
    last_status: Instant,
}

/// Requests to the commit loop from the admin endpoint (`tidepool dlq` with the daemon running).
#[derive(Debug)]
pub enum Control {
    /// Re-run dead letters (all, or these ids) through the rules; answers a summary.
    DlqRetry(
        Option<Vec<u64>>,
        tokio::sync::oneshot::Sender<Result<String, String>>,
    ),
    /// Delete dead letters (all, or these ids); answers a summary.
    DlqDrop(
        Option<Vec<u64>>,
        tokio::sync::oneshot::Sender<Result<String, String>>,
    ),
}

/// Sends rule publishes to local subscribers, after the commit.
pub type Publisher = Box<dyn FnMut(&LocalPublish) + Send>;

/// Running totals of one commit.
struct Tally {
    next_id: u64,
    bytes: u64,
    backlog: u64,
    last_stored: Option<u64>,
}

/// What one commit did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CommitReport {
    /// Events stored.
    pub stored: u64,
    /// Events removed after upstream acknowledged them.
    pub acked: u64,
    /// Redeliveries recognised and skipped.
    pub deduped: u64,
    /// Dropped by the rule stage.
    pub dropped_rule: u64,
    /// Dropped for `max_bytes`.
    pub dropped_full: u64,
    /// Dropped for `max_age`.
    pub dropped_age: u64,
    /// Inputs rules failed on, now in the dead-letter table.
    pub dead_lettered: u64,
    /// Dead letters removed (retried or dropped).
    pub dlq_removed: u64,
    /// Serial frames that could not be decoded.
    pub dropped_bad_frame: u64,
    /// Serial frames over `max_frame`.
    pub dropped_oversize: u64,
}

impl CommitLoop {
    /// Prepares the loop; `committed` is told the highest committed id after every commit.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        db: Arc<Database>,
        cfg: BufferConfig,
        metrics: Arc<Metrics>,
        rules: Box<dyn RuleStage>,
        input: mpsc::Receiver<Incoming>,
        acks: mpsc::UnboundedReceiver<ForwardMsg>,
        committed: watch::Sender<u64>,
        rt: tokio::runtime::Handle,
    ) -> Result<CommitLoop, StoreError> {
        let st = super::stats(&*db)?;
        let mut rules = rules;
        {
            use redb::ReadableDatabase;
            let txn = db.begin_read()?;
            let table = txn.open_table(RULE_STATE)?;
            let mut entries = Vec::new();
            for row in table.iter()? {
                let (k, v) = row?;
                let (rule, key) = k.value();
                entries.push(((rule.to_string(), key.to_string()), v.value().to_vec()));
            }
            rules.load_state(entries);
        }
        metrics.backlog_events.store(st.backlog_events, Relaxed);
        metrics.backlog_bytes.store(st.backlog_bytes, Relaxed);
        metrics.oldest_ts.store(st.oldest_ts.unwrap_or(0), Relaxed);
        metrics.dlq_events.store(st.dlq_events, Relaxed);
        committed.send_replace(st.next_id - 1);
        Ok(CommitLoop {
            db,
            cfg,
            metrics,
            rules,
            input,
            acks,
            committed,
            rt,
            next_id: st.next_id,
            stored_bytes: st.backlog_bytes,
            backlog: st.backlog_events,
            last_expiry: Instant::now() - Duration::from_secs(3600),
            publisher: None,
            control: None,
            dlq_remove: Vec::new(),
            tick: Duration::from_secs(10),
            next_tick: Instant::now() + Duration::from_secs(10),
            last_status: Instant::now() - Duration::from_secs(10),
        })
    }

    /// Where rule publishes go (after each commit).
    pub fn with_publisher(mut self, p: Publisher) -> Self {
        self.publisher = Some(p);
        self
    }

    /// Where admin requests come from.
    pub fn with_control(mut self, rx: mpsc::UnboundedReceiver<Control>) -> Self {
        self.control = Some(rx);
        self
    }

    /// Re-runs dead letters (all, or `ids`) through the rules in one commit: they leave the
    /// dead-letter table, and what the rules make of them now is stored (or dead-lettered
    /// again). Returns (retried, failed again).
    pub fn retry_dead_letters(&mut self, ids: Option<&[u64]>) -> Result<(u64, u64), StoreError> {
        let rows = super::dlq_list(&*self.db, ids)?;
        if rows.is_empty() {
            return Ok((0, 0));
        }
        let group: Vec<Incoming> = rows
            .iter()
            .map(|(_, d)| {
                let mut e = d.event.clone();
                e.id = 0;
                Incoming::plain(e)
            })
            .collect();
        self.dlq_remove = rows.iter().map(|(id, _)| *id).collect();
        let r = self.commit(&group, None, false, None);
        self.dlq_remove.clear();
        let r = r?;
        Ok((rows.len() as u64, r.dead_lettered))
    }

    /// Deletes dead letters (all, or `ids`) in one commit; returns how many went.
    pub fn drop_dead_letters(&mut self, ids: Option<&[u64]>) -> Result<u64, StoreError> {
        let rows = super::dlq_list(&*self.db, ids)?;
        self.dlq_remove = rows.iter().map(|(id, _)| *id).collect();
        let r = self.commit(&[], None, false, None);
        self.dlq_remove.clear();
        r?;
        Ok(rows.len() as u64)
    }

    fn on_control(&mut self, c: Control) {
        match c {
            Control::DlqRetry(ids, reply) => {
                let r = self
                    .retry_dead_letters(ids.as_deref())
                    .map(|(n, again)| format!("retried {n} dead letters; {again} failed again"))
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Control::DlqDrop(ids, reply) => {
                let r = self
                    .drop_dead_letters(ids.as_deref())
                    .map(|n| format!("dropped {n} dead letters"))
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
        }
    }

    /// The period of `on_tick`.
    pub fn with_tick(mut self, every: Duration) -> Self {
        self.tick = every.max(Duration::from_millis(10));
        self.next_tick = Instant::now() + self.tick;
        self
    }

    /// Runs until both ingest and the forwarder have hung up, committing everything received.
    pub fn run(mut self) {
        let rt = self.rt.clone();
        let _guard = rt.enter();
        let mut input_open = true;
        let mut acks_open = true;
        let max = self.cfg.commit_max_events;
        let linger = self.cfg.commit_max_wait.0;
        while input_open || acks_open {
            let mut group: Vec<Incoming> = Vec::new();
            let mut acked: Option<ForwardAck> = None;
            enum Wake {
                In(Option<Incoming>),
                Ack(Option<ForwardMsg>),
                Control(Option<Control>),
                Tick,
            }
            self.rules.reload();
            self.metrics.heartbeat.store(now_ms(), Relaxed);
            if self.last_status.elapsed() >= Duration::from_millis(250) {
                *self.metrics.rules_status.lock().unwrap() = self.rules.status();
                self.last_status = Instant::now();
            }
            let idle = Duration::from_secs(1)
                .min(self.next_tick.saturating_duration_since(Instant::now()));
            let control_open = self.control.is_some();
            let wake = self.rt.block_on(async {
                let control = async {
                    match self.control.as_mut() {
                        Some(c) => c.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    m = self.input.recv(), if input_open => Wake::In(m),
                    a = self.acks.recv(), if acks_open => Wake::Ack(a),
                    c = control, if control_open => Wake::Control(c),
                    _ = tokio::time::sleep(idle) => Wake::Tick,
                }
            });
            match wake {
                Wake::In(Some(m)) => group.push(m),
                Wake::In(None) => input_open = false,
                Wake::Ack(Some(ForwardMsg::Ack(a))) => acked = Some(a),
                Wake::Ack(Some(ForwardMsg::DeadLetter { id, reason })) => {
                    self.dead_letter_upstream(id, &reason)
                }
                Wake::Ack(None) => acks_open = false,
                Wake::Control(Some(c)) => {
                    self.on_control(c);
                    continue;
                }
                Wake::Control(None) => self.control = None,
                Wake::Tick => {}
            }
            if !group.is_empty() {
                let deadline = tokio::time::Instant::now() + linger;
                while group.len() < max {
                    match self.input.try_recv() {
                        Ok(m) => group.push(m),
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            input_open = false;
                            break;
                        }
                        Err(mpsc::error::TryRecvError::Empty) => {
                            match self
                                .rt
                                .block_on(tokio::time::timeout_at(deadline, self.input.recv()))
                            {
                                Ok(Some(m)) => group.push(m),
                                Ok(None) => {
                                    input_open = false;
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                    }
                }
            }
            loop {
                match self.acks.try_recv() {
                    Ok(ForwardMsg::DeadLetter { id, reason }) => {
                        self.dead_letter_upstream(id, &reason)
                    }
                    Ok(ForwardMsg::Ack(a)) => {
                        if acked.is_none_or(|b| a.up_to > b.up_to) {
                            acked = Some(a)
                        }
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        acks_open = false;
                        break;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                }
            }
            let expire = self.last_expiry.elapsed() >= Duration::from_secs(1);
            let tick = if Instant::now() >= self.next_tick {
                self.next_tick = Instant::now() + self.tick;
                self.rules.wants_tick().then(now_ms)
            } else {
                None
            };
            if group.is_empty() && acked.is_none() && !expire && tick.is_none() {
                continue;
            }
            self.commit_with_retry(group, acked, expire, tick);
        }
        info!(next_id = self.next_id, "store: commit loop stopped");
    }

    /// Moves event `id` from `events` to the dead-letter table in a commit of its own (the
    /// forwarder asks before it sends any later ack, so the ack that follows cannot delete
    /// the row first). While the store fails this is retried, as a commit is: ingest waits,
    /// and the row is never deleted unrecorded by a later ack.
    fn dead_letter_upstream(&mut self, id: u64, reason: &str) {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.try_dead_letter_upstream(id, reason) {
                Ok(Some(size)) => {
                    self.stored_bytes = self.stored_bytes.saturating_sub(size);
                    self.backlog = self.backlog.saturating_sub(1);
                    let m = &self.metrics;
                    m.fsyncs.fetch_add(1, Relaxed);
                    m.backlog_events.store(self.backlog, Relaxed);
                    m.backlog_bytes.store(self.stored_bytes, Relaxed);
                    m.dlq_events.fetch_add(1, Relaxed);
                    m.upstream_sizes.dead_lettered.fetch_add(1, Relaxed);
                    warn!(id, reason, "event dead-lettered: upstream cannot take it");
                    break;
                }
                Ok(None) => break, // already gone (max_age, drop_oldest)
                Err(e) => {
                    if self.metrics.store_healthy.swap(false, Relaxed) {
                        error!(id, error = %e, "store: could not dead-letter an event upstream refuses; retrying, ingest is held");
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        if !self.metrics.store_healthy.swap(true, Relaxed) {
            info!("store: commits succeed again");
        }
    }

    /// One transaction: the row out of `events`, into `dead_letters`; its stored size.
    fn try_dead_letter_upstream(
        &mut self,
        id: u64,
        reason: &str,
    ) -> Result<Option<u64>, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .expect("no persistent savepoints are used");
        let size;
        {
            let mut events = txn.open_table(EVENTS)?;
            let Some(value) = events.remove(id)? else {
                return Ok(None);
            };
            size = row_size(value.value().len());
            let event = decode(id, value.value())?;
            drop(value);
            let mut meta = txn.open_table(META)?;
            let dlq_id = meta.get("next_dlq_id")?.map(|v| v.value()).unwrap_or(1);
            let row = serde_json::to_vec(&crate::rules::DeadLetter {
                rule: "upstream".into(),
                error: reason.to_string(),
                at: now_ms(),
                event,
            })
            .expect("dead letter to JSON");
            txn.open_table(DEAD_LETTERS)?
                .insert(dlq_id, row.as_slice())?;
            meta.insert("next_dlq_id", dlq_id + 1)?;
            meta.insert("stored_bytes", self.stored_bytes.saturating_sub(size))?;
        }
        commit_txn(txn)?;
        Ok(Some(size))
    }

    /// Commits, retrying while the store fails: ingest waits (backpressure) instead of losing.
    fn commit_with_retry(
        &mut self,
        mut group: Vec<Incoming>,
        acked: Option<ForwardAck>,
        expire: bool,
        tick: Option<i64>,
    ) {
        let mut acks: Vec<AckFn> = group.iter_mut().filter_map(|m| m.ack.take()).collect();
        let mut delay = Duration::from_millis(100);
        loop {
            match self.commit(&group, acked, expire, tick) {
                Ok(_) => {
                    if !self.metrics.store_healthy.swap(true, Relaxed) {
                        info!("store: commits succeed again");
                    }
                    for a in acks.drain(..) {
                        a();
                    }
                    return;
                }
                Err(e) => {
                    if self.metrics.store_healthy.swap(false, Relaxed) {
                        error!(error = %e, events = group.len(), "store: commit failed; ingest is held until it succeeds");
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One write transaction: upstream acks, the group (and a tick) through the rule stage,
    /// dead letters and rule state, caps, meta. Rule publishes are sent after it commits.
    pub fn commit(
        &mut self,
        group: &[Incoming],
        acked: Option<ForwardAck>,
        expire: bool,
        tick: Option<i64>,
    ) -> Result<CommitReport, StoreError> {
        match self.commit_inner(group, acked, expire, tick) {
            Ok((report, publishes)) => {
                self.rules.commit_state();
                if let Some(p) = self.publisher.as_mut() {
                    for m in &publishes {
                        p(m);
                    }
                }
                Ok(report)
            }
            Err(e) => {
                self.rules.rollback_state();
                Err(e)
            }
        }
    }

    fn commit_inner(
        &mut self,
        group: &[Incoming],
        acked: Option<ForwardAck>,
        expire: bool,
        tick: Option<i64>,
    ) -> Result<(CommitReport, Vec<LocalPublish>), StoreError> {
        let started = Instant::now();
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .expect("no persistent savepoints are used");
        let mut report = CommitReport::default();
        let mut t = Tally {
            next_id: self.next_id,
            bytes: self.stored_bytes,
            backlog: self.backlog,
            last_stored: None,
        };
        let publishes;
        {
            let mut events = txn.open_table(EVENTS)?;
            let mut meta = txn.open_table(META)?;
            let mut dedup = txn.open_table(INGEST_DEDUP)?;

            // 1. What upstream acknowledged goes.
            if let Some(a) = acked {
                while let Some((k, v)) = first_at_or_below(&mut events, a.up_to)? {
                    t.bytes = t.bytes.saturating_sub(row_size(v));
                    t.backlog = t.backlog.saturating_sub(1);
                    events.remove(k)?;
                    report.acked += 1;
                }
                meta.insert("next_batch", a.batch + 1)?;
            }

            // 2. The group, through the rule stage, given ids, appended under the caps.
            let mut out = StepOutput::default();
            for m in group {
                if let Some(d) = m.dedup {
                    if d.dup {
                        if let Some(prev) = dedup.get(d.pkid)? {
                            if prev.value().0 == d.hash {
                                report.deduped += 1;
                                continue;
                            }
                        }
                    }
                }
                if let Some((reason, why)) = &m.bad {
                    out.dead_letters.push(crate::rules::DeadLetter {
                        rule: m.event.source.clone(),
                        error: why.clone(),
                        at: now_ms(),
                        event: m.event.clone(),
                    });
                    match reason {
                        DropReason::Oversize => report.dropped_oversize += 1,
                        _ => report.dropped_bad_frame += 1,
                    }
                    continue;
                }
                self.rules.on_event(m.event.clone(), &mut out);
                for e in out.events.drain(..) {
                    append(&self.cfg, &mut events, e, &mut t, &mut report)?;
                }
                if let Some(d) = m.dedup {
                    dedup.insert(d.pkid, (d.hash, t.next_id - 1))?;
                }
            }
            if let Some(now) = tick {
                self.rules.on_tick(now, &mut out);
                for e in out.events.drain(..) {
                    append(&self.cfg, &mut events, e, &mut t, &mut report)?;
                }
            }
            report.dropped_rule += out.dropped;

            // Dead letters and rule state, in the same transaction as the outputs.
            if !self.dlq_remove.is_empty() {
                let mut dlq = txn.open_table(DEAD_LETTERS)?;
                for id in &self.dlq_remove {
                    if dlq.remove(*id)?.is_some() {
                        report.dlq_removed += 1;
                    }
                }
            }
            if !out.dead_letters.is_empty() {
                let mut dlq = txn.open_table(DEAD_LETTERS)?;
                let mut id = meta.get("next_dlq_id")?.map(|v| v.value()).unwrap_or(1);
                for d in out.dead_letters.drain(..) {
                    let row = serde_json::to_vec(&d).expect("dead letter to JSON");
                    dlq.insert(id, row.as_slice())?;
                    id += 1;
                    report.dead_lettered += 1;
                }
                meta.insert("next_dlq_id", id)?;
            }
            let writes = self.rules.pending_state();
            if !writes.is_empty() {
                let mut state = txn.open_table(RULE_STATE)?;
                for ((rule, key), v) in writes {
                    match v {
                        Some(v) => {
                            state.insert((rule.as_str(), key.as_str()), v.as_slice())?;
                        }
                        None => {
                            state.remove((rule.as_str(), key.as_str()))?;
                        }
                    }
                }
            }
            publishes = std::mem::take(&mut out.publishes);

            // 3. What got too old goes.
            if expire {
                let cutoff = now_ms() - self.cfg.max_age.0.as_millis() as i64;
                loop {
                    let old = match events.first()? {
                        Some((k, v)) => {
                            let e = decode(k.value(), v.value())?;
                            (e.ts < cutoff).then(|| (k.value(), v.value().len()))
                        }
                        None => None,
                    };
                    let Some((k, len)) = old else { break };
                    events.remove(k)?;
                    t.bytes = t.bytes.saturating_sub(row_size(len));
                    t.backlog = t.backlog.saturating_sub(1);
                    report.dropped_age += 1;
                }
            }

            // 4. Meta.
            meta.insert("next_id", t.next_id)?;
            meta.insert("stored_bytes", t.bytes)?;
            for (reason, n) in [
                (DropReason::Rule, report.dropped_rule),
                (DropReason::BufferFull, report.dropped_full),
                (DropReason::MaxAge, report.dropped_age),
                (DropReason::BadFrame, report.dropped_bad_frame),
                (DropReason::Oversize, report.dropped_oversize),
            ] {
                if n > 0 {
                    let key = format!("dropped.{}", reason.label());
                    let prev = meta.get(key.as_str())?.map(|v| v.value()).unwrap_or(0);
                    meta.insert(key.as_str(), prev + n)?;
                }
            }
            debug_assert_eq!(events.len()?, t.backlog);
            let oldest = match events.first()? {
                Some((k, v)) => decode(k.value(), v.value())?.ts,
                None => 0,
            };
            self.metrics.oldest_ts.store(oldest, Relaxed);
        }
        commit_txn(txn)?;
        let took = started.elapsed();
        if expire {
            self.last_expiry = Instant::now();
        }
        let Tally {
            next_id,
            bytes,
            backlog,
            last_stored,
        } = t;
        self.next_id = next_id;
        self.stored_bytes = bytes;
        self.backlog = backlog;
        let m = &self.metrics;
        m.observe_commit(took);
        m.fsyncs.fetch_add(1, Relaxed);
        m.committed.fetch_add(report.stored, Relaxed);
        m.backlog_events.store(backlog, Relaxed);
        m.backlog_bytes.store(bytes, Relaxed);
        m.dropped(DropReason::Rule, report.dropped_rule);
        m.dropped(DropReason::BufferFull, report.dropped_full);
        m.dropped(DropReason::MaxAge, report.dropped_age);
        m.dropped(DropReason::BadFrame, report.dropped_bad_frame);
        m.dropped(DropReason::Oversize, report.dropped_oversize);
        m.dlq_events.fetch_add(report.dead_lettered, Relaxed);
        m.dlq_events
            .fetch_sub(report.dlq_removed.min(m.dlq_events.load(Relaxed)), Relaxed);
        if report.dropped_full > 0 {
            warn!(dropped = report.dropped_full, policy = ?self.cfg.when_full, "buffer full: events dropped");
        }
        if report.dropped_age > 0 {
            warn!(
                dropped = report.dropped_age,
                "events older than max_age dropped"
            );
        }
        if let Some(id) = last_stored {
            self.committed.send_replace(id);
        } else if report.dropped_full > 0 || report.dropped_age > 0 {
            // Rows went: let the forwarder re-read.
            self.committed.send_modify(|_| {});
        }
        Ok((report, publishes))
    }
}

/// Appends one event under the buffer caps, giving it the next id.
fn append(
    cfg: &BufferConfig,
    events: &mut redb::Table<u64, &[u8]>,
    mut e: Event,
    t: &mut Tally,
    report: &mut CommitReport,
) -> Result<(), StoreError> {
    let value = encode(&e);
    let size = row_size(value.len());
    if t.bytes + size > cfg.max_bytes.0 {
        match cfg.when_full {
            WhenFull::RejectNew => {
                report.dropped_full += 1;
                return Ok(());
            }
            WhenFull::DropOldest => {
                while t.bytes + size > cfg.max_bytes.0 {
                    match events.pop_first()? {
                        Some((_, v)) => {
                            t.bytes = t.bytes.saturating_sub(row_size(v.value().len()));
                            t.backlog = t.backlog.saturating_sub(1);
                            report.dropped_full += 1;
                        }
                        None => break,
                    }
                }
                if t.bytes + size > cfg.max_bytes.0 {
                    // Larger than the whole buffer.
                    report.dropped_full += 1;
                    return Ok(());
                }
            }
        }
    }
    e.id = t.next_id;
    t.next_id += 1;
    events.insert(e.id, value.as_slice())?;
    t.bytes += size;
    t.backlog += 1;
    report.stored += 1;
    t.last_stored = Some(e.id);
    Ok(())
}

fn commit_txn(txn: WriteTransaction) -> Result<(), StoreError> {
    txn.commit()?;
    Ok(())
}

/// The first row, if its id is at most `max`: (id, stored value length).
fn first_at_or_below(
    events: &mut redb::Table<u64, &[u8]>,
    max: u64,
) -> Result<Option<(u64, usize)>, StoreError> {
    Ok(match events.first()? {
        Some((k, v)) if k.value() <= max => Some((k.value(), v.value().len())),
        _ => None,
    })
}
