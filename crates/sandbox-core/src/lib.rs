//! sbx core: the ports, the domain model and the orchestration of sandboxed execution.
//!
//! This crate never talks to QEMU, cgroups or the network directly. It defines the ports
//! ([`ports::Hypervisor`], [`ports::OverlayStore`], [`ports::ResourceLimiter`],
//! [`ports::NetworkProxy`], [`ports::GuestChannel`], [`snapshot::SnapshotStore`]) that
//! adapter crates implement, the domain types callers use ([`RunRequest`],
//! [`ExecutionResult`], [`Error`], ...), and the orchestration that is written only against the ports ([`manager::VmManager`]).
//!
//! Mocks of every port are exported behind the `mocks` feature for other crates' tests.

pub mod admission;
pub mod error;
pub mod manager;
pub mod ports;
pub mod request;
pub mod restore;
pub mod result;
pub mod scheduler;
pub mod session;
pub mod snapshot;
pub mod vm;
pub mod warm_pool;

pub use error::{Error, ErrorContext, ErrorKind, PermanentCause, Result, TransientCause};
pub use guest_proto::Language;
pub use manager::{BootTimings, GuestAssets, Ports, VmManager, VmManagerConfig, VmOptions, VmSlot};
pub use request::{
    ExecRequest, NetworkRequest, PortMapping, PortProtocol, RunRequest, SessionRequest,
};
pub use result::{ExecutionResult, ExposedPort, TimingBreakdown};
pub use scheduler::{RunOptions, Scheduler, SchedulerConfig};
pub use session::Session;
pub use snapshot::{
    FileDigest, Snapshot, SnapshotDraft, SnapshotEntry, SnapshotKey, SnapshotKeyInputs,
    SnapshotManifest, SnapshotStore,
};
pub use vm::{
    ExecOutcome, IllegalTransition, OutputCallback, OutputCallbacks, ResumeInfo, Vm, VmId,
    VmLifecycle, VmState,
};

#[cfg(any(test, feature = "mocks"))]
pub mod testing;

#[cfg(test)]
mod manager_tests;

#[cfg(test)]
mod scheduler_tests;
