//! The upstream wire format (CONTRACT.md, "Upstream wire format"); pure, no I/O.
//!
//! JSON: `{"gateway":G,"batch":N,"events":[{"id","ts","source","topic","payload"}...]}`.
//! A JSON payload is embedded as it was received; any other payload is a base64 string with
//! `"payload_encoding":"base64"` beside it. postcard: [`WireBatch`], the same fields.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::config::Encoding;
use crate::event::{Event, Payload};

/// A batch in postcard encoding (and the shape the JSON follows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireBatch {
    /// `[gateway] id`.
    pub gateway: String,
    /// Batch number, rising per gateway.
    pub batch: u64,
    /// The events, in id order.
    pub events: Vec<Event>,
}

/// Builds one batch payload, event by event, keeping count of its size.
#[derive(Debug)]
pub struct BatchEncoder {
    encoding: Encoding,
    gateway: String,
    buf: Vec<u8>,
    events: Vec<Event>,
    count: usize,
}

impl BatchEncoder {
    /// Starts batch number `batch` of `gateway`.
    pub fn new(encoding: Encoding, gateway: &str, batch: u64) -> Self {
        let mut buf = Vec::with_capacity(64 * 1024);
        if encoding == Encoding::Json {
            buf.extend_from_slice(b"{\"gateway\":");
            serde_json::to_writer(&mut buf, gateway).expect("string to JSON");
            buf.extend_from_slice(format!(",\"batch\":{batch},\"events\":[").as_bytes());
        }
        BatchEncoder {
            encoding,
            gateway: gateway.to_string(),
            buf,
            events: Vec::new(),
            count: 0,
        }
    }

    /// Encoded size so far (JSON: exact; postcard: the sum of event sizes, close enough).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Events added.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether no event was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds `e` unless that would take the batch past `max_bytes` (a first event is always
    /// taken). Returns whether it was added.
    pub fn push(&mut self, e: &Event, max_bytes: usize) -> bool {
        let mut one = Vec::with_capacity(256);
        match self.encoding {
            Encoding::Json => encode_json_event(e, &mut one),
            Encoding::Postcard => {
                one = postcard::to_stdvec(e).expect("postcard to Vec");
            }
        }
        let sep = usize::from(self.count > 0);
        if self.count > 0 && self.buf.len() + sep + one.len() + 2 > max_bytes {
            return false;
        }
        if sep == 1 && self.encoding == Encoding::Json {
            self.buf.push(b',');
        }
        self.buf.extend_from_slice(&one);
        if self.encoding == Encoding::Postcard {
            self.events.push(e.clone());
        }
        self.count += 1;
        true
    }

    /// The finished payload; `batch` is used for postcard.
    pub fn finish(mut self, batch: u64) -> Vec<u8> {
        match self.encoding {
            Encoding::Json => {
                self.buf.extend_from_slice(b"]}");
                self.buf
            }
            Encoding::Postcard => postcard::to_stdvec(&WireBatch {
                gateway: self.gateway,
                batch,
                events: self.events,
            })
            .expect("postcard to Vec"),
        }
    }
}

/// One event as a JSON object.
pub fn encode_json_event(e: &Event, out: &mut Vec<u8>) {
    out.extend_from_slice(format!("{{\"id\":{},\"ts\":{},\"source\":", e.id, e.ts).as_bytes());
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
        let out = b.finish(42);
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
        let out = b.finish(1);
        assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
    }

    #[test]
    fn postcard_round_trips() {
        let mut b = BatchEncoder::new(Encoding::Postcard, "g", 7);
        let e = ev(5, Payload::Json("1".into()));
        b.push(&e, 1 << 20);
        let out = b.finish(7);
        let back: WireBatch = postcard::from_bytes(&out).unwrap();
        assert_eq!(back.batch, 7);
        assert_eq!(back.events, vec![e]);
    }
}
