//! `tidepool rules test` and `tidepool check` on rules.

use std::process::Command;

use tidepool_e2e::*;

const EXAMPLES: [&str; 5] = [
    "05-drop-malformed",
    "10-threshold-alert",
    "20-units-enrich",
    "30-deadband",
    "40-window-average",
];

fn rules_test(rule: &str, events: &str, expect: Option<&str>) -> std::process::Output {
    let mut c = Command::new(bin_dir().join("tidepool"));
    c.args(["rules", "test", rule, "--events", events]);
    if let Some(e) = expect {
        c.args(["--expect", e]);
    }
    c.current_dir(root()).output().unwrap()
}

#[test]
fn every_example_matches_its_expect_file() {
    for ex in EXAMPLES {
        let out = rules_test(
            &format!("rules/examples/{ex}.rhai"),
            &format!("rules/examples/{ex}.events.jsonl"),
            Some(&format!("rules/examples/{ex}.expect.jsonl")),
        );
        assert!(
            out.status.success(),
            "{ex}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_mismatch_exits_1_with_a_diff() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("wrong.jsonl");
    std::fs::write(
        &exp,
        "{\"topic\": \"sensors/1/temperature\", \"payload\": {\"celsius\": 99}}\n",
    )
    .unwrap();
    let out = rules_test(
        "rules/examples/30-deadband.rhai",
        "rules/examples/30-deadband.events.jsonl",
        Some(exp.to_str().unwrap()),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("- {\"payload\":{\"celsius\":99}"), "{err}");
    assert!(err.contains("+ {\"payload\":{\"celsius\":20.0}"), "{err}");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("dropped by 30-deadband"), "{shown}");
}

#[test]
fn check_reports_rule_errors_as_file_line_col() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(rules.join("10-ok.rhai"), "fn on_event(e) { e }").unwrap();
    std::fs::write(
        rules.join("20-bad.rhai"),
        "fn on_event(e) {\n    let x = ;\n}\n",
    )
    .unwrap();
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, format!("[rules]\ndir = \"{}\"\n", rules.display())).unwrap();
    let out = Command::new(bin_dir().join("tidepool"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:2:", rules.join("20-bad.rhai").display())),
        "{err}"
    );
    std::fs::remove_file(rules.join("20-bad.rhai")).unwrap();
    let out = Command::new(bin_dir().join("tidepool"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success());
}
