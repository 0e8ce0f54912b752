//! Helpers shared by the VM test binaries.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use sandbox_core::Language;
use sbx::SbxConfig;

/// This test binary's own work dir, so concurrent VM users on the machine (other test
/// binaries, a running `sbx`) do not disturb the leak checks.
pub fn work_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| std::path::PathBuf::from(format!("/tmp/sbx-vt-{}", std::process::id())))
}

pub fn config(warm: usize) -> SbxConfig {
    if let Ok(filter) = std::env::var("SBX_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let mut cfg = SbxConfig::from_env();
    cfg.work_dir = work_dir().to_path_buf();
    cfg.warm_pool_size = warm;
    // Cold boots unless a test turns snapshots on with a dir of its own.
    cfg.snapshot_dir = None;
    cfg.scheduler.warm_pool_size = warm;
    let assets = sandbox_core::GuestAssets::in_dir(&cfg.assets_dir);
    for lang in Language::ALL {
        if let Err(e) = assets.check(lang) {
            panic!("VM tests opted in but assets are missing ({e}); run `cargo xtask assets`");
        }
    }
    cfg
}

/// An empty snapshot dir of this test binary named `name`, readable by QEMU's user (its
/// clones map the published RAM files).
pub fn snapshot_dir(name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::path::PathBuf::from(format!("{}-snap-{name}", work_dir().display()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// QEMU processes (not their `unshare` wrappers) of this test binary's VMs.
pub fn qemu_pids() -> Vec<u32> {
    let needle = work_dir().to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.starts_with("/usr/bin/qemu-system-x86_64") && cmd.contains(&needle) {
            out.push(pid);
        }
    }
    out
}

pub fn qemu_count() -> usize {
    qemu_pids().len()
}

/// VM work dirs left in `work`.
pub fn vm_dirs(work: &Path) -> usize {
    std::fs::read_dir(work)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("vm-"))
                .count()
        })
        .unwrap_or(0)
}

/// Waits (bounded) until no sbx QEMU runs; returns how many are left.
pub fn wait_no_qemu() -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = qemu_count();
        if n == 0 || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
