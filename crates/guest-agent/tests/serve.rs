//! End-to-end tests through `guest-agent serve --listen <socket>` in a child process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::test_user;
use futures::{SinkExt, StreamExt};
use guest_proto::{
    ExecRequest, Frame, GuestErrorKind, GuestMessage, HostCodec, HostMessage, Language, OpId,
    PROTOCOL_VERSION, Sha256Hasher,
};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let socket = dir.path().join("agent.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_guest-agent"));
        cmd.arg("serve")
            .arg("--listen")
            .arg(&socket)
            .arg("--root")
            .arg(dir.path().join("home"))
            .args(["--grace-ms", "1000"]);
        if let Some(user) = test_user() {
            cmd.args([
                "--uid",
                &user.uid.to_string(),
                "--gid",
                &user.gid.to_string(),
            ]);
        }
        let child = cmd.spawn().unwrap();
        Agent {
            child,
            socket,
            _dir: dir,
        }
    }

    async fn connect(&self) -> Client {
        let start = Instant::now();
        loop {
            if let Ok(stream) = UnixStream::connect(&self.socket).await {
                return Client {
                    framed: Framed::new(stream, HostCodec::new()),
                };
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "agent did not listen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn vm_hwm_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap()
    }

    fn root(&self) -> PathBuf {
        self._dir.path().join("home")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Client {
    framed: Framed<UnixStream, HostCodec>,
}

impl Client {
    async fn send(&mut self, op: u64, msg: HostMessage) {
        self.framed.send(Frame::new(OpId(op), msg)).await.unwrap();
    }

    async fn recv(&mut self) -> Frame<GuestMessage> {
        tokio::time::timeout(Duration::from_secs(30), self.framed.next())
            .await
            .expect("no reply within 30 s")
            .expect("connection closed")
            .unwrap()
    }

    /// Receives until the terminal message of `op`, returning (stdout, terminal).
    async fn until_done(&mut self, op: u64) -> (Vec<u8>, GuestMessage) {
        let mut out = Vec::new();
        loop {
            let frame = self.recv().await;
            if frame.op_id != OpId(op) {
                continue;
            }
            match frame.msg {
                GuestMessage::Stdout(b) | GuestMessage::FileChunk(b) => out.extend_from_slice(&b),
                GuestMessage::Stderr(_) => {}
                other => return (out, other),
            }
        }
    }
}

fn exec(code: &str) -> HostMessage {
    HostMessage::Exec(ExecRequest {
        language: Language::Python,
        code: code.into(),
        timeout_secs: 30,
        env: vec![],
    })
}

#[tokio::test]
async fn ping_exec_and_reconnect_keep_state() {
    let agent = Agent::start();
    let mut c = agent.connect().await;
    c.send(
        1,
        HostMessage::Ping {
            protocol_version: PROTOCOL_VERSION,
        },
    )
    .await;
    let frame = c.recv().await;
    assert_eq!(frame.op_id, OpId(1));
    assert!(matches!(
        frame.msg,
        GuestMessage::Pong {
            protocol_version: PROTOCOL_VERSION,
            ..
        }
    ));
    c.send(
        2,
        HostMessage::Ping {
            protocol_version: 99,
        },
    )
    .await;
    assert!(matches!(
        c.recv().await.msg,
        GuestMessage::Error {
            kind: GuestErrorKind::Protocol,
            ..
        }
    ));
    c.send(3, exec("state = 41\nprint('hi')")).await;
    let (out, done) = c.until_done(3).await;
    assert_eq!(out, b"hi\n");
    assert!(
        matches!(done, GuestMessage::ExecDone { exit_code: 0, .. }),
        "{done:?}"
    );
    drop(c);
    // A new connection finds the same REPL.
    let mut c = agent.connect().await;
    c.send(4, exec("print(state + 1)")).await;
    let (out, _) = c.until_done(4).await;
    assert_eq!(out, b"42\n");
    // Unknown write chunk: one request error, then silence.
    c.send(5, HostMessage::WriteChunk(Bytes::from_static(b"x")))
        .await;
    c.send(5, HostMessage::WriteChunk(Bytes::from_static(b"x")))
        .await;
    c.send(
        6,
        HostMessage::Ping {
            protocol_version: PROTOCOL_VERSION,
        },
    )
    .await;
    let first = c.recv().await;
    assert_eq!(first.op_id, OpId(5));
    assert!(matches!(
        first.msg,
        GuestMessage::Error {
            kind: GuestErrorKind::Request,
            ..
        }
    ));
    assert_eq!(c.recv().await.op_id, OpId(6));
    c.send(7, HostMessage::Shutdown).await;
    assert_eq!(c.recv().await.msg, GuestMessage::ShuttingDown);
}

#[tokio::test]
async fn file_ops_interleave_with_exec_and_cancel_works() {
    let agent = Agent::start();
    let mut c = agent.connect().await;
    c.send(1, exec("import time\ntime.sleep(1.5)\nprint('slept')"))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.send(
        2,
        HostMessage::ListDir {
            path: String::new(),
        },
    )
    .await;
    let started = Instant::now();
    let first = c.recv().await;
    assert_eq!(
        first.op_id,
        OpId(2),
        "listing should not wait for the exec: {first:?}"
    );
    assert!(matches!(first.msg, GuestMessage::DirListing { .. }));
    assert!(started.elapsed() < Duration::from_millis(1000));
    let (out, done) = c.until_done(1).await;
    assert_eq!(out, b"slept\n");
    assert!(matches!(done, GuestMessage::ExecDone { exit_code: 0, .. }));

    c.send(3, exec("import time\ntime.sleep(60)")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    c.send(3, HostMessage::Cancel).await;
    let (_, done) = c.until_done(3).await;
    assert!(
        matches!(done, GuestMessage::ExecDone { exit_code: -1, .. }),
        "{done:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

async fn write_stream(c: &mut Client, op: u64, path: &str, total: usize) -> [u8; 32] {
    c.send(
        op,
        HostMessage::WriteFile {
            path: path.into(),
            executable: false,
        },
    )
    .await;
    let block: Vec<u8> = (0..64 * 1024).map(|i| (i % 253) as u8).collect();
    let block = Bytes::from(block);
    let mut hasher = Sha256Hasher::new();
    let mut sent = 0;
    while sent < total {
        let n = block.len().min(total - sent);
        let chunk = block.slice(..n);
        hasher.update(&chunk);
        c.framed
            .feed(Frame::new(OpId(op), HostMessage::WriteChunk(chunk)))
            .await
            .unwrap();
        sent += n;
    }
    let (size, digest) = hasher.finish();
    c.send(
        op,
        HostMessage::WriteEnd {
            size,
            sha256: digest.0,
        },
    )
    .await;
    digest.0
}

#[tokio::test]
async fn large_transfer_keeps_memory_flat() {
    const TOTAL: usize = 200 * 1024 * 1024;
    let agent = Agent::start();
    let mut c = agent.connect().await;
    let started = Instant::now();
    let digest = write_stream(&mut c, 1, "big/file.bin", TOTAL).await;
    let (_, done) = c.until_done(1).await;
    assert_eq!(
        done,
        GuestMessage::FileWritten {
            size: TOTAL as u64,
            sha256: digest
        }
    );
    let wrote = started.elapsed();
    assert_eq!(
        std::fs::metadata(agent.root().join("big/file.bin"))
            .unwrap()
            .len(),
        TOTAL as u64
    );
    let started = Instant::now();
    c.send(
        2,
        HostMessage::ReadFile {
            path: "big/file.bin".into(),
        },
    )
    .await;
    let mut hasher = Sha256Hasher::new();
    let done = loop {
        let frame = c.recv().await;
        match frame.msg {
            GuestMessage::FileChunk(b) => hasher.update(&b),
            other => break other,
        }
    };
    let (size, got) = hasher.finish();
    assert_eq!(size, TOTAL as u64);
    assert_eq!(
        done,
        GuestMessage::FileRead {
            size,
            sha256: got.0
        }
    );
    assert_eq!(got.0, digest);
    let hwm = agent.vm_hwm_kib();
    println!(
        "200 MiB: write {wrote:?}, read {:?}, agent VmHWM {hwm} KiB",
        started.elapsed()
    );
    assert!(hwm < 64 * 1024, "agent peak RSS {hwm} KiB");
}

#[tokio::test]
async fn aborted_write_over_the_wire_leaves_no_file() {
    let agent = Agent::start();
    let mut c = agent.connect().await;
    c.send(
        1,
        HostMessage::WriteFile {
            path: "partial.bin".into(),
            executable: false,
        },
    )
    .await;
    c.send(1, HostMessage::WriteChunk(Bytes::from(vec![1u8; 100_000])))
        .await;
    c.send(1, HostMessage::Cancel).await;
    let done = c.recv().await;
    assert!(matches!(
        done.msg,
        GuestMessage::Error {
            kind: GuestErrorKind::Request,
            ..
        }
    ));
    // A transfer cut by a lost connection leaves nothing either.
    c.send(
        2,
        HostMessage::WriteFile {
            path: "cut.bin".into(),
            executable: false,
        },
    )
    .await;
    c.send(2, HostMessage::WriteChunk(Bytes::from(vec![1u8; 100_000])))
        .await;
    drop(c);
    let mut c = agent.connect().await;
    c.send(
        3,
        HostMessage::Ping {
            protocol_version: PROTOCOL_VERSION,
        },
    )
    .await;
    c.recv().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let names: Vec<String> = std::fs::read_dir(agent.root())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".local"))
        .collect();
    assert!(names.is_empty(), "left behind: {names:?}");
    assert!(!Path::new(&agent.root().join("partial.bin")).exists());
}

#[tokio::test]
async fn resume_over_the_wire() {
    let agent = Agent::start();
    let mut c = agent.connect().await;
    c.send(
        1,
        exec("import random; random.seed(5); print(random.random())"),
    )
    .await;
    let (seeded, _) = c.until_done(1).await;
    c.send(2, exec("random.seed(5)")).await;
    c.until_done(2).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    c.send(
        3,
        HostMessage::Resume {
            unix_time_ns: now,
            entropy: Bytes::from(vec![9u8; 64]),
        },
    )
    .await;
    let (_, done) = c.until_done(3).await;
    assert!(
        matches!(done, GuestMessage::Resumed { reseeded: 1, .. }),
        "{done:?}"
    );
    c.send(4, exec("print(random.random())")).await;
    let (after, _) = c.until_done(4).await;
    assert_ne!(after, seeded);
}

/// A listing too large for one frame (ordinary user code can create the directory) is an
/// error for that call; the connection keeps working.
#[tokio::test]
async fn oversized_listing_is_an_error_and_the_connection_survives() {
    let agent = Agent::start();
    let mut c = agent.connect().await;
    let dir = agent.root().join("many");
    std::fs::create_dir_all(&dir).unwrap();
    // 40,000 names of 240 bytes: about 11 MB of listing, over the 8 MiB frame limit.
    for i in 0..40_000 {
        let name = format!("{i:06}{}", "x".repeat(234));
        std::fs::File::create(dir.join(name)).unwrap();
    }
    c.send(
        1,
        HostMessage::ListDir {
            path: "many".into(),
        },
    )
    .await;
    let (_, reply) = c.until_done(1).await;
    match reply {
        GuestMessage::Error { kind, message } => {
            assert_eq!(kind, GuestErrorKind::Request, "{message}");
            assert!(message.contains("frame limit"), "{message}");
        }
        other => panic!("expected an error, got {}", other.name()),
    }
    // Same connection: a small listing and a ping still work.
    c.send(2, HostMessage::ListDir { path: "".into() }).await;
    let (_, reply) = c.until_done(2).await;
    assert!(
        matches!(reply, GuestMessage::DirListing { .. }),
        "{}",
        reply.name()
    );
    c.send(
        3,
        HostMessage::Ping {
            protocol_version: guest_proto::PROTOCOL_VERSION,
        },
    )
    .await;
    let (_, reply) = c.until_done(3).await;
    assert!(
        matches!(reply, GuestMessage::Pong { .. }),
        "{}",
        reply.name()
    );
}
