//! The per-VM gateway task: the stack on the gateway address, policy on every new flow,
//! DNS on port 53, and host→guest forwards.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use hickory_proto::rr::RecordType;
use sandbox_core::VmId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::link::Link;
use crate::packet::{Ingress, classify};
use crate::policy::{AddressPolicy, DenyReason, DnsCache, Mode, RateLimit, StatsCell};
use crate::sni::{MAX_HELLO_BYTES, SniOutcome, parse_client_hello};
use crate::stack::{AppEnd, Stack, StackConfig, ToStack};
use crate::{GATEWAY_IP, GATEWAY_MAC, GUEST_IP, GUEST_PREFIX_LEN, ProxyConfig};

/// DNS queries answered concurrently per VM; more are dropped (the guest retries).
const DNS_CONCURRENCY: usize = 64;
/// TCP DNS connections waiting in LISTEN.
const DNS_TCP_BACKLOG: usize = 4;
/// Largest DNS message over TCP.
const MAX_DNS_TCP: usize = 16 * 1024;
/// DNS-over-TCP connections open at once per VM.
pub(crate) const MAX_DNS_TCP_CONNS: usize = 4;
/// A DNS-over-TCP connection that sends nothing for this long is closed.
const DNS_TCP_IDLE: Duration = Duration::from_secs(10);
/// Denials logged per second per VM (on average; bursts of twice that); the rest are
/// counted ([`crate::ProxyStats::logs_suppressed`]) and summarised in the next log line.
const DENY_LOGS_PER_SEC: u32 = 10;

/// Everything the gateway's decisions need about one VM.
#[derive(Debug)]
pub(crate) struct VmCtx {
    pub(crate) vm_id: VmId,
    pub(crate) mode: Mode,
    pub(crate) config: Arc<ProxyConfig>,
    pub(crate) stats: Arc<StatsCell>,
    cache: Mutex<DnsCache>,
    pub(crate) addresses: AddressPolicy,
    connect_rate: Mutex<RateLimit>,
    deny_logs: Mutex<(RateLimit, u64)>,
    pub(crate) dns_tcp_slots: Arc<Semaphore>,
    pub(crate) forward_slots: Arc<Semaphore>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// How an allowed outbound TCP connection proceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Connect straight away (open mode).
    Direct,
    /// Read the ClientHello and check its SNI first (allowlist mode, port 443).
    Tls,
}

impl VmCtx {
    pub(crate) fn new(vm_id: VmId, mode: Mode, config: Arc<ProxyConfig>) -> Self {
        let addresses =
            AddressPolicy::discover(&config.allowed_ranges, config.allow_loopback_upstreams);
        Self {
            vm_id,
            mode,
            stats: Arc::new(StatsCell::default()),
            cache: Mutex::new(DnsCache::default()),
            addresses,
            connect_rate: Mutex::new(RateLimit::new(
                config.max_connect_rate,
                config.max_connect_burst,
            )),
            deny_logs: Mutex::new((RateLimit::new(DENY_LOGS_PER_SEC, 2 * DENY_LOGS_PER_SEC), 0)),
            dns_tcp_slots: Arc::new(Semaphore::new(MAX_DNS_TCP_CONNS)),
            forward_slots: Arc::new(Semaphore::new(config.max_forwards)),
            config,
        }
    }

    pub(crate) fn cache(&self) -> MutexGuard<'_, DnsCache> {
        lock(&self.cache)
    }

    /// Whether this denial may be logged (at most [`DENY_LOGS_PER_SEC`] per second on
    /// average): `Some(n)` with the number of denials not logged since the last one that
    /// was, `None` (and counted as suppressed) when over the rate.
    pub(crate) fn may_log_denial(&self) -> Option<u64> {
        let mut g = lock(&self.deny_logs);
        if g.0.take() {
            Some(std::mem::take(&mut g.1))
        } else {
            g.1 += 1;
            self.stats.suppressed();
            None
        }
    }

    /// Takes one token of the VM's new-connection rate.
    pub(crate) fn may_connect(&self) -> bool {
        lock(&self.connect_rate).take()
    }

    pub(crate) fn deny_dns(&self, name: Option<&str>, reason: DenyReason) {
        self.stats.deny(reason);
        if let Some(skipped) = self.may_log_denial() {
            tracing::info!(vm_id = %self.vm_id, proto = "dns", name, reason = reason.as_str(),
                not_logged_before = skipped, "network: denied");
        }
    }

    pub(crate) fn allow_dns(&self, name: &str, qtype: RecordType, addrs: &[Ipv4Addr]) {
        self.stats.allow("dns");
        tracing::info!(vm_id = %self.vm_id, proto = "dns", name, qtype = %qtype,
            addrs = ?addrs, "network: allowed");
    }

    pub(crate) fn deny_flow(
        &self,
        proto: &str,
        dst: SocketAddrV4,
        name: Option<&str>,
        reason: DenyReason,
    ) {
        self.stats.deny(reason);
        // Per-packet noise (UDP, ICMP, IPv6) at debug; connection decisions at info, at
        // a bounded rate.
        if matches!(
            reason,
            DenyReason::Udp | DenyReason::Icmp | DenyReason::Protocol
        ) {
            tracing::debug!(vm_id = %self.vm_id, proto, dst = %dst, name,
                reason = reason.as_str(), "network: denied");
        } else if let Some(skipped) = self.may_log_denial() {
            tracing::info!(vm_id = %self.vm_id, proto, dst = %dst, name,
                reason = reason.as_str(), not_logged_before = skipped, "network: denied");
        }
    }

    fn allow_flow(&self, kind: &str, dst: SocketAddrV4, name: Option<&str>) {
        self.stats.allow(kind);
        tracing::info!(vm_id = %self.vm_id, proto = kind, dst = %dst, name, "network: allowed");
    }

    /// Where the host connects for a guest connection to `dst`: `dst` itself, or its
    /// [`ProxyConfig::upstream_aliases`] target (tests).
    pub(crate) fn upstream(&self, dst: SocketAddrV4) -> SocketAddrV4 {
        match self.config.upstream_aliases.get(dst.ip()) {
            Some(real) => SocketAddrV4::new(*real, dst.port()),
            None => dst,
        }
    }

    /// The decision on a guest SYN to `dst` (not the gateway). Policy checks use the
    /// guest-visible `dst`; the host-address rules apply to it and to the real upstream.
    pub(crate) fn check_syn(&self, dst: SocketAddrV4) -> Result<Plan, DenyReason> {
        if matches!(self.mode, Mode::PortsOnly) {
            return Err(DenyReason::PortsOnly);
        }
        self.addresses.check(*dst.ip())?;
        self.addresses.check(*self.upstream(dst).ip())?;
        match &self.mode {
            Mode::PortsOnly => Err(DenyReason::PortsOnly),
            Mode::Open => Ok(Plan::Direct),
            Mode::Allowlist(_) => {
                if self.cache().names_for(*dst.ip()).is_empty() {
                    Err(DenyReason::UnresolvedAddress)
                } else if self.config.tls_ports.contains(&dst.port()) {
                    Ok(Plan::Tls)
                } else {
                    Err(DenyReason::PortNotAllowed)
                }
            }
        }
    }

    /// The decision on a ClientHello's server name for a connection to `dst`.
    pub(crate) fn check_sni(&self, sni: &str, dst: SocketAddrV4) -> Result<(), DenyReason> {
        let Mode::Allowlist(list) = &self.mode else {
            return Ok(());
        };
        if !list.allows(sni) {
            return Err(DenyReason::SniNotAllowed);
        }
        if !self.cache().resolved_to(sni, *dst.ip()) {
            return Err(DenyReason::SniAddressMismatch);
        }
        Ok(())
    }
}

/// Requests from the host side to the gateway loop.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// Open a TCP connection from the gateway to the guest's `port`.
    Connect {
        port: u16,
        reply: oneshot::Sender<Option<AppEnd>>,
    },
}

fn spawn_child<F>(cancel: &CancellationToken, fut: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let cancel = cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = cancel.cancelled() => {}
            () = fut => {}
        }
    });
}

/// Runs the gateway until cancelled: accepts QEMU's connection (again after a disconnect),
/// and moves frames between it and the stack.
pub(crate) async fn run(
    ctx: Arc<VmCtx>,
    listener: UnixListener,
    mut cmds: mpsc::Receiver<Cmd>,
    cancel: CancellationToken,
) {
    let notify = Arc::new(Notify::new());
    let mut stack = Stack::new(
        &StackConfig {
            mac: GATEWAY_MAC,
            addr: GATEWAY_IP,
            prefix_len: GUEST_PREFIX_LEN,
            default_route: GATEWAY_IP,
            any_ip: true,
            tcp_buffer: ctx.config.tcp_buffer_bytes,
        },
        Arc::clone(&notify),
    );
    let dns_udp = stack.add_udp(Some(GATEWAY_IP), 53);
    // Ports-only mode answers no DNS at all: no TCP listener (SYNs to 53 get a RST).
    let mut dns_tcp = (!matches!(ctx.mode, Mode::PortsOnly))
        .then(|| stack.listen(Some(GATEWAY_IP), 53, DNS_TCP_BACKLOG));
    let dns_slots = Arc::new(Semaphore::new(DNS_CONCURRENCY));
    let (dns_reply_tx, mut dns_reply_rx) = mpsc::channel::<(SocketAddrV4, Vec<u8>)>(256);
    let mut link: Option<Link> = None;
    let mut cmds_open = true;

    loop {
        // Frames, commands and timers were handled; run the stack and flush.
        while let Ok((to, reply)) = dns_reply_rx.try_recv() {
            stack.udp_send(dns_udp, to, &reply);
        }
        stack.poll();
        for (query, from) in stack.udp_recv(dns_udp) {
            let Ok(permit) = Arc::clone(&dns_slots).try_acquire_owned() else {
                tracing::warn!(vm_id = %ctx.vm_id, "dns: too many queries in flight, dropped");
                continue;
            };
            let ctx = Arc::clone(&ctx);
            let tx = dns_reply_tx.clone();
            let notify = Arc::clone(&notify);
            spawn_child(&cancel, async move {
                if let Some(reply) = crate::dns::answer(&ctx, &query).await {
                    let _ = tx.send((from, reply)).await;
                    notify.notify_one();
                }
                drop(permit);
            });
        }
        while let Some(Ok(app)) = dns_tcp.as_mut().map(mpsc::Receiver::try_recv) {
            let Ok(permit) = Arc::clone(&ctx.dns_tcp_slots).try_acquire_owned() else {
                ctx.deny_flow(
                    "dns",
                    SocketAddrV4::new(GATEWAY_IP, 53),
                    None,
                    DenyReason::TooManyDnsConnections,
                );
                spawn_child(&cancel, async move {
                    app.send(ToStack::Abort).await;
                });
                continue;
            };
            let ctx = Arc::clone(&ctx);
            spawn_child(&cancel, async move {
                serve_dns_tcp(ctx, app).await;
                drop(permit);
            });
        }
        let out = stack.take_tx();
        if let Some(l) = link.as_mut()
            && let Err(e) = l.send(out).await
        {
            tracing::warn!(vm_id = %ctx.vm_id, error = %e, "network: QEMU stream write failed");
            link = None;
        }

        let delay = stack
            .poll_delay()
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept(), if link.is_none() => match accepted {
                Ok((stream, _)) => {
                    ctx.stats.attached();
                    tracing::debug!(vm_id = %ctx.vm_id, "network: QEMU connected");
                    link = Some(Link::new(stream));
                }
                Err(e) => {
                    tracing::warn!(vm_id = %ctx.vm_id, error = %e, "network: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            frame = recv_frame(&mut link) => match frame {
                Some(frame) => {
                    handle_frame(&ctx, &mut stack, &cancel, frame);
                    if let Some(l) = link.as_mut() {
                        for _ in 0..256 {
                            let Ok(f) = l.frames.try_recv() else { break };
                            handle_frame(&ctx, &mut stack, &cancel, f);
                        }
                    }
                }
                None => {
                    if let Some(mut l) = link.take()
                        && let Some(e) = l.reader_error().await
                    {
                        ctx.stats.fail("frame_stream");
                        tracing::warn!(vm_id = %ctx.vm_id, error = %e,
                            "network: dropped the QEMU stream");
                    }
                    tracing::debug!(vm_id = %ctx.vm_id, "network: QEMU disconnected");
                }
            },
            cmd = cmds.recv(), if cmds_open => match cmd {
                Some(Cmd::Connect { port, reply }) => {
                    let app = stack.connect(SocketAddrV4::new(GUEST_IP, port), None);
                    let _ = reply.send(app);
                }
                None => cmds_open = false,
            },
            () = notify.notified() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn recv_frame(link: &mut Option<Link>) -> Option<Vec<u8>> {
    match link {
        Some(l) => l.frames.recv().await,
        None => std::future::pending().await,
    }
}

fn handle_frame(ctx: &Arc<VmCtx>, stack: &mut Stack, cancel: &CancellationToken, frame: Vec<u8>) {
    match classify(&frame, GATEWAY_IP) {
        Ingress::Pass => stack.ingress(frame),
        Ingress::Ignore => {}
        Ingress::Drop(reason) => {
            ctx.deny_flow(
                "ip",
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
                None,
                reason,
            );
        }
        Ingress::UdpDenied { dst } => {
            let reason = if matches!(ctx.mode, Mode::PortsOnly) {
                DenyReason::PortsOnly
            } else {
                DenyReason::Udp
            };
            ctx.deny_flow("udp", dst, None, reason);
            // The stack answers "port unreachable", so the guest fails fast.
            stack.ingress(frame);
        }
        Ingress::TcpSyn { src, dst } => {
            if stack.has_tuple(src, dst) {
                stack.ingress(frame);
                return;
            }
            if *dst.ip() == GATEWAY_IP {
                if dst.port() != 53 {
                    ctx.deny_flow("tcp", dst, None, DenyReason::GatewayPort);
                }
                // DNS goes to its listener; anything else gets a RST from the stack.
                stack.ingress(frame);
                return;
            }
            if dst.port() == 0 || src.port() == 0 {
                return;
            }
            match ctx.check_syn(dst) {
                Ok(_) if stack.conn_count() >= ctx.config.max_connections => {
                    ctx.deny_flow("tcp", dst, None, DenyReason::TooManyConnections);
                }
                Ok(_) if !ctx.may_connect() => {
                    ctx.deny_flow("tcp", dst, None, DenyReason::RateLimited);
                }
                Ok(plan) => {
                    let app = stack.accept_on_demand(src, dst);
                    spawn_child(cancel, outbound(Arc::clone(ctx), app, dst, plan));
                }
                Err(reason) => {
                    let names = ctx.cache().names_for(*dst.ip());
                    ctx.deny_flow("tcp", dst, names.first().map(String::as_str), reason);
                }
            }
            // Without a socket for it, the stack answers the SYN with a RST.
            stack.ingress(frame);
        }
    }
}

/// One guest-initiated connection the policy let through (so far).
async fn outbound(ctx: Arc<VmCtx>, mut app: AppEnd, dst: SocketAddrV4, plan: Plan) {
    let mut first = BytesMut::new();
    let mut name: Option<String> = None;
    if plan == Plan::Tls {
        let deadline = tokio::time::sleep(ctx.config.sni_timeout);
        tokio::pin!(deadline);
        let verdict = loop {
            match parse_client_hello(&first) {
                SniOutcome::Incomplete if first.len() <= MAX_HELLO_BYTES + 5 => {}
                SniOutcome::Incomplete | SniOutcome::NotTls => break Err(DenyReason::NotTls),
                SniOutcome::NoSni => break Err(DenyReason::NoSni),
                SniOutcome::Sni(sni) => {
                    let v = ctx.check_sni(&sni, dst);
                    name = Some(sni);
                    break v;
                }
            }
            tokio::select! {
                chunk = app.recv() => match chunk {
                    Some(b) => first.extend_from_slice(&b),
                    None => break Err(DenyReason::NotTls),
                },
                () = &mut deadline => break Err(DenyReason::SniTimeout),
            }
        };
        if let Err(reason) = verdict {
            ctx.deny_flow("tls", dst, name.as_deref(), reason);
            app.send(ToStack::Abort).await;
            return;
        }
        ctx.allow_flow("tls", dst, name.as_deref());
    } else {
        ctx.allow_flow("tcp", dst, None);
    }
    // Policy was decided on the guest-visible `dst`; only the connect uses the alias.
    let upstream = ctx.upstream(dst);
    let connected =
        tokio::time::timeout(ctx.config.connect_timeout, TcpStream::connect(upstream)).await;
    let stream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            ctx.stats.fail("upstream_connect");
            tracing::info!(vm_id = %ctx.vm_id, dst = %dst, upstream = %upstream,
                name = name.as_deref(), error = %e, "network: upstream connect failed");
            app.send(ToStack::Abort).await;
            return;
        }
        Err(_) => {
            ctx.stats.fail("upstream_connect");
            tracing::info!(vm_id = %ctx.vm_id, dst = %dst, upstream = %upstream,
                name = name.as_deref(), "network: upstream connect timed out");
            app.send(ToStack::Abort).await;
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let mut stream = stream;
    if !first.is_empty() && stream.write_all(&first).await.is_err() {
        app.send(ToStack::Abort).await;
        return;
    }
    app.splice(stream).await;
}

/// DNS over TCP on the gateway: 2-byte length-prefixed messages until the guest closes.
async fn serve_dns_tcp(ctx: Arc<VmCtx>, app: AppEnd) {
    let mut s = app.into_stream();
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(DNS_TCP_IDLE, s.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len == 0 || len > MAX_DNS_TCP {
            return;
        }
        let mut msg = vec![0u8; len];
        match tokio::time::timeout(DNS_TCP_IDLE, s.read_exact(&mut msg)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
        let Some(reply) = crate::dns::answer(&ctx, &msg).await else {
            return;
        };
        let Ok(rlen) = u16::try_from(reply.len()) else {
            return;
        };
        let mut out = rlen.to_be_bytes().to_vec();
        out.extend_from_slice(&reply);
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
        EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
        TcpSeqNumber,
    };

    use super::*;
    use crate::policy::Allowlist;

    /// A guest SYN to `dst`, as a full Ethernet frame.
    fn syn_frame(dst: SocketAddrV4) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: 40000,
            dst_port: dst.port(),
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(1),
            ack_number: None,
            window_len: 64240,
            window_scale: None,
            max_seg_size: Some(1460),
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let ip = Ipv4Repr {
            src_addr: GUEST_IP,
            dst_addr: *dst.ip(),
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(crate::testing::GUEST_MAC),
            dst_addr: EthernetAddress(GATEWAY_MAC),
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        eth.emit(&mut f);
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &ChecksumCapabilities::default());
        let mut t = TcpPacket::new_unchecked(p.payload_mut());
        tcp.emit(
            &mut t,
            &GUEST_IP.into(),
            &dst.ip().to_owned().into(),
            &ChecksumCapabilities::default(),
        );
        buf
    }

    /// The guest's ARP request for the gateway (teaches the gateway the guest's MAC).
    fn arp_frame() -> Vec<u8> {
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(crate::testing::GUEST_MAC),
            source_protocol_addr: GUEST_IP,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: GATEWAY_IP,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(crate::testing::GUEST_MAC),
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Arp,
        };
        let mut buf = vec![0u8; eth.buffer_len() + arp.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        eth.emit(&mut f);
        arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
        buf
    }

    fn gateway(mode: Mode) -> (Arc<VmCtx>, Stack) {
        let ctx = Arc::new(VmCtx::new(
            VmId::new(),
            mode,
            Arc::new(ProxyConfig::default()),
        ));
        let stack = Stack::new(
            &StackConfig {
                mac: GATEWAY_MAC,
                addr: GATEWAY_IP,
                prefix_len: GUEST_PREFIX_LEN,
                default_route: GATEWAY_IP,
                any_ip: true,
                tcp_buffer: 4096,
            },
            Arc::new(Notify::new()),
        );
        let mut stack = stack;
        stack.ingress(arp_frame());
        stack.poll();
        // The ARP reply.
        assert_eq!(stack.take_tx().len(), 1);
        (ctx, stack)
    }

    /// The reply to a SYN is a RST (refused) or a SYN-ACK (accepted).
    fn reply_control(stack: &mut Stack) -> Option<(bool, bool)> {
        stack.poll();
        stack.take_tx().into_iter().find_map(|f| {
            let eth = EthernetFrame::new_checked(f.as_slice()).ok()?;
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
            Some((tcp.rst(), tcp.syn() && tcp.ack()))
        })
    }

    #[test]
    fn a_restored_guests_announce_reaches_neither_the_stack_nor_the_denials() {
        let (ctx, mut stack) = gateway(Mode::Allowlist(Allowlist::new(&["example.com"])));
        let cancel = CancellationToken::new();
        for _ in 0..5 {
            handle_frame(
                &ctx,
                &mut stack,
                &cancel,
                crate::packet::tests::qemu_announce(crate::testing::GUEST_MAC),
            );
        }
        stack.poll();
        assert!(stack.take_tx().is_empty());
        assert!(ctx.stats.snapshot().denied.is_empty());
    }

    #[test]
    fn syn_to_unresolved_address_gets_rst() {
        let (ctx, mut stack) = gateway(Mode::Allowlist(Allowlist::new(&["example.com"])));
        let cancel = CancellationToken::new();
        let dst = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 10), 443);
        handle_frame(&ctx, &mut stack, &cancel, syn_frame(dst));
        assert_eq!(reply_control(&mut stack), Some((true, false)));
        assert_eq!(
            ctx.stats.snapshot().denied(DenyReason::UnresolvedAddress),
            1
        );
        assert_eq!(stack.conn_count(), 0);
    }

    #[test]
    fn ports_only_resets_every_syn() {
        let (ctx, mut stack) = gateway(Mode::PortsOnly);
        let cancel = CancellationToken::new();
        for port in [80, 443, 22] {
            let dst = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 10), port);
            handle_frame(&ctx, &mut stack, &cancel, syn_frame(dst));
            assert_eq!(reply_control(&mut stack), Some((true, false)));
        }
        assert_eq!(ctx.stats.snapshot().denied(DenyReason::PortsOnly), 3);
    }

    #[tokio::test]
    async fn syn_to_resolved_address_is_accepted() {
        let (ctx, mut stack) = gateway(Mode::Allowlist(Allowlist::new(&["example.com"])));
        let ip = Ipv4Addr::new(192, 0, 2, 10);
        ctx.cache().insert(
            "example.com",
            vec![ip],
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        let cancel = CancellationToken::new();
        handle_frame(
            &ctx,
            &mut stack,
            &cancel,
            syn_frame(SocketAddrV4::new(ip, 443)),
        );
        assert_eq!(reply_control(&mut stack), Some((false, true)));
        assert_eq!(stack.conn_count(), 1);
        cancel.cancel();
    }

    #[test]
    fn ports_only_has_no_dns_over_tcp_and_special_ranges_get_rst() {
        let (ctx, mut stack) = gateway(Mode::Open);
        let cancel = CancellationToken::new();
        for (ip, reason) in [
            (Ipv4Addr::new(10, 0, 0, 1), DenyReason::ReservedAddress),
            (Ipv4Addr::new(100, 64, 1, 1), DenyReason::ReservedAddress),
            (Ipv4Addr::new(169, 254, 169, 254), DenyReason::HostAddress),
        ] {
            handle_frame(
                &ctx,
                &mut stack,
                &cancel,
                syn_frame(SocketAddrV4::new(ip, 80)),
            );
            assert_eq!(reply_control(&mut stack), Some((true, false)), "{ip}");
            assert!(ctx.stats.snapshot().denied(reason) > 0, "{ip}");
        }
        assert_eq!(stack.conn_count(), 0);
    }

    #[test]
    fn denial_logs_are_rate_limited_but_every_denial_is_counted() {
        let (ctx, _stack) = gateway(Mode::PortsOnly);
        let dst = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 80);
        for _ in 0..1000 {
            ctx.deny_flow("tcp", dst, None, DenyReason::PortsOnly);
        }
        let s = ctx.stats.snapshot();
        assert_eq!(s.denied(DenyReason::PortsOnly), 1000);
        let logged = 1000 - s.logs_suppressed;
        assert!(
            logged <= u64::from(2 * DENY_LOGS_PER_SEC) + 2,
            "{logged} denials logged"
        );
        assert!(logged >= 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Arbitrary and mutated frames through classification and the stack never panic.
        #[test]
        fn frames_never_panic(
            junk in proptest::collection::vec(any::<u8>(), 0..1600),
            idx in 0usize..60, val in any::<u8>(), cut in 0usize..80,
        ) {
            let (ctx, mut stack) = gateway(Mode::Allowlist(Allowlist::new(&["example.com"])));
            let cancel = CancellationToken::new();
            handle_frame(&ctx, &mut stack, &cancel, junk);
            let mut f = syn_frame(SocketAddrV4::new(GATEWAY_IP, 53));
            if let Some(b) = f.get_mut(idx) { *b = val; }
            f.truncate(cut.max(1));
            handle_frame(&ctx, &mut stack, &cancel, f);
            stack.poll();
            let _ = stack.take_tx();
        }
    }
}
