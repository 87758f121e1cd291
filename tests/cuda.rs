//! The CUDA backend without a GPU: snapshots of the generated CUDA C and launch plans for small
//! specs; every generated function of every zoo model (at fixture size), MiniLM and llava_tiny
//! compiled by NVRTC for sm_80 and sm_90; every load and store of every plan proved inside its
//! buffer, every launch within the hardware limits.
//!
//! NVRTC comes from `tests/setup.sh` (the PyPI wheel nvidia-cuda-nvrtc-cu12, in .cache/cuda)
//! and is loaded by path. Running the kernels needs a GPU: `tests/gpu/check.sh`.

mod common;

use common::{small_dims, vlm_files};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use vlmc::backend::cuda::{self, bounds, launch, nvrtc, Options, Program};
use vlmc::kernel::Plan;
use vlmc::passes::{compile, CompileOptions};
use vlmc_runtime::Tensor;

/// A plan of the model `path` (its last model) at `dims`.
fn plan_at(path: &Path, dims: &HashMap<String, i64>) -> Plan {
    let c = vlmc::elab::check_file(path);
    let models = c
        .result
        .unwrap_or_else(|_| panic!("{} does not check", path.display()));
    plan_of(models.last().expect("a model"), path, dims)
}

/// The generation graphs (prefill at `T` = 16 on an empty cache, step at `T` = 1 with a cache of
/// 64 slots, batch 2, Flamingo's 2 images per row: `N`) of the models with a language model, as
/// plans.
fn generation_plans() -> Vec<(String, Plan)> {
    let mut out = Vec::new();
    for path in [
        "models/llava_tiny.vlm",
        "tests/generate/llama.vlm",
        "tests/generate/gpt2.vlm",
        "tests/fixtures/zoo/flamingo/fixture.vlm",
    ] {
        let g = vlmc::elab::generation_graphs(Path::new(path), None, &[])
            .unwrap_or_else(|e| panic!("{e}"));
        // the prefill runs on an empty cache (capacity 0), the step on a cache of 64 slots
        for (what, m, t, cap) in [("prefill", &g.prefill, 16, 0), ("step", &g.step, 1, 64)] {
            let dims: HashMap<String, i64> = [("B", 2), ("T", t), ("CACHE", cap), ("N", 2)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            out.push((
                format!("{path} ({what})"),
                plan_of(m, Path::new(path), &dims),
            ));
        }
    }
    out
}

/// A plan of an elaborated model at `dims`.
fn plan_of(m: &vlmc::elab::Elaborated, path: &Path, dims: &HashMap<String, i64>) -> Plan {
    let compiled = compile(m, &CompileOptions::default()).expect("compiles");
    let mem = vlmc::passes::memory::plan(&compiled.graph, &compiled.fusion, dims);
    vlmc::kernel::lower(&compiled.graph, &compiled.fusion, &mem, dims)
        .unwrap_or_else(|e| panic!("{}: lowering: {e}", path.display()))
}

/// The dims of a zoo fixture, from the inputs in its io.safetensors.
fn fixture_dims(fixture: &Path) -> HashMap<String, i64> {
    let io = fixture.with_file_name("io.safetensors");
    let f = vlmc_runtime::weights::WeightFile::open(&io).expect("io.safetensors");
    let inputs: BTreeMap<String, Tensor> = f
        .names()
        .into_iter()
        .filter(|n| !n.starts_with("expect."))
        .map(|n| {
            let t = f.get(&n).expect("tensor");
            (n, t)
        })
        .collect();
    let c = vlmc::elab::check_file(fixture);
    let models = c.result.expect("fixture checks");
    let m = models.last().expect("a model");
    vlmc_runtime::interp::bind_dims(&m.graph, &inputs).expect("inputs fit")
}

/// Every model NVRTC must accept: the zoo at fixture size, MiniLM and llava_tiny.
fn nvrtc_models() -> Vec<(String, Plan)> {
    let mut zoo: Vec<PathBuf> = std::fs::read_dir("tests/fixtures/zoo")
        .expect("zoo")
        .map(|e| e.expect("entry").path().join("fixture.vlm"))
        .filter(|p| p.is_file())
        .collect();
    zoo.sort();
    let mut out: Vec<(String, Plan)> = zoo
        .iter()
        .map(|p| (p.display().to_string(), plan_at(p, &fixture_dims(p))))
        .collect();
    let minilm: HashMap<String, i64> = [("B".to_string(), 2), ("T".to_string(), 16)].into();
    out.push((
        "models/minilm.vlm".into(),
        plan_at(Path::new("models/minilm.vlm"), &minilm),
    ));
    out.push((
        "models/llava_tiny.vlm".into(),
        plan_at(Path::new("models/llava_tiny.vlm"), &small_dims()),
    ));
    out.extend(generation_plans());
    out
}

/// The interpreter's per-op cases (`tests/interp/*.vlm`: every primitive and dtype), each as a
/// plan; the ones that cannot be lowered (random ops) are left out.
fn interp_cases() -> (Vec<(String, Plan)>, Vec<String>) {
    let paths = vlm_files("tests/interp");
    let (mut plans, mut skipped) = (Vec::new(), Vec::new());
    for p in paths {
        let c = vlmc::elab::check_file(&p);
        let Ok(models) = c.result else {
            skipped.push(format!("{}: does not check", p.display()));
            continue;
        };
        for m in &models {
            let compiled = compile(m, &CompileOptions::default()).expect("compiles");
            let dims = small_dims();
            let mem = vlmc::passes::memory::plan(&compiled.graph, &compiled.fusion, &dims);
            match vlmc::kernel::lower(&compiled.graph, &compiled.fusion, &mem, &dims) {
                Ok(plan) => plans.push((format!("{}:{}", p.display(), m.model), plan)),
                Err(e) => skipped.push(format!("{}: {e}", p.display())),
            }
        }
    }
    (plans, skipped)
}

/// The specs whose generated CUDA C is pinned by snapshots.
const SNAPSHOT_SPECS: [&str; 5] = [
    "tests/blocks/linear.vlm",
    "tests/blocks/layer_norm.vlm",
    "tests/blocks/softmax.vlm",
    "tests/blocks/attention_self.vlm",
    "tests/passes/fusion.vlm",
];

/// The generated sources (without the shared prelude) and the launch plan.
fn snapshot_text(plan: &Plan, p: &Program, title: &str) -> String {
    let mut s = p.launch_text(plan, title);
    for g in &p.groups {
        for f in &g.functions {
            s.push('\n');
            s.push_str(f);
        }
    }
    s
}

#[test]
fn generated_cuda_snapshots() {
    for spec in SNAPSHOT_SPECS {
        let plan = plan_at(Path::new(spec), &small_dims());
        let program = cuda::generate(&plan, &Options::default()).expect("generates");
        let name = Path::new(spec)
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("name");
        insta::assert_snapshot!(
            format!("cuda_{name}"),
            snapshot_text(&plan, &program, &format!("{spec} at B=2, T=5"))
        );
    }
}

#[test]
fn tiled_matmul_snapshot() {
    let plan = plan_at(Path::new("tests/passes/fusion.vlm"), &small_dims());
    let program = cuda::generate(&plan, &Options { cublas: false }).expect("generates");
    insta::assert_snapshot!(
        "cuda_fusion_tiled",
        snapshot_text(&plan, &program, "fusion.vlm without cuBLAS")
    );
}

/// Every plan of the test models, checked for bounds and launch limits, with and without cuBLAS.
#[test]
fn launch_plans_stay_in_bounds() {
    let mut plans = nvrtc_models();
    for dir in ["tests/blocks", "tests/passes"] {
        for p in vlm_files(dir) {
            plans.push((p.display().to_string(), plan_at(&p, &small_dims())));
        }
    }
    let mut errors = Vec::new();
    let (mut proved, mut clamped, mut launches) = (0, 0, 0);
    for (name, plan) in &plans {
        let r = bounds::check(plan);
        proved += r.proved;
        clamped += r.clamped;
        errors.extend(r.errors.iter().map(|e| format!("{name}: {e}")));
        for cublas in [true, false] {
            let p = cuda::generate(plan, &Options { cublas }).expect("generates");
            launches += p.launches.len();
            errors.extend(
                launch::check(plan, &p.launches)
                    .into_iter()
                    .map(|e| format!("{name}: {e}")),
            );
        }
    }
    eprintln!(
        "{} plans: {proved} accesses proved in bounds, {clamped} gathers clamped, {launches} launches checked",
        plans.len()
    );
    assert!(plans.len() >= 40, "only {} plans", plans.len());
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// Loads NVRTC from .cache/cuda (tests/setup.sh).
fn load_nvrtc() {
    let lib = Path::new(".cache/cuda/lib/libnvrtc.so.12");
    assert!(
        lib.is_file(),
        "NVRTC is missing: run tests/setup.sh first (it unpacks nvidia-cuda-nvrtc-cu12 into .cache/cuda)"
    );
    nvrtc::load_from(lib).expect("NVRTC loads");
    nvrtc::available().expect("NVRTC is found");
}

fn no_cache(arch: &str) -> nvrtc::NvrtcOptions {
    nvrtc::NvrtcOptions {
        arch: arch.to_string(),
        include_dirs: vec![PathBuf::from(".cache/cuda/include")],
        cache_dir: None,
    }
}

#[test]
fn every_zoo_kernel_compiles_with_nvrtc() {
    load_nvrtc();
    let (major, minor) = nvrtc::version().expect("version");
    // Without cuBLAS every product is a generated kernel too: a superset of the functions.
    let programs: Vec<(String, Program)> = nvrtc_models()
        .into_iter()
        .map(|(name, plan)| {
            let p = cuda::generate(&plan, &Options { cublas: false }).expect("generates");
            (name, p)
        })
        .collect();
    let jobs: Vec<(usize, &str)> = (0..programs.len())
        .flat_map(|i| [(i, "sm_80"), (i, "sm_90")])
        .collect();
    let next = Mutex::new(0usize);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let j = {
                    let mut n = next.lock().expect("lock");
                    let j = *n;
                    *n += 1;
                    j
                };
                let Some(&(i, arch)) = jobs.get(j) else { break };
                let (name, p) = &programs[i];
                let r = nvrtc::compile_program(p, &no_cache(arch));
                results
                    .lock()
                    .expect("lock")
                    .push((name.clone(), arch, p.function_count(), r));
            });
        }
    });
    let results = results.into_inner().expect("results");
    let mut failures = Vec::new();
    let mut per_arch: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for (name, arch, n, r) in &results {
        match r {
            Ok(b) => {
                assert!(!b.cubin.is_empty() && !b.cached);
                let e = per_arch.entry(arch).or_default();
                e.0 += 1;
                e.1 += n;
            }
            Err(e) => failures.push(format!("{name} ({arch}): {e}")),
        }
    }
    for (arch, (models, functions)) in &per_arch {
        eprintln!("NVRTC {major}.{minor}, {arch}: {functions} kernels of {models} models compiled");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert_eq!(results.len(), jobs.len());
    assert!(
        per_arch.values().all(|(m, f)| *m >= 13 && *f >= 500),
        "{per_arch:?}"
    );
}

/// Every primitive op and dtype (f16/bf16 rounding, i32 floor division, casts, NaN-propagating
/// max) as generated code, compiled by NVRTC.
#[test]
fn every_interp_case_compiles_with_nvrtc() {
    load_nvrtc();
    let (plans, skipped) = interp_cases();
    let mut failures = Vec::new();
    let mut functions = 0;
    for (name, plan) in &plans {
        let r = bounds::check(plan);
        failures.extend(r.errors.iter().map(|e| format!("{name}: {e}")));
        let p = cuda::generate(plan, &Options { cublas: false }).expect("generates");
        functions += p.function_count();
        if let Err(e) = nvrtc::compile_program(&p, &no_cache("sm_80")) {
            failures.push(format!("{name}: {e}"));
        }
    }
    eprintln!(
        "{} interpreter cases: {functions} kernels compiled for sm_80; left out: {skipped:?}",
        plans.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(plans.len() >= 60 && skipped.len() <= 5, "{skipped:?}");
}

#[test]
fn nvrtc_errors_name_the_kernel_and_the_cache_is_used() {
    load_nvrtc();
    let plan = plan_at(Path::new("tests/passes/fusion.vlm"), &small_dims());
    let mut p = cuda::generate(&plan, &Options::default()).expect("generates");
    let dir = std::env::temp_dir().join(format!("vlmc-cuda-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = nvrtc::NvrtcOptions {
        cache_dir: Some(dir.clone()),
        ..no_cache("sm_80")
    };
    let first = nvrtc::compile_program(&p, &opts).expect("compiles");
    let second = nvrtc::compile_program(&p, &opts).expect("compiles");
    assert!(!first.cached && second.cached && first.cubin == second.cubin);
    // Another architecture is another entry.
    let other = nvrtc::compile_program(
        &p,
        &nvrtc::NvrtcOptions {
            arch: "sm_90".into(),
            ..opts.clone()
        },
    )
    .expect("compiles");
    assert!(!other.cached && other.key != first.key);
    let _ = std::fs::remove_dir_all(&dir);
    // A broken function: the error names it and carries NVRTC's log.
    let last = p.groups.last_mut().expect("a group");
    let f = last.functions.last_mut().expect("a function");
    *f = f.replacen('{', "{ undefined_thing = 1;", 1);
    let err = nvrtc::compile_program(&p, &no_cache("sm_80")).expect_err("rejected");
    let text = err.to_string();
    assert!(
        text.contains("NVRTC rejected kernel `k1_norm` for sm_80")
            && text.contains("undefined_thing"),
        "{text}"
    );
    assert!(
        nvrtc::compile_program(&p, &no_cache("compute_80")).is_err(),
        "not a real architecture"
    );
}
