//! Requests for `run`, `session` and `exec`, with their defaults, bounds and validation.
//!
//! Every request is validated on the host before any VM work; each violation is an input
//! error naming the field at fault. The guest re-checks code and environment with the same
//! rules from [`guest_proto::limits`].

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use guest_proto::limits;
use serde::{Deserialize, Serialize};

use crate::Language;
use crate::error::{Error, Result};

/// Default exec timeout, in seconds.
pub const DEFAULT_TIMEOUT_SECS: u32 = 30;
/// Default guest memory, in MiB.
pub const DEFAULT_MEMORY_MB: u32 = 192;
/// Smallest guest memory, in MiB.
pub const MIN_MEMORY_MB: u32 = 128;
/// Default session idle timeout, in seconds.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u32 = 300;
/// Shortest session idle timeout, in seconds.
pub const MIN_IDLE_TIMEOUT_SECS: u32 = 10;
/// Longest session idle timeout, in seconds.
pub const MAX_IDLE_TIMEOUT_SECS: u32 = 3600;
/// Smallest disk-backed home directory (`disk_mb`), in MB.
pub const MIN_DISK_MB: u32 = 64;
/// Largest disk-backed home directory (`disk_mb`), in MB: room for a few files at the
/// 500 MB file limit. The host file is sparse: only what the guest writes takes space.
pub const MAX_DISK_MB: u32 = 4096;
/// Most ports one VM may expose.
pub const MAX_EXPOSED_PORTS: usize = 10;
/// Longest tenant or task identifier.
pub const MAX_IDENTIFIER_LEN: usize = 128;

/// Transport protocol of a forwarded port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// TCP (the default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// A guest port to expose on the host's loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortMapping {
    /// Port inside the guest, 1–65535.
    pub internal: u16,
    /// Host port, 1024–65535, or `None` for one chosen by the OS.
    pub external: Option<u16>,
    /// TCP or UDP.
    #[serde(default)]
    pub protocol: PortProtocol,
}

impl PortMapping {
    /// A TCP mapping with an OS-chosen host port.
    pub fn tcp(internal: u16) -> Self {
        Self {
            internal,
            external: None,
            protocol: PortProtocol::Tcp,
        }
    }

    fn validate(&self, index: usize) -> Result<()> {
        let field = format!("expose_ports[{index}]");
        if self.internal == 0 {
            return Err(Error::input(field, "internal port must be 1-65535"));
        }
        if let Some(ext) = self.external
            && ext < 1024
        {
            return Err(Error::input(
                field,
                format!("external port {ext} must be 1024-65535 (or omitted for automatic)"),
            ));
        }
        Ok(())
    }
}

impl FromStr for PortMapping {
    type Err = Error;

    /// Parses `INTERNAL[:EXTERNAL][/tcp|udp]`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::input(
                "expose",
                format!("{s:?}: {why} (want INTERNAL[:EXTERNAL][/tcp|udp])"),
            )
        };
        let (ports, protocol) = match s.split_once('/') {
            Some((p, proto)) => match proto.to_ascii_lowercase().as_str() {
                "tcp" => (p, PortProtocol::Tcp),
                "udp" => (p, PortProtocol::Udp),
                _ => return Err(bad("protocol must be tcp or udp")),
            },
            None => (s, PortProtocol::Tcp),
        };
        let parse = |v: &str| v.parse::<u16>().map_err(|_| bad("not a port number"));
        let (internal, external) = match ports.split_once(':') {
            Some((i, e)) => (parse(i)?, Some(parse(e)?)),
            None => (parse(ports)?, None),
        };
        let mapping = PortMapping {
            internal,
            external,
            protocol,
        };
        mapping.validate(0).map_err(|e| bad(e.message()))?;
        Ok(mapping)
    }
}

/// Validates a tenant or task identifier: `[A-Za-z0-9_-]`, 1–128 characters.
pub fn validate_identifier(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::input(field, format!("{field} must not be empty")));
    }
    if value.len() > MAX_IDENTIFIER_LEN {
        return Err(Error::input(
            field,
            format!(
                "{field} is {} characters, at most {MAX_IDENTIFIER_LEN} allowed",
                value.len()
            ),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(Error::input(
            field,
            format!("{field} may contain only letters, digits, '_' and '-'"),
        ));
    }
    Ok(())
}

/// Validates a domain name for the network allowlist (RFC 1035 host names, ASCII only).
///
/// Rules: at most 253 characters without the optional trailing dot; at least two labels;
/// labels 1–63 characters of letters, digits and hyphens, not starting or ending with a
/// hyphen; an alphabetic top-level label. Returns the name lowercased, without the dot.
pub fn validate_domain(field: &str, domain: &str) -> Result<String> {
    let bad = |why: &str| Error::input(field, format!("invalid domain {domain:?}: {why}"));
    if !domain.is_ascii() {
        return Err(bad("only ASCII is accepted (use the punycode form)"));
    }
    let name = domain.strip_suffix('.').unwrap_or(domain);
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 {
        return Err(bad("needs at least two labels"));
    }
    for label in &labels {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("each label must be 1-63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(bad("labels may contain only letters, digits and '-'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("labels may not start or end with '-'"));
        }
    }
    let tld = labels.last().copied().unwrap_or_default();
    if !tld.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(bad("the top-level label must be alphabetic"));
    }
    Ok(name.to_ascii_lowercase())
}

fn validate_timeout(secs: u32) -> Result<()> {
    if !(limits::MIN_TIMEOUT_SECS..=limits::MAX_TIMEOUT_SECS).contains(&secs) {
        return Err(Error::input(
            "timeout",
            format!(
                "timeout {secs} s is outside {}-{} s",
                limits::MIN_TIMEOUT_SECS,
                limits::MAX_TIMEOUT_SECS
            ),
        ));
    }
    Ok(())
}

fn validate_memory(mb: u32) -> Result<()> {
    if mb < MIN_MEMORY_MB {
        return Err(Error::input(
            "memory",
            format!("memory {mb} MB is below the {MIN_MEMORY_MB} MB minimum"),
        ));
    }
    Ok(())
}

fn validate_disk(disk_mb: Option<u32>) -> Result<()> {
    match disk_mb {
        Some(mb) if !(MIN_DISK_MB..=MAX_DISK_MB).contains(&mb) => Err(Error::input(
            "disk_mb",
            format!("disk_mb {mb} MB is outside {MIN_DISK_MB}-{MAX_DISK_MB} MB"),
        )),
        _ => Ok(()),
    }
}

fn validate_code(code: &mut String) -> Result<()> {
    let stripped_len = limits::validate_code(code)
        .map_err(|e| Error::input("code", e.to_string()))?
        .len();
    if stripped_len != code.len() {
        // Drop the leading BOM in place.
        code.drain(..code.len() - stripped_len);
    }
    Ok(())
}

/// Checks `env` for code in `language` (shell variable names for `raw`), so that every
/// rule the guest applies fails here first, before any VM work.
pub fn validate_env(language: Language, env: &[(String, String)]) -> Result<()> {
    limits::validate_env_for(language, env.iter().map(|(k, v)| (k.as_str(), v.as_str()))).map_err(
        |e| {
            let field = match e.name() {
                Some(name) => format!("env.{name}"),
                None => "env".to_owned(),
            };
            Error::input(field, e.to_string())
        },
    )
}

/// Network settings of a VM, shared by runs and sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRequest {
    /// Open outbound network (filtered by `allowed_domains` when that is non-empty).
    #[serde(default)]
    pub allow_network: bool,
    /// Domains (and their subdomains) the guest may reach; empty with `allow_network`
    /// means unfiltered.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// Guest ports forwarded to 127.0.0.1 on the host.
    #[serde(default)]
    pub expose_ports: Vec<PortMapping>,
}

impl NetworkRequest {
    fn validate(&mut self) -> Result<()> {
        if self.expose_ports.len() > MAX_EXPOSED_PORTS {
            return Err(Error::input(
                "expose_ports",
                format!(
                    "{} ports requested, at most {MAX_EXPOSED_PORTS} allowed",
                    self.expose_ports.len()
                ),
            ));
        }
        let mut seen = HashSet::new();
        for (i, p) in self.expose_ports.iter().enumerate() {
            p.validate(i)?;
            if let Some(ext) = p.external
                && !seen.insert((ext, p.protocol))
            {
                return Err(Error::input(
                    format!("expose_ports[{i}]"),
                    format!("external port {ext}/{} is requested twice", p.protocol),
                ));
            }
        }
        if !self.allowed_domains.is_empty() && !self.allow_network {
            return Err(Error::input(
                "allowed_domains",
                "allowed_domains needs allow_network",
            ));
        }
        let mut domains = Vec::with_capacity(self.allowed_domains.len());
        for (i, d) in self.allowed_domains.iter().enumerate() {
            domains.push(validate_domain(&format!("allowed_domains[{i}]"), d)?);
        }
        domains.dedup();
        self.allowed_domains = domains;
        Ok(())
    }

    /// True when the VM needs no network device at all.
    pub fn is_offline(&self) -> bool {
        !self.allow_network && self.expose_ports.is_empty()
    }
}

/// One execution of code in a fresh VM that is destroyed afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRequest {
    /// Interpreter to run the code with.
    pub language: Language,
    /// Source code (≤ 1 MiB, non-empty, no NUL; a leading BOM is stripped).
    pub code: String,
    /// Timeout in seconds, 1–300.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u32,
    /// Guest memory in MiB, ≥ 128.
    #[serde(default = "default_memory")]
    pub memory_mb: u32,
    /// Size of a disk-backed home directory (`/home/user`), in MB, 64–4096; `None`: a
    /// tmpfs home of 40 % of the guest memory (the fast default).
    #[serde(default)]
    pub disk_mb: Option<u32>,
    /// Environment variables for the code.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Network and port settings.
    #[serde(default, flatten)]
    pub network: NetworkRequest,
    /// Packages to make importable, as exact pins (`numpy==2.1.3`, `lodash@4.17.21`; at
    /// most 50; see [`crate::packages`]). They come from a read-only package layer built
    /// on the host; the guest never fetches anything.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Tenant the VM is accounted to.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Caller's task identifier, for logs.
    #[serde(default)]
    pub task_id: Option<String>,
}

fn default_timeout() -> u32 {
    DEFAULT_TIMEOUT_SECS
}

fn default_memory() -> u32 {
    DEFAULT_MEMORY_MB
}

impl RunRequest {
    /// A request with every default.
    pub fn new(language: Language, code: impl Into<String>) -> Self {
        Self {
            language,
            code: code.into(),
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            memory_mb: DEFAULT_MEMORY_MB,
            disk_mb: None,
            env: Vec::new(),
            network: NetworkRequest::default(),
            packages: Vec::new(),
            tenant: None,
            task_id: None,
        }
    }

    /// Validates every field and normalises the request (BOM stripped, domains lowercased).
    pub fn validate(&mut self) -> Result<()> {
        validate_code(&mut self.code)?;
        validate_timeout(self.timeout_secs)?;
        validate_memory(self.memory_mb)?;
        validate_disk(self.disk_mb)?;
        validate_env(self.language, &self.env)?;
        self.network.validate()?;
        crate::packages::parse_specs(self.language, &self.packages)?;
        if let Some(t) = &self.tenant {
            validate_identifier("tenant", t)?;
        }
        if let Some(t) = &self.task_id {
            validate_identifier("task_id", t)?;
        }
        Ok(())
    }

    /// The exec part of this run.
    pub fn exec_request(&self) -> ExecRequest {
        ExecRequest {
            code: self.code.clone(),
            timeout_secs: self.timeout_secs,
            env: self.env.clone(),
        }
    }
}

/// A long-lived VM that keeps interpreter state across execs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRequest {
    /// Interpreter of the session's REPL.
    pub language: Language,
    /// Guest memory in MiB, ≥ 128.
    #[serde(default = "default_memory")]
    pub memory_mb: u32,
    /// Size of a disk-backed home directory, in MB (see [`RunRequest::disk_mb`]).
    #[serde(default)]
    pub disk_mb: Option<u32>,
    /// Idle timeout in seconds, 10–3600.
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u32,
    /// Network and port settings.
    #[serde(default, flatten)]
    pub network: NetworkRequest,
    /// Packages to make importable (see [`RunRequest::packages`]).
    #[serde(default)]
    pub packages: Vec<String>,
    /// Tenant the VM is accounted to.
    #[serde(default)]
    pub tenant: Option<String>,
}

fn default_idle() -> u32 {
    DEFAULT_IDLE_TIMEOUT_SECS
}

impl SessionRequest {
    /// A session request with every default.
    pub fn new(language: Language) -> Self {
        Self {
            language,
            memory_mb: DEFAULT_MEMORY_MB,
            disk_mb: None,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            network: NetworkRequest::default(),
            packages: Vec::new(),
            tenant: None,
        }
    }

    /// Validates every field.
    pub fn validate(&mut self) -> Result<()> {
        validate_memory(self.memory_mb)?;
        validate_disk(self.disk_mb)?;
        if !(MIN_IDLE_TIMEOUT_SECS..=MAX_IDLE_TIMEOUT_SECS).contains(&self.idle_timeout_secs) {
            return Err(Error::input(
                "idle_timeout",
                format!(
                    "idle timeout {} s is outside {MIN_IDLE_TIMEOUT_SECS}-{MAX_IDLE_TIMEOUT_SECS} s",
                    self.idle_timeout_secs
                ),
            ));
        }
        self.network.validate()?;
        crate::packages::parse_specs(self.language, &self.packages)?;
        if let Some(t) = &self.tenant {
            validate_identifier("tenant", t)?;
        }
        Ok(())
    }
}

/// One exec inside a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Source code (same rules as [`RunRequest::code`]).
    pub code: String,
    /// Timeout in seconds, 1–300.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u32,
    /// Environment variables for this exec.
    #[serde(default)]
    pub env: Vec<(String, String)>,
}

impl ExecRequest {
    /// An exec with the default timeout and no extra environment.
    pub fn new(code: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            env: Vec::new(),
        }
    }

    /// Validates every field for code in `language` (a session's) and strips a leading BOM.
    pub fn validate(&mut self, language: Language) -> Result<()> {
        validate_code(&mut self.code)?;
        validate_timeout(self.timeout_secs)?;
        validate_env(language, &self.env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn field_of(err: Error) -> String {
        assert_eq!(err.kind(), ErrorKind::Input, "{err}");
        err.context().field.clone().unwrap_or_default()
    }

    #[test]
    fn defaults() {
        let r = RunRequest::new(Language::Python, "print(1)");
        assert_eq!(r.timeout_secs, 30);
        assert_eq!(r.memory_mb, 192);
        let s = SessionRequest::new(Language::Raw);
        assert_eq!(s.idle_timeout_secs, 300);
        let parsed: RunRequest =
            serde_json::from_str(r#"{"language":"python","code":"x"}"#).unwrap();
        assert_eq!(parsed, RunRequest::new(Language::Python, "x"));
    }

    #[test]
    fn timeout_bounds() {
        for (t, ok) in [(0, false), (1, true), (300, true), (301, false)] {
            let mut r = RunRequest::new(Language::Python, "1");
            r.timeout_secs = t;
            match r.validate() {
                Ok(()) => assert!(ok, "{t}"),
                Err(e) => {
                    assert!(!ok, "{t}");
                    assert_eq!(field_of(e), "timeout");
                }
            }
        }
    }

    #[test]
    fn memory_bounds() {
        let mut r = RunRequest::new(Language::Python, "1");
        r.memory_mb = 127;
        assert_eq!(field_of(r.validate().unwrap_err()), "memory");
        r.memory_mb = 128;
        r.validate().unwrap();
    }

    #[test]
    fn disk_bounds_and_default() {
        let r = RunRequest::new(Language::Python, "1");
        assert_eq!(r.disk_mb, None, "the default home is a tmpfs");
        for (mb, ok) in [
            (63, false),
            (64, true),
            (4096, true),
            (4097, false),
            (0, false),
        ] {
            let mut r = RunRequest::new(Language::Python, "1");
            r.disk_mb = Some(mb);
            let mut s = SessionRequest::new(Language::Python);
            s.disk_mb = Some(mb);
            for res in [r.validate(), s.validate()] {
                match res {
                    Ok(()) => assert!(ok, "{mb} accepted"),
                    Err(e) => {
                        assert!(!ok, "{mb} refused: {e}");
                        assert_eq!(field_of(e), "disk_mb");
                    }
                }
            }
        }
        let r: RunRequest =
            serde_json::from_str(r#"{"language":"python","code":"1","disk_mb":600}"#).unwrap();
        assert_eq!(r.disk_mb, Some(600));
    }

    #[test]
    fn code_rules_and_bom() {
        let mut r = RunRequest::new(Language::Python, "\u{feff}print(1)");
        r.validate().unwrap();
        assert_eq!(r.code, "print(1)");
        for bad in ["", "   \n", "a\0b"] {
            let mut r = RunRequest::new(Language::Python, bad);
            assert_eq!(field_of(r.validate().unwrap_err()), "code");
        }
        let mut big = ExecRequest::new("x".repeat(1024 * 1024 + 1));
        assert_eq!(
            field_of(big.validate(Language::Python).unwrap_err()),
            "code"
        );
    }

    #[test]
    fn env_errors_name_the_variable() {
        let mut r = RunRequest::new(Language::Python, "1");
        r.env = vec![("OK".into(), "1".into()), ("ld_preload".into(), "x".into())];
        assert_eq!(field_of(r.validate().unwrap_err()), "env.ld_preload");
        r.env = (0..101).map(|i| (format!("V{i}"), "1".into())).collect();
        assert_eq!(field_of(r.validate().unwrap_err()), "env");
    }

    #[test]
    fn shell_variable_names_are_checked_on_the_host_for_raw() {
        let bad = vec![("BAD-KEY".to_owned(), "1".to_owned())];
        let mut r = RunRequest::new(Language::Raw, "echo");
        r.env = bad.clone();
        assert_eq!(field_of(r.validate().unwrap_err()), "env.BAD-KEY");
        let mut r = RunRequest::new(Language::Python, "1");
        r.env = bad.clone();
        r.validate().unwrap();
        let mut e = ExecRequest::new("echo");
        e.env = bad;
        assert_eq!(
            field_of(e.validate(Language::Raw).unwrap_err()),
            "env.BAD-KEY"
        );
        e.validate(Language::Javascript).unwrap();
    }

    #[test]
    fn ports() {
        let mut r = RunRequest::new(Language::Python, "1");
        r.network.expose_ports = vec![PortMapping::tcp(8080); 11];
        assert_eq!(field_of(r.validate().unwrap_err()), "expose_ports");
        r.network.expose_ports = vec![PortMapping::tcp(0)];
        assert_eq!(field_of(r.validate().unwrap_err()), "expose_ports[0]");
        r.network.expose_ports = vec![PortMapping {
            internal: 80,
            external: Some(1023),
            protocol: PortProtocol::Tcp,
        }];
        assert_eq!(field_of(r.validate().unwrap_err()), "expose_ports[0]");
        r.network.expose_ports = vec![
            PortMapping::tcp(80),
            PortMapping {
                internal: 81,
                external: Some(1024),
                protocol: PortProtocol::Udp,
            },
        ];
        r.validate().unwrap();

        assert_eq!(
            "8080".parse::<PortMapping>().unwrap(),
            PortMapping::tcp(8080)
        );
        let p: PortMapping = "53:5353/UDP".parse().unwrap();
        assert_eq!(
            (p.internal, p.external, p.protocol),
            (53, Some(5353), PortProtocol::Udp)
        );
        for bad in ["", "0", "70000", "80:80", "80/sctp", "a:b", "80:"] {
            assert!(bad.parse::<PortMapping>().is_err(), "{bad}");
        }
    }

    #[test]
    fn domains() {
        for ok in [
            "example.com",
            "Example.COM.",
            "a-b.c-d.org",
            "x.io",
            "1.example.com",
        ] {
            validate_domain("d", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        assert_eq!(validate_domain("d", "PyPI.org.").unwrap(), "pypi.org");
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}com", "abcdefghi.".repeat(26));
        for bad in [
            "",
            ".",
            "localhost",
            "-a.com",
            "a-.com",
            "a..com",
            "a_b.com",
            "example.123",
            "bücher.de",
            "a.com/x",
            "1.2.3.4",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert!(validate_domain("d", bad).is_err(), "{bad}");
        }
        let mut r = RunRequest::new(Language::Python, "1");
        r.network.allowed_domains = vec!["example.com".into()];
        assert_eq!(field_of(r.validate().unwrap_err()), "allowed_domains");
        r.network.allow_network = true;
        r.network.allowed_domains = vec!["ok.com".into(), "bad".into()];
        assert_eq!(field_of(r.validate().unwrap_err()), "allowed_domains[1]");
    }

    #[test]
    fn identifiers_reject_long_and_bad_values() {
        validate_identifier("tenant", &"a".repeat(128)).unwrap();
        validate_identifier("tenant", "A-z_09").unwrap();
        for bad in [
            String::new(),
            "a".repeat(129),
            "a b".into(),
            "a/b".into(),
            "é".into(),
        ] {
            assert_eq!(
                field_of(validate_identifier("tenant", &bad).unwrap_err()),
                "tenant"
            );
        }
        let mut r = RunRequest::new(Language::Python, "1");
        r.task_id = Some("x".repeat(129));
        assert_eq!(field_of(r.validate().unwrap_err()), "task_id");
    }

    #[test]
    fn packages_are_checked_with_the_request() {
        let mut r = RunRequest::new(Language::Python, "import six");
        r.packages = vec!["six==1.16.0".into(), "numpy>=1".into()];
        assert_eq!(field_of(r.validate().unwrap_err()), "packages[1]");
        r.packages.pop();
        r.validate().unwrap();
        let mut s = SessionRequest::new(Language::Raw);
        s.packages = vec!["six==1.16.0".into()];
        assert_eq!(field_of(s.validate().unwrap_err()), "packages[0]");
        let parsed: RunRequest = serde_json::from_str(
            r#"{"language":"javascript","code":"1","packages":["lodash@4.17.21"]}"#,
        )
        .unwrap();
        assert_eq!(parsed.packages, ["lodash@4.17.21"]);
    }

    #[test]
    fn session_idle_bounds() {
        let mut s = SessionRequest::new(Language::Python);
        s.idle_timeout_secs = 9;
        assert_eq!(field_of(s.validate().unwrap_err()), "idle_timeout");
        s.idle_timeout_secs = 3601;
        assert!(s.validate().is_err());
        s.idle_timeout_secs = 10;
        s.validate().unwrap();
    }
}
