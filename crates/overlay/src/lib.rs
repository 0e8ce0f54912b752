//! qcow2 overlay store and overlay pool adapter for sbx.
//!
//! This crate is filled in by a later issue; it currently exposes nothing.
