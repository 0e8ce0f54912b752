//! The `sbx` binary end to end: the networking flags `--expose`, `--network` and
//! `--allow-domain`, and their usage errors.
//!
//! The VM tests need QEMU and the guest assets, so they are `#[ignore]`d in `cargo test`;
//! run them with `cargo test -p sbx --test vm_cli -- --ignored --test-threads 1`. Every
//! command runs with this test binary's own `SBX_WORK_DIR`. The CLI uses the production
//! proxy settings (the host's resolver, no loopback upstreams), so nothing here depends on
//! names resolving: this machine may have no outside network at all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{vm_dirs, wait_no_qemu, work_dir};

/// The CLI with this binary's work dir, logs as given by `log` (errors only by default).
fn sbx_cli(log: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sbx"));
    c.env("SBX_LOG", log)
        .env("NO_COLOR", "1")
        .env("SBX_WORK_DIR", work_dir())
        .env("SBX_SNAPSHOTS", "0")
        .env_remove("SBX_WARM_POOL");
    c
}

/// Nothing of the run is left: no QEMU, no VM work dir.
fn assert_cleaned_up() {
    assert_eq!(wait_no_qemu(), 0, "QEMU processes left");
    assert_eq!(vm_dirs(work_dir()), 0, "VM work dirs left");
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Log lines without ANSI colour sequences (in case the formatter adds them anyway).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The proxy's log lines (`SBX_LOG=netproxy=info`) that name the DNS name `name`.
fn log_lines_for<'a>(log: &'a str, name: &str) -> Vec<&'a str> {
    let field = format!("name=\"{name}\"");
    log.lines().filter(|l| l.contains(&field)).collect()
}

/// The allowlist refused `name` at the gateway's DNS.
fn assert_name_denied(log: &str, name: &str) {
    let lines = log_lines_for(log, name);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("network: denied") && l.contains("reason=\"name_not_allowed\"")),
        "no name_not_allowed denial for {name} in:\n{log}"
    );
}

/// The gateway's DNS passed `name` on to the host's resolver (whatever that answered on
/// this machine: addresses, "no such name" or a failure) instead of refusing it.
fn assert_name_sent_upstream(log: &str, name: &str) {
    let lines = log_lines_for(log, name);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("network: allowed") || l.contains("dns: upstream")),
        "{name} was not resolved upstream:\n{log}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("network: denied")),
        "{name} was refused:\n{log}"
    );
}

/// Python: `dns_rcode(name)` sends one A query straight to the gateway and prints
/// `rcode NAME R` or `rcode NAME fail <ErrorClass>`; `probe_connect(host, port)` prints
/// `connect HOST:PORT ok|fail <ErrorClass>`; `ifaces` lists the guest's interfaces.
const PY_NET: &str = r#"
import os, random, socket, struct

def ifaces():
    names = sorted(n for n in os.listdir("/sys/class/net") if not n.startswith("sit"))
    print("ifaces", ",".join(names), flush=True)

def dns_rcode(name, timeout=10):
    head = struct.pack(">HHHHHH", random.randrange(1 << 16), 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(l)]) + l.encode() for l in name.split("."))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.connect(("192.168.127.1", 53))
        s.send(head + labels + b"\0" + struct.pack(">HH", 1, 1))
        print(f"rcode {name} {s.recv(512)[3] & 15}", flush=True)
    except OSError as e:
        print(f"rcode {name} fail {type(e).__name__}", flush=True)
    finally:
        s.close()

def probe_connect(host, port):
    try:
        socket.create_connection((host, port), timeout=5).close()
        print(f"connect {host}:{port} ok", flush=True)
    except OSError as e:
        print(f"connect {host}:{port} fail {type(e).__name__}", flush=True)
"#;

fn assert_lines(out: &str, want: &[&str]) {
    for w in want {
        assert!(
            out.lines().any(|l| l == *w),
            "missing line {w:?} in:\n{out}"
        );
    }
}

/// Reads `r` line by line on a thread; the channel closes at EOF.
fn line_channel(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads `r` to the end on a thread.
fn collect(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// `--expose 53/udp` and malformed `--expose`/`--allow-domain` values are usage errors
/// (exit status 2) found before anything is set up: with assets that do not exist, getting
/// any further would end in status 125 instead, and the work dir would be created.
#[test]
fn network_flag_usage_errors_exit_2_before_any_vm() {
    let work = PathBuf::from(format!("{}-usage", work_dir().display()));
    let cases: &[(&[&str], &str)] = &[
        (&["--expose", "53/udp"], "UDP forwards are not implemented"),
        (
            &["--expose", "8000:5353/UDP"],
            "UDP forwards are not implemented",
        ),
        (&["--expose", "http"], "not a port number"),
        (&["--expose", "0"], "internal port must be 1-65535"),
        (&["--expose", "70000"], "not a port number"),
        (&["--expose", "8000:80"], "must be 1024-65535"),
        (&["--expose", "8000/sctp"], "protocol must be"),
        (&["--expose", "8000:"], "not a port number"),
        (&["--expose", ""], "not a port number"),
        (&["--allow-domain", "1.2.3.4"], "invalid domain"),
        (&["--allow-domain", "localhost"], "invalid domain"),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_sbx"))
            .env("SBX_WORK_DIR", &work)
            .env("SBX_ASSETS_DIR", "/nonexistent/sbx-assets")
            .env("SBX_LOG", "error")
            .args(["run", "-q"])
            .args(*args)
            .arg("print(1)")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("{:?}", args[1])),
            "{args:?}: the message names the value: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    assert!(!work.exists(), "a usage error set up a sandbox work dir");
}

/// Every input rule, the language-dependent ones included (shell variable names for raw
/// code), is checked before any VM work: exit status 2, no work dir, with assets that do
/// not exist (getting any further would end in status 125).
#[test]
fn input_errors_exit_2_before_any_vm() {
    let work = PathBuf::from(format!("{}-input", work_dir().display()));
    let file = std::env::temp_dir().join(format!("sbx-input-{}.txt", std::process::id()));
    std::fs::write(&file, b"x").unwrap();
    let up_escape = format!("{}:../x", file.display());
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["-l", "raw", "-e", "BAD-KEY=1"],
            "echo hi",
            "not a valid shell variable name",
        ),
        (
            vec!["-l", "RAW", "-e", "1X=1"],
            "echo hi",
            "shell variable name",
        ),
        (vec!["-e", "LD_PRELOAD=/x.so"], "print(1)", "not allowed"),
        (vec!["-e", "NOEQUALS"], "print(1)", "NOEQUALS"),
        (vec!["-t", "0"], "print(1)", "timeout"),
        (vec!["-m", "64"], "print(1)", "memory"),
        (vec!["--upload", "no-colon"], "print(1)", "LOCAL:GUEST"),
        (
            vec!["--upload", "/nonexistent/sbx-file:x"],
            "print(1)",
            "no such file",
        ),
        (vec!["--upload", &up_escape], "print(1)", "escapes"),
        (vec!["--download", "/etc/passwd"], "print(1)", "relative"),
    ];
    for (args, code, want) in &cases {
        let out = Command::new(env!("CARGO_BIN_EXE_sbx"))
            .env("SBX_WORK_DIR", &work)
            .env("SBX_ASSETS_DIR", "/nonexistent/sbx-assets")
            .env("SBX_LOG", "error")
            .args(["run", "-q"])
            .args(args)
            .arg(code)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // Python and JavaScript take names a shell cannot: only raw refuses them.
    let out = Command::new(env!("CARGO_BIN_EXE_sbx"))
        .env("SBX_WORK_DIR", &work)
        .env("SBX_ASSETS_DIR", "/nonexistent/sbx-assets")
        .env("SBX_LOG", "error")
        .args(["run", "-q", "-e", "BAD-KEY=1", "print(1)"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(125),
        "python with BAD-KEY gets past input checks"
    );
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_dir_all(&work);
}

/// `sbx run` twice: the first boots cold and waits (after its output) for the L1 snapshot
/// it started; the second restores from it and says so.
#[test]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
fn a_second_sbx_run_restores_from_the_snapshot_the_first_made() {
    use std::os::unix::fs::PermissionsExt;
    let snaps = PathBuf::from(format!("{}-cli-snapshots", work_dir().display()));
    let _ = std::fs::remove_dir_all(&snaps);
    std::fs::create_dir_all(&snaps).unwrap();
    std::fs::set_permissions(&snaps, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut starts = Vec::new();
    for _ in 0..2 {
        let out = sbx_cli("error")
            .env("SBX_SNAPSHOTS", "1")
            .env("SBX_SNAPSHOT_DIR", &snaps)
            .args(["run", "-q", "--json", "-l", "raw", "echo ok"])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["stdout"], "ok\n");
        starts.push(v["vm_start"].as_str().unwrap().to_owned());
    }
    assert_eq!(starts, ["cold", "snapshot"]);
    assert_cleaned_up();
    let _ = std::fs::remove_dir_all(&snaps);
}

/// `--expose INTERNAL:EXTERNAL` alone (ports-only): a one-request HTTP server in the guest
/// answers the test on 127.0.0.1:EXTERNAL, while every guest-initiated connection and DNS
/// query is refused; the listener is gone once the command has exited.
#[test]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
fn expose_serves_the_host_while_outbound_is_blocked() {
    common::config(0);
    let external = free_port();
    let code = format!(
        "{PY_NET}\n{}",
        r#"
ifaces()
try:
    socket.gethostbyname("example.com")
    print("dns example.com ok", flush=True)
except OSError:
    print("dns example.com fail", flush=True)
dns_rcode("example.com")
probe_connect("192.168.127.1", 80)
probe_connect("203.0.113.1", 443)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8000))
srv.listen(1)
print("listening", flush=True)
conn, peer = srv.accept()
req = b""
while b"\r\n\r\n" not in req:
    chunk = conn.recv(1024)
    if not chunk:
        break
    req += chunk
body = b"hello from the guest via sbx --expose\n"
conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
conn.close()
print("served", req.split(b"\r\n")[0].decode(), "from", peer[0], flush=True)
"#
    );
    let started = Instant::now();
    let mut child = sbx_cli("error")
        .args(["run", "-q", "-t", "120", "--expose"])
        .arg(format!("8000:{external}"))
        .arg(&code)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = line_channel(child.stdout.take().unwrap());
    let stderr = collect(child.stderr.take().unwrap());

    // The guest's own "listening" line (streamed: no --json) says when to connect.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut out = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if l == "listening" => break,
            Ok(l) => {
                out.push_str(&l);
                out.push('\n');
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "no \"listening\" from the guest ({e}); stdout:\n{out}\nstderr:\n{}",
                    stderr.join().unwrap()
                );
            }
        }
    }
    let listening_after = started.elapsed();
    assert_lines(
        &out,
        &[
            "ifaces eth0,lo",
            "dns example.com fail",
            // REFUSED (5): ports-only answers no name.
            "rcode example.com 5",
            "connect 192.168.127.1:80 fail ConnectionRefusedError",
            "connect 203.0.113.1:443 fail ConnectionRefusedError",
        ],
    );

    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, external)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"GET /hello HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.0 200 OK\r\n"), "{resp}");
    assert!(
        resp.ends_with("\r\n\r\nhello from the guest via sbx --expose\n"),
        "{resp}"
    );

    let status = child.wait().unwrap();
    let rest: Vec<String> = lines.iter().collect();
    let stderr = stderr.join().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "stdout:\n{rest:?}\nstderr:\n{stderr}"
    );
    // The guest saw the request come from the gateway.
    assert_eq!(
        rest,
        ["served GET /hello HTTP/1.0 from 192.168.127.1"],
        "{stderr}"
    );
    eprintln!(
        "sbx --expose: guest listening after {:.1} s, command done after {:.1} s",
        listening_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let after = TcpStream::connect((Ipv4Addr::LOCALHOST, external));
    assert_eq!(
        after.map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionRefused),
        "the forward's listener outlived the command"
    );
    assert_cleaned_up();
}

/// `--json` reports every exposed port (an OS-chosen and an explicit one), and repeated
/// `--allow-domain` flags build the allowlist: the guest has eth0, a name outside the list
/// is NXDOMAIN at the gateway, names on it (and their subdomains) go to the host's
/// resolver (`SBX_LOG=netproxy=info` shows the proxy's decisions).
#[test]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
fn json_reports_exposed_ports_and_allow_domain_builds_the_allowlist() {
    common::config(0);
    let external = free_port();
    let code = format!(
        "{PY_NET}\n{}",
        r#"
ifaces()
print("resolv", open("/etc/resolv.conf").read().split("\n")[1])
dns_rcode("denied.test")
try:
    socket.gethostbyname("denied.test")
    print("dns denied.test ok")
except OSError:
    print("dns denied.test fail")
dns_rcode("allowed.test")
dns_rcode("www.second.test")
probe_connect("203.0.113.1", 443)
"#
    );
    let started = Instant::now();
    let out = sbx_cli("netproxy=info")
        .args(["run", "--json", "-t", "120"])
        .args([
            "--allow-domain",
            "allowed.test",
            "--allow-domain",
            "second.test",
        ])
        .args(["--expose", "8000", "--expose"])
        .arg(format!("9000:{external}"))
        .arg(&code)
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let log = strip_ansi(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{log}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["exit_code"], 0, "{v}");
    let ports = v["exposed_ports"].as_array().expect("exposed_ports");
    assert_eq!(ports.len(), 2, "{v}");
    assert_eq!(ports[0]["internal"], 8000);
    let auto = ports[0]["external"].as_u64().expect("external port");
    assert_ne!(auto, 0, "{v}");
    assert_eq!(ports[1]["internal"], 9000);
    assert_eq!(ports[1]["external"], external);
    for p in ports {
        assert_eq!(p["host"], "127.0.0.1", "{v}");
        assert_eq!(p["protocol"], "tcp", "{v}");
        assert_eq!(
            p["url"],
            format!("http://127.0.0.1:{}", p["external"].as_u64().unwrap()),
            "{v}"
        );
    }

    let stdout = v["stdout"].as_str().unwrap();
    assert_lines(
        stdout,
        &[
            "ifaces eth0,lo",
            "resolv nameserver 192.168.127.1",
            // NXDOMAIN (3) from the policy, without asking anyone.
            "rcode denied.test 3",
            "dns denied.test fail",
            "connect 203.0.113.1:443 fail ConnectionRefusedError",
        ],
    );
    assert_name_denied(&log, "denied.test");
    // Both flags count, the second one with its subdomains.
    assert_name_sent_upstream(&log, "allowed.test");
    assert_name_sent_upstream(&log, "www.second.test");
    eprintln!(
        "sbx --allow-domain: the host's resolver answered {}; {:.1} s",
        stdout
            .lines()
            .filter(|l| l.starts_with("rcode ") && !l.contains("denied"))
            .collect::<Vec<_>>()
            .join(", "),
        elapsed.as_secs_f64()
    );
    assert_cleaned_up();
}

/// The host's own IPv4 addresses other than loopback.
fn host_addresses() -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().unwrap() {
        if let Some(a) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            let ip = a.ip();
            if !ip.is_loopback() && !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

/// `--network` alone is open mode: the guest has eth0 and DNS passes any name to the
/// host's resolver, but the host's own addresses stay out of reach (the test's listener on
/// all of them sees nothing).
#[test]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
fn network_flag_opens_dns_but_never_the_host() {
    common::config(0);
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let hosts = host_addresses();
    let probes: String = hosts
        .iter()
        .map(|h| format!("probe_connect(\"{h}\", {port})\n"))
        .collect();
    let code = format!(
        "{PY_NET}\nifaces()\ndns_rcode(\"denied.test\")\nprobe_connect(\"192.168.127.1\", 80)\n{probes}"
    );
    let out = sbx_cli("netproxy=info")
        .args(["run", "-q", "-t", "120", "--network"])
        .arg(&code)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = strip_ansi(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{log}");
    assert_lines(
        &stdout,
        &[
            "ifaces eth0,lo",
            "connect 192.168.127.1:80 fail ConnectionRefusedError",
        ],
    );
    // No allowlist: the name is resolved on the host, not refused.
    assert_name_sent_upstream(&log, "denied.test");
    for h in &hosts {
        assert_lines(
            &stdout,
            &[&format!("connect {h}:{port} fail ConnectionRefusedError")],
        );
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("dst={h}:{port}"))
                    && l.contains("reason=\"host_address\"")),
            "no host_address denial for {h}:\n{log}"
        );
    }
    assert_eq!(
        listener.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::WouldBlock),
        "a guest connection reached the host"
    );
    eprintln!("sbx --network: host addresses probed: {hosts:?}");
    assert_cleaned_up();
}

/// Shell completions, man pages and the OpenAPI document come from the CLI itself, with
/// no VM and no assets; a bad `sbx session` language and a bad `--ready-fd` are usage
/// errors.
#[test]
fn completions_man_pages_openapi_and_usage_errors_need_no_vm() {
    let sbx = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sbx"));
        c.env("SBX_ASSETS_DIR", "/nonexistent/sbx-assets")
            .env("SBX_LOG", "error");
        c
    };
    let out = sbx().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "_sbx()",
        "session",
        "mcp",
        "serve",
        "--ready-fd",
        "--allow-domain",
    ] {
        assert!(text.contains(word), "bash completions lack {word}");
    }
    assert!(
        sbx()
            .args(["completions", "tcsh"])
            .output()
            .unwrap()
            .status
            .code()
            == Some(2)
    );

    let dir = std::env::temp_dir().join(format!("sbx-man-{}", std::process::id()));
    let out = sbx().arg("man-pages").arg(&dir).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "sbx.1",
        "sbx-run.1",
        "sbx-session.1",
        "sbx-mcp.1",
        "sbx-serve.1",
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        assert!(text.contains(".TH"), "{page} is not a man page");
    }
    assert!(
        std::fs::read_to_string(dir.join("sbx-serve.1"))
            .unwrap()
            .contains("ready")
    );
    let _ = std::fs::remove_dir_all(&dir);

    let out = sbx().arg("openapi").output().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(doc["paths"]["/v1/sessions/{id}/exec"]["post"].is_object());

    let out = sbx().args(["session", "-l", "cobol"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cobol"));
    let out = sbx().args(["serve", "--ready-fd", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = sbx().args(["serve", "--ready-fd", "987"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ready-fd 987"));
}

/// SIGTERM (what `kill`, systemd and container runtimes send) stops `sbx run` as Ctrl-C
/// does: status 130, every VM destroyed first.
#[test]
#[ignore = "needs QEMU and guest assets: cargo xtask itest"]
fn sigterm_stops_sbx_run_and_destroys_its_vm() {
    let mut child = sbx_cli("error")
        .args(["run", "-q", "-t", "120"])
        .arg("import time\nprint('up', flush=True)\ntime.sleep(100)")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = line_channel(child.stdout.take().unwrap());
    let stderr = collect(child.stderr.take().unwrap());
    match lines.recv_timeout(Duration::from_secs(180)) {
        Ok(l) if l == "up" => {}
        other => {
            let _ = child.kill();
            panic!("no \"up\": {other:?}; {}", stderr.join().unwrap());
        }
    }
    assert!(common::qemu_count() > 0);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "sbx run ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130), "{}", stderr.join().unwrap());
    assert_cleaned_up();
}

/// `sbx doctor --json`'s check of the snapshot store named `snapshots`.
fn doctor_snapshots(cmd: &mut Command) -> serde_json::Value {
    let out = cmd.args(["doctor", "--json"]).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "snapshots")
        .cloned()
        .unwrap_or_else(|| panic!("no snapshots check in {report}"))
}

/// `sbx doctor` says whether L1 snapshots are on, where they are, what they hold, and
/// fails when QEMU's user cannot reach the dir (clones could not map the RAM files).
#[test]
#[ignore = "needs the host set up: cargo xtask itest"]
fn doctor_reports_the_snapshot_store() {
    use std::os::unix::fs::PermissionsExt;
    let off = doctor_snapshots(&mut sbx_cli("error"));
    assert_eq!(off["ok"], true, "{off}");
    assert!(off["detail"].as_str().unwrap().starts_with("off"), "{off}");

    let open = common::snapshot_dir("doctor-open");
    let on = doctor_snapshots(
        sbx_cli("error")
            .env_remove("SBX_SNAPSHOTS")
            .env("SBX_SNAPSHOT_DIR", &open),
    );
    assert_eq!(on["ok"], true, "{on}");
    let detail = on["detail"].as_str().unwrap();
    assert!(detail.contains(&*open.to_string_lossy()), "{detail}");
    assert!(detail.contains("0 published"), "{detail}");

    // A dir only its owner can enter: fatal when QEMU runs as another user.
    let closed = common::snapshot_dir("doctor-closed");
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let r = doctor_snapshots(
        sbx_cli("error")
            .env_remove("SBX_SNAPSHOTS")
            .env("SBX_SNAPSHOT_DIR", &closed),
    );
    let dedicated = detail.contains("reachable by");
    assert_eq!(r["ok"], !dedicated, "{r}");
    if dedicated {
        assert!(r["detail"].as_str().unwrap().contains("cannot"), "{r}");
    } else {
        eprintln!("QEMU runs as this process's user here: any dir it owns is reachable");
    }
    let _ = std::fs::remove_dir_all(open);
    let _ = std::fs::remove_dir_all(closed);
}
