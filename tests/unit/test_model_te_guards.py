"""What the Transformer Engine spec would get silently wrong is refused with one clear line.

The Transformer Engine spec is named on a CPU-built model (its layers are megatron's local modules
here); only the backend name is set, the checks under test are the real ones:
- a 4-D attention mask, or left/inner padding (which needs a mask), under the TE spec: ValueError
  (TE's causal layers would ignore the mask), while the local spec applies the same mask;
- RoPE fusion switched back on through the provider's overrides: ValueError, whatever the spec.
"""

import pytest
import torch

from megatron_ral.config.schema import ParallelConfig
from megatron_ral.models.qwen25vl.provider import build_model, transformer_config_from_hf
from megatron_ral.testing.models import make_prompt, seeded_megatron_model, tiny_hf_config
from megatron_ral.platform import destroy, initialize


@pytest.fixture(scope="module")
def model():
    initialize(ParallelConfig(), seed=1234)
    yield seeded_megatron_model("tiny", seed=7, backend="local").eval()
    destroy()


def _causal_mask(seq):
    return torch.ones(seq, seq, dtype=torch.bool).triu(1)[None, None]


@torch.no_grad()
def test_te_spec_refuses_masks_it_would_ignore(model, monkeypatch):
    prompt = make_prompt([[9]], seed=1)
    ids = prompt.input_ids
    seq = ids.shape[1]
    mask = _causal_mask(seq).clone()
    mask[..., 0] = True  # hide the first token from every later query: a real change to the output
    mask[..., 0, 0] = False
    causal = model(input_ids=ids, runtime_gather_output=True)
    masked = model(input_ids=ids, attention_mask=mask, runtime_gather_output=True)
    assert not torch.allclose(causal[:, 2:], masked[:, 2:])  # the local spec applies the mask
    left = torch.ones(1, seq, dtype=torch.long)
    left[0, :2] = 0
    right = torch.ones(1, seq, dtype=torch.long)
    right[0, -2:] = 0

    monkeypatch.setattr(model, "backend", "te")
    with pytest.raises(ValueError, match="4-D attention_mask was given, but the Transformer Engine layer spec would ignore it"):
        model(input_ids=ids, attention_mask=mask, runtime_gather_output=True)
    with pytest.raises(ValueError, match="left/inner padding needs an attention mask"):
        model(input_ids=ids, attention_mask=left, runtime_gather_output=True)
    # what TE computes exactly: causal attention, and right padding (exact for the real tokens)
    torch.testing.assert_close(model(input_ids=ids, runtime_gather_output=True), causal)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=right, runtime_gather_output=True)[:, :-2],
                               causal[:, :-2])


@pytest.mark.parametrize("fusion", ["apply_rope_fusion", "fused_single_qkv_rope"])
def test_rope_fusion_cannot_be_switched_back_on(fusion):
    hf = tiny_hf_config("tiny")
    with pytest.raises(ValueError, match=f"{fusion}=True is not supported: .*M-RoPE"):
        transformer_config_from_hf(hf, **{fusion: True})
    # refused before the spec is even resolved: the same line with the TE spec named on a CPU host
    for backend in ("local", "te"):
        with pytest.raises(ValueError, match=f"{fusion}=True is not supported"):
            build_model(hf, backend=backend, **{fusion: True})
    assert transformer_config_from_hf(hf, **{fusion: False}).apply_rope_fusion is False
