//! QEMU microvm command line, process, QMP and virtio-serial guest channel adapters for sbx.
//!
//! This crate is filled in by a later issue; it currently exposes nothing.
