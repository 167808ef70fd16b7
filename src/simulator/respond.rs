//! Building Defender-shaped responses: OData JSON headers and the error
//! envelope `{"error":{"code","message","target"}}` with a fresh correlation id.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::defender::models::{ErrorBody, ErrorEnvelope};

/// Content type of every Defender JSON response (seen in real responses).
pub(crate) const ODATA_JSON: &str = "application/json; odata.metadata=minimal";

/// A Defender error response.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: String,
    pub(crate) message: String,
    pub(crate) retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_owned(),
            message: message.into(),
            retry_after: None,
        }
    }

    pub(crate) fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub(crate) fn odata(message: impl Into<String>) -> Self {
        Self::bad_request("ODataError", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "ResourceNotFound", message)
    }

    /// The simulator's "fail loudly": valid for Defender, not modelled here.
    pub(crate) fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            "NotImplementedInSimulator",
            message,
        )
    }

    pub(crate) fn too_many_requests(retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                format!("Rate limit is exceeded. Try again in {retry_after} seconds."),
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = odata_json(self.status, &envelope(&self.code, self.message));
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// An error envelope with a fresh correlation id in `target`.
pub(crate) fn envelope(code: &str, message: impl Into<String>) -> ErrorEnvelope {
    ErrorEnvelope {
        error: ErrorBody {
            code: code.to_owned(),
            message: message.into(),
            target: Some(uuid::Uuid::new_v4().to_string()),
        },
    }
}

/// A JSON response with Defender's OData headers.
pub(crate) fn odata_json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let mut response = json_with(status, value, ODATA_JSON);
    response
        .headers_mut()
        .insert("odata-version", HeaderValue::from_static("4.0"));
    response
}

/// A plain `application/json` response (identity endpoint, test controls).
pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    json_with(status, value, "application/json")
}

fn json_with<T: Serialize>(status: StatusCode, value: &T, content_type: &'static str) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
            body,
        )
            .into_response(),
        // Only possible for a map with non-string keys, which no wire type has.
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("simulator failed to serialize its response: {err}"),
        )
            .into_response(),
    }
}

/// The error code Defender uses for a status, for injected faults without a body.
pub(crate) fn code_for_status(status: StatusCode) -> String {
    match status.as_u16() {
        400 => "BadRequest".to_owned(),
        401 => "Unauthorized".to_owned(),
        403 => "Forbidden".to_owned(),
        404 => "NotFound".to_owned(),
        429 => "TooManyRequests".to_owned(),
        500 => "InternalServerError".to_owned(),
        _ => status
            .canonical_reason()
            .unwrap_or("Error")
            .split(|c: char| !c.is_ascii_alphanumeric())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_defender_codes() {
        assert_eq!(
            code_for_status(StatusCode::TOO_MANY_REQUESTS),
            "TooManyRequests"
        );
        assert_eq!(
            code_for_status(StatusCode::SERVICE_UNAVAILABLE),
            "ServiceUnavailable"
        );
        assert_eq!(code_for_status(StatusCode::BAD_GATEWAY), "BadGateway");
    }

    #[test]
    fn error_has_odata_headers_and_retry_after() {
        let response = ApiError::too_many_requests(7).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
        assert_eq!(response.headers()[header::CONTENT_TYPE], ODATA_JSON);
        assert_eq!(response.headers()["odata-version"], "4.0");
    }
}
