#!/usr/bin/env bash
# The CPU benchmark, in one go on this machine: all-MiniLM-L6-v2 forward compiled by vlmc, the
# same with vlmc's interpreter, PyTorch eager and ONNX Runtime (same weights, 2 threads), at
# batch 8 x 128 tokens (throughput) and 1 x 32 (latency); a ViT-S/16 image encoder
# (tests/bench/vit_s16.vlm, Hugging Face's ViTModel with random weights saved by
# tests/bench/peers_vit.py) the same four ways at 4 x 224^2 and 1 x 224^2, after checking that
# vlmc's output equals PyTorch's (relative error <= 1e-4); plus the gemm crate's GFLOP/s on a
# 1024^3 product (the ceiling). Prints every measurement, then tables of medians and ratios.
#
#   tests/bench/run.sh            (PYTHON=... picks the Python with torch and transformers)
#
# Setup it does itself: tests/setup.sh (the weights), a release build, and `pip install
# onnxruntime onnx` into that Python when missing, the ViT-S weights into .cache/bench/vit_s16/.
# Close other work first: timings are noisy. Exits 1 (after the tables) when the ViT check fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
tests/setup.sh
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x /opt/pyref/bin/python ]; then PY=/opt/pyref/bin/python; fi
if ! "$PY" -c "import torch, transformers" 2>/dev/null; then
  echo "bench: $PY lacks torch/transformers: pip install torch transformers (or set PYTHON)" >&2
  exit 1
fi
"$PY" -c "import onnxruntime, onnx" 2>/dev/null || "$PY" -m pip install -q onnxruntime onnx
cargo build --release -q -p vlmc-cli
V=target/release/vlmc
W=.cache/minilm
out=$(mktemp)
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
$V bench models/minilm.vlm --weights $W/model.safetensors --dims B=8,T=128 --runs 10 \
  --interp-runs "${INTERP_RUNS_LARGE:-1}" --gemm 1024 | tee -a "$out"
$V bench models/minilm.vlm --weights $W/model.safetensors --dims B=1,T=32 --runs 50 \
  --interp-runs 3 | tee -a "$out"
"$PY" tests/bench/peers.py $W 8 128 10 2>/dev/null | tee -a "$out"
"$PY" tests/bench/peers.py $W 1 32 50 2>/dev/null | tee -a "$out"
# ViT-S/16: the weights once (seed 0), vlmc (compiled) vs PyTorch on them, then the timings
VW=.cache/bench/vit_s16
VIT=tests/bench/vit_s16.vlm
"$PY" tests/bench/peers_vit.py save $VW 2>/dev/null
check_rc=0
"$PY" tests/bench/peers_vit.py check $VW 2 $V | tee -a "$out" || check_rc=$?
$V bench $VIT --weights $VW/model.safetensors --dims B=4 --runs 10 \
  --interp-runs "${INTERP_RUNS_VIT_LARGE:-1}" | tee -a "$out"
$V bench $VIT --weights $VW/model.safetensors --dims B=1 --runs 20 --interp-runs 2 | tee -a "$out"
"$PY" tests/bench/peers_vit.py time $VW 4 10 2>/dev/null | tee -a "$out"
"$PY" tests/bench/peers_vit.py time $VW 1 20 2>/dev/null | tee -a "$out"
"$PY" - "$out" <<'PY'
import re, sys
tables = {}  # model -> size -> who -> value
gemm = None
checks = []
label = {"B=8,T=128": "8 × 128", "B=1,T=32": "1 × 32", "B=4": "4 × 224²", "B=1": "1 × 224²"}
for line in open(sys.argv[1]):
    kv = dict(re.findall(r"(\w+)=([^\s]+)", line))
    who = line.split()[0] if line.strip() else ""
    if who == "gemm":
        gemm = float(kv["gflops"])
    elif who == "check" and "output" not in kv:
        checks.append(line.strip())
    elif who in ("compiled", "interpreter", "pytorch", "onnxruntime"):
        r = tables.setdefault(kv.get("model", "MiniLM"), {}).setdefault(kv["size"], {})
        r[who] = float(kv["median_ms"])
        if who == "compiled":
            r["flops"] = float(kv["flops"])
for model, rows in tables.items():
    print()
    print(f"| {model} | vlmc compiled | interpreter | PyTorch eager | ONNX Runtime | compiled GFLOP/s (% of gemm) | vs PyTorch | vs ORT |")
    print("|---|---|---|---|---|---|---|---|")
    for size, r in rows.items():
        c = r.get("compiled")
        g = r["flops"] / c / 1e6 if c else float("nan")
        pct = f"{100 * g / gemm:.0f}%" if gemm else "?"
        def ms(k):
            return f"{r[k]:.1f} ms" if k in r else "-"
        def ratio(k):
            return f"{r[k] / c:.2f}x" if k in r and c else "-"
        print(f"| {label.get(size, size)} | {ms('compiled')} | {ms('interpreter')} | {ms('pytorch')} | {ms('onnxruntime')} | {g:.1f} ({pct}) | {ratio('pytorch')} | {ratio('onnxruntime')} |")
    print("(vs PyTorch / vs ORT: the peer's time over vlmc compiled's; above 1 means vlmc is faster)")
if gemm:
    print(f"\ngemm 1024^3, 2 threads: {gemm:.1f} GFLOP/s")
for c in checks:
    print(c)
PY
rm -f "$out"
exit $check_rc
