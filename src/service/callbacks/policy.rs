//! Where callbacks may go: checked once when the request arrives (scheme,
//! host pattern, no IP literal; no DNS lookup then) and again at each
//! delivery for every address the name resolves to.
//!
//! A callback URL comes from the caller, and this app runs inside a
//! network with a managed identity: without these checks a callback would be
//! a way to make the app send requests to its own neighbours (server-side
//! request forgery). The request-time check gives the caller a 400 at once;
//! the delivery-time check is the one that holds, because a name can resolve
//! to something else later (DNS rebinding), which is also why the delivery
//! connects to the very address it checked.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::{Host, Url};

/// `CALLBACK_ALLOWED_HOSTS` when unset: the host of a Logic Apps callback
/// URL (`https://prod-NN.<region>.logic.azure.com/...`).
pub const DEFAULT_ALLOWED_HOSTS: &str = "*.logic.azure.com";

/// Longest accepted callback URL (a Logic Apps callback URL is about 300).
pub const MAX_URL_LEN: usize = 2048;

/// The callback settings.
#[derive(Clone)]
pub struct CallbackPolicy {
    allowed: Vec<HostPattern>,
    /// `CALLBACK_ALLOW_LOOPBACK=true`: plain `http` to a loopback address is
    /// allowed (local runs and tests only).
    allow_loopback: bool,
    /// `CALLBACK_SIGNING_KEY`: signs each body (`X-Signature-256`).
    signing_key: Option<Vec<u8>>,
}

impl std::fmt::Debug for CallbackPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackPolicy")
            .field("allowed", &self.allowed)
            .field("allow_loopback", &self.allow_loopback)
            .field("signing_key", &self.signing_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Default for CallbackPolicy {
    fn default() -> Self {
        Self::new(DEFAULT_ALLOWED_HOSTS, false, None).unwrap_or_else(|_| Self {
            allowed: Vec::new(),
            allow_loopback: false,
            signing_key: None,
        })
    }
}

/// One entry of `CALLBACK_ALLOWED_HOSTS`: an exact host or `*.suffix`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.logic.azure.com`: any host ending in `.logic.azure.com`, with one
    /// label or more before it (Logic Apps hosts are
    /// `prod-NN.<region>.logic.azure.com`); not the bare suffix itself.
    Suffix(String),
}

impl HostPattern {
    fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(exact) => exact == host,
            Self::Suffix(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|labels| !labels.is_empty()),
        }
    }
}

impl CallbackPolicy {
    /// `allowed`: `CALLBACK_ALLOWED_HOSTS`, comma-separated; an entry that is
    /// not a host name or `*.` followed by one is an error naming it.
    pub fn new(
        allowed: &str,
        allow_loopback: bool,
        signing_key: Option<Vec<u8>>,
    ) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for entry in allowed.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let entry = entry.to_ascii_lowercase();
            let (wildcard, name) = match entry.strip_prefix("*.") {
                Some(rest) => (true, rest.to_owned()),
                None => (false, entry.clone()),
            };
            let valid = !name.is_empty()
                && name.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !valid {
                return Err(format!(
                    "CALLBACK_ALLOWED_HOSTS entry `{entry}` is not a host name or `*.` followed by one"
                ));
            }
            patterns.push(if wildcard {
                HostPattern::Suffix(format!(".{name}"))
            } else {
                HostPattern::Exact(name)
            });
        }
        Ok(Self {
            allowed: patterns,
            allow_loopback,
            signing_key: signing_key.filter(|k| !k.is_empty()),
        })
    }

    pub fn signing_key(&self) -> Option<&[u8]> {
        self.signing_key.as_deref()
    }

    pub fn allow_loopback(&self) -> bool {
        self.allow_loopback
    }

    /// The request-time check: `https` (or `http` to loopback with the
    /// allowance), a host `CALLBACK_ALLOWED_HOSTS` names, no IP literal, no
    /// user info. The reason never repeats the URL (it is a secret).
    pub fn check(&self, raw: &str) -> Result<Url, String> {
        if raw.len() > MAX_URL_LEN {
            return Err(format!("must be at most {MAX_URL_LEN} characters"));
        }
        let url = Url::parse(raw).map_err(|e| format!("is not an absolute URL ({e})"))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not carry a user name or password".into());
        }
        let host = url.host().ok_or("must name a host")?;
        let loopback_name = |name: &str| name.eq_ignore_ascii_case("localhost");
        match (url.scheme(), &host) {
            ("https", Host::Domain(name)) if !loopback_name(name) => {
                if self.allows(name) {
                    Ok(url.clone())
                } else {
                    Err(format!(
                        "names host `{name}`, which CALLBACK_ALLOWED_HOSTS does not allow"
                    ))
                }
            }
            // Loopback for local runs: only with the allowance, and only a
            // host the allow-list names itself.
            ("http" | "https", host) if self.allow_loopback && is_loopback_host(host) => {
                let name = host.to_string();
                let name = name.trim_start_matches('[').trim_end_matches(']');
                if self
                    .allowed
                    .iter()
                    .any(|p| p == &HostPattern::Exact(name.to_ascii_lowercase()))
                {
                    Ok(url.clone())
                } else {
                    Err(format!(
                        "names loopback host `{name}`, which CALLBACK_ALLOWED_HOSTS does not list"
                    ))
                }
            }
            (_, Host::Ipv4(_) | Host::Ipv6(_)) => Err("must name a host, not an IP address".into()),
            ("https", _) => Err("must not name localhost".into()),
            (scheme, _) => Err(format!("must use https, not {scheme}")),
        }
    }

    fn allows(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.allowed.iter().any(|p| p.matches(&name))
    }

    /// The delivery-time check of one resolved address.
    pub fn address_allowed(&self, ip: IpAddr) -> bool {
        if self.allow_loopback && ip.is_loopback() {
            return true;
        }
        is_public(ip)
    }
}

fn is_loopback_host(host: &Host<&str>) -> bool {
    match host {
        Host::Domain(name) => name.eq_ignore_ascii_case("localhost"),
        Host::Ipv4(ip) => ip.is_loopback(),
        Host::Ipv6(ip) => ip.is_loopback(),
    }
}

/// Whether `ip` is a public unicast address: not private, loopback,
/// link-local (the cloud metadata endpoint is 169.254.169.254), unique-local,
/// carrier-grade NAT, documentation, benchmarking, multicast, unspecified
/// or reserved; an IPv4-mapped IPv6 address is judged as its IPv4 address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_unspecified()
        || ip.is_multicast()
        || a == 0
        // 100.64.0.0/10, carrier-grade NAT (RFC 6598).
        || (a == 100 && (64..128).contains(&b))
        // 192.0.0.0/24, IETF protocol assignments.
        || (a == 192 && b == 0 && c == 0)
        // 198.18.0.0/15, benchmarking.
        || (a == 198 && (b == 18 || b == 19))
        // 240.0.0.0/4, reserved.
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // fc00::/7, unique local.
        || (first & 0xfe00) == 0xfc00
        // fe80::/10, link-local.
        || (first & 0xffc0) == 0xfe80
        // 2001:db8::/32, documentation.
        || (first == 0x2001 && ip.segments()[1] == 0x0db8)
        // 64:ff9b::/96 (NAT64) can reach IPv4 private space.
        || (first == 0x0064 && ip.segments()[1] == 0xff9b)
        // ::/96 IPv4-compatible (deprecated).
        || ip.segments()[..6].iter().all(|s| *s == 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CallbackPolicy {
        CallbackPolicy::new(DEFAULT_ALLOWED_HOSTS, false, None).unwrap()
    }

    #[test]
    fn a_logic_apps_url_passes_by_default() {
        let url = "https://prod-12.westeurope.logic.azure.com:443/workflows/abc/runs/x/actions/y/run?api-version=2016-06-01&sp=%2Fruns&sig=SECRET";
        assert!(policy().check(url).is_ok());
    }

    #[test]
    fn other_hosts_schemes_and_ip_literals_are_refused_without_echoing_the_url() {
        for (url, says) in [
            (
                "http://prod-1.westeurope.logic.azure.com/x?sig=SECRET",
                "https",
            ),
            ("https://logic.azure.com/x?sig=SECRET", "does not allow"),
            (
                "https://evil.logic.azure.com.attacker.net/x?sig=SECRET",
                "does not allow",
            ),
            ("https://10.0.0.4/x?sig=SECRET", "IP address"),
            ("https://[::1]/x?sig=SECRET", "IP address"),
            ("https://169.254.169.254/metadata?sig=SECRET", "IP address"),
            ("https://localhost/x?sig=SECRET", "localhost"),
            (
                "https://user:pw@a.logic.azure.com/x?sig=SECRET",
                "user name",
            ),
            ("ftp://a.logic.azure.com/x?sig=SECRET", "https"),
            ("not a url", "absolute URL"),
        ] {
            let why = policy().check(url).unwrap_err();
            assert!(why.contains(says), "{url}: {why}");
            assert!(!why.contains("SECRET"), "{why}");
        }
    }

    #[test]
    fn loopback_needs_the_allowance_and_the_allow_list() {
        let url = "http://127.0.0.1:8080/hook";
        let local = CallbackPolicy::new("127.0.0.1", true, None).unwrap();
        assert!(local.check(url).is_ok());
        let not_listed = CallbackPolicy::new("*.logic.azure.com", true, None).unwrap();
        assert!(not_listed.check(url).is_err());
        let no_allowance = CallbackPolicy::new("127.0.0.1", false, None).unwrap();
        assert!(no_allowance.check(url).is_err());
    }

    #[test]
    fn bad_allow_list_entries_are_named() {
        let err = CallbackPolicy::new("*.logic.azure.com, https://x", false, None).unwrap_err();
        assert!(err.contains("https://x"), "{err}");
    }

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["20.50.2.1", "13.69.1.1", "2603:1020::1", "::ffff:20.50.2.1"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }
}
