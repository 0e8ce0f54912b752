//! The Python client's overhead (`cargo xtask bench --only client`): session exec through
//! `clients/python` beside the same call made with raw HTTP (httpx, and the standard
//! library's `http.client`), against one `sbx serve`, samples interleaved.
//! The measuring script is `clients/python/bench/client_overhead.py`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::assets::Assets;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The venv the tests use (`target/pyenv`, created by `scripts/test.sh`), created here
/// with the client installed when it is missing.
fn python(root: &Path) -> Result<PathBuf> {
    let py = root.join("target/pyenv/bin/python");
    if !py.exists() {
        let st = Command::new("python3")
            .args(["-m", "venv"])
            .arg(root.join("target/pyenv"))
            .status()
            .context("python3 -m venv")?;
        ensure!(
            st.success(),
            "python3 -m venv failed (apt-get install python3-venv)"
        );
    }
    let st = Command::new(&py)
        .args(["-m", "pip", "install", "-q"])
        .arg(root.join("clients/python"))
        .status()
        .context("pip install clients/python")?;
    ensure!(st.success(), "pip install clients/python failed");
    Ok(py)
}

/// Runs the comparison with `execs` samples of each kind; the script's JSON.
pub fn run(assets: &Assets, execs: usize) -> Result<Value> {
    eprintln!("bench: python client beside raw HTTP");
    let root = workspace();
    let st = Command::new(env!("CARGO"))
        .args(["build", "-q", "--locked", "-p", "sbx"])
        .current_dir(&root)
        .status()?;
    ensure!(st.success(), "cargo build -p sbx failed");
    let py = python(&root)?;
    let out = Command::new(py)
        .arg(root.join("clients/python/bench/client_overhead.py"))
        .args(["--execs", &execs.to_string(), "--sbx"])
        .arg(root.join("target/debug/sbx"))
        .env("SBX_ASSETS_DIR", &assets.dir)
        .output()
        .context("running client_overhead.py")?;
    ensure!(
        out.status.success(),
        "client_overhead.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: Value = serde_json::from_slice(&out.stdout).context("its JSON")?;
    v["sbx_build"] = "debug".into();
    Ok(v)
}
