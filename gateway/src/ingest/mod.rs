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
    use crate::broker::codec;
    use crate::broker::packet::{In, Version};
    use crate::broker::router;
    use crate::broker::session::{Inbound, PROTOCOL_ERROR};
    use bytes::BytesMut;
    use proptest::prelude::*;

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

    // -- hostile input -----------------------------------------------------------------------

    /// Topic bytes a sensor might send: levels of wildcards, `$`, NUL, spaces, non-ASCII and
    /// empty ones; any bytes (mostly not UTF-8); the longest a PUBLISH can carry.
    fn hostile_topic() -> impl Strategy<Value = Vec<u8>> {
        let level = prop_oneof![
            Just(""),
            Just("+"),
            Just("#"),
            Just("$SYS"),
            Just("$"),
            Just("a"),
            Just("sensors"),
            Just("a+b"),
            Just("#x"),
            Just("\0"),
            Just(" "),
            Just("é"),
            Just("\u{FEFF}"),
        ];
        prop_oneof![
            8 => proptest::collection::vec(level, 0..6).prop_map(|ls| ls.join("/").into_bytes()),
            4 => proptest::collection::vec(any::<u8>(), 0..40),
            1 => (1usize..=65_535, prop_oneof![Just(b'a'), Just(b'/'), Just(b'#')])
                .prop_map(|(n, c)| vec![c; n]),
            1 => Just(vec![b'a'; 65_535]),
        ]
    }

    /// Payloads that have broken parsers: deep nesting, numbers beyond f64 and i64, NaN-like
    /// words, broken and valid JSON, empty, any bytes.
    fn hostile_payload() -> impl Strategy<Value = Vec<u8>> {
        let word = prop_oneof![
            Just("NaN"),
            Just("nan"),
            Just("-NaN"),
            Just("Infinity"),
            Just("-Infinity"),
            Just("\"NaN\""),
            Just("null"),
            Just("1e400"),
            Just("-1e400"),
            Just("1e-400"),
            Just("123456789012345678901234567890"),
            Just("-9223372036854775809"),
            Just("18446744073709551616"),
            Just("0x10"),
            Just("01"),
            Just("1."),
            Just("{\"a\":1e309}"),
            Just("\"\\ud800\""),
            Just("{\"a\":1,\"a\":2}"),
            Just(" \t\r\n "),
            Just(""),
        ];
        let json = any::<i64>()
            .prop_map(serde_json::Value::from)
            .prop_recursive(4, 32, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4)
                        .prop_map(serde_json::Value::from),
                    proptest::collection::btree_map("[a-z]{0,3}", inner, 0..4)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            });
        prop_oneof![
            3 => word.prop_map(|w| w.as_bytes().to_vec()),
            3 => (0usize..300, any::<bool>(), any::<bool>()).prop_map(|(n, obj, close)| {
                let (open, end) = if obj { ("{\"a\":", "}") } else { ("[", "]") };
                let mut s = open.repeat(n) + "1";
                if close {
                    s += &end.repeat(n);
                }
                s.into_bytes()
            }),
            2 => json.prop_map(|v| v.to_string().into_bytes()),
            2 => proptest::collection::vec(any::<u8>(), 0..64),
        ]
    }

    /// A PUBLISH with these topic bytes and payload, as a client of `v` sends it.
    fn publish_packet(v: Version, qos: u8, topic: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut body = codec::tests::s(topic);
        if qos > 0 {
            body.extend_from_slice(&[0x00, 0x01]);
        }
        if v == Version::V5 {
            body.push(0); // no properties
        }
        body.extend_from_slice(payload);
        codec::tests::frame(0x30 | (qos << 1), &body)
    }

    /// The payload as the event carries it: JSON exactly when rules can read it, and either
    /// way nothing lost.
    fn check_payload(raw: &[u8], got: &Payload) -> Result<(), TestCaseError> {
        let readable = std::str::from_utf8(raw)
            .ok()
            .filter(|s| serde_json::from_str::<serde_json::Value>(s).is_ok());
        match (got, readable) {
            (Payload::Json(s), Some(text)) => {
                prop_assert_eq!(s.as_str(), text.trim());
            }
            (Payload::Bytes(b), None) => prop_assert_eq!(&b[..], raw),
            (got, readable) => {
                return Err(TestCaseError::fail(format!(
                    "{raw:?} became {got:?}; readable by rules: {}",
                    readable.is_some()
                )))
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(crate::fuzz::cases(1000))]

        /// A sensor's PUBLISH with a hostile topic and payload, through the embedded broker's
        /// steps in the order its connection takes them (decode, topic alias, topic check,
        /// the `topics` filters, the event): no panic; a topic that is not UTF-8 is a
        /// malformed packet, an empty one a protocol error, one with `+`, `#` or NUL refused
        /// (each ends the connection, counted as a protocol error); a valid one is ingested
        /// exactly when a filter matches it (`#` never matches a `$` topic), over
        /// `max_payload` counted as oversize, else an event whose payload is JSON exactly when
        /// rules can read it.
        #[test]
        fn fuzz_embedded_publish_topic_and_payload(
            topic in hostile_topic(),
            payload in hostile_payload(),
            v in prop_oneof![Just(Version::V311), Just(Version::V5)],
            qos in 0u8..3,
            filters in proptest::collection::vec(
                prop_oneof![Just("#"), Just("+/#"), Just("$SYS/#"), Just("a/+"), Just("+"), Just("sensors/#")],
                1..3,
            ),
            max_payload in prop_oneof![Just(16usize), Just(65_536)],
        ) {
            let packet = publish_packet(v, qos, &topic, &payload);
            let mut buf = BytesMut::from(&packet[..]);
            let mut p = match codec::decode(&mut buf, v, 1 << 20) {
                Ok(Some(In::Publish(p))) => p,
                Ok(other) => return Err(TestCaseError::fail(format!("{other:?}"))),
                Err(e) => {
                    prop_assert!(std::str::from_utf8(&topic).is_err() || topic.contains(&0),
                        "refused a UTF-8 topic: {}", e);
                    prop_assert!(matches!(e, codec::DecodeError::Malformed(ref why) if !why.is_empty()));
                    return Ok(());
                }
            };
            prop_assert_eq!(p.topic.as_bytes(), &topic[..]);
            prop_assert_eq!(&p.payload[..], &payload[..]);
            let mut inbound = Inbound::new(10, 0);
            if topic.is_empty() {
                prop_assert_eq!(inbound.resolve_topic(&mut p), Err(PROTOCOL_ERROR));
                return Ok(());
            }
            prop_assert_eq!(inbound.resolve_topic(&mut p), Ok(()));
            let wild = p.topic.contains(['+', '#', '\0']);
            prop_assert_eq!(router::valid_topic(&p.topic), !wild);
            if wild {
                return Ok(());
            }
            let ingested = filters.iter().any(|f| router::matches(f, &p.topic));
            if p.topic.starts_with('$') {
                let sys = p.topic == "$SYS" || p.topic.starts_with("$SYS/");
                prop_assert_eq!(ingested, sys && filters.contains(&"$SYS/#"));
            } else if filters.contains(&"#") {
                prop_assert!(ingested);
            }
            let m = Metrics::default();
            let event = mqtt_event(&p.topic, &p.payload, max_payload, &m);
            prop_assert_eq!(m.ingested_total(), 1);
            match event {
                None => {
                    prop_assert!(payload.len() > max_payload);
                    prop_assert_eq!(m.dropped_count(DropReason::Oversize), 1);
                }
                Some(e) => {
                    prop_assert!(payload.len() <= max_payload);
                    prop_assert_eq!(&e.topic, &p.topic);
                    check_payload(&payload, &e.payload)?;
                }
            }
        }

        /// Any payload, as `Payload::from_raw` takes it (both ingress modes do): no panic, JSON
        /// exactly when rules can read it, nothing lost either way.
        #[test]
        fn fuzz_payloads_are_json_only_when_rules_can_read_them(raw in hostile_payload()) {
            check_payload(&raw, &Payload::from_raw(&raw))?;
        }
    }
}
