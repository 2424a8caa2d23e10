"""Sampling (temperature / top-k / top-p / greedy, per-row RNGs) and the KV-cache token budget.

Pure functions against hand-computed distributions; then on a tiny megatron model: seeded sampling
is reproducible and seed-dependent, temperature -> 0 and top-k = 1 equal greedy, G responses share
one vision encoding and prefill, and a KV budget that forces the batch to be split gives exactly the
responses of the unsplit batch.
"""

import math

import pytest
import torch

from megatron_ral.config.schema import GenerationConfig, ParallelConfig
from megatron_ral.inference.generate import generate
from megatron_ral.inference.kv_cache import plan_chunks
from megatron_ral.inference.sampling import (
    SamplingParams,
    filtered_probs,
    row_generator,
    row_seed,
    sample_tokens,
)
from megatron_ral.testing.inference import prompt_from_segments, standard_prompts
from megatron_ral.platform import destroy, initialize

LOGITS = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))


def test_top_k_and_top_p_by_hand():
    probs = filtered_probs(LOGITS, SamplingParams(top_k=2))
    torch.testing.assert_close(probs, torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    # top_p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 (crossing 0.8) is kept too
    probs = filtered_probs(LOGITS, SamplingParams(top_p=0.8))
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    # temperature 2 flattens: p_i ∝ sqrt(p_i)
    probs = filtered_probs(LOGITS, SamplingParams(temperature=2.0))
    ref = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]).sqrt()
    torch.testing.assert_close(probs, ref / ref.sum())


def test_sampled_frequencies_follow_the_filtered_distribution():
    params = SamplingParams(temperature=1.0, top_p=0.8)
    n = 20000
    logits = LOGITS.expand(n, -1)
    gens = [row_generator(3, i) for i in range(n)]
    tokens, logp = sample_tokens(logits, params, gens)
    freq = torch.bincount(tokens, minlength=5).double() / n
    ref = torch.tensor([0.5, 0.2, 0.15, 0, 0], dtype=torch.float64) / 0.85
    sigma = (ref * (1 - ref) / n).sqrt()
    assert ((freq - ref).abs() <= 5 * sigma + 1e-12).all(), freq
    # reported log-prob: log softmax(logits / T) at the token (before top-p truncation)
    torch.testing.assert_close(logp, LOGITS[0, tokens])


def test_suppressed_ids_are_never_sampled_and_the_log_prob_is_the_full_vocabulary_one():
    """The reported log-prob is the trainer's quantity, log softmax(logits / T) over the whole vocabulary,
    not the log-prob under the distribution renormalised without the suppressed ids."""
    n = 4000
    logits = LOGITS.expand(n, -1)
    suppress = torch.tensor([0, 3])
    params = SamplingParams(temperature=2.0)
    tokens, logp = sample_tokens(logits, params, [row_generator(5, i) for i in range(n)], suppress=suppress)
    assert not torch.isin(tokens, suppress).any()
    assert set(tokens.tolist()) == {1, 2, 4}
    torch.testing.assert_close(logp, torch.log_softmax(LOGITS[0] / 2.0, dim=-1)[tokens])
    tok, logp = sample_tokens(LOGITS, SamplingParams(greedy=True), suppress=suppress)
    assert tok.tolist() == [1] and math.isclose(logp.item(), math.log(0.2), rel_tol=1e-6)


def test_greedy_and_seeds():
    tok, logp = sample_tokens(LOGITS, SamplingParams(greedy=True))
    assert tok.tolist() == [0] and math.isclose(logp.item(), math.log(0.5), rel_tol=1e-6)
    assert SamplingParams(temperature=0.0).is_greedy
    assert row_seed(1, 2, 3) == row_seed(1, 2, 3)
    assert len({row_seed(s, a, b) for s in range(3) for a in range(3) for b in range(3)}) == 27
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)


def test_plan_chunks_respects_budget():
    lengths = [30, 10, 20, 10]
    chunks = plan_chunks(lengths, num_samples=4, max_new_tokens=11, kv_cache_tokens=400)
    for c in chunks:
        assert c.rows * (max(lengths[i] for i in c.prompts) + 10) <= 400
    covered = sorted((p, j) for c in chunks for p, s in zip(c.prompts, c.samples) for j in s)
    assert covered == [(p, j) for p in range(4) for j in range(4)]
    # one prompt's 4 rows need 4 * 40 = 160 > 100 tokens: split by sample index
    split = plan_chunks([30], num_samples=4, max_new_tokens=11, kv_cache_tokens=100)
    assert [c.samples for c in split] == [((0, 1),), ((2, 3),)]
    no_pad = plan_chunks(lengths, 1, 11, 10_000, allow_padding=False)
    assert all(len({lengths[i] for i in c.prompts}) == 1 for c in no_pad)
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        plan_chunks([30], num_samples=1, max_new_tokens=11, kv_cache_tokens=39)


@pytest.fixture(scope="module")
def model():
    from megatron_ral.testing.models import seeded_megatron_model

    initialize(ParallelConfig(), seed=1234)
    yield seeded_megatron_model("tiny", seed=5, backend="local", vision_attn_implementation="eager").eval()
    destroy()


def _ids(responses):
    return [[r.token_ids.tolist() for r in per_prompt] for per_prompt in responses]


SAMPLING = GenerationConfig(temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=8)


def test_seeded_sampling_is_reproducible(model):
    prompts = list(standard_prompts().values())
    a = generate(model, prompts, SAMPLING, num_samples=3, seed=5, stop_token_ids=[])
    b = generate(model, prompts, SAMPLING, num_samples=3, seed=5, stop_token_ids=[])
    c = generate(model, prompts, SAMPLING, num_samples=3, seed=6, stop_token_ids=[])
    assert _ids(a) == _ids(b)
    assert _ids(a) != _ids(c)
    for pa, pb in zip(a, b):
        for ra, rb in zip(pa, pb):
            torch.testing.assert_close(ra.logprobs, rb.logprobs)


def test_low_temperature_and_top_k_1_equal_greedy(model):
    prompts = list(standard_prompts().values())
    greedy = generate(model, prompts, GenerationConfig(max_new_tokens=8), greedy=True, stop_token_ids=[])
    cold = generate(model, prompts, GenerationConfig(temperature=1e-3, max_new_tokens=8), num_samples=2, seed=1,
                    stop_token_ids=[])
    top1 = generate(model, prompts, GenerationConfig(top_k=1, max_new_tokens=8), num_samples=2, seed=1,
                    stop_token_ids=[])
    for g, c, t in zip(_ids(greedy), _ids(cold), _ids(top1)):
        assert c == [g[0], g[0]] and t == [g[0], g[0]]


def test_samples_share_one_prefill_and_budget_split_changes_nothing(model):
    prompts = [prompt_from_segments([4, ("image", (1, 4, 4)), 3], seed=31),
               prompt_from_segments([2, ("video", (2, 4, 4)), 8], seed=32, second_per_grid_ts=[1.0])]
    calls = []
    hook = model.vision_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        whole = generate(model, prompts, SAMPLING, num_samples=4, seed=9, stop_token_ids=[])
    finally:
        hook.remove()
    assert len(calls) == 2  # one tower call for the images, one for the videos, for all 8 responses
    longest = max(len(p) for p in prompts)
    budget = 2 * (longest + SAMPLING.max_new_tokens - 1)  # two rows per chunk
    small = GenerationConfig(**{**SAMPLING.__dict__, "kv_cache_tokens": budget})
    split = generate(model, prompts, small, num_samples=4, seed=9, stop_token_ids=[])
    assert _ids(split) == _ids(whole)
    assert len({tuple(r) for r in _ids(whole)[0]}) > 1
