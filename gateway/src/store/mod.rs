//! The durable buffer: one redb file, one writer thread.
//!
//! # Design
//!
//! **File.** `DATA_DIR/tidepool.redb`, opened by one process at a time (redb locks it), with an
//! explicit page cache (`[buffer] cache_size`).
//!
//! **Tables.**
//! - `events`: `u64 id → bytes`. The value is the postcard encoding of [`StoredEvent`]
//!   (ts, source, topic, payload), then the trace id (8 bytes, little-endian; absent in rows
//!   written before trace ids). Ids rise; the table is a FIFO: the forwarder reads from the
//!   low end, commits append at the high end.
//! - `meta`: `&str → u64`. `next_id` (the id the next event gets; never goes back, so ids
//!   survive restarts and are never reused), `stored_bytes` (the sum of stored sizes of rows in
//!   `events`, what `max_bytes` caps), `next_batch` (upstream batch number), and the drop
//!   counters `dropped.REASON`, so `tidepool status` can show them with the daemon stopped.
//! - `mqtt_dedup` and `serial_dedup` (`dedup.rs`): redelivery detection. When in doubt they
//!   store: a duplicate carries its own id upstream, a loss is silent. Written only in the
//!   commit that stores the events they describe.
//!   - `mqtt_dedup`: `u16 packet id → (hash of topic + payload, delivery tag)`, client mode.
//!     A message that comes with DUP, the packet id and the hash of the entry is the broker
//!     resending a message we committed but whose PUBACK it did not get: acknowledged, not
//!     stored again. An entry is valid only until its PUBACK is written (MQTT 3.1.1 §4.3.2:
//!     after that the id names a new message): the ingest client reports each PUBACK it
//!     wrote, and the next commit removes that entry (if it still names that delivery); a
//!     message without DUP replaces the entry of its id; the first message without DUP on a
//!     connection (the broker's resends are behind it) drops the entries of earlier
//!     connections not resent on this one (their PUBACK got through, though a crash may have
//!     kept us from hearing of it); a CONNACK without `session_present` empties the table.
//!     One entry written per message, removed in a later commit. Remaining window: a PUBACK written, then a crash (`kill -9`, power)
//!     before the next commit; if the broker reused that packet id in between for a message
//!     with byte-identical topic and payload, sent it to us, and we had not committed it,
//!     its resend after the restart is taken for the old one (lost). That needs the broker to
//!     reuse the id within one commit (~`commit_max_wait` + an fsync): Mosquitto counts packet
//!     ids up through 65,535 before reusing one, so with it this cannot happen. Bounded by the
//!     packet id space (65,536 rows). Replaces `ingest_dedup` (entries never expired), which
//!     is dropped at open.
//!   - `serial_dedup`: `(port, device, seq) → hash of the frame's bytes`, reliable serial
//!     (`ack = true`). The last `SERIAL_SEQ_WINDOW` (1,024) seqs below the highest seen, per
//!     port and device. A frame in the window, recorded, with the same bytes, is a resend
//!     (acknowledged, not stored); a seq further back than the window, or a recorded seq with
//!     other bytes, is a device that restarted its count: stored, its rows start over. One
//!     row (~40 bytes) written and one deleted per frame.
//!   - `broker_dedup`: `(client id, packet id) → hash of topic + payload`, the embedded
//!     broker's sensors with a persistent session. Written in the commit that takes a QoS 1/2
//!     publish, removed by the commit after its PUBACK (PUBREC) was written, so a DUP resend
//!     whose acknowledgement was lost is acknowledged, not stored twice; a refused publish
//!     leaves no entry. Bounded by the publishes in flight.
//! - `commands`: `command id → postcard row`, commands from the cloud (`[commands]`), stored
//!   before their PUBACK, kept until their result is acknowledged, then remembered a while to
//!   recognise a redelivery (see [`commands`]); one commit per step, asked for by the commands
//!   task through [`commit::Control::Command`].
//! - `retained`: `topic → postcard row`, the embedded broker's retained messages (see
//!   [`retained`]), written with the next commit after a change.
//! - `dead_letters`: `u64 →` a postcard row (older releases wrote JSON; both are read), the
//!   input a rule failed on as it entered the chain (or a bad frame's raw bytes), with the
//!   rule, error and time; ids from `meta.next_dlq_id`, stored size in `meta.dlq_bytes`, capped
//!   by `dlq_max_bytes` (drop-oldest). Also events the upstream broker cannot take for their
//!   size (rule `upstream`), moved out of `events` in the commit after the forwarder says so.
//!   Rows go by `tidepool dlq retry|drop` or the cap. See [`dlq`].
//! - `rule_state`: `(rule, key) → JSON`, what rules keep with `state_set`; a key goes by
//!   `state_del`.
//! - `arrivals`: `u64 first id → i64 ms`, when the gateway stored each group of consecutive
//!   events, by its own clock (one row per minute of ingest at most); `max_age` counts from
//!   here, never from an event's `ts` (see [`arrivals`]). A row goes when its group is empty.
//! - `meta.schema_version`: the layout of the file (see [`schema`]); upgraded at open.
//!
//! **One commit** (one `Durability::Immediate` write transaction, one fsync) holds, in order:
//! the deletion of every event the upstream broker acknowledged since the last commit; a group
//! of ingested events (up to `commit_max_events`, gathered for at most `commit_max_wait` after
//! the first) run through the rule stage, given ids and appended (and, when due, what
//! `on_tick` returned); the dead letters and rule-state writes of those steps; the buffer caps
//! applied; the group's arrival time, expiry of groups past `max_age`; `meta` updated. A commit
//! is made only when there is something to write: an idle gateway writes nothing (it wakes at
//! most once a second, for the watchdog). Only after the commit returns are ingest acknowledgements sent
//! (client-mode PUBACKs, serial acks), rule publishes sent, and the forwarder woken. So a
//! crash never loses a rule's state write while keeping its outputs, or the reverse.
//!
//! **When rows go.** A row leaves `events` only (a) after its batch's PUBACK from upstream,
//! (b) when `max_bytes` is reached, or the filesystem is below `min_free`, under `drop_oldest`
//! (oldest first), or (c) when its group is older than `max_age`. (b) and (c) are counted in
//! `tidepool_events_dropped_total` (`buffer_full`, `min_free`, `max_age`) and in `meta`; or
//! (d) when the forwarder finds it too large for upstream, into `dead_letters`.
//!
//! **When the store fails** (a full disk, an I/O error), see [`CommitLoop`]'s recovery: the
//! file is reopened, acknowledged deletions commit on their own, the buffer counts as full,
//! and ingest waits until a commit succeeds.
//!
//! **Readers.** The forwarder and `status` read through redb read transactions, which never
//! block the writer; they take the database from the [`Store`] handle for each read, so the
//! writer can reopen it.

pub mod arrivals;
pub mod budget;
pub mod commands;
pub mod commit;
pub mod dedup;
pub mod dlq;
mod handle;
pub mod retained;
pub mod schema;
#[cfg(test)]
pub mod simdisk;
pub mod sinks;
#[cfg(test)]
mod sinks_model;
pub mod space;
pub mod wear;

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::event::{Event, Payload};

pub use commit::{CommitLoop, ForwardAck, ForwardMsg, Incoming, Plan};
pub use handle::{Opener, Store};

/// Buffered events, by id.
pub const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// Counters and cursors.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Inputs a rule failed on: see [`dlq`] for the row format.
pub const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// Per-rule state: (rule, key) → JSON value.
pub const RULE_STATE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("rule_state");
/// When each group of events was stored: first id → gateway wall-clock ms (see [`arrivals`]).
pub const ARRIVALS: TableDefinition<u64, i64> = TableDefinition::new("arrivals");

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
    /// Compaction failed (the file is left as it was).
    #[error("store compaction failed: {0}")]
    Compact(#[from] redb::CompactionError),
    /// The file is being compacted; try again shortly.
    #[error("the store is being compacted")]
    Compacting,
    /// The store is being reopened after an I/O error; try again shortly.
    #[error("the store is being reopened after an I/O error")]
    Reopening,
    /// A reader held the store while it had to be reopened.
    #[error("the store could not be reopened: a reader still holds it")]
    Busy,
    /// The file was written by a newer Tidepool.
    #[error("the store {path} was written by a newer Tidepool (store version {found}; this one reads up to {known}): run the newer version, or move the file away to start empty")]
    Newer {
        /// The file.
        path: String,
        /// Its version.
        found: u64,
        /// The newest this build reads.
        known: u64,
    },
    /// A stored row could not be decoded.
    #[error("corrupt row {id}: {source}")]
    Decode {
        /// The event id.
        id: u64,
        /// Why.
        source: postcard::Error,
    },
    /// A stored command or sink row could not be decoded.
    #[error("corrupt {0} row: {1}")]
    Row(&'static str, postcard::Error),
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

/// Encodes an event's row value: postcard of [`StoredEvent`], then its trace id (8 bytes,
/// little-endian) unless it has none. Rows from releases before trace ids end after the
/// payload; an older release reading a newer row ignores the trailing bytes.
pub fn encode(e: &Event) -> Vec<u8> {
    #[derive(Serialize)]
    struct Ref<'a> {
        ts: i64,
        source: &'a str,
        topic: &'a str,
        payload: &'a Payload,
    }
    let mut out = postcard::to_stdvec(&Ref {
        ts: e.ts,
        source: &e.source,
        topic: &e.topic,
        payload: &e.payload,
    })
    .expect("encoding to a Vec cannot fail");
    if !e.trace.is_none() {
        out.extend_from_slice(&e.trace.to_row());
    }
    out
}

/// Decodes a row back into an event.
pub fn decode(id: u64, bytes: &[u8]) -> Result<Event, StoreError> {
    let (s, rest): (StoredEvent, _) =
        postcard::take_from_bytes(bytes).map_err(|source| StoreError::Decode { id, source })?;
    Ok(Event {
        id,
        ts: s.ts,
        source: s.source,
        topic: s.topic,
        payload: s.payload,
        trace: crate::event::Trace::from_row(rest),
        properties: Vec::new(),
    })
}

/// Stored size of one row: what `max_bytes` counts.
pub fn row_size(value_len: usize) -> u64 {
    value_len as u64 + 8
}

/// Opens (creating if needed, upgrading an older layout) the store file with the given page cache.
pub fn open(path: &Path, cache_size: u64) -> Result<Store, StoreError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let written = std::sync::Arc::new(wear::WriteCounter::default());
    let db = schema::open_file_with(path, cache_size, None, &written)?;
    Ok(Store::new(db, path, cache_size, written))
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
    /// Their stored size (`meta.dlq_bytes`).
    pub dlq_bytes: u64,
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
    // The oldest age is by the gateway's clock (when the oldest group was stored); a store
    // from before arrival times were kept falls back to the event's own `ts`.
    let arrived = match txn.open_table(ARRIVALS) {
        Ok(t) => t.first()?.map(|(_, v)| v.value()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let (first_id, oldest_ts) = match events.first()? {
        Some((k, v)) => {
            let id = k.value();
            let ts = match arrived {
                Some(t) if t != arrivals::UNKNOWN => t,
                _ => decode(id, v.value())?.ts,
            };
            (Some(id), Some(ts))
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
        dlq_bytes: get(dlq::DLQ_BYTES)?,
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

#[cfg(test)]
mod model;
#[cfg(test)]
mod power;
#[cfg(test)]
mod tests;
