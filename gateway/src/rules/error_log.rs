//! Rule failures in the log without flooding it: a rule that throws on every event must not
//! write a WARN line per event (on an SD card that is the disk's life, and it buries
//! everything else).
//!
//! Per rule, per window of [`WINDOW`] (one minute): the first failure with a given error text
//! is logged at WARN, for up to [`DISTINCT`] distinct texts; every other failure in the window
//! is only counted. When the window is over, one WARN line says how many more there were:
//! "rule failed N more times like this in the last minute". So a rule failing without pause
//! costs at most `DISTINCT + 1` lines a minute; the counters (`/status`, `/metrics`) count
//! every failure.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long one window of counted failures lasts.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Distinct error texts of one rule logged in full per window.
pub const DISTINCT: usize = 3;

/// One log line to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A failure to log as it is.
    Failed {
        /// The rule.
        rule: String,
        /// Its error.
        error: String,
        /// The input's topic.
        topic: String,
    },
    /// The summary of a window: `more` failures were not logged, the last with `last_error`.
    More {
        /// The rule.
        rule: String,
        /// Failures counted, not logged.
        more: u64,
        /// The last of them.
        last_error: String,
    },
}

#[derive(Debug)]
struct Window {
    since: Instant,
    logged: Vec<String>,
    more: u64,
    last_error: String,
}

/// Decides which rule failures get a line of their own.
#[derive(Debug, Default)]
pub struct ErrorLog {
    windows: BTreeMap<String, Window>,
}

impl ErrorLog {
    /// One failure of `rule` at `now`: the lines to write now (none, one, or a window's
    /// summary and the new failure).
    pub fn failed(&mut self, rule: &str, error: &str, topic: &str, now: Instant) -> Vec<Line> {
        let mut out = Vec::new();
        if let Some(w) = self.windows.get(rule) {
            if now.duration_since(w.since) >= WINDOW {
                out.extend(self.close(rule));
            }
        }
        let w = self.windows.entry(rule.to_string()).or_insert(Window {
            since: now,
            logged: Vec::new(),
            more: 0,
            last_error: String::new(),
        });
        if w.logged.iter().any(|e| e == error) || w.logged.len() >= DISTINCT {
            w.more += 1;
            w.last_error = error.to_string();
        } else {
            w.logged.push(error.to_string());
            out.push(Line::Failed {
                rule: rule.to_string(),
                error: error.to_string(),
                topic: topic.to_string(),
            });
        }
        out
    }

    /// Summaries of the windows that are over at `now` (call now and then, e.g. every second).
    pub fn flush(&mut self, now: Instant) -> Vec<Line> {
        let due: Vec<String> = self
            .windows
            .iter()
            .filter(|(_, w)| now.duration_since(w.since) >= WINDOW)
            .map(|(r, _)| r.clone())
            .collect();
        due.iter().filter_map(|r| self.close(r)).collect()
    }

    fn close(&mut self, rule: &str) -> Option<Line> {
        let w = self.windows.remove(rule)?;
        (w.more > 0).then(|| Line::More {
            rule: rule.to_string(),
            more: w.more,
            last_error: w.last_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_distinct_error_then_a_count_per_minute() {
        let mut log = ErrorLog::default();
        let t0 = Instant::now();
        let mut lines = Vec::new();
        for i in 0..10_000u64 {
            let at = t0 + Duration::from_millis(i * 5); // 50 s of failures
            lines.extend(log.failed("10-x", "boom", "t", at));
        }
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(log.flush(t0 + Duration::from_secs(59)).is_empty());
        assert_eq!(
            log.flush(t0 + Duration::from_secs(60)),
            vec![Line::More {
                rule: "10-x".into(),
                more: 9_999,
                last_error: "boom".into()
            }]
        );
        assert!(log.flush(t0 + Duration::from_secs(200)).is_empty());
        // A new window logs the first failure again.
        assert_eq!(
            log.failed("10-x", "boom", "t", t0 + Duration::from_secs(61))
                .len(),
            1
        );
    }

    #[test]
    fn distinct_texts_are_bounded_and_rules_are_separate() {
        let mut log = ErrorLog::default();
        let t0 = Instant::now();
        let mut n = 0;
        for i in 0..100 {
            n += log.failed("10-x", &format!("bad value {i}"), "t", t0).len();
        }
        assert_eq!(n, DISTINCT);
        assert_eq!(log.failed("20-y", "bad value 0", "t", t0).len(), 1);
        // A failure after the window closes it: its summary comes first.
        let lines = log.failed("10-x", "bad value 0", "t", t0 + WINDOW);
        assert_eq!(lines.len(), 2);
        assert!(
            matches!(&lines[0], Line::More { more: 97, .. }),
            "{lines:?}"
        );
    }
}
