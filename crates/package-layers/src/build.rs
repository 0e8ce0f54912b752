//! Running the host's package clients and mkfs.erofs for one layer.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use sandbox_core::Language;
use sandbox_core::packages::PackageSpec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::process::Command;

use crate::error::LayerError;
use crate::target::GuestTarget;

/// Host tools and their versions (part of every key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    /// Python that runs pip.
    pub python: PathBuf,
    /// npm.
    pub npm: PathBuf,
    /// mkfs.erofs.
    pub mkfs_erofs: PathBuf,
}

/// One downloaded artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// File name (wheel) or `name@version` (npm).
    pub name: String,
    /// SHA-256 of the file, lowercase hex (`None` for an npm tarball npm's cache no longer
    /// holds; its `integrity` is still recorded).
    pub sha256: Option<String>,
    /// Size in bytes, when known.
    pub size: Option<u64>,
    /// npm only: where it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<String>,
    /// npm only: the registry's integrity (SRI, verified by npm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<String>,
}

/// Output of a command, with its status.
struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

async fn run(cmd: &mut Command, what: &str) -> Result<Output, LayerError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = cmd.output().await.map_err(|e| {
        LayerError::Tool(format!(
            "cannot run {what}: {e} (scripts/setup-host.sh installs it)"
        ))
    })?;
    Ok(Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            break;
        }
        n += r as u64;
        h.update(&buf[..r]);
    }
    Ok((hex::encode(h.finalize()), n))
}

impl Tools {
    /// The installer's version string for `language` (`pip 23.0.1 / python 3.11.2`,
    /// `npm 9.2.0`) and mkfs.erofs's.
    pub async fn versions(&self, language: Language) -> Result<(String, String), LayerError> {
        let installer = match language {
            Language::Javascript => {
                let o = run(Command::new(&self.npm).arg("--version"), "npm").await?;
                if !o.ok {
                    return Err(LayerError::Tool(format!(
                        "npm --version failed: {}",
                        tail(&o.stderr, 3)
                    )));
                }
                format!("npm {}", o.stdout.trim())
            }
            _ => {
                let o = run(
                    Command::new(&self.python).args([
                        "-c",
                        "import sys, pip; print('pip', pip.__version__, '/ python', \
                         '.'.join(map(str, sys.version_info[:3])))",
                    ]),
                    "python3 (for pip)",
                )
                .await?;
                if !o.ok {
                    return Err(LayerError::Tool(format!(
                        "pip is not available to {}: {} (install python3-pip)",
                        self.python.display(),
                        tail(&o.stderr, 3)
                    )));
                }
                o.stdout.trim().to_owned()
            }
        };
        // erofs-utils 1.5 prints "mkfs.erofs 1.5" for --version, then refuses the option.
        let o = run(
            Command::new(&self.mkfs_erofs).arg("--version"),
            "mkfs.erofs",
        )
        .await?;
        let mkfs = format!("{}\n{}", o.stdout, o.stderr)
            .lines()
            .find(|l| {
                // "mkfs.erofs 1.5" (1.5), "mkfs.erofs (erofs-utils) 1.7.1" (later).
                l.strip_prefix("mkfs.erofs ").is_some_and(|v| {
                    v.split_whitespace()
                        .last()
                        .is_some_and(|w| w.starts_with(|c: char| c.is_ascii_digit()))
                })
            })
            .map(|l| l.trim().to_owned())
            .ok_or_else(|| {
                LayerError::Tool(format!(
                    "{} did not say its version (install erofs-utils)",
                    self.mkfs_erofs.display()
                ))
            })?;
        Ok((installer, mkfs))
    }
}

/// The requirement pip could not satisfy, from its error output.
fn pip_unsatisfied(stderr: &str) -> Option<String> {
    for marker in [
        "No matching distribution found for ",
        "Could not find a version that satisfies the requirement ",
    ] {
        if let Some(pos) = stderr.find(marker) {
            let rest = &stderr[pos + marker.len()..];
            return Some(rest.split_whitespace().next().unwrap_or("").to_owned());
        }
    }
    None
}

/// Downloads the wheels of `specs` (and their dependencies) for `target` into `dl`, and
/// installs exactly those into `tree`. Returns the artifacts.
pub async fn python(
    tools: &Tools,
    target: &GuestTarget,
    host_python_minor: &str,
    specs: &[PackageSpec],
    dl: &Path,
    tree: &Path,
) -> Result<Vec<Artifact>, LayerError> {
    let reqs: Vec<String> = specs
        .iter()
        .map(|s| s.to_client_arg(Language::Python))
        .collect();
    let common = [
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "--only-binary=:all:",
    ];
    let mut cmd = Command::new(&tools.python);
    cmd.args(["-m", "pip", "download"])
        .args(common)
        .arg("--dest")
        .arg(dl)
        .args(target.pip_target_args())
        .arg("--")
        .args(&reqs)
        .env("PIP_NO_INPUT", "1");
    let o = run(&mut cmd, "pip download").await?;
    if !o.ok {
        let guest = format!(
            "CPython {} on {} (glibc {}.{})",
            target.interpreter_minor(),
            target.arch,
            target.glibc.0,
            target.glibc.1
        );
        return Err(match pip_unsatisfied(&o.stderr) {
            Some(req) => LayerError::Input(format!(
                "package {req:?}: no such version, or no wheel for the guest ({guest}); \
                 source distributions are not built"
            )),
            None => LayerError::Fetch(format!("pip download failed: {}", tail(&o.stderr, 6))),
        });
    }
    let mut wheels: Vec<PathBuf> = std::fs::read_dir(dl)
        .map_err(|e| LayerError::io("list downloads", e))?
        .flatten()
        .map(|e| e.path())
        .collect();
    wheels.sort();
    let mut artifacts = Vec::new();
    for w in &wheels {
        let name = w
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.ends_with(".whl") {
            return Err(LayerError::Fetch(format!(
                "pip downloaded {name}, which is not a wheel"
            )));
        }
        let (sha, size) = sha256_file(w).map_err(|e| LayerError::io(format!("hash {name}"), e))?;
        artifacts.push(Artifact {
            name,
            sha256: Some(sha),
            size: Some(size),
            resolved: None,
            integrity: None,
        });
    }
    let mut cmd = Command::new(&tools.python);
    cmd.args(["-m", "pip", "install"])
        .args(common)
        .args(["--no-index", "--no-deps", "--no-warn-script-location"])
        .arg("--target")
        .arg(tree)
        .args(target.pip_target_args())
        .env("PIP_NO_INPUT", "1");
    // Compiled files only help when the host Python writes what the guest reads.
    if host_python_minor != target.interpreter_minor() {
        cmd.arg("--no-compile");
    }
    cmd.arg("--").args(&wheels);
    let o = run(&mut cmd, "pip install").await?;
    if !o.ok {
        return Err(LayerError::Fetch(format!(
            "pip install (of the downloaded wheels) failed: {}",
            tail(&o.stderr, 6)
        )));
    }
    Ok(artifacts)
}

fn npm_cache_file(cache: &Path, integrity: &str) -> Option<PathBuf> {
    let b64 = integrity
        .split_whitespace()
        .next()?
        .strip_prefix("sha512-")?;
    let bytes = base64_decode(b64)?;
    let hex = hex::encode(bytes);
    Some(
        cache
            .join("_cacache/content-v2/sha512")
            .join(&hex[..2])
            .join(&hex[2..4])
            .join(&hex[4..]),
    )
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Installs `specs` with npm (scripts disabled) into `prefix/node_modules`.
pub async fn javascript(
    tools: &Tools,
    specs: &[PackageSpec],
    prefix: &Path,
) -> Result<Vec<Artifact>, LayerError> {
    let reqs: Vec<String> = specs
        .iter()
        .map(|s| s.to_client_arg(Language::Javascript))
        .collect();
    std::fs::write(prefix.join("package.json"), "{\"private\": true}\n")
        .map_err(|e| LayerError::io("write package.json", e))?;
    let mut cmd = Command::new(&tools.npm);
    cmd.args([
        "install",
        "--ignore-scripts",
        "--no-audit",
        "--no-fund",
        "--no-update-notifier",
        "--omit=dev",
        "--loglevel=error",
        "--prefix",
    ])
    .arg(prefix)
    .arg("--")
    .args(&reqs)
    .env("npm_config_ignore_scripts", "true");
    let o = run(&mut cmd, "npm install").await?;
    if !o.ok {
        let text = format!("{}\n{}", o.stdout, o.stderr);
        let missing = [
            "ETARGET",
            "E404",
            "No matching version",
            "is not in this registry",
        ]
        .iter()
        .any(|m| text.contains(m));
        return Err(if missing {
            let which = reqs
                .iter()
                .find(|r| {
                    let name = r.rsplit_once('@').map_or(r.as_str(), |(n, _)| n);
                    text.contains(name)
                })
                .cloned()
                .unwrap_or_else(|| reqs.join(" "));
            LayerError::Input(format!(
                "package {which:?}: no such package or version in the registry ({})",
                tail(&text, 2)
            ))
        } else {
            LayerError::Fetch(format!("npm install failed: {}", tail(&text, 6)))
        });
    }
    let cache = run(
        Command::new(&tools.npm).args(["config", "get", "cache"]),
        "npm",
    )
    .await
    .ok()
    .filter(|o| o.ok)
    .map(|o| PathBuf::from(o.stdout.trim()));
    let lock: serde_json::Value = std::fs::read_to_string(prefix.join("package-lock.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let mut artifacts = Vec::new();
    if let Some(pkgs) = lock.get("packages").and_then(|p| p.as_object()) {
        for (path, p) in pkgs {
            let Some(name) = path.rsplit_once("node_modules/").map(|(_, n)| n) else {
                continue;
            };
            let integrity = p
                .get("integrity")
                .and_then(|v| v.as_str())
                .map(String::from);
            let file = cache
                .as_deref()
                .zip(integrity.as_deref())
                .and_then(|(c, i)| npm_cache_file(c, i));
            let hashed = file.and_then(|f| sha256_file(&f).ok());
            artifacts.push(Artifact {
                name: format!(
                    "{name}@{}",
                    p.get("version").and_then(|v| v.as_str()).unwrap_or("?")
                ),
                sha256: hashed.as_ref().map(|(h, _)| h.clone()),
                size: hashed.map(|(_, n)| n),
                resolved: p.get("resolved").and_then(|v| v.as_str()).map(String::from),
                integrity,
            });
        }
    }
    Ok(artifacts)
}

/// Bytes of regular files below `dir` (symlinks not followed).
pub fn tree_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                total += e.metadata()?.len();
            }
        }
    }
    Ok(total)
}

/// Makes the read-only image `out` from `dir` (all files root-owned, mtimes kept).
pub async fn mkfs(tools: &Tools, dir: &Path, out: &Path) -> Result<(), LayerError> {
    let mut cmd = Command::new(&tools.mkfs_erofs);
    cmd.args(["-zlz4hc", "--all-root", "--preserve-mtime", "--quiet"])
        .arg(out)
        .arg(dir);
    let o = run(&mut cmd, "mkfs.erofs").await?;
    if !o.ok {
        return Err(LayerError::io(
            "mkfs.erofs",
            std::io::Error::other(tail(&format!("{}\n{}", o.stdout, o.stderr), 4)),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pip_errors_name_the_requirement() {
        let e = "ERROR: Could not find a version that satisfies the requirement \
                 nosuch==9.9 (from versions: none)\nERROR: No matching distribution found for nosuch==9.9\n";
        assert_eq!(pip_unsatisfied(e).as_deref(), Some("nosuch==9.9"));
        assert_eq!(pip_unsatisfied("network down"), None);
    }

    #[test]
    fn npm_integrity_maps_to_its_cache_file() {
        // sha512 of the empty string.
        let i = "sha512-z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg==";
        let p = npm_cache_file(Path::new("/c"), i).unwrap();
        assert_eq!(
            p,
            Path::new(
                "/c/_cacache/content-v2/sha512/cf/83/e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"
            )
        );
        assert!(npm_cache_file(Path::new("/c"), "sha1-abc").is_none());
    }
}
