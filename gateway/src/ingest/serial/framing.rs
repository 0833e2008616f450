//! Cutting a serial byte stream into frames and decoding them; pure, no I/O.
//!
//! `lines`: one UTF-8 JSON object per `\n` (a trailing `\r` is ignored; blank lines are
//! skipped). `cobs`: postcard [`tidepool_proto`] frames, COBS-encoded, `0x00`-delimited.
//! A frame longer than `max_frame` is cut off and reported as oversize; reading resumes after
//! the next delimiter, as it does after any bad frame.

use serde_json::{Map, Value};
use tidepool_proto::owned;

/// What the deframer found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// A complete frame (without its delimiter).
    Frame(Vec<u8>),
    /// A frame longer than allowed: its first `max_frame` bytes.
    Oversize(Vec<u8>),
}

/// Accumulates bytes and yields frames at each delimiter.
#[derive(Debug)]
pub struct Deframer {
    delim: u8,
    max: usize,
    buf: Vec<u8>,
    overflow: bool,
}

impl Deframer {
    /// For frames ending in `delim`, at most `max` bytes long.
    pub fn new(delim: u8, max: usize) -> Self {
        Deframer {
            delim,
            max,
            buf: Vec::new(),
            overflow: false,
        }
    }

    /// Feeds `bytes`; complete frames are appended to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Chunk>) {
        for &b in bytes {
            if b == self.delim {
                let frame = std::mem::take(&mut self.buf);
                if self.overflow {
                    out.push(Chunk::Oversize(frame));
                    self.overflow = false;
                } else {
                    out.push(Chunk::Frame(frame));
                }
            } else if self.buf.len() < self.max {
                self.buf.push(b);
            } else {
                self.overflow = true;
            }
        }
    }

    /// Drops a partial frame (the port went away mid-frame).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.overflow = false;
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Topic from the frame, if it named one.
    pub topic: Option<String>,
    /// Timestamp from the frame (ms since the epoch), if it had one.
    pub ts: Option<i64>,
    /// The JSON payload.
    pub payload: Value,
    /// Sequence number, for acks.
    pub seq: Option<u64>,
    /// The sending device's id (cobs: always; lines: a `"device"` string, if any).
    pub device: Option<String>,
}

/// Why a frame was refused; the text goes to the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadFrame {
    /// Not UTF-8.
    #[error("bad UTF-8: {0}")]
    Utf8(String),
    /// Not a JSON object.
    #[error("bad JSON: {0}")]
    Json(String),
    /// Not valid COBS.
    #[error("bad COBS framing")]
    Cobs,
    /// Not a frame of a version we know.
    #[error("unknown frame version {0}")]
    Version(u8),
    /// COBS was fine, the postcard content was not.
    #[error("bad frame content: {0}")]
    Postcard(String),
}

/// Plausible wall-clock ms (after 2001): device clocks that count from boot are not used as ts.
fn wall_clock(ms: i64) -> Option<i64> {
    (ms > 1_000_000_000_000).then_some(ms)
}

/// Decodes a `lines` frame; `Ok(None)` for a blank line.
pub fn decode_line(frame: &[u8]) -> Result<Option<Decoded>, BadFrame> {
    let frame = frame.strip_suffix(b"\r").unwrap_or(frame);
    let text = std::str::from_utf8(frame).map_err(|e| BadFrame::Utf8(e.to_string()))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let mut obj: Map<String, Value> = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(o)) => o,
        Ok(other) => return Err(BadFrame::Json(format!("expected an object, got {other}"))),
        Err(e) => return Err(BadFrame::Json(e.to_string())),
    };
    let topic = match obj.remove("topic") {
        Some(Value::String(t)) if !t.is_empty() => Some(t),
        Some(_) => {
            return Err(BadFrame::Json(
                "\"topic\" must be a non-empty string".into(),
            ))
        }
        None => None,
    };
    let ts = obj
        .remove("ts")
        .and_then(|v| v.as_i64())
        .and_then(wall_clock);
    let seq = obj.get("seq").and_then(|v| v.as_u64());
    let device = obj.get("device").and_then(|v| v.as_str()).map(String::from);
    Ok(Some(Decoded {
        topic,
        ts,
        payload: Value::Object(obj),
        seq,
        device,
    }))
}

/// Decodes a `cobs` frame (without its `0x00`).
pub fn decode_cobs(frame: &[u8]) -> Result<Decoded, BadFrame> {
    let raw = cobs::decode_vec(frame).map_err(|_| BadFrame::Cobs)?;
    match raw.first() {
        Some(&v) if v == tidepool_proto::VERSION => {}
        Some(&v) => return Err(BadFrame::Version(v)),
        None => return Err(BadFrame::Cobs),
    }
    let f: owned::Frame =
        postcard::from_bytes(&raw).map_err(|e| BadFrame::Postcard(e.to_string()))?;
    let mut obj = Map::new();
    let device = f.device.clone();
    obj.insert("device".into(), f.device.into());
    obj.insert("seq".into(), f.seq.into());
    if let Some(ts) = f.ts {
        obj.insert("device_ts".into(), ts.into());
    }
    match f.body {
        owned::Body::Readings(rs) => {
            for r in rs {
                let v = serde_json::Number::from_f64(f64::from(r.value))
                    .map(Value::Number)
                    .unwrap_or(Value::Null);
                obj.insert(r.name, v);
            }
        }
        owned::Body::KeyValues(kvs) => {
            for (k, v) in kvs {
                let v = match v {
                    owned::Value::Int(i) => Value::from(i),
                    owned::Value::Float(x) => serde_json::Number::from_f64(x)
                        .map(Value::Number)
                        .unwrap_or(Value::Null),
                    owned::Value::Bool(b) => Value::Bool(b),
                    owned::Value::Text(t) => Value::String(t),
                };
                obj.insert(k, v);
            }
        }
    }
    Ok(Decoded {
        topic: None,
        ts: f
            .ts
            .and_then(|t| i64::try_from(t).ok())
            .and_then(wall_clock),
        payload: Value::Object(obj),
        seq: Some(u64::from(f.seq)),
        device: Some(device),
    })
}

/// The ack for `seq`, framed for the port's framing.
pub fn encode_ack(cobs_framing: bool, seq: u64) -> Vec<u8> {
    if cobs_framing {
        let ack = tidepool_proto::Ack {
            version: tidepool_proto::VERSION,
            seq: seq as u32,
        };
        postcard::to_stdvec_cobs(&ack).expect("ack encodes")
    } else {
        format!("{{\"ack\":{seq}}}\n").into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tidepool_proto::{Body, Frame, Reading};

    fn cobs_frame(device: &str, seq: u32, celsius: f32) -> Vec<u8> {
        let rs = [Reading {
            name: "celsius",
            value: celsius,
        }];
        let f = Frame::new(device, seq, Body::Readings(&rs));
        postcard::to_stdvec_cobs(&f).unwrap()
    }

    #[test]
    fn lines_take_topic_and_ts_from_the_object() {
        let d = decode_line(br#"{"topic":"t/1","ts":1763785000123,"seq":5,"x":1}"#)
            .unwrap()
            .unwrap();
        assert_eq!(d.topic.as_deref(), Some("t/1"));
        assert_eq!(d.ts, Some(1_763_785_000_123));
        assert_eq!(d.seq, Some(5));
        assert_eq!(d.payload, serde_json::json!({"seq": 5, "x": 1}));
        assert_eq!(decode_line(b"  \r").unwrap(), None);
        assert!(matches!(decode_line(b"{nope"), Err(BadFrame::Json(_))));
        assert!(matches!(decode_line(b"[1]"), Err(BadFrame::Json(_))));
        assert!(matches!(decode_line(&[0xff, 0xfe]), Err(BadFrame::Utf8(_))));
    }

    #[test]
    fn cobs_frames_decode_and_bad_ones_say_why() {
        let mut f = cobs_frame("d7", 9, 21.5);
        f.pop();
        let d = decode_cobs(&f).unwrap();
        assert_eq!(
            d.payload,
            serde_json::json!({"device": "d7", "seq": 9, "celsius": 21.5})
        );
        assert_eq!(d.seq, Some(9));
        assert_eq!(decode_cobs(&[0x05, 0x01]), Err(BadFrame::Cobs));
        let v2 = cobs::encode_vec(&[2, 1, 2, 3]);
        assert_eq!(decode_cobs(&v2), Err(BadFrame::Version(2)));
    }

    #[test]
    fn oversize_is_cut_and_the_next_frame_is_whole() {
        let mut d = Deframer::new(b'\n', 8);
        let mut out = Vec::new();
        d.push(b"0123456789abc\n{\"a\":1}\n", &mut out);
        assert_eq!(
            out,
            vec![
                Chunk::Oversize(b"01234567".to_vec()),
                Chunk::Frame(b"{\"a\":1}".to_vec())
            ]
        );
    }

    proptest! {
        #![proptest_config(crate::fuzz::cases(1000))]

        /// The ack path's frames, both ways: every ack the gateway writes decodes on the device
        /// side (as `tidepool_proto` firmware and the simulator read it) to its seq; a changed
        /// or random ack frame never panics the device's decoder.
        #[test]
        fn fuzz_acks_decode_on_the_device_and_hostile_ones_never_panic(
            seq in any::<u32>(),
            wide in any::<u64>(),
            changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            junk in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let cobs = encode_ack(true, u64::from(seq));
            prop_assert_eq!(cobs.last(), Some(&0), "0x00-delimited");
            let mut frame = cobs[..cobs.len() - 1].to_vec();
            prop_assert!(!frame.contains(&0), "one frame");
            let ack: tidepool_proto::Ack = tidepool_proto::decode_cobs(&mut frame.clone()).unwrap();
            prop_assert_eq!((ack.version, ack.seq), (tidepool_proto::VERSION, seq));
            let line = encode_ack(false, wide);
            prop_assert_eq!(line.last(), Some(&b'\n'));
            let v: Value = serde_json::from_slice(&line[..line.len() - 1]).unwrap();
            prop_assert_eq!(v["ack"].as_u64(), Some(wide));
            // Changed on the wire, or noise: the device's decoders never panic.
            for (i, b) in &changes {
                let i = i.index(frame.len());
                frame[i] = *b;
            }
            let _ = tidepool_proto::decode_cobs::<tidepool_proto::Ack>(&mut frame);
            let _ = tidepool_proto::decode_cobs::<tidepool_proto::Ack>(&mut junk.clone());
            let _ = serde_json::from_slice::<Value>(&junk).map(|v| v["ack"].as_u64());
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_line(&bytes);
            let _ = decode_cobs(&bytes);
            let mut d = Deframer::new(0, 64);
            let mut out = Vec::new();
            d.push(&bytes, &mut out);
            for c in out { if let Chunk::Frame(f) = c { let _ = decode_cobs(&f); } }
        }

        #[test]
        fn cobs_stream_resyncs_after_garbage(
            frames in proptest::collection::vec((0u32..1000, -50.0f32..150.0), 1..20),
            garbage in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..20),
        ) {
            let mut stream = Vec::new();
            for (i, (seq, c)) in frames.iter().enumerate() {
                // Garbage, then a delimiter, then a good frame: the good frame must come through.
                stream.extend_from_slice(&garbage[i % garbage.len()]);
                stream.push(0);
                stream.extend(cobs_frame("dev", *seq, *c));
            }
            let mut d = Deframer::new(0, 1024);
            let mut out = Vec::new();
            // Fed in odd-sized pieces, as a UART delivers them.
            for piece in stream.chunks(7) { d.push(piece, &mut out); }
            let good: Vec<u64> = out.iter().filter_map(|c| match c {
                Chunk::Frame(f) => decode_cobs(f).ok().and_then(|d| d.seq).filter(|_| true),
                _ => None,
            }).collect();
            let want: Vec<u64> = frames.iter().map(|(s, _)| u64::from(*s)).collect();
            // Every well-formed frame decoded, in order (garbage may by chance decode too).
            let mut it = good.iter();
            for w in &want { prop_assert!(it.any(|g| g == w), "frame {} lost", w); }
        }

        #[test]
        fn lines_stream_resyncs_after_garbage(
            ns in proptest::collection::vec(0u64..1_000_000, 1..20),
            garbage in proptest::collection::vec("[^\n]{0,30}", 1..20),
        ) {
            let mut stream = Vec::new();
            for (i, n) in ns.iter().enumerate() {
                stream.extend_from_slice(garbage[i % garbage.len()].as_bytes());
                stream.push(b'\n');
                stream.extend_from_slice(format!("{{\"n\":{n}}}\n").as_bytes());
            }
            let mut d = Deframer::new(b'\n', 4096);
            let mut out = Vec::new();
            for piece in stream.chunks(5) { d.push(piece, &mut out); }
            let good: Vec<u64> = out.iter().filter_map(|c| match c {
                Chunk::Frame(f) => decode_line(f).ok().flatten().and_then(|d| d.payload["n"].as_u64()),
                _ => None,
            }).collect();
            let mut it = good.iter();
            for w in &ns { prop_assert!(it.any(|g| g == w), "line {} lost", w); }
        }
    }
}
