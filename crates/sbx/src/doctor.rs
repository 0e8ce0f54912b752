//! `sbx doctor`: what this host can do, and what is missing, with the fix.

use std::path::Path;

use sandbox_core::{GuestAssets, Language};
use serde::Serialize;

use crate::SbxConfig;

/// One check of the doctor report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether sbx can run with it as it is.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// How to fix it, when not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// One isolation layer: whether it applies on this host, what it stops, how to turn it on.
#[derive(Debug, Clone, Serialize)]
pub struct Layer {
    /// Short name.
    pub name: String,
    /// Whether the layer applies here.
    pub on: bool,
    /// What it stops.
    pub stops: String,
    /// What was found.
    pub detail: String,
    /// How to turn it on, when off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn layer(name: &str, on: bool, stops: &str, detail: String, fix: Option<&str>) -> Layer {
    Layer {
        name: name.to_owned(),
        on,
        stops: stops.to_owned(),
        detail,
        fix: if on { None } else { fix.map(str::to_owned) },
    }
}

/// The doctor report.
#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    /// True when sbx can run code on this host.
    pub ok: bool,
    /// The checks, in order.
    pub checks: Vec<Check>,
    /// Every isolation layer, on or off here (see README, "Isolation layers").
    pub layers: Vec<Layer>,
    /// Isolation layers or features that cannot be applied here.
    pub warnings: Vec<String>,
    /// The raw probe report.
    pub host: probes::HostReport,
}

fn check(name: &str, ok: bool, detail: String, fix: Option<&str>) -> Check {
    Check {
        name: name.to_owned(),
        ok,
        detail,
        fix: if ok { None } else { fix.map(str::to_owned) },
    }
}

fn manifest_summary(dir: &Path) -> String {
    let path = dir.join("manifest.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => {
                let n = v
                    .get("assets")
                    .and_then(|a| {
                        a.as_array()
                            .map(Vec::len)
                            .or_else(|| a.as_object().map(|o| o.len()))
                    })
                    .unwrap_or(0);
                format!("manifest lists {n} assets")
            }
            Err(_) => "manifest.json unreadable".to_owned(),
        },
        Err(_) => "no manifest.json".to_owned(),
    }
}

/// The L1 snapshot store: off, or its dir, what it holds, and whether QEMU's user can
/// reach it (clones map the published RAM files).
async fn snapshots_check(cfg: &SbxConfig, host: &probes::HostReport) -> Check {
    use sandbox_core::snapshot::SnapshotStore as _;
    let fix = Some(
        "make the dir reachable by QEMU's user (`sbx setup` does for the default \
         ~/.cache/sbx/snapshots), or set SBX_SNAPSHOTS=0",
    );
    let Some(dir) = &cfg.snapshot_dir else {
        return check(
            "snapshots",
            true,
            "off (SBX_SNAPSHOTS=0): every VM boots cold".to_owned(),
            None,
        );
    };
    let store = match snapshot_store::FsSnapshotStore::open(dir.clone()) {
        Ok(store) => store,
        Err(e) => return check("snapshots", false, format!("{}: {e}", dir.display()), fix),
    };
    let held = match store.list().await {
        Ok(entries) => {
            let bytes: u64 = entries
                .iter()
                .filter_map(|e| e.manifest.as_ref())
                .map(|m| m.ram.size + m.state.size)
                .sum();
            format!("{} published, {} MiB", entries.len(), bytes >> 20)
        }
        Err(e) => format!("cannot list: {e}"),
    };
    let reach = match host.qemu_run_as() {
        Some(user) => {
            match probes::host::access_gaps(user, &[(dir.clone(), probes::host::Access::Search)])
                .await
            {
                Ok(gaps) if gaps.is_empty() => Ok(format!("reachable by {}", user.name)),
                Ok(gaps) => Err(crate::setup::describe_gaps(&user.name, &gaps)),
                Err(e) => Err(format!("cannot check {}'s access: {e}", user.name)),
            }
        }
        None => Ok("QEMU runs as this process's user".to_owned()),
    };
    match reach {
        Ok(reach) => check(
            "snapshots",
            true,
            format!("{} ({held}; {reach})", dir.display()),
            None,
        ),
        Err(gap) => check(
            "snapshots",
            false,
            format!("{} ({held}): {gap}", dir.display()),
            fix,
        ),
    }
}

/// Builds the report for `cfg`.
pub async fn doctor(cfg: &SbxConfig) -> DoctorReport {
    let host = probes::host_report().await.clone();
    let mut checks = Vec::new();
    match &host.qemu {
        Ok(q) => checks.push(check(
            "qemu",
            q.microvm,
            format!(
                "{} ({}); sandbox={}, io_uring={}, exit-with-parent={}, qboot={}",
                q.path.display(),
                q.version_line,
                q.sandbox,
                q.io_uring_aio,
                q.exit_with_parent,
                q.qboot_rom
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none".into())
            ),
            Some("install qemu-system-x86 10.x from bookworm-backports (scripts/setup-host.sh)"),
        )),
        Err(e) => checks.push(check(
            "qemu",
            false,
            e.clone(),
            Some("install qemu-system-x86 (10.x from bookworm-backports): run scripts/setup-host.sh as root"),
        )),
    }
    checks.push(check(
        "accelerator",
        true,
        format!(
            "{}: {}",
            host.accelerator.accelerator, host.accelerator.reason
        ),
        None,
    ));
    checks.push(check(
        "cgroups",
        true,
        if host.cgroup.v2_usable {
            format!("cgroup v2 delegated: {}", host.cgroup.detail)
        } else {
            format!("rlimit fallback: {}", host.cgroup.detail)
        },
        None,
    ));
    let assets = GuestAssets::in_dir(&cfg.assets_dir);
    for lang in Language::ALL {
        let r = assets.check(lang);
        checks.push(check(
            &format!("assets:{lang}"),
            r.is_ok(),
            match r {
                Ok(image) => format!(
                    "{} ({})",
                    image.display(),
                    manifest_summary(&cfg.assets_dir)
                ),
                Err(e) => e.message().to_owned(),
            },
            Some("build the guest assets: cargo xtask assets"),
        ));
    }
    // The user exists and could be used, but cannot reach what QEMU opens: a broken
    // setup. A missing user is a warning (the host report carries it), not a failure.
    let qemu_user = crate::setup::qemu_user(&host, &cfg.assets_dir, &cfg.work_dir).await;
    let misconfigured =
        matches!(qemu_user, crate::setup::QemuUser::Caller { .. }) && host.qemu_run_as().is_some();
    checks.push(check(
        "qemu_user",
        !misconfigured,
        qemu_user.describe(),
        Some("run `sbx setup` as root (creates sbx-qemu, grants it access to the assets)"),
    ));
    checks.push(snapshots_check(cfg, &host).await);
    checks.push(check(
        "warm_pool",
        true,
        format!("{} VMs per language (SBX_WARM_POOL)", cfg.warm_pool_size),
        None,
    ));
    let ok = checks.iter().all(|c| c.ok);
    let layers = layers(&host, &qemu_user, cfg);
    DoctorReport {
        ok,
        checks,
        layers,
        warnings: host.warnings.clone(),
        host,
    }
}

/// The isolation layers as they apply on this host.
fn layers(
    host: &probes::HostReport,
    qemu_user: &crate::setup::QemuUser,
    cfg: &SbxConfig,
) -> Vec<Layer> {
    let kvm = host.accelerator.accelerator == sandbox_core::ports::Accelerator::Kvm;
    let sandbox = host.qemu.as_ref().is_ok_and(|q| q.sandbox);
    let unprivileged = !matches!(qemu_user, crate::setup::QemuUser::Caller { .. });
    let allowed = cfg
        .network
        .as_ref()
        .map(|n| {
            n.allowed_ranges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    vec![
        layer(
            "hardware_virtualization",
            kvm,
            "guest code reaching the host CPU's privileged state (under TCG the guest is \
             emulated instead: isolated, slower)",
            format!(
                "{}: {}",
                host.accelerator.accelerator, host.accelerator.reason
            ),
            Some("a host whose /dev/kvm runs ordinary guests"),
        ),
        layer(
            "qemu_seccomp",
            sandbox,
            "an escaped QEMU calling obsolete syscalls, elevating privileges, spawning \
             processes or changing resource controls (-sandbox on)",
            format!("QEMU -sandbox support: {sandbox}"),
            Some("a QEMU built with seccomp (qemu-system-x86 from bookworm-backports)"),
        ),
        layer(
            "namespaces",
            host.unshare.usable,
            "an escaped QEMU seeing the host's processes, mounts, IPC, host name and (offline \
             VMs) network",
            host.unshare.detail.clone(),
            Some("install util-linux's unshare and allow unprivileged namespaces"),
        ),
        layer(
            "resource_limits",
            true,
            "one VM exhausting the host's memory or CPU",
            if host.cgroup.v2_usable {
                "per-VM cgroup v2 limits".to_owned()
            } else {
                "rlimits on QEMU (cgroup v2 controllers not delegated)".to_owned()
            },
            None,
        ),
        layer(
            "qemu_user",
            unprivileged,
            "an escaped QEMU acting as the caller (root): reading other files, signalling \
             other processes",
            qemu_user.describe(),
            Some("run `sbx setup` as root"),
        ),
        layer(
            "network_gateway",
            true,
            "guests reaching the host, its loopback, link-local/metadata, multicast, private \
             (RFC 1918), shared (100.64/10), IETF (192.0.0/24), benchmarking (198.18/15) and \
             reserved ranges, and DNS answers into them (rebinding); per-VM caps on \
             connections, their rate, DNS-over-TCP and forwards; denial logs rate-limited",
            if allowed.is_empty() {
                "no special-purpose range allowed".to_owned()
            } else {
                format!("operator-allowed ranges: {}", allowed.join(", "))
            },
            None,
        ),
        layer(
            "guest_hardening",
            true,
            "user code (uid 1000, no-new-privs, non-dumpable REPLs) writing the root, /etc, \
             /dev or sysctls, reading the kernel log or writing to it or to the console, \
             forging an exec's completion",
            "enforced by the guest agent (PID 1) in every VM".to_owned(),
            None,
        ),
    ]
}

impl DoctorReport {
    /// Human-readable text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!(
                "{} {:<18} {}\n",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            ));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("     {:<18} fix: {fix}\n", ""));
            }
        }
        for l in &self.layers {
            out.push_str(&format!(
                "{} layer {:<24} {}\n",
                if l.on { "on  " } else { "off " },
                l.name,
                l.detail
            ));
            if let Some(fix) = &l.fix {
                out.push_str(&format!("     {:<30} fix: {fix}\n", ""));
            }
        }
        for w in &self.warnings {
            out.push_str(&format!("warn {w}\n"));
        }
        out.push_str(if self.ok {
            "sbx can run here.\n"
        } else {
            "sbx cannot run here until the failures above are fixed.\n"
        });
        out
    }
}
