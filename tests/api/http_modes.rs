//! The host's two ways of passing an HTTP request on, forwarding
//! (`enableForwardingHttpRequest`) and proxying (`enableProxyingHttpRequest`,
//! what the custom handler docs now recommend): every answer the same, and
//! the URLs that carry the caller's function key pointing at the public host
//! the Functions host vouched for, never at the loopback address or at a
//! host the caller named.

use restrict_code_execution::simulator::seed::{ALPHA_AAD_DEVICE_ID, BRAVO_AAD_DEVICE_ID};
use serde_json::{Value, json};

use crate::helpers::{HttpMode, TestApp, app};
use crate::host_emulator::{CallerRequest, ClientResponse, PUBLIC_HOST, Route};

const KEY: &str = "the-function-key";

/// `8-4-4-4-12` hex ids, RFC 3339 times and the simulated tenant's port
/// replaced, so answers from two tenants compare.
fn mask(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    let guid = |s: &[char]| {
        s.len() >= 36
            && s[..36].iter().enumerate().all(|(j, c)| {
                if [8, 13, 18, 23].contains(&j) {
                    *c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            })
    };
    let time = |s: &[char]| {
        s.len() >= 20 && s[..4].iter().all(char::is_ascii_digit) && s[4] == '-' && s[10] == 'T'
    };
    let loopback: Vec<char> = "127.0.0.1:".chars().collect();
    while i < chars.len() {
        if chars[i..].starts_with(&loopback) {
            // The simulated tenant's port.
            out.push_str("127.0.0.1:<port>");
            i += loopback.len();
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
        } else if guid(&chars[i..]) {
            out.push_str("<id>");
            i += 36;
        } else if time(&chars[i..]) {
            out.push_str("<time>");
            i += 19;
            while i < chars.len() && !matches!(chars[i], '"' | ' ' | ',' | '<' | '\n') {
                i += 1;
            }
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// What a caller can see of an answer, ids and times masked.
fn seen(answer: &ClientResponse) -> Value {
    let masked = |name: &str| answer.header(name).map(mask);
    json!({
        "status": answer.status,
        "contentType": answer.header("content-type"),
        "location": masked("location"),
        "retryAfter": answer.header("retry-after"),
        "allow": answer.header("allow"),
        "body": mask(&answer.body),
    })
}

/// Representative calls of every kind: a restrict (sync and the Logic Apps'
/// 202 with Location), its status, a refused payload, a wrong method, the
/// fleet view in JSON and text, a job with its statusUrl, the OpenAPI
/// document, an unknown route.
async fn script(app: &TestApp) -> Vec<(String, Value)> {
    let host = &app.host;
    let call = |n: usize| {
        CallerRequest::empty().invocation_id(&format!("00000000-0000-4000-8000-{n:012}"))
    };
    let json_call = |n: usize, body: Value| {
        CallerRequest::json(body.to_string())
            .invocation_id(&format!("00000000-0000-4000-8000-{n:012}"))
            .query("code", KEY)
    };
    let mut seen_all = Vec::new();
    let mut record = |name: &str, answer: &ClientResponse| {
        seen_all.push((name.to_owned(), seen(answer)));
    };

    let restricted = host
        .forwarded_to(
            &Route::restrict(),
            &json_call(
                1,
                json!({"deviceId": ALPHA_AAD_DEVICE_ID, "comment": "INC-1"}),
            ),
        )
        .await;
    record("restrict", &restricted);
    let action_id = restricted.json()["action"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", restricted.body))
        .to_owned();

    let asynchronous = host
        .forwarded_to(
            &Route::restrict(),
            &json_call(2, json!({"deviceId": BRAVO_AAD_DEVICE_ID}))
                .header("Prefer", "respond-async"),
        )
        .await;
    record("restrict, respond-async", &asynchronous);

    let status = host
        .forwarded_to(&Route::status(&action_id), &call(3).query("code", KEY))
        .await;
    record("action status", &status);

    let refused = host
        .forwarded_to(
            &Route::restrict(),
            &json_call(4, json!({"deviceId": ALPHA_AAD_DEVICE_ID, "relase": true})),
        )
        .await;
    record("unknown field", &refused);

    let wrong_method = host
        .forwarded_to(
            &Route {
                method: "GET",
                ..Route::restrict()
            },
            &call(5),
        )
        .await;
    record("wrong method", &wrong_method);

    for (n, accept) in [(6, "application/json"), (7, "text/plain")] {
        let view = host
            .forwarded_to(
                &Route::devices(),
                &call(n)
                    .query("code", KEY)
                    .query("state", "all")
                    .header("Accept", accept),
            )
            .await;
        record(&format!("devices as {accept}"), &view);
    }

    let job = host
        .forwarded_to(
            &Route {
                function: "start-job",
                method: "POST",
                path: "/api/restrict-code-execution/jobs".to_owned(),
                params: Vec::new(),
            },
            &json_call(
                8,
                json!({"deviceIds": [ALPHA_AAD_DEVICE_ID], "release": true}),
            ),
        )
        .await;
    record("start job", &job);

    let openapi = host.forwarded_to(&Route::openapi(), &call(9)).await;
    record("openapi", &openapi);

    let nowhere = host
        .forwarded_to(
            &Route {
                path: "/api/nowhere".to_owned(),
                ..Route::openapi()
            },
            &call(10),
        )
        .await;
    record("no route", &nowhere);
    seen_all
}

#[tokio::test]
async fn every_answer_is_the_same_in_forwarding_and_proxying_mode() {
    let mut answers = Vec::new();
    for mode in HttpMode::BOTH {
        let app = app().http_mode(mode).in_process().await;
        answers.push(script(&app).await);
        // Defender saw the same calls, too.
        answers.push(vec![(
            "defender".to_owned(),
            json!(mask(&app.call_kinds().join(" "))),
        )]);
    }
    let forwarding = [&answers[0][..], &answers[1][..]].concat();
    let proxying = [&answers[2][..], &answers[3][..]].concat();
    assert_eq!(forwarding.len(), proxying.len());
    for ((name, f), (_, p)) in forwarding.iter().zip(&proxying) {
        assert_eq!(f, p, "{name}: forwarding vs proxying");
    }
    // The 202's Location and the job's statusUrl name the public host.
    let location = forwarding[1].1["location"].as_str().unwrap();
    assert!(
        location.starts_with(&format!(
            "http://{PUBLIC_HOST}/api/restrict-code-execution/actions/"
        )),
        "{location}"
    );
    assert!(location.ends_with(&format!("?code={KEY}")), "{location}");
}

/// The URLs carrying the caller's key: from the `X-Forwarded-Host` the
/// proxying host set (its `Host` is the loopback address), never from one a
/// caller sent in forwarding mode (the host passes it on untouched).
#[tokio::test]
async fn location_names_the_host_the_functions_host_vouched_for() {
    for mode in HttpMode::BOTH {
        let app = app().http_mode(mode).in_process().await;
        let request = CallerRequest::json(json!({"deviceId": ALPHA_AAD_DEVICE_ID}).to_string())
            .query("code", KEY)
            .header("Prefer", "respond-async")
            .header("X-Forwarded-Host", "attacker.example")
            .header("X-Forwarded-Proto", "https");
        let answer = app.host.forwarded_to(&Route::restrict(), &request).await;
        assert_eq!(answer.status, 202, "{mode:?}: {}", answer.body);
        let location = answer.header("location").unwrap();
        let expected_scheme = match mode {
            // The caller's X-Forwarded-Proto passes through forwarding (on
            // Azure the front end sets it); proxying sets its own.
            HttpMode::Forwarding => "https",
            HttpMode::Proxying => "http",
        };
        assert!(
            location.starts_with(&format!(
                "{expected_scheme}://{PUBLIC_HOST}/api/restrict-code-execution/actions/"
            )),
            "{mode:?}: {location}"
        );
        assert!(!location.contains("attacker"), "{mode:?}: {location}");
        assert!(!location.contains("127.0.0.1"), "{mode:?}: {location}");
    }
}

/// The binary, started with the shipped mode's host.json in its app root,
/// behind a proxying host: one restrict sent, the public Location answered.
#[tokio::test]
async fn the_binary_answers_the_proxying_host_with_the_public_location() {
    let app = app().http_mode(HttpMode::Proxying).binary().await;
    let listening = app.log_events("listening").await;
    assert_eq!(listening[0]["http_mode"], "proxying", "{listening:?}");
    let request = CallerRequest::json(json!({"deviceId": ALPHA_AAD_DEVICE_ID}).to_string())
        .query("code", KEY)
        .header("Prefer", "respond-async");
    let answer = app.host.forwarded_to(&Route::restrict(), &request).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let location = answer.header("location").unwrap();
    assert!(
        location.starts_with(&format!("http://{PUBLIC_HOST}/api/")),
        "{location}"
    );
    let posts: Vec<_> = app
        .defender_requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(posts.len(), 1);
}

/// The one answer that differs, in proxying mode's favour: the forwarding
/// host sends a body only when the request had a `Content-Length`, so a
/// chunked upload arrives empty; the proxying host streams it through.
#[tokio::test]
async fn a_chunked_upload_reaches_the_handler_only_through_the_proxying_host() {
    for mode in HttpMode::BOTH {
        let app = app().http_mode(mode).in_process().await;
        let request =
            CallerRequest::json(json!({"deviceId": ALPHA_AAD_DEVICE_ID}).to_string()).chunked();
        let answer = app.host.forwarded_to(&Route::restrict(), &request).await;
        let posts = app
            .defender_requests()
            .into_iter()
            .filter(|r| r.method == "POST")
            .count();
        match mode {
            HttpMode::Forwarding => {
                assert_eq!(answer.status, 400, "{}", answer.body);
                assert!(
                    answer.body.contains("the request body is empty"),
                    "{}",
                    answer.body
                );
                assert_eq!(posts, 0);
            }
            HttpMode::Proxying => {
                assert_eq!(answer.status, 201, "{}", answer.body);
                assert_eq!(posts, 1);
            }
        }
    }
}

/// host.json says proxying, but the host forwards (an app setting such as
/// `AzureFunctionsJobHost__customHandler__enableProxyingHttpRequest=false`
/// overrides the file): the request then carries the caller's own `Host`,
/// not the proxy's loopback address, and a caller's `X-Forwarded-Host`
/// must still not name the host in a URL that carries the key.
#[tokio::test]
async fn a_callers_forwarded_host_is_ignored_when_the_host_forwards_despite_host_json() {
    let mut app = app().http_mode(HttpMode::Proxying).in_process().await;
    app.host = std::mem::replace(&mut app.host, crate::host_emulator::HostEmulator::new(0))
        .with_mode(HttpMode::Forwarding);
    let request = CallerRequest::json(json!({"deviceId": ALPHA_AAD_DEVICE_ID}).to_string())
        .query("code", KEY)
        .header("Prefer", "respond-async")
        .header("X-Forwarded-Host", "attacker.example");
    let answer = app.host.forwarded_to(&Route::restrict(), &request).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let location = answer.header("location").unwrap();
    assert!(!location.contains("attacker"), "{location}");
    assert!(
        location.starts_with(&format!("http://{PUBLIC_HOST}/api/")),
        "{location}"
    );
}
