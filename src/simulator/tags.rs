//! Defender's machine tags API: add or remove one tag on one machine
//! (`POST /api/machines/{id}/tags`) or on up to 500 machines
//! (`POST /api/machines/AddOrRemoveTagForMultipleMachines`).
//!
//! Both take `{"Value": "<tag>", "Action": "Add"|"Remove"}` (the bulk form
//! adds `"MachineIds": [...]`), need `Machine.ReadWrite.All` and have their
//! own rate limits (100 calls a minute, 1,500 an hour each), per
//! learn.microsoft.com `api/add-or-remove-machine-tags` and
//! `api/add-or-remove-multiple-machine-tags`. The single form answers `200`
//! with the updated machine. The bulk form's answer is not documented in
//! detail: the simulator answers `200` with the updated machines as a
//! collection. Whether one unknown id fails the whole bulk call is not
//! documented either: [`BulkTagUnknown`] picks.
//!
//! Adding a tag a machine already carries, or removing one it does not,
//! changes nothing and still succeeds (not documented; the simulator does not
//! invent an error). Tag values compare exactly, as the list filter does.

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Map, Value};

use super::respond::{ApiError, odata_json};
use super::routes::{Call, ambiguous, entity, json_object, machine_not_found};
use super::state::Lookup;
use crate::defender::models::{Machine, ODataPage};

/// Machines one bulk call may name (`api/add-or-remove-multiple-machine-tags`).
pub const MAX_BULK_MACHINES: usize = 500;

/// What a bulk tag call that names an unknown machine id gets; Defender does
/// not document it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BulkTagUnknown {
    /// The known machines are tagged, the unknown ids are skipped, `200`.
    #[default]
    Skip,
    /// `404 ResourceNotFound` naming the unknown ids; nothing is changed.
    Reject,
}

/// Add or remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TagAction {
    Add,
    Remove,
}

/// `POST /api/machines/{id}/tags`: machine (404), body (400), then `200` with
/// the updated machine.
pub(super) fn tag_machine(call: &Call<'_>, id: &str) -> Result<Response, ApiError> {
    let mut tenant = call.sim.tenant();
    let machine_id = match tenant.find_machine(id) {
        Lookup::Found(machine) => machine.id.clone(),
        Lookup::NotFound => return Err(machine_not_found(id)),
        Lookup::AmbiguousName(n) => return Err(ambiguous(id, n)),
    };
    let fields = json_object(call.headers, call.body)?;
    let (value, action) = value_and_action(&fields)?;
    let machine = tenant
        .set_tag(&machine_id, &value, action)
        .ok_or_else(|| machine_not_found(id))?;
    Ok(entity(call, StatusCode::OK, "Machines", &machine))
}

/// `POST /api/machines/AddOrRemoveTagForMultipleMachines`: body (400), 1 to
/// 500 machine ids (400), unknown ids per [`BulkTagUnknown`], then `200`.
pub(super) fn tag_machines(call: &Call<'_>) -> Result<Response, ApiError> {
    let fields = json_object(call.headers, call.body)?;
    let (value, action) = value_and_action(&fields)?;
    let ids = machine_ids(&fields)?;
    let mut tenant = call.sim.tenant();
    // Bulk ids are machine ids only (not computer names, unlike GET /machines/{id}).
    let unknown: Vec<&str> = ids
        .iter()
        .filter(|id| !tenant.has_machine_id(id))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() && call.sim.config.bulk_tag_unknown == BulkTagUnknown::Reject {
        return Err(ApiError::not_found(format!(
            "Machines were not found: {}",
            unknown.join(", ")
        )));
    }
    let mut updated: Vec<Machine> = Vec::with_capacity(ids.len());
    for id in &ids {
        if let Some(machine) = tenant.set_tag(id, &value, action)
            && !updated.iter().any(|m| m.id == machine.id)
        {
            updated.push(machine);
        }
    }
    let page = ODataPage {
        context: Some(format!("{}/api/$metadata#Machines", call.sim.base_url)),
        value: updated,
        next_link: None,
    };
    Ok(odata_json(StatusCode::OK, &page))
}

/// `Value` (a non-empty string) and `Action` (`Add` or `Remove`, as written
/// in the docs). Parameter names are case-sensitive, as for every Defender
/// body.
fn value_and_action(fields: &Map<String, Value>) -> Result<(String, TagAction), ApiError> {
    let value = match fields.get("Value") {
        Some(Value::String(v)) if !v.trim().is_empty() => v.clone(),
        Some(Value::String(_)) => {
            return Err(ApiError::bad_request(
                "InvalidInput",
                "The parameter 'Value' must not be empty",
            ));
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "InvalidRequestBody",
                "The parameter 'Value' must be a string",
            ));
        }
        None => return Err(missing("Value")),
    };
    let action = match fields.get("Action") {
        Some(Value::String(a)) if a == "Add" => TagAction::Add,
        Some(Value::String(a)) if a == "Remove" => TagAction::Remove,
        Some(other) => {
            return Err(ApiError::bad_request(
                "InvalidInput",
                format!("The parameter 'Action' must be 'Add' or 'Remove', found {other}"),
            ));
        }
        None => return Err(missing("Action")),
    };
    Ok((value, action))
}

fn machine_ids(fields: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let Some(ids) = fields.get("MachineIds") else {
        return Err(missing("MachineIds"));
    };
    let Some(ids) = ids.as_array() else {
        return Err(ApiError::bad_request(
            "InvalidRequestBody",
            "The parameter 'MachineIds' must be a list of machine ids",
        ));
    };
    if ids.is_empty() || ids.len() > MAX_BULK_MACHINES {
        return Err(ApiError::bad_request(
            "BadRequest",
            format!(
                "'MachineIds' holds {} ids: a call tags 1 to {MAX_BULK_MACHINES} machines",
                ids.len()
            ),
        ));
    }
    ids.iter()
        .map(|id| match id.as_str() {
            Some(id) if !id.trim().is_empty() => Ok(id.to_owned()),
            _ => Err(ApiError::bad_request(
                "InvalidRequestBody",
                format!("'MachineIds' holds {id}, which is not a machine id"),
            )),
        })
        .collect()
}

fn missing(name: &str) -> ApiError {
    ApiError::bad_request(
        "MissingRequiredParameter",
        format!("The required parameter '{name}' is missing (parameter names are case-sensitive)"),
    )
}

/// `machineTags` after `action`: an added tag goes last, once; a removed one
/// goes wherever it was.
pub(crate) fn apply(tags: &mut Vec<Value>, value: &str, action: TagAction) {
    match action {
        TagAction::Add => {
            if !tags.iter().any(|t| t.as_str() == Some(value)) {
                tags.push(Value::String(value.to_owned()));
            }
        }
        TagAction::Remove => tags.retain(|t| t.as_str() != Some(value)),
    }
}
