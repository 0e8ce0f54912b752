//! Userspace per-VM network gateway for sbx: DNS allowlist, SNI checks, port forwards.
//!
//! [`NetProxy`] implements the [`NetworkProxy`] port. For each VM it runs one tokio task
//! (the *gateway*) that listens on `<work_dir>/net.sock`. QEMU connects to it with
//! `-netdev stream,server=off,addr.type=unix,addr.path=<socket>` and exchanges Ethernet
//! frames, each preceded by a 4-byte big-endian length. A smoltcp stack on the gateway
//! address terminates every guest TCP connection and DNS query; the proxy opens a real host
//! socket on the guest's behalf only when the policy allows it. Nothing else leaves the VM.
//!
//! # Guest network contract
//!
//! | | |
//! |---|---|
//! | guest address | [`GUEST_IP`] `192.168.127.2/24` on `eth0` |
//! | gateway, DNS  | [`GATEWAY_IP`] `192.168.127.1` (UDP and TCP port 53) |
//! | MTU           | [`MTU`] 65520, IPv4 only (no IPv6, no DHCP) |
//!
//! The host appends [`guest_kernel_args`] (`sbx.net=192.168.127.2/24,192.168.127.1,65520`)
//! to the kernel command line. The guest agent parses `sbx.net=ADDR/PREFIX,GATEWAY[,MTU]`,
//! brings `eth0` up with that address and MTU, adds a default route via `GATEWAY`, and writes
//! `/etc/resolv.conf` with `nameserver GATEWAY` (DNS is always the gateway). Without the
//! parameter the guest leaves `eth0` down. The gateway answers ARP only for its own address
//! and learns the guest's MAC from its traffic.
//!
//! # Policies
//!
//! - [`NetworkPolicy::None`]: no proxy at all (`start` refuses it; the VM gets `-nic none`).
//! - `PortsOnly`: host→guest forwards work; every guest SYN gets a RST, every DNS query
//!   REFUSED, every UDP datagram "port unreachable".
//! - `Allowlist`: DNS answers only names equal to an allowed domain or below it (others
//!   get NXDOMAIN) and remembers the A records per VM. A guest TCP connection is accepted
//!   only to an address that filtered DNS returned, only on port 443, and only when the
//!   ClientHello's SNI is an allowed name that resolved to that same address (no SNI
//!   spoofing, no fronting by IP). Non-TLS bytes on 443 are reset. **Plain HTTP on port 80
//!   is refused**, as is every other port.
//! - `Open`: any destination and port, DNS for any name.
//!
//! In every mode a guest can never reach the host's loopback, the host's own addresses,
//! link-local addresses (cloud metadata), multicast/broadcast, or other addresses of the VM
//! network; nor the special-purpose ranges ([`policy::SPECIAL_RANGES`]: RFC 1918,
//! 100.64.0.0/10, 192.0.0.0/24, 198.18.0.0/15, 0/8, 240/4) unless the operator allows a
//! range ([`ProxyConfig::allowed_ranges`]). DNS answers pointing into a range the guest
//! may not reach are dropped from the answer (DNS rebinding: a public name that resolves to
//! 10.0.0.1 or 169.254.169.254 never becomes reachable through the name). Non-DNS UDP,
//! ICMP, IPv6 and IP fragments are dropped. Each decision is counted
//! ([`NetProxy::stats`]) and logged with `tracing` (fields `vm_id`, `proto`, `dst`,
//! `name`, `reason`); denial logs are rate-limited per VM (the rest are counted as
//! [`ProxyStats::logs_suppressed`]).
//!
//! # Per-VM caps
//!
//! Every gateway resource a guest (or a host client of a forward) can make it hold is
//! bounded per VM: concurrent guest TCP connections ([`ProxyConfig::max_connections`])
//! and their rate ([`ProxyConfig::max_connect_rate`], bursts of
//! [`ProxyConfig::max_connect_burst`]), DNS queries in flight (64), DNS-over-TCP
//! connections (4, each closed after 10 s without a query; none at all in ports-only
//! mode), host connections to forwarded ports ([`ProxyConfig::max_forwards`]), and
//! buffers: [`ProxyConfig::tcp_buffer_bytes`] each way per connection, 1024 queued
//! frames on the QEMU link.
//!
//! # Forwards
//!
//! Each TCP [`PortMapping`] gets a listener on `127.0.0.1` (the requested port, or one the
//! OS picks); every accepted host connection becomes a TCP connection from the gateway to
//! `GUEST_IP:internal`. The real ports come back in [`NetworkHandle::exposed_ports`]. UDP
//! forwards are not supported (an input error).
//!
//! # Lifetime
//!
//! [`NetworkProxy::stop`] (or dropping the [`NetProxy`]) cancels the gateway, every forward
//! listener and every connection task, and removes the socket file. `stop` returns only
//! once the listeners are closed.
//!
//! Known simplification: the gateway completes the guest's TCP handshake before it
//! connects upstream, so an unreachable upstream shows up in the guest as a reset after
//! connect rather than as "connection refused".

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use sandbox_core::ports::{NetworkAttachment, NetworkHandle, NetworkPolicy, NetworkProxy};
use sandbox_core::request::{PortMapping, PortProtocol};
use sandbox_core::{ExposedPort, VmId};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod dns;
mod error;
pub mod frame;
mod gateway;
mod link;
mod packet;
pub mod policy;
mod resolver;
pub mod sni;
mod stack;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

pub use error::NetProxyError;
pub use policy::{AddressPolicy, Allowlist, DenyReason, Ipv4Range, Mode, ProxyStats};
pub use resolver::{Resolver, StaticResolver, SystemResolver};

use gateway::{Cmd, VmCtx};

/// The gateway (and DNS server) address the guest sees.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 1);
/// The guest's address.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 2);
/// Prefix length of the VM network.
pub const GUEST_PREFIX_LEN: u8 = 24;
/// IP MTU of the VM network: the largest whose Ethernet frame (MTU + 14) fits the 64 KiB
/// frames of QEMU's stream netdev, as passt uses. The stream carries no offloads, so
/// large frames are what keeps per-packet work (interrupts, syscalls, emulated device
/// round trips under TCG) off the byte path; the guest learns it from `sbx.net=`.
pub const MTU: usize = guest_proto::contract::MAX_MTU as usize;
/// The gateway's MAC address (locally administered).
pub const GATEWAY_MAC: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd];
/// File name of the socket QEMU connects to, inside the VM work dir.
pub const SOCKET_NAME: &str = "net.sock";
/// Longest unix socket path (`sockaddr_un.sun_path` minus the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Kernel command-line parameter that tells the guest agent how to configure `eth0`:
/// `sbx.net=192.168.127.2/24,192.168.127.1,65520` (address/prefix, gateway, MTU; DNS is
/// the gateway).
pub fn guest_kernel_args() -> String {
    guest_proto::contract::GuestNet {
        addr: GUEST_IP,
        prefix: GUEST_PREFIX_LEN,
        gateway: GATEWAY_IP,
        mtu: guest_proto::contract::MAX_MTU,
    }
    .to_kernel_arg()
}

/// Settings shared by every VM of one [`NetProxy`].
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Upstream resolver for allowed names (default: the host's, [`SystemResolver`]).
    pub resolver: Arc<dyn Resolver>,
    /// TTL given to the guest, and how long an answer is served from the per-VM cache.
    pub dns_ttl: Duration,
    /// How long a DNS answer keeps its addresses reachable for new connections.
    pub dns_remember: Duration,
    /// **Tests only.** Lets guests reach upstreams on the host's loopback (127.0.0.0/8),
    /// so tests can run their upstream servers there. Never set it in production: it
    /// opens every loopback service of the host to any allowed (or, in open mode, any) name.
    pub allow_loopback_upstreams: bool,
    /// **Tests only.** Guest-visible stand-in address → real upstream address (default:
    /// empty, which is the production behaviour). A loopback upstream such as `127.0.0.1`
    /// cannot be handed to a guest as is: inside the VM it is the guest's own loopback. A
    /// test instead makes its resolver (e.g. a [`StaticResolver`]) answer a routable
    /// stand-in such as `198.18.0.1` and maps it here to `127.0.0.1`.
    ///
    /// Everything the guest sees and every policy check keeps the stand-in: the DNS answer,
    /// the remembered name → address table, the "only addresses DNS returned" rule and the
    /// SNI "name resolved to this destination" rule. Only the host-side connect goes to the
    /// real address, and both addresses must pass the host-address rules (so a loopback
    /// target still needs [`ProxyConfig::allow_loopback_upstreams`]).
    pub upstream_aliases: HashMap<Ipv4Addr, Ipv4Addr>,
    /// Concurrent TCP connections per VM; further SYNs get a RST.
    pub max_connections: usize,
    /// Limit on connecting to an upstream.
    pub connect_timeout: Duration,
    /// Limit on receiving a ClientHello on port 443.
    pub sni_timeout: Duration,
    /// Receive and send buffer of each guest-side TCP socket (bytes).
    pub tcp_buffer_bytes: usize,
    /// Ports on which allowlist mode accepts (SNI-checked) TLS; default `[443]`. Tests
    /// use OS-assigned ports here.
    pub tls_ports: Vec<u16>,
    /// Special-purpose ranges ([`policy::SPECIAL_RANGES`], e.g. an intranet in
    /// `10.0.0.0/8`) the operator lets guests reach in open and allowlist modes; default
    /// none. Never opens loopback, link-local, multicast, the VM network or the host's own
    /// addresses.
    pub allowed_ranges: Vec<policy::Ipv4Range>,
    /// New guest TCP connections per second per VM, on average; more get a RST.
    pub max_connect_rate: u32,
    /// Burst of new guest TCP connections above [`ProxyConfig::max_connect_rate`].
    pub max_connect_burst: u32,
    /// Host connections to the forwarded ports open at once per VM; more are closed.
    pub max_forwards: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            resolver: Arc::new(SystemResolver),
            dns_ttl: Duration::from_secs(60),
            dns_remember: Duration::from_secs(3600),
            allow_loopback_upstreams: false,
            upstream_aliases: HashMap::new(),
            max_connections: 256,
            connect_timeout: Duration::from_secs(10),
            sni_timeout: Duration::from_secs(10),
            tcp_buffer_bytes: 256 * 1024,
            tls_ports: vec![443],
            allowed_ranges: Vec::new(),
            max_connect_rate: 50,
            max_connect_burst: 100,
            max_forwards: 64,
        }
    }
}

/// One VM's running network.
#[derive(Debug)]
struct VmNet {
    ctx: Arc<VmCtx>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    socket: PathBuf,
}

impl VmNet {
    fn shut(&self) {
        self.cancel.cancel();
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The [`NetworkProxy`] adapter: one userspace gateway task per VM.
#[derive(Debug)]
pub struct NetProxy {
    config: Arc<ProxyConfig>,
    vms: Mutex<HashMap<VmId, VmNet>>,
}

impl Default for NetProxy {
    fn default() -> Self {
        Self::new(ProxyConfig::default())
    }
}

impl NetProxy {
    /// A proxy with `config`.
    pub fn new(config: ProxyConfig) -> Self {
        Self {
            config: Arc::new(config),
            vms: Mutex::new(HashMap::new()),
        }
    }

    fn vms(&self) -> MutexGuard<'_, HashMap<VmId, VmNet>> {
        match self.vms.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Counters of a running VM network (`None` once stopped or never started).
    pub fn stats(&self, vm_id: &VmId) -> Option<ProxyStats> {
        self.vms().get(vm_id).map(|v| v.ctx.stats.snapshot())
    }

    /// True while the VM's network runs.
    pub fn is_running(&self, vm_id: &VmId) -> bool {
        self.vms().contains_key(vm_id)
    }

    /// Starts the gateway for `policy`: binds `<work_dir>/net.sock` and the forward
    /// listeners, and spawns the tasks (needs a tokio runtime).
    pub async fn start_vm(
        &self,
        vm_id: VmId,
        policy: &NetworkPolicy,
        work_dir: &Path,
    ) -> Result<NetworkHandle, NetProxyError> {
        let mode = Mode::from_policy(policy).ok_or(NetProxyError::NoNetwork)?;
        if self.vms().contains_key(&vm_id) {
            return Err(NetProxyError::AlreadyRunning);
        }
        let ports: &[PortMapping] = match policy {
            NetworkPolicy::None => &[],
            NetworkPolicy::PortsOnly { ports }
            | NetworkPolicy::Allowlist { ports, .. }
            | NetworkPolicy::Open { ports } => ports,
        };
        if let Some(p) = ports.iter().find(|p| p.protocol != PortProtocol::Tcp) {
            return Err(NetProxyError::UnsupportedForward {
                internal: p.internal,
                reason: "UDP forwards are not supported".into(),
            });
        }
        let socket = work_dir.join(SOCKET_NAME);
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(NetProxyError::SocketPathTooLong {
                path: socket,
                len,
                max: MAX_SOCKET_PATH,
            });
        }
        // A stale socket from an earlier run of this work dir would make bind fail.
        let _ = std::fs::remove_file(&socket);
        let unix = UnixListener::bind(&socket).map_err(|source| NetProxyError::SocketBind {
            path: socket.clone(),
            source,
        })?;
        let mut listeners = Vec::new();
        for p in ports {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, p.external.unwrap_or(0)));
            let bound = TcpListener::bind(addr).await.and_then(|l| {
                let port = l.local_addr()?.port();
                Ok((l, port))
            });
            match bound {
                Ok((l, port)) => listeners.push((l, p.internal, port)),
                Err(source) => {
                    let _ = std::fs::remove_file(&socket);
                    return Err(NetProxyError::ForwardBind {
                        port: p.external.unwrap_or(0),
                        internal: p.internal,
                        source,
                    });
                }
            }
        }

        let ctx = Arc::new(VmCtx::new(vm_id, mode, Arc::clone(&self.config)));
        let cancel = CancellationToken::new();
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let mut tasks = vec![tokio::spawn(gateway::run(
            Arc::clone(&ctx),
            unix,
            cmd_rx,
            cancel.clone(),
        ))];
        let mut exposed = Vec::new();
        for (l, internal, port) in listeners {
            exposed.push(ExposedPort::new(internal, port, PortProtocol::Tcp));
            tasks.push(tokio::spawn(forward(
                Arc::clone(&ctx),
                l,
                internal,
                cmd_tx.clone(),
                cancel.clone(),
            )));
        }
        tracing::info!(vm_id = %vm_id, socket = %socket.display(), mode = ?ctx.mode,
            forwards = ?exposed.iter().map(|e| (e.external, e.internal)).collect::<Vec<_>>(),
            "network: started");
        self.vms().insert(
            vm_id,
            VmNet {
                ctx,
                cancel,
                tasks,
                socket: socket.clone(),
            },
        );
        Ok(NetworkHandle {
            vm_id,
            attachment: NetworkAttachment::UnixStream { socket },
            exposed_ports: exposed,
            guest_kernel_args: vec![guest_kernel_args()],
        })
    }

    /// Stops the VM's network; returns once every listener is closed. Idempotent.
    pub async fn stop_vm(&self, vm_id: &VmId) {
        let Some(net) = self.vms().remove(vm_id) else {
            return;
        };
        net.shut();
        for t in net.tasks {
            let _ = t.await;
        }
        tracing::info!(vm_id = %vm_id, stats = ?net.ctx.stats.snapshot(), "network: stopped");
    }
}

impl Drop for NetProxy {
    fn drop(&mut self) {
        for (_, net) in self.vms().drain() {
            net.shut();
        }
    }
}

#[async_trait]
impl NetworkProxy for NetProxy {
    async fn start(
        &self,
        vm_id: VmId,
        policy: &NetworkPolicy,
        work_dir: &Path,
    ) -> sandbox_core::Result<NetworkHandle> {
        self.start_vm(vm_id, policy, work_dir)
            .await
            .map_err(|e| sandbox_core::Error::from(e).with_vm(vm_id))
    }

    async fn stop(&self, handle: &NetworkHandle) -> sandbox_core::Result<()> {
        self.stop_vm(&handle.vm_id).await;
        Ok(())
    }

    /// Every VM gets the same addresses, gateway and MTU whatever its policy, and the
    /// gateway learns the guest's MAC from its traffic: a guest restored from a snapshot
    /// finds its gateway where its ARP cache says it is.
    fn restorable_shape(&self) -> Option<String> {
        Some(restorable_shape())
    }
}

/// What a restored guest depends on in this proxy's network (see
/// [`NetworkProxy::restorable_shape`]).
pub fn restorable_shape() -> String {
    let mac: Vec<String> = GATEWAY_MAC.iter().map(|b| format!("{b:02x}")).collect();
    format!("{} gateway-mac={}", guest_kernel_args(), mac.join(":"))
}

/// Accepts host connections on one forward and bridges each to the guest port.
async fn forward(
    ctx: Arc<VmCtx>,
    listener: TcpListener,
    internal: u16,
    cmds: mpsc::Sender<Cmd>,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (sock, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(vm_id = %ctx.vm_id, error = %e, "network: forward accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&ctx.forward_slots).try_acquire_owned() else {
            ctx.deny_flow(
                "forward",
                std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, internal),
                None,
                DenyReason::TooManyForwards,
            );
            drop(sock);
            continue;
        };
        let _ = sock.set_nodelay(true);
        let (reply, answer) = oneshot::channel();
        if cmds
            .send(Cmd::Connect {
                port: internal,
                reply,
            })
            .await
            .is_err()
        {
            return;
        }
        let ctx = Arc::clone(&ctx);
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let Ok(Some(app)) = answer.await else {
                return;
            };
            ctx.stats.allow("forward");
            tracing::info!(vm_id = %ctx.vm_id, proto = "forward", peer = %peer,
                guest_port = internal, "network: allowed");
            tokio::select! {
                () = cancel.cancelled() => {}
                () = app.splice(sock) => {}
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the proxy tells the guest is what the agent reads: the contract is one type.
    #[test]
    fn the_guest_reads_back_the_proxy_network() {
        let net = guest_proto::contract::parse_cmdline(&format!("quiet {}", guest_kernel_args()))
            .ok()
            .flatten();
        assert_eq!(
            net,
            Some(guest_proto::contract::GuestNet {
                addr: GUEST_IP,
                prefix: GUEST_PREFIX_LEN,
                gateway: GATEWAY_IP,
                mtu: u16::try_from(MTU).unwrap_or(0),
            })
        );
    }
}
