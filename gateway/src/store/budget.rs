//! The write budget: how long a commit waits for company, so the card is written at most
//! `[buffer] write_budget` bytes a day.
//!
//! A token bucket of bytes. It fills at `write_budget / 86,400 s` and holds at most
//! [`BURST`] of that. Each commit takes what it wrote, as measured by the store's
//! [`WriteCounter`](super::wear::WriteCounter), and the bucket may go below zero.
//! While it holds something, a group of events waits only `commit_max_wait` for more
//! (light load, low latency). While it is spent, a group waits until the bucket is back
//! at zero, so fewer, larger commits go out, never longer than `budget_max_wait` (the
//! ceiling), and not at all once it holds [`ENOUGH`]. A steady load that costs more than the
//! budget even at the ceiling commits once per ceiling, and the forecast says the budget is
//! exceeded. The debt is capped at one ceiling's worth of budget, so after a burst the window
//! narrows again within one ceiling of quiet.
//!
//! Waiting costs latency, not durability, for what is acknowledged after its commit
//! (embedded and client-mode MQTT at QoS 1/2, serial with `ack = true`); for QoS 0 and
//! serial without acks, what a window holds is what a crash can lose.

use std::time::{Duration, Instant};

/// How much unspent budget the bucket keeps: a burst after a quiet spell commits at once.
pub const BURST: Duration = Duration::from_secs(10);

/// A group this large (bytes of events in memory, about half of that stored) commits after
/// `commit_max_wait` even while the budget is spent: its rows outweigh a commit's fixed cost
/// (~36 KiB: header, redb's system pages, the table tree) about two to one, so waiting for
/// more would save little, and a sender whose whole window is in the group (the embedded
/// broker's default `receive_maximum` of 1,000 small events is ~240 KiB) would only wait.
pub const ENOUGH: usize = 128 << 10;

/// A group whose senders have stopped (no event for [`stalled`]'s gap) commits even while
/// the budget is spent, once it (or the group before it: the tail of a burst) holds this
/// much: its senders are waiting for this commit
/// (their windows are in the group, or a burst is over), so waiting longer would only slow
/// them. Smaller groups (a few one-message-in-flight sensors) wait their window: for them
/// the budget wins.
pub const STALL_MIN_BYTES: usize = 8 << 10;
/// ...and at least this many events, for the gap to be measured.
pub const STALL_MIN_EVENTS: usize = 8;

/// When a group has stalled: `events` arrived between `first` and `last`; the gap after
/// which no new one means its senders have stopped is eight mean gaps so far (at 10
/// events/s from senders that still send, such a gap comes once in thousands), at least
/// 20 ms. `None`: too small a group to tell.
pub fn stalled(events: usize, bytes: usize, first: Instant, last: Instant) -> Option<Instant> {
    if events < STALL_MIN_EVENTS || bytes < STALL_MIN_BYTES {
        return None;
    }
    let mean = last.saturating_duration_since(first) / (events as u32 - 1);
    Some(last + (mean * 8).max(Duration::from_millis(20)))
}

/// The bucket.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Bytes a second; `None`: no budget.
    rate: Option<f64>,
    tokens: f64,
    at: Instant,
    min_wait: Duration,
    max_wait: Duration,
}

impl Budget {
    /// A budget of `per_day` bytes (0: none); a group waits `min_wait` with room in the
    /// budget, at most `max_wait` without.
    pub fn new(per_day: u64, min_wait: Duration, max_wait: Duration, now: Instant) -> Budget {
        let rate = (per_day > 0).then(|| per_day as f64 / 86_400.0);
        Budget {
            rate,
            tokens: rate.map_or(0.0, |r| r * BURST.as_secs_f64()),
            at: now,
            min_wait,
            max_wait: max_wait.max(min_wait),
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(rate) = self.rate {
            let dt = now.saturating_duration_since(self.at).as_secs_f64();
            self.tokens = (self.tokens + dt * rate).min(rate * BURST.as_secs_f64());
        }
        self.at = self.at.max(now);
    }

    /// How long a group that starts now waits for more events before it commits.
    pub fn window(&mut self, now: Instant) -> Duration {
        self.refill(now);
        match self.rate {
            Some(rate) if self.tokens < 0.0 => {
                let until_zero = Duration::from_secs_f64(-self.tokens / rate);
                until_zero.clamp(self.min_wait, self.max_wait)
            }
            _ => self.min_wait,
        }
    }

    /// Whether the budget is spent now (commits wait longer than `commit_max_wait`).
    pub fn spent(&mut self, now: Instant) -> bool {
        self.window(now) > self.min_wait
    }

    /// A commit wrote `bytes`.
    pub fn charge(&mut self, now: Instant, bytes: u64) {
        self.refill(now);
        if let Some(rate) = self.rate {
            let floor = -rate * self.max_wait.as_secs_f64();
            self.tokens = (self.tokens - bytes as f64).max(floor);
        }
    }

    /// The longest a group may wait: the ceiling.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn budget(per_day: u64) -> (Budget, Instant) {
        let t0 = Instant::now();
        (Budget::new(per_day, 5 * MS, 5000 * MS, t0), t0)
    }

    #[test]
    fn light_load_commits_after_commit_max_wait() {
        // 86.4 MB a day: 1,000 B/s, a burst of 10,000 B.
        let (mut b, t0) = budget(86_400_000);
        assert_eq!(b.window(t0), 5 * MS);
        b.charge(t0, 4_000);
        assert_eq!(b.window(t0), 5 * MS, "still within the burst");
    }

    #[test]
    fn a_spent_budget_widens_the_window_by_what_was_overspent() {
        let (mut b, t0) = budget(86_400_000); // 1,000 B/s
        b.charge(t0, 10_000 + 2_000); // 2,000 B over
        assert_eq!(b.window(t0), 2000 * MS);
        assert!(b.spent(t0));
        // A second later, half of it has come back.
        assert_eq!(b.window(t0 + 1000 * MS), 1000 * MS);
    }

    #[test]
    fn the_window_never_passes_its_ceiling() {
        let (mut b, t0) = budget(86_400_000);
        b.charge(t0, 1_000_000_000);
        assert_eq!(b.window(t0), 5000 * MS);
        assert_eq!(b.max_wait(), 5000 * MS);
    }

    #[test]
    fn it_narrows_again_when_the_load_goes() {
        let (mut b, t0) = budget(86_400_000);
        b.charge(t0, 30_000); // 20,000 B over
        assert_eq!(b.window(t0), 5000 * MS);
        // A minute without commits: back to zero and refilled, but never past the burst.
        let later = t0 + 60_000 * MS;
        assert_eq!(b.window(later), 5 * MS);
        b.charge(later, 10_000);
        assert_eq!(b.window(later), 5 * MS, "exactly spent, not over");
        b.charge(later, 1_000);
        assert_eq!(
            b.window(later),
            1000 * MS,
            "a full bucket holds one burst, not a minute's worth"
        );
    }

    #[test]
    fn a_steady_load_over_budget_settles_at_the_budget() {
        // 1 GB a day, commits of 30 KiB, events every 100 ms: the loop commits when the
        // window ends; bytes written over an hour stay within the budget plus one burst.
        let per_day = 1_000_000_000u64;
        let (mut b, t0) = budget(per_day);
        let mut now = t0;
        let mut written = 0u64;
        let end = t0 + Duration::from_secs(3600);
        while now < end {
            let w = b.window(now);
            now += w.max(100 * MS);
            b.charge(now, 30 * 1024);
            written += 30 * 1024;
        }
        // What an hour (to the last commit) allows, plus the burst, plus the one commit
        // that may take the bucket below zero.
        let rate = per_day as f64 / 86_400.0;
        let allowed = rate * (now - t0).as_secs_f64() + rate * 10.0 + 30.0 * 1024.0;
        assert!(written as f64 <= allowed, "{written} > {allowed}");
        assert!(
            written as f64 >= allowed * 0.9,
            "the budget is used, not wasted: {written}"
        );
    }

    #[test]
    fn after_a_burst_the_window_narrows_within_one_ceiling() {
        let (mut b, t0) = budget(86_400_000); // 1,000 B/s, ceiling 5 s
        for _ in 0..100 {
            b.charge(t0, 10_000_000); // far past the budget
        }
        assert_eq!(b.window(t0), 5000 * MS);
        assert_eq!(
            b.window(t0 + 5000 * MS),
            5 * MS,
            "the debt is one ceiling's worth"
        );
    }

    #[test]
    fn a_group_whose_senders_stopped_is_told_apart_from_a_trickle() {
        let t0 = Instant::now();
        // Too small to tell: a few one-in-flight sensors wait for the budget.
        assert_eq!(stalled(7, 1 << 20, t0, t0 + 70 * MS), None);
        assert_eq!(stalled(100, 4 << 10, t0, t0 + 70 * MS), None);
        // 25 events over 2.4 s (10 events/s): stalled only after 800 ms of silence.
        assert_eq!(
            stalled(25, 9 << 10, t0, t0 + 2400 * MS),
            Some(t0 + 3200 * MS)
        );
        // A burst taken at once: 20 ms after it.
        assert_eq!(stalled(500, 180 << 10, t0, t0), Some(t0 + 20 * MS));
    }

    #[test]
    fn no_budget_never_widens() {
        let (mut b, t0) = budget(0);
        b.charge(t0, u64::MAX / 2);
        assert_eq!(b.window(t0), 5 * MS);
        assert!(!b.spent(t0));
    }

    #[test]
    fn a_ceiling_below_commit_max_wait_is_commit_max_wait() {
        let t0 = Instant::now();
        let mut b = Budget::new(1, 50 * MS, 10 * MS, t0);
        b.charge(t0, 1 << 20);
        assert_eq!(b.window(t0), 50 * MS);
    }
}
