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
use std::sync::atomic::{AtomicU64, Ordering};
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
/// How long one REPL may take to reseed after a resume before it is replaced.
const RESEED_TIMEOUT: Duration = Duration::from_secs(20);

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
    /// Bumped by every `Resume` once the kernel part is done. A REPL whose
    /// [`seed_epoch`](Repl::seed_epoch) is older reseeds before it runs code again.
    resume_epoch: AtomicU64,
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
            resume_epoch: AtomicU64::new(0),
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
        let repl = match self.seeded_repl(&mut guard, req.language).await {
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
                    reseed: false,
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
                Ok(mut repl) => {
                    // Started after the last resume's kernel reseed (or before any): its
                    // generators are seeded from the current kernel state.
                    repl.set_seed_epoch(self.resume_epoch.load(Ordering::Acquire));
                    *slot = Some(repl);
                }
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

    /// [`ready_repl`](Self::ready_repl), reseeded first when a `Resume` came since its
    /// generators were seeded (replaced by a fresh process when that fails).
    async fn seeded_repl<'a>(
        &self,
        slot: &'a mut Option<Repl>,
        language: Language,
    ) -> Result<&'a mut Repl, GuestMessage> {
        let epoch = self.resume_epoch.load(Ordering::Acquire);
        let stale = self.ready_repl(slot, language)?.seed_epoch() < epoch;
        if stale {
            self.reseed_slot(slot, language, epoch).await;
        }
        self.ready_repl(slot, language)
    }

    /// Reseeds the live REPL in `slot` for `epoch` (or, for node with
    /// [`restart_node_on_resume`](AgentConfig::restart_node_on_resume) unless the resume
    /// set the clock back past its start, replaces it with a fresh, warmed-up process). True when the slot holds a reseeded, ready REPL
    /// afterwards; on failure the REPL is killed and the slot emptied, so the next exec
    /// starts a fresh one. An empty or dead slot is left empty (false).
    async fn reseed_slot(&self, slot: &mut Option<Repl>, language: Language, epoch: u64) -> bool {
        let Some(repl) = slot.as_mut() else {
            return false;
        };
        if !repl.is_alive() {
            *slot = None;
            return false;
        }
        if repl.seed_epoch() >= epoch {
            return false;
        }
        let started = Instant::now();
        let deadline = started + RESEED_TIMEOUT;
        // Node's OpenSSL 3 reseeds its DRBGs by itself once the clock reads earlier than
        // their seeding; Bun's BoringSSL has no such rule, so Bun always restarts.
        let reseeds_itself = self.cfg.js_runtime() == crate::config::JsRuntime::Node
            && repl.clock_went_back_past_start();
        if language == Language::Javascript && self.cfg.restart_node_on_resume && !reseeds_itself {
            if let Some(old) = slot.take() {
                old.kill();
            }
            let fresh = match self.ready_repl(slot, language) {
                Ok(repl) => repl,
                Err(_) => return false,
            };
            let outcome = noop(fresh, deadline, self.cfg.grace).await;
            let ok = !outcome.repl_dead && outcome.status == Some(0);
            debug!(%language, ok, ms = started.elapsed().as_millis() as u64, "REPL restarted after resume");
            if !ok && let Some(repl) = slot.take() {
                repl.kill();
            }
            return ok;
        }
        let ok = match repl.reseed(deadline, self.cfg.grace).await {
            Ok(outcome) => !outcome.repl_dead && outcome.status == Some(0),
            Err(err) => {
                warn!(%language, %err, "cannot reseed the REPL");
                false
            }
        };
        debug!(%language, ok, ms = started.elapsed().as_millis() as u64, "REPL reseeded after resume");
        if ok {
            repl.set_seed_epoch(epoch);
        } else if let Some(repl) = slot.take() {
            warn!(%language, "REPL did not reseed; replacing it");
            repl.kill();
        }
        ok
    }

    /// Handles `Resume` after a snapshot restore: as PID 1 sets the wall clock, credits
    /// the host's bytes to the kernel pool and reseeds the CRNG (an `Error` if any of that
    /// fails); then makes every live REPL reseed its generators. A REPL busy with an exec
    /// is not waited for: it reseeds before its next one. Answers `Resumed`.
    pub async fn resume(&self, unix_time_ns: u64, entropy: &[u8]) -> GuestMessage {
        if let Err(err) = limits::validate_resume_entropy(entropy) {
            return error(GuestErrorKind::Request, err);
        }
        if self.cfg.pid1 {
            if let Err(err) = hardening::resume_kernel(unix_time_ns, entropy) {
                warn!(%err, "resume: kernel part failed");
                return error(GuestErrorKind::Io, format!("resume failed: {err}"));
            }
        } else {
            warn!(
                "resume: not PID 1, so the wall clock and the kernel RNG are left alone; \
                 only the REPLs reseed"
            );
        }
        // After the kernel reseed: whoever sees the new epoch reads fresh kernel bytes.
        let epoch = self.resume_epoch.fetch_add(1, Ordering::AcqRel) + 1;
        let languages = [Language::Python, Language::Javascript, Language::Raw];
        let results = futures::future::join_all(languages.map(|language| async move {
            match self.repls[slot(language)].try_lock() {
                Ok(mut guard) => self.reseed_slot(&mut guard, language, epoch).await,
                // An exec is running: its REPL reseeds before the next exec.
                Err(_) => false,
            }
        }))
        .await;
        let reseeded = results.iter().filter(|ok| **ok).count();
        GuestMessage::Resumed {
            reseeded: u32::try_from(reseeded).unwrap_or(u32::MAX),
            crng_reseeds: hardening::crng_reseeds(),
        }
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
        let mut guard = self.repls[slot(language)].lock().await;
        let repl = match self.seeded_repl(&mut guard, language).await {
            Ok(repl) => repl,
            Err(msg) => return msg,
        };
        let outcome = run_noop(
            repl,
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

    /// Records `at` as the wall-clock start of the live REPL for `language` (tests: the
    /// agent outside a VM cannot move the clock back past a REPL's start). False when
    /// there is no live REPL.
    #[doc(hidden)]
    pub async fn set_repl_started_wall(
        &self,
        language: Language,
        at: std::time::SystemTime,
    ) -> bool {
        let mut guard = self.repls[slot(language)].lock().await;
        match guard.as_mut() {
            Some(repl) => {
                repl.set_started_wall(at);
                true
            }
            None => false,
        }
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

/// Runs a no-op through `repl` (warm-up, or a check that a fresh REPL is ready).
async fn run_noop(
    repl: &mut Repl,
    deadline: Instant,
    grace: Duration,
    cancel: &CancellationToken,
) -> crate::repl::RunOutcome {
    let code = match repl.language() {
        Language::Python => "pass",
        Language::Javascript => "undefined",
        Language::Raw => ":",
    };
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let sink = Outbox::detached(tx);
    repl.run(
        &ReplRequest {
            code,
            env: &[],
            reseed: false,
        },
        &sink,
        deadline,
        grace,
        cancel,
    )
    .await
}

async fn noop(repl: &mut Repl, deadline: Instant, grace: Duration) -> crate::repl::RunOutcome {
    run_noop(repl, deadline, grace, &CancellationToken::new()).await
}

/// A temporary script removed when dropped.
struct TempScript(PathBuf);

impl Drop for TempScript {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
