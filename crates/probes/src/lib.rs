//! Host capability probes for sbx: accelerator, QEMU features, cgroups, io_uring,
//! namespaces and the unprivileged QEMU user.
//!
//! [`probe_host`] runs every probe concurrently and returns a [`HostReport`];
//! [`HostProbes`] (or the process-wide [`host_report`]) caches it so that many VMs
//! starting at once probe only once. The accelerator verdict is additionally cached on
//! disk (see [`accel`]): KVM is chosen only when a canary guest really runs on it.
//!
//! Every probe takes its roots (`/proc`, `/sys/fs/cgroup`, `/dev/kvm`, `/etc/passwd`, the
//! QEMU binary) from [`ProbeConfig`], so tests run against fake trees.

pub mod accel;
mod cmd;
pub mod error;
pub mod host;
pub mod qemu;
mod report;
mod sys;

pub use accel::{AccelProbe, AccelVerdict, CanaryOutcome, probe_accelerator, run_canary};
pub use error::{ProbeError, QEMU_NOT_FOUND};
pub use host::{CgroupLayout, CgroupStatus, IoUringStatus, UnshareStatus, UserAccount};
pub use qemu::{QemuInfo, QemuVersion, locate_qemu, probe_qemu};
pub use report::{
    HostProbes, HostReport, ProbeConfig, QEMU_USER, default_cache_dir, host_report, probe_host,
};
