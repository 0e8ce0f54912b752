//! The filesystem snapshot store on a real filesystem (tempdirs), including a second
//! process (this test binary re-run as a helper) and, where root may mount one, a full
//! tmpfs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use sandbox_core::{
    ErrorKind, PermanentCause, Snapshot, SnapshotDraft, SnapshotKey, SnapshotStore, TransientCause,
};
use snapshot_store::{FsSnapshotStore, SnapshotStoreError, layout};

const ROOT_ENV: &str = "SBX_SNAPSHOT_TEST_ROOT";
const KEY_ENV: &str = "SBX_SNAPSHOT_TEST_KEY";

fn key(n: u8) -> SnapshotKey {
    SnapshotKey::from_bytes([n; 32])
}

fn ram_bytes() -> Vec<u8> {
    (0..300_000u32).map(|i| (i % 251) as u8).collect()
}

fn write_draft(draft: &SnapshotDraft, ram: &[u8], state: &[u8]) {
    fs::write(draft.ram_path(), ram).unwrap();
    fs::write(draft.state_path(), state).unwrap();
}

fn publish(store: &FsSnapshotStore, k: &SnapshotKey) -> Snapshot {
    let draft = store.begin_blocking(k).unwrap().expect("a draft");
    write_draft(&draft, &ram_bytes(), b"device state");
    store.publish_blocking(draft).unwrap()
}

/// Names directly under the root, sorted, without the lock directory.
fn root_names(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != layout::LOCKS_DIR)
        .collect();
    names.sort();
    names
}

/// Changes a published (0444) file's content and restores its mode, after a pause so the
/// coarse file timestamps move.
fn tamper(path: &Path, change: impl FnOnce(&mut Vec<u8>)) {
    std::thread::sleep(Duration::from_millis(30));
    let mode = fs::metadata(path).unwrap().permissions().mode();
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = fs::read(path).unwrap();
    change(&mut bytes);
    fs::write(path, &bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn publish_then_lookup_round_trips_and_verifies_once_per_process() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsSnapshotStore::open(dir.path()).unwrap();
    let k = key(1);
    assert!(store.lookup_blocking(&k).unwrap().is_none());
    let snap = publish(&store, &k);

    let entry = dir.path().join(k.to_string());
    assert_eq!(snap.ram, entry.join("ram"));
    assert_eq!(snap.state, entry.join("state"));
    assert_eq!(fs::read(&snap.ram).unwrap(), ram_bytes());
    assert_eq!(snap.manifest.ram.size, ram_bytes().len() as u64);
    assert_eq!(snap.manifest.state.size, 12);
    assert_eq!(snap.manifest.key, k);
    assert!(snap.manifest.created_by.contains("pid"));
    // Published files are read-only for everyone, the directory readable.
    assert_eq!(mode(&snap.ram), 0o444);
    assert_eq!(mode(&snap.state), 0o444);
    assert_eq!(mode(&entry.join("manifest.json")), 0o444);
    assert_eq!(mode(&entry), 0o755);
    // Nothing else is left: no draft, no trash.
    assert_eq!(root_names(dir.path()), vec![k.to_string()]);

    // The publishing process hashed the files already: no second full hash.
    assert_eq!(store.lookup_blocking(&k).unwrap(), Some(snap.clone()));
    assert_eq!(store.stats().full_verifications, 0);
    // Published: no more drafts for it.
    assert!(store.begin_blocking(&k).unwrap().is_none());

    // Another process (a fresh store) hashes once, then re-checks stamps only.
    let other = FsSnapshotStore::open(dir.path()).unwrap();
    assert_eq!(other.lookup_blocking(&k).unwrap(), Some(snap.clone()));
    assert_eq!(other.lookup_blocking(&k).unwrap(), Some(snap));
    assert_eq!(other.stats().full_verifications, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_works_through_the_trait_object() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn SnapshotStore> = Arc::new(FsSnapshotStore::open(dir.path()).unwrap());
    let k = key(2);
    let draft = store.begin(&k).await.unwrap().unwrap();
    write_draft(&draft, b"ram", b"state");
    let snap = store.publish(draft).await.unwrap();
    assert_eq!(store.lookup(&k).await.unwrap(), Some(snap));
    let listed = store.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, k);
    assert!(listed[0].manifest.is_some());

    // A draft the store did not make is refused as an internal error.
    let foreign = SnapshotDraft::new(key(3), "/x/ram".into(), "/x/state".into(), ());
    let err = store.publish(foreign).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Permanent(PermanentCause::Internal));
    // A draft of another store (other root) too.
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = FsSnapshotStore::open(dir2.path()).unwrap();
    let theirs = store2.begin_blocking(&key(4)).unwrap().unwrap();
    let err = store.abandon(theirs).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Permanent(PermanentCause::Internal));
}

#[test]
fn a_corrupted_byte_in_ram_is_discarded_never_returned() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsSnapshotStore::open(dir.path()).unwrap();
    let k = key(5);
    let snap = publish(&store, &k);
    tamper(&snap.ram, |b| b[123_456] ^= 0x01);

    // A fresh process hashes and finds the mismatch.
    let other = FsSnapshotStore::open(dir.path()).unwrap();
    assert_eq!(other.lookup_blocking(&k).unwrap(), None);
    assert_eq!(other.stats().discarded, 1);
    assert!(!dir.path().join(k.to_string()).exists());
    assert!(
        root_names(dir.path()).is_empty(),
        "{:?}",
        root_names(dir.path())
    );
    // It can be made again.
    assert!(other.begin_blocking(&k).unwrap().is_some());
}

#[test]
fn a_change_after_the_cached_verification_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsSnapshotStore::open(dir.path()).unwrap();
    let k = key(6);
    let snap = publish(&store, &k);
    assert!(store.lookup_blocking(&k).unwrap().is_some());
    // Same size, new content: the stamp changed, so the files are hashed again.
    tamper(&snap.ram, |b| b[0] ^= 0xff);
    assert_eq!(store.lookup_blocking(&k).unwrap(), None);
    assert_eq!(store.stats().full_verifications, 1);
    assert!(!dir.path().join(k.to_string()).exists());
}

#[test]
fn a_truncated_state_file_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsSnapshotStore::open(dir.path()).unwrap();
    let k = key(7);
    let snap = publish(&store, &k);
    tamper(&snap.state, |b| {
        b.pop();
    });
    assert_eq!(store.lookup_blocking(&k).unwrap(), None);
    assert!(!dir.path().join(k.to_string()).exists());
    // Found by size alone: nothing was hashed.
    assert_eq!(store.stats().full_verifications, 0);
}

#[test]
fn a_missing_or_bad_manifest_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsSnapshotStore::open(dir.path()).unwrap();
    type BreakIt<'a> = &'a dyn Fn(&Path);
    let cases: [(u8, BreakIt); 5] = [
        (10, &|m| fs::remove_file(m).unwrap()),
        (11, &|m| tamper(m, |b| *b = b"{not json".to_vec())),
        // Parsed from disk, so bounded: an oversized manifest is not even parsed.
        (12, &|m| {
            tamper(m, |b| {
                let mut big = vec![b' '; 20 * 1024];
                big.extend_from_slice(b);
                *b = big;
            })
        }),
        (13, &|m| {
            tamper(m, |b| {
                *b = String::from_utf8(b.clone())
                    .unwrap()
                    .replace("\"format\": 1", "\"format\": 9")
                    .into_bytes()
            })
        }),
        (14, &|m| {
            tamper(m, |b| {
                *b = String::from_utf8(b.clone())
                    .unwrap()
                    .replace('}', ",\"x\":1}")
                    .into_bytes()
            })
        }),
    ];
    for (n, break_it) in cases {
        let k = key(n);
        publish(&store, &k);
        break_it(&dir.path().join(k.to_string()).join("manifest.json"));
        assert_eq!(store.lookup_blocking(&k).unwrap(), None, "case {n}");
        assert!(!dir.path().join(k.to_string()).exists(), "case {n}");
    }
    assert!(root_names(dir.path()).is_empty());
}

#[test]
fn a_manifest_of_another_key_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsSnapshotStore::open(dir.path()).unwrap();
    let (a, b, c) = (key(20), key(21), key(22));
    publish(&store, &a);
    publish(&store, &b);
    // b's directory now carries a's manifest (a's files are identical, so only the key differs).
    let a_manifest = dir.path().join(a.to_string()).join("manifest.json");
    let b_manifest = dir.path().join(b.to_string()).join("manifest.json");
    tamper(&b_manifest, |bytes| *bytes = fs::read(&a_manifest).unwrap());
    assert_eq!(store.lookup_blocking(&b).unwrap(), None);
    // A whole entry renamed to another key's name is refused too.
    fs::rename(
        dir.path().join(a.to_string()),
        dir.path().join(c.to_string()),
    )
    .unwrap();
    assert_eq!(store.lookup_blocking(&c).unwrap(), None);
    assert_eq!(store.lookup_blocking(&a).unwrap(), None);
    assert!(root_names(dir.path()).is_empty());
}

#[test]
fn writable_or_symlinked_files_are_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsSnapshotStore::open(dir.path()).unwrap();
    let k = key(25);
    let snap = publish(&store, &k);
    fs::set_permissions(&snap.ram, fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(store.lookup_blocking(&k).unwrap(), None);

    let snap = publish(&store, &k);
    let elsewhere = dir.path().join("elsewhere");
    fs::copy(&snap.ram, &elsewhere).unwrap();
    fs::remove_file(&snap.ram).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &snap.ram).unwrap();
    let fresh = FsSnapshotStore::open(dir.path()).unwrap();
    assert_eq!(fresh.lookup_blocking(&k).unwrap(), None);
    assert!(!dir.path().join(k.to_string()).exists());
}

#[test]
fn concurrent_creators_in_one_process_make_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsSnapshotStore::open(dir.path()).unwrap();
    let k = key(30);
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                store.begin_blocking(&k).unwrap()
            })
        })
        .collect();
    let mut drafts: Vec<SnapshotDraft> = handles
        .into_iter()
        .filter_map(|h| h.join().unwrap())
        .collect();
    assert_eq!(drafts.len(), 1, "exactly one creator gets the draft");
    let draft = drafts.pop().unwrap();
    // While it is being written, nobody else gets one and nobody sees a snapshot.
    assert!(store.begin_blocking(&k).unwrap().is_none());
    assert!(store.lookup_blocking(&k).unwrap().is_none());
    write_draft(&draft, &ram_bytes(), b"st");
    let published = store.publish_blocking(draft).unwrap();
    // The others find the published one.
    assert!(store.begin_blocking(&k).unwrap().is_none());
    assert_eq!(store.lookup_blocking(&k).unwrap(), Some(published));
}

#[test]
fn a_dropped_or_abandoned_draft_leaves_nothing_and_frees_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsSnapshotStore::open(dir.path()).unwrap();
    let k = key(31);
    let draft = store.begin_blocking(&k).unwrap().unwrap();
    write_draft(&draft, b"partial", b"");
    drop(draft);
    assert!(root_names(dir.path()).is_empty());
    let draft = store.begin_blocking(&k).unwrap().unwrap();
    store.abandon_blocking(draft).unwrap();
    assert!(root_names(dir.path()).is_empty());
    assert!(store.begin_blocking(&k).unwrap().is_some());
}

#[test]
fn when_another_writer_published_first_theirs_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsSnapshotStore::open(dir.path()).unwrap();
    let k = key(32);
    // Their snapshot, made elsewhere, appears under the final name while we write ours.
    let elsewhere = tempfile::tempdir().unwrap();
    let theirs = publish(&FsSnapshotStore::open(elsewhere.path()).unwrap(), &k);
    let ours = store.begin_blocking(&k).unwrap().unwrap();
    write_draft(&ours, b"our ram", b"our state");
    let final_dir = dir.path().join(k.to_string());
    fs::create_dir(&final_dir).unwrap();
    for name in ["ram", "state", "manifest.json"] {
        fs::copy(
            elsewhere.path().join(k.to_string()).join(name),
            final_dir.join(name),
        )
        .unwrap();
    }
    let got = store.publish_blocking(ours).unwrap();
    assert_eq!(got.manifest, theirs.manifest);
    assert_eq!(fs::read(&got.ram).unwrap(), ram_bytes());
    assert_eq!(root_names(dir.path()), vec![k.to_string()]);

    // A broken one in the way is replaced by ours.
    let k2 = key(33);
    let ours = store.begin_blocking(&k2).unwrap().unwrap();
    write_draft(&ours, b"our ram", b"our state");
    let in_the_way = dir.path().join(k2.to_string());
    fs::create_dir(&in_the_way).unwrap();
    fs::write(in_the_way.join("ram"), b"junk").unwrap();
    let got = store.publish_blocking(ours).unwrap();
    assert_eq!(fs::read(&got.ram).unwrap(), b"our ram");
}

#[test]
fn a_publish_failure_publishes_nothing_and_removes_the_draft() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsSnapshotStore::open(dir.path()).unwrap();
    let k = key(40);
    // An I/O error while writing the manifest (something already stands at its name).
    let draft = store.begin_blocking(&k).unwrap().unwrap();
    write_draft(&draft, b"ram", b"state");
    fs::create_dir(draft.ram_path().parent().unwrap().join("manifest.json")).unwrap();
    let err = store.publish_blocking(draft).unwrap_err();
    assert!(matches!(err, SnapshotStoreError::Io { .. }), "{err}");
    let public: sandbox_core::Error = err.into();
    assert_eq!(
        public.kind(),
        ErrorKind::Transient(TransientCause::Infrastructure)
    );
    assert!(store.lookup_blocking(&k).unwrap().is_none());
    assert!(root_names(dir.path()).is_empty());

    // A save that wrote nothing is refused the same way.
    let draft = store.begin_blocking(&k).unwrap().unwrap();
    fs::write(draft.state_path(), b"state").unwrap();
    let err = store.publish_blocking(draft).unwrap_err();
    assert!(
        matches!(err, SnapshotStoreError::BadDraftFile { .. }),
        "{err}"
    );
    assert!(root_names(dir.path()).is_empty());
    // And the key is free again.
    publish(&store, &k);
}

#[test]
fn a_published_ram_file_is_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsSnapshotStore::open(dir.path()).unwrap();
    let k = key(41);
    let snap = publish(&store, &k);
    // A clone holds the file open (as QEMU's mapping would) while the entry is replaced.
    let mut held = fs::File::open(&snap.ram).unwrap();
    assert!(store.remove_blocking(&k).unwrap());
    let draft = store.begin_blocking(&k).unwrap().unwrap();
    assert_ne!(draft.ram_path(), snap.ram.as_path());
    write_draft(&draft, b"new ram", b"new state");
    let new = store.publish_blocking(draft).unwrap();
    let mut old = Vec::new();
    held.read_to_end(&mut old).unwrap();
    assert_eq!(old, ram_bytes());
    assert_eq!(fs::read(&new.ram).unwrap(), b"new ram");
}

#[test]
fn a_stale_draft_of_a_dead_process_is_never_used_and_is_swept() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(50);
    // A complete-looking draft (manifest and all) of a process that is gone.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let donor = tempfile::tempdir().unwrap();
    let donor_snap = publish(&FsSnapshotStore::open(donor.path()).unwrap(), &k);
    let stale = dir.path().join(format!(".draft-{k}-{dead}-0123abcd"));
    fs::create_dir(&stale).unwrap();
    for name in ["ram", "state", "manifest.json"] {
        fs::copy(
            donor_snap.ram.parent().unwrap().join(name),
            stale.join(name),
        )
        .unwrap();
    }
    // Junk that is not ours is left alone.
    fs::write(dir.path().join("README"), b"not a snapshot").unwrap();

    let store = FsSnapshotStore::open(dir.path()).unwrap();
    assert_eq!(store.stats().swept, 1);
    assert!(!stale.exists());
    assert!(store.lookup_blocking(&k).unwrap().is_none());
    assert_eq!(root_names(dir.path()), vec!["README".to_owned()]);
}

#[test]
fn remove_list_and_clear() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsSnapshotStore::open(dir.path()).unwrap();
    let (a, b, c) = (key(60), key(61), key(62));
    for k in [&a, &b, &c] {
        publish(&store, k);
    }
    fs::remove_file(dir.path().join(c.to_string()).join("manifest.json")).unwrap();
    let listed = store.list_blocking().unwrap();
    assert_eq!(
        listed.iter().map(|e| e.key).collect::<Vec<_>>(),
        vec![a, b, c]
    );
    assert!(listed[0].manifest.is_some() && listed[2].manifest.is_none());

    assert!(store.remove_blocking(&a).unwrap());
    assert!(!store.remove_blocking(&a).unwrap());
    assert!(store.lookup_blocking(&a).unwrap().is_none());

    // A live draft survives clear; everything published goes, lock files nobody holds too.
    let live = store.begin_blocking(&key(63)).unwrap().unwrap();
    assert_eq!(store.clear_blocking().unwrap(), 2);
    let names = root_names(dir.path());
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with(".draft-"), "{names:?}");
    let locks: Vec<_> = fs::read_dir(dir.path().join(layout::LOCKS_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        locks.len(),
        1,
        "only the live draft's lock remains: {locks:?}"
    );
    // The live draft still publishes after clear.
    write_draft(&live, b"r", b"s");
    store.publish_blocking(live).unwrap();
    assert_eq!(store.clear_blocking().unwrap(), 1);
    assert!(root_names(dir.path()).is_empty());
    assert!(store.list_blocking().unwrap().is_empty());
}

#[test]
fn open_rejects_a_root_that_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    fs::write(&file, b"x").unwrap();
    let err = FsSnapshotStore::open(&file).unwrap_err();
    let public: sandbox_core::Error = err.into();
    assert!(!public.is_retryable() || public.kind() != ErrorKind::Input);
    assert!(FsSnapshotStore::open("").is_err());
}

// ---- a second process ----------------------------------------------------------------

fn helper_command(test: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        test,
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd
}

/// Run only as a child of `a_draft_is_exclusive_across_processes_and_dies_with_its_holder`:
/// begins a draft, writes half a RAM file, says so, and waits to be killed.
#[test]
#[ignore = "helper: run in a child process by another test"]
fn helper_child_holds_a_draft() {
    let (Some(root), Some(k)) = (std::env::var_os(ROOT_ENV), std::env::var(KEY_ENV).ok()) else {
        panic!("{ROOT_ENV} and {KEY_ENV} must be set: this helper runs as a child process");
    };
    let store = FsSnapshotStore::open(PathBuf::from(root)).unwrap();
    let draft = store
        .begin_blocking(&SnapshotKey::parse(&k).unwrap())
        .unwrap()
        .expect("the child gets the draft");
    fs::write(draft.ram_path(), &ram_bytes()[..1000]).unwrap();
    println!("HOLDING {}", draft.ram_path().display());
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_draft_is_exclusive_across_processes_and_dies_with_its_holder() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(70);
    let mut child = helper_command("helper_child_holds_a_draft")
        .env(ROOT_ENV, dir.path())
        .env(KEY_ENV, k.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let draft_ram = loop {
        let line = lines.next().expect("child said HOLDING").unwrap();
        // libtest prints "test <name> ... " on the same line first.
        if let Some((_, path)) = line.split_once("HOLDING ") {
            break PathBuf::from(path);
        }
    };
    assert!(draft_ram.exists());

    let store = FsSnapshotStore::open(dir.path()).unwrap();
    // Opening did not sweep the live child's draft.
    assert!(draft_ram.exists());
    // The child's flock excludes this process.
    assert!(store.begin_blocking(&k).unwrap().is_none());
    assert!(store.lookup_blocking(&k).unwrap().is_none());

    // kill -9 during the save: the lock dies with the process, the partial draft is
    // never used and the next open sweeps it.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(draft_ram.exists());
    assert!(store.lookup_blocking(&k).unwrap().is_none());
    let reopened = FsSnapshotStore::open(dir.path()).unwrap();
    assert_eq!(reopened.stats().swept, 1);
    assert!(!draft_ram.exists());
    let draft = reopened
        .begin_blocking(&k)
        .unwrap()
        .expect("key is free again");
    write_draft(&draft, &ram_bytes(), b"s");
    reopened.publish_blocking(draft).unwrap();
    assert!(store.lookup_blocking(&k).unwrap().is_some());
}

// ---- a full disk ----------------------------------------------------------------------

/// Run only inside a private mount namespace with a 1 MiB tmpfs at `$SBX_SNAPSHOT_TEST_ROOT`,
/// by `a_full_disk_during_publish_publishes_nothing`.
#[test]
#[ignore = "helper: run in a child process by another test"]
fn helper_publish_on_a_full_tmpfs() {
    let Some(root) = std::env::var_os(ROOT_ENV) else {
        panic!("{ROOT_ENV} must be set: this helper runs as a child process");
    };
    let root = PathBuf::from(root);
    let store = FsSnapshotStore::open(root.join("snapshots")).unwrap();
    let k = key(80);
    let draft = store.begin_blocking(&k).unwrap().unwrap();
    write_draft(&draft, &ram_bytes(), b"device state");
    // Fill the filesystem.
    let mut filler = fs::File::create(root.join("filler")).unwrap();
    let chunk = vec![0u8; 4096];
    let full = loop {
        if let Err(err) = filler.write_all(&chunk).and_then(|()| filler.sync_all()) {
            break err;
        }
    };
    assert_eq!(full.kind(), std::io::ErrorKind::StorageFull, "{full}");

    let err = store.publish_blocking(draft).unwrap_err();
    assert_eq!(
        err.io_kind(),
        Some(std::io::ErrorKind::StorageFull),
        "{err}"
    );
    assert!(store.lookup_blocking(&k).unwrap().is_none());
    assert!(
        root_names(store.root()).is_empty(),
        "{:?}",
        root_names(store.root())
    );

    // With space again, the same key publishes.
    drop(filler);
    fs::remove_file(root.join("filler")).unwrap();
    publish(&store, &k);
    println!("ENOSPC-OK");
}

#[test]
fn a_full_disk_during_publish_publishes_nothing() {
    let probe = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .stderr(Stdio::null())
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        eprintln!(
            "SKIPPED a_full_disk_during_publish_publishes_nothing: cannot unshare a mount \
             namespace here (needs root); a_publish_failure_publishes_nothing_and_removes_the_draft \
             covers the I/O error path"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t tmpfs -o size=1m tmpfs \"$0\" || exit 77; exec \"$1\" --ignored --exact \
             helper_publish_on_a_full_tmpfs --nocapture --test-threads=1",
        )
        .arg(dir.path())
        .arg(exe)
        .env(ROOT_ENV, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(77) {
        eprintln!(
            "SKIPPED a_full_disk_during_publish_publishes_nothing: cannot mount tmpfs: {stderr}"
        );
        return;
    }
    assert!(
        output.status.success() && stdout.contains("ENOSPC-OK"),
        "child failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // The tmpfs lived only in the child's namespace.
    assert!(fs::read_dir(dir.path()).unwrap().next().is_none());
}

#[test]
fn a_removed_lock_directory_is_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsSnapshotStore::open(dir.path()).unwrap();
    fs::remove_dir_all(dir.path().join(layout::LOCKS_DIR)).unwrap();
    let snap = publish(&store, &key(90));
    assert_eq!(store.lookup_blocking(&key(90)).unwrap(), Some(snap));
}
