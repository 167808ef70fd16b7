//! The Defender API calls this service makes, in one list.
//!
//! Each [`Endpoint`] knows its method, its path (built by the client, parsed
//! by the simulator and the benchmark), its rate-limit bucket, whether a call
//! that failed without a clear answer may still have acted on the device, and
//! how an error message names it. Defender limits each endpoint separately
//! (restrict and unrestrict are two), so the endpoint is also the key of
//! every rate budget.

use http::Method;

use super::models::ActionType;

/// A path segment that holds the machine or action id.
const ID: &str = "{id}";

/// A Defender endpoint this service calls; each has its own rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    ListMachines,
    GetMachine,
    ListActions,
    GetAction,
    Restrict,
    Unrestrict,
    Cancel,
    /// Add or remove one tag on one machine.
    TagMachine,
    /// Add or remove one tag on up to 500 machines.
    TagMachines,
}

impl Endpoint {
    /// Every endpoint, in the order above.
    pub const ALL: [Self; 9] = [
        Self::ListMachines,
        Self::GetMachine,
        Self::ListActions,
        Self::GetAction,
        Self::Restrict,
        Self::Unrestrict,
        Self::Cancel,
        Self::TagMachine,
        Self::TagMachines,
    ];

    /// The endpoint that creates `action` on a machine.
    pub fn create(action: ActionType) -> Self {
        match action {
            ActionType::RestrictCodeExecution => Self::Restrict,
            ActionType::UnrestrictCodeExecution => Self::Unrestrict,
        }
    }

    /// The action a `POST` to this endpoint creates, if it creates one.
    pub fn creates(self) -> Option<ActionType> {
        match self {
            Self::Restrict => Some(ActionType::RestrictCodeExecution),
            Self::Unrestrict => Some(ActionType::UnrestrictCodeExecution),
            _ => None,
        }
    }

    pub fn method(self) -> Method {
        match self {
            Self::ListMachines | Self::GetMachine | Self::ListActions | Self::GetAction => {
                Method::GET
            }
            Self::Restrict
            | Self::Unrestrict
            | Self::Cancel
            | Self::TagMachine
            | Self::TagMachines => Method::POST,
        }
    }

    /// The path below `/api/`, one segment each; [`ID`] stands for the id.
    fn segments(self) -> &'static [&'static str] {
        match self {
            Self::ListMachines => &["machines"],
            Self::GetMachine => &["machines", ID],
            Self::ListActions => &["machineactions"],
            Self::GetAction => &["machineactions", ID],
            Self::Restrict => &["machines", ID, "restrictCodeExecution"],
            Self::Unrestrict => &["machines", ID, "unrestrictCodeExecution"],
            Self::Cancel => &["machineactions", ID, "cancel"],
            Self::TagMachine => &["machines", ID, "tags"],
            Self::TagMachines => &["machines", "AddOrRemoveTagForMultipleMachines"],
        }
    }

    /// Whether the path carries a machine or action id.
    pub fn takes_id(self) -> bool {
        self.segments().contains(&ID)
    }

    /// The path relative to the API root, such as
    /// `api/machines/<id>/restrictCodeExecution`. `id` is ignored by the
    /// endpoints without one (the lists).
    pub fn path(self, id: &str) -> String {
        let segments: Vec<&str> = self
            .segments()
            .iter()
            .map(|&s| if s == ID { id } else { s })
            .collect();
        format!("api/{}", segments.join("/"))
    }

    /// The endpoint a request is for, and its path id percent-decoded (empty
    /// for the lists). `path` is the URL path, `/api/...`; empty segments are
    /// skipped. `None` for anything this service never calls.
    pub fn parse(method: &str, path: &str) -> Option<(Self, String)> {
        let segments: Vec<String> = path
            .strip_prefix("/api")
            .unwrap_or(path)
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect();
        Self::ALL.into_iter().find_map(|endpoint| {
            if endpoint.method().as_str() != method || endpoint.segments().len() != segments.len() {
                return None;
            }
            let mut id = String::new();
            for (&want, have) in endpoint.segments().iter().zip(&segments) {
                if want == ID {
                    id.clone_from(have);
                } else if want != have {
                    return None;
                }
            }
            Some((endpoint, id))
        })
    }

    /// The endpoint's bucket in the budget every instance shares: its blob
    /// is `budget/<bucket>`. Deployed budgets live under these names.
    pub fn bucket(self) -> &'static str {
        match self {
            Self::ListMachines => "list-machines",
            Self::GetMachine => "get-machine",
            Self::ListActions => "list-actions",
            Self::GetAction => "get-action",
            Self::Restrict => "restrict",
            Self::Unrestrict => "unrestrict",
            Self::Cancel => "cancel",
            Self::TagMachine => "machine-tags",
            Self::TagMachines => "machine-tags-bulk",
        }
    }

    /// What the service was doing, for error messages ("while ...").
    pub fn describe(self) -> &'static str {
        match self {
            Self::ListMachines => "listing machines",
            Self::GetMachine => "reading the machine",
            Self::Restrict | Self::Unrestrict => "creating the machine action",
            Self::ListActions => "listing the machine's actions",
            Self::Cancel => "cancelling the pending action",
            Self::GetAction => "reading the machine action",
            Self::TagMachine => "tagging the machine",
            Self::TagMachines => "tagging the machines",
        }
    }

    /// A POST that failed without a clear answer may still have acted.
    pub fn may_have_acted(self) -> bool {
        self.method() == Method::POST
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_built_parses_back_to_its_endpoint_and_id() {
        for endpoint in Endpoint::ALL {
            let path = format!("/{}", endpoint.path("DESKTOP-ALPHA"));
            let id = if endpoint.takes_id() {
                "DESKTOP-ALPHA"
            } else {
                ""
            };
            assert_eq!(
                Endpoint::parse(endpoint.method().as_str(), &path),
                Some((endpoint, id.to_owned())),
                "{path}"
            );
        }
    }

    #[test]
    fn paths_are_defenders() {
        assert_eq!(
            Endpoint::Restrict.path("m1"),
            "api/machines/m1/restrictCodeExecution"
        );
        assert_eq!(Endpoint::Cancel.path("a1"), "api/machineactions/a1/cancel");
        assert_eq!(Endpoint::ListActions.path(""), "api/machineactions");
        assert_eq!(Endpoint::TagMachine.path("m1"), "api/machines/m1/tags");
        assert_eq!(
            Endpoint::TagMachines.path(""),
            "api/machines/AddOrRemoveTagForMultipleMachines"
        );
    }

    #[test]
    fn parsing_decodes_ids_and_skips_empty_segments() {
        assert_eq!(
            Endpoint::parse("GET", "/api/machines/DESKTOP%2DALPHA"),
            Some((Endpoint::GetMachine, "DESKTOP-ALPHA".to_owned()))
        );
        assert_eq!(
            Endpoint::parse("GET", "/api/machines/"),
            Some((Endpoint::ListMachines, String::new()))
        );
        assert_eq!(
            Endpoint::parse("GET", "/api/machineactions/a%20b%zz%4"),
            Some((Endpoint::GetAction, "a b%zz%4".to_owned())),
            "broken escapes stay as they are"
        );
        assert_eq!(
            Endpoint::parse("POST", "/api/machines/%C3%A9+1/restrictCodeExecution"),
            Some((Endpoint::Restrict, "é+1".to_owned())),
            "UTF-8, and + stays a plus in paths"
        );
        for (method, path) in [
            ("DELETE", "/api/machines/abc"),
            ("POST", "/api/machines/abc/isolate"),
            ("GET", "/api/v1.0/machines"),
            ("GET", "/api"),
            ("PUT", "/api/machineactions/x/cancel"),
        ] {
            assert_eq!(Endpoint::parse(method, path), None, "{method} {path}");
        }
    }

    #[test]
    fn bucket_names_stay_what_deployed_budgets_are_stored_under() {
        let buckets = Endpoint::ALL.map(Endpoint::bucket);
        assert_eq!(
            buckets,
            [
                "list-machines",
                "get-machine",
                "list-actions",
                "get-action",
                "restrict",
                "unrestrict",
                "cancel",
                "machine-tags",
                "machine-tags-bulk",
            ]
        );
    }

    #[test]
    fn only_writes_may_have_acted() {
        let writes: Vec<Endpoint> = Endpoint::ALL
            .into_iter()
            .filter(|e| e.may_have_acted())
            .collect();
        assert_eq!(
            writes,
            [
                Endpoint::Restrict,
                Endpoint::Unrestrict,
                Endpoint::Cancel,
                Endpoint::TagMachine,
                Endpoint::TagMachines
            ]
        );
        for action in [
            ActionType::RestrictCodeExecution,
            ActionType::UnrestrictCodeExecution,
        ] {
            assert_eq!(Endpoint::create(action).creates(), Some(action));
        }
    }
}
