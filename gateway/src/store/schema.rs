//! What the store file holds, by version, and the upgrade from older versions at open.
//!
//! `meta.schema_version` says which layout the file has. A store without it was written by
//! a release before versions were recorded (version 1). At open, a newer gateway upgrades an
//! older store in one transaction (nothing buffered is lost); an older gateway refuses a newer
//! store with a message naming both versions. A store that needs nothing is opened without a
//! write, so a gateway on a full disk can still open it and drain.
//!
//! | version | change |
//! |---|---|
//! | 1 | events, meta, ingest_dedup, dead_letters, rule_state |
//! | 2 | `arrivals`: when the gateway stored each group of events (ages by the gateway's clock); `meta.dlq_bytes`; `mqtt_dedup` and `serial_dedup` replace `ingest_dedup`; dead letters in a compact postcard row (older JSON rows still read) |

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable};

use super::wear::{CountingBackend, WriteCounter};
use super::{arrivals, dedup, StoreError, ARRIVALS, DEAD_LETTERS, EVENTS, META, RULE_STATE};
use crate::event::now_ms;

/// The layout this build writes.
pub const SCHEMA_VERSION: u64 = 2;

/// Opens (creating if needed) the file, upgrading an older layout; refuses a newer one.
pub fn open_file(path: &Path, cache_size: u64) -> Result<Database, StoreError> {
    open_file_with(path, cache_size, None, &Arc::default())
}

/// [`open_file`], feeding `heartbeat` (the watchdog's) while redb repairs the file after an
/// unclean stop, which can take long on a big store and a slow card, and counting what is
/// written to the file in `counter`.
pub fn open_file_with(
    path: &Path,
    cache_size: u64,
    heartbeat: Option<Arc<AtomicI64>>,
    counter: &Arc<WriteCounter>,
) -> Result<Database, StoreError> {
    let open_err = |source: redb::DatabaseError| StoreError::Open {
        path: path.display().to_string(),
        source,
    };
    let new = !path.exists();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| open_err(e.into()))?;
    if new {
        // A new file's name lives in its folder: without syncing the folder, a power cut
        // soon after the first start could lose the whole store, commits and all.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| open_err(e.into()))?;
        }
    }
    let backend = CountingBackend::new(file, counter.clone()).map_err(open_err)?;
    open_backend(backend, &path.display().to_string(), cache_size, heartbeat)
}

/// [`open_file_with`] on any storage (`name` for messages): the store's tests run it on a
/// simulated disk.
pub fn open_backend(
    backend: impl redb::StorageBackend,
    name: &str,
    cache_size: u64,
    heartbeat: Option<Arc<AtomicI64>>,
) -> Result<Database, StoreError> {
    let open_err = |source: redb::DatabaseError| StoreError::Open {
        path: name.to_string(),
        source,
    };
    let mut builder = Database::builder();
    builder.set_cache_size(cache_size as usize);
    builder.set_repair_callback(repair_progress(name, heartbeat));
    let db = builder.create_with_backend(backend).map_err(open_err)?;
    let found = version(&db)?;
    match found {
        Some(v) if v == SCHEMA_VERSION => {}
        Some(v) if v > SCHEMA_VERSION => {
            return Err(StoreError::Newer {
                path: name.to_string(),
                found: v,
                known: SCHEMA_VERSION,
            })
        }
        _ => upgrade(&db, found)?,
    }
    Ok(db)
}

/// What to do while redb repairs the file after an unclean stop (it walks the file's trees
/// three times: seconds on a big store, longer on a slow card): say so in the log, feed the
/// watchdog's `heartbeat` (a reopen while running), or, at start-up (no heartbeat yet), keep
/// systemd from giving up before `READY=1` (`EXTEND_TIMEOUT_USEC`, a minute past each
/// report; reports at most every 5 s).
fn repair_progress(
    name: &str,
    heartbeat: Option<Arc<AtomicI64>>,
) -> impl Fn(&mut redb::RepairSession) + 'static {
    let name = name.to_string();
    let last = std::sync::Mutex::new(None::<std::time::Instant>);
    move |session| {
        if let Some(hb) = &heartbeat {
            hb.store(now_ms(), Ordering::Relaxed);
        }
        let mut last = last.lock().unwrap();
        if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(5)) {
            return;
        }
        let pct = (session.progress() * 100.0).round();
        // With a heartbeat the gateway is running (a reopen after an I/O error); without, it
        // is starting, and systemd waits for READY=1.
        let starting = heartbeat.is_none();
        match (last.is_none(), starting) {
            (true, true) => {
                tracing::info!(store = %name, "the store was not closed cleanly: repairing it before start")
            }
            (true, false) => tracing::info!(store = %name, "repairing the store as it is reopened"),
            (false, _) => tracing::info!(store = %name, progress = pct, "repairing the store"),
        }
        *last = Some(std::time::Instant::now());
        if starting {
            crate::systemd::notify(&format!(
                "EXTEND_TIMEOUT_USEC=60000000\nSTATUS=repairing the store after an unclean stop: {pct}%"
            ));
        }
    }
}

/// The file's schema version: `None` for a new, empty file; 1 for a store written before
/// versions were recorded.
pub fn version<D: ReadableDatabase>(db: &D) -> Result<Option<u64>, StoreError> {
    let txn = db.begin_read()?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(Some(
        meta.get("schema_version")?.map(|v| v.value()).unwrap_or(1),
    ))
}

/// Brings a new (`None`) or older store to [`SCHEMA_VERSION`] in one transaction.
fn upgrade(db: &Database, from: Option<u64>) -> Result<(), StoreError> {
    let txn = db.begin_write()?;
    {
        // Every table, so readers never see a missing one.
        let events = txn.open_table(EVENTS)?;
        let mut meta = txn.open_table(META)?;
        dedup::create_tables(&txn)?;
        txn.open_table(DEAD_LETTERS)?;
        txn.open_table(RULE_STATE)?;
        let mut arr = txn.open_table(ARRIVALS)?;
        if from.is_some_and(|v| v < 2) {
            // Version 1 kept no arrival times: what it buffered is aged from now (the
            // upgrade), or from the first sane clock reading if the clock is not set yet.
            if let Some((first, _)) = events.first()? {
                arr.insert(first.value(), arrivals::wall_or_unknown(now_ms()))?;
            }
        }
        if meta.get(super::dlq::DLQ_BYTES)?.is_none() {
            // The dead-letter queue's stored size, kept in `meta` from version 2 on.
            let dlq = txn.open_table(DEAD_LETTERS)?;
            let mut bytes = 0u64;
            for row in dlq.iter()? {
                bytes += super::row_size(row?.1.value().len());
            }
            meta.insert(super::dlq::DLQ_BYTES, bytes)?;
        }
        meta.insert("schema_version", SCHEMA_VERSION)?;
    }
    txn.commit()?;
    if let Some(v) = from {
        tracing::info!(
            from = v,
            to = SCHEMA_VERSION,
            "store upgraded to this version's layout"
        );
    }
    Ok(())
}
