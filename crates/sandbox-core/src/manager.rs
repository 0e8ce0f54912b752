//! The VM manager: turns a request into a running, reachable, always-cleaned-up microVM.
//!
//! It talks only to the ports. `create_vm` takes a concurrency slot held for the VM's whole
//! life, prepares the overlay and the limits in parallel, starts the network when asked,
//! launches the hypervisor and waits for the guest by racing "the VM process exited" against
//! "the agent answered the handshake". Transient boot failures are retried with jittered
//! exponential backoff; permanent ones are not. Every resource acquired on the way is owned
//! by a teardown guard, so an error, a cancelled future or a dropped [`Vm`] still
//! releases everything exactly once.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{Instrument, debug, info_span, warn};

use crate::Language;
use crate::error::{Error, ErrorKind, PermanentCause, Result, TransientCause};
use crate::ports::{
    Accelerator, AgentInfo, ConsoleSpec, GuestChannel, GuestConnection, Hypervisor, LimitHandle,
    MemoryBacking, NetworkHandle, NetworkPolicy, NetworkProxy, Overlay, OverlayStore,
    ResourceLimiter, ResourceLimits, ResourceUsage, VmProcess, VmSpec,
};
use crate::request::validate_identifier;
use crate::result::{ExposedPort, millis};
use crate::vm::{VmId, VmLifecycle, VmState};

/// The files a VM boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAssets {
    /// PVH `vmlinux`.
    pub kernel: PathBuf,
    /// Compressed initramfs holding the agent as `/init`.
    pub initramfs: PathBuf,
    /// Read-only base image per language.
    pub images: BTreeMap<Language, PathBuf>,
}

impl GuestAssets {
    /// The standard layout of `cargo xtask assets` in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        let images = Language::ALL
            .iter()
            .map(|l| (*l, dir.join(format!("{l}-base-x86_64.qcow2"))))
            .collect();
        Self {
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio.zst"),
            images,
        }
    }

    /// Checks that the kernel, the initramfs and `language`'s image exist.
    pub fn check(&self, language: Language) -> Result<&Path> {
        let image = self.images.get(&language).ok_or_else(|| {
            Error::permanent(
                PermanentCause::MissingDependency,
                format!("no base image configured for {language}"),
            )
        })?;
        for path in [&self.kernel, &self.initramfs, image] {
            if !path.is_file() {
                return Err(Error::permanent(
                    PermanentCause::MissingDependency,
                    format!(
                        "guest asset {} is missing: build the assets with `cargo xtask assets`",
                        path.display()
                    ),
                ));
            }
        }
        Ok(image)
    }
}

/// Settings of the VM manager.
#[derive(Debug, Clone)]
pub struct VmManagerConfig {
    /// Kernel, initramfs and images.
    pub assets: GuestAssets,
    /// Parent of the per-VM work dirs (short: unix socket paths are limited to 108 bytes).
    pub work_root: PathBuf,
    /// KVM or TCG, decided by the probes.
    pub accelerator: Accelerator,
    /// vCPUs per VM.
    pub vcpus: u32,
    /// Most VMs alive at once (each holds a slot for its whole life).
    pub max_vms: usize,
    /// How long `create_vm` waits for a free slot before a capacity error.
    pub slot_timeout: Duration,
    /// How long one boot attempt may take until the agent answers.
    pub boot_timeout: Duration,
    /// Boot attempts for transient failures (≥ 1).
    pub boot_attempts: u32,
    /// First retry delay; doubles per attempt, with jitter.
    pub backoff_base: Duration,
    /// Upper bound of the retry delay.
    pub backoff_max: Duration,
    /// Time between TERM and KILL when a VM is destroyed.
    pub kill_grace: Duration,
    /// Memory the VM process needs beyond guest RAM, in MiB.
    pub vm_overhead_mb: u64,
    /// Task limit of one VM process tree.
    pub pids_max: u64,
    /// Tenant used when a request names none.
    pub default_tenant: String,
    /// Bytes of console output kept per VM.
    pub console_max_bytes: u64,
}

impl VmManagerConfig {
    /// Defaults for `assets` under `work_root`, tuned for `accelerator`.
    pub fn new(assets: GuestAssets, work_root: PathBuf, accelerator: Accelerator) -> Self {
        Self {
            assets,
            work_root,
            accelerator,
            vcpus: 1,
            max_vms: 64,
            slot_timeout: Duration::from_secs(120),
            boot_timeout: match accelerator {
                Accelerator::Kvm => Duration::from_secs(15),
                Accelerator::Tcg => Duration::from_secs(30),
            },
            boot_attempts: 3,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            kill_grace: Duration::from_millis(500),
            vm_overhead_mb: match accelerator {
                Accelerator::Kvm => 80,
                Accelerator::Tcg => 208,
            },
            pids_max: 256,
            default_tenant: "default".to_owned(),
            console_max_bytes: 64 * 1024,
        }
    }
}

impl VmManagerConfig {
    /// What one VM of `memory_mb` guest memory asks of the admission budget: its memory
    /// plus the VM process's overhead (MiB), and its vCPUs.
    pub fn admission_share(&self, memory_mb: u32) -> (f64, f64) {
        (
            f64::from(memory_mb) + self.vm_overhead_mb as f64,
            f64::from(self.vcpus),
        )
    }
}

/// The adapters the manager drives.
#[derive(Clone)]
pub struct Ports {
    /// Launches VM processes.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// Hands out writable disks.
    pub overlays: Arc<dyn OverlayStore>,
    /// Applies resource limits.
    pub limiter: Arc<dyn ResourceLimiter>,
    /// Per-VM networks; `None` when networking is not available on this host.
    pub network: Option<Arc<dyn NetworkProxy>>,
    /// Connects to guest agents.
    pub channel: Arc<dyn GuestChannel>,
    /// Memory snapshots (L1) of warmed VMs; `None` boots every VM cold.
    pub snapshots: Option<Arc<dyn crate::snapshot::SnapshotStore>>,
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ports")
            .field("network", &self.network.is_some())
            .finish_non_exhaustive()
    }
}

/// What kind of VM to create.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Image to boot.
    pub language: Language,
    /// Guest memory in MiB.
    pub memory_mb: u32,
    /// Size of a disk-backed home directory in MB; `None`: a tmpfs home.
    pub disk_mb: Option<u32>,
    /// Network policy.
    pub network: NetworkPolicy,
    /// Tenant; the manager's default when `None`.
    pub tenant: Option<String>,
    /// Live console lines (boot log), when wanted.
    pub boot_log: Option<mpsc::UnboundedSender<String>>,
    /// How long to wait for a free VM slot; `None` is the manager's `slot_timeout`, zero
    /// fails at once when every slot is taken (background work such as the warm pool).
    pub slot_wait: Option<Duration>,
}

impl VmOptions {
    /// An offline VM with default memory.
    pub fn new(language: Language) -> Self {
        Self {
            language,
            memory_mb: crate::request::DEFAULT_MEMORY_MB,
            disk_mb: None,
            network: NetworkPolicy::None,
            tenant: None,
            boot_log: None,
            slot_wait: None,
        }
    }
}

/// How long each part of creating a VM took.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootTimings {
    /// Waiting for a VM slot.
    pub slot_ms: u64,
    /// Host preparation of the successful attempt (work dir, overlay, limits, network).
    pub setup_ms: u64,
    /// Overlay acquisition of the successful attempt.
    pub overlay_ms: u64,
    /// Launch to agent handshake of the successful attempt.
    pub boot_ms: u64,
    /// Waiting for the agent (part of boot).
    pub guest_wait_ms: u64,
    /// Failed attempts before the successful one.
    pub retries: u32,
    /// Whole `create_vm`, including failed attempts and backoff.
    pub total_ms: u64,
    /// True when the VM was restored from an L1 snapshot instead of booted.
    pub restored: bool,
}

/// Releases everything one VM holds. Runs once: explicitly, or from `Drop` on a
/// cancellation or panic path.
struct Teardown {
    vm_id: VmId,
    ports: Ports,
    kill_grace: Duration,
    process: Option<Arc<dyn VmProcess>>,
    conn: Option<Arc<dyn GuestConnection>>,
    network: Option<NetworkHandle>,
    limits: Option<LimitHandle>,
    overlay: Option<Overlay>,
    work_dir: Option<PathBuf>,
    slot: Option<OwnedSemaphorePermit>,
    /// Set on the copy handed to a background task by `Drop`: if that task is dropped
    /// unrun (runtime shutting down), clean up synchronously instead of spawning again.
    in_background: bool,
}

impl Teardown {
    fn new(vm_id: VmId, ports: Ports, kill_grace: Duration) -> Self {
        Self {
            vm_id,
            ports,
            kill_grace,
            process: None,
            conn: None,
            network: None,
            limits: None,
            overlay: None,
            work_dir: None,
            slot: None,
            in_background: false,
        }
    }

    fn take(&mut self) -> Teardown {
        Teardown {
            vm_id: self.vm_id,
            ports: self.ports.clone(),
            kill_grace: self.kill_grace,
            process: self.process.take(),
            conn: self.conn.take(),
            network: self.network.take(),
            limits: self.limits.take(),
            overlay: self.overlay.take(),
            work_dir: self.work_dir.take(),
            slot: self.slot.take(),
            in_background: self.in_background,
        }
    }

    /// Best-effort synchronous cleanup when no runtime can run the async one: the VM
    /// process dies with its handle (kill-on-drop) and with its parent; the work dir goes.
    fn release_sync(&mut self) {
        if let Some(dir) = self.work_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
        self.conn = None;
        self.process = None;
        self.network = None;
        self.limits = None;
        self.overlay = None;
        self.slot = None;
    }

    fn is_empty(&self) -> bool {
        self.process.is_none()
            && self.conn.is_none()
            && self.network.is_none()
            && self.limits.is_none()
            && self.overlay.is_none()
            && self.work_dir.is_none()
            && self.slot.is_none()
    }

    /// Releases in reverse order of acquisition. Failures are logged, never stop the rest.
    async fn run(mut self) {
        let vm = self.vm_id;
        if let Some(conn) = self.conn.take() {
            conn.close().await;
        }
        if let Some(process) = self.process.take()
            && let Err(e) = process.kill(self.kill_grace).await
        {
            warn!(vm_id = %vm, error = %e, "killing the VM process failed");
        }
        if let Some(net) = self.network.take()
            && let Some(proxy) = &self.ports.network
            && let Err(e) = proxy.stop(&net).await
        {
            warn!(vm_id = %vm, error = %e, "stopping the VM network failed");
        }
        if let Some(limits) = self.limits.take()
            && let Err(e) = self.ports.limiter.remove(&limits).await
        {
            warn!(vm_id = %vm, error = %e, "removing the VM limits failed");
        }
        if let Some(overlay) = self.overlay.take()
            && let Err(e) = self.ports.overlays.release(&overlay).await
        {
            warn!(vm_id = %vm, error = %e, "releasing the overlay failed");
        }
        if let Some(dir) = self.work_dir.take() {
            // A dying VM process may still close files in it: retry briefly.
            for attempt in 0..5u32 {
                match tokio::fs::remove_dir_all(&dir).await {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if attempt == 4 => {
                        warn!(vm_id = %vm, dir = %dir.display(), error = %e, "removing the work dir failed");
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
        // The slot goes last: capacity is free only once everything else is.
        drop(self.slot.take());
        debug!(vm_id = %vm, "VM torn down");
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if self.is_empty() {
            return;
        }
        if self.in_background {
            self.release_sync();
            return;
        }
        let mut rest = self.take();
        rest.in_background = true;
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(rest.run());
            }
            Err(_) => rest.release_sync(),
        }
    }
}

struct VmInner {
    id: VmId,
    language: Language,
    memory_mb: u32,
    state: Mutex<VmLifecycle>,
    process: Arc<dyn VmProcess>,
    conn: Arc<dyn GuestConnection>,
    limits: Option<LimitHandle>,
    limiter: Arc<dyn ResourceLimiter>,
    exposed_ports: Vec<ExposedPort>,
    agent: AgentInfo,
    timings: Mutex<BootTimings>,
    /// RAM file and device-state path of a VM booted to be saved.
    saveable: Option<(PathBuf, PathBuf)>,
    teardown: tokio::sync::Mutex<Option<Teardown>>,
    destroyed: AtomicBool,
    registry: Arc<Mutex<HashMap<VmId, Arc<VmInner>>>>,
}

/// A running VM whose agent has answered. Destroyed by [`Vm::destroy`], or in the
/// background when dropped.
pub struct Vm {
    inner: Arc<VmInner>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.inner.id)
            .field("language", &self.inner.language)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// The VM's id.
    pub fn id(&self) -> VmId {
        self.inner.id
    }

    /// The language of its image.
    pub fn language(&self) -> Language {
        self.inner.language
    }

    /// Guest memory in MiB.
    pub fn memory_mb(&self) -> u32 {
        self.inner.memory_mb
    }

    /// Lifecycle state.
    pub fn state(&self) -> VmState {
        match self.inner.state.lock() {
            Ok(s) => s.state(),
            Err(poisoned) => poisoned.into_inner().state(),
        }
    }

    /// Moves the lifecycle, refusing illegal transitions.
    pub(crate) fn transition(&self, next: VmState) -> Result<()> {
        let mut guard = match self.inner.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        guard.transition(next).map(|_| ()).map_err(|e| {
            Error::permanent(PermanentCause::Internal, e.to_string()).with_vm(self.inner.id)
        })
    }

    /// Ports exposed on the host.
    pub fn exposed_ports(&self) -> &[ExposedPort] {
        &self.inner.exposed_ports
    }

    /// What the agent reported at the handshake.
    pub fn agent(&self) -> &AgentInfo {
        &self.inner.agent
    }

    /// How creating this VM went.
    pub fn boot_timings(&self) -> BootTimings {
        match self.inner.timings.lock() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The guest connection.
    pub(crate) fn conn(&self) -> &Arc<dyn GuestConnection> {
        &self.inner.conn
    }

    /// The VM process.
    pub(crate) fn process(&self) -> &Arc<dyn VmProcess> {
        &self.inner.process
    }

    /// RAM file and device-state path of a VM booted to be saved.
    pub(crate) fn saveable_files(&self) -> Option<(PathBuf, PathBuf)> {
        self.inner.saveable.clone()
    }

    /// How this VM started.
    pub fn start_kind(&self) -> crate::result::VmStart {
        if self.boot_timings().restored {
            crate::result::VmStart::Snapshot
        } else {
            crate::result::VmStart::Cold
        }
    }

    /// True while the VM process runs and the channel is up.
    pub fn is_alive(&self) -> bool {
        !self.inner.destroyed.load(Ordering::SeqCst)
            && self.inner.process.try_exit().is_none()
            && self.inner.conn.is_alive()
    }

    /// Last console lines, for diagnostics.
    pub fn console_tail(&self) -> String {
        self.inner.process.console_tail()
    }

    /// Resolves when the VM process exits.
    pub async fn wait_exit(&self) -> crate::ports::ExitInfo {
        self.inner.process.wait_exit().await
    }

    /// CPU time and peak memory measured by the host.
    pub async fn usage(&self) -> ResourceUsage {
        match &self.inner.limits {
            Some(handle) => self.inner.limiter.usage(handle).await.unwrap_or_default(),
            None => ResourceUsage::default(),
        }
    }

    /// Destroys the VM: kills the process, closes the channel, removes the work dir,
    /// overlay, limits and network, releases the slot. Idempotent; returns how long it took.
    pub async fn destroy(&self) -> Duration {
        destroy_inner(&self.inner).await
    }
}

async fn destroy_inner(inner: &Arc<VmInner>) -> Duration {
    let started = Instant::now();
    let teardown = inner.teardown.lock().await.take();
    if let Some(teardown) = teardown {
        inner.destroyed.store(true, Ordering::SeqCst);
        {
            let mut state = match inner.state.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            if state.state() != VmState::Destroying {
                let _ = state.transition(VmState::Destroying);
            }
        }
        teardown.run().await;
        {
            let mut state = match inner.state.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            let _ = state.transition(VmState::Destroyed);
        }
        if let Ok(mut reg) = inner.registry.lock() {
            reg.remove(&inner.id);
        }
    }
    started.elapsed()
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.inner.destroyed.load(Ordering::SeqCst) {
            return;
        }
        let inner = self.inner.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                destroy_inner(&inner).await;
            });
        }
    }
}

/// One of the manager's `max_vms` slots, reserved ahead of [`VmManager::create_vm_with_slot`];
/// given back when dropped unused, else held for the VM's whole life.
#[derive(Debug)]
pub struct VmSlot(OwnedSemaphorePermit);

/// Creates and destroys VMs through the ports.
#[derive(Clone)]
pub struct VmManager {
    cfg: Arc<VmManagerConfig>,
    pub(crate) ports: Ports,
    slots: Arc<Semaphore>,
    registry: Arc<Mutex<HashMap<VmId, Arc<VmInner>>>>,
    /// Content digests of the guest assets, with the (size, mtime) they were taken at.
    pub(crate) digests: crate::restore::DigestCache,
}

impl std::fmt::Debug for VmManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmManager")
            .field("live", &self.live_count())
            .field("free_slots", &self.slots.available_permits())
            .finish_non_exhaustive()
    }
}

/// A random factor in [0.5, 1.5) for backoff jitter.
fn jitter() -> f64 {
    let r = uuid::Uuid::new_v4().as_u128() as u64;
    0.5 + (r % 1_000_000) as f64 / 1_000_000.0
}

/// Delay before retry `attempt` (1-based): `base · 2^(attempt-1)`, jittered, capped.
pub fn backoff_delay(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    exp.mul_f64(jitter()).min(max)
}

impl VmManager {
    /// A manager over `ports`.
    pub fn new(cfg: VmManagerConfig, ports: Ports) -> Self {
        let reaped = reap_stale_work_dirs(&cfg.work_root);
        if reaped > 0 {
            warn!(reaped, root = %cfg.work_root.display(), "removed work dirs of VMs whose host process died");
        }
        let slots = Arc::new(Semaphore::new(cfg.max_vms.max(1)));
        Self {
            cfg: Arc::new(cfg),
            ports,
            slots,
            registry: Arc::new(Mutex::new(HashMap::new())),
            digests: Default::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &VmManagerConfig {
        &self.cfg
    }

    /// Number of live VMs.
    pub fn live_count(&self) -> usize {
        self.registry.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Free VM slots.
    pub fn free_slots(&self) -> usize {
        self.slots.available_permits()
    }

    /// Destroys every live VM (shutdown, SIGINT/SIGTERM).
    pub async fn destroy_all(&self) {
        let all: Vec<Arc<VmInner>> = match self.registry.lock() {
            Ok(r) => r.values().cloned().collect(),
            Err(_) => Vec::new(),
        };
        futures::future::join_all(all.iter().map(destroy_inner)).await;
    }

    /// Creates a VM and waits until its agent answers. Takes a VM slot first, waiting at
    /// most `opts.slot_wait` (else the configured `slot_timeout`).
    pub async fn create_vm(&self, opts: VmOptions) -> Result<Vm> {
        self.check_options(&opts)?;
        let started = Instant::now();
        let slot = self
            .reserve_slot(opts.slot_wait.unwrap_or(self.cfg.slot_timeout))
            .await?;
        self.create_vm_in(slot, opts, started).await
    }

    /// Creates a VM in a slot reserved beforehand with [`VmManager::reserve_slot`].
    pub async fn create_vm_with_slot(&self, slot: VmSlot, opts: VmOptions) -> Result<Vm> {
        self.check_options(&opts)?;
        self.create_vm_in(slot, opts, Instant::now()).await
    }

    /// Reserves a VM slot, waiting at most `wait` (FIFO among waiters; a zero wait never
    /// queues). Every slot taken is a transient capacity error after the wait.
    pub async fn reserve_slot(&self, wait: Duration) -> Result<VmSlot> {
        self.acquire_slot(wait).await.map(VmSlot)
    }

    fn check_options(&self, opts: &VmOptions) -> Result<()> {
        let tenant = opts
            .tenant
            .clone()
            .unwrap_or_else(|| self.cfg.default_tenant.clone());
        validate_identifier("tenant", &tenant)?;
        self.cfg.assets.check(opts.language)?;
        if !matches!(opts.network, NetworkPolicy::None) && self.ports.network.is_none() {
            return Err(Error::permanent(
                PermanentCause::Config,
                "networking was requested but no network proxy is configured",
            ));
        }
        Ok(())
    }

    async fn create_vm_in(&self, slot: VmSlot, opts: VmOptions, started: Instant) -> Result<Vm> {
        // A VM restored from its L1 snapshot when one exists, else booted.
        let restore = self.find_snapshot(&opts).await;
        let memory = match &restore {
            Some(s) => MemoryBacking::Restore {
                ram: s.ram.clone(),
                state: s.state.clone(),
            },
            None => MemoryBacking::Anonymous,
        };
        let restoring = matches!(memory, MemoryBacking::Restore { .. });
        let vm = self
            .create_vm_as(slot, opts.clone(), started, memory)
            .await?;
        if !restoring || !vm.boot_timings().restored {
            return Ok(vm);
        }
        // A clone: before anything else, the guest gets the host's clock and fresh
        // entropy, and every REPL reseeds (clones of one snapshot must diverge).
        match vm.resume().await {
            Ok(info) => {
                debug!(vm_id = %vm.id(), reseeded = info.reseeded, took_ms = info.round_trip_ms, "clone resumed");
                // The resume is part of starting the VM.
                if let Ok(mut t) = vm.inner.timings.lock() {
                    t.boot_ms += info.round_trip_ms;
                    t.total_ms = millis(started.elapsed());
                }
                Ok(vm)
            }
            Err(e) => {
                warn!(vm_id = %vm.id(), error = %e, "a restored VM did not resume: discarding the snapshot, booting cold");
                vm.destroy().await;
                self.discard_snapshot(&opts).await;
                let slot = self
                    .reserve_slot(opts.slot_wait.unwrap_or(self.cfg.slot_timeout))
                    .await?;
                self.create_vm_as(slot, opts, started, MemoryBacking::Anonymous)
                    .await
            }
        }
    }

    /// Creates a VM in `slot` whose RAM is `memory`. A failed restore falls back to a cold
    /// boot (the snapshot is discarded: it may be what failed).
    pub(crate) async fn create_vm_as(
        &self,
        slot: VmSlot,
        opts: VmOptions,
        started: Instant,
        mut memory: MemoryBacking,
    ) -> Result<Vm> {
        let slot = slot.0;
        let tenant = opts
            .tenant
            .clone()
            .unwrap_or_else(|| self.cfg.default_tenant.clone());
        let base = self.cfg.assets.check(opts.language)?.to_path_buf();
        let mut timings = BootTimings {
            slot_ms: millis(started.elapsed()),
            ..Default::default()
        };

        let attempts = self.cfg.boot_attempts.max(1);
        let mut attempt = 1;
        loop {
            let vm_id = VmId::new();
            let span = info_span!("create_vm", vm_id = %vm_id, language = %opts.language, attempt);
            // Owns what the attempt acquires: released before the next attempt or the error
            // is returned, and from Drop if this future is cancelled.
            let mut teardown = Teardown::new(vm_id, self.ports.clone(), self.cfg.kill_grace);
            // Boxed: the boot future is large and retries would otherwise grow the stack.
            let outcome = Box::pin(
                self.boot_once(
                    vm_id,
                    BootPlan {
                        opts: &opts,
                        tenant: &tenant,
                        base: &base,
                        memory: &memory,
                    },
                    &mut timings,
                    &mut teardown,
                )
                .instrument(span),
            )
            .await;
            if outcome.is_err() {
                teardown.take().run().await;
            }
            match outcome {
                Ok(mut booted) => {
                    timings.total_ms = millis(started.elapsed());
                    timings.restored = matches!(memory, MemoryBacking::Restore { .. });
                    booted.teardown.slot = Some(slot);
                    return Ok(self.register(booted, opts.language, opts.memory_mb, timings));
                }
                Err(e) if matches!(memory, MemoryBacking::Restore { .. }) => {
                    warn!(vm_id = %vm_id, error = %e, "restoring the L1 snapshot failed: discarding it, booting cold");
                    self.discard_snapshot(&opts).await;
                    memory = MemoryBacking::Anonymous;
                    timings.retries += 1;
                }
                Err(e) if e.is_retryable() && attempt < attempts => {
                    let delay = backoff_delay(self.cfg.backoff_base, self.cfg.backoff_max, attempt);
                    warn!(vm_id = %vm_id, attempt, error = %e, delay_ms = millis(delay), "boot failed, retrying");
                    timings.retries += 1;
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A VM slot, waiting at most `wait` (FIFO among waiters; a zero wait never queues).
    async fn acquire_slot(&self, wait: Duration) -> Result<OwnedSemaphorePermit> {
        let closed = || Error::permanent(PermanentCause::Internal, "the VM manager is shut down");
        let busy = || {
            Error::transient(
                TransientCause::Capacity,
                format!(
                    "all {} VM slots are taken (waited {} ms)",
                    self.cfg.max_vms.max(1),
                    millis(wait)
                ),
            )
        };
        if wait.is_zero() {
            return match self.slots.clone().try_acquire_owned() {
                Ok(slot) => Ok(slot),
                Err(tokio::sync::TryAcquireError::Closed) => Err(closed()),
                Err(tokio::sync::TryAcquireError::NoPermits) => Err(busy()),
            };
        }
        match tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(busy()),
        }
    }

    fn register(
        &self,
        booted: Booted,
        language: Language,
        memory_mb: u32,
        timings: BootTimings,
    ) -> Vm {
        let mut lifecycle = VmLifecycle::new();
        let _ = lifecycle.transition(VmState::Booting);
        let _ = lifecycle.transition(VmState::Ready);
        let inner = Arc::new(VmInner {
            id: booted.vm_id,
            language,
            memory_mb,
            state: Mutex::new(lifecycle),
            process: booted.process,
            conn: booted.conn,
            limits: booted.limits,
            limiter: self.ports.limiter.clone(),
            exposed_ports: booted.exposed_ports,
            agent: booted.agent,
            timings: Mutex::new(timings),
            saveable: booted.saveable,
            teardown: tokio::sync::Mutex::new(Some(booted.teardown)),
            destroyed: AtomicBool::new(false),
            registry: self.registry.clone(),
        });
        if let Ok(mut reg) = self.registry.lock() {
            reg.insert(inner.id, inner.clone());
        }
        Vm { inner }
    }

    async fn boot_once(
        &self,
        vm_id: VmId,
        plan: BootPlan<'_>,
        timings: &mut BootTimings,
        teardown: &mut Teardown,
    ) -> Result<Booted> {
        let BootPlan {
            opts,
            tenant,
            base,
            memory,
        } = plan;
        let cfg = &self.cfg;
        let setup_started = Instant::now();

        let work_dir = cfg
            .work_root
            .join(format!("vm-{}-{}", std::process::id(), vm_id.short()));
        create_private_dir(&work_dir).await.map_err(|e| {
            Error::transient(
                TransientCause::Infrastructure,
                format!("cannot create work dir {}", work_dir.display()),
            )
            .with_source(e)
            .with_vm(vm_id)
        })?;
        teardown.work_dir = Some(work_dir.clone());

        let limits = ResourceLimits {
            tenant: tenant.to_owned(),
            memory_max_bytes: (u64::from(opts.memory_mb) + cfg.vm_overhead_mb) * 1024 * 1024,
            cpu_max_cores: f64::from(cfg.vcpus) + 0.25,
            pids_max: cfg.pids_max,
        };
        let overlay_started = Instant::now();
        // Each result goes into the guard the moment it arrives (no await in between), so
        // a cancellation while the other is still pending, or a failure of the other,
        // never loses what one of them acquired.
        let (overlay, limit_handle) = {
            let guard = std::sync::Mutex::new(&mut *teardown);
            let keep = |f: &dyn Fn(&mut Teardown)| match guard.lock() {
                Ok(mut g) => f(&mut g),
                Err(poisoned) => f(&mut poisoned.into_inner()),
            };
            tokio::join!(
                async {
                    let r = self.ports.overlays.acquire(base, &work_dir).await;
                    if let Ok(o) = &r {
                        keep(&|t| t.overlay = Some(o.clone()));
                    }
                    (r, overlay_started.elapsed())
                },
                async {
                    let r = self.ports.limiter.create(vm_id, &limits).await;
                    if let Ok(h) = &r {
                        keep(&|t| t.limits = Some(h.clone()));
                    }
                    r
                },
            )
        };
        let (overlay, overlay_took) = overlay;
        let overlay = overlay.map_err(|e| e.with_vm(vm_id).with_operation("overlay"))?;
        let limit_handle = limit_handle.map_err(|e| e.with_vm(vm_id).with_operation("limits"))?;

        let mut network_attachment = None;
        let mut exposed_ports = Vec::new();
        let mut kernel_args = Vec::new();
        if !matches!(opts.network, NetworkPolicy::None)
            && let Some(proxy) = &self.ports.network
        {
            let handle = proxy
                .start(vm_id, &opts.network, &work_dir)
                .await
                .map_err(|e| e.with_vm(vm_id).with_operation("network"))?;
            network_attachment = Some(handle.attachment.clone());
            exposed_ports = handle.exposed_ports.clone();
            kernel_args = handle.guest_kernel_args.clone();
            teardown.network = Some(handle);
        }

        // A saveable VM's RAM file lives in its work dir (shared with QEMU's user).
        let memory = match memory {
            MemoryBacking::SharedFile { path } if path.is_relative() => MemoryBacking::SharedFile {
                path: work_dir.join(path),
            },
            other => other.clone(),
        };
        let spec = VmSpec {
            vm_id,
            work_dir: work_dir.clone(),
            kernel: cfg.assets.kernel.clone(),
            initramfs: cfg.assets.initramfs.clone(),
            disk: overlay.path.clone(),
            memory_mb: opts.memory_mb,
            memory: memory.clone(),
            home_disk_mb: opts.disk_mb,
            vcpus: cfg.vcpus,
            accelerator: cfg.accelerator,
            agent_socket: work_dir.join("agent.sock"),
            qmp_socket: work_dir.join("qmp.sock"),
            network: network_attachment,
            console: ConsoleSpec {
                log_path: work_dir.join("console.log"),
                max_bytes: cfg.console_max_bytes,
                lines: opts.boot_log.clone(),
                verbose: opts.boot_log.is_some(),
            },
            kernel_args,
        };
        let setup_took = setup_started.elapsed();

        let boot_started = Instant::now();
        let process: Arc<dyn VmProcess> = Arc::from(
            self.ports
                .hypervisor
                .launch(&spec)
                .await
                .map_err(|e| e.with_vm(vm_id).with_operation("launch"))?,
        );
        teardown.process = Some(process.clone());
        if let Some(pid) = process.pid()
            && let Err(e) = self.ports.limiter.attach(&limit_handle, pid).await
        {
            return Err(e.with_vm(vm_id).with_operation("limits"));
        }

        let wait_started = Instant::now();
        let connect = self
            .ports
            .channel
            .connect(&spec.agent_socket, cfg.boot_timeout);
        let outcome = tokio::select! {
            exit = process.wait_exit() => Err(Error::transient(
                TransientCause::QemuCrash,
                format!(
                    "the VM process exited during boot ({exit}); stderr: {}; console: {}",
                    tail_or_none(&process.stderr_tail()),
                    tail_or_none(&process.console_tail()),
                ),
            )),
            r = tokio::time::timeout(cfg.boot_timeout, connect) => match r {
                Ok(Ok(pair)) => Ok(pair),
                // Nothing was dispatched yet: a channel failure during boot is a boot
                // failure (transient), unless the adapter says it is permanent.
                Ok(Err(e)) if matches!(e.kind(), ErrorKind::Permanent(_)) => Err(e),
                Ok(Err(e)) => {
                    let cause = if process.try_exit().is_some() {
                        TransientCause::QemuCrash
                    } else {
                        TransientCause::BootTimeout
                    };
                    Err(Error::transient(
                        cause,
                        format!(
                            "the guest agent channel failed during boot: {}; console: {}",
                            e.message(),
                            tail_or_none(&process.console_tail()),
                        ),
                    ))
                }
                Err(_) => Err(Error::transient(
                    TransientCause::BootTimeout,
                    format!(
                        "the guest agent did not answer within {} s; console: {}",
                        cfg.boot_timeout.as_secs(),
                        tail_or_none(&process.console_tail()),
                    ),
                )),
            },
        };
        let (conn, agent) = outcome.map_err(|e| e.with_vm(vm_id).with_operation("boot"))?;
        let conn: Arc<dyn GuestConnection> = Arc::from(conn);
        teardown.conn = Some(conn.clone());

        timings.setup_ms = millis(setup_took);
        timings.overlay_ms = millis(overlay_took);
        timings.guest_wait_ms = millis(wait_started.elapsed());
        timings.boot_ms = millis(boot_started.elapsed());
        let saveable = match &memory {
            MemoryBacking::SharedFile { path } => Some((path.clone(), work_dir.join("state"))),
            _ => None,
        };
        Ok(Booted {
            vm_id,
            process,
            conn,
            limits: Some(limit_handle),
            exposed_ports,
            agent,
            saveable,
            teardown: teardown.take(),
        })
    }
}

/// What one boot attempt starts from.
struct BootPlan<'a> {
    opts: &'a VmOptions,
    tenant: &'a str,
    base: &'a Path,
    memory: &'a MemoryBacking,
}

struct Booted {
    vm_id: VmId,
    process: Arc<dyn VmProcess>,
    conn: Arc<dyn GuestConnection>,
    limits: Option<LimitHandle>,
    exposed_ports: Vec<ExposedPort>,
    agent: AgentInfo,
    saveable: Option<(PathBuf, PathBuf)>,
    teardown: Teardown,
}

/// Removes `vm-<pid>-*` work dirs under `root` whose owning process is gone (a host
/// program that was SIGKILLed cannot clean up; its QEMUs died with it). Returns how many.
pub fn reap_stale_work_dirs(root: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut reaped = 0;
    for entry in entries.filter_map(std::result::Result::ok) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(pid) = name
            .strip_prefix("vm-")
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = Path::new("/proc").join(pid.to_string()).exists();
        if !alive && std::fs::remove_dir_all(entry.path()).is_ok() {
            reaped += 1;
        }
    }
    reaped
}

fn tail_or_none(s: &str) -> String {
    let t = s.trim();
    if t.is_empty() {
        "(empty)".to_owned()
    } else {
        let lines: Vec<&str> = t.lines().collect();
        let start = lines.len().saturating_sub(20);
        lines[start..].join("\n")
    }
}

async fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = tokio::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    builder.mode(0o700);
    builder.create(dir).await
}
