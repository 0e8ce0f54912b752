//! The warm pool: pre-booted VMs per language, REPL already started, handed out to eligible
//! runs (default memory, no network, no ports, no boot log).
//!
//! One refill task per language keeps the pool at its target size (serialized per
//! language). A health check runs periodically: a VM that is dead or does not answer a
//! warm-up within a bound is destroyed and replaced, never handed out.
//!
//! Pooled VMs exist to serve requests, so they never starve one: refills take capacity
//! (admission share and VM slot) only when it is free at once and nobody waits for it, and
//! while a request waits for capacity ([`WarmPool::demand`]) refills pause and idle pooled
//! VMs are evicted, one at a time, until the request got what it needs or the pool is empty.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::Language;
use crate::admission::{Admission, AdmissionPermit};
use crate::error::{ErrorKind, TransientCause};
use crate::manager::{VmManager, VmOptions};
use crate::vm::Vm;

/// Warm pool settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmPoolConfig {
    /// VMs kept per language (0 disables the pool).
    pub size: usize,
    /// Languages to keep warm.
    pub languages: Vec<Language>,
    /// Guest memory of pooled VMs (the default request memory).
    pub memory_mb: u32,
    /// Health check period.
    pub health_interval: Duration,
    /// How long a health check may take.
    pub health_timeout: Duration,
}

impl WarmPoolConfig {
    /// `size` VMs for every language.
    pub fn new(size: usize) -> Self {
        Self {
            size,
            languages: Language::ALL.to_vec(),
            memory_mb: crate::request::DEFAULT_MEMORY_MB,
            health_interval: Duration::from_secs(15),
            health_timeout: Duration::from_secs(5),
        }
    }
}

/// A pooled VM with its admission share.
#[derive(Debug)]
pub struct PooledVm {
    /// The VM (REPL warm).
    pub vm: Vm,
    /// Its admission share, if admission is enforced.
    pub permit: Option<AdmissionPermit>,
}

#[derive(Default)]
struct Lane {
    ready: Mutex<VecDeque<PooledVm>>,
    refill: Notify,
}

struct Inner {
    cfg: WarmPoolConfig,
    manager: VmManager,
    admission: Option<Admission>,
    lanes: BTreeMap<Language, Arc<Lane>>,
    stopped: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
    replaced: AtomicU64,
    evicted: AtomicU64,
    /// Requests waiting for capacity right now.
    demand: AtomicUsize,
    /// Wakes the reclaim task: demand rose, or a VM came (back) into a lane.
    pressure: Notify,
}

/// How long a request must have waited before pooled VMs are evicted for it (requests
/// that get capacity at once evict nothing), and the pause between two evictions.
const RECLAIM_GRACE: Duration = Duration::from_millis(25);

/// A request waiting for capacity; while any is held, refills pause and idle pooled VMs
/// are evicted. Dropped when the request has its capacity (or gave up).
#[derive(Debug)]
pub struct DemandGuard {
    inner: Arc<Inner>,
}

impl Drop for DemandGuard {
    fn drop(&mut self) {
        self.inner.demand.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmPoolInner")
            .field("demand", &self.demand.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

/// Pre-booted VMs per language.
pub struct WarmPool {
    inner: Arc<Inner>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for WarmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmPool")
            .field("size", &self.inner.cfg.size)
            .field("ready", &self.ready_counts())
            .finish()
    }
}

impl WarmPool {
    /// Starts the refill and health tasks (needs a tokio runtime).
    pub fn start(cfg: WarmPoolConfig, manager: VmManager, admission: Option<Admission>) -> Self {
        let lanes = cfg
            .languages
            .iter()
            .map(|l| (*l, Arc::new(Lane::default())))
            .collect();
        let inner = Arc::new(Inner {
            cfg,
            manager,
            admission,
            lanes,
            stopped: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            replaced: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            demand: AtomicUsize::new(0),
            pressure: Notify::new(),
        });
        let mut tasks = Vec::new();
        if inner.cfg.size > 0 {
            for (lang, lane) in &inner.lanes {
                let inner2 = inner.clone();
                let lane = lane.clone();
                let lang = *lang;
                tasks.push(tokio::spawn(async move {
                    refill_loop(inner2, lang, lane).await
                }));
            }
            let inner2 = inner.clone();
            tasks.push(tokio::spawn(async move { health_loop(inner2).await }));
            let inner2 = inner.clone();
            tasks.push(tokio::spawn(async move { reclaim_loop(inner2).await }));
        }
        Self {
            inner,
            tasks: Mutex::new(tasks),
        }
    }

    /// Takes a healthy warm VM for `language`, if one is ready. Triggers a refill.
    pub fn take(&self, language: Language) -> Option<PooledVm> {
        let lane = self.inner.lanes.get(&language)?;
        let mut found = None;
        if let Ok(mut q) = lane.ready.lock() {
            while let Some(p) = q.pop_front() {
                if p.vm.is_alive() {
                    found = Some(p);
                    break;
                }
                self.inner.replaced.fetch_add(1, Ordering::Relaxed);
                // Dropping destroys it in the background.
            }
        }
        lane.refill.notify_one();
        match &found {
            Some(_) => self.inner.hits.fetch_add(1, Ordering::Relaxed),
            None => self.inner.misses.fetch_add(1, Ordering::Relaxed),
        };
        found
    }

    /// Ready VMs per language.
    pub fn ready_counts(&self) -> BTreeMap<Language, usize> {
        self.inner
            .lanes
            .iter()
            .map(|(l, lane)| (*l, lane.ready.lock().map(|q| q.len()).unwrap_or(0)))
            .collect()
    }

    /// Marks a request waiting for capacity until the guard is dropped: refills pause and,
    /// once the wait lasts, idle pooled VMs are destroyed to give their capacity back.
    pub fn demand(&self) -> DemandGuard {
        self.inner.demand.fetch_add(1, Ordering::SeqCst);
        self.inner.pressure.notify_one();
        DemandGuard {
            inner: self.inner.clone(),
        }
    }

    /// Pooled VMs destroyed to give their capacity to a waiting request.
    pub fn evicted(&self) -> u64 {
        self.inner.evicted.load(Ordering::Relaxed)
    }

    /// (hits, misses, replaced) counters.
    pub fn stats(&self) -> (u64, u64, u64) {
        (
            self.inner.hits.load(Ordering::Relaxed),
            self.inner.misses.load(Ordering::Relaxed),
            self.inner.replaced.load(Ordering::Relaxed),
        )
    }

    /// Waits until every lane is full, or `timeout`. Returns whether it filled.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let full = self
                .ready_counts()
                .values()
                .all(|n| *n >= self.inner.cfg.size);
            if full {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the background tasks and destroys every pooled VM.
    pub async fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        let tasks: Vec<JoinHandle<()>> = self
            .tasks
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        for lane in self.inner.lanes.values() {
            let drained: Vec<PooledVm> = lane
                .ready
                .lock()
                .map(|mut q| q.drain(..).collect())
                .unwrap_or_default();
            for p in drained {
                p.vm.destroy().await;
            }
        }
    }
}

/// Why a refill did not produce a VM.
enum Refill {
    /// No capacity free right now (not a failure: requests come first).
    NoCapacity,
    /// The boot or the warm-up failed.
    Failed,
}

async fn boot_one(inner: &Inner, language: Language) -> std::result::Result<PooledVm, Refill> {
    let permit = match &inner.admission {
        Some(a) => {
            let (mem, cpus) = inner.manager.config().admission_share(inner.cfg.memory_mb);
            match a.try_acquire(mem, cpus) {
                Some(p) => Some(p),
                None => {
                    debug!(%language, "warm pool: no capacity free");
                    return Err(Refill::NoCapacity);
                }
            }
        }
        None => None,
    };
    let mut opts = VmOptions::new(language);
    opts.memory_mb = inner.cfg.memory_mb;
    // Never queue for a slot: a request may be waiting for it.
    opts.slot_wait = Some(Duration::ZERO);
    let vm = match inner.manager.create_vm(opts).await {
        Ok(vm) => vm,
        Err(e) if e.kind() == ErrorKind::Transient(TransientCause::Capacity) => {
            debug!(%language, error = %e, "warm pool: no VM slot free");
            return Err(Refill::NoCapacity);
        }
        Err(e) => {
            warn!(%language, error = %e, "warm pool: boot failed");
            return Err(Refill::Failed);
        }
    };
    // Warm-up, then one throwaway exec: under TCG the exec path's translated code is then
    // warm before a hit (and a VM restored from a snapshot has run code once).
    let warm = async {
        vm.warm_up(language).await?;
        let code = match language {
            Language::Python => "pass",
            Language::Javascript => "0",
            Language::Raw => "true",
        };
        let r = vm
            .exec(
                language,
                &crate::request::ExecRequest::new(code),
                &crate::vm::ops::OutputCallbacks::default(),
            )
            .await?;
        if r.exit_code != 0 {
            return Err(crate::Error::transient(
                TransientCause::Execution,
                format!("the warm-up exec exited with {}", r.exit_code),
            ));
        }
        Ok(())
    };
    match tokio::time::timeout(inner.cfg.health_timeout * 4, warm).await {
        Ok(Ok(())) => Ok(PooledVm { vm, permit }),
        Ok(Err(e)) => {
            warn!(%language, error = %e, "warm pool: REPL warm-up failed; VM not pooled");
            vm.destroy().await;
            Err(Refill::Failed)
        }
        Err(_) => {
            warn!(%language, "warm pool: REPL warm-up timed out; VM not pooled");
            vm.destroy().await;
            Err(Refill::Failed)
        }
    }
}

async fn refill_loop(inner: Arc<Inner>, language: Language, lane: Arc<Lane>) {
    let mut failures = 0u32;
    loop {
        if inner.stopped.load(Ordering::SeqCst) {
            return;
        }
        let have = lane.ready.lock().map(|q| q.len()).unwrap_or(0);
        if have >= inner.cfg.size {
            lane.refill.notified().await;
            continue;
        }
        if inner.demand.load(Ordering::SeqCst) > 0 {
            // A request waits for capacity: it goes first.
            tokio::time::sleep(RECLAIM_GRACE * 2).await;
            continue;
        }
        match boot_one(&inner, language).await {
            Ok(p) => {
                failures = 0;
                if inner.stopped.load(Ordering::SeqCst) {
                    p.vm.destroy().await;
                    return;
                }
                if let Ok(mut q) = lane.ready.lock() {
                    q.push_back(p);
                }
                // A request may have started waiting while this VM booted.
                inner.pressure.notify_one();
            }
            Err(Refill::NoCapacity) => {
                let delay = crate::manager::backoff_delay(
                    Duration::from_millis(250),
                    Duration::from_secs(2),
                    1,
                );
                tokio::time::sleep(delay).await;
            }
            Err(Refill::Failed) => {
                failures = failures.saturating_add(1);
                let delay = crate::manager::backoff_delay(
                    Duration::from_millis(500),
                    Duration::from_secs(30),
                    failures,
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Removes the newest VM of the fullest lane.
fn pop_idle(inner: &Inner) -> Option<PooledVm> {
    let lane = inner
        .lanes
        .values()
        .max_by_key(|l| l.ready.lock().map(|q| q.len()).unwrap_or(0))?;
    lane.ready.lock().ok()?.pop_back()
}

/// While requests wait for capacity, destroys idle pooled VMs one at a time (after a
/// short grace, so requests served at once evict nothing).
async fn reclaim_loop(inner: Arc<Inner>) {
    loop {
        if inner.stopped.load(Ordering::SeqCst) {
            return;
        }
        if inner.demand.load(Ordering::SeqCst) == 0 {
            inner.pressure.notified().await;
            continue;
        }
        tokio::time::sleep(RECLAIM_GRACE).await;
        if inner.demand.load(Ordering::SeqCst) == 0 {
            continue;
        }
        match pop_idle(&inner) {
            Some(p) => {
                debug!(vm_id = %p.vm.id(), "warm pool: idle VM evicted for a waiting request");
                inner.evicted.fetch_add(1, Ordering::Relaxed);
                p.vm.destroy().await;
                drop(p.permit);
            }
            None => {
                // Nothing idle: wait for a VM to come (back) into a lane, or poll.
                let _ = tokio::time::timeout(RECLAIM_GRACE * 4, inner.pressure.notified()).await;
            }
        }
    }
}

async fn health_loop(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(inner.cfg.health_interval).await;
        if inner.stopped.load(Ordering::SeqCst) {
            return;
        }
        for (language, lane) in &inner.lanes {
            let pooled: Vec<PooledVm> = lane
                .ready
                .lock()
                .map(|mut q| q.drain(..).collect())
                .unwrap_or_default();
            let mut healthy = Vec::new();
            for p in pooled {
                let ok = p.vm.is_alive()
                    && matches!(
                        tokio::time::timeout(inner.cfg.health_timeout, p.vm.warm_up(*language))
                            .await,
                        Ok(Ok(()))
                    );
                if ok {
                    healthy.push(p);
                } else {
                    warn!(vm_id = %p.vm.id(), %language, "warm pool: unhealthy VM replaced");
                    inner.replaced.fetch_add(1, Ordering::Relaxed);
                    p.vm.destroy().await;
                }
            }
            if let Ok(mut q) = lane.ready.lock() {
                // VMs taken meanwhile are gone; put the healthy ones back in front.
                for p in healthy.into_iter().rev() {
                    q.push_front(p);
                }
            }
            lane.refill.notify_one();
            inner.pressure.notify_one();
        }
    }
}
