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

/// Reads a JSON-lines file: (line number, value) for each non-blank line.
fn read_jsonl(path: &Path) -> anyhow::Result<Vec<(usize, Value)>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.trim_start().starts_with("//") {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}:{}: not a JSON object: {e}", path.display(), i + 1))?;
        out.push((i + 1, v));
    }
    Ok(out)
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
    for (line, v) in read_jsonl(events)? {
        let topic = v["topic"].as_str().ok_or_else(|| {
            anyhow::anyhow!("{}:{line}: an event needs \"topic\"", events.display())
        })?;
        let input = RuleEvent {
            id: line as u64,
            ts: v["ts"]
                .as_i64()
                .unwrap_or(1_763_785_000_000 + line as i64 * 1000),
            source: v["source"].as_str().unwrap_or("mqtt").to_string(),
            topic: topic.to_string(),
            payload: v.get("payload").cloned().unwrap_or(Value::Null),
            properties: Vec::new(),
        };
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
    let want: Vec<Value> = read_jsonl(expect)?.into_iter().map(|(_, v)| v).collect();
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
