//! One running microVM: the [`Vm`] handle, its lifecycle, its operations and its teardown.
//!
//! - [`lifecycle`]: ids and the state machine every VM follows.
//! - `boot`: how the manager builds one VM, step by step (work dir, overlay and limits,
//!   network, launch, handshake), every acquired resource owned by a teardown guard.
//! - [`ops`]: what runs over the guest connection (exec, files, warm-up, resume after a
//!   restore, save).
//! - `teardown`: releasing everything one VM holds, exactly once, on every path.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Language;
use crate::error::{Error, PermanentCause, Result};
use crate::manager::BootTimings;
use crate::ports::{
    AgentInfo, GuestConnection, LimitHandle, ResourceLimiter, ResourceUsage, VmProcess,
};
use crate::result::ExposedPort;

mod boot;
pub mod lifecycle;
pub mod ops;
mod teardown;

pub(crate) use boot::Booted;
pub use lifecycle::{IllegalTransition, VmId, VmLifecycle, VmState};
pub use ops::{ExecOutcome, OutputCallback, OutputCallbacks, ResumeInfo};
pub(crate) use teardown::Teardown;

pub(crate) type Registry = Arc<Mutex<HashMap<VmId, Arc<VmInner>>>>;

pub(crate) struct VmInner {
    id: VmId,
    language: Language,
    memory_mb: u32,
    state: Mutex<VmLifecycle>,
    process: Arc<dyn VmProcess>,
    conn: Arc<dyn GuestConnection>,
    limits: Option<LimitHandle>,
    limiter: Arc<dyn ResourceLimiter>,
    exposed_ports: Vec<ExposedPort>,
    agent: AgentInfo,
    timings: Mutex<BootTimings>,
    /// RAM file and device-state path of a VM booted to be saved.
    saveable: Option<(PathBuf, PathBuf)>,
    teardown: tokio::sync::Mutex<Option<Teardown>>,
    destroyed: AtomicBool,
    registry: Registry,
}

/// A running VM whose agent has answered. Destroyed by [`Vm::destroy`], or in the
/// background when dropped.
pub struct Vm {
    inner: Arc<VmInner>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.inner.id)
            .field("language", &self.inner.language)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Registers a booted VM: its lifecycle starts `Ready`, and it stays in `registry`
    /// until destroyed.
    pub(crate) fn from_booted(
        booted: Booted,
        language: Language,
        memory_mb: u32,
        timings: BootTimings,
        limiter: Arc<dyn ResourceLimiter>,
        registry: Registry,
    ) -> Self {
        let mut lifecycle = VmLifecycle::new();
        let _ = lifecycle.transition(VmState::Booting);
        let _ = lifecycle.transition(VmState::Ready);
        let inner = Arc::new(VmInner {
            id: booted.vm_id,
            language,
            memory_mb,
            state: Mutex::new(lifecycle),
            process: booted.process,
            conn: booted.conn,
            limits: booted.limits,
            limiter,
            exposed_ports: booted.exposed_ports,
            agent: booted.agent,
            timings: Mutex::new(timings),
            saveable: booted.saveable,
            teardown: tokio::sync::Mutex::new(Some(booted.teardown)),
            destroyed: AtomicBool::new(false),
            registry,
        });
        if let Ok(mut reg) = inner.registry.lock() {
            reg.insert(inner.id, inner.clone());
        }
        Vm { inner }
    }

    /// Counts `extra_ms` (the resume of a clone) as part of starting the VM.
    pub(crate) fn add_boot_time(&self, extra_ms: u64, total_ms: u64) {
        let mut t = match self.inner.timings.lock() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        };
        t.boot_ms += extra_ms;
        t.total_ms = total_ms;
    }

    /// Takes the VM's slot out of its teardown, so the caller keeps the capacity when
    /// it destroys the VM next.
    pub(crate) async fn take_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.inner
            .teardown
            .lock()
            .await
            .as_mut()
            .and_then(|t| t.slot.take())
    }

    /// The VM's id.
    pub fn id(&self) -> VmId {
        self.inner.id
    }

    /// The language of its image.
    pub fn language(&self) -> Language {
        self.inner.language
    }

    /// Guest memory in MiB.
    pub fn memory_mb(&self) -> u32 {
        self.inner.memory_mb
    }

    /// Lifecycle state.
    pub fn state(&self) -> VmState {
        match self.inner.state.lock() {
            Ok(s) => s.state(),
            Err(poisoned) => poisoned.into_inner().state(),
        }
    }

    /// Moves the lifecycle, refusing illegal transitions.
    pub(crate) fn transition(&self, next: VmState) -> Result<()> {
        let mut guard = match self.inner.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        guard.transition(next).map(|_| ()).map_err(|e| {
            Error::permanent(PermanentCause::Internal, e.to_string()).with_vm(self.inner.id)
        })
    }

    /// Ports exposed on the host.
    pub fn exposed_ports(&self) -> &[ExposedPort] {
        &self.inner.exposed_ports
    }

    /// What the agent reported at the handshake.
    pub fn agent(&self) -> &AgentInfo {
        &self.inner.agent
    }

    /// How creating this VM went.
    pub fn boot_timings(&self) -> BootTimings {
        match self.inner.timings.lock() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The guest connection.
    pub(crate) fn conn(&self) -> &Arc<dyn GuestConnection> {
        &self.inner.conn
    }

    /// The VM process.
    pub(crate) fn process(&self) -> &Arc<dyn VmProcess> {
        &self.inner.process
    }

    /// RAM file and device-state path of a VM booted to be saved.
    pub(crate) fn saveable_files(&self) -> Option<(PathBuf, PathBuf)> {
        self.inner.saveable.clone()
    }

    /// How this VM started.
    pub fn start_kind(&self) -> crate::result::VmStart {
        if self.boot_timings().restored {
            crate::result::VmStart::Snapshot
        } else {
            crate::result::VmStart::Cold
        }
    }

    /// True while the VM process runs and the channel is up.
    pub fn is_alive(&self) -> bool {
        !self.inner.destroyed.load(Ordering::SeqCst)
            && self.inner.process.try_exit().is_none()
            && self.inner.conn.is_alive()
    }

    /// Last console lines, for diagnostics.
    pub fn console_tail(&self) -> String {
        self.inner.process.console_tail()
    }

    /// Resolves when the VM process exits.
    pub async fn wait_exit(&self) -> crate::ports::ExitInfo {
        self.inner.process.wait_exit().await
    }

    /// CPU time and peak memory measured by the host.
    pub async fn usage(&self) -> ResourceUsage {
        match &self.inner.limits {
            Some(handle) => self.inner.limiter.usage(handle).await.unwrap_or_default(),
            None => ResourceUsage::default(),
        }
    }

    /// Destroys the VM: kills the process, closes the channel, removes the work dir,
    /// overlay, limits and network, releases the slot. Idempotent; returns how long it took.
    pub async fn destroy(&self) -> Duration {
        destroy_inner(&self.inner).await
    }
}

pub(crate) async fn destroy_inner(inner: &Arc<VmInner>) -> Duration {
    let started = Instant::now();
    let teardown = inner.teardown.lock().await.take();
    if let Some(teardown) = teardown {
        inner.destroyed.store(true, Ordering::SeqCst);
        {
            let mut state = match inner.state.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            if state.state() != VmState::Destroying {
                let _ = state.transition(VmState::Destroying);
            }
        }
        teardown.run().await;
        {
            let mut state = match inner.state.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            let _ = state.transition(VmState::Destroyed);
        }
        if let Ok(mut reg) = inner.registry.lock() {
            reg.remove(&inner.id);
        }
    }
    started.elapsed()
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.inner.destroyed.load(Ordering::SeqCst) {
            return;
        }
        let inner = self.inner.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                destroy_inner(&inner).await;
            });
        }
    }
}
