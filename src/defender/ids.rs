//! Ids Defender hands out, compared and hashed ignoring ASCII case (Defender
//! matches them so: a machine id or action id in any case names the same
//! record), and shown and serialized exactly as Defender sent them.

use std::{
    cmp::Ordering,
    fmt,
    hash::{Hash, Hasher},
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! case_insensitive_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name(String);

        impl $name {
            /// The id as sent.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        /// The text as sent, to read it as a string (`==` between ids
        /// ignores case; between the texts it does not).
        impl std::ops::Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self(id.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                Self(id)
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.0.eq_ignore_ascii_case(&other.0)
            }
        }

        impl Eq for $name {}

        impl Ord for $name {
            /// Orders as the lower-cased ids would.
            fn cmp(&self, other: &Self) -> Ordering {
                let fold = |b: u8| b.to_ascii_lowercase();
                self.0.bytes().map(fold).cmp(other.0.bytes().map(fold))
            }
        }

        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
                Some(self.cmp(other))
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0.eq_ignore_ascii_case(other)
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0.eq_ignore_ascii_case(other)
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                self.0.eq_ignore_ascii_case(other)
            }
        }

        impl Hash for $name {
            /// Hashes the lower-cased bytes, so equal ids hash alike.
            fn hash<H: Hasher>(&self, state: &mut H) {
                for byte in self.0.bytes() {
                    state.write_u8(byte.to_ascii_lowercase());
                }
                state.write_u8(0xff);
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        /// On the wire: the plain string, as sent.
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                String::deserialize(deserializer).map(Self)
            }
        }
    };
}

case_insensitive_id!(
    /// A machine action's id (`MachineAction.id`).
    ActionId
);

case_insensitive_id!(
    /// A machine's id (`Machine.id`, `MachineAction.machineId`).
    MachineId
);

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn ids_differing_in_case_are_one_id_shown_as_sent() {
        let upper = ActionId::from("7F0A-B2");
        let lower = ActionId::from("7f0a-b2");
        assert_eq!(upper, lower);
        assert_ne!(upper, ActionId::from("7f0a-b3"));
        let set: HashSet<ActionId> = [upper.clone(), lower].into_iter().collect();
        assert_eq!(set.len(), 1);
        assert_eq!(upper.to_string(), "7F0A-B2");
        assert_eq!(upper.as_str(), "7F0A-B2");
        let machine = MachineId::from("C5CB89");
        assert!(machine == *"c5cb89");
        assert_eq!(machine.to_string(), "C5CB89");
        // Ordered as the lower-cased ids: "a" < "b" and "_" < "z", although
        // 'B' < 'a' and 'Z' < '_' as bytes.
        let [a, b, underscore, z] = ["a", "B", "_", "Z"].map(MachineId::from);
        assert!(a < b);
        assert!(underscore < z);
    }

    #[test]
    fn ids_read_and_write_the_plain_string_as_sent() {
        let id: ActionId = serde_json::from_value(serde_json::json!("7F0A-b2")).unwrap();
        assert_eq!(id, "7f0a-B2");
        assert_eq!(serde_json::to_value(&id).unwrap(), "7F0A-b2");
        assert!(serde_json::from_value::<MachineId>(serde_json::json!(7)).is_err());
    }
}
