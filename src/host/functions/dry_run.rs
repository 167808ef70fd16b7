//! `dryRun: true`: the lookups and the state read happen, nothing is sent,
//! and the answer says what would have been done.

use futures_util::{StreamExt, stream};
use http::StatusCode;
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

use super::Record;
use crate::{
    defender::ids::{ActionId, MachineId},
    host::{
        app_state::AppState,
        error::{ApiError, Problem},
        invocation::Invocation,
        reply::Reply,
    },
    service::{
        restrict::{Plan, Planned},
        runbook::{DeviceRef, RunbookRequest, Target},
    },
};

/// Devices planned at once in a `deviceIds` dry run.
const CONCURRENCY: usize = 8;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PlanBody {
    outcome: Planned,
    dry_run: bool,
    message: String,
    device_id: String,
    release: bool,
    machine_id: MachineId,
    computer_dns_name: Option<String>,
    candidates: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    would_cancel_action_ids: Vec<ActionId>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Item {
    Planned(Box<PlanBody>),
    #[serde(rename_all = "camelCase")]
    Failed {
        device_id: String,
        status: u16,
        problem: Box<Problem>,
    },
}

fn plan_body(request: &RunbookRequest, device: &DeviceRef, plan: Plan) -> PlanBody {
    let verb = if request.release {
        "release"
    } else {
        "restrict"
    };
    let message = match plan.outcome {
        Planned::WouldRequest if plan.would_cancel.is_empty() => format!(
            "Dry run: would send a {verb} request for machine {}. Nothing was sent.",
            plan.machine.id
        ),
        Planned::WouldRequest => format!(
            "Dry run: would cancel {} pending opposite action(s), then send a {verb} request for \
             machine {}. Nothing was sent.",
            plan.would_cancel.len(),
            plan.machine.id
        ),
        Planned::AlreadyPending => format!(
            "Dry run: a {verb} action is already pending on machine {}; nothing would be sent.",
            plan.machine.id
        ),
        Planned::AlreadyInState => format!(
            "Dry run: machine {} is already in the wanted state; nothing would be sent.",
            plan.machine.id
        ),
    };
    PlanBody {
        outcome: plan.outcome,
        dry_run: true,
        message,
        device_id: device.to_string(),
        release: request.release,
        machine_id: plan.machine.id,
        computer_dns_name: plan.machine.computer_dns_name,
        candidates: plan.candidates,
        action: plan.action.map(|a| a.to_json()),
        would_cancel_action_ids: plan.would_cancel,
    }
}

pub async fn answer(
    state: &AppState,
    invocation: &Invocation,
    request: &RunbookRequest,
    deadline: Instant,
    record: &mut Record,
) -> Result<Reply, ApiError> {
    let intent = super::restrict::intent(request);
    let restrictor = state.restrictor();
    match &request.target {
        Target::One(device) => {
            record.device_id = Some(device.to_string());
            let plan = restrictor.plan(device, &intent, deadline).await?;
            record.machine_id = Some(plan.machine.id.to_string());
            record.outcome = Some(plan.outcome.as_str());
            let body = plan_body(request, device, plan);
            let summary = body.message.clone();
            Ok(Reply::new(
                StatusCode::OK,
                invocation.format(),
                &body,
                || format!("{summary}\n"),
                body.message.clone(),
            ))
        }
        Target::Many(devices) => {
            let intent = &intent;
            let mut items: Vec<(usize, Item)> = stream::iter(devices.iter().cloned().enumerate())
                .map(|(index, device)| async move {
                    let item = match restrictor.plan(&device, intent, deadline).await {
                        Ok(plan) => Item::Planned(Box::new(plan_body(request, &device, plan))),
                        Err(e) => {
                            let e = ApiError::from(e);
                            Item::Failed {
                                device_id: device.to_string(),
                                status: e.status().as_u16(),
                                problem: Box::new(e.problem(&invocation.id)),
                            }
                        }
                    };
                    (index, item)
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            items.sort_by_key(|(index, _)| *index);
            let items: Vec<Item> = items.into_iter().map(|(_, item)| item).collect();
            let failed = items
                .iter()
                .filter(|i| matches!(i, Item::Failed { .. }))
                .count();
            let would = items
                .iter()
                .filter(|i| matches!(i, Item::Planned(p) if p.outcome == Planned::WouldRequest))
                .count();
            record.devices = Some(items.len());
            record.failed = Some(failed);
            record.outcome = Some("dry_run");
            let summary = format!(
                "Dry run for {} device(s): {would} would be sent, {} need nothing, {failed} \
                 failed. Nothing was sent.",
                items.len(),
                items.len() - would - failed
            );
            let body = serde_json::json!({
                "dryRun": true,
                "release": request.release,
                "wouldRequest": would,
                "failed": failed,
                "results": items,
                "message": summary,
                "invocationId": invocation.id,
            });
            let status = if failed == 0 {
                StatusCode::OK
            } else {
                StatusCode::MULTI_STATUS
            };
            Ok(Reply::new(
                status,
                invocation.format(),
                &body,
                || format!("{summary}\n"),
                summary.clone(),
            ))
        }
    }
}
