//! qcow2 overlay store and overlay pool adapter for sbx.
//!
//! Every VM writes to its own qcow2 overlay over a read-only base image. This crate creates
//! those overlays with `qemu-img create -f qcow2 -F qcow2 -b <absolute base>
//! -o lazy_refcounts=on,cluster_size=128k,extended_l2=on` ([`create_overlay`]) and
//! implements [`sandbox_core::ports::OverlayStore`] with [`OverlayPool`], which keeps a few
//! overlays per base image ready in a private directory and hands them out by `rename`.
//!
//! Errors are [`OverlayError`]; they map into [`sandbox_core::Error`] as transient
//! `Overlay` failures, except a missing base image or `qemu-img` (permanent
//! `MissingDependency`) and bad configuration (permanent `Config`).

mod error;
mod pool;
mod qemu_img;

pub use error::OverlayError;
pub use pool::{
    OverlayPool, POOL_DIR_PREFIX, PoolConfig, PoolStats, pid_alive, pool_dir_pid,
    reap_stale_pool_dirs, release_overlay,
};
pub use qemu_img::{OverlayOptions, create_overlay, resolve_base};
