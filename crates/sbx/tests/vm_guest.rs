//! Guest behaviour over real microVMs (TCG here): `localhost`, the python image's tools,
//! multiprocessing with REPL-defined functions, background processes across execs, the
//! raw image's netcat, the home directory's size and full-disk errors, Python without the
//! int/str conversion limit, and the javascript image's Bun with TypeScript and REPL semantics.
//!
//! `#[ignore]`d in `cargo test`; run by `cargo xtask itest`. Once opted in, missing assets
//! or QEMU are failures, never silent passes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use sandbox_core::{
    ErrorKind, ExecRequest, Language, OutputCallbacks, RunOptions, RunRequest, SessionRequest,
};
use sbx::Sbx;
use serde_json::{Value, json};

mod common;
use common::{config, wait_no_qemu, work_dir};

async fn sbx() -> Sbx {
    Sbx::start(config(0)).await.expect("sbx starts")
}

async fn session(sbx: &Sbx, req: SessionRequest) -> sandbox_core::Session {
    sbx.scheduler()
        .session(req, RunOptions::default())
        .await
        .unwrap()
}

async fn exec_t(
    s: &sandbox_core::Session,
    code: &str,
    timeout: u32,
) -> sandbox_core::ExecutionResult {
    let mut req = ExecRequest::new(code);
    req.timeout_secs = timeout;
    s.exec(req, &OutputCallbacks::default())
        .await
        .unwrap_or_else(|e| panic!("exec {code:?}: {e}"))
}

async fn exec(s: &sandbox_core::Session, code: &str) -> sandbox_core::ExecutionResult {
    let r = exec_t(s, code, 60).await;
    assert_eq!(
        r.exit_code, 0,
        "{code:?}: stdout {:?} stderr {:?}",
        r.stdout, r.stderr
    );
    r
}

fn pids(out: &str) -> Vec<u32> {
    out.split_whitespace().map(|p| p.parse().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn localhost_reaches_guest_servers_from_every_runtime() {
    let sbx = sbx().await;

    // Python: a server on 0.0.0.0 (in a thread of the REPL), fetched through localhost.
    let s = session(&sbx, SessionRequest::new(Language::Python)).await;
    exec(
        &s,
        "import http.server, threading, socket\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       self.send_response(200); self.end_headers(); self.wfile.write(b'py-ok')\n\
         \x20   def log_message(self, *a): pass\n\
         srv = http.server.HTTPServer(('0.0.0.0', 8123), H)\n\
         threading.Thread(target=srv.serve_forever, daemon=True).start()",
    )
    .await;
    let r = exec(
        &s,
        "import urllib.request, socket\n\
         print(urllib.request.urlopen('http://localhost:8123/', timeout=10).read().decode())\n\
         print(sorted({a[4][0] for a in socket.getaddrinfo('localhost', 80)}))",
    )
    .await;
    assert_eq!(r.stdout, "py-ok\n['127.0.0.1']\n");
    s.close().await;

    // JavaScript: servers on 0.0.0.0 and on the default host, fetched through localhost.
    let s = session(&sbx, SessionRequest::new(Language::Javascript)).await;
    exec(
        &s,
        "const http = require('http');\n\
         http.createServer((q, r) => r.end('js-ok')).listen(8124, '0.0.0.0');\n\
         http.createServer((q, r) => r.end('any-ok')).listen(8125);\n\
         await new Promise((r) => setTimeout(r, 200));",
    )
    .await;
    let r = exec(
        &s,
        "console.log(await (await fetch('http://localhost:8124/')).text());\n\
         console.log(await (await fetch('http://localhost:8125/')).text());\n\
         const { address } = await require('dns').promises.lookup('localhost');\n\
         console.log(address);",
    )
    .await;
    assert_eq!(r.stdout, "js-ok\nany-ok\n127.0.0.1\n");
    s.close().await;

    // Shell: netcat (every image has it) through localhost to a listener on 0.0.0.0.
    let r = sbx
        .scheduler()
        .run(
            RunRequest::new(
                Language::Raw,
                "nc -4 -l 8126 > /tmp/got & sleep 0.5\n\
                 echo hello-nc | nc -N -w 5 localhost 8126\n\
                 wait; cat /tmp/got",
            ),
            RunOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.stdout.as_str(), r.exit_code),
        ("hello-nc\n", 0),
        "{}",
        r.stderr
    );
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn python_image_has_python_uv_and_pickles_repl_functions() {
    let sbx = sbx().await;
    let s = session(&sbx, SessionRequest::new(Language::Python)).await;
    let r = exec(
        &s,
        "import subprocess\n\
         print(subprocess.run(['python', '-c', 'import sys; print(sys.version_info[0])'], capture_output=True, text=True).stdout.strip())\n\
         print(subprocess.run(['uv', '--version'], capture_output=True, text=True).stdout.split()[0])\n\
         print(subprocess.run(['uvx', '--version'], capture_output=True, text=True).returncode)",
    )
    .await;
    assert_eq!(r.stdout, "3\nuv\n0\n");
    // Lambdas and closures defined in the REPL reach Pool workers and spawned Processes.
    let r = exec(
        &s,
        "from multiprocessing import Pool, get_context\n\
         with Pool(2) as p:\n\
         \x20   print(p.map(lambda x: x + 1, [1, 2, 3]))\n\
         def make(n):\n\
         \x20   return lambda x: x * n\n\
         with Pool(2) as p:\n\
         \x20   print(p.map(make(3), [1, 2]))\n\
         k = 21\n\
         ctx = get_context('spawn')\n\
         q = ctx.Queue()\n\
         pr = ctx.Process(target=lambda q: q.put(k * 2), args=(q,))\n\
         pr.start(); print(q.get(timeout=60)); pr.join(); print(pr.exitcode)",
    )
    .await;
    assert_eq!(r.stdout, "[2, 3, 4]\n[3, 6]\n42\n0\n");
    s.close().await;
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn background_processes_live_until_the_session_ends_unless_their_exec_timed_out() {
    let sbx = sbx().await;

    // Python: a double-forked daemon and a plain Popen child.
    let s = session(&sbx, SessionRequest::new(Language::Python)).await;
    let spawn = "import os, subprocess, time\n\
                 r, w = os.pipe()\n\
                 if os.fork() == 0:\n\
                 \x20   os.setsid()\n\
                 \x20   if os.fork() == 0:\n\
                 \x20       os.write(w, str(os.getpid()).encode()); os.close(w)\n\
                 \x20       while True: time.sleep(1)\n\
                 \x20   os._exit(0)\n\
                 os.close(w); daemon = int(os.read(r, 32)); os.close(r)\n\
                 child = subprocess.Popen(['sleep', '600'])\n\
                 print(daemon, child.pid, flush=True)";
    let old = pids(&exec(&s, spawn).await.stdout);
    let alive = |ps: &[u32]| {
        format!(
            "import os\n\
             def alive(p):\n\
             \x20   try:\n\
             \x20       os.kill(p, 0); return 1\n\
             \x20   except ProcessLookupError:\n\
             \x20       return 0\n\
             print(*[alive(p) for p in {ps:?}])"
        )
    };
    assert_eq!(exec(&s, &alive(&old)).await.stdout, "1 1\n");
    // An exec that times out takes its own processes (daemon included) along, not the
    // older ones.
    let r = exec_t(&s, &format!("{spawn}\ntime.sleep(60)"), 3).await;
    assert_eq!(r.exit_code, -1, "{}", r.stderr);
    let timed_out = pids(&r.stdout);
    assert_eq!(timed_out.len(), 2, "{}", r.stdout);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = exec(&s, &alive(&[old.clone(), timed_out].concat())).await;
    assert_eq!(r.stdout, "1 1 0 0\n");
    s.close().await;

    // Shell: nohup, setsid and setsid --fork daemons.
    let s = session(&sbx, SessionRequest::new(Language::Raw)).await;
    let r = exec(
        &s,
        "nohup sleep 600 >/dev/null 2>&1 & echo $!\n\
         setsid sleep 600 >/dev/null 2>&1 </dev/null & echo $!\n\
         setsid -f sh -c 'echo $$ > /tmp/forked; exec sleep 600' >/dev/null 2>&1 </dev/null\n\
         sleep 0.3; cat /tmp/forked",
    )
    .await;
    let sh = pids(&r.stdout);
    assert_eq!(sh.len(), 3, "{}", r.stdout);
    let check = format!(
        "for p in {}; do kill -0 $p 2>/dev/null && echo 1 || echo 0; done",
        sh.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
    );
    assert_eq!(exec(&s, &check).await.stdout, "1\n1\n1\n");
    let r = exec_t(
        &s,
        "setsid sleep 600 >/dev/null 2>&1 </dev/null & echo $!; sleep 60",
        3,
    )
    .await;
    assert_eq!(r.exit_code, -1);
    let gone = pids(&r.stdout);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = exec(
        &s,
        &format!(
            "{check}; kill -0 {} 2>/dev/null && echo 1 || echo 0",
            gone[0]
        ),
    )
    .await;
    assert_eq!(r.stdout, "1\n1\n1\n0\n");
    // The REPL dying on its own (exit) is not a timeout: the daemons stay.
    assert_eq!(exec_t(&s, "exit 3", 10).await.exit_code, 3);
    assert_eq!(exec(&s, &check).await.stdout, "1\n1\n1\n");
    s.close().await;

    // JavaScript: a detached child.
    let s = session(&sbx, SessionRequest::new(Language::Javascript)).await;
    let r = exec(
        &s,
        "const c = require('child_process').spawn('sleep', ['600'], { detached: true, stdio: 'ignore' });\n\
         c.unref(); console.log(c.pid);",
    )
    .await;
    let js = pids(&r.stdout);
    let r = exec(
        &s,
        &format!(
            "try {{ process.kill({}, 0); console.log(1); }} catch (e) {{ console.log(0); }}",
            js[0]
        ),
    )
    .await;
    assert_eq!(r.stdout, "1\n");
    s.close().await;
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn home_size_full_disk_errors_and_disk_backed_homes() {
    let sbx = sbx().await;
    let mb20 = vec![7u8; 20 * 1024 * 1024];

    // Default: a tmpfs home of 40 % of the guest memory; a full one is a typed error
    // that keeps the session.
    let mut req = SessionRequest::new(Language::Python);
    req.memory_mb = 128;
    let s = session(&sbx, req).await;
    let r = exec(
        &s,
        "import os; st = os.statvfs('.'); print(st.f_blocks * st.f_frsize // 2**20)",
    )
    .await;
    let home_mb: u64 = r.stdout.trim().parse().unwrap();
    assert!(
        (40..=60).contains(&home_mb),
        "home of a 128 MB VM: {home_mb} MB"
    );
    let mut failed = None;
    for i in 0..3 {
        if let Err(e) = s.write_bytes(&format!("f{i}.bin"), &mb20, false).await {
            failed = Some(e);
            break;
        }
    }
    let err = failed.expect("three 20 MB files do not fit a 128 MB VM's home");
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    assert!(err.to_string().contains("disk_mb"), "{err}");
    assert!(!s.is_closed(), "a full disk keeps the session");
    assert_eq!(exec(&s, "print('alive')").await.stdout, "alive\n");
    s.close().await;

    // disk_mb: an ext4 home of that size, whatever the memory; the 500 MB file limit is
    // reachable.
    let mut req = SessionRequest::new(Language::Python);
    req.memory_mb = 128;
    req.disk_mb = Some(600);
    let started = Instant::now();
    let s = session(&sbx, req).await;
    let boot = started.elapsed();
    let r = exec(
        &s,
        "import os; st = os.statvfs('.'); print(st.f_blocks * st.f_frsize // 2**20, os.listdir('.'), os.stat('.').st_uid)",
    )
    .await;
    let (size, rest) = r.stdout.trim().split_once(' ').unwrap();
    let size: u64 = size.parse().unwrap();
    assert!(
        (560..=600).contains(&size),
        "disk_mb 600 gave {size} MB ({boot:?} to boot)"
    );
    assert!(!rest.contains("lost+found"), "{rest}");
    assert!(rest.ends_with(" 1000"), "home owned by the user: {rest}");
    for i in 0..3 {
        s.write_bytes(&format!("f{i}.bin"), &mb20, false)
            .await
            .unwrap();
    }
    let big = 500 * 1024 * 1024u64;
    let mut zeros = tokio::io::AsyncReadExt::take(tokio::io::repeat(0), big);
    assert_eq!(
        s.write_file("big.bin", &mut zeros, false).await.unwrap(),
        big
    );
    let r = exec(&s, "import os; print(os.path.getsize('big.bin'))").await;
    assert_eq!(r.stdout.trim(), big.to_string());
    s.close().await;
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn http_full_home_is_507_and_disk_mb_is_validated() {
    let sbx = sbx().await;
    let srv = sbx::serve::spawn_for_test(sbx.scheduler().clone())
        .await
        .unwrap();
    let c = reqwest::Client::new();
    let r = c
        .post(srv.url("/v1/sessions"))
        .bearer_auth(&srv.token)
        .json(&json!({"language": "python", "disk_mb": 8}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["field"], "disk_mb", "{v}");

    let r = c
        .post(srv.url("/v1/sessions"))
        .bearer_auth(&srv.token)
        .json(&json!({"language": "python", "memory": 128}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut last = None;
    for i in 0..3 {
        let r = c
            .put(srv.url(&format!("/v1/sessions/{id}/files/f{i}.bin")))
            .bearer_auth(&srv.token)
            .body(vec![1u8; 20 * 1024 * 1024])
            .send()
            .await
            .unwrap();
        if !r.status().is_success() {
            last = Some((r.status(), r.json::<Value>().await.unwrap()));
            break;
        }
    }
    let (status, v) = last.expect("the third 20 MB upload fails");
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{v}");
    assert_eq!(v["error"]["kind"], "no_space", "{v}");
    srv.shutdown().await.unwrap();
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}

#[test]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
fn cli_disk_option_is_checked_before_any_vm_work() {
    config(0);
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_sbx"))
        .env("SBX_LOG", "error")
        .env("SBX_WORK_DIR", work_dir())
        .env("SBX_SNAPSHOTS", "0")
        .args(["--disk", "10", "print(1)"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("disk_mb"));
    assert!(started.elapsed() < Duration::from_secs(5));
    let out = Command::new(env!("CARGO_BIN_EXE_sbx"))
        .env("SBX_LOG", "error")
        .env("SBX_WORK_DIR", work_dir())
        .env("SBX_SNAPSHOTS", "0")
        .args([
            "-q",
            "--disk",
            "100",
            "-l",
            "raw",
            "df -m --output=size /home/user | tail -1",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let size: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!((90..=100).contains(&size), "{size}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn python_has_no_int_str_conversion_limit_unless_the_user_sets_one() {
    let sbx = sbx().await;
    let s = session(&sbx, SessionRequest::new(Language::Python)).await;
    let r = exec(&s, "print(len(str(10**100000)))").await;
    assert_eq!(r.stdout, "100001\n");
    exec(&s, "import sys; sys.set_int_max_str_digits(4300)").await;
    let r = exec_t(&s, "str(10**5000)", 60).await;
    assert_eq!(r.exit_code, 1, "{r:?}");
    assert!(r.stderr.contains("Exceeds the limit"), "{}", r.stderr);
    exec(&s, "sys.set_int_max_str_digits(0)").await;
    assert_eq!(exec(&s, "print(len(str(10**5000)))").await.stdout, "5001\n");
    s.close().await;
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}

/// The exec's completion signal is out of user code's reach: Python code that reads the
/// request id from the wrapper's own frame and writes `<id> 0` to the status pipe does
/// not end its exec while it keeps running (adversarial).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn adversarial_forged_completion_does_not_end_an_exec() {
    let sbx = sbx().await;
    let s = session(&sbx, SessionRequest::new(Language::Python)).await;
    let started = Instant::now();
    let r = exec_t(
        &s,
        "import os, sys, time\n\
         req = sys._getframe(1).f_locals['req']\n\
         os.write(4, ('%s 0\\n' % req['id']).encode())\n\
         time.sleep(2)\n\
         print('still-running')\n\
         sys.exit(3)",
        60,
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        (r.stdout.as_str(), r.exit_code),
        ("still-running\n", 3),
        "{}",
        r.stderr
    );
    // The session is intact afterwards.
    assert_eq!(exec(&s, "print(6 * 7)").await.stdout, "42\n");
    s.close().await;
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn javascript_is_bun_with_typescript_and_repl_semantics() {
    let sbx = sbx().await;
    let s = session(&sbx, SessionRequest::new(Language::Javascript)).await;
    // The runtime is the pinned Bun; `node` in the image is Bun too.
    let r = exec(
        &s,
        "console.log(Bun.version, require('child_process').execFileSync('node', ['-e', 'console.log(typeof Bun)']).toString().trim())",
    )
    .await;
    assert_eq!(r.stdout, "1.4.5 object\n");
    // TypeScript, types erased.
    let r = exec(
        &s,
        "enum Color { Red, Green = 5 }\n\
         interface Point { x: number; y?: number }\n\
         const id = <T,>(x: T): T => x;\n\
         class Box<T> { constructor(public value: T) {} }\n\
         const p: Point = { x: 1 };\n\
         const o = JSON.parse('{\"a\":{\"b\":2}}') as { a?: { b?: number }; z?: { y: number } };\n\
         const n: number = await Promise.resolve(40);\n\
         console.log(Color.Green, id<string>('s'), new Box(3).value, p.y ?? 'none', o?.a?.b, o.z?.y, n + 2);",
    )
    .await;
    assert_eq!(r.stdout, "5 s 3 none 2 undefined 42\n");
    // let/const again in a later exec; what the first declared is still there.
    let r = exec(&s, "let n = 1; const p = 2; console.log(n + p, Color.Red)").await;
    assert_eq!(r.stdout, "3 0\n");
    // import(): built-in modules, computed specifiers and packages, as require has them.
    let r = exec(
        &s,
        "const fs = require('fs');\n\
         fs.mkdirSync('node_modules/sbx-fixture', { recursive: true });\n\
         fs.writeFileSync('node_modules/sbx-fixture/package.json', '{\"name\":\"sbx-fixture\",\"main\":\"index.js\"}');\n\
         fs.writeFileSync('node_modules/sbx-fixture/index.js', 'module.exports = { answer: 42 }');\n\
         const path = await import('node:path');\n\
         const spec = ['node', 'os'].join(':');\n\
         const os = await import(spec);\n\
         const fx = await import('sbx-fixture');\n\
         const s = \"import('x')\"; function reimport() { return 7 }\n\
         console.log(path.default === require('node:path'), os.default === require(spec), fx.default === require('sbx-fixture'), fx.default.answer, s, reimport());",
    )
    .await;
    assert_eq!(r.stdout, "true true true 42 import('x') 7\n");
    // Bad input: a non-zero exit with the error on stderr, and the session goes on.
    for (code, want) in [
        ("let x: = 1", "SyntaxError"),
        (
            "await Promise.reject(new Error('it rejected'))",
            "it rejected",
        ),
        (
            "await import('no-such-module-sbx')",
            "Cannot find module 'no-such-module-sbx'",
        ),
        ("require = null; require('fs')", "TypeError"),
        ("import = 5", "SyntaxError"),
    ] {
        let r = exec_t(&s, code, 60).await;
        assert_eq!(r.exit_code, 1, "{code}: {r:?}");
        assert!(r.stderr.contains(want), "{code}: {}", r.stderr);
    }
    let r = exec(
        &s,
        "process.stdout.write('y'.repeat(300000)); console.log(typeof require('fs').readFileSync, n)",
    )
    .await;
    assert_eq!(r.stdout.len(), 300_000 + "function 1\n".len());
    assert!(r.stdout.ends_with("function 1\n"));
    s.close().await;
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}

/// User code can neither read the kernel log (`/dev/kmsg`, `dmesg`, `/proc/kmsg`,
/// `syslog(2)`) nor write forged kernel lines into it or onto the console the host reads
/// (adversarial).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
async fn adversarial_user_code_cannot_touch_the_kernel_log() {
    let sbx = sbx().await;
    let code = r#"
timeout 2 head -c 1 /dev/kmsg >/dev/null 2>&1 && echo kmsg-readable || echo kmsg-unreadable
{ echo '<0>forged kernel line' > /dev/kmsg; } 2>/dev/null && echo kmsg-writable || echo kmsg-unwritable
dmesg >/dev/null 2>&1 && echo dmesg-works || echo dmesg-denied
timeout 2 head -c 1 /proc/kmsg >/dev/null 2>&1 && echo proc-kmsg-readable || echo proc-kmsg-unreadable
for c in /dev/console /dev/hvc0 /dev/ttyS0 /dev/tty0; do
  { echo forged > $c; } 2>/dev/null && echo "$c writable"
done
python3 -c 'import ctypes, os; b = ctypes.create_string_buffer(4096); print("syslog", ctypes.CDLL(None).klogctl(3, b, 4096))' 2>/dev/null || true
echo end
"#;
    let r = sbx
        .scheduler()
        .run(RunRequest::new(Language::Raw, code), RunOptions::default())
        .await
        .unwrap();
    let out = r.stdout;
    for want in [
        "kmsg-unreadable\n",
        "kmsg-unwritable\n",
        "dmesg-denied\n",
        "proc-kmsg-unreadable\n",
        "end\n",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(
        !out.contains("writable\n/") && !out.contains(" writable"),
        "{out}"
    );
    assert!(
        !out.contains("syslog ") || out.contains("syslog -1"),
        "{out}"
    );
    sbx.stop().await;
    assert_eq!(wait_no_qemu(), 0);
}
