//! One persistent interpreter process per language, and the completion protocol with it.
//!
//! # Completion detection
//!
//! The REPL wrapper (`src/wrappers/`) runs with four private pipes besides stdin
//! (`/dev/null`):
//!
//! - fd 1 / fd 2: stdout and stderr, read by the agent and streamed as they arrive;
//! - fd 3: the control pipe. The agent writes one request at a time, length-prefixed
//!   (JSON `{id, code, env}` for Python and JavaScript; a header line with three lengths
//!   for bash);
//! - fd 4: the status pipe. When the code has finished and the wrapper has flushed its
//!   output, it writes `"<id> <exit code>\n"` there.
//!
//! The status never travels on stdout/stderr, so nothing user code prints can end an
//! execution early. `id` is 64 random bits chosen per execution; status lines with another
//! id are ignored, so stray bytes written to fd 4 by a leftover background process cannot
//! complete a later execution either. The wrappers mark fds 3/4 close-on-exec (Python,
//! Node) or close them for the user code (bash), and only the wrapper process itself may
//! report: it compares its pid with the one it started with, and a forked child that
//! returns into the loop exits without writing.
//!
//! A status line is a claim, not the proof: the wrapper shares its process with the user
//! code, which can read the request (and its id) from the wrapper's own frame and write
//! `<id> 0` to fd 4 itself. No secret held in that process is out of the code's reach, so
//! the proof comes from the kernel instead: an execution ends only once the interpreter is
//! back in the wrapper's wait for the next request, as `/proc/<pid>/task/*/syscall` shows
//! it (readable only by the agent: the REPL is non-dumpable): its main thread blocked in
//! `read` on the control pipe (Python, bash), or idle in `epoll_wait` with a thread
//! blocked in `read` on the control pipe (Node). Code that forges a status and keeps
//! running is not there, so its execution goes on (and times out as usual); code that
//! forges it and then waits on the control pipe itself has stopped running, the same as
//! returning (see `waiting_for_request`). The wrapper reaches that wait microseconds
//! after writing its status; the agent looks at once and then at growing intervals.
//!
//! Because the wrapper flushes stdout/stderr before it writes the status, every byte the
//! code produced is already in the pipes when the status arrives: the agent then drains
//! them without blocking and ends the execution. Nothing waits for a pipe's EOF or for a
//! quiet period, so background processes that keep the pipes open cannot delay an
//! execution, and there is no timer in the completion path.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use guest_proto::limits::{MAX_STDERR_BYTES, MAX_STDOUT_BYTES, is_shell_identifier};
use guest_proto::{GuestMessage, Language};
use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, JsRuntime};
use crate::process::{self, ExitKind, Sandbox, Sweep};
use crate::server::Outbox;

const PYTHON_WRAPPER: &str = include_str!("wrappers/python.py");
const NODE_WRAPPER: &str = include_str!("wrappers/node.js");
const BUN_WRAPPER: &str = include_str!("wrappers/bun.js");
const BASH_WRAPPER: &str = include_str!("wrappers/bash.sh");

/// Size of one read from the output pipes (and so the largest output chunk).
const READ_BYTES: usize = guest_proto::CHUNK_BYTES;
/// Most bytes drained from one pipe after completion (a background writer could
/// otherwise keep the drain going forever).
const DRAIN_LIMIT: usize = 4 * 1024 * 1024;
/// How long to wait for a REPL to die after SIGKILL before giving up on it.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// First and longest pause between two looks at whether the interpreter waits for the
/// next request, after it reported a status.
const IDLE_POLL_FIRST: Duration = Duration::from_micros(100);
const IDLE_POLL_MAX: Duration = Duration::from_millis(10);

/// Why an execution was interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// The timeout expired.
    Timeout,
    /// The host cancelled it.
    Cancel,
}

/// What happened to one execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// Exit status reported by the wrapper, or from the REPL's death (`None` when it
    /// could not be determined, e.g. the REPL was killed after a timeout).
    pub status: Option<i32>,
    /// The REPL process died (or must be replaced).
    pub repl_dead: bool,
    /// The execution was interrupted.
    pub interrupted: Option<Interrupt>,
    /// stdout went over [`MAX_STDOUT_BYTES`].
    pub stdout_over: bool,
    /// stderr went over [`MAX_STDERR_BYTES`].
    pub stderr_over: bool,
}

/// One request for the wrapper.
#[derive(Debug, Clone)]
pub struct ReplRequest<'a> {
    /// The code (validated).
    pub code: &'a str,
    /// Environment for this execution only (validated).
    pub env: &'a [(String, String)],
    /// Instead of running code, reseed the interpreter's generators from the kernel
    /// (Python and JavaScript; bash gets `RANDOM=<n>` as its code, see [`Repl::reseed`]).
    pub reseed: bool,
}

/// A running interpreter with its pipes.
#[derive(Debug)]
pub struct Repl {
    language: Language,
    pid: i32,
    ctl: AsyncFd<OwnedFd>,
    out: AsyncFd<OwnedFd>,
    err: AsyncFd<OwnedFd>,
    status: AsyncFd<OwnedFd>,
    /// Inode of the control pipe (`pipe:[ino]` in `/proc/<pid>/fd`).
    ctl_ino: u64,
    exit: oneshot::Receiver<ExitKind>,
    exited: Option<ExitKind>,
    sweep: Sweep,
    /// The engine's resume epoch this interpreter's generators are seeded for.
    seed_epoch: u64,
    /// The wall clock when the interpreter was started.
    started_wall: std::time::SystemTime,
}

fn interpreter_command(language: Language, cfg: &AgentConfig) -> Command {
    match language {
        Language::Python => {
            let mut cmd = Command::new(&cfg.python);
            cmd.args(["-q", "-c", PYTHON_WRAPPER]);
            cmd
        }
        Language::Javascript => {
            let mut cmd = Command::new(&cfg.node);
            match cfg.js_runtime() {
                // --smol: a smaller heap, collected more often; --no-install: a missing
                // package is an error, never fetched at run time.
                JsRuntime::Bun => cmd.args(["--smol", "--no-install", "-e", BUN_WRAPPER]),
                JsRuntime::Node => cmd.args(["--expose-internals", "-e", NODE_WRAPPER]),
            };
            cmd
        }
        Language::Raw => {
            let mut cmd = Command::new(&cfg.bash);
            cmd.args(["--norc", "--noprofile", "-c", BASH_WRAPPER, "bash"]);
            cmd
        }
    }
}

/// The environment every user process starts with.
pub fn base_env(cfg: &AgentConfig) -> Vec<(String, String)> {
    let root = cfg.root.display().to_string();
    let mut python_path = cfg.python_packages_dir().display().to_string();
    let mut node_path = cfg.node_prefix().join("node_modules").display().to_string();
    let mut path = cfg.path_env.clone();
    if let Some(dir) = &cfg.package_dir {
        let d = dir.display();
        python_path.push_str(&format!(":{d}/python"));
        node_path.push_str(&format!(":{d}/node_modules"));
        path.push_str(&format!(":{d}/python/bin:{d}/node_modules/.bin"));
    }
    vec![
        ("PATH".into(), path),
        ("HOME".into(), root.clone()),
        ("USER".into(), "user".into()),
        ("LOGNAME".into(), "user".into()),
        ("SHELL".into(), cfg.bash.display().to_string()),
        ("LANG".into(), "C.UTF-8".into()),
        ("TERM".into(), "dumb".into()),
        ("TMPDIR".into(), cfg.temp_dir.display().to_string()),
        ("PYTHONPATH".into(), python_path),
        ("PYTHONUSERBASE".into(), format!("{root}/.local")),
        // No integer/string conversion limit (`str(10**100000)` works), as in the original
        // system; user code may set one (sys.set_int_max_str_digits, or this variable).
        ("PYTHONINTMAXSTRDIGITS".into(), "0".into()),
        ("NODE_PATH".into(), node_path),
        ("npm_config_cache".into(), format!("{root}/.npm")),
    ]
}

fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    process::set_nonblocking(&fd)?;
    // SAFETY: the OwnedFd moves into the AsyncFd and stays open for its whole lifetime.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

enum Read {
    Data(usize),
    Eof,
    WouldBlock,
}

fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Read> {
    loop {
        match nix::unistd::read(fd, buf) {
            Ok(0) => return Ok(Read::Eof),
            Ok(n) => return Ok(Read::Data(n)),
            Err(nix::errno::Errno::EAGAIN) => return Ok(Read::WouldBlock),
            Err(nix::errno::Errno::EINTR) => {}
            Err(err) => return Err(err.into()),
        }
    }
}

/// Output counting against a cap.
#[derive(Debug)]
struct Capped {
    total: usize,
    cap: usize,
    over: bool,
    is_err: bool,
}

impl Capped {
    fn new(cap: usize, is_err: bool) -> Self {
        Self {
            total: 0,
            cap,
            over: false,
            is_err,
        }
    }

    async fn forward(&mut self, data: &[u8], out: &Outbox) {
        if self.over || data.is_empty() {
            return;
        }
        let room = self.cap - self.total;
        let take = if data.len() > room {
            self.over = true;
            room
        } else {
            data.len()
        };
        self.total += take;
        if take > 0 {
            let chunk = Bytes::copy_from_slice(&data[..take]);
            let msg = if self.is_err {
                GuestMessage::Stderr(chunk)
            } else {
                GuestMessage::Stdout(chunk)
            };
            out.send(msg).await;
        }
    }
}

/// Completion state: how far the termination sequence has gone.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Running { deadline: Instant },
    Terminating { kill_at: Instant },
    Killed { give_up_at: Instant },
}

impl Phase {
    fn next(self) -> Instant {
        match self {
            Phase::Running { deadline } => deadline,
            Phase::Terminating { kill_at } => kill_at,
            Phase::Killed { give_up_at } => give_up_at,
        }
    }
}

impl Repl {
    /// Starts the interpreter for `language`.
    pub fn spawn(language: Language, cfg: &AgentConfig) -> io::Result<Repl> {
        let (ctl_r, ctl_w) = process::pipe()?;
        let ctl_ino = nix::sys::stat::fstat(&ctl_w)?.st_ino;
        let (st_r, st_w) = process::pipe()?;
        let ctl_child = process::dup_above(&ctl_r, 10)?;
        let st_child = process::dup_above(&st_w, 10)?;
        drop(ctl_r);
        drop(st_w);
        let mut cmd = interpreter_command(language, cfg);
        cmd.env_clear()
            .envs(base_env(cfg))
            .current_dir(&cfg.root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Sandbox {
            user: cfg.user,
            nproc: Some(cfg.nproc),
            fds: vec![(ctl_child.as_raw_fd(), 3), (st_child.as_raw_fd(), 4)],
        }
        .apply(&mut cmd);
        let mut spawned = process::spawn(&mut cmd)?;
        drop(ctl_child);
        drop(st_child);
        let pid = i32::try_from(spawned.child.id()).map_err(io::Error::other)?;
        let (Some(stdout), Some(stderr)) =
            (spawned.child.stdout.take(), spawned.child.stderr.take())
        else {
            process::signal_group(pid, Signal::SIGKILL);
            return Err(io::Error::other("interpreter started without piped stdio"));
        };
        Ok(Repl {
            language,
            pid,
            ctl: async_fd(ctl_w)?,
            out: async_fd(OwnedFd::from(stdout))?,
            err: async_fd(OwnedFd::from(stderr))?,
            status: async_fd(st_r)?,
            ctl_ino,
            exit: spawned.exit,
            exited: None,
            sweep: Sweep {
                uid: cfg.user.map(|u| u.uid),
                orphans: cfg.pid1 && cfg.user.is_some(),
            },
            seed_epoch: 0,
            started_wall: std::time::SystemTime::now(),
        })
    }

    /// The resume epoch this interpreter's generators are seeded for (see
    /// [`Engine::resume`](crate::Engine::resume)).
    pub fn seed_epoch(&self) -> u64 {
        self.seed_epoch
    }

    /// Records that the generators are seeded for `epoch` (a fresh process is seeded for
    /// the epoch current when it started; [`reseed`](Self::reseed) moves it on).
    pub fn set_seed_epoch(&mut self, epoch: u64) {
        self.seed_epoch = epoch;
    }

    /// True when the wall clock now reads earlier than when the interpreter started: a
    /// resume moved it back past the start. OpenSSL 3 reseeds a DRBG at its next use when
    /// the clock reads earlier than the DRBG's last (re)seed, so every DRBG this
    /// interpreter instantiated reseeds by itself from the kernel CRNG.
    pub fn clock_went_back_past_start(&self) -> bool {
        std::time::SystemTime::now() < self.started_wall
    }

    /// Overrides the recorded start (tests).
    #[doc(hidden)]
    pub fn set_started_wall(&mut self, at: std::time::SystemTime) {
        self.started_wall = at;
    }

    /// Makes the interpreter reseed its random generators from the kernel CRNG, after a
    /// snapshot restore gave every clone the same interpreter state:
    ///
    /// - Python: `random.seed()` (from `os.urandom`), numpy's global generator when
    ///   `numpy.random` is loaded, and `tempfile`'s name sequence;
    /// - JavaScript: `Math.random` is replaced by a generator that reads `/dev/urandom`,
    ///   and `crypto.randomUUID` / `getRandomValues` / `randomBytes` / `randomFillSync` /
    ///   `randomFill` / `randomInt` (also on `webcrypto`) draw from `/dev/urandom` too,
    ///   instead of OpenSSL's DRBG and Node's UUID cache, whose states are cloned;
    /// - bash: `RANDOM=<32 bits from the kernel>` (`SRANDOM` reads the kernel itself).
    ///
    /// Status 0 means reseeded; anything else means the REPL must be replaced.
    pub async fn reseed(&mut self, deadline: Instant, grace: Duration) -> io::Result<RunOutcome> {
        let bash_code;
        let (code, reseed) = match self.language {
            Language::Raw => {
                let value = u32::from_ne_bytes(crate::hardening::kernel_random::<4>()?);
                bash_code = format!("RANDOM={value}");
                (bash_code.as_str(), false)
            }
            Language::Python | Language::Javascript => ("", true),
        };
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let sink = Outbox::detached(tx);
        Ok(self
            .run(
                &ReplRequest {
                    code,
                    env: &[],
                    reseed,
                },
                &sink,
                deadline,
                grace,
                &CancellationToken::new(),
            )
            .await)
    }

    /// The interpreter's pid (also its process group and session id).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The language this REPL runs.
    pub fn language(&self) -> Language {
        self.language
    }

    /// False once the interpreter is known to have exited.
    pub fn is_alive(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.exit.try_recv() {
            Ok(kind) => {
                self.exited = Some(kind);
                false
            }
            Err(oneshot::error::TryRecvError::Empty) => true,
            Err(oneshot::error::TryRecvError::Closed) => {
                self.exited = Some(ExitKind::Exited(-1));
                false
            }
        }
    }

    /// Kills the interpreter process. Processes it started stay: background processes
    /// live until the session ends (an interrupted execution kills its own ones first,
    /// see [`Repl::run`]).
    pub fn kill(&self) {
        if self.pid > 1 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), Signal::SIGKILL);
        }
    }

    fn encode(&self, id: &str, req: &ReplRequest<'_>) -> Vec<u8> {
        match self.language {
            Language::Python | Language::Javascript => {
                let json = if req.reseed {
                    serde_json::json!({ "id": id, "reseed": true })
                } else {
                    serde_json::json!({ "id": id, "code": req.code, "env": req.env })
                };
                let body = json.to_string();
                let mut out = format!("{}\n", body.len()).into_bytes();
                out.extend_from_slice(body.as_bytes());
                out
            }
            Language::Raw => {
                let (pre, post) = bash_env_snippets(req.env);
                let mut out =
                    format!("{id} {} {} {}\n", pre.len(), req.code.len(), post.len()).into_bytes();
                out.extend_from_slice(pre.as_bytes());
                out.extend_from_slice(req.code.as_bytes());
                out.extend_from_slice(post.as_bytes());
                out
            }
        }
    }

    /// Discards output left in the pipes by background processes since the last run.
    fn discard_stale(&mut self) {
        let mut buf = vec![0u8; READ_BYTES];
        for fd in [&self.out, &self.err, &self.status] {
            let mut drained = 0;
            while drained < DRAIN_LIMIT {
                match read_fd(fd.get_ref(), &mut buf) {
                    Ok(Read::Data(n)) => drained += n,
                    _ => break,
                }
            }
        }
    }

    /// Runs one request to completion, streaming output to `out`.
    ///
    /// Ends when the wrapper reports completion, when the interpreter dies, or after the
    /// termination sequence (SIGTERM, `grace`, SIGKILL) started by the `deadline` or by
    /// `cancel`. That sequence hits the REPL and every process this execution started
    /// ([`process::exec_victims`]: its children and the daemons it orphaned), never the
    /// background processes of earlier executions.
    pub async fn run(
        &mut self,
        req: &ReplRequest<'_>,
        out: &Outbox,
        deadline: Instant,
        grace: Duration,
        cancel: &CancellationToken,
    ) -> RunOutcome {
        self.discard_stale();
        let since = process::boot_ticks();
        let sweep = self.sweep;
        let mut victims = Vec::new();
        let id = process::random_hex();
        let request = self.encode(&id, req);
        let mut written = 0usize;
        let mut stdout = Capped::new(MAX_STDOUT_BYTES, false);
        let mut stderr = Capped::new(MAX_STDERR_BYTES, true);
        let mut status_buf: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; READ_BYTES];
        let mut out_open = true;
        let mut err_open = true;
        let mut status_open = true;
        let mut phase = Phase::Running { deadline };
        let mut interrupted = None;
        let pid = self.pid;

        let language = self.language;
        let Repl {
            ctl,
            out: out_fd,
            err: err_fd,
            status,
            ctl_ino,
            exit,
            exited,
            ..
        } = self;
        let ctl_ino = *ctl_ino;
        // The last status the wrapper (or something in its process) reported, waiting for
        // the interpreter to be back in its wait for the next request.
        let mut reported: Option<i32> = None;
        let mut idle_check: Option<(Instant, Duration)> = None;

        let mut result: Option<(Option<i32>, bool)> = None;
        if let Some(kind) = exited {
            result = Some((Some(kind.code()), true));
        }
        while result.is_none() {
            let pending = written < request.len();
            tokio::select! {
                r = ctl.writable(), if pending => {
                    if let Ok(mut guard) = r {
                        match guard.try_io(|fd| {
                            nix::unistd::write(fd.get_ref(), &request[written..]).map_err(io::Error::from)
                        }) {
                            Ok(Ok(n)) => written += n,
                            Ok(Err(_)) => written = request.len(), // EPIPE: the REPL is gone
                            Err(_would_block) => {}
                        }
                    }
                }
                r = out_fd.readable(), if out_open => {
                    if let Ok(mut guard) = r {
                        match guard.try_io(|fd| read_fd(fd.get_ref(), &mut buf)) {
                            Ok(Ok(Read::Data(n))) => stdout.forward(&buf[..n], out).await,
                            Ok(Ok(Read::WouldBlock)) => guard.clear_ready(),
                            Ok(Ok(Read::Eof)) | Ok(Err(_)) => out_open = false,
                            Err(_would_block) => {}
                        }
                    }
                }
                r = err_fd.readable(), if err_open => {
                    if let Ok(mut guard) = r {
                        match guard.try_io(|fd| read_fd(fd.get_ref(), &mut buf)) {
                            Ok(Ok(Read::Data(n))) => stderr.forward(&buf[..n], out).await,
                            Ok(Ok(Read::WouldBlock)) => guard.clear_ready(),
                            Ok(Ok(Read::Eof)) | Ok(Err(_)) => err_open = false,
                            Err(_would_block) => {}
                        }
                    }
                }
                r = status.readable(), if status_open => {
                    if let Ok(mut guard) = r {
                        match guard.try_io(|fd| read_fd(fd.get_ref(), &mut buf)) {
                            Ok(Ok(Read::Data(n))) => {
                                status_buf.extend_from_slice(&buf[..n]);
                                if let Some(code) = parse_status(&mut status_buf, &id) {
                                    reported = Some(code);
                                    if waiting_for_request(language, pid, ctl_ino) {
                                        // The wrapper writes its status before it waits:
                                        // a line that came after the one just read is the
                                        // real one.
                                        if let Some(code) = drain_status(status.get_ref(), &mut status_buf, &id) {
                                            reported = Some(code);
                                        }
                                        result = Some((reported, false));
                                    } else {
                                        idle_check = Some((Instant::now() + IDLE_POLL_FIRST, IDLE_POLL_FIRST));
                                    }
                                }
                            }
                            Ok(Ok(Read::WouldBlock)) => guard.clear_ready(),
                            Ok(Ok(Read::Eof)) | Ok(Err(_)) => status_open = false,
                            Err(_would_block) => {}
                        }
                    }
                }
                () = tokio::time::sleep_until(idle_check.map_or(deadline, |c| c.0).into()), if idle_check.is_some() => {
                    if waiting_for_request(language, pid, ctl_ino) {
                        // The status the wrapper wrote before it began to wait may still
                        // be unread (a forged one was read earlier): read it now.
                        if let Some(code) = drain_status(status.get_ref(), &mut status_buf, &id) {
                            reported = Some(code);
                        }
                        result = Some((reported, false));
                    } else if let Some((_, pause)) = idle_check {
                        let pause = (pause * 2).min(IDLE_POLL_MAX);
                        idle_check = Some((Instant::now() + pause, pause));
                    }
                }
                r = &mut *exit, if exited.is_none() => {
                    let kind = r.unwrap_or(ExitKind::Exited(-1));
                    *exited = Some(kind);
                    result = Some((Some(kind.code()), true));
                }
                () = tokio::time::sleep_until(phase.next().into()) => {
                    match phase {
                        Phase::Running { .. } => {
                            interrupted = Some(Interrupt::Timeout);
                            victims = process::signal_exec(pid, since, sweep, &victims, Signal::SIGTERM);
                            phase = Phase::Terminating { kill_at: Instant::now() + grace };
                        }
                        Phase::Terminating { .. } => {
                            victims = process::signal_exec(pid, since, sweep, &victims, Signal::SIGKILL);
                            phase = Phase::Killed { give_up_at: Instant::now() + KILL_WAIT };
                        }
                        Phase::Killed { .. } => result = Some((None, true)),
                    }
                }
                () = cancel.cancelled(), if matches!(phase, Phase::Running { .. }) => {
                    interrupted = Some(Interrupt::Cancel);
                    victims = process::signal_exec(pid, since, sweep, &victims, Signal::SIGTERM);
                    phase = Phase::Terminating { kill_at: Instant::now() + grace };
                }
            }
        }
        // Everything the code wrote before completing is in the pipes now: drain it.
        for (fd, sink, open) in [
            (&*out_fd, &mut stdout, out_open),
            (&*err_fd, &mut stderr, err_open),
        ] {
            let mut drained = 0;
            while open && drained < DRAIN_LIMIT {
                match read_fd(fd.get_ref(), &mut buf) {
                    Ok(Read::Data(n)) => {
                        drained += n;
                        sink.forward(&buf[..n], out).await;
                    }
                    _ => break,
                }
            }
        }
        let (status_code, mut dead) = result.unwrap_or((None, true));
        if interrupted.is_some() {
            dead = true;
        }
        let status_code = match (interrupted, status_code, *exited) {
            // The REPL was killed by our signal: no exit code of its own.
            (Some(_), _, Some(ExitKind::Signaled(_))) if dead => None,
            // The code itself was killed by our signal and the REPL lived long enough to
            // report that status (bash defers its own SIGTERM until the foreground
            // command it waits for has ended): still a kill, not a code of its own. A
            // handler that exits with any other code keeps it.
            (Some(_), Some(code), _) if killed_by_termination(code) => None,
            (_, code, _) => code,
        };
        RunOutcome {
            status: status_code,
            repl_dead: dead,
            interrupted,
            stdout_over: stdout.over,
            stderr_over: stderr.over,
        }
    }
}

impl Drop for Repl {
    fn drop(&mut self) {
        // Only the interpreter: what the user started in earlier executions (its process
        // group included) lives until the session ends.
        if self.exited.is_none() {
            self.kill();
        }
    }
}

/// True for the status a shell reports for a command killed by the termination sequence
/// (SIGTERM, then SIGKILL).
fn killed_by_termination(code: i32) -> bool {
    code == 128 + Signal::SIGTERM as i32 || code == 128 + Signal::SIGKILL as i32
}

/// Finds the last status line for `id` among the complete lines in `buf` and consumes
/// them (a forged line followed by the wrapper's own one yields the wrapper's).
fn parse_status(buf: &mut Vec<u8>, id: &str) -> Option<i32> {
    let mut found = None;
    while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = buf.drain(..=nl).collect();
        let Ok(text) = std::str::from_utf8(&line) else {
            continue;
        };
        if let Some(pos) = text.rfind(id) {
            let rest = text[pos + id.len()..].trim();
            if let Ok(code) = rest.parse::<i32>() {
                found = Some(code);
            }
        }
    }
    if buf.len() > 64 * 1024 {
        let cut = buf.len() - 1024;
        buf.drain(..cut);
    }
    found
}

/// Reads what the status pipe holds now (without blocking) and returns the last status
/// for `id` in it, if any.
fn drain_status(fd: &OwnedFd, buf: &mut Vec<u8>, id: &str) -> Option<i32> {
    let mut chunk = vec![0u8; 4096];
    let mut found = None;
    for _ in 0..64 {
        match read_fd(fd, &mut chunk) {
            Ok(Read::Data(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Some(code) = parse_status(buf, id) {
                    found = Some(code);
                }
            }
            _ => break,
        }
    }
    found
}

/// Syscall numbers (x86_64) of `read` and of the `epoll_wait` family.
const SYS_READ: i64 = 0;
const SYS_EPOLL_WAIT: [i64; 3] = [232, 281, 441];

/// One thread's `/proc/<pid>/task/<tid>/syscall`: the syscall it is blocked in and its
/// first argument, or `None` when it runs (or the file cannot be read).
fn blocked_in(pid: i32, tid: &str) -> Option<(i64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    parse_syscall(&text)
}

/// Parses the text of a `syscall` file: `"<nr> <arg0 hex> ..."` while blocked in a
/// syscall, `"-1 <sp> <pc>"` in user mode, `"running"` on a CPU.
fn parse_syscall(text: &str) -> Option<(i64, u64)> {
    let mut words = text.split_whitespace();
    let nr: i64 = words.next()?.parse().ok()?;
    if nr < 0 {
        return None;
    }
    let arg0 = u64::from_str_radix(words.next()?.trim_start_matches("0x"), 16).ok()?;
    Some((nr, arg0))
}

/// True when `fd` of process `pid` is the pipe with inode `ino`.
fn is_pipe(pid: i32, fd: u64, ino: u64) -> bool {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .is_ok_and(|target| target.as_os_str() == format!("pipe:[{ino}]").as_str())
}

/// Whether the interpreter `pid` is back in the wrapper's wait for the next request,
/// as the kernel shows it (see the module docs): its main thread blocked in `read` on
/// the control pipe (inode `ctl_ino`) for Python and bash; for Node, its main thread idle
/// in `epoll_wait` and one of its threads blocked in `read` on the control pipe (libuv
/// reads files on its thread pool).
///
/// Where `/proc` cannot tell (not mounted, or the agent lacks the right to look: only in
/// host tests run without root) this answers true, which is the status line alone.
fn waiting_for_request(language: Language, pid: i32, ctl_ino: u64) -> bool {
    let main = pid.to_string();
    if std::fs::read_to_string(format!("/proc/{pid}/task/{main}/syscall")).is_err() {
        return true;
    }
    let reading_ctl = |tid: &str| {
        blocked_in(pid, tid).is_some_and(|(nr, fd)| nr == SYS_READ && is_pipe(pid, fd, ctl_ino))
    };
    match language {
        Language::Python | Language::Raw => reading_ctl(&main),
        Language::Javascript => {
            if !blocked_in(pid, &main).is_some_and(|(nr, _)| SYS_EPOLL_WAIT.contains(&nr)) {
                return false;
            }
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                return true;
            };
            tasks
                .flatten()
                .filter_map(|t| t.file_name().into_string().ok())
                .any(|tid| tid != main && reading_ctl(&tid))
        }
    }
}

/// Quotes `s` for bash in single quotes.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Bash snippets that set `env` for one execution and restore the previous values
/// afterwards (a variable the code changed itself is left alone).
fn bash_env_snippets(env: &[(String, String)]) -> (String, String) {
    let mut pre = String::new();
    let mut post = String::new();
    for (i, (k, v)) in env.iter().enumerate() {
        if !is_shell_identifier(k) {
            continue;
        }
        let q = shell_quote(v);
        pre.push_str(&format!(
            "if [[ -v {k} ]]; then __sbx_o{i}=${k}; __sbx_s{i}=1; [[ ${{{k}@a}} == *x* ]] && __sbx_x{i}=1 || __sbx_x{i}=0; else __sbx_s{i}=0; fi; export {k}={q}\n"
        ));
        post.push_str(&format!(
            "if [[ ${{{k}-}} == {q} ]]; then if (( __sbx_s{i} )); then {k}=$__sbx_o{i}; (( __sbx_x{i} )) || export -n {k}; else unset {k}; fi; fi; unset __sbx_o{i} __sbx_s{i} __sbx_x{i}\n"
        ));
    }
    (pre, post)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_package_layer_goes_on_the_search_paths_after_the_users_own() {
        let env = |cfg: &AgentConfig, k: &str| {
            base_env(cfg)
                .into_iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v)
                .unwrap()
        };
        let mut cfg = AgentConfig::host("/home/user");
        assert!(!env(&cfg, "PYTHONPATH").contains("sbx-packages"));
        cfg.package_dir = Some(guest_proto::PACKAGE_DIR.into());
        assert_eq!(
            env(&cfg, "PYTHONPATH"),
            "/home/user/.local/lib/python3/site-packages:/opt/sbx-packages/python"
        );
        assert_eq!(
            env(&cfg, "NODE_PATH"),
            "/home/user/node_modules:/opt/sbx-packages/node_modules"
        );
        assert!(env(&cfg, "PATH").ends_with(":/opt/sbx-packages/node_modules/.bin"));
    }

    #[test]
    fn status_parsing_ignores_other_ids_and_garbage() {
        let mut buf = b"garbage\nabc 3\n".to_vec();
        assert_eq!(parse_status(&mut buf, "deadbeef"), None);
        buf.extend_from_slice(b"junkdeadbeef 42\n");
        assert_eq!(parse_status(&mut buf, "deadbeef"), Some(42));
        let mut partial = b"deadbeef 4".to_vec();
        assert_eq!(parse_status(&mut partial, "deadbeef"), None);
        partial.extend_from_slice(b"\n");
        assert_eq!(parse_status(&mut partial, "deadbeef"), Some(4));
    }

    #[test]
    fn the_last_status_for_the_id_wins() {
        let mut buf = b"deadbeef 0\ndeadbeef 3\n".to_vec();
        assert_eq!(parse_status(&mut buf, "deadbeef"), Some(3));
        assert!(buf.is_empty());
    }

    #[test]
    fn syscall_files_are_parsed() {
        assert_eq!(
            parse_syscall("0 0x3 0x7f27e0ff2870 0x10000 0x0 0x0 0x0 0x7ffc 0x7f27\n"),
            Some((0, 3))
        );
        assert_eq!(
            parse_syscall("232 0x5 0x7ff 0x400 0xffffffff 0x0 0x0 0x1 0x2"),
            Some((232, 5))
        );
        assert_eq!(parse_syscall("-1 0x7ffc01419fb8 0x7f27e11162ad\n"), None);
        assert_eq!(parse_syscall("running\n"), None);
        assert_eq!(parse_syscall(""), None);
    }

    #[test]
    fn a_process_blocked_on_another_pipe_is_not_waiting_for_a_request() {
        let (r, w) = process::pipe().unwrap();
        let ino = nix::sys::stat::fstat(&w).unwrap().st_ino;
        let (r2, _w2) = process::pipe().unwrap();
        // A child blocked in read(0) on `r` (stdin), and one blocked on an unrelated pipe.
        let spawn = |fd: &OwnedFd| {
            Command::new("sh")
                .args(["-c", "read x"])
                .stdin(Stdio::from(fd.try_clone().unwrap()))
                .spawn()
                .unwrap()
        };
        let mut on_ctl = spawn(&r);
        let mut elsewhere = spawn(&r2);
        let start = Instant::now();
        let pid = |c: &std::process::Child| i32::try_from(c.id()).unwrap();
        while !waiting_for_request(Language::Raw, pid(&on_ctl), ino)
            && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(waiting_for_request(Language::Raw, pid(&on_ctl), ino));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiting_for_request(Language::Raw, pid(&elsewhere), ino));
        for c in [&mut on_ctl, &mut elsewhere] {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        drop(w);
    }

    #[test]
    fn shell_helpers() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
        assert!(is_shell_identifier("_A1"));
        assert!(!is_shell_identifier("1A"));
        assert!(!is_shell_identifier("A.B"));
        assert!(!is_shell_identifier(""));
    }
}
