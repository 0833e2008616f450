//! Free space on the store's filesystem, for `[buffer] min_free`.
//!
//! redb's file seldom shrinks, so `min_free` caps its growth: while the filesystem has less
//! than `min_free` available, the buffer counts as full at what it holds now, and new events
//! make room within the file (pages freed by deletions are reused) under `when_full`.

use std::path::Path;

use crate::config::MinFree;

/// (available to unprivileged users, total) bytes of the filesystem holding `path`.
pub fn fs_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let dir = if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(path)
    };
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((
        (st.f_bavail as u64).saturating_mul(frsize),
        (st.f_blocks as u64).saturating_mul(frsize),
    ))
}

/// Room a commit of `incoming` bytes may take on disk beyond its rows: redb's copy-on-write
/// pages, and the file growing by more than one page at a time.
pub fn commit_headroom(incoming: u64) -> u64 {
    incoming.saturating_mul(3) + (512 << 10)
}

/// Whether a commit of `incoming` bytes would take the filesystem below `min_free`: then the
/// buffer may not grow. `min_free` of 0 turns the check off.
pub fn below_min_free(path: &Path, min_free: MinFree, incoming: u64) -> bool {
    match fs_space(path) {
        Some((avail, total)) => {
            let keep = min_free.bytes(total);
            keep > 0 && avail < keep.saturating_add(commit_headroom(incoming))
        }
        None => false,
    }
}

/// Files smaller than this are never compacted: too little to win back.
pub const COMPACT_MIN_FILE: u64 = 32 << 20;
/// A file is compacted once it is this many times the size of its pages in use...
pub const COMPACT_RATIO: u64 = 4;
/// ...and those are at most this much, so a compaction writes little and is over quickly
/// (it holds the commit loop): it waits for the backlog to drain.
pub const COMPACT_MAX_LIVE: u64 = 16 << 20;

/// Whether the store file is worth compacting: after a backlog drained, the file keeps its
/// size (redb reuses freed pages but seldom shortens the file), so a card that held a day's
/// outage would stay full. Compaction moves the pages in use (`live`, redb's allocated
/// pages) to the front and shortens the file; it writes about what is live, so it is worth
/// it once the file is at least [`COMPACT_RATIO`] times that, at least [`COMPACT_MIN_FILE`],
/// and what is live is at most [`COMPACT_MAX_LIVE`]. `last_after`: the file's length after
/// the last compaction; a file that has not grown by a quarter since is left alone (it
/// could not shrink further then).
pub fn worth_compacting(file_len: u64, live: u64, last_after: Option<u64>) -> bool {
    file_len >= COMPACT_MIN_FILE
        && live <= COMPACT_MAX_LIVE
        && file_len >= live.saturating_mul(COMPACT_RATIO)
        && last_after.is_none_or(|a| file_len > a.saturating_add(a / 4))
}

#[cfg(test)]
mod tests {
    #[test]
    fn compaction_waits_for_a_big_mostly_empty_file() {
        use super::worth_compacting as w;
        assert!(!w(16 << 20, 0, None), "small files stay");
        assert!(
            w(512 << 20, 1 << 20, None),
            "a drained 512 MiB file shrinks"
        );
        assert!(
            !w(512 << 20, 100 << 20, None),
            "100 MiB live: wait for the drain"
        );
        assert!(w(64 << 20, 16 << 20, None), "64 MiB holding 16 MiB: 4x");
        assert!(
            !w(60 << 20, 16 << 20, None),
            "under 4x: not worth the writes"
        );
        assert!(
            !w(40 << 20, 1 << 20, Some(36 << 20)),
            "it could not shrink further"
        );
        assert!(
            w(50 << 20, 1 << 20, Some(36 << 20)),
            "it grew by a quarter since"
        );
        assert!(!w(1 << 40, u64::MAX, None), "no overflow");
    }

    use super::*;

    #[test]
    fn reads_this_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let (avail, total) = fs_space(dir.path()).unwrap();
        assert!(total > 0 && avail <= total);
        assert!(!below_min_free(dir.path(), MinFree::Bytes(0), 1 << 20));
        assert!(below_min_free(dir.path(), MinFree::Bytes(u64::MAX), 0));
        assert!(below_min_free(dir.path(), MinFree::Bytes(avail), 0));
    }
}
