//! Package installation into a user-writable prefix (pip `--target`, npm `--prefix`).
//!
//! Package specifications are checked before anything runs: 1 to 50 of them, each at most
//! 214 characters, no `..`, `\`, NUL, control characters or whitespace, a name made of
//! `[A-Za-z0-9._-]` (plus pip extras `[a,b]`; npm may use one `@scope/`), and a version
//! operator (`==`, `>=`, `~=`... for pip; `name@version` for npm) with no `/` in the version.
//! The package manager runs as the REPL user with the same sandbox, its process tree is
//! killed on timeout, and its output is capped.

use std::process::{Command, Stdio};
use std::time::Duration;

use guest_proto::{GuestErrorKind, GuestMessage, Language};
use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, JsRuntime};
use crate::engine::error;
use crate::process::{self, Sandbox};
use crate::repl::base_env;

/// Most package specifications per request.
pub const MAX_PACKAGES: usize = 50;
/// Longest package specification.
pub const MAX_SPEC_CHARS: usize = 214;
/// Output kept per stream.
pub const MAX_OUTPUT_BYTES: usize = 50_000;
/// Longest install (seconds) when the request gives 0.
pub const DEFAULT_TIMEOUT_SECS: u32 = 300;

const PIP_OPERATORS: [&str; 8] = ["===", "==", "~=", "!=", ">=", "<=", ">", "<"];

fn valid_name_chars(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
}

/// Checks one package specification for `language`; returns why it is refused.
pub fn validate_spec(language: Language, spec: &str) -> Result<(), String> {
    let shown: String = spec.chars().take(64).collect();
    if spec.is_empty() || spec.chars().count() > MAX_SPEC_CHARS {
        return Err(format!(
            "package {shown:?} must be 1 to {MAX_SPEC_CHARS} characters"
        ));
    }
    if spec.contains("..")
        || spec.contains('\\')
        || spec
            .chars()
            .any(|c| c == '\0' || c.is_control() || c.is_whitespace())
    {
        return Err(format!(
            "package {shown:?} contains '..', '\\', whitespace, NUL or a control character"
        ));
    }
    match language {
        Language::Python => {
            let Some((pos, op)) = PIP_OPERATORS
                .iter()
                .filter_map(|op| spec.find(op).map(|pos| (pos, *op)))
                .min_by_key(|(pos, op)| (*pos, usize::MAX - op.len()))
            else {
                return Err(format!(
                    "package {shown:?} needs a version operator (e.g. name==1.0)"
                ));
            };
            let (name, version) = (&spec[..pos], &spec[pos + op.len()..]);
            let base = match name.split_once('[') {
                Some((base, extras)) => {
                    let ok = extras
                        .strip_suffix(']')
                        .is_some_and(|e| e.split(',').all(valid_name_chars));
                    if !ok {
                        return Err(format!("package {shown:?} has malformed extras"));
                    }
                    base
                }
                None => name,
            };
            if !valid_name_chars(base) {
                return Err(format!("package {shown:?} has an invalid name"));
            }
            if version.is_empty() || version.contains('/') {
                return Err(format!("package {shown:?} has an invalid version"));
            }
            Ok(())
        }
        Language::Javascript => {
            let (scope, rest) = match spec.strip_prefix('@') {
                Some(rest) => match rest.split_once('/') {
                    Some((scope, rest)) => (Some(scope), rest),
                    None => return Err(format!("package {shown:?} has an invalid scope")),
                },
                None => (None, spec),
            };
            if scope.is_some_and(|s| !valid_name_chars(s)) {
                return Err(format!("package {shown:?} has an invalid scope"));
            }
            let Some((name, version)) = rest.split_once('@') else {
                return Err(format!(
                    "package {shown:?} needs a version (e.g. name@1.0.0)"
                ));
            };
            if !valid_name_chars(name) {
                return Err(format!("package {shown:?} has an invalid name"));
            }
            if version.is_empty() || version.contains('/') || version.contains('@') {
                return Err(format!("package {shown:?} has an invalid version"));
            }
            Ok(())
        }
        Language::Raw => Err("raw has no package manager".into()),
    }
}

/// Checks a whole request.
pub fn validate(language: Language, packages: &[String]) -> Result<(), String> {
    if language == Language::Raw {
        return Err("package installation is not available for raw code".into());
    }
    if packages.is_empty() || packages.len() > MAX_PACKAGES {
        return Err(format!("give 1 to {MAX_PACKAGES} packages"));
    }
    packages
        .iter()
        .try_for_each(|spec| validate_spec(language, spec))
}

fn command(cfg: &AgentConfig, language: Language, packages: &[String]) -> Command {
    let mut cmd = match language {
        Language::Python => {
            let mut cmd = Command::new(&cfg.python);
            cmd.args([
                "-m",
                "pip",
                "install",
                "--no-input",
                "--disable-pip-version-check",
            ])
            .args([
                "--no-color",
                "--progress-bar",
                "off",
                "--upgrade",
                "--target",
            ])
            .arg(cfg.python_packages_dir());
            cmd
        }
        _ if cfg.js_runtime() == JsRuntime::Bun => {
            // `bun add` takes no `--`; every spec was checked to start with a letter, a
            // digit or `@` (validate_spec), so none reads as an option.
            let mut cmd = Command::new(&cfg.node);
            cmd.args(["add", "--no-save", "--no-progress", "--cwd"])
                .arg(cfg.node_prefix())
                .args(packages);
            return cmd;
        }
        _ => {
            let mut cmd = Command::new("npm");
            cmd.args([
                "install",
                "--no-audit",
                "--no-fund",
                "--no-save",
                "--prefix",
            ])
            .arg(cfg.node_prefix());
            cmd
        }
    };
    cmd.arg("--").args(packages);
    cmd
}

async fn read_capped(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(mut pipe) = pipe else {
        return kept;
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = MAX_OUTPUT_BYTES.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

fn to_async(fd: impl Into<std::os::fd::OwnedFd>) -> Option<tokio::net::unix::pipe::Receiver> {
    let fd: std::os::fd::OwnedFd = fd.into();
    tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok()
}

/// Installs `packages` for `language`; answers `PackagesInstalled` or `Error`.
pub async fn install(
    cfg: &AgentConfig,
    language: Language,
    packages: &[String],
    timeout_secs: u32,
    cancel: CancellationToken,
) -> GuestMessage {
    if let Err(msg) = validate(language, packages) {
        return error(GuestErrorKind::Package, msg);
    }
    let timeout_secs = match timeout_secs {
        0 => DEFAULT_TIMEOUT_SECS,
        n => n.min(DEFAULT_TIMEOUT_SECS),
    };
    let mut cmd = command(cfg, language, packages);
    cmd.env_clear()
        .envs(base_env(cfg))
        .current_dir(&cfg.root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Sandbox {
        user: cfg.user,
        nproc: Some(cfg.nproc),
        fds: Vec::new(),
    }
    .apply(&mut cmd);
    let mut spawned = match process::spawn(&mut cmd) {
        Ok(s) => s,
        Err(err) => {
            return error(
                GuestErrorKind::Package,
                format!("cannot start installer: {err}"),
            );
        }
    };
    let pid = spawned.child.id() as i32;
    let out = tokio::spawn(read_capped(spawned.child.stdout.take().and_then(to_async)));
    let err = tokio::spawn(read_capped(spawned.child.stderr.take().and_then(to_async)));
    let waited = tokio::select! {
        r = &mut spawned.exit => Some(r),
        () = tokio::time::sleep(Duration::from_secs(u64::from(timeout_secs))) => None,
        () = cancel.cancelled() => None,
    };
    let Some(status) = waited else {
        process::signal_tree(pid, Signal::SIGKILL);
        out.abort();
        err.abort();
        return error(
            GuestErrorKind::Timeout,
            format!("package installation did not finish within {timeout_secs}s"),
        );
    };
    process::signal_tree(pid, Signal::SIGKILL);
    let stdout = out.await.unwrap_or_default();
    let stderr = err.await.unwrap_or_default();
    let mut output = String::from_utf8_lossy(&stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&stderr));
    match status {
        Ok(kind) if kind.code() == 0 => {
            nix::unistd::sync();
            GuestMessage::PackagesInstalled { output }
        }
        Ok(kind) => error(
            GuestErrorKind::Package,
            format!("installer exited with {}: {output}", kind.code()),
        ),
        Err(_) => error(GuestErrorKind::Package, "installer status lost"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pip_specs() {
        for ok in [
            "requests==2.31.0",
            "numpy>=1.0",
            "a_b.c-d~=1.2",
            "pkg[extra,two]==1",
            "x<2",
        ] {
            assert_eq!(validate_spec(Language::Python, ok), Ok(()), "{ok}");
        }
        for bad in [
            "requests",
            "../x==1",
            "a/b==1",
            "a\\b==1",
            "a==1/2",
            "a\0==1",
            "a\n==1",
            "==1",
            "-e==1",
            "a b==1",
            "a==",
            "pkg[ex==1",
        ] {
            assert!(validate_spec(Language::Python, bad).is_err(), "{bad:?}");
        }
        assert!(validate_spec(Language::Python, &format!("{}==1", "a".repeat(212))).is_err());
        assert!(validate_spec(Language::Python, &format!("{}==1", "a".repeat(211))).is_ok());
    }

    #[test]
    fn npm_specs() {
        for ok in ["lodash@4.17.21", "@types/node@20.0.0", "left-pad@^1.3.0"] {
            assert_eq!(validate_spec(Language::Javascript, ok), Ok(()), "{ok}");
        }
        for bad in [
            "lodash",
            "a/b@1",
            "@scope@1",
            "x@1/2",
            "x@",
            "../x@1",
            "x@git+ssh://a",
        ] {
            assert!(validate_spec(Language::Javascript, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn request_rules() {
        assert!(validate(Language::Raw, &["a==1".into()]).is_err());
        assert!(validate(Language::Python, &[]).is_err());
        let many: Vec<String> = (0..51).map(|i| format!("p{i}==1")).collect();
        assert!(validate(Language::Python, &many).is_err());
    }
}
