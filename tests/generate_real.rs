//! Greedy generation with the real SmolLM2-135M-Instruct (fetched by tests/setup.sh) is token
//! for token transformers' `generate` (tests/fixtures/smollm2/greedy.json, made by
//! make_reference.py): two plain prompts and a chat, one at a time and as one padded batch. The
//! prompts' token ids (tokenizer and chat template) are checked against transformers' too.

use serde_json::Value as Json;
use std::path::Path;
use vlmc_runtime::chat::{self, TokenizerConfig};
use vlmc_runtime::generate::{Control, Generator, Options, Prompt, Runner, Stats};
use vlmc_runtime::sample::Sampling;

const DIR: &str = ".cache/smollm2";

fn ids(v: &Json) -> Vec<i32> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_i64().expect("an id") as i32)
        .collect()
}

#[test]
fn smollm2_greedy_equals_transformers() {
    let dir = Path::new(DIR);
    assert!(
        dir.join("model.safetensors").exists(),
        "run tests/setup.sh first (it fetches SmolLM2 into {DIR})"
    );
    let refs: Json = serde_json::from_slice(
        &std::fs::read("tests/fixtures/smollm2/greedy.json").expect("reference"),
    )
    .expect("json");
    // prompts: our tokenizer and chat template give transformers' ids
    let tok = vlmc_runtime::inputs::load_tokenizer(&dir.join("tokenizer.json")).expect("tokenizer");
    let cfg = TokenizerConfig::read(dir).expect("tokenizer config");
    let cases = refs["cases"].as_array().expect("cases");
    for (i, text) in refs["texts"].as_array().expect("texts").iter().enumerate() {
        let enc = tok
            .encode(text.as_str().expect("text"), true)
            .expect("encodes");
        let got: Vec<i32> = enc.get_ids().iter().map(|&x| x as i32).collect();
        assert_eq!(got, ids(&cases[i]["prompt"]), "prompt {i}");
    }
    let rendered = chat::render(
        cfg.chat_template.as_deref().expect("a chat template"),
        &refs["chat"],
        true,
        &cfg,
    )
    .expect("renders");
    let enc = tok.encode(rendered.as_str(), false).expect("encodes");
    let got: Vec<i32> = enc.get_ids().iter().map(|&x| x as i32).collect();
    assert_eq!(got, ids(&cases[2]["prompt"]), "chat prompt");
    assert_eq!(chat::eos_ids(dir, &cfg, &tok).expect("eos"), vec![2]);

    let g = vlmc::elab::generation_graphs(Path::new("models/smollm2.vlm"), None, &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let wf =
        vlmc_runtime::weights::WeightFile::open(&dir.join("model.safetensors")).expect("weights");
    let bound =
        vlmc_runtime::weights::bind(&g.prefill.graph, &wf, &g.prefill.checkpoint).expect("binds");
    let opts = vlmc::backend::cpu::CpuOptions {
        cache_dir: None,
        ..Default::default()
    };
    let gen = Generator::new(
        Runner::cpu(&g.prefill, opts.clone()).expect("compiles"),
        Runner::cpu(&g.step, opts).expect("compiles"),
        bound.params,
    )
    .expect("generator");
    let n = refs["new_tokens"].as_u64().expect("n") as usize;
    let options = Options {
        max_new_tokens: n,
        sampling: Sampling::default(),
        eos: Vec::new(),
        pad: 2,
        context: Some(8192),
        keep_logits: false,
        min_capacity: 0,
    };
    let prompts: Vec<Prompt> = cases
        .iter()
        .map(|c| Prompt {
            ids: ids(&c["prompt"]),
            extra: Default::default(),
        })
        .collect();
    let mut stats = Stats::default();
    let batch = gen
        .generate(
            &prompts,
            &[0, 1, 2],
            &options,
            &mut |_, _, _| Control::Continue,
            &mut stats,
        )
        .expect("generates");
    for (i, (c, got)) in cases.iter().zip(&batch).enumerate() {
        let want = ids(&c["greedy"]);
        let same = got
            .tokens
            .iter()
            .zip(&want)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "prompt {i}: {same}/{} tokens equal transformers' in a batch of 3",
            want.len()
        );
        assert_eq!(got.tokens, want, "prompt {i} (batched)");
    }
    // alone: the same tokens
    let one = gen
        .generate(
            &prompts[..1],
            &[0],
            &options,
            &mut |_, _, _| Control::Continue,
            &mut stats,
        )
        .expect("generates");
    assert_eq!(one[0].tokens, ids(&cases[0]["greedy"]), "prompt 0 alone");
}
