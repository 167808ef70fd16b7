//! `releaseAfter`: how long a restrict lasts before this service releases it,
//! parsed once at the edge (the records that carry it out are
//! [`crate::service::expiry`]'s).

use serde_json::Value;
use time::{Duration, OffsetDateTime, format_description::well_known::Rfc3339};

use super::kind;

/// Shortest and longest expiry.
pub const MIN: Duration = Duration::minutes(1);
pub const MAX: Duration = Duration::days(30);

/// `releaseAfter` as asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseAfter {
    /// Release this long after the request.
    After(Duration),
    /// `"none"`: remove the expiry of our restriction.
    Never,
}

impl ReleaseAfter {
    /// An ISO 8601 duration (`PT4H`, `P1D`, `P1DT12H`, `PT90M`, `P2W`) or a
    /// whole number of hours, from one minute to 30 days; or `"none"`.
    /// `Err`: why not, for the 400 that names the field.
    pub fn parse(value: &Value) -> Result<Self, String> {
        let invalid = |reason: String| reason;
        let duration = match value {
            Value::Number(n) => match n.as_u64() {
                Some(hours) if hours <= 24 * 30 => Duration::hours(hours as i64),
                _ => {
                    return Err(invalid(format!(
                        "must be a whole number of hours from 1 to 720, got {n}"
                    )));
                }
            },
            Value::String(s) if s.trim().eq_ignore_ascii_case("none") => return Ok(Self::Never),
            Value::String(s) => iso_duration(s.trim()).ok_or_else(|| {
                invalid(format!(
                    "must be an ISO 8601 duration such as \"PT4H\" or \"P1D\", a whole number of \
                     hours, or \"none\"; got {:?}",
                    s.chars().take(40).collect::<String>()
                ))
            })?,
            other => {
                return Err(invalid(format!(
                    "must be a string (\"PT4H\", \"P1D\", \"none\") or a whole number of hours, \
                     not {}",
                    kind(other)
                )));
            }
        };
        if !(MIN..=MAX).contains(&duration) {
            return Err(invalid(format!(
                "must be between one minute (PT1M) and 30 days (P30D), got {} s",
                duration.whole_seconds()
            )));
        }
        Ok(Self::After(duration))
    }

    /// When the restriction asked for at `now` is released.
    pub fn release_at(self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        match self {
            Self::After(d) => Some(whole_seconds(now + d)),
            Self::Never => None,
        }
    }
}

/// The subset of ISO 8601 durations with fixed lengths: weeks, days, hours,
/// minutes, seconds (whole numbers). Years and months have no fixed length
/// and are refused.
fn iso_duration(text: &str) -> Option<Duration> {
    let rest = text.strip_prefix(['P', 'p'])?;
    if rest.is_empty() {
        return None;
    }
    let (date, time) = match rest.find(['T', 't']) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let mut total = Duration::ZERO;
    let mut any = false;
    let mut take = |part: &str, units: &[(char, i64)]| -> Option<()> {
        let mut number = String::new();
        let mut last = 0usize;
        for c in part.chars() {
            if c.is_ascii_digit() {
                number.push(c);
                continue;
            }
            let position = units.iter().position(|(u, _)| u.eq_ignore_ascii_case(&c))?;
            // Units in order, each once, each with a number.
            if position < last || number.is_empty() || number.len() > 6 {
                return None;
            }
            last = position + 1;
            let n: i64 = number.parse().ok()?;
            total += Duration::seconds(n * units[position].1);
            number.clear();
            any = true;
        }
        number.is_empty().then_some(())
    };
    take(date, &[('W', 7 * 86_400), ('D', 86_400)])?;
    if let Some(time) = time {
        if time.is_empty() {
            return None;
        }
        take(time, &[('H', 3600), ('M', 60), ('S', 1)])?;
    }
    any.then_some(total)
}

/// `t` without its fraction of a second.
fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// `2026-12-05T23:00:00Z`.
pub fn rfc3339(t: OffsetDateTime) -> String {
    whole_seconds(t.to_offset(time::UtcOffset::UTC))
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// The readable marker the comment sent to Defender ends with, so that the
/// portal shows when the restriction is lifted. It decides nothing.
pub fn marker(release_at: OffsetDateTime) -> String {
    format!("[auto-release {}]", rfc3339(release_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn after(v: Value) -> Result<ReleaseAfter, String> {
        ReleaseAfter::parse(&v)
    }

    #[test]
    fn durations_hours_and_none() {
        let d = |v| match after(v).unwrap() {
            ReleaseAfter::After(d) => d.whole_seconds(),
            ReleaseAfter::Never => -1,
        };
        assert_eq!(d(json!("PT4H")), 4 * 3600);
        assert_eq!(d(json!("P1D")), 86_400);
        assert_eq!(d(json!("PT1M")), 60);
        assert_eq!(d(json!("P30D")), 30 * 86_400);
        assert_eq!(d(json!("P1DT12H")), 36 * 3600);
        assert_eq!(d(json!("pt90m")), 90 * 60);
        assert_eq!(d(json!("P2W")), 14 * 86_400);
        assert_eq!(d(json!(6)), 6 * 3600);
        assert_eq!(d(json!("none")), -1);
        assert_eq!(d(json!("None")), -1);
    }

    #[test]
    fn out_of_range_and_malformed_are_refused() {
        for bad in [
            json!("PT59S"),
            json!("P31D"),
            json!(0),
            json!(721),
            json!(-1),
            json!(1.5),
            json!("P1M"),
            json!("P1Y"),
            json!("PT"),
            json!("P"),
            json!("4h"),
            json!("PT4H4H"),
            json!("PT1M4H"),
            json!(""),
            json!(null),
            json!(true),
            json!(["PT1H"]),
        ] {
            assert!(after(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_marker_is_utc_whole_seconds_with_z() {
        let t = OffsetDateTime::parse("2026-12-05T23:00:00.75+01:00", &Rfc3339).unwrap();
        assert_eq!(marker(t), "[auto-release 2026-12-05T22:00:00Z]");
    }
}
