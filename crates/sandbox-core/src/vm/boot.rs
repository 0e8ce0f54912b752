//! Building one VM, step by step.
//!
//! [`VmManager::build_vm`] runs boot attempts in a slot already taken: each attempt is
//! [`VmBuilder::boot`], whose steps read in order — work dir, overlay and limits (in
//! parallel), network, launch, handshake. Everything a step acquires goes into the
//! attempt's [`Teardown`] at once, so a failed step, a cancelled future or a panic
//! releases exactly what was taken. A VM restored from a memory snapshot also runs the
//! resume handshake; a restore or resume that fails discards the snapshot and boots cold
//! in the same slot. Transient boot failures are retried with jittered backoff.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tracing::{Instrument, debug, info_span, warn};

use super::{Teardown, Vm, VmId};
use crate::error::{Error, ErrorKind, Result, TransientCause};
use crate::manager::{BootTimings, VmManager, VmManagerConfig, VmOptions, VmSlot, backoff_delay};
use crate::ports::{
    AgentInfo, ConsoleSpec, GuestConnection, LimitHandle, MemoryBacking, NetworkAttachment,
    NetworkPolicy, Overlay, ResourceLimits, VmProcess, VmSpec,
};
use crate::result::{ExposedPort, millis};

/// What one boot attempt starts from.
struct BootPlan<'a> {
    opts: &'a VmOptions,
    tenant: &'a str,
    base: &'a Path,
    memory: &'a MemoryBacking,
}

/// A VM whose agent answered the handshake, with everything it holds.
pub(crate) struct Booted {
    pub(crate) vm_id: VmId,
    pub(crate) process: Arc<dyn VmProcess>,
    pub(crate) conn: Arc<dyn GuestConnection>,
    pub(crate) limits: Option<LimitHandle>,
    pub(crate) exposed_ports: Vec<ExposedPort>,
    pub(crate) agent: AgentInfo,
    pub(crate) saveable: Option<(PathBuf, PathBuf)>,
    pub(crate) teardown: Teardown,
}

/// The network a VM is attached to, when it has one.
#[derive(Default)]
struct Network {
    attachment: Option<NetworkAttachment>,
    exposed_ports: Vec<ExposedPort>,
    kernel_args: Vec<String>,
}

impl VmManager {
    /// Creates a VM in `slot` whose RAM is `memory`, retrying transient failures. A failed
    /// restore — the launch, the handshake or the resume — discards the snapshot (it may
    /// be what failed) and boots cold in the same slot.
    pub(crate) async fn build_vm(
        &self,
        slot: VmSlot,
        opts: VmOptions,
        started: Instant,
        mut memory: MemoryBacking,
    ) -> Result<Vm> {
        let mut slot = Some(slot);
        let tenant = opts
            .tenant
            .clone()
            .unwrap_or_else(|| self.config().default_tenant.clone());
        let base = self.config().assets.check(opts.language)?.to_path_buf();
        let mut timings = BootTimings {
            slot_ms: millis(started.elapsed()),
            ..Default::default()
        };

        let attempts = self.config().boot_attempts.max(1);
        let mut attempt = 1;
        loop {
            let restoring = matches!(memory, MemoryBacking::Restore { .. });
            let vm_id = VmId::new();
            let span = info_span!("create_vm", vm_id = %vm_id, language = %opts.language, attempt);
            // Owns what the attempt acquires: released before the next attempt or the error
            // is returned, and from Drop if this future is cancelled.
            let mut teardown = Teardown::new(vm_id, self.ports.clone(), self.config().kill_grace);
            let builder = VmBuilder {
                manager: self,
                vm_id,
                plan: BootPlan {
                    opts: &opts,
                    tenant: &tenant,
                    base: &base,
                    memory: &memory,
                },
            };
            // Boxed: the boot future is large and retries would otherwise grow the stack.
            let outcome = Box::pin(
                builder
                    .boot(&mut timings, &mut teardown)
                    .instrument(span.clone()),
            )
            .await;
            if outcome.is_err() {
                teardown.take().run().await;
            }
            let error = match outcome {
                Ok(mut booted) => {
                    timings.total_ms = millis(started.elapsed());
                    timings.restored = restoring;
                    booted.teardown.slot = slot.take().map(VmSlot::into_permit);
                    let vm = self.register(booted, opts.language, opts.memory_mb, timings.clone());
                    if !restoring {
                        return Ok(vm);
                    }
                    // A clone: before anything else, the guest gets the host's clock and
                    // fresh entropy, and every REPL reseeds (clones of one snapshot must
                    // diverge).
                    match vm.resume().instrument(span).await {
                        Ok(info) => {
                            debug!(vm_id = %vm_id, reseeded = info.reseeded, took_ms = info.round_trip_ms, "clone resumed");
                            vm.add_boot_time(info.round_trip_ms, millis(started.elapsed()));
                            return Ok(vm);
                        }
                        Err(e) => {
                            // The slot stays with this request for the cold boot.
                            slot = vm.take_slot().await.map(VmSlot::from_permit);
                            vm.destroy().await;
                            e
                        }
                    }
                }
                Err(e) => e,
            };
            let Some(_) = slot else {
                // Only reachable if the slot could not be taken back from a destroyed VM.
                return Err(error);
            };
            if restoring {
                warn!(vm_id = %vm_id, error = %error, "restoring the L1 snapshot failed: discarding it, booting cold");
                self.discard_snapshot(&opts).await;
                memory = MemoryBacking::Anonymous;
                timings.retries += 1;
            } else if error.is_retryable() && attempt < attempts {
                let cfg = self.config();
                let delay = backoff_delay(cfg.backoff_base, cfg.backoff_max, attempt);
                warn!(vm_id = %vm_id, attempt, error = %error, delay_ms = millis(delay), "boot failed, retrying");
                timings.retries += 1;
                attempt += 1;
                tokio::time::sleep(delay).await;
            } else {
                return Err(error);
            }
        }
    }
}

/// One boot attempt of one VM.
struct VmBuilder<'a> {
    manager: &'a VmManager,
    vm_id: VmId,
    plan: BootPlan<'a>,
}

impl VmBuilder<'_> {
    fn cfg(&self) -> &VmManagerConfig {
        self.manager.config()
    }

    /// Runs the steps in order; on error, `teardown` holds what was acquired.
    async fn boot(self, timings: &mut BootTimings, teardown: &mut Teardown) -> Result<Booted> {
        let setup_started = Instant::now();
        let work_dir = self.work_dir(teardown).await?;
        let overlay_started = Instant::now();
        let (overlay, limits) = self.overlay_and_limits(&work_dir, teardown).await?;
        let overlay_took = overlay_started.elapsed();
        let network = self.network(&work_dir, teardown).await?;
        let memory = self.memory(&work_dir);
        let spec = self.spec(&work_dir, &overlay, &memory, &network);
        let setup_took = setup_started.elapsed();

        let boot_started = Instant::now();
        let process = self.launch(&spec, &limits, teardown).await?;
        let wait_started = Instant::now();
        let (conn, agent) = self.handshake(&spec, &process, teardown).await?;

        timings.setup_ms = millis(setup_took);
        timings.overlay_ms = millis(overlay_took);
        timings.guest_wait_ms = millis(wait_started.elapsed());
        timings.boot_ms = millis(boot_started.elapsed());
        let saveable = match &memory {
            MemoryBacking::SharedFile { path } => Some((path.clone(), work_dir.join("state"))),
            _ => None,
        };
        Ok(Booted {
            vm_id: self.vm_id,
            process,
            conn,
            limits: Some(limits),
            exposed_ports: network.exposed_ports,
            agent,
            saveable,
            teardown: teardown.take(),
        })
    }

    /// Step 1: the VM's private work dir (sockets, console log, overlay, RAM file).
    async fn work_dir(&self, teardown: &mut Teardown) -> Result<PathBuf> {
        let work_dir =
            self.cfg()
                .work_root
                .join(format!("vm-{}-{}", std::process::id(), self.vm_id.short()));
        create_private_dir(&work_dir).await.map_err(|e| {
            Error::transient(
                TransientCause::Infrastructure,
                format!("cannot create work dir {}", work_dir.display()),
            )
            .with_source(e)
            .with_vm(self.vm_id)
        })?;
        teardown.work_dir = Some(work_dir.clone());
        Ok(work_dir)
    }

    /// Step 2: the copy-on-write overlay over the base image and the resource limits,
    /// in parallel.
    async fn overlay_and_limits(
        &self,
        work_dir: &Path,
        teardown: &mut Teardown,
    ) -> Result<(Overlay, LimitHandle)> {
        let cfg = self.cfg();
        let ports = &self.manager.ports;
        let limits = ResourceLimits {
            tenant: self.plan.tenant.to_owned(),
            memory_max_bytes: (u64::from(self.plan.opts.memory_mb) + cfg.vm_overhead_mb)
                * 1024
                * 1024,
            cpu_max_cores: f64::from(cfg.vcpus) + 0.25,
            pids_max: cfg.pids_max,
        };
        // Each result goes into the guard the moment it arrives (no await in between), so
        // a cancellation while the other is still pending, or a failure of the other,
        // never loses what one of them acquired.
        let (overlay, limit_handle) = {
            let guard = std::sync::Mutex::new(&mut *teardown);
            let keep = |f: &dyn Fn(&mut Teardown)| match guard.lock() {
                Ok(mut g) => f(&mut g),
                Err(poisoned) => f(&mut poisoned.into_inner()),
            };
            tokio::join!(
                async {
                    let r = ports.overlays.acquire(self.plan.base, work_dir).await;
                    if let Ok(o) = &r {
                        keep(&|t| t.overlay = Some(o.clone()));
                    }
                    r
                },
                async {
                    let r = ports.limiter.create(self.vm_id, &limits).await;
                    if let Ok(h) = &r {
                        keep(&|t| t.limits = Some(h.clone()));
                    }
                    r
                },
            )
        };
        let overlay = overlay.map_err(|e| e.with_vm(self.vm_id).with_operation("overlay"))?;
        let limits = limit_handle.map_err(|e| e.with_vm(self.vm_id).with_operation("limits"))?;
        Ok((overlay, limits))
    }

    /// Step 3: the VM's own network proxy, when the policy opens any network.
    async fn network(&self, work_dir: &Path, teardown: &mut Teardown) -> Result<Network> {
        let policy = &self.plan.opts.network;
        let Some(proxy) = &self.manager.ports.network else {
            return Ok(Network::default());
        };
        if matches!(policy, NetworkPolicy::None) {
            return Ok(Network::default());
        }
        let handle = proxy
            .start(self.vm_id, policy, work_dir)
            .await
            .map_err(|e| e.with_vm(self.vm_id).with_operation("network"))?;
        let network = Network {
            attachment: Some(handle.attachment.clone()),
            exposed_ports: handle.exposed_ports.clone(),
            kernel_args: handle.guest_kernel_args.clone(),
        };
        teardown.network = Some(handle);
        Ok(network)
    }

    /// Where the guest's RAM comes from. A saveable VM's RAM file lives in its work dir
    /// (shared with QEMU's user).
    fn memory(&self, work_dir: &Path) -> MemoryBacking {
        match self.plan.memory {
            MemoryBacking::SharedFile { path } if path.is_relative() => MemoryBacking::SharedFile {
                path: work_dir.join(path),
            },
            other => other.clone(),
        }
    }

    /// What the hypervisor launches.
    fn spec(
        &self,
        work_dir: &Path,
        overlay: &Overlay,
        memory: &MemoryBacking,
        network: &Network,
    ) -> VmSpec {
        let cfg = self.cfg();
        let opts = self.plan.opts;
        VmSpec {
            vm_id: self.vm_id,
            work_dir: work_dir.to_path_buf(),
            kernel: cfg.assets.kernel.clone(),
            initramfs: cfg.assets.initramfs.clone(),
            disk: overlay.path.clone(),
            memory_mb: opts.memory_mb,
            memory: memory.clone(),
            home_disk_mb: opts.disk_mb,
            vcpus: cfg.vcpus,
            accelerator: cfg.accelerator,
            agent_socket: work_dir.join("agent.sock"),
            qmp_socket: work_dir.join("qmp.sock"),
            network: network.attachment.clone(),
            console: ConsoleSpec {
                log_path: work_dir.join("console.log"),
                max_bytes: cfg.console_max_bytes,
                lines: opts.boot_log.clone(),
                verbose: opts.boot_log.is_some(),
            },
            kernel_args: network.kernel_args.clone(),
        }
    }

    /// Step 4: the hypervisor process, placed in its limits.
    async fn launch(
        &self,
        spec: &VmSpec,
        limits: &LimitHandle,
        teardown: &mut Teardown,
    ) -> Result<Arc<dyn VmProcess>> {
        let ports = &self.manager.ports;
        let process: Arc<dyn VmProcess> = Arc::from(
            ports
                .hypervisor
                .launch(spec)
                .await
                .map_err(|e| e.with_vm(self.vm_id).with_operation("launch"))?,
        );
        teardown.process = Some(process.clone());
        if let Some(pid) = process.pid()
            && let Err(e) = ports.limiter.attach(limits, pid).await
        {
            return Err(e.with_vm(self.vm_id).with_operation("limits"));
        }
        Ok(process)
    }

    /// Step 5: the agent's handshake, raced against the VM process exiting and bounded
    /// by the boot timeout.
    async fn handshake(
        &self,
        spec: &VmSpec,
        process: &Arc<dyn VmProcess>,
        teardown: &mut Teardown,
    ) -> Result<(Arc<dyn GuestConnection>, AgentInfo)> {
        let boot_timeout = self.cfg().boot_timeout;
        let connect = self
            .manager
            .ports
            .channel
            .connect(&spec.agent_socket, boot_timeout);
        let outcome = tokio::select! {
            exit = process.wait_exit() => Err(Error::transient(
                TransientCause::QemuCrash,
                format!(
                    "the VM process exited during boot ({exit}); stderr: {}; console: {}",
                    tail_or_none(&process.stderr_tail()),
                    tail_or_none(&process.console_tail()),
                ),
            )),
            r = tokio::time::timeout(boot_timeout, connect) => match r {
                Ok(Ok(pair)) => Ok(pair),
                // Nothing was dispatched yet: a channel failure during boot is a boot
                // failure (transient), unless the adapter says it is permanent.
                Ok(Err(e)) if matches!(e.kind(), ErrorKind::Permanent(_)) => Err(e),
                Ok(Err(e)) => {
                    let cause = if process.try_exit().is_some() {
                        TransientCause::QemuCrash
                    } else {
                        TransientCause::BootTimeout
                    };
                    Err(Error::transient(
                        cause,
                        format!(
                            "the guest agent channel failed during boot: {}; console: {}",
                            e.message(),
                            tail_or_none(&process.console_tail()),
                        ),
                    ))
                }
                Err(_) => Err(Error::transient(
                    TransientCause::BootTimeout,
                    format!(
                        "the guest agent did not answer within {} s; console: {}",
                        boot_timeout.as_secs(),
                        tail_or_none(&process.console_tail()),
                    ),
                )),
            },
        };
        let (conn, agent) = outcome.map_err(|e| e.with_vm(self.vm_id).with_operation("boot"))?;
        let conn: Arc<dyn GuestConnection> = Arc::from(conn);
        teardown.conn = Some(conn.clone());
        Ok((conn, agent))
    }
}

fn tail_or_none(s: &str) -> String {
    let t = s.trim();
    if t.is_empty() {
        "(empty)".to_owned()
    } else {
        let lines: Vec<&str> = t.lines().collect();
        let start = lines.len().saturating_sub(20);
        lines[start..].join("\n")
    }
}

async fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = tokio::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    builder.mode(0o700);
    builder.create(dir).await
}
