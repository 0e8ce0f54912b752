//! Host probes that read files: cgroups, io_uring, CPU flags, users, namespaces.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::cmd;
use crate::sys::{IoUringSyscall, io_uring_syscall};

/// The cgroup v2 controllers sbx needs for per-VM limits.
pub const REQUIRED_CONTROLLERS: &[&str] = &["memory", "cpu", "pids"];

/// Which cgroup layout the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupLayout {
    /// Pure cgroup v2 at the root.
    Unified,
    /// cgroup v1 controllers with a v2 hierarchy at `unified/`.
    Hybrid,
    /// cgroup v1 only.
    Legacy,
    /// No cgroup filesystem found.
    None,
}

/// cgroup v2 availability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupStatus {
    /// The layout found.
    pub layout: CgroupLayout,
    /// The cgroup v2 mount, if any.
    pub v2_mount: Option<PathBuf>,
    /// Controllers available in the v2 hierarchy (`cgroup.controllers`).
    pub controllers: Vec<String>,
    /// Every controller of [`REQUIRED_CONTROLLERS`] is available in v2.
    pub v2_usable: bool,
    /// Human-readable summary.
    pub detail: String,
}

/// Reads the cgroup layout under `root` (normally `/sys/fs/cgroup`).
pub fn probe_cgroup(root: &Path) -> CgroupStatus {
    let read_controllers = |dir: &Path| -> Option<Vec<String>> {
        std::fs::read_to_string(dir.join("cgroup.controllers"))
            .ok()
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
    };
    let (layout, v2_mount, controllers) = if let Some(c) = read_controllers(root) {
        (CgroupLayout::Unified, Some(root.to_path_buf()), c)
    } else if let Some(c) = read_controllers(&root.join("unified")) {
        (CgroupLayout::Hybrid, Some(root.join("unified")), c)
    } else if std::fs::read_dir(root)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
    {
        (CgroupLayout::Legacy, None, Vec::new())
    } else {
        (CgroupLayout::None, None, Vec::new())
    };
    let missing: Vec<&str> = REQUIRED_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !controllers.iter().any(|have| have == c))
        .collect();
    let v2_usable = v2_mount.is_some() && missing.is_empty();
    let detail = match (&v2_mount, v2_usable) {
        (Some(m), true) => format!(
            "cgroup v2 at {} with controllers [{}]",
            m.display(),
            controllers.join(" ")
        ),
        (Some(m), false) => format!(
            "cgroup v2 at {} ({:?} layout) lacks controllers [{}] (has [{}])",
            m.display(),
            layout,
            missing.join(" "),
            controllers.join(" ")
        ),
        (None, _) => format!(
            "no cgroup v2 hierarchy under {} ({layout:?})",
            root.display()
        ),
    };
    CgroupStatus {
        layout,
        v2_mount,
        controllers,
        v2_usable,
        detail,
    }
}

/// Whether the host lets processes use io_uring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IoUringStatus {
    /// The host kernel allows io_uring (sysctl and syscall).
    pub host: bool,
    /// QEMU accepted `aio=io_uring` (false when QEMU was not probed).
    pub qemu: bool,
    /// Both: disks may use `aio=io_uring`.
    pub usable: bool,
    /// Human-readable summary.
    pub detail: String,
}

/// Host side of io_uring: `<proc>/sys/kernel/io_uring_disabled` is 0 or absent, and the
/// syscall exists. Returns (enabled, detail).
pub fn probe_io_uring_host(proc_root: &Path) -> (bool, String) {
    let sysctl = proc_root.join("sys/kernel/io_uring_disabled");
    match std::fs::read_to_string(&sysctl) {
        Ok(v) if v.trim() != "0" => {
            return (
                false,
                format!(
                    "io_uring disabled by sysctl (io_uring_disabled={})",
                    v.trim()
                ),
            );
        }
        _ => {}
    }
    match io_uring_syscall() {
        IoUringSyscall::Available => (true, "io_uring available".into()),
        IoUringSyscall::NoSys => (false, "kernel has no io_uring (ENOSYS)".into()),
        IoUringSyscall::Denied(errno) => (
            false,
            format!(
                "io_uring_setup denied ({})",
                std::io::Error::from_raw_os_error(errno)
            ),
        ),
    }
}

/// The CPU advertises `flag` in `<proc>/cpuinfo`.
fn cpu_flag(proc_root: &Path, flag: &str) -> bool {
    std::fs::read_to_string(proc_root.join("cpuinfo"))
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == flag))
        })
        .unwrap_or(false)
}

/// The CPU advertises `tsc_deadline_timer` in `<proc>/cpuinfo`.
pub fn probe_tsc_deadline(proc_root: &Path) -> bool {
    cpu_flag(proc_root, "tsc_deadline_timer")
}

/// The CPU says its TSC runs at a constant rate, also in deep idle (`constant_tsc` and
/// `nonstop_tsc` in `<proc>/cpuinfo`).
pub fn constant_tsc(proc_root: &Path) -> bool {
    cpu_flag(proc_root, "constant_tsc") && cpu_flag(proc_root, "nonstop_tsc")
}

/// The host's TSC rate in kHz, measured against `CLOCK_MONOTONIC` over `window`, when
/// the TSC is constant ([`constant_tsc`]).
///
/// A TCG guest reads the host's TSC unscaled, and its kernel cannot calibrate the TSC on
/// a microvm (no PC speaker gate for the PIT, no HPET or ACPI PM timer): without this
/// rate on its command line (`tsc_early_khz=`) it marks the TSC unstable and keeps time
/// with jiffies (10 ms steps for every clock and timer in the guest).
pub async fn measure_tsc_khz(proc_root: &Path, window: Duration) -> Option<u64> {
    if !constant_tsc(proc_root) {
        return None;
    }
    tsc_khz_over(window).await
}

#[cfg(target_arch = "x86_64")]
async fn tsc_khz_over(window: Duration) -> Option<u64> {
    let started = std::time::Instant::now();
    let c0 = crate::sys::rdtsc();
    tokio::time::sleep(window).await;
    let c1 = crate::sys::rdtsc();
    let ns = u64::try_from(started.elapsed().as_nanos()).ok()?;
    let khz =
        u64::try_from(u128::from(c1.checked_sub(c0)?) * 1_000_000 / u128::from(ns.max(1))).ok()?;
    // 100 MHz – 10 GHz, or the measurement is not to be trusted.
    (100_000..=10_000_000).contains(&khz).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
async fn tsc_khz_over(_window: Duration) -> Option<u64> {
    None
}

/// `<proc>/sys/kernel/osrelease` (`uname -r`).
pub fn kernel_release(proc_root: &Path) -> String {
    std::fs::read_to_string(proc_root.join("sys/kernel/osrelease"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// `<proc>/sys/kernel/hostname`.
pub fn hostname(proc_root: &Path) -> String {
    std::fs::read_to_string(proc_root.join("sys/kernel/hostname"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// A local user account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserAccount {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// Looks `name` up in a passwd-format file (normally `/etc/passwd`).
pub fn lookup_user(passwd: &Path, name: &str) -> Option<UserAccount> {
    let text = std::fs::read_to_string(passwd).ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some(UserAccount {
            name: name.to_owned(),
            uid,
            gid,
        })
    })
}

/// What a user must be able to do with a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Access {
    /// Read a file (or list a directory).
    Read,
    /// Read and write a file (e.g. a device node).
    ReadWrite,
    /// Search a directory (reach what is inside it).
    Search,
}

impl Access {
    /// The permission letters (`r`, `rw`, `x`), as `test(1)` checks them and `setfacl`
    /// grants them.
    pub fn letters(self) -> &'static str {
        match self {
            Self::Read => "r",
            Self::ReadWrite => "rw",
            Self::Search => "x",
        }
    }

    /// In words, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::ReadWrite => "read and write",
            Self::Search => "search",
        }
    }
}

/// Which of `paths` `user` cannot access as required, checked by the kernel itself:
/// `access(2)` in a child running as the user and its primary group only (as QEMU runs
/// under `setpriv --clear-groups`), so ancestors' permissions and ACLs all count.
/// Needs root (or CAP_SETUID/CAP_SETGID).
pub async fn access_gaps(
    user: &UserAccount,
    paths: &[(PathBuf, Access)],
) -> std::io::Result<Vec<(PathBuf, Access)>> {
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    // Each pair is FLAGS PATH; the script prints the index of each failure.
    const SCRIPT: &str = r#"i=0
while [ $# -gt 0 ]; do
  f=$1; p=$2; shift 2; ok=1
  case $f in *r*) [ -r "$p" ] || ok=0 ;; esac
  case $f in *w*) [ -w "$p" ] || ok=0 ;; esac
  case $f in *x*) [ -x "$p" ] || ok=0 ;; esac
  [ $ok = 1 ] || echo $i
  i=$((i+1))
done"#;
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c").arg(SCRIPT).arg("sh");
    for (path, access) in paths {
        cmd.arg(access.letters()).arg(path);
    }
    cmd.uid(user.uid)
        .gid(user.gid)
        .env_clear()
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(5), cmd.output())
        .await
        .map_err(|_| std::io::Error::other("access check timed out"))??;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "access check as uid {} failed: {}",
            user.uid,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<usize>().ok())
        .filter_map(|i| paths.get(i).cloned())
        .collect())
}

/// Whether QEMU can be started in fresh namespaces with `unshare`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnshareStatus {
    /// The `unshare` binary, if found.
    pub program: Option<PathBuf>,
    /// `unshare --pid --mount --ipc --uts --fork --kill-child` works.
    pub usable: bool,
    /// `--net` works as well.
    pub net: bool,
    /// Human-readable summary.
    pub detail: String,
}

/// The namespace flags sbx wraps QEMU in.
pub const UNSHARE_FLAGS: &[&str] = &[
    "--pid",
    "--mount",
    "--ipc",
    "--uts",
    "--fork",
    "--kill-child",
];

/// Tries `unshare <flags> true` (and once more with `--net`).
pub async fn probe_unshare(program: Option<&Path>, timeout: Duration) -> UnshareStatus {
    let Some(program) = program else {
        return UnshareStatus {
            program: None,
            usable: false,
            net: false,
            detail: "unshare not found in PATH (util-linux)".into(),
        };
    };
    let attempt = |net: bool| async move {
        let mut args: Vec<&str> = UNSHARE_FLAGS.to_vec();
        if net {
            args.push("--net");
        }
        args.push("--");
        args.push("true");
        match cmd::run(program.as_os_str(), &args, None, timeout).await {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(format!("{} ({})", out.stderr_line(), out.status)),
            Err(e) => Err(e.to_string()),
        }
    };
    let (plain, with_net) = tokio::join!(attempt(false), attempt(true));
    let detail = match (&plain, &with_net) {
        (Ok(()), Ok(())) => "pid, mount, ipc, uts and net namespaces available".to_owned(),
        (Ok(()), Err(e)) => format!("pid, mount, ipc, uts namespaces available; --net fails: {e}"),
        (Err(e), _) => format!("unshare fails: {e}"),
    };
    UnshareStatus {
        program: Some(program.to_path_buf()),
        usable: plain.is_ok(),
        net: plain.is_ok() && with_net.is_ok(),
        detail,
    }
}

/// Finds `unshare` in a `PATH`-style list.
pub fn find_unshare(path_env: Option<&OsStr>) -> Option<PathBuf> {
    crate::qemu::find_in_path("unshare", path_env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn hybrid_layout_with_empty_unified_is_not_usable() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("memory")).unwrap();
        fs::create_dir_all(root.join("unified")).unwrap();
        fs::write(root.join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
        let st = probe_cgroup(root);
        assert_eq!(st.layout, CgroupLayout::Hybrid);
        assert_eq!(st.v2_mount.as_deref(), Some(root.join("unified").as_path()));
        assert_eq!(st.controllers, vec!["hugetlb"]);
        assert!(!st.v2_usable);
        assert!(
            st.detail.contains("lacks controllers [memory cpu pids]"),
            "{}",
            st.detail
        );

        fs::write(root.join("unified/cgroup.controllers"), "").unwrap();
        let st = probe_cgroup(root);
        assert!(st.controllers.is_empty());
        assert!(!st.v2_usable);
    }

    #[test]
    fn unified_layout_with_controllers_is_usable() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(
            tmp.path().join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        )
        .unwrap();
        let st = probe_cgroup(tmp.path());
        assert_eq!(st.layout, CgroupLayout::Unified);
        assert!(st.v2_usable, "{}", st.detail);

        fs::write(tmp.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
        let st = probe_cgroup(tmp.path());
        assert!(!st.v2_usable);
        assert!(st.detail.contains("[pids]"), "{}", st.detail);
    }

    #[test]
    fn legacy_and_missing_layouts() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            probe_cgroup(&tmp.path().join("nope")).layout,
            CgroupLayout::None
        );
        fs::create_dir_all(tmp.path().join("memory")).unwrap();
        let st = probe_cgroup(tmp.path());
        assert_eq!(st.layout, CgroupLayout::Legacy);
        assert!(!st.v2_usable);
    }

    #[test]
    fn io_uring_sysctl_disables() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("sys/kernel")).unwrap();
        fs::write(tmp.path().join("sys/kernel/io_uring_disabled"), "2\n").unwrap();
        let (on, detail) = probe_io_uring_host(tmp.path());
        assert!(!on);
        assert!(detail.contains("io_uring_disabled=2"), "{detail}");
        // Sysctl 0 or absent: the answer comes from the real syscall; it must be a
        // consistent verdict either way.
        fs::write(tmp.path().join("sys/kernel/io_uring_disabled"), "0\n").unwrap();
        let (a, _) = probe_io_uring_host(tmp.path());
        fs::remove_file(tmp.path().join("sys/kernel/io_uring_disabled")).unwrap();
        let (b, _) = probe_io_uring_host(tmp.path());
        assert_eq!(a, b);
    }

    #[test]
    fn cpu_flags_and_kernel_facts() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path();
        assert!(!probe_tsc_deadline(p));
        fs::write(
            p.join("cpuinfo"),
            "processor\t: 0\nflags\t\t: fpu vme tsc_deadline_timer aes\n\nprocessor\t: 1\n",
        )
        .unwrap();
        assert!(probe_tsc_deadline(p));
        fs::write(p.join("cpuinfo"), "flags\t\t: fpu tsc_deadline_timer_x\n").unwrap();
        assert!(!probe_tsc_deadline(p));
        assert_eq!(kernel_release(p), "unknown");
        fs::create_dir_all(p.join("sys/kernel")).unwrap();
        fs::write(p.join("sys/kernel/osrelease"), "6.1.0-test\n").unwrap();
        fs::write(p.join("sys/kernel/hostname"), "box\n").unwrap();
        assert_eq!(kernel_release(p), "6.1.0-test");
        assert_eq!(hostname(p), "box");

        // No constant TSC: no rate.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        assert_eq!(
            rt.block_on(measure_tsc_khz(p, Duration::from_millis(5))),
            None
        );
        fs::write(
            p.join("cpuinfo"),
            "flags\t\t: fpu tsc constant_tsc nonstop_tsc\n",
        )
        .unwrap();
        #[cfg(target_arch = "x86_64")]
        {
            let khz = rt.block_on(measure_tsc_khz(p, Duration::from_millis(20)));
            assert!(khz.is_some(), "a constant TSC is measured");
        }
    }

    #[test]
    fn passwd_lookup() {
        let tmp = tempfile::tempdir().unwrap();
        let passwd = tmp.path().join("passwd");
        assert_eq!(lookup_user(&passwd, "sbx-qemu"), None);
        fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/bash\nsbx-qemu-x:x:1:1::/:/bin/false\n\
             sbx-qemu:x:998:997:sbx QEMU:/nonexistent:/usr/sbin/nologin\nbroken:x:a:b\n",
        )
        .unwrap();
        assert_eq!(
            lookup_user(&passwd, "sbx-qemu"),
            Some(UserAccount {
                name: "sbx-qemu".into(),
                uid: 998,
                gid: 997
            })
        );
        assert_eq!(lookup_user(&passwd, "broken"), None);
        assert_eq!(lookup_user(&passwd, "nobody"), None);
    }

    #[tokio::test]
    async fn unshare_missing_and_failing() {
        let st = probe_unshare(None, Duration::from_secs(1)).await;
        assert!(!st.usable && !st.net);
        assert!(st.detail.contains("not found"));

        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let fake = tmp.path().join("unshare");
        // Fails only when --net is asked for.
        fs::write(
            &fake,
            "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = --net ] && { echo 'unshare: unshare failed: Operation not permitted' >&2; exit 1; }; done\nexit 0\n",
        )
        .unwrap();
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
        let st = probe_unshare(Some(&fake), Duration::from_secs(5)).await;
        assert!(st.usable);
        assert!(!st.net);
        assert!(
            st.detail.contains("Operation not permitted"),
            "{}",
            st.detail
        );
    }

    #[tokio::test]
    async fn access_gaps_asks_the_kernel_as_the_user() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: checking access as another user needs root");
            return;
        }
        let nobody = UserAccount {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        fs::create_dir(&dir).unwrap();
        let file = dir.join("f");
        fs::write(&file, "x").unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        let wanted = vec![
            (dir.clone(), Access::Search),
            (file.clone(), Access::Read),
            (file.clone(), Access::ReadWrite),
            (tmp.path().to_path_buf(), Access::Search),
        ];
        // The directory blocks everything below it, although the file is world-readable.
        let gaps = access_gaps(&nobody, &wanted).await.unwrap();
        assert_eq!(gaps, wanted[..3].to_vec());
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o711)).unwrap();
        let gaps = access_gaps(&nobody, &wanted).await.unwrap();
        assert_eq!(gaps, vec![(file.clone(), Access::ReadWrite)]);
        assert!(access_gaps(&nobody, &[]).await.unwrap().is_empty());
        // Odd names travel as arguments, never through the shell.
        let odd = dir.join("a b; $(touch pwned)");
        fs::write(&odd, "").unwrap();
        fs::set_permissions(&odd, fs::Permissions::from_mode(0o600)).unwrap();
        let gaps = access_gaps(&nobody, &[(odd.clone(), Access::Read)])
            .await
            .unwrap();
        assert_eq!(gaps, vec![(odd, Access::Read)]);
        assert!(!std::path::Path::new("/pwned").exists() && !dir.join("pwned").exists());
    }
}
