//! Tidy checks of the server's source, in the spirit of rust-analyzer's tidy
//! tests: they read `server/src` as text and keep its structure as
//! ARCHITECTURE.md describes it.
//!
//! - **Layers.** [`LAYERS`] is the declared module order, lowest first. A
//!   module may use only modules of lower layers (and its own insides), so
//!   the graph has no cycles and every module can be understood and tested
//!   from below. Every `crate::…` and `super::…` path in production code is
//!   checked (comments and `#[cfg(test)]` code are not: tests may assemble
//!   higher layers); a violation names the file, the line and both modules.
//!   ARCHITECTURE.md states the same order (checked too).
//! - **Headers.** Every `.rs` file starts with a `//!` comment saying what it
//!   is.
//! - **Size.** A file with more than [`MAX_PRODUCTION_LINES`] lines before its
//!   tests is named in ARCHITECTURE.md's "Large files" list with the reason.
//! - **One writer.** Only the scheduler opens the store's writer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The server's modules, lowest layer first. Modules in one layer are peers:
/// they may not use each other. A nested path (`reconcile::plan`) gives a
/// part of a folder its own layer; the rest of the folder is where its
/// top-level name is listed.
const LAYERS: &[&[&str]] = &[
    &["model"],
    &["template", "extract"],
    &["config"],
    &["priority", "limits", "dev"],
    &["catalog"],
    &["reconcile::observed"],
    &["reconcile::plan"],
    &["lake"],
    &["error"],
    &["store"],
    &["logs", "metrics"],
    &["scheduler"],
    &["reconcile"],
    &["autoloop"],
    &["health", "auth"],
    &["reload"],
    &["control", "gateway"],
    &["transport"],
    &["server"],
];

/// Production lines (before `#[cfg(test)]`) above which a file needs a note.
const MAX_PRODUCTION_LINES: usize = 800;

/// The call that opens the store's writer (the only way to a `WriteTxn`,
/// which every write function takes), and the one folder allowed to make it.
const WRITER_OPENER: &str = "Writer::open(";
const WRITER_FOLDER: &str = "scheduler";

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn architecture() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The module path of a source file: `reconcile/plan.rs` → `reconcile::plan`,
/// `health/mod.rs` → `health`, `lib.rs` → ``.
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src_dir()).expect("a file under src");
    let mut parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

/// The declared entry a module path belongs to (the longest listed prefix),
/// with its layer index.
fn layer_of(module: &str) -> Option<(&'static str, usize)> {
    let mut best: Option<(&'static str, usize)> = None;
    for (index, layer) in LAYERS.iter().enumerate() {
        for &entry in *layer {
            let matches = module == entry || module.starts_with(&format!("{entry}::"));
            if matches && best.is_none_or(|(b, _)| entry.len() > b.len()) {
                best = Some((entry, index));
            }
        }
    }
    best
}

/// The production part of a source: the lines before its first
/// `#[cfg(test)]`, numbered from 1.
fn production_lines(text: &str) -> Vec<(usize, &str)> {
    text.lines()
        .enumerate()
        .take_while(|(_, l)| l.trim_start() != "#[cfg(test)]")
        .map(|(i, l)| (i + 1, l))
        .collect()
}

/// The module paths a line of code uses: every `crate::a::b` and
/// `super::a` path (resolved against `module`), up to the first
/// non-identifier segment. `None` for a `crate::{…}` group, which this check
/// cannot read and so refuses.
fn used_paths(line: &str, module: &str, is_mod_file: bool) -> Option<Vec<String>> {
    let code = match line.find("//") {
        Some(at) => &line[..at],
        None => line,
    };
    if code.trim_start().starts_with('*') {
        return Some(Vec::new());
    }
    let mut out = Vec::new();
    for (start, _) in code.match_indices("crate::") {
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `adce_crate::`
        }
        let rest = &code[start + "crate::".len()..];
        if rest.starts_with('{') {
            return None;
        }
        out.push(path_segments(rest));
    }
    for (start, _) in code.match_indices("super::") {
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue; // `super::super::` is resolved from its first `super`
        }
        let mut rest = &code[start..];
        // A module file's parent is the module itself one level up; a
        // `mod.rs` (folder) file's `super` is its folder's parent.
        let mut base: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
        if is_mod_file {
            base.push("");
        }
        while let Some(tail) = rest.strip_prefix("super::") {
            base.pop();
            rest = tail;
        }
        base.retain(|s| !s.is_empty());
        let mut path = base.join("::");
        let tail = path_segments(rest);
        if !tail.is_empty() {
            if !path.is_empty() {
                path.push_str("::");
            }
            path.push_str(&tail);
        }
        out.push(path);
    }
    Some(out)
}

/// The leading `a::b::c` of `rest`, up to the first character that is not
/// part of a path.
fn path_segments(rest: &str) -> String {
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(rest.len());
    rest[..end].trim_end_matches(':').to_owned()
}

/// Every import of `files` against [`LAYERS`], as messages.
fn layer_violations(files: &[(PathBuf, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (file, text) in files {
        let module = module_of(file);
        let name = file.strip_prefix(src_dir()).unwrap_or(file).display();
        if module.is_empty() {
            continue; // lib.rs and main.rs: the crate roots
        }
        let Some((from_entry, from_layer)) = layer_of(&module) else {
            problems.push(format!(
                "server/src/{name}: module `{module}` is in no layer; add it to LAYERS in \
                 server/tests/tidy.rs and to the order in ARCHITECTURE.md"
            ));
            continue;
        };
        let is_mod_file = file.file_name().is_some_and(|n| n == "mod.rs");
        for (number, line) in production_lines(text) {
            let Some(paths) = used_paths(line, &module, is_mod_file) else {
                problems.push(format!(
                    "server/src/{name}:{number}: `crate::{{…}}` groups several modules; write \
                     one `use crate::module::…` per module so the layer check can read it"
                ));
                continue;
            };
            for path in paths {
                let Some((to_entry, to_layer)) = layer_of(&path) else {
                    continue; // a crate-root item such as `crate::Result`
                };
                if to_entry == from_entry || path.starts_with(&format!("{module}::")) {
                    continue; // inside one declared module, or its own child
                }
                if to_layer >= from_layer {
                    let how = if to_layer == from_layer {
                        "a peer in the same layer"
                    } else {
                        "a higher layer"
                    };
                    problems.push(format!(
                        "server/src/{name}:{number}: `{from_entry}` uses `{to_entry}` ({how}): \
                         {}",
                        line.trim()
                    ));
                }
            }
        }
    }
    problems
}

/// Whether `file` is test code as a whole: a `tests.rs` or `*_tests.rs`
/// file, declared under `#[cfg(test)]` by its parent (checked).
fn is_test_file(file: &Path) -> bool {
    let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned());
    stem.is_some_and(|s| s == "tests" || s.ends_with("_tests"))
}

/// The production source files of `server/src`, with their text.
fn sources() -> Vec<(PathBuf, String)> {
    rust_files(&src_dir())
        .into_iter()
        .filter(|f| !is_test_file(f))
        .map(|f| {
            let text =
                std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            (f, text)
        })
        .collect()
}

#[test]
fn every_import_follows_the_declared_layers() {
    let problems = layer_violations(&sources());
    assert!(
        problems.is_empty(),
        "imports against the layer order (lowest first: {}):\n{}",
        order_line(),
        problems.join("\n")
    );
}

#[test]
fn lib_rs_lists_the_modules_in_layer_order() {
    let lib = std::fs::read_to_string(src_dir().join("lib.rs")).expect("lib.rs");
    let mut last = (String::new(), 0);
    for line in lib.lines() {
        let Some(name) = line
            .strip_prefix("pub mod ")
            .and_then(|l| l.strip_suffix(';'))
        else {
            continue;
        };
        // A folder with parts in lower layers is listed at its lowest part.
        let layer = LAYERS
            .iter()
            .position(|l| {
                l.iter()
                    .any(|e| *e == name || e.starts_with(&format!("{name}::")))
            })
            .unwrap_or_else(|| panic!("`{name}` is in no layer"));
        assert!(
            layer >= last.1,
            "lib.rs lists `{name}` after `{}`, but its layer is lower",
            last.0
        );
        last = (name.to_owned(), layer);
    }
}

#[test]
fn every_module_of_server_src_is_in_a_layer_and_every_layer_entry_exists() {
    let modules: Vec<String> = rust_files(&src_dir())
        .iter()
        .map(|f| module_of(f))
        .collect();
    for layer in LAYERS {
        for entry in *layer {
            assert!(
                modules.iter().any(|m| m == entry),
                "LAYERS names `{entry}`, but server/src has no such module"
            );
        }
    }
}

/// The declared order as ARCHITECTURE.md writes it: layers joined by ` ← `,
/// peers by ` / `, each name in backticks.
fn order_line() -> String {
    LAYERS
        .iter()
        .map(|layer| {
            layer
                .iter()
                .map(|m| format!("`{m}`"))
                .collect::<Vec<_>>()
                .join(" / ")
        })
        .collect::<Vec<_>>()
        .join(" ← ")
}

#[test]
fn architecture_md_states_the_same_order() {
    let doc = architecture()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let line = order_line();
    assert!(
        doc.contains(&line),
        "ARCHITECTURE.md must state the layer order exactly as server/tests/tidy.rs \
         declares it:\n{line}"
    );
}

#[test]
fn test_files_are_declared_under_cfg_test() {
    for file in rust_files(&src_dir())
        .into_iter()
        .filter(|f| is_test_file(f))
    {
        let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
        let dir = file.parent().unwrap();
        let parent = ["mod.rs", "lib.rs"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.exists())
            .unwrap_or_else(|| dir.with_extension("rs"));
        let text = std::fs::read_to_string(&parent).unwrap_or_default();
        assert!(
            text.contains(&format!("#[cfg(test)]\nmod {stem};")),
            "{} is treated as test code, so {} must declare it as `#[cfg(test)]\nmod {stem};`",
            file.display(),
            parent.display()
        );
    }
}

#[test]
fn every_source_file_starts_with_a_module_comment() {
    let mut missing = Vec::new();
    for file in rust_files(&src_dir()) {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        if !first.starts_with("//!") {
            missing.push(file.display().to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "files without a `//!` header saying what they are:\n{}",
        missing.join("\n")
    );
}

#[test]
fn large_files_are_explained_in_architecture_md() {
    let doc = architecture();
    let large = doc
        .split("#### Large files")
        .nth(1)
        .map(|s| s.split("\n#").next().unwrap_or(""))
        .unwrap_or("");
    let mut unexplained = Vec::new();
    let mut sizes = BTreeMap::new();
    for (file, text) in sources() {
        let lines = production_lines(&text).len();
        let rel = file.strip_prefix(src_dir()).unwrap_or(&file);
        let name = format!("server/src/{}", rel.display());
        if lines > MAX_PRODUCTION_LINES {
            sizes.insert(name.clone(), lines);
            if !large.contains(&format!("`{name}`")) {
                unexplained.push(format!("{name}: {lines} production lines"));
            }
        }
    }
    assert!(
        unexplained.is_empty(),
        "files over {MAX_PRODUCTION_LINES} production lines, not named with a reason under \
         ARCHITECTURE.md's \"#### Large files\":\n{}",
        unexplained.join("\n")
    );
    let mut listed = String::new();
    for name in large.split('`').skip(1).step_by(2) {
        if name.starts_with("server/src/") && !sizes.contains_key(name) {
            let _ = writeln!(listed, "{name}");
        }
    }
    assert!(
        listed.is_empty(),
        "ARCHITECTURE.md lists files as large that are not (or no longer exist):\n{listed}"
    );
}

#[test]
fn only_the_scheduler_opens_the_store_writer() {
    let mut openers = Vec::new();
    for (file, text) in sources() {
        let module = module_of(&file);
        if module == WRITER_FOLDER || module.starts_with(&format!("{WRITER_FOLDER}::")) {
            continue;
        }
        if module == "store" || module.starts_with("store::") {
            continue; // where it is defined
        }
        for (number, line) in production_lines(&text) {
            if line.contains(WRITER_OPENER) {
                openers.push(format!("{}:{number}: {}", file.display(), line.trim()));
            }
        }
    }
    assert!(
        openers.is_empty(),
        "only the scheduler (server/src/{WRITER_FOLDER}) may open the store's writer:\n{}",
        openers.join("\n")
    );
}

/// The check itself: a reversed import is reported with file, line and both
/// modules; a group import is refused; comments, tests and a module's own
/// children are not imports against the order.
#[test]
fn a_reversed_import_is_caught_with_file_line_and_both_modules() {
    let src = src_dir();
    let files = vec![
        (
            src.join("model/mod.rs"),
            "//! m\nuse crate::scheduler::Handle;\n".to_string(),
        ),
        (
            src.join("reconcile/plan.rs"),
            "//! p\nuse super::observed::ObservedIndex;\n/// [`crate::server`]\nuse super::Reconciler;\n#[cfg(test)]\nuse crate::server::run;\n"
                .to_string(),
        ),
        (
            src.join("store/mod.rs"),
            "//! s\nuse crate::{model::TaskId, scheduler::Handle};\n".to_string(),
        ),
        (
            src.join("health/webhook.rs"),
            "//! w\nuse crate::config::WebhookTarget;\nuse super::Alerts;\n".to_string(),
        ),
        (
            src.join("control.rs"),
            "//! c\nuse crate::gateway::Gateway;\n".to_string(),
        ),
    ];
    let problems = layer_violations(&files);
    let expect = [
        "server/src/model/mod.rs:2: `model` uses `scheduler` (a higher layer)",
        "server/src/reconcile/plan.rs:4: `reconcile::plan` uses `reconcile` (a higher layer)",
        "server/src/store/mod.rs:2: `crate::{…}` groups several modules",
        "server/src/control.rs:2: `control` uses `gateway` (a peer in the same layer)",
    ];
    for want in expect {
        assert!(
            problems.iter().any(|p| p.starts_with(want)),
            "expected a problem starting with {want:?}, got:\n{}",
            problems.join("\n")
        );
    }
    assert_eq!(problems.len(), expect.len(), "{}", problems.join("\n"));
}
