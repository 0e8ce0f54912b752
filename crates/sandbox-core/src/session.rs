//! Sessions: one VM and its interpreter state kept across many execs.
//!
//! All operations of a session are serialized (concurrent callers queue on one lock). The
//! idle timer is paused while an operation runs and re-armed afterwards; when it fires the
//! session closes. Failure semantics:
//!
//! | what happened | result | session |
//! |---|---|---|
//! | exception, syntax error, `sys.exit(n)` (n ≠ 137) | exit code | alive |
//! | input validation error, output over the limit, bad path | error | alive |
//! | timeout, `os._exit`, a signal | exit code (−1 / n / 128+sig) | alive, the guest resets the REPL |
//! | exit code 137 (SIGKILL, OOM, `exit(137)`) | the result | closed afterwards |
//! | VM died, transport lost, any other error | error | closed |
//!
//! A closed session answers every call with a session-closed error.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::time::Instant as TokioInstant;

use guest_proto::DirEntry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{MappedMutexGuard, MutexGuard, Notify};
use tracing::{debug, info};

use crate::Language;
use crate::admission::AdmissionPermit;
use crate::error::{Error, ErrorKind, Result};
use crate::ports::AgentInfo;
use crate::request::ExecRequest;
use crate::result::{ExecutionResult, ExposedPort, TimingBreakdown, millis};
use crate::vm::Vm;
use crate::vm::ops::OutputCallbacks;

/// Exit code that ends a session: the REPL was SIGKILLed (or chose 137).
pub const SESSION_FATAL_EXIT: i32 = 137;

/// Identifier of a session.
pub type SessionId = uuid::Uuid;

struct SessionInner {
    id: SessionId,
    language: Language,
    vm: tokio::sync::Mutex<Option<Vm>>,
    permit: Mutex<Option<AdmissionPermit>>,
    closed: AtomicBool,
    /// Set by [`Session::close`]: a running operation stops waiting for the guest at once,
    /// so closing never waits for a hung operation.
    closing: tokio::sync::watch::Sender<bool>,
    exec_count: AtomicU64,
    busy: AtomicUsize,
    last_active: Mutex<TokioInstant>,
    last_used: Mutex<SystemTime>,
    created: SystemTime,
    idle_timeout: Duration,
    exposed_ports: Vec<ExposedPort>,
    vm_start: crate::result::VmStart,
    wake: Arc<Notify>,
}

/// A live sandbox session. Cheap to clone; every clone is the same session.
#[derive(Clone)]
pub struct Session {
    inner: Arc<SessionInner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.inner.id)
            .field("language", &self.inner.language)
            .field("closed", &self.is_closed())
            .field("exec_count", &self.exec_count())
            .finish()
    }
}

/// A weak handle that does not keep a session alive.
#[derive(Debug, Clone)]
pub(crate) struct WeakSession(std::sync::Weak<SessionInner>);

impl WeakSession {
    /// The session, if a handle still exists.
    pub(crate) fn upgrade(&self) -> Option<Session> {
        self.0.upgrade().map(|inner| Session { inner })
    }
}

/// Marks an operation in flight (pauses the idle timer) for its lifetime.
struct Activity<'a>(&'a SessionInner);

impl<'a> Activity<'a> {
    fn start(inner: &'a SessionInner) -> Self {
        inner.busy.fetch_add(1, Ordering::SeqCst);
        Self(inner)
    }
}

impl Drop for Activity<'_> {
    fn drop(&mut self) {
        if let Ok(mut t) = self.0.last_active.lock() {
            *t = TokioInstant::now();
        }
        if let Ok(mut t) = self.0.last_used.lock() {
            *t = SystemTime::now();
        }
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
        self.0.wake.notify_one();
    }
}

impl Session {
    /// Wraps a booted VM. Starts the idle timer.
    pub(crate) fn start(
        vm: Vm,
        permit: Option<AdmissionPermit>,
        idle_timeout: Duration,
    ) -> Session {
        let inner = Arc::new(SessionInner {
            id: uuid::Uuid::new_v4(),
            language: vm.language(),
            exposed_ports: vm.exposed_ports().to_vec(),
            vm_start: vm.start_kind(),
            vm: tokio::sync::Mutex::new(Some(vm)),
            permit: Mutex::new(permit),
            closed: AtomicBool::new(false),
            closing: tokio::sync::watch::Sender::new(false),
            exec_count: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            last_active: Mutex::new(TokioInstant::now()),
            last_used: Mutex::new(SystemTime::now()),
            created: SystemTime::now(),
            idle_timeout,
            wake: Arc::new(Notify::new()),
        });
        let weak = Arc::downgrade(&inner);
        let wake = inner.wake.clone();
        tokio::spawn(async move {
            idle_watch(weak, wake).await;
        });
        Session { inner }
    }

    pub(crate) fn downgrade(&self) -> WeakSession {
        WeakSession(Arc::downgrade(&self.inner))
    }

    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.inner.id
    }

    /// How the session's VM started (`Cold` or `Snapshot`).
    pub fn vm_start(&self) -> crate::result::VmStart {
        self.inner.vm_start
    }

    /// The session's language.
    pub fn language(&self) -> Language {
        self.inner.language
    }

    /// Successful execs so far.
    pub fn exec_count(&self) -> u64 {
        self.inner.exec_count.load(Ordering::SeqCst)
    }

    /// Ports exposed on the host (readable after close).
    pub fn exposed_ports(&self) -> &[ExposedPort] {
        &self.inner.exposed_ports
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// When the session was created.
    pub fn created(&self) -> SystemTime {
        self.inner.created
    }

    /// When the last operation finished.
    pub fn last_used(&self) -> SystemTime {
        self.inner
            .last_used
            .lock()
            .map(|t| *t)
            .unwrap_or(self.inner.created)
    }

    /// The idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        self.inner.idle_timeout
    }

    fn closed_error(&self) -> Error {
        Error::session_closed(format!("session {} is closed", self.inner.id))
    }

    /// Takes the operation lock and checks the VM is alive; a dead VM closes the session.
    async fn guard(&self) -> Result<(MappedMutexGuard<'_, Vm>, Activity<'_>)> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let activity = Activity::start(&self.inner);
        let Ok(vm) = MutexGuard::try_map(self.inner.vm.lock().await, Option::as_mut) else {
            return Err(self.closed_error());
        };
        if self.is_closed() {
            return Err(self.closed_error());
        }
        if !vm.is_alive() {
            drop(vm);
            self.close().await;
            return Err(Error::session_closed("the session's VM was retired"));
        }
        Ok((vm, activity))
    }

    /// Resolves once the session is closing.
    async fn closing(&self) {
        let mut rx = self.inner.closing.subscribe();
        let _ = rx.wait_for(|closing| *closing).await;
    }

    /// Whether an error leaves the session usable.
    fn survives(err: &Error) -> bool {
        matches!(
            err.kind(),
            ErrorKind::Input | ErrorKind::OutputLimit | ErrorKind::Guest | ErrorKind::NoSpace
        )
    }

    async fn after_error(&self, err: Error) -> Error {
        if !Self::survives(&err) {
            info!(session = %self.inner.id, error = %err, "closing session after error");
            self.close().await;
        }
        err
    }

    /// Runs one operation on the session's VM while holding the session's guard; an
    /// error goes through [`Session::after_error`] (which may close the session).
    async fn on_vm<T>(&self, op: impl AsyncFnOnce(&Vm) -> Result<T>) -> Result<T> {
        let (vm, _activity) = self.guard().await?;
        let r = tokio::select! {
            r = op(&vm) => r,
            () = self.closing() => Err(self.closed_error()),
        };
        drop(vm);
        match r {
            Ok(v) => Ok(v),
            Err(e) => Err(self.after_error(e).await),
        }
    }

    /// Runs code in the session's REPL.
    pub async fn exec(
        &self,
        mut req: ExecRequest,
        callbacks: &OutputCallbacks,
    ) -> Result<ExecutionResult> {
        req.validate(self.inner.language)?;
        let started = Instant::now();
        let (vm, activity) = self.guard().await?;
        let outcome = tokio::select! {
            r = vm.exec(self.inner.language, &req, callbacks) => r,
            () = self.closing() => Err(self.closed_error()),
        };
        let usage = vm.usage().await;
        drop(vm);
        drop(activity);
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => return Err(self.after_error(e).await),
        };
        self.inner.exec_count.fetch_add(1, Ordering::SeqCst);
        let mut timing = TimingBreakdown::default();
        timing.set_execute(
            outcome.round_trip_ms,
            outcome.spawn_ms,
            outcome.execution_ms,
        );
        timing.finish(started.elapsed());
        let result = outcome.into_result(usage, timing, false, self.inner.exposed_ports.clone());
        if result.exit_code == SESSION_FATAL_EXIT {
            info!(session = %self.inner.id, "exit code 137: closing the session");
            self.close().await;
        }
        Ok(result)
    }

    /// Writes `reader`'s bytes to the guest file `path` (relative to `/home/user`).
    pub async fn write_file<R>(&self, path: &str, reader: &mut R, executable: bool) -> Result<u64>
    where
        R: AsyncRead + Unpin + Send + ?Sized,
    {
        self.on_vm(async |vm| vm.write_file(path, reader, executable).await)
            .await
            .map(|(size, _)| size)
    }

    /// Writes in-memory bytes to the guest file `path`.
    pub async fn write_bytes(&self, path: &str, data: &[u8], executable: bool) -> Result<u64> {
        let mut reader = data;
        self.write_file(path, &mut reader, executable).await
    }

    /// Uploads the local file `local` to the guest file `path`.
    pub async fn upload(&self, local: &Path, path: &str, executable: bool) -> Result<u64> {
        let mut file = tokio::fs::File::open(local).await.map_err(|e| {
            Error::input("local_path", format!("cannot open {}", local.display())).with_source(e)
        })?;
        self.write_file(path, &mut file, executable).await
    }

    /// Streams the guest file `path` into `writer`.
    pub async fn read_file<W>(&self, path: &str, writer: &mut W) -> Result<u64>
    where
        W: AsyncWrite + Unpin + Send + ?Sized,
    {
        self.on_vm(async |vm| vm.read_file(path, writer).await)
            .await
            .map(|(size, _)| size)
    }

    /// Reads the guest file `path` into memory.
    pub async fn read_bytes(&self, path: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_file(path, &mut out).await?;
        Ok(out)
    }

    /// Downloads the guest file `path` to `local`, atomically (temp file + rename).
    pub async fn download(&self, path: &str, local: &Path) -> Result<u64> {
        if local.is_dir() {
            return Err(Error::input(
                "local_path",
                format!("{} is a directory", local.display()),
            ));
        }
        if let Some(parent) = local.parent()
            && !parent.as_os_str().is_empty()
        {
            tokio::fs::create_dir_all(parent).await.map_err(|e| {
                Error::input("local_path", format!("cannot create {}", parent.display()))
                    .with_source(e)
            })?;
        }
        let tmp = local.with_extension(format!("{}.tmp", uuid::Uuid::new_v4().simple()));
        let mut file = tokio::fs::File::create(&tmp).await.map_err(|e| {
            Error::input("local_path", format!("cannot create {}", tmp.display())).with_source(e)
        })?;
        let r = self.read_file(path, &mut file).await;
        drop(file);
        match r {
            Ok(size) => {
                tokio::fs::rename(&tmp, local).await.map_err(|e| {
                    Error::input("local_path", format!("cannot write {}", local.display()))
                        .with_source(e)
                })?;
                Ok(size)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    /// Lists the guest directory `path` (`""` is `/home/user`).
    pub async fn list_files(&self, path: &str) -> Result<Vec<DirEntry>> {
        self.on_vm(async |vm| vm.list_files(path).await).await
    }

    /// Asks the session's guest agent how it is (see [`Vm::ping`]).
    pub async fn ping(&self) -> Result<AgentInfo> {
        self.on_vm(async |vm| vm.ping().await).await
    }

    /// Closes the session and destroys its VM. Idempotent, shared by all callers; does not
    /// wait for a running operation's lock (the VM is torn down under it).
    pub async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.inner.closing.send_replace(true);
        self.inner.wake.notify_one();
        // Destroy the VM without taking the operation lock: a running exec sees its
        // transport end and returns.
        let vm = {
            match self.inner.vm.try_lock() {
                Ok(mut g) => g.take(),
                Err(_) => None,
            }
        };
        match vm {
            Some(vm) => {
                vm.destroy().await;
            }
            None => {
                // An operation holds the lock: take the VM once it is released.
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    let vm = inner.vm.lock().await.take();
                    if let Some(vm) = vm {
                        vm.destroy().await;
                    }
                });
            }
        }
        if let Ok(mut p) = self.inner.permit.lock() {
            p.take();
        }
        debug!(session = %self.inner.id, "session closed");
    }
}

async fn idle_watch(weak: std::sync::Weak<SessionInner>, wake: Arc<Notify>) {
    loop {
        // Hold only a weak reference while sleeping, so dropping every handle ends it.
        let sleep_for = {
            let Some(inner) = weak.upgrade() else { return };
            if inner.closed.load(Ordering::SeqCst) {
                return;
            }
            let deadline = inner
                .last_active
                .lock()
                .map(|t| *t + inner.idle_timeout)
                .unwrap_or_else(|_| TokioInstant::now());
            let busy = inner.busy.load(Ordering::SeqCst) > 0;
            if !busy && TokioInstant::now() >= deadline {
                info!(session = %inner.id, "idle timeout: closing the session");
                Session { inner }.close().await;
                return;
            }
            if busy {
                inner.idle_timeout
            } else {
                deadline.saturating_duration_since(TokioInstant::now())
            }
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(sleep_for) => {}
        }
    }
}

impl Drop for SessionInner {
    fn drop(&mut self) {
        // The last handle is gone: the VM is destroyed by Vm's own Drop.
        debug!(session = %self.id, ms = millis(self.created.elapsed().unwrap_or_default()), "session dropped");
    }
}
