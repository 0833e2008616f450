//! Serial ports (tokio-serial): `lines` or `cobs` framing, reconnect with backoff, acks.
//!
//! A port missing at start or gone at run time is retried with backoff and logged once per
//! state change, never fatal. A bad frame (bad JSON, bad COBS, bad UTF-8, unknown version,
//! oversize) is handed to the commit loop as a dead letter with its raw bytes, counted once
//! (`dropped{reason="bad_frame"|"oversize"}`), and reading resumes at the next delimiter.
//! With `ack = true`, a frame that carries a sequence number is answered with an ack frame
//! once its event is committed (see `tidepool_proto` for the protocol).

pub mod framing;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_serial::SerialPortBuilderExt;
use tracing::{info, warn};

use super::{Incoming, IngestTx};
use crate::admin::metrics::{DropReason, Metrics};
use crate::config::{Framing, SerialConfig};
use crate::event::{Event, Payload};
use crate::shutdown::Shutdown;
use framing::{decode_cobs, decode_line, encode_ack, Chunk, Deframer};

/// Starts reading one port; the task ends at shutdown.
pub fn start(
    cfg: SerialConfig,
    tx: IngestTx,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let source = format!("serial:{}", cfg.name);
        let topic = cfg
            .topic
            .clone()
            .unwrap_or_else(|| format!("serial/{}", cfg.name));
        let cobs = cfg.framing == Framing::Cobs;
        let mut deframer = Deframer::new(if cobs { 0 } else { b'\n' }, cfg.max_frame.0 as usize);
        let mut open: Option<bool> = None;
        let mut failures: u32 = 0;
        let mut buf = vec![0u8; 4096];
        let mut chunks = Vec::new();
        while !shutdown.is_set() {
            let port = tokio_serial::new(cfg.path.to_string_lossy(), cfg.baud)
                .timeout(Duration::from_millis(100))
                .open_native_async();
            match port {
                Ok(port) => {
                    if open != Some(true) {
                        info!(port = %cfg.name, path = %cfg.path.display(), baud = cfg.baud, "serial port open");
                    }
                    failures = 0;
                    deframer.reset();
                    let (mut rd, mut wr) = tokio::io::split(port);
                    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<u64>();
                    let writer = tokio::spawn(async move {
                        while let Some(seq) = ack_rx.recv().await {
                            if wr.write_all(&encode_ack(cobs, seq)).await.is_err() {
                                return;
                            }
                        }
                    });
                    loop {
                        let n = tokio::select! {
                            r = rd.read(&mut buf) => match r {
                                Ok(0) => break,
                                Ok(n) => n,
                                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
                                Err(_) => break,
                            },
                            _ = shutdown.wait() => { writer.abort(); return; }
                        };
                        deframer.push(&buf[..n], &mut chunks);
                        for c in chunks.drain(..) {
                            let m = incoming(c, cobs, &source, &topic, cfg.ack, &ack_tx);
                            if let Some(m) = m {
                                metrics.ingested(&source, 1);
                                if tx.send(m).await.is_err() {
                                    writer.abort();
                                    return;
                                }
                            }
                        }
                    }
                    writer.abort();
                    warn!(port = %cfg.name, path = %cfg.path.display(), "serial port closed; retrying");
                    open = Some(false);
                }
                Err(e) => {
                    if open != Some(false) {
                        warn!(port = %cfg.name, path = %cfg.path.display(), error = %e, "cannot open serial port; retrying");
                    }
                    open = Some(false);
                    failures = failures.saturating_add(1);
                }
            }
            let wait = Duration::from_millis((100u64 << failures.min(6)).min(5_000));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait() => return,
            }
        }
    })
}

/// One chunk of the stream as what goes to the commit loop (`None`: a blank line).
fn incoming(
    c: Chunk,
    cobs: bool,
    source: &str,
    topic: &str,
    ack: bool,
    ack_tx: &mpsc::UnboundedSender<u64>,
) -> Option<Incoming> {
    let bad = |raw: Vec<u8>, reason: DropReason, why: String| {
        let mut m = Incoming::plain(Event::new(source, topic, Payload::Bytes(raw)));
        m.bad = Some((reason, why));
        Some(m)
    };
    match c {
        Chunk::Oversize(raw) => {
            let n = raw.len();
            bad(
                raw,
                DropReason::Oversize,
                format!("frame longer than max_frame ({n} bytes)"),
            )
        }
        Chunk::Frame(raw) => {
            let decoded = if cobs {
                decode_cobs(&raw).map(Some)
            } else {
                decode_line(&raw)
            };
            match decoded {
                Ok(None) => None,
                Ok(Some(d)) => {
                    let mut e = Event::new(
                        source,
                        d.topic.unwrap_or_else(|| topic.to_string()),
                        Payload::Json(d.payload.to_string()),
                    );
                    if let Some(ts) = d.ts {
                        e.ts = ts;
                    }
                    let mut m = Incoming::plain(e);
                    if let (true, Some(seq)) = (ack, d.seq) {
                        let tx = ack_tx.clone();
                        m.ack = Some(Box::new(move || {
                            let _ = tx.send(seq);
                        }));
                    }
                    Some(m)
                }
                Err(why) => bad(raw, DropReason::BadFrame, why.to_string()),
            }
        }
    }
}
