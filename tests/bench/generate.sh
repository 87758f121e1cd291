#!/usr/bin/env bash
# The text-generation benchmark, in one go on this machine: SmolLM2-135M-Instruct (tests/setup.sh's
# .cache/smollm2, bf16 weights read as f32 by every engine) generating greedily with 2 threads,
# batch 1: a 128-token prompt (the same token ids for every engine; tests/bench/generate.py builds
# it from a fixed text) then 128 new tokens, time to first token and decode tokens/s, for
#   - vlmc generate (run twice, the second reported: its kernels come from the disk cache),
#   - transformers generate (float32, eager attention, KV cache; one warm-up run first),
#   - llama.cpp through llama-cpp-python, on f32 and f16 GGUF conversions of the same weights;
# vlmc again with its plans in memory (the prompt twice in one `--data` run, the second reported);
# batch 8 (8 such prompts) tokens/s of vlmc generate --data against transformers; the machine's
# memory read bandwidth (2 threads) and vlmc's decode as a fraction of the bound it sets
# (bandwidth / the f32 bytes of the weights). Prints every measurement, then markdown tables.
#
#   tests/bench/generate.sh       (PYTHON=... picks the Python with torch and transformers;
#                                  NEW_TOKENS=16 for a quick check; SKIP_BUILD=1 keeps the binary)
#
# Setup it does itself: tests/setup.sh, a release build, and, when `import llama_cpp` fails,
# `pip install llama-cpp-python` (it compiles llama.cpp: ~20 minutes on 2 cores; log in
# .cache/bench/llama-cpp-python.log; NO_LLAMA=1 skips llama.cpp). The GGUF files are made once
# into .cache/smollm2/ by convert_hf_to_gguf.py from the llama-cpp-python sdist (which needs
# the PyPI packages gguf and sentencepiece). When llama.cpp cannot be had, it says why and goes on.
# Close other work first: timings are noisy.
set -euo pipefail
cd "$(dirname "$0")/../.."
tests/setup.sh
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x /opt/pyref/bin/python ]; then PY=/opt/pyref/bin/python; fi
if ! "$PY" -c "import torch, transformers" 2>/dev/null; then
  echo "bench: $PY lacks torch/transformers: pip install torch transformers (or set PYTHON)" >&2
  exit 1
fi
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p vlmc-cli
V=target/release/vlmc
W=.cache/smollm2
B=.cache/bench
P=$B/generate
LLAMA_VERSION=0.3.36
NEW=${NEW_TOKENS:-128}
T=${PROMPT_TOKENS:-128}
THREADS=2
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
mkdir -p $P
out=$(mktemp)
say() { echo "$@" | tee -a "$out"; }
say "setup prompt=$T new=$NEW threads=$THREADS load_start=$(cut -d' ' -f1 /proc/loadavg)"

# llama.cpp: the package and the GGUF files, or a reason why not (a `llama.cpp skipped=1` line)
llama_why=""
if [ -n "${NO_LLAMA:-}" ]; then
  llama_why="NO_LLAMA is set"
elif ! "$PY" -c "import llama_cpp" 2>/dev/null; then
  echo "bench: building llama-cpp-python $LLAMA_VERSION (log: $B/llama-cpp-python.log)..." >&2
  if ! CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" nice -n 10 "$PY" -m pip install -v \
      "llama-cpp-python==$LLAMA_VERSION" >$B/llama-cpp-python.log 2>&1; then
    llama_why="pip install llama-cpp-python==$LLAMA_VERSION failed (see $B/llama-cpp-python.log)"
  fi
fi
conv=$B/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp
if [ -z "$llama_why" ] && { [ ! -f $W/model-f32.gguf ] || [ ! -f $W/model-f16.gguf ]; }; then
  if [ ! -f $conv/convert_hf_to_gguf.py ]; then
    "$PY" -m pip download -q --no-deps --disable-pip-version-check \
      "llama-cpp-python==$LLAMA_VERSION" -d $B >&2 &&
      tar xzf $B/llama_cpp_python-$LLAMA_VERSION.tar.gz -C $B \
        llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp/convert_hf_to_gguf.py \
        llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp/conversion \
        llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp/gguf-py ||
      llama_why="cannot fetch the llama-cpp-python $LLAMA_VERSION sdist (its converter)"
  fi
  if [ -z "$llama_why" ]; then
    "$PY" -c "import gguf, sentencepiece" 2>/dev/null ||
      "$PY" -m pip install -q --disable-pip-version-check gguf sentencepiece >&2 || true
    for ty in f32 f16; do
      [ -f $W/model-$ty.gguf ] && continue
      if ! "$PY" $conv/convert_hf_to_gguf.py $W --outtype $ty --outfile $W/model-$ty.gguf.partial \
          >$B/convert-$ty.log 2>&1; then
        llama_why="convert_hf_to_gguf.py --outtype $ty failed (see $B/convert-$ty.log)"
        break
      fi
      mv $W/model-$ty.gguf.partial $W/model-$ty.gguf
    done
  fi
fi

# the prompts (exactly T tokens each), the weights' bytes, the bandwidth
rm -f $P/hf_tokens.json
"$PY" tests/bench/generate.py prompts $W $P "$T" | tee -a "$out"
"$PY" tests/bench/generate.py weights $W | tee -a "$out"
if cc -O3 -march=native -fopenmp tests/bench/membw.c -o $B/membw; then
  $B/membw 1 15 1 | sed 's/^membw/membw1/' | tee -a "$out"
  $B/membw 1 15 $THREADS | tee -a "$out"
fi
# transformers, batch 1 and 8 (writes hf_tokens.json, which the other engines' tokens are
# compared with)
"$PY" tests/bench/generate.py hf $W $P "$NEW" $THREADS 2>/dev/null | tee -a "$out"
# vlmc, batch 1: twice, the second reported
v1="$V generate models/smollm2.vlm --weights $W/model.safetensors --prompt \"\$(cat $P/prompt.txt)\" --max-new-tokens $NEW --json"
for run in 1 2; do
  $V generate models/smollm2.vlm --weights $W/model.safetensors --prompt "$(cat $P/prompt.txt)" \
    --max-new-tokens "$NEW" --json >$P/vlmc$run.json 2>$P/vlmc$run.log || true
  cat $P/vlmc$run.log >&2
  "$PY" tests/bench/generate.py vlmc $run $P/vlmc$run.json $P "$NEW" "$v1" | tee -a "$out"
done
# vlmc, batch 1, warm: the prompt twice in one process (`--data`, batch 1), the second reported:
# its plans are in memory, as transformers' are after its warm-up run
"$PY" -c "import json, sys; p = open(sys.argv[1]).read().rstrip('\n'); print(json.dumps({'prompt': p})); print(json.dumps({'prompt': p}))" \
  $P/prompt.txt >$P/twice.jsonl
vw="$V generate models/smollm2.vlm --weights $W/model.safetensors --data $P/twice.jsonl -o $P/outw.jsonl --batch 1 --max-new-tokens $NEW"
$V generate models/smollm2.vlm --weights $W/model.safetensors --data $P/twice.jsonl \
  -o $P/outw.jsonl --batch 1 --max-new-tokens "$NEW" 2>$P/vlmcw.log || true
"$PY" tests/bench/generate.py vlmc warm $P/outw.jsonl $P "$NEW" "$vw" | tee -a "$out"
# llama.cpp, batch 1, f32 and f16
if [ -z "$llama_why" ]; then
  for ty in f32 f16; do
    "$PY" tests/bench/generate.py llama $W/model-$ty.gguf $P "$NEW" $THREADS 2>/dev/null |
      tee -a "$out" || say "llama.cpp skipped=1 why='generate.py llama $ty failed'"
  done
else
  echo "bench: llama.cpp not run: $llama_why" >&2
  say "llama.cpp skipped=1 why='$llama_why'"
fi
# vlmc, batch 8: twice, the second reported
v8="$V generate models/smollm2.vlm --weights $W/model.safetensors --data $P/batch.jsonl -o $P/out8.jsonl --batch 8 --max-new-tokens $NEW"
for run in 1 2; do
  $V generate models/smollm2.vlm --weights $W/model.safetensors --data $P/batch.jsonl \
    -o $P/out8.jsonl --batch 8 --max-new-tokens "$NEW" 2>$P/vlmc8-$run.log || true
  cat $P/vlmc8-$run.log >&2
  "$PY" tests/bench/generate.py vlmc8 $run $P/vlmc8-$run.log $P/out8.jsonl "$NEW" "$v8" | tee -a "$out"
done
say "end load_end=$(cut -d' ' -f1 /proc/loadavg)"
"$PY" tests/bench/generate.py table "$out"
rm -f "$out"
