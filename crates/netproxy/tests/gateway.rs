//! The gateway end to end on loopback: a fake guest (a smoltcp stack in the test) talks to
//! the proxy over its unix socket exactly like QEMU would; upstreams are test servers on
//! 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::rr::RecordType;
use netproxy::sni::build_client_hello;
use netproxy::testing::{FakeGuest, dns_query, parse_dns_answer};
use netproxy::{DenyReason, GATEWAY_IP, NetProxy, ProxyConfig, StaticResolver};
use sandbox_core::VmId;
use sandbox_core::ports::{NetworkAttachment, NetworkHandle, NetworkPolicy, NetworkProxy};
use sandbox_core::request::{PortMapping, PortProtocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

const NXDOMAIN: u16 = 3;
const REFUSED: u16 = 5;
const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;
const LO2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// An echo server on 127.0.0.1 that counts connections.
async fn echo_server() -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind((LO, 0)).await.unwrap();
    let port = l.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (port, count)
}

fn resolver() -> StaticResolver {
    StaticResolver::new()
        .with("example.com", &[LO])
        .with("api.example.com", &[LO])
        .with("other.example.com", &[LO2])
        .with("evilexample.com", &[LO])
        .with("com", &[LO])
        .with("printer.local", &[LO])
        .with("evil.org", &[LO])
}

fn config(tls_port: u16) -> ProxyConfig {
    ProxyConfig {
        resolver: Arc::new(resolver()),
        allow_loopback_upstreams: true,
        tls_ports: vec![tls_port],
        connect_timeout: Duration::from_secs(3),
        sni_timeout: Duration::from_secs(2),
        ..ProxyConfig::default()
    }
}

fn allowlist(ports: Vec<PortMapping>) -> NetworkPolicy {
    NetworkPolicy::Allowlist {
        domains: vec!["example.com".into()],
        ports,
    }
}

fn socket_of(h: &NetworkHandle) -> &Path {
    let NetworkAttachment::UnixStream { socket } = &h.attachment;
    socket
}

struct Vm {
    proxy: NetProxy,
    handle: NetworkHandle,
    guest: FakeGuest,
    _dir: tempfile::TempDir,
}

async fn start(cfg: ProxyConfig, policy: NetworkPolicy) -> Vm {
    let dir = tempfile::tempdir().unwrap();
    let proxy = NetProxy::new(cfg);
    let handle = proxy.start(VmId::new(), &policy, dir.path()).await.unwrap();
    let guest = FakeGuest::connect(socket_of(&handle)).await.unwrap();
    Vm {
        proxy,
        handle,
        guest,
        _dir: dir,
    }
}

impl Vm {
    fn stats(&self) -> netproxy::ProxyStats {
        self.proxy.stats(&self.handle.vm_id).unwrap()
    }
}

/// Writes `data`, half-closes, and reads everything back (empty when reset).
async fn exchange(mut s: tokio::io::DuplexStream, data: &[u8]) -> Vec<u8> {
    let _ = s.write_all(data).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if out.len() >= data.len() {
                        break;
                    }
                }
            }
        }
    })
    .await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_filtering() {
    let vm = start(config(443), allowlist(vec![])).await;
    let g = &vm.guest;
    for ok in ["example.com", "api.example.com", "API.Example.COM."] {
        let a = g.resolve(ok).await.unwrap();
        assert_eq!(a.rcode, 0, "{ok}");
        assert!(!a.addrs.is_empty(), "{ok}");
    }
    for bad in [
        "evilexample.com",
        "com",
        "printer.local",
        "1.2.3.4",
        "example.com.evil.org",
        "4.3.2.1.in-addr.arpa",
    ] {
        let a = g.resolve(bad).await.unwrap();
        assert_eq!(a.rcode, NXDOMAIN, "{bad}");
        assert!(a.addrs.is_empty(), "{bad}");
    }
    // Allowed but unknown upstream: NXDOMAIN from the resolver.
    assert_eq!(g.resolve("nope.example.com").await.unwrap().rcode, NXDOMAIN);
    // IPv4-only network: AAAA is NOERROR without records.
    let aaaa = g.dns("example.com", RecordType::AAAA).await.unwrap();
    assert_eq!((aaaa.rcode, aaaa.addrs.len()), (0, 0));
    // Garbage to port 53 gets FORMERR, not a crash.
    let junk = g
        .udp_exchange(
            SocketAddrV4::new(GATEWAY_IP, 53),
            &[0x12, 0x34, 0x01, 0x00, 0xff],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(&junk[..2], &[0x12, 0x34]);
    let s = vm.stats();
    assert!(s.allowed("dns") >= 4, "{s:?}");
    assert_eq!(s.denied(DenyReason::NameNotAllowed), 6, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_over_tcp() {
    let vm = start(config(443), allowlist(vec![])).await;
    let mut s = vm
        .guest
        .tcp_connect(SocketAddrV4::new(GATEWAY_IP, 53))
        .await
        .unwrap();
    for (name, rcode) in [("api.example.com", 0), ("evil.org", NXDOMAIN)] {
        let q = dns_query(name, RecordType::A).unwrap();
        let mut msg = (q.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(&q);
        s.write_all(&msg).await.unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut reply).await.unwrap();
        assert_eq!(parse_dns_answer(&reply).unwrap().rcode, rcode, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_allowed_sni_reaches_upstream() {
    let (port, count) = echo_server().await;
    let vm = start(config(port), allowlist(vec![])).await;
    let a = vm.guest.resolve("api.example.com").await.unwrap();
    assert_eq!(a.addrs, vec![LO]);
    let s = vm
        .guest
        .tcp_connect(SocketAddrV4::new(LO, port))
        .await
        .unwrap();
    let mut payload = build_client_hello(Some("api.example.com"));
    payload.extend_from_slice(&[7u8; 10_000]);
    assert_eq!(exchange(s, &payload).await, payload);
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(vm.stats().allowed("tls"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refusals() {
    let (port, count) = echo_server().await;
    let vm = start(config(port), allowlist(vec![])).await;
    vm.guest.resolve("api.example.com").await.unwrap();
    vm.guest.resolve("other.example.com").await.unwrap();
    let dst = SocketAddrV4::new(LO, port);
    let cases: [(Vec<u8>, DenyReason); 4] = [
        // Allowed name, but it resolved to 127.0.0.2, not to this destination.
        (
            build_client_hello(Some("other.example.com")),
            DenyReason::SniAddressMismatch,
        ),
        (
            build_client_hello(Some("evil.org")),
            DenyReason::SniNotAllowed,
        ),
        (build_client_hello(None), DenyReason::NoSni),
        (
            b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n".to_vec(),
            DenyReason::NotTls,
        ),
    ];
    for (bytes, reason) in &cases {
        let s = vm.guest.tcp_connect(dst).await.unwrap();
        assert!(exchange(s, bytes).await.is_empty(), "{reason}");
        assert_eq!(vm.stats().denied(*reason), 1, "{reason}");
    }
    // Silence on 443 times out.
    let s = vm.guest.tcp_connect(dst).await.unwrap();
    let mut s2 = s;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(6), s2.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(vm.stats().denied(DenyReason::SniTimeout), 1);
    assert_eq!(count.load(Ordering::SeqCst), 0, "no upstream connection");
}

/// A guest-visible stand-in for the loopback upstream (`upstream_aliases`, tests only).
const ALIAS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

fn aliased_config(tls_port: u16, allow_loopback: bool) -> ProxyConfig {
    ProxyConfig {
        resolver: Arc::new(
            resolver()
                .with("alias.example.com", &[ALIAS])
                .with("evil.org", &[ALIAS]),
        ),
        upstream_aliases: [(ALIAS, LO)].into_iter().collect(),
        allow_loopback_upstreams: allow_loopback,
        // The stand-in is in the benchmarking range, which guests may reach only when
        // the operator allows it.
        allowed_ranges: vec!["198.18.0.0/16".parse().unwrap()],
        ..config(tls_port)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_alias_keeps_policy_on_the_guest_visible_address() {
    let (port, count) = echo_server().await;
    let vm = start(aliased_config(port, true), allowlist(vec![])).await;
    let g = &vm.guest;
    // Never resolved: the stand-in is refused like any other address.
    assert_eq!(
        g.tcp_connect(SocketAddrV4::new(ALIAS, port))
            .await
            .unwrap_err()
            .kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    assert_eq!(vm.stats().denied(DenyReason::UnresolvedAddress), 1);
    // The guest sees the stand-in, never the real address.
    let a = g.resolve("alias.example.com").await.unwrap();
    assert_eq!((a.rcode, a.addrs.clone()), (0, vec![ALIAS]));
    assert_eq!(g.resolve("evil.org").await.unwrap().rcode, NXDOMAIN);
    // TLS with the name that resolved to the stand-in reaches the real upstream.
    let s = g.tcp_connect(SocketAddrV4::new(ALIAS, port)).await.unwrap();
    let mut payload = build_client_hello(Some("alias.example.com"));
    payload.extend_from_slice(&[9u8; 5000]);
    assert_eq!(exchange(s, &payload).await, payload);
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(vm.stats().allowed("tls"), 1);
    // The SNI check compares with the stand-in: a name that resolved elsewhere (even to
    // the alias's real address) or is not allowed is refused.
    g.resolve("example.com").await.unwrap();
    for (sni, reason) in [
        ("example.com", DenyReason::SniAddressMismatch),
        ("evil.org", DenyReason::SniNotAllowed),
    ] {
        let s = g.tcp_connect(SocketAddrV4::new(ALIAS, port)).await.unwrap();
        assert!(
            exchange(s, &build_client_hello(Some(sni))).await.is_empty(),
            "{sni}"
        );
        assert_eq!(vm.stats().denied(reason), 1, "{sni}");
    }
    // Plain HTTP to the allowed name is still refused.
    assert!(g.tcp_connect(SocketAddrV4::new(ALIAS, 80)).await.is_err());
    assert_eq!(vm.stats().denied(DenyReason::PortNotAllowed), 1);
    assert_eq!(count.load(Ordering::SeqCst), 1);

    // Without `allow_loopback_upstreams` the alias's loopback target is a host address.
    for policy in [allowlist(vec![]), NetworkPolicy::Open { ports: vec![] }] {
        let vm = start(aliased_config(port, false), policy).await;
        let a = vm.guest.resolve("alias.example.com").await.unwrap();
        assert_eq!(a.addrs, vec![ALIAS]);
        assert!(
            vm.guest
                .tcp_connect(SocketAddrV4::new(ALIAS, port))
                .await
                .is_err()
        );
        assert_eq!(vm.stats().denied(DenyReason::HostAddress), 1);
    }
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_needs_a_resolved_address_and_an_allowed_port() {
    let (port, count) = echo_server().await;
    let vm = start(config(port), allowlist(vec![])).await;
    // Direct IP, never resolved.
    let e = vm
        .guest
        .tcp_connect(SocketAddrV4::new(LO, port))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(vm.stats().denied(DenyReason::UnresolvedAddress), 1);
    // Resolved, but port 80 (plain HTTP) and other ports are refused.
    vm.guest.resolve("example.com").await.unwrap();
    for p in [80, 22] {
        assert!(
            vm.guest
                .tcp_connect(SocketAddrV4::new(LO, p))
                .await
                .is_err()
        );
    }
    assert_eq!(vm.stats().denied(DenyReason::PortNotAllowed), 2);
    // Other gateway ports.
    assert!(
        vm.guest
            .tcp_connect(SocketAddrV4::new(GATEWAY_IP, 22))
            .await
            .is_err()
    );
    assert_eq!(vm.stats().denied(DenyReason::GatewayPort), 1);
    // Non-DNS UDP (to a documentation address) never gets anywhere.
    let r = vm
        .guest
        .udp_exchange(
            SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 53),
            b"x",
            Duration::from_millis(300),
        )
        .await;
    assert!(r.is_err());
    assert_eq!(vm.stats().denied(DenyReason::Udp), 1);
    assert_eq!(count.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_only_refuses_all_outbound_but_forwards() {
    let (port, count) = echo_server().await;
    let vm = start(
        config(port),
        NetworkPolicy::PortsOnly {
            ports: vec![PortMapping::tcp(8080)],
        },
    )
    .await;
    assert_eq!(
        vm.guest.resolve("example.com").await.unwrap().rcode,
        REFUSED
    );
    assert!(
        vm.guest
            .tcp_connect(SocketAddrV4::new(LO, port))
            .await
            .is_err()
    );
    let s = vm.stats();
    assert_eq!(s.denied(DenyReason::PortsOnly), 2, "{s:?}");
    assert_eq!(count.load(Ordering::SeqCst), 0);

    // Forward: host 127.0.0.1:<exposed> → guest :8080 (an echo server in the guest).
    let mut accepts = vm.guest.tcp_listen(8080).await.unwrap();
    tokio::spawn(async move {
        while let Some(s) = accepts.recv().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let [exposed] = vm.handle.exposed_ports.as_slice() else {
        panic!("one port expected")
    };
    assert_eq!(
        (exposed.internal, exposed.protocol, exposed.host.as_str()),
        (8080, PortProtocol::Tcp, "127.0.0.1")
    );
    for _ in 0..3 {
        let mut c = TcpStream::connect((LO, exposed.external)).await.unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = c.split();
        let (_, back) = tokio::join!(
            async {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            },
            async {
                let mut v = Vec::new();
                r.read_to_end(&mut v).await.unwrap();
                v
            }
        );
        assert_eq!(back.len(), data.len());
        assert!(back == data);
    }
    assert_eq!(vm.stats().allowed("forward"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_reaches_any_address_but_not_the_host() {
    let (port, count) = echo_server().await;
    // With loopback allowed (tests), open mode reaches the echo server by IP.
    let vm = start(config(port), NetworkPolicy::Open { ports: vec![] }).await;
    let s = vm
        .guest
        .tcp_connect(SocketAddrV4::new(LO, port))
        .await
        .unwrap();
    assert_eq!(exchange(s, b"plain bytes").await, b"plain bytes");
    assert_eq!(count.load(Ordering::SeqCst), 1);
    // Any name resolves in open mode.
    assert_eq!(vm.guest.resolve("evil.org").await.unwrap().rcode, 0);

    // Production setting: the host's loopback is never reachable.
    let cfg = ProxyConfig {
        allow_loopback_upstreams: false,
        ..config(port)
    };
    let vm = start(cfg, NetworkPolicy::Open { ports: vec![] }).await;
    for ip in [LO, Ipv4Addr::new(169, 254, 169, 254), GATEWAY_IP] {
        assert!(
            vm.guest
                .tcp_connect(SocketAddrV4::new(ip, port))
                .await
                .is_err(),
            "{ip}"
        );
    }
    assert_eq!(vm.stats().denied(DenyReason::HostAddress), 2);
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_closes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = NetProxy::new(config(443));
    let vm_id = VmId::new();
    let policy = NetworkPolicy::PortsOnly {
        ports: vec![PortMapping::tcp(80), PortMapping::tcp(81)],
    };
    let h = proxy.start(vm_id, &policy, dir.path()).await.unwrap();
    assert_eq!(socket_of(&h), dir.path().join("net.sock"));
    assert!(proxy.start(vm_id, &policy, dir.path()).await.is_err());
    let ports: Vec<u16> = h.exposed_ports.iter().map(|p| p.external).collect();
    for p in &ports {
        TcpStream::connect((LO, *p)).await.unwrap();
    }
    proxy.stop(&h).await.unwrap();
    proxy.stop(&h).await.unwrap();
    assert!(!proxy.is_running(&vm_id));
    for p in &ports {
        assert!(TcpStream::connect((LO, *p)).await.is_err(), "port {p}");
    }
    assert!(!socket_of(&h).exists());
    assert!(UnixStream::connect(socket_of(&h)).await.is_err());

    // Dropping the proxy closes listeners too.
    let proxy = NetProxy::new(config(443));
    let h = proxy.start(VmId::new(), &policy, dir.path()).await.unwrap();
    let p = h.exposed_ports[0].external;
    drop(proxy);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(TcpStream::connect((LO, p)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_errors_map_to_the_taxonomy() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = NetProxy::new(config(443));
    let e = proxy
        .start(VmId::new(), &NetworkPolicy::None, dir.path())
        .await
        .unwrap_err();
    assert_eq!(e.kind().name(), "permanent");
    // An explicit host port that is taken is the caller's problem.
    let taken = TcpListener::bind((LO, 0)).await.unwrap();
    let port = taken.local_addr().unwrap().port();
    let policy = NetworkPolicy::PortsOnly {
        ports: vec![PortMapping {
            internal: 80,
            external: Some(port),
            protocol: PortProtocol::Tcp,
        }],
    };
    let e = proxy
        .start(VmId::new(), &policy, dir.path())
        .await
        .unwrap_err();
    assert_eq!(e.kind().name(), "input", "{e}");
    let udp = NetworkPolicy::PortsOnly {
        ports: vec![PortMapping {
            internal: 53,
            external: None,
            protocol: PortProtocol::Udp,
        }],
    };
    let e = proxy
        .start(VmId::new(), &udp, dir.path())
        .await
        .unwrap_err();
    assert_eq!(e.kind().name(), "input", "{e}");
    let long = dir.path().join("x".repeat(120));
    std::fs::create_dir(&long).unwrap();
    let e = proxy
        .start(VmId::new(), &allowlist(vec![]), &long)
        .await
        .unwrap_err();
    assert_eq!(e.kind().name(), "permanent", "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_never_kill_the_gateway() {
    let Vm {
        proxy,
        handle,
        guest,
        _dir,
    } = start(config(443), allowlist(vec![])).await;
    drop(guest);
    let sock = socket_of(&handle).to_path_buf();
    // Runt, random, truncated-header and ethertype-shaped junk, then an oversize length.
    let mut raw = UnixStream::connect(&sock).await.unwrap();
    let mut seed: u32 = 0x1234_5678;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    let mut stream = Vec::new();
    for i in 0..2000 {
        let len = (rnd() % 1600) as usize;
        let mut f: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
        if f.len() > 34 {
            // Make many of them Ethernet/IPv4/TCP/UDP shaped.
            f[12] = 0x08;
            f[13] = if i % 5 == 0 { 0x06 } else { 0x00 };
            f[14] = 0x45;
            f[23] = [6u8, 17, 1][i % 3];
        }
        stream.extend_from_slice(&(f.len() as u32).to_be_bytes());
        stream.extend_from_slice(&f);
    }
    stream.extend_from_slice(&0xffff_ffffu32.to_be_bytes());
    stream.extend_from_slice(&[0u8; 64]);
    let _ = raw.write_all(&stream).await;
    // The gateway drops this stream...
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(n) = raw.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    drop(raw);
    // ...and serves the next connection normally.
    let guest = FakeGuest::connect(&sock).await.unwrap();
    assert_eq!(guest.resolve("example.com").await.unwrap().addrs, vec![LO]);
    let s = proxy.stats(&handle.vm_id).unwrap();
    assert_eq!(s.failed.get("frame_stream"), Some(&1), "{s:?}");
}

/// A snapshot of a networked VM serves clones with any policy: the guest-facing network
/// (kernel arguments, addresses) is the same in every mode, and it is what the proxy
/// names as its restorable shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_gives_the_guest_the_network_a_snapshot_names() {
    let proxy = NetProxy::new(config(443));
    let shape = proxy.restorable_shape().unwrap();
    assert_eq!(shape, netproxy::restorable_shape());
    let policies = [
        NetworkPolicy::PortsOnly { ports: Vec::new() },
        NetworkPolicy::Allowlist {
            domains: vec!["example.com".into()],
            ports: vec![PortMapping::tcp(80)],
        },
        NetworkPolicy::Open { ports: Vec::new() },
    ];
    for policy in &policies {
        let dir = tempfile::tempdir().unwrap();
        let h = proxy.start(VmId::new(), policy, dir.path()).await.unwrap();
        assert_eq!(h.guest_kernel_args, vec![netproxy::guest_kernel_args()]);
        assert!(shape.starts_with(&h.guest_kernel_args[0]), "{shape}");
        proxy.stop(&h).await.unwrap();
    }
}

/// Open mode reaches the internet, never private, shared, reserved or metadata ranges
/// (the proxy refuses before any connect: nothing is sent to these addresses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_and_allowlist_modes_never_reach_special_ranges() {
    let resolver =
        StaticResolver::new().with("intranet.example.com", &[Ipv4Addr::new(10, 0, 0, 5)]);
    let cfg = ProxyConfig {
        resolver: Arc::new(resolver),
        ..config(443)
    };
    let vm = start(cfg, NetworkPolicy::Open { ports: vec![] }).await;
    let reserved = [
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "192.0.0.170",
        "198.18.0.1",
        "240.0.0.1",
    ];
    for ip in reserved {
        let ip: Ipv4Addr = ip.parse().unwrap();
        assert!(
            vm.guest
                .tcp_connect(SocketAddrV4::new(ip, 80))
                .await
                .is_err(),
            "{ip}"
        );
    }
    assert_eq!(
        vm.stats().denied(DenyReason::ReservedAddress),
        reserved.len() as u64
    );
    let metadata = SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80);
    assert!(vm.guest.tcp_connect(metadata).await.is_err());
    assert_eq!(vm.stats().denied(DenyReason::HostAddress), 1);
    // Rebinding: the name resolves, but to nothing the guest may reach.
    let a = vm.guest.resolve("intranet.example.com").await.unwrap();
    assert_eq!((a.rcode, a.addrs.len()), (0, 0));
    assert_eq!(vm.stats().denied(DenyReason::RebindingAnswer), 1);

    // Allowlist mode: an allowed name that resolves into a private range is no way in.
    let resolver = StaticResolver::new().with("example.com", &[Ipv4Addr::new(192, 168, 0, 10)]);
    let cfg = ProxyConfig {
        resolver: Arc::new(resolver),
        ..config(443)
    };
    let vm = start(cfg, allowlist(vec![])).await;
    let a = vm.guest.resolve("example.com").await.unwrap();
    assert!(a.addrs.is_empty(), "{:?}", a.addrs);
    assert!(
        vm.guest
            .tcp_connect(SocketAddrV4::new(Ipv4Addr::new(192, 168, 0, 10), 443))
            .await
            .is_err()
    );
    assert_eq!(vm.stats().denied(DenyReason::ReservedAddress), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_are_rate_limited_per_vm() {
    let (port, count) = echo_server().await;
    let cfg = ProxyConfig {
        max_connect_rate: 1,
        max_connect_burst: 3,
        ..config(port)
    };
    let vm = start(cfg, NetworkPolicy::Open { ports: vec![] }).await;
    let mut ok = 0;
    for _ in 0..6 {
        if let Ok(s) = vm.guest.tcp_connect(SocketAddrV4::new(LO, port)).await {
            assert_eq!(exchange(s, b"x").await, b"x");
            ok += 1;
        }
    }
    assert!((3..=4).contains(&ok), "{ok} connections let through");
    assert_eq!(vm.stats().denied(DenyReason::RateLimited), 6 - ok);
    assert_eq!(count.load(Ordering::SeqCst), ok as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_over_tcp_is_capped_and_absent_in_ports_only_mode() {
    let vm = start(config(443), NetworkPolicy::PortsOnly { ports: vec![] }).await;
    assert!(
        vm.guest
            .tcp_connect(SocketAddrV4::new(GATEWAY_IP, 53))
            .await
            .is_err(),
        "no DNS over TCP in ports-only mode"
    );

    let vm = start(config(443), allowlist(vec![])).await;
    async fn ask(s: &mut tokio::io::DuplexStream) -> Option<u16> {
        let q = dns_query("api.example.com", RecordType::A).unwrap();
        let mut msg = (q.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(&q);
        s.write_all(&msg).await.ok()?;
        let mut len = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut len))
            .await
            .ok()?
            .ok()?;
        let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut reply).await.ok()?;
        Some(parse_dns_answer(&reply).unwrap().rcode)
    }
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = vm
            .guest
            .tcp_connect(SocketAddrV4::new(GATEWAY_IP, 53))
            .await
            .unwrap();
        assert_eq!(ask(&mut s).await, Some(0));
        held.push(s);
    }
    // A fifth connection at once is reset.
    let fifth = vm
        .guest
        .tcp_connect(SocketAddrV4::new(GATEWAY_IP, 53))
        .await;
    if let Ok(mut s) = fifth {
        assert_eq!(ask(&mut s).await, None);
    }
    assert_eq!(vm.stats().denied(DenyReason::TooManyDnsConnections), 1);
    // Closing one makes room again.
    drop(held.pop());
    let mut answered = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Ok(mut s) = vm
            .guest
            .tcp_connect(SocketAddrV4::new(GATEWAY_IP, 53))
            .await
            && ask(&mut s).await == Some(0)
        {
            answered = true;
            break;
        }
    }
    assert!(answered, "a slot frees when a connection closes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_connections_to_forwards_are_capped() {
    let cfg = ProxyConfig {
        max_forwards: 2,
        ..config(443)
    };
    let vm = start(
        cfg,
        NetworkPolicy::PortsOnly {
            ports: vec![PortMapping::tcp(8080)],
        },
    )
    .await;
    // The guest service accepts and echoes, holding each connection open.
    let mut accepts = vm.guest.tcp_listen(8080).await.unwrap();
    tokio::spawn(async move {
        while let Some(s) = accepts.recv().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let ext = vm.handle.exposed_ports[0].external;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect((LO, ext)).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.unwrap();
        held.push(c);
    }
    let mut third = TcpStream::connect((LO, ext)).await.unwrap();
    let _ = third.write_all(b"ping").await;
    let mut b = [0u8; 4];
    let got = tokio::time::timeout(Duration::from_secs(5), third.read(&mut b))
        .await
        .unwrap();
    assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
    assert_eq!(vm.stats().denied(DenyReason::TooManyForwards), 1);
    assert_eq!(vm.stats().allowed("forward"), 2);
}
