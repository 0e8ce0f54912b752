//! Measurements of `sbx serve` over the fakes (ignored: run explicitly, they print JSON).
//!
//! `cargo test --release -p sbx --test serve_bench -- --ignored --nocapture`

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

use std::time::{Duration, Instant};

use sandbox_core::testing::fake_manager;
use sandbox_core::{Language, RunOptions, RunRequest, Scheduler, SchedulerConfig};
use serde_json::{Value, json};

fn scheduler(dir: &std::path::Path) -> Scheduler {
    let (manager, _counters, _channel) = fake_manager(dir, 16);
    let sched = Scheduler::new(SchedulerConfig::default(), manager).unwrap();
    sched.start().unwrap();
    sched
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn api_overhead_p50_over_the_library_call() {
    let dir = tempfile::tempdir().unwrap();
    let sched = scheduler(dir.path());
    let srv = sbx::serve::spawn_for_test(sched.clone()).await.unwrap();
    let client = reqwest::Client::new();
    let url = srv.url("/v1/run");
    let body = json!({"code": "1", "language": "python"});
    let n = 500;
    let (mut direct, mut http) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..(n + 50) {
        let t = Instant::now();
        let r = sched
            .run(
                RunRequest::new(Language::Python, "1"),
                RunOptions::default(),
            )
            .await
            .unwrap();
        let d = t.elapsed();
        assert_eq!(r.exit_code, 0);
        let t = Instant::now();
        let v: Value = client
            .post(&url)
            .bearer_auth(&srv.token)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let h = t.elapsed();
        assert_eq!(v["exit_code"], 0);
        if i >= 50 {
            direct.push(d);
            http.push(h);
        }
    }
    let (d, h) = (p50(direct), p50(http));
    println!(
        "{}",
        json!({
            "bench": "serve_api_overhead",
            "runs": n,
            "direct_p50_us": d.as_micros() as u64,
            "http_p50_us": h.as_micros() as u64,
            "overhead_p50_us": h.saturating_sub(d).as_micros() as u64,
        })
    );
    srv.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn rss_over_rounds_of_200_session_execs_on_keep_alive() {
    let dir = tempfile::tempdir().unwrap();
    let srv = sbx::serve::spawn_for_test(scheduler(dir.path()))
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let v: Value = client
        .post(srv.url("/v1/sessions"))
        .bearer_auth(&srv.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    let url = srv.url(&format!("/v1/sessions/{id}/exec"));
    let exec = |i: usize| {
        let req = client
            .post(&url)
            .bearer_auth(&srv.token)
            .json(&json!({"code": format!("set k{} v", i % 8)}));
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }
    };
    for i in 0..50 {
        exec(i).await;
    }
    // RSS after each further round of 200 execs: a leak grows every round.
    let mut rss = vec![rss_kib()];
    for _round in 0..3 {
        for i in 0..200 {
            exec(i).await;
        }
        rss.push(rss_kib());
    }
    let growth: Vec<i64> = rss.windows(2).map(|w| w[1] as i64 - w[0] as i64).collect();
    println!(
        "{}",
        json!({
            "bench": "serve_rss_session_execs",
            "execs_per_round": 200,
            "rss_kib": rss,
            "growth_per_round_kib": growth,
        })
    );
    srv.shutdown().await.unwrap();
}
