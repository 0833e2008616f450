//! The rule stage, as the store's commit loop sees it.
//!
//! The commit loop hands every ingested event to a [`RuleStage`] inside the write transaction
//! that will store its outputs, so whatever a rule produces (events, local publishes, dead
//! letters) is committed atomically with the step that produced it. Until the Rhai engine
//! (`tidepool-rules`) is wired in, [`PassThrough`] keeps every event unchanged.

pub mod dry_run;

use crate::event::Event;

/// What one rule step produced.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// Events to store and forward, in order.
    pub events: Vec<Event>,
    /// Events a rule dropped (counted as `dropped{reason="rule"}`).
    pub dropped: u64,
}

/// The rule stage: runs on the commit loop's thread, never on the async executor.
pub trait RuleStage: Send {
    /// Runs the rules on one event, appending what comes out to `out`.
    fn on_event(&mut self, event: Event, out: &mut StepOutput);
}

/// Keeps every event as it is.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough;

impl RuleStage for PassThrough {
    fn on_event(&mut self, event: Event, out: &mut StepOutput) {
        out.events.push(event);
    }
}
