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
    /// TCP: the destination is in a private, shared, reserved or benchmarking range
    /// ([`SPECIAL_RANGES`]) that the operator did not allow
    /// ([`ProxyConfig::allowed_ranges`](crate::ProxyConfig::allowed_ranges)).
    ReservedAddress,
    /// DNS: an upstream answer pointed into a range the guest may not reach (DNS
    /// rebinding); the address was dropped from the answer.
    RebindingAnswer,
    /// TCP: this VM opened new connections faster than its rate cap.
    RateLimited,
    /// DNS over TCP: too many connections for this VM.
    TooManyDnsConnections,
    /// A host connection to a forwarded port: too many for this VM.
    TooManyForwards,
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
            Self::ReservedAddress => "reserved_address",
            Self::RebindingAnswer => "rebinding_answer",
            Self::RateLimited => "rate_limited",
            Self::TooManyDnsConnections => "too_many_dns_connections",
            Self::TooManyForwards => "too_many_forwards",
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
    /// Denials counted but not logged (denial logs are rate-limited per VM).
    pub logs_suppressed: u64,
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

    pub(crate) fn suppressed(&self) {
        self.with(|s| s.logs_suppressed += 1);
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

/// An IPv4 range, `address/prefix` (a bare address is a `/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Range {
    base: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Range {
    /// The range of `prefix` leading bits of `addr` (a prefix above 32 is 32).
    pub const fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        let prefix = if prefix > 32 { 32 } else { prefix };
        let bits = addr.to_bits();
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        Self {
            base: Ipv4Addr::from_bits(bits & mask),
            prefix,
        }
    }

    /// True when `ip` is inside the range.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.prefix == 0 || (ip.to_bits() ^ self.base.to_bits()) >> (32 - self.prefix) == 0
    }
}

impl fmt::Display for Ipv4Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl std::str::FromStr for Ipv4Range {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (
                a,
                p.parse::<u8>()
                    .ok()
                    .filter(|p| *p <= 32)
                    .ok_or_else(|| format!("bad prefix length in {s:?} (0-32)"))?,
            ),
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("bad IPv4 range {s:?} (want A.B.C.D/N)"))?;
        Ok(Self::new(addr, prefix))
    }
}

/// Special-purpose IPv4 ranges (IANA registry) that open and allowlist modes never reach
/// unless the operator allows a range ([`ProxyConfig::allowed_ranges`](crate::ProxyConfig::allowed_ranges)):
/// private networks, shared address space, IETF protocol assignments, benchmarking,
/// "this network" and the reserved 240/4. Loopback, link-local (cloud metadata),
/// multicast and broadcast are refused even then (see [`AddressPolicy::check`]).
pub const SPECIAL_RANGES: &[(Ipv4Range, &str)] = &[
    (Ipv4Range::new(Ipv4Addr::new(0, 0, 0, 0), 8), "this network"),
    (
        Ipv4Range::new(Ipv4Addr::new(10, 0, 0, 0), 8),
        "private (RFC 1918)",
    ),
    (
        Ipv4Range::new(Ipv4Addr::new(100, 64, 0, 0), 10),
        "shared (RFC 6598)",
    ),
    (
        Ipv4Range::new(Ipv4Addr::new(172, 16, 0, 0), 12),
        "private (RFC 1918)",
    ),
    (
        Ipv4Range::new(Ipv4Addr::new(192, 0, 0, 0), 24),
        "IETF protocol assignments",
    ),
    (
        Ipv4Range::new(Ipv4Addr::new(192, 168, 0, 0), 16),
        "private (RFC 1918)",
    ),
    (
        Ipv4Range::new(Ipv4Addr::new(198, 18, 0, 0), 15),
        "benchmarking (RFC 2544)",
    ),
    (Ipv4Range::new(Ipv4Addr::new(240, 0, 0, 0), 4), "reserved"),
];

/// Which destinations a guest may reach at all, whatever names resolve to: the host's own
/// addresses and the special-purpose ranges are refused.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    host: HashSet<Ipv4Addr>,
    allowed: Vec<Ipv4Range>,
    allow_loopback: bool,
}

impl AddressPolicy {
    /// The policy for this host: its own IPv4 addresses (all interfaces) are refused,
    /// `allowed` ranges are let through despite [`SPECIAL_RANGES`], and loopback only
    /// with `allow_loopback` (tests).
    pub fn discover(allowed: &[Ipv4Range], allow_loopback: bool) -> Self {
        let mut host = HashSet::new();
        match nix::ifaddrs::getifaddrs() {
            Ok(ifs) => {
                for ifa in ifs {
                    if let Some(a) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
                        host.insert(a.ip());
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list host addresses"),
        }
        Self::with_host_addrs(host, allowed, allow_loopback)
    }

    /// The policy with an explicit set of host addresses.
    pub fn with_host_addrs(
        host: HashSet<Ipv4Addr>,
        allowed: &[Ipv4Range],
        allow_loopback: bool,
    ) -> Self {
        Self {
            host,
            allowed: allowed.to_vec(),
            allow_loopback,
        }
    }

    /// Whether a guest may reach `ip`:
    ///
    /// - [`DenyReason::HostAddress`], whatever the operator allowed: loopback (unless the
    ///   tests-only loopback switch is on), the host's own addresses, the VM network,
    ///   link-local (cloud metadata), multicast, broadcast and the unspecified address;
    /// - [`DenyReason::ReservedAddress`]: a [`SPECIAL_RANGES`] address outside every
    ///   allowed range.
    pub fn check(&self, ip: Ipv4Addr) -> Result<(), DenyReason> {
        if ip.is_loopback() {
            return if self.allow_loopback {
                Ok(())
            } else {
                Err(DenyReason::HostAddress)
            };
        }
        let vm_net = u32::from(GATEWAY_IP) >> (32 - GUEST_PREFIX_LEN);
        if ip.is_unspecified()
            || ip.is_broadcast()
            || ip.is_multicast()
            || ip.is_link_local()
            || (u32::from(ip) >> (32 - GUEST_PREFIX_LEN)) == vm_net
            || self.host.contains(&ip)
        {
            return Err(DenyReason::HostAddress);
        }
        if SPECIAL_RANGES.iter().any(|(r, _)| r.contains(ip))
            && !self.allowed.iter().any(|r| r.contains(ip))
        {
            return Err(DenyReason::ReservedAddress);
        }
        Ok(())
    }
}

/// A token bucket: `rate` events per second on average, bursts of `burst`.
#[derive(Debug)]
pub(crate) struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub(crate) fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self) -> bool {
        self.take_at(Instant::now())
    }

    pub(crate) fn take_at(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
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
        let h = AddressPolicy::discover(&[], false);
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
            assert_eq!(
                h.check(ip.parse().unwrap()),
                Err(DenyReason::HostAddress),
                "{ip}"
            );
        }
        assert_eq!(h.check("192.0.2.10".parse().unwrap()), Ok(()));
        assert_eq!(
            AddressPolicy::discover(&[], true).check("127.0.0.1".parse().unwrap()),
            Ok(())
        );
    }

    #[test]
    fn special_ranges_are_refused_unless_allowed() {
        let host: HashSet<Ipv4Addr> = ["203.0.113.7".parse().unwrap()].into_iter().collect();
        let p = AddressPolicy::with_host_addrs(host.clone(), &[], false);
        for ip in [
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.8",
            "198.18.0.1",
            "198.19.255.255",
            "0.1.2.3",
            "240.0.0.1",
            "250.1.1.1",
        ] {
            assert_eq!(
                p.check(ip.parse().unwrap()),
                Err(DenyReason::ReservedAddress),
                "{ip}"
            );
        }
        for ip in [
            "169.254.169.254",
            "169.254.0.1",
            "224.0.0.251",
            "239.255.255.250",
            "127.0.0.53",
            "203.0.113.7",
        ] {
            assert_eq!(
                p.check(ip.parse().unwrap()),
                Err(DenyReason::HostAddress),
                "{ip}"
            );
        }
        for ip in [
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "198.17.255.255",
            "198.20.0.1",
            "11.0.0.1",
            "93.184.216.34",
            "1.1.1.1",
            "192.0.1.1",
        ] {
            assert_eq!(p.check(ip.parse().unwrap()), Ok(()), "{ip}");
        }
        // The operator opens one range; the rest stays closed, and so do the host's own
        // addresses, link-local and loopback even inside an allowed range.
        let allowed: Vec<Ipv4Range> = [
            "10.1.0.0/16",
            "169.254.0.0/16",
            "127.0.0.0/8",
            "203.0.113.0/24",
        ]
        .iter()
        .map(|r| r.parse().unwrap())
        .collect();
        let p = AddressPolicy::with_host_addrs(host, &allowed, false);
        assert_eq!(p.check("10.1.2.3".parse().unwrap()), Ok(()));
        assert_eq!(
            p.check("10.2.0.1".parse().unwrap()),
            Err(DenyReason::ReservedAddress)
        );
        assert_eq!(
            p.check("169.254.169.254".parse().unwrap()),
            Err(DenyReason::HostAddress)
        );
        assert_eq!(
            p.check("127.0.0.1".parse().unwrap()),
            Err(DenyReason::HostAddress)
        );
        assert_eq!(
            p.check("203.0.113.7".parse().unwrap()),
            Err(DenyReason::HostAddress)
        );
    }

    #[test]
    fn ranges_parse_and_match() {
        let r: Ipv4Range = "10.1.2.3/16".parse().unwrap();
        assert_eq!(r.to_string(), "10.1.0.0/16");
        assert!(r.contains("10.1.255.1".parse().unwrap()));
        assert!(!r.contains("10.2.0.1".parse().unwrap()));
        let one: Ipv4Range = "192.0.2.1".parse().unwrap();
        assert_eq!(one.to_string(), "192.0.2.1/32");
        assert!(one.contains("192.0.2.1".parse().unwrap()));
        assert!(!one.contains("192.0.2.2".parse().unwrap()));
        let all: Ipv4Range = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "10.0.0/8", "x", "10.0.0.0/", ""] {
            assert!(bad.parse::<Ipv4Range>().is_err(), "{bad}");
        }
    }

    #[test]
    fn rate_limit_refills_over_time() {
        let mut r = RateLimit::new(10, 5);
        let t0 = Instant::now();
        assert_eq!((0..20).filter(|_| r.take_at(t0)).count(), 5);
        assert!(!r.take_at(t0));
        assert!(r.take_at(t0 + Duration::from_millis(110)));
        assert!(!r.take_at(t0 + Duration::from_millis(110)));
        // Never more than the burst after a long pause.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| r.take_at(later)).count(), 5);
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
