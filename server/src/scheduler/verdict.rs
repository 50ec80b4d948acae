//! What a finished lease means: the agent's typed [`Outcome`] and the lake
//! check become a [`Verdict`] ([`judge`]), and the verdict with the retry
//! policy becomes the task's next state ([`next`]). Pure: `now` and the
//! jitter's random number are passed in.
//!
//! Invariants (property-tested below):
//! - every outcome has exactly one verdict, and every verdict exactly one
//!   next state;
//! - a task is dead only after `max_attempts` counted attempts; a refused
//!   run gives its attempt back and is offered again at once;
//! - a lost lease (expired, or its agent restarted) is retried at once, not
//!   after a backoff: it was not the task's fault;
//! - a retry is never scheduled before `now`, nor later than `now` plus the
//!   policy's longest delay with its jitter.

use std::time::Duration;

use crate::config::RetryPolicy;
use crate::model::{UnixMs, duration_ms};

/// The exit code for data that does not exist yet (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: i32 = 69;
/// The exit code for a transient failure or throttling (EX_TEMPFAIL).
pub const EXIT_TEMPFAIL: i32 = 75;

/// How a run ended, as its agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The scraper exited with this code.
    Exited(i32),
    /// The scraper ran past its timeout and was killed.
    TimedOut,
    /// The agent cancelled the run (told to, or shutting down).
    Cancelled,
    /// The scraper could not be started.
    SpawnFailed,
    /// The scraper exited with this code, but uploading its output failed.
    UploadFailed(i32),
    /// The scraper was killed by this signal.
    Signaled(i32),
    /// The agent refused the assignment without starting anything.
    Refused,
    /// The agent said nothing about how it ended.
    Unreported,
}

impl Outcome {
    /// The exit code worth recording, for outcomes that have one.
    pub fn exit_code(self) -> Option<i32> {
        match self {
            Outcome::Exited(code) | Outcome::UploadFailed(code) => Some(code),
            _ => None,
        }
    }

    /// Whether the lake must be checked before judging: only a clean exit
    /// claims the objects are there.
    pub fn claims_success(self) -> bool {
        self == Outcome::Exited(0)
    }
}

/// A run that went wrong, by kind; stored as the attempt's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A non-zero exit, a missing or too small object, or no outcome.
    Failed,
    /// Killed at its timeout.
    TimedOut,
    /// Cancelled on the agent.
    Cancelled,
    /// Never started.
    SpawnFailed,
    /// Its output could not be uploaded.
    UploadFailed,
    /// Killed by a signal.
    Signaled,
    /// The lease was lost: it expired, or the agent restarted without it.
    Lost,
}

impl Failure {
    /// The word stored for the attempt and counted in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Failed => "failed",
            Failure::TimedOut => "timed_out",
            Failure::Cancelled => "cancelled",
            Failure::SpawnFailed => "spawn_failed",
            Failure::UploadFailed => "upload_failed",
            Failure::Signaled => "signaled",
            Failure::Lost => "lost",
        }
    }
}

/// What a finished lease means for its task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every expected object is there.
    Done,
    /// The data does not exist yet (exit 69).
    Unavailable,
    /// The agent did not start the task; the attempt does not count.
    Refused(String),
    /// The attempt failed, with a reason a person can act on.
    Failed {
        /// The kind of failure.
        kind: Failure,
        /// What went wrong.
        error: String,
    },
}

impl Verdict {
    /// A failure of `kind`.
    pub fn failed(kind: Failure, error: impl Into<String>) -> Self {
        Verdict::Failed {
            kind,
            error: error.into(),
        }
    }

    /// The attempt's stored outcome word.
    pub fn attempt_outcome(&self) -> &'static str {
        match self {
            Verdict::Done => "succeeded",
            Verdict::Unavailable => "unavailable",
            Verdict::Refused(_) => "refused",
            Verdict::Failed { kind, .. } => kind.as_str(),
        }
    }

    /// The word results are counted under in metrics.
    pub fn metric_outcome(&self) -> &'static str {
        match self {
            Verdict::Done => "done",
            other => other.attempt_outcome(),
        }
    }

    /// The attempt's error text (empty when it went well).
    pub fn error(&self) -> &str {
        match self {
            Verdict::Done | Verdict::Unavailable => "",
            Verdict::Refused(error) | Verdict::Failed { error, .. } => error,
        }
    }

    /// Whether the scraper never started, so its start does not count
    /// against its limit groups.
    pub fn never_started(&self) -> bool {
        matches!(
            self,
            Verdict::Refused(_)
                | Verdict::Failed {
                    kind: Failure::SpawnFailed,
                    ..
                }
        )
    }
}

/// What the lake holds of a finished lease's expected objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectCheck {
    /// Expected keys absent from the lake.
    pub missing: Vec<String>,
    /// Expected keys present but too small, with their size.
    pub too_small: Vec<(String, u64)>,
}

/// The verdict on a run that ended with `outcome` and `message`, given
/// what the lake holds (`check`, consulted only for a clean exit) and the
/// source's `min_bytes`.
pub fn judge(outcome: Outcome, message: &str, check: &ObjectCheck, min_bytes: u64) -> Verdict {
    let message = message.trim();
    let with_message = |prefix: String| {
        if message.is_empty() {
            prefix
        } else {
            format!("{prefix}: {message}")
        }
    };
    match outcome {
        Outcome::Exited(0) => {
            if let Some(key) = check.missing.first() {
                let more = if check.missing.len() > 1 {
                    format!("; {} objects missing in all", check.missing.len())
                } else {
                    String::new()
                };
                Verdict::failed(
                    Failure::Failed,
                    format!("expected object {key} was not produced (the scraper exited 0{more})"),
                )
            } else if let Some((key, size)) = check.too_small.first() {
                Verdict::failed(
                    Failure::Failed,
                    format!("object {key} is {size} bytes, below min_bytes {min_bytes}"),
                )
            } else {
                Verdict::Done
            }
        }
        Outcome::Exited(EXIT_UNAVAILABLE) => Verdict::Unavailable,
        Outcome::Exited(code) => {
            Verdict::failed(Failure::Failed, with_message(format!("exit code {code}")))
        }
        Outcome::TimedOut => Verdict::failed(Failure::TimedOut, with_message("timed out".into())),
        Outcome::Cancelled => Verdict::failed(
            Failure::Cancelled,
            with_message("cancelled on the agent".into()),
        ),
        Outcome::SpawnFailed => Verdict::failed(
            Failure::SpawnFailed,
            with_message("cannot start the scraper".into()),
        ),
        Outcome::UploadFailed(_) => {
            Verdict::failed(Failure::UploadFailed, with_message("upload failed".into()))
        }
        Outcome::Signaled(signal) => Verdict::failed(
            Failure::Signaled,
            with_message(format!("killed by signal {signal}")),
        ),
        Outcome::Refused => Verdict::Refused(with_message("refused by the agent".into())),
        Outcome::Unreported => Verdict::failed(Failure::Failed, "the agent reported no outcome"),
    }
}

/// Where a task goes after a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Finished.
    Done,
    /// Checked again at `recheck_at`.
    Unavailable {
        /// When reconcile may plan it again.
        recheck_at: UnixMs,
    },
    /// Pending again, ready at `ready_at`, with `attempts` counted so far.
    Requeue {
        /// When it may run.
        ready_at: UnixMs,
        /// Counted attempts.
        attempts: u32,
    },
    /// Out of attempts: waits for an operator.
    Dead,
}

/// The next state of a task whose attempt number `attempt` ended with
/// `verdict`, under `retry` (the scraper's policy; `None` when the scraper
/// left the catalog) and the source's `recheck_after`. `unit` in [0, 1)
/// picks the jitter.
pub fn next(
    verdict: &Verdict,
    attempt: u32,
    retry: Option<&RetryPolicy>,
    recheck_after: Duration,
    now: UnixMs,
    unit: f64,
) -> Next {
    match verdict {
        Verdict::Done => Next::Done,
        Verdict::Unavailable => Next::Unavailable {
            recheck_at: now.saturating_add(duration_ms(recheck_after)),
        },
        Verdict::Refused(_) => Next::Requeue {
            ready_at: now,
            attempts: attempt.saturating_sub(1),
        },
        Verdict::Failed { kind, .. } => {
            let max_attempts = retry.map_or(crate::config::DEFAULT_MAX_ATTEMPTS, |r| {
                r.max_attempts.max(1)
            });
            if attempt >= max_attempts {
                return Next::Dead;
            }
            let ready_at = if *kind == Failure::Lost {
                now
            } else {
                let delay = retry.map_or(duration_ms(crate::config::DEFAULT_BACKOFF), |r| {
                    backoff_ms(
                        r.backoff,
                        r.multiplier,
                        r.max_backoff,
                        r.jitter,
                        attempt,
                        unit,
                    )
                });
                now.saturating_add(delay)
            };
            Next::Requeue {
                ready_at,
                attempts: attempt,
            }
        }
    }
}

/// The delay before retry number `attempt` (1-based count of failures so
/// far): `backoff × multiplier^(attempt-1)`, capped at `max_backoff`, scaled
/// by a jitter factor in `[1 - jitter, 1 + jitter]` chosen by `unit` in [0, 1).
pub fn backoff_ms(
    backoff: Duration,
    multiplier: f64,
    max_backoff: Duration,
    jitter: f64,
    attempt: u32,
    unit: f64,
) -> i64 {
    let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
    let base = backoff.as_millis() as f64 * multiplier.max(1.0).powi(exp);
    let capped = base.min(max_backoff.as_millis() as f64);
    let jitter = jitter.clamp(0.0, 1.0);
    let factor = 1.0 - jitter + 2.0 * jitter * unit.clamp(0.0, 1.0);
    (capped * factor).round() as i64
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            backoff: Duration::from_secs(1),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(10),
            jitter: 0.1,
        }
    }

    #[test]
    fn backoff_grows_caps_and_jitters_within_bounds() {
        let b = Duration::from_secs(1);
        let max = Duration::from_secs(10);
        assert_eq!(backoff_ms(b, 2.0, max, 0.0, 1, 0.5), 1000);
        assert_eq!(backoff_ms(b, 2.0, max, 0.0, 2, 0.5), 2000);
        assert_eq!(backoff_ms(b, 2.0, max, 0.0, 3, 0.5), 4000);
        assert_eq!(backoff_ms(b, 2.0, max, 0.0, 10, 0.5), 10_000);
        assert_eq!(backoff_ms(b, 2.0, max, 0.1, 1, 0.0), 900);
        assert_eq!(backoff_ms(b, 2.0, max, 0.1, 1, 1.0), 1100);
        assert_eq!(backoff_ms(b, 2.0, max, 0.0, u32::MAX, 0.5), 10_000);
    }

    #[test]
    fn a_clean_exit_is_done_only_with_every_object_in_the_lake() {
        let ok = ObjectCheck::default();
        assert_eq!(judge(Outcome::Exited(0), "", &ok, 1), Verdict::Done);
        let missing = ObjectCheck {
            missing: vec!["a/1.json".into(), "a/2.json".into()],
            too_small: vec![],
        };
        assert_eq!(
            judge(Outcome::Exited(0), "", &missing, 1),
            Verdict::failed(
                Failure::Failed,
                "expected object a/1.json was not produced (the scraper exited 0; 2 objects missing in all)"
            )
        );
        let small = ObjectCheck {
            missing: vec![],
            too_small: vec![("a/1.json".into(), 3)],
        };
        assert_eq!(
            judge(Outcome::Exited(0), "", &small, 10),
            Verdict::failed(
                Failure::Failed,
                "object a/1.json is 3 bytes, below min_bytes 10"
            )
        );
    }

    #[test]
    fn exit_codes_and_messages_make_the_verdict() {
        let ok = ObjectCheck::default();
        assert_eq!(judge(Outcome::Exited(69), "", &ok, 1), Verdict::Unavailable);
        assert_eq!(
            judge(Outcome::Exited(3), " boom \n", &ok, 1),
            Verdict::failed(Failure::Failed, "exit code 3: boom")
        );
        assert_eq!(
            judge(Outcome::Signaled(9), "", &ok, 1),
            Verdict::failed(Failure::Signaled, "killed by signal 9")
        );
        assert_eq!(
            judge(Outcome::Refused, "draining", &ok, 1),
            Verdict::Refused("refused by the agent: draining".into())
        );
        assert!(judge(Outcome::SpawnFailed, "", &ok, 1).never_started());
        assert!(!judge(Outcome::TimedOut, "", &ok, 1).never_started());
        assert_eq!(
            judge(Outcome::UploadFailed(0), "", &ok, 1).attempt_outcome(),
            "upload_failed"
        );
        assert_eq!(Outcome::UploadFailed(4).exit_code(), Some(4));
        assert_eq!(Outcome::TimedOut.exit_code(), None);
    }

    #[test]
    fn failures_retry_with_backoff_until_the_last_attempt() {
        let p = policy(3);
        let failed = Verdict::failed(Failure::Failed, "x");
        let day = Duration::from_secs(86_400);
        assert_eq!(
            next(&failed, 1, Some(&p), day, 1000, 0.5),
            Next::Requeue {
                ready_at: 2000,
                attempts: 1
            }
        );
        assert_eq!(next(&failed, 3, Some(&p), day, 1000, 0.5), Next::Dead);
        let lost = Verdict::failed(Failure::Lost, "expired");
        assert_eq!(
            next(&lost, 2, Some(&p), day, 1000, 0.5),
            Next::Requeue {
                ready_at: 1000,
                attempts: 2
            }
        );
        assert_eq!(
            next(&Verdict::Refused("r".into()), 1, Some(&p), day, 1000, 0.5),
            Next::Requeue {
                ready_at: 1000,
                attempts: 0
            }
        );
        assert_eq!(
            next(&Verdict::Unavailable, 1, Some(&p), day, 1000, 0.5),
            Next::Unavailable {
                recheck_at: 1000 + 86_400_000
            }
        );
    }

    fn any_outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            (-5i32..300).prop_map(Outcome::Exited),
            Just(Outcome::TimedOut),
            Just(Outcome::Cancelled),
            Just(Outcome::SpawnFailed),
            (-5i32..300).prop_map(Outcome::UploadFailed),
            (1i32..64).prop_map(Outcome::Signaled),
            Just(Outcome::Refused),
            Just(Outcome::Unreported),
        ]
    }

    proptest! {
        /// A task dies only after its last counted attempt, a refusal gives
        /// its attempt back, and a retry lands within the policy's bounds.
        #[test]
        fn next_states_respect_the_policy(
            outcome in any_outcome(),
            missing in any::<bool>(),
            attempt in 1u32..8,
            max_attempts in 1u32..6,
            now in 0i64..1_000_000_000,
            unit in 0.0f64..1.0,
        ) {
            let p = policy(max_attempts);
            let check = ObjectCheck {
                missing: if missing { vec!["k".into()] } else { vec![] },
                too_small: vec![],
            };
            let verdict = judge(outcome, "m", &check, 1);
            let state = next(&verdict, attempt, Some(&p), Duration::from_secs(60), now, unit);
            match (&verdict, state) {
                (Verdict::Done, Next::Done) => {
                    prop_assert!(outcome == Outcome::Exited(0) && !missing);
                }
                (Verdict::Unavailable, Next::Unavailable { recheck_at }) => {
                    prop_assert_eq!(recheck_at, now + 60_000);
                }
                (Verdict::Refused(_), Next::Requeue { ready_at, attempts }) => {
                    prop_assert_eq!(ready_at, now);
                    prop_assert_eq!(attempts, attempt - 1);
                }
                (Verdict::Failed { .. }, Next::Dead) => {
                    prop_assert!(attempt >= max_attempts);
                }
                (Verdict::Failed { kind, .. }, Next::Requeue { ready_at, attempts }) => {
                    prop_assert!(attempt < max_attempts);
                    prop_assert_eq!(attempts, attempt);
                    prop_assert!(ready_at >= now);
                    prop_assert!(ready_at <= now + 11_000, "{ready_at} > cap with jitter");
                    if *kind == Failure::Lost {
                        prop_assert_eq!(ready_at, now);
                    }
                }
                (v, n) => prop_assert!(false, "verdict {v:?} led to {n:?}"),
            }
        }
    }
}
