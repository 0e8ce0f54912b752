//! `cargo xtask boot-smoke`: boot each base image under QEMU, ping the agent, power off.
//!
//! For every image it prints the time from QEMU spawn to the agent's pong and QEMU's peak
//! RSS, beside a baseline measured in the same run: Debian's generic cloud kernel booting a
//! trivial initramfs to `/init` (when that kernel is installed; `--baseline` installs it
//! into the cache from the Debian archive).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use guest_proto::HostMessage;
use sandbox_core::VmId;
use sandbox_core::ports::{
    Accelerator, ConsoleSpec, GuestChannel, GuestConnection, VmProcess, VmSpec,
};

use crate::assets::{Assets, Image};

/// One boot measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BootSample {
    /// QEMU spawn to the agent's pong.
    pub spawn_to_pong_ms: u64,
    /// Guest-side boot time reported by the agent.
    pub guest_boot_ms: Option<u64>,
    /// The agent's own setup as PID 1 (mounts, hardening, network), microseconds of
    /// guest time.
    pub guest_setup_us: Option<u64>,
    /// QEMU's peak RSS (VmHWM), KiB.
    pub qemu_peak_rss_kib: Option<u64>,
    /// Pong to QEMU exit after the Shutdown request.
    pub shutdown_ms: u64,
}

/// A `kB` field (e.g. `VmHWM:`) of a `/proc/<pid>/status` file.
pub fn status_kib(status: &Path, field: &str) -> Option<u64> {
    std::fs::read_to_string(status)
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    status_kib(Path::new(&format!("/proc/{pid}/status")), "VmHWM:")
}

/// Everything needed to boot VMs directly through the adapters.
#[allow(missing_debug_implementations)]
pub struct Booter {
    hv: qemu_cmd::QemuHypervisor,
    channel: qemu_cmd::SerialGuestChannel,
    accelerator: Accelerator,
    work: tempfile::TempDir,
}

impl Booter {
    /// Probes the host and prepares a scratch dir. QEMU runs as whom `sbx` would run it
    /// as for `assets` (see `sbx::setup`).
    pub async fn new(assets: &Assets) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let report = probes::host_report().await;
        let work = tempfile::Builder::new()
            .prefix("sbx-smoke-")
            .permissions(std::fs::Permissions::from_mode(0o711))
            .tempdir_in("/tmp")
            .context("scratch dir")?;
        let (isolation, _) = sbx::setup::isolation(report, &assets.dir, work.path()).await;
        let hv = qemu_cmd::QemuHypervisor::from_report(report)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_isolation(isolation);
        let channel = qemu_cmd::SerialGuestChannel::new(hv.qemu_uid());
        Ok(Self {
            hv,
            channel,
            accelerator: report.accelerator(),
            work,
        })
    }

    /// The accelerator chosen by the probes.
    pub fn accelerator(&self) -> Accelerator {
        self.accelerator
    }

    /// Boots `image` once, pings, powers off.
    pub async fn boot(
        &self,
        assets: &Assets,
        image: &Path,
        timeout: Duration,
    ) -> Result<BootSample> {
        let vm_id = VmId::new();
        let dir = self.work.path().join(vm_id.short());
        std::fs::create_dir_all(&dir)?;
        let disk = dir.join("overlay.qcow2");
        overlay::create_overlay(&overlay::OverlayOptions::default(), image, &disk)
            .await
            .map_err(|e| anyhow::anyhow!("overlay: {e}"))?;
        let spec = VmSpec {
            vm_id,
            work_dir: dir.clone(),
            kernel: assets.vmlinux.clone(),
            initramfs: assets.initramfs.clone(),
            disk,
            memory_mb: 192,
            memory: Default::default(),
            home_disk_mb: None,
            package_layer: None,
            vcpus: 1,
            accelerator: self.accelerator,
            agent_socket: dir.join("agent.sock"),
            qmp_socket: dir.join("qmp.sock"),
            network: None,
            console: ConsoleSpec {
                log_path: dir.join("console.log"),
                max_bytes: 64 * 1024,
                lines: None,
                verbose: false,
            },
            kernel_args: Vec::new(),
        };
        let started = Instant::now();
        let process: Arc<dyn VmProcess> = Arc::new(
            self.hv
                .spawn(&spec)
                .await
                .map_err(|e| anyhow::anyhow!("spawn: {e}"))?,
        );
        let connect = self.channel.connect(&spec.agent_socket, timeout);
        let outcome = tokio::select! {
            exit = process.wait_exit() => Err(anyhow::anyhow!(
                "QEMU exited during boot ({exit}); stderr:\n{}\nconsole:\n{}",
                process.stderr_tail(), process.console_tail()
            )),
            r = tokio::time::timeout(timeout, connect) => match r {
                Ok(Ok(pair)) => Ok(pair),
                Ok(Err(e)) => Err(anyhow::anyhow!("{e}\nconsole:\n{}", process.console_tail())),
                Err(_) => Err(anyhow::anyhow!(
                    "no pong within {} s; console:\n{}", timeout.as_secs(), process.console_tail()
                )),
            },
        };
        let (conn, info) = match outcome {
            Ok(pair) => pair,
            Err(e) => {
                let _ = process.kill(Duration::from_millis(200)).await;
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let spawn_to_pong = started.elapsed();
        let rss = process.pid().and_then(vm_hwm_kib);
        let conn: Arc<dyn GuestConnection> = Arc::from(conn);
        let pong_at = Instant::now();
        let _ = conn.request(HostMessage::Shutdown).await;
        let clean = tokio::time::timeout(Duration::from_secs(10), process.wait_exit())
            .await
            .is_ok();
        let shutdown = pong_at.elapsed();
        conn.close().await;
        let _ = process.kill(Duration::from_millis(200)).await;
        let _ = std::fs::remove_dir_all(&dir);
        if !clean {
            bail!("the guest did not power off within 10 s after Shutdown");
        }
        Ok(BootSample {
            spawn_to_pong_ms: spawn_to_pong.as_millis() as u64,
            guest_boot_ms: info.boot_ms,
            guest_setup_us: info.setup_us,
            qemu_peak_rss_kib: rss,
            shutdown_ms: shutdown.as_millis() as u64,
        })
    }
}

/// The median of `v` (sorted copy).
pub fn median(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len() / 2).copied().unwrap_or(0)
}

/// Percentile `p` (0–100) of `v`.
pub fn percentile(v: &[u64], p: f64) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    if s.is_empty() {
        return 0;
    }
    let idx = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[idx.min(s.len() - 1)]
}

/// Boots Debian's cloud kernel with a busybox `/init` that reboots at once; returns the
/// wall time from spawn to QEMU exit. `None` when no cloud kernel is available.
pub fn baseline_boot(cache: &Path) -> Result<Option<u64>> {
    let Some(kernel) = crate::baseline::cloud_kernel(cache)? else {
        return Ok(None);
    };
    let initrd = crate::baseline::busybox_initramfs(cache)?;
    let qemu = crate::assets::tools::which("qemu-system-x86_64")
        .context("qemu-system-x86_64 not found")?;
    let started = Instant::now();
    let mut child = std::process::Command::new(qemu)
        .args([
            "-M",
            "microvm,isa-serial=on,rtc=off",
            "-accel",
            "tcg,thread=single",
            "-cpu",
            // The same guest CPU as sbx's own VMs, so the ratio compares kernels only.
            qemu_cmd::TCG_CPU,
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "none",
            "-no-reboot",
            "-kernel",
        ])
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyS0 quiet reboot=t panic=-1 rdinit=/init tsc=reliable no_timer_check lpj=1000000",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("spawn baseline QEMU")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("baseline kernel did not reach /init and reboot within 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(Some(started.elapsed().as_millis() as u64))
}

/// Runs the smoke test over `images`, `runs` boots each; prints a table and returns JSON.
pub async fn run(assets: &Assets, images: &[Image], runs: usize) -> Result<serde_json::Value> {
    let booter = Booter::new(assets).await?;
    println!(
        "boot-smoke: accelerator {} ({})",
        booter.accelerator(),
        probes::host_report().await.accelerator.reason
    );
    if booter.accelerator() == Accelerator::Tcg {
        println!("boot-smoke: KVM cannot run a guest on this host: KVM boots skipped, TCG only");
    }
    let baseline = match baseline_boot(&assets.dir) {
        Ok(Some(ms)) => {
            println!("baseline  Debian cloud kernel to /init: {ms} ms");
            Some(ms)
        }
        Ok(None) => {
            println!("baseline  skipped: Debian cloud kernel not available");
            None
        }
        Err(e) => {
            println!("baseline  failed: {e:#}");
            None
        }
    };
    let mut out = serde_json::Map::new();
    let mut failed = Vec::new();
    for image in images {
        let path = assets.image(*image)?.to_path_buf();
        let mut samples = Vec::new();
        for i in 0..runs {
            match booter.boot(assets, &path, Duration::from_secs(60)).await {
                Ok(s) => {
                    println!(
                        "{:<10} run {}: spawn→pong {} ms (guest boot {} ms, agent setup {} ms), \
                         QEMU peak RSS {} MiB",
                        image.to_string(),
                        i + 1,
                        s.spawn_to_pong_ms,
                        s.guest_boot_ms
                            .map(|v| v.to_string())
                            .unwrap_or_else(|| "?".into()),
                        s.guest_setup_us
                            .map(|v| format!("{:.1}", v as f64 / 1000.0))
                            .unwrap_or_else(|| "?".into()),
                        s.qemu_peak_rss_kib.map(|k| k / 1024).unwrap_or(0)
                    );
                    samples.push(s);
                }
                Err(e) => {
                    println!("{image:<10} run {}: FAILED: {e:#}", i + 1);
                    failed.push(image.to_string());
                    break;
                }
            }
        }
        if samples.is_empty() {
            continue;
        }
        let times: Vec<u64> = samples.iter().map(|s| s.spawn_to_pong_ms).collect();
        let med = median(&times);
        let ratio = baseline.map(|b| med as f64 / b.max(1) as f64);
        println!(
            "{:<10} median spawn→pong {med} ms{}",
            image.to_string(),
            ratio
                .map(|r| format!(", {r:.2}× the baseline"))
                .unwrap_or_default()
        );
        out.insert(
            image.to_string(),
            serde_json::json!({
                "median_spawn_to_pong_ms": med,
                "ratio_to_baseline": ratio,
                "samples": samples,
            }),
        );
    }
    out.insert(
        "baseline_cloud_kernel_ms".into(),
        serde_json::json!(baseline),
    );
    if !failed.is_empty() {
        bail!("boot-smoke failed for: {}", failed.join(", "));
    }
    Ok(serde_json::Value::Object(out))
}
