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
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sbx serve: cannot listen on {}: {e}", args.listen);
            return EXIT_SANDBOX;
        }
    };
    let mut sbx_cfg = SbxConfig::from_env();
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
}
