//! Sources: where events come from. Each hands [`Incoming`] events to the commit loop through
//! one bounded channel; when it is full, sources wait (MQTT flow control pushes back on the
//! sensors or the broker), they never drop silently.

pub mod client;
pub mod embedded;

use crate::admin::metrics::{DropReason, Metrics};
use crate::event::{Event, Payload};

pub use crate::store::Incoming;

/// The source label of MQTT events.
pub const MQTT_SOURCE: &str = "mqtt";

/// Checks size and builds the event; `None` (counted) when oversize.
pub fn mqtt_event(
    topic: &str,
    payload: &[u8],
    max_payload: usize,
    metrics: &Metrics,
) -> Option<Event> {
    metrics.ingested(MQTT_SOURCE, 1);
    if payload.len() > max_payload {
        metrics.dropped(DropReason::Oversize, 1);
        tracing::debug!(
            topic,
            size = payload.len(),
            max_payload,
            "payload over max_payload rejected"
        );
        return None;
    }
    Some(Event::new(MQTT_SOURCE, topic, Payload::from_raw(payload)))
}

/// FNV-1a, 64 bits: stable across runs (unlike std's hasher), for redelivery detection.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversize_is_counted_not_truncated() {
        let m = Metrics::default();
        assert!(mqtt_event("t", &[b'1'; 11], 10, &m).is_none());
        assert_eq!(m.dropped_count(DropReason::Oversize), 1);
        let e = mqtt_event("t", b"12", 10, &m).unwrap();
        assert_eq!(e.payload, Payload::Json("12".into()));
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(stable_hash(&[b"a", b"b"]), stable_hash(&[b"a", b"b"]));
        assert_ne!(stable_hash(&[b"ab", b""]), stable_hash(&[b"a", b"b"]));
    }
}
