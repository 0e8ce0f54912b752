//! Operations on a running VM over its guest connection: exec with streamed output,
//! file write/read/list, REPL warm-up, and the two halves of a memory snapshot: saving a
//! VM and resuming a restored clone.
//!
//! Error semantics: a failure to send the request means the code never ran (transient);
//! losing the transport after the request went out means the outcome is unknown.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use guest_proto::{
    DirEntry, ExecRequest as WireExec, GuestErrorKind, GuestMessage, HostMessage, Sha256Hasher,
};
use std::path::PathBuf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use tracing::{debug, warn};

use super::{Vm, VmState};
use crate::Language;
use crate::error::{Error, ErrorKind, PermanentCause, Result, TransientCause};
use crate::ports::{AgentInfo, ControlCommand, GuestConnection, OpStream};
use crate::request::ExecRequest;
use crate::result::millis;

/// Extra time past the exec timeout before the host gives up on the guest.
pub const HARD_DEADLINE_GRACE: Duration = Duration::from_secs(10);

/// The host's own bounds on what the guest agent sends and how long it may take, whatever
/// the agent claims to enforce itself: the guest is root-capable and may be hostile. An
/// agent past one of them gets the operation an `OutcomeUnknown` error ("the VM is no
/// longer trusted"), which closes a session and so destroys its VM.
pub mod host_caps {
    use std::time::Duration;

    /// `ping` answered within this.
    pub const PING: Duration = Duration::from_secs(30);
    /// A REPL started (`warm_up`) within this (node under TCG takes seconds).
    pub const WARM_UP: Duration = Duration::from_secs(120);
    /// A directory listed within this.
    pub const LIST: Duration = Duration::from_secs(30);
    /// During a file transfer, the most time between two steps (a chunk read, a chunk
    /// accepted for sending, the start of the operation).
    pub const TRANSFER_IDLE: Duration = Duration::from_secs(60);
    /// A written file acknowledged (synced and hashed in the guest) within this after its
    /// last byte.
    pub const WRITE_ACK: Duration = Duration::from_secs(120);
    /// Most entries accepted in one listing.
    pub const MAX_LIST_ENTRIES: usize = 100_000;
    /// Longest entry name accepted in a listing, in bytes (255 bytes of a file name, each
    /// invalid UTF-8 byte shown as a 3-byte U+FFFD).
    pub const MAX_NAME_BYTES: usize = 3 * 255;
    /// stdout bytes accepted per exec.
    pub const MAX_STDOUT: usize = guest_proto::limits::MAX_STDOUT_BYTES;
    /// stderr bytes accepted per exec.
    pub const MAX_STDERR: usize = guest_proto::limits::MAX_STDERR_BYTES;
    /// File bytes accepted per read.
    pub const MAX_FILE: u64 = guest_proto::limits::MAX_FILE_BYTES;
}

/// A callback that receives output chunks as they arrive.
pub type OutputCallback = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Streaming callbacks for one exec. A callback that panics is disabled for the rest of
/// the exec; the output is still collected.
#[derive(Clone, Default)]
pub struct OutputCallbacks {
    /// Called with each stdout chunk.
    pub on_stdout: Option<OutputCallback>,
    /// Called with each stderr chunk.
    pub on_stderr: Option<OutputCallback>,
}

impl std::fmt::Debug for OutputCallbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputCallbacks")
            .field("on_stdout", &self.on_stdout.is_some())
            .field("on_stderr", &self.on_stderr.is_some())
            .finish()
    }
}

struct GuardedCallback {
    cb: Option<OutputCallback>,
    disabled: AtomicBool,
}

impl GuardedCallback {
    fn new(cb: Option<OutputCallback>) -> Self {
        Self {
            cb,
            disabled: AtomicBool::new(false),
        }
    }

    fn call(&self, chunk: &[u8]) {
        if self.disabled.load(Ordering::Relaxed) {
            return;
        }
        if let Some(cb) = &self.cb
            && std::panic::catch_unwind(AssertUnwindSafe(|| cb(chunk))).is_err()
        {
            warn!("an output callback panicked; it is disabled for the rest of this exec");
            self.disabled.store(true, Ordering::Relaxed);
        }
    }
}

/// What the guest reported for one exec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutcome {
    /// Raw stdout bytes.
    pub stdout: Vec<u8>,
    /// Raw stderr bytes.
    pub stderr: Vec<u8>,
    /// Exit code (−1 on timeout).
    pub exit_code: i32,
    /// Guest-measured execution time.
    pub execution_ms: u64,
    /// Guest-measured interpreter start or hand-off to the warm REPL.
    pub spawn_ms: u64,
    /// Host-measured round trip.
    pub round_trip_ms: u64,
}

impl ExecOutcome {
    /// The public result of this outcome; `timing` gets the exec phases from it.
    pub fn into_result(
        self,
        usage: crate::ports::ResourceUsage,
        mut timing: crate::result::TimingBreakdown,
        warm_pool_hit: bool,
        exposed_ports: Vec<crate::result::ExposedPort>,
    ) -> crate::result::ExecutionResult {
        timing.set_execute(self.round_trip_ms, self.spawn_ms, self.execution_ms);
        crate::result::ExecutionResult {
            stdout: String::from_utf8_lossy(&self.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&self.stderr).into_owned(),
            exit_code: self.exit_code,
            execution_time_ms: Some(self.execution_ms),
            cpu_time_ms: usage.cpu_time_ms,
            memory_peak_mb: usage.memory_peak_bytes.map(|b| b / (1024 * 1024)),
            timing,
            warm_pool_hit,
            vm_start: if warm_pool_hit {
                crate::result::VmStart::WarmPool
            } else {
                crate::result::VmStart::Cold
            },
            exposed_ports,
        }
    }
}

/// Maps a guest error report to the public taxonomy.
pub fn guest_error(kind: GuestErrorKind, message: String) -> Error {
    match kind {
        GuestErrorKind::Code => Error::input("code", message),
        GuestErrorKind::EnvVar => Error::input("env", message),
        GuestErrorKind::Package => Error::input("packages", message),
        GuestErrorKind::OutputLimit => Error::new(ErrorKind::OutputLimit, message),
        GuestErrorKind::Execution => Error::transient(TransientCause::Execution, message),
        GuestErrorKind::Timeout => Error::transient(TransientCause::Infrastructure, message),
        GuestErrorKind::NoSpace => Error::new(
            ErrorKind::NoSpace,
            format!(
                "no space left in the VM's home directory: {message}; ask for a larger \
                 home with disk_mb (at most {} MB)",
                crate::request::MAX_DISK_MB
            ),
        ),
        GuestErrorKind::Path
        | GuestErrorKind::Io
        | GuestErrorKind::Request
        | GuestErrorKind::Protocol => Error::new(ErrorKind::Guest, format!("{kind}: {message}")),
    }
}

fn lost(vm: &Vm, op: &str) -> Error {
    let exit = if vm.is_alive() {
        String::new()
    } else {
        " (the VM is gone)".to_owned()
    };
    let console = vm.console_tail();
    let console: Vec<&str> = console.lines().rev().take(8).collect();
    let console: Vec<&str> = console.into_iter().rev().collect();
    Error::outcome_unknown(format!(
        "lost the connection to the guest during {op}{exit}; the operation may have run; \
         console: {}",
        if console.is_empty() {
            "(empty)".to_owned()
        } else {
            console.join(" | ")
        }
    ))
    .with_vm(vm.id())
    .with_operation(op.to_owned())
}

/// A guest's error report for `op` on `vm`.
fn reported(vm: &Vm, op: &str, kind: GuestErrorKind, message: String) -> Error {
    guest_error(kind, message)
        .with_vm(vm.id())
        .with_operation(op.to_owned())
}

/// The error for anything but the expected reply to `op`: the guest's own report, an
/// unexpected message, or the transport lost.
fn not_the_reply(vm: &Vm, op: &str, msg: Option<GuestMessage>) -> Error {
    match msg {
        Some(GuestMessage::Error { kind, message }) => reported(vm, op, kind, message),
        Some(other) => unexpected(vm, op, &other),
        None => lost(vm, op),
    }
}

/// The guest agent broke one of the host's own bounds ([`host_caps`]): the error of the
/// operation, and a VM no longer trusted (`OutcomeUnknown` closes a session, which
/// destroys the VM).
fn untrusted(vm: &Vm, op: &str, what: String) -> Error {
    warn!(vm_id = %vm.id(), op, what, "the guest agent broke a host bound; the VM is no longer trusted");
    Error::outcome_unknown(format!(
        "the guest agent {what} during {op}; the VM is no longer trusted"
    ))
    .with_vm(vm.id())
    .with_operation(op.to_owned())
}

/// `fut` within `limit`, else the [`untrusted`] error "did not answer within".
async fn within<T>(
    vm: &Vm,
    op: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(untrusted(
            vm,
            op,
            format!("did not answer within {} s", limit.as_secs()),
        )),
    }
}

fn unexpected(vm: &Vm, op: &str, msg: &GuestMessage) -> Error {
    Error::new(
        ErrorKind::Guest,
        format!("unexpected {} reply during {op}", msg.name()),
    )
    .with_vm(vm.id())
    .with_operation(op.to_owned())
}

/// Sends a request; a send failure means nothing was dispatched (transient).
async fn dispatch(vm: &Vm, op: &str, msg: HostMessage) -> Result<OpStream> {
    vm.conn().request(msg).await.map_err(|e| {
        if e.kind() == ErrorKind::OutcomeUnknown {
            e
        } else {
            Error::transient(
                TransientCause::Infrastructure,
                format!("could not send {op} to the guest: {}", e.message()),
            )
            .with_vm(vm.id())
            .with_operation(op.to_owned())
        }
    })
}

/// Keeps the lifecycle in `Executing` while an operation runs.
struct Busy<'a>(&'a Vm);

impl<'a> Busy<'a> {
    fn enter(vm: &'a Vm) -> Result<Self> {
        vm.transition(VmState::Executing)
            .map_err(|_| Error::session_closed(format!("VM is {}", vm.state())).with_vm(vm.id()))?;
        Ok(Self(vm))
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if self.0.state() == VmState::Executing {
            let _ = self.0.transition(VmState::Ready);
        }
    }
}

/// Cancels an operation in the guest when its caller goes away before the end (the future
/// running it is dropped, e.g. Ctrl-C in `sbx session` or an HTTP client that hung up):
/// the guest stops the exec as on a timeout instead of running it to its end while the
/// next operation waits behind it.
struct CancelOnDrop {
    conn: Option<Arc<dyn GuestConnection>>,
    op: guest_proto::OpId,
}

impl CancelOnDrop {
    fn disarm(mut self) {
        self.conn = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let op = self.op;
            rt.spawn(async move {
                let _ = conn.send(op, HostMessage::Cancel).await;
            });
        }
    }
}

impl Vm {
    /// Runs `req` in the VM's REPL for `language`, streaming output to `callbacks`.
    /// Dropping the future before it ends cancels the exec in the guest.
    ///
    /// A timeout is a result with exit code −1, not an error.
    pub async fn exec(
        &self,
        language: Language,
        req: &ExecRequest,
        callbacks: &OutputCallbacks,
    ) -> Result<ExecOutcome> {
        let _busy = Busy::enter(self)?;
        let started = Instant::now();
        let mut stream = dispatch(
            self,
            "exec",
            HostMessage::Exec(WireExec {
                language,
                code: req.code.clone(),
                timeout_secs: req.timeout_secs,
                env: req.env.clone(),
            }),
        )
        .await?;
        let cancel_on_drop = CancelOnDrop {
            conn: Some(self.conn().clone()),
            op: stream.op_id,
        };
        let on_stdout = GuardedCallback::new(callbacks.on_stdout.clone());
        let on_stderr = GuardedCallback::new(callbacks.on_stderr.clone());
        let mut out = ExecOutcome::default();
        let deadline = Duration::from_secs(u64::from(req.timeout_secs)) + HARD_DEADLINE_GRACE;
        let collect = async {
            loop {
                let Some(msg) = stream.recv().await else {
                    return Err(lost(self, "exec"));
                };
                match msg {
                    GuestMessage::Stdout(chunk) => {
                        if out.stdout.len() + chunk.len() > host_caps::MAX_STDOUT {
                            return Err(untrusted(
                                self,
                                "exec",
                                format!(
                                    "sent more than the {}-byte stdout limit",
                                    host_caps::MAX_STDOUT
                                ),
                            ));
                        }
                        on_stdout.call(&chunk);
                        out.stdout.extend_from_slice(&chunk);
                    }
                    GuestMessage::Stderr(chunk) => {
                        if out.stderr.len() + chunk.len() > host_caps::MAX_STDERR {
                            return Err(untrusted(
                                self,
                                "exec",
                                format!(
                                    "sent more than the {}-byte stderr limit",
                                    host_caps::MAX_STDERR
                                ),
                            ));
                        }
                        on_stderr.call(&chunk);
                        out.stderr.extend_from_slice(&chunk);
                    }
                    GuestMessage::ExecDone {
                        exit_code,
                        execution_ms,
                        spawn_ms,
                    } => {
                        out.exit_code = exit_code;
                        out.execution_ms = execution_ms;
                        out.spawn_ms = spawn_ms.unwrap_or(0);
                        return Ok(());
                    }
                    GuestMessage::Error { kind, message } => {
                        return Err(reported(self, "exec", kind, message));
                    }
                    other => return Err(unexpected(self, "exec", &other)),
                }
            }
        };
        let collected = tokio::time::timeout(deadline, collect).await;
        cancel_on_drop.disarm();
        match collected {
            Ok(Err(e)) => {
                let _ = self.conn().send(stream.op_id, HostMessage::Cancel).await;
                return Err(e);
            }
            Ok(Ok(())) => {}
            Err(_) => {
                let _ = self.conn().send(stream.op_id, HostMessage::Cancel).await;
                return Err(Error::outcome_unknown(format!(
                    "the guest did not finish within {} s past the timeout",
                    HARD_DEADLINE_GRACE.as_secs()
                ))
                .with_vm(self.id())
                .with_operation("exec"));
            }
        }
        out.round_trip_ms = millis(started.elapsed());
        Ok(out)
    }

    /// Asks the agent how it is: versions, boot and setup times, CRNG reseeds so far.
    pub async fn ping(&self) -> Result<AgentInfo> {
        let _busy = Busy::enter(self)?;
        within(self, "ping", host_caps::PING, async {
            let mut stream = dispatch(
                self,
                "ping",
                HostMessage::Ping {
                    protocol_version: guest_proto::PROTOCOL_VERSION,
                },
            )
            .await?;
            match stream.recv().await.map(AgentInfo::from_pong) {
                Some(Ok(info)) => Ok(info),
                Some(Err(other)) => Err(not_the_reply(self, "ping", Some(other))),
                None => Err(not_the_reply(self, "ping", None)),
            }
        })
        .await
    }

    /// Starts the REPL for `language` ahead of the first exec.
    pub async fn warm_up(&self, language: Language) -> Result<()> {
        let _busy = Busy::enter(self)?;
        within(self, "warm_up", host_caps::WARM_UP, async {
            let mut stream = dispatch(self, "warm_up", HostMessage::WarmUp { language }).await?;
            match stream.recv().await {
                Some(GuestMessage::WarmUpDone { .. }) => Ok(()),
                other => Err(not_the_reply(self, "warm_up", other)),
            }
        })
        .await
    }

    /// Streams `reader` into the guest file `path` (relative to `/home/user`).
    /// Returns the size and SHA-256 the guest verified.
    pub async fn write_file<R>(
        &self,
        path: &str,
        reader: &mut R,
        executable: bool,
    ) -> Result<(u64, [u8; 32])>
    where
        R: AsyncRead + Unpin + Send + ?Sized,
    {
        guest_proto::limits::normalize_guest_path(path, false)
            .map_err(|e| Error::input("path", e.to_string()))?;
        let _busy = Busy::enter(self)?;
        let mut stream = within(
            self,
            "write_file",
            host_caps::TRANSFER_IDLE,
            dispatch(
                self,
                "write_file",
                HostMessage::WriteFile {
                    path: path.to_owned(),
                    executable,
                },
            ),
        )
        .await?;
        let op = stream.op_id;
        let mut hasher = Sha256Hasher::new();
        let mut buf = vec![0u8; guest_proto::CHUNK_BYTES];
        loop {
            // The guest may refuse early (bad path): stop sending then.
            if let Ok(msg) = stream.rx.try_recv() {
                return Err(not_the_reply(self, "write_file", Some(msg)));
            }
            let n = reader.read(&mut buf).await.map_err(|e| {
                Error::input("content", "reading the local content failed").with_source(e)
            });
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    // Abort: the guest discards the partial temp file.
                    let _ = self.conn().send(op, HostMessage::Cancel).await;
                    return Err(e);
                }
            };
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            if hasher.len() > guest_proto::limits::MAX_FILE_BYTES {
                let _ = self.conn().send(op, HostMessage::Cancel).await;
                return Err(Error::input(
                    "content",
                    format!(
                        "file exceeds the {} byte limit",
                        guest_proto::limits::MAX_FILE_BYTES
                    ),
                ));
            }
            within(self, "write_file", host_caps::TRANSFER_IDLE, async {
                self.conn()
                    .send(
                        op,
                        HostMessage::WriteChunk(Bytes::copy_from_slice(&buf[..n])),
                    )
                    .await
                    .map_err(|_| lost(self, "write_file"))
            })
            .await?;
        }
        let (size, digest) = hasher.finish();
        let ack = within(self, "write_file", host_caps::WRITE_ACK, async {
            self.conn()
                .send(
                    op,
                    HostMessage::WriteEnd {
                        size,
                        sha256: digest.0,
                    },
                )
                .await
                .map_err(|_| lost(self, "write_file"))?;
            Ok(stream.recv().await)
        })
        .await?;
        match ack {
            Some(GuestMessage::FileWritten { size: s, sha256 })
                if s == size && sha256 == digest.0 =>
            {
                Ok((size, sha256))
            }
            Some(GuestMessage::FileWritten { .. }) => Err(Error::new(
                ErrorKind::Guest,
                "the guest acknowledged a different size or digest",
            )
            .with_vm(self.id())
            .with_operation("write_file")),
            other => Err(not_the_reply(self, "write_file", other)),
        }
    }

    /// Streams the guest file `path` into `writer`; verifies size and SHA-256.
    pub async fn read_file<W>(&self, path: &str, writer: &mut W) -> Result<(u64, [u8; 32])>
    where
        W: AsyncWrite + Unpin + Send + ?Sized,
    {
        guest_proto::limits::normalize_guest_path(path, false)
            .map_err(|e| Error::input("path", e.to_string()))?;
        let _busy = Busy::enter(self)?;
        let mut stream = within(
            self,
            "read_file",
            host_caps::TRANSFER_IDLE,
            dispatch(
                self,
                "read_file",
                HostMessage::ReadFile {
                    path: path.to_owned(),
                },
            ),
        )
        .await?;
        let mut hasher = Sha256Hasher::new();
        loop {
            let next = within(self, "read_file", host_caps::TRANSFER_IDLE, async {
                Ok(stream.recv().await)
            })
            .await;
            let next = match next {
                Ok(m) => m,
                Err(e) => {
                    let _ = self.conn().send(stream.op_id, HostMessage::Cancel).await;
                    return Err(e);
                }
            };
            match next {
                Some(GuestMessage::FileChunk(chunk)) => {
                    if hasher.len() + chunk.len() as u64 > host_caps::MAX_FILE {
                        let _ = self.conn().send(stream.op_id, HostMessage::Cancel).await;
                        return Err(untrusted(
                            self,
                            "read_file",
                            format!("sent more than the {}-byte file limit", host_caps::MAX_FILE),
                        ));
                    }
                    hasher.update(&chunk);
                    if let Err(e) = writer.write_all(&chunk).await {
                        let _ = self.conn().send(stream.op_id, HostMessage::Cancel).await;
                        return Err(Error::input("destination", "writing the local file failed")
                            .with_source(e));
                    }
                }
                Some(GuestMessage::FileRead { size, sha256 }) => {
                    let (got, digest) = hasher.finish();
                    if got != size || digest.0 != sha256 {
                        return Err(Error::new(
                            ErrorKind::Guest,
                            format!("file transfer corrupted: got {got} bytes, guest sent {size}"),
                        )
                        .with_vm(self.id())
                        .with_operation("read_file"));
                    }
                    writer.flush().await.map_err(|e| {
                        Error::input("destination", "writing the local file failed").with_source(e)
                    })?;
                    return Ok((size, sha256));
                }
                other => return Err(not_the_reply(self, "read_file", other)),
            }
        }
    }

    /// Lists the guest directory `path` (`""` is `/home/user`).
    pub async fn list_files(&self, path: &str) -> Result<Vec<DirEntry>> {
        guest_proto::limits::normalize_guest_path(path, true)
            .map_err(|e| Error::input("path", e.to_string()))?;
        let _busy = Busy::enter(self)?;
        let entries = within(self, "list_files", host_caps::LIST, async {
            let mut stream = dispatch(
                self,
                "list_files",
                HostMessage::ListDir {
                    path: path.to_owned(),
                },
            )
            .await?;
            match stream.recv().await {
                Some(GuestMessage::DirListing { entries }) => Ok(entries),
                other => Err(not_the_reply(self, "list_files", other)),
            }
        })
        .await?;
        if entries.len() > host_caps::MAX_LIST_ENTRIES {
            return Err(untrusted(
                self,
                "list_files",
                format!(
                    "listed {} entries (at most {} are accepted)",
                    entries.len(),
                    host_caps::MAX_LIST_ENTRIES
                ),
            ));
        }
        if let Some(bad) = entries.iter().find(|e| {
            e.name.is_empty()
                || e.name.len() > host_caps::MAX_NAME_BYTES
                || e.name.contains(['/', '\0'])
                || e.name == "."
                || e.name == ".."
        }) {
            return Err(untrusted(
                self,
                "list_files",
                format!("listed an impossible file name ({} bytes)", bad.name.len()),
            ));
        }
        Ok(entries)
    }
}

/// What the agent reported after [`Vm::resume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeInfo {
    /// Live REPLs that reseeded their generators before the agent answered.
    pub reseeded: u32,
    /// Kernel CRNG reseeds so far in the guest (this one included).
    pub crng_reseeds: u64,
    /// Host-measured round trip, in milliseconds.
    pub round_trip_ms: u64,
}

/// How long the guest may take to answer `Resume` (REPL reseeds included; a node REPL
/// restart under TCG takes seconds).
pub const RESUME_DEADLINE: Duration = Duration::from_secs(30);

/// Fresh random bytes sent with `Resume`.
pub const RESUME_ENTROPY_BYTES: usize = 64;

/// `n` bytes from the host kernel's CSPRNG.
fn host_entropy(n: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

impl Vm {
    /// Right after a restore from a memory snapshot, before anything else: gives the guest
    /// the host's wall clock and [`RESUME_ENTROPY_BYTES`] fresh bytes from the host's
    /// kernel RNG. The agent sets its clock, credits the bytes to its kernel pool, reseeds
    /// the CRNG and has every REPL reseed its generators, so clones of one snapshot
    /// diverge. Every failure is transient: no user code has run in the clone.
    pub async fn resume(&self) -> Result<ResumeInfo> {
        let now = std::time::SystemTime::now();
        self.resume_at(now).await
    }

    /// [`Vm::resume`] with the guest's wall clock set to `clock` instead of the host's.
    pub(crate) async fn resume_at(&self, clock: std::time::SystemTime) -> Result<ResumeInfo> {
        const OP: &str = "resume";
        let transient = |message: String| {
            Error::transient(TransientCause::Infrastructure, message)
                .with_vm(self.id())
                .with_operation(OP.to_owned())
        };
        let entropy = host_entropy(RESUME_ENTROPY_BYTES)
            .map_err(|e| transient(format!("cannot read the host's /dev/urandom: {e}")))?;
        let unix_time_ns = clock
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| u64::try_from(d.as_nanos()).ok())
            .ok_or_else(|| transient("the host clock is outside 1970..2554".to_owned()))?;
        let _busy = Busy::enter(self)?;
        let started = Instant::now();
        let request = HostMessage::Resume {
            unix_time_ns,
            entropy: Bytes::from(entropy),
        };
        let answer = tokio::time::timeout(RESUME_DEADLINE, async {
            let mut stream = dispatch(self, OP, request).await?;
            Ok::<_, Error>(stream.recv().await)
        })
        .await
        .map_err(|_| {
            transient(format!(
                "the guest did not answer resume within {} s",
                RESUME_DEADLINE.as_secs()
            ))
        })?
        .map_err(|e| transient(format!("could not send resume: {}", e.message())))?;
        match answer {
            Some(GuestMessage::Resumed {
                reseeded,
                crng_reseeds,
            }) => Ok(ResumeInfo {
                reseeded,
                crng_reseeds,
                round_trip_ms: millis(started.elapsed()),
            }),
            Some(GuestMessage::Error { kind, message }) => Err(transient(format!(
                "the guest refused resume: {kind}: {message}"
            ))),
            Some(other) => Err(transient(format!(
                "unexpected {} reply to resume",
                other.name()
            ))),
            None => Err(transient(
                "lost the connection to the guest during resume".to_owned(),
            )),
        }
    }
}

/// How long the agent gets to notice the host hung up before the VM is paused and saved.
const QUIET_BEFORE_SAVE: Duration = Duration::from_millis(200);

impl Vm {
    /// Saves a VM booted with its RAM in a shared file: closes the guest connection,
    /// pauses the VM and writes its device state. Returns the RAM and state files (in the
    /// VM's work dir, valid until it is destroyed). The VM stays paused.
    pub(crate) async fn save(&self) -> Result<(PathBuf, PathBuf)> {
        let Some((ram, state)) = self.saveable_files() else {
            return Err(Error::permanent(
                PermanentCause::Internal,
                "this VM was not booted to be saved",
            )
            .with_vm(self.id()));
        };
        // No guest connection may be open in a snapshot: every clone gets its own.
        self.conn().close().await;
        tokio::time::sleep(QUIET_BEFORE_SAVE).await;
        self.process()
            .control(ControlCommand::Save {
                state: state.clone(),
            })
            .await
            .map_err(|e| e.with_vm(self.id()).with_operation("save"))?;
        debug!(vm_id = %self.id(), "VM saved");
        Ok((ram, state))
    }
}
