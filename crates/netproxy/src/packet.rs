//! First look at a frame from the guest, before the TCP/IP stack sees it.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet,
    TcpPacket, UdpPacket,
};

use crate::policy::DenyReason;

/// What to do with one frame from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ingress {
    /// Hand it to the stack (ARP for the gateway, ARP replies, TCP segments, DNS to the
    /// gateway).
    Pass,
    /// A TCP SYN opening a new connection: the policy decides before the stack sees it.
    TcpSyn {
        /// Guest side.
        src: SocketAddrV4,
        /// Destination the guest asked for.
        dst: SocketAddrV4,
    },
    /// A UDP datagram the policy refuses; the stack answers "port unreachable".
    UdpDenied {
        /// Destination the guest asked for.
        dst: SocketAddrV4,
    },
    /// Drop silently (counted).
    Drop(DenyReason),
    /// Drop without counting (malformed, or noise such as ARP for other hosts).
    Ignore,
}

/// Classifies a frame. Never panics on any input.
pub(crate) fn classify(frame: &[u8], gateway: Ipv4Addr) -> Ingress {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Ingress::Ignore;
    };
    match eth.ethertype() {
        EthernetProtocol::Arp => classify_arp(eth.payload(), gateway),
        EthernetProtocol::Ipv4 => classify_ipv4(eth.payload(), gateway),
        // QEMU announces a VM restored from a snapshot (or migrated) with RARP frames from
        // the guest's MAC: expected noise, never a flow to deny or a frame for the stack.
        EthernetProtocol::Unknown(RARP) => Ingress::Ignore,
        _ => Ingress::Drop(DenyReason::Protocol),
    }
}

/// The ethertype of reverse ARP, which QEMU's self-announce sends after an incoming
/// migration.
const RARP: u16 = 0x8035;

fn classify_arp(payload: &[u8], gateway: Ipv4Addr) -> Ingress {
    let Ok(pkt) = ArpPacket::new_checked(payload) else {
        return Ingress::Ignore;
    };
    match ArpRepr::parse(&pkt) {
        Ok(ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            target_protocol_addr,
            ..
        }) if target_protocol_addr == gateway => Ingress::Pass,
        Ok(ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            ..
        }) => Ingress::Pass,
        // With any-IP the stack would claim every address; only the gateway answers ARP.
        _ => Ingress::Ignore,
    }
}

fn classify_ipv4(payload: &[u8], gateway: Ipv4Addr) -> Ingress {
    let Ok(ip) = Ipv4Packet::new_checked(payload) else {
        return Ingress::Ignore;
    };
    if ip.version() != 4 {
        return Ingress::Ignore;
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Ingress::Drop(DenyReason::Protocol);
    }
    let src = ip.src_addr();
    let dst = ip.dst_addr();
    match ip.next_header() {
        IpProtocol::Tcp => {
            let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                return Ingress::Ignore;
            };
            if tcp.syn() && !tcp.ack() && !tcp.rst() {
                Ingress::TcpSyn {
                    src: SocketAddrV4::new(src, tcp.src_port()),
                    dst: SocketAddrV4::new(dst, tcp.dst_port()),
                }
            } else {
                Ingress::Pass
            }
        }
        IpProtocol::Udp => {
            let Ok(udp) = UdpPacket::new_checked(ip.payload()) else {
                return Ingress::Ignore;
            };
            if dst == gateway && udp.dst_port() == 53 {
                Ingress::Pass
            } else if dst.is_broadcast() || dst.is_multicast() {
                Ingress::Drop(DenyReason::Udp)
            } else {
                Ingress::UdpDenied {
                    dst: SocketAddrV4::new(dst, udp.dst_port()),
                }
            }
        }
        IpProtocol::Icmp => Ingress::Drop(DenyReason::Icmp),
        _ => Ingress::Drop(DenyReason::Protocol),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The frame QEMU's `announce_self_create` builds: broadcast, RARP "reverse request"
    /// with the guest's MAC as sender and target, padded to 60 bytes.
    pub(crate) fn qemu_announce(mac: [u8; 6]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x80, 0x35, 0, 1, 0x08, 0x00, 6, 4, 0, 3]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0; 4]);
        f.resize(60, 0);
        f
    }

    #[test]
    fn qemus_announce_after_a_restore_is_ignored_not_denied() {
        let gw = Ipv4Addr::new(192, 168, 127, 1);
        let frame = qemu_announce(crate::testing::GUEST_MAC);
        assert_eq!(classify(&frame, gw), Ingress::Ignore);
        // Other unknown protocols are still denied (and counted).
        let mut other = frame.clone();
        other[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(classify(&other, gw), Ingress::Drop(DenyReason::Protocol));
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let _ = classify(&data, Ipv4Addr::new(192, 168, 127, 1));
        }

        #[test]
        fn never_panics_ipv4_shaped(tail in proptest::collection::vec(any::<u8>(), 0..200),
                                    proto in any::<u8>(), ihl in 0u8..16) {
            let mut f = vec![0u8; 12];
            f.extend_from_slice(&[0x08, 0x00, 0x40 | ihl, 0, 0, 40, 0, 0, 0, 0, 64, proto]);
            f.extend_from_slice(&tail);
            let _ = classify(&f, Ipv4Addr::new(192, 168, 127, 1));
        }
    }
}
