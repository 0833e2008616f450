//! Events/s through the example rule chain vs pass-through, and a single 20-line rule.
//! `cargo bench -p tidepool-rules` (criterion); it also prints per-event p50/p99.

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;
use tidepool_rules::{Limits, RuleEvent, RuleSet};

/// A 20-line rule: validation, unit conversion, state, a threshold, enrichment.
const TWENTY: &str = r#"
const TOPICS = ["sensors/+/temperature"];
fn on_event(e) {
    let p = e.payload;
    if type_of(p) != "map" || !p.contains("celsius") { return (); }
    let c = p.celsius;
    let sensor = e.topic.split("/")[1];
    p.fahrenheit = c * 9.0 / 5.0 + 32.0;
    let key = "max:" + sensor;
    let max = state_get(key);
    if max == () || c > max {
        state_set(key, c);
        p.new_max = true;
    }
    if c > 80.0 {
        publish("alerts/overheat", #{ sensor: sensor, celsius: c });
    }
    p.gateway = gateway_id();
    e.payload = p;
    e
}
"#;

fn event(i: u64) -> RuleEvent {
    RuleEvent {
        id: i,
        ts: 1_763_785_000_000 + i as i64,
        source: "mqtt".into(),
        topic: format!("sensors/{}/temperature", i % 20),
        payload: json!({"sensor": format!("sensor-{}", i % 20), "n": i, "seq": i / 20, "celsius": 20.0 + (i % 17) as f64 * 0.37}),
        properties: Vec::new(),
    }
}

fn examples() -> RuleSet {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    RuleSet::load(&dir, Limits::default()).expect("examples compile")
}

fn twenty() -> RuleSet {
    let mut s = RuleSet::empty(Limits::default());
    s.set_gateway("bench");
    let r = s.compile(Path::new("20-line.rhai"), TWENTY).unwrap();
    s.upsert(r);
    s
}

fn percentiles(name: &str, mut set: RuleSet) {
    let n = 50_000;
    let mut lat = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n as u64 {
        let t = Instant::now();
        let r = set.on_event(event(i));
        set.commit_state();
        std::hint::black_box(r);
        lat.push(t.elapsed());
    }
    let total = started.elapsed();
    lat.sort();
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    println!(
        "{name:<22} {:>9.0} events/s on one core; per event p50 {:?}, p99 {:?}",
        n as f64 / total.as_secs_f64(),
        p(0.5),
        p(0.99)
    );
}

fn bench(c: &mut Criterion) {
    percentiles("pass-through", RuleSet::empty(Limits::default()));
    percentiles("20-line rule", twenty());
    percentiles("example chain (5)", examples());
    let mut g = c.benchmark_group("rules");
    g.throughput(Throughput::Elements(1))
        .measurement_time(Duration::from_secs(5));
    for (name, mut set) in [
        ("pass-through", RuleSet::empty(Limits::default())),
        ("20-line rule", twenty()),
        ("example chain", examples()),
    ] {
        let mut i = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                i += 1;
                let r = set.on_event(event(i));
                set.commit_state();
                r
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
