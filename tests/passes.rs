//! The optimisation passes: the IR before and after every pass pinned by snapshots
//! (`tests/passes/*.vlm`), every pass checked to preserve the model's outputs with the
//! reference interpreter, LoRA merge checked on llava_tiny, and the fusion of MiniLM and
//! llava_tiny pinned.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use vlmc::elab::Elaborated;
use vlmc::passes::{compile, fusion, CompileOptions};
use vlmc_runtime::Tensor;

fn elaborate(path: &Path) -> Elaborated {
    let checked = vlmc::elab::check_file(path);
    let text = checked.render();
    checked
        .result
        .unwrap_or_else(|_| panic!("{text}"))
        .remove(0)
}

/// Deterministic non-trivial inputs for every graph input, with B = 2, T = 5 and other
/// symbolic dims 3.
fn inputs(m: &Elaborated) -> BTreeMap<String, Tensor> {
    let dims: HashMap<&str, i64> = HashMap::from([("B", 2), ("T", 5), ("N", 3)]);
    let mut out = BTreeMap::new();
    for (k, (_, name, ty)) in m.graph.inputs().into_iter().enumerate() {
        let shape: Vec<usize> = ty
            .shape
            .0
            .iter()
            .map(|d| {
                d.eval(&|s| Some(dims.get(s).copied().unwrap_or(3)))
                    .expect("size") as usize
            })
            .collect();
        let n: usize = shape.iter().product();
        let t = if ty.dtype == vlmc::ir::DType::I32 {
            Tensor::i32(
                shape,
                (0..n).map(|i| ((i * 31 + k * 7) % 97) as i32 + 1).collect(),
            )
        } else {
            Tensor::f32(
                shape,
                (0..n)
                    .map(|i| (((i * 7919 + k * 13) % 1000) as f32 / 500.0) - 1.0)
                    .collect(),
            )
        };
        out.insert(name.to_string(), t);
    }
    out
}

/// The multiply-adds of a graph's matmuls at the sizes of [`inputs`].
fn matmul_work(g: &vlmc::ir::Graph) -> i64 {
    let size = |d: &vlmc::ir::Dim| {
        let dims: HashMap<&str, i64> = HashMap::from([("B", 2), ("T", 5), ("N", 3)]);
        d.eval(&|s| Some(dims.get(s).copied().unwrap_or(3)))
            .expect("size")
    };
    g.topo_order()
        .into_iter()
        .filter(|&id| matches!(g.node(id).op, vlmc::ir::Op::MatMul))
        .map(|id| {
            let out: i64 = g.node(id).ty.shape.0.iter().map(size).product();
            let a = &g.node(g.operands(id)[0]).ty.shape.0;
            out * size(&a[a.len() - 1])
        })
        .sum()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (x, y) = (a.to_f64(), b.to_f64());
    let scale = y.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    x.iter()
        .zip(&y)
        .map(|(p, q)| (p - q).abs())
        .fold(0f64, f64::max)
        / scale
}

fn assert_same_outputs(
    before: &vlmc::ir::Graph,
    after: &vlmc::ir::Graph,
    m: &Elaborated,
    params: &BTreeMap<String, Tensor>,
    tol: f64,
) {
    let ins = inputs(m);
    let a = vlmc_runtime::run(before, &ins, params).expect("runs before");
    let b = vlmc_runtime::run(after, &ins, params).expect("runs after");
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, t) in &a {
        assert_eq!(t.shape, b[name].shape, "{name}");
        let e = max_rel(&b[name], t);
        assert!(e <= tol, "{}: output `{name}` changed by {e:e}", m.model);
    }
}

#[test]
fn ir_before_and_after_every_pass() {
    insta::glob!("passes/*.vlm", |path| {
        let m = elaborate(path);
        let c = compile(
            &m,
            &CompileOptions {
                adapter: None,
                print_after: vec!["all".into()],
            },
        )
        .expect("compiles");
        let mut text = format!("; before\n{}", vlmc::ir::text::print(&m.graph));
        for (pass, ir) in &c.log.printed {
            text.push_str(&format!("; after {pass}\n{ir}"));
        }
        text.push_str("; kernels\n");
        text.push_str(&fusion::print_grouped(&c.graph, &c.fusion));
        insta::assert_snapshot!(text);
    });
}

#[test]
fn passes_preserve_outputs_on_every_model() {
    let mut files: Vec<_> = std::fs::read_dir("models")
        .expect("models")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "vlm"))
        .filter(|p| {
            p.file_stem()
                .is_some_and(|s| s == "llava_tiny" || s == "clip_tiny")
        })
        .collect();
    files.extend(
        std::fs::read_dir("tests/passes")
            .expect("tests/passes")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "vlm")),
    );
    for path in files {
        let m = elaborate(&path);
        let params = vlmc_runtime::init::init_params(&m.graph, 5).expect("init");
        let c = compile(&m, &CompileOptions::default()).expect("compiles");
        // passes may add nodes (a slice sunk below an add slices both operands), never work
        assert!(
            matmul_work(&c.graph) <= matmul_work(&m.graph),
            "{}: more multiply-adds after the passes",
            path.display()
        );
        assert_same_outputs(&m.graph, &c.graph, &m, &params, 1e-6);
    }
}

#[test]
fn lora_merge_is_exact_and_costs_nothing_per_run() {
    let m = elaborate(Path::new("models/llava_tiny.vlm"));
    // The unmerged adapted model: base weights from init, adapter weights non-zero.
    let mut adapted = m.graph.clone();
    let cfg = vlmc::passes::lora::LoraConfig {
        rank: 8,
        alpha: 16.0,
        rslora: false,
    };
    let n = vlmc::passes::lora::apply(&mut adapted, &m.adapters[0].targets, &cfg)
        .expect("lora applies");
    assert_eq!(n, 4, "q_proj and v_proj of two decoder layers");
    let mut params = vlmc_runtime::init::init_params(&adapted, 9).expect("init");
    for (name, t) in params.iter_mut() {
        if name.contains("lora_B") {
            // B starts at zero: give it values so the adapter changes the output.
            let v: Vec<f32> = (0..t.numel())
                .map(|i| ((i % 17) as f32 - 8.0) * 0.01)
                .collect();
            *t = Tensor::f32(t.shape.clone(), v);
        }
    }
    let c = compile(
        &m,
        &CompileOptions {
            adapter: Some("lora_qv".into()),
            print_after: vec![],
        },
    )
    .expect("compiles");
    assert!(c
        .log
        .steps
        .iter()
        .any(|(p, changed, _)| *p == "lora-merge" && *changed));
    assert_same_outputs(&adapted, &c.graph, &m, &params, 1e-5);
    // The adapter changed the model (the check above is not vacuous).
    let ins = inputs(&m);
    let base = vlmc_runtime::run(&m.graph, &ins, &params).expect("base runs");
    let merged = vlmc_runtime::run(&c.graph, &ins, &params).expect("merged runs");
    assert!(max_rel(&merged["output"], &base["output"]) > 1e-4);
    // Per run, the merged model has no adapter ops: everything under `.lora` is load-time.
    for id in c.graph.node_ids() {
        let node = c.graph.node(id);
        if node.scope.contains(".lora") {
            assert!(
                c.fusion.load_time.contains(&id),
                "per-run adapter op left: {}",
                node.op.name()
            );
        }
    }
    // And it costs exactly what the base model costs.
    let dims = HashMap::from([("B".to_string(), 2), ("T".to_string(), 5)]);
    let base_c = compile(&m, &CompileOptions::default()).expect("base compiles");
    let flops = |c: &vlmc::passes::Compiled| {
        let mem = vlmc::passes::memory::plan(&c.graph, &c.fusion, &dims);
        vlmc::report::report(&c.graph, &c.fusion, &mem, None, &dims).expect("report")
    };
    let (rb, rm) = (flops(&base_c), flops(&c));
    assert_eq!(rb.flops, rm.flops, "per-run FLOPs");
    assert_eq!(rb.kernels, rm.kernels, "kernels");
    assert!(rm.load_time_flops > 0);
}

#[test]
fn fusion_of_minilm_and_llava_tiny() {
    for (file, dims) in [
        ("models/minilm.vlm", [("B", 8), ("T", 128)]),
        ("models/llava_tiny.vlm", [("B", 1), ("T", 32)]),
    ] {
        let m = elaborate(Path::new(file));
        let c = compile(&m, &CompileOptions::default()).expect("compiles");
        let dims: HashMap<String, i64> = dims.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let mem = vlmc::passes::memory::plan(&c.graph, &c.fusion, &dims);
        let r = vlmc::report::report(&c.graph, &c.fusion, &mem, None, &dims).expect("report");
        let kinds: Vec<String> = c
            .fusion
            .groups
            .iter()
            .map(|g| {
                let kind = match &g.anchor {
                    fusion::Anchor::Pointwise => "pointwise".to_string(),
                    fusion::Anchor::Rows { axis, .. } => format!("rows{axis}"),
                    fusion::Anchor::Contraction => "matmul".to_string(),
                    fusion::Anchor::Scatter => "scatter".to_string(),
                };
                format!("{kind}:{}", g.nodes.len())
            })
            .collect();
        assert!(r.peak_bytes < r.naive_bytes, "reuse saves memory");
        insta::assert_snapshot!(
            format!("fusion_{}", m.model),
            format!("{}kernels: {}\n", r.text(&m.model, &dims), kinds.join(" "))
        );
    }
}
