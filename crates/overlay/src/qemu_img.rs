//! Creating one qcow2 overlay with `qemu-img create`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::error::OverlayError;

/// How overlays are created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayOptions {
    /// The `qemu-img` binary (a bare name is looked up in `PATH`).
    pub qemu_img: PathBuf,
    /// Format of the base image, passed as `-F` (`qcow2`).
    pub backing_format: String,
    /// qcow2 cluster size of the overlay (`128k`).
    pub cluster_size: String,
    /// `extended_l2=on`: sub-cluster allocation, fewer copy-on-write bytes per small write.
    pub extended_l2: bool,
    /// `lazy_refcounts=on`: fewer metadata writes (the overlay is thrown away anyway).
    pub lazy_refcounts: bool,
}

impl Default for OverlayOptions {
    fn default() -> Self {
        Self {
            qemu_img: PathBuf::from("qemu-img"),
            backing_format: "qcow2".to_owned(),
            cluster_size: "128k".to_owned(),
            extended_l2: true,
            lazy_refcounts: true,
        }
    }
}

impl OverlayOptions {
    /// Checks the options for values that would be misread by `qemu-img` (commas inject
    /// further `-o` options).
    pub fn validate(&self) -> Result<(), OverlayError> {
        let ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        };
        if !ok(&self.backing_format) {
            return Err(OverlayError::InvalidConfig(format!(
                "backing format {:?} is not a plain format name",
                self.backing_format
            )));
        }
        if !ok(&self.cluster_size) {
            return Err(OverlayError::InvalidConfig(format!(
                "cluster size {:?} is not a plain size",
                self.cluster_size
            )));
        }
        if self.qemu_img.as_os_str().is_empty() {
            return Err(OverlayError::InvalidConfig(
                "empty qemu-img path".to_owned(),
            ));
        }
        Ok(())
    }

    /// The `-o` option string.
    pub fn create_options(&self) -> String {
        let mut opts = Vec::new();
        if self.lazy_refcounts {
            opts.push("lazy_refcounts=on".to_owned());
        }
        opts.push(format!("cluster_size={}", self.cluster_size));
        if self.extended_l2 {
            opts.push("extended_l2=on".to_owned());
        }
        opts.join(",")
    }

    /// The full argument list (without the binary) for an overlay of `base` at `target`.
    pub fn create_args(&self, base: &Path, target: &Path) -> Vec<std::ffi::OsString> {
        vec![
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-F".into(),
            self.backing_format.clone().into(),
            "-b".into(),
            base.as_os_str().to_owned(),
            "-o".into(),
            self.create_options().into(),
            target.as_os_str().to_owned(),
        ]
    }
}

/// Resolves `base` to an absolute, symlink-free path and checks that it is a regular file.
///
/// Overlays record this path as their backing file, so it must not depend on the current
/// directory; resolving symlinks also pins an overlay to the image version it was made from.
pub fn resolve_base(base: &Path) -> Result<PathBuf, OverlayError> {
    let abs = std::fs::canonicalize(base).map_err(|source| OverlayError::BaseNotFound {
        path: base.to_path_buf(),
        source,
    })?;
    let meta = std::fs::metadata(&abs).map_err(|source| OverlayError::BaseNotFound {
        path: base.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(OverlayError::BaseNotAFile { path: abs });
    }
    Ok(abs)
}

/// Creates a qcow2 overlay at `target` backed by `base`, returning how long `qemu-img`
/// took. `base` is resolved with [`resolve_base`] first. On failure nothing is left at
/// `target`.
pub async fn create_overlay(
    opts: &OverlayOptions,
    base: &Path,
    target: &Path,
) -> Result<Duration, OverlayError> {
    let base = resolve_base(base)?;
    create_overlay_resolved(opts, &base, target).await
}

/// [`create_overlay`] for a base already resolved by [`resolve_base`].
pub(crate) async fn create_overlay_resolved(
    opts: &OverlayOptions,
    base: &Path,
    target: &Path,
) -> Result<Duration, OverlayError> {
    opts.validate()?;
    let started = Instant::now();
    let output = tokio::process::Command::new(&opts.qemu_img)
        .args(opts.create_args(base, target))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                OverlayError::QemuImgNotFound {
                    path: opts.qemu_img.clone(),
                    source,
                }
            } else {
                OverlayError::QemuImgSpawn {
                    path: opts.qemu_img.clone(),
                    source,
                }
            }
        })?;
    let elapsed = started.elapsed();
    if !output.status.success() {
        remove_quietly(target);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = tail(stderr.trim(), 2000);
        return Err(OverlayError::QemuImgFailed {
            target: target.to_path_buf(),
            status: output.status.to_string(),
            stderr,
        });
    }
    tracing::debug!(
        target = %target.display(),
        base = %base.display(),
        elapsed_us = elapsed.as_micros() as u64,
        "overlay created"
    );
    Ok(elapsed)
}

/// Removes a file, ignoring every error (used on failure paths).
pub(crate) fn remove_quietly(path: &Path) {
    if let Err(err) = std::fs::remove_file(path)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %err, "could not remove overlay");
    }
}

fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_follow_the_documented_command_line() {
        let opts = OverlayOptions::default();
        let args = opts.create_args(Path::new("/img/base.qcow2"), Path::new("/w/o.qcow2"));
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                "/img/base.qcow2",
                "-o",
                "lazy_refcounts=on,cluster_size=128k,extended_l2=on",
                "/w/o.qcow2"
            ]
        );
        let plain = OverlayOptions {
            extended_l2: false,
            ..OverlayOptions::default()
        };
        assert_eq!(
            plain.create_options(),
            "lazy_refcounts=on,cluster_size=128k"
        );
    }

    #[test]
    fn option_injection_is_rejected() {
        let opts = OverlayOptions {
            cluster_size: "64k,preallocation=full".to_owned(),
            ..OverlayOptions::default()
        };
        assert!(matches!(
            opts.validate(),
            Err(OverlayError::InvalidConfig(_))
        ));
    }

    #[test]
    fn tail_keeps_the_end() {
        assert_eq!(tail("abcdef", 10), "abcdef");
        assert_eq!(tail("abcdef", 3), "...def");
    }
}
