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
}

impl FakeChannel {
    /// Answers connects with `behaviors` in order; `Ok` once the list is used up.
    pub fn new(behaviors: Vec<ConnectBehavior>) -> Self {
        Self {
            behaviors: Arc::new(Mutex::new(behaviors)),
            agents: Arc::new(Mutex::new(Vec::new())),
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
    alive: Arc<AtomicBool>,
    next_op: Arc<AtomicU64>,
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
            alive: Arc::new(AtomicBool::new(true)),
            next_op: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Breaks the transport: every pending stream ends.
    pub fn kill_transport(&self) {
        self.alive.store(false, Ordering::SeqCst);
        if let Ok(mut s) = self.state.lock() {
            s.streams.clear();
            s.pending_writes.clear();
        }
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
            HostMessage::ListDir { .. } => {
                let mut entries: Vec<DirEntry> = self
                    .state
                    .lock()
                    .map(|s| {
                        s.files
                            .iter()
                            .map(|(k, v)| DirEntry {
                                name: k.clone(),
                                is_dir: false,
                                size: v.len() as u64,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                entries.sort_by(|a, b| a.name.cmp(&b.name));
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
}

impl FakeCounters {
    /// VMs launched and not yet killed or exited.
    pub fn running(&self) -> usize {
        self.processes
            .lock()
            .map(|p| p.iter().filter(|p| p.try_exit().is_none()).count())
            .unwrap_or(0)
    }

    /// True when every overlay and limit was released.
    pub fn all_released(&self) -> bool {
        self.overlays_acquired.load(Ordering::SeqCst)
            == self.overlays_released.load(Ordering::SeqCst)
            && self.limits_created.load(Ordering::SeqCst)
                == self.limits_removed.load(Ordering::SeqCst)
    }
}

/// A hypervisor whose VMs are [`FakeProcess`]es.
#[derive(Debug, Clone)]
pub struct FakeHypervisor(pub Arc<FakeCounters>);

#[async_trait]
impl crate::ports::Hypervisor for FakeHypervisor {
    async fn launch(&self, _spec: &crate::ports::VmSpec) -> Result<Box<dyn VmProcess>> {
        let n = self.0.launches.fetch_add(1, Ordering::SeqCst);
        let p = FakeProcess::new(1000 + n as u32);
        if let Ok(mut v) = self.0.processes.lock() {
            v.push(p.clone());
        }
        Ok(Box::new(p))
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

/// A VM manager over the fakes, with guest assets written into `dir`.
pub fn fake_manager(
    dir: &std::path::Path,
    max_vms: usize,
) -> (crate::manager::VmManager, Arc<FakeCounters>, FakeChannel) {
    let counters = Arc::new(FakeCounters::default());
    let assets = crate::manager::GuestAssets::in_dir(dir);
    for p in [&assets.kernel, &assets.initramfs]
        .into_iter()
        .chain(assets.images.values())
    {
        let _ = std::fs::write(p, b"asset");
    }
    let channel = FakeChannel::new(Vec::new());
    let ports = crate::manager::Ports {
        hypervisor: Arc::new(FakeHypervisor(counters.clone())),
        overlays: Arc::new(FakeOverlays(counters.clone())),
        limiter: Arc::new(FakeLimiter(counters.clone())),
        network: None,
        channel: Arc::new(channel.clone()),
    };
    let mut cfg = crate::manager::VmManagerConfig::new(
        assets,
        dir.join("work"),
        crate::ports::Accelerator::Tcg,
    );
    cfg.max_vms = max_vms;
    cfg.boot_timeout = Duration::from_secs(2);
    (
        crate::manager::VmManager::new(cfg, ports),
        counters,
        channel,
    )
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
