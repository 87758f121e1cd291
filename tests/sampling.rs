//! Sampling: the logits processors equal transformers' (tests/fixtures/sampling/make.py); the
//! empirical frequencies of 10^4 seeded samples match softmax(logits / T) after top-k, top-p and
//! min-p (a chi-square test at significance 0.001 with a fixed seed, so deterministic); top-k 1
//! is greedy; a seed reproduces a generation bit for bit, whatever the batch.

use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::Path;
use vlmc_runtime::generate::{Control, Generator, Options, Prompt, Runner, Stats};
use vlmc_runtime::sample::{self, Sampling};

fn floats(v: &Json) -> Vec<f64> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NEG_INFINITY))
        .collect()
}

fn setting(c: &Json) -> Sampling {
    Sampling {
        temperature: c["temperature"].as_f64().expect("t"),
        top_k: c["top_k"].as_u64().expect("k") as usize,
        top_p: c["top_p"].as_f64().expect("p"),
        min_p: c["min_p"].as_f64().expect("min p"),
        repetition_penalty: c["repetition_penalty"].as_f64().expect("r"),
        seed: 0,
    }
}

#[test]
fn processors_equal_transformers() {
    let refs: Json =
        serde_json::from_slice(&std::fs::read("tests/fixtures/sampling/processors.json").unwrap())
            .unwrap();
    for (i, c) in refs["cases"].as_array().unwrap().iter().enumerate() {
        let s = setting(c);
        let mut x = floats(&c["logits"]);
        let seen: Vec<i32> = c["seen"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap() as i32)
            .collect();
        sample::repetition_penalty(&mut x, &seen, s.repetition_penalty);
        for (a, b) in x.iter().zip(floats(&c["penalised"])) {
            assert!(
                (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                "case {i}: penalty {a} vs {b}"
            );
        }
        let w = sample::warp(&x, &s);
        for (j, (a, b)) in w.iter().zip(floats(&c["warped"])).enumerate() {
            assert_eq!(
                a.is_finite(),
                b.is_finite(),
                "case {i}: token {j} kept differently"
            );
            if b.is_finite() {
                assert!(
                    (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                    "case {i}: {a} vs {b}"
                );
            }
        }
    }
}

/// The upper 0.001 point of chi-square with `df` degrees of freedom (Wilson–Hilferty).
fn chi2_critical(df: f64) -> f64 {
    let z = 3.090_232;
    df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3)
}

fn tiny() -> Generator {
    let path = Path::new("tests/generate/llama.vlm");
    let g = vlmc::elab::generation_graphs(path, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    let params = vlmc_runtime::init::init_params(&g.prefill.graph, 3).expect("init");
    let opts = vlmc::backend::cpu::CpuOptions {
        cache_dir: None,
        ..Default::default()
    };
    Generator::new(
        Runner::cpu(&g.prefill, opts.clone()).unwrap(),
        Runner::cpu(&g.step, opts).unwrap(),
        params,
    )
    .unwrap()
}

fn options(n: usize, s: Sampling) -> Options {
    Options {
        max_new_tokens: n,
        sampling: s,
        eos: Vec::new(),
        pad: 0,
        context: None,
        keep_logits: true,
        min_capacity: 0,
    }
}

fn run(g: &Generator, prompts: &[Prompt], rows: &[u64], o: &Options) -> Vec<Vec<i32>> {
    let mut stats = Stats::default();
    g.generate(
        prompts,
        rows,
        o,
        &mut |_, _, _| Control::Continue,
        &mut stats,
    )
    .expect("generates")
    .into_iter()
    .map(|r| r.tokens)
    .collect()
}

fn prompt(ids: &[i32]) -> Prompt {
    Prompt {
        ids: ids.to_vec(),
        extra: BTreeMap::new(),
    }
}

#[test]
fn sample_frequencies_match_the_filtered_softmax() {
    let g = tiny();
    // the model's next-token logits for a prompt
    let mut stats = Stats::default();
    let out = g
        .generate(
            &[prompt(&[4, 17, 9])],
            &[0],
            &options(1, Sampling::default()),
            &mut |_, _, _| Control::Continue,
            &mut stats,
        )
        .unwrap();
    // sharpen the random model's flat distribution so the filters keep different sets
    let logits: Vec<f32> = out[0].logits[0].iter().map(|v| v * 8.0).collect();
    let n = 10_000u64;
    for (t, k, p, m) in [
        (1.0, 0, 1.0, 0.0),
        (0.7, 8, 1.0, 0.0),
        (1.3, 0, 0.9, 0.0),
        (1.0, 0, 1.0, 0.05),
        (0.9, 20, 0.95, 0.02),
    ] {
        let s = Sampling {
            temperature: t,
            top_k: k,
            top_p: p,
            min_p: m,
            repetition_penalty: 1.0,
            seed: 11,
        };
        let x: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
        let probs = sample::softmax(&sample::warp(&x, &s));
        let mut counts = vec![0u64; probs.len()];
        for step in 0..n {
            counts[sample::choose(&logits, &[], &s, 5, step)] += 1;
        }
        // never a filtered-out token
        for (i, c) in counts.iter().enumerate() {
            assert!(
                probs[i] > 0.0 || *c == 0,
                "token {i} was drawn but filtered out ({t}, {k}, {p}, {m})"
            );
        }
        // chi-square over the kept tokens, small expected counts pooled
        let (mut stat, mut cells, mut pool_e, mut pool_o) = (0.0, 0usize, 0.0, 0.0);
        for (i, &pi) in probs.iter().enumerate() {
            if pi <= 0.0 {
                continue;
            }
            let e = pi * n as f64;
            if e < 5.0 {
                pool_e += e;
                pool_o += counts[i] as f64;
                continue;
            }
            stat += (counts[i] as f64 - e).powi(2) / e;
            cells += 1;
        }
        if pool_e > 0.0 {
            stat += (pool_o - pool_e).powi(2) / pool_e;
            cells += 1;
        }
        let kept = probs.iter().filter(|&&q| q > 0.0).count();
        let df = (cells.max(2) - 1) as f64;
        eprintln!("T={t} top_k={k} top_p={p} min_p={m}: {kept} tokens kept, chi2 {stat:.1} (df {df}, critical {:.1})", chi2_critical(df));
        assert!(stat < chi2_critical(df), "chi-square {stat} over {df} df");
    }
}

#[test]
fn top_k_one_is_greedy_and_seeds_reproduce() {
    let g = tiny();
    let ps = [
        prompt(&[3, 9, 4]),
        prompt(&[11, 2, 30, 7, 1, 5]),
        prompt(&[8]),
    ];
    let greedy = run(&g, &ps, &[0, 1, 2], &options(12, Sampling::default()));
    let k1 = Sampling {
        temperature: 0.8,
        top_k: 1,
        seed: 4,
        ..Sampling::default()
    };
    assert_eq!(run(&g, &ps, &[0, 1, 2], &options(12, k1)), greedy);
    let hot = Sampling {
        temperature: 1.5,
        top_p: 0.95,
        seed: 9,
        ..Sampling::default()
    };
    let a = run(&g, &ps, &[0, 1, 2], &options(12, hot.clone()));
    let b = run(&g, &ps, &[0, 1, 2], &options(12, hot.clone()));
    assert_eq!(a, b, "the same seed gives the same samples");
    assert_ne!(a, greedy, "sampling at T=1.5 differs from greedy");
    // a row's samples depend on its place in the input, not on its batch
    let alone = run(&g, &ps[1..2], &[1], &options(12, hot.clone()));
    assert_eq!(alone[0], a[1]);
    let other = Sampling { seed: 10, ..hot };
    assert_ne!(
        run(&g, &ps, &[0, 1, 2], &options(12, other)),
        a,
        "another seed, other samples"
    );
}
