//! The CUDA backend: CUDA C from the kernel IR, compiled at run time with NVRTC.
//!
//! Every loop nest of a [`Kernel`](crate::kernel::Kernel) becomes one `extern "C" __global__`
//! function ([`emit`]); a matrix product becomes a cuBLAS call or a generated tiled kernel
//! ([`matmul`]); a scatter-add a generated kernel with a thread per column ([`scatter`]); the steps of a kernel run in order, so a fused group may need several
//! launches. [`generate`] returns a [`Program`]: the functions grouped by kernel and the
//! [`launch`] plan. [`nvrtc`] compiles the program for one architecture and caches the binary.
//!
//! The scalar semantics are the plan executor's (`runtime/src/plan.rs`), computed in f32 and
//! i32: see `prelude.cuh`, which starts every source.

/// The interval arithmetic of index expressions lives with the kernel IR (the CPU backend proves
/// its plans with it too).
pub use crate::kernel::bounds;
pub mod emit;
pub mod expr;
pub mod launch;
pub mod matmul;
pub mod nvrtc;
pub mod scatter;

pub use launch::{Gemm, GemmOperand, KernelLaunch, Launch};

use crate::kernel::{Plan, Step};

/// The helper functions every generated source starts with.
pub const PRELUDE: &str = include_str!("prelude.cuh");

/// Something the CUDA backend cannot generate or compile.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct CudaError {
    pub message: String,
}

impl CudaError {
    /// An error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        CudaError {
            message: message.into(),
        }
    }
}

/// Code generation choices.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Matrix products through cuBLAS where their strides allow (otherwise every product is a
    /// generated tiled kernel).
    pub cublas: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { cublas: true }
    }
}

/// The functions generated for one kernel of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    /// The kernel's name.
    pub name: String,
    /// The source of each generated function, in launch order.
    pub functions: Vec<String>,
}

/// A whole model's CUDA code: the generated functions and the launches that run them.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    pub groups: Vec<Group>,
    pub launches: Vec<Launch>,
}

/// Generates the CUDA program of a plan.
pub fn generate(plan: &Plan, opts: &Options) -> Result<Program, CudaError> {
    bounds::prove(plan).map_err(CudaError::new)?;
    for (i, b) in plan.buffers.iter().enumerate() {
        emit::check_dtype(b.dtype, i)?;
    }
    let mut groups = Vec::new();
    let mut launches = Vec::new();
    for k in &plan.kernels {
        let base = c_name(&k.name);
        let mut functions = Vec::new();
        for (si, step) in k.steps.iter().enumerate() {
            let name = if k.steps.len() == 1 {
                base.clone()
            } else {
                format!("{base}_s{si}")
            };
            let f = match step {
                Step::Loop(l) => emit::nest(plan, &name, l)
                    .map_err(|e| CudaError::new(format!("{}: {e}", k.name)))?,
                Step::MatMul(mm) => {
                    let gemm = opts
                        .cublas
                        .then(|| matmul::cublas(plan, mm, &k.name))
                        .flatten();
                    match gemm {
                        Some(g) => {
                            if g.batch > 0 && g.m > 0 && g.n > 0 {
                                launches.push(Launch::Gemm(g));
                            }
                            None
                        }
                        None => matmul::tiled(plan, mm, &name)?,
                    }
                }
                Step::ScatterAdd(sc) => scatter::kernel(plan, sc, &name)?,
            };
            if let Some(f) = f {
                functions.push(f.source);
                launches.push(Launch::Kernel(f.launch));
            }
        }
        groups.push(Group {
            name: base,
            functions,
        });
    }
    Ok(Program { groups, launches })
}

/// A C identifier from a kernel name.
fn c_name(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if !s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        s.insert(0, 'k');
    }
    s
}

impl Program {
    /// The number of generated `__global__` functions.
    pub fn function_count(&self) -> usize {
        self.groups.iter().map(|g| g.functions.len()).sum()
    }

    /// The number of cuBLAS calls per run.
    pub fn gemm_count(&self) -> usize {
        self.launches
            .iter()
            .filter(|l| matches!(l, Launch::Gemm(_)))
            .count()
    }

    /// One translation unit with every function: what the runtime compiles. Also returns the
    /// first line (1-based) of each function, to name the function an NVRTC error is in.
    pub fn module_source(&self) -> (String, Vec<(usize, String)>) {
        let mut src = String::from(PRELUDE);
        let mut starts = Vec::new();
        for g in &self.groups {
            for f in &g.functions {
                src.push('\n');
                starts.push((src.lines().count() + 1, function_name(f)));
                src.push_str(f);
            }
        }
        (src, starts)
    }

    /// One self-contained `.cu` file per kernel that has generated functions: (file name, source).
    pub fn files(&self) -> Vec<(String, String)> {
        self.groups
            .iter()
            .filter(|g| !g.functions.is_empty())
            .map(|g| {
                let mut src = format!("// vlmc kernel {}\n", g.name);
                src.push_str(PRELUDE);
                for f in &g.functions {
                    src.push('\n');
                    src.push_str(f);
                }
                (format!("{}.cu", g.name), src)
            })
            .collect()
    }

    /// The launch plan as text.
    pub fn launch_text(&self, plan: &Plan, title: &str) -> String {
        launch::text(plan, &self.launches, title)
    }
}

/// The name of a generated function, from its source.
fn function_name(src: &str) -> String {
    // The parameter list is the last parenthesis of the first line.
    let first = src.lines().next().unwrap_or("");
    first[..first.rfind('(').unwrap_or(0)]
        .split_whitespace()
        .last()
        .unwrap_or("?")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(c_name("k3_layers_0_attn"), "k3_layers_0_attn");
        assert_eq!(c_name("0a.b-c"), "k0a_b_c");
        assert_eq!(
            function_name(
                "extern \"C\" __global__ void __launch_bounds__(256) k0_fc(const float* b0) {"
            ),
            "k0_fc"
        );
    }
}
