//! `releaseAfter` on the real handler in local mode: the answer's `releaseAt`
//! and `warning`, the marker at the end of the comment Defender received,
//! moving the expiry without a new action, and the fleet view's `releaseAt`.

use serde_json::{Value, json};

use crate::helpers::{posts, spawn_app};

const AAD: &str = "3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3d";

#[tokio::test]
async fn release_after_sets_release_at_the_marker_and_moves_without_a_new_action() {
    let app = spawn_app().await;

    let first = app
        .restrict(&json!({"deviceId": AAD, "releaseAfter": "PT4H", "comment": "INC-9"}))
        .await;
    assert_eq!(first.status, 201, "{}", first.body);
    let body = first.json();
    let release_at = body["releaseAt"].as_str().expect("releaseAt").to_owned();
    assert!(
        release_at.ends_with('Z') && release_at.len() == 20,
        "{release_at}"
    );
    // Local mode keeps the expiry in memory: the answer says so.
    assert!(
        body["warning"].as_str().unwrap_or("").contains("memory"),
        "{body}"
    );
    let sent = posts(&app);
    assert_eq!(sent.len(), 1);
    let comment: Value = serde_json::from_str(&sent[0].body).unwrap();
    let comment = comment["Comment"].as_str().unwrap();
    assert!(comment.starts_with("INC-9"), "{comment}");
    assert!(
        comment.ends_with(&format!("[auto-release {release_at}]")),
        "{comment}"
    );

    // The same restrict with a new releaseAfter: no new action, a later releaseAt.
    let again = app
        .restrict(&json!({"deviceId": AAD, "releaseAfter": "P1D"}))
        .await;
    let again_body = again.json();
    assert_ne!(again_body["outcome"], "requested", "{again_body}");
    let moved = again_body["releaseAt"].as_str().expect("moved releaseAt");
    assert!(moved > release_at.as_str(), "{moved} after {release_at}");
    assert_eq!(posts(&app).len(), 1, "nothing new was sent");

    // "none" removes it: no releaseAt any more.
    let removed = app
        .restrict(&json!({"deviceId": AAD, "releaseAfter": "none"}))
        .await
        .json();
    assert!(removed.get("releaseAt").is_none(), "{removed}");
    assert_eq!(posts(&app).len(), 1);
}
