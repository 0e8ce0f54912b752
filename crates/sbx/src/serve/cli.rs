//! The `sbx serve` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tracing::info;

use super::{AppState, Auth, DoctorFn, ServeConfig, serve};
use crate::{Sbx, SbxConfig};

const EXIT_USAGE: i32 = 2;
const EXIT_SANDBOX: i32 = 125;

/// Arguments of `sbx serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// File with the accepted bearer tokens, one per line (default: a generated token,
    /// printed once on stderr).
    #[arg(long, conflicts_with = "no_auth")]
    pub token_file: Option<PathBuf>,
    /// No authentication (only allowed on a loopback address).
    #[arg(long)]
    pub no_auth: bool,
    /// Most live sessions in total.
    #[arg(long, default_value_t = 32)]
    pub max_sessions: usize,
    /// Most live sessions per token (default: --max-sessions).
    #[arg(long)]
    pub max_sessions_per_token: Option<usize>,
    /// Most `run` requests of one token in flight at once (beyond: 429 `too_many_runs`).
    #[arg(long, default_value_t = 16)]
    pub max_runs_per_token: usize,
    /// Largest JSON request body, in MB.
    #[arg(long, default_value_t = 8)]
    pub max_body_mb: u64,
    /// Largest uploaded file, in MB (at most 500).
    #[arg(long, default_value_t = 500)]
    pub max_file_mb: u64,
    /// Seconds in-flight requests may finish after SIGTERM/SIGINT before they are cancelled.
    #[arg(long, default_value_t = 10)]
    pub shutdown_grace_secs: u64,
    /// Package allowlist file (names only; default: SBX_PACKAGE_ALLOWLIST, else the shipped
    /// list).
    #[arg(long, value_name = "FILE", conflicts_with = "no_package_allowlist")]
    pub package_allowlist: Option<PathBuf>,
    /// Allow any package (turns the allowlist off).
    #[arg(long)]
    pub no_package_allowlist: bool,
    /// Once the API answers, write one JSON line to this inherited file descriptor and
    /// close it: `{"ready":true,"url":"http://127.0.0.1:PORT","pid":N,"version":"…"}`
    /// (for launchers; with `--listen 127.0.0.1:0` the URL names the port chosen).
    #[arg(long, value_name = "FD", value_parser = clap::value_parser!(i32).range(1..))]
    pub ready_fd: Option<i32>,
}

/// The line `--ready-fd` writes once the server accepts requests.
pub fn ready_line(addr: SocketAddr) -> String {
    let v = serde_json::json!({
        "ready": true,
        "url": format!("http://{addr}"),
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    format!("{v}\n")
}

/// Opens the inherited descriptor `fd` for writing (through `/proc/self/fd`, so no unsafe
/// code takes ownership of a raw descriptor).
fn open_ready_fd(fd: i32) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{fd}"))
        .map_err(|e| format!("--ready-fd {fd}: not an open, writable descriptor ({e})"))
}

/// Writes the ready line to `fd` and closes it (the launcher reading the other end sees
/// the line, then the end of the stream).
fn signal_ready(fd: i32, file: std::fs::File, addr: SocketAddr) -> Result<(), String> {
    use std::io::Write;
    let mut file = file;
    file.write_all(ready_line(addr).as_bytes())
        .and_then(|()| file.flush())
        .map_err(|e| format!("--ready-fd {fd}: {e}"))?;
    drop(file);
    // Standard output and error stay open; any other descriptor is the launcher's pipe,
    // closed so that it is not inherited by QEMU processes.
    if fd > 2 {
        let _ = nix::unistd::close(fd);
    }
    Ok(())
}

impl ServeArgs {
    /// The server settings these arguments ask for, or a usage error.
    pub fn config(&self) -> Result<ServeConfig, String> {
        if self.max_sessions == 0 {
            return Err("--max-sessions must be at least 1".into());
        }
        if self.max_runs_per_token == 0 {
            return Err("--max-runs-per-token must be at least 1".into());
        }
        if self.max_body_mb == 0 || self.max_file_mb == 0 {
            return Err("--max-body-mb and --max-file-mb must be at least 1".into());
        }
        let max_file = self.max_file_mb.saturating_mul(1 << 20);
        if max_file > guest_proto::limits::MAX_FILE_BYTES {
            return Err(format!(
                "--max-file-mb is above the guest's limit of {} MB",
                guest_proto::limits::MAX_FILE_BYTES >> 20
            ));
        }
        Ok(ServeConfig {
            max_sessions: self.max_sessions,
            max_sessions_per_token: self.max_sessions_per_token.unwrap_or(self.max_sessions),
            max_runs_per_token: self.max_runs_per_token,
            max_body_bytes: self.max_body_mb.saturating_mul(1 << 20),
            max_file_bytes: max_file,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            ..ServeConfig::default()
        })
    }

    /// The authentication these arguments ask for, and the generated token to print, or a
    /// usage error (`--no-auth` off loopback).
    pub fn auth(&self) -> Result<(Auth, Option<String>), String> {
        if self.no_auth {
            if !self.listen.ip().is_loopback() {
                return Err(format!(
                    "--no-auth is only allowed on a loopback address, not {}",
                    self.listen.ip()
                ));
            }
            return Ok((Auth::disabled(), None));
        }
        match &self.token_file {
            Some(p) => Ok((Auth::from_file(p)?, None)),
            None => {
                let (auth, token) = Auth::generate()?;
                Ok((auth, Some(token)))
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received"),
                _ = int.recv() => info!("SIGINT received"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs `sbx serve`; returns the exit status (0 after a clean shutdown, 2 on usage
/// errors, 125 when the sandbox or the listener cannot start).
pub async fn main(args: ServeArgs) -> i32 {
    main_with(args, SbxConfig::from_env()).await
}

/// [`main`] over the given sandbox configuration (the CLI's `SBX_*` settings and flags).
pub async fn main_with(args: ServeArgs, sbx_cfg: SbxConfig) -> i32 {
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sbx serve: {e}");
            return EXIT_USAGE;
        }
    };
    let (auth, generated) = match args.auth() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sbx serve: {e}");
            return EXIT_USAGE;
        }
    };
    let ready = match args.ready_fd.map(|fd| open_ready_fd(fd).map(|f| (fd, f))) {
        None => None,
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            eprintln!("sbx serve: {e}");
            return EXIT_USAGE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sbx serve: cannot listen on {}: {e}", args.listen);
            return EXIT_SANDBOX;
        }
    };
    let mut sbx_cfg = sbx_cfg;
    sbx_cfg.package_allowlist = crate::AllowlistSetting::from_flags(
        args.package_allowlist.clone(),
        args.no_package_allowlist,
    );
    if let Err(e) = sbx_cfg.package_allowlist.load() {
        eprintln!("sbx serve: package allowlist: {}", e.message());
        return EXIT_USAGE;
    }
    let sbx = match Sbx::start(sbx_cfg.clone()).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sbx serve: {e}");
            return EXIT_SANDBOX;
        }
    };
    let doctor: DoctorFn = Arc::new(move || {
        let cfg = sbx_cfg.clone();
        async move {
            let report = crate::doctor::doctor(&cfg).await;
            serde_json::to_value(&report).unwrap_or(serde_json::Value::Null)
        }
        .boxed()
    });
    let state = AppState::new(sbx.scheduler().clone(), config, auth, Some(doctor));
    let addr = listener.local_addr().unwrap_or(args.listen);
    if let Some(token) = generated {
        eprintln!("sbx serve: API token (shown only now): {token}");
    } else if args.no_auth {
        eprintln!("sbx serve: authentication is OFF (loopback only)");
    }
    eprintln!("sbx serve: listening on http://{addr} (API description: /v1/openapi.json)");
    // The listener is bound and the scheduler started: requests queue in the backlog
    // until `serve` accepts them, so the launcher may connect as soon as it reads this.
    if let Some((fd, file)) = ready
        && let Err(e) = signal_ready(fd, file, addr)
    {
        eprintln!("sbx serve: {e}");
        sbx.stop().await;
        return EXIT_SANDBOX;
    }
    let result = serve(listener, state, shutdown_signal()).await;
    sbx.stop().await;
    match result {
        Ok(()) => {
            eprintln!("sbx serve: stopped");
            0
        }
        Err(e) => {
            eprintln!("sbx serve: server error: {e}");
            EXIT_SANDBOX
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        a: ServeArgs,
    }

    fn parse(args: &[&str]) -> ServeArgs {
        T::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .unwrap()
            .a
    }

    #[test]
    fn no_auth_only_on_loopback() {
        let a = parse(&["--no-auth"]);
        assert!(!a.auth().unwrap().0.enabled());
        let a = parse(&["--no-auth", "--listen", "[::1]:9000"]);
        assert!(a.auth().is_ok());
        let a = parse(&["--no-auth", "--listen", "0.0.0.0:8080"]);
        assert!(a.auth().unwrap_err().contains("loopback"));
        let (auth, token) = parse(&[]).auth().unwrap();
        assert!(auth.enabled());
        assert!(token.is_some());
        assert!(
            T::try_parse_from(["t", "--no-auth", "--token-file", "/x"]).is_err(),
            "conflicting flags"
        );
    }

    #[test]
    fn limits_from_flags() {
        let c = parse(&["--max-sessions", "4", "--max-body-mb", "1"])
            .config()
            .unwrap();
        assert_eq!(c.max_sessions_per_token, 4);
        assert_eq!(c.max_body_bytes, 1 << 20);
        assert!(parse(&["--max-file-mb", "501"]).config().is_err());
        assert!(parse(&["--max-sessions", "0"]).config().is_err());
    }

    #[test]
    fn ready_fd_is_validated_and_the_line_is_json() {
        assert!(T::try_parse_from(["t", "--ready-fd", "0"]).is_err());
        assert!(T::try_parse_from(["t", "--ready-fd", "x"]).is_err());
        assert_eq!(parse(&["--ready-fd", "3"]).ready_fd, Some(3));
        assert!(open_ready_fd(987_654).unwrap_err().contains("987654"));
        let line = ready_line("127.0.0.1:4242".parse().unwrap());
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ready"], true);
        assert_eq!(v["url"], "http://127.0.0.1:4242");
        assert_eq!(v["pid"], std::process::id());
    }

    #[test]
    fn ready_line_goes_to_the_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready");
        let f = std::fs::File::create(&path).unwrap();
        // fd 1 is not closed; the file handle given is written and dropped.
        signal_ready(1, f, "127.0.0.1:1".parse().unwrap()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["url"], "http://127.0.0.1:1");
        assert_eq!(text.lines().count(), 1);
    }
}
