//! The catalog: what SHOULD exist. Sources expand into partitions and expected object
//! keys; scrapers render into argv and environment for one task. Pure: no I/O, and
//! `today` is an argument so expansion is deterministic.
//!
//! Static sources expand on their own ([`Catalog::expand`]). Dependent sources
//! (`from_objects`) expand from values their caller read out of parent objects: the
//! caller lists the parent template's prefix, keeps the keys
//! [`FromObjects::match_parent`] accepts, reads each (at most
//! [`FromObjects::max_bytes`]), runs [`FromObjects::extract`] and hands the values to
//! [`Catalog::expand_dependent`].
//!
//! Architecture invariant: a [`Catalog`] is only built from a validated [`Config`], so
//! rendering object keys of a partition the catalog generated cannot fail.
//!
//! Architecture invariant: every partition value that reaches a key or an argv passed
//! [`crate::model::is_valid_value`] (`[A-Za-z0-9._-]{1,128}`, not only dots), whether
//! listed in the config, parsed out of a key or extracted from a parent object.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::NaiveDate;

use crate::config::{Config, FromObjectsGenerator};
pub use crate::config::{Generator, LimitGroup, Refresh, RetryPolicy, VarKind};
pub use crate::extract::{Extracted, Extractor, Rejected};
use crate::model::{
    Partition, Priority, VAR_ATTEMPT, VAR_CONFIG_DIR, VAR_OUT, VAR_SOURCE, VAR_TASK_ID, Value,
    for_each_product, is_valid_value,
};
use crate::template::{Arg, Piece, Placeholder, Template, TemplateError, parse_iso_date};

/// Every source and scraper of a config, ready to expand and render.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// Sources in config order; [`ExpectedPartition::source`] indexes this.
    pub sources: Vec<Source>,
    /// Scrapers by name.
    pub scrapers: BTreeMap<String, Scraper>,
    /// Limit groups by name.
    pub limits: BTreeMap<String, LimitGroup>,
    /// The config file's directory (the default for `{config_dir}`).
    pub config_dir: PathBuf,
    by_name: HashMap<String, usize>,
}

/// One source: partitions × object templates, filled by one scraper.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// Unique name.
    pub name: String,
    /// The scraper that fills it (a key of [`Catalog::scrapers`]).
    pub scraper: String,
    /// How urgent its gaps are.
    pub priority: Priority,
    /// Free text for people.
    pub description: Option<String>,
    /// An object smaller than this is a `too_small` gap.
    pub min_bytes: u64,
    /// Partition generators; their cartesian product in order (none: one empty
    /// partition). A dependent source has its one `from_objects` generator and expands
    /// only through [`Catalog::expand_dependent`].
    pub generators: Vec<Generator>,
    /// Object key templates; each uses every partition variable the source defines
    /// itself (a dependent source's parent variables are optional).
    pub objects: Vec<Template>,
    /// Where a dependent source's values come from.
    pub dependency: Option<FromObjects>,
    /// Re-fetch objects of recent partitions once they are this old.
    pub refresh: Option<Refresh>,
    /// How long an `unavailable` task (exit 69) waits before it is looked at again.
    pub recheck_after: Duration,
    /// Always confirm this source by listing, even when an inventory report is used.
    pub hot: bool,
    /// The source's priority rules (partition recency, current season); the
    /// first that matches a partition sets its tasks' base priority.
    pub priority_rules: crate::priority::PriorityRules,
}

/// A dependent source's parent objects and how values are read out of them.
#[derive(Debug, Clone, PartialEq)]
pub struct FromObjects {
    template: Template,
    var: String,
    parent_vars: Vec<(String, VarKind)>,
    extractor: Extractor,
}

impl FromObjects {
    /// Builds the dependency of a validated `from_objects` generator; `None` only for an
    /// unvalidated one without exactly one extraction.
    pub fn from_config(g: &FromObjectsGenerator) -> Option<FromObjects> {
        Some(FromObjects {
            template: g.objects.clone(),
            var: g.var.clone(),
            parent_vars: g
                .parent_vars()
                .into_iter()
                .map(|(n, k)| (n.to_owned(), k))
                .collect(),
            extractor: Extractor {
                extraction: g.extraction()?,
                pattern: g.pattern.clone().unwrap_or_default(),
                max_bytes: g.max_bytes,
            },
        })
    }

    /// The parent key template. Its [`Template::literal_prefix`] is among
    /// [`Catalog::prefixes`], so listing those finds every parent.
    pub fn template(&self) -> &Template {
        &self.template
    }

    /// The variable the extracted values become.
    pub fn var(&self) -> &str {
        &self.var
    }

    /// The largest parent object to read; larger ones are skipped (and
    /// [`FromObjects::extract`] reports them as an error).
    pub fn max_bytes(&self) -> u64 {
        self.extractor.max_bytes
    }

    /// How values are read and checked.
    pub fn extractor(&self) -> &Extractor {
        &self.extractor
    }

    /// The parent partition (the parent key's variables, dates typed as dates) when
    /// `key` is a parent object's key; `None` when it does not match the template or
    /// matches it in more than one way.
    pub fn match_parent(&self, key: &str) -> Option<Partition> {
        self.template.match_key(key).map(|vars| Partition { vars })
    }

    /// The values in one parent object's bytes. Pure; never panics.
    pub fn extract(&self, bytes: &[u8]) -> Extracted {
        self.extractor.extract(bytes)
    }

    /// The dependent partition of `parent` and `value`: the parent's variables followed
    /// by `var`. `None` unless `parent` has exactly the parent template's variables
    /// with valid values and `value` passes the extractor's checks.
    fn child(&self, parent: &Partition, value: &str) -> Option<Partition> {
        if parent.vars.len() != self.parent_vars.len() {
            return None;
        }
        let mut vars = Vec::with_capacity(self.parent_vars.len() + 1);
        for ((name, kind), (given, v)) in self.parent_vars.iter().zip(&parent.vars) {
            if name != given {
                return None;
            }
            let typed = match (kind, v) {
                (VarKind::Date, Value::Date(d)) => Value::Date(*d),
                (VarKind::Date, Value::Str(s)) => Value::Date(parse_iso_date(s)?),
                (VarKind::Text, Value::Str(s)) if is_valid_value(s) => Value::Str(s.clone()),
                _ => return None,
            };
            vars.push((name.clone(), typed));
        }
        let value = self.extractor.check(value.as_bytes()).ok()?;
        vars.push((self.var.clone(), Value::Str(value.to_owned())));
        Some(Partition { vars })
    }
}

/// One scraper: how to run a program for one task.
#[derive(Debug, Clone, PartialEq)]
pub struct Scraper {
    /// Its name.
    pub name: String,
    /// argv templates.
    pub command: Vec<Template>,
    /// Extra environment; values are templates.
    pub env: BTreeMap<String, Template>,
    /// Kill the run after this long.
    pub timeout: Duration,
    /// How failures are retried.
    pub retry: RetryPolicy,
    /// Limit groups every run takes from.
    pub limits: Vec<String>,
    /// Labels an agent must have.
    pub requires: BTreeMap<String, String>,
}

/// One partition of one source with the object keys it should produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedPartition {
    /// Index into [`Catalog::sources`].
    pub source: usize,
    /// The partition's variables.
    pub partition: Partition,
    /// The expected object keys, in the source's template order.
    pub keys: Vec<String>,
}

/// What one source expects, as [`Catalog::preview`] shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourcePreview {
    /// The source's name.
    pub name: String,
    /// Its partitions.
    pub partitions: u64,
    /// Its expected objects (partitions × templates).
    pub objects: u64,
    /// The first keys in expansion order.
    pub first: Vec<String>,
    /// The last keys, after `first` (never repeating one of them).
    pub last: Vec<String>,
    /// For a dependent source, the template of its parent objects.
    pub parents: Option<String>,
}

/// One piece of a rendered argv element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgPiece {
    /// Literal text.
    Text(String),
    /// The task's output directory, known only to the agent (`{out}`).
    OutputDir,
}

/// What a scraper's templates are rendered with for one task.
#[derive(Debug, Clone, Copy)]
pub struct RenderContext<'a> {
    /// The partition being filled.
    pub partition: &'a Partition,
    /// The task's id.
    pub task_id: i64,
    /// The attempt number, starting at 1.
    pub attempt: u32,
    /// The source's name.
    pub source: &'a str,
    /// What `{config_dir}` renders to.
    pub config_dir: &'a Path,
}

impl Catalog {
    /// Builds the catalog of a validated config.
    pub fn from_config(cfg: &Config) -> Catalog {
        let sources: Vec<Source> = cfg
            .sources
            .iter()
            .map(|s| Source {
                name: s.name.clone(),
                scraper: s.scraper.clone(),
                priority: s.priority,
                description: s.description.clone(),
                min_bytes: s.min_bytes,
                generators: s.partitions.0.clone(),
                objects: s.objects.clone(),
                dependency: s.partitions.dependency().and_then(FromObjects::from_config),
                refresh: s.refresh,
                recheck_after: s.recheck_after,
                hot: s.hot,
                priority_rules: crate::priority::PriorityRules::from_source(s),
            })
            .collect();
        let scrapers = cfg
            .scrapers
            .iter()
            .map(|(name, s)| {
                let scraper = Scraper {
                    name: name.clone(),
                    command: s.command.clone(),
                    env: s.env.clone(),
                    timeout: s.timeout,
                    retry: s.retry.clone(),
                    limits: s.limits.clone(),
                    requires: s.requires.clone(),
                };
                (name.clone(), scraper)
            })
            .collect();
        let by_name = sources
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        Catalog {
            sources,
            scrapers,
            limits: cfg.limits.clone(),
            config_dir: cfg.config_dir.clone(),
            by_name,
        }
    }

    /// Every expected partition of every static source, in catalog order, as of
    /// `today`. Dependent sources are left out: see [`Catalog::expand_dependent`].
    pub fn expand(&self, today: NaiveDate) -> Vec<ExpectedPartition> {
        let mut out = Vec::new();
        for (i, source) in self.sources.iter().enumerate() {
            if source.dependency.is_some() {
                continue;
            }
            for partition in source.partitions(today) {
                match source.keys(&partition) {
                    Ok(keys) => out.push(ExpectedPartition {
                        source: i,
                        partition,
                        keys,
                    }),
                    // Validation guarantees every generated partition renders.
                    Err(e) => {
                        debug_assert!(false, "source {} cannot render: {e}", source.name);
                        tracing::error!(source = %source.name, error = %e, "skipping a partition whose keys do not render");
                    }
                }
            }
        }
        out
    }

    /// What each source expects as of `today`, for a preview before anything
    /// runs: counts, and the first and last `edge` keys in expansion order.
    /// Dependent sources expect what their parents list, so only at
    /// reconcile: their preview names the parent template instead.
    pub fn preview(&self, today: NaiveDate, edge: usize) -> Vec<SourcePreview> {
        self.sources
            .iter()
            .map(|source| {
                let mut preview = SourcePreview {
                    name: source.name.clone(),
                    parents: source
                        .dependency
                        .as_ref()
                        .map(|d| d.template().as_str().to_owned()),
                    ..SourcePreview::default()
                };
                if preview.parents.is_some() {
                    return preview;
                }
                let mut last = std::collections::VecDeque::with_capacity(edge);
                for partition in source.partitions(today) {
                    preview.partitions += 1;
                    for key in source.keys(&partition).unwrap_or_default() {
                        preview.objects += 1;
                        if preview.first.len() < edge {
                            preview.first.push(key);
                        } else {
                            if last.len() == edge {
                                last.pop_front();
                            }
                            last.push_back(key);
                        }
                    }
                }
                preview.last = last.into();
                preview
            })
            .collect()
    }

    /// The partitions of dependent source `source` (an index into
    /// [`Catalog::sources`]) from its parents' extracted values: for each parent in the
    /// given order, each of its values in order, the parent's variables followed by the
    /// source's `var`. A partition whose key, or any of whose object keys, an earlier
    /// one already has is dropped (first one wins: a game listed in two daily schedules
    /// is expected once). Values that fail the source's checks and parents whose
    /// variables do not fit the parent template are skipped. Empty for a static source.
    pub fn expand_dependent(
        &self,
        source: usize,
        parents: &[(Partition, Vec<String>)],
    ) -> Vec<ExpectedPartition> {
        let Some(src) = self.sources.get(source) else {
            return Vec::new();
        };
        let Some(dep) = &src.dependency else {
            return Vec::new();
        };
        let mut partitions: HashSet<String> = HashSet::new();
        let mut keys_seen: HashSet<String> = HashSet::new();
        let mut out = Vec::new();
        for (parent, values) in parents {
            for value in values {
                let Some(partition) = dep.child(parent, value) else {
                    tracing::warn!(source = %src.name, parent = %parent.key(), "skipping a dependent value that does not fit the source");
                    continue;
                };
                if !partitions.insert(partition.key()) {
                    continue;
                }
                let keys = match src.keys(&partition) {
                    Ok(keys) => keys,
                    // Validation makes every dependent partition render.
                    Err(e) => {
                        debug_assert!(false, "source {} cannot render: {e}", src.name);
                        tracing::error!(source = %src.name, error = %e, "skipping a partition whose keys do not render");
                        continue;
                    }
                };
                if keys.iter().any(|k| keys_seen.contains(k)) {
                    continue;
                }
                keys_seen.extend(keys.iter().cloned());
                out.push(ExpectedPartition {
                    source,
                    partition,
                    keys,
                });
            }
        }
        out
    }

    /// The indexes of the dependent sources in [`Catalog::sources`].
    pub fn dependent_sources(&self) -> impl Iterator<Item = usize> + '_ {
        self.sources
            .iter()
            .enumerate()
            .filter(|(_, s)| s.dependency.is_some())
            .map(|(i, _)| i)
    }

    /// The source named `name`.
    pub fn source(&self, name: &str) -> Option<&Source> {
        self.source_index(name).map(|i| &self.sources[i])
    }

    /// The index of the source named `name` in [`Catalog::sources`].
    pub fn source_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The scraper that fills `source`.
    pub fn scraper_for(&self, source: &Source) -> Option<&Scraper> {
        self.scrapers.get(&source.scraper)
    }

    /// The literal prefixes of all object templates and of all `from_objects` parent
    /// templates, sorted, without any prefix that lies under another listed one:
    /// listing these covers every expected key and every parent object.
    pub fn prefixes(&self) -> Vec<String> {
        let mut all: Vec<&str> = self
            .sources
            .iter()
            .flat_map(|s| {
                s.objects
                    .iter()
                    .chain(s.dependency.as_ref().map(FromObjects::template))
                    .map(Template::literal_prefix)
            })
            .collect();
        all.sort_unstable();
        all.dedup();
        let mut out: Vec<String> = Vec::new();
        for p in all {
            if out.last().is_some_and(|kept| p.starts_with(kept.as_str())) {
                continue;
            }
            out.push(p.to_owned());
        }
        out
    }
}

impl Source {
    /// The partition variables and their kinds, in declaration order (for a dependent
    /// source, the parent template's variables and then its `var`).
    pub fn vars(&self) -> impl Iterator<Item = (&str, VarKind)> {
        self.generators.iter().flat_map(Generator::vars)
    }

    /// Where a dependent source's values come from; `None` for a static source.
    pub fn dependency(&self) -> Option<&FromObjects> {
        self.dependency.as_ref()
    }

    /// The date of `partition`: the value of the source's first date variable, if the
    /// source has one.
    pub fn date_of(&self, partition: &Partition) -> Option<NaiveDate> {
        let (name, _) = self.vars().find(|(_, kind)| *kind == VarKind::Date)?;
        match partition.get(name)? {
            Value::Date(d) => Some(*d),
            Value::Str(s) => parse_iso_date(s),
        }
    }

    /// How old an object of `partition` may be on `today` before it is a `stale` gap:
    /// the source's `refresh.max_age` when the partition's date is within
    /// `refresh.within` of today, `None` otherwise (its objects never go stale).
    pub fn max_age(&self, partition: &Partition, today: NaiveDate) -> Option<Duration> {
        let refresh = self.refresh?;
        let date = self.date_of(partition)?;
        refresh.covers(date, today).then_some(refresh.max_age)
    }

    /// The source's partitions as of `today`: the cartesian product of its generators
    /// (the first varies slowest). Empty for a dependent source.
    pub fn partitions(&self, today: NaiveDate) -> Vec<Partition> {
        if self.dependency.is_some() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for_each_product(&Generator::value_lists(&self.generators, today), |p| {
            out.push(p.clone());
        });
        out
    }

    /// The object keys of `partition`, in template order.
    pub fn keys(&self, partition: &Partition) -> Result<Vec<String>, TemplateError> {
        self.objects
            .iter()
            .map(|t| t.render_partition(partition))
            .collect()
    }

    /// The partition with these textual variable values (as on the wire or in the
    /// store), typed by the source's generators; `None` unless the names are exactly
    /// the source's variables and each value parses.
    pub fn partition_from_strings<'a>(
        &self,
        vars: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Option<Partition> {
        let given: Vec<(&str, &str)> = vars.into_iter().collect();
        if given.len() != self.vars().count() {
            return None;
        }
        let mut out = Vec::with_capacity(given.len());
        for (var, kind) in self.vars() {
            let (_, text) = given.iter().find(|(n, _)| *n == var)?;
            let value = match kind {
                VarKind::Date => Value::Date(parse_iso_date(text)?),
                VarKind::Text => Value::Str((*text).to_owned()),
            };
            out.push((var.to_owned(), value));
        }
        Some(Partition { vars: out })
    }

    /// The inverse of [`Partition::key`] for this source's partitions.
    pub fn parse_partition_key(&self, key: &str) -> Option<Partition> {
        if key.is_empty() {
            return self.partition_from_strings([]);
        }
        let pairs: Option<Vec<(&str, &str)>> =
            key.split(',').map(|kv| kv.split_once('=')).collect();
        self.partition_from_strings(pairs?)
    }
}

impl Scraper {
    /// The argv for one run: `{out}` becomes [`ArgPiece::OutputDir`] (also inside a
    /// larger argument: `--out={out}` is `[Text("--out="), OutputDir]`); `{task_id}`,
    /// `{attempt}`, `{source}`, `{config_dir}` and the partition variables become text.
    ///
    /// Validation makes every placeholder renderable for partitions of the sources that
    /// use this scraper; should one still fail (a partition from elsewhere), it is kept
    /// as written (`{name}`) and logged. [`Scraper::try_render_argv`] reports it instead.
    pub fn render_argv(&self, ctx: &RenderContext<'_>) -> Vec<Vec<ArgPiece>> {
        self.command
            .iter()
            .map(|t| {
                render_arg(t, ctx, &mut |p, e| {
                    tracing::warn!(scraper = %self.name, placeholder = p.name(), error = %e, "argv placeholder left unrendered");
                    Ok(())
                })
                .unwrap_or_default()
            })
            .collect()
    }

    /// Like [`Scraper::render_argv`], but fails on the first placeholder that cannot render.
    pub fn try_render_argv(
        &self,
        ctx: &RenderContext<'_>,
    ) -> Result<Vec<Vec<ArgPiece>>, TemplateError> {
        self.command
            .iter()
            .map(|t| render_arg(t, ctx, &mut |_, e| Err(e)))
            .collect()
    }

    /// The scraper's `env`, rendered for one run (the `ADCE_*` task variables are not
    /// included). A placeholder that cannot render is kept as written and logged, as in
    /// [`Scraper::render_argv`].
    pub fn render_env(&self, ctx: &RenderContext<'_>) -> BTreeMap<String, String> {
        let specials = Specials::of(ctx);
        let lookup = |name: &str| specials.lookup(ctx, name);
        self.env
            .iter()
            .map(|(key, t)| {
                let value = t.render(&lookup).unwrap_or_else(|e| {
                    tracing::warn!(scraper = %self.name, env = %key, error = %e, "env placeholder left unrendered");
                    render_lenient(t, &lookup)
                });
                (key.clone(), value)
            })
            .collect()
    }

    /// Like [`Scraper::render_env`], but fails on the first placeholder that cannot render.
    pub fn try_render_env(
        &self,
        ctx: &RenderContext<'_>,
    ) -> Result<BTreeMap<String, String>, TemplateError> {
        let specials = Specials::of(ctx);
        let lookup = |name: &str| specials.lookup(ctx, name);
        self.env
            .iter()
            .map(|(key, t)| Ok((key.clone(), t.render(&lookup)?)))
            .collect()
    }
}

/// Renders `t` with placeholders that fail kept as written.
fn render_lenient<'v>(t: &Template, lookup: &dyn Fn(&str) -> Option<Arg<'v>>) -> String {
    let mut out = String::new();
    for piece in t.pieces() {
        match piece {
            Piece::Text(s) => out.push_str(s),
            Piece::Var(p) => {
                let mark = out.len();
                let ok = lookup(p.name()).is_some_and(|arg| p.render_into(arg, &mut out).is_ok());
                if !ok {
                    out.truncate(mark);
                    push_placeholder(&mut out, p);
                }
            }
        }
    }
    out
}

/// Writes a placeholder as it was written in its template.
fn push_placeholder(out: &mut String, p: &Placeholder) {
    out.push('{');
    out.push_str(p.name());
    if let Some(f) = p.format() {
        out.push(':');
        out.push_str(f);
    }
    out.push('}');
}

/// Renders one argv element; `on_error` decides what a failing placeholder does
/// (`Ok`: keep it as written, `Err`: stop).
fn render_arg(
    t: &Template,
    ctx: &RenderContext<'_>,
    on_error: &mut dyn FnMut(&Placeholder, TemplateError) -> Result<(), TemplateError>,
) -> Result<Vec<ArgPiece>, TemplateError> {
    let specials = Specials::of(ctx);
    let mut pieces = Vec::new();
    let mut text = String::new();
    for piece in t.pieces() {
        match piece {
            Piece::Text(s) => text.push_str(s),
            Piece::Var(p) if p.name() == VAR_OUT => {
                if !text.is_empty() {
                    pieces.push(ArgPiece::Text(std::mem::take(&mut text)));
                }
                pieces.push(ArgPiece::OutputDir);
            }
            Piece::Var(p) => {
                let mark = text.len();
                let result = match specials.lookup(ctx, p.name()) {
                    Some(arg) => p.render_into(arg, &mut text),
                    None => Err(TemplateError::MissingVar {
                        name: p.name().to_owned(),
                    }),
                };
                if let Err(e) = result {
                    text.truncate(mark);
                    on_error(p, e)?;
                    push_placeholder(&mut text, p);
                }
            }
        }
    }
    if !text.is_empty() || pieces.is_empty() {
        pieces.push(ArgPiece::Text(text));
    }
    Ok(pieces)
}

/// The built-in placeholders' texts for one task.
struct Specials {
    task_id: String,
    attempt: String,
    config_dir: String,
}

impl Specials {
    fn of(ctx: &RenderContext<'_>) -> Self {
        Specials {
            task_id: ctx.task_id.to_string(),
            attempt: ctx.attempt.to_string(),
            config_dir: ctx.config_dir.to_string_lossy().into_owned(),
        }
    }

    fn lookup<'v>(&'v self, ctx: &RenderContext<'v>, name: &str) -> Option<Arg<'v>> {
        match name {
            VAR_TASK_ID => Some(Arg::Text(&self.task_id)),
            VAR_ATTEMPT => Some(Arg::Text(&self.attempt)),
            VAR_SOURCE => Some(Arg::Text(ctx.source)),
            VAR_CONFIG_DIR => Some(Arg::Text(&self.config_dir)),
            _ => ctx.partition.get(name).map(Arg::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    use chrono::Datelike;

    use super::*;

    const DEMO: &str = include_str!("../../config/demo.yaml");

    /// The longest a demo scraper may take in a test before it is killed.
    const SCRAPER_DEADLINE: Duration = Duration::from_secs(10);
    /// How often a test polls a running scraper.
    const POLL: Duration = Duration::from_millis(5);

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    fn catalog(src: &str) -> Catalog {
        let cfg = Config::parse(src, Path::new("test.yaml")).unwrap_or_else(|e| panic!("{e}"));
        Catalog::from_config(&cfg)
    }

    /// A config with one scraper `s` and the given sources (YAML list items).
    fn with_sources(sources: &str) -> Catalog {
        catalog(&format!(
            "version: 1\nlake: {{local: {{root: l}}}}\nscrapers:\n  s:\n    command: [x]\nsources:\n{sources}"
        ))
    }

    fn dates(c: &Catalog, today: NaiveDate) -> Vec<String> {
        c.sources[0]
            .partitions(today)
            .iter()
            .map(|p| p.get("date").unwrap().to_string())
            .collect()
    }

    /// The NBA calendar of the issue, exactly as written there: the days from
    /// 1993-11-05 to today inside 10-20..06-20 of each season (across the
    /// year end), without the 2020 suspension. Compared with a day-by-day
    /// walk that spells the rule out independently.
    #[test]
    fn nba_days_expand_exactly_with_the_window_across_the_year_end() {
        let c = with_sources(
            "  - name: schedule\n    scraper: s\n    partitions:\n      dates: {start: 1993-11-05, end: today, windows: [\"10-20..06-20\"], except: [2020-03-12..2020-07-29]}\n    objects: [\"s/{date:%Y%m%d}.json\"]\n",
        );
        for today in [
            d(2026, 12, 7),
            d(2025, 6, 20),
            d(2025, 6, 21),
            d(2025, 10, 19),
        ] {
            let mut want = Vec::new();
            let mut day = d(1993, 11, 5);
            while day <= today {
                let (m, dd) = (day.month(), day.day());
                let in_season = m >= 11 || m <= 5 || (m == 10 && dd >= 20) || (m == 6 && dd <= 20);
                let suspended = day >= d(2020, 3, 12) && day <= d(2020, 7, 29);
                if in_season && !suspended {
                    want.push(day.format("%Y-%m-%d").to_string());
                }
                day = day.succ_opt().unwrap();
            }
            assert_eq!(dates(&c, today), want, "today {today}");
        }
        let all = dates(&c, d(2026, 12, 7));
        assert_eq!(all.first().map(String::as_str), Some("1993-11-05"));
        assert!(all.contains(&"2019-12-31".to_string()) && all.contains(&"2020-01-01".to_string()));
        assert!(
            !all.contains(&"2020-03-12".to_string()) && all.contains(&"2020-03-11".to_string())
        );
        assert!(
            !all.contains(&"2024-06-21".to_string()) && !all.contains(&"2024-10-19".to_string())
        );
    }

    #[test]
    fn weekday_filters_apply_after_the_step() {
        let c = with_sources(
            "  - name: w\n    scraper: s\n    partitions:\n      dates: {start: 2024-01-01, end: 2024-01-31, weekdays: [sat, sun], except: [2024-01-13]}\n    objects: [\"w/{date}.json\"]\n",
        );
        assert_eq!(
            dates(&c, d(2026, 1, 1)),
            [
                "2024-01-06",
                "2024-01-07",
                "2024-01-14",
                "2024-01-20",
                "2024-01-21",
                "2024-01-27",
                "2024-01-28"
            ]
        );
        // Weekly from a Monday: only Mondays exist, so a Sunday filter keeps none
        // of them; a window keeps those inside it.
        let c = with_sources(
            "  - name: w\n    scraper: s\n    partitions:\n      dates: {start: 2024-01-01, end: today, step: week, windows: [\"01-08..01-22\"]}\n    objects: [\"w/{date}.json\"]\n",
        );
        assert_eq!(
            dates(&c, d(2024, 2, 1)),
            ["2024-01-08", "2024-01-15", "2024-01-22"]
        );
    }

    #[test]
    fn daily_dates_are_inclusive_at_both_ends() {
        let c = with_sources(
            "  - {name: a, scraper: s, partitions: {dates: {start: 2024-02-27, end: 2024-03-01}}, objects: [\"a/{date}\"]}\n",
        );
        assert_eq!(
            dates(&c, d(2030, 1, 1)),
            ["2024-02-27", "2024-02-28", "2024-02-29", "2024-03-01"]
        );
        let one = with_sources(
            "  - {name: a, scraper: s, partitions: {dates: {start: 2024-02-27, end: 2024-02-27}}, objects: [\"a/{date}\"]}\n",
        );
        assert_eq!(dates(&one, d(2030, 1, 1)), ["2024-02-27"]);
    }

    #[test]
    fn today_ends_the_range_and_a_future_start_expands_to_nothing() {
        let c = with_sources(
            "  - {name: a, scraper: s, partitions: {dates: {start: 2024-10-22, end: today}}, objects: [\"a/{date}\"]}\n",
        );
        assert_eq!(
            dates(&c, d(2024, 10, 24)),
            ["2024-10-22", "2024-10-23", "2024-10-24"]
        );
        assert!(dates(&c, d(2024, 10, 21)).is_empty());
    }

    #[test]
    fn weekly_steps_stop_at_or_before_the_end() {
        let c = with_sources(
            "  - {name: a, scraper: s, partitions: {dates: {start: 2024-10-22, end: 2024-11-12, step: week}}, objects: [\"a/{date}\"]}\n",
        );
        assert_eq!(
            dates(&c, d(2030, 1, 1)),
            ["2024-10-22", "2024-10-29", "2024-11-05", "2024-11-12"]
        );
        let c = with_sources(
            "  - {name: a, scraper: s, partitions: {dates: {start: 2024-10-22, end: 2024-11-11, step: week}}, objects: [\"a/{date}\"]}\n",
        );
        assert_eq!(dates(&c, d(2030, 1, 1)).len(), 3);
    }

    #[test]
    fn monthly_steps_keep_the_day_of_month_clamped() {
        let c = with_sources(
            "  - {name: a, scraper: s, partitions: {dates: {start: 2024-01-31, end: 2024-06-30, step: month}}, objects: [\"a/{date}\"]}\n",
        );
        assert_eq!(
            dates(&c, d(2030, 1, 1)),
            [
                "2024-01-31",
                "2024-02-29",
                "2024-03-31",
                "2024-04-30",
                "2024-05-31",
                "2024-06-30"
            ]
        );
        let c = with_sources(
            "  - {name: a, scraper: s, partitions: {dates: {start: 2023-01-31, end: 2023-03-30, step: month}}, objects: [\"a/{date}\"]}\n",
        );
        assert_eq!(dates(&c, d(2030, 1, 1)), ["2023-01-31", "2023-02-28"]);
    }

    #[test]
    fn seasons_expand_in_their_format_up_to_the_current_one() {
        let c = with_sources(
            "  - {name: a, scraper: s, partitions: {seasons: {start: \"1998-99\", end: \"2001-02\"}}, objects: [\"a/{season}\"]}\n  - {name: b, scraper: s, partitions: {seasons: {start: \"2022\", end: current}}, objects: [\"b/{season}\"]}\n  - {name: c, scraper: s, partitions: {seasons: {var: yr, start: \"2023\", end: current, start_month: 1}}, objects: [\"c/{yr}\"]}\n  - {name: e, scraper: s, partitions: {seasons: {start: \"2023-24\", end: current}}, objects: [\"e/{season}\"]}\n",
        );
        let labels = |i: usize, today: NaiveDate| -> Vec<String> {
            c.sources[i]
                .partitions(today)
                .iter()
                .map(|p| p.vars[0].1.to_string())
                .collect()
        };
        assert_eq!(
            labels(0, d(2024, 1, 1)),
            ["1998-99", "1999-00", "2000-01", "2001-02"]
        );
        // Seasons start in October by default: on 2024-11-01 the current season is 2024-25, i.e. "2025".
        assert_eq!(labels(1, d(2024, 11, 1)), ["2022", "2023", "2024", "2025"]);
        assert_eq!(labels(1, d(2024, 9, 30)), ["2022", "2023", "2024"]);
        assert_eq!(labels(2, d(2024, 11, 1)), ["2023", "2024"]);
        assert_eq!(labels(3, d(2024, 9, 30)), ["2023-24"]);
        assert_eq!(labels(3, d(2023, 9, 30)), Vec::<String>::new());
    }

    #[test]
    fn products_vary_the_first_generator_slowest() {
        let c = with_sources(
            "  - name: a\n    scraper: s\n    partitions:\n      - dates: {start: 2024-01-01, end: 2024-01-02}\n      - values: {var: team, values: [BOS, NYK, LAL]}\n    objects: [\"a/{date:%Y%m%d}/{team}.json\"]\n",
        );
        let keys: Vec<String> = c
            .expand(d(2030, 1, 1))
            .into_iter()
            .flat_map(|e| e.keys)
            .collect();
        assert_eq!(
            keys,
            [
                "a/20240101/BOS.json",
                "a/20240101/NYK.json",
                "a/20240101/LAL.json",
                "a/20240102/BOS.json",
                "a/20240102/NYK.json",
                "a/20240102/LAL.json"
            ]
        );
        let p = &c.expand(d(2030, 1, 1))[4].partition;
        assert_eq!(p.key(), "date=2024-01-02,team=NYK");
    }

    #[test]
    fn a_source_without_partitions_expects_its_objects_once() {
        let c =
            with_sources("  - {name: a, scraper: s, objects: [ref/teams.json, ref/arenas.json]}\n");
        let e = c.expand(d(2030, 1, 1));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].partition, Partition::default());
        assert_eq!(e[0].keys, ["ref/teams.json", "ref/arenas.json"]);
        assert_eq!(
            c.sources[0].parse_partition_key(""),
            Some(Partition::default())
        );
    }

    #[test]
    fn demo_expands_to_the_intended_objects() {
        let c = catalog(DEMO);
        let expanded = c.expand(d(2030, 1, 1));
        assert_eq!(
            expanded,
            c.expand(d(2024, 1, 1)),
            "the demo does not depend on today"
        );
        let mut per_source = vec![0usize; c.sources.len()];
        for e in &expanded {
            per_source[e.source] += e.keys.len();
        }
        let counts: Vec<(&str, usize)> = c
            .sources
            .iter()
            .map(|s| s.name.as_str())
            .zip(per_source)
            .collect();
        assert_eq!(
            counts,
            [
                ("espn_schedule", 102),
                ("nba_standings", 15),
                ("nba_boxscore", 120),
                ("nba_pbp", 120),
                ("bbref_seasons", 20),
                ("bbref_rosters", 24)
            ]
        );
        let total: usize = expanded.iter().map(|e| e.keys.len()).sum();
        assert_eq!(total, 401);
        let mut keys: Vec<&str> = expanded
            .iter()
            .flat_map(|e| e.keys.iter().map(String::as_str))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), 401, "every expected key is unique");
        assert!(keys.contains(&"espn/schedule/20241022.json"));
        assert!(keys.contains(&"espn/schedule/20250131.json"));
        assert!(keys.contains(&"bbref/seasons/2024-25/advanced.csv"));
        assert!(keys.contains(&"bbref/rosters/2022-23/OKC.csv"));
        assert_eq!(
            c.prefixes(),
            [
                "bbref/rosters/",
                "bbref/seasons/",
                "espn/schedule/",
                "nba/boxscore/",
                "nba/pbp/",
                "nba/standings/"
            ]
        );
    }

    #[test]
    fn prefixes_drop_those_under_another_listed_prefix() {
        let c = with_sources(
            "  - {name: a, scraper: s, objects: [a/x.json]}\n  - {name: b, scraper: s, partitions: {values: {var: v, values: [1]}}, objects: [\"a/{v}/y\", \"ab/{v}\", \"b/c/{v}\", \"b/{v}\"]}\n",
        );
        assert_eq!(c.prefixes(), ["a/", "ab/", "b/"]);
        let all = with_sources(
            "  - {name: a, scraper: s, partitions: {values: {var: v, values: [1]}}, objects: [\"{v}/x\", \"b/{v}\"]}\n",
        );
        assert_eq!(
            all.prefixes(),
            [""],
            "a template starting with a placeholder needs the whole lake"
        );
    }

    #[test]
    fn sources_are_found_by_name() {
        let c = catalog(DEMO);
        assert_eq!(c.source_index("nba_pbp"), Some(3));
        assert_eq!(c.source("nba_pbp").map(|s| s.priority), Some(Priority::Low));
        assert!(c.source("nope").is_none());
        let s = c.source("espn_schedule").unwrap();
        assert_eq!(
            c.scraper_for(s).map(|x| x.name.as_str()),
            Some("espn_schedule")
        );
    }

    #[test]
    fn partitions_parse_back_from_their_key_and_wire_strings() {
        let c = catalog(DEMO);
        for e in c.expand(d(2030, 1, 1)) {
            let s = &c.sources[e.source];
            assert_eq!(
                s.parse_partition_key(&e.partition.key()).as_ref(),
                Some(&e.partition)
            );
        }
        let s = c.source("espn_schedule").unwrap();
        assert_eq!(s.parse_partition_key("date=2024-13-01"), None);
        assert_eq!(s.parse_partition_key("day=2024-10-22"), None);
        assert_eq!(
            s.partition_from_strings([("date", "2024-10-22"), ("x", "y")]),
            None
        );
    }

    /// A schedule source and a dependent play-by-play source reading game ids out of it.
    const DEPENDENT: &str = "\
version: 1
lake: {local: {root: l}}
scrapers:
  s:
    command: [x]
  game:
    command: [x, \"{game_id}\", \"--day={date:%Y%m%d}\", \"{out}\"]
sources:
  - name: sched
    scraper: s
    partitions: {dates: {start: 2024-10-22, end: 2024-10-23}}
    objects: [\"espn/schedule/{date:%Y%m%d}.json\"]
  - name: pbp
    scraper: game
    partitions:
      from_objects: {objects: \"espn/schedule/{date:%Y%m%d}.json\", var: game_id, json: /events/*/id}
    objects: [\"espn/pbp/{game_id}.json\"]
    refresh: {within: 1d, max_age: 1h}
    recheck_after: 6h
    hot: true
  - name: box
    scraper: game
    partitions:
      from_objects: {objects: \"espn/schedule/{date:%Y%m%d}.json\", var: game_id, lines: true, pattern: \"[0-9]{1,12}\"}
    objects: [\"espn/box/{date:%Y%m%d}/{game_id}.json\"]
  - name: lists
    scraper: s
    partitions:
      from_objects: {objects: \"ext/lists/{list}.csv\", var: item, csv: {column: item}}
    objects: [\"ext/items/{item}.json\"]
";

    fn parent(date: NaiveDate) -> Partition {
        Partition {
            vars: vec![("date".into(), Value::Date(date))],
        }
    }

    fn owned(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| (*v).to_owned()).collect()
    }

    #[test]
    fn dependent_sources_are_not_expanded_statically() {
        let c = catalog(DEPENDENT);
        let expanded = c.expand(d(2030, 1, 1));
        assert_eq!(expanded.len(), 2);
        assert!(expanded.iter().all(|e| e.source == 0));
        assert_eq!(c.dependent_sources().collect::<Vec<_>>(), [1, 2, 3]);
        assert!(c.sources[0].dependency().is_none());
        assert!(c.sources[1].partitions(d(2030, 1, 1)).is_empty());
        assert_eq!(
            c.prefixes(),
            [
                "espn/box/",
                "espn/pbp/",
                "espn/schedule/",
                "ext/items/",
                "ext/lists/"
            ],
            "parent templates' prefixes are listed too"
        );
    }

    #[test]
    fn dependent_sources_carry_their_settings() {
        let c = catalog(DEPENDENT);
        let pbp = &c.sources[1];
        assert_eq!(
            pbp.refresh,
            Some(Refresh {
                within: Duration::from_secs(86_400),
                max_age: Duration::from_secs(3600)
            })
        );
        assert_eq!(pbp.recheck_after, Duration::from_secs(6 * 3600));
        assert!(pbp.hot);
        let sched = &c.sources[0];
        assert_eq!(sched.refresh, None);
        assert_eq!(sched.recheck_after, Duration::from_secs(86_400));
        assert!(!sched.hot);
        let vars: Vec<(&str, VarKind)> = pbp.vars().collect();
        assert_eq!(vars, [("date", VarKind::Date), ("game_id", VarKind::Text)]);
        let dep = pbp.dependency().unwrap();
        assert_eq!(dep.var(), "game_id");
        assert_eq!(dep.template().literal_prefix(), "espn/schedule/");
        assert_eq!(dep.max_bytes(), crate::extract::DEFAULT_MAX_BYTES);
    }

    #[test]
    fn parents_match_and_values_extract() {
        let c = catalog(DEPENDENT);
        let dep = c.sources[1].dependency().unwrap();
        assert_eq!(
            dep.match_parent("espn/schedule/20241022.json"),
            Some(parent(d(2024, 10, 22)))
        );
        assert_eq!(dep.match_parent("espn/schedule/2024-10-22.json"), None);
        assert_eq!(dep.match_parent("espn/schedule/20241022.json.bak"), None);
        let e = dep.extract(br#"{"events": [{"id": "401"}, {"id": 402}, {"id": "../x"}]}"#);
        assert_eq!(e.values, ["401", "402"]);
        assert_eq!(e.rejected.len(), 1);
        let lists = c.sources[3].dependency().unwrap();
        assert_eq!(
            lists.match_parent("ext/lists/top-10.csv"),
            Some(Partition {
                vars: vec![("list".into(), Value::Str("top-10".into()))]
            })
        );
        assert_eq!(
            lists
                .extract(
                    b"item,n
abc,1
"
                )
                .values,
            ["abc"]
        );
        let boxes = c.sources[2].dependency().unwrap();
        let e = boxes.extract(
            b"401
abc
",
        );
        assert_eq!(e.values, ["401"]);
        assert_eq!(e.rejected[0].reason, "does not match pattern `[0-9]{1,12}`");
    }

    #[test]
    fn expand_dependent_keeps_order_carries_parent_vars_and_dedupes() {
        let c = catalog(DEPENDENT);
        let (d22, d23) = (d(2024, 10, 22), d(2024, 10, 23));
        let parents = vec![
            (parent(d22), owned(&["401", "402", "401"])),
            (parent(d23), owned(&["402", "403"])),
        ];
        let pbp = c.expand_dependent(1, &parents);
        let got: Vec<(String, Vec<String>)> = pbp
            .iter()
            .map(|e| (e.partition.key(), e.keys.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "date=2024-10-22,game_id=401".to_owned(),
                    owned(&["espn/pbp/401.json"])
                ),
                (
                    "date=2024-10-22,game_id=402".to_owned(),
                    owned(&["espn/pbp/402.json"])
                ),
                (
                    "date=2024-10-23,game_id=403".to_owned(),
                    owned(&["espn/pbp/403.json"])
                ),
            ],
            "game 402 listed again on the 23rd renders the same key: the first one wins"
        );
        assert!(pbp.iter().all(|e| e.source == 1));
        assert_eq!(pbp[0].partition.get("date"), Some(&Value::Date(d22)));

        // Keys that include the date keep both days' partitions.
        let boxes = c.expand_dependent(2, &parents);
        let keys: Vec<&str> = boxes.iter().map(|e| e.keys[0].as_str()).collect();
        assert_eq!(
            keys,
            [
                "espn/box/20241022/401.json",
                "espn/box/20241022/402.json",
                "espn/box/20241023/402.json",
                "espn/box/20241023/403.json"
            ]
        );

        // Partitions parse back from their keys like static ones.
        for e in pbp.iter().chain(&boxes) {
            let s = &c.sources[e.source];
            assert_eq!(
                s.parse_partition_key(&e.partition.key()).as_ref(),
                Some(&e.partition)
            );
        }
    }

    #[test]
    fn expand_dependent_skips_what_does_not_fit() {
        let c = catalog(DEPENDENT);
        let d22 = d(2024, 10, 22);
        let wrong_parent = Partition {
            vars: vec![("day".into(), Value::Date(d22))],
        };
        let textual_parent = Partition {
            vars: vec![("date".into(), Value::Str("2024-10-22".into()))],
        };
        let parents = vec![
            (
                parent(d22),
                owned(&["../../etc/passwd", "a;rm -rf /", "", "..", "ok1"]),
            ),
            (wrong_parent, owned(&["ok2"])),
            (Partition::default(), owned(&["ok3"])),
            (textual_parent, owned(&["ok4"])),
        ];
        let keys: Vec<String> = c
            .expand_dependent(1, &parents)
            .into_iter()
            .flat_map(|e| e.keys)
            .collect();
        assert_eq!(keys, ["espn/pbp/ok1.json", "espn/pbp/ok4.json"]);
        // The box source's pattern applies here too.
        assert!(c.expand_dependent(2, &parents).is_empty());
        assert!(c.expand_dependent(0, &parents).is_empty(), "static source");
        assert!(
            c.expand_dependent(99, &parents).is_empty(),
            "no such source"
        );
    }

    #[test]
    fn a_parent_without_variables_is_one_fixed_object() {
        let c = with_sources(
            "  - name: ids\n    scraper: s\n    partitions:\n      from_objects: {objects: ref/ids.txt, var: id, lines: true}\n    objects: [\"by-id/{id}.json\"]\n",
        );
        let dep = c.sources[0].dependency().unwrap();
        assert_eq!(dep.match_parent("ref/ids.txt"), Some(Partition::default()));
        assert_eq!(dep.match_parent("ref/ids.txt2"), None);
        let values = dep.extract(b"a1\nb2\n").values;
        let e = c.expand_dependent(0, &[(Partition::default(), values)]);
        let keys: Vec<&str> = e.iter().map(|e| e.keys[0].as_str()).collect();
        assert_eq!(keys, ["by-id/a1.json", "by-id/b2.json"]);
        assert_eq!(e[1].partition.key(), "id=b2");
        assert_eq!(c.prefixes(), ["by-id/", "ref/ids.txt"]);
    }

    #[test]
    fn refresh_applies_to_recent_dates_only() {
        let c = catalog(DEPENDENT);
        let pbp = &c.sources[1];
        let p = c.expand_dependent(1, &[(parent(d(2024, 10, 22)), owned(&["401"]))])[0]
            .partition
            .clone();
        assert_eq!(pbp.date_of(&p), Some(d(2024, 10, 22)));
        let hour = Some(Duration::from_secs(3600));
        assert_eq!(pbp.max_age(&p, d(2024, 10, 21)), hour, "a future date");
        assert_eq!(pbp.max_age(&p, d(2024, 10, 22)), hour);
        assert_eq!(pbp.max_age(&p, d(2024, 10, 23)), hour, "within 1d");
        assert_eq!(pbp.max_age(&p, d(2024, 10, 24)), None);
        let sched = &c.sources[0];
        let sp = &sched.partitions(d(2030, 1, 1))[0];
        assert_eq!(sched.date_of(sp), Some(d(2024, 10, 22)));
        assert_eq!(sched.max_age(sp, d(2024, 10, 22)), None, "no refresh");
        assert_eq!(c.sources[3].date_of(&Partition::default()), None);
    }

    #[test]
    fn dependent_argv_renders_parent_vars_and_the_value() {
        let c = catalog(DEPENDENT);
        let e = &c.expand_dependent(1, &[(parent(d(2024, 10, 22)), owned(&["401"]))])[0];
        let argv = c.scrapers["game"]
            .try_render_argv(&ctx(&e.partition, "pbp"))
            .unwrap();
        let t = |s: &str| ArgPiece::Text(s.to_owned());
        assert_eq!(
            argv,
            vec![
                vec![t("x")],
                vec![t("401")],
                vec![t("--day=20241022")],
                vec![ArgPiece::OutputDir]
            ]
        );
    }

    fn ctx<'a>(p: &'a Partition, source: &'a str) -> RenderContext<'a> {
        RenderContext {
            partition: p,
            task_id: 42,
            attempt: 2,
            source,
            config_dir: Path::new("/data dir"),
        }
    }

    #[test]
    fn argv_marks_the_output_dir_and_renders_everything_else() {
        let c = catalog(
            "version: 1\nlake: {local: {root: l}}\nscrapers:\n  s:\n    command: [\"{config_dir}/run.sh\", \"--out={out}\", \"{out}\", \"{out}/{date:%Y}/x\", \"{task_id}-{attempt}-{source}\", \"{date}\", \"{{out}}\", \"\"]\n    env: {A: \"{source}:{date:%d.%m.%Y}\", B: plain}\nsources:\n  - {name: a, scraper: s, partitions: {dates: {start: 2024-10-22, end: 2024-10-22}}, objects: [\"a/{date}\"]}\n",
        );
        let p = &c.sources[0].partitions(d(2030, 1, 1))[0];
        let s = &c.scrapers["s"];
        let argv = s.render_argv(&ctx(p, "a"));
        let t = |s: &str| ArgPiece::Text(s.to_owned());
        assert_eq!(
            argv,
            vec![
                vec![t("/data dir/run.sh")],
                vec![t("--out="), ArgPiece::OutputDir],
                vec![ArgPiece::OutputDir],
                vec![ArgPiece::OutputDir, t("/2024/x")],
                vec![t("42-2-a")],
                vec![t("2024-10-22")],
                vec![t("{out}")],
                vec![t("")],
            ]
        );
        assert_eq!(s.try_render_argv(&ctx(p, "a")).unwrap(), argv);
        let env = s.render_env(&ctx(p, "a"));
        assert_eq!(env.len(), 2);
        assert_eq!(env["A"], "a:22.10.2024");
        assert_eq!(env["B"], "plain");
    }

    #[test]
    fn a_foreign_partition_leaves_placeholders_as_written() {
        let c = catalog(
            "version: 1\nlake: {local: {root: l}}\nscrapers:\n  s:\n    command: [x, \"--d={date:%Y}\", \"{out}\"]\n    env: {D: \"{date:%Y}\"}\nsources:\n  - {name: a, scraper: s, partitions: {dates: {start: 2024-10-22, end: 2024-10-22}}, objects: [\"a/{date}\"]}\n",
        );
        let s = &c.scrapers["s"];
        let foreign = Partition {
            vars: vec![("game_id".into(), Value::Str("1".into()))],
        };
        let argv = s.render_argv(&ctx(&foreign, "a"));
        assert_eq!(argv[1], vec![ArgPiece::Text("--d={date:%Y}".into())]);
        assert_eq!(argv[2], vec![ArgPiece::OutputDir]);
        assert_eq!(
            s.try_render_argv(&ctx(&foreign, "a")).unwrap_err(),
            TemplateError::MissingVar {
                name: "date".into()
            }
        );
        assert_eq!(s.render_env(&ctx(&foreign, "a"))["D"], "{date:%Y}");
        assert!(s.try_render_env(&ctx(&foreign, "a")).is_err());
        // A date stored as text still formats.
        let textual = Partition {
            vars: vec![("date".into(), Value::Str("2024-10-22".into()))],
        };
        assert_eq!(
            s.render_argv(&ctx(&textual, "a"))[1],
            vec![ArgPiece::Text("--d=2024".into())]
        );
    }

    /// Runs `argv` with `out` as the output directory; returns (exit code, stdout).
    fn run(
        argv: &[Vec<ArgPiece>],
        env: &BTreeMap<String, String>,
        out: &Path,
    ) -> (Option<i32>, String) {
        let args: Vec<String> = argv
            .iter()
            .map(|pieces| {
                pieces
                    .iter()
                    .map(|p| match p {
                        ArgPiece::Text(t) => t.clone(),
                        ArgPiece::OutputDir => out.display().to_string(),
                    })
                    .collect()
            })
            .collect();
        let mut child = Command::new(&args[0])
            .args(&args[1..])
            .envs(env)
            .env("ADCE_OUTPUT_DIR", out)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > SCRAPER_DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?} did not finish within {SCRAPER_DEADLINE:?}");
            }
            std::thread::sleep(POLL);
        };
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.is_empty(), "{args:?} wrote to stderr: {stderr}");
        (
            status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    }

    fn files_under(dir: &Path) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let entry = entry.unwrap();
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let key = path
                        .strip_prefix(dir)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned();
                    out.push((key, entry.metadata().unwrap().len()));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn demo_scrapers_write_exactly_their_expected_objects() {
        let c = catalog(DEMO);
        let config_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let expanded = c.expand(d(2030, 1, 1));
        for (i, source) in c.sources.iter().enumerate() {
            let mine: Vec<&ExpectedPartition> = expanded.iter().filter(|e| e.source == i).collect();
            let scraper = c.scraper_for(source).unwrap();
            for e in [mine[0], mine[mine.len() - 1]] {
                let out = tempfile::tempdir().unwrap();
                let ctx = RenderContext {
                    partition: &e.partition,
                    task_id: 7,
                    attempt: 1,
                    source: &source.name,
                    config_dir: &config_dir,
                };
                let argv = scraper.try_render_argv(&ctx).unwrap();
                let env = scraper.try_render_env(&ctx).unwrap();
                let (code, stdout) = run(&argv, &env, out.path());
                assert_eq!(code, Some(0), "{}: {stdout}", source.name);
                assert!(
                    stdout.contains("::progress:: 0.5 halfway"),
                    "{}: {stdout}",
                    source.name
                );
                let files = files_under(out.path());
                let names: Vec<&str> = files.iter().map(|(k, _)| k.as_str()).collect();
                let mut expected: Vec<&str> = e.keys.iter().map(String::as_str).collect();
                expected.sort_unstable();
                assert_eq!(names, expected, "{} {}", source.name, e.partition.key());
                for (key, size) in &files {
                    assert!(*size >= source.min_bytes, "{key} has {size} bytes");
                }
            }
        }
    }
}
