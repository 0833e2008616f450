//! systemd integration without libsystemd: `sd_notify` readiness and the watchdog.
//!
//! With `Type=notify`, systemd passes `NOTIFY_SOCKET`; the gateway sends `READY=1` once it
//! accepts events, `STOPPING=1` when it begins to stop, and, when the unit sets `WatchdogSec=`,
//! `WATCHDOG=1` at half that interval, but only while the store's commit loop shows signs of
//! life, so a wedged gateway is restarted by systemd. Without `NOTIFY_SOCKET` all of it is a no-op.

use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Sends one notification; false when not under systemd (or the send failed).
pub fn notify(msg: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), std::path::Path::new(&path))
    };
    sent.is_ok()
}

/// The watchdog period systemd asked for (`WATCHDOG_USEC`, for this process), if any.
pub fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its period while `heartbeat` (ms, set by the commit loop) is
/// fresh; ends with the returned task's abort.
pub fn spawn_watchdog(heartbeat: Arc<AtomicI64>) -> Option<tokio::task::JoinHandle<()>> {
    let period = watchdog_period()?;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period / 2);
        loop {
            tick.tick().await;
            let age = crate::event::now_ms() - heartbeat.load(Relaxed);
            if age < period.as_millis() as i64 {
                notify("WATCHDOG=1");
            } else {
                tracing::error!(
                    stalled_ms = age,
                    "store commit loop stalled; not pinging the systemd watchdog"
                );
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn notify_reaches_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // SAFETY: this test is the only one in this binary touching NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        assert!(super::notify("READY=1"));
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        assert!(!super::notify("READY=1"));
    }
}
