//! Guest side of the VM network (PID 1 only): `eth0`, the default route and DNS.
//!
//! The host's network proxy (crate `netproxy`) appends `sbx.net=ADDR/PREFIX,GATEWAY[,MTU]` to the
//! kernel command line when a VM has a network (`sbx.net=192.168.127.2/24,192.168.127.1`).
//! [`configure_from_cmdline`] then:
//!
//! 1. waits (≤ 2 s, polling `/sys/class/net/eth0` with 1 → 50 ms backoff) for the
//!    virtio-net device, which the kernel has normally probed before PID 1 starts;
//! 2. sets the address and netmask (`SIOCSIFADDR`, `SIOCSIFNETMASK`), the MTU
//!    (`SIOCSIFMTU`; the optional third field of `sbx.net=`, else 1500) and brings `eth0` up (`SIOCSIFFLAGS`, `IFF_UP | IFF_RUNNING`);
//! 3. adds the default route via `GATEWAY` (`SIOCADDRT`);
//! 4. mounts a small tmpfs on `/run` (root-owned, 0755, noexec) and writes
//!    `/run/resolv.conf` with `nameserver GATEWAY` — the read-only root image links
//!    `/etc/resolv.conf` to `../run/resolv.conf`.
//!
//! Without the parameter nothing is done: `eth0` (if any) stays down and there is no
//! resolver configuration (VMs without a network have no NIC at all). No external tools
//! are used; everything is an ioctl on an `AF_INET` datagram socket.
#![allow(unsafe_code)]

use std::fmt;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use tracing::{info, warn};

/// The kernel command-line parameter carrying the guest's network settings.
pub const CMDLINE_KEY: &str = "sbx.net";
/// The interface the virtio-net device becomes.
pub const INTERFACE: &str = "eth0";
/// IP MTU when `sbx.net=` does not give one.
pub const DEFAULT_MTU: u16 = 1500;
/// The MTUs `sbx.net=` may ask for (IPv4's minimum to the largest that fits a 64 KiB
/// frame on QEMU's stream netdev).
pub const MTU_RANGE: std::ops::RangeInclusive<u16> = 576..=65520;
/// Where the resolver configuration goes (`/etc/resolv.conf` links here).
pub const RESOLV_CONF: &str = "/run/resolv.conf";
/// Longest wait for `eth0` to appear.
const IFACE_WAIT: Duration = Duration::from_secs(2);

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

    /// The contents of `/run/resolv.conf`.
    pub fn resolv_conf(&self) -> String {
        format!(
            "# written by the sbx guest agent\nnameserver {}\noptions timeout:2 attempts:2\n",
            self.gateway
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
pub struct ParseError(String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad {CMDLINE_KEY}= parameter: {}", self.0)
    }
}

impl std::error::Error for ParseError {}

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
pub fn parse_cmdline(cmdline: &str) -> Result<Option<GuestNet>, ParseError> {
    let value = cmdline
        .split_ascii_whitespace()
        .filter_map(|tok| tok.split_once('='))
        .filter(|(k, _)| *k == CMDLINE_KEY)
        .map(|(_, v)| v)
        .next_back();
    value.map(parse_value).transpose()
}

/// Parses `ADDR/PREFIX,GATEWAY[,MTU]`.
pub fn parse_value(value: &str) -> Result<GuestNet, ParseError> {
    let bad = |why: String| ParseError(format!("{value:?}: {why}"));
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

/// Reads `/proc/cmdline` and, when it carries `sbx.net=`, configures `eth0`, the default
/// route and `/run/resolv.conf`. Returns the settings applied (`Ok(None)`: no network).
pub fn configure_from_cmdline() -> io::Result<Option<GuestNet>> {
    let cmdline = fs::read_to_string("/proc/cmdline")?;
    let Some(net) = parse_cmdline(&cmdline).map_err(io::Error::other)? else {
        return Ok(None);
    };
    let started = Instant::now();
    configure(&net)?;
    info!(%net, setup_us = started.elapsed().as_micros() as u64, "network configured");
    Ok(Some(net))
}

/// Applies `net` to [`INTERFACE`] and writes the resolver configuration.
pub fn configure(net: &GuestNet) -> io::Result<()> {
    let sys = Path::new("/sys/class/net").join(INTERFACE);
    if !wait_for_path(&sys, IFACE_WAIT) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{INTERFACE} did not appear within {IFACE_WAIT:?}"),
        ));
    }
    configure_interface(INTERFACE, net)?;
    write_resolv_conf(net)
}

/// Sets `net`'s address, netmask and MTU on `name`, brings it up and adds the
/// default route via the gateway.
pub fn configure_interface(name: &str, net: &GuestNet) -> io::Result<()> {
    let sock = inet_socket()?;
    let ctl = |what: &str, r: io::Result<()>| {
        r.map_err(|e| io::Error::new(e.kind(), format!("{name}: {what}: {e}")))
    };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_v4(net.addr);
    ctl(
        "SIOCSIFADDR",
        ioctl_ifreq(&sock, libc::SIOCSIFADDR, &mut req),
    )?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr_v4(net.netmask());
    ctl(
        "SIOCSIFNETMASK",
        ioctl_ifreq(&sock, libc::SIOCSIFNETMASK, &mut req),
    )?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = i32::from(net.mtu);
    ctl("SIOCSIFMTU", ioctl_ifreq(&sock, libc::SIOCSIFMTU, &mut req))?;
    ctl("up", interface_up(&sock, name))?;
    ctl("SIOCADDRT", add_default_route(&sock, net.gateway))
}

/// Polls `path` with a 1 ms → 50 ms backoff for at most `limit`.
fn wait_for_path(path: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    let mut delay = Duration::from_millis(1);
    loop {
        if path.exists() {
            return true;
        }
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(delay.min(left));
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

/// Mounts a tmpfs on `/run` if it is not writable yet, and writes [`RESOLV_CONF`].
fn write_resolv_conf(net: &GuestNet) -> io::Result<()> {
    let run = Path::new("/run");
    let _ = fs::create_dir_all(run);
    if nix::unistd::access(run, nix::unistd::AccessFlags::W_OK).is_err() {
        mount(
            Some("tmpfs"),
            run,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("size=256k,nr_inodes=64,mode=0755"),
        )
        .map_err(|e| io::Error::other(format!("tmpfs on /run: {}", e.desc())))?;
    }
    fs::write(RESOLV_CONF, net.resolv_conf())
        .map_err(|e| io::Error::new(e.kind(), format!("{RESOLV_CONF}: {e}")))
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A zeroed `ifreq` naming `name`.
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.len() >= libc::IFNAMSIZ || name.as_bytes().contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data (a name array and a union of POD members); all-zero
    // is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

/// An `AF_INET` `sockaddr` (as `sockaddr_in`: port 0, then the address) for `ip`.
fn sockaddr_v4(ip: Ipv4Addr) -> libc::sockaddr {
    let mut sa = libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // sockaddr_in: sin_port (2 bytes) then sin_addr (4 bytes, network order).
    for (dst, src) in sa.sa_data[2..6].iter_mut().zip(ip.octets()) {
        *dst = src as libc::c_char;
    }
    sa
}

fn ioctl_ifreq(sock: &OwnedFd, request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: every SIOC*IF* request used here reads and/or writes a `struct ifreq`, and
    // `req` is a valid, exclusively borrowed ifreq for the duration of the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `SIOCGIFFLAGS`, then `SIOCSIFFLAGS` with `IFF_UP | IFF_RUNNING` added.
fn interface_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq(name)?;
    ioctl_ifreq(sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled in the union member ifru_flags, which we read here.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl_ifreq(sock, libc::SIOCSIFFLAGS, &mut req)
}

/// The kernel's `struct rtentry` (`include/uapi/linux/route.h`); glibc's `libc` crate
/// does not export it.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

#[cfg(target_arch = "x86_64")]
const _: () = assert!(std::mem::size_of::<RtEntry>() == 120);

/// `SIOCADDRT`: `0.0.0.0/0 via gateway` (the kernel picks the interface whose subnet
/// holds the gateway).
fn add_default_route(sock: &OwnedFd, gateway: Ipv4Addr) -> io::Result<()> {
    let mut rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_v4(gateway),
        rt_genmask: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: SIOCADDRT reads a `struct rtentry`; `rt` has the kernel's layout, lives for
    // the whole call, and its only pointer (rt_dev) is null (no device name).
    let rc = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCADDRT as _,
            &mut rt as *mut RtEntry,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// Runs [`configure_from_cmdline`] and logs the outcome (for PID 1's boot sequence).
pub fn boot() {
    match configure_from_cmdline() {
        Ok(_) => {}
        Err(err) => warn!(%err, "network setup failed; the VM stays offline"),
    }
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
    fn masks_and_resolv_conf() {
        assert_eq!(prefix_to_mask(8), Ipv4Addr::new(255, 0, 0, 0));
        assert_eq!(prefix_to_mask(31), Ipv4Addr::new(255, 255, 255, 254));
        assert_eq!(prefix_to_mask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(prefix_to_mask(32), Ipv4Addr::BROADCAST);
        let conf = std_net().resolv_conf();
        assert!(conf.contains("\nnameserver 192.168.127.1\n"), "{conf}");
        assert_eq!(conf.matches("nameserver").count(), 1);
    }

    #[test]
    fn sockaddr_layout_matches_sockaddr_in() {
        let sa = sockaddr_v4(Ipv4Addr::new(192, 168, 127, 1));
        assert_eq!(i32::from(sa.sa_family), libc::AF_INET);
        let bytes: Vec<u8> = sa.sa_data.iter().map(|b| *b as u8).collect();
        assert_eq!(&bytes[..6], &[0, 0, 192, 168, 127, 1]);
        assert!(bytes[6..].iter().all(|b| *b == 0));
    }

    /// Runs the real ioctls against a throwaway interface in a private network namespace:
    ///
    /// ```text
    /// unshare -n sh -c 'ip link add eth0 type veth peer name eth1 &&
    ///   SBX_NET_TEST_IFACE=eth0 target/debug/deps/guest_agent-* net::tests::ioctls --ignored'
    /// ```
    #[test]
    #[ignore = "needs root and a private network namespace with a spare interface"]
    fn ioctls_configure_a_real_interface() {
        let Ok(name) = std::env::var("SBX_NET_TEST_IFACE") else {
            eprintln!("SBX_NET_TEST_IFACE not set; skipped");
            return;
        };
        let net = GuestNet {
            mtu: 9000,
            ..std_net()
        };
        configure_interface(&name, &net).unwrap();
        // (Not /sys/class/net: that shows the namespace sysfs was mounted in.)
        let sock = inet_socket().unwrap();
        let mut req = ifreq(&name).unwrap();
        ioctl_ifreq(&sock, libc::SIOCGIFMTU, &mut req).unwrap();
        // SAFETY: SIOCGIFMTU filled in ifru_mtu.
        assert_eq!(unsafe { req.ifr_ifru.ifru_mtu }, 9000);
        let mut req = ifreq(&name).unwrap();
        ioctl_ifreq(&sock, libc::SIOCGIFFLAGS, &mut req).unwrap();
        // SAFETY: SIOCGIFFLAGS filled in ifru_flags.
        let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
        assert_ne!(flags & libc::IFF_UP, 0, "{name} is not up");
        let mut req = ifreq(&name).unwrap();
        ioctl_ifreq(&sock, libc::SIOCGIFNETMASK, &mut req).unwrap();
        // SAFETY: SIOCGIFNETMASK filled in ifru_netmask.
        let mask = unsafe { req.ifr_ifru.ifru_netmask };
        assert_eq!(mask.sa_data[2..6], sockaddr_v4(net.netmask()).sa_data[2..6]);
        // /proc/net/route: Iface Destination Gateway Flags ... Mask (hex, host order).
        let routes = fs::read_to_string("/proc/net/route").unwrap();
        let gw = format!("{:08X}", u32::from_ne_bytes(net.gateway.octets()));
        let default = routes
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&name.as_str()) && f.get(1) == Some(&"00000000"))
            .unwrap_or_else(|| panic!("no default route in\n{routes}"));
        assert_eq!(default[2], gw, "{routes}");
        let subnet = format!("{:08X}", u32::from_ne_bytes([192, 168, 127, 0]));
        assert!(
            routes
                .lines()
                .any(|l| l.starts_with(&name) && l.contains(&subnet)),
            "no connected route in\n{routes}"
        );
        // Idempotent: a second run finds the route there and succeeds.
        configure_interface(&name, &net).unwrap();
    }

    #[test]
    fn wait_for_path_gives_up_quickly_on_absent_paths() {
        let started = Instant::now();
        assert!(!wait_for_path(
            Path::new("/nonexistent/sbx-eth0"),
            Duration::from_millis(30)
        ));
        assert!(started.elapsed() < Duration::from_millis(500));
        assert!(wait_for_path(Path::new("/"), Duration::from_millis(1)));
    }
}
