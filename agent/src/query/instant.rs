//! Parsing the instants and durations operators type: abuse reports come in many formats.

use chrono::{DateTime, FixedOffset, LocalResult, NaiveDateTime, TimeZone, Utc};

/// Errors of parsing a time or a zone.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimeError {
    /// Not one of the accepted forms.
    #[error(
        "cannot read time {0:?}: use RFC 3339 with an offset (2014-09-05T10:06:49+01:00), epoch seconds (1409907909), or 'YYYY-MM-DD HH:MM:SS' with --tz"
    )]
    Format(String),
    /// Unknown zone name or offset.
    #[error(
        "unknown time zone {0:?}: use an IANA name (Europe/Berlin), UTC, or an offset (+01:00)"
    )]
    Zone(String),
    /// A local time that does not exist or exists twice in that zone.
    #[error("local time {time} is {what} in {zone}; give an explicit offset instead")]
    Local {
        /// The time given.
        time: String,
        /// The zone.
        zone: String,
        /// "skipped (DST gap)" or "ambiguous (DST overlap)".
        what: &'static str,
    },
    /// A duration that humantime does not accept.
    #[error("cannot read duration {0:?}: use forms like 10s, 2m, 1h30m")]
    Duration(String),
}

/// A zone for local times: IANA or fixed offset.
#[derive(Debug, Clone)]
pub enum Zone {
    /// IANA zone (DST-aware).
    Named(chrono_tz::Tz),
    /// Fixed offset.
    Fixed(FixedOffset),
}

impl Zone {
    /// Parses "UTC", an IANA name or an offset like +01:00 / -0500.
    pub fn parse(s: &str) -> Result<Zone, TimeError> {
        let t = s.trim();
        if let Ok(tz) = t.parse::<chrono_tz::Tz>() {
            return Ok(Zone::Named(tz));
        }
        let probe = format!("2000-01-01T00:00:00{t}");
        if let Ok(dt) = DateTime::parse_from_rfc3339(&probe) {
            return Ok(Zone::Fixed(*dt.offset()));
        }
        if let Ok(dt) =
            DateTime::parse_from_str(&format!("2000-01-01 00:00:00 {t}"), "%Y-%m-%d %H:%M:%S %z")
        {
            return Ok(Zone::Fixed(*dt.offset()));
        }
        Err(TimeError::Zone(s.to_string()))
    }

    fn localize(&self, naive: NaiveDateTime, original: &str) -> Result<DateTime<Utc>, TimeError> {
        let (res, name) = match self {
            Zone::Named(tz) => (
                tz.from_local_datetime(&naive)
                    .map(|d| d.with_timezone(&Utc)),
                tz.name().to_string(),
            ),
            Zone::Fixed(off) => (
                off.from_local_datetime(&naive)
                    .map(|d| d.with_timezone(&Utc)),
                off.to_string(),
            ),
        };
        match res {
            LocalResult::Single(d) => Ok(d),
            LocalResult::None => Err(TimeError::Local {
                time: original.to_string(),
                zone: name,
                what: "skipped (DST gap)",
            }),
            LocalResult::Ambiguous(..) => Err(TimeError::Local {
                time: original.to_string(),
                zone: name,
                what: "ambiguous (DST overlap)",
            }),
        }
    }
}

/// Parses an instant: RFC 3339 with offset, epoch seconds (fractions allowed), or a local
/// `YYYY-MM-DD HH:MM:SS[.frac]` (also with `T`) read in `zone` (UTC when none).
pub fn parse_instant(s: &str, zone: Option<&Zone>) -> Result<DateTime<Utc>, TimeError> {
    let t = s.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Ok(d.with_timezone(&Utc));
    }
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = t.parse().map_err(|_| TimeError::Format(s.to_string()))?;
        let whole = secs.trunc() as i64;
        let nanos = ((secs - secs.trunc()) * 1e9).round() as u32;
        return DateTime::from_timestamp(whole, nanos.min(999_999_999))
            .ok_or_else(|| TimeError::Format(s.to_string()));
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(t, fmt) {
            return match zone {
                Some(z) => z.localize(naive, s),
                None => Ok(naive.and_utc()),
            };
        }
    }
    Err(TimeError::Format(s.to_string()))
}

/// Parses a duration such as `10s` or `1m30s`; a bare number means seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, TimeError> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(secs));
    }
    humantime::parse_duration(t).map_err(|_| TimeError::Duration(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn accepted_forms() {
        let want = utc("2014-09-05T09:06:49Z");
        assert_eq!(
            parse_instant("2014-09-05T10:06:49+01:00", None).unwrap(),
            want
        );
        assert_eq!(parse_instant("1409908009", None).unwrap(), want);
        assert_eq!(parse_instant("2014-09-05 09:06:49", None).unwrap(), want);
        let berlin = Zone::parse("Europe/Berlin").unwrap();
        assert_eq!(
            parse_instant("2014-09-05 11:06:49", Some(&berlin)).unwrap(),
            want
        );
        let plus1 = Zone::parse("+01:00").unwrap();
        assert_eq!(
            parse_instant("2014-09-05 10:06:49", Some(&plus1)).unwrap(),
            want
        );
        assert_eq!(
            parse_instant("1409908009.25", None).unwrap(),
            want + chrono::Duration::milliseconds(250)
        );
    }

    #[test]
    fn refusals_are_explained() {
        assert!(matches!(
            parse_instant("yesterday", None),
            Err(TimeError::Format(_))
        ));
        assert!(matches!(
            Zone::parse("Mars/Olympus"),
            Err(TimeError::Zone(_))
        ));
        let berlin = Zone::parse("Europe/Berlin").unwrap();
        let e = parse_instant("2021-10-31 02:30:00", Some(&berlin)).unwrap_err();
        assert!(e.to_string().contains("ambiguous"), "{e}");
        let e = parse_instant("2021-03-28 02:30:00", Some(&berlin)).unwrap_err();
        assert!(e.to_string().contains("skipped"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap().as_secs(), 10);
        assert_eq!(parse_duration("2m").unwrap().as_secs(), 120);
        assert_eq!(parse_duration("7").unwrap().as_secs(), 7);
        assert!(parse_duration("soon").is_err());
    }
}
