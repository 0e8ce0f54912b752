//! Per-process CPU time and peak RSS from `/proc`, for rlimit mode.

use std::path::Path;

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcSample {
    /// utime + stime in clock ticks.
    pub cpu_ticks: u64,
    /// Start time since boot in clock ticks: identifies the process across pid reuse.
    pub start_time: u64,
    /// Peak resident set size (`VmHWM`) in bytes; absent for zombies and kernel threads.
    pub peak_rss_bytes: Option<u64>,
}

/// Parses `/proc/<pid>/stat` into (utime + stime, starttime), in clock ticks.
///
/// The command name (field 2) is in parentheses and may itself contain spaces and
/// parentheses, so fields are counted after the last `)`.
pub(crate) fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state): field n is fields[n - 3].
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    let start: u64 = fields.get(22 - 3)?.parse().ok()?;
    Some((utime.saturating_add(stime), start))
}

/// The values of the `key` line (e.g. `Uid:`) of a `/proc/<pid>/status` text.
pub(crate) fn status_values<'a>(
    status: &'a str,
    key: &str,
) -> Option<std::str::SplitWhitespace<'a>> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    Some(line[key.len()..].split_whitespace())
}

/// Parses the `VmHWM:` line of `/proc/<pid>/status` into bytes.
pub(crate) fn parse_vm_hwm(status: &str) -> Option<u64> {
    let mut parts = status_values(status, "VmHWM:")?;
    let value: u64 = parts.next()?.parse().ok()?;
    let unit = parts.next().unwrap_or("kB");
    let factor = match unit {
        "kB" | "KB" | "kb" => 1024,
        "mB" | "MB" => 1024 * 1024,
        "B" => 1,
        _ => return None,
    };
    value.checked_mul(factor)
}

/// Reads `<proc_root>/<pid>/stat` and `status`; `None` when the process is gone.
pub(crate) fn sample(proc_root: &Path, pid: u32) -> Option<ProcSample> {
    let dir = proc_root.join(pid.to_string());
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let (cpu_ticks, start_time) = parse_stat(&stat)?;
    let peak_rss_bytes = std::fs::read_to_string(dir.join("status"))
        .ok()
        .and_then(|s| parse_vm_hwm(&s));
    Some(ProcSample {
        cpu_ticks,
        start_time,
        peak_rss_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (qemu (x) 1) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                        250 75 0 0 20 0 3 0 987654 123456789 10000 18446744073709551615";

    #[test]
    fn stat_with_odd_command_name() {
        assert_eq!(parse_stat(STAT), Some((325, 987654)));
        assert_eq!(parse_stat("1 (x) S 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn vm_hwm() {
        let status = "Name:\tqemu\nVmPeak:\t 607172 kB\nVmHWM:\t   42304 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(42304 * 1024));
        assert_eq!(parse_vm_hwm("Name:\tx\nState:\tZ (zombie)\n"), None);
    }

    #[test]
    fn own_process_can_be_sampled() {
        let s = sample(Path::new("/proc"), std::process::id()).unwrap();
        assert!(s.start_time > 0);
        assert!(s.peak_rss_bytes.unwrap() > 0);
        assert!(sample(Path::new("/proc"), u32::MAX).is_none());
    }
}
