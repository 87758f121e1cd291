//! The CUDA backend from the command line: `vlmc build --target cuda --emit cuda` (CUDA C, the
//! launch plan and, where NVRTC is found, the compiled module) and `vlmc run --target cuda`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use vlmc::backend::cuda::{self, nvrtc};
use vlmc::elab::Elaborated;

/// Where a model runs (`--target`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, clap::ValueEnum)]
pub enum Target {
    /// Compiled CPU code (or the interpreter with `--interp`).
    #[default]
    Cpu,
    /// An NVIDIA GPU: CUDA C compiled with NVRTC.
    Cuda,
}

fn fail(e: &dyn std::fmt::Display) -> u8 {
    eprintln!("error: {e}");
    1
}

/// Elaborates `file` with `sets` and picks `model` (default: the last one).
fn load(file: &Path, model: Option<&str>, sets: &[(String, String)]) -> Result<Elaborated, u8> {
    let checked = vlmc::elab::check_file_with(file, sets);
    if checked.result.is_err() {
        eprint!("{}", checked.render());
        return Err(1);
    }
    let models = checked.result.unwrap_or_default();
    let found = match model {
        Some(name) => models.into_iter().find(|m| m.model == name),
        None => models.into_iter().last(),
    };
    found.ok_or_else(|| {
        match model {
            Some(name) => eprintln!("error: {} has no model `{name}`", file.display()),
            None => eprintln!("error: {} declares no model", file.display()),
        }
        1
    })
}

/// What `vlmc build --emit cuda` needs.
pub struct EmitArgs<'a> {
    pub model: Option<&'a str>,
    pub sets: &'a [(String, String)],
    /// Sizes of the symbolic dims (`--dims`).
    pub dims: &'a [(String, i64)],
    /// The GPU architecture to compile for (`--arch`, default sm_80).
    pub arch: Option<&'a str>,
    /// The output directory (default build/<model>/); files go to its `cuda/` folder.
    pub out: Option<&'a Path>,
}

/// `vlmc build FILE --target cuda --emit cuda`: one `.cu` file per kernel, the whole module
/// (`module.cu`) and the launch plan (`launch.txt`); then, when NVRTC is found, the module
/// compiled for `--arch` (`module.sm_XY.cubin`). An NVRTC error names the kernel.
pub fn emit(file: &Path, a: &EmitArgs<'_>) -> Result<(), u8> {
    let arch = a.arch.unwrap_or("sm_80");
    if !nvrtc::valid_arch(arch) {
        eprintln!("error: `--arch {arch}` is not a GPU architecture (expected sm_XY, e.g. sm_80)");
        return Err(1);
    }
    let m = load(file, a.model, a.sets)?;
    let dims: HashMap<String, i64> = a.dims.iter().cloned().collect();
    let t0 = Instant::now();
    let c = vlmc::passes::compile(&m, &vlmc::passes::CompileOptions::default())
        .map_err(|e| fail(&e))?;
    let mem = vlmc::passes::memory::plan(&c.graph, &c.fusion, &dims);
    let plan = vlmc::kernel::lower(&c.graph, &c.fusion, &mem, &dims).map_err(|e| {
        eprintln!(
            "error: cannot lower {} to kernels: {e} (are all dims given with --dims?)",
            m.model
        );
        1u8
    })?;
    let program = cuda::generate(&plan, &cuda::Options::default()).map_err(|e| fail(&e))?;
    let dir = a
        .out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("build").join(&m.model))
        .join("cuda");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("error: cannot create {}: {e}", dir.display());
        return Err(1);
    }
    // Kernels of an earlier build at other sizes would mislead.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "cu" || x == "cubin") {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let sizes: Vec<String> = a.dims.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let title = format!("{} at {}", m.model, sizes.join(", "));
    let mut files = program.files();
    files.push(("module.cu".into(), program.module_source().0));
    files.push(("launch.txt".into(), program.launch_text(&plan, &title)));
    for (name, text) in &files {
        let path = dir.join(name);
        crate::write_atomic(&path, text.as_bytes()).map_err(|e| {
            eprintln!("error: cannot write {}: {e}", path.display());
            1u8
        })?;
    }
    eprintln!(
        "wrote {} kernel files, module.cu and launch.txt ({} launches, {} of them cuBLAS) to {} in {:.0} ms",
        files.len() - 2,
        program.launches.len(),
        program.gemm_count(),
        dir.display(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    if let Err(e) = nvrtc::available() {
        eprintln!("note: not compiled: {e}");
        return Ok(());
    }
    let t1 = Instant::now();
    let bin =
        nvrtc::compile_program(&program, &nvrtc::NvrtcOptions::new(arch)).map_err(|e| fail(&e))?;
    let path = dir.join(format!("module.{arch}.cubin"));
    crate::write_atomic(&path, &bin.cubin).map_err(|e| fail(&e))?;
    eprintln!(
        "compiled {} kernels for {arch} with NVRTC{} in {:.0} ms: {}",
        program.function_count(),
        if bin.cached { " (cached)" } else { "" },
        t1.elapsed().as_secs_f64() * 1e3,
        path.display()
    );
    Ok(())
}

/// What `vlmc run --target cuda` needs.
pub struct RunArgs<'a> {
    pub model: Option<&'a str>,
    pub sets: &'a [(String, String)],
    pub weights: &'a [PathBuf],
    /// A PEFT LoRA adapter to run on top of the weights, unmerged (`--adapter`).
    pub adapter: Option<&'a Path>,
    /// Apply the adapter to weights other than those it records as its base.
    pub allow_other_base: bool,
    /// `--input NAME=VALUE` pairs, in order.
    pub inputs: &'a [(String, String)],
    pub tokenizer: Option<&'a Path>,
    pub out: Option<&'a Path>,
}

/// `vlmc run FILE --target cuda ...`: the forward on the GPU. Without a CUDA driver it stops
/// first, with a message saying so.
pub fn run(file: &Path, a: &RunArgs<'_>) -> Result<(), u8> {
    vlmc_runtime::cuda::check_driver().map_err(|e| fail(&e))?;
    let mut m = load(file, a.model, a.sets)?;
    let path = a.out.map(Path::to_path_buf).unwrap_or_else(|| {
        PathBuf::from("build")
            .join(&m.model)
            .join("outputs.safetensors")
    });
    let dir = &vlmc_runtime::weight_set::tokenizer_dir(a.weights);
    let tokenizer = a
        .tokenizer
        .map_or_else(|| dir.join("tokenizer.json"), Path::to_path_buf);
    crate::check_run_output(&path, file, a.weights, a.inputs, &tokenizer)?;
    crate::adapter::check_output(&path, a.adapter).map_err(|e| fail(&e))?;
    let bound =
        crate::adapter::bind_for_run(file, &mut m, a.weights, a.adapter, a.allow_other_base)
            .map_err(|e| fail(&e))?;
    let inputs = crate::gather_inputs(&m, a.inputs, dir, a.tokenizer).map_err(|e| fail(&e))?;
    let t0 = Instant::now();
    let opts = vlmc_runtime::cuda::CudaOptions::default();
    let mut gpu =
        vlmc_runtime::cuda::load_model(&m, &inputs, &bound.params, &opts).map_err(|e| fail(&e))?;
    eprintln!(
        "compiled and loaded {} on {}{} in {:.0} ms",
        m.model,
        gpu.device,
        if gpu.cached {
            " (kernels from the cache)"
        } else {
            ""
        },
        t0.elapsed().as_secs_f64() * 1e3
    );
    let t1 = Instant::now();
    let outputs = gpu.run(&inputs).map_err(|e| fail(&e))?;
    eprintln!(
        "ran {} launches on the GPU in {:.1} ms",
        gpu.launches(),
        t1.elapsed().as_secs_f64() * 1e3
    );
    for (name, t) in &outputs {
        println!("{name}: {t}");
    }
    vlmc_runtime::weights::save(&path, &outputs).map_err(|e| fail(&e))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
