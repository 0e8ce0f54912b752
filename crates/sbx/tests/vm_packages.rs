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
