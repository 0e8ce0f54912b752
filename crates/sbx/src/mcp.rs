//! `sbx mcp`: a Model Context Protocol server over stdio (the official Rust SDK, `rmcp`).
//!
//! Tools: `run_code` (a fresh VM per call), `create_session`, `exec_in_session`,
//! `write_file`, `read_file`, `list_files`, `close_session`. Every failure of the sandbox or
//! of the caller's input is a tool error (`isError: true` with the typed error as JSON),
//! never a crash of the server; results are JSON text with the same fields as the HTTP API.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use base64::Engine as _;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use sandbox_core::{
    Error, ExecRequest, Language, OutputCallbacks, RunOptions, RunRequest, Scheduler, Session,
    SessionRequest,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::serve::api::RunResult;
use crate::serve::error::ApiError;

/// Largest file `read_file` returns (an MCP answer travels whole, inside one JSON-RPC line).
pub const MAX_READ_BYTES: usize = 1 << 20;
/// Largest file `write_file` accepts.
pub const MAX_WRITE_BYTES: usize = 8 << 20;
/// Most sessions one MCP client may hold open at once.
pub const MAX_SESSIONS: usize = 8;

/// Interpreter of a run or session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum McpLanguage {
    /// Python 3.
    #[default]
    Python,
    /// JavaScript (Node.js).
    Javascript,
    /// A bash script.
    Raw,
}

impl From<McpLanguage> for Language {
    fn from(l: McpLanguage) -> Self {
        match l {
            McpLanguage::Python => Language::Python,
            McpLanguage::Javascript => Language::Javascript,
            McpLanguage::Raw => Language::Raw,
        }
    }
}

/// `run_code` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCodeArgs {
    /// The source code to run.
    pub code: String,
    /// Interpreter: `python` (default), `javascript` (Node.js) or `raw` (bash).
    #[serde(default)]
    pub language: Option<McpLanguage>,
    /// Timeout in seconds, 1–300 (default 30). On timeout the result has exit_code -1.
    #[serde(default)]
    pub timeout_seconds: Option<u32>,
    /// Environment variables for the code.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// `create_session` arguments.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSessionArgs {
    /// Interpreter of the session's REPL: `python` (default), `javascript` or `raw`.
    #[serde(default)]
    pub language: Option<McpLanguage>,
    /// Seconds without any call before the session closes itself, 10–3600 (default 300).
    #[serde(default)]
    pub idle_timeout_seconds: Option<u32>,
}

/// `exec_in_session` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecArgs {
    /// The id `create_session` returned.
    pub session_id: String,
    /// Code to run in the session's REPL (variables, imports and files persist).
    pub code: String,
    /// Timeout in seconds, 1–300 (default 30).
    #[serde(default)]
    pub timeout_seconds: Option<u32>,
}

/// `write_file` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileArgs {
    /// The id `create_session` returned.
    pub session_id: String,
    /// Path relative to the guest's home directory (`/home/user`).
    pub path: String,
    /// The file's content: UTF-8 text, or base64 when `base64` is true.
    pub content: String,
    /// `content` is base64-encoded bytes.
    #[serde(default)]
    pub base64: bool,
    /// Make the file executable.
    #[serde(default)]
    pub executable: bool,
}

/// `read_file` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFileArgs {
    /// The id `create_session` returned.
    pub session_id: String,
    /// Path relative to the guest's home directory (`/home/user`).
    pub path: String,
}

/// `list_files` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListFilesArgs {
    /// The id `create_session` returned.
    pub session_id: String,
    /// Directory relative to `/home/user` (default: the home directory itself).
    #[serde(default)]
    pub dir: Option<String>,
}

/// `close_session` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloseSessionArgs {
    /// The id `create_session` returned.
    pub session_id: String,
}

/// The MCP server: tools over a [`Scheduler`], with the sessions this client opened.
#[derive(Clone)]
pub struct SbxMcp {
    scheduler: Scheduler,
    sessions: Arc<Mutex<HashMap<String, Session>>>,
    tool_router: ToolRouter<Self>,
}

impl std::fmt::Debug for SbxMcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SbxMcp").finish_non_exhaustive()
    }
}

/// A tool error: `isError: true`, the typed error (`kind`, `message`, `retryable`) as JSON.
fn tool_error(kind: &str, message: impl Into<String>, retryable: bool) -> CallToolResult {
    let body = json!({"error": {"kind": kind, "message": message.into(), "retryable": retryable}});
    CallToolResult::error(vec![ContentBlock::text(body.to_string())])
}

fn sandbox_error(e: &Error) -> CallToolResult {
    let api = ApiError::from(e);
    let d = api.detail();
    tool_error(&d.kind, d.message.clone(), d.retryable)
}

fn ok_json(v: &Value) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(v.to_string())])
}

fn language(l: Option<McpLanguage>) -> Language {
    l.unwrap_or_default().into()
}

#[tool_router]
impl SbxMcp {
    /// A server over `scheduler`.
    pub fn new(scheduler: Scheduler) -> Self {
        Self {
            scheduler,
            sessions: Arc::new(Mutex::new(HashMap::new())),
            tool_router: Self::tool_router(),
        }
    }

    /// Closes every session this server opened.
    pub async fn close_all(&self) {
        let sessions: Vec<Session> = self.sessions.lock().await.drain().map(|(_, s)| s).collect();
        for s in sessions {
            s.close().await;
        }
    }

    async fn session(&self, id: &str) -> Result<Session, CallToolResult> {
        match self.sessions.lock().await.get(id) {
            Some(s) if !s.is_closed() => Ok(s.clone()),
            Some(_) => Err(tool_error(
                "session_closed",
                format!("session {id} is closed (idle timeout, VM death or close_session)"),
                false,
            )),
            None => Err(tool_error(
                "not_found",
                format!("no session {id}: create one with create_session"),
                false,
            )),
        }
    }

    #[tool(
        description = "Run code in a fresh, isolated microVM that is destroyed afterwards \
        (no state is kept between calls; use a session for that). No network. Returns JSON: \
        stdout, stderr, exit_code (-1 on timeout), timing. Output is limited to 1 MB stdout \
        and 100 KB stderr."
    )]
    async fn run_code(&self, Parameters(a): Parameters<RunCodeArgs>) -> CallToolResult {
        let mut req = RunRequest::new(language(a.language), a.code);
        let d = self.scheduler.config();
        req.timeout_secs = a.timeout_seconds.unwrap_or(d.default_timeout_secs);
        req.memory_mb = d.default_memory_mb;
        req.env = a.env.into_iter().collect();
        match self.scheduler.run(req, RunOptions::default()).await {
            Ok(r) => ok_json(&json!(RunResult::from(&r))),
            Err(e) => sandbox_error(&e),
        }
    }

    #[tool(
        description = "Start a session: a microVM whose interpreter state (variables, \
        imports, files in /home/user) persists across exec_in_session calls. Returns JSON \
        with session_id. Close it with close_session when done."
    )]
    async fn create_session(&self, Parameters(a): Parameters<CreateSessionArgs>) -> CallToolResult {
        if self.sessions.lock().await.len() >= MAX_SESSIONS {
            return tool_error(
                "too_many_sessions",
                format!("at most {MAX_SESSIONS} sessions are open at once: close one first"),
                true,
            );
        }
        let lang = language(a.language);
        let mut req = SessionRequest::new(lang);
        let d = self.scheduler.config();
        req.memory_mb = d.default_memory_mb;
        req.idle_timeout_secs = a
            .idle_timeout_seconds
            .unwrap_or(d.session_idle_timeout_secs);
        match self.scheduler.session(req, RunOptions::default()).await {
            Ok(s) => {
                let id = s.id().to_string();
                self.sessions.lock().await.insert(id.clone(), s);
                ok_json(&json!({"session_id": id, "language": lang.to_string()}))
            }
            Err(e) => sandbox_error(&e),
        }
    }

    #[tool(
        description = "Run code in a session's REPL; state from earlier calls is kept. \
        Returns JSON: stdout, stderr, exit_code (-1 on timeout; the REPL restarts after a \
        timeout), timing."
    )]
    async fn exec_in_session(&self, Parameters(a): Parameters<ExecArgs>) -> CallToolResult {
        let s = match self.session(&a.session_id).await {
            Ok(s) => s,
            Err(e) => return e,
        };
        let mut req = ExecRequest::new(a.code);
        req.timeout_secs = a
            .timeout_seconds
            .unwrap_or(self.scheduler.config().default_timeout_secs);
        match s.exec(req, &OutputCallbacks::default()).await {
            Ok(r) => ok_json(&json!(RunResult::from(&r))),
            Err(e) => sandbox_error(&e),
        }
    }

    #[tool(
        description = "Write a file into a session's guest (path relative to /home/user; \
        parent directories are created). Content is UTF-8 text, or base64 with base64=true; \
        at most 8 MiB."
    )]
    async fn write_file(&self, Parameters(a): Parameters<WriteFileArgs>) -> CallToolResult {
        let s = match self.session(&a.session_id).await {
            Ok(s) => s,
            Err(e) => return e,
        };
        let bytes = if a.base64 {
            match base64::engine::general_purpose::STANDARD.decode(a.content.as_bytes()) {
                Ok(b) => b,
                Err(e) => return tool_error("input", format!("content is not base64: {e}"), false),
            }
        } else {
            a.content.into_bytes()
        };
        if bytes.len() > MAX_WRITE_BYTES {
            return tool_error(
                "payload_too_large",
                format!("the file is larger than the {MAX_WRITE_BYTES} byte limit of sbx mcp"),
                false,
            );
        }
        match s.write_bytes(&a.path, &bytes, a.executable).await {
            Ok(size) => ok_json(&json!({"path": a.path, "size": size})),
            Err(e) => sandbox_error(&e),
        }
    }

    #[tool(
        description = "Read a file from a session's guest (path relative to /home/user), at \
        most 1 MiB. Returns JSON: path, size, and content (UTF-8 text) or content_base64 \
        (binary files)."
    )]
    async fn read_file(&self, Parameters(a): Parameters<ReadFileArgs>) -> CallToolResult {
        let s = match self.session(&a.session_id).await {
            Ok(s) => s,
            Err(e) => return e,
        };
        // Bounded: the listing says how large the file is before any byte travels.
        let (dir, name) = match a.path.rsplit_once('/') {
            Some((d, n)) => (d, n),
            None => ("", a.path.as_str()),
        };
        if let Ok(entries) = s.list_files(dir).await
            && let Some(e) = entries.iter().find(|e| e.name == name)
            && e.size > MAX_READ_BYTES as u64
        {
            return tool_error(
                "output_limit",
                format!(
                    "{} is {} bytes, more than the {MAX_READ_BYTES} bytes read_file returns; \
                     process it in the session instead",
                    a.path, e.size
                ),
                false,
            );
        }
        match s.read_bytes(&a.path).await {
            Ok(bytes) if bytes.len() > MAX_READ_BYTES => tool_error(
                "output_limit",
                format!("{} is larger than {MAX_READ_BYTES} bytes", a.path),
                false,
            ),
            Ok(bytes) => {
                let size = bytes.len();
                match String::from_utf8(bytes) {
                    Ok(text) => ok_json(&json!({"path": a.path, "size": size, "content": text})),
                    Err(e) => ok_json(&json!({
                        "path": a.path,
                        "size": size,
                        "content_base64": base64::engine::general_purpose::STANDARD
                            .encode(e.into_bytes()),
                    })),
                }
            }
            Err(e) => sandbox_error(&e),
        }
    }

    #[tool(
        description = "List a directory of a session's guest (relative to /home/user; \
        default: the home directory). Returns JSON entries with name, is_dir, size."
    )]
    async fn list_files(&self, Parameters(a): Parameters<ListFilesArgs>) -> CallToolResult {
        let s = match self.session(&a.session_id).await {
            Ok(s) => s,
            Err(e) => return e,
        };
        let dir = a.dir.unwrap_or_default();
        match s.list_files(&dir).await {
            Ok(entries) => {
                let entries: Vec<Value> = entries
                    .iter()
                    .map(|e| json!({"name": e.name, "is_dir": e.is_dir, "size": e.size}))
                    .collect();
                ok_json(&json!({"dir": dir, "entries": entries}))
            }
            Err(e) => sandbox_error(&e),
        }
    }

    #[tool(description = "Close a session and destroy its microVM.")]
    async fn close_session(&self, Parameters(a): Parameters<CloseSessionArgs>) -> CallToolResult {
        match self.sessions.lock().await.remove(&a.session_id) {
            Some(s) => {
                s.close().await;
                ok_json(&json!({"session_id": a.session_id, "closed": true}))
            }
            None => tool_error("not_found", format!("no session {}", a.session_id), false),
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for SbxMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("sbx", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "sbx runs untrusted Python, JavaScript and bash code in isolated QEMU \
                 microVMs without network. Use run_code for one-off snippets; use \
                 create_session + exec_in_session when state must persist, with write_file, \
                 read_file and list_files for the session's files, and close_session at \
                 the end.",
            )
    }
}

/// Runs `sbx mcp`: serves MCP on stdin/stdout until the client closes stdin; returns the
/// exit status.
pub async fn main(config: crate::SbxConfig) -> i32 {
    let sbx = match crate::Sbx::start(config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sbx mcp: {e}");
            return 125;
        }
    };
    let server = SbxMcp::new(sbx.scheduler().clone());
    let status = match server.clone().serve(rmcp::transport::stdio()).await {
        Ok(running) => match running.waiting().await {
            Ok(_) => 0,
            Err(e) => {
                eprintln!("sbx mcp: {e}");
                125
            }
        },
        Err(e) => {
            eprintln!("sbx mcp: the MCP handshake failed: {e}");
            125
        }
    };
    server.close_all().await;
    sbx.stop().await;
    status
}
