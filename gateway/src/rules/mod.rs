//! The rule stage, as the store's commit loop sees it.
//!
//! The commit loop hands every ingested event to a [`RuleStage`] inside the write transaction
//! that will store its outputs, so whatever a rule produces (events, state writes, dead
//! letters) is committed atomically with the step that produced it; local publishes are sent
//! only after that commit. [`RhaiStage`] runs the user's Rhai rules (`tidepool-rules`);
//! [`PassThrough`] keeps every event unchanged.
//!
//! One input is all or nothing: when any rule fails on it, the stage yields only its dead
//! letter (the input as it came in), no events, no publishes, no state writes. Counters and
//! log lines are counted on commit ([`RuleStage::commit_state`]), since the commit loop may run
//! a group through the stage again when its commit is retried.

pub mod dry_run;
pub mod error_log;
mod rhai_stage;

/// The engine limits of `[rules]`, as the live stage applies them (and `tidepool check`).
pub use rhai_stage::limits;
pub use rhai_stage::RhaiStage;

use crate::event::Event;

/// A message for local subscribers, sent after the step's commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPublish {
    /// Topic.
    pub topic: String,
    /// JSON bytes.
    pub payload: Vec<u8>,
    /// The trace id of the input it came from (a fresh one from `on_tick`); an MQTT 5 user
    /// property `trace` on the embedded broker.
    pub trace: crate::event::Trace,
}

impl LocalPublish {
    /// Its MQTT 5 user properties: `trace`, unless its input had none (stored before trace
    /// ids), where "none" is said by leaving the property out, as batches leave out the field.
    pub fn user_properties(&self) -> Vec<(String, String)> {
        if self.trace.is_none() {
            Vec::new()
        } else {
            vec![("trace".into(), self.trace.to_string())]
        }
    }
}

/// An input a rule failed on, as stored in the dead-letter table.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// The rule's name.
    pub rule: String,
    /// What went wrong.
    pub error: String,
    /// When (ms since the epoch).
    pub at: i64,
    /// The input as it entered the rule chain (for a bad frame: its raw bytes).
    pub event: Event,
}

/// What one rule step produced.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// Events to store and forward, in order.
    pub events: Vec<Event>,
    /// Events a rule dropped (counted as `dropped{reason="rule"}`).
    pub dropped: u64,
    /// Local publishes, in call order.
    pub publishes: Vec<LocalPublish>,
    /// Inputs rules failed on.
    pub dead_letters: Vec<DeadLetter>,
}

/// One state write: `(rule, key)` and the JSON value, `None` to delete.
pub type StateWrite = ((String, String), Option<Vec<u8>>);

/// The rule stage: runs on the commit loop's thread, never on the async executor.
pub trait RuleStage: Send {
    /// Runs the rules on one event, appending what comes out to `out`.
    fn on_event(&mut self, event: Event, out: &mut StepOutput);

    /// Runs every rule's `on_tick(now)`.
    fn on_tick(&mut self, _now_ms: i64, _out: &mut StepOutput) {}

    /// Whether `on_tick` should run at all.
    fn wants_tick(&self) -> bool {
        false
    }

    /// State written since the last commit, to persist in the same transaction. Holds the
    /// writes of the inputs whose whole rule chain succeeded, never of a failed one.
    fn pending_state(&self) -> Vec<StateWrite> {
        Vec::new()
    }

    /// Whether the last [`RuleStage::on_event`] made a tap record (`tidepool tap`): the
    /// commit loop then reports the ids it gave that input's outputs
    /// ([`RuleStage::outputs_stored`]).
    fn tapping(&self) -> bool {
        false
    }

    /// The ids the outputs of the last input got, in order (`None`: the buffer refused it).
    fn outputs_stored(&mut self, _ids: &[Option<u64>]) {}

    /// The transaction holding the pending state committed: make it the state, and count
    /// (counters, metrics, log lines) what the steps since the last commit did.
    fn commit_state(&mut self) {}

    /// The transaction failed: forget the pending state and the uncounted counts, so a
    /// retried group runs from the committed state and is counted once.
    fn rollback_state(&mut self) {}

    /// Seeds the persisted state at start-up.
    fn load_state(&mut self, _entries: Vec<((String, String), Vec<u8>)>) {}

    /// Picks up changed, added or removed rule files; called between steps.
    fn reload(&mut self) {}

    /// Rules and their counters, for `/status`.
    fn status(&self) -> serde_json::Value {
        serde_json::json!([])
    }
}

/// Keeps every event as it is.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough;

impl RuleStage for PassThrough {
    fn on_event(&mut self, event: Event, out: &mut StepOutput) {
        out.events.push(event);
    }
}
