//! Wire types of the Defender for Endpoint API, shared by the client and the simulator.
//!
//! Only the fields this service reasons about are typed; everything else the API
//! returns is kept in `extra`, so a record round-trips unchanged (the simulator
//! serves the same types the client reads).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// A machine record (`GET /api/machines`, `GET /api/machines/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    pub id: String,
    #[serde(default)]
    pub computer_dns_name: Option<String>,
    #[serde(default)]
    pub aad_device_id: Option<String>,
    #[serde(default)]
    pub health_status: Option<String>,
    /// Time of the last full device report (RFC 3339), roughly daily.
    #[serde(default)]
    pub last_seen: Option<String>,
    #[serde(default)]
    pub os_platform: Option<String>,
    #[serde(default)]
    pub onboarding_status: Option<String>,
    /// Undocumented but returned by the live API: set on a record that was merged
    /// into another one (re-onboarding, reimaging).
    #[serde(default)]
    pub merged_into_machine_id: Option<String>,
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

    /// The last path segment of the endpoint that creates this action.
    pub fn endpoint(self) -> &'static str {
        match self {
            Self::RestrictCodeExecution => "restrictCodeExecution",
            Self::UnrestrictCodeExecution => "unrestrictCodeExecution",
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
    /// The status named by Defender's string, if it is one we know.
    pub fn parse(value: &str) -> Option<Self> {
        serde_json::from_value(Value::String(value.to_owned())).ok()
    }

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

/// A machine action (`POST .../restrictCodeExecution`, `GET /api/machineactions`).
///
/// `type` and `status` are kept as strings here so that an action type this
/// service does not know (Isolate, RunAntiVirusScan, ...) still deserializes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineAction {
    pub id: String,
    #[serde(rename = "type")]
    pub action_type: String,
    pub status: String,
    #[serde(default)]
    pub machine_id: Option<String>,
    #[serde(default)]
    pub computer_dns_name: Option<String>,
    #[serde(default)]
    pub requestor: Option<String>,
    #[serde(default)]
    pub requestor_comment: Option<String>,
    #[serde(default)]
    pub creation_date_time_utc: Option<String>,
    #[serde(default)]
    pub last_update_date_time_utc: Option<String>,
    #[serde(flatten)]
    pub extra: OtherFields,
}

impl MachineAction {
    pub fn typed_status(&self) -> Option<ActionStatus> {
        serde_json::from_value(Value::String(self.status.clone())).ok()
    }

    pub fn typed_type(&self) -> Option<ActionType> {
        serde_json::from_value(Value::String(self.action_type.clone())).ok()
    }
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
        assert_eq!(action.action_type, "Isolate");
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
}
