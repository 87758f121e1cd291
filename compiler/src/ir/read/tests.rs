//! The text form as a contract: print → read → print is the identity, and bad text is rejected
//! with a line and column.

use super::*;
use crate::ir::text::print;
use crate::ir::verify::verify;

/// A text that uses every op and attribute form at least once.
const EVERY_OP: &str = r#"graph LlavaTiny
dims B, T
%0 = input "pixels" : f32[B, 3, 32, 32]
%1 = param "vision.embeddings.patch_embedding.weight" init=normal(std=0.02) : f32[192, 64] @vision.embeddings
%2 = reshape(%0) shape=[B, 3, 4, 8, 4, 8] : f32[B, 3, 4, 8, 4, 8] @vision.embeddings
%3 = permute(%2) perm=[0, 2, 4, 1, 3, 5] : f32[B, 4, 4, 3, 8, 8] @vision.embeddings
%4 = reshape(%3) shape=[B, 16, 192] : f32[B, 16, 192] @vision.embeddings
%5 = reshape(%4) shape=[16*B, 192] : f32[16*B, 192] @vision.embeddings
%6 = matmul(%5, %1) : f32[16*B, 64] @vision.embeddings
%7 = reshape(%6) shape=[B, 16, 64] : f32[B, 16, 64] @vision
%8 = reduce_sum(%7) axis=2 : f32[B, 16, 1] @vision
%9 = reduce_max(%7) axis=1 : f32[B, 1, 64] @vision
%10 = expand(%9) shape=[B, 16, 64] : f32[B, 16, 64] @vision
%11 = sub(%7, %10) : f32[B, 16, 64] @vision
%12 = exp(%11) : f32[B, 16, 64] @vision
%13 = const value=-inf : f32[]
%14 = const value=1e-5 : f32[]
%15 = input "tokens" : i32[B, T]
%16 = param "text.embed_tokens.weight" init=zeros : bf16[100, 64]
%17 = gather(%16, %15) axis=0 : bf16[B, T, 64] @text
%18 = cast(%17) dtype=f32 : f32[B, T, 64] @text
%19 = concat(%7, %18) axis=1 : f32[B, T + 16, 64]
%20 = slice(%19) axis=1 start=1 end=T + 1 step=1 : f32[B, T, 64]
%21 = slice(%19) axis=2 start=0 end=64 step=3 : f32[B, T + 16, 22]
%22 = pad(%20) axis=1 before=0 after=T value=0 : f32[B, 2*T, 64]
%23 = iota axis=1 : i32[B, T]
%24 = random dist=bernoulli(p=0.9) seed=7 : bool[B, T]
%25 = random dist=uniform(lo=-1, hi=1) seed=18446744073709551615 : f32[B, T]
%26 = random dist=normal(mean=0, std=0.5) seed=0 : f32[B, T]
%27 = lt(%23, %15) : bool[B, T]
%28 = and(%24, %27) : bool[B, T]
%29 = not(%28) : bool[B, T]
%30 = select(%29, %25, %26) : f32[B, T] @"odd scope/with slash"
%31 = const value=nan : f32[B, T]
%32 = pow(%30, %31) : f32[B, T]
output "logits" = %22
output "mask \"quoted\"" = %32
"#;

#[test]
fn every_op_round_trips() {
    let graph = read(EVERY_OP).expect("reads");
    assert_eq!(verify(&graph), Ok(()));
    assert_eq!(print(&graph), EVERY_OP);
    let again = read(&print(&graph)).expect("reads again");
    assert_eq!(print(&again), EVERY_OP);
}

#[test]
fn numbering_may_be_sparse_and_is_renumbered() {
    let text = "; a comment\ngraph \"my net\"\n\n%10 = input \"x\" : f32[4]\n%3 = neg(%10) : f32[4]\noutput \"y\" = %3\n";
    let graph = read(text).expect("reads");
    assert_eq!(
        print(&graph),
        "graph \"my net\"\n%0 = input \"x\" : f32[4]\n%1 = neg(%0) : f32[4]\noutput \"y\" = %1\n"
    );
}

/// The error text of reading `text`.
fn error(text: &str) -> String {
    read(text).expect_err("text is rejected").to_string()
}

#[test]
fn wrong_type_annotation_names_line_and_both_types() {
    let text =
        "graph g\ndims B\n%0 = input \"x\" : f32[B, 16]\n%1 = reduce_sum(%0) axis=1 : f32[B, 16]\n";
    assert_eq!(
        error(text),
        "4:30: type annotation f32[B, 16] does not match the inferred type f32[B, 1]"
    );
}

#[test]
fn type_errors_point_at_the_op() {
    let text = "graph g\n%0 = input \"x\" : f32[2, 64]\n%1 = input \"w\" : f32[32, 96]\n%2 = matmul(%0, %1) : f32[2, 96]\n";
    assert_eq!(
        error(text),
        "4:6: matmul: inner dimensions differ: f32[2, 64] @ f32[32, 96] (64 vs 32)"
    );
}

#[test]
fn syntax_errors_have_line_and_column() {
    let cases = [
        ("", "1:1: expected `graph NAME`, found an empty text"),
        ("grph g\n", "1:1: expected `graph`, found `grph`"),
        ("graph g\n%0 = input x : f32[]\n", "2:12: expected a quoted string, found `x`"),
        ("graph g\n%0 = input \"x : f32[]\n", "2:12: unterminated string"),
        ("graph g\n%0 = frob(%1) : f32[]\n", "2:11: %1 is used before it is defined"),
        ("graph g\n%0 = const value=1 : f32[]\n%1 = frob(%0) : f32[]\n", "3:6: unknown op `frob`"),
        ("graph g\n%0 = const value=1 : f65[]\n", "2:22: unknown element type `f65` (f32, f16, bf16, i32, bool, nf4, f64)"),
        ("graph g\n%0 = const value=one : f32[]\n", "2:18: expected a number, found `one`"),
        ("graph g\n%0 = const value=1 : f32[T]\n", "2:26: dimension `T` is not declared on the `dims` line"),
        ("graph g\ndims BT\n%0 = const value=1 : f32[BT + T]\n", "3:31: dimension `T` is not declared on the `dims` line"),
        ("graph g\ndims T\n%0 = const value=1 : f32[T +]\n", "3:29: expected a dimension, found `]`"),
        ("graph g\n%0 = const value=1 : f32[] extra\n", "2:28: expected the end of the line, found `extra`"),
        ("graph g\n%0 = const axis=1 : f32[]\n", "2:12: expected `value=`, found `axis=1`"),
        ("graph g\n%0 = const value=1 : f32[]\n%0 = const value=2 : f32[]\n", "3:1: %0 is defined twice"),
        ("graph g\n%0 = iota axis=99999999999999999999999 : i32[4]\n", "2:16: expected an unsigned integer, found `999999999999…`"),
        ("graph g\n%0 = iota axis=1 : i32[4]\n", "2:6: iota: axis 1 is out of range for i32[4] (rank 1)"),
        ("graph g\n%0 = input \"x\" : f32[]\n%1 = input \"x\" : f32[]\n", "3:6: input \"x\" is declared twice"),
        ("graph g\n%0 = input \"x\" : f32[]\noutput \"y\" = %0\noutput \"y\" = %0\n", "4:14: output \"y\" is declared twice"),
        ("graph g\n%0 = input \"x\" : f32[]\ndims B\n", "3:1: `dims` must come once, right after `graph`"),
        ("graph g\ndims B, B\n", "2:9: dimension `B` is declared twice"),
        ("graph g\n# note\n", "2:1: expected `%N = …`, `output` or `dims`, found `#`"),
        ("graph g\nnode\n", "2:1: expected `%N = …`, `output` or `dims`, found `node`"),
        ("graph g\n%0 = random dist=normal(p=1) seed=1 : f32[]\n", "2:18: expected uniform(lo=…, hi=…), normal(mean=…, std=…) or bernoulli(p=…)"),
        ("graph g\n%0 = const value=99999999999999999999 : i32[]\n", "2:6: const: value 1e20 is not representable in i32"),
        ("graph g\n%0 = const value=1 : f32[99999999999999999999]\n", "2:26: integer `99999999999999999999` does not fit in i64"),
        ("graph g\n%0 = input \"x\" : f32[4]\n%1 = slice(%0) axis=0 start=0 end=4 step=-1 : f32[4]\n", "3:6: slice: step must be at least 1, found -1"),
        ("graph g\n%0 = input \"x\" : f32[4]\n%1 = neg %0 : f32[4]\n", "3:10: expected `(`, found `%0`"),
    ];
    let wrong: Vec<String> = cases
        .iter()
        .filter(|(text, expected)| error(text) != *expected)
        .map(|(text, expected)| {
            format!(
                "{text:?}\n  gave     {}\n  expected {expected}",
                error(text)
            )
        })
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn huge_numbers_do_not_panic() {
    let text = "graph g\n%0 = input \"x\" : f32[9223372036854775807, 9223372036854775807]\n%1 = reshape(%0) shape=[1] : f32[1]\n";
    // The input's own type is refused, before the reshape that multiplies its dims.
    assert_eq!(
        error(text),
        "2:6: input: f32[9223372036854775807, 9223372036854775807] has too many elements: the \
         product of its dimensions overflows a 64-bit integer"
    );
}

/// Characters that mangle the text in interesting ways.
const NOISE: [char; 20] = [
    '%', '[', ']', '(', ')', ',', '=', '"', '\\', '-', '*', '@', ' ', '\n', '0', '9', 'e', 'é',
    'B', ':',
];

proptest::proptest! {
    /// Mangled text is rejected with an error, never a panic; accepted text round-trips.
    #[test]
    fn mangled_text_never_panics(
        edits in proptest::collection::vec(
            (0usize..2000, 0usize..3, proptest::sample::select(NOISE.to_vec())),
            1..6,
        )
    ) {
        let mut chars: Vec<char> = EVERY_OP.chars().collect();
        for (at, kind, ch) in edits {
            let at = at % chars.len();
            match kind {
                0 => {
                    chars.remove(at);
                }
                1 => chars.insert(at, ch),
                _ => chars[at] = ch,
            }
        }
        let text: String = chars.into_iter().collect();
        if let Ok(graph) = read(&text) {
            let printed = print(&graph);
            proptest::prop_assert_eq!(read(&printed).map(|g| print(&g)), Ok(printed));
        }
    }
}
