//! Diagnostics: an error with a primary span, secondary labels and notes, rendered as
//! `file:line:col`, the source line and carets under the span.

use std::fmt;
use std::path::{Path, PathBuf};
use vlmc_grammar::ast::Span;

/// Index of a source file in a [`SourceMap`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct FileId(pub u32);

/// A location: which file and which bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Loc {
    pub file: FileId,
    pub span: Span,
}

/// All source files read during one compilation.
#[derive(Default, Debug)]
pub struct SourceMap {
    files: Vec<(PathBuf, String)>,
}

impl SourceMap {
    /// Adds a file's text; returns its id.
    pub fn add(&mut self, path: PathBuf, text: String) -> FileId {
        self.files.push((path, text));
        FileId(self.files.len() as u32 - 1)
    }
    /// The path a file was read from.
    pub fn path(&self, id: FileId) -> &Path {
        &self.files[id.0 as usize].0
    }
    /// The text of a file.
    pub fn text(&self, id: FileId) -> &str {
        &self.files[id.0 as usize].1
    }
    /// The id of an already-loaded file.
    pub fn find(&self, path: &Path) -> Option<FileId> {
        self.files
            .iter()
            .position(|(p, _)| p == path)
            .map(|i| FileId(i as u32))
    }
    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, id: FileId, offset: usize) -> (usize, usize) {
        let text = self.text(id);
        let offset = clamp_to_char(text, offset);
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }
    /// `path:line:col` of a location.
    pub fn describe(&self, loc: Loc) -> String {
        let (l, c) = self.line_col(loc.file, loc.span.start);
        format!("{}:{}:{}", self.path(loc.file).display(), l, c)
    }
}

fn clamp_to_char(text: &str, mut offset: usize) -> usize {
    offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// One compile error.
#[derive(Clone, PartialEq, Debug)]
pub struct Diagnostic {
    pub message: String,
    pub loc: Loc,
    /// Labels, other locations, notes (boxed: errors travel through every `Result`).
    pub detail: Box<Detail>,
}

/// The optional parts of a [`Diagnostic`].
#[derive(Clone, PartialEq, Debug, Default)]
pub struct Detail {
    /// Text under the primary caret.
    pub label: Option<String>,
    /// Other places worth showing (a declaration, the call site).
    pub secondary: Vec<(Loc, String)>,
    pub notes: Vec<String>,
    /// The call stack at the error, innermost first.
    pub trace: Vec<String>,
}

impl Diagnostic {
    /// An error at `loc`.
    pub fn new(loc: Loc, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            message: message.into(),
            loc,
            detail: Box::default(),
        }
    }
    /// Sets the text under the caret.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.detail.label = Some(label.into());
        self
    }
    /// Adds a secondary location.
    pub fn also(mut self, loc: Loc, label: impl Into<String>) -> Self {
        self.detail.secondary.push((loc, label.into()));
        self
    }
    /// Adds a note line.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.detail.notes.push(note.into());
        self
    }
    /// Adds a line of the call stack (shown after the notes).
    pub fn trace(mut self, line: impl Into<String>) -> Self {
        self.detail.trace.push(line.into());
        self
    }
    /// Renders the diagnostic as plain text, rustc-style: the message, `--> file:line:col`, the
    /// source line with carets under the span, secondary locations, notes and the call stack.
    pub fn render(&self, sources: &SourceMap) -> String {
        let mut lines: Vec<(Loc, char, Option<&str>)> =
            vec![(self.loc, '^', self.detail.label.as_deref())];
        lines.extend(
            self.detail
                .secondary
                .iter()
                .map(|(l, t)| (*l, '-', Some(t.as_str()))),
        );
        let width = lines
            .iter()
            .map(|(l, _, _)| sources.line_col(l.file, l.span.start).0.to_string().len())
            .max()
            .unwrap_or(1);
        let pad = " ".repeat(width);
        let mut out = format!("error: {}\n", self.message);
        for (i, (loc, mark, label)) in lines.iter().enumerate() {
            let arrow = if i == 0 { "-->" } else { ":::" };
            out.push_str(&format!("{pad}{arrow} {}\n", sources.describe(*loc)));
            out.push_str(&format!("{pad} |\n"));
            let text = sources.text(loc.file);
            let start = clamp_to_char(text, loc.span.start);
            let line_start = text[..start].rfind('\n').map_or(0, |p| p + 1);
            let line_end = text[start..].find('\n').map_or(text.len(), |p| start + p);
            let line_text = &text[line_start..line_end];
            let (line_no, col) = sources.line_col(loc.file, start);
            let end = clamp_to_char(text, loc.span.end).clamp(start, line_end);
            let n_marks = text[start..end].chars().count().max(1);
            let (shown, at, n_marks) = window(&line_text.replace('\t', " "), col - 1, n_marks);
            out.push_str(&format!("{line_no:>width$} | {shown}\n"));
            let mut under = format!(
                "{pad} | {}{}",
                " ".repeat(at),
                mark.to_string().repeat(n_marks)
            );
            if let Some(l) = label {
                under.push(' ');
                under.push_str(l);
            }
            out.push_str(under.trim_end());
            out.push('\n');
        }
        if !self.detail.notes.is_empty() || !self.detail.trace.is_empty() {
            out.push_str(&format!("{pad} |\n"));
        }
        for n in &self.detail.notes {
            out.push_str(&format!("{pad} = note: {n}\n"));
        }
        for t in &self.detail.trace {
            out.push_str(&format!("{pad} = {t}\n"));
        }
        out
    }
}

/// The most characters of a source line a diagnostic shows: a longer line (a generated file)
/// is shown around the marked column, cut with `…`.
const LINE_SHOWN: usize = 160;

/// The part of `line` to show for a mark at character `col` over `marks` characters: the text,
/// the mark's column in it and how many marks fit.
fn window(line: &str, col: usize, marks: usize) -> (String, usize, usize) {
    let chars: Vec<char> = line.chars().collect();
    if chars.len() <= LINE_SHOWN {
        return (line.to_string(), col, marks);
    }
    let col = col.min(chars.len());
    let lo = col.saturating_sub(LINE_SHOWN / 3);
    let hi = (lo + LINE_SHOWN).min(chars.len());
    let lo = lo.min(hi.saturating_sub(LINE_SHOWN));
    let mut shown = String::new();
    let mut at = col - lo;
    if lo > 0 {
        shown.push('…');
        at += 1;
    }
    shown.extend(&chars[lo..hi]);
    if hi < chars.len() {
        shown.push('…');
    }
    (shown, at, marks.min(hi.saturating_sub(col)).max(1))
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_shown_around_the_mark() {
        // Short lines are shown whole.
        assert_eq!(window("let x = 1", 4, 1), ("let x = 1".to_string(), 4, 1));
        // A long line: the marked character stays under the mark, cut on both sides.
        let line: String = (0..1000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let (shown, at, marks) = window(&line, 500, 3);
        assert!(shown.starts_with('…') && shown.ends_with('…'), "{shown}");
        assert_eq!(shown.chars().count(), LINE_SHOWN + 2);
        assert_eq!(shown.chars().nth(at), line.chars().nth(500));
        assert_eq!(marks, 3);
        // Near the start: no cut before; near the end: no cut after, marks clipped to the line.
        let (shown, at, _) = window(&line, 2, 1);
        assert!(!shown.starts_with('…') && shown.ends_with('…'));
        assert_eq!(at, 2);
        let (shown, at, marks) = window(&line, 998, 50);
        assert!(shown.starts_with('…') && !shown.ends_with('…'));
        assert_eq!(shown.chars().nth(at), line.chars().nth(998));
        assert_eq!(marks, 2);
    }
}
