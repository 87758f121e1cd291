//! `vlmc bench`: times a model's forward compiled to machine code (and, optionally, with the
//! interpreter) on synthetic inputs at given sizes, and the GEMM crate's ceiling.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;
use vlmc_runtime::Tensor;

/// What `vlmc bench` measures.
pub struct BenchArgs<'a> {
    pub pick: crate::Pick<'a>,
    /// Weights (safetensors); random parameters from the init rules when absent.
    pub weights: Option<&'a [PathBuf]>,
    /// Sizes of the symbolic dims.
    pub dims: &'a [(String, i64)],
    /// Timed runs of the compiled code (after one warm-up run).
    pub runs: usize,
    /// Timed runs of the interpreter (0: skip).
    pub interp_runs: usize,
    /// Also measure the GEMM crate on an n³ product (0: skip).
    pub gemm: usize,
    /// Compile without the disk cache of CPU kernels (`--no-cache`).
    pub no_cache: bool,
}

/// The smallest size of a table that integer input `id` indexes (through gathers it reaches by
/// views and casts), so that synthetic ids stay in range.
fn index_bound(g: &vlmc::ir::Graph, id: vlmc::ir::NodeId) -> Option<i64> {
    use vlmc::ir::{Op, OpKind};
    let mut bound: Option<i64> = None;
    let mut stack = vec![id];
    let mut seen = std::collections::HashSet::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        for u in g.users(v) {
            let node = g.node(u);
            match &node.op {
                Op::Gather { axis } if g.operands(u).get(1) == Some(&v) => {
                    let table = &g.node(g.operands(u)[0]).ty.shape.0;
                    if let Some(n) = table.get(*axis).and_then(|d| d.as_const()) {
                        bound = Some(bound.map_or(n, |b: i64| b.min(n)));
                    }
                }
                Op::Cast { .. } => stack.push(u),
                op if op.kind() == OpKind::View => stack.push(u),
                _ => {}
            }
        }
    }
    bound
}

/// Synthetic inputs: token ids 1..1000 (below the size of the tables they index), masks of
/// ones, token types of zeros, floats in [-1, 1).
pub fn synthetic_inputs(
    g: &vlmc::ir::Graph,
    dims: &HashMap<String, i64>,
) -> Result<BTreeMap<String, Tensor>, String> {
    let mut out = BTreeMap::new();
    for (k, (id, name, ty)) in g.inputs().into_iter().enumerate() {
        let mut shape = Vec::new();
        for d in &ty.shape.0 {
            match d.eval(&|s| dims.get(s).copied()) {
                Some(v) if v >= 0 => shape.push(v as usize),
                _ => return Err(format!("input `{name}`: give the size of {d} with --dims")),
            }
        }
        // Sized by the user's --dims: checked against the memory available.
        let n = vlmc_runtime::alloc::numel(&shape).unwrap_or(usize::MAX);
        let bytes = if ty.dtype == vlmc::ir::DType::Bool {
            1
        } else {
            4
        };
        vlmc_runtime::alloc::ensure_shape(&shape, bytes, || {
            format!("input `{name}` {shape:?} {}", ty.dtype)
        })
        .map_err(|e| e.to_string())?;
        let t = match ty.dtype {
            vlmc::ir::DType::I32 if name.contains("mask") => Tensor::i32(shape, vec![1; n]),
            vlmc::ir::DType::I32 if name.contains("type") => Tensor::i32(shape, vec![0; n]),
            vlmc::ir::DType::I32 => {
                let top = index_bound(g, id).map_or(999, |b| (b - 1).clamp(1, 999)) as usize;
                Tensor::i32(
                    shape,
                    (0..n).map(|i| 1 + ((i * 7919 + k) % top) as i32).collect(),
                )
            }
            vlmc::ir::DType::Bool => Tensor::bool(shape, vec![true; n]),
            _ => Tensor::f32(
                shape,
                (0..n)
                    .map(|i| ((i * 7919 + k * 31) % 1000) as f32 / 500.0 - 1.0)
                    .collect(),
            ),
        };
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

/// The parameters of a benchmark: from `weights` (bound by the model's checkpoint rules), or
/// from the init rules with `seed`.
pub fn bench_params(
    m: &vlmc::elab::Elaborated,
    weights: Option<&[PathBuf]>,
    seed: u64,
) -> Result<BTreeMap<String, Tensor>, String> {
    match weights {
        Some(w) => {
            let wf = vlmc_runtime::weight_set::WeightSet::open(w).map_err(|e| e.to_string())?;
            Ok(vlmc_runtime::weights::bind(&m.graph, &wf, &m.checkpoint)
                .map_err(|e| e.to_string())?
                .params)
        }
        None => vlmc_runtime::init::init_params(&m.graph, seed).map_err(|e| e.to_string()),
    }
}

/// The median of timings.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `vlmc bench FILE --dims ...`: prints one `key=value` line per measurement.
pub fn bench(file: &Path, args: &BenchArgs<'_>) -> Result<(), u8> {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        1u8
    };
    let m = crate::load_model(file, &args.pick)?;
    crate::check_dims(&[&m.graph], args.dims).map_err(|e| fail(&e))?;
    let params = bench_params(&m, args.weights, 0).map_err(|e| fail(&e))?;
    let dims: HashMap<String, i64> = args.dims.iter().cloned().collect();
    let inputs = synthetic_inputs(&m.graph, &dims).map_err(|e| fail(&e))?;
    let size: Vec<String> = args.dims.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let size = size.join(",");
    let t0 = Instant::now();
    let c = vlmc::passes::compile(&m, &vlmc::passes::CompileOptions::default())
        .map_err(|e| fail(&e))?;
    let passes_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let mem = vlmc::passes::memory::plan(&c.graph, &c.fusion, &dims);
    vlmc_runtime::cpu::check_plan_memory(&c.graph, &mem, &dims).map_err(|e| fail(&e))?;
    let lowered = vlmc::kernel::lower_with(
        &c.graph,
        &c.fusion,
        &mem,
        &dims,
        vlmc::kernel::LowerOptions::cpu(),
    )
    .map_err(|e| fail(&e))?;
    let lower_ms = t1.elapsed().as_secs_f64() * 1e3;
    let flops = vlmc::report::report(&c.graph, &c.fusion, &mem, None, &dims)
        .map_err(|e| fail(&e))?
        .flops as f64;
    let t2 = Instant::now();
    let plan = vlmc_runtime::cpu::CpuPlan::new(
        lowered,
        &c.graph,
        &params,
        &crate::cpu_options(args.no_cache),
    )
    .map_err(|e| fail(&e))?;
    let prepare_ms = t2.elapsed().as_secs_f64() * 1e3;
    let p = &plan.program;
    // codegen: Cranelift (or the disk cache); prepare: codegen, load-time values, buffers.
    println!(
        "compile model={} size={size} passes_ms={passes_ms:.1} lower_ms={lower_ms:.1} \
         codegen_ms={:.1} prepare_ms={prepare_ms:.1} kernels={} functions={} cache_hits={} \
         cache_misses={}",
        m.model,
        p.compile_time.as_secs_f64() * 1e3,
        p.kernels.len(),
        p.functions,
        p.cache.hits,
        p.cache.misses
    );
    plan.run(&inputs, &params).map_err(|e| fail(&e))?;
    let mut times = Vec::new();
    for _ in 0..args.runs {
        let t = Instant::now();
        plan.run(&inputs, &params).map_err(|e| fail(&e))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let med = median(times);
    println!(
        "compiled model={} size={size} median_ms={med:.2} min_ms={min:.2} gflops={:.1} flops={flops:.0}",
        m.model,
        flops / med / 1e6
    );
    if args.interp_runs > 0 {
        let mut times = Vec::new();
        for _ in 0..args.interp_runs {
            let t = Instant::now();
            vlmc_runtime::run(&m.graph, &inputs, &params).map_err(|e| fail(&e))?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let med = median(times);
        println!(
            "interpreter model={} size={size} median_ms={med:.1} gflops={:.2}",
            m.model,
            flops / med / 1e6
        );
    }
    if args.gemm > 0 {
        let threads = vlmc_runtime::cpu::threads();
        let g = vlmc_runtime::cpu::gemm_gflops(args.gemm, 10);
        println!("gemm n={} threads={threads} gflops={g:.1}", args.gemm);
    }
    Ok(())
}
