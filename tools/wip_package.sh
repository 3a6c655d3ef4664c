#!/usr/bin/env bash
# Copies a branch's flashattention/ and tools/ into .wip/ (git-ignored), so that one device call can run a
# work-in-progress branch's probe beside the working tree: carry `.wip`, then e.g.
#   cd .wip && PYTHONPATH=$PWD python -m tools._wip_fused_dq_probe --seqlens 2048,8192 --dims 64,128
set -euo pipefail
branch="${1:?usage: tools/wip_package.sh BRANCH}"
cd "$(git rev-parse --show-toplevel)"
rm -rf .wip && mkdir -p .wip
git archive "$branch" flashattention tools | tar -x -C .wip
git rev-parse --short "$branch" > .wip/COMMIT
echo "$branch at $(cat .wip/COMMIT) -> .wip/"
