//! `tidepool demo`: the whole path on one machine, with an outage, and every event accounted for.
//!
//! A stand-in "cloud" broker (the gateway's own broker, routing only), a TCP proxy in front of it that the demo cuts and
//! restores, the gateway (embedded broker, store in a temporary folder) and the simulator.
//! A subscriber on the cloud broker counts what arrives, by id and by the simulator's `n`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::config::{Config, HumanDuration};

/// Timeline and size of the demo.
#[derive(Debug, Clone)]
pub struct DemoPlan {
    /// Events the simulator sends.
    pub events: u64,
    /// Their rate.
    pub rate: f64,
    /// When the link to the cloud goes down.
    pub cut_at: Duration,
    /// How long it stays down.
    pub cut_for: Duration,
}

impl Default for DemoPlan {
    fn default() -> Self {
        DemoPlan {
            events: 15_000,
            rate: 1_500.0,
            cut_at: Duration::from_secs(3),
            cut_for: Duration::from_secs(5),
        }
    }
}

/// What arrived at the cloud.
#[derive(Default)]
struct Received {
    ids: HashSet<u64>,
    ns: HashSet<u64>,
    deliveries: u64,
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A TCP proxy that can be cut: while down, it closes every connection.
struct Proxy {
    up: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> std::io::Result<(Proxy, u16)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(AtomicU64::new(0));
        let (u, g) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !u.load(Relaxed) {
                    let _ = inbound.shutdown().await;
                    continue;
                }
                let my_gen = g.load(Relaxed);
                let (u, g) = (u.clone(), g.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    let cut = async {
                        while u.load(Relaxed) && g.load(Relaxed) == my_gen {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    };
                    tokio::select! { _ = copy => {}, _ = cut => {} }
                });
            }
        });
        Ok((Proxy { up, generation }, port))
    }

    fn set_up(&self, up: bool) {
        if !up {
            self.generation.fetch_add(1, Relaxed);
        }
        self.up.store(up, Relaxed);
    }
}

/// Runs the demo; returns whether every event was accounted for.
pub async fn run(plan: DemoPlan) -> anyhow::Result<bool> {
    let dir = tempfile_dir()?;
    let cloud_port = free_port()?;
    let cloud_addr: SocketAddr = format!("127.0.0.1:{cloud_port}").parse()?;
    // The cloud: the gateway's own broker, ingesting nothing, routing everything.
    let (_cloud_stop, cloud_shutdown) = crate::shutdown::channel();
    let (_cloud, _cloud_task) = crate::broker::Broker::start(
        crate::broker::Settings::routing_only(cloud_addr),
        None,
        Arc::new(crate::admin::metrics::Metrics::default()),
        None,
        cloud_shutdown,
    )
    .await?;
    wait_port(cloud_addr).await?;
    let (proxy, proxy_port) = Proxy::start(cloud_addr).await?;

    let mut cfg = Config::defaults();
    cfg.gateway.id = "demo-gateway".into();
    cfg.gateway.data_dir = dir.clone();
    let sensor_port = free_port()?;
    cfg.ingest.mqtt.listen = format!("127.0.0.1:{sensor_port}").parse()?;
    cfg.admin.listen = String::new();
    cfg.upstream.url = Some(format!("mqtt://127.0.0.1:{proxy_port}"));
    cfg.upstream.topic = "tidepool/demo-gateway/events".into();
    cfg.upstream.client_id = "tidepool-demo-gateway".into();
    cfg.upstream.batch_max_wait = HumanDuration(Duration::from_millis(200));
    cfg.upstream.reconnect_max = HumanDuration(Duration::from_secs(2));
    let topic = cfg.upstream.topic.clone();

    // The cloud subscriber, subscribed before anything is published.
    let received = Arc::new(Mutex::new(Received::default()));
    let mut opts = MqttOptions::new("demo-cloud-subscriber", "127.0.0.1", cloud_port);
    opts.set_max_packet_size(4 << 20, 64 << 10);
    let (sub, mut sub_loop) = AsyncClient::new(opts, 100);
    sub.subscribe(&topic, QoS::AtLeastOnce).await?;
    let (subacked_tx, subacked_rx) = tokio::sync::oneshot::channel();
    let r = received.clone();
    tokio::spawn(async move {
        let mut subacked = Some(subacked_tx);
        loop {
            match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = subacked.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) {
                        let mut r = r.lock().unwrap();
                        for e in v["events"].as_array().into_iter().flatten() {
                            r.deliveries += 1;
                            if let Some(id) = e["id"].as_u64() {
                                r.ids.insert(id);
                            }
                            if let Some(n) = e["payload"]["n"].as_u64() {
                                r.ns.insert(n);
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subacked_rx).await??;

    let (trigger, shutdown) = crate::shutdown::channel();
    let gw = crate::start(cfg, shutdown).await?;
    let m = gw.metrics.clone();
    wait_port(format!("127.0.0.1:{sensor_port}").parse()?).await?;

    println!(
        "tidepool demo: sensors → gateway (embedded broker, redb store) → proxy → cloud broker"
    );
    println!(
        "  {} events at {}/s; the cloud link goes down at {}s for {}s\n",
        plan.events,
        plan.rate,
        plan.cut_at.as_secs(),
        plan.cut_for.as_secs()
    );
    let stats = Arc::new(tidepool_sim::SimStats::default());
    let sim_cfg = tidepool_sim::SimConfig {
        host: "127.0.0.1".into(),
        port: sensor_port,
        sensors: 20,
        rate: plan.rate,
        count: Some(plan.events),
        seed: 42,
        payload_size: 0,
        client_id: "demo-sim".into(),
        ..Default::default()
    };
    let sim = tokio::spawn(tidepool_sim::run(
        sim_cfg,
        stats.clone(),
        std::future::pending(),
    ));

    let started = Instant::now();
    let mut cut_done = false;
    let mut restored = false;
    let deadline = plan.cut_at + plan.cut_for + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let t = started.elapsed();
        if !cut_done && t >= plan.cut_at {
            proxy.set_up(false);
            cut_done = true;
            println!("  >>> link to the cloud cut");
        }
        if cut_done && !restored && t >= plan.cut_at + plan.cut_for {
            proxy.set_up(true);
            restored = true;
            println!("  >>> link to the cloud restored");
        }
        let (unique, deliveries) = {
            let r = received.lock().unwrap();
            (r.ns.len() as u64, r.deliveries)
        };
        println!(
            "  t={:>3}s  sent {:>6}  ingested {:>6}  buffered {:>6}  forwarded {:>6}  cloud got {:>6} ({} deliveries)  upstream {}",
            t.as_secs(),
            stats.sent.load(Relaxed),
            m.ingested_total(),
            m.backlog_events.load(Relaxed),
            m.forwarded.load(Relaxed),
            unique,
            deliveries,
            m.upstream().name()
        );
        if restored
            && sim.is_finished()
            && unique >= plan.events
            && m.backlog_events.load(Relaxed) == 0
        {
            break;
        }
        if t > deadline {
            println!("  giving up waiting");
            break;
        }
    }
    trigger.fire();
    let _ = gw.done.await;
    let r = received.lock().unwrap();
    let sent = stats.sent.load(Relaxed);
    let acked = stats.acked.load(Relaxed);
    let lost = sent.saturating_sub(r.ns.len() as u64);
    println!("\nsummary");
    println!("  simulator sent      {sent} (broker acknowledged {acked})");
    println!("  gateway committed   {}", m.committed.load(Relaxed));
    println!(
        "  cloud received      {} distinct events, {} deliveries ({} duplicates, same ids)",
        r.ns.len(),
        r.deliveries,
        r.deliveries - r.ids.len() as u64
    );
    println!("  lost                {lost}");
    println!(
        "  fsyncs              {} ({:.0} events per fsync)",
        m.fsyncs.load(Relaxed),
        m.committed.load(Relaxed) as f64 / m.fsyncs.load(Relaxed).max(1) as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
    let ok = lost == 0 && r.ids.len() as u64 == r.ns.len() as u64;
    println!(
        "\n{}",
        if ok {
            "every event accounted for"
        } else {
            "EVENTS MISSING"
        }
    );
    Ok(ok)
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "tidepool-demo-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

async fn wait_port(addr: SocketAddr) -> anyhow::Result<()> {
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{addr} did not start listening")
}
