//! Live coverage: the last reconcile's figures, moved by the uploads
//! committed since, so status, coverage and metrics show progress while a
//! cycle runs. An upload of an expected key that the lake did not have moves
//! one object from missing to present (from too small to present when the
//! old object was below `min_bytes`); one that replaces a present object
//! moves nothing. The next reconcile replaces the figures with observed
//! truth, corrected for the uploads committed while it observed.
//!
//! Invariants:
//! - Every figure is the reconcile's plus the uploads' moves; none goes
//!   below zero, and `expected` never changes between reconciles.
//! - An upload committed after a reconcile began observing is counted once:
//!   in the figures it moved then, and again in the new report only if the
//!   new observation did not see its object ([`LiveCoverage::install`]).
//! - At most [`MAX_RECORDED`] uploads are remembered during one observation;
//!   beyond that the new report may undercount until the next reconcile.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::CoverageReport;
use super::observed::ObservedIndex;
use super::plan::Coverage;
use crate::model::UnixMs;

/// Uploads remembered while one reconcile observes.
pub const MAX_RECORDED: usize = 100_000;

/// How one committed upload moved a source's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// The key was absent: missing → present (or → too small).
    FromMissing,
    /// The old object was below `min_bytes`: too small → present.
    FromTooSmall,
    /// The object was present already (or is still too small): no move.
    None,
}

impl Move {
    /// The move of an upload of `size` bytes over an object of `prior` bytes
    /// (`None`: absent), for a source whose objects need `min_bytes`.
    pub fn of(prior: Option<u64>, size: u64, min_bytes: u64) -> Move {
        match prior {
            None => Move::FromMissing,
            Some(old) if old < min_bytes && size >= min_bytes => Move::FromTooSmall,
            Some(_) => Move::None,
        }
    }

    /// Applies the move to `c`, for a new object of `size` bytes; whether
    /// there was an object to move.
    fn apply(self, c: &mut Coverage, size: u64, min_bytes: u64) -> bool {
        let now_present = size >= min_bytes;
        match self {
            Move::FromMissing if c.missing > 0 => {
                c.missing -= 1;
                if now_present {
                    c.present += 1;
                } else {
                    c.too_small += 1;
                }
                true
            }
            Move::FromTooSmall if c.too_small > 0 => {
                c.too_small -= 1;
                c.present += 1;
                true
            }
            _ => false,
        }
    }
}

/// One upload committed while a reconcile observed.
#[derive(Debug, Clone)]
struct Recorded {
    source: String,
    key: String,
    size: u64,
    min_bytes: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Shared with readers; an upload copies it only while one holds it.
    report: Arc<CoverageReport>,
    /// When an upload last moved the figures (0: not since the reconcile).
    updated_at: UnixMs,
    /// Uploads since the running reconcile began observing, if one runs.
    recorded: Option<Vec<Recorded>>,
}

/// Moves one object of `source` in `report` (its figures, the total, and
/// the missing-key list); whether anything moved.
fn move_object(
    report: &mut CoverageReport,
    source: &str,
    key: &str,
    movement: Move,
    size: u64,
    min_bytes: u64,
) -> bool {
    let Some(i) = report
        .sources
        .iter()
        .position(|(name, _, _)| name == source)
    else {
        return false; // not in the report: a source added since
    };
    // The total moves with its source, so it stays the sources' sum.
    if !movement.apply(&mut report.sources[i].2, size, min_bytes) {
        return false;
    }
    movement.apply(&mut report.total, size, min_bytes);
    if movement == Move::FromMissing
        && let Some(keys) = report.missing.get_mut(i)
    {
        keys.retain(|k| k != key);
    }
    true
}

/// The shared live coverage: the gateway moves it, the loop installs each
/// reconcile's report, everyone else reads snapshots.
#[derive(Debug, Clone, Default)]
pub struct LiveCoverage(Arc<Mutex<State>>);

impl LiveCoverage {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The figures now, and when an upload last moved them (0: not since
    /// the reconcile that computed them). Cheap: the report is shared.
    pub fn snapshot(&self) -> (Arc<CoverageReport>, UnixMs) {
        let state = self.lock();
        (Arc::clone(&state.report), state.updated_at)
    }

    /// An upload of `key` (`size` bytes, over an object of `prior` bytes or
    /// none) for `source` was committed at `now`.
    pub fn uploaded(
        &self,
        source: &str,
        key: &str,
        prior: Option<u64>,
        size: u64,
        min_bytes: u64,
        now: UnixMs,
    ) {
        let mut state = self.lock();
        if let Some(recorded) = &mut state.recorded
            && recorded.len() < MAX_RECORDED
        {
            recorded.push(Recorded {
                source: source.to_owned(),
                key: key.to_owned(),
                size,
                min_bytes,
            });
        }
        let movement = Move::of(prior, size, min_bytes);
        if movement != Move::None
            && move_object(
                Arc::make_mut(&mut state.report),
                source,
                key,
                movement,
                size,
                min_bytes,
            )
        {
            state.updated_at = now;
        }
    }

    /// A reconcile begins observing the lake: uploads from now on are
    /// remembered, to correct its report.
    pub fn observing(&self) {
        self.lock().recorded = Some(Vec::new());
    }

    /// Installs a reconcile's `report`, observed as `index`: the uploads
    /// committed since it began observing whose objects the observation
    /// missed (or saw too small) move the new figures as they moved the old.
    pub fn install(&self, mut report: CoverageReport, index: Option<&ObservedIndex>) {
        let mut state = self.lock();
        let recorded = state.recorded.take().unwrap_or_default();
        let mut updated = false;
        if let Some(index) = index {
            for r in &recorded {
                let seen = index.get(&r.key).map(|o| o.size);
                let movement = Move::of(seen, r.size, r.min_bytes);
                updated |= move_object(
                    &mut report,
                    &r.source,
                    &r.key,
                    movement,
                    r.size,
                    r.min_bytes,
                );
            }
        }
        state.updated_at = if updated { report.computed_at } else { 0 };
        state.report = Arc::new(report);
    }

    /// A reconcile failed: stop remembering uploads for it.
    pub fn abandon(&self) {
        self.lock().recorded = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Priority;
    use crate::reconcile::observed::ObservedObject;

    fn report(missing: u64, too_small: u64, present: u64) -> CoverageReport {
        let c = Coverage {
            expected: missing + too_small + present,
            present,
            missing,
            too_small,
            stale: 0,
        };
        CoverageReport {
            sources: vec![("a".into(), Priority::Medium, c)],
            missing: vec![vec!["k/1".into(), "k/2".into()]],
            total: c,
            computed_at: 1_000,
            evidence: "listing".into(),
        }
    }

    #[test]
    fn uploads_move_missing_and_too_small_objects_to_present() {
        let live = LiveCoverage::default();
        live.install(report(3, 1, 0), None);
        live.uploaded("a", "k/1", None, 10, 5, 2_000);
        let (r, at) = live.snapshot();
        assert_eq!((r.total.missing, r.total.present), (2, 1));
        assert_eq!(r.sources[0].2, r.total);
        assert_eq!(r.missing[0], ["k/2"]);
        assert_eq!(at, 2_000);
        // Too small over too small stays; over it becomes present.
        live.uploaded("a", "k/9", Some(1), 2, 5, 2_001);
        live.uploaded("a", "k/9", Some(2), 9, 5, 2_002);
        let (r, _) = live.snapshot();
        assert_eq!((r.total.too_small, r.total.present), (0, 2));
        // A present object replaced moves nothing; an absent one that is
        // too small moves missing to too small.
        live.uploaded("a", "k/1", Some(10), 11, 5, 2_003);
        live.uploaded("a", "k/3", None, 1, 5, 2_004);
        let (r, _) = live.snapshot();
        assert_eq!(
            (r.total.missing, r.total.too_small, r.total.present),
            (1, 1, 2)
        );
        assert_eq!(r.total.expected, 4);
        // Nothing goes below zero, whatever is uploaded.
        for i in 0..10 {
            live.uploaded("a", &format!("x/{i}"), None, 10, 5, 3_000);
        }
        let (r, _) = live.snapshot();
        assert_eq!((r.total.missing, r.total.present), (0, 3));
        // Unknown sources are ignored.
        live.uploaded("zzz", "k", None, 10, 5, 4_000);
        assert_eq!(live.snapshot().0.total, r.total);
    }

    /// An upload a source has nothing left to move for (its missing count
    /// is already 0) moves neither it nor the total, which stays the sum.
    #[test]
    fn the_total_stays_the_sum_of_the_sources() {
        let live = LiveCoverage::default();
        let mut r = report(2, 0, 0);
        let full = Coverage {
            expected: 1,
            present: 1,
            ..Coverage::default()
        };
        r.sources.push(("b".into(), Priority::Low, full));
        r.missing.push(Vec::new());
        r.total.add(&full);
        live.install(r, None);
        live.uploaded("b", "b/1", None, 10, 5, 2_000);
        let (r, at) = live.snapshot();
        assert_eq!((r.total.missing, r.total.present), (2, 1));
        assert_eq!(at, 0, "nothing moved");
        let mut sum = Coverage::default();
        for (_, _, c) in &r.sources {
            sum.add(c);
        }
        assert_eq!(sum, r.total);
    }

    #[test]
    fn a_new_report_counts_uploads_its_observation_missed_once() {
        let live = LiveCoverage::default();
        live.install(report(3, 0, 0), None);
        live.observing();
        // Two uploads while the reconcile observes: one its listing saw,
        // one it did not.
        live.uploaded("a", "k/1", None, 10, 5, 2_000);
        live.uploaded("a", "k/2", None, 10, 5, 2_001);
        let mut index = ObservedIndex::default();
        index.insert(
            "k/1",
            ObservedObject {
                size: 10,
                modified_ms: 1,
            },
        );
        // The new report: k/1 present, k/2 and k/3 missing.
        live.install(report(2, 0, 1), Some(&index));
        let (r, at) = live.snapshot();
        assert_eq!((r.total.missing, r.total.present), (1, 2));
        assert_eq!(r.missing[0], ["k/1"], "k/2 left the missing list");
        assert_eq!(at, 1_000);
        // Without uploads during the observation the report stands as is.
        live.observing();
        live.install(report(2, 0, 1), Some(&index));
        let (r, at) = live.snapshot();
        assert_eq!((r.total.missing, r.total.present, at), (2, 1, 0));
    }
}
