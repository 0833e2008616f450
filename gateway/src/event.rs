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

/// A trace id: given to every event at ingest and carried by everything derived from it (a rule's
/// kept, changed and fanned-out outputs, its publishes, its dead letters), so a subscriber can ask
/// where an output came from. 64 bits, shown as 16 lowercase hex digits; 0 is "none" (events
/// stored by releases before trace ids).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Trace(pub u64);

impl Trace {
    /// No trace (stored before trace ids existed).
    pub const NONE: Trace = Trace(0);

    /// A new trace id: unique within this process (a bijection of a counter), random across
    /// processes (the counter starts from a random seed), never 0.
    pub fn fresh() -> Trace {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::OnceLock;
        static SEED: OnceLock<u64> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let seed = *SEED.get_or_init(|| fastrand::u64(..));
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // splitmix64: distinct inputs give distinct outputs.
        let mut z = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Trace(z.max(1))
    }

    /// Whether this is [`Trace::NONE`].
    pub fn is_none(&self) -> bool {
        self.0 == 0
    }

    /// Reads 16 hex digits (either case); `None` for anything else and for all zeros.
    pub fn parse(s: &str) -> Option<Trace> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(s, 16)
            .ok()
            .filter(|&v| v != 0)
            .map(Trace)
    }

    /// The 8 bytes appended to a stored row (little-endian).
    pub fn to_row(self) -> [u8; 8] {
        self.0.to_le_bytes()
    }

    /// The trace of a row's trailing bytes: 8 bytes after the row, or none (older rows).
    pub fn from_row(rest: &[u8]) -> Trace {
        rest.try_into()
            .map(|b: [u8; 8]| Trace(u64::from_le_bytes(b)))
            .unwrap_or_default()
    }
}

impl std::fmt::Display for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// JSON (and other human-readable formats): the hex string, `null` for none. postcard: a
/// varint.
impl Serialize for Trace {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if !s.is_human_readable() {
            s.serialize_u64(self.0)
        } else if self.is_none() {
            s.serialize_none()
        } else {
            s.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for Trace {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Trace, D::Error> {
        if !d.is_human_readable() {
            return u64::deserialize(d).map(Trace);
        }
        match Option::<String>::deserialize(d)? {
            None => Ok(Trace::NONE),
            Some(s) => Trace::parse(&s)
                .ok_or_else(|| serde::de::Error::custom("a trace is 16 hex digits, not all 0")),
        }
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
    /// Its trace id: given at ingest, kept by every output derived from it.
    #[serde(default)]
    pub trace: Trace,
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
            trace: Trace::fresh(),
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

    #[test]
    fn traces_are_distinct_never_none_and_read_back() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100_000 {
            let t = Trace::fresh();
            assert!(!t.is_none());
            assert!(seen.insert(t), "{t} twice");
        }
        let t = Trace(0x00ab_cdef_0123_4567);
        assert_eq!(t.to_string(), "00abcdef01234567");
        assert_eq!(Trace::parse("00ABCDEF01234567"), Some(t));
        assert_eq!(Trace::parse("0000000000000000"), None);
        assert_eq!(Trace::parse("abc"), None);
        assert_eq!(Trace::parse("00abcdef0123456g"), None);
        assert_eq!(Trace::from_row(&t.to_row()), t);
        assert_eq!(Trace::from_row(&[]), Trace::NONE);
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"00abcdef01234567\"");
        assert_eq!(serde_json::to_string(&Trace::NONE).unwrap(), "null");
        let back: Trace = serde_json::from_str("\"00abcdef01234567\"").unwrap();
        assert_eq!(back, t);
        let pc = postcard::to_stdvec(&t).unwrap();
        assert_eq!(postcard::from_bytes::<Trace>(&pc).unwrap(), t);
    }
}
