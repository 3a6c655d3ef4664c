"""The default config of every table entry compiles for Hopper (sm_90a) and fits its shared memory, checked
on any machine: Triton compiles ahead of time without a GPU (benchmarks/aot.py, in a subprocess because
TRITON_INTERPRET, set for the other tests, turns the kernels into interpreted functions)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (ROOT / "benchmarks" / "aot.py").exists(), reason="needs the checkout's benchmarks/")
def test_default_configs_compile_for_sm90_and_fit_shared_memory() -> None:
    pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.aot", "--defaults"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "| sm90 | fwd | 128 |" in result.stdout and "| sm90-fp32 | bwd_dkdv | 256 |" in result.stdout
