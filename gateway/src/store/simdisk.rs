//! A simulated disk for the store's tests: a redb [`StorageBackend`] in memory that knows
//! which writes reached the medium (were followed by a sync) and can lose power.
//!
//! `kill -9` leaves the OS page cache intact, so it cannot show a missing fsync. Here a
//! power cut keeps only what was synced, and of the writes since the last sync, by
//! [`Keep`]: none of them, some in the order they were made (a disk that writes back in
//! order), or any subset (a disk that reorders), with one of the lost writes optionally
//! torn (its first bytes landed). Reads see every write, as through the page cache.
//!
//! Each [`Database`](redb::Database) gets its own [`SimBackend`] of the disk's current
//! power cycle: after a cut, the old backends fail every call and change nothing, so a
//! database dropped after the cut cannot write to the disk that came back.

use std::io;
use std::sync::{Arc, Mutex};

use redb::StorageBackend;

/// What of the writes since the last sync survives a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// None of them.
    Nothing,
    /// The first few, in the order they were made.
    Prefix,
    /// Any of them.
    Subset,
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Inner {
    /// What is on the medium.
    durable: Vec<u8>,
    /// What reads see.
    current: Vec<u8>,
    /// Changes since the last sync, in order.
    pending: Vec<Op>,
    /// Writes, length changes and syncs so far.
    ops: u64,
    /// The power goes at this op (which fails, and is not made).
    cut_at: Option<u64>,
    /// The power cycle: backends of an earlier one are dead.
    cycle: u64,
    /// Whether the armed cut has happened (the disk waits for [`SimDisk::restore`]).
    down: bool,
}

fn apply(buf: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write(offset, data) => {
            let end = *offset as usize + data.len();
            grow(buf, end);
            buf[*offset as usize..end].copy_from_slice(data);
        }
        Op::SetLen(len) => {
            buf.truncate(*len as usize);
            grow(buf, *len as usize);
        }
    }
}

/// Zero-extends `buf` to `len` (a zeroed allocation and a copy: `resize` fills byte by byte
/// in an unoptimised test build, which made it most of the model test's time).
fn grow(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        let mut bigger = vec![0u8; len];
        bigger[..buf.len()].copy_from_slice(buf);
        *buf = bigger;
    }
}

/// The disk, shared by every backend made from it.
#[derive(Debug, Clone, Default)]
pub struct SimDisk(Arc<Mutex<Inner>>);

impl SimDisk {
    /// An empty disk.
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    /// A backend for one database, of the current power cycle.
    pub fn backend(&self) -> SimBackend {
        SimBackend {
            disk: self.clone(),
            cycle: self.0.lock().unwrap().cycle,
        }
    }

    /// Mutating operations (writes, length changes, syncs) so far.
    pub fn ops(&self) -> u64 {
        self.0.lock().unwrap().ops
    }

    /// Arms a power cut: the `n`-th mutating operation from now (1 = the next) fails and
    /// the power is gone from then on, until [`restore`](Self::restore).
    pub fn cut_after(&self, n: u64) {
        let mut d = self.0.lock().unwrap();
        d.cut_at = Some(d.ops + n.max(1));
    }

    /// Cuts the power now: every call fails until [`restore`](Self::restore).
    pub fn cut_now(&self) {
        self.0.lock().unwrap().down = true;
    }

    /// Disarms a cut that has not happened.
    pub fn disarm(&self) {
        self.0.lock().unwrap().cut_at = None;
    }

    /// Whether an armed cut has happened.
    pub fn is_down(&self) -> bool {
        self.0.lock().unwrap().down
    }

    /// Cuts the power now (if an armed cut has not already) and brings it back: the medium
    /// keeps what was synced and, of the rest, what `keep` says, with one lost write torn
    /// if `tear`; `rng` picks which. Earlier backends are dead from here on. Returns how
    /// many unsynced changes were lost (wholly or in part).
    pub fn restore(&self, keep: Keep, tear: bool, rng: &mut fastrand::Rng) -> usize {
        let mut d = self.0.lock().unwrap();
        let pending = std::mem::take(&mut d.pending);
        let kept: Vec<bool> = match keep {
            Keep::Nothing => vec![false; pending.len()],
            Keep::Prefix => {
                let n = rng.usize(0..=pending.len());
                (0..pending.len()).map(|i| i < n).collect()
            }
            Keep::Subset => (0..pending.len()).map(|_| rng.bool()).collect(),
        };
        let lost: Vec<usize> = (0..pending.len()).filter(|&i| !kept[i]).collect();
        // In order, only the first write not made can be half made.
        let torn = match (tear, keep) {
            (false, _) => None,
            (true, Keep::Prefix) => lost.first().copied(),
            (true, _) if lost.is_empty() => None,
            (true, _) => Some(lost[rng.usize(0..lost.len())]),
        };
        let mut image = std::mem::take(&mut d.durable);
        for (i, op) in pending.iter().enumerate() {
            if kept[i] {
                apply(&mut image, op);
            } else if torn == Some(i) {
                if let Op::Write(offset, data) = op {
                    // A sector-aligned head of the write landed.
                    let sectors = data.len().div_ceil(512);
                    let head = (rng.usize(0..sectors.max(1)) * 512).min(data.len());
                    apply(&mut image, &Op::Write(*offset, data[..head].to_vec()));
                }
            }
        }
        d.current = image.clone();
        d.durable = image;
        d.cut_at = None;
        d.down = false;
        d.cycle += 1;
        lost.len()
    }

    /// The medium's bytes (what a power cut now would keep with [`Keep::Nothing`]).
    pub fn durable_len(&self) -> usize {
        self.0.lock().unwrap().durable.len()
    }
}

/// One database's view of a [`SimDisk`].
#[derive(Debug)]
pub struct SimBackend {
    disk: SimDisk,
    cycle: u64,
}

fn power_lost() -> io::Error {
    io::Error::other("simulated power loss")
}

impl SimBackend {
    /// Runs one mutating operation, unless the power is (or just went) out.
    fn mutate(&self, f: impl FnOnce(&mut Inner)) -> io::Result<()> {
        let mut d = self.disk.0.lock().unwrap();
        if d.cycle != self.cycle || d.down {
            return Err(power_lost());
        }
        d.ops += 1;
        if d.cut_at.is_some_and(|at| d.ops >= at) {
            d.down = true;
            return Err(power_lost());
        }
        f(&mut d);
        Ok(())
    }
}

impl StorageBackend for SimBackend {
    fn len(&self) -> io::Result<u64> {
        let d = self.disk.0.lock().unwrap();
        if d.cycle != self.cycle {
            return Err(power_lost());
        }
        Ok(d.current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let d = self.disk.0.lock().unwrap();
        if d.cycle != self.cycle || d.down {
            return Err(power_lost());
        }
        let start = offset as usize;
        let end = start + out.len();
        if end > d.current.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the disk",
            ));
        }
        out.copy_from_slice(&d.current[start..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.mutate(|d| {
            let op = Op::SetLen(len);
            apply(&mut d.current, &op);
            d.pending.push(op);
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.mutate(|d| {
            for op in std::mem::take(&mut d.pending) {
                apply(&mut d.durable, &op);
            }
        })
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.mutate(|d| {
            let op = Op::Write(offset, data.to_vec());
            apply(&mut d.current, &op);
            d.pending.push(op);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_keeps_what_was_synced_and_by_mode_what_was_not() {
        let disk = SimDisk::new();
        let b = disk.backend();
        b.write(0, &[1; 8]).unwrap();
        b.sync_data().unwrap();
        b.write(0, &[2; 4]).unwrap();
        b.write(8, &[3; 4]).unwrap();
        let mut out = [0; 12];
        b.read(0, &mut out).unwrap();
        assert_eq!(
            out,
            [2, 2, 2, 2, 1, 1, 1, 1, 3, 3, 3, 3],
            "reads see every write"
        );
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(disk.restore(Keep::Nothing, false, &mut rng), 2);
        assert!(b.read(0, &mut out[..1]).is_err(), "the old backend is dead");
        let b = disk.backend();
        assert_eq!(b.len().unwrap(), 8);
        let mut out = [0; 8];
        b.read(0, &mut out).unwrap();
        assert_eq!(out, [1; 8]);
    }

    #[test]
    fn an_armed_cut_fails_that_operation_and_all_after() {
        let disk = SimDisk::new();
        let b = disk.backend();
        disk.cut_after(2);
        b.write(0, &[1; 4]).unwrap();
        assert!(b.sync_data().is_err());
        assert!(disk.is_down());
        assert!(b.write(0, &[2; 4]).is_err());
        let mut rng = fastrand::Rng::with_seed(1);
        disk.restore(Keep::Nothing, false, &mut rng);
        assert_eq!(
            disk.backend().len().unwrap(),
            0,
            "the write was never synced"
        );
    }

    #[test]
    fn a_torn_write_lands_a_sector_aligned_head() {
        let mut partial = 0;
        for seed in 0..32 {
            let disk = SimDisk::new();
            let b = disk.backend();
            b.write(0, &[0; 4096]).unwrap();
            b.sync_data().unwrap();
            b.write(0, &[9; 4096]).unwrap();
            let mut rng = fastrand::Rng::with_seed(seed);
            disk.restore(Keep::Nothing, true, &mut rng);
            let mut out = vec![0; 4096];
            disk.backend().read(0, &mut out).unwrap();
            let head = out.iter().take_while(|&&x| x == 9).count();
            assert_eq!(head % 512, 0, "seed {seed}");
            assert!(out[head..].iter().all(|&x| x == 0), "seed {seed}");
            partial += usize::from(head > 0 && head < 4096);
        }
        assert!(partial > 0, "some tears land part of the write");
    }
}
