//! Host capability probes for sbx: accelerator, QEMU features, cgroups, io_uring.
//!
//! This crate is filled in by a later issue; it currently exposes nothing.
