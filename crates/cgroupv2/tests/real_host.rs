//! On the real host: detection, and rlimits applied to a live child process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cgroupv2::{CgroupConfig, CgroupLimiter, RlimitPolicy};
use sandbox_core::VmId;
use sandbox_core::ports::{LimitMode, ResourceLimiter, ResourceLimits};

/// The (soft, hard) columns of one row of `/proc/<pid>/limits`.
fn proc_limit(pid: u32, row: &str) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with(row))
        .unwrap_or_else(|| panic!("no {row} in {limits}"));
    let mut cols = line[row.len()..].split_whitespace();
    (
        cols.next().unwrap().to_owned(),
        cols.next().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn rlimit_mode_on_this_host_limits_a_real_process() {
    let limiter = CgroupLimiter::new(CgroupConfig::default()).unwrap();
    eprintln!("mode: {:?} ({})", limiter.mode(), limiter.reason());
    if limiter.mode() != LimitMode::Rlimit {
        eprintln!("SKIP: this host delegates cgroup v2; the rlimit path is covered by unit tests");
        return;
    }
    assert!(!limiter.reason().is_empty());

    // A child that burns CPU for a while, then sleeps.
    let mut child = std::process::Command::new("sh")
        .args([
            "-c",
            "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; exec sleep 30",
        ])
        .spawn()
        .unwrap();
    let pid = child.id();

    let limits = ResourceLimits {
        tenant: "default".to_owned(),
        memory_max_bytes: 400 * 1024 * 1024,
        cpu_max_cores: 1.0,
        pids_max: 256,
    };
    let handle = limiter.create(VmId::new(), &limits).await.unwrap();
    assert_eq!(handle.mode, LimitMode::Rlimit);
    assert_eq!(handle.cgroup, None);
    limiter.attach(&handle, pid).await.unwrap();

    let expected_as = RlimitPolicy::default().address_space_bytes(&limits);
    assert_eq!(expected_as, 4 * 1024 * 1024 * 1024);
    let want = expected_as.to_string();
    assert_eq!(proc_limit(pid, "Max address space"), (want.clone(), want));
    assert_eq!(
        proc_limit(pid, "Max cpu time"),
        ("3600".to_owned(), "3610".to_owned())
    );
    assert_eq!(
        proc_limit(pid, "Max core file size"),
        ("0".to_owned(), "0".to_owned())
    );
    // RLIMIT_NPROC is per user: never touched.
    let nproc_before = proc_limit(std::process::id(), "Max processes");
    assert_eq!(proc_limit(pid, "Max processes"), nproc_before);

    // Let it burn some CPU, then read usage while alive.
    let mut usage = limiter.usage(&handle).await.unwrap();
    for _ in 0..100 {
        if usage.cpu_time_ms.unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        usage = limiter.usage(&handle).await.unwrap();
    }
    assert!(usage.cpu_time_ms.unwrap() > 0, "{usage:?}");
    assert!(usage.memory_peak_bytes.unwrap() > 0, "{usage:?}");

    // After exit (and reaping) /proc/<pid> is gone; the last values remain.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    let after = limiter.usage(&handle).await.unwrap();
    assert!(
        after.cpu_time_ms >= usage.cpu_time_ms,
        "{after:?} {usage:?}"
    );
    assert!(after.memory_peak_bytes.is_some());
    eprintln!("usage of the child: {after:?}");

    limiter.remove(&handle).await.unwrap();
    limiter.remove(&handle).await.unwrap();
}
