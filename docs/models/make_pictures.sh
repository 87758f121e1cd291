#!/usr/bin/env bash
# Regenerates the block-level pictures of docs/models.md from the zoo specs (at the sizes of
# their test fixtures, which have the same structure with fewer layers). Needs Graphviz.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --quiet --bin vlmc
for f in tests/fixtures/zoo/*/fixture.vlm; do
  arch=$(basename "$(dirname "$f")")
  tmp=$(mktemp -d)
  ./target/debug/vlmc build "$f" --emit blocks -o "$tmp" 2>/dev/null
  dot -Tsvg "$tmp"/*.blocks.dot -o "docs/models/$arch.svg"
  rm -rf "$tmp"
  echo "docs/models/$arch.svg"
done
