//! Every caller's way in: action status and cancel as functions of their own,
//! `wait`, the Logic Apps asynchronous pattern, `deviceIds`, the caller's
//! identity and roles, text answers, the OpenAPI document and the examples.
//! Everything goes through the host emulator, in both invocation modes.

use std::time::Duration;

use base64::Engine;
use restrict_code_execution::simulator::SimConfig;
use serde_json::{Value, json};

use crate::helpers::{
    AppOptions, TestApp, spawn_app, spawn_app_with, spawn_in_process, spawn_in_process_with,
};
use crate::host_emulator::{CallerRequest, ClientResponse, Route};
use crate::restrict::{ALPHA_AAD, BRAVO_AAD, CHARLIE_AAD, LINUX_AAD};

/// Both invocation modes, for tests that check each.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Forwarded,
    Payload,
}

const MODES: [Mode; 2] = [Mode::Forwarded, Mode::Payload];

async fn call(app: &TestApp, mode: Mode, route: &Route, request: &CallerRequest) -> ClientResponse {
    match mode {
        Mode::Forwarded => app.host.forwarded_to(route, request).await,
        Mode::Payload => app.host.payload_to(route, request).await,
    }
}

async fn restrict(app: &TestApp, body: Value) -> Value {
    let response = app
        .host
        .forwarded(&CallerRequest::json(body.to_string()))
        .await;
    assert!(response.status < 300, "{}", response.body);
    response.json()
}

fn action_id(answer: &Value) -> String {
    answer["action"]["id"].as_str().unwrap().to_owned()
}

// --- Action status and cancel -------------------------------------------

#[tokio::test]
async fn the_status_function_answers_202_while_pending_and_200_once_finished() {
    let app = spawn_in_process().await;
    let id = action_id(&restrict(&app, json!({"deviceId": ALPHA_AAD})).await);

    for mode in MODES {
        let pending = call(
            &app,
            mode,
            &Route::status(&id),
            &CallerRequest::empty().query("code", "k1"),
        )
        .await;
        assert_eq!(pending.status, 202, "{mode:?}: {}", pending.body);
        assert_eq!(pending.json()["terminal"], false);
        assert_eq!(pending.json()["type"], "RestrictCodeExecution");
        assert_eq!(pending.header("retry-after"), Some("10"));
        assert_eq!(
            pending.header("location"),
            Some(
                format!("http://localhost:7071/api/restrict-code-execution/actions/{id}?code=k1")
                    .as_str()
            ),
            "{mode:?}"
        );
    }
    app.sim.advance(Duration::from_secs(60));
    for mode in MODES {
        let done = call(&app, mode, &Route::status(&id), &CallerRequest::empty()).await;
        assert_eq!(done.status, 200, "{mode:?}: {}", done.body);
        let body = done.json();
        assert_eq!(body["terminal"], true);
        assert_eq!(body["status"], "Succeeded");
        assert_eq!(body["action"]["id"], id.as_str());
        assert!(done.header("location").is_none());
    }
    let reads = app
        .defender_requests()
        .into_iter()
        .filter(|r| r.path == format!("/api/machineactions/{id}"))
        .count();
    assert_eq!(reads, 4);
}

#[tokio::test]
async fn the_status_function_rejects_bad_ids_and_reports_unknown_ones() {
    let app = spawn_in_process().await;
    for mode in MODES {
        let bad = call(
            &app,
            mode,
            &Route::status("not-a-guid"),
            &CallerRequest::empty(),
        )
        .await;
        assert_eq!(bad.status, 400, "{mode:?}");
        assert_eq!(bad.json()["field"], "actionId");
        let unknown_id = "0d1e2f30-4152-4637-8899-aabbccddeeff";
        let unknown = call(
            &app,
            mode,
            &Route::status(unknown_id),
            &CallerRequest::empty(),
        )
        .await;
        assert_eq!(unknown.status, 404, "{mode:?}: {}", unknown.body);
        assert_eq!(unknown.json()["code"], "action_not_found");
    }
    let sent: Vec<String> = app
        .defender_requests()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert!(sent.iter().all(|p| !p.contains("not-a-guid")), "{sent:?}");
}

#[tokio::test]
async fn the_cancel_function_cancels_a_pending_action_once() {
    let app = spawn_in_process().await;
    let alpha = action_id(&restrict(&app, json!({"deviceId": ALPHA_AAD})).await);
    let charlie = action_id(&restrict(&app, json!({"deviceId": CHARLIE_AAD})).await);

    for (mode, id) in [(Mode::Forwarded, &alpha), (Mode::Payload, &charlie)] {
        let request = CallerRequest::json(json!({"Comment": "Wrong device"}).to_string());
        let cancelled = call(&app, mode, &Route::cancel(id), &request).await;
        assert_eq!(cancelled.status, 200, "{mode:?}: {}", cancelled.body);
        assert_eq!(cancelled.json()["status"], "Cancelled");
        assert_eq!(cancelled.json()["terminal"], true);

        let again = call(&app, mode, &Route::cancel(id), &request).await;
        assert_eq!(again.status, 409, "{mode:?}: {}", again.body);
        assert_eq!(again.json()["code"], "action_not_pending");
        assert_eq!(again.json()["actionStatus"], "Cancelled");
    }
    let cancels: Vec<_> = app
        .defender_requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/cancel"))
        .collect();
    assert_eq!(cancels.len(), 2, "no cancel was sent for a finished action");
    assert_eq!(
        cancels[0].path,
        format!("/api/machineactions/{alpha}/cancel")
    );
    assert_eq!(cancels[0].body, r#"{"Comment":"Wrong device"}"#);
    assert!(app.sim.actions().iter().all(|a| a.status == "Cancelled"));
}

#[tokio::test]
async fn the_cancel_function_rejects_unknown_fields() {
    let app = spawn_in_process().await;
    let id = action_id(&restrict(&app, json!({"deviceId": ALPHA_AAD})).await);

    let response = app
        .host
        .forwarded_to(
            &Route::cancel(&id),
            &CallerRequest::json(r#"{"reason":"x"}"#),
        )
        .await;

    assert_eq!(response.status, 400);
    assert_eq!(response.json()["field"], "reason");
    assert_eq!(app.sim.actions()[0].status, "Pending");
    assert!(
        app.defender_requests()
            .iter()
            .all(|r| !r.path.ends_with("/cancel")),
        "no cancel was sent"
    );
}

// --- Waiting and the Logic Apps asynchronous pattern ----------------------

fn fast_sim() -> AppOptions {
    AppOptions {
        sim: SimConfig {
            speed: 20.0,
            ..AppOptions::default().sim
        },
        ..AppOptions::default()
    }
}

#[tokio::test]
async fn wait_polls_the_action_until_it_is_finished() {
    // At 20x, the simulated action finishes in a quarter of a second.
    let app = spawn_in_process_with(fast_sim()).await;

    let response = app
        .host
        .payload(&CallerRequest::json(
            json!({"deviceId": ALPHA_AAD, "wait": 20}).to_string(),
        ))
        .await;

    assert_eq!(response.status, 201, "{}", response.body);
    let body = response.json();
    assert_eq!(body["terminal"], true);
    assert_eq!(body["action"]["status"], "Succeeded");
    let id = action_id(&body);
    assert!(
        app.defender_requests()
            .iter()
            .any(|r| r.method == "GET" && r.path == format!("/api/machineactions/{id}")),
        "the action was polled"
    );
}

#[tokio::test]
async fn wait_returns_the_last_state_when_time_runs_out() {
    let app = spawn_in_process().await;
    app.sim
        .set_offline("c5cb89852ce0d21636c0491709a4571b5f190e75", true);

    let response = app
        .host
        .forwarded(&CallerRequest::json(
            json!({"deviceId": ALPHA_AAD, "wait": 3}).to_string(),
        ))
        .await;

    assert_eq!(response.status, 201, "{}", response.body);
    assert_eq!(response.json()["terminal"], false);
    assert_eq!(response.json()["action"]["status"], "Pending");
    let id = action_id(&response.json());
    assert!(
        app.defender_requests()
            .iter()
            .any(|r| r.method == "GET" && r.path == format!("/api/machineactions/{id}")),
        "the action was polled"
    );
    assert_eq!(app.sim.actions()[0].status, "Pending");
}

#[tokio::test]
async fn respond_async_answers_202_with_a_location_that_keeps_the_code() {
    let app = spawn_in_process().await;
    for (mode, device) in [(Mode::Forwarded, ALPHA_AAD), (Mode::Payload, CHARLIE_AAD)] {
        let request = CallerRequest::json(json!({"deviceId": device}).to_string())
            .header("Prefer", "respond-async")
            .query("code", "s3cret-key");

        let response = call(&app, mode, &Route::restrict(), &request).await;

        assert_eq!(response.status, 202, "{mode:?}: {}", response.body);
        assert_eq!(response.json()["status"], 202, "the body says 202 too");
        assert_eq!(
            response.header("x-invocation-id"),
            Some(request.invocation_id.as_str()),
            "{mode:?}"
        );
        let id = action_id(&response.json());
        assert_eq!(
            response.header("location"),
            Some(
                format!(
                    "http://localhost:7071/api/restrict-code-execution/actions/{id}?code=s3cret-key"
                )
                .as_str()
            )
        );
        assert_eq!(response.header("retry-after"), Some("10"));
        assert_eq!(response.header("preference-applied"), Some("respond-async"));
    }
    let actions = app.sim.actions();
    assert_eq!(actions.len(), 2, "one action per device");
    assert!(
        actions
            .iter()
            .all(|a| a.action_type == "RestrictCodeExecution")
    );
}

/// Evaluate the few workflow expressions the example uses.
fn evaluate(expression: &str, trigger: &Value, parameters: &Value) -> Value {
    let Some(expr) = expression.strip_prefix('@') else {
        return json!(expression);
    };
    let field = |name: &str| trigger.get(name).cloned().filter(|v| !v.is_null());
    if let Some(rest) = expr.strip_prefix("coalesce(triggerBody()?['") {
        let (name, fallback) = rest.split_once("'], ").unwrap();
        let fallback = fallback.trim_end_matches(')');
        return field(name).unwrap_or_else(|| {
            serde_json::from_str(fallback).unwrap_or_else(|_| json!(fallback.trim_matches('\'')))
        });
    }
    if let Some(rest) = expr.strip_prefix("triggerBody()?['") {
        return field(rest.trim_end_matches("']")).unwrap_or(Value::Null);
    }
    if let Some(rest) = expr.strip_prefix("parameters('") {
        return parameters[rest.trim_end_matches("')")].clone();
    }
    panic!("expression not handled: {expression}");
}

#[tokio::test]
async fn examples_logic_app_workflow_follows_the_async_pattern() {
    let app = spawn_app().await;
    let workflow: Value =
        serde_json::from_str(include_str!("../../examples/logic-app/workflow.json")).unwrap();
    let inputs = &workflow["definition"]["actions"]["Restrict_code_execution"]["inputs"];
    let parameters = json!({"functionBaseUrl": "http://localhost:7071", "functionKey": "la-key"});
    let trigger = json!({"deviceId": ALPHA_AAD, "requestedBy": "logic-app@contoso.com"});
    assert_eq!(inputs["method"], "POST");
    assert!(
        inputs["uri"]
            .as_str()
            .unwrap()
            .ends_with("/api/restrict-code-execution")
    );
    let body: serde_json::Map<String, Value> = inputs["body"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                evaluate(v.as_str().unwrap(), &trigger, &parameters),
            )
        })
        .collect();
    let mut request = CallerRequest::json(Value::Object(body).to_string());
    for (name, value) in inputs["headers"].as_object().unwrap() {
        if name != "Content-Type" {
            request = request.header(name, value.as_str().unwrap());
        }
    }
    for (name, value) in inputs["queries"].as_object().unwrap() {
        let value = evaluate(value.as_str().unwrap(), &trigger, &parameters);
        request = request.query(name, value.as_str().unwrap());
    }

    // The HTTP action: POST, then poll Location while it answers 202.
    let mut response = app.host.forwarded(&request).await;
    assert_eq!(response.status, 202, "{}", response.body);
    let mut polls = 0;
    while response.status == 202 {
        let location = reqwest::Url::parse(response.header("location").unwrap()).unwrap();
        let retry_after: u64 = response.header("retry-after").unwrap().parse().unwrap();
        app.sim.advance(Duration::from_secs(retry_after));
        let id = location.path().rsplit('/').next().unwrap().to_owned();
        let mut poll = CallerRequest::empty();
        for (k, v) in location.query_pairs() {
            poll = poll.query(&k, &v);
        }
        assert!(
            poll.query.iter().any(|(k, v)| k == "code" && v == "la-key"),
            "{location}"
        );
        response = app.host.forwarded_to(&Route::status(&id), &poll).await;
        polls += 1;
        assert!(polls < 10, "the action never finished");
    }

    assert_eq!(response.status, 200, "{}", response.body);
    let done = response.json();
    assert_eq!(done["terminal"], true);
    assert_eq!(done["status"], "Succeeded");
    assert_eq!(
        done["requestorComment"],
        "Possible security risk. (requested by logic-app@contoso.com)"
    );
}

// --- Several devices in one call ------------------------------------------

#[tokio::test]
async fn device_ids_act_on_each_device_once_and_answer_per_device_in_order() {
    let app = spawn_in_process().await;
    let body = json!({"deviceIds": [ALPHA_AAD, "0f0e0d0c-0b0a-4908-8706-050403020100", LINUX_AAD, ALPHA_AAD.to_uppercase(), CHARLIE_AAD]});

    for mode in MODES {
        let response = call(
            &app,
            mode,
            &Route::restrict(),
            &CallerRequest::json(body.to_string()),
        )
        .await;

        assert_eq!(response.status, 207, "{mode:?}: {}", response.body);
        let answer = response.json();
        let results = answer["results"].as_array().unwrap();
        let summary: Vec<(String, u64)> = results
            .iter()
            .map(|r| {
                (
                    r["deviceId"].as_str().unwrap().to_owned(),
                    r["status"].as_u64().unwrap(),
                )
            })
            .collect();
        let expected_alpha = match mode {
            Mode::Forwarded => 201,
            Mode::Payload => 200, // already pending from the first round
        };
        assert_eq!(
            summary,
            [
                (ALPHA_AAD.to_owned(), expected_alpha),
                ("0f0e0d0c-0b0a-4908-8706-050403020100".to_owned(), 404),
                (LINUX_AAD.to_owned(), 422),
                (CHARLIE_AAD.to_owned(), expected_alpha),
            ],
            "{mode:?}"
        );
        assert_eq!(results[1]["problem"]["code"], "device_not_found");
        assert_eq!(
            (answer["succeeded"].as_u64(), answer["failed"].as_u64()),
            (Some(2), Some(2))
        );
    }
    assert_eq!(
        app.sim.actions().len(),
        2,
        "one action per device, the repeated id acted on once"
    );
}

#[tokio::test]
async fn device_ids_that_all_succeed_answer_200() {
    let app = spawn_in_process().await;

    let response = app
        .host
        .forwarded(&CallerRequest::json(
            json!({"deviceIds": [ALPHA_AAD, BRAVO_AAD]}).to_string(),
        ))
        .await;

    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.json()["results"][1]["outcome"], "requested");
    let mut posted: Vec<String> = app
        .defender_requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.path)
        .collect();
    posted.sort();
    assert_eq!(
        posted,
        [
            "/api/machines/39a7550d43b78a7757871f5c146184282381ec3d/restrictCodeExecution",
            "/api/machines/c5cb89852ce0d21636c0491709a4571b5f190e75/restrictCodeExecution",
        ]
    );
}

// --- Who called -------------------------------------------------------------

fn principal(name: &str, roles: &[&str]) -> String {
    let mut claims = vec![json!({"typ": "name", "val": name})];
    claims.extend(roles.iter().map(|r| json!({"typ": "roles", "val": r})));
    let principal =
        json!({"auth_typ": "aad", "name_typ": "name", "role_typ": "roles", "claims": claims});
    base64::engine::general_purpose::STANDARD.encode(principal.to_string())
}

#[tokio::test]
async fn with_allowed_roles_a_caller_without_one_is_refused_and_nothing_is_sent() {
    let app = spawn_app_with(AppOptions {
        env: vec![("ALLOWED_CALLER_ROLES", "Device.Restrict, SOC.Admin".into())],
        ..AppOptions::default()
    })
    .await;
    let body = json!({"deviceId": ALPHA_AAD}).to_string();

    for mode in MODES {
        let anonymous = call(
            &app,
            mode,
            &Route::restrict(),
            &CallerRequest::json(body.clone()),
        )
        .await;
        let wrong_role = CallerRequest::json(body.clone()).header(
            "X-MS-CLIENT-PRINCIPAL",
            &principal("mallory@contoso.com", &["Reader"]),
        );
        let wrong_role = call(&app, mode, &Route::restrict(), &wrong_role).await;
        let status = call(
            &app,
            mode,
            &Route::status("0d1e2f30-4152-4637-8899-aabbccddeeff"),
            &CallerRequest::empty(),
        )
        .await;

        for response in [&anonymous, &wrong_role, &status] {
            assert_eq!(response.status, 403, "{mode:?}: {}", response.body);
            assert_eq!(response.json()["code"], "caller_forbidden");
        }
        assert!(
            wrong_role.json()["detail"]
                .as_str()
                .unwrap()
                .contains("mallory@contoso.com")
        );
    }
    assert!(app.defender_requests().is_empty());
    assert!(app.token_requests().is_empty());
}

#[tokio::test]
async fn an_authenticated_caller_with_a_role_is_recorded_as_the_caller() {
    let app = spawn_in_process_with(AppOptions {
        env: vec![("ALLOWED_CALLER_ROLES", "Device.Restrict".into())],
        ..AppOptions::default()
    })
    .await;
    let request = CallerRequest::json(json!({"deviceId": ALPHA_AAD}).to_string()).header(
        "X-MS-CLIENT-PRINCIPAL",
        &principal("alice@contoso.com", &["device.restrict"]),
    );

    let response = app.host.payload(&request).await;

    assert_eq!(response.status, 201, "{}", response.body);
    let post = app
        .defender_requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert_eq!(
        post.body,
        r#"{"Comment":"Possible security risk. (requested by alice@contoso.com)"}"#
    );
}

#[tokio::test]
async fn without_allowed_roles_the_principal_only_names_the_caller() {
    let app = spawn_in_process().await;
    let request =
        CallerRequest::json(json!({"deviceId": ALPHA_AAD, "callerName": "explicit"}).to_string())
            .header(
                "X-MS-CLIENT-PRINCIPAL",
                &principal("alice@contoso.com", &[]),
            );

    let response = app.host.forwarded(&request).await;

    assert_eq!(response.status, 201, "{}", response.body);
    assert_eq!(
        response.json()["action"]["requestorComment"],
        "Possible security risk. (requested by explicit)",
        "an explicit callerName wins"
    );
}

// --- Text for runbook consoles --------------------------------------------

#[tokio::test]
async fn accept_text_plain_gives_runbook_lines_with_the_same_status_codes() {
    let app = spawn_in_process().await;
    for (mode, device) in [(Mode::Forwarded, ALPHA_AAD), (Mode::Payload, CHARLIE_AAD)] {
        let request = CallerRequest::json(json!({"deviceId": device}).to_string())
            .header("Accept", "text/plain");

        let ok = call(&app, mode, &Route::restrict(), &request).await;
        let missing = call(
            &app,
            mode,
            &Route::restrict(),
            &CallerRequest::json(
                json!({"deviceId": "0f0e0d0c-0b0a-4908-8706-050403020100"}).to_string(),
            )
            .header("Accept", "text/plain"),
        )
        .await;

        assert_eq!(ok.status, 201, "{mode:?}");
        assert_eq!(ok.header("content-type"), Some("text/plain; charset=utf-8"));
        let lines: Vec<&str> = ok.body.lines().collect();
        assert!(
            lines[0].starts_with("Restricting code execution on device ")
                && lines[0].contains(&format!("(DeviceId {device})")),
            "{mode:?}: {}",
            ok.body
        );
        assert!(
            lines
                .last()
                .unwrap()
                .starts_with("Successfully requested: action "),
            "{}",
            ok.body
        );
        assert_eq!(missing.status, 404);
        assert!(
            missing
                .body
                .starts_with("Error: Device not found in Defender (device_not_found, HTTP 404)"),
            "{}",
            missing.body
        );
    }
    let posts = app
        .defender_requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(
        posts, 2,
        "one restrict per device; nothing for the unknown one"
    );
}

// --- OpenAPI ---------------------------------------------------------------

#[tokio::test]
async fn the_openapi_document_is_served_in_both_modes_and_covers_the_surface() {
    let app = spawn_in_process().await;
    for mode in MODES {
        let response = call(&app, mode, &Route::openapi(), &CallerRequest::empty()).await;
        assert_eq!(response.status, 200, "{mode:?}");
        let doc = response.json();
        assert_eq!(doc["swagger"], "2.0");
        for path in [
            "/restrict-code-execution",
            "/restrict-code-execution/actions/{actionId}",
            "/restrict-code-execution/actions/{actionId}/cancel",
            "/restrict-code-execution/devices",
            "/openapi.json",
        ] {
            assert!(doc["paths"][path].is_object(), "{path}");
        }
        let fields: Vec<&str> = doc["definitions"]["RestrictRequest"]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for field in [
            "deviceId",
            "deviceIds",
            "release",
            "comment",
            "callerName",
            "force",
            "cancelPending",
            "wait",
        ] {
            assert!(fields.contains(&field), "{field}");
        }
        let codes: Vec<&str> = doc["definitions"]["Problem"]["properties"]["code"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(codes, restrict_code_execution::host::error::CODES);
    }
}

#[test]
fn every_problem_code_is_in_the_readme_troubleshooting_table() {
    let readme = include_str!("../../README.md");
    let table = readme.split("## Troubleshooting").nth(1).unwrap();
    for code in restrict_code_execution::host::error::CODES {
        assert!(
            table.contains(&format!("`{code}`")),
            "{code} is missing from the troubleshooting table"
        );
    }
}

#[test]
fn the_readme_troubleshooting_table_lists_no_code_the_handler_does_not_answer() {
    let readme = include_str!("../../README.md");
    let table = readme
        .split("## Troubleshooting")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let codes = restrict_code_execution::host::error::CODES;
    // A code in the first column is a backticked word followed by its status.
    for row in table.lines().filter(|l| l.starts_with("| ")) {
        let cell = row.split(" |").next().unwrap();
        let mut parts = cell.split('`').skip(1);
        while let (Some(word), Some(after)) = (parts.next(), parts.next()) {
            let status = after.trim_start().get(..3).unwrap_or("");
            if status.len() == 3 && status.bytes().all(|b| b.is_ascii_digit()) {
                assert!(
                    codes.contains(&word),
                    "the README lists `{word}`, which no answer carries"
                );
            }
        }
    }
}

#[test]
fn every_problem_code_variant_has_its_own_code_status_and_title() {
    use restrict_code_execution::host::error::{CODES, ProblemCode};
    assert_eq!(CODES.len(), ProblemCode::ALL.len());
    for (code, variant) in CODES.iter().zip(ProblemCode::ALL) {
        assert_eq!(*code, variant.as_str());
        assert!(variant.status().is_client_error() || variant.status().is_server_error());
        assert!(!variant.title().is_empty());
        assert_eq!(
            CODES.iter().filter(|c| *c == code).count(),
            1,
            "{code} twice"
        );
    }
}

// --- Examples ------------------------------------------------------------------

#[tokio::test]
async fn examples_realmjoin_invocation_restricts_with_the_caller_recorded() {
    let app = spawn_in_process().await;
    let body = include_str!("../../examples/realmjoin/invocation.json");

    let response = app
        .host
        .payload(&CallerRequest::json(body).header("Accept", "text/plain"))
        .await;

    assert_eq!(response.status, 201, "{}", response.body);
    assert!(response.body.contains("DESKTOP-ALPHA"), "{}", response.body);
    let post = app
        .defender_requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert!(post.path.ends_with("/restrictCodeExecution"));
    assert_eq!(
        post.body,
        r#"{"Comment":"Possible security risk. (requested by helpdesk@contoso.com)"}"#
    );
}

#[tokio::test]
async fn examples_servicenow_webhook_restricts_the_incident_device() {
    let app = spawn_in_process().await;
    let body = include_str!("../../examples/webhooks/servicenow-outbound-rest.json");

    let response = app.host.forwarded(&CallerRequest::json(body)).await;

    assert_eq!(response.status, 201, "{}", response.body);
    assert_eq!(
        response.json()["machine"]["computerDnsName"],
        "WIN11-CHARLIE.contoso.local"
    );
    let post = app
        .defender_requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert_eq!(
        post.body,
        r#"{"Comment":"SIR0010042: Suspicious PowerShell on WIN11-CHARLIE (requested by servicenow:jane.doe)"}"#
    );
}

#[tokio::test]
async fn examples_jira_webhook_releases_several_devices() {
    let app = spawn_in_process().await;
    let body = include_str!("../../examples/webhooks/jira-automation.json");

    let response = app.host.forwarded(&CallerRequest::json(body)).await;

    assert_eq!(response.status, 200, "{}", response.body);
    let answer = response.json();
    assert_eq!(answer["release"], true);
    assert_eq!(answer["results"].as_array().unwrap().len(), 2);
    let posts: Vec<_> = app
        .defender_requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(posts.len(), 2);
    assert!(
        posts
            .iter()
            .all(|p| p.path.ends_with("/unrestrictCodeExecution"))
    );
}
