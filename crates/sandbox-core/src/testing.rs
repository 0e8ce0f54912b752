//! Stateful fakes for orchestration tests (behind the `mocks` feature).
//!
//! [`FakeProcess`] is a VM process that runs until killed or crashed on purpose.
//! [`FakeAgent`] is an in-process guest agent speaking the real message types: it echoes
//! code to stdout, understands a few test commands and stores files in memory. Together with
//! the mockall mocks of the other ports they let the VM manager, sessions and the scheduler
//! be tested without QEMU.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use guest_proto::{DirEntry, GuestErrorKind, GuestMessage, HostMessage, OpId, Sha256Digest};
use tokio::sync::{mpsc, watch};

use crate::error::{Error, Result, TransientCause};
use crate::ports::{
    AgentInfo, ControlCommand, ControlReply, ExitInfo, GuestChannel, GuestConnection, OpStream,
    VmProcess,
};

/// A VM process that runs until [`FakeProcess::crash`] or `kill`.
#[derive(Debug, Clone)]
pub struct FakeProcess {
    exit: watch::Sender<Option<ExitInfo>>,
    kills: Arc<AtomicUsize>,
    pid: u32,
}

impl FakeProcess {
    /// A running process with a made-up pid.
    pub fn new(pid: u32) -> Self {
        let (exit, _) = watch::channel(None);
        Self {
            exit,
            kills: Arc::new(AtomicUsize::new(0)),
            pid,
        }
    }

    /// A process that has already exited with `code` (a crash during boot).
    pub fn exited(code: i32) -> Self {
        let p = Self::new(1);
        p.crash(code);
        p
    }

    /// Makes the process exit with `code`.
    pub fn crash(&self, code: i32) {
        self.exit.send_replace(Some(ExitInfo {
            code: Some(code),
            signal: None,
        }));
    }

    /// How many times `kill` was called.
    pub fn kill_count(&self) -> usize {
        self.kills.load(Ordering::SeqCst)
    }

    /// Shared kill counter.
    pub fn kill_counter(&self) -> Arc<AtomicUsize> {
        self.kills.clone()
    }
}

#[async_trait]
impl VmProcess for FakeProcess {
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit.subscribe();
        loop {
            if let Some(info) = *rx.borrow_and_update() {
                return info;
            }
            if rx.changed().await.is_err() {
                return ExitInfo::default();
            }
        }
    }

    fn try_exit(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    async fn kill(&self, _grace: Duration) -> Result<()> {
        self.kills.fetch_add(1, Ordering::SeqCst);
        self.exit.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(ExitInfo {
                    code: None,
                    signal: Some(9),
                });
                true
            } else {
                false
            }
        });
        Ok(())
    }

    async fn control(&self, cmd: ControlCommand) -> Result<ControlReply> {
        Ok(match cmd {
            ControlCommand::QueryStatus => ControlReply::Status {
                running: self.try_exit().is_none(),
                status: "running".into(),
            },
            ControlCommand::Save { state } => {
                tokio::fs::write(&state, b"fake device state")
                    .await
                    .map_err(|e| Error::transient(TransientCause::Infrastructure, e.to_string()))?;
                ControlReply::Done
            }
            _ => ControlReply::Done,
        })
    }

    fn stderr_tail(&self) -> String {
        "fake stderr".into()
    }

    fn console_tail(&self) -> String {
        "fake console".into()
    }
}

/// How a hostile or broken [`FakeAgent`] answers (see [`FakeAgent::misbehave`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehavior {
    /// Never answers any request (and never acknowledges a file write).
    Silent,
    /// Streams stdout (exec) or file chunks (read) forever.
    Flood,
    /// Lists this many entries.
    HugeListing(usize),
    /// Lists a name no directory can hold (`../../etc/passwd`).
    BadName,
}

/// How a [`FakeChannel`] answers `connect`.
#[derive(Debug, Clone)]
pub enum ConnectBehavior {
    /// Connect at once with a healthy agent.
    Ok,
    /// Never answer (the boot deadline decides).
    Hang,
    /// Fail with a transient boot error.
    Fail,
}

/// A [`GuestChannel`] that hands out [`FakeAgent`]s.
#[derive(Debug, Clone)]
pub struct FakeChannel {
    behaviors: Arc<Mutex<Vec<ConnectBehavior>>>,
    /// Every agent handed out, in order.
    pub agents: Arc<Mutex<Vec<FakeAgent>>>,
    /// While set, agents handed out refuse `Resume` (a clone that cannot be resumed).
    pub refuse_resume: Arc<AtomicBool>,
}

impl FakeChannel {
    /// Answers connects with `behaviors` in order; `Ok` once the list is used up.
    pub fn new(behaviors: Vec<ConnectBehavior>) -> Self {
        Self {
            behaviors: Arc::new(Mutex::new(behaviors)),
            agents: Arc::new(Mutex::new(Vec::new())),
            refuse_resume: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The most recent agent.
    pub fn last_agent(&self) -> Option<FakeAgent> {
        self.agents.lock().ok().and_then(|a| a.last().cloned())
    }
}

#[async_trait]
impl GuestChannel for FakeChannel {
    async fn connect(
        &self,
        _socket: &std::path::Path,
        _timeout: Duration,
    ) -> Result<(Box<dyn GuestConnection>, AgentInfo)> {
        let behavior = {
            let mut b = self
                .behaviors
                .lock()
                .map_err(|_| Error::transient(TransientCause::Infrastructure, "poisoned fake"))?;
            if b.is_empty() {
                ConnectBehavior::Ok
            } else {
                b.remove(0)
            }
        };
        match behavior {
            ConnectBehavior::Ok => {
                let agent = FakeAgent::new();
                agent
                    .refuse_resume
                    .store(self.refuse_resume.load(Ordering::SeqCst), Ordering::SeqCst);
                if let Ok(mut a) = self.agents.lock() {
                    a.push(agent.clone());
                }
                Ok((
                    Box::new(agent),
                    AgentInfo {
                        protocol_version: guest_proto::PROTOCOL_VERSION,
                        agent_version: "fake".into(),
                        boot_ms: Some(1),
                        setup_us: Some(1000),
                        crng_reseeds: Some(1),
                    },
                ))
            }
            ConnectBehavior::Hang => {
                futures::future::pending::<()>().await;
                Err(Error::transient(TransientCause::BootTimeout, "unreachable"))
            }
            ConnectBehavior::Fail => Err(Error::transient(
                TransientCause::BootTimeout,
                "fake agent refused",
            )),
        }
    }
}

#[derive(Debug, Default)]
struct AgentState {
    files: HashMap<String, Vec<u8>>,
    pending_writes: HashMap<OpId, (String, Vec<u8>, mpsc::Sender<GuestMessage>)>,
    streams: HashMap<OpId, mpsc::Sender<GuestMessage>>,
    vars: HashMap<String, String>,
    execs: Vec<String>,
    resumes: Vec<(u64, Bytes)>,
    cancels: Vec<OpId>,
}

/// An in-process guest agent.
///
/// Exec commands (the whole code string):
/// - `exit N` → exit code N;
/// - `sleep MS` → answer after MS milliseconds;
/// - `hang` → never answer;
/// - `drop` → close the transport (outcome unknown);
/// - `big N` → N bytes of stdout, as 64 KiB chunks;
/// - `set K V` / `get K` → session state;
/// - `timeout` → stderr line and exit −1;
/// - `limit` → output-limit error;
/// - `err` → stderr `boom` and exit 1;
/// - anything else → echoed to stdout, exit 0.
#[derive(Debug, Clone)]
pub struct FakeAgent {
    state: Arc<Mutex<AgentState>>,
    misbehavior: Arc<Mutex<Option<Misbehavior>>>,
    alive: Arc<AtomicBool>,
    next_op: Arc<AtomicU64>,
    refuse_resume: Arc<AtomicBool>,
}

impl Default for FakeAgent {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeAgent {
    /// A live agent with no state.
    pub fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(AgentState::default())),
            misbehavior: Arc::new(Mutex::new(None)),
            alive: Arc::new(AtomicBool::new(true)),
            next_op: Arc::new(AtomicU64::new(1)),
            refuse_resume: Arc::new(AtomicBool::new(false)),
        }
    }

    /// From now on, answers every request the way `m` says (a hostile or broken agent).
    pub fn misbehave(&self, m: Misbehavior) {
        if let Ok(mut g) = self.misbehavior.lock() {
            *g = Some(m);
        }
    }

    fn misbehavior(&self) -> Option<Misbehavior> {
        self.misbehavior.lock().ok().and_then(|g| *g)
    }

    /// Sends `msg` until the receiver is gone.
    async fn flood(tx: &mpsc::Sender<GuestMessage>, msg: impl Fn() -> GuestMessage) {
        while tx.send(msg()).await.is_ok() {}
    }

    /// Breaks the transport: every pending stream ends.
    pub fn kill_transport(&self) {
        self.alive.store(false, Ordering::SeqCst);
        if let Ok(mut s) = self.state.lock() {
            s.streams.clear();
            s.pending_writes.clear();
        }
    }

    /// `Cancel` frames received so far.
    pub fn cancels(&self) -> usize {
        self.state
            .lock()
            .map(|s| s.cancels.len())
            .unwrap_or_default()
    }

    /// Codes executed so far.
    pub fn execs(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.execs.clone())
            .unwrap_or_default()
    }

    /// A stored file.
    pub fn file(&self, path: &str) -> Option<Vec<u8>> {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.files.get(path).cloned())
    }

    fn lost() -> Error {
        Error::outcome_unknown("fake transport is down")
    }

    fn respond(&self, op: OpId, tx: mpsc::Sender<GuestMessage>, msg: HostMessage) {
        let agent = self.clone();
        tokio::spawn(async move {
            agent.handle(op, tx, msg).await;
        });
    }

    async fn handle(&self, op: OpId, tx: mpsc::Sender<GuestMessage>, msg: HostMessage) {
        match (self.misbehavior(), &msg) {
            (Some(Misbehavior::Silent), _) => {
                // Keep the stream open and never answer.
                if let Ok(mut s) = self.state.lock() {
                    s.streams.insert(op, tx);
                }
                return;
            }
            (Some(Misbehavior::Flood), HostMessage::Exec(_)) => {
                return Self::flood(&tx, || {
                    GuestMessage::Stdout(Bytes::from(vec![b'x'; guest_proto::CHUNK_BYTES]))
                })
                .await;
            }
            (Some(Misbehavior::Flood), HostMessage::ReadFile { .. }) => {
                return Self::flood(&tx, || {
                    GuestMessage::FileChunk(Bytes::from(vec![0u8; guest_proto::CHUNK_BYTES]))
                })
                .await;
            }
            (Some(Misbehavior::Flood), _) => {}
            (Some(Misbehavior::HugeListing(n)), HostMessage::ListDir { .. }) => {
                let entries = (0..n)
                    .map(|i| DirEntry {
                        name: format!("f{i}"),
                        is_dir: false,
                        size: 0,
                    })
                    .collect();
                let _ = tx.send(GuestMessage::DirListing { entries }).await;
                return;
            }
            (Some(Misbehavior::BadName), HostMessage::ListDir { .. }) => {
                let entries = vec![DirEntry {
                    name: "../../etc/passwd".into(),
                    is_dir: false,
                    size: 0,
                }];
                let _ = tx.send(GuestMessage::DirListing { entries }).await;
                return;
            }
            _ => {}
        }
        match msg {
            HostMessage::Exec(req) => {
                if let Ok(mut s) = self.state.lock() {
                    s.execs.push(req.code.clone());
                }
                self.exec(op, &tx, &req.code).await;
            }
            HostMessage::WarmUp { language } => {
                let _ = tx.send(GuestMessage::WarmUpDone { language }).await;
            }
            HostMessage::ReadFile { path } => {
                let data = self.file(&path);
                match data {
                    Some(data) => {
                        for chunk in data.chunks(guest_proto::CHUNK_BYTES) {
                            let _ = tx
                                .send(GuestMessage::FileChunk(Bytes::copy_from_slice(chunk)))
                                .await;
                        }
                        let _ = tx
                            .send(GuestMessage::FileRead {
                                size: data.len() as u64,
                                sha256: Sha256Digest::of(&data).0,
                            })
                            .await;
                    }
                    None => {
                        let _ = tx
                            .send(GuestMessage::Error {
                                kind: GuestErrorKind::Io,
                                message: format!("{path}: no such file"),
                            })
                            .await;
                    }
                }
            }
            HostMessage::Resume {
                unix_time_ns,
                entropy,
            } => {
                let _ = tx.send(self.resume(unix_time_ns, entropy)).await;
            }
            HostMessage::ListDir { path } => {
                // The entries directly in `path`: files, and the first component of
                // deeper paths as directories.
                let prefix = match path.trim_matches('/') {
                    "" => String::new(),
                    p => format!("{p}/"),
                };
                let mut entries: Vec<DirEntry> = self
                    .state
                    .lock()
                    .map(|s| {
                        s.files
                            .iter()
                            .filter_map(|(k, v)| {
                                let rest = k.strip_prefix(&prefix)?;
                                Some(match rest.split_once('/') {
                                    Some((dir, _)) => DirEntry {
                                        name: dir.to_owned(),
                                        is_dir: true,
                                        size: 0,
                                    },
                                    None => DirEntry {
                                        name: rest.to_owned(),
                                        is_dir: false,
                                        size: v.len() as u64,
                                    },
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                entries.sort_by(|a, b| a.name.cmp(&b.name));
                entries.dedup_by(|a, b| a.name == b.name);
                let _ = tx.send(GuestMessage::DirListing { entries }).await;
            }
            _ => {
                let _ = tx
                    .send(GuestMessage::Error {
                        kind: GuestErrorKind::Request,
                        message: "unsupported by the fake".into(),
                    })
                    .await;
            }
        }
    }

    async fn exec(&self, op: OpId, tx: &mpsc::Sender<GuestMessage>, code: &str) {
        let mut words = code.split_whitespace();
        let cmd = words.next().unwrap_or_default();
        let arg = words.next().unwrap_or_default();
        let done = |exit_code| GuestMessage::ExecDone {
            exit_code,
            execution_ms: 1,
            spawn_ms: None,
        };
        match cmd {
            "exit" => {
                let _ = tx.send(done(arg.parse().unwrap_or(1))).await;
            }
            "sleep" => {
                tokio::time::sleep(Duration::from_millis(arg.parse().unwrap_or(0))).await;
                let _ = tx
                    .send(GuestMessage::Stdout(Bytes::from_static(b"slept\n")))
                    .await;
                let _ = tx.send(done(0)).await;
            }
            "hang" => {
                if let Ok(mut s) = self.state.lock() {
                    s.streams.insert(op, tx.clone());
                }
            }
            "drop" => self.kill_transport(),
            "big" => {
                let n: usize = arg.parse().unwrap_or(0);
                let mut left = n;
                while left > 0 {
                    let k = left.min(guest_proto::CHUNK_BYTES);
                    let _ = tx
                        .send(GuestMessage::Stdout(Bytes::from(vec![b'x'; k])))
                        .await;
                    left -= k;
                }
                let _ = tx.send(done(0)).await;
            }
            "set" => {
                let value = words.next().unwrap_or_default().to_owned();
                if let Ok(mut s) = self.state.lock() {
                    s.vars.insert(arg.to_owned(), value);
                }
                let _ = tx.send(done(0)).await;
            }
            "get" => {
                let v = self
                    .state
                    .lock()
                    .ok()
                    .and_then(|s| s.vars.get(arg).cloned())
                    .unwrap_or_default();
                let _ = tx
                    .send(GuestMessage::Stdout(Bytes::from(format!("{v}\n"))))
                    .await;
                let _ = tx.send(done(0)).await;
            }
            "timeout" => {
                let _ = tx
                    .send(GuestMessage::Stderr(Bytes::from_static(
                        b"Execution timeout after 1s\n",
                    )))
                    .await;
                let _ = tx.send(done(-1)).await;
            }
            "limit" => {
                let _ = tx
                    .send(GuestMessage::Error {
                        kind: GuestErrorKind::OutputLimit,
                        message: "stdout exceeded 1000000 bytes".into(),
                    })
                    .await;
            }
            "err" => {
                let _ = tx
                    .send(GuestMessage::Stderr(Bytes::from_static(b"boom\n")))
                    .await;
                let _ = tx.send(done(1)).await;
            }
            _ => {
                let _ = tx
                    .send(GuestMessage::Stdout(Bytes::from(code.to_owned())))
                    .await;
                let _ = tx.send(done(0)).await;
            }
        }
    }
}

#[async_trait]
impl GuestConnection for FakeAgent {
    async fn request(&self, msg: HostMessage) -> Result<OpStream> {
        if !self.alive.load(Ordering::SeqCst) {
            return Err(Self::lost());
        }
        let op_id = OpId(self.next_op.fetch_add(1, Ordering::SeqCst));
        let (tx, rx) = mpsc::channel(64);
        if let HostMessage::WriteFile { path, .. } = msg {
            // Registered before returning, so follow-up chunks always find it.
            if let Ok(mut s) = self.state.lock() {
                s.pending_writes.insert(op_id, (path, Vec::new(), tx));
            }
        } else {
            self.respond(op_id, tx, msg);
        }
        Ok(OpStream { op_id, rx })
    }

    async fn send(&self, op_id: OpId, msg: HostMessage) -> Result<()> {
        if !self.alive.load(Ordering::SeqCst) {
            return Err(Self::lost());
        }
        let mut reply = None;
        {
            let mut s = self.state.lock().map_err(|_| Self::lost())?;
            match msg {
                HostMessage::WriteChunk(data) => {
                    if let Some((_, buf, _)) = s.pending_writes.get_mut(&op_id) {
                        buf.extend_from_slice(&data);
                    }
                }
                HostMessage::WriteEnd { .. } if self.misbehavior() == Some(Misbehavior::Silent) => {
                    // Never acknowledged: keep the reply channel open.
                    if let Some((_, _, tx)) = s.pending_writes.remove(&op_id) {
                        s.streams.insert(op_id, tx);
                    }
                }
                HostMessage::WriteEnd { size, sha256 } => {
                    if let Some((path, buf, tx)) = s.pending_writes.remove(&op_id) {
                        let digest = Sha256Digest::of(&buf).0;
                        let msg = if buf.len() as u64 == size && digest == sha256 {
                            s.files.insert(path, buf);
                            GuestMessage::FileWritten { size, sha256 }
                        } else {
                            GuestMessage::Error {
                                kind: GuestErrorKind::Io,
                                message: "digest mismatch".into(),
                            }
                        };
                        reply = Some((tx, msg));
                    }
                }
                HostMessage::Cancel => {
                    s.cancels.push(op_id);
                    s.pending_writes.remove(&op_id);
                    if let Some(tx) = s.streams.remove(&op_id) {
                        reply = Some((
                            tx,
                            GuestMessage::ExecDone {
                                exit_code: -1,
                                execution_ms: 0,
                                spawn_ms: None,
                            },
                        ));
                    }
                }
                _ => {}
            }
        }
        if let Some((tx, msg)) = reply {
            let _ = tx.send(msg).await;
        }
        Ok(())
    }

    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    async fn close(&self) {
        self.kill_transport();
    }
}

/// Counters shared by the simple fakes below.
#[derive(Debug, Default)]
pub struct FakeCounters {
    /// VM launches.
    pub launches: AtomicUsize,
    /// Overlays handed out.
    pub overlays_acquired: AtomicUsize,
    /// Overlays released.
    pub overlays_released: AtomicUsize,
    /// Limits created.
    pub limits_created: AtomicUsize,
    /// Limits removed.
    pub limits_removed: AtomicUsize,
    /// Processes launched, to count kills and crash them.
    pub processes: Mutex<Vec<FakeProcess>>,
    /// Networks started by [`FakeNetwork`].
    pub networks_started: AtomicUsize,
    /// Networks stopped by [`FakeNetwork`].
    pub networks_stopped: AtomicUsize,
    /// The network attachment and kernel arguments of every launched VM, in order.
    pub launched_specs: Mutex<Vec<(Option<crate::ports::NetworkAttachment>, Vec<String>)>>,
    /// The memory backing of every launched VM, in order.
    pub launched_memory: Mutex<Vec<crate::ports::MemoryBacking>>,
    /// The package layer of every launched VM, in order.
    pub launched_layers: Mutex<Vec<Option<std::path::PathBuf>>>,
}

impl FakeCounters {
    /// VMs launched and not yet killed or exited.
    pub fn running(&self) -> usize {
        self.processes
            .lock()
            .map(|p| p.iter().filter(|p| p.try_exit().is_none()).count())
            .unwrap_or(0)
    }

    /// True when every overlay, limit and network was released.
    pub fn all_released(&self) -> bool {
        self.overlays_acquired.load(Ordering::SeqCst)
            == self.overlays_released.load(Ordering::SeqCst)
            && self.limits_created.load(Ordering::SeqCst)
                == self.limits_removed.load(Ordering::SeqCst)
            && self.networks_started.load(Ordering::SeqCst)
                == self.networks_stopped.load(Ordering::SeqCst)
    }
}

/// A hypervisor whose VMs are [`FakeProcess`]es.
#[derive(Debug, Clone)]
pub struct FakeHypervisor(pub Arc<FakeCounters>);

#[async_trait]
impl crate::ports::Hypervisor for FakeHypervisor {
    async fn launch(&self, spec: &crate::ports::VmSpec) -> Result<Box<dyn VmProcess>> {
        if let Ok(mut specs) = self.0.launched_specs.lock() {
            specs.push((spec.network.clone(), spec.kernel_args.clone()));
        }
        if let Ok(mut memory) = self.0.launched_memory.lock() {
            memory.push(spec.memory.clone());
        }
        if let Ok(mut layers) = self.0.launched_layers.lock() {
            layers.push(spec.package_layer.clone());
        }
        // A saveable VM's RAM file exists once it runs, as with QEMU.
        if let crate::ports::MemoryBacking::SharedFile { path } = &spec.memory {
            let _ = std::fs::write(path, b"fake guest RAM");
        }
        let n = self.0.launches.fetch_add(1, Ordering::SeqCst);
        let p = FakeProcess::new(1000 + n as u32);
        if let Ok(mut v) = self.0.processes.lock() {
            v.push(p.clone());
        }
        Ok(Box::new(p))
    }

    fn snapshot_profile(
        &self,
        _accelerator: crate::ports::Accelerator,
        networked: bool,
    ) -> Option<crate::ports::SnapshotProfile> {
        Some(crate::ports::SnapshotProfile {
            version: "fake 1.0".into(),
            cpu_model: "fake".into(),
            devices: if networked {
                "fake devices, fake nic".into()
            } else {
                "fake devices".into()
            },
        })
    }
}

/// An overlay store that writes small files.
#[derive(Debug, Clone)]
pub struct FakeOverlays(pub Arc<FakeCounters>);

#[async_trait]
impl crate::ports::OverlayStore for FakeOverlays {
    async fn acquire(
        &self,
        _base: &std::path::Path,
        work_dir: &std::path::Path,
    ) -> Result<crate::ports::Overlay> {
        let path = work_dir.join("overlay.qcow2");
        tokio::fs::write(&path, b"overlay")
            .await
            .map_err(|e| Error::transient(TransientCause::Overlay, e.to_string()))?;
        // Counted once handed out: a cancelled acquire hands out nothing (its file is in
        // the work dir, which the caller removes).
        self.0.overlays_acquired.fetch_add(1, Ordering::SeqCst);
        Ok(crate::ports::Overlay { path })
    }

    async fn release(&self, overlay: &crate::ports::Overlay) -> Result<()> {
        self.0.overlays_released.fetch_add(1, Ordering::SeqCst);
        let _ = tokio::fs::remove_file(&overlay.path).await;
        Ok(())
    }
}

/// A limiter that only counts.
#[derive(Debug, Clone)]
pub struct FakeLimiter(pub Arc<FakeCounters>);

#[async_trait]
impl crate::ports::ResourceLimiter for FakeLimiter {
    async fn create(
        &self,
        vm_id: crate::vm::VmId,
        _limits: &crate::ports::ResourceLimits,
    ) -> Result<crate::ports::LimitHandle> {
        self.0.limits_created.fetch_add(1, Ordering::SeqCst);
        Ok(crate::ports::LimitHandle {
            vm_id,
            mode: crate::ports::LimitMode::Rlimit,
            cgroup: None,
        })
    }

    async fn attach(&self, _h: &crate::ports::LimitHandle, _pid: u32) -> Result<()> {
        Ok(())
    }

    async fn usage(&self, _h: &crate::ports::LimitHandle) -> Result<crate::ports::ResourceUsage> {
        Ok(crate::ports::ResourceUsage {
            cpu_time_ms: Some(3),
            memory_peak_bytes: Some(64 << 20),
        })
    }

    async fn remove(&self, _h: &crate::ports::LimitHandle) -> Result<()> {
        self.0.limits_removed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A network proxy that forwards nothing: it hands out a socket path, the guest kernel
/// argument and one exposed port per mapping (external = internal + 10000 unless given),
/// and counts starts and stops. Starting fails while `fail_start` is set.
#[derive(Debug, Clone)]
pub struct FakeNetwork {
    /// Shared counters.
    pub counters: Arc<FakeCounters>,
    /// Makes the next starts fail with a transient error.
    pub fail_start: Arc<std::sync::atomic::AtomicBool>,
    /// Every policy started, in order.
    pub started: Arc<Mutex<Vec<crate::ports::NetworkPolicy>>>,
}

impl FakeNetwork {
    /// A proxy counting into `counters`.
    pub fn new(counters: Arc<FakeCounters>) -> Self {
        Self {
            counters,
            fail_start: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            started: Arc::default(),
        }
    }

    /// The policies started so far.
    pub fn policies(&self) -> Vec<crate::ports::NetworkPolicy> {
        self.started.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

#[async_trait]
impl crate::ports::NetworkProxy for FakeNetwork {
    async fn start(
        &self,
        vm_id: crate::vm::VmId,
        policy: &crate::ports::NetworkPolicy,
        work_dir: &std::path::Path,
    ) -> Result<crate::ports::NetworkHandle> {
        if self.fail_start.load(Ordering::SeqCst) {
            return Err(Error::transient(
                TransientCause::Infrastructure,
                "fake network: start refused",
            ));
        }
        let ports = match policy {
            crate::ports::NetworkPolicy::None => {
                return Err(Error::permanent(
                    crate::error::PermanentCause::Internal,
                    "fake network: started for NetworkPolicy::None",
                ));
            }
            crate::ports::NetworkPolicy::PortsOnly { ports }
            | crate::ports::NetworkPolicy::Allowlist { ports, .. }
            | crate::ports::NetworkPolicy::Open { ports } => ports.clone(),
        };
        self.counters
            .networks_started
            .fetch_add(1, Ordering::SeqCst);
        if let Ok(mut s) = self.started.lock() {
            s.push(policy.clone());
        }
        Ok(crate::ports::NetworkHandle {
            vm_id,
            attachment: crate::ports::NetworkAttachment::UnixStream {
                socket: work_dir.join("net.sock"),
            },
            exposed_ports: ports
                .iter()
                .map(|p| {
                    crate::result::ExposedPort::new(
                        p.internal,
                        p.external.unwrap_or(p.internal.saturating_add(10_000)),
                        p.protocol,
                    )
                })
                .collect(),
            guest_kernel_args: vec!["sbx.net=fake".to_owned()],
        })
    }

    async fn stop(&self, _handle: &crate::ports::NetworkHandle) -> Result<()> {
        self.counters
            .networks_stopped
            .fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn restorable_shape(&self) -> Option<String> {
        Some("sbx.net=fake".to_owned())
    }
}

/// A VM manager over the fakes, with guest assets written into `dir`.
pub fn fake_manager(
    dir: &std::path::Path,
    max_vms: usize,
) -> (crate::manager::VmManager, Arc<FakeCounters>, FakeChannel) {
    fake_manager_with(dir, |cfg| cfg.max_vms = max_vms)
}

/// [`fake_manager`] with the configuration adjusted by `tune`.
pub fn fake_manager_with(
    dir: &std::path::Path,
    tune: impl FnOnce(&mut crate::manager::VmManagerConfig),
) -> (crate::manager::VmManager, Arc<FakeCounters>, FakeChannel) {
    let (manager, counters, channel, _) = build_fake_manager(dir, tune, false);
    (manager, counters, channel)
}

/// [`fake_manager_with`] plus a [`FakeSnapshotStore`] rooted in `dir/snapshots`.
pub fn fake_manager_with_snapshots(
    dir: &std::path::Path,
    tune: impl FnOnce(&mut crate::manager::VmManagerConfig),
) -> (
    crate::manager::VmManager,
    Arc<FakeCounters>,
    FakeChannel,
    FakeSnapshotStore,
) {
    let f = Fakes::new().snapshots().build(dir, tune);
    let store = f.snapshots.unwrap_or_default();
    (f.manager, f.counters, f.channel, store)
}

/// [`fake_manager_with`] plus a [`FakeNetwork`] proxy (returned to steer it).
pub fn fake_manager_with_network(
    dir: &std::path::Path,
    tune: impl FnOnce(&mut crate::manager::VmManagerConfig),
) -> (
    crate::manager::VmManager,
    Arc<FakeCounters>,
    FakeChannel,
    FakeNetwork,
) {
    let f = Fakes::new().network().build(dir, tune);
    let network = f
        .network
        .unwrap_or_else(|| FakeNetwork::new(f.counters.clone()));
    (f.manager, f.counters, f.channel, network)
}

fn build_fake_manager(
    dir: &std::path::Path,
    tune: impl FnOnce(&mut crate::manager::VmManagerConfig),
    with_network: bool,
) -> (
    crate::manager::VmManager,
    Arc<FakeCounters>,
    FakeChannel,
    Option<FakeNetwork>,
) {
    let f = Fakes {
        with_network,
        ..Fakes::new()
    }
    .build(dir, tune);
    (f.manager, f.counters, f.channel, f.network)
}

/// Which optional fakes a [`FakeSetup`] has: every port is faked; the network proxy and
/// the snapshot store only when asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fakes {
    with_network: bool,
    with_snapshots: bool,
    with_packages: bool,
}

/// One request to a [`FakePackageLayers`]: the language and the specs.
pub type PackageCall = (crate::Language, Vec<crate::packages::PackageSpec>);

/// A package layer port that "builds" an empty file per key and counts its calls; specs
/// named `nosuch*` are input errors, as a real builder answers for unknown packages.
#[derive(Debug, Clone, Default)]
pub struct FakePackageLayers {
    root: std::path::PathBuf,
    /// Every request, in order.
    pub calls: Arc<Mutex<Vec<PackageCall>>>,
}

#[async_trait]
impl crate::packages::PackageLayers for FakePackageLayers {
    async fn layer(
        &self,
        language: crate::Language,
        specs: &[crate::packages::PackageSpec],
    ) -> Result<crate::packages::PackageLayer> {
        if let Ok(mut c) = self.calls.lock() {
            c.push((language, specs.to_vec()));
        }
        if let Some(s) = specs.iter().find(|s| s.name.starts_with("nosuch")) {
            return Err(Error::input(
                "packages",
                format!("package {:?}: no such package", s.name),
            ));
        }
        let key: String = specs
            .iter()
            .map(|s| format!("{}-{}", s.name, s.version))
            .collect::<Vec<_>>()
            .join("_");
        let image = self.root.join(format!("{key}.erofs"));
        let _ = std::fs::write(&image, b"layer");
        Ok(crate::packages::PackageLayer {
            image,
            digest: "0".repeat(64),
            key,
        })
    }
}

/// A VM manager over the fakes, with the fakes that steer and count it.
#[derive(Debug)]
pub struct FakeSetup {
    /// The manager.
    pub manager: crate::manager::VmManager,
    /// What every fake counts.
    pub counters: Arc<FakeCounters>,
    /// The guest channel (its agents).
    pub channel: FakeChannel,
    /// The network proxy, when asked for.
    pub network: Option<FakeNetwork>,
    /// The snapshot store (rooted in `dir/snapshots`), when asked for.
    pub snapshots: Option<FakeSnapshotStore>,
    /// The package layer port (rooted in `dir/packages`), when asked for.
    pub packages: Option<FakePackageLayers>,
}

impl Fakes {
    /// Every required port, no network proxy, no snapshot store.
    pub fn new() -> Self {
        Self::default()
    }

    /// With a [`FakePackageLayers`] port.
    pub fn packages(mut self) -> Self {
        self.with_packages = true;
        self
    }

    /// With a [`FakeNetwork`] proxy.
    pub fn network(mut self) -> Self {
        self.with_network = true;
        self
    }

    /// With a [`FakeSnapshotStore`].
    pub fn snapshots(mut self) -> Self {
        self.with_snapshots = true;
        self
    }

    /// The manager, its guest assets written into `dir`, its configuration adjusted by
    /// `tune`.
    pub fn build(
        self,
        dir: &std::path::Path,
        tune: impl FnOnce(&mut crate::manager::VmManagerConfig),
    ) -> FakeSetup {
        let counters = Arc::new(FakeCounters::default());
        let assets = crate::manager::GuestAssets::in_dir(dir);
        for p in [&assets.kernel, &assets.initramfs]
            .into_iter()
            .chain(assets.images.values())
        {
            let _ = std::fs::write(p, b"asset");
        }
        let channel = FakeChannel::new(Vec::new());
        let network = self
            .with_network
            .then(|| FakeNetwork::new(counters.clone()));
        let snapshots = self.with_snapshots.then(|| {
            let root = dir.join("snapshots");
            let _ = std::fs::create_dir_all(&root);
            FakeSnapshotStore::with_root(root)
        });
        let packages = self.with_packages.then(|| {
            let root = dir.join("packages");
            let _ = std::fs::create_dir_all(&root);
            FakePackageLayers {
                root,
                calls: Arc::default(),
            }
        });
        let ports = crate::manager::Ports {
            hypervisor: Arc::new(FakeHypervisor(counters.clone())),
            overlays: Arc::new(FakeOverlays(counters.clone())),
            limiter: Arc::new(FakeLimiter(counters.clone())),
            network: network
                .clone()
                .map(|n| Arc::new(n) as Arc<dyn crate::ports::NetworkProxy>),
            channel: Arc::new(channel.clone()),
            snapshots: snapshots
                .clone()
                .map(|s| Arc::new(s) as Arc<dyn crate::snapshot::SnapshotStore>),
            packages: packages
                .clone()
                .map(|p| Arc::new(p) as Arc<dyn crate::packages::PackageLayers>),
        };
        let mut cfg = crate::manager::VmManagerConfig::new(
            assets,
            dir.join("work"),
            crate::ports::Accelerator::Tcg,
        );
        cfg.boot_timeout = Duration::from_secs(2);
        tune(&mut cfg);
        FakeSetup {
            manager: crate::manager::VmManager::new(cfg, ports),
            counters,
            channel,
            network,
            snapshots,
            packages,
        }
    }
}

/// Counts of what a [`FakeSnapshotStore`] was asked to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FakeSnapshotCounts {
    /// Lookups.
    pub lookups: usize,
    /// Lookups that returned a snapshot.
    pub hits: usize,
    /// Corrupted entries discarded by a lookup.
    pub discarded: usize,
    /// Drafts handed out.
    pub drafts: usize,
    /// `begin` calls answered `None` (published or another writer holds the key).
    pub begin_refused: usize,
    /// Drafts published.
    pub published: usize,
    /// Drafts abandoned (explicitly or by dropping them).
    pub abandoned: usize,
    /// Publishes that failed on purpose.
    pub publish_failures: usize,
}

#[derive(Debug, Default)]
struct FakeSnapshotInner {
    published: HashMap<crate::snapshot::SnapshotKey, crate::snapshot::Snapshot>,
    drafting: std::collections::HashSet<crate::snapshot::SnapshotKey>,
    corrupted: std::collections::HashSet<crate::snapshot::SnapshotKey>,
    fail_publish: usize,
    next_draft: u64,
    counts: FakeSnapshotCounts,
}

/// An in-memory [`crate::snapshot::SnapshotStore`] for orchestration tests. It touches no
/// files: paths are made up under its root. It keeps the port's rules (one draft per key,
/// `None` from `begin` once published, dropped drafts are abandoned, corrupted entries are
/// discarded by `lookup`) and can be told to corrupt an entry or fail a publish.
#[derive(Debug, Clone)]
pub struct FakeSnapshotStore {
    root: std::path::PathBuf,
    inner: Arc<Mutex<FakeSnapshotInner>>,
}

impl Default for FakeSnapshotStore {
    fn default() -> Self {
        Self::new()
    }
}

/// The guard inside drafts of a [`FakeSnapshotStore`]: dropping it abandons the draft.
#[derive(Debug)]
struct FakeDraftGuard {
    inner: Arc<Mutex<FakeSnapshotInner>>,
    key: crate::snapshot::SnapshotKey,
    armed: bool,
}

impl FakeDraftGuard {
    fn release(&mut self, abandoned: bool) {
        if !self.armed {
            return;
        }
        self.armed = false;
        if let Ok(mut inner) = self.inner.lock() {
            inner.drafting.remove(&self.key);
            if abandoned {
                inner.counts.abandoned += 1;
            }
        }
    }
}

impl Drop for FakeDraftGuard {
    fn drop(&mut self) {
        self.release(true);
    }
}

impl FakeSnapshotStore {
    /// An empty store with made-up paths under `/nonexistent/sbx-fake-snapshots`.
    pub fn new() -> Self {
        Self::with_root("/nonexistent/sbx-fake-snapshots")
    }

    /// An empty store whose made-up paths are under `root` (nothing is written there).
    pub fn with_root(root: impl Into<std::path::PathBuf>) -> Self {
        Self {
            root: root.into(),
            inner: Arc::new(Mutex::new(FakeSnapshotInner::default())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeSnapshotInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn snapshot_of(&self, key: crate::snapshot::SnapshotKey) -> crate::snapshot::Snapshot {
        let dir = self.root.join(key.to_string());
        let ram = dir.join("ram");
        let state = dir.join("state");
        let digest = |path: &std::path::Path| crate::snapshot::FileDigest {
            size: 4096,
            sha256: Sha256Digest::of(path.as_os_str().as_encoded_bytes()),
        };
        crate::snapshot::Snapshot {
            key,
            manifest: crate::snapshot::SnapshotManifest {
                format: crate::snapshot::SNAPSHOT_MANIFEST_FORMAT,
                key,
                ram: digest(&ram),
                state: digest(&state),
                created_unix_ms: 0,
                created_by: "FakeSnapshotStore".to_owned(),
            },
            ram,
            state,
        }
    }

    /// Publishes a snapshot of `key` directly (as if an earlier process made it).
    pub fn insert(&self, key: crate::snapshot::SnapshotKey) -> crate::snapshot::Snapshot {
        let snapshot = self.snapshot_of(key);
        self.lock().published.insert(key, snapshot.clone());
        snapshot
    }

    /// Marks the published entry of `key` corrupted: the next lookup discards it.
    pub fn corrupt(&self, key: &crate::snapshot::SnapshotKey) {
        self.lock().corrupted.insert(*key);
    }

    /// Makes the next `n` publishes fail (as a full disk would): nothing is published.
    pub fn fail_next_publishes(&self, n: usize) {
        self.lock().fail_publish = n;
    }

    /// True when `key` is published.
    pub fn is_published(&self, key: &crate::snapshot::SnapshotKey) -> bool {
        self.lock().published.contains_key(key)
    }

    /// True when a draft of `key` is open.
    pub fn is_drafting(&self, key: &crate::snapshot::SnapshotKey) -> bool {
        self.lock().drafting.contains(key)
    }

    /// What the store was asked to do so far.
    pub fn counts(&self) -> FakeSnapshotCounts {
        self.lock().counts
    }
}

#[async_trait]
impl crate::snapshot::SnapshotStore for FakeSnapshotStore {
    async fn lookup(
        &self,
        key: &crate::snapshot::SnapshotKey,
    ) -> Result<Option<crate::snapshot::Snapshot>> {
        let mut inner = self.lock();
        inner.counts.lookups += 1;
        if inner.corrupted.remove(key) && inner.published.remove(key).is_some() {
            inner.counts.discarded += 1;
            return Ok(None);
        }
        let found = inner.published.get(key).cloned();
        if found.is_some() {
            inner.counts.hits += 1;
        }
        Ok(found)
    }

    async fn begin(
        &self,
        key: &crate::snapshot::SnapshotKey,
    ) -> Result<Option<crate::snapshot::SnapshotDraft>> {
        let mut inner = self.lock();
        if inner.published.contains_key(key) || !inner.drafting.insert(*key) {
            inner.counts.begin_refused += 1;
            return Ok(None);
        }
        inner.counts.drafts += 1;
        inner.next_draft += 1;
        let dir = self.root.join(format!(".draft-{key}-{}", inner.next_draft));
        // Under a real root (a test's temp dir), the draft dir exists for files to go in.
        if self.root.is_dir() {
            let _ = std::fs::create_dir_all(&dir);
        }
        let guard = FakeDraftGuard {
            inner: self.inner.clone(),
            key: *key,
            armed: true,
        };
        Ok(Some(crate::snapshot::SnapshotDraft::new(
            *key,
            dir.join("ram"),
            dir.join("state"),
            guard,
        )))
    }

    async fn publish(
        &self,
        draft: crate::snapshot::SnapshotDraft,
    ) -> Result<crate::snapshot::Snapshot> {
        let key = *draft.key();
        let mut guard = draft
            .into_guard()
            .downcast::<FakeDraftGuard>()
            .map_err(|_| {
                Error::permanent(
                    crate::error::PermanentCause::Internal,
                    "draft was not made by this snapshot store",
                )
            })?;
        let failing = {
            let mut inner = self.lock();
            if inner.fail_publish > 0 {
                inner.fail_publish -= 1;
                inner.counts.publish_failures += 1;
                true
            } else {
                false
            }
        };
        if failing {
            guard.release(true);
            return Err(Error::transient(
                TransientCause::Infrastructure,
                "snapshot publish failed: no space left on device (fake)",
            )
            .with_operation("snapshot_publish"));
        }
        guard.release(false);
        let snapshot = self.snapshot_of(key);
        let mut inner = self.lock();
        inner.counts.published += 1;
        Ok(inner.published.entry(key).or_insert(snapshot).clone())
    }

    async fn abandon(&self, draft: crate::snapshot::SnapshotDraft) -> Result<()> {
        match draft.into_guard().downcast::<FakeDraftGuard>() {
            Ok(mut guard) => {
                guard.release(true);
                Ok(())
            }
            Err(_) => Err(Error::permanent(
                crate::error::PermanentCause::Internal,
                "draft was not made by this snapshot store",
            )),
        }
    }

    async fn remove(&self, key: &crate::snapshot::SnapshotKey) -> Result<bool> {
        let mut inner = self.lock();
        inner.corrupted.remove(key);
        Ok(inner.published.remove(key).is_some())
    }

    async fn list(&self) -> Result<Vec<crate::snapshot::SnapshotEntry>> {
        let inner = self.lock();
        let mut entries: Vec<_> = inner
            .published
            .values()
            .map(|s| crate::snapshot::SnapshotEntry {
                key: s.key,
                manifest: Some(s.manifest.clone()),
            })
            .collect();
        entries.sort_by_key(|e| e.key);
        Ok(entries)
    }

    async fn clear(&self) -> Result<usize> {
        let mut inner = self.lock();
        inner.corrupted.clear();
        let n = inner.published.len();
        inner.published.clear();
        Ok(n)
    }
}

impl FakeAgent {
    /// `Resume` messages received so far: (unix_time_ns, entropy).
    pub fn resumes(&self) -> Vec<(u64, Bytes)> {
        self.state
            .lock()
            .map(|s| s.resumes.clone())
            .unwrap_or_default()
    }

    /// Answers `Resume` like the agent: the entropy length is checked; `reseeded` is 0 (the
    /// fake has no REPLs), `crng_reseeds` counts the resumes.
    fn resume(&self, unix_time_ns: u64, entropy: Bytes) -> GuestMessage {
        if self.refuse_resume.load(Ordering::SeqCst) {
            return GuestMessage::Error {
                kind: GuestErrorKind::Io,
                message: "fake agent: resume refused".into(),
            };
        }
        if let Err(message) = guest_proto::limits::validate_resume_entropy(&entropy) {
            return GuestMessage::Error {
                kind: GuestErrorKind::Request,
                message,
            };
        }
        let count = self
            .state
            .lock()
            .map(|mut s| {
                s.resumes.push((unix_time_ns, entropy));
                s.resumes.len()
            })
            .unwrap_or_default();
        GuestMessage::Resumed {
            reseeded: 0,
            crng_reseeds: count as u64,
        }
    }
}
