//! The vocabulary every Pilotfish configuration file shares: one duration grammar
//! ([`parse_duration`]) and one way to report what is wrong ([`Problem`]: file, line, column,
//! key path, message).
//!
//! discovery.toml, agent.toml, registry files and `[registry.consul]` are all checked the same
//! way: serde reads the file into structs that mirror it, validation walks them and reports
//! each problem under its key path (`ca.node_ttl`, `registry.consul.datacenters[1]`), and
//! [`FileProblems`] finds where that key is written (through toml's spans) so that every
//! problem reads `file:line:column: key.path: message`, like a compiler's. All problems of a
//! file are collected before the loader fails, so an operator fixes a file in one pass.

mod duration;

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

pub use duration::{parse_duration, DURATION_EXAMPLES};

/// One thing wrong with a configuration file, located for a person to find.
///
/// `line` and `column` are 1-based; both are 0 for a problem with the whole file (it could not
/// be read, or a required key is missing), and then `Display` leaves them out. `key_path` is
/// the TOML path of the key at fault (`services.reviews.port`, `discovery[0]`), empty when
/// there is none (a syntax error).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub key_path: String,
    pub message: String,
}

impl Problem {
    pub fn new(
        file: impl Into<PathBuf>,
        line: usize,
        column: usize,
        key_path: impl Into<String>,
        message: impl Into<String>,
    ) -> Problem {
        Problem {
            file: file.into(),
            line,
            column,
            key_path: key_path.into(),
            message: message.into(),
        }
    }

    /// A problem with the whole file rather than a place in it.
    pub fn whole_file(
        file: impl Into<PathBuf>,
        key_path: impl Into<String>,
        message: impl Into<String>,
    ) -> Problem {
        Problem::new(file, 0, 0, key_path, message)
    }
}

/// `file:line:column: key.path: message`; the position and the key path are left out when
/// there is none.
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line != 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key_path.is_empty() {
            write!(f, ": {}", self.key_path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Byte offsets -> 1-based line and column (columns count characters, as editors do).
#[derive(Debug, Clone)]
pub struct LineIndex {
    text: String,
    starts: Vec<usize>,
}

impl LineIndex {
    pub fn new(text: &str) -> LineIndex {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex {
            text: text.to_string(),
            starts,
        }
    }

    /// `(line, column)` of `offset`, both 1-based.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.starts.partition_point(|&start| start <= offset);
        let start = self
            .starts
            .get(line.saturating_sub(1))
            .copied()
            .unwrap_or(0);
        // `get` guards a span that is not on a char boundary (it should always be).
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        (line.max(1), column + 1)
    }
}

/// toml's messages may span lines ("expected one of ...", a list of keys); a `Problem` is one
/// line so that logs and `--check` output stay one problem per line.
pub fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// A key as it is written in a TOML path: bare when it can be, quoted otherwise, so that
/// `services."a.b".port` is not mistaken for `services.a.b.port`.
pub fn key_segment(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if bare {
        name.to_string()
    } else {
        format!("{name:?}")
    }
}

/// The problems of one configuration file, each placed where its key is written.
///
/// Validation code names a key path; this finds the key's value in the file's text (or, when
/// the key is absent, the nearest enclosing table that is written; a problem with nothing of
/// its path written is about the whole file).
pub struct FileProblems<'t> {
    file: PathBuf,
    lines: LineIndex,
    tree: Spanned<DeTable<'t>>,
    problems: Vec<Problem>,
}

impl<'t> FileProblems<'t> {
    pub fn new(file: impl Into<PathBuf>, text: &'t str) -> FileProblems<'t> {
        // A file with a syntax error still yields what toml could make of it.
        let (tree, _) = DeTable::parse_recoverable(text);
        FileProblems {
            file: file.into(),
            lines: LineIndex::new(text),
            tree,
            problems: Vec::new(),
        }
    }

    /// Reports `message` against `key_path`, at the place the key is written.
    pub fn push(&mut self, key_path: impl Into<String>, message: impl Into<String>) {
        let key_path = key_path.into();
        let (line, column) = match self.locate(&key_path) {
            Some(span) => self.lines.position(span.start),
            None => (0, 0),
        };
        self.problems.push(Problem::new(
            self.file.clone(),
            line,
            column,
            key_path,
            message,
        ));
    }

    /// Reports a toml syntax or type error (unknown key, wrong type), with the key path of the
    /// place it points to.
    pub fn toml_error(&mut self, error: &toml::de::Error) {
        let (line, column, key_path) = match error.span() {
            Some(span) => {
                let (line, column) = self.lines.position(span.start);
                (line, column, self.path_at(span.start))
            }
            None => (0, 0, String::new()),
        };
        self.problems.push(Problem::new(
            self.file.clone(),
            line,
            column,
            key_path,
            one_line(error.message()),
        ));
    }

    /// Parses a duration with the one grammar; a malformed one is reported under `key_path`.
    /// Range checks are the caller's: each key keeps its own.
    pub fn duration(&mut self, key_path: &str, text: &str) -> Option<Duration> {
        match parse_duration(text) {
            Ok(d) => Some(d),
            Err(message) => {
                self.push(key_path, message);
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn len(&self) -> usize {
        self.problems.len()
    }

    /// The problems in file order (problems with the whole file first), as a reader fixes
    /// them; problems at one place keep the order they were found in.
    pub fn into_vec(mut self) -> Vec<Problem> {
        self.problems.sort_by_key(|p| (p.line, p.column));
        self.problems
    }

    /// The span of the value at `key_path`, or of the deepest written table on the way there.
    fn locate(&self, key_path: &str) -> Option<Range<usize>> {
        let mut found = None;
        let mut here: Option<&Spanned<DeValue<'t>>> = None;
        for segment in segments(key_path) {
            let next = match (segment, here.map(|v| v.get_ref())) {
                (Segment::Key(name), None) => entry(self.tree.get_ref(), &name),
                (Segment::Key(name), Some(DeValue::Table(table))) => entry(table, &name),
                (Segment::Index(i), Some(DeValue::Array(items))) => items.get(i),
                _ => None,
            };
            let Some(next) = next else { break };
            found = Some(next.span());
            here = Some(next);
        }
        found
    }

    /// The key path of the innermost key or value whose span holds `offset`.
    fn path_at(&self, offset: usize) -> String {
        let mut path = String::new();
        in_table(self.tree.get_ref(), offset, &mut path);
        path
    }
}

/// Appends to `path` the way to `offset` inside `table`; false when it is not inside. A
/// `[table]` header's span covers the header only, so tables are searched, not tested by span.
fn in_table(table: &DeTable<'_>, offset: usize, path: &mut String) -> bool {
    for (k, v) in table.iter() {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(&key_segment(k.get_ref()));
        if k.span().contains(&offset) || in_value(v, offset, path) {
            return true;
        }
        path.truncate(len);
    }
    false
}

fn in_value(value: &Spanned<DeValue<'_>>, offset: usize, path: &mut String) -> bool {
    match value.get_ref() {
        DeValue::Table(t) => in_table(t, offset, path) || value.span().contains(&offset),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                if in_value(item, offset, path) {
                    return true;
                }
                path.truncate(len);
            }
            value.span().contains(&offset)
        }
        _ => value.span().contains(&offset),
    }
}

fn entry<'a, 't>(table: &'a DeTable<'t>, name: &str) -> Option<&'a Spanned<DeValue<'t>>> {
    table
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == name)
        .map(|(_, v)| v)
}

enum Segment {
    Key(String),
    Index(usize),
}

/// `a."b.c"[2].d` -> `a`, `b.c`, `2`, `d`. Quoted keys are written the way [`key_segment`]
/// writes them (Rust's `{:?}`); only `\"` and `\\` are unescaped, which is all a key needs to
/// be found again.
fn segments(path: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut chars = path.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            '.' => {
                chars.next();
            }
            '"' => {
                chars.next();
                let mut name = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => name.extend(chars.next()),
                        c => name.push(c),
                    }
                }
                out.push(Segment::Key(name));
            }
            '[' => {
                chars.next();
                let digits: String = chars.by_ref().take_while(|c| *c != ']').collect();
                match digits.parse() {
                    Ok(i) => out.push(Segment::Index(i)),
                    Err(_) => return out,
                }
            }
            _ => {
                let mut name = String::new();
                while let Some(&c) = chars.peek() {
                    if c == '.' || c == '[' {
                        break;
                    }
                    name.push(c);
                    chars.next();
                }
                out.push(Segment::Key(name));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
