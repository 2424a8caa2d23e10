"""Attention capture at TP=2 (gloo, 2 ranks) on a converted tiny checkpoint: heads split over the ranks.

Rows of an image and a video prompt with a response, through megatron's forward-only pipeline
schedule, equal transformers' eager last-layer attention (head mean over all heads of both ranks,
renormalised over i < t) on every rank; the RAL loss gradient w.r.t. each rank's linear_qkv shard
through the chunked custom backward equals the materialised autograd reference's.
"""

from __future__ import annotations

import pytest

from megatron_ral.testing.attention import check_parallel_capture

pytestmark = pytest.mark.distributed


def test_tp2_rows_equal_hf_and_gradients_equal_reference(tmp_path):
    check_parallel_capture(tmp_path, tp=2, pp=1)
