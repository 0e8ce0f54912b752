//! Child processes: sandboxed spawning, exit status collection (also as PID 1, where
//! every orphan must be reaped), and killing process groups and trees.
//!
//! Exit statuses are collected in one place so the PID-1 reaper (`waitpid(-1)`) never
//! steals the status of a child the engine is waiting for: [`spawn`] registers the child
//! while holding the registry lock, and whoever reaps it hands the status over through a
//! oneshot channel. Outside PID 1, one small thread per child waits for that pid only, so
//! the agent never reaps processes it did not start (tests run it inside other programs).
#![allow(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;
use tokio::sync::oneshot;

use crate::config::UserIds;

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Exited with this status.
    Exited(i32),
    /// Killed by this signal number.
    Signaled(i32),
}

impl ExitKind {
    /// Shell-style exit code: the status, or 128 + signal.
    pub fn code(self) -> i32 {
        match self {
            ExitKind::Exited(code) => code,
            ExitKind::Signaled(sig) => 128 + sig,
        }
    }
}

type Registry = HashMap<i32, oneshot::Sender<ExitKind>>;

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| Mutex::new(HashMap::new()));
static REAP_ALL: AtomicBool = AtomicBool::new(false);
static CHILD_SPAWNED: Condvar = Condvar::new();

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn dispatch(pid: i32, kind: ExitKind) {
    if let Some(tx) = registry().remove(&pid) {
        let _ = tx.send(kind);
    }
}

fn exit_kind(status: WaitStatus) -> Option<(i32, ExitKind)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), ExitKind::Exited(code))),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), ExitKind::Signaled(sig as i32))),
        _ => None,
    }
}

/// Starts the PID-1 reaper: a thread that collects every child and orphan with
/// `waitpid(-1)`, handing statuses of registered children to their owners. Call once,
/// before spawning anything, only when the agent is PID 1 (or a subreaper).
pub fn start_reaper() -> io::Result<()> {
    if REAP_ALL.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(|| {
            loop {
                // Peek without reaping, then reap under the registry lock: while `spawn`
                // holds the lock, std may still reap a child whose exec failed, and that
                // must not be stolen (std would panic on ECHILD).
                match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                    Ok(status) => {
                        let Some(pid) = status.pid() else {
                            continue;
                        };
                        let mut reg = registry();
                        if let Ok(status) = waitpid(pid, Some(WaitPidFlag::WNOHANG))
                            && let Some((pid, kind)) = exit_kind(status)
                            && let Some(tx) = reg.remove(&pid)
                        {
                            let _ = tx.send(kind);
                        }
                    }
                    Err(Errno::EINTR) => {}
                    Err(_) => {
                        // No children right now: wait for a spawn (orphans can only
                        // appear below a child we started), re-checking every second.
                        let guard = registry();
                        let _ = CHILD_SPAWNED.wait_timeout(guard, Duration::from_secs(1));
                    }
                }
            }
        })
        .map(|_| ())
}

/// Resource and privilege settings applied to a child between fork and exec.
#[derive(Debug, Clone, Default)]
pub struct Sandbox {
    /// Switch to this user (and drop supplementary groups).
    pub user: Option<UserIds>,
    /// `RLIMIT_NPROC` soft and hard limit (clamped to the current hard limit).
    pub nproc: Option<u64>,
    /// Descriptors to install in the child: `(source, target)`. Sources must be
    /// close-on-exec descriptors numbered above every target.
    pub fds: Vec<(RawFd, RawFd)>,
}

impl Sandbox {
    /// Applies the sandbox to `cmd`: new session (so the child leads its own process
    /// group), `PR_SET_NO_NEW_PRIVS`, rlimits, no core dumps, descriptor moves, uid/gid.
    pub fn apply(&self, cmd: &mut Command) {
        if let Some(user) = self.user {
            cmd.uid(user.uid).gid(user.gid);
        }
        let nproc = self.nproc;
        let fds = self.fds.clone();
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (setsid, dup2, prctl, getrlimit, setrlimit) on
        // values captured by copy; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                for &(src, dst) in &fds {
                    if libc::dup2(src, dst) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                let core = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &core);
                if let Some(n) = nproc {
                    let mut cur = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NPROC, &mut cur) == 0 {
                        let n = n.min(cur.rlim_max);
                        let lim = libc::rlimit {
                            rlim_cur: n,
                            rlim_max: n,
                        };
                        if libc::setrlimit(libc::RLIMIT_NPROC, &lim) != 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                }
                Ok(())
            });
        }
    }
}

/// A spawned child whose exit status will be delivered on `exit`.
#[derive(Debug)]
pub struct Spawned {
    /// The child (its pid and piped stdio). Never `wait` on it: use `exit`.
    pub child: Child,
    /// Resolves once the child has been reaped.
    pub exit: oneshot::Receiver<ExitKind>,
}

/// Spawns `cmd` and arranges for its exit status to be collected.
pub fn spawn(cmd: &mut Command) -> io::Result<Spawned> {
    let mut reg = registry();
    let child = cmd.spawn()?;
    let pid = i32::try_from(child.id()).map_err(io::Error::other)?;
    let (tx, rx) = oneshot::channel();
    reg.insert(pid, tx);
    drop(reg);
    if REAP_ALL.load(Ordering::SeqCst) {
        CHILD_SPAWNED.notify_all();
    } else {
        let waiter = std::thread::Builder::new()
            .name(format!("wait-{pid}"))
            .spawn(move || {
                loop {
                    match waitpid(Pid::from_raw(pid), None) {
                        Ok(status) => {
                            if let Some((pid, kind)) = exit_kind(status) {
                                dispatch(pid, kind);
                                return;
                            }
                        }
                        Err(Errno::EINTR) => {}
                        Err(_) => {
                            dispatch(pid, ExitKind::Exited(-1));
                            return;
                        }
                    }
                }
            });
        if let Err(err) = waiter {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            return Err(err);
        }
    }
    Ok(Spawned { child, exit: rx })
}

/// Sends `sig` to process group `pgid` (ignores a group that no longer exists).
pub fn signal_group(pgid: i32, sig: Signal) {
    if pgid > 1 {
        let _ = killpg(Pid::from_raw(pgid), sig);
    }
}

/// Sends `sig` to every descendant of `pid` found in `/proc` (children that left the
/// process group with `setsid` included), then to its process group.
pub fn signal_tree(pid: i32, sig: Signal) {
    if pid <= 1 {
        return;
    }
    for p in descendants(pid) {
        let _ = kill(Pid::from_raw(p), sig);
    }
    signal_group(pid, sig);
}

/// Pids of all descendants of `root` (not including it), from `/proc/*/stat`.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(ppid) = parent_of(pid) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            if seen.insert(c) {
                out.push(c);
                stack.push(c);
            }
        }
    }
    out
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may contain anything, so parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// True when a process with this pid exists (zombies included).
pub fn exists(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// A pipe whose both ends are close-on-exec: `(read, write)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

/// Duplicates `fd` to a close-on-exec descriptor numbered at least `min`.
pub fn dup_above(fd: &OwnedFd, min: RawFd) -> io::Result<OwnedFd> {
    let raw = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) returned a fresh descriptor that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

/// Puts `fd` in non-blocking mode.
pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns; only the O_NONBLOCK flag changes.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// 64 random bits as 16 hex digits (from `/dev/urandom`, falling back to the clock).
pub fn random_hex() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    let ok = fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    if !ok {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        bytes = (nanos ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
