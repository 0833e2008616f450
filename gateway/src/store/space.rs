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

/// Whether the filesystem is below `min_free`: the buffer may not grow now.
pub fn below_min_free(path: &Path, min_free: MinFree) -> bool {
    match fs_space(path) {
        Some((avail, total)) => avail < min_free.bytes(total),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let (avail, total) = fs_space(dir.path()).unwrap();
        assert!(total > 0 && avail <= total);
        assert!(!below_min_free(dir.path(), MinFree::Bytes(0)));
        assert!(below_min_free(dir.path(), MinFree::Bytes(u64::MAX)));
    }
}
