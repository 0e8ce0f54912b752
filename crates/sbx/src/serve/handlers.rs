//! The endpoint handlers. Each carries its OpenAPI description (`utoipa::path`).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Extension;
use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use sandbox_core::{Error, ExecutionResult, PermanentCause, RunOptions, Session};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;

use super::AppState;
use super::api::{
    ExecBody, FileEntry, FileList, FileWritten, Health, ListQuery, RunBody, RunResult, SessionBody,
    SessionCreated, SessionInfo, SessionList, UploadQuery,
};
use super::auth::Caller;
use super::error::{ApiError, LogInfo};
use super::metrics::{Metrics, Op};
use super::registry::Lookup;
use super::stream::{self, ExecStream};

/// Reads a JSON body of at most `limit` bytes (413 beyond, enforced while reading).
/// An empty body reads as `{}` when `empty_ok`.
async fn read_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
    empty_ok: bool,
) -> Result<T, ApiError> {
    if let Some(len) = content_length(headers)
        && len > limit
    {
        return Err(ApiError::too_large("the request body", limit));
    }
    let mut buf = BytesMut::new();
    let mut data = body.into_data_stream();
    while let Some(chunk) = data.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::input("body", format!("reading the body failed: {e}")))?;
        if (buf.len() + chunk.len()) as u64 > limit {
            return Err(ApiError::too_large("the request body", limit));
        }
        buf.extend_from_slice(&chunk);
    }
    let bytes: &[u8] = if buf.iter().all(u8::is_ascii_whitespace) && empty_ok {
        b"{}"
    } else {
        &buf
    };
    serde_json::from_slice(bytes).map_err(|e| {
        let msg = format!("invalid request body: {e}");
        match e.classify() {
            serde_json::error::Category::Data => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "input", msg).field("body")
            }
            _ => ApiError::input("body", msg),
        }
    })
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn lookup(state: &AppState, id: &str, caller: &Caller) -> Result<Session, ApiError> {
    match state.inner.registry.get(id, &caller.token_id) {
        Lookup::Live(s) => Ok(s),
        Lookup::Closed => Err(ApiError::session_closed(id)),
        Lookup::Unknown => Err(ApiError::unknown_session(id)),
    }
}

fn record(metrics: &Metrics, op: Op, r: &Result<ExecutionResult, Error>) {
    match r {
        Ok(r) => metrics.record_result(op, r),
        Err(_) => metrics.record_failure(op),
    }
}

/// Counts a run as cancelled when dropped before it finished (the client went away).
struct CancelGuard {
    metrics: Arc<Metrics>,
    finished: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics.run_cancelled();
            tracing::info!("client went away: run cancelled, VM destroyed");
        }
    }
}

/// Runs code in a fresh microVM that is destroyed afterwards.
///
/// With `Accept: application/x-ndjson` the answer streams `stdout`/`stderr` events as the
/// output arrives, then one `result` (or `error`) event. Disconnecting cancels the run
/// and destroys the VM.
#[utoipa::path(
    post,
    path = "/v1/run",
    tag = "runs",
    request_body = RunBody,
    responses(
        (status = 200, description = "The run finished (whatever the code's exit code)",
            content((RunResult = "application/json"), (super::api::StreamEvent = "application/x-ndjson"))),
        (status = 400, description = "Invalid request", body = super::api::ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = super::api::ErrorBody),
        (status = 413, description = "Body too large", body = super::api::ErrorBody),
        (status = 422, description = "Body has the wrong JSON shape, or output over the limit", body = super::api::ErrorBody),
        (status = 500, description = "Permanent or guest error", body = super::api::ErrorBody),
        (status = 502, description = "Outcome unknown: the code may have run", body = super::api::ErrorBody),
        (status = 503, description = "Transient failure or no capacity; retry after Retry-After", body = super::api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn run(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let slot = match state.run_slot(&caller.token_id) {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    match run_inner(state, headers, body, slot).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run_inner(
    state: AppState,
    headers: HeaderMap,
    body: Body,
    slot: super::RunSlot,
) -> Result<Response, ApiError> {
    let b: RunBody = read_json(&headers, body, state.inner.config.max_body_bytes, false).await?;
    let mut req = b.to_request(state.inner.scheduler.config());
    req.validate()?;
    let metrics = state.inner.metrics.clone();
    if stream::wants_ndjson(&headers) {
        let (callbacks, rx) = stream::channel_callbacks();
        let st = state.clone();
        let fut = async move {
            let mut guard = CancelGuard {
                metrics: st.inner.metrics.clone(),
                finished: false,
            };
            let opts = RunOptions {
                callbacks,
                boot_log: None,
            };
            let r = st.inner.scheduler.run(req, opts).await;
            guard.finished = true;
            record(&st.inner.metrics, Op::Run, &r);
            drop(slot);
            r
        };
        return Ok(stream::respond(ExecStream::new(Box::pin(fut), rx), metrics).await);
    }
    let mut guard = CancelGuard {
        metrics: metrics.clone(),
        finished: false,
    };
    let r = state.inner.scheduler.run(req, RunOptions::default()).await;
    guard.finished = true;
    drop(slot);
    record(&metrics, Op::Run, &r);
    Ok(Json(RunResult::from(&r?)).into_response())
}

/// Starts a session: a VM that keeps its interpreter state across execs until it is
/// deleted or stays idle for `idle_timeout` seconds.
#[utoipa::path(
    post,
    path = "/v1/sessions",
    tag = "sessions",
    request_body(content = SessionBody, description = "May be empty: every field has a default"),
    responses(
        (status = 201, description = "Session started", body = SessionCreated,
            headers(("Location" = String, description = "The session's URL"))),
        (status = 400, description = "Invalid request", body = super::api::ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = super::api::ErrorBody),
        (status = 422, description = "Body has the wrong JSON shape", body = super::api::ErrorBody),
        (status = 429, description = "This token holds its maximum of sessions", body = super::api::ErrorBody),
        (status = 500, description = "Permanent error", body = super::api::ErrorBody),
        (status = 503, description = "Server at its session maximum, transient failure or no capacity", body = super::api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_session(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let b: SessionBody = read_json(&headers, body, state.inner.config.max_body_bytes, true).await?;
    let mut req = b.to_request(state.inner.scheduler.config());
    req.validate()?;
    let cfg = &state.inner.config;
    let slot = state.inner.registry.reserve(
        &caller.token_id,
        cfg.max_sessions,
        cfg.max_sessions_per_token,
    )?;
    let session = state
        .inner
        .scheduler
        .session(req, RunOptions::default())
        .await?;
    slot.insert(session.clone());
    state.inner.metrics.session_created();
    let id = session.id().to_string();
    tracing::info!(session_id = %id, "session started");
    let body = SessionCreated {
        id: id.clone(),
        language: session.language().into(),
        exposed_ports: session.exposed_ports().iter().map(Into::into).collect(),
        vm_start: super::api::vm_start_name(session.vm_start()).to_owned(),
    };
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/sessions/{id}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.extensions_mut().insert(LogInfo {
        session_id: Some(id),
        ..LogInfo::default()
    });
    Ok(resp)
}

/// Lists the caller's live sessions, oldest first.
#[utoipa::path(
    get,
    path = "/v1/sessions",
    tag = "sessions",
    responses(
        (status = 200, description = "Live sessions", body = SessionList),
        (status = 401, description = "Missing or wrong bearer token", body = super::api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_sessions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Json<SessionList> {
    let sessions = state
        .inner
        .registry
        .list(&caller.token_id)
        .iter()
        .map(SessionInfo::from)
        .collect();
    Json(SessionList { sessions })
}

/// Closes a session and destroys its VM.
#[utoipa::path(
    delete,
    path = "/v1/sessions/{id}",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 204, description = "Closed"),
        (status = 401, description = "Missing or wrong bearer token", body = super::api::ErrorBody),
        (status = 404, description = "No such session", body = super::api::ErrorBody),
        (status = 410, description = "Already closed", body = super::api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_session(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    match state.inner.registry.remove(&id, &caller.token_id) {
        Lookup::Live(s) => {
            s.close().await;
            state.inner.metrics.session_deleted();
            tracing::info!(session_id = %id, "session deleted");
            Ok(StatusCode::NO_CONTENT)
        }
        Lookup::Closed => Err(ApiError::session_closed(&id)),
        Lookup::Unknown => Err(ApiError::unknown_session(&id)),
    }
}

/// Runs code in the session's REPL (state persists across execs).
///
/// Same streaming option as `/v1/run`. An exec runs to completion (or its timeout) even
/// if the client disconnects, so the session's state stays consistent.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/exec",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    request_body = ExecBody,
    responses(
        (status = 200, description = "The exec finished (whatever the code's exit code)",
            content((RunResult = "application/json"), (super::api::StreamEvent = "application/x-ndjson"))),
        (status = 400, description = "Invalid request", body = super::api::ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = super::api::ErrorBody),
        (status = 404, description = "No such session", body = super::api::ErrorBody),
        (status = 410, description = "Session closed", body = super::api::ErrorBody),
        (status = 413, description = "Body too large", body = super::api::ErrorBody),
        (status = 422, description = "Body has the wrong JSON shape, or output over the limit", body = super::api::ErrorBody),
        (status = 502, description = "Outcome unknown: the code may have run", body = super::api::ErrorBody),
        (status = 503, description = "Transient failure", body = super::api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn exec(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let session = lookup(&state, &id, &caller)?;
    let b: ExecBody = read_json(&headers, body, state.inner.config.max_body_bytes, false).await?;
    let mut req = b.to_request(state.inner.scheduler.config());
    req.validate(session.language())?;
    let metrics = state.inner.metrics.clone();
    let ndjson = stream::wants_ndjson(&headers);
    let (callbacks, rx) = if ndjson {
        let (c, rx) = stream::channel_callbacks();
        (c, Some(rx))
    } else {
        (Default::default(), None)
    };
    let m = metrics.clone();
    let task = tokio::spawn(
        async move {
            let r = session.exec(req, &callbacks).await;
            record(&m, Op::Exec, &r);
            r
        }
        .in_current_span(),
    );
    let fut = async move {
        match task.await {
            Ok(r) => r,
            Err(e) => Err(Error::permanent(
                PermanentCause::Internal,
                format!("the exec task failed: {e}"),
            )),
        }
    };
    match rx {
        Some(rx) => Ok(stream::respond(ExecStream::new(Box::pin(fut), rx), metrics).await),
        None => Ok(Json(RunResult::from(&fut.await?)).into_response()),
    }
}

/// Streams the request body into the guest file `path` (relative to `/home/user`;
/// parent directories are created). The size limit is enforced while streaming.
#[utoipa::path(
    put,
    path = "/v1/sessions/{id}/files/{path}",
    tag = "files",
    params(
        ("id" = String, Path, description = "Session id"),
        ("path" = String, Path, description = "Guest path, relative to /home/user (may contain '/')"),
        UploadQuery,
    ),
    request_body(content = super::api::FileContent, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Written and verified (SHA-256) by the guest", body = FileWritten),
        (status = 400, description = "Invalid path", body = super::api::ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = super::api::ErrorBody),
        (status = 404, description = "No such session", body = super::api::ErrorBody),
        (status = 410, description = "Session closed", body = super::api::ErrorBody),
        (status = 413, description = "File larger than the limit", body = super::api::ErrorBody),
        (status = 500, description = "Guest error", body = super::api::ErrorBody),
        (status = 507, description = "The VM's home directory is full (ask for more with disk_mb)", body = super::api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn put_file(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
    query: Result<Query<UploadQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<FileWritten>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::input("query", e.body_text()))?;
    let session = lookup(&state, &id, &caller)?;
    let limit = state.inner.config.max_file_bytes;
    if let Some(len) = content_length(&headers)
        && len > limit
    {
        return Err(ApiError::too_large("the file", limit));
    }
    let over = Arc::new(AtomicBool::new(false));
    let flag = over.clone();
    let mut seen: u64 = 0;
    let data = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(io::Error::other)?;
        seen += chunk.len() as u64;
        if seen > limit {
            flag.store(true, Ordering::SeqCst);
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "the upload exceeds the size limit",
            ));
        }
        Ok::<Bytes, io::Error>(chunk)
    });
    let mut reader = tokio_util::io::StreamReader::new(data.into_stream());
    let r = session.write_file(&path, &mut reader, q.executable).await;
    match r {
        Ok(size) => Ok(Json(FileWritten { path, size })),
        Err(_) if over.load(Ordering::SeqCst) => Err(ApiError::too_large("the file", limit)),
        Err(e) => Err(e.into()),
    }
}

/// Streams the guest file `path` (relative to `/home/user`) as the answer body.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/files/{path}",
    tag = "files",
    params(
        ("id" = String, Path, description = "Session id"),
        ("path" = String, Path, description = "Guest path, relative to /home/user (may contain '/')"),
    ),
    responses(
        (status = 200, description = "The file's bytes (verified against the guest's SHA-256; \
            a transfer that fails midway is cut off)",
            body = super::api::FileContent, content_type = "application/octet-stream"),
        (status = 400, description = "Invalid path", body = super::api::ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = super::api::ErrorBody),
        (status = 404, description = "No such session or file", body = super::api::ErrorBody),
        (status = 410, description = "Session closed", body = super::api::ErrorBody),
        (status = 500, description = "Guest error", body = super::api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_file(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let session = lookup(&state, &id, &caller)?;
    let (mut rd, wr) = tokio::io::duplex(256 * 1024);
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(
        async move {
            let mut wr = wr;
            let r = session.read_file(&path, &mut wr).await;
            let _ = wr.shutdown().await;
            drop(wr);
            let _ = tx.send(r);
        }
        .in_current_span(),
    );
    // Wait for the first bytes (or the outcome) so a failure gets its own status.
    let mut first = BytesMut::with_capacity(64 * 1024);
    let n = rd
        .read_buf(&mut first)
        .await
        .map_err(|e| ApiError::internal(format!("reading the download pipe failed: {e}")))?;
    if n == 0 {
        return match rx.await {
            Ok(Ok(_)) => Ok(octet_stream(Body::empty())),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(ApiError::internal(
                "the download task ended without an answer",
            )),
        };
    }
    let rest = tokio_util::io::ReaderStream::new(rd);
    let outcome = futures::stream::once(async move {
        match rx.await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(Err(io::Error::other(format!("download failed: {e}")))),
            Err(_) => Some(Err(io::Error::other("download task ended"))),
        }
    })
    .filter_map(std::future::ready);
    let body = futures::stream::once(std::future::ready(Ok(first.freeze())))
        .chain(rest)
        .chain(outcome);
    Ok(octet_stream(Body::from_stream(body)))
}

fn octet_stream(body: Body) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// Lists a directory of the session's guest (default `/home/user`).
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/files",
    tag = "files",
    params(("id" = String, Path, description = "Session id"), ListQuery),
    responses(
        (status = 200, description = "The directory's entries", body = FileList),
        (status = 400, description = "Invalid path", body = super::api::ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = super::api::ErrorBody),
        (status = 404, description = "No such session or directory", body = super::api::ErrorBody),
        (status = 410, description = "Session closed", body = super::api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_files(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<FileList>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::input("query", e.body_text()))?;
    let session = lookup(&state, &id, &caller)?;
    let dir = q.dir.unwrap_or_default();
    let entries = session
        .list_files(&dir)
        .await?
        .into_iter()
        .map(|e| FileEntry {
            name: e.name,
            is_dir: e.is_dir,
            size: e.size,
        })
        .collect();
    Ok(Json(FileList { dir, entries }))
}

/// Liveness: answers without authentication.
#[utoipa::path(
    get,
    path = "/v1/health",
    tag = "service",
    responses((status = 200, description = "The server is up", body = Health))
)]
pub async fn health(State(state): State<AppState>) -> Json<Health> {
    let i = &state.inner;
    Json(Health {
        status: if i.shutting_down.load(Ordering::SeqCst) {
            "shutting_down".into()
        } else {
            "ok".into()
        },
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: i.started.elapsed().as_secs(),
        sessions: i.registry.len(),
        vms: i.scheduler.manager().live_count(),
    })
}

/// The `sbx doctor` report of this host.
#[utoipa::path(
    get,
    path = "/v1/doctor",
    tag = "service",
    responses(
        (status = 200, description = "The doctor report (as `sbx doctor --json`)", body = Object),
        (status = 401, description = "Missing or wrong bearer token", body = super::api::ErrorBody),
        (status = 404, description = "This server has no doctor report (library use)", body = super::api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn doctor(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    match &state.inner.doctor {
        Some(f) => Ok(Json(f().await)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "this server has no doctor report",
        )),
    }
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    responses(
        (status = 200, description = "Metrics", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 401, description = "Missing or wrong bearer token", body = super::api::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let i = &state.inner;
    let text = i.metrics.render(&i.scheduler, i.registry.len());
    let mut resp = (StatusCode::OK, text).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// This document: OpenAPI 3.1, generated from the code.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "service",
    responses((status = 200, description = "The OpenAPI document", body = Object))
)]
pub async fn openapi() -> Response {
    let mut resp = (StatusCode::OK, super::openapi::document_json()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// 404 for unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// 405 for known routes with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}
