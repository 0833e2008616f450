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
    /// answered when its turn comes, which may be now: send what [`Inbound::ready`] returns.
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
        self.ready()
    }

    /// The acknowledgements that may go now, in arrival order: those of the decided publishes
    /// at the front of the queue (after [`Accepted::Duplicate`]: the resend's PUBREC, when
    /// nothing older waits).
    pub fn ready(&mut self) -> Vec<Out> {
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
    use proptest::prelude::*;

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
    fn a_qos2_resend_after_its_pubrec_is_answered_at_once() {
        let mut s = Inbound::new(2, 0);
        let a = seq(s.accept(&publish(7, Qos::ExactlyOnce)));
        assert_eq!(s.done(a, 0), vec![Out::PubRec { pkid: 7, reason: 0 }]);
        // The PUBREC went, the sender resends before its PUBREL: nothing older waits, so the
        // resend's PUBREC is ready now (else it waits for some other commit, and the resends
        // fill the window).
        for _ in 0..3 {
            assert_eq!(
                s.accept(&publish(7, Qos::ExactlyOnce)),
                Ok(Accepted::Duplicate)
            );
            assert_eq!(s.ready(), vec![Out::PubRec { pkid: 7, reason: 0 }]);
            assert!(!s.full());
        }
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

    // -- hostile sequences -------------------------------------------------------------------

    /// What a connection does to its inbound state: what the sensor sends, and the commits
    /// reporting back.
    #[derive(Debug, Clone)]
    enum Step {
        /// A PUBLISH (packet ids from a small range, so duplicates and reuse are common).
        Publish {
            qos: Qos,
            pkid: u16,
            alias: Option<u16>,
            topic: bool,
        },
        /// The commit of the `k`-th publish still waiting (any one, not only the oldest),
        /// with this reason.
        Commit(prop::sample::Index, u8),
        /// A commit report for a number that is not waiting (late, doubled or made up).
        StrayCommit(u64, u8),
        /// A PUBREL, for an id in use or not.
        Release(u16),
    }

    fn step() -> impl Strategy<Value = Step> {
        let qos = prop_oneof![
            Just(Qos::AtMostOnce),
            Just(Qos::AtLeastOnce),
            Just(Qos::ExactlyOnce)
        ];
        let reason = prop_oneof![Just(0u8), Just(QUOTA_EXCEEDED), any::<u8>()];
        prop_oneof![
            5 => (qos, 1u16..6, proptest::option::of(0u16..6), any::<bool>())
                .prop_map(|(qos, pkid, alias, topic)| Step::Publish { qos, pkid, alias, topic }),
            4 => (any::<prop::sample::Index>(), reason.clone()).prop_map(|(i, r)| Step::Commit(i, r)),
            1 => (any::<u64>(), reason).prop_map(|(n, r)| Step::StrayCommit(n, r)),
            2 => (0u16..8).prop_map(Step::Release),
        ]
    }

    /// The acknowledgement a publish is owed.
    fn ack(qos: Qos, pkid: u16, reason: u8) -> Out {
        match qos {
            Qos::ExactlyOnce => Out::PubRec { pkid, reason },
            _ => Out::PubAck { pkid, reason },
        }
    }

    /// Model of one owed acknowledgement: (seq or None for a duplicate, qos, pkid, reason).
    type Owed = (Option<u64>, Qos, u16, Option<u8>);

    proptest! {
        #![proptest_config(crate::fuzz::cases(1000))]

        /// Random sequences of publishes (QoS 0/1/2, reused and duplicate ids, topic aliases
        /// set, used, unknown and out of range), commits in any order, stray commit reports and
        /// PUBRELs for ids in use or unknown, against a plain model: no panic, the window is
        /// never exceeded (the publish that would is refused with Receive Maximum exceeded),
        /// acknowledgements leave exactly in arrival order, each once, with its commit's
        /// reason; QoS 2 resends before the release are duplicates, never stored twice.
        #[test]
        fn fuzz_inbound_keeps_order_window_and_qos2_exactly_once(
            window in 1u16..6,
            alias_max in 0u16..4,
            steps in proptest::collection::vec(step(), 0..80),
        ) {
            let mut s = Inbound::new(window, alias_max);
            let mut owed: VecDeque<Owed> = VecDeque::new();
            let mut unreleased: HashSet<u16> = HashSet::new();
            let mut aliases: HashMap<u16, String> = HashMap::new();
            let mut seqs = HashSet::new();
            let mut topic_n = 0;
            for st in steps {
                let mut sent = Vec::new();
                match st {
                    Step::Publish { qos, pkid, alias, topic } => {
                        let mut p = publish(pkid, qos);
                        topic_n += 1;
                        p.topic = if topic { format!("t/{topic_n}") } else { String::new() };
                        p.props.topic_alias = alias;
                        let want_topic = match alias {
                            Some(a) if a == 0 || a > alias_max => Err(TOPIC_ALIAS_INVALID),
                            Some(a) if !topic => aliases.get(&a).cloned().ok_or(PROTOCOL_ERROR),
                            Some(a) => {
                                aliases.insert(a, p.topic.clone());
                                Ok(p.topic.clone())
                            }
                            None if !topic => Err(PROTOCOL_ERROR),
                            None => Ok(p.topic.clone()),
                        };
                        let got = s.resolve_topic(&mut p).map(|()| p.topic.clone());
                        prop_assert_eq!(&got, &want_topic);
                        prop_assert_eq!(p.props.topic_alias, None, "an alias is never passed on");
                        if got.is_err() {
                            continue; // the connection ends with DISCONNECT
                        }
                        let accepted = s.accept(&p);
                        if qos == Qos::AtMostOnce {
                            prop_assert_eq!(accepted, Ok(Accepted::New(0)));
                        } else if owed.len() >= usize::from(window) {
                            prop_assert_eq!(accepted, Err(RECEIVE_MAX_EXCEEDED));
                        } else if qos == Qos::ExactlyOnce && !unreleased.insert(pkid) {
                            prop_assert_eq!(accepted, Ok(Accepted::Duplicate));
                            owed.push_back((None, qos, pkid, Some(0)));
                            sent = s.ready(); // as the connection does
                        } else {
                            let Ok(Accepted::New(seq)) = accepted else {
                                return Err(TestCaseError::fail(format!("{accepted:?}")));
                            };
                            prop_assert!(seq > 0 && seqs.insert(seq), "seq {} not new", seq);
                            owed.push_back((Some(seq), qos, pkid, None));
                        }
                    }
                    Step::Commit(i, reason) => {
                        let committable: Vec<usize> = (0..owed.len()).filter(|&k| owed[k].0.is_some() && owed[k].3.is_none()).collect();
                        if committable.is_empty() {
                            continue;
                        }
                        let k = committable[i.index(committable.len())];
                        owed[k].3 = Some(reason);
                        sent = s.done(owed[k].0.unwrap(), reason);
                    }
                    Step::StrayCommit(n, reason) => {
                        if owed.iter().any(|o| o.0 == Some(n)) {
                            continue;
                        }
                        sent = s.done(n, reason);
                    }
                    Step::Release(pkid) => {
                        prop_assert_eq!(s.release(pkid), Out::PubComp(pkid));
                        unreleased.remove(&pkid);
                    }
                }
                // What may leave now: the done ones at the front, in arrival order.
                let mut want = Vec::new();
                while let Some(&(_, qos, pkid, Some(reason))) = owed.front() {
                    want.push(ack(qos, pkid, reason));
                    if qos == Qos::ExactlyOnce && reason >= 0x80 {
                        unreleased.remove(&pkid);
                    }
                    owed.pop_front();
                }
                prop_assert_eq!(sent, want);
                prop_assert_eq!(s.waiting(), owed.len());
                prop_assert!(s.waiting() <= usize::from(window));
                prop_assert_eq!(s.full(), owed.len() >= usize::from(window));
            }
        }
    }
}
