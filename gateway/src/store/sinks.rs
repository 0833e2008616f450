//! Several sinks: which events each one still owes, and when an event may go.
//!
//! Each configured sink (the `[upstream]` broker is the sink `upstream`; `[[sink]]` tables add
//! more) has topic filters and its own cursor. An event is kept while some sink *owes* it: the
//! sink's filters match the event's topic, the event arrived after the sink was added (its
//! `start` id), and the sink has not acknowledged it. Sinks acknowledge ranges of ids, in any
//! order; an acknowledged range deletes the events in it that no other sink owes, and an event
//! that one sink acknowledged stays until the others that owe it have acknowledged it too.
//!
//! Tables:
//! - `sinks`: `name → postcard` [`SinkRow`] (start id, filters): the sinks the store knows.
//!   A sink seen for the first time starts at the next id (it gets what arrives from then on),
//!   unless no sink was known before: then it starts at 0, because the events buffered
//!   meanwhile were waiting for it. A sink no longer configured is forgotten, its ranges
//!   dropped, and what only it owed is released ([`sweep`]), as after a change of filters.
//! - `sink_acks`: `(name, from) → to`: each sink's acknowledged ranges, merged, and pruned
//!   below the oldest stored event. Written only with two sinks or more: a lone sink's
//!   acknowledgement deletes its range outright, as before there were sinks.

use std::collections::BTreeMap;

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::broker::router::matches;

/// The sinks the store knows.
pub const SINKS: TableDefinition<&str, &[u8]> = TableDefinition::new("sinks");
/// Their acknowledged ranges.
pub const SINK_ACKS: TableDefinition<(&str, u64), u64> = TableDefinition::new("sink_acks");

/// The name of the `[upstream]` sink.
pub const UPSTREAM: &str = "upstream";

/// A sink as configured: its name and topic filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSpec {
    /// `upstream`, or the `[[sink]]` name.
    pub name: String,
    /// MQTT topic filters of the events it takes (`["#"]`: all).
    pub filters: Vec<String>,
}

impl SinkSpec {
    /// The sink that takes everything.
    pub fn all(name: &str) -> SinkSpec {
        SinkSpec {
            name: name.into(),
            filters: vec!["#".into()],
        }
    }

    /// Whether it takes events on `topic`.
    pub fn takes(&self, topic: &str) -> bool {
        self.filters.iter().any(|f| matches(f, topic))
    }

    fn takes_all(&self) -> bool {
        self.filters.iter().any(|f| f == "#")
    }
}

/// The `meta` key of a sink's next batch number (`next_batch` for `upstream`, as before
/// there were sinks).
pub fn next_batch_key(name: &str) -> String {
    if name == UPSTREAM {
        "next_batch".into()
    } else {
        format!("next_batch.{name}")
    }
}

/// A `sinks` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkRow {
    /// Events with a lower id are not this sink's.
    pub start: u64,
    /// Its filters when they were last seen (a change is swept).
    pub filters: Vec<String>,
}

/// One sink's view: what it owes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkState {
    /// Name and filters.
    pub spec: SinkSpec,
    /// Its first id.
    pub start: u64,
    /// Acknowledged ranges `from → to`, merged.
    pub acked: BTreeMap<u64, u64>,
}

impl SinkState {
    /// Whether this sink owes the event `id` on `topic`.
    pub fn owes(&self, id: u64, topic: &str) -> bool {
        id >= self.start && self.spec.takes(topic) && !self.is_acked(id)
    }

    /// Whether `id` is in an acknowledged range.
    pub fn is_acked(&self, id: u64) -> bool {
        matches!(self.acked.range(..=id).next_back(), Some((_, &to)) if to >= id)
    }
}

/// Every configured sink's view, in configuration order (`upstream` first when set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sinks {
    /// The sinks.
    pub list: Vec<SinkState>,
}

impl Sinks {
    /// Whether acknowledgements must be remembered per sink: two sinks or more. With one, an
    /// acknowledged range is deleted outright.
    pub fn multi(&self) -> bool {
        self.list.len() > 1
    }

    /// Whether an event on `topic` has a sink to go to (with none configured, everything
    /// waits in the buffer for one).
    pub fn wanted(&self, topic: &str) -> bool {
        self.list.is_empty() || self.list.iter().any(|s| s.spec.takes(topic))
    }

    /// Whether a sink other than `except` owes the event.
    pub fn owed_by_other(&self, except: usize, id: u64, topic: &str) -> bool {
        self.list
            .iter()
            .enumerate()
            .any(|(i, s)| i != except && s.owes(id, topic))
    }

    /// Whether any sink owes the event (with none configured: yes, it waits for one).
    pub fn owed(&self, id: u64, topic: &str) -> bool {
        self.list.is_empty() || self.list.iter().any(|s| s.owes(id, topic))
    }

    /// The index of the sink named `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|s| s.spec.name == name)
    }
}

/// Adds `from..=to` to `ranges`, merging it with its neighbours.
pub fn note_range(ranges: &mut BTreeMap<u64, u64>, mut from: u64, mut to: u64) {
    if let Some((&f, &t)) = ranges.range(..=from).next_back() {
        if t.saturating_add(1) >= from {
            from = f;
            to = to.max(t);
        }
    }
    while let Some((&f, &t)) = ranges.range(from..).next() {
        if f > to.saturating_add(1) {
            break;
        }
        to = to.max(t);
        ranges.remove(&f);
    }
    ranges.insert(from, to);
}

/// What [`register`] found.
#[derive(Debug, Default)]
pub struct Registered {
    /// The sinks' views.
    pub sinks: Sinks,
    /// Whether what the store holds must be swept: a sink went, or changed its filters.
    pub sweep: bool,
    /// Whether the `sinks` tables changed (else the transaction need not be committed: a
    /// start on a full disk writes nothing).
    pub changed: bool,
}

/// Brings the `sinks` table in line with `configured` (at start, in its own transaction):
/// new sinks start at `next_id` (or 0 when none was known), gone ones are forgotten. With no
/// sink configured nothing changes (events wait for one).
pub fn register(
    txn: &WriteTransaction,
    configured: &[SinkSpec],
    next_id: u64,
) -> Result<Registered, StoreError> {
    let mut rows = txn.open_table(SINKS)?;
    let mut acks = txn.open_table(SINK_ACKS)?;
    let mut known: BTreeMap<String, SinkRow> = BTreeMap::new();
    for r in rows.iter()? {
        let (k, v) = r?;
        let row: SinkRow =
            postcard::from_bytes(v.value()).map_err(|e| StoreError::Row("sink", e))?;
        known.insert(k.value().to_string(), row);
    }
    if configured.is_empty() {
        return Ok(Registered::default());
    }
    let none_known = known.is_empty();
    let mut sweep = false;
    let mut changed = false;
    let mut list = Vec::new();
    for spec in configured {
        // The first time: what the store holds was buffered for `upstream` (a store from
        // before there were sinks) or, without one, for whichever sinks come first.
        let upstream_configured = configured.iter().any(|s| s.name == UPSTREAM);
        let (start, same) = match known.remove(&spec.name) {
            Some(row) => {
                if row.filters != spec.filters {
                    sweep = true;
                }
                (row.start, row.filters == spec.filters)
            }
            None if none_known && (spec.name == UPSTREAM || !upstream_configured) => (0, false),
            None => (next_id, false),
        };
        if !same {
            let row = SinkRow {
                start,
                filters: spec.filters.clone(),
            };
            let bytes = postcard::to_stdvec(&row).expect("a sink row encodes");
            rows.insert(spec.name.as_str(), bytes.as_slice())?;
            changed = true;
        }
        let mut acked = BTreeMap::new();
        for r in acks.range((spec.name.as_str(), 0)..=(spec.name.as_str(), u64::MAX))? {
            let (k, v) = r?;
            acked.insert(k.value().1, v.value());
        }
        list.push(SinkState {
            spec: spec.clone(),
            start,
            acked,
        });
    }
    for gone in known.keys() {
        sweep = true;
        changed = true;
        rows.remove(gone.as_str())?;
        let keys: Vec<u64> = acks
            .range((gone.as_str(), 0)..=(gone.as_str(), u64::MAX))?
            .map(|r| r.map(|(k, _)| k.value().1))
            .collect::<Result<_, _>>()?;
        for from in keys {
            acks.remove((gone.as_str(), from))?;
        }
    }
    // The first sinks, with filters: what the buffer held for them and they do not take goes.
    if none_known && list.iter().all(|s| !s.spec.takes_all()) {
        sweep = true;
    }
    Ok(Registered {
        sinks: Sinks { list },
        sweep,
        changed,
    })
}

/// Writes sink `i`'s ranges as they are in `after` (given `before`).
pub fn write_ranges(
    txn: &WriteTransaction,
    name: &str,
    before: &BTreeMap<u64, u64>,
    after: &BTreeMap<u64, u64>,
) -> Result<(), StoreError> {
    let mut acks = txn.open_table(SINK_ACKS)?;
    for from in before.keys() {
        if !after.contains_key(from) {
            acks.remove((name, *from))?;
        }
    }
    for (from, to) in after {
        if before.get(from) != Some(to) {
            acks.insert((name, *from), *to)?;
        }
    }
    Ok(())
}

/// Drops ranges that lie wholly below `lowest` (the oldest stored id): nothing there is left
/// to skip.
pub fn prune(ranges: &mut BTreeMap<u64, u64>, lowest: u64) {
    ranges.retain(|_, to| *to >= lowest);
}

/// A sink's stored ranges, in a read transaction the caller holds (a forwarder's read).
pub fn ranges_in(
    txn: &redb::ReadTransaction,
    name: &str,
) -> Result<BTreeMap<u64, u64>, StoreError> {
    let mut acked = BTreeMap::new();
    match txn.open_table(SINK_ACKS) {
        Ok(t) => {
            for r in t.range((name, 0)..=(name, u64::MAX))? {
                let (k, v) = r?;
                acked.insert(k.value().1, v.value());
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(acked)
}

/// A sink's start and acknowledged ranges as stored (for its forwarder at start-up).
pub fn load<D: ReadableDatabase>(
    db: &D,
    name: &str,
) -> Result<(u64, BTreeMap<u64, u64>), StoreError> {
    let txn = db.begin_read()?;
    let start = match txn.open_table(SINKS) {
        Ok(t) => match t.get(name)? {
            Some(v) => {
                postcard::from_bytes::<SinkRow>(v.value())
                    .map_err(|e| StoreError::Row("sink", e))?
                    .start
            }
            None => 0,
        },
        Err(redb::TableError::TableDoesNotExist(_)) => 0,
        Err(e) => return Err(e.into()),
    };
    Ok((start, ranges_in(&txn, name)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, filters: &[&str]) -> SinkSpec {
        SinkSpec {
            name: name.into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        }
    }

    fn reg(db: &redb::Database, specs: &[SinkSpec], next_id: u64) -> Registered {
        let txn = db.begin_write().unwrap();
        let r = register(&txn, specs, next_id).unwrap();
        txn.commit().unwrap();
        r
    }

    #[test]
    fn the_first_sink_gets_the_buffer_later_ones_only_what_comes_next() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("s.redb")).unwrap();
        assert!(
            reg(&db, &[], 50).sinks.list.is_empty(),
            "no sink: nothing registered"
        );
        let r = reg(&db, &[SinkSpec::all(UPSTREAM)], 100);
        assert_eq!(
            r.sinks.list[0].start, 0,
            "the buffered events were waiting for it"
        );
        assert!(!r.sweep);
        assert!(r.changed);
        // The same sinks again: nothing to write (a start on a full disk commits nothing).
        let r = reg(&db, &[SinkSpec::all(UPSTREAM)], 150);
        assert!(!r.changed && !r.sweep && r.sinks.list[0].start == 0);
        let r = reg(
            &db,
            &[SinkSpec::all(UPSTREAM), spec("fn", &["alerts/#"])],
            200,
        );
        // (A store from before sinks, upgraded with a new sink beside upstream: the new sink
        // starts now, upstream keeps the backlog; see below.)
        assert_eq!((r.sinks.list[0].start, r.sinks.list[1].start), (0, 200));
        assert!(!r.sweep && r.sinks.multi());
        assert_eq!(load(&db, "fn").unwrap().0, 200);
        // Changed filters, then a sink gone: swept.
        let r = reg(&db, &[SinkSpec::all(UPSTREAM), spec("fn", &["a/#"])], 300);
        assert!(r.sweep && r.changed);
        let r = reg(&db, &[SinkSpec::all(UPSTREAM)], 400);
        assert!(r.sweep && !r.sinks.multi());
        // Back again: a new sink, from now on.
        let r = reg(&db, &[SinkSpec::all(UPSTREAM), spec("fn", &["a/#"])], 500);
        assert_eq!(r.sinks.list[1].start, 500);
    }

    #[test]
    fn an_upgraded_store_keeps_its_backlog_for_upstream_not_for_a_new_sink() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("s.redb")).unwrap();
        let r = reg(&db, &[SinkSpec::all(UPSTREAM), spec("fn", &["a/#"])], 500);
        assert_eq!((r.sinks.list[0].start, r.sinks.list[1].start), (0, 500));
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("s.redb")).unwrap();
        let r = reg(&db, &[spec("fn", &["a/#"]), spec("g", &["b/#"])], 500);
        assert_eq!(
            (r.sinks.list[0].start, r.sinks.list[1].start),
            (0, 0),
            "buffered for them"
        );
    }

    #[test]
    fn an_event_is_owed_until_every_sink_that_takes_it_acknowledged_it() {
        let mut s = Sinks {
            list: vec![
                SinkState {
                    spec: SinkSpec::all(UPSTREAM),
                    start: 0,
                    acked: BTreeMap::new(),
                },
                SinkState {
                    spec: spec("fn", &["alerts/#"]),
                    start: 10,
                    acked: BTreeMap::new(),
                },
            ],
        };
        assert!(s.wanted("sensors/1") && s.wanted("alerts/x"));
        assert!(s.owed(5, "alerts/x"));
        note_range(&mut s.list[0].acked, 1, 20);
        assert!(
            !s.owed(5, "alerts/x"),
            "before fn's start: upstream's alone"
        );
        assert!(s.owed(15, "alerts/x"), "fn still owes it");
        assert!(!s.owed(15, "sensors/1"), "fn does not take it");
        assert!(s.owed_by_other(0, 15, "alerts/x"));
        assert!(!s.owed_by_other(1, 15, "alerts/x"));
        note_range(&mut s.list[1].acked, 12, 16);
        assert!(!s.owed(15, "alerts/x"));
        assert!(s.owed(17, "alerts/x"), "fn owes 17: not in its range");
        assert!(s.list[0].is_acked(17));
        let only_fn = Sinks {
            list: vec![s.list[1].clone()],
        };
        assert!(!only_fn.wanted("sensors/1"));
    }

    #[test]
    fn ranges_merge_and_prune() {
        let mut r = BTreeMap::new();
        note_range(&mut r, 5, 9);
        note_range(&mut r, 20, 30);
        note_range(&mut r, 10, 12);
        assert_eq!(r, BTreeMap::from([(5, 12), (20, 30)]));
        note_range(&mut r, 13, 19);
        assert_eq!(r, BTreeMap::from([(5, 30)]));
        note_range(&mut r, 40, 41);
        prune(&mut r, 31);
        assert_eq!(r, BTreeMap::from([(40, 41)]));
    }
}
