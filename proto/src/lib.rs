//! Tidepool's serial frames, for firmware and for the gateway.
//!
//! `#![no_std]`, and encoding needs no allocator: a microcontroller builds a [`Frame`] that
//! borrows its strings and readings, and encodes it into a stack buffer with
//! [`encode_cobs`]. Frames travel as postcard bytes, COBS-encoded, each followed by one `0x00`.
//!
//! ```
//! use tidepool_proto::{encode_cobs, Body, Frame, Reading};
//!
//! let readings = [Reading { name: "celsius", value: 21.5 }, Reading { name: "rh", value: 40.0 }];
//! let frame = Frame::new("greenhouse-3", 17, Body::Readings(&readings));
//! let mut buf = [0u8; 128];
//! let wire = encode_cobs(&frame, &mut buf).unwrap(); // ends with 0x00: write it to the UART
//! assert_eq!(*wire.last().unwrap(), 0);
//!
//! // Acks come back the same way; decoding one needs no allocator either.
//! let mut ack_bytes = [0u8; 16];
//! let ack = tidepool_proto::Ack { version: tidepool_proto::VERSION, seq: 17 };
//! let n = encode_cobs(&ack, &mut ack_bytes).unwrap().len();
//! let got: tidepool_proto::Ack = tidepool_proto::decode_cobs(&mut ack_bytes[..n]).unwrap();
//! assert_eq!(got.seq, 17);
//! ```
//!
//! # Reliable serial (`ack = true` on the gateway's port)
//! The gateway answers each frame, after the event is committed to its store, with an
//! [`Ack`] carrying the frame's `seq` (same framing, gateway → device). A device keeps a small
//! window of frames it sent and has no ack for, and sends them again (same `seq`) when no ack
//! came within its timeout, or after a reconnect. Sequence numbers rise per device and wrap at
//! `u32::MAX`. With this, a device loses nothing across a gateway crash; the gateway may see a
//! frame twice (an ack lost in the crash), with the same `device` and `seq` for receivers to
//! deduplicate.
//!
//! # Commands (gateway → device)
//! With the gateway's `[commands]` on, the cloud can send a device a [`Command`]: its first
//! byte is [`COMMAND`] where an ack's is [`VERSION`], so a device reads [`frame_kind`] of each
//! frame from the gateway first, then decodes the matching type. Firmware that knows only acks
//! refuses a command as a frame of an unknown version.
//!
//! # Versions
//! The first field is [`VERSION`]. A receiver refuses a frame of a version it does not know
//! (the gateway counts and dead-letters it), so the layout can change without misreading.
#![no_std]

#[cfg(feature = "alloc")]
extern crate alloc;

use serde::{Deserialize, Serialize};

/// The frame layout version this crate writes.
pub const VERSION: u8 = 1;

/// A typed reading: a name and a number.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Reading<'a> {
    /// What was measured, e.g. `"celsius"`.
    pub name: &'a str,
    /// The value.
    pub value: f32,
}

/// A value of a key/value payload.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Value<'a> {
    /// An integer.
    Int(i64),
    /// A number.
    Float(f64),
    /// A flag.
    Bool(bool),
    /// A short text.
    Text(&'a str),
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Body<'a> {
    /// Typed readings.
    Readings(&'a [Reading<'a>]),
    /// A small key/value payload.
    KeyValues(&'a [(&'a str, Value<'a>)]),
}

/// A device → gateway frame (encode side: borrows, needs no allocator; receivers decode
/// into [`owned::Frame`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Frame<'a> {
    /// Layout version, [`VERSION`].
    pub version: u8,
    /// The device's id, e.g. its serial number.
    pub device: &'a str,
    /// Rises by one per frame of this device; the ack carries it back.
    pub seq: u32,
    /// The device's clock (ms since the Unix epoch) if it has one.
    pub ts: Option<u64>,
    /// The content.
    pub body: Body<'a>,
}

impl<'a> Frame<'a> {
    /// A frame of the current version without a timestamp.
    pub fn new(device: &'a str, seq: u32, body: Body<'a>) -> Self {
        Frame {
            version: VERSION,
            device,
            seq,
            ts: None,
            body,
        }
    }
}

/// Gateway → device: the frame `seq` is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Layout version, [`VERSION`].
    pub version: u8,
    /// The acknowledged frame's sequence number.
    pub seq: u32,
}

/// The first byte of a [`Command`] frame. Gateway → device frames start with a byte that says
/// what they are: [`VERSION`] (1) for an [`Ack`], `COMMAND` for a [`Command`]. Firmware that
/// knows only acks refuses a command frame as an unknown version, as it should.
pub const COMMAND: u8 = 0xC1;

/// Gateway → device: a command from the cloud (the gateway's `[commands]`), decoded in place
/// without an allocator. Tell it from an [`Ack`] by its first byte ([`frame_kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command<'a> {
    /// Always [`COMMAND`].
    pub kind: u8,
    /// The command's id, as the cloud gave it (its result upstream names it).
    pub id: &'a str,
    /// The command's payload: the text itself when the cloud sent a JSON string, else the
    /// payload as compact JSON.
    pub payload: &'a [u8],
}

/// What a gateway → device frame is, from its first byte (a postcard `u8` is that byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// An [`Ack`].
    Ack,
    /// A [`Command`].
    Command,
    /// Something this crate version does not know.
    Unknown(u8),
}

/// The kind of a gateway → device frame as it came off the wire, still COBS-encoded (with or
/// without its `0x00`): read before [`decode_cobs`], which then takes the matching type.
pub fn frame_kind(cobs_frame: &[u8]) -> FrameKind {
    // COBS: the first byte is the distance to the first zero; above 1, the next byte is the
    // first byte of the frame itself.
    let first = match cobs_frame {
        [code, b, ..] if *code > 1 => *b,
        _ => 0,
    };
    match first {
        VERSION => FrameKind::Ack,
        COMMAND => FrameKind::Command,
        b => FrameKind::Unknown(b),
    }
}

/// Encodes `value` as postcard, COBS-framed with the trailing `0x00`, into `buf`.
pub fn encode_cobs<'b, T: Serialize>(
    value: &T,
    buf: &'b mut [u8],
) -> Result<&'b mut [u8], postcard::Error> {
    postcard::to_slice_cobs(value, buf)
}

/// Decodes one COBS frame in place (with or without its trailing `0x00`).
pub fn decode_cobs<'a, T: Deserialize<'a>>(frame: &'a mut [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes_cobs(frame)
}

/// Owned mirrors of the frame types, for receivers with an allocator (same wire layout).
#[cfg(feature = "alloc")]
pub mod owned {
    use alloc::string::String;
    use alloc::vec::Vec;
    use serde::{Deserialize, Serialize};

    /// Owned [`super::Reading`].
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Reading {
        /// Name.
        pub name: String,
        /// Value.
        pub value: f32,
    }

    /// Owned [`super::Value`].
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub enum Value {
        /// An integer.
        Int(i64),
        /// A number.
        Float(f64),
        /// A flag.
        Bool(bool),
        /// A text.
        Text(String),
    }

    /// Owned [`super::Body`].
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub enum Body {
        /// Typed readings.
        Readings(Vec<Reading>),
        /// Key/value payload.
        KeyValues(Vec<(String, Value)>),
    }

    /// Owned [`super::Frame`].
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Frame {
        /// Version.
        pub version: u8,
        /// Device id.
        pub device: String,
        /// Sequence number.
        pub seq: u32,
        /// Device clock, ms.
        pub ts: Option<u64>,
        /// Content.
        pub body: Body,
    }
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn borrowed_encode_owned_decode() {
        let kv = [("door", Value::Bool(true)), ("count", Value::Int(7))];
        let f = Frame {
            ts: Some(1_763_785_000_000),
            ..Frame::new("d1", 42, Body::KeyValues(&kv))
        };
        let mut buf = [0u8; 64];
        let wire = encode_cobs(&f, &mut buf).unwrap();
        assert_eq!(
            wire.iter().filter(|b| **b == 0).count(),
            1,
            "one delimiter, at the end"
        );
        let back: owned::Frame = decode_cobs(wire).unwrap();
        assert_eq!(
            (back.version, back.device.as_str(), back.seq, back.ts),
            (1, "d1", 42, f.ts)
        );
        assert_eq!(
            back.body,
            owned::Body::KeyValues(std::vec![
                ("door".into(), owned::Value::Bool(true)),
                ("count".into(), owned::Value::Int(7))
            ])
        );
        let ack = Ack {
            version: VERSION,
            seq: 42,
        };
        let mut b2 = [0u8; 16];
        let w = encode_cobs(&ack, &mut b2).unwrap();
        assert_eq!(decode_cobs::<Ack>(w).unwrap(), ack);
    }

    #[test]
    fn commands_and_acks_tell_apart_by_their_first_byte() {
        let c = Command {
            kind: COMMAND,
            id: "cmd-7",
            payload: b"OPEN",
        };
        let mut buf = [0u8; 64];
        let n = encode_cobs(&c, &mut buf).unwrap().len();
        assert_eq!(frame_kind(&buf[..n]), FrameKind::Command);
        assert_eq!(decode_cobs::<Command>(&mut buf[..n]).unwrap(), c);
        let ack = Ack {
            version: VERSION,
            seq: 3,
        };
        let mut b2 = [0u8; 16];
        let n = encode_cobs(&ack, &mut b2).unwrap().len();
        assert_eq!(frame_kind(&b2[..n]), FrameKind::Ack);
        assert_eq!(frame_kind(&[1, 0]), FrameKind::Unknown(0));
        // Firmware that knows only acks refuses a command: its "version" is not 1.
        let n = encode_cobs(&c, &mut buf).unwrap().len();
        let as_ack: Option<Ack> = decode_cobs(&mut buf[..n]).ok();
        assert!(as_ack.is_none_or(|a| a.version != VERSION));
    }
}
