//! The scheduler: what library users call. `run` executes code in a fresh VM that is always
//! destroyed afterwards; `session` keeps a VM across execs.
//!
//! Error semantics: infrastructure failures before the code was dispatched are transient
//! (safe to retry); losing the transport after dispatch is outcome-unknown; a timeout is a
//! result with exit code −1, not an error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{Instrument, info_span};

use crate::admission::{Admission, AdmissionConfig, AdmissionPermit};
use crate::error::{Error, PermanentCause, Result};
use crate::manager::{VmManager, VmOptions, VmSlot};
use crate::ports::NetworkPolicy;
use crate::request::{
    DEFAULT_IDLE_TIMEOUT_SECS, DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_SECS, MAX_IDLE_TIMEOUT_SECS,
    MIN_IDLE_TIMEOUT_SECS, MIN_MEMORY_MB, RunRequest, SessionRequest,
};
use crate::result::{ExecutionResult, TimingBreakdown, millis};
use crate::session::{Session, WeakSession};
use crate::vm::ops::OutputCallbacks;
use crate::warm_pool::{WarmPool, WarmPoolConfig};

/// Scheduler settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Warm VMs kept per language (0 disables the pool).
    pub warm_pool_size: usize,
    /// Memory of requests that do not say (and of warm VMs), MiB.
    pub default_memory_mb: u32,
    /// Timeout of requests that do not say, seconds.
    pub default_timeout_secs: u32,
    /// Idle timeout of sessions that do not say, seconds.
    pub session_idle_timeout_secs: u32,
    /// Memory and CPU budgets; `None` disables admission control.
    pub admission: Option<AdmissionConfig>,
    /// Warm pool health check period.
    pub health_interval: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            warm_pool_size: 0,
            default_memory_mb: DEFAULT_MEMORY_MB,
            default_timeout_secs: DEFAULT_TIMEOUT_SECS,
            session_idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            admission: None,
            health_interval: Duration::from_secs(15),
        }
    }
}

impl SchedulerConfig {
    /// Checks every range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::permanent(PermanentCause::Config, m));
        if self.warm_pool_size > 64 {
            return bad(format!(
                "warm pool size {} is above 64",
                self.warm_pool_size
            ));
        }
        if self.default_memory_mb < MIN_MEMORY_MB {
            return bad(format!(
                "default memory {} MB is below {MIN_MEMORY_MB}",
                self.default_memory_mb
            ));
        }
        if !(1..=300).contains(&self.default_timeout_secs) {
            return bad(format!(
                "default timeout {} s is outside 1-300",
                self.default_timeout_secs
            ));
        }
        if !(MIN_IDLE_TIMEOUT_SECS..=MAX_IDLE_TIMEOUT_SECS)
            .contains(&self.session_idle_timeout_secs)
        {
            return bad(format!(
                "session idle timeout {} s is outside {MIN_IDLE_TIMEOUT_SECS}-{MAX_IDLE_TIMEOUT_SECS}",
                self.session_idle_timeout_secs
            ));
        }
        if let Some(a) = &self.admission {
            a.validate()?;
        }
        Ok(())
    }
}

/// Per-call options of `run` and `session` that are not part of the request data.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Streaming output callbacks.
    pub callbacks: OutputCallbacks,
    /// Live boot log (kernel and agent lines); skips the warm pool.
    pub boot_log: Option<mpsc::UnboundedSender<String>>,
}

struct Inner {
    cfg: SchedulerConfig,
    manager: VmManager,
    admission: Option<Admission>,
    pool: Mutex<Option<Arc<WarmPool>>>,
    live_sessions: Mutex<Vec<WeakSession>>,
    /// Background work (L1 snapshot creation), aborted at stop.
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    started: AtomicBool,
    stopped: AtomicBool,
}

/// Runs code in microVMs. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("config", &self.inner.cfg)
            .field("manager", &self.inner.manager)
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// A scheduler over `manager`. Call [`Scheduler::start`] before use.
    pub fn new(cfg: SchedulerConfig, manager: VmManager) -> Result<Self> {
        cfg.validate()?;
        let admission = cfg.admission.clone().map(Admission::new).transpose()?;
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                manager,
                admission,
                pool: Mutex::new(None),
                live_sessions: Mutex::new(Vec::new()),
                background: Mutex::new(Vec::new()),
                started: AtomicBool::new(false),
                stopped: AtomicBool::new(false),
            }),
        })
    }

    /// Starts background work (the warm pool). Starting twice is an error.
    pub fn start(&self) -> Result<()> {
        if self.inner.started.swap(true, Ordering::SeqCst) {
            return Err(Error::permanent(
                PermanentCause::Config,
                "the scheduler was already started",
            ));
        }
        if self.inner.cfg.warm_pool_size > 0 {
            let mut pool_cfg = WarmPoolConfig::new(self.inner.cfg.warm_pool_size);
            pool_cfg.memory_mb = self.inner.cfg.default_memory_mb;
            pool_cfg.health_interval = self.inner.cfg.health_interval;
            let pool = WarmPool::start(
                pool_cfg,
                self.inner.manager.clone(),
                self.inner.admission.clone(),
            );
            if let Ok(mut p) = self.inner.pool.lock() {
                *p = Some(Arc::new(pool));
            }
        }
        Ok(())
    }

    /// Stops: the warm pool, every session, every VM. Idempotent.
    pub async fn stop(&self) {
        if self.inner.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        let pool = self.inner.pool.lock().ok().and_then(|mut p| p.take());
        if let Some(pool) = pool {
            pool.stop().await;
        }
        let background: Vec<tokio::task::JoinHandle<()>> = self
            .inner
            .background
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for task in background {
            task.abort();
            let _ = task.await;
        }
        let sessions: Vec<Session> = self
            .inner
            .live_sessions
            .lock()
            .map(|mut s| s.drain(..).filter_map(|w| w.upgrade()).collect())
            .unwrap_or_default();
        for s in sessions {
            s.close().await;
        }
        self.inner.manager.destroy_all().await;
    }

    /// The VM manager.
    pub fn manager(&self) -> &VmManager {
        &self.inner.manager
    }

    /// The settings.
    pub fn config(&self) -> &SchedulerConfig {
        &self.inner.cfg
    }

    /// The warm pool, when enabled.
    pub fn warm_pool(&self) -> Option<Arc<WarmPool>> {
        self.inner.pool.lock().ok().and_then(|p| p.clone())
    }

    /// Waits until the warm pool is full (true at once without a pool).
    pub async fn wait_pool_ready(&self, timeout: Duration) -> bool {
        match self.warm_pool() {
            Some(p) => p.wait_ready(timeout).await,
            None => true,
        }
    }

    fn check_running(&self) -> Result<()> {
        if !self.inner.started.load(Ordering::SeqCst) {
            return Err(Error::permanent(
                PermanentCause::Config,
                "the scheduler is not started",
            ));
        }
        if self.inner.stopped.load(Ordering::SeqCst) {
            return Err(Error::permanent(
                PermanentCause::Config,
                "the scheduler is stopped",
            ));
        }
        Ok(())
    }

    async fn admit(&self, memory_mb: u32) -> Result<Option<AdmissionPermit>> {
        match &self.inner.admission {
            Some(a) => {
                let (mem, cpus) = self.inner.manager.config().admission_share(memory_mb);
                Ok(Some(a.acquire(mem, cpus).await?))
            }
            None => Ok(None),
        }
    }

    /// Capacity for one VM: its admission share, then a VM slot, both within one bound
    /// (the admission timeout, else the manager's slot timeout). While it waits, the warm
    /// pool pauses refills and evicts idle pooled VMs, so they never starve a request.
    /// Returns the permit, the slot and the time waited.
    async fn capacity(
        &self,
        memory_mb: u32,
    ) -> Result<(Option<AdmissionPermit>, VmSlot, Duration)> {
        let started = Instant::now();
        let _demand = self.warm_pool().map(|p| p.demand());
        let permit = self.admit(memory_mb).await?;
        let bound = match &self.inner.admission {
            Some(a) => a.config().timeout,
            None => self.inner.manager.config().slot_timeout,
        };
        let slot = self
            .inner
            .manager
            .reserve_slot(bound.saturating_sub(started.elapsed()))
            .await?;
        Ok((permit, slot, started.elapsed()))
    }

    /// Capacity, then a VM in it. Returns the VM, its admission share and the time waited
    /// for capacity.
    async fn provision(
        &self,
        vm: VmOptions,
    ) -> Result<(crate::vm::Vm, Option<AdmissionPermit>, Duration)> {
        let (permit, slot, waited) = self.capacity(vm.memory_mb).await?;
        let snapshot_opts = vm.clone();
        let vm = self.inner.manager.create_vm_with_slot(slot, vm).await?;
        if vm.start_kind() == crate::result::VmStart::Cold {
            self.snapshot_in_background(snapshot_opts);
        }
        Ok((vm, permit, waited))
    }

    /// After a cold boot: creates the L1 snapshot of its kind in the background, with
    /// capacity that is free at once (never ahead of requests), when snapshots are on and
    /// it does not exist yet. Concurrent calls for one key make it once (the store's
    /// drafts are exclusive, also across processes).
    fn snapshot_in_background(&self, mut opts: VmOptions) {
        if self.inner.manager.ports.snapshots.is_none() || self.inner.stopped.load(Ordering::SeqCst)
        {
            return;
        }
        opts.slot_wait = Some(Duration::ZERO);
        let sched = self.clone();
        let task = tokio::spawn(
            async move {
                let _permit = match &sched.inner.admission {
                    Some(a) => {
                        let (mem, cpus) =
                            sched.inner.manager.config().admission_share(opts.memory_mb);
                        match a.try_acquire(mem, cpus) {
                            Some(p) => Some(p),
                            None => return,
                        }
                    }
                    None => None,
                };
                let language = opts.language;
                match sched.inner.manager.create_snapshot(opts).await {
                    Ok(made) => tracing::debug!(%language, made, "L1 snapshot creation done"),
                    Err(e) => {
                        tracing::warn!(%language, error = %e, "creating the L1 snapshot failed")
                    }
                }
            }
            .instrument(info_span!("snapshot")),
        );
        if let Ok(mut tasks) = self.inner.background.lock() {
            tasks.retain(|t| !t.is_finished());
            tasks.push(task);
        }
    }

    /// Waits (bounded) until background snapshot creation is done.
    pub async fn wait_background(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let busy = self
                .inner
                .background
                .lock()
                .map(|t| t.iter().any(|t| !t.is_finished()))
                .unwrap_or(false);
            if !busy {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs `req` in a fresh VM (from the warm pool when eligible) and destroys the VM,
    /// always — also on error and when the returned future is dropped.
    pub async fn run(&self, mut req: RunRequest, opts: RunOptions) -> Result<ExecutionResult> {
        self.check_running()?;
        req.validate()?;
        let span = info_span!("run", language = %req.language, task = req.task_id.as_deref().unwrap_or(""));
        self.run_validated(req, opts).instrument(span).await
    }

    async fn run_validated(&self, req: RunRequest, opts: RunOptions) -> Result<ExecutionResult> {
        let started = Instant::now();
        let mut timing = TimingBreakdown::default();
        let network = NetworkPolicy::from_request(&req.network);
        let eligible = req.memory_mb == self.inner.cfg.default_memory_mb
            && req.disk_mb.is_none()
            && matches!(network, NetworkPolicy::None)
            && opts.boot_log.is_none();

        let pooled = if eligible {
            self.warm_pool().and_then(|p| p.take(req.language))
        } else {
            None
        };
        let warm_pool_hit = pooled.is_some();
        let mut vm_start = crate::result::VmStart::WarmPool;
        let (vm, _permit) = match pooled {
            Some(p) => (p.vm, p.permit),
            None => {
                let (vm, permit, waited) = self
                    .provision(vm_options(
                        req.language,
                        req.memory_mb,
                        req.disk_mb,
                        network,
                        &req.tenant,
                        &opts,
                    ))
                    .await?;
                timing.admission_ms = millis(waited);
                let b = vm.boot_timings();
                timing.setup_ms = b.setup_ms;
                timing.overlay_ms = b.overlay_ms;
                timing.boot_ms = b.boot_ms;
                timing.guest_wait_ms = b.guest_wait_ms;
                timing.boot_retries = b.retries;
                vm_start = vm.start_kind();
                (vm, permit)
            }
        };
        // From here the VM is destroyed on every path: explicitly below, or by Vm's Drop
        // if this future is cancelled.
        let exec = req.exec_request();
        let outcome = vm.exec(req.language, &exec, &opts.callbacks).await;
        let usage = vm.usage().await;
        let exposed_ports = vm.exposed_ports().to_vec();
        timing.teardown_ms = millis(vm.destroy().await);
        let outcome = outcome?;
        timing.set_execute(
            outcome.round_trip_ms,
            outcome.spawn_ms,
            outcome.execution_ms,
        );
        timing.finish(started.elapsed());
        let mut result = outcome.into_result(usage, timing, warm_pool_hit, exposed_ports);
        result.vm_start = vm_start;
        Ok(result)
    }

    /// Starts a session: a VM kept with its REPL state until closed or idle.
    pub async fn session(&self, mut req: SessionRequest, opts: RunOptions) -> Result<Session> {
        self.check_running()?;
        req.validate()?;
        let network = NetworkPolicy::from_request(&req.network);
        let (vm, permit, _waited) = self
            .provision(vm_options(
                req.language,
                req.memory_mb,
                req.disk_mb,
                network,
                &req.tenant,
                &opts,
            ))
            .await?;
        let session = Session::start(
            vm,
            permit,
            Duration::from_secs(u64::from(req.idle_timeout_secs)),
        );
        if let Ok(mut live) = self.inner.live_sessions.lock() {
            live.retain(|w| w.upgrade().is_some_and(|s| !s.is_closed()));
            live.push(session.downgrade());
        }
        Ok(session)
    }
}

/// What a request asks of its VM.
fn vm_options(
    language: crate::Language,
    memory_mb: u32,
    disk_mb: Option<u32>,
    network: NetworkPolicy,
    tenant: &Option<String>,
    opts: &RunOptions,
) -> VmOptions {
    VmOptions {
        language,
        memory_mb,
        disk_mb,
        network,
        tenant: tenant.clone(),
        boot_log: opts.boot_log.clone(),
        slot_wait: None,
    }
}
