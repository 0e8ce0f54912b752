//! `sbx session` under a real pseudo-terminal (the terminal is its controlling terminal, so
//! Ctrl-C is the kernel's SIGINT, as for a person typing), over real microVMs.
//! `#[ignore]`d in `cargo test`; run by `cargo xtask itest`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::pty::{Winsize, openpty};

mod common;
use common::{config, wait_no_qemu, work_dir};

/// A program on the slave side of a pty; the test types into the master side.
struct Pty {
    master: File,
    screen: Arc<Mutex<String>>,
    seen: usize,
    child: std::process::Child,
}

impl Pty {
    fn spawn(args: &[&str]) -> Self {
        let cfg = config(0);
        let size = Winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(&size, None).unwrap();
        let slave = File::from(pty.slave);
        // `setsid -c`: a new session whose controlling terminal is the pty (stdin).
        let child = Command::new("setsid")
            .arg("-c")
            .arg(env!("CARGO_BIN_EXE_sbx"))
            .args(args)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave))
            .env("TERM", "xterm")
            .env("SBX_ASSETS_DIR", &cfg.assets_dir)
            .env("SBX_WORK_DIR", work_dir())
            .env("SBX_SNAPSHOTS", "0")
            .spawn()
            .unwrap();
        let master = File::from(pty.master);
        let screen = Arc::new(Mutex::new(String::new()));
        let mut reader = master.try_clone().unwrap();
        let sink = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            master,
            screen,
            seen: 0,
            child,
        }
    }

    /// Waits until `needle` appears after what earlier waits consumed.
    fn expect(&mut self, needle: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            {
                let s = self.screen.lock().unwrap();
                if let Some(i) = s[self.seen..].find(needle) {
                    self.seen += i + needle.len();
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} not seen within {secs} s; the terminal shows:\n{}",
                &self.screen.lock().unwrap()[self.seen..]
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn send(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).unwrap();
        self.master.flush().unwrap();
    }

    fn wait(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "sbx session did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
fn an_interactive_python_session_keeps_state_survives_ctrl_c_and_closes_on_ctrl_d() {
    let mut t = Pty::spawn(&["session", "-l", "python"]);
    t.expect("Ctrl-D exits", 120);
    t.expect(">>> ", 10);
    // State is kept across inputs; a block continues until an empty line.
    t.send("x = 20\r");
    t.expect(">>> ", 30);
    t.send("def f(y):\r");
    t.expect("... ", 10);
    t.send("    return x + y\r");
    t.expect("... ", 10);
    t.send("\r");
    t.expect(">>> ", 30);
    t.send("print(f(22))\r");
    t.expect("42", 30);
    t.expect(">>> ", 30);
    // Line editing: Ctrl-A to the start of the line, then insert.
    t.send("(6*7)\x01print\r");
    t.expect("42", 30);
    t.expect(">>> ", 30);
    // Ctrl-C at the prompt clears the line and keeps the session.
    t.send("this is not python\x03");
    t.expect("^C", 10);
    t.expect(">>> ", 10);
    // Ctrl-C during an exec interrupts it; the session (its VM, its files) lives on.
    t.send("open('kept.txt', 'w').write('still here')\r");
    t.expect(">>> ", 30);
    t.send("import time; print('sleeping', flush=True); time.sleep(120)\r");
    t.expect("sleeping", 30);
    let interrupted = Instant::now();
    t.send("\x03");
    t.expect("KeyboardInterrupt", 20);
    t.expect(">>> ", 30);
    assert!(interrupted.elapsed() < Duration::from_secs(30));
    t.send("print(open('kept.txt').read())\r");
    t.expect("still here", 30);
    // The guest stopped the interrupted exec (else this one would have waited behind it
    // until its 30 s timeout).
    assert!(interrupted.elapsed() < Duration::from_secs(20));
    t.expect(">>> ", 30);
    // Errors are shown and the session goes on.
    t.send("1/0\r");
    t.expect("ZeroDivisionError", 30);
    t.expect(">>> ", 30);
    // Ctrl-D closes the session and destroys the VM.
    t.send("\x04");
    let status = t.wait(60);
    assert!(status.success(), "{status:?}");
    assert_eq!(wait_no_qemu(), 0, "sbx session left VMs behind");
}
