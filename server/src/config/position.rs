//! A position index of a YAML document: document path (`sources[3].scraper`) →
//! line and column, built with saphyr-parser's event parser so that checks made after
//! deserialization can still point at the offending text.

use std::collections::{HashMap, HashSet};
use std::fmt;

use saphyr_parser::{Event, Parser, Span};

/// A 1-based line and column in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One step of a document path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    /// A mapping key.
    Key(String),
    /// A sequence index.
    Index(usize),
}

/// A path into the document, e.g. `scrapers.espn.command[1]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct YamlPath(Vec<Segment>);

impl YamlPath {
    /// The document root.
    pub fn root() -> Self {
        YamlPath(Vec::new())
    }

    /// This path extended by a mapping key.
    pub fn key(&self, key: &str) -> Self {
        let mut segs = self.0.clone();
        segs.push(Segment::Key(key.to_owned()));
        YamlPath(segs)
    }

    /// This path extended by a sequence index.
    pub fn idx(&self, index: usize) -> Self {
        let mut segs = self.0.clone();
        segs.push(Segment::Index(index));
        YamlPath(segs)
    }

    /// The last segment if it is a mapping key.
    pub fn last_key(&self) -> Option<&str> {
        match self.0.last() {
            Some(Segment::Key(k)) => Some(k),
            _ => None,
        }
    }

    /// The enclosing path, or `None` at the root.
    pub fn parent(&self) -> Option<Self> {
        let (_, rest) = self.0.split_last()?;
        Some(YamlPath(rest.to_vec()))
    }
}

impl fmt::Display for YamlPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(".");
        }
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Key(k) if i == 0 => f.write_str(k)?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Where each node (and each mapping key) of a document starts.
#[derive(Debug, Default)]
pub struct PositionIndex {
    values: HashMap<YamlPath, Position>,
    keys: HashMap<YamlPath, Position>,
    duplicates: Vec<(YamlPath, Position)>,
    /// Whether the whole first document was indexed (saphyr is stricter than libyaml,
    /// so a document serde_yaml accepts may still stop the index early).
    complete: bool,
}

impl PositionIndex {
    /// Indexes the first document of `src`. A document saphyr cannot parse yields a
    /// partial (possibly empty) index: positions are a help for messages, never a gate.
    pub fn build(src: &str) -> Self {
        let mut builder = Builder::default();
        let bom_free = without_inner_boms(src);
        builder.restore_bom = bom_free.is_some();
        let mut parser = Parser::new_from_str(bom_free.as_deref().unwrap_or(src));
        while let Some(Ok((event, span))) = parser.next_event() {
            if !builder.event(&event, span) {
                builder.index.complete = true;
                break;
            }
        }
        builder.index
    }

    /// Whether the whole document was indexed.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Where the node at `path` starts, or the nearest enclosing node that is indexed.
    /// In an incomplete index only exact matches count: an ancestor's position would
    /// point at the wrong place when the node itself was simply never reached.
    pub fn value(&self, path: &YamlPath) -> Option<Position> {
        if !self.complete {
            return self.values.get(path).copied();
        }
        let mut cur = Some(path.clone());
        while let Some(p) = cur {
            if let Some(pos) = self.values.get(&p) {
                return Some(*pos);
            }
            cur = p.parent();
        }
        None
    }

    /// Where the mapping key that names `path` starts, falling back to [`Self::value`].
    pub fn key(&self, path: &YamlPath) -> Option<Position> {
        self.keys.get(path).copied().or_else(|| self.value(path))
    }

    /// Whether the node at `path` itself is indexed.
    pub fn contains(&self, path: &YamlPath) -> bool {
        self.values.contains_key(path)
    }

    /// Mapping keys that occur twice in one mapping: the path and the second key's position.
    pub fn duplicates(&self) -> &[(YamlPath, Position)] {
        &self.duplicates
    }
}

/// Stands in for a byte order mark inside a scalar: a private-use character, which
/// YAML allows in plain scalars and which, like the mark, is one character wide.
const BOM_STAND_IN: char = '\u{e000}';

/// `src` with every byte order mark after the first character replaced the way libyaml
/// (and so serde_yaml) reads it, or `None` when there is none to replace. saphyr refuses
/// such marks, which would leave everything after one unindexed; libyaml skips a mark
/// at the start of a line (it still counts as a column, like a space) and keeps any
/// other as part of the scalar it is in (here [`BOM_STAND_IN`], turned back into the
/// mark in key names). Columns are counted in characters, so positions do not move.
/// Documents that already hold the stand-in are left alone.
fn without_inner_boms(src: &str) -> Option<String> {
    let mut rest = src.char_indices().skip(1);
    if !rest.any(|(_, c)| c == '\u{feff}') || src.contains(BOM_STAND_IN) {
        return None;
    }
    let mut out = String::with_capacity(src.len());
    let mut line_start = true;
    for (i, c) in src.char_indices() {
        out.push(match c {
            '\u{feff}' if i == 0 => c,
            '\u{feff}' if line_start => ' ',
            '\u{feff}' => BOM_STAND_IN,
            _ => c,
        });
        line_start = matches!(c, '\n' | '\r');
    }
    Some(out)
}

/// What the builder expects next inside an open collection.
#[derive(Debug)]
enum Frame {
    /// A sequence; `None` when inside an unindexable subtree.
    Seq { path: Option<YamlPath>, next: usize },
    /// A mapping, expecting a key or the value of `pending` (`Some(None)` for a value
    /// under a key that is not a plain scalar).
    Map {
        path: Option<YamlPath>,
        pending: Option<Option<String>>,
        /// The keys so far; a set, so that a mapping with many keys indexes in linear time.
        seen: HashSet<String>,
    },
}

#[derive(Default)]
struct Builder {
    index: PositionIndex,
    stack: Vec<Frame>,
    root_done: bool,
    /// Whether scalars may hold [`BOM_STAND_IN`] for a byte order mark.
    restore_bom: bool,
}

fn position(span: Span) -> Position {
    Position {
        line: span.start.line(),
        column: span.start.col() + 1,
    }
}

/// Where a node that starts now belongs.
enum Slot {
    /// A value at this path (`None`: inside an unindexable subtree).
    Value(Option<YamlPath>),
    /// A mapping key of the mapping at this path.
    Key(Option<YamlPath>),
}

impl Builder {
    /// Feeds one event; returns false once the first document is complete.
    fn event(&mut self, event: &Event<'_>, span: Span) -> bool {
        match event {
            Event::Scalar(text, ..) => {
                match self.slot() {
                    Slot::Key(map_path) => {
                        let key = if self.restore_bom {
                            text.replace(BOM_STAND_IN, "\u{feff}")
                        } else {
                            text.to_string()
                        };
                        self.set_key(Some(key), map_path, span);
                    }
                    Slot::Value(path) => self.record(path, span),
                }
                true
            }
            Event::Alias(_) => {
                match self.slot() {
                    Slot::Key(map_path) => self.set_key(None, map_path, span),
                    Slot::Value(path) => self.record(path, span),
                }
                true
            }
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                let path = match self.slot() {
                    Slot::Key(_) => {
                        // A complex key: its value is not indexable, nor is the key's content.
                        self.mark_complex_key();
                        None
                    }
                    Slot::Value(path) => {
                        self.record(path.clone(), span);
                        path
                    }
                };
                self.stack.push(match event {
                    Event::SequenceStart(..) => Frame::Seq { path, next: 0 },
                    _ => Frame::Map {
                        path,
                        pending: None,
                        seen: HashSet::new(),
                    },
                });
                true
            }
            Event::SequenceEnd | Event::MappingEnd => {
                self.stack.pop();
                !(self.stack.is_empty() && self.root_done)
            }
            Event::DocumentEnd => !self.root_done,
            _ => true,
        }
    }

    /// Decides where the node starting now belongs and advances the enclosing frame.
    fn slot(&mut self) -> Slot {
        match self.stack.last_mut() {
            None => {
                self.root_done = true;
                Slot::Value(Some(YamlPath::root()))
            }
            Some(Frame::Seq { path, next }) => {
                let p = path.as_ref().map(|p| p.idx(*next));
                *next += 1;
                Slot::Value(p)
            }
            Some(Frame::Map { path, pending, .. }) => match pending.take() {
                None => Slot::Key(path.clone()),
                Some(key) => Slot::Value(match (path.as_ref(), key) {
                    (Some(p), Some(k)) => Some(p.key(&k)),
                    _ => None,
                }),
            },
        }
    }

    fn set_key(&mut self, key: Option<String>, map_path: Option<YamlPath>, span: Span) {
        if let Some(Frame::Map { pending, seen, .. }) = self.stack.last_mut() {
            if let (Some(k), Some(mp)) = (&key, &map_path) {
                let path = mp.key(k);
                if seen.insert(k.clone()) {
                    self.index.keys.insert(path, position(span));
                } else {
                    self.index.duplicates.push((path, position(span)));
                }
            }
            *pending = Some(key);
        }
    }

    fn mark_complex_key(&mut self) {
        if let Some(Frame::Map { pending, .. }) = self.stack.last_mut() {
            *pending = Some(None);
        }
    }

    fn record(&mut self, path: Option<YamlPath>, span: Span) {
        if let Some(p) = path {
            self.index.values.entry(p).or_insert(position(span));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(line: usize, column: usize) -> Option<Position> {
        Some(Position { line, column })
    }

    const DOC: &str = "\
version: 1
scrapers:
  espn:
    command: [\"sh\", \"{out}\"]
    limits:
      - a
      - b
sources:
  - name: one
    scraper: espn
  - {name: two, scraper: \"x\"}
";

    #[test]
    fn indexes_values_and_keys_in_block_and_flow_style() {
        let idx = PositionIndex::build(DOC);
        let root = YamlPath::root();
        assert_eq!(idx.value(&root.key("version")), pos(1, 10));
        assert_eq!(idx.key(&root.key("version")), pos(1, 1));
        let espn = root.key("scrapers").key("espn");
        assert_eq!(idx.key(&espn), pos(3, 3));
        assert_eq!(idx.value(&espn.key("command").idx(1)), pos(4, 21));
        assert_eq!(idx.value(&espn.key("limits").idx(1)), pos(7, 9));
        let s0 = root.key("sources").idx(0);
        assert_eq!(idx.value(&s0), pos(9, 5));
        assert_eq!(idx.value(&s0.key("scraper")), pos(10, 14));
        let s1 = root.key("sources").idx(1);
        assert_eq!(idx.value(&s1.key("scraper")), pos(11, 26));
        assert_eq!(idx.key(&s1.key("name")), pos(11, 6));
    }

    #[test]
    fn missing_paths_fall_back_to_the_nearest_ancestor() {
        let idx = PositionIndex::build(DOC);
        assert!(idx.is_complete());
        let p = YamlPath::root().key("sources").idx(0).key("objects").idx(3);
        assert_eq!(idx.value(&p), pos(9, 5));
        assert!(!idx.contains(&p));
    }

    #[test]
    fn paths_display_like_serde_yaml() {
        let p = YamlPath::root().key("sources").idx(3).key("scraper");
        assert_eq!(p.to_string(), "sources[3].scraper");
        assert_eq!(YamlPath::root().to_string(), ".");
    }

    #[test]
    fn duplicate_keys_are_reported_at_the_second_occurrence() {
        let idx = PositionIndex::build("a: 1\nb:\n  x: 1\n  x: 2\n");
        assert_eq!(
            idx.duplicates(),
            &[(
                YamlPath::root().key("b").key("x"),
                Position { line: 4, column: 3 }
            )]
        );
    }

    #[test]
    fn byte_order_marks_after_the_start_are_read_like_libyaml() {
        let idx = PositionIndex::build("a: 1\nk\u{feff}x: [\u{feff}v]\n\u{feff}# note\nb: 2\n");
        assert!(idx.is_complete());
        let k = YamlPath::root().key("k\u{feff}x");
        assert_eq!(idx.key(&k), pos(2, 1));
        assert_eq!(idx.value(&k.idx(0)), pos(2, 7));
        assert_eq!(idx.value(&YamlPath::root().key("b")), pos(4, 4));
        // A leading mark is the encoding's and stays; a document holding the stand-in
        // is parsed as it is.
        assert!(PositionIndex::build("\u{feff}a: 1\n").is_complete());
        assert_eq!(without_inner_boms("\u{feff}a: 1\n"), None);
        assert_eq!(without_inner_boms("\u{e000}\u{feff}"), None);
    }

    #[test]
    fn complex_keys_aliases_and_broken_documents_do_not_panic() {
        let idx = PositionIndex::build("? [a, b]\n: 1\nc: &x {d: 1}\ne: *x\n");
        assert_eq!(idx.value(&YamlPath::root().key("e")), pos(4, 4));
        assert_eq!(idx.value(&YamlPath::root().key("c").key("d")), pos(3, 11));
        assert!(idx.is_complete());
        // Events before a syntax error are still indexed, but without fallbacks.
        let broken = PositionIndex::build("a: 1\nb: [1, 2\nc: {");
        assert!(!broken.is_complete());
        assert_eq!(broken.value(&YamlPath::root().key("a")), pos(1, 4));
        assert_eq!(broken.value(&YamlPath::root().key("c").key("x")), None);
        let empty = PositionIndex::build("");
        assert_eq!(empty.value(&YamlPath::root()), None);
    }
}
