"""Attention capture at PP=2 (gloo, 2 ranks, layers split 2 + 1) on a converted tiny checkpoint.

The capture is inactive on the first stage and active on the last; rows of an image and a video
prompt through megatron's pipeline schedule equal transformers' eager attention; dump_attention
delivers the last stage's rows to rank 0; the RAL loss gradient through the capture reaches the
first stage's weights and equals the materialised reference's on both stages.
"""

from __future__ import annotations

import pytest

from megatron_ral.testing.attention import check_parallel_capture

pytestmark = pytest.mark.distributed


def test_pp2_rows_equal_hf_and_gradients_equal_reference(tmp_path):
    check_parallel_capture(tmp_path, tp=1, pp=2)
