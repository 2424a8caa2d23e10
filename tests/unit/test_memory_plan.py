"""The memory planner's formulas against the real thing: parameter counts of transformers' Qwen2.5-VL (3B, 7B,
32B built on the meta device) and of the built tiny megatron models, exactly; KV cache, p_old stores and
reference weights of the real modules, exactly; update activations (plain, with the attention capture and
JSD, with full recompute) and the vision tower pass within a stated factor of the peak measured on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_ral.config.schema import ParallelConfig
from megatron_ral.models.qwen25vl import memory as M
from megatron_ral.platform import destroy, initialize
from megatron_ral.rl import memory_plan as P
from megatron_ral.testing.models import seeded_megatron_model, tiny_hf_config

# Measured peak / formula must lie in this band (CPU, fp32, local spec; measured: 0.96-1.06 for the update,
# 0.86 for the vision tower).
ACTIVATION_FACTOR = (0.85, 1.15)
VISION_FACTOR = (0.75, 1.1)


@pytest.fixture(scope="module", autouse=True)
def platform():
    initialize(ParallelConfig(), seed=0)
    yield
    destroy()


def _tiny_shape(preset: str) -> M.ModelShape:
    return M.shape_from_config(tiny_hf_config(preset).to_dict(), preset)


def _released_config(shape: M.ModelShape) -> dict:
    """config.json in the released (flat) layout with the preset's sizes."""
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "hidden_size": shape.hidden, "intermediate_size": shape.ffn, "num_hidden_layers": shape.num_layers,
            "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab,
            "tie_word_embeddings": shape.tied, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                              "in_chans": 3, "out_hidden_size": shape.hidden, "patch_size": 14,
                              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                              "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}}


@pytest.mark.parametrize("preset", ["3b", "7b", "32b"])
def test_presets_count_the_parameters_of_transformers_model(preset, tmp_path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    shape = M.PRESETS[preset]
    cfg = _released_config(shape)
    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(cfg))
    visual = sum(p.numel() for n, p in hf.named_parameters() if ".visual." in f".{n}")
    total = sum(p.numel() for p in hf.parameters())
    assert visual == shape.vision.num_parameters()
    assert total == shape.num_parameters()
    assert round(total / 1e9, 2) == {"3b": 3.75, "7b": 8.29, "32b": 33.45}[preset]
    # the same shape read back from a config.json (file and directory)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for spec in (str(tmp_path), str(tmp_path / "config.json")):
        got = M.load_shape(spec)
        assert (got.num_layers, got.hidden, got.ffn, got.heads, got.kv_heads, got.head_dim, got.vocab, got.tied,
                got.vision) == (shape.num_layers, shape.hidden, shape.ffn, shape.heads, shape.kv_heads,
                                shape.head_dim, shape.vocab, shape.tied, shape.vision)
    assert M.load_shape(f"Qwen2.5-VL-{preset.upper()}-Instruct") is shape


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_inventory_is_the_built_model_name_by_name(preset):
    shape = _tiny_shape(preset)
    model = seeded_megatron_model(preset)
    built = [(n, p.numel(), p.requires_grad) for n, p in model.named_parameters()]
    planned = [(p.name, p.numel, p.trainable) for p in M.stage_parameters(shape, 1, 1, 0)]
    assert built == planned
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == 4 * sum(n for _, n, _ in planned)


def test_layer_split_is_the_providers():
    from megatron_ral.models.qwen25vl.provider import balanced_layer_split

    for layers, pp in [(28, 1), (28, 2), (28, 3), (64, 3), (36, 8), (3, 2), (64, 6)]:
        expected = balanced_layer_split(layers, pp) or [layers // pp] * pp
        assert M.stage_layer_counts(layers, pp) == expected


def test_kv_cache_is_the_sessions_cache():
    """Prefill one video prompt, repeat its row G times (as generation does): the cache's bytes are
    rows x (P + R - 1) tokens of every layer's K and V."""
    from megatron_ral.inference.session import DecodeSession
    from megatron_ral.testing.inference import standard_prompts

    shape = _tiny_shape("tiny")
    model = seeded_megatron_model("tiny").eval()
    prompt = standard_prompts()["video"]
    G, R = 3, 9
    session = DecodeSession(model)
    with torch.no_grad():
        session.prefill([prompt], max_new_tokens=R)
        session.select_rows([0] * G)
    cached = sum(t.numel() * t.element_size() for k, v in session.cache.context.key_value_memory_dict.values()
                 for t in (k, v))
    per_token = M.kv_cache_bytes_per_token(shape, 1, shape.num_layers, 4)
    assert cached == G * (len(prompt) + R - 1) * per_token


def test_generation_rows_follow_the_chunk_planner():
    from megatron_ral.inference.kv_cache import plan_chunks

    shape = M.PRESETS["7b"]
    for frames, budget, prompts in [(128, 65536, 1), (128, 65536, 4), (512, 65536, 2), (16, 1 << 20, 3)]:
        work = P.Workload(frames=frames, response_len=512, rollouts=8)
        seq = P.sequence(shape, work, 1)
        settings = P.Settings(kv_cache_tokens=budget)
        _, rows, err = P.generation_bytes(shape, 1, 28, seq, work, prompts, settings, first=False, last=False)
        assert err is None
        chunks = plan_chunks([seq.prompt_len] * prompts, 8, 512, budget)
        assert rows == max(sum(len(s) for s in c.samples) for c in chunks)
    _, _, err = P.generation_bytes(shape, 1, 28, P.sequence(shape, P.Workload(frames=512), 1), P.Workload(frames=512),
                                   1, P.Settings(kv_cache_tokens=16384), first=False, last=False)
    assert "generation.kv_cache_tokens" in err


@pytest.mark.parametrize("mode", ["qk", "rows"])
def test_old_policy_store_bytes(mode):
    from megatron_ral.attention.layout import RowLayout
    from megatron_ral.attention.old_policy import CapturedQK, OldPolicyConfig, make_old_policy_store

    shape = _tiny_shape("small")
    R, T, samples = 7, 40, 3
    store = make_old_policy_store(OldPolicyConfig(mode=mode))
    for key in range(samples):
        if mode == "qk":
            q = torch.randn(R, 1, shape.heads, shape.head_dim, dtype=torch.bfloat16)
            k = torch.randn(T, 1, shape.kv_heads, shape.head_dim, dtype=torch.bfloat16)
            layout = RowLayout(row_index=torch.arange(T - R, T)[None])
            store.put(key, CapturedQK(q=q, k=k, layout=layout))
        else:
            store.put_rows(key, torch.softmax(torch.randn(1, R, T), -1))
    assert store.nbytes() == samples * P.store_bytes_per_sample(shape, 1, mode, R, T, 2)


def test_reference_weights_bytes():
    from megatron_ral.rl.reference import ReferenceWeights

    shape = _tiny_shape("small")
    model = seeded_megatron_model("small")
    ref = ReferenceWeights([model], "device")
    plan = P.plan_memory(shape, None, P.Layout(), P.Workload(frames=4), P.Settings(dtype_bytes=4,
                                                                                    distributed_optimizer=False))
    assert ref.nbytes() == plan.stages[0].resident["reference"]
    assert plan.stages[0].resident["weights"] == sum(p.numel() * 4 for p in model.parameters())


@pytest.fixture(scope="module")
def measured():
    from megatron_ral.testing import memory

    if not memory.available():
        pytest.skip("peak measurement needs Linux /proc/self/clear_refs")
    cases = [("update", dict(preset="small", tokens=1024, rows=128, capture=c, recompute=r))
             for c, r in ((False, False), (True, False), (False, True))]
    cases.append(("vision", dict(preset="small", frames=8, side=32)))
    return memory.measure(cases)


@pytest.mark.parametrize("case", ["plain", "capture", "recompute"])
def test_update_activations_within_factor_of_measured_peak(measured, case):
    shape = _tiny_shape("small")
    settings = P.Settings(dtype_bytes=4, spec="local")
    T, R = 1024, 128
    formula = P.update_activation_bytes(shape, 1, shape.num_layers, T, R, first=True, last=True, in_flight=1,
                                        micro_batch=1, settings=settings, recompute=case == "recompute",
                                        keep_last_layer=False)
    if case == "capture":
        formula += P.capture_bytes(shape, 1, R, T, 1, settings)
    peak = measured[["plain", "capture", "recompute"].index(case)]["peak"]
    assert ACTIVATION_FACTOR[0] <= peak / formula <= ACTIVATION_FACTOR[1], (case, peak, formula)


def test_vision_pass_within_factor_of_measured_peak(measured):
    shape = _tiny_shape("small")
    result = measured[3]
    assert result["patches"] == 8 * 32 * 32 and result["tokens"] == result["patches"] // 4
    formula = result["patches"] * shape.vision.forward_bytes_per_patch(4)  # the input was allocated beforehand
    assert VISION_FACTOR[0] <= result["peak"] / formula <= VISION_FACTOR[1], (result, formula)


def test_video_tokens_follow_the_qwen_rule():
    assert M.video_tokens(128, 128 * 28 * 28) == 64 * 128
    assert M.video_tokens(7, 448 * 448) == 4 * 16 * 16  # odd frame count padded by one frame
    assert M.video_patches(M.PRESETS["7b"], 4, 28 * 56) == 2 * 2 * 4


def test_cp_split_gives_the_response_rows_of_the_load_balanced_chunks():
    # 16 tokens, CP 2: chunks of 4, rank 0 holds chunks 0 and 3 (tokens 0-3, 12-15), rank 1 chunks 1 and 2
    assert P.response_rows_per_cp_rank(16, 16, 5, 2) == [4, 1]
    assert P.response_rows_per_cp_rank(15, 16, 5, 2) == [3, 2]
    assert P.response_rows_per_cp_rank(16, 16, 5, 1) == [5]
    seq = P.sequence(M.PRESETS["7b"], P.Workload(frames=512, response_len=1024), 2)
    assert seq.padded_length % 4 == 0 and seq.local_tokens == seq.padded_length // 2


def test_plan_composition_by_hand():
    """7B at TP = PP = DP = 1 in bf16 with the plain optimizer: weights 2 bytes per parameter, fp32 gradients
    of the LM, Adam's two moments and the fp32 main copy (12 bytes), a bf16 reference copy; the peak is the
    resident sum plus the largest phase, and fits means peak <= GPU - reserve."""
    shape = M.PRESETS["7b"]
    lm = shape.num_parameters() - shape.vision.num_parameters()
    assert lm == 7_615_616_512  # 8.29B - the 675.4M vision tower (its count is checked against transformers above)
    plan = P.plan_memory(shape, None, P.Layout(), P.Workload(frames=128, response_len=1024),
                         P.Settings(distributed_optimizer=False), gpu_gib=80)
    res = plan.stages[0].resident
    assert res == {"weights": 2 * shape.num_parameters(), "gradients": 4 * lm, "optimizer": 12 * lm,
                   "reference": 2 * lm, "p_old_store": res["p_old_store"]}
    # qk store: 64 samples x (R H + T H_kv) d bytes in bf16
    assert res["p_old_store"] == 64 * (1024 * 28 + (8450 + 1024) * 4) * 128 * 2
    phases = plan.stages[0].phases
    assert plan.peak(False) == sum(res.values()) + max(v for k, v in phases.items() if k != "update_recompute")
    for gib, fits in ((plan.peak(False) / P.GIB + 4, True), ((plan.peak(False) - 1) / P.GIB + 4, False)):
        again = P.plan_memory(shape, None, P.Layout(), P.Workload(frames=128, response_len=1024),
                              P.Settings(distributed_optimizer=False), gpu_gib=gib)
        assert again.fits(False) is fits
