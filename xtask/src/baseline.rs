//! The boot baseline: Debian's generic cloud kernel booting a trivial busybox initramfs.
//!
//! Benchmarks and the boot smoke test compare sbx against it, measured in the same run, so
//! a loaded or slow machine shifts both sides alike.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::assets::initramfs::CpioWriter;

/// The cloud kernel (`vmlinuz`), extracted from Debian's package into `<cache>/baseline`.
/// Downloads it with `apt-get download` when missing (root not needed). `None` when the
/// package cannot be had.
pub fn cloud_kernel(cache: &Path) -> Result<Option<PathBuf>> {
    let dir = cache.join("baseline");
    if let Some(found) = find_vmlinuz(&dir.join("root")) {
        return Ok(Some(found));
    }
    std::fs::create_dir_all(&dir)?;
    // The meta package depends on the versioned image package; resolve it.
    let depends = Command::new("apt-cache")
        .args(["depends", "linux-image-cloud-amd64"])
        .output()
        .context("apt-cache")?;
    let text = String::from_utf8_lossy(&depends.stdout);
    let Some(pkg) = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("cloud-amd64"))
        .map(str::to_owned)
    else {
        return Ok(None);
    };
    let status = Command::new("apt-get")
        .args(["download", &pkg])
        .current_dir(&dir)
        .status()
        .context("apt-get download")?;
    if !status.success() {
        return Ok(None);
    }
    let deb = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("downloaded .deb not found")?;
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join("root"))
        .status()
        .context("dpkg-deb")?;
    anyhow::ensure!(status.success(), "dpkg-deb -x failed");
    let _ = std::fs::remove_file(&deb);
    Ok(find_vmlinuz(&dir.join("root")))
}

fn find_vmlinuz(root: &Path) -> Option<PathBuf> {
    std::fs::read_dir(root.join("boot"))
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
}

/// A gzip-free cpio whose `/init` (busybox-static) reboots at once.
pub fn busybox_initramfs(cache: &Path) -> Result<PathBuf> {
    let out = cache.join("baseline").join("busybox-init.cpio");
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(out.parent().context("no parent")?)?;
    let busybox = std::fs::read("/bin/busybox")
        .context("/bin/busybox missing: apt-get install busybox-static")?;
    let mut w = CpioWriter::new(Vec::new());
    w.dir("/bin", 0o755)?;
    w.dir("/dev", 0o755)?;
    w.char_dev("/dev/console", 0o600, 5, 1)?;
    w.file("/bin/busybox", 0o755, &busybox)?;
    w.file(
        "/init",
        0o755,
        b"#!/bin/busybox sh\n/bin/busybox reboot -f\n",
    )?;
    let bytes = w.finish()?;
    std::fs::write(&out, bytes)?;
    Ok(out)
}
