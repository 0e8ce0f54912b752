//! cgroup v2 resource limiter with rlimit fallback for sbx.
//!
//! This crate is filled in by a later issue; it currently exposes nothing.
