//! Library side of `cargo xtask`: reusable pieces the subcommands share.
//!
//! - [`assets`]: build the guest kernel, agent, initramfs and base images into a
//!   content-keyed cache, and [`assets::locate`] them for commands that boot VMs.
//! - [`smoke`]: boot each image, ping the agent, power off (`cargo xtask boot-smoke`).
//! - [`baseline`]: Debian's cloud kernel booting a trivial initramfs, the boot baseline.
//! - [`bench`](mod@bench): latency, throughput and memory figures (`cargo xtask bench`).

pub mod assets;
pub mod baseline;
pub mod bench;
pub mod bench_client;
pub mod bench_net;
pub mod smoke;
