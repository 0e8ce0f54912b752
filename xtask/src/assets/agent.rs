//! The guest agent: a static x86_64 glibc binary (`+crt-static`), copied to the cache as
//! `sbx-agent`.

use std::collections::BTreeMap;
use std::env;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::cache::{self, KeyBuilder, KeyRecord};
use super::exec::{self, Step};
use super::{Ctx, tools};

/// The agent's package name.
pub const PACKAGE: &str = "guest-agent";
/// The binary cargo produces for it.
pub const BINARY: &str = "guest-agent";
/// The target triple; given explicitly so `+crt-static` does not reach proc-macros.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// RUSTFLAGS of the agent build.
pub const RUSTFLAGS: &str = "-C target-feature=+crt-static";
/// Bumped whenever the recipe changes in a way that changes the output.
pub const RECIPE_VERSION: &str = "agent-recipe-2";
/// Output file name in the cache directory.
pub const OUTPUT: &str = "sbx-agent";

/// Names of the dependencies declared in a `Cargo.toml` (all dependency tables).
pub fn dependency_names(cargo_toml: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_deps = false;
    for line in cargo_toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            let table = line.trim_matches(|c| c == '[' || c == ']');
            in_deps = table.ends_with("dependencies") && !table.ends_with("dev-dependencies");
            continue;
        }
        if !in_deps || line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((lhs, _)) = line.split_once('=') {
            let name = lhs.trim().split('.').next().unwrap_or_default().trim();
            if !name.is_empty() {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// The source directories the agent is built from: its own crate and every workspace
/// crate it depends on (directly, or through those), sorted.
pub fn source_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let crates = root.join("crates");
    let mut todo = vec![PACKAGE.to_owned()];
    let mut seen = Vec::<String>::new();
    while let Some(name) = todo.pop() {
        if seen.contains(&name) {
            continue;
        }
        let manifest = crates.join(&name).join("Cargo.toml");
        let text = fs::read_to_string(&manifest)
            .with_context(|| format!("reading {}", manifest.display()))?;
        for dep in dependency_names(&text) {
            if crates.join(&dep).join("Cargo.toml").is_file() && !seen.contains(&dep) {
                todo.push(dep);
            }
        }
        seen.push(name);
    }
    seen.sort();
    Ok(seen.into_iter().map(|n| crates.join(n)).collect())
}

/// Whether `file`'s description is that of a statically linked executable.
pub fn is_static(file_output: &str) -> bool {
    file_output.contains("statically linked") || file_output.contains("static-pie linked")
}

fn git_revision(root: &Path) -> String {
    let head = exec::output(
        Command::new("git")
            .current_dir(root)
            .args(["rev-parse", "HEAD"]),
    )
    .map(|s| s.trim().to_owned())
    .unwrap_or_else(|_| "unknown".to_owned());
    let dirty = exec::output(Command::new("git").current_dir(root).args([
        "status",
        "--porcelain",
        "--",
        "crates",
        "Cargo.lock",
        "Cargo.toml",
    ]))
    .map(|s| !s.trim().is_empty())
    .unwrap_or(false);
    if dirty { format!("{head}-dirty") } else { head }
}

/// The agent's content key and the description of its inputs.
pub fn key(root: &Path) -> Result<(String, BTreeMap<String, serde_json::Value>)> {
    let dirs = source_dirs(root)?;
    let rustc =
        exec::output(Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".into())).arg("-V"))?
            .trim()
            .to_owned();
    let mut k = KeyBuilder::new("agent");
    k.field("recipe", RECIPE_VERSION)
        .field("target", TARGET)
        .field("rustflags", RUSTFLAGS)
        .field("rustc", &rustc)
        .file("Cargo.toml", &root.join("Cargo.toml"))?
        .file("Cargo.lock", &root.join("Cargo.lock"))?;
    for d in &dirs {
        k.tree(root, d)?;
    }
    let source_key = k.finish();
    let rel: Vec<String> = dirs
        .iter()
        .map(|d| d.strip_prefix(root).unwrap_or(d).display().to_string())
        .collect();
    let inputs = BTreeMap::from([
        ("recipe".to_owned(), json!(RECIPE_VERSION)),
        ("source_dirs".to_owned(), json!(rel)),
        ("source_sha256".to_owned(), json!(source_key)),
        ("git_revision".to_owned(), json!(git_revision(root))),
        ("rustc".to_owned(), json!(rustc)),
        ("target".to_owned(), json!(TARGET)),
        ("rustflags".to_owned(), json!(RUSTFLAGS)),
    ]);
    Ok((source_key, inputs))
}

/// Builds (or finds in the cache) the static agent binary.
pub fn build(ctx: &Ctx) -> Result<KeyRecord> {
    tools::ensure("agent", tools::AGENT, &ctx.log("apt"))?;
    let (key, inputs) = key(&ctx.root)?;
    let out = ctx.dir.join(OUTPUT);
    if let Some(rec) = cache::fresh(&out, &key) {
        println!("==> agent: cached ({OUTPUT}, key {})", &key[..12]);
        return Ok(rec);
    }
    let step = Step::start(
        "agent",
        &format!("cargo build --release -p {PACKAGE} --target {TARGET}"),
    );
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    exec::run_logged(
        Command::new(cargo)
            .current_dir(&ctx.root)
            .args(["build", "--release", "-p", PACKAGE, "--target", TARGET])
            .env("RUSTFLAGS", RUSTFLAGS)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_RUSTFLAGS"),
        &ctx.log("agent"),
    )?;
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| ctx.root.join("target"));
    let built = target_dir.join(TARGET).join("release").join(BINARY);
    let desc = exec::output(Command::new("file").arg("-b").arg(&built))?;
    if !is_static(&desc) {
        bail!(
            "{} is not statically linked; `file` says: {}",
            built.display(),
            desc.trim()
        );
    }
    // Stripped: the agent is in the initramfs and every image; panics keep file:line.
    let tmp = cache::tmp_path(&out);
    exec::run_logged(
        Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(&tmp)
            .arg(&built),
        &ctx.log("agent"),
    )?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", tmp.display()))?;
    fs::rename(&tmp, &out).with_context(|| format!("renaming to {}", out.display()))?;
    let secs = step.done();
    let mut inputs = inputs;
    inputs.insert("file_before_strip".to_owned(), json!(desc.trim()));
    cache::write_record("agent", &out, &key, secs, inputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dependency_names() {
        let toml = r#"
[package]
name = "guest-agent"
version.workspace = true

[dependencies]
guest-proto = { workspace = true }
libc.workspace = true
# comment = 1
serde = "1"

[dev-dependencies]
proptest = { workspace = true }

[target.'cfg(unix)'.dependencies]
nix = { workspace = true }
"#;
        assert_eq!(
            dependency_names(toml),
            ["guest-proto", "libc", "nix", "serde"]
        );
    }

    #[test]
    fn source_dirs_follow_workspace_deps() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (name, deps) in [
            (
                "guest-agent",
                "guest-proto = { workspace = true }\nlibc = \"0.2\"\n",
            ),
            ("guest-proto", "serde = \"1\"\n"),
            ("sbx", "guest-proto = { workspace = true }\n"),
        ] {
            fs::create_dir_all(root.join("crates").join(name)).unwrap();
            fs::write(
                root.join("crates").join(name).join("Cargo.toml"),
                format!("[package]\nname = \"{name}\"\n[dependencies]\n{deps}"),
            )
            .unwrap();
        }
        let dirs = source_dirs(root).unwrap();
        assert_eq!(
            dirs,
            [
                root.join("crates/guest-agent"),
                root.join("crates/guest-proto")
            ]
        );
    }

    #[test]
    fn static_detection() {
        assert!(is_static(
            "ELF 64-bit LSB executable, x86-64, version 1 (GNU/Linux), statically linked, stripped"
        ));
        assert!(is_static(
            "ELF 64-bit LSB pie executable, x86-64, static-pie linked, BuildID[sha1]=ab"
        ));
        assert!(!is_static(
            "ELF 64-bit LSB pie executable, x86-64, dynamically linked, interpreter /lib64/ld-linux-x86-64.so.2"
        ));
    }
}
