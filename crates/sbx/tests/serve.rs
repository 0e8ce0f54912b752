//! `sbx serve` over the core's fakes, through a real HTTP client on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use sandbox_core::testing::{FakeCounters, fake_manager};
use sandbox_core::{Scheduler, SchedulerConfig};
use sbx::serve::{AppState, Auth, ServeConfig, TestServer, spawn, spawn_for_test};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

struct H {
    _dir: tempfile::TempDir,
    srv: TestServer,
    counters: Arc<FakeCounters>,
    c: reqwest::Client,
}

fn scheduler(max_vms: usize) -> (tempfile::TempDir, Scheduler, Arc<FakeCounters>) {
    let dir = tempfile::tempdir().unwrap();
    let (manager, counters, _channel) = fake_manager(dir.path(), max_vms);
    let sched = Scheduler::new(SchedulerConfig::default(), manager).unwrap();
    sched.start().unwrap();
    (dir, sched, counters)
}

async fn h() -> H {
    let (dir, sched, counters) = scheduler(16);
    let srv = spawn_for_test(sched).await.unwrap();
    H {
        _dir: dir,
        srv,
        counters,
        c: reqwest::Client::new(),
    }
}

async fn h_with(cfg: ServeConfig, auth: Auth, token: &str) -> H {
    let (dir, sched, counters) = scheduler(16);
    let state = AppState::new(sched, cfg, auth, None);
    let srv = spawn(state, token.to_owned()).await.unwrap();
    H {
        _dir: dir,
        srv,
        counters,
        c: reqwest::Client::new(),
    }
}

impl H {
    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.c.post(self.srv.url(path)).bearer_auth(&self.srv.token)
    }
    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.c.get(self.srv.url(path)).bearer_auth(&self.srv.token)
    }
    fn put(&self, path: &str) -> reqwest::RequestBuilder {
        self.c.put(self.srv.url(path)).bearer_auth(&self.srv.token)
    }
    fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.c
            .delete(self.srv.url(path))
            .bearer_auth(&self.srv.token)
    }

    async fn session(&self) -> String {
        let r = self.post("/v1/sessions").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let v: Value = r.json().await.unwrap();
        v["id"].as_str().unwrap().to_owned()
    }

    async fn exec(&self, id: &str, code: &str) -> (StatusCode, Value) {
        let r = self
            .post(&format!("/v1/sessions/{id}/exec"))
            .json(&json!({ "code": code }))
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap())
    }

    async fn wait_no_vm(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.counters.running() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} VMs still running",
                self.counters.running()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn error_of(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["kind"].is_string(), "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    assert!(v["error"]["retryable"].is_boolean(), "{v}");
    (status, v["error"].clone())
}

#[tokio::test]
async fn run_answers_the_cli_json_shape() {
    let h = h().await;
    let r = h
        .post("/v1/run")
        .json(&json!({"code": "print(1)", "language": "python", "timeout": 5, "env": {"A": "1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().contains_key("x-request-id"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["stdout"], "print(1)");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["warm_pool_hit"], false);
    assert!(v["timing"]["total_ms"].is_u64());
    assert_eq!(v["memory_peak_mb"], 64);

    let v: Value = h
        .post("/v1/run")
        .json(&json!({"code": "exit 3", "language": "raw"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["exit_code"], 3);
    h.wait_no_vm(Duration::from_secs(2)).await;
    assert!(h.counters.all_released());
}

#[tokio::test]
async fn auth_is_required_and_checked() {
    let h = h().await;
    let r =
        h.c.post(h.srv.url("/v1/run"))
            .json(&json!({"code": "1"}))
            .send()
            .await
            .unwrap();
    assert!(r.headers().contains_key("www-authenticate"));
    let (s, e) = error_of(r).await;
    assert_eq!(
        (s, e["kind"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );

    let r =
        h.c.get(h.srv.url("/v1/sessions"))
            .bearer_auth("not-the-token-but-long-enough")
            .send()
            .await
            .unwrap();
    assert_eq!(error_of(r).await.0, StatusCode::UNAUTHORIZED);
    let r =
        h.c.get(h.srv.url("/metrics"))
            .header("authorization", format!("Basic {}", h.srv.token))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Public endpoints.
    let r = h.c.get(h.srv.url("/v1/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "ok");
    let r = h.c.get(h.srv.url("/v1/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        h.counters
            .launches
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn input_errors_have_kinds_and_statuses() {
    let h = h().await;
    let send = |body: &'static str| {
        h.post("/v1/run")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let (s, e) = error_of(send("{not json").await.unwrap()).await;
    assert_eq!(
        (s, e["kind"].as_str()),
        (StatusCode::BAD_REQUEST, Some("input"))
    );
    let (s, _) = error_of(send(r#"{"code": 5}"#).await.unwrap()).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = error_of(send(r#"{"code": "1", "tiemout": 3}"#).await.unwrap()).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = error_of(send(r#"{"code": "1", "language": "cobol"}"#).await.unwrap()).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    // Only TCP is forwarded: UDP (or anything else) is refused before any VM work.
    for proto in ["udp", "sctp"] {
        let body = format!(
            r#"{{"code": "1", "expose_ports": [{{"internal": 53, "protocol": "{proto}"}}]}}"#
        );
        let r = h
            .post("/v1/run")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (s, e) = error_of(r).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{proto}: {e}");
        assert!(e["message"].as_str().unwrap().contains("tcp"), "{e}");
    }
    let (s, e) = error_of(send(r#"{"code": "1", "timeout": 0}"#).await.unwrap()).await;
    assert_eq!(
        (s, e["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("timeout"))
    );
    let (s, e) = error_of(send(r#"{"code": "  "}"#).await.unwrap()).await;
    assert_eq!(
        (s, e["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("code"))
    );
    // Language-dependent rules too: raw code takes shell variable names only.
    let launches = h
        .counters
        .launches
        .load(std::sync::atomic::Ordering::SeqCst);
    let (s, e) = error_of(
        send(r#"{"code": "echo", "language": "raw", "env": {"BAD-KEY": "1"}}"#)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("env.BAD-KEY"))
    );
    assert_eq!(
        h.counters
            .launches
            .load(std::sync::atomic::Ordering::SeqCst),
        launches,
        "an input error booted a VM"
    );

    // Failures of the code's run map by kind.
    let (s, e) = error_of(send(r#"{"code": "limit"}"#).await.unwrap()).await;
    assert_eq!(
        (s, e["kind"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("output_limit"))
    );
    let (s, e) = error_of(send(r#"{"code": "drop"}"#).await.unwrap()).await;
    assert_eq!(
        (s, e["kind"].as_str(), e["retryable"].as_bool()),
        (
            StatusCode::BAD_GATEWAY,
            Some("outcome_unknown"),
            Some(false)
        )
    );

    // Routing errors are JSON too.
    let (s, e) = error_of(h.get("/v1/run").send().await.unwrap()).await;
    assert_eq!(
        (s, e["kind"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
    let (s, _) = error_of(h.get("/v2/nothing").send().await.unwrap()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    h.wait_no_vm(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn oversize_bodies_get_413() {
    let (auth, token) = Auth::generate().unwrap();
    let cfg = ServeConfig {
        max_body_bytes: 1024,
        max_file_bytes: 256 * 1024,
        ..ServeConfig::default()
    };
    let h = h_with(cfg, auth, &token).await;
    let big = json!({"code": "x".repeat(2000)});
    let (s, e) = error_of(h.post("/v1/run").json(&big).send().await.unwrap()).await;
    assert_eq!(
        (s, e["kind"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );

    // Without a Content-Length: the limit is enforced while reading.
    let chunks = futures::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 512]))),
    );
    let r = h
        .post("/v1/run")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let id = h.session().await;
    // A declared length over the limit is refused up front.
    let r = h
        .put(&format!("/v1/sessions/{id}/files/big.bin"))
        .body(vec![0u8; 300 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // A streamed upload is cut off when it crosses the limit.
    let chunks = futures::stream::iter(
        (0..10).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![7u8; 64 * 1024]))),
    );
    let r = h
        .put(&format!("/v1/sessions/{id}/files/big.bin"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    // Nothing was stored and the session still works.
    let r = h
        .get(&format!("/v1/sessions/{id}/files/big.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(h.exec(&id, "get nothing").await.0, StatusCode::OK);
}

#[tokio::test]
async fn session_keeps_state_and_closes() {
    let h = h().await;
    let r = h
        .post("/v1/sessions")
        .json(&json!({"language": "python", "idle_timeout": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    let v: Value = r.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(loc, format!("/v1/sessions/{id}"));
    assert_eq!(v["exposed_ports"], json!([]));
    assert_eq!(v["language"], "python");

    assert_eq!(h.exec(&id, "set answer 42").await.0, StatusCode::OK);
    let (s, v) = h.exec(&id, "get answer").await;
    assert_eq!((s, v["stdout"].as_str()), (StatusCode::OK, Some("42\n")));

    let v: Value = h
        .get("/v1/sessions")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let list = v["sessions"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["exec_count"], 2);
    assert_eq!(list[0]["idle_timeout"], 60);
    assert!(list[0]["created"].as_str().unwrap().ends_with('Z'));

    let r = h
        .delete(&format!("/v1/sessions/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    h.wait_no_vm(Duration::from_secs(2)).await;

    // 410 for the closed session, 404 for ids never seen.
    let r = h
        .post(&format!("/v1/sessions/{id}/exec"))
        .json(&json!({"code": "1"}))
        .send()
        .await
        .unwrap();
    let (s, e) = error_of(r).await;
    assert_eq!(
        (s, e["kind"].as_str()),
        (StatusCode::GONE, Some("session_closed"))
    );
    let r = h
        .delete(&format!("/v1/sessions/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::GONE);
    let r = h
        .get(&format!("/v1/sessions/{id}/files"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::GONE);
    let unknown = uuid::Uuid::new_v4();
    for path in [
        format!("/v1/sessions/{unknown}/exec"),
        "/v1/sessions/not-a-uuid/exec".to_owned(),
    ] {
        let r = h
            .post(&path)
            .json(&json!({"code": "1"}))
            .send()
            .await
            .unwrap();
        let (s, e) = error_of(r).await;
        assert_eq!(
            (s, e["kind"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found"))
        );
    }
    let v: Value = h
        .get("/v1/sessions")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["sessions"], json!([]));
}

#[tokio::test]
async fn session_whose_vm_dies_answers_410() {
    let h = h().await;
    let id = h.session().await;
    // The fake's `drop` loses the transport: outcome unknown, the session closes.
    let (s, v) = h.exec(&id, "drop").await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{v}");
    let (s, v) = h.exec(&id, "1").await;
    assert_eq!(
        (s, v["error"]["kind"].as_str()),
        (StatusCode::GONE, Some("session_closed"))
    );
    h.wait_no_vm(Duration::from_secs(2)).await;
}

fn pseudo_random(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test]
async fn file_upload_exec_download_is_byte_exact() {
    let h = h().await;
    let id = h.session().await;
    let data = pseudo_random(5 * 1024 * 1024 + 123);
    let want = Sha256::digest(&data);
    // Streamed upload in uneven chunks, without a Content-Length.
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = data
        .chunks(100_003)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let r = h
        .put(&format!("/v1/sessions/{id}/files/data/blob.bin"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["size"], data.len() as u64);
    assert_eq!(v["path"], "data/blob.bin");

    assert_eq!(h.exec(&id, "print('hi')").await.0, StatusCode::OK);

    let r = h
        .get(&format!("/v1/sessions/{id}/files/data/blob.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    let mut hasher = Sha256::new();
    let mut n = 0;
    let mut body = r.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        n += chunk.len();
        hasher.update(&chunk);
    }
    assert_eq!(n, data.len());
    assert_eq!(hasher.finalize(), want);

    let v: Value = h
        .get(&format!("/v1/sessions/{id}/files?dir=data"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["dir"], "data");
    let entries = v["entries"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["name"] == "blob.bin" && e["size"] == data.len() as u64),
        "{v}"
    );

    // Empty files and missing files.
    let r = h
        .put(&format!("/v1/sessions/{id}/files/empty?executable=true"))
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = h
        .get(&format!("/v1/sessions/{id}/files/empty"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.unwrap().is_empty());
    let (s, e) = error_of(
        h.get(&format!("/v1/sessions/{id}/files/missing.txt"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["kind"].as_str()),
        (StatusCode::NOT_FOUND, Some("guest"))
    );
    let r = h
        .put(&format!("/v1/sessions/{id}/files/x?executable=maybe"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, StatusCode::BAD_REQUEST);
}

async fn ndjson_events(r: reqwest::Response) -> Vec<Value> {
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let text = r.text().await.unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn ndjson_streams_output_before_the_result() {
    let h = h().await;
    let n = 600_000;
    let r = h
        .post("/v1/run")
        .header("accept", "application/x-ndjson")
        .json(&json!({"code": format!("big {n}"), "language": "raw"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let events = ndjson_events(r).await;
    let (last, chunks) = events.split_last().unwrap();
    assert_eq!(last["type"], "result", "the result is last");
    assert_eq!(last["exit_code"], 0);
    assert!(chunks.len() >= 2, "output came in several events");
    let mut out = String::new();
    for e in chunks {
        assert_eq!(e["type"], "stdout");
        out.push_str(e["data"].as_str().unwrap());
    }
    assert_eq!(out.len(), n);
    assert_eq!(last["stdout"].as_str().unwrap().len(), n);

    // Sessions stream the same way; stderr has its own events.
    let id = h.session().await;
    let r = h
        .post(&format!("/v1/sessions/{id}/exec"))
        .header("accept", "application/x-ndjson")
        .json(&json!({"code": "err"}))
        .send()
        .await
        .unwrap();
    let events = ndjson_events(r).await;
    assert_eq!(events[0], json!({"type": "stderr", "data": "boom\n"}));
    assert_eq!(events[1]["type"], "result");
    assert_eq!(events[1]["exit_code"], 1);

    // A failure before any output is a plain error answer with its status.
    let r = h
        .post(&format!("/v1/sessions/{id}/exec"))
        .header("accept", "application/x-ndjson")
        .json(&json!({"code": "limit"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn disconnect_mid_run_cancels_and_destroys_the_vm() {
    let h = h().await;
    for accept in ["application/json", "application/x-ndjson"] {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(400))
            .build()
            .unwrap();
        let url = h.srv.url("/v1/run");
        let token = h.srv.token.clone();
        let req = tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .header("accept", accept)
                .json(&json!({"code": "hang", "timeout": 60}))
                .send()
                .await
        });
        // The VM is running while the client waits...
        let deadline = Instant::now() + Duration::from_secs(2);
        while h.counters.running() == 0 {
            assert!(Instant::now() < deadline, "the run never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // ...and destroyed once the client gives up.
        assert!(req.await.unwrap().is_err(), "the client timed out");
        h.wait_no_vm(Duration::from_secs(3)).await;
    }
    let text = h
        .get("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("sbx_runs_total{outcome=\"cancelled\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn session_limits_global_and_per_token() {
    let tokens = [
        "token-one-long-enough",
        "token-two-long-enough",
        "token-three-long-enough",
    ];
    let cfg = ServeConfig {
        max_sessions: 2,
        max_sessions_per_token: 1,
        ..ServeConfig::default()
    };
    let h = h_with(cfg, Auth::tokens(tokens).unwrap(), tokens[0]).await;
    let create = |t: &'static str| h.c.post(h.srv.url("/v1/sessions")).bearer_auth(t).send();
    let r = create(tokens[0]).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let id1 = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = create(tokens[0]).await.unwrap();
    assert!(r.headers().contains_key("retry-after"));
    let (s, e) = error_of(r).await;
    assert_eq!(
        (s, e["kind"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("too_many_sessions"))
    );
    assert_eq!(
        create(tokens[1]).await.unwrap().status(),
        StatusCode::CREATED
    );
    let r = create(tokens[2]).await.unwrap();
    assert!(r.headers().contains_key("retry-after"));
    let (s, e) = error_of(r).await;
    assert_eq!(
        (s, e["kind"].as_str(), e["retryable"].as_bool()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("capacity"),
            Some(true)
        )
    );
    // Sessions are private to their token.
    let r =
        h.c.post(h.srv.url(&format!("/v1/sessions/{id1}/exec")))
            .bearer_auth(tokens[1])
            .json(&json!({"code": "1"}))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let v: Value =
        h.c.get(h.srv.url("/v1/sessions"))
            .bearer_auth(tokens[1])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(v["sessions"].as_array().unwrap().len(), 1);
    // Deleting frees a slot.
    let r =
        h.c.delete(h.srv.url(&format!("/v1/sessions/{id1}")))
            .bearer_auth(tokens[0])
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        create(tokens[2]).await.unwrap().status(),
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn idle_sessions_close_and_answer_410() {
    let h = h().await;
    let r = h
        .post("/v1/sessions")
        .json(&json!({"idle_timeout": 10}))
        .send()
        .await
        .unwrap();
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(h.counters.running(), 1);
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    h.wait_no_vm(Duration::from_secs(3)).await;
    let v: Value = h
        .get("/v1/sessions")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["sessions"], json!([]));
    let (s, _) = h.exec(&id, "1").await;
    assert_eq!(s, StatusCode::GONE);
}

#[tokio::test]
async fn metrics_and_health() {
    let h = h().await;
    h.post("/v1/run")
        .json(&json!({"code": "1"}))
        .send()
        .await
        .unwrap();
    h.c.get(h.srv.url("/metrics")).send().await.unwrap();
    let id = h.session().await;
    h.exec(&id, "1").await;
    let r = h.get("/metrics").send().await.unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();
    for want in [
        "sbx_runs_total{outcome=\"ok\"} 1",
        "sbx_session_execs_total{outcome=\"ok\"} 1",
        "sbx_sessions_created_total 1",
        "sbx_sessions_active 1",
        "sbx_vms_live 1",
        "sbx_errors_total{kind=\"unauthorized\"} 1",
        "sbx_boot_seconds_count 1",
        "sbx_exec_seconds_count 2",
        "# TYPE sbx_run_seconds histogram",
        "sbx_http_requests_total{route=\"/v1/run\",status=\"200\"} 1",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let v: Value = h
        .get("/v1/health")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["sessions"], 1);
    assert_eq!(v["vms"], 1);
    // No doctor over the fakes.
    let r = h.get("/v1/doctor").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn request_ids_are_echoed() {
    let h = h().await;
    let r =
        h.c.get(h.srv.url("/v1/health"))
            .header("x-request-id", "abc-123")
            .send()
            .await
            .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let r =
        h.c.get(h.srv.url("/v1/health"))
            .header("x-request-id", "bad id with spaces")
            .send()
            .await
            .unwrap();
    assert_ne!(r.headers()["x-request-id"], "bad id with spaces");
}

#[tokio::test]
async fn shutdown_cancels_in_flight_work_and_stops_every_vm() {
    let (auth, token) = Auth::generate().unwrap();
    let cfg = ServeConfig {
        shutdown_grace: Duration::from_millis(300),
        ..ServeConfig::default()
    };
    let h = h_with(cfg, auth, &token).await;
    let _id = h.session().await;
    let c = h.c.clone();
    let url = h.srv.url("/v1/run");
    let t = token.clone();
    let in_flight = tokio::spawn(async move {
        c.post(url)
            .bearer_auth(t)
            .json(&json!({"code": "hang", "timeout": 60}))
            .send()
            .await
    });
    while h.counters.running() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let H {
        srv, counters, c, ..
    } = h;
    let addr = srv.addr;
    let state = srv.state.clone();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), srv.shutdown())
        .await
        .expect("shutdown finished in time")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the grace period was honoured"
    );
    assert_eq!(counters.running(), 0, "no VM left");
    assert!(counters.all_released());
    assert!(state.scheduler().manager().live_count() == 0);
    // The in-flight request got an answer (an error) or lost its connection.
    if let Ok(r) = in_flight.await.unwrap() {
        assert!(!r.status().is_success(), "{}", r.status());
    }
    // The scheduler is stopped and nothing listens any more.
    let err = state
        .scheduler()
        .run(
            sandbox_core::RunRequest::new(sandbox_core::Language::Python, "1"),
            Default::default(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stopped"), "{err}");
    assert!(
        c.get(format!("http://{addr}/v1/health"))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn idle_shutdown_is_prompt() {
    let h = h().await;
    let _id = h.session().await;
    let started = Instant::now();
    h.srv.shutdown().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(h.counters.running(), 0);
}

#[tokio::test]
async fn openapi_document_describes_every_endpoint() {
    let h = h().await;
    let text =
        h.c.get(h.srv.url("/v1/openapi.json"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let expected = [
        ("/v1/run", "post"),
        ("/v1/sessions", "post"),
        ("/v1/sessions", "get"),
        ("/v1/sessions/{id}", "delete"),
        ("/v1/sessions/{id}/exec", "post"),
        ("/v1/sessions/{id}/files/{path}", "put"),
        ("/v1/sessions/{id}/files/{path}", "get"),
        ("/v1/sessions/{id}/files", "get"),
        ("/v1/health", "get"),
        ("/v1/doctor", "get"),
        ("/metrics", "get"),
        ("/v1/openapi.json", "get"),
    ];
    let paths = doc["paths"].as_object().unwrap();
    let mut ops = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            if ["get", "put", "post", "delete"].contains(&method.as_str()) {
                ops += 1;
                assert!(
                    expected.contains(&(path.as_str(), method.as_str())),
                    "undocumented route? {method} {path}"
                );
                assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()));
            }
        }
    }
    for (path, method) in expected {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing"
        );
    }
    assert_eq!(ops, expected.len());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    // Every $ref resolves.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if k == "$ref" {
                        out.push(v.as_str().unwrap().to_owned());
                    } else {
                        refs(v, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap();
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling {r}"
        );
    }
    // A typed OpenAPI 3.1 model accepts it.
    let spec = oas3::from_json(&text).unwrap();
    assert_eq!(spec.paths.map(|p| p.len()), Some(paths.len()));
}

/// `"packages"` on run and session bodies: a spec that is not an exact pin (or an
/// injection attempt) is an input error naming it, before any VM work.
#[tokio::test]
async fn package_specs_are_checked_before_any_vm_work() {
    let h = h().await;
    for (path, body) in [
        (
            "/v1/run",
            r#"{"code": "1", "packages": ["six==1.16.0", "numpy>=1"]}"#,
        ),
        (
            "/v1/run",
            r#"{"code": "1", "packages": ["six==1.16.0", "x==1 --index-url=http://e"]}"#,
        ),
        (
            "/v1/sessions",
            r#"{"packages": ["six==1.16.0", "git+https://e/x"]}"#,
        ),
        (
            "/v1/run",
            r#"{"code": "1", "language": "javascript", "packages": ["lodash", "lodash@^4.0.0"]}"#,
        ),
    ] {
        let r = h
            .post(path)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (s, e) = error_of(r).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {e}");
        assert_eq!(e["kind"], "input", "{e}");
        let field = e["field"].as_str().unwrap_or_default();
        assert!(field.starts_with("packages["), "{body}: {e}");
        assert!(e["message"].as_str().unwrap().contains("package "), "{e}");
    }
    let r = h
        .post("/v1/run")
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"code": "1", "packages": [{}]}}"#,
            (0..51)
                .map(|i| format!("\"p{i}==1\""))
                .collect::<Vec<_>>()
                .join(",")
        ))
        .send()
        .await
        .unwrap();
    let (s, e) = error_of(r).await;
    assert_eq!(
        (s, e["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("packages"))
    );
    assert_eq!(h.counters.launches.load(Ordering::SeqCst), 0);
}

/// `--no-auth` (loopback only): browsers on other origins and DNS-rebound names are
/// refused before anything runs; plain API clients on loopback still work.
#[tokio::test]
async fn no_auth_refuses_cross_origin_and_foreign_hosts() {
    let h = h_with(ServeConfig::default(), Auth::disabled(), "").await;
    let port = h.srv.addr.port();
    let post = |host: Option<String>, origin: Option<String>, ct: Option<&str>| {
        let mut r = h.c.post(h.srv.url("/v1/run")).body(r#"{"code":"1"}"#);
        if let Some(host) = host {
            r = r.header("host", host);
        }
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        if let Some(ct) = ct {
            r = r.header("content-type", ct);
        }
        r
    };
    let json = Some("application/json");
    for (host, origin, ct, want) in [
        // DNS rebinding: a foreign name pointing at 127.0.0.1.
        (
            Some(format!("evil.example:{port}")),
            None,
            json,
            StatusCode::FORBIDDEN,
        ),
        (
            Some("evil.example".to_owned()),
            None,
            json,
            StatusCode::FORBIDDEN,
        ),
        // A page on another origin, even another local port.
        (
            None,
            Some("http://evil.example".to_owned()),
            json,
            StatusCode::FORBIDDEN,
        ),
        (
            None,
            Some("http://localhost:3000".to_owned()),
            json,
            StatusCode::FORBIDDEN,
        ),
        (None, Some("null".to_owned()), json, StatusCode::FORBIDDEN),
        // A form or text body (no CORS preflight).
        (
            None,
            None,
            Some("text/plain"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            None,
            None,
            Some("application/x-www-form-urlencoded"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        // Plain clients.
        (None, None, json, StatusCode::OK),
        (
            Some(format!("localhost:{port}")),
            None,
            json,
            StatusCode::OK,
        ),
        (
            Some(format!("127.0.0.1:{port}")),
            Some(format!("http://127.0.0.1:{port}")),
            json,
            StatusCode::OK,
        ),
    ] {
        let r = post(host.clone(), origin.clone(), ct).send().await.unwrap();
        assert_eq!(
            r.status(),
            want,
            "host {host:?} origin {origin:?} ct {ct:?}"
        );
    }
    let r =
        h.c.get(h.srv.url("/v1/sessions"))
            .header("sec-fetch-site", "cross-site")
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Only the successful runs launched a VM.
    assert_eq!(
        h.counters
            .launches
            .load(std::sync::atomic::Ordering::SeqCst),
        3
    );
}

/// Per-token cap on runs in flight: one token's flood is refused with 429 beyond its cap,
/// and another token still gets through.
#[tokio::test]
async fn runs_in_flight_are_capped_per_token() {
    let a = "token-a-long-enough-xyz";
    let b = "token-b-long-enough-xyz";
    let cfg = ServeConfig {
        max_runs_per_token: 2,
        ..ServeConfig::default()
    };
    let h = h_with(cfg, Auth::tokens([a, b]).unwrap(), a).await;
    let run = |token: &'static str, code: &'static str| {
        h.c.post(h.srv.url("/v1/run"))
            .bearer_auth(token)
            .json(&json!({ "code": code }))
            .send()
    };
    let slow1 = tokio::spawn(run(a, "sleep 1500"));
    let slow2 = tokio::spawn(run(a, "sleep 1500"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = run(a, "x").await.unwrap();
    assert!(r.headers().contains_key("retry-after"));
    let (status, e) = error_of(r).await;
    assert_eq!(
        (status, e["kind"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("too_many_runs"))
    );
    // Another token is not held back by A's flood.
    assert_eq!(run(b, "x").await.unwrap().status(), StatusCode::OK);
    for t in [slow1, slow2] {
        assert_eq!(t.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    // The slots are free again.
    assert_eq!(run(a, "x").await.unwrap().status(), StatusCode::OK);
}

/// Slow clients cannot hold connections: headers must arrive within the header-read
/// timeout, an idle connection is closed after it, and at most `max_connections` are
/// served at once (the next waits until one closes).
#[tokio::test]
async fn slow_clients_are_cut_off_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cfg = ServeConfig {
        header_read_timeout: Duration::from_millis(500),
        max_connections: 2,
        ..ServeConfig::default()
    };
    let h = h_with(cfg, Auth::disabled(), "").await;
    let closed_within = |mut s: tokio::net::TcpStream, limit: Duration| async move {
        let mut buf = [0u8; 256];
        let started = Instant::now();
        loop {
            match tokio::time::timeout(limit, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                Ok(Ok(_)) => {}
                Err(_) => return None,
            }
        }
    };
    // Slowloris: half the headers, then nothing.
    let mut s = tokio::net::TcpStream::connect(h.srv.addr).await.unwrap();
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let took = closed_within(s, Duration::from_secs(5)).await;
    assert!(took.is_some(), "a slow header was not cut off");
    // A connection that never sends anything.
    let s = tokio::net::TcpStream::connect(h.srv.addr).await.unwrap();
    assert!(closed_within(s, Duration::from_secs(5)).await.is_some());

    // The cap: two connections held (each sends a byte now and then, as a slow client
    // would not: the header timeout would close it) ...
    let a = tokio::net::TcpStream::connect(h.srv.addr).await.unwrap();
    let b = tokio::net::TcpStream::connect(h.srv.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ... so a third request waits ...
    let third = tokio::spawn({
        let c = h.c.clone();
        let url = h.srv.url("/v1/health");
        async move { c.get(url).send().await.map(|r| r.status()) }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!third.is_finished(), "served a third connection at once");
    // ... until the held ones are cut off by the header timeout.
    let status = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the third request was served once a slot freed")
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    drop((a, b));
}
