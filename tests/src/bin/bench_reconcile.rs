//! Benchmark: reconcile 1,000,000 expected keys against a 1,000,000-line
//! gzipped S3 Inventory report (AWS layout) with 1% of the keys missing.
//!
//! `cargo run --release -p adce-tests --bin bench_reconcile` generates the
//! data in a temporary directory, then measures, each in its own child process
//! so peak memory is its own:
//! - `whole`: config load, catalog expansion, reading the gzipped report and
//!   planning — everything a reconcile does but the lake round trips;
//! - `diff`: the diff alone (index the observed keys, probe every expected key)
//!   over two in-memory key lists;
//!
//! and in the same run `LC_ALL=C sort | comm -23` over the same two key lists.
//! Prints seconds and peak RSS; no assertions on time (see BENCHMARKS.md).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use adce_server::catalog::Catalog;
use adce_server::config::{Config, InventoryConfig};
use adce_server::lake::inventory::{self, testing::ReportBuilder};
use adce_server::lake::{LocalDir, ObjectMeta};
use adce_server::reconcile::fold_pages;
use adce_server::reconcile::observed::{ObservedIndex, ObservedObject};
use adce_server::reconcile::plan::{QueueView, plan_catalog};
use anyhow::{Context, bail};

const DAYS: usize = 1000;
const IDS: usize = 1000;
const KEYS: usize = DAYS * IDS;
/// Every `MISSING_EVERY`-th expected key is absent from the report.
const MISSING_EVERY: usize = 100;
const SOURCE_BUCKET: &str = "lake-bucket";
const REPORT_STAMP: &str = "2026-11-23T00-00Z";

fn inventory_config() -> InventoryConfig {
    InventoryConfig {
        bucket: "reports".into(),
        prefix: "inventory".into(),
        config_id: "daily".into(),
    }
}

fn start_date() -> chrono::NaiveDate {
    chrono::NaiveDate::from_ymd_opt(2000, 1, 1).unwrap_or_default()
}

fn config_yaml() -> String {
    let end = start_date() + chrono::Duration::days(DAYS as i64 - 1);
    let ids: Vec<String> = (0..IDS).map(|i| format!("g{i:04}")).collect();
    format!(
        "version: 1\nlake: {{local: {{root: lake}}}}\nscrapers:\n  b: {{command: [\"true\"]}}\n\
         sources:\n  - name: bench\n    scraper: b\n    partitions:\n      \
         - dates: {{start: {}, end: {}}}\n      - values: {{var: id, values: [{}]}}\n    \
         objects: [\"bench/{{date:%Y%m%d}}/{{id}}.json\"]\n",
        start_date().format("%Y-%m-%d"),
        end.format("%Y-%m-%d"),
        ids.join(", ")
    )
}

fn expected_keys() -> impl Iterator<Item = String> {
    (0..DAYS).flat_map(|d| {
        let date = (start_date() + chrono::Duration::days(d as i64))
            .format("%Y%m%d")
            .to_string();
        (0..IDS).map(move |i| format!("bench/{date}/g{i:04}.json"))
    })
}

/// Peak and current resident memory of this process, in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn generate(dir: &Path) -> anyhow::Result<()> {
    std::fs::write(dir.join("config.yaml"), config_yaml())?;
    let mut expected = std::io::BufWriter::new(std::fs::File::create(dir.join("expected.txt"))?);
    let mut observed = std::io::BufWriter::new(std::fs::File::create(dir.join("observed.txt"))?);
    let mut objects = Vec::with_capacity(KEYS);
    for (i, key) in expected_keys().enumerate() {
        writeln!(expected, "{key}")?;
        if i % MISSING_EVERY != 0 {
            writeln!(observed, "{key}")?;
            objects.push(ObjectMeta {
                key,
                size: 2048,
                modified_ms: 1_700_000_000_000,
            });
        }
    }
    expected.flush()?;
    observed.flush()?;
    ReportBuilder::new(&inventory_config(), SOURCE_BUCKET, REPORT_STAMP)
        .objects_file(objects)
        .write_to(&dir.join("reports"))?;
    Ok(())
}

/// The whole reconcile from the gzipped report; prints `whole SECONDS PEAK BASE MISSING`.
fn whole(dir: &Path) -> anyhow::Result<()> {
    let (_, base) = memory();
    let runtime = tokio::runtime::Builder::new_multi_thread().build()?;
    let started = Instant::now();
    let missing = runtime.block_on(async {
        let config = Config::load(&dir.join("config.yaml"))?;
        let catalog = Catalog::from_config(&config);
        let store: Arc<dyn adce_server::lake::ObjectSource> =
            Arc::new(LocalDir::new(dir.join("reports")));
        let report =
            inventory::latest_report(store.as_ref(), &inventory_config(), SOURCE_BUCKET).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let prefixes = catalog.prefixes();
        let reading = inventory::read_report(store.clone(), &report, "", &prefixes, tx);
        let mut index = ObservedIndex::with_capacity(KEYS);
        let folding = fold_pages(rx, &mut index);
        let (read, ()) = tokio::join!(reading, folding);
        read?;
        let today = chrono::Utc::now().date_naive();
        let plan = plan_catalog(
            &catalog,
            today,
            &[],
            &index,
            &QueueView::new(),
            adce_server::model::now_ms(),
        );
        anyhow::Ok(plan.total().missing)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let (peak, _) = memory();
    println!("whole {seconds:.3} {peak} {base} {missing}");
    Ok(())
}

fn read_lines(path: &Path) -> anyhow::Result<Vec<String>> {
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    file.lines().collect::<Result<_, _>>().map_err(Into::into)
}

/// The diff alone over in-memory key lists; prints `diff SECONDS MISSING`.
fn diff(dir: &Path) -> anyhow::Result<()> {
    let expected = read_lines(&dir.join("expected.txt"))?;
    let observed = read_lines(&dir.join("observed.txt"))?;
    let object = ObservedObject {
        size: 1,
        modified_ms: 1,
    };
    let started = Instant::now();
    let mut index = ObservedIndex::with_capacity(observed.len());
    index.reserve_bytes(observed.iter().map(String::len).sum());
    index.insert_many(observed.iter().map(|k| (k.as_str(), object)));
    let indexed = started.elapsed().as_secs_f64();
    let keys: Vec<&str> = expected.iter().map(String::as_str).collect();
    let mut answers = Vec::with_capacity(keys.len());
    index.get_many(&keys, &mut answers);
    let missing = answers.iter().filter(|a| a.is_none()).count();
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("diff: index {indexed:.3}s, probe {:.3}s", seconds - indexed);
    println!("diff {seconds:.3} {missing}");
    Ok(())
}

/// Runs this binary's `mode` in a child process and returns its output line.
fn child(mode: &str, dir: &Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new(std::env::current_exe()?)
        .arg(mode)
        .arg(dir)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("{mode} failed (its error is printed above)");
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

fn orchestrate() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir: PathBuf = tmp.path().to_path_buf();
    eprintln!(
        "generating {KEYS} expected keys and a gzipped inventory report in {}",
        dir.display()
    );
    generate(&dir)?;

    let whole = child("whole", &dir)?;
    let diff = child("diff", &dir)?;
    let expected_missing = KEYS.div_ceil(MISSING_EVERY);

    let started = Instant::now();
    let comm = Command::new("bash")
        .arg("-c")
        .arg(
            "LC_ALL=C comm -23 <(LC_ALL=C sort expected.txt) <(LC_ALL=C sort observed.txt) | wc -l",
        )
        .current_dir(&dir)
        .output()
        .context("running sort | comm")?;
    let comm_seconds = started.elapsed().as_secs_f64();
    let comm_missing = String::from_utf8_lossy(&comm.stdout).trim().to_string();

    let parse = |v: &[String], i: usize| {
        v.get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let (whole_s, peak, base) = (parse(&whole, 1), parse(&whole, 2), parse(&whole, 3));
    let diff_s = parse(&diff, 1);
    println!(
        "reconcile benchmark: {KEYS} expected keys, {} in the report, {expected_missing} missing",
        KEYS - expected_missing
    );
    println!("{:<44} {:>9} {:>10}", "measure", "seconds", "missing");
    println!(
        "{:<44} {:>9.3} {:>10}",
        "whole reconcile from the gzipped report",
        whole_s,
        whole.get(4).map_or("?", String::as_str)
    );
    println!(
        "{:<44} {:>9.3} {:>10}",
        "diff alone (index + probe, in memory)",
        diff_s,
        diff.get(2).map_or("?", String::as_str)
    );
    println!(
        "{:<44} {:>9.3} {:>10}",
        "LC_ALL=C sort | comm -23 (same key lists)", comm_seconds, comm_missing
    );
    println!(
        "diff speed-up over sort | comm: {:.1}x",
        comm_seconds / diff_s
    );
    println!(
        "whole reconcile peak RSS: {:.1} MiB ({:.1} MiB at start): {:.0} bytes per expected key",
        mb(peak as u64),
        mb(base as u64),
        (peak - base) / KEYS as f64
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("whole"), Some(dir)) => whole(Path::new(dir)),
        (Some("diff"), Some(dir)) => diff(Path::new(dir)),
        (None, _) => orchestrate(),
        _ => bail!("usage: bench_reconcile [whole DIR | diff DIR]"),
    }
}
