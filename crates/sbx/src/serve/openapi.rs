//! The OpenAPI document, generated from the handlers' and types' annotations.

use std::sync::OnceLock;

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{api, handlers};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "sbx",
        description = "Run untrusted code in QEMU microVMs. Every endpoint except \
            /v1/health and /v1/openapi.json needs `Authorization: Bearer <token>`. \
            Errors are `{\"error\": {kind, message, retryable}}`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    paths(
        handlers::run,
        handlers::create_session,
        handlers::list_sessions,
        handlers::delete_session,
        handlers::exec,
        handlers::put_file,
        handlers::get_file,
        handlers::list_files,
        handlers::health,
        handlers::doctor,
        handlers::metrics,
        handlers::openapi,
    ),
    components(schemas(
        api::ApiLanguage,
        api::PortRequest,
        api::RunBody,
        api::SessionBody,
        api::ExecBody,
        api::PortInfo,
        api::TimingInfo,
        api::RunResult,
        api::StreamEvent,
        api::ErrorBody,
        api::ErrorDetail,
        api::SessionCreated,
        api::SessionInfo,
        api::SessionList,
        api::FileWritten,
        api::FileEntry,
        api::FileList,
        api::Health,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "runs", description = "One-shot runs in fresh microVMs"),
        (name = "sessions", description = "Long-lived microVMs with interpreter state"),
        (name = "files", description = "Files of a session's guest"),
        (name = "service", description = "Health, diagnostics, metrics and this document"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

/// The document as JSON text (built once).
pub fn document_json() -> String {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = ApiDoc::openapi();
        doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
        doc.to_pretty_json().unwrap_or_else(|_| "{}".to_owned())
    })
    .clone()
}
