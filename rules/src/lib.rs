//! `tidepool-rules`: the rule engine. Rules are user-written Rhai functions run on events at
//! the edge: filter, transform, enrich, alert, aggregate. See [`engine`].

pub mod engine;

pub use engine::{
    diff, CompileError, DeadLetter, Limits, Publish, Rule, RuleEvent, RuleSet, StepResult,
    TraceStep, Verdict,
};

/// Whether `topic` matches the MQTT filter `filter` (`+` one level, `#` the rest), with
/// MQTT's rule that a leading wildcard does not match `$`-topics.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('#') || filter.starts_with('+')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::topic_matches;

    #[test]
    fn filters() {
        assert!(topic_matches("#", "a/b"));
        assert!(topic_matches("sensors/#", "sensors/1/t"));
        assert!(topic_matches("sensors/#", "sensors"));
        assert!(topic_matches("sensors/+/t", "sensors/1/t"));
        assert!(!topic_matches("sensors/+/t", "sensors/1/h"));
        assert!(!topic_matches("sensors/+", "sensors/1/t"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(!topic_matches("+/x", "$SYS/x"));
        assert!(topic_matches("$SYS/#", "$SYS/x"));
    }
}
