//! The QEMU process: spawn, drain, wait, kill, QMP control, diagnostics.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use sandbox_core::VmId;
use sandbox_core::ports::{ControlCommand, ControlReply, ExitInfo, VmProcess};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, mpsc, watch};
use tracing::Instrument;

use crate::error::QemuError;
use crate::qmp::QmpClient;
use crate::ring::{LineSplitter, SharedRing};

/// Bytes of stderr kept for diagnostics by default.
pub const DEFAULT_STDERR_BYTES: usize = 64 * 1024;

/// Largest in-memory console ring, whatever the spec asks for on disk.
const MAX_CONSOLE_RING: usize = 4 * 1024 * 1024;

/// Longest console line forwarded before it is split.
const MAX_CONSOLE_LINE: usize = 4096;

/// How long the exit watcher waits for the pipes to drain after the process exited.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// How long a killed process may take to disappear after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Run QEMU inside fresh namespaces with util-linux `unshare`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnshareWrap {
    /// The `unshare` binary.
    pub program: PathBuf,
    /// Add `--net` (a network namespace with only loopback).
    pub net: bool,
}

/// Run QEMU as another user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// What to do with QEMU's stdout (the guest console when it is `-chardev stdio`).
#[derive(Debug, Clone, Default)]
pub struct ConsoleCapture {
    /// Bounded log file holding the most recent output.
    pub log_path: Option<PathBuf>,
    /// Bytes kept (in memory and in the log file).
    pub max_bytes: u64,
    /// Live console lines.
    pub lines: Option<mpsc::UnboundedSender<String>>,
}

/// How to start one QEMU process.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// The QEMU binary.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Namespaces wrapper.
    pub unshare: Option<UnshareWrap>,
    /// User to run as.
    pub run_as: Option<RunAs>,
    /// umask for QEMU (sockets it creates), when set.
    pub umask: Option<u32>,
    /// QMP socket for [`VmProcess::control`].
    pub qmp_socket: Option<PathBuf>,
    /// Expected uid of the QMP socket's peer.
    pub qmp_uid: Option<u32>,
    /// Timeout of each QMP command (connect included).
    pub control_timeout: Duration,
    /// stdout handling.
    pub console: ConsoleCapture,
    /// Bytes of stderr kept.
    pub stderr_bytes: usize,
    /// For logs.
    pub vm_id: Option<VmId>,
}

impl ProcessConfig {
    /// A plain process: no wrapper, no user switch, no console log.
    pub fn new(program: impl Into<PathBuf>, args: Vec<OsString>) -> Self {
        Self {
            program: program.into(),
            args,
            unshare: None,
            run_as: None,
            umask: None,
            qmp_socket: None,
            qmp_uid: None,
            control_timeout: Duration::from_secs(5),
            console: ConsoleCapture {
                log_path: None,
                max_bytes: 64 * 1024,
                lines: None,
            },
            stderr_bytes: DEFAULT_STDERR_BYTES,
            vm_id: None,
        }
    }

    /// The program and argv actually executed (with the `unshare` wrapper, if any).
    pub fn command_line(&self) -> (PathBuf, Vec<OsString>) {
        let Some(wrap) = &self.unshare else {
            return (self.program.clone(), self.args.clone());
        };
        let mut args: Vec<OsString> = probes::host::UNSHARE_FLAGS
            .iter()
            .map(OsString::from)
            .collect();
        if wrap.net {
            args.push("--net".into());
        }
        args.push("--".into());
        if let Some(r) = self.run_as {
            // unshare needs its privileges to create the namespaces. The switch to the
            // user happens in `setpriv` (util-linux, beside unshare) just before QEMU:
            // changing credentials clears the parent-death signal, so `unshare --setuid`
            // would lose `--kill-child`; setpriv sets it again after the switch.
            args.extend([
                wrap.program.with_file_name("setpriv").into_os_string(),
                "--reuid".into(),
                r.uid.to_string().into(),
                "--regid".into(),
                r.gid.to_string().into(),
                "--clear-groups".into(),
                "--pdeathsig".into(),
                "KILL".into(),
                "--".into(),
            ]);
        }
        args.push(self.program.clone().into_os_string());
        args.extend(self.args.iter().cloned());
        (wrap.program.clone(), args)
    }
}

/// A running (or exited) QEMU process.
#[derive(Debug)]
pub struct QemuProcess {
    /// QEMU's own pid (inside the wrapper, when there is one).
    pid: u32,
    /// The process group: the pid of what was spawned (QEMU or its wrapper).
    pgid: u32,
    vm_id: Option<VmId>,
    exit: watch::Receiver<Option<ExitInfo>>,
    stderr: SharedRing,
    console: SharedRing,
    qmp_socket: Option<PathBuf>,
    qmp_uid: Option<u32>,
    control_timeout: Duration,
    control_lock: Mutex<()>,
    _stdin: Option<tokio::process::ChildStdin>,
}

fn exit_info(status: std::process::ExitStatus) -> ExitInfo {
    ExitInfo {
        code: status.code(),
        signal: status.signal(),
    }
}

async fn drain_stderr(mut pipe: impl AsyncRead + Unpin, ring: SharedRing) {
    let mut buf = vec![0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => ring.lock().push(&buf[..n]),
        }
    }
}

/// The console log on disk: appended until it would exceed `max`, then rewritten with
/// the newest half (and with the full ring at the end), so it never exceeds `max`.
struct ConsoleLog {
    file: tokio::fs::File,
    written: u64,
    max: u64,
    rotated: bool,
}

impl ConsoleLog {
    async fn open(path: &std::path::Path, max: u64) -> Option<Self> {
        match tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .await
        {
            Ok(file) => Some(Self {
                file,
                written: 0,
                max,
                rotated: false,
            }),
            Err(e) => {
                tracing::warn!(path = %path.display(), %e, "cannot open the console log");
                None
            }
        }
    }

    async fn rewrite(&mut self, content: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncSeekExt;
        self.file.set_len(0).await?;
        self.file.seek(std::io::SeekFrom::Start(0)).await?;
        self.file.write_all(content).await?;
        self.written = content.len() as u64;
        Ok(())
    }

    async fn append(&mut self, data: &[u8], ring: &SharedRing) -> std::io::Result<()> {
        if self.written + data.len() as u64 <= self.max {
            self.file.write_all(data).await?;
            self.written += data.len() as u64;
            return Ok(());
        }
        let keep = usize::try_from(self.max / 2).unwrap_or(usize::MAX);
        let tail = ring.lock().last_bytes(keep);
        self.rotated = true;
        self.rewrite(&tail).await
    }
}

async fn drain_console(
    mut pipe: impl AsyncRead + Unpin,
    ring: SharedRing,
    capture: ConsoleCapture,
) {
    let mut log = match &capture.log_path {
        Some(p) => ConsoleLog::open(p, capture.max_bytes).await,
        None => None,
    };
    let mut lines = capture
        .lines
        .map(|tx| (tx, LineSplitter::new(MAX_CONSOLE_LINE)));
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        ring.lock().push(chunk);
        if let Some(l) = &mut log
            && let Err(e) = l.append(chunk, &ring).await
        {
            tracing::warn!(%e, "console log write failed; log disabled");
            log = None;
        }
        if let Some((tx, splitter)) = &mut lines {
            let mut closed = false;
            splitter.feed(chunk, |line| closed |= tx.send(line).is_err());
            if closed {
                lines = None;
            }
        }
    }
    if let Some((tx, mut splitter)) = lines {
        splitter.finish(|line| {
            let _ = tx.send(line);
        });
    }
    if let Some(mut l) = log {
        let max = usize::try_from(l.max).unwrap_or(usize::MAX);
        let all = ring.lock().last_bytes(max);
        if l.rotated
            && let Err(e) = l.rewrite(&all).await
        {
            tracing::warn!(%e, "console log final write failed");
        }
        let _ = l.file.flush().await;
    }
}

/// The pid of the process `unshare --fork` (pid `wrapper`) forked, waiting up to a
/// second for it to appear. Resource limits must target QEMU itself, not the wrapper.
async fn wrapped_child(wrapper: u32) -> Option<u32> {
    let path = format!("/proc/{wrapper}/task/{wrapper}/children");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => {
                if let Some(pid) = text.split_whitespace().find_map(|p| p.parse().ok()) {
                    return Some(pid);
                }
            }
            // The wrapper is gone (or the kernel lacks CONFIG_PROC_CHILDREN).
            Err(_) => return None,
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

impl QemuProcess {
    /// Spawns the process in its own process group with a silent stdin and stdout/stderr
    /// drained continuously into bounded buffers.
    pub async fn spawn(cfg: ProcessConfig) -> Result<Self, QemuError> {
        let (program, args) = cfg.command_line();
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&args)
            // A pipe that stays open and silent: with `-chardev stdio`, EOF on stdin would
            // make QEMU report the console as closed to the guest.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        if cfg.unshare.is_none()
            && let Some(r) = cfg.run_as
        {
            cmd.uid(r.uid).gid(r.gid);
        }
        crate::sys::install_child_hooks(&mut cmd, cfg.umask);
        let span = tracing::debug_span!("qemu", vm_id = ?cfg.vm_id);
        tracing::debug!(parent: &span, command = %crate::command::render_argv(program.as_os_str(), &args), "spawning");
        let mut child = cmd.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                QemuError::NotFound {
                    program: program.clone(),
                }
            } else {
                QemuError::Spawn {
                    program: program.clone(),
                    source,
                }
            }
        })?;
        let pgid = child.id().unwrap_or(0);
        let pid = if cfg.unshare.is_some() && pgid != 0 {
            wrapped_child(pgid).await.unwrap_or_else(|| {
                tracing::warn!(
                    wrapper = pgid,
                    "cannot find QEMU under unshare; reporting the wrapper's pid"
                );
                pgid
            })
        } else {
            pgid
        };
        let stdin = child.stdin.take();
        let stderr_ring = SharedRing::new(cfg.stderr_bytes);
        let console_cap = usize::try_from(cfg.console.max_bytes)
            .unwrap_or(MAX_CONSOLE_RING)
            .min(MAX_CONSOLE_RING);
        let console_ring = SharedRing::new(console_cap);
        let mut drains = Vec::new();
        if let Some(err) = child.stderr.take() {
            drains.push(tokio::spawn(
                drain_stderr(err, stderr_ring.clone()).instrument(span.clone()),
            ));
        }
        if let Some(out) = child.stdout.take() {
            drains.push(tokio::spawn(
                drain_console(out, console_ring.clone(), cfg.console.clone())
                    .instrument(span.clone()),
            ));
        }
        let (tx, rx) = watch::channel(None);
        // Detached: it lives until the process is reaped.
        tokio::spawn(
            async move {
                let info = match child.wait().await {
                    Ok(status) => exit_info(status),
                    Err(e) => {
                        tracing::warn!(%e, "waiting for QEMU failed");
                        ExitInfo::default()
                    }
                };
                // Let the pipes drain so the tails hold QEMU's last words.
                let _ = tokio::time::timeout(DRAIN_GRACE, futures::future::join_all(drains)).await;
                tracing::debug!(%info, "QEMU exited");
                let _ = tx.send(Some(info));
            }
            .instrument(span),
        );
        Ok(Self {
            pid,
            pgid,
            vm_id: cfg.vm_id,
            exit: rx,
            stderr: stderr_ring,
            console: console_ring,
            qmp_socket: cfg.qmp_socket,
            qmp_uid: cfg.qmp_uid,
            control_timeout: cfg.control_timeout,
            control_lock: Mutex::new(()),
            _stdin: stdin,
        })
    }

    /// The exit status once known.
    pub fn exit_status(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// Waits for the exit (shared by any number of waiters).
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => (*v).unwrap_or_default(),
            // The watcher is gone without a status (runtime shutting down).
            Err(_) => ExitInfo::default(),
        }
    }

    fn signal_group(&self, sig: Signal) {
        if self.pgid == 0 || self.exit_status().is_some() {
            return;
        }
        let Ok(pgid) = i32::try_from(self.pgid) else {
            return;
        };
        match killpg(Pid::from_raw(pgid), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => tracing::warn!(pid = self.pid, %e, ?sig, "killpg failed"),
        }
    }

    /// SIGTERM to the process group, SIGKILL after `grace`. Idempotent.
    pub async fn terminate(&self, grace: Duration) -> Result<ExitInfo, QemuError> {
        let info = self.terminate_spawned(grace).await?;
        // Under the `unshare` wrapper the spawned process is the wrapper; QEMU (pid 1 of
        // its namespace) dies right after it. Return only once QEMU itself is gone, so the
        // caller can remove the work dir without racing it.
        if self.pid != self.pgid {
            let deadline = tokio::time::Instant::now() + KILL_WAIT;
            while pid_alive(self.pid) {
                if tokio::time::Instant::now() >= deadline {
                    return Err(QemuError::KillTimeout {
                        pid: self.pid,
                        after: KILL_WAIT,
                    });
                }
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.pid as i32),
                    Signal::SIGKILL,
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        Ok(info)
    }

    async fn terminate_spawned(&self, grace: Duration) -> Result<ExitInfo, QemuError> {
        if let Some(info) = self.exit_status() {
            return Ok(info);
        }
        self.signal_group(Signal::SIGTERM);
        if let Ok(info) = tokio::time::timeout(grace, self.wait()).await {
            return Ok(info);
        }
        self.signal_group(Signal::SIGKILL);
        tokio::time::timeout(KILL_WAIT, self.wait())
            .await
            .map_err(|_| QemuError::KillTimeout {
                pid: self.pid,
                after: KILL_WAIT,
            })
    }

    /// Loads the device state of a VM started with `-incoming defer` and resumes it.
    pub async fn restore_state(&self, state: &std::path::Path) -> Result<(), QemuError> {
        let (_guard, mut client) = self.monitor().await?;
        client.restore_state(state).await
    }

    /// A fresh, exclusive monitor connection (the QMP server takes one client at a time).
    async fn monitor(&self) -> Result<(tokio::sync::MutexGuard<'_, ()>, QmpClient), QemuError> {
        let Some(socket) = &self.qmp_socket else {
            return Err(QemuError::Qmp {
                socket: PathBuf::new(),
                reason: "this process has no QMP socket".into(),
            });
        };
        if let Some(info) = self.exit_status() {
            return Err(QemuError::Qmp {
                socket: socket.clone(),
                reason: format!("QEMU already exited ({info})"),
            });
        }
        let guard = self.control_lock.lock().await;
        let client = QmpClient::connect(socket, self.qmp_uid, self.control_timeout).await?;
        Ok((guard, client))
    }

    /// Sends one QMP command on a fresh monitor connection.
    pub async fn qmp(&self, cmd: ControlCommand) -> Result<ControlReply, QemuError> {
        let (_guard, mut client) = self.monitor().await?;
        match cmd {
            ControlCommand::Stop => client
                .execute("stop", None)
                .await
                .map(|_| ControlReply::Done),
            ControlCommand::Cont => client
                .execute("cont", None)
                .await
                .map(|_| ControlReply::Done),
            ControlCommand::Quit => client.quit().await.map(|()| ControlReply::Done),
            ControlCommand::QueryStatus => client
                .query_status()
                .await
                .map(|(running, status)| ControlReply::Status { running, status }),
            ControlCommand::Save { state } => {
                client.save_state(&state).await.map(|()| ControlReply::Done)
            }
        }
    }

    /// The last lines of QEMU's stderr.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().tail(40, 8 * 1024)
    }

    /// The last lines of the guest console.
    pub fn console_text(&self) -> String {
        self.console.lock().tail(60, 16 * 1024)
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            tracing::debug!(pid = self.pid, vm_id = ?self.vm_id, "QEMU handle dropped: killing it");
            self.signal_group(Signal::SIGKILL);
        }
    }
}

#[async_trait]
impl VmProcess for QemuProcess {
    /// QEMU's own pid, also when it runs under the `unshare` wrapper (so that limits
    /// attached to this pid apply to QEMU).
    fn pid(&self) -> Option<u32> {
        (self.pid != 0).then_some(self.pid)
    }

    async fn wait_exit(&self) -> ExitInfo {
        self.wait().await
    }

    fn try_exit(&self) -> Option<ExitInfo> {
        self.exit_status()
    }

    async fn kill(&self, grace: Duration) -> sandbox_core::Result<()> {
        self.terminate(grace).await.map(|_| ()).map_err(|e| {
            let err = sandbox_core::Error::from(e).with_operation("kill");
            match self.vm_id {
                Some(id) => err.with_vm(id),
                None => err,
            }
        })
    }

    async fn control(&self, cmd: ControlCommand) -> sandbox_core::Result<ControlReply> {
        self.qmp(cmd).await.map_err(|e| {
            let err = sandbox_core::Error::from(e).with_operation("control");
            match self.vm_id {
                Some(id) => err.with_vm(id),
                None => err,
            }
        })
    }

    fn stderr_tail(&self) -> String {
        self.stderr_text()
    }

    fn console_tail(&self) -> String {
        self.console_text()
    }
}

/// True while `pid` exists and is not a zombie.
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> ProcessConfig {
        ProcessConfig::new("/bin/sh", vec!["-c".into(), script.into()])
    }

    #[tokio::test]
    async fn exit_status_and_stderr_are_reported_to_every_waiter() {
        let p = QemuProcess::spawn(sh("echo 'qemu: could not load kernel' >&2; exit 3"))
            .await
            .unwrap();
        let (a, b) = tokio::join!(p.wait(), p.wait_exit());
        assert_eq!(a.code, Some(3));
        assert_eq!(a, b);
        assert_eq!(p.try_exit(), Some(a));
        assert!(p.stderr_tail().contains("could not load kernel"));
        // kill after exit is a no-op.
        p.kill(Duration::from_millis(10)).await.unwrap();
    }

    #[tokio::test]
    async fn a_flood_of_output_never_stalls_the_process() {
        // 8 MiB on each pipe: far beyond the pipe buffers.
        let p = QemuProcess::spawn(sh(
            "head -c 8388608 /dev/zero | tr '\\0' 'x'; head -c 8388608 /dev/zero | tr '\\0' 'y' >&2; echo; echo done >&2",
        ))
        .await
        .unwrap();
        let info = tokio::time::timeout(Duration::from_secs(30), p.wait())
            .await
            .unwrap();
        assert_eq!(info.code, Some(0));
        assert!(
            p.stderr_tail().ends_with("done"),
            "{}",
            p.stderr_tail().len()
        );
        assert!(p.stderr.lock().len() <= DEFAULT_STDERR_BYTES);
    }

    #[tokio::test]
    async fn term_then_kill_the_whole_group() {
        // The shell ignores TERM; its child sleeps. Both are in the group.
        let p = QemuProcess::spawn(sh("trap '' TERM; sleep 30 & wait"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        let info = p.terminate(Duration::from_millis(300)).await.unwrap();
        assert_eq!(info.signal, Some(9), "{info}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Idempotent.
        assert_eq!(p.terminate(Duration::from_millis(10)).await.unwrap(), info);
    }

    #[tokio::test]
    async fn sigterm_is_enough_for_a_well_behaved_process() {
        let p = QemuProcess::spawn(sh("exec sleep 30")).await.unwrap();
        let info = p.terminate(Duration::from_secs(5)).await.unwrap();
        assert_eq!(info.signal, Some(15));
    }

    #[tokio::test]
    async fn console_is_logged_bounded_and_forwarded_by_line() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("console.log");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut cfg =
            sh("i=0; while [ $i -lt 200 ]; do echo \"line $i\"; i=$((i+1)); done; printf tail");
        cfg.console = ConsoleCapture {
            log_path: Some(log.clone()),
            max_bytes: 256,
            lines: Some(tx),
        };
        let p = QemuProcess::spawn(cfg).await.unwrap();
        p.wait().await;
        let mut got = Vec::new();
        while let Ok(l) = rx.try_recv() {
            got.push(l);
        }
        assert_eq!(got.len(), 201);
        assert_eq!(got[0], "line 0");
        assert_eq!(got[200], "tail");
        let on_disk = std::fs::read_to_string(&log).unwrap();
        assert!(on_disk.len() <= 256, "{}", on_disk.len());
        assert!(on_disk.ends_with("line 199\ntail"), "{on_disk}");
        assert!(p.console_tail().ends_with("line 199\ntail"));
    }

    #[tokio::test]
    async fn missing_program_is_not_found() {
        let err = QemuProcess::spawn(ProcessConfig::new("/nonexistent/qemu", vec![]))
            .await
            .unwrap_err();
        assert!(matches!(err, QemuError::NotFound { .. }), "{err}");
        let e: sandbox_core::Error = err.into();
        assert_eq!(
            e.message(),
            "QEMU not found: install qemu-system-x86 (10.x from bookworm-backports)"
        );
    }

    #[test]
    fn unshare_wrapper_drops_privileges_inside() {
        let mut cfg = ProcessConfig::new("/usr/bin/qemu-system-x86_64", vec!["-S".into()]);
        cfg.unshare = Some(UnshareWrap {
            program: "/usr/bin/unshare".into(),
            net: true,
        });
        cfg.run_as = Some(RunAs { uid: 990, gid: 991 });
        let (prog, args) = cfg.command_line();
        assert_eq!(prog, PathBuf::from("/usr/bin/unshare"));
        let line = crate::command::render_argv(prog.as_os_str(), &args);
        assert_eq!(
            line,
            "/usr/bin/unshare --pid --mount --ipc --uts --fork --kill-child --net -- \
             /usr/bin/setpriv --reuid 990 --regid 991 --clear-groups --pdeathsig KILL -- \
             /usr/bin/qemu-system-x86_64 -S"
        );
    }
}
