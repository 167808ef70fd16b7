//! One delivery attempt: resolve the callback's host, refuse it unless every
//! address is allowed, connect to the checked address only (the client is
//! pinned to it, so no second lookup can rebind the name), follow no
//! redirect, give up after [`SEND_TIMEOUT`]; sign the exact body.

use std::{net::SocketAddr, time::Duration};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use url::{Host, Url};

use super::policy::CallbackPolicy;

/// The whole attempt, connection included.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// A 2xx answer: delivered.
    Delivered(u16),
    /// Worth trying again later: a non-2xx answer (a redirect included), a
    /// timeout or a connection error.
    Failed(String),
    /// Never to be sent: the host resolves to an address that is not allowed.
    Refused(String),
}

/// `sha256=<hex HMAC-SHA256 of body>` for `X-Signature-256`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(7 + digest.len() * 2);
    hex.push_str("sha256=");
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// POST `body` to `url` once.
pub async fn post(
    policy: &CallbackPolicy,
    url: &Url,
    idempotency_key: &str,
    body: &[u8],
) -> Attempt {
    let Some(host) = url.host() else {
        return Attempt::Refused("the URL names no host".into());
    };
    let Some(port) = url.port_or_known_default() else {
        return Attempt::Refused("the URL names no port".into());
    };
    let (name, addrs): (String, Vec<SocketAddr>) = match host {
        Host::Domain(name) => {
            let lookup = tokio::time::timeout(SEND_TIMEOUT, tokio::net::lookup_host((name, port)));
            match lookup.await {
                Ok(Ok(found)) => (name.to_owned(), found.collect()),
                Ok(Err(e)) => return Attempt::Failed(format!("resolving the host failed: {e}")),
                Err(_) => return Attempt::Failed("resolving the host timed out".into()),
            }
        }
        Host::Ipv4(ip) => (ip.to_string(), vec![SocketAddr::new(ip.into(), port)]),
        Host::Ipv6(ip) => (format!("[{ip}]"), vec![SocketAddr::new(ip.into(), port)]),
    };
    if addrs.is_empty() {
        return Attempt::Failed("the host resolved to no address".into());
    }
    // Every address must be allowed: a name that resolves to a public and a
    // private address is refused as a whole.
    if let Some(bad) = addrs.iter().find(|a| !policy.address_allowed(a.ip())) {
        return Attempt::Refused(format!(
            "the host resolves to {}, which is not a public address",
            bad.ip()
        ));
    }
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(SEND_TIMEOUT)
        .connect_timeout(SEND_TIMEOUT)
        .no_proxy();
    if matches!(url.host(), Some(Host::Domain(_))) {
        builder = builder.resolve_to_addrs(&name, &addrs);
    }
    let client = match builder.build() {
        Ok(client) => client,
        Err(e) => return Attempt::Failed(format!("building the HTTP client failed: {e}")),
    };
    let mut request = client
        .post(url.clone())
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", idempotency_key)
        .body(body.to_vec());
    if let Some(key) = policy.signing_key() {
        request = request.header("X-Signature-256", signature(key, body));
    }
    match request.send().await {
        Ok(answer) if answer.status().is_success() => Attempt::Delivered(answer.status().as_u16()),
        Ok(answer) if answer.status().is_redirection() => Attempt::Failed(format!(
            "answered {} (a redirect, not followed)",
            answer.status().as_u16()
        )),
        Ok(answer) => Attempt::Failed(format!("answered {}", answer.status().as_u16())),
        // reqwest's error text may carry the URL: only its kind is kept.
        Err(e) if e.is_timeout() => {
            Attempt::Failed(format!("no answer within {} s", SEND_TIMEOUT.as_secs()))
        }
        Err(e) if e.is_connect() => Attempt::Failed("the connection failed".into()),
        Err(_) => Attempt::Failed("the request failed".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::signature;

    #[test]
    fn the_signature_is_the_hex_hmac_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
