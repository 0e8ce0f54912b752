//! Upstream name resolution for allowed names.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};

use async_trait::async_trait;

/// Resolves a host name to IPv4 addresses on the host's behalf.
///
/// An error of kind [`io::ErrorKind::NotFound`] means "no such name" (the guest gets
/// NXDOMAIN); any other error means the upstream failed (SERVFAIL).
#[async_trait]
pub trait Resolver: Send + Sync + std::fmt::Debug {
    /// The IPv4 addresses of `name` (lowercase, no trailing dot).
    async fn lookup_ipv4(&self, name: &str) -> io::Result<Vec<Ipv4Addr>>;
}

/// The host's own resolver (`getaddrinfo` through [`tokio::net::lookup_host`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

#[async_trait]
impl Resolver for SystemResolver {
    async fn lookup_ipv4(&self, name: &str) -> io::Result<Vec<Ipv4Addr>> {
        let addrs = tokio::net::lookup_host((name, 0)).await.map_err(|e| {
            // getaddrinfo's EAI_NONAME surfaces as a generic error with this text.
            let text = e.to_string();
            if text.contains("not known") || text.contains("No address associated") {
                io::Error::new(io::ErrorKind::NotFound, text)
            } else {
                e
            }
        })?;
        let mut out = Vec::new();
        for a in addrs {
            if let IpAddr::V4(v4) = a.ip()
                && !out.contains(&v4)
            {
                out.push(v4);
            }
        }
        Ok(out)
    }
}

/// A fixed name → addresses map (tests, and hosts that pin upstreams).
#[derive(Debug, Clone, Default)]
pub struct StaticResolver {
    map: HashMap<String, Vec<Ipv4Addr>>,
}

impl StaticResolver {
    /// An empty map (every name is NXDOMAIN).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `name` (case-insensitive) → `addrs`.
    #[must_use]
    pub fn with(mut self, name: &str, addrs: &[Ipv4Addr]) -> Self {
        self.insert(name, addrs);
        self
    }

    /// Adds `name` (case-insensitive) → `addrs`.
    pub fn insert(&mut self, name: &str, addrs: &[Ipv4Addr]) {
        let key = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        self.map.insert(key, addrs.to_vec());
    }
}

#[async_trait]
impl Resolver for StaticResolver {
    async fn lookup_ipv4(&self, name: &str) -> io::Result<Vec<Ipv4Addr>> {
        self.map
            .get(name)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such name")))
    }
}
