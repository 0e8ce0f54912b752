//! Prints this host's probe report as JSON, with the time it took.
//!
//! `cargo run -p probes --example host_report` (honours `SBX_QEMU`, `SBX_FORCE_TCG`,
//! `SBX_CACHE_DIR`).

use std::time::Instant;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), serde_json::Error> {
    let started = Instant::now();
    let report = probes::host_report().await;
    let elapsed = started.elapsed();
    println!("{}", serde_json::to_string_pretty(report)?);
    eprintln!(
        "probed in {elapsed:?} (accelerator {} from cache: {})",
        report.accelerator.accelerator, report.accelerator.from_cache
    );
    Ok(())
}
