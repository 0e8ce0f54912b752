//! End-to-end tests over real microVMs (TCG here).
//!
//! They need QEMU and the guest assets, so they are `#[ignore]`d in `cargo test` and run by
//! `cargo xtask itest` (which builds the assets first). Once opted in, missing assets or
//! QEMU are failures, never silent passes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandbox_core::{
    ErrorKind, ExecRequest, Language, OutputCallbacks, RunOptions, RunRequest, SessionRequest,
};
use sbx::Sbx;

mod common;
use common::{config, qemu_count, qemu_pids, snapshot_dir, vm_dirs, wait_no_qemu, work_dir};

async fn sbx(warm: usize) -> Sbx {
    Sbx::start(config(warm)).await.expect("sbx starts")
}

async fn run(sbx: &Sbx, lang: Language, code: &str) -> sandbox_core::ExecutionResult {
    sbx.scheduler()
        .run(RunRequest::new(lang, code), RunOptions::default())
        .await
        .unwrap_or_else(|e| panic!("run {code:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn run_each_language() {
    let sbx = sbx(0).await;
    let r = run(&sbx, Language::Python, "print('hello from a microVM')").await;
    assert_eq!(r.stdout, "hello from a microVM\n");
    assert_eq!(r.exit_code, 0);
    assert!(r.timing.boot_ms > 0 && r.timing.total_ms >= r.timing.execute_ms);
    let r = run(&sbx, Language::Javascript, "console.log(6*7)").await;
    assert_eq!(r.stdout, "42\n");
    let r = run(&sbx, Language::Raw, "echo ok; echo err >&2; exit 3").await;
    assert_eq!(
        (r.stdout.as_str(), r.stderr.as_str(), r.exit_code),
        ("ok\n", "err\n", 3)
    );
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn exit_codes_timeouts_and_limits() {
    let sbx = sbx(0).await;
    let s = sbx
        .scheduler()
        .session(SessionRequest::new(Language::Python), RunOptions::default())
        .await
        .unwrap();
    let cb = OutputCallbacks::default();
    let exec = |code: &str, t: u32| {
        let mut r = ExecRequest::new(code);
        r.timeout_secs = t;
        r
    };
    let r = s
        .exec(exec("import sys; sys.exit(7)", 10), &cb)
        .await
        .unwrap();
    assert_eq!(r.exit_code, 7);
    let r = s
        .exec(exec("raise ValueError('bad')", 10), &cb)
        .await
        .unwrap();
    assert_eq!(r.exit_code, 1);
    assert!(r.stderr.contains("ValueError: bad"), "{}", r.stderr);
    let r = s.exec(exec("def f(:", 10), &cb).await.unwrap();
    assert_eq!(r.exit_code, 1);
    assert!(r.stderr.contains("SyntaxError"), "{}", r.stderr);
    let started = Instant::now();
    let r = s
        .exec(exec("import time\ntime.sleep(30)", 2), &cb)
        .await
        .unwrap();
    assert_eq!(r.exit_code, -1);
    assert!(
        r.stderr.contains("Execution timeout after 2s"),
        "{}",
        r.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    let err = s
        .exec(exec("print('x' * 2_000_000)", 20), &cb)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutputLimit);
    assert!(!s.is_closed());
    let r = s
        .exec(
            exec(
                "import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
                10,
            ),
            &cb,
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, 143);
    assert!(!s.is_closed(), "a non-KILL signal keeps the session");
    let r = s.exec(exec("print('still here')", 10), &cb).await.unwrap();
    assert_eq!(r.stdout, "still here\n");
    let r = s
        .exec(
            exec(
                "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
                10,
            ),
            &cb,
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, 137);
    assert!(s.is_closed(), "exit 137 closes the session");
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn session_state_files_and_streaming() {
    let sbx = sbx(0).await;
    let s = sbx
        .scheduler()
        .session(SessionRequest::new(Language::Python), RunOptions::default())
        .await
        .unwrap();
    let cb = OutputCallbacks::default();
    s.exec(
        ExecRequest::new("import math\nx = 41\ndef inc(v): return v + 1"),
        &cb,
    )
    .await
    .unwrap();
    let r = s
        .exec(ExecRequest::new("print(inc(x), math.pi > 3)"), &cb)
        .await
        .unwrap();
    assert_eq!(r.stdout, "42 True\n");

    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    s.write_bytes("in/data.bin", &data, false).await.unwrap();
    let r = s
        .exec(
            ExecRequest::new(
                "import hashlib\nd = open('in/data.bin','rb').read()\nopen('out.bin','wb').write(d[::-1])\nprint(len(d))",
            ),
            &cb,
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "3000000\n");
    let back = s.read_bytes("out.bin").await.unwrap();
    let mut rev = data.clone();
    rev.reverse();
    assert!(back == rev, "downloaded bytes differ");
    let names: Vec<String> = s
        .list_files("")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(names, vec!["in".to_string(), "out.bin".to_string()]);
    let err = s.read_bytes("../../etc/passwd").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Input);

    // Streaming: the first chunk arrives well before completion.
    let first = Arc::new(Mutex::new(None::<Instant>));
    let f = first.clone();
    let cbs = OutputCallbacks {
        on_stdout: Some(Arc::new(move |_: &[u8]| {
            f.lock().unwrap().get_or_insert_with(Instant::now);
        })),
        on_stderr: None,
    };
    let r = s
        .exec(
            ExecRequest::new("import time\nprint('a', flush=True)\ntime.sleep(1.5)\nprint('b')"),
            &cbs,
        )
        .await
        .unwrap();
    let done = Instant::now();
    assert_eq!(r.stdout, "a\nb\n");
    let first = first.lock().unwrap().expect("a chunk arrived");
    assert!(done.duration_since(first) > Duration::from_millis(1000));
    s.close().await;
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}

/// Under TCG the guest CPU has no fast-string flags (their `rep movsb` is emulated a byte
/// at a time) but keeps SHA-NI; and a host-to-guest stream through the agent port, whose
/// guest driver now drains several 4 KiB buffers per read, arrives byte-exact in both
/// directions, with frames of every size in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn tcg_guest_cpu_and_bulk_transfers() {
    let sbx = sbx(0).await;
    let mut req = SessionRequest::new(Language::Raw);
    req.memory_mb = 256;
    let s = sbx
        .scheduler()
        .session(req, RunOptions::default())
        .await
        .unwrap();
    let cb = OutputCallbacks::default();
    if sbx.wiring().accelerator == "tcg" {
        let r = s
            .exec(
                ExecRequest::new(
                    "grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\\n' | grep -xE 'erms|fsrm|sha_ni'",
                ),
                &cb,
            )
            .await
            .unwrap();
        assert_eq!(r.stdout, "sha_ni\n", "guest CPU flags: {r:?}");
        // Told the host's TSC rate, the guest keeps time with the TSC, not jiffies.
        let r = s
            .exec(
                ExecRequest::new(
                    "cat /sys/devices/system/clocksource/clocksource0/current_clocksource",
                ),
                &cb,
            )
            .await
            .unwrap();
        if probes::host::constant_tsc(std::path::Path::new("/proc")) {
            // `tsc-early` until the kernel's delayed refinement registers `tsc`.
            assert!(
                matches!(r.stdout.as_str(), "tsc\n" | "tsc-early\n"),
                "guest clocksource: {r:?}"
            );
        } else {
            eprintln!("host TSC is not constant: guest clocksource {:?}", r.stdout);
        }
    } else {
        eprintln!(
            "skipping the TCG CPU flag check: accelerator is {}",
            sbx.wiring().accelerator
        );
    }
    // No two 4 KiB blocks alike, so a lost, repeated or reordered buffer shows.
    let data: Vec<u8> = (0..24 * 1024 * 1024u32)
        .map(|i| ((i / 4096).wrapping_mul(2_654_435_761) >> 24) as u8 ^ (i as u8))
        .collect();
    for (path, len) in [
        ("big.bin", data.len()),
        ("odd.bin", 4096 * 3 + 17),
        ("one.bin", 1),
    ] {
        s.write_bytes(path, &data[..len], false).await.unwrap();
        let r = s
            .exec(ExecRequest::new(format!("stat -c %s {path}")), &cb)
            .await
            .unwrap();
        assert_eq!(r.stdout.trim(), len.to_string());
        let back = s.read_bytes(path).await.unwrap();
        assert!(
            back == data[..len],
            "{path}: bytes differ after the round trip"
        );
    }
    let r = s
        .exec(ExecRequest::new("sha256sum big.bin | cut -c1-64"), &cb)
        .await
        .unwrap();
    assert_eq!(
        r.stdout.trim(),
        guest_proto::Sha256Digest::of(&data).to_string()
    );
    s.close().await;
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn guest_hardening_seen_from_inside() {
    let sbx = sbx(0).await;
    let code = r#"
id -u; id -g
touch /usr/x 2>/dev/null && echo rootfs-writable || echo rootfs-ro
touch /etc/hosts 2>/dev/null && echo etc-writable || echo etc-ro
ls /proc | grep -c '^[0-9]' >/dev/null; ls -d /proc/1 2>/dev/null && echo pid1-visible || echo pid1-hidden
for d in /dev/mem /dev/kmem /dev/port /dev/vda; do [ -e $d ] && echo "$d present" || echo "$d absent"; done
cat /proc/sys/kernel/kptr_restrict /proc/sys/kernel/dmesg_restrict /proc/sys/fs/suid_dumpable
echo 1 > /proc/sys/kernel/sysrq 2>/dev/null && echo sysctl-writable || echo sysctl-ro
pwd
awk '$2 == "/dev" { split($4, o, ","); print "dev-mount", o[1] }' /proc/mounts
[ -O /proc/$BASHPID/status ] && echo repl-owner-user || echo repl-owner-root
ls -d /proc/$BASHPID >/dev/null 2>&1 && echo repl-visible-to-children || echo repl-hidden-from-children
sleep 5 & echo "child-owner $(stat -c %u /proc/$!/status)"; kill $!
"#;
    let r = run(&sbx, Language::Raw, code).await;
    let out = r.stdout;
    assert!(out.starts_with("1000\n1000\n"), "{out}");
    for want in [
        "rootfs-ro",
        "etc-ro",
        "pid1-hidden",
        "/dev/mem absent",
        "/dev/kmem absent",
        "/dev/port absent",
        "/dev/vda absent",
        "2\n1\n0\n",
        "sysctl-ro",
        "/home/user",
        "dev-mount ro\n",
        // The REPL is non-dumpable: its /proc files belong to root and other uid-1000
        // processes, its own children included, cannot even see it. A child that execs a
        // readable binary is an ordinary dumpable process (the control).
        "repl-owner-root\n",
        "repl-hidden-from-children\n",
        "child-owner 1000\n",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    // The Python and JavaScript REPLs are non-dumpable too.
    for (lang, code) in [
        (
            Language::Python,
            "import os; print(os.stat(f'/proc/{os.getpid()}/status').st_uid)",
        ),
        (
            Language::Javascript,
            "console.log(require('fs').statSync(`/proc/${process.pid}/status`).uid)",
        ),
    ] {
        let r = run(&sbx, lang, code).await;
        assert_eq!(r.stdout, "0\n", "{lang}: {r:?}");
    }
    // Zombies are reaped: an orphaned child that exits does not linger.
    let r = run(
        &sbx,
        Language::Raw,
        "(sleep 0.2 & exec true) ; sleep 1; ps -eo stat | grep -c '^Z' || true",
    )
    .await;
    assert_eq!(r.stdout.trim(), "0", "zombies: {}", r.stdout);
    sbx.stop().await;
}

/// The agent reseeds the kernel CRNG at boot and before every exec (so VMs restored from
/// one snapshot diverge), and reports its setup time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn crng_reseeded_before_each_exec_and_setup_time_reported() {
    let sbx = sbx(0).await;
    let s = sbx
        .scheduler()
        .session(SessionRequest::new(Language::Python), RunOptions::default())
        .await
        .unwrap();
    let first = s.ping().await.unwrap();
    let at_boot = first.crng_reseeds.expect("the VM agent reseeds");
    assert!(at_boot >= 1, "reseeded at boot: {first:?}");
    let setup_us = first.setup_us.expect("setup time reported");
    assert!(setup_us > 0, "{first:?}");
    let cb = OutputCallbacks::default();
    for _ in 0..3 {
        s.exec(ExecRequest::new("pass"), &cb).await.unwrap();
    }
    let after = s.ping().await.unwrap();
    assert_eq!(
        after.crng_reseeds,
        Some(at_boot + 3),
        "one reseed per exec, none per ping"
    );
    eprintln!(
        "guest setup {:.2} ms, boot {:?} ms, reseeds {at_boot} → {:?}",
        setup_us as f64 / 1000.0,
        first.boot_ms,
        after.crng_reseeds
    );
    s.close().await;
    sbx.stop().await;
}

/// With `sbx setup` done (CI runs it), QEMU runs as `sbx-qemu`, and the VM's files are
/// shared with its group only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn qemu_runs_as_the_dedicated_user() {
    use std::os::unix::fs::MetadataExt;
    let cfg = config(0);
    let report = probes::host_report().await;
    let user = match sbx::setup::qemu_user(report, &cfg.assets_dir, &cfg.work_dir).await {
        sbx::setup::QemuUser::Dedicated(u) => u,
        other => {
            eprintln!(
                "skipped: QEMU cannot run as its own user here ({}); `sbx setup` as root \
                 enables it",
                other.describe()
            );
            return;
        }
    };
    let sbx = Sbx::start(cfg).await.unwrap();
    assert!(
        sbx.wiring().qemu_user.starts_with(&user.name),
        "{}",
        sbx.wiring().qemu_user
    );
    let s = sbx
        .scheduler()
        .session(SessionRequest::new(Language::Raw), RunOptions::default())
        .await
        .unwrap();
    let r = s
        .exec(ExecRequest::new("echo hi"), &OutputCallbacks::default())
        .await
        .unwrap();
    assert_eq!(r.stdout, "hi\n");
    let pids = qemu_pids();
    assert_eq!(pids.len(), 1, "one QEMU");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap())
            .collect()
    };
    assert_eq!(ids("Uid:"), vec![user.uid; 4], "{status}");
    assert_eq!(ids("Gid:"), vec![user.gid; 4], "{status}");
    assert!(
        ids("Groups:").is_empty(),
        "no supplementary groups: {status}"
    );
    let vm_dir = std::fs::read_dir(work_dir())
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with("vm-"))
        .unwrap()
        .path();
    let md = std::fs::metadata(&vm_dir).unwrap();
    assert_eq!((md.mode() & 0o777, md.gid()), (0o770, user.gid));
    // QEMU's sockets are its own and its group's (umask 007); the overlay is shared with
    // the group, never with others.
    let mut made_by_qemu = 0;
    for e in std::fs::read_dir(&vm_dir).unwrap().filter_map(Result::ok) {
        let md = e.metadata().unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if md.uid() == user.uid {
            made_by_qemu += 1;
            assert_eq!((md.mode() & 0o007, md.gid()), (0, user.gid), "{name}");
        }
        if name.ends_with(".qcow2") {
            assert_eq!((md.mode() & 0o777, md.gid()), (0o660, user.gid), "{name}");
        }
    }
    assert!(made_by_qemu >= 2, "QEMU created its agent and QMP sockets");
    s.close().await;
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn warm_pool_hit() {
    let sbx = sbx(1).await;
    assert!(
        sbx.wait_pool_ready(Duration::from_secs(180)).await,
        "pool filled"
    );
    let r = run(&sbx, Language::Python, "print('warm')").await;
    assert!(r.warm_pool_hit);
    assert_eq!(r.timing.boot_ms, 0);
    assert_eq!(r.stdout, "warm\n");
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn lifecycle_cycles_leave_nothing_behind() {
    let cfg = config(0);
    let work = cfg.work_dir.clone();
    let sbx = Sbx::start(cfg).await.unwrap();
    for i in 0..20 {
        let r = run(&sbx, Language::Raw, &format!("echo {i}")).await;
        assert_eq!(r.stdout, format!("{i}\n"));
    }
    let futs: Vec<_> = (0..4)
        .map(|i| {
            let s = sbx.scheduler().clone();
            tokio::spawn(async move {
                s.run(
                    RunRequest::new(Language::Raw, format!("echo c{i}")),
                    RunOptions::default(),
                )
                .await
            })
        })
        .collect();
    for (i, f) in futs.into_iter().enumerate() {
        assert_eq!(f.await.unwrap().unwrap().stdout, format!("c{i}\n"));
    }
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0, "QEMU processes left");
    assert_eq!(vm_dirs(&work), 0, "VM work dirs (sockets, overlays) left");
}

fn sbx_bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sbx"));
    c.env("SBX_LOG", "error")
        .env("SBX_WORK_DIR", work_dir())
        .env("SBX_SNAPSHOTS", "0");
    c
}

#[test]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
fn cli_exit_statuses_and_json() {
    config(0);
    let out = sbx_bin().args(["print('hi')"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");

    let out = sbx_bin()
        .args(["run", "-l", "raw", "--json", "echo out; exit 4"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stdout"], "out\n");
    assert_eq!(v["exit_code"], 4);
    for k in [
        "total_ms",
        "setup_ms",
        "boot_ms",
        "execute_ms",
        "admission_ms",
        "connect_ms",
        "spawn_ms",
        "process_ms",
    ] {
        assert!(v["timing"][k].is_u64(), "timing.{k} in {v}");
    }
    let t = &v["timing"];
    assert_eq!(
        t["execute_ms"].as_u64(),
        Some(
            t["connect_ms"].as_u64().unwrap()
                + t["spawn_ms"].as_u64().unwrap()
                + t["process_ms"].as_u64().unwrap()
        ),
        "execute = connect + spawn + process: {t}"
    );
    assert_eq!(v["warm_pool_hit"], false);

    let out = sbx_bin()
        .args([
            "run",
            "-l",
            "python",
            "-t",
            "1",
            "import time; time.sleep(10)",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124));

    let out = sbx_bin()
        .args(["run", "-t", "0", "print(1)"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = sbx_bin()
        .args(["run", "-e", "LD_PRELOAD=x", "print(1)"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    let out = sbx_bin()
        .args(["run", "--json", "-l", "raw", "-c", "echo 1", "-c", "echo 2"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(v[1]["index"], 1);
    assert_eq!(v[1]["stdout"], "2\n");

    let out = sbx_bin()
        .env("SBX_ASSETS_DIR", "/nonexistent")
        .args(["print(1)"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cargo xtask assets"));
    assert_eq!(wait_no_qemu(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn qemu_killed_mid_boot_is_retried() {
    let sbx = sbx(0).await;
    // Kill QEMU as soon as the guest prints its first console line.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let killer = tokio::spawn(async move {
        if rx.recv().await.is_some() {
            for pid in qemu_pids() {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
        while rx.recv().await.is_some() {}
    });
    let r = sbx
        .scheduler()
        .run(
            RunRequest::new(Language::Raw, "echo survived"),
            RunOptions {
                callbacks: OutputCallbacks::default(),
                boot_log: Some(tx),
            },
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "survived\n");
    assert!(r.timing.boot_retries >= 1, "{:?}", r.timing);
    killer.abort();
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn guest_that_never_answers_times_out_within_the_bound() {
    let mut cfg = config(0);
    // Far shorter than any boot under TCG: the agent cannot answer in time.
    cfg.boot_timeout = Some(Duration::from_millis(300));
    cfg.boot_attempts = Some(2);
    let work = cfg.work_dir.clone();
    let sbx = Sbx::start(cfg).await.unwrap();
    let started = Instant::now();
    let err = sbx
        .scheduler()
        .run(
            RunRequest::new(Language::Raw, "echo x"),
            RunOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Transient(sandbox_core::TransientCause::BootTimeout),
        "{err}"
    );
    assert!(err.is_retryable());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
    assert_eq!(vm_dirs(&work), 0);
}

#[test]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
fn host_killed_with_sigkill_takes_its_qemus_along() {
    config(0);
    let mut child = sbx_bin()
        .args(["run", "-q", "-l", "raw", "-t", "120", "sleep 100"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while qemu_count() == 0 {
        assert!(Instant::now() < deadline, "no QEMU started");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while qemu_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "QEMU outlived its SIGKILLed parent"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 19 §8: time spent waiting for capacity (here the only VM slot, held by a session)
/// is `admission_ms`, not `setup_ms`; the exec splits into connect + spawn + process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn capacity_waits_show_in_admission_ms() {
    let mut cfg = config(0);
    cfg.max_vms = 1;
    let sbx = Sbx::start(cfg).await.unwrap();
    let s = sbx
        .scheduler()
        .session(SessionRequest::new(Language::Raw), RunOptions::default())
        .await
        .unwrap();
    let closer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        s.close().await;
    });
    let r = run(&sbx, Language::Raw, "echo waited").await;
    closer.await.unwrap();
    assert_eq!(r.stdout, "waited\n");
    let t = &r.timing;
    assert!(t.admission_ms >= 1500, "{t:?}");
    assert!(t.setup_ms < 1500, "{t:?}");
    assert_eq!(
        t.execute_ms,
        t.connect_ms + t.spawn_ms + t.process_ms,
        "{t:?}"
    );
    assert!(t.total_ms >= t.admission_ms + t.boot_ms, "{t:?}");
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}

/// A snapshot dir of this test binary's own, readable by QEMU's user.
/// Issue 13 §2/§5: the first run of a kind boots cold and creates its L1 snapshot in the
/// background; later runs restore from it, and say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn runs_restore_from_the_l1_snapshot_of_their_kind() {
    let dir = snapshot_dir("runs");
    let mut cfg = config(0);
    cfg.snapshot_dir = Some(dir.clone());
    let sbx = Sbx::start(cfg).await.unwrap();
    // javascript is never snapshotted (see sandbox_core::restore): it boots cold.
    for _ in 0..2 {
        let r = run(&sbx, Language::Javascript, "console.log('ok')").await;
        assert_eq!(r.stdout, "ok\n");
        assert_eq!(r.vm_start, sandbox_core::result::VmStart::Cold);
        assert!(
            sbx.scheduler()
                .wait_background(Duration::from_secs(5))
                .await
        );
    }
    for (lang, code) in [
        (Language::Python, "print('ok')"),
        (Language::Raw, "echo ok"),
    ] {
        let r = run(&sbx, lang, code).await;
        assert_eq!(r.stdout, "ok\n", "{lang}");
        assert_eq!(r.vm_start, sandbox_core::result::VmStart::Cold, "{lang}");
        assert!(
            sbx.scheduler()
                .wait_background(Duration::from_secs(180))
                .await,
            "{lang}: snapshot creation did not finish"
        );
        for i in 0..2 {
            let t = Instant::now();
            let r = run(&sbx, lang, code).await;
            eprintln!(
                "{lang} restore {i}: {} ms (boot {} ms), timing {:?}",
                t.elapsed().as_millis(),
                r.timing.boot_ms,
                r.timing
            );
            assert_eq!(r.stdout, "ok\n", "{lang}: {r:?}");
            assert_eq!(r.exit_code, 0);
            assert_eq!(
                r.vm_start,
                sandbox_core::result::VmStart::Snapshot,
                "{lang}"
            );
        }
    }
    // Sessions restore too, and work as booted ones do: state across execs, files.
    let s = sbx
        .scheduler()
        .session(SessionRequest::new(Language::Python), RunOptions::default())
        .await
        .unwrap();
    assert_eq!(s.vm_start(), sandbox_core::result::VmStart::Snapshot);
    s.write_bytes("in.txt", b"41", false).await.unwrap();
    let cb = OutputCallbacks::default();
    s.exec(ExecRequest::new("x = int(open('in.txt').read())"), &cb)
        .await
        .unwrap();
    let r = s.exec(ExecRequest::new("print(x + 1)"), &cb).await.unwrap();
    assert_eq!(r.stdout, "42\n");
    assert_eq!(s.read_bytes("in.txt").await.unwrap(), b"41");
    // A timeout in a restored session gives a fresh REPL, as in a booted one.
    let mut t = ExecRequest::new("import time; time.sleep(30)");
    t.timeout_secs = 1;
    assert_eq!(s.exec(t, &cb).await.unwrap().exit_code, -1);
    let r = s
        .exec(ExecRequest::new("print('alive')"), &cb)
        .await
        .unwrap();
    assert_eq!(r.stdout, "alive\n");
    s.close().await;
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 13 §3: two clones of one snapshot do not share randomness (kernel, Python,
/// bash) and their clocks are the host's, not the snapshot's (javascript is never
/// snapshotted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn clones_of_one_snapshot_diverge_and_keep_the_host_clock() {
    let dir = snapshot_dir("clones");
    let mut cfg = config(0);
    cfg.snapshot_dir = Some(dir.clone());
    let sbx = Sbx::start(cfg).await.unwrap();
    let cases = [
        (
            Language::Python,
            "import os, random, time; print(os.urandom(16).hex(), random.random(), time.time())",
        ),
        (
            Language::Raw,
            "echo $RANDOM $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n') $(date +%s.%N)",
        ),
    ];
    for (lang, code) in cases {
        let first = run(&sbx, lang, code).await;
        assert_eq!(first.exit_code, 0, "{lang}: {first:?}");
        assert!(
            sbx.scheduler()
                .wait_background(Duration::from_secs(180))
                .await,
            "{lang}: snapshot creation did not finish"
        );
        let mut outputs = Vec::new();
        for _ in 0..2 {
            let r = run(&sbx, lang, code).await;
            assert_eq!(r.exit_code, 0, "{lang}: {r:?}");
            assert_eq!(
                r.vm_start,
                sandbox_core::result::VmStart::Snapshot,
                "{lang}"
            );
            let host_now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            let fields: Vec<String> = r.stdout.split_whitespace().map(str::to_owned).collect();
            let guest_now: f64 = fields.last().unwrap().parse().unwrap();
            assert!(
                (host_now - guest_now).abs() < 2.0,
                "{lang}: guest clock {guest_now} vs host {host_now}"
            );
            outputs.push(fields[..fields.len() - 1].to_vec());
        }
        for (a, b) in outputs[0].iter().zip(&outputs[1]) {
            assert_ne!(a, b, "{lang}: two clones printed the same random value");
        }
        eprintln!("{lang}: clones printed {outputs:?}");
    }
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}
