//! Host tools the asset build needs, and installing them with apt when running as root.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::exec;

/// How to tell that a tool is present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// An executable with this name on `PATH`.
    Bin(&'static str),
    /// A file at this absolute path (headers, source tarballs, data files).
    File(&'static str),
}

/// A host tool and the Debian package that provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// What to look for.
    pub probe: Probe,
    /// The Debian package to install when it is missing.
    pub package: &'static str,
}

const fn bin(name: &'static str, package: &'static str) -> Tool {
    Tool {
        probe: Probe::Bin(name),
        package,
    }
}

const fn file(path: &'static str, package: &'static str) -> Tool {
    Tool {
        probe: Probe::File(path),
        package,
    }
}

/// What the kernel build needs.
pub const KERNEL: &[Tool] = &[
    file("/usr/src/linux-source-6.1.tar.xz", "linux-source-6.1"),
    bin("make", "make"),
    bin("gcc", "gcc"),
    bin("flex", "flex"),
    bin("bison", "bison"),
    bin("bc", "bc"),
    bin("xz", "xz-utils"),
    bin("strip", "binutils"),
    bin("readelf", "binutils"),
    bin("perl", "perl"),
    bin("patch", "patch"),
    bin("dpkg-query", "dpkg"),
    file("/usr/include/libelf.h", "libelf-dev"),
    file("/usr/include/openssl/ssl.h", "libssl-dev"),
    bin("pahole", "dwarves"),
];

/// What the guest agent build needs (cargo itself is already running us).
pub const AGENT: &[Tool] = &[
    bin("file", "file"),
    bin("gcc", "gcc"),
    bin("strip", "binutils"),
];

/// What the initramfs needs.
pub const INITRAMFS: &[Tool] = &[bin("zstd", "zstd")];

/// What the base images need.
pub const IMAGES: &[Tool] = &[
    bin("mmdebstrap", "mmdebstrap"),
    bin("mkfs.erofs", "erofs-utils"),
    bin("qemu-img", "qemu-utils"),
    bin("hardlink", "util-linux"),
    bin("apt-cache", "apt"),
    bin("dpkg-query", "dpkg"),
    // `python3 -m pip download` fetches the pinned wheels; `-m zipfile` unpacks them.
    bin("python3", "python3"),
    bin("pip3", "python3-pip"),
    // `npm pack` fetches the pinned runtimes (Bun) from the npm registry.
    bin("npm", "npm"),
    file(
        "/usr/share/keyrings/debian-archive-keyring.gpg",
        "debian-archive-keyring",
    ),
];

/// Looks up an executable on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn present(tool: &Tool) -> bool {
    match tool.probe {
        Probe::Bin(b) => which(b).is_some(),
        Probe::File(f) => Path::new(f).exists(),
    }
}

/// The packages that provide the missing tools, sorted and deduplicated.
pub fn missing_packages(tools: &[Tool], present: impl Fn(&Tool) -> bool) -> Vec<&'static str> {
    let mut pkgs: Vec<&'static str> = tools
        .iter()
        .filter(|t| !present(t))
        .map(|t| t.package)
        .collect();
    pkgs.sort_unstable();
    pkgs.dedup();
    pkgs
}

/// Parses the effective uid out of `/proc/self/status` text.
pub fn parse_euid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_euid(&s))
        == Some(0)
}

/// Makes sure every tool is present: installs the missing packages with apt when root,
/// otherwise fails naming them.
pub fn ensure(asset: &str, tools: &[Tool], log: &Path) -> Result<()> {
    let missing = missing_packages(tools, present);
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "{asset}: missing host tools; install them with:\n    sudo apt-get install -y {list}"
        );
    }
    let step = exec::Step::start(asset, &format!("apt-get install -y {list}"));
    let install = || {
        exec::run_logged(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            log,
        )
    };
    if install().is_err() {
        exec::run_logged(Command::new("apt-get").arg("update"), log)?;
        install().with_context(|| format!("{asset}: installing {list}"))?;
    }
    let still = missing_packages(tools, present);
    if !still.is_empty() {
        bail!(
            "{asset}: still missing after apt-get install: {}",
            still.join(" ")
        );
    }
    step.done();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_effective_uid() {
        let s = "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t1\t1\t1\t1\n";
        assert_eq!(parse_euid(s), Some(0));
        assert_eq!(parse_euid("Name: x\n"), None);
    }

    #[test]
    fn missing_packages_are_deduplicated() {
        let tools = [
            bin("strip", "binutils"),
            bin("readelf", "binutils"),
            bin("make", "make"),
        ];
        let none = missing_packages(&tools, |_| false);
        assert_eq!(none, ["binutils", "make"]);
        assert!(missing_packages(&tools, |_| true).is_empty());
    }

    #[test]
    fn finds_sh_on_path() {
        assert!(which("sh").is_some());
        assert!(which("definitely-not-a-tool-sbx").is_none());
    }
}
