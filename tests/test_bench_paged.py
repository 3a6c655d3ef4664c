"""benchmarks/paged.py: its pools hold the dense cache (each block of the table where the table says, in
either page order), and the script runs end to end on its tiny CPU shapes (our decode kernel in the
interpreter) with every paged row checked against dense. No timing is asserted."""

from __future__ import annotations

import pytest
import torch

from benchmarks import paged


@pytest.mark.parametrize("order", ["random", "sequential"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_pages_hold_the_dense_cache(order: str, block_size: int) -> None:
    torch.manual_seed(0)
    batch, kv_heads, seqlen, dim = 3, 2, 37, 8
    k, v = torch.randn(2, batch, kv_heads, seqlen, dim).unbind(0)
    key_pool, value_pool, table = paged.to_pages(k, v, block_size, order)
    per_row = -(-seqlen // block_size)
    assert table.dtype == torch.int32 and table.shape == (batch, per_row)
    assert sorted(table.flatten().tolist()) == list(range(batch * per_row))  # every block used once
    if order == "sequential":
        assert table.flatten().tolist() == list(range(batch * per_row))
    for pool, dense in ((key_pool, k), (value_pool, v)):
        rows = pool[table.long()]  # [batch, per_row, kv_heads, block_size, dim]
        gathered = rows.transpose(1, 2).reshape(batch, kv_heads, per_row * block_size, dim)[:, :, :seqlen]
        assert torch.equal(gathered, dense)


def test_paged_benchmark_runs(capsys, device) -> None:
    if device == "cuda":
        pytest.skip("the GPU shapes are the benchmark's own (minutes); the CPU shapes check the script")
    assert paged.main(["--order", "sequential", "--warmup", "0", "--rep", "0"]) == 0
    printed = capsys.readouterr().out
    assert "pages in sequential order" in printed
    rows = [line for line in printed.splitlines() if line[:3].strip("| ").isdigit()]
    assert len(rows) == len(paged.CPU_SHAPES) and not any("WRONG" in line for line in rows)
