//! Shared helpers for the guest agent's host-side tests.
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_agent::{AgentConfig, Engine, Outbox, UserIds};
use guest_proto::{ExecRequest, Frame, GuestMessage, Language, OpId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// An unprivileged uid to run user code as when the tests run as root.
pub fn test_user() -> Option<UserIds> {
    is_root().then_some(UserIds {
        uid: 65534,
        gid: 65534,
    })
}

pub struct Harness {
    pub engine: Arc<Engine>,
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub fn new() -> Self {
        Self::with(|_| {})
    }

    pub fn with(f: impl FnOnce(&mut AgentConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let mut cfg = AgentConfig::host(dir.path().join("home"));
        cfg.user = test_user();
        cfg.grace = Duration::from_millis(1000);
        f(&mut cfg);
        let engine = Arc::new(Engine::new(cfg).unwrap());
        Self { engine, dir }
    }

    pub fn root(&self) -> std::path::PathBuf {
        self.engine.config().root.clone()
    }

    pub async fn exec(&self, language: Language, code: &str) -> ExecResult {
        self.exec_full(language, code, 10, vec![], CancellationToken::new())
            .await
    }

    pub async fn exec_t(&self, language: Language, code: &str, timeout: u32) -> ExecResult {
        self.exec_full(language, code, timeout, vec![], CancellationToken::new())
            .await
    }

    pub async fn exec_full(
        &self,
        language: Language,
        code: &str,
        timeout_secs: u32,
        env: Vec<(String, String)>,
        cancel: CancellationToken,
    ) -> ExecResult {
        let (tx, mut rx) = mpsc::channel::<Frame<GuestMessage>>(1024);
        let started = Instant::now();
        let collector = tokio::spawn(async move {
            let mut events = Vec::new();
            while let Some(frame) = rx.recv().await {
                events.push((started.elapsed(), frame.msg));
            }
            events
        });
        let out = Outbox::new(OpId(1), tx);
        let req = ExecRequest {
            language,
            code: code.to_owned(),
            timeout_secs,
            env,
        };
        let terminal = self.engine.exec(req, &out, cancel).await;
        let done_at = started.elapsed();
        drop(out);
        let events = collector.await.unwrap();
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        for (_, msg) in &events {
            match msg {
                GuestMessage::Stdout(b) => stdout.extend_from_slice(b),
                GuestMessage::Stderr(b) => stderr.extend_from_slice(b),
                _ => {}
            }
        }
        ExecResult {
            stdout,
            stderr,
            terminal,
            events,
            done_at,
        }
    }
}

#[derive(Debug)]
pub struct ExecResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub terminal: GuestMessage,
    pub events: Vec<(Duration, GuestMessage)>,
    pub done_at: Duration,
}

impl ExecResult {
    pub fn code(&self) -> i32 {
        match &self.terminal {
            GuestMessage::ExecDone { exit_code, .. } => *exit_code,
            other => panic!("expected ExecDone, got {other:?}; stderr: {}", self.err()),
        }
    }

    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Asserts exit code 0 and returns stdout.
    pub fn ok(&self) -> String {
        assert_eq!(self.code(), 0, "stderr: {}", self.err());
        self.out()
    }
}

/// True when a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let rest = &stat[stat.rfind(')').unwrap() + 1..];
            !rest.trim_start().starts_with('Z')
        }
        Err(_) => false,
    }
}

/// Waits up to `limit` for `pid` to be gone.
pub async fn gone_within(pid: i32, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    !alive(pid)
}
