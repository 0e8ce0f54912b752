//! [`CgroupLimiter`]: cgroup v2 limits per VM, or rlimits where v2 is not delegated.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use sandbox_core::VmId;
use sandbox_core::ports::{LimitHandle, LimitMode, ResourceLimiter, ResourceLimits, ResourceUsage};

use crate::error::CgroupError;
use crate::fs::{CgroupFs, RealFs};
use crate::procfs;
use crate::sys::{self, Resource};

/// The cgroup v2 controllers the limiter needs.
pub const REQUIRED_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// `cpu.max` period in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
const GIB: u64 = 1024 * 1024 * 1024;

/// The rlimits applied to a VM process in rlimit mode.
///
/// `RLIMIT_AS` bounds virtual address space, not resident memory. QEMU reserves far more
/// address space than it touches: under TCG the translation cache alone reserves up to
/// 1 GiB, every thread has an 8 MiB stack and glibc malloc arenas reserve 64 MiB each. A
/// paused 192 MiB microvm guest under TCG measured here at ~1.5 GiB of virtual size with
/// ~40 MiB resident. The default is therefore
/// `max(memory_max_bytes × 8, 4 GiB)`: for a 192 MiB guest (memory_max ≈ 400 MiB) that is
/// 4 GiB, for a 2 GiB guest ≈ 18 GiB. (The seed system used `ulimit -v` of 14× the guest
/// memory, i.e. ~2.7 GiB for 192 MiB — too tight for QEMU 10's default TCG buffer.) It
/// stops a runaway QEMU from exhausting the host's address space and overcommit; real
/// memory use is reported from `VmHWM`. CPU count and pids cannot be bounded per process
/// with rlimits (`RLIMIT_NPROC` is per user and is never set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlimitPolicy {
    /// `RLIMIT_AS` = `memory_max_bytes × address_space_factor` ...
    pub address_space_factor: u64,
    /// ... but at least this many bytes.
    pub min_address_space_bytes: u64,
    /// `RLIMIT_CPU` soft limit in seconds (SIGXCPU); the hard limit (SIGKILL) is 10 s more.
    pub cpu_seconds: u64,
    /// Set `RLIMIT_CORE` to 0 so that a crashing QEMU never dumps guest memory to disk.
    pub disable_core_dumps: bool,
}

impl Default for RlimitPolicy {
    fn default() -> Self {
        Self {
            address_space_factor: 8,
            min_address_space_bytes: 4 * GIB,
            cpu_seconds: 3600,
            disable_core_dumps: true,
        }
    }
}

impl RlimitPolicy {
    /// The `RLIMIT_AS` value for `limits`.
    pub fn address_space_bytes(&self, limits: &ResourceLimits) -> u64 {
        limits
            .memory_max_bytes
            .saturating_mul(self.address_space_factor)
            .max(self.min_address_space_bytes)
    }
}

/// Configuration of a [`CgroupLimiter`].
#[derive(Debug, Clone, PartialEq)]
pub struct CgroupConfig {
    /// The cgroup v2 mount (or the root of the subtree delegated to this program).
    pub cgroup_root: PathBuf,
    /// The proc file system.
    pub proc_root: PathBuf,
    /// Directory under the root that holds `<tenant>/<vm_id>` cgroups.
    pub base_name: String,
    /// `memory.high` as a fraction of `memory.max` (reclaim pressure before the OOM
    /// killer); `None` leaves it unset.
    pub memory_high_ratio: Option<f64>,
    /// Write `memory.oom.group=1`: an OOM kill takes the whole VM, not one thread's victim.
    pub oom_group: bool,
    /// Skip detection and use rlimits.
    pub force_rlimit: bool,
    /// What rlimit mode applies.
    pub rlimit: RlimitPolicy,
    /// `rmdir` attempts while the cgroup is still busy (exiting processes).
    pub remove_attempts: u32,
    /// Pause between `rmdir` attempts.
    pub remove_retry_delay: Duration,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        Self {
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            proc_root: PathBuf::from("/proc"),
            base_name: "sbx".to_owned(),
            memory_high_ratio: Some(0.9),
            oom_group: true,
            force_rlimit: false,
            rlimit: RlimitPolicy::default(),
            remove_attempts: 20,
            remove_retry_delay: Duration::from_millis(10),
        }
    }
}

/// Which mode detection chose, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// The active mode.
    pub mode: LimitMode,
    /// Human-readable reason (why cgroups are usable, or why they are not).
    pub reason: String,
    /// `<root>/<base_name>`, in cgroup mode.
    pub base: Option<PathBuf>,
}

/// A [`ResourceLimiter`] that puts each VM in `<root>/<base>/<tenant>/<vm_id>` when cgroup
/// v2 with the `memory`, `cpu` and `pids` controllers is delegated to this program, and
/// otherwise applies rlimits to the attached processes (see [`RlimitPolicy`]) and reads
/// their usage from `/proc`.
///
/// The mode is chosen once at construction ([`CgroupLimiter::detection`]) and recorded in
/// every [`LimitHandle`].
///
/// - `remove` moves processes still in the VM cgroup out (to the parent, else this
///   program's own cgroup, else the root), then `rmdir`s it, retrying while EBUSY. Tenant
///   cgroups are kept (empty directories, reused by the tenant's next VM).
/// - `usage` of a cgroup that is already gone reports `None` for both values; in rlimit
///   mode it reports the last values seen while the processes were alive, until `remove`.
#[derive(Debug)]
pub struct CgroupLimiter {
    config: CgroupConfig,
    fs: Arc<dyn CgroupFs>,
    detection: Detection,
    /// The cgroup this program runs in, when it lies under the root (a place stragglers
    /// can always be moved to).
    host_cgroup: Option<PathBuf>,
    clock_ticks: u64,
    rlimited: Mutex<HashMap<VmId, Tracked>>,
}

#[derive(Debug)]
struct Tracked {
    limits: ResourceLimits,
    procs: Vec<TrackedProc>,
}

#[derive(Debug)]
struct TrackedProc {
    pid: u32,
    start_time: Option<u64>,
    alive: bool,
    cpu_ticks: Option<u64>,
    peak_rss_bytes: Option<u64>,
}

impl TrackedProc {
    /// Refreshes the last values while the same process is alive.
    fn refresh(&mut self, proc_root: &Path) {
        if !self.alive {
            return;
        }
        match procfs::sample(proc_root, self.pid) {
            Some(s) if self.start_time.is_none_or(|t| t == s.start_time) => {
                self.start_time = Some(s.start_time);
                self.cpu_ticks = Some(s.cpu_ticks);
                if let Some(peak) = s.peak_rss_bytes {
                    self.peak_rss_bytes = Some(self.peak_rss_bytes.map_or(peak, |p| p.max(peak)));
                }
            }
            // Gone, or the pid now belongs to another process: keep the last values.
            _ => self.alive = false,
        }
    }
}

impl CgroupLimiter {
    /// Detects the mode on the real cgroup file system.
    pub fn new(config: CgroupConfig) -> Result<Self, CgroupError> {
        Self::with_fs(config, Arc::new(RealFs))
    }

    /// Detects the mode using `fs` for every cgroupfs access (tests emulate cgroupfs).
    pub fn with_fs(config: CgroupConfig, fs: Arc<dyn CgroupFs>) -> Result<Self, CgroupError> {
        validate_config(&config)?;
        let detection = detect(&config, fs.as_ref());
        match detection.mode {
            LimitMode::CgroupV2 => {
                tracing::info!(reason = %detection.reason, "resource limits: cgroup v2")
            }
            LimitMode::Rlimit => tracing::warn!(
                reason = %detection.reason,
                "resource limits: cgroup v2 unusable, falling back to rlimits \
                 (no CPU or pids limit; memory bounded by address space)"
            ),
        }
        let host_cgroup = match detection.mode {
            LimitMode::CgroupV2 => find_host_cgroup(&config, fs.as_ref()),
            LimitMode::Rlimit => None,
        };
        Ok(Self {
            config,
            fs,
            detection,
            host_cgroup,
            clock_ticks: sys::clock_ticks(),
            rlimited: Mutex::new(HashMap::new()),
        })
    }

    /// The active mode.
    pub fn mode(&self) -> LimitMode {
        self.detection.mode
    }

    /// Why this mode is active.
    pub fn reason(&self) -> &str {
        &self.detection.reason
    }

    /// The full detection result.
    pub fn detection(&self) -> &Detection {
        &self.detection
    }

    /// The configuration.
    pub fn config(&self) -> &CgroupConfig {
        &self.config
    }

    fn tracked(&self) -> MutexGuard<'_, HashMap<VmId, Tracked>> {
        self.rlimited.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_mode(&self, handle: &LimitHandle) -> Result<(), CgroupError> {
        if handle.mode == self.detection.mode {
            Ok(())
        } else {
            Err(CgroupError::ModeMismatch {
                handle: handle.mode,
                active: self.detection.mode,
            })
        }
    }

    /// The cgroup directory of a handle, checked to lie under this limiter's base.
    fn cgroup_dir<'a>(&self, handle: &'a LimitHandle) -> Result<&'a Path, CgroupError> {
        let base = self.detection.base.as_deref();
        match (&handle.cgroup, base) {
            (Some(dir), Some(base)) if dir.starts_with(base) && dir != base => Ok(dir),
            _ => Err(CgroupError::UnknownHandle(handle.vm_id)),
        }
    }

    fn create_cgroup(
        &self,
        vm_id: VmId,
        limits: &ResourceLimits,
    ) -> Result<LimitHandle, CgroupError> {
        let Some(base) = self.detection.base.as_deref() else {
            return Err(CgroupError::UnknownHandle(vm_id));
        };
        let tenant_dir = base.join(&limits.tenant);
        mkdir_exist_ok(self.fs.as_ref(), &tenant_dir)?;
        enable_controllers(self.fs.as_ref(), &tenant_dir).map_err(|e| {
            CgroupError::io(
                "enable controllers in",
                tenant_dir.join("cgroup.subtree_control"),
                e,
            )
        })?;
        let dir = tenant_dir.join(vm_id.to_string());
        mkdir_exist_ok(self.fs.as_ref(), &dir)?;
        if let Err(err) = self.write_limits(&dir, limits) {
            if let Err(cleanup) = self.remove_once(&dir) {
                tracing::warn!(cgroup = %dir.display(), error = %cleanup, "cleanup after failed create");
            }
            return Err(err);
        }
        tracing::debug!(vm_id = %vm_id, cgroup = %dir.display(), "cgroup created");
        Ok(LimitHandle {
            vm_id,
            mode: LimitMode::CgroupV2,
            cgroup: Some(dir),
        })
    }

    fn write_limits(&self, dir: &Path, limits: &ResourceLimits) -> Result<(), CgroupError> {
        let write = |file: &str, value: String| {
            let path = dir.join(file);
            self.fs
                .write(&path, &value)
                .map_err(|e| CgroupError::io("write", path, e))
        };
        write("memory.max", limits.memory_max_bytes.to_string())?;
        if let Some(ratio) = self.config.memory_high_ratio
            && ratio < 1.0
        {
            let high = (limits.memory_max_bytes as f64 * ratio) as u64;
            if let Err(err) = write("memory.high", high.to_string()) {
                tracing::debug!(error = %err, "memory.high not set (optional)");
            }
        }
        if self.config.oom_group
            && let Err(err) = write("memory.oom.group", "1".to_owned())
        {
            tracing::debug!(error = %err, "memory.oom.group not set (optional)");
        }
        write("cpu.max", cpu_max_value(limits.cpu_max_cores))?;
        write("pids.max", limits.pids_max.to_string())?;
        Ok(())
    }

    /// Moves every process of `dir` out, then removes it (one attempt; a missing
    /// directory is fine).
    fn remove_once(&self, dir: &Path) -> Result<(), CgroupError> {
        let procs_path = dir.join("cgroup.procs");
        let procs = match self.fs.read(&procs_path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(CgroupError::io("read", procs_path, e)),
        };
        for pid in procs.split_whitespace() {
            self.move_straggler(dir, pid);
        }
        match self.fs.remove_dir(dir) {
            Ok(()) => {
                tracing::debug!(cgroup = %dir.display(), "cgroup removed");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CgroupError::io("rmdir", dir, e)),
        }
    }

    /// Moves one process out of `dir`: to the parent, else this program's own cgroup, else
    /// the root. The parent usually refuses (a cgroup with controllers enabled for its
    /// children may hold no processes), hence the fallbacks.
    fn move_straggler(&self, dir: &Path, pid: &str) {
        let mut targets: Vec<&Path> = Vec::new();
        if let Some(parent) = dir.parent() {
            targets.push(parent);
        }
        if let Some(host) = self.host_cgroup.as_deref() {
            targets.push(host);
        }
        targets.push(&self.config.cgroup_root);
        for target in targets {
            match self.fs.write(&target.join("cgroup.procs"), pid) {
                Ok(()) => {
                    tracing::debug!(pid, from = %dir.display(), to = %target.display(), "moved straggler");
                    return;
                }
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return,
                Err(e) => {
                    tracing::debug!(pid, to = %target.display(), error = %e, "straggler not moved here");
                }
            }
        }
        tracing::warn!(pid, cgroup = %dir.display(), "could not move straggler out of cgroup");
    }

    fn read_cgroup_usage(&self, dir: &Path) -> ResourceUsage {
        let memory_peak_bytes = self
            .fs
            .read(&dir.join("memory.peak"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        let cpu_time_ms = self
            .fs
            .read(&dir.join("cpu.stat"))
            .ok()
            .and_then(|s| parse_cpu_stat_usage_usec(&s))
            .map(|us| us / 1000);
        ResourceUsage {
            cpu_time_ms,
            memory_peak_bytes,
        }
    }

    fn attach_rlimits(&self, handle: &LimitHandle, pid: u32) -> Result<(), CgroupError> {
        let raw_pid = i32::try_from(pid).map_err(|_| CgroupError::InvalidPid(pid))?;
        let limits = self
            .tracked()
            .get(&handle.vm_id)
            .map(|t| t.limits.clone())
            .ok_or(CgroupError::UnknownHandle(handle.vm_id))?;
        let policy = &self.config.rlimit;
        let address_space = policy.address_space_bytes(&limits);
        apply_limit(
            pid,
            raw_pid,
            Resource::AddressSpace,
            address_space,
            address_space,
        )?;
        apply_limit(
            pid,
            raw_pid,
            Resource::Cpu,
            policy.cpu_seconds,
            policy.cpu_seconds.saturating_add(10),
        )?;
        if policy.disable_core_dumps {
            apply_limit(pid, raw_pid, Resource::Core, 0, 0)?;
        }
        let mut proc = TrackedProc {
            pid,
            start_time: None,
            alive: true,
            cpu_ticks: None,
            peak_rss_bytes: None,
        };
        proc.refresh(&self.config.proc_root);
        let mut tracked = self.tracked();
        let entry = tracked
            .get_mut(&handle.vm_id)
            .ok_or(CgroupError::UnknownHandle(handle.vm_id))?;
        entry.procs.retain(|p| p.pid != pid);
        entry.procs.push(proc);
        tracing::debug!(
            vm_id = %handle.vm_id,
            pid,
            address_space,
            cpu_seconds = policy.cpu_seconds,
            "rlimits applied"
        );
        Ok(())
    }

    fn rlimit_usage(&self, handle: &LimitHandle) -> Result<ResourceUsage, CgroupError> {
        let mut tracked = self.tracked();
        let entry = tracked
            .get_mut(&handle.vm_id)
            .ok_or(CgroupError::UnknownHandle(handle.vm_id))?;
        let mut ticks: Option<u64> = None;
        let mut peak: Option<u64> = None;
        for proc in &mut entry.procs {
            proc.refresh(&self.config.proc_root);
            if let Some(t) = proc.cpu_ticks {
                ticks = Some(ticks.unwrap_or(0).saturating_add(t));
            }
            if let Some(p) = proc.peak_rss_bytes {
                peak = Some(peak.unwrap_or(0).saturating_add(p));
            }
        }
        Ok(ResourceUsage {
            cpu_time_ms: ticks.map(|t| t.saturating_mul(1000) / self.clock_ticks.max(1)),
            memory_peak_bytes: peak,
        })
    }
}

#[async_trait]
impl ResourceLimiter for CgroupLimiter {
    async fn create(
        &self,
        vm_id: VmId,
        limits: &ResourceLimits,
    ) -> sandbox_core::Result<LimitHandle> {
        validate_limits(limits)?;
        match self.detection.mode {
            LimitMode::CgroupV2 => Ok(self.create_cgroup(vm_id, limits)?),
            LimitMode::Rlimit => {
                self.tracked().insert(
                    vm_id,
                    Tracked {
                        limits: limits.clone(),
                        procs: Vec::new(),
                    },
                );
                Ok(LimitHandle {
                    vm_id,
                    mode: LimitMode::Rlimit,
                    cgroup: None,
                })
            }
        }
    }

    async fn attach(&self, handle: &LimitHandle, pid: u32) -> sandbox_core::Result<()> {
        self.check_mode(handle)?;
        if pid == 0 || i32::try_from(pid).is_err() {
            return Err(CgroupError::InvalidPid(pid).into());
        }
        match handle.mode {
            LimitMode::CgroupV2 => {
                let path = self.cgroup_dir(handle)?.join("cgroup.procs");
                self.fs
                    .write(&path, &pid.to_string())
                    .map_err(|e| CgroupError::io("write", path, e))?;
                tracing::debug!(vm_id = %handle.vm_id, pid, "process attached to cgroup");
                Ok(())
            }
            LimitMode::Rlimit => Ok(self.attach_rlimits(handle, pid)?),
        }
    }

    async fn usage(&self, handle: &LimitHandle) -> sandbox_core::Result<ResourceUsage> {
        self.check_mode(handle)?;
        match handle.mode {
            LimitMode::CgroupV2 => Ok(self.read_cgroup_usage(self.cgroup_dir(handle)?)),
            LimitMode::Rlimit => Ok(self.rlimit_usage(handle)?),
        }
    }

    async fn remove(&self, handle: &LimitHandle) -> sandbox_core::Result<()> {
        self.check_mode(handle)?;
        match handle.mode {
            LimitMode::CgroupV2 => {
                let dir = self.cgroup_dir(handle)?;
                let attempts = self.config.remove_attempts.max(1);
                let mut attempt = 1;
                loop {
                    match self.remove_once(dir) {
                        Err(CgroupError::Io { source, .. })
                            if source.raw_os_error() == Some(libc::EBUSY) && attempt < attempts =>
                        {
                            attempt += 1;
                            tokio::time::sleep(self.config.remove_retry_delay).await;
                        }
                        other => return Ok(other?),
                    }
                }
            }
            LimitMode::Rlimit => {
                self.tracked().remove(&handle.vm_id);
                Ok(())
            }
        }
    }
}

fn validate_config(config: &CgroupConfig) -> Result<(), CgroupError> {
    if !valid_name(&config.base_name) {
        return Err(CgroupError::InvalidLimits(format!(
            "cgroup base name {:?} must be 1-64 characters from [A-Za-z0-9_-]",
            config.base_name
        )));
    }
    if let Some(r) = config.memory_high_ratio
        && !(r > 0.0 && r <= 1.0)
    {
        return Err(CgroupError::InvalidLimits(format!(
            "memory_high_ratio {r} must be in (0, 1]"
        )));
    }
    if config.rlimit.address_space_factor == 0 || config.rlimit.cpu_seconds == 0 {
        return Err(CgroupError::InvalidLimits(
            "rlimit address_space_factor and cpu_seconds must be positive".to_owned(),
        ));
    }
    Ok(())
}

/// Tenant and base names: a single safe path component that cannot clash with cgroupfs
/// interface files (those all contain a dot).
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn validate_limits(limits: &ResourceLimits) -> Result<(), CgroupError> {
    if !valid_name(&limits.tenant) {
        return Err(CgroupError::InvalidTenant(limits.tenant.clone()));
    }
    if limits.memory_max_bytes == 0 {
        return Err(CgroupError::InvalidLimits(
            "memory_max_bytes must be positive".to_owned(),
        ));
    }
    if !(limits.cpu_max_cores.is_finite() && limits.cpu_max_cores > 0.0) {
        return Err(CgroupError::InvalidLimits(format!(
            "cpu_max_cores {} must be a positive number",
            limits.cpu_max_cores
        )));
    }
    if limits.pids_max == 0 {
        return Err(CgroupError::InvalidLimits(
            "pids_max must be positive".to_owned(),
        ));
    }
    Ok(())
}

/// `cpu.max` for `cores`: `<quota> 100000`, quota rounded up, at least the kernel's 1 ms.
pub fn cpu_max_value(cores: f64) -> String {
    let quota = (cores * CPU_PERIOD_US as f64).ceil();
    let quota = if quota.is_finite() && quota >= 1000.0 {
        quota as u64
    } else {
        1000
    };
    format!("{quota} {CPU_PERIOD_US}")
}

/// The `usage_usec` line of `cpu.stat`.
pub fn parse_cpu_stat_usage_usec(cpu_stat: &str) -> Option<u64> {
    cpu_stat.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next()) {
            (Some("usage_usec"), Some(v)) => v.parse().ok(),
            _ => None,
        }
    })
}

fn mkdir_exist_ok(fs: &dyn CgroupFs, dir: &Path) -> Result<(), CgroupError> {
    match fs.create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::io("mkdir", dir, e)),
    }
}

fn controller_set(list: &str) -> Vec<&str> {
    list.split_whitespace().collect()
}

fn missing_controllers(list: &str) -> Vec<&'static str> {
    let have = controller_set(list);
    REQUIRED_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !have.contains(c))
        .collect()
}

/// Enables the required controllers for the children of `dir` (only those missing).
fn enable_controllers(fs: &dyn CgroupFs, dir: &Path) -> std::io::Result<()> {
    let path = dir.join("cgroup.subtree_control");
    let current = fs.read(&path)?;
    let missing = missing_controllers(&current);
    if missing.is_empty() {
        return Ok(());
    }
    let value: Vec<String> = missing.iter().map(|c| format!("+{c}")).collect();
    fs.write(&path, &value.join(" "))
}

fn rlimit(reason: String) -> Detection {
    Detection {
        mode: LimitMode::Rlimit,
        reason,
        base: None,
    }
}

/// Decides between cgroup v2 and rlimits. Creates `<root>/<base>` with the controllers
/// enabled for its children when cgroup v2 is usable.
fn detect(config: &CgroupConfig, fs: &dyn CgroupFs) -> Detection {
    if config.force_rlimit {
        return rlimit("rlimit mode forced by configuration".to_owned());
    }
    let root = &config.cgroup_root;
    let controllers = match fs.read(&root.join("cgroup.controllers")) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let unified = root.join("unified");
            let reason = match fs.read(&unified.join("cgroup.controllers")) {
                Ok(c) => format!(
                    "{} is a cgroup v1 (hybrid) hierarchy; the cgroup v2 mount {} has \
                     controllers [{}] and lacks {}",
                    root.display(),
                    unified.display(),
                    controller_set(&c).join(" "),
                    missing_controllers(&c).join(", ")
                ),
                Err(_) => format!(
                    "{} is not a cgroup v2 mount (no cgroup.controllers)",
                    root.display()
                ),
            };
            return rlimit(reason);
        }
        Err(e) => {
            return rlimit(format!(
                "cannot read {}: {e}",
                root.join("cgroup.controllers").display()
            ));
        }
    };
    let missing = missing_controllers(&controllers);
    if !missing.is_empty() {
        return rlimit(format!(
            "cgroup v2 at {} lacks controllers {} (available: [{}]): not delegated to this program",
            root.display(),
            missing.join(", "),
            controller_set(&controllers).join(" ")
        ));
    }
    if let Err(e) = enable_controllers(fs, root) {
        return rlimit(format!(
            "cannot enable {} in {}: {e} (the host program must run in a leaf of a delegated \
             cgroup v2 subtree, not in the root it manages)",
            REQUIRED_CONTROLLERS.join(", "),
            root.join("cgroup.subtree_control").display()
        ));
    }
    let base = root.join(&config.base_name);
    if let Err(e) = mkdir_exist_ok(fs, &base) {
        return rlimit(format!("cannot create the sbx cgroup: {e}"));
    }
    if let Err(e) = enable_controllers(fs, &base) {
        return rlimit(format!(
            "cannot enable {} in {}: {e}",
            REQUIRED_CONTROLLERS.join(", "),
            base.join("cgroup.subtree_control").display()
        ));
    }
    match fs.read(&base.join("cgroup.controllers")) {
        Ok(c) if missing_controllers(&c).is_empty() => {}
        Ok(c) => {
            return rlimit(format!(
                "{} lacks controllers {} after enabling them",
                base.display(),
                missing_controllers(&c).join(", ")
            ));
        }
        Err(e) => {
            return rlimit(format!(
                "cannot read {}: {e}",
                base.join("cgroup.controllers").display()
            ));
        }
    }
    Detection {
        mode: LimitMode::CgroupV2,
        reason: format!(
            "cgroup v2 controllers {} delegated; VMs go under {}/<tenant>/<vm_id>",
            REQUIRED_CONTROLLERS.join(", "),
            base.display()
        ),
        base: Some(base),
    }
}

/// This program's cgroup (from `/proc/self/cgroup`), if it lies under the root and really
/// holds this process.
fn find_host_cgroup(config: &CgroupConfig, fs: &dyn CgroupFs) -> Option<PathBuf> {
    let own = std::fs::read_to_string(config.proc_root.join("self/cgroup")).ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = config.cgroup_root.join(rel.trim_start_matches('/'));
    let procs = fs.read(&dir.join("cgroup.procs")).ok()?;
    let me = std::process::id().to_string();
    procs.split_whitespace().any(|p| p == me).then_some(dir)
}

/// Sets one rlimit; when raising the hard limit is not permitted, clamps to the current
/// hard limit instead.
fn apply_limit(
    pid: u32,
    raw_pid: i32,
    resource: Resource,
    soft: u64,
    hard: u64,
) -> Result<(), CgroupError> {
    let err = |source| CgroupError::Prlimit {
        pid,
        resource: resource.name(),
        source,
    };
    match sys::set_limit(raw_pid, resource, soft, hard) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let (_, current_hard) = sys::get_limit(raw_pid, resource).map_err(err)?;
            if hard <= current_hard {
                return Err(err(e));
            }
            tracing::debug!(
                pid,
                resource = resource.name(),
                current_hard,
                "clamping rlimit to the hard limit"
            );
            sys::set_limit(raw_pid, resource, soft.min(current_hard), current_hard).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}
