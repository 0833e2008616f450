//! The wear forecast: what the store writes to the card, per event and per day, what that
//! means for the card's life, and, while the backlog grows (an outage), when the buffer will
//! be full.
//!
//! The commit loop takes a [`Sample`] every [`EVERY`] (bytes written, events committed,
//! backlog, free space); the last hour is kept in memory (nothing of it is written). The
//! forecast compares the newest sample with the one [`RECENT`] before it (or the oldest
//! there is): rates over the last ten minutes.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How often a sample is taken.
pub const EVERY: Duration = Duration::from_secs(10);
/// The span the rates are taken over.
pub const RECENT: Duration = Duration::from_secs(600);
/// Rates over less than this are not given (a start-up burst is not a day's rate).
pub const MIN_SPAN: Duration = Duration::from_secs(60);
/// Samples kept: an hour.
const KEEP: usize = 360;

/// One reading.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When.
    pub at: Instant,
    /// Bytes the store wrote since start.
    pub written: u64,
    /// Store commits since start.
    pub commits: u64,
    /// Events committed since start.
    pub events: u64,
    /// Stored bytes buffered.
    pub backlog_bytes: u64,
    /// Events buffered.
    pub backlog_events: u64,
    /// Bytes available on the store's filesystem, if known.
    pub fs_avail: Option<u64>,
}

/// What the forecast is measured against: the config.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// `write_budget` (bytes a day; 0: none).
    pub write_budget: u64,
    /// `card_endurance` (bytes; 0: unknown).
    pub card_endurance: u64,
    /// `max_bytes`.
    pub max_bytes: u64,
    /// `min_free`, in bytes on this filesystem (0: off).
    pub min_free: u64,
}

/// The forecast, for `/status` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Forecast {
    /// Seconds the rates are taken over (0: not enough samples yet).
    pub span_seconds: f64,
    /// Bytes written a second, recently.
    pub bytes_per_second: f64,
    /// Bytes written per event committed, recently (`None`: no events).
    pub bytes_per_event: Option<f64>,
    /// Commits (each one fsync) a second, recently.
    pub commits_per_second: f64,
    /// Events committed a second, recently.
    pub events_per_second: f64,
    /// Bytes a day at the recent rate.
    pub bytes_per_day: f64,
    /// `write_budget` (0: none).
    pub write_budget: u64,
    /// Years the card lasts at this rate (`None`: endurance unknown or nothing written).
    pub card_life_years: Option<f64>,
    /// Backlog growth, stored bytes a second (negative: draining).
    pub backlog_bytes_per_second: f64,
    /// Backlog growth, events a second.
    pub backlog_events_per_second: f64,
    /// Seconds until `max_bytes` or `min_free` is reached at the growth rate (`None`: not growing).
    pub full_in_seconds: Option<f64>,
    /// Which limit that is: `max_bytes` or `min_free`.
    pub full_by: Option<&'static str>,
}

/// The samples, shared by the commit loop (writer) and the admin endpoint (readers).
#[derive(Debug, Default)]
pub struct Wear {
    inner: Mutex<(VecDeque<Sample>, Limits)>,
}

impl Wear {
    /// Sets the limits the forecast is measured against.
    pub fn configure(&self, limits: Limits) {
        self.inner.lock().unwrap().1 = limits;
    }

    /// Whether a sample is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.inner
            .lock()
            .unwrap()
            .0
            .back()
            .is_none_or(|s| now.saturating_duration_since(s.at) >= EVERY)
    }

    /// Records a sample.
    pub fn record(&self, s: Sample) {
        let mut g = self.inner.lock().unwrap();
        g.0.push_back(s);
        while g.0.len() > KEEP {
            g.0.pop_front();
        }
    }

    /// The newest sample.
    pub fn newest(&self) -> Option<Sample> {
        self.inner.lock().unwrap().0.back().copied()
    }

    /// The forecast from the samples so far, with `now` as the newest reading.
    pub fn forecast(&self, now: Sample) -> Forecast {
        let g = self.inner.lock().unwrap();
        let from =
            g.0.iter()
                .find(|s| now.at.saturating_duration_since(s.at) <= RECENT)
                .copied();
        match from {
            Some(from) => forecast(&from, &now, &g.1),
            None => Forecast::default(),
        }
    }
}

/// The forecast between two samples.
pub fn forecast(from: &Sample, to: &Sample, limits: &Limits) -> Forecast {
    let span = to.at.saturating_duration_since(from.at).as_secs_f64();
    if span < MIN_SPAN.as_secs_f64() {
        return Forecast {
            write_budget: limits.write_budget,
            ..Forecast::default()
        };
    }
    let d = |a: u64, b: u64| b as f64 - a as f64;
    let bytes = d(from.written, to.written).max(0.0);
    let events = d(from.events, to.events).max(0.0);
    let bytes_per_second = bytes / span;
    let bytes_per_day = bytes_per_second * 86_400.0;
    let backlog_bytes_per_second = d(from.backlog_bytes, to.backlog_bytes) / span;
    // Until full: the buffer's cap at the backlog's growth, the filesystem's floor at the
    // rate free space goes (the file grows by more than the rows: pages, copies).
    let mut full: Option<(f64, &'static str)> = None;
    let mut consider = |secs: f64, by: &'static str| {
        if secs.is_finite() && secs >= 0.0 && full.is_none_or(|(s, _)| secs < s) {
            full = Some((secs, by));
        }
    };
    if backlog_bytes_per_second > 0.0 && limits.max_bytes > 0 {
        let room = limits.max_bytes.saturating_sub(to.backlog_bytes) as f64;
        consider(room / backlog_bytes_per_second, "max_bytes");
    }
    if let (Some(a), Some(b)) = (from.fs_avail, to.fs_avail) {
        let falling = (a as f64 - b as f64) / span;
        if falling > 0.0 && limits.min_free > 0 && backlog_bytes_per_second > 0.0 {
            let room = b.saturating_sub(limits.min_free) as f64;
            consider(room / falling, "min_free");
        }
    }
    Forecast {
        span_seconds: span,
        bytes_per_second,
        bytes_per_event: (events > 0.0).then(|| bytes / events),
        commits_per_second: d(from.commits, to.commits).max(0.0) / span,
        events_per_second: events / span,
        bytes_per_day,
        write_budget: limits.write_budget,
        card_life_years: (limits.card_endurance > 0 && bytes_per_day > 0.0)
            .then(|| limits.card_endurance as f64 / bytes_per_day / 365.25),
        backlog_bytes_per_second,
        backlog_events_per_second: d(from.backlog_events, to.backlog_events) / span,
        full_in_seconds: full.map(|(s, _)| s),
        full_by: full.map(|(_, b)| b),
    }
}

/// A duration as a person reads it: "3 h 20 min", "45 s", "12 days".
pub fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        3600..=86_399 => match (s % 3600) / 60 {
            0 => format!("{} h", s / 3600),
            m => format!("{} h {m} min", s / 3600),
        },
        _ => format!("{:.0} days", s as f64 / 86_400.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    fn sample(t: Instant, written: u64, events: u64, backlog: u64, avail: u64) -> Sample {
        Sample {
            at: t,
            written,
            commits: written / 30_000,
            events,
            backlog_bytes: backlog,
            backlog_events: backlog / 250,
            fs_avail: Some(avail),
        }
    }

    #[test]
    fn bytes_per_event_and_per_day() {
        let t0 = Instant::now();
        let limits = Limits {
            write_budget: 1_000_000_000,
            card_endurance: 30_000_000_000_000,
            max_bytes: 512 << 20,
            min_free: 64 << 20,
        };
        // 600 s, 6,000 events, 60 MB written: 10 events/s, 10,000 B/event, 100 kB/s.
        let f = forecast(
            &sample(t0, 0, 0, 0, 10 << 30),
            &sample(at(t0, 600), 60_000_000, 6_000, 0, 10 << 30),
            &limits,
        );
        assert_eq!(f.events_per_second, 10.0);
        assert_eq!(f.bytes_per_event, Some(10_000.0));
        assert_eq!(f.bytes_per_day, 8_640_000_000.0);
        assert_eq!(f.commits_per_second, 2_000.0 / 600.0);
        // 30 TB at 8.64 GB a day: 3,472 days.
        let years = f.card_life_years.unwrap();
        assert!((years - 30e12 / 8.64e9 / 365.25).abs() < 1e-9, "{years}");
        assert_eq!(f.full_in_seconds, None, "the backlog is not growing");
    }

    #[test]
    fn an_outage_says_when_the_buffer_is_full_and_by_which_limit() {
        let t0 = Instant::now();
        let limits = Limits {
            max_bytes: 100_000_000,
            min_free: 1_000_000_000,
            ..Limits::default()
        };
        // The backlog grows 10 kB/s from 64 MB: max_bytes (100 MB) in 3,600 s.
        let f = forecast(
            &sample(t0, 0, 0, 58_000_000, 100_000_000_000),
            &sample(at(t0, 600), 0, 0, 64_000_000, 100_000_000_000),
            &limits,
        );
        assert_eq!(f.backlog_bytes_per_second, 10_000.0);
        assert_eq!(f.full_in_seconds, Some(3600.0));
        assert_eq!(f.full_by, Some("max_bytes"));
        // The disk goes first when free space falls faster towards min_free.
        let f = forecast(
            &sample(t0, 0, 0, 58_000_000, 2_200_000_000),
            &sample(at(t0, 600), 0, 0, 64_000_000, 1_600_000_000),
            &limits,
        );
        assert_eq!(f.full_in_seconds, Some(600.0));
        assert_eq!(f.full_by, Some("min_free"));
    }

    #[test]
    fn no_endurance_no_years_and_too_short_a_span_no_rates() {
        let t0 = Instant::now();
        let f = forecast(
            &sample(t0, 0, 0, 0, 1),
            &sample(at(t0, 60), 1_000, 0, 0, 1),
            &Limits::default(),
        );
        assert_eq!(f.card_life_years, None);
        assert_eq!(f.bytes_per_event, None, "no events: no bytes per event");
        let f = forecast(
            &sample(t0, 0, 0, 0, 1),
            &sample(t0, 1_000, 5, 0, 1),
            &Limits::default(),
        );
        assert_eq!(f.span_seconds, 0.0);
    }

    #[test]
    fn rates_come_from_the_last_ten_minutes() {
        let t0 = Instant::now();
        let w = Wear::default();
        // A burst long ago, then quiet: the forecast sees the quiet.
        w.record(sample(t0, 0, 0, 0, 1));
        w.record(sample(at(t0, 10), 1_000_000_000, 1_000, 0, 1));
        for i in 2..=100 {
            w.record(sample(at(t0, i * 10), 1_000_000_000, 1_000, 0, 1));
        }
        let f = w.forecast(sample(at(t0, 1000), 1_000_000_000, 1_000, 0, 1));
        assert_eq!(f.bytes_per_second, 0.0);
        assert_eq!(f.span_seconds, 600.0);
        assert!(!w.due(at(t0, 1005)) && w.due(at(t0, 1010)));
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(human_duration(42.0), "42 s");
        assert_eq!(human_duration(600.0), "10 min");
        assert_eq!(human_duration(3.0 * 3600.0 + 20.0 * 60.0), "3 h 20 min");
        assert_eq!(human_duration(7200.0), "2 h");
        assert_eq!(human_duration(5.0 * 86_400.0), "5 days");
    }
}
