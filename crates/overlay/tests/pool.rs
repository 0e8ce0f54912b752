//! Overlay pool behaviour against the real `qemu-img`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use overlay::{OverlayError, OverlayOptions, OverlayPool, PoolConfig, create_overlay};
use sandbox_core::ports::{Overlay, OverlayStore};
use sandbox_core::{ErrorKind, PermanentCause, TransientCause};

fn qemu_img_available() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: qemu-img is not installed");
    }
    ok
}

fn make_base(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("16M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    base
}

fn info(path: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn config(root: &Path, size: usize) -> PoolConfig {
    PoolConfig {
        pool_root: Some(root.to_path_buf()),
        size_per_base: size,
        ..PoolConfig::default()
    }
}

fn entries(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            let mut v: Vec<String> = rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
        Err(_) => Vec::new(),
    }
}

fn assert_valid_overlay(overlay: &Path, base: &Path) {
    let abs_base = std::fs::canonicalize(base).unwrap();
    let info = info(overlay);
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(
        info["backing-filename"],
        abs_base.to_str().unwrap(),
        "{info}"
    );
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], 16 * 1024 * 1024, "{info}");
    assert_eq!(info["cluster-size"], 128 * 1024, "{info}");
    let data = &info["format-specific"]["data"];
    assert_eq!(data["lazy-refcounts"], true, "{info}");
    assert_eq!(data["extended-l2"], true, "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_returns_qcow2_backed_by_the_absolute_base() {
    if !qemu_img_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    make_base(tmp.path());
    std::fs::create_dir(tmp.path().join("sub")).unwrap();
    // A non-canonical path: the overlay must still record the canonical absolute one.
    let base_arg = tmp.path().join("sub/../base.qcow2");
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let pool = OverlayPool::new(config(tmp.path(), 0)).unwrap();

    let overlay = pool.acquire(&base_arg, &work).await.unwrap();
    assert!(overlay.path.starts_with(&work), "{overlay:?}");
    assert_valid_overlay(&overlay.path, &tmp.path().join("base.qcow2"));
    let stats = pool.stats();
    assert_eq!((stats.hits, stats.misses, stats.created), (0, 1, 1));
    assert!(stats.last_create.is_some());
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_hit_by_rename_and_on_demand_when_empty() {
    if !qemu_img_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = make_base(tmp.path());
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let pool = OverlayPool::new(config(tmp.path(), 2)).unwrap();

    // Empty pool: created on demand, refill starts.
    let t = Instant::now();
    let first = pool.acquire(&base, &work).await.unwrap();
    let on_demand = t.elapsed();
    assert_eq!((pool.stats().hits, pool.stats().misses), (0, 1));
    assert_valid_overlay(&first.path, &base);

    assert!(pool.wait_until_full(&base, Duration::from_secs(20)).await);
    let pooled_before = entries(pool.pool_dir());
    assert_eq!(pooled_before.len(), 2, "{pooled_before:?}");
    let pooled_inode = std::fs::metadata(pool.pool_dir().join(&pooled_before[0]))
        .unwrap()
        .ino();

    let t = Instant::now();
    let second = pool.acquire(&base, &work).await.unwrap();
    let from_pool = t.elapsed();
    assert_eq!((pool.stats().hits, pool.stats().misses), (1, 1));
    // Moved by rename: same inode, gone from the pool dir.
    assert_eq!(std::fs::metadata(&second.path).unwrap().ino(), pooled_inode);
    assert!(!pool.pool_dir().join(&pooled_before[0]).exists());
    assert_valid_overlay(&second.path, &base);
    assert_ne!(first.path, second.path);
    eprintln!(
        "acquire on demand (qemu-img): {:?}, from pool (rename): {:?}, mean qemu-img create: {:?}",
        on_demand,
        from_pool,
        pool.stats().mean_create()
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_refills_after_takes() {
    if !qemu_img_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = make_base(tmp.path());
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let pool = OverlayPool::new(config(tmp.path(), 3)).unwrap();
    pool.prewarm(&base).await.unwrap();
    assert!(pool.wait_until_full(&base, Duration::from_secs(20)).await);
    assert_eq!(pool.stats().created, 3);

    for _ in 0..3 {
        pool.acquire(&base, &work).await.unwrap();
    }
    assert_eq!(pool.stats().hits, 3);
    assert!(pool.wait_until_full(&base, Duration::from_secs(20)).await);
    assert_eq!(pool.pooled(&base), 3);
    assert_eq!(entries(pool.pool_dir()).len(), 3);
    assert_eq!(pool.stats().created, 6);
    assert_eq!(entries(&work).len(), 3);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_is_idempotent() {
    if !qemu_img_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = make_base(tmp.path());
    let pool = OverlayPool::new(config(tmp.path(), 0)).unwrap();
    let overlay = pool.acquire(&base, tmp.path()).await.unwrap();
    assert!(overlay.path.exists());
    pool.release(&overlay).await.unwrap();
    assert!(!overlay.path.exists());
    pool.release(&overlay).await.unwrap();
    let never = Overlay {
        path: tmp.path().join("never-existed.qcow2"),
    };
    pool.release(&never).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_reaps_dirs_of_dead_processes_only() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dead_child = Command::new("true").spawn().unwrap();
    let dead_pid = dead_child.id();
    dead_child.wait().unwrap();
    let mut live_child = Command::new("sleep").arg("30").spawn().unwrap();
    let live_pid = live_child.id();

    let dead = tmp.path().join(format!("sbx-overlay-pool-{dead_pid}"));
    let dead_instance = tmp.path().join(format!("sbx-overlay-pool-{dead_pid}-3"));
    let live = tmp.path().join(format!("sbx-overlay-pool-{live_pid}"));
    let unrelated = tmp.path().join("sbx-overlay-pool-notapid");
    for dir in [&dead, &dead_instance, &live, &unrelated] {
        std::fs::create_dir(dir).unwrap();
        std::fs::write(dir.join("pooled-0.qcow2"), b"x").unwrap();
    }

    let pool = OverlayPool::new(config(tmp.path(), 1)).unwrap();
    assert!(!dead.exists(), "dead pid's pool dir must be reaped");
    assert!(
        !dead_instance.exists(),
        "dead pid's pool dir must be reaped"
    );
    assert!(
        live.join("pooled-0.qcow2").exists(),
        "live pid's pool dir must stay"
    );
    assert!(unrelated.exists());
    assert!(pool.pool_dir().exists());

    live_child.kill().unwrap();
    live_child.wait().unwrap();
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_remains_after_shutdown_with_refills_in_flight() {
    if !qemu_img_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = make_base(tmp.path());
    let root = tmp.path().join("root");
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let pool = OverlayPool::new(config(&root, 4)).unwrap();
    let pool_dir = pool.pool_dir().to_path_buf();
    assert!(pool_dir.starts_with(&root));

    // The first acquire starts a refill of 4; shut down while it runs.
    let overlay = pool.acquire(&base, &work).await.unwrap();
    pool.shutdown().await;
    assert!(!pool_dir.exists());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(entries(&root), Vec::<String>::new());
    // The handed-out overlay belongs to the caller.
    assert!(overlay.path.exists());
    pool.shutdown().await;

    // After shutdown acquires still work, on demand, and leave no pool dir.
    let late = pool.acquire(&base, &work).await.unwrap();
    assert!(late.path.exists());
    assert_eq!(entries(&root), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_remains_after_drop_with_refills_in_flight() {
    if !qemu_img_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = make_base(tmp.path());
    let root = tmp.path().join("root");
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let pool = OverlayPool::new(config(&root, 4)).unwrap();
    pool.acquire(&base, &work).await.unwrap();
    drop(pool);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(entries(&root), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_filesystem_work_dir_falls_back_to_on_demand() {
    if !qemu_img_available() {
        return;
    }
    let shm = Path::new("/dev/shm");
    let tmp = tempfile::tempdir().unwrap();
    let Ok(shm_root) = tempfile::tempdir_in(shm) else {
        eprintln!("SKIP: /dev/shm unavailable");
        return;
    };
    if std::fs::metadata(shm).unwrap().dev() == std::fs::metadata(tmp.path()).unwrap().dev() {
        eprintln!("SKIP: /dev/shm is on the same file system as the temp dir");
        return;
    }
    let base = make_base(tmp.path());
    let pool = OverlayPool::new(config(shm_root.path(), 1)).unwrap();
    pool.prewarm(&base).await.unwrap();
    assert!(pool.wait_until_full(&base, Duration::from_secs(20)).await);
    let overlay = pool.acquire(&base, tmp.path()).await.unwrap();
    assert_valid_overlay(&overlay.path, &base);
    let stats = pool.stats();
    assert_eq!((stats.hits, stats.misses, stats.cross_device), (0, 1, 1));
    pool.shutdown().await;
    assert_eq!(entries(shm_root.path()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_base_and_missing_qemu_img_are_permanent() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = OverlayPool::new(config(tmp.path(), 2)).unwrap();
    let err = pool
        .acquire(&tmp.path().join("nope.qcow2"), tmp.path())
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Permanent(PermanentCause::MissingDependency),
        "{err}"
    );
    assert!(!err.is_retryable());
    let err = pool.acquire(tmp.path(), tmp.path()).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Permanent(PermanentCause::Config),
        "{err}"
    );
    pool.shutdown().await;

    std::fs::write(tmp.path().join("base.qcow2"), b"not really").unwrap();
    let opts = OverlayOptions {
        qemu_img: PathBuf::from("/nonexistent/qemu-img"),
        ..OverlayOptions::default()
    };
    let err = create_overlay(&opts, &tmp.path().join("base.qcow2"), &tmp.path().join("o"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, OverlayError::QemuImgNotFound { .. }),
        "{err:?}"
    );
    let err: sandbox_core::Error = err.into();
    assert_eq!(
        err.kind(),
        ErrorKind::Permanent(PermanentCause::MissingDependency)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_failure_is_transient_and_leaves_nothing() {
    if !qemu_img_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Not a qcow2 file: `-F qcow2` makes qemu-img refuse it.
    let base = tmp.path().join("base.qcow2");
    std::fs::write(&base, vec![0u8; 4096]).unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let pool = OverlayPool::new(config(tmp.path(), 0)).unwrap();
    let err = pool.acquire(&base, &work).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Transient(TransientCause::Overlay),
        "{err}"
    );
    assert_eq!(entries(&work), Vec::<String>::new());
}
