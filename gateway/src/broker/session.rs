//! One connection's inbound side, without I/O: which of the sensor's QoS 1 and 2 publishes are
//! still waiting for their commit, the acknowledgements that may go out now, QoS 2 releases,
//! MQTT 5 topic aliases and the keep-alive.
//!
//! Acknowledgements leave in the order the publishes arrived (MQTT 3.1.1 §4.6, MQTT 5 §4.6):
//! a publish that needs no commit (a topic the gateway does not ingest, an oversize payload)
//! is done at once but its PUBACK waits behind those of earlier publishes still being
//! committed. The number waiting is the window: while it is full the connection stops reading,
//! so a sensor that outruns the store waits in TCP instead of being acknowledged and dropped.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::packet::{Out, Publish, Qos};

/// MQTT 5 reason: Topic Alias invalid (DISCONNECT).
pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
/// MQTT 5 reason: Protocol Error (DISCONNECT).
pub const PROTOCOL_ERROR: u8 = 0x82;
/// MQTT 5 reason: Topic Name invalid (PUBACK, DISCONNECT).
pub const TOPIC_INVALID: u8 = 0x90;
/// MQTT 5 reason: Quota exceeded (PUBACK): the payload is over `max_payload`.
pub const QUOTA_EXCEEDED: u8 = 0x97;
/// MQTT 5 reason: Receive Maximum exceeded (DISCONNECT).
pub const RECEIVE_MAX_EXCEEDED: u8 = 0x93;

/// A QoS 1 or 2 publish waiting for its acknowledgement.
#[derive(Debug)]
struct Waiting {
    seq: u64,
    pkid: u16,
    qos: Qos,
    /// `Some(reason)` once done.
    done: Option<u8>,
}

/// What to do with a publish, decided by [`Inbound::accept`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// New: hand it on; call [`Inbound::done`] with this number when it is committed (QoS 0:
    /// no number is needed, nothing is acknowledged).
    New(u64),
    /// A QoS 2 resend of a publish already taken (PUBREC sent or coming): not stored again;
    /// answered when its turn comes.
    Duplicate,
}

/// The inbound state of one connection.
#[derive(Debug)]
pub struct Inbound {
    window: usize,
    next_seq: u64,
    waiting: VecDeque<Waiting>,
    /// QoS 2 packet ids taken and not yet released (PUBREC sent or pending, no PUBREL yet).
    unreleased: HashSet<u16>,
    aliases: HashMap<u16, String>,
    alias_max: u16,
}

impl Inbound {
    /// `window`: QoS 1/2 publishes taken before their acknowledgements (our Receive Maximum);
    /// `alias_max`: topic aliases the client may set (our Topic Alias Maximum, 0 for 3.1.1).
    pub fn new(window: u16, alias_max: u16) -> Inbound {
        Inbound {
            window: usize::from(window.max(1)),
            next_seq: 1,
            waiting: VecDeque::new(),
            unreleased: HashSet::new(),
            aliases: HashMap::new(),
            alias_max,
        }
    }

    /// Whether the window is full: stop reading until an acknowledgement goes.
    pub fn full(&self) -> bool {
        self.waiting.len() >= self.window
    }

    /// How many publishes wait for their acknowledgement.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Resolves an MQTT 5 topic alias in place: an alias with a topic sets it, an alias alone
    /// stands for the topic it was set to. `Err(reason)`: the connection must end with
    /// DISCONNECT `reason`.
    pub fn resolve_topic(&mut self, p: &mut Publish) -> Result<(), u8> {
        if let Some(alias) = p.props.topic_alias.take() {
            if alias == 0 || alias > self.alias_max {
                return Err(TOPIC_ALIAS_INVALID);
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => return Err(PROTOCOL_ERROR),
                }
            } else {
                self.aliases.insert(alias, p.topic.clone());
            }
        }
        if p.topic.is_empty() {
            return Err(PROTOCOL_ERROR);
        }
        Ok(())
    }

    /// Takes a publish: QoS 1 and 2 join the queue of acknowledgements. `Err(reason)`: a
    /// protocol violation that ends the connection (MQTT 5 Receive Maximum exceeded).
    pub fn accept(&mut self, p: &Publish) -> Result<Accepted, u8> {
        match p.qos {
            Qos::AtMostOnce => Ok(Accepted::New(0)),
            Qos::AtLeastOnce | Qos::ExactlyOnce => {
                if self.waiting.len() >= self.window {
                    return Err(RECEIVE_MAX_EXCEEDED);
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                let dup_qos2 = p.qos == Qos::ExactlyOnce && !self.unreleased.insert(p.pkid);
                self.waiting.push_back(Waiting {
                    seq,
                    pkid: p.pkid,
                    qos: p.qos,
                    done: dup_qos2.then_some(0),
                });
                Ok(if dup_qos2 {
                    Accepted::Duplicate
                } else {
                    Accepted::New(seq)
                })
            }
        }
    }

    /// Publish `seq` is committed (or decided: dropped by a rule, dead-lettered, over
    /// `max_payload` with `reason` 0x97): returns the acknowledgements that may go now, in
    /// arrival order.
    pub fn done(&mut self, seq: u64, reason: u8) -> Vec<Out> {
        if let Some(w) = self.waiting.iter_mut().find(|w| w.seq == seq) {
            w.done.get_or_insert(reason);
        }
        let mut out = Vec::new();
        while let Some(w) = self.waiting.front() {
            let Some(reason) = w.done else { break };
            out.push(match w.qos {
                Qos::ExactlyOnce => Out::PubRec {
                    pkid: w.pkid,
                    reason,
                },
                _ => Out::PubAck {
                    pkid: w.pkid,
                    reason,
                },
            });
            if w.qos == Qos::ExactlyOnce && reason >= 0x80 {
                // A refused QoS 2 publish ends its exchange at the PUBREC (MQTT 5 §4.3.3).
                self.unreleased.remove(&w.pkid);
            }
            self.waiting.pop_front();
        }
        out
    }

    /// PUBREL for `pkid`: the sender releases it; answered with PUBCOMP (also for an id we no
    /// longer know, e.g. after a restart of the gateway: the publish was stored before its
    /// PUBREC went).
    pub fn release(&mut self, pkid: u16) -> Out {
        self.unreleased.remove(&pkid);
        Out::PubComp(pkid)
    }
}

/// When a silent client is given up: one and a half keep-alive periods after its last packet
/// (MQTT 3.1.1 §3.1.2.10); never for keep-alive 0.
pub fn keep_alive_deadline(keep_alive: u16, last_packet: Instant) -> Option<Instant> {
    (keep_alive > 0).then(|| last_packet + Duration::from_millis(u64::from(keep_alive) * 1500))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::packet::PubProps;

    fn publish(pkid: u16, qos: Qos) -> Publish {
        Publish {
            topic: "t".into(),
            payload: bytes::Bytes::from_static(b"1"),
            qos,
            retain: false,
            dup: false,
            pkid,
            props: PubProps::default(),
        }
    }

    fn seq(a: Result<Accepted, u8>) -> u64 {
        match a {
            Ok(Accepted::New(s)) => s,
            other => panic!("expected a new publish, got {other:?}"),
        }
    }

    #[test]
    fn acknowledgements_leave_in_arrival_order() {
        let mut s = Inbound::new(10, 0);
        let a = seq(s.accept(&publish(1, Qos::AtLeastOnce)));
        let b = seq(s.accept(&publish(2, Qos::AtLeastOnce)));
        let c = seq(s.accept(&publish(3, Qos::AtLeastOnce)));
        assert!(s.done(b, 0).is_empty(), "2 waits behind 1");
        assert!(s.done(c, QUOTA_EXCEEDED).is_empty());
        assert_eq!(
            s.done(a, 0),
            vec![
                Out::PubAck { pkid: 1, reason: 0 },
                Out::PubAck { pkid: 2, reason: 0 },
                Out::PubAck {
                    pkid: 3,
                    reason: QUOTA_EXCEEDED
                }
            ]
        );
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn qos0_is_never_acknowledged_and_takes_no_room() {
        let mut s = Inbound::new(1, 0);
        assert_eq!(s.accept(&publish(0, Qos::AtMostOnce)), Ok(Accepted::New(0)));
        assert!(!s.full());
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn the_window_fills_and_empties() {
        let mut s = Inbound::new(2, 0);
        let a = seq(s.accept(&publish(1, Qos::AtLeastOnce)));
        assert!(!s.full());
        let _b = seq(s.accept(&publish(2, Qos::ExactlyOnce)));
        assert!(s.full());
        assert_eq!(
            s.accept(&publish(3, Qos::AtLeastOnce)),
            Err(RECEIVE_MAX_EXCEEDED)
        );
        assert_eq!(s.done(a, 0).len(), 1);
        assert!(!s.full());
    }

    #[test]
    fn qos2_pubrec_after_commit_then_pubcomp_and_resends_are_not_stored() {
        let mut s = Inbound::new(10, 0);
        let a = seq(s.accept(&publish(7, Qos::ExactlyOnce)));
        // The sender resends before our PUBREC: same id, not released: a duplicate.
        let mut again = publish(7, Qos::ExactlyOnce);
        again.dup = true;
        assert_eq!(s.accept(&again), Ok(Accepted::Duplicate));
        assert_eq!(
            s.done(a, 0),
            vec![
                Out::PubRec { pkid: 7, reason: 0 },
                Out::PubRec { pkid: 7, reason: 0 }
            ]
        );
        assert_eq!(s.release(7), Out::PubComp(7));
        // Released: the id is free for a new message.
        assert!(matches!(
            s.accept(&publish(7, Qos::ExactlyOnce)),
            Ok(Accepted::New(_))
        ));
        // A PUBREL for an id we do not know is still completed.
        assert_eq!(s.release(99), Out::PubComp(99));
    }

    #[test]
    fn a_refused_qos2_publish_frees_its_id() {
        let mut s = Inbound::new(10, 0);
        let a = seq(s.accept(&publish(5, Qos::ExactlyOnce)));
        assert_eq!(
            s.done(a, QUOTA_EXCEEDED),
            vec![Out::PubRec {
                pkid: 5,
                reason: QUOTA_EXCEEDED
            }]
        );
        assert!(matches!(
            s.accept(&publish(5, Qos::ExactlyOnce)),
            Ok(Accepted::New(_))
        ));
    }

    #[test]
    fn topic_aliases_are_set_used_and_checked() {
        let mut s = Inbound::new(10, 4);
        let mut p = publish(0, Qos::AtMostOnce);
        p.topic = "sensors/1/t".into();
        p.props.topic_alias = Some(2);
        s.resolve_topic(&mut p).unwrap();
        assert_eq!(p.props.topic_alias, None, "never passed on");
        let mut q = publish(0, Qos::AtMostOnce);
        q.topic = String::new();
        q.props.topic_alias = Some(2);
        s.resolve_topic(&mut q).unwrap();
        assert_eq!(q.topic, "sensors/1/t");
        let mut unknown = publish(0, Qos::AtMostOnce);
        unknown.topic = String::new();
        unknown.props.topic_alias = Some(3);
        assert_eq!(s.resolve_topic(&mut unknown), Err(PROTOCOL_ERROR));
        let mut over = publish(0, Qos::AtMostOnce);
        over.props.topic_alias = Some(5);
        assert_eq!(s.resolve_topic(&mut over), Err(TOPIC_ALIAS_INVALID));
        let mut empty = publish(0, Qos::AtMostOnce);
        empty.topic = String::new();
        assert_eq!(s.resolve_topic(&mut empty), Err(PROTOCOL_ERROR));
    }

    #[test]
    fn keep_alive_zero_means_never() {
        let now = Instant::now();
        assert_eq!(keep_alive_deadline(0, now), None);
        assert_eq!(
            keep_alive_deadline(10, now),
            Some(now + Duration::from_secs(15))
        );
    }
}
