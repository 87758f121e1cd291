#!/usr/bin/env bash
# The training benchmark, in one go on this machine: one training step (forward and loss,
# backward, AdamW update) compiled by vlmc vs PyTorch eager, 2 threads, same weights and inputs:
#   - all-MiniLM-L6-v2 on sentence pairs (tests/bench/minilm_pairs.vlm, SigLIP loss), 4 pairs
#     x 128 tokens (8 sequences: GEMM-bound) and 1 pair x 32 tokens;
#   - llava_tiny's LLaVA stage 1 (`align`: the projector trains) at its own widths and at a
#     wider setting (64x64 images, vision width 128, decoder width 256, vocabulary 4096).
# Prints every measurement, then a table: step medians, the forward/backward/update split, the
# first step's loss on both sides (the same computation), planned vs naive peak memory.
#
#   tests/bench/train.sh            (PYTHON=... picks the Python with torch and transformers)
set -euo pipefail
cd "$(dirname "$0")/../.."
tests/setup.sh
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x /opt/pyref/bin/python ]; then PY=/opt/pyref/bin/python; fi
if ! "$PY" -c "import torch, transformers, safetensors" 2>/dev/null; then
  echo "bench: $PY lacks torch/transformers: pip install torch transformers (or set PYTHON)" >&2
  exit 1
fi
cargo build --release -q -p vlmc-cli
V=target/release/vlmc
C=.cache/bench
out=$(mktemp)
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
minilm() { # B T RUNS
  "$PY" tests/bench/peers_train.py minilm .cache/minilm $C/minilm_pairs "$1" "$2" "$3" 2>/dev/null | tee -a "$out"
  $V bench tests/bench/minilm_pairs.vlm --trainer pairs --weights $C/minilm_pairs/model.safetensors \
    --dims "B=$1,T=$2" --runs "$3" | tee -a "$out"
}
llava() { # NAME B T RUNS IMAGE VISION_DIM DIM VOCAB
  "$PY" tests/bench/peers_train.py llava "$C/$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8" 2>/dev/null | tee -a "$out"
  $V bench models/llava_tiny.vlm --set image="$5" --set vision_dim="$6" --set dim="$7" \
    --set vocab="$8" --trainer align --weights "$C/$1/model.safetensors" --dims "B=$2,T=$3" \
    --runs "$4" | tee -a "$out"
}
minilm 4 128 5
minilm 1 32 20
llava llava_tiny 8 16 20 32 64 96 512
llava llava_wide 8 32 10 64 128 256 4096
"$PY" - "$out" <<'PY'
import re, sys
rows = {}
for line in open(sys.argv[1]):
    kv = dict(re.findall(r"(\w+)=([^\s]+)", line))
    who = line.split()[0] if line.strip() else ""
    if who in ("train", "torch-train"):
        key = (kv["model"], kv["size"])
        rows.setdefault(key, {})[who] = kv
print()
print("| Model | size | vlmc step | PyTorch step | vs PyTorch | vlmc fwd / bwd / update | PyTorch fwd / bwd / update | loss (vlmc, PyTorch) | vlmc GFLOP/s | planned / naive peak |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (model, size), r in rows.items():
    v, t = r.get("train"), r.get("torch-train")
    f = lambda d, k: float(d[k]) if d else float("nan")
    ratio = f(t, "step_ms") / f(v, "step_ms") if v and t else float("nan")
    split = lambda d: " / ".join(f"{f(d, k):.1f}" for k in ("fwd_ms", "bwd_ms", "update_ms")) if d else "-"
    mem = f"{f(v, 'peak_mib'):.1f} / {f(v, 'naive_mib'):.1f} MiB" if v else "-"
    print(f"| {model} | {size} | {f(v, 'step_ms'):.1f} ms | {f(t, 'step_ms'):.1f} ms | {ratio:.2f}x | {split(v)} | {split(t)} | "
          f"{f(v, 'loss'):.6f}, {f(t, 'loss'):.6f} | {f(v, 'gflops'):.1f} | {mem} |")
PY
rm -f "$out"
