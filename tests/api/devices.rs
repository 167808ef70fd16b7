//! The fleet view, `GET /api/restrict-code-execution/devices`: states derived
//! from actions the real restrict function created on the simulator, in both
//! host modes and all three formats, and what Defender received for it.

use std::time::Duration;

use restrict_code_execution::simulator::{
    ListOrder, OrderBy, SimConfig,
    seed::{
        ALPHA_AAD_DEVICE_ID, ALPHA_MACHINE_ID, BRAVO_AAD_DEVICE_ID, BRAVO_MACHINE_ID,
        CHARLIE_AAD_DEVICE_ID, CHARLIE_MACHINE_ID, KIOSK_MACHINE_ID,
    },
};
use serde_json::{Value, json};

use crate::helpers::{
    AppOptions, IDENTITY_HEADER, TOKEN, TestApp, spawn_app_with, spawn_in_process_with,
};
use crate::host_emulator::{CallerRequest, ClientResponse, Route};

/// A comment a browser must show as text, never run.
const HOSTILE_COMMENT: &str = "<script>alert('x')</script> INC-7 & </td>";

/// A tenant that pages every two rows, so the read must follow nextLinks.
async fn small_pages() -> TestApp {
    tenant(SimConfig {
        page_size: 2,
        ..SimConfig::default()
    })
    .await
}

async fn tenant(sim: SimConfig) -> TestApp {
    spawn_in_process_with(tenant_options(sim)).await
}

fn tenant_options(sim: SimConfig) -> AppOptions {
    AppOptions {
        sim: SimConfig {
            identity_header: IDENTITY_HEADER.to_owned(),
            token: TOKEN.to_owned(),
            ..sim
        },
        ..AppOptions::default()
    }
}

async fn act(app: &TestApp, device: &str, release: bool, comment: &str) {
    let response = app
        .host
        .forwarded(&CallerRequest::json(
            json!({"deviceId": device, "release": release, "comment": comment}).to_string(),
        ))
        .await;
    assert_eq!(response.status, 201, "{}", response.body);
}

/// ALPHA restricted with a release pending (offline), BRAVO restricted,
/// CHARLIE released, KIOSK with only a pending restrict (state unknown).
async fn outbreak(app: &TestApp) {
    act(app, ALPHA_AAD_DEVICE_ID, false, HOSTILE_COMMENT).await;
    act(app, CHARLIE_AAD_DEVICE_ID, false, "INC-7").await;
    act(app, BRAVO_AAD_DEVICE_ID, false, "INC-7").await;
    app.sim.advance(Duration::from_secs(60));
    act(app, CHARLIE_AAD_DEVICE_ID, true, "INC-7 cleared").await;
    app.sim.advance(Duration::from_secs(60));
    app.sim.set_offline(ALPHA_MACHINE_ID, true);
    act(app, ALPHA_AAD_DEVICE_ID, true, "INC-7 cleared").await;
    app.sim.set_offline(KIOSK_MACHINE_ID, true);
    act(app, KIOSK_MACHINE_ID, false, "INC-8").await;
    app.sim.clear_requests();
}

/// Every device of the outbreak, newest `since` first, the unknown one last.
const ALL: [&str; 4] = [
    CHARLIE_MACHINE_ID,
    BRAVO_MACHINE_ID,
    ALPHA_MACHINE_ID,
    KIOSK_MACHINE_ID,
];

fn outbreak_counts() -> Value {
    json!({"restricted": 2, "released": 1, "unknown": 1, "pending": 2})
}

async fn devices(app: &TestApp, state: Option<&str>, accept: Option<&str>) -> ClientResponse {
    let mut request = CallerRequest::empty().query("code", "the-function-key");
    if let Some(state) = state {
        request = request.query("state", state);
    }
    if let Some(accept) = accept {
        request = request.header("Accept", accept);
    }
    app.host.forwarded_to(&Route::devices(), &request).await
}

fn machine_ids(answer: &Value) -> Vec<&str> {
    answer["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["machineId"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn each_state_lists_its_devices_from_one_paged_tenant_wide_read() {
    let app = small_pages().await;
    outbreak(&app).await;

    let restricted = devices(&app, None, None).await;
    assert_eq!(restricted.status, 200, "{}", restricted.body);
    assert_eq!(restricted.header("content-type"), Some("application/json"));
    let answer = restricted.json();
    assert_eq!(machine_ids(&answer), [BRAVO_MACHINE_ID, ALPHA_MACHINE_ID]);
    assert_eq!(answer["count"], 2);
    assert_eq!(answer["state"], "restricted");
    assert_eq!(answer["counts"], outbreak_counts());
    let alpha = &answer["devices"][1];
    assert_eq!(alpha["state"], "restricted");
    assert_eq!(alpha["computerDnsName"], "DESKTOP-ALPHA.contoso.local");
    assert_eq!(alpha["lastAction"]["type"], "RestrictCodeExecution");
    assert_eq!(alpha["since"], alpha["lastAction"]["lastUpdateDateTimeUtc"]);
    assert_eq!(alpha["pendingAction"]["type"], "UnrestrictCodeExecution");
    assert_eq!(alpha["pendingAction"]["status"], "Pending");
    assert!(
        alpha["lastAction"]["requestorComment"]
            .as_str()
            .unwrap()
            .starts_with(HOSTILE_COMMENT)
    );

    // The action exactly as Defender has it, every field.
    let sim_action = app
        .sim
        .actions()
        .into_iter()
        .find(|a| a.id == alpha["lastAction"]["id"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        alpha["lastAction"],
        serde_json::to_value(&sim_action).unwrap()
    );

    // What Defender received: only type-filtered action lists, every page.
    let received = app.defender_requests();
    assert!(!received.is_empty());
    for r in &received {
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("GET", "/api/machineactions")
        );
        let filter = r.filter.as_deref().unwrap();
        assert!(
            filter == "type eq 'RestrictCodeExecution'"
                || filter == "type eq 'UnrestrictCodeExecution'",
            "{filter}"
        );
        assert!(!r.query.as_deref().unwrap().contains("orderby"), "{r:?}");
        assert_eq!(r.header("authorization"), Some(&*format!("Bearer {TOKEN}")));
    }
    // Four restricts on pages of two and two releases: three calls, one of
    // them a nextLink.
    assert_eq!(received.len(), 3, "{received:#?}");
    assert_eq!(
        received
            .iter()
            .filter(|r| r.query.as_deref().unwrap().contains("skip"))
            .count(),
        1
    );

    app.sim.clear_requests();
    let released = devices(&app, Some("released"), None).await.json();
    assert_eq!(machine_ids(&released), [CHARLIE_MACHINE_ID]);
    assert_eq!(
        released["devices"][0]["lastAction"]["type"],
        "UnrestrictCodeExecution"
    );
    assert_eq!(released["devices"][0]["pendingAction"], Value::Null);

    let pending = devices(&app, Some("pending"), None).await.json();
    assert_eq!(machine_ids(&pending), [ALPHA_MACHINE_ID, KIOSK_MACHINE_ID]);
    let kiosk = &pending["devices"][1];
    assert_eq!(kiosk["state"], "unknown");
    assert_eq!(kiosk["since"], Value::Null);
    assert_eq!(kiosk["lastAction"], Value::Null);
    assert_eq!(kiosk["pendingAction"]["type"], "RestrictCodeExecution");

    let all = devices(&app, Some("all"), None).await.json();
    assert_eq!(machine_ids(&all), ALL, "newest since first, unknown last");
    assert!(
        all["asOf"].as_str().unwrap().ends_with('Z'),
        "{}",
        all["asOf"]
    );
    // Asked within seconds of the first, the other views are answered from
    // its read, and say so: the same `asOf`, no call of their own.
    assert_eq!(all["asOf"], answer["asOf"]);
    assert!(app.defender_requests().is_empty());
}

#[tokio::test]
async fn both_host_modes_give_the_same_answer() {
    let app = small_pages().await;
    outbreak(&app).await;
    let request = CallerRequest::empty()
        .query("state", "all")
        .header("Accept", "text/plain");
    let forwarded = app.host.forwarded_to(&Route::devices(), &request).await;
    let payload = app.host.payload_to(&Route::devices(), &request).await;
    for response in [&forwarded, &payload] {
        assert_eq!(response.status, 200, "{}", response.body);
        assert_eq!(
            response.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
    }
    assert_eq!(forwarded.body, payload.body);
    let lines: Vec<&str> = forwarded.body.lines().collect();
    assert_eq!(
        lines.len(),
        5,
        "one line per device and a count: {}",
        forwarded.body
    );
    assert!(
        lines[4].starts_with("4 of 4 device(s), as of "),
        "{}",
        lines[4]
    );
    assert!(
        lines[2].starts_with(&format!(
            "DESKTOP-ALPHA.contoso.local ({ALPHA_MACHINE_ID}) restricted since "
        )),
        "{}",
        lines[2]
    );
    assert!(
        lines[2].contains("; pending UnrestrictCodeExecution Pending ("),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].starts_with(&format!(
            "KIOSK-DELTA ({KIOSK_MACHINE_ID}) unknown; pending "
        )) || lines[3].starts_with(&format!("(no name) ({KIOSK_MACHINE_ID}) unknown; pending ")),
        "{}",
        lines[3]
    );

    let json = app
        .host
        .payload_to(&Route::devices(), &CallerRequest::empty())
        .await;
    assert_eq!(json.status, 200);
    assert_eq!(json.json()["count"], 2);
}

#[tokio::test]
async fn a_browser_gets_a_page_with_every_defender_string_escaped() {
    let app = small_pages().await;
    outbreak(&app).await;
    let browser =
        "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";
    let page = devices(&app, None, Some(browser)).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(
        page.header("content-security-policy")
            .is_some_and(|csp| csp.starts_with("default-src 'none'"))
    );
    assert_eq!(page.header("cache-control"), Some("no-store"));
    let body = &page.body;
    assert!(body.starts_with("<!DOCTYPE html>"), "{body}");
    assert!(!body.contains("<script"), "{body}");
    assert!(
        body.contains("&lt;script&gt;alert('x')&lt;/script&gt; INC-7 &amp; &lt;/td&gt;"),
        "{body}"
    );
    assert_eq!(body.matches("<tr data-machine-id=").count(), 2);
    // The filter links keep the function key, so they work as this page did.
    assert!(
        body.contains(r#"href="?state=all&amp;code=the-function-key""#),
        "{body}"
    );
    // No external assets; the only absolute URLs are the links to each
    // device's page in the Defender portal.
    assert!(
        !body.contains("src=") && !body.contains("<link") && !body.contains("http://"),
        "no external assets"
    );
    let links = body
        .matches(r#"href="https://security.microsoft.com/machines/v2/"#)
        .count();
    assert_eq!(links, 2, "one portal link per device: {body}");
    assert_eq!(body.matches("https://").count(), links, "{body}");
}

#[tokio::test]
async fn an_unknown_state_is_a_400_naming_the_parameter_and_nothing_is_sent() {
    // The binary: "nothing is sent" includes no token request.
    let app = spawn_app_with(tenant_options(SimConfig {
        page_size: 2,
        ..SimConfig::default()
    }))
    .await;
    for state in ["restrict", "", "RESTRICTED; DROP"] {
        let response = devices(&app, Some(state), None).await;
        assert_eq!(response.status, 400, "{state:?}: {}", response.body);
        let problem = response.json();
        assert_eq!(problem["code"], "invalid_request");
        assert_eq!(problem["field"], "state");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("restricted (the default), released, pending or all"),
            "{problem}"
        );
    }
    let twice = app
        .host
        .forwarded_to(
            &Route::devices(),
            &CallerRequest::empty()
                .query("state", "all")
                .query("state", "released"),
        )
        .await;
    assert_eq!(twice.status, 400);
    assert_eq!(twice.json()["field"], "state");
    let post = app
        .host
        .forwarded_to(
            &Route {
                method: "POST",
                ..Route::devices()
            },
            &CallerRequest::json("{}"),
        )
        .await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET"));
    assert!(app.defender_requests().is_empty());
    assert!(app.token_requests().is_empty());
}

#[tokio::test]
async fn an_empty_tenant_answers_an_empty_list() {
    let app = small_pages().await;
    let answer = devices(&app, Some("all"), None).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let answer = answer.json();
    assert_eq!(answer["devices"], json!([]));
    assert_eq!(answer["count"], 0);
    let text = devices(&app, None, Some("text/plain")).await;
    assert!(
        text.body.starts_with("No restricted devices as of "),
        "{}",
        text.body
    );
}

#[tokio::test]
async fn a_defender_failure_is_a_problem_answer() {
    use restrict_code_execution::simulator::{Fault, FaultKind};
    let app = small_pages().await;
    outbreak(&app).await;
    app.sim.inject(
        Fault::new(
            "machineactions",
            FaultKind::Status {
                status: 403,
                retry_after: None,
                body: None,
            },
        )
        .method("GET")
        .times(1),
    );
    let answer = devices(&app, None, None).await;
    assert_eq!(answer.status, 502, "{}", answer.body);
    assert_eq!(answer.json()["code"], "defender_forbidden");
}

#[tokio::test]
async fn the_view_does_not_depend_on_the_list_order_or_on_next_links() {
    // Oldest first, no nextLink under $top, $orderby refused: all undocumented
    // behaviour a tenant may have.
    let app = tenant(SimConfig {
        page_size: 2,
        list_order: ListOrder::OldestFirst,
        next_link_with_top: false,
        orderby: OrderBy::Refuse,
        ..SimConfig::default()
    })
    .await;
    outbreak(&app).await;
    let all = devices(&app, Some("all"), None).await;
    assert_eq!(all.status, 200, "{}", all.body);
    let all = all.json();
    assert_eq!(machine_ids(&all), ALL);
    assert_eq!(all["counts"], outbreak_counts());
    assert_eq!(
        all["devices"][2]["pendingAction"]["type"],
        "UnrestrictCodeExecution"
    );
}

/// The list-actions calls Defender received.
fn action_lists(app: &TestApp) -> usize {
    app.defender_requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/api/machineactions")
        .count()
}

#[tokio::test]
async fn concurrent_views_share_one_read() {
    // No read is reused after it finished: only the views asked while it is
    // in flight (Defender answers each list 400 ms late) may share it.
    let app = spawn_in_process_with(AppOptions {
        env: vec![("FLEET_VIEW_MAX_AGE_SECONDS", "0".to_owned())],
        ..tenant_options(SimConfig::default())
    })
    .await;
    outbreak(&app).await;
    app.sim.inject(
        restrict_code_execution::simulator::Fault::new(
            "machineactions",
            restrict_code_execution::simulator::FaultKind::Delay { millis: 400 },
        )
        .method("GET"),
    );
    let views = (0..20).map(|i| {
        let state = ["all", "restricted", "pending", "released"][i % 4];
        let app = &app;
        async move { devices(app, Some(state), None).await }
    });
    let answers = futures_util::future::join_all(views).await;
    let as_of = answers[0].json()["asOf"].clone();
    for answer in &answers {
        assert_eq!(answer.status, 200, "{}", answer.body);
        let answer = answer.json();
        assert_eq!(answer["asOf"], as_of, "one read answered every view");
        assert_eq!(answer["counts"], outbreak_counts());
    }
    assert_eq!(
        action_lists(&app),
        2,
        "one read pair (restricts, releases) for 20 views: {:#?}",
        app.defender_requests()
    );

    // With the read over and no reuse allowed, the next view reads again.
    app.sim.clear_requests();
    let again = devices(&app, Some("all"), None).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(action_lists(&app), 2);
}

#[tokio::test]
async fn views_never_take_the_budget_a_restrict_needs() {
    // Four list-actions calls an hour; views may fill half of that. Every
    // view wants a fresh read (no reuse by age).
    let app = spawn_in_process_with(AppOptions {
        env: vec![
            ("DEFENDER_RATE_LIMIT_PER_HOUR", "4".to_owned()),
            ("FLEET_VIEW_MAX_AGE_SECONDS", "0".to_owned()),
        ],
        ..tenant_options(SimConfig::default())
    })
    .await;
    let mut views = Vec::new();
    for _ in 0..10 {
        views.push(devices(&app, Some("all"), None).await);
    }
    let view_lists = action_lists(&app);

    // The restrict still finds room to read the machine and act.
    let restrict = app
        .host
        .forwarded(&CallerRequest::json(
            json!({"deviceId": ALPHA_AAD_DEVICE_ID, "comment": "INC-9"}).to_string(),
        ))
        .await;
    assert_eq!(restrict.status, 201, "{}", restrict.body);
    let received = app.defender_requests();
    assert!(
        received.iter().any(|r| r.method == "POST"
            && r.path == format!("/api/machines/{ALPHA_MACHINE_ID}/restrictCodeExecution")),
        "{received:#?}"
    );

    assert_eq!(
        view_lists, 2,
        "views stop at their share of the hour: {received:#?}"
    );
    let as_of = views[0].json()["asOf"].clone();
    for view in &views {
        assert_eq!(view.status, 200, "{}", view.body);
        // Answered from the first read, and saying how old it is.
        assert_eq!(view.json()["asOf"], as_of);
    }
}

#[tokio::test]
async fn the_view_pages_with_a_continuation_token() {
    let app = small_pages().await;
    outbreak(&app).await;
    let page = |continuation: Option<String>, accept: Option<&'static str>| {
        let app = &app;
        async move {
            let mut request = CallerRequest::empty()
                .query("state", "all")
                .query("pageSize", "1");
            if let Some(token) = &continuation {
                request = request.query("continuation", token);
            }
            if let Some(accept) = accept {
                request = request.header("Accept", accept);
            }
            app.host.forwarded_to(&Route::devices(), &request).await
        }
    };
    let mut seen = Vec::new();
    let mut token = None;
    loop {
        let response = page(token.clone(), None).await;
        assert_eq!(response.status, 200, "{}", response.body);
        let answer = response.json();
        assert_eq!(answer["count"], 1);
        assert_eq!(answer["matching"], 4);
        assert_eq!(answer["pageSize"], 1);
        assert_eq!(answer["counts"], outbreak_counts());
        seen.push(
            answer["devices"][0]["machineId"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        match answer["continuation"].as_str() {
            Some(next) => {
                let link = response.header("link").unwrap();
                assert!(
                    link.starts_with("<?state=all&pageSize=1&continuation="),
                    "{link}"
                );
                assert!(link.ends_with(">; rel=\"next\""), "{link}");
                assert!(!link.contains("code="), "the key stays out: {link}");
                token = Some(next.to_owned());
            }
            None => {
                assert_eq!(response.header("link"), None);
                break;
            }
        }
        assert!(seen.len() <= 4, "{seen:?}");
    }
    assert_eq!(seen, ALL, "every device once, in the view's order");

    // Text and HTML page alike.
    let text = page(None, Some("text/plain")).await;
    let lines: Vec<&str> = text.body.lines().collect();
    assert_eq!(lines.len(), 2, "{}", text.body);
    // The last line says how many, as of when, and how to go on.
    assert!(
        lines[1].starts_with("1 of 4 device(s), as of "),
        "{}",
        lines[1]
    );
    assert!(
        lines[1].contains("Next page: add continuation="),
        "{}",
        lines[1]
    );
    assert!(text.header("link").is_some());
    let html = page(None, Some("text/html")).await;
    assert_eq!(html.body.matches("<tr data-machine-id=").count(), 1);
    assert!(
        html.body
            .contains(r#"rel="next" href="?state=all&amp;pageSize=1&amp;continuation="#),
        "{}",
        html.body
    );

    // A token this service did not write, or a page size out of range, is
    // refused before anything is read.
    app.sim.clear_requests();
    for (name, value) in [
        ("continuation", "not a token"),
        ("continuation", "eA"),
        ("pageSize", "0"),
        ("pageSize", "10001"),
        ("pageSize", "+5"),
    ] {
        let response = app
            .host
            .forwarded_to(
                &Route::devices(),
                &CallerRequest::empty().query(name, value),
            )
            .await;
        assert_eq!(response.status, 400, "{name}={value}: {}", response.body);
        assert_eq!(response.json()["field"], name);
    }
    assert!(app.defender_requests().is_empty());
}

/// A read of many pages needs room for all of them: checked once before
/// it starts, with room for two calls only, a read of a large tenant would
/// run on past the views' share of the window and into the slots left for
/// jobs, the reconciler and interactive requests.
#[tokio::test]
async fn a_view_starts_a_read_only_when_all_its_pages_fit_in_the_views_share() {
    // 32 list-actions calls a minute: views may bring the window to 16.
    let app = spawn_in_process_with(AppOptions {
        env: vec![
            ("DEFENDER_RATE_LIMIT_PER_MINUTE", "32".to_owned()),
            ("FLEET_VIEW_MAX_AGE_SECONDS", "0".to_owned()),
        ],
        ..tenant_options(SimConfig {
            page_size: 1,
            ..SimConfig::default()
        })
    })
    .await;
    outbreak(&app).await;
    let mut views = Vec::new();
    for _ in 0..4 {
        views.push(devices(&app, Some("all"), None).await);
    }
    for view in &views {
        assert_eq!(view.status, 200, "{}", view.body);
    }
    // Every list-actions call of this minute: the outbreak's state reads
    // (cleared from the record, so counted by the budget only) and the
    // views'. The views' reads keep the window within their half.
    // The outbreak's state reads and one view's read (six pages of
    // one action) leave less than six calls of the views' sixteen: the
    // next views answer from that read. Checked for two calls only, a
    // second read would start and take the window to eighteen.
    let view_calls = action_lists(&app);
    assert_eq!(view_calls, 6, "one read, every page of it");
    let as_of = views[0].json()["asOf"].clone();
    assert!(views.iter().all(|v| v.json()["asOf"] == as_of));
}
