//! Disk faults without special hardware: a small tmpfs as a full disk, a ballast file that
//! fills it to the last byte. Tests run as root (`.ci/run` does); the mount is undone when
//! the guard is dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of a given size, mounted on a fresh folder for as long as this lives.
pub struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts `size` (as `mount -o size=`, e.g. `"6m"`).
    pub fn mount(size: &str) -> Tmpfs {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("disk");
        std::fs::create_dir(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "mounting a tmpfs failed: these tests need root (CI runs as root)"
        );
        Tmpfs {
            dir,
            _parent: parent,
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Fills what is left with a file `name`; returns its size.
    pub fn fill(&self, name: &str) -> u64 {
        use std::io::Write;
        let path = self.dir.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 4096];
        let mut n = 0u64;
        while f.write_all(&chunk).is_ok() {
            n += chunk.len() as u64;
        }
        // The last partial write may have left some bytes; what matters is that it is full.
        let _ = f.flush();
        n
    }

    /// Bytes available.
    pub fn available(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}
