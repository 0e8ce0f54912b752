//! The JSON shapes of the HTTP API: request bodies, answers and stream events.
//!
//! These types are the API contract: they derive [`utoipa::ToSchema`] so the OpenAPI
//! document is generated from them, and they convert into the core's requests.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use sandbox_core::request::NetworkRequest;
use sandbox_core::{
    ExecRequest, ExecutionResult, ExposedPort, Language, PortMapping, PortProtocol, RunRequest,
    SchedulerConfig, Session, SessionRequest,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Interpreter of a run or session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ApiLanguage {
    /// Python 3.
    #[default]
    Python,
    /// JavaScript (Node.js).
    Javascript,
    /// A bash script.
    Raw,
}

impl From<ApiLanguage> for Language {
    fn from(l: ApiLanguage) -> Self {
        match l {
            ApiLanguage::Python => Language::Python,
            ApiLanguage::Javascript => Language::Javascript,
            ApiLanguage::Raw => Language::Raw,
        }
    }
}

impl From<Language> for ApiLanguage {
    fn from(l: Language) -> Self {
        match l {
            Language::Python => ApiLanguage::Python,
            Language::Javascript => ApiLanguage::Javascript,
            Language::Raw => ApiLanguage::Raw,
        }
    }
}

/// A guest port to forward to the host's loopback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortRequest {
    /// Port inside the guest, 1–65535.
    pub internal: u16,
    /// Host port (1024–65535); omitted: chosen by the OS.
    #[serde(default)]
    pub external: Option<u16>,
    /// `tcp`, the default and the only protocol forwarded (anything else is a 422).
    #[serde(default)]
    pub protocol: ApiPortProtocol,
}

/// Forwarded protocols: TCP only (the network proxy has no UDP forwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ApiPortProtocol {
    /// TCP.
    #[default]
    Tcp,
}

impl PortRequest {
    fn to_mapping(&self) -> PortMapping {
        PortMapping {
            internal: self.internal,
            external: self.external,
            protocol: match self.protocol {
                ApiPortProtocol::Tcp => PortProtocol::Tcp,
            },
        }
    }
}

fn env_pairs(env: &BTreeMap<String, String>) -> Vec<(String, String)> {
    env.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// `POST /v1/run`: run code in a fresh microVM that is destroyed afterwards.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunBody {
    /// Source code (non-empty, at most 1 MiB, no NUL bytes).
    pub code: String,
    /// Interpreter (default `python`).
    #[serde(default)]
    pub language: ApiLanguage,
    /// Timeout in seconds, 1–300 (default 30).
    #[serde(default, alias = "timeout_secs")]
    pub timeout: Option<u32>,
    /// Guest memory in MiB, at least 128 (default 192).
    #[serde(default, alias = "memory_mb")]
    pub memory: Option<u32>,
    /// Size of a disk-backed home directory (`/home/user`) in MB, 64–4096; without it the
    /// home is a tmpfs of 40 % of the guest memory.
    #[serde(default)]
    pub disk_mb: Option<u32>,
    /// Environment variables for the code.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Open outbound network (filtered by `allowed_domains` when non-empty).
    #[serde(default)]
    pub allow_network: bool,
    /// Domains (and subdomains) the guest may reach; needs `allow_network`.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// Guest ports forwarded to 127.0.0.1 on the host while the run lasts.
    #[serde(default)]
    pub expose_ports: Vec<PortRequest>,
    /// Packages to make importable, exact pins (`numpy==2.1.3`, `lodash@4.17.21`; at most
    /// 50, each on the operator's allowlist); built on the host into a read-only layer.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Caller's task identifier, for logs (`[A-Za-z0-9_-]`, ≤ 128).
    #[serde(default)]
    pub task_id: Option<String>,
}

impl RunBody {
    /// The core request (not yet validated).
    pub fn to_request(&self, defaults: &SchedulerConfig) -> RunRequest {
        let mut req = RunRequest::new(self.language.into(), self.code.clone());
        req.timeout_secs = self.timeout.unwrap_or(defaults.default_timeout_secs);
        // The scheduler's default memory keeps the run eligible for the warm pool.
        req.memory_mb = self.memory.unwrap_or(defaults.default_memory_mb);
        req.disk_mb = self.disk_mb;
        req.env = env_pairs(&self.env);
        req.network = network(
            self.allow_network,
            &self.allowed_domains,
            &self.expose_ports,
        );
        req.packages = self.packages.clone();
        req.task_id = self.task_id.clone();
        req
    }
}

fn network(allow: bool, domains: &[String], ports: &[PortRequest]) -> NetworkRequest {
    NetworkRequest {
        allow_network: allow,
        allowed_domains: domains.to_vec(),
        expose_ports: ports.iter().map(|p| p.to_mapping()).collect(),
    }
}

/// `POST /v1/sessions`: start a VM kept with its interpreter state across execs.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionBody {
    /// Interpreter of the session's REPL (default `python`).
    #[serde(default)]
    pub language: ApiLanguage,
    /// Guest memory in MiB, at least 128 (default 192).
    #[serde(default, alias = "memory_mb")]
    pub memory: Option<u32>,
    /// Size of a disk-backed home directory (`/home/user`) in MB, 64–4096; without it the
    /// home is a tmpfs of 40 % of the guest memory.
    #[serde(default)]
    pub disk_mb: Option<u32>,
    /// Seconds without any operation before the session closes itself, 10–3600
    /// (default 300).
    #[serde(default, alias = "idle_timeout_secs")]
    pub idle_timeout: Option<u32>,
    /// Open outbound network (filtered by `allowed_domains` when non-empty).
    #[serde(default)]
    pub allow_network: bool,
    /// Domains (and subdomains) the guest may reach; needs `allow_network`.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// Guest ports forwarded to 127.0.0.1 on the host while the session lives.
    #[serde(default)]
    pub expose_ports: Vec<PortRequest>,
    /// Packages to make importable (as in `POST /v1/run`).
    #[serde(default)]
    pub packages: Vec<String>,
}

impl SessionBody {
    /// The core request (not yet validated).
    pub fn to_request(&self, defaults: &SchedulerConfig) -> SessionRequest {
        let mut req = SessionRequest::new(self.language.into());
        req.memory_mb = self.memory.unwrap_or(defaults.default_memory_mb);
        req.disk_mb = self.disk_mb;
        req.idle_timeout_secs = self
            .idle_timeout
            .unwrap_or(defaults.session_idle_timeout_secs);
        req.network = network(
            self.allow_network,
            &self.allowed_domains,
            &self.expose_ports,
        );
        req.packages = self.packages.clone();
        req
    }
}

/// `POST /v1/sessions/{id}/exec`: run code in the session's REPL.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// Source code (non-empty, at most 1 MiB, no NUL bytes).
    pub code: String,
    /// Timeout in seconds, 1–300 (default 30).
    #[serde(default, alias = "timeout_secs")]
    pub timeout: Option<u32>,
    /// Environment variables for this exec.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl ExecBody {
    /// The core request (not yet validated).
    pub fn to_request(&self, defaults: &SchedulerConfig) -> ExecRequest {
        ExecRequest {
            code: self.code.clone(),
            timeout_secs: self.timeout.unwrap_or(defaults.default_timeout_secs),
            env: env_pairs(&self.env),
        }
    }
}

/// A guest port reachable on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortInfo {
    /// Port inside the guest.
    pub internal: u16,
    /// Port on the host.
    pub external: u16,
    /// Host address (always loopback).
    pub host: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `http://host:external`.
    pub url: String,
}

impl From<&ExposedPort> for PortInfo {
    fn from(p: &ExposedPort) -> Self {
        Self {
            internal: p.internal,
            external: p.external,
            host: p.host.clone(),
            protocol: p.protocol.to_string(),
            url: p.url.clone(),
        }
    }
}

/// Where the time of a run went, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TimingInfo {
    /// Wall time of the whole operation.
    pub total_ms: u64,
    /// Host-side preparation.
    pub setup_ms: u64,
    /// QEMU spawn to guest ready (0 on a warm-pool hit and in sessions).
    pub boot_ms: u64,
    /// The exec round trip (`connect_ms + spawn_ms + process_ms`).
    pub execute_ms: u64,
    /// Waiting for capacity: the admission budget and a VM slot.
    pub admission_ms: u64,
    /// Part of `execute_ms`: host↔guest transport of the exec.
    #[serde(default)]
    pub connect_ms: u64,
    /// Part of `execute_ms`: the guest starting the interpreter or handing the code to its
    /// warm REPL.
    #[serde(default)]
    pub spawn_ms: u64,
    /// Part of `execute_ms`: the code running, as the guest measured it.
    #[serde(default)]
    pub process_ms: u64,
}

/// The outcome of a run or exec: the same fields as `sbx run --json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RunResult {
    /// Captured standard output (lossy UTF-8).
    pub stdout: String,
    /// Captured standard error (lossy UTF-8).
    pub stderr: String,
    /// 0, the code's exit status, 128+signal, or −1 on timeout.
    pub exit_code: i32,
    /// Execution time measured by the guest.
    pub execution_time_ms: Option<u64>,
    /// Where the time went.
    pub timing: TimingInfo,
    /// True when the VM came from the warm pool.
    pub warm_pool_hit: bool,
    /// How the VM started: `cold` (booted), `snapshot` (restored from its L1 snapshot) or
    /// `warm_pool`; sessions' execs say `cold`.
    #[serde(default)]
    pub vm_start: String,
    /// Peak memory of the VM in MiB, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_peak_mb: Option<u64>,
    /// Ports exposed on the host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<PortInfo>,
}

impl From<&ExecutionResult> for RunResult {
    fn from(r: &ExecutionResult) -> Self {
        Self {
            stdout: r.stdout.clone(),
            stderr: r.stderr.clone(),
            exit_code: r.exit_code,
            execution_time_ms: r.execution_time_ms,
            timing: TimingInfo {
                total_ms: r.timing.total_ms,
                setup_ms: r.timing.setup_ms,
                boot_ms: r.timing.boot_ms,
                execute_ms: r.timing.execute_ms,
                admission_ms: r.timing.admission_ms,
                connect_ms: r.timing.connect_ms,
                spawn_ms: r.timing.spawn_ms,
                process_ms: r.timing.process_ms,
            },
            warm_pool_hit: r.warm_pool_hit,
            vm_start: vm_start_name(r.vm_start).to_owned(),
            memory_peak_mb: r.memory_peak_mb,
            exposed_ports: r.exposed_ports.iter().map(PortInfo::from).collect(),
        }
    }
}

/// The JSON object `sbx run --json` prints for one result (shared with `POST /v1/run`).
pub fn result_json(r: &ExecutionResult) -> serde_json::Value {
    serde_json::to_value(RunResult::from(r)).unwrap_or(serde_json::Value::Null)
}

/// One line of an `application/x-ndjson` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    /// A chunk of standard output, as it arrived.
    Stdout {
        /// The chunk (UTF-8; invalid bytes replaced).
        data: String,
    },
    /// A chunk of standard error, as it arrived.
    Stderr {
        /// The chunk (UTF-8; invalid bytes replaced).
        data: String,
    },
    /// The final result (always the last line on success).
    Result(RunResult),
    /// The operation failed after the answer started (always the last line).
    Error {
        /// What failed.
        error: ErrorDetail,
    },
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What failed.
    pub error: ErrorDetail,
}

/// What failed, and whether retrying can help.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable kind: `input`, `transient`, `permanent`, `outcome_unknown`,
    /// `session_closed`, `output_limit`, `guest`, `no_space`, `unauthorized`, `not_found`,
    /// `payload_too_large`, `capacity`, `too_many_sessions`, `shutting_down`,
    /// `method_not_allowed`, `internal`.
    pub kind: String,
    /// Human-readable explanation.
    pub message: String,
    /// True when the same request can succeed later (the code never ran).
    pub retryable: bool,
    /// Finer cause of transient and permanent errors (`capacity`, `boot_timeout`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// The request field at fault, for input errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Answer of `POST /v1/sessions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionCreated {
    /// Session id (use it in `/v1/sessions/{id}/...`).
    pub id: String,
    /// The session's interpreter.
    pub language: ApiLanguage,
    /// Guest ports reachable on the host.
    pub exposed_ports: Vec<PortInfo>,
    /// How the session's VM started: `cold` or `snapshot`.
    pub vm_start: String,
}

/// The API name of how a VM started.
pub fn vm_start_name(s: sandbox_core::result::VmStart) -> &'static str {
    match s {
        sandbox_core::result::VmStart::Cold => "cold",
        sandbox_core::result::VmStart::Snapshot => "snapshot",
        sandbox_core::result::VmStart::WarmPool => "warm_pool",
    }
}

/// One live session, as listed by `GET /v1/sessions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionInfo {
    /// Session id.
    pub id: String,
    /// The session's interpreter.
    pub language: ApiLanguage,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// End of the last operation, RFC 3339 UTC.
    pub last_used: String,
    /// Successful execs so far.
    pub exec_count: u64,
    /// Idle timeout in seconds.
    pub idle_timeout: u64,
}

impl From<&Session> for SessionInfo {
    fn from(s: &Session) -> Self {
        Self {
            id: s.id().to_string(),
            language: s.language().into(),
            created: rfc3339(s.created()),
            last_used: rfc3339(s.last_used()),
            exec_count: s.exec_count(),
            idle_timeout: s.idle_timeout().as_secs(),
        }
    }
}

/// Answer of `GET /v1/sessions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionList {
    /// Live sessions of the caller, oldest first.
    pub sessions: Vec<SessionInfo>,
}

/// Answer of `PUT /v1/sessions/{id}/files/{path}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileWritten {
    /// Guest path (relative to `/home/user`).
    pub path: String,
    /// Bytes written (verified by the guest's SHA-256).
    pub size: u64,
}

/// One directory entry.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileEntry {
    /// Name (one path component).
    pub name: String,
    /// True for a directory.
    pub is_dir: bool,
    /// Size in bytes (0 for directories).
    pub size: u64,
}

/// Answer of `GET /v1/sessions/{id}/files`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileList {
    /// The directory listed (`""` is `/home/user`).
    pub dir: String,
    /// Its entries.
    pub entries: Vec<FileEntry>,
}

/// Query of `GET /v1/sessions/{id}/files`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Directory to list, relative to `/home/user` (default: `/home/user`).
    pub dir: Option<String>,
}

/// Query of `PUT /v1/sessions/{id}/files/{path}`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// Make the file executable.
    #[serde(default)]
    pub executable: bool,
}

/// File content, streamed as raw bytes.
#[derive(Debug, ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct FileContent(pub Vec<u8>);

/// Answer of `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`, or `shutting_down` once a shutdown began.
    pub status: String,
    /// sbx version.
    pub version: String,
    /// Seconds since the server started.
    pub uptime_secs: u64,
    /// Live sessions.
    pub sessions: usize,
    /// Live VMs (runs, sessions and warm pool).
    pub vms: usize,
}

/// Formats `t` as RFC 3339 UTC with milliseconds (`2024-05-01T12:00:00.123Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since the epoch (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.789Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn result_json_has_the_cli_shape() {
        let r = ExecutionResult {
            stdout: "hi\n".into(),
            exit_code: 3,
            execution_time_ms: Some(5),
            ..Default::default()
        };
        let v = result_json(&r);
        assert_eq!(v["stdout"], "hi\n");
        assert_eq!(v["exit_code"], 3);
        assert_eq!(v["timing"]["total_ms"], 0);
        assert_eq!(v["warm_pool_hit"], false);
        assert_eq!(v["vm_start"], "cold");
        assert!(v.get("memory_peak_mb").is_none());
        assert!(v.get("exposed_ports").is_none());
        let keys: Vec<&str> = v
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        assert_eq!(keys.len(), 7, "{keys:?}");
    }

    #[test]
    fn bodies_take_defaults_and_refuse_unknown_fields() {
        let d = SchedulerConfig::default();
        let b: RunBody = serde_json::from_str(r#"{"code":"1"}"#).unwrap();
        let req = b.to_request(&d);
        assert_eq!(req.language, Language::Python);
        assert_eq!((req.timeout_secs, req.memory_mb), (30, 192));
        let b: RunBody = serde_json::from_str(
            r#"{"code":"1","language":"raw","timeout_secs":5,"env":{"A":"1"}}"#,
        )
        .unwrap();
        let req = b.to_request(&d);
        assert_eq!(req.timeout_secs, 5);
        assert_eq!(req.env, vec![("A".to_owned(), "1".to_owned())]);
        assert!(serde_json::from_str::<RunBody>(r#"{"code":"1","tiemout":3}"#).is_err());
        let s: SessionBody = serde_json::from_str("{}").unwrap();
        assert_eq!(s.to_request(&d).idle_timeout_secs, 300);
        assert_eq!(s.to_request(&d).disk_mb, None);
        let s: SessionBody = serde_json::from_str(r#"{"disk_mb":600}"#).unwrap();
        assert_eq!(s.to_request(&d).disk_mb, Some(600));
        let b: RunBody = serde_json::from_str(r#"{"code":"1","disk_mb":64}"#).unwrap();
        assert_eq!(b.to_request(&d).disk_mb, Some(64));
    }
}
