//! `Event`: the one type that flows through every stage.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A payload: JSON when it parsed as JSON, raw bytes otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// Valid JSON text, kept as received (so it is never re-encoded on the way through).
    Json(String),
    /// Anything else; base64 in JSON output.
    Bytes(Vec<u8>),
}

impl Payload {
    /// JSON when `raw` is a UTF-8 JSON document that rules can read, bytes otherwise.
    ///
    /// "Can read" is what `serde_json` parses into a value: JSON text nested 128 levels
    /// deep or more, or with a number beyond an f64 (`1e400`), is valid JSON but not that, and kept
    /// as bytes (rules see it as a string) rather than reaching a rule as `()` and leaving it
    /// as `null`.
    pub fn from_raw(raw: &[u8]) -> Payload {
        match std::str::from_utf8(raw) {
            Ok(s) if serde_json::from_str::<Readable>(s).is_ok() => {
                Payload::Json(s.trim().to_string())
            }
            _ => Payload::Bytes(raw.to_vec()),
        }
    }

    /// Size in bytes of the payload as stored.
    pub fn len(&self) -> usize {
        match self {
            Payload::Json(s) => s.len(),
            Payload::Bytes(b) => b.len(),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A JSON document `serde_json` can parse into a value, checked without building one (its
/// `IgnoredAny` and `RawValue` skip the depth limit and the number range).
struct Readable;

impl<'de> Deserialize<'de> for Readable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Readable, D::Error> {
        d.deserialize_any(Readable)
    }
}

impl<'de> serde::de::Visitor<'de> for Readable {
    type Value = Readable;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Readable, E> {
        Ok(Readable)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Readable, E> {
        Ok(Readable)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Readable, E> {
        Ok(Readable)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Readable, E> {
        Ok(Readable)
    }
    fn visit_str<E>(self, _: &str) -> Result<Readable, E> {
        Ok(Readable)
    }
    fn visit_unit<E>(self) -> Result<Readable, E> {
        Ok(Readable)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Readable, A::Error> {
        while a.next_element::<Readable>()?.is_some() {}
        Ok(Readable)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Readable, A::Error> {
        while a.next_entry::<Readable, Readable>()?.is_some() {}
        Ok(Readable)
    }
}

/// An event: what a sensor said, where and when, and (once committed) its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique per gateway, rising, assigned in the commit that stores the event; 0 before.
    pub id: u64,
    /// When the gateway received it (ms since the epoch), unless the source supplied one.
    pub ts: i64,
    /// Where it came from: `mqtt`, `serial:NAME`, `rule:NAME`.
    pub source: String,
    /// MQTT topic (or the serial port's topic).
    pub topic: String,
    /// The content.
    pub payload: Payload,
    /// MQTT 5 user properties the sensor sent (embedded broker), given to rules as
    /// `event.properties`; not stored or forwarded.
    #[serde(skip)]
    pub properties: Vec<(String, String)>,
}

impl Event {
    /// A new, uncommitted event received now.
    pub fn new(source: impl Into<String>, topic: impl Into<String>, payload: Payload) -> Event {
        Event {
            id: 0,
            ts: now_ms(),
            source: source.into(),
            topic: topic.into(),
            payload,
            properties: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_kept_as_text_and_other_bytes_as_bytes() {
        assert_eq!(
            Payload::from_raw(br#"{"a":1}"#),
            Payload::Json(r#"{"a":1}"#.into())
        );
        assert_eq!(Payload::from_raw(b"21.5"), Payload::Json("21.5".into()));
        assert_eq!(Payload::from_raw(b"on"), Payload::Bytes(b"on".to_vec()));
        assert_eq!(
            Payload::from_raw(&[0xff, 0x00]),
            Payload::Bytes(vec![0xff, 0])
        );
        assert_eq!(Payload::from_raw(b""), Payload::Bytes(vec![]));
    }
}
