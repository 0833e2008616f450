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
    let act = |rng: &mut fastrand::Rng| match rng.u8(0..11) {
        0..=5 => Act::Keep,
        6 => Act::Drop,
        7 => Act::Fan(rng.u8(2..4)),
        8 => Act::Fail,
        9 => Act::Set(rng.u8(0..4), rng.u8(..)),
        _ => Act::Del(rng.u8(0..4)),
    };
    (0..rng.usize(5..30))
        .map(|_| match rng.u8(0..21) {
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
            13..=14 => Step::Puback(rng.usize(1..3)),
            15 => Step::PubackOne(rng.usize(..)),
            16 => Step::TooBig(rng.usize(..)),
            17 => Step::Wait(rng.u64(0..2500)),
            18 => Step::DropLetters(rng.u64(1..4)),
            19 => Step::StaleAck,
            _ => Step::Reconnect,
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

/// Embedded mode, through the MQTT face: sensors publish at QoS 1 while the power goes at a
/// random write; every publish the broker acknowledged is in the store that comes back.
/// `TIDEPOOL_MQTT_POWER_CUTS` sets the number of cuts (default 20).
#[test]
fn every_publish_the_mqtt_face_acknowledged_survives_a_power_cut() {
    // A gateway whose disk lost power never finishes its last commit: each is left behind
    // (its store thread retrying a disk it cannot open), so the runtime is not waited for.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(power_cuts_through_the_mqtt_face());
    rt.shutdown_background();
}

async fn power_cuts_through_the_mqtt_face() {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::simdisk::SimDisk;
    use super::{read_after, schema, Store, StoreError};

    let cuts: u64 = std::env::var("TIDEPOOL_MQTT_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let rules = tempfile::tempdir().unwrap();
    let (mut acked_total, mut cuts_with_acks) = (0usize, 0u64);
    for seed in 0..cuts {
        let mut rng = fastrand::Rng::with_seed(1_000 + seed);
        let disk = SimDisk::new();
        // The gateway's way to the disk; closed when the power goes, so a gateway left
        // running cannot open the disk that comes back.
        let powered = Arc::new(Mutex::new(true));
        let opener: super::Opener = {
            let (disk, powered) = (disk.clone(), powered.clone());
            Arc::new(move |hb| {
                let on = powered.lock().unwrap();
                if !*on {
                    return Err(StoreError::Reopening);
                }
                let backend = disk.backend();
                drop(on);
                schema::open_backend(backend, "simulated disk", 1 << 20, hb)
            })
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::with_opener(opener, dir.path(), 1 << 20).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let cfg = crate::config::Config::from_str_named(
            "power-cut.toml",
            &format!(
                "[ingest.mqtt]\nlisten = \"127.0.0.1:{port}\"\n[rules]\ndir = \"{}\"\n[admin]\nlisten = \"\"\n[buffer]\nmin_free = \"0\"\nwrite_budget = \"0\"\n",
                rules.path().display()
            ),
        )
        .unwrap();
        let (trigger, shutdown) = crate::shutdown::channel();
        let _running = crate::start_on(cfg, store, shutdown).await.unwrap();
        // At a random write or sync of some commit, or once so many publishes were
        // acknowledged (at any moment, which shows an acknowledgement sent for what was not
        // yet synced).
        let after_acks = if rng.bool() {
            disk.cut_after(rng.u64(1..200));
            usize::MAX
        } else {
            rng.usize(1..300)
        };
        let (acked, sent) = publish_until_the_power_goes(port, &disk, after_acks).await;
        if after_acks != usize::MAX {
            assert!(
                acked.len() >= after_acks,
                "seed {seed}: cut before {after_acks} acks"
            );
        }
        // The power is gone: the gateway is dead to the disk.
        *powered.lock().unwrap() = false;
        trigger.fire();
        let keep = [Keep::Nothing, Keep::Prefix, Keep::Subset][rng.usize(0..3)];
        disk.restore(keep, rng.bool(), &mut rng);

        let mut db = schema::open_backend(disk.backend(), "simulated disk", 1 << 20, None)
            .unwrap_or_else(|e| panic!("seed {seed}: reopen after the cut: {e}"));
        assert!(db.check_integrity().unwrap(), "seed {seed}: integrity");
        let stored: Vec<u64> = read_after(&db, 0, usize::MAX, u64::MAX)
            .unwrap()
            .iter()
            .map(|e| {
                let v: serde_json::Value = match &e.payload {
                    crate::event::Payload::Json(s) => serde_json::from_str(s).unwrap(),
                    p => panic!("seed {seed}: unexpected payload {p:?}"),
                };
                let n = v["n"].as_u64().unwrap();
                assert!(
                    (1..=sent).contains(&n),
                    "seed {seed}: stored {n}, sent {sent}"
                );
                n
            })
            .collect();
        let mut sorted = stored.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), stored.len(), "seed {seed}: stored twice");
        let lost: Vec<&u64> = acked
            .iter()
            .filter(|n| sorted.binary_search(n).is_err())
            .collect();
        assert!(
            lost.is_empty(),
            "seed {seed} ({keep:?}): {} acknowledged but lost, first {:?} (acknowledged {}, stored {})",
            lost.len(),
            &lost[..lost.len().min(10)],
            acked.len(),
            stored.len()
        );
        acked_total += acked.len();
        cuts_with_acks += u64::from(!acked.is_empty());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        cuts_with_acks * 2 >= cuts,
        "most cuts come after some acknowledgements ({cuts_with_acks} of {cuts}; {acked_total} in all)"
    );
}

/// A sensor (MQTT 3.1.1, QoS 1, up to 16 in flight) publishing `{"n":N}` until the power
/// goes (cut here once `cut_after_acks` were acknowledged), and a little after; returns the
/// N the broker acknowledged, and how many were sent.
async fn publish_until_the_power_goes(
    port: u16,
    disk: &super::simdisk::SimDisk,
    cut_after_acks: usize,
) -> (Vec<u64>, u64) {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let id = b"sensor-1";
    let mut connect = vec![0x10, (10 + 2 + id.len()) as u8];
    connect.extend_from_slice(&[
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0x02,
        0,
        60,
        0,
        id.len() as u8,
    ]);
    connect.extend_from_slice(id);
    s.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    let (mut rd, mut wr) = s.into_split();
    let acks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let acks = acks.clone();
        tokio::spawn(async move {
            let mut p = [0u8; 4];
            while rd.read_exact(&mut p).await.is_ok() {
                if p[..2] != [0x40, 2] {
                    return Err(format!("not a PUBACK: {p:?}"));
                }
                acks.lock()
                    .unwrap()
                    .push(u16::from_be_bytes([p[2], p[3]]) as u64);
            }
            Ok(())
        })
    };
    let (mut sent, mut down_at) = (0u64, None::<Instant>);
    let (mut seen, mut progress) = (0, Instant::now());
    while down_at.is_none_or(|t| t.elapsed() < Duration::from_millis(300)) && sent < 60_000 {
        if down_at.is_none() && disk.is_down() {
            down_at = Some(Instant::now());
        }
        let n = acks.lock().unwrap().len();
        if n >= cut_after_acks && down_at.is_none() {
            disk.cut_now();
        }
        if n != seen {
            (seen, progress) = (n, Instant::now());
        }
        assert!(
            down_at.is_some() || progress.elapsed() < Duration::from_secs(10),
            "no PUBACK for 10 s with the power on: sent {sent}, acknowledged {n}, disk ops {}",
            disk.ops()
        );
        if sent.saturating_sub(n as u64) >= 16 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        sent += 1;
        let topic = b"s/1";
        let payload = format!("{{\"n\":{sent}}}");
        let mut p = vec![
            0x32,
            (2 + topic.len() + 2 + payload.len()) as u8,
            0,
            topic.len() as u8,
        ];
        p.extend_from_slice(topic);
        p.extend_from_slice(&(sent as u16).to_be_bytes());
        p.extend_from_slice(payload.as_bytes());
        if wr.write_all(&p).await.is_err() {
            break;
        }
    }
    drop(wr);
    if reader.is_finished() {
        reader.await.unwrap().unwrap();
    } else {
        reader.abort();
    }
    let got = acks.lock().unwrap().clone();
    let mut distinct = got.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), got.len(), "each publish acknowledged once");
    (got, sent)
}
