//! Generation: cached decoding equals a full forward over the whole sequence, at every step,
//! for every std decoder kind, interpreted and compiled; batching and padding change nothing.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use vlmc_runtime::generate::{Control, Generator, Options, Prompt, Runner, Stats};
use vlmc_runtime::sample::Sampling;
use vlmc_runtime::Tensor;

struct Case {
    gen: Generator,
    full: vlmc::elab::Elaborated,
    params: BTreeMap<String, Tensor>,
}

fn case(path: &str, compiled: bool) -> Case {
    let g =
        vlmc::elab::generation_graphs(Path::new(path), None, &[]).unwrap_or_else(|e| panic!("{e}"));
    let full = common::load(path);
    let params = vlmc_runtime::init::init_params(&full.graph, 7).expect("init");
    let runner = |m: &vlmc::elab::Elaborated| {
        if compiled {
            Runner::cpu(
                m,
                vlmc::backend::cpu::CpuOptions {
                    cache_dir: None,
                    ..Default::default()
                },
            )
            .expect("compiles")
        } else {
            Runner::interp(m)
        }
    };
    // (the generator keeps the weights in its own layout: the full forward gets its own copy)
    let gen =
        Generator::new(runner(&g.prefill), runner(&g.step), params.clone()).expect("generator");
    Case { gen, full, params }
}

fn opts(n: usize) -> Options {
    Options {
        max_new_tokens: n,
        sampling: Sampling::default(),
        eos: Vec::new(),
        pad: 0,
        context: None,
        keep_logits: true,
        min_capacity: 0,
    }
}

/// Generates greedily for `prompts` in one batch, then checks every step's logits against the
/// full forward (no cache) over that row's unpadded sequence so far.
fn check(c: &Case, prompts: &[Prompt], n: usize, min_capacity: usize) -> f64 {
    let rows: Vec<u64> = (0..prompts.len() as u64).collect();
    let mut stats = Stats::default();
    let mut o = opts(n);
    o.min_capacity = min_capacity;
    let out = c
        .gen
        .generate(
            prompts,
            &rows,
            &o,
            &mut |_, _, _| Control::Continue,
            &mut stats,
        )
        .expect("generates");
    assert!(stats.capacity >= min_capacity);
    let mut worst = 0f64;
    for (p, g) in prompts.iter().zip(&out) {
        assert_eq!(g.tokens.len(), n);
        for k in 0..n {
            let mut ids = p.ids.clone();
            ids.extend_from_slice(&g.tokens[..k]);
            let mut inputs = p.extra.clone();
            inputs.insert("ids".into(), Tensor::i32(vec![1, ids.len()], ids.clone()));
            let o = vlmc_runtime::run(&c.full.graph, &inputs, &c.params).expect("forward");
            let logits = o.values().next().expect("an output");
            let v = logits.shape[2];
            let all = logits.as_f32().expect("f32");
            let last = &all[all.len() - v..];
            let err = common::rel_err(
                &Tensor::f32(vec![v], g.logits[k].clone()),
                &Tensor::f32(vec![v], last.to_vec()),
            );
            worst = worst.max(err);
            assert!(
                err <= 1e-4,
                "step {k}: cached logits differ from the full forward by {err:e}"
            );
        }
    }
    worst
}

fn prompt(ids: &[i32]) -> Prompt {
    Prompt {
        ids: ids.to_vec(),
        extra: BTreeMap::new(),
    }
}

#[test]
fn cached_equals_uncached_llama_and_gpt2() {
    for path in ["tests/generate/llama.vlm", "tests/generate/gpt2.vlm"] {
        for compiled in [false, true] {
            let c = case(path, compiled);
            let e1 = check(&c, &[prompt(&[3, 9, 4, 22, 5])], 6, 0);
            // a batch of different lengths (left padding), one longer than a bucket
            let long: Vec<i32> = (0..19).map(|i| (i * 7 + 2) % 50 + 1).collect();
            let e2 = check(
                &c,
                &[prompt(&[11, 2]), prompt(&long), prompt(&[5, 6, 7, 8])],
                5,
                0,
            );
            eprintln!("{path} compiled={compiled}: max rel err {e1:e} / batch {e2:e}");
        }
    }
}

#[test]
fn cached_equals_uncached_llava_tiny_with_images() {
    for compiled in [false, true] {
        let c = case("models/llava_tiny.vlm", compiled);
        let pixels = |seed: u32| {
            let v: Vec<f32> = (0..3 * 32 * 32)
                .map(|i| {
                    (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32
                        / 500.0
                        - 1.0
                })
                .collect();
            Tensor::f32(vec![1, 3, 32, 32], v)
        };
        let with_image = |ids: &[i32], seed: u32| {
            let mut p = prompt(ids);
            p.extra.insert("pixels".into(), pixels(seed));
            p
        };
        let e = check(
            &c,
            &[
                with_image(&[7, 8, 9], 1),
                with_image(&[40, 41, 42, 43, 44, 45, 46], 2),
            ],
            4,
            0,
        );
        eprintln!("llava_tiny compiled={compiled}: max rel err {e:e}");
    }
}

/// Random prompt lengths, batch sizes and cache capacities (through --max-new-tokens), with a
/// fixed seed: every step of every row equals the full forward.
#[test]
fn cached_equals_uncached_random_batches() {
    let c = case("tests/generate/llama.vlm", true);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let mut worst = 0f64;
    for _ in 0..5 {
        let b = 1 + next(4) as usize;
        let prompts: Vec<Prompt> = (0..b)
            .map(|_| {
                let len = 1 + next(40) as usize;
                prompt(&(0..len).map(|_| 1 + next(60) as i32).collect::<Vec<_>>())
            })
            .collect();
        // 1..4 new tokens checked, with a cache of 64, 128 or 256 slots
        let n = 1 + next(4) as usize;
        let cap = [0, 128, 256][next(3) as usize];
        worst = worst.max(check(&c, &prompts, n, cap));
    }
    eprintln!("random batches: max rel err {worst:e}");
}

/// `keep`/`kept` outside generation, a value kept twice, and a step reading what the prefill
/// does not keep are clear errors.
#[test]
fn kept_state_errors_are_clear() {
    let dir = std::env::temp_dir().join(format!("vlmc-gen-keep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let write = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).expect("write");
        p
    };
    let outside = write(
        "outside.vlm",
        "model M {\n  fn forward(x: f32[B, 4]) -> f32[B, 4] {\n    return keep(x, \"a\")\n  }\n}\n",
    );
    let c = vlmc::elab::check_file(&outside);
    assert!(
        c.render()
            .contains("`keep` is only defined while generating"),
        "{}",
        c.render()
    );
    let base = "use std.lm.Llama\nmodel M {\n  lm = Llama(vocab: 11, dim: 8, depth: 1, heads: 2, ffn: 8)\n";
    let twice = write(
        "twice.vlm",
        &format!(
            "{base}  fn forward(ids: i32[B, T]) -> f32[B, T, 11] {{\n    let a = keep(lm.embed(ids), \"e\")\n    let b = keep(lm.embed(ids), \"e\")\n    return lm(ids)\n  }}\n}}\n"
        ),
    );
    let e = vlmc::elab::generation_graphs(&twice, None, &[])
        .err()
        .expect("an error");
    assert!(e.contains("is kept twice"), "{e}");
    let missing = write(
        "missing.vlm",
        &format!(
            "{base}  fn forward(ids: i32[B, T]) -> f32[B, T, 11] {{\n    return lm(ids)\n  }}\n  fn step(ids: i32[B, T]) -> f32[B, T, 11] {{\n    let m = kept(\"memory\", [B, 4])\n    return lm(ids)\n  }}\n}}\n"
        ),
    );
    let g = vlmc::elab::generation_graphs(&missing, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    let params = vlmc_runtime::init::init_params(&g.prefill.graph, 1).expect("init");
    let e = Generator::new(Runner::interp(&g.prefill), Runner::interp(&g.step), params)
        .err()
        .expect("an error")
        .message;
    assert!(e.contains("keeps no `keep:memory`"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
