//! A hostile network on loopback: a TCP proxy that delays, cuts, blackholes, throttles and
//! flaps the connections through it, on command or on a seeded schedule.
//!
//! The side that connects to the proxy (the gateway) is the one under test; the other side is
//! a broker. The faults:
//! - **pass**: bytes go through as they come.
//! - **delay**: each chunk is held for a latency before it is written (both directions).
//! - **throttle**: each direction of each connection is held to a rate (bytes a second).
//! - **cut**: every open connection is closed on both sides, mid-stream: toward the broker
//!   a random few bytes more go first, so the cut lands inside a packet. While a cut lasts,
//!   new connections are accepted and closed at once.
//! - **blackhole**: every open connection, and each new one, goes silent for good: what
//!   either side sends is swallowed, and the client is sent nothing (no data, no FIN, no RST),
//!   like a path whose NAT entry is gone. Only the client's own timeouts find it out; when it
//!   gives up and closes, its side is released. New connections after the blackhole pass.
//! - **flap**: a cut, a short pass, a cut again, and so on, for as long as it lasts.
//!
//! Every thread it starts checks a stop flag at least every 50 ms; [`FaultProxy::stop`]
//! (and dropping it) closes every socket and joins them all.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One state of the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Bytes go through.
    Pass,
    /// Every chunk is held this long.
    Delay(Duration),
    /// Each direction of a connection gets at most this many bytes a second.
    Throttle(u64),
    /// Open connections are closed (mid-stream) and new ones refused.
    Cut,
    /// Open and new connections are swallowed for good.
    Blackhole,
    /// Cut, pass briefly, cut again, repeatedly.
    Flap,
}

impl Fault {
    /// A short name for reports: `pass`, `delay`, `throttle`, `cut`, `blackhole`, `flap`.
    pub fn name(&self) -> &'static str {
        match self {
            Fault::Pass => "pass",
            Fault::Delay(_) => "delay",
            Fault::Throttle(_) => "throttle",
            Fault::Cut => "cut",
            Fault::Blackhole => "blackhole",
            Fault::Flap => "flap",
        }
    }

    /// Parses `pass`, `delay:MS`, `throttle:BYTES_PER_S`, `cut`, `blackhole`, `flap`.
    pub fn parse(s: &str) -> Option<Fault> {
        let (name, arg) = s.split_once(':').unwrap_or((s, ""));
        let num = || arg.parse::<u64>().ok();
        Some(match name {
            "pass" => Fault::Pass,
            "delay" => Fault::Delay(Duration::from_millis(num()?)),
            "throttle" => Fault::Throttle(num()?),
            "cut" => Fault::Cut,
            "blackhole" => Fault::Blackhole,
            "flap" => Fault::Flap,
            _ => return None,
        })
    }
}

/// A seeded random sequence of faults, each with how long it lasts.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The seed it was made from.
    pub seed: u64,
    /// The steps, in order.
    pub steps: Vec<(Fault, Duration)>,
}

impl Schedule {
    /// The seed: `env_var` when set (to replay a failure), else a fresh random one. Printed,
    /// so a failing run can be replayed.
    pub fn seed_from_env(env_var: &str) -> u64 {
        let seed = std::env::var(env_var)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        eprintln!("fault schedule seed {seed} (replay with {env_var}={seed})");
        seed
    }

    /// Random steps until `total` is covered and every fault kind came at least once (in a
    /// random order, then at random), a pass between faults; faults last `fault_len`, passes
    /// `pass_len` (random within each range). Throttles are 4–16 KB/s, delays 50–400 ms.
    pub fn random(
        seed: u64,
        total: Duration,
        fault_len: (Duration, Duration),
        pass_len: (Duration, Duration),
    ) -> Schedule {
        let mut rng = fastrand::Rng::with_seed(seed);
        let len = |rng: &mut fastrand::Rng, (lo, hi): (Duration, Duration)| {
            lo + (hi.saturating_sub(lo)).mul_f64(rng.f64())
        };
        let mut kinds = vec![0u8, 1, 2, 3, 4];
        rng.shuffle(&mut kinds);
        let mut steps = Vec::new();
        let mut at = Duration::ZERO;
        let mut i = 0;
        while at < total || i < kinds.len() {
            let kind = kinds.get(i).copied().unwrap_or_else(|| rng.u8(0..5));
            i += 1;
            let fault = match kind {
                0 => Fault::Delay(Duration::from_millis(rng.u64(50..=400))),
                1 => Fault::Throttle(rng.u64(4_000..=16_000)),
                2 => Fault::Cut,
                3 => Fault::Blackhole,
                _ => Fault::Flap,
            };
            let d = len(&mut rng, fault_len);
            let p = len(&mut rng, pass_len);
            steps.push((fault, d));
            steps.push((Fault::Pass, p));
            at += d + p;
        }
        Schedule { seed, steps }
    }

    /// The whole length.
    pub fn total(&self) -> Duration {
        self.steps.iter().map(|s| s.1).sum()
    }
}

/// One connection through the proxy.
struct Link {
    client: TcpStream,
    broker: Option<TcpStream>,
    /// Swallowed for good.
    black: AtomicBool,
    /// Bytes toward the broker still allowed before the cut (negative: no cut pending).
    cut_after: AtomicI64,
    closed: AtomicBool,
}

impl Link {
    fn close(&self) {
        self.closed.store(true, SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        if let Some(b) = &self.broker {
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

/// Shared between the proxy's threads.
struct Inner {
    target: u16,
    fault: Mutex<Fault>,
    stop: AtomicBool,
    links: Mutex<Vec<Arc<Link>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Bytes delivered toward the broker and toward the client.
    to_broker: AtomicU64,
    to_client: AtomicU64,
    /// Connections accepted.
    accepted: AtomicU64,
    /// When each state began, in order.
    timeline: Mutex<Vec<(Instant, Fault)>>,
}

impl Inner {
    fn fault(&self) -> Fault {
        *self.fault.lock().unwrap()
    }

    fn spawn(self: &Arc<Self>, f: impl FnOnce(Arc<Inner>) + Send + 'static) {
        let me = self.clone();
        let h = std::thread::spawn(move || f(me));
        let mut threads = self.threads.lock().unwrap();
        threads.retain(|t| !t.is_finished());
        threads.push(h);
    }

    /// Switches to `fault`; a flap cuts every 0.3–1 s until the next switch.
    fn switch(self: &Arc<Self>, fault: Fault) {
        self.set(fault);
        if fault == Fault::Flap {
            let mark = self.timeline.lock().unwrap().len();
            let current = move |me: &Inner| me.timeline.lock().unwrap().len() == mark;
            self.spawn(move |me| {
                while !me.stop.load(SeqCst) && current(&me) {
                    let until = Instant::now() + Duration::from_millis(fastrand::u64(300..1000));
                    while Instant::now() < until && !me.stop.load(SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if current(&me) && !me.stop.load(SeqCst) {
                        me.cut_all();
                    }
                }
            });
        }
    }

    /// Switches to `fault`, acting on open connections at once.
    fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
        self.timeline.lock().unwrap().push((Instant::now(), fault));
        match fault {
            Fault::Blackhole => {
                for l in self.links.lock().unwrap().iter() {
                    l.black.store(true, SeqCst);
                }
            }
            Fault::Cut | Fault::Flap => self.cut_all(),
            _ => {}
        }
    }

    /// Cuts every open connection; toward the broker a few more bytes go first (up to 300 ms).
    /// Swallowed links are left alone: nothing reaches their client, not even a close.
    fn cut_all(&self) {
        let links: Vec<Arc<Link>> = {
            let mut all = self.links.lock().unwrap();
            all.retain(|l| !l.closed.load(SeqCst));
            let (black, open) = all.drain(..).partition(|l| l.black.load(SeqCst));
            *all = black;
            open
        };
        for l in &links {
            l.cut_after.store(fastrand::i64(1..2048), SeqCst);
        }
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until && links.iter().any(|l| !l.closed.load(SeqCst)) {
            std::thread::sleep(Duration::from_millis(5));
        }
        for l in &links {
            l.close();
        }
    }

    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        while !self.stop.load(SeqCst) {
            let inbound = match listener.accept() {
                Ok((s, _)) => s,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            };
            self.accepted.fetch_add(1, SeqCst);
            let _ = inbound.set_nonblocking(false);
            let _ = inbound.set_nodelay(true);
            let fault = self.fault();
            if fault == Fault::Cut {
                let _ = inbound.shutdown(Shutdown::Both);
                continue;
            }
            let black = fault == Fault::Blackhole;
            let broker = if black {
                None
            } else {
                match TcpStream::connect(("127.0.0.1", self.target)) {
                    Ok(b) => {
                        let _ = b.set_nodelay(true);
                        Some(b)
                    }
                    Err(_) => {
                        let _ = inbound.shutdown(Shutdown::Both);
                        continue;
                    }
                }
            };
            let link = Arc::new(Link {
                client: inbound,
                broker,
                black: AtomicBool::new(black),
                cut_after: AtomicI64::new(-1),
                closed: AtomicBool::new(false),
            });
            {
                let mut links = self.links.lock().unwrap();
                links.retain(|l| !l.closed.load(SeqCst));
                links.push(link.clone());
            }
            for toward_broker in [true, false] {
                let l = link.clone();
                self.spawn(move |me| me.pump(l, toward_broker));
            }
        }
    }

    /// One direction of one link: a reader here, a writer on a thread of its own (so a delay
    /// is latency, not a rate).
    fn pump(self: Arc<Self>, link: Arc<Link>, toward_broker: bool) {
        let Some(broker) = &link.broker else {
            // Swallowed from the start: there is no broker side.
            if toward_broker {
                self.swallow(&link);
            }
            return;
        };
        let pair = if toward_broker {
            (link.client.try_clone(), broker.try_clone())
        } else {
            (broker.try_clone(), link.client.try_clone())
        };
        let (Ok(mut from), Ok(to)) = pair else {
            return link.close();
        };
        let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
        let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
        let me = self.clone();
        let l = link.clone();
        let writer = std::thread::spawn(move || me.write_loop(l, to, rx, toward_broker));
        let mut buf = vec![0u8; 16 * 1024];
        while !self.stop.load(SeqCst) && !link.closed.load(SeqCst) {
            match from.read(&mut buf) {
                Ok(0) => {
                    self.on_eof(&link, toward_broker);
                    break;
                }
                Ok(n) => {
                    if link.black.load(SeqCst) {
                        continue;
                    }
                    let delay = match self.fault() {
                        Fault::Delay(d) => d,
                        _ => Duration::ZERO,
                    };
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => {
                    self.on_eof(&link, toward_broker);
                    break;
                }
            }
        }
        drop(tx);
        let _ = writer.join();
    }

    /// A side closed: the client's close releases both sides; the broker's is passed on
    /// unless the link is swallowed (then the client hears nothing).
    fn on_eof(&self, link: &Link, toward_broker: bool) {
        if toward_broker || !link.black.load(SeqCst) {
            link.close();
        }
    }

    /// A link swallowed from the start: reads the client and drops it all, until it closes.
    fn swallow(&self, link: &Link) {
        let Ok(mut from) = link.client.try_clone() else {
            return link.close();
        };
        let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
        let mut buf = vec![0u8; 16 * 1024];
        while !self.stop.load(SeqCst) && !link.closed.load(SeqCst) {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        link.close();
    }

    fn write_loop(
        &self,
        link: Arc<Link>,
        mut to: TcpStream,
        rx: mpsc::Receiver<(Instant, Vec<u8>)>,
        toward_broker: bool,
    ) {
        let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
        while !self.stop.load(SeqCst) && !link.closed.load(SeqCst) {
            if queue.is_empty() {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(c) => queue.push_back(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(c) = rx.try_recv() {
                queue.push_back(c);
            }
            let (due, _) = queue.front().unwrap();
            let now = Instant::now();
            if *due > now {
                std::thread::sleep((*due - now).min(Duration::from_millis(50)));
                continue;
            }
            let (_, mut chunk) = queue.pop_front().unwrap();
            if link.black.load(SeqCst) {
                queue.clear();
                continue;
            }
            // A cut pending: this many more bytes toward the broker, then close.
            let budget = link.cut_after.load(SeqCst);
            if budget >= 0 {
                if toward_broker {
                    chunk.truncate(budget as usize);
                    let _ = to.write_all(&chunk);
                }
                link.close();
                return;
            }
            if self.write_paced(&link, &mut to, &chunk).is_err() {
                link.close();
                return;
            }
            let counter = if toward_broker {
                &self.to_broker
            } else {
                &self.to_client
            };
            counter.fetch_add(chunk.len() as u64, SeqCst);
        }
    }

    /// Writes `chunk`, in slices a throttle allows (re-read per slice, so a throttle that
    /// ends mid-chunk speeds up at once).
    fn write_paced(&self, link: &Link, to: &mut TcpStream, chunk: &[u8]) -> std::io::Result<()> {
        let mut rest = chunk;
        while !rest.is_empty() {
            if self.stop.load(SeqCst) || link.closed.load(SeqCst) {
                return Err(ErrorKind::BrokenPipe.into());
            }
            if link.black.load(SeqCst) {
                return Ok(());
            }
            match self.fault() {
                Fault::Throttle(rate) => {
                    // 20 slices a second.
                    let slice = ((rate / 20).max(1) as usize).min(rest.len());
                    to.write_all(&rest[..slice])?;
                    rest = &rest[slice..];
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    to.write_all(rest)?;
                    rest = &[];
                }
            }
        }
        Ok(())
    }
}

/// A fault proxy on a loopback port in front of `127.0.0.1:target`.
pub struct FaultProxy {
    /// The port to point the client at.
    pub port: u16,
    inner: Arc<Inner>,
    schedule: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free port, in the `pass` state.
    pub fn start(target: u16) -> FaultProxy {
        Self::start_on(0, target)
    }

    /// Listens on `port` (0: a free one).
    pub fn start_on(port: u16, target: u16) -> FaultProxy {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the fault proxy");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let inner = Arc::new(Inner {
            target,
            fault: Mutex::new(Fault::Pass),
            stop: AtomicBool::new(false),
            links: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            to_broker: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            timeline: Mutex::new(vec![(Instant::now(), Fault::Pass)]),
        });
        inner.spawn(move |me| me.accept_loop(listener));
        FaultProxy {
            port,
            inner,
            schedule: None,
        }
    }

    /// Switches to `fault` now (a flap keeps flapping until the next switch).
    pub fn set(&self, fault: Fault) {
        self.inner.switch(fault);
    }

    /// The current state.
    pub fn fault(&self) -> Fault {
        self.inner.fault()
    }

    /// Runs `schedule` on a thread of its own, ending in `pass`.
    pub fn run(&mut self, schedule: &Schedule) {
        let steps = schedule.steps.clone();
        let inner = self.inner.clone();
        self.schedule = Some(std::thread::spawn(move || {
            for (fault, d) in steps {
                inner.switch(fault);
                let until = Instant::now() + d;
                while Instant::now() < until {
                    if inner.stop.load(SeqCst) {
                        return;
                    }
                    std::thread::sleep(
                        until
                            .saturating_duration_since(Instant::now())
                            .min(Duration::from_millis(50)),
                    );
                }
            }
            inner.switch(Fault::Pass);
        }));
    }

    /// Whether a schedule given to [`run`](Self::run) is still running.
    pub fn running(&self) -> bool {
        self.schedule.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// When each state began, in order (the first is the start, `pass`).
    pub fn timeline(&self) -> Vec<(Instant, Fault)> {
        self.inner.timeline.lock().unwrap().clone()
    }

    /// The state at `t`, by the timeline.
    pub fn fault_at(timeline: &[(Instant, Fault)], t: Instant) -> Fault {
        timeline
            .iter()
            .take_while(|(at, _)| *at <= t)
            .last()
            .map(|x| x.1)
            .unwrap_or(Fault::Pass)
    }

    /// Bytes delivered (toward the broker, toward the client).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.inner.to_broker.load(SeqCst),
            self.inner.to_client.load(SeqCst),
        )
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.inner.accepted.load(SeqCst)
    }

    /// Stops: closes every connection and the listener, joins every thread.
    pub fn stop(&mut self) {
        self.inner.stop.store(true, SeqCst);
        if let Some(h) = self.schedule.take() {
            let _ = h.join();
        }
        for l in self.inner.links.lock().unwrap().drain(..) {
            l.close();
        }
        let threads: Vec<JoinHandle<()>> = self.inner.threads.lock().unwrap().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop();
    }
}
