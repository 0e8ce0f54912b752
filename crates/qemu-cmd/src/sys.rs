//! The child-side setup that needs `pre_exec` (and so `unsafe`).
#![allow(unsafe_code)]

use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::unistd::Pid;

/// Makes the spawned child die with SIGKILL when the spawning thread's process goes away
/// (`PR_SET_PDEATHSIG`), and sets its umask when given.
///
/// PDEATHSIG fires when the *thread* that forked exits; tokio spawns from runtime worker
/// threads, which live as long as the runtime. Where QEMU supports
/// `-run-with exit-with-parent=on`, that is used as well.
pub(crate) fn install_child_hooks(cmd: &mut tokio::process::Command, umask: Option<u32>) {
    let parent: Pid = nix::unistd::getpid();
    let mask = umask.map(Mode::from_bits_truncate);
    // SAFETY: the closure runs in the forked child before exec. It only makes
    // async-signal-safe system calls (prctl, getppid, umask), allocates nothing, takes no
    // locks and touches no state shared with other threads of the parent.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Some(Signal::SIGKILL))
                .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
            // The parent may have died between fork and prctl: then nobody would reap us.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            if let Some(mask) = mask {
                nix::sys::stat::umask(mask);
            }
            Ok(())
        });
    }
}
