//! The CUDA backend on a real GPU (ignored by `cargo test`; `tests/gpu/check.sh` runs them):
//! every zoo fixture and MiniLM against the reference interpreter, and timings of the
//! benchmark models of `tests/gpu/models.vlm` and MiniLM, printed as `BENCH {json}` lines.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use vlmc::elab::Elaborated;
use vlmc_runtime::cuda::{self, CudaOptions};
use vlmc_runtime::weights::WeightFile;
use vlmc_runtime::Tensor;

const TOLERANCE: f64 = 1e-4;

/// max |got - want| / max(|want|).
fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
    let (g, w) = (got.to_f64(), want.to_f64());
    let scale = w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    let worst = g
        .iter()
        .zip(&w)
        .map(|(a, b)| {
            if a.is_nan() != b.is_nan() {
                f64::INFINITY
            } else {
                (a - b).abs()
            }
        })
        .fold(0f64, f64::max);
    worst / scale
}

fn model(path: &Path, name: Option<&str>) -> Elaborated {
    let checked = vlmc::elab::check_file(path);
    let text = checked.render();
    let models = checked.result.unwrap_or_else(|_| panic!("{text}"));
    match name {
        Some(n) => models.into_iter().find(|m| m.model == n).expect("model"),
        None => models.into_iter().last().expect("a model"),
    }
}

/// Deterministic inputs for a graph at `dims`: ids in 1..100 (the first `image.1` of them the
/// image token `image.0`), masks of ones, images in [-1, 1].
fn inputs(m: &Elaborated, dims: &[(&str, i64)], image: (i32, usize)) -> BTreeMap<String, Tensor> {
    let dims: std::collections::HashMap<String, i64> =
        dims.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let mut out = BTreeMap::new();
    for (k, (_, name, ty)) in m.graph.inputs().into_iter().enumerate() {
        let shape: Vec<usize> = ty
            .shape
            .0
            .iter()
            .map(|d| {
                d.eval(&|s| dims.get(s).copied())
                    .expect("a size for every dim") as usize
            })
            .collect();
        let n: usize = shape.iter().product();
        let t = match ty.dtype {
            vlmc::ir::DType::I32 if name.contains("mask") => Tensor::i32(shape, vec![1; n]),
            vlmc::ir::DType::I32 if name.contains("type") => Tensor::i32(shape, vec![0; n]),
            vlmc::ir::DType::I32 => Tensor::i32(
                shape,
                (0..n)
                    .map(|i| {
                        if i < image.1 {
                            image.0
                        } else {
                            ((i * 7 + k) % 99) as i32 + 1
                        }
                    })
                    .collect(),
            ),
            vlmc::ir::DType::Bool => Tensor::bool(shape, (0..n).map(|i| i % 3 != 0).collect()),
            _ => Tensor::f32(
                shape,
                (0..n)
                    .map(|i| (((i * 7919 + k * 31) % 1000) as f32 / 500.0) - 1.0)
                    .collect(),
            ),
        };
        out.insert(name.to_string(), t);
    }
    out
}

fn require_gpu() {
    if let Err(e) = cuda::check_driver() {
        panic!("{}", e.message);
    }
}

/// Runs `m` on the GPU and with the interpreter; returns the worst relative error.
fn compare(
    m: &Elaborated,
    ins: &BTreeMap<String, Tensor>,
    params: &BTreeMap<String, Tensor>,
) -> Result<f64, String> {
    let want = vlmc_runtime::run(&m.graph, ins, params).map_err(|e| e.message)?;
    let got = cuda::run_model(m, ins, params, &CudaOptions::default()).map_err(|e| e.message)?;
    let mut worst = 0f64;
    for (name, w) in &want {
        let g = got
            .get(name)
            .ok_or(format!("no output `{name}` on the GPU"))?;
        if g.shape != w.shape {
            return Err(format!(
                "`{name}` is {:?} on the GPU, {:?} in the interpreter",
                g.shape, w.shape
            ));
        }
        worst = worst.max(relative_error(g, w));
    }
    Ok(worst)
}

#[test]
#[ignore = "needs an NVIDIA GPU: tests/gpu/check.sh"]
fn gpu_matches_the_interpreter() {
    require_gpu();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("tests/fixtures/zoo")
        .expect("zoo")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("fixture.vlm").is_file())
        .collect();
    dirs.sort();
    let mut failures = Vec::new();
    for dir in &dirs {
        let m = model(&dir.join("fixture.vlm"), None);
        let w = WeightFile::open(&dir.join("model.safetensors")).expect("weights");
        let bound = vlmc_runtime::weights::bind(&m.graph, &w, &m.checkpoint).expect("binds");
        let io = WeightFile::open(&dir.join("io.safetensors")).expect("io");
        let ins: BTreeMap<String, Tensor> = io
            .names()
            .into_iter()
            .filter(|n| !n.starts_with("expect."))
            .map(|n| {
                let t = io.get(&n).expect("tensor");
                (n, t)
            })
            .collect();
        let r = compare(&m, &ins, &bound.params);
        println!("GPU {:<40} {r:?}", dir.display());
        match r {
            Ok(e) if e <= TOLERANCE => {}
            other => failures.push(format!("{}: {other:?}", dir.display())),
        }
    }
    // MiniLM: the published weights when tests/setup.sh fetched them, else seeded ones.
    let m = model(Path::new("models/minilm.vlm"), None);
    let real = Path::new(".cache/minilm/model.safetensors");
    let params = if real.is_file() {
        let w = WeightFile::open(real).expect("weights");
        vlmc_runtime::weights::bind(&m.graph, &w, &m.checkpoint)
            .expect("binds")
            .params
    } else {
        vlmc_runtime::init::init_params(&m.graph, 7).expect("init")
    };
    let ins = inputs(&m, &[("B", 4), ("T", 32)], (0, 0));
    let r = compare(&m, &ins, &params);
    println!("GPU {:<40} {r:?}", "models/minilm.vlm (B=4, T=32)");
    match r {
        Ok(e) if e <= TOLERANCE => {}
        other => failures.push(format!("minilm: {other:?}")),
    }
    println!(
        "GPU checked {} models, {} failed",
        dirs.len() + 1,
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every per-op case of `tests/interp` (every primitive and dtype) on the GPU, on generated
/// inputs, against the interpreter.
#[test]
#[ignore = "needs an NVIDIA GPU: tests/gpu/check.sh"]
fn gpu_matches_the_interpreter_on_every_op() {
    require_gpu();
    let paths = common::vlm_files("tests/interp");
    let (mut failures, mut checked, mut skipped) = (Vec::new(), 0, Vec::new());
    for p in &paths {
        let checked_file = vlmc::elab::check_file(p);
        let Ok(models) = checked_file.result else {
            continue;
        };
        for m in &models {
            let ins = inputs(m, &[("B", 2), ("T", 5), ("N", 3), ("S", 4)], (0, 0));
            let params = vlmc_runtime::init::init_params(&m.graph, 5).expect("init");
            // Cases the interpreter rejects (division by zero) or the compiler cannot lower
            // (random ops) are left out.
            if vlmc_runtime::run(&m.graph, &ins, &params).is_err() {
                skipped.push(p.display().to_string());
                continue;
            }
            match compare(m, &ins, &params) {
                Ok(e) if e <= TOLERANCE => checked += 1,
                Err(e) if e.contains("random ops") => skipped.push(p.display().to_string()),
                other => failures.push(format!("{}: {other:?}", p.display())),
            }
        }
    }
    println!(
        "GPU checked {checked} op cases, {} failed, left out {skipped:?}",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 50, "only {checked} op cases ran");
}

/// Median of the timings in milliseconds.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench(label: &str, m: &Elaborated, dims: &[(&str, i64)], image: (i32, usize), seed: u64) {
    let t0 = Instant::now();
    let params = vlmc_runtime::init::init_params(&m.graph, seed).expect("init");
    let ins = inputs(m, dims, image);
    let init_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut gpu = cuda::load_model(m, &ins, &params, &CudaOptions::default())
        .unwrap_or_else(|e| panic!("{label}: {}", e.message));
    let load_s = t1.elapsed().as_secs_f64();
    gpu.set_inputs(&ins).expect("inputs");
    for _ in 0..3 {
        gpu.launch().expect("runs");
    }
    gpu.synchronize().expect("sync");
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        gpu.launch().expect("runs");
        gpu.synchronize().expect("sync");
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let shape: Vec<String> = dims.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "BENCH {{\"model\": \"{label}\", \"dims\": \"{}\", \"median_ms\": {:.4}, \"min_ms\": {:.4}, \"launches\": {}, \"compile_load_s\": {load_s:.2}, \"init_s\": {init_s:.2}, \"cached\": {}, \"device\": \"{}\"}}",
        shape.join(","),
        median(times.clone()),
        times.iter().copied().fold(f64::INFINITY, f64::min),
        gpu.launches(),
        gpu.cached,
        gpu.device
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: tests/gpu/check.sh"]
fn gpu_benchmarks() {
    require_gpu();
    let only = std::env::var("VLMC_BENCH_ONLY").unwrap_or_default();
    let want = |name: &str| only.is_empty() || only.split(',').any(|o| o == name);
    if want("minilm") {
        let m = model(Path::new("models/minilm.vlm"), None);
        bench("minilm", &m, &[("B", 64), ("T", 128)], (0, 0), 1);
    }
    if want("vit_b16") {
        let m = model(Path::new("tests/gpu/models.vlm"), Some("VitB16"));
        bench("vit_b16", &m, &[("B", 32)], (0, 0), 2);
    }
    if want("llava_wide") {
        let m = model(Path::new("tests/gpu/models.vlm"), Some("LlavaWide"));
        // 576 image tokens (24×24 patches of 14 pixels at 336) then 32 text tokens.
        bench(
            "llava_wide",
            &m,
            &[("N", 1), ("B", 1), ("T", 608)],
            (32000, 576),
            3,
        );
    }
}

/// Generation on the GPU (prefill and cached steps, `vlmc_runtime::generate::Runner::cuda`)
/// gives the CPU's greedy tokens, and logits within the tolerance, on a Llama, a GPT-2 and
/// llava_tiny with images, in padded batches.
#[test]
#[ignore = "needs an NVIDIA GPU: tests/gpu/check.sh"]
fn gpu_matches_cpu_generation() {
    use vlmc_runtime::generate::{Control, Generator, Options, Prompt, Runner, Stats};
    for path in [
        "tests/generate/llama.vlm",
        "tests/generate/gpt2.vlm",
        "models/llava_tiny.vlm",
    ] {
        let g = vlmc::elab::generation_graphs(Path::new(path), None, &[])
            .unwrap_or_else(|e| panic!("{e}"));
        let params = vlmc_runtime::init::init_params(&g.prefill.graph, 7).expect("init");
        let cpu = Generator::new(
            Runner::cpu(&g.prefill, Default::default()).expect("cpu"),
            Runner::cpu(&g.step, Default::default()).expect("cpu"),
            params.clone(),
        )
        .expect("cpu generator");
        let gpu = Generator::new(
            Runner::cuda(&g.prefill, CudaOptions::default()).expect("gpu"),
            Runner::cuda(&g.step, CudaOptions::default()).expect("gpu"),
            params,
        )
        .expect("gpu generator");
        let needs_pixels = gpu.extra_inputs.iter().any(|(n, _)| n == "pixels");
        let prompts: Vec<Prompt> = [vec![3, 9, 4, 22, 5], vec![11, 2], (1..20).collect()]
            .into_iter()
            .enumerate()
            .map(|(r, ids)| {
                let mut p = Prompt {
                    ids,
                    extra: BTreeMap::new(),
                };
                if needs_pixels {
                    let v: Vec<f32> = (0..3 * 32 * 32)
                        .map(|i| ((i * 37 + r * 101) % 200) as f32 / 100.0 - 1.0)
                        .collect();
                    p.extra
                        .insert("pixels".into(), Tensor::f32(vec![1, 3, 32, 32], v));
                }
                p
            })
            .collect();
        let opts = Options {
            max_new_tokens: 16,
            sampling: Default::default(),
            eos: Vec::new(),
            pad: 0,
            context: None,
            keep_logits: true,
            min_capacity: 0,
        };
        let run = |gen: &Generator| {
            let mut stats = Stats::default();
            let t = Instant::now();
            let out = gen
                .generate(
                    &prompts,
                    &[0, 1, 2],
                    &opts,
                    &mut |_, _, _| Control::Continue,
                    &mut stats,
                )
                .expect("generates");
            (out, t.elapsed().as_secs_f64())
        };
        let (want, cpu_s) = run(&cpu);
        let (got, gpu_s) = run(&gpu);
        let mut worst = 0f64;
        for (w, g) in want.iter().zip(&got) {
            assert_eq!(
                g.tokens, w.tokens,
                "{path}: GPU tokens differ from the CPU's"
            );
            for (a, b) in g.logits.iter().zip(&w.logits) {
                let e = relative_error(
                    &Tensor::f32(vec![a.len()], a.clone()),
                    &Tensor::f32(vec![b.len()], b.clone()),
                );
                worst = worst.max(e);
            }
        }
        println!(
            "GPU generate {path}: 3 rows x 16 tokens equal the CPU's, logits rel. err {worst:.1e} \
             (GPU {gpu_s:.2} s, CPU {cpu_s:.2} s, first call, compiling included)"
        );
        assert!(worst <= TOLERANCE, "{path}: {worst}");
    }
}
