//! PID 1 duties inside the VM: early mounts, switching to the root image, the tmpfs
//! mounts, hardening, and power-off.
//!
//! Sequence ([`boot`]):
//!
//! 1. devtmpfs on `/dev`, console on fds 0–2 if the kernel left them closed, `proc`
//!    (`hidepid=2`) and `sysfs`;
//! 2. wait (≤ 5 s) for `/dev/vda`, mount it read-only (EROFS, falling back to ext4) on
//!    `/newroot`, move `/dev`, `/proc`, `/sys` below it, `MS_MOVE` it onto `/` and chroot
//!    (switch_root style: the agent keeps running from memory);
//! 3. tmpfs on `/tmp` (50 % of RAM, 1777, inode limit) and `/dev/shm` (40 %, noexec);
//!    `/home/user` on the host's ext4 home disk when one is attached (virtio serial
//!    [`guest_proto::HOME_DISK_SERIAL`]), else a tmpfs (40 % of RAM, owned by 1000:1000);
//!    all nosuid,nodev, tmpfs with per-user quota where the kernel supports it; `devpts`;
//! 4. `/dev` clean-up (no block devices, no `/dev/mem|kmem|port`), sysctls, loopback up,
//!    `eth0`, default route and `/run/resolv.conf` when the kernel command line carries
//!    `sbx.net=` ([`crate::net`]), read-only binds over `/proc/sys` and
//!    `/proc/sysrq-trigger`, then `/dev` read-only;
//! 5. the reaper thread, the CRNG reseed, and the time from kernel start to here, which
//!    `Pong` reports as `boot_ms` (and the time this sequence took as `setup_us`).
//!
//! The root image is read-only (so is `/etc/hosts`; `/etc/resolv.conf` links to
//! `/run/resolv.conf`, on a tmpfs the network setup mounts).
#![allow(unsafe_code)]

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use nix::sys::stat::Mode;
use nix::unistd::{chdir, chroot};
use tracing::{info, warn};

use crate::config::{AgentConfig, UserIds};
use crate::hardening;

/// True when this process is PID 1.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    let _ = fs::create_dir_all(target);
    mount(Some(source), target, Some(fstype), flags, data).map_err(|err| {
        io::Error::other(format!(
            "mount {fstype} on {target} ({data:?}): {}",
            err.desc()
        ))
    })
}

/// Mounts a tmpfs, first with per-user quota options, then without them.
fn mount_tmpfs(target: &str, flags: MsFlags, opts: &str) -> io::Result<()> {
    let with_quota = format!("{opts},usrquota");
    mount_fs("tmpfs", target, "tmpfs", flags, Some(&with_quota))
        .or_else(|_| mount_fs("tmpfs", target, "tmpfs", flags, Some(opts)))
}

fn mem_total_kib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(512 * 1024)
}

/// Puts the console on fds 0–2 when the kernel started us without them.
fn ensure_console() {
    // SAFETY: F_GETFD only queries whether descriptor 0 is open.
    if unsafe { libc::fcntl(0, libc::F_GETFD) } >= 0 {
        return;
    }
    for dev in ["/dev/console", "/dev/hvc0"] {
        if let Ok(file) = fs::OpenOptions::new().read(true).write(true).open(dev) {
            let fd = file.as_raw_fd();
            for target in 0..3 {
                if fd != target {
                    // SAFETY: dup2 onto the standard descriptors, which are closed.
                    unsafe { libc::dup2(fd, target) };
                }
            }
            if fd > 2 {
                drop(file);
            } else {
                // The console landed on one of 0-2 itself: keep it open.
                std::mem::forget(file);
            }
            return;
        }
    }
}

fn wait_for(path: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    path.exists()
}

/// Mounts the root image and switches to it.
fn switch_root() -> io::Result<()> {
    if !wait_for(Path::new("/dev/vda"), Duration::from_secs(5)) {
        return Err(io::Error::other("/dev/vda did not appear"));
    }
    let ro = MsFlags::MS_RDONLY | MsFlags::MS_NOATIME | NOSUID_NODEV;
    mount_fs("/dev/vda", "/newroot", "erofs", ro, None)
        .or_else(|_| mount_fs("/dev/vda", "/newroot", "ext4", ro, Some("noload")))?;
    for dir in ["dev", "proc", "sys"] {
        let target = format!("/newroot/{dir}");
        mount(
            Some(format!("/{dir}").as_str()),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| io::Error::other(format!("move /{dir}: {}", e.desc())))?;
    }
    // Free the initramfs copy of the agent; the running image stays mapped.
    let _ = fs::remove_file("/init");
    chdir("/newroot").map_err(io::Error::from)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| io::Error::other(format!("move newroot: {}", e.desc())))?;
    chroot(".").map_err(io::Error::from)?;
    chdir("/").map_err(io::Error::from)?;
    Ok(())
}

/// The block device (`vdX`) whose virtio serial is [`guest_proto::HOME_DISK_SERIAL`],
/// looked up below `sys_block` (`/sys/block`).
pub fn find_home_disk(sys_block: &Path) -> Option<String> {
    find_disk(sys_block, guest_proto::HOME_DISK_SERIAL)
}

/// Mounts the host's read-only package layer `/dev/<dev>` (EROFS) on
/// [`guest_proto::PACKAGE_MOUNT`]: read-only, nosuid, nodev; its files are root's, so
/// user code can neither write to them nor remount them.
fn mount_package_layer(dev: &str) -> io::Result<()> {
    mount_fs(
        &format!("/dev/{dev}"),
        guest_proto::PACKAGE_MOUNT,
        "erofs",
        NOSUID_NODEV | MsFlags::MS_RDONLY | MsFlags::MS_NOATIME,
        None,
    )
}

/// The block device (`vdX`) whose virtio serial is `serial`, below `sys_block`.
pub fn find_disk(sys_block: &Path, serial: &str) -> Option<String> {
    let mut names: Vec<String> = fs::read_dir(sys_block)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("vd"))
        .collect();
    names.sort();
    names.into_iter().find(|n| {
        fs::read_to_string(sys_block.join(n).join("serial"))
            .is_ok_and(|s| s.trim_end_matches(['\0', '\n']) == serial)
    })
}

/// Mounts the host-made ext4 home disk `/dev/<dev>` on `/home/user` (nosuid, nodev; the
/// host formatted it with the user as the owner of its root) and removes `lost+found`,
/// which would show in every listing.
fn mount_home_disk(dev: &str) -> io::Result<()> {
    let flags = NOSUID_NODEV | MsFlags::MS_NOATIME;
    // noinit_itable: no background zeroing of inode tables (the host's image is sparse,
    // the tables read as zeros already); under TCG that work would compete with the code.
    mount_fs(
        &format!("/dev/{dev}"),
        "/home/user",
        "ext4",
        flags,
        Some("noinit_itable,errors=remount-ro"),
    )?;
    let _ = fs::remove_dir("/home/user/lost+found");
    Ok(())
}

/// Guest time per setup phase, for the `guest ready` log line.
struct Phases {
    last: Instant,
    marks: Vec<String>,
}

impl Phases {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            marks: Vec::new(),
        }
    }

    /// Ends the phase called `name`.
    fn mark(&mut self, name: &str) {
        let now = Instant::now();
        self.marks
            .push(format!("{name}={}us", (now - self.last).as_micros()));
        self.last = now;
    }
}

/// Does everything PID 1 must do before serving; returns the agent configuration.
pub fn boot() -> AgentConfig {
    let started = Instant::now();
    let mut phases = Phases::new();
    let _ = mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    );
    ensure_console();
    if let Err(err) = mount_fs(
        "proc",
        "/proc",
        "proc",
        NOSUID_NODEV | MsFlags::MS_NOEXEC,
        Some("hidepid=2"),
    ) {
        warn!(%err, "proc");
    }
    if let Err(err) = mount_fs(
        "sysfs",
        "/sys",
        "sysfs",
        NOSUID_NODEV | MsFlags::MS_NOEXEC,
        None,
    ) {
        warn!(%err, "sysfs");
    }
    phases.mark("early_mounts");
    if let Err(err) = switch_root() {
        warn!(%err, "cannot switch to the root image; staying in the initramfs");
    }
    phases.mark("switch_root");
    let cfg = AgentConfig::vm();
    let mem = mem_total_kib();
    let user = UserIds::VM_USER;
    let tmp = format!("size={}k,nr_inodes=16384,mode=1777", mem / 2);
    if let Err(err) = mount_tmpfs("/tmp", NOSUID_NODEV, &tmp) {
        warn!(%err, "/tmp");
    }
    let shm = format!("size={}k,mode=1777", mem * 2 / 5);
    if let Err(err) = mount_tmpfs("/dev/shm", NOSUID_NODEV | MsFlags::MS_NOEXEC, &shm) {
        warn!(%err, "/dev/shm");
    }
    let on_disk = match find_home_disk(Path::new("/sys/block")) {
        Some(dev) => match mount_home_disk(&dev) {
            Ok(()) => true,
            Err(err) => {
                warn!(%err, dev, "home disk; falling back to a tmpfs home");
                false
            }
        },
        None => false,
    };
    if !on_disk {
        let home = format!(
            "size={}k,mode=0755,uid={},gid={}",
            mem * 2 / 5,
            user.uid,
            user.gid
        );
        if let Err(err) = mount_tmpfs("/home/user", NOSUID_NODEV, &home) {
            warn!(%err, "/home/user");
        }
    }
    let packages = match find_disk(Path::new("/sys/block"), guest_proto::PACKAGE_DISK_SERIAL) {
        Some(dev) => match mount_package_layer(&dev) {
            Ok(()) => true,
            Err(err) => {
                warn!(%err, dev, "package layer not mounted");
                false
            }
        },
        None => false,
    };
    let _ = mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        NOSUID_NODEV.union(MsFlags::MS_NOEXEC),
        Some("newinstance,ptmxmode=0666,mode=0620"),
    );
    phases.mark("tmpfs");
    hardening::clean_dev(Path::new("/dev"));
    let failed = hardening::apply_sysctls();
    if failed > 0 {
        info!(failed, "some sysctls are not available in this kernel");
    }
    if let Err(err) = hardening::loopback_up() {
        warn!(%err, "loopback");
    }
    phases.mark("dev_sysctl_lo");
    crate::net::boot();
    phases.mark("net");
    for path in ["/proc/sys", "/proc/sysrq-trigger"] {
        if let Err(err) = hardening::readonly_bind(Path::new(path)) {
            warn!(path, err = %err.desc(), "read-only bind");
        }
    }
    if let Err(err) = mount(
        None::<&str>,
        "/dev",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
        Some("mode=0755"),
    ) {
        warn!(err = %err.desc(), "/dev read-only");
    }
    let _ = nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
    phases.mark("read_only");
    if let Err(err) = crate::process::start_reaper() {
        warn!(%err, "reaper");
    }
    hardening::reseed_crng();
    phases.mark("reaper_crng");
    let setup_us = started.elapsed().as_micros() as u64;
    let boot_ms = boottime_ms();
    info!(setup_us, boot_ms, phases = %phases.marks.join(" "), "guest ready");
    AgentConfig {
        boot_ms: Some(boot_ms),
        setup_us: Some(setup_us),
        package_dir: packages.then(|| guest_proto::PACKAGE_DIR.into()),
        ..cfg
    }
}

/// Milliseconds since the kernel started (`CLOCK_BOOTTIME`).
pub fn boottime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|ts| ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000)
        .unwrap_or_default()
}

/// Syncs and powers the machine off (PID 1 only). Never returns.
///
/// The microvm machine has no ACPI, so `RB_POWER_OFF` would only halt the CPU. The kernel
/// runs with `reboot=t` and QEMU with `-no-reboot`: a reboot (triple fault) makes QEMU
/// exit, which is the power-off the host waits for.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // If the reboot call failed there is nothing sensible left to do: idle forever
    // (PID 1 must not exit, which would panic the kernel).
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_home_disk_is_found_by_its_serial() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path();
        for (name, serial) in [("vda", ""), ("vdb", "sbx-home"), ("loop0", "sbx-home")] {
            fs::create_dir(sys.join(name)).unwrap();
            fs::write(sys.join(name).join("serial"), format!("{serial}\n")).unwrap();
        }
        assert_eq!(find_home_disk(sys).as_deref(), Some("vdb"));
        assert_eq!(find_disk(sys, guest_proto::PACKAGE_DISK_SERIAL), None);
        fs::write(sys.join("vdb/serial"), "other\n").unwrap();
        assert_eq!(find_home_disk(sys), None);
        assert_eq!(find_home_disk(&sys.join("missing")), None);
    }
}
