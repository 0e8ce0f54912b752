//! Filesystem adapter of sbx's [`sandbox_core::SnapshotStore`] port: L1 memory snapshots
//! (a guest RAM file and QEMU's device-state stream) kept safely on local disk.
//!
//! - **Layout** ([`layout`]): `<root>/<key>/{ram,state,manifest.json}`; drafts are written
//!   under `<root>/.draft-<key>-<pid>-<rand>/`, on the same filesystem. A draft's two files
//!   exist (empty, mode `0600`, owned by the store's user) when `begin` returns; a caller
//!   whose QEMU runs as another user grants it write access to them (as it does for VM
//!   dirs). Publication needs to own them again only to `chmod` them (root does).
//! - **One writer per key**: [`FsSnapshotStore::begin_blocking`] takes an exclusive `flock` on
//!   `<root>/.locks/<key>.lock` (close-on-exec, released when the draft is published,
//!   abandoned or dropped, and by the kernel when the process dies), so concurrent creators
//!   in one process or many make a snapshot once.
//! - **Atomic publication**: fsync both files, hash them, write the manifest (sizes,
//!   SHA-256s, key, creation info), make every file `0444`, fsync, and `rename` the draft
//!   directory into place. If the name is taken, the other writer's snapshot is used. Any
//!   I/O error (a full disk included) publishes nothing and removes the draft. A published
//!   RAM file is never written, truncated or reused as a draft again: clones map it.
//! - **Verified lookups**: the first lookup of a key in a process hashes both files against
//!   the manifest (bounded to [`sandbox_core::snapshot::MAX_MANIFEST_BYTES`], every field
//!   validated); later lookups re-check (device, inode, size, mtime, ctime) only. An entry that
//!   does not verify is moved aside, removed and logged at `warn`; the lookup says `None`.
//! - **Crash safety**: drafts of dead processes (`kill -9` during a save) are never read by
//!   lookups and are removed by [`FsSnapshotStore::sweep`] when a store opens.
//!
//! Errors are [`SnapshotStoreError`]; they map into [`sandbox_core::Error`] as transient
//! `Infrastructure` failures (I/O, an unusable save), permanent `Config` (bad root) or
//! permanent `Internal` (a draft from another store).

mod error;
pub mod layout;
mod store;

use std::path::PathBuf;

pub use error::SnapshotStoreError;
pub use store::{FsSnapshotStore, StoreStats};

/// The environment variable that overrides the snapshot root.
pub const SNAPSHOT_DIR_ENV: &str = "SBX_SNAPSHOT_DIR";

/// The default snapshot root: `$SBX_SNAPSHOT_DIR`, else `~/.cache/sbx/snapshots` (beside the
/// guest assets the keys are derived from, on persistent disk, so snapshots survive
/// reboots and the `sbx setup` ACLs on `~/.cache/sbx` already lead the QEMU user there).
pub fn default_root() -> PathBuf {
    if let Some(dir) = std::env::var_os(SNAPSHOT_DIR_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/sbx/snapshots")
}
