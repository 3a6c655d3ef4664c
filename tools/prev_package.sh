#!/usr/bin/env bash
# Copies the package at COMMIT into .prev/, renamed flashattention_prev (imports and
# custom-op names), so that benchmarks.run's "ours-prev" provider times it beside the working tree's
# package in the same run: `PYTHONPATH=.:.prev python -m benchmarks.run --providers ours,ours-prev,...`.
# .prev/ is git-ignored; pass it to the device tool's `carry`.
set -euo pipefail
commit="${1:?usage: tools/prev_package.sh COMMIT}"
cd "$(git rev-parse --show-toplevel)"
rm -rf .prev && mkdir -p .prev
git archive "$commit" flashattention | tar -x -C .prev
mv .prev/flashattention .prev/flashattention_prev
grep -rlw flashattention .prev/flashattention_prev | xargs sed -i 's/\bflashattention\b/flashattention_prev/g'
git rev-parse --short "$commit" > .prev/COMMIT
echo "flashattention at $(cat .prev/COMMIT) -> .prev/flashattention_prev"
