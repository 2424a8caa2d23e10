"""Packed training passes at TP=2 and PP=2 equal the padded one on the same ranks: logits at the response
positions (vocab shards), per-token log-probs, attention rows (head mean over TP) and the gradient of the
trainer's loss (surrogate, k3 KL, attention term) on every rank's parameters, within 1e-5, for image,
video, two-image and text-only sequences of very different lengths, packed ``sequences`` and shared-prompt
``groups`` (with sub-streams over the budget). PP=2 runs the tied-embedding preset through megatron's 1F1B
schedule with streams of different lengths."""

from __future__ import annotations

import pytest

from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed


def _rank(tp: int, pp: int, preset: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.models.qwen25vl.provider import balanced_layer_split
    from megatron_ral.platform import initialize
    from megatron_ral.testing.models import seeded_megatron_model, tiny_hf_config
    from megatron_ral.testing.packing import compare_results, packing_batch, pass_results

    layers = tiny_hf_config(preset).text_config.num_hidden_layers
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              pipeline_layer_split=balanced_layer_split(layers, pp))
    initialize(parallel, seed=1234)
    model = seeded_megatron_model(preset, seed=5, parallel=parallel, vision_attn_implementation="eager")
    batch = packing_batch()
    ref = pass_results([model], model, batch, "none", budget=48, micro_batch_size=4, num_minibatches=2)
    out = {"rank": dist.get_rank(), "last": parallel_state.is_pipeline_last_stage(), "worst": {},
           "sequences_seen": len(ref["logp"]), "grads": len(ref["grads"])}
    for kind in ("sequences", "groups"):
        got = pass_results([model], model, batch, kind, budget=48, micro_batch_size=4, num_minibatches=2)
        out["worst"][kind] = compare_results(ref, got, f"tp{tp} pp{pp} rank {dist.get_rank()} {kind}")
    return out


@pytest.mark.parametrize("tp,pp,preset", [(2, 1, "tiny"), (1, 2, "small")])
def test_packed_passes_equal_padded_in_parallel(tp, pp, preset):
    outs = run_distributed(_rank, tp * pp, tp, pp, preset, timeout=900)
    last = [o for o in outs if o["last"]]
    assert len(last) == tp and all(o["sequences_seen"] == 12 for o in last)
    assert all(o["grads"] > 0 for o in outs)
    print({o["rank"]: o["worst"] for o in outs})
