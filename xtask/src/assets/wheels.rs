//! Python wheels vendored into base images: pinned on PyPI by version and sha256, fetched
//! on the host with `pip download --require-hashes`, checked again here, and unpacked into
//! the image root.
//!
//! | wheel | what the image gets |
//! |---|---|
//! | `uv` | the `uv` and `uvx` binaries in `/usr/local/bin` |
//! | `cloudpickle` | the `cloudpickle` package in `/usr/lib/python3/dist-packages` (byte-compiled) |
//!
//! The pins are part of each image's content key ([`key_lines`]): changing one rebuilds
//! the images that carry it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{cache, exec, tools};

/// What a wheel contributes to an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Executables from `<name>-<version>.data/scripts/`, installed in `/usr/local/bin`.
    Scripts(&'static [&'static str]),
    /// A pure-Python package directory (and its `.dist-info`), installed in
    /// `/usr/lib/python3/dist-packages` and byte-compiled there.
    Package(&'static str),
}

/// One pinned wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wheel {
    /// Distribution name on PyPI.
    pub name: &'static str,
    /// Pinned version.
    pub version: &'static str,
    /// The wheel's file name (platform tags included).
    pub file: &'static str,
    /// sha256 of the wheel file.
    pub sha256: &'static str,
    /// What the image gets from it.
    pub payload: Payload,
}

/// `uv` (the Python package manager); the wheel ships the static binaries.
pub const UV: Wheel = Wheel {
    name: "uv",
    version: "0.13.10",
    file: "uv-0.13.10-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    sha256: "7cc9c41b43d583e34c781fd3446405b06e9c5fa2db468ce2a534d353db6429e5",
    payload: Payload::Scripts(&["uv", "uvx"]),
};

/// `cloudpickle`: lets `multiprocessing` send functions defined in the REPL (lambdas,
/// closures) to worker processes (the guest agent's Python wrapper loads it lazily).
pub const CLOUDPICKLE: Wheel = Wheel {
    name: "cloudpickle",
    version: "3.1.3",
    file: "cloudpickle-3.1.3-py3-none-any.whl",
    sha256: "1654f4f18e416447210a63c5c25a135d65a292156aa5fa519dfa4baf7726dddb",
    payload: Payload::Package("cloudpickle"),
};

/// Where pure-Python packages go in the image (on every Debian python3's `sys.path`).
pub const DIST_PACKAGES: &str = "usr/lib/python3/dist-packages";

/// The content-key lines of `wheels`: `name==version sha256`, one per wheel.
pub fn key_lines(wheels: &[Wheel]) -> Vec<String> {
    wheels
        .iter()
        .map(|w| format!("{}=={} {} {}", w.name, w.version, w.file, w.sha256))
        .collect()
}

/// Returns the wheel in `dir`, downloading it with pip when missing or when its hash
/// does not match. Either way the returned file's sha256 is the pinned one.
pub fn fetch(wheel: &Wheel, dir: &Path, log: &Path) -> Result<PathBuf> {
    let path = dir.join(wheel.file);
    if path.is_file() && cache::sha256_file(&path)? == wheel.sha256 {
        return Ok(path);
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    cache::remove_any(&path)?;
    // pip checks the hash itself (--require-hashes); the platform flags select exactly
    // the pinned file whatever this host's own Python is.
    let req = dir.join(format!("{}.requirements.txt", wheel.name));
    fs::write(
        &req,
        format!(
            "{}=={} --hash=sha256:{}\n",
            wheel.name, wheel.version, wheel.sha256
        ),
    )
    .with_context(|| format!("writing {}", req.display()))?;
    exec::run_logged(
        Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--require-hashes"])
            .args([
                "--only-binary=:all:",
                "--no-cache-dir",
                "--disable-pip-version-check",
            ])
            .args([
                "--platform",
                "manylinux2014_x86_64",
                "--python-version",
                "3.11",
            ])
            .args(["--implementation", "py", "--abi", "none"])
            .arg("--dest")
            .arg(dir)
            .arg("-r")
            .arg(&req),
        log,
    )
    .with_context(|| format!("pip download {}=={}", wheel.name, wheel.version))?;
    if !path.is_file() {
        bail!(
            "pip download {}=={} did not produce {}",
            wheel.name,
            wheel.version,
            wheel.file
        );
    }
    let got = cache::sha256_file(&path)?;
    if got != wheel.sha256 {
        let _ = fs::remove_file(&path);
        bail!(
            "{}: sha256 {got}, pinned {} (refusing it)",
            wheel.file,
            wheel.sha256
        );
    }
    Ok(path)
}

/// Unpacks `file` (the verified wheel) into `scratch` and installs its payload into the
/// image tree `root`. Python packages are byte-compiled with the image's own python3
/// (the root is read-only in the VM).
pub fn install(wheel: &Wheel, file: &Path, root: &Path, scratch: &Path, log: &Path) -> Result<()> {
    cache::remove_any(scratch)?;
    fs::create_dir_all(scratch).with_context(|| format!("creating {}", scratch.display()))?;
    exec::run_logged(
        Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(file)
            .arg(scratch),
        log,
    )?;
    match wheel.payload {
        Payload::Scripts(names) => {
            let bin = root.join("usr/local/bin");
            fs::create_dir_all(&bin)?;
            let data = scratch.join(format!("{}-{}.data/scripts", wheel.name, wheel.version));
            for name in names {
                let dst = bin.join(name);
                fs::copy(data.join(name), &dst)
                    .with_context(|| format!("{}: installing {name}", wheel.file))?;
                fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))?;
            }
        }
        Payload::Package(pkg) => {
            let site = root.join(DIST_PACKAGES);
            let info = format!("{}-{}.dist-info", wheel.name, wheel.version);
            for dir in [pkg, info.as_str()] {
                let dst = site.join(dir);
                cache::remove_any(&dst)?;
                exec::run_logged(
                    Command::new("cp")
                        .args(["-r", "--no-preserve=ownership"])
                        .arg(scratch.join(dir))
                        .arg(&dst),
                    log,
                )?;
                exec::run_logged(
                    Command::new("chmod").args(["-R", "u=rwX,go=rX"]).arg(&dst),
                    log,
                )?;
            }
            // Resolved here: the command runs with the image's PATH.
            let chroot = tools::which("chroot").context("chroot not found on PATH")?;
            exec::run_logged(
                Command::new(chroot)
                    .arg(root)
                    .args(["/usr/bin/python3", "-m", "compileall", "-q"])
                    .arg(format!("/{DIST_PACKAGES}/{pkg}"))
                    .env_clear()
                    .env("PATH", "/usr/bin:/bin"),
                log,
            )?;
        }
    }
    cache::remove_any(scratch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_well_formed() {
        for w in [UV, CLOUDPICKLE] {
            assert_eq!(w.sha256.len(), 64, "{}", w.name);
            assert!(
                w.sha256
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
            assert!(
                w.file.starts_with(&format!("{}-{}-", w.name, w.version)),
                "{} names its pinned version",
                w.file
            );
            assert!(w.file.ends_with(".whl"));
        }
    }

    #[test]
    fn key_lines_change_with_the_pin() {
        let a = key_lines(&[UV]);
        let mut other = UV;
        other.sha256 = "0000000000000000000000000000000000000000000000000000000000000000";
        assert_ne!(a, key_lines(&[other]));
        assert!(a[0].starts_with("uv==0.13.10 "));
    }

    #[test]
    fn a_cached_wheel_with_the_pinned_hash_is_used_without_pip() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"not really a wheel";
        let fake = Wheel {
            name: "fake",
            version: "1.0",
            file: "fake-1.0-py3-none-any.whl",
            sha256: "00",
            payload: Payload::Package("fake"),
        };
        let sha = cache::sha256_bytes(data);
        let sha: &'static str = Box::leak(sha.into_boxed_str());
        let fake = Wheel {
            sha256: sha,
            ..fake
        };
        fs::write(dir.path().join(fake.file), data).unwrap();
        let got = fetch(&fake, dir.path(), &dir.path().join("log")).unwrap();
        assert_eq!(got, dir.path().join(fake.file));
        // No pip run: nothing was logged.
        assert!(!dir.path().join("log").exists());
    }
}
