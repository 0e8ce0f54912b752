//! The per-VM home disk: an empty, sparse ext4 image in the VM's work dir, attached as a
//! second virtio-blk device with the serial [`guest_proto::HOME_DISK_SERIAL`]. The guest
//! agent mounts it on `/home/user` instead of its default tmpfs.
//!
//! `mkfs.ext4` runs on the host (≈20 ms for any size: the image stays sparse, so only
//! what the guest writes takes host disk space): no journal (the disk dies with the VM),
//! no reserved blocks, the user (1000:1000) as the owner of the root directory, and lazy
//! inode-table initialisation (the guest mounts with `noinit_itable`).

use std::path::{Path, PathBuf};

use sandbox_core::{Error, PermanentCause, TransientCause};

/// File name of the home disk in the VM's work dir.
pub const FILE_NAME: &str = "home.ext4";

/// Owner of the home disk's root directory (the guest's user).
pub const OWNER: &str = "1000:1000";

/// The home disk of a VM whose work dir is `work_dir`.
pub fn path(work_dir: &Path) -> PathBuf {
    work_dir.join(FILE_NAME)
}

/// `mkfs.ext4` arguments (before the image path).
pub fn mkfs_args() -> Vec<String> {
    [
        "-q",
        "-F",
        "-m",
        "0",
        "-O",
        "^has_journal",
        "-L",
        guest_proto::HOME_DISK_SERIAL,
        "-E",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([format!(
        "root_owner={OWNER},lazy_itable_init=1,lazy_journal_init=1,nodiscard"
    )])
    .collect()
}

/// Finds `mkfs.ext4` (e2fsprogs): in `/usr/sbin` or `/sbin`, else on `PATH`.
pub fn find_mkfs() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = vec!["/usr/sbin".into(), "/sbin".into()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .map(|d| d.join("mkfs.ext4"))
        .find(|p| p.is_file())
}

/// Creates the sparse image at `path` (`size_mb` MB) and formats it.
pub async fn create(path: &Path, size_mb: u32) -> Result<(), Error> {
    let mkfs = find_mkfs().ok_or_else(|| {
        Error::permanent(
            PermanentCause::MissingDependency,
            "mkfs.ext4 not found: install e2fsprogs (needed for disk_mb homes)",
        )
    })?;
    let infra = |what: String| Error::transient(TransientCause::Infrastructure, what);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| infra(format!("cannot create {}: {e}", path.display())))?;
    file.set_len(u64::from(size_mb) * 1024 * 1024)
        .map_err(|e| infra(format!("cannot size {}: {e}", path.display())))?;
    drop(file);
    let out = tokio::process::Command::new(&mkfs)
        .args(mkfs_args())
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| infra(format!("cannot run {}: {e}", mkfs.display())))?;
    if !out.status.success() {
        return Err(infra(format!(
            "mkfs.ext4 {} failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn creates_a_sparse_ext4_image_owned_by_the_user() {
        if find_mkfs().is_none() {
            eprintln!("skipped: mkfs.ext4 (e2fsprogs) is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        create(&p, 512).await.unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.len(), 512 * 1024 * 1024);
        use std::os::unix::fs::MetadataExt;
        assert!(
            md.blocks() * 512 < 16 * 1024 * 1024,
            "not sparse: {} blocks",
            md.blocks()
        );
        // The ext4 superblock magic at 1024 + 0x38.
        let bytes = std::fs::read(&p)
            .map(|b| b[1024 + 0x38..1024 + 0x3a].to_vec())
            .unwrap();
        assert_eq!(bytes, [0x53, 0xef]);
        // An existing file is never overwritten.
        assert!(create(&p, 64).await.is_err());
        assert!(
            mkfs_args()
                .iter()
                .any(|a| a.contains("root_owner=1000:1000"))
        );
    }
}
