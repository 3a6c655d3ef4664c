"""Runs a pytest selection in N processes at once on one machine, so that the Triton compiles (CPU-bound,
seconds per kernel variant, one variant per test case) use the device machine's cores instead of one.

Usage: python -m tools.pytest_shards --jobs 8 --log-dir out --timeout 480 -- -m "gpu" tests

The test ids are collected once and dealt round-robin into the shards; each shard is one pytest process
with its own log (`shard<i>.log`). A shard still running at --timeout is killed and counted as failed.
Prints one line per shard and the failing/erroring/skipped lines of every log; exit code 0 only when every
shard passed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def collect(pytest_args: list[str]) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *pytest_args],
        capture_output=True,
        text=True,
    )
    ids = [line for line in result.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if result.returncode not in (0, 5) or not ids:
        # a bad -k or -m expression still lists every test before its error: run none of them
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        return []
    return ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--log-dir", default="out")
    p.add_argument("--timeout", type=float, default=480.0, help="seconds before a shard is killed")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: the selection (marker, paths)")
    args = p.parse_args(argv)
    pytest_args = [a for a in args.pytest_args if a != "--"]
    ids = collect(pytest_args)
    if not ids:
        print("no tests collected")
        return 1
    os.makedirs(args.log_dir, exist_ok=True)
    shards = [ids[i :: args.jobs] for i in range(min(args.jobs, len(ids)))]
    start = time.monotonic()
    procs = []
    for i, shard in enumerate(shards):
        log = open(os.path.join(args.log_dir, f"shard{i}.log"), "w")
        # -v names each test as it starts (the last name in a killed shard's log is the one that ran long);
        # faulthandler prints the stacks of a test still running after the timeout
        cmd = [sys.executable, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", "--durations=5"]
        cmd += ["-o", f"faulthandler_timeout={int(args.timeout * 0.9)}"]
        cmd += shard  # explicit ids: the marker expression was applied when collecting
        procs.append((i, len(shard), log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
    failed = 0
    for i, count, log, proc in procs:
        remaining = max(1.0, args.timeout - (time.monotonic() - start))
        try:
            rc = proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "killed at timeout"
        log.close()
        failed += rc != 0
        print(f"shard {i}: {count} tests, exit {rc}, {time.monotonic() - start:.0f} s")
    for i, *_ in procs:
        with open(os.path.join(args.log_dir, f"shard{i}.log")) as f:
            lines = f.read().splitlines()
        keep = [ln for ln in lines if ln.startswith(("FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS"))]
        print(f"-- shard {i}: {lines[-1] if lines else '(empty log)'}")
        print("\n".join(keep))
    print(f"shards failed: {failed} of {len(procs)}; {len(ids)} tests")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
