//! How the Functions host passes an HTTP request on to us, as `host.json`
//! tells it, and what that means for the URL the caller used.
//!
//! For a function with one `httpTrigger` in and one `http` out (all of ours),
//! `customHandler` in `host.json` picks one of two modes (docs/http-modes.md
//! has what each does, from the host's source):
//!
//! - `enableForwardingHttpRequest`: the host rebuilds the caller's request
//!   and sends it with the caller's own `Host` and every caller header,
//!   `X-Forwarded-Host` included if the caller sent one.
//! - `enableProxyingHttpRequest` (wins when both are set): the host proxies
//!   the request with YARP, which sends `Host: 127.0.0.1:<port>` and *sets*
//!   `X-Forwarded-Host` and `X-Forwarded-Proto` from the request the host
//!   received, replacing whatever the caller sent.
//!
//! `Location` and `statusUrl` carry the caller's function key, so the public
//! host they name must be one the Functions host vouched for: the
//! `X-Forwarded-Host` in proxying mode, the `Host` in forwarding mode (where
//! an `X-Forwarded-Host` is the caller's and never trusted). The handler
//! reads the mode from the same `host.json` the host reads, so the two
//! cannot disagree; without one it assumes forwarding, which trusts nothing
//! a caller can set.

use std::path::Path;

use serde_json::Value;

/// The way HTTP-triggered functions reach the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpMode {
    /// `enableForwardingHttpRequest`: the caller's `Host`, every caller
    /// header as sent.
    #[default]
    Forwarding,
    /// `enableProxyingHttpRequest`: loopback `Host`, the public one in the
    /// `X-Forwarded-Host` the host set.
    Proxying,
}

impl HttpMode {
    /// The mode `host.json` in `app_root` selects. A file that is missing or
    /// unreadable means forwarding (trusting no forwarded header).
    pub fn from_app_root(app_root: &Path) -> Self {
        let path = app_root.join("host.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Self::Forwarding;
        };
        match serde_json::from_str::<Value>(&text) {
            Ok(host_json) => Self::from_host_json(&host_json),
            Err(error) => {
                tracing::warn!(
                    path = %path.display(),
                    error = %error,
                    "host.json is not JSON; assuming enableForwardingHttpRequest"
                );
                Self::Forwarding
            }
        }
    }

    /// The mode of a parsed `host.json`. The host binds the section onto its
    /// options with .NET configuration, whose keys match case-insensitively
    /// and whose booleans may be strings; `customHandler` wins over the
    /// legacy `httpWorker`.
    pub fn from_host_json(host_json: &Value) -> Self {
        let section = ["customHandler", "httpWorker"]
            .iter()
            .find_map(|name| key(host_json, name));
        let proxying = section
            .and_then(|s| key(s, "enableProxyingHttpRequest"))
            .is_some_and(|v| match v {
                Value::Bool(b) => *b,
                Value::String(s) => s.trim().eq_ignore_ascii_case("true"),
                _ => false,
            });
        if proxying {
            Self::Proxying
        } else {
            Self::Forwarding
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forwarding => "forwarding",
            Self::Proxying => "proxying",
        }
    }
}

fn key<'a>(object: &'a Value, name: &str) -> Option<&'a Value> {
    object
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_mode_is_read_as_the_host_binds_it() {
        let mode = |v: Value| HttpMode::from_host_json(&v);
        assert_eq!(mode(json!({})), HttpMode::Forwarding);
        assert_eq!(
            mode(json!({"customHandler": {"enableForwardingHttpRequest": true}})),
            HttpMode::Forwarding
        );
        assert_eq!(
            mode(json!({"customHandler": {"enableProxyingHttpRequest": true}})),
            HttpMode::Proxying
        );
        // Proxying wins when both are set; keys and booleans as .NET binds them.
        assert_eq!(
            mode(
                json!({"CustomHandler": {"EnableProxyingHttpRequest": "True",
                "enableForwardingHttpRequest": true}})
            ),
            HttpMode::Proxying
        );
        assert_eq!(
            mode(
                json!({"customHandler": {"enableProxyingHttpRequest": false},
                "httpWorker": {"enableProxyingHttpRequest": true}})
            ),
            HttpMode::Forwarding
        );
    }

    #[test]
    fn the_shipped_host_json_names_its_mode() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(root.join("host.json")).unwrap();
        let host_json: Value = serde_json::from_str(&text).unwrap();
        let section = &host_json["customHandler"];
        // Exactly one mode flag, so a reader of host.json sees which it is.
        let flags = ["enableForwardingHttpRequest", "enableProxyingHttpRequest"]
            .iter()
            .filter(|f| section.get(**f).is_some())
            .count();
        assert_eq!(flags, 1, "{section}");
        assert_eq!(
            HttpMode::from_app_root(root),
            HttpMode::from_host_json(&host_json)
        );
    }
}
