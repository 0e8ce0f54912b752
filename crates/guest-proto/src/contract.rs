//! The host↔guest contract outside the wire protocol, defined once for both sides: the
//! virtio-serial port the agent talks on, and the kernel command-line argument that
//! carries the guest's network settings (`sbx.net=`), written by the host's network proxy
//! and read by the agent.

use std::fmt;
use std::net::Ipv4Addr;

/// Name of the virtio-serial port the guest agent opens
/// (`/dev/virtio-ports/org.sbx.agent`); the host's QEMU command line names it.
pub const AGENT_PORT_NAME: &str = "org.sbx.agent";

/// The kernel command-line parameter carrying the guest's network settings.
pub const NET_CMDLINE_KEY: &str = "sbx.net";
/// IP MTU when `sbx.net=` does not give one.
pub const DEFAULT_MTU: u16 = 1500;
/// The MTUs `sbx.net=` may ask for (IPv4's minimum to the largest that fits a 64 KiB
/// frame on QEMU's stream netdev).
pub const MTU_RANGE: std::ops::RangeInclusive<u16> = 576..=MAX_MTU;
/// The largest MTU: an Ethernet frame (MTU + 14) that fits the 64 KiB frames of QEMU's
/// stream netdev.
pub const MAX_MTU: u16 = 65520;

/// The guest's network settings from `sbx.net=ADDR/PREFIX,GATEWAY[,MTU]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNet {
    /// The guest's address on `eth0`.
    pub addr: Ipv4Addr,
    /// Prefix length of the VM network (1–31).
    pub prefix: u8,
    /// Default gateway, also the only DNS server.
    pub gateway: Ipv4Addr,
    /// IP MTU of `eth0` ([`DEFAULT_MTU`] when not given).
    pub mtu: u16,
}

impl GuestNet {
    /// The netmask of [`GuestNet::prefix`].
    pub fn netmask(&self) -> Ipv4Addr {
        prefix_to_mask(self.prefix)
    }

    /// The kernel command-line argument that carries these settings:
    /// `sbx.net=ADDR/PREFIX,GATEWAY,MTU`. [`parse_cmdline`] reads it back.
    pub fn to_kernel_arg(&self) -> String {
        format!(
            "{NET_CMDLINE_KEY}={}/{},{},{}",
            self.addr, self.prefix, self.gateway, self.mtu
        )
    }
}

impl fmt::Display for GuestNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} via {} mtu {}",
            self.addr, self.prefix, self.gateway, self.mtu
        )
    }
}

/// A malformed `sbx.net=` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetParseError(String);

impl fmt::Display for NetParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad {NET_CMDLINE_KEY}= parameter: {}", self.0)
    }
}

impl std::error::Error for NetParseError {}

fn prefix_to_mask(prefix: u8) -> Ipv4Addr {
    let bits = match prefix {
        0 => 0,
        p if p >= 32 => u32::MAX,
        p => u32::MAX << (32 - u32::from(p)),
    };
    Ipv4Addr::from(bits)
}

/// Finds `sbx.net=` in a kernel command line (the last one wins, as for kernel
/// parameters) and parses it. `Ok(None)` when the parameter is absent.
pub fn parse_cmdline(cmdline: &str) -> Result<Option<GuestNet>, NetParseError> {
    let value = cmdline
        .split_ascii_whitespace()
        .filter_map(|tok| tok.split_once('='))
        .filter(|(k, _)| *k == NET_CMDLINE_KEY)
        .map(|(_, v)| v)
        .next_back();
    value.map(parse_value).transpose()
}

/// Parses `ADDR/PREFIX,GATEWAY[,MTU]`.
pub fn parse_value(value: &str) -> Result<GuestNet, NetParseError> {
    let bad = |why: String| NetParseError(format!("{value:?}: {why}"));
    let (cidr, rest) = value
        .split_once(',')
        .ok_or_else(|| bad("want ADDR/PREFIX,GATEWAY[,MTU]".into()))?;
    let (gateway, mtu) = match rest.split_once(',') {
        Some((gateway, mtu)) => {
            let mtu = mtu
                .parse::<u16>()
                .ok()
                .filter(|m| MTU_RANGE.contains(m))
                .ok_or_else(|| {
                    bad(format!(
                        "MTU {mtu:?} is not {}-{}",
                        MTU_RANGE.start(),
                        MTU_RANGE.end()
                    ))
                })?;
            (gateway, mtu)
        }
        None => (rest, DEFAULT_MTU),
    };
    let (addr, prefix) = cidr
        .split_once('/')
        .ok_or_else(|| bad("address has no /PREFIX".into()))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| bad(format!("{addr:?} is not an IPv4 address")))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=31).contains(p))
        .ok_or_else(|| bad(format!("prefix {prefix:?} is not 1-31")))?;
    let gateway: Ipv4Addr = gateway
        .parse()
        .map_err(|_| bad(format!("gateway {gateway:?} is not an IPv4 address")))?;
    let net = GuestNet {
        addr,
        prefix,
        gateway,
        mtu,
    };
    let mask = u32::from(net.netmask());
    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
        return Err(bad(format!("{addr} is not a host address")));
    }
    if gateway == addr {
        return Err(bad("gateway equals the address".into()));
    }
    if u32::from(addr) & mask != u32::from(gateway) & mask {
        return Err(bad(format!("gateway {gateway} is outside {addr}/{prefix}")));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD: &str = "sbx.net=192.168.127.2/24,192.168.127.1";

    fn std_net() -> GuestNet {
        GuestNet {
            addr: Ipv4Addr::new(192, 168, 127, 2),
            prefix: 24,
            gateway: Ipv4Addr::new(192, 168, 127, 1),
            mtu: DEFAULT_MTU,
        }
    }

    #[test]
    fn parses_the_contract_value() {
        let line = format!("console=hvc0 reboot=t quiet {STD} panic=-1\n");
        assert_eq!(parse_cmdline(&line), Ok(Some(std_net())));
        assert_eq!(std_net().netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(
            std_net().to_string(),
            "192.168.127.2/24 via 192.168.127.1 mtu 1500"
        );
        let jumbo = parse_cmdline("sbx.net=192.168.127.2/24,192.168.127.1,65520").unwrap();
        assert_eq!(jumbo.map(|n| n.mtu), Some(65520));
    }

    #[test]
    fn absent_means_offline() {
        assert_eq!(parse_cmdline(""), Ok(None));
        assert_eq!(parse_cmdline("console=hvc0 quiet init=/init\n"), Ok(None));
        // Similar keys are not it.
        assert_eq!(
            parse_cmdline("sbx.network=1 xsbx.net=10.0.0.2/8,10.0.0.1"),
            Ok(None)
        );
        assert_eq!(parse_cmdline("sbx.net"), Ok(None));
    }

    #[test]
    fn last_occurrence_wins_and_whitespace_is_any() {
        let line = format!("sbx.net=10.0.0.2/8,10.0.0.1\t{STD}\n");
        assert_eq!(parse_cmdline(&line), Ok(Some(std_net())));
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "sbx.net=",
            "sbx.net=192.168.127.2/24",
            "sbx.net=192.168.127.2,192.168.127.1",
            "sbx.net=192.168.127.2/,192.168.127.1",
            "sbx.net=192.168.127.2/0,192.168.127.1",
            "sbx.net=192.168.127.2/32,192.168.127.1",
            "sbx.net=192.168.127.2/33,192.168.127.1",
            "sbx.net=192.168.127.2/x,192.168.127.1",
            "sbx.net=192.168.127.256/24,192.168.127.1",
            "sbx.net=::1/24,192.168.127.1",
            "sbx.net=192.168.127.2/24,",
            "sbx.net=192.168.127.2/24,gateway",
            "sbx.net=192.168.127.2/24,192.168.128.1",
            "sbx.net=192.168.127.2/24,192.168.127.2",
            "sbx.net=0.0.0.0/24,0.0.0.1",
            "sbx.net=192.168.127.2/24,192.168.127.1,extra",
            "sbx.net=192.168.127.2/24,192.168.127.1,575",
            "sbx.net=192.168.127.2/24,192.168.127.1,65521",
            "sbx.net=192.168.127.2/24,192.168.127.1,1500,x",
            "sbx.net=192.168.127.2/24,192.168.127.1,",
        ] {
            let err = parse_cmdline(bad).expect_err(bad);
            assert!(err.to_string().starts_with("bad sbx.net="), "{err}");
        }
    }

    #[test]
    fn masks() {
        assert_eq!(prefix_to_mask(8), Ipv4Addr::new(255, 0, 0, 0));
        assert_eq!(prefix_to_mask(31), Ipv4Addr::new(255, 255, 255, 254));
        assert_eq!(prefix_to_mask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(prefix_to_mask(32), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn kernel_arg_round_trips() {
        for net in [
            std_net(),
            GuestNet {
                mtu: 65520,
                ..std_net()
            },
        ] {
            let arg = net.to_kernel_arg();
            assert!(arg.starts_with("sbx.net="), "{arg}");
            assert_eq!(
                parse_cmdline(&format!("quiet {arg} panic=-1")),
                Ok(Some(net))
            );
        }
    }
}
