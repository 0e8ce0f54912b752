//! Prometheus metrics, in the text exposition format (written by hand: a few counters,
//! gauges and fixed-bucket histograms).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sandbox_core::{ExecutionResult, Scheduler};

/// Bucket upper bounds of the latency histograms, in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation of `ms` milliseconds.
    pub fn observe_ms(&self, ms: u64) {
        let secs = ms as f64 / 1000.0;
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(ms.saturating_mul(1000), Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Counters of the server.
#[derive(Debug, Default)]
pub struct Metrics {
    runs_ok: AtomicU64,
    runs_failed: AtomicU64,
    runs_cancelled: AtomicU64,
    execs_ok: AtomicU64,
    execs_failed: AtomicU64,
    sessions_created: AtomicU64,
    sessions_deleted: AtomicU64,
    warm_pool_hits: AtomicU64,
    boot: Histogram,
    exec: Histogram,
    run: Histogram,
    errors: Mutex<BTreeMap<String, u64>>,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
}

/// Which operation a result belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `POST /v1/run`.
    Run,
    /// `POST /v1/sessions/{id}/exec`.
    Exec,
}

impl Metrics {
    /// Records a finished run or exec.
    pub fn record_result(&self, op: Op, r: &ExecutionResult) {
        match op {
            Op::Run => {
                self.runs_ok.fetch_add(1, Ordering::Relaxed);
                if r.warm_pool_hit {
                    self.warm_pool_hits.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.boot.observe_ms(r.timing.boot_ms);
                }
                self.run.observe_ms(r.timing.total_ms);
            }
            Op::Exec => {
                self.execs_ok.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.exec.observe_ms(r.timing.execute_ms);
    }

    /// Records a failed run or exec (the error kind is counted by [`Metrics::error`]).
    pub fn record_failure(&self, op: Op) {
        match op {
            Op::Run => self.runs_failed.fetch_add(1, Ordering::Relaxed),
            Op::Exec => self.execs_failed.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Records a run cancelled because its client went away.
    pub fn run_cancelled(&self) {
        self.runs_cancelled.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a created session.
    pub fn session_created(&self) {
        self.sessions_created.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a session deleted by its client.
    pub fn session_deleted(&self) {
        self.sessions_deleted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an error answer of `kind`.
    pub fn error(&self, kind: &str) {
        let mut g = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *g.entry(kind.to_owned()).or_default() += 1;
    }

    /// Counts an HTTP answer.
    pub fn request(&self, route: &str, status: u16) {
        let mut g = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *g.entry((route.to_owned(), status)).or_default() += 1;
    }

    /// The exposition text.
    pub fn render(&self, scheduler: &Scheduler, live_sessions: usize) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, series: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (labels, v) in series {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {v}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {v}");
        };
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut out,
            "sbx_runs_total",
            "Runs (POST /v1/run) by outcome.",
            &[
                ("outcome=\"ok\"", ld(&self.runs_ok)),
                ("outcome=\"error\"", ld(&self.runs_failed)),
                ("outcome=\"cancelled\"", ld(&self.runs_cancelled)),
            ],
        );
        counter(
            &mut out,
            "sbx_session_execs_total",
            "Session execs by outcome.",
            &[
                ("outcome=\"ok\"", ld(&self.execs_ok)),
                ("outcome=\"error\"", ld(&self.execs_failed)),
            ],
        );
        counter(
            &mut out,
            "sbx_sessions_created_total",
            "Sessions created.",
            &[("", ld(&self.sessions_created))],
        );
        counter(
            &mut out,
            "sbx_sessions_deleted_total",
            "Sessions deleted by their client.",
            &[("", ld(&self.sessions_deleted))],
        );
        gauge(
            &mut out,
            "sbx_sessions_active",
            "Live sessions.",
            live_sessions as u64,
        );
        gauge(
            &mut out,
            "sbx_vms_live",
            "Live VMs (runs, sessions and warm pool).",
            scheduler.manager().live_count() as u64,
        );
        counter(
            &mut out,
            "sbx_warm_pool_hits_total",
            "Runs served by a warm-pool VM.",
            &[("", ld(&self.warm_pool_hits))],
        );
        if let Some(pool) = scheduler.warm_pool() {
            let (hits, misses, replaced) = pool.stats();
            counter(
                &mut out,
                "sbx_warm_pool_takes_total",
                "Warm-pool takes by result (pool counters).",
                &[
                    ("result=\"hit\"", hits),
                    ("result=\"miss\"", misses),
                    ("result=\"replaced\"", replaced),
                ],
            );
            counter(
                &mut out,
                "sbx_warm_pool_evicted_total",
                "Idle warm-pool VMs destroyed to give their capacity to a waiting request.",
                &[("", pool.evicted())],
            );
            let _ = writeln!(
                out,
                "# HELP sbx_warm_pool_ready Ready warm VMs per language."
            );
            let _ = writeln!(out, "# TYPE sbx_warm_pool_ready gauge");
            for (lang, n) in pool.ready_counts() {
                let _ = writeln!(out, "sbx_warm_pool_ready{{language=\"{lang}\"}} {n}");
            }
        }
        self.boot.render(
            &mut out,
            "sbx_boot_seconds",
            "VM boot time of runs that did not hit the warm pool.",
        );
        self.exec.render(
            &mut out,
            "sbx_exec_seconds",
            "Exec round trip of runs and session execs.",
        );
        self.run
            .render(&mut out, "sbx_run_seconds", "Total time of runs.");
        {
            let g = self.errors.lock().unwrap_or_else(|e| e.into_inner());
            let series: Vec<(String, u64)> = g
                .iter()
                .map(|(k, v)| (format!("kind=\"{}\"", escape(k)), *v))
                .collect();
            let refs: Vec<(&str, u64)> = series.iter().map(|(l, v)| (l.as_str(), *v)).collect();
            counter(
                &mut out,
                "sbx_errors_total",
                "Error answers by kind.",
                &refs,
            );
        }
        {
            let g = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            let series: Vec<(String, u64)> = g
                .iter()
                .map(|((r, s), v)| (format!("route=\"{}\",status=\"{s}\"", escape(r)), *v))
                .collect();
            let refs: Vec<(&str, u64)> = series.iter().map(|(l, v)| (l.as_str(), *v)).collect();
            counter(
                &mut out,
                "sbx_http_requests_total",
                "HTTP answers by route and status.",
                &refs,
            );
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe_ms(3);
        h.observe_ms(700);
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.001\"} 0"), "{s}");
        assert!(s.contains("x_bucket{le=\"0.005\"} 1"), "{s}");
        assert!(s.contains("x_bucket{le=\"1\"} 2"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 2"), "{s}");
        assert!(s.contains("x_count 2"), "{s}");
        assert!(s.contains("x_sum 0.703"), "{s}");
    }
}
