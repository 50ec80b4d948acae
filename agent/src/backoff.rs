//! Capped, jittered exponential backoff, used between reconnect attempts and
//! between retries of one upload.

use std::time::Duration;

/// Default first delay.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// Default cap on any delay.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Default relative jitter: each delay is moved by up to ±20%.
pub const DEFAULT_JITTER: f64 = 0.2;
/// How much each attempt multiplies the previous base delay.
const MULTIPLIER: f64 = 2.0;

/// How long to wait before the attempt after `n` consecutive failures.
///
/// The base delay is `initial × 2^n`, capped at `max`; a uniform jitter of up
/// to `±jitter × base` is applied, and the result is capped at `max` again, so
/// no delay is ever longer than `max` and none shorter than
/// `base × (1 − jitter)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffPolicy {
    /// Base delay after the first failure.
    pub initial: Duration,
    /// Upper bound of every delay.
    pub max: Duration,
    /// Relative jitter in `0.0..=1.0`; 0 disables it.
    pub jitter: f64,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial: DEFAULT_INITIAL_BACKOFF,
            max: DEFAULT_MAX_BACKOFF,
            jitter: DEFAULT_JITTER,
        }
    }
}

impl BackoffPolicy {
    /// The delay before retrying after `failures` consecutive failures
    /// (0 for the first retry), with a random jitter.
    pub fn delay(&self, failures: u32) -> Duration {
        self.delay_with(failures, rand::random_range(-1.0..=1.0))
    }

    /// The un-jittered base delay after `failures` consecutive failures.
    pub fn base(&self, failures: u32) -> Duration {
        let exponent = i32::try_from(failures).unwrap_or(i32::MAX);
        let scaled = self.initial.as_secs_f64() * MULTIPLIER.powi(exponent);
        let max = self.max.as_secs_f64();
        Duration::from_secs_f64(if scaled.is_finite() {
            scaled.min(max)
        } else {
            max
        })
    }

    /// The delay for a given `unit` in `-1.0..=1.0` that picks where inside
    /// the jitter band it falls (-1 is the shortest, 1 the longest).
    pub fn delay_with(&self, failures: u32, unit: f64) -> Duration {
        let base = self.base(failures).as_secs_f64();
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 + jitter * unit.clamp(-1.0, 1.0);
        let jittered = (base * factor).max(0.0);
        Duration::from_secs_f64(jittered.min(self.max.as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_doubles_then_stays_at_the_cap() {
        let policy = BackoffPolicy::default();
        assert_eq!(policy.base(0), Duration::from_millis(200));
        assert_eq!(policy.base(1), Duration::from_millis(400));
        assert_eq!(policy.base(2), Duration::from_millis(800));
        assert_eq!(policy.base(4), Duration::from_millis(3200));
        assert_eq!(policy.base(5), Duration::from_secs(5));
        assert_eq!(policy.base(60), Duration::from_secs(5));
        assert_eq!(policy.base(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn jitter_band_edges_are_exact() {
        let policy = BackoffPolicy::default();
        assert_eq!(policy.delay_with(0, -1.0), Duration::from_millis(160));
        assert_eq!(policy.delay_with(0, 0.0), Duration::from_millis(200));
        assert_eq!(policy.delay_with(0, 1.0), Duration::from_millis(240));
        // At the cap the band is cut at `max`, never above it.
        assert_eq!(policy.delay_with(30, 1.0), Duration::from_secs(5));
        assert_eq!(policy.delay_with(30, -1.0), Duration::from_secs(4));
    }

    #[test]
    fn random_delays_stay_within_the_cap_and_the_jitter_band() {
        let policy = BackoffPolicy::default();
        for failures in 0..40 {
            let base = policy.base(failures).as_secs_f64();
            let mut seen_min = f64::MAX;
            let mut seen_max = 0.0_f64;
            for _ in 0..200 {
                let delay = policy.delay(failures);
                assert!(delay <= policy.max, "delay {delay:?} above the cap");
                let secs = delay.as_secs_f64();
                assert!(secs >= base * 0.8 - 1e-9, "delay {delay:?} below the band");
                assert!(secs <= base * 1.2 + 1e-9, "delay {delay:?} above the band");
                seen_min = seen_min.min(secs);
                seen_max = seen_max.max(secs);
            }
            // Jitter really varies the delay (200 draws all equal is impossible
            // unless jitter is broken).
            assert!(seen_max > seen_min, "no jitter after {failures} failures");
        }
    }

    #[test]
    fn zero_jitter_is_deterministic() {
        let policy = BackoffPolicy {
            jitter: 0.0,
            ..BackoffPolicy::default()
        };
        assert_eq!(policy.delay(3), Duration::from_millis(1600));
    }
}
