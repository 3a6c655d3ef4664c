"""benchmarks/registry.py's FlashAttention-4 provider: it maps our BHSD tensors onto FA4's BSHD
flash_attn_func (checked with a stand-in flash_attn.cute module that computes attention in BSHD), joins the
default GPU set only where FA4 is installed, and says how to install it where it is not."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch
from _helpers import assert_same_result

from benchmarks import registry
from flashattention import reference


def _stand_in_fa4(monkeypatch: pytest.MonkeyPatch, calls: list) -> None:
    """flash_attn.cute whose flash_attn_func takes BSHD q, k, v and returns (out BSHD, lse) as FA4 does."""

    def flash_attn_func(q, k, v, causal=False):
        calls.append(tuple(t.shape for t in (q, k, v)))
        out, _ = reference.attention_reference(*(t.transpose(1, 2) for t in (q, k, v)), causal=causal)
        return out.transpose(1, 2), None

    for name in ("flash_attn", "flash_attn.cute"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["flash_attn.cute"].flash_attn_func = flash_attn_func


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fa4_provider_maps_bhsd_onto_bshd(monkeypatch, causal):
    calls: list = []
    _stand_in_fa4(monkeypatch, calls)
    shape = registry.Shape(batch=2, heads=3, seqlen=37, head_dim=16, causal=causal)
    fn = registry.PROVIDERS["fa4"].make(shape, torch.device("cpu"))
    q, k, v = (torch.randn(2, 3, 37, 16, dtype=torch.float64) for _ in range(3))
    out = fn(q, k, v)
    assert calls == [((2, 37, 3, 16),) * 3], "FA4 must get BSHD tensors"
    assert out.shape == q.shape
    expected, _ = reference.attention_reference(q, k, v, causal=causal)
    assert_same_result(f"fa4 provider {causal=}", out, expected)


def test_fa4_provider_without_fa4_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn raises ImportError
    assert not registry._fa4_installed()
    shape = registry.Shape(batch=1, heads=1, seqlen=8, head_dim=16, causal=False)
    with pytest.raises(RuntimeError, match="pip install flash-attn-4"):
        registry.PROVIDERS["fa4"].make(shape, torch.device("cpu"))
