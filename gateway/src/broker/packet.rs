//! MQTT packets as the broker's state machines see them: one set of types for MQTT 3.1,
//! 3.1.1 and 5. [`super::codec`] turns bytes of either protocol into [`In`] and [`Out`] into
//! bytes; what a protocol cannot say (properties, reason codes in 3.1.1) is dropped there.

use bytes::Bytes;

/// The protocol a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1 (protocol name `MQIsdp`, level 3): 3.1.1's packets, older CONNACK codes.
    V31,
    /// MQTT 3.1.1 (level 4).
    V311,
    /// MQTT 5 (level 5).
    V5,
}

/// Quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Qos {
    /// At most once.
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once.
    ExactlyOnce = 2,
}

/// MQTT 5 publish properties (all empty in 3.1.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PubProps {
    /// 1: the payload is UTF-8.
    pub payload_format: Option<u8>,
    /// Seconds the message stays valid.
    pub message_expiry: Option<u32>,
    /// A topic alias (resolved by the session before routing; never forwarded).
    pub topic_alias: Option<u16>,
    /// Request/response.
    pub response_topic: Option<String>,
    /// Request/response.
    pub correlation_data: Option<Bytes>,
    /// Name/value pairs, in order, repeats allowed.
    pub user: Vec<(String, String)>,
    /// MIME type of the payload.
    pub content_type: Option<String>,
    /// Subscription identifiers (server to client only).
    pub subscription_ids: Vec<usize>,
}

/// A PUBLISH, either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Topic name (empty when an MQTT 5 alias stands for it).
    pub topic: String,
    /// The bytes.
    pub payload: Bytes,
    /// Its QoS.
    pub qos: Qos,
    /// Retain flag.
    pub retain: bool,
    /// DUP flag: a resend.
    pub dup: bool,
    /// Packet id (0 at QoS 0).
    pub pkid: u16,
    /// MQTT 5 properties.
    pub props: PubProps,
}

/// A will, from CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Where it is published.
    pub topic: String,
    /// What.
    pub payload: Bytes,
    /// Its QoS.
    pub qos: Qos,
    /// Retained.
    pub retain: bool,
    /// MQTT 5 Will Delay Interval, seconds.
    pub delay: u32,
    /// MQTT 5 will properties (expiry, content type, user properties...).
    pub props: PubProps,
}

/// A CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol.
    pub version: Version,
    /// Client id; may be empty (the server assigns one).
    pub client_id: String,
    /// Clean session (3.1.1) / clean start (5).
    pub clean_start: bool,
    /// Seconds; 0 = no keep-alive.
    pub keep_alive: u16,
    /// MQTT 5 Session Expiry Interval; `None` in 3.1.1 (the session lives as long as
    /// `clean_start` says) and when a v5 client sends none (0).
    pub session_expiry: Option<u32>,
    /// MQTT 5 Receive Maximum of the client (how many QoS 1/2 it takes unacknowledged).
    pub receive_max: Option<u16>,
    /// MQTT 5 Maximum Packet Size the client accepts.
    pub max_packet: Option<u32>,
    /// MQTT 5 Topic Alias Maximum of the client (aliases we may send; we send none).
    pub topic_alias_max: Option<u16>,
    /// MQTT 5 user properties of the CONNECT.
    pub user: Vec<(String, String)>,
    /// MQTT 5 enhanced authentication method (unsupported: refused).
    pub auth_method: Option<String>,
    /// Will, if any.
    pub will: Option<Will>,
    /// Username, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<Bytes>,
}

/// What a subscriber asks of one filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubOpts {
    /// Highest QoS it wants.
    pub qos: Qos,
    /// MQTT 5 No Local: not its own publishes.
    pub no_local: bool,
    /// MQTT 5 Retain As Published: keep the retain flag on forwarded messages.
    pub retain_as_published: bool,
    /// MQTT 5 Retain Handling: 0 send retained at subscribe, 1 only if new, 2 never.
    pub retain_handling: u8,
}

/// Client to server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum In {
    /// CONNECT.
    Connect(Connect),
    /// PUBLISH.
    Publish(Publish),
    /// PUBACK from a subscriber.
    PubAck(u16),
    /// PUBREC from a subscriber (we never send QoS 2: answered with PUBREL anyway).
    PubRec(u16),
    /// PUBREL: the sender's QoS 2 release.
    PubRel(u16),
    /// PUBCOMP from a subscriber.
    PubComp(u16),
    /// SUBSCRIBE.
    Subscribe {
        /// Packet id.
        pkid: u16,
        /// Filters and options, in order.
        filters: Vec<(String, SubOpts)>,
        /// MQTT 5 Subscription Identifier.
        id: Option<usize>,
    },
    /// UNSUBSCRIBE.
    Unsubscribe {
        /// Packet id.
        pkid: u16,
        /// Filters.
        filters: Vec<String>,
    },
    /// PINGREQ.
    PingReq,
    /// DISCONNECT (3.1.1: reason 0).
    Disconnect {
        /// Reason code; 0x04 = disconnect with will message.
        reason: u8,
        /// MQTT 5: a new Session Expiry Interval.
        session_expiry: Option<u32>,
    },
    /// AUTH (MQTT 5 enhanced authentication, unsupported).
    Auth,
}

/// CONNACK result, mapped to 3.1/3.1.1 return codes or 5 reason codes by the codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnCode {
    /// Accepted.
    Success,
    /// Protocol version not supported (3.1.1: 1; 5: 0x84).
    BadProtocol,
    /// Client id not valid (3.1.1: 2; 5: 0x85).
    BadClientId,
    /// Server unavailable, e.g. too many connections (3.1.1: 3; 5: 0x88 / 0x9F).
    Unavailable,
    /// Bad username or password (3.1.1: 4; 5: 0x86).
    BadAuth,
    /// Not authorized (3.1.1: 5; 5: 0x87).
    NotAuthorized,
    /// Malformed or protocol error (3.1.1: closed without CONNACK; 5: 0x81 / 0x82).
    Malformed,
    /// Authentication method not supported (5: 0x8C; 3.1.1: 5).
    BadAuthMethod,
    /// Connection rate or quota exceeded (5: 0x97 / 0x9F; 3.1.1: 3).
    QuotaExceeded,
}

/// MQTT 5 CONNACK properties the server announces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAckProps {
    /// Receive Maximum: QoS 1/2 publishes we take unacknowledged.
    pub receive_max: Option<u16>,
    /// Maximum QoS (absent = 2).
    pub max_qos: Option<u8>,
    /// Retain Available (absent = 1).
    pub retain_available: Option<bool>,
    /// Maximum Packet Size we accept.
    pub max_packet: Option<u32>,
    /// Assigned Client Identifier (when the client sent an empty one).
    pub assigned_client_id: Option<String>,
    /// Topic Alias Maximum we accept.
    pub topic_alias_max: Option<u16>,
    /// Wildcard Subscription Available.
    pub wildcard_available: Option<bool>,
    /// Subscription Identifiers Available.
    pub sub_ids_available: Option<bool>,
    /// Shared Subscription Available.
    pub shared_available: Option<bool>,
    /// Session Expiry Interval, when the server changes the client's.
    pub session_expiry: Option<u32>,
    /// Server Keep Alive, when the server changes the client's.
    pub server_keep_alive: Option<u16>,
    /// Why, for a refusal.
    pub reason_string: Option<String>,
}

/// Server to client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// CONNACK.
    ConnAck {
        /// A session was resumed.
        session_present: bool,
        /// Result.
        code: ConnCode,
        /// MQTT 5 properties (dropped for 3.1.1).
        props: ConnAckProps,
    },
    /// PUBLISH to a subscriber.
    Publish(Publish),
    /// PUBACK; reason 0 success, 0x10 no matching subscribers, 0x97 quota exceeded (MQTT 5
    /// only; 3.1.1 has no reason).
    PubAck {
        /// Packet id.
        pkid: u16,
        /// MQTT 5 reason code.
        reason: u8,
    },
    /// PUBREC, reason as for PUBACK.
    PubRec {
        /// Packet id.
        pkid: u16,
        /// MQTT 5 reason code.
        reason: u8,
    },
    /// PUBREL (answering a subscriber's PUBREC).
    PubRel(u16),
    /// PUBCOMP.
    PubComp(u16),
    /// SUBACK: per filter the granted QoS (0, 1, 2) or a failure code (MQTT 5 reason codes
    /// >= 0x80; 3.1.1 gets 0x80 for every failure).
    SubAck {
        /// Packet id.
        pkid: u16,
        /// Per filter.
        codes: Vec<u8>,
    },
    /// UNSUBACK: per filter 0 success or 0x11 no subscription existed (MQTT 5 only).
    UnsubAck {
        /// Packet id.
        pkid: u16,
        /// Per filter.
        codes: Vec<u8>,
    },
    /// PINGRESP.
    PingResp,
    /// DISCONNECT from the server (MQTT 5 only; 3.1.1 just closes): a reason code, e.g.
    /// 0x8E session taken over, 0x8D keep-alive timeout, 0x95 packet too large, 0x82
    /// protocol error, 0x8B server shutting down.
    Disconnect {
        /// Reason code.
        reason: u8,
    },
}
