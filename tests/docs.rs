//! The documentation's examples are real: every ```vlm block of `docs/language.md`,
//! `docs/generation.md`, `docs/training.md` and `README.md` is checked. A block followed by a ```text block
//! that starts with `error:` must fail with exactly that diagnostic; every other model must
//! check.

use std::path::{Path, PathBuf};

/// The fenced blocks of a markdown file: (info string, body).
fn fences(markdown: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        if let Some(info) = line.strip_prefix("```") {
            let mut body = String::new();
            for l in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            out.push((info.trim().to_string(), body));
        }
    }
    out
}

struct Example {
    file: PathBuf,
    expected_error: Option<String>,
}

/// Writes the examples of one document into `dir` and says what each must do.
fn write_examples(doc: &str, dir: &Path) -> Vec<Example> {
    let text = std::fs::read_to_string(doc).unwrap_or_else(|e| panic!("{doc}: {e}"));
    let blocks = fences(&text);
    let mut out = Vec::new();
    for (i, (info, body)) in blocks.iter().enumerate() {
        if info != "vlm" {
            continue;
        }
        let name = body
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("// file: "))
            .map(str::to_string)
            .unwrap_or_else(|| format!("example_{i}.vlm"));
        let file = dir.join(&name);
        std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        std::fs::write(&file, body).expect("write example");
        let expected_error = blocks
            .get(i + 1)
            .filter(|(info, body)| info == "text" && body.starts_with("error:"))
            .map(|(_, body)| body.clone());
        out.push(Example {
            file,
            expected_error,
        });
    }
    out
}

fn check_document(doc: &str) -> usize {
    let dir = std::env::temp_dir().join(format!(
        "vlmc-docs-{}-{}",
        std::process::id(),
        doc.replace('/', "_")
    ));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let dir = std::fs::canonicalize(&dir).expect("canonical tmp dir");
    let examples = write_examples(doc, &dir);
    let prefix = format!("{}/", dir.display());
    let mut failures = Vec::new();
    for ex in &examples {
        let checked = vlmc::elab::check_file(&ex.file);
        let rendered = checked.render().replace(&prefix, "");
        let shown = ex
            .file
            .strip_prefix(&dir)
            .unwrap_or(&ex.file)
            .display()
            .to_string();
        match (&ex.expected_error, checked.result.is_ok()) {
            (None, true) => {}
            (None, false) => failures.push(format!("{doc}: {shown} should check:\n{rendered}")),
            (Some(_), true) => failures.push(format!("{doc}: {shown} should fail")),
            (Some(expected), false) => {
                // The documented output ends with `vlmc check`'s summary line.
                let expected: String = expected
                    .lines()
                    .filter(|l| !l.ends_with("file(s) failed"))
                    .map(|l| format!("{l}\n"))
                    .collect();
                if rendered != expected {
                    failures.push(format!("{doc}: {shown}: the documented error differs.\n--- documented\n{expected}--- actual\n{rendered}"));
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    examples.len()
}

#[test]
fn language_reference_examples_are_real() {
    let n = check_document("docs/language.md");
    assert!(n >= 20, "expected the reference's examples, found {n}");
}

#[test]
fn training_examples_check() {
    assert_eq!(check_document("docs/training.md"), 2);
}

#[test]
fn readme_example_checks() {
    assert_eq!(check_document("README.md"), 1);
}

#[test]
fn generation_examples_check_and_generate() {
    assert_eq!(check_document("docs/generation.md"), 2);
    // the model of the guide really generates: its prefill and step elaborate with caches
    let text = std::fs::read_to_string("docs/generation.md").expect("doc");
    let body = fences(&text)
        .into_iter()
        .find(|(info, b)| info == "vlm" && b.contains("model MyVlm"))
        .expect("the MyVlm example")
        .1;
    let dir = std::env::temp_dir().join(format!("vlmc-docs-gen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("my_vlm.vlm");
    std::fs::write(&file, body).expect("write");
    let g = vlmc::elab::generation_graphs(&file, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    let caches = |m: &vlmc::elab::Elaborated| {
        m.graph
            .inputs()
            .iter()
            .filter(|(_, n, _)| n.starts_with("past:"))
            .count()
    };
    assert_eq!((caches(&g.prefill), caches(&g.step)), (4, 4));
    std::fs::remove_dir_all(&dir).ok();
}
