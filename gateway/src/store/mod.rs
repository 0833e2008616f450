//! The durable buffer: one redb file, one writer thread.
//!
//! # Design
//!
//! **File.** `DATA_DIR/tidepool.redb`, opened by one process at a time (redb locks it), with an
//! explicit page cache (`[buffer] cache_size`).
//!
//! **Tables.**
//! - `events`: `u64 id → bytes`. The value is the postcard encoding of [`StoredEvent`]
//!   (ts, source, topic, payload). Ids rise; the table is a FIFO: the forwarder reads from the
//!   low end, commits append at the high end.
//! - `meta`: `&str → u64`. `next_id` (the id the next event gets; never goes back, so ids
//!   survive restarts and are never reused), `stored_bytes` (the sum of stored sizes of rows in
//!   `events`, what `max_bytes` caps), `next_batch` (upstream batch number), and the drop
//!   counters `dropped.REASON`, so `tidepool status` can show them with the daemon stopped.
//! - `ingest_dedup`: `u16 packet id → (payload hash, event id)`, client mode only. When a
//!   broker redelivers a message (DUP set, same packet id) whose hash matches, the event was
//!   committed before the gateway could acknowledge it: it is acknowledged and not stored
//!   again, so a crash between commit and PUBACK does not mint a second id. Bounded by the
//!   packet id space (65,536 rows).
//! - `dead_letters`: `u64 → JSON`, inputs a rule failed on, with the rule, error and time (and
//!   events the upstream broker cannot take for their size: rule `upstream`, moved out of
//!   `events` in a commit of their own);
//!   ids from `meta.next_dlq_id`. Rows go by `tidepool dlq retry|drop`.
//! - `rule_state`: `(rule, key) → JSON`, what rules keep with `state_set`; a key goes by
//!   `state_del`.
//!
//! **One commit** (one `Durability::Immediate` write transaction, one fsync) holds, in order:
//! the deletion of every event the upstream broker acknowledged since the last commit; a group
//! of ingested events (up to `commit_max_events`, gathered for at most `commit_max_wait` after
//! the first) run through the rule stage, given ids and appended (and, when due, what
//! `on_tick` returned); the dead letters and rule-state writes of those steps; the buffer caps
//! applied; `meta` updated. Only after the commit returns are ingest acknowledgements sent
//! (client-mode PUBACKs, serial acks), rule publishes sent, and the forwarder woken. So a
//! crash never loses a rule's state write while keeping its outputs, or the reverse.
//!
//! **When rows go.** A row leaves `events` only (a) after its batch's PUBACK from upstream,
//! (b) when `max_bytes` is reached under `drop_oldest` (oldest first), (c) when older than
//! `max_age`. (b) and (c) are counted in `tidepool_events_dropped_total` and in `meta`; or
//! (d) when the forwarder finds it too large for upstream, into `dead_letters`.
//!
//! **Readers.** The forwarder and `status` read through redb read transactions, which never
//! block the writer.

pub mod commit;

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::event::{Event, Payload};

pub use commit::{CommitLoop, ForwardAck, ForwardMsg, Incoming};

/// Buffered events, by id.
pub const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// Counters and cursors.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Client-mode redelivery detection.
pub const INGEST_DEDUP: TableDefinition<u16, (u64, u64)> = TableDefinition::new("ingest_dedup");
/// Inputs a rule failed on: JSON of `rules::DeadLetter`.
pub const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// Per-rule state: (rule, key) → JSON value.
pub const RULE_STATE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("rule_state");

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened or created.
    #[error("cannot open the store {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        source: redb::DatabaseError,
    },
    /// The data dir could not be created.
    #[error("cannot create the data dir {path}: {source}")]
    DataDir {
        /// The folder.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A transaction failed.
    #[error("store transaction failed: {0}")]
    Transaction(#[from] redb::TransactionError),
    /// A table could not be opened.
    #[error("store table error: {0}")]
    Table(#[from] redb::TableError),
    /// Reading or writing a row failed.
    #[error("store I/O error: {0}")]
    Storage(#[from] redb::StorageError),
    /// The commit failed (disk full, I/O error).
    #[error("store commit failed: {0}")]
    Commit(#[from] redb::CommitError),
    /// A stored row could not be decoded.
    #[error("corrupt row {id}: {source}")]
    Decode {
        /// The event id.
        id: u64,
        /// Why.
        source: postcard::Error,
    },
}

/// An event as stored: everything but the id, which is the key.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredEvent {
    /// ms since the epoch.
    pub ts: i64,
    /// Where it came from.
    pub source: String,
    /// Topic.
    pub topic: String,
    /// Content.
    pub payload: Payload,
}

/// Encodes an event's row value.
pub fn encode(e: &Event) -> Vec<u8> {
    #[derive(Serialize)]
    struct Ref<'a> {
        ts: i64,
        source: &'a str,
        topic: &'a str,
        payload: &'a Payload,
    }
    postcard::to_stdvec(&Ref {
        ts: e.ts,
        source: &e.source,
        topic: &e.topic,
        payload: &e.payload,
    })
    .expect("encoding to a Vec cannot fail")
}

/// Decodes a row back into an event.
pub fn decode(id: u64, bytes: &[u8]) -> Result<Event, StoreError> {
    let s: StoredEvent =
        postcard::from_bytes(bytes).map_err(|source| StoreError::Decode { id, source })?;
    Ok(Event {
        id,
        ts: s.ts,
        source: s.source,
        topic: s.topic,
        payload: s.payload,
    })
}

/// Stored size of one row: what `max_bytes` counts.
pub fn row_size(value_len: usize) -> u64 {
    value_len as u64 + 8
}

/// Opens (creating if needed) the store in `data_dir` with the given page cache.
pub fn open(path: &Path, cache_size: u64) -> Result<Arc<Database>, StoreError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let db = Database::builder()
        .set_cache_size(cache_size as usize)
        .create(path)
        .map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
    // Create every table up front so readers never see a missing one.
    let txn = db.begin_write()?;
    {
        txn.open_table(EVENTS)?;
        txn.open_table(META)?;
        txn.open_table(INGEST_DEDUP)?;
        txn.open_table(DEAD_LETTERS)?;
        txn.open_table(RULE_STATE)?;
    }
    txn.commit()?;
    Ok(Arc::new(db))
}

/// A snapshot of what the store holds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreStats {
    /// Buffered events.
    pub backlog_events: u64,
    /// Their stored size.
    pub backlog_bytes: u64,
    /// ts of the oldest, if any.
    pub oldest_ts: Option<i64>,
    /// Lowest buffered id, if any.
    pub first_id: Option<u64>,
    /// The id the next event will get.
    pub next_id: u64,
    /// Dead letters.
    pub dlq_events: u64,
    /// Persisted drop counters, by reason label.
    pub dropped: Vec<(String, u64)>,
}

/// Reads a snapshot of the store's contents.
pub fn stats<D: ReadableDatabase>(db: &D) -> Result<StoreStats, StoreError> {
    let txn = db.begin_read()?;
    let events = txn.open_table(EVENTS)?;
    let meta = txn.open_table(META)?;
    let dlq = txn.open_table(DEAD_LETTERS)?;
    let get =
        |k: &str| -> Result<u64, StoreError> { Ok(meta.get(k)?.map(|v| v.value()).unwrap_or(0)) };
    let (first_id, oldest_ts) = match events.first()? {
        Some((k, v)) => {
            let id = k.value();
            (Some(id), Some(decode(id, v.value())?.ts))
        }
        None => (None, None),
    };
    let mut dropped = Vec::new();
    for r in crate::admin::metrics::DropReason::ALL {
        dropped.push((
            r.label().to_string(),
            get(&format!("dropped.{}", r.label()))?,
        ));
    }
    Ok(StoreStats {
        backlog_events: events.len()?,
        backlog_bytes: get("stored_bytes")?,
        oldest_ts,
        first_id,
        next_id: get("next_id")?.max(1),
        dlq_events: dlq.len()?,
        dropped,
    })
}

/// Reads up to `max_events` events with id > `after`, stopping before `max_bytes` of row
/// values would be exceeded (always at least one event).
pub fn read_after(
    db: &Database,
    after: u64,
    max_events: usize,
    max_bytes: u64,
) -> Result<Vec<Event>, StoreError> {
    let txn = db.begin_read()?;
    let events = txn.open_table(EVENTS)?;
    let mut out = Vec::new();
    let mut bytes = 0u64;
    for row in events.range(after.saturating_add(1)..)? {
        let (k, v) = row?;
        let len = v.value().len() as u64;
        if !out.is_empty() && bytes + len > max_bytes {
            break;
        }
        bytes += len;
        out.push(decode(k.value(), v.value())?);
        if out.len() >= max_events {
            break;
        }
    }
    Ok(out)
}

/// Dead letters, oldest first: all, or those with the given ids.
pub fn dlq_list<D: ReadableDatabase>(
    db: &D,
    ids: Option<&[u64]>,
) -> Result<Vec<(u64, crate::rules::DeadLetter)>, StoreError> {
    let txn = db.begin_read()?;
    let t = txn.open_table(DEAD_LETTERS)?;
    let mut out = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        if ids.is_some_and(|ids| !ids.contains(&k.value())) {
            continue;
        }
        if let Ok(d) = serde_json::from_slice(v.value()) {
            out.push((k.value(), d));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
