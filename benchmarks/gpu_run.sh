#!/usr/bin/env bash
# Everything for one call of the GPU machine: info, the GPU test suite, every autotune config checked
# and timed, then the full benchmark against the peers. The benchmark table prints last.
#   bash benchmarks/gpu_run.sh [extra args for benchmarks.run]
# Outputs go to $OUT (the device tool's folder) or ./out: logs, JSON, PNG and RESULTS_entry.md to append
# to benchmarks/RESULTS.md.
set -uo pipefail
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1

python -m flashattention info 2>&1 | tee "$OUT/info.log"
echo "== GPU tests"
python -m pytest -m gpu tests -q -rs -p no:cacheprovider >"$OUT/gpu_tests.log" 2>&1
tests_rc=$?
tail -n 25 "$OUT/gpu_tests.log"
echo "== benchmark"
python -m benchmarks.run --json "$OUT/bench.json" --plot "$OUT/bench.png" \
    --results-md "$OUT/RESULTS_entry.md" "$@" >"$OUT/bench_table.md" 2>"$OUT/bench.log"
bench_rc=$?
tail -n 5 "$OUT/bench.log"
echo "gpu tests exit code: $tests_rc, bench exit code: $bench_rc"
cat "$OUT/bench_table.md"
