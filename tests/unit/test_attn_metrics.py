"""Attention diagnostics on hand-made rows and on rows from the capture."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ral.attention import (
    attention_entropy,
    attention_mass_shares,
    attention_metrics,
    attention_policy,
    gather_rows,
    response_row_layout,
)


def test_entropy_hand_computed():
    p = torch.tensor([[[0.25, 0.25, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0]]])
    assert torch.allclose(attention_entropy(p), torch.tensor([[math.log(4), 0.0, math.log(2)]]))


def test_mass_shares_hand_computed():
    # keys: 0 text, 1-2 vision, 3 text, 4-5 response
    vision = torch.tensor([[False, True, True, False, False, False]])
    response = torch.tensor([[False, False, False, False, True, True]])
    p = torch.tensor([[[0.1, 0.2, 0.3, 0.4, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6, 0.0]]])
    s = attention_mass_shares(p, vision, response)
    assert torch.allclose(s["vision"], torch.tensor([[0.5, 0.2]]))
    assert torch.allclose(s["text"], torch.tensor([[0.5, 0.2]]))
    assert torch.allclose(s["response"], torch.tensor([[0.0, 0.6]]))


def test_metrics_from_captured_rows():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(12, 2, 4, 8, generator=g)
    k = torch.randn(12, 2, 2, 8, generator=g)
    layout = response_row_layout([6, 5], [12, 9])
    p = attention_policy(gather_rows(q, layout), k, layout)
    vision = torch.zeros(2, 12, dtype=torch.bool)
    vision[:, 1:4] = True
    response = torch.zeros(2, 12, dtype=torch.bool)
    response[0, 6:12] = True
    response[1, 5:9] = True
    m = attention_metrics(p, layout.row_valid, vision, response, p_old=p)
    assert set(m) == {"attn/entropy", "attn/vision_mass", "attn/text_mass", "attn/response_mass", "attn/jsd_old"}
    assert m["attn/vision_mass"] + m["attn/text_mass"] + m["attn/response_mass"] == pytest.approx(1.0, abs=1e-6)
    assert m["attn/jsd_old"] == 0.0
    # the first response row of each sample sees no response key
    shares = attention_mass_shares(p, vision, response)
    assert float(shares["response"][0, 0]) == 0.0 and float(shares["response"][1, 0]) == 0.0
    ent = attention_entropy(p)
    valid = layout.row_valid
    assert float(ent[valid].min()) > 0 and float(ent[valid].max()) <= math.log(11) + 1e-6
    expected_entropy = float(ent[valid].mean())
    assert m["attn/entropy"] == pytest.approx(expected_entropy, rel=1e-6)
