//! Power loss, not just `kill -9`: runs of the commit loop on a [`SimDisk`] that loses power
//! at a random write, sync or length change anywhere in the run, keeping only what was synced
//! (and, by [`Keep`], some of what was not, one write maybe torn). Reopened, the store must
//! pass redb's integrity check and equal the model after some prefix of the commits that
//! includes every commit that returned; ids still rise. The model is [`super::model`]'s.
//!
//! `TIDEPOOL_POWER_CUTS` sets the number of cuts (default 240).

use super::model::{Act, Caps, Input, Run, Step};
use super::simdisk::Keep;
use crate::config::WhenFull;

/// A run of ordinary operations (no restarts or planned crashes: the cut is the test's).
fn steps(rng: &mut fastrand::Rng) -> Vec<Step> {
    let act = |rng: &mut fastrand::Rng| match rng.u8(0..10) {
        0..=5 => Act::Keep,
        6 => Act::Drop,
        7 => Act::Fan(rng.u8(2..4)),
        8 => Act::Fail,
        _ => Act::Set(rng.u8(0..4), rng.u8(..)),
    };
    (0..rng.usize(5..30))
        .map(|_| match rng.u8(0..20) {
            0..=9 => Step::Ingest {
                inputs: (0..rng.usize(1..12))
                    .map(|_| {
                        if rng.u8(0..16) == 0 {
                            Input::Bad(rng.bool(), rng.usize(1..200))
                        } else {
                            let pad = if rng.u8(0..4) == 0 {
                                rng.usize(64..1500)
                            } else {
                                rng.usize(0..64)
                            };
                            Input::Event(act(rng), pad)
                        }
                    })
                    .collect(),
                tight: (rng.u8(0..12) == 0).then(|| rng.u64(0..600)),
            },
            10..=12 => Step::Read(rng.usize(1..8)),
            13..=15 => Step::Puback(rng.usize(1..3)),
            16 => Step::TooBig(rng.usize(..)),
            17 => Step::Wait(rng.u64(0..2500)),
            18 => Step::DropLetters(rng.u64(1..4)),
            _ => Step::Reconnect {
                session: rng.bool(),
            },
        })
        .collect()
}

fn caps(rng: &mut fastrand::Rng) -> Caps {
    Caps {
        max_bytes: [2_048, 8_192, u64::MAX / 2][rng.usize(0..3)],
        when_full: if rng.bool() {
            WhenFull::DropOldest
        } else {
            WhenFull::RejectNew
        },
        max_age_ms: [1_600, 3_600_000][rng.usize(0..2)],
        dlq_max_bytes: [600, 16 << 20][rng.usize(0..2)],
    }
}

fn cuts() -> u64 {
    std::env::var("TIDEPOOL_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(240)
}

#[test]
fn a_power_cut_anywhere_keeps_every_commit_that_returned() {
    let mut by_keep = [0u64; 3];
    for seed in 0..cuts() {
        let mut rng = fastrand::Rng::with_seed(seed);
        let caps = caps(&mut rng);
        let steps = steps(&mut rng);
        // A healthy run first: how many writes and syncs the run makes.
        let total = {
            let mut run = Run::new(caps.clone(), seed);
            let start = run.disk.ops();
            for (i, s) in steps.iter().enumerate() {
                assert!(run.step(s, &format!("healthy step {i} of seed {seed}")));
            }
            run.disk.ops() - start
        };
        if total == 0 {
            continue;
        }
        // Mostly in the middle of a write or sync; sometimes between two steps, when
        // nothing is being written (a commit that returned but was not synced shows there).
        let op = rng.u64(1..=total);
        let between = (rng.u8(0..5) == 0).then(|| rng.usize(0..steps.len()));
        let keep = [Keep::Nothing, Keep::Prefix, Keep::Subset][rng.usize(0..3)];
        let tear = rng.bool();
        by_keep[keep as usize] += 1;
        let mut run = Run::new(caps, seed);
        run.cut = (keep, tear);
        if between.is_none() {
            run.disk.cut_after(op);
        }
        let mut went = false;
        for (i, s) in steps.iter().enumerate() {
            let at = format!(
                "step {i} ({s:?}) of seed {seed}, cut at op {op} of {total} or after step {between:?}, {keep:?}, torn {tear}"
            );
            let up = run.step(s, &at);
            run.check(&at);
            if !up {
                went = true;
                break;
            }
            if between == Some(i) {
                let now = run.m.clone();
                run.recover(now, None, &at);
                run.check(&at);
                went = true;
                break;
            }
        }
        assert!(
            went,
            "seed {seed}: the cut at op {op} of {total} never came"
        );
        assert_eq!(run.cuts, 1);
        run.check_ids_rise(&format!("after the cut of seed {seed}"));
    }
    assert!(
        by_keep.iter().all(|&n| n > 0),
        "every kind of cut: {by_keep:?}"
    );
}
