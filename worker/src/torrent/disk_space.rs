//! Room on the file store's disk: a shard's fetch is refused up front
//! when the bytes it still needs do not fit beside the space kept free
//! (`min_free_disk_mb`), instead of filling the disk and failing half-way.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A fetch that does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "needs {} MB more on disk, {} MB are free and {} MB are kept free (min_free_disk_mb)",
    mb(*need), mb(*free), mb(*keep)
)]
pub struct NoRoom {
    pub need: u64,
    pub free: u64,
    pub keep: u64,
}

fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1e6)
}

/// Whether `need` more bytes fit in `free` while `keep` stay free.
pub fn check(need: u64, free: u64, keep: u64) -> Result<(), NoRoom> {
    if need.saturating_add(keep) <= free {
        Ok(())
    } else {
        Err(NoRoom { need, free, keep })
    }
}

/// Bytes the file system holding `dir` has free for unprivileged writers.
pub fn available(dir: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Bytes already on disk of the resumable download of `hash` in the store
/// at `root` (the largest attempt's; its blocks, not its sparse length).
pub fn partial_bytes(root: &Path, hash: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir(root.join("partial")) else {
        return 0;
    };
    let prefix = format!("{hash}-");
    dir.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks().saturating_mul(512).min(m.len()))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_fits_only_with_the_kept_space_left() {
        assert_eq!(check(80, 100, 20), Ok(()));
        let e = check(80_600_000, 100_000_000, 30_000_000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "needs 80.6 MB more on disk, 100.0 MB are free and 30.0 MB are kept free (min_free_disk_mb)"
        );
        assert!(check(u64::MAX, 1, 0).is_err());
    }

    #[test]
    fn free_space_and_partial_bytes_are_read_from_the_disk() {
        let dir = std::env::temp_dir().join(format!("disk-space-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("partial")).unwrap();
        assert!(available(&dir).unwrap() > 0);
        assert_eq!(partial_bytes(&dir, "abc"), 0);
        // A sparse 1 MB part with 8 KiB written counts its written blocks.
        let f = std::fs::File::create(dir.join("partial/abc-0123.part")).unwrap();
        f.set_len(1 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 8192], 0).unwrap();
        f.sync_all().unwrap();
        let got = partial_bytes(&dir, "abc");
        assert!((8192..1 << 20).contains(&got), "{got}");
        assert_eq!(partial_bytes(&dir, "ab"), 0, "another hash");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
