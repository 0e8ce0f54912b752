//! The QEMU binary: where it is, which version, which features this build supports.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::cmd;
use crate::error::ProbeError;

/// The QEMU system emulator sbx runs.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// QMP input that makes a `-qmp stdio` QEMU leave cleanly.
const QMP_QUIT: &[u8] = b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n";

/// The `-sandbox` option sbx passes when QEMU supports it.
pub const SANDBOX_ARG: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// A QEMU version (`major.minor.micro`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct QemuVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

impl QemuVersion {
    /// A version from its parts.
    pub const fn new(major: u32, minor: u32, micro: u32) -> Self {
        Self {
            major,
            minor,
            micro,
        }
    }

    /// Parses the output of `qemu-system-x86_64 --version`
    /// (`QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2...)`).
    pub fn parse(output: &str) -> Option<Self> {
        let line = output.lines().find(|l| l.contains("version"))?;
        let rest = &line[line.find("version")? + "version".len()..];
        let token = rest.split_whitespace().next()?;
        let mut parts = token
            .split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .map(str::parse::<u32>);
        let major = parts.next()?.ok()?;
        let minor = parts.next()?.ok()?;
        let micro = match parts.next() {
            Some(p) => p.ok()?,
            None => 0,
        };
        Some(Self::new(major, minor, micro))
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// What the probes learned about the QEMU binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QemuInfo {
    /// Absolute path of the binary.
    pub path: PathBuf,
    /// Parsed version.
    pub version: QemuVersion,
    /// First line of `--version`, verbatim (part of cache keys).
    pub version_line: String,
    /// `-sandbox on,...` (seccomp) is supported.
    pub sandbox: bool,
    /// The `microvm` machine type exists.
    pub microvm: bool,
    /// This build accepts `aio=io_uring` on a file (QEMU side only; see
    /// [`crate::IoUringStatus`] for the host side).
    pub io_uring_aio: bool,
    /// `-run-with exit-with-parent=on` is supported.
    pub exit_with_parent: bool,
    /// The qboot firmware for direct PVH boot, if shipped.
    pub qboot_rom: Option<PathBuf>,
}

/// Finds the QEMU binary: `override_path` (from `SBX_QEMU`) if given, else
/// [`QEMU_BINARY`] in the directories of `path_env` (a `PATH`-style list).
pub fn locate_qemu(
    override_path: Option<&Path>,
    path_env: Option<&OsStr>,
) -> Result<PathBuf, ProbeError> {
    if let Some(path) = override_path {
        return if is_executable(path) {
            Ok(path.to_path_buf())
        } else {
            Err(ProbeError::QemuNotFound {
                searched: format!("SBX_QEMU={}", path.display()),
            })
        };
    }
    find_in_path(QEMU_BINARY, path_env).ok_or_else(|| ProbeError::QemuNotFound {
        searched: format!(
            "{QEMU_BINARY} in PATH={}",
            path_env.map(|p| p.to_string_lossy()).unwrap_or_default()
        ),
    })
}

/// Looks `name` up in a `PATH`-style list of directories.
pub fn find_in_path(name: &str, path_env: Option<&OsStr>) -> Option<PathBuf> {
    let path_env = path_env?;
    std::env::split_paths(path_env)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Where `qboot.rom` is looked for: the binary's `../share/qemu`, then `extra_dirs`.
pub fn find_qboot(qemu: &Path, extra_dirs: &[PathBuf]) -> Option<PathBuf> {
    let beside = qemu
        .parent()
        .and_then(Path::parent)
        .map(|prefix| prefix.join("share/qemu"));
    beside
        .into_iter()
        .chain(extra_dirs.iter().cloned())
        .map(|dir| dir.join("qboot.rom"))
        .find(|p| p.is_file())
}

/// Runs `qemu --version` and parses it.
pub async fn probe_version(
    qemu: &Path,
    timeout: Duration,
) -> Result<(QemuVersion, String), ProbeError> {
    let out = cmd::run(qemu.as_os_str(), ["--version"], None, timeout)
        .await
        .map_err(|e| match e {
            ProbeError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ProbeError::QemuNotFound {
                    searched: qemu.display().to_string(),
                }
            }
            other => other,
        })?;
    if !out.status.success() {
        return Err(ProbeError::QemuUnusable {
            path: qemu.to_path_buf(),
            reason: format!("--version failed ({}): {}", out.status, out.stderr_line()),
        });
    }
    let line = out.stdout.lines().next().unwrap_or("").trim().to_owned();
    let version = QemuVersion::parse(&out.stdout).ok_or_else(|| ProbeError::QemuVersion {
        output: line.clone(),
    })?;
    Ok((version, line))
}

/// Runs a paused, machine-less QEMU with `extra` arguments and a QMP `quit` on stdin.
/// True when QEMU accepted the arguments and exited cleanly.
async fn accepts(qemu: &Path, extra: &[OsString], timeout: Duration) -> bool {
    let mut args: Vec<OsString> = [
        "-machine",
        "none",
        "-S",
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-qmp",
        "stdio",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.extend(extra.iter().cloned());
    match cmd::run(qemu.as_os_str(), &args, Some(QMP_QUIT), timeout).await {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            tracing::debug!(?extra, status = %out.status, stderr = %out.stderr_line(), "QEMU refused probe arguments");
            false
        }
        Err(err) => {
            tracing::debug!(?extra, %err, "QEMU feature probe failed");
            false
        }
    }
}

/// `-sandbox on,...` works (QEMU built with seccomp and the host allows it).
pub async fn probe_sandbox(qemu: &Path, timeout: Duration) -> bool {
    accepts(qemu, &["-sandbox".into(), SANDBOX_ARG.into()], timeout).await
}

/// `-run-with exit-with-parent=on` is accepted.
pub async fn probe_exit_with_parent(qemu: &Path, timeout: Duration) -> bool {
    accepts(
        qemu,
        &["-run-with".into(), "exit-with-parent=on".into()],
        timeout,
    )
    .await
}

/// A file block device with `aio=io_uring` opens (this QEMU is built with io_uring and
/// the host lets it set up a ring).
pub async fn probe_io_uring_aio(qemu: &Path, timeout: Duration) -> bool {
    let file = match tempfile::NamedTempFile::new() {
        Ok(f) => f,
        Err(err) => {
            tracing::debug!(%err, "cannot create io_uring probe file");
            return false;
        }
    };
    if file.as_file().set_len(4096).is_err() {
        return false;
    }
    let mut spec =
        OsString::from("driver=file,aio=io_uring,read-only=on,node-name=probe0,filename=");
    spec.push(file.path().as_os_str());
    accepts(qemu, &["-blockdev".into(), spec], timeout).await
}

/// The `microvm` machine type is listed by `-machine help`.
pub async fn probe_microvm(qemu: &Path, timeout: Duration) -> bool {
    match cmd::run(qemu.as_os_str(), ["-machine", "help"], None, timeout).await {
        Ok(out) => out
            .stdout
            .lines()
            .any(|l| l.split_whitespace().next() == Some("microvm")),
        Err(err) => {
            tracing::debug!(%err, "`-machine help` failed");
            false
        }
    }
}

/// Probes everything about the binary at `qemu`, concurrently.
pub async fn probe_qemu(
    qemu: &Path,
    data_dirs: &[PathBuf],
    timeout: Duration,
) -> Result<QemuInfo, ProbeError> {
    let (version, sandbox, microvm, io_uring_aio, exit_with_parent) = tokio::join!(
        probe_version(qemu, timeout),
        probe_sandbox(qemu, timeout),
        probe_microvm(qemu, timeout),
        probe_io_uring_aio(qemu, timeout),
        probe_exit_with_parent(qemu, timeout),
    );
    let (version, version_line) = version?;
    Ok(QemuInfo {
        path: qemu.to_path_buf(),
        version,
        version_line,
        sandbox,
        microvm,
        io_uring_aio,
        exit_with_parent,
        qboot_rom: find_qboot(qemu, data_dirs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parses_debian_version_line() {
        let out = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n\
                   Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(QemuVersion::parse(out), Some(QemuVersion::new(10, 0, 2)));
        assert_eq!(
            QemuVersion::parse("QEMU emulator version 9.1.50\n"),
            Some(QemuVersion::new(9, 1, 50))
        );
        assert_eq!(
            QemuVersion::parse("QEMU emulator version 7.2\n"),
            Some(QemuVersion::new(7, 2, 0))
        );
        assert_eq!(QemuVersion::parse("hello world"), None);
        assert_eq!(QemuVersion::parse("version x.y"), None);
        assert!(QemuVersion::new(10, 0, 2) > QemuVersion::new(9, 2, 99));
    }

    fn fake_exe(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn locates_via_override_then_path() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let in_b = fake_exe(&b, QEMU_BINARY);
        // Non-executable file earlier in PATH is skipped.
        std::fs::write(a.join(QEMU_BINARY), "x").unwrap();
        let path = std::env::join_paths([&a, &b]).unwrap();
        assert_eq!(locate_qemu(None, Some(&path)).unwrap(), in_b);

        let custom = fake_exe(tmp.path(), "my-qemu");
        assert_eq!(locate_qemu(Some(&custom), Some(&path)).unwrap(), custom);

        let err = locate_qemu(Some(&tmp.path().join("nope")), Some(&path)).unwrap_err();
        assert!(matches!(err, ProbeError::QemuNotFound { .. }));
        assert!(
            err.to_string()
                .starts_with("QEMU not found: install qemu-system-x86")
        );

        let err = locate_qemu(None, Some(a.as_os_str())).unwrap_err();
        assert!(matches!(err, ProbeError::QemuNotFound { .. }));
        assert!(locate_qemu(None, None).is_err());
    }

    #[test]
    fn finds_qboot_beside_the_binary_or_in_data_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("prefix/bin");
        std::fs::create_dir_all(&bin).unwrap();
        let qemu = fake_exe(&bin, QEMU_BINARY);
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        assert_eq!(find_qboot(&qemu, std::slice::from_ref(&data)), None);
        std::fs::write(data.join("qboot.rom"), b"rom").unwrap();
        assert_eq!(
            find_qboot(&qemu, std::slice::from_ref(&data)),
            Some(data.join("qboot.rom"))
        );
        let share = tmp.path().join("prefix/share/qemu");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::write(share.join("qboot.rom"), b"rom").unwrap();
        assert_eq!(find_qboot(&qemu, &[data]), Some(share.join("qboot.rom")));
    }

    #[tokio::test]
    async fn fake_qemu_version_and_failures() {
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("good");
        std::fs::write(
            &good,
            "#!/bin/sh\necho 'QEMU emulator version 10.1.0 (fake)'\n",
        )
        .unwrap();
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (v, line) = probe_version(&good, Duration::from_secs(5)).await.unwrap();
        assert_eq!(v, QemuVersion::new(10, 1, 0));
        assert_eq!(line, "QEMU emulator version 10.1.0 (fake)");

        let bad = tmp.path().join("bad");
        std::fs::write(&bad, "#!/bin/sh\necho boom >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = probe_version(&bad, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");

        let slow = tmp.path().join("slow");
        std::fs::write(&slow, "#!/bin/sh\nexec sleep 10\n").unwrap();
        std::fs::set_permissions(&slow, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = probe_version(&slow, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::Timeout { .. }), "{err}");

        let err = probe_version(&tmp.path().join("missing"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::QemuNotFound { .. }), "{err}");
    }
}
