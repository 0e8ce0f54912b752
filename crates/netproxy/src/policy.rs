//! Policy decisions and per-VM counters.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sandbox_core::ports::NetworkPolicy;

use crate::{GATEWAY_IP, GUEST_PREFIX_LEN};

/// Outbound mode of one VM (the `None` policy never gets a proxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Only host→guest forwards; every guest-initiated connection and DNS query is refused.
    PortsOnly,
    /// Only the listed domains and their subdomains, over TLS on port 443.
    Allowlist(Allowlist),
    /// Any destination except the host itself (explicit opt-in).
    Open,
}

impl Mode {
    /// The mode of a policy, `None` for [`NetworkPolicy::None`].
    pub fn from_policy(policy: &NetworkPolicy) -> Option<Self> {
        match policy {
            NetworkPolicy::None => None,
            NetworkPolicy::PortsOnly { .. } => Some(Self::PortsOnly),
            NetworkPolicy::Allowlist { domains, .. } => {
                Some(Self::Allowlist(Allowlist::new(domains)))
            }
            NetworkPolicy::Open { .. } => Some(Self::Open),
        }
    }
}

/// A set of allowed domains; each also allows its subdomains.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Allowlist {
    domains: Vec<String>,
}

impl Allowlist {
    /// An allowlist of `domains` (normalised: lowercase, no trailing dot; empty ones dropped).
    pub fn new<S: AsRef<str>>(domains: &[S]) -> Self {
        let mut domains: Vec<String> = domains
            .iter()
            .filter_map(|d| normalize_name(d.as_ref()))
            .collect();
        domains.sort();
        domains.dedup();
        Self { domains }
    }

    /// The normalised domains.
    pub fn domains(&self) -> &[String] {
        &self.domains
    }

    /// True when `name` is an allowed domain or a subdomain of one. `evilexample.com` is not
    /// a subdomain of `example.com`, and `com` is not allowed by `example.com`.
    pub fn allows(&self, name: &str) -> bool {
        let Some(name) = normalize_name(name) else {
            return false;
        };
        self.domains.iter().any(|d| {
            name == *d
                || (name.len() > d.len()
                    && name.ends_with(d.as_str())
                    && name.as_bytes().get(name.len() - d.len() - 1) == Some(&b'.'))
        })
    }
}

/// Lowercase without one trailing dot; `None` for an empty name.
pub fn normalize_name(name: &str) -> Option<String> {
    let n = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    (!n.is_empty()).then_some(n)
}

/// Why the proxy refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DenyReason {
    /// Ports-only mode: the guest may not initiate anything.
    PortsOnly,
    /// DNS: the name is not on the allowlist.
    NameNotAllowed,
    /// DNS: malformed or unsupported query.
    BadQuery,
    /// TCP: the destination address was not returned by the filtered DNS.
    UnresolvedAddress,
    /// TCP: the destination port is not allowed in this mode (e.g. 80 in allowlist mode).
    PortNotAllowed,
    /// TCP: the destination is the host itself, its loopback, a link-local, multicast,
    /// broadcast or unspecified address, or the VM network.
    HostAddress,
    /// TLS: the first bytes were not a TLS ClientHello.
    NotTls,
    /// TLS: the ClientHello carried no server name.
    NoSni,
    /// TLS: the server name is not on the allowlist.
    SniNotAllowed,
    /// TLS: the server name did not resolve to the destination address (spoofing/fronting).
    SniAddressMismatch,
    /// TLS: the ClientHello did not arrive in time.
    SniTimeout,
    /// UDP other than DNS to the gateway.
    Udp,
    /// ICMP.
    Icmp,
    /// Anything that is neither ARP nor IPv4 (IPv6, other ethertypes), or IP fragments.
    Protocol,
    /// A TCP port on the gateway other than DNS.
    GatewayPort,
    /// Too many concurrent connections for this VM.
    TooManyConnections,
}

impl DenyReason {
    /// A stable snake_case name (log field, counter key).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PortsOnly => "ports_only",
            Self::NameNotAllowed => "name_not_allowed",
            Self::BadQuery => "bad_query",
            Self::UnresolvedAddress => "unresolved_address",
            Self::PortNotAllowed => "port_not_allowed",
            Self::HostAddress => "host_address",
            Self::NotTls => "not_tls",
            Self::NoSni => "no_sni",
            Self::SniNotAllowed => "sni_not_allowed",
            Self::SniAddressMismatch => "sni_address_mismatch",
            Self::SniTimeout => "sni_timeout",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Protocol => "protocol",
            Self::GatewayPort => "gateway_port",
            Self::TooManyConnections => "too_many_connections",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters of one VM's network decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Allowed events by kind: `dns` (answered queries), `tcp` (outbound connections
    /// opened), `tls` (ClientHello accepted), `forward` (host→guest connections).
    pub allowed: BTreeMap<String, u64>,
    /// Refusals by [`DenyReason::as_str`].
    pub denied: BTreeMap<String, u64>,
    /// Failures that are not policy decisions: `upstream_connect`, `dns_upstream`,
    /// `frame_stream`.
    pub failed: BTreeMap<String, u64>,
    /// How many times a peer (QEMU) connected to the VM's network socket.
    pub attachments: u64,
}

impl ProxyStats {
    /// Count of one allowed kind.
    pub fn allowed(&self, kind: &str) -> u64 {
        self.allowed.get(kind).copied().unwrap_or(0)
    }

    /// Count of one denial reason.
    pub fn denied(&self, reason: DenyReason) -> u64 {
        self.denied.get(reason.as_str()).copied().unwrap_or(0)
    }

    /// All denials.
    pub fn denied_total(&self) -> u64 {
        self.denied.values().sum()
    }
}

/// Thread-safe counters.
#[derive(Debug, Default)]
pub(crate) struct StatsCell(Mutex<ProxyStats>);

impl StatsCell {
    fn with(&self, f: impl FnOnce(&mut ProxyStats)) {
        let mut g = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g);
    }

    pub(crate) fn allow(&self, kind: &str) {
        self.with(|s| *s.allowed.entry(kind.to_owned()).or_default() += 1);
    }

    pub(crate) fn deny(&self, reason: DenyReason) {
        self.with(|s| *s.denied.entry(reason.as_str().to_owned()).or_default() += 1);
    }

    pub(crate) fn fail(&self, kind: &str) {
        self.with(|s| *s.failed.entry(kind.to_owned()).or_default() += 1);
    }

    pub(crate) fn attached(&self) {
        self.with(|s| s.attachments += 1);
    }

    pub(crate) fn snapshot(&self) -> ProxyStats {
        let mut out = ProxyStats::default();
        self.with(|s| out = s.clone());
        out
    }
}

/// Addresses the filtered DNS handed to one VM.
#[derive(Debug, Default)]
pub(crate) struct DnsCache {
    entries: HashMap<String, CacheEntry>,
}

#[derive(Debug, Clone)]
struct CacheEntry {
    addrs: Vec<Ipv4Addr>,
    fresh_until: Instant,
    remember_until: Instant,
}

const MAX_CACHE_ENTRIES: usize = 4096;

impl DnsCache {
    /// Records an answer: served from the cache until `ttl`, trusted for connections until
    /// `remember`.
    pub(crate) fn insert(
        &mut self,
        name: &str,
        addrs: Vec<Ipv4Addr>,
        ttl: Duration,
        remember: Duration,
    ) {
        let now = Instant::now();
        if self.entries.len() >= MAX_CACHE_ENTRIES {
            self.entries.retain(|_, e| e.remember_until > now);
            if self.entries.len() >= MAX_CACHE_ENTRIES
                && let Some(k) = self.entries.keys().next().cloned()
            {
                self.entries.remove(&k);
            }
        }
        self.entries.insert(
            name.to_owned(),
            CacheEntry {
                addrs,
                fresh_until: now + ttl,
                remember_until: now + remember.max(ttl),
            },
        );
    }

    /// A still-fresh answer and its remaining TTL.
    pub(crate) fn fresh(&self, name: &str) -> Option<(Vec<Ipv4Addr>, Duration)> {
        let e = self.entries.get(name)?;
        let left = e.fresh_until.checked_duration_since(Instant::now())?;
        Some((e.addrs.clone(), left))
    }

    /// The remembered names that resolved to `addr`.
    pub(crate) fn names_for(&self, addr: Ipv4Addr) -> Vec<String> {
        let now = Instant::now();
        self.entries
            .iter()
            .filter(|(_, e)| e.remember_until > now && e.addrs.contains(&addr))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// True when `name` resolved to `addr` and is still remembered.
    pub(crate) fn resolved_to(&self, name: &str, addr: Ipv4Addr) -> bool {
        self.entries
            .get(name)
            .is_some_and(|e| e.remember_until > Instant::now() && e.addrs.contains(&addr))
    }
}

/// Host addresses a guest may never reach.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostAddrs {
    addrs: HashSet<Ipv4Addr>,
    allow_loopback: bool,
}

impl HostAddrs {
    /// The host's own IPv4 addresses (all interfaces).
    pub(crate) fn discover(allow_loopback: bool) -> Self {
        let mut addrs = HashSet::new();
        match nix::ifaddrs::getifaddrs() {
            Ok(ifs) => {
                for ifa in ifs {
                    if let Some(a) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
                        addrs.insert(a.ip());
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list host addresses"),
        }
        Self {
            addrs,
            allow_loopback,
        }
    }

    /// `Some(reason)` when a guest connection to `ip` must be refused whatever the mode.
    pub(crate) fn forbidden(&self, ip: Ipv4Addr) -> bool {
        if ip.is_loopback() {
            return !self.allow_loopback;
        }
        let vm_net = u32::from(GATEWAY_IP) >> (32 - GUEST_PREFIX_LEN);
        ip.is_unspecified()
            || ip.is_broadcast()
            || ip.is_multicast()
            || ip.is_link_local()
            || (u32::from(ip) >> (32 - GUEST_PREFIX_LEN)) == vm_net
            || self.addrs.contains(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist_matching() {
        let a = Allowlist::new(&["example.com", "PyPI.org."]);
        for ok in [
            "example.com",
            "EXAMPLE.com.",
            "www.example.com",
            "a.b.example.com",
            "pypi.org",
            "files.pypi.org",
        ] {
            assert!(a.allows(ok), "{ok}");
        }
        for bad in [
            "evilexample.com",
            "com",
            "example.com.evil.net",
            "example.co",
            "",
            ".",
            "printer.local",
            "1.2.3.4",
            "xexample.com",
            "4.3.2.1.in-addr.arpa",
        ] {
            assert!(!a.allows(bad), "{bad}");
        }
    }

    #[test]
    fn host_addresses() {
        let h = HostAddrs::discover(false);
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "169.254.169.254",
            "192.168.127.1",
            "192.168.127.2",
        ] {
            assert!(h.forbidden(ip.parse().unwrap()), "{ip}");
        }
        assert!(!h.forbidden("192.0.2.10".parse().unwrap()));
        assert!(!HostAddrs::discover(true).forbidden("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn cache() {
        let mut c = DnsCache::default();
        let ip: Ipv4Addr = "10.1.2.3".parse().unwrap();
        c.insert(
            "a.example.com",
            vec![ip],
            Duration::from_secs(60),
            Duration::from_secs(600),
        );
        assert!(c.resolved_to("a.example.com", ip));
        assert!(!c.resolved_to("b.example.com", ip));
        assert_eq!(c.names_for(ip), vec!["a.example.com".to_owned()]);
        assert!(c.fresh("a.example.com").is_some());
        c.insert("z", vec![ip], Duration::ZERO, Duration::ZERO);
        assert!(c.fresh("z").is_none());
        assert!(!c.resolved_to("z", ip));
    }
}
