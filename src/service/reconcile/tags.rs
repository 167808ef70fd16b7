//! The restriction as a Defender machine tag (`RESTRICTED_TAG`), so that the
//! portal's device list and advanced hunting answer "which devices are
//! restricted" without asking this service.
//!
//! Which machines are restricted needs the tenant's restrict history (the
//! machine entity has no such property), a full read that costs the more
//! calls the larger the tenant: it runs at most every
//! `TAG_RECONCILE_MINUTES`, whichever instance's run gets there first (a
//! conditional write of the record `reconcile/tags` decides). The machines
//! that carry the tag come from one filtered list
//! (`machineTags/any(tag: tag eq '…')`), never the whole machine list. Then
//! the tag is added where it is missing and removed where the machine is no
//! longer restricted, 500 machines a call. Only that tag value is ever
//! added or removed: a tag a person set in the portal looks the same as one
//! the API set, so every other value is left alone.

use std::collections::{BTreeSet, HashMap};

use time::OffsetDateTime;
use tokio::time::Instant;

use crate::{
    coordination::records::{WriteIf, Written},
    service::{
        expiry::rfc3339,
        fleet::{self, DeviceState},
        jobs::request::odata_string,
    },
};

use super::{Reconciler, RunReport};

/// The record that says when the last full read ran.
const RECORD: &str = "reconcile/tags";
/// Machines one bulk tag call may name.
const BULK: usize = 500;

/// The tag's pass of one run.
pub(super) async fn reconcile(
    reconciler: &Reconciler,
    tag: &str,
    now: OffsetDateTime,
    deadline: Instant,
    report: &mut RunReport,
) {
    // Two action lists (restricts, releases) at least: within this run's share?
    let cap = reconciler.settings().calls_per_run();
    if report.calls.list_actions + 2 > cap {
        return;
    }
    match claim(reconciler, now).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => return report.error(format!("the tag record: {e}")),
    }
    report.tags_read = true;
    if let Err(e) = apply(reconciler, tag, deadline, report).await {
        report.error(format!("the {tag:?} tag: {e}"));
    }
}

/// Whether this run does the full read: the last one is older than
/// `TAG_RECONCILE_MINUTES`, and this run's conditional write of the record
/// won (another instance's run at the same time loses it).
async fn claim(reconciler: &Reconciler, now: OffsetDateTime) -> Result<bool, String> {
    let records = reconciler.records();
    let held = records.read(RECORD).await.map_err(|e| e.to_string())?;
    let condition = match &held {
        None => WriteIf::Absent,
        Some(record) => {
            let last = record
                .metadata
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("at"))
                .and_then(|(_, v)| {
                    OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).ok()
                });
            if last.is_some_and(|last| last + reconciler.settings().tag_every > now) {
                return Ok(false);
            }
            WriteIf::Matches(record.etag.clone())
        }
    };
    let metadata: HashMap<String, String> = [("at".to_owned(), rfc3339(now))].into();
    Ok(matches!(
        records
            .write(RECORD, Vec::new(), metadata, condition)
            .await
            .map_err(|e| e.to_string())?,
        Written::Done(_)
    ))
}

async fn apply(
    reconciler: &Reconciler,
    tag: &str,
    deadline: Instant,
    report: &mut RunReport,
) -> Result<(), String> {
    let client = reconciler.client();
    // Folded page by page: per machine only what decides its state.
    let history = fleet::read::read(client, deadline)
        .await
        .map_err(|e| e.to_string())?;
    report.calls.list_actions += history.calls;
    let restricted: BTreeSet<String> = history
        .fleet
        .machines_in(DeviceState::Restricted)
        .map(|id| id.as_str().to_ascii_lowercase())
        .collect();
    let filter = format!("machineTags/any(tag: tag eq {})", odata_string(tag));
    let tagged_machines = client
        .machines_matching(&filter, deadline)
        .await
        .map_err(|e| e.to_string())?;
    report.calls.list_machines += 1;
    // Only machines that really carry the exact value (the filter's
    // comparison is Defender's; ours is exact).
    let tagged: BTreeSet<String> = tagged_machines
        .iter()
        .filter(|m| carries(m, tag))
        .map(|m| m.id.to_string().to_ascii_lowercase())
        .collect();
    let (add, remove) = differences(&restricted, &tagged);
    for (ids, adding) in [(add, true), (remove, false)] {
        for chunk in ids.chunks(BULK) {
            client
                .tag_machines(tag, adding, chunk, deadline)
                .await
                .map_err(|e| e.to_string())?;
            report.calls.tag += 1;
            if adding {
                report.tags_added += chunk.len();
            } else {
                report.tags_removed += chunk.len();
            }
        }
    }
    Ok(())
}

/// Whether the machine carries the tag value exactly.
fn carries(machine: &crate::defender::models::Machine, tag: &str) -> bool {
    machine
        .extra
        .get("machineTags")
        .and_then(serde_json::Value::as_array)
        .is_some_and(|tags| tags.iter().any(|t| t.as_str() == Some(tag)))
}

/// Machines to tag, and machines to untag.
fn differences(
    restricted: &BTreeSet<String>,
    tagged: &BTreeSet<String>,
) -> (Vec<String>, Vec<String>) {
    (
        restricted.difference(tagged).cloned().collect(),
        tagged.difference(restricted).cloned().collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_the_restricted_untag_the_rest_leave_the_rest() {
        let set = |ids: &[&str]| ids.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
        let (add, remove) = differences(&set(&["a", "b", "c"]), &set(&["b", "d"]));
        assert_eq!(add, vec!["a", "c"]);
        assert_eq!(remove, vec!["d"]);
    }
}
