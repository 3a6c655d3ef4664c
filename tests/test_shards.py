"""tools/pytest_shards.py, which runs the GPU suite in parallel pytest processes on the device: every
collected test runs exactly once, and one failure anywhere makes the exit code 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SUITE = """
import pytest

@pytest.mark.parametrize("i", range(5))
def test_passes(i):
    assert i < 5

def test_fails_if_asked():
    assert {fail}
"""


def _run_shards(tmp_path: Path, fail: bool) -> subprocess.CompletedProcess:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_sample.py").write_text(SUITE.format(fail=not fail))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    args = ["--jobs", "3", "--timeout", "120", "--log-dir", str(tmp_path / "logs"), "--", str(suite)]
    return subprocess.run(
        [sys.executable, "-m", "tools.pytest_shards", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(not (ROOT / "tools" / "pytest_shards.py").exists(), reason="needs tools/")
@pytest.mark.parametrize("fail", [False, True])
def test_shards_run_every_test_once_and_report_failures(tmp_path: Path, fail: bool) -> None:
    result = _run_shards(tmp_path, fail)
    out = result.stdout + result.stderr
    assert result.returncode == (1 if fail else 0), out
    assert "; 6 tests" in out, out
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("shard*.log")))
    passed = sum(int(line.split(" passed")[0].split()[-1]) for line in out.splitlines() if " passed" in line)
    assert passed == (5 if fail else 6), out
    assert ("FAILED" in logs and "test_fails_if_asked" in out) == fail, out
