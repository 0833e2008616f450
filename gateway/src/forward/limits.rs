//! How big an upstream PUBLISH may be, and what a dropped connection teaches about it; pure.
//!
//! - [`publish_size`]: the exact size of the QoS 1 MQTT 3.1.1 PUBLISH the forwarder sends
//!   (fixed header with the remaining-length varint, topic, packet id, payload; 3.1.1 has no
//!   properties).
//! - [`SizeGuard`]: the packet limit batches are built under: `[upstream] max_packet`, lowered
//!   in memory when the broker drops the connection right after a publish larger than any it
//!   has acknowledged (its own size limit, most likely). Such a drop halves the limit (down to
//!   one event per batch). A one-event batch that is over `max_packet`, or that the broker
//!   refused that way [`SINGLE_REFUSALS`] times, is not sent again: it goes to the dead-letter
//!   queue. A drop after publishes no larger than one already acknowledged is a network fault
//!   and changes nothing.
//! - [`plan`]: which stored events go into the next batch under those limits, which are
//!   dead-lettered, and whether the batch is full (so it goes at once) or partial (so it may
//!   wait for `batch_max_wait`).

use std::time::Duration;

use super::wire::BatchEncoder;
use crate::config::Encoding;
use crate::event::Event;

/// Refusals of the same one-event batch before that event is dead-lettered: one drop could
/// still be a network fault that happened to hit a large packet.
pub const SINGLE_REFUSALS: u32 = 2;
/// The same, while the broker has acknowledged nothing yet on this run.
pub const SINGLE_REFUSALS_UNPROVEN: u32 = 5;

/// A drop counts as a size refusal only this soon after the packet was written: a broker
/// that refuses a packet closes the connection as it reads it.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// Bytes of the MQTT remaining-length varint for `len`.
pub fn varint_len(len: usize) -> usize {
    match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Size of a QoS 1 PUBLISH packet with this topic and payload.
pub fn publish_size(topic_len: usize, payload_len: usize) -> usize {
    let remaining = 2 + topic_len + 2 + payload_len;
    1 + varint_len(remaining) + remaining
}

/// The largest payload whose QoS 1 PUBLISH on this topic fits in `limit` bytes (0 when not
/// even an empty one does).
pub fn payload_budget(limit: usize, topic_len: usize) -> usize {
    let Some(mut p) = limit.checked_sub(1 + 1 + 2 + topic_len + 2) else {
        return 0;
    };
    while p > 0 && publish_size(topic_len, p) > limit {
        p -= 1;
    }
    p
}

/// A batch that was written to the broker and not acknowledged when the connection dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unacked {
    /// Its first event id.
    pub first_id: u64,
    /// Events in it.
    pub count: u64,
    /// Its PUBLISH packet size.
    pub packet: usize,
    /// How long before the drop it was written.
    pub age: Duration,
}

/// What a dropped connection was taken to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A network fault: nothing changes.
    Network,
    /// The broker's size limit, most likely: `packet` was refused; batches are now built
    /// under `limit`.
    SizeRefusal {
        /// The refused packet's size.
        packet: usize,
        /// The packet limit from now on.
        limit: usize,
    },
}

/// The upstream packet limit, configured and learned.
#[derive(Debug, Clone)]
pub struct SizeGuard {
    max_packet: usize,
    /// The broker's MQTT 5 Maximum Packet Size, from its last CONNACK.
    broker: Option<usize>,
    largest_acked: usize,
    learned: Option<usize>,
    /// A one-event batch the broker refused: (event id, packet size, times).
    single: Option<(u64, usize, u32)>,
}

impl SizeGuard {
    /// Starts with nothing learned: the limit is `max_packet`.
    pub fn new(max_packet: usize) -> SizeGuard {
        SizeGuard {
            max_packet,
            broker: None,
            largest_acked: 0,
            learned: None,
            single: None,
        }
    }

    /// The largest packet a batch may be built to: `max_packet`, or less once learned.
    /// Never below what the broker has acknowledged.
    pub fn limit(&self) -> usize {
        match self.learned {
            Some(l) => l.max(self.largest_acked).min(self.hard_max()),
            None => self.hard_max(),
        }
    }

    /// `max_packet`, or the broker's Maximum Packet Size when smaller.
    fn hard_max(&self) -> usize {
        self.broker
            .map_or(self.max_packet, |b| b.min(self.max_packet))
    }

    /// The broker's MQTT 5 Maximum Packet Size from a CONNACK (`None`: it set none, or 3.1.1).
    pub fn set_broker_max(&mut self, broker: Option<usize>) {
        self.broker = broker;
    }

    /// The largest packet the broker acknowledged on this gateway since start.
    pub fn largest_acked(&self) -> usize {
        self.largest_acked
    }

    /// The broker acknowledged a batch starting at `first_id` of `packet` bytes.
    pub fn acked(&mut self, first_id: u64, packet: usize) {
        self.largest_acked = self.largest_acked.max(packet);
        if self.single.is_some_and(|(id, _, _)| id == first_id) {
            self.single = None;
        }
    }

    /// The connection dropped with `unacked` written and not acknowledged, oldest first.
    /// The oldest of them that is larger than anything acknowledged, written shortly before
    /// the drop, is taken as refused for its size: the limit halves.
    pub fn lost(&mut self, unacked: &[Unacked]) -> Verdict {
        let Some(u) = unacked
            .iter()
            .find(|u| u.packet > self.largest_acked && u.age <= REFUSAL_WINDOW)
        else {
            return Verdict::Network;
        };
        let halved = (u.packet / 2).max(self.largest_acked).max(1);
        self.learned = Some(self.learned.map_or(halved, |l| l.min(halved)));
        if u.count == 1 {
            self.single = Some(match self.single {
                Some((id, _, n)) if id == u.first_id => (id, u.packet, n + 1),
                _ => (u.first_id, u.packet, 1),
            });
        }
        Verdict::SizeRefusal {
            packet: u.packet,
            limit: self.limit(),
        }
    }

    /// Whether event `id`, alone in a batch of `packet` bytes, may be sent; else the reason
    /// it goes to the dead-letter queue.
    pub fn single(&self, id: u64, packet: usize) -> Result<(), String> {
        if packet > self.max_packet {
            return Err(format!(
                "exceeds upstream max_packet {} B: packet {packet} B",
                self.max_packet
            ));
        }
        if let Some(b) = self.broker.filter(|b| packet > *b) {
            return Err(format!(
                "exceeds the upstream broker's Maximum Packet Size {b} B: packet {packet} B"
            ));
        }
        // Before the broker has acknowledged anything (a fresh start, a broker that drops every
        // connection), a drop says little about size: it takes more of them on this event alone.
        let needed = if self.largest_acked > 0 {
            SINGLE_REFUSALS
        } else {
            SINGLE_REFUSALS_UNPROVEN
        };
        match self.single {
            Some((sid, size, n)) if sid == id && n >= needed => Err(format!(
                "refused by the upstream broker: it dropped the connection {n} times on this \
                 event alone (packet {size} B; largest it accepted {} B)",
                self.largest_acked
            )),
            _ => Ok(()),
        }
    }
}

/// The next batch, as [`plan`] chose it.
#[derive(Debug)]
pub struct Planned {
    /// The encoded batch, if any event is in it.
    pub payload: Option<Vec<u8>>,
    /// First event id in the batch.
    pub first_id: u64,
    /// Last event id in the batch.
    pub last_id: u64,
    /// Events in the batch.
    pub count: u64,
    /// The PUBLISH packet size of the batch.
    pub packet: usize,
    /// Full (by count, bytes or packet limit): send at once; else it may wait.
    pub full: bool,
    /// Events that go to the dead-letter queue instead, with the reason.
    pub dead: Vec<(u64, String)>,
    /// The highest id looked at (batched or dead-lettered).
    pub upto: u64,
    /// The payload is compressed (set by the forwarder).
    pub compressed: bool,
}

/// What [`plan`] builds under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `[upstream] encoding`.
    pub encoding: Encoding,
    /// Length of `[upstream] topic`, plus what MQTT 5 properties may take.
    pub topic_len: usize,
    /// `[upstream] batch_max_events`.
    pub max_events: usize,
    /// `[upstream] batch_max_bytes`: the most payload bytes.
    pub max_bytes: usize,
    /// A batch of backlog (says so in its payload).
    pub backlog: bool,
}

/// Builds batch number `batch` from `events` (read in id order; `more`: rows beyond them
/// are waiting) under `limits` and `guard`. The packet never exceeds `guard.limit()`, except
/// for one event alone that `guard.single` lets through.
pub fn plan(
    gateway: &str,
    batch: u64,
    events: &[Event],
    more: bool,
    limits: Limits,
    guard: &SizeGuard,
) -> Planned {
    let budget = limits
        .max_bytes
        .min(payload_budget(guard.limit(), limits.topic_len));
    let mut enc = BatchEncoder::with_backlog(limits.encoding, gateway, batch, limits.backlog);
    let mut out = Planned {
        payload: None,
        first_id: 0,
        last_id: 0,
        count: 0,
        packet: 0,
        full: more,
        dead: Vec::new(),
        compressed: false,
        upto: 0,
    };
    for e in events {
        let one = enc.encode(e);
        if enc.is_empty() {
            let packet = publish_size(limits.topic_len, enc.len_with(one.len()));
            if let Err(why) = guard.single(e.id, packet) {
                out.dead.push((e.id, why));
                out.upto = e.id;
                continue;
            }
            enc.push_encoded(one, usize::MAX);
            out.first_id = e.id;
        } else if !enc.push_encoded(one, budget) {
            out.full = true;
            break;
        }
        out.last_id = e.id;
        out.upto = e.id;
        if enc.count() >= limits.max_events {
            out.full = true;
            break;
        }
    }
    if !enc.is_empty() {
        out.count = enc.count() as u64;
        let payload = enc.finish();
        out.packet = publish_size(limits.topic_len, payload.len());
        out.payload = Some(payload);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Payload;
    use bytes::BytesMut;

    fn rumqttc_size(topic: &str, payload_len: usize) -> usize {
        let mut p =
            rumqttc::Publish::new(topic, rumqttc::QoS::AtLeastOnce, vec![b'x'; payload_len]);
        p.pkid = 1;
        let mut buf = BytesMut::new();
        let n = p.write(&mut buf).unwrap();
        assert_eq!(n, buf.len());
        assert_eq!(p.size(), buf.len());
        buf.len()
    }

    #[test]
    fn packet_size_matches_rumqttc_at_every_varint_edge() {
        let topic = "tidepool/pi-kitchen-01/events";
        for payload in [
            0, 1, 90, 91, 92, 93, 127, 128, 16_340, 16_347, 16_348, 16_349, 16_383, 16_384, 65_536,
            128_000, 2_097_100, 2_097_115, 2_097_116, 2_097_200,
        ] {
            assert_eq!(
                publish_size(topic.len(), payload),
                rumqttc_size(topic, payload),
                "payload {payload}"
            );
        }
    }

    #[test]
    fn payload_budget_is_the_largest_payload_that_fits() {
        for topic_len in [0, 5, 29, 300] {
            for limit in [
                200, 1024, 16_389, 16_390, 16_391, 16_392, 65_536, 128_000, 2_097_160,
            ] {
                let p = payload_budget(limit, topic_len);
                if publish_size(topic_len, 0) > limit {
                    assert_eq!(p, 0);
                    continue;
                }
                assert!(publish_size(topic_len, p) <= limit, "{limit} {topic_len}");
                assert!(
                    publish_size(topic_len, p + 1) > limit,
                    "{limit} {topic_len}"
                );
            }
        }
        assert_eq!(payload_budget(5, 29), 0);
    }

    fn unacked(first_id: u64, count: u64, packet: usize) -> Unacked {
        Unacked {
            first_id,
            count,
            packet,
            age: Duration::from_millis(5),
        }
    }

    #[test]
    fn a_drop_after_a_packet_larger_than_any_acked_halves_the_limit() {
        let mut g = SizeGuard::new(128_000);
        g.acked(1, 20_000);
        assert_eq!(g.limit(), 128_000);
        assert_eq!(
            g.lost(&[unacked(10, 400, 127_000)]),
            Verdict::SizeRefusal {
                packet: 127_000,
                limit: 63_500
            }
        );
        assert_eq!(g.limit(), 63_500);
        // Still too big: halves again, never below what was acknowledged.
        g.lost(&[unacked(10, 200, 63_500)]);
        assert_eq!(g.limit(), 31_750);
        g.lost(&[unacked(10, 100, 31_750)]);
        assert_eq!(g.limit(), 20_000);
        // Acknowledged now: a later drop after packets of known-good size is the network.
        g.acked(10, 20_000);
        assert_eq!(g.lost(&[unacked(110, 64, 19_000)]), Verdict::Network);
        assert_eq!(g.limit(), 20_000);
    }

    #[test]
    fn a_drop_after_known_good_sizes_is_a_network_fault() {
        let mut g = SizeGuard::new(128_000);
        g.acked(1, 100_000);
        assert_eq!(g.lost(&[unacked(5, 300, 90_000)]), Verdict::Network);
        assert_eq!(g.lost(&[]), Verdict::Network, "nothing in flight");
        let late = Unacked {
            age: REFUSAL_WINDOW + Duration::from_secs(1),
            ..unacked(5, 300, 120_000)
        };
        assert_eq!(g.lost(&[late]), Verdict::Network, "written long before");
        assert_eq!(g.limit(), 128_000);
        assert!(g.single(5, 120_000).is_ok());
    }

    #[test]
    fn the_oldest_oversized_unacked_batch_is_the_suspect() {
        let mut g = SizeGuard::new(128_000);
        g.acked(1, 50_000);
        let v = g.lost(&[
            unacked(5, 10, 40_000),
            unacked(15, 300, 100_000),
            unacked(315, 400, 120_000),
        ]);
        assert_eq!(
            v,
            Verdict::SizeRefusal {
                packet: 100_000,
                limit: 50_000
            }
        );
    }

    #[test]
    fn one_event_refused_twice_is_dead_lettered_others_are_not() {
        let mut g = SizeGuard::new(128_000);
        g.acked(1, 60_000);
        assert!(g.single(7, 70_000).is_ok(), "never refused: it is tried");
        g.lost(&[unacked(7, 1, 70_000)]);
        assert!(
            g.single(7, 70_000).is_ok(),
            "one refusal may be the network"
        );
        g.lost(&[unacked(7, 1, 70_000)]);
        let why = g.single(7, 70_000).unwrap_err();
        assert!(why.contains("refused by the upstream broker"), "{why}");
        assert!(g.single(8, 70_000).is_ok(), "another event is tried");
        // Over max_packet: never sent.
        let why = g.single(9, 140_213).unwrap_err();
        assert_eq!(why, "exceeds upstream max_packet 128000 B: packet 140213 B");
    }

    #[test]
    fn before_any_ack_a_few_drops_do_not_dead_letter() {
        let mut g = SizeGuard::new(128_000);
        for _ in 0..SINGLE_REFUSALS_UNPROVEN - 1 {
            g.lost(&[unacked(7, 1, 70_000)]);
            assert!(
                g.single(7, 70_000).is_ok(),
                "a flaky link must not dead-letter"
            );
        }
        g.lost(&[unacked(7, 1, 70_000)]);
        assert!(
            g.single(7, 70_000).is_err(),
            "a broker that always refuses it"
        );
    }

    #[test]
    fn an_acked_single_clears_its_refusals() {
        let mut g = SizeGuard::new(128_000);
        g.lost(&[unacked(7, 1, 70_000)]);
        g.acked(7, 70_000);
        g.lost(&[unacked(9, 1, 80_000)]);
        assert!(g.single(7, 70_000).is_ok());
        assert_eq!(g.limit(), 70_000, "never below what was acknowledged");
    }

    fn ev(id: u64, payload_len: usize) -> Event {
        Event {
            id,
            ts: 1_763_785_000_123,
            source: "mqtt".into(),
            topic: "sensors/1/temperature".into(),
            payload: Payload::Json(format!("\"{}\"", "x".repeat(payload_len))),
            trace: Default::default(),
            properties: Vec::new(),
        }
    }

    fn limits(encoding: Encoding) -> Limits {
        Limits {
            encoding,
            topic_len: "tidepool/test-gw/events".len(),
            max_events: 500,
            max_bytes: 256 * 1024,
            backlog: false,
        }
    }

    #[test]
    fn batches_fill_up_to_the_packet_limit_and_say_they_are_full() {
        for encoding in [Encoding::Json, Encoding::Postcard] {
            let events: Vec<Event> = (1..=3000).map(|i| ev(i, 300)).collect();
            let g = SizeGuard::new(128_000);
            let p = plan("gw", 1, &events, true, limits(encoding), &g);
            assert!(p.full);
            assert!(p.packet <= 128_000, "{}", p.packet);
            assert!(p.packet > 128_000 - 400, "filled: {}", p.packet);
            assert_eq!(
                p.packet,
                publish_size(23, p.payload.as_ref().unwrap().len())
            );
            assert_eq!(p.first_id, 1);
            assert_eq!(p.last_id, p.count);
            // Halved limit: about half the events.
            let mut g2 = g.clone();
            g2.lost(&[unacked(1, p.count, p.packet)]);
            let q = plan("gw", 1, &events, true, limits(encoding), &g2);
            assert!(q.packet <= p.packet / 2);
            assert!(q.count >= p.count / 2 - 2 && q.count <= p.count / 2 + 1);
        }
    }

    #[test]
    fn a_batch_full_by_bytes_is_full_a_short_one_is_partial() {
        let big: Vec<Event> = (1..=10).map(|i| ev(i, 60 * 1024)).collect();
        let g = SizeGuard::new(128_000);
        let p = plan("gw", 1, &big, false, limits(Encoding::Json), &g);
        assert_eq!(p.count, 2, "two 60 KiB events fit in 128000 B");
        assert!(p.full, "the third did not fit: full");
        let p = plan("gw", 1, &big[..1], false, limits(Encoding::Json), &g);
        assert_eq!(p.count, 1);
        assert!(!p.full, "nothing else waiting: partial");
        let p = plan("gw", 1, &big[..1], true, limits(Encoding::Json), &g);
        assert!(p.full, "the read stopped at its limit: more waiting");
        let small: Vec<Event> = (1..=500).map(|i| ev(i, 10)).collect();
        let p = plan("gw", 1, &small, false, limits(Encoding::Json), &g);
        assert_eq!(p.count, 500);
        assert!(p.full, "full by count");
    }

    #[test]
    fn an_event_over_max_packet_is_dead_lettered_and_the_rest_go() {
        let mut events = vec![ev(1, 130_000)];
        events.extend((2..=5).map(|i| ev(i, 100)));
        let g = SizeGuard::new(128_000);
        let p = plan("gw", 1, &events, false, limits(Encoding::Json), &g);
        assert_eq!(p.dead.len(), 1);
        assert_eq!(p.dead[0].0, 1);
        assert!(p.dead[0]
            .1
            .starts_with("exceeds upstream max_packet 128000 B: packet 130"));
        assert_eq!((p.first_id, p.last_id, p.count), (2, 5, 4));
        assert_eq!(p.upto, 5);
        // In the middle of a batch: the batch stops before it; it is dead-lettered next time.
        let mut events: Vec<Event> = (1..=3).map(|i| ev(i, 100)).collect();
        events.push(ev(4, 130_000));
        let p = plan("gw", 1, &events, false, limits(Encoding::Json), &g);
        assert!(p.dead.is_empty());
        assert_eq!((p.last_id, p.count, p.full), (3, 3, true));
        let p = plan("gw", 1, &events[3..], false, limits(Encoding::Json), &g);
        assert_eq!(p.dead.len(), 1);
        assert!(p.payload.is_none());
        assert_eq!(p.upto, 4);
    }

    #[test]
    fn a_single_event_over_the_learned_limit_goes_alone() {
        let mut g = SizeGuard::new(128_000);
        g.acked(1, 30_000);
        g.lost(&[unacked(2, 100, 100_000)]);
        assert_eq!(g.limit(), 50_000);
        let mut events = vec![ev(2, 70_000)];
        events.extend((3..=10).map(|i| ev(i, 100)));
        let p = plan("gw", 1, &events, false, limits(Encoding::Json), &g);
        assert_eq!((p.first_id, p.count, p.full), (2, 1, true));
        assert!(p.packet > 70_000);
    }
}
