//! Sources: where events come from. Each hands [`Incoming`] events to the commit loop through
//! one bounded channel; when it is full, sources wait (MQTT flow control pushes back on the
//! sensors or the broker), they never drop silently.

pub mod channel;
pub mod client;
pub mod serial;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::admin::metrics::{DropReason, Metrics};
use crate::event::{Event, Payload};

pub use channel::IngestTx;

// What ingest hands to the store: the event, the acknowledgement to send once it is
// committed, and what identifies a resend (the keys' table logic lives in `store::dedup`).

/// Called once the event it came with is committed (client-mode PUBACK, serial ack, the
/// embedded broker's PUBACK), with what the commit did with it.
pub type AckFn = Box<dyn FnOnce(Taken) + Send>;

/// What the commit did with an event, for its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Stored, or decided: a rule dropped or dead-lettered it, it was a resend, a bad frame.
    Stored,
    /// The buffer could not take it (`when_full = "reject_new"`, or the disk below
    /// `min_free` with nothing to evict): counted as dropped.
    Refused,
}

/// Redelivery detection: what identifies a message its source may send again.
#[derive(Debug, Clone)]
pub enum Dedup {
    /// A client-mode MQTT delivery (packet id, content hash, DUP).
    Mqtt(crate::store::dedup::MqttKey),
    /// A sensor's QoS 1/2 publish to the embedded broker (client, packet id, hash, DUP).
    Broker(crate::store::dedup::BrokerKey),
    /// A reliable-serial frame (port, device, seq, frame hash).
    Serial(crate::store::dedup::SerialKey),
}

/// One event from ingest, with what to do once it is committed.
pub struct Incoming {
    /// The event (id 0).
    pub event: Event,
    /// Called after the commit that stored it (or decided not to).
    pub ack: Option<AckFn>,
    /// Redelivery detection (client mode, reliable serial).
    pub dedup: Option<Dedup>,
    /// A frame that could not be decoded: dead-lettered (raw bytes in the event) and counted.
    pub bad: Option<(DropReason, String)>,
}

impl Incoming {
    /// An event with no ack and no dedup.
    pub fn plain(event: Event) -> Incoming {
        Incoming {
            event,
            ack: None,
            dedup: None,
            bad: None,
        }
    }
}

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

/// What the gateway published itself (rule `publish`), so that ingest skips it when the
/// broker hands it back: the gateway never ingests its own outputs, whatever `topics` says.
#[derive(Debug, Clone)]
pub struct OwnPublishes {
    filters: Arc<Vec<String>>,
    pending: Arc<Mutex<HashMap<u64, u32>>>,
}

impl OwnPublishes {
    /// For a source subscribed to `filters`.
    pub fn new(filters: &[String]) -> Self {
        OwnPublishes {
            filters: Arc::new(filters.to_vec()),
            pending: Arc::default(),
        }
    }

    /// Notes a message about to be published; only those ingest will see come back are kept.
    pub fn note(&self, topic: &str, payload: &[u8]) {
        if !self
            .filters
            .iter()
            .any(|f| tidepool_rules::topic_matches(f, topic))
        {
            return;
        }
        let mut m = self.pending.lock().unwrap();
        if m.len() > 100_000 {
            // Something never came back (a broker restart): start over rather than grow.
            m.clear();
        }
        *m.entry(stable_hash(&[topic.as_bytes(), payload]))
            .or_default() += 1;
    }

    /// Whether this incoming message is one of ours (and forgets it).
    pub fn take(&self, topic: &str, payload: &[u8]) -> bool {
        let mut m = self.pending.lock().unwrap();
        if m.is_empty() {
            return false;
        }
        let h = stable_hash(&[topic.as_bytes(), payload]);
        match m.get_mut(&h) {
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    m.remove(&h);
                }
                true
            }
            None => false,
        }
    }
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
    fn own_publishes_are_recognised_once() {
        let own = OwnPublishes::new(&["alerts/#".to_string()]);
        own.note("alerts/x", b"1");
        own.note("other/x", b"1");
        assert!(!own.take("other/x", b"1"), "not subscribed: never noted");
        assert!(own.take("alerts/x", b"1"));
        assert!(!own.take("alerts/x", b"1"), "only as often as published");
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(stable_hash(&[b"a", b"b"]), stable_hash(&[b"a", b"b"]));
        assert_ne!(stable_hash(&[b"ab", b""]), stable_hash(&[b"a", b"b"]));
    }
}
