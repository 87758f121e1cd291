//! Optimisation passes over the graph IR. Each pass is one file that says what it rewrites;
//! the [`PassManager`] runs them in order, runs the verifier after each, and keeps the IR text
//! after any pass that was asked for (`vlmc build --print-after NAME`).

pub mod autodiff;
mod cse;
mod dce;
pub mod emit;
pub mod fusion;
pub mod lora;
pub mod memory;
pub mod precision;
mod simplify;

use crate::ir::{self, Graph};

pub use autodiff::Autodiff;
pub use cse::Cse;
pub use dce::Dce;
pub use precision::{promote_f64, PromoteF64};
pub use simplify::Simplify;

/// A failure inside a pass (a bug: the input was verified).
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("pass `{pass}`: {message}")]
pub struct PassError {
    pub pass: &'static str,
    pub message: String,
}

/// A graph-to-graph rewrite.
pub trait Pass {
    /// The name used by `--print-after` and in reports.
    fn name(&self) -> &'static str;
    /// Rewrites the graph; returns whether anything changed.
    fn run(&self, graph: &mut Graph) -> Result<bool, PassError>;
}

/// What one run of the pipeline did.
#[derive(Clone, Debug, Default)]
pub struct PassLog {
    /// (pass, changed, ops after).
    pub steps: Vec<(&'static str, bool, usize)>,
    /// (pass, IR text after it) for every pass that was asked for.
    pub printed: Vec<(&'static str, String)>,
}

/// Runs passes in order with the verifier between them.
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
    print_after: Vec<String>,
}

impl PassManager {
    /// The standard inference pipeline: simplify, CSE, DCE (then simplify again, as CSE and
    /// DCE expose more folding).
    pub fn inference() -> PassManager {
        PassManager {
            passes: vec![
                Box::new(Simplify),
                Box::new(Cse),
                Box::new(Dce),
                Box::new(Simplify),
                Box::new(Dce),
            ],
            print_after: Vec::new(),
        }
    }

    /// A pipeline of the given passes.
    pub fn new(passes: Vec<Box<dyn Pass>>) -> PassManager {
        PassManager {
            passes,
            print_after: Vec::new(),
        }
    }

    /// Keeps the IR text after each pass named here (`all` for every pass).
    pub fn print_after(mut self, names: &[String]) -> PassManager {
        self.print_after = names.to_vec();
        self
    }

    /// The names of the passes, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Runs every pass; the verifier checks the graph after each.
    pub fn run(&self, graph: &mut Graph) -> Result<PassLog, PassError> {
        let mut log = PassLog::default();
        for p in &self.passes {
            let changed = p.run(graph)?;
            ir::verify(graph).map_err(|errs| PassError {
                pass: p.name(),
                message: format!(
                    "the graph is invalid after this pass: {}",
                    errs.iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            })?;
            log.steps.push((p.name(), changed, graph.len()));
            if self.print_after.iter().any(|n| n == p.name() || n == "all") {
                log.printed.push((p.name(), ir::text::print(graph)));
            }
        }
        Ok(log)
    }
}

/// The nodes whose values depend only on parameters and constants, with fixed sizes: such
/// values are computed once when the weights are loaded (a merged LoRA weight, a transposed
/// weight), not per run. (A value whose size depends on `B` or `T`, such as a RoPE table,
/// is computed per run.)
pub fn load_time(graph: &Graph) -> std::collections::HashSet<ir::NodeId> {
    load_time_with(graph, true)
}

/// [`load_time`], or (`params_fixed` false, for training steps whose parameters change every
/// run) only the values computed from constants.
pub fn load_time_with(graph: &Graph, params_fixed: bool) -> std::collections::HashSet<ir::NodeId> {
    let mut out = std::collections::HashSet::new();
    for id in graph.topo_order() {
        let node = graph.node(id);
        let fixed = node.ty.shape.0.iter().all(|d| d.is_const());
        let is = fixed
            && match node.op {
                ir::Op::Param { .. } => params_fixed,
                ir::Op::Const { .. } | ir::Op::Iota { .. } => true,
                ir::Op::Input { .. } | ir::Op::Random { .. } => false,
                _ => graph.operands(id).iter().all(|o| out.contains(o)),
            };
        if is {
            out.insert(id);
        }
    }
    out
}

/// How to compile a model.
#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    /// The adapter (declared in the spec) to apply and merge.
    pub adapter: Option<String>,
    /// Passes after which to keep the IR text (`all` for every pass).
    pub print_after: Vec<String>,
}

/// A model after the optimisation pipeline, partitioned into kernels.
#[derive(Debug)]
pub struct Compiled {
    pub graph: Graph,
    pub log: PassLog,
    pub fusion: fusion::FusionPlan,
}

impl Compiled {
    /// A training graph (a step, an evaluation) partitioned into kernels: its parameters
    /// change every run, so nothing computed from them is left to load time.
    pub fn training(graph: Graph) -> Compiled {
        let fusion = fusion::plan_with(&graph, false);
        Compiled {
            graph,
            log: PassLog::default(),
            fusion,
        }
    }
}

/// Runs the pipeline on a model: adapter (if any), simplify, CSE, DCE, LoRA merge, simplify,
/// DCE; then fusion.
pub fn compile(
    model: &crate::elab::Elaborated,
    opts: &CompileOptions,
) -> Result<Compiled, PassError> {
    let mut graph = model.graph.clone();
    let mut passes: Vec<Box<dyn Pass>> = vec![Box::new(Simplify), Box::new(Cse), Box::new(Dce)];
    if let Some(name) = &opts.adapter {
        let a = model
            .adapters
            .iter()
            .find(|a| &a.name == name)
            .ok_or_else(|| PassError {
                pass: "lora",
                message: format!(
                    "model `{}` has no adapter `{name}` (it has: {})",
                    model.model,
                    model
                        .adapters
                        .iter()
                        .map(|a| a.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        if a.method != "lora" {
            return Err(PassError {
                pass: "lora",
                message: format!(
                    "adapter `{name}` is `{}`; only LoRA adapters can be merged",
                    a.method
                ),
            });
        }
        let num = |k: &str| {
            a.args
                .iter()
                .find(|(n, _)| n == k)
                .and_then(|(_, v)| match v {
                    crate::elab::Setting::Int(i) => Some(*i as f64),
                    crate::elab::Setting::Float(f) => Some(*f),
                    _ => None,
                })
        };
        let cfg = lora::LoraConfig {
            rank: num("rank").unwrap_or(8.0) as i64,
            alpha: num("alpha").unwrap_or(8.0),
            rslora: a
                .args
                .iter()
                .any(|(n, v)| n == "rslora" && *v == crate::elab::Setting::Bool(true)),
        };
        lora::apply(&mut graph, &a.targets, &cfg)?;
        passes.push(Box::new(lora::LoraMerge));
    }
    passes.extend([Box::new(Simplify) as Box<dyn Pass>, Box::new(Dce)]);
    let log = PassManager::new(passes)
        .print_after(&opts.print_after)
        .run(&mut graph)?;
    let fusion = fusion::plan(&graph);
    Ok(Compiled { graph, log, fusion })
}
