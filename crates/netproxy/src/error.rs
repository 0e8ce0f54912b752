//! The crate's error type and its mapping into the public taxonomy.

use std::path::PathBuf;

use sandbox_core::{Error, PermanentCause, TransientCause};

/// Everything that can go wrong while setting up or running a per-VM network.
#[derive(Debug, thiserror::Error)]
pub enum NetProxyError {
    /// The unix socket QEMU connects to could not be created.
    #[error("cannot listen on the network socket {path}")]
    SocketBind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket path does not fit into `sockaddr_un` (108 bytes).
    #[error(
        "network socket path {path} is {len} bytes, at most {max} fit in a unix socket address"
    )]
    SocketPathTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A host port for a forward could not be bound.
    #[error("cannot listen on 127.0.0.1:{port} for guest port {internal}")]
    ForwardBind {
        /// The requested host port (0: OS-assigned).
        port: u16,
        /// The guest port.
        internal: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A forward asks for something this proxy does not implement.
    #[error("port forward of guest port {internal}: {reason}")]
    UnsupportedForward {
        /// The guest port.
        internal: u16,
        /// Why.
        reason: String,
    },
    /// `start` was called with `NetworkPolicy::None`.
    #[error("network policy `none` needs no proxy (the VM gets no NIC)")]
    NoNetwork,
    /// `start` was called twice for one VM.
    #[error("a network is already running for this VM")]
    AlreadyRunning,
    /// The gateway task is gone (the VM's network was stopped).
    #[error("the VM's network gateway is not running")]
    GatewayGone,
    /// A frame on the QEMU stream announced more bytes than any Ethernet frame can hold.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Resolution failed upstream.
    #[error("resolving {name} failed")]
    Resolve {
        /// The name.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another I/O failure.
    #[error("{operation} failed")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl From<NetProxyError> for Error {
    fn from(e: NetProxyError) -> Self {
        let message = e.to_string();
        let mapped = match &e {
            NetProxyError::ForwardBind { port, source, .. }
                if *port != 0 && source.kind() == std::io::ErrorKind::AddrInUse =>
            {
                Error::input("expose_ports", format!("{message}: the port is in use"))
            }
            NetProxyError::UnsupportedForward { .. } => Error::input("expose_ports", message),
            NetProxyError::SocketPathTooLong { .. } => {
                Error::permanent(PermanentCause::Config, message)
            }
            NetProxyError::NoNetwork | NetProxyError::AlreadyRunning => {
                Error::permanent(PermanentCause::Internal, message)
            }
            _ => Error::transient(TransientCause::Network, message),
        };
        mapped.with_operation("network").with_source(e)
    }
}
