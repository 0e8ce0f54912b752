//! API errors: `{"error": {kind, message, retryable}}` with an HTTP status chosen by kind.
//!
//! | kind | status |
//! |---|---|
//! | `input` | 400 (422 when the JSON has the wrong shape) |
//! | `unauthorized` | 401 |
//! | `not_found` (unknown session or route) | 404 |
//! | `method_not_allowed` | 405 |
//! | `session_closed` | 410 |
//! | `payload_too_large` | 413 |
//! | `output_limit` | 422 |
//! | `too_many_sessions` (per-token limit) | 429 + `Retry-After` |
//! | `permanent`, `internal` | 500 |
//! | `guest` | 500 (404 for a missing file, 400 for a refused path) |
//! | `no_space` (the VM's home directory is full) | 507 |
//! | `outcome_unknown` | 502 |
//! | `transient`, `capacity`, `shutting_down` | 503 + `Retry-After` |

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sandbox_core::{Error, ErrorKind};

use super::api::{ErrorBody, ErrorDetail};

/// What the access log learns from a response (kept in its extensions).
#[derive(Debug, Clone, Default)]
pub struct LogInfo {
    /// Error kind, when the answer is an error.
    pub error_kind: Option<String>,
    /// The VM involved, when known.
    pub vm_id: Option<String>,
    /// The session involved, when the path does not say.
    pub session_id: Option<String>,
}

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError(Box<Inner>);

#[derive(Debug, Clone)]
struct Inner {
    status: StatusCode,
    detail: ErrorDetail,
    retry_after: Option<u64>,
    vm_id: Option<String>,
}

impl ApiError {
    /// An error with an explicit status and kind.
    pub fn new(
        status: StatusCode,
        kind: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self(Box::new(Inner {
            status,
            detail: ErrorDetail {
                kind: kind.into().into_owned(),
                message: message.into(),
                retryable: false,
                cause: None,
                field: None,
            },
            retry_after: None,
            vm_id: None,
        }))
    }

    /// Marks the error retryable after `secs` seconds (sets `Retry-After`).
    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.0.detail.retryable = true;
        self.0.retry_after = Some(secs);
        self
    }

    /// Sets the request field at fault.
    #[must_use]
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.0.detail.field = Some(field.into());
        self
    }

    /// 400 input error.
    pub fn input(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "input", message).field(field)
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 404 for a session id this caller does not know.
    pub fn unknown_session(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no session {id}"),
        )
    }

    /// 410 for a session that was closed (deleted, idle, or its VM died).
    pub fn session_closed(id: &str) -> Self {
        Self::new(
            StatusCode::GONE,
            "session_closed",
            format!("session {id} is closed"),
        )
    }

    /// 413.
    pub fn too_large(what: &str, limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("{what} is larger than the {limit} byte limit"),
        )
    }

    /// 503 while shutting down.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        )
        .retry_after(5)
    }

    /// 500 for a failure of the server itself.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.0.status
    }

    /// The JSON detail.
    pub fn detail(&self) -> &ErrorDetail {
        &self.0.detail
    }

    /// The stable kind.
    pub fn kind(&self) -> &str {
        &self.0.detail.kind
    }
}

fn cause_of(kind: ErrorKind) -> Option<String> {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.get("cause").and_then(|c| c.as_str()).map(str::to_owned))
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self::from(&e)
    }
}

impl From<&Error> for ApiError {
    fn from(e: &Error) -> Self {
        let kind = e.kind();
        let message = e.to_string();
        let status = match kind {
            ErrorKind::Input => StatusCode::BAD_REQUEST,
            ErrorKind::Transient(_) => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Permanent(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::OutcomeUnknown => StatusCode::BAD_GATEWAY,
            ErrorKind::SessionClosed => StatusCode::GONE,
            ErrorKind::OutputLimit => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
            ErrorKind::Guest => {
                let m = e.message().to_ascii_lowercase();
                if m.contains("does not exist") || m.contains("no such file") {
                    StatusCode::NOT_FOUND
                } else if m.starts_with("path:") {
                    StatusCode::BAD_REQUEST
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            }
        };
        let mut out = Self::new(status, kind.name(), message);
        out.0.detail.cause = cause_of(kind);
        out.0.detail.field = e.context().field.clone();
        out.0.vm_id = e.context().vm_id.map(|v| v.to_string());
        if e.is_retryable() {
            out = out.retry_after(1);
        }
        out
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let info = LogInfo {
            error_kind: Some(self.0.detail.kind.clone()),
            vm_id: self.0.vm_id.clone(),
            session_id: None,
        };
        let body = ErrorBody {
            error: self.0.detail,
        };
        let mut resp = (self.0.status, axum::Json(body)).into_response();
        if let Some(secs) = self.0.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.0.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sbx\""),
            );
        }
        resp.extensions_mut().insert(info);
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandbox_core::{PermanentCause, TransientCause};

    #[test]
    fn status_by_kind() {
        let cases = [
            (Error::input("code", "x"), 400, "input"),
            (
                Error::transient(TransientCause::Capacity, "x"),
                503,
                "transient",
            ),
            (
                Error::permanent(PermanentCause::Config, "x"),
                500,
                "permanent",
            ),
            (Error::outcome_unknown("x"), 502, "outcome_unknown"),
            (Error::session_closed("x"), 410, "session_closed"),
            (Error::new(ErrorKind::OutputLimit, "x"), 422, "output_limit"),
            (Error::new(ErrorKind::Guest, "io: boom"), 500, "guest"),
            (Error::new(ErrorKind::NoSpace, "full"), 507, "no_space"),
            (
                Error::new(ErrorKind::Guest, "path: \"a\" does not exist"),
                404,
                "guest",
            ),
        ];
        for (e, status, kind) in cases {
            let a = ApiError::from(&e);
            assert_eq!(a.status().as_u16(), status, "{e}");
            assert_eq!(a.kind(), kind);
            assert_eq!(a.detail().retryable, e.is_retryable());
        }
        let a = ApiError::from(Error::transient(TransientCause::Capacity, "full"));
        assert_eq!(a.detail().cause.as_deref(), Some("capacity"));
        let resp = a.into_response();
        assert!(resp.headers().contains_key(header::RETRY_AFTER));
    }
}
