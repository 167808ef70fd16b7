//! Times Defender sends (`creationDateTimeUtc`, `lastUpdateDateTimeUtc`,
//! `lastSeen`): RFC 3339, parsed once when a record is read, and written back
//! as Defender wrote them.
//!
//! Defender writes UTC with seven fractional digits
//! (`2026-12-01T09:59:58.5000000Z`, see the `MachineAction` examples on
//! learn.microsoft.com). A [`Timestamp`] keeps the instant and that shape (how
//! many fractional digits, `Z` or a numeric offset), not the text: the fleet
//! view holds two of them for each of tens of thousands of actions, and the
//! instant plus two bytes is smaller than the text and needs no allocation.
//! Every spelling Defender uses is written back byte for byte; another RFC
//! 3339 spelling of the same time (a lower-case `t`, `-00:00`, more than nine
//! fractional digits) is written back in this canonical one.
//!
//! A time that is not RFC 3339 is read as no time ([`lenient`]): one odd field
//! must not fail a whole listing, and an unknown time is what the decisions
//! already make of a missing one.

use std::fmt::{self, Write as _};

use serde::{Deserializer, Serialize, Serializer, de};
use time::{OffsetDateTime, UtcOffset, format_description::well_known::Rfc3339};

/// A time Defender sent: the instant, and how it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    at: OffsetDateTime,
    /// Fractional-second digits written (Defender writes 7).
    digits: u8,
    /// Written with `Z` rather than a numeric offset.
    zulu: bool,
}

/// Fractional digits Defender writes.
const DEFENDER_DIGITS: u8 = 7;

impl Timestamp {
    /// `text` if it is an RFC 3339 time.
    pub fn parse(text: &str) -> Option<Self> {
        let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
        // RFC 3339 fixes the first 19 characters (`YYYY-MM-DDTHH:MM:SS`);
        // a fraction follows them, then the offset.
        let rest = text.get(19..).unwrap_or_default();
        let digits = rest.strip_prefix('.').map_or(0, |fraction| {
            fraction.bytes().take_while(u8::is_ascii_digit).count()
        });
        Some(Self {
            at,
            digits: u8::try_from(digits).unwrap_or(u8::MAX),
            zulu: rest.ends_with(['Z', 'z']),
        })
    }

    /// `at` as Defender writes a time: in UTC, to a tenth of a microsecond
    /// (what the simulator serves).
    pub fn defender_style(at: OffsetDateTime) -> Self {
        let utc = at.to_offset(UtcOffset::UTC);
        let at = utc
            .replace_nanosecond(utc.nanosecond() / 100 * 100)
            .unwrap_or(utc);
        Self {
            at,
            digits: DEFENDER_DIGITS,
            zulu: true,
        }
    }

    /// The instant.
    pub fn at(self) -> OffsetDateTime {
        self.at
    }
}

impl fmt::Display for Timestamp {
    /// The text Defender sent.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.at;
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )?;
        if self.digits > 0 {
            f.write_char('.')?;
            let nanos = t.nanosecond();
            for place in 0..u32::from(self.digits) {
                // Digits past the ninth are below a nanosecond: zeros.
                let digit = 8u32
                    .checked_sub(place)
                    .map_or(0, |shift| nanos / 10u32.pow(shift) % 10);
                f.write_char(char::from_digit(digit, 10).unwrap_or('0'))?;
            }
        }
        let offset = t.offset();
        if self.zulu && offset.is_utc() {
            return f.write_char('Z');
        }
        let sign = if offset.is_negative() { '-' } else { '+' };
        write!(
            f,
            "{sign}{:02}:{:02}",
            offset.whole_hours().unsigned_abs(),
            offset.minutes_past_hour().unsigned_abs()
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Reads an optional time field: absent, `null` or not RFC 3339 is `None`
/// (see the module docs); a value that is not a string fails, as any
/// mistyped field does.
pub fn lenient<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Timestamp>, D::Error> {
    struct Lenient;

    impl<'de> de::Visitor<'de> for Lenient {
        type Value = Option<Timestamp>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an RFC 3339 time or null")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            Ok(Timestamp::parse(text))
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, inner: D) -> Result<Self::Value, D::Error> {
            inner.deserialize_str(self)
        }
    }

    deserializer.deserialize_option(Lenient)
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn defender_times_are_parsed_and_written_back_as_sent() {
        for text in [
            "2026-12-01T09:59:58.5000000Z",
            "2026-12-01T09:59:58.1234567Z",
            "2026-12-01T00:00:00.0000000Z",
            "2026-11-28T10:05:00Z",
            "2026-11-28T10:05:00.5Z",
            "2026-11-28T10:05:00.123456789Z",
            "2026-11-28T10:05:00.1200+01:30",
            "2026-11-28T10:05:00-05:00",
            "2026-11-28T10:05:00+00:00",
        ] {
            let parsed = Timestamp::parse(text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!(parsed.to_string(), text);
            assert_eq!(parsed.at(), OffsetDateTime::parse(text, &Rfc3339).unwrap());
        }
        assert_eq!(
            Timestamp::parse("2026-12-01T09:59:58.5000000Z").map(Timestamp::at),
            Some(datetime!(2026-12-01 09:59:58.5 UTC))
        );
        // Other spellings of a time: the same instant, written canonically.
        let lower = Timestamp::parse("2026-11-28t10:05:00.25z").unwrap();
        assert_eq!(lower.to_string(), "2026-11-28T10:05:00.25Z");
        let long = Timestamp::parse("2026-11-28T10:05:00.1234567891Z").unwrap();
        assert_eq!(long.to_string(), "2026-11-28T10:05:00.1234567890Z");
        for not_a_time in [
            "yesterday",
            "",
            "2026-11-28",
            "2026-11-28T10:05:00",
            "2026-13-01T00:00:00Z",
        ] {
            assert_eq!(Timestamp::parse(not_a_time), None, "{not_a_time}");
        }
    }

    #[test]
    fn a_time_that_does_not_parse_is_read_as_none() {
        #[derive(serde::Deserialize)]
        struct Record {
            #[serde(default, deserialize_with = "lenient")]
            at: Option<Timestamp>,
        }
        let read = |json: serde_json::Value| serde_json::from_value::<Record>(json).map(|r| r.at);
        assert_eq!(read(serde_json::json!({"at": "yesterday"})).unwrap(), None);
        assert_eq!(read(serde_json::json!({"at": null})).unwrap(), None);
        assert_eq!(read(serde_json::json!({})).unwrap(), None);
        assert!(read(serde_json::json!({"at": 5})).is_err());
        let text = r#"{"at": "2026-12-01T09:59:58.5000000Z"}"#;
        let at = serde_json::from_str::<Record>(text).unwrap().at.unwrap();
        assert_eq!(
            serde_json::to_string(&at).unwrap(),
            r#""2026-12-01T09:59:58.5000000Z""#
        );
    }

    #[test]
    fn the_simulator_writes_defender_style() {
        let at = datetime!(2026-12-01 10:00:00.123456789 +02:00);
        let written = Timestamp::defender_style(at);
        assert_eq!(written.to_string(), "2026-12-01T08:00:00.1234567Z");
        assert_eq!(Timestamp::parse(&written.to_string()), Some(written));
    }
}
