//! One invocation, independent of how the host delivered it.
//!
//! Forwarded mode (`routes`) and payload mode (`envelope`) both build an
//! [`Invocation`] (the caller's method, headers, query, route parameters and
//! body); [`super::functions::invoke`] runs it and gives the same
//! [`super::reply::Reply`] either way: same status, same headers, same body.
//! Only the wrapping differs.

use std::collections::BTreeMap;

use http::HeaderMap;
use url::Url;

use crate::host::{
    principal::{PRINCIPAL_HEADER, PRINCIPAL_NAME_HEADER, Principal},
    reply::Format,
};

/// The header the host puts on every call to the handler.
pub const INVOCATION_ID_HEADER: &str = "x-azure-functions-invocationid";

/// The caller's request, as either invocation mode delivered it.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub id: String,
    /// The caller's method; empty when a payload-mode envelope has none.
    pub method: String,
    /// Lowercase names; the host sends every value as a list.
    pub headers: BTreeMap<String, Vec<String>>,
    pub query: Vec<(String, String)>,
    /// Route parameters, such as `actionId`.
    pub params: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// The URL the caller used, when known (to build `Location` headers).
    pub url: Option<Url>,
}

impl Invocation {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .and_then(|values| values.first())
            .map(String::as_str)
    }

    /// All values of a header, joined as HTTP does.
    fn header_joined(&self, name: &str) -> Option<String> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(|values| values.join(", "))
    }

    pub fn format(&self) -> Format {
        Format::from_accept(self.header_joined("accept").as_deref())
    }

    /// The App Service Authentication principal, when there is one.
    pub fn principal(&self) -> Option<Principal> {
        Principal::from_headers(
            self.header(PRINCIPAL_HEADER),
            self.header(PRINCIPAL_NAME_HEADER),
        )
    }

    /// `Prefer: respond-async` (RFC 7240), as Logic Apps understands it.
    pub fn prefers_async(&self) -> bool {
        self.header_joined("prefer").is_some_and(|p| {
            p.split(',').any(|pref| {
                pref.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("respond-async")
            })
        })
    }

    /// The absolute URL of `path` on the host the caller used, keeping the
    /// caller's `code` query key so a Logic App can follow it.
    pub fn url_for(&self, path: &str) -> Option<String> {
        let mut url = self.url.clone()?;
        url.set_path(path);
        let code = self
            .query
            .iter()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.clone());
        url.set_query(None);
        url.set_fragment(None);
        if let Some(code) = code {
            url.query_pairs_mut().append_pair("code", &code);
        }
        Some(url.to_string())
    }
}

/// The invocation id from the host, or a fresh one for direct calls.
pub fn invocation_id(headers: &HeaderMap) -> String {
    headers
        .get(INVOCATION_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        // It goes into logs and bodies: only a sane token is taken as is.
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 100
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}
