//! Tidepool: an edge event gateway.
//!
//! ```text
//! sensors ─MQTT─┐                      ┌─ local subscribers (embedded broker)
//! serial ports ─┴─> ingest ─> rules ─> store ─> forward ─MQTT/TLS─> upstream
//! ```
//! [`run`] wires the stages: ingest sources feed one bounded channel; the store's commit loop
//! (its own thread) runs the rule stage and commits groups durably; the forwarder reads the
//! store and deletes only what upstream acknowledged; admin serves metrics and status.

pub mod admin;
pub mod broker;
pub mod check;
pub mod commands;
pub mod config;
pub mod demo;
pub mod dlq;
pub mod event;
pub mod forward;
#[cfg(test)]
mod fuzz;
pub mod ingest;
pub mod pem;
pub mod rules;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod systemd;
pub mod tap;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use tracing::{info, warn};

use admin::metrics::Metrics;
use config::{Config, MqttMode};
use shutdown::Shutdown;

/// A running gateway's handles, for in-process users (the demo, tests).
pub struct Running {
    /// The counters.
    pub metrics: Arc<Metrics>,
    /// Completes when the gateway has stopped.
    pub done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Starts the gateway; it stops when `shutdown` fires. Errors in the config or in binding
/// ports are returned before anything runs.
pub async fn start(cfg: Config, shutdown: Shutdown) -> anyhow::Result<Running> {
    let db = store::open(&cfg.store_path(), cfg.buffer.cache_size.0)?;
    start_on(cfg, db, shutdown).await
}

/// [`start`] on a store that is already open (the store's tests run the gateway on a
/// simulated disk).
pub async fn start_on(
    cfg: Config,
    db: store::Store,
    shutdown: Shutdown,
) -> anyhow::Result<Running> {
    for w in &cfg.warnings {
        warn!("config: {w}");
    }
    let metrics = Arc::new(Metrics::default());
    let path = db.path().to_path_buf();

    let (in_tx, in_rx) = ingest::channel::channel(
        cfg.buffer.commit_max_events * 4,
        cfg.buffer.ingest_max_bytes.0 as usize,
    );
    let own = ingest::OwnPublishes::new(&cfg.ingest.mqtt.topics);
    let rules = rules::RhaiStage::new(&cfg.rules, &cfg.gateway.id, metrics.clone());
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let (committed_tx, committed_rx) = watch::channel(0u64);
    let commit_loop = store::CommitLoop::new(
        db.clone(),
        cfg.buffer.clone(),
        metrics.clone(),
        Box::new(rules),
        in_rx,
        ack_rx,
        committed_tx,
        tokio::runtime::Handle::current(),
    )?
    .with_tick(cfg.rules.tick.0)
    .with_sinks(&cfg.sink_specs())?;
    let mut sink_tasks: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> =
        Vec::new();
    let first_sink = usize::from(cfg.upstream.url.is_some());
    for (i, s) in cfg.sinks.iter().enumerate() {
        match s.kind {
            config::SinkKind::Http => {
                let sink = forward::sink::HttpSink::new(
                    &cfg,
                    s.clone(),
                    first_sink + i,
                    db.clone(),
                    metrics.clone(),
                    committed_rx.clone(),
                    ack_tx.clone(),
                    shutdown.clone(),
                )
                .map_err(anyhow::Error::msg)?;
                sink_tasks.push(Box::pin(sink.run()));
            }
            config::SinkKind::Mqtt => {
                // The [upstream] forwarder, on metrics of its own (shown as this sink's).
                let own = Arc::new(Metrics::default());
                metrics
                    .sinks
                    .lock()
                    .unwrap()
                    .push(admin::metrics::SinkInfo {
                        name: s.name.clone(),
                        kind: "mqtt",
                        topics: s.topics.clone(),
                        ..Default::default()
                    });
                metrics
                    .mqtt_sinks
                    .lock()
                    .unwrap()
                    .insert(s.name.clone(), own.clone());
                let fwd = forward::Forwarder::new(
                    s.upstream_config(),
                    cfg.gateway.id.clone(),
                    db.clone(),
                    own,
                    committed_rx.clone(),
                    ack_tx.clone(),
                    shutdown.clone(),
                )
                .map_err(|e| {
                    let key = format!("sink[{i}]");
                    anyhow::anyhow!(
                        "sink `{}`: {}",
                        s.name,
                        match &e {
                            forward::ForwardError::Tls(t) => forward::tls::error_for(t, &key),
                            other => other.to_string(),
                        }
                    )
                })?
                .with_named_sink(first_sink + i, i, s, metrics.clone())?;
                let span = tracing::info_span!("sink", name = %s.name);
                sink_tasks.push(Box::pin(tracing::Instrument::instrument(fwd.run(), span)));
            }
        }
    }
    let forwarder = forward::Forwarder::new(
        cfg.upstream.clone(),
        cfg.gateway.id.clone(),
        db.clone(),
        metrics.clone(),
        committed_rx,
        ack_tx,
        shutdown.clone(),
    )?
    .with_sink(0)?;
    let admin_listener = match cfg.admin.addr() {
        Some(a) => Some((
            admin::bind(a).await.map_err(anyhow::Error::msg)?,
            admin::Settings::from_config(&cfg.admin, a).map_err(anyhow::Error::msg)?,
        )),
        None => None,
    };

    // Sources. Each holds a sender; the commit loop ends once all are gone.
    let mut broker_task = None;
    let mut client_task = None;
    let mut retained_log = None;
    let local_out: Option<commands::Local>;
    let publisher: store::commit::Publisher = match cfg.ingest.mqtt.mode {
        MqttMode::Embedded => {
            let log = Arc::new(store::retained::RetainedLog::default());
            let acks = Arc::new(store::dedup::BrokerAckLog::default());
            let (kept, bad) = store::retained::load(&*db.db()?, event::now_ms())?;
            if bad > 0 {
                warn!(bad, "retained messages that could not be read were skipped");
            }
            let (broker, task) = broker::Broker::start(
                broker::Settings::from_config(&cfg.ingest.mqtt),
                Some(in_tx.clone()),
                metrics.clone(),
                Some(broker::StoreLinks {
                    retained: log.clone(),
                    kept,
                    acks: acks.clone(),
                }),
                shutdown.clone(),
            )
            .await?;
            broker_task = Some(task);
            retained_log = Some((log, acks));
            local_out = Some(commands::Local::Embedded(broker.clone()));
            Box::new(move |p: &rules::LocalPublish| {
                broker.publish_with(
                    &p.topic,
                    bytes::Bytes::from(p.payload.clone()),
                    broker::packet::Qos::AtLeastOnce,
                    false,
                    p.user_properties(),
                );
            })
        }
        MqttMode::Client => {
            let (task, client) = ingest::client::start(
                &cfg.ingest.mqtt,
                in_tx.clone(),
                metrics.clone(),
                shutdown.clone(),
                own.clone(),
            )
            .map_err(anyhow::Error::msg)?;
            client_task = Some(task);
            local_out = if cfg.commands.enabled {
                Some(commands::Local::Client(
                    commands::LocalClient::start(&cfg, own.clone(), shutdown.clone())
                        .map_err(anyhow::Error::msg)?,
                ))
            } else {
                None
            };
            let own = own.clone();
            Box::new(move |p: &rules::LocalPublish| {
                own.note(&p.topic, &p.payload);
                let r = client.try_publish(
                    p.topic.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    p.payload.clone(),
                );
                if let Err(e) = r {
                    warn!(topic = %p.topic, error = %e, "rule publish to the ingest broker failed");
                }
            })
        }
    };
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let mut commit_loop = commit_loop
        .with_publisher(publisher)
        .with_control(control_rx);
    if let Some((log, acks)) = retained_log {
        commit_loop = commit_loop.with_retained(log).with_broker_acks(acks);
    }
    let mut serial_out = std::collections::HashMap::new();
    let serial_tasks: Vec<_> = cfg
        .ingest
        .serial
        .iter()
        .map(|p| {
            let (out_tx, out_rx) = mpsc::unbounded_channel();
            serial_out.insert(p.name.clone(), (p.framing, out_tx));
            ingest::serial::start(
                p.clone(),
                in_tx.clone(),
                metrics.clone(),
                shutdown.clone(),
                out_rx,
            )
        })
        .collect();
    drop(in_tx);
    let commands_task = commands::start(
        &cfg,
        commands::Links {
            control: control_tx.clone(),
            store: db.clone(),
            local: local_out,
            serial: serial_out,
            metrics: metrics.clone(),
        },
        shutdown.clone(),
    )
    .map_err(anyhow::Error::msg)?;

    let store_thread = std::thread::Builder::new()
        .name("tidepool-store".into())
        .spawn(move || commit_loop.run())
        .context("spawning the store thread")?;
    let fwd = tokio::spawn(forwarder.run());
    let sink_tasks: Vec<_> = sink_tasks.into_iter().map(tokio::spawn).collect();
    let admin_task = admin_listener.map(|(l, settings)| {
        tokio::spawn(admin::serve(
            l,
            admin::StatusSource {
                gateway: cfg.gateway.id.clone(),
                metrics: metrics.clone(),
                db: Some(db.clone()),
                control: Some(control_tx),
                settings,
            },
            shutdown.clone(),
        ))
    });
    let watchdog = systemd::spawn_watchdog(metrics.heartbeat.clone());
    systemd::notify(&format!("READY=1\nSTATUS=gateway {} ready", cfg.gateway.id));
    info!(
        gateway = %cfg.gateway.id,
        store = %path.display(),
        mode = ?cfg.ingest.mqtt.mode,
        upstream = cfg.upstream.url.as_deref().unwrap_or("(none)"),
        "tidepool ready"
    );

    let mut sd = shutdown.clone();
    let m = metrics.clone();
    let done = tokio::spawn(async move {
        sd.wait().await;
        systemd::notify("STOPPING=1");
        info!("shutting down: stopping ingest, committing what is in hand");
        // Bounded: sources first, then the forwarder, then the store drains and stops.
        let deadline = Duration::from_secs(10);
        let stop = async {
            // Commands first: a delivery under way finishes while its port is still open.
            if let Some(t) = commands_task {
                let _ = t.await;
            }
            if let Some(t) = client_task {
                let _ = t.await;
            }
            for t in serial_tasks {
                let _ = t.await;
            }
            if let Some(t) = broker_task {
                let _ = t.await;
            }
            let _ = fwd.await;
            for t in sink_tasks {
                let _ = t.await;
            }
            let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
        };
        if tokio::time::timeout(deadline, stop).await.is_err() {
            warn!("shutdown took longer than {deadline:?}; exiting anyway (uncommitted events are lost, committed ones are safe)");
        }
        if let Some(a) = admin_task {
            a.abort();
        }
        if let Some(w) = watchdog {
            w.abort();
        }
        info!(
            committed = m.committed.load(std::sync::atomic::Ordering::Relaxed),
            backlog = m.backlog_events.load(std::sync::atomic::Ordering::Relaxed),
            "stopped"
        );
        Ok(())
    });
    Ok(Running { metrics, done })
}

/// Runs the gateway until `shutdown` fires, then stops in order (see [`start`]).
pub async fn run(cfg: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let running = start(cfg, shutdown).await?;
    running.done.await.context("gateway task")?
}
