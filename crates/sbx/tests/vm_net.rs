//! Guest networking end to end over real microVMs (TCG here): no network, ports only,
//! allowlist.
//!
//! They need QEMU and the guest assets, so they are `#[ignore]`d in `cargo test`; run them
//! with `cargo test -p sbx --test vm_net -- --ignored --test-threads 1`. Upstream servers
//! are made by the tests themselves on the host's loopback, never elsewhere.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netproxy::sni::{SniOutcome, parse_client_hello};
use netproxy::{ProxyConfig, StaticResolver};
use sandbox_core::request::PortMapping;
use sandbox_core::{
    ExecRequest, ExecutionResult, Language, OutputCallbacks, RunOptions, RunRequest, Session,
    SessionRequest,
};
use sbx::{Sbx, SbxConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

fn config(network: Option<ProxyConfig>) -> SbxConfig {
    let mut cfg = SbxConfig::from_env();
    cfg.warm_pool_size = 0;
    cfg.scheduler.warm_pool_size = 0;
    cfg.network = network;
    let assets = sandbox_core::GuestAssets::in_dir(&cfg.assets_dir);
    if let Err(e) = assets.check(Language::Python) {
        panic!("VM tests opted in but assets are missing ({e}); run `cargo xtask assets`");
    }
    cfg
}

async fn sbx(network: Option<ProxyConfig>) -> Sbx {
    Sbx::start(config(network)).await.expect("sbx starts")
}

/// A proxy configuration for tests: `names` resolve to 127.0.0.1 on the host, loopback
/// upstreams are allowed, and TLS is accepted on `tls_port`.
fn test_proxy(names: &[&str], tls_port: u16) -> ProxyConfig {
    let mut resolver = StaticResolver::new();
    for n in names {
        resolver.insert(n, &[Ipv4Addr::LOCALHOST]);
    }
    ProxyConfig {
        resolver: Arc::new(resolver),
        allow_loopback_upstreams: true,
        tls_ports: vec![443, tls_port],
        connect_timeout: Duration::from_secs(3),
        sni_timeout: Duration::from_secs(3),
        ..ProxyConfig::default()
    }
}

/// The guest-visible stand-in for upstreams on the host's loopback (a benchmarking
/// address, routed via the gateway like any other).
const STAND_IN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// Like [`test_proxy`], but `names` resolve to [`STAND_IN`] in the guest, which the proxy
/// connects to 127.0.0.1 on the host (`upstream_aliases`): the guest can reach the test's
/// loopback upstream while every policy check runs on the address it was given.
fn aliased_test_proxy(names: &[&str], tls_port: u16) -> ProxyConfig {
    let mut resolver = StaticResolver::new();
    for n in names {
        resolver.insert(n, &[STAND_IN]);
    }
    ProxyConfig {
        resolver: Arc::new(resolver),
        upstream_aliases: [(STAND_IN, Ipv4Addr::LOCALHOST)].into_iter().collect(),
        ..test_proxy(&[], tls_port)
    }
}

async fn run_py(sbx: &Sbx, code: &str, net: impl FnOnce(&mut RunRequest)) -> ExecutionResult {
    let mut req = RunRequest::new(Language::Python, code);
    req.timeout_secs = 60;
    net(&mut req);
    let r = sbx
        .scheduler()
        .run(req, RunOptions::default())
        .await
        .unwrap_or_else(|e| panic!("run {code:?}: {e}"));
    assert_eq!(
        r.exit_code, 0,
        "stdout:\n{}\nstderr:\n{}",
        r.stdout, r.stderr
    );
    r
}

async fn exec(s: &Session, code: &str) -> ExecutionResult {
    let mut req = ExecRequest::new(code);
    req.timeout_secs = 60;
    let r = s
        .exec(req, &OutputCallbacks::default())
        .await
        .unwrap_or_else(|e| panic!("exec {code:?}: {e}"));
    assert_eq!(
        r.exit_code, 0,
        "stdout:\n{}\nstderr:\n{}",
        r.stdout, r.stderr
    );
    r
}

fn assert_lines(out: &str, want: &[&str]) {
    for w in want {
        assert!(
            out.lines().any(|l| l == *w),
            "missing line {w:?} in:\n{out}"
        );
    }
}

/// Python helpers the guest code below uses: `probe_connect(host, port)` prints
/// `connect HOST:PORT ok` or `connect HOST:PORT fail <ErrorClass>`; `probe_dns(name)` prints
/// `dns NAME ADDR` or `dns NAME fail`.
/// (The guest kernel has IPv6 with SIT built in, so a down `sit0` always exists; the
/// listings below leave it out.)
const PY_PROBES: &str = r#"
import os, socket, time
socket.setdefaulttimeout(3)

def probe_connect(host, port):
    try:
        s = socket.create_connection((host, port), timeout=3)
        try:
            # The gateway may complete the handshake before deciding; a refusal then
            # arrives as a reset or EOF on the first exchange.
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            data = s.recv(1)
        finally:
            s.close()
        print(f"connect {host}:{port} " + ("ok" if data else "fail EOF"))
    except OSError as e:
        print(f"connect {host}:{port} fail {type(e).__name__}")

def probe_dns(name):
    t = time.perf_counter()
    try:
        addr = socket.gethostbyname(name)
        print(f"dns {name} {addr}")
    except OSError:
        print(f"dns {name} fail")
    return (time.perf_counter() - t) * 1000
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn no_network_means_no_nic_but_loopback_works() {
    let sbx = sbx(None).await;
    let code = format!(
        "{PY_PROBES}\n{}",
        r#"
print("ifaces", ",".join(sorted(n for n in os.listdir("/sys/class/net") if not n.startswith("sit"))))
print("resolv", os.path.exists("/etc/resolv.conf"))
probe_dns("denied.test")
probe_connect("192.168.127.1", 80)
probe_connect("192.168.127.1", 53)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
c = socket.create_connection(srv.getsockname())
a, _ = srv.accept()
c.sendall(b"ping")
print("lo", a.recv(4).decode())
"#
    );
    let r = run_py(&sbx, &code, |_| {}).await;
    assert_lines(
        &r.stdout,
        &[
            "ifaces lo",
            "resolv False",
            "dns denied.test fail",
            "connect 192.168.127.1:80 fail OSError",
            "connect 192.168.127.1:53 fail OSError",
            "lo ping",
        ],
    );
    assert!(r.exposed_ports.is_empty());
    eprintln!("no network: boot_ms {}", r.timing.boot_ms);
    sbx.stop().await;
}

/// `GET path` over plain TCP to 127.0.0.1:port; returns the whole response.
async fn http_get(port: u16, path: &str) -> Vec<u8> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn ports_only_forwards_into_the_guest_and_blocks_outbound() {
    let sbx = sbx(None).await;
    let mut req = SessionRequest::new(Language::Python);
    req.network.expose_ports = vec![PortMapping::tcp(8000)];
    let s = sbx
        .scheduler()
        .session(req, RunOptions::default())
        .await
        .unwrap();
    let exposed = s.exposed_ports().to_vec();
    assert_eq!(exposed.len(), 1, "{exposed:?}");
    assert_eq!(exposed[0].internal, 8000);
    assert_eq!(exposed[0].host, "127.0.0.1");
    assert_ne!(exposed[0].external, 0);
    let port = exposed[0].external;

    // The guest's view of its network.
    let r = exec(
        &s,
        r#"
import os
print("ifaces", ",".join(sorted(n for n in os.listdir("/sys/class/net") if not n.startswith("sit"))))
print("mtu", open("/sys/class/net/eth0/mtu").read().strip())
print("resolv", open("/etc/resolv.conf").read().split("\n")[1])
routes = [l.split() for l in open("/proc/net/route").read().splitlines()[1:]]
print("default", [r[0] for r in routes if r[1] == "00000000" and r[2] == "017FA8C0"])
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("192.168.127.1", 9))
print("src", s.getsockname()[0])
"#,
    )
    .await;
    assert_lines(
        &r.stdout,
        &[
            "ifaces eth0,lo",
            "mtu 1500",
            "resolv nameserver 192.168.127.1",
            "default ['eth0']",
            "src 192.168.127.2",
        ],
    );
    assert_eq!(r.exposed_ports, exposed, "exposed_ports in the exec result");

    // An HTTP server in the guest, started in the background by user code.
    const SIZE_MB: usize = 50;
    exec(
        &s,
        &format!(
            r#"
import os, socket, time
with open("big.bin", "wb") as f:
    f.write(bytes({SIZE_MB} << 20))
open("index.html", "w").write("hello from the guest\n")
os.system("nohup python3 -m http.server 8000 --bind 0.0.0.0 >/tmp/http.log 2>&1 &")
deadline = time.time() + 20
while True:
    try:
        socket.create_connection(("127.0.0.1", 8000), timeout=1).close()
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.05)
print("listening")
"#
        ),
    )
    .await;
    let resp = http_get(port, "/index.html").await;
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    assert!(text.ends_with("hello from the guest\n"), "{text}");

    let started = Instant::now();
    let resp = http_get(port, "/big.bin").await;
    let secs = started.elapsed().as_secs_f64();
    let head_end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(resp.starts_with(b"HTTP/1.0 200"));
    assert_eq!(resp.len() - head_end, SIZE_MB << 20);
    eprintln!(
        "host<-guest through the forwarded port: {SIZE_MB} MiB in {secs:.2} s = {:.1} MB/s",
        (SIZE_MB << 20) as f64 / secs / 1e6
    );

    // For comparison: the same download inside the guest, over its own loopback.
    let r = exec(
        &s,
        r#"
import subprocess
out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{speed_download}",
                      "http://127.0.0.1:8000/big.bin"], capture_output=True, text=True)
print(f"{float(out.stdout) / 1e6:.1f}")
"#,
    )
    .await;
    eprintln!(
        "the same inside the guest over lo (curl): {} MB/s",
        r.stdout.trim()
    );

    // Guest-initiated traffic goes nowhere.
    let r = exec(
        &s,
        &format!(
            "{PY_PROBES}\n{}",
            r#"
probe_dns("denied.test")
probe_dns("localhost")
probe_connect("192.168.127.1", 80)
probe_connect("192.168.127.1", 8000)
probe_connect("192.168.127.3", 443)
"#
        ),
    )
    .await;
    assert_lines(
        &r.stdout,
        &[
            "dns denied.test fail",
            "dns localhost 127.0.0.1",
            "connect 192.168.127.1:80 fail ConnectionRefusedError",
            "connect 192.168.127.1:8000 fail ConnectionRefusedError",
        ],
    );
    assert!(
        r.stdout.contains("connect 192.168.127.3:443 fail"),
        "{}",
        r.stdout
    );
    s.close().await;

    // A one-shot run reports its forwards too, and a networked boot is not slower.
    let r = run_py(&sbx, "print('ok')", |req| {
        req.network.expose_ports = vec![PortMapping::tcp(9000)];
    })
    .await;
    assert_eq!(r.exposed_ports.len(), 1);
    assert_eq!(r.exposed_ports[0].internal, 9000);
    eprintln!("ports only: boot_ms {}", r.timing.boot_ms);
    sbx.stop().await;
}

/// A TLS-ish upstream on the host's loopback: accepts, reads the first bytes (a
/// ClientHello) and reports them, then closes.
async fn hello_server() -> (u16, mpsc::UnboundedReceiver<Vec<u8>>) {
    let l = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(0);
                buf.truncate(n);
                let _ = tx.send(buf);
            });
        }
    });
    (port, rx)
}

fn allowlist(req: &mut RunRequest) {
    req.network.allow_network = true;
    req.network.allowed_domains = vec!["allowed.test".into()];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn allowlist_filters_dns_and_refuses_direct_addresses() {
    let (port, mut accepted) = hello_server().await;
    // denied.test resolves on the host too: NXDOMAIN in the guest proves the filter.
    let sbx = sbx(Some(test_proxy(&["allowed.test", "denied.test"], port))).await;
    let code = format!(
        "{PY_PROBES}\nPORT = {port}\n{}",
        r#"
first = probe_dns("allowed.test")
t = time.perf_counter()
for _ in range(10):
    socket.gethostbyname("allowed.test")
again = (time.perf_counter() - t) * 100
print(f"timing dns first {first:.1f} ms (with the idna import), then {again:.2f} ms each")
probe_dns("denied.test")
probe_dns("sub.denied.test")
probe_dns("allowed.test.evil.test")
probe_connect("192.168.127.1", PORT)
probe_connect("192.168.127.1", 80)
probe_connect("192.168.127.1", 443)
"#
    );
    let r = run_py(&sbx, &code, allowlist).await;
    assert_lines(
        &r.stdout,
        &[
            "dns allowed.test 127.0.0.1",
            "dns denied.test fail",
            "dns sub.denied.test fail",
            "dns allowed.test.evil.test fail",
        ],
    );
    for p in [port, 80, 443] {
        let want = format!("connect 192.168.127.1:{p} fail");
        assert!(
            r.stdout.contains(&want),
            "missing {want:?} in\n{}",
            r.stdout
        );
    }
    eprintln!(
        "allowlist: {}; boot_ms {}",
        r.stdout.lines().find(|l| l.starts_with("timing")).unwrap(),
        r.timing.boot_ms
    );
    assert!(
        accepted.try_recv().is_err(),
        "no guest connection may reach the upstream"
    );
    sbx.stop().await;
}

/// The allowed name's upstream on the host's loopback is reached over TLS (SNI checked),
/// and port 80 of the same name is refused.
///
/// 127.0.0.1 cannot be handed to the guest (inside the VM it is the guest's own
/// loopback), so the name resolves to the routable stand-in [`STAND_IN`] and the proxy
/// connects that to 127.0.0.1 on the host (`ProxyConfig::upstream_aliases`, tests only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn allowlist_reaches_the_allowed_tls_name() {
    let (port, mut accepted) = hello_server().await;
    let sbx = sbx(Some(aliased_test_proxy(&["allowed.test"], port))).await;
    let code = format!(
        "{PY_PROBES}\nPORT = {port}\n{}",
        r#"
import ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
probe_dns("allowed.test")
try:
    with socket.create_connection(("allowed.test", PORT), timeout=3) as s:
        print("tcp connected", s.getpeername()[0])
        try:
            ctx.wrap_socket(s, server_hostname="allowed.test")
        except (ssl.SSLError, OSError) as e:
            print("tls ended", type(e).__name__)
except OSError as e:
    print("tcp fail", type(e).__name__)
probe_connect("allowed.test", 80)
"#
    );
    let r = run_py(&sbx, &code, allowlist).await;
    let hello = tokio::time::timeout(Duration::from_secs(10), accepted.recv())
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("the upstream saw no connection; guest said:\n{}", r.stdout));
    assert_eq!(hello.first(), Some(&0x16), "a TLS handshake record");
    assert_eq!(
        parse_client_hello(&hello),
        SniOutcome::Sni("allowed.test".into()),
        "the guest's ClientHello, forwarded as is"
    );
    // The guest only ever sees the stand-in; the upstream closing ends the handshake.
    assert_lines(
        &r.stdout,
        &[
            &format!("dns allowed.test {STAND_IN}"),
            &format!("tcp connected {STAND_IN}"),
        ],
    );
    assert!(r.stdout.contains("tls ended"), "{}", r.stdout);
    // Plain HTTP to the allowed name is refused, and never reaches the upstream.
    assert!(
        r.stdout.contains("connect allowed.test:80 fail"),
        "{}",
        r.stdout
    );
    assert!(
        accepted.try_recv().is_err(),
        "only the TLS connection reached the upstream"
    );
    sbx.stop().await;
}
