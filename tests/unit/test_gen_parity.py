"""In-framework generation (TP=1) against transformers on the same converted tiny checkpoint.

- greedy generate() token-for-token equal to HF generate() (eager, fp32) for a text, an image and a
  video prompt, generated together as one ragged batch;
- at every decode step the KV-cache logits equal a full-recompute forward of prompt + tokens so far;
- each row of a ragged batch equals generating that row alone;
- a stop token ends a row (finish reason, length) while the other rows go on.
"""

import pytest
import torch

from megatron_ral.config.schema import GenerationConfig, ParallelConfig
from megatron_ral.inference.generate import FINISH_LENGTH, FINISH_STOP, generate
from megatron_ral.inference.loading import load_model, stop_token_ids
from megatron_ral.inference.sampling import SamplingParams, sample_tokens
from megatron_ral.inference.session import DecodeSession
from megatron_ral.testing.inference import (
    converted_checkpoint,
    full_forward_next_logits,
    hf_generate,
    load_hf_model,
    prompt_from_segments,
    standard_prompts,
)
from megatron_ral.platform import destroy, initialize

MAX_NEW = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf_dir, mc_dir = converted_checkpoint(tmp_path_factory.mktemp("gen_parity"), "tiny", seed=4)
    initialize(ParallelConfig(), seed=1234)
    model = load_model(mc_dir, backend="local", dtype=torch.float32, vision_attn_implementation="eager")
    yield model, load_hf_model(hf_dir), stop_token_ids(mc_dir)
    destroy()


def test_greedy_equals_hf_generate(setup):
    model, hf, stops = setup
    prompts = standard_prompts()
    ours = generate(model, list(prompts.values()), GenerationConfig(max_new_tokens=MAX_NEW), greedy=True,
                    stop_token_ids=stops)
    for (name, prompt), (resp,) in zip(prompts.items(), ours):
        ref = hf_generate(hf, prompt, MAX_NEW, stops)
        assert resp.token_ids.tolist() == ref, name
        assert resp.length == len(ref) and resp.prompt_length == len(prompt)
        assert resp.finish_reason == (FINISH_STOP if ref[-1] in stops else FINISH_LENGTH)


def test_kv_cache_logits_equal_full_recompute_every_step(setup):
    model, _, _ = setup
    prompts = list(standard_prompts().values())
    session = DecodeSession(model)
    logits = session.prefill(prompts, MAX_NEW)
    generated = [[] for _ in prompts]
    greedy = SamplingParams(greedy=True)
    # a generated placeholder id would be taken for a vision token by the full forward's rope index
    placeholders = torch.tensor([model.image_token_id, model.video_token_id])
    for step in range(MAX_NEW):
        for b, p in enumerate(prompts):
            ref = full_forward_next_logits(model, p, generated[b])
            err = (logits[b] - ref).abs().max().item()
            assert err <= 1e-4, f"row {b} step {step}: max |cache - full| = {err}"
        tok, _ = sample_tokens(logits.index_fill(1, placeholders, float("-inf")), greedy)
        for b in range(len(prompts)):
            generated[b].append(int(tok[b]))
        if step + 1 < MAX_NEW:
            logits = session.step(tok)
    assert session.length == max(len(p) for p in prompts) + MAX_NEW - 1


def test_ragged_rows_equal_solo_generation(setup):
    model, _, stops = setup
    prompts = [
        prompt_from_segments([3, ("image", (1, 2, 4)), 9], seed=21),
        prompt_from_segments([25], seed=22),
        prompt_from_segments([2, ("video", (2, 4, 8)), 2, ("image", (1, 4, 4)), 3], seed=23, second_per_grid_ts=[1.5]),
        prompt_from_segments([5], seed=24),
    ]
    cfg = GenerationConfig(max_new_tokens=10)
    batched = generate(model, prompts, cfg, greedy=True, stop_token_ids=stops)
    for i, p in enumerate(prompts):
        (solo,), = generate(model, [p], cfg, greedy=True, stop_token_ids=stops)
        assert batched[i][0].token_ids.tolist() == solo.token_ids.tolist(), i
        torch.testing.assert_close(batched[i][0].logprobs, solo.logprobs, atol=1e-4, rtol=0)


def test_stop_token_ends_only_its_row(setup):
    model, _, _ = setup
    prompts = list(standard_prompts().values())
    cfg = GenerationConfig(max_new_tokens=MAX_NEW)
    free = generate(model, prompts, cfg, greedy=True, stop_token_ids=[])
    # stop at the 4th token row 0 would produce (first occurrence), unseen in the other rows' first 4
    ids0 = free[0][0].token_ids.tolist()
    stop = ids0[3]
    k = ids0.index(stop) + 1
    stopped = generate(model, prompts, cfg, greedy=True, stop_token_ids=[stop])
    assert stopped[0][0].token_ids.tolist() == ids0[:k]
    assert stopped[0][0].finish_reason == FINISH_STOP and stopped[0][0].length == k
    for i in (1, 2):
        ids = free[i][0].token_ids.tolist()
        cut = ids.index(stop) + 1 if stop in ids else len(ids)
        assert stopped[i][0].token_ids.tolist() == ids[:cut]
        assert stopped[i][0].finish_reason == (FINISH_STOP if stop in ids else FINISH_LENGTH)


def test_longest_row_finishing_first_trims_the_cache(setup):
    """When the longest prompt's rows stop first, the leading padding columns of the others are
    dropped from the cache; the remaining rows still equal solo generation."""
    model, _, _ = setup
    prompts = [prompt_from_segments([40], seed=41), prompt_from_segments([7], seed=42),
               prompt_from_segments([3, ("image", (1, 2, 2)), 4], seed=43)]
    cfg = GenerationConfig(max_new_tokens=10)
    first = generate(model, prompts[:1], cfg, greedy=True, stop_token_ids=[])[0][0].token_ids.tolist()
    stop = [first[1]]
    lengths = []
    original = DecodeSession.select_rows

    def spy(self, index):
        original(self, index)
        lengths.append(self.length)

    DecodeSession.select_rows = spy
    try:
        batched = generate(model, prompts, cfg, num_samples=2, greedy=True, stop_token_ids=stop)
    finally:
        DecodeSession.select_rows = original
    assert batched[0][0].finish_reason == FINISH_STOP and batched[0][0].length <= 2
    # after the first compaction the cache no longer spans the 40-token prompt
    assert lengths[0] == 40 and any(n < 40 for n in lengths[1:]), lengths
    for i, p in enumerate(prompts):
        (solo,), = generate(model, [p], cfg, greedy=True, stop_token_ids=stop)
        for resp in batched[i]:
            assert resp.token_ids.tolist() == solo.token_ids.tolist(), i
            torch.testing.assert_close(resp.logprobs, solo.logprobs, atol=1e-4, rtol=0)
