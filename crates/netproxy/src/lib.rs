//! Userspace per-VM network gateway for sbx: DNS allowlist, SNI checks, port forwards.
//!
//! This crate is filled in by a later issue; it currently exposes nothing.
