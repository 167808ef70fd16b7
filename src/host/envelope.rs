//! Payload mode: the host's invocation envelope in, the output envelope out.
//!
//! The host POSTs `/{FunctionName}` with `{"Data":{"req":{...,"Body":"<text>"}},
//! "Metadata":{...}}` (see "Request payload" in
//! <https://learn.microsoft.com/azure/azure-functions/functions-custom-handlers>)
//! and expects HTTP 200
//! `application/json` `{"Outputs":{"res":{statusCode, headers, body}}, "Logs",
//! "ReturnValue"}` back ("Response payload"). The host turns any non-2xx into a bare 500 and
//! drops our body, so even a malformed envelope is answered 200 with a
//! well-formed envelope whose `res` carries the 400.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::host::{error::ApiError, invocation::Invocation, reply::Reply};

/// The name of the http output binding in `function.json`. The host matches
/// keys inside `Outputs` case-sensitively.
pub const OUTPUT_BINDING: &str = "res";
/// The name of the httpTrigger binding in `function.json`.
pub const TRIGGER_BINDING: &str = "req";

/// Largest envelope read. The payload limit is 64 KiB; JSON escaping inside
/// the `Body` string can grow it up to six times, plus headers and identities.
pub const MAX_ENVELOPE_BYTES: usize = 1024 * 1024;

/// Read `Data.req` from the envelope: the caller's request, as invocation `id`.
///
/// - `Method` is empty when absent;
/// - `Url` is the URL the caller used;
/// - `Query`: the host comma-joins repeated keys;
/// - `Params`: route parameters (an absent optional one is null);
/// - `Body` is empty when the host sent none (it omits it when the request
///   had no Content-Length);
/// - `Headers`: lowercase names; the host sends each value as an array.
pub fn parse(envelope: &[u8], id: String) -> Result<Invocation, ApiError> {
    let bad = |why: &str| ApiError::InvalidEnvelope(why.to_owned());
    let value: Value = serde_json::from_slice(envelope)
        .map_err(|e| ApiError::InvalidEnvelope(format!("not JSON: {e}")))?;
    let data = value
        .get("Data")
        .ok_or_else(|| bad("no Data object"))?
        .as_object()
        .ok_or_else(|| bad("Data is not an object"))?;
    let req = data
        .get(TRIGGER_BINDING)
        .ok_or_else(|| bad("no Data.req (the http trigger binding)"))?
        .as_object()
        .ok_or_else(|| bad("Data.req is not an object"))?;

    let body = match req.get("Body") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(text)) => text.clone().into_bytes(),
        Some(_) => return Err(bad("Data.req.Body is not a string")),
    };

    let mut headers = BTreeMap::new();
    match req.get("Headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, values) in map {
                let values = match values {
                    Value::Array(items) => items
                        .iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect(),
                    Value::String(s) => vec![s.clone()],
                    _ => return Err(bad("Data.req.Headers values must be arrays of strings")),
                };
                headers.insert(name.to_ascii_lowercase(), values);
            }
        }
        Some(_) => return Err(bad("Data.req.Headers is not an object")),
    }
    let method = match req.get("Method") {
        Some(Value::String(m)) => m.to_ascii_uppercase(),
        None | Some(Value::Null) => String::new(),
        Some(_) => return Err(bad("Data.req.Method is not a string")),
    };
    let url = match req.get("Url") {
        Some(Value::String(u)) => url::Url::parse(u).ok(),
        _ => None,
    };
    let strings = |key: &str| -> Result<Vec<(String, String)>, ApiError> {
        match req.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Object(map)) => Ok(map
                .iter()
                .filter_map(|(k, v)| match v {
                    Value::String(s) => Some((k.clone(), s.clone())),
                    Value::Null => None,
                    other => Some((k.clone(), other.to_string())),
                })
                .collect()),
            Some(_) => Err(ApiError::InvalidEnvelope(format!(
                "Data.req.{key} is not an object"
            ))),
        }
    };
    let query = strings("Query")?;
    let params = strings("Params")?.into_iter().collect();
    Ok(Invocation {
        id,
        method,
        url,
        query,
        params,
        body,
        headers,
    })
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct OutputEnvelope<'a> {
    outputs: BTreeMap<&'static str, HttpOutput<'a>>,
    logs: Vec<&'a str>,
    return_value: Option<()>,
}

/// The http output. `statusCode` (never `status`, which the host ignores), a
/// string-to-string header map (array values break), and `body` as a string,
/// so the host writes it verbatim instead of re-indenting an object.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HttpOutput<'a> {
    status_code: u16,
    headers: BTreeMap<&'static str, String>,
    body: &'a str,
}

/// Wrap a reply in the output envelope (always sent with HTTP 200).
pub fn render(reply: &Reply) -> String {
    let output = HttpOutput {
        status_code: reply.status.as_u16(),
        headers: reply.headers().into_iter().collect(),
        body: &reply.body,
    };
    let envelope = OutputEnvelope {
        outputs: BTreeMap::from([(OUTPUT_BINDING, output)]),
        logs: vec![reply.summary.as_str()],
        return_value: None,
    };
    // Serializing these plain types cannot fail; the fallback keeps the
    // promise of always answering an object.
    serde_json::to_string(&envelope).unwrap_or_else(|_| {
        r#"{"Outputs":{"res":{"statusCode":500,"headers":{},"body":""}},"Logs":[],"ReturnValue":null}"#
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn body_headers_and_missing_body_are_read() {
        let env = json!({"Data":{"req":{"Body":"{\"a\":1}","Headers":{"Accept":["text/plain"]}}},"Metadata":{}});
        let req = parse(env.to_string().as_bytes(), "id".to_owned()).unwrap();
        assert_eq!(req.body, br#"{"a":1}"#);
        assert_eq!(req.headers["accept"], vec!["text/plain".to_owned()]);

        let env = json!({"Data":{"req":{"Method":"POST"}},"Metadata":{}});
        assert!(
            parse(env.to_string().as_bytes(), "id".to_owned())
                .unwrap()
                .body
                .is_empty()
        );
    }

    #[test]
    fn malformed_envelopes_are_invalid_envelope_errors() {
        for bad in [
            "not json".to_owned(),
            json!([]).to_string(),
            json!({"Data":{}}).to_string(),
            json!({"Data":{"req":"x"}}).to_string(),
            json!({"Data":{"req":{"Body":{"deviceId":"x"}}}}).to_string(),
        ] {
            let err = parse(bad.as_bytes(), "id".to_owned()).unwrap_err();
            assert_eq!(err.code(), "invalid_envelope", "{bad}");
        }
    }
}
