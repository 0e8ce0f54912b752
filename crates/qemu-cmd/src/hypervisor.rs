//! The [`Hypervisor`] port implemented with QEMU.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use sandbox_core::ports::{Hypervisor, VmProcess, VmSpec};

use crate::command::{CommandOptions, QemuCommandBuilder, QemuFeatures};
use crate::process::{ConsoleCapture, ProcessConfig, QemuProcess, RunAs, UnshareWrap};

/// Isolation layers applied around QEMU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Isolation {
    /// Wrap QEMU in `unshare` (pid, mount, ipc, uts; see [`Isolation::unshare_net`]).
    pub unshare: Option<PathBuf>,
    /// Also unshare the network namespace for VMs without a network device.
    pub unshare_net: bool,
    /// Run QEMU as this user.
    pub run_as: Option<RunAs>,
}

impl Isolation {
    /// What the probes say this host can apply.
    pub fn from_report(report: &probes::HostReport) -> Self {
        Self {
            unshare: if report.unshare.usable {
                report.unshare.program.clone()
            } else {
                None
            },
            unshare_net: report.unshare.net,
            run_as: report
                .qemu_user
                .as_ref()
                .filter(|u| u.uid != report.current_uid)
                .map(|u| RunAs {
                    uid: u.uid,
                    gid: u.gid,
                }),
        }
    }
}

/// Launches QEMU microVMs.
#[derive(Debug, Clone)]
pub struct QemuHypervisor {
    qemu: PathBuf,
    features: QemuFeatures,
    options: CommandOptions,
    isolation: Isolation,
    current_uid: u32,
    control_timeout: Duration,
    stderr_bytes: usize,
}

impl QemuHypervisor {
    /// A hypervisor running `qemu` with `features`, no isolation wrappers.
    pub fn new(qemu: impl Into<PathBuf>, features: QemuFeatures) -> Self {
        Self {
            qemu: qemu.into(),
            features,
            options: CommandOptions::default(),
            isolation: Isolation::default(),
            current_uid: nix::unistd::Uid::effective().as_raw(),
            control_timeout: Duration::from_secs(5),
            stderr_bytes: crate::process::DEFAULT_STDERR_BYTES,
        }
    }

    /// Everything from the host report: binary, features, namespaces and user. Fails
    /// with a permanent `MissingDependency` error when QEMU is missing.
    pub fn from_report(report: &probes::HostReport) -> sandbox_core::Result<Self> {
        let qemu = report.require_qemu()?;
        Ok(
            Self::new(qemu.path.clone(), QemuFeatures::from_report(report))
                .with_isolation(Isolation::from_report(report)),
        )
    }

    /// Replaces the isolation layers.
    #[must_use]
    pub fn with_isolation(mut self, isolation: Isolation) -> Self {
        self.isolation = isolation;
        self
    }

    /// Replaces the command-line options.
    #[must_use]
    pub fn with_options(mut self, options: CommandOptions) -> Self {
        self.options = options;
        self
    }

    /// Timeout of each QMP command.
    #[must_use]
    pub fn with_control_timeout(mut self, timeout: Duration) -> Self {
        self.control_timeout = timeout;
        self
    }

    /// The features in use.
    pub fn features(&self) -> &QemuFeatures {
        &self.features
    }

    /// The uid QEMU runs as, which the guest channel's SO_PEERCRED check must expect.
    pub fn qemu_uid(&self) -> u32 {
        self.isolation
            .run_as
            .map(|r| r.uid)
            .unwrap_or(self.current_uid)
    }

    /// The QEMU argv for `spec` (without the program).
    pub fn command(&self, spec: &VmSpec) -> Vec<std::ffi::OsString> {
        QemuCommandBuilder::new(spec, &self.features)
            .options(self.options.clone())
            .build()
    }

    /// The process configuration for `spec`: command, wrappers, QMP and console.
    pub fn process_config(&self, spec: &VmSpec) -> ProcessConfig {
        let mut cfg = ProcessConfig::new(self.qemu.clone(), self.command(spec));
        cfg.unshare = self.isolation.unshare.clone().map(|program| UnshareWrap {
            program,
            net: self.isolation.unshare_net && spec.network.is_none(),
        });
        cfg.run_as = self.isolation.run_as;
        // Sockets QEMU creates are group-accessible only (the host program shares the
        // group when QEMU runs as its own user).
        cfg.umask = Some(0o007);
        cfg.qmp_socket = Some(spec.qmp_socket.clone());
        cfg.qmp_uid = Some(self.qemu_uid());
        cfg.control_timeout = self.control_timeout;
        cfg.console = ConsoleCapture {
            log_path: Some(spec.console.log_path.clone()),
            max_bytes: spec.console.max_bytes,
            lines: spec.console.lines.clone(),
        };
        cfg.stderr_bytes = self.stderr_bytes;
        cfg.vm_id = Some(spec.vm_id);
        cfg
    }

    /// Spawns the VM and returns the concrete process handle.
    pub async fn spawn(&self, spec: &VmSpec) -> sandbox_core::Result<QemuProcess> {
        QemuProcess::spawn(self.process_config(spec))
            .await
            .map_err(|e| {
                sandbox_core::Error::from(e)
                    .with_vm(spec.vm_id)
                    .with_operation("launch")
            })
    }
}

#[async_trait]
impl Hypervisor for QemuHypervisor {
    async fn launch(&self, spec: &VmSpec) -> sandbox_core::Result<Box<dyn VmProcess>> {
        let process = self.spawn(spec).await?;
        tracing::debug!(vm_id = %spec.vm_id, pid = ?process.pid(), "QEMU launched");
        Ok(Box::new(process))
    }
}
