//! sbx: run untrusted code in QEMU microVMs.
//!
//! This crate is the one place that wires the default adapters together: the probes decide
//! the accelerator and the isolation layers, `qemu-cmd` launches QEMU and talks to the guest
//! agent, `overlay` hands out qcow2 overlays, `cgroupv2` applies limits (or rlimits) and
//! `netproxy` provides the guest's only network path. [`Sbx::start`] returns a running
//! [`Scheduler`]; the `sbx` binary is a thin CLI over it.
//!
//! ```no_run
//! # async fn demo() -> sandbox_core::Result<()> {
//! use sbx::{Sbx, SbxConfig};
//! use sandbox_core::{ExecRequest, Language, OutputCallbacks, RunOptions, RunRequest, SessionRequest};
//!
//! let sbx = Sbx::start(SbxConfig::from_env()).await?;
//! let result = sbx
//!     .scheduler()
//!     .run(RunRequest::new(Language::Python, "print('hi')"), RunOptions::default())
//!     .await?;
//! assert_eq!(result.stdout, "hi\n");
//!
//! let session = sbx
//!     .scheduler()
//!     .session(SessionRequest::new(Language::Python), RunOptions::default())
//!     .await?;
//! session.write_bytes("data.txt", b"42", false).await?;
//! let r = session
//!     .exec(ExecRequest::new("print(open('data.txt').read())"), &OutputCallbacks::default())
//!     .await?;
//! assert_eq!(r.stdout, "42\n");
//! session.close().await;
//! sbx.stop().await;
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sandbox_core::admission::AdmissionConfig;
use sandbox_core::ports::NetworkProxy;
use sandbox_core::{
    Error, GuestAssets, Language, PermanentCause, Ports, Result, Scheduler, SchedulerConfig,
    VmManager, VmManagerConfig,
};
use serde::Serialize;

pub mod doctor;
pub mod mcp;
pub mod repl;
pub mod serve;
pub mod setup;
pub mod term;

/// Settings of the default wiring. [`SbxConfig::from_env`] reads the environment.
#[derive(Debug, Clone)]
pub struct SbxConfig {
    /// Where `cargo xtask assets` put the guest assets.
    pub assets_dir: PathBuf,
    /// Parent of per-VM work dirs (keep it short: unix socket paths ≤ 108 bytes).
    pub work_dir: PathBuf,
    /// Warm VMs per language.
    pub warm_pool_size: usize,
    /// Pre-created overlays per base image.
    pub overlay_pool_size: usize,
    /// Most VMs alive at once.
    pub max_vms: usize,
    /// Enforce memory/CPU admission budgets.
    pub admission: bool,
    /// Scheduler defaults.
    pub scheduler: SchedulerConfig,
    /// Settings of the network proxy (`None`: the defaults, with the host's resolver).
    /// Tests set a `netproxy::StaticResolver` and `allow_loopback_upstreams` here.
    pub network: Option<netproxy::ProxyConfig>,
    /// Boot deadline per attempt (default: 30 s under TCG, 15 s under KVM).
    pub boot_timeout: Option<Duration>,
    /// Boot attempts for transient failures (default 3).
    pub boot_attempts: Option<u32>,
    /// L1 memory snapshots: where they are kept, or `None` to boot every VM cold
    /// (`SBX_SNAPSHOTS=0`). Default `$SBX_SNAPSHOT_DIR`, else `~/.cache/sbx/snapshots`.
    pub snapshot_dir: Option<PathBuf>,
    /// Which package allowlist requests are checked against, unless
    /// `scheduler.package_allowlist` is already set (default: `SBX_PACKAGE_ALLOWLIST`, else
    /// the shipped list).
    pub package_allowlist: AllowlistSetting,
    /// Package layers (L2): where they are cached, or `None` to refuse requests with
    /// packages (`SBX_PACKAGES=0`). Default `$SBX_PACKAGE_DIR`, else
    /// `~/.cache/sbx/packages`.
    pub package_dir: Option<PathBuf>,
}

/// The package allowlist shipped with sbx (`crates/sbx/package-allowlist.txt`).
pub const SHIPPED_PACKAGE_ALLOWLIST: &str = include_str!("../package-allowlist.txt");

/// Where the package allowlist comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AllowlistSetting {
    /// The list shipped with sbx ([`SHIPPED_PACKAGE_ALLOWLIST`]).
    #[default]
    Shipped,
    /// The operator's own file (same format).
    File(PathBuf),
    /// No allowlist: any package may be asked for (an explicit operator decision).
    Off,
}

impl AllowlistSetting {
    /// `SBX_PACKAGE_ALLOWLIST`: `off` (also `0`, `none`, `false`) turns the check off, any
    /// other non-empty value is a file; unset or empty: the shipped list.
    pub fn from_env() -> Self {
        match std::env::var_os("SBX_PACKAGE_ALLOWLIST") {
            Some(v) if v.is_empty() => Self::Shipped,
            Some(v) => match v.to_str().map(|s| s.trim().to_ascii_lowercase()).as_deref() {
                Some("off" | "0" | "none" | "false" | "no") => Self::Off,
                _ => Self::File(PathBuf::from(v)),
            },
            None => Self::Shipped,
        }
    }

    /// From the CLI flags `--package-allowlist FILE` / `--no-package-allowlist`, else the
    /// environment.
    pub fn from_flags(file: Option<PathBuf>, off: bool) -> Self {
        match (file, off) {
            (_, true) => Self::Off,
            (Some(f), false) => Self::File(f),
            (None, false) => Self::from_env(),
        }
    }

    /// The list, or `None` when the check is off; a file that cannot be read or parsed is
    /// an error (never silently no list).
    pub fn load(&self) -> Result<Option<Arc<sandbox_core::PackageAllowlist>>> {
        let list = match self {
            Self::Shipped => sandbox_core::PackageAllowlist::parse(
                SHIPPED_PACKAGE_ALLOWLIST,
                "shipped package-allowlist.txt",
            )?,
            Self::File(path) => sandbox_core::PackageAllowlist::load(path)?,
            Self::Off => return Ok(None),
        };
        Ok(Some(Arc::new(list)))
    }
}

/// The L2 package layer store in `dir` for the guests described by the assets manifest in
/// `assets_dir` (a language whose interpreter the manifest does not name gets no layers:
/// its requests with packages are refused).
pub fn package_layer_store(
    dir: &std::path::Path,
    assets_dir: &std::path::Path,
) -> Result<Arc<dyn sandbox_core::PackageLayers>> {
    let manifest = assets_dir.join("manifest.json");
    let mut targets = Vec::new();
    for lang in [Language::Python, Language::Javascript] {
        match package_layers::GuestTarget::from_assets_manifest(&manifest, lang) {
            Ok(t) => targets.push(t),
            Err(e) => tracing::warn!(%lang, err = %e, "no package layers for this language"),
        }
    }
    let store =
        package_layers::FsPackageLayers::open(package_layers::LayerConfig::new(dir), targets)
            .map_err(Error::from)?;
    Ok(Arc::new(store))
}

/// The default assets dir: `$SBX_ASSETS_DIR`, else `~/.cache/sbx/assets`.
pub fn default_assets_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SBX_ASSETS_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/sbx/assets")
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

impl SbxConfig {
    /// Defaults, overridden by `SBX_ASSETS_DIR`, `SBX_WORK_DIR`, `SBX_WARM_POOL`,
    /// `SBX_MAX_VMS`.
    pub fn from_env() -> Self {
        let uid = nix::unistd::Uid::effective().as_raw();
        let work_dir = std::env::var_os("SBX_WORK_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join(format!("sbx-{uid}")));
        let warm_pool_size = env_usize("SBX_WARM_POOL").unwrap_or(0);
        Self {
            assets_dir: default_assets_dir(),
            work_dir,
            warm_pool_size,
            overlay_pool_size: 2,
            max_vms: env_usize("SBX_MAX_VMS").unwrap_or(32),
            admission: true,
            scheduler: SchedulerConfig {
                warm_pool_size,
                ..SchedulerConfig::default()
            },
            network: network_from_env(),
            boot_timeout: None,
            boot_attempts: None,
            snapshot_dir: match std::env::var("SBX_SNAPSHOTS").as_deref().map(str::trim) {
                Ok("0" | "off" | "false" | "no") => None,
                _ => Some(snapshot_store::default_root()),
            },
            package_allowlist: AllowlistSetting::from_env(),
            package_dir: match std::env::var("SBX_PACKAGES").as_deref().map(str::trim) {
                Ok("0" | "off" | "false" | "no") => None,
                _ => Some(package_layers::default_root()),
            },
        }
    }
}

/// `SBX_NET_ALLOW_RANGES` (comma-separated `A.B.C.D/N`): special-purpose ranges (private,
/// shared, benchmarking...) guests may reach in open and allowlist modes. Unset: none, and
/// the proxy's defaults. An entry that does not parse is left out (and logged): the
/// mistake can only make the policy stricter.
fn network_from_env() -> Option<netproxy::ProxyConfig> {
    let value = std::env::var("SBX_NET_ALLOW_RANGES").ok()?;
    let mut allowed_ranges = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<netproxy::Ipv4Range>() {
            Ok(r) => allowed_ranges.push(r),
            Err(e) => tracing::warn!(error = %e, "SBX_NET_ALLOW_RANGES: entry left out"),
        }
    }
    Some(netproxy::ProxyConfig {
        allowed_ranges,
        ..netproxy::ProxyConfig::default()
    })
}

/// Host memory (MiB) and CPUs, bounded by the cgroup this process runs under.
pub fn host_capacity() -> (u64, f64) {
    let mut mem_mb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(4096);
    for path in [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ] {
        if let Some(limit) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            mem_mb = mem_mb.min(limit / (1024 * 1024));
        }
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0);
    (mem_mb.max(1), cpus)
}

/// What the running instance is made of, for `doctor` and `serve`.
#[derive(Debug, Clone, Serialize)]
pub struct Wiring {
    /// Accelerator in use.
    pub accelerator: String,
    /// Why that accelerator.
    pub accelerator_reason: String,
    /// How limits are enforced (cgroup v2 or rlimits) and why.
    pub limit_mode: String,
    /// Assets directory.
    pub assets_dir: PathBuf,
    /// Work directory.
    pub work_dir: PathBuf,
    /// Networking available.
    pub network: bool,
    /// Who QEMU runs as, and why.
    pub qemu_user: String,
    /// Where L1 snapshots are kept (`None`: off).
    pub snapshot_dir: Option<PathBuf>,
}

/// A started sbx instance: a scheduler over the default adapters.
pub struct Sbx {
    scheduler: Scheduler,
    overlays: Arc<overlay::OverlayPool>,
    wiring: Wiring,
}

impl std::fmt::Debug for Sbx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sbx").field("wiring", &self.wiring).finish()
    }
}

impl Sbx {
    /// Probes the host, wires the adapters and starts the scheduler.
    pub async fn start(cfg: SbxConfig) -> Result<Self> {
        let report = probes::host_report().await;
        let qemu = qemu_cmd::QemuHypervisor::from_report(report)?;
        let assets = GuestAssets::in_dir(&cfg.assets_dir);
        if !assets.kernel.is_file() {
            return Err(Error::permanent(
                PermanentCause::MissingDependency,
                format!(
                    "guest assets not found in {}: build them with `cargo xtask assets` \
                     (or set SBX_ASSETS_DIR)",
                    cfg.assets_dir.display()
                ),
            ));
        }
        std::fs::create_dir_all(&cfg.work_dir).map_err(|e| {
            Error::permanent(
                PermanentCause::Host,
                format!("cannot create work dir {}", cfg.work_dir.display()),
            )
            .with_source(e)
        })?;
        let (isolation, qemu_user) = setup::isolation(report, &cfg.assets_dir, &cfg.work_dir).await;
        let qemu = qemu.with_isolation(isolation);
        let overlays = Arc::new(
            overlay::OverlayPool::new(overlay::PoolConfig {
                pool_root: Some(cfg.work_dir.clone()),
                size_per_base: cfg.overlay_pool_size,
                ..overlay::PoolConfig::default()
            })
            .map_err(Error::from)?,
        );
        let limiter =
            cgroupv2::CgroupLimiter::new(cgroupv2::CgroupConfig::default()).map_err(Error::from)?;
        let limit_mode = format!("{:?}: {}", limiter.mode(), limiter.reason());
        let channel = qemu_cmd::SerialGuestChannel::new(qemu.qemu_uid());
        let network: Option<Arc<dyn NetworkProxy>> = netproxy_adapter(cfg.network.clone());
        let accelerator = report.accelerator();
        let snapshots = match &cfg.snapshot_dir {
            Some(dir) => {
                let store =
                    snapshot_store::FsSnapshotStore::open(dir.clone()).map_err(Error::from)?;
                Some(Arc::new(store) as Arc<dyn sandbox_core::snapshot::SnapshotStore>)
            }
            None => None,
        };
        let packages = match &cfg.package_dir {
            Some(dir) => Some(package_layer_store(dir, &cfg.assets_dir)?),
            None => None,
        };
        let ports = Ports {
            hypervisor: Arc::new(qemu),
            overlays: overlays.clone(),
            limiter: Arc::new(limiter),
            network: network.clone(),
            channel: Arc::new(channel),
            snapshots,
            packages,
        };
        let mut vm_cfg = VmManagerConfig::new(assets, cfg.work_dir.clone(), accelerator);
        vm_cfg.max_vms = cfg.max_vms;
        if let Some(t) = cfg.boot_timeout {
            vm_cfg.boot_timeout = t;
        }
        if let Some(n) = cfg.boot_attempts {
            vm_cfg.boot_attempts = n;
        }
        let manager = VmManager::new(vm_cfg, ports);
        let mut sched_cfg = cfg.scheduler.clone();
        if sched_cfg.package_allowlist.is_none() {
            sched_cfg.package_allowlist = cfg.package_allowlist.load()?;
        }
        if cfg.admission {
            let (mem, cpus) = host_capacity();
            sched_cfg.admission = Some(AdmissionConfig::for_host(mem, cpus));
        }
        let scheduler = Scheduler::new(sched_cfg, manager)?;
        scheduler.start()?;
        let wiring = Wiring {
            accelerator: accelerator.to_string(),
            accelerator_reason: report.accelerator.reason.clone(),
            limit_mode,
            assets_dir: cfg.assets_dir.clone(),
            work_dir: cfg.work_dir.clone(),
            network: network.is_some(),
            qemu_user: qemu_user.describe(),
            snapshot_dir: cfg.snapshot_dir.clone(),
        };
        Ok(Self {
            scheduler,
            overlays,
            wiring,
        })
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// What this instance is made of.
    pub fn wiring(&self) -> &Wiring {
        &self.wiring
    }

    /// Stops everything: warm pool, sessions, VMs, overlay pool.
    pub async fn stop(&self) {
        self.scheduler.stop().await;
        self.overlays.shutdown().await;
    }

    /// Waits for the warm pool to fill.
    pub async fn wait_pool_ready(&self, timeout: Duration) -> bool {
        self.scheduler.wait_pool_ready(timeout).await
    }
}

/// The network proxy adapter: a userspace gateway per VM inside this process.
fn netproxy_adapter(config: Option<netproxy::ProxyConfig>) -> Option<Arc<dyn NetworkProxy>> {
    Some(Arc::new(netproxy::NetProxy::new(
        config.unwrap_or_default(),
    )))
}

/// Parses a language name (case-insensitive) or detects it from a file name.
pub fn language_for(name: Option<&str>, path: Option<&std::path::Path>) -> Result<Language> {
    if let Some(n) = name {
        return n.parse().map_err(|_| {
            Error::input(
                "language",
                format!("unknown language {n:?} (python, javascript, raw)"),
            )
        });
    }
    Ok(path
        .and_then(Language::from_path)
        .unwrap_or(Language::Python))
}
