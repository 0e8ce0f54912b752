//! The overlay pool: pre-created overlays per base image, handed out by rename.

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sandbox_core::ports::{Overlay, OverlayStore};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinHandle;

use crate::error::OverlayError;
use crate::qemu_img::{OverlayOptions, create_overlay_resolved, remove_quietly, resolve_base};

/// Prefix of pool directories: `sbx-overlay-pool-<pid>` (or `...-<pid>-<n>` for the n-th
/// pool of one process).
pub const POOL_DIR_PREFIX: &str = "sbx-overlay-pool-";

/// Counts pools created in this process, so that two pools never share a directory.
static POOL_INSTANCES: AtomicU64 = AtomicU64::new(0);
/// Names overlays placed in work dirs, unique within the process.
static OVERLAY_SEQ: AtomicU64 = AtomicU64::new(0);

/// Configuration of an [`OverlayPool`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// How overlays are created.
    pub options: OverlayOptions,
    /// Where the pool directory is made; `None` means the system temp dir. For hand-out by
    /// rename, put it on the same file system as the VM work dirs.
    pub pool_root: Option<PathBuf>,
    /// Pre-created overlays kept per base image; 0 disables the pool (every overlay is
    /// created on demand).
    pub size_per_base: usize,
    /// Overlays created at once by one base's refill (at most this many per round).
    pub refill_batch: usize,
    /// `qemu-img` processes the refills of all bases may run at once.
    pub max_concurrent_creates: usize,
    /// How long [`OverlayPool::shutdown`] waits for in-flight refills before aborting them.
    pub shutdown_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            options: OverlayOptions::default(),
            pool_root: None,
            size_per_base: 4,
            refill_batch: 4,
            max_concurrent_creates: 4,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters of an [`OverlayPool`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Acquires served from the pool by rename.
    pub hits: u64,
    /// Acquires that created their overlay on demand.
    pub misses: u64,
    /// Pooled overlays that could not be renamed into the work dir (another file system).
    pub cross_device: u64,
    /// Overlays created by `qemu-img` (pool refills and on-demand).
    pub created: u64,
    /// Failed `qemu-img` runs.
    pub create_failures: u64,
    /// Duration of the last successful `qemu-img create`.
    pub last_create: Option<Duration>,
    /// Sum of the durations of all successful `qemu-img create` runs.
    pub total_create: Duration,
}

impl PoolStats {
    /// Mean duration of a successful `qemu-img create`.
    pub fn mean_create(&self) -> Option<Duration> {
        let n = u32::try_from(self.created).ok().filter(|n| *n > 0)?;
        Some(self.total_create / n)
    }

    fn record_create(&mut self, elapsed: Duration) {
        self.created += 1;
        self.last_create = Some(elapsed);
        self.total_create += elapsed;
    }
}

/// An [`OverlayStore`] of qcow2 overlays that keeps, per base image, a few overlays created
/// ahead of time in a private pool directory and hands them out by `rename`.
///
/// - `acquire` renames a pooled overlay into the work dir (well under a millisecond), or
///   creates one with `qemu-img` when the pool is empty, disabled, shut down, or on another
///   file system than the work dir.
/// - After each take, a background task per base refills the pool (a bounded batch at a
///   time, with a process-wide bound on concurrent `qemu-img` runs).
/// - At construction, pool directories of dead processes are reaped.
/// - [`OverlayPool::shutdown`] (or drop) deletes the pool directory with every pooled
///   overlay; refills that finish afterwards delete their own output.
///
/// Needs a tokio runtime (with the `process` driver) for `acquire`.
#[derive(Debug)]
pub struct OverlayPool {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: PoolConfig,
    pool_dir: PathBuf,
    state: Mutex<State>,
    shutdown_tx: watch::Sender<bool>,
    create_permits: Semaphore,
    seq: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    closed: bool,
    dir_removed: bool,
    bases: HashMap<PathBuf, BasePool>,
    tasks: Vec<JoinHandle<()>>,
    stats: PoolStats,
}

#[derive(Debug, Default)]
struct BasePool {
    ready: VecDeque<PathBuf>,
    in_flight: usize,
    wake: Arc<Notify>,
}

impl OverlayPool {
    /// Makes the pool directory (0700) under the pool root and reaps the pool directories of
    /// dead processes there. Refills start lazily, at the first acquire of each base (or at
    /// [`OverlayPool::prewarm`]).
    pub fn new(config: PoolConfig) -> Result<Self, OverlayError> {
        config.options.validate()?;
        if config.size_per_base > 0
            && (config.refill_batch == 0 || config.max_concurrent_creates == 0)
        {
            return Err(OverlayError::InvalidConfig(
                "refill_batch and max_concurrent_creates must be at least 1".to_owned(),
            ));
        }
        let root = config.pool_root.clone().unwrap_or_else(std::env::temp_dir);
        let root = std::path::absolute(&root).map_err(|e| OverlayError::io("resolve", &root, e))?;
        std::fs::create_dir_all(&root).map_err(|e| OverlayError::io("create dir", &root, e))?;

        let pid = std::process::id();
        let instance = POOL_INSTANCES.fetch_add(1, Ordering::Relaxed);
        let name = if instance == 0 {
            format!("{POOL_DIR_PREFIX}{pid}")
        } else {
            format!("{POOL_DIR_PREFIX}{pid}-{instance}")
        };
        let pool_dir = root.join(name);
        make_private_dir(&pool_dir)?;
        let reaped = reap_stale_pool_dirs(&root, nix::unistd::geteuid().as_raw());
        tracing::info!(
            pool_dir = %pool_dir.display(),
            size_per_base = config.size_per_base,
            reaped,
            "overlay pool ready"
        );

        let (shutdown_tx, _) = watch::channel(false);
        let permits = config.max_concurrent_creates.max(1);
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                pool_dir,
                state: Mutex::new(State::default()),
                shutdown_tx,
                create_permits: Semaphore::new(permits),
                seq: AtomicU64::new(0),
            }),
        })
    }

    /// The pool's own directory.
    pub fn pool_dir(&self) -> &Path {
        &self.shared.pool_dir
    }

    /// The pool's configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PoolStats {
        self.shared.lock().stats
    }

    /// Overlays ready for `base` right now (0 for an unknown or missing base).
    pub fn pooled(&self, base: &Path) -> usize {
        let Ok(base) = resolve_base(base) else {
            return 0;
        };
        self.shared
            .lock()
            .bases
            .get(&base)
            .map_or(0, |b| b.ready.len())
    }

    /// Starts filling the pool of `base` in the background without taking anything.
    pub async fn prewarm(&self, base: &Path) -> Result<(), OverlayError> {
        let base = resolve_base(base)?;
        let mut st = self.shared.lock();
        Shared::ensure_base(&self.shared, &mut st, &base);
        Ok(())
    }

    /// Waits until the pool of `base` holds `size_per_base` overlays, polling; false on
    /// timeout (or when the pool is disabled or shut down).
    pub async fn wait_until_full(&self, base: &Path, timeout: Duration) -> bool {
        let want = self.shared.config.size_per_base;
        if want == 0 {
            return false;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if self.shared.lock().closed {
                return false;
            }
            if self.pooled(base) >= want {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the refills (waiting up to `shutdown_timeout` for in-flight `qemu-img` runs,
    /// then aborting them) and removes the pool directory with every pooled overlay.
    /// Overlays already handed out are untouched. Idempotent; later acquires create on
    /// demand.
    pub async fn shutdown(&self) {
        let tasks = self.shared.close();
        for mut task in tasks {
            if tokio::time::timeout(self.shared.config.shutdown_timeout, &mut task)
                .await
                .is_err()
            {
                tracing::warn!("overlay refill did not stop in time; aborting it");
                task.abort();
                let _ = task.await;
            }
        }
        self.shared.remove_dir();
    }

    async fn acquire_overlay(&self, base: &Path, work_dir: &Path) -> Result<Overlay, OverlayError> {
        let started = Instant::now();
        let base = resolve_base(base)?;
        let seq = OVERLAY_SEQ.fetch_add(1, Ordering::Relaxed);
        let target = work_dir.join(format!("overlay-{seq}.qcow2"));

        if let Some(pooled) = self.shared.take(&base) {
            match std::fs::rename(&pooled, &target) {
                Ok(()) => {
                    self.shared.lock().stats.hits += 1;
                    tracing::debug!(
                        overlay = %target.display(),
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "overlay taken from pool"
                    );
                    return Ok(Overlay { path: target });
                }
                Err(err) => {
                    remove_quietly(&pooled);
                    let cross = err.kind() == std::io::ErrorKind::CrossesDevices;
                    if cross {
                        self.shared.lock().stats.cross_device += 1;
                    }
                    tracing::warn!(
                        from = %pooled.display(),
                        to = %target.display(),
                        error = %err,
                        cross_device = cross,
                        "pooled overlay could not be moved; creating on demand \
                         (put the pool root on the work dirs' file system)"
                    );
                }
            }
        }

        let result = create_overlay_resolved(&self.shared.config.options, &base, &target).await;
        let mut st = self.shared.lock();
        st.stats.misses += 1;
        match result {
            Ok(elapsed) => {
                st.stats.record_create(elapsed);
                drop(st);
                tracing::debug!(
                    overlay = %target.display(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "overlay created on demand"
                );
                Ok(Overlay { path: target })
            }
            Err(err) => {
                st.stats.create_failures += 1;
                Err(err)
            }
        }
    }
}

#[async_trait]
impl OverlayStore for OverlayPool {
    async fn acquire(&self, base: &Path, work_dir: &Path) -> sandbox_core::Result<Overlay> {
        Ok(self.acquire_overlay(base, work_dir).await?)
    }

    async fn release(&self, overlay: &Overlay) -> sandbox_core::Result<()> {
        Ok(release_overlay(overlay)?)
    }
}

/// Deletes an overlay file; a missing file is fine.
pub fn release_overlay(overlay: &Overlay) -> Result<(), OverlayError> {
    match std::fs::remove_file(&overlay.path) {
        Ok(()) => {
            tracing::debug!(overlay = %overlay.path.display(), "overlay released");
            Ok(())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(OverlayError::io("remove", &overlay.path, err)),
    }
}

impl Drop for OverlayPool {
    fn drop(&mut self) {
        let tasks = self.shared.close();
        for task in tasks {
            // Dropping a refill kills its qemu-img (kill_on_drop); a refill that completes
            // concurrently sees `closed` and deletes its own output.
            task.abort();
        }
        self.shared.remove_dir();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `base` and starts its refill task if needed.
    fn ensure_base(this: &Arc<Self>, st: &mut State, base: &Path) {
        if st.closed || this.config.size_per_base == 0 || st.bases.contains_key(base) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no tokio runtime: overlay pool refill not started");
            return;
        };
        let pool = BasePool::default();
        let task = runtime.spawn(refill(
            Arc::clone(this),
            base.to_path_buf(),
            Arc::clone(&pool.wake),
            this.shutdown_tx.subscribe(),
        ));
        st.bases.insert(base.to_path_buf(), pool);
        st.tasks.push(task);
    }

    /// Takes one pooled overlay of `base` and wakes its refill.
    fn take(self: &Arc<Self>, base: &Path) -> Option<PathBuf> {
        if self.config.size_per_base == 0 {
            return None;
        }
        let mut st = self.lock();
        Self::ensure_base(self, &mut st, base);
        let pool = st.bases.get_mut(base)?;
        let taken = pool.ready.pop_front();
        pool.wake.notify_one();
        taken
    }

    /// Marks the pool closed, deletes pooled overlays, and returns the refill tasks.
    fn close(&self) -> Vec<JoinHandle<()>> {
        let mut st = self.lock();
        st.closed = true;
        for pool in st.bases.values_mut() {
            for path in pool.ready.drain(..) {
                remove_quietly(&path);
            }
        }
        let tasks = std::mem::take(&mut st.tasks);
        drop(st);
        self.shutdown_tx.send_replace(true);
        tasks
    }

    fn remove_dir(&self) {
        if self.lock().dir_removed {
            return;
        }
        // A qemu-img killed a moment ago may still create its file: retry a few times.
        for attempt in 0..5 {
            match std::fs::remove_dir_all(&self.pool_dir) {
                Ok(()) => break,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => break,
                Err(err) => {
                    if attempt == 4 {
                        tracing::warn!(
                            pool_dir = %self.pool_dir.display(),
                            error = %err,
                            "could not remove overlay pool dir"
                        );
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        self.lock().dir_removed = true;
        tracing::debug!(pool_dir = %self.pool_dir.display(), "overlay pool removed");
    }

    /// Creates one overlay in the pool directory.
    async fn create_pooled(&self, base: &Path) -> Result<(PathBuf, Duration), OverlayError> {
        let _permit = self.create_permits.acquire().await.map_err(|_| {
            OverlayError::InvalidConfig("overlay pool create semaphore closed".to_owned())
        })?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self.pool_dir.join(format!("pooled-{seq}.qcow2"));
        let elapsed = create_overlay_resolved(&self.config.options, base, &path).await?;
        Ok((path, elapsed))
    }
}

/// The refill loop of one base: keeps `ready + in_flight` at `size_per_base`.
async fn refill(
    shared: Arc<Shared>,
    base: PathBuf,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    const MIN_BACKOFF: Duration = Duration::from_millis(250);
    const MAX_BACKOFF: Duration = Duration::from_secs(30);
    let mut backoff = MIN_BACKOFF;
    loop {
        let want = {
            let mut st = shared.lock();
            if st.closed {
                return;
            }
            let Some(pool) = st.bases.get_mut(&base) else {
                return;
            };
            let have = pool.ready.len() + pool.in_flight;
            let want = shared
                .config
                .size_per_base
                .saturating_sub(have)
                .min(shared.config.refill_batch);
            pool.in_flight += want;
            want
        };
        if want == 0 {
            tokio::select! {
                () = wake.notified() => {}
                _ = shutdown.wait_for(|closed| *closed) => return,
            }
            continue;
        }

        let results =
            futures::future::join_all((0..want).map(|_| shared.create_pooled(&base))).await;

        let mut failed = None;
        {
            let mut st = shared.lock();
            let closed = st.closed;
            for result in results {
                if let Some(pool) = st.bases.get_mut(&base) {
                    pool.in_flight = pool.in_flight.saturating_sub(1);
                }
                match result {
                    Ok((path, elapsed)) => {
                        st.stats.record_create(elapsed);
                        if closed {
                            remove_quietly(&path);
                        } else if let Some(pool) = st.bases.get_mut(&base) {
                            pool.ready.push_back(path);
                        } else {
                            remove_quietly(&path);
                        }
                    }
                    Err(err) => {
                        st.stats.create_failures += 1;
                        failed = Some(err);
                    }
                }
            }
            if closed {
                return;
            }
        }
        match failed {
            None => backoff = MIN_BACKOFF,
            Some(err) => {
                tracing::warn!(
                    base = %base.display(),
                    error = %err,
                    retry_in_ms = backoff.as_millis() as u64,
                    "overlay pool refill failed"
                );
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|closed| *closed) => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Creates `dir` with mode 0700; an existing directory owned by us is emptied and reused
/// (a leftover of an earlier process with the same pid), anything else is an error.
fn make_private_dir(dir: &Path) -> Result<(), OverlayError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.mode(0o700);
    match builder.create(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta =
                std::fs::symlink_metadata(dir).map_err(|e| OverlayError::io("stat", dir, e))?;
            let ours = meta.uid() == nix::unistd::geteuid().as_raw();
            if !meta.is_dir() || !ours {
                return Err(OverlayError::io(
                    "create dir",
                    dir,
                    std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "exists and is not a directory of ours",
                    ),
                ));
            }
            tracing::info!(pool_dir = %dir.display(), "reusing leftover overlay pool dir");
            std::fs::remove_dir_all(dir).map_err(|e| OverlayError::io("remove", dir, e))?;
            builder
                .create(dir)
                .map_err(|e| OverlayError::io("create dir", dir, e))
        }
        Err(err) => Err(OverlayError::io("create dir", dir, err)),
    }
}

/// The pid encoded in a pool directory name, if `name` is one.
pub fn pool_dir_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(POOL_DIR_PREFIX)?;
    let (pid, instance) = match rest.split_once('-') {
        Some((pid, instance)) => (pid, Some(instance)),
        None => (rest, None),
    };
    if let Some(instance) = instance
        && (instance.is_empty() || !instance.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse::<i32>().ok().filter(|p| *p > 0)
}

/// True when a process with `pid` exists (a process we may not signal counts as alive).
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        Err(_) => true,
    }
}

/// Removes the pool directories under `root` whose process is gone and that belong to
/// `owner`. Returns how many were removed. Never touches this process's directories.
pub fn reap_stale_pool_dirs(root: &Path, owner: u32) -> usize {
    let own_pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut reaped = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(pool_dir_pid) else {
            continue;
        };
        if pid == own_pid || pid_alive(pid) {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_dir() || meta.uid() != owner {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                reaped += 1;
                tracing::info!(dir = %path.display(), pid, "reaped overlay pool of dead process");
            }
            Err(err) => {
                tracing::warn!(dir = %path.display(), error = %err, "could not reap overlay pool")
            }
        }
    }
    reaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_dir_names_are_parsed_strictly() {
        assert_eq!(pool_dir_pid("sbx-overlay-pool-123"), Some(123));
        assert_eq!(pool_dir_pid("sbx-overlay-pool-123-2"), Some(123));
        assert_eq!(pool_dir_pid("sbx-overlay-pool-"), None);
        assert_eq!(pool_dir_pid("sbx-overlay-pool-0"), None);
        assert_eq!(pool_dir_pid("sbx-overlay-pool-12a"), None);
        assert_eq!(pool_dir_pid("sbx-overlay-pool-12-"), None);
        assert_eq!(pool_dir_pid("sbx-overlay-pool-12-x"), None);
        assert_eq!(pool_dir_pid("other-123"), None);
    }

    #[test]
    fn own_pid_is_alive() {
        assert!(pid_alive(i32::try_from(std::process::id()).unwrap_or(1)));
        assert!(!pid_alive(0));
        assert!(!pid_alive(-1));
    }

    #[test]
    fn mean_create_time() {
        let mut stats = PoolStats::default();
        assert_eq!(stats.mean_create(), None);
        stats.record_create(Duration::from_millis(10));
        stats.record_create(Duration::from_millis(30));
        assert_eq!(stats.mean_create(), Some(Duration::from_millis(20)));
        assert_eq!(stats.last_create, Some(Duration::from_millis(30)));
    }
}
