//! The ports: the only ways orchestration reaches the outside world.
//!
//! Each port is a small object-safe async trait. Real adapters live in sibling crates
//! (`qemu-cmd`, `overlay`, `cgroupv2`, `netproxy`); tests use the mockall mocks exported
//! behind the `mocks` feature (`MockHypervisor`, `MockVmProcess`, `MockOverlayStore`,
//! `MockResourceLimiter`, `MockNetworkProxy`, `MockGuestChannel`, `MockGuestConnection`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use guest_proto::{GuestMessage, HostMessage, OpId};
use tokio::sync::mpsc;

use crate::error::Result;
use crate::request::PortMapping;
use crate::result::ExposedPort;
use crate::vm::VmId;

/// How guest code is executed by the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// What the hypervisor must attach for the VM's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkAttachment {
    /// A unix stream socket speaking QEMU's `-netdev stream` framing.
    UnixStream {
        /// The socket the proxy listens on.
        socket: PathBuf,
    },
}

/// Where the guest console goes.
#[derive(Debug, Clone)]
pub struct ConsoleSpec {
    /// Bounded console log file in the work dir.
    pub log_path: PathBuf,
    /// Bytes of console output kept.
    pub max_bytes: u64,
    /// Optional live stream of console lines (boot log).
    pub lines: Option<mpsc::UnboundedSender<String>>,
    /// Verbose kernel output (debug boots).
    pub verbose: bool,
}

/// Everything needed to launch one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The VM's id.
    pub vm_id: VmId,
    /// Per-VM directory for sockets, overlay and logs (0700).
    pub work_dir: PathBuf,
    /// PVH `vmlinux`.
    pub kernel: PathBuf,
    /// Compressed initramfs.
    pub initramfs: PathBuf,
    /// Writable root disk (the overlay).
    pub disk: PathBuf,
    /// Guest memory in MiB.
    pub memory_mb: u32,
    /// Where the guest memory comes from.
    pub memory: MemoryBacking,
    /// A disk-backed home directory of this many MB: the hypervisor adapter creates an
    /// empty ext4 image in `work_dir` and attaches it with the virtio serial
    /// [`guest_proto::HOME_DISK_SERIAL`]. `None`: the guest's home is a tmpfs.
    pub home_disk_mb: Option<u32>,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// KVM or TCG.
    pub accelerator: Accelerator,
    /// Unix socket of the guest agent's virtio-serial port.
    pub agent_socket: PathBuf,
    /// Unix socket of QEMU's QMP monitor.
    pub qmp_socket: PathBuf,
    /// Network device, or none (`-nic none`).
    pub network: Option<NetworkAttachment>,
    /// Console handling.
    pub console: ConsoleSpec,
    /// Extra kernel command-line arguments (e.g. the guest network configuration).
    pub kernel_args: Vec<String>,
}

/// Where a VM's RAM comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MemoryBacking {
    /// Anonymous memory of the VM process (nothing to save).
    #[default]
    Anonymous,
    /// A file shared with the host (`share=on`): the VM can be saved with
    /// [`ControlCommand::Save`] without copying its RAM, which stays in `path`.
    SharedFile {
        /// The RAM file (created by the hypervisor).
        path: PathBuf,
    },
    /// A clone of a saved VM: RAM mapped copy-on-write from a published, read-only file
    /// (many clones share its pages), device state loaded from `state`, then resumed. The
    /// machine, devices, memory size, vCPUs and CPU model must equal the saved VM's.
    Restore {
        /// The published RAM file (never written).
        ram: PathBuf,
        /// The published device state.
        state: PathBuf,
    },
}

/// How a VM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitInfo {
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// Signal, when it was killed by one.
    pub signal: Option<i32>,
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => write!(f, "signal {s}"),
            (None, None) => f.write_str("unknown exit status"),
        }
    }
}

/// Commands of the hypervisor's control interface (QMP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlCommand {
    /// Pause the vCPUs.
    Stop,
    /// Resume the vCPUs.
    Cont,
    /// Ask QEMU to exit.
    Quit,
    /// Report the run state.
    QueryStatus,
    /// Pause the vCPUs and write the device state to `state` (the RAM stays in the
    /// [`MemoryBacking::SharedFile`]); the VM stays paused. Only for shared-file VMs.
    Save {
        /// Where the device state goes.
        state: PathBuf,
    },
}

/// Answer of the control interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlReply {
    /// The command succeeded.
    Done,
    /// Run state (`running`, `paused`, ...).
    Status {
        /// True when the vCPUs run.
        running: bool,
        /// QEMU's status string.
        status: String,
    },
}

/// Launches VMs.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Starts a VM from `spec`. Returns once the process runs, not when the guest is up.
    /// A [`MemoryBacking::Restore`] spec is resumed from its snapshot before this returns.
    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn VmProcess>>;

    /// What a VM saved on this hypervisor under `accelerator` must share with the VMs that
    /// restore it (part of the snapshot key); `None` when it cannot save and restore VMs.
    /// `networked`: the VM has a network device (attached to a [`NetworkProxy`]).
    fn snapshot_profile(
        &self,
        accelerator: Accelerator,
        networked: bool,
    ) -> Option<SnapshotProfile> {
        let _ = (accelerator, networked);
        None
    }
}

/// The hypervisor's part of a snapshot key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotProfile {
    /// The hypervisor's version, verbatim.
    pub version: String,
    /// The guest CPU model.
    pub cpu_model: String,
    /// Machine and device list, canonical (what must be equal on both sides).
    pub devices: String,
}

/// A running VM process.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait VmProcess: Send + Sync {
    /// Host pid of the VM process.
    fn pid(&self) -> Option<u32>;
    /// Resolves when the process has exited.
    async fn wait_exit(&self) -> ExitInfo;
    /// The exit status if the process already exited.
    fn try_exit(&self) -> Option<ExitInfo>;
    /// Terminates the process (TERM, then KILL after `grace`). Idempotent.
    async fn kill(&self, grace: Duration) -> Result<()>;
    /// Sends a command to the control interface.
    async fn control(&self, cmd: ControlCommand) -> Result<ControlReply>;
    /// The last lines of the VM's stderr, for diagnostics.
    fn stderr_tail(&self) -> String;
    /// The last lines of the guest console, for diagnostics.
    fn console_tail(&self) -> String;
}

/// A writable disk for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// Path of the overlay file.
    pub path: PathBuf,
}

/// Hands out writable overlays over read-only base images.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait OverlayStore: Send + Sync {
    /// A fresh overlay over `base`, placed in `work_dir`.
    async fn acquire(&self, base: &std::path::Path, work_dir: &std::path::Path) -> Result<Overlay>;
    /// Deletes an overlay. Idempotent.
    async fn release(&self, overlay: &Overlay) -> Result<()>;
}

/// Resource limits for one VM (QEMU and its helpers).
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceLimits {
    /// Tenant the VM is accounted to.
    pub tenant: String,
    /// Memory ceiling in bytes for the whole VM process.
    pub memory_max_bytes: u64,
    /// CPU ceiling in cores (e.g. 1.25).
    pub cpu_max_cores: f64,
    /// Maximum number of tasks.
    pub pids_max: u64,
}

/// Which mechanism enforces the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitMode {
    /// A cgroup v2 leaf per VM.
    CgroupV2,
    /// Per-process rlimits (cgroup v2 controllers not delegated).
    Rlimit,
}

/// A handle to one VM's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitHandle {
    /// The VM.
    pub vm_id: VmId,
    /// How limits are enforced.
    pub mode: LimitMode,
    /// The cgroup directory, in cgroup mode.
    pub cgroup: Option<PathBuf>,
}

/// Measured usage of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResourceUsage {
    /// CPU time in milliseconds.
    pub cpu_time_ms: Option<u64>,
    /// Peak memory in bytes.
    pub memory_peak_bytes: Option<u64>,
}

/// Creates and removes per-VM resource limits.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait ResourceLimiter: Send + Sync {
    /// Prepares limits for a VM.
    async fn create(&self, vm_id: VmId, limits: &ResourceLimits) -> Result<LimitHandle>;
    /// Puts a process under the limits.
    async fn attach(&self, handle: &LimitHandle, pid: u32) -> Result<()>;
    /// Reads CPU time and peak memory.
    async fn usage(&self, handle: &LimitHandle) -> Result<ResourceUsage>;
    /// Removes the limits. Idempotent.
    async fn remove(&self, handle: &LimitHandle) -> Result<()>;
}

/// What a VM may reach on the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkPolicy {
    /// No network device at all.
    None,
    /// Only host→guest port forwards; every guest-initiated connection is refused.
    PortsOnly {
        /// Forwards.
        ports: Vec<PortMapping>,
    },
    /// Only these domains and their subdomains.
    Allowlist {
        /// Allowed domains (validated, lowercase).
        domains: Vec<String>,
        /// Forwards.
        ports: Vec<PortMapping>,
    },
    /// Unfiltered outbound access (explicit opt-in).
    Open {
        /// Forwards.
        ports: Vec<PortMapping>,
    },
}

impl NetworkPolicy {
    /// The policy a validated request asks for.
    pub fn from_request(req: &crate::request::NetworkRequest) -> Self {
        let ports = req.expose_ports.clone();
        match (
            req.allow_network,
            req.allowed_domains.is_empty(),
            ports.is_empty(),
        ) {
            (false, _, true) => Self::None,
            (false, _, false) => Self::PortsOnly { ports },
            (true, true, _) => Self::Open { ports },
            (true, false, _) => Self::Allowlist {
                domains: req.allowed_domains.clone(),
                ports,
            },
        }
    }
}

/// A running per-VM network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkHandle {
    /// The VM.
    pub vm_id: VmId,
    /// What QEMU attaches to.
    pub attachment: NetworkAttachment,
    /// Forwards that are listening on the host.
    pub exposed_ports: Vec<ExposedPort>,
    /// Kernel command-line arguments that configure the guest side of this network.
    pub guest_kernel_args: Vec<String>,
}

/// Starts and stops per-VM networks.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait NetworkProxy: Send + Sync {
    /// Starts the network for `policy` (never called with [`NetworkPolicy::None`]).
    async fn start(
        &self,
        vm_id: VmId,
        policy: &NetworkPolicy,
        work_dir: &std::path::Path,
    ) -> Result<NetworkHandle>;
    /// Stops it and closes every listener. Idempotent.
    async fn stop(&self, handle: &NetworkHandle) -> Result<()>;

    /// What a guest restored from a memory snapshot depends on in the network it is
    /// attached to — its address, the gateway's IP and MAC (in the guest's ARP cache), the
    /// MTU, the kernel arguments — as one canonical string that is the same for every VM
    /// this proxy starts, whatever its policy. Part of the snapshot key of networked VMs;
    /// `None` when this proxy cannot serve a restored guest (such VMs then always boot).
    fn restorable_shape(&self) -> Option<String> {
        None
    }
}

/// What the guest said when the channel connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Protocol version the agent speaks.
    pub protocol_version: u8,
    /// Agent build version.
    pub agent_version: String,
    /// Guest boot time reported by the agent, when known.
    pub boot_ms: Option<u64>,
    /// Guest time the agent spent on its setup as PID 1, in microseconds, when known.
    pub setup_us: Option<u64>,
    /// Successful kernel CRNG reseeds in the guest so far, when the agent reseeds.
    pub crng_reseeds: Option<u64>,
}

impl AgentInfo {
    /// What a `Pong` says; any other message is handed back.
    pub fn from_pong(msg: GuestMessage) -> std::result::Result<Self, GuestMessage> {
        match msg {
            GuestMessage::Pong {
                protocol_version,
                agent_version,
                boot_ms,
                setup_us,
                crng_reseeds,
            } => Ok(Self {
                protocol_version,
                agent_version,
                boot_ms,
                setup_us,
                crng_reseeds,
            }),
            other => Err(other),
        }
    }
}

/// The replies and events of one operation. `None` from [`OpStream::recv`] means the
/// transport was lost before the operation finished.
#[derive(Debug)]
pub struct OpStream {
    /// The operation's id.
    pub op_id: OpId,
    /// Its replies, in order.
    pub rx: mpsc::Receiver<GuestMessage>,
}

impl OpStream {
    /// The next reply, or `None` when the transport is gone.
    pub async fn recv(&mut self) -> Option<GuestMessage> {
        self.rx.recv().await
    }
}

/// Opens connections to a VM's guest agent.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait GuestChannel: Send + Sync {
    /// Connects to the agent behind `socket`, checks the peer, and completes the version
    /// handshake within `timeout`.
    async fn connect(
        &self,
        socket: &std::path::Path,
        timeout: Duration,
    ) -> Result<(Box<dyn GuestConnection>, AgentInfo)>;
}

/// A connected guest agent.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait GuestConnection: Send + Sync {
    /// Sends a request under a fresh operation id and returns its reply stream.
    async fn request(&self, msg: HostMessage) -> Result<OpStream>;
    /// Sends a follow-up frame of an existing operation (file chunks, cancel).
    async fn send(&self, op_id: OpId, msg: HostMessage) -> Result<()>;
    /// True while the transport is up.
    fn is_alive(&self) -> bool;
    /// Closes the transport; pending operations see the end of their streams.
    async fn close(&self);
}
