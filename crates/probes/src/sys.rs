//! The raw calls the probes need: asking the kernel whether io_uring exists, and reading
//! the time-stamp counter.
#![allow(unsafe_code)]

/// How the kernel answered an `io_uring_setup` that can never succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoUringSyscall {
    /// The syscall exists and is allowed (it failed on its arguments).
    Available,
    /// `ENOSYS`: the kernel has no io_uring.
    NoSys,
    /// `EPERM` (or another errno): disabled by sysctl, seccomp or an LSM.
    Denied(i32),
}

/// Calls `io_uring_setup(0, NULL)`. The kernel rejects it (`EFAULT` reading the params
/// or `EINVAL` for zero entries) when io_uring exists, `ENOSYS` when it does not, and
/// `EPERM` when it is disabled. No ring is ever created.
pub(crate) fn io_uring_syscall() -> IoUringSyscall {
    // SAFETY: io_uring_setup takes (u32 entries, struct io_uring_params *params). With a
    // NULL params pointer the kernel fails with EFAULT (copy_from_user of params) or
    // EINVAL before touching user memory; nothing is written, no fd is created, and the
    // return value is only inspected.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_io_uring_setup,
            0 as libc::c_uint,
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if ret >= 0 {
        // Cannot happen with these arguments; close the fd defensively.
        // SAFETY: `ret` is a file descriptor the kernel just returned to us and that
        // nothing else owns.
        unsafe {
            libc::close(ret as libc::c_int);
        }
        return IoUringSyscall::Available;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENOSYS) => IoUringSyscall::NoSys,
        Some(libc::EFAULT) | Some(libc::EINVAL) => IoUringSyscall::Available,
        Some(other) => IoUringSyscall::Denied(other),
        None => IoUringSyscall::Denied(0),
    }
}

/// The CPU's time-stamp counter.
#[cfg(target_arch = "x86_64")]
pub(crate) fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads a counter into registers; it touches no memory and every
    // x86_64 CPU has it.
    unsafe { std::arch::x86_64::_rdtsc() }
}
