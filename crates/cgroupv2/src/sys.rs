//! `prlimit(2)` on another process (also one of another user, without
//! CAP_SYS_RESOURCE): the only unsafe code of the crate.
#![allow(unsafe_code)]

/// A resource limited with [`set_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resource {
    /// Virtual address space (`RLIMIT_AS`).
    AddressSpace,
    /// CPU time in seconds (`RLIMIT_CPU`).
    Cpu,
    /// Core file size (`RLIMIT_CORE`).
    Core,
}

impl Resource {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::AddressSpace => "RLIMIT_AS",
            Self::Cpu => "RLIMIT_CPU",
            Self::Core => "RLIMIT_CORE",
        }
    }
}

impl Resource {
    fn raw(self) -> libc::__rlimit_resource_t {
        match self {
            Self::AddressSpace => libc::RLIMIT_AS,
            Self::Cpu => libc::RLIMIT_CPU,
            Self::Core => libc::RLIMIT_CORE,
        }
    }
}

/// One `prlimit(2)` call: sets `new` when given, returns the previous limit.
fn prlimit(
    pid: i32,
    resource: Resource,
    new: Option<libc::rlimit>,
) -> std::io::Result<libc::rlimit> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let new_ptr = new
        .as_ref()
        .map_or(std::ptr::null(), |n| n as *const libc::rlimit);
    // SAFETY: `new_ptr` is null or points to an initialized rlimit, and `old` is a valid,
    // writable rlimit; both outlive the call.
    let rc = unsafe { libc::prlimit(pid, resource.raw(), new_ptr, &mut old) };
    if rc == 0 {
        Ok(old)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `prlimit` on a process of another user when this process lacks CAP_SYS_RESOURCE (as
/// in containers that drop it, even for root): the kernel also allows the call when the
/// caller's real uid and gid equal all of the target's ids. A short-lived thread takes
/// the target's ids as its real ids (its effective ids stay, so it needs CAP_SETUID and
/// CAP_SETGID) and makes the call; raw syscalls change only that thread's credentials,
/// and they end with it.
fn prlimit_as_owner(
    pid: i32,
    resource: Resource,
    new: Option<libc::rlimit>,
) -> std::io::Result<libc::rlimit> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let real_id = |key: &str| -> std::io::Result<libc::c_long> {
        crate::procfs::status_values(&status, key)
            .and_then(|mut values| values.next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no {key} in /proc/{pid}/status")))
    };
    let (uid, gid) = (real_id("Uid:")?, real_id("Gid:")?);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let keep: libc::c_long = -1;
                // SAFETY: raw setresgid/setresuid change only the calling thread's
                // credentials (glibc's wrappers would change every thread's); this thread
                // does nothing else and exits right after.
                let rc = unsafe { libc::syscall(libc::SYS_setresgid, gid, keep, keep) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: as above.
                let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, keep, keep) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                prlimit(pid, resource, new)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("prlimit thread panicked")))
    })
}

/// `prlimit`, retried with the target's ids when another user's process refuses it.
fn prlimit_any(
    pid: i32,
    resource: Resource,
    new: Option<libc::rlimit>,
) -> std::io::Result<libc::rlimit> {
    match prlimit(pid, resource, new) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => prlimit_as_owner(pid, resource, new)
            .map_err(|retry| {
                std::io::Error::new(
                    e.kind(),
                    format!("{e}; again with the process owner's ids: {retry}"),
                )
            }),
        other => other,
    }
}

/// The current (soft, hard) limit of `resource` for `pid`.
pub(crate) fn get_limit(pid: i32, resource: Resource) -> std::io::Result<(u64, u64)> {
    prlimit_any(pid, resource, None).map(|old| (old.rlim_cur, old.rlim_max))
}

/// Sets the (soft, hard) limit of `resource` for `pid`.
pub(crate) fn set_limit(pid: i32, resource: Resource, soft: u64, hard: u64) -> std::io::Result<()> {
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    prlimit_any(pid, resource, Some(new)).map(|_| ())
}

/// Clock ticks per second used by `/proc/<pid>/stat` times.
pub(crate) fn clock_ticks() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => u64::try_from(t).unwrap_or(100),
        _ => 100,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;

    use super::*;

    #[test]
    fn limits_reach_another_users_process() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: starting a process as another user needs root");
            return;
        }
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .uid(65534)
            .gid(65534)
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        // Directly when this process has CAP_SYS_RESOURCE, else with the owner's ids.
        let r = set_limit(pid, Resource::AddressSpace, 1 << 32, 1 << 32);
        let got = get_limit(pid, Resource::AddressSpace);
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        r.unwrap();
        assert_eq!(got.unwrap(), (1 << 32, 1 << 32));
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max address space"))
            .unwrap();
        assert!(line.contains("4294967296"), "{line}");
        // The calling thread's own credentials are untouched.
        assert!(nix::unistd::getuid().is_root());
        assert_eq!(nix::unistd::getgid().as_raw(), 0);
    }
}
