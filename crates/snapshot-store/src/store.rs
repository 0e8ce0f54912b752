//! [`FsSnapshotStore`]: the filesystem implementation of [`SnapshotStore`].

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sandbox_core::snapshot::{
    FileDigest, MAX_MANIFEST_BYTES, SNAPSHOT_MANIFEST_FORMAT, Sha256Digest,
};
use sandbox_core::{
    Snapshot, SnapshotDraft, SnapshotEntry, SnapshotKey, SnapshotManifest, SnapshotStore,
};

use crate::error::SnapshotStoreError;
use crate::layout::{
    self, KeyLock, LOCKS_DIR, MANIFEST_FILE, RAM_FILE, RootName, STATE_FILE, libc_o_nofollow,
};

type StoreResult<T> = Result<T, SnapshotStoreError>;

/// Mode of published files: read-only for everyone (the QEMU user must read the RAM file).
const PUBLISHED_FILE_MODE: u32 = 0o444;
/// Mode of entry and draft directories: readable and searchable by everyone, writable by
/// the store's owner only (so it can remove them).
const DIR_MODE: u32 = 0o755;
/// Mode of draft files before publication (the caller grants the QEMU user access).
const DRAFT_FILE_MODE: u32 = 0o600;

/// What identifies a file's content cheaply: if none of it changed since the file was
/// hashed, the file is taken as unchanged. (ctime too: unlike mtime it cannot be set back,
/// at the price of one more hash after a chmod or an ACL change.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

/// A snapshot this process hashed and found equal to its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verified {
    manifest: SnapshotManifest,
    ram: FileStamp,
    state: FileStamp,
}

/// Why an entry could not be used.
enum Check {
    /// The entry is broken: discard it.
    Corrupt(String),
    /// Reading failed for a reason that says nothing about the entry (EACCES, EMFILE, ...).
    Io(SnapshotStoreError),
}

impl Check {
    /// Missing files and ELOOP (a symlink where a file belongs) mean a broken entry; other
    /// I/O errors are reported without discarding anything.
    fn io(op: &'static str, path: &Path, err: std::io::Error) -> Self {
        let broken = err.kind() == std::io::ErrorKind::NotFound
            || err.kind() == std::io::ErrorKind::NotADirectory
            || err.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32);
        if broken {
            Self::Corrupt(format!("{op} {}: {err}", path.display()))
        } else {
            Self::Io(SnapshotStoreError::io(op, path, err))
        }
    }
}

/// Statistics of one store instance (for logs and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Full hashes of published files done by lookups (not counting publication).
    pub full_verifications: u64,
    /// Entries discarded because they did not verify.
    pub discarded: u64,
    /// Stale drafts and trash removed by sweeps.
    pub swept: u64,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    verified: Mutex<HashMap<SnapshotKey, Verified>>,
    verifying: Mutex<HashMap<SnapshotKey, Arc<Mutex<()>>>>,
    full_verifications: AtomicU64,
    discarded: AtomicU64,
    swept: AtomicU64,
}

/// L1 snapshots on the local filesystem.
///
/// Layout under the root (see [`crate::layout`]): `<key>/{ram,state,manifest.json}` for
/// published snapshots, `.draft-<key>-<pid>-<rand>/` for drafts, `.locks/<key>.lock` for
/// the per-key writer lock. Drafts and published entries share one filesystem, so
/// publication is one `rename` of a fully written, fsynced, read-only directory.
#[derive(Debug, Clone)]
pub struct FsSnapshotStore {
    inner: Arc<Inner>,
}

/// The adapter's draft guard: holds the key's lock and removes the draft when dropped
/// unless publication disarmed it.
#[derive(Debug)]
struct FsDraftGuard {
    root: PathBuf,
    dir: PathBuf,
    armed: bool,
    lock: Option<KeyLock>,
}

impl FsDraftGuard {
    /// Removes the draft directory (if still armed) and releases the lock.
    fn discard(&mut self) -> StoreResult<()> {
        let result = if self.armed {
            self.armed = false;
            remove_dir_if_exists(&self.dir)
                .map_err(|e| SnapshotStoreError::io("remove draft", &self.dir, e))
        } else {
            Ok(())
        };
        self.lock = None;
        result
    }
}

impl Drop for FsDraftGuard {
    fn drop(&mut self) {
        if self.armed {
            tracing::debug!(draft = %self.dir.display(), "snapshot draft dropped: abandoning it");
        }
        if let Err(err) = self.discard() {
            tracing::warn!(error = %err, "could not remove snapshot draft");
        }
    }
}

fn lock_poisoned<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Removes a directory tree, or a file or symlink standing where one was expected.
fn remove_dir_if_exists(dir: &Path) -> std::io::Result<()> {
    let result = match fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(dir),
        Ok(_) => fs::remove_file(dir),
        Err(err) => Err(err),
    };
    match result {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Opens a file for reading without following a symlink.
fn open_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_nofollow())
        .open(path)
}

/// Reads `file` to the end, returning its size and SHA-256.
fn hash_file(file: &mut File) -> std::io::Result<(u64, Sha256Digest)> {
    sandbox_core::snapshot::hash_reader(file)
}

/// Reads and parses a manifest, bounded, and checks it belongs to `key`.
fn read_manifest(path: &Path, key: &SnapshotKey) -> Result<SnapshotManifest, Check> {
    let file = open_nofollow(path).map_err(|e| Check::io("open manifest", path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| Check::io("stat manifest", path, e))?;
    if !meta.is_file() {
        return Err(Check::Corrupt("manifest is not a regular file".to_owned()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Check::io("read manifest", path, e))?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(Check::Corrupt(format!(
            "manifest is larger than {MAX_MANIFEST_BYTES} bytes"
        )));
    }
    let manifest: SnapshotManifest = serde_json::from_slice(&bytes)
        .map_err(|e| Check::Corrupt(format!("manifest does not parse: {e}")))?;
    manifest.validate(key).map_err(Check::Corrupt)?;
    Ok(manifest)
}

/// Stats a published file: a read-only regular file of the manifest's size.
fn stat_published(path: &Path, expected: &FileDigest) -> Result<fs::Metadata, Check> {
    let meta = fs::symlink_metadata(path).map_err(|e| Check::io("stat", path, e))?;
    if !meta.is_file() {
        return Err(Check::Corrupt(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    if meta.len() != expected.size {
        return Err(Check::Corrupt(format!(
            "{} has {} bytes, manifest says {}",
            path.display(),
            meta.len(),
            expected.size
        )));
    }
    if meta.permissions().mode() & 0o222 != 0 {
        return Err(Check::Corrupt(format!(
            "{} is writable (mode {:o})",
            path.display(),
            meta.permissions().mode() & 0o7777
        )));
    }
    Ok(meta)
}

/// Hashes a published file and compares it with the manifest. Returns the stamp of the
/// file as it was hashed.
fn verify_content(path: &Path, expected: &FileDigest) -> Result<FileStamp, Check> {
    let mut file = open_nofollow(path).map_err(|e| Check::io("open", path, e))?;
    let before = file.metadata().map_err(|e| Check::io("stat", path, e))?;
    let (size, digest) = hash_file(&mut file).map_err(|e| Check::io("read", path, e))?;
    if size != expected.size {
        return Err(Check::Corrupt(format!(
            "{} read {size} bytes, manifest says {}",
            path.display(),
            expected.size
        )));
    }
    if digest != expected.sha256 {
        return Err(Check::Corrupt(format!(
            "{} sha256 {digest} does not match the manifest's {}",
            path.display(),
            expected.sha256
        )));
    }
    let after = file.metadata().map_err(|e| Check::io("stat", path, e))?;
    let stamp = FileStamp::of(&before);
    if stamp != FileStamp::of(&after) {
        return Err(Check::Corrupt(format!(
            "{} changed while it was verified",
            path.display()
        )));
    }
    Ok(stamp)
}

/// Fsyncs, hashes and seals (0444) one draft file.
fn seal_draft_file(path: &Path) -> StoreResult<(FileDigest, FileStamp)> {
    let bad = |reason: String| SnapshotStoreError::BadDraftFile {
        path: path.to_owned(),
        reason,
    };
    let mut file = open_nofollow(path).map_err(|e| bad(format!("cannot open it: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| SnapshotStoreError::io("stat", path, e))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".to_owned()));
    }
    if meta.len() == 0 {
        return Err(bad("empty (the save wrote nothing)".to_owned()));
    }
    file.sync_all()
        .map_err(|e| SnapshotStoreError::io("fsync", path, e))?;
    let (size, sha256) =
        hash_file(&mut file).map_err(|e| SnapshotStoreError::io("read", path, e))?;
    if size != meta.len() {
        return Err(bad(format!(
            "changed while it was sealed ({} then {size} bytes)",
            meta.len()
        )));
    }
    file.set_permissions(fs::Permissions::from_mode(PUBLISHED_FILE_MODE))
        .map_err(|e| SnapshotStoreError::io("chmod", path, e))?;
    let sealed = file
        .metadata()
        .map_err(|e| SnapshotStoreError::io("stat", path, e))?;
    if sealed.len() != size
        || sealed.mtime() != meta.mtime()
        || sealed.mtime_nsec() != meta.mtime_nsec()
    {
        return Err(bad("changed while it was sealed".to_owned()));
    }
    Ok((FileDigest { size, sha256 }, FileStamp::of(&sealed)))
}

impl FsSnapshotStore {
    /// Opens (creating if needed) a store at `root`, and sweeps drafts left by processes
    /// that died and removals they did not finish.
    pub fn open(root: impl Into<PathBuf>) -> StoreResult<Self> {
        let root = root.into();
        if root.as_os_str().is_empty() {
            return Err(SnapshotStoreError::InvalidConfig(
                "snapshot root is empty".to_owned(),
            ));
        }
        let root =
            std::path::absolute(&root).map_err(|e| SnapshotStoreError::io("resolve", &root, e))?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&root)
            .map_err(|e| SnapshotStoreError::io("create dir", &root, e))?;
        let meta =
            fs::symlink_metadata(&root).map_err(|e| SnapshotStoreError::io("stat", &root, e))?;
        if !meta.is_dir() {
            return Err(SnapshotStoreError::InvalidConfig(format!(
                "snapshot root {} is not a directory",
                root.display()
            )));
        }
        let locks = root.join(LOCKS_DIR);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&locks)
            .map_err(|e| SnapshotStoreError::io("create dir", &locks, e))?;
        let store = Self {
            inner: Arc::new(Inner {
                root,
                verified: Mutex::new(HashMap::new()),
                verifying: Mutex::new(HashMap::new()),
                full_verifications: AtomicU64::new(0),
                discarded: AtomicU64::new(0),
                swept: AtomicU64::new(0),
            }),
        };
        let swept = store.sweep();
        if swept > 0 {
            tracing::info!(root = %store.root().display(), swept, "removed stale snapshot drafts");
        }
        Ok(store)
    }

    /// The store's root directory (absolute).
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// What this instance has done so far.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            full_verifications: self.inner.full_verifications.load(Ordering::Relaxed),
            discarded: self.inner.discarded.load(Ordering::Relaxed),
            swept: self.inner.swept.load(Ordering::Relaxed),
        }
    }

    /// Takes `key`'s writer lock without waiting (recreating the lock directory if
    /// someone removed it).
    fn lock_key(&self, key: &SnapshotKey) -> std::io::Result<Option<KeyLock>> {
        let path = layout::lock_path(&self.inner.root, key);
        match KeyLock::try_acquire(&path) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(DIR_MODE)
                    .create(self.inner.root.join(LOCKS_DIR))?;
                KeyLock::try_acquire(&path)
            }
            other => other,
        }
    }

    fn entry_dir(&self, key: &SnapshotKey) -> PathBuf {
        self.inner.root.join(key.to_string())
    }

    /// Removes drafts that no live writer holds (their process died, e.g. `kill -9` during
    /// a save) and unfinished removals of dead processes. Returns how many were removed.
    /// Runs at open; safe to run any time.
    pub fn sweep(&self) -> usize {
        let root = &self.inner.root;
        let Ok(entries) = fs::read_dir(root) else {
            return 0;
        };
        let mut swept = 0;
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let path = entry.path();
            let stale = match layout::classify(&name) {
                RootName::Draft { key, pid } => {
                    // A writer holds its key's lock from before its draft exists until
                    // after it is gone: a draft whose key is unlocked is stale; so is one
                    // whose pid is dead (another writer may hold the key by now).
                    !layout::pid_alive(pid) || matches!(self.lock_key(&key), Ok(Some(_)))
                }
                RootName::Trash { pid } => !layout::pid_alive(pid),
                _ => false,
            };
            if !stale {
                continue;
            }
            match remove_dir_if_exists(&path) {
                Ok(()) => {
                    swept += 1;
                    tracing::info!(dir = %path.display(), "removed stale snapshot draft");
                }
                Err(err) => {
                    tracing::warn!(dir = %path.display(), error = %err, "could not remove stale snapshot draft")
                }
            }
        }
        self.inner.swept.fetch_add(swept as u64, Ordering::Relaxed);
        swept
    }

    /// Moves an entry aside and removes it; `false` when there was none.
    fn remove_entry(&self, key: &SnapshotKey) -> StoreResult<bool> {
        lock_poisoned(&self.inner.verified).remove(key);
        let dir = self.entry_dir(key);
        let trash = self.inner.root.join(layout::trash_name(key));
        match fs::rename(&dir, &trash) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(err) => return Err(SnapshotStoreError::io("rename", &dir, err)),
        }
        remove_dir_if_exists(&trash).map_err(|e| SnapshotStoreError::io("remove", &trash, e))?;
        Ok(true)
    }

    /// Discards a broken entry, unless a writer holds its key (then it is only reported).
    fn discard(&self, key: &SnapshotKey, examined: FileStamp, reason: &str) {
        let dir = self.entry_dir(key);
        tracing::warn!(key = %key, dir = %dir.display(), reason, "discarding snapshot that does not verify");
        let lock = match self.lock_key(key) {
            Ok(Some(lock)) => lock,
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(key = %key, error = %err, "cannot lock snapshot key to discard it");
                return;
            }
        };
        // Only the entry that was examined: a fresh one published since stays.
        let current = fs::symlink_metadata(&dir).ok().map(|m| FileStamp::of(&m));
        if current.map(|s| (s.dev, s.ino)) != Some((examined.dev, examined.ino)) {
            return;
        }
        match self.remove_entry(key) {
            Ok(_) => {
                self.inner.discarded.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => tracing::warn!(key = %key, error = %err, "could not discard snapshot"),
        }
        drop(lock);
    }

    /// Checks a published entry against its manifest: cheaply when this process already
    /// hashed these very files, by hashing them otherwise.
    fn check_entry(&self, key: &SnapshotKey, dir: &Path) -> Result<Snapshot, Check> {
        let meta = fs::symlink_metadata(dir).map_err(|e| Check::io("stat", dir, e))?;
        if !meta.is_dir() {
            return Err(Check::Corrupt("entry is not a directory".to_owned()));
        }
        let manifest = read_manifest(&dir.join(MANIFEST_FILE), key)?;
        let ram_path = dir.join(RAM_FILE);
        let state_path = dir.join(STATE_FILE);
        let ram_meta = stat_published(&ram_path, &manifest.ram)?;
        let state_meta = stat_published(&state_path, &manifest.state)?;
        let snapshot = Snapshot {
            key: *key,
            ram: ram_path.clone(),
            state: state_path.clone(),
            manifest: manifest.clone(),
        };
        let fresh = Verified {
            manifest: manifest.clone(),
            ram: FileStamp::of(&ram_meta),
            state: FileStamp::of(&state_meta),
        };
        if lock_poisoned(&self.inner.verified).get(key) == Some(&fresh) {
            return Ok(snapshot);
        }
        self.inner
            .full_verifications
            .fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let ram = verify_content(&ram_path, &manifest.ram)?;
        let state = verify_content(&state_path, &manifest.state)?;
        tracing::debug!(
            key = %key,
            bytes = manifest.ram.size + manifest.state.size,
            ms = started.elapsed().as_millis() as u64,
            "snapshot verified"
        );
        lock_poisoned(&self.inner.verified).insert(
            *key,
            Verified {
                manifest,
                ram,
                state,
            },
        );
        Ok(snapshot)
    }

    /// [`SnapshotStore::lookup`], blocking.
    pub fn lookup_blocking(&self, key: &SnapshotKey) -> StoreResult<Option<Snapshot>> {
        let dir = self.entry_dir(key);
        let examined = match fs::symlink_metadata(&dir) {
            Ok(meta) => FileStamp::of(&meta),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(SnapshotStoreError::io("stat", &dir, err)),
        };
        // One verification per key at a time in this process: a second lookup waits and
        // then takes the cheap path.
        let gate = lock_poisoned(&self.inner.verifying)
            .entry(*key)
            .or_default()
            .clone();
        let _gate = lock_poisoned(&gate);
        match self.check_entry(key, &dir) {
            Ok(snapshot) => Ok(Some(snapshot)),
            Err(Check::Corrupt(reason)) => {
                lock_poisoned(&self.inner.verified).remove(key);
                self.discard(key, examined, &reason);
                Ok(None)
            }
            Err(Check::Io(err)) => Err(err),
        }
    }

    /// [`SnapshotStore::begin`], blocking.
    pub fn begin_blocking(&self, key: &SnapshotKey) -> StoreResult<Option<SnapshotDraft>> {
        let root = &self.inner.root;
        let published = |dir: &Path| match fs::symlink_metadata(dir) {
            Ok(_) => Ok(true),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(SnapshotStoreError::io("stat", dir, err)),
        };
        let dir = self.entry_dir(key);
        if published(&dir)? {
            return Ok(None);
        }
        let Some(lock) = self
            .lock_key(key)
            .map_err(|e| SnapshotStoreError::io("lock", layout::lock_path(root, key), e))?
        else {
            return Ok(None);
        };
        // Someone may have published between the first check and the lock.
        if published(&dir)? {
            return Ok(None);
        }
        self.remove_stale_drafts_of(key);
        let draft_dir = root.join(layout::draft_name(key));
        let mut guard = FsDraftGuard {
            root: root.clone(),
            dir: draft_dir.clone(),
            armed: false,
            lock: Some(lock),
        };
        fs::DirBuilder::new()
            .mode(DIR_MODE)
            .create(&draft_dir)
            .map_err(|e| SnapshotStoreError::io("create draft", &draft_dir, e))?;
        guard.armed = true;
        let ram = draft_dir.join(RAM_FILE);
        let state = draft_dir.join(STATE_FILE);
        for path in [&ram, &state] {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(DRAFT_FILE_MODE)
                .open(path)
                .map_err(|e| SnapshotStoreError::io("create draft file", path, e))?;
        }
        tracing::debug!(key = %key, draft = %draft_dir.display(), "snapshot draft started");
        Ok(Some(SnapshotDraft::new(*key, ram, state, guard)))
    }

    /// Removes every draft of `key` (called with the key's lock held: none is live).
    fn remove_stale_drafts_of(&self, key: &SnapshotKey) {
        let Ok(entries) = fs::read_dir(&self.inner.root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if let Some(RootName::Draft { key: k, .. }) = name.to_str().map(layout::classify)
                && &k == key
            {
                let path = entry.path();
                match remove_dir_if_exists(&path) {
                    Ok(()) => {
                        self.inner.swept.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(dir = %path.display(), "removed stale snapshot draft");
                    }
                    Err(err) => {
                        tracing::warn!(dir = %path.display(), error = %err, "could not remove stale snapshot draft")
                    }
                }
            }
        }
    }

    fn take_guard(&self, draft: SnapshotDraft) -> StoreResult<(SnapshotKey, Box<FsDraftGuard>)> {
        let key = *draft.key();
        let guard = draft.into_guard().downcast::<FsDraftGuard>().map_err(|_| {
            SnapshotStoreError::ForeignDraft {
                key: key.to_string(),
            }
        })?;
        if guard.root != self.inner.root {
            return Err(SnapshotStoreError::ForeignDraft {
                key: key.to_string(),
            });
        }
        Ok((key, guard))
    }

    /// [`SnapshotStore::publish`], blocking. On error the draft is removed (by its guard).
    pub fn publish_blocking(&self, draft: SnapshotDraft) -> StoreResult<Snapshot> {
        let (key, mut guard) = self.take_guard(draft)?;
        let result = self.publish_guarded(&key, &mut guard);
        if let Err(err) = &result {
            tracing::warn!(key = %key, error = %err, "snapshot not published");
        }
        // Drops the guard: removes what is left of the draft and releases the key.
        drop(guard);
        result
    }

    fn publish_guarded(
        &self,
        key: &SnapshotKey,
        guard: &mut FsDraftGuard,
    ) -> StoreResult<Snapshot> {
        let draft_dir = guard.dir.clone();
        let (ram, ram_stamp) = seal_draft_file(&draft_dir.join(RAM_FILE))?;
        let (state, state_stamp) = seal_draft_file(&draft_dir.join(STATE_FILE))?;
        let manifest = SnapshotManifest {
            format: SNAPSHOT_MANIFEST_FORMAT,
            key: *key,
            ram,
            state,
            created_unix_ms: now_unix_ms(),
            created_by: format!(
                "{} {} pid {}",
                env!("CARGO_PKG_NAME"),
                env!("CARGO_PKG_VERSION"),
                std::process::id()
            ),
        };
        manifest
            .validate(key)
            .map_err(|reason| SnapshotStoreError::BadDraftFile {
                path: draft_dir.clone(),
                reason,
            })?;
        let mut json = serde_json::to_vec_pretty(&manifest).map_err(|e| {
            SnapshotStoreError::io(
                "encode manifest",
                &draft_dir,
                std::io::Error::other(e.to_string()),
            )
        })?;
        json.push(b'\n');
        let manifest_path = draft_dir.join(MANIFEST_FILE);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(PUBLISHED_FILE_MODE)
            .custom_flags(libc_o_nofollow())
            .open(&manifest_path)
            .map_err(|e| SnapshotStoreError::io("create manifest", &manifest_path, e))?;
        file.write_all(&json)
            .and_then(|()| file.sync_all())
            .map_err(|e| SnapshotStoreError::io("write manifest", &manifest_path, e))?;
        drop(file);
        fs::set_permissions(&draft_dir, fs::Permissions::from_mode(DIR_MODE))
            .map_err(|e| SnapshotStoreError::io("chmod", &draft_dir, e))?;
        fsync_dir(&draft_dir).map_err(|e| SnapshotStoreError::io("fsync", &draft_dir, e))?;

        let final_dir = self.entry_dir(key);
        for _ in 0..3 {
            match fs::rename(&draft_dir, &final_dir) {
                Ok(()) => {
                    guard.armed = false;
                    fsync_dir(&self.inner.root)
                        .map_err(|e| SnapshotStoreError::io("fsync", &self.inner.root, e))?;
                    lock_poisoned(&self.inner.verified).insert(
                        *key,
                        Verified {
                            manifest: manifest.clone(),
                            ram: ram_stamp,
                            state: state_stamp,
                        },
                    );
                    tracing::info!(
                        key = %key,
                        dir = %final_dir.display(),
                        ram_bytes = manifest.ram.size,
                        state_bytes = manifest.state.size,
                        "snapshot published"
                    );
                    return Ok(Snapshot {
                        key: *key,
                        ram: final_dir.join(RAM_FILE),
                        state: final_dir.join(STATE_FILE),
                        manifest,
                    });
                }
                Err(err)
                    if err.kind() == std::io::ErrorKind::DirectoryNotEmpty
                        || err.kind() == std::io::ErrorKind::AlreadyExists
                        || err.kind() == std::io::ErrorKind::NotADirectory =>
                {
                    // Someone else published first: theirs wins if it verifies. We hold
                    // the key's lock, so a broken one is removed here and we try again.
                    match self.check_entry(key, &final_dir) {
                        Ok(theirs) => {
                            tracing::info!(key = %key, "snapshot was published by another writer; using theirs");
                            return Ok(theirs);
                        }
                        Err(Check::Corrupt(reason)) => {
                            tracing::warn!(key = %key, reason, "discarding snapshot that does not verify");
                            self.remove_entry(key)?;
                            self.inner.discarded.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(Check::Io(err)) => return Err(err),
                    }
                }
                Err(err) => return Err(SnapshotStoreError::io("rename", &draft_dir, err)),
            }
        }
        Err(SnapshotStoreError::LostRace {
            key: key.to_string(),
        })
    }

    /// [`SnapshotStore::abandon`], blocking.
    pub fn abandon_blocking(&self, draft: SnapshotDraft) -> StoreResult<()> {
        let (_, mut guard) = self.take_guard(draft)?;
        guard.discard()
    }

    /// [`SnapshotStore::remove`], blocking.
    pub fn remove_blocking(&self, key: &SnapshotKey) -> StoreResult<bool> {
        let removed = self.remove_entry(key)?;
        if removed {
            tracing::info!(key = %key, "snapshot removed");
        }
        Ok(removed)
    }

    fn published_keys(&self) -> StoreResult<Vec<SnapshotKey>> {
        let root = &self.inner.root;
        let entries = fs::read_dir(root).map_err(|e| SnapshotStoreError::io("list", root, e))?;
        let mut keys = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| SnapshotStoreError::io("list", root, e))?;
            if let Some(RootName::Published(key)) = entry.file_name().to_str().map(layout::classify)
            {
                keys.push(key);
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// [`SnapshotStore::list`], blocking.
    pub fn list_blocking(&self) -> StoreResult<Vec<SnapshotEntry>> {
        Ok(self
            .published_keys()?
            .into_iter()
            .map(|key| {
                let manifest = read_manifest(&self.entry_dir(&key).join(MANIFEST_FILE), &key).ok();
                SnapshotEntry { key, manifest }
            })
            .collect())
    }

    /// [`SnapshotStore::clear`], blocking: every published entry, stale drafts, and the
    /// lock files nobody holds.
    pub fn clear_blocking(&self) -> StoreResult<usize> {
        let mut removed = 0;
        for key in self.published_keys()? {
            if self.remove_entry(&key)? {
                removed += 1;
            }
        }
        self.sweep();
        let locks = self.inner.root.join(LOCKS_DIR);
        if let Ok(entries) = fs::read_dir(&locks) {
            for entry in entries.flatten() {
                if let Ok(Some(lock)) = KeyLock::try_acquire(&entry.path())
                    && let Err(err) = lock.remove_file()
                {
                    tracing::warn!(path = %entry.path().display(), error = %err, "could not remove lock file");
                }
            }
        }
        lock_poisoned(&self.inner.verified).clear();
        tracing::info!(root = %self.inner.root.display(), removed, "snapshots cleared");
        Ok(removed)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Self) -> StoreResult<T> + Send + 'static,
    ) -> sandbox_core::Result<T> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || op(&store))
            .await
            .map_err(|e| SnapshotStoreError::Task(e.to_string()))?
            .map_err(Into::into)
    }
}

#[async_trait]
impl SnapshotStore for FsSnapshotStore {
    async fn lookup(&self, key: &SnapshotKey) -> sandbox_core::Result<Option<Snapshot>> {
        let key = *key;
        self.blocking(move |s| s.lookup_blocking(&key)).await
    }

    async fn begin(&self, key: &SnapshotKey) -> sandbox_core::Result<Option<SnapshotDraft>> {
        let key = *key;
        self.blocking(move |s| s.begin_blocking(&key)).await
    }

    async fn publish(&self, draft: SnapshotDraft) -> sandbox_core::Result<Snapshot> {
        self.blocking(move |s| s.publish_blocking(draft)).await
    }

    async fn abandon(&self, draft: SnapshotDraft) -> sandbox_core::Result<()> {
        self.blocking(move |s| s.abandon_blocking(draft)).await
    }

    async fn remove(&self, key: &SnapshotKey) -> sandbox_core::Result<bool> {
        let key = *key;
        self.blocking(move |s| s.remove_blocking(&key)).await
    }

    async fn list(&self) -> sandbox_core::Result<Vec<SnapshotEntry>> {
        self.blocking(|s| s.list_blocking()).await
    }

    async fn clear(&self) -> sandbox_core::Result<usize> {
        self.blocking(|s| s.clear_blocking()).await
    }
}
