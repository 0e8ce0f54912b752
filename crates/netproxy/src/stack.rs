//! A smoltcp interface fed from a frame queue, with every TCP socket bridged to a pair of
//! tokio channels (an [`AppEnd`]). Used by the gateway and by the test guest alike.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, oneshot};

/// Chunks in flight per direction per connection.
const CHANNEL_CHUNKS: usize = 16;
/// Largest chunk moved between a socket and its channel.
const CHUNK: usize = 64 * 1024;
/// Frames queued for transmission at most (beyond, the stack sees a full device).
const MAX_TX_FRAMES: usize = 4096;
/// Ephemeral ports for connections the stack opens.
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;

/// A message from the application side to a stack socket.
#[derive(Debug)]
pub(crate) enum ToStack {
    /// Bytes to send.
    Data(Bytes),
    /// Close the sending half after the data (FIN).
    Eof,
    /// Reset the connection.
    Abort,
}

/// The application side of one TCP connection terminated by a [`Stack`].
#[derive(Debug)]
pub(crate) struct AppEnd {
    rx: mpsc::Receiver<Bytes>,
    tx: mpsc::Sender<ToStack>,
    notify: Arc<Notify>,
}

impl AppEnd {
    /// The next bytes from the peer; `None` once the peer closed its sending half or the
    /// connection is gone.
    pub(crate) async fn recv(&mut self) -> Option<Bytes> {
        let r = self.rx.recv().await;
        self.notify.notify_one();
        r
    }

    /// Sends a message to the socket; false when the connection is gone.
    pub(crate) async fn send(&self, msg: ToStack) -> bool {
        let ok = self.tx.send(msg).await.is_ok();
        self.notify.notify_one();
        ok
    }

    /// Bridges this connection to `stream` in both directions until both are done.
    pub(crate) async fn splice<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let AppEnd {
            mut rx, tx, notify, ..
        } = self;
        let (mut rd, mut wr) = tokio::io::split(stream);
        let tx_abort = tx.clone();
        let notify_in = Arc::clone(&notify);
        let to_stream = async move {
            while let Some(b) = rx.recv().await {
                notify_in.notify_one();
                if wr.write_all(&b).await.is_err() {
                    let _ = tx_abort.send(ToStack::Abort).await;
                    notify_in.notify_one();
                    return;
                }
            }
            let _ = wr.shutdown().await;
        };
        let from_stream = async move {
            let mut buf = BytesMut::with_capacity(CHUNK);
            loop {
                buf.reserve(CHUNK);
                tokio::select! {
                    r = rd.read_buf(&mut buf) => {
                        let msg = match r {
                            Ok(0) => ToStack::Eof,
                            Ok(_) => ToStack::Data(buf.split().freeze()),
                            Err(_) => ToStack::Abort,
                        };
                        let last = !matches!(msg, ToStack::Data(_));
                        let sent = tx.send(msg).await.is_ok();
                        notify.notify_one();
                        if last || !sent {
                            return;
                        }
                    }
                    () = tx.closed() => return,
                }
            }
        };
        tokio::join!(to_stream, from_stream);
    }

    /// Turns the connection into an in-memory byte stream (a task does the bridging).
    pub(crate) fn into_stream(self) -> tokio::io::DuplexStream {
        let (a, b) = tokio::io::duplex(256 * 1024);
        tokio::spawn(self.splice(a));
        b
    }
}

/// A device whose frames come from and go to in-memory queues.
#[derive(Debug, Default)]
struct QueueDevice {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut Vec<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push(buf);
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<Tx<'_>> {
        if self.tx.len() < MAX_TX_FRAMES {
            Some(Tx(&mut self.tx))
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = crate::MTU + 14;
        caps
    }
}

/// How to set a stack up.
#[derive(Debug, Clone)]
pub(crate) struct StackConfig {
    pub(crate) mac: [u8; 6],
    pub(crate) addr: Ipv4Addr,
    pub(crate) prefix_len: u8,
    /// Default route via this address.
    pub(crate) default_route: Ipv4Addr,
    /// Accept packets for any destination address (the gateway).
    pub(crate) any_ip: bool,
    /// Receive and send buffer of each TCP socket.
    pub(crate) tcp_buffer: usize,
}

#[derive(Debug)]
struct Conn {
    to_app: Option<mpsc::Sender<Bytes>>,
    from_app: mpsc::Receiver<ToStack>,
    pending: Option<Bytes>,
    app_eof: bool,
    closing: bool,
    /// A socket created for one SYN; dropped if the SYN did not take.
    on_demand: Option<(SocketAddrV4, SocketAddrV4)>,
    /// Local port taken from the ephemeral range.
    ephemeral: Option<u16>,
    /// Tells a connecting caller whether the handshake completed.
    established: Option<oneshot::Sender<bool>>,
    /// Finished; removed at the next service, after egress sent any final RST/ACK.
    doomed: bool,
}

#[derive(Debug)]
struct Listener {
    addr: Option<Ipv4Addr>,
    port: u16,
    accept: mpsc::Sender<AppEnd>,
    sockets: Vec<SocketHandle>,
}

/// The TCP/IP stack with its sockets and their bridges.
pub(crate) struct Stack {
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    conns: HashMap<SocketHandle, Conn>,
    tuples: HashMap<(SocketAddrV4, SocketAddrV4), SocketHandle>,
    listeners: Vec<Listener>,
    notify: Arc<Notify>,
    used_ports: HashSet<u16>,
    next_port: u16,
    tcp_buffer: usize,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("conns", &self.conns.len())
            .field("listeners", &self.listeners.len())
            .finish_non_exhaustive()
    }
}

fn now() -> SmolInstant {
    SmolInstant::now()
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    h.finish()
}

fn v4(ep: IpEndpoint) -> SocketAddrV4 {
    let IpAddress::Ipv4(a) = ep.addr;
    SocketAddrV4::new(a, ep.port)
}

impl Stack {
    pub(crate) fn new(cfg: &StackConfig, notify: Arc<Notify>) -> Self {
        let mut device = QueueDevice::default();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(cfg.mac)));
        config.random_seed = random_u64();
        let mut iface = Interface::new(config, &mut device, now());
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(cfg.addr), cfg.prefix_len));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(cfg.default_route);
        iface.set_any_ip(cfg.any_ip);
        let span = u32::from(*EPHEMERAL.end() - *EPHEMERAL.start()) + 1;
        let start = *EPHEMERAL.start() + u16::try_from(random_u64() % u64::from(span)).unwrap_or(0);
        Self {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            conns: HashMap::new(),
            tuples: HashMap::new(),
            listeners: Vec::new(),
            notify,
            used_ports: HashSet::new(),
            next_port: start,
            tcp_buffer: cfg.tcp_buffer,
        }
    }

    /// Open connections (including ones being set up).
    pub(crate) fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// True when a socket already serves the connection `src → dst`.
    pub(crate) fn has_tuple(&self, src: SocketAddrV4, dst: SocketAddrV4) -> bool {
        self.tuples.contains_key(&(src, dst))
    }

    /// Feeds one frame and lets the stack process it.
    pub(crate) fn ingress(&mut self, frame: Vec<u8>) {
        self.device.rx.push_back(frame);
        while !self.device.rx.is_empty() {
            if self
                .iface
                .poll_ingress_single(now(), &mut self.device, &mut self.sockets)
                == smoltcp::iface::PollIngressSingleResult::None
            {
                break;
            }
        }
    }

    /// Frames the stack wants to send.
    pub(crate) fn take_tx(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.device.tx)
    }

    /// How long the stack may sleep before it must be polled again.
    pub(crate) fn poll_delay(&mut self) -> Option<Duration> {
        self.iface
            .poll_delay(now(), &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }

    fn new_tcp_socket(&self) -> tcp::Socket<'static> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; self.tcp_buffer]),
            tcp::SocketBuffer::new(vec![0u8; self.tcp_buffer]),
        );
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(60)));
        s.set_timeout(Some(smoltcp::time::Duration::from_secs(300)));
        s
    }

    fn register(
        &mut self,
        handle: SocketHandle,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        on_demand: Option<(SocketAddrV4, SocketAddrV4)>,
        ephemeral: Option<u16>,
        established: Option<oneshot::Sender<bool>>,
    ) -> AppEnd {
        let (to_app, app_rx) = mpsc::channel(CHANNEL_CHUNKS);
        let (app_tx, from_app) = mpsc::channel(CHANNEL_CHUNKS);
        self.conns.insert(
            handle,
            Conn {
                to_app: Some(to_app),
                from_app,
                pending: None,
                app_eof: false,
                closing: false,
                on_demand,
                ephemeral,
                established,
                doomed: false,
            },
        );
        tracing::trace!(local = %local, remote = %remote, "stack: connection");
        AppEnd {
            rx: app_rx,
            tx: app_tx,
            notify: Arc::clone(&self.notify),
        }
    }

    /// Prepares a socket for the SYN `src → dst` that is fed next (any-IP stacks).
    pub(crate) fn accept_on_demand(&mut self, src: SocketAddrV4, dst: SocketAddrV4) -> AppEnd {
        let mut s = self.new_tcp_socket();
        // Cannot fail: the port is non-zero (checked by the caller's packet parsing) and the
        // socket is fresh.
        let _ = s.listen(IpEndpoint::new(IpAddress::Ipv4(*dst.ip()), dst.port()));
        let handle = self.sockets.add(s);
        self.tuples.insert((src, dst), handle);
        self.register(handle, dst, src, Some((src, dst)), None, None)
    }

    /// Opens a connection to `remote`; `established` learns whether the handshake worked.
    pub(crate) fn connect(
        &mut self,
        remote: SocketAddrV4,
        established: Option<oneshot::Sender<bool>>,
    ) -> Option<AppEnd> {
        let port = self.ephemeral_port()?;
        let mut s = self.new_tcp_socket();
        let remote_ep = IpEndpoint::new(IpAddress::Ipv4(*remote.ip()), remote.port());
        if s.connect(self.iface.context(), remote_ep, port).is_err() {
            return None;
        }
        let local_ip = self.iface.ipv4_addr().unwrap_or(Ipv4Addr::UNSPECIFIED);
        self.used_ports.insert(port);
        let handle = self.sockets.add(s);
        Some(self.register(
            handle,
            SocketAddrV4::new(local_ip, port),
            remote,
            None,
            Some(port),
            established,
        ))
    }

    fn ephemeral_port(&mut self) -> Option<u16> {
        let span = usize::from(*EPHEMERAL.end() - *EPHEMERAL.start()) + 1;
        for _ in 0..span {
            let p = self.next_port;
            self.next_port = if p >= *EPHEMERAL.end() {
                *EPHEMERAL.start()
            } else {
                p + 1
            };
            if !self.used_ports.contains(&p) {
                return Some(p);
            }
        }
        None
    }

    /// Accepts connections on `port` (of `addr`, or any local address); `backlog` sockets
    /// wait in LISTEN at any time.
    pub(crate) fn listen(
        &mut self,
        addr: Option<Ipv4Addr>,
        port: u16,
        backlog: usize,
    ) -> mpsc::Receiver<AppEnd> {
        let (accept, rx) = mpsc::channel(backlog.max(1) * 4);
        let mut l = Listener {
            addr,
            port,
            accept,
            sockets: Vec::new(),
        };
        for _ in 0..backlog.max(1) {
            l.sockets.push(self.listening_socket(addr, port));
        }
        self.listeners.push(l);
        rx
    }

    fn listening_socket(&mut self, addr: Option<Ipv4Addr>, port: u16) -> SocketHandle {
        let mut s = self.new_tcp_socket();
        let ep = smoltcp::wire::IpListenEndpoint {
            addr: addr.map(IpAddress::Ipv4),
            port,
        };
        let _ = s.listen(ep);
        self.sockets.add(s)
    }

    /// Adds a UDP socket bound to `addr:port`.
    pub(crate) fn add_udp(&mut self, addr: Option<Ipv4Addr>, port: u16) -> SocketHandle {
        let mut s = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0u8; 64 * 1024]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0u8; 64 * 1024]),
        );
        let _ = s.bind(smoltcp::wire::IpListenEndpoint {
            addr: addr.map(IpAddress::Ipv4),
            port,
        });
        self.sockets.add(s)
    }

    /// Removes a UDP socket.
    #[cfg_attr(not(any(test, feature = "test-util")), allow(dead_code))]
    pub(crate) fn remove_udp(&mut self, handle: SocketHandle) {
        self.sockets.remove(handle);
    }

    /// Datagrams received on a UDP socket: (payload, sender, local address).
    pub(crate) fn udp_recv(&mut self, handle: SocketHandle) -> Vec<(Vec<u8>, SocketAddrV4)> {
        let s = self.sockets.get_mut::<udp::Socket>(handle);
        let mut out = Vec::new();
        while let Ok((data, meta)) = s.recv() {
            out.push((data.to_vec(), v4(meta.endpoint)));
        }
        out
    }

    /// Sends a datagram from a UDP socket.
    pub(crate) fn udp_send(&mut self, handle: SocketHandle, to: SocketAddrV4, data: &[u8]) {
        let s = self.sockets.get_mut::<udp::Socket>(handle);
        let ep = IpEndpoint::new(IpAddress::Ipv4(*to.ip()), to.port());
        if let Err(e) = s.send_slice(data, ep) {
            tracing::debug!(error = %e, "udp send dropped");
        }
    }

    /// Runs the stack: timers, egress, and moving bytes between sockets and channels.
    pub(crate) fn poll(&mut self) {
        self.iface.poll(now(), &mut self.device, &mut self.sockets);
        self.service();
        self.iface.poll(now(), &mut self.device, &mut self.sockets);
    }

    fn service(&mut self) {
        self.service_listeners();
        let mut dead = Vec::new();
        for (&handle, conn) in &mut self.conns {
            if conn.doomed {
                dead.push(handle);
                continue;
            }
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            if pump(conn, socket) {
                conn.doomed = true;
            }
        }
        for handle in dead {
            if let Some(conn) = self.conns.remove(&handle) {
                if let Some(t) = conn.on_demand {
                    self.tuples.remove(&t);
                }
                if let Some(p) = conn.ephemeral {
                    self.used_ports.remove(&p);
                }
            }
            self.sockets.remove(handle);
        }
    }

    fn service_listeners(&mut self) {
        let mut engaged = Vec::new();
        for (li, l) in self.listeners.iter().enumerate() {
            for (si, &h) in l.sockets.iter().enumerate() {
                let s = self.sockets.get::<tcp::Socket>(h);
                if s.state() != tcp::State::Listen {
                    let local = s.local_endpoint().map(v4);
                    let remote = s.remote_endpoint().map(v4);
                    engaged.push((li, si, h, local, remote));
                }
            }
        }
        for (li, si, h, local, remote) in engaged {
            let Some((addr, port)) = self.listeners.get(li).map(|l| (l.addr, l.port)) else {
                continue;
            };
            let replacement = self.listening_socket(addr, port);
            if let Some(slot) = self
                .listeners
                .get_mut(li)
                .and_then(|l| l.sockets.get_mut(si))
            {
                *slot = replacement;
            }
            let unspec = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
            let app = self.register(
                h,
                local.unwrap_or(unspec),
                remote.unwrap_or(unspec),
                None,
                None,
                None,
            );
            let delivered = self
                .listeners
                .get(li)
                .is_some_and(|l| l.accept.try_send(app).is_ok());
            if !delivered {
                self.sockets.get_mut::<tcp::Socket>(h).abort();
            }
        }
    }
}

/// Moves bytes between one socket and its channels. Returns true when the connection is
/// finished and can be removed.
fn pump(conn: &mut Conn, socket: &mut tcp::Socket<'static>) -> bool {
    let state = socket.state();
    if conn.on_demand.is_some() && state == tcp::State::Listen {
        // The SYN this socket was made for did not take (bad checksum, ...).
        return true;
    }
    if let Some(tx) = conn.established.take() {
        match state {
            tcp::State::SynSent | tcp::State::SynReceived | tcp::State::Listen => {
                conn.established = Some(tx);
            }
            tcp::State::Closed | tcp::State::TimeWait => {
                let _ = tx.send(false);
            }
            _ => {
                let _ = tx.send(true);
            }
        }
    }
    // Guest → application.
    if let Some(to_app) = &conn.to_app {
        let mut gone = to_app.is_closed();
        while !gone && socket.can_recv() {
            match to_app.try_reserve() {
                Ok(permit) => {
                    let chunk = socket.recv(|buf| {
                        let n = buf.len().min(CHUNK);
                        (n, Bytes::copy_from_slice(buf.get(..n).unwrap_or_default()))
                    });
                    match chunk {
                        Ok(b) if !b.is_empty() => permit.send(b),
                        _ => break,
                    }
                }
                Err(mpsc::error::TrySendError::Full(())) => break,
                Err(mpsc::error::TrySendError::Closed(())) => {
                    gone = true;
                    break;
                }
            }
        }
        let peer_done = matches!(
            state,
            tcp::State::CloseWait
                | tcp::State::LastAck
                | tcp::State::Closing
                | tcp::State::TimeWait
                | tcp::State::Closed
        );
        if gone {
            socket.abort();
            conn.to_app = None;
        } else if peer_done && !socket.can_recv() {
            conn.to_app = None;
        }
    }
    // Application → guest.
    loop {
        if conn.pending.is_none() {
            if conn.app_eof {
                break;
            }
            match conn.from_app.try_recv() {
                Ok(ToStack::Data(b)) => conn.pending = Some(b),
                Ok(ToStack::Eof) | Err(mpsc::error::TryRecvError::Disconnected) => {
                    conn.app_eof = true;
                    break;
                }
                Ok(ToStack::Abort) => {
                    socket.abort();
                    conn.app_eof = true;
                    conn.pending = None;
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
            }
        }
        if !socket.may_send() {
            if matches!(
                state,
                tcp::State::Listen | tcp::State::SynSent | tcp::State::SynReceived
            ) {
                break;
            }
            // The peer can no longer receive: drop what the application sent.
            conn.pending = None;
            continue;
        }
        let Some(p) = conn.pending.as_mut() else {
            break;
        };
        match socket.send_slice(p) {
            Ok(n) => {
                let _ = p.split_to(n.min(p.len()));
                if p.is_empty() {
                    conn.pending = None;
                } else {
                    break;
                }
            }
            Err(_) => {
                conn.pending = None;
                break;
            }
        }
    }
    if conn.app_eof && conn.pending.is_none() && !conn.closing {
        match socket.state() {
            tcp::State::Established | tcp::State::CloseWait => {
                socket.close();
                conn.closing = true;
            }
            tcp::State::SynSent | tcp::State::SynReceived | tcp::State::Listen => {}
            _ => conn.closing = true,
        }
    }
    let finished = matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait);
    finished && conn.to_app.is_none()
}
