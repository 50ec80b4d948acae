//! Task priority: a source's base priority after its rules on partition recency
//! (`priority_rules`: the first matching rule wins), and aging, which raises the
//! effective priority of a task the longer it waits ready, one level per `loop.aging`
//! period up to critical, so that low priorities never starve.
//!
//! Everything here is pure: no I/O and no clock reads; callers pass `today` and `now`.
//!
//! Dispatch order is (effective priority, ready time, id). Since three levels lead from
//! low to critical, a task ready for at least 3 × `aging` is critical, and from then on
//! it outranks every task that became ready after it, whatever that task's priority:
//! only the finitely many tasks ready before it can still go first.

use std::fmt;
use std::time::Duration;

use chrono::NaiveDate;

use crate::config::{Generator, Season, SeasonFormat, SeasonsGenerator, SourceConfig, VarKind};
use crate::model::{Partition, Priority, UnixMs, Value};
use crate::template::parse_iso_date;

/// The most levels aging can add: from low to critical.
pub const MAX_AGING_LEVELS: u32 = 3;

/// Seconds in a day, the unit partition dates differ by.
const DAY_SECS: u64 = 86_400;

/// Why a partition's gaps get their base priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No rule matched: the source's `priority`.
    Base,
    /// A `within` rule matched: the partition is dated within this long of today.
    Within(Duration),
    /// A `current_season` rule matched.
    CurrentSeason,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Base => f.write_str("base"),
            Reason::Within(d) => write!(f, "rule: within {}", Compact(*d)),
            Reason::CurrentSeason => f.write_str("rule: current season"),
        }
    }
}

/// What a rule tests, with the partition variable it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Condition {
    /// The date variable `var` is at most `within` (in whole days) before today, or later.
    Within { var: String, within: Duration },
    /// The season variable `var` is the season containing today.
    CurrentSeason {
        var: String,
        start_month: u32,
        format: SeasonFormat,
    },
}

/// One usable rule.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    condition: Condition,
    priority: Priority,
}

/// A source's base priority and its rules on partition recency, ready to apply.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PriorityRules {
    base: Priority,
    rules: Vec<Rule>,
}

impl PriorityRules {
    /// The rules of `source`. A rule whose variable the source lacks (validation
    /// rejects such configs) never matches.
    pub fn from_source(source: &SourceConfig) -> Self {
        let date_var = source
            .partitions
            .vars()
            .find(|(_, kind)| *kind == VarKind::Date)
            .map(|(name, _)| name.to_owned());
        let seasons: Option<&SeasonsGenerator> = source.partitions.0.iter().find_map(|g| match g {
            Generator::Seasons(s) => Some(s),
            _ => None,
        });
        let rules = source
            .priority_rules
            .iter()
            .filter_map(|rule| {
                let condition = match (rule.within, rule.current_season) {
                    (Some(within), _) => Condition::Within {
                        var: date_var.clone()?,
                        within,
                    },
                    (None, true) => {
                        let s = seasons?;
                        Condition::CurrentSeason {
                            var: s.var.clone(),
                            start_month: s.start_month,
                            format: s.start.format,
                        }
                    }
                    (None, false) => return None,
                };
                Some(Rule {
                    condition,
                    priority: rule.priority,
                })
            })
            .collect();
        PriorityRules {
            base: source.priority,
            rules,
        }
    }

    /// The source's own priority, before rules.
    pub fn base(&self) -> Priority {
        self.base
    }

    /// Whether the source has no usable rules, so every partition gets [`Self::base`].
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The base priority of `partition`'s gaps on `today` after the rules (the first
    /// matching rule wins), with why: "base", "rule: within 3d", "rule: current season".
    /// Whether a partition's priority depends on the date (it has rules).
    pub fn depends_on_date(&self) -> bool {
        !self.rules.is_empty()
    }

    pub fn base_for(&self, partition: &Partition, today: NaiveDate) -> (Priority, Reason) {
        self.rules
            .iter()
            .find_map(|rule| {
                matches(&rule.condition, partition, today).map(|reason| (rule.priority, reason))
            })
            .unwrap_or((self.base, Reason::Base))
    }
}

/// The reason `condition` gives when it holds for `partition` on `today`.
fn matches(condition: &Condition, partition: &Partition, today: NaiveDate) -> Option<Reason> {
    match condition {
        Condition::Within { var, within } => {
            let date = match partition.get(var)? {
                Value::Date(d) => *d,
                Value::Str(s) => parse_iso_date(s)?,
            };
            within_days(date, today, *within).then_some(Reason::Within(*within))
        }
        Condition::CurrentSeason {
            var,
            start_month,
            format,
        } => {
            let Value::Str(label) = partition.get(var)? else {
                return None;
            };
            let current = Season::containing(today, *start_month, *format);
            (*label == current.label()).then_some(Reason::CurrentSeason)
        }
    }
}

/// Whether `date` is at most `within` before `today` in whole days, or after it (the
/// same reading as `refresh.within`).
fn within_days(date: NaiveDate, today: NaiveDate, within: Duration) -> bool {
    match u64::try_from(today.signed_duration_since(date).num_days()) {
        // Dated after today.
        Err(_) => true,
        Ok(days) => Duration::from_secs(days.saturating_mul(DAY_SECS)) <= within,
    }
}

/// How a task's effective priority came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Explanation {
    /// The priority before aging.
    pub base: Priority,
    /// The priority after aging.
    pub effective: Priority,
    /// Levels added by aging (`effective` is `base` raised this many levels).
    pub levels: u32,
    /// How long the task has been ready (zero when its ready time is still ahead).
    pub ready_for: Duration,
    /// The aging period; zero when aging is off.
    pub aging: Duration,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ready = Compact(self.ready_for);
        if self.aging.is_zero() {
            write!(f, "aging off, ready {ready}")
        } else if self.levels > 0 {
            let plural = if self.levels == 1 { "" } else { "s" };
            write!(f, "aged {} level{plural} after {ready} ready", self.levels)
        } else if self.base == Priority::Critical {
            write!(f, "not aged: critical already, ready {ready}")
        } else {
            write!(
                f,
                "not aged: ready {ready}, rises after {}",
                Compact(self.aging)
            )
        }
    }
}

/// The aging period in milliseconds (at least 1), or `None` when aging is off.
fn aging_ms(aging: Duration) -> Option<i64> {
    if aging.is_zero() {
        return None;
    }
    Some(crate::model::duration_ms(aging).max(1))
}

/// Levels from `p` up to critical.
fn headroom(p: Priority) -> u32 {
    u32::try_from(Priority::Critical.as_i64() - p.as_i64()).unwrap_or(0)
}

/// `p` raised by `levels`, capped at critical.
fn raise(p: Priority, levels: u32) -> Priority {
    Priority::from_i64(
        p.as_i64()
            .saturating_add(i64::from(levels))
            .min(Priority::Critical.as_i64()),
    )
}

/// Whole aging periods a task ready since `ready_since` has waited at `now`, and the
/// period, or `None` when aging is off.
fn periods(ready_since: UnixMs, now: UnixMs, aging: Duration) -> Option<(i64, i64)> {
    let period = aging_ms(aging)?;
    let waited = now.saturating_sub(ready_since).max(0);
    Some((waited / period, period))
}

/// The effective priority of a task with base priority `base`, ready since
/// `ready_since`, at `now`: one level higher per whole `aging` period it has been
/// ready, capped at critical, with why ("aged 2 levels after 12h ready"). An `aging`
/// of zero turns aging off.
pub fn effective(
    base: Priority,
    ready_since: UnixMs,
    now: UnixMs,
    aging: Duration,
) -> (Priority, Explanation) {
    let waited_ms = now.saturating_sub(ready_since).max(0);
    let ready_for = Duration::from_millis(u64::try_from(waited_ms).unwrap_or(0));
    let levels = match periods(ready_since, now, aging) {
        None => 0,
        Some((n, _)) => u32::try_from(n.min(i64::from(headroom(base)))).unwrap_or(0),
    };
    let effective = raise(base, levels);
    debug_assert!(effective >= base);
    (
        effective,
        Explanation {
            base,
            effective,
            levels,
            ready_for,
            aging,
        },
    )
}

/// When the effective priority of a task with base priority `base`, ready since
/// `ready_since`, next rises after `now` (the time to re-queue it at), or `None` if it
/// never will: aging is off, the task is critical already, or the time is beyond
/// what `UnixMs` holds.
pub fn next_change(
    base: Priority,
    ready_since: UnixMs,
    now: UnixMs,
    aging: Duration,
) -> Option<UnixMs> {
    let (n, period) = periods(ready_since, now, aging)?;
    if n >= i64::from(headroom(base)) {
        return None;
    }
    let at = ready_since.checked_add(n.checked_add(1)?.checked_mul(period)?)?;
    debug_assert!(at > now);
    Some(at)
}

/// The longest a ready task waits before aging makes it critical, whatever its base
/// priority; `None` when aging is off.
pub fn max_wait_to_critical(aging: Duration) -> Option<Duration> {
    if aging.is_zero() {
        return None;
    }
    aging.checked_mul(MAX_AGING_LEVELS)
}

/// A duration the way config spells it: `3d`, `12h`, `1d 6h`, `90s`, `500ms`.
struct Compact(Duration);

impl fmt::Display for Compact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        if secs == 0 {
            return write!(f, "{}ms", self.0.as_millis());
        }
        let parts = [
            (secs / DAY_SECS, "d"),
            (secs % DAY_SECS / 3600, "h"),
            (secs % 3600 / 60, "m"),
            (secs % 60, "s"),
        ];
        let mut first = true;
        for (n, unit) in parts {
            if n == 0 {
                continue;
            }
            if !first {
                f.write_str(" ")?;
            }
            write!(f, "{n}{unit}")?;
            first = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::path::Path;

    use proptest::prelude::*;

    use super::*;
    use crate::config::Config;
    use crate::model::TaskId;

    const HOUR_MS: i64 = 3_600_000;
    const SIX_HOURS: Duration = Duration::from_secs(6 * 3600);

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    /// The rules of the first source of a config whose `sources:` are `sources`.
    fn rules(sources: &str) -> PriorityRules {
        let src = format!(
            "version: 1\nlake: {{local: {{root: lake}}}}\nscrapers:\n  s: {{command: [sh]}}\nsources:\n{sources}"
        );
        let cfg = Config::parse(&src, Path::new("t.yaml")).unwrap();
        PriorityRules::from_source(&cfg.sources[0])
    }

    fn dated(date: NaiveDate) -> Partition {
        Partition {
            vars: vec![("date".into(), Value::Date(date))],
        }
    }

    fn season(label: &str) -> Partition {
        Partition {
            vars: vec![("season".into(), Value::Str(label.into()))],
        }
    }

    #[test]
    fn first_matching_rule_wins_and_base_applies_otherwise() {
        let r = rules(
            "  - name: a\n    scraper: s\n    priority: low\n    partitions: {dates: {start: 2024-01-01, end: today}}\n    objects: [\"a/{date}\"]\n    priority_rules:\n      - {within: 3d, priority: critical}\n      - {within: 30d, priority: high}\n      - {within: 1d, priority: medium}\n",
        );
        assert_eq!(r.base(), Priority::Low);
        assert!(!r.is_empty());
        let today = d(2024, 10, 22);
        let three = Duration::from_secs(3 * 86_400);
        let thirty = Duration::from_secs(30 * 86_400);
        // Today and three days back match the first rule, even though the third
        // rule (1d) would match too: order decides.
        for day in [22, 21, 19] {
            assert_eq!(
                r.base_for(&dated(d(2024, 10, day)), today),
                (Priority::Critical, Reason::Within(three)),
                "2024-10-{day}"
            );
        }
        // Dates after today count as recent.
        assert_eq!(
            r.base_for(&dated(d(2024, 11, 5)), today).0,
            Priority::Critical
        );
        assert_eq!(
            r.base_for(&dated(d(2024, 10, 18)), today),
            (Priority::High, Reason::Within(thirty))
        );
        assert_eq!(
            r.base_for(&dated(d(2024, 9, 22)), today),
            (Priority::High, Reason::Within(thirty))
        );
        assert_eq!(
            r.base_for(&dated(d(2024, 9, 21)), today),
            (Priority::Low, Reason::Base)
        );
        // A partition without the variable, or with an unparsable one, gets the base.
        assert_eq!(
            r.base_for(&Partition::default(), today),
            (Priority::Low, Reason::Base)
        );
        let text = Partition {
            vars: vec![("date".into(), Value::Str("2024-10-21".into()))],
        };
        assert_eq!(r.base_for(&text, today).0, Priority::Critical);
        let junk = Partition {
            vars: vec![("date".into(), Value::Str("yesterday".into()))],
        };
        assert_eq!(r.base_for(&junk, today).0, Priority::Low);
    }

    #[test]
    fn within_zero_means_today_and_later_only() {
        let r = rules(
            "  - name: a\n    scraper: s\n    partitions: {dates: {var: day, start: 2024-01-01, end: today}}\n    objects: [\"a/{day}\"]\n    priority_rules: [{within: 0s, priority: high}]\n",
        );
        let today = d(2024, 3, 1);
        let on = |date| Partition {
            vars: vec![("day".into(), Value::Date(date))],
        };
        assert_eq!(r.base_for(&on(today), today).0, Priority::High);
        assert_eq!(r.base_for(&on(d(2024, 3, 2)), today).0, Priority::High);
        assert_eq!(r.base_for(&on(d(2024, 2, 29)), today).0, Priority::Medium);
    }

    #[test]
    fn season_rule_matches_the_season_containing_today() {
        let r = rules(
            "  - name: a\n    scraper: s\n    priority: low\n    partitions: {seasons: {start: \"2015-16\", end: current}}\n    objects: [\"a/{season}\"]\n    priority_rules: [{current_season: true, priority: high}]\n",
        );
        // Seasons start in October by default.
        let today = d(2025, 2, 1);
        assert_eq!(
            r.base_for(&season("2024-25"), today),
            (Priority::High, Reason::CurrentSeason)
        );
        assert_eq!(
            r.base_for(&season("2023-24"), today),
            (Priority::Low, Reason::Base)
        );
        assert_eq!(
            r.base_for(&season("2025-26"), d(2025, 10, 1)).0,
            Priority::High
        );
        assert_eq!(
            r.base_for(&season("2024-25"), d(2025, 10, 1)).0,
            Priority::Low
        );

        // Single-year seasons starting in January, crossed with team values.
        let r = rules(
            "  - name: a\n    scraper: s\n    partitions:\n      - values: {var: team, values: [BOS, DEN]}\n      - seasons: {var: yr, start: \"2020\", end: current, start_month: 1}\n    objects: [\"a/{yr}/{team}\"]\n    priority_rules: [{current_season: true, priority: critical}]\n",
        );
        let p = |yr: &str| Partition {
            vars: vec![
                ("team".into(), Value::Str("BOS".into())),
                ("yr".into(), Value::Str(yr.into())),
            ],
        };
        assert_eq!(
            r.base_for(&p("2024"), d(2024, 1, 1)),
            (Priority::Critical, Reason::CurrentSeason)
        );
        assert_eq!(
            r.base_for(&p("2023"), d(2024, 1, 1)),
            (Priority::Medium, Reason::Base)
        );
    }

    #[test]
    fn date_rules_work_on_dependent_sources() {
        let r = rules(
            "  - name: a\n    scraper: s\n    partitions:\n      from_objects: {objects: \"sched/{date:%Y%m%d}.json\", var: game_id, lines: true}\n    objects: [\"pbp/{game_id}.json\"]\n    priority_rules: [{within: 1d, priority: critical}]\n",
        );
        let p = |date: &str| Partition {
            vars: vec![
                ("date".into(), Value::Str(date.into())),
                ("game_id".into(), Value::Str("401".into())),
            ],
        };
        let today = d(2024, 10, 22);
        assert_eq!(
            r.base_for(&p("2024-10-21"), today),
            (
                Priority::Critical,
                Reason::Within(Duration::from_secs(86_400))
            )
        );
        assert_eq!(r.base_for(&p("2024-10-20"), today).0, Priority::Medium);
    }

    #[test]
    fn a_source_without_rules_always_gets_its_priority() {
        let r = rules("  - name: a\n    scraper: s\n    priority: critical\n    objects: [a]\n");
        assert!(r.is_empty());
        assert_eq!(
            r.base_for(&Partition::default(), d(2024, 1, 1)),
            (Priority::Critical, Reason::Base)
        );
    }

    #[test]
    fn reasons_read_like_the_config() {
        assert_eq!(Reason::Base.to_string(), "base");
        assert_eq!(
            Reason::Within(Duration::from_secs(3 * 86_400)).to_string(),
            "rule: within 3d"
        );
        assert_eq!(
            Reason::Within(Duration::from_secs(36 * 3600)).to_string(),
            "rule: within 1d 12h"
        );
        assert_eq!(Reason::CurrentSeason.to_string(), "rule: current season");
    }

    #[test]
    fn aging_raises_one_level_per_period_up_to_critical() {
        let t0 = 1_700_000_000_000;
        let at = |hours: i64| effective(Priority::Low, t0, t0 + hours * HOUR_MS, SIX_HOURS);
        assert_eq!(at(0).0, Priority::Low);
        assert_eq!(
            effective(Priority::Low, t0, t0 + 6 * HOUR_MS - 1, SIX_HOURS).0,
            Priority::Low
        );
        assert_eq!(at(6).0, Priority::Medium);
        assert_eq!(at(12).0, Priority::High);
        assert_eq!(at(18).0, Priority::Critical);
        assert_eq!(at(1000).0, Priority::Critical);
        assert_eq!(at(1000).1.levels, 3);

        assert_eq!(at(12).1.to_string(), "aged 2 levels after 12h ready");
        assert_eq!(at(7).1.to_string(), "aged 1 level after 7h ready");
        assert_eq!(at(2).1.to_string(), "not aged: ready 2h, rises after 6h");
        let (p, why) = effective(Priority::High, t0, t0 + 30 * HOUR_MS, SIX_HOURS);
        assert_eq!((p, why.levels), (Priority::Critical, 1));
        assert_eq!(why.to_string(), "aged 1 level after 1d 6h ready");
        let (p, why) = effective(Priority::Critical, t0, t0 + 30 * HOUR_MS, SIX_HOURS);
        assert_eq!((p, why.levels), (Priority::Critical, 0));
        assert_eq!(why.to_string(), "not aged: critical already, ready 1d 6h");
        // A ready time still ahead counts as not waiting at all.
        let (p, why) = effective(Priority::Low, t0, t0 - HOUR_MS, SIX_HOURS);
        assert_eq!((p, why.ready_for), (Priority::Low, Duration::ZERO));
    }

    #[test]
    fn next_change_is_the_next_period_boundary_until_critical() {
        let t0 = 1_000;
        let six = 6 * HOUR_MS;
        assert_eq!(
            next_change(Priority::Low, t0, t0, SIX_HOURS),
            Some(t0 + six)
        );
        assert_eq!(
            next_change(Priority::Low, t0, t0 + six, SIX_HOURS),
            Some(t0 + 2 * six)
        );
        assert_eq!(
            next_change(Priority::Low, t0, t0 + 2 * six + 5, SIX_HOURS),
            Some(t0 + 3 * six)
        );
        assert_eq!(
            next_change(Priority::Low, t0, t0 + 3 * six, SIX_HOURS),
            None
        );
        assert_eq!(
            next_change(Priority::High, t0, t0 + 1, SIX_HOURS),
            Some(t0 + six)
        );
        assert_eq!(next_change(Priority::Critical, t0, t0, SIX_HOURS), None);
        // Not ready yet: the first change is one period after the ready time.
        assert_eq!(
            next_change(Priority::Medium, t0, t0 - 500, SIX_HOURS),
            Some(t0 + six)
        );
        // Beyond what UnixMs holds: never.
        assert_eq!(
            next_change(Priority::Low, i64::MAX - 10, i64::MAX - 5, SIX_HOURS),
            None
        );
    }

    #[test]
    fn zero_aging_turns_aging_off() {
        let (p, why) = effective(Priority::Low, 0, 365 * 24 * HOUR_MS, Duration::ZERO);
        assert_eq!((p, why.levels), (Priority::Low, 0));
        assert_eq!(why.to_string(), "aging off, ready 365d");
        assert_eq!(next_change(Priority::Low, 0, 0, Duration::ZERO), None);
        assert_eq!(max_wait_to_critical(Duration::ZERO), None);
        assert_eq!(
            max_wait_to_critical(SIX_HOURS),
            Some(Duration::from_secs(18 * 3600))
        );
    }

    #[test]
    fn sub_millisecond_aging_counts_as_one_millisecond() {
        let tiny = Duration::from_micros(10);
        assert_eq!(effective(Priority::Low, 0, 0, tiny).0, Priority::Low);
        assert_eq!(effective(Priority::Low, 0, 1, tiny).0, Priority::Medium);
        assert_eq!(next_change(Priority::Low, 0, 0, tiny), Some(1));
        assert_eq!(
            effective(Priority::Low, 0, 400, tiny).1.to_string(),
            "aged 3 levels after 400ms ready"
        );
    }

    fn any_priority() -> impl Strategy<Value = Priority> {
        prop::sample::select(Priority::ALL.to_vec())
    }

    /// Times within about three centuries of the epoch.
    fn time() -> impl Strategy<Value = i64> {
        -10_000_000_000_000i64..10_000_000_000_000
    }

    /// Aging off, or periods from 1ms to 30 days (short ones often).
    fn aging() -> impl Strategy<Value = Duration> {
        prop_oneof![
            Just(Duration::ZERO),
            (1u64..30 * 86_400_000).prop_map(Duration::from_millis),
            (1u64..1000).prop_map(Duration::from_millis),
        ]
    }

    /// A point in time near `ready` on the scale of `aging`: `k` whole periods after it
    /// (negative: before), then either a fraction `frac` of a period or, with `edge`,
    /// exactly on the boundary or one millisecond either side. Uniformly random times
    /// would almost never land within the three periods where aging happens.
    fn near(ready: UnixMs, aging: Duration, k: i64, frac: f64, edge: Option<i64>) -> UnixMs {
        // Without aging any scale will do; a second keeps the arithmetic the same.
        let period = aging_ms(aging).unwrap_or(1000);
        let within = edge.unwrap_or((frac * period as f64) as i64);
        ready
            .saturating_add(k.saturating_mul(period))
            .saturating_add(within)
    }

    /// Arguments of [`near`] after the ready time and the period.
    fn offset() -> impl Strategy<Value = (i64, f64, Option<i64>)> {
        (-2i64..6, 0.0f64..1.0, prop::option::of(-1i64..=1))
    }

    proptest! {
        /// Effective priority never decreases as time passes, starts at base before one
        /// period, never falls below base, and is base raised by its levels.
        #[test]
        fn effective_is_monotone_and_bounded(
            base in any_priority(),
            ready in time(),
            (k1, f1, e1) in offset(),
            (k2, f2, e2) in offset(),
            far in time(),
            aging in aging(),
        ) {
            let a = near(ready, aging, k1, f1, e1);
            let b = near(ready, aging, k2, f2, e2);
            // Two nearby times, or one nearby and one anywhere.
            let (t1, t2) = if k2 == 5 { (a.min(far), a.max(far)) } else { (a.min(b), a.max(b)) };
            let (p1, e1) = effective(base, ready, t1, aging);
            let (p2, e2) = effective(base, ready, t2, aging);
            prop_assert!(p1 <= p2, "{p1} at {t1} then {p2} at {t2}");
            prop_assert!(p1 >= base);
            prop_assert!(e1.levels <= MAX_AGING_LEVELS && e2.levels <= MAX_AGING_LEVELS);
            prop_assert_eq!(raise(base, e1.levels), p1);
            prop_assert_eq!(e1.effective, p1);
            prop_assert_eq!(e1.base, base);
            let waited = u128::try_from(t1.saturating_sub(ready).max(0)).unwrap_or(0);
            if aging.is_zero() || waited < aging.as_millis().max(1) {
                prop_assert_eq!(p1, base);
                prop_assert_eq!(e1.levels, 0);
            }
            if aging.is_zero() {
                prop_assert_eq!(p2, base);
            }
        }

        /// `next_change` is exactly when the effective priority rises next: it is the
        /// same until then and higher from then on; `None` means it never rises again.
        #[test]
        fn next_change_is_when_priority_rises(
            base in any_priority(),
            ready in time(),
            (k, frac, edge) in offset(),
            aging in aging(),
        ) {
            let now = near(ready, aging, k, frac, edge);
            let (p, _) = effective(base, ready, now, aging);
            match next_change(base, ready, now, aging) {
                Some(at) => {
                    prop_assert!(at > now);
                    prop_assert_eq!(effective(base, ready, at - 1, aging).0, p);
                    prop_assert!(effective(base, ready, at, aging).0 > p);
                }
                None => {
                    let later = now.saturating_add(1_000_000_000_000_000);
                    prop_assert_eq!(effective(base, ready, later, aging).0, p);
                }
            }
        }

        /// No starvation under dispatch order (effective priority, ready time, id): a
        /// task ready for at least 3 × aging is critical, and every task ordered before
        /// it became ready no later than it did (ties broken by id). So once a task has
        /// waited that long, only the finitely many tasks ready before it can go first,
        /// whatever priority later arrivals have; and among such tasks the order is by age.
        #[test]
        fn long_waiters_outrank_every_later_arrival(
            tasks in prop::collection::vec((any_priority(), 0i64..100 * HOUR_MS), 1..60),
            aging_ms in 1i64..20 * HOUR_MS,
            extra in 0i64..50 * HOUR_MS,
        ) {
            let aging = Duration::from_millis(u64::try_from(aging_ms).unwrap());
            let latest = tasks.iter().map(|(_, r)| *r).max().unwrap_or(0);
            let now = latest + extra;
            let bound = i64::try_from(max_wait_to_critical(aging).unwrap().as_millis()).unwrap();
            let mut keyed: Vec<(Reverse<Priority>, UnixMs, TaskId)> = tasks
                .iter()
                .enumerate()
                .map(|(i, (base, ready))| {
                    let (p, _) = effective(*base, *ready, now, aging);
                    (Reverse(p), *ready, TaskId(i64::try_from(i).unwrap()))
                })
                .collect();
            keyed.sort();
            for (pos, (Reverse(p), ready, id)) in keyed.iter().enumerate() {
                if now - ready < bound {
                    continue;
                }
                prop_assert_eq!(*p, Priority::Critical);
                for (_, before_ready, before_id) in &keyed[..pos] {
                    prop_assert!(
                        (before_ready, before_id) < (ready, id),
                        "task {id} ready at {ready} waited {}ms but follows task {before_id} ready at {before_ready}",
                        now - ready
                    );
                }
            }
        }
    }
}
