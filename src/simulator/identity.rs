//! A fake managed identity endpoint (App Service protocol, api-version
//! 2019-08-01), so the service's real `ManagedIdentityCredential` can run
//! against the simulator: set `IDENTITY_ENDPOINT` to
//! `SimHandle::identity_endpoint()` and `IDENTITY_HEADER` to
//! `SimConfig::identity_header`.
//!
//! The contract is App Service's managed identity REST protocol
//! (<https://learn.microsoft.com/azure/app-service/overview-managed-identity#rest-endpoint-reference>)
//! as `azure_identity` 1.x reads it (Azure/azure-sdk-for-rust,
//! `sdk/identity/azure_identity`): `expires_on`
//! is unix seconds **as a string** (a JSON number fails `azure_identity`), and
//! it is an hour ahead in real time (not sim time: the credential compares it
//! with the wall clock, and anything under 5 minutes defeats its cache).
//!
//! The `resource` decides the token: `SimConfig::token` for one of
//! `SimConfig::audiences`, otherwise a token the Defender API answers 401.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::json;
use time::OffsetDateTime;

use super::respond::json;
use super::seed::IDENTITY_CLIENT_ID;
use super::state::Sim;

const TOKEN_PATH: &str = "/_identity/token";
const API_VERSION: &str = "2019-08-01";

pub(crate) async fn handle(State(sim): State<Arc<Sim>>, request: Request) -> Response {
    if request.uri().path() != TOKEN_PATH {
        return error(
            StatusCode::NOT_FOUND,
            format!("The identity endpoint is {TOKEN_PATH}"),
        );
    }
    if request.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{} is not allowed; the identity endpoint takes GET",
                request.method()
            ),
        );
    }
    let secret = request
        .headers()
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok());
    if secret != Some(sim.config.identity_header.as_str()) {
        return error(
            StatusCode::UNAUTHORIZED,
            "The x-identity-header header is missing or does not match IDENTITY_HEADER".to_owned(),
        );
    }
    let params: Vec<(String, String)> =
        url::form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if param("api-version") != Some(API_VERSION) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("api-version must be {API_VERSION}"),
        );
    }
    let Some(resource) = param("resource").filter(|r| !r.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "The resource query parameter is required".to_owned(),
        );
    };
    let expires_on = OffsetDateTime::now_utc().unix_timestamp() + 3600;
    json(
        StatusCode::OK,
        &json!({
            // The resource decides the token: one for another API is
            // refused by the simulated Defender API (401).
            "access_token": sim.issue_token(resource),
            "expires_on": expires_on.to_string(),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": param("client_id").unwrap_or(IDENTITY_CLIENT_ID),
        }),
    )
}

/// App Service's error shape: `{"statusCode", "message", "correlationId"}`.
fn error(status: StatusCode, message: String) -> Response {
    json(
        status,
        &json!({
            "statusCode": status.as_u16(),
            "message": message,
            "correlationId": uuid::Uuid::new_v4().to_string(),
        }),
    )
}
