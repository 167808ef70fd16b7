//! Property tests over the two parsers that see untrusted input: the runbook
//! payload and the host's invocation envelope. No input panics, and every
//! rejection is a 4xx problem. The case count is fixed so CI runs the same
//! amount of work every time.

use proptest::prelude::*;
use restrict_code_execution::{
    host::{envelope, error::ApiError},
    service::runbook::{RunbookRequest, Target},
};
use serde_json::{Map, Value, json};

const CASES: u32 = 3000;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::hash_map(".{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A field name: a known one in random casing, or anything.
fn field_name() -> impl Strategy<Value = String> {
    let known = prop::sample::select(vec![
        "deviceId",
        "release",
        "comment",
        "callerName",
        "force",
        "cancelPending",
        "deviceIds",
        "wait",
        "relase",
        "device_id",
    ]);
    prop_oneof![
        4 => (known, any::<u64>()).prop_map(|(name, seed)| {
            name.chars()
                .enumerate()
                .map(|(i, c)| if seed >> (i % 64) & 1 == 1 { c.to_ascii_uppercase() } else { c })
                .collect()
        }),
        1 => ".{0,16}",
    ]
}

/// A value that is often almost right.
fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3d")),
        Just(json!("C5CB89852CE0D21636C0491709A4571B5F190E75")),
        Just(json!("00000000-0000-0000-0000-000000000000")),
        prop::sample::select(vec!["true", "FALSE", "yes", "", " ", "1"]).prop_map(|s| json!(s)),
        any::<bool>().prop_map(Value::Bool),
        "[0-9a-fA-F-]{30,42}".prop_map(Value::String),
        ".{0,1100}".prop_map(Value::String),
        json_value(),
    ]
}

fn payload_object() -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::vec((field_name(), field_value()), 0..7)
}

fn assert_rejection_is_a_4xx(
    result: Result<RunbookRequest, restrict_code_execution::service::runbook::RunbookError>,
) {
    if let Err(e) = result {
        let error = ApiError::from(e);
        assert!(
            error.status().is_client_error(),
            "{error}: {}",
            error.status()
        );
        let problem = error.problem("inv");
        assert!(!problem.detail.is_empty());
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic_the_payload_parser(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        assert_rejection_is_a_4xx(RunbookRequest::parse(&bytes));
    }

    #[test]
    fn arbitrary_json_never_panics_the_payload_parser(value in json_value()) {
        assert_rejection_is_a_4xx(RunbookRequest::parse(value.to_string().as_bytes()));
    }

    #[test]
    fn near_miss_payloads_are_parsed_strictly(fields in payload_object()) {
        // Build the object text by hand so duplicate keys survive.
        let body = format!(
            "{{{}}}",
            fields
                .iter()
                .map(|(k, v)| format!("{}:{v}", json!(k)))
                .collect::<Vec<_>>()
                .join(",")
        );
        let result = RunbookRequest::parse(body.as_bytes());
        let known = [
            "deviceid", "deviceids", "release", "comment", "callername", "force", "cancelpending", "wait",
        ];
        let lower: Vec<String> = fields.iter().map(|(k, _)| k.to_ascii_lowercase()).collect();
        if let Ok(request) = &result {
            // Accepted means: only known names, each once, and clean values.
            for name in &lower {
                prop_assert!(known.contains(&name.as_str()), "accepted unknown field {name}");
            }
            let mut unique = lower.clone();
            unique.sort();
            unique.dedup();
            prop_assert_eq!(unique.len(), lower.len(), "accepted a repeated field");
            prop_assert!(request.comment.as_str().chars().count() <= 1000);
            prop_assert!(!request.comment.as_str().chars().any(char::is_control));
            let devices = match &request.target {
                Target::One(device) => vec![device.to_string()],
                Target::Many(devices) => devices.iter().map(ToString::to_string).collect(),
            };
            for device in devices {
                prop_assert!(device.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'), "{device}");
            }
            // `release` is true only when the caller said so.
            if request.release {
                let said_true = fields.iter().any(|(k, v)| {
                    k.eq_ignore_ascii_case("release")
                        && (v == &json!(true) || v.as_str().is_some_and(|s| s.eq_ignore_ascii_case("true")))
                });
                prop_assert!(said_true);
            }
        }
        assert_rejection_is_a_4xx(result);
    }

    #[test]
    fn arbitrary_envelopes_never_panic_and_are_rejected_as_4xx(
        body in prop::option::of(".{0,200}"),
        headers in json_value(),
        data in json_value(),
        shape in 0..4u8,
    ) {
        let envelope = match shape {
            0 => data,
            1 => json!({"Data": data}),
            2 => json!({"Data": {"req": data}}),
            _ => {
                let mut req = Map::new();
                if let Some(body) = body {
                    req.insert("Body".into(), json!(body));
                }
                req.insert("Headers".into(), headers);
                json!({"Data": {"req": req}, "Metadata": {}})
            }
        };
        if let Err(e) = envelope::parse(envelope.to_string().as_bytes(), String::new()) {
            prop_assert!(e.status().is_client_error());
            prop_assert_eq!(e.code(), "invalid_envelope");
        }
    }
}
