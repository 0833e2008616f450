//! The commit loop: the store's only writer, on a thread of its own.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::arrivals::{self, Arrivals};
use super::space::{below_min_free, commit_headroom, fs_space, worth_compacting};
use super::{
    dedup, encode, row_size, Store, StoreError, ARRIVALS, DEAD_LETTERS, EVENTS, META, RULE_STATE,
};
use crate::admin::metrics::{DropReason, Metrics};
use crate::config::{BufferConfig, WhenFull};
use crate::event::{now_ms, Event};
use crate::ingest::channel::{unbudgeted, IngestRx, Queued};
pub use crate::ingest::{AckFn, Dedup, Incoming, Taken};
use crate::rules::{LocalPublish, RuleStage, StepOutput};

/// From the forwarder: upstream acknowledged every event with an id in `from..=up_to`, in
/// batch `batch`. Batches may be acknowledged in any order (live data goes out ahead of a
/// backlog); each covers its own range of ids.
#[derive(Debug, Clone, Copy)]
pub struct ForwardAck {
    /// Which sink (its index in the configured sinks; 0 with one).
    pub sink: usize,
    /// Lowest id the batch covers (0: everything up to `up_to`).
    pub from: u64,
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
        /// Which sink cannot take it.
        sink: usize,
        /// The event's id.
        id: u64,
        /// Why, e.g. "exceeds upstream max_packet 128000 B: packet 140213 B".
        reason: String,
    },
}

/// The store's writer.
pub struct CommitLoop {
    store: Store,
    cfg: BufferConfig,
    metrics: Arc<Metrics>,
    rules: Box<dyn RuleStage>,
    input: IngestRx,
    acks: mpsc::UnboundedReceiver<ForwardMsg>,
    committed: watch::Sender<u64>,
    rt: tokio::runtime::Handle,
    // In-memory mirrors of `meta`, valid between commits.
    next_id: u64,
    stored_bytes: u64,
    backlog: u64,
    arrivals: Arrivals,
    wall: fn() -> i64,
    mono: fn() -> Instant,
    publisher: Option<Publisher>,
    control: Option<mpsc::UnboundedReceiver<Control>>,
    retained: Option<Arc<super::retained::RetainedLog>>,
    broker_acks: Option<Arc<dedup::BrokerAckLog>>,
    tick: Duration,
    next_tick: Instant,
    last_status: Instant,
    /// The write budget: how long groups wait for company.
    budget: super::budget::Budget,
    /// When to look next whether the file is worth compacting.
    next_compact_check: Instant,
    /// The file's length after the last compaction (tried).
    compacted_to: Option<u64>,
    /// When the log last said the write budget holds commits back.
    last_budget_warn: Option<Instant>,
    /// Since when the write budget has been spent without a break.
    spent_since: Option<Instant>,
    /// Bytes of the last group gathered (the tail of a burst is judged with it).
    last_group_bytes: usize,
    /// `dlq_full` drops not yet reported in the log, and when it last was.
    dlq_full_warned: u64,
    /// The sinks and what each still owes.
    sinks: super::sinks::Sinks,
    /// The sinks changed since the last run: the next commit sweeps what nobody owes.
    pending_sweep: bool,
    last_dlq_warn: Option<Instant>,
}

/// Requests to the commit loop from the admin endpoint (`tidepool dlq` with the daemon running).
#[derive(Debug)]
pub enum Control {
    /// Re-run dead letters through the rules; answers a summary.
    DlqRetry(
        DlqRequest,
        tokio::sync::oneshot::Sender<Result<String, String>>,
    ),
    /// Delete dead letters; answers a summary.
    DlqDrop(
        DlqRequest,
        tokio::sync::oneshot::Sender<Result<String, String>>,
    ),
    /// A commands-table write, committed at once on its own (one fsync).
    Command(
        super::commands::CommandOp,
        tokio::sync::oneshot::Sender<Result<super::commands::Applied, String>>,
    ),
}

/// Which dead letters a retry or drop takes.
#[derive(Debug, Clone, Default)]
pub struct DlqRequest {
    /// Only these ids; `None`: all.
    pub ids: Option<Vec<u64>>,
    /// At most this many (oldest first); `None`: no limit.
    pub limit: Option<u64>,
    /// Rows per transaction; `None`: [`super::dlq::PAGE_ROWS`].
    pub page: Option<usize>,
}

impl DlqRequest {
    /// All dead letters, or those with `ids`.
    pub fn ids(ids: Option<&[u64]>) -> DlqRequest {
        DlqRequest {
            ids: ids.map(|i| i.to_vec()),
            ..DlqRequest::default()
        }
    }
}

/// Sends rule publishes to local subscribers, after the commit.
pub type Publisher = Box<dyn FnMut(&LocalPublish) + Send>;

/// Why a commit's group stopped taking events (`tidepool_commit_groups_total{ended}`): what
/// sets how many events share an fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupEnd {
    /// `commit_max_events` reached.
    Full,
    /// Half of `ingest_max_bytes` reached.
    Bytes,
    /// `commit_max_wait` passed (the budget has room).
    Window,
    /// The budget's wider window passed.
    BudgetWindow,
    /// Under a widened window, enough bytes and `commit_max_wait` passed.
    Early,
    /// Under a widened window, the senders went quiet ([`super::budget::stalled`]).
    Stalled,
    /// Ingest closed (shutdown).
    Closed,
    /// No events: acknowledgements or dead letters of the sinks.
    Acks,
    /// No events: a rule tick, expiries, a sweep, retained messages.
    Other,
}

impl GroupEnd {
    /// Every value, in the order metrics list them.
    pub const ALL: [GroupEnd; 9] = [
        GroupEnd::Full,
        GroupEnd::Bytes,
        GroupEnd::Window,
        GroupEnd::BudgetWindow,
        GroupEnd::Early,
        GroupEnd::Stalled,
        GroupEnd::Closed,
        GroupEnd::Acks,
        GroupEnd::Other,
    ];

    /// Its label.
    pub fn label(self) -> &'static str {
        match self {
            GroupEnd::Full => "full",
            GroupEnd::Bytes => "bytes",
            GroupEnd::Window => "window",
            GroupEnd::BudgetWindow => "budget_window",
            GroupEnd::Early => "early",
            GroupEnd::Stalled => "stalled",
            GroupEnd::Closed => "closed",
            GroupEnd::Acks => "acks",
            GroupEnd::Other => "other",
        }
    }
}

/// What one commit is to do, gathered by [`CommitLoop::run`] and turned into one
/// transaction by [`CommitLoop::write`].
#[derive(Default)]
pub struct Plan {
    /// Ingested events, in arrival order.
    pub group: Vec<Queued>,
    /// Upstream acknowledged these ranges of ids: delete them.
    pub acked: Vec<ForwardAck>,
    /// `on_tick(now)` is due.
    pub tick: Option<i64>,
    /// Dead letters to remove (retried or dropped).
    pub dlq_remove: Vec<u64>,
    /// Events stored again as they are, without the rules (sink dead letters retried), each
    /// for one sink only (its index) or, `None`, for all.
    pub reinsert: Vec<(Event, Option<usize>)>,
    /// Events a sink cannot take (sink, id, why): to the dead-letter table, before the
    /// acknowledgements of this plan delete anything (the forwarder sent them in that order).
    pub upstream_dead: Vec<(usize, u64, String)>,
    /// The filesystem is below `min_free` (or was full): the buffer may not grow.
    pub tight: bool,
    /// Evict at least this many stored bytes, oldest first, making room on a full disk.
    pub evict_bytes: u64,
}

impl Plan {
    /// A plan with these events.
    pub fn with_group(group: Vec<Incoming>) -> Plan {
        Plan {
            group: group.into_iter().map(unbudgeted).collect(),
            ..Plan::default()
        }
    }

    fn group_bytes(&self) -> u64 {
        self.group.iter().map(|q| q.size() as u64).sum()
    }
}

/// Running totals of one commit.
struct Tally {
    next_id: u64,
    bytes: u64,
    backlog: u64,
    /// The cap for this commit: `max_bytes`, or what is stored now when `tight`.
    cap: u64,
    /// Drops at the cap count as `min_free` rather than `buffer_full`.
    tight: bool,
    first_stored: Option<u64>,
    last_stored: Option<u64>,
    /// The sinks' views, worked on: kept only if the transaction commits.
    sinks: super::sinks::Sinks,
    /// Sinks whose ranges changed (their ranges before).
    ranges_before: BTreeMap<usize, BTreeMap<u64, u64>>,
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
    /// Dropped because the filesystem was below `min_free` (or full).
    pub dropped_min_free: u64,
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
    /// Dead letters dropped (oldest first) for `dlq_max_bytes`.
    pub dropped_dlq_full: u64,
    /// Events moved to the dead-letter table because upstream cannot take them.
    pub upstream_dead_lettered: u64,
    /// Dropped because no configured sink takes their topic.
    pub dropped_no_sink: u64,
}

/// A transaction that committed, and what must follow it.
struct Written {
    report: CommitReport,
    publishes: Vec<LocalPublish>,
    /// The dead-letter table's (rows, bytes) after the commit, when it changed.
    dlq_after: Option<(u64, u64)>,
    last_stored: Option<u64>,
    took: Duration,
    /// Bytes the commit wrote to the card.
    bytes: u64,
    /// False: the plan turned out to change nothing (a tick with nothing to write), so the
    /// transaction was dropped instead of committed: no write, no fsync.
    committed: bool,
    /// Per event of the group, whether the buffer refused (one of) its outputs.
    refused: Vec<bool>,
}

impl CommitLoop {
    /// Prepares the loop; `committed` is told the highest committed id after every commit.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        cfg: BufferConfig,
        metrics: Arc<Metrics>,
        rules: Box<dyn RuleStage>,
        input: IngestRx,
        acks: mpsc::UnboundedReceiver<ForwardMsg>,
        committed: watch::Sender<u64>,
        rt: tokio::runtime::Handle,
    ) -> Result<CommitLoop, StoreError> {
        store.set_heartbeat(metrics.heartbeat.clone());
        let db = store.db()?;
        let st = super::stats(&*db)?;
        let mut rules = rules;
        let (first_group, has_unknown) = {
            let txn = db.begin_read()?;
            let table = txn.open_table(RULE_STATE)?;
            let mut entries = Vec::new();
            for row in table.iter()? {
                let (k, v) = row?;
                let (rule, key) = k.value();
                entries.push(((rule.to_string(), key.to_string()), v.value().to_vec()));
            }
            rules.load_state(entries);
            arrivals::load(&txn.open_table(ARRIVALS)?)?
        };
        drop(db);
        let arrivals = Arrivals::new(cfg.max_age.0, st.next_id, first_group, has_unknown);
        metrics.backlog_events.store(st.backlog_events, Relaxed);
        metrics.backlog_bytes.store(st.backlog_bytes, Relaxed);
        metrics.oldest_ts.store(arrivals.oldest(), Relaxed);
        let (dlq_events, dlq_bytes) = super::dlq::ensure_bytes(&*store.db()?)?;
        metrics.dlq_events.store(dlq_events, Relaxed);
        metrics.dlq_bytes.store(dlq_bytes, Relaxed);
        committed.send_replace(st.next_id - 1);
        metrics.wear.configure(crate::admin::wear::Limits {
            write_budget: cfg.write_budget.0,
            card_endurance: cfg.card_endurance.0,
            max_bytes: cfg.max_bytes.0,
            min_free: fs_space(store.path())
                .map(|(_, total)| cfg.min_free.bytes(total))
                .unwrap_or(0),
        });
        let budget = super::budget::Budget::new(
            cfg.write_budget.0,
            cfg.commit_max_wait.0,
            cfg.budget_max_wait.0,
            Instant::now(),
        );
        Ok(CommitLoop {
            store,
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
            arrivals,
            wall: now_ms,
            mono: Instant::now,
            publisher: None,
            control: None,
            retained: None,
            broker_acks: None,
            tick: Duration::from_secs(10),
            next_tick: Instant::now() + Duration::from_secs(10),
            last_status: Instant::now() - Duration::from_secs(10),
            budget,
            next_compact_check: Instant::now() + COMPACT_CHECK,
            compacted_to: None,
            last_budget_warn: None,
            spent_since: None,
            last_group_bytes: 0,
            dlq_full_warned: 0,
            sinks: super::sinks::Sinks::default(),
            pending_sweep: false,
            last_dlq_warn: None,
        })
    }

    /// Where rule publishes go (after each commit).
    pub fn with_publisher(mut self, p: Publisher) -> Self {
        self.publisher = Some(p);
        self
    }

    /// Writes the embedded broker's retained-message changes with the commits.
    pub fn with_retained(mut self, log: Arc<super::retained::RetainedLog>) -> Self {
        self.retained = Some(log);
        self
    }

    /// Removes the embedded broker's dedupe entries whose PUBACK was written.
    pub fn with_broker_acks(mut self, log: Arc<dedup::BrokerAckLog>) -> Self {
        self.broker_acks = Some(log);
        self
    }

    /// Where admin requests come from.
    pub fn with_control(mut self, rx: mpsc::UnboundedReceiver<Control>) -> Self {
        self.control = Some(rx);
        self
    }

    /// The configured sinks (`upstream` first when set), registered in the store: a new one
    /// starts with the next id, one gone releases what only it held (swept by the first commit).
    pub fn with_sinks(mut self, specs: &[super::sinks::SinkSpec]) -> Result<Self, StoreError> {
        let db = self.store.db()?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .expect("no persistent savepoints are used");
        let mut r = super::sinks::register(&txn, specs, self.next_id)?;
        let mut changed = r.changed;
        {
            // Remembered until the commit that sweeps: a crash before it must not forget it.
            let mut meta = txn.open_table(META)?;
            if r.sweep {
                if meta.get(SWEEP_KEY)?.is_none() {
                    meta.insert(SWEEP_KEY, 1)?;
                    changed = true;
                }
            } else if meta.get(SWEEP_KEY)?.is_some() && !r.sinks.list.is_empty() {
                r.sweep = true;
            }
        }
        // Nothing new: no commit, so a start on a full disk (or a worn card) writes nothing.
        if changed {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        drop(db);
        if r.sweep {
            info!("store: the sinks changed; events no sink owes any more are released");
        }
        self.sinks = r.sinks;
        self.pending_sweep = r.sweep;
        Ok(self)
    }

    /// The period of `on_tick`.
    pub fn with_tick(mut self, every: Duration) -> Self {
        self.tick = every.max(Duration::from_millis(10));
        self.next_tick = Instant::now() + self.tick;
        self
    }

    /// The clocks the loop ages events by: wall (ms since the epoch) and monotonic; tests
    /// set their own.
    pub fn with_clocks(mut self, wall: fn() -> i64, mono: fn() -> Instant) -> Self {
        self.wall = wall;
        self.mono = mono;
        self
    }

    /// Re-runs dead letters through the whole rule chain, a page (one transaction) at a time:
    /// a page's rows leave the dead-letter table in the commit that stores what the rules make
    /// of them now (or dead-letters them again, under new ids that this retry does not take
    /// up again). Rows that cannot be decoded stay (`drop` removes them). Returns (retried,
    /// failed again).
    pub fn retry_dead_letters(&mut self, req: &DlqRequest) -> Result<(u64, u64), StoreError> {
        let (mut retried, mut again) = (0, 0);
        self.dlq_pages(req, |lp, rows| {
            // What upstream could not take already went through the rules: it goes back to
            // the buffer as it is. The rest runs through the whole chain again.
            // A sink's dead letter goes back to that sink only (a sink no longer configured:
            // it stays).
            enum To {
                Rules(Event),
                Sink(Event, Option<usize>),
                Stay,
            }
            let sinks = lp.sinks.clone();
            let to: Vec<(u64, To)> = rows
                .iter()
                .filter_map(|(id, d)| d.as_ref().ok().map(|d| (*id, d)))
                .map(|(id, d)| {
                    let mut e = d.event.clone();
                    e.id = 0;
                    // Back to its sink, if that sink is still configured and takes it; with
                    // no sinks at all it waits in the buffer, as everything does.
                    let sink = if d.rule == UPSTREAM_RULE {
                        Some(super::sinks::UPSTREAM)
                    } else {
                        d.rule.strip_prefix(SINK_RULE_PREFIX)
                    };
                    let to = match sink {
                        None => To::Rules(e),
                        Some(_) if sinks.list.is_empty() => To::Sink(e, None),
                        Some(name) => match sinks.index(name) {
                            Some(i) if sinks.list[i].spec.takes(&e.topic) => To::Sink(e, Some(i)),
                            _ => To::Stay,
                        },
                    };
                    (id, to)
                })
                .collect();
            let mut plan = Plan::default();
            let mut inputs = Vec::new();
            for (id, t) in to {
                match t {
                    To::Rules(e) => inputs.push(Incoming::plain(e)),
                    To::Sink(e, only) => plan.reinsert.push((e, only)),
                    To::Stay => continue,
                }
                plan.dlq_remove.push(id);
            }
            let n = plan.dlq_remove.len() as u64;
            plan.group = Plan::with_group(inputs).group;
            let r = lp.commit_plan(plan)?;
            retried += n;
            again += r.dead_lettered;
            Ok(())
        })?;
        Ok((retried, again))
    }

    /// Deletes dead letters, a page (one transaction) at a time; returns how many went.
    pub fn drop_dead_letters(&mut self, req: &DlqRequest) -> Result<u64, StoreError> {
        let mut dropped = 0;
        self.dlq_pages(req, |lp, rows| {
            let plan = Plan {
                dlq_remove: rows.iter().map(|(id, _)| *id).collect(),
                ..Plan::default()
            };
            dropped += lp.commit_plan(plan)?.dlq_removed;
            Ok(())
        })?;
        Ok(dropped)
    }

    /// Calls `f` on each page of the dead letters `req` selects, as they are now (rows
    /// written meanwhile are not visited).
    fn dlq_pages(
        &mut self,
        req: &DlqRequest,
        mut f: impl FnMut(
            &mut Self,
            &[(u64, Result<crate::rules::DeadLetter, String>)],
        ) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let below = {
            let txn = self.store.db()?.begin_read()?;
            let meta = txn.open_table(META)?;
            meta.get(super::dlq::NEXT_DLQ_ID)?
                .map(|v| v.value())
                .unwrap_or(1)
        };
        let sel = super::dlq::Select {
            ids: req.ids.clone(),
            below: Some(below),
        };
        let page_rows = req.page.unwrap_or(super::dlq::PAGE_ROWS);
        let mut left = req.limit.unwrap_or(u64::MAX);
        let mut after = 0;
        while left > 0 {
            let want = page_rows.min(usize::try_from(left).unwrap_or(usize::MAX));
            let mut page = super::dlq::page(&*self.store.db()?, &sel, after, want)?;
            let Some(last) = page.last_id() else { break };
            page.rows.truncate(want);
            left -= page.rows.len() as u64;
            after = last;
            f(self, &page.rows)?;
            // A long retry must not look like a stuck loop to the watchdog.
            self.metrics.heartbeat.store(now_ms(), Relaxed);
            if !page.more {
                break;
            }
        }
        Ok(())
    }

    fn on_control(&mut self, c: Control) {
        match c {
            Control::DlqRetry(req, reply) => {
                let r = self
                    .retry_dead_letters(&req)
                    .map(|(n, again)| format!("retried {n} dead letters; {again} failed again"))
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Control::DlqDrop(req, reply) => {
                let r = self
                    .drop_dead_letters(&req)
                    .map(|n| format!("dropped {n} dead letters"))
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Control::Command(op, reply) => {
                let r = self.write_command(&op);
                if r.is_err() {
                    // redb refuses every call after an I/O error until the file is reopened;
                    // the commands task asks again.
                    let _ = self.store.reopen();
                }
                let _ = reply.send(r.map_err(|e| e.to_string()));
            }
        }
    }

    /// One commands-table write in a transaction of its own.
    fn write_command(
        &mut self,
        op: &super::commands::CommandOp,
    ) -> Result<super::commands::Applied, StoreError> {
        let db = self.store.db()?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .expect("no persistent savepoints are used");
        let applied = super::commands::apply(&txn, op)?;
        txn.commit()?;
        Ok(applied)
    }

    /// Runs until both ingest and the forwarder have hung up, committing everything received:
    /// gathers a [`Plan`], turns it into one transaction, applies what follows the commit.
    pub fn run(mut self) {
        let rt = self.rt.clone();
        let _guard = rt.enter();
        let mut open = Open {
            input: true,
            acks: true,
        };
        while open.input || open.acks {
            let Some(plan) = self.gather(&mut open) else {
                continue;
            };
            self.execute(plan);
        }
        // The last acknowledgements may have changed retained messages (ingested retained
        // publishes are routed after their commit): write them before stopping.
        if self.retained.as_ref().is_some_and(|l| l.has_pending()) {
            self.execute(Plan::default());
        }
        info!(next_id = self.next_id, "store: commit loop stopped");
    }

    /// Waits for something to do and gathers it into a plan; `None` when there is nothing
    /// to commit (a wake-up for the heartbeat, an admin request handled).
    fn gather(&mut self, open: &mut Open) -> Option<Plan> {
        enum Wake {
            In(Option<Queued>),
            Ack(Option<ForwardMsg>),
            Control(Option<Control>),
            Idle,
        }
        self.rules.reload();
        self.metrics.heartbeat.store(now_ms(), Relaxed);
        let now = (self.mono)();
        let window = self.budget.window(now);
        self.metrics
            .commit_window_us
            .store(window.as_micros() as u64, Relaxed);
        let spent = window > self.cfg.commit_max_wait.0;
        self.metrics.budget_spent.store(spent, Relaxed);
        if !spent {
            self.spent_since = None;
        } else if now.saturating_duration_since(*self.spent_since.get_or_insert(now))
            >= Duration::from_secs(60)
            && self
                .last_budget_warn
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(600))
        {
            self.last_budget_warn = Some(now);
            warn!(
                write_budget_bytes_per_day = self.cfg.write_budget.0,
                window_ms = window.as_millis() as u64,
                budget_max_wait = %self.cfg.budget_max_wait,
                "write budget spent for a minute: commits wait for more events (up to budget_max_wait); a sender that keeps few messages in flight sends at most that many per wait (raise [buffer] write_budget, or \"0\", if it cannot wait; next report in 10 minutes at the earliest)"
            );
        }
        if self.metrics.wear.due(now) {
            let avail = fs_space(self.store.path()).map(|(a, _)| a);
            self.metrics.wear.record(self.metrics.wear_sample(avail));
            self.metrics
                .store_file_bytes
                .store(self.store.file_len(), Relaxed);
        }
        if now >= self.next_compact_check && self.input.is_empty() {
            self.next_compact_check = now + COMPACT_CHECK;
            self.maybe_compact();
        }
        if self.last_status.elapsed() >= Duration::from_millis(250) {
            *self.metrics.rules_status.lock().unwrap() = self.rules.status();
            self.last_status = Instant::now();
        }
        // Sleep until the next tick, the next expiry, or a second (the watchdog's heartbeat).
        let wall = (self.wall)();
        let mut idle = Duration::from_secs(1);
        if self.rules.wants_tick() {
            idle = idle.min(self.next_tick.saturating_duration_since(now));
        }
        if let Some(due) = self.arrivals.due_at() {
            idle = idle.min(Duration::from_millis(due.saturating_sub(wall).max(0) as u64));
        }
        let control_open = self.control.is_some();
        let wake = self.rt.block_on(async {
            let control = async {
                match self.control.as_mut() {
                    Some(c) => c.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                m = self.input.recv(), if open.input => Wake::In(m),
                a = self.acks.recv(), if open.acks => Wake::Ack(a),
                c = control, if control_open => Wake::Control(c),
                _ = tokio::time::sleep(idle) => Wake::Idle,
            }
        });
        let mut plan = Plan::default();
        match wake {
            Wake::In(Some(m)) => plan.group.push(m),
            Wake::In(None) => open.input = false,
            Wake::Ack(Some(msg)) => note_forward(msg, &mut plan.acked, &mut plan.upstream_dead),
            Wake::Ack(None) => open.acks = false,
            Wake::Control(Some(c)) => {
                self.on_control(c);
                return None;
            }
            Wake::Control(None) => self.control = None,
            Wake::Idle => {}
        }
        if plan.group.is_empty()
            && (!plan.acked.is_empty() || !plan.upstream_dead.is_empty())
            && !self.space_is_short()
        {
            self.hold_acks(&mut plan, open);
        }
        let ended = if !plan.group.is_empty() {
            let window = self.budget.window((self.mono)());
            Some(self.fill_group(&mut plan, open, window))
        } else {
            None
        };
        self.take_acks(&mut plan.acked, &mut plan.upstream_dead, open);
        let now = (self.mono)();
        if now >= self.next_tick {
            self.next_tick = now + self.tick;
            plan.tick = self.rules.wants_tick().then_some(wall);
        }
        let arrivals_due = self.arrivals.needs_commit((self.wall)());
        if plan.group.is_empty()
            && plan.acked.is_empty()
            && plan.upstream_dead.is_empty()
            && plan.tick.is_none()
            && !arrivals_due
            && !self.pending_sweep
            && !self.retained.as_ref().is_some_and(|l| l.has_pending())
        {
            return None;
        }
        plan.tight = below_min_free(self.store.path(), self.cfg.min_free, plan.group_bytes());
        let ended = ended.unwrap_or(if plan.acked.is_empty() && plan.upstream_dead.is_empty() {
            GroupEnd::Other
        } else {
            GroupEnd::Acks
        });
        self.metrics.group_ended(ended);
        Some(plan)
    }

    /// Compacts the file when it is mostly empty ([`worth_compacting`]): checked at most once
    /// a minute, when no event is waiting; after a compaction (or a failed one), not again
    /// for ten minutes, nor before the file has grown by a quarter.
    pub(super) fn maybe_compact(&mut self) {
        let file = self.store.file_len();
        if file < super::space::COMPACT_MIN_FILE {
            return;
        }
        let live = match self.store.allocated_bytes() {
            Ok(b) => b,
            Err(_) => return,
        };
        if !worth_compacting(file, live, self.compacted_to) {
            return;
        }
        self.next_compact_check = (self.mono)() + COMPACT_AGAIN;
        let started = Instant::now();
        let written = self.store.written().bytes();
        let r = self.store.compact();
        let wrote = self.store.written().bytes() - written;
        self.budget.charge((self.mono)(), wrote);
        self.metrics
            .store_bytes_written
            .store(self.store.written().bytes(), Relaxed);
        match r {
            Ok((before, after)) => {
                self.compacted_to = Some(after);
                self.metrics.compactions.fetch_add(1, Relaxed);
                self.metrics.store_file_bytes.store(after, Relaxed);
                info!(
                    file_before = before,
                    file_after = after,
                    live,
                    wrote,
                    took_ms = started.elapsed().as_millis() as u64,
                    "store compacted: the file shrank after the backlog drained"
                );
            }
            Err(e) => {
                self.compacted_to = Some(file);
                warn!(error = %e, "store: compaction failed; the file keeps its size")
            }
        }
    }

    /// Whether deletions should not wait: the buffer is near `max_bytes` or the disk near
    /// `min_free`, so the space acknowledged events hold is wanted now.
    fn space_is_short(&self) -> bool {
        self.stored_bytes >= self.cfg.max_bytes.0 / 10 * 9
            || below_min_free(self.store.path(), self.cfg.min_free, 1 << 20)
            || !self.metrics.store_healthy.load(Relaxed)
    }

    /// While the write budget is spent, upstream acknowledgements on their own wait for
    /// company, as long as a group would: deleting what was delivered is not urgent (a crash
    /// before it only resends those events, which carry their ids), and riding along with the
    /// next group saves a commit. The first event to arrive ends the wait (its group then
    /// waits its own window). With room in the budget they commit at once.
    fn hold_acks(&mut self, plan: &mut Plan, open: &mut Open) {
        let window = self.budget.window((self.mono)());
        if window <= self.cfg.commit_max_wait.0 {
            return;
        }
        let deadline = tokio::time::Instant::now() + window;
        while open.input && open.acks {
            let (input, acks, control) = (&mut self.input, &mut self.acks, &mut self.control);
            let control_open = control.is_some();
            let nap = deadline.min(tokio::time::Instant::now() + HEARTBEAT_EVERY);
            let wake = self.rt.block_on(async {
                let admin = next_control(control);
                tokio::select! {
                    m = input.recv() => Some(Ok(Ok(m))),
                    a = acks.recv() => Some(Ok(Err(a))),
                    c = admin, if control_open => Some(Err(c)),
                    _ = tokio::time::sleep_until(nap) => None,
                }
            });
            if wake.is_none() && tokio::time::Instant::now() < deadline {
                // Still waiting: alive, for the watchdog (a window is up to 20 s).
                self.metrics.heartbeat.store(now_ms(), Relaxed);
                continue;
            }
            match wake {
                Some(Ok(Ok(Some(m)))) => {
                    plan.group.push(m);
                    return;
                }
                Some(Ok(Ok(None))) => open.input = false,
                Some(Ok(Err(Some(msg)))) => {
                    note_forward(msg, &mut plan.acked, &mut plan.upstream_dead)
                }
                Some(Ok(Err(None))) => open.acks = false,
                Some(Err(Some(c))) => self.on_control(c),
                Some(Err(None)) => self.control = None,
                None => return,
            }
        }
    }

    /// Waits until `until` for the next event, answering admin requests meanwhile (a wide
    /// commit window must not keep `tidepool dlq` waiting). `None`: the time ran out;
    /// `Some(None)`: ingest has closed.
    fn next_event(&mut self, until: tokio::time::Instant) -> Option<Option<Queued>> {
        loop {
            let (input, control) = (&mut self.input, &mut self.control);
            let control_open = control.is_some();
            let nap = until.min(tokio::time::Instant::now() + HEARTBEAT_EVERY);
            let got = self.rt.block_on(async {
                let admin = next_control(control);
                tokio::select! {
                    m = input.recv() => Ok(m),
                    c = admin, if control_open => Err(Some(c)),
                    _ = tokio::time::sleep_until(nap) => Err(None),
                }
            });
            match got {
                Ok(m) => return Some(m),
                Err(None) if tokio::time::Instant::now() < until => {
                    // Still waiting: alive, for the watchdog (a window is up to 20 s).
                    self.metrics.heartbeat.store(now_ms(), Relaxed);
                }
                Err(None) => return None,
                Err(Some(Some(c))) => self.on_control(c),
                Err(Some(None)) => self.control = None,
            }
        }
    }

    /// Adds to the group what arrives within `window` (`commit_max_wait`, or longer while
    /// the write budget is spent), up to `commit_max_events` and half of `ingest_max_bytes`
    /// (so sources can queue the next group meanwhile).
    fn fill_group(&mut self, plan: &mut Plan, open: &mut Open, window: Duration) -> GroupEnd {
        let max = self.cfg.commit_max_events;
        let max_bytes = (self.cfg.ingest_max_bytes.0 / 2).max(1) as usize;
        let mut bytes: usize = plan.group.iter().map(Queued::size).sum();
        let start = tokio::time::Instant::now();
        let deadline = start + window;
        let early = start + self.cfg.commit_max_wait.0;
        let widened = window > self.cfg.commit_max_wait.0;
        let (first, mut last) = (start.into_std(), start.into_std());
        let mut ended = GroupEnd::Full;
        while plan.group.len() < max && bytes < max_bytes {
            let (mut until, mut why) = if bytes >= super::budget::ENOUGH && early < deadline {
                (early, GroupEnd::Early)
            } else {
                (
                    deadline,
                    if widened {
                        GroupEnd::BudgetWindow
                    } else {
                        GroupEnd::Window
                    },
                )
            };
            // While the budget holds the group back: its senders may have stopped (their
            // windows are in it, or their burst is over), and then waiting only slows them.
            if widened {
                // The last group counts too: the tail of a burst is a small group.
                let size = bytes.max(self.last_group_bytes);
                if let Some(t) = super::budget::stalled(plan.group.len(), size, first, last) {
                    let t = tokio::time::Instant::from_std(t);
                    if t < until {
                        (until, why) = (t, GroupEnd::Stalled);
                    }
                }
            }
            let next = match self.input.try_recv() {
                Ok(m) => Some(m),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => match self.next_event(until) {
                    Some(m) => m,
                    None => {
                        ended = why;
                        break;
                    }
                },
            };
            match next {
                Some(m) => {
                    bytes += m.size();
                    plan.group.push(m);
                    last = tokio::time::Instant::now().into_std();
                }
                None => {
                    open.input = false;
                    ended = GroupEnd::Closed;
                    break;
                }
            }
        }
        if ended == GroupEnd::Full && plan.group.len() < max {
            ended = GroupEnd::Bytes;
        }
        self.last_group_bytes = bytes;
        ended
    }

    /// Takes every waiting message of the forwarder: acknowledgements (the highest wins: they
    /// cover a prefix) and events upstream cannot take.
    fn take_acks(
        &mut self,
        acked: &mut Vec<ForwardAck>,
        dead: &mut Vec<(usize, u64, String)>,
        open: &mut Open,
    ) {
        loop {
            match self.acks.try_recv() {
                Ok(msg) => note_forward(msg, acked, dead),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open.acks = false;
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
            }
        }
    }

    /// Commits a plan, and when the store fails, recovers instead of losing or stalling:
    /// the store is reopened (redb refuses every call after an I/O error until then); what
    /// upstream acknowledged is committed on its own, so space comes back and forwarding goes
    /// on; on a full disk the oldest events make room (`drop_oldest`) or new ones are refused
    /// (`reject_new`), counted as `min_free`; ingest waits meanwhile (client-mode and serial
    /// acknowledgements are not sent), and resumes by itself once a commit succeeds.
    fn execute(&mut self, mut plan: Plan) {
        let mut delay = Duration::from_millis(50);
        let mut failures = 0u32;
        let mut open = Open {
            input: true,
            acks: true,
        };
        loop {
            stall_for_tests(&self.metrics);
            match self.write(&plan) {
                Ok(w) => {
                    if w.committed && !self.metrics.store_healthy.swap(true, Relaxed) {
                        info!(failures, "store: commits succeed again; ingest resumes");
                    }
                    self.after_commit(plan, w);
                    return;
                }
                Err(e) => {
                    self.rules.rollback_state();
                    failures += 1;
                    self.metrics.store_errors.fetch_add(1, Relaxed);
                    if self.metrics.store_healthy.swap(false, Relaxed) {
                        error!(error = %e, events = plan.group.len(), "store: commit failed; ingest is held until the store can write again");
                    }
                    self.metrics.heartbeat.store(now_ms(), Relaxed);
                    if let Err(e) = self.store.reopen() {
                        warn!(error = %e, "store: reopening after the failure failed; retrying");
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_secs(5));
                        continue;
                    }
                    let full =
                        below_min_free(self.store.path(), self.cfg.min_free, plan.group_bytes())
                            || fs_space(self.store.path()).is_some_and(|(avail, _)| {
                                avail < commit_headroom(plan.group_bytes())
                            });
                    // Deletions on their own first, so space comes back.
                    if !plan.acked.is_empty() && (!plan.group.is_empty() || plan.tick.is_some()) {
                        let acks_only = Plan {
                            acked: std::mem::take(&mut plan.acked),
                            upstream_dead: std::mem::take(&mut plan.upstream_dead),
                            ..Plan::default()
                        };
                        match self.write(&acks_only) {
                            Ok(w) => self.after_commit(acks_only, w),
                            Err(_) => {
                                plan.acked = acks_only.acked;
                                plan.upstream_dead = acks_only.upstream_dead;
                                let _ = self.store.reopen();
                            }
                        }
                    }
                    if full {
                        plan.tight = true;
                        if self.cfg.when_full == WhenFull::DropOldest && failures >= 2 {
                            // Still failing with a full disk: evict on its own first, so the
                            // pages it frees are free for the group's commit.
                            let evict = Plan {
                                evict_bytes: plan.group_bytes().max(1 << 16) * 2,
                                tight: true,
                                acked: std::mem::take(&mut plan.acked),
                                upstream_dead: std::mem::take(&mut plan.upstream_dead),
                                ..Plan::default()
                            };
                            match self.write(&evict) {
                                Ok(w) => self.after_commit(evict, w),
                                Err(_) => {
                                    plan.acked = evict.acked;
                                    plan.upstream_dead = evict.upstream_dead;
                                    let _ = self.store.reopen();
                                }
                            }
                        }
                    }
                    // Wait, taking what upstream acknowledges meanwhile into the next try.
                    let deadline = Instant::now() + delay;
                    while Instant::now() < deadline {
                        self.metrics.heartbeat.store(now_ms(), Relaxed);
                        let left = deadline.saturating_duration_since(Instant::now());
                        let step = left.min(Duration::from_millis(500));
                        if !open.acks {
                            // The forwarder has hung up (shutting down): just wait.
                            std::thread::sleep(step);
                            continue;
                        }
                        match self
                            .rt
                            .block_on(tokio::time::timeout(step, self.acks.recv()))
                        {
                            Ok(Some(msg)) => {
                                note_forward(msg, &mut plan.acked, &mut plan.upstream_dead)
                            }
                            Ok(None) => open.acks = false,
                            Err(_) => {}
                        }
                        self.take_acks(&mut plan.acked, &mut plan.upstream_dead, &mut open);
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Commits one plan without the recovery of the run loop (DLQ commands, tests).
    pub fn commit_plan(&mut self, plan: Plan) -> Result<CommitReport, StoreError> {
        match self.write(&plan) {
            Ok(w) => {
                let report = w.report.clone();
                self.after_commit(plan, w);
                Ok(report)
            }
            Err(e) => {
                self.rules.rollback_state();
                Err(e)
            }
        }
    }

    /// [`commit_plan`](Self::commit_plan) of a group, an upstream ack and a tick.
    pub fn commit(
        &mut self,
        group: Vec<Incoming>,
        acked: Option<ForwardAck>,
        tick: Option<i64>,
    ) -> Result<CommitReport, StoreError> {
        let mut plan = Plan::with_group(group);
        plan.acked = acked.into_iter().collect();
        plan.tick = tick;
        self.commit_plan(plan)
    }

    /// What follows a commit: acknowledgements to sources, rule publishes, the forwarder
    /// woken, counters.
    fn after_commit(&mut self, plan: Plan, w: Written) {
        self.rules.commit_state();
        let plan_upstream_dead = plan.upstream_dead;
        for (i, q) in plan.group.into_iter().enumerate() {
            if let Some(ack) = q.incoming.ack {
                ack(if w.refused.get(i).copied().unwrap_or(false) {
                    Taken::Refused
                } else {
                    Taken::Stored
                });
            }
        }
        if let Some(p) = self.publisher.as_mut() {
            for m in &w.publishes {
                p(m);
            }
        }
        self.budget.charge((self.mono)(), w.bytes);
        let r = &w.report;
        let m = &self.metrics;
        m.store_bytes_written
            .store(self.store.written().bytes(), Relaxed);
        if !w.committed {
            return;
        }
        m.observe_commit(w.took);
        m.fsyncs.fetch_add(1, Relaxed);
        m.committed.fetch_add(r.stored, Relaxed);
        m.backlog_events.store(self.backlog, Relaxed);
        m.backlog_bytes.store(self.stored_bytes, Relaxed);
        m.oldest_ts.store(self.arrivals.oldest(), Relaxed);
        for (reason, n) in r.drops() {
            m.dropped(reason, n);
        }
        if let Some((n, bytes)) = w.dlq_after {
            m.dlq_events.store(n, Relaxed);
            m.dlq_bytes.store(bytes, Relaxed);
        }
        if r.dropped_dlq_full > 0 {
            self.dlq_full_warned += r.dropped_dlq_full;
            // One line a minute at most: a flood of dead letters must not flood the log too.
            if self
                .last_dlq_warn
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
            {
                warn!(
                    dropped = self.dlq_full_warned,
                    dlq_max_bytes = self.cfg.dlq_max_bytes.0,
                    "dead-letter queue full: oldest dead letters dropped (reason dlq_full; next report in a minute at the earliest)"
                );
                self.dlq_full_warned = 0;
                self.last_dlq_warn = Some(Instant::now());
            }
        }
        if r.upstream_dead_lettered > 0 {
            // One line per sink and reason (a refused batch is many events).
            let mut by: BTreeMap<(String, &str), (u64, u64, u64)> = BTreeMap::new();
            for (sink, id, reason) in &plan_upstream_dead {
                let sink = self
                    .sinks
                    .list
                    .get(*sink)
                    .map_or(super::sinks::UPSTREAM, |s| s.spec.name.as_str());
                let e = by
                    .entry((sink.to_string(), reason.as_str()))
                    .or_insert((0, *id, *id));
                e.0 += 1;
                e.1 = e.1.min(*id);
                e.2 = e.2.max(*id);
            }
            for ((sink, reason), (n, first, last)) in by {
                if sink == super::sinks::UPSTREAM {
                    m.upstream_sizes.dead_lettered.fetch_add(n, Relaxed);
                } else if let Some(own) = m.mqtt_sinks.lock().unwrap().get(&sink) {
                    // A `kind = "mqtt"` sink's forwarder keeps its counts on metrics of its own.
                    own.upstream_sizes.dead_lettered.fetch_add(n, Relaxed);
                }
                warn!(
                    sink,
                    events = n,
                    first_id = first,
                    last_id = last,
                    reason,
                    "events dead-lettered: the sink cannot take them"
                );
            }
        }
        if r.dropped_full > 0 {
            warn!(dropped = r.dropped_full, policy = ?self.cfg.when_full, "buffer full (max_bytes): events dropped");
        }
        if r.dropped_min_free > 0 {
            warn!(dropped = r.dropped_min_free, policy = ?self.cfg.when_full, "disk below min_free: events dropped");
        }
        if r.dropped_age > 0 {
            warn!(dropped = r.dropped_age, "events older than max_age dropped");
        }
        if let Some(id) = w.last_stored {
            self.committed.send_replace(id);
        } else if r.dropped_full > 0 || r.dropped_age > 0 || r.dropped_min_free > 0 {
            // Rows went: let the forwarder re-read.
            self.committed.send_modify(|_| {});
        }
    }

    /// Turns a plan into one `Durability::Immediate` transaction: upstream acks, the group
    /// (and a tick) through the rule stage, dead letters and rule state, caps and expiry,
    /// arrival times, meta. Changes nothing in memory unless it commits.
    fn write(&mut self, plan: &Plan) -> Result<Written, StoreError> {
        let started = Instant::now();
        let written_before = self.store.written().bytes();
        let db = self.store.db()?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .expect("no persistent savepoints are used");
        let wall = (self.wall)();
        let mono = (self.mono)();
        let mut report = CommitReport::default();
        let mut t = Tally {
            next_id: self.next_id,
            bytes: self.stored_bytes,
            backlog: self.backlog,
            cap: if plan.tight {
                self.cfg.max_bytes.0.min(self.stored_bytes)
            } else {
                self.cfg.max_bytes.0
            },
            tight: plan.tight,
            first_stored: None,
            last_stored: None,
            sinks: self.sinks.clone(),
            ranges_before: BTreeMap::new(),
        };
        // Worked on a copy: kept only if the transaction commits.
        let mut arrivals = self.arrivals.clone();
        if let Some(jump) = arrivals.observe(wall, mono).jump {
            warn!(
                jump_ms = jump,
                "the wall clock jumped: ages of events stored since start-up follow it"
            );
        }
        let mut dlq_after = None;
        // Client-mode PUBACKs written since the last commit: their entries go in this one.
        let feedback = dedup::Feedback::take(plan.group.iter().map(|q| q.incoming.dedup.as_ref()));
        // Retained-message changes of the embedded broker: given back unless this commits.
        let retained = self.retained.as_ref().map(|l| (l.clone(), l.take()));
        let broker_acks = self.broker_acks.as_ref().map(|l| (l.clone(), l.take()));
        let mut refused = vec![false; plan.group.len()];
        // A plan that may turn out to change nothing: only a tick, or only arrival upkeep.
        let quiet = plan.group.is_empty()
            && plan.acked.is_empty()
            && plan.upstream_dead.is_empty()
            && plan.dlq_remove.is_empty()
            && plan.reinsert.is_empty()
            && plan.evict_bytes == 0
            && !self.pending_sweep
            && !arrivals.needs_commit(wall)
            && retained.as_ref().is_none_or(|(_, c)| c.is_empty())
            && broker_acks.as_ref().is_none_or(|(_, w)| w.is_empty());
        let mut state_written = false;
        let result = (|| -> Result<Vec<LocalPublish>, StoreError> {
            let mut events = txn.open_table(EVENTS)?;
            let mut meta = txn.open_table(META)?;
            let mut dedup = dedup::Window::open(&txn, &feedback)?;
            if let Some((_, written)) = &broker_acks {
                dedup.forget_broker_acks(written)?;
            }
            let mut arr = txn.open_table(ARRIVALS)?;

            // 0. What a sink cannot take goes to the dead-letter table (moved, or copied when
            // another sink still owes it).
            let mut upstream_letters = Vec::new();
            for (sink, id, reason) in &plan.upstream_dead {
                let Some(value) = events.get(*id)?.map(|v| v.value().to_vec()) else {
                    continue; // already gone (max_age, drop_oldest)
                };
                let event = super::decode(*id, &value)?;
                let multi = t.sinks.multi();
                if multi {
                    let s = &mut t.sinks.list[*sink];
                    t.ranges_before
                        .entry(*sink)
                        .or_insert_with(|| s.acked.clone());
                    super::sinks::note_range(&mut s.acked, *id, *id);
                }
                if !multi || !t.sinks.owed_by_other(*sink, *id, &event.topic) {
                    events.remove(*id)?;
                    t.bytes = t.bytes.saturating_sub(row_size(value.len()));
                    t.backlog = t.backlog.saturating_sub(1);
                }
                upstream_letters.push(crate::rules::DeadLetter {
                    rule: sink_rule(&t.sinks, *sink),
                    error: reason.clone(),
                    at: now_ms(),
                    event,
                });
            }
            report.upstream_dead_lettered = upstream_letters.len() as u64;

            // 1. What the sinks acknowledged goes: with one sink, its ranges; with more, what
            // no other sink still owes.
            let mut next_batch = None;
            for a in &plan.acked {
                if !t.sinks.multi() {
                    while let Some((k, v)) = first_in(&mut events, a.from, a.up_to)? {
                        t.bytes = t.bytes.saturating_sub(row_size(v));
                        t.backlog = t.backlog.saturating_sub(1);
                        events.remove(k)?;
                        report.acked += 1;
                    }
                } else if a.sink < t.sinks.list.len() {
                    let s = &mut t.sinks.list[a.sink];
                    let had = s.acked.clone();
                    t.ranges_before.entry(a.sink).or_insert_with(|| had.clone());
                    super::sinks::note_range(&mut s.acked, a.from, a.up_to);
                    // Only what this sink had not acknowledged yet can change hands: what it
                    // had is passed over a range at a time.
                    let mut done = Vec::new();
                    let mut from = a.from;
                    'ranges: while from <= a.up_to {
                        for row in events.range(from..=a.up_to)? {
                            let (k, v) = row?;
                            let id = k.value();
                            let skip = had.range(..=id).next_back().map(|(_, to)| *to);
                            if let Some(to) = skip.filter(|to| *to >= id) {
                                if to >= a.up_to {
                                    break 'ranges;
                                }
                                from = to + 1;
                                continue 'ranges;
                            }
                            let e = super::decode(id, v.value())?;
                            if !t.sinks.owed_by_other(a.sink, e.id, &e.topic) {
                                done.push((e.id, v.value().len()));
                            }
                        }
                        break;
                    }
                    for (id, len) in done {
                        events.remove(id)?;
                        t.bytes = t.bytes.saturating_sub(row_size(len));
                        t.backlog = t.backlog.saturating_sub(1);
                        report.acked += 1;
                    }
                }
                match t.sinks.list.get(a.sink).map(|s| s.spec.name.as_str()) {
                    None | Some(super::sinks::UPSTREAM) => {
                        next_batch = next_batch.max(Some(a.batch + 1));
                    }
                    Some(name) => {
                        let key = super::sinks::next_batch_key(name);
                        let stored = meta.get(key.as_str())?.map(|v| v.value()).unwrap_or(0);
                        if a.batch + 1 > stored {
                            meta.insert(key.as_str(), a.batch + 1)?;
                        }
                    }
                }
            }
            if let Some(n) = next_batch {
                let stored = meta.get("next_batch")?.map(|v| v.value()).unwrap_or(0);
                if n > stored {
                    meta.insert("next_batch", n)?;
                }
            }
            // Sinks changed (filters, one gone): what nobody owes any more goes.
            if self.pending_sweep {
                meta.remove(SWEEP_KEY)?;
                let mut gone = Vec::new();
                for row in events.iter()? {
                    let (k, v) = row?;
                    let e = super::decode(k.value(), v.value())?;
                    if !t.sinks.owed(e.id, &e.topic) {
                        // Delivered to a remaining sink that takes it, or dropped.
                        let delivered = t
                            .sinks
                            .list
                            .iter()
                            .any(|s| e.id >= s.start && s.spec.takes(&e.topic));
                        gone.push((e.id, v.value().len(), delivered));
                    }
                }
                for (id, len, delivered) in gone {
                    events.remove(id)?;
                    t.bytes = t.bytes.saturating_sub(row_size(len));
                    t.backlog = t.backlog.saturating_sub(1);
                    if delivered {
                        report.acked += 1;
                    } else {
                        report.dropped_no_sink += 1;
                    }
                }
            }
            // On a full disk, room first.
            let mut evicted = 0;
            while evicted < plan.evict_bytes {
                let Some((_, v)) = events.pop_first()? else {
                    break;
                };
                let size = row_size(v.value().len());
                evicted += size;
                t.bytes = t.bytes.saturating_sub(size);
                t.backlog = t.backlog.saturating_sub(1);
                report.dropped_min_free += 1;
            }
            if plan.evict_bytes > 0 {
                t.cap = t.cap.min(t.bytes);
            }

            // 2. The group, through the rule stage, given ids, appended under the caps.
            let mut out = StepOutput::default();
            for (i, q) in plan.group.iter().enumerate() {
                let m = &q.incoming;
                if dedup.seen(m.dedup.as_ref())? {
                    report.deduped += 1;
                    continue;
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
                // Asked after the step: whether it made a tap record (one read of the flag).
                let tapping = self.rules.tapping();
                let mut ids = Vec::new();
                for e in out.events.drain(..) {
                    let before = t.last_stored;
                    if !append(&self.cfg, &mut events, e, &mut t, &mut report)? {
                        refused[i] = true;
                    }
                    if tapping {
                        ids.push(t.last_stored.filter(|id| Some(*id) != before));
                    }
                }
                if tapping {
                    self.rules.outputs_stored(&ids);
                }
                if refused[i] {
                    // Not taken: a resend of it must not be taken for a stored one.
                    dedup.unrecord(m.dedup.as_ref())?;
                }
            }
            if let Some(now) = plan.tick {
                self.rules.on_tick(now, &mut out);
                for e in out.events.drain(..) {
                    append(&self.cfg, &mut events, e, &mut t, &mut report)?;
                }
            }
            for (e, only) in &plan.reinsert {
                let before = t.last_stored;
                append(&self.cfg, &mut events, e.clone(), &mut t, &mut report)?;
                // For one sink only: the others count it as theirs done.
                if let (Some(only), true) = (only, t.sinks.multi()) {
                    if let Some(id) = t.last_stored.filter(|id| Some(*id) != before) {
                        for (i, s) in t.sinks.list.iter_mut().enumerate() {
                            if i != *only {
                                t.ranges_before.entry(i).or_insert_with(|| s.acked.clone());
                                super::sinks::note_range(&mut s.acked, id, id);
                            }
                        }
                    }
                }
            }
            report.dropped_rule += out.dropped;

            // Dead letters and rule state, in the same transaction as the outputs.
            out.dead_letters.append(&mut upstream_letters);
            if !plan.dlq_remove.is_empty() || !out.dead_letters.is_empty() {
                let mut dlq = txn.open_table(DEAD_LETTERS)?;
                let d = super::dlq::apply(
                    &mut dlq,
                    &mut meta,
                    &plan.dlq_remove,
                    out.dead_letters.drain(..),
                    self.cfg.dlq_max_bytes.0,
                )?;
                report.dlq_removed += d.removed;
                report.dead_lettered += d.inserted;
                report.dropped_dlq_full += d.dropped_full;
                dlq_after = Some((d.events, d.bytes));
            }
            let writes = self.rules.pending_state();
            state_written = !writes.is_empty();
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

            // 3. Arrival times: this group's, clock fixes, what got too old goes.
            arrivals.fix_times(&mut arr, wall)?;
            if let Some(first) = t.first_stored {
                arrivals.note_stored(&mut arr, first, wall, mono)?;
            }
            let (aged, aged_bytes) = arrivals.expire(&mut arr, &mut events, wall)?;
            report.dropped_age += aged;
            t.bytes = t.bytes.saturating_sub(aged_bytes);
            t.backlog = t.backlog.saturating_sub(aged);
            arrivals.prune(&mut arr, &events, wall)?;

            // 4. The sinks' ranges: pruned below the oldest stored event, written if changed.
            if t.sinks.multi() {
                let lowest = events.first()?.map(|(k, _)| k.value()).unwrap_or(t.next_id);
                for (i, s) in t.sinks.list.iter_mut().enumerate() {
                    if s.acked
                        .first_key_value()
                        .is_some_and(|(_, to)| *to < lowest)
                    {
                        t.ranges_before.entry(i).or_insert_with(|| s.acked.clone());
                        super::sinks::prune(&mut s.acked, lowest);
                    }
                }
                for (i, before) in &t.ranges_before {
                    let s = &t.sinks.list[*i];
                    super::sinks::write_ranges(&txn, &s.spec.name, before, &s.acked)?;
                }
            }

            // 5. Meta.
            meta.insert("next_id", t.next_id)?;
            meta.insert("stored_bytes", t.bytes)?;
            for (reason, n) in report.drops() {
                if n > 0 {
                    let key = format!("dropped.{}", reason.label());
                    let prev = meta.get(key.as_str())?.map(|v| v.value()).unwrap_or(0);
                    meta.insert(key.as_str(), prev + n)?;
                }
            }
            if let Some((_, changes)) = &retained {
                super::retained::write(&txn, changes)?;
            }
            debug_assert_eq!(events.len()?, t.backlog);
            Ok(std::mem::take(&mut out.publishes))
        })();
        let give_back = |retained: Option<(Arc<super::retained::RetainedLog>, _)>,
                         acks: Option<(Arc<dedup::BrokerAckLog>, _)>| {
            if let Some((log, changes)) = retained {
                log.give_back(changes);
            }
            if let Some((log, written)) = acks {
                log.give_back(written);
            }
        };
        let publishes = match result {
            Ok(p) => p,
            Err(e) => {
                give_back(retained, broker_acks);
                return Err(e);
            }
        };
        let committed =
            !(quiet && report == CommitReport::default() && !state_written && dlq_after.is_none());
        if !committed {
            txn.abort()?; // nothing to write: no fsync
        } else if let Err(e) = txn.commit() {
            give_back(retained, broker_acks);
            return Err(e.into());
        }
        feedback.committed();
        drop(db);
        self.arrivals = arrivals;
        self.next_id = t.next_id;
        self.stored_bytes = t.bytes;
        self.backlog = t.backlog;
        self.sinks = t.sinks;
        self.pending_sweep = false;
        Ok(Written {
            report,
            publishes,
            dlq_after,
            last_stored: t.last_stored,
            took: started.elapsed(),
            bytes: self.store.written().bytes() - written_before,
            committed,
            refused,
        })
    }
}

/// A stalled store for tests (a card that stops answering): while the file named by
/// `TIDEPOOL_FAULT_STALL_FILE` exists, commits wait. Unset in production.
fn stall_for_tests(metrics: &Metrics) {
    static FILE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let Some(path) = FILE
        .get_or_init(|| std::env::var_os("TIDEPOOL_FAULT_STALL_FILE").map(Into::into))
        .as_ref()
    else {
        return;
    };
    while path.exists() {
        metrics.heartbeat.store(now_ms(), Relaxed);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How often a wait for company feeds the watchdog's heartbeat: two waits of a 20 s window
/// back to back (acknowledgements held, then the group filled) would outlast `WatchdogSec`.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// The next admin request; never, without an admin endpoint.
async fn next_control(control: &mut Option<mpsc::UnboundedReceiver<Control>>) -> Option<Control> {
    match control.as_mut() {
        Some(c) => c.recv().await,
        None => std::future::pending().await,
    }
}

/// How often the commit loop looks whether the file is worth compacting.
const COMPACT_CHECK: Duration = Duration::from_secs(60);
/// After a compaction (or a failed one), the next one no sooner than this.
const COMPACT_AGAIN: Duration = Duration::from_secs(600);

/// The `rule` of a dead letter upstream could not take.
pub const UPSTREAM_RULE: &str = "upstream";

/// `meta` key: the sinks changed and what nobody owes is still to be swept.
const SWEEP_KEY: &str = "sinks.sweep";

/// The `rule` prefix of a dead letter a `[[sink]]` could not take: `sink:NAME`.
pub const SINK_RULE_PREFIX: &str = "sink:";

/// The `rule` of a dead letter sink `i` could not take.
fn sink_rule(sinks: &super::sinks::Sinks, i: usize) -> String {
    match sinks.list.get(i).map(|s| s.spec.name.as_str()) {
        None | Some(super::sinks::UPSTREAM) => UPSTREAM_RULE.into(),
        Some(name) => format!("{SINK_RULE_PREFIX}{name}"),
    }
}

/// Adds one message of the forwarder to a plan.
fn note_forward(
    msg: ForwardMsg,
    acked: &mut Vec<ForwardAck>,
    dead: &mut Vec<(usize, u64, String)>,
) {
    match msg {
        ForwardMsg::Ack(a) => acked.push(a),
        ForwardMsg::DeadLetter { sink, id, reason } => dead.push((sink, id, reason)),
    }
}

/// Which inputs of the loop are still open.
struct Open {
    input: bool,
    acks: bool,
}

impl CommitReport {
    /// The drops of this commit, by reason (zeros included).
    pub fn drops(&self) -> [(DropReason, u64); 8] {
        [
            (DropReason::NoSink, self.dropped_no_sink),
            (DropReason::DlqFull, self.dropped_dlq_full),
            (DropReason::Rule, self.dropped_rule),
            (DropReason::BufferFull, self.dropped_full),
            (DropReason::MinFree, self.dropped_min_free),
            (DropReason::MaxAge, self.dropped_age),
            (DropReason::BadFrame, self.dropped_bad_frame),
            (DropReason::Oversize, self.dropped_oversize),
        ]
    }
}

/// Appends one event under the buffer caps, giving it the next id; `false`: refused (counted).
fn append(
    cfg: &BufferConfig,
    events: &mut redb::Table<u64, &[u8]>,
    mut e: Event,
    t: &mut Tally,
    report: &mut CommitReport,
) -> Result<bool, StoreError> {
    if !t.sinks.wanted(&e.topic) {
        // No configured sink takes it: there is nowhere it could ever go.
        report.dropped_no_sink += 1;
        return Ok(true);
    }
    let value = encode(&e);
    let size = row_size(value.len());
    let count = |report: &mut CommitReport| {
        if t.tight {
            report.dropped_min_free += 1
        } else {
            report.dropped_full += 1
        }
    };
    if t.bytes + size > t.cap {
        match cfg.when_full {
            WhenFull::RejectNew => {
                count(report);
                return Ok(false);
            }
            WhenFull::DropOldest => {
                while t.bytes + size > t.cap {
                    match events.pop_first()? {
                        Some((_, v)) => {
                            t.bytes = t.bytes.saturating_sub(row_size(v.value().len()));
                            t.backlog = t.backlog.saturating_sub(1);
                            count(report);
                        }
                        None => break,
                    }
                }
                if t.bytes + size > t.cap {
                    // Larger than the whole buffer (or nothing to make room with).
                    count(report);
                    return Ok(false);
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
    t.first_stored.get_or_insert(e.id);
    t.last_stored = Some(e.id);
    Ok(true)
}

/// The first row, if its id is at most `max`: (id, stored value length).
/// The first row with an id in `from..=to`: its id and stored length.
fn first_in(
    events: &mut redb::Table<u64, &[u8]>,
    from: u64,
    to: u64,
) -> Result<Option<(u64, usize)>, StoreError> {
    if from > to {
        return Ok(None);
    }
    let first = events.range(from..=to)?.next();
    Ok(match first {
        Some(row) => {
            let (k, v) = row?;
            Some((k.value(), v.value().len()))
        }
        None => None,
    })
}
