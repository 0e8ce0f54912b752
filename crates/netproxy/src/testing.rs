//! A fake guest for tests: a smoltcp stack at [`GUEST_IP`] that talks to a gateway over a
//! unix stream exactly like QEMU's `-netdev stream` does.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::DuplexStream;
use tokio::net::UnixStream;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::link::Link;
use crate::stack::{AppEnd, Stack, StackConfig};
use crate::{GATEWAY_IP, GUEST_IP, GUEST_PREFIX_LEN};

/// QEMU's default MAC for the first NIC.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

enum GuestCmd {
    Connect {
        dst: SocketAddrV4,
        reply: oneshot::Sender<Option<(AppEnd, oneshot::Receiver<bool>)>>,
    },
    Listen {
        port: u16,
        reply: oneshot::Sender<mpsc::Receiver<AppEnd>>,
    },
    Udp {
        dst: SocketAddrV4,
        payload: Vec<u8>,
        reply: oneshot::Sender<Vec<u8>>,
    },
}

/// A DNS answer as the guest saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAnswer {
    /// The response code (`0` NOERROR, `2` SERVFAIL, `3` NXDOMAIN, `5` REFUSED).
    pub rcode: u16,
    /// The A records.
    pub addrs: Vec<Ipv4Addr>,
}

/// The guest side of a VM network, driven by a background task.
#[derive(Debug)]
pub struct FakeGuest {
    cmds: mpsc::Sender<GuestCmd>,
    task: JoinHandle<()>,
}

impl Drop for FakeGuest {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeGuest {
    /// Connects to the gateway's socket as QEMU would.
    pub async fn connect(socket: &Path) -> io::Result<Self> {
        Ok(Self::from_stream(UnixStream::connect(socket).await?))
    }

    /// Runs the guest stack over an already connected stream.
    pub fn from_stream(stream: UnixStream) -> Self {
        Self::with_buffer(stream, 256 * 1024)
    }

    /// Like [`FakeGuest::from_stream`] with a given TCP buffer size per socket.
    pub fn with_buffer(stream: UnixStream, tcp_buffer: usize) -> Self {
        let (cmds, rx) = mpsc::channel(64);
        let task = tokio::spawn(run(stream, rx, tcp_buffer));
        Self { cmds, task }
    }

    /// Opens a TCP connection; `ConnectionRefused` when the gateway answers with a RST
    /// (or the handshake does not finish within 5 s).
    pub async fn tcp_connect(&self, dst: SocketAddrV4) -> io::Result<DuplexStream> {
        let (reply, rx) = oneshot::channel();
        self.send(GuestCmd::Connect { dst, reply }).await?;
        let (app, est) = rx
            .await
            .map_err(|_| gone())?
            .ok_or_else(|| io::Error::other("connect failed"))?;
        match tokio::time::timeout(Duration::from_secs(5), est).await {
            Ok(Ok(true)) => Ok(app.into_stream()),
            _ => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{dst} refused"),
            )),
        }
    }

    /// Accepts TCP connections on `port` of the guest.
    pub async fn tcp_listen(&self, port: u16) -> io::Result<mpsc::Receiver<DuplexStream>> {
        let (reply, rx) = oneshot::channel();
        self.send(GuestCmd::Listen { port, reply }).await?;
        let mut apps = rx.await.map_err(|_| gone())?;
        let (tx, streams) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(app) = apps.recv().await {
                if tx.send(app.into_stream()).await.is_err() {
                    return;
                }
            }
        });
        Ok(streams)
    }

    /// Sends one datagram from a fresh port and waits for the first reply.
    pub async fn udp_exchange(
        &self,
        dst: SocketAddrV4,
        payload: &[u8],
        timeout: Duration,
    ) -> io::Result<Vec<u8>> {
        let (reply, rx) = oneshot::channel();
        self.send(GuestCmd::Udp {
            dst,
            payload: payload.to_vec(),
            reply,
        })
        .await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no UDP reply")),
        }
    }

    /// Asks the gateway's DNS (UDP) for `name`'s records of `qtype`.
    pub async fn dns(&self, name: &str, qtype: RecordType) -> io::Result<DnsAnswer> {
        let query = dns_query(name, qtype)?;
        let reply = self
            .udp_exchange(
                SocketAddrV4::new(GATEWAY_IP, 53),
                &query,
                Duration::from_secs(5),
            )
            .await?;
        parse_dns_answer(&reply)
    }

    /// Asks for `name`'s A records.
    pub async fn resolve(&self, name: &str) -> io::Result<DnsAnswer> {
        self.dns(name, RecordType::A).await
    }

    async fn send(&self, cmd: GuestCmd) -> io::Result<()> {
        self.cmds.send(cmd).await.map_err(|_| gone())
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "fake guest stopped")
}

/// A DNS query message for `name`/`qtype`.
pub fn dns_query(name: &str, qtype: RecordType) -> io::Result<Vec<u8>> {
    let name = Name::from_ascii(name).map_err(io::Error::other)?;
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name, qtype));
    msg.to_vec().map_err(io::Error::other)
}

/// Reads the response code and A records of a DNS reply.
pub fn parse_dns_answer(reply: &[u8]) -> io::Result<DnsAnswer> {
    let msg = Message::from_vec(reply).map_err(io::Error::other)?;
    let addrs = msg
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    Ok(DnsAnswer {
        rcode: u16::from(msg.metadata.response_code),
        addrs,
    })
}

async fn run(stream: UnixStream, mut cmds: mpsc::Receiver<GuestCmd>, tcp_buffer: usize) {
    let notify = Arc::new(Notify::new());
    let mut stack = Stack::new(
        &StackConfig {
            mac: GUEST_MAC,
            addr: GUEST_IP,
            prefix_len: GUEST_PREFIX_LEN,
            default_route: GATEWAY_IP,
            any_ip: false,
            tcp_buffer,
        },
        Arc::clone(&notify),
    );
    let mut link = Link::new(stream);
    let mut udp_waiters: Vec<(smoltcp::iface::SocketHandle, oneshot::Sender<Vec<u8>>)> = Vec::new();
    let mut next_udp_port: u16 = 40000;
    loop {
        stack.poll();
        let mut still = Vec::new();
        for (h, tx) in udp_waiters.drain(..) {
            let got = stack.udp_recv(h);
            if let Some((data, _)) = got.into_iter().next() {
                let _ = tx.send(data);
                stack.remove_udp(h);
            } else if tx.is_closed() {
                stack.remove_udp(h);
            } else {
                still.push((h, tx));
            }
        }
        udp_waiters = still;
        if link.send(stack.take_tx()).await.is_err() {
            return;
        }
        let delay = stack
            .poll_delay()
            .unwrap_or(Duration::from_millis(200))
            .min(Duration::from_millis(200));
        tokio::select! {
            f = link.frames.recv() => match f {
                Some(f) => {
                    stack.ingress(f);
                    for _ in 0..256 {
                        let Ok(f) = link.frames.try_recv() else { break };
                        stack.ingress(f);
                    }
                }
                None => return,
            },
            c = cmds.recv() => match c {
                Some(GuestCmd::Connect { dst, reply }) => {
                    let (etx, erx) = oneshot::channel();
                    let app = stack.connect(dst, Some(etx));
                    let _ = reply.send(app.map(|a| (a, erx)));
                }
                Some(GuestCmd::Listen { port, reply }) => {
                    let _ = reply.send(stack.listen(None, port, 4));
                }
                Some(GuestCmd::Udp { dst, payload, reply }) => {
                    next_udp_port = if next_udp_port >= 48000 { 40000 } else { next_udp_port + 1 };
                    let h = stack.add_udp(None, next_udp_port);
                    stack.udp_send(h, dst, &payload);
                    udp_waiters.push((h, reply));
                }
                None => return,
            },
            () = notify.notified() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }
}
