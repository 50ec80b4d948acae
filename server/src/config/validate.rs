//! Checks that span several values of a deserialized config (references between
//! sections, template variables against partitions, duplicates, ranges), each error
//! pointing at the offending value through the document's [`PositionIndex`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use chrono::NaiveDate;
use serde::Deserializer;

use super::position::{Position, PositionIndex, YamlPath};
use super::scalars::{excerpt, from_text, is_valid_name, is_valid_var};
use super::webhook::WebhookTarget;
use super::{
    Config, DateEnd, FromObjectsGenerator, Generator, ScraperConfig, SeasonEnd, SourceConfig,
    VarKind,
};
use crate::extract::Column;
use crate::model::{InvalidKey, MAX_KEY_LEN, MAX_VALUE_LEN, SPECIAL_VARS, VAR_OUT, validate_key};
use crate::template::{Arg, Template, is_ident};

/// A validation failure: where and what.
#[derive(Debug)]
pub(super) struct Issue {
    pub position: Option<Position>,
    pub message: String,
}

/// Environment variables with this prefix are set by adce itself.
const RESERVED_ENV_PREFIX: &str = "ADCE_";

/// The shortest aging period other than off: the queue counts in milliseconds.
const MIN_AGING: Duration = Duration::from_millis(1);

/// The date object key templates are probed with.
const PROBE_DATE: (i32, u32, u32) = (2001, 2, 3);

/// Deserializes a source name, checking `[A-Za-z0-9_.-]{1,64}`.
pub(super) fn de_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct Name(String);
    impl FromStr for Name {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, String> {
            if is_valid_name(s) {
                Ok(Name(s.to_owned()))
            } else {
                Err(name_error("source", s))
            }
        }
    }
    from_text::<D, Name>(d, "a name").map(|n| n.0)
}

fn name_error(what: &str, s: &str) -> String {
    format!(
        "invalid {what} name `{}`: expected [A-Za-z0-9_.-]{{1,64}}",
        excerpt(s)
    )
}

/// Runs every check, returning the first failure in roughly document order.
pub(super) fn check(cfg: &Config, idx: &PositionIndex) -> Result<(), Issue> {
    let v = Validator {
        cfg,
        idx,
        root: YamlPath::root(),
    };
    v.duplicate_keys()?;
    v.server()?;
    v.metrics()?;
    v.lake()?;
    v.loop_section()?;
    v.alerts()?;
    v.limits()?;
    for (name, scraper) in &cfg.scrapers {
        v.scraper(name, scraper)?;
    }
    v.sources()?;
    for (name, scraper) in &cfg.scrapers {
        v.scraper_vars(name, scraper)?;
    }
    Ok(())
}

struct Validator<'a> {
    cfg: &'a Config,
    idx: &'a PositionIndex,
    root: YamlPath,
}

fn list(names: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let all: Vec<String> = names.into_iter().map(|n| n.as_ref().to_owned()).collect();
    if all.is_empty() {
        "none".to_owned()
    } else {
        all.join(", ")
    }
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl Validator<'_> {
    fn at(&self, path: &YamlPath, message: String) -> Issue {
        Issue {
            position: self.idx.value(path),
            message,
        }
    }

    fn at_key(&self, path: &YamlPath, message: String) -> Issue {
        Issue {
            position: self.idx.key(path),
            message,
        }
    }

    fn positive(&self, path: &YamlPath, d: Duration) -> Result<(), Issue> {
        if d.is_zero() {
            return Err(self.at(
                path,
                format!(
                    "`{}` must be longer than 0s",
                    path.last_key().unwrap_or_default()
                ),
            ));
        }
        Ok(())
    }

    fn duplicate_keys(&self) -> Result<(), Issue> {
        match self.idx.duplicates().first() {
            Some((path, pos)) => Err(Issue {
                position: Some(*pos),
                message: format!(
                    "duplicate key `{}` in `{}`",
                    path.last_key().unwrap_or_default(),
                    path.parent().unwrap_or_default()
                ),
            }),
            None => Ok(()),
        }
    }

    fn server(&self) -> Result<(), Issue> {
        let s = &self.cfg.server;
        let p = self.root.key("server");
        self.positive(&p.key("heartbeat_interval"), s.heartbeat_interval)?;
        if s.lease_ttl <= s.heartbeat_interval {
            return Err(self.at(
                &p.key("lease_ttl"),
                format!(
                    "lease_ttl ({}) must be longer than heartbeat_interval ({})",
                    human(s.lease_ttl),
                    human(s.heartbeat_interval)
                ),
            ));
        }
        if s.max_upload_bytes == 0 {
            return Err(self.at(
                &p.key("max_upload_bytes"),
                "`max_upload_bytes` must be at least 1".into(),
            ));
        }
        self.positive(&p.key("max_upload_time"), s.max_upload_time)?;
        if s.state_dir.as_os_str().is_empty() {
            return Err(self.at(&p.key("state_dir"), "`state_dir` must not be empty".into()));
        }
        if s.max_message_bytes < super::MIN_MAX_MESSAGE_BYTES
            || usize::try_from(s.max_message_bytes).is_err()
        {
            return Err(self.at(
                &p.key("max_message_bytes"),
                format!(
                    "`max_message_bytes` must be at least 1MiB ({} bytes): agents upload in chunks of 256KiB",
                    super::MIN_MAX_MESSAGE_BYTES
                ),
            ));
        }
        for (key, value) in [
            ("max_agents", s.max_agents),
            ("max_slots_per_agent", s.max_slots_per_agent),
        ] {
            if value == 0 {
                return Err(self.at(&p.key(key), format!("`{key}` must be at least 1")));
            }
        }
        // Every agent holds one Connect stream and opens an upload per object:
        // a connection needs room for both.
        if s.max_concurrent_streams < 2 {
            return Err(self.at(
                &p.key("max_concurrent_streams"),
                "`max_concurrent_streams` must be at least 2 (an agent's Connect stream and an upload)"
                    .into(),
            ));
        }
        let retention = p.key("log_retention");
        self.positive(&retention.key("max_age"), s.log_retention.max_age)?;
        if s.log_retention.max_rows == 0 {
            return Err(self.at(
                &retention.key("max_rows"),
                "`max_rows` must be at least 1".into(),
            ));
        }
        // The rate's count is at least 1 by its own parsing.
        if s.agent_messages.burst == 0 {
            return Err(self.at(
                &p.key("agent_messages").key("burst"),
                "`burst` must be at least 1".into(),
            ));
        }
        Ok(())
    }

    fn alerts(&self) -> Result<(), Issue> {
        let a = &self.cfg.alerts;
        let p = self.root.key("alerts");
        if !(0.0..=1.0).contains(&a.failure_rate.ratio) {
            return Err(self.at(
                &p.key("failure_rate").key("ratio"),
                "`ratio` must be between 0 and 1".into(),
            ));
        }
        // The same parse the health checker posts with; the URL is not echoed
        // back, since webhook URLs carry their secret in the path.
        let target = match &a.webhook {
            Some(url) => Some(
                WebhookTarget::parse(url)
                    .map_err(|why| self.at(&p.key("webhook"), format!("invalid webhook: {why}")))?,
            ),
            None => None,
        };
        if let Some(ca) = &a.webhook_ca {
            if ca.as_os_str().is_empty() {
                return Err(self.at(
                    &p.key("webhook_ca"),
                    "`webhook_ca` must not be empty".into(),
                ));
            }
            if !target.as_ref().is_some_and(WebhookTarget::is_tls) {
                return Err(self.at_key(
                    &p.key("webhook_ca"),
                    "`webhook_ca` needs an https:// `webhook`".into(),
                ));
            }
        }
        Ok(())
    }

    fn metrics(&self) -> Result<(), Issue> {
        let Some(m) = &self.cfg.metrics else {
            return Ok(());
        };
        let grpc = self.cfg.server.listen;
        // Port 0 picks a free port at bind time, so it never clashes.
        let clash = m.listen.port() != 0
            && m.listen.port() == grpc.port()
            && (m.listen.ip() == grpc.ip()
                || m.listen.ip().is_unspecified()
                || grpc.ip().is_unspecified());
        if clash {
            return Err(self.at(
                &self.root.key("metrics").key("listen"),
                format!(
                    "`metrics.listen` ({}) must differ from `server.listen` ({grpc})",
                    m.listen
                ),
            ));
        }
        Ok(())
    }

    fn lake(&self) -> Result<(), Issue> {
        let p = self.root.key("lake");
        let lake = &self.cfg.lake;
        match (&lake.local, &lake.s3) {
            (None, None) => Err(self.at(
                &p,
                "the lake needs `local: {root: DIR}` or `s3: {bucket: NAME}`".into(),
            )),
            (Some(_), Some(_)) => Err(self.at(
                &p.key("s3"),
                "the lake is either `local` or `s3`, not both".into(),
            )),
            (Some(local), None) if local.root.as_os_str().is_empty() => Err(self.at(
                &p.key("local").key("root"),
                "`lake.local.root` must not be empty".into(),
            )),
            (Some(_), None) => Ok(()),
            (None, Some(s3)) => self.s3(&p.key("s3"), s3),
        }
    }

    fn s3(&self, p: &YamlPath, s3: &super::S3Lake) -> Result<(), Issue> {
        const MIN_PART: u64 = 5 * 1024 * 1024;
        if s3.bucket.is_empty() {
            return Err(self.at(&p.key("bucket"), "`bucket` must not be empty".into()));
        }
        if s3.prefix.starts_with('/') || s3.prefix.contains("//") {
            return Err(self.at(
                &p.key("prefix"),
                format!(
                    "prefix `{}` must not start with `/` or contain `//`",
                    s3.prefix
                ),
            ));
        }
        if s3.multipart_part_size < MIN_PART {
            return Err(self.at(
                &p.key("multipart_part_size"),
                "`multipart_part_size` must be at least 5MiB (S3's minimum part size)".into(),
            ));
        }
        if s3.list_concurrency == 0 {
            return Err(self.at(
                &p.key("list_concurrency"),
                "`list_concurrency` must be at least 1".into(),
            ));
        }
        self.positive(&p.key("abort_incomplete_after"), s3.abort_incomplete_after)?;
        // The sweep must never take an upload that is still allowed to stream.
        let max_upload_time = self.cfg.server.max_upload_time;
        if s3.abort_incomplete_after <= max_upload_time {
            // Point at whichever of the two the file spells out.
            let abort = p.key("abort_incomplete_after");
            let at = if self.idx.contains(&abort) {
                abort
            } else {
                self.root.key("server").key("max_upload_time")
            };
            return Err(self.at(
                &at,
                format!(
                    "abort_incomplete_after ({}) must be longer than server.max_upload_time ({}): \
                     uploads still streaming would be aborted",
                    human(s3.abort_incomplete_after),
                    human(max_upload_time)
                ),
            ));
        }
        if let Some(inv) = &s3.inventory {
            let ip = p.key("inventory");
            if inv.bucket.is_empty() {
                return Err(self.at(&ip.key("bucket"), "`bucket` must not be empty".into()));
            }
            if inv.config_id.is_empty() || inv.config_id.contains('/') {
                return Err(self.at(
                    &ip.key("config_id"),
                    "`config_id` must be a non-empty name without `/`".into(),
                ));
            }
        }
        Ok(())
    }

    fn loop_section(&self) -> Result<(), Issue> {
        let l = &self.cfg.r#loop;
        let p = self.root.key("loop");
        self.positive(&p.key("reconcile_interval"), l.reconcile_interval)?;
        self.positive(&p.key("queue_check_interval"), l.queue_check_interval)?;
        self.positive(&p.key("max_cycle_runtime"), l.max_cycle_runtime)?;
        if !l.aging.is_zero() && l.aging < MIN_AGING {
            return Err(self.at(
                &p.key("aging"),
                format!(
                    "`aging` must be 0s (off) or at least 1ms, got {}",
                    human(l.aging)
                ),
            ));
        }
        if l.dispatch_threshold == 0 {
            return Err(self.at(
                &p.key("dispatch_threshold"),
                "`dispatch_threshold` must be at least 1".into(),
            ));
        }
        Ok(())
    }

    fn limits(&self) -> Result<(), Issue> {
        for (name, g) in &self.cfg.limits {
            let p = self.root.key("limits").key(name);
            if !is_valid_name(name) {
                return Err(self.at_key(&p, name_error("limit group", name)));
            }
            if g.burst.is_some() && g.rate.is_none() {
                return Err(self.at(
                    &p.key("burst"),
                    format!("limit group `{name}` has a burst but no rate"),
                ));
            }
            if g.burst == Some(0) {
                return Err(self.at(&p.key("burst"), "`burst` must be at least 1".into()));
            }
            if g.max_concurrent == Some(0) {
                return Err(self.at(
                    &p.key("max_concurrent"),
                    "`max_concurrent` must be at least 1 (omit it for no cap)".into(),
                ));
            }
        }
        Ok(())
    }

    /// Checks of one scraper that need nothing but the scraper and the limit groups.
    fn scraper(&self, name: &str, s: &ScraperConfig) -> Result<(), Issue> {
        let p = self.root.key("scrapers").key(name);
        if !is_valid_name(name) {
            return Err(self.at_key(&p, name_error("scraper", name)));
        }
        if s.command.is_empty() {
            return Err(self.at(
                &p.key("command"),
                format!("scraper `{name}` has an empty command"),
            ));
        }
        if s.command[0].as_str().trim().is_empty() {
            return Err(self.at(
                &p.key("command").idx(0),
                format!("scraper `{name}` has an empty program name"),
            ));
        }
        self.positive(&p.key("timeout"), s.timeout)?;
        let r = &s.retry;
        let rp = p.key("retry");
        if r.max_attempts == 0 {
            return Err(self.at(
                &rp.key("max_attempts"),
                "`max_attempts` must be at least 1".into(),
            ));
        }
        if !(r.multiplier.is_finite() && r.multiplier >= 1.0) {
            return Err(self.at(
                &rp.key("multiplier"),
                format!("`multiplier` must be at least 1.0, got {}", r.multiplier),
            ));
        }
        if !(r.jitter.is_finite() && (0.0..=1.0).contains(&r.jitter)) {
            return Err(self.at(
                &rp.key("jitter"),
                format!("`jitter` must be between 0 and 1, got {}", r.jitter),
            ));
        }
        if r.backoff > r.max_backoff {
            return Err(self.at(
                &rp.key("backoff"),
                format!(
                    "backoff ({}) exceeds max_backoff ({})",
                    human(r.backoff),
                    human(r.max_backoff)
                ),
            ));
        }
        for (i, group) in s.limits.iter().enumerate() {
            let lp = p.key("limits").idx(i);
            if !self.cfg.limits.contains_key(group) {
                return Err(self.at(
                    &lp,
                    format!(
                        "scraper `{name}` uses limit group `{}`, which is not defined (defined: {})",
                        excerpt(group),
                        list(self.cfg.limits.keys())
                    ),
                ));
            }
            if s.limits[..i].contains(group) {
                return Err(self.at(
                    &lp,
                    format!("scraper `{name}` lists limit group `{group}` twice"),
                ));
            }
        }
        for (label, value) in &s.requires {
            let lp = p.key("requires").key(label);
            if !is_valid_name(label) {
                return Err(self.at_key(&lp, name_error("label", label)));
            }
            if value.is_empty() || value.len() > 256 || value.chars().any(char::is_control) {
                return Err(self.at(
                    &lp,
                    format!("label `{label}` needs a value of 1 to 256 printable characters"),
                ));
            }
        }
        for (key, value) in &s.env {
            let ep = p.key("env").key(key);
            if !is_ident(key) {
                return Err(self.at_key(
                    &ep,
                    format!(
                        "invalid environment variable name `{}`: expected [A-Za-z_][A-Za-z0-9_]*",
                        excerpt(key)
                    ),
                ));
            }
            if key.to_ascii_uppercase().starts_with(RESERVED_ENV_PREFIX) {
                return Err(self.at_key(
                    &ep,
                    format!("environment variable `{key}` is reserved: adce sets `ADCE_*` itself"),
                ));
            }
            if value.vars().any(|v| v == VAR_OUT) {
                return Err(self.at(
                    &ep,
                    format!("`{{out}}` is only available in `command`; scrapers find the output directory in $ADCE_OUTPUT_DIR (env `{key}`)"),
                ));
            }
        }
        let templates = s
            .command
            .iter()
            .enumerate()
            .map(|(i, t)| (p.key("command").idx(i), t))
            .chain(s.env.iter().map(|(k, t)| (p.key("env").key(k), t)));
        for (tp, t) in templates {
            for ph in t.placeholders() {
                if SPECIAL_VARS.contains(&ph.name()) && ph.format().is_some() {
                    return Err(self.at(
                        &tp,
                        format!(
                            "`{{{}}}` is not a date and takes no format (template `{}`)",
                            ph.name(),
                            excerpt(t.as_str())
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn generator_path(&self, source: usize, j: usize, g: &Generator) -> YamlPath {
        let parts = self.root.key("sources").idx(source).key("partitions");
        let listed = parts.idx(j);
        if self.idx.contains(&listed) {
            listed.key(g.key())
        } else {
            parts.key(g.key())
        }
    }

    fn sources(&self) -> Result<(), Issue> {
        let mut names: HashMap<&str, usize> = HashMap::new();
        // Each template's users so far: (source, its index in `objects`).
        let mut templates: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, s) in self.cfg.sources.iter().enumerate() {
            let p = self.root.key("sources").idx(i);
            if let Some(first) = names.insert(&s.name, i) {
                let first_at = self
                    .idx
                    .value(&self.root.key("sources").idx(first).key("name"))
                    .map(|pos| format!(" at line {}", pos.line))
                    .unwrap_or_default();
                return Err(self.at(
                    &p.key("name"),
                    format!(
                        "duplicate source name `{}` (first defined as sources[{first}]{first_at})",
                        s.name
                    ),
                ));
            }
            if !self.cfg.scrapers.contains_key(&s.scraper) {
                return Err(self.at(
                    &p.key("scraper"),
                    format!(
                        "source `{}` uses scraper `{}`, which is not defined (defined: {})",
                        s.name,
                        excerpt(&s.scraper),
                        list(self.cfg.scrapers.keys())
                    ),
                ));
            }
            self.generators(i, s)?;
            self.freshness(&p, s)?;
            self.priority_rules(&p, s)?;
            if s.objects.is_empty() {
                return Err(self.at(
                    &p.key("objects"),
                    format!(
                        "source `{}` has no objects: list at least one key template",
                        s.name
                    ),
                ));
            }
            for (j, t) in s.objects.iter().enumerate() {
                let op = p.key("objects").idx(j);
                self.object_template(s, &op, t)?;
                let users = templates.entry(t.as_str()).or_default();
                for &other in users.iter() {
                    self.shared_template(other, i, t, &op)?;
                }
                users.push(i);
            }
        }
        Ok(())
    }

    /// Source `later` uses template `t` (at `op`) that source `earlier` uses
    /// too: allowed when, as of today, no key of one is a key of the other.
    /// The error names both sources and the first key (in `later`'s order)
    /// they would both expect. A dependent source's keys are known only
    /// from its parent objects, so each reconcile checks those pairs.
    fn shared_template(
        &self,
        earlier: usize,
        later: usize,
        t: &Template,
        op: &YamlPath,
    ) -> Result<(), Issue> {
        let (a, b) = (&self.cfg.sources[earlier], &self.cfg.sources[later]);
        if earlier == later {
            return Err(self.at(
                op,
                format!(
                    "object key template `{}` is listed twice in source `{}`",
                    excerpt(t.as_str()),
                    b.name
                ),
            ));
        }
        let dependent = |s: &SourceConfig| {
            s.partitions
                .0
                .iter()
                .any(|g| matches!(g, Generator::FromObjects(_)))
        };
        if dependent(a) || dependent(b) {
            // Known only once parent objects are read: each reconcile checks.
            return Ok(());
        }
        let today = chrono::Utc::now().date_naive();
        let mut theirs = HashSet::new();
        Generator::for_each_key(&a.partitions.0, t, today, |k| {
            theirs.insert(k);
            false
        });
        let mut shared = None;
        Generator::for_each_key(&b.partitions.0, t, today, |k| {
            let hit = theirs.contains(&k);
            if hit {
                shared = Some(k);
            }
            hit
        });
        match shared {
            Some(key) => Err(self.at(
                op,
                format!(
                    "sources `{}` and `{}` both expect key `{}` (object key template `{}`); sources may share a template only when their partitions are disjoint",
                    a.name,
                    b.name,
                    excerpt(&key),
                    excerpt(t.as_str())
                ),
            )),
            None => Ok(()),
        }
    }

    fn generators(&self, i: usize, s: &SourceConfig) -> Result<(), Issue> {
        let mut seen: Vec<&str> = Vec::new();
        for (j, g) in s.partitions.0.iter().enumerate() {
            let gp = self.generator_path(i, j, g);
            let var = g.var();
            if SPECIAL_VARS.contains(&var) {
                return Err(self.at(
                    &gp.key("var"),
                    format!(
                        "partition variable `{var}` clashes with a built-in placeholder ({})",
                        list(SPECIAL_VARS)
                    ),
                ));
            }
            if seen.contains(&var) {
                return Err(self.at(
                    &gp.key("var"),
                    format!("source `{}` defines partition variable `{var}` twice; give each generator its own `var`", s.name),
                ));
            }
            seen.push(var);
            match g {
                Generator::Dates(d) => {
                    if let DateEnd::Date(end) = d.end
                        && end < d.start
                    {
                        return Err(self.at(
                            &gp.key("end"),
                            format!("end {end} precedes start {}", d.start),
                        ));
                    }
                    // A fixed range the filters empty is a mistake, not a
                    // source without data (an open one may gain dates).
                    let filtered =
                        !(d.windows.is_empty() && d.weekdays.is_empty() && d.except.is_empty());
                    if let DateEnd::Date(end) = d.end
                        && filtered
                        && d.dates(end).is_empty()
                    {
                        return Err(self.at(
                            &gp,
                            format!(
                                "the calendar filters (`windows`, `weekdays`, `except`) leave no date between {} and {end}",
                                d.start
                            ),
                        ));
                    }
                }
                Generator::Seasons(sg) => {
                    if let SeasonEnd::Season(end) = sg.end {
                        if end.format != sg.start.format {
                            return Err(self.at(
                                &gp.key("end"),
                                format!("end `{end}` must be written like start `{}`", sg.start),
                            ));
                        }
                        if end.year < sg.start.year {
                            return Err(self.at(
                                &gp.key("end"),
                                format!("end `{end}` precedes start `{}`", sg.start),
                            ));
                        }
                    }
                }
                Generator::FromObjects(fo) => {
                    if s.partitions.0.len() > 1 {
                        return Err(self.at_key(
                            &gp,
                            format!(
                                "`from_objects` must be the only generator of source `{}`: a dependent source cannot be part of a product",
                                s.name
                            ),
                        ));
                    }
                    self.dependency(s, &gp, fo)?;
                }
                Generator::Values(vg) => {
                    let vp = gp.key("values");
                    if vg.values.is_empty() {
                        return Err(
                            self.at(&vp, format!("`values` of `{}` must not be empty", vg.var))
                        );
                    }
                    let mut set = std::collections::HashSet::new();
                    for (k, value) in vg.values.iter().enumerate() {
                        if !set.insert(value.as_str()) {
                            return Err(self.at(
                                &vp.idx(k),
                                format!("duplicate value `{value}` for `{}`", vg.var),
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks a `from_objects` generator: a parent template that matches back, parent
    /// variables that are valid and distinct from `var`, and one extraction.
    fn dependency(
        &self,
        s: &SourceConfig,
        gp: &YamlPath,
        fo: &FromObjectsGenerator,
    ) -> Result<(), Issue> {
        let tp = gp.key("objects");
        let t = &fo.objects;
        let shown = excerpt(t.as_str());
        t.check_matchable()
            .map_err(|e| self.at(&tp, format!("parent template `{shown}`: {e}")))?;
        for (var, _) in fo.parent_vars() {
            if SPECIAL_VARS.contains(&var) {
                return Err(self.at(
                    &tp,
                    format!(
                        "parent template `{shown}` uses `{{{var}}}`, a built-in placeholder; parent templates use only variables to parse out of keys"
                    ),
                ));
            }
            if !is_valid_var(var) {
                return Err(self.at(
                    &tp,
                    format!(
                        "parent template `{shown}` uses `{{{var}}}`, which is not a valid partition variable name: expected [a-z][a-z0-9_]{{0,63}}"
                    ),
                ));
            }
            if var == fo.var {
                return Err(self.at(
                    &gp.key("var"),
                    format!(
                        "`var` `{var}` is also a variable of the parent template `{shown}`; give the extracted values another name"
                    ),
                ));
            }
        }
        let (y, m, d) = PROBE_DATE;
        let probe_date = NaiveDate::from_ymd_opt(y, m, d).unwrap_or_default();
        let probe = t
            .render(&|name| {
                Some(if t.is_date_var(name) {
                    Arg::Date(probe_date)
                } else {
                    Arg::Text("x")
                })
            })
            .map_err(|e| self.at(&tp, format!("parent template `{shown}`: {e}")))?;
        if let Err(InvalidKey { reason: why, .. }) = validate_key(&probe) {
            return Err(self.at(
                &tp,
                format!(
                    "parent template `{shown}` renders keys like `{}`, which the lake refuses: it {why}",
                    excerpt(&probe)
                ),
            ));
        }
        if s.objects.iter().any(|o| o.as_str() == t.as_str()) {
            return Err(self.at(
                &tp,
                format!(
                    "source `{}` reads its values out of its own objects (`{shown}`); a parent template names another source's objects",
                    s.name
                ),
            ));
        }
        let keys = fo.extraction_keys();
        match keys.as_slice() {
            [_] => {}
            [] => {
                return Err(self.at(
                    gp,
                    "`from_objects` needs one of `json: PATH`, `csv: {column: NAME}` or `lines: true` to read values".into(),
                ));
            }
            [first, second, ..] => {
                return Err(self.at_key(
                    &gp.key(second),
                    format!(
                        "`from_objects` reads values one way: `{first}` and `{second}` are both given"
                    ),
                ));
            }
        }
        if let Some(csv) = &fo.csv
            && let Column::Name(name) = &csv.column
            && !csv.header
        {
            return Err(self.at(
                &gp.key("csv").key("column"),
                format!(
                    "column `{}` is a name, which needs a header row: drop `header: false`, or give a 0-based index",
                    excerpt(name)
                ),
            ));
        }
        if fo.max_bytes == 0 {
            return Err(self.at(
                &gp.key("max_bytes"),
                "`max_bytes` must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Checks `refresh` (only with a date variable) and `recheck_after`.
    fn freshness(&self, p: &YamlPath, s: &SourceConfig) -> Result<(), Issue> {
        if let Some(refresh) = &s.refresh {
            let rp = p.key("refresh");
            if !s.partitions.vars().any(|(_, kind)| kind == VarKind::Date) {
                return Err(self.at(
                    &rp,
                    format!(
                        "`refresh` needs a date partition variable (a `dates` generator, or a date in a `from_objects` parent template), and source `{}` has none",
                        s.name
                    ),
                ));
            }
            self.positive(&rp.key("max_age"), refresh.max_age)?;
        }
        self.positive(&p.key("recheck_after"), s.recheck_after)
    }

    /// Checks that each priority rule has exactly one condition and that the source
    /// has the variable the condition reads.
    fn priority_rules(&self, p: &YamlPath, s: &SourceConfig) -> Result<(), Issue> {
        for (i, rule) in s.priority_rules.iter().enumerate() {
            let rp = p.key("priority_rules").idx(i);
            match (rule.within, rule.current_season) {
                (None, false) => {
                    return Err(self.at(
                        &rp,
                        format!(
                            "priority rule {} of source `{}` has no condition: give `within: DURATION` (a date variable) or `current_season: true` (a season variable)",
                            i + 1,
                            s.name
                        ),
                    ));
                }
                (Some(_), true) => {
                    return Err(self.at_key(
                        &rp.key("current_season"),
                        format!(
                            "priority rule {} of source `{}` has two conditions: `within` and `current_season` are both given; write one rule for each",
                            i + 1,
                            s.name
                        ),
                    ));
                }
                (Some(_), false) => {
                    if !s.partitions.vars().any(|(_, kind)| kind == VarKind::Date) {
                        return Err(self.at(
                            &rp.key("within"),
                            format!(
                                "`within` needs a date partition variable (a `dates` generator, or a date in a `from_objects` parent template), and source `{}` has none",
                                s.name
                            ),
                        ));
                    }
                }
                (None, true) => {
                    let has_seasons = s
                        .partitions
                        .0
                        .iter()
                        .any(|g| matches!(g, Generator::Seasons(_)));
                    if !has_seasons {
                        return Err(self.at(
                            &rp.key("current_season"),
                            format!(
                                "`current_season` needs a season partition variable (a `seasons` generator), and source `{}` has none",
                                s.name
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn object_template(
        &self,
        s: &SourceConfig,
        path: &YamlPath,
        t: &Template,
    ) -> Result<(), Issue> {
        let vars: BTreeMap<&str, VarKind> = s.partitions.vars().collect();
        let defined = || {
            if vars.is_empty() {
                "this source has no partition variables".to_owned()
            } else {
                format!("defined: {}", list(s.partitions.vars().map(|(n, _)| n)))
            }
        };
        for ph in t.placeholders() {
            match vars.get(ph.name()) {
                None => {
                    return Err(self.at(
                        path,
                        format!(
                            "object key template `{}` uses `{{{}}}`, which the partitions of source `{}` do not define ({})",
                            excerpt(t.as_str()),
                            ph.name(),
                            s.name,
                            defined()
                        ),
                    ));
                }
                Some(VarKind::Text) if ph.format().is_some() => {
                    return Err(self.at(
                        path,
                        format!(
                            "`{{{}:{}}}` formats a date, but `{}` is not a date variable",
                            ph.name(),
                            ph.format().unwrap_or_default(),
                            ph.name()
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        // A dependent source's parent variables may be left out of its keys: the values
        // it extracts identify its partitions' objects on their own.
        for var in s.partitions.0.iter().map(Generator::var) {
            if !t.vars().any(|v| v == var) {
                return Err(self.at(
                    path,
                    format!(
                        "object key template `{}` does not use partition variable `{var}`, so partitions would share keys",
                        excerpt(t.as_str())
                    ),
                ));
            }
        }
        let (y, m, d) = PROBE_DATE;
        let probe_date = NaiveDate::from_ymd_opt(y, m, d).unwrap_or_default();
        let probe = t
            .render(&|name| match vars.get(name) {
                Some(VarKind::Date) => Some(Arg::Date(probe_date)),
                Some(VarKind::Text) => Some(Arg::Text("x")),
                None => None,
            })
            .map_err(|e| {
                self.at(
                    path,
                    format!("object key template `{}`: {e}", excerpt(t.as_str())),
                )
            })?;
        if let Err(InvalidKey { reason: why, .. }) = validate_key(&probe) {
            return Err(self.at(
                path,
                format!(
                    "object key template `{}` renders keys like `{}`, which the lake refuses: it {why}",
                    excerpt(t.as_str()),
                    excerpt(&probe)
                ),
            ));
        }
        // With every value as long as values may be, a key must still fit the lake.
        let longest_value = "x".repeat(MAX_VALUE_LEN);
        let longest = t
            .render(&|name| match vars.get(name) {
                Some(VarKind::Date) => Some(Arg::Date(probe_date)),
                Some(VarKind::Text) => Some(Arg::Text(&longest_value)),
                None => None,
            })
            .unwrap_or_default();
        if longest.len() > MAX_KEY_LEN {
            return Err(self.at(
                path,
                format!(
                    "object key template `{}` can render keys of {} bytes (values may be {MAX_VALUE_LEN} characters); the lake's limit is {MAX_KEY_LEN}",
                    excerpt(t.as_str()),
                    longest.len()
                ),
            ));
        }
        Ok(())
    }

    /// Checks that every placeholder of a scraper's templates is defined by every source
    /// that uses the scraper (or is a built-in one), with formats only on dates.
    fn scraper_vars(&self, name: &str, s: &ScraperConfig) -> Result<(), Issue> {
        let p = self.root.key("scrapers").key(name);
        let users: Vec<&SourceConfig> = self
            .cfg
            .sources
            .iter()
            .filter(|src| src.scraper == name)
            .collect();
        let templates = s
            .command
            .iter()
            .enumerate()
            .map(|(i, t)| (p.key("command").idx(i), "command", t))
            .chain(s.env.iter().map(|(k, t)| (p.key("env").key(k), "env", t)));
        for (tp, place, t) in templates {
            for ph in t.placeholders() {
                if SPECIAL_VARS.contains(&ph.name()) {
                    continue;
                }
                for src in &users {
                    match src.partitions.vars().find(|(n, _)| *n == ph.name()) {
                        None => {
                            let defined: Vec<&str> =
                                src.partitions.vars().map(|(n, _)| n).collect();
                            return Err(self.at(
                                &tp,
                                format!(
                                    "scraper `{name}` uses `{{{}}}` in its {place}, but source `{}`, which uses this scraper, does not define it (partition variables: {}; built-in: {})",
                                    ph.name(),
                                    src.name,
                                    list(defined),
                                    list(SPECIAL_VARS)
                                ),
                            ));
                        }
                        Some((_, VarKind::Text)) if ph.format().is_some() => {
                            return Err(self.at(
                                &tp,
                                format!(
                                    "scraper `{name}` formats `{{{}}}` as a date, but it is not a date in source `{}`",
                                    ph.name(),
                                    src.name
                                ),
                            ));
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        Ok(())
    }
}
