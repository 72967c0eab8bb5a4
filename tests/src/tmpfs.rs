//! A small tmpfs mounted for a test (a disk that fills up), unmounted on
//! drop. Needs root, as CI has.

use std::path::PathBuf;

pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs at `path` with mount options `options` (`4m`,
    /// `64m,nr_inodes=5`: the size first).
    pub fn mount(path: PathBuf, options: &str) -> Tmpfs {
        std::fs::create_dir_all(&path).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={options}"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("mount");
        assert!(
            st.success(),
            "this test needs root to mount a small tmpfs (a full disk)"
        );
        Tmpfs(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}
