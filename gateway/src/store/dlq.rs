//! The dead-letter table: its row format, its byte cap, and reading it in pages.
//!
//! **Rows.** `dead_letters: u64 id → bytes`. A row written by this version is the byte `1`
//! followed by the postcard encoding of [`Row`] (rule, error, time, and the input event with
//! its payload as stored: JSON text, or raw bytes as bytes — a bad serial frame costs its own
//! length, not the ~4× of a JSON array of numbers). Rows written by earlier versions are JSON
//! objects of `rules::DeadLetter` (they start with `{`); they are read as they are, so a store
//! from an earlier release needs no migration. Ids come from `meta.next_dlq_id`.
//!
//! **Cap.** `meta.dlq_bytes` holds the stored size of the table's rows (value + 8 bytes of
//! key, as `max_bytes` counts events), kept in the same transaction as every change, so the
//! cap check costs one read. A store from an earlier release has no such key: it is computed
//! once, by one scan, at start-up ([`ensure_bytes`]). When a new dead letter would take the
//! table past `[buffer] dlq_max_bytes`, the oldest rows go first (drop-oldest), each counted
//! under `tidepool_events_dropped_total{reason="dlq_full"}`; one larger than the whole cap is
//! counted and not stored.
//!
//! **Pages.** Nothing reads the whole table at once: [`page`] returns at most `max_rows` rows
//! and about `max_bytes` of them, after a cursor id, so `tidepool dlq list`, `GET /dlq`, and
//! `retry`/`drop` (one transaction per page) work in bounded memory whatever the queue holds.

use redb::{ReadableDatabase, ReadableTable, Table};
use serde::{Deserialize, Serialize};

use super::{row_size, StoreError, DEAD_LETTERS, META};
use crate::event::{Event, Payload, Trace};
use crate::rules::DeadLetter;

/// `meta` key: the stored size of the dead-letter rows.
pub const DLQ_BYTES: &str = "dlq_bytes";
/// `meta` key: the id the next dead letter gets.
pub const NEXT_DLQ_ID: &str = "next_dlq_id";
/// Rows of one page (and of one retry/drop transaction) unless asked otherwise.
pub const PAGE_ROWS: usize = 256;
/// Bytes of row values one page holds at most (always at least one row).
pub const PAGE_BYTES: u64 = 1 << 20;

/// The first byte of a row in the current format.
const ROW_V1: u8 = 1;

/// A dead letter as stored (after the format byte).
#[derive(Debug, Serialize, Deserialize)]
struct Row {
    rule: String,
    error: String,
    at: i64,
    ts: i64,
    source: String,
    topic: String,
    payload: Payload,
}

/// Encodes a dead letter's row value (current format): the format byte, postcard of [`Row`],
/// then the input's trace id (8 bytes, little-endian) unless it has none, as event rows do.
pub fn encode(d: &DeadLetter) -> Vec<u8> {
    #[derive(Serialize)]
    struct RowRef<'a> {
        rule: &'a str,
        error: &'a str,
        at: i64,
        ts: i64,
        source: &'a str,
        topic: &'a str,
        payload: &'a Payload,
    }
    let mut out = vec![ROW_V1];
    postcard::to_io(
        &RowRef {
            rule: &d.rule,
            error: &d.error,
            at: d.at,
            ts: d.event.ts,
            source: &d.event.source,
            topic: &d.event.topic,
            payload: &d.event.payload,
        },
        &mut out,
    )
    .expect("encoding to a Vec cannot fail");
    if !d.event.trace.is_none() {
        out.extend_from_slice(&d.event.trace.to_row());
    }
    out
}

/// Decodes a row of either format.
pub fn decode(bytes: &[u8]) -> Result<DeadLetter, String> {
    match bytes.first() {
        Some(b'{') => serde_json::from_slice(bytes).map_err(|e| format!("old JSON row: {e}")),
        Some(&ROW_V1) => {
            let (r, rest): (Row, _) =
                postcard::take_from_bytes(&bytes[1..]).map_err(|e| e.to_string())?;
            Ok(DeadLetter {
                rule: r.rule,
                error: r.error,
                at: r.at,
                event: Event {
                    id: 0,
                    ts: r.ts,
                    source: r.source,
                    topic: r.topic,
                    payload: r.payload,
                    trace: Trace::from_row(rest),
                    properties: Vec::new(),
                },
            })
        }
        Some(v) => Err(format!(
            "unknown row format {v} (written by a newer version?)"
        )),
        None => Err("empty row".into()),
    }
}

/// Which dead letters a page is read from.
#[derive(Debug, Clone, Default)]
pub struct Select {
    /// Only these ids (any order); `None`: all.
    pub ids: Option<Vec<u64>>,
    /// Only ids below this one (so a retry never meets the rows it wrote itself).
    pub below: Option<u64>,
}

/// One page: rows with ids above the cursor, oldest first; `Err` holds why a row could not
/// be decoded (it is listed, so it can be seen and dropped).
#[derive(Debug, Default)]
pub struct Page {
    /// (id, dead letter).
    pub rows: Vec<(u64, Result<DeadLetter, String>)>,
    /// Whether rows matching the selection remain after the last one.
    pub more: bool,
}

impl Page {
    /// The cursor for the next page.
    pub fn last_id(&self) -> Option<u64> {
        self.rows.last().map(|(id, _)| *id)
    }
}

/// Reads up to `max_rows` dead letters (and at most about [`PAGE_BYTES`]) with ids above
/// `after`, from `sel`.
pub fn page<D: ReadableDatabase>(
    db: &D,
    sel: &Select,
    after: u64,
    max_rows: usize,
) -> Result<Page, StoreError> {
    let txn = db.begin_read()?;
    let t = txn.open_table(DEAD_LETTERS)?;
    let max_rows = max_rows.max(1);
    let below = sel.below.unwrap_or(u64::MAX);
    let mut out = Page::default();
    let mut bytes = 0u64;
    let mut take = |id: u64, v: &[u8], out: &mut Page| -> bool {
        if out.rows.len() >= max_rows
            || (!out.rows.is_empty() && bytes + v.len() as u64 > PAGE_BYTES)
        {
            out.more = true;
            return false;
        }
        bytes += v.len() as u64;
        out.rows.push((id, decode(v)));
        true
    };
    match &sel.ids {
        Some(ids) => {
            let mut ids: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|i| *i > after && *i < below)
                .collect();
            ids.sort_unstable();
            ids.dedup();
            for id in ids {
                if let Some(v) = t.get(id)? {
                    if !take(id, v.value(), &mut out) {
                        break;
                    }
                }
            }
        }
        None => {
            if after < below {
                for row in t.range(after.saturating_add(1)..below)? {
                    let (k, v) = row?;
                    if !take(k.value(), v.value(), &mut out) {
                        break;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// What inserting and removing did to the table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Rows written.
    pub inserted: u64,
    /// Rows removed on request (retried or dropped).
    pub removed: u64,
    /// Rows dropped (oldest first, or a new one larger than the cap) for `dlq_max_bytes`.
    pub dropped_full: u64,
    /// Rows in the table afterwards.
    pub events: u64,
    /// Their stored size.
    pub bytes: u64,
}

/// Removes the rows `remove`, then appends `new` under `cap` (drop-oldest), keeping
/// `meta.dlq_bytes` and `meta.next_dlq_id`; inside the caller's transaction.
pub fn apply(
    dlq: &mut Table<u64, &[u8]>,
    meta: &mut Table<&str, u64>,
    remove: &[u64],
    new: impl IntoIterator<Item = DeadLetter>,
    cap: u64,
) -> Result<Tally, StoreError> {
    let mut t = Tally {
        bytes: meta.get(DLQ_BYTES)?.map(|v| v.value()).unwrap_or(0),
        ..Tally::default()
    };
    for id in remove {
        if let Some(v) = dlq.remove(*id)? {
            t.bytes = t.bytes.saturating_sub(row_size(v.value().len()));
            t.removed += 1;
        }
    }
    let mut next = meta.get(NEXT_DLQ_ID)?.map(|v| v.value()).unwrap_or(1);
    let first_next = next;
    for d in new {
        let row = encode(&d);
        let size = row_size(row.len());
        if size > cap {
            t.dropped_full += 1;
            continue;
        }
        while t.bytes + size > cap {
            match dlq.pop_first()? {
                Some((_, v)) => {
                    t.bytes = t.bytes.saturating_sub(row_size(v.value().len()));
                    t.dropped_full += 1;
                }
                None => {
                    t.bytes = 0;
                    break;
                }
            }
        }
        dlq.insert(next, row.as_slice())?;
        next += 1;
        t.bytes += size;
        t.inserted += 1;
    }
    if next != first_next {
        meta.insert(NEXT_DLQ_ID, next)?;
    }
    meta.insert(DLQ_BYTES, t.bytes)?;
    t.events = redb::ReadableTableMetadata::len(dlq)?;
    Ok(t)
}

/// Makes sure `meta.dlq_bytes` exists (a store from an earlier release lacks it: one scan
/// computes it); returns (rows, bytes) of the table.
pub fn ensure_bytes(db: &redb::Database) -> Result<(u64, u64), StoreError> {
    {
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        let t = txn.open_table(DEAD_LETTERS)?;
        if let Some(b) = meta.get(DLQ_BYTES)? {
            return Ok((redb::ReadableTableMetadata::len(&t)?, b.value()));
        }
    }
    let txn = db.begin_write()?;
    let counted = {
        let t = txn.open_table(DEAD_LETTERS)?;
        let mut meta = txn.open_table(META)?;
        let mut bytes = 0u64;
        for row in t.iter()? {
            let (_, v) = row?;
            bytes += row_size(v.value().len());
        }
        meta.insert(DLQ_BYTES, bytes)?;
        (redb::ReadableTableMetadata::len(&t)?, bytes)
    };
    txn.commit()?;
    Ok(counted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::Database;

    fn letter(i: u64, payload: Payload) -> DeadLetter {
        DeadLetter {
            rule: "10-x".into(),
            error: format!("boom {i}"),
            at: 1_700_000_000_000 + i as i64,
            event: Event {
                id: 0,
                ts: 1_700_000_000_000,
                source: "serial:uart0".into(),
                topic: "serial/uart0".into(),
                payload,
                trace: crate::event::Trace(0xfeed_0000 + i),
                properties: Vec::new(),
            },
        }
    }

    fn db() -> (tempfile::TempDir, std::sync::Arc<Database>) {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(&dir.path().join("t.redb"), 1 << 20)
            .unwrap()
            .db()
            .unwrap();
        (dir, db)
    }

    fn write(db: &Database, remove: &[u64], new: Vec<DeadLetter>, cap: u64) -> Tally {
        let txn = db.begin_write().unwrap();
        let t = {
            let mut dlq = txn.open_table(DEAD_LETTERS).unwrap();
            let mut meta = txn.open_table(META).unwrap();
            apply(&mut dlq, &mut meta, remove, new, cap).unwrap()
        };
        txn.commit().unwrap();
        t
    }

    #[test]
    fn raw_bytes_are_stored_as_bytes_and_both_formats_decode() {
        let raw: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        let d = letter(1, Payload::Bytes(raw.clone()));
        let new = encode(&d);
        let old = serde_json::to_vec(&d).unwrap();
        eprintln!(
            "a 4096-byte bad frame: {} bytes as a JSON row (old), {} as a postcard row (new)",
            old.len(),
            new.len()
        );
        assert!(new.len() < raw.len() + 100, "{}", new.len());
        assert!(old.len() > 3 * raw.len());
        assert_eq!(decode(&new).unwrap(), d);
        assert_eq!(
            decode(&old).unwrap(),
            d,
            "rows of the earlier release still read"
        );
        let j = letter(2, Payload::Json("{\"celsius\":21.5}".into()));
        assert_eq!(decode(&encode(&j)).unwrap(), j);
        assert!(decode(&[9, 1, 2]).unwrap_err().contains("newer"));
    }

    #[test]
    fn an_old_format_row_in_a_store_is_listed_retried_and_counted() {
        // A row exactly as the earlier release wrote it (JSON, bytes as an array of numbers).
        let old_row = br#"{"rule":"serial:uart0","error":"bad COBS frame","at":1763785000123,"event":{"id":0,"ts":1763785000000,"source":"serial:uart0","topic":"serial/uart0","payload":{"Bytes":[1,2,255]}}}"#;
        let (_d, db) = db();
        {
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(DEAD_LETTERS).unwrap();
                t.insert(7, old_row.as_slice()).unwrap();
                let mut meta = txn.open_table(META).unwrap();
                meta.insert(NEXT_DLQ_ID, 8).unwrap();
                // As an earlier release left it: no dlq_bytes.
                meta.remove(DLQ_BYTES).unwrap();
            }
            txn.commit().unwrap();
        }
        // No dlq_bytes yet (an earlier release's store): one scan computes it.
        assert_eq!(ensure_bytes(&db).unwrap(), (1, row_size(old_row.len())));
        assert_eq!(ensure_bytes(&db).unwrap(), (1, row_size(old_row.len())));
        let p = page(&*db, &Select::default(), 0, 10).unwrap();
        let d = p.rows[0].1.as_ref().unwrap();
        assert_eq!(p.rows[0].0, 7);
        assert_eq!(d.error, "bad COBS frame");
        assert_eq!(d.event.payload, Payload::Bytes(vec![1, 2, 255]));
        // New rows follow in the new format; removing the old one keeps the count right.
        let t = write(
            &db,
            &[7],
            vec![letter(1, Payload::Bytes(vec![0; 10]))],
            1 << 20,
        );
        assert_eq!((t.removed, t.inserted, t.events), (1, 1, 1));
        assert_eq!(
            t.bytes,
            row_size(encode(&letter(1, Payload::Bytes(vec![0; 10]))).len())
        );
        let p = page(&*db, &Select::default(), 0, 10).unwrap();
        assert_eq!(p.rows[0].0, 8);
    }

    #[test]
    fn the_cap_drops_the_oldest_and_counts() {
        let (_d, db) = db();
        let one = row_size(encode(&letter(0, Payload::Json("1".into()))).len());
        let cap = one * 10;
        let mut dropped = 0;
        for _ in 0..25 {
            let t = write(&db, &[], vec![letter(0, Payload::Json("1".into()))], cap);
            dropped += t.dropped_full;
            assert!(t.bytes <= cap);
        }
        assert_eq!(dropped, 15);
        let p = page(&*db, &Select::default(), 0, 100).unwrap();
        assert_eq!(p.rows.len(), 10);
        assert_eq!(p.rows[0].0, 16, "the oldest went first");
        // Larger than the whole cap: counted, not stored, nothing else goes.
        let big = letter(99, Payload::Bytes(vec![0; cap as usize]));
        let t = write(&db, &[], vec![big], cap);
        assert_eq!((t.inserted, t.dropped_full, t.events), (0, 1, 10));
    }

    #[test]
    fn pages_follow_the_cursor_selection_and_bound() {
        let (_d, db) = db();
        write(
            &db,
            &[],
            (0..10)
                .map(|i| letter(i, Payload::Json("1".into())))
                .collect(),
            1 << 20,
        );
        let all = Select::default();
        let p = page(&*db, &all, 0, 4).unwrap();
        assert_eq!(p.rows.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert!(p.more);
        let p = page(&*db, &all, 8, 4).unwrap();
        assert_eq!(p.rows.iter().map(|r| r.0).collect::<Vec<_>>(), [9, 10]);
        assert!(!p.more);
        let sel = Select {
            ids: Some(vec![9, 2, 5, 42]),
            below: None,
        };
        let p = page(&*db, &sel, 2, 10).unwrap();
        assert_eq!(p.rows.iter().map(|r| r.0).collect::<Vec<_>>(), [5, 9]);
        let below = Select {
            ids: None,
            below: Some(4),
        };
        let p = page(&*db, &below, 0, 10).unwrap();
        assert_eq!(p.rows.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3]);
        // Bytes bound a page too (always at least one row).
        write(
            &db,
            &[],
            (0..3)
                .map(|i| letter(i, Payload::Bytes(vec![0; 700 * 1024])))
                .collect(),
            64 << 20,
        );
        let p = page(&*db, &all, 10, 100).unwrap();
        assert_eq!(p.rows.len(), 1);
        assert!(p.more);
    }
}
