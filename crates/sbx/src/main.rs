//! The `sbx` command-line interface.
//!
//! Exit status: the code's exit status; 124 on timeout; 125 on a sandbox error (message on
//! stderr); 2 on usage errors; 130 on Ctrl-C (VMs are cleaned up first).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sandbox_core::{
    Error, ErrorKind, ExecRequest, ExecutionResult, Language, OutputCallbacks, PortMapping,
    PortProtocol, RunOptions, RunRequest, SessionRequest,
};
use sbx::{Sbx, SbxConfig};
use serde_json::json;

const EXIT_USAGE: i32 = 2;
const EXIT_TIMEOUT: i32 = 124;
const EXIT_SANDBOX: i32 = 125;
const EXIT_INTERRUPTED: i32 = 130;

/// Run untrusted code in QEMU microVMs.
#[derive(Debug, Parser)]
#[command(name = "sbx", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Settings of every command that starts VMs: each is a flag and an `SBX_*` variable (the
/// flag wins), validated by clap either way (a bad value is a usage error, exit 2).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Settings (each also an SBX_* variable; the flag wins)")]
struct Settings {
    /// Guest assets directory [default: ~/.cache/sbx/assets].
    #[arg(
        long,
        global = true,
        env = "SBX_ASSETS_DIR",
        value_name = "DIR",
        hide_env_values = true
    )]
    assets_dir: Option<std::ffi::OsString>,
    /// Per-VM scratch directory [default: /tmp/sbx-<uid>].
    #[arg(
        long,
        global = true,
        env = "SBX_WORK_DIR",
        value_name = "DIR",
        hide_env_values = true
    )]
    work_dir: Option<std::ffi::OsString>,
    /// Warm VMs kept booted per language [default: 0].
    #[arg(
        long,
        global = true,
        env = "SBX_WARM_POOL",
        value_name = "N",
        hide_env_values = true
    )]
    warm_pool: Option<usize>,
    /// Most VMs alive at once [default: 32].
    #[arg(long, global = true, env = "SBX_MAX_VMS", value_name = "N", hide_env_values = true,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_vms: Option<u32>,
    /// L1 snapshots (on/off, true/false, 1/0) [default: on].
    #[arg(long, global = true, env = "SBX_SNAPSHOTS", value_name = "BOOL", hide_env_values = true,
          value_parser = clap::builder::BoolishValueParser::new())]
    snapshots: Option<bool>,
    /// Where L1 snapshots are kept [default: ~/.cache/sbx/snapshots].
    #[arg(
        long,
        global = true,
        env = "SBX_SNAPSHOT_DIR",
        value_name = "DIR",
        hide_env_values = true
    )]
    snapshot_dir: Option<std::ffi::OsString>,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `sbx=debug`)
    /// [default: error; info for serve].
    #[arg(long = "log", global = true, env = "SBX_LOG", value_name = "FILTER", hide_env_values = true,
          value_parser = parse_log_filter)]
    log: Option<String>,
}

fn parse_log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

impl Settings {
    /// The library's configuration: the defaults (`SbxConfig::from_env`) with these
    /// settings applied.
    fn config(&self) -> SbxConfig {
        // An empty path is unset, as it always was for the variables.
        let path = |v: &Option<std::ffi::OsString>| {
            v.as_ref().filter(|v| !v.is_empty()).map(PathBuf::from)
        };
        let mut cfg = SbxConfig::from_env();
        if let Some(d) = path(&self.assets_dir) {
            cfg.assets_dir = d;
        }
        if let Some(d) = path(&self.work_dir) {
            cfg.work_dir = d;
        }
        if let Some(n) = self.warm_pool {
            cfg.warm_pool_size = n;
            cfg.scheduler.warm_pool_size = n;
        }
        if let Some(n) = self.max_vms {
            cfg.max_vms = n as usize;
        }
        if let Some(d) = path(&self.snapshot_dir) {
            cfg.snapshot_dir = Some(d);
        }
        if self.snapshots == Some(false) {
            cfg.snapshot_dir = None;
        }
        cfg
    }
}

/// `SBX_FORCE_TCG` is read by the host probes; a value that is not a boolean is a usage
/// error rather than silently "off".
fn check_force_tcg() -> Result<(), String> {
    match std::env::var("SBX_FORCE_TCG") {
        Ok(v) if !v.trim().is_empty() => {
            let v = v.trim().to_ascii_lowercase();
            if ["1", "0", "true", "false", "yes", "no", "on", "off"].contains(&v.as_str()) {
                Ok(())
            } else {
                Err(format!(
                    "SBX_FORCE_TCG={v:?}: expected 1/0, true/false, yes/no or on/off"
                ))
            }
        }
        _ => Ok(()),
    }
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run code in a fresh microVM (also: `sbx 'code'`).
    Run(Box<RunArgs>),
    /// Report what this host can do and what is missing.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// As root: create the unprivileged `sbx-qemu` user QEMU runs as, and grant it access
    /// to the guest assets and the work dir (idempotent).
    Setup,
    /// Inspect or trim the package layer cache (`$SBX_PACKAGE_DIR`).
    #[command(subcommand)]
    Cache(CacheCmd),
    // --- sbx serve (crates/sbx/src/serve/) ---
    /// Serve the HTTP API (bearer token required unless --no-auth on loopback).
    Serve(Box<sbx::serve::ServeArgs>),
    // --- end sbx serve ---
    /// An interactive session on this terminal: one VM, its interpreter state kept across
    /// inputs (Ctrl-C interrupts an exec, Ctrl-D closes the session).
    #[command(visible_alias = "repl")]
    Session(Box<sbx::repl::SessionArgs>),
    /// Serve the Model Context Protocol on stdin/stdout (tools: run code, sessions, files).
    Mcp,
    /// Print the HTTP API's OpenAPI 3.1 document (what `GET /v1/openapi.json` answers).
    Openapi,
    /// Print a shell completion script (e.g. `sbx completions bash > /etc/bash_completion.d/sbx`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (sbx.1 and one per subcommand) into DIR (`cargo xtask man`).
    #[command(hide = true)]
    ManPages {
        /// Output directory (created).
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum CacheCmd {
    /// List the package layers, most recently used first.
    Ls,
    /// Remove least recently used package layers until the cache takes at most MB.
    Gc {
        /// Size to keep, in MB (0 removes every layer).
        #[arg(long, default_value_t = 0)]
        max_mb: u64,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Inline code, a file (language from its extension) or `-` for stdin.
    sources: Vec<String>,
    /// python, javascript or raw (default: from the file extension, else python).
    #[arg(short, long)]
    language: Option<String>,
    /// Inline code (repeatable).
    #[arg(short, long = "code")]
    code: Vec<String>,
    /// Timeout in seconds (1-300).
    #[arg(short, long, default_value_t = 30)]
    timeout: u32,
    /// Guest memory in MB (≥ 128).
    #[arg(short, long, default_value_t = 192)]
    memory: u32,
    /// Disk-backed home directory of MB (64-4096); default: a tmpfs of 40 % of the memory.
    #[arg(long = "disk", value_name = "MB")]
    disk: Option<u32>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(short, long = "env")]
    env: Vec<String>,
    /// Print one JSON object per source.
    #[arg(long)]
    json: bool,
    /// No progress output.
    #[arg(short, long)]
    quiet: bool,
    /// Upload LOCAL:GUEST before running (repeatable; one source only).
    #[arg(long)]
    upload: Vec<String>,
    /// Download GUEST[:LOCAL] after running (repeatable; one source only).
    #[arg(long)]
    download: Vec<String>,
    /// Boot log and debug logs to stderr.
    #[arg(long)]
    debug: bool,
    /// Print the guest's output byte for byte even on a terminal (by default control
    /// characters, such as escape sequences, are shown as `\xNN` there).
    #[arg(long)]
    raw_output: bool,
    /// Allow outbound network (filtered by --allow-domain when given).
    #[arg(long)]
    network: bool,
    /// Allowed domain, with its subdomains (repeatable; implies --network).
    #[arg(long = "allow-domain")]
    allow_domain: Vec<String>,
    /// Expose a guest port on 127.0.0.1: INTERNAL[:EXTERNAL][/tcp] (repeatable; TCP only).
    #[arg(long)]
    expose: Vec<String>,
    /// Package to make importable, an exact pin: `numpy==2.1.3`, `lodash@4.17.21`
    /// (repeatable, at most 50; built on the host into a read-only layer).
    #[arg(short = 'p', long = "package", value_name = "SPEC")]
    package: Vec<String>,
    /// Package allowlist file (names only; default: SBX_PACKAGE_ALLOWLIST, else the shipped
    /// list).
    #[arg(long, value_name = "FILE", conflicts_with = "no_package_allowlist")]
    package_allowlist: Option<PathBuf>,
    /// Allow any package (turns the allowlist off).
    #[arg(long)]
    no_package_allowlist: bool,
}

/// The settings flags that take a value (they may come before the subcommand).
const SETTING_FLAGS: &[&str] = &[
    "--assets-dir",
    "--work-dir",
    "--warm-pool",
    "--max-vms",
    "--snapshots",
    "--snapshot-dir",
    "--log",
];

/// Inserts `run` when the first argument after any settings flags is not a subcommand or a
/// top-level flag.
fn normalize_args(mut args: Vec<String>) -> Vec<String> {
    let mut i = 1;
    while let Some(a) = args.get(i) {
        if SETTING_FLAGS.contains(&a.as_str()) {
            i += 2;
        } else if SETTING_FLAGS
            .iter()
            .any(|f| a.starts_with(&format!("{f}=")))
        {
            i += 1;
        } else {
            break;
        }
    }
    if let Some(first) = args.get(i) {
        let known = [
            "run",
            "doctor",
            "setup",
            "cache",
            "serve",
            "openapi",
            "mcp",
            "completions",
            "man-pages",
            "session",
            "repl",
            "help",
            "-h",
            "--help",
            "-V",
            "--version",
        ];
        if !known.contains(&first.as_str()) {
            args.insert(i, "run".to_owned());
        }
    }
    args
}

struct Source {
    label: String,
    language: Language,
    code: String,
}

fn usage(msg: impl std::fmt::Display) -> i32 {
    eprintln!("sbx: {msg}");
    EXIT_USAGE
}

fn load_sources(args: &RunArgs) -> Result<Vec<Source>, String> {
    let mut out = Vec::new();
    let mut stdin_used = false;
    let lang_flag = args.language.as_deref();
    let parse_lang = |path: Option<&std::path::Path>| {
        sbx::language_for(lang_flag, path).map_err(|e| e.message().to_owned())
    };
    for s in &args.sources {
        if s == "-" {
            if stdin_used {
                return Err("stdin (-) can be used only once".into());
            }
            stdin_used = true;
            let mut code = String::new();
            std::io::stdin()
                .read_to_string(&mut code)
                .map_err(|e| format!("reading stdin: {e}"))?;
            out.push(Source {
                label: "-".into(),
                language: parse_lang(None)?,
                code,
            });
        } else if std::path::Path::new(s).is_file() {
            let path = std::path::Path::new(s);
            let code = std::fs::read_to_string(path).map_err(|e| format!("reading {s}: {e}"))?;
            out.push(Source {
                label: s.clone(),
                language: parse_lang(Some(path))?,
                code,
            });
        } else {
            out.push(Source {
                label: s.clone(),
                language: parse_lang(None)?,
                code: s.clone(),
            });
        }
    }
    for c in &args.code {
        out.push(Source {
            label: c.clone(),
            language: parse_lang(None)?,
            code: c.clone(),
        });
    }
    if out.is_empty() {
        return Err("no code given (sbx run 'CODE', a file, or - for stdin)".into());
    }
    if out.iter().any(|s| s.code.trim().is_empty()) {
        return Err("code is empty".into());
    }
    Ok(out)
}

fn parse_env(items: &[String]) -> Result<Vec<(String, String)>, String> {
    items
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some(("", _)) => Err(format!("--env {kv:?}: empty name")),
            Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
            None => Err(format!("--env {kv:?}: expected KEY=VALUE")),
        })
        .collect()
}

fn result_json(r: &ExecutionResult) -> serde_json::Value {
    // Shared with `POST /v1/run` of `sbx serve`.
    sbx::serve::result_json(r)
}

fn exit_status_of(r: &ExecutionResult) -> i32 {
    if r.timed_out() {
        EXIT_TIMEOUT
    } else {
        r.exit_code.clamp(0, 255)
    }
}

fn error_status(e: &Error) -> i32 {
    match e.kind() {
        ErrorKind::Input => EXIT_USAGE,
        _ => EXIT_SANDBOX,
    }
}

/// A progress line on stderr while a VM boots (terminal only; indicatif).
struct Spinner(indicatif::ProgressBar);

impl Spinner {
    fn start(enabled: bool, label: &'static str) -> Self {
        if !enabled {
            return Self(indicatif::ProgressBar::hidden());
        }
        let bar =
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            bar.set_style(style.tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ "));
        }
        bar.set_message(label);
        bar.enable_steady_tick(Duration::from_millis(100));
        Self(bar)
    }

    async fn finish(self) {
        self.0.finish_and_clear();
    }
}

/// Whether guest output bound for stdout / stderr gets its control characters escaped
/// (a terminal, unless `--raw-output`).
fn escape_output(raw: bool) -> (bool, bool) {
    (
        !raw && std::io::stdout().is_terminal(),
        !raw && std::io::stderr().is_terminal(),
    )
}

/// `chunk` as it may be shown: escaped through `escaper` when there is one.
fn shown(escaper: Option<&std::sync::Mutex<sbx::term::Escaper>>, chunk: &[u8]) -> Vec<u8> {
    match escaper {
        Some(e) => match e.lock() {
            Ok(mut e) => e.escape(chunk),
            Err(p) => p.into_inner().escape(chunk),
        },
        None => chunk.to_vec(),
    }
}

fn callbacks(stream: bool, first_output: Arc<AtomicBool>, raw: bool) -> OutputCallbacks {
    if !stream {
        return OutputCallbacks::default();
    }
    let (esc_out, esc_err) = escape_output(raw);
    let out_escaper = esc_out.then(|| std::sync::Mutex::new(sbx::term::Escaper::default()));
    let err_escaper = esc_err.then(|| std::sync::Mutex::new(sbx::term::Escaper::default()));
    let f1 = first_output.clone();
    OutputCallbacks {
        on_stdout: Some(Arc::new(move |chunk: &[u8]| {
            f1.store(true, Ordering::Relaxed);
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&shown(out_escaper.as_ref(), chunk));
            let _ = out.flush();
        })),
        on_stderr: Some(Arc::new(move |chunk: &[u8]| {
            first_output.store(true, Ordering::Relaxed);
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(&shown(err_escaper.as_ref(), chunk));
            let _ = err.flush();
        })),
    }
}

async fn run_single_with_files(
    sbx: &Sbx,
    src: &Source,
    args: &RunArgs,
    base: &RunRequest,
    opts: RunOptions,
) -> Result<ExecutionResult, Error> {
    let mut sreq = SessionRequest::new(src.language);
    sreq.memory_mb = base.memory_mb;
    sreq.disk_mb = base.disk_mb;
    sreq.network = base.network.clone();
    sreq.packages = base.packages.clone();
    let uploads = check_uploads(&args.upload)?;
    let session = sbx.scheduler().session(sreq, opts.clone()).await?;
    let result = async {
        for (local, guest) in &uploads {
            session.upload(local, guest, false).await?;
        }
        let mut exec = ExecRequest::new(src.code.clone());
        exec.timeout_secs = base.timeout_secs;
        exec.env = base.env.clone();
        let r = session.exec(exec, &opts.callbacks).await?;
        for down in &args.download {
            let (guest, local) = match down.split_once(':') {
                Some((g, l)) => (g.to_owned(), expand_tilde(l)),
                None => {
                    let name = std::path::Path::new(down)
                        .file_name()
                        .map(PathBuf::from)
                        .unwrap_or_else(|| PathBuf::from(down));
                    (down.clone(), name)
                }
            };
            session.download(&guest, &local).await?;
        }
        Ok(r)
    }
    .await;
    session.close().await;
    result
}

/// `--upload LOCAL:GUEST` values, checked before any VM work: the split, an existing local
/// file, a guest path that stays in the home directory.
fn check_uploads(specs: &[String]) -> Result<Vec<(PathBuf, String)>, Error> {
    specs
        .iter()
        .map(|up| {
            let (local, guest) = up
                .split_once(':')
                .ok_or_else(|| Error::input("upload", format!("{up:?}: expected LOCAL:GUEST")))?;
            let local = expand_tilde(local);
            if !local.is_file() {
                return Err(Error::input(
                    "upload",
                    format!("{}: no such file", local.display()),
                ));
            }
            guest_proto::limits::normalize_guest_path(guest, false)
                .map_err(|e| Error::input("upload", format!("{up:?}: {e}")))?;
            Ok((local, guest.to_owned()))
        })
        .collect()
}

/// `--download GUEST[:LOCAL]` guest paths, checked before any VM work.
fn check_downloads(specs: &[String]) -> Result<(), Error> {
    for down in specs {
        let guest = down.split_once(':').map_or(down.as_str(), |(g, _)| g);
        guest_proto::limits::normalize_guest_path(guest, false)
            .map_err(|e| Error::input("download", format!("{down:?}: {e}")))?;
    }
    Ok(())
}

fn expand_tilde(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

async fn cmd_run(args: RunArgs, cfg: SbxConfig) -> i32 {
    let sources = match load_sources(&args) {
        Ok(s) => s,
        Err(e) => return usage(e),
    };
    let env = match parse_env(&args.env) {
        Ok(e) => e,
        Err(e) => return usage(e),
    };
    let mut expose = Vec::new();
    for e in &args.expose {
        match e.parse::<PortMapping>() {
            // The network proxy forwards TCP only; say so now rather than after a VM
            // has been set up for it.
            Ok(p) if p.protocol == PortProtocol::Udp => {
                return usage(format!(
                    "--expose {e:?}: UDP forwards are not implemented (TCP only: \
                     INTERNAL[:EXTERNAL][/tcp])"
                ));
            }
            Ok(p) => expose.push(p),
            Err(err) => return usage(format!("--expose: {}", err.message())),
        }
    }
    if (!args.upload.is_empty() || !args.download.is_empty()) && sources.len() != 1 {
        return usage("--upload/--download need exactly one source");
    }
    if let Err(e) = check_uploads(&args.upload).and_then(|_| check_downloads(&args.download)) {
        return usage(e.to_string());
    }
    let allowlist_setting = sbx::AllowlistSetting::from_flags(
        args.package_allowlist.clone(),
        args.no_package_allowlist,
    );
    let allowlist = match allowlist_setting.load() {
        Ok(l) => l,
        Err(e) => return usage(format!("package allowlist: {}", e.message())),
    };
    let mut requests = Vec::new();
    for src in &sources {
        let mut req = RunRequest::new(src.language, src.code.clone());
        req.packages = args.package.clone();
        req.timeout_secs = args.timeout;
        req.memory_mb = args.memory;
        req.disk_mb = args.disk;
        req.env = env.clone();
        req.network.allow_network = args.network || !args.allow_domain.is_empty();
        req.network.allowed_domains = args.allow_domain.clone();
        req.network.expose_ports = expose.clone();
        // Validate every request before any VM work.
        let mut check = req.clone();
        let checked = check.validate().and_then(|()| {
            let specs = sandbox_core::packages::parse_specs(src.language, &check.packages)?;
            match &allowlist {
                Some(list) => list.check(src.language, &specs),
                None => Ok(()),
            }
        });
        if let Err(e) = checked {
            return usage(format!("{}: {}", src.label, e));
        }
        requests.push(req);
    }

    let show_progress = !args.quiet && !args.json && std::io::stderr().is_terminal();
    let spinner = Spinner::start(show_progress, "starting sandbox");
    let mut cfg = cfg;
    cfg.package_allowlist = allowlist_setting;
    let sbx = match Sbx::start(cfg).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            spinner.finish().await;
            eprintln!("sbx: {e}");
            return error_status(&e);
        }
    };
    spinner.finish().await;

    let stream = !args.json && sources.len() == 1;
    let first_output = Arc::new(AtomicBool::new(false));
    let boot_log = if args.debug {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                eprintln!("[boot] {line}");
            }
        });
        Some(tx)
    } else {
        None
    };
    let opts = RunOptions {
        callbacks: callbacks(stream, first_output.clone(), args.raw_output),
        boot_log,
    };

    let work = async {
        if !args.upload.is_empty() || !args.download.is_empty() {
            vec![run_single_with_files(&sbx, &sources[0], &args, &requests[0], opts.clone()).await]
        } else {
            let futs = requests.iter().cloned().map(|req| {
                let sbx = sbx.clone();
                let opts = opts.clone();
                async move { sbx.scheduler().run(req, opts).await }
            });
            futures_join(futs).await
        }
    };
    let results = tokio::select! {
        r = work => r,
        () = interrupted() => {
            eprintln!("\nsbx: interrupted, cleaning up");
            sbx.stop().await;
            return EXIT_INTERRUPTED;
        }
    };

    let mut status = 0;
    let mut any_timeout = false;
    let mut json_out = Vec::new();
    for (i, (src, r)) in sources.iter().zip(results).enumerate() {
        match r {
            Ok(r) => {
                if r.timed_out() {
                    any_timeout = true;
                }
                status = status.max(exit_status_of(&r));
                if args.json {
                    let mut v = result_json(&r);
                    if sources.len() > 1 {
                        v["index"] = json!(i);
                        v["source"] = json!(src.label);
                    }
                    json_out.push(v);
                } else if !stream {
                    let (esc_out, esc_err) = escape_output(args.raw_output);
                    let text = |s: &str, esc: bool| {
                        if esc {
                            String::from_utf8_lossy(&sbx::term::escape_all(s.as_bytes()))
                                .into_owned()
                        } else {
                            s.to_owned()
                        }
                    };
                    print!("{}", text(&r.stdout, esc_out));
                    eprint!("{}", text(&r.stderr, esc_err));
                }
            }
            Err(e) => {
                eprintln!("sbx: {}: {e}", src.label);
                status = status.max(error_status(&e));
                if args.json {
                    let mut v = json!({
                        "error": {"kind": e.kind().name(), "message": e.message(), "retryable": e.is_retryable()}
                    });
                    if sources.len() > 1 {
                        v["index"] = json!(i);
                        v["source"] = json!(src.label);
                    }
                    json_out.push(v);
                }
            }
        }
    }
    if args.json {
        let text = if json_out.len() == 1 {
            json_out[0].to_string()
        } else {
            serde_json::Value::Array(json_out).to_string()
        };
        println!("{text}");
    }
    let _ = std::io::stdout().flush();
    // The first run of a kind made its L1 snapshot in the background: let it finish
    // (bounded; Ctrl-C skips it) so the next `sbx run` restores instead of booting.
    tokio::select! {
        _ = sbx.scheduler().wait_background(SNAPSHOT_WAIT) => {}
        () = interrupted() => {}
    }
    sbx.stop().await;
    if any_timeout && status < EXIT_SANDBOX {
        return EXIT_TIMEOUT;
    }
    status
}

/// How long `sbx run` waits, after its output, for a snapshot being made.
const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs every future on its own task (a `JoinSet`: dropping it, as on Ctrl-C, aborts them
/// all) and returns their outputs in the order given.
async fn futures_join<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for (i, f) in futs.enumerate() {
        set.spawn(async move { (i, f.await) });
    }
    let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(set.len()).collect();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, v)) => {
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some(v);
                }
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    out.into_iter().flatten().collect()
}

async fn cmd_doctor(json: bool, cfg: SbxConfig) -> i32 {
    let report = sbx::doctor::doctor(&cfg).await;
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("sbx: {e}"),
        }
    } else {
        print!("{}", report.render());
    }
    if report.ok { 0 } else { 1 }
}

async fn cmd_setup(cfg: SbxConfig) -> i32 {
    match sbx::setup::setup(&cfg).await {
        Ok(lines) => {
            for l in lines {
                println!("sbx setup: {l}");
            }
            0
        }
        Err(e) => {
            eprintln!("sbx setup: {e}");
            1
        }
    }
}

fn cmd_cache(cmd: CacheCmd) -> i32 {
    let root = package_layers::default_root();
    let store = match package_layers::FsPackageLayers::open(
        package_layers::LayerConfig::new(&root),
        Vec::new(),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sbx cache: {e}");
            return EXIT_SANDBOX;
        }
    };
    match cmd {
        CacheCmd::Ls => {
            let entries = store.list();
            let total: u64 = entries.iter().map(|e| e.manifest.image_bytes).sum();
            for e in &entries {
                let age = e.last_used.elapsed().map(|d| d.as_secs()).unwrap_or(0);
                println!(
                    "{}  {:<10}  {:>8.1} MB  used {:>6} s ago  {}",
                    &e.manifest.key[..16],
                    e.manifest.language.to_string(),
                    e.manifest.image_bytes as f64 / 1e6,
                    age,
                    e.manifest.specs.join(" ")
                );
            }
            println!(
                "{} layers, {:.1} MB in {}",
                entries.len(),
                total as f64 / 1e6,
                root.display()
            );
        }
        CacheCmd::Gc { max_mb } => {
            let removed = store.gc(max_mb.saturating_mul(1_000_000), None);
            println!("removed {} layers", removed.len());
        }
    }
    0
}

/// `sbx.1` and `sbx-<subcommand>.1` for every visible subcommand; how many were written.
fn write_man_pages(dir: &std::path::Path) -> std::io::Result<usize> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command();
    let mut n = 0;
    let mut write = |name: String, cmd: clap::Command| -> std::io::Result<()> {
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd.bin_name(name.replacen('-', " ", 1)))
            .title(name.to_uppercase())
            .render(&mut buf)?;
        std::fs::write(dir.join(format!("{name}.1")), buf)?;
        n += 1;
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("sbx-{}", sub.get_name());
        write(name, sub.clone())?;
    }
    write("sbx".to_owned(), cmd)?;
    Ok(n)
}

/// Ctrl-C or SIGTERM (what `kill`, systemd and container runtimes send): either way
/// `sbx run` destroys its VMs before it exits.
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn main() {
    let args = normalize_args(std::env::args().collect());
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let debug = matches!(&cli.cmd, Cmd::Run(a) if a.debug);
    // `sbx serve` logs one access line per request at info.
    let serving = matches!(&cli.cmd, Cmd::Serve(_));
    if let Err(e) = check_force_tcg() {
        std::process::exit(usage(e));
    }
    let cfg = cli.settings.config();
    let filter = cli.settings.log.clone().unwrap_or_else(|| {
        if debug {
            "debug".into()
        } else if serving {
            "info".into()
        } else {
            "error".into()
        }
    });
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sbx: cannot start the runtime: {e}");
            std::process::exit(EXIT_SANDBOX);
        }
    };
    let code = rt.block_on(async move {
        match cli.cmd {
            Cmd::Run(args) => cmd_run(*args, cfg).await,
            Cmd::Doctor { json } => cmd_doctor(json, cfg).await,
            Cmd::Setup => cmd_setup(cfg).await,
            Cmd::Cache(c) => cmd_cache(c),
            Cmd::Serve(args) => sbx::serve::cli::main_with(*args, cfg).await,
            Cmd::Session(args) => sbx::repl::main(*args, cfg).await,
            Cmd::Mcp => sbx::mcp::main(cfg).await,
            Cmd::Completions { shell } => {
                use clap::CommandFactory;
                clap_complete::generate(shell, &mut Cli::command(), "sbx", &mut std::io::stdout());
                0
            }
            Cmd::ManPages { dir } => match write_man_pages(&dir) {
                Ok(n) => {
                    eprintln!("sbx: wrote {n} man pages to {}", dir.display());
                    0
                }
                Err(e) => {
                    eprintln!("sbx: writing man pages to {}: {e}", dir.display());
                    EXIT_SANDBOX
                }
            },
            Cmd::Openapi => {
                println!("{}", sbx::serve::openapi::document_json());
                0
            }
        }
    });
    drop(rt);
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn shorthand_inserts_run() {
        assert_eq!(normalize_args(v(&["sbx", "print(1)"]))[1], "run");
        assert_eq!(normalize_args(v(&["sbx", "-l", "raw", "echo"]))[1], "run");
        assert_eq!(normalize_args(v(&["sbx", "doctor"]))[1], "doctor");
        assert_eq!(normalize_args(v(&["sbx", "serve"]))[1], "serve");
        assert_eq!(normalize_args(v(&["sbx", "--help"]))[1], "--help");
        assert_eq!(normalize_args(v(&["sbx"])).len(), 1);
        assert_eq!(
            normalize_args(v(&["sbx", "--max-vms", "2", "doctor"])),
            v(&["sbx", "--max-vms", "2", "doctor"])
        );
        assert_eq!(
            normalize_args(v(&["sbx", "--log=info", "--snapshots", "off", "print(1)"])),
            v(&["sbx", "--log=info", "--snapshots", "off", "run", "print(1)"])
        );
    }

    #[test]
    fn settings_are_flags_and_variables_and_validated() {
        let parse = |args: &[&str]| Cli::try_parse_from(normalize_args(v(args)));
        let cli = parse(&["sbx", "--max-vms", "3", "--warm-pool", "1", "doctor"]).unwrap();
        let cfg = cli.settings.config();
        assert_eq!((cfg.max_vms, cfg.warm_pool_size), (3, 1));
        assert_eq!(cfg.scheduler.warm_pool_size, 1);
        let cli = parse(&["sbx", "run", "--snapshots", "off", "--work-dir", "/w", "1"]).unwrap();
        let cfg = cli.settings.config();
        assert!(cfg.snapshot_dir.is_none());
        assert_eq!(cfg.work_dir, std::path::Path::new("/w"));
        let cli = parse(&["sbx", "--snapshot-dir", "/s", "doctor"]).unwrap();
        assert_eq!(
            cli.settings.config().snapshot_dir.as_deref(),
            Some(std::path::Path::new("/s"))
        );
        for bad in [
            &["sbx", "--max-vms", "0", "doctor"][..],
            &["sbx", "--max-vms", "lots", "doctor"],
            &["sbx", "--warm-pool", "-1", "doctor"],
            &["sbx", "--snapshots", "maybe", "doctor"],
            &["sbx", "--log", "sbx=[", "doctor"],
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.use_stderr(), "{bad:?}");
        }
    }

    #[test]
    fn env_parsing_splits_on_first_equals() {
        let e = parse_env(&v(&["A=1", "B=x=y", "C="])).unwrap();
        assert_eq!(e[1], ("B".into(), "x=y".into()));
        assert_eq!(e[2], ("C".into(), String::new()));
        assert!(parse_env(&v(&["=1"])).is_err());
        assert!(parse_env(&v(&["NOEQ"])).is_err());
    }

    #[test]
    fn exit_status_mapping() {
        let mut r = ExecutionResult {
            exit_code: 3,
            ..Default::default()
        };
        assert_eq!(exit_status_of(&r), 3);
        r.exit_code = -1;
        assert_eq!(exit_status_of(&r), 124);
        assert_eq!(error_status(&Error::input("x", "y")), 2);
        assert_eq!(
            error_status(&Error::permanent(
                sandbox_core::PermanentCause::MissingDependency,
                "x"
            )),
            125
        );
    }
}
