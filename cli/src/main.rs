//! The `vlmc` command line.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

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
        /// Artefacts to write: ast, ir, dot (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "ir")]
        emit: Vec<vlmc_cli::Emit>,
        /// Output directory (default: build/<model>/).
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { files } => vlmc_cli::check(&files),
        Command::Build {
            file,
            model,
            emit,
            out,
        } => vlmc_cli::build(&file, model.as_deref(), &emit, out.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => ExitCode::from(code),
    }
}
