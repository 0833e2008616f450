//! One upstream MQTT connection, in MQTT 5 or 3.1.1: rumqttc's two clients behind one face.
//!
//! The state machine in [`super`] sees only [`Client`] (publish, disconnect) and the
//! [`ConnEvent`]s its poller task reports: the CONNACK (with what the broker allows), each
//! PUBLISH as rumqttc writes it, each PUBACK with its reason code (MQTT 5) and the loss of the
//! connection. The poller never publishes; the state machine never polls.
//!
//! MQTT 5 batches carry a Content Type a subscriber can dispatch on and user properties: the
//! gateway, the encoding, the compression, the batch number, its first and last id, its event
//! count and whether it is backlog. [`properties_reserve`] is what they may take of a packet.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode as ConnectReturnCode5, Packet as Packet5, PubAckReason, PublishProperties,
};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::{
    AsyncClient as AsyncClient5, ConnectionError as ConnectionError5, Event as Event5,
    MqttOptions as MqttOptions5,
};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event as MqttEvent, LastWill, MqttOptions, Outgoing, Packet,
    QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

use crate::config::{Encoding, Protocol};

/// What a new connection needs, whatever the protocol.
#[derive(Clone)]
pub struct Options {
    /// Client id.
    pub client_id: String,
    /// Broker host and port.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Keep-alive (at least 5 s).
    pub keep_alive: Duration,
    /// Username and password; empty username: none.
    pub username: String,
    /// Password.
    pub password: String,
    /// TLS, for `mqtts://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Largest packet we send (a margin over `max_packet`).
    pub max_out: usize,
    /// Publishes in flight at once (ours plus the status messages).
    pub inflight: u16,
    /// The retained last-will topic (`offline`); `None`: no will.
    pub will_topic: Option<String>,
}

/// What the broker said in its CONNACK.
#[derive(Debug, Clone, Default)]
pub struct ConnAckInfo {
    /// MQTT 5 Maximum Packet Size: the largest packet the broker accepts.
    pub max_packet: Option<usize>,
    /// MQTT 5 Receive Maximum: the most QoS 1 publishes in flight it accepts.
    pub receive_max: Option<u16>,
}

/// A PUBACK with a failure reason code (MQTT 5, 0x80 and up): the broker refused the publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The reason code.
    pub code: u8,
    /// Its name as the metric label and `status` show it, e.g. `not_authorized`.
    pub name: &'static str,
    /// The broker's Reason String, if it sent one.
    pub reason: Option<String>,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (0x{:02x})", self.name.replace('_', " "), self.code)?;
        if let Some(r) = &self.reason {
            write!(f, ": {r}")?;
        }
        Ok(())
    }
}

/// What the connection's poller tells the state machine.
#[derive(Debug)]
pub enum ConnEvent {
    /// CONNACK: accepted, or refused with why.
    ConnAck(Result<ConnAckInfo, String>),
    /// rumqttc wrote a PUBLISH with this packet id (in publish order).
    Sent(u16),
    /// A PUBACK: success (`None`, reason codes below 0x80) or a refusal.
    PubAck(u16, Option<Rejection>),
    /// The connection ended; `before_connack`: the broker closed it or answered something
    /// that is not an MQTT 5 CONNACK after the transport was up (a 3.1.1-only broker does).
    Lost {
        /// Why, for people.
        why: String,
        /// Whether it looks like the broker does not speak this protocol.
        protocol_suspect: Suspect,
    },
}

/// One connection's client: publishes go through it, to the poller's event loop.
pub enum Client {
    /// MQTT 3.1.1.
    V311(AsyncClient),
    /// MQTT 5.
    V5(AsyncClient5),
}

/// Per-batch facts for the MQTT 5 properties.
#[derive(Debug, Clone)]
pub struct BatchProps<'a> {
    /// `[gateway] id`.
    pub gateway: &'a str,
    /// The batch encoding.
    pub encoding: Encoding,
    /// `Content-Encoding`-style compression name, if compressed.
    pub compression: Option<&'static str>,
    /// Batch number.
    pub batch: u64,
    /// First and last event id.
    pub first_id: u64,
    /// Last event id.
    pub last_id: u64,
    /// Events in it.
    pub count: u64,
    /// Whether it is backlog (stored before the connection came up).
    pub backlog: bool,
}

/// The Content Type of a batch: `application/vnd.tidepool.batch+json` or `+postcard`.
pub fn content_type(encoding: Encoding) -> &'static str {
    match encoding {
        Encoding::Json => "application/vnd.tidepool.batch+json",
        Encoding::Postcard => "application/vnd.tidepool.batch+postcard",
    }
}

fn encoding_name(encoding: Encoding) -> &'static str {
    match encoding {
        Encoding::Json => "json",
        Encoding::Postcard => "postcard",
    }
}

/// The MQTT 5 PUBLISH properties of a batch.
pub fn batch_properties(b: &BatchProps<'_>) -> PublishProperties {
    let mut user = vec![
        ("gateway".to_string(), b.gateway.to_string()),
        ("encoding".into(), encoding_name(b.encoding).into()),
        ("batch".into(), b.batch.to_string()),
        ("first_id".into(), b.first_id.to_string()),
        ("last_id".into(), b.last_id.to_string()),
        ("events".into(), b.count.to_string()),
        ("backlog".into(), b.backlog.to_string()),
    ];
    if let Some(c) = b.compression {
        user.push(("content-encoding".into(), c.into()));
    }
    PublishProperties {
        // UTF-8 only for uncompressed JSON.
        payload_format_indicator: (b.encoding == Encoding::Json && b.compression.is_none())
            .then_some(1),
        content_type: Some(content_type(b.encoding).into()),
        user_properties: user,
        ..PublishProperties::default()
    }
}

/// Bytes the properties take in a PUBLISH (their length varint included).
pub fn properties_len(p: &PublishProperties) -> usize {
    let mut len = 0;
    if p.payload_format_indicator.is_some() {
        len += 2;
    }
    if let Some(c) = &p.content_type {
        len += 1 + 2 + c.len();
    }
    for (k, v) in &p.user_properties {
        len += 1 + 2 + k.len() + 2 + v.len();
    }
    super::limits::varint_len(len) + len
}

/// The most a batch's properties can take, for sizing batches before their ids are known
/// (every number at its longest).
pub fn properties_reserve(gateway: &str, encoding: Encoding, compressed: bool) -> usize {
    properties_len(&batch_properties(&BatchProps {
        gateway,
        encoding,
        compression: compressed.then_some("gzip"),
        batch: u64::MAX,
        first_id: u64::MAX,
        last_id: u64::MAX,
        count: u64::MAX,
        backlog: false,
    }))
}

impl Client {
    /// Queues a QoS 1 publish; `Err` when the client's event loop is gone.
    pub async fn publish(
        &self,
        topic: &str,
        retain: bool,
        payload: Bytes,
        props: Option<PublishProperties>,
    ) -> Result<(), ()> {
        match self {
            Client::V311(c) => c
                .publish_bytes(topic, QoS::AtLeastOnce, retain, payload)
                .await
                .map_err(drop),
            Client::V5(c) => match props {
                Some(p) => c
                    .publish_with_properties(topic, QoS5::AtLeastOnce, retain, payload, p)
                    .await
                    .map_err(drop),
                None => c
                    .publish_bytes(topic, QoS5::AtLeastOnce, retain, payload)
                    .await
                    .map_err(drop),
            },
        }
    }

    /// Sends DISCONNECT.
    pub async fn disconnect(&self) {
        let _ = match self {
            Client::V311(c) => c.disconnect().await.map_err(drop),
            Client::V5(c) => c.disconnect().await.map_err(drop),
        };
    }

    /// Which protocol this connection speaks.
    pub fn protocol(&self) -> Protocol {
        match self {
            Client::V311(_) => Protocol::V311,
            Client::V5(_) => Protocol::V5,
        }
    }
}

/// Starts a connection in `protocol`: the client and the poller task's reports.
pub fn connect(
    protocol: Protocol,
    o: &Options,
) -> (
    Client,
    mpsc::UnboundedReceiver<ConnEvent>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    match protocol {
        Protocol::V311 => {
            let (client, el) = AsyncClient::new(options_311(o), 64);
            (Client::V311(client), rx, tokio::spawn(poll_311(el, tx)))
        }
        Protocol::V5 => {
            let (client, el) = AsyncClient5::new(options_5(o), 64);
            (Client::V5(client), rx, tokio::spawn(poll_5(el, tx)))
        }
    }
}

fn transport(o: &Options) -> Option<Transport> {
    o.tls
        .as_ref()
        .map(|tls| Transport::tls_with_config(TlsConfiguration::Rustls(tls.clone())))
}

fn options_311(o: &Options) -> MqttOptions {
    let mut m = MqttOptions::new(&o.client_id, &o.host, o.port);
    m.set_keep_alive(o.keep_alive);
    m.set_clean_session(true);
    // Incoming: acks only.
    m.set_max_packet_size(1 << 20, o.max_out);
    m.set_inflight(o.inflight);
    if let Some(t) = &o.will_topic {
        m.set_last_will(LastWill::new(t, "offline", QoS::AtLeastOnce, true));
    }
    if !o.username.is_empty() {
        m.set_credentials(&o.username, &o.password);
    }
    if let Some(t) = transport(o) {
        m.set_transport(t);
    }
    m
}

fn options_5(o: &Options) -> MqttOptions5 {
    let mut m = MqttOptions5::new(&o.client_id, &o.host, o.port);
    m.set_keep_alive(o.keep_alive);
    m.set_clean_start(true);
    // What we accept: acks (and, with commands, small messages).
    m.set_max_packet_size(Some(1 << 20));
    m.set_outgoing_inflight_upper_limit(o.inflight);
    if let Some(t) = &o.will_topic {
        m.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
            t,
            "offline",
            QoS5::AtLeastOnce,
            true,
            None,
        ));
    }
    if !o.username.is_empty() {
        m.set_credentials(&o.username, &o.password);
    }
    if let Some(t) = transport(o) {
        m.set_transport(t);
    }
    m
}

/// What a 3.1.1 event means to the state machine (`None`: nothing).
fn translate_311(ev: MqttEvent) -> Option<ConnEvent> {
    Some(match ev {
        MqttEvent::Incoming(Packet::ConnAck(c)) => ConnEvent::ConnAck(match c.code {
            ConnectReturnCode::Success => Ok(ConnAckInfo::default()),
            code => Err(refused_311(code)),
        }),
        MqttEvent::Incoming(Packet::PubAck(a)) => ConnEvent::PubAck(a.pkid, None),
        MqttEvent::Outgoing(Outgoing::Publish(pkid)) => ConnEvent::Sent(pkid),
        _ => return None,
    })
}

async fn poll_311(mut el: rumqttc::EventLoop, tx: mpsc::UnboundedSender<ConnEvent>) {
    loop {
        match el.poll().await {
            Ok(ev) => {
                if let Some(ev) = translate_311(ev) {
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                // What was read before the error (a PUBACK just before the close) still counts.
                for ev in el.state.events.drain(..) {
                    if let Some(ev) = translate_311(ev) {
                        let _ = tx.send(ev);
                    }
                }
                let why = match &e {
                    rumqttc::ConnectionError::ConnectionRefused(code) => refused_311(*code),
                    _ => super::describe(&e),
                };
                let _ = tx.send(ConnEvent::Lost {
                    why,
                    protocol_suspect: Suspect::No,
                });
                return;
            }
        }
    }
}

/// What an MQTT 5 event means to the state machine (`None`: nothing).
fn translate_5(ev: Event5) -> Option<ConnEvent> {
    Some(match ev {
        Event5::Incoming(Packet5::ConnAck(c)) => ConnEvent::ConnAck(match c.code {
            ConnectReturnCode5::Success => Ok(ConnAckInfo {
                max_packet: c
                    .properties
                    .as_ref()
                    .and_then(|p| p.max_packet_size)
                    .map(|n| n as usize),
                receive_max: c.properties.as_ref().and_then(|p| p.receive_max),
            }),
            code => Err(refused_5(code)),
        }),
        Event5::Incoming(Packet5::PubAck(a)) => {
            let rejection = rejection(a.reason).map(|(code, name)| Rejection {
                code,
                name,
                reason: a.properties.and_then(|p| p.reason_string),
            });
            ConnEvent::PubAck(a.pkid, rejection)
        }
        Event5::Outgoing(Outgoing::Publish(pkid)) => ConnEvent::Sent(pkid),
        _ => return None,
    })
}

async fn poll_5(mut el: rumqttc::v5::EventLoop, tx: mpsc::UnboundedSender<ConnEvent>) {
    let mut connected = false;
    loop {
        match el.poll().await {
            Ok(ev) => {
                if let Some(ev) = translate_5(ev) {
                    connected |= matches!(ev, ConnEvent::ConnAck(_));
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                // What was read before the error (a refusing PUBACK just before the broker
                // closed the connection) still counts.
                for ev in el.state.events.drain(..) {
                    if let Some(ev) = translate_5(ev) {
                        let _ = tx.send(ev);
                    }
                }
                let protocol_suspect = if connected {
                    Suspect::No
                } else {
                    suspect_5(&e)
                };
                let why = match &e {
                    ConnectionError5::ConnectionRefused(code) => refused_5(*code),
                    _ => describe_5(&e),
                };
                let _ = tx.send(ConnEvent::Lost {
                    why,
                    protocol_suspect,
                });
                return;
            }
        }
    }
}

/// How much an MQTT 5 connection that failed before its CONNACK says the broker does not
/// speak 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspect {
    /// Nothing: a refused or unreachable address, TLS, a timeout, a refusal for other reasons.
    No,
    /// The connection closed on the CONNECT: what some 3.1.1 brokers do, and also what a
    /// restarting broker or a proxy with no backend does. Taken as evidence only repeated.
    Maybe,
    /// The broker refused the version, or answered what is not an MQTT 5 CONNACK (a 3.1.1
    /// CONNACK fails to parse as one).
    Yes,
}

fn suspect_5(e: &ConnectionError5) -> Suspect {
    use rumqttc::v5::StateError;
    use std::io::ErrorKind::*;
    match e {
        ConnectionError5::ConnectionRefused(ConnectReturnCode5::UnsupportedProtocolVersion) => {
            Suspect::Yes
        }
        ConnectionError5::MqttState(StateError::Deserialization(_))
        | ConnectionError5::NotConnAck(_) => Suspect::Yes,
        ConnectionError5::MqttState(_) => Suspect::Maybe,
        ConnectionError5::Io(io)
            if matches!(
                io.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
            ) =>
        {
            Suspect::Maybe
        }
        _ => Suspect::No,
    }
}

/// A PUBACK reason code that is a failure (0x80 and up): the code and its label name.
fn rejection(r: PubAckReason) -> Option<(u8, &'static str)> {
    Some(match r {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => return None,
        PubAckReason::UnspecifiedError => (0x80, "unspecified_error"),
        PubAckReason::ImplementationSpecificError => (0x83, "implementation_specific_error"),
        PubAckReason::NotAuthorized => (0x87, "not_authorized"),
        PubAckReason::TopicNameInvalid => (0x90, "topic_name_invalid"),
        PubAckReason::PacketIdentifierInUse => (0x91, "packet_identifier_in_use"),
        PubAckReason::QuotaExceeded => (0x97, "quota_exceeded"),
        PubAckReason::PayloadFormatInvalid => (0x99, "payload_format_invalid"),
    })
}

fn refused_311(code: ConnectReturnCode) -> String {
    let why = match code {
        ConnectReturnCode::BadUserNamePassword => {
            "bad username or password (check [upstream] username and password)"
        }
        ConnectReturnCode::NotAuthorized => {
            "not authorized (check [upstream] username and password, and the broker's ACL)"
        }
        ConnectReturnCode::BadClientId => "client id rejected (check [upstream] client_id)",
        ConnectReturnCode::ServiceUnavailable => "broker unavailable",
        ConnectReturnCode::RefusedProtocolVersion => "MQTT 3.1.1 not accepted by the broker",
        ConnectReturnCode::Success => "success",
    };
    format!("upstream refused the connection: {why}")
}

fn refused_5(code: ConnectReturnCode5) -> String {
    use ConnectReturnCode5::*;
    let why = match code {
        BadUserNamePassword => {
            "bad username or password (check [upstream] username and password)".to_string()
        }
        NotAuthorized | Banned => format!(
            "{} (check [upstream] username and password, and the broker's ACL)",
            if code == Banned {
                "banned"
            } else {
                "not authorized"
            }
        ),
        ClientIdentifierNotValid => "client id rejected (check [upstream] client_id)".into(),
        ServerUnavailable | ServerBusy => "broker unavailable".into(),
        UnsupportedProtocolVersion => "MQTT 5 not accepted by the broker".into(),
        other => format!("{other:?}"),
    };
    format!("upstream refused the connection: {why}")
}

fn describe_5(e: &ConnectionError5) -> String {
    if let Some(why) = super::tls::explain(e) {
        return why;
    }
    match e {
        ConnectionError5::Tls(t) => format!(
            "TLS handshake failed: {t} (check upstream.ca_file, cert_file, key_file and the host in upstream.url)"
        ),
        ConnectionError5::Io(io) => format!("connection failed: {io}"),
        other => format!("connection lost: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn properties_len_matches_what_rumqttc_writes() {
        for (gw, enc, comp, ids) in [
            ("pi-1", Encoding::Json, None, (1u64, 9u64)),
            (
                "pi-kitchen-01",
                Encoding::Postcard,
                Some("gzip"),
                (123, 98_765_432),
            ),
            ("g", Encoding::Json, Some("gzip"), (u64::MAX - 1, u64::MAX)),
        ] {
            let props = batch_properties(&BatchProps {
                gateway: gw,
                encoding: enc,
                compression: comp,
                batch: 42,
                first_id: ids.0,
                last_id: ids.1,
                count: 500,
                backlog: true,
            });
            let topic = "tidepool/g/events";
            let payload = vec![b'x'; 300];
            let mut p = rumqttc::v5::mqttbytes::v5::Publish::new(
                topic,
                QoS5::AtLeastOnce,
                payload.clone(),
                Some(props.clone()),
            );
            p.pkid = 7;
            let mut buf = BytesMut::new();
            p.write(&mut buf).unwrap();
            assert_eq!(
                buf.len(),
                super::super::limits::publish_size(
                    topic.len() + properties_len(&props),
                    payload.len()
                ),
                "{gw} {enc:?} {comp:?}"
            );
            assert!(properties_len(&props) <= properties_reserve(gw, enc, comp.is_some()));
        }
    }

    #[test]
    fn reason_codes_below_0x80_are_success() {
        assert_eq!(rejection(PubAckReason::Success), None);
        assert_eq!(rejection(PubAckReason::NoMatchingSubscribers), None);
        assert_eq!(
            rejection(PubAckReason::NotAuthorized),
            Some((0x87, "not_authorized"))
        );
        assert_eq!(rejection(PubAckReason::QuotaExceeded).unwrap().0, 0x97);
        let r = Rejection {
            code: 0x87,
            name: "not_authorized",
            reason: Some("ACL".into()),
        };
        assert_eq!(r.to_string(), "not authorized (0x87): ACL");
    }
}
