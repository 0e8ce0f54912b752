//! In-guest hardening (PID 1 only): sysctls, `/dev` clean-up, read-only binds, loopback,
//! and the kernel CRNG reseed before each command.
//!
//! Every step is best effort and logged: a kernel without a knob (e.g. no Yama) must not
//! stop the VM from booting. Only the VM tests can check these.
#![allow(unsafe_code)]

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt, symlink};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::mount::{MsFlags, mount};
use tracing::{debug, warn};

/// Sysctls applied at boot: `(path below /proc/sys, value)`.
pub const SYSCTLS: &[(&str, &str)] = &[
    ("kernel/unprivileged_bpf_disabled", "1"),
    ("net/core/bpf_jit_harden", "2"),
    ("kernel/kptr_restrict", "2"),
    ("kernel/dmesg_restrict", "1"),
    // Nobody writes to /dev/kmsg (the agent logs to the console itself): lines there
    // would reach the console the host reads, looking like the kernel's.
    ("kernel/printk_devkmsg", "off"),
    ("kernel/yama/ptrace_scope", "2"),
    ("kernel/perf_event_paranoid", "3"),
    ("kernel/sysrq", "0"),
    ("kernel/unprivileged_userns_clone", "0"),
    ("user/max_user_namespaces", "0"),
    ("vm/unprivileged_userfaultfd", "0"),
    ("fs/protected_symlinks", "1"),
    ("fs/protected_hardlinks", "1"),
    ("fs/protected_fifos", "2"),
    ("fs/protected_regular", "2"),
    ("fs/suid_dumpable", "0"),
    ("kernel/core_pattern", "|/bin/false"),
];

/// Writes [`SYSCTLS`]; returns how many could not be set (missing knobs included).
pub fn apply_sysctls() -> usize {
    let mut failed = 0;
    for (key, value) in SYSCTLS {
        let path = Path::new("/proc/sys").join(key);
        if let Err(err) = fs::write(&path, value) {
            debug!(key, %err, "sysctl not applied");
            failed += 1;
        }
    }
    failed
}

/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Successful [`reseed_crng`] calls in this process.
static CRNG_RESEEDS: AtomicU64 = AtomicU64::new(0);

/// Asks the kernel to reseed its CRNG now, so VMs restored from one snapshot diverge.
/// Needs CAP_SYS_ADMIN; a failure is logged and not counted.
pub fn reseed_crng() {
    if let Err(err) = try_reseed_crng() {
        warn!(%err, "RNDRESEEDCRNG failed");
    }
}

/// [`reseed_crng`] with the error returned (and not logged).
pub fn try_reseed_crng() -> io::Result<()> {
    let file = fs::File::open("/dev/urandom")?;
    // SAFETY: RNDRESEEDCRNG takes no argument; the descriptor is valid for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), RNDRESEEDCRNG as _) };
    if rc == 0 {
        CRNG_RESEEDS.fetch_add(1, Ordering::Relaxed);
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// Mixes `bytes` into the kernel's input pool and credits them as full entropy
/// (`RNDADDENTROPY` with `entropy_count = 8 * len`). Needs CAP_SYS_ADMIN.
pub fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    let len = i32::try_from(bytes.len())
        .ok()
        .filter(|n| *n <= i32::MAX / 8)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "too many entropy bytes"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, built in
    // a u32 buffer so the header and the data are suitably aligned.
    let words = 2 + bytes.len().div_ceil(4);
    let mut info = vec![0u32; words];
    info[0] = (len * 8).cast_unsigned();
    info[1] = len.cast_unsigned();
    for (i, byte) in bytes.iter().enumerate() {
        let word = &mut info[2 + i / 4];
        let mut le = word.to_ne_bytes();
        le[i % 4] = *byte;
        *word = u32::from_ne_bytes(le);
    }
    let file = fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // SAFETY: `info` is a valid rand_pool_info whose buf_size matches the bytes behind it;
    // the kernel only reads it during the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets `CLOCK_REALTIME` to `unix_time_ns`. Needs CAP_SYS_TIME.
pub fn set_realtime(unix_time_ns: u64) -> io::Result<()> {
    let secs = i64::try_from(unix_time_ns / 1_000_000_000)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "time out of range"))?;
    let nanos = i64::try_from(unix_time_ns % 1_000_000_000).unwrap_or(0);
    let ts = nix::sys::time::TimeSpec::new(secs, nanos);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(io::Error::from)
}

/// The kernel part of a resume after a snapshot restore, in order: wall clock, host
/// entropy, CRNG reseed. Stops at the first failure, naming the step.
pub fn resume_kernel(unix_time_ns: u64, entropy: &[u8]) -> io::Result<()> {
    let step = |what: &str, err: io::Error| io::Error::new(err.kind(), format!("{what}: {err}"));
    set_realtime(unix_time_ns).map_err(|e| step("clock_settime(CLOCK_REALTIME)", e))?;
    add_entropy(entropy).map_err(|e| step("RNDADDENTROPY", e))?;
    try_reseed_crng().map_err(|e| step("RNDRESEEDCRNG", e))?;
    Ok(())
}

/// Fresh bytes from the kernel CRNG (`/dev/urandom`).
pub fn kernel_random<const N: usize>() -> io::Result<[u8; N]> {
    use std::io::Read;
    let mut out = [0u8; N];
    fs::File::open("/dev/urandom")?.read_exact(&mut out)?;
    Ok(out)
}

/// How many CRNG reseeds succeeded so far (reported in `Pong`).
pub fn crng_reseeds() -> u64 {
    CRNG_RESEEDS.load(Ordering::Relaxed)
}

/// Brings the loopback interface up (`SIOCGIFFLAGS` / `SIOCSIFFLAGS`).
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags into the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the union member ifru_flags is the one SIOCGIFFLAGS filled in.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes block device nodes and `/dev/{mem,kmem,port}`, and adds the usual symlinks.
pub fn clean_dev(dev: &Path) {
    for name in ["mem", "kmem", "port", "block", "disk"] {
        let path = dev.join(name);
        let _ = fs::remove_file(&path);
        let _ = fs::remove_dir_all(&path);
    }
    if let Ok(entries) = fs::read_dir(dev) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_block_device()) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    // The kernel log and the consoles are root's alone (devtmpfs makes /dev/kmsg 0644):
    // user code can neither read the log nor write forged lines where the host reads.
    if let Ok(entries) = fs::read_dir(dev) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let console = name == "kmsg"
                || name == "console"
                || name.starts_with("hvc")
                || name.starts_with("ttyS")
                || name
                    .strip_prefix("tty")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if console {
                let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o600));
            }
        }
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let _ = symlink(target, dev.join(name));
    }
}

/// Bind-mounts `path` onto itself read-only (nosuid, nodev).
pub fn readonly_bind(path: &Path) -> nix::Result<()> {
    mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
}
