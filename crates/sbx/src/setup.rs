//! The unprivileged QEMU user: `sbx setup` creates it, and every start checks that it
//! can reach what QEMU opens before switching QEMU to it.
//!
//! QEMU runs as `sbx-qemu` (its own primary group, no supplementary groups) when the user
//! exists, this process is root, and the kernel says the user can read the kernel, the
//! initramfs and the base images and search the work dir (and open `/dev/kvm` under KVM).
//! Otherwise QEMU runs as this process's user and the reason is reported by `sbx doctor`
//! and logged once at start; the layer is never dropped silently.
//!
//! `sbx setup` (as root) creates the system user and group, then grants the user exactly
//! what it lacks with POSIX ACLs (`setfacl`): search (`x`) on each directory on the way to
//! the assets and the work dir, read on the asset files, and a default ACL on the assets
//! directory so that rebuilt assets stay readable. Nothing else on the host changes; a
//! second run finds nothing to do.

use std::path::{Path, PathBuf};

use probes::QEMU_USER;
use probes::host::{Access, UserAccount, access_gaps, lookup_user};
use sandbox_core::GuestAssets;
use sandbox_core::ports::Accelerator;

use crate::SbxConfig;

/// What QEMU, running as another user, must be able to open: the kernel, the initramfs
/// and each base image that exists (read), the work dir (search: QEMU creates its sockets
/// in per-VM dirs below it that the host shares with its group), and `/dev/kvm` under KVM.
pub fn qemu_user_needs(
    assets: &GuestAssets,
    work_dir: &Path,
    accelerator: Accelerator,
) -> Vec<(PathBuf, Access)> {
    let mut out = vec![
        (assets.kernel.clone(), Access::Read),
        (assets.initramfs.clone(), Access::Read),
    ];
    out.extend(
        assets
            .images
            .values()
            .filter(|p| p.is_file())
            .map(|p| (p.clone(), Access::Read)),
    );
    out.push((work_dir.to_path_buf(), Access::Search));
    if accelerator == Accelerator::Kvm {
        out.push((PathBuf::from("/dev/kvm"), Access::ReadWrite));
    }
    out
}

/// One line naming each missing permission.
pub fn describe_gaps(user: &str, gaps: &[(PathBuf, Access)]) -> String {
    let items: Vec<String> = gaps
        .iter()
        .map(|(p, a)| format!("{} {}", a.as_str(), p.display()))
        .collect();
    format!("{user} cannot {}", items.join(", "))
}

/// Who QEMU runs as, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuUser {
    /// The dedicated user, with everything it needs.
    Dedicated(UserAccount),
    /// This process's user, and why.
    Caller {
        /// This process's uid.
        uid: u32,
        /// Why not the dedicated user.
        reason: String,
    },
}

impl QemuUser {
    /// In words, for `sbx doctor` and logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Dedicated(u) => format!("{} (uid {}, gid {})", u.name, u.uid, u.gid),
            Self::Caller { uid, reason } => format!("uid {uid}, this process's user: {reason}"),
        }
    }
}

/// Decides who QEMU runs as, for the assets in `assets_dir` and VMs below `work_dir`, on
/// the host `report` describes.
pub async fn qemu_user(
    report: &probes::HostReport,
    assets_dir: &Path,
    work_dir: &Path,
) -> QemuUser {
    let caller = |reason: String| QemuUser::Caller {
        uid: report.current_uid,
        reason,
    };
    let Some(user) = report.qemu_run_as() else {
        return caller(match &report.qemu_user {
            None => format!("user {QEMU_USER} does not exist (run `sbx setup` as root)"),
            Some(_) if report.current_uid != 0 => {
                format!("{QEMU_USER} exists, but switching to it needs root")
            }
            Some(_) => format!("{QEMU_USER} is this process's user"),
        });
    };
    let assets = GuestAssets::in_dir(assets_dir);
    let needs = qemu_user_needs(&assets, work_dir, report.accelerator());
    match access_gaps(user, &needs).await {
        Ok(gaps) if gaps.is_empty() => QemuUser::Dedicated(user.clone()),
        Ok(gaps) => caller(format!(
            "{}; run `sbx setup` as root",
            describe_gaps(&user.name, &gaps)
        )),
        Err(e) => caller(format!("cannot check {}'s access: {e}", user.name)),
    }
}

/// The isolation layers for QEMU on this host, with the user switch only when
/// [`qemu_user`] allows it (a refusal by an existing user is logged once, here).
pub async fn isolation(
    report: &probes::HostReport,
    assets_dir: &Path,
    work_dir: &Path,
) -> (qemu_cmd::Isolation, QemuUser) {
    let user = qemu_user(report, assets_dir, work_dir).await;
    let mut isolation = qemu_cmd::Isolation::from_report(report);
    if let QemuUser::Caller { reason, .. } = &user {
        if isolation.run_as.is_some() {
            tracing::warn!("QEMU runs as this process's user: {reason}");
        }
        isolation.run_as = None;
    }
    (isolation, user)
}

/// Runs a setup command, failing with its output.
fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "{program} not found{}",
                if program == "setfacl" {
                    ": install the acl package"
                } else {
                    ""
                }
            ),
            _ => format!("{program}: {e}"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Every directory from `/` down to `dir`, outermost first.
fn dirs_down_to(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = dir.ancestors().map(Path::to_path_buf).collect();
    out.reverse();
    out
}

/// `sbx setup`: creates the `sbx-qemu` user when missing and grants it what it lacks on
/// the assets and the work dir of `cfg`. Needs root. Returns what it did, line by line.
pub async fn setup(cfg: &SbxConfig) -> Result<Vec<String>, String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(format!(
            "sbx setup must run as root: it creates the {QEMU_USER} system user and grants \
             it access to the guest assets"
        ));
    }
    let mut done = Vec::new();
    let passwd = Path::new("/etc/passwd");
    let user = match lookup_user(passwd, QEMU_USER) {
        Some(u) => {
            done.push(format!("user {QEMU_USER} exists (uid {})", u.uid));
            u
        }
        None => {
            run(
                "useradd",
                &[
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--comment",
                    "sbx QEMU",
                    QEMU_USER,
                ]
                .map(std::ffi::OsStr::new),
            )?;
            let u = lookup_user(passwd, QEMU_USER)
                .ok_or_else(|| format!("useradd succeeded but {QEMU_USER} is not in {passwd:?}"))?;
            done.push(format!(
                "created system user {QEMU_USER} (uid {}, gid {})",
                u.uid, u.gid
            ));
            u
        }
    };
    let assets = GuestAssets::in_dir(&cfg.assets_dir);
    if !assets.kernel.is_file() {
        return Err(format!(
            "no guest assets in {}: build them first (`cargo xtask assets`), then run \
             `sbx setup` again",
            cfg.assets_dir.display()
        ));
    }
    std::fs::create_dir_all(&cfg.work_dir)
        .map_err(|e| format!("cannot create work dir {}: {e}", cfg.work_dir.display()))?;
    let acl = |spec: String, path: &Path, default: bool| {
        let mut args = vec![std::ffi::OsStr::new("-m"), spec.as_ref(), path.as_os_str()];
        if default {
            args.insert(0, std::ffi::OsStr::new("-d"));
        }
        run("setfacl", &args)
    };
    let gaps = async |wanted: &[(PathBuf, Access)]| {
        access_gaps(&user, wanted)
            .await
            .map_err(|e| format!("checking {QEMU_USER}'s access: {e}"))
    };
    let mut grant = |missing: Vec<(PathBuf, Access)>| -> Result<(), String> {
        for (path, access) in missing {
            acl(format!("u:{QEMU_USER}:{}", access.letters()), &path, false)?;
            done.push(format!(
                "granted {QEMU_USER} {} on {}",
                access.as_str(),
                path.display()
            ));
        }
        Ok(())
    };
    // Search on every directory on the way first: a file below a closed directory looks
    // unreadable even when its own mode allows reading, and needs no ACL of its own.
    let mut dirs = dirs_down_to(&cfg.assets_dir);
    dirs.extend(dirs_down_to(&cfg.work_dir));
    dirs.sort();
    dirs.dedup();
    let wanted: Vec<(PathBuf, Access)> = dirs.into_iter().map(|d| (d, Access::Search)).collect();
    grant(gaps(&wanted).await?)?;
    // Then what QEMU opens; rebuilt assets inherit read access.
    acl(format!("u:{QEMU_USER}:rX"), &cfg.assets_dir, true)?;
    let report = probes::host_report().await;
    let needs = qemu_user_needs(&assets, &cfg.work_dir, report.accelerator());
    grant(gaps(&needs).await?)?;
    let gaps = gaps(&needs).await?;
    if !gaps.is_empty() {
        return Err(describe_gaps(QEMU_USER, &gaps));
    }
    done.push(format!(
        "QEMU will run as {QEMU_USER} (uid {}) for assets in {} and work dir {}",
        user.uid,
        cfg.assets_dir.display(),
        cfg.work_dir.display()
    ));
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_cover_what_qemu_opens() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("python-base-x86_64.qcow2"), b"").unwrap();
        let assets = GuestAssets::in_dir(tmp.path());
        let needs = qemu_user_needs(&assets, Path::new("/w"), Accelerator::Tcg);
        assert_eq!(
            needs,
            vec![
                (tmp.path().join("vmlinux"), Access::Read),
                (tmp.path().join("initramfs.cpio.zst"), Access::Read),
                (tmp.path().join("python-base-x86_64.qcow2"), Access::Read),
                (PathBuf::from("/w"), Access::Search),
            ],
            "images that are not built are not required"
        );
        let kvm = qemu_user_needs(&assets, Path::new("/w"), Accelerator::Kvm);
        assert_eq!(
            kvm.last(),
            Some(&(PathBuf::from("/dev/kvm"), Access::ReadWrite))
        );
    }

    #[test]
    fn gaps_are_named() {
        let s = describe_gaps(
            "sbx-qemu",
            &[
                (PathBuf::from("/root"), Access::Search),
                (PathBuf::from("/a/vmlinux"), Access::Read),
            ],
        );
        assert_eq!(s, "sbx-qemu cannot search /root, read /a/vmlinux");
    }

    #[test]
    fn dirs_down_to_lists_every_level() {
        assert_eq!(
            dirs_down_to(Path::new("/root/.cache/sbx")),
            ["/", "/root", "/root/.cache", "/root/.cache/sbx"].map(PathBuf::from)
        );
    }
}
