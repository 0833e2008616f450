//! Redelivery detection: what a source sends again after a crash or reconnect is stored once,
//! and nothing distinct is ever taken for a resend (when in doubt, store: a duplicate carries
//! its own id upstream; a loss is silent).
//!
//! Two tables, both written only inside the commit that stores the events they describe, so a
//! crash keeps them and the events in step:
//!
//! - [`MQTT_DEDUP`] (client mode): `packet id → (hash of topic + payload, tag)`. A message is
//!   recorded when committed; a message that arrives with DUP, the same packet id and the same
//!   hash is the broker resending it (our PUBACK did not reach it) and is acknowledged, not
//!   stored. An entry is valid only until its PUBACK is written: MQTT 3.1.1 §4.3.2 makes any
//!   later PUBLISH with that id a new message. So the ingest client reports every PUBACK it
//!   wrote ([`PubackLog`]) and the next commit removes those entries (matched by `tag`, unique
//!   per delivery, so a newer entry under the same id stays); a publish without DUP replaces
//!   the entry of its id; at the first message without DUP on a connection (the broker's
//!   resends are behind us), entries of earlier connections that it did not resend go (their
//!   PUBACK got through, though a crash kept us from hearing of it); a lost broker session
//!   (CONNACK without `session_present`) forgets them all, since nothing will be resent.
//! - [`SERIAL_DEDUP`] (reliable serial, `ack = true`): `(port, device, seq) → hash of the frame
//!   bytes`, the last [`SERIAL_SEQ_WINDOW`] seqs of each device. A frame whose seq is in the
//!   window, recorded, with the same bytes is a resend; a seq above the window's top moves it
//!   up; a seq further back than the window, or a recorded seq with other bytes, is a device
//!   that restarted its count: stored as new (the device's rows start over).

use std::sync::{Arc, Mutex};

use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use super::StoreError;
use crate::ingest::Dedup;

/// Client mode: packet id → (hash of topic and payload, tag of the delivery recorded).
pub const MQTT_DEDUP: TableDefinition<u16, (u64, u64)> = TableDefinition::new("mqtt_dedup");
/// Reliable serial: (port, device, seq) → hash of the frame's bytes.
pub const SERIAL_DEDUP: TableDefinition<(&str, &str, u64), u64> =
    TableDefinition::new("serial_dedup");
/// Embedded broker: (client id, packet id) → hash of topic and payload, for sensors with a
/// persistent session.
pub const BROKER_DEDUP: TableDefinition<(&str, u16), u64> = TableDefinition::new("broker_dedup");
/// The table of earlier versions (entries never expired); dropped at open.
pub(crate) const LEGACY_INGEST_DEDUP: TableDefinition<u16, (u64, u64)> =
    TableDefinition::new("ingest_dedup");

/// How many seqs below the highest one seen a device's resends are recognised.
pub const SERIAL_SEQ_WINDOW: u64 = 1024;

/// Creates the tables (and drops the legacy one: its entries may outlive their PUBACK, and
/// forgetting them costs at most one duplicate per message in flight).
pub fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(MQTT_DEDUP)?;
    txn.open_table(SERIAL_DEDUP)?;
    txn.delete_table(LEGACY_INGEST_DEDUP)?;
    Ok(())
}

/// A client-mode MQTT delivery.
#[derive(Debug, Clone)]
pub struct MqttKey {
    /// The broker's packet id.
    pub pkid: u16,
    /// Hash of topic and payload.
    pub hash: u64,
    /// The broker set DUP: this may be a resend.
    pub dup: bool,
    /// Unique per delivery, the connection's nonce in its high 32 bits; the PUBACK report
    /// names it.
    pub tag: u64,
    /// The first message without DUP on its connection: the broker's resends are behind us.
    pub first_new: bool,
    /// Where the ingest client reports the PUBACKs it wrote.
    pub log: Arc<PubackLog>,
}

/// A reliable-serial frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialKey {
    /// The port's name.
    pub port: String,
    /// The device id from the frame (`""` when a `lines` frame names none).
    pub device: String,
    /// The frame's sequence number.
    pub seq: u64,
    /// Hash of the frame's bytes.
    pub hash: u64,
}

/// A publish a sensor sent to the embedded broker at QoS 1 or 2.
///
/// Only sensors with a persistent session resend after a reconnect, so only theirs are
/// recorded. An entry lives from the commit that took the publish until its PUBACK (QoS 2:
/// PUBREC) is written ([`BrokerAckLog`], applied by the next commit); a publish without DUP
/// replaces the entry of its id; a clean-session connect purges the client's entries (its
/// first publish carries `purge`). A publish with DUP whose (client, packet id) entry has the
/// same hash was committed already and its acknowledgement lost: acknowledged again, not
/// stored twice. Bounded by the publishes in flight.
#[derive(Debug, Clone)]
pub struct BrokerKey {
    /// The sensor's client id.
    pub client: Arc<str>,
    /// Its packet id.
    pub pkid: u16,
    /// Hash of topic and payload.
    pub hash: u64,
    /// The sensor set DUP.
    pub dup: bool,
    /// Record it (a persistent session); otherwise only checked.
    pub record: bool,
    /// First publish of a clean session: the client's entries go first.
    pub purge: bool,
}

/// The embedded broker's PUBACKs (and PUBRECs) written for recorded publishes: (client,
/// packet id, hash). The next commit removes those entries, so an entry lives only between
/// the commit that took a publish and its acknowledgement (MQTT §4.3.2: after it, the id names
/// a new message).
#[derive(Debug, Default)]
pub struct BrokerAckLog {
    written: Mutex<Vec<(Arc<str>, u16, u64)>>,
}

impl BrokerAckLog {
    /// The acknowledgement of this recorded publish was written.
    pub fn written(&self, client: Arc<str>, pkid: u16, hash: u64) {
        self.written.lock().unwrap().push((client, pkid, hash));
    }

    /// Takes the reports for one commit.
    pub fn take(&self) -> Vec<(Arc<str>, u16, u64)> {
        std::mem::take(&mut *self.written.lock().unwrap())
    }

    /// The commit failed: the reports wait for the next one.
    pub fn give_back(&self, mut old: Vec<(Arc<str>, u16, u64)>) {
        let mut w = self.written.lock().unwrap();
        old.append(&mut w);
        *w = old;
    }
}

/// What the ingest client tells the commit loop: PUBACKs written (their entries go) and lost
/// sessions (every entry goes).
#[derive(Debug, Default)]
pub struct PubackLog {
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    written: Vec<(u16, u64)>,
    purge: Purge,
}

/// Entries to drop wholesale.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Purge {
    #[default]
    Nothing,
    /// The session was lost: nothing will be resent.
    All,
}

/// The connection a delivery tag was minted on (its high 32 bits).
pub fn tag_connection(tag: u64) -> u32 {
    (tag >> 32) as u32
}

impl PubackLog {
    /// The PUBACK for the delivery `tag` of `pkid` was written.
    pub fn written(&self, pkid: u16, tag: u64) {
        self.pending.lock().unwrap().written.push((pkid, tag));
    }

    /// The broker has no session for us: it resends nothing, so no entry is needed.
    pub fn session_lost(&self) {
        let mut p = self.pending.lock().unwrap();
        p.written.clear();
        p.purge = Purge::All;
    }

    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap())
    }

    fn give_back(&self, mut old: Pending) {
        let mut p = self.pending.lock().unwrap();
        if p.purge == Purge::All {
            return; // a newer loss covers the old reports
        }
        old.written.append(&mut p.written);
        if p.purge != Purge::Nothing {
            old.purge = p.purge; // the newer one
        }
        *p = old;
    }
}

/// The reports one commit applies: taken at its start, given back unless it commits.
#[derive(Debug, Default)]
pub struct Feedback {
    taken: Vec<(Arc<PubackLog>, Pending)>,
}

impl Feedback {
    /// Takes the reports of every PUBACK log the group's messages name.
    pub fn take<'a>(keys: impl IntoIterator<Item = Option<&'a Dedup>>) -> Feedback {
        let mut taken: Vec<(Arc<PubackLog>, Pending)> = Vec::new();
        for k in keys.into_iter().flatten() {
            if let Dedup::Mqtt(k) = k {
                if !taken.iter().any(|(l, _)| Arc::ptr_eq(l, &k.log)) {
                    taken.push((k.log.clone(), k.log.take()));
                }
            }
        }
        Feedback { taken }
    }

    /// The commit that applied them succeeded.
    pub fn committed(mut self) {
        self.taken.clear();
    }
}

impl Drop for Feedback {
    fn drop(&mut self) {
        for (log, p) in self.taken.drain(..) {
            log.give_back(p);
        }
    }
}

/// The dedupe tables inside one write transaction, opened when first needed.
pub struct Window<'t> {
    txn: &'t WriteTransaction,
    mqtt: Option<Table<'t, u16, (u64, u64)>>,
    broker: Option<Table<'t, (&'static str, u16), u64>>,
    serial: Option<Table<'t, (&'static str, &'static str, u64), u64>>,
}

impl<'t> Window<'t> {
    /// Opens the window and applies `fb` (entries whose PUBACK was written go).
    pub fn open(txn: &'t WriteTransaction, fb: &Feedback) -> Result<Window<'t>, StoreError> {
        let mut w = Window {
            txn,
            mqtt: None,
            broker: None,
            serial: None,
        };
        if !fb.taken.is_empty() {
            let t = w.mqtt()?;
            for (_, p) in &fb.taken {
                match p.purge {
                    Purge::Nothing => {}
                    Purge::All => t.retain(|_, _| false)?,
                }
                forget_acknowledged(t, &p.written)?;
            }
        }
        Ok(w)
    }

    fn mqtt(&mut self) -> Result<&mut Table<'t, u16, (u64, u64)>, StoreError> {
        if self.mqtt.is_none() {
            self.mqtt = Some(self.txn.open_table(MQTT_DEDUP)?);
        }
        Ok(self.mqtt.as_mut().expect("just opened"))
    }

    /// Removes the broker entries whose acknowledgement was written (if still theirs).
    pub fn forget_broker_acks(
        &mut self,
        written: &[(Arc<str>, u16, u64)],
    ) -> Result<(), StoreError> {
        if written.is_empty() {
            return Ok(());
        }
        let t = self.broker()?;
        for (client, pkid, hash) in written {
            let c: &str = client;
            if t.get((c, *pkid))?.is_some_and(|v| v.value() == *hash) {
                t.remove((c, *pkid))?;
            }
        }
        Ok(())
    }

    /// The event `key` came with was refused by the buffer: its entry goes, so its resend is
    /// stored rather than taken for a stored one.
    pub fn unrecord(&mut self, key: Option<&Dedup>) -> Result<(), StoreError> {
        if let Some(Dedup::Broker(k)) = key {
            if k.record {
                let c: &str = &k.client;
                let t = self.broker()?;
                if t.get((c, k.pkid))?.is_some_and(|v| v.value() == k.hash) {
                    t.remove((c, k.pkid))?;
                }
            }
        }
        Ok(())
    }

    fn broker(&mut self) -> Result<&mut Table<'t, (&'static str, u16), u64>, StoreError> {
        if self.broker.is_none() {
            self.broker = Some(self.txn.open_table(BROKER_DEDUP)?);
        }
        Ok(self.broker.as_mut().expect("just opened"))
    }

    /// Whether this message is a resend of one already committed (skip it, acknowledge it);
    /// records it otherwise, in this transaction.
    pub fn seen(&mut self, key: Option<&Dedup>) -> Result<bool, StoreError> {
        match key {
            None => Ok(false),
            Some(Dedup::Mqtt(k)) => Ok(mqtt_seen(self.mqtt()?, k)?),
            Some(Dedup::Broker(k)) => Ok(broker_seen(self.broker()?, k)?),
            Some(Dedup::Serial(k)) => {
                if self.serial.is_none() {
                    self.serial = Some(self.txn.open_table(SERIAL_DEDUP)?);
                }
                let t = self.serial.as_mut().expect("just opened");
                Ok(serial_seen(t, k)? == Verdict::Resend)
            }
        }
    }
}

/// Removes the entries whose PUBACK was written.
pub fn forget_acknowledged(
    t: &mut Table<u16, (u64, u64)>,
    written: &[(u16, u64)],
) -> Result<(), redb::StorageError> {
    for &(pkid, tag) in written {
        let current = t.get(pkid)?.map(|v| v.value().1);
        if current == Some(tag) {
            t.remove(pkid)?;
        }
    }
    Ok(())
}

/// Client mode: a DUP delivery matching the live entry of its packet id is a resend (the entry
/// now names this delivery, whose PUBACK is the one to come); anything else is new and becomes
/// the entry of its id.
pub fn mqtt_seen(t: &mut Table<u16, (u64, u64)>, k: &MqttKey) -> Result<bool, redb::StorageError> {
    if k.first_new {
        // What earlier connections recorded and this one did not resend will not come again
        // (its PUBACK got through, though a crash may have kept us from hearing of it).
        let conn = tag_connection(k.tag);
        t.retain(|_, v| tag_connection(v.1) == conn)?;
    }
    let resend = k.dup && t.get(k.pkid)?.is_some_and(|v| v.value().0 == k.hash);
    t.insert(k.pkid, (k.hash, k.tag))?;
    Ok(resend)
}

/// Embedded broker: a DUP publish matching its (client, packet id) entry is a resend; a
/// recorded client's publish becomes the entry of its id.
pub fn broker_seen(
    t: &mut Table<(&'static str, u16), u64>,
    k: &BrokerKey,
) -> Result<bool, redb::StorageError> {
    let c: &str = &k.client;
    if k.purge {
        t.retain_in((c, 0)..=(c, u16::MAX), |_, _| false)?;
    }
    let resend = k.dup && t.get((c, k.pkid))?.is_some_and(|v| v.value() == k.hash);
    if k.record && !resend {
        t.insert((c, k.pkid), k.hash)?;
    }
    Ok(resend)
}

/// What a serial frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not seen: store it.
    New,
    /// Seen and recorded with the same bytes: skip it, acknowledge it.
    Resend,
    /// Its seq went back beyond the window, or a recorded seq came with other bytes: the device
    /// restarted its count. Stored as new; the device's window starts over here.
    Restarted,
}

/// Reliable serial: classifies a frame by (port, device, seq) and records it.
pub fn serial_seen(
    t: &mut Table<(&'static str, &'static str, u64), u64>,
    k: &SerialKey,
) -> Result<Verdict, redb::StorageError> {
    let (port, dev) = (k.port.as_str(), k.device.as_str());
    let top = t
        .range((port, dev, 0)..=(port, dev, u64::MAX))?
        .next_back()
        .transpose()?
        .map(|(key, _)| key.value().2);
    let verdict = match top {
        None => Verdict::New,
        Some(top) if k.seq > top => {
            // The window moves up: what falls out of it goes.
            let floor = (k.seq + 1).saturating_sub(SERIAL_SEQ_WINDOW);
            if floor > 0 {
                t.retain_in((port, dev, 0)..(port, dev, floor), |_, _| false)?;
            }
            Verdict::New
        }
        Some(top) if top - k.seq < SERIAL_SEQ_WINDOW => match t.get((port, dev, k.seq))? {
            Some(h) if h.value() == k.hash => return Ok(Verdict::Resend),
            Some(_) => Verdict::Restarted,
            None => Verdict::New, // a gap filled: a frame that was lost on the line
        },
        Some(_) => Verdict::Restarted,
    };
    if verdict == Verdict::Restarted {
        t.retain_in((port, dev, 0)..=(port, dev, u64::MAX), |_, _| false)?;
    }
    t.insert((port, dev, k.seq), k.hash)?;
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadableTableMetadata};

    fn db() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        (dir, db)
    }

    fn sk(device: &str, seq: u64, hash: u64) -> SerialKey {
        SerialKey {
            port: "uart0".into(),
            device: device.into(),
            seq,
            hash,
        }
    }

    /// Runs `f` on the serial table in one committed transaction.
    fn serial<R>(db: &Database, f: impl FnOnce(&mut Table<(&str, &str, u64), u64>) -> R) -> R {
        let txn = db.begin_write().unwrap();
        let r = {
            let mut t = txn.open_table(SERIAL_DEDUP).unwrap();
            f(&mut t)
        };
        txn.commit().unwrap();
        r
    }

    fn mqtt<R>(db: &Database, f: impl FnOnce(&mut Table<u16, (u64, u64)>) -> R) -> R {
        let txn = db.begin_write().unwrap();
        let r = {
            let mut t = txn.open_table(MQTT_DEDUP).unwrap();
            f(&mut t)
        };
        txn.commit().unwrap();
        r
    }

    #[test]
    fn serial_resend_within_the_window_is_recognised_across_commits() {
        let (_d, db) = db();
        let v = |k: SerialKey| serial(&db, |t| serial_seen(t, &k).unwrap());
        assert_eq!(v(sk("d1", 10, 1)), Verdict::New);
        assert_eq!(v(sk("d1", 11, 2)), Verdict::New);
        assert_eq!(v(sk("d1", 10, 1)), Verdict::Resend);
        assert_eq!(v(sk("d1", 11, 2)), Verdict::Resend);
        // Another device, or another port, with the same seq is its own stream.
        assert_eq!(v(sk("d2", 10, 1)), Verdict::New);
        let other_port = SerialKey {
            port: "uart1".into(),
            ..sk("d1", 10, 1)
        };
        assert_eq!(v(other_port), Verdict::New);
        // A gap filled later (a frame lost on the line, resent) is new.
        assert_eq!(v(sk("d1", 15, 3)), Verdict::New);
        assert_eq!(v(sk("d1", 13, 4)), Verdict::New);
        assert_eq!(v(sk("d1", 13, 4)), Verdict::Resend);
    }

    #[test]
    fn serial_window_slides_and_stays_bounded() {
        let (_d, db) = db();
        serial(&db, |t| {
            for seq in 0..3 * SERIAL_SEQ_WINDOW {
                assert_eq!(serial_seen(t, &sk("d", seq, seq)).unwrap(), Verdict::New);
            }
            assert_eq!(
                t.len().unwrap(),
                SERIAL_SEQ_WINDOW,
                "only the window is kept"
            );
            let top = 3 * SERIAL_SEQ_WINDOW - 1;
            // The oldest seq still in the window is recognised...
            let oldest = top + 1 - SERIAL_SEQ_WINDOW;
            assert_eq!(
                serial_seen(t, &sk("d", oldest, oldest)).unwrap(),
                Verdict::Resend
            );
        });
    }

    #[test]
    fn serial_seq_back_beyond_the_window_is_a_restarted_device() {
        let (_d, db) = db();
        serial(&db, |t| {
            for seq in 0..2 * SERIAL_SEQ_WINDOW {
                serial_seen(t, &sk("d", seq, 7)).unwrap();
            }
            // Rebooted: counts from 0 again, same bytes as its first life's frame 0 even.
            assert_eq!(serial_seen(t, &sk("d", 0, 7)).unwrap(), Verdict::Restarted);
            assert_eq!(t.len().unwrap(), 1, "its window starts over");
            assert_eq!(serial_seen(t, &sk("d", 1, 7)).unwrap(), Verdict::New);
            assert_eq!(serial_seen(t, &sk("d", 0, 7)).unwrap(), Verdict::Resend);
            // A u32 seq that wraps is the same case.
            serial_seen(t, &sk("w", u64::from(u32::MAX), 1)).unwrap();
            assert_eq!(serial_seen(t, &sk("w", 0, 2)).unwrap(), Verdict::Restarted);
        });
    }

    #[test]
    fn serial_recorded_seq_with_other_bytes_is_not_a_resend() {
        let (_d, db) = db();
        serial(&db, |t| {
            for seq in 0..50 {
                serial_seen(t, &sk("d", seq, 100 + seq)).unwrap();
            }
            // Rebooted early (seq back within the window) but sending other content: new.
            assert_eq!(
                serial_seen(t, &sk("d", 3, 999)).unwrap(),
                Verdict::Restarted
            );
            assert_eq!(serial_seen(t, &sk("d", 4, 998)).unwrap(), Verdict::New);
            assert_eq!(serial_seen(t, &sk("d", 4, 998)).unwrap(), Verdict::Resend);
        });
    }

    fn mk(pkid: u16, hash: u64, dup: bool, tag: u64, log: &Arc<PubackLog>) -> MqttKey {
        MqttKey {
            pkid,
            hash,
            dup,
            tag,
            first_new: false,
            log: log.clone(),
        }
    }

    #[test]
    fn mqtt_dup_matching_a_live_entry_is_a_resend() {
        let (_d, db) = db();
        let log = Arc::new(PubackLog::default());
        assert!(!mqtt(&db, |t| mqtt_seen(t, &mk(5, 42, false, 1, &log)).unwrap()));
        // Committed, PUBACK not written (crash, or a reconnect dropped it): the resend is skipped.
        assert!(mqtt(&db, |t| mqtt_seen(t, &mk(5, 42, true, 2, &log)).unwrap()));
        // DUP with another content under that id is another message.
        assert!(!mqtt(&db, |t| mqtt_seen(t, &mk(5, 43, true, 3, &log)).unwrap()));
        // Without DUP it is new whatever the table says.
        assert!(!mqtt(&db, |t| mqtt_seen(t, &mk(5, 43, false, 4, &log)).unwrap()));
    }

    #[test]
    fn mqtt_entry_goes_once_its_puback_is_written() {
        let (_d, db) = db();
        let log = Arc::new(PubackLog::default());
        let door = 0xd00d;
        mqtt(&db, |t| mqtt_seen(t, &mk(5, door, false, 1, &log)).unwrap());
        log.written(5, 1);
        // The next commit applies the report.
        let txn = db.begin_write().unwrap();
        {
            let fb = Feedback::take([Some(&Dedup::Mqtt(mk(9, 0, false, 9, &log)))]);
            let mut w = Window::open(&txn, &fb).unwrap();
            assert!(w.mqtt().unwrap().get(5).unwrap().is_none(), "entry gone");
            fb.committed();
        }
        txn.commit().unwrap();
        // A new message with the same id and the same payload, seen with DUP (delivered once,
        // not committed, redelivered after a crash): stored, not discarded.
        assert!(!mqtt(&db, |t| mqtt_seen(t, &mk(5, door, true, 2, &log)).unwrap()));
    }

    #[test]
    fn mqtt_report_of_an_older_delivery_keeps_the_newer_entry() {
        let (_d, db) = db();
        let log = Arc::new(PubackLog::default());
        mqtt(&db, |t| {
            mqtt_seen(t, &mk(5, 1, false, 10, &log)).unwrap();
            // Resent on the next connection: the entry now names the resend.
            assert!(mqtt_seen(t, &mk(5, 1, true, 11, &log)).unwrap());
            // The first delivery's PUBACK (written before the reconnect) is reported late.
            forget_acknowledged(t, &[(5, 10)]).unwrap();
            assert_eq!(t.get(5).unwrap().map(|v| v.value()), Some((1, 11)));
            forget_acknowledged(t, &[(5, 11)]).unwrap();
            assert!(t.get(5).unwrap().is_none());
        });
    }

    #[test]
    fn mqtt_non_dup_supersedes_and_a_lost_session_forgets_everything() {
        let (_d, db) = db();
        let log = Arc::new(PubackLog::default());
        mqtt(&db, |t| {
            mqtt_seen(t, &mk(5, 1, false, 1, &log)).unwrap();
            mqtt_seen(t, &mk(6, 1, false, 2, &log)).unwrap();
            // The broker reused 5 without DUP: its PUBACK got through, the old entry is stale.
            assert!(!mqtt_seen(t, &mk(5, 2, false, 3, &log)).unwrap());
            assert_eq!(t.get(5).unwrap().map(|v| v.value()), Some((2, 3)));
        });
        log.written(6, 2);
        log.session_lost();
        let txn = db.begin_write().unwrap();
        {
            let fb = Feedback::take([Some(&Dedup::Mqtt(mk(1, 0, false, 0, &log)))]);
            let mut w = Window::open(&txn, &fb).unwrap();
            assert_eq!(w.mqtt().unwrap().len().unwrap(), 0);
            fb.committed();
        }
        txn.commit().unwrap();
    }

    #[test]
    fn mqtt_entries_of_earlier_connections_go_once_new_messages_flow() {
        let (_d, db) = db();
        let log = Arc::new(PubackLog::default());
        let (old, new) = (7u64 << 32, 8u64 << 32);
        mqtt(&db, |t| {
            mqtt_seen(t, &mk(5, 1, false, old | 1, &log)).unwrap(); // resent below
            mqtt_seen(t, &mk(6, 1, false, old | 2, &log)).unwrap(); // PUBACK got through; we crashed
            assert!(mqtt_seen(t, &mk(5, 1, true, new | 1, &log)).unwrap());
            let first = MqttKey {
                first_new: true,
                ..mk(9, 1, false, new | 2, &log)
            };
            assert!(!mqtt_seen(t, &first).unwrap());
            assert!(t.get(6).unwrap().is_none(), "stale entry gone");
            assert_eq!(t.get(5).unwrap().map(|v| v.value()), Some((1, new | 1)));
            // So the next message reusing 6 with DUP, same content, is stored.
            assert!(!mqtt_seen(t, &mk(6, 1, true, new | 3, &log)).unwrap());
        });
    }

    #[test]
    fn reports_survive_a_failed_commit() {
        let log = Arc::new(PubackLog::default());
        log.written(5, 1);
        let key = Dedup::Mqtt(mk(1, 0, false, 0, &log));
        drop(Feedback::take([Some(&key)])); // the commit failed: given back
        log.written(6, 2);
        let fb = Feedback::take([Some(&key), Some(&key)]);
        assert_eq!(fb.taken.len(), 1, "one log, taken once");
        assert_eq!(fb.taken[0].1.written, vec![(5, 1), (6, 2)]);
        fb.committed();
        assert!(log.take().written.is_empty());
    }
}

#[cfg(test)]
mod broker_tests {
    use super::*;

    fn key(client: &str, pkid: u16, hash: u64, dup: bool, record: bool, purge: bool) -> BrokerKey {
        BrokerKey {
            client: client.into(),
            pkid,
            hash,
            dup,
            record,
            purge,
        }
    }

    /// Runs one key through `broker_seen` in its own committed transaction.
    fn seen(db: &redb::Database, k: BrokerKey) -> bool {
        let txn = db.begin_write().unwrap();
        let r = {
            let mut t = txn.open_table(BROKER_DEDUP).unwrap();
            broker_seen(&mut t, &k).unwrap()
        };
        txn.commit().unwrap();
        r
    }

    #[test]
    fn a_persistent_sensors_resend_is_recognised_and_a_reused_id_is_new() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        assert!(!seen(&db, key("s1", 1, 10, false, true, false)));
        assert!(
            seen(&db, key("s1", 1, 10, true, true, false)),
            "DUP, same id and hash"
        );
        assert!(
            !seen(&db, key("s2", 1, 10, true, true, false)),
            "another client"
        );
        assert!(
            !seen(&db, key("s1", 1, 11, true, true, false)),
            "other content"
        );
        // The id reused for a new message (no DUP) replaces the entry.
        assert!(!seen(&db, key("s1", 1, 12, false, true, false)));
        assert!(!seen(&db, key("s1", 1, 11, true, true, false)));
        assert!(seen(&db, key("s1", 1, 11, true, true, false)));
    }

    #[test]
    fn clean_sessions_record_nothing_and_purge_what_was_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        assert!(!seen(&db, key("s1", 1, 10, false, true, false)));
        assert!(!seen(&db, key("s1", 2, 20, false, true, false)));
        assert!(!seen(&db, key("s2", 2, 20, false, true, false)));
        // s1 comes back with a clean session: its entries go.
        assert!(!seen(&db, key("s1", 9, 90, false, false, true)));
        assert!(!seen(&db, key("s1", 1, 10, true, false, false)));
        assert!(
            !seen(&db, key("s1", 9, 90, true, false, false)),
            "not recorded"
        );
        assert!(seen(&db, key("s2", 2, 20, true, true, false)), "s2 kept");
    }
}
