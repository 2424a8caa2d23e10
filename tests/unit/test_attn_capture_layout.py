"""Row layouts of the capture bridge, checked against hand-written indices, and their bad-input errors."""

from __future__ import annotations

import pytest
import torch

from megatron_ral.attention import attention_policy, attention_policy_reference
from megatron_ral.attention.capture import CaptureConfig, packed_response_layout, response_layout
from megatron_ral.models.qwen25vl.provider import balanced_layer_split


def test_right_padded_layout_by_hand():
    lay = response_layout([3, 1], [2, 4])
    assert lay.row_index.tolist() == [[3, 4, 0, 0], [1, 2, 3, 4]]
    assert lay.row_valid.tolist() == [[True, True, False, False], [True] * 4]
    assert lay.key_valid.tolist() == [[True] * 5, [True] * 5]


def test_left_padded_layout_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    lay = response_layout([2, 3], [2, 3], padding_mask=mask)
    assert lay.row_index.tolist() == [[4, 5, 0], [3, 4, 5]]
    assert lay.row_valid.tolist() == [[True, True, False], [True, True, True]]
    assert lay.key_valid.tolist() == mask.bool().tolist()
    # the policy support of sample 0's first row: real keys before position 4
    support = lay.policy_key_mask(6)
    assert support[0, 0].tolist() == [False, False, True, True, False, False]


def test_packed_layout_by_hand():
    lay = packed_response_layout([2, 1], [1, 2], total_length=7)
    assert lay.row_index.tolist() == [[2, 4, 5]]
    assert lay.segment_ids.tolist() == [[0, 0, 0, 1, 1, 1, -1]]
    assert lay.key_valid.tolist() == [[True] * 6 + [False]]
    support = lay.policy_key_mask(7)[0]
    assert support[1].tolist() == [False, False, False, True, False, False, False]


def test_packed_rows_equal_per_sample_rows():
    g = torch.Generator().manual_seed(0)
    lengths = [(5, 3), (4, 4)]
    qs = [torch.randn(p + r, 1, 4, 8, generator=g, dtype=torch.float64) for p, r in lengths]
    ks = [torch.randn(p + r, 1, 2, 8, generator=g, dtype=torch.float64) for p, r in lengths]
    lay = packed_response_layout([p for p, _ in lengths], [r for _, r in lengths])
    q, k = torch.cat(qs), torch.cat(ks)
    rows = attention_policy(q[lay.row_index[0]], k, lay)[0]
    off, r0 = 0, 0
    for (p, r), qi, ki in zip(lengths, qs, ks):
        single = attention_policy_reference(qi[p:], ki, response_layout([p], [r]))[0]
        torch.testing.assert_close(rows[r0:r0 + r, off:off + p + r], single, rtol=0, atol=1e-12)
        off, r0 = off + p + r, r0 + r


@pytest.mark.parametrize("args,kwargs,match", [
    (([1, 2], [1]), {}, "2 prompt lengths but 1 response"),
    (([3], [4]), {"seq_len": 5}, "exceed the sequence length 5"),
    (([2], [3]), {"padding_mask": torch.tensor([[0, 1, 1, 1]])}, "only 3 real positions"),
    (([2], [1]), {"padding_mask": torch.ones(2, 4)}, r"padding_mask must be \[B=1, S\]"),
    (([-1], [1]), {}, "must be >= 0"),
])
def test_layout_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        response_layout(*args, **kwargs)


def test_capture_config_and_layer_split():
    with pytest.raises(ValueError, match="impl must be one of"):
        CaptureConfig(impl="eager")
    assert balanced_layer_split(4, 2) is None
    assert balanced_layer_split(3, 2) == [2, 1]
    assert balanced_layer_split(7, 3) == [3, 2, 2]
    with pytest.raises(ValueError, match="need at least 4 layers"):
        balanced_layer_split(3, 4)
