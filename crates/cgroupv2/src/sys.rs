//! `prlimit(2)` on another process: the only unsafe code of the crate.
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

/// The current (soft, hard) limit of `resource` for `pid`.
pub(crate) fn get_limit(pid: i32, resource: Resource) -> std::io::Result<(u64, u64)> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let rc = match resource {
        // SAFETY: a null new_limit only reads the limit; `old` is a valid, writable rlimit
        // that lives for the whole call.
        Resource::AddressSpace => unsafe {
            libc::prlimit(pid, libc::RLIMIT_AS, std::ptr::null(), &mut old)
        },
        // SAFETY: as above.
        Resource::Cpu => unsafe {
            libc::prlimit(pid, libc::RLIMIT_CPU, std::ptr::null(), &mut old)
        },
        // SAFETY: as above.
        Resource::Core => unsafe {
            libc::prlimit(pid, libc::RLIMIT_CORE, std::ptr::null(), &mut old)
        },
    };
    if rc == 0 {
        Ok((old.rlim_cur, old.rlim_max))
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets the (soft, hard) limit of `resource` for `pid`.
pub(crate) fn set_limit(pid: i32, resource: Resource, soft: u64, hard: u64) -> std::io::Result<()> {
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    let rc = match resource {
        // SAFETY: `new` is an initialized rlimit that outlives the call; a null old_limit
        // is allowed by prlimit(2) and means the old value is not returned.
        Resource::AddressSpace => unsafe {
            libc::prlimit(pid, libc::RLIMIT_AS, &new, std::ptr::null_mut())
        },
        // SAFETY: as above.
        Resource::Cpu => unsafe {
            libc::prlimit(pid, libc::RLIMIT_CPU, &new, std::ptr::null_mut())
        },
        // SAFETY: as above.
        Resource::Core => unsafe {
            libc::prlimit(pid, libc::RLIMIT_CORE, &new, std::ptr::null_mut())
        },
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Clock ticks per second used by `/proc/<pid>/stat` times.
pub(crate) fn clock_ticks() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => u64::try_from(t).unwrap_or(100),
        _ => 100,
    }
}
