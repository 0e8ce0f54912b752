//! Request handlers: exec, warm-up, files and packages.
//!
//! An [`Engine`] owns one lazily started [`Repl`] per language. Executions for one
//! language run one at a time (later ones wait); different languages and file operations
//! run concurrently.
//!
//! Environment variables given with an exec are set for that execution only: the REPL
//! restores the previous values afterwards (unless the code changed the variable itself).
//! State the code creates (variables, imports, `export`s, the cwd) persists.

use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use guest_proto::limits::{self, MAX_TIMEOUT_SECS};
use guest_proto::{ExecRequest, GuestErrorKind, GuestMessage, Language};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::AgentConfig;
use crate::hardening;
use crate::repl::{Interrupt, Repl, ReplRequest, shell_quote};
use crate::server::Outbox;

/// How long a warm-up may take to get a REPL ready.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(120);

/// Builds a terminal `Error` message.
pub fn error(kind: GuestErrorKind, message: impl Into<String>) -> GuestMessage {
    GuestMessage::Error {
        kind,
        message: message.into(),
    }
}

/// The agent's request handlers. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Engine {
    cfg: AgentConfig,
    repls: [Mutex<Option<Repl>>; 3],
}

fn slot(language: Language) -> usize {
    match language {
        Language::Python => 0,
        Language::Javascript => 1,
        Language::Raw => 2,
    }
}

impl Engine {
    /// Creates an engine. Prepares the root directory (and, when running as root with a
    /// user configured, hands it to that user).
    pub fn new(cfg: AgentConfig) -> io::Result<Engine> {
        std::fs::create_dir_all(&cfg.root)?;
        let pkg = cfg.python_packages_dir();
        for dir in [pkg.as_path(), cfg.root.join(".local/bin").as_path()] {
            if let Err(err) = crate::files::create_dirs_owned(&cfg.root, dir, cfg.user) {
                debug!(dir = %dir.display(), %err, "could not prepare directory");
            }
        }
        if let Some(user) = cfg.user
            && nix::unistd::geteuid().is_root()
        {
            crate::files::chown(&cfg.root, Some(user))?;
        }
        Ok(Engine {
            cfg,
            repls: [Mutex::new(None), Mutex::new(None), Mutex::new(None)],
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// Runs code: streams `Stdout`/`Stderr` to `out` and returns the terminal message
    /// (`ExecDone`, or `Error` for refused input, output over the caps, or an interpreter
    /// that cannot start).
    pub async fn exec(
        &self,
        req: ExecRequest,
        out: &Outbox,
        cancel: CancellationToken,
    ) -> GuestMessage {
        let started = Instant::now();
        let code = match limits::validate_code(&req.code) {
            Ok(code) => code,
            Err(err) => return error(GuestErrorKind::Code, err.to_string()),
        };
        if req.timeout_secs > MAX_TIMEOUT_SECS {
            return error(
                GuestErrorKind::Code,
                format!(
                    "timeout of {}s is over the {MAX_TIMEOUT_SECS}s limit",
                    req.timeout_secs
                ),
            );
        }
        let timeout_secs = if req.timeout_secs == 0 {
            MAX_TIMEOUT_SECS
        } else {
            req.timeout_secs
        };
        if let Err(err) = limits::validate_env_for(
            req.language,
            req.env.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        ) {
            return error(GuestErrorKind::EnvVar, err.to_string());
        }

        // Raw code with a shebang runs through its interpreter from a temporary file.
        let mut script = None;
        let shebang_cmd;
        let code = if req.language == Language::Raw && code.starts_with("#!") {
            match self.write_script(code) {
                Ok(path) => {
                    shebang_cmd = shell_quote(&path.display().to_string());
                    script = Some(TempScript(path));
                    shebang_cmd.as_str()
                }
                Err(err) => {
                    return error(GuestErrorKind::Io, format!("cannot write script: {err}"));
                }
            }
        } else {
            code
        };

        let mut guard = self.repls[slot(req.language)].lock().await;
        let spawn_started = Instant::now();
        let repl = match self.ready_repl(&mut guard, req.language) {
            Ok(repl) => repl,
            Err(msg) => return msg,
        };
        let spawn_ms = spawn_started.elapsed().as_millis() as u64;
        if self.cfg.reseed_crng {
            hardening::reseed_crng();
        }
        let run_started = Instant::now();
        let deadline = run_started + Duration::from_secs(u64::from(timeout_secs));
        let outcome = repl
            .run(
                &ReplRequest {
                    code,
                    env: &req.env,
                },
                out,
                deadline,
                self.cfg.grace,
                &cancel,
            )
            .await;
        let execution_ms = run_started.elapsed().as_millis() as u64;
        if outcome.repl_dead
            && let Some(repl) = guard.take()
        {
            repl.kill();
        }
        drop(guard);
        drop(script);
        debug!(
            language = %req.language,
            ?outcome,
            total_ms = started.elapsed().as_millis() as u64,
            "exec finished"
        );

        let exit_code = match (outcome.interrupted, outcome.status) {
            (_, Some(code)) => code,
            (Some(Interrupt::Timeout), None) => {
                out.send(GuestMessage::Stderr(Bytes::from(format!(
                    "\nExecution timeout after {timeout_secs}s\n"
                ))))
                .await;
                -1
            }
            (Some(Interrupt::Cancel), None) => {
                out.send(GuestMessage::Stderr(Bytes::from_static(
                    b"\nExecution cancelled\n",
                )))
                .await;
                -1
            }
            (None, None) => -1,
        };
        if outcome.stdout_over || outcome.stderr_over {
            let which = if outcome.stdout_over {
                format!("stdout exceeded {} bytes", limits::MAX_STDOUT_BYTES)
            } else {
                format!("stderr exceeded {} bytes", limits::MAX_STDERR_BYTES)
            };
            return error(GuestErrorKind::OutputLimit, which);
        }
        GuestMessage::ExecDone {
            exit_code,
            execution_ms,
            spawn_ms: Some(spawn_ms),
        }
    }

    fn ready_repl<'a>(
        &self,
        slot: &'a mut Option<Repl>,
        language: Language,
    ) -> Result<&'a mut Repl, GuestMessage> {
        if let Some(repl) = slot.as_mut()
            && !repl.is_alive()
        {
            *slot = None;
        }
        if slot.is_none() {
            match Repl::spawn(language, &self.cfg) {
                Ok(repl) => *slot = Some(repl),
                Err(err) => {
                    warn!(%language, %err, "cannot start interpreter");
                    return Err(error(
                        GuestErrorKind::Execution,
                        format!("cannot start the {language} interpreter: {err}"),
                    ));
                }
            }
        }
        slot.as_mut()
            .ok_or_else(|| error(GuestErrorKind::Execution, "interpreter missing"))
    }

    fn write_script(&self, code: &str) -> io::Result<PathBuf> {
        use std::io::Write;
        let path = self
            .cfg
            .temp_dir
            .join(format!("sbx-exec-{}", crate::process::random_hex()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o700)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        file.write_all(code.as_bytes())?;
        file.set_permissions(std::fs::Permissions::from_mode(0o700))?;
        drop(file);
        if nix::unistd::geteuid().is_root() {
            crate::files::chown(&path, self.cfg.user)?;
        }
        Ok(path)
    }

    /// Starts (or checks) the REPL of `language` and runs a no-op through it, so the next
    /// exec finds it ready. Answers `WarmUpDone` or `Error`.
    pub async fn warm_up(&self, language: Language, cancel: CancellationToken) -> GuestMessage {
        let noop = match language {
            Language::Python => "pass",
            Language::Javascript => "undefined",
            Language::Raw => ":",
        };
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let sink = Outbox::detached(tx);
        let mut guard = self.repls[slot(language)].lock().await;
        let repl = match self.ready_repl(&mut guard, language) {
            Ok(repl) => repl,
            Err(msg) => return msg,
        };
        let outcome = repl
            .run(
                &ReplRequest {
                    code: noop,
                    env: &[],
                },
                &sink,
                Instant::now() + WARM_UP_TIMEOUT,
                self.cfg.grace,
                &cancel,
            )
            .await;
        if outcome.repl_dead || outcome.status != Some(0) {
            if let Some(repl) = guard.take() {
                repl.kill();
            }
            return error(
                GuestErrorKind::Execution,
                format!("the {language} interpreter did not become ready: {outcome:?}"),
            );
        }
        GuestMessage::WarmUpDone { language }
    }

    /// Pid of the running REPL of `language`, if any (for tests and diagnostics).
    pub async fn repl_pid(&self, language: Language) -> Option<i32> {
        let mut guard = self.repls[slot(language)].lock().await;
        let repl = guard.as_mut()?;
        repl.is_alive().then(|| repl.pid())
    }

    /// Kills every REPL (used before power-off).
    pub async fn shutdown(&self) {
        for slot in &self.repls {
            if let Some(repl) = slot.lock().await.take() {
                repl.kill();
            }
        }
    }
}

/// A temporary script removed when dropped.
struct TempScript(PathBuf);

impl Drop for TempScript {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
