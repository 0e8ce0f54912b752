//! The sbx guest agent: the program inside every microVM.
//!
//! It speaks [`guest_proto`] with the host over one byte stream (a virtio-serial port in
//! the VM, a unix socket or stdio on a development host), keeps one persistent REPL per
//! language (python3, node, bash), streams their output, and moves files in and out of
//! the session root. When it runs as PID 1 it also sets up the VM ([`init`],
//! [`hardening`]).
//!
//! Layout:
//!
//! - [`config`]: what the agent needs to know (root directory, user ids, limits, interpreters).
//! - [`engine`]: the request handlers: exec, warm-up, files, packages.
//! - [`repl`]: one persistent interpreter process and the completion protocol with it.
//! - [`process`]: spawning sandboxed children, collecting their exit status, killing trees.
//! - [`files`]: path resolution below the root, streamed writes and reads, listings.
//! - [`packages`]: pip/npm installs into a user-writable prefix.
//! - [`server`]: one host connection: frame dispatch, concurrency by op id, cancellation.
//! - [`transport`]: unix socket, stdio and virtio-serial listeners.
//! - [`init`], [`hardening`] and [`net`]: PID 1 duties, only ever run inside the VM.

pub mod config;
pub mod engine;
pub mod files;
pub mod hardening;
pub mod init;
pub mod net;
pub mod packages;
pub mod process;
pub mod repl;
pub mod server;
pub mod transport;

pub use config::{AgentConfig, JsRuntime, UserIds};
pub use engine::Engine;
pub use server::{ConnectionEnd, Outbox, serve_connection};

/// The agent's version, reported in `Pong`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
