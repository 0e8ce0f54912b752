//! Library side of `cargo xtask`: reusable pieces the subcommands share.
//!
//! - [`assets`]: build the guest kernel, agent, initramfs and base images into a
//!   content-keyed cache, and [`assets::locate`] them for commands that boot VMs.

pub mod assets;
