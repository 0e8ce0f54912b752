//! What a run or exec returns: output, exit code, timings and exposed ports.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::request::PortProtocol;

/// Exit code reported when the code hit its timeout.
pub const EXIT_TIMEOUT: i32 = -1;

/// Exit code for a process killed by `signal`.
pub fn exit_code_for_signal(signal: i32) -> i32 {
    128 + signal
}

/// A guest port reachable on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposedPort {
    /// Port inside the guest.
    pub internal: u16,
    /// Port on the host.
    pub external: u16,
    /// Host address the port is bound on (always loopback).
    pub host: String,
    /// TCP or UDP.
    pub protocol: PortProtocol,
    /// `http://host:external`, for convenience.
    pub url: String,
}

impl ExposedPort {
    /// A port exposed on 127.0.0.1.
    pub fn new(internal: u16, external: u16, protocol: PortProtocol) -> Self {
        let host = "127.0.0.1".to_owned();
        let url = format!("http://{host}:{external}");
        Self {
            internal,
            external,
            host,
            protocol,
            url,
        }
    }
}

/// How the VM of a run or session started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStart {
    /// A full boot of the guest kernel and agent.
    #[default]
    Cold,
    /// Restored from the L1 memory snapshot of its kind.
    Snapshot,
    /// Taken from the warm pool (booted or restored earlier).
    WarmPool,
}

/// Where the time of one run went, in milliseconds. Durations are unsigned, so never
/// negative; [`TimingBreakdown::finish`] makes `total_ms` at least the sum of the phases.
///
/// The top-level phases are admission, setup, boot, execute and teardown. `execute_ms`
/// splits further into `connect_ms + spawn_ms + process_ms`: the host↔guest transport of
/// the exec, the guest starting the interpreter (or handing the code to its warm REPL),
/// and the code running as the guest measured it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimingBreakdown {
    /// Waiting for capacity: the admission budget and a VM slot (0 on a warm-pool hit).
    pub admission_ms: u64,
    /// Host-side preparation: work dir, limits, command.
    pub setup_ms: u64,
    /// Creating or taking the overlay disk (part of setup).
    pub overlay_ms: u64,
    /// Finding (or, the first time, building) the package layer (part of setup; 0
    /// without packages).
    #[serde(default)]
    pub packages_ms: u64,
    /// QEMU spawn to guest agent ready (0 on a warm-pool hit).
    pub boot_ms: u64,
    /// Waiting for the agent's first answer (part of boot).
    pub guest_wait_ms: u64,
    /// The exec round trip, measured by the host.
    pub execute_ms: u64,
    /// Part of `execute_ms` spent outside the guest's own measurement: sending the code
    /// and receiving the result over the guest channel.
    #[serde(default)]
    pub connect_ms: u64,
    /// Part of `execute_ms`: the guest starting the interpreter or handing the code to its
    /// warm REPL (a REPL restarted after a timeout or a crash shows here).
    #[serde(default)]
    pub spawn_ms: u64,
    /// Part of `execute_ms`: the code running, measured by the guest (`execution_time_ms`).
    #[serde(default)]
    pub process_ms: u64,
    /// Destroying the VM.
    pub teardown_ms: u64,
    /// Wall time of the whole operation.
    pub total_ms: u64,
    /// Boot attempts that failed and were retried.
    pub boot_retries: u32,
}

impl TimingBreakdown {
    /// Sets the exec phases from the host round trip and the guest's measurements, so that
    /// `execute_ms == connect_ms + spawn_ms + process_ms`: `connect_ms` is the rest of the
    /// round trip, and a round trip that whole-millisecond rounding of two clocks made
    /// shorter than the guest's parts is raised to them.
    pub fn set_execute(&mut self, round_trip_ms: u64, spawn_ms: u64, process_ms: u64) {
        let guest = spawn_ms.saturating_add(process_ms);
        self.execute_ms = round_trip_ms.max(guest);
        self.spawn_ms = spawn_ms;
        self.process_ms = process_ms;
        self.connect_ms = self.execute_ms - guest;
    }

    /// Sets `total_ms` from a measured wall time, never below the sum of the top-level
    /// phases (admission, setup, boot, execute, teardown).
    pub fn finish(&mut self, wall: Duration) {
        let phases =
            self.admission_ms + self.setup_ms + self.boot_ms + self.execute_ms + self.teardown_ms;
        self.total_ms = millis(wall).max(phases);
    }
}

/// Whole milliseconds of a duration, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The outcome of running code.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionResult {
    /// Captured standard output (lossy UTF-8 of the guest's bytes).
    pub stdout: String,
    /// Captured standard error.
    pub stderr: String,
    /// 0, the code's exit status, 128+signal, or −1 on timeout.
    pub exit_code: i32,
    /// Execution time measured by the guest.
    pub execution_time_ms: Option<u64>,
    /// CPU time of the VM measured by the host, when available.
    pub cpu_time_ms: Option<u64>,
    /// Peak memory of the VM measured by the host, in MiB, when available.
    pub memory_peak_mb: Option<u64>,
    /// Where the time went.
    pub timing: TimingBreakdown,
    /// True when the VM came from the warm pool.
    pub warm_pool_hit: bool,
    /// How the VM started: `cold`, `snapshot` or `warm_pool`.
    #[serde(default)]
    pub vm_start: VmStart,
    /// Ports exposed on the host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<ExposedPort>,
}

impl ExecutionResult {
    /// True when the code hit its timeout.
    pub fn timed_out(&self) -> bool {
        self.exit_code == EXIT_TIMEOUT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_is_never_below_phases() {
        let mut t = TimingBreakdown {
            setup_ms: 5,
            boot_ms: 100,
            execute_ms: 40,
            teardown_ms: 3,
            ..Default::default()
        };
        t.finish(Duration::from_millis(10));
        assert_eq!(t.total_ms, 148);
        assert!(t.total_ms >= t.execute_ms);
        t.finish(Duration::from_millis(500));
        assert_eq!(t.total_ms, 500);
    }

    #[test]
    fn execute_splits_into_connect_spawn_process() {
        let mut t = TimingBreakdown::default();
        t.set_execute(50, 4, 40);
        assert_eq!(
            (t.execute_ms, t.connect_ms, t.spawn_ms, t.process_ms),
            (50, 6, 4, 40)
        );
        // Clocks of two machines: the guest's parts may exceed the host's round trip.
        t.set_execute(10, 4, 40);
        assert_eq!((t.execute_ms, t.connect_ms), (44, 0));
        let v = serde_json::to_value(&t).unwrap();
        for k in ["connect_ms", "spawn_ms", "process_ms", "admission_ms"] {
            assert!(v.get(k).is_some(), "{k}");
        }
    }

    #[test]
    fn exposed_port_url_and_json() {
        let p = ExposedPort::new(8000, 41234, PortProtocol::Tcp);
        assert_eq!(p.url, "http://127.0.0.1:41234");
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["host"], "127.0.0.1");
        assert_eq!(v["protocol"], "tcp");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code_for_signal(9), 137);
        let r = ExecutionResult {
            exit_code: EXIT_TIMEOUT,
            ..Default::default()
        };
        assert!(r.timed_out());
        let json = serde_json::to_value(&r).unwrap();
        assert!(json.get("exposed_ports").is_none());
        assert_eq!(json["exit_code"], -1);
    }
}
