//! cgroup v2 resource limiter with rlimit fallback for sbx.
//!
//! [`CgroupLimiter`] implements [`sandbox_core::ports::ResourceLimiter`]. At construction it
//! decides, once, how limits are enforced ([`Detection`]):
//!
//! - **cgroup v2** when the cgroup root is a v2 hierarchy with the `memory`, `cpu` and
//!   `pids` controllers and this program may create `<root>/sbx/<tenant>/<vm_id>` with
//!   those controllers enabled. Each VM then gets `memory.max`, `memory.high` (90 %),
//!   `memory.oom.group=1`, `cpu.max` and `pids.max`; usage comes from `memory.peak` and
//!   `cpu.stat`.
//! - **rlimits** otherwise (a v1 or hybrid hierarchy, controllers not delegated, read-only
//!   cgroupfs, permission errors): `RLIMIT_AS`, `RLIMIT_CPU` and `RLIMIT_CORE` are applied
//!   to each attached process with `prlimit(2)` (see [`RlimitPolicy`]), and usage comes from
//!   `/proc/<pid>/stat` and `VmHWM` in `/proc/<pid>/status`, keeping the last values seen.
//!
//! Errors are [`CgroupError`], mapped into [`sandbox_core::Error`].

mod error;
mod fs;
mod limiter;
mod procfs;
mod sys;

#[cfg(test)]
mod fakefs;
#[cfg(test)]
mod tests;

pub use error::CgroupError;
pub use fs::{CgroupFs, RealFs};
pub use limiter::{
    CPU_PERIOD_US, CgroupConfig, CgroupLimiter, Detection, REQUIRED_CONTROLLERS, RlimitPolicy,
    cpu_max_value, parse_cpu_stat_usage_usec,
};
