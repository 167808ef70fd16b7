//! Wire types of the Defender for Endpoint API, shared by the client and the simulator.
//!
//! Only the fields this service reasons about are typed, ids as [`MachineId`]
//! and [`ActionId`] and times as [`Timestamp`]; everything else the API
//! returns is kept in `extra`, so a record round-trips unchanged (the simulator
//! serves the same types the client reads). A time that is not RFC 3339 is
//! read as none ([`crate::defender::timestamp`]).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::{
    ids::{ActionId, MachineId},
    timestamp::{Timestamp, lenient},
};

/// A machine record (`GET /api/machines`, `GET /api/machines/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    pub id: MachineId,
    #[serde(default)]
    pub computer_dns_name: Option<String>,
    #[serde(default)]
    pub aad_device_id: Option<String>,
    #[serde(default)]
    pub health_status: Option<String>,
    /// Time of the last full device report, roughly daily.
    #[serde(default, deserialize_with = "lenient")]
    pub last_seen: Option<Timestamp>,
    #[serde(default)]
    pub os_platform: Option<String>,
    #[serde(default)]
    pub onboarding_status: Option<String>,
    /// Undocumented but returned by the live API: set on a record that was merged
    /// into another one (re-onboarding, reimaging).
    #[serde(default)]
    pub merged_into_machine_id: Option<MachineId>,
    #[serde(default)]
    pub is_potential_duplication: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The two machine actions this service creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ActionType {
    RestrictCodeExecution,
    UnrestrictCodeExecution,
}

impl ActionType {
    /// The value Defender uses in `MachineAction.type` and in `$filter`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RestrictCodeExecution => "RestrictCodeExecution",
            Self::UnrestrictCodeExecution => "UnrestrictCodeExecution",
        }
    }

    pub fn opposite(self) -> Self {
        match self {
            Self::RestrictCodeExecution => Self::UnrestrictCodeExecution,
            Self::UnrestrictCodeExecution => Self::RestrictCodeExecution,
        }
    }
}

/// `MachineAction.status`. Note Defender's spelling of `Cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ActionStatus {
    Pending,
    InProgress,
    Succeeded,
    Failed,
    TimeOut,
    Cancelled,
}

impl ActionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::InProgress => "InProgress",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::TimeOut => "TimeOut",
            Self::Cancelled => "Cancelled",
        }
    }

    /// Terminal states never change again. `TimeOut` is terminal too: forgetting
    /// it is a known bug in peer clients.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Pending | Self::InProgress)
    }
}

/// A value Defender names with a fixed string: [`ActionType`], [`ActionStatus`].
pub trait WireName: Copy + PartialEq + 'static {
    /// Every value this service knows.
    const ALL: &'static [Self];

    /// The string Defender uses for it.
    fn as_str(self) -> &'static str;
}

impl WireName for ActionType {
    const ALL: &'static [Self] = &[Self::RestrictCodeExecution, Self::UnrestrictCodeExecution];

    fn as_str(self) -> &'static str {
        ActionType::as_str(self)
    }
}

impl WireName for ActionStatus {
    const ALL: &'static [Self] = &[
        Self::Pending,
        Self::InProgress,
        Self::Succeeded,
        Self::Failed,
        Self::TimeOut,
        Self::Cancelled,
    ];

    fn as_str(self) -> &'static str {
        ActionStatus::as_str(self)
    }
}

/// A `type` or `status` as Defender sent it: one this service knows, or any
/// other string (Isolate, RunAntiVirusScan, a status added later), kept as is
/// so the record still deserializes and serializes back to the same text.
/// Parsed once, when the record is read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OrOther<T> {
    Known(T),
    Other(String),
}

impl<T: WireName> OrOther<T> {
    /// The known value, `None` for one this service does not know.
    pub fn known(&self) -> Option<T> {
        match self {
            Self::Known(value) => Some(*value),
            Self::Other(_) => None,
        }
    }

    /// The string Defender sent.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Known(value) => value.as_str(),
            Self::Other(text) => text,
        }
    }
}

impl<T: WireName> From<T> for OrOther<T> {
    fn from(value: T) -> Self {
        Self::Known(value)
    }
}

impl<T: WireName> From<&str> for OrOther<T> {
    fn from(text: &str) -> Self {
        T::ALL
            .iter()
            .find(|known| known.as_str() == text)
            .map_or_else(|| Self::Other(text.to_owned()), |known| Self::Known(*known))
    }
}

impl<T: WireName> PartialEq<T> for OrOther<T> {
    fn eq(&self, other: &T) -> bool {
        self.known() == Some(*other)
    }
}

impl<T: WireName> PartialEq<&str> for OrOther<T> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl<T: WireName> std::fmt::Display for OrOther<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<T: WireName> Serialize for OrOther<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de, T: WireName> Deserialize<'de> for OrOther<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(Self::from(&*text))
    }
}

/// A machine action (`POST .../restrictCodeExecution`, `GET /api/machineactions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineAction {
    pub id: ActionId,
    #[serde(rename = "type")]
    pub action_type: OrOther<ActionType>,
    pub status: OrOther<ActionStatus>,
    #[serde(default)]
    pub machine_id: Option<MachineId>,
    #[serde(default)]
    pub computer_dns_name: Option<String>,
    #[serde(default)]
    pub requestor: Option<String>,
    #[serde(default)]
    pub requestor_comment: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    pub creation_date_time_utc: Option<Timestamp>,
    #[serde(default, deserialize_with = "lenient")]
    pub last_update_date_time_utc: Option<Timestamp>,
    #[serde(flatten)]
    pub extra: OtherFields,
}

/// The fields of a machine action that are not typed (`scope`, `commands`,
/// `title`, `cancellationComment`, ...), every one Defender sent, kept as the
/// compact JSON object they make rather than as a parsed map: the fleet view
/// holds the tenant's whole restrict history at once, tens of thousands of
/// actions, and a parsed map of a dozen small values takes several times the
/// memory of its text. Serialized back as the same fields and values, keys
/// sorted (as the parsed map wrote them before).
///
/// The text is always written by serde_json from a map, so it always parses
/// back, and equal fields make equal text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OtherFields(Box<str>);

impl OtherFields {
    /// The fields, parsed.
    pub fn to_map(&self) -> Map<String, Value> {
        serde_json::from_str(&self.0).unwrap_or_default()
    }
}

impl Default for OtherFields {
    fn default() -> Self {
        Map::new().into()
    }
}

impl From<Map<String, Value>> for OtherFields {
    fn from(fields: Map<String, Value>) -> Self {
        Self(Value::Object(fields).to_string().into_boxed_str())
    }
}

impl Serialize for OtherFields {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_map().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for OtherFields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Map::deserialize(deserializer).map(Self::from)
    }
}

/// An OData collection page: `{"@odata.context": ..., "value": [...], "@odata.nextLink": ...}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ODataPage<T> {
    #[serde(
        rename = "@odata.context",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub context: Option<String>,
    pub value: Vec<T>,
    #[serde(
        rename = "@odata.nextLink",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub next_link: Option<String>,
}

/// Defender's error envelope: `{"error":{"code","message","target"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
    /// A correlation id for Microsoft support.
    #[serde(default)]
    pub target: Option<String>,
}

/// Body of restrict, unrestrict and cancel. The key is case-sensitive on the
/// Defender side: it must be exactly `Comment`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommentBody {
    #[serde(rename = "Comment")]
    pub comment: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_machine_action_round_trips_every_field_defender_sent() {
        let sent = json!({
            "id": "a1", "type": "Isolate", "status": "Succeeded",
            "machineId": "m1", "computerDnsName": null,
            "title": "Isolate", "scope": "Selective", "commands": [{"k": [1, 2.5, -3]}],
            "errorHResult": -2147467259, "externalId": null, "relatedFileInfo": {"x": "\u{e9}\"\n"},
        });
        let action: MachineAction = serde_json::from_value(sent.clone()).unwrap();
        assert_eq!(action.action_type, OrOther::Other("Isolate".to_owned()));
        assert_eq!(action.status, ActionStatus::Succeeded);
        assert_eq!(action.extra.to_map()["scope"], "Selective");
        assert!(
            action.extra.to_map().get("id").is_none(),
            "typed fields are not kept twice"
        );
        let mut back = serde_json::to_value(&action).unwrap();
        // The optional typed fields Defender did not send come back as null.
        for absent in [
            "requestor",
            "requestorComment",
            "creationDateTimeUtc",
            "lastUpdateDateTimeUtc",
        ] {
            assert_eq!(
                back.as_object_mut().unwrap().remove(absent),
                Some(Value::Null)
            );
        }
        assert_eq!(back, sent);
        let text = serde_json::to_string(&action).unwrap();
        assert_eq!(
            serde_json::from_str::<MachineAction>(&text).unwrap(),
            action
        );
    }

    #[test]
    fn a_time_that_is_not_rfc_3339_is_read_as_none_and_the_listing_still_reads() {
        let page = json!({"value": [
            {"id": "A1", "type": "RestrictCodeExecution", "status": "Succeeded",
             "machineId": "M1", "creationDateTimeUtc": "2026-12-01T09:59:58.5000000Z",
             "lastUpdateDateTimeUtc": "01/12/2026 10:00"},
            {"id": "a2", "type": "RestrictCodeExecution", "status": "Pending",
             "creationDateTimeUtc": "soon", "lastUpdateDateTimeUtc": null},
        ]});
        let page: ODataPage<MachineAction> = serde_json::from_value(page).unwrap();
        let [first, second] = &page.value[..] else {
            panic!("two actions");
        };
        assert_eq!(first.id, "a1");
        assert_eq!(first.machine_id.as_deref(), Some("M1"));
        assert_eq!(
            first
                .creation_date_time_utc
                .map(|t| t.to_string())
                .as_deref(),
            Some("2026-12-01T09:59:58.5000000Z")
        );
        assert_eq!(first.last_update_date_time_utc, None);
        assert_eq!(second.creation_date_time_utc, None);
        // Written back: the time as sent, the unreadable one as null.
        let back = serde_json::to_value(first).unwrap();
        assert_eq!(back["creationDateTimeUtc"], "2026-12-01T09:59:58.5000000Z");
        assert_eq!(back["lastUpdateDateTimeUtc"], Value::Null);
        assert_eq!(back["id"], "A1");
        // A mistyped time still fails the record, as any mistyped field does.
        let mistyped = json!({"id": "a", "type": "Isolate", "status": "Pending", "lastSeen": 5,
                              "creationDateTimeUtc": 5});
        assert!(serde_json::from_value::<MachineAction>(mistyped).is_err());
    }

    #[test]
    fn a_status_or_type_this_service_does_not_know_is_kept_as_sent() {
        let status: OrOther<ActionStatus> = serde_json::from_value(json!("Queued")).unwrap();
        assert_eq!(status, OrOther::Other("Queued".to_owned()));
        assert_eq!(status.known(), None);
        assert_eq!(serde_json::to_value(&status).unwrap(), json!("Queued"));
        for known in ActionStatus::ALL {
            let parsed: OrOther<ActionStatus> =
                serde_json::from_value(json!(known.as_str())).unwrap();
            assert_eq!(parsed.known(), Some(*known));
            assert_eq!(parsed.to_string(), known.as_str());
        }
        // Case matters on the wire: a differently cased value is not ours.
        assert_eq!(
            OrOther::<ActionType>::from("restrictCodeExecution").known(),
            None
        );
    }
}
