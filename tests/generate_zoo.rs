//! Greedy generation against transformers: every zoo architecture with a language model (and two
//! pure language models) generates, through the key/value cache, the tokens that Hugging Face's
//! `generate` produced for the same weights and prompts, token for token.
//!
//! `tests/fixtures/generate/make.py` made the references: `<name>.json` holds each row's prompt
//! (real tokens only), the new tokens with their log-probabilities (which also catch a change
//! that moves the logits without changing the argmax), and which slice of each extra prompt input (the pixels of
//! the row's images, ...) along axis 0 belongs to the row. The zoo models read their weights and
//! inputs from `tests/fixtures/zoo/<arch>/`; the two language models live in
//! `tests/fixtures/generate/<name>/`. Every row is a prompt of its own: the engine pads them on
//! the left, masks the padding and counts positions over the real tokens.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmc_runtime::generate::{Control, Generator, Options, Prompt, Runner, Stats};
use vlmc_runtime::sample::Sampling;
use vlmc_runtime::tensor::Data;
use vlmc_runtime::weights::WeightFile;
use vlmc_runtime::Tensor;

const REFS: &str = "tests/fixtures/generate";
/// How far a token's log-probability may be from transformers' (the references keep 6 decimals).
const LOGPROB_TOLERANCE: f64 = 1e-4;

/// Where a model's spec, weights and (for the zoo) inputs are.
struct Case {
    name: &'static str,
    vlm: PathBuf,
    weights: PathBuf,
    io: Option<PathBuf>,
}

fn case(name: &'static str) -> Case {
    let zoo = Path::new("tests/fixtures/zoo").join(name);
    if zoo.is_dir() {
        Case {
            name,
            vlm: zoo.join("fixture.vlm"),
            weights: zoo.join("model.safetensors"),
            io: Some(zoo.join("io.safetensors")),
        }
    } else {
        let dir = Path::new(REFS).join(name);
        Case {
            name,
            vlm: dir.join(format!("{name}.vlm")),
            weights: dir.join("model.safetensors"),
            io: None,
        }
    }
}

/// What transformers generated.
struct Reference {
    prompts: Vec<Vec<i32>>,
    tokens: Vec<Vec<i32>>,
    /// Each token's log-probability (log softmax of the step's logits).
    logprobs: Vec<Vec<f64>>,
    max_new_tokens: usize,
    /// Per extra input: each row's [start, end) along axis 0.
    extra_rows: BTreeMap<String, Vec<(usize, usize)>>,
    /// Every prompt kept its first this many tokens (so that 24 new ones fit a short learned
    /// position table).
    prompts_cut: Option<usize>,
}

fn ids(v: &Value) -> Vec<i32> {
    v.as_array()
        .expect("a list of ids")
        .iter()
        .map(|x| x.as_i64().expect("an id") as i32)
        .collect()
}

fn reference(name: &str) -> Reference {
    let path = Path::new(REFS).join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: Value = serde_json::from_str(&text).expect("json");
    let rows =
        |key: &str| -> Vec<Vec<i32>> { doc[key].as_array().expect(key).iter().map(ids).collect() };
    let mut extra_rows = BTreeMap::new();
    if let Some(m) = doc.get("extra_rows").and_then(|m| m.as_object()) {
        for (input, slices) in m {
            let s = slices
                .as_array()
                .expect("slices")
                .iter()
                .map(|p| {
                    let p = ids(p);
                    (p[0] as usize, p[1] as usize)
                })
                .collect();
            extra_rows.insert(input.clone(), s);
        }
    }
    Reference {
        prompts: rows("prompts"),
        tokens: rows("tokens"),
        logprobs: doc["logprobs"]
            .as_array()
            .expect("logprobs")
            .iter()
            .map(|row| {
                row.as_array()
                    .expect("a row of log-probabilities")
                    .iter()
                    .map(|x| x.as_f64().expect("a log-probability"))
                    .collect()
            })
            .collect(),
        max_new_tokens: doc["max_new_tokens"].as_u64().expect("max_new_tokens") as usize,
        extra_rows,
        prompts_cut: doc
            .get("prompts_cut")
            .and_then(|v| v.as_u64())
            .map(|k| k as usize),
    }
}

/// Rows `a..b` of `t` along axis 0.
fn rows_of(t: &Tensor, a: usize, b: usize) -> Tensor {
    let per = t.numel() / t.shape[0];
    let mut shape = t.shape.clone();
    shape[0] = b - a;
    match &t.data {
        Data::F32(v) => Tensor::f32(shape, v[a * per..b * per].to_vec()),
        Data::I32(v) => Tensor::i32(shape, v[a * per..b * per].to_vec()),
        _ => panic!("prompt inputs are f32 or i32"),
    }
}

/// Columns of `t` (`[1, n, ...]`) where `keep` is nonzero: a prompt input with a token axis
/// (Flamingo's image mask) without the fixture's padding.
fn real_tokens(t: &Tensor, keep: &[i32]) -> Tensor {
    assert_eq!(t.shape[0], 1, "one row");
    assert_eq!(t.shape[1], keep.len(), "one entry per token");
    let inner: usize = t.shape[2..].iter().product();
    let cols: Vec<usize> = (0..keep.len()).filter(|&j| keep[j] != 0).collect();
    let mut shape = t.shape.clone();
    shape[1] = cols.len();
    let pick = |n: usize| {
        cols.iter()
            .flat_map(move |&j| j * inner..(j + 1) * inner)
            .take(n)
    };
    match &t.data {
        Data::F32(v) => Tensor::f32(shape, pick(usize::MAX).map(|i| v[i]).collect()),
        Data::I32(v) => Tensor::i32(shape, pick(usize::MAX).map(|i| v[i]).collect()),
        _ => panic!("prompt inputs are f32 or i32"),
    }
}

/// The prompts: for a zoo fixture, its rows without their padding (by the mask) and each row's
/// part of the other inputs (an input with the ids' token axis, such as Flamingo's image mask,
/// without the padding's entries: the engine pads it as it pads the ids); for a language model,
/// the reference's prompts.
fn prompts(c: &Case, r: &Reference, gen: &Generator) -> Vec<Prompt> {
    let Some(io) = &c.io else {
        return r
            .prompts
            .iter()
            .map(|p| Prompt {
                ids: p.clone(),
                extra: BTreeMap::new(),
            })
            .collect();
    };
    let io = WeightFile::open(io).expect("io.safetensors");
    let get = |n: &str| {
        io.get(n)
            .unwrap_or_else(|e| panic!("{}: {}", c.name, e.message))
    };
    let (all_ids, mask) = (get("ids"), get("mask"));
    let (b, t) = (all_ids.shape[0], all_ids.shape[1]);
    let (iv, mv) = (
        all_ids.as_i32().expect("i32 ids"),
        mask.as_i32().expect("i32 mask"),
    );
    // the ids' token axis (`T`)
    let token_axis = gen
        .prefill
        .graph()
        .inputs()
        .into_iter()
        .find(|(_, n, _)| *n == "ids")
        .map(|(_, _, ty)| ty.shape.0[1].clone());
    let mut out = Vec::new();
    for row in 0..b {
        let mut real: Vec<i32> = (0..t)
            .filter(|&j| mv[row * t + j] != 0)
            .map(|j| iv[row * t + j])
            .collect();
        // where the reference cut the prompts (a short learned position table), the same cut
        if let Some(k) = r.prompts_cut {
            real.truncate(k);
        }
        assert_eq!(
            real, r.prompts[row],
            "{}: row {row}'s prompt differs from the reference's",
            c.name
        );
        let mut extra = BTreeMap::new();
        for (name, ty) in &gen.extra_inputs {
            let x = get(name);
            let (a, z) = r.extra_rows.get(name).map_or((row, row + 1), |s| s[row]);
            let mut part = rows_of(&x, a, z);
            if ty.rank() >= 2 && token_axis.as_ref() == Some(&ty.shape.0[1]) {
                part = real_tokens(&part, &mv[row * t..(row + 1) * t]);
            }
            extra.insert(name.clone(), part);
        }
        out.push(Prompt { ids: real, extra });
    }
    out
}

fn generator(c: &Case, compiled: bool) -> Generator {
    let g = vlmc::elab::generation_graphs(&c.vlm, None, &[])
        .unwrap_or_else(|e| panic!("{}: {e}", c.name));
    let w = WeightFile::open(&c.weights).expect("weights");
    let bound = vlmc_runtime::weights::bind(&g.prefill.graph, &w, &g.prefill.checkpoint)
        .unwrap_or_else(|e| panic!("{}: {}", c.name, e.message));
    assert!(
        bound.unused.is_empty(),
        "{}: unused tensors {:?}",
        c.name,
        bound.unused
    );
    let runner = |m: &vlmc::elab::Elaborated| {
        if compiled {
            let opts = vlmc::backend::cpu::CpuOptions {
                cache_dir: None,
                ..Default::default()
            };
            Runner::cpu(m, opts).unwrap_or_else(|e| panic!("{}: {}", c.name, e.message))
        } else {
            Runner::interp(m)
        }
    };
    Generator::new(runner(&g.prefill), runner(&g.step), bound.params)
        .unwrap_or_else(|e| panic!("{}: {}", c.name, e.message))
}

/// Generates greedily and compares with the reference; prints and returns, per row, how many
/// tokens agree before the first difference.
fn check(name: &'static str, compiled: bool) {
    let c = case(name);
    let r = reference(name);
    let gen = generator(&c, compiled);
    let prompts = prompts(&c, &r, &gen);
    let rows: Vec<u64> = (0..prompts.len() as u64).collect();
    let opts = Options {
        max_new_tokens: r.max_new_tokens,
        eos: vec![],
        pad: 0,
        context: None,
        keep_logits: false,
        min_capacity: 0,
        sampling: Sampling::default(),
    };
    let mut stats = Stats::default();
    let out = gen
        .generate(
            &prompts,
            &rows,
            &opts,
            &mut |_, _, _| Control::Continue,
            &mut stats,
        )
        .unwrap_or_else(|e| panic!("{name}: {}", e.message));
    let how = if compiled { "compiled" } else { "interpreted" };
    assert_eq!(out.len(), r.tokens.len(), "{name}: one result per row");
    let mut figures = Vec::new();
    let mut wrong = Vec::new();
    let mut worst = 0f64;
    for (row, got) in out.iter().enumerate() {
        let want = &r.tokens[row];
        let same = got
            .tokens
            .iter()
            .zip(want)
            .take_while(|(a, b)| a == b)
            .count();
        figures.push(format!("{same}/{}", want.len()));
        if got.tokens != *want {
            wrong.push(format!(
                "row {row}: got {:?}\n        want {:?}",
                got.tokens, want
            ));
            continue;
        }
        // the same tokens, from the same distributions
        for (k, (a, b)) in got.logprobs.iter().zip(&r.logprobs[row]).enumerate() {
            let d = (a - b).abs();
            worst = worst.max(d);
            if d > LOGPROB_TOLERANCE {
                wrong.push(format!(
                    "row {row}, token {k}: log-probability {a:.6} but transformers' is {b:.6}"
                ));
            }
        }
    }
    println!(
        "{name} ({how}): tokens matched per row {}; log-probabilities within {worst:.1e} \
         (prompt {} positions, cache {} slots)",
        figures.join(", "),
        stats.prompt_len,
        stats.capacity
    );
    assert!(
        wrong.is_empty(),
        "{name} ({how}) differs from transformers:\n  {}",
        wrong.join("\n  ")
    );
}

/// One test per model and runner: `compiled::llava`, `interpreted::llava`, ...
macro_rules! cases {
    ($($name:ident),*) => {
        mod compiled {
            $(#[test]
            fn $name() {
                super::check(stringify!($name), true);
            })*
        }
        mod interpreted {
            $(#[test]
            fn $name() {
                super::check(stringify!($name), false);
            })*
        }
    };
}

cases! { llava, blip2, instructblip, fuyu, chameleon, clipcap, flamingo, llama, gpt2 }
