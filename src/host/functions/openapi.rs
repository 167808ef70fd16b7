//! `openapi`: `GET /api/openapi.json`, the Swagger 2.0 document that Logic Apps
//! and Power Automate custom connectors import. Anonymous, like a schema should
//! be. The document is committed (`openapi/openapi.json`) and checked in CI
//! with a validator and a schema-driven test run against the service.

use http::StatusCode;

use super::Record;
use crate::host::{invocation::Invocation, reply::Reply};

/// The committed document.
pub const DOCUMENT: &str = include_str!("../../../openapi/openapi.json");

pub fn run(invocation: &Invocation, record: &mut Record) -> Reply {
    record.outcome = Some("served");
    Reply {
        status: StatusCode::OK,
        content_type: "application/json",
        extra_headers: Vec::new(),
        body: DOCUMENT.to_owned(),
        summary: format!(
            "served the OpenAPI document to invocation {}",
            invocation.id
        ),
    }
}
