//! Running host commands with logs, and per-step progress with elapsed time.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// One progress step: prints `==> asset: what` when started and the elapsed time when done.
#[derive(Debug)]
pub struct Step {
    label: String,
    start: Instant,
}

impl Step {
    /// Starts a step and prints its name.
    pub fn start(asset: &str, what: &str) -> Self {
        let label = format!("{asset}: {what}");
        println!("==> {label}");
        Self {
            label,
            start: Instant::now(),
        }
    }

    /// Seconds since the step started.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Prints the elapsed time and returns it in seconds.
    pub fn done(self) -> f64 {
        let s = self.elapsed();
        println!("    {} done in {}", self.label, fmt_secs(s));
        s
    }
}

/// Formats seconds as `1.2s` or `3m04s`.
pub fn fmt_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        let whole = s.round() as u64;
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

/// A readable rendering of a command line, for errors and logs.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains([' ', '\'', '"', '$']) {
            s.push('\'');
            s.push_str(&a.replace('\'', r"'\''"));
            s.push('\'');
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs `cmd` with stdout/stderr appended to `log`; on failure the error carries the
/// command line and the last lines of the log.
pub fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    if let Some(parent) = log.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let line = describe(cmd);
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    std::io::Write::write_all(&mut file, format!("\n$ {line}\n").as_bytes())
        .with_context(|| format!("writing log {}", log.display()))?;
    let err = file
        .try_clone()
        .with_context(|| format!("cloning log handle {}", log.display()))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .status()
        .with_context(|| format!("starting `{line}`"))?;
    if !status.success() {
        let text = fs::read_to_string(log).unwrap_or_default();
        bail!(
            "`{line}` failed ({status}); last lines of {}:\n{}",
            log.display(),
            tail(&text, 40)
        );
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout as text; fails with stderr on a non-zero exit.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_seconds() {
        assert_eq!(fmt_secs(1.25), "1.2s");
        assert_eq!(fmt_secs(184.0), "3m04s");
    }

    #[test]
    fn describes_and_tails() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo 'hi'"]);
        assert_eq!(describe(&c), r#"sh -c 'echo '\''hi'\'''"#);
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }

    #[test]
    fn run_logged_reports_failure_with_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        run_logged(Command::new("sh").args(["-c", "echo fine"]), &log).unwrap();
        let err = run_logged(
            Command::new("sh").args(["-c", "echo boom-marker >&2; exit 3"]),
            &log,
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("boom-marker"), "{msg}");
        assert!(fs::read_to_string(&log).unwrap().contains("fine"));
    }
}
