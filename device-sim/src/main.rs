//! `tidepool-sim`: simulated sensors for Tidepool.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tidepool_sim::{run, SimConfig, SimStats};

/// Simulated sensors publishing numbered JSON events over MQTT (QoS 1) or a serial line.
///
/// MQTT: each event goes to `sensors/{i}/temperature` with a payload like
/// {"sensor":"sensor-3","n":1234,"seq":123,"ts":1763785000123,"celsius":21.37};
/// `n` numbers the events of the run from 0, `seq` those of one sensor, so a receiver can
/// count loss and duplicates exactly. The same --seed gives the same readings.
///
/// Serial (--serial PATH or --pty): the same events as `lines` (one JSON object per line, with
/// its "topic") or `cobs` (tidepool-proto frames: device "sensor-{i}", seq = n, key/values n and
/// celsius). With --ack the simulator is a reliable device: it keeps up to 64 frames without an
/// ack from the gateway and resends them after 1 s, until all are acknowledged; with --serial, a
/// line that fails (unplugged) is opened again and the whole window resent; lines frames then
/// carry "device" and "seq" = n (an ack names only the seq).
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
    /// QoS 1 publishes in flight without a PUBACK (the sensor's window).
    #[arg(long, default_value_t = 1000)]
    inflight: u16,
    /// Append the `n` of every event the broker acknowledged to this file, one a line, as
    /// acknowledgements arrive (so a crash test can check every acknowledged event arrived).
    #[arg(long)]
    acked_log: Option<std::path::PathBuf>,
    /// Print the final summary as one JSON line (for scripts).
    #[arg(long)]
    json: bool,
    /// Write to this serial device (or pty) instead of MQTT.
    #[arg(long, conflicts_with = "pty")]
    serial: Option<String>,
    /// Create a pseudo-terminal pair, print the path to point the gateway at, and write to it.
    #[arg(long)]
    pty: bool,
    /// Serial framing: lines or cobs.
    #[arg(long, default_value = "lines")]
    framing: String,
    /// Serial line speed.
    #[arg(long, default_value_t = 115_200)]
    baud: u32,
    /// Reliable serial: wait for the gateway's acks and resend what is not acknowledged.
    #[arg(long)]
    ack: bool,
    /// Seconds to wait before sending (e.g. to start the gateway on a new --pty).
    #[arg(long, default_value_t = 0.0)]
    delay: f64,
    /// Serial faults to inject, as KIND=RATIO per good frame, comma-separated: garbage,
    /// truncated, oversize, invalid, disconnect, burst (or all=RATIO). Good frames are all
    /// still sent; the summary counts what was injected.
    #[arg(long, default_value = "")]
    faults: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.serial.is_some() || a.pty {
        return serial_main(a);
    }
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
        inflight: a.inflight,
        acked_log: a.acked_log,
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
            "{{\"sent\":{sent},\"acked\":{acked},\"reconnects\":{},\"seconds\":{secs:.3},\"ack_p50_ms\":{:.2},\"ack_p99_ms\":{:.2}}}",
            stats.reconnects.load(Relaxed),
            stats.ack_latency_ms(0.5),
            stats.ack_latency_ms(0.99)
        );
    } else {
        println!(
            "sim: done: sent {sent}, acked {acked}, reconnects {} in {secs:.1}s ({:.0} events/s); PUBACK latency p50 {:.1} ms, p99 {:.1} ms",
            stats.reconnects.load(Relaxed),
            sent as f64 / secs.max(1e-9),
            stats.ack_latency_ms(0.5),
            stats.ack_latency_ms(0.99)
        );
    }
    Ok(())
}

fn serial_main(a: Args) -> anyhow::Result<()> {
    use tidepool_sim::serial::{self, Framing};
    let framing = match a.framing.as_str() {
        "lines" => Framing::Lines,
        "cobs" => Framing::Cobs,
        other => anyhow::bail!("--framing {other}: use lines or cobs"),
    };
    let port = match &a.serial {
        Some(p) => serial::open_tty(p, a.baud).with_context(|| format!("opening {p}"))?,
        None => {
            let (master, path) = serial::open_pty().context("creating a pty")?;
            println!("pty: {path}");
            master
        }
    };
    std::thread::sleep(Duration::from_secs_f64(a.delay));
    let cfg = SimConfig {
        sensors: a.sensors,
        rate: a.rate,
        count: a.count,
        seed: a.seed,
        ..SimConfig::default()
    };
    let stats = Arc::new(SimStats::default());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        s.store(true, Relaxed);
    });
    let started = Instant::now();
    let st = stats.clone();
    let quiet = a.json;
    std::thread::spawn(move || {
        let mut last = 0;
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let n = st.sent.load(Relaxed);
            if !quiet {
                eprintln!(
                    "sim: sent {n} ({}/s)  acked {}  resent {}",
                    n - last,
                    st.acked.load(Relaxed),
                    st.resent.load(Relaxed)
                );
            }
            last = n;
        }
    });
    let faults = serial::Faults::parse(&a.faults).map_err(anyhow::Error::msg)?;
    let counts = serial::FaultCounts::default();
    let reopen = a.serial.as_deref().map(|p| (p, a.baud));
    serial::run_with_faults(
        &cfg,
        port,
        reopen,
        framing,
        a.ack,
        &faults,
        &counts,
        stats.clone(),
        stop,
    )?;
    let secs = started.elapsed().as_secs_f64();
    let (sent, acked, resent) = (
        stats.sent.load(Relaxed),
        stats.acked.load(Relaxed),
        stats.resent.load(Relaxed),
    );
    let (bad, over, disc, bursts) = (
        counts.bad.load(Relaxed),
        counts.oversize.load(Relaxed),
        counts.disconnects.load(Relaxed),
        counts.bursts.load(Relaxed),
    );
    if a.json {
        println!(
            "{{\"sent\":{sent},\"acked\":{acked},\"resent\":{resent},\"seconds\":{secs:.3},\"faults\":{{\"bad\":{bad},\"oversize\":{over},\"disconnects\":{disc},\"bursts\":{bursts}}}}}"
        );
    } else {
        println!(
            "sim: done: sent {sent}, acked {acked}, resent {resent} in {secs:.1}s ({:.0} frames/s); faults injected: {bad} bad frames, {over} oversize, {disc} disconnects, {bursts} bursts",
            sent as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}
