//! `vlmc bench FILE --trainer NAME`: times one training step (forward, loss, backward, optimiser
//! update) compiled for the CPU, on synthetic inputs at given sizes, with the time split between
//! forward, backward and update and the step's planned and naive peak memory.
//!
//! The step is the fused step graph (forward, loss, backward, update: one plan). The split comes
//! from three more graphs of the same trainer, each compiled and timed on its own: the
//! evaluation graph (forward and loss: `fwd`), the gradient graph (forward, loss, backward:
//! `bwd` = gradient − evaluation) and the update graph (gradients in, new parameters and state
//! out: `update`). `compile_ms` is the fused step's (lowering and code generation).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;
use vlmc::train::{StepKind, TrainConfig};
use vlmc_runtime::Tensor;

/// What `vlmc bench --trainer` measures.
pub struct TrainBenchArgs<'a> {
    pub pick: crate::Pick<'a>,
    pub weights: Option<&'a [std::path::PathBuf]>,
    pub trainer: &'a str,
    pub dims: &'a [(String, i64)],
    /// Timed steps of each graph (after one warm-up run).
    pub runs: usize,
    /// Timed steps on the interpreter (0: skip).
    pub interp_runs: usize,
    pub no_cache: bool,
}

/// The step's inputs: the model's synthetic inputs (`vlmc bench`'s, in the model's input
/// order), every token a target, the loss scaled by 1 / targets (or 1), learning rate 1e-4 at
/// step 1, zero optimiser state, dropout keeping everything.
fn step_inputs(
    model: &vlmc::ir::Graph,
    step: &vlmc::ir::Graph,
    dims: &HashMap<String, i64>,
) -> Result<BTreeMap<String, Tensor>, String> {
    let mut inputs = crate::bench::synthetic_inputs(model, dims)?;
    let rows = inputs
        .get("ids")
        .filter(|t| t.shape.len() == 2)
        .map(|t| (t.shape[0], t.shape[1]));
    let scalar = |v: f32| Tensor::f32(vec![], vec![v]);
    for (_, name, ty) in step.inputs() {
        if inputs.contains_key(name) {
            continue;
        }
        let shape: Vec<usize> = ty
            .shape
            .0
            .iter()
            .map(|d| d.eval(&|s| dims.get(s).copied()).unwrap_or(1).max(0) as usize)
            .collect();
        let n = shape.iter().product();
        let t = match name {
            "loss_scale" => match rows {
                Some((b, t)) if step.input("loss_mask").is_some() => {
                    scalar(1.0 / (b * (t - 1)).max(1) as f32)
                }
                _ => scalar(1.0),
            },
            "lr" => scalar(1e-4),
            "step" => scalar(1.0),
            _ if name.starts_with("optim.") => Tensor::f32(shape, vec![0.0; n]),
            _ => Tensor::f32(shape, vec![1.0; n]),
        };
        inputs.insert(name.to_string(), t);
    }
    Ok(inputs)
}

/// A graph of the step compiled for the CPU, timed.
struct Timed {
    compile_ms: f64,
    median_ms: f64,
    outputs: BTreeMap<String, Tensor>,
}

fn time_graph(
    g: &vlmc::ir::Graph,
    inputs: &BTreeMap<String, Tensor>,
    params: &BTreeMap<String, Tensor>,
    runs: usize,
    opts: &vlmc::backend::cpu::CpuOptions,
) -> Result<Timed, String> {
    let compiled = vlmc::passes::Compiled::training(g.clone());
    // Only the inputs this graph reads.
    let wanted: BTreeMap<String, Tensor> = g
        .inputs()
        .iter()
        .filter_map(|(_, n, _)| inputs.get(*n).map(|t| (n.to_string(), t.clone())))
        .collect();
    let model = vlmc_runtime::cpu::CpuModel::new(compiled, BTreeMap::new(), opts.clone());
    let t0 = Instant::now();
    let plan = model.plan_for(&wanted).map_err(|e| e.to_string())?;
    let compile_ms = t0.elapsed().as_secs_f64() * 1e3;
    let outputs = plan.run(&wanted, params).map_err(|e| e.to_string())?;
    // Outputs land in the memory of the previous run's, as a training session reuses the
    // parameters and state it replaced.
    let mut out = outputs.clone();
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        plan.run_into(&wanted, params, &mut out)
            .map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Timed {
        compile_ms,
        median_ms: crate::bench::median(times),
        outputs,
    })
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// `vlmc bench FILE --trainer NAME --dims ...`: prints one `train ...` line.
pub fn bench_train(file: &Path, args: &TrainBenchArgs<'_>) -> Result<(), u8> {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        1u8
    };
    let m = crate::load_model(file, &args.pick)?;
    let mut cfg = TrainConfig::of(&m, args.trainer).map_err(|e| fail(&e))?;
    cfg.grad_accum = 1;
    let base = crate::bench::bench_params(&m, args.weights, cfg.seed).map_err(|e| fail(&e))?;
    // The session adds the adapter's parameters (from their init rules).
    let session = vlmc_runtime::train::Session::with_backend(
        &m,
        cfg.clone(),
        base,
        1,
        &vlmc_runtime::train::Backend::Interp,
    )
    .map_err(|e| fail(&e))?;
    let params = session.params;
    let t0 = Instant::now();
    let eval = vlmc::train::build_eval(&m, &cfg).map_err(|e| fail(&e))?;
    let grad = vlmc::train::build(&m, &cfg, StepKind::Grad).map_err(|e| fail(&e))?;
    let update = vlmc::train::build(&m, &cfg, StepKind::Update).map_err(|e| fail(&e))?;
    let fused = vlmc::train::build(&m, &cfg, StepKind::Fused).map_err(|e| fail(&e))?;
    let graphs_ms = t0.elapsed().as_secs_f64() * 1e3;
    crate::check_dims(&[&m.graph, &fused.graph], args.dims).map_err(|e| fail(&e))?;
    let dims: HashMap<String, i64> = args.dims.iter().cloned().collect();
    let inputs = step_inputs(&m.graph, &fused.graph, &dims).map_err(|e| fail(&e))?;
    let size: Vec<String> = args.dims.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let size = size.join(",");
    let opts = crate::cpu_options(args.no_cache);
    let fwd = time_graph(&eval, &inputs, &params, args.runs, &opts).map_err(|e| fail(&e))?;
    let fb = time_graph(&grad.graph, &inputs, &params, args.runs, &opts).map_err(|e| fail(&e))?;
    let mut with_grads = inputs.clone();
    with_grads.extend(
        fb.outputs
            .iter()
            .filter(|(k, _)| k.starts_with("grad."))
            .map(|(k, t)| (k.clone(), t.clone())),
    );
    let up =
        time_graph(&update.graph, &with_grads, &params, args.runs, &opts).map_err(|e| fail(&e))?;
    let step =
        time_graph(&fused.graph, &inputs, &params, args.runs, &opts).map_err(|e| fail(&e))?;
    let fusion = vlmc::passes::fusion::plan_with(&fused.graph, false);
    let mem = vlmc::passes::memory::plan(&fused.graph, &fusion, &dims);
    let report = vlmc::report::report(&fused.graph, &fusion, &mem, Some(&fused.trainable), &dims)
        .map_err(|e| fail(&e))?;
    let bytes =
        |names: &mut dyn Iterator<Item = &Tensor>| -> usize { names.map(|t| t.numel() * 4).sum() };
    let params_b = bytes(&mut params.values());
    let state_b = bytes(&mut session.state.values());
    let loss = step.outputs["loss"].to_f64()[0];
    let flops = report.flops as f64;
    println!(
        "train model={} trainer={} size={size} step_ms={:.2} fwd_ms={:.2} bwd_ms={:.2} \
         update_ms={:.2} flops={flops:.0} gflops={:.1} loss={loss:.6} trainable={} \
         kernels={} peak_mib={:.1} naive_mib={:.1} params_mib={:.1} optim_mib={:.1} \
         graphs_ms={graphs_ms:.0} compile_ms={:.0}",
        m.model,
        args.trainer,
        step.median_ms,
        fwd.median_ms,
        fb.median_ms - fwd.median_ms,
        up.median_ms,
        flops / step.median_ms / 1e6,
        report.params_trainable,
        report.kernels,
        report.peak_bytes as f64 / (1 << 20) as f64,
        report.naive_bytes as f64 / (1 << 20) as f64,
        mib(params_b),
        mib(state_b),
        step.compile_ms,
    );
    if args.interp_runs > 0 {
        let mut times = Vec::new();
        for _ in 0..args.interp_runs {
            let t = Instant::now();
            vlmc_runtime::run(&fused.graph, &inputs, &params).map_err(|e| fail(&e))?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "train-interpreter model={} trainer={} size={size} step_ms={:.1}",
            m.model,
            args.trainer,
            crate::bench::median(times)
        );
    }
    Ok(())
}
