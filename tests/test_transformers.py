"""The transformers integration (flashattention/integrations/transformers.py): a tiny random Llama-style
model (no download) with attn_implementation="fa_triton", prefill of left-padded prompts and greedy
`generate` through the KV cache, against the same model on transformers' "sdpa" attention in float64 (the
oracle) and in the test's dtype (the same-dtype computation), by the tolerance rule; a sliding-window model
(Mistral); masks that are not per-row key ranges go to SDPA; unsupported arguments raise."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from _helpers import compare_to_reference

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")  # CI installs it (.[test,hf]); skipped only without it

import flashattention.integrations.transformers as fa_hf  # noqa: E402

VOCAB = 97
# attn_implementation names for each backend (register() once per name)
NAMES = {
    backend: fa_hf.register(f"fa_triton_test_{backend}", backend=backend) for backend in ("torch", "triton")
}


# greedy generation of 4 tokens with every step's logits
GENERATE = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _config(kind: str = "llama", **extra):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        **extra,
    )
    if kind == "mistral":
        return transformers.MistralConfig(**common)
    return transformers.LlamaConfig(**common)


def _models(config, name: str, dtype: torch.dtype, device: str):
    """(ours, sdpa in dtype, sdpa in float64 (float32 on the GPU for low-precision dtypes)): one set of
    random weights."""

    def build(attn_implementation: str):  # a config each: a model keeps (and sets) its config's attention
        return cls.from_config(copy.deepcopy(config), attn_implementation=attn_implementation).eval()

    cls = transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    sdpa = build("sdpa")
    ours, ref = build(name), build("sdpa")
    ours.load_state_dict(sdpa.state_dict())
    ref.load_state_dict(sdpa.state_dict())
    assert ours.config._attn_implementation == name and sdpa.config._attn_implementation == "sdpa"
    ref_dtype = torch.float64 if device == "cpu" or dtype == torch.float32 else torch.float32
    return ours.to(device, dtype), sdpa.to(device, dtype), ref.to(device, ref_dtype)


def _prompts(device: str):
    """Three prompts of 9, 5 and 8 tokens, left-padded to 9 (pad id 0), and their mask."""
    ids = torch.randint(1, VOCAB, (3, 9), device=device)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=_positions(mask)).logits


@pytest.fixture
def no_fallback(monkeypatch):
    """Fails a test whose masks would go to SDPA (they must all run on our kernels)."""

    def fail():
        raise AssertionError("a mask went to the SDPA fallback")

    monkeypatch.setattr(fa_hf, "_warn_fallback", fail)


def _assert_rule(name: str, ours, ref, same) -> None:
    message = compare_to_reference(name, ours, ref, same)
    assert message is None, message


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["llama", "mistral-window3"])
def test_prefill_left_padded(kind, backend, device, no_fallback):
    """Left-padded prompts in one forward: the logits of every real token match SDPA's by the rule."""
    config = _config("mistral", sliding_window=3) if kind.startswith("mistral") else _config()
    ours, sdpa, ref = _models(config, NAMES[backend], torch.float32, device)
    ids, mask = _prompts(device)
    real = mask.bool()
    got, same, expected = (_logits(m, ids, mask)[real] for m in (ours, sdpa, ref))
    _assert_rule("logits", got, expected, same)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_generate_greedy_with_cache(backend, device, no_fallback):
    """generate (greedy, 4 new tokens, DynamicCache) from left-padded prompts: every step's logits, made
    through the cache (decode over per-row key ranges), match SDPA's logits of the same sequences computed
    without a cache, and the tokens are SDPA's own greedy choice."""
    ours, sdpa, ref = _models(_config(), NAMES[backend], torch.float32, device)
    ids, mask = _prompts(device)
    kwargs = dict(GENERATE, attention_mask=mask)
    with torch.no_grad():
        result = ours.generate(ids, **kwargs)
        expected_tokens = sdpa.generate(ids, **kwargs).sequences
    assert torch.equal(result.sequences, expected_tokens)
    steps = torch.stack(result.logits, dim=1)  # [batch, new, vocab]: the logits each new token came from
    full = result.sequences
    full_mask = torch.cat([mask, torch.ones_like(full[:, ids.shape[1] :])], dim=1)
    at = slice(ids.shape[1] - 1, full.shape[1] - 1)  # positions whose logits chose the new tokens
    expected, same = (_logits(m, full, full_mask)[:, at] for m in (ref, sdpa))
    _assert_rule("generate logits", steps, expected, same)


def test_unpadded_batch_is_one_call(monkeypatch):
    """Without padding transformers passes no mask: one flash_attention call per layer, causal."""
    calls = []
    real = fa_hf.flash_attention
    monkeypatch.setattr(fa_hf, "flash_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    ours, sdpa, ref = _models(_config(), NAMES["torch"], torch.float32, "cpu")
    ids = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    got, same, expected = (_logits(m, ids, mask) for m in (ours, sdpa, ref))
    _assert_rule("logits", got, expected, same)
    assert len(calls) == 2 and all(kw.get("causal") for kw in calls)


def test_other_masks_go_to_sdpa():
    """A mask that is not per-row key ranges (here: a block-diagonal one of packed sequences) is computed by
    transformers' SDPA attention, with a warning; the result equals SDPA's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(1, 2, 6, 16)
    k, v = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    seq = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = (seq[:, None] == seq[None, :]) & torch.ones(6, 6, dtype=torch.bool).tril()
    mask = mask[None, None]
    fa_hf._warn_fallback.cache_clear()
    with pytest.warns(UserWarning, match="SDPA"):
        out, _ = fa_hf.flashattention_forward(module, q, k, v, mask, scaling=0.25)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert torch.equal(out, expected)


def test_per_row_ranges_are_recognised():
    """Left padding, right padding and a sliding window are per-row key ranges; a hole is not."""
    causal = torch.ones(5, 7, dtype=torch.bool).tril(diagonal=2)  # bottom-right causal, 5 queries, 7 keys
    mask = causal[None].repeat(2, 1, 1)
    mask[0, :, :3] = False  # row 0: left padding of 3
    mask[1, :, 6:] = False  # row 1: keys [0, 6) -- then its causal diagonal moves: not this pattern
    assert fa_hf._infer_rows(mask[:1, None], True, -1) == ([3], [7])
    assert fa_hf._infer_rows(mask[1:, None], True, -1) is None
    hole = causal[None, None].clone()
    hole[..., 1] = False
    assert fa_hf._infer_rows(hole, True, -1) is None
    window = causal & torch.ones(5, 7, dtype=torch.bool).triu(diagonal=1)  # keys within 1 of the diagonal
    assert fa_hf._infer_rows(window[None, None], True, 1) == ([1], [7])


def test_masks_under_inference_mode():
    """A padding mask made under torch.inference_mode (no version counter) works and is read on every call:
    a mask changed in place under inference mode gives the new mask's result."""
    module = torch.nn.Module()
    module.is_causal = True
    with torch.inference_mode():
        q, k, v = (torch.randn(2, 2, 4, 16) for _ in range(3))
        mask = torch.ones(2, 1, 4, 4, dtype=torch.bool).tril()
        mask[0, :, :, :1] = False  # row 0: one left-padding key
        first, _ = fa_hf.flashattention_forward(module, q, k, v, mask, scaling=0.25)
        mask[0, :, :, 1] = False  # row 0: two left-padding keys now
        second, _ = fa_hf.flashattention_forward(module, q, k, v, mask, scaling=0.25)
        fresh, _ = fa_hf.flashattention_forward(module, q, k, v, mask.clone(), scaling=0.25)
    assert torch.equal(second, fresh)
    assert not torch.equal(first[0, 2:], second[0, 2:])  # the rows that see the changed key


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_batch_one_mask_applies_to_every_row(backend):
    """A 4-D mask of batch 1 (a user's, as SDPA broadcasts it) with a key range that is not the whole
    sequence: every row of the batch takes it, and the result equals SDPA's (it failed on a size mismatch)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = (torch.randn(2, 2, 6, 16) for _ in range(3))
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    mask = ((j >= 2) & (j <= i))[None, None]  # keys from 2 on, causal: rows 0 and 1 see none
    out, _ = fa_hf.flashattention_forward(module, q, k, v, mask, scaling=0.25, backend=backend)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask.expand(2, -1, -1, -1), scaling=0.25)
    rows = slice(2, None)  # SDPA gives NaN where a row sees no key, ours 0
    torch.testing.assert_close(out[:, rows], expected[:, rows], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))


def test_unsupported_raise():
    module = torch.nn.Module()
    q = torch.randn(1, 2, 3, 16)
    with pytest.raises(NotImplementedError, match="dropout"):
        fa_hf.flashattention_forward(module, q, q, q, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="softcap"):
        fa_hf.flashattention_forward(module, q, q, q, None, softcap=50.0)
    with pytest.raises(NotImplementedError, match="s_aux"):
        fa_hf.flashattention_forward(module, q, q, q, None, s_aux=torch.zeros(2))
    with pytest.raises(ValueError, match="flash"):
        fa_hf.register("flashattention")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_generate_gpu(dtype, no_fallback):
    """On a GPU (triton backend, default name): prefill and greedy generate, the rule against SDPA in the
    same dtype and in float32."""
    name = fa_hf.register()
    ours, sdpa, ref = _models(_config(), name, dtype, "cuda")
    ids, mask = _prompts("cuda")
    real = mask.bool()
    got, same, expected = (_logits(m, ids, mask)[real] for m in (ours, sdpa, ref))
    _assert_rule("logits", got, expected, same)
    kwargs = dict(GENERATE, attention_mask=mask)
    with torch.no_grad():
        result = ours.generate(ids, **kwargs)
    full = result.sequences
    full_mask = torch.cat([mask, torch.ones_like(full[:, ids.shape[1] :])], dim=1)
    at = slice(ids.shape[1] - 1, full.shape[1] - 1)
    expected, same = (_logits(m, full, full_mask)[:, at] for m in (ref, sdpa))
    _assert_rule("generate logits", torch.stack(result.logits, dim=1), expected, same)


def test_output_attentions_warns():
    """output_attentions=True gets no weights: a warning says so (it was silent)."""
    ours, _, _ = _models(_config(), NAMES["torch"], torch.float32, "cpu")
    fa_hf._warn_no_weights.cache_clear()
    with pytest.warns(UserWarning, match="output_attentions"):
        with torch.no_grad():
            ours(torch.randint(1, VOCAB, (1, 6)), output_attentions=True)
