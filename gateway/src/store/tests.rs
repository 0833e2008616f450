//! Model test: the store against an in-memory FIFO, over random operation sequences.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::*;
use crate::admin::metrics::Metrics;
use crate::config::{BufferConfig, ByteSize, HumanDuration, WhenFull};
use crate::rules::PassThrough;
use crate::store::commit::{CommitLoop, Dedup, ForwardAck, Incoming};

struct Harness {
    _dir: tempfile::TempDir,
    db: Arc<Database>,
    lp: CommitLoop,
    _rt: tokio::runtime::Runtime,
}

fn harness(max_bytes: u64, when_full: WhenFull) -> Harness {
    harness_in(tempfile::tempdir().unwrap(), max_bytes, when_full)
}

fn harness_in(dir: tempfile::TempDir, max_bytes: u64, when_full: WhenFull) -> Harness {
    let db = open(&dir.path().join("t.redb"), 1 << 20).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_tx, rx) = mpsc::channel(1);
    let (_atx, arx) = mpsc::unbounded_channel();
    let (ctx, _crx) = watch::channel(0);
    let cfg = BufferConfig {
        max_bytes: ByteSize(max_bytes),
        max_age: HumanDuration(Duration::from_secs(3600)),
        when_full,
        commit_max_events: 100,
        commit_max_wait: HumanDuration(Duration::from_millis(1)),
        cache_size: ByteSize(1 << 20),
    };
    let lp = CommitLoop::new(
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
    Harness {
        _dir: dir,
        db,
        lp,
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
    }
}

/// The model: (id, n, stored size), oldest first.
#[derive(Default)]
struct Model {
    rows: VecDeque<(u64, u64, u64)>,
    next_id: u64,
    dropped_full: u64,
}

impl Model {
    fn bytes(&self) -> u64 {
        self.rows.iter().map(|r| r.2).sum()
    }
}

fn run_model(seed: u64, max_bytes: u64, when_full: WhenFull) {
    let mut h = harness(max_bytes, when_full);
    let mut m = Model {
        next_id: 1,
        ..Default::default()
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut n = 0u64;
    for _step in 0..200 {
        match rng.u8(0..10) {
            0..=6 => {
                let k = rng.usize(1..40);
                let mut group = Vec::new();
                for _ in 0..k {
                    let e = ev(n, rng.usize(0..300));
                    let size = row_size(encode(&e).len());
                    // Model of the cap policy.
                    if m.bytes() + size > max_bytes {
                        match when_full {
                            WhenFull::RejectNew => {
                                m.dropped_full += 1;
                                n += 1;
                                group.push(Incoming::plain(e));
                                continue;
                            }
                            WhenFull::DropOldest => {
                                while m.bytes() + size > max_bytes && !m.rows.is_empty() {
                                    m.rows.pop_front();
                                    m.dropped_full += 1;
                                }
                            }
                        }
                    }
                    m.rows.push_back((m.next_id, n, size));
                    m.next_id += 1;
                    n += 1;
                    group.push(Incoming::plain(e));
                }
                h.lp.commit(&group, None, false, None).unwrap();
            }
            7..=8 => {
                if let Some(&(id, _, _)) = m.rows.get(
                    rng.usize(0..m.rows.len().max(1))
                        .min(m.rows.len().saturating_sub(1)),
                ) {
                    h.lp.commit(
                        &[],
                        Some(ForwardAck {
                            up_to: id,
                            batch: 1,
                        }),
                        false,
                        None,
                    )
                    .unwrap();
                    while m.rows.front().is_some_and(|r| r.0 <= id) {
                        m.rows.pop_front();
                    }
                }
            }
            _ => {
                // Reopen: everything survives, ids continue.
                let Harness { _dir, db, lp, _rt } = h;
                drop(lp);
                drop(db);
                drop(_rt);
                h = harness_in(_dir, max_bytes, when_full);
            }
        }
        // The store agrees with the model.
        let st = stats(&*h.db).unwrap();
        assert_eq!(st.backlog_events, m.rows.len() as u64, "seed {seed}");
        assert_eq!(st.backlog_bytes, m.bytes(), "seed {seed}");
        assert_eq!(st.next_id, m.next_id, "seed {seed}");
        assert!(st.backlog_bytes <= max_bytes);
        assert_eq!(
            st.dropped.iter().find(|d| d.0 == "buffer_full").unwrap().1,
            m.dropped_full,
            "seed {seed}"
        );
        let all = read_after(&h.db, 0, usize::MAX, u64::MAX).unwrap();
        let got: Vec<(u64, String)> = all.iter().map(|e| (e.id, e.topic.clone())).collect();
        let want: Vec<(u64, String)> = m.rows.iter().map(|r| (r.0, format!("t/{}", r.1))).collect();
        assert_eq!(got, want, "seed {seed}");
    }
}

#[test]
fn model_drop_oldest() {
    for seed in 0..6 {
        run_model(seed, 16 * 1024, WhenFull::DropOldest);
    }
}

#[test]
fn model_reject_new() {
    for seed in 100..106 {
        run_model(seed, 16 * 1024, WhenFull::RejectNew);
    }
}

#[test]
fn model_unbounded() {
    for seed in 200..203 {
        run_model(seed, u64::MAX / 2, WhenFull::DropOldest);
    }
}

#[test]
fn read_after_respects_count_and_bytes() {
    let mut h = harness(u64::MAX / 2, WhenFull::DropOldest);
    let group: Vec<Incoming> = (0..10).map(|n| Incoming::plain(ev(n, 100))).collect();
    h.lp.commit(&group, None, false, None).unwrap();
    assert_eq!(read_after(&h.db, 0, 3, u64::MAX).unwrap().len(), 3);
    assert_eq!(read_after(&h.db, 8, 100, u64::MAX).unwrap().len(), 2);
    assert_eq!(
        read_after(&h.db, 0, 100, 1).unwrap().len(),
        1,
        "always at least one"
    );
    assert!(read_after(&h.db, 10, 100, u64::MAX).unwrap().is_empty());
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
        h.lp.commit(&[msg(1, key(7, 42, false, 1))], None, false, None)
            .unwrap()
            .stored,
        1
    );
    // The broker resends it with DUP after a crash before our PUBACK: skipped.
    let r =
        h.lp.commit(&[msg(1, key(7, 42, true, 2))], None, false, None)
            .unwrap();
    assert_eq!((r.stored, r.deduped), (0, 1));
    // A different message reusing the packet id later is stored.
    let r =
        h.lp.commit(&[msg(2, key(7, 43, true, 3))], None, false, None)
            .unwrap();
    assert_eq!(r.stored, 1);
    // Once the PUBACK of that delivery is written, the same id and content is a new message.
    log.written(7, 3);
    let r =
        h.lp.commit(&[msg(3, key(7, 43, true, 4))], None, false, None)
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
        h.lp.commit(&[frame(1, 1), frame(2, 2), frame(2, 2)], None, false, None)
            .unwrap();
    assert_eq!((r.stored, r.deduped), (2, 1));
    let r =
        h.lp.commit(&[frame(1, 1), frame(3, 3)], None, false, None)
            .unwrap();
    assert_eq!((r.stored, r.deduped), (1, 1));
}

#[test]
fn max_age_drops_old_events_and_counts_them() {
    let mut h = harness(u64::MAX / 2, WhenFull::DropOldest);
    let mut old = ev(1, 0);
    old.ts -= 2 * 3600 * 1000;
    h.lp.commit(
        &[Incoming::plain(old), Incoming::plain(ev(2, 0))],
        None,
        false,
        None,
    )
    .unwrap();
    let r = h.lp.commit(&[], None, true, None).unwrap();
    assert_eq!(r.dropped_age, 1);
    let st = stats(&*h.db).unwrap();
    assert_eq!(st.backlog_events, 1);
    assert_eq!(st.dropped.iter().find(|d| d.0 == "max_age").unwrap().1, 1);
}
