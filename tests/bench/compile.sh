#!/usr/bin/env bash
# Compile time of every zoo model (models/*.vlm and tests/fixtures/zoo/*/fixture.vlm), with a cold
# and then a warm disk cache of compiled CPU kernels:
#   check  `vlmc check FILE` (parse, elaborate, shape-check)
#   build  `vlmc build FILE` (the same, and write the IR)
#   cold   `vlmc build FILE --emit clif --dims DIMS` with an empty cache: elaboration, passes,
#          lowering to kernels and Cranelift code generation of every loop nest (wall time, and
#          the passes / lowering / code generation parts the command prints)
#   warm   the same command again: every function comes from the cache
# Sizes: DIMS (default B=1,T=32,N=1,S=32,R=36). The cache lives in a temporary folder.
# Prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p vlmc-cli -q
vlmc=$PWD/target/release/vlmc
dims=${DIMS:-B=1,T=32,N=1,S=32,R=36}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unset VLMC_NO_CACHE

# Wall seconds of a command (its stderr kept in $tmp/err).
wall() {
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null 2>"$tmp/err"
    t1=$(date +%s.%N)
    echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}'
}

# A number from the stderr of the last command: field after PREFIX up to SUFFIX.
field() {
    sed -nE "s/.*$1([0-9]+)$2.*/\\1/p" "$tmp/err" | head -1
}

echo "| model | ops | kernels | functions | check s | build s | cold: passes + lowering + codegen ms | cold s | warm: codegen ms (hits) | warm s |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for f in models/*.vlm tests/fixtures/zoo/*/fixture.vlm; do
    export VLMC_CACHE_DIR="$tmp/cache/$(echo "$f" | tr / _)"
    check=$(wall "$vlmc" check "$f")
    ops=$(sed -nE 's/.*\(([0-9]+) ops.*/\1/p' "$tmp/err" | head -1)
    build=$(wall "$vlmc" build "$f" -o "$tmp/out")
    cold=$(wall "$vlmc" build "$f" --emit clif --dims "$dims" -o "$tmp/out")
    passes=$(field ' kernels in ' ' ms')
    kernels=$(field ' ops, ' ' kernels in')
    lower=$(sed -nE 's/^lowered .* in ([0-9]+) ms/\1/p' "$tmp/err")
    fns=$(field 'compiled ' ' functions in')
    cg=$(field ' functions in ' ' ms')
    warm=$(wall "$vlmc" build "$f" --emit clif --dims "$dims" -o "$tmp/out")
    wcg=$(field ' functions in ' ' ms')
    hits=$(field '\(' ' from the disk cache')
    echo "| $f | $ops | $kernels | $fns | $check | $build | $passes + $lower + $cg | $cold | $wcg ($hits) | $warm |"
done
