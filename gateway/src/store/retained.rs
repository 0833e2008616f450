//! Retained messages of the embedded broker: `retained`, `&str topic → postcard row`.
//!
//! The broker keeps them in memory and notes each change in a [`RetainedLog`]; the commit
//! loop writes the changes noted since the last commit in its next transaction (a commit is
//! made for them within a second when nothing else is being written). A power cut in that
//! second can lose the latest change of a retained topic, never one written before it. Loaded
//! at start-up; rows whose message expiry has passed are skipped.

use std::collections::BTreeMap;
use std::sync::Mutex;

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::StoreError;

/// Topic → [`RetainedRow`] (postcard).
pub const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");

/// One retained message as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetainedRow {
    /// The payload.
    pub payload: Vec<u8>,
    /// Its QoS (0 or 1).
    pub qos: u8,
    /// When it expires (wall-clock ms), from MQTT 5 Message Expiry.
    pub expires_at: Option<i64>,
    /// MQTT 5 user properties.
    pub user: Vec<(String, String)>,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
    /// MQTT 5 payload format indicator.
    pub payload_format: Option<u8>,
    /// MQTT 5 response topic.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data.
    pub correlation_data: Option<Vec<u8>>,
}

/// Changes to retained topics not yet written: topic → new row, or `None` (cleared).
#[derive(Debug, Default)]
pub struct RetainedLog {
    pending: Mutex<BTreeMap<String, Option<RetainedRow>>>,
}

impl RetainedLog {
    /// `topic` now retains `row` (`None`: nothing).
    pub fn note(&self, topic: &str, row: Option<RetainedRow>) {
        self.pending.lock().unwrap().insert(topic.to_string(), row);
    }

    /// Whether changes wait to be written.
    pub fn has_pending(&self) -> bool {
        !self.pending.lock().unwrap().is_empty()
    }

    /// Takes the changes for one commit.
    pub fn take(&self) -> BTreeMap<String, Option<RetainedRow>> {
        std::mem::take(&mut *self.pending.lock().unwrap())
    }

    /// The commit failed: its changes wait again, under any newer change of the same topic.
    pub fn give_back(&self, old: BTreeMap<String, Option<RetainedRow>>) {
        let mut p = self.pending.lock().unwrap();
        for (topic, row) in old {
            p.entry(topic).or_insert(row);
        }
    }
}

/// Writes taken changes in `txn`.
pub fn write(
    txn: &WriteTransaction,
    changes: &BTreeMap<String, Option<RetainedRow>>,
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut t = txn.open_table(RETAINED)?;
    for (topic, row) in changes {
        match row {
            Some(r) => {
                let bytes = postcard::to_allocvec(r).expect("a retained row always encodes");
                t.insert(topic.as_str(), bytes.as_slice())?;
            }
            None => {
                t.remove(topic.as_str())?;
            }
        }
    }
    Ok(())
}

/// The retained messages stored, skipping those expired by `now_ms` and rows that do not
/// decode (counted in the second value).
pub fn load<D: ReadableDatabase>(
    db: &D,
    now_ms: i64,
) -> Result<(Vec<(String, RetainedRow)>, u64), StoreError> {
    let txn = db.begin_read()?;
    let t = match txn.open_table(RETAINED) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    let mut bad = 0;
    for row in t.iter()? {
        let (k, v) = row?;
        match postcard::from_bytes::<RetainedRow>(v.value()) {
            Ok(r) if r.expires_at.is_none_or(|at| at > now_ms) => {
                out.push((k.value().to_string(), r))
            }
            Ok(_) => {}
            Err(_) => bad += 1,
        }
    }
    Ok((out, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(p: &str, expires_at: Option<i64>) -> RetainedRow {
        RetainedRow {
            payload: p.as_bytes().to_vec(),
            qos: 1,
            expires_at,
            user: vec![("k".into(), "v".into())],
            content_type: None,
            payload_format: None,
            response_topic: None,
            correlation_data: None,
        }
    }

    #[test]
    fn changes_are_written_cleared_and_loaded_without_the_expired() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        assert!(load(&db, 0).unwrap().0.is_empty(), "no table yet");
        let log = RetainedLog::default();
        log.note("a", Some(row("1", None)));
        log.note("b", Some(row("2", Some(1_000))));
        log.note("c", Some(row("3", None)));
        let txn = db.begin_write().unwrap();
        write(&txn, &log.take()).unwrap();
        txn.commit().unwrap();
        assert!(!log.has_pending());
        log.note("c", None);
        let txn = db.begin_write().unwrap();
        write(&txn, &log.take()).unwrap();
        txn.commit().unwrap();
        let (got, bad) = load(&db, 2_000).unwrap();
        assert_eq!(bad, 0);
        assert_eq!(got, vec![("a".to_string(), row("1", None))]);
        assert_eq!(load(&db, 500).unwrap().0.len(), 2, "b not yet expired");
    }

    #[test]
    fn a_failed_commit_gives_changes_back_under_newer_ones() {
        let log = RetainedLog::default();
        log.note("a", Some(row("old", None)));
        let taken = log.take();
        log.note("a", None);
        log.give_back(taken);
        assert_eq!(log.take().get("a"), Some(&None), "the newer change wins");
    }
}
