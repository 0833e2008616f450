//! One kill storm for every crash test: the gateway is killed with SIGKILL at random moments
//! (seeded, so a failure can be replayed) and restarted after a random pause.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use crate::Gateway;

/// How the gateway is killed.
#[derive(Debug, Clone)]
pub struct KillStorm {
    /// Kills in all.
    pub kills: usize,
    /// How long it runs before each kill (ms).
    pub up_ms: Range<u64>,
    /// How long it stays down before each restart (ms).
    pub down_ms: Range<u64>,
    /// Seed of the moments.
    pub seed: u64,
}

impl Default for KillStorm {
    fn default() -> Self {
        KillStorm {
            kills: 6,
            up_ms: 300..1200,
            down_ms: 50..400,
            seed: 0x5eed,
        }
    }
}

impl KillStorm {
    /// Kills and restarts `gw` until the storm is over; it is running at the end. Returns the
    /// kills made.
    pub fn run(&self, gw: &mut Gateway) -> usize {
        let mut rng = fastrand::Rng::with_seed(self.seed);
        for _ in 0..self.kills {
            std::thread::sleep(Duration::from_millis(rng.u64(self.up_ms.clone())));
            gw.proc.kill9();
            std::thread::sleep(Duration::from_millis(rng.u64(self.down_ms.clone())));
            gw.launch();
        }
        self.kills
    }
}

/// The `n`s a simulator run with `--acked-log` was acknowledged for.
pub fn acked_log(path: &Path) -> BTreeSet<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}
