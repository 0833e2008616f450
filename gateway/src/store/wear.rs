//! What the store writes to the card, counted where it happens: a redb storage backend that
//! wraps the file and counts the bytes that reach the device.
//!
//! The kernel writes whole pages: a page dirtied twice before an fsync is written once, and a
//! 40-byte change costs a page. So the count is the number of distinct OS pages written since
//! the last sync, times the page size, added at each sync (and at close, when the kernel
//! writes back what is left). That is what `/proc/PID/io` `write_bytes` shows for the store,
//! measured from inside, so the commit loop can see what each commit cost.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// Bytes and syncs of the store file, shared across reopens.
#[derive(Debug)]
pub struct WriteCounter {
    page: u64,
    bytes: AtomicU64,
    syncs: AtomicU64,
    dirty: Mutex<BTreeSet<u64>>,
    /// When set, every write as (offset, length), for the page-by-page report.
    trace: Mutex<Option<Vec<(u64, usize)>>>,
}

impl Default for WriteCounter {
    /// Counts in 4 KiB: redb's page and the filesystem's block (ext4 on a card), which is
    /// what writeback sends to the device, also under a kernel with 16 KiB memory pages
    /// (the Pi 5's). The card's controller may write more inside (its erase units).
    fn default() -> Self {
        WriteCounter::with_page(4096)
    }
}

impl WriteCounter {
    /// A counter for OS pages of `page` bytes.
    pub fn with_page(page: u64) -> WriteCounter {
        WriteCounter {
            page: page.max(1),
            bytes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            dirty: Mutex::new(BTreeSet::new()),
            trace: Mutex::new(None),
        }
    }

    /// Bytes written to the device so far (synced pages).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed)
    }

    /// fsyncs so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Relaxed)
    }

    /// Starts recording every write (offset, length) until [`take_trace`](Self::take_trace).
    pub fn start_trace(&self) {
        *self.trace.lock().unwrap() = Some(Vec::new());
    }

    /// The writes since [`start_trace`](Self::start_trace); recording stops.
    pub fn take_trace(&self) -> Vec<(u64, usize)> {
        self.trace.lock().unwrap().take().unwrap_or_default()
    }

    fn wrote(&self, offset: u64, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset / self.page;
        let last = (offset + len as u64 - 1) / self.page;
        self.dirty.lock().unwrap().extend(first..=last);
        if let Some(t) = self.trace.lock().unwrap().as_mut() {
            t.push((offset, len));
        }
    }

    fn synced(&self) {
        let mut dirty = self.dirty.lock().unwrap();
        self.bytes
            .fetch_add(dirty.len() as u64 * self.page, Relaxed);
        dirty.clear();
        self.syncs.fetch_add(1, Relaxed);
    }

    fn closed(&self) {
        let mut dirty = self.dirty.lock().unwrap();
        self.bytes
            .fetch_add(dirty.len() as u64 * self.page, Relaxed);
        dirty.clear();
    }
}

/// The store file, counted.
#[derive(Debug)]
pub struct CountingBackend {
    inner: FileBackend,
    counter: Arc<WriteCounter>,
}

impl CountingBackend {
    /// Wraps an open file.
    pub fn new(file: File, counter: Arc<WriteCounter>) -> Result<Self, redb::DatabaseError> {
        Ok(CountingBackend {
            inner: FileBackend::new(file)?,
            counter,
        })
    }
}

impl StorageBackend for CountingBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.inner.sync_data()?;
        self.counter.synced();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.inner.write(offset, data)?;
        self.counter.wrote(offset, data.len());
        Ok(())
    }

    fn close(&self) -> Result<(), io::Error> {
        self.counter.closed();
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_dirtied_twice_before_a_sync_count_once() {
        let c = WriteCounter::with_page(4096);
        c.wrote(0, 100);
        c.wrote(50, 100);
        c.wrote(4000, 200); // pages 0 and 1
        assert_eq!(c.bytes(), 0, "nothing reaches the device before the sync");
        c.synced();
        assert_eq!(c.bytes(), 2 * 4096);
        assert_eq!(c.syncs(), 1);
        c.wrote(8192, 1);
        c.closed();
        assert_eq!(c.bytes(), 3 * 4096, "what is left is written back at close");
        assert_eq!(c.syncs(), 1);
    }

    #[test]
    fn a_trace_records_each_write_until_taken() {
        let c = WriteCounter::with_page(4096);
        c.wrote(0, 10);
        c.start_trace();
        c.wrote(4096, 20);
        c.wrote(12288, 4096);
        assert_eq!(c.take_trace(), vec![(4096, 20), (12288, 4096)]);
        c.wrote(0, 1);
        assert!(c.take_trace().is_empty());
    }
}
