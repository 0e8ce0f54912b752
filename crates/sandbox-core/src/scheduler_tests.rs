//! Scheduler, session and warm pool tests against the fakes.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::Language;
use crate::admission::AdmissionConfig;
use crate::error::{ErrorKind, TransientCause};
use crate::ops::OutputCallbacks;
use crate::request::{ExecRequest, RunRequest, SessionRequest};
use crate::scheduler::{RunOptions, Scheduler, SchedulerConfig};
use crate::testing::{FakeCounters, fake_manager};

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
