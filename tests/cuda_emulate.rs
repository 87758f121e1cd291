//! The generated CUDA C *run*, without a GPU: the kernels of every zoo fixture, every block and
//! pass test, llava_tiny, clip_tiny and every per-op interpreter case are compiled on the CPU with g++ and
//! a shim of the CUDA execution model (`tests/gpu/emulate.hpp`: a thread per CUDA thread,
//! barriers, warp shuffles through memory), launched as the launch plan says, and their outputs
//! compared with the reference interpreter (relative error <= 1e-4). This checks the index
//! arithmetic, the block reductions, the scalar semantics of the generated code and the
//! parameters of every cuBLAS call (run by the shim's definition of
//! `cublasSgemmStridedBatched`; the per-op cases use the generated tiled kernels instead); only
//! the real hardware and library are left to `tests/gpu/check.sh`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::path::Path;
use vlmc::backend::cuda::{self, expr, Launch, Options, Program};
use vlmc::kernel::{BufferKind, Plan};
use vlmc::passes::{compile, CompileOptions};
use vlmc_runtime::cuda::{from_slots, to_slots};
use vlmc_runtime::Tensor;

const TOLERANCE: f64 = 1e-4;

/// One model to emulate.
struct Case {
    name: String,
    plan: Plan,
    program: Program,
    inputs: BTreeMap<String, Tensor>,
    params: BTreeMap<String, Tensor>,
    load_time: HashMap<usize, Tensor>,
    want: BTreeMap<String, Tensor>,
}

fn dims() -> HashMap<String, i64> {
    common::small_dims()
}

/// Every case that lowers and that the interpreter runs on these inputs.
fn cases() -> (Vec<Case>, Vec<String>) {
    let files = common::small_models(&["tests/blocks", "tests/passes", "tests/interp"]);
    let (mut out, mut skipped) = (Vec::new(), Vec::new());
    for path in files {
        let Ok(models) = vlmc::elab::check_file(&path).result else {
            continue;
        };
        // Zoo fixtures run on their own inputs (token ids inside their tables), at their sizes.
        let io = path.with_file_name("io.safetensors");
        let fixture: Option<BTreeMap<String, Tensor>> = io.is_file().then(|| {
            let f = vlmc_runtime::weights::WeightFile::open(&io).expect("io");
            f.names()
                .into_iter()
                .filter(|n| !n.starts_with("expect."))
                .map(|n| {
                    let t = f.get(&n).expect("tensor");
                    (n, t)
                })
                .collect()
        });
        for m in models {
            let name = format!("{}:{}", path.display(), m.model);
            let dims = match &fixture {
                Some(ins) => vlmc_runtime::interp::bind_dims(&m.graph, ins).expect("fits"),
                None => dims(),
            };
            let c = compile(&m, &CompileOptions::default()).expect("compiles");
            let mem = vlmc::passes::memory::plan(&c.graph, &c.fusion, &dims);
            let plan = match vlmc::kernel::lower(&c.graph, &c.fusion, &mem, &dims) {
                Ok(p) => p,
                Err(e) => {
                    skipped.push(format!("{name}: {e}"));
                    continue;
                }
            };
            let ins = fixture
                .clone()
                .unwrap_or_else(|| common::small_inputs(&m.graph, &dims));
            let params = vlmc_runtime::init::init_params(&m.graph, 3).expect("init");
            let want = match vlmc_runtime::run(&m.graph, &ins, &params) {
                Ok(w) => w,
                Err(e) => {
                    skipped.push(format!("{name}: interpreter: {}", e.message));
                    continue;
                }
            };
            let load_time =
                vlmc_runtime::plan::load_time_values(&plan, &c.graph, &params).expect("load");
            // The per-op cases run every matmul as a generated tiled kernel, the models their
            // cuBLAS calls (through the emulator's definition of the call).
            let cublas = !path.starts_with("tests/interp");
            let program = cuda::generate(&plan, &Options { cublas }).expect("generates");
            out.push(Case {
                name,
                plan,
                program,
                inputs: ins,
                params,
                load_time,
                want,
            });
        }
    }
    (out, skipped)
}

/// The C++ of case `ci`: its functions renamed `c{ci}_…`, and a runner that reads the buffers,
/// launches in plan order and writes the outputs.
fn case_source(ci: usize, c: &Case) -> String {
    let mut s = String::new();
    let rename = |f: &str| format!("c{ci}_{f}");
    for g in &c.program.groups {
        for f in &g.functions {
            let name = f
                .lines()
                .next()
                .and_then(|l| l[..l.rfind('(').unwrap_or(0)].split_whitespace().last())
                .unwrap_or("?");
            s.push_str(&f.replacen(&format!(") {name}("), &format!(") {}(", rename(name)), 1));
            s.push('\n');
        }
    }
    let plan = &c.plan;
    let _ = writeln!(s, "static void run_c{ci}(FILE* in, FILE* out) {{");
    let _ = writeln!(s, "  std::vector<uint32_t> arena({});", plan.arena.max(1));
    let _ = writeln!(
        s,
        "  std::vector<std::vector<uint32_t>> own({});",
        plan.buffers.len()
    );
    let _ = writeln!(s, "  std::vector<uint32_t*> p({});", plan.buffers.len());
    for (i, b) in plan.buffers.iter().enumerate() {
        match b.kind {
            BufferKind::Temp { offset } => {
                let _ = writeln!(s, "  p[{i}] = arena.data() + {offset};");
            }
            _ => {
                let _ = writeln!(
                    s,
                    "  own[{i}].resize({}); if (fread(own[{i}].data(), 4, {}, in) != {}) exit(3); p[{i}] = own[{i}].data();",
                    b.len().max(1),
                    b.len(),
                    b.len()
                );
            }
        }
    }
    for l in &c.program.launches {
        let k = match l {
            Launch::Kernel(k) => k,
            Launch::Gemm(g) => {
                let op = |o: &cuda::GemmOperand| format!("(float*)p[{}] + {}", o.buf, o.offset);
                let _ = writeln!(
                    s,
                    "  vlmc_sgemm_strided_batched({}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {});",
                    g.a.trans,
                    g.b.trans,
                    g.m,
                    g.n,
                    g.k,
                    op(&g.a),
                    g.a.ld,
                    g.a.stride,
                    op(&g.b),
                    g.b.ld,
                    g.b.stride,
                    op(&g.c),
                    g.c.ld,
                    g.c.stride,
                    g.batch
                );
                continue;
            }
        };
        let args: Vec<String> = k
            .args
            .iter()
            .map(|&a| format!("({}*)p[{a}]", expr::ctype(plan.buffers[a].dtype)))
            .collect();
        let _ = writeln!(
            s,
            "  vlmc_launch(dim3{{{}, {}, {}}}, {}, [&] {{ {}({}); }});",
            k.grid[0],
            k.grid[1],
            k.grid[2],
            k.block,
            rename(&k.function),
            args.join(", ")
        );
    }
    for (_, b) in &plan.outputs {
        let _ = writeln!(s, "  fwrite(p[{b}], 4, {}, out);", plan.buffers[*b].len());
    }
    s.push_str("}\n");
    s
}

fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
    let (g, w) = (got.to_f64(), want.to_f64());
    let scale = w
        .iter()
        .filter(|x| x.is_finite())
        .fold(0f64, |m, x| m.max(x.abs()))
        .max(1e-30);
    g.iter()
        .zip(&w)
        .map(|(a, b)| match (a.is_finite(), b.is_finite()) {
            (true, true) => (a - b).abs(),
            _ if a == b || (a.is_nan() && b.is_nan()) => 0.0,
            _ => f64::INFINITY,
        })
        .fold(0f64, f64::max)
        / scale
}

/// The bytes of a case's non-arena buffers, in buffer order.
fn buffer_bytes(c: &Case) -> Vec<u8> {
    let mut bytes = Vec::new();
    for b in &c.plan.buffers {
        let t = match &b.kind {
            BufferKind::Temp { .. } => continue,
            BufferKind::Input(n) => c.inputs.get(n),
            BufferKind::Param(p) => c.params.get(p),
            BufferKind::LoadTime(n) => c.load_time.get(n),
            BufferKind::Scratch => None,
        };
        let slots = match t {
            Some(t) => to_slots(t, b.dtype),
            None => vec![0; b.len()],
        };
        assert_eq!(slots.len(), b.len());
        for x in slots {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
    bytes
}

#[test]
fn generated_kernels_run_in_an_emulator_and_match_the_interpreter() {
    let (cases, skipped) = cases();
    let dir = std::env::temp_dir().join(format!("vlmc-cuda-emulate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let shim = Path::new("tests/gpu/emulate.hpp")
        .canonicalize()
        .expect("emulate.hpp");
    let mut src = format!(
        "#include \"{}\"\n#include <cstdio>\n#include <cstdlib>\n",
        shim.display()
    );
    src.push_str(cuda::PRELUDE);
    for (ci, c) in cases.iter().enumerate() {
        src.push_str(&case_source(ci, c));
    }
    src.push_str("int main(int argc, char** argv) {\n  if (argc != 4) return 2;\n");
    src.push_str("  FILE* in = fopen(argv[2], \"rb\"); FILE* out = fopen(argv[3], \"wb\");\n");
    src.push_str("  if (!in || !out) return 2;\n  switch (atoi(argv[1])) {\n");
    for ci in 0..cases.len() {
        let _ = writeln!(src, "    case {ci}: run_c{ci}(in, out); break;");
    }
    src.push_str("    default: return 2;\n  }\n  fclose(out);\n  return 0;\n}\n");
    let cpp = dir.join("emulated.cpp");
    std::fs::write(&cpp, &src).expect("write");
    let exe = dir.join("emulated");
    let built = std::process::Command::new("g++")
        .args(["-std=c++20", "-O0", "-pthread", "-w", "-o"])
        .arg(&exe)
        .arg(&cpp)
        .output()
        .expect("g++ runs (the test needs a C++20 compiler)");
    assert!(
        built.status.success(),
        "g++ rejected the generated code:\n{}",
        String::from_utf8_lossy(&built.stderr)
            .lines()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut failures = Vec::new();
    let (mut functions, mut gemms) = (0, 0);
    for (ci, c) in cases.iter().enumerate() {
        functions += c.program.function_count();
        gemms += c.program.gemm_count();
        let input = dir.join(format!("in{ci}.bin"));
        let output = dir.join(format!("out{ci}.bin"));
        std::fs::write(&input, buffer_bytes(c)).expect("write");
        let run = std::process::Command::new(&exe)
            .arg(ci.to_string())
            .arg(&input)
            .arg(&output)
            .output()
            .expect("runs");
        if !run.status.success() {
            failures.push(format!(
                "{}: the emulated program failed: {:?}",
                c.name, run.status
            ));
            continue;
        }
        let bytes = std::fs::read(&output).expect("read");
        let slots: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut at = 0;
        for (name, b) in &c.plan.outputs {
            let buf = &c.plan.buffers[*b];
            let got = from_slots(&slots[at..at + buf.len()], buf.dtype, buf.shape.clone());
            at += buf.len();
            let want = &c.want[name];
            let err = relative_error(&got, want);
            if got.shape != want.shape || err.is_nan() || err > TOLERANCE {
                failures.push(format!("{}: `{name}` differs by {err:e}", c.name));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "emulated {} models ({functions} kernels, {gemms} cuBLAS calls) against the interpreter; left out: {skipped:?}",
        cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(cases.len() >= 100, "only {} cases", cases.len());
}
