//! Completion callbacks, the platform check and dry runs, through the real
//! router served in this process (so a test can run the reconciler's
//! delivery with a clock of its own) against the simulator over HTTP.

use std::{collections::HashMap, time::Duration};

use hmac::{Hmac, Mac};
use restrict_code_execution::{
    config::Settings,
    host::{app_state::AppState, routes},
    service::callbacks::{CallbackPolicy, send},
    simulator::{
        SimConfig, SimHandle,
        seed::{ALPHA_AAD_DEVICE_ID, ALPHA_MACHINE_ID, CHARLIE_AAD_DEVICE_ID},
    },
    startup::{Backend, prepare},
};
use serde_json::{Value, json};
use sha2::Sha256;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::{
    callback_receiver::Receiver,
    host_emulator::{CallerRequest, ClientResponse, HostEmulator},
};

const KEY: &str = "callback-signing-key";

struct App {
    state: AppState,
    sim: SimHandle,
    host: HostEmulator,
}

async fn app() -> App {
    let map: HashMap<String, String> = [
        ("CALLBACK_ALLOWED_HOSTS", "127.0.0.1"),
        ("CALLBACK_ALLOW_LOOPBACK", "true"),
        ("CALLBACK_SIGNING_KEY", KEY),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let settings = Settings::from_map(&map).unwrap();
    let config = SimConfig {
        identity_header: crate::helpers::IDENTITY_HEADER.to_owned(),
        token: crate::helpers::TOKEN.to_owned(),
        ..SimConfig::default()
    };
    let (state, sim) = prepare(settings, Backend::Simulated(Box::new(config)))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = routes::router(state.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let host = HostEmulator::new(port);
    host.wait_until_ready().await;
    App {
        state,
        sim: sim.unwrap(),
        host,
    }
}

impl App {
    async fn restrict(&self, body: Value) -> ClientResponse {
        self.host
            .forwarded(&CallerRequest::json(body.to_string()))
            .await
    }

    /// `POST /api/restrict-code-execution/jobs` with `body`.
    async fn start_job(&self, body: Value) -> ClientResponse {
        let start = crate::host_emulator::Route {
            function: "start-job",
            method: "POST",
            path: "/api/restrict-code-execution/jobs".to_owned(),
            params: Vec::new(),
        };
        self.host
            .forwarded_to(&start, &CallerRequest::json(body.to_string()))
            .await
    }

    fn defender_posts(&self) -> usize {
        self.sim
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .count()
    }

    async fn deliver(
        &self,
        now: OffsetDateTime,
    ) -> restrict_code_execution::service::callbacks::DeliveryReport {
        self.state
            .callbacks()
            .deliver_due(now, Instant::now() + Duration::from_secs(30))
            .await
    }
}

fn signature(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

#[tokio::test]
async fn a_disallowed_callback_url_is_a_400_naming_it_and_nothing_reaches_defender() {
    let app = app().await;
    for url in [
        "https://attacker.example.net/hook?sig=TOPSECRET",
        "https://10.0.0.5/hook?sig=TOPSECRET",
        "http://169.254.169.254/metadata?sig=TOPSECRET",
    ] {
        let answer = app
            .restrict(json!({"deviceId": ALPHA_AAD_DEVICE_ID, "callbackUrl": url}))
            .await;
        assert_eq!(answer.status, 400, "{url}: {}", answer.body);
        let problem = answer.json();
        assert_eq!(problem["code"], "invalid_request", "{problem}");
        assert_eq!(problem["field"], "callbackUrl", "{problem}");
        assert!(
            !answer.body.contains("TOPSECRET"),
            "the URL is echoed: {}",
            answer.body
        );
    }
    assert!(
        app.sim.requests().is_empty(),
        "Defender was asked: {:?}",
        app.sim.requests()
    );
}

#[tokio::test]
async fn a_callback_is_delivered_once_signed_when_the_action_is_final() {
    let app = app().await;
    let receiver = Receiver::start().await;
    let answer = app
        .restrict(json!({"deviceId": ALPHA_AAD_DEVICE_ID, "callbackUrl": receiver.url("/hook")}))
        .await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    assert!(!answer.body.contains("TOPSECRET"));
    let action_id = answer.json()["action"]["id"].as_str().unwrap().to_owned();

    // Still pending: nothing is sent.
    let now = OffsetDateTime::now_utc();
    let report = app.deliver(now).await;
    assert_eq!((report.waiting, report.delivered), (1, 0), "{report:?}");
    assert!(receiver.received().is_empty());

    app.sim.advance(Duration::from_secs(30));
    let report = app.deliver(now).await;
    assert_eq!(report.delivered, 1, "{report:?}");
    let received = receiver.received();
    assert_eq!(received.len(), 1);
    let got = &received[0];
    let body: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(body["event"], "action.finished");
    assert_eq!(body["actionId"], action_id.as_str());
    assert_eq!(body["status"], "Succeeded");
    assert_eq!(body["type"], "RestrictCodeExecution");
    assert_eq!(body["machineId"], ALPHA_MACHINE_ID);
    assert_eq!(body["release"], false);
    let status_url = body["statusUrl"].as_str().unwrap();
    assert!(
        status_url.ends_with(&format!("/api/restrict-code-execution/actions/{action_id}")),
        "{status_url}"
    );
    assert!(!status_url.contains("code="), "{status_url}");
    assert!(
        body["finishedAt"].is_string() && body["sentAt"].is_string(),
        "{body}"
    );
    assert_eq!(
        got.headers["x-signature-256"].to_str().unwrap(),
        signature(&got.body),
        "the signature is the HMAC of the exact body"
    );
    assert!(!got.headers["idempotency-key"].is_empty());

    // Delivered: a later run sends nothing more.
    let report = app.deliver(now + time::Duration::hours(2)).await;
    assert_eq!(
        report.delivered + report.retrying + report.waiting,
        0,
        "{report:?}"
    );
    assert_eq!(receiver.received().len(), 1);
}

#[tokio::test]
async fn a_failed_callback_is_retried_with_backoff_and_the_same_idempotency_key() {
    let app = app().await;
    let receiver = Receiver::start().await;
    receiver.fail_next(2);
    let answer = app
        .restrict(json!({
            "deviceIds": [ALPHA_AAD_DEVICE_ID, CHARLIE_AAD_DEVICE_ID],
            "callbackUrl": receiver.url("/hook"),
        }))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    app.sim.advance(Duration::from_secs(30));

    let now = OffsetDateTime::now_utc();
    assert_eq!(app.deliver(now).await.retrying, 1);
    // Not due again before a minute has passed.
    assert_eq!(
        app.deliver(now + time::Duration::seconds(30))
            .await
            .retrying,
        0
    );
    assert_eq!(receiver.received().len(), 1);
    // Then after one minute, then two more.
    assert_eq!(
        app.deliver(now + time::Duration::seconds(61))
            .await
            .retrying,
        1
    );
    assert_eq!(
        app.deliver(now + time::Duration::seconds(150))
            .await
            .delivered,
        0
    );
    assert_eq!(
        app.deliver(now + time::Duration::seconds(182))
            .await
            .delivered,
        1
    );

    let received = receiver.received();
    assert_eq!(received.len(), 3);
    let keys: Vec<&str> = received
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap())
        .collect();
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    let bodies: Vec<Value> = received
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    assert_eq!(bodies[2]["event"], "devices.finished");
    let devices = bodies[2]["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    assert!(
        devices.iter().all(|d| d["status"] == "Succeeded"),
        "{devices:?}"
    );
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    let app = app().await;
    let receiver = Receiver::start().await;
    let elsewhere = Receiver::start().await;
    receiver.redirect_to(&elsewhere.url("/stolen"));
    let answer = app
        .restrict(json!({"deviceId": ALPHA_AAD_DEVICE_ID, "callbackUrl": receiver.url("/hook")}))
        .await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    app.sim.advance(Duration::from_secs(30));
    let report = app.deliver(OffsetDateTime::now_utc()).await;
    assert_eq!((report.delivered, report.retrying), (0, 1), "{report:?}");
    assert_eq!(receiver.received().len(), 1);
    assert!(elsewhere.received().is_empty(), "the redirect was followed");
}

#[tokio::test]
async fn a_name_that_resolves_to_a_private_address_is_refused_at_delivery() {
    let receiver = Receiver::start().await;
    // Allowed by name, but `localhost` resolves to a loopback address and
    // the loopback allowance is off: nothing may be sent.
    let policy = CallbackPolicy::new("localhost", false, None).unwrap();
    let url = url::Url::parse(&format!("http://localhost:{}/hook", receiver.addr.port())).unwrap();
    let attempt = send::post(&policy, &url, "key", b"{}").await;
    assert!(matches!(attempt, send::Attempt::Refused(_)), "{attempt:?}");
    assert!(receiver.received().is_empty());
}

#[tokio::test]
async fn a_device_whose_platform_cannot_be_restricted_gets_422_without_a_post() {
    let app = app().await;
    let mac: restrict_code_execution::defender::models::Machine = serde_json::from_value(json!({
        "id": "d00d00d00d00d00d00d00d00d00d00d00d00d00d",
        "computerDnsName": "MACBOOK-DELTA",
        "aadDeviceId": "9e000000-0000-4000-8000-000000000001",
        "healthStatus": "Active",
        "osPlatform": "macOS",
        "onboardingStatus": "Onboarded",
        "lastSeen": "2026-11-28T08:00:00Z",
    }))
    .unwrap();
    app.sim.add_machine(mac);
    let answer = app
        .restrict(json!({"deviceId": "9e000000-0000-4000-8000-000000000001"}))
        .await;
    assert_eq!(answer.status, 422, "{}", answer.body);
    assert_eq!(answer.json()["code"], "unsupported_device");
    assert!(answer.body.contains("macOS"), "{}", answer.body);
    assert_eq!(app.defender_posts(), 0, "{:?}", app.sim.requests());
}

#[tokio::test]
async fn a_dry_run_reads_and_decides_but_sends_nothing() {
    let app = app().await;
    let answer = app
        .restrict(json!({"deviceId": ALPHA_AAD_DEVICE_ID, "dryRun": true}))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["outcome"], "would_request", "{body}");
    assert_eq!(body["dryRun"], true);
    assert_eq!(app.defender_posts(), 0);
    // The lookup and the state read happened.
    let paths: Vec<String> = app.sim.requests().iter().map(|r| r.path.clone()).collect();
    assert!(
        paths.iter().any(|p| p.ends_with("/machineactions")),
        "{paths:?}"
    );

    // Once restricted, a dry run finds it so.
    let real = app.restrict(json!({"deviceId": ALPHA_AAD_DEVICE_ID})).await;
    assert_eq!(real.status, 201, "{}", real.body);
    app.sim.advance(Duration::from_secs(30));
    let answer = app
        .restrict(
            json!({"deviceIds": [ALPHA_AAD_DEVICE_ID, CHARLIE_AAD_DEVICE_ID], "DRYRUN": "true"}),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["results"][0]["outcome"], "already_in_state", "{body}");
    assert_eq!(body["results"][1]["outcome"], "would_request", "{body}");
    assert_eq!(app.defender_posts(), 1, "only the real restrict was sent");
}

fn add_mac(sim: &SimHandle) -> &'static str {
    let aad = "9e000000-0000-4000-8000-000000000002";
    let mac: restrict_code_execution::defender::models::Machine = serde_json::from_value(json!({
        "id": "e00e00e00e00e00e00e00e00e00e00e00e00e00e",
        "computerDnsName": "MACBOOK-ECHO",
        "aadDeviceId": aad,
        "healthStatus": "Active",
        "osPlatform": "macOS",
        "onboardingStatus": "Onboarded",
        "lastSeen": "2026-11-28T08:00:00Z",
    }))
    .unwrap();
    sim.add_machine(mac);
    aad
}

#[tokio::test]
async fn a_dry_run_job_counts_what_it_would_do_sends_nothing_and_calls_back_when_done() {
    let app = app().await;
    let receiver = Receiver::start().await;
    let mac = add_mac(&app.sim);
    let answer = app
        .start_job(json!({
            "deviceIds": [ALPHA_AAD_DEVICE_ID, mac],
            "dryRun": true,
            "callbackUrl": receiver.url("/job"),
        }))
        .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let job_id = answer.json()["jobId"].as_str().unwrap().to_owned();

    // Wait for the in-process worker, delivering as the reconciler would.
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        app.deliver(OffsetDateTime::now_utc()).await;
        if let Some(got) = receiver.received().first() {
            break serde_json::from_slice::<Value>(&got.body).unwrap();
        }
        assert!(std::time::Instant::now() < until, "no job callback");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(body["event"], "job.finished", "{body}");
    assert_eq!(body["jobId"], job_id.as_str());
    assert_eq!(body["status"], "done");
    assert_eq!(body["counts"]["would_request"], 1, "{body}");
    assert_eq!(body["counts"]["failed"], 1, "the macOS device: {body}");
    assert!(
        body["statusUrl"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/api/restrict-code-execution/jobs/{job_id}"))
    );
    assert_eq!(app.defender_posts(), 0, "{:?}", app.sim.requests());
    assert_eq!(receiver.received().len(), 1);
}

#[tokio::test]
async fn a_job_calls_back_once_its_actions_are_final_not_when_its_devices_are_sent() {
    let app = app().await;
    let receiver = Receiver::start().await;
    let answer = app
        .start_job(json!({
            "deviceIds": [ALPHA_AAD_DEVICE_ID, CHARLIE_AAD_DEVICE_ID],
            "callbackUrl": receiver.url("/job"),
        }))
        .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let job_id = answer.json()["jobId"].as_str().unwrap().to_owned();

    // The simulator's actions stay Pending, then InProgress, for 5 s: the
    // job's devices are sent long before. Deliver as the reconciler would
    // until the callback arrives; by then Defender must call every action
    // of the job final.
    let until = std::time::Instant::now() + Duration::from_secs(40);
    let mut waited = 0;
    let body = loop {
        let report = app.deliver(OffsetDateTime::now_utc()).await;
        if let Some(got) = receiver.received().first() {
            break serde_json::from_slice::<Value>(&got.body).unwrap();
        }
        waited += report.waiting;
        assert!(std::time::Instant::now() < until, "no job callback");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let restricts: Vec<_> = app
        .sim
        .actions()
        .into_iter()
        .filter(|a| a.action_type == "RestrictCodeExecution")
        .collect();
    assert_eq!(restricts.len(), 2, "{restricts:?}");
    assert!(
        restricts.iter().all(|a| a.status == "Succeeded"),
        "the callback went before the actions were final: {restricts:?}"
    );
    assert!(waited > 0, "the callback waited for the actions");
    assert_eq!(body["event"], "job.finished", "{body}");
    assert_eq!(body["jobId"], job_id.as_str());
    assert_eq!(body["status"], "done");
    assert_eq!(body["counts"]["requested"], 2, "{body}");
    assert_eq!(body["actions"]["Succeeded"], 2, "{body}");
    // The status reads came from the callback (after the job's own).
    assert!(
        app.sim
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.contains("machineactions"))
            .count()
            >= 1
    );
    // Once delivered, nothing more is sent.
    app.deliver(OffsetDateTime::now_utc()).await;
    assert_eq!(receiver.received().len(), 1);
}

/// A job's action that never finishes (the device stays offline) does not
/// keep `job.finished` from ever going: after the wait for final actions,
/// the callback goes with the open action counted as `notFinal`.
#[tokio::test]
async fn a_jobs_callback_goes_after_the_wait_even_with_an_action_still_open() {
    let app = app().await;
    let receiver = Receiver::start().await;
    app.sim.set_offline(ALPHA_MACHINE_ID, true);
    let answer = app
        .start_job(json!({
            "deviceIds": [ALPHA_AAD_DEVICE_ID],
            "callbackUrl": receiver.url("/job"),
        }))
        .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let job_id = answer.json()["jobId"].as_str().unwrap().to_owned();
    let status = crate::host_emulator::Route {
        function: "job-status",
        method: "GET",
        path: format!("/api/restrict-code-execution/jobs/{job_id}"),
        params: vec![("jobId", job_id.clone())],
    };
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while app
        .host
        .forwarded_to(&status, &CallerRequest::empty())
        .await
        .status
        != 200
    {
        assert!(std::time::Instant::now() < until, "the job did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Done, its action still pending: nothing yet.
    let report = app.deliver(OffsetDateTime::now_utc()).await;
    assert_eq!(report.waiting, 1, "{report:?}");
    assert!(receiver.received().is_empty());
    // Eight days on: it goes, saying one action is not final.
    let later = OffsetDateTime::now_utc() + time::Duration::days(8);
    let report = app.deliver(later).await;
    assert_eq!(report.delivered, 1, "{report:?}");
    let body: Value = serde_json::from_slice(&receiver.received()[0].body).unwrap();
    assert_eq!(body["event"], "job.finished", "{body}");
    assert_eq!(body["actions"]["notFinal"], 1, "{body}");
    assert_eq!(body["counts"]["requested"], 1, "{body}");
}
