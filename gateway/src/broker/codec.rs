//! The broker's wire codec: bytes of MQTT 3.1, 3.1.1 or 5 into [`In`], [`Out`] into bytes.
//!
//! One port speaks all three. The CONNECT says which ([`decode_connect`]); every later packet
//! of the connection is read as that protocol ([`decode`]). No I/O here: the caller owns the
//! socket and the buffer, calls a decoder after each read and writes what [`encode`] appended.
//!
//! Built on rumqttc 0.25's codecs, `rumqttc::mqttbytes::v4` for 3.1/3.1.1 and
//! `rumqttc::v5::mqttbytes::v5` for 5, called packet by packet (`Publish::read`,
//! `SubAck::write`, ...) rather than through their `Packet::read`, around what they get wrong
//! for a server:
//!
//! - **Framing and the limit.** `Packet::read` compares the *remaining* length with its limit,
//!   where MQTT 5's Maximum Packet Size counts the whole packet, and it splits the frame off
//!   before parsing, so its `InsufficientBytes` means "wait" or, from inside a complete frame
//!   (a property length cut short), "malformed". Here the fixed header is read first: too large
//!   is [`DecodeError::TooLarge`] from the header alone, an incomplete frame is `Ok(None)` with
//!   nothing consumed, and every error of a per-packet reader is [`DecodeError::Malformed`].
//! - **v5 packets `Packet::read` refuses:** DISCONNECT of remaining length 0
//!   (`PayloadRequired`) and AUTH (type 15 is missing from its `PacketType`); and
//!   `Disconnect::read` fails on remaining length 1, a reason code without property length,
//!   which MQTT 5 §3.14.2.2 allows. Those are decoded here.
//! - **CONNECT is parsed here** for all three protocols: v4's `Connect::read` refuses `MQIsdp`
//!   level 3, and both `Login::read`s want a UTF-8 password (MQTT's is binary) and turn an empty
//!   username into none. The v5 property blocks are still rumqttc's (`ConnectProperties::read`,
//!   `LastWillProperties::read`).
//! - **Checks the readers skip** that the specs call malformed: reserved fixed-header flags and
//!   connect flag bit 0 (3.1.1 and 5 only: 3.1 clients set DUP on resent SUBSCRIBEs), DUP on
//!   QoS 0, packet id 0 on SUBSCRIBE/UNSUBSCRIBE, an UNSUBSCRIBE without filters, a Subscription
//!   Identifier of 0 (or any from a client's PUBLISH), Receive Maximum or Maximum Packet Size 0,
//!   bytes to spare in a 3.1.1 ack, PINGREQ, DISCONNECT or CONNECT, packets only servers send.
//! - **Encoding.** v5 `Disconnect::write` garbles every non-zero reason without properties
//!   (remaining length 1, then two bytes; with empty properties the reason is dropped), so
//!   DISCONNECT is written here. v5 `ConnAck::write` panics on 3.1.1's return codes, so only v5
//!   codes reach it. Their string writers truncate lengths over 65,535 silently, so lengths are
//!   checked first. Writers append half a packet before failing, so a failed [`encode`] leaves
//!   the buffer as it found it. `Publish::size` omits the packet id while it is 0;
//!   [`publish_size`] counts it.
//!
//! MQTT 3.1 costs the CONNECT parser accepting `MQIsdp`/3, a session-present bit forced to 0 in
//! its CONNACK (reserved in 3.1) and laxer flag checks; every other 3.1 packet is 3.1.1's.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};

use super::packet::{
    ConnAckProps, ConnCode, Connect, In, Out, PubProps, Publish, Qos, SubOpts, Version, Will,
};

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The packet is larger than the limit (its total size in bytes): MQTT 5 answers
    /// DISCONNECT 0x95.
    #[error("packet of {size} bytes is over the {max}-byte limit")]
    TooLarge {
        /// Total size the fixed header announces.
        size: usize,
        /// The limit it was held to.
        max: usize,
    },
    /// Not a valid packet of this protocol (why).
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// A CONNECT naming a protocol or level we do not speak (answer CONNACK "unacceptable
    /// protocol version", then close; the 3.1.1 form, as the client's protocol is unknown).
    #[error(
        "CONNECT for protocol {name:?} level {level}; spoken here: \
         \"MQIsdp\" 3 (MQTT 3.1), \"MQTT\" 4 (3.1.1), \"MQTT\" 5"
    )]
    UnsupportedProtocol {
        /// Protocol name as sent.
        name: String,
        /// Protocol level as sent.
        level: u8,
    },
    /// The first packet of a connection was not a CONNECT.
    #[error("the first packet of a connection must be a CONNECT")]
    NotConnect,
}

/// Why a packet could not be encoded (nothing was appended).
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// A string or binary field longer than the 65,535 bytes its length prefix can say.
    #[error("{field} is {len} bytes; MQTT strings and binary data hold at most 65535")]
    FieldTooLong {
        /// Which field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// A QoS 1 or 2 PUBLISH without a packet id.
    #[error("a QoS 1 or 2 PUBLISH needs a non-zero packet id")]
    PacketIdZero,
    /// The packet is longer than the 268,435,455 bytes a remaining length can say.
    #[error("packet longer than MQTT's 268435455-byte remaining length")]
    TooLong,
}

/// Decodes the first packet of a connection, which must be a CONNECT; the protocol comes from it.
/// Ok(None): more bytes are needed (nothing consumed).
pub fn decode_connect(
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Option<Connect>, DecodeError> {
    match buf.first() {
        None => return Ok(None),
        Some(byte1) if byte1 >> 4 != CONNECT => return Err(DecodeError::NotConnect),
        Some(_) => {}
    }
    let Some((header, bytes)) = next_frame(buf, max_packet)? else {
        return Ok(None);
    };
    parse_connect(&header, bytes).map(Some)
}

/// Decodes the next packet of a connection speaking `v`. Ok(None): more bytes needed (nothing
/// consumed). A second CONNECT is Malformed (protocol error).
pub fn decode(
    buf: &mut BytesMut,
    v: Version,
    max_packet: usize,
) -> Result<Option<In>, DecodeError> {
    let Some((header, bytes)) = next_frame(buf, max_packet)? else {
        return Ok(None);
    };
    let kind = header.kind();
    if kind == CONNECT {
        return Err(malformed("a second CONNECT"));
    }
    if matches!(kind, 2 | 9 | 11 | 13) {
        return Err(malformed(format!("{} is sent by servers only", name(kind))));
    }
    if v != Version::V31 {
        header.check_flags()?;
    }
    match v {
        Version::V31 | Version::V311 => decode_v4(&header, bytes, v),
        Version::V5 => decode_v5(&header, bytes),
    }
    .map(Some)
}

/// Appends the encoding of `out` for protocol `v`.
pub fn encode(out: &Out, v: Version, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let start = buf.len();
    let written = match v {
        Version::V31 | Version::V311 => encode_v4(out, v, buf),
        Version::V5 => encode_v5(out, buf),
    };
    if written.is_err() {
        buf.truncate(start);
    }
    written
}

/// The encoded size of a PUBLISH for `v` (so a caller can respect a client's Maximum Packet
/// Size), counting a packet id at QoS 1 and 2 even before one is assigned.
pub fn publish_size(p: &Publish, v: Version) -> usize {
    // rumqttc leaves the packet id out of the size while it is 0; one will be assigned.
    let pkid = if p.qos != Qos::AtMostOnce && p.pkid == 0 {
        1
    } else {
        p.pkid
    };
    match v {
        Version::V31 | Version::V311 => v4::Publish {
            pkid,
            ..publish_v4(p)
        }
        .size(),
        Version::V5 => v5::Publish {
            pkid,
            ..publish_v5(p)
        }
        .size(),
    }
}

// ---------------------------------------------------------------------------------------------
// Framing

/// Packet type of CONNECT.
const CONNECT: u8 = 1;

/// A fixed header read off the front of the buffer.
struct Header {
    /// Type and flags.
    byte1: u8,
    /// Bytes of the fixed header: 1 + those of the remaining length.
    len: usize,
    /// Remaining length: variable header and payload.
    remaining: usize,
}

impl Header {
    /// The packet type (1 CONNECT ... 15 AUTH).
    fn kind(&self) -> u8 {
        self.byte1 >> 4
    }

    /// The low four bits.
    fn flags(&self) -> u8 {
        self.byte1 & 0x0F
    }

    /// Size of the whole packet.
    fn total(&self) -> usize {
        self.len + self.remaining
    }

    /// MQTT 3.1.1 §2.2.2, MQTT 5 §2.1.3: reserved flags are fixed; others are malformed.
    fn check_flags(&self) -> Result<(), DecodeError> {
        let want = match self.kind() {
            3 => return Ok(()),
            6 | 8 | 10 => 0b0010,
            _ => 0,
        };
        if self.flags() == want {
            Ok(())
        } else {
            Err(malformed(format!(
                "{} with fixed-header flags {:#06b}, must be {want:#06b}",
                name(self.kind()),
                self.flags()
            )))
        }
    }

    /// rumqttc's 3.1.1 view of this header.
    fn v4(&self) -> m4::FixedHeader {
        m4::FixedHeader::new(self.byte1, self.len - 1, self.remaining)
    }

    /// rumqttc's MQTT 5 view of this header.
    fn v5(&self) -> v5::FixedHeader {
        v5::FixedHeader::new(self.byte1, self.len - 1, self.remaining)
    }
}

/// Reads the fixed header at the front of `buf`; Ok(None) while it is incomplete.
fn peek_header(buf: &[u8]) -> Result<Option<Header>, DecodeError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some(Header {
                byte1,
                len: 2 + i,
                remaining,
            }));
        }
    }
    Err(malformed("remaining length runs over 4 bytes"))
}

/// Splits off the next whole packet (fixed header included); Ok(None) until all of it is there,
/// TooLarge as soon as its fixed header is.
fn next_frame(buf: &mut BytesMut, max: usize) -> Result<Option<(Header, Bytes)>, DecodeError> {
    let Some(header) = peek_header(buf)? else {
        return Ok(None);
    };
    let size = header.total();
    if size > max {
        return Err(DecodeError::TooLarge { size, max });
    }
    if buf.len() < size {
        return Ok(None);
    }
    let bytes = buf.split_to(size).freeze();
    Ok(Some((header, bytes)))
}

/// Name of a packet type, for messages.
fn name(kind: u8) -> &'static str {
    const NAMES: [&str; 16] = [
        "reserved type 0",
        "CONNECT",
        "CONNACK",
        "PUBLISH",
        "PUBACK",
        "PUBREC",
        "PUBREL",
        "PUBCOMP",
        "SUBSCRIBE",
        "SUBACK",
        "UNSUBSCRIBE",
        "UNSUBACK",
        "PINGREQ",
        "PINGRESP",
        "DISCONNECT",
        "AUTH",
    ];
    NAMES[usize::from(kind & 0x0F)]
}

/// A [`DecodeError::Malformed`].
fn malformed(why: impl Into<String>) -> DecodeError {
    DecodeError::Malformed(why.into())
}

/// Maps a rumqttc reader's error inside a complete frame: always malformed.
fn bad<E: std::fmt::Display>(kind: u8) -> impl Fn(E) -> DecodeError {
    move |e| malformed(format!("{}: {e}", name(kind)))
}

// ---------------------------------------------------------------------------------------------
// CONNECT, all protocols

/// Parses a whole CONNECT frame.
fn parse_connect(header: &Header, mut b: Bytes) -> Result<Connect, DecodeError> {
    b.advance(header.len);
    let name = take_string(&mut b, "protocol name")?;
    let level = take_u8(&mut b, "protocol level")?;
    let version = match (name.as_str(), level) {
        ("MQIsdp", 3) => Version::V31,
        ("MQTT", 4) => Version::V311,
        ("MQTT", 5) => Version::V5,
        _ => return Err(DecodeError::UnsupportedProtocol { name, level }),
    };
    let strict = version != Version::V31;
    if strict {
        header.check_flags()?;
    }
    let flags = take_u8(&mut b, "connect flags")?;
    if strict && flags & 0x01 != 0 {
        return Err(malformed("CONNECT with the reserved connect flag set"));
    }
    let keep_alive = take_u16(&mut b, "keep alive")?;
    let props = match version {
        Version::V5 => v5::ConnectProperties::read(&mut b).map_err(bad(CONNECT))?,
        _ => None,
    };
    let client_id = take_string(&mut b, "client id")?;
    let will = parse_will(flags, version, &mut b)?;
    let username = match flags & 0x80 {
        0 => None,
        _ => Some(take_string(&mut b, "username")?),
    };
    let password = match flags & 0x40 {
        0 => None,
        _ => Some(take_binary(&mut b, "password")?),
    };
    if password.is_some() && username.is_none() && version != Version::V5 {
        return Err(malformed("CONNECT with a password but no username"));
    }
    if !b.is_empty() {
        return Err(malformed(format!(
            "{} bytes after the CONNECT payload",
            b.len()
        )));
    }

    let props = props.unwrap_or_default();
    if props.receive_maximum == Some(0) {
        return Err(malformed("CONNECT with Receive Maximum 0"));
    }
    if props.max_packet_size == Some(0) {
        return Err(malformed("CONNECT with Maximum Packet Size 0"));
    }
    Ok(Connect {
        version,
        client_id,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        session_expiry: props.session_expiry_interval,
        receive_max: props.receive_maximum,
        max_packet: props.max_packet_size,
        topic_alias_max: props.topic_alias_max,
        user: props.user_properties,
        auth_method: props.authentication_method,
        will,
        username,
        password,
    })
}

/// The will of a CONNECT, if its flags announce one.
fn parse_will(flags: u8, version: Version, b: &mut Bytes) -> Result<Option<Will>, DecodeError> {
    if flags & 0x04 == 0 {
        if flags & 0x38 != 0 {
            return Err(malformed("CONNECT with will QoS or retain but no will"));
        }
        return Ok(None);
    }
    let props = match version {
        Version::V5 => v5::LastWillProperties::read(b).map_err(bad(CONNECT))?,
        _ => None,
    };
    let topic = take_string(b, "will topic")?;
    let payload = take_binary(b, "will payload")?;
    let qos = qos((flags >> 3) & 0b11).ok_or_else(|| malformed("CONNECT with will QoS 3"))?;
    let (delay, props) = match props {
        None => (0, PubProps::default()),
        Some(p) => (
            p.delay_interval.unwrap_or(0),
            PubProps {
                payload_format: p.payload_format_indicator,
                message_expiry: p.message_expiry_interval,
                response_topic: p.response_topic,
                correlation_data: p.correlation_data,
                user: p.user_properties,
                content_type: p.content_type,
                ..PubProps::default()
            },
        ),
    };
    Ok(Some(Will {
        topic,
        payload,
        qos,
        retain: flags & 0x20 != 0,
        delay,
        props,
    }))
}

/// A byte of a CONNECT.
fn take_u8(b: &mut Bytes, what: &str) -> Result<u8, DecodeError> {
    if b.is_empty() {
        return Err(malformed(format!("CONNECT ends before its {what}")));
    }
    Ok(b.get_u8())
}

/// A two-byte integer of a CONNECT.
fn take_u16(b: &mut Bytes, what: &str) -> Result<u16, DecodeError> {
    if b.len() < 2 {
        return Err(malformed(format!("CONNECT ends before its {what}")));
    }
    Ok(b.get_u16())
}

/// Length-prefixed binary data of a CONNECT.
fn take_binary(b: &mut Bytes, what: &str) -> Result<Bytes, DecodeError> {
    let len = usize::from(take_u16(b, what)?);
    if b.len() < len {
        return Err(malformed(format!(
            "CONNECT {what} of {len} bytes runs past the packet's end"
        )));
    }
    Ok(b.split_to(len))
}

/// A length-prefixed UTF-8 string of a CONNECT.
fn take_string(b: &mut Bytes, what: &str) -> Result<String, DecodeError> {
    utf8(take_binary(b, what)?, what)
}

/// Bytes that must be UTF-8.
fn utf8(bytes: Bytes, what: &str) -> Result<String, DecodeError> {
    String::from_utf8(bytes.into()).map_err(|_| malformed(format!("{what} is not UTF-8")))
}

/// A QoS from its two bits.
fn qos(bits: u8) -> Option<Qos> {
    match bits {
        0 => Some(Qos::AtMostOnce),
        1 => Some(Qos::AtLeastOnce),
        2 => Some(Qos::ExactlyOnce),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding after CONNECT

/// Checks a packet id that must not be 0.
fn nonzero_pkid(kind: u8, pkid: u16) -> Result<(), DecodeError> {
    if pkid == 0 {
        return Err(malformed(format!("{} with packet id 0", name(kind))));
    }
    Ok(())
}

/// Checks a packet that has no variable header.
fn empty(header: &Header) -> Result<(), DecodeError> {
    if header.remaining != 0 {
        return Err(malformed(format!(
            "{} with remaining length {}, must be 0",
            name(header.kind()),
            header.remaining
        )));
    }
    Ok(())
}

/// Passes on a 3.1.1 acknowledgement that is a packet id and nothing else (rumqttc's readers
/// ignore anything after it).
fn ack(header: &Header, bytes: Bytes) -> Result<Bytes, DecodeError> {
    if header.remaining != 2 {
        return Err(malformed(format!(
            "{} with remaining length {}, must be 2",
            name(header.kind()),
            header.remaining
        )));
    }
    Ok(bytes)
}

/// One packet of MQTT 3.1 or 3.1.1 (`v` says which; 3.1 is laxer about DUP).
fn decode_v4(header: &Header, bytes: Bytes, v: Version) -> Result<In, DecodeError> {
    let kind = header.kind();
    let fh = header.v4();
    Ok(match kind {
        3 => {
            let p = v4::Publish::read(fh, bytes).map_err(bad(kind))?;
            if v == Version::V311 && p.dup && p.qos == m4::QoS::AtMostOnce {
                return Err(malformed("PUBLISH with DUP set at QoS 0"));
            }
            In::Publish(Publish {
                topic: p.topic,
                payload: p.payload,
                qos: from_m4(p.qos),
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
                props: PubProps::default(),
            })
        }
        4 => In::PubAck(
            v4::PubAck::read(fh, ack(header, bytes)?)
                .map_err(bad(kind))?
                .pkid,
        ),
        5 => In::PubRec(
            v4::PubRec::read(fh, ack(header, bytes)?)
                .map_err(bad(kind))?
                .pkid,
        ),
        6 => In::PubRel(
            v4::PubRel::read(fh, ack(header, bytes)?)
                .map_err(bad(kind))?
                .pkid,
        ),
        7 => In::PubComp(
            v4::PubComp::read(fh, ack(header, bytes)?)
                .map_err(bad(kind))?
                .pkid,
        ),
        8 => {
            let s = v4::Subscribe::read(fh, bytes).map_err(bad(kind))?;
            nonzero_pkid(kind, s.pkid)?;
            let filters = s
                .filters
                .into_iter()
                .map(|f| {
                    let opts = SubOpts {
                        qos: from_m4(f.qos),
                        no_local: false,
                        retain_as_published: false,
                        retain_handling: 0,
                    };
                    (f.path, opts)
                })
                .collect();
            In::Subscribe {
                pkid: s.pkid,
                filters,
                id: None,
            }
        }
        10 => {
            let u = v4::Unsubscribe::read(fh, bytes).map_err(bad(kind))?;
            nonzero_pkid(kind, u.pkid)?;
            if u.topics.is_empty() {
                return Err(malformed("UNSUBSCRIBE without filters"));
            }
            In::Unsubscribe {
                pkid: u.pkid,
                filters: u.topics,
            }
        }
        12 => {
            empty(header)?;
            In::PingReq
        }
        14 => {
            empty(header)?;
            In::Disconnect {
                reason: 0,
                session_expiry: None,
            }
        }
        _ => return Err(malformed(format!("{} in MQTT 3.1.1", name(kind)))),
    })
}

/// One packet of MQTT 5.
fn decode_v5(header: &Header, bytes: Bytes) -> Result<In, DecodeError> {
    let kind = header.kind();
    let fh = header.v5();
    Ok(match kind {
        3 => {
            let p = v5::Publish::read(fh, bytes).map_err(bad(kind))?;
            if p.dup && p.qos == m5::QoS::AtMostOnce {
                return Err(malformed("PUBLISH with DUP set at QoS 0"));
            }
            let props = p.properties.map(pub_props_in).unwrap_or_default();
            if !props.subscription_ids.is_empty() {
                return Err(malformed(
                    "PUBLISH from a client with a Subscription Identifier",
                ));
            }
            In::Publish(Publish {
                topic: utf8(p.topic, "PUBLISH topic")?,
                payload: p.payload,
                qos: from_m5(p.qos),
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
                props,
            })
        }
        4 => In::PubAck(v5::PubAck::read(fh, bytes).map_err(bad(kind))?.pkid),
        5 => In::PubRec(v5::PubRec::read(fh, bytes).map_err(bad(kind))?.pkid),
        6 => In::PubRel(v5::PubRel::read(fh, bytes).map_err(bad(kind))?.pkid),
        7 => In::PubComp(v5::PubComp::read(fh, bytes).map_err(bad(kind))?.pkid),
        8 => {
            let s = v5::Subscribe::read(fh, bytes).map_err(bad(kind))?;
            nonzero_pkid(kind, s.pkid)?;
            let id = s.properties.and_then(|p| p.id);
            if id == Some(0) {
                return Err(malformed("SUBSCRIBE with Subscription Identifier 0"));
            }
            let filters = s
                .filters
                .into_iter()
                .map(|f| {
                    let opts = SubOpts {
                        qos: from_m5(f.qos),
                        no_local: f.nolocal,
                        retain_as_published: f.preserve_retain,
                        retain_handling: match f.retain_forward_rule {
                            v5::RetainForwardRule::OnEverySubscribe => 0,
                            v5::RetainForwardRule::OnNewSubscribe => 1,
                            v5::RetainForwardRule::Never => 2,
                        },
                    };
                    (f.path, opts)
                })
                .collect();
            In::Subscribe {
                pkid: s.pkid,
                filters,
                id,
            }
        }
        10 => {
            let u = v5::Unsubscribe::read(fh, bytes).map_err(bad(kind))?;
            nonzero_pkid(kind, u.pkid)?;
            if u.filters.is_empty() {
                return Err(malformed("UNSUBSCRIBE without filters"));
            }
            In::Unsubscribe {
                pkid: u.pkid,
                filters: u.filters,
            }
        }
        12 => {
            empty(header)?;
            In::PingReq
        }
        14 => match header.remaining {
            // §3.14.2.1: no reason code means 0; §3.14.2.2: no property length means none.
            0 => In::Disconnect {
                reason: 0,
                session_expiry: None,
            },
            1 => {
                let reason = bytes[header.len];
                v5::DisconnectReasonCode::try_from(reason).map_err(bad(kind))?;
                In::Disconnect {
                    reason,
                    session_expiry: None,
                }
            }
            _ => {
                let d = v5::Disconnect::read(fh, bytes).map_err(bad(kind))?;
                In::Disconnect {
                    reason: d.reason_code as u8,
                    session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
                }
            }
        },
        15 => In::Auth,
        _ => return Err(malformed(name(kind))),
    })
}

/// MQTT 5 publish properties as the broker keeps them.
fn pub_props_in(p: v5::PublishProperties) -> PubProps {
    PubProps {
        payload_format: p.payload_format_indicator,
        message_expiry: p.message_expiry_interval,
        topic_alias: p.topic_alias,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user: p.user_properties,
        content_type: p.content_type,
        subscription_ids: p.subscription_identifiers,
    }
}

/// rumqttc's 3.1.1 QoS.
fn from_m4(q: m4::QoS) -> Qos {
    match q {
        m4::QoS::AtMostOnce => Qos::AtMostOnce,
        m4::QoS::AtLeastOnce => Qos::AtLeastOnce,
        m4::QoS::ExactlyOnce => Qos::ExactlyOnce,
    }
}

/// rumqttc's MQTT 5 QoS.
fn from_m5(q: m5::QoS) -> Qos {
    match q {
        m5::QoS::AtMostOnce => Qos::AtMostOnce,
        m5::QoS::AtLeastOnce => Qos::AtLeastOnce,
        m5::QoS::ExactlyOnce => Qos::ExactlyOnce,
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Checks a field against its two-byte length prefix.
fn fits(field: &'static str, len: usize) -> Result<(), EncodeError> {
    if len > usize::from(u16::MAX) {
        return Err(EncodeError::FieldTooLong { field, len });
    }
    Ok(())
}

/// Checks what a PUBLISH carries in length-prefixed fields.
fn check_publish(p: &Publish, v: Version) -> Result<(), EncodeError> {
    if p.qos != Qos::AtMostOnce && p.pkid == 0 {
        return Err(EncodeError::PacketIdZero);
    }
    fits("PUBLISH topic", p.topic.len())?;
    if v == Version::V5 {
        let props = &p.props;
        fits(
            "response topic",
            props.response_topic.as_ref().map_or(0, String::len),
        )?;
        fits(
            "correlation data",
            props.correlation_data.as_ref().map_or(0, Bytes::len),
        )?;
        fits(
            "content type",
            props.content_type.as_ref().map_or(0, String::len),
        )?;
        for (key, value) in &props.user {
            fits("user property name", key.len())?;
            fits("user property value", value.len())?;
        }
    }
    Ok(())
}

/// rumqttc's 3.1.1 QoS.
fn to_m4(q: Qos) -> m4::QoS {
    match q {
        Qos::AtMostOnce => m4::QoS::AtMostOnce,
        Qos::AtLeastOnce => m4::QoS::AtLeastOnce,
        Qos::ExactlyOnce => m4::QoS::ExactlyOnce,
    }
}

/// rumqttc's MQTT 5 QoS.
fn to_m5(q: Qos) -> m5::QoS {
    match q {
        Qos::AtMostOnce => m5::QoS::AtMostOnce,
        Qos::AtLeastOnce => m5::QoS::AtLeastOnce,
        Qos::ExactlyOnce => m5::QoS::ExactlyOnce,
    }
}

/// A PUBLISH as rumqttc's 3.1.1 writes it: properties dropped.
fn publish_v4(p: &Publish) -> v4::Publish {
    v4::Publish {
        dup: p.dup,
        qos: to_m4(p.qos),
        retain: p.retain,
        topic: p.topic.clone(),
        pkid: p.pkid,
        payload: p.payload.clone(),
    }
}

/// A PUBLISH as rumqttc's MQTT 5 writes it: never with a topic alias.
fn publish_v5(p: &Publish) -> v5::Publish {
    let props = &p.props;
    let properties = v5::PublishProperties {
        payload_format_indicator: props.payload_format,
        message_expiry_interval: props.message_expiry,
        topic_alias: None,
        response_topic: props.response_topic.clone(),
        correlation_data: props.correlation_data.clone(),
        user_properties: props.user.clone(),
        subscription_identifiers: props.subscription_ids.clone(),
        content_type: props.content_type.clone(),
    };
    v5::Publish {
        dup: p.dup,
        qos: to_m5(p.qos),
        retain: p.retain,
        topic: Bytes::copy_from_slice(p.topic.as_bytes()),
        pkid: p.pkid,
        payload: p.payload.clone(),
        properties: Some(properties),
    }
}

/// rumqttc's write errors, after the checks above: only an overlong packet is left.
fn from_w4(e: m4::Error) -> EncodeError {
    match e {
        m4::Error::PacketIdZero => EncodeError::PacketIdZero,
        _ => EncodeError::TooLong,
    }
}

/// rumqttc's MQTT 5 write errors, as [`from_w4`].
fn from_w5(e: m5::Error) -> EncodeError {
    match e {
        m5::Error::PacketIdZero => EncodeError::PacketIdZero,
        _ => EncodeError::TooLong,
    }
}

/// One packet for MQTT 3.1 or 3.1.1.
fn encode_v4(out: &Out, v: Version, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let written = match out {
        Out::ConnAck {
            session_present,
            code,
            props: _,
        } => {
            let code = match code {
                ConnCode::Success => v4::ConnectReturnCode::Success,
                ConnCode::BadProtocol => v4::ConnectReturnCode::RefusedProtocolVersion,
                // 3.1.1 closes on a malformed CONNECT without CONNACK; should one be sent
                // anyway, "identifier rejected" is the nearest refusal that does not invite a
                // retry of the same bytes.
                ConnCode::BadClientId | ConnCode::Malformed => v4::ConnectReturnCode::BadClientId,
                ConnCode::Unavailable | ConnCode::QuotaExceeded => {
                    v4::ConnectReturnCode::ServiceUnavailable
                }
                ConnCode::BadAuth => v4::ConnectReturnCode::BadUserNamePassword,
                ConnCode::NotAuthorized | ConnCode::BadAuthMethod => {
                    v4::ConnectReturnCode::NotAuthorized
                }
            };
            // 3.1's first CONNACK byte is reserved; 3.1.1 sets it only on acceptance.
            let session_present =
                *session_present && code == v4::ConnectReturnCode::Success && v == Version::V311;
            v4::ConnAck::new(code, session_present).write(buf)
        }
        Out::Publish(p) => {
            check_publish(p, v)?;
            publish_v4(p).write(buf)
        }
        Out::PubAck { pkid, reason: _ } => v4::PubAck::new(*pkid).write(buf),
        Out::PubRec { pkid, reason: _ } => v4::PubRec::new(*pkid).write(buf),
        Out::PubRel(pkid) => v4::PubRel::new(*pkid).write(buf),
        Out::PubComp(pkid) => v4::PubComp::new(*pkid).write(buf),
        Out::SubAck { pkid, codes } => {
            let codes = codes
                .iter()
                .map(|&c| match qos(c) {
                    Some(q) => v4::SubscribeReasonCode::Success(to_m4(q)),
                    None => v4::SubscribeReasonCode::Failure,
                })
                .collect();
            v4::SubAck::new(*pkid, codes).write(buf)
        }
        Out::UnsubAck { pkid, codes: _ } => v4::UnsubAck::new(*pkid).write(buf),
        Out::PingResp => v4::PingResp.write(buf),
        // 3.1.1 has no server DISCONNECT: the caller closes.
        Out::Disconnect { reason: _ } => Ok(0),
    };
    written.map(drop).map_err(from_w4)
}

/// One packet for MQTT 5.
fn encode_v5(out: &Out, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let written = match out {
        Out::ConnAck {
            session_present,
            code,
            props,
        } => {
            let code = match code {
                ConnCode::Success => v5::ConnectReturnCode::Success,
                ConnCode::Malformed => v5::ConnectReturnCode::MalformedPacket,
                ConnCode::BadProtocol => v5::ConnectReturnCode::UnsupportedProtocolVersion,
                ConnCode::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                ConnCode::BadAuth => v5::ConnectReturnCode::BadUserNamePassword,
                ConnCode::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
                ConnCode::Unavailable => v5::ConnectReturnCode::ServerUnavailable,
                ConnCode::BadAuthMethod => v5::ConnectReturnCode::BadAuthenticationMethod,
                ConnCode::QuotaExceeded => v5::ConnectReturnCode::QuotaExceeded,
            };
            let connack = v5::ConnAck {
                session_present: *session_present && code == v5::ConnectReturnCode::Success,
                code,
                properties: Some(connack_props(props)?),
            };
            connack.write(buf)
        }
        Out::Publish(p) => {
            check_publish(p, Version::V5)?;
            publish_v5(p).write(buf)
        }
        Out::PubAck { pkid, reason } => {
            let reason = match reason {
                0x00 => v5::PubAckReason::Success,
                0x10 => v5::PubAckReason::NoMatchingSubscribers,
                0x83 => v5::PubAckReason::ImplementationSpecificError,
                0x87 => v5::PubAckReason::NotAuthorized,
                0x90 => v5::PubAckReason::TopicNameInvalid,
                0x91 => v5::PubAckReason::PacketIdentifierInUse,
                0x97 => v5::PubAckReason::QuotaExceeded,
                0x99 => v5::PubAckReason::PayloadFormatInvalid,
                _ => v5::PubAckReason::UnspecifiedError,
            };
            v5::PubAck {
                pkid: *pkid,
                reason,
                properties: None,
            }
            .write(buf)
        }
        Out::PubRec { pkid, reason } => {
            let reason = match reason {
                0x00 => v5::PubRecReason::Success,
                0x10 => v5::PubRecReason::NoMatchingSubscribers,
                0x83 => v5::PubRecReason::ImplementationSpecificError,
                0x87 => v5::PubRecReason::NotAuthorized,
                0x90 => v5::PubRecReason::TopicNameInvalid,
                0x91 => v5::PubRecReason::PacketIdentifierInUse,
                0x97 => v5::PubRecReason::QuotaExceeded,
                0x99 => v5::PubRecReason::PayloadFormatInvalid,
                _ => v5::PubRecReason::UnspecifiedError,
            };
            v5::PubRec {
                pkid: *pkid,
                reason,
                properties: None,
            }
            .write(buf)
        }
        Out::PubRel(pkid) => v5::PubRel::new(*pkid, None).write(buf),
        Out::PubComp(pkid) => v5::PubComp::new(*pkid, None).write(buf),
        Out::SubAck { pkid, codes } => {
            let return_codes = codes
                .iter()
                .map(|&c| match (qos(c), c) {
                    (Some(q), _) => v5::SubscribeReasonCode::Success(to_m5(q)),
                    (None, 0x83) => v5::SubscribeReasonCode::ImplementationSpecific,
                    (None, 0x87) => v5::SubscribeReasonCode::NotAuthorized,
                    (None, 0x8F) => v5::SubscribeReasonCode::TopicFilterInvalid,
                    (None, 0x91) => v5::SubscribeReasonCode::PkidInUse,
                    (None, 0x97) => v5::SubscribeReasonCode::QuotaExceeded,
                    (None, 0x9E) => v5::SubscribeReasonCode::SharedSubscriptionsNotSupported,
                    (None, 0xA1) => v5::SubscribeReasonCode::SubscriptionIdNotSupported,
                    (None, 0xA2) => v5::SubscribeReasonCode::WildcardSubscriptionsNotSupported,
                    (None, _) => v5::SubscribeReasonCode::Unspecified,
                })
                .collect();
            v5::SubAck {
                pkid: *pkid,
                return_codes,
                properties: None,
            }
            .write(buf)
        }
        Out::UnsubAck { pkid, codes } => {
            let reasons = codes
                .iter()
                .map(|&c| match c {
                    0x00 => v5::UnsubAckReason::Success,
                    0x11 => v5::UnsubAckReason::NoSubscriptionExisted,
                    0x83 => v5::UnsubAckReason::ImplementationSpecificError,
                    0x87 => v5::UnsubAckReason::NotAuthorized,
                    0x8F => v5::UnsubAckReason::TopicFilterInvalid,
                    0x91 => v5::UnsubAckReason::PacketIdentifierInUse,
                    _ => v5::UnsubAckReason::UnspecifiedError,
                })
                .collect();
            v5::UnsubAck {
                pkid: *pkid,
                reasons,
                properties: None,
            }
            .write(buf)
        }
        Out::PingResp => v5::PingResp::write(buf),
        Out::Disconnect { reason } => {
            // Reason code and an empty property length, by hand: see the module header.
            buf.put_slice(&[0xE0, 0x02, *reason, 0x00]);
            Ok(4)
        }
    };
    written.map(drop).map_err(from_w5)
}

/// CONNACK properties as rumqttc's MQTT 5 writes them.
fn connack_props(p: &ConnAckProps) -> Result<v5::ConnAckProperties, EncodeError> {
    let assigned = p.assigned_client_id.clone();
    fits(
        "assigned client id",
        assigned.as_ref().map_or(0, String::len),
    )?;
    fits(
        "reason string",
        p.reason_string.as_ref().map_or(0, String::len),
    )?;
    Ok(v5::ConnAckProperties {
        session_expiry_interval: p.session_expiry,
        receive_max: p.receive_max,
        max_qos: p.max_qos,
        retain_available: p.retain_available.map(u8::from),
        max_packet_size: p.max_packet,
        assigned_client_identifier: assigned,
        topic_alias_max: p.topic_alias_max,
        reason_string: p.reason_string.clone(),
        user_properties: Vec::new(),
        wildcard_subscription_available: p.wildcard_available.map(u8::from),
        subscription_identifiers_available: p.sub_ids_available.map(u8::from),
        shared_subscription_available: p.shared_available.map(u8::from),
        server_keep_alive: p.server_keep_alive,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Ample limit for tests that are not about the limit.
    const MAX: usize = 1 << 20;

    /// A packet: `byte1`, the remaining length of `body`, `body`.
    pub(crate) fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![byte1];
        let mut len = body.len();
        loop {
            let digit = (len % 128) as u8;
            len /= 128;
            out.push(if len > 0 { digit | 0x80 } else { digit });
            if len == 0 {
                break;
            }
        }
        out.extend_from_slice(body);
        out
    }

    /// A length-prefixed string or binary field.
    pub(crate) fn s(x: &[u8]) -> Vec<u8> {
        let mut out = (x.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(x);
        out
    }

    /// An MQTT 5 property block: its length, then the properties.
    fn props(p: &[u8]) -> Vec<u8> {
        assert!(p.len() < 128, "one-byte property lengths only");
        let mut out = vec![p.len() as u8];
        out.extend_from_slice(p);
        out
    }

    /// Decodes one whole packet that must be all of `bytes`.
    fn dec(bytes: &[u8], v: Version) -> Result<In, DecodeError> {
        let mut buf = BytesMut::from(bytes);
        let got = decode(&mut buf, v, MAX)?;
        let packet = got.expect("a whole packet decodes");
        assert!(buf.is_empty(), "{} bytes left after {packet:?}", buf.len());
        Ok(packet)
    }

    /// Decodes one whole CONNECT that must be all of `bytes`.
    fn dec_connect(bytes: &[u8]) -> Result<Connect, DecodeError> {
        let mut buf = BytesMut::from(bytes);
        let connect = decode_connect(&mut buf, MAX)?.expect("a whole CONNECT decodes");
        assert!(buf.is_empty(), "{} bytes left after the CONNECT", buf.len());
        Ok(connect)
    }

    /// Encodes into a fresh buffer.
    fn enc(out: &Out, v: Version) -> Vec<u8> {
        let mut buf = BytesMut::new();
        encode(out, v, &mut buf).unwrap();
        buf.to_vec()
    }

    /// Asserts a Malformed and returns its reason.
    #[track_caller]
    fn malformed_reason<T: std::fmt::Debug>(r: Result<T, DecodeError>) -> String {
        match r {
            Err(DecodeError::Malformed(why)) => why,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    /// A CONNECT with nothing optional, for `version`.
    fn bare_connect(version: Version, client_id: &str) -> Connect {
        Connect {
            version,
            client_id: client_id.into(),
            clean_start: true,
            keep_alive: 0,
            session_expiry: None,
            receive_max: None,
            max_packet: None,
            topic_alias_max: None,
            user: vec![],
            auth_method: None,
            will: None,
            username: None,
            password: None,
        }
    }

    /// MQTT 3.1.1 §3.1: keep-alive 0, clean session, empty client id.
    const CONNECT_311: [u8; 14] = [
        0x10, 0x0C, // CONNECT, remaining length 12
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, // protocol name and level
        0x02, // clean session
        0x00, 0x00, // keep alive 0
        0x00, 0x00, // client id ""
    ];

    /// MQTT 3.1: MQIsdp/3 with a retained QoS 1 will, username and password.
    const CONNECT_31: [u8; 53] = [
        0x10, 0x33, // CONNECT, remaining length 51
        0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, // protocol name and level
        0xEE, // username, password, will retain, will QoS 1, will, clean session
        0x00, 0x3C, // keep alive 60
        0x00, 0x04, b'p', b'i', b'-', b'1', // client id
        0x00, 0x0A, b'p', b'i', b'-', b'1', b'/', b's', b't', b'a', b't', b'e', // will topic
        0x00, 0x04, b'g', b'o', b'n', b'e', // will payload
        0x00, 0x05, b'a', b'l', b'i', b'c', b'e', // username
        0x00, 0x06, b's', b'3', b'c', b'r', b'e', b't', // password
    ];

    /// MQTT 5 §3.1 with session expiry, receive maximum, maximum packet size, topic alias
    /// maximum, repeated user properties, a will with delay and properties, and a password that
    /// is not UTF-8.
    fn connect_v5() -> Vec<u8> {
        let connect_props = [
            &[0x11, 0x00, 0x00, 0x0E, 0x10][..], // session expiry 3600
            &[0x21, 0x00, 0x14],                 // receive maximum 20
            &[0x27, 0x00, 0x00, 0x10, 0x00],     // maximum packet size 4096
            &[0x22, 0x00, 0x05],                 // topic alias maximum 5
            &[0x26],
            &s(b"site"),
            &s(b"north"), // user property
            &[0x26],
            &s(b"site"),
            &s(b"south"), // the same name again
        ]
        .concat();
        let will_props = [
            &[0x18, 0x00, 0x00, 0x00, 0x1E][..], // will delay 30
            &[0x01, 0x01],                       // payload is UTF-8
            &[0x02, 0x00, 0x00, 0x00, 0x3C],     // message expiry 60
            &[0x03],
            &s(b"text/plain"), // content type
            &[0x26],
            &s(b"k"),
            &s(b"v"), // user property
        ]
        .concat();
        let body = [
            &s(b"MQTT")[..],
            // Level 5; username, password, will QoS 1, will, clean start; keep alive 30.
            &[0x05, 0xCE, 0x00, 0x1E],
            &props(&connect_props),
            &s(b"dev-1"),
            &props(&will_props),
            &s(b"dev/1/status"),
            &s(b"gone"),
            &s(b"u"),
            &s(&[0xFF, 0x00, 0x80]),
        ]
        .concat();
        frame(0x10, &body)
    }

    #[test]
    fn connect_311_keep_alive_0_empty_client_id() {
        assert_eq!(
            dec_connect(&CONNECT_311).unwrap(),
            bare_connect(Version::V311, "")
        );
    }

    #[test]
    fn connect_31_mqisdp_with_will_and_login() {
        let c = dec_connect(&CONNECT_31).unwrap();
        let want = Connect {
            keep_alive: 60,
            will: Some(Will {
                topic: "pi-1/state".into(),
                payload: Bytes::from_static(b"gone"),
                qos: Qos::AtLeastOnce,
                retain: true,
                delay: 0,
                props: PubProps::default(),
            }),
            username: Some("alice".into()),
            password: Some(Bytes::from_static(b"s3cret")),
            ..bare_connect(Version::V31, "pi-1")
        };
        assert_eq!(c, want);
    }

    #[test]
    fn connect_v5_properties_and_will() {
        let c = dec_connect(&connect_v5()).unwrap();
        let want = Connect {
            keep_alive: 30,
            session_expiry: Some(3600),
            receive_max: Some(20),
            max_packet: Some(4096),
            topic_alias_max: Some(5),
            user: vec![
                ("site".into(), "north".into()),
                ("site".into(), "south".into()),
            ],
            will: Some(Will {
                topic: "dev/1/status".into(),
                payload: Bytes::from_static(b"gone"),
                qos: Qos::AtLeastOnce,
                retain: false,
                delay: 30,
                props: PubProps {
                    payload_format: Some(1),
                    message_expiry: Some(60),
                    content_type: Some("text/plain".into()),
                    user: vec![("k".into(), "v".into())],
                    ..PubProps::default()
                },
            }),
            username: Some("u".into()),
            password: Some(Bytes::from_static(&[0xFF, 0x00, 0x80])),
            ..bare_connect(Version::V5, "dev-1")
        };
        assert_eq!(c, want);
    }

    #[test]
    fn connect_binary_password_and_empty_username_survive() {
        // rumqttc's Login::read would refuse the password and drop the empty username.
        let body = [
            &s(b"MQTT")[..],
            &[0x04, 0xC2, 0x00, 0x0A],
            &s(b"c"),
            &s(b""),
            &s(&[0xC3, 0x28]),
        ]
        .concat();
        let c = dec_connect(&frame(0x10, &body)).unwrap();
        assert_eq!(c.username.as_deref(), Some(""));
        assert_eq!(c.password.as_deref(), Some(&[0xC3, 0x28][..]));
        assert_eq!(c.keep_alive, 10);
    }

    #[test]
    fn connect_password_without_username_only_in_v5() {
        let v311 = [&s(b"MQTT")[..], &[0x04, 0x42, 0, 0], &s(b"c"), &s(b"pw")].concat();
        let why = malformed_reason(dec_connect(&frame(0x10, &v311)));
        assert!(why.contains("password but no username"), "{why}");

        let v5 = [
            &s(b"MQTT")[..],
            &[0x05, 0x42, 0, 0, 0x00],
            &s(b"c"),
            &s(b"pw"),
        ]
        .concat();
        let c = dec_connect(&frame(0x10, &v5)).unwrap();
        assert_eq!(
            (c.username, c.password),
            (None, Some(Bytes::from_static(b"pw")))
        );
    }

    #[test]
    fn connect_unknown_protocol_is_unsupported() {
        for (name, level) in [("MQTT", 3), ("MQTT", 6), ("MQIsdp", 4), ("MQTT-SN", 4)] {
            let body = [&s(name.as_bytes())[..], &[level, 0x02, 0, 0], &s(b"c")].concat();
            match dec_connect(&frame(0x10, &body)) {
                Err(DecodeError::UnsupportedProtocol { name: n, level: l }) => {
                    assert_eq!((n.as_str(), l), (name, level));
                }
                other => panic!("{name} {level}: {other:?}"),
            }
        }
    }

    #[test]
    fn first_packet_not_connect() {
        // Known from the first byte: no need to wait for the rest.
        let mut one = BytesMut::from(&[0xC0][..]);
        assert!(matches!(
            decode_connect(&mut one, MAX),
            Err(DecodeError::NotConnect)
        ));
        let mut get = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(matches!(
            decode_connect(&mut get, MAX),
            Err(DecodeError::NotConnect)
        ));
        assert!(matches!(
            decode_connect(&mut BytesMut::new(), MAX),
            Ok(None)
        ));
    }

    #[test]
    fn connect_reserved_flags_malformed_except_in_31() {
        let mut flag0 = CONNECT_311;
        flag0[9] = 0x03;
        let why = malformed_reason(dec_connect(&flag0));
        assert!(why.contains("reserved connect flag"), "{why}");
        let mut header = CONNECT_311;
        header[0] = 0x12;
        malformed_reason(dec_connect(&header));

        let mut flag0_31 = CONNECT_31;
        flag0_31[11] |= 0x01;
        assert!(dec_connect(&flag0_31).unwrap().clean_start);
    }

    #[test]
    fn connect_will_flags_checked() {
        // Will QoS 3.
        let mut qos3 = CONNECT_31;
        qos3[11] = 0xFE;
        let why = malformed_reason(dec_connect(&qos3));
        assert!(why.contains("will QoS 3"), "{why}");
        // Will QoS and retain without a will.
        let mut stray = CONNECT_311;
        stray[9] = 0x2A;
        let why = malformed_reason(dec_connect(&stray));
        assert!(why.contains("no will"), "{why}");
    }

    #[test]
    fn connect_trailing_bytes_bad_utf8_and_zero_limits_malformed() {
        let mut trailing = CONNECT_311.to_vec();
        trailing[1] += 1;
        trailing.push(0x00);
        let why = malformed_reason(dec_connect(&trailing));
        assert!(why.contains("1 bytes after"), "{why}");

        let bad_id = [&s(b"MQTT")[..], &[0x04, 0x02, 0, 0], &s(&[0xFF])].concat();
        let why = malformed_reason(dec_connect(&frame(0x10, &bad_id)));
        assert!(why.contains("client id is not UTF-8"), "{why}");

        for zero in [&[0x21, 0x00, 0x00][..], &[0x27, 0, 0, 0, 0]] {
            let body = [&s(b"MQTT")[..], &[0x05, 0x02, 0, 0], &props(zero), &s(b"c")].concat();
            malformed_reason(dec_connect(&frame(0x10, &body)));
        }
    }

    #[test]
    fn connect_written_by_rumqttc_decodes() {
        // Someone else's encoder against our CONNECT parser, both protocols.
        let mut buf = BytesMut::new();
        let mut c4 = v4::Connect::new("sensor-7");
        c4.keep_alive = 15;
        c4.last_will = Some(v4::LastWill::new("s/7", "bye", m4::QoS::ExactlyOnce, false));
        c4.set_login("bob", "pw");
        c4.write(&mut buf).unwrap();
        let got = decode_connect(&mut buf, MAX).unwrap().unwrap();
        assert_eq!(got.version, Version::V311);
        assert_eq!((got.client_id.as_str(), got.keep_alive), ("sensor-7", 15));
        let will = got.will.unwrap();
        assert_eq!((will.topic.as_str(), will.qos), ("s/7", Qos::ExactlyOnce));
        assert_eq!(got.password.as_deref(), Some(&b"pw"[..]));

        let c5 = v5::Connect {
            keep_alive: 5,
            client_id: "x".into(),
            clean_start: false,
            properties: Some(v5::ConnectProperties {
                session_expiry_interval: Some(7),
                user_properties: vec![("a".into(), "b".into())],
                ..v5::ConnectProperties::new()
            }),
        };
        c5.write(&None, &Some(v5::Login::new("u", "p")), &mut buf)
            .unwrap();
        let got = decode_connect(&mut buf, MAX).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(got.version, Version::V5);
        assert!(!got.clean_start);
        assert_eq!(got.session_expiry, Some(7));
        assert_eq!(got.user, vec![("a".to_string(), "b".to_string())]);
        assert_eq!(got.username.as_deref(), Some("u"));
    }

    #[test]
    fn too_large_from_the_fixed_header_alone() {
        // Remaining length 65535 announced; only the 4-byte header has arrived.
        let mut connect = BytesMut::from(&[0x10, 0xFF, 0xFF, 0x03][..]);
        match decode_connect(&mut connect, 1024) {
            Err(DecodeError::TooLarge { size, max }) => assert_eq!((size, max), (65539, 1024)),
            other => panic!("{other:?}"),
        }
        for v in [Version::V31, Version::V311, Version::V5] {
            let mut publish = BytesMut::from(&[0x30, 0xFF, 0x7F][..]);
            match decode(&mut publish, v, 16385) {
                Err(DecodeError::TooLarge { size, max }) => assert_eq!((size, max), (16386, 16385)),
                other => panic!("{v:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn limit_counts_the_whole_packet() {
        let publish = frame(0x30, &[&s(b"a/b")[..], b"payload"].concat());
        let total = publish.len();
        let mut exact = BytesMut::from(&publish[..]);
        assert!(matches!(
            decode(&mut exact, Version::V311, total),
            Ok(Some(In::Publish(_)))
        ));
        let mut over = BytesMut::from(&publish[..]);
        match decode(&mut over, Version::V311, total - 1) {
            Err(DecodeError::TooLarge { size, .. }) => assert_eq!(size, total),
            other => panic!("{other:?}"),
        }
        let mut ping = BytesMut::from(&[0xC0, 0x00][..]);
        assert!(matches!(
            decode(&mut ping, Version::V5, 1),
            Err(DecodeError::TooLarge { size: 2, max: 1 })
        ));
        let mut connect = BytesMut::from(&CONNECT_311[..]);
        assert!(decode_connect(&mut connect, CONNECT_311.len())
            .unwrap()
            .is_some());
    }

    #[test]
    fn remaining_length_over_four_bytes_malformed() {
        let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        let why = malformed_reason(decode(&mut buf, Version::V311, usize::MAX));
        assert!(why.contains("remaining length"), "{why}");
    }

    /// Valid packets of each kind, for the framing tests.
    fn samples() -> Vec<(Option<Version>, Vec<u8>)> {
        let v5_publish = frame(
            0x32,
            &[
                &s(b"t/1")[..],
                &[0x00, 0x0A],
                &props(&[0x23, 0x00, 0x05]),
                b"hi",
            ]
            .concat(),
        );
        // A 200-byte payload: a two-byte remaining length.
        let long_publish = frame(0x30, &[&s(b"t")[..], &[0x55; 200]].concat());
        vec![
            (None, CONNECT_311.to_vec()),
            (None, CONNECT_31.to_vec()),
            (None, connect_v5()),
            (Some(Version::V311), long_publish),
            (
                Some(Version::V311),
                vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'#', 0x01],
            ),
            (Some(Version::V311), vec![0x40, 0x02, 0x00, 0x07]),
            (Some(Version::V5), v5_publish),
            (Some(Version::V5), vec![0xE0, 0x00]),
            (Some(Version::V5), vec![0xE0, 0x01, 0x04]),
            (Some(Version::V5), vec![0x62, 0x02, 0x00, 0x08]),
            (Some(Version::V5), vec![0xC0, 0x00]),
        ]
    }

    #[test]
    fn every_prefix_needs_more_and_consumes_nothing() {
        for (v, packet) in samples() {
            for n in 0..packet.len() {
                let mut buf = BytesMut::from(&packet[..n]);
                let more = match v {
                    None => decode_connect(&mut buf, MAX).map(|c| c.is_none()),
                    Some(v) => decode(&mut buf, v, MAX).map(|p| p.is_none()),
                };
                assert!(
                    more.unwrap(),
                    "{v:?} {packet:02X?}: prefix of {n} bytes decoded"
                );
                assert_eq!(
                    &buf[..],
                    &packet[..n],
                    "{v:?}: prefix of {n} bytes consumed"
                );
            }
        }
    }

    #[test]
    fn a_whole_packet_consumes_exactly_itself() {
        for (v, packet) in samples() {
            let mut buf = BytesMut::from(&[&packet[..], &[0xC0, 0x00]].concat()[..]);
            let decoded = match v {
                None => decode_connect(&mut buf, MAX).map(|c| c.is_some()),
                Some(v) => decode(&mut buf, v, MAX).map(|p| p.is_some()),
            };
            assert!(decoded.unwrap(), "{v:?} {packet:02X?}");
            assert_eq!(&buf[..], &[0xC0, 0x00], "{v:?}: the next packet must stay");
        }
    }

    #[test]
    fn disconnect_v5_short_forms() {
        let normal = In::Disconnect {
            reason: 0,
            session_expiry: None,
        };
        assert_eq!(dec(&[0xE0, 0x00], Version::V5).unwrap(), normal);
        let with_will = In::Disconnect {
            reason: 0x04,
            session_expiry: None,
        };
        assert_eq!(dec(&[0xE0, 0x01, 0x04], Version::V5).unwrap(), with_will);
        assert_eq!(
            dec(&[0xE0, 0x02, 0x04, 0x00], Version::V5).unwrap(),
            with_will
        );
        let expiry = [0xE0, 0x07, 0x00, 0x05, 0x11, 0x00, 0x00, 0x00, 0x3C];
        let want = In::Disconnect {
            reason: 0,
            session_expiry: Some(60),
        };
        assert_eq!(dec(&expiry, Version::V5).unwrap(), want);
    }

    #[test]
    fn disconnect_bad_forms_malformed() {
        malformed_reason(dec(&[0xE0, 0x01, 0x03], Version::V5)); // no such reason
        malformed_reason(dec(&[0xE1, 0x00], Version::V5)); // reserved flags
        malformed_reason(dec(&[0xE0, 0x01, 0x00], Version::V311)); // 3.1.1 has no reason
        let normal = In::Disconnect {
            reason: 0,
            session_expiry: None,
        };
        assert_eq!(dec(&[0xE0, 0x00], Version::V311).unwrap(), normal);
        assert_eq!(dec(&[0xE0, 0x00], Version::V31).unwrap(), normal);
    }

    #[test]
    fn acks_v5_remaining_length_2_3_and_4() {
        let v = Version::V5;
        assert_eq!(dec(&[0x40, 0x02, 0x00, 0x07], v).unwrap(), In::PubAck(7));
        assert_eq!(dec(&[0x50, 0x02, 0x00, 0x07], v).unwrap(), In::PubRec(7));
        assert_eq!(dec(&[0x62, 0x02, 0x00, 0x08], v).unwrap(), In::PubRel(8));
        assert_eq!(dec(&[0x70, 0x02, 0x00, 0x09], v).unwrap(), In::PubComp(9));
        assert_eq!(
            dec(&[0x40, 0x03, 0x00, 0x07, 0x10], v).unwrap(),
            In::PubAck(7)
        );
        assert_eq!(
            dec(&[0x40, 0x04, 0x00, 0x07, 0x10, 0x00], v).unwrap(),
            In::PubAck(7)
        );
        assert_eq!(
            dec(&[0x62, 0x03, 0x01, 0x00, 0x92], v).unwrap(),
            In::PubRel(256)
        );
        malformed_reason(dec(&[0x40, 0x03, 0x00, 0x07, 0x42], v)); // no such reason
        malformed_reason(dec(&[0x60, 0x02, 0x00, 0x08], v)); // PUBREL flags must be 0010
    }

    #[test]
    fn acks_311_are_a_packet_id_only() {
        let v = Version::V311;
        assert_eq!(dec(&[0x40, 0x02, 0x00, 0x07], v).unwrap(), In::PubAck(7));
        assert_eq!(dec(&[0x62, 0x02, 0x00, 0x08], v).unwrap(), In::PubRel(8));
        malformed_reason(dec(&[0x40, 0x03, 0x00, 0x07, 0x00], v));
        malformed_reason(dec(&[0x40, 0x00], v));
        malformed_reason(dec(&[0x60, 0x02, 0x00, 0x08], v));
        // 3.1 is not held to the reserved flags.
        assert_eq!(
            dec(&[0x60, 0x02, 0x00, 0x08], Version::V31).unwrap(),
            In::PubRel(8)
        );
    }

    #[test]
    fn publish_311() {
        let qos0 = [0x30, 0x07, 0x00, 0x03, b'a', b'/', b'b', 0x01, 0x02];
        let want = Publish {
            topic: "a/b".into(),
            payload: Bytes::from_static(&[0x01, 0x02]),
            qos: Qos::AtMostOnce,
            retain: false,
            dup: false,
            pkid: 0,
            props: PubProps::default(),
        };
        assert_eq!(
            dec(&qos0, Version::V311).unwrap(),
            In::Publish(want.clone())
        );
        // DUP, QoS 2, retain; packet id 10.
        let qos2 = [0x3D, 0x08, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, 0xFF];
        let want = Publish {
            payload: Bytes::from_static(&[0xFF]),
            qos: Qos::ExactlyOnce,
            retain: true,
            dup: true,
            pkid: 10,
            ..want
        };
        assert_eq!(dec(&qos2, Version::V311).unwrap(), In::Publish(want));
    }

    #[test]
    fn publish_v5_topic_alias_and_user_properties() {
        let p = [
            &[0x23, 0x00, 0x05][..], // topic alias 5
            &[0x26],
            &s(b"a"),
            &s(b"1"),
            &[0x26],
            &s(b"b"),
            &s(b"2"),
            &[0x26],
            &s(b"a"),
            &s(b"3"),
            &[0x02, 0x00, 0x00, 0x00, 0x0A], // message expiry 10
        ]
        .concat();
        let bytes = frame(
            0x32,
            &[&s(b"t/1")[..], &[0x00, 0x0A], &props(&p), b"hi"].concat(),
        );
        let want = Publish {
            topic: "t/1".into(),
            payload: Bytes::from_static(b"hi"),
            qos: Qos::AtLeastOnce,
            retain: false,
            dup: false,
            pkid: 10,
            props: PubProps {
                topic_alias: Some(5),
                message_expiry: Some(10),
                user: vec![
                    ("a".into(), "1".into()),
                    ("b".into(), "2".into()),
                    ("a".into(), "3".into()),
                ],
                ..PubProps::default()
            },
        };
        assert_eq!(dec(&bytes, Version::V5).unwrap(), In::Publish(want));

        // The alias stands for the topic: an empty topic name.
        let alias_only = frame(
            0x30,
            &[&s(b"")[..], &props(&[0x23, 0x00, 0x02]), b"x"].concat(),
        );
        match dec(&alias_only, Version::V5).unwrap() {
            In::Publish(p) => assert_eq!((p.topic.as_str(), p.props.topic_alias), ("", Some(2))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn publish_v5_needs_its_property_length() {
        // Whole as a frame, but the property length is missing: rumqttc says InsufficientBytes
        // from inside the frame, which must not read as "wait for more".
        let bytes = [0x30, 0x05, 0x00, 0x03, b'a', b'/', b'b'];
        malformed_reason(dec(&bytes, Version::V5));
        match dec(&bytes, Version::V311).unwrap() {
            In::Publish(p) => assert!(p.topic == "a/b" && p.payload.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn publish_bad_qos_dup_pkid_and_utf8_malformed() {
        let qos3 = [0x36, 0x07, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x01];
        for v in [Version::V31, Version::V311, Version::V5] {
            let why = malformed_reason(dec(&qos3, v));
            assert!(why.contains("QoS"), "{v:?}: {why}");
        }
        let dup0 = [0x38, 0x05, 0x00, 0x03, b'a', b'/', b'b'];
        malformed_reason(dec(&dup0, Version::V311));
        assert!(matches!(dec(&dup0, Version::V31), Ok(In::Publish(p)) if p.dup));
        malformed_reason(dec(
            &[0x38, 0x06, 0x00, 0x03, b'a', b'/', b'b', 0x00],
            Version::V5,
        ));
        let pkid0 = [0x32, 0x07, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x00];
        malformed_reason(dec(&pkid0, Version::V311));

        let bad_topic = [0x30, 0x04, 0x00, 0x02, 0xC3, 0x28];
        malformed_reason(dec(&bad_topic, Version::V311));
        let bad_topic_v5 = [0x30, 0x05, 0x00, 0x02, 0xC3, 0x28, 0x00];
        let why = malformed_reason(dec(&bad_topic_v5, Version::V5));
        assert!(why.contains("not UTF-8"), "{why}");
    }

    #[test]
    fn publish_v5_from_client_with_subscription_id_malformed() {
        let bytes = frame(0x30, &[&s(b"t")[..], &props(&[0x0B, 0x01])].concat());
        malformed_reason(dec(&bytes, Version::V5));
    }

    /// SubOpts with only a QoS.
    fn opts(qos: Qos) -> SubOpts {
        SubOpts {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
        }
    }

    #[test]
    fn subscribe_311_several_filters() {
        let bytes = [
            0x82, 0x14, // SUBSCRIBE, remaining length 20
            0x01, 0x04, // packet id 260
            0x00, 0x03, b'a', b'/', b'+', 0x00, // a/+ at QoS 0
            0x00, 0x01, b'#', 0x01, // # at QoS 1
            0x00, 0x05, b'a', b'/', b'b', b'/', b'c', 0x02, // a/b/c at QoS 2
        ];
        let want = In::Subscribe {
            pkid: 260,
            filters: vec![
                ("a/+".into(), opts(Qos::AtMostOnce)),
                ("#".into(), opts(Qos::AtLeastOnce)),
                ("a/b/c".into(), opts(Qos::ExactlyOnce)),
            ],
            id: None,
        };
        assert_eq!(dec(&bytes, Version::V311).unwrap(), want);
        assert_eq!(dec(&bytes, Version::V31).unwrap(), want);
    }

    #[test]
    fn subscribe_v5_options_and_identifier() {
        let body = [
            &[0x00, 0x0B][..],
            &props(&[0x0B, 0xC8, 0x01]), // subscription identifier 200
            &s(b"a/+"),
            &[0x2D], // QoS 1, no local, retain as published, retain handling 2
            &s(b"#"),
            &[0x12], // QoS 2, retain handling 1
            &s(b"x"),
            &[0x00],
        ]
        .concat();
        let want = In::Subscribe {
            pkid: 11,
            filters: vec![
                (
                    "a/+".into(),
                    SubOpts {
                        qos: Qos::AtLeastOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: 2,
                    },
                ),
                (
                    "#".into(),
                    SubOpts {
                        retain_handling: 1,
                        ..opts(Qos::ExactlyOnce)
                    },
                ),
                ("x".into(), opts(Qos::AtMostOnce)),
            ],
            id: Some(200),
        };
        assert_eq!(dec(&frame(0x82, &body), Version::V5).unwrap(), want);
    }

    #[test]
    fn subscribe_bad_forms_malformed() {
        let one = [0x00, 0x01, 0x00, 0x01, b'#', 0x01];
        // Reserved flags: malformed in 3.1.1, tolerated from 3.1 clients (DUP on a resend).
        malformed_reason(dec(&frame(0x80, &one), Version::V311));
        assert!(dec(&frame(0x8A, &one), Version::V31).is_ok());
        // Packet id 0, QoS 3, no filters.
        malformed_reason(dec(
            &frame(0x82, &[0x00, 0x00, 0x00, 0x01, b'#', 0x01]),
            Version::V311,
        ));
        malformed_reason(dec(
            &frame(0x82, &[0x00, 0x01, 0x00, 0x01, b'#', 0x03]),
            Version::V311,
        ));
        malformed_reason(dec(&frame(0x82, &[0x00, 0x01]), Version::V311));
        // v5: retain handling 3, subscription identifier 0, no filters.
        let v5 = |p: &[u8], o: u8| {
            frame(
                0x82,
                &[&[0x00, 0x01][..], &props(p), &s(b"#"), &[o]].concat(),
            )
        };
        assert!(dec(&v5(&[], 0x20), Version::V5).is_ok());
        malformed_reason(dec(&v5(&[], 0x30), Version::V5));
        malformed_reason(dec(&v5(&[0x0B, 0x00], 0x00), Version::V5));
        malformed_reason(dec(&frame(0x82, &[0x00, 0x01, 0x00]), Version::V5));
    }

    #[test]
    fn unsubscribe_both_protocols() {
        let filters = [&s(b"a/+")[..], &s(b"#")].concat();
        let want = In::Unsubscribe {
            pkid: 12,
            filters: vec!["a/+".into(), "#".into()],
        };
        let v311 = frame(0xA2, &[&[0x00, 0x0C][..], &filters].concat());
        assert_eq!(dec(&v311, Version::V311).unwrap(), want);
        let v5 = frame(0xA2, &[&[0x00, 0x0C, 0x00][..], &filters].concat());
        assert_eq!(dec(&v5, Version::V5).unwrap(), want);
        // No filters; packet id 0.
        malformed_reason(dec(&[0xA2, 0x02, 0x00, 0x01], Version::V311));
        malformed_reason(dec(&[0xA2, 0x03, 0x00, 0x01, 0x00], Version::V5));
        malformed_reason(dec(
            &frame(0xA2, &[&[0x00, 0x00][..], &s(b"#")].concat()),
            Version::V311,
        ));
    }

    #[test]
    fn pingreq_all_protocols() {
        for v in [Version::V31, Version::V311, Version::V5] {
            assert_eq!(dec(&[0xC0, 0x00], v).unwrap(), In::PingReq);
            malformed_reason(dec(&[0xC0, 0x01, 0x00], v));
        }
    }

    #[test]
    fn unexpected_packets_malformed() {
        for v in [Version::V31, Version::V311, Version::V5] {
            let why = malformed_reason(dec(&CONNECT_311, v));
            assert!(why.contains("second CONNECT"), "{why}");
            let why = malformed_reason(dec(&[0x20, 0x02, 0x00, 0x00], v));
            assert!(why.contains("CONNACK is sent by servers only"), "{why}");
            malformed_reason(dec(&[0xD0, 0x00], v));
            malformed_reason(dec(&[0x00, 0x00], v));
        }
        assert_eq!(dec(&[0xF0, 0x00], Version::V5).unwrap(), In::Auth);
        malformed_reason(dec(&[0xF0, 0x00], Version::V311));
    }

    #[test]
    fn publish_written_by_rumqttc_v5_decodes() {
        let mut buf = BytesMut::new();
        let properties = v5::PublishProperties {
            response_topic: Some("r/1".into()),
            correlation_data: Some(Bytes::from_static(b"id-9")),
            content_type: Some("application/json".into()),
            payload_format_indicator: Some(1),
            ..Default::default()
        };
        let mut p = v5::Publish::new("x/y", m5::QoS::ExactlyOnce, "{}", Some(properties));
        p.pkid = 3;
        p.retain = true;
        p.write(&mut buf).unwrap();
        let want = Publish {
            topic: "x/y".into(),
            payload: Bytes::from_static(b"{}"),
            qos: Qos::ExactlyOnce,
            retain: true,
            dup: false,
            pkid: 3,
            props: PubProps {
                payload_format: Some(1),
                response_topic: Some("r/1".into()),
                correlation_data: Some(Bytes::from_static(b"id-9")),
                content_type: Some("application/json".into()),
                ..PubProps::default()
            },
        };
        assert_eq!(
            decode(&mut buf, Version::V5, MAX).unwrap(),
            Some(In::Publish(want))
        );
    }

    // -- encoding --------------------------------------------------------------------------

    /// Every CONNACK result.
    const CODES: [ConnCode; 9] = [
        ConnCode::Success,
        ConnCode::BadProtocol,
        ConnCode::BadClientId,
        ConnCode::Unavailable,
        ConnCode::BadAuth,
        ConnCode::NotAuthorized,
        ConnCode::Malformed,
        ConnCode::BadAuthMethod,
        ConnCode::QuotaExceeded,
    ];

    /// A CONNACK with a resumed session and no properties.
    fn connack(code: ConnCode) -> Out {
        Out::ConnAck {
            session_present: true,
            code,
            props: ConnAckProps::default(),
        }
    }

    #[test]
    fn connack_311_and_31_return_codes() {
        let want = [0, 1, 2, 3, 4, 5, 2, 5, 3];
        for (code, byte) in CODES.into_iter().zip(want) {
            let session = u8::from(code == ConnCode::Success);
            assert_eq!(
                enc(&connack(code), Version::V311),
                [0x20, 0x02, session, byte],
                "{code:?}"
            );
            // 3.1's acknowledge flags byte is reserved.
            assert_eq!(
                enc(&connack(code), Version::V31),
                [0x20, 0x02, 0x00, byte],
                "{code:?}"
            );
        }
        let mut buf = BytesMut::from(&enc(&connack(ConnCode::BadAuth), Version::V311)[..]);
        let read = v4::Packet::read(&mut buf, MAX).unwrap();
        let want = v4::ConnAck::new(v4::ConnectReturnCode::BadUserNamePassword, false);
        assert_eq!(read, v4::Packet::ConnAck(want));
    }

    #[test]
    fn connack_v5_reason_codes() {
        let want = [0x00, 0x84, 0x85, 0x88, 0x86, 0x87, 0x81, 0x8C, 0x97];
        for (code, byte) in CODES.into_iter().zip(want) {
            let bytes = enc(&connack(code), Version::V5);
            let session = u8::from(code == ConnCode::Success);
            assert_eq!(bytes, [0x20, 0x03, session, byte, 0x00], "{code:?}");
            let mut buf = BytesMut::from(&bytes[..]);
            match v5::Packet::read(&mut buf, None).unwrap() {
                v5::Packet::ConnAck(ack) => assert_eq!(ack.session_present, session == 1),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn connack_v5_properties_round_trip() {
        let props = ConnAckProps {
            receive_max: Some(32),
            max_qos: Some(1),
            retain_available: Some(true),
            max_packet: Some(65536),
            assigned_client_id: Some("auto-1f".into()),
            topic_alias_max: Some(0),
            wildcard_available: Some(true),
            sub_ids_available: Some(false),
            shared_available: Some(false),
            session_expiry: Some(600),
            server_keep_alive: Some(30),
            reason_string: Some("welcome".into()),
        };
        let out = Out::ConnAck {
            session_present: false,
            code: ConnCode::Success,
            props,
        };
        let mut buf = BytesMut::from(&enc(&out, Version::V5)[..]);
        let ack = match v5::Packet::read(&mut buf, None).unwrap() {
            v5::Packet::ConnAck(ack) => ack,
            other => panic!("{other:?}"),
        };
        assert!(buf.is_empty());
        assert_eq!(ack.code, v5::ConnectReturnCode::Success);
        let p = ack.properties.unwrap();
        assert_eq!(
            (p.receive_max, p.max_qos, p.retain_available),
            (Some(32), Some(1), Some(1))
        );
        assert_eq!(
            (p.max_packet_size, p.topic_alias_max),
            (Some(65536), Some(0))
        );
        assert_eq!(p.assigned_client_identifier.as_deref(), Some("auto-1f"));
        assert_eq!(p.wildcard_subscription_available, Some(1));
        assert_eq!(p.subscription_identifiers_available, Some(0));
        assert_eq!(p.shared_subscription_available, Some(0));
        assert_eq!(
            (p.session_expiry_interval, p.server_keep_alive),
            (Some(600), Some(30))
        );
        assert_eq!(p.reason_string.as_deref(), Some("welcome"));
    }

    /// A QoS 1 PUBLISH with every property set.
    fn full_publish() -> Publish {
        Publish {
            topic: "plant/3/temp".into(),
            payload: Bytes::from_static(b"21.5"),
            qos: Qos::AtLeastOnce,
            retain: true,
            dup: false,
            pkid: 42,
            props: PubProps {
                payload_format: Some(1),
                message_expiry: Some(120),
                topic_alias: Some(4),
                response_topic: Some("plant/3/reply".into()),
                correlation_data: Some(Bytes::from_static(&[1, 2, 3])),
                user: vec![("z".into(), "1".into()), ("a".into(), "2".into())],
                content_type: Some("text/plain".into()),
                subscription_ids: vec![1, 300],
            },
        }
    }

    #[test]
    fn publish_v5_out_keeps_properties_but_no_alias() {
        let p = full_publish();
        let bytes = enc(&Out::Publish(p.clone()), Version::V5);
        assert_eq!(bytes.len(), publish_size(&p, Version::V5));
        let mut buf = BytesMut::from(&bytes[..]);
        let read = match v5::Packet::read(&mut buf, None).unwrap() {
            v5::Packet::Publish(read) => read,
            other => panic!("{other:?}"),
        };
        assert_eq!(&read.topic[..], b"plant/3/temp");
        assert_eq!(
            (read.qos, read.pkid, read.retain),
            (m5::QoS::AtLeastOnce, 42, true)
        );
        assert_eq!(&read.payload[..], b"21.5");
        let props = read.properties.unwrap();
        assert_eq!(props.topic_alias, None);
        assert_eq!(props.user_properties, p.props.user);
        assert_eq!(props.subscription_identifiers, vec![1, 300]);
        assert_eq!(props.message_expiry_interval, Some(120));
        assert_eq!(props.payload_format_indicator, Some(1));
        assert_eq!(props.response_topic.as_deref(), Some("plant/3/reply"));
        assert_eq!(props.correlation_data.as_deref(), Some(&[1, 2, 3][..]));
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    }

    #[test]
    fn publish_311_out_drops_properties() {
        let p = full_publish();
        let bytes = enc(&Out::Publish(p.clone()), Version::V311);
        assert_eq!(bytes.len(), publish_size(&p, Version::V311));
        let mut buf = BytesMut::from(&bytes[..]);
        let mut want = v4::Publish::new("plant/3/temp", m4::QoS::AtLeastOnce, "21.5");
        want.pkid = 42;
        want.retain = true;
        assert_eq!(
            v4::Packet::read(&mut buf, MAX).unwrap(),
            v4::Packet::Publish(want)
        );
        assert_eq!(enc(&Out::Publish(p), Version::V31), bytes);
    }

    #[test]
    fn publish_size_matches_encoding_across_length_boundaries() {
        for v in [Version::V311, Version::V5] {
            // Remaining length 5 + n (3.1.1) or 6 + n (5): one byte up to 127, two up to 16383.
            for payload in [0, 121, 122, 123, 16_377, 16_378, 16_379] {
                let p = Publish {
                    topic: "t".into(),
                    payload: Bytes::from(vec![7; payload]),
                    qos: Qos::AtLeastOnce,
                    retain: false,
                    dup: false,
                    pkid: 1,
                    props: PubProps::default(),
                };
                let bytes = enc(&Out::Publish(p.clone()), v);
                assert_eq!(publish_size(&p, v), bytes.len(), "{v:?}, payload {payload}");
                // Before a packet id is assigned the size already counts one.
                assert_eq!(publish_size(&Publish { pkid: 0, ..p }, v), bytes.len());
            }
        }
    }

    #[test]
    fn puback_and_pubrec_reasons() {
        // v5: known reasons pass, unknown ones become 0x80; success takes the short form.
        assert_eq!(
            enc(&Out::PubAck { pkid: 7, reason: 0 }, Version::V5),
            [0x40, 0x02, 0x00, 0x07]
        );
        for (reason, byte) in [
            (0x10, 0x10),
            (0x80, 0x80),
            (0x83, 0x83),
            (0x87, 0x87),
            (0x90, 0x90),
            (0x91, 0x91),
            (0x97, 0x97),
            (0x99, 0x99),
            (0x42, 0x80),
        ] {
            let ack = enc(&Out::PubAck { pkid: 7, reason }, Version::V5);
            assert_eq!(ack, [0x40, 0x04, 0x00, 0x07, byte, 0x00], "{reason:#x}");
            let rec = enc(&Out::PubRec { pkid: 7, reason }, Version::V5);
            assert_eq!(rec, [0x50, 0x04, 0x00, 0x07, byte, 0x00], "{reason:#x}");
            let mut buf = BytesMut::from(&rec[..]);
            assert!(
                matches!(v5::Packet::read(&mut buf, None), Ok(v5::Packet::PubRec(r)) if r.pkid == 7)
            );
        }
        // 3.1.1 has no reason.
        let ack = Out::PubAck {
            pkid: 7,
            reason: 0x97,
        };
        assert_eq!(enc(&ack, Version::V311), [0x40, 0x02, 0x00, 0x07]);
        let rec = Out::PubRec {
            pkid: 7,
            reason: 0x10,
        };
        assert_eq!(enc(&rec, Version::V31), [0x50, 0x02, 0x00, 0x07]);
    }

    #[test]
    fn pubrel_pubcomp_pingresp() {
        for v in [Version::V31, Version::V311, Version::V5] {
            assert_eq!(enc(&Out::PubRel(0x0102), v), [0x62, 0x02, 0x01, 0x02]);
            assert_eq!(enc(&Out::PubComp(0x0102), v), [0x70, 0x02, 0x01, 0x02]);
            assert_eq!(enc(&Out::PingResp, v), [0xD0, 0x00]);
        }
    }

    #[test]
    fn suback_codes() {
        let codes = vec![
            0, 1, 2, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2, 0x05,
        ];
        let out = Out::SubAck {
            pkid: 9,
            codes: codes.clone(),
        };
        let v311 = enc(&out, Version::V311);
        let want = [
            0x90, 0x0F, 0x00, 0x09, 0, 1, 2, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
            0x80,
        ];
        assert_eq!(v311, want);
        let mut buf = BytesMut::from(&v311[..]);
        assert!(v4::Packet::read(&mut buf, MAX).is_ok());

        let v5 = enc(&out, Version::V5);
        let mut want_codes = codes;
        *want_codes.last_mut().unwrap() = 0x80;
        assert_eq!(&v5[..5], [0x90, 0x10, 0x00, 0x09, 0x00]);
        assert_eq!(&v5[5..], &want_codes[..]);
        let mut buf = BytesMut::from(&v5[..]);
        match v5::Packet::read(&mut buf, None).unwrap() {
            v5::Packet::SubAck(ack) => assert_eq!(ack.return_codes.len(), 13),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unsuback_codes() {
        let out = Out::UnsubAck {
            pkid: 9,
            codes: vec![0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x05],
        };
        assert_eq!(enc(&out, Version::V311), [0xB0, 0x02, 0x00, 0x09]);
        let v5 = enc(&out, Version::V5);
        assert_eq!(
            v5,
            [0xB0, 0x0B, 0x00, 0x09, 0x00, 0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x80]
        );
        let mut buf = BytesMut::from(&v5[..]);
        match v5::Packet::read(&mut buf, None).unwrap() {
            v5::Packet::UnsubAck(ack) => assert_eq!(ack.reasons.len(), 8),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn disconnect_out() {
        // 3.1/3.1.1: nothing to send, nothing appended.
        let mut buf = BytesMut::from(&b"keep"[..]);
        encode(&Out::Disconnect { reason: 0x8E }, Version::V311, &mut buf).unwrap();
        encode(&Out::Disconnect { reason: 0x8E }, Version::V31, &mut buf).unwrap();
        assert_eq!(&buf[..], b"keep");
        // v5: reason code and an empty property length, which rumqttc itself reads back.
        for (reason, code) in [
            (0x8E, v5::DisconnectReasonCode::SessionTakenOver),
            (0x95, v5::DisconnectReasonCode::PacketTooLarge),
            (0x00, v5::DisconnectReasonCode::NormalDisconnection),
        ] {
            let bytes = enc(&Out::Disconnect { reason }, Version::V5);
            assert_eq!(bytes, [0xE0, 0x02, reason, 0x00]);
            let mut buf = BytesMut::from(&bytes[..]);
            match v5::Packet::read(&mut buf, None).unwrap() {
                v5::Packet::Disconnect(d) => assert_eq!(d.reason_code, code),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn encode_appends() {
        let mut buf = BytesMut::from(&[0xAA][..]);
        encode(&Out::PingResp, Version::V5, &mut buf).unwrap();
        encode(&Out::PubAck { pkid: 1, reason: 0 }, Version::V311, &mut buf).unwrap();
        assert_eq!(&buf[..], [0xAA, 0xD0, 0x00, 0x40, 0x02, 0x00, 0x01]);
    }

    #[test]
    fn encode_errors_leave_the_buffer_alone() {
        let mut buf = BytesMut::from(&b"before"[..]);
        let no_pkid = Publish {
            pkid: 0,
            ..full_publish()
        };
        for v in [Version::V311, Version::V5] {
            let r = encode(&Out::Publish(no_pkid.clone()), v, &mut buf);
            assert!(matches!(r, Err(EncodeError::PacketIdZero)), "{r:?}");
        }
        let long_topic = Publish {
            topic: "t".repeat(70_000),
            ..full_publish()
        };
        let r = encode(&Out::Publish(long_topic), Version::V311, &mut buf);
        assert!(
            matches!(
                r,
                Err(EncodeError::FieldTooLong {
                    field: "PUBLISH topic",
                    len: 70_000
                })
            ),
            "{r:?}"
        );
        let mut long_user = full_publish();
        long_user.props.user.push(("k".into(), "v".repeat(65_536)));
        let r = encode(&Out::Publish(long_user.clone()), Version::V5, &mut buf);
        assert!(
            matches!(
                r,
                Err(EncodeError::FieldTooLong {
                    field: "user property value",
                    ..
                })
            ),
            "{r:?}"
        );
        // 3.1.1 drops the properties, so the same PUBLISH goes.
        encode(&Out::Publish(long_user), Version::V311, &mut buf).unwrap();
        buf.truncate(6);
        let props = ConnAckProps {
            reason_string: Some("x".repeat(65_536)),
            ..Default::default()
        };
        let out = Out::ConnAck {
            session_present: false,
            code: ConnCode::NotAuthorized,
            props,
        };
        assert!(matches!(
            encode(&out, Version::V5, &mut buf),
            Err(EncodeError::FieldTooLong { .. })
        ));
        assert_eq!(&buf[..], b"before");
    }

    // -- properties --------------------------------------------------------------------------

    /// A short string of topic-ish characters.
    fn text() -> impl Strategy<Value = String> {
        "[a-z0-9/ é]{0,12}"
    }

    /// A PUBLISH a client could send in `v`.
    fn publish(v: Version) -> impl Strategy<Value = Publish> {
        let props = (
            proptest::option::of(0u8..2),
            proptest::option::of(any::<u32>()),
            proptest::option::of(text()),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
            proptest::collection::vec((text(), text()), 0..4),
            proptest::option::of(text()),
        )
            .prop_map(
                |(
                    payload_format,
                    message_expiry,
                    response_topic,
                    correlation,
                    user,
                    content_type,
                )| {
                    PubProps {
                        payload_format,
                        message_expiry,
                        topic_alias: None,
                        response_topic,
                        correlation_data: correlation.map(Bytes::from),
                        user,
                        content_type,
                        subscription_ids: vec![],
                    }
                },
            );
        (
            text(),
            proptest::collection::vec(any::<u8>(), 0..300),
            0u8..3,
            any::<bool>(),
            any::<bool>(),
            1u16..,
            props,
        )
            .prop_map(
                move |(topic, payload, qos_bits, retain, dup, pkid, props)| {
                    let qos = qos(qos_bits).unwrap();
                    let at_least_once = qos != Qos::AtMostOnce;
                    Publish {
                        topic,
                        payload: Bytes::from(payload),
                        qos,
                        retain,
                        dup: dup && at_least_once,
                        pkid: if at_least_once { pkid } else { 0 },
                        props: if v == Version::V5 {
                            props
                        } else {
                            PubProps::default()
                        },
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn publish_round_trips_v311(p in publish(Version::V311)) {
            let bytes = enc(&Out::Publish(p.clone()), Version::V311);
            prop_assert_eq!(bytes.len(), publish_size(&p, Version::V311));
            prop_assert_eq!(dec(&bytes, Version::V311).unwrap(), In::Publish(p));
        }

        #[test]
        fn publish_round_trips_v5(p in publish(Version::V5)) {
            let bytes = enc(&Out::Publish(p.clone()), Version::V5);
            prop_assert_eq!(bytes.len(), publish_size(&p, Version::V5));
            prop_assert_eq!(dec(&bytes, Version::V5).unwrap(), In::Publish(p));
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_wait_without_consuming(
            bytes in proptest::collection::vec(any::<u8>(), 0..48),
            connect in any::<bool>(),
            v in prop_oneof![Just(Version::V31), Just(Version::V311), Just(Version::V5)],
        ) {
            let mut buf = BytesMut::from(&bytes[..]);
            let whole = if connect {
                decode_connect(&mut buf, 64).map(|c| c.is_some())
            } else {
                decode(&mut buf, v, 64).map(|p| p.is_some())
            };
            match whole {
                Ok(false) => prop_assert_eq!(&buf[..], &bytes[..]),
                Ok(true) => {
                    let header = peek_header(&bytes).unwrap().unwrap();
                    prop_assert_eq!(&buf[..], &bytes[header.total()..]);
                }
                Err(_) => {}
            }
        }

        #[test]
        fn mutated_packets_never_panic(
            sample in 0..samples().len(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let (v, mut packet) = samples().swap_remove(sample);
            let i = at.index(packet.len());
            packet[i] = byte;
            let mut buf = BytesMut::from(&packet[..]);
            let _ = match v {
                None => decode_connect(&mut buf, MAX).map(|_| ()),
                Some(v) => decode(&mut buf, v, MAX).map(|_| ()),
            };
        }
    }

    // -- hostile input -----------------------------------------------------------------------

    fn any_version() -> impl Strategy<Value = Version> {
        prop_oneof![Just(Version::V31), Just(Version::V311), Just(Version::V5)]
    }

    /// A CONNECT of `v`, as a client sends it.
    fn connect_bytes(v: Version) -> Vec<u8> {
        match v {
            Version::V31 => CONNECT_31.to_vec(),
            Version::V311 => CONNECT_311.to_vec(),
            Version::V5 => connect_v5(),
        }
    }

    /// A valid packet a client of `v` may send after its CONNECT.
    fn client_packet(v: Version) -> impl Strategy<Value = Vec<u8>> {
        let v5 = v == Version::V5;
        let filters = proptest::collection::vec(("[a-z0-9/+#$é]{1,12}", 0u8..3), 1..4);
        prop_oneof![
            4 => publish(v).prop_map(move |p| enc(&Out::Publish(p), v)),
            1 => (1u16.., any::<bool>()).prop_map(move |(pkid, rec)| {
                let ack = if rec {
                    Out::PubRec { pkid, reason: 0 }
                } else {
                    Out::PubAck { pkid, reason: 0 }
                };
                enc(&ack, v)
            }),
            1 => (1u16.., any::<bool>()).prop_map(move |(pkid, rel)| {
                enc(&if rel { Out::PubRel(pkid) } else { Out::PubComp(pkid) }, v)
            }),
            1 => (1u16.., filters.clone()).prop_map(move |(pkid, fs)| {
                let mut body = pkid.to_be_bytes().to_vec();
                if v5 {
                    body.push(0); // no properties
                }
                for (f, q) in fs {
                    body.extend(s(f.as_bytes()));
                    body.push(q);
                }
                frame(0x82, &body)
            }),
            1 => (1u16.., filters).prop_map(move |(pkid, fs)| {
                let mut body = pkid.to_be_bytes().to_vec();
                if v5 {
                    body.push(0);
                }
                for (f, _) in fs {
                    body.extend(s(f.as_bytes()));
                }
                frame(0xA2, &body)
            }),
            1 => Just(vec![0xC0, 0x00]),
        ]
    }

    /// A version, and a valid connection stream of it: CONNECT, then packets.
    fn valid_stream() -> impl Strategy<Value = (Version, Vec<Vec<u8>>)> {
        any_version().prop_flat_map(|v| {
            proptest::collection::vec(client_packet(v), 0..8).prop_map(move |mut ps| {
                ps.insert(0, connect_bytes(v));
                (v, ps)
            })
        })
    }

    /// What a connection makes of `bytes` (a CONNECT first when `connect`, else packets of
    /// `v`): decoding until the decoder waits or refuses, as `conn` does. Checks on the way
    /// that a packet consumes bytes, a wait consumes none, and a refusal says why. Returns
    /// how many packets decoded and whether it ended refused.
    fn decode_stream(
        bytes: &[u8],
        connect: bool,
        mut v: Version,
        max: usize,
    ) -> Result<(usize, bool), TestCaseError> {
        let mut buf = BytesMut::from(bytes);
        let mut n = 0;
        let refused = |e: DecodeError| -> Result<(usize, bool), TestCaseError> {
            match &e {
                DecodeError::Malformed(why) => prop_assert!(!why.is_empty()),
                DecodeError::TooLarge { size, max: m } => prop_assert!(size > m),
                DecodeError::UnsupportedProtocol { .. } | DecodeError::NotConnect => {}
            }
            prop_assert!(!e.to_string().is_empty());
            Ok((0, true))
        };
        if connect {
            match decode_connect(&mut buf, max) {
                Ok(None) => {
                    prop_assert_eq!(&buf[..], bytes, "a wait consumed bytes");
                    return Ok((0, false));
                }
                Ok(Some(c)) => {
                    v = c.version;
                    n += 1;
                }
                Err(e) => return refused(e),
            }
        }
        loop {
            let before = buf.len();
            match decode(&mut buf, v, max) {
                Ok(None) => {
                    prop_assert_eq!(buf.len(), before, "a wait consumed bytes");
                    return Ok((n, false));
                }
                Ok(Some(_)) => {
                    prop_assert!(buf.len() < before, "a packet consumed nothing");
                    n += 1;
                }
                Err(e) => return refused(e).map(|(_, r)| (n, r)),
            }
        }
    }

    /// One change to a byte string.
    #[derive(Debug, Clone)]
    enum Mutation {
        Set(prop::sample::Index, u8),
        Flip(prop::sample::Index, u8),
        Insert(prop::sample::Index, u8),
        Remove(prop::sample::Index),
        Truncate(prop::sample::Index),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
            (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
            (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
            any::<prop::sample::Index>().prop_map(Mutation::Remove),
            any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        ]
    }

    fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
        if bytes.is_empty() {
            return;
        }
        match m {
            Mutation::Set(i, b) => {
                let i = i.index(bytes.len());
                bytes[i] = *b;
            }
            Mutation::Flip(i, bit) => {
                let i = i.index(bytes.len());
                bytes[i] ^= 1 << bit;
            }
            Mutation::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
            Mutation::Remove(i) => {
                bytes.remove(i.index(bytes.len()));
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        }
    }

    proptest! {
        #![proptest_config(crate::fuzz::cases(10_000))]

        /// Random bytes, as a first packet or as a later one of any protocol, under a small or
        /// an ample limit: no panic, and the decoder makes progress, waits or says why not.
        #[test]
        fn fuzz_random_bytes_decode_wait_or_say_why(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            connect in any::<bool>(),
            v in any_version(),
            max in prop_oneof![Just(64usize), Just(MAX)],
        ) {
            decode_stream(&bytes, connect, v, max)?;
        }

        /// Random bytes behind a valid fixed header (so the per-packet readers, not the
        /// framing, see them), for every packet type and protocol.
        #[test]
        fn fuzz_random_bodies_of_every_packet_type(
            byte1 in any::<u8>(),
            body in proptest::collection::vec(any::<u8>(), 0..200),
            v in any_version(),
        ) {
            let packet = frame(byte1, &body);
            let (n, refused) = decode_stream(&packet, false, v, MAX)?;
            prop_assert!(n == 1 || refused, "a whole frame is a packet or refused");
            let (n, refused) = decode_stream(&packet, true, v, MAX)?;
            prop_assert!(n == 1 || refused);
        }

    }

    proptest! {
        #![proptest_config(crate::fuzz::cases(2000))]

        /// A valid connection stream cut anywhere: every whole packet decodes, the cut one
        /// waits for its missing bytes without consuming any.
        #[test]
        fn fuzz_truncated_valid_streams_wait_for_the_rest(
            (v, packets) in valid_stream(),
            cut in any::<prop::sample::Index>(),
        ) {
            let stream = packets.concat();
            let cut = cut.index(stream.len() + 1);
            let whole = packets
                .iter()
                .scan(0, |end, p| {
                    *end += p.len();
                    Some(*end)
                })
                .take_while(|end| *end <= cut)
                .count();
            let (n, refused) = decode_stream(&stream[..cut], true, v, MAX)?;
            prop_assert!(!refused, "a valid stream was refused");
            prop_assert_eq!(n, whole);
        }

        /// A valid stream with up to eight random changes (bytes set, flipped, inserted,
        /// removed, the end cut off): no panic, and every refusal says why.
        #[test]
        fn fuzz_mutated_valid_streams(
            (v, packets) in valid_stream(),
            mutations in proptest::collection::vec(mutation(), 1..8),
            as_v in any_version(),
        ) {
            let mut stream = packets.concat();
            for m in &mutations {
                mutate(&mut stream, m);
            }
            decode_stream(&stream, true, v, MAX)?;
            // The packets after the CONNECT, read as any protocol (a 3.1.1 packet on a v5
            // connection and the other way round).
            let mut rest = packets[1..].concat();
            for m in &mutations {
                mutate(&mut rest, m);
            }
            decode_stream(&rest, false, as_v, MAX)?;
            decode_stream(&rest, false, as_v, 64)?;
        }
    }
}
