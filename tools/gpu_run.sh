#!/usr/bin/env bash
# The GPU machine's work in as few device calls as fit its 10-minute limit per command:
#   bash tools/gpu_run.sh tests          # info + the GPU test suite, without the config sweep (MARKER: another -m,
#                                        # K: a -k expression)
#   bash tools/gpu_run.sh configs        # the GPU tests of every table config (bf16 and fp32 tables)
#   bash tools/gpu_run.sh alltests       # both test sets in one call
#   bash tools/gpu_run.sh suite          # every test of tests/, the CPU suite's too, on the GPU
#                                        # (TEST_PATHS="tests/test_gpu.py tests/test_decode.py": some files only)
#   bash tools/gpu_run.sh tune [ARGS]    # tools.tune (every config + candidates; ARGS e.g. --seqlen 1024,8192)
#   bash tools/gpu_run.sh bench [ARGS]   # the benchmark against the peers (ARGS go to benchmarks.run); with
#                                        # .prev/ (tools/prev_package.sh COMMIT) add --providers ...,ours-prev
#   bash tools/gpu_run.sh first [ARGS]   # benchmarks.first_call: time to first result, cold and warm cache
#                                        # (ARGS e.g. --dims 64 --setups 0,2 --providers ours,ours-nowarm,sdpa)
#   bash tools/gpu_run.sh all [ARGS]     # tests, then the benchmark
#   bash tools/gpu_run.sh varlen [ARGS]  # varlen's GPU tests (the Gluon configs' with them), then benchmarks.varlen
#   bash tools/gpu_run.sh serving [ARGS] # the decode, paged and CUDA-graph GPU tests, then the decode suite
#                                        # (ARGS go to it, e.g. --providers ours,ours-prev,sdpa-flash,sdpa-cudnn),
#                                        # benchmarks.paged in both page orders and benchmarks.varlen
#   bash tools/gpu_run.sh profile        # Nsight Compute on the dK/dV kernel of tools.ncu_bwd's calls, one report per
#                                        # PROFILE entry (';'-separated tools.ncu_bwd arguments): details and
#                                        # per-SASS-line source counters as text
#   bash tools/gpu_run.sh gluon          # the Gluon kernels: their GPU tests, then the forward's configs timed
#                                        # (SEQLEN=2048,8192 DIMS=64,128 KERNELS=fwd,bwd_dkdv to choose;
#                                        # GLUON_K="gluon and HOST_DESC": which configs' GPU tests run, a -k)
# Outputs go to $OUT (the device tool's folder) or ./out: logs, bench.json, bench.png and RESULTS_entry.md
# to append to benchmarks/RESULTS.md. The last lines printed are the summary (tests) or the table (bench).
set -uo pipefail
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd):$(pwd)/.prev" PYTHONUNBUFFERED=1
mode="${1:-all}"
shift || true

run_tests() {  # $1: the pytest marker expression, $2: the log's name, then more pytest arguments
    python -m flashattention info 2>&1 | tee "$OUT/info.log"
    echo "== GPU tests: $1"
    # one pytest process per 2 cores: each test case compiles its own kernel variants (CPU-bound)
    python -m tools.pytest_shards --jobs "${JOBS:-$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))}" --timeout "${SHARD_TIMEOUT:-480}" \
        --log-dir "$OUT/$2" -- -m "$1" "${@:3}" ${TEST_PATHS:-tests} >"$OUT/$2.log" 2>&1
    local rc=$?
    tail -n 60 "$OUT/$2.log"
    echo "gpu tests exit code: $rc"
    return $rc
}

run_bench() {
    echo "== compiling the benchmark's kernels in parallel (Triton's disk cache then serves the timing)"
    python -m tools.warm --dims "${WARM_DIMS:-64,128}" --seqlens "${WARM_SEQLENS:-2048,4096,8192,16384}"
    if [ -d .prev/flashattention_prev ]; then
        python -m tools.warm --module flashattention_prev --dims "${WARM_DIMS:-64,128}" \
            --seqlens "${WARM_SEQLENS:-2048,4096,8192,16384}"
    fi
    echo "== benchmark"
    python -m benchmarks.run --json "$OUT/bench.json" --plot "$OUT/bench.png" \
        --results-md "$OUT/RESULTS_entry.md" "$@" >"$OUT/bench_table.md" 2>"$OUT/bench.log"
    local rc=$?
    tail -n 5 "$OUT/bench.log"
    echo "bench exit code: $rc"
    cat "$OUT/bench_table.md"
    return $rc
}

case "$mode" in
    tests)  # K: a pytest -k expression, if any
        if [ -n "${K:-}" ]; then run_tests "${MARKER:-gpu and not configs}" gpu_tests -k "$K"
        else run_tests "${MARKER:-gpu and not configs}" gpu_tests; fi ;;
    alltests) run_tests gpu gpu_tests ;;
    suite) run_tests "gpu or not gpu" gpu_suite ;;
    configs) run_tests "gpu and configs" gpu_configs ;;
    bench) run_bench "$@" ;;
    first)
        python -m benchmarks.first_call --json "$OUT/first_call.json" "$@" 2>"$OUT/first_call.log"
        echo "first_call exit code: $?" ;;
    tune)
        python -m flashattention info 2>&1 | tee "$OUT/info.log"
        python -m tools.tune --json "$OUT/tune.json" "$@" >"$OUT/tune.log" 2>&1
        rc=$?
        sed -n "/  bf16$/,\$p" "$OUT/tune.log" | tail -n 120  # the table, printed last
        echo "tune exit code: $rc"
        exit $rc ;;
    gluon)
        run_tests "gpu and configs" gpu_gluon_tests -k "${GLUON_K:-gluon}"; tests_rc=$?
        timeout "${TUNE_TIMEOUT:-400}" python -m tools.tune --seqlen "${SEQLEN:-2048,8192,16384}" \
            --dims "${DIMS:-64,128,256}" --kernels "${KERNELS:-fwd}" --json "$OUT/tune.json" >"$OUT/tune.log" 2>&1
        rc=$?
        sed -n "/  bf16$/,\$p" "$OUT/tune.log" | tail -n 140
        echo "tune exit code: $rc"
        exit $((tests_rc || rc)) ;;
    profile)
        rc=0; n=0
        IFS=';' read -ra specs <<<"${PROFILE:---dim 64 --seqlen 8192;--dim 64 --seqlen 8192 --candidate 0;--dim 64 --seqlen 8192 --candidate 1}"
        for spec in "${specs[@]}"; do
            n=$((n + 1))
            python -m tools.ncu_bwd $spec --calls 1 >/dev/null 2>&1  # compiles outside the profiler
            ncu --clock-control none -k regex:attn_bwd_dkdv --launch-skip 1 --launch-count 1 --set full \
                --import-source no -f -o "$OUT/prof$n" python -m tools.ncu_bwd $spec --calls 2 \
                >"$OUT/prof$n.log" 2>&1 || rc=1
            ncu --import "$OUT/prof$n.ncu-rep" --page details >"$OUT/prof${n}_details.txt" 2>&1 || rc=1
            ncu --import "$OUT/prof$n.ncu-rep" --page source --csv --print-source sass \
                >"$OUT/prof${n}_sass.csv" 2>&1 || rc=1
            rm -f "$OUT/prof$n.ncu-rep"
            echo "== $spec"; head -n 3 "$OUT/prof$n.log"
            grep -E "Duration|Compute \(SM\) Throughput|Registers Per|Shared Memory Configuration Size|Issue Slots Busy|No Eligible|Active Warps Per Scheduler|Eligible Warps" "$OUT/prof${n}_details.txt" | head -n 12
        done
        echo "profile exit code: $rc"
        exit $rc ;;
    varlen)
        TEST_PATHS="${TEST_PATHS:-tests/test_gpu.py tests/test_varlen.py tests/test_compat_varlen.py}" \
            run_tests "gpu or not gpu" gpu_varlen -k "varlen or gluon_forward or gluon_dkdv"; tests_rc=$?
        python -m benchmarks.varlen --json "$OUT/varlen.json" "$@" >"$OUT/varlen.md" 2>"$OUT/varlen.log"
        rc=$?
        tail -n 3 "$OUT/varlen.log"
        cat "$OUT/varlen.md"
        echo "varlen bench exit code: $rc"
        exit $((tests_rc || rc)) ;;
    serving)
        TEST_PATHS="${TEST_PATHS:-tests/test_decode.py tests/test_paged.py tests/test_cuda_graph.py}" \
            run_tests "gpu or not gpu" gpu_serving; tests_rc=$?
        python -m benchmarks.run --suite decode --json "$OUT/decode.json" "$@" >"$OUT/decode.md" 2>"$OUT/decode.log"
        rc=$?
        for order in random sequential; do
            python -m benchmarks.paged --order "$order" >"$OUT/paged_$order.md" 2>&1 || rc=1
        done
        python -m benchmarks.varlen --json "$OUT/varlen.json" >"$OUT/varlen.md" 2>"$OUT/varlen.log" || rc=1
        cat "$OUT/decode.md" "$OUT/paged_random.md" "$OUT/paged_sequential.md"
        grep "^| " "$OUT/varlen.md"
        echo "serving benchmarks exit code: $rc"
        exit $((tests_rc || rc)) ;;
    all)
        run_tests gpu gpu_tests; tests_rc=$?
        run_bench "$@"; bench_rc=$?
        exit $((tests_rc || bench_rc)) ;;
    *) echo "usage: $0 tests | configs | alltests | suite | tune [ARGS] | bench [ARGS] | first | all [ARGS] | gluon | varlen [ARGS] | serving [ARGS]" >&2; exit 2 ;;
esac
