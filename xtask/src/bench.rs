//! `cargo xtask bench`: latency, throughput and memory of sbx, each figure beside a
//! baseline measured in the same run. Prints JSON to stdout and writes
//! `target/bench/latest.json`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sandbox_core::{
    ExecRequest, Language, OutputCallbacks, RunOptions, RunRequest, Session, SessionRequest,
};
use serde_json::{Value, json};

use crate::assets::{Assets, Image};
use crate::smoke::{Booter, percentile, status_kib};

/// A part of the benchmark (`cargo xtask bench --only SECTION`, repeatable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Cold runs per language beside a bare boot.
    Cold,
    /// Session exec round trips.
    Session,
    /// File write and read throughput in a session.
    Files,
    /// Warm-pool hits.
    Warm,
    /// Networking: boot cost, forwarded ports, DNS.
    Network,
    /// Concurrent runs.
    Throughput,
    /// L1 snapshots: restore to first result and idle memory, beside cold VMs.
    Snapshot,
    /// The Python client beside raw HTTP: session exec p50 (`clients/python`).
    Client,
    /// JavaScript runtimes side by side: the `javascript` image (Bun) beside the
    /// bench-only images with Debian's node 18 and Node.js 24 LTS (cold run, session exec
    /// round trip, REPL RSS, image size).
    Runtimes,
}

/// How many samples to take.
#[derive(Debug, Clone, Copy)]
pub struct BenchSize {
    /// Cold runs per language.
    pub cold: usize,
    /// Warm-pool hits.
    pub warm: usize,
    /// Session execs.
    pub session_execs: usize,
    /// Runs of the throughput phase.
    pub throughput_runs: usize,
    /// Concurrency of the throughput phase.
    pub concurrency: usize,
}

impl BenchSize {
    /// The default size (a few minutes under TCG on 2 cores).
    pub fn standard() -> Self {
        Self {
            cold: 5,
            warm: 20,
            session_execs: 200,
            throughput_runs: 40,
            concurrency: 4,
        }
    }

    /// A quick pass for checking the bench itself.
    pub fn quick() -> Self {
        Self {
            cold: 2,
            warm: 3,
            session_execs: 20,
            throughput_runs: 4,
            concurrency: 2,
        }
    }
}

pub(crate) fn stats(v: &[u64]) -> Value {
    json!({
        "n": v.len(),
        "p50": percentile(v, 50.0),
        "p95": percentile(v, 95.0),
        "max": v.iter().copied().max().unwrap_or(0),
    })
}

pub(crate) fn ratio(a: u64, b: u64) -> Value {
    if b == 0 {
        Value::Null
    } else {
        json!((a as f64 / b as f64 * 100.0).round() / 100.0)
    }
}

fn self_rss_kib(field: &str) -> u64 {
    status_kib(std::path::Path::new("/proc/self/status"), field).unwrap_or(0)
}

/// PSS (KiB, from `smaps_rollup`) of every sbx QEMU.
/// PSS of every sbx QEMU whose VM lives under `work_root` (other sbx users on the host,
/// such as VM tests, are not counted).
fn qemu_pss_kib(work_root: &std::path::Path) -> Vec<u64> {
    let root = work_root.to_string_lossy().into_owned();
    qemu_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains(&root))
        })
        .filter_map(|pid| {
            status_kib(
                &std::path::Path::new("/proc")
                    .join(pid.to_string())
                    .join("smaps_rollup"),
                "Pss:",
            )
        })
        .collect()
}

/// Pids of every sbx QEMU.
fn qemu_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd);
            (cmd.starts_with("/usr/bin/qemu-system-x86_64") && cmd.contains("guest=sbx-"))
                .then_some(pid)
        })
        .collect()
}

fn qemu_rss_kib() -> Vec<u64> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.filter_map(Result::ok) {
        let p = e.path();
        let Ok(cmd) = std::fs::read(p.join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if !(cmd.starts_with("/usr/bin/qemu-system-x86_64") && cmd.contains("guest=sbx-")) {
            continue;
        }
        let kb = status_kib(&p.join("status"), "VmRSS:");
        if let Some(kb) = kb {
            out.push(kb);
        }
    }
    out
}

fn code_for(lang: Language) -> &'static str {
    match lang {
        Language::Python => "print('ok')",
        Language::Javascript => "console.log('ok')",
        Language::Raw => "echo ok",
    }
}

fn host_python_pass_ms(n: usize) -> Vec<u64> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let _ = std::process::Command::new("/usr/bin/python3")
                .args(["-c", "pass"])
                .status();
            t.elapsed().as_millis() as u64
        })
        .collect()
}

/// Runs the benchmark: every section, or only those in `only` when it is not empty.
pub async fn run(assets: &Assets, size: BenchSize, only: &[Section]) -> Result<Value> {
    let want = |s: Section| only.is_empty() || only.contains(&s);
    let mut report = serde_json::Map::new();
    let host = probes::host_report().await;
    report.insert(
        "host".into(),
        json!({
            "accelerator": host.accelerator.accelerator.to_string(),
            "reason": host.accelerator.reason,
            "qemu": host.qemu.as_ref().map(|q| q.version_line.clone()).ok(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        }),
    );

    let mut cfg = sbx::SbxConfig::from_env();
    cfg.assets_dir = assets.dir.clone();
    // Every section but `snapshot` measures cold boots.
    cfg.snapshot_dir = None;
    cfg.warm_pool_size = 0;
    cfg.scheduler.warm_pool_size = 0;
    let sbx = sbx::Sbx::start(cfg.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if want(Section::Cold) {
        cold_runs(assets, &sbx, size, &mut report).await?;
    }
    if want(Section::Session) || want(Section::Files) {
        session_and_files(
            &sbx,
            size,
            want(Section::Session),
            want(Section::Files),
            &mut report,
        )
        .await?;
    }
    sbx.stop().await;
    if want(Section::Client) {
        report.insert(
            "python_client".into(),
            crate::bench_client::run(assets, size.session_execs)?,
        );
    }
    if want(Section::Warm) {
        warm_pool(&cfg, size, &mut report).await?;
    }
    if want(Section::Network) {
        // Networking: boot cost, forwarded-port throughput, DNS at the proxy.
        eprintln!("bench: network");
        report.insert(
            "network".into(),
            crate::bench_net::run(&cfg, size.cold).await?,
        );
    }
    if want(Section::Snapshot) {
        snapshots(&cfg, size, &mut report).await?;
    }
    if want(Section::Throughput) {
        throughput(cfg.clone(), size, &mut report).await?;
    }
    if want(Section::Runtimes) {
        report.insert("js_runtimes".into(), js_runtimes(assets, &cfg, size).await?);
    }
    report.insert(
        "leftover_qemu_processes".into(),
        json!(qemu_rss_kib().len()),
    );
    Ok(Value::Object(report))
}

type Report = serde_json::Map<String, Value>;

/// Cold runs per language vs a bare boot of the same kernel+initramfs+image to pong.
async fn cold_runs(
    assets: &Assets,
    sbx: &sbx::Sbx,
    size: BenchSize,
    report: &mut Report,
) -> Result<()> {
    eprintln!("bench: cold runs");
    let booter = Booter::new(assets).await?;
    let mut cold = serde_json::Map::new();
    for (lang, image) in [
        (Language::Raw, Image::Raw),
        (Language::Python, Image::Python),
        (Language::Javascript, Image::Javascript),
    ] {
        let path = assets.image(image)?.to_path_buf();
        let mut bare = Vec::new();
        let mut runs = Vec::new();
        let mut setup = Vec::new();
        let mut teardown = Vec::new();
        for _ in 0..size.cold {
            let b = booter.boot(assets, &path, Duration::from_secs(120)).await?;
            bare.push(b.spawn_to_pong_ms);
            let t = Instant::now();
            let r = sbx
                .scheduler()
                .run(RunRequest::new(lang, code_for(lang)), RunOptions::default())
                .await
                .map_err(|e| anyhow::anyhow!("cold {lang}: {e}"))?;
            runs.push(t.elapsed().as_millis() as u64);
            setup.push(r.timing.setup_ms);
            teardown.push(r.timing.teardown_ms);
            anyhow::ensure!(
                r.stdout == "ok\n",
                "cold {lang}: unexpected output {:?}",
                r.stdout
            );
        }
        cold.insert(
            lang.to_string(),
            json!({
                "run_ms": stats(&runs),
                "baseline_bare_boot_to_pong_ms": stats(&bare),
                "ratio_p50": ratio(percentile(&runs, 50.0), percentile(&bare, 50.0)),
                "host_setup_ms": stats(&setup),
                "teardown_ms": stats(&teardown),
            }),
        );
    }
    report.insert("cold_run".into(), Value::Object(cold));
    Ok(())
}

/// Session exec round trip vs `python3 -c pass` on the host; file throughput in the same
/// session.
async fn session_and_files(
    sbx: &sbx::Sbx,
    size: BenchSize,
    execs: bool,
    transfers: bool,
    report: &mut Report,
) -> Result<()> {
    // 512 MB: /home/user is a tmpfs of 40 % of guest RAM and must hold the 100 MB file.
    let mut sreq = SessionRequest::new(Language::Python);
    sreq.memory_mb = 512;
    let session = sbx
        .scheduler()
        .session(sreq, RunOptions::default())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if execs {
        session_execs(&session, size, report).await?;
    }
    if transfers {
        file_transfers(&session, report).await?;
    }
    session.close().await;
    Ok(())
}

async fn session_execs(session: &Session, size: BenchSize, report: &mut Report) -> Result<()> {
    eprintln!("bench: session execs");
    let cb = OutputCallbacks::default();
    let mut rt = Vec::new();
    let mut guest = Vec::new();
    let rss_before = self_rss_kib("VmRSS:");
    for i in 0..size.session_execs {
        let code = if i % 2 == 0 { "pass" } else { "x = 1" };
        let t = Instant::now();
        let r = session
            .exec(ExecRequest::new(code), &cb)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        rt.push(t.elapsed().as_micros() as u64);
        guest.push(r.execution_time_ms.unwrap_or(0));
    }
    let rss_after = self_rss_kib("VmRSS:");
    let host_py = host_python_pass_ms(5);
    let idle_rss = qemu_rss_kib();
    let rt_ms: Vec<u64> = rt.iter().map(|us| us / 1000).collect();
    report.insert(
        "session_exec".into(),
        json!({
            "round_trip_us": stats(&rt),
            "round_trip_ms": stats(&rt_ms),
            "guest_execution_ms": stats(&guest),
            "baseline_host_python3_c_pass_ms": stats(&host_py),
            "ratio_p50": ratio(percentile(&rt, 50.0) / 1000, percentile(&host_py, 50.0)),
            "host_rss_growth_kib": rss_after.saturating_sub(rss_before),
        }),
    );
    report.insert(
        "idle_vm_qemu_rss_mib".into(),
        json!(idle_rss.iter().map(|k| k / 1024).collect::<Vec<_>>()),
    );
    Ok(())
}

/// What the guest itself manages with the same bytes: SHA-256 and a write to its home
/// tmpfs in 64 KiB pieces (the work of a transfer without the transport), in MiB/s.
const GUEST_HASH_WRITE: &str = r#"
import hashlib, time
data = bytes(i % 251 for i in range(251 * 4096)) * (MIB * 1048576 // (251 * 4096) + 1)
data = data[:MIB * 1048576]
view = memoryview(data)
t = time.perf_counter()
h = hashlib.sha256()
with open("bench-local.bin", "wb") as f:
    for i in range(0, len(data), 65536):
        piece = view[i:i + 65536]
        h.update(piece)
        f.write(piece)
el = time.perf_counter() - t
print(round(MIB / el, 1))
"#;

/// Runs `code` in the (Python) session and returns its result.
async fn python(session: &Session, code: &str) -> Result<sandbox_core::ExecutionResult> {
    session
        .exec(ExecRequest::new(code), &OutputCallbacks::default())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn mib_s(mib: usize, d: Duration) -> f64 {
    (mib as f64 / d.as_secs_f64() * 10.0).round() / 10.0
}

/// File write and read throughput (10 and 100 MiB) beside the guest's own hash+write rate.
async fn file_transfers(session: &Session, report: &mut Report) -> Result<()> {
    eprintln!("bench: file transfer");
    let mut files = serde_json::Map::new();
    for mib in [10usize, 100] {
        let data: Vec<u8> = (0..mib * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let t = Instant::now();
        session
            .write_bytes("bench.bin", &data, false)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let w = t.elapsed();
        let t = Instant::now();
        let back = session
            .read_bytes("bench.bin")
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let r = t.elapsed();
        anyhow::ensure!(
            back == data,
            "read back {} bytes, not the ones written",
            back.len()
        );
        drop(back);
        // Room for the local copy in the home tmpfs.
        python(session, "import os; os.remove('bench.bin')").await?;
        let local = python(session, &GUEST_HASH_WRITE.replace("MIB", &mib.to_string())).await?;
        anyhow::ensure!(
            local.exit_code == 0,
            "guest baseline failed: {}",
            local.stderr
        );
        let local_mib_s: f64 = local
            .stdout
            .trim()
            .parse()
            .context("guest baseline output")?;
        python(session, "import os; os.remove('bench-local.bin')").await?;
        let (wr, rd) = (mib_s(mib, w), mib_s(mib, r));
        files.insert(
            format!("{mib}MiB"),
            json!({
                "write_mib_s": wr,
                "read_mib_s": rd,
                "baseline_guest_sha256_write_mib_s": local_mib_s,
                "write_ratio": (wr / local_mib_s * 100.0).round() / 100.0,
                "read_ratio": (rd / local_mib_s * 100.0).round() / 100.0,
            }),
        );
    }
    report.insert("files".into(), Value::Object(files));
    Ok(())
}

/// Warm-pool hits (end to end) vs cold.
/// `runs` python runs on an sbx started from `cfg` (a warm pool of 1), each once the pool
/// is full: the milliseconds of the warm-pool hits, and how many runs missed.
async fn warm_pool_hits(cfg: sbx::SbxConfig, runs: usize) -> Result<(Vec<u64>, usize)> {
    let warm_sbx = sbx::Sbx::start(cfg)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut hits = Vec::new();
    let mut misses = 0;
    for _ in 0..runs {
        anyhow::ensure!(
            warm_sbx.wait_pool_ready(Duration::from_secs(300)).await,
            "warm pool did not fill"
        );
        let t = Instant::now();
        let r = warm_sbx
            .scheduler()
            .run(
                RunRequest::new(Language::Python, "print('ok')"),
                RunOptions::default(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(r.stdout == "ok\n", "a warm-pool run printed {:?}", r.stdout);
        if r.warm_pool_hit {
            hits.push(t.elapsed().as_millis() as u64);
        } else {
            misses += 1;
        }
    }
    warm_sbx.stop().await;
    Ok((hits, misses))
}

async fn warm_pool(cfg: &sbx::SbxConfig, size: BenchSize, report: &mut Report) -> Result<()> {
    eprintln!("bench: warm pool");
    let mut wcfg = cfg.clone();
    wcfg.warm_pool_size = 1;
    wcfg.scheduler.warm_pool_size = 1;
    let (hits, misses) = warm_pool_hits(wcfg, size.warm).await?;
    let cold_py = report["cold_run"]["python"]["run_ms"]["p50"]
        .as_u64()
        .unwrap_or(0);
    report.insert(
        "warm_pool_hit".into(),
        json!({
            "run_ms": stats(&hits),
            "misses": misses,
            "baseline_cold_python_p50_ms": cold_py,
            "ratio_p50": ratio(percentile(&hits, 50.0), cold_py),
        }),
    );

    Ok(())
}

/// Wall time of one run of `lang`'s `print('ok')`, checking the output and how it started.
async fn timed_run(
    sbx: &sbx::Sbx,
    lang: Language,
    want: sandbox_core::result::VmStart,
) -> Result<u64> {
    let t = Instant::now();
    let r = sbx
        .scheduler()
        .run(RunRequest::new(lang, code_for(lang)), RunOptions::default())
        .await
        .map_err(|e| anyhow::anyhow!("{lang}: {e}"))?;
    let ms = t.elapsed().as_millis() as u64;
    anyhow::ensure!(
        r.stdout == "ok\n",
        "{lang}: unexpected output {:?}",
        r.stdout
    );
    anyhow::ensure!(
        r.vm_start == want,
        "{lang}: started {:?}, not {want:?}",
        r.vm_start
    );
    Ok(ms)
}

/// Mean PSS per VM of `n` idle sessions open at once (PSS splits pages that several
/// VMs map, such as a snapshot's RAM file, between them).
async fn idle_sessions_pss_kib(sbx: &sbx::Sbx, lang: Language, n: usize) -> Result<u64> {
    let mut sessions = Vec::new();
    for _ in 0..n {
        let s = sbx
            .scheduler()
            .session(SessionRequest::new(lang), RunOptions::default())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        s.exec(
            ExecRequest::new(code_for(lang)),
            &OutputCallbacks::default(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        sessions.push(s);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pss = qemu_pss_kib(&sbx.scheduler().manager().config().work_root);
    for s in sessions {
        s.close().await;
    }
    anyhow::ensure!(pss.len() == n, "expected {n} QEMUs, found {}", pss.len());
    Ok(pss.iter().sum::<u64>() / n as u64)
}

/// Idle sessions open at once for the PSS figures (the admission budget of this 2-core
/// host holds three VMs).
const PSS_SESSIONS: usize = 3;

/// L1 snapshots: per language, restore to first result beside cold runs of the same
/// language in this section, and the idle PSS of a restored VM beside a cold-booted one.
async fn snapshots(cfg: &sbx::SbxConfig, size: BenchSize, report: &mut Report) -> Result<()> {
    use sandbox_core::result::VmStart;
    use std::os::unix::fs::PermissionsExt;
    eprintln!("bench: snapshots");
    let dir = cfg.work_dir.join("bench-snapshots");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let cold_sbx = sbx::Sbx::start(cfg.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut scfg = cfg.clone();
    scfg.snapshot_dir = Some(dir.clone());
    let snap_sbx = sbx::Sbx::start(scfg)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut out = serde_json::Map::new();
    for lang in [Language::Raw, Language::Python, Language::Javascript] {
        // The first run boots cold and makes the snapshot in the background.
        timed_run(&snap_sbx, lang, VmStart::Cold).await?;
        anyhow::ensure!(
            snap_sbx
                .scheduler()
                .wait_background(Duration::from_secs(300))
                .await,
            "{lang}: snapshot creation did not finish"
        );
        let mut cold = Vec::new();
        let mut restored = Vec::new();
        for _ in 0..size.cold.max(3) {
            cold.push(timed_run(&cold_sbx, lang, VmStart::Cold).await?);
            restored.push(timed_run(&snap_sbx, lang, VmStart::Snapshot).await?);
        }
        let cold_pss = idle_sessions_pss_kib(&cold_sbx, lang, PSS_SESSIONS).await?;
        let restored_pss = idle_sessions_pss_kib(&snap_sbx, lang, PSS_SESSIONS).await?;
        out.insert(
            lang.to_string(),
            json!({
                "restore_to_first_result_ms": stats(&restored),
                "baseline_cold_run_ms": stats(&cold),
                "ratio_p50": ratio(percentile(&restored, 50.0), percentile(&cold, 50.0)),
                "idle_pss_mib_per_vm": restored_pss / 1024,
                "baseline_cold_idle_pss_mib_per_vm": cold_pss / 1024,
                "idle_vms": PSS_SESSIONS,
            }),
        );
    }
    // Throughput at concurrency 4: raw runs restored from the snapshot beside cold ones.
    let runs = size.throughput_runs.max(12);
    let concurrency = 4;
    let restored_rate = runs_per_s(&snap_sbx, runs, concurrency).await?;
    let cold_rate = runs_per_s(&cold_sbx, runs, concurrency).await?;
    out.insert(
        "throughput".into(),
        json!({
            "runs": runs,
            "concurrency": concurrency,
            "restored_runs_per_s": restored_rate,
            "baseline_cold_runs_per_s": cold_rate,
        }),
    );
    snap_sbx.stop().await;
    // Warm-pool hits when the pool is filled by restores (python's snapshot is made).
    let mut wcfg = cfg.clone();
    wcfg.snapshot_dir = Some(dir.clone());
    wcfg.warm_pool_size = 1;
    wcfg.scheduler.warm_pool_size = 1;
    let (hits, misses) = warm_pool_hits(wcfg, size.warm.max(5)).await?;
    let cold_py = out["python"]["baseline_cold_run_ms"]["p50"]
        .as_u64()
        .unwrap_or(0);
    out.insert(
        "warm_pool_hit".into(),
        json!({
            "filled_by": "restores",
            "run_ms": stats(&hits),
            "misses": misses,
            "baseline_cold_python_p50_ms": cold_py,
            "ratio_p50": ratio(percentile(&hits, 50.0), cold_py),
        }),
    );
    cold_sbx.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    report.insert("snapshot".into(), Value::Object(out));
    Ok(())
}

/// `runs` raw runs at `concurrency`, in runs per second (all must succeed).
async fn runs_per_s(sbx: &sbx::Sbx, runs: usize, concurrency: usize) -> Result<f64> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..runs {
        let sched = sbx.scheduler().clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await;
            sched
                .run(
                    RunRequest::new(Language::Raw, "echo ok"),
                    RunOptions::default(),
                )
                .await
                .map(|r| r.stdout == "ok\n")
        }));
    }
    for task in tasks {
        let ok = task
            .await
            .context("join")?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(ok, "a throughput run printed something else");
    }
    Ok((runs as f64 / t.elapsed().as_secs_f64() * 100.0).round() / 100.0)
}

/// Throughput: N runs at concurrency C.
async fn throughput(cfg: sbx::SbxConfig, size: BenchSize, report: &mut Report) -> Result<()> {
    eprintln!("bench: throughput");
    let sbx = Arc::new(
        sbx::Sbx::start(cfg)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let sem = Arc::new(tokio::sync::Semaphore::new(size.concurrency));
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..size.throughput_runs {
        let sbx = sbx.clone();
        let sem = sem.clone();
        let peak = peak.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await;
            let r = sbx
                .scheduler()
                .run(
                    RunRequest::new(Language::Raw, "echo ok"),
                    RunOptions::default(),
                )
                .await;
            let rss: u64 = qemu_rss_kib().iter().sum::<u64>() + self_rss_kib("VmRSS:");
            peak.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
            r.is_ok()
        }));
    }
    let mut ok = 0;
    for task in tasks {
        if task.await.context("join")? {
            ok += 1;
        }
    }
    let wall = t.elapsed();
    sbx.stop().await;
    report.insert(
        "throughput".into(),
        json!({
            "runs": size.throughput_runs,
            "ok": ok,
            "concurrency": size.concurrency,
            "vms_per_s": (ok as f64 / wall.as_secs_f64() * 100.0).round() / 100.0,
            "host_peak_rss_mib": peak.load(std::sync::atomic::Ordering::Relaxed) / 1024,
            "sbx_process_peak_rss_mib": self_rss_kib("VmHWM:") / 1024,
        }),
    );
    Ok(())
}

/// A directory beside the assets where `javascript-base-x86_64.qcow2` is `image` (hard
/// links: the same files, the same access rights for the QEMU user).
fn variant_dir(assets: &Assets, image: Image) -> Result<std::path::PathBuf> {
    let dir = assets.dir.join(format!("bench-{}", image.name()));
    crate::assets::cache::remove_any(&dir)?;
    std::fs::create_dir_all(&dir)?;
    let link = |src: &std::path::Path, name: &str| -> Result<()> {
        std::fs::hard_link(src, dir.join(name))
            .with_context(|| format!("linking {} into {}", src.display(), dir.display()))
    };
    link(&assets.vmlinux, "vmlinux")?;
    link(&assets.initramfs, "initramfs.cpio.zst")?;
    link(assets.image(image)?, &Image::Javascript.file_name())?;
    Ok(dir)
}

/// What one JavaScript runtime measured.
struct RuntimeFigures {
    cold: Vec<u64>,
    bare: Vec<u64>,
    exec_us: Vec<u64>,
    repl_rss_kib: u64,
    version: String,
}

/// Prints the runtime's version and the REPL's resident memory (KiB).
const JS_PROBE: &str = "console.log((typeof Bun !== 'undefined' ? 'bun ' + Bun.version : 'node ' + process.version) + ' ' + Math.round(process.memoryUsage().rss / 1024))";

async fn measure_runtime(
    assets: &Assets,
    image: Image,
    base: &sbx::SbxConfig,
    size: BenchSize,
) -> Result<RuntimeFigures> {
    let dir = variant_dir(assets, image)?;
    let mut cfg = base.clone();
    cfg.assets_dir = dir.clone();
    let sbx = sbx::Sbx::start(cfg)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let booter = Booter::new(assets).await?;
    let image_path = assets.image(image)?.to_path_buf();
    let (mut cold, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..size.cold {
        let b = booter
            .boot(assets, &image_path, Duration::from_secs(120))
            .await?;
        bare.push(b.spawn_to_pong_ms);
        let t = Instant::now();
        let r = sbx
            .scheduler()
            .run(
                RunRequest::new(Language::Javascript, "console.log('ok')"),
                RunOptions::default(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("cold javascript on {image}: {e}"))?;
        cold.push(t.elapsed().as_millis() as u64);
        anyhow::ensure!(r.stdout == "ok\n", "{image}: output {:?}", r.stdout);
    }
    let session = sbx
        .scheduler()
        .session(
            SessionRequest::new(Language::Javascript),
            RunOptions::default(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let cb = OutputCallbacks::default();
    let mut exec_us = Vec::new();
    for i in 0..(size.session_execs / 2).max(10) + 1 {
        let code = if i % 2 == 0 { "1" } else { "globalThis.x = 1" };
        let t = Instant::now();
        session
            .exec(ExecRequest::new(code), &cb)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // The first exec starts the REPL.
        if i > 0 {
            exec_us.push(t.elapsed().as_micros() as u64);
        }
    }
    let probe = session
        .exec(ExecRequest::new(JS_PROBE), &cb)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    session.close().await;
    sbx.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    let line = probe.stdout.trim();
    let (version, rss) = line.rsplit_once(' ').unwrap_or((line, "0"));
    Ok(RuntimeFigures {
        cold,
        bare,
        exec_us,
        repl_rss_kib: rss.parse().unwrap_or(0),
        version: version.to_owned(),
    })
}

/// The `javascript` image (Bun) beside the images with Debian's node 18 (the runtime
/// before Bun) and Node.js 24 LTS, in one run: cold run to the first result, session exec
/// round trip, the REPL's RSS in the guest, image size. Ratios are against node 18 and
/// against the bare boot of each image. A comparison image that is not built is reported
/// as skipped, with the command that builds it.
async fn js_runtimes(assets: &Assets, base: &sbx::SbxConfig, size: BenchSize) -> Result<Value> {
    eprintln!("bench: javascript runtimes");
    let mut out = serde_json::Map::new();
    let mut node18_p50 = None;
    for image in [
        Image::JavascriptNode18,
        Image::Javascript,
        Image::JavascriptNode24,
    ] {
        let Ok(path) = assets.image(image) else {
            out.insert(
                image.name().into(),
                json!({ "skipped": format!("not built: cargo xtask assets --only images --image {image}") }),
            );
            continue;
        };
        let image_mb = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) as f64 / 1e6;
        let f = measure_runtime(assets, image, base, size).await?;
        let cold_p50 = percentile(&f.cold, 50.0);
        if image == Image::JavascriptNode18 {
            node18_p50 = Some(cold_p50);
        }
        out.insert(
            image.name().into(),
            json!({
                "runtime": f.version,
                "image_mb": (image_mb * 10.0).round() / 10.0,
                "cold_run_ms": stats(&f.cold),
                "baseline_bare_boot_to_pong_ms": stats(&f.bare),
                "cold_ratio_vs_bare_boot_p50": ratio(cold_p50, percentile(&f.bare, 50.0)),
                "cold_ratio_vs_node18_p50": node18_p50.map_or(Value::Null, |n| ratio(cold_p50, n)),
                "session_exec_round_trip_us": stats(&f.exec_us),
                "repl_rss_mib": (f.repl_rss_kib as f64 / 1024.0 * 10.0).round() / 10.0,
            }),
        );
    }
    Ok(Value::Object(out))
}
