//! `tidepool-sim`: simulated sensors for Tidepool.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tidepool_sim::{run, SimConfig, SimStats};

/// Simulated sensors publishing numbered JSON events over MQTT (QoS 1).
///
/// Each event goes to `sensors/{i}/temperature` with a payload like
/// {"sensor":"sensor-3","n":1234,"seq":123,"ts":1763785000123,"celsius":21.37};
/// `n` numbers the events of the run from 0, `seq` those of one sensor, so a receiver can
/// count loss and duplicates exactly. The same --seed gives the same readings.
#[derive(Parser, Debug)]
#[command(name = "tidepool-sim", version)]
struct Args {
    /// Broker to publish to.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// Number of simulated sensors.
    #[arg(long, default_value_t = 10)]
    sensors: u32,
    /// Events per second over all sensors (0: as fast as the broker acknowledges).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Stop after this many events (default: run until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
    /// Seed of the simulated readings.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Pad payloads to about this many bytes.
    #[arg(long, default_value_t = 0)]
    payload_size: usize,
    /// MQTT client id.
    #[arg(long, default_value = "tidepool-sim")]
    client_id: String,
    /// Print the final summary as one JSON line (for scripts).
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let rest = a
        .broker
        .strip_prefix("mqtt://")
        .context("--broker must look like mqtt://HOST:PORT")?;
    let (host, port) = rest
        .rsplit_once(':')
        .map(|(h, p)| (h.to_string(), p.parse::<u16>()))
        .unwrap_or((rest.to_string(), Ok(1883)));
    let port = port.context("--broker port is not a number")?;
    let cfg = SimConfig {
        host,
        port,
        sensors: a.sensors,
        rate: a.rate,
        count: a.count,
        seed: a.seed,
        payload_size: a.payload_size,
        client_id: a.client_id,
        qos1: true,
    };
    let stats = Arc::new(SimStats::default());
    let started = Instant::now();
    let st = stats.clone();
    let quiet = a.json;
    let progress = tokio::spawn(async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let s = st.sent.load(Relaxed);
            if !quiet {
                eprintln!(
                    "sim: sent {s} ({}/s)  acked {}  reconnects {}",
                    s - last,
                    st.acked.load(Relaxed),
                    st.reconnects.load(Relaxed)
                );
            }
            last = s;
        }
    });
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    run(cfg, stats.clone(), stop).await?;
    progress.abort();
    let secs = started.elapsed().as_secs_f64();
    let sent = stats.sent.load(Relaxed);
    let acked = stats.acked.load(Relaxed);
    if a.json {
        println!(
            "{{\"sent\":{sent},\"acked\":{acked},\"reconnects\":{},\"seconds\":{secs:.3}}}",
            stats.reconnects.load(Relaxed)
        );
    } else {
        println!(
            "sim: done: sent {sent}, acked {acked}, reconnects {} in {secs:.1}s ({:.0} events/s)",
            stats.reconnects.load(Relaxed),
            sent as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}
