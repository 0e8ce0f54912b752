//! Unit tests against a fake cgroupfs tree and a fake /proc.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sandbox_core::ports::{LimitHandle, LimitMode, ResourceLimiter, ResourceLimits};
use sandbox_core::{ErrorKind, PermanentCause, TransientCause, VmId};

use crate::fakefs::FakeCgroupFs;
use crate::fs::RealFs;
use crate::{CgroupConfig, CgroupLimiter, cpu_max_value, parse_cpu_stat_usage_usec};

const ALL: &str = "cpuset cpu io memory hugetlb pids rdma misc";

fn config(root: &Path, proc_root: &Path) -> CgroupConfig {
    CgroupConfig {
        cgroup_root: root.to_path_buf(),
        proc_root: proc_root.to_path_buf(),
        remove_retry_delay: Duration::from_millis(1),
        ..CgroupConfig::default()
    }
}

fn limits() -> ResourceLimits {
    ResourceLimits {
        tenant: "acme".to_owned(),
        memory_max_bytes: 512 * 1024 * 1024,
        cpu_max_cores: 1.25,
        pids_max: 256,
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

struct Fake {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    proc_root: PathBuf,
    fs: Arc<FakeCgroupFs>,
}

fn fake(controllers: &str) -> Fake {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cgroup");
    let proc_root = tmp.path().join("proc");
    std::fs::create_dir_all(proc_root.join("self")).unwrap();
    std::fs::write(proc_root.join("self/cgroup"), "0::/\n").unwrap();
    let fs = Arc::new(FakeCgroupFs::new(&root, controllers));
    Fake {
        _tmp: tmp,
        root,
        proc_root,
        fs,
    }
}

fn limiter(f: &Fake) -> CgroupLimiter {
    CgroupLimiter::with_fs(config(&f.root, &f.proc_root), f.fs.clone()).unwrap()
}

#[test]
fn cpu_max_and_cpu_stat_parsing() {
    assert_eq!(cpu_max_value(1.25), "125000 100000");
    assert_eq!(cpu_max_value(1.0), "100000 100000");
    assert_eq!(cpu_max_value(0.001), "1000 100000");
    assert_eq!(cpu_max_value(2.000001), "200001 100000");
    let stat = "usage_usec 2500123\nuser_usec 2000000\nsystem_usec 500123\nnr_periods 0\n";
    assert_eq!(parse_cpu_stat_usage_usec(stat), Some(2_500_123));
    assert_eq!(parse_cpu_stat_usage_usec("user_usec 1\n"), None);
}

#[tokio::test]
async fn v2_with_controllers_gives_cgroup_mode_and_writes_limits() {
    let f = fake(ALL);
    let lim = limiter(&f);
    assert_eq!(lim.mode(), LimitMode::CgroupV2, "{}", lim.reason());
    let root_subtree = read(&f.root.join("cgroup.subtree_control"));
    for c in ["memory", "cpu", "pids"] {
        assert!(root_subtree.split(' ').any(|x| x == c), "{root_subtree}");
    }
    assert_eq!(
        lim.detection().base.as_deref(),
        Some(f.root.join("sbx").as_path())
    );

    let vm = VmId::new();
    let handle = lim.create(vm, &limits()).await.unwrap();
    let dir = f.root.join("sbx/acme").join(vm.to_string());
    assert_eq!(handle.mode, LimitMode::CgroupV2);
    assert_eq!(handle.cgroup.as_deref(), Some(dir.as_path()));
    assert_eq!(read(&dir.join("memory.max")), "536870912");
    assert_eq!(read(&dir.join("memory.high")), "483183820");
    assert_eq!(read(&dir.join("memory.oom.group")), "1");
    assert_eq!(read(&dir.join("cpu.max")), "125000 100000");
    assert_eq!(read(&dir.join("pids.max")), "256");
    let tenant_subtree = read(&f.root.join("sbx/acme/cgroup.subtree_control"));
    assert_eq!(tenant_subtree, "memory cpu pids");

    // A second VM of the same tenant reuses the tenant cgroup.
    let other = lim.create(VmId::new(), &limits()).await.unwrap();
    assert_ne!(other.cgroup, handle.cgroup);
}

#[tokio::test]
async fn attach_usage_and_remove_in_cgroup_mode() {
    let f = fake(ALL);
    let lim = limiter(&f);
    let vm = VmId::new();
    let handle = lim.create(vm, &limits()).await.unwrap();
    let dir = handle.cgroup.clone().unwrap();

    lim.attach(&handle, 4242).await.unwrap();
    lim.attach(&handle, 4243).await.unwrap();
    assert_eq!(read(&dir.join("cgroup.procs")), "4242\n4243");

    std::fs::write(dir.join("memory.peak"), "123456789\n").unwrap();
    std::fs::write(
        dir.join("cpu.stat"),
        "usage_usec 2500999\nuser_usec 2000000\nsystem_usec 500999\n",
    )
    .unwrap();
    let usage = lim.usage(&handle).await.unwrap();
    assert_eq!(usage.cpu_time_ms, Some(2500));
    assert_eq!(usage.memory_peak_bytes, Some(123_456_789));

    // Stragglers: the tenant refuses processes (controllers enabled for its children), so
    // they land in the root; a busy rmdir is retried.
    f.fs.busy_rmdirs
        .store(2, std::sync::atomic::Ordering::SeqCst);
    lim.remove(&handle).await.unwrap();
    assert!(!dir.exists());
    assert_eq!(read(&f.root.join("cgroup.procs")), "4242\n4243");
    assert!(f.root.join("sbx/acme").exists());
    // Idempotent.
    lim.remove(&handle).await.unwrap();
    // Usage of a removed cgroup reports nothing rather than failing.
    let usage = lim.usage(&handle).await.unwrap();
    assert_eq!((usage.cpu_time_ms, usage.memory_peak_bytes), (None, None));
}

#[tokio::test]
async fn stragglers_go_to_the_host_cgroup_when_it_is_known() {
    let f = fake(ALL);
    // This process lives in <root>/host (a leaf), as delegation requires.
    let host = f.root.join("host");
    crate::fs::CgroupFs::create_dir(f.fs.as_ref(), &host).unwrap();
    let me = std::process::id().to_string();
    crate::fs::CgroupFs::write(f.fs.as_ref(), &host.join("cgroup.procs"), &me).unwrap();
    std::fs::write(f.proc_root.join("self/cgroup"), "0::/host\n").unwrap();

    let lim = limiter(&f);
    assert_eq!(lim.mode(), LimitMode::CgroupV2, "{}", lim.reason());
    let handle = lim.create(VmId::new(), &limits()).await.unwrap();
    lim.attach(&handle, 777).await.unwrap();
    lim.remove(&handle).await.unwrap();
    assert_eq!(read(&host.join("cgroup.procs")), format!("{me}\n777"));
    assert_eq!(read(&f.root.join("cgroup.procs")), "");
}

#[tokio::test]
async fn rmdir_that_stays_busy_is_an_error() {
    let f = fake(ALL);
    let lim = CgroupLimiter::with_fs(
        CgroupConfig {
            remove_attempts: 3,
            ..config(&f.root, &f.proc_root)
        },
        f.fs.clone(),
    )
    .unwrap();
    let handle = lim.create(VmId::new(), &limits()).await.unwrap();
    f.fs.busy_rmdirs
        .store(10, std::sync::atomic::Ordering::SeqCst);
    let err = lim.remove(&handle).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Transient(TransientCause::Infrastructure),
        "{err}"
    );
    assert!(err.to_string().contains("rmdir"), "{err}");
    f.fs.busy_rmdirs
        .store(0, std::sync::atomic::Ordering::SeqCst);
    lim.remove(&handle).await.unwrap();
}

#[test]
fn hybrid_hierarchy_like_this_machine_falls_back_to_rlimits() {
    // /sys/fs/cgroup is a tmpfs of v1 controllers; /sys/fs/cgroup/unified is an empty v2.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir_all(root.join("memory")).unwrap();
    std::fs::create_dir_all(root.join("unified")).unwrap();
    std::fs::write(root.join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
    std::fs::write(root.join("unified/cgroup.subtree_control"), "\n").unwrap();
    let lim = CgroupLimiter::with_fs(config(root, Path::new("/proc")), Arc::new(RealFs)).unwrap();
    assert_eq!(lim.mode(), LimitMode::Rlimit);
    let reason = lim.reason();
    assert!(reason.contains("v1"), "{reason}");
    assert!(reason.contains("unified"), "{reason}");
    assert!(reason.contains("memory, cpu, pids"), "{reason}");
    assert!(!root.join("sbx").exists());
}

#[test]
fn v2_without_controllers_falls_back_to_rlimits() {
    let f = fake("hugetlb");
    let lim = limiter(&f);
    assert_eq!(lim.mode(), LimitMode::Rlimit);
    assert!(
        lim.reason().contains("lacks controllers memory, cpu, pids"),
        "{}",
        lim.reason()
    );

    let f = fake("cpu memory");
    let lim = limiter(&f);
    assert_eq!(lim.mode(), LimitMode::Rlimit);
    assert!(
        lim.reason().contains("lacks controllers pids"),
        "{}",
        lim.reason()
    );

    let tmp = tempfile::tempdir().unwrap();
    let lim =
        CgroupLimiter::with_fs(config(tmp.path(), Path::new("/proc")), Arc::new(RealFs)).unwrap();
    assert_eq!(lim.mode(), LimitMode::Rlimit);
    assert!(
        lim.reason().contains("not a cgroup v2 mount"),
        "{}",
        lim.reason()
    );
}

#[test]
fn forced_rlimit_mode() {
    let f = fake(ALL);
    let lim = CgroupLimiter::with_fs(
        CgroupConfig {
            force_rlimit: true,
            ..config(&f.root, &f.proc_root)
        },
        f.fs.clone(),
    )
    .unwrap();
    assert_eq!(lim.mode(), LimitMode::Rlimit);
    assert!(lim.reason().contains("forced"));
    assert!(!f.root.join("sbx").exists());
}

#[test]
fn permission_errors_during_detection_fall_back_with_a_reason() {
    // The root refuses to enable controllers (host program not in a delegated leaf).
    let f = fake(ALL);
    f.fs.deny("cgroup.subtree_control");
    let lim = limiter(&f);
    assert_eq!(lim.mode(), LimitMode::Rlimit);
    let reason = lim.reason();
    assert!(reason.contains("cgroup.subtree_control"), "{reason}");
    assert!(reason.contains("denied"), "{reason}");

    // The sbx cgroup cannot be created.
    let f = fake(ALL);
    f.fs.deny("sbx");
    let lim = limiter(&f);
    assert_eq!(lim.mode(), LimitMode::Rlimit);
    assert!(
        lim.reason().contains("cannot create the sbx cgroup"),
        "{}",
        lim.reason()
    );

    // A directory where cgroupfs has a file: the write fails for real (EISDIR).
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
    std::fs::create_dir(tmp.path().join("cgroup.subtree_control")).unwrap();
    let lim =
        CgroupLimiter::with_fs(config(tmp.path(), Path::new("/proc")), Arc::new(RealFs)).unwrap();
    assert_eq!(lim.mode(), LimitMode::Rlimit);
    assert!(lim.reason().contains("cannot enable"), "{}", lim.reason());
}

#[tokio::test]
async fn permission_errors_after_detection_are_clear_and_clean_up() {
    let f = fake(ALL);
    let lim = limiter(&f);
    assert_eq!(lim.mode(), LimitMode::CgroupV2);

    f.fs.deny("memory.max");
    let vm = VmId::new();
    let err = lim.create(vm, &limits()).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Permanent(PermanentCause::Host),
        "{err}"
    );
    assert!(err.to_string().contains("memory.max"), "{err}");
    assert!(!f.root.join("sbx/acme").join(vm.to_string()).exists());

    // Optional files may be refused without failing the create.
    let f = fake(ALL);
    let lim = limiter(&f);
    f.fs.deny("memory.high");
    f.fs.deny("memory.oom.group");
    let handle = lim.create(VmId::new(), &limits()).await.unwrap();
    // Attaching into a cgroup whose procs file is refused.
    f.fs.deny("cgroup.procs");
    let err = lim.attach(&handle, 4242).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Permanent(PermanentCause::Host),
        "{err}"
    );
}

#[tokio::test]
async fn bad_input_and_mismatched_handles() {
    let f = fake(ALL);
    let lim = limiter(&f);
    for tenant in ["", "../etc", "a/b", "memory.max", &"x".repeat(65)] {
        let err = lim
            .create(
                VmId::new(),
                &ResourceLimits {
                    tenant: tenant.to_owned(),
                    ..limits()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Input, "{tenant}: {err}");
    }
    for bad in [
        ResourceLimits {
            memory_max_bytes: 0,
            ..limits()
        },
        ResourceLimits {
            cpu_max_cores: f64::NAN,
            ..limits()
        },
        ResourceLimits {
            cpu_max_cores: -1.0,
            ..limits()
        },
        ResourceLimits {
            pids_max: 0,
            ..limits()
        },
    ] {
        let err = lim.create(VmId::new(), &bad).await.unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::Permanent(PermanentCause::Config),
            "{err}"
        );
    }
    let rlimit_handle = LimitHandle {
        vm_id: VmId::new(),
        mode: LimitMode::Rlimit,
        cgroup: None,
    };
    let err = lim.attach(&rlimit_handle, 1).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Permanent(PermanentCause::Internal));
    // A forged handle pointing outside the sbx subtree is refused, nothing is removed.
    let forged = LimitHandle {
        vm_id: VmId::new(),
        mode: LimitMode::CgroupV2,
        cgroup: Some(f.root.clone()),
    };
    assert!(lim.remove(&forged).await.is_err());
    assert!(f.root.exists());

    let handle = lim.create(VmId::new(), &limits()).await.unwrap();
    let err = lim.attach(&handle, 0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Permanent(PermanentCause::Internal));
}

fn write_fake_proc(proc_root: &Path, pid: u32, utime: u64, stime: u64, start: u64, hwm_kb: u64) {
    let dir = proc_root.join(pid.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("stat"),
        format!(
            "{pid} (qemu-system-x86) S 1 {pid} {pid} 0 -1 4194560 100 0 0 0 {utime} {stime} 0 0 \
             20 0 3 0 {start} 1000000 2000 18446744073709551615\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("status"),
        format!("Name:\tqemu-system-x86\nVmPeak:\t 9999 kB\nVmHWM:\t {hwm_kb} kB\nVmRSS:\t 1 kB\n"),
    )
    .unwrap();
}

#[tokio::test]
async fn rlimit_usage_keeps_the_last_values_after_exit() {
    let f = fake("hugetlb");
    let lim = limiter(&f);
    assert_eq!(lim.mode(), LimitMode::Rlimit);
    let ticks = crate::sys::clock_ticks();

    // prlimit needs a real process; /proc is faked to control the numbers.
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = child.id();
    write_fake_proc(&f.proc_root, pid, 150, 50, 777, 40_000);

    let vm = VmId::new();
    let handle = lim.create(vm, &limits()).await.unwrap();
    assert_eq!(handle.mode, LimitMode::Rlimit);
    assert_eq!(handle.cgroup, None);
    lim.attach(&handle, pid).await.unwrap();

    write_fake_proc(&f.proc_root, pid, 300, 100, 777, 50_000);
    let usage = lim.usage(&handle).await.unwrap();
    assert_eq!(usage.cpu_time_ms, Some(400 * 1000 / ticks));
    assert_eq!(usage.memory_peak_bytes, Some(50_000 * 1024));

    // The process is gone: last values stay.
    std::fs::remove_dir_all(f.proc_root.join(pid.to_string())).unwrap();
    let after = lim.usage(&handle).await.unwrap();
    assert_eq!(after, usage);

    // The pid is reused by another process (different start time): still the last values.
    write_fake_proc(&f.proc_root, pid, 9000, 9000, 999, 90_000);
    assert_eq!(lim.usage(&handle).await.unwrap(), usage);

    lim.remove(&handle).await.unwrap();
    lim.remove(&handle).await.unwrap();
    let err = lim.usage(&handle).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Permanent(PermanentCause::Internal));

    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn rlimit_attach_to_a_dead_process_is_transient() {
    let f = fake("hugetlb");
    let lim = limiter(&f);
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let handle = lim.create(VmId::new(), &limits()).await.unwrap();
    let err = lim.attach(&handle, pid).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Transient(TransientCause::Infrastructure),
        "{err}"
    );
    let unknown = LimitHandle {
        vm_id: VmId::new(),
        mode: LimitMode::Rlimit,
        cgroup: None,
    };
    let err = lim.attach(&unknown, std::process::id()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Permanent(PermanentCause::Internal));
}
