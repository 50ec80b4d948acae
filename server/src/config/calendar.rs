//! Calendar filters of a `dates` generator: which of its dates exist as data.
//! `windows: ["10-20..06-20"]` keeps month-day ranges within each year (a
//! range may wrap the year end), `weekdays: [mon, …]` keeps those days of the
//! week, `except: [2020-03-12..2020-07-29, 2021-12-25]` drops single dates and
//! inclusive ranges. All optional, combined with AND; the generator's `step`
//! applies first.
//!
//! Pure: [`Calendar::admits`] decides one date from the filters alone.
//! Invariant: an empty filter admits every date, so a `dates` generator
//! without filters expands exactly as before they existed.

use std::fmt;
use std::str::FromStr;

use chrono::{Datelike, NaiveDate, Weekday};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::scalars::{excerpt, from_text};
use crate::template::parse_iso_date;

/// A day of the year as month and day, ordered through the year.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MonthDay {
    /// 1-12.
    pub month: u32,
    /// 1-31, at most the month's length in a leap year (so `02-29` is one).
    pub day: u32,
}

impl MonthDay {
    /// The month-day of `date`.
    pub fn of(date: NaiveDate) -> Self {
        MonthDay {
            month: date.month(),
            day: date.day(),
        }
    }
}

impl FromStr for MonthDay {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid month-day `{}`: expected MM-DD", excerpt(s));
        let (m, d) = s.split_once('-').ok_or_else(bad)?;
        if m.len() != 2 || d.len() != 2 {
            return Err(bad());
        }
        let month: u32 = m.parse().map_err(|_| bad())?;
        let day: u32 = d.parse().map_err(|_| bad())?;
        // 2000 is a leap year: every month-day that exists in some year.
        if NaiveDate::from_ymd_opt(2000, month, day).is_none() {
            return Err(format!(
                "invalid month-day `{}`: no such day in any year",
                excerpt(s)
            ));
        }
        Ok(MonthDay { month, day })
    }
}

impl fmt::Display for MonthDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}-{:02}", self.month, self.day)
    }
}

/// `MM-DD..MM-DD`: an inclusive range of days within each year; when the
/// start comes after the end in the year (`10-20..06-20`) it wraps the year
/// end. A single `MM-DD` is a one-day window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct YearWindow {
    /// The first day.
    pub start: MonthDay,
    /// The last day (inclusive).
    pub end: MonthDay,
}

impl YearWindow {
    /// Whether `date` falls inside the window in its year.
    pub fn contains(&self, date: NaiveDate) -> bool {
        let md = MonthDay::of(date);
        if self.start <= self.end {
            self.start <= md && md <= self.end
        } else {
            md >= self.start || md <= self.end
        }
    }
}

impl FromStr for YearWindow {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once("..") {
            Some((a, b)) => Ok(YearWindow {
                start: a.trim().parse()?,
                end: b.trim().parse()?,
            }),
            None => {
                let day: MonthDay = s.trim().parse()?;
                Ok(YearWindow {
                    start: day,
                    end: day,
                })
            }
        }
    }
}

impl fmt::Display for YearWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}..{}", self.start, self.end)
        }
    }
}

/// A day of the week, written `mon` … `sun` (or in full, `monday` …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeekdayName(pub Weekday);

impl FromStr for WeekdayName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let day = match s.to_ascii_lowercase().as_str() {
            "mon" | "monday" => Weekday::Mon,
            "tue" | "tuesday" => Weekday::Tue,
            "wed" | "wednesday" => Weekday::Wed,
            "thu" | "thursday" => Weekday::Thu,
            "fri" | "friday" => Weekday::Fri,
            "sat" | "saturday" => Weekday::Sat,
            "sun" | "sunday" => Weekday::Sun,
            _ => {
                return Err(format!(
                    "invalid weekday `{}`: expected one of mon, tue, wed, thu, fri, sat, sun",
                    excerpt(s)
                ));
            }
        };
        Ok(WeekdayName(day))
    }
}

impl fmt::Display for WeekdayName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            Weekday::Mon => "mon",
            Weekday::Tue => "tue",
            Weekday::Wed => "wed",
            Weekday::Thu => "thu",
            Weekday::Fri => "fri",
            Weekday::Sat => "sat",
            Weekday::Sun => "sun",
        };
        f.write_str(name)
    }
}

/// `YYYY-MM-DD` or `YYYY-MM-DD..YYYY-MM-DD`: one date or an inclusive range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateSpan {
    /// The first date.
    pub start: NaiveDate,
    /// The last date (inclusive; equal to `start` for one date).
    pub end: NaiveDate,
}

impl DateSpan {
    /// Whether `date` is inside the span.
    pub fn contains(&self, date: NaiveDate) -> bool {
        self.start <= date && date <= self.end
    }
}

impl FromStr for DateSpan {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let date = |t: &str| {
            parse_iso_date(t.trim()).ok_or_else(|| {
                format!(
                    "invalid date `{}`: expected YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD",
                    excerpt(s)
                )
            })
        };
        let (start, end) = match s.split_once("..") {
            Some((a, b)) => (date(a)?, date(b)?),
            None => {
                let d = date(s)?;
                (d, d)
            }
        };
        if end < start {
            return Err(format!(
                "invalid range `{}`: {end} precedes {start}",
                excerpt(s)
            ));
        }
        Ok(DateSpan { start, end })
    }
}

impl fmt::Display for DateSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start.format("%Y-%m-%d"))
        } else {
            write!(
                f,
                "{}..{}",
                self.start.format("%Y-%m-%d"),
                self.end.format("%Y-%m-%d")
            )
        }
    }
}

/// Text-form serde for the filter values: each is written and read as its
/// string form, with errors naming what was expected.
macro_rules! text_serde {
    ($t:ty, $what:literal) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                from_text(d, $what)
            }
        }
    };
}

text_serde!(YearWindow, "a month-day range (MM-DD..MM-DD)");
text_serde!(WeekdayName, "a weekday (mon … sun)");
text_serde!(DateSpan, "a date or a date range (YYYY-MM-DD..YYYY-MM-DD)");

/// The filters of one `dates` generator, borrowed from its config.
#[derive(Debug, Clone, Copy)]
pub struct Calendar<'a> {
    /// Month-day windows; empty: every day of the year.
    pub windows: &'a [YearWindow],
    /// Days of the week; empty: every day.
    pub weekdays: &'a [WeekdayName],
    /// Dates and ranges left out.
    pub except: &'a [DateSpan],
}

impl Calendar<'_> {
    /// Whether `date` passes every filter: inside some window (if any),
    /// on one of the weekdays (if any), and in no exception.
    pub fn admits(&self, date: NaiveDate) -> bool {
        (self.windows.is_empty() || self.windows.iter().any(|w| w.contains(date)))
            && (self.weekdays.is_empty() || self.weekdays.iter().any(|w| w.0 == date.weekday()))
            && !self.except.iter().any(|e| e.contains(date))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn date(s: &str) -> NaiveDate {
        parse_iso_date(s).unwrap()
    }

    #[test]
    fn filter_values_parse_and_print_back() {
        for text in ["10-20..06-20", "01-01..12-31", "02-29", "03-01..03-31"] {
            assert_eq!(text.parse::<YearWindow>().unwrap().to_string(), text);
        }
        for text in ["2020-03-12..2020-07-29", "2021-12-25"] {
            assert_eq!(text.parse::<DateSpan>().unwrap().to_string(), text);
        }
        assert_eq!("Sat".parse::<WeekdayName>().unwrap().to_string(), "sat");
        assert_eq!("wednesday".parse::<WeekdayName>().unwrap().0, Weekday::Wed);
    }

    #[test]
    fn bad_filter_values_say_what_was_expected() {
        for (text, words) in [
            ("13-01..06-20", "no such day"),
            ("02-30", "no such day"),
            ("10-2..06-20", "expected MM-DD"),
            ("october", "expected MM-DD"),
        ] {
            let err = text.parse::<YearWindow>().unwrap_err();
            assert!(err.contains(words), "{text}: {err}");
        }
        let err = "2020-07-29..2020-03-12".parse::<DateSpan>().unwrap_err();
        assert!(err.contains("precedes"), "{err}");
        let err = "2020-3-12".parse::<DateSpan>().unwrap_err();
        assert!(err.contains("YYYY-MM-DD"), "{err}");
        let err = "mo".parse::<WeekdayName>().unwrap_err();
        assert!(err.contains("mon, tue"), "{err}");
    }

    #[test]
    fn a_window_may_wrap_the_year_end() {
        let season: YearWindow = "10-20..06-20".parse().unwrap();
        for inside in ["2024-10-20", "2024-12-31", "2025-01-01", "2025-06-20"] {
            assert!(season.contains(date(inside)), "{inside}");
        }
        for outside in ["2024-10-19", "2025-06-21", "2025-08-01"] {
            assert!(!season.contains(date(outside)), "{outside}");
        }
        let leap: YearWindow = "02-29".parse().unwrap();
        assert!(leap.contains(date("2024-02-29")));
        assert!(!leap.contains(date("2024-02-28")));
    }

    proptest! {
        /// The filters agree with a direct reading of their definition, for
        /// any date and any window, weekday set and exception.
        #[test]
        fn admits_is_the_and_of_the_filters(
            day in 0i64..20_000,
            wa in (1u32..=12, 1u32..=28),
            wb in (1u32..=12, 1u32..=28),
            days in prop::collection::vec(0u8..7, 0..3),
            except in prop::option::of((0i64..20_000, 0i64..60)),
            use_window in any::<bool>(),
        ) {
            let d = date("1990-01-01") + chrono::Duration::days(day);
            let windows: Vec<YearWindow> = if use_window {
                vec![YearWindow {
                    start: MonthDay { month: wa.0, day: wa.1 },
                    end: MonthDay { month: wb.0, day: wb.1 },
                }]
            } else {
                Vec::new()
            };
            let weekdays: Vec<WeekdayName> = days
                .iter()
                .map(|n| WeekdayName(Weekday::try_from(*n).unwrap()))
                .collect();
            let except: Vec<DateSpan> = except
                .map(|(s, len)| {
                    let start = date("1990-01-01") + chrono::Duration::days(s);
                    DateSpan { start, end: start + chrono::Duration::days(len) }
                })
                .into_iter()
                .collect();
            let calendar = Calendar { windows: &windows, weekdays: &weekdays, except: &except };
            // The window, read as "the days from start to end, going forward
            // through the calendar year": start ≤ d ≤ end, or around the end.
            let md = (d.month(), d.day());
            let in_window = windows.iter().all(|w| {
                let (s, e) = ((w.start.month, w.start.day), (w.end.month, w.end.day));
                if s <= e { s <= md && md <= e } else { !(e < md && md < s) }
            });
            let on_day = weekdays.is_empty() || weekdays.iter().any(|w| w.0 == d.weekday());
            let excepted = except.iter().any(|e| e.start <= d && d <= e.end);
            prop_assert_eq!(calendar.admits(d), in_window && on_day && !excepted);
        }
    }
}
