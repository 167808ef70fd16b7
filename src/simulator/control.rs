//! The fenced test-control surface under `/_sim/` and the startup banner.
//!
//! These endpoints are not part of the Defender API: they exist so that tests
//! in another process (or a human with curl) can do what `SimHandle` does in
//! Rust. They are never recorded in the request log and never faulted.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::clock::timestamp;
use super::faults::Fault;
use super::respond::{envelope, json};
use super::seed::Fleet;
use super::state::Sim;
use crate::defender::models::Machine;

type SimState = State<Arc<Sim>>;

const ENDPOINTS: &str = "  GET    /_sim                          this banner
  GET    /_sim/requests                 request log (/api and /_identity), arrival order
  DELETE /_sim/requests                 clear the request log
  GET    /_sim/faults                   pending faults
  POST   /_sim/faults                   inject {\"pathContains\":\"restrictCodeExecution\",\"method\":\"POST\",\"times\":1,\"kind\":{\"status\":{\"status\":503}}}
  DELETE /_sim/faults                   clear faults
  GET    /_sim/machines                 machines
  POST   /_sim/machines                 add or replace a machine (Machine JSON)
  POST   /_sim/fleets                   add a generated fleet {\"name\":\"f1\",\"tag\":\"outbreak-7\",\"devices\":2000,\"staleRecords\":5,\"mergedRecords\":2,\"rbacGroupId\":201}
  POST   /_sim/machines/{id}/offline    {\"offline\": true|false}
  POST   /_sim/machines/{id}/outcome    {\"outcome\": \"Failed\"|\"Succeeded\"} for its new actions
  GET    /_sim/actions                  machine actions, newest first
  POST   /_sim/actions                  create actions in bulk, as the API's POSTs would {\"type\":\"RestrictCodeExecution\",\"machineIds\":[...],\"comment\":\"INC-1\"}
  GET    /_sim/clock                    simulated time
  POST   /_sim/clock                    {\"advanceSeconds\": 3600}
";

pub(crate) fn router() -> Router<Arc<Sim>> {
    Router::new()
        .route("/_sim", get(banner_text))
        .route("/_sim/requests", get(requests).delete(clear_requests))
        .route(
            "/_sim/faults",
            get(faults).post(add_fault).delete(clear_faults),
        )
        .route("/_sim/machines", get(machines).post(add_machine))
        .route("/_sim/fleets", post(add_fleet))
        .route("/_sim/machines/{id}/offline", post(set_offline))
        .route("/_sim/machines/{id}/outcome", post(set_outcome))
        .route("/_sim/actions", get(actions).post(add_actions))
        .route("/_sim/clock", get(clock).post(advance_clock))
        .route("/_sim/{*rest}", any(unknown))
        .method_not_allowed_fallback(method_not_allowed)
}

/// The human-readable summary printed at startup and served at `GET /_sim`.
pub(crate) fn banner(sim: &Sim) -> String {
    let c = &sim.config;
    let base = &sim.base_url;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Simulated Microsoft Defender for Endpoint tenant (test double, not a fidelity guarantee)"
    );
    let _ = writeln!(out, "  Defender API base URL : {base}");
    let _ = writeln!(
        out,
        "  Identity endpoint     : {base}/_identity/token  (IDENTITY_HEADER={})",
        c.identity_header
    );
    let _ = writeln!(
        out,
        "  Clock                 : {}x; actions Pending {:?}, then InProgress {:?} (sim time)",
        c.speed, c.pending_for, c.in_progress_for
    );
    let limits = c.rate_limits.map_or_else(
        || "off".to_owned(),
        |l| format!("{}/min and {}/h per endpoint", l.per_minute, l.per_hour),
    );
    let _ = writeln!(
        out,
        "  Rate limits           : {limits}; page size {}",
        c.page_size
    );
    let _ = writeln!(out, "  Duplicate request     : {:?}", c.duplicate);
    let _ = writeln!(out);
    let tenant = sim.tenant();
    if tenant.machines.is_empty() {
        let _ = writeln!(out, "Devices: none (empty tenant)");
    } else {
        let _ = writeln!(out, "Devices:");
        let _ = writeln!(
            out,
            "  {:<28} {:<36} {:<40} {:<17} {:<9} note",
            "name", "aadDeviceId", "machine id", "os", "health"
        );
        for m in &tenant.machines {
            let mut note = Vec::new();
            if let Some(into) = &m.merged_into_machine_id {
                note.push(format!("merged into {into}"));
            }
            if tenant.is_offline(m.id.as_str()) {
                note.push("offline".to_owned());
            }
            let line = format!(
                "  {:<28} {:<36} {:<40} {:<17} {:<9} {}",
                m.computer_dns_name.as_deref().unwrap_or("-"),
                m.aad_device_id.as_deref().unwrap_or("(none)"),
                m.id,
                m.os_platform.as_deref().unwrap_or("-"),
                m.health_status.as_deref().unwrap_or("-"),
                note.join(", ")
            );
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
    drop(tenant);
    let _ = writeln!(out);
    let _ = writeln!(out, "Test controls (not part of the Defender API):");
    out.push_str(ENDPOINTS);
    out
}

async fn banner_text(State(sim): SimState) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        banner(&sim),
    )
        .into_response()
}

async fn requests(State(sim): SimState) -> Response {
    json(StatusCode::OK, &sim.requests())
}

async fn clear_requests(State(sim): SimState) -> StatusCode {
    sim.clear_requests();
    StatusCode::NO_CONTENT
}

async fn faults(State(sim): SimState) -> Response {
    json(StatusCode::OK, &sim.faults())
}

async fn add_fault(State(sim): SimState, body: Bytes) -> Response {
    match parse::<Fault>(&body) {
        Ok(fault) => {
            sim.inject(fault.clone());
            json(StatusCode::CREATED, &fault)
        }
        Err(response) => *response,
    }
}

async fn clear_faults(State(sim): SimState) -> StatusCode {
    sim.clear_faults();
    StatusCode::NO_CONTENT
}

async fn machines(State(sim): SimState) -> Response {
    json(StatusCode::OK, &sim.machines())
}

async fn add_machine(State(sim): SimState, body: Bytes) -> Response {
    match parse::<Machine>(&body) {
        Ok(machine) => {
            sim.add_machine(machine.clone());
            json(StatusCode::CREATED, &machine)
        }
        Err(response) => *response,
    }
}

/// Adds a [`Fleet`]'s records and answers `201` with its devices' ids.
async fn add_fleet(State(sim): SimState, body: Bytes) -> Response {
    match parse::<Fleet>(&body) {
        Ok(fleet) => {
            sim.add_fleet(&fleet);
            let devices: Vec<_> = fleet
                .devices()
                .into_iter()
                .map(|d| {
                    json!({
                        "aadDeviceId": d.aad_device_id,
                        "machineId": d.machine_id,
                        "computerDnsName": d.computer_dns_name,
                        "staleMachineId": d.stale_machine_id,
                        "mergedMachineId": d.merged_machine_id,
                    })
                })
                .collect();
            json(StatusCode::CREATED, &json!({"devices": devices}))
        }
        Err(response) => *response,
    }
}

async fn actions(State(sim): SimState) -> Response {
    json(StatusCode::OK, &sim.actions())
}

/// Restricts or releases in bulk (large tenants for benchmarks): each
/// created as `POST /api/machines/{id}/<type>` would create it, the
/// duplicate rule and the clock included, without one HTTP call each.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BulkActions {
    #[serde(rename = "type")]
    kind: crate::defender::models::ActionType,
    machine_ids: Vec<String>,
    comment: String,
}

/// Answers `201` with how many were created, and the machines not found or
/// with an action of that type already in progress.
async fn add_actions(State(sim): SimState, body: Bytes) -> Response {
    let bulk = match parse::<BulkActions>(&body) {
        Ok(bulk) => bulk,
        Err(response) => return *response,
    };
    let now = sim.clock.now();
    let mut tenant = sim.tenant();
    let (mut created, mut not_found, mut in_progress) = (0, Vec::new(), Vec::new());
    for id in bulk.machine_ids {
        let machine = match tenant.find_machine(&id) {
            crate::simulator::state::Lookup::Found(machine) => machine.clone(),
            _ => {
                not_found.push(id);
                continue;
            }
        };
        match tenant.create_action(
            &machine,
            bulk.kind,
            bulk.comment.clone(),
            now,
            sim.life,
            crate::simulator::DuplicateBehaviour::Error,
        ) {
            crate::simulator::state::Created::AlreadyInProgress => in_progress.push(id),
            _ => created += 1,
        }
    }
    json(
        StatusCode::CREATED,
        &json!({"created": created, "notFound": not_found, "alreadyInProgress": in_progress}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OfflineBody {
    offline: bool,
}

async fn set_offline(State(sim): SimState, Path(id): Path<String>, body: Bytes) -> Response {
    let body = match parse::<OfflineBody>(&body) {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let known = sim.machines().iter().any(|m| m.id == id);
    if !known {
        return control_error(StatusCode::NOT_FOUND, format!("Machine {id} was not found"));
    }
    sim.set_offline(&id, body.offline);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutcomeBody {
    outcome: super::ActionOutcome,
}

async fn set_outcome(State(sim): SimState, Path(id): Path<String>, body: Bytes) -> Response {
    let body = match parse::<OutcomeBody>(&body) {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let known = sim.machines().iter().any(|m| m.id == id);
    if !known {
        return control_error(StatusCode::NOT_FOUND, format!("Machine {id} was not found"));
    }
    sim.tenant().set_outcome(&id, body.outcome);
    StatusCode::NO_CONTENT.into_response()
}

async fn clock(State(sim): SimState) -> Response {
    json(
        StatusCode::OK,
        &json!({"now": timestamp(sim.clock.now()), "speed": sim.clock.speed()}),
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AdvanceBody {
    advance_seconds: f64,
}

async fn advance_clock(State(sim): SimState, body: Bytes) -> Response {
    let body = match parse::<AdvanceBody>(&body) {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let Ok(by) = Duration::try_from_secs_f64(body.advance_seconds) else {
        return control_error(
            StatusCode::BAD_REQUEST,
            "advanceSeconds must be a non-negative number (the clock never goes back)".to_owned(),
        );
    };
    sim.clock.advance(by);
    clock(State(sim)).await
}

async fn unknown() -> Response {
    control_error(
        StatusCode::NOT_FOUND,
        format!("Unknown test control. Available:\n{ENDPOINTS}"),
    )
}

async fn method_not_allowed() -> Response {
    control_error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("Method not allowed on this test control. Available:\n{ENDPOINTS}"),
    )
}

/// Parses a control request body; the error is the ready 400 response (boxed:
/// a `Response` is large).
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|err| {
        Box::new(control_error(
            StatusCode::BAD_REQUEST,
            format!("Invalid control request body: {err}"),
        ))
    })
}

fn control_error(status: StatusCode, message: String) -> Response {
    json(status, &envelope("InvalidControlRequest", message))
}
