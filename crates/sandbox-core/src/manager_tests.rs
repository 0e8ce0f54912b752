//! VM manager tests against the port mocks and fakes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, ErrorKind, PermanentCause, TransientCause};
use crate::manager::{GuestAssets, Ports, VmManager, VmManagerConfig, VmOptions};
use crate::ports::{
    Accelerator, LimitHandle, LimitMode, MockHypervisor, MockOverlayStore, MockResourceLimiter,
    Overlay, ResourceUsage, VmProcess,
};
use crate::testing::{ConnectBehavior, FakeChannel, FakeProcess};
use crate::{Language, VmState};

/// What the harness counts.
#[derive(Default)]
struct Counts {
    launches: AtomicUsize,
    overlays_acquired: AtomicUsize,
    overlays_released: AtomicUsize,
    limits_created: AtomicUsize,
    limits_removed: AtomicUsize,
    kills: Mutex<Vec<Arc<AtomicUsize>>>,
}

impl Counts {
    fn kills(&self) -> usize {
        self.kills
            .lock()
            .unwrap()
            .iter()
            .map(|k| k.load(Ordering::SeqCst))
            .sum()
    }
}

#[derive(Clone, Copy)]
enum Launch {
    Ok,
    Crash,
    Permanent,
}

struct Harness {
    _dir: tempfile::TempDir,
    manager: VmManager,
    counts: Arc<Counts>,
    work_root: PathBuf,
    channel: FakeChannel,
}

fn assets(dir: &std::path::Path) -> GuestAssets {
    let assets = GuestAssets::in_dir(dir);
    std::fs::write(&assets.kernel, b"k").unwrap();
    std::fs::write(&assets.initramfs, b"i").unwrap();
    for img in assets.images.values() {
        std::fs::write(img, b"img").unwrap();
    }
    assets
}

fn harness(
    launches: Vec<Launch>,
    connects: Vec<ConnectBehavior>,
    overlay_fails: bool,
    limits_fail: bool,
    max_vms: usize,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let work_root = dir.path().join("work");
    let counts = Arc::new(Counts::default());

    let mut hv = MockHypervisor::new();
    let plan = Arc::new(Mutex::new(launches));
    let c = counts.clone();
    hv.expect_launch().returning(move |_spec| {
        c.launches.fetch_add(1, Ordering::SeqCst);
        let next = {
            let mut p = plan.lock().unwrap();
            if p.is_empty() {
                Launch::Ok
            } else {
                p.remove(0)
            }
        };
        match next {
            Launch::Permanent => Err(Error::permanent(
                PermanentCause::MissingDependency,
                "QEMU not found",
            )),
            Launch::Crash => {
                let p = FakeProcess::exited(1);
                c.kills.lock().unwrap().push(p.kill_counter());
                Ok(Box::new(p) as Box<dyn VmProcess>)
            }
            Launch::Ok => {
                let p = FakeProcess::new(4242);
                c.kills.lock().unwrap().push(p.kill_counter());
                Ok(Box::new(p) as Box<dyn VmProcess>)
            }
        }
    });

    let mut ov = MockOverlayStore::new();
    let c = counts.clone();
    ov.expect_acquire().returning(move |_base, work_dir| {
        if overlay_fails {
            return Err(Error::transient(TransientCause::Overlay, "qemu-img failed"));
        }
        c.overlays_acquired.fetch_add(1, Ordering::SeqCst);
        let path = work_dir.join("overlay.qcow2");
        std::fs::write(&path, b"ov").unwrap();
        Ok(Overlay { path })
    });
    let c = counts.clone();
    ov.expect_release().returning(move |_| {
        c.overlays_released.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });

    let mut lim = MockResourceLimiter::new();
    let c = counts.clone();
    lim.expect_create().returning(move |vm_id, _| {
        if limits_fail {
            return Err(Error::permanent(PermanentCause::Host, "cgroup denied"));
        }
        c.limits_created.fetch_add(1, Ordering::SeqCst);
        Ok(LimitHandle {
            vm_id,
            mode: LimitMode::Rlimit,
            cgroup: None,
        })
    });
    lim.expect_attach().returning(|_, _| Ok(()));
    lim.expect_usage().returning(|_| {
        Ok(ResourceUsage {
            cpu_time_ms: Some(5),
            memory_peak_bytes: Some(1 << 20),
        })
    });
    let c = counts.clone();
    lim.expect_remove().returning(move |_| {
        c.limits_removed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });

    let channel = FakeChannel::new(connects);
    let ports = Ports {
        hypervisor: Arc::new(hv),
        overlays: Arc::new(ov),
        limiter: Arc::new(lim),
        network: None,
        channel: Arc::new(channel.clone()),
        snapshots: None,
        packages: None,
    };
    let mut cfg = VmManagerConfig::new(assets(dir.path()), work_root.clone(), Accelerator::Tcg);
    cfg.boot_timeout = Duration::from_millis(300);
    cfg.backoff_base = Duration::from_millis(1);
    cfg.backoff_max = Duration::from_millis(5);
    cfg.max_vms = max_vms;
    Harness {
        _dir: dir,
        manager: VmManager::new(cfg, ports),
        counts,
        work_root,
        channel,
    }
}

fn work_dirs(h: &Harness) -> usize {
    std::fs::read_dir(&h.work_root)
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Lets spawned cleanup tasks run.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Everything released exactly once: waits (bounded) for teardowns that a loaded machine
/// may run late, then asserts.
async fn assert_all_released(h: &Harness) {
    let c = &h.counts;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(c.overlays_acquired.load(Ordering::SeqCst)
        == c.overlays_released.load(Ordering::SeqCst)
        && c.limits_created.load(Ordering::SeqCst) == c.limits_removed.load(Ordering::SeqCst)
        && work_dirs(h) == 0
        && h.manager.live_count() == 0
        && h.manager.free_slots() == h.manager.config().max_vms)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        c.overlays_acquired.load(Ordering::SeqCst),
        c.overlays_released.load(Ordering::SeqCst),
        "overlays leaked"
    );
    assert_eq!(
        c.limits_created.load(Ordering::SeqCst),
        c.limits_removed.load(Ordering::SeqCst),
        "limits leaked"
    );
    assert_eq!(work_dirs(h), 0, "work dirs leaked");
    assert_eq!(h.manager.live_count(), 0);
    assert_eq!(h.manager.free_slots(), h.manager.config().max_vms);
}

#[tokio::test]
async fn create_and_destroy_releases_everything_once() {
    let h = harness(vec![], vec![], false, false, 2);
    let vm = h
        .manager
        .create_vm(VmOptions::new(Language::Python))
        .await
        .unwrap();
    assert_eq!(vm.state(), VmState::Ready);
    assert!(vm.is_alive());
    assert_eq!(h.manager.live_count(), 1);
    assert_eq!(h.manager.free_slots(), 1);
    assert_eq!(work_dirs(&h), 1);
    assert_eq!(vm.usage().await.cpu_time_ms, Some(5));

    vm.destroy().await;
    vm.destroy().await; // idempotent
    assert_eq!(vm.state(), VmState::Destroyed);
    assert!(!vm.is_alive());
    assert_eq!(h.counts.kills(), 1);
    assert_all_released(&h).await;
}

#[tokio::test]
async fn transient_boot_failures_are_retried() {
    let h = harness(
        vec![Launch::Crash, Launch::Ok],
        vec![ConnectBehavior::Fail],
        false,
        false,
        4,
    );
    // Attempt 1: QEMU crashes. The refusing agent is met in attempt 1 (if the race polls
    // the connect before seeing the exit) or in attempt 2; the next attempt boots.
    let vm = h
        .manager
        .create_vm(VmOptions::new(Language::Raw))
        .await
        .unwrap();
    let retries = vm.boot_timings().retries;
    assert!((1..=2).contains(&retries), "{retries}");
    assert_eq!(
        h.counts.launches.load(Ordering::SeqCst),
        retries as usize + 1
    );
    // The failed attempts were cleaned up already.
    settle().await;
    assert_eq!(
        h.counts.overlays_released.load(Ordering::SeqCst),
        retries as usize
    );
    assert_eq!(work_dirs(&h), 1);
    vm.destroy().await;
    assert_all_released(&h).await;
}

#[tokio::test]
async fn retries_are_bounded_and_report_diagnostics() {
    let h = harness(
        vec![Launch::Crash, Launch::Crash, Launch::Crash, Launch::Ok],
        vec![ConnectBehavior::Hang; 3],
        false,
        false,
        4,
    );
    let err = h
        .manager
        .create_vm(VmOptions::new(Language::Raw))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient(TransientCause::QemuCrash));
    assert!(err.message().contains("exit code 1"), "{err}");
    assert!(err.message().contains("fake stderr"), "{err}");
    assert!(err.message().contains("fake console"), "{err}");
    assert_eq!(h.counts.launches.load(Ordering::SeqCst), 3);
    settle().await;
    assert_all_released(&h).await;
}

#[tokio::test]
async fn permanent_failures_are_not_retried() {
    let h = harness(vec![Launch::Permanent], vec![], false, false, 4);
    let err = h
        .manager
        .create_vm(VmOptions::new(Language::Python))
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Permanent(PermanentCause::MissingDependency)
    );
    assert!(!err.is_retryable());
    assert_eq!(h.counts.launches.load(Ordering::SeqCst), 1);
    settle().await;
    assert_all_released(&h).await;
}

#[tokio::test]
async fn missing_assets_are_permanent_and_launch_nothing() {
    let h = harness(vec![], vec![], false, false, 4);
    std::fs::remove_file(&h.manager.config().assets.kernel).unwrap();
    let err = h
        .manager
        .create_vm(VmOptions::new(Language::Python))
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Permanent(PermanentCause::MissingDependency)
    );
    assert!(err.message().contains("cargo xtask assets"), "{err}");
    assert_eq!(h.counts.launches.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn overlay_failure_releases_limits() {
    let h = harness(vec![], vec![], true, false, 4);
    let err = h
        .manager
        .create_vm(VmOptions::new(Language::Python))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient(TransientCause::Overlay));
    // Overlay failures are transient: three attempts, nothing launched.
    assert_eq!(h.counts.limits_created.load(Ordering::SeqCst), 3);
    assert_eq!(h.counts.launches.load(Ordering::SeqCst), 0);
    settle().await;
    assert_all_released(&h).await;
}

#[tokio::test]
async fn limits_failure_releases_overlay() {
    let h = harness(vec![], vec![], false, true, 4);
    let err = h
        .manager
        .create_vm(VmOptions::new(Language::Python))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Permanent(PermanentCause::Host));
    assert_eq!(h.counts.overlays_acquired.load(Ordering::SeqCst), 1);
    settle().await;
    assert_all_released(&h).await;
}

#[tokio::test]
async fn boot_timeout_kills_the_process() {
    let h = harness(vec![], vec![ConnectBehavior::Hang; 3], false, false, 4);
    let started = std::time::Instant::now();
    let err = h
        .manager
        .create_vm(VmOptions::new(Language::Python))
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Transient(TransientCause::BootTimeout)
    );
    assert!(err.message().contains("fake console"), "{err}");
    // 3 attempts × 300 ms plus small backoff: bounded.
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_all_released(&h).await;
    assert_eq!(h.counts.kills(), 3);
}

#[tokio::test]
async fn cancellation_during_boot_cleans_everything() {
    let h = harness(vec![], vec![ConnectBehavior::Hang], false, false, 1);
    let fut = h.manager.create_vm(VmOptions::new(Language::Python));
    let r = tokio::time::timeout(Duration::from_millis(100), fut).await;
    assert!(r.is_err(), "should still be booting");
    assert_all_released(&h).await;
    assert_eq!(h.counts.launches.load(Ordering::SeqCst), 1);
    assert_eq!(h.counts.kills(), 1);
}

#[tokio::test]
async fn dropping_a_vm_destroys_it_and_frees_the_slot_once() {
    let h = harness(vec![], vec![], false, false, 1);
    let vm = h
        .manager
        .create_vm(VmOptions::new(Language::Python))
        .await
        .unwrap();
    assert_eq!(h.manager.free_slots(), 0);
    drop(vm);
    settle().await;
    assert_all_released(&h).await;
    // The single slot is usable again, exactly once.
    let vm = h
        .manager
        .create_vm(VmOptions::new(Language::Python))
        .await
        .unwrap();
    assert_eq!(h.manager.free_slots(), 0);
    vm.destroy().await;
    assert_eq!(h.manager.free_slots(), 1);
}

#[tokio::test]
async fn slots_bound_concurrency() {
    let h = harness(vec![], vec![], false, false, 1);
    let first = h
        .manager
        .create_vm(VmOptions::new(Language::Python))
        .await
        .unwrap();
    let second = tokio::time::timeout(
        Duration::from_millis(100),
        h.manager.create_vm(VmOptions::new(Language::Python)),
    )
    .await;
    assert!(second.is_err(), "second VM must wait for the slot");
    first.destroy().await;
    let second = h
        .manager
        .create_vm(VmOptions::new(Language::Python))
        .await
        .unwrap();
    second.destroy().await;
    settle().await;
    assert_all_released(&h).await;
}

#[tokio::test]
async fn destroy_all_kills_every_vm() {
    let h = harness(vec![], vec![], false, false, 4);
    let a = h
        .manager
        .create_vm(VmOptions::new(Language::Python))
        .await
        .unwrap();
    let b = h
        .manager
        .create_vm(VmOptions::new(Language::Raw))
        .await
        .unwrap();
    h.manager.destroy_all().await;
    assert!(!a.is_alive() && !b.is_alive());
    assert_eq!(h.counts.kills(), 2);
    assert_all_released(&h).await;
}

#[tokio::test]
async fn bad_tenant_is_an_input_error() {
    let h = harness(vec![], vec![], false, false, 4);
    let mut opts = VmOptions::new(Language::Python);
    opts.tenant = Some("../evil".into());
    let err = h.manager.create_vm(opts).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Input);
    assert_eq!(err.context().field.as_deref(), Some("tenant"));
}

#[tokio::test]
async fn exec_streams_and_maps_outcomes() {
    use crate::request::ExecRequest;
    use crate::vm::ops::OutputCallbacks;

    let h = harness(vec![], vec![], false, false, 4);
    let vm = h
        .manager
        .create_vm(VmOptions::new(Language::Python))
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let s = seen.clone();
    let cbs = OutputCallbacks {
        on_stdout: Some(Arc::new(move |c: &[u8]| {
            s.lock().unwrap().extend_from_slice(c)
        })),
        on_stderr: Some(Arc::new(|_: &[u8]| panic!("callback bug"))),
    };
    let out = vm
        .exec(Language::Python, &ExecRequest::new("big 200000"), &cbs)
        .await
        .unwrap();
    assert_eq!(out.stdout.len(), 200_000);
    assert_eq!(seen.lock().unwrap().len(), 200_000);
    // A panicking stderr callback is disabled; output is still collected.
    let out = vm
        .exec(Language::Python, &ExecRequest::new("err"), &cbs)
        .await
        .unwrap();
    assert_eq!(out.exit_code, 1);
    assert_eq!(out.stderr, b"boom\n");
    assert_eq!(vm.state(), VmState::Ready);

    let err = vm
        .exec(Language::Python, &ExecRequest::new("limit"), &cbs)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutputLimit);

    let err = vm
        .exec(Language::Python, &ExecRequest::new("drop"), &cbs)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutcomeUnknown);
    assert!(!vm.is_alive());
    // After the transport is gone, nothing can be dispatched: transient (never ran).
    let agent = h.channel.last_agent().unwrap();
    assert!(!agent.execs().is_empty());
    vm.destroy().await;
}

#[tokio::test]
async fn a_dropped_exec_is_cancelled_in_the_guest_and_the_vm_stays_usable() {
    use crate::request::ExecRequest;
    use crate::vm::ops::OutputCallbacks;

    let h = harness(vec![], vec![], false, false, 4);
    let vm = h
        .manager
        .create_vm(VmOptions::new(Language::Python))
        .await
        .unwrap();
    let cbs = OutputCallbacks::default();
    let agent = h.channel.last_agent().unwrap();
    // Finished execs send no cancel.
    vm.exec(Language::Python, &ExecRequest::new("exit 0"), &cbs)
        .await
        .unwrap();
    assert_eq!(agent.cancels(), 0);
    // The caller gives up (Ctrl-C, a client that hung up): the future is dropped.
    let hung = tokio::time::timeout(
        Duration::from_millis(50),
        vm.exec(Language::Python, &ExecRequest::new("hang"), &cbs),
    )
    .await;
    assert!(hung.is_err());
    settle().await;
    assert_eq!(agent.cancels(), 1);
    assert_eq!(vm.state(), VmState::Ready);
    let out = vm
        .exec(Language::Python, &ExecRequest::new("exit 3"), &cbs)
        .await
        .unwrap();
    assert_eq!(out.exit_code, 3);
    assert_eq!(agent.cancels(), 1);
    vm.destroy().await;
}

#[tokio::test]
async fn files_round_trip_with_digest_checks() {
    let h = harness(vec![], vec![], false, false, 4);
    let vm = h
        .manager
        .create_vm(VmOptions::new(Language::Python))
        .await
        .unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (size, _) = vm
        .write_file("dir/data.bin", &mut data.as_slice(), false)
        .await
        .unwrap();
    assert_eq!(size, data.len() as u64);
    let mut back = Vec::new();
    vm.read_file("dir/data.bin", &mut back).await.unwrap();
    assert_eq!(back, data);
    let listing = vm.list_files("").await.unwrap();
    assert_eq!(listing.len(), 1);
    assert!(listing[0].is_dir && listing[0].name == "dir");
    let listing = vm.list_files("dir").await.unwrap();
    assert_eq!(listing.len(), 1);
    assert_eq!(listing[0].size, 300_000);
    let err = vm.read_file("missing", &mut Vec::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Guest);
    let err = vm
        .write_file("../escape", &mut &b"x"[..], false)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Input);
    vm.destroy().await;
}

#[test]
fn stale_work_dirs_of_dead_processes_are_reaped() {
    let dir = tempfile::tempdir().unwrap();
    let mine = dir
        .path()
        .join(format!("vm-{}-aaaaaaaaaaaa", std::process::id()));
    // pid_max is at most 2^22 on Linux: this pid cannot exist.
    let dead = dir.path().join("vm-4194305-bbbbbbbbbbbb");
    let other = dir.path().join("sbx-overlay-pool-1");
    for d in [&mine, &dead, &other] {
        std::fs::create_dir_all(d.join("sub")).unwrap();
    }
    assert_eq!(crate::manager::reap_stale_work_dirs(dir.path()), 1);
    assert!(mine.exists() && other.exists() && !dead.exists());
}

/// A limiter whose `create` never finishes: the VM is cancelled while the overlay is
/// already acquired and the limits are still pending.
struct StallingLimiter;

#[async_trait::async_trait]
impl crate::ports::ResourceLimiter for StallingLimiter {
    async fn create(
        &self,
        _vm_id: crate::vm::VmId,
        _limits: &crate::ports::ResourceLimits,
    ) -> crate::error::Result<crate::ports::LimitHandle> {
        futures::future::pending().await
    }

    async fn attach(&self, _h: &crate::ports::LimitHandle, _pid: u32) -> crate::error::Result<()> {
        Ok(())
    }

    async fn usage(
        &self,
        _h: &crate::ports::LimitHandle,
    ) -> crate::error::Result<crate::ports::ResourceUsage> {
        Ok(crate::ports::ResourceUsage::default())
    }

    async fn remove(&self, _h: &crate::ports::LimitHandle) -> crate::error::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn cancellation_between_overlay_and_limits_releases_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let counters = Arc::new(crate::testing::FakeCounters::default());
    let assets = GuestAssets::in_dir(dir.path());
    for p in [&assets.kernel, &assets.initramfs]
        .into_iter()
        .chain(assets.images.values())
    {
        std::fs::write(p, b"asset").unwrap();
    }
    let ports = Ports {
        hypervisor: Arc::new(crate::testing::FakeHypervisor(counters.clone())),
        overlays: Arc::new(crate::testing::FakeOverlays(counters.clone())),
        limiter: Arc::new(StallingLimiter),
        network: None,
        channel: Arc::new(FakeChannel::new(Vec::new())),
        snapshots: None,
        packages: None,
    };
    let work_root = dir.path().join("work");
    let cfg = VmManagerConfig::new(assets, work_root.clone(), crate::ports::Accelerator::Tcg);
    let manager = VmManager::new(cfg, ports);
    let create = manager.create_vm(VmOptions::new(Language::Python));
    let acquired = async {
        while counters.overlays_acquired.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::select! {
        r = create => panic!("create_vm cannot finish with a stalled limiter: {:?}", r.map(|v| v.id())),
        () = acquired => {} // create_vm is dropped here, overlay in hand, limits pending
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while counters.overlays_released.load(Ordering::SeqCst) == 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(counters.overlays_acquired.load(Ordering::SeqCst), 1);
    assert_eq!(
        counters.overlays_released.load(Ordering::SeqCst),
        1,
        "the overlay acquired before the cancellation is released"
    );
    assert_eq!(counters.launches.load(Ordering::SeqCst), 0);
    assert_eq!(manager.free_slots(), manager.config().max_vms);
    let left = std::fs::read_dir(&work_root)
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "work dir removed");
}

#[tokio::test]
async fn resume_sends_the_host_clock_and_fresh_entropy() {
    let h = harness(vec![], vec![], false, false, 2);
    let vm = h
        .manager
        .create_vm(VmOptions::new(Language::Python))
        .await
        .unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let first = vm.resume().await.unwrap();
    let second = vm.resume().await.unwrap();
    assert_eq!((first.crng_reseeds, second.crng_reseeds), (1, 2));
    assert_eq!(vm.state(), VmState::Ready);
    let resumes = h.channel.last_agent().unwrap().resumes();
    assert_eq!(resumes.len(), 2);
    for (time, entropy) in &resumes {
        assert!(*time >= before && *time - before < 5_000_000_000);
        assert_eq!(entropy.len(), crate::vm::ops::RESUME_ENTROPY_BYTES);
    }
    assert_ne!(
        resumes[0].1, resumes[1].1,
        "entropy must be fresh each time"
    );
    vm.destroy().await;
}
