//! The aggregated host report, probed concurrently and cached in-process.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sandbox_core::ports::Accelerator;
use serde::Serialize;
use tokio::sync::OnceCell;

use crate::accel::{self, AccelProbe, AccelVerdict};
use crate::error::ProbeError;
use crate::host::{self, CgroupStatus, IoUringStatus, UnshareStatus, UserAccount};
use crate::qemu::{self, QemuInfo};

/// The dedicated unprivileged user QEMU runs as when it exists.
pub const QEMU_USER: &str = "sbx-qemu";

/// Where the probes look; every root is injectable so tests run against fake trees.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// procfs root (`/proc`).
    pub proc_root: PathBuf,
    /// cgroup filesystem root (`/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
    /// The KVM device (`/dev/kvm`).
    pub dev_kvm: PathBuf,
    /// passwd database (`/etc/passwd`).
    pub passwd: PathBuf,
    /// The user QEMU should run as ([`QEMU_USER`]).
    pub qemu_user: String,
    /// Explicit QEMU binary (`SBX_QEMU`).
    pub qemu_override: Option<PathBuf>,
    /// `PATH`-style search list for `qemu-system-x86_64` and `unshare`.
    pub path_env: Option<OsString>,
    /// Extra directories searched for `qboot.rom`.
    pub qemu_data_dirs: Vec<PathBuf>,
    /// Where the accelerator verdict is cached (`None`: no disk cache).
    pub cache_dir: Option<PathBuf>,
    /// Force TCG (`SBX_FORCE_TCG=1`).
    pub force_tcg: bool,
    /// Deadline of the KVM canary boot.
    pub canary_timeout: Duration,
    /// How long a cached accelerator verdict is trusted.
    pub cache_ttl: Duration,
    /// Deadline of each short probe command.
    pub command_timeout: Duration,
}

impl Default for ProbeConfig {
    /// The real host's paths, without reading the environment.
    fn default() -> Self {
        Self {
            proc_root: "/proc".into(),
            cgroup_root: "/sys/fs/cgroup".into(),
            dev_kvm: "/dev/kvm".into(),
            passwd: "/etc/passwd".into(),
            qemu_user: QEMU_USER.into(),
            qemu_override: None,
            path_env: None,
            qemu_data_dirs: vec!["/usr/share/qemu".into(), "/usr/local/share/qemu".into()],
            cache_dir: None,
            force_tcg: false,
            canary_timeout: accel::DEFAULT_CANARY_TIMEOUT,
            cache_ttl: accel::DEFAULT_CACHE_TTL,
            command_timeout: Duration::from_secs(5),
        }
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.trim(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// The default cache directory: `$SBX_CACHE_DIR/probes`, else
/// `$XDG_CACHE_HOME/sbx/probes`, else `$HOME/.cache/sbx/probes`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty("SBX_CACHE_DIR") {
        return Some(PathBuf::from(dir).join("probes"));
    }
    if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("sbx/probes"));
    }
    non_empty("HOME").map(|home| PathBuf::from(home).join(".cache/sbx/probes"))
}

impl ProbeConfig {
    /// The real host, with `SBX_QEMU`, `SBX_FORCE_TCG`, `SBX_CACHE_DIR` and `PATH` from
    /// the environment.
    pub fn from_env() -> Self {
        Self {
            qemu_override: std::env::var_os("SBX_QEMU")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            path_env: std::env::var_os("PATH"),
            cache_dir: default_cache_dir(),
            force_tcg: env_flag("SBX_FORCE_TCG"),
            ..Self::default()
        }
    }
}

/// Everything sbx needs to know about this host.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    /// The QEMU binary and its features, or why it is unusable.
    pub qemu: Result<QemuInfo, String>,
    /// KVM or TCG, and why.
    pub accelerator: AccelVerdict,
    /// io_uring for disk AIO.
    pub io_uring: IoUringStatus,
    /// cgroup v2 availability.
    pub cgroup: CgroupStatus,
    /// Namespaces for QEMU.
    pub unshare: UnshareStatus,
    /// The `sbx-qemu` user, when it exists.
    pub qemu_user: Option<UserAccount>,
    /// The uid of this process.
    pub current_uid: u32,
    /// The CPU has a TSC-deadline timer (PIT/PIC/RTC may go under KVM).
    pub tsc_deadline: bool,
    /// The host TSC rate in kHz, when it is constant (TCG guests are told it).
    pub tsc_khz: Option<u64>,
    /// `uname -r`.
    pub kernel_release: String,
    /// Host name.
    pub hostname: String,
    /// Each isolation layer or feature that cannot be applied, once, with its consequence.
    pub warnings: Vec<String>,
    /// Wall time the probes took.
    pub probe_ms: u64,
    #[serde(skip)]
    qemu_error: Option<ProbeErrorKind>,
}

#[derive(Debug, Clone, Copy)]
enum ProbeErrorKind {
    NotFound,
    Unusable,
}

impl HostReport {
    /// The QEMU info, or the permanent `MissingDependency` error that explains what to
    /// install.
    pub fn require_qemu(&self) -> sandbox_core::Result<&QemuInfo> {
        match (&self.qemu, self.qemu_error) {
            (Ok(info), _) => Ok(info),
            (Err(_), Some(ProbeErrorKind::NotFound) | None) => Err(ProbeError::QemuNotFound {
                searched: String::new(),
            }
            .into()),
            (Err(msg), Some(ProbeErrorKind::Unusable)) => Err(sandbox_core::Error::permanent(
                sandbox_core::PermanentCause::MissingDependency,
                msg.clone(),
            )),
        }
    }

    /// The accelerator VMs should use.
    pub fn accelerator(&self) -> Accelerator {
        self.accelerator.accelerator
    }

    /// The user QEMU can be switched to: `sbx-qemu` when it exists, is not this
    /// process's user, and this process runs as root (which `unshare --setuid` needs).
    /// Whether that user can reach the assets is checked where they are known (see
    /// [`crate::host::access_gaps`]).
    pub fn qemu_run_as(&self) -> Option<&UserAccount> {
        self.qemu_user
            .as_ref()
            .filter(|u| u.uid != self.current_uid && self.current_uid == 0)
    }

    /// The uid QEMU runs as by this report: [`HostReport::qemu_run_as`]'s, else this
    /// process's.
    pub fn qemu_uid(&self) -> u32 {
        self.qemu_run_as()
            .map(|u| u.uid)
            .unwrap_or(self.current_uid)
    }
}

fn current_uid() -> u32 {
    nix::unistd::Uid::effective().as_raw()
}

/// Runs every probe concurrently and aggregates the report. Never fails: what cannot be
/// probed is reported (see [`HostReport::require_qemu`] for a missing QEMU).
pub async fn probe_host(cfg: &ProbeConfig) -> HostReport {
    let started = Instant::now();
    let hostname = host::hostname(&cfg.proc_root);
    let kernel_release = host::kernel_release(&cfg.proc_root);

    let qemu_path = qemu::locate_qemu(cfg.qemu_override.as_deref(), cfg.path_env.as_deref());
    let qemu_fut = async {
        match &qemu_path {
            Ok(p) => qemu::probe_qemu(p, &cfg.qemu_data_dirs, cfg.command_timeout).await,
            Err(e) => Err(ProbeError::QemuNotFound {
                searched: e.to_string(),
            }),
        }
    };
    // The canary needs only the binary and its version line; run it alongside the
    // feature probes instead of after them.
    let accel_fut = async {
        let qemu = match &qemu_path {
            Ok(p) => qemu::probe_version(p, cfg.command_timeout)
                .await
                .ok()
                .map(|(_, line)| (p.clone(), line)),
            Err(_) => None,
        };
        accel::probe_accelerator(&AccelProbe {
            dev_kvm: cfg.dev_kvm.clone(),
            qemu,
            cache_dir: cfg.cache_dir.clone(),
            force_tcg: cfg.force_tcg,
            timeout: cfg.canary_timeout,
            cache_ttl: cfg.cache_ttl,
            hostname: hostname.clone(),
            kernel_release: kernel_release.clone(),
        })
        .await
    };
    let unshare_prog = host::find_unshare(cfg.path_env.as_deref());
    let unshare_fut = host::probe_unshare(unshare_prog.as_deref(), cfg.command_timeout);
    // The TSC is measured over a short sleep: overlapped with the QEMU probes, it costs
    // start-up nothing.
    let tsc_fut = host::measure_tsc_khz(&cfg.proc_root, Duration::from_millis(20));
    let (qemu, accelerator, unshare, tsc_khz) =
        tokio::join!(qemu_fut, accel_fut, unshare_fut, tsc_fut);

    let (io_uring_host, io_uring_detail) = host::probe_io_uring_host(&cfg.proc_root);
    let qemu_io_uring = qemu.as_ref().map(|q| q.io_uring_aio).unwrap_or(false);
    let io_uring = IoUringStatus {
        host: io_uring_host,
        qemu: qemu_io_uring,
        usable: io_uring_host && qemu_io_uring,
        detail: if io_uring_host && !qemu_io_uring {
            format!("{io_uring_detail}; QEMU refuses aio=io_uring")
        } else {
            io_uring_detail
        },
    };
    let mut report = HostReport {
        qemu_error: match &qemu {
            Ok(_) => None,
            Err(ProbeError::QemuNotFound { .. }) => Some(ProbeErrorKind::NotFound),
            Err(_) => Some(ProbeErrorKind::Unusable),
        },
        qemu: qemu.map_err(|e| e.to_string()),
        accelerator,
        io_uring,
        cgroup: host::probe_cgroup(&cfg.cgroup_root),
        unshare,
        qemu_user: host::lookup_user(&cfg.passwd, &cfg.qemu_user),
        current_uid: current_uid(),
        tsc_deadline: host::probe_tsc_deadline(&cfg.proc_root),
        tsc_khz,
        kernel_release,
        hostname,
        warnings: Vec::new(),
        probe_ms: 0,
    };
    report.warnings = warnings(&report, &cfg.qemu_user);
    report.probe_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    for w in &report.warnings {
        tracing::warn!("{w}");
    }
    report
}

/// One line per layer or feature that cannot be applied, with its consequence.
fn warnings(r: &HostReport, qemu_user: &str) -> Vec<String> {
    let mut out = Vec::new();
    match &r.qemu {
        Err(e) => out.push(format!("{e}: no VM can start")),
        Ok(q) => {
            if q.version.major < 10 {
                out.push(format!(
                    "QEMU {} is older than 10.x: untested, expect failures",
                    q.version
                ));
            }
            if !q.microvm {
                out.push("QEMU has no microvm machine: no VM can start".into());
            }
            if !q.sandbox {
                out.push(
                    "QEMU -sandbox (seccomp) unsupported: QEMU's own syscalls are not filtered"
                        .into(),
                );
            }
            if !q.exit_with_parent {
                out.push(format!(
                    "QEMU {} lacks -run-with exit-with-parent: QEMU is tied to sbx by \
                     PR_SET_PDEATHSIG of the spawning thread only",
                    q.version
                ));
            }
            if q.qboot_rom.is_none() {
                out.push(
                    "qboot.rom not found: microvm boots with the default firmware and keeps \
                     option ROMs (slower boot)"
                        .into(),
                );
            }
        }
    }
    if r.accelerator.accelerator == Accelerator::Tcg {
        out.push(format!(
            "accelerator is TCG ({}): guests run under software emulation, much slower",
            r.accelerator.reason
        ));
    }
    match &r.qemu_user {
        None => out.push(format!(
            "user {qemu_user} does not exist: QEMU runs as uid {} (the sbx process's user); \
             run `sbx setup` as root to create it and give it access to the assets and the \
             work dir, and QEMU runs unprivileged",
            r.current_uid
        )),
        Some(u) if r.current_uid != 0 && u.uid != r.current_uid => out.push(format!(
            "user {qemu_user} exists but this process is not root, so it cannot switch QEMU \
             to it: QEMU runs as uid {}",
            r.current_uid
        )),
        Some(_) => {}
    }
    if !r.unshare.usable {
        out.push(format!(
            "namespaces unavailable ({}): QEMU shares the host's pid, mount, ipc, uts and \
             network namespaces",
            r.unshare.detail
        ));
    } else if !r.unshare.net {
        out.push(format!(
            "network namespace unavailable ({}): offline VMs' QEMU keeps the host network \
             namespace",
            r.unshare.detail
        ));
    }
    if !r.cgroup.v2_usable {
        out.push(format!(
            "cgroup v2 not usable ({}): per-VM limits fall back to rlimits (no memory.peak, \
             no CPU quota, no pids limit per VM)",
            r.cgroup.detail
        ));
    }
    if !r.io_uring.usable && r.qemu.is_ok() {
        out.push(format!(
            "io_uring AIO unavailable ({}): disks use aio=threads",
            r.io_uring.detail
        ));
    }
    out
}

/// Probes once per instance, however many callers ask at the same time.
#[derive(Debug)]
pub struct HostProbes {
    config: ProbeConfig,
    report: OnceCell<HostReport>,
}

impl HostProbes {
    /// Probes for `config`; nothing runs until [`HostProbes::report`].
    pub fn new(config: ProbeConfig) -> Self {
        Self {
            config,
            report: OnceCell::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ProbeConfig {
        &self.config
    }

    /// The report: probed on the first call; concurrent callers wait for that one run.
    pub async fn report(&self) -> &HostReport {
        self.report.get_or_init(|| probe_host(&self.config)).await
    }
}

static GLOBAL: OnceCell<HostProbes> = OnceCell::const_new();

/// The process-wide report of the real host ([`ProbeConfig::from_env`]).
pub async fn host_report() -> &'static HostReport {
    GLOBAL
        .get_or_init(|| async { HostProbes::new(ProbeConfig::from_env()) })
        .await
        .report()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::sync::Arc;

    /// A fake host: procfs, cgroupfs, passwd, no KVM, a fake QEMU script.
    fn fake_host(root: &Path, with_user: bool) -> ProbeConfig {
        fs::create_dir_all(root.join("proc/sys/kernel")).unwrap();
        fs::write(root.join("proc/sys/kernel/osrelease"), "6.1.0-fake\n").unwrap();
        fs::write(root.join("proc/sys/kernel/hostname"), "fakehost\n").unwrap();
        fs::write(root.join("proc/sys/kernel/io_uring_disabled"), "2\n").unwrap();
        fs::write(
            root.join("proc/cpuinfo"),
            "flags\t: fpu tsc_deadline_timer\n",
        )
        .unwrap();
        fs::create_dir_all(root.join("cgroup/unified")).unwrap();
        fs::create_dir_all(root.join("cgroup/memory")).unwrap();
        fs::write(root.join("cgroup/unified/cgroup.controllers"), "").unwrap();
        let passwd = if with_user {
            "root:x:0:0::/root:/bin/sh\nsbx-qemu:x:990:990::/:/bin/false\n"
        } else {
            "root:x:0:0::/root:/bin/sh\n"
        };
        fs::write(root.join("passwd"), passwd).unwrap();
        let bin = root.join("bin");
        fs::create_dir_all(&bin).unwrap();
        // A fake QEMU: a version, microvm in -machine help, and every other invocation
        // fails, as if built without seccomp and io_uring.
        let qemu = bin.join("qemu-system-x86_64");
        fs::write(
            &qemu,
            "#!/bin/sh\ncase \"$1\" in\n--version) echo 'QEMU emulator version 10.0.2 (fake)';;\n\
             -machine) [ \"$2\" = help ] && echo 'microvm              microvm (i386)' || exit 1;;\n\
             *) exit 1;;\nesac\n",
        )
        .unwrap();
        fs::set_permissions(&qemu, fs::Permissions::from_mode(0o755)).unwrap();
        ProbeConfig {
            proc_root: root.join("proc"),
            cgroup_root: root.join("cgroup"),
            dev_kvm: root.join("dev/kvm"),
            passwd: root.join("passwd"),
            qemu_user: QEMU_USER.into(),
            qemu_override: None,
            path_env: Some(bin.into_os_string()),
            qemu_data_dirs: vec![root.join("share")],
            cache_dir: Some(root.join("cache")),
            force_tcg: false,
            canary_timeout: Duration::from_secs(3),
            cache_ttl: accel::DEFAULT_CACHE_TTL,
            command_timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn fake_host_report_lists_every_missing_layer_once() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = fake_host(tmp.path(), false);
        let r = probe_host(&cfg).await;
        let q = r.require_qemu().unwrap();
        assert_eq!(q.version, crate::QemuVersion::new(10, 0, 2));
        assert!(q.microvm && !q.sandbox && !q.io_uring_aio && !q.exit_with_parent);
        assert_eq!(r.accelerator(), Accelerator::Tcg);
        assert!(r.accelerator.reason.contains("missing → TCG"));
        assert!(!r.io_uring.usable && !r.io_uring.host);
        assert!(!r.cgroup.v2_usable);
        assert!(r.tsc_deadline);
        assert_eq!(r.kernel_release, "6.1.0-fake");
        assert_eq!(r.hostname, "fakehost");
        assert_eq!(r.qemu_user, None);
        assert_eq!(r.qemu_uid(), r.current_uid);
        // No unshare in the fake PATH.
        assert!(!r.unshare.usable);
        for needle in [
            "-sandbox",
            "exit-with-parent",
            "qboot.rom",
            "TCG",
            "user sbx-qemu",
            "namespaces unavailable",
            "cgroup v2 not usable",
            "io_uring",
        ] {
            let n = r.warnings.iter().filter(|w| w.contains(needle)).count();
            assert_eq!(n, 1, "{needle}: {:#?}", r.warnings);
        }
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["accelerator"]["accelerator"], "tcg");
        assert_eq!(json["qemu"]["Ok"]["version"]["major"], 10);
    }

    #[tokio::test]
    async fn missing_qemu_is_reported_as_missing_dependency() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = fake_host(tmp.path(), true);
        cfg.path_env = Some(tmp.path().join("empty").into_os_string());
        let r = probe_host(&cfg).await;
        let err = r.require_qemu().unwrap_err();
        assert_eq!(
            err.kind(),
            sandbox_core::ErrorKind::Permanent(sandbox_core::PermanentCause::MissingDependency)
        );
        assert_eq!(
            err.message(),
            "QEMU not found: install qemu-system-x86 (10.x from bookworm-backports)"
        );
        assert_eq!(r.qemu_user.as_ref().map(|u| u.uid), Some(990));
        assert_eq!(r.qemu_uid(), 990);
        assert!(
            r.warnings[0].starts_with("QEMU not found"),
            "{:?}",
            r.warnings
        );
        assert!(!r.warnings.iter().any(|w| w.contains("user sbx-qemu")));
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_probe_run() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = fake_host(tmp.path(), true);
        let probes = Arc::new(HostProbes::new(cfg));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let p = probes.clone();
            tasks.push(tokio::spawn(async move {
                std::ptr::from_ref(p.report().await) as usize
            }));
        }
        let mut addrs = Vec::new();
        for t in tasks {
            addrs.push(t.await.unwrap());
        }
        addrs.dedup();
        assert_eq!(addrs.len(), 1);
    }
}
