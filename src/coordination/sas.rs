//! An account SAS derived from an account key.
//!
//! `azure_storage_blob` 1.x authorizes with an Entra token or a SAS in the
//! URL; it has no shared-key signing, and `azure_storage_sas` 1.0 builds only
//! user-delegation SAS (which needs an Entra token to get its key). When the
//! host's connection string carries an account key (Azurite's
//! `UseDevelopmentStorage=true`, or a key-based account outside Azure), we
//! derive an account SAS the way Azure documents it ("Create an account
//! SAS", version 2020-12-06 and later): HMAC-SHA256 with the decoded key over
//! the string to sign, from the maintained RustCrypto `hmac` and `sha2`
//! crates. The SAS is scoped to the blob and queue services, lasts a few hours and is
//! derived again before it expires.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// The signed version; Azurite and Azure both accept it.
const SIGNED_VERSION: &str = "2021-08-06";
/// The blob service (leases, budgets, job records) and the queue service
/// (containment jobs' messages).
const SERVICES: &str = "bq";
/// Service, container and object level (the container is created if missing).
const RESOURCE_TYPES: &str = "sco";
/// Read, write, delete, list, add, create: leases and conditional writes;
/// update and process: the queue's messages.
const PERMISSIONS: &str = "rwdlacup";

/// A SAS query string (without `?`), valid from `start` to `expiry`.
pub fn account_sas(
    account: &str,
    key: &[u8],
    start: OffsetDateTime,
    expiry: OffsetDateTime,
) -> String {
    let start = iso_seconds(start);
    let expiry = iso_seconds(expiry);
    // The fields in the documented order; signed IP, protocol and encryption
    // scope are empty, and the string ends with a newline.
    let to_sign = format!(
        "{account}\n{PERMISSIONS}\n{SERVICES}\n{RESOURCE_TYPES}\n{start}\n{expiry}\n\n\n{SIGNED_VERSION}\n\n"
    );
    let signature = sign(key, &to_sign);
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query
        .append_pair("sv", SIGNED_VERSION)
        .append_pair("ss", SERVICES)
        .append_pair("srt", RESOURCE_TYPES)
        .append_pair("sp", PERMISSIONS)
        .append_pair("st", &start)
        .append_pair("se", &expiry)
        .append_pair("sig", &signature);
    query.finish()
}

fn sign(key: &[u8], to_sign: &str) -> String {
    // HMAC accepts keys of any length: `new_from_slice` does not fail for it.
    let mac = Hmac::<Sha256>::new_from_slice(key).map(|mut mac| {
        mac.update(to_sign.as_bytes());
        mac.finalize().into_bytes()
    });
    match mac {
        Ok(bytes) => base64::engine::general_purpose::STANDARD.encode(bytes),
        Err(_) => String::new(),
    }
}

/// `YYYY-MM-DDThh:mm:ssZ`: the SAS format has no fractional seconds.
fn iso_seconds(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_documented_string() {
        let start = time::macros::datetime!(2026-12-01 02:00:00.5 UTC);
        let expiry = time::macros::datetime!(2026-12-01 08:00:00 UTC);
        let sas = account_sas("acct", b"key", start, expiry);
        let pairs: std::collections::HashMap<String, String> =
            url::form_urlencoded::parse(sas.as_bytes())
                .into_owned()
                .collect();
        assert_eq!(pairs["st"], "2026-12-01T02:00:00Z");
        assert_eq!(pairs["se"], "2026-12-01T08:00:00Z");
        assert_eq!(pairs["sp"], "rwdlacup");
        assert_eq!(pairs["ss"], "bq");
        // Computed independently (Python hmac/hashlib) over
        // "acct\nrwdlacup\nbq\nsco\n<st>\n<se>\n\n\n2021-08-06\n\n"; Azurite
        // accepting our SAS is the end-to-end check (tests/coordination).
        assert_eq!(pairs["sig"], "10jTlMJAk5mgIwawJifCW8QacOQ/2cqZq8UFmZpP3ww=");
    }
}
