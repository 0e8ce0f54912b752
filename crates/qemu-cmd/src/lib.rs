//! QEMU microvm adapters for sbx: the command line, the process, QMP and the
//! virtio-serial guest channel.
//!
//! - [`QemuCommandBuilder`] turns a [`VmSpec`](sandbox_core::ports::VmSpec) and the
//!   probed [`QemuFeatures`] into an argv, without I/O.
//! - [`QemuHypervisor`] implements the [`Hypervisor`](sandbox_core::ports::Hypervisor)
//!   port: it spawns QEMU in its own process group (inside `unshare` namespaces and as the
//!   `sbx-qemu` user when the host allows), drains stdout (the console) and stderr into
//!   bounded buffers, and hands out a [`QemuProcess`] (the
//!   [`VmProcess`](sandbox_core::ports::VmProcess) port) with QMP control.
//! - [`SerialGuestChannel`] implements the
//!   [`GuestChannel`](sandbox_core::ports::GuestChannel) port over the agent's
//!   virtio-serial port ([`AGENT_PORT_NAME`]), checking the peer's uid with SO_PEERCRED
//!   before sending anything.

mod channel;
mod command;
mod error;
pub mod home_disk;
mod hypervisor;
mod peer;
mod process;
pub mod qmp;
pub mod ring;
mod sys;

pub use channel::{
    DEFAULT_OP_QUEUE, DEFAULT_PING_INTERVAL, SerialGuestChannel, SerialGuestConnection,
};
pub use command::{
    AGENT_PORT_NAME, CommandOptions, ConsoleTarget, DEFAULT_TB_SIZE_MB, QemuCommandBuilder,
    QemuFeatures, SANDBOX_ARG, TCG_CPU, render_argv,
};
pub use error::QemuError;
pub use hypervisor::{Isolation, QemuHypervisor};
pub use peer::peer_uid;
pub use process::{
    ConsoleCapture, DEFAULT_STDERR_BYTES, ProcessConfig, QemuProcess, RunAs, UnshareWrap,
};
