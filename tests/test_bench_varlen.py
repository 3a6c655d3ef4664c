"""benchmarks/varlen.py runs end to end on one tiny shape (on the CPU: ours on triton in the interpreter,
SDPA's default CPU backend): the check, every provider's cell, the table, the JSON and the RESULTS.md entry.
No timing is asserted."""

from __future__ import annotations

import json

from benchmarks import varlen


def test_varlen_benchmark_runs_one_tiny_shape(tmp_path, capsys, device):
    out_json, results_md = tmp_path / "varlen.json", tmp_path / "RESULTS.md"
    shape, dims = ("4x256", "64") if device == "cuda" else ("2x24", "16")
    argv = ["--shapes", shape, "--dims", dims, "--causal", "true", "--warmup", "0", "--rep", "0",
            "--json", str(out_json), "--results-md", str(results_md)]  # fmt: skip
    assert varlen.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| D, mask | B x max S | tokens (padded) | varlen ms | padded ms | sdpa-padded ms |" in printed
    saved = json.loads(out_json.read_text())
    assert saved["meta"]["suite"] == "varlen" and not saved["meta"]["partial"]
    (row,) = saved["rows"]
    assert row["tokens"] == sum(row["lens"]) <= row["padded_tokens"] and row["causal"]
    assert row["check"].startswith("varlen (out, dq, dk, dv) vs per-sequence dense calls")
    for name in varlen.PROVIDERS:
        result = row["results"][name]
        assert "wrong" not in result and (result["ms"] is None) == ("error" in result), f"{name}: {result}"
    assert row["results"]["varlen"]["ms"] > 0
    assert "| D, mask |" in results_md.read_text()
