//! Scheduler, session and warm pool tests against the fakes.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::Language;
use crate::admission::AdmissionConfig;
use crate::error::{ErrorKind, TransientCause};
use crate::request::{ExecRequest, RunRequest, SessionRequest};
use crate::scheduler::{RunOptions, Scheduler, SchedulerConfig};
use crate::testing::{FakeCounters, fake_manager};
use crate::vm::ops::OutputCallbacks;

struct H {
    _dir: tempfile::TempDir,
    sched: Scheduler,
    counters: Arc<FakeCounters>,
    channel: crate::testing::FakeChannel,
}

fn h(cfg: SchedulerConfig) -> H {
    let dir = tempfile::tempdir().unwrap();
    let (manager, counters, channel) = fake_manager(dir.path(), 16);
    let sched = Scheduler::new(cfg, manager).unwrap();
    sched.start().unwrap();
    H {
        _dir: dir,
        sched,
        counters,
        channel,
    }
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Everything released: waits (bounded) for background teardowns, which a loaded
/// machine may schedule late, then asserts.
async fn assert_clean(h: &H) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(h.counters.running() == 0
        && h.counters.all_released()
        && h.sched.manager().live_count() == 0)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(h.counters.running(), 0, "VMs left running");
    assert!(
        h.counters.all_released(),
        "overlays or limits leaked: launches {} overlays {}/{} limits {}/{} live {}",
        h.counters.launches.load(Ordering::SeqCst),
        h.counters.overlays_acquired.load(Ordering::SeqCst),
        h.counters.overlays_released.load(Ordering::SeqCst),
        h.counters.limits_created.load(Ordering::SeqCst),
        h.counters.limits_removed.load(Ordering::SeqCst),
        h.sched.manager().live_count()
    );
    assert_eq!(h.sched.manager().live_count(), 0);
}

#[tokio::test]
async fn run_executes_and_always_destroys() {
    let h = h(SchedulerConfig::default());
    let r = h
        .sched
        .run(
            RunRequest::new(Language::Python, "print(1)"),
            RunOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "print(1)");
    assert_eq!(r.exit_code, 0);
    assert!(!r.warm_pool_hit);
    assert!(r.timing.total_ms >= r.timing.execute_ms);
    assert_eq!(r.cpu_time_ms, Some(3));
    assert_eq!(r.memory_peak_mb, Some(64));
    assert_clean(&h).await;

    // Errors after dispatch: outcome unknown, VM still destroyed.
    let err = h
        .sched
        .run(
            RunRequest::new(Language::Python, "drop"),
            RunOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutcomeUnknown);
    assert_clean(&h).await;

    // A timeout is a result, not an error.
    let r = h
        .sched
        .run(
            RunRequest::new(Language::Raw, "timeout"),
            RunOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, -1);
    assert!(r.stderr.contains("Execution timeout"));
    assert_clean(&h).await;
}

#[tokio::test]
async fn run_validates_before_any_vm_work() {
    let h = h(SchedulerConfig::default());
    let mut req = RunRequest::new(Language::Python, "x");
    req.timeout_secs = 0;
    let err = h.sched.run(req, RunOptions::default()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Input);
    assert_eq!(h.counters.launches.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn cancelled_run_destroys_the_vm() {
    let h = h(SchedulerConfig::default());
    let fut = h.sched.run(
        RunRequest::new(Language::Python, "hang"),
        RunOptions::default(),
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(100), fut)
            .await
            .is_err()
    );
    settle().await;
    assert_eq!(h.counters.launches.load(Ordering::SeqCst), 1);
    assert_clean(&h).await;
}

#[tokio::test]
async fn streaming_callbacks_see_chunks() {
    let h = h(SchedulerConfig::default());
    let chunks = Arc::new(Mutex::new(0usize));
    let c = chunks.clone();
    let opts = RunOptions {
        callbacks: OutputCallbacks {
            on_stdout: Some(Arc::new(move |_: &[u8]| *c.lock().unwrap() += 1)),
            on_stderr: None,
        },
        boot_log: None,
    };
    let r = h
        .sched
        .run(RunRequest::new(Language::Python, "big 200000"), opts)
        .await
        .unwrap();
    assert_eq!(r.stdout.len(), 200_000);
    assert!(*chunks.lock().unwrap() >= 4);
}

#[tokio::test]
async fn session_keeps_state_and_survives_user_errors() {
    let h = h(SchedulerConfig::default());
    let s = h
        .sched
        .session(SessionRequest::new(Language::Python), RunOptions::default())
        .await
        .unwrap();
    let cb = OutputCallbacks::default();
    s.exec(ExecRequest::new("set x 42"), &cb).await.unwrap();
    let r = s.exec(ExecRequest::new("get x"), &cb).await.unwrap();
    assert_eq!(r.stdout, "42\n");
    assert_eq!(r.timing.boot_ms, 0);

    // User error, input error, output limit: session stays alive.
    assert_eq!(
        s.exec(ExecRequest::new("err"), &cb)
            .await
            .unwrap()
            .exit_code,
        1
    );
    let err = s.exec(ExecRequest::new(""), &cb).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Input);
    let err = s.exec(ExecRequest::new("limit"), &cb).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutputLimit);
    assert!(!s.is_closed());
    assert_eq!(s.exec_count(), 3);

    // Files.
    s.write_bytes("a.txt", b"hello", false).await.unwrap();
    assert_eq!(s.read_bytes("a.txt").await.unwrap(), b"hello");
    assert_eq!(s.list_files("").await.unwrap()[0].name, "a.txt");
    let err = s.read_bytes("nope").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Guest);
    assert!(!s.is_closed());

    // Exit 137 closes the session after returning the result.
    let r = s.exec(ExecRequest::new("exit 137"), &cb).await.unwrap();
    assert_eq!(r.exit_code, 137);
    assert!(s.is_closed());
    let err = s.exec(ExecRequest::new("get x"), &cb).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SessionClosed);
    let err = s.list_files("").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SessionClosed);
    s.close().await; // idempotent
    settle().await;
    assert_clean(&h).await;
}

#[tokio::test]
async fn session_closes_on_transport_loss_and_vm_death() {
    let h = h(SchedulerConfig::default());
    let cb = OutputCallbacks::default();
    let s = h
        .sched
        .session(SessionRequest::new(Language::Raw), RunOptions::default())
        .await
        .unwrap();
    let err = s.exec(ExecRequest::new("drop"), &cb).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutcomeUnknown);
    assert!(s.is_closed());

    let s2 = h
        .sched
        .session(SessionRequest::new(Language::Raw), RunOptions::default())
        .await
        .unwrap();
    // The VM process dies behind the session's back.
    h.counters
        .processes
        .lock()
        .unwrap()
        .last()
        .unwrap()
        .crash(1);
    let err = s2.exec(ExecRequest::new("x"), &cb).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SessionClosed);
    assert!(s2.is_closed());
    settle().await;
    assert_clean(&h).await;
}

#[tokio::test]
async fn session_execs_are_serialized() {
    let h = h(SchedulerConfig::default());
    let s = h
        .sched
        .session(SessionRequest::new(Language::Python), RunOptions::default())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..5 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.exec(
                ExecRequest::new(format!("sleep {}", 10 + i)),
                &OutputCallbacks::default(),
            )
            .await
            .unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().exit_code, 0);
    }
    assert_eq!(s.exec_count(), 5);
    s.close().await;
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_closes_but_not_during_an_operation() {
    let h = h(SchedulerConfig::default());
    let mut req = SessionRequest::new(Language::Python);
    req.idle_timeout_secs = 10;
    let s = h.sched.session(req, RunOptions::default()).await.unwrap();
    // An exec longer than the idle timeout keeps the session open.
    let r = s
        .exec(ExecRequest::new("sleep 15000"), &OutputCallbacks::default())
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0);
    assert!(!s.is_closed());
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!s.is_closed());
    tokio::time::sleep(Duration::from_secs(6)).await;
    settle().await;
    assert!(s.is_closed());
    let err = s
        .exec(ExecRequest::new("x"), &OutputCallbacks::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SessionClosed);
}

#[tokio::test]
async fn warm_pool_hits_and_refills() {
    let cfg = SchedulerConfig {
        warm_pool_size: 1,
        ..Default::default()
    };
    let h = h(cfg);
    assert!(h.sched.wait_pool_ready(Duration::from_secs(5)).await);
    let launches_before = h.counters.launches.load(Ordering::SeqCst);
    assert_eq!(launches_before, 3); // one per language
    let r = h
        .sched
        .run(
            RunRequest::new(Language::Python, "hi"),
            RunOptions::default(),
        )
        .await
        .unwrap();
    assert!(r.warm_pool_hit);
    assert_eq!(r.timing.boot_ms, 0);
    // Not eligible: other memory.
    let mut req = RunRequest::new(Language::Python, "hi");
    req.memory_mb = 256;
    let r = h.sched.run(req, RunOptions::default()).await.unwrap();
    assert!(!r.warm_pool_hit);
    // Refilled in the background.
    assert!(h.sched.wait_pool_ready(Duration::from_secs(5)).await);
    // A pooled VM that died is never handed out.
    let agents = h.channel.agents.lock().unwrap().clone();
    for a in agents {
        a.kill_transport();
    }
    let r = h
        .sched
        .run(RunRequest::new(Language::Raw, "x"), RunOptions::default())
        .await
        .unwrap();
    assert!(!r.warm_pool_hit);
    h.sched.stop().await;
    settle().await;
    assert_clean(&h).await;
}

fn h_slots(cfg: SchedulerConfig, max_vms: usize) -> H {
    let dir = tempfile::tempdir().unwrap();
    let (manager, counters, channel) = fake_manager(dir.path(), max_vms);
    let sched = Scheduler::new(cfg, manager).unwrap();
    sched.start().unwrap();
    H {
        _dir: dir,
        sched,
        counters,
        channel,
    }
}

/// Waits (bounded) until the pool holds `n` VMs in all.
async fn pool_holds(h: &H, n: usize) {
    let pool = h.sched.warm_pool().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pool.ready_counts().values().sum::<usize>() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pool never held {n} VMs: {:?}",
            pool.ready_counts()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// With the pool holding all the capacity (2 VMs), runs requests for a language the pool
/// does not hold (a miss that only an eviction can serve) and for one it holds (a hit).
/// None may wait for long: a hang fails the test.
async fn runs_never_hang(h: &H) {
    let pool = h.sched.warm_pool().unwrap();
    for round in 0..4 {
        pool_holds(h, 2).await;
        let counts = pool.ready_counts();
        let missing = *counts.iter().find(|(_, n)| **n == 0).unwrap().0;
        let present = *counts.iter().find(|(_, n)| **n > 0).unwrap().0;
        let evicted_before = pool.evicted();
        for (lang, hit) in [(missing, false), (present, true)] {
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                h.sched
                    .run(RunRequest::new(lang, "x"), RunOptions::default()),
            )
            .await
            .unwrap_or_else(|_| panic!("round {round}: a {lang} run hung behind idle pooled VMs"))
            .unwrap();
            assert_eq!(r.exit_code, 0);
            assert_eq!(r.warm_pool_hit, hit, "round {round}: {lang}");
        }
        assert!(
            pool.evicted() > evicted_before,
            "round {round}: nothing evicted"
        );
    }
    pool_holds(h, 2).await;
    let counts = pool.ready_counts();
    let missing = *counts.iter().find(|(_, n)| **n == 0).unwrap().0;
    let s = tokio::time::timeout(
        Duration::from_secs(5),
        h.sched
            .session(SessionRequest::new(missing), RunOptions::default()),
    )
    .await
    .expect("a session hung behind idle pooled VMs")
    .unwrap();
    s.close().await;
}

#[tokio::test]
async fn idle_pooled_vms_never_starve_requests_for_slots() {
    // One warm VM per language (3) but only 2 VM slots: the pool alone fills every slot.
    let h = h_slots(
        SchedulerConfig {
            warm_pool_size: 1,
            ..Default::default()
        },
        2,
    );
    pool_holds(&h, 2).await;
    runs_never_hang(&h).await;
    h.sched.stop().await;
    assert_clean(&h).await;
}

#[tokio::test]
async fn idle_pooled_vms_never_starve_requests_for_admission() {
    // Admission fits 2 VMs (2 CPUs at one per VM) and waits up to a minute: smaller than
    // the pool of 3, and a request stuck behind the pool would hang the test.
    let h = h(SchedulerConfig {
        warm_pool_size: 1,
        admission: Some(AdmissionConfig {
            cpu_overcommit: 1.0,
            cpu_reserve_cores: 0.5,
            timeout: Duration::from_secs(60),
            ..AdmissionConfig::for_host(100_000, 2.5)
        }),
        ..Default::default()
    });
    pool_holds(&h, 2).await;
    runs_never_hang(&h).await;
    h.sched.stop().await;
    assert_clean(&h).await;
}

#[tokio::test]
async fn requests_with_free_capacity_evict_nothing_and_capacity_waits_are_bounded() {
    let h = h_slots(
        SchedulerConfig {
            warm_pool_size: 1,
            ..Default::default()
        },
        8,
    );
    assert!(h.sched.wait_pool_ready(Duration::from_secs(5)).await);
    let mut req = RunRequest::new(Language::Python, "x");
    req.memory_mb = 256; // not eligible for the pool: boots
    let r = h.sched.run(req, RunOptions::default()).await.unwrap();
    assert!(!r.warm_pool_hit);
    assert_eq!(h.sched.warm_pool().unwrap().evicted(), 0);
    h.sched.stop().await;

    // Without a pool, a request that finds every slot taken fails with a capacity error
    // after the bound instead of waiting forever.
    let dir = tempfile::tempdir().unwrap();
    let (manager, _counters, _channel) = crate::testing::fake_manager_with(dir.path(), |c| {
        c.max_vms = 1;
        c.slot_timeout = Duration::from_millis(100);
    });
    let sched = Scheduler::new(SchedulerConfig::default(), manager).unwrap();
    sched.start().unwrap();
    let held = sched
        .session(SessionRequest::new(Language::Python), RunOptions::default())
        .await
        .unwrap();
    let t = std::time::Instant::now();
    let err = sched
        .run(
            RunRequest::new(Language::Python, "x"),
            RunOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient(TransientCause::Capacity));
    assert!(t.elapsed() < Duration::from_secs(3));
    held.close().await;
    sched.stop().await;
}

#[tokio::test]
async fn admission_wait_is_reported_in_admission_ms() {
    let h = h(SchedulerConfig {
        admission: Some(AdmissionConfig {
            cpu_overcommit: 1.0,
            cpu_reserve_cores: 0.5,
            timeout: Duration::from_secs(10),
            ..AdmissionConfig::for_host(100_000, 1.5)
        }),
        ..Default::default()
    });
    let held = h
        .sched
        .session(SessionRequest::new(Language::Python), RunOptions::default())
        .await
        .unwrap();
    let closer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        held.close().await;
    });
    let r = h
        .sched
        .run(
            RunRequest::new(Language::Python, "x"),
            RunOptions::default(),
        )
        .await
        .unwrap();
    closer.await.unwrap();
    assert!(r.timing.admission_ms >= 250, "{:?}", r.timing);
    assert!(r.timing.setup_ms < 250, "{:?}", r.timing);
    assert_eq!(
        r.timing.execute_ms,
        r.timing.connect_ms + r.timing.spawn_ms + r.timing.process_ms
    );
    h.sched.stop().await;
}

#[tokio::test]
async fn admission_bounds_concurrent_vms() {
    // Budget: 1000 × 0.92 × 1 = 920 MiB; each VM needs 192 + 208 = 400 → 2 at once.
    let cfg = SchedulerConfig {
        admission: Some(AdmissionConfig {
            memory_overcommit: 1.0,
            timeout: Duration::from_millis(200),
            ..AdmissionConfig::for_host(1000, 8.0)
        }),
        ..Default::default()
    };
    let h = h(cfg);
    let a = h
        .sched
        .session(SessionRequest::new(Language::Python), RunOptions::default())
        .await
        .unwrap();
    let b = h
        .sched
        .session(SessionRequest::new(Language::Python), RunOptions::default())
        .await
        .unwrap();
    let err = h
        .sched
        .session(SessionRequest::new(Language::Python), RunOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient(TransientCause::Capacity));
    a.close().await;
    let c = h
        .sched
        .session(SessionRequest::new(Language::Python), RunOptions::default())
        .await
        .unwrap();
    b.close().await;
    c.close().await;
}

#[tokio::test]
async fn stop_destroys_everything_and_refuses_work() {
    let h = h(SchedulerConfig::default());
    let s = h
        .sched
        .session(SessionRequest::new(Language::Python), RunOptions::default())
        .await
        .unwrap();
    h.sched.stop().await;
    assert!(s.is_closed());
    let err = h
        .sched
        .run(
            RunRequest::new(Language::Python, "x"),
            RunOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::Permanent(_)));
    settle().await;
    assert_clean(&h).await;
}

#[test]
fn config_ranges_are_validated() {
    let bad = [
        SchedulerConfig {
            default_memory_mb: 100,
            ..Default::default()
        },
        SchedulerConfig {
            default_timeout_secs: 301,
            ..Default::default()
        },
        SchedulerConfig {
            session_idle_timeout_secs: 5,
            ..Default::default()
        },
    ];
    for cfg in bad {
        assert!(cfg.validate().is_err(), "{cfg:?}");
    }
    assert!(SchedulerConfig::default().validate().is_ok());
}

fn h_net() -> (H, crate::testing::FakeNetwork) {
    let dir = tempfile::tempdir().unwrap();
    let (manager, counters, channel, network) =
        crate::testing::fake_manager_with_network(dir.path(), |_| {});
    let sched = Scheduler::new(
        SchedulerConfig {
            warm_pool_size: 1,
            ..Default::default()
        },
        manager,
    )
    .unwrap();
    sched.start().unwrap();
    (
        H {
            _dir: dir,
            sched,
            counters,
            channel,
        },
        network,
    )
}

#[tokio::test]
async fn network_requests_boot_with_their_own_proxy_and_release_it() {
    let (h, _net) = h_net();
    assert!(h.sched.wait_pool_ready(Duration::from_secs(5)).await);
    // The pool's VMs have no network.
    let pooled = h.counters.launched_specs.lock().unwrap().clone();
    assert!(
        pooled
            .iter()
            .all(|(att, args)| att.is_none() && args.is_empty())
    );
    assert_eq!(h.counters.networks_started.load(Ordering::SeqCst), 0);

    let mut req = RunRequest::new(Language::Python, "x");
    req.network.allow_network = true;
    req.network.allowed_domains = vec!["example.com".into()];
    req.network.expose_ports = vec![crate::request::PortMapping::tcp(8000)];
    let r = h.sched.run(req, RunOptions::default()).await.unwrap();
    // Never a pooled VM: a fresh one with its own network.
    assert!(!r.warm_pool_hit);
    assert_eq!(r.exposed_ports.len(), 1);
    assert_eq!(
        (r.exposed_ports[0].internal, r.exposed_ports[0].external),
        (8000, 18000)
    );
    let specs = h.counters.launched_specs.lock().unwrap().clone();
    let (att, args) = specs.last().unwrap();
    assert!(
        matches!(att, Some(crate::ports::NetworkAttachment::UnixStream { socket }) if socket.ends_with("net.sock"))
    );
    assert_eq!(args, &vec!["sbx.net=fake".to_owned()]);
    assert_eq!(h.counters.networks_started.load(Ordering::SeqCst), 1);

    // Sessions too; closing stops the network.
    let mut sreq = SessionRequest::new(Language::Raw);
    sreq.network.expose_ports = vec![crate::request::PortMapping::tcp(22)];
    let s = h.sched.session(sreq, RunOptions::default()).await.unwrap();
    assert_eq!(h.counters.networks_started.load(Ordering::SeqCst), 2);
    s.close().await;
    h.sched.stop().await;
    assert_clean(&h).await;
    assert_eq!(h.counters.networks_stopped.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_network_that_fails_to_start_releases_everything_and_launches_nothing() {
    let (h, net) = h_net();
    assert!(h.sched.wait_pool_ready(Duration::from_secs(5)).await);
    let launches = h.counters.launches.load(Ordering::SeqCst);
    net.fail_start.store(true, Ordering::SeqCst);
    let mut req = RunRequest::new(Language::Python, "x");
    req.network.expose_ports = vec![crate::request::PortMapping::tcp(8000)];
    let err = h.sched.run(req, RunOptions::default()).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(h.counters.launches.load(Ordering::SeqCst), launches);
    assert_eq!(h.counters.networks_started.load(Ordering::SeqCst), 0);
    h.sched.stop().await;
    assert_clean(&h).await;
}

#[tokio::test]
async fn networking_without_a_proxy_is_a_configuration_error_before_any_vm_work() {
    let h = h(SchedulerConfig::default());
    let mut req = RunRequest::new(Language::Python, "x");
    req.network.allow_network = true;
    let err = h.sched.run(req, RunOptions::default()).await.unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::Permanent(_)), "{err}");
    assert_eq!(h.counters.launches.load(Ordering::SeqCst), 0);
    assert_eq!(h.counters.overlays_acquired.load(Ordering::SeqCst), 0);
    assert_eq!(h.sched.manager().free_slots(), 16);
    h.sched.stop().await;
}

fn h_snap() -> (H, crate::testing::FakeSnapshotStore) {
    let dir = tempfile::tempdir().unwrap();
    let (manager, counters, channel, store) =
        crate::testing::fake_manager_with_snapshots(dir.path(), |_| {});
    let sched = Scheduler::new(SchedulerConfig::default(), manager).unwrap();
    sched.start().unwrap();
    (
        H {
            _dir: dir,
            sched,
            counters,
            channel,
        },
        store,
    )
}

fn launched_memory(h: &H) -> Vec<crate::ports::MemoryBacking> {
    h.counters.launched_memory.lock().unwrap().clone()
}

#[tokio::test]
async fn a_cold_boot_creates_the_snapshot_and_later_runs_restore_and_resume() {
    use crate::ports::MemoryBacking;
    use crate::result::VmStart;
    let (h, store) = h_snap();
    let r = h
        .sched
        .run(
            RunRequest::new(Language::Python, "x"),
            RunOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.vm_start, VmStart::Cold);
    assert!(h.sched.wait_background(Duration::from_secs(5)).await);
    // The background creation booted a saveable VM, saved it and published it once.
    let mem = launched_memory(&h);
    assert_eq!(mem.len(), 2, "{mem:?}");
    assert!(matches!(&mem[1], MemoryBacking::SharedFile { path } if path.ends_with("ram")));
    let counts = store.counts();
    assert_eq!((counts.drafts, counts.published), (1, 1), "{counts:?}");
    // The saved VM warmed up with its clock far ahead, so clones (set back to the host's
    // clock) see every generator seeded "in the future" (OpenSSL then reseeds).
    let saved = h.channel.agents.lock().unwrap()[1].clone();
    let resumes = saved.resumes();
    assert_eq!(resumes.len(), 1);
    assert_eq!(
        resumes[0].0,
        crate::restore::SNAPSHOT_GUEST_CLOCK_SECS * 1_000_000_000
    );

    for _ in 0..2 {
        let r = h
            .sched
            .run(
                RunRequest::new(Language::Python, "x"),
                RunOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(r.vm_start, VmStart::Snapshot);
        assert!(matches!(
            launched_memory(&h).last(),
            Some(MemoryBacking::Restore { ram, state }) if ram.ends_with("ram") && state.ends_with("state")
        ));
        // Resumed before anything else: clock and fresh entropy.
        let resumes = h.channel.last_agent().unwrap().resumes();
        assert_eq!(resumes.len(), 1);
        assert!(resumes[0].1.len() >= 32);
    }
    // Another language has its own key: cold first.
    let r = h
        .sched
        .run(RunRequest::new(Language::Raw, "x"), RunOptions::default())
        .await
        .unwrap();
    assert_eq!(r.vm_start, VmStart::Cold);
    assert!(h.sched.wait_background(Duration::from_secs(5)).await);
    assert_eq!(store.counts().published, 2);
    h.sched.stop().await;
    assert_clean(&h).await;
}

#[tokio::test]
async fn a_corrupted_snapshot_is_discarded_and_the_vm_boots_cold() {
    use crate::result::VmStart;
    let (h, store) = h_snap();
    let opts = crate::manager::VmOptions::new(Language::Python);
    let key = h.sched.manager().snapshot_key(&opts).await.unwrap();
    store.insert(key);
    store.corrupt(&key);
    let r = h
        .sched
        .run(
            RunRequest::new(Language::Python, "x"),
            RunOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.vm_start, VmStart::Cold);
    assert!(matches!(
        launched_memory(&h).first(),
        Some(crate::ports::MemoryBacking::Anonymous)
    ));
    assert_eq!(store.counts().discarded, 1);
    h.sched.stop().await;
    assert_clean(&h).await;
}

#[tokio::test]
async fn vms_with_a_boot_log_or_a_home_disk_are_never_snapshotted() {
    let (h, store) = h_snap();
    let m = h.sched.manager();
    let opts = crate::manager::VmOptions::new(Language::Python);
    assert!(m.snapshot_key(&opts).await.is_some());
    // Networking without a proxy that can serve restored guests: no key.
    let mut opts = crate::manager::VmOptions::new(Language::Python);
    opts.network = crate::ports::NetworkPolicy::Open { ports: Vec::new() };
    assert!(m.snapshot_key(&opts).await.is_none());
    let mut opts = crate::manager::VmOptions::new(Language::Python);
    opts.disk_mb = Some(256);
    assert!(m.snapshot_key(&opts).await.is_none());
    let mut opts = crate::manager::VmOptions::new(Language::Python);
    opts.boot_log = Some(tokio::sync::mpsc::unbounded_channel().0);
    assert!(m.snapshot_key(&opts).await.is_none());
    // Keys differ by language and memory.
    let a = m
        .snapshot_key(&crate::manager::VmOptions::new(Language::Python))
        .await;
    let b = m
        .snapshot_key(&crate::manager::VmOptions::new(Language::Raw))
        .await;
    let mut big = crate::manager::VmOptions::new(Language::Python);
    big.memory_mb = 512;
    let c = m.snapshot_key(&big).await;
    assert!(a != b && a != c && b != c);
    assert_eq!(store.counts().lookups, 0);
    h.sched.stop().await;
}

#[tokio::test]
async fn a_clone_that_does_not_resume_boots_cold_in_the_slot_it_held() {
    use crate::manager::VmOptions;
    use crate::result::VmStart;
    let dir = tempfile::tempdir().unwrap();
    let (manager, _counters, channel, store) =
        crate::testing::fake_manager_with_snapshots(dir.path(), |cfg| cfg.max_vms = 1);
    let key = manager
        .snapshot_key(&VmOptions::new(Language::Python))
        .await
        .unwrap();
    store.insert(key);
    channel.refuse_resume.store(true, Ordering::SeqCst);
    // Another request queues for the only slot while the clone is tried.
    let first = tokio::spawn({
        let m = manager.clone();
        async move { m.create_vm(VmOptions::new(Language::Python)).await }
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let second = tokio::spawn({
        let m = manager.clone();
        async move { m.create_vm(VmOptions::new(Language::Raw)).await }
    });
    // The refused clone gives way to a cold boot in the same slot: the queued request
    // does not get it in between.
    let vm = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("the first request must not wait behind the second")
        .unwrap()
        .unwrap();
    assert_eq!(vm.start_kind(), VmStart::Cold);
    assert!(!second.is_finished());
    assert!(
        !store.is_published(&key),
        "the snapshot that failed is removed"
    );
    assert_eq!(manager.free_slots(), 0);
    vm.destroy().await;
    let other = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(other.language(), Language::Raw);
    other.destroy().await;
    assert_eq!(manager.free_slots(), 1);
}

#[tokio::test]
async fn networked_vms_restore_with_their_own_proxy_and_policy() {
    use crate::manager::VmOptions;
    use crate::ports::{MemoryBacking, NetworkPolicy};
    use crate::result::VmStart;
    let dir = tempfile::tempdir().unwrap();
    let f = crate::testing::Fakes::new()
        .network()
        .snapshots()
        .build(dir.path(), |_| {});
    let (network, store) = (f.network.clone().unwrap(), f.snapshots.clone().unwrap());
    let m = f.manager.clone();
    // One key for every policy (the proxy's shape, never its policy), apart from the
    // key of VMs without a network device.
    let with = |network: NetworkPolicy| {
        let mut o = VmOptions::new(Language::Python);
        o.network = network;
        o
    };
    let allow = NetworkPolicy::Allowlist {
        domains: vec!["example.com".into()],
        ports: vec![crate::request::PortMapping::tcp(8000)],
    };
    let open = NetworkPolicy::Open { ports: Vec::new() };
    let key = m.snapshot_key(&with(allow.clone())).await.unwrap();
    assert_eq!(Some(key), m.snapshot_key(&with(open.clone())).await);
    assert_ne!(
        Some(key),
        m.snapshot_key(&VmOptions::new(Language::Python)).await
    );

    let sched = Scheduler::new(SchedulerConfig::default(), f.manager).unwrap();
    sched.start().unwrap();
    let request = |domains: Vec<String>| {
        let mut req = RunRequest::new(Language::Python, "x");
        req.network.allow_network = true;
        req.network.allowed_domains = domains;
        req.network.expose_ports = vec![crate::request::PortMapping::tcp(8000)];
        req
    };
    let r = sched
        .run(request(vec!["example.com".into()]), RunOptions::default())
        .await
        .unwrap();
    assert_eq!(r.vm_start, VmStart::Cold);
    assert!(sched.wait_background(Duration::from_secs(5)).await);
    assert!(store.is_published(&key));
    // The saved VM had a proxy of its own that forwards nothing and lets nothing out.
    let policies = network.policies();
    assert_eq!(policies.len(), 2, "{policies:?}");
    assert_eq!(policies[1], NetworkPolicy::PortsOnly { ports: Vec::new() });

    // A clone with another policy: restored, with its own proxy and its own policy.
    let r = sched
        .run(request(Vec::new()), RunOptions::default())
        .await
        .unwrap();
    assert_eq!(r.vm_start, VmStart::Snapshot);
    assert_eq!(r.exposed_ports.len(), 1);
    assert!(matches!(
        f.counters.launched_memory.lock().unwrap().last(),
        Some(MemoryBacking::Restore { .. })
    ));
    let policies = network.policies();
    assert_eq!(
        policies.last(),
        Some(&NetworkPolicy::Open {
            ports: vec![crate::request::PortMapping::tcp(8000)]
        })
    );
    let counters = f.counters.clone();
    sched.stop().await;
    assert_eq!(
        counters.networks_started.load(Ordering::SeqCst),
        counters.networks_stopped.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn packages_off_the_allowlist_are_refused_before_any_vm_work() {
    let list = crate::packages::PackageAllowlist::parse("[python]\nsix\n", "test").unwrap();
    let h = h(SchedulerConfig {
        package_allowlist: Some(Arc::new(list)),
        ..SchedulerConfig::default()
    });
    for (specs, field) in [
        (vec!["evil==1.0"], "packages"),
        (vec!["six==1.16.0", "six==1.15.0"], "packages[1]"),
        (vec!["six>=1"], "packages[0]"),
        (vec!["six==1.16.0 --index-url=http://x"], "packages[0]"),
    ] {
        let mut req = RunRequest::new(Language::Python, "import six");
        req.packages = specs.iter().map(|s| s.to_string()).collect();
        let err = h.sched.run(req, RunOptions::default()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Input, "{specs:?}: {err}");
        assert_eq!(err.context().field.as_deref(), Some(field), "{specs:?}");
        let mut s = SessionRequest::new(Language::Python);
        s.packages = specs.iter().map(|s| s.to_string()).collect();
        let err = h.sched.session(s, RunOptions::default()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Input, "{specs:?}: {err}");
    }
    assert_eq!(h.counters.launches.load(Ordering::SeqCst), 0);
    let specs = h
        .sched
        .package_specs(Language::Python, &["SIX==1.16.0".into()])
        .unwrap();
    assert_eq!(specs[0].name, "six");
}

#[tokio::test]
async fn packages_attach_their_layer_and_skip_the_pool_and_snapshots() {
    use crate::manager::VmOptions;
    let dir = tempfile::tempdir().unwrap();
    let f = crate::testing::Fakes::new()
        .packages()
        .snapshots()
        .build(dir.path(), |_| {});
    let layers = f.packages.clone().unwrap();
    let store = f.snapshots.clone().unwrap();
    let counters = f.counters.clone();
    let sched = Scheduler::new(
        SchedulerConfig {
            warm_pool_size: 1,
            ..SchedulerConfig::default()
        },
        f.manager.clone(),
    )
    .unwrap();
    sched.start().unwrap();
    // A published snapshot of plain python VMs: a VM with a layer must not restore it.
    let key = f
        .manager
        .snapshot_key(&VmOptions::new(Language::Python))
        .await
        .unwrap();
    store.insert(key);
    let mut with_layer = VmOptions::new(Language::Python);
    with_layer.package_layer = Some(crate::packages::PackageLayer {
        image: "/x".into(),
        digest: "0".repeat(64),
        key: "k".into(),
    });
    assert_eq!(f.manager.snapshot_key(&with_layer).await, None);

    let mut req = RunRequest::new(Language::Python, "import six");
    req.packages = vec!["SIX==1.16.0".into(), "attrs==23.1.0".into()];
    let r = sched.run(req, RunOptions::default()).await.unwrap();
    assert_eq!(r.exit_code, 0);
    assert!(!r.warm_pool_hit);
    assert_eq!(r.vm_start, crate::result::VmStart::Cold);
    let calls = layers.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    let names: Vec<&str> = calls[0].1.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["attrs", "six"], "normalized and sorted");
    let launched = counters.launched_layers.lock().unwrap().clone();
    let with: Vec<_> = launched.iter().flatten().collect();
    assert_eq!(with.len(), 1, "{launched:?}");
    assert!(with[0].ends_with("attrs-23.1.0_six-1.16.0.erofs"));

    let mut s = SessionRequest::new(Language::Python);
    s.packages = vec!["six==1.16.0".into()];
    let session = sched.session(s, RunOptions::default()).await.unwrap();
    let launched = counters.launched_layers.lock().unwrap().clone();
    assert!(
        launched
            .last()
            .unwrap()
            .as_ref()
            .is_some_and(|p| p.ends_with("six-1.16.0.erofs"))
    );
    session.close().await;

    // A package the builder cannot find: an input error, and no VM for it.
    let before = counters.launched_layers.lock().unwrap().len();
    let mut req = RunRequest::new(Language::Python, "1");
    req.packages = vec!["nosuch==1.0".into()];
    let err = sched.run(req, RunOptions::default()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Input, "{err}");
    assert_eq!(counters.launched_layers.lock().unwrap().len(), before);
    sched.stop().await;
}

#[tokio::test]
async fn packages_without_a_layer_builder_are_refused_never_ignored() {
    let h = h(SchedulerConfig::default());
    let mut req = RunRequest::new(Language::Python, "import six");
    req.packages = vec!["six==1.16.0".into()];
    let err = h.sched.run(req, RunOptions::default()).await.unwrap_err();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::Permanent(crate::error::PermanentCause::Config)
        ),
        "{err}"
    );
    assert_eq!(h.counters.launches.load(Ordering::SeqCst), 0);
}

/// A session over a fresh fake VM, and its agent.
async fn hostile_session(h: &H, m: crate::testing::Misbehavior) -> crate::session::Session {
    let s = h
        .sched
        .session(SessionRequest::new(Language::Raw), RunOptions::default())
        .await
        .unwrap();
    h.channel.last_agent().unwrap().misbehave(m);
    s
}

/// The host's own caps on what the agent sends: an agent that floods output, lists too
/// much or an impossible name gets its operation a typed error, and the VM is destroyed.
#[tokio::test]
async fn hostile_agent_output_and_listings_are_capped_by_the_host() {
    use crate::testing::Misbehavior;
    let h = h(SchedulerConfig::default());
    let cb = OutputCallbacks::default();

    let s = hostile_session(&h, Misbehavior::Flood).await;
    let started = std::time::Instant::now();
    let err = s.exec(ExecRequest::new("x"), &cb).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutcomeUnknown, "{err}");
    assert!(err.to_string().contains("stdout limit"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(s.is_closed());

    for (m, what) in [
        (Misbehavior::HugeListing(100_001), "entries"),
        (Misbehavior::BadName, "impossible file name"),
    ] {
        let s = hostile_session(&h, m).await;
        let err = s.list_files("").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::OutcomeUnknown, "{err}");
        assert!(err.to_string().contains(what), "{err}");
        assert!(s.is_closed());
    }
    settle().await;
    assert_clean(&h).await;
}

/// Every operation has a host deadline: a silent agent gets a typed error in bounded
/// time (virtual time here), and its VM is destroyed.
#[tokio::test(start_paused = true)]
async fn silent_agent_gets_every_operation_a_deadline() {
    use crate::testing::Misbehavior;
    let h = h(SchedulerConfig::default());
    let s = hostile_session(&h, Misbehavior::Silent).await;
    let err = s.ping().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutcomeUnknown, "{err}");
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert!(s.is_closed());

    let s = hostile_session(&h, Misbehavior::Silent).await;
    let err = s.list_files("").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutcomeUnknown, "{err}");

    let s = hostile_session(&h, Misbehavior::Silent).await;
    let err = s.read_bytes("f").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutcomeUnknown, "{err}");

    let s = hostile_session(&h, Misbehavior::Silent).await;
    let err = s.write_bytes("f", b"data", false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutcomeUnknown, "{err}");
    assert!(err.to_string().contains("write_file"), "{err}");
    settle().await;
    assert_clean(&h).await;
}

/// `close` always wins: closing a session while an operation hangs ends the operation
/// and destroys the VM within seconds (real time).
#[tokio::test]
async fn close_wins_over_a_hung_operation() {
    use crate::testing::Misbehavior;
    let h = h(SchedulerConfig::default());
    for op in ["exec", "list"] {
        let s = hostile_session(&h, Misbehavior::Silent).await;
        let s2 = s.clone();
        let task = tokio::spawn(async move {
            match op {
                "exec" => {
                    let mut req = ExecRequest::new("x");
                    req.timeout_secs = 300;
                    s2.exec(req, &OutputCallbacks::default()).await.map(|_| ())
                }
                _ => s2.list_files("").await.map(|_| ()),
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        s.close().await;
        let r = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the hung operation ended after close")
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), ErrorKind::SessionClosed, "{op}");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while h.counters.running() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(h.counters.running(), 0, "{op}: VM still running");
        assert!(started.elapsed() < Duration::from_secs(5), "{op}");
    }
    assert_clean(&h).await;
}
