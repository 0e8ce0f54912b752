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

/// One process as `/proc` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    /// Process id.
    pub pid: i32,
    /// Parent process id.
    pub ppid: i32,
    /// Real user id.
    pub uid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
}

/// Which processes an interrupted execution takes down with it (see [`exec_victims`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sweep {
    /// Only processes of this real uid (the user code's); `None`: any.
    pub uid: Option<u32>,
    /// Also processes that were orphaned (reparented to PID 1) during the execution, e.g.
    /// double-forked daemons. Only where every such process belongs to this agent (PID 1
    /// in the VM); never in host mode, where unrelated programs share the machine.
    pub orphans: bool,
}

/// The processes an interrupted execution must kill, besides the REPL itself.
///
/// The rule: a process the user started lives until the session ends, unless a timeout
/// (or cancel) interrupted the execution that started it. A process is the execution's
/// when it started at or after `since` (clock ticks since boot, taken when the execution
/// began) and its nearest ancestor that is older than the execution is the REPL (`repl`)
/// or, with [`Sweep::orphans`], PID 1 (it was orphaned: a daemon that double-forked or
/// `setsid`'d away). Processes forked meanwhile by an older background process descend
/// from that process and are spared.
pub fn exec_victims(procs: &[ProcInfo], repl: i32, since: u64, sweep: Sweep) -> Vec<i32> {
    let by_pid: HashMap<i32, &ProcInfo> = procs.iter().map(|p| (p.pid, p)).collect();
    let mut out = Vec::new();
    for p in procs {
        if p.pid == repl || p.pid <= 1 || p.start_ticks < since {
            continue;
        }
        if sweep.uid.is_some_and(|uid| uid != p.uid) {
            continue;
        }
        let mut cur = p.ppid;
        // Bounded walk: the ancestry of a live process has no cycles, but /proc is read
        // while processes come and go.
        let mut steps = 0;
        let victim = loop {
            steps += 1;
            if cur == repl {
                break true;
            }
            if cur <= 1 || steps > 4096 {
                break sweep.orphans;
            }
            match by_pid.get(&cur) {
                // The parent exited while /proc was read: as good as orphaned.
                None => break sweep.orphans,
                Some(parent) if parent.start_ticks < since => break false,
                Some(parent) => cur = parent.ppid,
            }
        };
        if victim {
            out.push(p.pid);
        }
    }
    out
}

/// Every process in `/proc` (those that vanish while it is read are skipped).
pub fn processes() -> Vec<ProcInfo> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_info)
        .collect()
}

fn proc_info(pid: i32) -> Option<ProcInfo> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (ppid, start_ticks) = parse_stat(&stat)?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    Some(ProcInfo {
        pid,
        ppid,
        uid,
        start_ticks,
    })
}

/// `(ppid, starttime)` from a `/proc/<pid>/stat` line.
fn parse_stat(stat: &str) -> Option<(i32, u64)> {
    // "pid (comm) state ppid ... starttime(22) ...": comm may contain anything, so count
    // fields after the last ')'. Field 3 (state) is the first one there.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((ppid, start))
}

/// Now, in the clock ticks `/proc/<pid>/stat` counts process start times in (since boot).
pub fn boot_ticks() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100);
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|ts| ts.tv_sec() as u64 * hz + ts.tv_nsec() as u64 * hz / 1_000_000_000)
        .unwrap_or_default()
}

/// Sends `sig` to the REPL `repl` and to every process of the execution that started at
/// `since` ([`exec_victims`]), plus those in `earlier` (victims of a previous signal of the
/// same sequence, which may have been orphaned since) that still run. Returns the
/// processes signalled, for the next step of the sequence.
pub fn signal_exec(
    repl: i32,
    since: u64,
    sweep: Sweep,
    earlier: &[ProcInfo],
    sig: Signal,
) -> Vec<ProcInfo> {
    if repl <= 1 {
        return Vec::new();
    }
    // Read the tree before signalling the REPL: once it dies its children are orphaned.
    let all = processes();
    let fresh: HashSet<i32> = exec_victims(&all, repl, since, sweep).into_iter().collect();
    let earlier: HashSet<(i32, u64)> = earlier.iter().map(|p| (p.pid, p.start_ticks)).collect();
    let victims: Vec<ProcInfo> = all
        .into_iter()
        .filter(|p| fresh.contains(&p.pid) || earlier.contains(&(p.pid, p.start_ticks)))
        .collect();
    let _ = kill(Pid::from_raw(repl), sig);
    for p in &victims {
        let _ = kill(Pid::from_raw(p.pid), sig);
    }
    victims
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
    parse_stat(&stat).map(|(ppid, _)| ppid)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, ppid: i32, uid: u32, start_ticks: u64) -> ProcInfo {
        ProcInfo {
            pid,
            ppid,
            uid,
            start_ticks,
        }
    }

    const VM: Sweep = Sweep {
        uid: Some(1000),
        orphans: true,
    };

    #[test]
    fn an_interrupted_exec_takes_its_own_processes_only() {
        let repl = 10;
        let since = 500;
        let procs = [
            p(1, 0, 0, 0),         // the agent
            p(10, 1, 1000, 100),   // the REPL
            p(11, 10, 1000, 200),  // Popen child of an earlier exec: spared
            p(12, 1, 1000, 300),   // daemon of an earlier exec: spared
            p(20, 10, 1000, 500),  // foreground child of this exec
            p(21, 20, 1000, 510),  // its child
            p(22, 1, 1000, 520),   // daemon double-forked by this exec
            p(23, 22, 1000, 530),  // the daemon's child
            p(30, 12, 1000, 540),  // forked meanwhile by the old daemon: spared
            p(31, 30, 1000, 550),  // and its child: spared
            p(32, 11, 1000, 560),  // forked meanwhile by the old Popen child: spared
            p(40, 1, 0, 600),      // a root helper (not user code): spared
            p(41, 999, 1000, 610), // parent already gone: orphaned during this exec
        ];
        let mut v = exec_victims(&procs, repl, since, VM);
        v.sort_unstable();
        assert_eq!(v, [20, 21, 22, 23, 41]);
        // Host mode: orphans are not attributable, only the REPL's descendants go.
        let host = Sweep {
            uid: None,
            orphans: false,
        };
        let mut v = exec_victims(&procs, repl, since, host);
        v.sort_unstable();
        assert_eq!(v, [20, 21]);
    }

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let line = "42 (a) b) (c) S 7 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 12345 1000 10";
        assert_eq!(parse_stat(line), Some((7, 12345)));
        assert_eq!(parse_stat("garbage"), None);
        let me = proc_info(std::process::id() as i32).unwrap();
        assert_eq!(me.uid, nix::unistd::getuid().as_raw());
        assert!(me.start_ticks <= boot_ticks());
        assert!(processes().iter().any(|p| p.pid == me.pid));
    }
}
