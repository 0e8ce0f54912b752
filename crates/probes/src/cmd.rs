//! Running short probe commands with a deadline.

use std::ffi::OsStr;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::error::ProbeError;

/// What a finished probe command produced.
#[derive(Debug)]
pub(crate) struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CmdOutput {
    /// The last non-empty line of stderr, for reasons.
    pub fn stderr_line(&self) -> String {
        self.stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_owned()
    }
}

/// Runs `program args` with stdin fed from `stdin` (or /dev/null), killing it after
/// `timeout`. `Err(Timeout)` when it ran past the deadline.
pub(crate) async fn run<I, S>(
    program: &OsStr,
    args: I,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<CmdOutput, ProbeError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let what = program.to_string_lossy().into_owned();
    let started = Instant::now();
    let mut child = spawn_retrying(&mut cmd)
        .await
        .map_err(|e| ProbeError::io(format!("spawning {what}"), e))?;
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A child that exits early closes its stdin; that is not our failure.
        let _ = pipe.write_all(bytes).await;
        drop(pipe);
    }
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(CmdOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: started.elapsed(),
        }),
        Ok(Err(e)) => Err(ProbeError::io(format!("waiting for {what}"), e)),
        // Dropping the future drops the child, which kill_on_drop kills.
        Err(_) => Err(ProbeError::Timeout {
            what,
            after: timeout,
        }),
    }
}

/// Spawns, retrying a few times on `ETXTBSY` (a script that was just written can still be
/// open for writing in a child forked concurrently by another thread).
async fn spawn_retrying(cmd: &mut Command) -> std::io::Result<tokio::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 5 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}
