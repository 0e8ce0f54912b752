//! A small QMP client: JSON lines over QEMU's monitor socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, LinesCodec};

use crate::error::QemuError;
use crate::peer::{check_peer_uid, connect_with_retry};

/// Longest QMP line accepted.
const MAX_LINE: usize = 1024 * 1024;

/// A connected, capability-negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    socket: PathBuf,
    reader: FramedRead<OwnedReadHalf, LinesCodec>,
    writer: OwnedWriteHalf,
    timeout: Duration,
}

impl QmpClient {
    /// Connects to `socket` (retrying until `timeout` while QEMU creates it), checks the
    /// peer uid when `expected_uid` is given, reads the greeting and negotiates
    /// capabilities. `timeout` also bounds every later command.
    pub async fn connect(
        socket: &Path,
        expected_uid: Option<u32>,
        timeout: Duration,
    ) -> Result<Self, QemuError> {
        let deadline = Instant::now() + timeout;
        let stream: UnixStream = connect_with_retry(socket, deadline).await?;
        if let Some(uid) = expected_uid {
            check_peer_uid(&stream, socket, uid)?;
        }
        let (r, w) = stream.into_split();
        let mut client = Self {
            socket: socket.to_path_buf(),
            reader: FramedRead::new(r, LinesCodec::new_with_max_length(MAX_LINE)),
            writer: w,
            timeout,
        };
        let greeting = tokio::time::timeout_at(deadline, client.read_value())
            .await
            .map_err(|_| client.timeout_err("QMP greeting"))??;
        if greeting.get("QMP").is_none() {
            return Err(client.err(format!("unexpected greeting {greeting}")));
        }
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    fn err(&self, reason: impl Into<String>) -> QemuError {
        QemuError::Qmp {
            socket: self.socket.clone(),
            reason: reason.into(),
        }
    }

    fn timeout_err(&self, what: &str) -> QemuError {
        QemuError::Timeout {
            what: format!("{what} on {}", self.socket.display()),
            after: self.timeout,
        }
    }

    async fn read_value(&mut self) -> Result<Value, QemuError> {
        match self.reader.next().await {
            Some(Ok(line)) => {
                serde_json::from_str(&line).map_err(|e| self.err(format!("bad JSON {line:?}: {e}")))
            }
            Some(Err(e)) => Err(self.err(format!("read failed: {e}"))),
            None => Err(self.err("connection closed")),
        }
    }

    /// Runs `command` with optional `arguments` and returns its `return` value. Events
    /// that arrive meanwhile are skipped.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QemuError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let timeout = self.timeout;
        let fut = async {
            self.writer
                .write_all(line.as_bytes())
                .await
                .map_err(|e| self.err(format!("write failed: {e}")))?;
            loop {
                let v = self.read_value().await?;
                if let Some(ret) = v.get("return") {
                    return Ok(ret.clone());
                }
                if let Some(err) = v.get("error") {
                    let field =
                        |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                    return Err(QemuError::QmpCommand {
                        command: command.to_owned(),
                        class: field("class"),
                        desc: field("desc"),
                    });
                }
                if let Some(event) = v.get("event") {
                    tracing::debug!(%event, "QMP event");
                }
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(self.timeout_err(&format!("QMP {command}"))),
        }
    }

    /// `query-status`: (running, status).
    pub async fn query_status(&mut self) -> Result<(bool, String), QemuError> {
        let v = self.execute("query-status", None).await?;
        let running = v.get("running").and_then(Value::as_bool).unwrap_or(false);
        let status = v
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned();
        Ok((running, status))
    }

    /// Sets the migration capabilities snapshots use on both sides: `x-ignore-shared`
    /// (the RAM stays in its file; only device state is written). Not `mapped-ram`: with
    /// `x-ignore-shared` it fails on QEMU 10.0 ("Bad address").
    async fn snapshot_capabilities(&mut self) -> Result<(), QemuError> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
        )
        .await
        .map(|_| ())
    }

    /// Polls `query-migrate` (every 2 ms, within the client's timeout) until it completes.
    async fn wait_migration(&mut self, what: &str) -> Result<(), QemuError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let v = self.execute("query-migrate", None).await?;
            match v.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => return Ok(()),
                s @ ("failed" | "cancelled" | "cancelling" | "failing") => {
                    let detail = v
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no detail");
                    return Err(self.err(format!("{what}: migration {s}: {detail}")));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_err(what));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Saves a VM whose RAM is a shared file: pauses it and writes its device state to
    /// `state`. The VM stays paused (quit it afterwards).
    pub async fn save_state(&mut self, state: &Path) -> Result<(), QemuError> {
        let uri = file_uri(state).map_err(|r| self.err(r))?;
        self.snapshot_capabilities().await?;
        self.execute("stop", None).await?;
        self.execute("migrate", Some(json!({ "uri": uri }))).await?;
        self.wait_migration("saving the device state").await
    }

    /// Loads the device state of a VM started with `-incoming defer` from `state` and
    /// resumes it.
    pub async fn restore_state(&mut self, state: &Path) -> Result<(), QemuError> {
        let uri = file_uri(state).map_err(|r| self.err(r))?;
        self.snapshot_capabilities().await?;
        self.execute(
            "migrate-incoming",
            Some(json!({ "uri": uri, "exit-on-error": false })),
        )
        .await?;
        self.wait_migration("loading the device state").await?;
        let (running, _) = self.query_status().await?;
        if !running {
            self.execute("cont", None).await?;
        }
        Ok(())
    }

    /// `quit`: QEMU exits. A connection closed before the answer counts as success.
    pub async fn quit(&mut self) -> Result<(), QemuError> {
        match self.execute("quit", None).await {
            Ok(_) => Ok(()),
            Err(QemuError::Qmp { reason, .. }) if reason == "connection closed" => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// `file:PATH` for QEMU's migration; refuses paths QEMU would read differently (a comma
/// starts options such as `offset=`) or that are not absolute UTF-8.
pub fn file_uri(path: &Path) -> Result<String, String> {
    let text = path
        .to_str()
        .ok_or_else(|| format!("{}: not UTF-8", path.display()))?;
    if !path.is_absolute() || text.contains(',') || text.chars().any(char::is_control) {
        return Err(format!(
            "{text:?}: a migration file must be an absolute path without commas"
        ));
    }
    Ok(format!("file:{text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_file_uris() {
        assert_eq!(
            file_uri(Path::new("/w/vm-1/state")).unwrap(),
            "file:/w/vm-1/state"
        );
        for bad in ["rel/state", "/w/a,offset=9", "/w/a\nb"] {
            assert!(file_uri(Path::new(bad)).is_err(), "{bad}");
        }
    }
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixListener;

    /// A fake QMP server that answers each command from a script.
    async fn fake_server(listener: UnixListener, replies: Vec<&'static str>) {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        for reply in replies {
            if lines.next_line().await.unwrap().is_none() {
                return;
            }
            w.write_all(reply.as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn negotiates_skips_events_and_reports_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_server(
            listener,
            vec![
                "{\"return\": {}}\n",
                "{\"event\": \"STOP\"}\n{\"return\": {\"running\": false, \"status\": \"paused\"}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n",
            ],
        ));
        let me = nix::unistd::Uid::effective().as_raw();
        let mut c = QmpClient::connect(&path, Some(me), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            c.query_status().await.unwrap(),
            (false, "paused".to_owned())
        );
        let err = c.execute("cont", None).await.unwrap_err();
        assert!(err.to_string().contains("GenericError: nope"), "{err}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn wrong_peer_uid_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("qmp.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let me = nix::unistd::Uid::effective().as_raw();
        let err = QmpClient::connect(&path, Some(me + 4242), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(err, QemuError::PeerUid { .. }), "{err}");
    }

    #[tokio::test]
    async fn missing_socket_times_out() {
        let tmp = tempfile::tempdir().unwrap();
        let err = QmpClient::connect(
            &tmp.path().join("none.sock"),
            None,
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, QemuError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("qmp.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let err = QmpClient::connect(&path, None, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, QemuError::Timeout { .. }), "{err}");
    }
}
