//! Runs the real probes on this host. Skips loudly when QEMU is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use probes::{
    CanaryOutcome, HostProbes, ProbeConfig, QemuVersion, probe_host, qemu::locate_qemu, run_canary,
};
use sandbox_core::ports::Accelerator;

fn real_config(cache: &std::path::Path) -> Option<ProbeConfig> {
    let mut cfg = ProbeConfig::from_env();
    cfg.cache_dir = Some(cache.to_path_buf());
    cfg.force_tcg = false;
    if locate_qemu(cfg.qemu_override.as_deref(), cfg.path_env.as_deref()).is_err() {
        eprintln!("SKIP: qemu-system-x86_64 not installed; real-host probes not run");
        return None;
    }
    Some(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_host_probes_are_consistent_and_cached() {
    let cache = tempfile::tempdir().unwrap();
    let Some(cfg) = real_config(cache.path()) else {
        return;
    };

    let t0 = Instant::now();
    let first = probe_host(&cfg).await;
    let first_elapsed = t0.elapsed();
    let qemu = first.require_qemu().expect("QEMU found");
    assert!(
        qemu.version >= QemuVersion::new(10, 0, 0),
        "QEMU {} < 10",
        qemu.version
    );
    assert!(qemu.microvm);
    eprintln!(
        "first probe: {first_elapsed:?}; accelerator {} ({}); canary {:?} ms",
        first.accelerator.accelerator, first.accelerator.reason, first.accelerator.canary_ms
    );
    eprintln!("{}", serde_json::to_string_pretty(&first).unwrap());

    let kvm_usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&cfg.dev_kvm)
        .is_ok();
    match first.accelerator() {
        Accelerator::Kvm => {
            assert!(kvm_usable, "KVM chosen without an accessible /dev/kvm");
            assert!(first.accelerator.canary_ms.is_some());
        }
        Accelerator::Tcg => {
            assert!(first.accelerator.reason.ends_with("→ TCG"));
            assert!(
                first
                    .warnings
                    .iter()
                    .any(|w| w.contains("accelerator is TCG"))
            );
            if kvm_usable {
                // /dev/kvm opens but the canary failed: the reason says why.
                assert!(
                    first.accelerator.reason.contains("canary"),
                    "{}",
                    first.accelerator.reason
                );
            }
        }
    }

    // A new prober (as in a new process) answers from the disk cache, fast.
    let t1 = Instant::now();
    let second = HostProbes::new(cfg.clone());
    let report = second.report().await;
    let cached_elapsed = t1.elapsed();
    eprintln!("second probe (disk cache): {cached_elapsed:?}");
    assert_eq!(report.accelerator(), first.accelerator());
    if kvm_usable {
        assert!(report.accelerator.from_cache);
    }
    assert!(
        cached_elapsed < Duration::from_millis(2500),
        "cached probe took {cached_elapsed:?}"
    );

    // The in-process cache answers instantly.
    let t2 = Instant::now();
    let again = second.report().await;
    assert!(std::ptr::eq(again, report));
    assert!(t2.elapsed() < Duration::from_millis(5));
}

#[tokio::test]
async fn canary_passes_under_tcg() {
    let cache = tempfile::tempdir().unwrap();
    let Some(cfg) = real_config(cache.path()) else {
        return;
    };
    let qemu = locate_qemu(cfg.qemu_override.as_deref(), cfg.path_env.as_deref()).unwrap();
    let outcome = run_canary(&qemu, Accelerator::Tcg, Duration::from_secs(20))
        .await
        .unwrap();
    eprintln!("TCG canary: {outcome:?}");
    assert!(matches!(outcome, CanaryOutcome::Passed(_)), "{outcome:?}");
}
