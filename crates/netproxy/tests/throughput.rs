//! Measurements (ignored by default; run with
//! `cargo test -p netproxy --release --test throughput -- --ignored --nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netproxy::testing::FakeGuest;
use netproxy::{NetProxy, ProxyConfig, StaticResolver};
use sandbox_core::VmId;
use sandbox_core::ports::{NetworkAttachment, NetworkPolicy, NetworkProxy};
use sandbox_core::request::PortMapping;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly"]
async fn host_to_guest_forward_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = NetProxy::new(ProxyConfig::default());
    let policy = NetworkPolicy::PortsOnly {
        ports: vec![PortMapping::tcp(9000)],
    };
    let h = proxy.start(VmId::new(), &policy, dir.path()).await.unwrap();
    let NetworkAttachment::UnixStream { socket } = &h.attachment;
    let guest = FakeGuest::connect(socket).await.unwrap();
    let mut accepts = guest.tcp_listen(9000).await.unwrap();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Some(mut s) = accepts.recv().await {
            let done = done_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0usize;
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
                let _ = done.send(n).await;
            });
        }
    });
    let total: usize = 256 << 20;
    let chunk = vec![0x5au8; 1 << 20];
    let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, h.exposed_ports[0].external))
        .await
        .unwrap();
    let t = Instant::now();
    for _ in 0..(total / chunk.len()) {
        c.write_all(&chunk).await.unwrap();
    }
    c.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(120), done_rx.recv())
        .await
        .unwrap()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(got, total);
    println!(
        "host->guest forward: {} MiB in {secs:.2} s = {:.1} MB/s",
        total >> 20,
        total as f64 / secs / 1e6
    );
    proxy.stop(&h).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly"]
async fn dns_round_trip_through_the_stack() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ProxyConfig {
        resolver: Arc::new(StaticResolver::new().with("example.com", &[Ipv4Addr::LOCALHOST])),
        ..ProxyConfig::default()
    };
    let proxy = NetProxy::new(cfg);
    let policy = NetworkPolicy::Allowlist {
        domains: vec!["example.com".into()],
        ports: vec![],
    };
    let h = proxy.start(VmId::new(), &policy, dir.path()).await.unwrap();
    let NetworkAttachment::UnixStream { socket } = &h.attachment;
    let guest = FakeGuest::connect(socket).await.unwrap();
    guest.resolve("example.com").await.unwrap();
    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        let a = guest.resolve("example.com").await.unwrap();
        assert_eq!(a.rcode, 0);
    }
    println!(
        "dns cached answer, guest stack round trip through the socket: {:?} per query",
        t.elapsed() / n
    );
    proxy.stop(&h).await.unwrap();
}
