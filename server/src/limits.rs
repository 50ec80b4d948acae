//! Limit groups: the token buckets and concurrency caps that every start of a
//! task must pass, shared by all agents. This module owns the admission
//! arithmetic only: pure logic, no I/O and no clock reads; every method takes
//! `now` from the caller (the scheduler actor, which integrates it).
//!
//! A task may start only if EVERY group it belongs to has a token (a bucket of
//! capacity `burst`, refilled at `rate`) AND a free concurrency slot
//! (`max_concurrent`). [`LimitGroups::try_acquire`] takes both in all groups or
//! nothing and returns a [`Permit`]; a lease that never started gives its
//! tokens and slots back ([`LimitGroups::refund`]); a finished task frees its
//! slots only ([`LimitGroups::release`]).
//!
//! Adaptive rate: an exit 75 (throttled) halves a group's effective rate, down
//! to [`THROTTLE_FLOOR_DIVISOR`]ths of the configured rate, and empties its
//! bucket. After each [`THROTTLE_COOL_DOWN`] without another throttle the rate
//! grows back by 1/[`RECOVERY_STEP_DIVISOR`] of the configured rate until it
//! is whole again.
//!
//! Arithmetic is exact integer fixed point: a bucket counts tokens in units of
//! 1/[`TOKEN`] token, chosen so that any `N/s`, `N/min` or `N/h` rate at any
//! rate factor accrues a whole number of units per millisecond. Nothing is
//! rounded away between refills, so there is no drift over days, and every
//! product is saturating `u128`, so huge jumps of `now` cannot overflow.
//!
//! Time never runs backwards here: the groups run on a virtual clock that
//! follows `now` forward and stands still while `now` is behind the latest
//! value seen. A backward step of the wall clock therefore adds no tokens and
//! does not stall admission either; elapsed time counts again from the new
//! `now`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{LimitGroup, Rate, RatePeriod};
use crate::model::UnixMs;

/// How long a throttled group keeps its reduced rate before each recovery step.
pub const THROTTLE_COOL_DOWN: Duration = Duration::from_secs(5 * 60);
/// The lowest effective rate is the configured rate divided by this.
pub const THROTTLE_FLOOR_DIVISOR: u32 = 16;
/// Each recovery step adds the configured rate divided by this.
pub const RECOVERY_STEP_DIVISOR: u32 = 4;
/// The burst of a group that sets a rate but no burst.
pub const DEFAULT_BURST: u32 = 1;

/// [`THROTTLE_COOL_DOWN`] in milliseconds.
const COOL_DOWN_MS: UnixMs = THROTTLE_COOL_DOWN.as_millis() as UnixMs;
/// The fixed-point scale of a rate factor: `FACTOR_ONE` is the configured rate.
const FACTOR_ONE: u32 = 1 << 16;
/// The lowest rate factor.
const FACTOR_FLOOR: u32 = FACTOR_ONE / THROTTLE_FLOOR_DIVISOR;
/// What one recovery step adds to the rate factor.
const FACTOR_STEP: u32 = FACTOR_ONE / RECOVERY_STEP_DIVISOR;
/// Milliseconds per hour, the longest rate period; every period divides it.
const HOUR_MS: u128 = 3_600_000;
/// One token in bucket units. A rate of `count` per period at factor `f`
/// accrues `count × (periods per hour) × f` units per millisecond, which is
/// exactly `count × f / FACTOR_ONE` tokens per period.
pub const TOKEN: u128 = HOUR_MS * FACTOR_ONE as u128;

/// What a task took when it was admitted; hand it back through
/// [`LimitGroups::refund`] (never started) or [`LimitGroups::release`]
/// (finished). Opaque to the caller apart from the group names, for logs.
#[must_use = "a permit holds concurrency slots until it is released or refunded"]
#[derive(Debug)]
pub struct Permit {
    groups: Vec<Held>,
}

/// One group's share of a [`Permit`].
#[derive(Debug)]
struct Held {
    /// The group's name, shared with its entry in [`LimitGroups`].
    name: Arc<str>,
    /// Whether a token was taken (false for re-attached tasks and groups
    /// without a rate), so that a refund gives back only what was taken.
    token: bool,
}

impl Permit {
    /// The names of the known groups this permit holds a slot in.
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        self.groups.iter().map(|h| &*h.name)
    }
}

/// One group's state for status and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSnapshot {
    /// The group's name.
    pub name: String,
    /// The configured rate, if the group has one.
    pub rate: Option<Rate>,
    /// The effective rate in starts per second (lower than the configured one
    /// while throttled), if the group has a rate.
    pub effective_per_sec: Option<f64>,
    /// The effective rate as a fraction of the configured one: 1 unless
    /// throttled, never below 1/[`THROTTLE_FLOOR_DIVISOR`].
    pub rate_factor: f64,
    /// The bucket's capacity, if the group has a rate.
    pub burst: Option<u32>,
    /// Tokens in the bucket now (fractional while refilling), if the group has
    /// a rate.
    pub tokens: Option<f64>,
    /// Tasks holding a slot now (may exceed `max_concurrent` after a reload
    /// lowered it, or after re-attaching tasks).
    pub running: u32,
    /// The concurrency cap, if any.
    pub max_concurrent: Option<u32>,
    /// When the effective rate takes its next recovery step, if throttled.
    pub recovers_at: Option<UnixMs>,
}

/// The limits of one group, normalized from its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    /// Sustained starts, if limited.
    rate: Option<Rate>,
    /// The bucket's capacity in tokens; at least 1.
    burst: u32,
    /// Runs at once, if capped.
    max_concurrent: Option<u32>,
}

impl Limits {
    /// No limit at all: what a group removed by a reload keeps while its
    /// running tasks finish.
    const UNLIMITED: Limits = Limits {
        rate: None,
        burst: DEFAULT_BURST,
        max_concurrent: None,
    };

    fn from_config(config: &LimitGroup) -> Self {
        Limits {
            rate: config.rate,
            burst: config.burst.unwrap_or(DEFAULT_BURST).max(1),
            max_concurrent: config.max_concurrent,
        }
    }

    /// The bucket's capacity in units.
    fn capacity(&self) -> u128 {
        u128::from(self.burst) * TOKEN
    }

    /// Units accrued per (virtual) millisecond at `factor`; 0 without a rate.
    fn units_per_ms(&self, factor: u32) -> u128 {
        let Some(rate) = self.rate else { return 0 };
        let periods_per_hour: u128 = match rate.per {
            RatePeriod::Second => 3600,
            RatePeriod::Minute => 60,
            RatePeriod::Hour => 1,
        };
        u128::from(rate.count.max(1)) * periods_per_hour * u128::from(factor)
    }
}

/// One group's live state. Times are virtual (see [`Clock`]).
#[derive(Debug, Clone)]
struct Group {
    name: Arc<str>,
    limits: Limits,
    /// Removed from the config by a reload but still counting running tasks;
    /// dropped when the last one ends.
    retired: bool,
    running: u32,
    /// Tokens in units of 1/[`TOKEN`]; at most `limits.capacity()`.
    tokens: u128,
    /// The virtual time the bucket was last refilled to.
    refilled_at: UnixMs,
    /// The effective rate in units of 1/[`FACTOR_ONE`] of the configured rate.
    factor: u32,
    /// When `factor` takes its next recovery step; `None` at full rate.
    next_step_at: Option<UnixMs>,
}

impl Group {
    fn new(name: Arc<str>, limits: Limits, now: UnixMs) -> Self {
        Group {
            name,
            limits,
            retired: false,
            running: 0,
            tokens: limits.capacity(),
            refilled_at: now,
            factor: FACTOR_ONE,
            next_step_at: None,
        }
    }

    /// Adds what the bucket earned from `refilled_at` to `until` at the
    /// current factor.
    fn accrue_until(&mut self, until: UnixMs) {
        if until <= self.refilled_at {
            return;
        }
        let elapsed = u128::try_from(i128::from(until) - i128::from(self.refilled_at)).unwrap_or(0);
        let earned = elapsed.saturating_mul(self.limits.units_per_ms(self.factor));
        self.tokens = self
            .tokens
            .saturating_add(earned)
            .min(self.limits.capacity());
        self.refilled_at = until;
    }

    /// Raises the factor by one recovery step taken at `at`.
    fn step_up(&mut self, at: UnixMs) {
        self.factor = (self.factor + FACTOR_STEP).min(FACTOR_ONE);
        self.next_step_at = (self.factor < FACTOR_ONE).then(|| at.saturating_add(COOL_DOWN_MS));
    }

    /// Brings the bucket and the recovery schedule up to `now`, accruing each
    /// stretch between recovery steps at the factor it had. The loop runs at
    /// most [`RECOVERY_STEP_DIVISOR`] + 1 times, since every turn raises the
    /// factor or ends the schedule.
    fn advance(&mut self, now: UnixMs) {
        while let Some(step) = self.next_step_at.filter(|&s| s <= now) {
            self.accrue_until(step);
            self.step_up(step);
        }
        self.accrue_until(now);
    }

    /// Whether a start may take a token (always, without a rate).
    fn has_token(&self) -> bool {
        self.limits.rate.is_none() || self.tokens >= TOKEN
    }

    /// Whether a start may take a concurrency slot.
    fn has_slot(&self) -> bool {
        self.limits
            .max_concurrent
            .is_none_or(|cap| self.running < cap)
    }

    /// When the bucket holds a whole token, if it does not now. Expects the
    /// group advanced to `now`; follows the recovery schedule ahead.
    fn token_at(&self, now: UnixMs) -> Option<UnixMs> {
        if self.has_token() {
            return None;
        }
        let mut probe = self.clone();
        let mut t = now.max(probe.refilled_at);
        let mut missing = TOKEN - probe.tokens;
        // Bounded like `advance`: each turn takes a recovery step.
        loop {
            let per_ms = probe.limits.units_per_ms(probe.factor).max(1);
            let needed_ms = missing.div_ceil(per_ms);
            let ready = t.saturating_add(UnixMs::try_from(needed_ms).unwrap_or(UnixMs::MAX));
            match probe.next_step_at {
                Some(step) if step < ready && step > t => {
                    let span = u128::try_from(i128::from(step) - i128::from(t)).unwrap_or(0);
                    missing -= span.saturating_mul(per_ms).min(missing);
                    t = step;
                    probe.step_up(step);
                }
                _ => return Some(ready),
            }
        }
    }

    /// Switches to new limits at `now` (already advanced), keeping the running
    /// count. A bucket that had no rate before starts full; otherwise tokens
    /// are clamped to the new capacity.
    fn apply(&mut self, limits: Limits) {
        let had_rate = self.limits.rate.is_some();
        self.limits = limits;
        self.retired = false;
        if limits.rate.is_none() {
            self.factor = FACTOR_ONE;
            self.next_step_at = None;
        }
        self.tokens = if had_rate {
            self.tokens.min(limits.capacity())
        } else {
            limits.capacity()
        };
    }
}

/// The virtual clock the groups run on: it follows `now` forward and stands
/// still while `now` is behind the latest value seen. Virtual and raw time
/// differ by a fixed offset between backward steps (none if `now` never goes
/// back), so times handed out are converted back to raw.
#[derive(Debug, Clone, Copy)]
struct Clock {
    /// The latest raw `now` observed.
    raw: UnixMs,
    /// The virtual time at `raw`.
    virt: UnixMs,
}

impl Clock {
    fn new(now: UnixMs) -> Self {
        Clock {
            raw: now,
            virt: now,
        }
    }

    /// The virtual time at raw `now`, without recording it.
    fn peek(&self, now: UnixMs) -> UnixMs {
        let forward = (i128::from(now) - i128::from(self.raw)).max(0);
        let forward = UnixMs::try_from(forward).unwrap_or(UnixMs::MAX);
        self.virt.saturating_add(forward)
    }

    /// Records raw `now` and returns its virtual time.
    fn observe(&mut self, now: UnixMs) -> UnixMs {
        self.virt = self.peek(now);
        self.raw = now;
        self.virt
    }

    /// The raw time of virtual time `at`, seen from raw `now`: time runs
    /// forward from `now` as it would once `now` is observed.
    fn raw_at(&self, now: UnixMs, at: UnixMs) -> UnixMs {
        now.saturating_add(at.saturating_sub(self.peek(now)))
    }
}

/// All limit groups and their live counts. Owned by the scheduler actor.
#[derive(Debug, Clone)]
pub struct LimitGroups {
    groups: BTreeMap<Arc<str>, Group>,
    clock: Clock,
}

impl LimitGroups {
    /// Groups from the `limits` config, each with a full bucket and nothing
    /// running.
    pub fn new(config: &BTreeMap<String, LimitGroup>, now: UnixMs) -> Self {
        let groups = config
            .iter()
            .map(|(name, c)| {
                let name: Arc<str> = Arc::from(name.as_str());
                let group = Group::new(name.clone(), Limits::from_config(c), now);
                (name, group)
            })
            .collect();
        LimitGroups {
            groups,
            clock: Clock::new(now),
        }
    }

    /// Applies a new `limits` config: rates, bursts and caps change, running
    /// counts and throttle state stay. Tokens are clamped to the new burst (a
    /// group that gains a rate starts full); a lower `max_concurrent` only
    /// blocks new starts until enough tasks finish. New groups start full; a
    /// removed group with running tasks keeps counting them, unlimited and
    /// hidden from [`LimitGroups::snapshot`], until they end (or it returns).
    pub fn reload(&mut self, config: &BTreeMap<String, LimitGroup>, now: UnixMs) {
        let now = self.clock.observe(now);
        let mut old = std::mem::take(&mut self.groups);
        for (name, c) in config {
            let limits = Limits::from_config(c);
            let (key, group) = match old.remove_entry(name.as_str()) {
                Some((key, mut group)) => {
                    group.advance(now);
                    group.apply(limits);
                    (key, group)
                }
                None => {
                    let key: Arc<str> = Arc::from(name.as_str());
                    (key.clone(), Group::new(key, limits, now))
                }
            };
            self.groups.insert(key, group);
        }
        for (key, mut group) in old {
            if group.running > 0 {
                group.advance(now);
                group.apply(Limits::UNLIMITED);
                group.retired = true;
                self.groups.insert(key, group);
            }
        }
    }

    /// Takes a token and a slot in every group, or nothing (all or none).
    /// Unknown names are unlimited and not recorded; a name given twice
    /// counts once.
    pub fn try_acquire(&mut self, groups: &[String], now: UnixMs) -> Option<Permit> {
        let now = self.clock.observe(now);
        let mut held: Vec<Held> = Vec::with_capacity(groups.len());
        for name in groups {
            let Some(group) = self.groups.get_mut(name.as_str()) else {
                continue;
            };
            if held.iter().any(|h| h.name == group.name) {
                continue;
            }
            group.advance(now);
            if !group.has_token() || !group.has_slot() {
                return None;
            }
            held.push(Held {
                name: group.name.clone(),
                token: group.limits.rate.is_some(),
            });
        }
        for h in &held {
            if let Some(group) = self.groups.get_mut(&h.name) {
                if h.token {
                    group.tokens -= TOKEN;
                }
                group.running += 1;
            }
        }
        Some(Permit { groups: held })
    }

    /// The lease never started: give the tokens and slots back. Tokens are
    /// returned up to the bucket's capacity.
    pub fn refund(&mut self, permit: Permit, now: UnixMs) {
        let now = self.clock.observe(now);
        for h in &permit.groups {
            if let Some(group) = self.groups.get_mut(&h.name) {
                group.advance(now);
                if h.token && group.limits.rate.is_some() {
                    group.tokens = (group.tokens + TOKEN).min(group.limits.capacity());
                }
            }
        }
        self.release(&permit);
    }

    /// The task finished (any outcome): free the concurrency slots (tokens
    /// stay spent). Release each permit once.
    pub fn release(&mut self, permit: &Permit) {
        for h in &permit.groups {
            let Some(group) = self.groups.get_mut(&h.name) else {
                continue;
            };
            debug_assert!(group.running > 0, "permit released twice");
            group.running = group.running.saturating_sub(1);
            if group.retired && group.running == 0 {
                self.groups.remove(&h.name);
            }
        }
    }

    /// Re-count a running task after a server restart (slot only, no token).
    /// The slot is taken even beyond `max_concurrent`: the task runs already.
    pub fn reattach(&mut self, groups: &[String]) -> Permit {
        let mut held: Vec<Held> = Vec::with_capacity(groups.len());
        for name in groups {
            let Some(group) = self.groups.get_mut(name.as_str()) else {
                continue;
            };
            if held.iter().any(|h| h.name == group.name) {
                continue;
            }
            group.running += 1;
            held.push(Held {
                name: group.name.clone(),
                token: false,
            });
        }
        Permit { groups: held }
    }

    /// An exit 75 in these groups: slow them down. Each group with a rate
    /// halves its effective rate (not below the floor), empties its bucket and
    /// restarts its cool-down; groups without a rate are unaffected.
    pub fn throttled(&mut self, groups: &[String], now: UnixMs) {
        let now = self.clock.observe(now);
        for name in groups {
            let Some(group) = self.groups.get_mut(name.as_str()) else {
                continue;
            };
            if group.limits.rate.is_none() {
                continue;
            }
            group.advance(now);
            group.factor = (group.factor / 2).max(FACTOR_FLOOR);
            group.tokens = 0;
            group.next_step_at = Some(now.saturating_add(COOL_DOWN_MS));
        }
    }

    /// When the earliest blocked group may admit again (for the dispatcher's
    /// next wake-up), if any is blocked by tokens: the first instant at which
    /// one of these groups that lacks a token gets one, assuming nobody else
    /// takes it. A task in several blocked groups may need several wake-ups.
    /// Groups blocked only by concurrency give `None`: a release frees them.
    pub fn next_admission(&self, groups: &[String], now: UnixMs) -> Option<UnixMs> {
        let virt = self.clock.peek(now);
        groups
            .iter()
            .filter_map(|name| {
                let mut group = self.groups.get(name.as_str())?.clone();
                group.advance(virt);
                group.token_at(virt)
            })
            .min()
            .map(|at| self.clock.raw_at(now, at))
    }

    /// Per group: configured and effective rate, tokens, running, for
    /// status/metrics. Ordered by name; retired groups are left out.
    pub fn snapshot(&self, now: UnixMs) -> Vec<GroupSnapshot> {
        let virt = self.clock.peek(now);
        self.groups
            .values()
            .filter(|g| !g.retired)
            .map(|g| {
                let mut group = g.clone();
                group.advance(virt);
                snapshot_of(&group, |at| self.clock.raw_at(now, at))
            })
            .collect()
    }
}

/// The status view of one group advanced to now; `raw_at` converts virtual
/// times.
fn snapshot_of(group: &Group, raw_at: impl Fn(UnixMs) -> UnixMs) -> GroupSnapshot {
    let limits = group.limits;
    let rated = limits.rate.is_some();
    // Lossy conversions are fine here: these numbers are for people and
    // metrics, never for admission.
    let units_to_tokens = |units: u128| units as f64 / TOKEN as f64;
    GroupSnapshot {
        name: group.name.to_string(),
        rate: limits.rate,
        effective_per_sec: rated.then(|| units_to_tokens(limits.units_per_ms(group.factor) * 1000)),
        rate_factor: f64::from(group.factor) / f64::from(FACTOR_ONE),
        burst: rated.then_some(limits.burst),
        tokens: rated.then(|| units_to_tokens(group.tokens)),
        running: group.running,
        max_concurrent: limits.max_concurrent,
        recovers_at: group.next_step_at.map(raw_at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Some Tuesday in 2023, in ms.
    const T0: UnixMs = 1_700_000_000_000;

    fn group(rate: Option<&str>, burst: Option<u32>, max_concurrent: Option<u32>) -> LimitGroup {
        LimitGroup {
            rate: rate.map(|r| r.parse().expect("test rate parses")),
            burst,
            max_concurrent,
        }
    }

    fn config(groups: &[(&str, LimitGroup)]) -> BTreeMap<String, LimitGroup> {
        groups
            .iter()
            .map(|(name, g)| (name.to_string(), g.clone()))
            .collect()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn snap(limits: &LimitGroups, name: &str, now: UnixMs) -> GroupSnapshot {
        limits
            .snapshot(now)
            .into_iter()
            .find(|g| g.name == name)
            .expect("group is in the snapshot")
    }

    #[test]
    fn burst_then_refill_timing() {
        let mut limits = LimitGroups::new(
            &config(&[("bbref", group(Some("20/min"), Some(3), None))]),
            T0,
        );
        let g = names(&["bbref"]);
        for _ in 0..3 {
            let permit = limits.try_acquire(&g, T0).expect("burst admits");
            limits.release(&permit);
        }
        assert!(limits.try_acquire(&g, T0).is_none(), "burst exhausted");
        // 20/min is one token every 3 s.
        assert_eq!(limits.next_admission(&g, T0), Some(T0 + 3_000));
        assert_eq!(limits.next_admission(&g, T0 + 1_000), Some(T0 + 3_000));
        assert!(limits.try_acquire(&g, T0 + 2_999).is_none());
        let permit = limits.try_acquire(&g, T0 + 3_000).expect("refilled");
        limits.release(&permit);
        assert!(limits.try_acquire(&g, T0 + 3_000).is_none());
        assert_eq!(limits.next_admission(&g, T0 + 3_000), Some(T0 + 6_000));
        // A long idle stretch refills to the burst, not beyond.
        let s = snap(&limits, "bbref", T0 + 3_600_000);
        assert_eq!(s.tokens, Some(3.0));
        assert_eq!(s.running, 0);
        assert_eq!(limits.next_admission(&g, T0 + 3_600_000), None);
    }

    #[test]
    fn default_burst_is_one() {
        let mut limits = LimitGroups::new(&config(&[("a", group(Some("1/s"), None, None))]), T0);
        let g = names(&["a"]);
        assert!(limits.try_acquire(&g, T0).is_some());
        assert!(limits.try_acquire(&g, T0).is_none());
        assert_eq!(snap(&limits, "a", T0).burst, Some(1));
    }

    #[test]
    fn acquisition_is_all_or_none_across_groups() {
        let mut limits = LimitGroups::new(
            &config(&[
                ("a", group(Some("1/min"), Some(1), None)),
                ("b", group(Some("1/min"), Some(2), None)),
                ("c", group(None, None, Some(1))),
                ("d", group(Some("1/min"), Some(5), None)),
            ]),
            T0,
        );
        let _a = limits.try_acquire(&names(&["a"]), T0).expect("a admits");
        // `b` has tokens but `a` has none: nothing is taken from `b`.
        assert!(limits.try_acquire(&names(&["b", "a"]), T0).is_none());
        let b = snap(&limits, "b", T0);
        assert_eq!((b.tokens, b.running), (Some(2.0), 0));
        assert!(limits.try_acquire(&names(&["b"]), T0).is_some());
        assert!(limits.try_acquire(&names(&["b"]), T0).is_some());
        assert!(limits.try_acquire(&names(&["b"]), T0).is_none());
        // Same with a full concurrency slot instead of an empty bucket.
        let _c = limits.try_acquire(&names(&["c"]), T0).expect("c admits");
        assert!(limits.try_acquire(&names(&["d", "c"]), T0).is_none());
        let d = snap(&limits, "d", T0);
        assert_eq!((d.tokens, d.running), (Some(5.0), 0));
    }

    #[test]
    fn refund_gives_tokens_and_slots_back() {
        let mut limits = LimitGroups::new(
            &config(&[("a", group(Some("1/min"), Some(1), Some(1)))]),
            T0,
        );
        let g = names(&["a"]);
        let permit = limits.try_acquire(&g, T0).expect("admits");
        assert!(limits.try_acquire(&g, T0).is_none());
        limits.refund(permit, T0);
        let s = snap(&limits, "a", T0);
        assert_eq!((s.tokens, s.running), (Some(1.0), 0));
        let permit = limits.try_acquire(&g, T0).expect("refunded token admits");
        // A refund never fills the bucket beyond its burst.
        limits.refund(permit, T0 + 60_000);
        assert_eq!(snap(&limits, "a", T0 + 60_000).tokens, Some(1.0));
    }

    #[test]
    fn refund_of_reattached_permit_gives_no_token() {
        let mut limits =
            LimitGroups::new(&config(&[("a", group(Some("1/min"), Some(1), None))]), T0);
        let g = names(&["a"]);
        let spent = limits.try_acquire(&g, T0).expect("admits");
        let reattached = limits.reattach(&g);
        limits.refund(reattached, T0);
        let s = snap(&limits, "a", T0);
        assert_eq!((s.tokens, s.running), (Some(0.0), 1));
        limits.release(&spent);
        assert_eq!(snap(&limits, "a", T0).running, 0);
    }

    #[test]
    fn release_frees_slots_but_tokens_stay_spent() {
        let mut limits = LimitGroups::new(
            &config(&[("a", group(Some("1/min"), Some(2), Some(1)))]),
            T0,
        );
        let g = names(&["a"]);
        let first = limits.try_acquire(&g, T0).expect("admits");
        assert!(limits.try_acquire(&g, T0).is_none(), "slot taken");
        assert_eq!(
            limits.next_admission(&g, T0),
            None,
            "tokens are not the block"
        );
        limits.release(&first);
        let second = limits.try_acquire(&g, T0).expect("slot freed");
        limits.release(&second);
        assert!(limits.try_acquire(&g, T0).is_none(), "both tokens spent");
        assert_eq!(limits.next_admission(&g, T0), Some(T0 + 60_000));
        assert_eq!(snap(&limits, "a", T0).running, 0);
    }

    #[test]
    fn reattach_counts_slots_without_tokens() {
        let mut limits = LimitGroups::new(
            &config(&[("a", group(Some("1/min"), Some(1), Some(1)))]),
            T0,
        );
        let g = names(&["a", "unknown"]);
        let r1 = limits.reattach(&g);
        let r2 = limits.reattach(&g);
        assert_eq!(r1.groups().collect::<Vec<_>>(), vec!["a"]);
        let s = snap(&limits, "a", T0);
        assert_eq!(
            (s.tokens, s.running),
            (Some(1.0), 2),
            "over the cap, no token"
        );
        assert!(limits.try_acquire(&g, T0).is_none());
        limits.release(&r1);
        assert!(limits.try_acquire(&g, T0).is_none(), "still at the cap");
        limits.release(&r2);
        assert!(limits.try_acquire(&g, T0).is_some());
    }

    #[test]
    fn max_concurrent_caps_running_tasks() {
        let mut limits = LimitGroups::new(&config(&[("a", group(None, None, Some(2)))]), T0);
        let g = names(&["a"]);
        let p1 = limits.try_acquire(&g, T0).expect("first");
        let _p2 = limits.try_acquire(&g, T0).expect("second");
        assert!(limits.try_acquire(&g, T0).is_none());
        assert_eq!(limits.next_admission(&g, T0), None);
        limits.release(&p1);
        assert!(limits.try_acquire(&g, T0).is_some());
        let s = snap(&limits, "a", T0);
        assert_eq!((s.running, s.max_concurrent, s.tokens), (2, Some(2), None));
    }

    #[test]
    fn unknown_groups_are_unlimited_and_duplicates_count_once() {
        let mut limits =
            LimitGroups::new(&config(&[("a", group(Some("1/min"), Some(2), None))]), T0);
        for _ in 0..10 {
            let permit = limits
                .try_acquire(&names(&["nope"]), T0)
                .expect("unknown is unlimited");
            assert_eq!(permit.groups().count(), 0);
        }
        let permit = limits
            .try_acquire(&names(&["a", "a", "nope"]), T0)
            .expect("admits");
        assert_eq!(permit.groups().collect::<Vec<_>>(), vec!["a"]);
        let s = snap(&limits, "a", T0);
        assert_eq!((s.tokens, s.running), (Some(1.0), 1));
        assert_eq!(limits.next_admission(&names(&["nope"]), T0), None);
    }

    #[test]
    fn throttle_halves_the_rate_then_recovers_by_steps() {
        let mut limits = LimitGroups::new(&config(&[("a", group(Some("1/s"), Some(1), None))]), T0);
        let g = names(&["a"]);
        limits.throttled(&g, T0);
        let s = snap(&limits, "a", T0);
        assert_eq!(s.rate_factor, 0.5);
        assert_eq!(s.effective_per_sec, Some(0.5));
        assert_eq!(s.tokens, Some(0.0), "a throttle empties the bucket");
        assert_eq!(s.recovers_at, Some(T0 + COOL_DOWN_MS));
        // Half of 1/s is one token every 2 s.
        assert_eq!(limits.next_admission(&g, T0), Some(T0 + 2_000));
        assert!(limits.try_acquire(&g, T0 + 1_999).is_none());
        assert!(limits.try_acquire(&g, T0 + 2_000).is_some());
        let s = snap(&limits, "a", T0 + COOL_DOWN_MS - 1);
        assert_eq!(s.rate_factor, 0.5);
        let s = snap(&limits, "a", T0 + COOL_DOWN_MS);
        assert_eq!(s.rate_factor, 0.75);
        assert_eq!(s.recovers_at, Some(T0 + 2 * COOL_DOWN_MS));
        let s = snap(&limits, "a", T0 + 2 * COOL_DOWN_MS);
        assert_eq!((s.rate_factor, s.recovers_at), (1.0, None));
        assert_eq!(s.effective_per_sec, Some(1.0));
    }

    #[test]
    fn repeated_throttles_halve_down_to_the_floor_and_recover_from_it() {
        let mut limits = LimitGroups::new(&config(&[("a", group(Some("1/s"), Some(1), None))]), T0);
        let g = names(&["a"]);
        let mut factors = Vec::new();
        for _ in 0..6 {
            limits.throttled(&g, T0);
            factors.push(snap(&limits, "a", T0).rate_factor);
        }
        assert_eq!(factors, vec![0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0625]);
        let recovery: Vec<(f64, Option<UnixMs>)> = (1..=5)
            .map(|k| {
                let s = snap(&limits, "a", T0 + k * COOL_DOWN_MS);
                (s.rate_factor, s.recovers_at)
            })
            .collect();
        assert_eq!(
            recovery,
            vec![
                (5.0 / 16.0, Some(T0 + 2 * COOL_DOWN_MS)),
                (9.0 / 16.0, Some(T0 + 3 * COOL_DOWN_MS)),
                (13.0 / 16.0, Some(T0 + 4 * COOL_DOWN_MS)),
                (1.0, None),
                (1.0, None),
            ]
        );
    }

    #[test]
    fn a_throttle_during_cool_down_restarts_it() {
        let mut limits = LimitGroups::new(&config(&[("a", group(Some("1/s"), Some(1), None))]), T0);
        let g = names(&["a"]);
        limits.throttled(&g, T0);
        let later = T0 + COOL_DOWN_MS - 1;
        limits.throttled(&g, later);
        let s = snap(&limits, "a", T0 + COOL_DOWN_MS);
        assert_eq!(s.rate_factor, 0.25);
        assert_eq!(s.recovers_at, Some(later + COOL_DOWN_MS));
    }

    #[test]
    fn refill_follows_the_recovery_schedule_exactly() {
        let mut limits =
            LimitGroups::new(&config(&[("a", group(Some("1/min"), Some(1), None))]), T0);
        let g = names(&["a"]);
        for _ in 0..4 {
            limits.throttled(&g, T0);
        }
        // At 1/16 of 1/min a token takes 960 s; the first 300 s earn 5/16 of
        // one. At 5/16 the remaining 11/16 take 11/16 × 192 s = 132 s.
        let ready = T0 + COOL_DOWN_MS + 132_000;
        assert_eq!(limits.next_admission(&g, T0), Some(ready));
        assert!(limits.try_acquire(&g, ready - 1).is_none());
        assert!(limits.try_acquire(&g, ready).is_some());
    }

    #[test]
    fn throttle_leaves_groups_without_rate_alone() {
        let mut limits = LimitGroups::new(&config(&[("a", group(None, None, Some(1)))]), T0);
        let g = names(&["a"]);
        limits.throttled(&g, T0);
        let s = snap(&limits, "a", T0);
        assert_eq!((s.rate_factor, s.recovers_at), (1.0, None));
        assert!(limits.try_acquire(&g, T0).is_some());
    }

    #[test]
    fn reload_clamps_tokens_and_keeps_running_counts() {
        let mut limits = LimitGroups::new(
            &config(&[("a", group(Some("1/min"), Some(5), Some(3)))]),
            T0,
        );
        let g = names(&["a"]);
        let p1 = limits.try_acquire(&g, T0).expect("first");
        let p2 = limits.try_acquire(&g, T0).expect("second");
        limits.throttled(&names(&["a"]), T0);
        limits.reload(
            &config(&[("a", group(Some("1/min"), Some(2), Some(1)))]),
            T0,
        );
        let s = snap(&limits, "a", T0);
        assert_eq!(
            (s.running, s.burst, s.max_concurrent),
            (2, Some(2), Some(1))
        );
        assert_eq!(s.rate_factor, 0.5, "throttle state survives a reload");
        // Refill to the new burst, then check the lower cap blocks new starts.
        let later = T0 + 3_600_000;
        limits.reload(
            &config(&[("a", group(Some("1/min"), Some(5), Some(1)))]),
            later,
        );
        limits.reload(
            &config(&[("a", group(Some("1/min"), Some(2), Some(1)))]),
            later,
        );
        assert_eq!(snap(&limits, "a", later).tokens, Some(2.0), "clamped");
        limits.reload(
            &config(&[("a", group(Some("1/min"), Some(9), Some(1)))]),
            later,
        );
        assert_eq!(snap(&limits, "a", later).tokens, Some(2.0), "not topped up");
        assert!(limits.try_acquire(&g, later).is_none());
        limits.release(&p1);
        assert!(limits.try_acquire(&g, later).is_none(), "one still running");
        limits.release(&p2);
        assert!(limits.try_acquire(&g, later).is_some());
    }

    #[test]
    fn reload_changes_the_period_without_losing_tokens() {
        let mut limits = LimitGroups::new(&config(&[("a", group(Some("1/h"), Some(3), None))]), T0);
        let g = names(&["a"]);
        assert!(limits.try_acquire(&g, T0).is_some());
        limits.reload(&config(&[("a", group(Some("1/s"), Some(3), None))]), T0);
        assert_eq!(snap(&limits, "a", T0).tokens, Some(2.0));
        assert_eq!(snap(&limits, "a", T0 + 1_000).tokens, Some(3.0));
    }

    #[test]
    fn reload_adds_and_removes_groups() {
        let mut limits = LimitGroups::new(
            &config(&[
                ("b", group(None, None, Some(1))),
                ("c", group(None, None, None)),
            ]),
            T0,
        );
        let b = names(&["b"]);
        let held = limits.try_acquire(&b, T0).expect("b admits");
        // `b` leaves the config while a task holds its slot; `c` gains a rate.
        limits.reload(
            &config(&[
                ("c", group(Some("1/min"), Some(2), None)),
                ("n", group(None, None, Some(1))),
            ]),
            T0,
        );
        let listed: Vec<String> = limits.snapshot(T0).into_iter().map(|s| s.name).collect();
        assert_eq!(listed, vec!["c", "n"]);
        assert_eq!(
            snap(&limits, "c", T0).tokens,
            Some(2.0),
            "a new rate starts full"
        );
        let extra = limits
            .try_acquire(&b, T0)
            .expect("a removed group is unlimited");
        limits.release(&extra);
        // `b` returns before its task ends: the running task still counts.
        limits.reload(&config(&[("b", group(None, None, Some(1)))]), T0);
        assert_eq!(snap(&limits, "b", T0).running, 1);
        assert!(limits.try_acquire(&b, T0).is_none());
        limits.release(&held);
        assert!(limits.try_acquire(&b, T0).is_some());
    }

    #[test]
    fn removed_group_is_forgotten_when_its_last_task_ends() {
        let mut limits = LimitGroups::new(&config(&[("b", group(None, None, Some(1)))]), T0);
        let b = names(&["b"]);
        let held = limits.try_acquire(&b, T0).expect("admits");
        limits.reload(&BTreeMap::new(), T0);
        limits.release(&held);
        // Back in the config: nothing of the old count remains.
        limits.reload(&config(&[("b", group(None, None, Some(1)))]), T0);
        assert_eq!(snap(&limits, "b", T0).running, 0);
        assert!(limits.try_acquire(&b, T0).is_some());
    }

    #[test]
    fn clock_going_backwards_adds_no_tokens_and_does_not_stall() {
        let mut limits =
            LimitGroups::new(&config(&[("a", group(Some("1/min"), Some(1), None))]), T0);
        let g = names(&["a"]);
        assert!(limits.try_acquire(&g, T0).is_some());
        let back = T0 - 3_600_000;
        assert!(limits.try_acquire(&g, back).is_none());
        assert_eq!(snap(&limits, "a", back).tokens, Some(0.0));
        assert_eq!(limits.next_admission(&g, back), Some(back + 60_000));
        assert!(limits.try_acquire(&g, back + 59_999).is_none());
        assert!(limits.try_acquire(&g, back + 60_000).is_some());
        // Returning to the old time counts only the time that really passed.
        assert!(limits.try_acquire(&g, T0).is_some());
        assert!(limits.try_acquire(&g, T0).is_none());
    }

    #[test]
    fn extreme_times_neither_panic_nor_overflow_the_bucket() {
        let mut limits = LimitGroups::new(
            &config(&[("a", group(Some("1000/s"), Some(u32::MAX), None))]),
            UnixMs::MIN,
        );
        let g = names(&["a"]);
        limits.throttled(&g, UnixMs::MIN);
        for now in [UnixMs::MAX, UnixMs::MIN, UnixMs::MAX, 0, UnixMs::MAX] {
            let _ = limits.try_acquire(&g, now);
            let _ = limits.next_admission(&g, now);
            let s = snap(&limits, "a", now);
            let tokens = s.tokens.expect("has a rate");
            assert!((0.0..=f64::from(u32::MAX)).contains(&tokens), "{tokens}");
        }
    }

    #[test]
    fn long_runs_do_not_drift() {
        // 7/min does not divide a minute into whole milliseconds; over three
        // days the k-th token must still arrive at exactly ceil(k × 60000 / 7).
        // A burst of 2 keeps the bucket below its cap, so no accrual is lost
        // to a full bucket in the fraction of a millisecond before each start.
        let mut limits =
            LimitGroups::new(&config(&[("a", group(Some("7/min"), Some(2), None))]), T0);
        let g = names(&["a"]);
        assert!(limits.try_acquire(&g, T0).is_some());
        assert!(limits.try_acquire(&g, T0).is_some());
        let tokens: i64 = 7 * 60 * 24 * 3;
        let mut now = T0;
        for k in 1..=tokens {
            now = limits
                .next_admission(&g, now)
                .expect("blocked after each start");
            assert_eq!(now, T0 + (k * 60_000 + 6) / 7, "token {k}");
            assert!(limits.try_acquire(&g, now).is_some(), "token {k}");
        }
    }

    #[test]
    fn snapshot_reports_every_configured_group() {
        let limits = LimitGroups::new(
            &config(&[
                ("z", group(Some("20/min"), Some(3), Some(1))),
                ("a", group(None, None, None)),
            ]),
            T0,
        );
        let all = limits.snapshot(T0);
        assert_eq!(
            all[1],
            GroupSnapshot {
                name: "z".into(),
                rate: Some("20/min".parse().expect("rate parses")),
                effective_per_sec: Some(20.0 / 60.0),
                rate_factor: 1.0,
                burst: Some(3),
                tokens: Some(3.0),
                running: 0,
                max_concurrent: Some(1),
                recovers_at: None,
            }
        );
        assert_eq!(all[0].name, "a");
        assert_eq!(
            (all[0].rate, all[0].tokens, all[0].burst),
            (None, None, None)
        );
    }

    /// Names the property tests draw groups from; the last one is never
    /// configured.
    const NAMES: [&str; 4] = ["g0", "g1", "g2", "unknown"];

    /// One step of a random scenario.
    #[derive(Debug, Clone)]
    enum Op {
        /// Moves the raw clock by this many ms (sometimes backwards).
        Tick(i64),
        /// Tries to start a task in the groups picked by the bit mask.
        Acquire(u8),
        /// Refunds the live permit at this index (modulo the count).
        Refund(usize),
        /// Releases the live permit at this index (modulo the count).
        Release(usize),
        /// Throttles the groups picked by the bit mask.
        Throttle(u8),
        /// Switches to the alternative config at this index (reload test only).
        Reload(usize),
    }

    fn limit_group() -> impl Strategy<Value = LimitGroup> {
        let rate = prop_oneof![
            Just(None),
            (1u32..=30, 0..3u8).prop_map(|(count, per)| {
                let per = match per {
                    0 => RatePeriod::Second,
                    1 => RatePeriod::Minute,
                    _ => RatePeriod::Hour,
                };
                Some(Rate { count, per })
            }),
        ];
        (
            rate,
            proptest::option::of(1u32..=5),
            proptest::option::of(1u32..=4),
        )
            .prop_map(|(rate, burst, max_concurrent)| LimitGroup {
                rate,
                burst: rate.and(burst),
                max_concurrent,
            })
    }

    fn limits_config() -> impl Strategy<Value = BTreeMap<String, LimitGroup>> {
        proptest::collection::vec(limit_group(), 1..=3).prop_map(|groups| {
            groups
                .into_iter()
                .enumerate()
                .map(|(i, g)| (NAMES[i].to_string(), g))
                .collect()
        })
    }

    fn op(reloads: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0i64..5_000).prop_map(Op::Tick),
            1 => (-5_000i64..0).prop_map(Op::Tick),
            1 => (0i64..700_000).prop_map(Op::Tick),
            6 => any::<u8>().prop_map(Op::Acquire),
            2 => any::<usize>().prop_map(Op::Refund),
            3 => any::<usize>().prop_map(Op::Release),
            1 => any::<u8>().prop_map(Op::Throttle),
            1 => (0..reloads.max(1)).prop_map(Op::Reload),
        ]
    }

    fn picked(mask: u8) -> Vec<String> {
        (0..NAMES.len())
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| NAMES[i].to_string())
            .collect()
    }

    fn period_ms(rate: Rate) -> i128 {
        i128::try_from(rate.per.duration().as_millis()).expect("period fits")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// In every window of (virtual) time, starts net of refunds stay within
        /// burst + rate × window, running never exceeds the cap, failed
        /// acquisitions take nothing, and `next_admission` is exact.
        #[test]
        fn admissions_respect_rate_burst_and_concurrency(
            cfg in limits_config(),
            ops in proptest::collection::vec(op(0), 1..200),
        ) {
            let mut raw = T0;
            let mut virt: i64 = 0;
            let mut limits = LimitGroups::new(&cfg, raw);
            // Live permits with the configured groups they hold.
            let mut live: Vec<(Permit, Vec<String>)> = Vec::new();
            // Per group: (virtual time, +1 start with a token / -1 refund).
            let mut events: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Tick(d) => {
                        raw += d;
                        virt += d.max(0);
                    }
                    Op::Acquire(mask) => {
                        let wanted = picked(mask);
                        let before = limits.snapshot(raw);
                        match limits.try_acquire(&wanted, raw) {
                            Some(permit) => {
                                let held: Vec<String> =
                                    permit.groups().map(str::to_string).collect();
                                for name in &held {
                                    prop_assert!(wanted.contains(name));
                                    if cfg[name].rate.is_some() {
                                        events.entry(name.clone()).or_default().push((virt, 1));
                                    }
                                }
                                let known = wanted.iter().filter(|n| cfg.contains_key(*n));
                                prop_assert_eq!(known.count(), held.len());
                                live.push((permit, held));
                            }
                            None => {
                                prop_assert_eq!(&before, &limits.snapshot(raw));
                                check_next_admission(&limits, &wanted, raw)?;
                            }
                        }
                    }
                    Op::Refund(i) if !live.is_empty() => {
                        let (permit, held) = live.remove(i % live.len());
                        for name in &held {
                            if cfg[name].rate.is_some() {
                                events.entry(name.clone()).or_default().push((virt, -1));
                            }
                        }
                        limits.refund(permit, raw);
                    }
                    Op::Release(i) if !live.is_empty() => {
                        let (permit, _) = live.remove(i % live.len());
                        limits.release(&permit);
                    }
                    Op::Throttle(mask) => limits.throttled(&picked(mask), raw),
                    Op::Refund(_) | Op::Release(_) | Op::Reload(_) => {}
                }
                for s in limits.snapshot(raw) {
                    let held = live.iter().filter(|(_, h)| h.contains(&s.name)).count();
                    prop_assert_eq!(s.running as usize, held, "group {}", &s.name);
                    if let Some(cap) = s.max_concurrent {
                        prop_assert!(s.running <= cap, "group {} over its cap", &s.name);
                    }
                }
            }
            for (name, list) in &events {
                let g = &cfg[name];
                let rate = g.rate.expect("events only for rated groups");
                let burst = i128::from(g.burst.unwrap_or(DEFAULT_BURST));
                for i in 0..list.len() {
                    let mut net: i128 = 0;
                    for (t, delta) in &list[i..] {
                        net += i128::from(*delta);
                        let window = i128::from(*t - list[i].0);
                        let allowed = burst + window * i128::from(rate.count) / period_ms(rate);
                        prop_assert!(
                            net <= allowed,
                            "group {name}: {net} starts in {window} ms, allowed {allowed}"
                        );
                    }
                }
            }
        }

        /// Reloads between random configs never lose or invent running tasks.
        #[test]
        fn reload_keeps_running_counts(
            first in limits_config(),
            alternatives in proptest::collection::vec(limits_config(), 1..4),
            ops in proptest::collection::vec(op(3), 1..150),
        ) {
            let mut raw = T0;
            let mut limits = LimitGroups::new(&first, raw);
            let mut live: Vec<(Permit, Vec<String>)> = Vec::new();
            for op in ops {
                match op {
                    Op::Tick(d) => raw += d,
                    Op::Acquire(mask) => {
                        if let Some(permit) = limits.try_acquire(&picked(mask), raw) {
                            let held = permit.groups().map(str::to_string).collect();
                            live.push((permit, held));
                        }
                    }
                    Op::Refund(i) if !live.is_empty() => {
                        let (permit, _) = live.remove(i % live.len());
                        limits.refund(permit, raw);
                    }
                    Op::Release(i) if !live.is_empty() => {
                        let (permit, _) = live.remove(i % live.len());
                        limits.release(&permit);
                    }
                    Op::Throttle(mask) => limits.throttled(&picked(mask), raw),
                    Op::Reload(i) => limits.reload(&alternatives[i % alternatives.len()], raw),
                    Op::Refund(_) | Op::Release(_) => {}
                }
                for s in limits.snapshot(raw) {
                    let held = live.iter().filter(|(_, h)| h.contains(&s.name)).count();
                    prop_assert_eq!(s.running as usize, held, "group {}", &s.name);
                    if let (Some(burst), Some(tokens)) = (s.burst, s.tokens) {
                        prop_assert!(tokens <= f64::from(burst));
                    }
                }
            }
            for (permit, _) in live {
                limits.release(&permit);
            }
            for s in limits.snapshot(raw) {
                prop_assert_eq!(s.running, 0, "group {}", &s.name);
            }
            prop_assert!(limits.groups.values().all(|g| !g.retired), "retired groups linger");
        }
    }

    /// After a failed acquisition of one group blocked by tokens alone, the
    /// group admits exactly at `next_admission` and not a millisecond before.
    fn check_next_admission(
        limits: &LimitGroups,
        wanted: &[String],
        now: UnixMs,
    ) -> Result<(), TestCaseError> {
        let known: Vec<&String> = wanted
            .iter()
            .filter(|n| limits.groups.contains_key(n.as_str()))
            .collect();
        let [name] = known.as_slice() else {
            return Ok(());
        };
        let s = snap(limits, name, now);
        let free_slot = s.max_concurrent.is_none_or(|cap| s.running < cap);
        let Some(at) = limits.next_admission(wanted, now) else {
            // Not blocked by tokens, so the failure came from the slot.
            prop_assert!(!free_slot);
            return Ok(());
        };
        prop_assert!(at > now);
        prop_assert!(limits.clone().try_acquire(wanted, at - 1).is_none());
        if free_slot {
            prop_assert!(limits.clone().try_acquire(wanted, at).is_some());
        }
        Ok(())
    }
}
