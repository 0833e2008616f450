//! The rule engine: every `*.rhai` file of a folder, compiled once, run in file-name order.
//!
//! Sandbox: `Engine::new_raw()` plus the standard package (arithmetic, strings, arrays, maps,
//! math), nothing else: no `eval`, no `import` (modules are compiled out), no file or network
//! access, no `sleep`. Every Rhai limit is set from [`Limits`], and a wall-clock budget per call
//! is enforced from `on_progress`.
//!
//! All or nothing per input: one input runs through the whole chain (every rule that wants it,
//! fan-outs included) as one unit. When any rule fails on it (throws, runs past a limit,
//! returns a wrong type), none of that input's effects survive: no state write and no publish
//! of the failing rule or of the rules before it, no output event; the one dead letter holds
//! the input as it entered the chain and names the rule that failed. `log` lines are kept
//! (they explain the failure).
//!
//! State: rules read and write per-rule state through `state_get/state_set/state_del`, in
//! three layers, newest first:
//! - *step*: the writes of the input running now; merged into *pending* when the whole chain
//!   succeeded on it, discarded when any rule failed;
//! - *pending*: the writes of earlier inputs that succeeded since the last commit, so state
//!   carries from one input to the next within a commit group;
//! - *committed*: what the store holds.
//!
//! The caller persists [`RuleSet::pending_state`] in the transaction that stores the outputs,
//! then calls [`RuleSet::commit_state`] (or [`RuleSet::rollback_state`] if that transaction
//! failed, so a retried group starts from the committed state again).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rhai::packages::{Package, StandardPackage};
use rhai::{Array, CallFnOptions, Dynamic, Engine, EvalAltResult, Map, Scope, AST};
use serde_json::Value;

use crate::topic_matches;

/// Limits applied to every rule call.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most Rhai operations per call.
    pub max_operations: u64,
    /// Most nested function calls.
    pub max_call_depth: usize,
    /// Most nested expressions (global, in functions).
    pub max_expr_depth: usize,
    /// Longest string, in bytes.
    pub max_string_size: usize,
    /// Most array elements.
    pub max_array_size: usize,
    /// Most map entries.
    pub max_map_size: usize,
    /// Most variables in scope.
    pub max_variables: usize,
    /// Most functions a rule file may define.
    pub max_functions: usize,
    /// Wall-clock budget per call.
    pub max_call_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: 100_000,
            max_call_depth: 32,
            max_expr_depth: 64,
            max_string_size: 64 * 1024,
            max_array_size: 10_000,
            max_map_size: 1_000,
            max_variables: 256,
            max_functions: 64,
            max_call_time: Duration::from_millis(50),
        }
    }
}

/// An event as rules see it.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleEvent {
    /// Gateway id (0 before commit).
    pub id: u64,
    /// ms since the epoch.
    pub ts: i64,
    /// Where it came from.
    pub source: String,
    /// Topic.
    pub topic: String,
    /// JSON payload (non-JSON payloads arrive as a string).
    pub payload: Value,
    /// MQTT 5 user properties the sensor sent, in order (`event.properties` in rules); empty
    /// for other sources.
    pub properties: Vec<(String, String)>,
}

/// A message a rule asked to publish to local subscribers (after the step commits).
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    /// Which rule.
    pub rule: String,
    /// Topic.
    pub topic: String,
    /// JSON payload.
    pub payload: Value,
}

/// An input a rule failed on.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The rule's name.
    pub rule: String,
    /// What went wrong.
    pub error: String,
    /// The input as it entered the chain (for a tick: the tick).
    pub event: RuleEvent,
}

/// What one step (one input event, or one tick) produced.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StepResult {
    /// Events to store and forward.
    pub events: Vec<RuleEvent>,
    /// Local publishes, in call order.
    pub publishes: Vec<Publish>,
    /// Inputs rules failed on.
    pub dead_letters: Vec<DeadLetter>,
    /// Rules that dropped an event (one entry per drop).
    pub dropped_by: Vec<String>,
    /// `log(level, msg)` calls: (rule, level, message).
    pub logs: Vec<(String, String, String)>,
    /// What each rule did to each event, in order; only while tracing ([`RuleSet::set_tracing`]).
    pub trace: Vec<TraceStep>,
}

/// One rule's call on one event, for `tidepool tap`.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceStep {
    /// The rule.
    pub rule: String,
    /// The event as the rule got it (`id`, `ts`, `source`, `topic`, `payload`, ...).
    pub input: Value,
    /// What it did.
    pub verdict: Verdict,
    /// What it returned (empty when it dropped the event or failed).
    pub outputs: Vec<Value>,
    /// How long the call took, in microseconds.
    pub micros: u64,
}

/// What a rule did to an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Returned it unchanged.
    Kept,
    /// Returned one event that differs: the keys that changed (`+key: value`, `-key`,
    /// `~key: old -> new`; payload keys as `payload.key`).
    Changed(Vec<String>),
    /// Returned nothing (`()`).
    Dropped,
    /// Returned an array of several events, or of none (then nothing goes on, though it
    /// is not counted as a drop).
    FannedOut(usize),
    /// Failed with this error.
    Failed(String),
}

impl Verdict {
    /// Its name: `kept`, `changed`, `dropped`, `fanned_out`, `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Kept => "kept",
            Verdict::Changed(_) => "changed",
            Verdict::Dropped => "dropped",
            Verdict::FannedOut(_) => "fanned_out",
            Verdict::Failed(_) => "failed",
        }
    }
}

/// The keys that differ between two JSON values, `path` first: `+k: v`, `-k`, `~k: a -> b`.
pub fn diff(path: &str, before: &Value, after: &Value, out: &mut Vec<String>) {
    let key = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                match b.get(k) {
                    None => out.push(format!("-{}", key(k))),
                    Some(vb) if vb != va => diff(&key(k), va, vb, out),
                    Some(_) => {}
                }
            }
            for (k, vb) in b {
                if !a.contains_key(k) {
                    out.push(format!("+{}: {vb}", key(k)));
                }
            }
        }
        (a, b) if a != b => out.push(format!("~{path}: {a} -> {b}")),
        _ => {}
    }
}

/// A rule that failed to compile: `file:line:col: message`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}:{line}:{col}: {message}")]
pub struct CompileError {
    /// The file.
    pub file: String,
    /// Line (1-based; 0 when unknown).
    pub line: usize,
    /// Column (1-based; 0 when unknown).
    pub col: usize,
    /// What is wrong.
    pub message: String,
}

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// File name without `.rhai`.
    pub name: String,
    /// Where it came from.
    pub path: PathBuf,
    /// `const TOPICS`, if any.
    pub topics: Option<Vec<String>>,
    ast: AST,
    has_on_event: bool,
    has_on_tick: bool,
}

impl Rule {
    /// Whether the rule defines `on_tick(now)`.
    pub fn has_on_tick(&self) -> bool {
        self.has_on_tick
    }

    /// Whether the rule wants events on `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        match &self.topics {
            None => true,
            Some(fs) => fs.iter().any(|f| topic_matches(f, topic)),
        }
    }
}

/// Key of one state entry: (rule, key).
pub type StateKey = (String, String);

#[derive(Default)]
struct CallCtx {
    rule: String,
    publishes: Vec<Publish>,
    logs: Vec<(String, String, String)>,
    committed: HashMap<StateKey, Value>,
    pending: BTreeMap<StateKey, Option<Value>>,
    /// Writes of the input (or tick call) running now; see the module docs.
    step: BTreeMap<StateKey, Option<Value>>,
    now_ms: i64,
    gateway: String,
}

/// The loaded rules and the sandboxed engine that runs them.
pub struct RuleSet {
    engine: Engine,
    rules: Vec<Rule>,
    ctx: Arc<Mutex<CallCtx>>,
    deadline: Arc<AtomicU64>,
    limits: Limits,
    /// Record a [`TraceStep`] per rule call (someone taps).
    tracing: bool,
}

/// What one call did, for the trace.
fn trace_step(
    rule: &Rule,
    given: &Map,
    outcome: &Result<(bool, Vec<Map>), String>,
    started: Instant,
) -> TraceStep {
    let micros = started.elapsed().as_micros() as u64;
    let input = to_json(&Dynamic::from_map(given.clone()));
    let (verdict, outputs) = match outcome {
        Err(e) => (Verdict::Failed(e.clone()), Vec::new()),
        Ok((true, _)) => (Verdict::Dropped, Vec::new()),
        Ok((false, evs)) => {
            let outs: Vec<Value> = evs
                .iter()
                .map(|m| to_json(&Dynamic::from_map(m.clone())))
                .collect();
            // One event back, as itself or in an array of one: kept or changed.
            let verdict = match outs.as_slice() {
                [one] => {
                    let mut d = Vec::new();
                    diff("", &input, one, &mut d);
                    if d.is_empty() {
                        Verdict::Kept
                    } else {
                        Verdict::Changed(d)
                    }
                }
                _ => Verdict::FannedOut(outs.len()),
            };
            (verdict, outs)
        }
    };
    TraceStep {
        rule: rule.name.clone(),
        input,
        verdict,
        outputs,
        micros,
    }
}

/// Rhai value → JSON (direct, no serde round trip: this runs for every event).
fn to_json(d: &Dynamic) -> Value {
    if d.is_unit() {
        Value::Null
    } else if let Ok(b) = d.as_bool() {
        Value::Bool(b)
    } else if let Ok(i) = d.as_int() {
        Value::from(i)
    } else if let Ok(f) = d.as_float() {
        serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    } else if let Some(s) = d.read_lock::<rhai::ImmutableString>() {
        Value::String(s.to_string())
    } else if let Some(a) = d.read_lock::<Array>() {
        Value::Array(a.iter().map(to_json).collect())
    } else if let Some(m) = d.read_lock::<Map>() {
        Value::Object(m.iter().map(|(k, v)| (k.to_string(), to_json(v))).collect())
    } else if let Ok(c) = d.as_char() {
        Value::String(c.to_string())
    } else {
        Value::String(d.to_string())
    }
}

/// JSON → Rhai value.
fn to_dynamic(v: &Value) -> Dynamic {
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Dynamic::from(s.clone()),
        Value::Array(a) => Dynamic::from_array(a.iter().map(to_dynamic).collect()),
        Value::Object(o) => Dynamic::from_map(
            o.iter()
                .map(|(k, v)| (k.as_str().into(), to_dynamic(v)))
                .collect(),
        ),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl RuleSet {
    /// A rule set with no rules (everything passes through).
    pub fn empty(limits: Limits) -> RuleSet {
        let ctx = Arc::new(Mutex::new(CallCtx::default()));
        let deadline = Arc::new(AtomicU64::new(0));
        RuleSet {
            engine: build_engine(&limits, ctx.clone(), deadline.clone()),
            rules: Vec::new(),
            ctx,
            deadline,
            limits,
            tracing: false,
        }
    }

    /// Loads a rules folder (every `*.rhai`, file-name order) or a single file.
    pub fn load(path: &Path, limits: Limits) -> Result<RuleSet, Vec<CompileError>> {
        let mut set = RuleSet::empty(limits);
        let mut files = Vec::new();
        if path.is_dir() {
            let rd = std::fs::read_dir(path).map_err(|e| {
                vec![CompileError {
                    file: path.display().to_string(),
                    line: 0,
                    col: 0,
                    message: format!("cannot read the rules folder: {e}"),
                }]
            })?;
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "rhai") {
                    files.push(p);
                }
            }
            files.sort();
        } else if path.exists() {
            files.push(path.to_path_buf());
        }
        let mut errors = Vec::new();
        for f in files {
            match set.compile_file(&f) {
                Ok(r) => set.rules.push(r),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(errors)
        }
    }

    /// Compiles one file into a rule (not added).
    pub fn compile_file(&self, path: &Path) -> Result<Rule, CompileError> {
        let text = std::fs::read_to_string(path).map_err(|e| CompileError {
            file: path.display().to_string(),
            line: 0,
            col: 0,
            message: format!("cannot read: {e}"),
        })?;
        self.compile(path, &text)
    }

    /// Compiles rule source `text` as if read from `path`.
    pub fn compile(&self, path: &Path, text: &str) -> Result<Rule, CompileError> {
        let file = path.display().to_string();
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let ast = self.engine.compile(text).map_err(|e| CompileError {
            file: file.clone(),
            line: e.1.line().unwrap_or(0),
            col: e.1.position().unwrap_or(0),
            message: e.0.to_string(),
        })?;
        let mut topics = None;
        for (var, _, value) in ast.iter_literal_variables(true, false) {
            if var == "TOPICS" {
                let arr = value.try_cast::<Array>().ok_or_else(|| CompileError {
                    file: file.clone(),
                    line: 1,
                    col: 1,
                    message: "const TOPICS must be an array of MQTT filters, e.g. [\"sensors/#\"]"
                        .into(),
                })?;
                topics = Some(arr.iter().map(|d| d.to_string()).collect());
            }
        }
        let has = |n: &str, arity: usize| {
            ast.iter_functions()
                .any(|f| f.name == n && f.params.len() == arity)
        };
        let (has_on_event, has_on_tick) = (has("on_event", 1), has("on_tick", 1));
        if !has_on_event && !has_on_tick {
            return Err(CompileError {
                file,
                line: 1,
                col: 1,
                message: "a rule defines fn on_event(event) and/or fn on_tick(now)".into(),
            });
        }
        Ok(Rule {
            name,
            path: path.to_path_buf(),
            topics,
            ast,
            has_on_event,
            has_on_tick,
        })
    }

    /// Sets what `gateway_id()` returns to rules.
    pub fn set_gateway(&mut self, id: &str) {
        self.ctx.lock().unwrap().gateway = id.to_string();
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Adds or replaces (by name) a rule, keeping file-name order.
    pub fn upsert(&mut self, rule: Rule) {
        self.rules.retain(|r| r.name != rule.name);
        self.rules.push(rule);
        self.rules
            .sort_by(|a, b| a.path.file_name().cmp(&b.path.file_name()));
    }

    /// Removes a rule by name.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.rules.len();
        self.rules.retain(|r| r.name != name);
        before != self.rules.len()
    }

    /// Seeds committed state (e.g. from the store at start-up).
    pub fn load_state(&mut self, entries: impl IntoIterator<Item = (StateKey, Value)>) {
        let mut c = self.ctx.lock().unwrap();
        c.committed.extend(entries);
    }

    /// State writes since the last commit: `None` deletes.
    pub fn pending_state(&self) -> Vec<(StateKey, Option<Value>)> {
        let c = self.ctx.lock().unwrap();
        c.pending
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The pending writes were persisted: make them the committed state.
    pub fn commit_state(&mut self) {
        let mut c = self.ctx.lock().unwrap();
        let pending = std::mem::take(&mut c.pending);
        for (k, v) in pending {
            match v {
                Some(v) => {
                    c.committed.insert(k, v);
                }
                None => {
                    c.committed.remove(&k);
                }
            }
        }
    }

    /// The pending writes were not persisted: forget them.
    pub fn rollback_state(&mut self) {
        let mut c = self.ctx.lock().unwrap();
        c.pending.clear();
        c.step.clear();
    }

    /// Ends the step of one input (or tick call): on success its writes join the pending
    /// ones and its publishes are kept; on failure both are discarded.
    fn end_step(&self, ok: bool, result: &mut StepResult) {
        let mut c = self.ctx.lock().unwrap();
        let step = std::mem::take(&mut c.step);
        result.logs.append(&mut c.logs);
        if ok {
            c.pending.extend(step);
            result.publishes.append(&mut c.publishes);
        } else {
            c.publishes.clear();
        }
    }

    /// Whether steps record what each rule did ([`StepResult::trace`]): costs a JSON copy of
    /// each event per rule, so only while someone looks.
    pub fn set_tracing(&mut self, on: bool) {
        self.tracing = on;
    }

    /// Runs the chain on one input event, all or nothing (see the module docs).
    pub fn on_event(&mut self, input: RuleEvent) -> StepResult {
        let mut result = StepResult::default();
        if !self
            .rules
            .iter()
            .any(|r| r.has_on_event && r.matches(&input.topic))
        {
            result.events.push(input);
            return result;
        }
        match self.chain(&input, &mut result) {
            Ok(()) => self.end_step(true, &mut result),
            Err((rule, error)) => {
                self.end_step(false, &mut result);
                result.events.clear();
                result.dropped_by.clear();
                result.dead_letters.push(DeadLetter {
                    rule,
                    error,
                    event: input,
                });
            }
        }
        result
    }

    /// Runs every rule that wants them on the events of one input; stops at the first
    /// failure: (rule, error).
    fn chain(&self, input: &RuleEvent, result: &mut StepResult) -> Result<(), (String, String)> {
        // Events travel through the chain as Rhai maps; JSON only at the two ends.
        let mut current: Vec<Map> = vec![event_map(input)];
        for rule in &self.rules {
            if !rule.has_on_event {
                continue;
            }
            let mut next = Vec::with_capacity(current.len());
            for ev in current {
                let topic = ev.get("topic").map(|t| t.to_string()).unwrap_or_default();
                if !rule.matches(&topic) {
                    next.push(ev);
                    continue;
                }
                let given = ev.clone();
                let started = self.tracing.then(Instant::now);
                let outcome = self
                    .call(rule, "on_event", Dynamic::from_map(ev))
                    .and_then(|out| {
                        let dropped = out.is_unit();
                        outputs(out, &given).map(|evs| (dropped, evs))
                    });
                if let Some(started) = started {
                    result
                        .trace
                        .push(trace_step(rule, &given, &outcome, started));
                }
                match outcome {
                    Ok((true, _)) => result.dropped_by.push(rule.name.clone()),
                    Ok((false, evs)) => next.extend(evs),
                    Err(e) => return Err((rule.name.clone(), e)),
                }
            }
            current = next;
        }
        for m in current {
            let e = from_map(&m, input).map_err(|e| ("(output)".to_string(), e))?;
            result.events.push(e);
        }
        Ok(())
    }

    /// Runs every rule's `on_tick(now)`; what they return is forwarded as it is.
    pub fn on_tick(&mut self, now: i64) -> StepResult {
        let mut result = StepResult::default();
        for rule in &self.rules {
            if !rule.has_on_tick {
                continue;
            }
            let tick_event = RuleEvent {
                id: 0,
                ts: now,
                source: format!("rule:{}", rule.name),
                topic: String::new(),
                payload: Value::Null,
                properties: Vec::new(),
            };
            let given = event_map(&tick_event);
            let outcome = self
                .call(rule, "on_tick", Dynamic::from(now))
                .and_then(|out| outputs(out, &given))
                .and_then(|maps| {
                    maps.iter()
                        .map(|m| from_map(m, &tick_event))
                        .collect::<Result<Vec<_>, _>>()
                });
            // Each rule's tick call is all or nothing on its own.
            match outcome {
                Ok(evs) => {
                    self.end_step(true, &mut result);
                    result.events.extend(evs);
                }
                Err(e) => {
                    self.end_step(false, &mut result);
                    result.dead_letters.push(DeadLetter {
                        rule: rule.name.clone(),
                        error: e,
                        event: tick_event,
                    });
                }
            }
        }
        result
    }

    fn call(&self, rule: &Rule, f: &str, arg: Dynamic) -> Result<Dynamic, String> {
        {
            let mut c = self.ctx.lock().unwrap();
            if c.rule != rule.name {
                c.rule = rule.name.clone();
            }
            c.now_ms = now_ms();
        }
        let until = epoch().elapsed() + self.limits.max_call_time;
        self.deadline
            .store(until.as_micros() as u64, Ordering::Relaxed);
        let mut scope = Scope::new();
        let opts = CallFnOptions::new().eval_ast(false).rewind_scope(true);
        let r = self
            .engine
            .call_fn_with_options::<Dynamic>(opts, &mut scope, &rule.ast, f, (arg,));
        self.deadline.store(0, Ordering::Relaxed);
        r.map_err(|e| describe(&e))
    }
}

fn describe(e: &EvalAltResult) -> String {
    match e {
        EvalAltResult::ErrorTerminated(..) => "stopped: the call ran past its time budget".into(),
        other => other.to_string(),
    }
}

fn event_map(e: &RuleEvent) -> Map {
    let mut m = Map::new();
    m.insert("id".into(), Dynamic::from(e.id as i64));
    m.insert("ts".into(), Dynamic::from(e.ts));
    m.insert("source".into(), Dynamic::from(e.source.clone()));
    m.insert("topic".into(), Dynamic::from(e.topic.clone()));
    m.insert("payload".into(), to_dynamic(&e.payload));
    m.insert(
        "properties".into(),
        Dynamic::from_map(properties_map(&e.properties)),
    );
    m
}

/// `event.properties`: name → value; a name sent more than once → its values in order.
fn properties_map(props: &[(String, String)]) -> Map {
    let mut m = Map::new();
    for (k, v) in props {
        let v = Dynamic::from(v.clone());
        match m.get_mut(k.as_str()) {
            None => {
                m.insert(k.as_str().into(), v);
            }
            Some(old) if old.is_array() => {
                if let Some(mut a) = old.write_lock::<rhai::Array>() {
                    a.push(v);
                }
            }
            Some(old) => {
                let first = std::mem::take(old);
                *old = Dynamic::from_array(vec![first, v]);
            }
        }
    }
    m
}

/// Interprets what `on_event`/`on_tick` returned: `()` none, a map one, an array many.
/// Fields an output leaves out are taken from the event the rule was given.
fn outputs(out: Dynamic, given: &Map) -> Result<Vec<Map>, String> {
    let fill = |mut m: Map| -> Result<Map, String> {
        for k in ["topic", "ts", "source", "id"] {
            if !m.contains_key(k) {
                if let Some(v) = given.get(k) {
                    m.insert(k.into(), v.clone());
                }
            }
        }
        match m.get("topic") {
            Some(t) if t.is_string() && !t.to_string().is_empty() => Ok(m),
            Some(t) if !t.is_string() => Err(format!(
                "event.topic is a {}, expected a string",
                t.type_name()
            )),
            _ => Err("an event needs a topic".into()),
        }
    };
    if out.is_unit() {
        return Ok(Vec::new());
    }
    if out.is_map() {
        return Ok(vec![fill(out.cast::<Map>())?]);
    }
    if out.is_array() {
        return out
            .cast::<Array>()
            .into_iter()
            .map(|d| {
                if d.is_map() {
                    fill(d.cast::<Map>())
                } else {
                    Err(format!(
                        "returned an array holding a {}, expected event maps",
                        d.type_name()
                    ))
                }
            })
            .collect();
    }
    Err(format!(
        "returned a {}; return the event (a map), () to drop it, or an array of events",
        out.type_name()
    ))
}

fn from_map(m: &Map, input: &RuleEvent) -> Result<RuleEvent, String> {
    let topic = match m.get("topic") {
        Some(t) if t.is_string() => t.to_string(),
        Some(t) => {
            return Err(format!(
                "event.topic is a {}, expected a string",
                t.type_name()
            ))
        }
        None if !input.topic.is_empty() => input.topic.clone(),
        None => return Err("an event needs a topic".into()),
    };
    let payload = m.get("payload").map(to_json).unwrap_or(Value::Null);
    let ts = m
        .get("ts")
        .and_then(|d| d.as_int().ok())
        .unwrap_or(input.ts);
    let source = m
        .get("source")
        .filter(|d| d.is_string())
        .map(|d| d.to_string())
        .unwrap_or_else(|| input.source.clone());
    let id = m
        .get("id")
        .and_then(|d| d.as_int().ok())
        .unwrap_or(input.id as i64)
        .max(0) as u64;
    Ok(RuleEvent {
        id,
        ts,
        source,
        topic,
        payload,
        properties: Vec::new(),
    })
}

/// A fixed origin for deadlines held in an atomic.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn build_engine(l: &Limits, ctx: Arc<Mutex<CallCtx>>, deadline: Arc<AtomicU64>) -> Engine {
    let mut e = Engine::new_raw();
    e.register_global_module(StandardPackage::new().as_shared_module());
    e.set_max_operations(l.max_operations)
        .set_max_call_levels(l.max_call_depth)
        .set_max_expr_depths(l.max_expr_depth, l.max_expr_depth)
        .set_max_string_size(l.max_string_size)
        .set_max_array_size(l.max_array_size)
        .set_max_map_size(l.max_map_size)
        .set_max_variables(l.max_variables)
        .set_max_functions(l.max_functions);
    e.disable_symbol("eval");
    // The core package has `sleep`; a rule must never block the commit loop.
    e.register_fn("sleep", |_: i64| -> Result<(), Box<EvalAltResult>> {
        Err("sleep is not available in rules".into())
    });
    e.register_fn("sleep", |_: f64| -> Result<(), Box<EvalAltResult>> {
        Err("sleep is not available in rules".into())
    });
    e.on_print(|_| {});
    e.on_debug(|_, _, _| {});
    let d = deadline.clone();
    e.on_progress(move |ops| {
        // Looking at the clock every 256 operations keeps the check cheap.
        if ops & 0xff != 0 {
            return None;
        }
        let until = d.load(Ordering::Relaxed);
        if until != 0 && epoch().elapsed().as_micros() as u64 > until {
            Some(Dynamic::from("time budget exceeded"))
        } else {
            None
        }
    });
    let c = ctx.clone();
    e.register_fn("publish", move |topic: &str, payload: Dynamic| {
        let mut g = c.lock().unwrap();
        let rule = g.rule.clone();
        g.publishes.push(Publish {
            rule,
            topic: topic.to_string(),
            payload: to_json(&payload),
        });
    });
    let c = ctx.clone();
    e.register_fn("state_get", move |key: &str| -> Dynamic {
        let g = c.lock().unwrap();
        let k = (g.rule.clone(), key.to_string());
        match g.step.get(&k).or_else(|| g.pending.get(&k)) {
            Some(Some(v)) => to_dynamic(v),
            Some(None) => Dynamic::UNIT,
            None => g.committed.get(&k).map(to_dynamic).unwrap_or(Dynamic::UNIT),
        }
    });
    let c = ctx.clone();
    e.register_fn("state_set", move |key: &str, value: Dynamic| {
        let mut g = c.lock().unwrap();
        let k = (g.rule.clone(), key.to_string());
        let v = if value.is_unit() {
            None
        } else {
            Some(to_json(&value))
        };
        g.step.insert(k, v);
    });
    let c = ctx.clone();
    e.register_fn("state_keys", move || -> Array {
        let g = c.lock().unwrap();
        let mut keys: std::collections::BTreeSet<&str> = g
            .committed
            .keys()
            .filter(|(r, _)| *r == g.rule)
            .map(|(_, k)| k.as_str())
            .collect();
        for ((r, k), v) in g.pending.iter().chain(g.step.iter()) {
            if *r == g.rule {
                if v.is_some() {
                    keys.insert(k.as_str());
                } else {
                    keys.remove(k.as_str());
                }
            }
        }
        keys.into_iter()
            .map(|k| Dynamic::from(k.to_string()))
            .collect()
    });
    let c = ctx.clone();
    e.register_fn("state_del", move |key: &str| {
        let mut g = c.lock().unwrap();
        let k = (g.rule.clone(), key.to_string());
        g.step.insert(k, None);
    });
    let c = ctx.clone();
    e.register_fn("log", move |level: &str, msg: Dynamic| {
        let mut g = c.lock().unwrap();
        let rule = g.rule.clone();
        g.logs.push((rule, level.to_string(), msg.to_string()));
    });
    let c = ctx.clone();
    e.register_fn("gateway_id", move || -> String {
        c.lock().map(|g| g.gateway.clone()).unwrap_or_default()
    });
    let c = ctx;
    e.register_fn("now", move || -> i64 {
        c.lock().map(|g| g.now_ms).unwrap_or(0)
    });
    e.register_fn("iso8601", |ms: i64| -> String { iso8601(ms) });
    e
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for ms since the epoch (UTC).
pub fn iso8601(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tracing_records_each_rules_verdict_only_when_asked() {
        let mut s = set(&[
            ("10-wrap", "fn on_event(e) { [e] }"),
            (
                "20-move",
                "fn on_event(e) { e.topic = \"b\"; e.payload.x.y = 2; e }",
            ),
            (
                "30-none",
                "fn on_event(e) { if e.payload.v == 1 { [] } else { e } }",
            ),
        ]);
        let input = || ev("a", json!({"v": 0, "x": {"y": 1}}));
        assert!(s.on_event(input()).trace.is_empty(), "off unless asked");
        s.set_tracing(true);
        let r = s.on_event(input());
        let v: Vec<_> = r
            .trace
            .iter()
            .map(|t| (t.rule.as_str(), &t.verdict))
            .collect();
        assert_eq!(
            v[0],
            ("10-wrap", &Verdict::Kept),
            "an array of one is the event itself"
        );
        assert_eq!(
            v[1],
            (
                "20-move",
                &Verdict::Changed(vec![
                    "~payload.x.y: 1 -> 2".into(),
                    "~topic: \"a\" -> \"b\"".into()
                ])
            )
        );
        assert_eq!(v[2], ("30-none", &Verdict::Kept));
        assert_eq!(r.trace[1].input["topic"], "a");
        assert_eq!(r.trace[1].outputs[0]["topic"], "b");
        let r = s.on_event(ev("a", json!({"v": 1, "x": {"y": 1}})));
        assert_eq!(r.trace[2].verdict, Verdict::FannedOut(0));
        assert!(r.events.is_empty());
    }

    fn set(rules: &[(&str, &str)]) -> RuleSet {
        let mut s = RuleSet::empty(Limits::default());
        for (name, src) in rules {
            let r = s
                .compile(Path::new(&format!("{name}.rhai")), src)
                .unwrap_or_else(|e| panic!("{e}"));
            s.upsert(r);
        }
        s
    }

    #[test]
    fn user_properties_are_a_map_and_repeated_names_an_array() {
        let m = properties_map(&[
            ("site".into(), "north".into()),
            ("tag".into(), "a".into()),
            ("tag".into(), "b".into()),
            ("tag".into(), "c".into()),
        ]);
        assert_eq!(m["site"].clone().into_string().unwrap(), "north");
        let tags: Vec<String> = m["tag"]
            .clone()
            .into_array()
            .unwrap()
            .into_iter()
            .map(|d| d.into_string().unwrap())
            .collect();
        assert_eq!(tags, ["a", "b", "c"]);
        assert!(properties_map(&[]).is_empty());
    }

    fn ev(topic: &str, payload: Value) -> RuleEvent {
        RuleEvent {
            id: 0,
            ts: 1000,
            source: "mqtt".into(),
            topic: topic.into(),
            payload,
            properties: Vec::new(),
        }
    }

    #[test]
    fn keep_change_drop_fan_out() {
        let mut s = set(&[(
            "10-x",
            r#"
            fn on_event(e) {
                if e.payload.kind == "drop" { return (); }
                if e.payload.kind == "fan" { return [e, #{ topic: "b/2", payload: 2 }]; }
                e.payload.seen = true;
                e
            }"#,
        )]);
        let r = s.on_event(ev("a/1", json!({"kind": "keep"})));
        assert_eq!(r.events[0].payload, json!({"kind": "keep", "seen": true}));
        let r = s.on_event(ev("a/1", json!({"kind": "drop"})));
        assert!(r.events.is_empty());
        assert_eq!(r.dropped_by, vec!["10-x".to_string()]);
        let r = s.on_event(ev("a/1", json!({"kind": "fan"})));
        assert_eq!(r.events.len(), 2);
        assert_eq!(r.events[1].topic, "b/2");
        assert_eq!(r.events[1].payload, json!(2));
    }

    #[test]
    fn rules_chain_in_file_name_order_and_topics_filter() {
        let mut s = set(&[
            (
                "20-second",
                r#"fn on_event(e) { e.payload.order += "2"; e }"#,
            ),
            (
                "10-first",
                r#"fn on_event(e) { e.payload.order += "1"; e }"#,
            ),
            (
                "30-only-t",
                r#"const TOPICS = ["sensors/+/t"]; fn on_event(e) { e.payload.order += "3"; e }"#,
            ),
        ]);
        let r = s.on_event(ev("sensors/1/t", json!({"order": ""})));
        assert_eq!(r.events[0].payload["order"], "123");
        let r = s.on_event(ev("sensors/1/h", json!({"order": ""})));
        assert_eq!(
            r.events[0].payload["order"], "12",
            "TOPICS: other events pass by untouched"
        );
    }

    #[test]
    fn failures_become_dead_letters_with_the_rule_and_error() {
        let mut s = set(&[
            (
                "10-throw",
                r#"fn on_event(e) { if e.payload == 1 { throw "bad reading"; } e }"#,
            ),
            (
                "20-type",
                r#"fn on_event(e) { if e.payload == 2 { return 42; } e }"#,
            ),
        ]);
        let r = s.on_event(ev("t", json!(1)));
        assert_eq!(r.dead_letters.len(), 1);
        assert_eq!(r.dead_letters[0].rule, "10-throw");
        assert!(r.dead_letters[0].error.contains("bad reading"));
        let r = s.on_event(ev("t", json!(2)));
        assert_eq!(r.dead_letters[0].rule, "20-type");
        assert!(
            r.dead_letters[0].error.contains("return the event"),
            "{}",
            r.dead_letters[0].error
        );
        assert_eq!(
            s.on_event(ev("t", json!(3))).events.len(),
            1,
            "other events carry on"
        );
    }

    #[test]
    fn publish_log_and_time_helpers() {
        let mut s = set(&[(
            "10-alert",
            r#"
            fn on_event(e) {
                if e.payload.celsius > 80.0 {
                    publish("alerts/overheat", #{ celsius: e.payload.celsius, at: iso8601(e.ts) });
                    log("warn", "hot");
                }
                if now() < 1 { throw "now() is not the wall clock"; }
                e
            }"#,
        )]);
        let r = s.on_event(ev("t", json!({"celsius": 91.5})));
        assert_eq!(
            r.publishes,
            vec![Publish {
                rule: "10-alert".into(),
                topic: "alerts/overheat".into(),
                payload: json!({"celsius": 91.5, "at": "1970-01-01T00:00:01.000Z"})
            }]
        );
        assert_eq!(r.logs[0].1, "warn");
        assert!(r.dead_letters.is_empty(), "{:?}", r.dead_letters);
    }

    #[test]
    fn state_is_per_rule_pending_until_committed() {
        let src = r#"fn on_event(e) { let n = state_get("n"); if n == () { n = 0; } state_set("n", n + 1); e.payload = n + 1; e }"#;
        let mut s = set(&[("10-count", src), ("20-count", src)]);
        assert_eq!(s.on_event(ev("t", json!(0))).events[0].payload, json!(1));
        assert_eq!(
            s.on_event(ev("t", json!(0))).events[0].payload,
            json!(2),
            "later events of a step see pending writes"
        );
        s.rollback_state();
        assert_eq!(
            s.on_event(ev("t", json!(0))).events[0].payload,
            json!(1),
            "a failed commit forgets them"
        );
        assert_eq!(s.pending_state().len(), 2, "one key per rule");
        s.commit_state();
        assert!(s.pending_state().is_empty());
        assert_eq!(s.on_event(ev("t", json!(0))).events[0].payload, json!(2));
    }

    #[test]
    fn a_failed_input_leaves_nothing_and_dead_letters_the_original() {
        let mut s = set(&[
            (
                "10-stage",
                r#"fn on_event(e) {
                    let k = state_get("k"); if k == () { k = 0; }
                    state_set("k", k + 1);
                    publish("stage/seen", k + 1);
                    e.payload.stage = k + 1;
                    [e, #{ topic: "fan/out", payload: k + 1 }]
                }"#,
            ),
            (
                "20-check",
                r#"const TOPICS = ["t"];
                fn on_event(e) {
                    state_set("last", e.payload.i);
                    publish("check/seen", e.payload.i);
                    if e.payload.fail == true { throw "check failed"; }
                    e
                }"#,
            ),
        ]);
        let r = s.on_event(ev("t", json!({"i": 1})));
        assert_eq!(r.events.len(), 2);
        assert_eq!(r.publishes.len(), 2);
        let bad = json!({"i": 2, "fail": true});
        let r = s.on_event(ev("t", bad.clone()));
        assert!(r.events.is_empty(), "no output of a failed input: {r:?}");
        assert!(r.publishes.is_empty(), "no publish of a failed input");
        assert_eq!(r.dead_letters.len(), 1);
        assert_eq!(r.dead_letters[0].rule, "20-check");
        assert_eq!(
            r.dead_letters[0].event,
            ev("t", bad),
            "the input as it entered the chain"
        );
        // Neither rule's write of the failed input is pending; the first input's are.
        let pending: BTreeMap<_, _> = s.pending_state().into_iter().collect();
        assert_eq!(pending[&("10-stage".into(), "k".into())], Some(json!(1)));
        assert_eq!(pending[&("20-check".into(), "last".into())], Some(json!(1)));
        // State carries on from the last successful input.
        let r = s.on_event(ev("t", json!({"i": 3})));
        assert_eq!(r.events[0].payload["stage"], json!(2));
        s.commit_state();
        assert!(s.pending_state().is_empty());
        // A failed input right after a commit leaves the committed state as it was.
        let r = s.on_event(ev("t", json!({"i": 4, "fail": true})));
        assert_eq!(r.dead_letters.len(), 1);
        assert!(s.pending_state().is_empty());
        s.rollback_state();
        let r = s.on_event(ev("t", json!({"i": 5})));
        assert_eq!(r.events[0].payload["stage"], json!(3));
    }

    #[test]
    fn a_failed_tick_call_leaves_nothing_of_its_own() {
        let mut s = set(&[
            (
                "10-bad",
                r#"fn on_tick(now) { state_set("x", 1); publish("a", 1); throw "no"; }"#,
            ),
            (
                "20-good",
                r#"fn on_tick(now) { state_set("y", 1); publish("b", 1); [#{ topic: "t", payload: 1 }] }"#,
            ),
        ]);
        let r = s.on_tick(5);
        assert_eq!(r.dead_letters.len(), 1);
        assert_eq!(r.publishes.len(), 1);
        assert_eq!(r.publishes[0].topic, "b");
        assert_eq!(r.events.len(), 1);
        assert_eq!(
            s.pending_state(),
            vec![(("20-good".to_string(), "y".to_string()), Some(json!(1)))]
        );
    }

    #[test]
    fn on_tick_returns_events() {
        let mut s = set(&[(
            "10-tick",
            r#"fn on_tick(now) { [#{ topic: "agg/avg", payload: #{ at: now } }] }"#,
        )]);
        let r = s.on_tick(5000);
        assert_eq!(r.events[0].topic, "agg/avg");
        assert_eq!(r.events[0].payload, json!({"at": 5000}));
        assert_eq!(r.events[0].source, "rule:10-tick");
    }

    #[test]
    fn compile_errors_have_file_line_col() {
        let s = RuleSet::empty(Limits::default());
        let e = s
            .compile(
                Path::new("rules/10-bad.rhai"),
                "fn on_event(e) {\n  let x = ;\n}",
            )
            .unwrap_err();
        assert_eq!((e.line, e.file.as_str()), (2, "rules/10-bad.rhai"));
        assert!(e.to_string().starts_with("rules/10-bad.rhai:2:"), "{e}");
        let e = s.compile(Path::new("x.rhai"), "let a = 1;").unwrap_err();
        assert!(e.message.contains("on_event"), "{e}");
    }

    #[test]
    fn denial_of_service_fails_fast_and_the_flow_goes_on() {
        let cases = [
            ("loop", "fn on_event(e) { loop {} }"),
            ("recursion", "fn f(n) { f(n + 1) } fn on_event(e) { f(0) }"),
            (
                "string",
                r#"fn on_event(e) { let s = "x"; loop { s += s; } }"#,
            ),
            (
                "array",
                "fn on_event(e) { let a = []; loop { a.push(1); } }",
            ),
            (
                "closures",
                "fn on_event(e) { let fs = []; for i in 0..100000 { fs.push(|x| x + i); } e }",
            ),
            ("sleep", "fn on_event(e) { sleep(10); e }"),
        ];
        for (name, src) in cases {
            let mut s = set(&[(name, src), ("zz-ok", "fn on_event(e) { e }")]);
            let t = Instant::now();
            let r = s.on_event(ev("t", json!(1)));
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "{name} took {:?}",
                t.elapsed()
            );
            assert_eq!(r.dead_letters.len(), 1, "{name}: {r:?}");
            assert!(r.events.is_empty(), "{name}");
        }
        // Deeply nested expressions and import are refused at compile time.
        let s = RuleSet::empty(Limits::default());
        let deep = format!(
            "fn on_event(e) {{ {}1{} }}",
            "(".repeat(500),
            ")".repeat(500)
        );
        assert!(s.compile(Path::new("deep.rhai"), &deep).is_err());
        assert!(s
            .compile(
                Path::new("imp.rhai"),
                "import \"x\" as x; fn on_event(e) { e }"
            )
            .is_err());
        let e = s
            .compile(
                Path::new("eval.rhai"),
                r#"fn on_event(e) { eval("1 + 1") }"#,
            )
            .unwrap_err();
        assert!(e.message.contains("eval"), "{e}");
    }

    #[test]
    fn iso8601_formats_utc() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_763_785_000_123), "2025-11-22T04:16:40.123Z");
    }
}
