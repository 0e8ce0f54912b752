//! Agent configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A uid/gid pair that user code runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserIds {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl UserIds {
    /// The unprivileged user of the VM images (1000:1000).
    pub const VM_USER: UserIds = UserIds {
        uid: 1000,
        gid: 1000,
    };
}

/// Everything the engine needs to know about its environment.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Session root: user code's cwd and HOME, and the base of every file path
    /// (`/home/user` in the VM).
    pub root: PathBuf,
    /// Run user code (REPLs, package managers) as this user. `None`: as the agent's own
    /// user (host mode without privileges).
    pub user: Option<UserIds>,
    /// `RLIMIT_NPROC` for user code (only effective for an unprivileged uid).
    pub nproc: u64,
    /// Grace period between SIGTERM and SIGKILL on timeout or cancel.
    pub grace: Duration,
    /// python3 interpreter.
    pub python: PathBuf,
    /// JavaScript runtime: Bun (a file named `bun*`, the images' runtime) or Node.js
    /// (anything else; see [`JsRuntime`]).
    pub node: PathBuf,
    /// bash.
    pub bash: PathBuf,
    /// `PATH` of user code.
    pub path_env: String,
    /// Directory for temporary scripts (`#!` raw code); must allow exec.
    pub temp_dir: PathBuf,
    /// Reseed the kernel CRNG (`RNDRESEEDCRNG`) before each exec (needs root; VM only).
    pub reseed_crng: bool,
    /// Milliseconds from kernel start to the agent being ready (reported in `Pong`).
    pub boot_ms: Option<u64>,
    /// Microseconds of PID 1 setup: mounts, switch to the root image, hardening, network
    /// (reported in `Pong`).
    pub setup_us: Option<u64>,
    /// True when running as PID 1 inside the VM: `Shutdown` powers the machine off, and
    /// `Resume` sets the wall clock and feeds the kernel RNG.
    pub pid1: bool,
    /// On `Resume`, replace a live node REPL with a fresh process instead of reseeding it
    /// in place — unless the resume set the wall clock back past the node's start. Node's
    /// `crypto` draws from OpenSSL's DRBG, whose state is cloned with the snapshot and
    /// cannot be reseeded from JavaScript (TLS and key generation use it natively); the
    /// in-place reseed covers `Math.random` and the JavaScript `crypto` functions only.
    /// OpenSSL 3 reseeds a DRBG by itself when the clock reads earlier than its last
    /// seeding, so the host makes snapshots with the guest clock set far ahead: restored
    /// node clones then reseed in place. Bun (BoringSSL) has no such rule and always
    /// restarts (a Bun start-up is a fraction of node's).
    pub restart_node_on_resume: bool,
    /// Top of the mounted package layer (`/opt/sbx-packages`), when the host attached
    /// one: its `python/` goes on `PYTHONPATH`, its `node_modules/` on `NODE_PATH`, after
    /// the user's own install directories.
    pub package_dir: Option<PathBuf>,
}

/// Where the images install Bun (from the npm registry).
pub const VM_BUN: &str = "/usr/local/bin/bun";
/// Node.js from the npm registry (the bench-only `javascript-node24` image).
pub const VM_NODE_LOCAL: &str = "/usr/local/bin/node";
/// Debian's node (the images before Bun, kept buildable for comparisons).
pub const VM_NODE: &str = "/usr/bin/node";

/// Which JavaScript runtime a REPL runs on, and so which wrapper it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsRuntime {
    /// Bun: TypeScript, REPL-mode declarations and top-level await from its transpiler.
    Bun,
    /// Node.js: plain JavaScript (top-level await through Node's REPL transform).
    Node,
}

impl JsRuntime {
    /// The runtime at `path`, told by its file name.
    pub fn of(path: &Path) -> Self {
        match path.file_name().and_then(|n| n.to_str()) {
            Some(n) if n.starts_with("bun") => JsRuntime::Bun,
            _ => JsRuntime::Node,
        }
    }
}

const DEFAULT_PATH: &str = "/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin";

impl AgentConfig {
    /// Configuration for the agent as PID 1 inside the VM.
    pub fn vm() -> Self {
        let root = PathBuf::from("/home/user");
        Self {
            path_env: user_path(&root),
            root,
            user: Some(UserIds::VM_USER),
            nproc: 1024,
            grace: Duration::from_secs(3),
            python: PathBuf::from("/usr/bin/python3"),
            node: [VM_BUN, VM_NODE_LOCAL, VM_NODE]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
                .unwrap_or_else(|| PathBuf::from(VM_BUN)),
            bash: PathBuf::from("/bin/bash"),
            temp_dir: PathBuf::from("/tmp"),
            reseed_crng: true,
            boot_ms: None,
            setup_us: None,
            pid1: true,
            restart_node_on_resume: true,
            package_dir: None,
        }
    }

    /// Configuration for host mode (tests, development): user code runs as the current
    /// user in `root`; interpreters are taken from `/usr/bin` (or `/bin`) when present
    /// there, so they also work for another uid, else looked up on `PATH`.
    pub fn host(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Self {
            path_env: user_path(&root),
            python: find_interpreter("python3"),
            node: find_js_runtime(),
            bash: find_interpreter("bash"),
            root,
            user: None,
            nproc: 1024,
            grace: Duration::from_secs(3),
            temp_dir: std::env::temp_dir(),
            reseed_crng: false,
            boot_ms: None,
            setup_us: None,
            pid1: false,
            restart_node_on_resume: true,
            package_dir: None,
        }
    }

    /// Directory pip installs into (on the REPL's `PYTHONPATH`).
    pub fn python_packages_dir(&self) -> PathBuf {
        self.root.join(".local/lib/python3/site-packages")
    }

    /// The JavaScript runtime [`node`](Self::node) is.
    pub fn js_runtime(&self) -> JsRuntime {
        JsRuntime::of(&self.node)
    }

    /// Prefix npm installs into (`<prefix>/node_modules`).
    pub fn node_prefix(&self) -> PathBuf {
        self.root.clone()
    }
}

fn user_path(root: &Path) -> String {
    format!(
        "{}:{}:{DEFAULT_PATH}",
        root.join(".local/bin").display(),
        root.join("node_modules/.bin").display()
    )
}

/// `/usr/bin/<name>` or `/bin/<name>` when present, else [`find_on_path`].
pub fn find_interpreter(name: &str) -> PathBuf {
    ["/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| find_on_path(name))
}

/// The host's JavaScript runtime: `bun` (in `/usr/local/bin`, `/usr/bin`, `/bin` or on
/// `PATH`), else `node` ([`find_interpreter`]).
pub fn find_js_runtime() -> PathBuf {
    ["/usr/local/bin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join("bun"))
        .find(|p| p.is_file())
        .or_else(|| Some(find_on_path("bun")).filter(|p| p.is_absolute()))
        .unwrap_or_else(|| find_interpreter("node"))
}

/// Finds `name` on the agent's `PATH`, or returns it unchanged.
pub fn find_on_path(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}
