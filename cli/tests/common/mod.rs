//! Helpers shared by the tests of the `vlmc` binary (`mod common;` in each): running it from
//! the repository root, fresh folders, paths as arguments, and reading what it wrote.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use vlmc_runtime::weights::WeightFile;
use vlmc_runtime::Tensor;

#[path = "../../../tests/common/files.rs"]
mod files;
#[allow(unused_imports)] // not every test binary uses them
pub use files::*;

/// The repository root, where the commands run.
pub const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The tiny language model of the training tests, and the colours tokenizer it reads.
pub const TINY_LM: &str = "tests/fixtures/train/tiny_lm.vlm";
pub const TOKENIZER: &str = "tests/fixtures/train/colours/tokenizer.json";

/// The test binary's name (each has its own folders).
const TEST: &str = env!("CARGO_CRATE_NAME");

/// `vlmc args`, run from the repository root; compiled kernels are cached in a folder of this
/// test binary's, not in the user's home.
pub fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vlmc"));
    c.args(args).current_dir(ROOT).env(
        "VLMC_CACHE_DIR",
        std::env::temp_dir().join(format!("vlmc-{TEST}-cache-{}", std::process::id())),
    );
    c
}

/// Runs `vlmc args` to its end.
pub fn vlmc(args: &[&str]) -> Output {
    command(args).output().expect("vlmc runs")
}

/// A path for one test's files, with nothing there yet.
pub fn fresh(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmc-{TEST}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A fresh, empty folder for one test.
pub fn tmp(name: &str) -> PathBuf {
    let d = fresh(name);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

/// A path as a command line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Every tensor of a safetensors file, by name.
pub fn weights(path: &Path) -> BTreeMap<String, Tensor> {
    let f = WeightFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.names()
        .into_iter()
        .map(|n| {
            let t = f.get(&n).expect("tensor");
            (n, t)
        })
        .collect()
}

/// `vlmc train` of TinyLm's `trainer` on `data` (with the colours tokenizer) into `out`, then
/// `extra`.
pub fn train_args<'a>(
    trainer: &'a str,
    data: &'a Path,
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        TINY_LM,
        "--trainer",
        trainer,
        "--data",
        s(data),
        "--tokenizer",
        TOKENIZER,
        "--quiet",
        "-o",
        s(out),
    ];
    v.extend_from_slice(extra);
    v
}
