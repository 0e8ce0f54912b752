//! Names under the store's root and the per-key lock.
//!
//! ```text
//! <root>/<key>/{ram,state,manifest.json}            published (dir 0755, files 0444)
//! <root>/.draft-<key>-<pid>-<rand>/{ram,state}      a draft being written
//! <root>/.trash-<key>-<pid>-<rand>/                 an entry being removed
//! <root>/.locks/<key>.lock                          flock per key (one writer)
//! ```

use std::fs::File;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use sandbox_core::SnapshotKey;

/// The RAM file's name inside an entry.
pub const RAM_FILE: &str = "ram";
/// The device-state file's name inside an entry.
pub const STATE_FILE: &str = "state";
/// The manifest's name inside an entry.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The directory of per-key lock files.
pub const LOCKS_DIR: &str = ".locks";
/// Prefix of draft directories.
pub const DRAFT_PREFIX: &str = ".draft-";
/// Prefix of directories being removed.
pub const TRASH_PREFIX: &str = ".trash-";

/// What a name directly under the root is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootName {
    /// A published entry.
    Published(SnapshotKey),
    /// A draft of `key` made by `pid`.
    Draft {
        /// The key being written.
        key: SnapshotKey,
        /// The writer's pid.
        pid: i32,
    },
    /// An entry being removed by `pid`.
    Trash {
        /// The removing process.
        pid: i32,
    },
    /// The lock directory.
    Locks,
    /// Anything else (left alone).
    Other,
}

/// A fresh random suffix for draft and trash names.
fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// `.draft-<key>-<pid>-<rand>`, unique per call.
pub fn draft_name(key: &SnapshotKey) -> String {
    format!("{DRAFT_PREFIX}{key}-{}-{}", std::process::id(), suffix())
}

/// `.trash-<key>-<pid>-<rand>`, unique per call.
pub fn trash_name(key: &SnapshotKey) -> String {
    format!("{TRASH_PREFIX}{key}-{}-{}", std::process::id(), suffix())
}

/// Parses `<key>-<pid>-<rand>` strictly.
fn parse_tagged(rest: &str) -> Option<(SnapshotKey, i32)> {
    let key = SnapshotKey::parse(rest.get(..64)?).ok()?;
    let rest = rest.get(64..)?.strip_prefix('-')?;
    let (pid, rand) = rest.split_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if rand.is_empty() || !rand.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let pid: i32 = pid.parse().ok()?;
    (pid > 0).then_some((key, pid))
}

/// Classifies a name directly under the root.
pub fn classify(name: &str) -> RootName {
    if name == LOCKS_DIR {
        return RootName::Locks;
    }
    if let Some(rest) = name.strip_prefix(DRAFT_PREFIX) {
        return parse_tagged(rest)
            .map_or(RootName::Other, |(key, pid)| RootName::Draft { key, pid });
    }
    if let Some(rest) = name.strip_prefix(TRASH_PREFIX) {
        return parse_tagged(rest).map_or(RootName::Other, |(_, pid)| RootName::Trash { pid });
    }
    SnapshotKey::parse(name).map_or(RootName::Other, RootName::Published)
}

/// The lock file of `key`.
pub fn lock_path(root: &Path, key: &SnapshotKey) -> PathBuf {
    root.join(LOCKS_DIR).join(format!("{key}.lock"))
}

/// True when a process with this pid exists.
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(Errno::ESRCH) => false,
        Err(_) => true,
    }
}

/// An exclusive flock on a key's lock file. It is released when dropped, and by the kernel
/// when the process dies. The file is opened close-on-exec, so children (QEMU) never
/// inherit it.
#[derive(Debug)]
pub struct KeyLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl KeyLock {
    /// Takes the lock of `path` without waiting: `Ok(None)` when another open file
    /// description (this process or another) holds it.
    ///
    /// Lock files may be removed by `clear` while nobody holds them, so after locking the
    /// lock is kept only if the path still names the locked inode; otherwise it retries.
    pub fn try_acquire(path: &Path) -> std::io::Result<Option<Self>> {
        for _ in 0..8 {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .custom_flags(libc_o_nofollow())
                .open(path)?;
            let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
                Err((_, errno)) => return Err(errno.into()),
            };
            let held = lock.metadata()?;
            match std::fs::symlink_metadata(path) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                    return Ok(Some(Self {
                        _lock: lock,
                        path: path.to_owned(),
                    }));
                }
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            "lock file keeps being replaced",
        ))
    }

    /// Removes the lock file while holding the lock (others retry on a fresh inode).
    pub fn remove_file(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        }
    }
}

/// `O_NOFOLLOW`: a lock or entry file that is a symlink is refused.
pub fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SnapshotKey {
        SnapshotKey::from_bytes([0xab; 32])
    }

    #[test]
    fn names_round_trip_strictly() {
        let k = key();
        let pid = std::process::id() as i32;
        assert_eq!(classify(&draft_name(&k)), RootName::Draft { key: k, pid });
        assert_eq!(classify(&trash_name(&k)), RootName::Trash { pid });
        assert_eq!(classify(&k.to_string()), RootName::Published(k));
        assert_eq!(classify(LOCKS_DIR), RootName::Locks);
        for other in [
            "",
            "x",
            ".draft-",
            &format!(".draft-{k}"),
            &format!(".draft-{k}-12"),
            &format!(".draft-{k}-12-"),
            &format!(".draft-{k}--ab"),
            &format!(".draft-{k}-0-ab"),
            &format!(".draft-{k}-99999999999-ab"),
            &format!(".draft-{k}-12-a/b"),
            &format!(".draft-{}-12-ab", k.to_string().to_uppercase()),
            &k.to_string().to_uppercase(),
            &format!("{k}.tmp"),
        ] {
            assert_eq!(classify(other), RootName::Other, "{other:?}");
        }
    }

    #[test]
    fn a_held_lock_excludes_a_second_open_in_this_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lock");
        let first = KeyLock::try_acquire(&path).unwrap();
        assert!(first.is_some());
        assert!(KeyLock::try_acquire(&path).unwrap().is_none());
        drop(first);
        let again = KeyLock::try_acquire(&path).unwrap().unwrap();
        // Removing the file while held: a newcomer locks a fresh inode, and the old holder
        // is no longer the lock of that path.
        again.remove_file().unwrap();
        assert!(KeyLock::try_acquire(&path).unwrap().is_some());
    }

    #[test]
    fn dead_pids_are_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(!pid_alive(pid));
        assert!(pid_alive(std::process::id() as i32));
        assert!(!pid_alive(0));
    }
}
