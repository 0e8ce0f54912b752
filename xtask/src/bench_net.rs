//! The network part of `cargo xtask bench`: what networking costs a boot, forwarded-port
//! throughput in both directions beside the guest's own loopback, and DNS answers at the
//! proxy.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use netproxy::testing::FakeGuest;
use netproxy::{NetProxy, ProxyConfig, StaticResolver};
use sandbox_core::ports::{NetworkAttachment, NetworkPolicy, NetworkProxy};
use sandbox_core::request::PortMapping;
use sandbox_core::{
    ExecRequest, Language, OutputCallbacks, RunOptions, RunRequest, SessionRequest, VmId,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::smoke::percentile;

/// MiB moved per direction through the forwarded port (and over the guest's loopback).
const FORWARD_MIB: usize = 64;
/// The guest port the forward reaches.
const GUEST_PORT: u16 = 8000;

/// Guest side of the forward measurement: receives one upload (replies with the byte
/// count), then serves one download, then measures the same transfer over its own
/// loopback between two processes (the baseline: what the guest can move at all).
const GUEST_CODE: &str = r#"
import socket, subprocess, sys, time
N = MIB << 20
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", PORT))
srv.listen(4)
print("listening", flush=True)
buf = bytearray(1 << 20)
c, _ = srv.accept()
n = 0
while True:
    k = c.recv_into(buf)
    if not k:
        break
    n += k
c.sendall(str(n).encode())
c.close()
c, _ = srv.accept()
chunk = b"x" * (1 << 20)
for _ in range(MIB):
    c.sendall(chunk)
c.close()
srv.close()
sink = subprocess.Popen([sys.executable, "-c", """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8001)); s.listen(1); print("up", flush=True)
c, _ = s.accept(); buf = bytearray(1 << 20)
while c.recv_into(buf): pass
"""], stdout=subprocess.PIPE)
sink.stdout.readline()
s = socket.create_connection(("127.0.0.1", 8001))
t = time.perf_counter()
for _ in range(MIB):
    s.sendall(chunk)
s.close()
sink.wait()
print("loopback_s", time.perf_counter() - t, flush=True)
"#;

fn mb_s(bytes: usize, secs: f64) -> f64 {
    (bytes as f64 / secs / 1e6 * 10.0).round() / 10.0
}

/// Cold raw runs with ports-only networking beside the same runs without a network (no
/// NIC, no proxy): what networking costs a boot.
async fn boot_cost(sbx: &sbx::Sbx, runs: usize) -> Result<Value> {
    let mut off = Vec::new();
    let mut on = Vec::new();
    for _ in 0..runs {
        for networked in [false, true] {
            let mut req = RunRequest::new(Language::Raw, "echo ok");
            if networked {
                req.network.expose_ports = vec![PortMapping::tcp(GUEST_PORT)];
            }
            let t = Instant::now();
            let r = sbx
                .scheduler()
                .run(req, RunOptions::default())
                .await
                .map_err(|e| anyhow::anyhow!("cold raw (network {networked}): {e}"))?;
            anyhow::ensure!(r.stdout == "ok\n", "unexpected output {:?}", r.stdout);
            let ms = t.elapsed().as_millis() as u64;
            if networked { on.push(ms) } else { off.push(ms) }
        }
    }
    let (p_off, p_on) = (percentile(&off, 50.0), percentile(&on, 50.0));
    Ok(json!({
        "cold_raw_network_off_ms": crate::bench::stats(&off),
        "cold_raw_ports_only_ms": crate::bench::stats(&on),
        "ratio_p50_on_to_off": crate::bench::ratio(p_on, p_off),
    }))
}

/// Forwarded-port throughput, host→guest and guest→host, beside the guest's loopback.
async fn forward_throughput(sbx: &sbx::Sbx) -> Result<Value> {
    let mut sreq = SessionRequest::new(Language::Python);
    sreq.network.expose_ports = vec![PortMapping::tcp(GUEST_PORT)];
    let session = Arc::new(
        sbx.scheduler()
            .session(sreq, RunOptions::default())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let external = session
        .exposed_ports()
        .first()
        .context("no exposed port")?
        .external;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let ready_tx = std::sync::Mutex::new(Some(ready_tx));
    let callbacks = OutputCallbacks {
        on_stdout: Some(Arc::new(move |chunk: &[u8]| {
            if chunk.windows(9).any(|w| w == b"listening")
                && let Some(tx) = ready_tx.lock().ok().and_then(|mut t| t.take())
            {
                let _ = tx.send(());
            }
        })),
        on_stderr: None,
    };
    let code = GUEST_CODE
        .replace("MIB", &FORWARD_MIB.to_string())
        .replace("PORT", &GUEST_PORT.to_string());
    let guest = {
        let session = session.clone();
        tokio::spawn(async move {
            let mut req = ExecRequest::new(code);
            req.timeout_secs = 300;
            session.exec(req, &callbacks).await
        })
    };
    tokio::time::timeout(Duration::from_secs(60), ready_rx)
        .await
        .context("the guest server did not start")?
        .context("the guest exec ended before listening")?;
    let total = FORWARD_MIB << 20;
    // Host → guest.
    let chunk = vec![0x5au8; 1 << 20];
    let mut c = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, external)).await?;
    let t = Instant::now();
    for _ in 0..FORWARD_MIB {
        c.write_all(&chunk).await?;
    }
    c.shutdown().await?;
    let mut ack = String::new();
    c.read_to_string(&mut ack).await?;
    let up = t.elapsed().as_secs_f64();
    anyhow::ensure!(ack == total.to_string(), "guest counted {ack:?} bytes");
    // Guest → host.
    let mut c = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, external)).await?;
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    loop {
        let n = c.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let down = t.elapsed().as_secs_f64();
    anyhow::ensure!(got == total, "received {got} bytes");
    let r = guest
        .await
        .context("join")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(r.exit_code == 0, "guest: {}", r.stderr);
    let lo: f64 = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("loopback_s "))
        .and_then(|v| v.trim().parse().ok())
        .context("no loopback figure from the guest")?;
    session.close().await;
    let (up, down, lo) = (mb_s(total, up), mb_s(total, down), mb_s(total, lo));
    Ok(json!({
        "mib": FORWARD_MIB,
        "host_to_guest_mb_s": up,
        "guest_to_host_mb_s": down,
        "baseline_guest_loopback_mb_s": lo,
        "ratio_host_to_guest": ((up / lo) * 100.0).round() / 100.0,
        "ratio_guest_to_host": ((down / lo) * 100.0).round() / 100.0,
    }))
}

/// DNS answers for a cached allowed name at the proxy, through its smoltcp stack and
/// socket, from an in-process fake guest (no VM: the guest's own resolver is not timed).
async fn dns_at_proxy(queries: usize) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let cfg = ProxyConfig {
        resolver: Arc::new(
            StaticResolver::new().with("bench.test", &[Ipv4Addr::new(198, 18, 0, 1)]),
        ),
        // A benchmarking address: answered only in a range the operator allowed.
        allowed_ranges: vec![netproxy::Ipv4Range::new(Ipv4Addr::new(198, 18, 0, 0), 15)],
        ..ProxyConfig::default()
    };
    let proxy = NetProxy::new(cfg);
    let policy = NetworkPolicy::Allowlist {
        domains: vec!["bench.test".into()],
        ports: vec![],
    };
    let h = proxy
        .start(VmId::new(), &policy, dir.path())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let NetworkAttachment::UnixStream { socket } = &h.attachment;
    let guest = FakeGuest::connect(socket).await?;
    let t = Instant::now();
    guest.resolve("bench.test").await?;
    let first_us = t.elapsed().as_micros() as u64;
    let mut us = Vec::with_capacity(queries);
    for _ in 0..queries {
        let t = Instant::now();
        let a = guest.resolve("bench.test").await?;
        us.push(t.elapsed().as_micros() as u64);
        anyhow::ensure!(a.rcode == 0, "rcode {}", a.rcode);
    }
    proxy.stop(&h).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(json!({
        "cached_answer_us": crate::bench::stats(&us),
        "first_answer_us": first_us,
    }))
}

/// The whole network section.
pub async fn run(cfg: &sbx::SbxConfig, boot_runs: usize) -> Result<Value> {
    let sbx = sbx::Sbx::start(cfg.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let boot = boot_cost(&sbx, boot_runs).await;
    let forward = match boot {
        Ok(_) => forward_throughput(&sbx).await,
        Err(_) => Ok(Value::Null),
    };
    sbx.stop().await;
    Ok(json!({
        "boot_cost": boot?,
        "forwarded_port": forward?,
        "dns_at_proxy": dns_at_proxy(500).await?,
    }))
}
