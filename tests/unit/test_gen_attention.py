"""Decode attention (grouped queries, rotated-key cache) against float64 references and against the
model's own attention path.

- grouped_attention equals softmax(q k^T * scale, masked) v computed per head in float64 with the
  KV heads repeated, for a decode query with a padding mask, a causal prefill (whole and in query
  blocks) and an explicit mask;
- generation through the rotated-key cache equals generation through megatron's own static KV path
  (forced by setting a capture hook on the last layer, which disables the swap): same tokens and
  log-probs, and the swap is undone afterwards;
- the decode path does not depend on the layer spec: with the Transformer Engine spec named (only the
  backend name is set on this CPU model) generation gives the same tokens and log-probs, an unmasked
  prefill runs the spec's own core attention once per layer, ragged prompts are prefilled per group of
  equal length through it (once per group and layer, no padding mask), and nothing else does (decode
  steps);
- the prefill per equal-length group leaves the state of the left-padded prefill: same logits, positions,
  padding and cache columns.
"""

import math

import pytest
import torch

from megatron_ral.config.schema import GenerationConfig, ParallelConfig
from megatron_ral.inference.attention import MASK_VALUE, decode_attention, grouped_attention, rotated_cache_supported
from megatron_ral.inference.generate import generate
from megatron_ral.inference.session import DecodeSession
from megatron_ral.testing.inference import standard_prompts
from megatron_ral.platform import destroy, initialize


def reference(q, k, v, mask, scale):
    """q (sq,B,H,d), k/v (sk,B,G,d), mask bool (B,1,sq,sk) True = masked, or None (no mask)."""
    sq, b, h, d = q.shape
    r = h // k.shape[2]
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))  # (B, heads, s, d)
    k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(mask, MASK_VALUE)
    out = torch.softmax(scores, dim=-1) @ v  # (B, H, sq, d)
    return out.permute(2, 0, 1, 3).reshape(sq, b, h * d)


@pytest.mark.parametrize("case", ["decode_padding", "causal_prefill", "explicit_mask",
                                  "blocked_prefill", "blocked_explicit_mask"])
def test_grouped_attention_matches_float64(case):
    gen = torch.Generator().manual_seed(0)
    b, h, g, d, sk = 3, 8, 2, 16, 11
    sq = 1 if case == "decode_padding" else sk
    q = torch.randn(sq, b, h, d, generator=gen)
    k = torch.randn(sk, b, g, d, generator=gen)
    v = torch.randn(sk, b, g, d, generator=gen)
    scale = 1 / math.sqrt(d)
    pad = torch.zeros(b, sk, dtype=torch.bool)
    pad[0, :4] = True
    pad[2, :1] = True
    causal = torch.ones(sq, sk, dtype=torch.bool).triu(1)
    if case == "decode_padding":
        mask = pad[:, None, None, :]
        ref_mask = mask
    elif case in ("causal_prefill", "blocked_prefill"):
        mask, ref_mask = None, causal[None, None]
    else:
        mask = causal[None, None] | pad[:, None, None, :]
        ref_mask = mask
    out = grouped_attention(q, k, v, mask, scale, query_block=4 if case.startswith("blocked") else 1024)
    torch.testing.assert_close(out.double(), reference(q, k, v, ref_mask, scale), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def model():
    from megatron_ral.testing.models import seeded_megatron_model

    initialize(ParallelConfig(), seed=1234)
    yield seeded_megatron_model("small", seed=2, backend="local", vision_attn_implementation="eager").eval()
    destroy()


def test_rotated_cache_equals_megatron_static_path(model):
    prompts = list(standard_prompts().values())
    cfg = GenerationConfig(temperature=0.8, top_p=0.9, max_new_tokens=12)
    assert rotated_cache_supported(model)
    fast = generate(model, prompts, cfg, num_samples=2, seed=3, stop_token_ids=[])
    core = model.last_layer_core_attention()
    core.capture_hook = lambda **_: None
    try:
        assert not rotated_cache_supported(model)
        assert DecodeSession(model).rotary is None
        plain = generate(model, prompts, cfg, num_samples=2, seed=3, stop_token_ids=[])
    finally:
        core.capture_hook = None
    for pf, pp in zip(fast, plain):
        for rf, rp in zip(pf, pp):
            assert rf.token_ids.tolist() == rp.token_ids.tolist()
            torch.testing.assert_close(rf.logprobs, rp.logprobs, atol=1e-4, rtol=0)
    originals = [layer.self_attention.core_attention for layer in model.language_model.decoder.layers]
    with decode_attention(model):
        assert all(type(layer.self_attention.core_attention).__name__ == "DecodeAttention"
                   for layer in model.language_model.decoder.layers)
    assert [layer.self_attention.core_attention for layer in model.language_model.decoder.layers] == originals
    assert model.language_model.position_embedding_type == "mrope"


def _prompts_with_equal_lengths():
    from megatron_ral.testing.inference import prompt_from_segments

    prompts = list(standard_prompts().values())
    twin = prompt_from_segments([len(prompts[0])], seed=7)   # a second prompt as long as the text prompt
    assert len(twin) == len(prompts[0])
    return prompts + [twin]


def test_decode_path_is_the_same_under_the_te_spec(model, monkeypatch):
    prompts = _prompts_with_equal_lengths()
    cfg = GenerationConfig(temperature=0.8, top_p=0.9, max_new_tokens=12)
    ragged = generate(model, prompts, cfg, num_samples=2, seed=3, stop_token_ids=[])
    single = [generate(model, [p], cfg, num_samples=2, seed=3, stop_token_ids=[])[0] for p in prompts]

    calls: list[int] = []   # query lengths seen by the spec's own core attention modules
    layers = model.language_model.decoder.layers
    hooks = [layer.self_attention.core_attention.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
             for layer in layers]
    monkeypatch.setattr(model, "backend", "te")
    try:
        assert rotated_cache_supported(model) and DecodeSession(model).rotary is not None
        te_ragged = generate(model, prompts, cfg, num_samples=2, seed=3, stop_token_ids=[])
        ragged_calls = list(calls)
        te_single = [generate(model, [p], cfg, num_samples=2, seed=3, stop_token_ids=[])[0] for p in prompts]
    finally:
        for h in hooks:
            h.remove()
    # ragged prompts: one causal prefill per group of equal length and layer (longest first); decode steps:
    # the project's attention
    lengths = sorted({len(p) for p in prompts}, reverse=True)
    assert len(lengths) == len(prompts) - 1
    assert ragged_calls == [n for n in lengths for _ in layers]
    single_calls = calls[len(ragged_calls):]
    assert single_calls == [len(p) for p in prompts for _ in layers]  # one causal prefill per prompt and layer
    for ours, ref in ((te_ragged, ragged), (te_single, single)):
        for po, pr in zip(ours, ref):
            for ro, rr in zip(po, pr):
                assert ro.token_ids.tolist() == rr.token_ids.tolist()
                torch.testing.assert_close(ro.logprobs, rr.logprobs, atol=1e-4, rtol=0)


def test_prefill_by_length_leaves_the_padded_prefill_state(model):
    prompts = _prompts_with_equal_lengths()
    padded = DecodeSession(model, prefill_by_length=False)
    grouped = DecodeSession(model, prefill_by_length=True)
    seen = []
    original = grouped._forward

    def forward(input_ids, upto, attention_mask, vision_embeddings=None):
        seen.append((tuple(input_ids.shape), attention_mask is None))
        return original(input_ids, upto, attention_mask, vision_embeddings)

    grouped._forward = forward
    a = padded.prefill(prompts, max_new_tokens=5)
    b = grouped.prefill(prompts, max_new_tokens=5)
    assert seen == []  # the groups ran in their own sessions, the batch session only decodes
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert torch.equal(grouped.positions, padded.positions) and torch.equal(grouped.padding, padded.padding)
    assert torch.equal(grouped.next_position, padded.next_position) and grouped.starts == padded.starts
    assert grouped.length == padded.length and grouped.cache.capacity == padded.cache.capacity
    mem_a, mem_b = padded.cache.context.key_value_memory_dict, grouped.cache.context.key_value_memory_dict
    assert sorted(mem_a) == sorted(mem_b)
    real = ~padded.padding[:, : padded.length]              # (B, S) real columns
    for layer in mem_a:
        for ta, tb in zip(mem_a[layer], mem_b[layer]):
            assert ta.shape == tb.shape
            ca, cb = ta[: padded.length].transpose(0, 1)[real], tb[: padded.length].transpose(0, 1)[real]
            torch.testing.assert_close(cb, ca, atol=1e-4, rtol=1e-4)
            assert bool((tb[: padded.length].transpose(0, 1)[~real] == 0).all())
    # the decode steps that follow agree
    tok = a.argmax(dim=-1)
    for _ in range(3):
        la, lb = padded.step(tok), grouped.step(tok)
        torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
        tok = la.argmax(dim=-1)
