//! `--acked-log`: the simulator as its own small MQTT 3.1.1 client, so that every PUBACK is
//! tied to the exact event it acknowledges (each publish gets a packet id this client chose
//! and remembers). A general client library cannot promise that across reconnects: requests
//! it dropped with a lost session are never reported. Clean session; what is in flight when
//! the connection goes is simply not acknowledged (and not logged).

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{now_ms, Generator, SimConfig, SimStats};

/// Runs like [`crate::run`], appending the `n` of each acknowledged event to `log`.
pub async fn run(
    cfg: SimConfig,
    stats: Arc<SimStats>,
    stop: impl std::future::Future<Output = ()>,
    log: &std::path::Path,
) -> anyhow::Result<()> {
    let mut file = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?,
    );
    let window = usize::from(cfg.inflight.max(1));
    let started = Instant::now();
    let mut generator = Generator::new(cfg.seed, cfg.sensors, cfg.payload_size);
    let mut n: u64 = 0;
    let mut next_pkid: u16 = 0;
    tokio::pin!(stop);
    'connection: loop {
        if cfg.count.is_some_and(|c| n >= c) {
            break;
        }
        let mut stream = match connect(&cfg).await {
            Ok(s) => s,
            Err(_) => {
                stats.reconnects.fetch_add(1, Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    _ = &mut stop => break,
                }
            }
        };
        let mut in_flight: HashMap<u16, (u64, Instant)> = HashMap::new();
        let mut buf = BytesMut::with_capacity(8192);
        let mut out = BytesMut::with_capacity(8192);
        loop {
            let done = cfg.count.is_some_and(|c| n >= c);
            if done && in_flight.is_empty() {
                break 'connection;
            }
            let due =
                (cfg.rate > 0.0).then(|| started + Duration::from_secs_f64(n as f64 / cfg.rate));
            let can_send = !done && in_flight.len() < window;
            tokio::select! {
                _ = &mut stop => break 'connection,
                _ = sleep_until(due), if can_send => {
                    next_pkid = next_free(next_pkid, &in_flight);
                    let (_, topic, body) = generator.next(n, now_ms());
                    let mut p = Publish::new(topic, QoS::AtLeastOnce, body.to_string());
                    p.pkid = next_pkid;
                    out.clear();
                    if p.write(&mut out).is_err() {
                        anyhow::bail!("event {n} does not encode");
                    }
                    if stream.write_all(&out).await.is_err() {
                        stats.reconnects.fetch_add(1, Relaxed);
                        continue 'connection;
                    }
                    in_flight.insert(next_pkid, (n, Instant::now()));
                    stats.sent.fetch_add(1, Relaxed);
                    n += 1;
                }
                r = stream.read_buf(&mut buf) => {
                    if !matches!(r, Ok(k) if k > 0) {
                        stats.reconnects.fetch_add(1, Relaxed);
                        continue 'connection;
                    }
                    loop {
                        match Packet::read(&mut buf, 1 << 20) {
                            Ok(Packet::PubAck(a)) => {
                                if let Some((acked, at)) = in_flight.remove(&a.pkid) {
                                    stats.acked.fetch_add(1, Relaxed);
                                    let us = at.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                                    stats.ack_latency_us.lock().unwrap().push(us);
                                    let _ = writeln!(file, "{acked}");
                                    let _ = file.flush();
                                }
                            }
                            Ok(_) => {}
                            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                            Err(_) => {
                                stats.reconnects.fetch_add(1, Relaxed);
                                continue 'connection;
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Connects with a clean session and waits for the CONNACK.
async fn connect(cfg: &SimConfig) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect((cfg.host.as_str(), cfg.port)).await?;
    s.set_nodelay(true)?;
    let mut c = Connect::new(cfg.client_id.clone());
    c.keep_alive = 0;
    c.clean_session = true;
    let mut out = BytesMut::new();
    c.write(&mut out)?;
    s.write_all(&out).await?;
    let mut buf = BytesMut::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Packet::read(&mut buf, 1 << 16) {
            Ok(Packet::ConnAck(a))
                if a.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success =>
            {
                return Ok(s)
            }
            Ok(other) => anyhow::bail!("refused: {other:?}"),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => anyhow::bail!("bad CONNACK: {e:?}"),
        }
        let k = tokio::time::timeout_at(deadline.into(), s.read_buf(&mut buf)).await??;
        if k == 0 {
            anyhow::bail!("closed before CONNACK");
        }
    }
}

/// The next packet id after `last` that is not in flight.
fn next_free(last: u16, in_flight: &HashMap<u16, (u64, Instant)>) -> u16 {
    let mut p = last;
    loop {
        p = if p == u16::MAX { 1 } else { p + 1 };
        if !in_flight.contains_key(&p) {
            return p;
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    if let Some(d) = due {
        tokio::time::sleep_until(d.into()).await;
    }
}
