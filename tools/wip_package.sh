#!/usr/bin/env bash
# Copies a branch's flashattention/, tools/, benchmarks/ and tests/ into DEST (default .wip/, git-ignored), so
# that one device call can run work-in-progress branches beside the working tree: carry `.wip`, then e.g.
#   cd .wip && PYTHONPATH=$PWD python -m tools._wip_fused_dq_probe --seqlens 2048,8192 --dims 64,128
# A second branch can go below the first: tools/wip_package.sh BRANCH2 .wip/next (after the first).
set -euo pipefail
branch="${1:?usage: tools/wip_package.sh BRANCH [DEST under .wip]}"
dest="${2:-.wip}"
case "$dest" in .wip|.wip/*) ;; *) echo "DEST must be .wip or below it (git-ignored): $dest" >&2; exit 2 ;; esac
cd "$(git rev-parse --show-toplevel)"
rm -rf "$dest" && mkdir -p "$dest"
git archive "$branch" flashattention tools benchmarks tests | tar -x -C "$dest"
git rev-parse --short "$branch" > "$dest/COMMIT"
echo "$branch at $(cat "$dest/COMMIT") -> $dest/"
