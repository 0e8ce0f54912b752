//! Exec engine tests against the local python3, node and bash.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Harness, gone_within};
use guest_proto::{GuestErrorKind, GuestMessage, Language};
use tokio_util::sync::CancellationToken;

const PY: Language = Language::Python;
const JS: Language = Language::Javascript;
const SH: Language = Language::Raw;

fn error_kind(msg: &GuestMessage) -> GuestErrorKind {
    match msg {
        GuestMessage::Error { kind, .. } => *kind,
        other => panic!("expected Error, got {other:?}"),
    }
}

#[tokio::test]
async fn python_state_persists() {
    let h = Harness::new();
    h.exec(
        PY,
        "import math\nclass C:\n    pass\ndef f():\n    return 3\nx = 5\n",
    )
    .await
    .ok();
    let out = h
        .exec(PY, "print(x, f(), math.pi > 3, C.__name__)")
        .await
        .ok();
    assert_eq!(out, "5 3 True C\n");
}

#[tokio::test]
async fn javascript_state_persists_with_top_level_await() {
    let h = Harness::new();
    h.exec(
        JS,
        "let a = 1; var b = 2; function f() { return 3 }; class K {}",
    )
    .await
    .ok();
    h.exec(JS, "const v = await Promise.resolve(39);")
        .await
        .ok();
    let out = h
        .exec(JS, "console.log(a + b + f() + v, typeof K)")
        .await
        .ok();
    assert_eq!(out, "45 function\n");
    let out = h
        .exec(
            JS,
            "await new Promise(r => setTimeout(r, 50)); console.log('waited')",
        )
        .await
        .ok();
    assert_eq!(out, "waited\n");
}

#[tokio::test]
async fn bash_state_persists() {
    let h = Harness::new();
    h.exec(SH, "x=5; f() { echo fn; }; export E=exported; cd /tmp")
        .await
        .ok();
    let out = h.exec(SH, "echo $x; f; bash -c 'echo $E'; pwd").await.ok();
    assert_eq!(out, "5\nfn\nexported\n/tmp\n");
    // Top-level `continue` / `break` in user code do not derail the REPL loop.
    h.exec(SH, "continue").await.ok();
    h.exec(SH, "break").await.ok();
    assert_eq!(h.exec(SH, "echo $x").await.ok(), "5\n");
}

#[tokio::test]
async fn output_streams_before_completion() {
    let h = Harness::new();
    let r = h
        .exec(
            PY,
            "import time\nprint('first', flush=True)\ntime.sleep(0.6)\nprint('second')",
        )
        .await;
    assert_eq!(r.ok(), "first\nsecond\n");
    let first = r
        .events
        .iter()
        .find(|(_, m)| matches!(m, GuestMessage::Stdout(_)))
        .map(|(t, _)| *t)
        .unwrap();
    assert!(
        first + Duration::from_millis(400) < r.done_at,
        "first chunk at {first:?}, done at {:?}",
        r.done_at
    );
    // stdout and stderr stay separate.
    let r = h
        .exec(
            PY,
            "import sys\nprint('out')\nprint('err', file=sys.stderr)",
        )
        .await;
    assert_eq!(r.ok(), "out\n");
    assert_eq!(r.err(), "err\n");
}

#[tokio::test]
async fn python_exit_codes() {
    let h = Harness::new();
    h.exec(PY, "kept = 1").await.ok();
    assert_eq!(h.exec(PY, "import sys; sys.exit(3)").await.code(), 3);
    assert_eq!(h.exec(PY, "import sys; sys.exit()").await.code(), 0);
    let r = h.exec(PY, "import sys; sys.exit('message')").await;
    assert_eq!((r.code(), r.err()), (1, "message\n".into()));
    // sys.exit keeps the REPL.
    assert_eq!(h.exec(PY, "print(kept)").await.ok(), "1\n");
    let r = h.exec(PY, "def g():\n    1/0\ng()").await;
    assert_eq!(r.code(), 1);
    assert!(
        r.err().contains("Traceback") && r.err().contains("ZeroDivisionError"),
        "{}",
        r.err()
    );
    assert!(
        !r.err().contains("_sbx_repl"),
        "wrapper frames leak: {}",
        r.err()
    );
    let r = h.exec(PY, "x = = 1").await;
    assert_eq!(r.code(), 1);
    assert!(r.err().contains("SyntaxError"), "{}", r.err());
    assert_eq!(h.exec(PY, "print(kept)").await.ok(), "1\n");
    // os._exit kills the REPL: its code is reported and the next exec starts fresh.
    assert_eq!(h.exec(PY, "import os; os._exit(4)").await.code(), 4);
    let r = h.exec(PY, "print(kept)").await;
    assert_eq!(r.code(), 1);
    assert!(r.err().contains("NameError"));
    // Killed by a signal: 128 + signal.
    assert_eq!(
        h.exec(
            PY,
            "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
        )
        .await
        .code(),
        137
    );
    assert_eq!(h.exec(PY, "print('fresh')").await.ok(), "fresh\n");
}

#[tokio::test]
async fn javascript_exit_codes() {
    let h = Harness::new();
    h.exec(JS, "var kept = 1").await.ok();
    let r = h.exec(JS, "throw new Error('boom')").await;
    assert_eq!(r.code(), 1);
    assert!(r.err().contains("Error: boom"), "{}", r.err());
    let r = h.exec(JS, "let = = 1").await;
    assert_eq!(r.code(), 1);
    assert!(r.err().contains("SyntaxError"), "{}", r.err());
    let r = h
        .exec(JS, "await Promise.reject(new Error('rejected'))")
        .await;
    assert_eq!(r.code(), 1);
    assert!(r.err().contains("rejected"), "{}", r.err());
    assert_eq!(h.exec(JS, "console.log(kept)").await.ok(), "1\n");
    assert_eq!(h.exec(JS, "process.exit(5)").await.code(), 5);
    let r = h.exec(JS, "console.log(typeof kept)").await;
    assert_eq!(r.ok(), "undefined\n");
}

#[tokio::test]
async fn bash_exit_codes() {
    let h = Harness::new();
    assert_eq!(h.exec(SH, "false").await.code(), 1);
    assert_eq!(h.exec(SH, "(exit 7)").await.code(), 7);
    h.exec(SH, "kept=1").await.ok();
    assert_eq!(h.exec(SH, "exit 6").await.code(), 6);
    assert_eq!(h.exec(SH, "echo \"[$kept]\"").await.ok(), "[]\n");
    assert_eq!(h.exec(SH, "kill -9 $$").await.code(), 137);
    assert_eq!(h.exec(SH, "echo ok").await.ok(), "ok\n");
}

#[tokio::test]
async fn timeout_kills_and_resets() {
    let h = Harness::new();
    h.exec(PY, "kept = 1").await.ok();
    let started = Instant::now();
    let r = h.exec_t(PY, "while True:\n    pass", 1).await;
    let took = started.elapsed();
    assert_eq!(r.code(), -1);
    assert!(
        r.err().contains("Execution timeout after 1s"),
        "{}",
        r.err()
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let r = h.exec(PY, "print('kept' in globals())").await;
    assert_eq!(r.ok(), "False\n");
}

#[tokio::test]
async fn timeout_sigterm_handler_exit_code_wins() {
    let h = Harness::new();
    let code = "import signal, sys, time\n\
                signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n\
                time.sleep(30)";
    let r = h.exec_t(PY, code, 1).await;
    assert_eq!(r.code(), 42, "stderr: {}", r.err());
    let r = h
        .exec_t(JS, "process.on('SIGTERM', () => process.exit(43)); setInterval(() => {}, 1000); await new Promise(() => {})", 1)
        .await;
    assert_eq!(r.code(), 43, "stderr: {}", r.err());
    let r = h
        .exec_t(SH, "trap 'exit 44' TERM; while :; do sleep 0.05; done", 1)
        .await;
    assert_eq!(r.code(), 44, "stderr: {}", r.err());
}

#[tokio::test]
async fn timeout_kills_nested_process_trees() {
    let h = Harness::new();
    let code = "import subprocess, time\n\
                p = subprocess.Popen(['bash', '-c', 'sleep 60 & echo $!; wait'], stdout=subprocess.PIPE)\n\
                print(p.stdout.readline().decode().strip(), flush=True)\n\
                time.sleep(60)";
    // Timeouts leave room for a REPL start on a loaded machine before the pid is printed.
    let r = h.exec_t(PY, code, 3).await;
    assert_eq!(r.code(), -1);
    let grandchild: i32 = r.out().trim().parse().unwrap();
    assert!(
        gone_within(grandchild, Duration::from_secs(3)).await,
        "grandchild {grandchild} survived"
    );
    // A child that left the process group (setsid) dies with the tree too.
    let code = "setsid sleep 60 & echo $!; sleep 60";
    let r = h.exec_t(SH, code, 3).await;
    assert_eq!(r.code(), -1);
    let pid: i32 = r.out().trim().parse().unwrap();
    assert!(
        gone_within(pid, Duration::from_secs(3)).await,
        "setsid child {pid} survived"
    );
}

#[tokio::test]
async fn background_processes_outlive_later_timeouts_and_repl_deaths() {
    let h = Harness::new();
    // Started by execs that completed: they stay until the session ends.
    let sh_bg: i32 = h
        .exec(SH, "sleep 60 & echo $!")
        .await
        .ok()
        .trim()
        .parse()
        .unwrap();
    let py_bg: i32 = h
        .exec(
            PY,
            "import subprocess\np = subprocess.Popen(['sleep', '60'])\nprint(p.pid)",
        )
        .await
        .ok()
        .trim()
        .parse()
        .unwrap();
    // A later exec times out: only its own processes go.
    let r = h.exec_t(SH, "sleep 30 & echo $!; sleep 60", 2).await;
    assert_eq!(r.code(), -1);
    let own: i32 = r.out().trim().parse().unwrap();
    assert!(
        gone_within(own, Duration::from_secs(3)).await,
        "timed-out exec's child {own} survived"
    );
    // The REPLs die on their own (not by a timeout): their children stay too.
    assert_eq!(h.exec(SH, "exit 3").await.code(), 3);
    assert_eq!(h.exec(PY, "import os; os._exit(4)").await.code(), 4);
    assert_eq!(h.exec(SH, "echo fresh").await.ok(), "fresh\n");
    for pid in [sh_bg, py_bg] {
        assert!(common::alive(pid), "background process {pid} was killed");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[tokio::test]
async fn cancel_stops_an_exec() {
    let h = Harness::new();
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        t.cancel();
    });
    let started = Instant::now();
    let r = h
        .exec_full(PY, "import time; time.sleep(30)", 30, vec![], token)
        .await;
    assert_eq!(r.code(), -1);
    assert!(r.err().contains("cancelled"), "{}", r.err());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(h.exec(PY, "print(1)").await.ok(), "1\n");
}

#[tokio::test]
async fn pipe_boundaries_are_byte_exact() {
    let h = Harness::new();
    for n in [65_535usize, 65_536, 65_537, 200_000] {
        let r = h
            .exec(PY, &format!("import sys\nsys.stdout.write('x' * {n})"))
            .await;
        assert_eq!(r.ok().len(), n);
        let r = h
            .exec(
                PY,
                &format!("import sys\nsys.stdout.buffer.write(bytes(i % 251 for i in range({n})))"),
            )
            .await;
        r.ok();
        let want: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        assert!(r.stdout == want, "binary output differs at n={n}");
    }
    let r = h.exec(JS, "process.stdout.write('y'.repeat(200000))").await;
    assert_eq!(r.ok(), "y".repeat(200_000));
    let r = h
        .exec(
            SH,
            "head -c 200000 /dev/zero | tr '\\0' z; head -c 65536 /dev/zero | tr '\\0' e >&2",
        )
        .await;
    assert_eq!(r.ok(), "z".repeat(200_000));
    assert_eq!(r.err(), "e".repeat(65_536));
}

#[tokio::test]
async fn unicode_and_binary_survive() {
    let h = Harness::new();
    let want = b"\x00\xff\r\n\x1b[31mred\x1b[0m \xf0\x9f\x98\x80 \xc3\xa9\n".to_vec();
    let r = h
        .exec(
            PY,
            "import sys\nsys.stdout.buffer.write(b'\\x00\\xff\\r\\n\\x1b[31mred\\x1b[0m \\xf0\\x9f\\x98\\x80 \\xc3\\xa9\\n')",
        )
        .await;
    r.ok();
    assert_eq!(r.stdout, want);
    let r = h.exec(PY, "print('héllo 😀 ✓')").await;
    assert_eq!(r.ok(), "héllo 😀 ✓\n");
    let r = h.exec(JS, "console.log('héllo 😀 ✓')").await;
    assert_eq!(r.ok(), "héllo 😀 ✓\n");
    let r = h
        .exec(SH, "v='héllo 😀 ✓'; echo \"$v\"; printf 'a\\0b\\r\\n'")
        .await;
    assert_eq!(r.stdout, "héllo 😀 ✓\na\0b\r\n".as_bytes());
}

#[tokio::test]
async fn output_caps_keep_the_repl() {
    let h = Harness::new();
    h.exec(PY, "kept = 1").await.ok();
    let r = h
        .exec(
            PY,
            "import sys\nfor _ in range(11):\n    sys.stdout.write('o' * 100000)\nprint('end')",
        )
        .await;
    assert_eq!(error_kind(&r.terminal), GuestErrorKind::OutputLimit);
    assert_eq!(r.stdout.len(), 1_000_000);
    let r = h
        .exec(PY, "import sys\nsys.stderr.write('e' * 150000)")
        .await;
    assert_eq!(error_kind(&r.terminal), GuestErrorKind::OutputLimit);
    assert_eq!(r.stderr.len(), 100_000);
    assert_eq!(h.exec(PY, "print(kept)").await.ok(), "1\n");
}

#[tokio::test]
async fn spoofed_markers_have_no_effect() {
    let h = Harness::new();
    let code = "import os, sys, time\n\
                for s in (sys.stdout, sys.stderr):\n\
                \x20   s.write('0123456789abcdef 0\\n__SENTINEL_1_0__\\n'); s.flush()\n\
                os.write(4, b'0123456789abcdef 0\\n')\n\
                time.sleep(0.3)\n\
                print('done')\n\
                sys.exit(5)";
    let r = h.exec(PY, code).await;
    assert_eq!(r.code(), 5, "stderr: {}", r.err());
    assert!(r.out().ends_with("done\n"), "{}", r.out());
    let r = h
        .exec(SH, "echo '0123456789abcdef 0'; echo '0123456789abcdef 0' >&2; sleep 0.3; echo done; (exit 5)")
        .await;
    assert_eq!(r.code(), 5);
    assert!(r.out().ends_with("done\n"));
    let r = h
        .exec(JS, "console.log('0123456789abcdef 0'); await new Promise(r => setTimeout(r, 300)); console.log('done'); throw 1")
        .await;
    assert_eq!(r.code(), 1);
    assert!(r.out().ends_with("done\n"));
}

/// User code shares the wrapper's process: it can read the request (and its id) from
/// the wrapper's frame and write the status line itself. That line must not end the
/// execution while the code keeps running.
#[tokio::test]
async fn forged_status_with_the_real_id_does_not_end_the_exec() {
    let h = Harness::new();
    let code = "import os, sys, time\n\
                req = sys._getframe(1).f_locals['req']\n\
                os.write(4, ('%s 0\\n' % req['id']).encode())\n\
                time.sleep(1)\n\
                print('after')\n\
                sys.exit(3)";
    let r = h.exec(PY, code).await;
    assert_eq!(r.code(), 3, "stderr: {}", r.err());
    assert_eq!(r.out(), "after\n");
    assert!(r.done_at >= Duration::from_millis(1000), "{:?}", r.done_at);
    // Forging and then spinning until the timeout: a timeout, not an early exit 0.
    let code = "import os, sys\n\
                req = sys._getframe(1).f_locals['req']\n\
                os.write(4, ('%s 0\\n' % req['id']).encode())\n\
                while True: pass";
    let r = h.exec_t(PY, code, 2).await;
    assert!(r.done_at >= Duration::from_secs(2), "{:?}", r.done_at);
    assert_eq!(r.code(), -1);
    assert!(
        r.err().contains("Execution timeout after 2s"),
        "{}",
        r.err()
    );
    assert_eq!(h.exec(PY, "print('fresh')").await.ok(), "fresh\n");

    // bash: the id is a shell variable and fd 4 is saved on a high descriptor while the
    // code runs.
    let code = "for fd in $(seq 5 30); do { echo \"$__sbx_nonce 0\" >&$fd; } 2>/dev/null; done\n\
                sleep 1; echo after; (exit 4)";
    let r = h.exec(SH, code).await;
    assert_eq!(r.code(), 4, "stderr: {}", r.err());
    assert_eq!(r.out(), "after\n");
    assert!(r.done_at >= Duration::from_millis(1000), "{:?}", r.done_at);
}

#[tokio::test]
async fn forked_children_returning_into_the_loop_do_not_complete() {
    let h = Harness::new();
    let code = "import os, sys, time\n\
                pid = os.fork()\n\
                if pid != 0:\n\
                \x20   time.sleep(0.5)\n\
                \x20   os.waitpid(pid, 0)\n\
                \x20   print('parent-done')\n\
                \x20   parent_var = 1\n\
                \x20   sys.exit(7)\n";
    let r = h.exec(PY, code).await;
    assert_eq!(r.code(), 7, "stderr: {}", r.err());
    assert_eq!(r.out(), "parent-done\n");
    assert_eq!(h.exec(PY, "print(parent_var)").await.ok(), "1\n");
    // A forked child that raises exits quietly too.
    let r = h
        .exec(PY, "import os, time\nif os.fork() == 0:\n    raise SystemExit(3)\ntime.sleep(0.3)\nprint('p')")
        .await;
    assert_eq!(r.ok(), "p\n");
}

#[tokio::test]
async fn background_processes_do_not_block() {
    let h = Harness::new();
    let started = Instant::now();
    h.exec(SH, "sleep 30 &").await.ok();
    h.exec(
        PY,
        "import subprocess\np = subprocess.Popen(['sleep', '30'])",
    )
    .await
    .ok();
    let daemon = "import os, time\n\
                  if os.fork() == 0:\n\
                  \x20   os.setsid()\n\
                  \x20   if os.fork() == 0:\n\
                  \x20       time.sleep(30)\n\
                  \x20   os._exit(0)\n\
                  os.wait()\n\
                  print('spawned')";
    assert_eq!(h.exec(PY, daemon).await.ok(), "spawned\n");
    h.exec(
        JS,
        "require('child_process').spawn('sleep', ['30'], { stdio: 'inherit' }).unref()",
    )
    .await
    .ok();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Late output of a background job does not leak into the next exec.
    h.exec(SH, "(sleep 0.2; echo late) &").await.ok();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(h.exec(SH, "echo now").await.ok(), "now\n");
}

#[tokio::test]
async fn env_vars_apply_to_one_exec() {
    let h = Harness::new();
    for (lang, read) in [
        (PY, "import os; print(os.environ.get('SBX_T', 'unset'))"),
        (JS, "console.log(process.env.SBX_T ?? 'unset')"),
        (SH, "echo ${SBX_T-unset}; bash -c 'echo ${SBX_T-unset}'"),
    ] {
        let env = vec![("SBX_T".to_owned(), "it's \"v\" $x".to_owned())];
        let r = h
            .exec_full(lang, read, 10, env, CancellationToken::new())
            .await;
        let out = r.ok();
        assert!(out.starts_with("it's \"v\" $x\n"), "{lang}: {out}");
        let out = h.exec(lang, read).await.ok();
        assert!(out.starts_with("unset\n"), "{lang}: {out}");
    }
    let bad = vec![("LD_PRELOAD".to_owned(), "x".to_owned())];
    let r = h
        .exec_full(PY, "pass", 10, bad, CancellationToken::new())
        .await;
    assert_eq!(error_kind(&r.terminal), GuestErrorKind::EnvVar);
    let bad = vec![("A.B".to_owned(), "x".to_owned())];
    let r = h
        .exec_full(SH, "true", 10, bad, CancellationToken::new())
        .await;
    assert_eq!(error_kind(&r.terminal), GuestErrorKind::EnvVar);
}

#[tokio::test]
async fn code_is_validated() {
    let h = Harness::new();
    assert_eq!(
        error_kind(&h.exec(PY, "  \n").await.terminal),
        GuestErrorKind::Code
    );
    assert_eq!(
        error_kind(&h.exec(PY, "a\0b").await.terminal),
        GuestErrorKind::Code
    );
    let big = "#".repeat(1024 * 1024 + 1);
    assert_eq!(
        error_kind(&h.exec(PY, &big).await.terminal),
        GuestErrorKind::Code
    );
    assert_eq!(
        error_kind(&h.exec_t(PY, "pass", 301).await.terminal),
        GuestErrorKind::Code
    );
    // Large code (just under the limit) goes through every REPL.
    let code = format!("x = 1\n#{}\nprint(x)", "c".repeat(1024 * 1000));
    assert_eq!(h.exec(PY, &code).await.ok(), "1\n");
    let code = format!("echo big\n#{}", "c".repeat(1024 * 1000));
    assert_eq!(h.exec(SH, &code).await.ok(), "big\n");
    let code = format!("echo 'é😀'\n#{}", "é".repeat(1000));
    assert_eq!(h.exec(SH, &code).await.ok(), "é😀\n");
}

#[tokio::test]
async fn shebang_raw_code_runs_through_its_interpreter() {
    let h = Harness::new();
    let r = h
        .exec(
            SH,
            "#!/usr/bin/env python3\nimport sys\nprint('from python')\nsys.exit(3)\n",
        )
        .await;
    assert_eq!(r.code(), 3, "stderr: {}", r.err());
    assert_eq!(r.out(), "from python\n");
}

#[tokio::test]
async fn warm_up_and_languages_run_concurrently() {
    let h = Harness::new();
    for lang in [PY, JS, SH] {
        let msg = h.engine.warm_up(lang, CancellationToken::new()).await;
        assert_eq!(msg, GuestMessage::WarmUpDone { language: lang });
    }
    let started = Instant::now();
    let (a, b) = tokio::join!(
        h.exec(PY, "import time; time.sleep(0.5)"),
        h.exec(SH, "sleep 0.5")
    );
    a.ok();
    b.ok();
    assert!(
        started.elapsed() < Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn python_pass_round_trip() {
    let h = Harness::new();
    h.exec(PY, "pass").await.ok();
    let mut samples = Vec::new();
    for _ in 0..200 {
        let r = h.exec(PY, "pass").await;
        r.ok();
        samples.push(r.done_at);
    }
    samples.sort();
    let p50 = samples[samples.len() / 2];
    let p90 = samples[samples.len() * 9 / 10];
    println!("warm python `pass` round trip (in-process): p50 {p50:?}, p90 {p90:?}");
    assert!(p50 < Duration::from_millis(20), "p50 {p50:?}");
}

#[tokio::test]
async fn fork_bomb_is_contained_by_rlimit_nproc() {
    if !common::is_root() {
        println!(
            "SKIP fork_bomb_is_contained_by_rlimit_nproc: needs root to run user code as uid 65534"
        );
        return;
    }
    // A low limit keeps the test light on a shared machine; the mechanism is the same
    // RLIMIT_NPROC the VM sets to 1024.
    let h = Harness::with(|cfg| cfg.nproc = 64);
    let code = "import os, time\n\
                n = 0\n\
                try:\n\
                \x20   for _ in range(1000):\n\
                \x20       if os.fork() == 0:\n\
                \x20           time.sleep(20)\n\
                \x20           os._exit(0)\n\
                \x20       n += 1\n\
                except OSError as e:\n\
                \x20   print('blocked after', n, e.errno)\n";
    let r = h.exec_t(PY, code, 10).await;
    let out = r.ok();
    let n: usize = out
        .split_whitespace()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("fork bomb not blocked: {out}"));
    assert!(n < 64, "{out}");
    let pid = h.engine.repl_pid(PY).await.unwrap();
    drop(h);
    assert!(gone_within(pid, Duration::from_secs(3)).await);
}
