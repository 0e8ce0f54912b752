//! File transfer and path validation tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

use bytes::Bytes;
use common::{Harness, test_user};
use guest_agent::Outbox;
use guest_agent::files::{self, WriteMsg};
use guest_proto::{DirEntry, Frame, GuestErrorKind, GuestMessage, OpId, Sha256Digest};
use tokio::sync::mpsc;

fn write(h: &Harness, path: &str, data: &[u8], executable: bool) -> Option<GuestMessage> {
    let digest = Sha256Digest::of(data).0;
    write_with(h, path, data, data.len() as u64, digest, executable, true)
}

fn write_with(
    h: &Harness,
    path: &str,
    data: &[u8],
    size: u64,
    sha256: [u8; 32],
    executable: bool,
    finish: bool,
) -> Option<GuestMessage> {
    let (tx, rx) = mpsc::channel(1024);
    for chunk in data.chunks(64 * 1024) {
        if tx
            .try_send(WriteMsg::Chunk(Bytes::copy_from_slice(chunk)))
            .is_err()
        {
            break;
        }
    }
    if finish {
        let _ = tx.try_send(WriteMsg::End { size, sha256 });
    }
    drop(tx);
    files::write_file_blocking(h.engine.config(), path, executable, rx)
}

fn read(h: &Harness, path: &str) -> (Vec<u8>, GuestMessage) {
    let (tx, mut rx) = mpsc::channel::<Frame<GuestMessage>>(100_000);
    let out = Outbox::new(OpId(1), tx);
    let done = files::read_file_blocking(h.engine.config(), path, &out);
    drop(out);
    let mut data = Vec::new();
    while let Ok(frame) = rx.try_recv() {
        if let GuestMessage::FileChunk(b) = frame.msg {
            data.extend_from_slice(&b);
        }
    }
    (data, done)
}

fn kind(msg: &GuestMessage) -> GuestErrorKind {
    match msg {
        GuestMessage::Error { kind, .. } => *kind,
        other => panic!("expected Error, got {other:?}"),
    }
}

fn leftovers(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("sbx-upload"))
        .collect()
}

#[test]
fn write_read_round_trip() {
    let h = Harness::new();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let done = write(&h, "a/b/c/data.bin", &data, false).unwrap();
    let digest = Sha256Digest::of(&data).0;
    assert_eq!(
        done,
        GuestMessage::FileWritten {
            size: data.len() as u64,
            sha256: digest
        }
    );
    let path = h.root().join("a/b/c/data.bin");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    if let Some(user) = test_user() {
        assert_eq!((meta.uid(), meta.gid()), (user.uid, user.gid));
        let dir = std::fs::metadata(h.root().join("a/b")).unwrap();
        assert_eq!(dir.uid(), user.uid);
    }
    let (back, done) = read(&h, "a/b/c/data.bin");
    assert_eq!(back, data);
    assert_eq!(
        done,
        GuestMessage::FileRead {
            size: data.len() as u64,
            sha256: digest
        }
    );
    // Overwrite, executable, empty file.
    write(&h, "a/b/c/data.bin", b"#!/bin/sh\necho hi\n", true).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    assert!(matches!(
        write(&h, "empty", b"", false),
        Some(GuestMessage::FileWritten { size: 0, .. })
    ));
    assert_eq!(read(&h, "empty").0, b"");
    assert!(leftovers(&h.root().join("a/b/c")).is_empty());
}

#[test]
fn aborted_or_corrupt_transfers_leave_nothing() {
    let h = Harness::new();
    let data = vec![7u8; 200_000];
    // Connection lost before the end marker.
    let r = write_with(&h, "f.bin", &data, 200_000, [0; 32], false, false);
    assert_eq!(r, None);
    assert!(!h.root().join("f.bin").exists());
    // Wrong digest.
    let r = write_with(&h, "f.bin", &data, 200_000, [0; 32], false, true).unwrap();
    assert_eq!(kind(&r), GuestErrorKind::Request);
    assert!(!h.root().join("f.bin").exists());
    // Wrong size.
    let digest = Sha256Digest::of(&data).0;
    let r = write_with(&h, "f.bin", &data, 199_999, digest, false, true).unwrap();
    assert_eq!(kind(&r), GuestErrorKind::Request);
    assert!(!h.root().join("f.bin").exists());
    // A failed overwrite keeps the old file intact.
    write(&h, "keep.txt", b"old", false).unwrap();
    let r = write_with(&h, "keep.txt", b"new", 3, [1; 32], false, true).unwrap();
    assert_eq!(kind(&r), GuestErrorKind::Request);
    assert_eq!(std::fs::read(h.root().join("keep.txt")).unwrap(), b"old");
    assert!(
        leftovers(&h.root()).is_empty(),
        "{:?}",
        leftovers(&h.root())
    );
}

#[test]
fn path_attacks_are_rejected() {
    let h = Harness::new();
    let root = h.root();
    symlink("/etc", root.join("etc_link")).unwrap();
    symlink("/etc/passwd", root.join("passwd_link")).unwrap();
    symlink("../..", root.join("up")).unwrap();
    std::fs::create_dir(root.join("inside")).unwrap();
    std::fs::write(root.join("inside/ok.txt"), b"fine").unwrap();
    symlink("inside/ok.txt", root.join("good_link")).unwrap();
    let long_component = "c".repeat(256);
    let long_path = vec!["d"; 2049].join("/");
    let attacks = [
        "/etc/passwd",
        "../outside",
        "a/../../outside",
        "a\0b",
        "a\nb",
        "a\x1bb",
        long_component.as_str(),
        long_path.as_str(),
        "etc_link/passwd",
        "passwd_link",
        "up/etc/passwd",
        "etc_link/../etc_link/hostname",
        "",
    ];
    for path in attacks {
        let (_, r) = read(&h, path);
        assert_eq!(kind(&r), GuestErrorKind::Path, "read {path:?}: {r:?}");
        let r = write(&h, path, b"x", false).unwrap();
        assert_eq!(kind(&r), GuestErrorKind::Path, "write {path:?}: {r:?}");
        if !path.is_empty() && path != "passwd_link" {
            let r = files::list_dir(h.engine.config(), path);
            assert_eq!(kind(&r), GuestErrorKind::Path, "list {path:?}: {r:?}");
        }
    }
    // Nothing was written outside the root.
    assert!(!h.dir.path().join("outside").exists());
    // Symlinks that stay inside the root are fine.
    assert_eq!(read(&h, "good_link").0, b"fine");
    assert_eq!(read(&h, "inside/../inside/ok.txt").0, b"fine");
    // Wrong types and missing files.
    let (_, r) = read(&h, "inside");
    assert_eq!(kind(&r), GuestErrorKind::Path);
    let (_, r) = read(&h, "missing");
    assert_eq!(kind(&r), GuestErrorKind::Path);
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let (_, r) = read(&h, "fifo");
    assert_eq!(kind(&r), GuestErrorKind::Path);
    let r = write(&h, "inside/ok.txt/sub", b"x", false).unwrap();
    assert_eq!(kind(&r), GuestErrorKind::Path);
}

#[test]
fn listing_is_sorted_and_sparse_aware() {
    let h = Harness::new();
    let root = h.root();
    std::fs::create_dir(root.join("dir")).unwrap();
    std::fs::write(root.join("b.txt"), b"hello").unwrap();
    let sparse = std::fs::File::create(root.join("a_sparse")).unwrap();
    sparse.set_len(1 << 30).unwrap();
    std::fs::write(root.join("dir/inner"), b"x").unwrap();
    let GuestMessage::DirListing { entries } = files::list_dir(h.engine.config(), "") else {
        panic!("no listing");
    };
    let visible: Vec<&DirEntry> = entries
        .iter()
        .filter(|e| !e.name.starts_with('.'))
        .collect();
    let names: Vec<&str> = visible.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a_sparse", "b.txt", "dir"]);
    assert!(visible[0].size < 1 << 20, "sparse size {}", visible[0].size);
    assert_eq!((visible[1].is_dir, visible[1].size), (false, 5));
    assert_eq!((visible[2].is_dir, visible[2].size), (true, 0));
    let GuestMessage::DirListing { entries } = files::list_dir(h.engine.config(), "dir/.") else {
        panic!("no listing");
    };
    assert_eq!(
        entries,
        vec![DirEntry {
            name: "inner".into(),
            is_dir: false,
            size: 1
        }]
    );
}
