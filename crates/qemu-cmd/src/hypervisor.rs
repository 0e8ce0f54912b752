//! The [`Hypervisor`] port implemented with QEMU.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use sandbox_core::ports::{
    Accelerator, Hypervisor, MemoryBacking, NetworkAttachment, SnapshotProfile, VmProcess, VmSpec,
};

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
            run_as: report.qemu_run_as().map(|u| RunAs {
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
        if let Some(mb) = spec.home_disk_mb {
            crate::home_disk::create(&crate::home_disk::path(&spec.work_dir), mb)
                .await
                .map_err(|e| e.with_vm(spec.vm_id).with_operation("home_disk"))?;
        }
        if let Some(run_as) = self.isolation.run_as {
            share_with_group(spec, run_as.gid).map_err(|e| {
                sandbox_core::Error::permanent(
                    sandbox_core::PermanentCause::Host,
                    format!(
                        "cannot share the VM's work dir {} with QEMU's group {}: {e}",
                        spec.work_dir.display(),
                        run_as.gid
                    ),
                )
                .with_vm(spec.vm_id)
                .with_operation("launch")
            })?;
        }
        let process = QemuProcess::spawn(self.process_config(spec))
            .await
            .map_err(|e| {
                sandbox_core::Error::from(e)
                    .with_vm(spec.vm_id)
                    .with_operation("launch")
            })?;
        if let MemoryBacking::Restore { state, .. } = &spec.memory {
            // A clone: load the device state and resume. Any failure is a failed boot
            // (transient: nothing ran); the half-started QEMU dies with its handle.
            if let Err(e) = process.restore_state(state).await {
                let stderr = process.stderr_text();
                let _ = process.terminate(Duration::from_millis(100)).await;
                return Err(sandbox_core::Error::transient(
                    sandbox_core::TransientCause::Infrastructure,
                    format!("restoring the snapshot failed: {e}; stderr: {stderr}"),
                )
                .with_vm(spec.vm_id)
                .with_operation("restore"));
            }
        }
        Ok(process)
    }
}

/// Lets QEMU running as another user (primary group `gid`) use this VM's files: the work
/// dir, where QEMU creates its sockets (under umask 007), becomes 0770 and the overlay and
/// the network socket 0660, all group-owned by `gid`. Nobody else gets in; the host
/// program keeps ownership and removes everything at teardown.
pub fn share_with_group(spec: &VmSpec, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut shared = vec![
        (spec.work_dir.as_path(), 0o770),
        (spec.disk.as_path(), 0o660),
    ];
    if let Some(NetworkAttachment::UnixStream { socket }) = &spec.network {
        shared.push((socket.as_path(), 0o660));
    }
    let home = crate::home_disk::path(&spec.work_dir);
    if spec.home_disk_mb.is_some() {
        shared.push((home.as_path(), 0o660));
    }
    for (path, mode) in shared {
        std::os::unix::fs::chown(path, None, Some(gid))
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    }
    Ok(())
}

/// The command line of a saveable VM with every path, id and size replaced by a fixed
/// placeholder: what a restored VM must share with the one that was saved (machine,
/// accelerator, CPU, devices in order, kernel arguments such as the TSC rate). A
/// `networked` VM has its network device (the proxy's own arguments are in its part of
/// the key).
pub fn snapshot_devices(
    features: &QemuFeatures,
    options: &CommandOptions,
    accel: Accelerator,
    networked: bool,
) -> String {
    let p = |s: &str| PathBuf::from(s);
    let spec = VmSpec {
        vm_id: sandbox_core::VmId::from_uuid(Default::default()),
        work_dir: p("/W"),
        kernel: p("/K"),
        initramfs: p("/I"),
        disk: p("/D"),
        memory_mb: 0,
        memory: MemoryBacking::SharedFile { path: p("/R") },
        home_disk_mb: None,
        vcpus: 0,
        accelerator: accel,
        agent_socket: p("/A"),
        qmp_socket: p("/Q"),
        network: networked
            .then(|| sandbox_core::ports::NetworkAttachment::UnixStream { socket: p("/N") }),
        console: sandbox_core::ports::ConsoleSpec {
            log_path: p("/C"),
            max_bytes: 0,
            lines: None,
            verbose: false,
        },
        kernel_args: Vec::new(),
    };
    // The TSC rate is measured at each start with a few kHz of jitter: in MHz it names the
    // host's rate without making every process's snapshots differ.
    let mut features = features.clone();
    features.tsc_khz = features.tsc_khz.map(|khz| (khz + 500) / 1000 * 1000);
    let argv = QemuCommandBuilder::new(&spec, &features)
        .options(options.clone())
        .build();
    crate::command::render_argv(std::ffi::OsStr::new("qemu"), &argv)
}

#[async_trait]
impl Hypervisor for QemuHypervisor {
    async fn launch(&self, spec: &VmSpec) -> sandbox_core::Result<Box<dyn VmProcess>> {
        let process = self.spawn(spec).await?;
        tracing::debug!(vm_id = %spec.vm_id, pid = ?process.pid(), "QEMU launched");
        Ok(Box::new(process))
    }

    fn snapshot_profile(
        &self,
        accelerator: Accelerator,
        networked: bool,
    ) -> Option<SnapshotProfile> {
        if self.features.version_line.is_empty() {
            return None;
        }
        let cpu_model = match accelerator {
            Accelerator::Tcg => crate::command::TCG_CPU.to_owned(),
            // `-cpu host` ties a snapshot to this host's CPU model: name it in the key.
            Accelerator::Kvm => format!("host ({})", host_cpu_model()),
        };
        Some(SnapshotProfile {
            version: self.features.version_line.clone(),
            cpu_model,
            devices: snapshot_devices(&self.features, &self.options, accelerator, networked),
        })
    }
}

/// The host CPU's model name and microcode-independent identity from /proc/cpuinfo.
fn host_cpu_model() -> String {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default()
    };
    format!(
        "{}; family {} model {} stepping {}; flags {}",
        field("model name"),
        field("cpu family"),
        field("model"),
        field("stepping"),
        field("flags")
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    #[test]
    fn snapshot_devices_name_the_machine_not_the_measurement_noise() {
        let mut f = QemuFeatures {
            tsc_khz: Some(2_599_987),
            version_line: "QEMU emulator version 10.0.2".into(),
            ..QemuFeatures::default()
        };
        let o = CommandOptions::default();
        let a = snapshot_devices(&f, &o, Accelerator::Tcg, false);
        f.tsc_khz = Some(2_600_004);
        assert_eq!(a, snapshot_devices(&f, &o, Accelerator::Tcg, false));
        assert!(a.contains("tsc_early_khz=2600000"), "{a}");
        assert!(a.contains("memory-backend-file,id=sbx.ram"), "{a}");
        // What must match does change the profile.
        f.tsc_khz = Some(3_000_000);
        assert_ne!(a, snapshot_devices(&f, &o, Accelerator::Tcg, false));
        let mut o2 = o.clone();
        o2.balloon = true;
        assert_ne!(a, snapshot_devices(&f, &o2, Accelerator::Tcg, false));
        assert_ne!(a, snapshot_devices(&f, &o, Accelerator::Kvm, false));
        let net = snapshot_devices(&f, &o, Accelerator::Tcg, true);
        assert_ne!(a, net);
        assert!(net.contains("virtio-net"), "{net}");
    }

    #[test]
    fn share_with_group_opens_the_vm_files_to_qemus_group_only() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: changing a file's group to another group needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("vm");
        std::fs::create_dir(&work).unwrap();
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut spec = crate::command::tests::spec(sandbox_core::ports::Accelerator::Tcg);
        spec.work_dir = work.clone();
        spec.disk = work.join("overlay.qcow2");
        std::fs::write(&spec.disk, b"").unwrap();
        let socket = work.join("net.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        spec.network = Some(NetworkAttachment::UnixStream {
            socket: socket.clone(),
        });
        share_with_group(&spec, 65534).unwrap();
        for (path, mode) in [(&work, 0o770), (&spec.disk, 0o660), (&socket, 0o660)] {
            let md = std::fs::symlink_metadata(path).unwrap();
            assert_eq!(md.gid(), 65534, "{}", path.display());
            assert_eq!(md.uid(), 0, "the host program keeps ownership");
            assert_eq!(md.mode() & 0o7777, mode, "{}", path.display());
        }
        // A missing file is an error naming it.
        spec.disk = work.join("gone.qcow2");
        let err = share_with_group(&spec, 65534).unwrap_err();
        assert!(err.to_string().contains("gone.qcow2"), "{err}");
    }
}
