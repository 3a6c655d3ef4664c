"""The default config of every table entry compiles for Hopper (sm_90a) and fits its shared memory, checked
on any machine: Triton compiles ahead of time without a GPU (tools/aot.py, in a subprocess because
TRITON_INTERPRET, set for the other tests, turns the kernels into interpreted functions)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _compile_on_cpu(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """Runs `python ARGS` from the checkout without TRITON_INTERPRET (which would turn the kernels into
    interpreted functions) and asserts that it succeeded."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.mark.skipif(not (ROOT / "tools" / "aot.py").exists(), reason="needs the checkout's tools/")
def test_default_configs_compile_for_sm90_and_fit_shared_memory() -> None:
    pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")
    result = _compile_on_cpu(["-m", "tools.aot", "--defaults"], timeout=900)
    assert "| sm90 | fwd | 128 |" in result.stdout and "| sm90-fp32 | bwd_dkdv | 256 |" in result.stdout


# Table configs may not spill, but PERSISTENT ones may spill a few loop-carried scalars and the Gluon dK/dV
# at D128 / 256 its loop scalars and addresses: both measured faster than spill-free configs all the same
# (benchmarks/NOTES.md has the bytes per triton version); candidates only have to compile and fit (their
# spills are what tune runs measure)
GLUON_SCRIPT = """
from tools import aot
from tools.tune import tables_and_candidates
from flashattention.kernels import configs, registry
in_table = {id(c) for c in (e[3] for e in configs.all_configs())}
n = 0
for kernel, table, dim, cfg in tables_and_candidates():
    if cfg.kwargs.get("GLUON_WS"):
        r = aot.compile_config(kernel, cfg, dim, False)
        assert r["shared"] <= aot.SHARED_LIMIT and r["wgmma"] > 0, (dim, cfg, r)
        assert not r["serialized"], (dim, cfg, "ptxas serialized its wgmma", r)
        if id(cfg) in in_table:
            # the Gluon dK/dV's loop scalars and addresses (LDL hits in L1; benchmarks/NOTES.md)
            dkdv = {128: 320, 256: 400}.get(dim, 0) if kernel == "bwd_dkdv" else 0
            allowed = 192 if cfg.kwargs.get("PERSISTENT") else dkdv
            assert r["spills"] <= allowed, (dim, cfg, r)
            if registry.KERNELS[kernel].takes_varlen(cfg):  # the IS_VARLEN specialisation as well
                r = aot.compile_config(kernel, cfg, dim, False, varlen=True)
                assert r["shared"] <= aot.SHARED_LIMIT and r["wgmma"] > 0, (dim, cfg, "varlen", r)
        n += 1
print("compiled", n)
"""


@pytest.mark.skipif(not (ROOT / "tools" / "aot.py").exists(), reason="needs the checkout's tools/")
def test_gluon_configs_compile_for_sm90_without_spills() -> None:
    """The Gluon kernels (kernels/fwd_ws.py, bwd_ws.py) cannot run in the interpreter; this at least compiles
    every GLUON_WS config for sm_90a on the CPU, through ptxas, and checks shared memory and wgmma use (none
    serialized by ptxas), and the spills of the table's configs; those of the table that take varlen
    launches, with IS_VARLEN too."""
    pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")
    pytest.importorskip("triton.experimental.gluon", reason="triton without Gluon")
    result = _compile_on_cpu(["-c", GLUON_SCRIPT], timeout=900)
    assert "compiled" in result.stdout and "compiled 0" not in result.stdout, result.stdout


DECODE_SCRIPT = """
import re
from tools import aot
for split in (True, False):
    depths = {}
    for page_size in (None, 16, 256):
        ttgir = aot.compile_decode(split, page_size).asm["ttgir"]
        # the K and V tiles' shared ring buffers: !ttg.memdesc<DEPTHx{BLOCK_N}x128xbf16, ...>
        depths[page_size] = sorted(set(int(d) for d in re.findall(r"memdesc<(\\d+)x\\d+x128xbf16", ttgir)))
    print(split, depths)
    assert depths[None] and depths[16] == depths[None] and depths[256] == depths[None], depths
"""


@pytest.mark.skipif(not (ROOT / "tools" / "aot.py").exists(), reason="needs the checkout's tools/")
def test_paged_decode_keeps_as_many_tiles_in_flight_as_dense() -> None:
    """Triton's pipeliner gives a load whose address comes from another load (the paged kernel's K/V rows,
    from the block table) fewer stages of lead than a plain load; the paged launch's config makes up for it,
    so that the compiled paged kernel (pages of 16 and 256) rings as many K/V buffers as the dense one,
    split and unsplit (sm_90a, compiled on the CPU)."""
    pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")
    _compile_on_cpu(["-c", DECODE_SCRIPT], timeout=600)
