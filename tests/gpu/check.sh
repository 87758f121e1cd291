#!/usr/bin/env bash
# The CUDA backend on a real GPU, in one command (under 5 minutes on an H100):
#   1. builds vlmc's GPU tests in release;
#   2. runs every zoo fixture, MiniLM, every per-op case of tests/interp and generation (prefill
#      and cached steps, against the CPU's tokens) on the GPU against
#      the reference interpreter (relative error <= 1e-4; tests/cuda_gpu.rs, gpu_matches_*);
#   3. times MiniLM (batch 64 x 128), a ViT-B/16 encoder (32 images) and LLaVA at LLaVA-1.5-7B's
#      widths (tests/gpu/models.vlm) on the GPU, then their PyTorch twins, eager and
#      torch.compile, on the same GPU (tests/gpu/bench_torch.py), and prints medians and ratios.
# Usage: tests/gpu/check.sh [--no-bench]. Output also goes to build/gpu/. Needs the Rust
# toolchain and the crates (`cargo fetch` where the registry can be reached) on the GPU machine.
# NVRTC and cuBLAS are loaded at run time: from the loader path (a CUDA toolkit), else from the
# nvidia-* wheels PyTorch ships, else NVRTC from tests/setup.sh's .cache/cuda.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=build/gpu
mkdir -p "$out"
bench=1
[ "${1:-}" = "--no-bench" ] && bench=0

echo "== GPU"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
else
  echo "nvidia-smi not found: is there an NVIDIA GPU and driver?" >&2
fi

# CUDA libraries that are not on the loader path: the wheels PyTorch depends on.
wheel_libs=$(python3 - <<'PY' 2>/dev/null || true
import glob, os, site, sys
roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
dirs = []
for r in roots:
    for d in glob.glob(os.path.join(r, "nvidia", "*", "lib")):
        if d not in dirs:
            dirs.append(d)
print(":".join(dirs))
PY
)
if [ -n "$wheel_libs" ]; then
  export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$wheel_libs"
fi
if [ -z "${VLMC_NVRTC:-}" ] && ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so\.12' \
   && [ -f .cache/cuda/lib/libnvrtc.so.12 ] \
   && ! ls ${wheel_libs//:/ } 2>/dev/null | grep -q 'libnvrtc\.so\.12'; then
  export VLMC_NVRTC="$PWD/.cache/cuda/lib/libnvrtc.so.12"
fi
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
echo "VLMC_NVRTC=${VLMC_NVRTC:-}"
# A cache of compiled kernels of its own, so that the compile times below are real.
export VLMC_CACHE="$PWD/$out/cache"
rm -rf "$VLMC_CACHE"

echo "== build (release)"
cargo test --release --test cuda_gpu --no-run 2>&1 | tail -n 3

echo "== every zoo fixture, MiniLM, every op case and generation on the GPU (rel. err <= 1e-4)"
cargo test --release --test cuda_gpu -- --ignored --nocapture --test-threads 1 \
  gpu_matches 2>&1 | tee "$out/check.txt" | grep -E '^(GPU|test |thread|failures)' || true
grep -q 'test result: ok. 3 passed' "$out/check.txt" || {
  echo "FAILED: see $out/check.txt" >&2
  exit 1
}

if [ "$bench" = 1 ]; then
  echo "== benchmarks: vlmc"
  cargo test --release --test cuda_gpu -- --ignored --nocapture --test-threads 1 \
    gpu_benchmarks 2>&1 | tee "$out/vlmc_bench.txt" | grep -E '^(BENCH|test |thread)' || true
  grep -q '^BENCH ' "$out/vlmc_bench.txt" || {
    echo "FAILED: no benchmark ran; see $out/vlmc_bench.txt" >&2
    exit 1
  }
  echo "== benchmarks: PyTorch eager and torch.compile"
  python3 tests/gpu/bench_torch.py --vlmc "$out/vlmc_bench.txt" --out "$out/torch_bench.json" \
    | tee "$out/table.txt"
fi
echo "== done: $out"
