//! Harness for the upstream-limit tests: a broker that accepts and never acknowledges, and
//! a broker that speaks only MQTT 3.1.1.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A loopback listener whose first connection is a broker that answers CONNECT with CONNACK
/// and then reads everything and answers nothing (no PUBACK, no PINGRESP), holding the
/// connection open; every later connection is proxied to `target`, a real broker.
pub struct SilentFirst {
    /// The port to point the gateway at.
    pub port: u16,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
}

impl SilentFirst {
    /// Listens on a free port in front of `target`.
    pub fn start(target: u16) -> SilentFirst {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, s) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(SeqCst) {
                let Ok((inbound, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                inbound.set_nonblocking(false).unwrap();
                if n.fetch_add(1, SeqCst) == 0 {
                    let s = s.clone();
                    std::thread::spawn(move || silent(inbound, s));
                } else {
                    proxy(inbound, target);
                }
            }
        });
        SilentFirst {
            port,
            accepted,
            stop,
        }
    }
}

impl Drop for SilentFirst {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

/// CONNACK for the first CONNECT, then silence until the client goes or the test ends.
fn silent(mut s: TcpStream, stop: Arc<AtomicBool>) {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut connacked = false;
    let until = Instant::now() + Duration::from_secs(300);
    while !stop.load(SeqCst) && Instant::now() < until {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) if !connacked => {
                // The first bytes are the CONNECT (a CONNECT fits in one read on loopback).
                let connack: &[u8] = if connect_level(&buf[..n]) == Some(5) {
                    &[0x20, 0x03, 0x00, 0x00, 0x00]
                } else {
                    &[0x20, 0x02, 0x00, 0x00]
                };
                let _ = s.write_all(connack);
                connacked = true;
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// The protocol level of a CONNECT packet (4: MQTT 3.1.1, 5: MQTT 5), if `b` starts with one.
pub fn connect_level(b: &[u8]) -> Option<u8> {
    if b.first()? & 0xf0 != 0x10 {
        return None;
    }
    let mut i = 1;
    while b.get(i)? & 0x80 != 0 {
        i += 1;
    }
    // Remaining length, then the protocol name "MQTT" (2 + 4 bytes), then the level.
    b.get(i + 1 + 6).copied()
}

/// A loopback listener in front of `target` (a real broker) that behaves as a broker that
/// speaks only MQTT 3.1.1: an MQTT 5 CONNECT gets a 3.1.1 CONNACK "unacceptable protocol
/// version" (return code 1) and the connection closes; a 3.1.1 CONNECT is proxied.
pub struct Only311 {
    /// The port to point the gateway at.
    pub port: u16,
    /// MQTT 5 CONNECTs turned away so far.
    pub refused_v5: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
}

impl Only311 {
    /// Listens on a free port in front of `target`.
    pub fn start(target: u16) -> Only311 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let refused_v5 = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, s) = (refused_v5.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(SeqCst) {
                let Ok((mut inbound, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                inbound.set_nonblocking(false).unwrap();
                inbound
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut first = vec![0u8; 4096];
                let Ok(len) = inbound.read(&mut first) else {
                    continue;
                };
                if connect_level(&first[..len]) == Some(5) {
                    n.fetch_add(1, SeqCst);
                    let _ = inbound.write_all(&[0x20, 0x02, 0x00, 0x01]);
                    let _ = inbound.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                inbound.set_read_timeout(None).unwrap();
                let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                if outbound.write_all(&first[..len]).is_err() {
                    continue;
                }
                pipe(inbound, outbound);
            }
        });
        Only311 {
            port,
            refused_v5,
            stop,
        }
    }
}

impl Drop for Only311 {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

fn proxy(inbound: TcpStream, target: u16) {
    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)) else {
        return;
    };
    pipe(inbound, outbound);
}

/// Copies both ways until either side closes.
fn pipe(inbound: TcpStream, outbound: TcpStream) {
    let (mut a, mut b) = (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
    let (mut c, mut d) = (inbound, outbound);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut a, &mut b);
        let _ = b.shutdown(std::net::Shutdown::Both);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut d, &mut c);
        let _ = c.shutdown(std::net::Shutdown::Both);
    });
}
