//! Who called, as App Service Authentication ("Easy Auth") tells us.
//!
//! When Authentication fronts the function app, the platform validates the
//! caller's token, strips any client-sent `X-MS-CLIENT-PRINCIPAL*` headers, and
//! passes its own `X-MS-CLIENT-PRINCIPAL`: base64 JSON
//! `{"auth_typ","name_typ","role_typ","claims":[{"typ","val"}]}`. Without
//! Authentication the header can be forged by anyone, so `ALLOWED_CALLER_ROLES`
//! is only meaningful with Authentication enabled (the README says so).

use base64::Engine;
use serde::Deserialize;

use crate::host::error::ApiError;

pub const PRINCIPAL_HEADER: &str = "x-ms-client-principal";
pub const PRINCIPAL_NAME_HEADER: &str = "x-ms-client-principal-name";

const ROLE_CLAIMS: &[&str] = &[
    "roles",
    "role",
    "http://schemas.microsoft.com/ws/2008/06/identity/claims/role",
];
const NAME_CLAIMS: &[&str] = &[
    "name",
    "preferred_username",
    "upn",
    "email",
    "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name",
    "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/upn",
];

/// The authenticated caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Principal {
    pub name: Option<String>,
    pub roles: Vec<String>,
}

#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    name_typ: Option<String>,
    #[serde(default)]
    role_typ: Option<String>,
    #[serde(default)]
    claims: Vec<Claim>,
}

#[derive(Deserialize)]
struct Claim {
    typ: String,
    val: String,
}

impl Principal {
    /// Decode the principal header; `None` when absent or unreadable.
    pub fn from_headers(principal: Option<&str>, name_header: Option<&str>) -> Option<Self> {
        let encoded = principal?.trim();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(encoded))
            .ok()?;
        let wire: Wire = serde_json::from_slice(&bytes).ok()?;
        let is = |claim: &Claim, names: &[&str], declared: Option<&String>| {
            names.iter().any(|n| claim.typ.eq_ignore_ascii_case(n))
                || declared.is_some_and(|d| claim.typ.eq_ignore_ascii_case(d))
        };
        let roles = wire
            .claims
            .iter()
            .filter(|c| is(c, ROLE_CLAIMS, wire.role_typ.as_ref()))
            .map(|c| c.val.clone())
            .collect();
        let name = wire
            .claims
            .iter()
            .find(|c| is(c, NAME_CLAIMS, wire.name_typ.as_ref()))
            .map(|c| c.val.clone())
            .or_else(|| name_header.map(str::to_owned))
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty());
        Some(Self { name, roles })
    }
}

/// With roles configured, the caller must hold at least one of them.
pub fn authorize(allowed_roles: &[String], principal: Option<&Principal>) -> Result<(), ApiError> {
    if allowed_roles.is_empty() {
        return Ok(());
    }
    let Some(principal) = principal else {
        return Err(ApiError::CallerForbidden(format!(
            "this function requires an authenticated caller with one of the roles {}, and the \
             request carried no App Service Authentication principal. Nothing was sent to \
             Defender.",
            allowed_roles.join(", ")
        )));
    };
    if principal
        .roles
        .iter()
        .any(|r| allowed_roles.iter().any(|a| a.eq_ignore_ascii_case(r)))
    {
        return Ok(());
    }
    Err(ApiError::CallerForbidden(format!(
        "the caller{} holds none of the roles {}. Nothing was sent to Defender.",
        principal
            .name
            .as_deref()
            .map(|n| format!(" {n}"))
            .unwrap_or_default(),
        allowed_roles.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(json: serde_json::Value) -> String {
        base64::engine::general_purpose::STANDARD.encode(json.to_string())
    }

    #[test]
    fn roles_and_name_are_read_from_the_claims() {
        let header = encode(serde_json::json!({
            "auth_typ": "aad",
            "name_typ": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name",
            "role_typ": "http://schemas.microsoft.com/ws/2008/06/identity/claims/role",
            "claims": [
                {"typ": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name", "val": "alice@contoso.com"},
                {"typ": "roles", "val": "Device.Restrict"},
                {"typ": "http://schemas.microsoft.com/ws/2008/06/identity/claims/role", "val": "Reader"}
            ]
        }));
        let p = Principal::from_headers(Some(&header), None).unwrap();
        assert_eq!(p.name.as_deref(), Some("alice@contoso.com"));
        assert_eq!(p.roles, ["Device.Restrict", "Reader"]);
        assert!(authorize(&["device.restrict".into()], Some(&p)).is_ok());
        assert!(authorize(&["Admin".into()], Some(&p)).is_err());
        assert!(authorize(&[], None).is_ok());
        assert!(authorize(&["Admin".into()], None).is_err());
    }

    #[test]
    fn garbage_is_no_principal() {
        assert_eq!(Principal::from_headers(Some("%%%"), None), None);
        assert_eq!(
            Principal::from_headers(Some(&encode(serde_json::json!([1]))), None),
            None
        );
    }
}
