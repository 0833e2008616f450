//! The open store, shared by its one writer (the commit loop) and its readers (the forwarder,
//! admin, status), and reopened after an I/O error.
//!
//! After an I/O error (a full disk, a failing card) redb refuses every call until the database
//! is closed and opened again. The file is locked by the open `Database`, so a reopen has to
//! wait for every reader to let go of the old one: readers take the current database for the
//! span of one read ([`Store::db`]) and never keep it.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redb::Database;

use super::wear::WriteCounter;
use super::StoreError;

/// A shared handle to the store file; cheap to clone.
#[derive(Clone)]
pub struct Store {
    slot: Arc<RwLock<Option<Arc<Database>>>>,
    heartbeat: Arc<std::sync::Mutex<Option<Arc<AtomicI64>>>>,
    path: PathBuf,
    cache_size: u64,
    written: Arc<WriteCounter>,
    /// Set while the file is compacted: readers get [`StoreError::Compacting`].
    compacting: Arc<std::sync::atomic::AtomicBool>,
    /// Opens the database again (a reopen); `None`: the file at `path`.
    opener: Option<Opener>,
}

/// Opens a store's database on storage other than its file (the tests' simulated disk),
/// feeding the heartbeat it is given while redb repairs.
pub type Opener = Arc<dyn Fn(Option<Arc<AtomicI64>>) -> Result<Database, StoreError> + Send + Sync>;

impl Store {
    /// Wraps an open database.
    pub(super) fn new(
        db: Database,
        path: &Path,
        cache_size: u64,
        written: Arc<WriteCounter>,
    ) -> Store {
        Store {
            slot: Arc::new(RwLock::new(Some(Arc::new(db)))),
            heartbeat: Arc::default(),
            path: path.to_path_buf(),
            cache_size,
            written,
            compacting: Arc::default(),
            opener: None,
        }
    }

    /// A store on other storage than a file: `opener` opens its database (now and at every
    /// reopen); `dir` stands for the file's folder (free space is read there).
    pub fn with_opener(opener: Opener, dir: &Path, cache_size: u64) -> Result<Store, StoreError> {
        let db = opener(None)?;
        let mut s = Store::new(db, &dir.join("tidepool.redb"), cache_size, Arc::default());
        s.opener = Some(opener);
        Ok(s)
    }

    /// What has been written to the file since it was first opened (across reopens).
    pub fn written(&self) -> &Arc<WriteCounter> {
        &self.written
    }

    /// The database for one read or write; [`StoreError::Reopening`] while it is being reopened.
    pub fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.slot.read().unwrap().clone().ok_or_else(|| {
            if self.compacting.load(std::sync::atomic::Ordering::Relaxed) {
                StoreError::Compacting
            } else {
                StoreError::Reopening
            }
        })
    }

    /// The watchdog's heartbeat, fed while a reopen waits or repairs.
    pub fn set_heartbeat(&self, hb: Arc<AtomicI64>) {
        *self.heartbeat.lock().unwrap() = Some(hb);
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the database out of the slot once every reader has let go of it (waiting up to
    /// 5 s); readers get [`StoreError::Reopening`] meanwhile. `Ok(None)`: the slot was empty.
    fn take(&self) -> Result<Option<Database>, StoreError> {
        let hb = self.heartbeat.lock().unwrap().clone();
        let old = self.slot.write().unwrap().take();
        let Some(mut old) = old else { return Ok(None) };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Arc::try_unwrap(old) {
                Ok(db) => return Ok(Some(db)),
                Err(still_shared) if Instant::now() < deadline => {
                    if let Some(hb) = &hb {
                        hb.store(crate::event::now_ms(), std::sync::atomic::Ordering::Relaxed);
                    }
                    old = still_shared;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(still_shared) => {
                    // A reader is stuck: put it back rather than leak the file lock.
                    *self.slot.write().unwrap() = Some(still_shared);
                    return Err(StoreError::Busy);
                }
            }
        }
    }

    /// Closes and reopens the file (waiting up to 5 s for readers to let go of the old one).
    /// Until it returns `Ok`, readers get [`StoreError::Reopening`]; on error the slot stays
    /// empty and a later call tries again.
    pub fn reopen(&self) -> Result<(), StoreError> {
        drop(self.take()?);
        let hb = self.heartbeat.lock().unwrap().clone();
        let db = match &self.opener {
            Some(open) => open(hb)?,
            None => super::schema::open_file_with(&self.path, self.cache_size, hb, &self.written)?,
        };
        *self.slot.write().unwrap() = Some(Arc::new(db));
        Ok(())
    }

    /// Compacts the file (redb moves live pages to the front and shortens the file), with
    /// readers held off meanwhile ([`StoreError::Compacting`]) and the watchdog's heartbeat
    /// fed. Returns the file's length before and after. After a failure the file is reopened
    /// (redb refuses every call after an I/O error).
    pub fn compact(&self) -> Result<(u64, u64), StoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        let before = self.file_len();
        self.compacting.store(true, Relaxed);
        let taken = self.take();
        let mut db = match taken {
            Ok(Some(db)) => db,
            Ok(None) => {
                self.compacting.store(false, Relaxed);
                return Err(StoreError::Reopening);
            }
            Err(e) => {
                self.compacting.store(false, Relaxed);
                return Err(e);
            }
        };
        let hb = self.heartbeat.lock().unwrap().clone();
        let done = std::sync::atomic::AtomicBool::new(false);
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Relaxed) {
                    if let Some(hb) = &hb {
                        hb.store(crate::event::now_ms(), Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
            let r = db.compact();
            done.store(true, Relaxed);
            r
        });
        *self.slot.write().unwrap() = Some(Arc::new(db));
        self.compacting.store(false, Relaxed);
        if let Err(e) = r {
            let _ = self.reopen();
            return Err(StoreError::Compact(e));
        }
        Ok((before, self.file_len()))
    }

    /// Bytes of the file's pages in use (what compaction can shrink it to, about).
    pub fn allocated_bytes(&self) -> Result<u64, StoreError> {
        let db = self.db()?;
        let txn = db.begin_write()?;
        let st = txn.stats()?;
        let bytes = st.allocated_pages() * st.page_size() as u64;
        txn.abort()?;
        Ok(bytes)
    }

    /// The file's length now.
    pub fn file_len(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}
