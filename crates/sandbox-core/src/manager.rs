//! The VM manager: turns a request into a running, reachable, always-cleaned-up microVM.
//!
//! It talks only to the ports. `create_vm` takes a concurrency slot held for the VM's whole
//! life (waits are bounded by `slot_timeout`), picks the VM's memory — restored from the
//! L1 snapshot of its key when one exists, else booted — and builds the VM step by step
//! (see [`crate::vm`]). The manager keeps the registry of live VMs, so shutdown can
//! destroy every one of them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::warn;

use crate::Language;
use crate::error::{Error, PermanentCause, Result, TransientCause};
use crate::ports::{
    Accelerator, GuestChannel, Hypervisor, MemoryBacking, NetworkPolicy, NetworkProxy,
    OverlayStore, ResourceLimiter,
};
use crate::request::validate_identifier;
use crate::result::millis;
use crate::vm::{Booted, Registry, Vm, VmInner, destroy_inner};

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

/// One of the manager's `max_vms` slots, reserved ahead of [`VmManager::create_vm_with_slot`];
/// given back when dropped unused, else held for the VM's whole life.
#[derive(Debug)]
pub struct VmSlot(OwnedSemaphorePermit);

impl VmSlot {
    pub(crate) fn into_permit(self) -> OwnedSemaphorePermit {
        self.0
    }

    pub(crate) fn from_permit(permit: OwnedSemaphorePermit) -> Self {
        Self(permit)
    }
}

/// Creates and destroys VMs through the ports.
#[derive(Clone)]
pub struct VmManager {
    cfg: Arc<VmManagerConfig>,
    pub(crate) ports: Ports,
    slots: Arc<Semaphore>,
    registry: Registry,
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
        let memory = match self.find_snapshot(&opts).await {
            Some(s) => MemoryBacking::Restore {
                ram: s.ram.clone(),
                state: s.state.clone(),
            },
            None => MemoryBacking::Anonymous,
        };
        self.build_vm(slot, opts, started, memory).await
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

    /// Turns a booted VM into a registered [`Vm`] handle.
    pub(crate) fn register(
        &self,
        booted: Booted,
        language: Language,
        memory_mb: u32,
        timings: BootTimings,
    ) -> Vm {
        Vm::from_booted(
            booted,
            language,
            memory_mb,
            timings,
            self.ports.limiter.clone(),
            self.registry.clone(),
        )
    }
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
