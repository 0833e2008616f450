//! Serial ports (tokio-serial): `lines` or `cobs` framing, reconnect with backoff, acks.
//!
//! A port missing at start or gone at run time is retried with backoff and logged once per
//! state change, never fatal. A bad frame (bad JSON, bad COBS, bad UTF-8, unknown version,
//! oversize) is handed to the commit loop as a dead letter with its raw bytes, counted once
//! (`dropped{reason="bad_frame"|"oversize"}`), and reading resumes at the next delimiter.
//! With `ack = true`, a frame that carries a sequence number is answered with an ack frame
//! once its event is committed (see `tidepool_proto` for the protocol), and the store
//! recognises a resend of a committed frame by (port, device, seq) and the frame's bytes
//! (`store::dedup`): it is acknowledged again, not stored twice.
//!
//! Acks belong to the port, not to one opening of it: the commit loop's acks go to the port's
//! task, which writes them on whichever connection is open ([`AckRoute`]). An ack for a frame
//! of an earlier connection (the cable was pulled and plugged back while the frame was being
//! committed) waits until the same device is heard on the new connection, so it never reaches
//! another device that was plugged in meanwhile; until then the device's own resend is
//! recognised and acknowledged anyway.

pub mod framing;

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_serial::SerialPortBuilderExt;
use tracing::{info, warn};

use super::{stable_hash, Incoming, IngestTx};
use crate::admin::metrics::{DropReason, Metrics};
use crate::config::{Framing, SerialConfig};
use crate::event::{Event, Payload};
use crate::ingest::Dedup;
use crate::shutdown::Shutdown;
use crate::store::dedup::SerialKey;
use framing::{decode_cobs, decode_line, encode_ack, Chunk, Deframer};

/// Bytes for a port from elsewhere in the gateway (a command from the cloud), written whole on
/// the open connection; `done` says whether they were written, or why not (the port is not
/// open, the write failed).
#[derive(Debug)]
pub struct PortOut {
    /// Framed bytes.
    pub bytes: Vec<u8>,
    /// The outcome.
    pub done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// What a connection's writer task writes.
enum Write {
    Ack(u64),
    Out(PortOut),
}

/// Starts reading one port; the task ends at shutdown. `out`: bytes to write to the port.
pub fn start(
    cfg: SerialConfig,
    tx: IngestTx,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
    mut out: mpsc::UnboundedReceiver<PortOut>,
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
        // Acks from the commit loop, for frames of any connection of this port.
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<PortAck>();
        let mut route = AckRoute::default();
        let mut conn: u64 = 0;
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
                    conn += 1;
                    route.opened(conn);
                    let (mut rd, mut wr) = tokio::io::split(port);
                    let (write_tx, mut write_rx) = mpsc::unbounded_channel::<Write>();
                    let writer = tokio::spawn(async move {
                        while let Some(w) = write_rx.recv().await {
                            let (bytes, done) = match w {
                                Write::Ack(seq) => (encode_ack(cobs, seq), None),
                                // Its sender gave up waiting (and may try again): not written
                                // late, so the device does not get it twice.
                                Write::Out(o) if o.done.is_closed() => continue,
                                Write::Out(o) => (o.bytes, Some(o.done)),
                            };
                            let r = wr.write_all(&bytes).await;
                            let failed = r.is_err();
                            if let Some(done) = done {
                                let _ = done.send(r.map_err(|e| format!("write failed: {e}")));
                            }
                            if failed {
                                return;
                            }
                        }
                    });
                    let mut writer = writer;
                    let acks = cfg.ack.then_some(AckTo {
                        port: &cfg.name,
                        conn,
                        tx: &ack_tx,
                    });
                    loop {
                        let n = tokio::select! {
                            r = rd.read(&mut buf) => match r {
                                Ok(0) => break,
                                Ok(n) => n,
                                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
                                Err(_) => break,
                            },
                            Some(a) = ack_rx.recv() => {
                                if let Some(seq) = route.ack(a.conn, &a.device, a.seq) {
                                    let _ = write_tx.send(Write::Ack(seq));
                                }
                                continue;
                            }
                            Some(o) = out.recv() => {
                                if let Err(mpsc::error::SendError(Write::Out(o))) = write_tx.send(Write::Out(o)) {
                                    let _ = o.done.send(Err("the port closed".into()));
                                }
                                continue;
                            }
                            _ = shutdown.wait() => { writer.abort(); return; }
                            // A write failed: the port is gone; open it again.
                            _ = &mut writer => break,
                        };
                        deframer.push(&buf[..n], &mut chunks);
                        for c in chunks.drain(..) {
                            let m = incoming(c, cobs, &source, &topic, acks.as_ref());
                            if let Some(m) = m {
                                if let Some(Dedup::Serial(k)) = &m.dedup {
                                    for seq in route.heard(&k.device) {
                                        let _ = write_tx.send(Write::Ack(seq));
                                    }
                                }
                                metrics.ingested(&source, 1);
                                if tx.send(m).await.is_err() {
                                    writer.abort();
                                    return;
                                }
                            }
                        }
                    }
                    route.closed();
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
            let until = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    Some(o) = out.recv() => {
                        let _ = o.done.send(Err(format!("serial port {} is not open", cfg.name)));
                    }
                    _ = shutdown.wait() => return,
                }
            }
        }
    })
}

/// A committed frame's ack, on its way back to the port.
#[derive(Debug)]
struct PortAck {
    conn: u64,
    device: String,
    seq: u64,
}

/// Where a reliable port's acks go (`ack = true`).
struct AckTo<'a> {
    port: &'a str,
    conn: u64,
    tx: &'a mpsc::UnboundedSender<PortAck>,
}

/// Acks waiting for their device to be heard on a new connection, at most.
const MAX_HELD_ACKS: usize = 4096;

/// Routes acks to the port's current connection. Pure state.
#[derive(Debug, Default)]
pub struct AckRoute {
    current: Option<u64>,
    heard: HashSet<String>,
    held: VecDeque<(String, u64)>,
}

impl AckRoute {
    /// Connection `conn` is open; nothing heard on it yet.
    pub fn opened(&mut self, conn: u64) {
        self.current = Some(conn);
        self.heard.clear();
    }

    /// The port closed.
    pub fn closed(&mut self) {
        self.current = None;
    }

    /// The ack for `seq` of `device`, whose frame came on `conn`: the seq to write now, or
    /// `None` when it waits (its connection is gone and the device is not heard on this one
    /// yet). Past [`MAX_HELD_ACKS`] the oldest is forgotten: the device resends that frame,
    /// the store recognises it, and its ack comes again.
    pub fn ack(&mut self, conn: u64, device: &str, seq: u64) -> Option<u64> {
        match self.current {
            Some(c) if c == conn || self.heard.contains(device) => Some(seq),
            _ => {
                if self.held.len() >= MAX_HELD_ACKS {
                    self.held.pop_front();
                }
                self.held.push_back((device.to_string(), seq));
                None
            }
        }
    }

    /// A frame of `device` arrived on the current connection: the held acks it can have now.
    pub fn heard(&mut self, device: &str) -> Vec<u64> {
        if self.current.is_none() || self.heard.contains(device) {
            return Vec::new();
        }
        self.heard.insert(device.to_string());
        let mut out = Vec::new();
        self.held.retain(|(d, seq)| {
            let mine = d == device;
            if mine {
                out.push(*seq);
            }
            !mine
        });
        out
    }
}

/// One chunk of the stream as what goes to the commit loop (`None`: a blank line).
fn incoming(
    c: Chunk,
    cobs: bool,
    source: &str,
    topic: &str,
    acks: Option<&AckTo>,
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
                    if let (Some(to), Some(seq)) = (acks, d.seq) {
                        let device = d.device.unwrap_or_default();
                        m.dedup = Some(Dedup::Serial(SerialKey {
                            port: to.port.to_string(),
                            device: device.clone(),
                            seq,
                            hash: stable_hash(&[&raw]),
                        }));
                        let (tx, conn) = (to.tx.clone(), to.conn);
                        m.ack = Some(Box::new(move |_| {
                            let _ = tx.send(PortAck { conn, device, seq });
                        }));
                    }
                    Some(m)
                }
                Err(why) => bad(raw, DropReason::BadFrame, why.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn acks_of_the_current_connection_go_out_at_once() {
        let mut r = AckRoute::default();
        r.opened(1);
        assert_eq!(r.ack(1, "d1", 7), Some(7));
    }

    #[test]
    fn acks_of_a_replaced_connection_wait_for_their_device() {
        let mut r = AckRoute::default();
        r.opened(1);
        r.closed();
        // Committed while the cable was out: held.
        assert_eq!(r.ack(1, "d1", 7), None);
        r.opened(2);
        assert_eq!(
            r.ack(1, "d1", 8),
            None,
            "d1 not heard on the new connection yet"
        );
        assert_eq!(r.ack(1, "d2", 3), None);
        assert_eq!(r.heard("d1"), vec![7, 8], "d1 is back: its acks go out");
        assert_eq!(r.heard("d1"), Vec::<u64>::new(), "once");
        assert_eq!(r.ack(1, "d1", 9), Some(9), "d1 is on this connection now");
        assert_eq!(r.heard("d2"), vec![3]);
        // Another replug: held again until heard.
        r.closed();
        r.opened(3);
        assert_eq!(r.ack(2, "d1", 10), None);
        assert_eq!(r.heard("d1"), vec![10]);
    }

    #[test]
    fn held_acks_are_bounded() {
        let mut r = AckRoute::default();
        r.opened(1);
        r.closed();
        for seq in 0..(MAX_HELD_ACKS as u64 + 10) {
            r.ack(1, "d", seq);
        }
        r.opened(2);
        let out = r.heard("d");
        assert_eq!(out.len(), MAX_HELD_ACKS);
        assert_eq!(out[0], 10, "the oldest were forgotten");
    }

    // -- hostile input on the ack path -------------------------------------------------------

    /// What a device sends on a reliable port.
    #[derive(Debug, Clone)]
    enum Sent {
        /// A good frame of `device` with `seq`.
        Frame(u8, u32),
        /// Bytes without a delimiter, then one: a bad frame (or, by chance, a good one).
        Garbage(Vec<u8>),
        /// More than `max_frame` bytes, then a delimiter.
        Oversize(usize),
        /// An empty frame (a blank line in `lines`).
        Blank,
    }

    fn sent() -> impl Strategy<Value = Sent> {
        prop_oneof![
            4 => (0u8..3, any::<u32>()).prop_map(|(d, s)| Sent::Frame(d, s)),
            2 => proptest::collection::vec(1u8.., 0..40).prop_map(Sent::Garbage),
            1 => (65usize..200).prop_map(Sent::Oversize),
            1 => Just(Sent::Blank),
        ]
    }

    fn good_frame(cobs: bool, device: &str, seq: u32) -> Vec<u8> {
        if cobs {
            let rs = [tidepool_proto::Reading {
                name: "celsius",
                value: 21.5,
            }];
            let f = tidepool_proto::Frame::new(device, seq, tidepool_proto::Body::Readings(&rs));
            postcard::to_stdvec_cobs(&f).unwrap()
        } else {
            format!("{{\"device\":\"{device}\",\"seq\":{seq},\"celsius\":21.5}}\n").into_bytes()
        }
    }

    proptest! {
        #![proptest_config(crate::fuzz::cases(500))]

        /// A reliable port (`ack = true`) fed good frames, garbage, oversize frames and blank
        /// ones, cut into random pieces: no panic; each bad frame goes to the commit loop with
        /// its reason and raw bytes and no ack; each good frame with its (port, device, seq)
        /// for redelivery detection and an ack that, once committed, goes back on its
        /// connection with its device and seq; the good frames' acks come in the order sent.
        #[test]
        fn fuzz_reliable_port_acks_every_good_frame_and_counts_every_bad_one(
            cobs in any::<bool>(),
            items in proptest::collection::vec(sent(), 1..30),
            piece in 1usize..64,
        ) {
            let delim = if cobs { 0u8 } else { b'\n' };
            let mut stream = Vec::new();
            let mut want = Vec::new();
            for it in &items {
                match it {
                    Sent::Frame(d, seq) => {
                        stream.extend(good_frame(cobs, &format!("dev-{d}"), *seq));
                        want.push((format!("dev-{d}"), u64::from(*seq)));
                    }
                    Sent::Garbage(g) => {
                        // Lines: a leading 0xFF is never UTF-8. COBS: no 0x00 inside.
                        if !cobs {
                            stream.push(0xFF);
                        }
                        stream.extend(g.iter().filter(|b| **b != delim));
                        stream.push(delim);
                    }
                    Sent::Oversize(n) => {
                        stream.extend(std::iter::repeat_n(b'x', *n));
                        stream.push(delim);
                    }
                    Sent::Blank => stream.push(delim),
                }
            }
            let (tx, mut rx) = mpsc::unbounded_channel();
            let to = AckTo { port: "p", conn: 7, tx: &tx };
            let mut d = Deframer::new(delim, 64);
            let mut chunks = Vec::new();
            for p in stream.chunks(piece) {
                d.push(p, &mut chunks);
            }
            let mut acked = Vec::new();
            for c in chunks {
                let (raw, oversize) = match &c {
                    Chunk::Frame(f) => (f.clone(), false),
                    Chunk::Oversize(f) => (f.clone(), true),
                };
                let Some(m) = incoming(c, cobs, "serial:p", "serial/p", Some(&to)) else {
                    prop_assert!(!cobs && raw.is_empty(), "only a blank line is skipped");
                    continue;
                };
                match m.bad {
                    Some((reason, why)) => {
                        prop_assert_eq!(reason, if oversize { DropReason::Oversize } else { DropReason::BadFrame });
                        prop_assert!(!why.is_empty());
                        prop_assert_eq!(&m.event.payload, &Payload::Bytes(raw));
                        prop_assert!(m.ack.is_none() && m.dedup.is_none(), "a bad frame is not acked");
                    }
                    None => {
                        prop_assert!(!oversize);
                        let Some(Dedup::Serial(key)) = &m.dedup else {
                            return Err(TestCaseError::fail("a good frame without its key"));
                        };
                        prop_assert_eq!(key.port.as_str(), "p");
                        prop_assert_eq!(key.hash, stable_hash(&[&raw]));
                        let (device, seq) = (key.device.clone(), key.seq);
                        (m.ack.expect("a frame with a seq is acked"))(crate::ingest::Taken::Stored);
                        let a = rx.try_recv().expect("the ack goes to the port");
                        prop_assert_eq!((a.conn, &a.device, a.seq), (7, &device, seq));
                        acked.push((device, seq));
                    }
                }
            }
            // Every good frame acked, in order (garbage may by chance be a good frame too).
            let mut it = acked.iter();
            for w in &want {
                prop_assert!(it.any(|a| a == w), "frame {:?} not acked", w);
            }
        }

        /// The ack route under random opens, closes, commits of frames from this and earlier
        /// connections, and devices heard: no panic; an ack is written only while a connection
        /// is open, only on the connection its frame came on or one its device has been heard
        /// on, each at most once; none is lost (below the bound of held acks).
        #[test]
        fn fuzz_ack_route_never_sends_to_the_wrong_connection_or_twice(
            ops in proptest::collection::vec((0u8..4, 0u8..3, any::<prop::sample::Index>()), 0..120),
        ) {
            let mut r = AckRoute::default();
            let mut conn: Option<u64> = None;
            let mut conns = 0u64;
            let mut heard: HashSet<u8> = HashSet::new();
            let mut committed: Vec<(u8, u64)> = Vec::new(); // device, seq, in commit order
            let mut written: Vec<(u8, u64)> = Vec::new();
            let mut next_seq = 0u64;
            let write = |written: &mut Vec<(u8, u64)>, conn: Option<u64>, dev: u8, seq: u64| -> Result<(), TestCaseError> {
                prop_assert!(conn.is_some(), "written with no connection open");
                prop_assert!(!written.contains(&(dev, seq)), "ack {} written twice", seq);
                written.push((dev, seq));
                Ok(())
            };
            for (op, dev, from) in ops {
                let name = format!("dev-{dev}");
                match op {
                    0 => {
                        conns += 1;
                        conn = Some(conns);
                        heard.clear();
                        r.opened(conns);
                    }
                    1 => {
                        conn = None;
                        r.closed();
                    }
                    2 => {
                        // A frame of `dev` that came on this or an earlier connection commits.
                        if conns == 0 {
                            continue;
                        }
                        let on = 1 + from.index(conns as usize) as u64;
                        next_seq += 1;
                        committed.push((dev, next_seq));
                        let now = r.ack(on, &name, next_seq);
                        let may = conn.is_some() && (conn == Some(on) || heard.contains(&dev));
                        prop_assert_eq!(now.is_some(), may);
                        if let Some(seq) = now {
                            prop_assert_eq!(seq, next_seq);
                            write(&mut written, conn, dev, seq)?;
                        }
                    }
                    _ => {
                        let out = r.heard(&name);
                        if conn.is_some() {
                            heard.insert(dev);
                        } else {
                            prop_assert!(out.is_empty());
                        }
                        for seq in out {
                            prop_assert!(committed.contains(&(dev, seq)), "ack {} is not {}'s", seq, name);
                            write(&mut written, conn, dev, seq)?;
                        }
                    }
                }
            }
            // With every device heard once more on an open connection, every committed ack
            // has gone (an older connection's may go after a newer one's: the device matches
            // acks by seq).
            if conn.is_none() {
                conns += 1;
                r.opened(conns);
                conn = Some(conns);
            }
            for dev in 0u8..3 {
                for seq in r.heard(&format!("dev-{dev}")) {
                    write(&mut written, conn, dev, seq)?;
                }
            }
            written.sort_unstable_by_key(|w| w.1);
            prop_assert_eq!(written, committed, "lost or extra acks");
        }
    }
}
