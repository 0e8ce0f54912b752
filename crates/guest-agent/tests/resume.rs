//! `Resume` in host mode: the REPLs reseed their generators before user code runs again.
//!
//! The kernel part (clock, `RNDADDENTROPY`, `RNDRESEEDCRNG`) only runs as PID 1 in the
//! VM; here it is skipped (the agent logs that) and what is checked is that every REPL's
//! generator leaves the state the code had put it in.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::Harness;
use guest_proto::{GuestErrorKind, GuestMessage, Language};

const PY: Language = Language::Python;
const JS: Language = Language::Javascript;
const SH: Language = Language::Raw;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

async fn resume(h: &Harness) -> (u32, Duration) {
    let started = Instant::now();
    match h.engine.resume(now_ns(), &[0x5a; 32]).await {
        GuestMessage::Resumed { reseeded, .. } => (reseeded, started.elapsed()),
        other => panic!("expected Resumed, got {other:?}"),
    }
}

/// Seeds a generator with a fixed seed and prints its next values, twice: the seeded
/// sequence is reproducible. After a `Resume` between seeding and printing, it is not.
async fn check_reseed(h: &Harness, language: Language, seed: &str, draw: &str) {
    let seeded = h.exec(language, &format!("{seed}\n{draw}")).await.ok();
    assert_eq!(
        h.exec(language, &format!("{seed}\n{draw}")).await.ok(),
        seeded,
        "{language}: a fixed seed should repeat"
    );
    h.exec(language, seed).await.ok();
    let (reseeded, took) = resume(h).await;
    assert_eq!(reseeded, 1, "{language}: one live REPL to reseed");
    eprintln!("{language}: Resume answered in {took:?}");
    let after = h.exec(language, draw).await.ok();
    assert_ne!(after, seeded, "{language}: the generator was not reseeded");
    assert!(!after.trim().is_empty());
}

#[tokio::test]
async fn python_random_reseeds() {
    let h = Harness::new();
    check_reseed(
        &h,
        PY,
        "import random, tempfile; random.seed(1)",
        "print([random.random() for _ in range(4)])",
    )
    .await;
    // State other than the generators survives.
    h.exec(PY, "kept = 41").await.ok();
    resume(&h).await;
    assert_eq!(h.exec(PY, "print(kept + 1)").await.ok(), "42\n");
}

#[tokio::test]
async fn bash_random_reseeds() {
    let h = Harness::new();
    check_reseed(&h, SH, "RANDOM=7", "echo $RANDOM $RANDOM $RANDOM $RANDOM").await;
}

#[tokio::test]
async fn node_restarts_by_default() {
    let h = Harness::new();
    h.exec(JS, "globalThis.kept = 1").await.ok();
    let before = h.engine.repl_pid(JS).await.unwrap();
    let (reseeded, took) = resume(&h).await;
    assert_eq!(reseeded, 1);
    let after = h.engine.repl_pid(JS).await.unwrap();
    assert_ne!(before, after, "node should have been replaced");
    eprintln!("node restart on resume (host, not TCG): {took:?}");
    // A fresh process: no state, ready to run.
    assert_eq!(
        h.exec(JS, "console.log(typeof globalThis.kept)").await.ok(),
        "undefined\n"
    );
}

#[tokio::test]
async fn node_reseeds_in_place_when_asked() {
    let h = Harness::with(|cfg| cfg.restart_node_on_resume = false);
    // V8's Math.random cannot be seeded from JavaScript: check instead that it is replaced
    // by a kernel-backed generator, that the JavaScript crypto functions are too, and that
    // the interpreter (and its state) is the same process.
    h.exec(
        JS,
        "globalThis.origRandom = Math.random; globalThis.kept = 41",
    )
    .await
    .ok();
    let pid = h.engine.repl_pid(JS).await.unwrap();
    let (reseeded, _) = resume(&h).await;
    assert_eq!(reseeded, 1);
    assert_eq!(h.engine.repl_pid(JS).await.unwrap(), pid);
    let out = h
        .exec(
            JS,
            r#"
const c = require('crypto');
const xs = Array.from({ length: 1000 }, () => Math.random());
const ok = xs.every((x) => x >= 0 && x < 1) && new Set(xs).size === 1000;
const u = c.randomUUID();
const w = c.webcrypto.randomUUID();
const v = c.webcrypto.getRandomValues(new Uint32Array(4));
const b = c.randomBytes(16);
const f = c.randomFillSync(Buffer.alloc(8), 2, 4);
const i = c.randomInt(10, 20);
console.log(Math.random !== origRandom, ok, kept + 1,
  /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/.test(u),
  w.length, v.length, b.length, f.readUInt16LE(0) === 0 && f.readUInt16LE(6) === 0,
  i >= 10 && i < 20);
let threw = false;
try { c.webcrypto.getRandomValues(new Float64Array(1)); } catch (e) { threw = true; }
try { c.randomInt(5, 1); threw = false; } catch (e) {}
console.log(threw);
"#,
        )
        .await
        .ok();
    assert_eq!(out, "true true 42 true 36 4 16 true true\ntrue\n");
    let cb = h
        .exec(
            JS,
            "await new Promise((res) => require('crypto').randomBytes(4, (e, b) => { console.log(e, b.length); res(); }))",
        )
        .await
        .ok();
    assert_eq!(cb, "null 4\n");
    // A second resume still reseeds (the pool read before it is thrown away).
    assert_eq!(resume(&h).await.0, 1);
    h.exec(JS, "console.log(Math.random())").await.ok();
}

#[tokio::test]
async fn exec_reseeds_a_repl_the_resume_could_not_reach() {
    let h = std::sync::Arc::new(Harness::new());
    h.exec(PY, "import random; random.seed(3)").await.ok();
    let seeded = h
        .exec(PY, "random.seed(3); print(random.random())")
        .await
        .ok();
    h.exec(PY, "random.seed(3)").await.ok();
    // An exec holds the REPL while the resume comes: the resume does not wait for it...
    let busy = {
        let h = h.clone();
        tokio::spawn(async move { h.exec(PY, "import time; time.sleep(1.5)").await.ok() })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (reseeded, took) = resume(&h).await;
    assert_eq!(reseeded, 0);
    assert!(took < Duration::from_secs(1), "resume waited {took:?}");
    busy.await.unwrap();
    // ...and the next exec reseeds before the code runs.
    let after = h.exec(PY, "print(random.random())").await.ok();
    assert_ne!(after, seeded);
}

#[tokio::test]
async fn resume_without_repls_and_bad_entropy() {
    let h = Harness::new();
    let (reseeded, _) = resume(&h).await;
    assert_eq!(reseeded, 0);
    match h.engine.resume(now_ns(), &[1; 31]).await {
        GuestMessage::Error { kind, .. } => assert_eq!(kind, GuestErrorKind::Request),
        other => panic!("expected Error, got {other:?}"),
    }
    // A REPL started after a resume is seeded from the kernel already: nothing to redo.
    h.exec(SH, "RANDOM=1").await.ok();
    assert_eq!(resume(&h).await.0, 1);
}

/// `RNDADDENTROPY` and `RNDRESEEDCRNG` on this host's kernel, when permitted (adding
/// bytes to the pool is harmless). `clock_settime` is never tried outside the VM.
#[test]
fn kernel_entropy_calls_when_permitted() {
    if !common::is_root() {
        eprintln!("SKIPPED kernel_entropy_calls_when_permitted: needs root (CAP_SYS_ADMIN)");
        return;
    }
    match guest_agent::hardening::add_entropy(&[0xa7; 33]) {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::EPERM) => {
            eprintln!("SKIPPED kernel_entropy_calls_when_permitted: RNDADDENTROPY: {err}");
            return;
        }
        Err(err) => panic!("RNDADDENTROPY failed: {err}"),
    }
    let before = guest_agent::hardening::crng_reseeds();
    match guest_agent::hardening::try_reseed_crng() {
        Ok(()) => assert_eq!(guest_agent::hardening::crng_reseeds(), before + 1),
        Err(err) if err.raw_os_error() == Some(libc::EPERM) => {
            eprintln!("SKIPPED RNDRESEEDCRNG part: {err}");
        }
        Err(err) => panic!("RNDRESEEDCRNG failed: {err}"),
    }
    let a = guest_agent::hardening::kernel_random::<16>().unwrap();
    let b = guest_agent::hardening::kernel_random::<16>().unwrap();
    assert_ne!(a, b);
}

/// A resume that sets the clock back past node's start (the host makes snapshots with the
/// guest clock far ahead) reseeds node in place: OpenSSL reseeds its DRBGs by itself. Bun
/// (BoringSSL, no such rule) is restarted all the same. Host mode cannot set the clock, so
/// the REPL's recorded start is what moves here: the check is the same comparison.
#[tokio::test]
async fn node_reseeds_in_place_when_the_clock_went_back_past_its_start_bun_restarts() {
    let node = std::path::Path::new("/usr/bin/node");
    for (runtime, in_place) in [(Some(node), true), (None, false)] {
        if runtime.is_some_and(|n| !n.exists()) {
            eprintln!("skipped the node case: no /usr/bin/node on this host");
            continue;
        }
        let h = match runtime {
            Some(n) => Harness::with(|cfg| cfg.node = n.to_path_buf()),
            None => Harness::new(),
        };
        h.exec(JS, "globalThis.kept = 41").await.ok();
        let pid = h.engine.repl_pid(JS).await.unwrap();
        assert!(
            h.engine
                .set_repl_started_wall(JS, SystemTime::now() + Duration::from_secs(3600))
                .await
        );
        let (reseeded, _) = resume(&h).await;
        assert_eq!(reseeded, 1);
        let same = h.engine.repl_pid(JS).await.unwrap() == pid;
        assert_eq!(same, in_place, "{runtime:?}: reseeded in place?");
        let kept = h.exec(JS, "console.log(typeof kept)").await.ok();
        assert_eq!(kept, if in_place { "number\n" } else { "undefined\n" });
    }
}
