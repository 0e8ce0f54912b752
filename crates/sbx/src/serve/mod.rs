//! `sbx serve`: an HTTP API over the scheduler, for every language and agent framework.
//!
//! | endpoint | what |
//! |---|---|
//! | `POST /v1/run` | run code in a fresh VM (JSON, or NDJSON events with `Accept: application/x-ndjson`) |
//! | `POST /v1/sessions` | start a session → `{id, exposed_ports}` |
//! | `GET /v1/sessions` | the caller's live sessions |
//! | `DELETE /v1/sessions/{id}` | close a session |
//! | `POST /v1/sessions/{id}/exec` | run code in the session (same streaming option) |
//! | `PUT /v1/sessions/{id}/files/{path}` | upload (streamed) |
//! | `GET /v1/sessions/{id}/files/{path}` | download (streamed) |
//! | `GET /v1/sessions/{id}/files?dir=…` | list a directory |
//! | `GET /v1/health` | liveness (no auth) |
//! | `GET /v1/doctor` | the `sbx doctor` report |
//! | `GET /metrics` | Prometheus metrics |
//! | `GET /v1/openapi.json` | the OpenAPI 3.1 document, generated from the code (no auth) |
//!
//! The server can be built over any [`Scheduler`] ([`router`], [`serve`]), which is how
//! the tests run it over the core's fakes; [`spawn_for_test`] starts one on a free port.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use futures::future::BoxFuture;
use sandbox_core::Scheduler;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span, warn};

pub mod api;
pub mod auth;
pub mod cli;
pub mod error;
pub mod handlers;
pub mod metrics;
pub mod openapi;
pub mod registry;
pub mod stream;

pub use api::result_json;
pub use auth::{Auth, Caller};
pub use cli::ServeArgs;
pub use error::ApiError;

use error::LogInfo;
use metrics::Metrics;
use registry::Registry;

/// Limits and timings of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// Most live sessions (all tokens); beyond: 503 `capacity`.
    pub max_sessions: usize,
    /// Most live sessions of one token; beyond: 429 `too_many_sessions`.
    pub max_sessions_per_token: usize,
    /// Most `run` requests of one token in flight at once; beyond: 429 `too_many_runs`
    /// (so one token's flood holds at most this many VMs, and other tokens' requests
    /// still find capacity).
    pub max_runs_per_token: usize,
    /// Largest JSON request body, bytes; beyond: 413.
    pub max_body_bytes: u64,
    /// Largest uploaded file, bytes; beyond: 413 (enforced while streaming).
    pub max_file_bytes: u64,
    /// How long in-flight work may finish after a shutdown signal before it is cancelled.
    pub shutdown_grace: Duration,
    /// How many closed session ids answer 410 (older ones answer 404).
    pub recently_closed: usize,
    /// Client connections open at once; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, and how long an idle
    /// keep-alive connection is kept: slow or silent clients cannot hold connections.
    pub header_read_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_sessions: 32,
            max_sessions_per_token: 32,
            max_runs_per_token: 16,
            max_body_bytes: 8 << 20,
            max_file_bytes: guest_proto::limits::MAX_FILE_BYTES,
            shutdown_grace: Duration::from_secs(10),
            recently_closed: 4096,
            max_connections: 256,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// Produces the doctor report as JSON.
pub type DoctorFn = Arc<dyn Fn() -> BoxFuture<'static, serde_json::Value> + Send + Sync>;

struct Inner {
    scheduler: Scheduler,
    config: ServeConfig,
    auth: Auth,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    doctor: Option<DoctorFn>,
    started: Instant,
    shutting_down: AtomicBool,
    /// `run` requests in flight per token.
    runs: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// One `run` of a token in flight, counted until dropped.
pub(crate) struct RunSlot {
    state: AppState,
    token: String,
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        let mut runs = self
            .state
            .inner
            .runs
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = runs.get_mut(&self.token) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                runs.remove(&self.token);
            }
        }
    }
}

/// Everything the handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.inner.config)
            .field("auth", &self.inner.auth)
            .field("doctor", &self.inner.doctor.is_some())
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// State over a started `scheduler`.
    pub fn new(
        scheduler: Scheduler,
        config: ServeConfig,
        auth: Auth,
        doctor: Option<DoctorFn>,
    ) -> Self {
        let registry = Arc::new(Registry::new(config.recently_closed));
        Self {
            inner: Arc::new(Inner {
                scheduler,
                config,
                auth,
                registry,
                metrics: Arc::new(Metrics::default()),
                doctor,
                started: Instant::now(),
                shutting_down: AtomicBool::new(false),
                runs: std::sync::Mutex::new(std::collections::HashMap::new()),
            }),
        }
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &Scheduler {
        &self.inner.scheduler
    }

    /// The settings.
    pub fn config(&self) -> &ServeConfig {
        &self.inner.config
    }

    /// Live sessions.
    pub fn session_count(&self) -> usize {
        self.inner.registry.len()
    }

    /// True once a shutdown began.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// Counts a `run` of `token`, or refuses it with 429 `too_many_runs` when the token
    /// already has [`ServeConfig::max_runs_per_token`] in flight.
    pub(crate) fn run_slot(&self, token: &str) -> Result<RunSlot, ApiError> {
        let max = self.inner.config.max_runs_per_token;
        let mut runs = self.inner.runs.lock().unwrap_or_else(|e| e.into_inner());
        let n = runs.entry(token.to_owned()).or_default();
        if *n >= max {
            return Err(ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "too_many_runs",
                format!("this token already has its maximum of {max} runs in flight"),
            )
            .retry_after(1));
        }
        *n += 1;
        Ok(RunSlot {
            state: self.clone(),
            token: token.to_owned(),
        })
    }

    fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }
}

/// Request id of a request (from `X-Request-Id` when sane, else generated).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

fn session_in_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/sessions/")?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

/// Access log and request id: one structured line per request (`target: sbx::access`),
/// with request id, token id, session id, VM id when known, status and duration.
async fn access_log(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let rid = request_id(&req);
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    req.extensions_mut().insert(RequestId(rid.clone()));
    let span = info_span!("http", request_id = %rid, method = %method, path = %path);
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    let log = resp
        .extensions()
        .get::<LogInfo>()
        .cloned()
        .unwrap_or_default();
    let caller = resp
        .extensions()
        .get::<Caller>()
        .map(|c| c.token_id.clone());
    if let Some(kind) = &log.error_kind {
        state.inner.metrics.error(kind);
    }
    state.inner.metrics.request(&route, status);
    let session_id = log
        .session_id
        .as_deref()
        .or_else(|| session_in_path(&path))
        .unwrap_or("");
    let streamed = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(stream::NDJSON.as_bytes()));
    info!(
        target: "sbx::access",
        parent: &span,
        status,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        token = caller.as_deref().unwrap_or(""),
        session_id,
        vm_id = log.vm_id.as_deref().unwrap_or(""),
        error_kind = log.error_kind.as_deref().unwrap_or(""),
        streamed,
        "request"
    );
    if let Ok(v) = HeaderValue::from_str(&rid) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// True when `host` (a `Host` header value, `name[:port]`) names this machine's loopback:
/// `localhost`, an address in 127.0.0.0/8 or `[::1]`.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inner, port)) if port.is_empty() || port.starts_with(':') => inner,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Without authentication (loopback only) any web page the user visits could call the
/// API from the browser. Refused, with 403 `forbidden`:
///
/// - a `Host` that is not a loopback name (DNS rebinding: `evil.example` resolving to
///   127.0.0.1 sends `Host: evil.example`);
/// - an `Origin` (browsers send it on cross-origin and on every non-GET request) that is
///   not this very server (`http://` + the `Host`), and `Sec-Fetch-Site: cross-site`;
/// - a `POST` whose body is not `application/json` (HTML forms and "simple" cross-origin
///   requests can only send form or text bodies without a preflight).
fn browser_guard(req: &Request) -> Result<(), ApiError> {
    let forbidden =
        |msg: String| ApiError::new(axum::http::StatusCode::FORBIDDEN, "forbidden", msg);
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    if !is_loopback_host(host) {
        return Err(forbidden(format!(
            "without authentication only loopback Host headers are served, not {host:?}"
        )));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !origin.eq_ignore_ascii_case(&format!("http://{host}")) {
            return Err(forbidden(format!(
                "cross-origin requests are refused without authentication (Origin {origin:?})"
            )));
        }
    }
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
    {
        return Err(forbidden(
            "cross-site requests are refused without authentication".to_owned(),
        ));
    }
    if req.method() == axum::http::Method::POST
        && let Some(ct) = headers.get(header::CONTENT_TYPE)
    {
        let ct = ct.to_str().unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::new(
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "input",
                format!("request bodies must be application/json, not {ct:?}"),
            ));
        }
    }
    Ok(())
}

/// Bearer-token check and shutdown gate of the API routes.
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if !state.inner.auth.enabled()
        && let Err(e) = browser_guard(&req)
    {
        return e.into_response();
    }
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes().to_vec());
    let Some(caller) = state.inner.auth.check(value.as_deref()) else {
        let msg = if value.is_none() {
            "missing bearer token (Authorization: Bearer <token>)"
        } else {
            "invalid bearer token"
        };
        return ApiError::unauthorized(msg).into_response();
    };
    if state.is_shutting_down() {
        return ApiError::shutting_down().into_response();
    }
    req.extensions_mut().insert(caller.clone());
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(caller);
    resp
}

fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = what, "a handler panicked");
    ApiError::internal("the server failed while handling this request").into_response()
}

/// The API's router over `state`.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/run", post(handlers::run))
        .route(
            "/v1/sessions",
            post(handlers::create_session).get(handlers::list_sessions),
        )
        .route("/v1/sessions/{id}", delete(handlers::delete_session))
        .route("/v1/sessions/{id}/exec", post(handlers::exec))
        .route("/v1/sessions/{id}/files", get(handlers::list_files))
        .route(
            "/v1/sessions/{id}/files/{*path}",
            put(handlers::put_file).get(handlers::get_file),
        )
        .route("/v1/doctor", get(handlers::doctor))
        .route("/metrics", get(handlers::metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/v1/health", get(handlers::health))
        .route("/v1/openapi.json", get(handlers::openapi))
        .merge(api)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::disable())
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), access_log))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` resolves, then: stops accepting, lets
/// in-flight requests finish for [`ServeConfig::shutdown_grace`], cancels what remains,
/// and stops the scheduler (every session and VM is destroyed).
pub async fn serve<F>(listener: TcpListener, state: AppState, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let app = router(state.clone());
    let (began_tx, mut began_rx) = watch::channel(false);
    let st = state.clone();
    let signal = async move {
        shutdown.await;
        info!("shutdown: no longer accepting connections");
        st.begin_shutdown();
        let _ = began_tx.send(true);
    };
    let sweeper = {
        let registry = state.inner.registry.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                registry.sweep();
            }
        })
    };
    let server = accept_loop(listener, app, state.inner.config.clone(), signal);
    let mut server = std::pin::pin!(server);
    let grace = state.inner.config.shutdown_grace;
    let result = tokio::select! {
        r = &mut server => r,
        _ = async {
            let _ = began_rx.wait_for(|b| *b).await;
            tokio::time::sleep(grace).await;
        } => {
            warn!(grace_secs = grace.as_secs_f64(), "shutdown: grace period over, cancelling in-flight work");
            state.inner.scheduler.stop().await;
            match tokio::time::timeout(Duration::from_secs(5), &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    warn!("shutdown: connections still open; leaving them");
                    Ok(())
                }
            }
        }
    };
    sweeper.abort();
    // Close (and await the destruction of) every session before dropping the handles:
    // a dropped VM is only destroyed by a background task.
    for s in state.inner.registry.drain() {
        s.close().await;
    }
    state.inner.scheduler.stop().await;
    info!("shutdown: every session and VM stopped");
    result
}

/// Accepts connections until `signal` resolves, then lets open connections finish their
/// requests (graceful) and returns. At most [`ServeConfig::max_connections`] connections
/// are served at once (the next `accept` waits for one to close), and each connection's
/// request headers, and its idle time between requests, are bounded by
/// [`ServeConfig::header_read_timeout`].
async fn accept_loop<F>(
    listener: TcpListener,
    app: Router,
    config: ServeConfig,
    signal: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    use tower::Service;

    let mut make = app.into_make_service_with_connect_info::<SocketAddr>();
    let slots = Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut signal = std::pin::pin!(signal);
    loop {
        let permit = tokio::select! {
            () = &mut signal => break,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, addr) = tokio::select! {
            () = &mut signal => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Ok(svc) = make.call(addr).await;
        let svc = TowerToHyperService::new(svc);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout);
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// A server started by [`spawn_for_test`] (or [`spawn`]).
#[derive(Debug)]
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The bearer token (empty without auth).
    pub token: String,
    /// Its state.
    pub state: AppState,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    /// `http://addr` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `Bearer <token>`.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// Sends the shutdown signal and waits until [`serve`] returned.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// Starts a server on 127.0.0.1 (a free port) over `scheduler`, with default limits and
/// a fresh random token. For tests, including end-to-end tests over real VMs.
pub async fn spawn_for_test(scheduler: Scheduler) -> std::io::Result<TestServer> {
    let (auth, token) = Auth::generate().map_err(std::io::Error::other)?;
    let state = AppState::new(scheduler, ServeConfig::default(), auth, None);
    spawn(state, token).await
}

/// Starts a server for `state` on 127.0.0.1 (a free port); `token` is only reported back.
pub async fn spawn(state: AppState, token: String) -> std::io::Result<TestServer> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let st = state.clone();
    let task = tokio::spawn(serve(listener, st, async move {
        let _ = rx.await;
    }));
    Ok(TestServer {
        addr,
        token,
        state,
        stop: Some(tx),
        task,
    })
}
