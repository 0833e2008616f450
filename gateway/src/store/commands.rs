//! `commands`: commands from the cloud, kept from before their PUBACK until their result is
//! acknowledged upstream, then remembered a while to recognise a redelivery.
//!
//! `command id → postcard` [`CommandRow`]. A row goes through three states, each one commit
//! of the commit loop (`Durability::Immediate`), asked for by the commands task:
//! - `Pending`: stored before the PUBACK to the broker, so a crash after the PUBACK never loses
//!   the command; delivered (again) after a restart.
//! - `Resolved(result)`: delivered, failed, expired or refused; the result JSON is published
//!   (again, after a restart) until the broker acknowledges it.
//! - `Done(at)`: the result is acknowledged. The row stays for [`CommandOp::Finish`]'s `keep`
//!   (the broker resends a command whose PUBACK a crash lost: it is recognised by its id and
//!   acknowledged, not delivered twice), then goes; at most [`MAX_DONE`] are kept.

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::StoreError;

/// The table.
pub const COMMANDS: TableDefinition<&str, &[u8]> = TableDefinition::new("commands");

/// Most `Done` rows kept for recognising redeliveries (the oldest go first).
pub const MAX_DONE: usize = 10_000;

/// One command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRow {
    /// When the gateway stored it (ms, its own clock).
    pub received_ms: i64,
    /// When the cloud issued it (its `ts`), if it said.
    pub ts: Option<i64>,
    /// Where it goes: a local topic or `serial/NAME`.
    pub target: String,
    /// What it carries, as the cloud sent it (JSON).
    pub payload: Vec<u8>,
    /// Hash of the topic and the message it came in: a resend has the same, another command
    /// that reuses the id does not.
    pub hash: u64,
    /// How far it got.
    pub state: CommandState,
}

/// How far a command got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandState {
    /// Stored; not yet delivered.
    Pending,
    /// Its result (JSON), not yet acknowledged by the upstream broker.
    Resolved(Vec<u8>),
    /// Its result was acknowledged at this time (ms).
    Done(i64),
}

/// A write the commands task asks of the commit loop.
#[derive(Debug, Clone)]
pub enum CommandOp {
    /// Store a new command (before its PUBACK); a known id is left as it is.
    Stash {
        /// The command's id.
        id: String,
        /// The command.
        row: CommandRow,
    },
    /// The command is delivered (or failed): keep its result until it is acknowledged.
    Resolve {
        /// The command's id.
        id: String,
        /// The result JSON.
        result: Vec<u8>,
    },
    /// The result is acknowledged upstream; with `purge`, forget `Done` rows older than
    /// `keep_ms` (and the oldest past [`MAX_DONE`]).
    Finish {
        /// The command's id.
        id: String,
        /// Now (ms).
        now_ms: i64,
        /// How long a `Done` row is remembered.
        keep_ms: i64,
        /// Look through the table for rows to forget (a scan: the commands task asks at most
        /// once a minute).
        purge: bool,
    },
}

/// What a [`CommandOp`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Stored (or updated).
    Written,
    /// `Stash` of an id already stored: in this state, with this hash.
    Known(CommandState, u64),
}

/// Decodes a row.
pub fn decode(bytes: &[u8]) -> Result<CommandRow, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Row("command", e))
}

/// Applies `op` in `txn`.
pub fn apply(txn: &WriteTransaction, op: &CommandOp) -> Result<Applied, StoreError> {
    let mut t = txn.open_table(COMMANDS)?;
    match op {
        CommandOp::Stash { id, row } => {
            let known = t.get(id.as_str())?.map(|v| decode(v.value()));
            // A row that cannot be read (a damaged page) is written over, not refused forever.
            if let Some(Ok(k)) = known {
                return Ok(Applied::Known(k.state, k.hash));
            }
            let bytes = postcard::to_stdvec(row).expect("a command row encodes");
            t.insert(id.as_str(), bytes.as_slice())?;
        }
        CommandOp::Resolve { id, result } => {
            let row = t.get(id.as_str())?.and_then(|v| decode(v.value()).ok());
            if let Some(mut row) = row {
                if row.state == CommandState::Pending {
                    row.state = CommandState::Resolved(result.clone());
                    let bytes = postcard::to_stdvec(&row).expect("a command row encodes");
                    t.insert(id.as_str(), bytes.as_slice())?;
                }
            }
        }
        CommandOp::Finish {
            id,
            now_ms,
            keep_ms,
            purge,
        } => {
            let row = t.get(id.as_str())?.map(|v| decode(v.value()));
            if let Some(Err(_)) = row {
                t.remove(id.as_str())?;
            }
            if let Some(Ok(mut row)) = row {
                // The payload is not needed to recognise a resend.
                row.payload.clear();
                row.state = CommandState::Done(*now_ms);
                let bytes = postcard::to_stdvec(&row).expect("a command row encodes");
                t.insert(id.as_str(), bytes.as_slice())?;
            }
            if !purge {
                return Ok(Applied::Written);
            }
            let mut done: Vec<(i64, String)> = Vec::new();
            for r in t.iter()? {
                let (k, v) = r?;
                if let Ok(CommandRow {
                    state: CommandState::Done(at),
                    ..
                }) = decode(v.value())
                {
                    done.push((at, k.value().to_string()));
                }
            }
            done.sort();
            let over = done.len().saturating_sub(MAX_DONE);
            for (i, (at, k)) in done.iter().enumerate() {
                if i < over || *at < now_ms - keep_ms {
                    t.remove(k.as_str())?;
                }
            }
        }
    }
    Ok(Applied::Written)
}

/// The commands not yet done (to deliver, or whose result to publish), oldest first.
pub fn unfinished<D: ReadableDatabase>(db: &D) -> Result<Vec<(String, CommandRow)>, StoreError> {
    let txn = db.begin_read()?;
    let t = match txn.open_table(COMMANDS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for r in t.iter()? {
        let (k, v) = r?;
        match decode(v.value()) {
            Ok(row) if !matches!(row.state, CommandState::Done(_)) => {
                out.push((k.value().to_string(), row))
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(id = k.value(), error = %e, "a stored command cannot be read; skipped")
            }
        }
    }
    out.sort_by_key(|(_, r)| r.received_ms);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, redb::Database) {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("c.redb")).unwrap();
        (dir, db)
    }

    fn op(db: &redb::Database, op: CommandOp) -> Applied {
        let txn = db.begin_write().unwrap();
        let a = apply(&txn, &op).unwrap();
        txn.commit().unwrap();
        a
    }

    fn row(at: i64) -> CommandRow {
        CommandRow {
            received_ms: at,
            ts: None,
            target: "actuators/valve".into(),
            payload: b"\"OPEN\"".to_vec(),
            hash: 7,
            state: CommandState::Pending,
        }
    }

    #[test]
    fn a_command_goes_pending_resolved_done_and_a_resend_is_known() {
        let (_d, db) = db();
        assert!(unfinished(&db).unwrap().is_empty(), "no table yet: nothing");
        let stash = |at| CommandOp::Stash {
            id: "c1".into(),
            row: row(at),
        };
        assert_eq!(op(&db, stash(1)), Applied::Written);
        assert_eq!(op(&db, stash(2)), Applied::Known(CommandState::Pending, 7));
        assert_eq!(unfinished(&db).unwrap()[0].1.received_ms, 1);
        op(
            &db,
            CommandOp::Resolve {
                id: "c1".into(),
                result: b"{}".to_vec(),
            },
        );
        assert_eq!(
            unfinished(&db).unwrap()[0].1.state,
            CommandState::Resolved(b"{}".to_vec())
        );
        op(
            &db,
            CommandOp::Finish {
                id: "c1".into(),
                now_ms: 100,
                keep_ms: 50,
                purge: true,
            },
        );
        assert!(unfinished(&db).unwrap().is_empty());
        assert_eq!(
            op(&db, stash(3)),
            Applied::Known(CommandState::Done(100), 7)
        );
        // A later finish forgets it once `keep` has passed.
        op(
            &db,
            CommandOp::Stash {
                id: "c2".into(),
                row: row(4),
            },
        );
        op(
            &db,
            CommandOp::Finish {
                id: "c2".into(),
                now_ms: 200,
                keep_ms: 50,
                purge: true,
            },
        );
        assert_eq!(op(&db, stash(5)), Applied::Written, "c1 was forgotten");
    }
}
