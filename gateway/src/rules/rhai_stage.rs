//! [`RhaiStage`]: the user's Rhai rules as the commit loop's rule stage, with hot reload.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use base64::Engine as _;
use serde_json::{json, Value};
use tidepool_rules::{Limits, RuleEvent, RuleSet};
use tracing::{error, info, warn};

use super::error_log::{ErrorLog, Line};
use super::{DeadLetter, LocalPublish, RuleStage, StateWrite, StepOutput};
use crate::admin::metrics::Metrics;
use crate::config::RulesConfig;
use crate::event::{now_ms, Event, Payload, Trace};

/// Counters of one rule.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct RuleCounters {
    events_in: u64,
    events_out: u64,
    dropped: u64,
    errors: u64,
    last_error: String,
}

impl RuleCounters {
    fn add(&mut self, d: &RuleCounters) {
        self.events_in += d.events_in;
        self.events_out += d.events_out;
        self.dropped += d.dropped;
        self.errors += d.errors;
        if !d.last_error.is_empty() {
            self.last_error = d.last_error.clone();
        }
    }
}

/// What the steps since the last commit did to the counters and the log. Counted on commit,
/// not on call: the commit loop may run a group through the rules again when its commit is
/// retried, and a rolled-back run must not count.
#[derive(Debug, Default)]
struct Staged {
    counters: BTreeMap<String, RuleCounters>,
    /// Failures: (rule, error, topic).
    failures: Vec<(String, String, String)>,
    /// `log(level, message)` calls: (rule, level, message).
    logs: Vec<(String, String, String)>,
    /// Tap records of the inputs since the last commit, sent once it holds ([`crate::tap`]).
    taps: Vec<Value>,
}

/// The Rhai rule stage.
pub struct RhaiStage {
    set: RuleSet,
    dir: PathBuf,
    gateway: String,
    metrics: Arc<Metrics>,
    mtimes: HashMap<PathBuf, SystemTime>,
    counters: BTreeMap<String, RuleCounters>,
    staged: Staged,
    errors_log: ErrorLog,
    /// Rule files whose latest version failed to compile: name → error.
    refused: BTreeMap<String, String>,
    last_scan: Instant,
    /// The last input made a tap record.
    tapped: bool,
}

/// The engine limits configured in `[rules]`.
pub fn limits(cfg: &RulesConfig) -> Limits {
    Limits {
        max_operations: cfg.max_operations,
        max_call_depth: cfg.max_call_depth,
        max_expr_depth: cfg.max_expr_depth,
        max_string_size: cfg.max_string_size.0 as usize,
        max_array_size: cfg.max_array_size,
        max_map_size: cfg.max_map_size,
        max_variables: cfg.max_variables,
        max_functions: cfg.max_functions,
        max_call_time: cfg.max_call_time.0,
    }
}

fn to_rule_event(e: &Event) -> RuleEvent {
    let payload = match &e.payload {
        Payload::Json(s) => serde_json::from_str(s).unwrap_or(Value::Null),
        Payload::Bytes(b) => match std::str::from_utf8(b) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
        },
    };
    RuleEvent {
        id: e.id,
        ts: e.ts,
        source: e.source.clone(),
        topic: e.topic.clone(),
        payload,
        properties: e.properties.clone(),
    }
}

/// The tap record of one input (see [`crate::tap`]); output ids are filled in once stored.
fn tap_record(
    input: &RuleEvent,
    trace: Trace,
    r: &tidepool_rules::StepResult,
    outputs: &[RuleEvent],
) -> Value {
    use tidepool_rules::Verdict;
    let rules: Vec<Value> = r
        .trace
        .iter()
        .map(|s| {
            let mut v = json!({"rule": s.rule, "verdict": s.verdict.name(), "us": s.micros});
            match &s.verdict {
                Verdict::Changed(d) => v["diff"] = json!(d),
                Verdict::FannedOut(n) => v["count"] = json!(n),
                Verdict::Failed(e) => v["error"] = json!(e),
                Verdict::Kept | Verdict::Dropped => {}
            }
            v
        })
        .collect();
    json!({
        "at": now_ms(),
        "trace": trace,
        "input": {
            "topic": input.topic,
            "source": input.source,
            "ts": input.ts,
            "payload": input.payload,
        },
        "rules": rules,
        "outputs": outputs
            .iter()
            .map(|e| json!({"id": null, "topic": e.topic, "source": e.source, "payload": e.payload}))
            .collect::<Vec<_>>(),
        "publishes": r
            .publishes
            .iter()
            .map(|p| json!({"rule": p.rule, "topic": p.topic, "payload": p.payload}))
            .collect::<Vec<_>>(),
        "error": r
            .dead_letters
            .first()
            .map(|d| json!({"rule": d.rule, "error": d.error})),
    })
}

fn from_rule_event(r: RuleEvent, trace: Trace) -> Event {
    Event {
        id: 0,
        ts: r.ts,
        source: r.source,
        topic: r.topic,
        payload: Payload::Json(r.payload.to_string()),
        trace,
        properties: Vec::new(),
    }
}

impl RhaiStage {
    /// Loads the rules in `cfg.dir` (a missing folder means no rules). A rule that does not
    /// compile at start is refused (logged, shown in status); the others run.
    pub fn new(cfg: &RulesConfig, gateway: &str, metrics: Arc<Metrics>) -> RhaiStage {
        let mut set = RuleSet::empty(limits(cfg));
        set.set_gateway(gateway);
        let mut stage = RhaiStage {
            set,
            dir: cfg.dir.clone(),
            gateway: gateway.to_string(),
            metrics,
            mtimes: HashMap::new(),
            counters: BTreeMap::new(),
            staged: Staged::default(),
            errors_log: ErrorLog::default(),
            refused: BTreeMap::new(),
            last_scan: Instant::now(),
            tapped: false,
        };
        stage.scan();
        let names: Vec<String> = stage.set.rules().iter().map(|r| r.name.clone()).collect();
        if !names.is_empty() {
            info!(dir = %cfg.dir.display(), rules = ?names, "rules loaded");
        }
        stage
    }

    /// Names of the rules running now.
    pub fn rule_names(&self) -> Vec<String> {
        self.set.rules().iter().map(|r| r.name.clone()).collect()
    }

    fn scan(&mut self) {
        let mut seen = HashMap::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "rhai") {
                    let m = e
                        .metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    seen.insert(p, m);
                }
            }
        }
        for (path, mtime) in &seen {
            if self.mtimes.get(path) == Some(mtime) {
                continue;
            }
            let existed = self.mtimes.contains_key(path);
            self.mtimes.insert(path.clone(), *mtime);
            let name = stem(path);
            match self.set.compile_file(path) {
                Ok(rule) => {
                    self.set.upsert(rule);
                    self.refused.remove(&name);
                    if existed {
                        info!(rule = %name, "rule reloaded");
                    }
                    self.counters.entry(name).or_default();
                }
                Err(e) => {
                    let running = self.set.rules().iter().any(|r| r.name == name);
                    error!(rule = %name, error = %e, keeps_running = running, "rule refused: it does not compile{}", if running { "; the previous version keeps running" } else { "" });
                    self.metrics.rule_reload_error(&name);
                    self.refused.insert(name, e.to_string());
                }
            }
        }
        let gone: Vec<PathBuf> = self
            .mtimes
            .keys()
            .filter(|p| !seen.contains_key(*p))
            .cloned()
            .collect();
        for p in gone {
            self.mtimes.remove(&p);
            let name = stem(&p);
            if self.set.remove(&name) {
                info!(rule = %name, "rule removed");
            }
            self.refused.remove(&name);
        }
        self.last_scan = Instant::now();
    }

    /// Takes a step's publishes, dead letters, drops and logs; `trace` is the input's trace id,
    /// `None` for a tick (each publish and dead letter then gets a fresh one).
    fn absorb(
        &mut self,
        r: tidepool_rules::StepResult,
        trace: Option<Trace>,
        out: &mut StepOutput,
    ) {
        let trace = || trace.unwrap_or_else(Trace::fresh);
        for p in r.publishes {
            out.publishes.push(LocalPublish {
                topic: p.topic,
                payload: p.payload.to_string().into_bytes(),
                trace: trace(),
            });
        }
        for d in r.dead_letters {
            let c = self.staged.counters.entry(d.rule.clone()).or_default();
            c.errors += 1;
            c.last_error = d.error.clone();
            self.staged
                .failures
                .push((d.rule.clone(), d.error.clone(), d.event.topic.clone()));
            out.dead_letters.push(DeadLetter {
                rule: d.rule,
                error: d.error,
                at: now_ms(),
                event: from_rule_event(d.event, trace()),
            });
        }
        for rule in &r.dropped_by {
            self.staged
                .counters
                .entry(rule.clone())
                .or_default()
                .dropped += 1;
        }
        out.dropped += r.dropped_by.len() as u64;
        self.staged.logs.extend(r.logs);
    }

    fn write(line: Line) {
        match line {
            Line::Failed { rule, error, topic } => {
                warn!(rule = %rule, error = %error, topic = %topic, "rule failed; input dead-lettered (identical failures in the next minute are counted, not logged)")
            }
            Line::More {
                rule,
                more,
                last_error,
            } => {
                warn!(rule = %rule, last_error = %last_error, "rule failed {more} more times like this in the last minute; inputs dead-lettered")
            }
        }
    }
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default()
}

impl RuleStage for RhaiStage {
    fn on_event(&mut self, event: Event, out: &mut StepOutput) {
        // Read once per input: the record and the commit loop's ids agree on it.
        let tapping = self.metrics.tap.active();
        self.tapped = tapping;
        // Events no rule wants pass untouched (and without a JSON round trip).
        if !self.set.rules().iter().any(|r| r.matches(&event.topic)) {
            if tapping {
                let input = to_rule_event(&event);
                let outputs = vec![input.clone()];
                self.staged.taps.push(tap_record(
                    &input,
                    event.trace,
                    &tidepool_rules::StepResult::default(),
                    &outputs,
                ));
            }
            out.events.push(event);
            return;
        }
        for r in self.set.rules() {
            if r.matches(&event.topic) {
                self.staged
                    .counters
                    .entry(r.name.clone())
                    .or_default()
                    .events_in += 1;
            }
        }
        self.set.set_tracing(tapping);
        let input = tapping.then(|| to_rule_event(&event));
        let mut r = self.set.on_event(to_rule_event(&event));
        let events = std::mem::take(&mut r.events);
        if let Some(input) = input {
            self.staged
                .taps
                .push(tap_record(&input, event.trace, &r, &events));
        }
        let n = out.dead_letters.len();
        self.absorb(r, Some(event.trace), out);
        // A failed input's dead letter carries the event exactly as it came in (its payload
        // as received, not as rules see it), so a retry runs the whole chain on the same input.
        for d in &mut out.dead_letters[n..] {
            d.event = event.clone();
        }
        // Every output derived from the input (kept, changed, fanned out) keeps its trace id.
        out.events
            .extend(events.into_iter().map(|e| from_rule_event(e, event.trace)));
    }

    fn on_tick(&mut self, now_ms: i64, out: &mut StepOutput) {
        let mut r = self.set.on_tick(now_ms);
        for e in &r.events {
            if let Some(rule) = e.source.strip_prefix("rule:") {
                self.staged
                    .counters
                    .entry(rule.to_string())
                    .or_default()
                    .events_out += 1;
            }
        }
        let events = std::mem::take(&mut r.events);
        self.absorb(r, None, out);
        // No input: each output starts a trace of its own.
        out.events.extend(
            events
                .into_iter()
                .map(|e| from_rule_event(e, Trace::fresh())),
        );
    }

    fn wants_tick(&self) -> bool {
        self.set.rules().iter().any(|r| r.has_on_tick())
    }

    fn pending_state(&self) -> Vec<StateWrite> {
        self.set
            .pending_state()
            .into_iter()
            .map(|(k, v)| (k, v.map(|v| v.to_string().into_bytes())))
            .collect()
    }

    fn tapping(&self) -> bool {
        self.tapped
    }

    fn outputs_stored(&mut self, ids: &[Option<u64>]) {
        let Some(rec) = self.staged.taps.last_mut() else {
            return;
        };
        if let Some(outs) = rec["outputs"].as_array_mut() {
            for (o, id) in outs.iter_mut().zip(ids) {
                o["id"] = (*id).into();
            }
        }
    }

    fn commit_state(&mut self) {
        self.set.commit_state();
        let staged = std::mem::take(&mut self.staged);
        for rec in staged.taps {
            self.metrics.tap.send(rec);
        }
        for (rule, d) in &staged.counters {
            self.counters.entry(rule.clone()).or_default().add(d);
        }
        let now = Instant::now();
        for (rule, error, topic) in staged.failures {
            self.metrics.rule_error(&rule);
            for line in self.errors_log.failed(&rule, &error, &topic, now) {
                Self::write(line);
            }
        }
        for (rule, level, msg) in staged.logs {
            match level.as_str() {
                "error" => error!(rule = %rule, "{msg}"),
                "warn" | "warning" => warn!(rule = %rule, "{msg}"),
                "debug" | "trace" => tracing::debug!(rule = %rule, "{msg}"),
                _ => info!(rule = %rule, "{msg}"),
            }
        }
    }

    fn rollback_state(&mut self) {
        self.set.rollback_state();
        self.staged = Staged::default();
    }

    fn load_state(&mut self, entries: Vec<((String, String), Vec<u8>)>) {
        self.set.load_state(
            entries
                .into_iter()
                .filter_map(|(k, v)| serde_json::from_slice(&v).ok().map(|v| (k, v))),
        );
    }

    fn reload(&mut self) {
        if self.last_scan.elapsed().as_millis() >= 1000 {
            self.scan();
            for line in self.errors_log.flush(Instant::now()) {
                Self::write(line);
            }
        }
    }

    fn status(&self) -> Value {
        let running: Vec<Value> = self
            .set
            .rules()
            .iter()
            .map(|r| {
                let c = self.counters.get(&r.name).cloned().unwrap_or_default();
                json!({
                    "name": r.name,
                    "topics": r.topics,
                    "events_in": c.events_in,
                    "events_out": c.events_out,
                    "dropped": c.dropped,
                    "errors": c.errors,
                    "last_error": c.last_error,
                    "refused_update": self.refused.get(&r.name),
                })
            })
            .collect();
        let mut all = running;
        for (name, err) in &self.refused {
            if !self.set.rules().iter().any(|r| &r.name == name) {
                all.push(json!({"name": name, "refused_update": err, "running": false}));
            }
        }
        let _ = &self.gateway;
        Value::Array(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(dir: &Path) -> (RhaiStage, Arc<Metrics>) {
        let mut cfg = crate::config::Config::defaults().rules;
        cfg.dir = dir.to_path_buf();
        let metrics = Arc::new(Metrics::default());
        (RhaiStage::new(&cfg, "gw", metrics.clone()), metrics)
    }

    fn input(fail: bool) -> Event {
        Event::new("mqtt", "t", Payload::Json(format!("{{\"fail\":{fail}}}")))
    }

    #[test]
    fn counters_count_on_commit_so_a_retried_commit_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("10-x.rhai"),
            r#"fn on_event(e) { state_set("n", 1); if e.payload.fail { throw "no"; } e }"#,
        )
        .unwrap();
        let (mut s, metrics) = stage(dir.path());
        let group = [input(false), input(true), input(false)];
        // The commit loop runs the group, the commit fails, it runs the group again.
        for _attempt in 0..2 {
            let mut out = StepOutput::default();
            for e in &group {
                s.on_event(e.clone(), &mut out);
            }
            assert_eq!(out.dead_letters.len(), 1);
            assert_eq!(out.dead_letters[0].event, group[1], "the original input");
            assert_eq!(out.events.len(), 2);
            assert_eq!(
                s.status()[0]["errors"],
                0,
                "nothing counted before the commit"
            );
            s.rollback_state();
        }
        let mut out = StepOutput::default();
        for e in &group {
            s.on_event(e.clone(), &mut out);
        }
        s.commit_state();
        let st = s.status();
        assert_eq!(
            (st[0]["errors"].clone(), st[0]["events_in"].clone()),
            (json!(1), json!(3))
        );
        assert!(metrics
            .render()
            .contains("tidepool_rule_errors_total{rule=\"10-x\"} 1"));
    }

    #[test]
    fn outputs_publishes_and_dead_letters_keep_the_inputs_trace_and_ticks_start_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("10-fan.rhai"),
            r#"fn on_event(e) {
                if e.payload.fail { throw "no"; }
                publish("alerts/x", #{ v: 1 });
                let b = e; b.topic = "b"; [e, b]
            }
            fn on_tick(now) { publish("tick", #{}); [#{ topic: "t1", payload: 1 }, #{ topic: "t2", payload: 2 }] }"#,
        )
        .unwrap();
        let (mut s, _) = stage(dir.path());
        let (ok, bad) = (input(false), input(true));
        assert_ne!(ok.trace, bad.trace, "each input gets its own");
        let mut out = StepOutput::default();
        s.on_event(ok.clone(), &mut out);
        s.on_event(bad.clone(), &mut out);
        assert_eq!(out.events.len(), 2);
        assert!(out.events.iter().all(|e| e.trace == ok.trace), "fan-out");
        assert_eq!(out.publishes[0].trace, ok.trace);
        assert_eq!(
            out.publishes[0].user_properties(),
            vec![("trace".to_string(), ok.trace.to_string())]
        );
        let mut untraced = out.publishes[0].clone();
        untraced.trace = Trace::NONE;
        assert!(
            untraced.user_properties().is_empty(),
            "no trace, no property"
        );
        assert_eq!(out.dead_letters[0].event.trace, bad.trace);
        let mut tick = StepOutput::default();
        s.on_tick(1, &mut tick);
        let traces: std::collections::BTreeSet<Trace> = tick
            .events
            .iter()
            .map(|e| e.trace)
            .chain(tick.publishes.iter().map(|p| p.trace))
            .collect();
        assert_eq!(traces.len(), 3, "each tick output a new trace: {traces:?}");
        assert!(!traces.contains(&Trace::NONE) && !traces.contains(&ok.trace));
    }

    #[test]
    fn json_rules_cannot_read_reaches_them_as_text_not_null() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("10-keep.rhai"), "fn on_event(e) { e }").unwrap();
        let (mut s, _) = stage(dir.path());
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for raw in [deep.as_str(), "1e400", "{\"t\":-1e999}"] {
            let mut out = StepOutput::default();
            s.on_event(
                Event::new("mqtt", "t", Payload::from_raw(raw.as_bytes())),
                &mut out,
            );
            assert_eq!(
                out.events[0].payload,
                Payload::Json(serde_json::to_string(raw).unwrap()),
                "{raw}"
            );
        }
    }
}
