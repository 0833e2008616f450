//! `tidepool rules test`: runs rules on sample events with in-memory state and shows, for each
//! input, what came out; with an expect file, compares and shows a diff.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};
use tidepool_rules::{Limits, RuleEvent, RuleSet};

/// The outcome of a dry run.
pub struct DryRun {
    /// The report for a person.
    pub report: String,
    /// What came out, one JSON value per line of the expect format.
    pub actual: Vec<Value>,
}

/// Reads a JSON-lines file, one object a line, through `each` (line number, object).
fn read_jsonl<T>(
    path: &Path,
    each: impl FnMut(usize, Value) -> anyhow::Result<T>,
) -> anyhow::Result<Vec<T>> {
    let bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    parse_jsonl(&path.display().to_string(), &bytes, each)
}

/// `bytes` as JSON lines, one object a line (`name` is the file in messages), each through
/// `each` in order: blank lines and `//` comments are skipped; the first line that is not a
/// UTF-8 JSON object, or that `each` refuses, is an error naming it.
fn parse_jsonl<T>(
    name: &str,
    bytes: &[u8],
    mut each: impl FnMut(usize, Value) -> anyhow::Result<T>,
) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let n = i + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line =
            std::str::from_utf8(line).map_err(|e| anyhow::anyhow!("{name}:{n}: not UTF-8: {e}"))?;
        if line.trim().is_empty() || line.trim_start().starts_with("//") {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{name}:{n}: not a JSON object: {e}"))?;
        if !v.is_object() {
            anyhow::bail!("{name}:{n}: not a JSON object: {}", brief(&v));
        }
        out.push(each(n, v)?);
    }
    Ok(out)
}

/// A value for a message: at most 60 characters of it.
fn brief(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// Line `line` of an events file (`name`) as a rule's input: `topic` a non-empty string,
/// `payload` anything (absent: null), `source` a string and `ts` an integer (ms) if given.
fn input_event(name: &str, line: usize, v: &Value) -> anyhow::Result<RuleEvent> {
    let bad = |what: &str| anyhow::anyhow!("{name}:{line}: {what}");
    let topic = match v.get("topic") {
        Some(Value::String(t)) if !t.is_empty() => t.clone(),
        Some(other) => {
            return Err(bad(&format!(
                "\"topic\" must be a non-empty string, not {}",
                brief(other)
            )))
        }
        None => return Err(bad("an event needs \"topic\"")),
    };
    let ts = match v.get("ts") {
        None | Some(Value::Null) => 1_763_785_000_000 + line as i64 * 1000,
        Some(t) => t.as_i64().ok_or_else(|| {
            bad(&format!(
                "\"ts\" must be an integer (ms since the epoch), not {}",
                brief(t)
            ))
        })?,
    };
    let source = match v.get("source") {
        None | Some(Value::Null) => "mqtt".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(bad(&format!(
                "\"source\" must be a string, not {}",
                brief(other)
            )))
        }
    };
    Ok(RuleEvent {
        id: line as u64,
        ts,
        source,
        topic,
        payload: v.get("payload").cloned().unwrap_or(Value::Null),
        properties: Vec::new(),
    })
}

/// Describes how `after` differs from `before`, key by key for objects.
fn diff(before: &Value, after: &Value) -> String {
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            let mut parts = Vec::new();
            for (k, v) in b {
                match a.get(k) {
                    None => parts.push(format!("+{k}: {v}")),
                    Some(old) if old != v => parts.push(format!("{k}: {old} → {v}")),
                    _ => {}
                }
            }
            for k in a.keys().filter(|k| !b.contains_key(*k)) {
                parts.push(format!("-{k}"));
            }
            parts.join(", ")
        }
        _ => format!("{before} → {after}"),
    }
}

/// Reports a step's publishes and dead letters (they come before its output events).
fn report_side_effects(
    r: &tidepool_rules::StepResult,
    report: &mut String,
    actual: &mut Vec<Value>,
) {
    for p in &r.publishes {
        let _ = writeln!(
            report,
            "   publish  {} {}  ({})",
            p.topic, p.payload, p.rule
        );
        actual.push(json!({"publish": p.topic, "payload": p.payload}));
    }
    for d in &r.dead_letters {
        // A failed input leaves nothing else (no publish, no output, no state write); the
        // dead letter keeps it as it entered the chain, which `dlq retry` would run again.
        let _ = writeln!(report, "   dead letter ({}): {}", d.rule, d.error);
        if !d.event.topic.is_empty() {
            let _ = writeln!(
                report,
                "      input kept: {} {}",
                d.event.topic, d.event.payload
            );
        }
        actual.push(json!({"dead_letter": d.rule}));
    }
}

/// Runs the rules at `rules` on the events of `events`.
pub fn run(rules: &Path, events: &Path, limits: Limits) -> anyhow::Result<DryRun> {
    let mut set = RuleSet::load(rules, limits).map_err(|errs| {
        anyhow::anyhow!(
            "{}",
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    set.set_gateway("test-gateway");
    let names: Vec<String> = set.rules().iter().map(|r| r.name.clone()).collect();
    let mut report = format!(
        "rules: {}\n",
        if names.is_empty() {
            "(none)".into()
        } else {
            names.join(", ")
        }
    );
    let mut actual = Vec::new();
    let name = events.display().to_string();
    let inputs = read_jsonl(events, |line, v| {
        input_event(&name, line, &v).map(|e| (line, e))
    })?;
    for (line, input) in inputs {
        let r = set.on_event(input.clone());
        set.commit_state();
        let _ = writeln!(report, "#{line} {} {}", input.topic, input.payload);
        report_side_effects(&r, &mut report, &mut actual);
        if r.events.is_empty() && r.dead_letters.is_empty() {
            let _ = writeln!(report, "   dropped by {}", r.dropped_by.join(", "));
        }
        let fan = r.events.len() > 1;
        for e in &r.events {
            let what = if fan {
                "fan out".to_string()
            } else if e.topic == input.topic && e.payload == input.payload {
                "kept".to_string()
            } else if e.topic != input.topic {
                format!("changed: topic → {}", e.topic)
            } else {
                format!("changed: {}", diff(&input.payload, &e.payload))
            };
            let _ = writeln!(report, "   {what:<8} {} {}", e.topic, e.payload);
            actual.push(json!({"topic": e.topic, "payload": e.payload}));
        }
        for (rule, level, msg) in &r.logs {
            let _ = writeln!(report, "   log {level} ({rule}): {msg}");
        }
    }
    // on_tick once at the end, so windowed rules can be tested too.
    let tick = set.on_tick(1_763_785_000_000 + 1_000_000);
    set.commit_state();
    if !tick.events.is_empty() || !tick.publishes.is_empty() || !tick.dead_letters.is_empty() {
        let _ = writeln!(report, "#tick");
        report_side_effects(&tick, &mut report, &mut actual);
        for e in &tick.events {
            let _ = writeln!(report, "   emitted  {} {}", e.topic, e.payload);
            actual.push(json!({"topic": e.topic, "payload": e.payload}));
        }
    }
    Ok(DryRun { report, actual })
}

/// Compares with an expect file; `None` when they match, else a readable diff.
pub fn compare(actual: &[Value], expect: &Path) -> anyhow::Result<Option<String>> {
    let want: Vec<Value> = read_jsonl(expect, |_, v| Ok(v))?;
    let norm = |v: &Value| -> Value {
        // Compare what the contract compares: topic (or publish / dead_letter) and payload.
        let mut m = serde_json::Map::new();
        for k in ["topic", "publish", "dead_letter", "payload"] {
            if let Some(x) = v.get(k) {
                m.insert(k.to_string(), x.clone());
            }
        }
        Value::Object(m)
    };
    let (a, w): (Vec<Value>, Vec<Value>) = (
        actual.iter().map(norm).collect(),
        want.iter().map(norm).collect(),
    );
    if a == w {
        return Ok(None);
    }
    let mut out = String::from("output differs from the expect file (- expected, + got):\n");
    for i in 0..a.len().max(w.len()) {
        match (w.get(i), a.get(i)) {
            (Some(x), Some(y)) if x == y => {
                let _ = writeln!(out, "  {x}");
            }
            (x, y) => {
                if let Some(x) = x {
                    let _ = writeln!(out, "- {x}");
                }
                if let Some(y) = y {
                    let _ = writeln!(out, "+ {y}");
                }
            }
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One line of an events file, and whether it is a good event.
    fn line() -> impl Strategy<Value = (Vec<u8>, bool)> {
        let good = (
            "[a-z/$é]{1,12}",
            any::<i32>(),
            proptest::option::of(any::<i64>()),
        )
            .prop_map(|(topic, n, ts)| {
                let mut v = json!({"topic": topic, "payload": {"n": n}});
                if let Some(ts) = ts {
                    v["ts"] = ts.into();
                }
                (v.to_string().into_bytes(), true)
            });
        let skipped = prop_oneof![Just(""), Just("   "), Just("\r"), Just("// a comment")]
            .prop_map(|s| (s.as_bytes().to_vec(), true));
        let bad = prop_oneof![
            // Not UTF-8.
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(|mut b| {
                b.insert(0, 0xFF);
                b
            }),
            // JSON, but not an object, or not an event.
            prop_oneof![
                Just("5"),
                Just("[1]"),
                Just("\"x\""),
                Just("null"),
                Just("{}"),
                Just("{\"topic\":\"\"}"),
                Just("{\"topic\":5}"),
                Just("{\"payload\":1}"),
                Just("{\"topic\":\"t\",\"ts\":\"now\"}"),
                Just("{\"topic\":\"t\",\"ts\":1.5}"),
                Just("{\"topic\":\"t\",\"source\":[]}"),
                Just("{\"topic\":\"t\""),
                Just("{\"topic\":\"t\"} x"),
                Just("{'topic':'t'}"),
            ]
            .prop_map(|s| s.as_bytes().to_vec()),
            // A good line cut short.
            "[a-z]{1,8}".prop_map(|t| {
                let s = json!({"topic": t, "payload": [1, 2]}).to_string();
                s.as_bytes()[..s.len() - 1].to_vec()
            }),
        ]
        .prop_map(|b| {
            let b = b.into_iter().filter(|c| *c != b'\n').collect();
            (b, false)
        });
        prop_oneof![4 => good, 1 => skipped, 1 => bad]
    }

    /// What the reader makes of a file: the events, or the error.
    fn read(bytes: &[u8]) -> anyhow::Result<Vec<(usize, RuleEvent)>> {
        parse_jsonl("ev.jsonl", bytes, |line, v| {
            input_event("ev.jsonl", line, &v).map(|e| (line, e))
        })
    }

    proptest! {
        #![proptest_config(crate::fuzz::cases(1000))]

        /// An events file of good events, blank lines, comments and bad lines (not UTF-8, not
        /// JSON, not an object, no or a bad topic, a bad ts or source, cut short), with `\n`
        /// or `\r\n` line ends: no panic; with a bad line, the error names the file and the
        /// first bad line; without, every event, with its line number and topic, in order.
        #[test]
        fn fuzz_events_file_reads_or_names_the_first_bad_line(
            lines in proptest::collection::vec(line(), 0..20),
            crlf in any::<bool>(),
        ) {
            let end: &[u8] = if crlf { b"\r\n" } else { b"\n" };
            let bytes = lines.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>().join(end);
            match (read(&bytes), lines.iter().position(|(_, good)| !good)) {
                (Err(e), Some(i)) => {
                    let msg = e.to_string();
                    prop_assert!(msg.starts_with(&format!("ev.jsonl:{}: ", i + 1)), "{}", msg);
                }
                (Ok(events), None) => {
                    let want: Vec<usize> = lines
                        .iter()
                        .enumerate()
                        .filter(|(_, (l, _))| {
                            let t = String::from_utf8_lossy(l);
                            !t.trim().is_empty() && !t.trim_start().starts_with("//")
                        })
                        .map(|(i, _)| i + 1)
                        .collect();
                    let got: Vec<usize> = events.iter().map(|(n, _)| *n).collect();
                    prop_assert_eq!(got, want);
                    for (n, e) in &events {
                        let v: Value = serde_json::from_slice(&lines[n - 1].0).unwrap();
                        prop_assert_eq!(Some(e.topic.as_str()), v["topic"].as_str());
                    }
                }
                (got, first_bad) => {
                    return Err(TestCaseError::fail(format!(
                        "{:?} with the first bad line at {:?}",
                        got.map(|e| e.len()),
                        first_bad.map(|i| i + 1)
                    )))
                }
            }
        }

        /// Random bytes as an events file, read the whole way (`rules test` with no rules):
        /// no panic; an error names the file and a line of it.
        #[test]
        fn fuzz_random_events_file_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            if let Err(e) = read(&bytes) {
                let msg = e.to_string();
                let line = msg
                    .strip_prefix("ev.jsonl:")
                    .and_then(|r| r.split(':').next())
                    .and_then(|n| n.parse::<usize>().ok());
                prop_assert!(
                    line.is_some_and(|n| n >= 1 && n <= bytes.split(|b| *b == b'\n').count()),
                    "{}",
                    msg
                );
            }
        }
    }

    #[test]
    fn a_dry_run_refuses_a_bad_events_file_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("ev.jsonl");
        std::fs::write(
            &events,
            b"{\"topic\":\"t\"}\n\n{\"topic\":\"t\",\"ts\":\"now\"}\n",
        )
        .unwrap();
        let Err(e) = run(dir.path(), &events, Limits::default()) else {
            panic!("a bad ts was taken");
        };
        assert_eq!(
            e.to_string(),
            format!(
                "{}:3: \"ts\" must be an integer (ms since the epoch), not \"now\"",
                events.display()
            )
        );
    }
}
