//! Packages end to end: `-p/--package` and the allowlist flags of `sbx run` (usage errors
//! exit 2 before any VM work), and VM tests that import packages from a layer built on
//! the host.
//!
//! The VM tests need QEMU, the guest assets and the package registries (PyPI, npm) for
//! small packages, so they are `#[ignore]`d in `cargo test`; `cargo xtask itest packages`
//! runs them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use sandbox_core::{
    ErrorKind, ExecRequest, Language, OutputCallbacks, RunOptions, RunRequest, SessionRequest,
};

use common::work_dir;

fn sbx_run(work: &PathBuf) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sbx"));
    c.env("SBX_WORK_DIR", work)
        .env("SBX_ASSETS_DIR", "/nonexistent/sbx-assets")
        .env("SBX_LOG", "error")
        .env_remove("SBX_PACKAGE_ALLOWLIST")
        .args(["run", "-q"]);
    c
}

/// Every package rule is checked before any VM work: exit status 2 naming the spec, no
/// work dir, with assets that do not exist (getting any further ends in status 125).
#[test]
fn package_usage_errors_exit_2_before_any_vm() {
    let work = PathBuf::from(format!("{}-pkg-input", work_dir().display()));
    let list = std::env::temp_dir().join(format!("sbx-allow-{}.txt", std::process::id()));
    std::fs::write(&list, "[python]\nmy-private-pkg\n").unwrap();
    let list_s = list.display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["-p", "numpy"], "\"numpy\": needs an exact pin"),
        (vec!["-p", "numpy>=2"], "\"numpy>=2\""),
        (
            vec!["--package", "numpy==2.1.3; rm -rf /"],
            "numpy==2.1.3; rm -rf /",
        ),
        (
            vec!["-p", "numpy==2.1.3 --index-url http://evil"],
            "--index-url",
        ),
        (vec!["-p", "git+https://github.com/x/y"], "git+https"),
        (vec!["-p", "six==1.16.0", "-p", "six==1.15.0"], "conflicts"),
        (
            vec!["-p", "definitely-not-listed==1.0"],
            "not on the operator's package allowlist",
        ),
        (
            vec!["-l", "raw", "-p", "six==1.16.0"],
            "raw code has no packages",
        ),
        (
            vec!["-l", "javascript", "-p", "lodash@^4.17.21"],
            "exact semver",
        ),
        (
            vec![
                "-l",
                "javascript",
                "-p",
                "lodash@4.17.21",
                "-p",
                "evil-js@1.0.0",
            ],
            "evil-js@1.0.0",
        ),
        (
            vec![
                "--package-allowlist",
                "/nonexistent/list.txt",
                "-p",
                "six==1.16.0",
            ],
            "/nonexistent/list.txt",
        ),
        (
            vec!["--package-allowlist", &list_s, "-p", "numpy==2.1.3"],
            "not on the operator's package allowlist",
        ),
    ];
    let code_for = |args: &[&str]| {
        if args.contains(&"javascript") {
            "console.log(1)"
        } else if args.contains(&"raw") {
            "echo 1"
        } else {
            "print(1)"
        }
    };
    for (args, want) in &cases {
        let out = sbx_run(&work)
            .args(args)
            .arg(code_for(args))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: want {want:?} in {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    let many: Vec<String> = (0..51)
        .flat_map(|i| ["-p".into(), format!("six{i}==1")])
        .collect();
    let out = sbx_run(&work).args(&many).arg("1").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 50"));
    // Accepted specs get past the input checks (and then stop at the missing assets).
    for args in [
        vec!["-p", "NumPy==2.1.3", "-p", "pandas[excel]==2.2.3"],
        vec!["--package-allowlist", &list_s, "-p", "my_private.pkg==0.1"],
        vec!["--no-package-allowlist", "-p", "definitely-not-listed==1.0"],
    ] {
        let out = sbx_run(&work).args(&args).arg("print(1)").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(125),
            "{args:?} gets past input checks: {stderr}"
        );
    }
    let out = sbx_run(&work)
        .env("SBX_PACKAGE_ALLOWLIST", "off")
        .args(["-p", "definitely-not-listed==1.0", "print(1)"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "SBX_PACKAGE_ALLOWLIST=off");
    assert!(!work.exists(), "a usage error set up a sandbox work dir");
    let _ = std::fs::remove_file(&list);
}

/// A config whose package layers go to a directory of this test's own.
fn packages_config(dir: &std::path::Path) -> sbx::SbxConfig {
    let mut cfg = common::config(0);
    cfg.package_dir = Some(dir.to_path_buf());
    cfg
}

async fn run_with(
    sbx: &sbx::Sbx,
    language: Language,
    code: &str,
    packages: &[&str],
) -> sandbox_core::Result<sandbox_core::ExecutionResult> {
    let mut req = RunRequest::new(language, code);
    req.packages = packages.iter().map(|s| s.to_string()).collect();
    req.timeout_secs = 60;
    sbx.scheduler().run(req, RunOptions::default()).await
}

fn layers_in(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().len() == 64 && e.path().join("layer.erofs").is_file())
                .count()
        })
        .unwrap_or(0)
}

/// `import six` from a layer built on the host (the guest has no network): the module
/// comes from the read-only layer, user code cannot write there, the layer is built once
/// for a set, and a package that does not exist is an input error naming it, with no VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU, guest assets and PyPI: cargo xtask itest packages"]
async fn python_imports_a_package_from_a_read_only_layer() {
    let dir = tempfile::tempdir().unwrap();
    let sbx = sbx::Sbx::start(packages_config(dir.path())).await.unwrap();
    let code = r#"
import six, os, sys
print(six.__version__)
print(six.__file__)
try:
    open(os.path.join(os.path.dirname(six.__file__), "evil.py"), "w")
    print("WROTE")
except OSError as e:
    print("refused", e.errno)
import socket
try:
    socket.create_connection(("pypi.org", 443), timeout=2)
    print("NETWORK")
except OSError:
    print("offline")
"#;
    let started = std::time::Instant::now();
    let r = run_with(&sbx, Language::Python, code, &["six==1.16.0"])
        .await
        .unwrap();
    let first = started.elapsed();
    assert_eq!(r.exit_code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "1.16.0", "{r:?}");
    assert!(
        lines[1].starts_with("/opt/sbx-packages/python/six.py"),
        "{r:?}"
    );
    assert!(
        lines[2] == "refused 30" || lines[2] == "refused 13",
        "{r:?}"
    );
    assert_eq!(lines[3], "offline", "{r:?}");
    assert!(r.timing.packages_ms > 0);
    assert_eq!(layers_in(dir.path()), 1);
    // The same set again: the published layer, no build.
    let started = std::time::Instant::now();
    let r = run_with(
        &sbx,
        Language::Python,
        "import six; print(six.__version__)",
        &["SIX==1.16.0"],
    )
    .await
    .unwrap();
    eprintln!(
        "first run with a new set {first:?}, repeated {:?} (packages {} ms)",
        started.elapsed(),
        r.timing.packages_ms
    );
    assert_eq!(r.stdout, "1.16.0\n");
    assert!(r.timing.packages_ms < 1000, "{:?}", r.timing);
    assert_eq!(layers_in(dir.path()), 1);
    // Without packages the module is not there.
    let r = run_with(&sbx, Language::Python, "import six", &[])
        .await
        .unwrap();
    assert_ne!(r.exit_code, 0);
    assert!(r.stderr.contains("ModuleNotFoundError"), "{r:?}");
    // A version that does not exist: input error naming it, nothing built.
    let err = run_with(&sbx, Language::Python, "1", &["six==0.0.999"])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Input, "{err}");
    assert!(err.to_string().contains("six==0.0.999"), "{err}");
    assert_eq!(layers_in(dir.path()), 1);
    // A session sees the layer too.
    let mut s = SessionRequest::new(Language::Python);
    s.packages = vec!["six==1.16.0".into()];
    let session = sbx
        .scheduler()
        .session(s, RunOptions::default())
        .await
        .unwrap();
    session
        .exec(ExecRequest::new("import six"), &OutputCallbacks::default())
        .await
        .unwrap();
    let r = session
        .exec(
            ExecRequest::new("print(six.PY3)"),
            &OutputCallbacks::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "True\n");
    session.close().await;
    sbx.stop().await;
    assert_eq!(common::wait_no_qemu(), 0);
}

/// `require('is-number')` from a layer npm installed on the host with scripts disabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU, guest assets and the npm registry: cargo xtask itest packages"]
async fn javascript_requires_a_package_from_a_layer() {
    let dir = tempfile::tempdir().unwrap();
    let sbx = sbx::Sbx::start(packages_config(dir.path())).await.unwrap();
    let r = run_with(
        &sbx,
        Language::Javascript,
        "const isNumber = require('is-number'); console.log(isNumber(5), isNumber('x'), require.resolve('is-number'))",
        &["is-number@7.0.0"],
    )
    .await
    .unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(
        r.stdout, "true false /opt/sbx-packages/node_modules/is-number/index.js\n",
        "{r:?}"
    );
    let err = run_with(&sbx, Language::Javascript, "1", &["is-number@99.0.0"])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Input, "{err}");
    sbx.stop().await;
    assert_eq!(common::wait_no_qemu(), 0);
}

/// The CLI: `sbx run -p SPEC CODE` prints what the package says.
#[test]
#[ignore = "needs QEMU, guest assets and PyPI: cargo xtask itest packages"]
fn sbx_run_with_a_package() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sbx"))
        .env("SBX_WORK_DIR", work_dir())
        .env("SBX_PACKAGE_DIR", dir.path())
        .env("SBX_SNAPSHOTS", "0")
        .env("SBX_LOG", "error")
        .args([
            "run",
            "-q",
            "-p",
            "six==1.16.0",
            "import six; print(six.__version__)",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1.16.0\n");
    assert_eq!(layers_in(dir.path()), 1);
    // `sbx cache ls|gc` see and trim it.
    let cache = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sbx"))
            .env("SBX_PACKAGE_DIR", dir.path())
            .arg("cache")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ls = cache(&["ls"]);
    assert!(ls.contains("python") && ls.contains("six==1.16.0"), "{ls}");
    assert!(ls.contains("1 layers"), "{ls}");
    assert_eq!(cache(&["gc", "--max-mb", "100"]), "removed 0 layers\n");
    assert_eq!(cache(&["gc"]), "removed 1 layers\n");
    assert_eq!(layers_in(dir.path()), 0);
}
