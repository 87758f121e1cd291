//! The commands behind the `vlmc` binary: `check` and `build`. Diagnostics go to stderr,
//! artefacts are written to a temporary name and renamed into place.

pub mod adapter;
pub mod bench;
pub mod bench_train;
pub mod cuda;
pub mod export;
pub mod generate;
pub mod plot;
pub mod progress;
pub mod train;

use std::path::{Path, PathBuf};
use std::time::Instant;
use vlmc::elab::{check_file, Checked, Elaborated};

/// Artefacts `vlmc build --emit` can write.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Emit {
    /// The parsed syntax tree (`<model>.ast`).
    Ast,
    /// The graph IR text form (`<model>.ir`).
    Ir,
    /// A Graphviz picture of the graph (`<model>.dot`, and `.svg` when `dot` is installed).
    Dot,
    /// A block-level picture: one box per block (`<model>.blocks.dot`, and `.svg`).
    Blocks,
    /// The IR after the optimisation passes, kernels marked (`<model>.opt.ir`).
    Opt,
    /// Parameters, FLOPs, kernels and planned memory (`<model>.report.txt`, also on stdout).
    Report,
    /// The kernel IR of every fused kernel and the buffer plan, at `--dims` (`<model>.kernels`).
    Kernels,
    /// The Cranelift IR of every compiled CPU loop nest, at `--dims` (`<model>.clif`).
    Clif,
    /// CUDA C of every kernel, the launch plan and (with NVRTC) the compiled module, at `--dims`
    /// (`cuda/`).
    Cuda,
}

/// Compilation options of `vlmc build`.
#[derive(Clone, Default)]
pub struct BuildOptions {
    /// An adapter of the spec to apply and merge (`--adapter`).
    pub adapter: Option<String>,
    /// Passes after which to write the IR (`--print-after`, `all` for every pass).
    pub print_after: Vec<String>,
    /// Sizes of the symbolic dims for the report (`--dims B=8,T=128`).
    pub dims: Vec<(String, i64)>,
    /// Compile CPU kernels without the disk cache (`--no-cache`).
    pub no_cache: bool,
}

/// The CPU code generation options of the command line: the disk cache unless `no_cache` (or
/// `$VLMC_NO_CACHE`) says otherwise.
pub fn cpu_options(no_cache: bool) -> vlmc::backend::cpu::CpuOptions {
    match no_cache {
        true => vlmc::backend::cpu::CpuOptions::default(),
        false => vlmc::backend::cpu::CpuOptions::with_disk_cache(),
    }
}

/// One line about a compiled program: functions, time, what the disk cache did.
pub fn codegen_summary(p: &vlmc::backend::cpu::CpuProgram) -> String {
    let c = &p.cache;
    let cache = match c.hits + c.misses {
        0 => "no disk cache".to_string(),
        _ => format!(
            "{} from the disk cache, {} compiled{}",
            c.hits,
            c.misses,
            match c.rejected {
                0 => String::new(),
                n => format!(", {n} invalid entries replaced"),
            }
        ),
    };
    format!(
        "{} functions in {:.0} ms ({cache})",
        p.functions,
        p.compile_time.as_secs_f64() * 1e3
    )
}

/// `vlmc check FILE...`: exit status 0 when every file is valid, 1 otherwise.
pub fn check(files: &[PathBuf]) -> Result<(), u8> {
    let mut failed = 0;
    for f in files {
        let checked = check_file(f);
        match &checked.result {
            Ok(models) => {
                let summary: Vec<String> = models
                    .iter()
                    .map(|m| {
                        format!(
                            "{} ({} ops, {} parameters)",
                            m.model,
                            m.graph.len(),
                            param_count(m)
                        )
                    })
                    .collect();
                if summary.is_empty() {
                    eprintln!("ok: {}", f.display());
                } else {
                    eprintln!("ok: {}: {}", f.display(), summary.join(", "));
                }
            }
            Err(_) => {
                failed += 1;
                eprint!("{}", checked.render());
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} file(s) failed", files.len());
        Err(1)
    } else {
        Ok(())
    }
}

/// The number of scalar parameters of a model, as text (symbolic sizes print as expressions).
pub fn param_count(m: &Elaborated) -> String {
    let mut total = vlmc::ir::Dim::c(0);
    for (_, _, ty, _) in m.graph.params() {
        if let Some(n) = ty.shape.numel() {
            if let Some(t) = total.checked_add(&n) {
                total = t;
            }
        }
    }
    total.to_string()
}

/// Which model of a file to use, and compile-time parameters set from the command line.
#[derive(Clone, Copy, Default)]
pub struct Pick<'a> {
    /// The model's name (default: the last model of the file).
    pub model: Option<&'a str>,
    /// `--set NAME=VALUE` pairs.
    pub sets: &'a [(String, String)],
}

/// The model named `model` (or the last one), or an error message on stderr.
fn pick<'a>(
    models: &'a [Elaborated],
    model: Option<&str>,
    file: &Path,
) -> Result<&'a Elaborated, u8> {
    let chosen = match model {
        Some(name) => models.iter().find(|m| m.model == name),
        None => models.last(),
    };
    chosen.ok_or_else(|| {
        match model {
            Some(name) => eprintln!("error: {} has no model `{name}`", file.display()),
            None => eprintln!("error: {} declares no model", file.display()),
        }
        1
    })
}

/// Checks `file` with the overrides, printing diagnostics on failure.
fn checked_ok(file: &Path, sets: &[(String, String)]) -> Result<Checked, u8> {
    let checked = vlmc::elab::check_file_with(file, sets);
    if checked.result.is_err() {
        eprint!("{}", checked.render());
        return Err(1);
    }
    Ok(checked)
}

/// Elaborates `file` and picks a model (by name, or the last one).
pub(crate) fn load_model(file: &Path, p: &Pick<'_>) -> Result<Elaborated, u8> {
    let checked = checked_ok(file, p.sets)?;
    let models = checked.result.unwrap_or_default();
    let name = pick(&models, p.model, file)?.model.clone();
    models.into_iter().find(|m| m.model == name).ok_or(1)
}

/// `vlmc build FILE --emit ...`: writes the artefacts of one model into `out`.
pub fn build(file: &Path, p: &Pick<'_>, emit: &[Emit], out: Option<&Path>) -> Result<(), u8> {
    build_with(file, p, emit, out, &BuildOptions::default())
}

/// `vlmc build` with compilation options.
pub fn build_with(
    file: &Path,
    p: &Pick<'_>,
    emit: &[Emit],
    out: Option<&Path>,
    opts: &BuildOptions,
) -> Result<(), u8> {
    let checked = checked_ok(file, p.sets)?;
    let models = checked.result.as_deref().unwrap_or_default();
    let m = pick(models, p.model, file)?;
    check_dims(&[&m.graph], &opts.dims).map_err(|e| {
        eprintln!("error: {e}");
        1u8
    })?;
    let dir = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("build").join(&m.model));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("error: cannot create {}: {e}", dir.display());
        return Err(1);
    }
    let needs_compile = emit
        .iter()
        .any(|e| matches!(e, Emit::Opt | Emit::Report | Emit::Kernels | Emit::Clif))
        || opts.adapter.is_some()
        || !opts.print_after.is_empty();
    let compiled = if needs_compile {
        let copts = vlmc::passes::CompileOptions {
            adapter: opts.adapter.clone(),
            print_after: opts.print_after.clone(),
        };
        let t0 = Instant::now();
        let c = vlmc::passes::compile(m, &copts).map_err(|e| {
            eprintln!("error: {e}");
            1u8
        })?;
        eprintln!(
            "compiled {}: {} ops -> {} ops, {} kernels in {:.0} ms",
            m.model,
            m.graph.len(),
            c.graph.len(),
            c.fusion.groups.len(),
            ms(t0)
        );
        Some(c)
    } else {
        None
    };
    let mut files: Vec<(String, String)> = Vec::new();
    for e in emit {
        let (ext, text) = match (e, &compiled) {
            (Emit::Ast, _) => ("ast", ast_text(&checked)),
            (Emit::Ir, _) => ("ir", vlmc::ir::text::print(&m.graph)),
            (Emit::Dot, _) => ("dot", vlmc::ir::to_dot(&m.graph)),
            (Emit::Blocks, _) => ("blocks.dot", vlmc::ir::to_block_dot(&m.graph, 2)),
            (Emit::Opt, Some(c)) => (
                "opt.ir",
                vlmc::passes::fusion::print_grouped(&c.graph, &c.fusion),
            ),
            (Emit::Report, Some(c)) => {
                let dims: std::collections::HashMap<String, i64> =
                    opts.dims.iter().cloned().collect();
                let mem = vlmc::passes::memory::plan(&c.graph, &c.fusion, &dims);
                let trainable: Option<Vec<String>> = opts.adapter.as_ref().map(|_| {
                    c.graph
                        .params()
                        .iter()
                        .map(|(_, p, _, _)| p.to_string())
                        .filter(|p| p.contains(".lora_"))
                        .collect()
                });
                let r =
                    vlmc::report::report(&c.graph, &c.fusion, &mem, trainable.as_deref(), &dims)
                        .map_err(|e| {
                            eprintln!("error: {e}");
                            1u8
                        })?;
                let text = r.text(&m.model, &dims);
                print!("{text}");
                ("report.txt", text)
            }
            (Emit::Kernels, Some(c)) => {
                let dims: std::collections::HashMap<String, i64> =
                    opts.dims.iter().cloned().collect();
                let mem = vlmc::passes::memory::plan(&c.graph, &c.fusion, &dims);
                check_fits(&mem, &m.model)?;
                match vlmc::kernel::lower(&c.graph, &c.fusion, &mem, &dims) {
                    Ok(plan) => ("kernels", plan.to_string()),
                    Err(e) => {
                        eprintln!("error: cannot lower {} to kernels: {e} (are all dims given with --dims?)", m.model);
                        return Err(1);
                    }
                }
            }
            (Emit::Clif, Some(c)) => {
                let dims: std::collections::HashMap<String, i64> =
                    opts.dims.iter().cloned().collect();
                let t0 = Instant::now();
                let mem = vlmc::passes::memory::plan(&c.graph, &c.fusion, &dims);
                check_fits(&mem, &m.model)?;
                let cpu = vlmc::kernel::LowerOptions::cpu();
                let plan = vlmc::kernel::lower_with(&c.graph, &c.fusion, &mem, &dims, cpu)
                    .map_err(|e| {
                        eprintln!(
                        "error: cannot lower {} to kernels: {e} (are all dims given with --dims?)",
                        m.model
                    );
                        1u8
                    })?;
                eprintln!(
                    "lowered {} to {} kernels in {:.0} ms",
                    m.model,
                    plan.kernels.len(),
                    ms(t0)
                );
                let copts = vlmc::backend::cpu::CpuOptions {
                    clif: true,
                    ..cpu_options(opts.no_cache)
                };
                match vlmc::backend::cpu::compile(&plan, &copts) {
                    Ok(mut p) => {
                        eprintln!("compiled {}", codegen_summary(&p));
                        ("clif", std::mem::take(&mut p.clif))
                    }
                    Err(e) => {
                        eprintln!("error: CPU code generation for {}: {e}", m.model);
                        return Err(1);
                    }
                }
            }
            _ => continue,
        };
        files.push((ext.to_string(), text));
    }
    if let Some(c) = &compiled {
        for (pass, text) in &c.log.printed {
            files.push((format!("after-{pass}.ir"), text.clone()));
        }
    }
    for (ext, _) in &files {
        let path = dir.join(format!("{}.{ext}", m.model));
        check_output(&path, &[("the model file", file)])?;
    }
    for (ext, text) in files {
        let path = dir.join(format!("{}.{ext}", m.model));
        if let Err(err) = write_atomic(&path, text.as_bytes()) {
            eprintln!("error: cannot write {}: {err}", path.display());
            return Err(1);
        }
        eprintln!("wrote {}", path.display());
        if ext.ends_with("dot") {
            render_svg(&path);
        }
    }
    Ok(())
}

/// Lowering lays the memory plan out in this machine's address space: an error when the plan at
/// these sizes does not fit it (the figures of `--emit report` are exact even then).
fn check_fits(mem: &vlmc::passes::memory::MemoryPlan, model: &str) -> Result<(), u8> {
    if mem.fits() {
        return Ok(());
    }
    eprintln!(
        "error: cannot lower {model} to kernels: its activation memory at these sizes ({}) does \
         not fit a 64-bit address space",
        mem.peak
            .map_or("too much to count".into(), vlmc_runtime::alloc::human_bytes)
    );
    Err(1)
}

fn ast_text(checked: &Checked) -> String {
    checked
        .program
        .modules
        .first()
        .map(|m| vlmc_grammar::ast::tree_text(&m.ast))
        .unwrap_or_default()
}

/// Runs Graphviz `dot -Tsvg` next to a `.dot` file when it is installed.
fn render_svg(dot_path: &Path) {
    let svg = dot_path.with_extension("svg");
    let tmp = dot_path.with_extension(format!("svg.tmp{}", std::process::id()));
    let status = std::process::Command::new("dot")
        .arg("-Tsvg")
        .arg(dot_path)
        .arg("-o")
        .arg(&tmp)
        .status();
    match status {
        Ok(s) if s.success() => {
            if std::fs::rename(&tmp, &svg).is_ok() {
                eprintln!("wrote {}", svg.display());
            }
        }
        Ok(_) => {
            let _ = std::fs::remove_file(&tmp);
            eprintln!("warning: graphviz `dot` failed; only the .dot file was written");
        }
        Err(_) => eprintln!("note: install graphviz (`dot`) to also get an SVG picture"),
    }
}

/// Writes a file atomically (a temporary name unique to the process, synced, renamed into
/// place; symlinks written through; directories, FIFOs and device nodes other than
/// `/dev/null` refused): [`vlmc::files::write_atomic`], shared with the runtime.
pub use vlmc::files::write_atomic;

/// `vlmc init FILE --seed N -o W`: every parameter from its init rule, saved as safetensors.
pub fn init(file: &Path, p: &Pick<'_>, seed: u64, out: Option<&Path>) -> Result<(), u8> {
    let m = load_model(file, p)?;
    let path = out.map(Path::to_path_buf).unwrap_or_else(|| {
        PathBuf::from("build")
            .join(&m.model)
            .join("init.safetensors")
    });
    check_output(&path, &[("the model file", file)])?;
    let t0 = Instant::now();
    let params = vlmc_runtime::init::init_params(&m.graph, seed).map_err(|e| {
        eprintln!("error: {e}");
        1
    })?;
    vlmc_runtime::weights::save(&path, &params).map_err(|e| {
        eprintln!("error: {e}");
        1
    })?;
    let n: usize = params.values().map(|t| t.numel()).sum();
    eprintln!(
        "wrote {} ({} tensors, {n} parameters, seed {seed}) in {:.0} ms",
        path.display(),
        params.len(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// What `vlmc run` needs besides the model file.
pub struct RunArgs<'a> {
    pub pick: Pick<'a>,
    /// `--weights`: files, an index or a folder (see [`vlmc_runtime::weight_set`]).
    pub weights: &'a [PathBuf],
    /// A PEFT LoRA adapter to run on top of the weights, unmerged (`--adapter`).
    pub adapter: Option<&'a Path>,
    /// Apply the adapter to weights other than those it records as its base.
    pub allow_other_base: bool,
    /// `--input NAME=VALUE` pairs, in order.
    pub inputs: &'a [(String, String)],
    pub tokenizer: Option<&'a Path>,
    pub out: Option<&'a Path>,
    /// Run the reference interpreter instead of the compiled CPU code (`--interp`).
    pub interp: bool,
    /// Compile without the disk cache of CPU kernels (`--no-cache`).
    pub no_cache: bool,
}

/// `vlmc run FILE --weights W --input ...`: runs the model's forward, compiled to machine code
/// (or with the reference interpreter: `--interp`); prints a summary of each output on stdout
/// and saves them as safetensors.
pub fn run(file: &Path, args: &RunArgs<'_>) -> Result<(), u8> {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        1u8
    };
    let t0 = Instant::now();
    let mut m = load_model(file, &args.pick)?;
    eprintln!(
        "elaborated {} ({} ops) in {:.0} ms",
        m.model,
        m.graph.len(),
        ms(t0)
    );
    let path = args.out.map(Path::to_path_buf).unwrap_or_else(|| {
        PathBuf::from("build")
            .join(&m.model)
            .join("outputs.safetensors")
    });
    let dir = &vlmc_runtime::weight_set::tokenizer_dir(args.weights);
    check_run_output(
        &path,
        file,
        args.weights,
        args.inputs,
        &args
            .tokenizer
            .map_or_else(|| dir.join("tokenizer.json"), Path::to_path_buf),
    )?;
    let t1 = Instant::now();
    adapter::check_output(&path, args.adapter).map_err(|e| fail(&e))?;
    let bound = adapter::bind_for_run(
        file,
        &mut m,
        args.weights,
        args.adapter,
        args.allow_other_base,
    )
    .map_err(|e| fail(&e))?;
    if !bound.unused.is_empty() {
        let shown: Vec<&str> = bound.unused.iter().take(8).map(String::as_str).collect();
        eprintln!(
            "warning: {} tensor(s) in {} are not used: {}{}",
            bound.unused.len(),
            adapter::shown(args.weights),
            shown.join(", "),
            if bound.unused.len() > 8 { ", ..." } else { "" }
        );
    }
    eprintln!(
        "bound {} parameters in {:.0} ms",
        bound.params.len(),
        ms(t1)
    );
    let inputs = gather_inputs(&m, args.inputs, dir, args.tokenizer).map_err(|e| fail(&e))?;
    let outputs = if args.interp {
        let t2 = Instant::now();
        let o = vlmc_runtime::run(&m.graph, &inputs, &bound.params).map_err(|e| fail(&e))?;
        eprintln!("ran the interpreter in {:.0} ms", ms(t2));
        o
    } else {
        let t2 = Instant::now();
        let c = vlmc::passes::compile(&m, &vlmc::passes::CompileOptions::default())
            .map_err(|e| fail(&e))?;
        let model = vlmc_runtime::cpu::CpuModel::new(c, bound.params, cpu_options(args.no_cache));
        let plan = model.plan_for(&inputs).map_err(|e| fail(&e))?;
        eprintln!(
            "compiled {} kernels to machine code in {:.0} ms: {}",
            plan.program.kernels.len(),
            ms(t2),
            codegen_summary(&plan.program)
        );
        let t3 = Instant::now();
        let o = plan.run(&inputs, &model.params).map_err(|e| fail(&e))?;
        eprintln!("ran the compiled CPU code in {:.1} ms", ms(t3));
        o
    };
    for (name, t) in &outputs {
        println!("{name}: {t}");
    }
    vlmc_runtime::weights::save(&path, &outputs).map_err(|e| fail(&e))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The inputs of `m` from `--input` pairs (files, texts, images): unknown names are errors.
pub fn gather_inputs(
    m: &Elaborated,
    pairs: &[(String, String)],
    tokenizer_dir: &Path,
    tokenizer: Option<&Path>,
) -> Result<std::collections::BTreeMap<String, vlmc_runtime::Tensor>, String> {
    let names: Vec<&str> = m.graph.inputs().into_iter().map(|(_, n, _)| n).collect();
    vlmc_runtime::inputs::gather_inputs(pairs, &names, &m.preprocess, tokenizer_dir, tokenizer)
        .map_err(|e| e.message)
}

/// Fails (with the message on stderr) unless `out` can be written: it must not be one of
/// `inputs` (each with what it is, e.g. "the weights (--weights)"), and when it exists it
/// must be a regular file (or a symlink to one, or `/dev/null`).
pub fn check_output(out: &Path, inputs: &[(&str, &Path)]) -> Result<(), u8> {
    let fail = |e: String| {
        eprintln!("error: {e}");
        1u8
    };
    vlmc::files::destination(out)
        .map_err(|e| fail(format!("cannot write {}: {e}", out.display())))?;
    vlmc::files::refuse_overwriting(out, inputs).map_err(fail)
}

/// [`check_output`] for `vlmc run`'s outputs: not the model file, the weights, an input file or
/// image, or the tokenizer.
pub fn check_run_output(
    out: &Path,
    file: &Path,
    weights: &[PathBuf],
    pairs: &[(String, String)],
    tokenizer: &Path,
) -> Result<(), u8> {
    let roles: Vec<(String, &Path)> = pairs
        .iter()
        .filter(|(k, _)| k != "text")
        .map(|(k, v)| {
            let (path, _) = vlmc_runtime::inputs::split_input_value(v);
            (format!("the input `{k}` (--input {k}=...)"), path)
        })
        .collect();
    let weight_files = vlmc_runtime::weight_set::files_of(weights);
    let mut inputs: Vec<(&str, &Path)> = weight_files
        .iter()
        .map(|w| ("the weights (--weights)", w.as_path()))
        .collect();
    inputs.extend([("the model file", file), ("the tokenizer", tokenizer)]);
    inputs.extend(roles.iter().map(|(r, p)| (r.as_str(), *p)));
    check_output(out, &inputs)
}

/// [`check_output`] for what `vlmc train` writes into its folder (`model.safetensors`,
/// `log.jsonl`, the adapter, for every stage of a chain): none may be an input of the run.
pub fn check_train_outputs(
    out_dir: &Path,
    stages: &[String],
    inputs: &[(&str, &Path)],
) -> Result<(), u8> {
    let mut dirs = vec![out_dir.to_path_buf()];
    dirs.extend(stages.iter().map(|s| out_dir.join(s)));
    for d in &dirs {
        for f in [
            "model.safetensors",
            "log.jsonl",
            "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json",
        ] {
            check_output(&d.join(f), inputs)?;
        }
    }
    Ok(())
}

/// `vlmc train`'s outputs (for every stage) must not be its inputs: the model file, the
/// weights, the data, the evaluation data, the tokenizer.
pub fn check_train_paths(
    a: &train::TrainArgs,
    stages: &[String],
    data: &std::collections::BTreeMap<String, std::path::PathBuf>,
) -> Result<(), u8> {
    let mut inputs: Vec<(&str, &Path)> = vec![("the model file", &a.file)];
    for d in data.values() {
        inputs.push(("the training data (--data)", d));
    }
    let weight_files = vlmc_runtime::weight_set::files_of(&a.weights);
    for w in &weight_files {
        inputs.push(("the starting weights (--weights)", w));
    }
    if let Some(e) = &a.eval_data {
        inputs.push(("the evaluation data (--eval-data)", e));
    }
    if let Some(t) = &a.tokenizer {
        inputs.push(("the tokenizer (--tokenizer)", t));
    }
    check_train_outputs(&a.out, stages, &inputs)
}

/// `vlmc merge`'s output must not be the base weights, the adapter's files or the model file.
pub fn check_merge_paths(a: &train::MergeArgs) -> Result<(), u8> {
    let adapter = a.adapter.join("adapter_model.safetensors");
    let config = a.adapter.join("adapter_config.json");
    let weight_files = vlmc_runtime::weight_set::files_of(&a.weights);
    let mut inputs: Vec<(&str, &Path)> = weight_files
        .iter()
        .map(|w| ("the base weights (--weights)", w.as_path()))
        .collect();
    inputs.extend([
        ("the adapter's weights", adapter.as_path()),
        ("the adapter's configuration", &config),
        ("the model file", &a.file),
    ]);
    check_output(&a.out, &inputs)
}

/// The largest size a symbolic dimension may be given (`--dims`).
pub const MAX_DIM: i64 = i32::MAX as i64;

fn is_identifier(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// Parses `NAME=SIZE` for `--dims`: a dimension name and a whole number from 0 to
/// [`MAX_DIM`]; the error names the dimension and says what is wrong with its size.
pub fn parse_dim(s: &str) -> Result<(String, i64), String> {
    let Some((k, v)) = s.split_once('=') else {
        return Err(format!("expected NAME=SIZE (e.g. B=8), got `{s}`"));
    };
    let (k, v) = (k.trim(), v.trim());
    if !is_identifier(k) {
        return Err(format!(
            "`{k}` is not a dimension name (expected NAME=SIZE, e.g. B=8; got `{s}`)"
        ));
    }
    if v.is_empty() {
        return Err(format!("dimension {k} has no size (expected {k}=SIZE)"));
    }
    let digits = v.strip_prefix(['-', '+']).unwrap_or(v);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "dimension {k}: `{v}` is not a size (expected a whole number from 0 to {MAX_DIM})"
        ));
    }
    let nonzero = digits.bytes().any(|b| b != b'0');
    if v.starts_with('-') && nonzero {
        return Err(format!("dimension {k} = {v}: a size cannot be negative"));
    }
    match digits.parse::<i64>() {
        Ok(n) if n <= MAX_DIM => Ok((k.to_string(), n)),
        _ => Err(format!(
            "dimension {k} = {v} is too large (a size is at most {MAX_DIM})"
        )),
    }
}

/// Parses `NAME=VALUE` (for `--input`): a non-empty name; the value may be empty (`text=`).
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got `{s}`")),
    }
}

/// Parses `NAME=VALUE` for `--set`: a parameter name (an identifier) and a value: a number
/// (integers must fit in 64 bits, floats must be finite), `true`/`false`, a quoted string or
/// a name.
pub fn parse_set(s: &str) -> Result<(String, String), String> {
    let Some((k, v)) = s.split_once('=') else {
        return Err(format!("expected NAME=VALUE (e.g. dim=64), got `{s}`"));
    };
    let (k, v) = (k.trim(), v.trim());
    if !is_identifier(k) {
        return Err(format!(
            "`{k}` is not a parameter name (expected NAME=VALUE, e.g. dim=64; got `{s}`)"
        ));
    }
    if v.is_empty() {
        return Err(format!("parameter {k} has no value (expected {k}=VALUE)"));
    }
    if v.chars().any(char::is_control) {
        return Err(format!("the value of {k} holds a control character"));
    }
    if v.starts_with('"') && (v.len() < 2 || !v.ends_with('"')) {
        return Err(format!("the value of {k} is an unterminated string: {v}"));
    }
    let numeric = v
        .trim_start_matches(['-', '+'])
        .starts_with(|c: char| c.is_ascii_digit() || c == '.');
    if v.parse::<i64>().is_err() {
        let digits = v.strip_prefix(['-', '+']).unwrap_or(v);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "{k} = {v}: the integer is out of range (at most {} in magnitude)",
                i64::MAX
            ));
        }
        match v.parse::<f64>() {
            Ok(f) if !f.is_finite() => {
                return Err(format!("{k} = {v}: the value is not a finite number"))
            }
            Err(_) if numeric => return Err(format!("{k} = {v}: not a number")),
            _ => {}
        }
    }
    Ok((k.to_string(), v.to_string()))
}

/// The symbolic dimensions the graphs' values use, sorted.
pub fn known_dims(graphs: &[&vlmc::ir::Graph]) -> Vec<String> {
    let mut names = std::collections::BTreeSet::new();
    for g in graphs {
        for id in g.node_ids() {
            for d in &g.node(id).ty.shape.0 {
                for s in d.symbols() {
                    names.insert(s.to_string());
                }
            }
        }
    }
    names.into_iter().collect()
}

/// An error when `--dims` names a dimension twice; a warning (printed) for each dimension the
/// model does not have, which is ignored: one set of sizes can serve several models (as in
/// `tests/bench/compile.sh`), but a misspelt name is said.
pub fn check_dims(graphs: &[&vlmc::ir::Graph], dims: &[(String, i64)]) -> Result<(), String> {
    let known = known_dims(graphs);
    for (i, (k, _)) in dims.iter().enumerate() {
        if dims[..i].iter().any(|(p, _)| p == k) {
            return Err(format!("--dims gives dimension {k} twice"));
        }
        if !known.contains(k) {
            eprintln!(
                "warning: --dims {k}=...: the model has no dimension {k} (ignored); its \
                 dimensions are: {}",
                match known.is_empty() {
                    true => "none (every size is fixed)".to_string(),
                    false => known.join(", "),
                }
            );
        }
    }
    Ok(())
}
