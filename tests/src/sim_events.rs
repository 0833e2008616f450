//! Simulator events as the store hands them to the forwarder, for the benchmark and tests that
//! encode and compress batches without a gateway process. Not part of the harness library
//! (that would link the gateway crate into every test binary): included with `#[path]`.

/// `n` committed events as the simulator (`seed`, 10 sensors, unpadded) would make them, ids
/// from `first_id`, received 1 ms apart from `t0` (1,000 events/s): the contents of real
/// batches, for encoding and compression without a gateway process.
pub fn sim_events(seed: u64, first_id: u64, n: u64, t0: i64) -> Vec<tidepool::event::Event> {
    let mut sim = tidepool_sim::Generator::new(seed, 10, 0);
    (0..n)
        .map(|i| {
            let ts = t0 + i as i64;
            let (_, topic, v) = sim.next(i, ts);
            tidepool::event::Event {
                id: first_id + i,
                ts,
                source: "mqtt".into(),
                topic,
                payload: tidepool::event::Payload::Json(v.to_string()),
                trace: Default::default(),
                properties: Vec::new(),
            }
        })
        .collect()
}
