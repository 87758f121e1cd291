//! `vlmc build --target cuda` and `vlmc run --target cuda` through the binary, on a machine
//! without a GPU (as CI is): the CUDA C and launch plan are written, and running fails with one
//! clear message, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn vlmc(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vlmc"))
        .args(args)
        .current_dir(root())
        .env_remove("VLMC_NVRTC")
        // Compiled kernels are cached here, not in the user's home.
        .env("VLMC_CACHE_DIR", tmp("cache"))
        .output()
        .expect("vlmc runs")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmc-cli-cuda-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).expect("tmp");
    d
}

#[test]
fn build_target_cuda_writes_kernels_and_the_launch_plan() {
    let dir = tmp("build");
    let out = vlmc(&[
        "build",
        "tests/passes/fusion.vlm",
        "--target",
        "cuda",
        "--dims",
        "B=2,T=5",
        "-o",
        dir.to_str().expect("utf-8"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let cuda = dir.join("cuda");
    for f in ["k0_fc.cu", "k1_norm.cu", "module.cu", "launch.txt"] {
        assert!(cuda.join(f).is_file(), "{f} missing: {stderr}");
    }
    let norm = std::fs::read_to_string(cuda.join("k1_norm.cu")).expect("read");
    assert!(norm.contains("extern \"C\" __global__ void __launch_bounds__(32) k1_norm("));
    assert!(
        norm.contains("__shfl_down_sync"),
        "block reductions use warp shuffles"
    );
    let plan = std::fs::read_to_string(cuda.join("launch.txt")).expect("read");
    assert!(
        plan.contains("launch k1_norm grid (10, 1, 1) block 32"),
        "{plan}"
    );
    assert!(
        plan.contains("cublas_sgemm_strided_batched k0_fc m 6 n 10 k 6"),
        "{plan}"
    );
    let bad = vlmc(&[
        "build",
        "tests/passes/fusion.vlm",
        "--emit",
        "cuda",
        "--arch",
        "80",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a GPU architecture"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_target_cuda_without_a_driver_fails_clearly() {
    if Path::new("/dev/nvidiactl").exists() {
        eprintln!("an NVIDIA driver is installed: tests/gpu/check.sh covers this machine");
        return;
    }
    let dir = tmp("run");
    let weights = dir.join("w.safetensors");
    let w = weights.to_str().expect("utf-8");
    let init = vlmc(&["init", "tests/passes/fusion.vlm", "-o", w]);
    assert!(init.status.success());
    let out = vlmc(&[
        "run",
        "tests/passes/fusion.vlm",
        "--weights",
        w,
        "--input",
        "x=missing.npy",
        "--target",
        "cuda",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "error: --target cuda needs an NVIDIA GPU and its driver, but the CUDA driver library \
         (libcuda.so) was not found on this machine; run on the CPU instead (without --target cuda)"
    );
    assert!(out.stdout.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
