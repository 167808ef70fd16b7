//! The router, and the Defender API surface under `/api`.
//!
//! `/api` is dispatched through the client's own list of endpoints
//! ([`Endpoint::parse`]) rather than through axum routes so that every
//! unmodelled method or path gets the same loud `501 NotImplementedInSimulator`
//! envelope (axum's own 404/405 would look like real Defender answers), and so
//! that path ids go through the same lookup rules as Defender's.
//!
//! Order of checks for every call: bearer token and its audience (401),
//! endpoint (501), application roles (403), rate limit (429), query options
//! (400/501), then the endpoint's own rules.

use std::sync::Arc;

use axum::Router;
use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;

use super::control;
use super::filter::{self, ACTION_FIELDS, FilterError, MACHINE_FIELDS};
use super::identity;
use super::intercept::{MAX_BODY, intercept};
use super::odata::{self, QueryError, QueryOptions, Shape};
use super::ratelimit::retry_after_secs;
use super::respond::{ApiError, json, odata_json};
use super::state::{CancelError, Created, Lookup, Sim};
use super::tags;
use super::{ListOrder, NoMatch, OrderBy};
use crate::defender::{
    Endpoint,
    models::{ActionType, ODataPage},
};

/// OS platforms restrict/unrestrict accept: Windows 10 1709+, Windows 11 and
/// (per `respond-machine-alerts`) Windows Server 2019+.
const SUPPORTED_OS: &[&str] = &[
    "Windows10",
    "Windows11",
    "WindowsServer2019",
    "WindowsServer2022",
    "WindowsServer2025",
];

/// The whole simulator: recorded and faultable surfaces, test controls, and a
/// JSON 404 for anything else.
pub(crate) fn app(sim: Arc<Sim>) -> Router {
    let recorded = Router::new()
        .route("/api", any(defender))
        .route("/api/", any(defender))
        .route("/api/{*rest}", any(defender))
        .route("/_identity", any(identity::handle))
        .route("/_identity/", any(identity::handle))
        .route("/_identity/{*rest}", any(identity::handle))
        .layer(middleware::from_fn_with_state(sim.clone(), intercept));
    Router::new()
        .merge(recorded)
        .merge(control::router())
        .fallback(unknown_path)
        .with_state(sim)
}

async fn unknown_path() -> Response {
    json(
        StatusCode::NOT_FOUND,
        &super::respond::envelope(
            "NotASimulatorPath",
            "The simulator serves the Defender API under /api, the identity endpoint at \
             /_identity/token and test controls under /_sim",
        ),
    )
}

/// How a list endpoint's query options are checked; other endpoints take none.
fn shape(endpoint: Endpoint) -> Shape {
    match endpoint {
        Endpoint::ListMachines => Shape::Machines,
        Endpoint::ListActions => Shape::Actions,
        _ => Shape::Single,
    }
}

async fn defender(State(sim): State<Arc<Sim>>, request: Request) -> Response {
    handle(&sim, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn handle(sim: &Sim, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let token = authorize(&parts.headers)?;
    if let Some(resource) = sim.foreign_audience(token) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            format!(
                "The access token's audience '{resource}' is not valid for this API; request a \
                 token for https://api.securitycenter.microsoft.com"
            ),
        ));
    }
    let (endpoint, id) = route(parts.method.as_str(), parts.uri.path())?;
    sim.with_roles(|roles| check_roles(endpoint, roles))?;
    let now = sim.clock.now();
    sim.tenant()
        .acquire(endpoint, now)
        .map_err(|wait| ApiError::too_many_requests(retry_after_secs(wait, sim.clock.speed())))?;
    let query = odata::parse_query(parts.uri.query(), shape(endpoint)).map_err(query_error)?;
    let body = to_bytes(body, MAX_BODY).await.map_err(|err| {
        ApiError::bad_request(
            "InvalidRequestBody",
            format!("Unreadable request body: {err}"),
        )
    })?;

    let call = Call {
        sim,
        now,
        query,
        headers: &parts.headers,
        body: &body,
    };
    match endpoint {
        Endpoint::ListMachines => list_machines(&call),
        Endpoint::GetMachine => get_machine(&call, &id),
        Endpoint::Restrict => create_action(&call, &id, ActionType::RestrictCodeExecution),
        Endpoint::Unrestrict => create_action(&call, &id, ActionType::UnrestrictCodeExecution),
        Endpoint::ListActions => list_actions(&call),
        Endpoint::GetAction => get_action(&call, &id),
        Endpoint::Cancel => cancel(&call, &id),
        Endpoint::TagMachine => tags::tag_machine(&call, &id),
        Endpoint::TagMachines => tags::tag_machines(&call),
    }
}

/// One accepted call, as the endpoint functions see it.
pub(super) struct Call<'a> {
    pub(super) sim: &'a Sim,
    /// Sim time of the call; one instant for the whole call.
    now: OffsetDateTime,
    query: QueryOptions,
    pub(super) headers: &'a HeaderMap,
    pub(super) body: &'a [u8],
}

fn list_machines(call: &Call<'_>) -> Result<Response, ApiError> {
    let conditions = conditions(&call.query, "machines", MACHINE_FIELDS)?;
    let rows = call.sim.tenant().list_machines(&conditions);
    if rows.is_empty() && call.sim.config.no_match == NoMatch::NotFound {
        return Err(ApiError::not_found("No recent machines found"));
    }
    Ok(collection(call, rows, "/api/machines", "Machines"))
}

fn get_machine(call: &Call<'_>, id: &str) -> Result<Response, ApiError> {
    match call.sim.tenant().find_machine(id) {
        Lookup::Found(machine) => Ok(entity(call, StatusCode::OK, "Machines", machine)),
        Lookup::NotFound => Err(machine_not_found(id)),
        Lookup::AmbiguousName(n) => Err(ambiguous(id, n)),
    }
}

/// `restrictCodeExecution` / `unrestrictCodeExecution`: machine (404), body
/// (400), OS platform (400), then the duplicate rule.
fn create_action(call: &Call<'_>, id: &str, kind: ActionType) -> Result<Response, ApiError> {
    let sim = call.sim;
    let mut tenant = sim.tenant();
    let machine = match tenant.find_machine(id) {
        Lookup::Found(machine) => machine.clone(),
        Lookup::NotFound => return Err(machine_not_found(id)),
        Lookup::AmbiguousName(n) => return Err(ambiguous(id, n)),
    };
    let comment = comment(call.headers, call.body)?;
    let os = machine.os_platform.as_deref().unwrap_or("");
    if !SUPPORTED_OS.contains(&os) {
        return Err(ApiError::bad_request(
            "OsPlatformNotSupported",
            format!("{} is not supported on OS platform '{os}'", kind.as_str()),
        ));
    }
    let created = tenant.create_action(
        &machine,
        kind,
        comment,
        call.now,
        sim.life,
        sim.config.duplicate,
    );
    match created {
        Created::New(action) | Created::Existing(action) => {
            Ok(entity(call, StatusCode::CREATED, "MachineActions", &action))
        }
        Created::AlreadyInProgress => Err(ApiError::bad_request(
            "ActiveRequestAlreadyExists",
            "Action is already in progress",
        )),
    }
}

fn list_actions(call: &Call<'_>) -> Result<Response, ApiError> {
    let config = &call.sim.config;
    if call.query.newest_first && config.orderby == OrderBy::Refuse {
        return Err(ApiError::odata(
            "The query specified in the URI is not valid. Query option 'OrderBy' is not allowed. \
             To allow it, set the 'AllowedQueryOptions' property on EnableQueryAttribute or \
             QueryValidationSettings."
                .to_owned(),
        ));
    }
    let conditions = conditions(&call.query, "machine actions", ACTION_FIELDS)?;
    let tenant = call.sim.tenant();
    if let Some(mut records) = tenant.action_records(&conditions) {
        if config.list_order == ListOrder::OldestFirst && !call.query.newest_first {
            records.reverse();
        }
        let sim = call.sim;
        let (window, next_link) = odata::page(
            records,
            &call.query,
            sim.config.page_size,
            sim.config.next_link_with_top,
            &sim.base_url,
            "/api/machineactions",
        );
        let value: Vec<_> = window
            .into_iter()
            .map(|a| a.to_wire(call.now, sim.life))
            .collect();
        drop(tenant);
        let page = ODataPage {
            context: Some(format!("{}/api/$metadata#MachineActions", sim.base_url)),
            value,
            next_link,
        };
        return Ok(odata_json(StatusCode::OK, &page));
    }
    let mut rows = tenant.list_actions(&conditions, call.now, call.sim.life);
    drop(tenant);
    if config.list_order == ListOrder::OldestFirst && !call.query.newest_first {
        rows.reverse();
    }
    Ok(collection(
        call,
        rows,
        "/api/machineactions",
        "MachineActions",
    ))
}

fn get_action(call: &Call<'_>, id: &str) -> Result<Response, ApiError> {
    match call.sim.tenant().action(id, call.now, call.sim.life) {
        Some(action) => Ok(entity(call, StatusCode::OK, "MachineActions", &action)),
        None => Err(action_not_found(id)),
    }
}

/// `cancel`: action (404), body (400), then only a non-final action (400).
fn cancel(call: &Call<'_>, id: &str) -> Result<Response, ApiError> {
    let (now, life) = (call.now, call.sim.life);
    let mut tenant = call.sim.tenant();
    if tenant.action(id, now, life).is_none() {
        return Err(action_not_found(id));
    }
    let comment = comment(call.headers, call.body)?;
    match tenant.cancel(id, comment, now, life) {
        Ok(action) => Ok(entity(call, StatusCode::OK, "MachineActions", &action)),
        Err(CancelError::NotFound) => Err(action_not_found(id)),
        Err(CancelError::Terminal(status)) => Err(ApiError::bad_request(
            "BadRequest",
            format!(
                "Machine action {id} cannot be cancelled: its status is {} (a final state)",
                status.as_str()
            ),
        )),
    }
}

/// Any non-empty bearer token is accepted (tests check which one was sent
/// through the request log), except one the identity endpoint issued for
/// another resource (checked by the caller).
fn authorize(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .map(|(_, token)| token.trim())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "Authorization header is missing or does not carry a bearer token",
            )
        })
}

/// Roles that allow reads; restrict and unrestrict need their own.
const READ_ROLES: &[&str] = &["Machine.Read.All", "Machine.ReadWrite.All"];
const RESTRICT_ROLES: &[&str] = &["Machine.RestrictExecution"];
/// Adding or removing machine tags needs the write role.
const TAG_ROLES: &[&str] = &["Machine.ReadWrite.All"];
/// Cancel accepts any response role. Defender's message misspells
/// `Machine.CollectForensics` (microsoft-365-docs#6062).
const CANCEL_ROLES: &[&str] = &[
    "Machine.CollectForensic",
    "Machine.Isolate",
    "Machine.RestrictExecution",
    "Machine.Scan",
    "Machine.Offboard",
    "Machine.StopAndQuarantine",
    "Machine.LiveResponse",
];

/// 403 unless the app holds one of the endpoint's roles, with the text real
/// Defender sends (Azure/Azure-Sentinel PR #14672).
fn check_roles(endpoint: Endpoint, roles: &[String]) -> Result<(), ApiError> {
    let required = match endpoint {
        Endpoint::Restrict | Endpoint::Unrestrict => RESTRICT_ROLES,
        Endpoint::Cancel => CANCEL_ROLES,
        Endpoint::TagMachine | Endpoint::TagMachines => TAG_ROLES,
        _ => READ_ROLES,
    };
    let held = |r: &str| {
        roles.iter().any(|have| {
            have.eq_ignore_ascii_case(r)
                || (r == "Machine.CollectForensic"
                    && have.eq_ignore_ascii_case("Machine.CollectForensics"))
        })
    };
    if required.iter().any(|r| held(r)) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!(
            "Missing application roles. API required roles: {}, application roles: {}",
            required.join(", "),
            roles.join(", ")
        ),
    ))
}

/// The endpoint called and its path id, or a loud 501 for anything else.
fn route(method: &str, path: &str) -> Result<(Endpoint, String), ApiError> {
    Endpoint::parse(method, path).ok_or_else(|| {
        ApiError::not_implemented(format!("{method} {path} is not modelled by the simulator"))
    })
}

/// The `Comment` of a restrict, unrestrict or cancel body. Defender's body
/// parameter names are case-sensitive: `comment` does not count.
fn comment(headers: &HeaderMap, body: &[u8]) -> Result<String, ApiError> {
    let fields = json_object(headers, body)?;
    match fields.get("Comment") {
        Some(Value::String(comment)) => Ok(comment.clone()),
        Some(_) => Err(ApiError::bad_request(
            "MissingRequiredParameter",
            "The required parameter 'Comment' must be a string",
        )),
        None => Err(ApiError::bad_request(
            "MissingRequiredParameter",
            "The required parameter 'Comment' is missing (parameter names are case-sensitive)",
        )),
    }
}

/// A write's body: a JSON object sent as `application/json`.
pub(super) fn json_object(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let json_content = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json_content {
        return Err(ApiError::bad_request(
            "InvalidRequestBody",
            "The request body must be JSON sent with Content-Type: application/json",
        ));
    }
    let value: Value = serde_json::from_slice(body).map_err(|err| {
        ApiError::bad_request(
            "InvalidRequestBody",
            format!("The request body is not valid JSON: {err}"),
        )
    })?;
    let Value::Object(fields) = value else {
        return Err(ApiError::bad_request(
            "InvalidRequestBody",
            "The request body must be a JSON object",
        ));
    };
    Ok(fields)
}

fn conditions(
    query: &QueryOptions,
    entity: &str,
    fields: &[filter::Field],
) -> Result<Vec<filter::Condition>, ApiError> {
    match &query.filter {
        None => Ok(Vec::new()),
        Some(f) => filter::parse(f, entity, fields).map_err(|err| match err {
            FilterError::Malformed(m) => ApiError::odata(format!("Invalid filter clause: {m}")),
            FilterError::NotImplemented(m) => ApiError::not_implemented(m),
        }),
    }
}

fn query_error(err: QueryError) -> ApiError {
    match err {
        QueryError::Malformed(m) => ApiError::odata(m),
        QueryError::NotImplemented(m) => ApiError::not_implemented(m),
    }
}

pub(super) fn machine_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("Machine {id} was not found"))
}

fn action_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("MachineAction {id} was not found"))
}

pub(super) fn ambiguous(name: &str, count: usize) -> ApiError {
    ApiError::not_implemented(format!(
        "{count} machines are named {name}; which one Defender returns for a name is not modelled \
         by the simulator (use the machine id)"
    ))
}

/// A collection page with its `@odata.context` and, if more rows remain,
/// `@odata.nextLink`.
pub(super) fn collection<T: Serialize>(
    call: &Call<'_>,
    rows: Vec<T>,
    path: &str,
    set: &str,
) -> Response {
    let sim = call.sim;
    let (value, next_link) = odata::page(
        rows,
        &call.query,
        sim.config.page_size,
        sim.config.next_link_with_top,
        &sim.base_url,
        path,
    );
    let page = ODataPage {
        context: Some(format!("{}/api/$metadata#{set}", sim.base_url)),
        value,
        next_link,
    };
    odata_json(StatusCode::OK, &page)
}

/// A single entity with its `@odata.context`, as Defender sends it.
pub(super) fn entity<T: Serialize>(
    call: &Call<'_>,
    status: StatusCode,
    set: &str,
    value: &T,
) -> Response {
    #[derive(Serialize)]
    struct Entity<'a, T> {
        #[serde(rename = "@odata.context")]
        context: String,
        #[serde(flatten)]
        value: &'a T,
    }
    odata_json(
        status,
        &Entity {
            context: format!("{}/api/$metadata#{set}/$entity", call.sim.base_url),
            value,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_loudly_for_what_it_does_not_model() {
        assert!(matches!(
            route("GET", "/api/machines/DESKTOP%2DALPHA"),
            Ok((Endpoint::GetMachine, id)) if id == "DESKTOP-ALPHA"
        ));
        // Every other method and path (see `Endpoint::parse`'s tests).
        let err = route("POST", "/api/machines/abc/isolate").expect_err("not modelled");
        assert_eq!(err.status, StatusCode::NOT_IMPLEMENTED);
        assert_eq!(err.code, "NotImplementedInSimulator");
        assert_eq!(
            err.message,
            "POST /api/machines/abc/isolate is not modelled by the simulator"
        );
    }

    #[test]
    fn bearer_token_required() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().expect("header"));
            authorize(&h).is_ok_and(|t| t == "abc")
        };
        assert!(with("Bearer abc"));
        assert!(with("bearer abc"));
        assert!(!with("Bearer "));
        assert!(!with("Bearer"));
        assert!(!with("Basic abc"));
        assert!(authorize(&HeaderMap::new()).is_err());
    }

    #[test]
    fn roles_per_endpoint() {
        let roles = |r: &[&str]| r.iter().map(|r| (*r).to_owned()).collect::<Vec<_>>();
        let (restrict, cancel) = (Endpoint::Restrict, Endpoint::Cancel);
        let read_only = roles(&["Machine.Read.All"]);
        assert!(check_roles(Endpoint::ListActions, &read_only).is_ok());
        let err = check_roles(restrict, &read_only).expect_err("403");
        assert_eq!(err.status, StatusCode::FORBIDDEN);
        assert_eq!(err.code, "Forbidden");
        assert_eq!(
            err.message,
            "Missing application roles. API required roles: Machine.RestrictExecution, \
             application roles: Machine.Read.All"
        );
        assert!(check_roles(cancel, &read_only).is_err());
        assert!(check_roles(cancel, &roles(&["Machine.Isolate"])).is_ok());
        assert!(check_roles(cancel, &roles(&["Machine.CollectForensics"])).is_ok());
        assert!(check_roles(restrict, &roles(&["Machine.RestrictExecution"])).is_ok());
        assert!(check_roles(Endpoint::ListMachines, &roles(&["Machine.Isolate"])).is_err());
    }

    #[test]
    fn comment_rules() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().expect("header"),
        );
        let code = |body: &str| comment(&h, body.as_bytes()).map_err(|e| e.code);
        assert_eq!(code(r#"{"Comment":"x"}"#), Ok("x".to_owned()));
        assert_eq!(
            code(r#"{"comment":"x"}"#),
            Err("MissingRequiredParameter".to_owned())
        );
        assert_eq!(
            code(r#"{"Comment":1}"#),
            Err("MissingRequiredParameter".to_owned())
        );
        assert_eq!(code(r#"["Comment"]"#), Err("InvalidRequestBody".to_owned()));
        assert_eq!(code("Comment=x"), Err("InvalidRequestBody".to_owned()));
        assert_eq!(code(""), Err("InvalidRequestBody".to_owned()));
        let no_type = comment(&HeaderMap::new(), br#"{"Comment":"x"}"#).map_err(|e| e.code);
        assert_eq!(no_type, Err("InvalidRequestBody".to_owned()));
    }
}
