//! The PID-1 reaping mode, exercised in a process made a child subreaper (so orphans are
//! reparented to it as they would be to PID 1 in the VM). Its own test binary, because the
//! reaper is process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::Harness;
use guest_proto::{GuestErrorKind, GuestMessage, Language};

fn zombies_of(parent: u32) -> Vec<i32> {
    guest_agent::process::descendants(parent as i32)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s[s.rfind(')').unwrap() + 1..].trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .collect()
}

#[tokio::test]
async fn pid1_mode_reaps_orphans_and_keeps_exit_codes() {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    guest_agent::process::start_reaper().unwrap();
    let h = Harness::new();
    // Orphans (double fork) are reparented to us and must be collected.
    let code = "import os\n\
                for _ in range(5):\n\
                \x20   if os.fork() == 0:\n\
                \x20       if os.fork() == 0:\n\
                \x20           os._exit(0)\n\
                \x20       os._exit(0)\n";
    h.exec(Language::Python, code).await.ok();
    // Exit codes still reach the engine.
    assert_eq!(h.exec(Language::Raw, "exit 9").await.code(), 9);
    assert_eq!(
        h.exec(Language::Python, "import os; os._exit(3)")
            .await
            .code(),
        3
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let zombies = zombies_of(std::process::id());
    assert!(zombies.is_empty(), "unreaped: {zombies:?}");
    // A missing interpreter is an error, not a panic in the reaper race.
    let h = Harness::with(|cfg| cfg.node = "/nonexistent/node".into());
    let r = h.exec(Language::Javascript, "1").await;
    assert!(
        matches!(
            r.terminal,
            GuestMessage::Error {
                kind: GuestErrorKind::Execution,
                ..
            }
        ),
        "{:?}",
        r.terminal
    );
}
