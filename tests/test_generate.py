"""examples/generate.py: greedy decoding and beam search of a tiny float32 transformer through the KV cache
(prompts of different lengths, per-row lengths, beams reordered in the cache), dense and paged (blocks of 16
and of 3 tokens). Every step's logits, computed through the cache, == the logits of the whole sequence
recomputed without a cache (same backend), on both backends (triton in the interpreter on a CPU-only
machine)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from _helpers import assert_same_result

EXAMPLE = Path(__file__).parent.parent / "examples" / "generate.py"
BACKENDS = ("triton", "torch")
# dense KVCache; paged with blocks a kernel tile divides (16) and with an odd size (3: a table entry per key)
CACHES = ("dense", "paged16", "paged3")
PROMPTS = [[5, 17, 42, 8, 1, 56, 3], [60], [9, 9, 30]]


@pytest.fixture(scope="module")
def generate():
    spec = importlib.util.spec_from_file_location("generate_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _model(generate, device):
    cfg = generate.Config(vocab=61, hidden=48, heads=4, kv_heads=2, layers=2, mlp=96)
    return generate.TinyDecoder(cfg, seed=3).to(device)


def _make_caches(generate, cache: str):
    return generate.DenseCaches if cache == "dense" else generate.paged(int(cache.removeprefix("paged")))


def _check_trace(generate, model, trace, backend: str) -> None:
    assert len(trace.logits) == len(trace.sequences)
    for step, (rows, logits) in enumerate(zip(trace.sequences, trace.logits, strict=True)):
        assert logits.dtype == torch.float32 and logits.shape == (len(rows), model.cfg.vocab)
        expected = generate.recompute(model, rows, backend).cpu()
        assert_same_result(f"step {step} logits (cached vs recomputed)", logits, expected)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_logits_match_recompute(generate, backend, cache, device):
    """Each step's logits of every row == the recomputed ones, and each generated token is the argmax of
    the previous step's logits."""
    model, new_tokens = _model(generate, device), 4
    trace = generate.greedy(model, PROMPTS, new_tokens, backend, _make_caches(generate, cache))
    assert len(trace.sequences) == new_tokens + 1
    for prompt, row in zip(PROMPTS, trace.sequences[-1], strict=True):
        assert row[: len(prompt)] == prompt and len(row) == len(prompt) + new_tokens
    for step in range(1, len(trace.sequences)):
        tokens = [row[-1] for row in trace.sequences[step]]
        assert tokens == trace.logits[step - 1].argmax(-1).tolist()
    _check_trace(generate, model, trace, backend)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_search_logits_match_recompute(generate, backend, cache, device):
    """Each step's logits of every beam row == the recomputed ones for that beam's sequence; some step moves
    a beam onto another's history (so the cache reorder is exercised), and each prompt's result is one of
    its final beams."""
    model, beams, new_tokens = _model(generate, device), 3, 3
    prompts = PROMPTS[:2]
    trace, best = generate.beam_search(
        model, prompts, beams, new_tokens, backend, _make_caches(generate, cache)
    )
    assert len(trace.sequences) == new_tokens + 1
    moved = any(
        row[:-1] != before
        for step in range(2, len(trace.sequences))
        for row, before in zip(trace.sequences[step], trace.sequences[step - 1], strict=True)
    )
    assert moved, "no beam changed parent: pick prompts or a seed where the reorder matters"
    final = trace.sequences[-1]
    for p, (prompt, seq) in enumerate(zip(prompts, best, strict=True)):
        assert seq in final[p * beams : (p + 1) * beams] and seq[: len(prompt)] == prompt
    _check_trace(generate, model, trace, backend)


@pytest.mark.parametrize("cache", ["dense", "paged"])
def test_example_runs(generate, monkeypatch, capsys, cache):
    argv = ["generate.py", "--backend", "torch", "--new-tokens", "3", "--beams", "2", "--cache", cache]
    monkeypatch.setattr(sys, "argv", [*argv, "--block-size", "4"])
    generate.main()
    out = capsys.readouterr().out
    assert "greedy" in out and "beam 2" in out and "recomputed" in out and f"{cache} cache" in out
