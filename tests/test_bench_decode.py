"""The decode suite of the benchmark runs end to end on one tiny shape (the CPU: ours on triton in the
interpreter, against SDPA): the check, every provider's cell or reason, the copy bandwidth, the table and
the JSON. No timing is asserted."""

from __future__ import annotations

import json

from benchmarks import report, run


def test_decode_suite_runs_one_tiny_shape(tmp_path, capsys, device):
    out_json = tmp_path / "decode.json"
    dtype, element_size = ("bf16", 2) if device == "cuda" else ("fp32", 4)  # SDPA flash takes these
    argv = ["--suite", "decode", "--device", device, "--decode-shapes", "2x40", "--backend", "triton",
            "--providers", "ours,sdpa-flash,sdpa-efficient", "--dtype", dtype, "--warmup", "0", "--rep", "0",
            "--json", str(out_json)]  # fmt: skip
    assert run.main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "| batch x cache | ours | sdpa-flash | sdpa-efficient | ours % of copy | ours/best peer |" in printed
    )
    saved = json.loads(out_json.read_text())
    meta, rows = saved["meta"], saved["rows"]
    assert meta["suite"] == "decode" and not meta["partial"] and meta["copy"]["gbps"] > 0
    assert len(rows) == 1
    row = rows[0]
    assert (row["batch"], row["cache"], row["heads"], row["kv_heads"], row["head_dim"]) == (2, 40, 32, 8, 128)
    assert row["kv_bytes"] == 2 * 2 * 8 * 40 * 128 * element_size
    assert row["check"].startswith("vs sdpa-flash")
    ours = row["results"]["ours"]
    assert ours["ms"] > 0 and ours["kv"] == "gqa" and "wrong" not in ours
    assert ours["gbps"] == row["kv_bytes"] / (ours["ms"] * 1e-3) / 1e9
    for name in ("sdpa-flash", "sdpa-efficient"):
        result = row["results"][name]
        assert (result["ms"] is None) == ("error" in result), f"{name}: {result}"


def test_decode_table_marks_expanded_kv_and_ratios():
    """Ratios are the best peer's time over ours; a provider given expanded K/V is starred and noted."""
    row = {"suite": "decode", "dtype": "bf16", "batch": 1, "cache": 8192, "results": {
        "ours": {"ms": 0.010, "gbps": 3000.0, "pct_copy": 100.0, "kv": "gqa"},
        "sdpa-flash": {"ms": 0.020, "gbps": 1500.0, "kv": "gqa"},
        "sdpa-cudnn": {"ms": 0.040, "gbps": 750.0, "kv": "expanded"},
        "flex": {"ms": None, "gbps": None, "error": "RuntimeError: no"},
    }}  # fmt: skip
    table = report.format_decode_table([row], ["ours", "sdpa-flash", "sdpa-cudnn", "flex"], 3000.0)
    assert "| 1 x 8k | 3000 | 1500 | 750* | - | 100% | 2.00 | 2.00 | 4.00 |" in table
    assert "sdpa-cudnn: the backend rejects enable_gqa=True" in table
    assert "decode 1x8192" in report.format_problems([row])
