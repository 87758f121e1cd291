//! Robustness: the parser and the checker never panic, whatever the input. Random byte
//! strings and random mutations of the real specs (deleted, duplicated and swapped ranges,
//! inserted tokens, replaced numbers) are fed to `parse` and to the whole checker.

use proptest::prelude::*;
use std::path::{Path, PathBuf};

/// Every spec in the repository: the zoo, the standard library, the block tests.
fn corpus() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for dir in ["models", "models/std", "tests/blocks"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "vlm"))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).expect("readable spec");
            out.push((f, text));
        }
    }
    out
}

/// Tokens worth inserting: keywords, punctuation, numbers at the edges, shapes, names.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    ",",
    ":",
    ".",
    "..",
    "...",
    "=",
    "==",
    "->",
    "@",
    "*",
    "/",
    "%",
    "-",
    "!",
    "?",
    "&&",
    "||",
    "let ",
    "fn ",
    "block ",
    "model ",
    "param ",
    "use ",
    "if ",
    "else ",
    "for ",
    "in ",
    "return ",
    "assert ",
    "none",
    "true",
    "0",
    "-1",
    "1",
    "3",
    "1e309",
    "99999999999999999999",
    "9223372036854775807",
    "0.0",
    "f32[",
    "i32[B, T]",
    "*s",
    "_",
    "x",
    "B",
    "T",
    "layers[7]",
    "reshape(x, [-1, -1])",
    "x.T",
    "x[::0]",
    "x[5:2]",
    "0..1000000000",
    "std.nn.Linear",
    "\"",
    "//",
    "/*",
    "\n",
    "adapter a for M = lora(rank: 0) on **",
    "trainer t for M { steps -1 }",
];

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize, usize),
    Duplicate(usize, usize),
    Insert(usize, usize),
    Swap(usize, usize),
    Number(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let pos = 0usize..100_000;
    prop_oneof![
        (pos.clone(), 1usize..40).prop_map(|(a, n)| Mutation::Delete(a, n)),
        (pos.clone(), 1usize..60).prop_map(|(a, n)| Mutation::Duplicate(a, n)),
        (pos.clone(), 0usize..TOKENS.len()).prop_map(|(a, t)| Mutation::Insert(a, t)),
        (pos.clone(), pos.clone()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        (pos, 0usize..8).prop_map(|(a, k)| Mutation::Number(a, k)),
    ]
}

fn boundary(s: &str, i: usize) -> usize {
    let mut i = i % (s.len() + 1);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut s = text.to_string();
    match *m {
        Mutation::Delete(a, n) => {
            let a = boundary(&s, a);
            let b = boundary(&s, (a + n).min(s.len()));
            s.replace_range(a..b, "");
        }
        Mutation::Duplicate(a, n) => {
            let a = boundary(&s, a);
            let b = boundary(&s, (a + n).min(s.len()));
            let piece = s[a..b].to_string();
            s.insert_str(b, &piece);
        }
        Mutation::Insert(a, t) => {
            let a = boundary(&s, a);
            s.insert_str(a, TOKENS[t]);
        }
        Mutation::Swap(a, b) => {
            let (a, b) = (boundary(&s, a), boundary(&s, b));
            let (a, b) = (a.min(b), a.max(b));
            let (x, y) = (s[a..].chars().next(), s[b..].chars().next());
            if let (Some(x), Some(y)) = (x, y) {
                if b > a {
                    let mut t = String::with_capacity(s.len());
                    t.push_str(&s[..a]);
                    t.push(y);
                    t.push_str(&s[a + x.len_utf8()..b]);
                    t.push(x);
                    t.push_str(&s[b + y.len_utf8()..]);
                    s = t;
                }
            }
        }
        Mutation::Number(a, k) => {
            // Replace the next integer literal with an edge value.
            let a = boundary(&s, a);
            if let Some(off) = s[a..].find(|c: char| c.is_ascii_digit()) {
                let start = a + off;
                let end = s[start..]
                    .find(|c: char| !c.is_ascii_digit())
                    .map_or(s.len(), |e| start + e);
                let v = [
                    "0",
                    "1",
                    "2",
                    "7",
                    "-1",
                    "100000000",
                    "4611686018427387904",
                    "65",
                ][k];
                s.replace_range(start..end, v);
            }
        }
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Arbitrary text never panics the parser.
    #[test]
    fn parser_survives_random_text(s in "\\PC{0,200}") {
        let _ = vlmc_grammar::parse(&s);
    }

    /// Mutated specs never panic the parser.
    #[test]
    fn parser_survives_mutated_specs(pick in 0usize..1000, ms in prop::collection::vec(mutation(), 1..6)) {
        let corpus = corpus();
        let (_, text) = &corpus[pick % corpus.len()];
        let mut s = text.clone();
        for m in &ms {
            s = apply(&s, m);
        }
        let _ = vlmc_grammar::parse(&s);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    /// Mutated specs never panic the checker: every failure is a diagnostic that renders.
    #[test]
    fn checker_survives_mutated_specs(pick in 0usize..1000, ms in prop::collection::vec(mutation(), 1..4)) {
        let corpus = corpus();
        // Prefer the small block tests and std files (fast to elaborate); the zoo is included.
        let (path, text) = &corpus[pick % corpus.len()];
        let mut s = text.clone();
        for m in &ms {
            s = apply(&s, m);
        }
        let checked = vlmc::elab::check_text(path, s);
        if checked.result.is_err() {
            let rendered = checked.render();
            prop_assert!(rendered.starts_with("error: "), "{rendered}");
        }
    }
}

#[test]
fn checker_accepts_the_unmutated_corpus() {
    for (path, text) in corpus() {
        let checked = vlmc::elab::check_text(Path::new(&path), text);
        assert!(
            checked.result.is_ok(),
            "{}:\n{}",
            path.display(),
            checked.render()
        );
    }
}

/// A model whose forward returns `body` (an expression of `x: f32[B, 4]`).
fn deep_model(body: &str) -> String {
    format!("model M {{\n  fn forward(x: f32[B, 4]) -> f32[B, 4] {{\n    return {body}\n  }}\n}}\n")
}

/// Deep and long shapes of expression, each `n` levels deep.
fn deep_text(kind: usize, n: usize) -> String {
    match kind {
        0 => deep_model(&format!("{}x{}", "(".repeat(n), ")".repeat(n))),
        1 => deep_model(&vec!["x"; n].join(" + ")),
        2 => deep_model(&format!("{}x", "-".repeat(n))),
        3 => deep_model(&format!("{}x{}", "-(".repeat(n), ")".repeat(n))),
        4 => deep_model(&format!("{}x{}", "relu(".repeat(n), ")".repeat(n))),
        5 => deep_model(&format!("[{}x{}][0]", "[".repeat(n), "]".repeat(n))),
        6 => deep_model(&format!("x{}", "[0:1]".repeat(n))),
        7 => format!(
            "model M {{\n  fn forward(x: f32[B, 4]) -> f32[B, 4] {{\n    let y = x\n    if false {{ y = x }}{}\n    return y\n  }}\n}}\n",
            " else if false { y = x }".repeat(n)
        ),
        _ => format!(
            "model M {{\n  fn forward(x: f32[B, 4]) -> f32[B, 4] {{\n    let y = x\n    for i in 0..{n} {{ y = y * 0.5 + x }}\n    return y\n  }}\n}}\n"
        ),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Nesting and chains of any length, on a test thread's small stack: a result or a
    /// rendered diagnostic, never an overflow. Past the fixed limits the error says so.
    #[test]
    fn checker_survives_deep_nesting_and_long_chains(kind in 0usize..9, n in prop_oneof![1usize..300, 1900usize..2100, 3000usize..12000]) {
        let text = deep_text(kind, n);
        let checked = vlmc::elab::check_text(Path::new("deep.vlm"), text);
        // Within the limits (the model's and the function's braces are two levels), the shapes
        // that type-check must elaborate; past them, the error says why.
        let (nest, depth) = (vlmc_grammar::MAX_NESTING, vlmc_grammar::MAX_EXPR_DEPTH);
        let within = match kind {
            0 | 3 | 7 => n + 2 < nest,
            1 | 2 => n < depth,
            8 => true,
            _ => false,
        };
        let too_deep = match kind {
            0 | 3 | 4 | 5 | 7 => n + 2 > nest,
            1 | 2 | 6 => n > depth,
            _ => false,
        };
        match &checked.result {
            Ok(_) => prop_assert!(!too_deep, "kind {kind} at {n} levels passes"),
            Err(_) => {
                let rendered = checked.render();
                prop_assert!(rendered.starts_with("error: "), "{rendered}");
                prop_assert!(!within, "kind {kind} at {n} levels fails: {rendered}");
                if too_deep {
                    prop_assert!(rendered.contains("too deep"), "{rendered}");
                }
            }
        }
    }
}

#[test]
fn nesting_past_the_limits_is_a_located_error() {
    let over = vlmc_grammar::MAX_NESTING + 1;
    let e = vlmc_grammar::parse(&deep_text(0, over)).unwrap_err();
    assert!(e.message.starts_with("nesting too deep"), "{}", e.message);
    let e = vlmc_grammar::parse(&deep_text(1, 8000)).unwrap_err();
    assert!(
        e.message.starts_with("expression nested too deep"),
        "{}",
        e.message
    );
    // The operator where the limit is crossed: the 2000th `+`.
    let text = deep_text(1, 8000);
    assert_eq!(&text[e.span.start..e.span.end], "+");
    assert_eq!(
        text[..e.span.start].matches('+').count(),
        vlmc_grammar::MAX_EXPR_DEPTH - 1
    );
    // At the limit, the checker elaborates it.
    let at = deep_text(1, vlmc_grammar::MAX_EXPR_DEPTH);
    let checked = vlmc::elab::check_text(Path::new("at.vlm"), at);
    assert!(checked.result.is_ok(), "{}", checked.render());
}

#[test]
fn a_byte_order_mark_is_whitespace() {
    let text = format!("\u{feff}{}", deep_text(1, 3));
    let checked = vlmc::elab::check_text(Path::new("bom.vlm"), text);
    assert!(checked.result.is_ok(), "{}", checked.render());
}
