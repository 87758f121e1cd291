//! The `vlmc` command line.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vlmc_cli::{parse_dim, parse_pair, parse_set};

#[derive(Parser)]
#[command(
    name = "vlmc",
    version,
    about = "A compiler for vision-language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model with one of its trainers (forward, loss, backward and update as one graph).
    Train(vlmc_cli::train::TrainArgs),
    /// Generate text: a compiled key/value-cache decoder, greedy or sampled, with chat
    /// templates, images and batches of prompts.
    Generate(vlmc_cli::generate::GenerateArgs),
    /// Fold a LoRA adapter (PEFT layout) into base weights.
    Merge(vlmc_cli::train::MergeArgs),
    /// Draw a training run's curves (loss and eval loss, learning rate, gradient norm against
    /// the step) from its log.jsonl as an SVG picture.
    Plot(vlmc_cli::plot::PlotArgs),
    /// Write a model's weights as a transformers checkpoint folder (config.json + safetensors).
    Export(vlmc_cli::export::ExportArgs),
    /// Parse and type-check .vlm files (every model is elaborated and shape-checked).
    Check {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Compile a model and write the requested artefacts.
    Build {
        /// The .vlm file.
        file: PathBuf,
        /// Which model of the file (default: the only one, or the last one).
        #[arg(long)]
        model: Option<String>,
        /// Set a compile-time parameter of the model: NAME=VALUE (repeatable).
        #[arg(long = "set", value_parser = parse_set)]
        sets: Vec<(String, String)>,
        /// Artefacts to write: ast, ir, dot, blocks, opt, report, kernels, clif, cuda
        /// (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "ir")]
        emit: Vec<vlmc_cli::Emit>,
        /// The target: cpu, or cuda (implies `--emit cuda`).
        #[arg(long, value_enum, default_value = "cpu")]
        target: vlmc_cli::cuda::Target,
        /// The GPU architecture for `--emit cuda` (default sm_80).
        #[arg(long)]
        arch: Option<String>,
        /// Apply this adapter of the spec and merge it into the base weights.
        #[arg(long)]
        adapter: Option<String>,
        /// Write the IR after this pass (repeatable; `all` for every pass).
        #[arg(long = "print-after")]
        print_after: Vec<String>,
        /// Sizes of the symbolic dims for the report, e.g. B=8,T=128 (default 1).
        #[arg(long, value_delimiter = ',', value_parser = parse_dim)]
        dims: Vec<(String, i64)>,
        /// Output directory (default: build/<model>/).
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Do not use the disk cache of compiled CPU kernels (also: VLMC_NO_CACHE=1).
        #[arg(long)]
        no_cache: bool,
    },
    /// Initialise every parameter from its declared init rule and save them as safetensors.
    Init {
        /// The .vlm file.
        file: PathBuf,
        /// Which model of the file (default: the last one).
        #[arg(long)]
        model: Option<String>,
        /// Set a compile-time parameter of the model: NAME=VALUE (repeatable).
        #[arg(long = "set", value_parser = parse_set)]
        sets: Vec<(String, String)>,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output file (default: build/<model>/init.safetensors).
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
    /// Run a model's forward: compiled to machine code, or with the interpreter (`--interp`).
    Run {
        /// The .vlm file.
        file: PathBuf,
        /// Which model of the file (default: the last one).
        #[arg(long)]
        model: Option<String>,
        /// Set a compile-time parameter of the model: NAME=VALUE (repeatable).
        #[arg(long = "set", value_parser = parse_set)]
        sets: Vec<(String, String)>,
        /// Weights: safetensors files (repeat the flag or separate with commas), a sharded
        /// checkpoint's model.safetensors.index.json, or a Hugging Face model folder; bound to
        /// parameters by name.
        #[arg(long, required = true, value_delimiter = ',')]
        weights: Vec<PathBuf>,
        /// A LoRA adapter in the PEFT layout (adapter_model.safetensors, adapter_config.json)
        /// to run on top of the weights, unmerged.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Apply --adapter even to weights other than the base it records (vlmc_base.json).
        #[arg(long)]
        allow_other_base: bool,
        /// An input: NAME=FILE.npy|FILE.safetensors, text="..." or image=FILE.png (repeatable;
        /// several texts or images make a batch).
        #[arg(long = "input", value_parser = parse_pair)]
        inputs: Vec<(String, String)>,
        /// The tokenizer.json for text inputs (default: next to the weights).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Where to save the outputs (default: build/<model>/outputs.safetensors).
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Run the reference interpreter instead of the compiled CPU code.
        #[arg(long)]
        interp: bool,
        /// Where to run: cpu, or cuda (an NVIDIA GPU).
        #[arg(long, value_enum, default_value = "cpu")]
        target: vlmc_cli::cuda::Target,
        /// Do not use the disk cache of compiled CPU kernels (also: VLMC_NO_CACHE=1).
        #[arg(long)]
        no_cache: bool,
    },
    /// Time a model's compiled forward on synthetic inputs (and the interpreter, and GEMM).
    Bench {
        /// The .vlm file.
        file: PathBuf,
        /// Which model of the file (default: the last one).
        #[arg(long)]
        model: Option<String>,
        /// Set a compile-time parameter of the model: NAME=VALUE (repeatable).
        #[arg(long = "set", value_parser = parse_set)]
        sets: Vec<(String, String)>,
        /// Weights (files, an index or a folder, as for `vlmc run`); default: random
        /// parameters from the init rules.
        #[arg(long, value_delimiter = ',')]
        weights: Vec<PathBuf>,
        /// Sizes of the symbolic dims, e.g. B=8,T=128.
        #[arg(long, value_delimiter = ',', value_parser = parse_dim)]
        dims: Vec<(String, i64)>,
        /// Timed runs of the compiled code.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Timed runs of the interpreter (0 to skip).
        #[arg(long, default_value_t = 0)]
        interp_runs: usize,
        /// Also time the GEMM crate on an N×N×N product (0 to skip).
        #[arg(long, default_value_t = 0)]
        gemm: usize,
        /// Do not use the disk cache of compiled CPU kernels (also: VLMC_NO_CACHE=1).
        #[arg(long)]
        no_cache: bool,
        /// Time one training step of this trainer instead of the forward (forward, backward
        /// and update split, planned memory).
        #[arg(long)]
        trainer: Option<String>,
    },
}

/// The stack of the thread that runs a command. Deeply nested specs recurse in the parser,
/// the elaborator and the passes; the front end rejects nesting past fixed limits
/// (`vlmc_grammar::MAX_NESTING`, `vlmc_grammar::MAX_EXPR_DEPTH`), and this stack holds every
/// recursion those limits allow with a wide margin. It is reserved, not committed: pages are
/// touched only as deep as a run goes.
const STACK_BYTES: usize = 512 << 20;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let worker = std::thread::Builder::new()
        .name("vlmc".into())
        .stack_size(STACK_BYTES)
        .spawn(move || run(cli));
    match worker.map(|w| w.join()) {
        Ok(Ok(code)) => code,
        // A panic has already printed its message.
        Ok(Err(_)) => ExitCode::from(101),
        Err(e) => {
            eprintln!("error: cannot start the worker thread: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Train(a) => vlmc_cli::train::train(&a),
        Command::Generate(a) => vlmc_cli::generate::generate(&a),
        Command::Merge(a) => vlmc_cli::train::merge(&a),
        Command::Plot(a) => vlmc_cli::plot::plot(&a),
        Command::Export(a) => vlmc_cli::export::export(&a),
        Command::Check { files } => vlmc_cli::check(&files),
        Command::Build {
            file,
            model,
            sets,
            mut emit,
            adapter,
            print_after,
            dims,
            out,
            target,
            arch,
            no_cache,
        } => {
            if target == vlmc_cli::cuda::Target::Cuda && !emit.contains(&vlmc_cli::Emit::Cuda) {
                emit.push(vlmc_cli::Emit::Cuda);
            }
            let cuda_dims = dims.clone();
            vlmc_cli::build_with(
                &file,
                &vlmc_cli::Pick {
                    model: model.as_deref(),
                    sets: &sets,
                },
                &emit,
                out.as_deref(),
                &vlmc_cli::BuildOptions {
                    adapter,
                    print_after,
                    dims,
                    no_cache,
                },
            )
            .and_then(|()| match emit.contains(&vlmc_cli::Emit::Cuda) {
                true => vlmc_cli::cuda::emit(
                    &file,
                    &vlmc_cli::cuda::EmitArgs {
                        model: model.as_deref(),
                        sets: &sets,
                        dims: &cuda_dims,
                        arch: arch.as_deref(),
                        out: out.as_deref(),
                    },
                ),
                false => Ok(()),
            })
        }
        Command::Init {
            file,
            model,
            sets,
            seed,
            out,
        } => vlmc_cli::init(
            &file,
            &vlmc_cli::Pick {
                model: model.as_deref(),
                sets: &sets,
            },
            seed,
            out.as_deref(),
        ),
        Command::Run {
            file,
            model,
            sets,
            weights,
            adapter,
            allow_other_base,
            inputs,
            tokenizer,
            out,
            interp,
            target: vlmc_cli::cuda::Target::Cuda,
            no_cache: _,
        } => match interp {
            true => {
                eprintln!("error: --interp runs the interpreter on the CPU: drop --target cuda");
                Err(1)
            }
            false => vlmc_cli::cuda::run(
                &file,
                &vlmc_cli::cuda::RunArgs {
                    model: model.as_deref(),
                    sets: &sets,
                    weights: &weights,
                    adapter: adapter.as_deref(),
                    allow_other_base,
                    inputs: &inputs,
                    tokenizer: tokenizer.as_deref(),
                    out: out.as_deref(),
                },
            ),
        },
        Command::Run {
            file,
            model,
            sets,
            weights,
            adapter,
            allow_other_base,
            inputs,
            tokenizer,
            out,
            interp,
            target: vlmc_cli::cuda::Target::Cpu,
            no_cache,
        } => vlmc_cli::run(
            &file,
            &vlmc_cli::RunArgs {
                pick: vlmc_cli::Pick {
                    model: model.as_deref(),
                    sets: &sets,
                },
                weights: &weights,
                adapter: adapter.as_deref(),
                allow_other_base,
                inputs: &inputs,
                tokenizer: tokenizer.as_deref(),
                out: out.as_deref(),
                interp,
                no_cache,
            },
        ),
        Command::Bench {
            file,
            model,
            sets,
            weights,
            dims,
            runs,
            interp_runs,
            gemm,
            no_cache,
            trainer,
        } => {
            let pick = vlmc_cli::Pick {
                model: model.as_deref(),
                sets: &sets,
            };
            match trainer {
                Some(trainer) => vlmc_cli::bench_train::bench_train(
                    &file,
                    &vlmc_cli::bench_train::TrainBenchArgs {
                        pick,
                        weights: (!weights.is_empty()).then_some(&weights[..]),
                        trainer: &trainer,
                        dims: &dims,
                        runs,
                        interp_runs,
                        no_cache,
                    },
                ),
                None => vlmc_cli::bench::bench(
                    &file,
                    &vlmc_cli::bench::BenchArgs {
                        pick,
                        weights: (!weights.is_empty()).then_some(&weights[..]),
                        dims: &dims,
                        runs,
                        interp_runs,
                        gemm,
                        no_cache,
                    },
                ),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => ExitCode::from(code),
    }
}
