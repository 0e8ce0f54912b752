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

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use tracing::{info, warn};

pub use guest_proto::contract::{
    DEFAULT_MTU, GuestNet, MTU_RANGE, NET_CMDLINE_KEY as CMDLINE_KEY, NetParseError as ParseError,
    parse_cmdline, parse_value,
};

/// The interface the virtio-net device becomes.
pub const INTERFACE: &str = "eth0";
/// Where the resolver configuration goes (`/etc/resolv.conf` links here).
pub const RESOLV_CONF: &str = "/run/resolv.conf";
/// Longest wait for `eth0` to appear.
const IFACE_WAIT: Duration = Duration::from_secs(2);

/// The contents of `/run/resolv.conf` for `net`: the gateway is the only DNS server.
pub fn resolv_conf(net: &GuestNet) -> String {
    format!(
        "# written by the sbx guest agent\nnameserver {}\noptions timeout:2 attempts:2\n",
        net.gateway
    )
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
    fs::write(RESOLV_CONF, resolv_conf(net))
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

    fn std_net() -> GuestNet {
        GuestNet {
            addr: Ipv4Addr::new(192, 168, 127, 2),
            prefix: 24,
            gateway: Ipv4Addr::new(192, 168, 127, 1),
            mtu: DEFAULT_MTU,
        }
    }

    #[test]
    fn resolv_conf_names_the_gateway_only() {
        let conf = resolv_conf(&std_net());
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
