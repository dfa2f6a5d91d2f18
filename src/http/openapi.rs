//! `GET /v1/openapi.json`: the OpenAPI 3.1 description of every HTTP endpoint but the
//! consumer streams (those are in `docs/asyncapi.yaml`), so that integrators can generate
//! clients and check their calls against what the bridge answers.
//!
//! The document is `docs/openapi.json`, compiled into the binary so that the bridge always
//! serves the description of its own version; `tests/it/openapi.rs` keeps it true by running
//! schemathesis against a live bridge. It is served without authentication: it describes the
//! admin API but holds no secret.

use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::AppState;

/// The document, as shipped in `docs/openapi.json`.
pub const DOCUMENT: &str = include_str!("../../docs/openapi.json");

/// The route serving [`DOCUMENT`].
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/v1/openapi.json", get(document))
}

async fn document() -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], DOCUMENT)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_is_openapi_3_1_json() {
        let doc: serde_json::Value = serde_json::from_str(super::DOCUMENT).expect("JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["paths"]["/v1/openapi.json"].is_object());
    }
}
