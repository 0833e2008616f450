//! The upstream wire format (CONTRACT.md, "Upstream wire format"); pure, no I/O.
//!
//! JSON: `{"gateway":G,"batch":N,"events":[{"id","trace","ts","source","topic","payload"}...]}`, with
//! `"backlog":true` after `batch` in a batch of backlog (stored before the connection came up).
//! A JSON payload is embedded as it was received; any other payload is a base64 string with
//! `"payload_encoding":"base64"` beside it. postcard: [`WireBatch`], the same fields.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::config::Encoding;
use crate::event::{Event, Payload};

/// The version of the postcard wire encoding, its first field. Version 1 is the first with
/// the field (a decoder seeing another value must not guess at the rest); version 2 adds
/// `backlog` after the events; version 3, written for every batch now, adds each event's
/// `trace` after its payload (and always has the `backlog` byte). [`decode_postcard`] reads
/// all three (events of versions 1 and 2 have no trace).
pub const WIRE_VERSION: u32 = 3;

/// A batch in postcard encoding (and the shape the JSON follows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireBatch {
    /// [`WIRE_VERSION`]; postcard only (JSON carries no version).
    pub version: u32,
    /// `[gateway] id`.
    pub gateway: String,
    /// Batch number, rising per gateway.
    pub batch: u64,
    /// The events, in id order.
    pub events: Vec<Event>,
    /// Backlog: stored before the connection came up (sent behind live data, paced).
    pub backlog: bool,
}

/// An event of versions 1 and 2: no `trace`.
#[derive(Serialize, Deserialize)]
struct EventV1 {
    id: u64,
    ts: i64,
    source: String,
    topic: String,
    payload: Payload,
}

impl From<EventV1> for Event {
    fn from(e: EventV1) -> Event {
        Event {
            id: e.id,
            ts: e.ts,
            source: e.source,
            topic: e.topic,
            payload: e.payload,
            trace: crate::event::Trace::NONE,
            properties: Vec::new(),
        }
    }
}

/// Version 1 of [`WireBatch`]: no `backlog`, no traces.
#[derive(Serialize, Deserialize)]
struct WireBatchV1 {
    version: u32,
    gateway: String,
    batch: u64,
    events: Vec<EventV1>,
}

/// Version 2 of [`WireBatch`]: no traces.
#[derive(Serialize, Deserialize)]
struct WireBatchV2 {
    version: u32,
    gateway: String,
    batch: u64,
    events: Vec<EventV1>,
    backlog: bool,
}

/// Decoding a postcard batch failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not postcard of a [`WireBatch`].
    #[error("not a postcard batch: {0}")]
    Postcard(#[from] postcard::Error),
    /// A version this build does not know.
    #[error("postcard batch version {0}; this build reads versions 1 to {WIRE_VERSION}")]
    Version(u32),
}

/// Decodes a postcard batch, checking its version first.
pub fn decode_postcard(bytes: &[u8]) -> Result<WireBatch, WireError> {
    let (version, _) = postcard::take_from_bytes::<u32>(bytes)?;
    match version {
        1 => {
            let v1: WireBatchV1 = postcard::from_bytes(bytes)?;
            Ok(WireBatch {
                version: v1.version,
                gateway: v1.gateway,
                batch: v1.batch,
                events: v1.events.into_iter().map(Event::from).collect(),
                backlog: false,
            })
        }
        2 => {
            let v2: WireBatchV2 = postcard::from_bytes(bytes)?;
            Ok(WireBatch {
                version: v2.version,
                gateway: v2.gateway,
                batch: v2.batch,
                events: v2.events.into_iter().map(Event::from).collect(),
                backlog: v2.backlog,
            })
        }
        WIRE_VERSION => Ok(postcard::from_bytes(bytes)?),
        v => Err(WireError::Version(v)),
    }
}

/// Builds one batch payload, event by event, keeping exact count of its size.
#[derive(Debug)]
pub struct BatchEncoder {
    encoding: Encoding,
    /// JSON: the text so far, without the closing `]}`. postcard: the fields before the
    /// events (version, gateway, batch).
    head: Vec<u8>,
    /// postcard: the events, concatenated (their count goes between `head` and them).
    body: Vec<u8>,
    count: usize,
    backlog: bool,
}

/// Bytes of postcard's varint for `n`.
fn postcard_varint_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

impl BatchEncoder {
    /// Starts batch number `batch` of `gateway`.
    pub fn new(encoding: Encoding, gateway: &str, batch: u64) -> Self {
        Self::with_backlog(encoding, gateway, batch, false)
    }

    /// Starts batch number `batch` of `gateway`, saying whether it is backlog.
    pub fn with_backlog(encoding: Encoding, gateway: &str, batch: u64, backlog: bool) -> Self {
        let head = match encoding {
            Encoding::Json => {
                let mut buf = Vec::with_capacity(64 * 1024);
                buf.extend_from_slice(b"{\"gateway\":");
                serde_json::to_writer(&mut buf, gateway).expect("string to JSON");
                buf.extend_from_slice(format!(",\"batch\":{batch},").as_bytes());
                if backlog {
                    buf.extend_from_slice(b"\"backlog\":true,");
                }
                buf.extend_from_slice(b"\"events\":[");
                buf
            }
            Encoding::Postcard => {
                postcard::to_stdvec(&(WIRE_VERSION, gateway, batch)).expect("postcard to Vec")
            }
        };
        BatchEncoder {
            encoding,
            head,
            body: Vec::new(),
            count: 0,
            backlog,
        }
    }

    /// Exact size of the finished payload with the events added so far.
    pub fn len(&self) -> usize {
        self.len_for(self.count, 0)
    }

    /// Exact size of the finished payload if an event encoded in `one` bytes were added.
    pub fn len_with(&self, one: usize) -> usize {
        self.len_for(self.count + 1, one)
    }

    fn len_for(&self, count: usize, extra: usize) -> usize {
        match self.encoding {
            // `,` between events, `]}` at the end.
            Encoding::Json => self.head.len() + usize::from(count > 1 && extra > 0) + extra + 2,
            // The events' count before them, `backlog` (one byte) after.
            Encoding::Postcard => {
                self.head.len() + postcard_varint_len(count as u64) + self.body.len() + extra + 1
            }
        }
    }

    /// Events added.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether no event was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// One event, encoded as it goes into the batch.
    pub fn encode(&self, e: &Event) -> Vec<u8> {
        match self.encoding {
            Encoding::Json => {
                let mut one = Vec::with_capacity(256);
                encode_json_event(e, &mut one);
                one
            }
            Encoding::Postcard => postcard::to_stdvec(e).expect("postcard to Vec"),
        }
    }

    /// Adds `e` unless that would take the batch past `max_bytes` (a first event is always
    /// taken). Returns whether it was added.
    pub fn push(&mut self, e: &Event, max_bytes: usize) -> bool {
        let one = self.encode(e);
        self.push_encoded(one, max_bytes)
    }

    /// Adds an event from [`BatchEncoder::encode`], unless that would take the finished
    /// payload past `max_bytes` (a first event is always taken). Returns whether it was added.
    pub fn push_encoded(&mut self, one: Vec<u8>, max_bytes: usize) -> bool {
        if self.count > 0 && self.len_with(one.len()) > max_bytes {
            return false;
        }
        match self.encoding {
            Encoding::Json => {
                if self.count > 0 {
                    self.head.push(b',');
                }
                self.head.extend_from_slice(&one);
            }
            Encoding::Postcard => self.body.extend_from_slice(&one),
        }
        self.count += 1;
        true
    }

    /// The finished payload.
    pub fn finish(mut self) -> Vec<u8> {
        match self.encoding {
            Encoding::Json => {
                self.head.extend_from_slice(b"]}");
                self.head
            }
            Encoding::Postcard => {
                let mut out = self.head;
                let mut n = self.count as u64;
                while n >= 0x80 {
                    out.push((n as u8 & 0x7f) | 0x80);
                    n >>= 7;
                }
                out.push(n as u8);
                out.extend_from_slice(&self.body);
                out.push(u8::from(self.backlog));
                out
            }
        }
    }
}

/// One event as a JSON object; `trace` after `id` unless the event has none (stored by a
/// release before trace ids).
pub fn encode_json_event(e: &Event, out: &mut Vec<u8>) {
    if e.trace.is_none() {
        out.extend_from_slice(format!("{{\"id\":{},\"ts\":{},\"source\":", e.id, e.ts).as_bytes());
    } else {
        out.extend_from_slice(
            format!(
                "{{\"id\":{},\"trace\":\"{}\",\"ts\":{},\"source\":",
                e.id, e.trace, e.ts
            )
            .as_bytes(),
        );
    }
    serde_json::to_writer(&mut *out, &e.source).expect("string to JSON");
    out.extend_from_slice(b",\"topic\":");
    serde_json::to_writer(&mut *out, &e.topic).expect("string to JSON");
    out.extend_from_slice(b",\"payload\":");
    match &e.payload {
        Payload::Json(s) => out.extend_from_slice(s.as_bytes()),
        Payload::Bytes(b) => {
            out.push(b'"');
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(b)
                    .as_bytes(),
            );
            out.extend_from_slice(b"\",\"payload_encoding\":\"base64\"");
        }
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: u64, payload: Payload) -> Event {
        Event {
            id,
            ts: 1_763_785_000_123,
            source: "mqtt".into(),
            topic: "sensors/7/temperature".into(),
            payload,
            trace: Default::default(),
            properties: Vec::new(),
        }
    }

    #[test]
    fn json_batch_matches_contract() {
        let mut b = BatchEncoder::new(Encoding::Json, "pi-kitchen-01", 42);
        assert!(b.push(
            &ev(1001, Payload::Json(r#"{"celsius":21.5}"#.into())),
            1 << 20
        ));
        assert!(b.push(&ev(1002, Payload::Bytes(b"on".to_vec())), 1 << 20));
        let out = b.finish();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["gateway"], "pi-kitchen-01");
        assert_eq!(v["batch"], 42);
        assert_eq!(v["events"][0]["id"], 1001);
        assert_eq!(v["events"][0]["payload"]["celsius"], 21.5);
        assert_eq!(v["events"][0]["source"], "mqtt");
        assert_eq!(v["events"][1]["payload"], "b24=");
        assert_eq!(v["events"][1]["payload_encoding"], "base64");
    }

    #[test]
    fn size_cap_cuts_but_always_takes_one() {
        let big = ev(1, Payload::Json(format!("\"{}\"", "x".repeat(1000))));
        let mut b = BatchEncoder::new(Encoding::Json, "g", 1);
        assert!(b.push(&big, 100), "a first event is always taken");
        assert!(!b.push(&big, 1500));
        assert_eq!(b.count(), 1);
        let out = b.finish();
        assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
    }

    #[test]
    fn postcard_round_trips_with_its_version_first() {
        let mut e = ev(5, Payload::Json("1".into()));
        e.trace = crate::event::Trace(0x1234_5678_9abc_def0);
        for backlog in [true, false] {
            let mut b = BatchEncoder::with_backlog(Encoding::Postcard, "g", 7, backlog);
            b.push(&e, 1 << 20);
            let out = b.finish();
            assert_eq!(out[0], WIRE_VERSION as u8, "the version is the first field");
            let back = decode_postcard(&out).unwrap();
            assert_eq!(back.version, WIRE_VERSION);
            assert_eq!(back.batch, 7);
            assert_eq!(back.events, vec![e.clone()], "the trace comes back");
            assert_eq!(back.backlog, backlog);
            let mut newer = out.clone();
            newer[0] = 4;
            assert!(matches!(
                decode_postcard(&newer),
                Err(WireError::Version(4))
            ));
        }
        // What earlier releases wrote still reads, without traces.
        let old = EventV1 {
            id: 5,
            ts: e.ts,
            source: e.source.clone(),
            topic: e.topic.clone(),
            payload: e.payload.clone(),
        };
        let mut untraced = e.clone();
        untraced.trace = crate::event::Trace::NONE;
        let v1 = postcard::to_stdvec(&(1u32, "g", 7u64, vec![&old])).unwrap();
        let back = decode_postcard(&v1).unwrap();
        assert_eq!(
            (back.version, back.events, back.backlog),
            (1, vec![untraced.clone()], false)
        );
        let v2 = postcard::to_stdvec(&(2u32, "g", 7u64, vec![&old], true)).unwrap();
        let back = decode_postcard(&v2).unwrap();
        assert_eq!(
            (back.version, back.events, back.backlog),
            (2, vec![untraced], true)
        );
    }

    #[test]
    fn every_field_written_is_in_the_published_schema() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../schema/batch.schema.json")).unwrap();
        let mut b = BatchEncoder::with_backlog(Encoding::Json, "g", 1, true);
        let mut e = ev(1, Payload::Bytes(vec![1]));
        e.trace = crate::event::Trace::fresh();
        b.push(&e, 1 << 20);
        let v: serde_json::Value = serde_json::from_slice(&b.finish()).unwrap();
        let batch = schema["properties"].as_object().unwrap();
        let event = schema["properties"]["events"]["items"]["properties"]
            .as_object()
            .unwrap();
        for k in v.as_object().unwrap().keys() {
            assert!(batch.contains_key(k), "batch field {k} not in the schema");
        }
        for k in v["events"][0].as_object().unwrap().keys() {
            assert!(event.contains_key(k), "event field {k} not in the schema");
        }
        let pattern = event["trace"]["pattern"].as_str().unwrap();
        assert_eq!(pattern, "^[0-9a-f]{16}$");
    }

    #[test]
    fn json_events_carry_their_trace_after_the_id() {
        let mut e = ev(5, Payload::Json("1".into()));
        e.trace = crate::event::Trace(0x00ab_cdef_0123_4567);
        let mut one = Vec::new();
        encode_json_event(&e, &mut one);
        assert!(
            one.starts_with(br#"{"id":5,"trace":"00abcdef01234567","ts":"#),
            "{}",
            String::from_utf8_lossy(&one)
        );
        e.trace = crate::event::Trace::NONE;
        one.clear();
        encode_json_event(&e, &mut one);
        let v: serde_json::Value = serde_json::from_slice(&one).unwrap();
        assert!(
            v.get("trace").is_none(),
            "an untraced event has no trace field"
        );
    }

    #[test]
    fn a_backlog_batch_says_so_in_both_encodings() {
        let e = ev(5, Payload::Json("1".into()));
        let mut b = BatchEncoder::with_backlog(Encoding::Json, "g", 7, true);
        b.push(&e, 1 << 20);
        let len = b.len();
        let out = b.finish();
        assert_eq!(out.len(), len);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["backlog"], true);
        let mut b = BatchEncoder::new(Encoding::Json, "g", 7);
        b.push(&e, 1 << 20);
        let v: serde_json::Value = serde_json::from_slice(&b.finish()).unwrap();
        assert!(v.get("backlog").is_none(), "live batches are as before");
        let mut b = BatchEncoder::with_backlog(Encoding::Postcard, "g", 7, true);
        b.push(&e, 1 << 20);
        let len = b.len();
        let out = b.finish();
        assert_eq!(out.len(), len);
        assert!(decode_postcard(&out).unwrap().backlog);
    }

    #[test]
    fn encoded_length_is_exact_in_both_encodings() {
        for encoding in [Encoding::Json, Encoding::Postcard] {
            let mut b = BatchEncoder::new(encoding, "pi-kitchen-01", 300);
            let mut events = Vec::new();
            for i in 0..200 {
                let mut e = ev(1000 + i, Payload::Json(format!("{{\"n\":{i}}}")));
                e.trace = crate::event::Trace::fresh();
                let one = b.encode(&e);
                let predicted = b.len_with(one.len());
                assert!(b.push_encoded(one, predicted), "fits exactly");
                assert_eq!(b.len(), predicted);
                events.push(e);
            }
            let e = ev(9999, Payload::Bytes(vec![1, 2, 3]));
            let one = b.encode(&e);
            let over = b.len_with(one.len()) - 1;
            assert!(!b.push_encoded(one, over), "one byte short");
            let len = b.len();
            let out = b.finish();
            assert_eq!(out.len(), len, "{encoding:?}");
            if encoding == Encoding::Postcard {
                let want = postcard::to_stdvec(&WireBatch {
                    version: WIRE_VERSION,
                    gateway: "pi-kitchen-01".into(),
                    batch: 300,
                    events,
                    backlog: false,
                })
                .unwrap();
                assert_eq!(out, want, "the same bytes as postcard of a WireBatch");
            } else {
                let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
                assert_eq!(v["events"].as_array().unwrap().len(), 200);
            }
        }
    }
}
