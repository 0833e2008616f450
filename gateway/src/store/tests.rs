//! The store's tests by example (the model-based test is in `model.rs`, power cuts in
//! `power.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::*;
use crate::admin::metrics::Metrics;
use crate::config::{BufferConfig, ByteSize, HumanDuration, WhenFull};
use crate::rules::PassThrough;
use crate::store::commit::{CommitLoop, CommitReport, Dedup, ForwardAck, Incoming};

struct Harness {
    _dir: tempfile::TempDir,
    db: Store,
    lp: CommitLoop,
    metrics: Arc<Metrics>,
    _rt: tokio::runtime::Runtime,
}

impl Harness {
    fn lp_metrics_commits(&self) -> u64 {
        self.metrics.commits()
    }
}

fn harness(max_bytes: u64, when_full: WhenFull) -> Harness {
    harness_in(tempfile::tempdir().unwrap(), max_bytes, when_full)
}

/// The buffer settings of these tests: `max_age` one hour, small groups, no `min_free`.
fn buffer_cfg(max_bytes: u64, when_full: WhenFull) -> BufferConfig {
    BufferConfig {
        max_bytes: ByteSize(max_bytes),
        max_age: HumanDuration(Duration::from_secs(3600)),
        when_full,
        commit_max_events: 100,
        commit_max_wait: HumanDuration(Duration::from_millis(1)),
        cache_size: ByteSize(1 << 20),
        min_free: crate::config::MinFree::Bytes(0),
        ingest_max_bytes: ByteSize(1 << 20),
        dlq_max_bytes: ByteSize(16 << 20),
        write_budget: ByteSize(0),
        budget_max_wait: HumanDuration(Duration::from_secs(5)),
        card_endurance: ByteSize(0),
    }
}

/// A commit loop on `db` and the ends of its channels: ingest, upstream acks, committed ids.
struct Wired {
    lp: CommitLoop,
    tx: crate::ingest::channel::IngestTx,
    atx: mpsc::UnboundedSender<ForwardMsg>,
    crx: watch::Receiver<u64>,
    metrics: Arc<Metrics>,
}

fn wire(
    db: &Store,
    cfg: BufferConfig,
    rules: Box<dyn crate::rules::RuleStage>,
    rt: &tokio::runtime::Runtime,
) -> Wired {
    let (tx, rx) = crate::ingest::channel::channel(16, 1 << 20);
    let (atx, arx) = mpsc::unbounded_channel();
    let (ctx, crx) = watch::channel(0);
    let metrics = Arc::new(Metrics::default());
    let lp = CommitLoop::new(
        db.clone(),
        cfg,
        metrics.clone(),
        rules,
        rx,
        arx,
        ctx,
        rt.handle().clone(),
    )
    .unwrap();
    Wired {
        lp,
        tx,
        atx,
        crx,
        metrics,
    }
}

fn harness_in(dir: tempfile::TempDir, max_bytes: u64, when_full: WhenFull) -> Harness {
    let db = open(&dir.path().join("t.redb"), 1 << 20).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Wired { lp, metrics, .. } = wire(
        &db,
        buffer_cfg(max_bytes, when_full),
        Box::new(PassThrough),
        &rt,
    );
    Harness {
        _dir: dir,
        db,
        lp,
        metrics,
        _rt: rt,
    }
}

fn ev(n: u64, pad: usize) -> Event {
    Event {
        id: 0,
        ts: crate::event::now_ms(),
        source: "mqtt".into(),
        topic: format!("t/{n}"),
        payload: Payload::Json(format!("{{\"n\":{n},\"p\":\"{}\"}}", "x".repeat(pad))),
        trace: crate::event::Trace::fresh(),
        properties: Vec::new(),
    }
}

#[test]
fn read_after_respects_count_and_bytes() {
    let mut h = harness(u64::MAX / 2, WhenFull::DropOldest);
    let group: Vec<Incoming> = (0..10).map(|n| Incoming::plain(ev(n, 100))).collect();
    h.lp.commit(group, None, None).unwrap();
    assert_eq!(
        read_after(&h.db.db().unwrap(), 0, 3, u64::MAX)
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        read_after(&h.db.db().unwrap(), 8, 100, u64::MAX)
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        read_after(&h.db.db().unwrap(), 0, 100, 1).unwrap().len(),
        1,
        "always at least one"
    );
    assert!(read_after(&h.db.db().unwrap(), 10, 100, u64::MAX)
        .unwrap()
        .is_empty());
}

#[test]
fn redelivered_message_is_not_stored_twice() {
    let mut h = harness(u64::MAX / 2, WhenFull::DropOldest);
    let log = std::sync::Arc::new(crate::store::dedup::PubackLog::default());
    let key = |pkid, hash, dup, tag| {
        Some(Dedup::Mqtt(crate::store::dedup::MqttKey {
            pkid,
            hash,
            dup,
            tag,
            first_new: false,
            log: log.clone(),
        }))
    };
    let msg = |n, dedup| Incoming {
        event: ev(n, 0),
        ack: None,
        dedup,
        bad: None,
    };
    assert_eq!(
        h.lp.commit(vec![msg(1, key(7, 42, false, 1))], None, None)
            .unwrap()
            .stored,
        1
    );
    // The broker resends it with DUP after a crash before our PUBACK: skipped.
    let r =
        h.lp.commit(vec![msg(1, key(7, 42, true, 2))], None, None)
            .unwrap();
    assert_eq!((r.stored, r.deduped), (0, 1));
    // A different message reusing the packet id later is stored.
    let r =
        h.lp.commit(vec![msg(2, key(7, 43, true, 3))], None, None)
            .unwrap();
    assert_eq!(r.stored, 1);
    // Once the PUBACK of that delivery is written, the same id and content is a new message.
    log.written(7, 3);
    let r =
        h.lp.commit(vec![msg(3, key(7, 43, true, 4))], None, None)
            .unwrap();
    assert_eq!((r.stored, r.deduped), (1, 0));
}

#[test]
fn serial_resend_is_stored_once_in_a_group_and_across_commits() {
    let mut h = harness(u64::MAX / 2, WhenFull::DropOldest);
    let frame = |n, seq| Incoming {
        event: ev(n, 0),
        ack: None,
        dedup: Some(Dedup::Serial(crate::store::dedup::SerialKey {
            port: "uart0".into(),
            device: "d1".into(),
            seq,
            hash: seq * 7,
        })),
        bad: None,
    };
    let r =
        h.lp.commit(vec![frame(1, 1), frame(2, 2), frame(2, 2)], None, None)
            .unwrap();
    assert_eq!((r.stored, r.deduped), (2, 1));
    let r =
        h.lp.commit(vec![frame(1, 1), frame(3, 3)], None, None)
            .unwrap();
    assert_eq!((r.stored, r.deduped), (1, 1));
}

thread_local! {
    static WALL: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
    static MONO: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static BASE: Instant = Instant::now();
}

fn test_wall() -> i64 {
    WALL.with(|w| w.get())
}

fn test_mono() -> Instant {
    BASE.with(|b| *b) + Duration::from_millis(MONO.with(|m| m.get()))
}

/// Time passes: both clocks move (wall set to `ms`).
fn set_wall(ms: i64) {
    let passed = ms - test_wall();
    if passed > 0 && test_wall() != 0 {
        MONO.with(|m| m.set(m.get() + passed as u64));
    }
    WALL.with(|w| w.set(ms));
}

/// The wall clock is stepped (NTP): the monotonic clock does not move.
fn step_wall(ms: i64) {
    WALL.with(|w| w.set(ms));
}

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
/// A sane wall-clock time (2026).
const T0: i64 = crate::store::arrivals::SANE_MS + 400 * DAY;

/// A harness whose loop ages events by [`test_wall`], with `max_age` one hour.
fn aged_harness() -> Harness {
    set_wall(T0);
    let mut h = harness(u64::MAX / 2, WhenFull::DropOldest);
    h.lp = h.lp.with_clocks(test_wall, test_mono);
    h
}

fn ev_ts(n: u64, ts: i64) -> Incoming {
    let mut e = ev(n, 0);
    e.ts = ts;
    Incoming::plain(e)
}

fn dropped_age(h: &Harness) -> u64 {
    let st = stats(&*h.db.db().unwrap()).unwrap();
    st.dropped.iter().find(|d| d.0 == "max_age").unwrap().1
}

fn backlog(h: &Harness) -> u64 {
    stats(&*h.db.db().unwrap()).unwrap().backlog_events
}

/// Commits nothing but what is due (expiry, clock fixes), as the run loop would.
fn idle_commit(h: &mut Harness) -> CommitReport {
    h.lp.commit_plan(Plan::default()).unwrap()
}

#[test]
fn max_age_counts_from_when_the_gateway_stored_the_event() {
    let mut h = aged_harness();
    // A device clock a day behind and one a day ahead: neither decides.
    h.lp.commit(
        vec![ev_ts(1, T0 - DAY), ev_ts(2, T0 + DAY), ev_ts(3, 5)],
        None,
        None,
    )
    .unwrap();
    assert_eq!(idle_commit(&mut h).dropped_age, 0, "nothing is old yet");
    set_wall(T0 + HOUR / 2);
    assert_eq!(idle_commit(&mut h).dropped_age, 0);
    assert_eq!(backlog(&h), 3);
    // Later events, in a group of their own.
    set_wall(T0 + HOUR / 2 + 10 * 60_000);
    h.lp.commit(vec![ev_ts(4, T0 - 30 * DAY)], None, None)
        .unwrap();
    // Past max_age (plus one group interval) for the first group only.
    set_wall(T0 + HOUR + 60_000 + 1);
    let r = idle_commit(&mut h);
    assert_eq!(
        r.dropped_age, 3,
        "the first group goes whole, whatever its ts"
    );
    assert_eq!(backlog(&h), 1);
    assert_eq!(dropped_age(&h), 3);
    set_wall(T0 + 2 * HOUR);
    assert_eq!(idle_commit(&mut h).dropped_age, 1);
    assert_eq!(backlog(&h), 0);
}

#[test]
fn events_stored_before_the_clock_was_set_are_aged_from_the_first_sane_reading() {
    let mut h = aged_harness();
    // A Pi without a real-time clock, before NTP: 1970.
    set_wall(60_000);
    h.lp.commit(vec![ev_ts(1, 60_000), ev_ts(2, 61_000)], None, None)
        .unwrap();
    // NTP sets the clock: nothing expires at once.
    step_wall(T0);
    assert_eq!(idle_commit(&mut h).dropped_age, 0);
    set_wall(T0 + HOUR / 2);
    assert_eq!(idle_commit(&mut h).dropped_age, 0);
    assert_eq!(backlog(&h), 2);
    // An hour (and an interval) after the first sane reading, they go.
    set_wall(T0 + HOUR + 60_001);
    assert_eq!(idle_commit(&mut h).dropped_age, 2);
}

#[test]
fn a_clock_jump_while_running_neither_expires_everything_nor_stops_expiry() {
    let mut h = aged_harness();
    h.lp.commit(vec![ev_ts(1, T0)], None, None).unwrap();
    // NTP steps the clock a day ahead: the event was not stored a day ago.
    step_wall(T0 + DAY);
    assert_eq!(
        idle_commit(&mut h).dropped_age,
        0,
        "a forward jump expires nothing"
    );
    assert_eq!(backlog(&h), 1);
    // An hour later by the new clock it is due.
    set_wall(T0 + DAY + HOUR + 60_001);
    assert_eq!(
        idle_commit(&mut h).dropped_age,
        1,
        "expiry goes on after the jump"
    );

    // A backwards jump: ages follow too.
    let stored = test_wall();
    h.lp.commit(vec![ev_ts(2, T0)], None, None).unwrap();
    step_wall(stored - 3 * HOUR);
    assert_eq!(idle_commit(&mut h).dropped_age, 0);
    set_wall(stored - 3 * HOUR + HOUR + 60_001);
    assert_eq!(
        idle_commit(&mut h).dropped_age,
        1,
        "a backwards jump delays nothing"
    );
}

#[test]
fn ages_survive_a_restart_and_count_powered_off_time() {
    let mut h = aged_harness();
    h.lp.commit(vec![ev_ts(1, T0)], None, None).unwrap();
    let Harness {
        _dir, db, lp, _rt, ..
    } = h;
    drop(lp);
    drop(db);
    drop(_rt);
    // Powered off for two hours (a new boot: the monotonic clock starts over).
    step_wall(T0 + 2 * HOUR);
    let mut h = harness_in(_dir, u64::MAX / 2, WhenFull::DropOldest);
    h.lp = h.lp.with_clocks(test_wall, test_mono);
    assert_eq!(idle_commit(&mut h).dropped_age, 1);
}

#[test]
fn a_newer_store_is_refused_with_both_versions_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.redb");
    drop(open(&path, 1 << 20).unwrap());
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("schema_version", 99)
            .unwrap();
        txn.commit().unwrap();
    }
    let err = open(&path, 1 << 20).unwrap_err().to_string();
    assert!(err.contains("newer Tidepool"), "{err}");
    assert!(
        err.contains("99") && err.contains(&schema::SCHEMA_VERSION.to_string()),
        "{err}"
    );
}

#[test]
fn an_old_store_is_upgraded_once_and_its_events_get_an_arrival_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.redb");
    {
        // What the landed release wrote: the five tables, no version, no arrivals.
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut ev = txn.open_table(EVENTS).unwrap();
            ev.insert(1, encode(&ev_e(1)).as_slice()).unwrap();
            ev.insert(2, encode(&ev_e(2)).as_slice()).unwrap();
            let mut meta = txn.open_table(META).unwrap();
            meta.insert("next_id", 3).unwrap();
            txn.open_table(dedup::LEGACY_INGEST_DEDUP).unwrap();
            txn.open_table(DEAD_LETTERS).unwrap();
            txn.open_table(RULE_STATE).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = open(&path, 1 << 20).unwrap();
    let db = store.db().unwrap();
    assert_eq!(schema::version(&*db).unwrap(), Some(schema::SCHEMA_VERSION));
    let txn = db.begin_read().unwrap();
    let arr = txn.open_table(ARRIVALS).unwrap();
    let (first, _) = arrivals::load(&arr).unwrap();
    assert_eq!(
        first.map(|f| f.0),
        Some(1),
        "the old events are aged from the upgrade"
    );
    assert_eq!(stats(&*db).unwrap().backlog_events, 2);
}

fn ev_e(n: u64) -> Event {
    ev(n, 0)
}

#[test]
fn dead_letters_retry_and_drop_in_pages_and_the_cap_holds() {
    let mut h = harness(1 << 30, WhenFull::DropOldest);
    let bad = |n: u64| Incoming {
        event: Event::new("serial:u0", "serial/u0", Payload::Bytes(vec![n as u8; 100])),
        ack: None,
        dedup: None,
        bad: Some((
            crate::admin::metrics::DropReason::BadFrame,
            "bad frame".into(),
        )),
    };
    let group: Vec<Incoming> = (0..10).map(bad).collect();
    let r = h.lp.commit(group, None, None).unwrap();
    assert_eq!(r.dead_lettered, 10);
    let commits = |h: &Harness| h.lp_metrics_commits();
    let before = commits(&h);
    let req = crate::store::commit::DlqRequest {
        ids: None,
        limit: Some(7),
        page: Some(3),
    };
    // PassThrough keeps them: 7 retried, oldest first, in 3 transactions (3 + 3 + 1).
    assert_eq!(h.lp.retry_dead_letters(&req).unwrap(), (7, 0));
    assert_eq!(commits(&h) - before, 3);
    assert_eq!(stats(&*h.db.db().unwrap()).unwrap().backlog_events, 7);
    let left = dlq::page(&*h.db.db().unwrap(), &dlq::Select::default(), 0, 100).unwrap();
    assert_eq!(
        left.rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        [8, 9, 10]
    );
    let req = crate::store::commit::DlqRequest {
        page: Some(2),
        ..Default::default()
    };
    assert_eq!(h.lp.drop_dead_letters(&req).unwrap(), 3);
    let st = stats(&*h.db.db().unwrap()).unwrap();
    assert_eq!((st.dlq_events, st.dlq_bytes), (0, 0));
}

/// The forwarder's dead-letter request, arriving on its own while ingest is idle, is committed
/// by the run loop before a later acknowledgement could delete the row.
#[test]
fn a_lone_upstream_dead_letter_is_committed_by_the_run_loop() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("t.redb"), 1 << 20).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = crate::ingest::channel::channel(10, 1 << 20);
    let (atx, arx) = mpsc::unbounded_channel();
    let (ctx, _crx) = watch::channel(0);
    let cfg = buffer_cfg(1 << 30, WhenFull::DropOldest);
    let mut lp = CommitLoop::new(
        db.clone(),
        cfg,
        Arc::new(Metrics::default()),
        Box::new(PassThrough),
        rx,
        arx,
        ctx,
        rt.handle().clone(),
    )
    .unwrap();
    lp.commit(
        (1..=3).map(|n| Incoming::plain(ev(n, 0))).collect(),
        None,
        None,
    )
    .unwrap();
    let runner = std::thread::spawn(move || lp.run());
    atx.send(ForwardMsg::DeadLetter {
        sink: 0,
        id: 2,
        reason: "too large".into(),
    })
    .unwrap();
    // Give the loop time to take it alone, then acknowledge past it.
    std::thread::sleep(Duration::from_millis(300));
    atx.send(ForwardMsg::Ack(ForwardAck {
        sink: 0,
        from: 0,
        up_to: 3,
        batch: 1,
    }))
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(atx);
    drop(tx);
    runner.join().unwrap();
    let d = db.db().unwrap();
    let letters = dlq::page(&*d, &dlq::Select::default(), 0, 10).unwrap();
    assert_eq!(letters.rows.len(), 1, "the dead letter must not be lost");
    let (_, letter) = &letters.rows[0];
    let letter = letter.as_ref().unwrap();
    assert_eq!(
        (letter.rule.as_str(), letter.event.topic.as_str()),
        ("upstream", "t/2")
    );
    assert_eq!(stats(&*d).unwrap().backlog_events, 0);
}

/// What a commit wrote, page by page: (page number, what the page holds), by the markers of
/// the tables found in it.
fn describe_pages(path: &std::path::Path, trace: &[(u64, usize)], page: u64) -> Vec<(u64, String)> {
    let file = std::fs::read(path).unwrap();
    let mut pages: Vec<u64> = trace
        .iter()
        .flat_map(|&(off, len)| off / page..=(off + len as u64 - 1) / page)
        .collect();
    pages.sort_unstable();
    pages.dedup();
    pages
        .into_iter()
        .map(|p| {
            let start = (p * page) as usize;
            let bytes = &file[start..(start + page as usize).min(file.len())];
            let has = |m: &[u8]| bytes.windows(m.len()).any(|w| w == m);
            let what = if p == 0 {
                "header".to_string()
            } else if has(b"pages_unreachable") || has(b"pages_allocated") {
                "redb system table tree".to_string()
            } else if has(b"mqtt_dedup") || has(b"dead_letters") {
                "table tree".to_string()
            } else if has(b"next_id") {
                "meta".to_string()
            } else if has(b"t/") {
                format!("events ({})", if bytes[0] == 1 { "leaf" } else { "branch" })
            } else {
                format!("other (type {})", bytes[0])
            };
            (p, what)
        })
        .collect()
}

/// Commits `groups` groups of `each` events with `pad` bytes of payload padding.
fn fill_backlog(h: &mut Harness, groups: u64, each: u64, pad: usize) {
    for g in 0..groups {
        let group = (0..each)
            .map(|n| Incoming::plain(ev(g * each + n, pad)))
            .collect();
        h.lp.commit(group, None, None).unwrap();
    }
}

#[test]
fn what_one_small_commit_writes() {
    let mut h = harness(1 << 30, WhenFull::DropOldest);
    fill_backlog(&mut h, 100, 100, 150);
    let counter = h.db.written().clone();
    let path = h.db.path().to_path_buf();
    for (what, acked) in [
        ("one event", None),
        (
            "one event + an ack",
            Some(ForwardAck {
                sink: 0,
                from: 0,
                up_to: 1,
                batch: 1,
            }),
        ),
    ] {
        let before = counter.bytes();
        counter.start_trace();
        h.lp.commit(vec![Incoming::plain(ev(1, 150))], acked, None)
            .unwrap();
        let trace = counter.take_trace();
        let pages = describe_pages(&path, &trace, 4096);
        let bytes = counter.bytes() - before;
        eprintln!("{what}: {bytes} B, {} writes: {pages:?}", trace.len());
        // What the README's table says; a change to the commit path that writes more fails.
        assert_eq!(
            bytes,
            pages.len() as u64 * 4096,
            "every page written once, at the fsync"
        );
        let most = if acked.is_some() { 11 } else { 9 };
        assert!(
            pages.len() <= most,
            "{what}: {} pages, at most {most}: {pages:?}",
            pages.len()
        );
        assert_eq!(pages[0], (0, "header".to_string()));
        assert!(pages.iter().any(|(_, w)| w == "events (leaf)"), "{pages:?}");
        assert!(pages.iter().any(|(_, w)| w == "meta"), "{pages:?}");
    }
}

/// Passes events through and wants `on_tick`, which writes nothing.
struct QuietTicks(Arc<std::sync::atomic::AtomicU64>);

impl crate::rules::RuleStage for QuietTicks {
    fn on_event(&mut self, event: Event, out: &mut crate::rules::StepOutput) {
        out.events.push(event);
    }
    fn on_tick(&mut self, _now_ms: i64, _out: &mut crate::rules::StepOutput) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn wants_tick(&self) -> bool {
        true
    }
}

#[test]
fn an_idle_gateway_writes_nothing_over_a_paused_minute() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("t.redb"), 1 << 20).unwrap();
    // A backlog that expires in an hour: nothing is due within the minute.
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cfg = buffer_cfg(1 << 30, WhenFull::DropOldest);
        let mut lp = wire(&db, cfg, Box::new(PassThrough), &rt).lp;
        lp.commit(
            (0..10).map(|n| Incoming::plain(ev(n, 50))).collect(),
            None,
            None,
        )
        .unwrap();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let ticks = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let Wired {
        lp,
        tx,
        atx,
        crx,
        metrics,
    } = wire(
        &db,
        buffer_cfg(1 << 30, WhenFull::DropOldest),
        Box::new(QuietTicks(ticks.clone())),
        &rt,
    );
    // The loop's clocks follow the paused one, so the minute is a minute to it too.
    static T0: std::sync::OnceLock<(tokio::time::Instant, i64)> = std::sync::OnceLock::new();
    {
        let _guard = rt.enter();
        T0.get_or_init(|| (tokio::time::Instant::now(), crate::event::now_ms()));
    }
    fn wall() -> i64 {
        let (t0, w0) = T0.get().unwrap();
        w0 + t0.elapsed().as_millis() as i64
    }
    fn mono() -> Instant {
        tokio::time::Instant::now().into_std()
    }
    let lp = lp
        .with_tick(Duration::from_secs(10))
        .with_clocks(wall, mono);
    let written = db.written().clone();
    let before = (written.bytes(), written.syncs());
    written.start_trace();
    let runner = std::thread::spawn(move || lp.run());
    // A minute of the loop's (paused) clock, while ticks that write nothing come due.
    rt.block_on(async {
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    assert!(
        ticks.load(Relaxed) >= 4,
        "on_tick ran every 10 s of the minute"
    );
    assert_eq!(metrics.commits(), 0, "no commit while idle");
    assert!(
        written.take_trace().is_empty(),
        "not a byte written, synced or not"
    );
    assert_eq!(
        (written.bytes(), written.syncs()),
        before,
        "no byte written and no fsync while idle"
    );
    // The loop is alive: an event still commits.
    rt.block_on(async {
        tx.send(Incoming::plain(ev(99, 10))).await.unwrap();
        // Drive the paused clock in small steps, giving the loop's thread real time.
        for _ in 0..2000 {
            if *crx.borrow() == 11 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    assert_eq!(*crx.borrow(), 11, "the event commits");
    assert!(written.syncs() > before.1);
    drop(tx);
    drop(atx);
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
    runner.join().unwrap();
}

#[test]
fn a_drained_file_is_compacted_and_keeps_every_buffered_event() {
    let mut h = harness(1 << 30, WhenFull::DropOldest);
    // ~50 MB of backlog, then upstream takes all but the newest 100 events.
    fill_backlog(&mut h, 25, 1000, 2000);
    let full = h.db.file_len();
    assert!(full > 48 << 20, "{full}");
    h.lp.commit(
        vec![],
        Some(ForwardAck {
            sink: 0,
            from: 0,
            up_to: 24_900,
            batch: 1,
        }),
        None,
    )
    .unwrap();
    let kept: Vec<Event> = read_after(&h.db.db().unwrap(), 0, 1000, u64::MAX).unwrap();
    assert_eq!(kept.len(), 100);
    assert_eq!(
        h.db.file_len(),
        full,
        "deleting rows does not shorten the file"
    );

    h.lp.maybe_compact();
    let after = h.db.file_len();
    assert!(after < full / 4, "compacted: {full} -> {after}");
    assert_eq!(
        h.metrics
            .compactions
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let d = h.db.db().unwrap();
    let again = read_after(&d, 0, 1000, u64::MAX).unwrap();
    assert_eq!(
        again
            .iter()
            .map(|e| (e.id, &e.topic, &e.payload))
            .collect::<Vec<_>>(),
        kept.iter()
            .map(|e| (e.id, &e.topic, &e.payload))
            .collect::<Vec<_>>(),
        "every buffered event survives compaction, unchanged"
    );
    let st = stats(&*d).unwrap();
    assert_eq!((st.backlog_events, st.next_id), (100, 25_001));
    drop(d);
    // Not worth it again: nothing happens.
    h.lp.maybe_compact();
    assert_eq!(
        h.metrics
            .compactions
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // And the store goes on.
    let r =
        h.lp.commit(vec![Incoming::plain(ev(1, 10))], None, None)
            .unwrap();
    assert_eq!(r.stored, 1);
}

#[test]
fn each_commit_counts_why_its_group_ended() {
    use crate::store::commit::GroupEnd;
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("t.redb"), 1 << 20).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = buffer_cfg(1 << 30, WhenFull::DropOldest);
    cfg.commit_max_events = 4;
    cfg.commit_max_wait = HumanDuration(Duration::from_millis(50));
    let w = wire(&db, cfg, Box::new(PassThrough), &rt);
    let (lp, tx, atx, mut crx, metrics) = (w.lp, w.tx, w.atx, w.crx, w.metrics);
    let runner = std::thread::spawn(move || lp.run());
    let ended = |e: GroupEnd| metrics.groups_ended[e as usize].load(Relaxed);
    let wait_committed = |crx: &mut watch::Receiver<u64>, id: u64| {
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), crx.wait_for(|c| *c >= id))
                .await
                .expect("committed in time")
                .unwrap();
        })
    };
    // Four at once: the group is full.
    for n in 1..=4 {
        tx.blocking_send(Incoming::plain(ev(n, 0)), rt.handle())
            .unwrap();
    }
    wait_committed(&mut crx, 4);
    assert_eq!(ended(GroupEnd::Full), 1);
    // One alone: its window runs out.
    tx.blocking_send(Incoming::plain(ev(5, 0)), rt.handle())
        .unwrap();
    wait_committed(&mut crx, 5);
    assert_eq!(ended(GroupEnd::Window), 1);
    // An acknowledgement alone.
    atx.send(ForwardMsg::Ack(ForwardAck {
        sink: 0,
        from: 0,
        up_to: 5,
        batch: 1,
    }))
    .unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while ended(GroupEnd::Acks) == 0 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(ended(GroupEnd::Acks), 1);
    let t = metrics.render();
    assert!(
        t.contains("tidepool_commit_groups_total{ended=\"full\"} 1"),
        "{t}"
    );
    assert!(
        t.contains("tidepool_commit_groups_total{ended=\"stalled\"} 0"),
        "{t}"
    );
    drop((tx, atx));
    runner.join().unwrap();
    assert_eq!(stats(&*db.db().unwrap()).unwrap().backlog_events, 0);
}
