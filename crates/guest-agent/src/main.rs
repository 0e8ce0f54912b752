//! `guest-agent` (installed as `sbx-agent`): the sbx guest agent.
//!
//! As PID 1 inside the VM it sets the machine up and serves the virtio-serial port
//! `org.sbx.agent`. Elsewhere it runs in host mode for tests and development:
//!
//! ```text
//! guest-agent serve (--listen <socket> | --stdio | --virtio [name])
//!                   [--root <dir>] [--uid <n> --gid <n>] [--nproc <n>] [--grace-ms <n>]
//!                   [--python <path>] [--node <path>] [--bash <path>] [--temp-dir <dir>]
//! guest-agent --version
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use guest_agent::config::{AgentConfig, UserIds};
use guest_agent::{Engine, init, transport};

const USAGE: &str = "usage: guest-agent serve (--listen <socket> | --stdio | --virtio [name]) \
[--root <dir>] [--uid <n> --gid <n>] [--nproc <n>] [--grace-ms <n>] \
[--python <path>] [--node <path>] [--bash <path>] [--temp-dir <dir>]";

enum Listen {
    Unix(PathBuf),
    Stdio,
    Virtio(String),
}

fn main() -> ExitCode {
    let pid1 = init::is_pid1();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SBX_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if pid1 {
        let cfg = init::boot();
        let code = run(cfg, Listen::Virtio(transport::VIRTIO_PORT_NAME.into()));
        tracing::warn!(?code, "agent loop ended; powering off");
        init::power_off();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version" || a == "-V") {
        println!("guest-agent {}", guest_agent::AGENT_VERSION);
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    match parse(&args) {
        Ok((cfg, listen)) => run(cfg, listen),
        Err(msg) => {
            eprintln!("guest-agent: {msg}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn parse(args: &[String]) -> Result<(AgentConfig, Listen), String> {
    let mut it = args.iter();
    match it.next().map(String::as_str) {
        Some("serve") => {}
        _ => return Err("expected the `serve` command".into()),
    }
    let mut root = std::env::current_dir().map_err(|e| e.to_string())?;
    let mut listen = None;
    let mut uid = None;
    let mut gid = None;
    let mut nproc = None;
    let mut grace = None;
    let mut python = None;
    let mut node = None;
    let mut bash = None;
    let mut temp_dir = None;
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let number = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name} needs a number, got {v:?}"))
        };
        match arg.as_str() {
            "--listen" => listen = Some(Listen::Unix(value(arg)?.into())),
            "--stdio" => listen = Some(Listen::Stdio),
            "--virtio" => listen = Some(Listen::Virtio(transport::VIRTIO_PORT_NAME.into())),
            "--root" => root = value(arg)?.into(),
            "--uid" => uid = Some(number(arg, value(arg)?)? as u32),
            "--gid" => gid = Some(number(arg, value(arg)?)? as u32),
            "--nproc" => nproc = Some(number(arg, value(arg)?)?),
            "--grace-ms" => grace = Some(Duration::from_millis(number(arg, value(arg)?)?)),
            "--python" => python = Some(PathBuf::from(value(arg)?)),
            "--node" => node = Some(PathBuf::from(value(arg)?)),
            "--bash" => bash = Some(PathBuf::from(value(arg)?)),
            "--temp-dir" => temp_dir = Some(PathBuf::from(value(arg)?)),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let listen = listen.ok_or("give --listen <socket>, --stdio or --virtio")?;
    let mut cfg = AgentConfig::host(root);
    match (uid, gid) {
        (Some(uid), gid) => {
            cfg.user = Some(UserIds {
                uid,
                gid: gid.unwrap_or(uid),
            })
        }
        (None, Some(_)) => return Err("--gid needs --uid".into()),
        (None, None) => {}
    }
    if let Some(n) = nproc {
        cfg.nproc = n;
    }
    if let Some(g) = grace {
        cfg.grace = g;
    }
    if let Some(p) = python {
        cfg.python = p;
    }
    if let Some(p) = node {
        cfg.node = p;
    }
    if let Some(p) = bash {
        cfg.bash = p;
    }
    if let Some(p) = temp_dir {
        cfg.temp_dir = p;
    }
    Ok((cfg, listen))
}

fn run(cfg: AgentConfig, listen: Listen) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("guest-agent: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let engine = match Engine::new(cfg) {
            Ok(engine) => Arc::new(engine),
            Err(err) => {
                eprintln!("guest-agent: cannot prepare the root directory: {err}");
                return ExitCode::FAILURE;
            }
        };
        let result = match listen {
            Listen::Unix(path) => transport::serve_unix(engine, &path).await,
            Listen::Stdio => {
                transport::serve_stdio(engine).await;
                Ok(())
            }
            Listen::Virtio(name) => transport::serve_virtio(engine, &name).await,
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("guest-agent: {err}");
                ExitCode::FAILURE
            }
        }
    })
}
