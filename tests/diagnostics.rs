//! Diagnostics tests: every `tests/errors/*.vlm` is a small program with one mistake.
//!
//! Each file's first line says where the primary caret must point:
//!
//! ```text
//! // expect-error: LINE:COL            (in the file itself)
//! // expect-error: PATH:LINE:COL       (in another file, e.g. models/std/ops.vlm:47:32)
//! ```
//!
//! and any line `// expect-message: TEXT` requires TEXT in the first diagnostic's message.
//! The test checks that the file fails, that the first diagnostic points there, and pins the
//! rendered diagnostics with an insta snapshot (`tests/snapshots/diagnostics__<name>.snap`).
//!
//! Helper files (modules imported by a case) live in subfolders and are not cases themselves.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use vlmc::elab::{check_file, Checked};

/// The `.vlm` files directly in `dir` (relative to the repository root), sorted.
fn cases(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {dir}: {e}"))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "vlm"))
        .collect();
    files.sort();
    files
}

/// What a case expects: the primary location and message fragments.
struct Expect {
    /// `None`: the case file itself.
    file: Option<String>,
    line: usize,
    col: usize,
    messages: Vec<String>,
}

fn parse_expect(path: &Path, text: &str) -> Expect {
    let first = text.lines().next().unwrap_or("");
    let spec = first
        .strip_prefix("// expect-error:")
        .unwrap_or_else(|| {
            panic!(
                "{}: the first line must be `// expect-error: LINE:COL`",
                path.display()
            )
        })
        .trim();
    let mut parts: Vec<&str> = spec.rsplitn(3, ':').collect();
    parts.reverse();
    let num = |s: &str| -> usize {
        s.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{}: bad expect-error `{spec}`", path.display()))
    };
    let (file, line, col) = match parts.as_slice() {
        [l, c] => (None, num(l), num(c)),
        [f, l, c] => (Some(f.trim().to_string()), num(l), num(c)),
        _ => panic!("{}: bad expect-error `{spec}`", path.display()),
    };
    let messages = text
        .lines()
        .filter_map(|l| l.strip_prefix("// expect-message:"))
        .map(|m| m.trim().to_string())
        .collect();
    Expect {
        file,
        line,
        col,
        messages,
    }
}

/// Makes rendered output independent of where the repository is checked out: the compiler's
/// built-in search root (an absolute path) is shown as `$VLMC_STD`.
fn normalize(text: &str) -> String {
    let std_root = concat!(env!("CARGO_MANIFEST_DIR"), "/compiler/../models");
    text.replace(std_root, "$VLMC_STD")
}

/// Checks one case: it fails, and its first diagnostic is where and what the file says.
/// Returns the check result for the snapshot.
fn check_case(path: &Path) -> Checked {
    let text = std::fs::read_to_string(path).expect("read case");
    let expect = parse_expect(path, &text);
    let checked = check_file(path);
    let diags = match &checked.result {
        Ok(_) => panic!("{}: expected an error, but it checks", path.display()),
        Err(d) => d,
    };
    let first = diags
        .first()
        .unwrap_or_else(|| panic!("{}: failed without a diagnostic", path.display()));
    let sources = &checked.program.sources;
    let (line, col) = sources.line_col(first.loc.file, first.loc.span.start);
    let file = sources.path(first.loc.file);
    let want_file = expect
        .file
        .as_deref()
        .map_or_else(|| path.to_path_buf(), PathBuf::from);
    let rendered = normalize(&checked.render());
    assert!(
        file == want_file && (line, col) == (expect.line, expect.col),
        "{}: the error points at {}:{line}:{col}, expected {}:{}:{}\n{rendered}",
        path.display(),
        file.display(),
        want_file.display(),
        expect.line,
        expect.col,
    );
    for m in &expect.messages {
        assert!(
            first.message.contains(m.as_str()),
            "{}: the message should mention `{m}`\n{rendered}",
            path.display()
        );
    }
    assert!(
        rendered.starts_with("error: ") && rendered.contains(" |"),
        "{}: the diagnostic is not rendered with a source line\n{rendered}",
        path.display()
    );
    checked
}

/// Runs `f` on every case, then reports every failing case at once.
fn run_all(dir: &str, mut f: impl FnMut(&Path)) {
    let files = cases(dir);
    let mut failed = Vec::new();
    for path in &files {
        if catch_unwind(AssertUnwindSafe(|| f(path))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n  {}",
        failed.len(),
        files.len(),
        failed.join("\n  ")
    );
}

#[test]
fn error_cases_point_at_the_mistake() {
    assert!(
        cases("tests/errors").len() >= 40,
        "tests/errors should hold at least 40 cases"
    );
    run_all("tests/errors", |path| {
        let checked = check_case(path);
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let rendered = normalize(&checked.render());
        insta::with_settings!({
            description => format!("vlmc check {}", path.display()),
            omit_expression => true,
        }, {
            insta::assert_snapshot!(name, rendered);
        });
    });
}

#[test]
fn check_command_exits_1_on_errors() {
    run_all("tests/errors", |path| {
        assert_eq!(
            vlmc_cli::check(&[path.to_path_buf()]),
            Err(1),
            "{}",
            path.display()
        );
    });
}

#[test]
fn models_and_std_check_cleanly() {
    let mut files = cases("models");
    files.extend(cases("models/std"));
    assert!(files.len() >= 2, "no models found");
    for path in &files {
        let checked = check_file(path);
        assert!(
            checked.result.is_ok(),
            "{} should check:\n{}",
            path.display(),
            normalize(&checked.render())
        );
    }
    assert_eq!(vlmc_cli::check(&files), Ok(()));
}
