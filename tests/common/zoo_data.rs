//! The zoo at fixture size for data tests: the sizes of a zoo fixture and word-level
//! tokenizers with a model's special tokens at its ids.

use std::path::Path;

/// The words of the synthetic colour task (tests/fixtures/train/colours), in id order.
pub const WORDS: &[&str] = &[
    "what",
    "colour",
    "is",
    "the",
    "square",
    "?",
    "red",
    "green",
    "blue",
    "yellow",
    "cyan",
    "magenta",
    "user",
    "assistant",
];

/// The `NAME=VALUE` sizes of a fixture.vlm's `model X = Model(a: 1, b: 2, ...)`.
pub fn fixture_sets(dir: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(dir.join("fixture.vlm")).expect("fixture.vlm");
    let body: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join(" ");
    let open = body.find('(').expect("a model call");
    let close = body.rfind(')').expect("a model call");
    body[open + 1..close]
        .split(',')
        .filter_map(|a| {
            let (k, v) = a.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// A word-level tokenizer.json: `specials` at their ids, the words from id `start`.
pub fn word_tokenizer(path: &Path, specials: &[(&str, u32)], start: u32) {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (t, id) in specials {
        vocab.insert(t.to_string(), (*id).into());
        added.push(
            serde_json::json!({"id": id, "content": t, "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
        );
    }
    for (i, w) in WORDS.iter().enumerate() {
        vocab.insert(w.to_string(), (start + i as u32).into());
    }
    let j = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(path, j.to_string()).expect("tokenizer");
}

/// `models/<file>.vlm` at the sizes of its zoo fixture (plus `extra` settings).
pub fn zoo_model(file: &str, extra: &[(&str, &str)]) -> vlmc::elab::Elaborated {
    let fixture = Path::new("tests/fixtures/zoo").join(file);
    let mut sets = if fixture.is_dir() {
        fixture_sets(&fixture)
    } else {
        Vec::new()
    };
    sets.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let spec = Path::new("models").join(format!("{file}.vlm"));
    let checked = vlmc::elab::check_file_with(&spec, &sets);
    let text = checked.render();
    let mut models = checked
        .result
        .unwrap_or_else(|_| panic!("{}: {text}", spec.display()));
    models.pop().expect("a model")
}
