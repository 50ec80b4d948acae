//! The timestamps of inventory data files: LastModifiedDate, ISO 8601 in
//! UTC, to ms since the Unix epoch.
//!
//! Invariant: the hand-written parser of the shape AWS writes gives what
//! chrono's RFC 3339 parser gives (a unit test compares them), and any other
//! shape goes through chrono; nothing here panics on any input.

/// Parses an ISO 8601 UTC timestamp to ms since the Unix epoch. The shape AWS
/// writes, `2024-10-22T12:00:00.000Z`, is parsed by hand; anything else goes
/// through chrono's RFC 3339 parser.
pub(super) fn parse_timestamp(field: &[u8]) -> Option<i64> {
    parse_utc_fast(field).or_else(|| {
        let text = std::str::from_utf8(field).ok()?;
        chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|t| t.timestamp_millis())
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, or `None`.
fn parse_utc_fast(f: &[u8]) -> Option<i64> {
    if f.len() < 20 || f.last() != Some(&b'Z') {
        return None;
    }
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        f[range].iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    };
    if f[4] != b'-'
        || f[7] != b'-'
        || !matches!(f[10], b'T' | b't')
        || f[13] != b':'
        || f[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut millis = 0;
    match &f[19..f.len() - 1] {
        [] => {}
        [b'.', fraction @ ..] if !fraction.is_empty() => {
            for (i, &c) in fraction.iter().enumerate() {
                if !c.is_ascii_digit() {
                    return None;
                }
                if i < 3 {
                    millis = millis * 10 + i64::from(c - b'0');
                }
            }
            for _ in fraction.len()..3 {
                millis *= 10;
            }
        }
        _ => return None,
    }
    let days = days_from_civil(year, month, day);
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::T0;
    use super::super::testing::format_timestamp;
    use super::*;

    #[test]
    fn timestamps_parse_like_chrono() {
        for text in [
            "2024-10-22T12:00:00.000Z",
            "2024-10-22T12:00:00Z",
            "2024-02-29T23:59:59.999Z",
            "1970-01-01T00:00:00.000Z",
            "1969-12-31T23:59:59.5Z",
            "2000-03-01T01:02:03.123456Z",
            "2100-12-31T00:00:00.010Z",
        ] {
            let expected = chrono::DateTime::parse_from_rfc3339(text)
                .unwrap()
                .timestamp_millis();
            assert_eq!(parse_utc_fast(text.as_bytes()), Some(expected), "{text}");
        }
        assert_eq!(parse_timestamp(b"2024-10-22T12:00:00.000Z"), Some(T0));
        // Other RFC 3339 shapes go through chrono.
        assert_eq!(parse_timestamp(b"2024-10-22T14:00:00+02:00"), Some(T0));
        for bad in [
            "",
            "2024-10-22",
            "2024-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-10-22T24:00:00Z",
            "2024-10-22T12:00:00.Z",
            "2024-10-22T12:00:00.0x0Z",
            "2024-10-22 12:00:00",
        ] {
            assert_eq!(parse_timestamp(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(format_timestamp(T0), "2024-10-22T12:00:00.000Z");
    }
}
