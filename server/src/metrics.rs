//! Prometheus metrics: the [`Metrics`] registry the scheduler, gateway and
//! reconciler report events to, and the state gauges set from snapshots
//! before each scrape; [`Metrics::render`] gives the OpenMetrics text that
//! `crate::transport::metrics` serves at [`METRICS_PATH`].
//!
//! Events (task results, dispatches, uploads, reconciles, throttling) are
//! counters and histograms updated where they happen. State (tasks per state,
//! coverage, agents, limit groups) is not tracked here: the caller's `refresh`
//! closure reads it from the components' snapshots right before each render,
//! and every labelled state gauge is cleared before it is set again so series
//! of vanished sources, groups or states do not linger.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::limits::GroupSnapshot;
use crate::model::{Priority, TaskState};
use crate::reconcile::plan::Coverage;

/// The path the metrics are served on.
pub const METRICS_PATH: &str = "/metrics";

/// Buckets of `adce_dispatch_wait_seconds`: from a millisecond (a hot queue)
/// to an hour (a backlog or a missing agent).
pub const DISPATCH_WAIT_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
/// Buckets of `adce_upload_seconds`: from 10 ms (a small JSON file) to 15
/// minutes (a multi-GiB multipart upload).
pub const UPLOAD_BUCKETS: [f64; 11] = [
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
];
/// Buckets of `adce_reconcile_seconds`: from 100 ms (a small catalog) to an
/// hour (a slow listing of a large bucket).
pub const RECONCILE_BUCKETS: [f64; 10] =
    [0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

/// Labels `{source, outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceOutcome {
    source: String,
    outcome: String,
}

/// Labels `{source, code}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceCode {
    source: String,
    code: String,
}

/// Labels `{source, priority}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourcePriority {
    source: String,
    priority: String,
}

/// Labels `{state, priority, source}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    state: &'static str,
    priority: &'static str,
    source: String,
}

/// Labels `{source}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

/// Labels `{group}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabel {
    group: String,
}

/// A gauge holding a float.
type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// The metric handles; each is a cheap shared reference into the registry.
#[derive(Debug)]
struct Inner {
    registry: Registry,
    task_results: Family<SourceOutcome, Counter>,
    exit_codes: Family<SourceCode, Counter>,
    dispatches: Family<SourcePriority, Counter>,
    dispatch_wait: Histogram,
    upload_bytes: Counter,
    upload_seconds: Histogram,
    reconcile_seconds: Histogram,
    reconcile_gaps: Gauge,
    reconcile_created: Counter,
    throttled: Family<GroupLabel, Counter>,
    tasks: Family<TaskLabels, Gauge>,
    coverage_expected: Family<SourceLabel, Gauge>,
    coverage_present: Family<SourceLabel, Gauge>,
    coverage_missing: Family<SourceLabel, Gauge>,
    coverage_stale: Family<SourceLabel, Gauge>,
    coverage_too_small: Family<SourceLabel, Gauge>,
    coverage_ratio: Family<SourceLabel, FloatGauge>,
    agents: Gauge,
    group_rate: Family<GroupLabel, FloatGauge>,
    group_running: Family<GroupLabel, Gauge>,
}

/// The server's metrics. Cloning is cheap and every clone reports into the
/// same registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Saturating conversion for gauges, which hold `i64`.
fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// A registry with every adce metric registered and at zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let task_results = Family::<SourceOutcome, Counter>::default();
        registry.register(
            "adce_task_results",
            "Task attempts that ended, by source and outcome",
            task_results.clone(),
        );
        let exit_codes = Family::<SourceCode, Counter>::default();
        registry.register(
            "adce_scraper_exit_codes",
            "Scraper exits, by source and exit code",
            exit_codes.clone(),
        );
        let dispatches = Family::<SourcePriority, Counter>::default();
        registry.register(
            "adce_dispatch",
            "Tasks assigned to agents, by source and effective priority",
            dispatches.clone(),
        );
        let dispatch_wait = Histogram::new(DISPATCH_WAIT_BUCKETS);
        registry.register_with_unit(
            "adce_dispatch_wait",
            "Time from a task becoming ready to its assignment",
            Unit::Seconds,
            dispatch_wait.clone(),
        );
        let upload_bytes = Counter::default();
        registry.register_with_unit(
            "adce_upload",
            "Bytes uploaded into the lake",
            Unit::Bytes,
            upload_bytes.clone(),
        );
        let upload_seconds = Histogram::new(UPLOAD_BUCKETS);
        registry.register_with_unit(
            "adce_upload",
            "Time taken by one object upload into the lake",
            Unit::Seconds,
            upload_seconds.clone(),
        );
        let reconcile_seconds = Histogram::new(RECONCILE_BUCKETS);
        registry.register_with_unit(
            "adce_reconcile",
            "Time taken by one reconcile",
            Unit::Seconds,
            reconcile_seconds.clone(),
        );
        let reconcile_gaps = Gauge::default();
        registry.register(
            "adce_reconcile_gaps",
            "Partitions with a gap found by the last reconcile",
            reconcile_gaps.clone(),
        );
        let reconcile_created = Counter::default();
        registry.register(
            "adce_reconcile_tasks_created",
            "Tasks created or reopened by reconciles",
            reconcile_created.clone(),
        );
        let throttled = Family::<GroupLabel, Counter>::default();
        registry.register(
            "adce_limit_group_throttled",
            "Times a limit group slowed down after a throttled run (exit 75)",
            throttled.clone(),
        );
        let tasks = Family::<TaskLabels, Gauge>::default();
        registry.register(
            "adce_tasks",
            "Tasks in the queue, by state, priority and source",
            tasks.clone(),
        );
        let coverage_expected = Family::<SourceLabel, Gauge>::default();
        registry.register(
            "adce_coverage_expected",
            "Objects expected, by source, at the last reconcile",
            coverage_expected.clone(),
        );
        let coverage_present = Family::<SourceLabel, Gauge>::default();
        registry.register(
            "adce_coverage_present",
            "Expected objects present and large enough, by source",
            coverage_present.clone(),
        );
        let coverage_missing = Family::<SourceLabel, Gauge>::default();
        registry.register(
            "adce_coverage_missing",
            "Expected objects absent, by source",
            coverage_missing.clone(),
        );
        let coverage_stale = Family::<SourceLabel, Gauge>::default();
        registry.register(
            "adce_coverage_stale",
            "Expected objects present but stale, by source",
            coverage_stale.clone(),
        );
        let coverage_too_small = Family::<SourceLabel, Gauge>::default();
        registry.register(
            "adce_coverage_too_small",
            "Expected objects present but smaller than min_bytes, by source",
            coverage_too_small.clone(),
        );
        let coverage_ratio = Family::<SourceLabel, FloatGauge>::default();
        registry.register(
            "adce_coverage_ratio",
            "Present over expected objects (1 when nothing is expected), by source",
            coverage_ratio.clone(),
        );
        let agents = Gauge::default();
        registry.register(
            "adce_agents_connected",
            "Agents connected now",
            agents.clone(),
        );
        let group_rate = Family::<GroupLabel, FloatGauge>::default();
        registry.register(
            "adce_limit_group_rate",
            "Effective start rate per second of a rated limit group (below the configured one while throttled)",
            group_rate.clone(),
        );
        let group_running = Family::<GroupLabel, Gauge>::default();
        registry.register(
            "adce_limit_group_running",
            "Tasks holding a slot of a limit group now",
            group_running.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                task_results,
                exit_codes,
                dispatches,
                dispatch_wait,
                upload_bytes,
                upload_seconds,
                reconcile_seconds,
                reconcile_gaps,
                reconcile_created,
                throttled,
                tasks,
                coverage_expected,
                coverage_present,
                coverage_missing,
                coverage_stale,
                coverage_too_small,
                coverage_ratio,
                agents,
                group_rate,
                group_running,
            }),
        }
    }

    /// A task attempt ended with `outcome` (e.g. `done`, `failed`, `throttled`,
    /// `unavailable`, `lost`, `cancelled`); `exit_code` is the scraper's exit
    /// code when it exited on its own (none when killed or lost).
    pub fn task_finished(&self, source: &str, outcome: &str, exit_code: Option<i32>) {
        self.inner
            .task_results
            .get_or_create(&SourceOutcome {
                source: source.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        if let Some(code) = exit_code {
            self.inner
                .exit_codes
                .get_or_create(&SourceCode {
                    source: source.to_owned(),
                    code: code.to_string(),
                })
                .inc();
        }
    }

    /// A task of `source` was assigned at `priority` after being ready for
    /// `queued_for`.
    pub fn dispatched(&self, source: &str, priority: &str, queued_for: Duration) {
        self.inner
            .dispatches
            .get_or_create(&SourcePriority {
                source: source.to_owned(),
                priority: priority.to_owned(),
            })
            .inc();
        self.inner.dispatch_wait.observe(queued_for.as_secs_f64());
    }

    /// One object of `bytes` was written into the lake in `took`.
    pub fn uploaded(&self, bytes: u64, took: Duration) {
        self.inner.upload_bytes.inc_by(bytes);
        self.inner.upload_seconds.observe(took.as_secs_f64());
    }

    /// A reconcile took `took`, found `gaps` partitions with a gap and created
    /// or reopened `created` tasks.
    pub fn reconciled(&self, took: Duration, gaps: u64, created: u64) {
        self.inner.reconcile_seconds.observe(took.as_secs_f64());
        self.inner.reconcile_gaps.set(gauge_value(gaps));
        self.inner.reconcile_created.inc_by(created);
    }

    /// Limit group `group` slowed down after a throttled run.
    pub fn throttled(&self, group: &str) {
        self.inner
            .throttled
            .get_or_create(&GroupLabel {
                group: group.to_owned(),
            })
            .inc();
    }

    /// Replaces `adce_tasks` with `counts` of `(state, priority, source, n)`;
    /// label sets not in `counts` disappear.
    pub fn set_tasks(&self, counts: &[(TaskState, Priority, String, u64)]) {
        let family = &self.inner.tasks;
        family.clear();
        for (state, priority, source, n) in counts {
            family
                .get_or_create(&TaskLabels {
                    state: state.as_str(),
                    priority: priority.as_str(),
                    source: source.clone(),
                })
                .inc_by(gauge_value(*n));
        }
    }

    /// Replaces the coverage gauges with `per_source`; sources not in it
    /// disappear.
    pub fn set_coverage(&self, per_source: &[(String, Coverage)]) {
        let i = &self.inner;
        let counts = [
            &i.coverage_expected,
            &i.coverage_present,
            &i.coverage_missing,
            &i.coverage_stale,
            &i.coverage_too_small,
        ];
        for family in counts {
            family.clear();
        }
        i.coverage_ratio.clear();
        for (source, c) in per_source {
            let label = SourceLabel {
                source: source.clone(),
            };
            i.coverage_expected
                .get_or_create(&label)
                .set(gauge_value(c.expected));
            i.coverage_present
                .get_or_create(&label)
                .set(gauge_value(c.present));
            i.coverage_missing
                .get_or_create(&label)
                .set(gauge_value(c.missing));
            i.coverage_stale
                .get_or_create(&label)
                .set(gauge_value(c.stale));
            i.coverage_too_small
                .get_or_create(&label)
                .set(gauge_value(c.too_small));
            i.coverage_ratio
                .get_or_create(&label)
                .set(coverage_ratio(c));
        }
    }

    /// Sets the number of connected agents.
    pub fn set_agents(&self, connected: u64) {
        self.inner.agents.set(gauge_value(connected));
    }

    /// Replaces the limit group gauges with `groups`; a group without a rate
    /// has no `adce_limit_group_rate` series.
    pub fn set_limit_groups(&self, groups: &[GroupSnapshot]) {
        let i = &self.inner;
        i.group_rate.clear();
        i.group_running.clear();
        for g in groups {
            let label = GroupLabel {
                group: g.name.clone(),
            };
            if let Some(rate) = g.effective_per_sec {
                i.group_rate.get_or_create(&label).set(rate);
            }
            i.group_running
                .get_or_create(&label)
                .set(i64::from(g.running));
        }
    }

    /// The exposition in the OpenMetrics text format, `# EOF` included.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(error) = encode(&mut out, &self.inner.registry) {
            // Writing into a String cannot fail; a metric's encoder could.
            tracing::error!(%error, "cannot encode the metrics");
        }
        out
    }
}

/// present / expected, or 1 when nothing is expected.
fn coverage_ratio(c: &Coverage) -> f64 {
    if c.expected == 0 {
        1.0
    } else {
        c.present as f64 / c.expected as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coverage(expected: u64, present: u64) -> Coverage {
        Coverage {
            expected,
            present,
            missing: expected - present,
            too_small: 0,
            stale: 0,
        }
    }

    /// The sample lines of `text` whose metric name is exactly `name`.
    fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .collect()
    }

    #[test]
    fn task_gauges_drop_label_sets_that_vanished() {
        let m = Metrics::new();
        m.set_tasks(&[
            (TaskState::Pending, Priority::High, "a".into(), 3),
            (TaskState::Leased, Priority::Low, "b".into(), 1),
        ]);
        let first = m.render();
        assert!(
            first.contains(r#"adce_tasks{state="pending",priority="high",source="a"} 3"#),
            "{first}"
        );
        assert!(first.contains(r#"adce_tasks{state="leased",priority="low",source="b"} 1"#));

        m.set_tasks(&[(TaskState::Done, Priority::High, "a".into(), 4)]);
        let second = m.render();
        assert_eq!(
            samples(&second, "adce_tasks"),
            [r#"adce_tasks{state="done",priority="high",source="a"} 4"#],
            "{second}"
        );
    }

    #[test]
    fn coverage_and_group_gauges_drop_vanished_sources_and_groups() {
        let m = Metrics::new();
        m.set_coverage(&[("a".into(), coverage(4, 3)), ("b".into(), coverage(0, 0))]);
        let first = m.render();
        assert!(
            first.contains(r#"adce_coverage_ratio{source="a"} 0.75"#),
            "{first}"
        );
        assert!(
            first.contains(r#"adce_coverage_ratio{source="b"} 1.0"#),
            "{first}"
        );
        assert!(first.contains(r#"adce_coverage_missing{source="a"} 1"#));

        m.set_coverage(&[("b".into(), coverage(2, 2))]);
        let second = m.render();
        assert!(!second.contains(r#"source="a""#), "{second}");
        assert_eq!(
            samples(&second, "adce_coverage_expected"),
            [r#"adce_coverage_expected{source="b"} 2"#]
        );

        let group = |name: &str, rate: Option<f64>, running| GroupSnapshot {
            name: name.into(),
            rate: None,
            effective_per_sec: rate,
            rate_factor: 1.0,
            burst: None,
            tokens: None,
            running,
            max_concurrent: None,
            recovers_at: None,
        };
        m.set_limit_groups(&[group("site", Some(0.5), 2), group("pool", None, 1)]);
        let third = m.render();
        assert_eq!(
            samples(&third, "adce_limit_group_rate"),
            [r#"adce_limit_group_rate{group="site"} 0.5"#],
            "a group without a rate has no rate series"
        );
        m.set_limit_groups(&[group("pool", None, 0)]);
        let fourth = m.render();
        assert_eq!(
            samples(&fourth, "adce_limit_group_running"),
            [r#"adce_limit_group_running{group="pool"} 0"#]
        );
        assert!(samples(&fourth, "adce_limit_group_rate").is_empty());
    }

    #[test]
    fn histograms_count_into_cumulative_buckets() {
        let m = Metrics::new();
        m.dispatched("a", "high", Duration::from_millis(3));
        m.dispatched("a", "high", Duration::from_secs(2));
        m.dispatched("b", "low", Duration::from_secs(7200));
        let text = m.render();
        for (le, n) in [
            ("0.001", 0),
            ("0.005", 1),
            ("1.0", 1),
            ("5.0", 2),
            ("3600.0", 2),
            ("+Inf", 3),
        ] {
            let line = format!(r#"adce_dispatch_wait_seconds_bucket{{le="{le}"}} {n}"#);
            assert!(text.contains(&line), "missing `{line}` in\n{text}");
        }
        assert!(
            text.contains("adce_dispatch_wait_seconds_count 3"),
            "{text}"
        );
        assert!(
            text.contains("adce_dispatch_wait_seconds_sum 7202.003"),
            "{text}"
        );
        assert!(text.contains(r#"adce_dispatch_total{source="a",priority="high"} 2"#));
    }

    #[test]
    fn bucket_bounds_rise_strictly() {
        for (name, buckets) in [
            ("dispatch wait", &DISPATCH_WAIT_BUCKETS[..]),
            ("upload", &UPLOAD_BUCKETS[..]),
            ("reconcile", &RECONCILE_BUCKETS[..]),
        ] {
            assert!(
                buckets.windows(2).all(|w| w[0] < w[1]),
                "{name} buckets do not rise: {buckets:?}"
            );
        }
    }

    #[test]
    fn events_count_and_exit_codes_are_labelled() {
        let m = Metrics::new();
        m.task_finished("a", "done", Some(0));
        m.task_finished("a", "throttled", Some(75));
        m.task_finished("a", "lost", None);
        m.uploaded(1000, Duration::from_millis(20));
        m.uploaded(24, Duration::from_millis(20));
        m.reconciled(Duration::from_secs(1), 7, 5);
        m.reconciled(Duration::from_secs(1), 2, 1);
        m.throttled("site");
        let text = m.render();
        for line in [
            r#"adce_task_results_total{source="a",outcome="done"} 1"#,
            r#"adce_task_results_total{source="a",outcome="lost"} 1"#,
            r#"adce_scraper_exit_codes_total{source="a",code="75"} 1"#,
            "adce_upload_bytes_total 1024",
            "adce_upload_seconds_count 2",
            "adce_reconcile_gaps 2",
            "adce_reconcile_tasks_created_total 6",
            r#"adce_limit_group_throttled_total{group="site"} 1"#,
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
        assert_eq!(
            samples(&text, "adce_scraper_exit_codes_total").len(),
            2,
            "a lost attempt has no exit code"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
