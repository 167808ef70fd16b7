//! Over-HTTP tests of machine tags and device groups: the list filters
//! Defender documents for selecting a group of devices, with paging and rate
//! limits, and the tags API.

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::seed::*;
use super::*;
use crate::defender::models::{ErrorEnvelope, ODataPage};

const READ_WRITE: &[&str] = &["Machine.ReadWrite.All", "Machine.RestrictExecution"];

struct Api {
    sim: SimHandle,
    http: reqwest::Client,
}

impl Api {
    async fn new(config: SimConfig) -> Self {
        let sim = Simulator::start("127.0.0.1:0".parse().expect("addr"), config)
            .await
            .expect("simulator starts");
        Self {
            sim,
            http: reqwest::Client::new(),
        }
    }

    async fn get(&self, url_or_path: &str) -> reqwest::Response {
        let url = if url_or_path.starts_with("http") {
            url_or_path.to_owned()
        } else {
            format!("{}{url_or_path}", self.sim.url())
        };
        self.http
            .get(url)
            .bearer_auth("t")
            .send()
            .await
            .expect("response")
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.sim.url()))
            .bearer_auth("t")
            .json(body)
            .send()
            .await
            .expect("response")
    }

    /// The ids a filtered list returns on its first page.
    async fn filtered(&self, filter: &str) -> Vec<String> {
        let page = self.page(&list_path(filter)).await;
        assert_eq!(page.next_link, None, "{filter}");
        page.value.into_iter().map(|m| m.id.to_string()).collect()
    }

    async fn page(&self, url_or_path: &str) -> ODataPage<Machine> {
        let response = self.get(url_or_path).await;
        assert_eq!(response.status(), StatusCode::OK, "{url_or_path}");
        response.json().await.expect("page")
    }

    fn machine(&self, id: &str) -> Machine {
        self.sim
            .machines()
            .into_iter()
            .find(|m| m.id == id)
            .expect("machine")
    }
}

fn list_path(filter: &str) -> String {
    let encoded: String = url::form_urlencoded::byte_serialize(filter.as_bytes()).collect();
    format!("/api/machines?$filter={encoded}")
}

/// The OData literal of a tag: quoted, `'` doubled.
fn tag_filter(tag: &str) -> String {
    format!("machineTags/any(tag: tag eq '{}')", tag.replace('\'', "''"))
}

async fn error(response: reqwest::Response) -> (StatusCode, String, String) {
    let status = response.status();
    let body: ErrorEnvelope = response.json().await.expect("error envelope");
    (status, body.error.code, body.error.message)
}

fn tags(machine: &Machine) -> Value {
    machine.extra["machineTags"].clone()
}

#[tokio::test]
async fn the_demo_tenant_answers_tag_and_device_group_filters() {
    let api = Api::new(SimConfig::default()).await;
    assert_eq!(
        api.filtered(&tag_filter(OUTBREAK_TAG)).await,
        [
            ALPHA_MACHINE_ID,
            BRAVO_STALE_MACHINE_ID,
            BRAVO_MACHINE_ID,
            BRAVO_MERGED_MACHINE_ID,
            LINUX_MACHINE_ID
        ],
        "every record carrying the tag, stale and merged ones included"
    );
    // A tag with a quote, written the OData way.
    assert_eq!(
        api.filtered(&tag_filter(QUOTED_TAG)).await,
        [CHARLIE_MACHINE_ID]
    );
    // Another variable name and a second condition.
    assert_eq!(
        api.filtered("machineTags/any(t: t eq 'outbreak-42') and healthStatus eq 'Active'")
            .await,
        [
            ALPHA_MACHINE_ID,
            BRAVO_MACHINE_ID,
            BRAVO_MERGED_MACHINE_ID,
            LINUX_MACHINE_ID
        ]
    );
    // Tags compare exactly; an unknown tag matches nothing.
    assert!(api.filtered(&tag_filter("OUTBREAK-42")).await.is_empty());
    assert!(api.filtered(&tag_filter("outbreak-4")).await.is_empty());

    assert_eq!(
        api.filtered(&format!("rbacGroupId eq {SERVERS_GROUP_ID}"))
            .await,
        [LINUX_MACHINE_ID]
    );
    assert_eq!(
        api.filtered(&format!("rbacGroupId eq {WORKSTATIONS_GROUP_ID}"))
            .await
            .len(),
        6
    );
    assert!(api.filtered("rbacGroupId eq 999").await.is_empty());

    // What Defender received, decoded, is in the log.
    let log = api.sim.requests();
    assert_eq!(
        log[1].filter.as_deref(),
        Some("machineTags/any(tag: tag eq 'O''Brien lab')")
    );

    for bad in [
        "rbacGroupId eq '102'",
        "machineTags eq 'outbreak-42'",
        "machineTags/any(tag: tag eq 'O'Brien lab')",
    ] {
        let (status, code, _) = error(api.get(&list_path(bad)).await).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "ODataError"),
            "{bad}"
        );
    }
    let (status, code, message) =
        error(api.get(&list_path("machineTags/all(t: t eq 'x')")).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_IMPLEMENTED, "NotImplementedInSimulator")
    );
    assert!(message.contains("machineTags/all"), "{message}");
}

#[tokio::test]
async fn no_match_can_be_a_404_as_the_docs_say() {
    let api = Api::new(SimConfig {
        no_match: NoMatch::NotFound,
        ..SimConfig::default()
    })
    .await;
    let (status, code, _) = error(api.get(&list_path(&tag_filter("typo"))).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "ResourceNotFound")
    );
}

#[tokio::test]
async fn a_fleet_under_a_tag_pages_with_next_links_and_counts_against_the_rate_limit() {
    let fleet = seed::Fleet {
        stale_records: 4,
        merged_records: 2,
        rbac_group_id: 7,
        ..seed::Fleet::new("pg", "wave'1", 25)
    };
    let api = Api::new(SimConfig {
        page_size: 10,
        fleets: vec![fleet.clone()],
        rate_limits: Some(RateLimits {
            per_minute: 4,
            per_hour: 1500,
        }),
        speed: 1e-9,
        ..SimConfig::default()
    })
    .await;
    // Seeded beside the demo tenant.
    assert_eq!(api.sim.machines().len(), 7 + 31);

    let mut ids = Vec::new();
    let mut next = Some(list_path(&tag_filter("wave'1")));
    let mut pages = 0;
    while let Some(url) = next {
        let page = api.page(&url).await;
        pages += 1;
        ids.extend(page.value.into_iter().map(|m| m.id));
        next = page.next_link;
        if let Some(link) = &next {
            assert!(link.contains("%27wave%27%271%27"), "{link}");
        }
    }
    assert_eq!(pages, 4);
    let expected: Vec<String> = fleet
        .machines(time::OffsetDateTime::now_utc())
        .into_iter()
        .map(|m| m.id.to_string())
        .collect();
    assert_eq!(ids, expected);

    // The fifth list call within the minute is refused with Retry-After.
    let throttled = api.get(&list_path("rbacGroupId eq 7")).await;
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(throttled.headers().contains_key("retry-after"));
    api.sim.advance(std::time::Duration::from_secs(61));

    // $top/$skip over the group filter.
    let page = api
        .page(&format!(
            "{}&$top=5&$skip=20",
            list_path("rbacGroupId eq 7")
        ))
        .await;
    let window: Vec<String> = page.value.into_iter().map(|m| m.id.to_string()).collect();
    assert_eq!(window, expected[20..25]);
}

#[tokio::test]
async fn tagging_one_machine_adds_and_removes_only_that_tag() {
    let api = Api::new(SimConfig {
        roles: READ_WRITE.iter().map(|r| (*r).to_owned()).collect(),
        ..SimConfig::default()
    })
    .await;
    let path = format!("/api/machines/{ALPHA_MACHINE_ID}/tags");
    let response = api
        .post(
            &path,
            &json!({"Value": "CodeExecutionRestricted", "Action": "Add"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("machine");
    assert_eq!(body["id"], ALPHA_MACHINE_ID);
    assert_eq!(
        body["machineTags"],
        json!([OUTBREAK_TAG, "Finance", "CodeExecutionRestricted"])
    );
    assert!(
        body["@odata.context"]
            .as_str()
            .is_some_and(|c| c.ends_with("#Machines/$entity"))
    );
    // Twice is once.
    let again = api
        .post(
            &path,
            &json!({"Value": "CodeExecutionRestricted", "Action": "Add"}),
        )
        .await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(
        tags(&api.machine(ALPHA_MACHINE_ID)),
        json!([OUTBREAK_TAG, "Finance", "CodeExecutionRestricted"])
    );
    assert_eq!(
        api.filtered(&tag_filter("CodeExecutionRestricted")).await,
        [ALPHA_MACHINE_ID]
    );
    let removed = api
        .post(
            &path,
            &json!({"Value": "CodeExecutionRestricted", "Action": "Remove"}),
        )
        .await;
    assert_eq!(removed.status(), StatusCode::OK);
    assert_eq!(
        tags(&api.machine(ALPHA_MACHINE_ID)),
        json!([OUTBREAK_TAG, "Finance"])
    );
    // Removing a tag the machine does not carry changes nothing.
    let absent = api
        .post(&path, &json!({"Value": "nope", "Action": "Remove"}))
        .await;
    assert_eq!(absent.status(), StatusCode::OK);
    assert_eq!(
        tags(&api.machine(ALPHA_MACHINE_ID)),
        json!([OUTBREAK_TAG, "Finance"])
    );

    // Bodies Defender refuses; names are case-sensitive, Action is Add or Remove.
    for (body, want) in [
        (
            json!({"value": "x", "Action": "Add"}),
            "MissingRequiredParameter",
        ),
        (json!({"Value": "x"}), "MissingRequiredParameter"),
        (json!({"Value": "x", "Action": "add"}), "InvalidInput"),
        (json!({"Value": "x", "Action": "Toggle"}), "InvalidInput"),
        (json!({"Value": "", "Action": "Add"}), "InvalidInput"),
        (json!({"Value": 5, "Action": "Add"}), "InvalidRequestBody"),
        (json!(["Value"]), "InvalidRequestBody"),
    ] {
        let (status, code, _) = error(api.post(&path, &body).await).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, want),
            "{body}"
        );
    }
    let (status, code, message) = error(
        api.post(
            "/api/machines/0000000000000000000000000000000000000000/tags",
            &json!({"Value": "x", "Action": "Add"}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "ResourceNotFound")
    );
    assert!(message.contains("was not found"), "{message}");
    assert_eq!(
        tags(&api.machine(ALPHA_MACHINE_ID)),
        json!([OUTBREAK_TAG, "Finance"])
    );

    // What Defender received.
    let sent = api
        .sim
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .expect("logged");
    assert_eq!(sent.path, path);
    assert_eq!(
        serde_json::from_str::<Value>(&sent.body).expect("json"),
        json!({"Value": "CodeExecutionRestricted", "Action": "Add"})
    );
}

#[tokio::test]
async fn tagging_needs_the_read_write_role() {
    // The default app can read and restrict, not write machines.
    let api = Api::new(SimConfig::default()).await;
    for (path, body) in [
        (
            format!("/api/machines/{ALPHA_MACHINE_ID}/tags"),
            json!({"Value": "x", "Action": "Add"}),
        ),
        (
            "/api/machines/AddOrRemoveTagForMultipleMachines".to_owned(),
            json!({"Value": "x", "Action": "Add", "MachineIds": [ALPHA_MACHINE_ID]}),
        ),
    ] {
        let (status, code, message) = error(api.post(&path, &body).await).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::FORBIDDEN, "Forbidden")
        );
        assert!(message.contains("Machine.ReadWrite.All"), "{message}");
    }
    assert_eq!(
        tags(&api.machine(ALPHA_MACHINE_ID)),
        json!([OUTBREAK_TAG, "Finance"])
    );
}

#[tokio::test]
async fn bulk_tagging_takes_up_to_500_machines_and_skips_or_rejects_unknown_ids() {
    let fleet = seed::Fleet::new("bulk", "b", 501);
    let devices = fleet.devices();
    let ids: Vec<&str> = devices.iter().map(|d| d.machine_id.as_str()).collect();
    let config = SimConfig {
        roles: READ_WRITE.iter().map(|r| (*r).to_owned()).collect(),
        fleets: vec![fleet.clone()],
        ..SimConfig::default()
    };
    let api = Api::new(config.clone()).await;
    let bulk = "/api/machines/AddOrRemoveTagForMultipleMachines";

    let (status, code, _) = error(
        api.post(
            bulk,
            &json!({"Value": "r", "Action": "Add", "MachineIds": ids}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "BadRequest")
    );
    let (status, code, _) = error(
        api.post(
            bulk,
            &json!({"Value": "r", "Action": "Add", "MachineIds": []}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "BadRequest")
    );
    let (status, code, _) = error(
        api.post(bulk, &json!({"Value": "r", "Action": "Add"}))
            .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "MissingRequiredParameter")
    );
    assert!(
        api.filtered(&tag_filter("r")).await.is_empty(),
        "nothing changed"
    );

    let response = api
        .post(
            bulk,
            &json!({"Value": "r", "Action": "Add", "MachineIds": ids[..500]}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let page: ODataPage<Machine> = response.json().await.expect("machines");
    assert_eq!(page.value.len(), 500);
    assert_eq!(api.filtered(&tag_filter("r")).await, ids[..500]);
    assert_eq!(
        api.filtered(&tag_filter("b")).await.len(),
        501,
        "other tag kept"
    );

    // Unknown ids: skipped by default...
    let unknown = "ffffffffffffffffffffffffffffffffffffffff";
    let response = api
        .post(
            bulk,
            &json!({"Value": "r", "Action": "Remove", "MachineIds": [ids[0], unknown]}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(api.filtered(&tag_filter("r")).await, ids[1..500]);

    // ... or the whole call is refused, changing nothing.
    let strict = Api::new(SimConfig {
        bulk_tag_unknown: BulkTagUnknown::Reject,
        ..config
    })
    .await;
    let (status, code, message) = error(
        strict
            .post(
                bulk,
                &json!({"Value": "r", "Action": "Add", "MachineIds": [ids[0], unknown]}),
            )
            .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "ResourceNotFound")
    );
    assert!(message.contains(unknown), "{message}");
    assert!(strict.filtered(&tag_filter("r")).await.is_empty());
}

#[tokio::test]
async fn the_tag_endpoints_have_their_own_rate_buckets() {
    let api = Api::new(SimConfig {
        roles: READ_WRITE.iter().map(|r| (*r).to_owned()).collect(),
        rate_limits: Some(RateLimits {
            per_minute: 1,
            per_hour: 1500,
        }),
        speed: 1e-9,
        ..SimConfig::default()
    })
    .await;
    let one = format!("/api/machines/{ALPHA_MACHINE_ID}/tags");
    let add = json!({"Value": "x", "Action": "Add"});
    let bulk = "/api/machines/AddOrRemoveTagForMultipleMachines";
    let add_many = json!({"Value": "x", "Action": "Add", "MachineIds": [CHARLIE_MACHINE_ID]});
    assert_eq!(api.post(&one, &add).await.status(), StatusCode::OK);
    assert_eq!(api.post(bulk, &add_many).await.status(), StatusCode::OK);
    let restrict = format!("/api/machines/{ALPHA_MACHINE_ID}/restrictCodeExecution");
    assert_eq!(
        api.post(&restrict, &json!({"Comment": "c"})).await.status(),
        StatusCode::CREATED
    );
    let (status, code, _) = error(api.post(&one, &add).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "TooManyRequests")
    );
    let (status, _, _) = error(api.post(bulk, &add_many).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    api.sim.advance(std::time::Duration::from_secs(60));
    assert_eq!(api.post(&one, &add).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_fleet_is_added_through_the_test_controls() {
    let api = Api::new(SimConfig {
        seed: false,
        ..SimConfig::default()
    })
    .await;
    let response = api
        .http
        .post(format!("{}/_sim/fleets", api.sim.url()))
        .json(&json!({"name": "ctl", "tag": "t1", "devices": 3, "staleRecords": 1, "mergedRecords": 1, "rbacGroupId": 9}))
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.expect("json");
    let fleet = seed::Fleet {
        stale_records: 1,
        merged_records: 1,
        rbac_group_id: 9,
        ..seed::Fleet::new("ctl", "t1", 3)
    };
    let devices = fleet.devices();
    assert_eq!(body["devices"][0]["machineId"], devices[0].machine_id);
    assert_eq!(
        body["devices"][0]["staleMachineId"].as_str(),
        devices[0].stale_machine_id.as_deref()
    );
    assert_eq!(api.filtered("rbacGroupId eq 9").await.len(), 5);
    let bad = api
        .http
        .post(format!("{}/_sim/fleets", api.sim.url()))
        .json(&json!({"name": "x", "tag": "t", "devices": 1, "colour": "red"}))
        .send()
        .await
        .expect("response");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn actions_are_created_in_bulk_by_the_api_s_own_rules() {
    let api = Api::new(SimConfig {
        seed: false,
        ..SimConfig::default()
    })
    .await;
    let fleet = seed::Fleet::new("bulk", "t1", 3);
    api.sim.add_fleet(&fleet);
    let ids: Vec<String> = fleet.devices().into_iter().map(|d| d.machine_id).collect();
    let bulk = |ids: Vec<String>| {
        let api = &api;
        async move {
            let response = api
                .http
                .post(format!("{}/_sim/actions", api.sim.url()))
                .json(&json!({"type": "RestrictCodeExecution", "machineIds": ids, "comment": "INC-1"}))
                .send()
                .await
                .expect("response");
            assert_eq!(response.status(), StatusCode::CREATED);
            response.json::<Value>().await.expect("json")
        }
    };
    let first = bulk(vec![
        ids[0].clone(),
        ids[1].clone(),
        "no-such-machine".to_owned(),
    ])
    .await;
    assert_eq!(first["created"], 2);
    assert_eq!(first["notFound"], json!(["no-such-machine"]));
    // The duplicate rule of the API: a restrict still pending is not repeated.
    let again = bulk(ids.clone()).await;
    assert_eq!(again["created"], 1);
    assert_eq!(again["alreadyInProgress"].as_array().map(Vec::len), Some(2));
    let actions = api.sim.actions();
    assert_eq!(actions.len(), 3);
    assert!(
        actions
            .iter()
            .all(|a| a.requestor_comment.as_deref() == Some("INC-1"))
    );
}
