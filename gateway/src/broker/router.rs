//! The router: the broker's in-process state for local subscribers. Pure logic, no I/O and no
//! clock of its own (every time is an `Instant` argument); connection tasks call it under a
//! mutex and do the socket work.
//!
//! What it holds:
//! - **Sessions**, by client id: online (under one connection id) or offline until their
//!   expiry; each has its subscriptions, a bounded queue of messages not yet sent, and the QoS 1
//!   messages sent but not yet acknowledged (the in-flight window, at most the client's Receive
//!   Maximum, else [`Limits::default_inflight`]).
//! - **Retained messages**, by topic, at most [`Limits::max_retained`].
//!
//! Policies when full, every drop counted in [`Stats`]:
//! - A session's queue holds at most [`Limits::max_queued`]; one more message drops the
//!   OLDEST queued one (never one in flight): `dropped_queue_full`.
//! - A retained publish on a new topic beyond `max_retained` is routed but not retained:
//!   `retained_refused`.
//! - A message whose Message Expiry passes while queued is dropped when its turn comes:
//!   `dropped_expired`.
//! - An offline session queues only QoS 1; QoS 0 to it is dropped silently (Mosquitto's
//!   default), and QoS 0 still queued when a session goes offline goes too.
//!
//! We grant at most QoS 1 (a QoS 2 subscription is granted 1), so nothing leaves at QoS 2.
//!
//! Sessions live in memory only: a restart of the gateway ends them all. Retained messages are
//! the caller's to persist: [`Router::publish`] reports each change as a [`RetainChange`],
//! [`Router::expire_retained`] the topics whose retained message expired, and
//! [`Router::load_retained`] takes them back at start.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::packet::{PubProps, Publish, Qos, SubOpts};

/// Bounds on what the router keeps.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most messages queued per session (online or offline); beyond it the OLDEST queued message is dropped and counted.
    pub max_queued: usize,
    /// Most retained topics; a retained publish on a new topic beyond it is not retained (counted).
    pub max_retained: usize,
    /// In-flight QoS 1 window to a subscriber that announced no Receive Maximum (3.1.1 clients).
    pub default_inflight: u16,
}

/// A message being routed (shared by every session it is queued to: cheap clone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: Arc<str>,
    /// The bytes.
    pub payload: Bytes,
    /// As published; once queued to a session, the QoS it is delivered at.
    pub qos: Qos,
    /// As published; once queued to a session, the retain flag it is delivered with.
    pub retain: bool,
    /// MQTT 5 properties; once queued, with that session's subscription ids.
    pub props: Arc<PubProps>,
    /// When the Message Expiry Interval runs out, if it has one.
    pub expires_at: Option<Instant>,
    /// Client id of the publisher (for No Local); `None` for the gateway's own messages.
    pub from: Option<Arc<str>>,
}

impl Message {
    /// The message of a received PUBLISH by client `from`; expiry counted from `now`. Topic
    /// alias and subscription ids (client-to-server meaningless) are dropped.
    pub fn from_publish(p: &Publish, from: Option<&str>, now: Instant) -> Message {
        let mut props = p.props.clone();
        props.topic_alias = None;
        props.subscription_ids.clear();
        Message {
            topic: Arc::from(p.topic.as_str()),
            payload: p.payload.clone(),
            qos: p.qos,
            retain: p.retain,
            expires_at: props
                .message_expiry
                .map(|s| now + Duration::from_secs(u64::from(s))),
            props: Arc::new(props),
            from: from.map(Arc::from),
        }
    }

    fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    /// The PUBLISH to send, its expiry rewritten to the seconds left (rounded up, at least 1:
    /// a message we send is not yet expired, or is a resend we owe).
    fn to_publish(&self, pkid: u16, dup: bool, now: Instant) -> Publish {
        let mut props = PubProps::clone(&self.props);
        if let Some(at) = self.expires_at {
            let left = at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            props.message_expiry = Some(secs.clamp(1, u64::from(u32::MAX)) as u32);
        }
        Publish {
            topic: self.topic.to_string(),
            payload: self.payload.clone(),
            qos: self.qos,
            retain: self.retain,
            dup,
            pkid,
            props,
        }
    }
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubError {
    /// The filter is not a valid MQTT topic filter.
    #[error("topic filter not valid")]
    InvalidFilter,
    /// `$share/group/filter`: shared subscriptions are not supported.
    #[error("shared subscriptions are not supported")]
    SharedUnsupported,
    /// No session for that client id (subscribe before connect: a bug of the caller).
    #[error("no session for this client id")]
    NoSession,
}

impl SubError {
    /// The MQTT 5 SUBACK reason code (3.1.1 sends 0x80 for all).
    pub fn code(&self) -> u8 {
        match self {
            SubError::InvalidFilter => 0x8F,
            SubError::SharedUnsupported => 0x9E,
            SubError::NoSession => 0x80,
        }
    }
}

/// What [`Router::publish`] did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// ONLINE sessions it was queued to: their connection tasks should call `next_out` (one
    /// whose window is full gets nothing until a PUBACK).
    pub woken: Vec<Arc<str>>,
    /// Sessions it was queued to (0: the MQTT 5 PUBACK may say 0x10, no matching subscribers).
    pub matched: usize,
    /// How the retained store changed, for the caller to persist.
    pub retained: Option<RetainChange>,
}

/// A change to the retained store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetainChange {
    /// This message is now the topic's retained message.
    Set(Message),
    /// The topic's retained message was removed.
    Cleared(Arc<str>),
}

/// Counts and gauges, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sessions, online and offline.
    pub sessions: usize,
    /// Sessions with a connection.
    pub online: usize,
    /// Subscriptions over all sessions.
    pub subscriptions: usize,
    /// Retained topics.
    pub retained: usize,
    /// Messages queued, not yet sent, over all sessions.
    pub queued: usize,
    /// QoS 1 messages sent and not yet acknowledged, over all sessions.
    pub inflight: usize,
    /// Messages dropped because a session's queue was full (the oldest went).
    pub dropped_queue_full: u64,
    /// Messages dropped because their Message Expiry passed while queued.
    pub dropped_expired: u64,
    /// Retained publishes not retained because `max_retained` topics were held.
    pub retained_refused: u64,
}

/// One subscription of a session.
#[derive(Debug)]
struct Sub {
    filter: Box<str>,
    /// Granted (at most QoS 1).
    qos: Qos,
    no_local: bool,
    retain_as_published: bool,
    id: Option<usize>,
}

#[derive(Debug)]
struct Session {
    /// The connection it is online under; `None`: offline.
    conn: Option<u64>,
    /// Seconds it outlives a disconnect (0: none; `u32::MAX`: forever).
    expiry: u32,
    /// When an offline session ends (`None` while online or if it never does).
    ends_at: Option<Instant>,
    /// QoS 1 window (at least 1).
    window: u16,
    subs: Vec<Sub>,
    queue: VecDeque<Message>,
    /// Sent, awaiting PUBACK, in the order first sent.
    inflight: VecDeque<(u16, Message)>,
    /// Where the search for a free packet id starts.
    next_pkid: u16,
}

impl Session {
    fn new(conn: u64, expiry: u32, window: u16) -> Session {
        Session {
            conn: Some(conn),
            expiry,
            ends_at: None,
            window,
            subs: Vec::new(),
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            next_pkid: 1,
        }
    }

    fn window_full(&self) -> bool {
        self.inflight.len() >= usize::from(self.window)
    }

    /// The next packet id not in flight (there is one: the window is below 65535).
    fn alloc_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = if id == u16::MAX { 1 } else { id + 1 };
            if !self.inflight.iter().any(|(p, _)| *p == id) {
                return id;
            }
        }
    }
}

/// Queues `msg` to `s` under the queue policy; false if not queued (QoS 0 to an offline
/// session, or no room at all).
fn enqueue(s: &mut Session, msg: Message, max: usize, dropped: &mut u64) -> bool {
    if s.conn.is_none() && msg.qos == Qos::AtMostOnce {
        return false;
    }
    if max == 0 {
        *dropped += 1;
        return false;
    }
    while s.queue.len() >= max {
        s.queue.pop_front();
        *dropped += 1;
    }
    s.queue.push_back(msg);
    true
}

/// `props` with these subscription ids (the same `Arc` when nothing changes).
fn with_sub_ids(props: &Arc<PubProps>, ids: Vec<usize>) -> Arc<PubProps> {
    if ids.is_empty() && props.subscription_ids.is_empty() {
        props.clone()
    } else {
        Arc::new(PubProps {
            subscription_ids: ids,
            ..PubProps::clone(props)
        })
    }
}

/// Sessions, subscriptions and retained messages of the embedded broker.
#[derive(Debug)]
pub struct Router {
    limits: Limits,
    sessions: BTreeMap<Arc<str>, Session>,
    retained: BTreeMap<Arc<str>, Message>,
    dropped_queue_full: u64,
    dropped_expired: u64,
    retained_refused: u64,
}

impl Router {
    /// An empty router.
    pub fn new(limits: Limits) -> Router {
        Router {
            limits,
            sessions: BTreeMap::new(),
            retained: BTreeMap::new(),
            dropped_queue_full: 0,
            dropped_expired: 0,
            retained_refused: 0,
        }
    }

    /// Retained messages kept from an earlier run (empty payloads skipped; beyond
    /// `max_retained` refused and counted).
    pub fn load_retained(&mut self, msgs: impl IntoIterator<Item = Message>) {
        for mut m in msgs {
            if m.payload.is_empty() {
                continue;
            }
            if !self.retained.contains_key(&m.topic)
                && self.retained.len() >= self.limits.max_retained
            {
                self.retained_refused += 1;
                continue;
            }
            m.retain = true;
            m.props = with_sub_ids(&m.props, Vec::new());
            self.retained.insert(m.topic.clone(), m);
        }
    }

    /// A connection `conn` (unique, rising) for `client_id` is accepted. clean_start discards an existing session. `expiry`: seconds the session outlives a disconnect (0: ends with the connection; u32::MAX: never). `receive_max`: the client's window for QoS 1 (None: limits.default_inflight; 0 is taken as 1). Returns session_present. If the session was online under another conn, that conn is superseded (its later `disconnect` is ignored; closing it is the caller's).
    pub fn connect(
        &mut self,
        client_id: &str,
        conn: u64,
        clean_start: bool,
        expiry: u32,
        receive_max: Option<u16>,
        now: Instant,
    ) -> bool {
        let window = receive_max.unwrap_or(self.limits.default_inflight).max(1);
        if let Some(s) = self.sessions.get_mut(client_id) {
            let ended = s.conn.is_none() && s.ends_at.is_some_and(|at| now >= at);
            if !clean_start && !ended {
                s.conn = Some(conn);
                s.expiry = expiry;
                s.ends_at = None;
                s.window = window;
                return true;
            }
            self.sessions.remove(client_id);
        }
        self.sessions
            .insert(Arc::from(client_id), Session::new(conn, expiry, window));
        false
    }

    /// The connection `conn` of `client_id` ended (ignored if superseded). Session removed if expiry is 0, else kept offline until now+expiry (its QoS 0 queue dropped, in-flight kept for `resume`).
    pub fn disconnect(&mut self, client_id: &str, conn: u64, now: Instant) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        if s.conn != Some(conn) {
            return;
        }
        if s.expiry == 0 {
            self.sessions.remove(client_id);
            return;
        }
        s.conn = None;
        s.ends_at = match s.expiry {
            u32::MAX => None,
            e => Some(now + Duration::from_secs(u64::from(e))),
        };
        s.queue.retain(|m| m.qos != Qos::AtMostOnce);
    }

    /// An MQTT 5 DISCONNECT changed the session expiry (applies at the coming `disconnect`).
    pub fn set_expiry(&mut self, client_id: &str, expiry: u32) {
        if let Some(s) = self.sessions.get_mut(client_id) {
            s.expiry = expiry;
        }
    }

    /// Subscribe; grants min(opts.qos, QoS 1) (QoS 2 is granted as 1). Replaces an existing subscription to the same filter (its options and id). Queues matching retained messages (retain flag set, No Local applied, expired ones skipped) per retain_handling: 0 always, 1 only if the subscription is new, 2 never. Returns the granted QoS.
    pub fn subscribe(
        &mut self,
        client_id: &str,
        filter: &str,
        opts: SubOpts,
        sub_id: Option<usize>,
        now: Instant,
    ) -> Result<Qos, SubError> {
        if filter.starts_with("$share/") {
            return Err(SubError::SharedUnsupported);
        }
        if !valid_filter(filter) {
            return Err(SubError::InvalidFilter);
        }
        let Some(s) = self.sessions.get_mut(client_id) else {
            return Err(SubError::NoSession);
        };
        let qos = opts.qos.min(Qos::AtLeastOnce);
        let sub = Sub {
            filter: filter.into(),
            qos,
            no_local: opts.no_local,
            retain_as_published: opts.retain_as_published,
            id: sub_id,
        };
        let new = match s.subs.iter_mut().find(|x| *x.filter == *filter) {
            Some(old) => {
                *old = sub;
                false
            }
            None => {
                s.subs.push(sub);
                true
            }
        };
        let send_retained = match opts.retain_handling {
            0 => true,
            1 => new,
            _ => false,
        };
        if send_retained {
            for m in self.retained.values() {
                if m.expired(now) || !matches(filter, &m.topic) {
                    continue;
                }
                if opts.no_local && m.from.as_deref() == Some(client_id) {
                    continue;
                }
                let out = Message {
                    qos: m.qos.min(qos),
                    retain: true,
                    props: with_sub_ids(&m.props, sub_id.into_iter().collect()),
                    ..m.clone()
                };
                enqueue(s, out, self.limits.max_queued, &mut self.dropped_queue_full);
            }
        }
        Ok(qos)
    }

    /// Returns whether such a subscription existed (messages already queued stay).
    pub fn unsubscribe(&mut self, client_id: &str, filter: &str) -> bool {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return false;
        };
        let before = s.subs.len();
        s.subs.retain(|x| *x.filter != *filter);
        s.subs.len() != before
    }

    /// Routes a message: retained store/clear (empty payload clears; retained messages keep their expiry), then queued to every session with a matching subscription: ONE copy per session, at min(msg.qos, highest granted QoS among its matching subscriptions); all matching subscription ids in props.subscription_ids; retain flag on delivery = msg.retain only if a matching subscription has retain_as_published, else false; No Local: a session's no_local subscriptions do not match messages whose `from` is its own client id. Offline sessions queue only QoS 1 messages (QoS 0 to an offline session is dropped silently). Full queue: drop the oldest queued (not in flight) message, count dropped_queue_full. A message already expired is neither retained nor queued (counted dropped_expired). The topic is assumed valid ([`valid_topic`]).
    pub fn publish(&mut self, mut msg: Message, now: Instant) -> Routed {
        if msg.expired(now) {
            self.dropped_expired += 1;
            return Routed {
                woken: Vec::new(),
                matched: 0,
                retained: None,
            };
        }
        if msg.props.topic_alias.is_some() || !msg.props.subscription_ids.is_empty() {
            let mut p = PubProps::clone(&msg.props);
            p.topic_alias = None;
            p.subscription_ids.clear();
            msg.props = Arc::new(p);
        }
        let retained = if !msg.retain {
            None
        } else if msg.payload.is_empty() {
            self.retained
                .remove(&msg.topic)
                .map(|_| RetainChange::Cleared(msg.topic.clone()))
        } else if self.retained.contains_key(&msg.topic)
            || self.retained.len() < self.limits.max_retained
        {
            self.retained.insert(msg.topic.clone(), msg.clone());
            Some(RetainChange::Set(msg.clone()))
        } else {
            self.retained_refused += 1;
            None
        };

        let mut routed = Routed {
            woken: Vec::new(),
            matched: 0,
            retained,
        };
        for (id, s) in self.sessions.iter_mut() {
            let own = msg.from.as_deref() == Some(&**id);
            let mut hit = false;
            let mut qos = Qos::AtMostOnce;
            let mut rap = false;
            let mut ids = Vec::new();
            for sub in &s.subs {
                if (own && sub.no_local) || !matches(&sub.filter, &msg.topic) {
                    continue;
                }
                hit = true;
                qos = qos.max(sub.qos);
                rap |= sub.retain_as_published;
                ids.extend(sub.id);
            }
            if !hit {
                continue;
            }
            let out = Message {
                qos: msg.qos.min(qos),
                retain: msg.retain && rap,
                props: with_sub_ids(&msg.props, ids),
                ..msg.clone()
            };
            if enqueue(s, out, self.limits.max_queued, &mut self.dropped_queue_full) {
                routed.matched += 1;
                if s.conn.is_some() {
                    routed.woken.push(id.clone());
                }
            }
        }
        routed
    }

    /// The next PUBLISH for an online session, or None (nothing queued, or the QoS 1 in-flight window is full). QoS 0: popped and returned with pkid 0. QoS 1: given the next free packet id (1..=65535, wrapping, skipping ids in flight), kept in flight until `acked`. Expired messages are dropped (counted dropped_expired) and a message's message_expiry property is rewritten to the seconds remaining (rounded up).
    pub fn next_out(&mut self, client_id: &str, now: Instant) -> Option<Publish> {
        let s = self.sessions.get_mut(client_id)?;
        s.conn?;
        loop {
            let head = s.queue.front()?;
            if head.expired(now) {
                s.queue.pop_front();
                self.dropped_expired += 1;
                continue;
            }
            if head.qos == Qos::AtMostOnce {
                let m = s.queue.pop_front()?;
                return Some(m.to_publish(0, false, now));
            }
            if s.window_full() {
                return None;
            }
            let m = s.queue.pop_front()?;
            let pkid = s.alloc_pkid();
            let p = m.to_publish(pkid, false, now);
            s.inflight.push_back((pkid, m));
            return Some(p);
        }
    }

    /// The subscriber acknowledged `pkid` (PUBACK). Returns whether it was in flight.
    pub fn acked(&mut self, client_id: &str, pkid: u16) -> bool {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return false;
        };
        match s.inflight.iter().position(|(p, _)| *p == pkid) {
            Some(i) => {
                s.inflight.remove(i);
                true
            }
            None => false,
        }
    }

    /// On a reconnect with session_present: the in-flight messages again, DUP set, same packet ids, in the order first sent (resent even if expired since: delivery had begun; message_expiry as of `now`, at least 1).
    pub fn resume(&mut self, client_id: &str, now: Instant) -> Vec<Publish> {
        self.sessions
            .get(client_id)
            .map(|s| {
                s.inflight
                    .iter()
                    .map(|(pkid, m)| m.to_publish(*pkid, true, now))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Ends offline sessions whose expiry has passed; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.sessions.len();
        self.sessions
            .retain(|_, s| s.conn.is_some() || s.ends_at.is_none_or(|at| now < at));
        before - self.sessions.len()
    }

    /// Drops retained messages whose Message Expiry has passed; returns their topics, for the caller to clear from its copy.
    pub fn expire_retained(&mut self, now: Instant) -> Vec<Arc<str>> {
        let mut gone = Vec::new();
        self.retained.retain(|t, m| {
            let keep = !m.expired(now);
            if !keep {
                gone.push(t.clone());
            }
            keep
        });
        gone
    }

    /// Whether an online session has something it could send now (queue non-empty and window not full; an expired head still counts).
    pub fn can_send(&self, client_id: &str) -> bool {
        self.sessions.get(client_id).is_some_and(|s| {
            s.conn.is_some()
                && s.queue
                    .front()
                    .is_some_and(|m| m.qos == Qos::AtMostOnce || !s.window_full())
        })
    }

    /// Counts and gauges now.
    pub fn stats(&self) -> Stats {
        let mut st = Stats {
            sessions: self.sessions.len(),
            retained: self.retained.len(),
            dropped_queue_full: self.dropped_queue_full,
            dropped_expired: self.dropped_expired,
            retained_refused: self.retained_refused,
            ..Stats::default()
        };
        for s in self.sessions.values() {
            st.online += usize::from(s.conn.is_some());
            st.subscriptions += s.subs.len();
            st.queued += s.queue.len();
            st.inflight += s.inflight.len();
        }
        st
    }

    /// The retained messages (for persistence / tests).
    pub fn retained(&self) -> impl Iterator<Item = &Message> {
        self.retained.values()
    }
}

/// Whether `f` is a valid topic filter: non-empty, `#` only last and alone in its level, `+` alone in its level, no NUL.
pub fn valid_filter(f: &str) -> bool {
    if f.is_empty() || f.contains('\0') {
        return false;
    }
    let mut levels = f.split('/').peekable();
    while let Some(l) = levels.next() {
        if l.contains('#') && (l != "#" || levels.peek().is_some()) {
            return false;
        }
        if l.contains('+') && l != "+" {
            return false;
        }
    }
    true
}

/// Whether `t` is a valid topic name to publish to: non-empty, no `+` or `#`, no NUL.
pub fn valid_topic(t: &str) -> bool {
    !t.is_empty() && !t.contains(['+', '#', '\0'])
}

/// Whether topic `topic` matches filter `filter`: `+` one level, `#` the rest including the parent level (`a/#` matches `a`); a filter starting with a wildcard does not match a `$` topic. Both assumed valid.
pub fn matches(filter: &str, topic: &str) -> bool {
    tidepool_rules::topic_matches(filter, topic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const Q0: Qos = Qos::AtMostOnce;
    const Q1: Qos = Qos::AtLeastOnce;
    const Q2: Qos = Qos::ExactlyOnce;

    fn limits() -> Limits {
        Limits {
            max_queued: 100,
            max_retained: 100,
            default_inflight: 10,
        }
    }

    fn opts(qos: Qos) -> SubOpts {
        SubOpts {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
        }
    }

    fn publish(topic: &str, payload: &'static str, qos: Qos, retain: bool) -> Publish {
        Publish {
            topic: topic.into(),
            payload: Bytes::from_static(payload.as_bytes()),
            qos,
            retain,
            dup: false,
            pkid: 0,
            props: PubProps::default(),
        }
    }

    fn msg(topic: &str, payload: &'static str, qos: Qos, retain: bool, now: Instant) -> Message {
        Message::from_publish(&publish(topic, payload, qos, retain), None, now)
    }

    fn from(client: &str, topic: &str, payload: &'static str, now: Instant) -> Message {
        Message::from_publish(&publish(topic, payload, Q1, false), Some(client), now)
    }

    /// A router with client `c` online (conn 1, session expiry 1 h).
    fn with_client(l: Limits, now: Instant) -> Router {
        let mut r = Router::new(l);
        assert!(!r.connect("c", 1, true, 3600, None, now));
        r
    }

    fn drain(r: &mut Router, client: &str, now: Instant) -> Vec<Publish> {
        let mut out = Vec::new();
        while let Some(p) = r.next_out(client, now) {
            out.push(p);
        }
        out
    }

    fn payloads(ps: &[Publish]) -> Vec<&[u8]> {
        ps.iter().map(|p| &p.payload[..]).collect()
    }

    #[test]
    fn wildcard_matching() {
        let table = [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a", false),
            ("a/+/c", "a/b/c", true),
            ("a/+/c", "a/b/d", false),
            ("+", "a", true),
            ("+", "a/b", false),
            ("+/+", "a/b", true),
            ("a/+", "a/", true),
            ("#", "a", true),
            ("#", "a/b/c", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/#", "ab", false),
            ("a/b/#", "a", false),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("+", "$SYS", false),
            ("$SYS/#", "$SYS/x", true),
            ("$SYS/+", "$SYS/x", true),
            ("a/#", "$SYS/a", false),
        ];
        for (f, t, want) in table {
            assert_eq!(matches(f, t), want, "filter {f:?} topic {t:?}");
        }
    }

    #[test]
    fn filter_and_topic_validity() {
        for f in ["a", "a/b", "#", "a/#", "+", "+/+/x", "a//b", "/", "$SYS/#"] {
            assert!(valid_filter(f), "{f:?}");
        }
        for f in [
            "", "a/#/b", "a#", "#/", "a/b#", "a+", "+a/b", "a/+b", "a\0b",
        ] {
            assert!(!valid_filter(f), "{f:?}");
        }
        for t in ["a", "a/b", "/", "$SYS/x", "a//b"] {
            assert!(valid_topic(t), "{t:?}");
        }
        for t in ["", "a/+", "a/#", "#", "a\0"] {
            assert!(!valid_topic(t), "{t:?}");
        }
    }

    #[test]
    fn invalid_and_shared_filters_refused() {
        let now = Instant::now();
        let mut r = with_client(limits(), now);
        let e = r.subscribe("c", "a/#/b", opts(Q1), None, now).unwrap_err();
        assert_eq!((e, e.code()), (SubError::InvalidFilter, 0x8F));
        let e = r
            .subscribe("c", "$share/g/a/#", opts(Q1), None, now)
            .unwrap_err();
        assert_eq!((e, e.code()), (SubError::SharedUnsupported, 0x9E));
        let e = r.subscribe("nobody", "a", opts(Q1), None, now).unwrap_err();
        assert_eq!(e, SubError::NoSession);
        assert_eq!(r.stats().subscriptions, 0);
        assert_eq!(r.publish(msg("a/x/b", "p", Q1, false, now), now).matched, 0);
    }

    #[test]
    fn overlapping_subscriptions_give_one_copy_at_the_highest_qos_with_all_ids() {
        let now = Instant::now();
        let mut r = with_client(limits(), now);
        assert_eq!(r.subscribe("c", "a/+", opts(Q0), Some(1), now), Ok(Q0));
        assert_eq!(r.subscribe("c", "a/#", opts(Q1), Some(2), now), Ok(Q1));
        assert_eq!(r.subscribe("c", "x", opts(Q1), Some(3), now), Ok(Q1));
        let routed = r.publish(msg("a/b", "p", Q1, false, now), now);
        assert_eq!(routed.matched, 1);
        assert_eq!(routed.woken, vec![Arc::<str>::from("c")]);
        let out = drain(&mut r, "c", now);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].qos, Q1);
        assert_eq!(out[0].props.subscription_ids, vec![1, 2]);

        r.publish(msg("a/b/c", "p", Q1, false, now), now);
        let out = drain(&mut r, "c", now);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].props.subscription_ids, vec![2]);
    }

    #[test]
    fn qos_is_downgraded_and_qos2_granted_as_1() {
        let now = Instant::now();
        let mut r = with_client(limits(), now);
        assert_eq!(r.subscribe("c", "low", opts(Q0), None, now), Ok(Q0));
        assert_eq!(r.subscribe("c", "high", opts(Q2), None, now), Ok(Q1));
        r.publish(msg("low", "1", Q1, false, now), now);
        r.publish(msg("high", "2", Q2, false, now), now);
        r.publish(msg("high", "3", Q0, false, now), now);
        let out = drain(&mut r, "c", now);
        let got: Vec<(Qos, u16)> = out.iter().map(|p| (p.qos, p.pkid)).collect();
        assert_eq!(got, vec![(Q0, 0), (Q1, 1), (Q0, 0)]);
    }

    #[test]
    fn resubscribing_replaces_options() {
        let now = Instant::now();
        let mut r = with_client(limits(), now);
        r.subscribe("c", "t", opts(Q1), Some(1), now).unwrap();
        r.subscribe("c", "t", opts(Q0), Some(7), now).unwrap();
        assert_eq!(r.stats().subscriptions, 1);
        r.publish(msg("t", "p", Q1, false, now), now);
        let out = drain(&mut r, "c", now);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].qos, &out[0].props.subscription_ids[..]),
            (Q0, &[7][..])
        );
        assert!(r.unsubscribe("c", "t"));
        assert!(!r.unsubscribe("c", "t"));
        assert_eq!(r.publish(msg("t", "p", Q1, false, now), now).matched, 0);
    }

    #[test]
    fn retained_set_cleared_and_delivered_on_subscribe() {
        let now = Instant::now();
        let mut r = with_client(limits(), now);
        let routed = r.publish(msg("r/1", "on", Q1, true, now), now);
        assert_eq!(routed.matched, 0);
        let Some(RetainChange::Set(m)) = routed.retained else {
            panic!("not retained: {:?}", routed.retained);
        };
        assert_eq!((&*m.topic, &m.payload[..]), ("r/1", &b"on"[..]));
        r.publish(msg("r/2", "off", Q0, true, now), now);
        assert_eq!(r.retained().count(), 2);

        r.subscribe("c", "r/1", opts(Q1), Some(5), now).unwrap();
        let out = drain(&mut r, "c", now);
        assert_eq!(out.len(), 1);
        assert!(out[0].retain);
        assert_eq!((&out[0].topic[..], out[0].qos), ("r/1", Q1));
        assert_eq!(out[0].props.subscription_ids, vec![5]);

        let routed = r.publish(msg("r/1", "", Q1, true, now), now);
        assert_eq!(
            routed.retained,
            Some(RetainChange::Cleared(Arc::from("r/1")))
        );
        assert_eq!(
            routed.matched, 1,
            "the clearing publish is routed like any other"
        );
        assert_eq!(r.publish(msg("r/9", "", Q1, true, now), now).retained, None);
        let topics: Vec<&str> = r.retained().map(|m| &*m.topic).collect();
        assert_eq!(topics, vec!["r/2"]);

        r.connect("d", 2, true, 0, None, now);
        r.subscribe("d", "r/#", opts(Q1), None, now).unwrap();
        let out = drain(&mut r, "d", now);
        assert_eq!(payloads(&out), vec![&b"off"[..]]);
        assert_eq!(
            out[0].qos, Q0,
            "at the retained message's own QoS when lower"
        );
    }

    #[test]
    fn retained_messages_loaded_from_an_earlier_run_are_delivered() {
        let now = Instant::now();
        let mut r = with_client(limits(), now);
        r.load_retained([
            msg("s/1", "21.5", Q1, true, now),
            msg("s/2", "", Q1, true, now),
        ]);
        assert_eq!(r.stats().retained, 1);
        r.subscribe("c", "s/+", opts(Q1), None, now).unwrap();
        assert_eq!(payloads(&drain(&mut r, "c", now)), vec![&b"21.5"[..]]);
    }

    #[test]
    fn retain_handling() {
        let now = Instant::now();
        let mut r = with_client(limits(), now);
        r.publish(msg("r", "v", Q1, true, now), now);
        let sub = |r: &mut Router, rh: u8| {
            let o = SubOpts {
                retain_handling: rh,
                ..opts(Q1)
            };
            r.subscribe("c", "r", o, None, now).unwrap();
            drain(r, "c", now).len()
        };
        assert_eq!(sub(&mut r, 0), 1, "0: on a new subscription");
        assert_eq!(sub(&mut r, 0), 1, "0: on a replaced one too");
        assert_eq!(sub(&mut r, 1), 0, "1: not on a replaced one");
        r.unsubscribe("c", "r");
        assert_eq!(sub(&mut r, 1), 1, "1: on a new one");
        r.unsubscribe("c", "r");
        assert_eq!(sub(&mut r, 2), 0, "2: never");
    }

    #[test]
    fn retain_as_published() {
        let now = Instant::now();
        let mut r = with_client(limits(), now);
        r.connect("d", 2, true, 0, None, now);
        r.subscribe("c", "t", opts(Q1), None, now).unwrap();
        let rap = SubOpts {
            retain_as_published: true,
            ..opts(Q1)
        };
        r.subscribe("d", "t", rap.clone(), None, now).unwrap();
        r.subscribe("d", "u", rap, None, now).unwrap();
        r.publish(msg("t", "p", Q1, true, now), now);
        r.publish(msg("u", "p", Q1, false, now), now);
        assert!(!drain(&mut r, "c", now)[0].retain);
        let d: Vec<bool> = drain(&mut r, "d", now).iter().map(|p| p.retain).collect();
        assert_eq!(d, vec![true, false]);
    }

    #[test]
    fn no_local() {
        let now = Instant::now();
        let mut r = with_client(limits(), now);
        let nl = SubOpts {
            no_local: true,
            ..opts(Q1)
        };
        r.subscribe("c", "t/#", nl.clone(), Some(1), now).unwrap();
        assert_eq!(r.publish(from("c", "t/1", "own", now), now).matched, 0);
        assert_eq!(
            r.publish(from("other", "t/1", "theirs", now), now).matched,
            1
        );
        assert_eq!(payloads(&drain(&mut r, "c", now)), vec![&b"theirs"[..]]);

        // Another matching subscription without No Local still takes its own messages.
        r.subscribe("c", "t/+", opts(Q0), Some(2), now).unwrap();
        r.publish(from("c", "t/1", "own", now), now);
        let out = drain(&mut r, "c", now);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].qos, &out[0].props.subscription_ids[..]),
            (Q0, &[2][..])
        );

        // Retained messages it published itself are not sent back either.
        r.publish(from("c", "t/r", "mine", now).with_retain(), now);
        r.subscribe("c", "t/#", nl, Some(1), now).unwrap();
        assert!(drain(&mut r, "c", now).iter().all(|p| !p.retain));
    }

    impl Message {
        fn with_retain(mut self) -> Message {
            self.retain = true;
            self
        }
    }

    #[test]
    fn offline_session_queues_qos1_only_and_delivers_after_reconnect() {
        let t0 = Instant::now();
        let mut r = with_client(limits(), t0);
        r.subscribe("c", "t", opts(Q1), None, t0).unwrap();
        r.publish(msg("t", "before, qos0", Q0, false, t0), t0);
        r.publish(msg("t", "before, qos1", Q1, false, t0), t0);
        r.disconnect("c", 1, t0);
        assert_eq!(r.stats().online, 0);
        assert_eq!(r.next_out("c", t0), None, "offline: nothing sent");
        assert!(!r.can_send("c"));

        let routed = r.publish(msg("t", "offline, qos0", Q0, false, t0), t0);
        assert_eq!((routed.matched, routed.woken.len()), (0, 0));
        let routed = r.publish(msg("t", "offline, qos1", Q1, false, t0), t0);
        assert_eq!((routed.matched, routed.woken.len()), (1, 0));

        assert!(r.connect("c", 2, false, 3600, None, t0), "session present");
        assert!(r.can_send("c"));
        let out = drain(&mut r, "c", t0);
        assert_eq!(
            payloads(&out),
            vec![&b"before, qos1"[..], &b"offline, qos1"[..]]
        );
    }

    #[test]
    fn clean_start_discards_the_session() {
        let t0 = Instant::now();
        let mut r = with_client(limits(), t0);
        r.subscribe("c", "t", opts(Q1), None, t0).unwrap();
        r.publish(msg("t", "a", Q1, false, t0), t0);
        r.next_out("c", t0).unwrap();
        r.publish(msg("t", "b", Q1, false, t0), t0);
        r.disconnect("c", 1, t0);
        assert!(!r.connect("c", 2, true, 3600, None, t0));
        let st = r.stats();
        assert_eq!(
            (st.sessions, st.subscriptions, st.queued, st.inflight),
            (1, 0, 0, 0)
        );
        assert!(r.resume("c", t0).is_empty());
        assert_eq!(r.publish(msg("t", "c", Q1, false, t0), t0).matched, 0);
    }

    #[test]
    fn session_expiry() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut r = with_client(limits(), t0);
        r.set_expiry("c", 10);
        r.connect("zero", 2, true, 0, None, t0);
        r.connect("forever", 3, true, u32::MAX, None, t0);
        r.connect("late", 4, true, 5, None, t0);
        r.disconnect("c", 1, t0);
        r.disconnect("zero", 2, t0);
        r.disconnect("forever", 3, t0);
        r.disconnect("late", 4, t0);
        assert_eq!(r.stats().sessions, 3, "expiry 0 ends with the connection");

        assert_eq!(r.expire(t0 + s(4)), 0);
        // Due but not yet swept: a reconnect finds no session.
        assert!(!r.connect("late", 5, false, 5, None, t0 + s(6)));
        assert_eq!(r.expire(t0 + s(9)), 0);
        assert_eq!(r.expire(t0 + s(10)), 1, "c: 10 s after its disconnect");
        assert_eq!(r.expire(t0 + s(100 * 365 * 86400)), 0, "u32::MAX: never");
        assert_eq!(r.stats().sessions, 2, "forever, and late (online again)");

        // Reconnecting in time keeps it, and while online it never expires.
        r.disconnect("late", 5, t0 + s(6));
        assert!(r.connect("late", 6, false, 5, None, t0 + s(10)));
        assert_eq!(r.expire(t0 + s(1000)), 0);
    }

    #[test]
    fn superseded_connection_disconnect_is_ignored() {
        let t0 = Instant::now();
        let mut r = with_client(limits(), t0);
        r.subscribe("c", "t", opts(Q1), None, t0).unwrap();
        assert!(
            r.connect("c", 2, false, 0, None, t0),
            "take-over keeps the session"
        );
        r.disconnect("c", 1, t0);
        assert_eq!(r.stats().online, 1);
        r.publish(msg("t", "p", Q1, false, t0), t0);
        assert!(r.next_out("c", t0).is_some());
        r.disconnect("c", 2, t0);
        assert_eq!(
            r.stats().sessions,
            0,
            "the live connection's end counts (expiry 0)"
        );
    }

    #[test]
    fn full_queue_drops_the_oldest_and_counts() {
        let t0 = Instant::now();
        let l = Limits {
            max_queued: 3,
            default_inflight: 1,
            ..limits()
        };
        let mut r = with_client(l, t0);
        r.subscribe("c", "t", opts(Q1), None, t0).unwrap();
        r.publish(msg("t", "0", Q1, false, t0), t0);
        let first = r.next_out("c", t0).unwrap();
        for p in ["1", "2", "3", "4", "5"] {
            r.publish(msg("t", p, Q1, false, t0), t0);
        }
        let st = r.stats();
        assert_eq!((st.queued, st.inflight, st.dropped_queue_full), (3, 1, 2));
        let resent = r.resume("c", t0);
        assert_eq!(
            payloads(&resent),
            vec![&b"0"[..]],
            "in flight is never dropped"
        );
        assert!(r.acked("c", first.pkid));
        let out = drain(&mut r, "c", t0);
        assert_eq!(payloads(&out), vec![&b"3"[..]]);
    }

    #[test]
    fn inflight_window() {
        let t0 = Instant::now();
        let l = Limits {
            default_inflight: 2,
            ..limits()
        };
        let mut r = with_client(l, t0);
        r.subscribe("c", "t", opts(Q1), None, t0).unwrap();
        for p in ["1", "2", "3"] {
            r.publish(msg("t", p, Q1, false, t0), t0);
        }
        let a = r.next_out("c", t0).unwrap();
        let b = r.next_out("c", t0).unwrap();
        assert_ne!(a.pkid, b.pkid);
        assert_eq!(r.next_out("c", t0), None, "window of 2 full");
        assert!(!r.can_send("c"));
        assert_eq!(r.stats().inflight, 2);
        assert!(!r.acked("c", 999));
        assert!(r.acked("c", b.pkid), "acks out of order are fine");
        assert!(!r.acked("c", b.pkid), "only once");
        assert!(r.can_send("c"));
        assert_eq!(&r.next_out("c", t0).unwrap().payload[..], b"3");
        assert_eq!(r.next_out("c", t0), None);

        // The client's Receive Maximum wins over the default.
        assert!(r.connect("c", 2, false, 3600, Some(5), t0));
        for _ in 0..5 {
            r.publish(msg("t", "x", Q1, false, t0), t0);
        }
        assert_eq!(drain(&mut r, "c", t0).len(), 3, "2 in flight + 3 = 5");
    }

    #[test]
    fn packet_ids_skip_those_in_flight_and_wrap() {
        let t0 = Instant::now();
        let mut r = with_client(limits(), t0);
        r.subscribe("c", "t", opts(Q1), None, t0).unwrap();
        r.publish(msg("t", "held", Q1, false, t0), t0);
        assert_eq!(r.next_out("c", t0).unwrap().pkid, 1);
        // Go round the id space, acking all but the first.
        let mut last: u16 = 1;
        for _ in 0..65536 {
            r.publish(msg("t", "x", Q1, false, t0), t0);
            let p = r.next_out("c", t0).unwrap();
            assert_ne!(p.pkid, 0);
            assert_ne!(p.pkid, 1, "1 is still in flight");
            assert!(p.pkid == last.wrapping_add(1) || (last == 65535 && p.pkid == 2));
            last = p.pkid;
            assert!(r.acked("c", p.pkid));
        }
        assert_eq!(last, 3, "1 skipped once: 2..=65535, then 2, 3");
    }

    #[test]
    fn resume_resends_inflight_with_dup_in_order() {
        let t0 = Instant::now();
        let mut r = with_client(limits(), t0);
        r.subscribe("c", "t", opts(Q1), None, t0).unwrap();
        for p in ["1", "2", "3"] {
            r.publish(msg("t", p, Q1, false, t0), t0);
        }
        let sent: Vec<Publish> = (0..3).map(|_| r.next_out("c", t0).unwrap()).collect();
        assert!(r.acked("c", sent[1].pkid));
        r.disconnect("c", 1, t0);
        assert!(r.connect("c", 2, false, 3600, None, t0));
        let again = r.resume("c", t0);
        let want: Vec<Publish> = [&sent[0], &sent[2]]
            .into_iter()
            .map(|p| Publish {
                dup: true,
                ..p.clone()
            })
            .collect();
        assert_eq!(again, want);
        assert!(r.acked("c", sent[0].pkid));
        assert_eq!(r.resume("c", t0).len(), 1);
    }

    #[test]
    fn message_expiry_drops_and_rewrites_the_remaining_seconds() {
        let t0 = Instant::now();
        let mut r = with_client(limits(), t0);
        r.subscribe("c", "t", opts(Q1), None, t0).unwrap();
        let with_expiry = |payload, secs| {
            let mut p = publish("t", payload, Q1, false);
            p.props.message_expiry = Some(secs);
            p.props.topic_alias = Some(3);
            Message::from_publish(&p, None, t0)
        };
        r.publish(with_expiry("short", 5), t0);
        r.publish(with_expiry("long", 10), t0);
        r.publish(msg("t", "none", Q1, false, t0), t0);
        let later = t0 + Duration::from_millis(5500);
        let out = drain(&mut r, "c", later);
        assert_eq!(payloads(&out), vec![&b"long"[..], &b"none"[..]]);
        assert_eq!(
            out[0].props.message_expiry,
            Some(5),
            "4.5 s left, rounded up"
        );
        assert_eq!(out[0].props.topic_alias, None);
        assert_eq!(out[1].props.message_expiry, None);
        assert_eq!(r.stats().dropped_expired, 1);
        // A resend says what is left then, even once expired: delivery had begun.
        let again = r.resume("c", t0 + Duration::from_secs(8));
        assert_eq!(again[0].props.message_expiry, Some(2));
        let again = r.resume("c", t0 + Duration::from_secs(60));
        assert_eq!(again[0].props.message_expiry, Some(1));

        // An expired retained message is not delivered, and is swept.
        let mut p = publish("r", "stale", Q1, true);
        p.props.message_expiry = Some(2);
        r.publish(Message::from_publish(&p, None, t0), t0);
        r.subscribe("c", "r", opts(Q1), None, t0 + Duration::from_secs(2))
            .unwrap();
        assert!(drain(&mut r, "c", later).is_empty());
        assert!(r.expire_retained(t0 + Duration::from_secs(1)).is_empty());
        let gone = r.expire_retained(t0 + Duration::from_secs(2));
        assert_eq!(gone, vec![Arc::<str>::from("r")]);
        assert_eq!(r.stats().retained, 0);
    }

    #[test]
    fn max_retained_refusal_is_counted() {
        let t0 = Instant::now();
        let l = Limits {
            max_retained: 2,
            ..limits()
        };
        let mut r = with_client(l, t0);
        r.subscribe("c", "#", opts(Q1), None, t0).unwrap();
        assert!(r
            .publish(msg("a", "1", Q1, true, t0), t0)
            .retained
            .is_some());
        assert!(r
            .publish(msg("b", "1", Q1, true, t0), t0)
            .retained
            .is_some());
        let refused = r.publish(msg("c", "1", Q1, true, t0), t0);
        assert_eq!(
            (refused.retained, refused.matched),
            (None, 1),
            "still routed"
        );
        assert_eq!(r.stats().retained_refused, 1);
        assert!(
            r.publish(msg("a", "2", Q1, true, t0), t0)
                .retained
                .is_some(),
            "a held topic can still change"
        );
        r.publish(msg("b", "", Q1, true, t0), t0);
        assert!(r
            .publish(msg("c", "1", Q1, true, t0), t0)
            .retained
            .is_some());
        let topics: Vec<&str> = r.retained().map(|m| &*m.topic).collect();
        assert_eq!(topics, vec!["a", "c"]);
        assert_eq!(r.stats().retained_refused, 1);
    }

    // -- hostile sequences -------------------------------------------------------------------

    #[derive(Debug, Clone)]
    enum Op {
        Connect {
            c: usize,
            clean: bool,
            expiry: u32,
            receive_max: Option<u16>,
        },
        Disconnect {
            c: usize,
            stale: bool,
        },
        SetExpiry(usize, u32),
        Subscribe {
            c: usize,
            f: &'static str,
            qos: Qos,
            no_local: bool,
            rap: bool,
            rh: u8,
            id: Option<usize>,
        },
        Unsubscribe(usize, &'static str),
        Publish {
            t: &'static str,
            qos: Qos,
            retain: bool,
            empty: bool,
            from: Option<usize>,
            expiry: Option<u32>,
        },
        Drain(usize),
        Ack(usize, prop::sample::Index, bool),
        Resume(usize),
        Wait(u64),
    }

    const CLIENTS: [&str; 3] = ["c0", "c1", "c2"];
    const FILTERS: [&str; 14] = [
        "#",
        "+",
        "a/#",
        "a/+",
        "+/b",
        "a/b",
        "$SYS/#",
        "",
        "a/#/b",
        "a+",
        "$share/g/a",
        "a\0",
        "/",
        "+/+",
    ];
    const TOPICS: [&str; 7] = ["a", "a/b", "a/c", "b/b", "$SYS/x", "/", "a/b/c"];

    fn op() -> impl Strategy<Value = Op> {
        let c = 0..CLIENTS.len();
        let qos = prop_oneof![Just(Q0), Just(Q1), Just(Q2)];
        let expiry = prop_oneof![Just(0u32), Just(2), Just(u32::MAX)];
        prop_oneof![
            2 => (c.clone(), any::<bool>(), expiry.clone(), prop_oneof![Just(None), Just(Some(0u16)), Just(Some(1)), Just(Some(3))])
                .prop_map(|(c, clean, expiry, receive_max)| Op::Connect { c, clean, expiry, receive_max }),
            1 => (c.clone(), any::<bool>()).prop_map(|(c, stale)| Op::Disconnect { c, stale }),
            1 => (c.clone(), expiry).prop_map(|(c, e)| Op::SetExpiry(c, e)),
            2 => (c.clone(), prop::sample::select(&FILTERS[..]), qos.clone(), any::<bool>(), any::<bool>(), 0u8..4, proptest::option::of(1usize..4))
                .prop_map(|(c, f, qos, no_local, rap, rh, id)| Op::Subscribe { c, f, qos, no_local, rap, rh, id }),
            1 => (c.clone(), prop::sample::select(&FILTERS[..])).prop_map(|(c, f)| Op::Unsubscribe(c, f)),
            4 => (prop::sample::select(&TOPICS[..]), qos, any::<bool>(), any::<bool>(), proptest::option::of(0..CLIENTS.len()), proptest::option::of(0u32..3))
                .prop_map(|(t, qos, retain, empty, from, expiry)| Op::Publish { t, qos, retain, empty, from, expiry }),
            3 => c.clone().prop_map(Op::Drain),
            3 => (c.clone(), any::<prop::sample::Index>(), any::<bool>()).prop_map(|(c, i, known)| Op::Ack(c, i, known)),
            1 => c.prop_map(Op::Resume),
            1 => (0u64..3).prop_map(Op::Wait),
        ]
    }

    /// The model of one session: what the router promises about it.
    #[derive(Debug, Default)]
    struct Model {
        online: Option<u64>,
        expiry: u32,
        ends_at: Option<Instant>,
        window: usize,
        inflight: Vec<u16>,
        /// Every filter it subscribed to (queued messages outlive an unsubscribe).
        filters: Vec<&'static str>,
    }

    proptest! {
        #![proptest_config(crate::fuzz::cases(500))]

        /// Random connects (clean or not, any session expiry and receive maximum), stale and
        /// current disconnects, valid and invalid subscriptions, publishes (any QoS, retained,
        /// empty, expiring, from a subscriber), drains, PUBACKs for ids in flight or not,
        /// resumes and time passing, against a model of sessions: no panic; session present
        /// exactly when the session outlived its connection; invalid and shared filters
        /// refused; nothing leaves at QoS 2; a QoS 1 message leaves only inside the window,
        /// with an id not in flight; only to a filter the session subscribed; a PUBACK frees
        /// exactly an id in flight; resume resends the in-flight ids in the order first sent;
        /// queues stay within their bound.
        #[test]
        fn fuzz_router_sessions_windows_and_acks(ops in proptest::collection::vec(op(), 0..60)) {
            let l = Limits { max_queued: 4, max_retained: 3, default_inflight: 2 };
            let mut r = Router::new(l.clone());
            let mut now = Instant::now();
            let mut next_conn = 0u64;
            let mut m: Vec<Option<Model>> = (0..CLIENTS.len()).map(|_| None).collect();
            for op in ops {
                match op {
                    Op::Connect { c, clean, expiry, receive_max } => {
                        next_conn += 1;
                        let outlived = m[c].as_ref().is_some_and(|s| {
                            !(s.online.is_none() && s.ends_at.is_some_and(|at| now >= at))
                        });
                        let present = r.connect(CLIENTS[c], next_conn, clean, expiry, receive_max, now);
                        prop_assert_eq!(present, outlived && !clean);
                        let window = usize::from(receive_max.unwrap_or(l.default_inflight).max(1));
                        if present {
                            let s = m[c].as_mut().unwrap();
                            s.online = Some(next_conn);
                            s.expiry = expiry;
                            s.ends_at = None;
                            s.window = window;
                        } else {
                            m[c] = Some(Model { online: Some(next_conn), expiry, window, ..Model::default() });
                        }
                    }
                    Op::Disconnect { c, stale } => {
                        let Some(s) = m[c].as_mut() else { continue };
                        let conn = if stale { 0 } else { s.online.unwrap_or(0) };
                        r.disconnect(CLIENTS[c], conn, now);
                        if s.online == Some(conn) {
                            if s.expiry == 0 {
                                m[c] = None;
                            } else {
                                s.online = None;
                                s.ends_at = (s.expiry != u32::MAX).then(|| now + Duration::from_secs(u64::from(s.expiry)));
                            }
                        }
                    }
                    Op::SetExpiry(c, e) => {
                        r.set_expiry(CLIENTS[c], e);
                        if let Some(s) = m[c].as_mut() {
                            s.expiry = e;
                        }
                    }
                    Op::Subscribe { c, f, qos, no_local, rap, rh, id } => {
                        let opts = SubOpts { qos, no_local, retain_as_published: rap, retain_handling: rh };
                        let got = r.subscribe(CLIENTS[c], f, opts, id, now);
                        if f.starts_with("$share/") {
                            prop_assert_eq!(got, Err(SubError::SharedUnsupported));
                        } else if !valid_filter(f) {
                            prop_assert_eq!(got, Err(SubError::InvalidFilter));
                        } else if let Some(s) = m[c].as_mut() {
                            prop_assert_eq!(got, Ok(qos.min(Q1)));
                            s.filters.push(f);
                        } else {
                            prop_assert_eq!(got, Err(SubError::NoSession));
                        }
                    }
                    Op::Unsubscribe(c, f) => {
                        r.unsubscribe(CLIENTS[c], f);
                    }
                    Op::Publish { t, qos, retain, empty, from, expiry } => {
                        let p = Publish {
                            topic: t.into(),
                            payload: if empty { Bytes::new() } else { Bytes::from_static(b"x") },
                            qos,
                            retain,
                            dup: false,
                            pkid: 0,
                            props: PubProps { message_expiry: expiry, ..PubProps::default() },
                        };
                        let routed = r.publish(Message::from_publish(&p, from.map(|c| CLIENTS[c]), now), now);
                        prop_assert!(routed.matched <= CLIENTS.len());
                        prop_assert!(routed.woken.len() <= routed.matched);
                    }
                    Op::Drain(c) => {
                        while let Some(p) = r.next_out(CLIENTS[c], now) {
                            let s = m[c].as_mut().expect("only a session gets messages");
                            prop_assert!(s.online.is_some(), "sent to an offline session");
                            prop_assert!(p.qos != Q2, "QoS 2 is never granted");
                            prop_assert!(s.filters.iter().any(|f| matches(f, &p.topic)), "{} to {:?}", p.topic, s.filters);
                            if p.qos == Q1 {
                                prop_assert!(s.inflight.len() < s.window, "window {} exceeded", s.window);
                                prop_assert!(p.pkid != 0 && !s.inflight.contains(&p.pkid), "id {} in flight", p.pkid);
                                s.inflight.push(p.pkid);
                            } else {
                                prop_assert_eq!(p.pkid, 0);
                            }
                        }
                    }
                    Op::Ack(c, i, known) => {
                        let inflight = m[c].as_ref().map(|s| s.inflight.clone()).unwrap_or_default();
                        let pkid = if known && !inflight.is_empty() {
                            inflight[i.index(inflight.len())]
                        } else {
                            (i.index(65_535) + 1) as u16
                        };
                        let was = inflight.contains(&pkid);
                        prop_assert_eq!(r.acked(CLIENTS[c], pkid), was);
                        if was {
                            m[c].as_mut().unwrap().inflight.retain(|p| *p != pkid);
                        }
                    }
                    Op::Resume(c) => {
                        let again: Vec<u16> = r.resume(CLIENTS[c], now).iter().map(|p| {
                            assert!(p.dup);
                            p.pkid
                        }).collect();
                        let want = m[c].as_ref().map(|s| s.inflight.clone()).unwrap_or_default();
                        prop_assert_eq!(again, want);
                    }
                    Op::Wait(secs) => {
                        now += Duration::from_secs(secs);
                        let gone = r.expire(now);
                        let mut want = 0;
                        for s in m.iter_mut() {
                            if s.as_ref().is_some_and(|s| s.online.is_none() && s.ends_at.is_some_and(|at| now >= at)) {
                                *s = None;
                                want += 1;
                            }
                        }
                        prop_assert_eq!(gone, want);
                        r.expire_retained(now);
                    }
                }
                let st = r.stats();
                prop_assert_eq!(st.sessions, m.iter().flatten().count());
                prop_assert_eq!(st.online, m.iter().flatten().filter(|s| s.online.is_some()).count());
                prop_assert_eq!(st.inflight, m.iter().flatten().map(|s| s.inflight.len()).sum::<usize>());
                prop_assert!(st.queued <= st.sessions * l.max_queued);
                prop_assert!(st.retained <= l.max_retained);
            }
        }
    }
}
