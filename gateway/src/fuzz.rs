//! What the property tests that throw hostile input at the gateway share (tests only).

use proptest::test_runner::Config;

/// A proptest config with `cases` cases, unless the `PROPTEST_CASES` environment variable says
/// how many (so a long run needs no code change: `PROPTEST_CASES=100000 cargo test fuzz`).
pub fn cases(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        ..Config::default()
    }
}

/// Runs a future to completion on a fresh single-thread runtime (for async parsers fed from
/// memory).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a test runtime")
        .block_on(f)
}
