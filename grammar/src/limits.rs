//! Fixed limits on how deeply a `.vlm` file may nest, checked before anything recurses.
//!
//! The parser, the elaborator, the printers and the passes recurse over the syntax tree. Rather
//! than let a hostile or generated file exhaust the stack, the front end rejects nesting past
//! limits that no real spec comes near (the standard library and the zoo nest at most a dozen
//! levels), with an error at the place where the limit is crossed:
//!
//! - [`MAX_NESTING`] levels of brackets (`(`, `[`, `{`), counting each `else if` of a chain as
//!   one more level (the grammar nests them), checked by a scan of the text before parsing;
//! - [`MAX_EXPR_DEPTH`] levels in one expression's tree (operators, calls, indexing, fields,
//!   brackets), checked while the tree is built (a flat chain `x + x + ... + x` is as deep as
//!   it is long: operators associate to the left).

use crate::ast::Span;
use crate::ParseError;

/// The most brackets (and `else if`s) open at once.
pub const MAX_NESTING: usize = 256;

/// The most levels in one expression's tree.
pub const MAX_EXPR_DEPTH: usize = 2000;

/// Rejects text that opens more than [`MAX_NESTING`] brackets at once, or has a run of more
/// than [`MAX_EXPR_DEPTH`] prefix operators. Comments and strings are skipped; an unbalanced
/// closer is left for the parser to report.
pub fn check_nesting(src: &str) -> Result<(), ParseError> {
    let b = src.as_bytes();
    // Per open bracket level: the `else if`s of the chain running at that level.
    let mut chains: Vec<usize> = vec![0];
    let mut depth = 0usize; // brackets open + every chain's `else if`s
    let mut after_close = false; // the last token closed a `}`: a chain goes on only with `else`
    let mut last_word: &str = "";
    let mut prefix_run = 0usize;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        let word = match c {
            b' ' | b'\t' | b'\r' | b'\n' => {
                i += 1;
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                match src.get(i + 2..).and_then(|r| r.find("*/")) {
                    Some(end) => i += end + 4,
                    None => i = b.len(),
                }
                continue;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' && b[i] != b'\n' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                ""
            }
            _ if c.is_ascii_alphanumeric() || c == b'_' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                &src[start..i]
            }
            _ => {
                i += 1;
                ""
            }
        };
        if after_close && word != "else" {
            let level = chains.last_mut().expect("the top level is never closed");
            depth -= *level;
            *level = 0;
        }
        after_close = false;
        let prefix =
            (c == b'-' && b.get(i) != Some(&b'>')) || (c == b'!' && b.get(i) != Some(&b'='));
        prefix_run = if prefix { prefix_run + 1 } else { 0 };
        if prefix_run > MAX_EXPR_DEPTH {
            return Err(ParseError {
                span: Span::new(start, start + 1),
                message: format!(
                    "expression nested too deep: more than {MAX_EXPR_DEPTH} operators in a row"
                ),
            });
        }
        match c {
            b'(' | b'[' | b'{' => {
                chains.push(0);
                depth += 1;
            }
            b')' | b']' | b'}' if chains.len() > 1 => {
                depth -= 1 + chains.pop().unwrap_or(0);
                after_close = c == b'}';
            }
            _ if word == "if" && last_word == "else" => {
                *chains.last_mut().expect("the top level is never closed") += 1;
                depth += 1;
            }
            _ => {}
        }
        if depth > MAX_NESTING {
            return Err(ParseError {
                span: Span::new(start, i.min(src.len()).max(start)),
                message: format!(
                    "nesting too deep: more than {MAX_NESTING} levels of brackets and `else if`s"
                ),
            });
        }
        last_word = word;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(n: usize) -> String {
        format!("{}x{}", "(".repeat(n), ")".repeat(n))
    }

    #[test]
    fn brackets_up_to_the_limit_pass_and_one_more_fails() {
        assert!(check_nesting(&nested(MAX_NESTING)).is_ok());
        let e = check_nesting(&nested(MAX_NESTING + 1)).unwrap_err();
        assert_eq!(e.span, Span::new(MAX_NESTING, MAX_NESTING + 1));
        assert!(e.message.starts_with("nesting too deep"), "{}", e.message);
    }

    #[test]
    fn comments_and_strings_do_not_count() {
        let s = format!(
            "// {}\n/* {} */ \"{}\"",
            "(".repeat(999),
            "[".repeat(999),
            "{".repeat(99)
        );
        assert!(check_nesting(&s).is_ok());
    }

    #[test]
    fn else_if_chains_count_while_they_run() {
        let chain = |n: usize| format!("if a {{ }}{}", " else if b { }".repeat(n));
        // Each `else if` is a level, and its body's brace one more.
        assert!(check_nesting(&chain(MAX_NESTING - 1)).is_ok());
        assert!(check_nesting(&chain(MAX_NESTING)).is_err());
        // Separate chains do not add up.
        let two = format!("{}\nlet y = 1\n{}", chain(200), chain(200));
        assert!(check_nesting(&two).is_ok());
    }

    #[test]
    fn long_prefix_runs_fail() {
        assert!(check_nesting(&format!("{}x", "-".repeat(MAX_EXPR_DEPTH))).is_ok());
        assert!(check_nesting(&format!("{}x", "- ".repeat(MAX_EXPR_DEPTH + 1))).is_err());
        // `->` and `!=` are not prefix operators.
        assert!(check_nesting(&"a -> b != c ".repeat(5000)).is_ok());
    }
}
