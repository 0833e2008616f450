//! `max_age` by the gateway's clock: when each group of events was stored.
//!
//! An event's `ts` is what a device, a serial line or a rule said; it is not trusted for
//! expiry. Instead the table `arrivals` maps the first id of a group of consecutive events
//! to the gateway's wall-clock time (ms) when the group began; a new group (a new row) starts
//! when a commit stores events and more than [`mark_interval`] has passed, by the monotonic
//! clock, since the last one, or at the first commit after a start. So every event of a group
//! was stored within one interval of the group's time, and the table holds one small row per
//! interval of ingest (at most one a minute), not one per event.
//!
//! - A group expires when `now ≥ time + interval + max_age`: up to one interval late, never
//!   early. Expiry removes a whole id range, so no single odd event can block it.
//! - Powered-off time counts: the times are wall-clock, kept across restarts.
//! - A clock that is not set yet (a Pi without a real-time clock before NTP: earlier than
//!   [`SANE_MS`]) records [`UNKNOWN`]; such groups are given the first sane reading once there
//!   is one, so they are aged from then, never expired at once.
//! - A jump of the wall clock while the gateway runs (NTP stepping the clock, forward or
//!   back, by more than [`JUMP_MS`] against the monotonic clock) shifts the groups stored by
//!   this run by the same amount, so their ages stay true. Groups stored before this start
//!   keep their recorded times: after a backwards jump they are kept longer (by up to the
//!   size of the jump), after a forward one they expire sooner, as the wall clock says.

use std::time::{Duration, Instant};

use redb::{ReadableTable, ReadableTableMetadata, Table};

use super::{row_size, StoreError};

/// Before this (2025-01-01T00:00:00Z) the wall clock is taken as not set.
pub const SANE_MS: i64 = 1_735_689_600_000;
/// The time of a group stored while the clock was not set.
pub const UNKNOWN: i64 = 0;
/// A wall-clock step larger than this (against the monotonic clock) is a jump.
pub const JUMP_MS: i64 = 5_000;

/// `now` if the clock looks set, else [`UNKNOWN`].
pub fn wall_or_unknown(now: i64) -> i64 {
    if now >= SANE_MS {
        now
    } else {
        UNKNOWN
    }
}

/// How long one group spans at most: a sixteenth of `max_age`, between 100 ms and 1 minute.
pub fn mark_interval(max_age: Duration) -> Duration {
    (max_age / 16).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// The commit loop's view of arrival times between commits.
#[derive(Debug, Clone)]
pub struct Arrivals {
    max_age_ms: i64,
    interval: Duration,
    interval_ms: i64,
    /// Last wall reading and the monotonic instant it was taken.
    anchor: Option<(i64, Instant)>,
    /// The first id this run stored: groups from here on are this run's.
    run_first_id: u64,
    /// When this run last started a group (monotonic).
    last_mark: Option<Instant>,
    /// A shift to apply to this run's groups in the next commit.
    pending_shift: i64,
    /// Some group has an unknown time.
    has_unknown: bool,
    /// The oldest group (first id, time), after the last commit.
    first: Option<(u64, i64)>,
}

/// What the commit loop does about arrival times in one commit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClockNote {
    /// The wall clock jumped by this much (ms) since the last reading.
    pub jump: Option<i64>,
    /// The clock is now set and some groups still have no time.
    pub settle_unknown: bool,
}

impl Arrivals {
    /// For a store whose next id is `next_id`, with `first` its oldest group and
    /// `has_unknown` whether any group lacks a time.
    pub fn new(
        max_age: Duration,
        next_id: u64,
        first: Option<(u64, i64)>,
        has_unknown: bool,
    ) -> Self {
        let interval = mark_interval(max_age);
        Arrivals {
            max_age_ms: max_age.as_millis().min(i64::MAX as u128) as i64,
            interval,
            interval_ms: interval.as_millis() as i64,
            anchor: None,
            run_first_id: next_id,
            last_mark: None,
            pending_shift: 0,
            has_unknown,
            first,
        }
    }

    /// Reads the clock pair: notes a jump, or the clock becoming set.
    pub fn observe(&mut self, wall: i64, mono: Instant) -> ClockNote {
        let mut note = ClockNote::default();
        if let Some((w0, m0)) = self.anchor {
            let expected = w0.saturating_add(mono.saturating_duration_since(m0).as_millis() as i64);
            let delta = wall - expected;
            if w0 >= SANE_MS && wall >= SANE_MS && delta.abs() > JUMP_MS {
                note.jump = Some(delta);
                self.pending_shift += delta;
            }
        }
        self.anchor = Some((wall, mono));
        note.settle_unknown = self.has_unknown && wall >= SANE_MS;
        note
    }

    /// When the oldest group is due to expire (wall ms), if it has a time.
    pub fn due_at(&self) -> Option<i64> {
        match self.first {
            Some((_, t)) if t != UNKNOWN => Some(
                t.saturating_add(self.interval_ms)
                    .saturating_add(self.max_age_ms),
            ),
            _ => None,
        }
    }

    /// Whether something must be written about arrivals in the next commit even without
    /// events: expiry due, a jump to record, unknown times to settle.
    pub fn needs_commit(&self, wall: i64) -> bool {
        self.pending_shift != 0 && self.first.is_some()
            || self.has_unknown && wall >= SANE_MS && self.first.is_some()
            || self.due_at().is_some_and(|d| wall >= d)
    }

    /// In a transaction: applies a pending shift and settles unknown times.
    pub fn fix_times(&mut self, arr: &mut Table<u64, i64>, wall: i64) -> Result<(), StoreError> {
        if self.pending_shift != 0 {
            let shift = self.pending_shift;
            let rows: Vec<(u64, i64)> = arr
                .range(self.run_first_id..)?
                .map(|r| r.map(|(k, v)| (k.value(), v.value())))
                .collect::<Result<_, _>>()?;
            for (k, t) in rows {
                if t != UNKNOWN {
                    arr.insert(k, t.saturating_add(shift))?;
                }
            }
        }
        if self.has_unknown && wall >= SANE_MS {
            let rows: Vec<u64> = arr
                .iter()?
                .filter_map(|r| match r {
                    Ok((k, v)) if v.value() == UNKNOWN => Some(Ok(k.value())),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()?;
            for k in rows {
                arr.insert(k, wall)?;
            }
        }
        Ok(())
    }

    /// In a transaction that stored events from `first_stored`: starts a group if due.
    pub fn note_stored(
        &mut self,
        arr: &mut Table<u64, i64>,
        first_stored: u64,
        wall: i64,
        mono: Instant,
    ) -> Result<(), StoreError> {
        let start = arr.is_empty()?
            || self
                .last_mark
                .is_none_or(|m| mono.saturating_duration_since(m) >= self.interval);
        if start {
            let t = wall_or_unknown(wall);
            self.has_unknown |= t == UNKNOWN;
            arr.insert(first_stored, t)?;
            self.last_mark = Some(mono);
        }
        Ok(())
    }

    /// In a transaction: removes every group due at `wall`, with its events; returns
    /// (events removed, their stored bytes).
    pub fn expire(
        &self,
        arr: &mut Table<u64, i64>,
        events: &mut Table<u64, &[u8]>,
        wall: i64,
    ) -> Result<(u64, u64), StoreError> {
        let (mut n, mut bytes) = (0, 0);
        loop {
            let Some((f, t)) = arr.first()?.map(|(k, v)| (k.value(), v.value())) else {
                break;
            };
            if t == UNKNOWN
                || wall
                    < t.saturating_add(self.interval_ms)
                        .saturating_add(self.max_age_ms)
            {
                break;
            }
            let bound = {
                let mut it = arr.range(f + 1..)?;
                it.next().transpose()?.map(|(k, _)| k.value())
            };
            loop {
                let row = match events.first()? {
                    Some((k, v)) if bound.is_none_or(|b| k.value() < b) => {
                        Some((k.value(), v.value().len()))
                    }
                    _ => None,
                };
                let Some((k, len)) = row else { break };
                events.remove(k)?;
                n += 1;
                bytes += row_size(len);
            }
            arr.remove(f)?;
        }
        Ok((n, bytes))
    }

    /// In a transaction, after rows left the low end of `events`: drops groups that no longer
    /// hold any event, and reads back the oldest group.
    pub fn prune(
        &mut self,
        arr: &mut Table<u64, i64>,
        events: &Table<u64, &[u8]>,
        wall: i64,
    ) -> Result<(), StoreError> {
        match events.first()?.map(|(k, _)| k.value()) {
            None => while arr.pop_first()?.is_some() {},
            Some(low) => loop {
                let second = {
                    let mut it = arr.iter()?;
                    it.next();
                    it.next().transpose()?.map(|(k, _)| k.value())
                };
                match second {
                    Some(s) if s <= low => {
                        arr.pop_first()?;
                    }
                    _ => break,
                }
            },
        }
        self.first = arr.first()?.map(|(k, v)| (k.value(), v.value()));
        if self.has_unknown && wall >= SANE_MS {
            self.has_unknown = false;
        }
        self.pending_shift = 0;
        Ok(())
    }

    /// The oldest group's time (wall ms), for "oldest buffered age"; 0 when unknown or none.
    pub fn oldest(&self) -> i64 {
        self.first.map(|(_, t)| t).unwrap_or(0)
    }

    /// The pending shift (kept to restore after a failed commit).
    pub fn pending_shift(&self) -> i64 {
        self.pending_shift
    }
}

/// Reads (oldest group, any unknown) from a store.
pub fn load(arr: &impl ReadableTable<u64, i64>) -> Result<(Option<(u64, i64)>, bool), StoreError> {
    let first = arr.first()?.map(|(k, v)| (k.value(), v.value()));
    let mut unknown = false;
    for r in arr.iter()? {
        if r?.1.value() == UNKNOWN {
            unknown = true;
            break;
        }
    }
    Ok((first, unknown))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;
    const NOW: i64 = SANE_MS + 400 * DAY;

    #[test]
    fn interval_is_bounded() {
        assert_eq!(
            mark_interval(Duration::from_secs(7 * 86_400)),
            Duration::from_secs(60)
        );
        assert_eq!(
            mark_interval(Duration::from_secs(1)),
            Duration::from_millis(100)
        );
        assert_eq!(
            mark_interval(Duration::from_secs(16)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn unset_clock_is_unknown() {
        assert_eq!(wall_or_unknown(1_000), UNKNOWN);
        assert_eq!(wall_or_unknown(NOW), NOW);
    }

    #[test]
    fn a_step_against_the_monotonic_clock_is_a_jump() {
        let mut a = Arrivals::new(Duration::from_secs(3600), 1, None, false);
        let m0 = Instant::now();
        assert_eq!(a.observe(NOW, m0), ClockNote::default());
        // 10 s later by both clocks: no jump.
        let m1 = m0 + Duration::from_secs(10);
        assert_eq!(a.observe(NOW + 10_000, m1).jump, None);
        // The wall clock steps a day ahead.
        let m2 = m1 + Duration::from_secs(1);
        assert_eq!(a.observe(NOW + 11_000 + DAY, m2).jump, Some(DAY));
        assert_eq!(a.pending_shift(), DAY);
        // From an unset clock to a set one is not a jump: unknown times are settled instead.
        let mut b = Arrivals::new(Duration::from_secs(3600), 1, Some((1, UNKNOWN)), true);
        b.observe(1_000, m0);
        let n = b.observe(NOW, m1);
        assert_eq!(n.jump, None);
        assert!(n.settle_unknown);
        assert!(b.needs_commit(NOW));
    }

    #[test]
    fn due_only_after_interval_and_max_age() {
        let a = Arrivals::new(Duration::from_secs(3600), 1, Some((1, NOW)), false);
        let due = a.due_at().unwrap();
        assert_eq!(due, NOW + 3_600_000 + 60_000);
        assert!(!a.needs_commit(due - 1));
        assert!(a.needs_commit(due));
        let unknown = Arrivals::new(Duration::from_secs(3600), 1, Some((1, UNKNOWN)), true);
        assert_eq!(unknown.due_at(), None);
        assert!(
            !unknown.needs_commit(5_000),
            "clock still unset: nothing to do"
        );
    }
}
