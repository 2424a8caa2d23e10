"""The local spec's SDPA core attention computes megatron-core's DotProductAttention: same output and the
same gradients w.r.t. q, k, v (float64 and float32), for causal attention (no mask), an explicit padding
mask with fully masked (left padding) rows, and grouped-query attention; same parameters and state."""

import pytest
import torch

from megatron_ral.config.schema import ParallelConfig
from megatron_ral.platform import destroy, initialize


@pytest.fixture(scope="module", autouse=True)
def platform():
    initialize(ParallelConfig(), seed=0)
    yield
    destroy()


def _modules(heads: int, groups: int, dim: int, dtype: torch.dtype):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ral.models.qwen25vl.sdpa_attention import SDPADotProductAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads, num_query_groups=groups,
                            kv_channels=dim, attention_dropout=0.0, params_dtype=dtype, use_cpu_initialization=True,
                            masked_softmax_fusion=False, attention_softmax_in_fp32=True)
    args = dict(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(**args), SDPADotProductAttention(**args)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("case", ["causal", "padding_mask", "decode_mask"])
@pytest.mark.parametrize("heads,groups", [(4, 4), (8, 2)])
def test_sdpa_equals_megatron_dot_product_attention(dtype, tol, case, heads, groups):
    gen = torch.Generator().manual_seed(1)
    b, dim, s = 3, 16, 13
    sq = 1 if case == "decode_mask" else s
    ref_mod, sdpa_mod = _modules(heads, groups, dim, dtype)
    assert set(ref_mod.state_dict()) == set(sdpa_mod.state_dict())
    q = torch.randn(sq, b, heads, dim, generator=gen, dtype=dtype)
    k = torch.randn(s, b, groups, dim, generator=gen, dtype=dtype)
    v = torch.randn(s, b, groups, dim, generator=gen, dtype=dtype)
    mask = None
    if case != "causal":
        pad = torch.zeros(b, s, dtype=torch.bool)
        pad[0, :5] = True  # left padding: rows 0..4 of sample 0 see only padding (fully masked)
        pad[2, -2:] = True
        causal = torch.ones(sq, s, dtype=torch.bool).triu(s - sq + 1)
        mask = causal[None, None] | pad[:, None, None, :]
    outs, grads = [], []
    for mod in (ref_mod, sdpa_mod):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = mod(qq, kk, vv, mask)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
        (out * weight).sum().backward()
        outs.append(out.detach())
        grads.append([qq.grad, kk.grad, vv.grad])
    assert torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)
    for g_sdpa, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_sdpa, g_ref, rtol=tol, atol=tol)


def test_unsupported_features_are_refused():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ral.models.qwen25vl.sdpa_attention import SDPADotProductAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2, use_cpu_initialization=True,
                            window_size=(4, 0))
    with pytest.raises(ValueError, match="sliding-window"):
        SDPADotProductAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
