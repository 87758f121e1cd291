//! Models too large for the machine: `vlmc init` and `vlmc run` (compiled and `--interp`) end
//! with an error that names the tensor and its size, exit status 1, before anything of that
//! size is allocated; never Rust's "memory allocation failed" abort.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vlmc(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vlmc"));
    cmd.args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .env_remove("VLMC_MEMORY_LIMIT")
        .env(
            "VLMC_CACHE_DIR",
            std::env::temp_dir().join(format!("vlmc-memory-cache-{}", std::process::id())),
        );
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("vlmc runs")
}

/// A fresh folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vlmc-memory-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path.to_str().expect("utf-8 path").to_string()
}

/// A 1-D f32 `.npy` of `n` zeros.
fn npy_f32(path: &Path, n: usize) {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({n},), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.resize(bytes.len() + 4 * n, 0);
    std::fs::write(path, bytes).expect("write npy");
}

/// Checks a clean failure: exit status 1, one `error:` line with `needs`, no panic or abort.
fn failed(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("memory allocation"), "{stderr}");
    stderr
}

#[test]
fn init_refuses_parameters_larger_than_memory() {
    let dir = scratch("init");
    let weights = dir.join("w.safetensors");
    let out_path = weights.to_str().expect("utf-8");
    let model = |shape: &str| {
        format!(
            "model M {{\n  param w: {shape} init normal(std: 0.02)\n  \
             fn forward(x: f32[B, 4]) -> f32[B, 4] {{\n    return x\n  }}\n}}\n"
        )
    };
    // 40 GB, against a limit of 1 GB: the parameter, its shape and size, and the limit.
    let file = write(&dir, "m40g.vlm", &model("[100000, 100000]"));
    let check = vlmc(&["check", &file], &[]);
    assert!(check.status.success(), "the model is valid");
    let out = vlmc(
        &["init", &file, "-o", out_path],
        &[("VLMC_MEMORY_LIMIT", "1GB")],
    );
    let stderr = failed(&out);
    assert_eq!(
        stderr,
        "error: parameter `w` [100000, 100000] f32 needs 40.0 GB; VLMC_MEMORY_LIMIT allows 1.0 GB\n"
    );
    assert!(!weights.exists(), "nothing written");

    // 4 TB, more than any machine that runs the tests has: what the machine has is read.
    let file = write(&dir, "m4t.vlm", &model("[1000000, 1000000]"));
    let stderr = failed(&vlmc(&["init", &file, "-o", out_path], &[]));
    assert!(
        stderr.starts_with(
            "error: parameter `w` [1000000, 1000000] f32 needs 4.0 TB; this machine has "
        ) && stderr.ends_with(" available\n"),
        "{stderr}"
    );

    // Two parameters that fit one by one but not together.
    let two = "model M {\n  param a: [150000000] init zeros\n  param b: [150000000] init zeros\n  \
               fn forward(x: f32[B, 4]) -> f32[B, 4] {\n    return x\n  }\n}\n";
    let file = write(&dir, "two.vlm", two);
    let stderr = failed(&vlmc(
        &["init", &file, "-o", out_path],
        &[("VLMC_MEMORY_LIMIT", "1GB")],
    ));
    assert_eq!(
        stderr,
        "error: initialising the model's 2 parameters needs 1.2 GB; VLMC_MEMORY_LIMIT allows 1.0 GB\n"
    );
    assert!(!weights.exists(), "nothing written");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn run_refuses_activations_larger_than_memory_before_running() {
    let dir = scratch("run");
    // An outer product: 4 MB of input, a [B, B] result of 4 TB.
    let file = write(
        &dir,
        "outer.vlm",
        "model M {\n  fn forward(x: f32[B]) -> f32[B, B] {\n    \
         return reshape(x, [B, 1]) * reshape(x, [1, B])\n  }\n}\n",
    );
    let weights = dir.join("w.safetensors");
    let w = weights.to_str().expect("utf-8");
    let init = vlmc(&["init", &file, "-o", w], &[]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let x = dir.join("x.npy");
    npy_f32(&x, 1_000_000);
    let input = format!("x={}", x.display());
    let out_file = dir.join("out.safetensors");
    let o = out_file.to_str().expect("utf-8");

    // Compiled: the plan's peak and outputs are known before lowering.
    let t0 = std::time::Instant::now();
    let stderr = failed(&vlmc(
        &["run", &file, "--weights", w, "--input", &input, "-o", o],
        &[],
    ));
    assert!(
        stderr.contains("error: the compiled plan of `M` at B=1000000 (activations ")
            && stderr.contains(" TB, outputs 4.0 TB) needs ")
            && stderr.contains("; this machine has "),
        "{stderr}"
    );
    assert!(t0.elapsed().as_secs() < 60, "refused before running");

    // The interpreter: the first op of that size, its shape and the bytes it needs.
    let stderr = failed(&vlmc(
        &[
            "run",
            &file,
            "--weights",
            w,
            "--input",
            &input,
            "-o",
            o,
            "--interp",
        ],
        &[("VLMC_MEMORY_LIMIT", "1GB")],
    ));
    assert!(
        stderr.contains("(f32[B, B]): its value [1000000, 1000000] f32 with the interpreter's f64 working copies needs ")
            && stderr.ends_with("; VLMC_MEMORY_LIMIT allows 1.0 GB\n"),
        "{stderr}"
    );
    assert!(!out_file.exists(), "no output written");

    // The same model at a size that fits runs.
    npy_f32(&x, 3);
    let ok = vlmc(
        &["run", &file, "--weights", w, "--input", &input, "-o", o],
        &[("VLMC_MEMORY_LIMIT", "1GB")],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}
