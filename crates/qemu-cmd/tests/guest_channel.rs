//! The guest channel against a fake agent speaking guest-proto on a unix socket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use guest_proto::{
    ExecRequest, Frame, GuestCodec, GuestErrorKind, GuestMessage, HostMessage, Language, OpId,
    PROTOCOL_VERSION,
};
use qemu_cmd::SerialGuestChannel;
use sandbox_core::ErrorKind;
use sandbox_core::ports::GuestChannel;
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::Framed;

fn me() -> u32 {
    nix::unistd::Uid::effective().as_raw()
}

fn pong() -> GuestMessage {
    GuestMessage::Pong {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "0.1.0-test".into(),
        boot_ms: Some(1234),
        setup_us: Some(2500),
        crng_reseeds: Some(1),
    }
}

fn exec(code: &str) -> HostMessage {
    HostMessage::Exec(ExecRequest {
        language: Language::Python,
        code: code.into(),
        timeout_secs: 10,
        env: vec![],
    })
}

struct Agent {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    listener: UnixListener,
}

impl Agent {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        Self {
            _dir: dir,
            sock,
            listener,
        }
    }

    async fn accept(&self) -> Framed<UnixStream, GuestCodec> {
        let (s, _) = self.listener.accept().await.unwrap();
        Framed::new(s, GuestCodec::new())
    }
}

/// Answers the first Ping after `ignore` pings were "lost"; returns the pings seen.
async fn handshake(io: &mut Framed<UnixStream, GuestCodec>, ignore: usize) -> Vec<OpId> {
    let mut seen = Vec::new();
    loop {
        let Frame { op_id, msg } = io.next().await.unwrap().unwrap();
        assert!(
            matches!(msg, HostMessage::Ping { protocol_version } if protocol_version == PROTOCOL_VERSION)
        );
        seen.push(op_id);
        if seen.len() > ignore {
            io.send(Frame::new(op_id, pong())).await.unwrap();
            return seen;
        }
    }
}

#[tokio::test]
async fn handshake_reports_agent_info() {
    let agent = Agent::new();
    let chan = SerialGuestChannel::new(me());
    let (client, server) = tokio::join!(chan.connect(&agent.sock, Duration::from_secs(5)), async {
        let mut io = agent.accept().await;
        handshake(&mut io, 0).await;
        io
    });
    let (conn, info) = client.unwrap();
    assert_eq!(info.protocol_version, PROTOCOL_VERSION);
    assert_eq!(info.agent_version, "0.1.0-test");
    assert_eq!(info.boot_ms, Some(1234));
    assert!(conn.is_alive());
    conn.close().await;
    assert!(!conn.is_alive());
    drop(server);
}

#[tokio::test]
async fn wrong_peer_uid_is_refused_before_any_byte_is_sent() {
    let agent = Agent::new();
    let chan = SerialGuestChannel::new(me() + 777);
    let (client, received) =
        tokio::join!(chan.connect(&agent.sock, Duration::from_secs(5)), async {
            let (mut s, _) = agent.listener.accept().await.unwrap();
            let mut buf = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
                .await
                .unwrap()
                .unwrap();
            buf
        });
    let Err(err) = client else {
        panic!("connected to a peer with the wrong uid")
    };
    assert!(received.is_empty(), "{} bytes sent", received.len());
    let msg = err.message().to_owned();
    assert!(msg.contains(&format!("uid {}", me())), "{msg}");
    assert!(msg.contains(&format!("uid {}", me() + 777)), "{msg}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn pings_are_retried_until_a_pong_and_late_pongs_are_dropped() {
    let agent = Agent::new();
    let chan = SerialGuestChannel::new(me()).with_ping_interval(Duration::from_millis(20));
    let (client, mut io) = tokio::join!(chan.connect(&agent.sock, Duration::from_secs(5)), async {
        // The socket is created a moment after the host starts connecting.
        let mut io = agent.accept().await;
        let seen = handshake(&mut io, 3).await;
        assert_eq!(seen.len(), 4);
        let mut unique = seen.clone();
        unique.dedup();
        assert_eq!(unique.len(), 4, "each ping has its own op id");
        // Late answers to the lost pings: must not confuse anything.
        for op in &seen[..3] {
            io.send(Frame::new(*op, pong())).await.unwrap();
        }
        io
    });
    let (conn, _) = client.unwrap();
    let mut op = conn.request(exec("print(1)")).await.unwrap();
    // Skip pings still in flight from the handshake.
    let req = loop {
        let f = io.next().await.unwrap().unwrap();
        if !matches!(f.msg, HostMessage::Ping { .. }) {
            break f;
        }
    };
    assert_eq!(req.op_id, op.op_id);
    io.send(Frame::new(
        op.op_id,
        GuestMessage::Stdout(Bytes::from_static(b"1\n")),
    ))
    .await
    .unwrap();
    io.send(Frame::new(
        op.op_id,
        GuestMessage::ExecDone {
            exit_code: 0,
            execution_ms: 3,
            spawn_ms: None,
        },
    ))
    .await
    .unwrap();
    assert_eq!(
        op.recv().await,
        Some(GuestMessage::Stdout(Bytes::from_static(b"1\n")))
    );
    assert!(matches!(
        op.recv().await,
        Some(GuestMessage::ExecDone { exit_code: 0, .. })
    ));
    // The operation is finished: its stream ends.
    assert_eq!(op.recv().await, None);
    assert!(conn.is_alive());
}

#[tokio::test]
async fn connect_waits_for_the_socket_to_appear() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("late.sock");
    let p2 = path.clone();
    let server = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let l = UnixListener::bind(&p2).unwrap();
        let (s, _) = l.accept().await.unwrap();
        let mut io = Framed::new(s, GuestCodec::new());
        handshake(&mut io, 0).await;
        io
    });
    let (conn, _) = SerialGuestChannel::new(me())
        .connect(&path, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(conn.is_alive());
    drop(server.await.unwrap());
}

#[tokio::test]
async fn interleaved_operations_are_routed_by_op_id() {
    let agent = Agent::new();
    let chan = SerialGuestChannel::new(me());
    let (client, mut io) = tokio::join!(chan.connect(&agent.sock, Duration::from_secs(5)), async {
        let mut io = agent.accept().await;
        handshake(&mut io, 0).await;
        io
    });
    let (conn, _) = client.unwrap();
    let mut a = conn.request(exec("a")).await.unwrap();
    let mut b = conn.request(exec("b")).await.unwrap();
    assert_ne!(a.op_id, b.op_id);
    let ra = io.next().await.unwrap().unwrap();
    let rb = io.next().await.unwrap().unwrap();
    assert_eq!((ra.op_id, rb.op_id), (a.op_id, b.op_id));
    let out = |s: &'static str| GuestMessage::Stdout(Bytes::from_static(s.as_bytes()));
    let done = |code| GuestMessage::ExecDone {
        exit_code: code,
        execution_ms: 1,
        spawn_ms: None,
    };
    for f in [
        Frame::new(b.op_id, out("b1")),
        Frame::new(a.op_id, out("a1")),
        Frame::new(OpId(9999), out("nobody")),
        Frame::new(b.op_id, out("b2")),
        Frame::new(a.op_id, done(1)),
        Frame::new(b.op_id, done(2)),
    ] {
        io.send(f).await.unwrap();
    }
    assert_eq!(a.recv().await, Some(out("a1")));
    assert_eq!(a.recv().await, Some(done(1)));
    assert_eq!(a.recv().await, None);
    assert_eq!(b.recv().await, Some(out("b1")));
    assert_eq!(b.recv().await, Some(out("b2")));
    assert_eq!(b.recv().await, Some(done(2)));
    assert_eq!(b.recv().await, None);

    // A follow-up frame of an existing operation goes out with its op id.
    let mut w = conn
        .request(HostMessage::WriteFile {
            path: "x".into(),
            executable: false,
        })
        .await
        .unwrap();
    conn.send(
        w.op_id,
        HostMessage::WriteChunk(Bytes::from_static(b"data")),
    )
    .await
    .unwrap();
    let h = io.next().await.unwrap().unwrap();
    let c = io.next().await.unwrap().unwrap();
    assert_eq!((h.op_id, c.op_id), (w.op_id, w.op_id));
    assert_eq!(c.msg, HostMessage::WriteChunk(Bytes::from_static(b"data")));
    drop(io);
    assert_eq!(w.recv().await, None);
}

#[tokio::test]
async fn transport_loss_closes_every_stream() {
    let agent = Agent::new();
    let chan = SerialGuestChannel::new(me());
    let (client, mut io) = tokio::join!(chan.connect(&agent.sock, Duration::from_secs(5)), async {
        let mut io = agent.accept().await;
        handshake(&mut io, 0).await;
        io
    });
    let (conn, _) = client.unwrap();
    let mut a = conn.request(exec("a")).await.unwrap();
    let mut b = conn.request(exec("b")).await.unwrap();
    io.next().await.unwrap().unwrap();
    io.next().await.unwrap().unwrap();
    io.send(Frame::new(
        a.op_id,
        GuestMessage::Stdout(Bytes::from_static(b"partial")),
    ))
    .await
    .unwrap();
    drop(io); // The VM died.
    // Buffered output first, then the end.
    assert_eq!(
        a.recv().await,
        Some(GuestMessage::Stdout(Bytes::from_static(b"partial")))
    );
    assert_eq!(a.recv().await, None);
    assert_eq!(b.recv().await, None);
    assert!(!conn.is_alive());
    let err = conn.request(exec("c")).await.unwrap_err();
    assert!(err.is_retryable(), "{err}: nothing was sent");
}

#[tokio::test]
async fn protocol_version_mismatch_is_permanent() {
    // In the Pong.
    let agent = Agent::new();
    let chan = SerialGuestChannel::new(me());
    let (client, _io) = tokio::join!(chan.connect(&agent.sock, Duration::from_secs(5)), async {
        let mut io = agent.accept().await;
        let f = io.next().await.unwrap().unwrap();
        io.send(Frame::new(
            f.op_id,
            GuestMessage::Pong {
                protocol_version: PROTOCOL_VERSION + 1,
                agent_version: "9".into(),
                boot_ms: None,
                setup_us: None,
                crng_reseeds: None,
            },
        ))
        .await
        .unwrap();
        io
    });
    let Err(err) = client else {
        panic!("accepted a mismatched agent")
    };
    assert_eq!(
        err.kind(),
        ErrorKind::Permanent(sandbox_core::PermanentCause::Config)
    );

    // In the frame header itself.
    let agent = Agent::new();
    let (client, _s) = tokio::join!(chan.connect(&agent.sock, Duration::from_secs(5)), async {
        let mut io = agent.accept().await;
        let f = io.next().await.unwrap().unwrap();
        let mut wire = BytesMut::new();
        guest_proto::encode_frame(&Frame::new(f.op_id, pong()), &mut wire).unwrap();
        wire[4] = PROTOCOL_VERSION + 1; // version byte
        let mut s = io.into_inner();
        tokio::io::AsyncWriteExt::write_all(&mut s, &wire)
            .await
            .unwrap();
        s
    });
    let Err(err) = client else {
        panic!("accepted a mismatched frame")
    };
    assert!(err.message().contains("protocol version"), "{err}");
    assert!(!err.is_retryable());

    // An Error{Protocol} answer to the ping.
    let agent = Agent::new();
    let (client, _io) = tokio::join!(chan.connect(&agent.sock, Duration::from_secs(5)), async {
        let mut io = agent.accept().await;
        let f = io.next().await.unwrap().unwrap();
        io.send(Frame::new(
            f.op_id,
            GuestMessage::Error {
                kind: GuestErrorKind::Protocol,
                message: "host speaks 1, guest speaks 2".into(),
            },
        ))
        .await
        .unwrap();
        io
    });
    let Err(err) = client else {
        panic!("accepted a refusing agent")
    };
    assert!(!err.is_retryable());
    assert!(err.message().contains("guest speaks 2"), "{err}");
}

#[tokio::test]
async fn silent_agent_is_a_boot_timeout() {
    let agent = Agent::new();
    let chan = SerialGuestChannel::new(me());
    let started = std::time::Instant::now();
    let (client, _io) = tokio::join!(
        chan.connect(&agent.sock, Duration::from_millis(400)),
        agent.accept()
    );
    let Err(err) = client else {
        panic!("connected to a silent agent")
    };
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        err.kind(),
        ErrorKind::Transient(sandbox_core::TransientCause::BootTimeout)
    );

    // And with no socket at all.
    let err = match chan
        .connect(
            Path::new("/nonexistent/agent.sock"),
            Duration::from_millis(200),
        )
        .await
    {
        Err(e) => e,
        Ok(_) => panic!("connected to nothing"),
    };
    assert!(err.is_retryable());
}
