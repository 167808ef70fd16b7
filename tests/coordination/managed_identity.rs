//! The path used in Azure: identity-based `AzureWebJobsStorage__*` settings,
//! Entra tokens from `azure_identity`'s managed identity credential, and
//! storage over https.
//!
//! Azurite runs with a test CA's certificate and `--oauth basic`, which
//! accepts a bearer token whose audience is storage's and whose issuer is
//! Entra's (it checks claims, not signatures). A fake App Service identity
//! endpoint hands out such tokens for the `resource` it is asked for, so a
//! wrong scope would be refused by Azurite.
//!
//! The credential reads `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` from the
//! process environment, which a test may not change (edition 2024 makes
//! `set_var` unsafe, and this crate forbids unsafe code). So the parent test
//! runs the child half, `managed_identity_child`, in a copy of this test
//! binary with that environment.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::Query, http::HeaderMap, routing::get};
use base64::Engine as _;
use restrict_code_execution::coordination::{
    CoordinationError, CoordinationSettings, Coordinator, CoordinatorOptions,
};
use tokio::time::Instant;

use crate::azurite::Azurite;

const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const IDENTITY_HEADER: &str = "fake-identity-header";

/// A test CA and a certificate for 127.0.0.1 signed by it (openssl CLI).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (ca_key, ca, key, csr, cert, ext) = (
        dir.join("ca.key"),
        dir.join("ca.pem"),
        dir.join("key.pem"),
        dir.join("cert.csr"),
        dir.join("cert.pem"),
        dir.join("ext.cnf"),
    );
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\n\
         extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
    )
    .unwrap();
    let openssl = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |v: &str| std::ffi::OsString::from(v);
    openssl(&[
        &s("req"),
        &s("-x509"),
        &s("-newkey"),
        &s("rsa:2048"),
        &s("-nodes"),
        &s("-keyout"),
        ca_key.as_os_str(),
        &s("-out"),
        ca.as_os_str(),
        &s("-days"),
        &s("2"),
        &s("-subj"),
        &s("/CN=coordination test CA"),
    ]);
    openssl(&[
        &s("req"),
        &s("-newkey"),
        &s("rsa:2048"),
        &s("-nodes"),
        &s("-keyout"),
        key.as_os_str(),
        &s("-out"),
        csr.as_os_str(),
        &s("-subj"),
        &s("/CN=127.0.0.1"),
    ]);
    openssl(&[
        &s("x509"),
        &s("-req"),
        &s("-in"),
        csr.as_os_str(),
        &s("-CA"),
        ca.as_os_str(),
        &s("-CAkey"),
        ca_key.as_os_str(),
        &s("-CAcreateserial"),
        &s("-out"),
        cert.as_os_str(),
        &s("-days"),
        &s("2"),
        &s("-extfile"),
        ext.as_os_str(),
    ]);
    (ca, cert, key)
}

/// An unsigned JWT with Entra's claims, which Azurite's basic OAuth accepts.
fn token_for(audience: &str) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!(
        "{}.{}.c2ln",
        b64(serde_json::json!({"alg": "RS256", "typ": "JWT"})),
        b64(serde_json::json!({
            "aud": audience,
            "iss": "https://sts.windows.net/00000000-0000-0000-0000-000000000001/",
            "nbf": now - 60,
            "iat": now - 60,
            "exp": now + 3600,
            "appid": CLIENT_ID,
        }))
    )
}

#[derive(Debug, Clone)]
struct TokenRequest {
    query: Vec<(String, String)>,
    identity_header: Option<String>,
}

/// The App Service identity endpoint; `audience` overrides the token's
/// audience (to prove a wrong one is refused).
async fn identity_endpoint(
    audience: Option<&'static str>,
) -> (String, Arc<Mutex<Vec<TokenRequest>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    let app = Router::new().route(
        "/msi/token",
        get(
            move |Query(query): Query<Vec<(String, String)>>, headers: HeaderMap| {
                let recorded = recorded.clone();
                async move {
                    let resource = query
                        .iter()
                        .find(|(k, _)| k == "resource")
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default();
                    recorded.lock().unwrap().push(TokenRequest {
                        query,
                        identity_header: headers
                            .get("x-identity-header")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned),
                    });
                    let expires = time::OffsetDateTime::now_utc().unix_timestamp() + 3600;
                    Json(serde_json::json!({
                        "access_token": token_for(audience.unwrap_or(&resource)),
                        "expires_on": expires.to_string(),
                        "resource": resource,
                        "token_type": "Bearer",
                    }))
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/msi/token", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

/// Run the child half with the identity environment; true if it passed.
fn run_child(identity_endpoint: &str, blob_uri: &str, ca: &Path, expect: &str) -> bool {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "managed_identity::managed_identity_child",
            "--exact",
            "--include-ignored",
            "--nocapture",
        ])
        .env("IDENTITY_ENDPOINT", identity_endpoint)
        .env("IDENTITY_HEADER", IDENTITY_HEADER)
        .env("COORDINATION_TEST_BLOB_URI", blob_uri)
        .env("COORDINATION_TEST_CA", ca)
        .env("COORDINATION_TEST_EXPECT", expect)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "child output:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_managed_identity_signs_storage_requests_with_entra_tokens_over_https() {
    let dir = std::env::temp_dir().join(format!("coordination-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = certificates(&dir);
    let azurite = Azurite::start_with_options(&[
        "--cert".as_ref(),
        cert.as_os_str(),
        "--key".as_ref(),
        key.as_os_str(),
        "--oauth".as_ref(),
        "basic".as_ref(),
    ]);
    let blob_uri = format!("https://127.0.0.1:{}/devstoreaccount1", azurite.port);

    let (endpoint, seen) = identity_endpoint(None).await;
    let (uri, ca_path, ep) = (blob_uri.clone(), ca.clone(), endpoint.clone());
    let passed = tokio::task::spawn_blocking(move || run_child(&ep, &uri, &ca_path, "works"))
        .await
        .unwrap();
    assert!(
        passed,
        "the child (managed identity against Azurite) failed"
    );
    let requests = seen.lock().unwrap().clone();
    assert!(!requests.is_empty(), "no token was asked for");
    for request in &requests {
        let has = |k: &str, v: &str| request.query.iter().any(|(a, b)| a == k && b == v);
        assert!(has("resource", "https://storage.azure.com"), "{request:?}");
        assert!(has("client_id", CLIENT_ID), "{request:?}");
        assert_eq!(request.identity_header.as_deref(), Some(IDENTITY_HEADER));
    }

    // A token for another audience is refused by storage: fail closed.
    let (endpoint, _) = identity_endpoint(Some("https://management.azure.com")).await;
    let passed =
        tokio::task::spawn_blocking(move || run_child(&endpoint, &blob_uri, &ca, "refused"))
            .await
            .unwrap();
    assert!(
        passed,
        "the child with a wrong-audience token did not fail closed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The child half: only meaningful with the parent's environment, and a
/// no-op without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the_managed_identity_signs_storage_requests_with_entra_tokens_over_https"]
async fn managed_identity_child() {
    let (Ok(blob_uri), Ok(ca), Ok(expect)) = (
        std::env::var("COORDINATION_TEST_BLOB_URI"),
        std::env::var("COORDINATION_TEST_CA"),
        std::env::var("COORDINATION_TEST_EXPECT"),
    ) else {
        return;
    };
    // The settings infra/ deploys, read the way the service reads them.
    let lookup = |name: &str| match name {
        "COORDINATION" => Some("storage".to_owned()),
        "AzureWebJobsStorage__blobServiceUri" => Some(blob_uri.clone()),
        "AzureWebJobsStorage__credential" => Some("managedidentity".to_owned()),
        "AzureWebJobsStorage__clientId" => Some(CLIENT_ID.to_owned()),
        _ => None,
    };
    let CoordinationSettings::Storage(settings) =
        CoordinationSettings::from_lookup(lookup).unwrap()
    else {
        panic!("expected storage")
    };
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let c = Coordinator::new(
        &settings,
        CoordinatorOptions {
            http: Some(http),
            ..Default::default()
        },
    )
    .unwrap();
    let deadline = || Instant::now() + Duration::from_secs(20);
    match expect.as_str() {
        "works" => {
            let lease = c.lock_machine("mi-machine", deadline()).await.unwrap();
            c.reserve_slot("restrict", deadline()).await.unwrap();
            lease.release().await.unwrap();
        }
        _ => {
            let err = c.lock_machine("mi-machine", deadline()).await.unwrap_err();
            let CoordinationError::Unavailable { reason, .. } = &err else {
                panic!("{err}")
            };
            assert!(reason.contains("403"), "{reason}");
            assert!(reason.contains("managed identity"), "{reason}");
            assert!(!reason.contains("eyJ"), "a token in the error: {reason}");
        }
    }
}
