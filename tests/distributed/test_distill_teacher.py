"""The teacher runner at TP=2 beside the student (gloo, 2 ranks): a teacher with more layers, 4x the width
and twice the heads of the student (tied embeddings; the student's are untied), built by
``distill.teacher.build_teacher`` and run by the trainer's teacher pass, gives the attention rows of
transformers' eager teacher (last layer, head mean over both ranks' heads) and its logits at the response
positions, vocab-split over the ranks; with placement "host" the same, its weights off the device between
passes; the student's rows of the same micro-batch equal the eager student's."""

from __future__ import annotations

import pytest

from megatron_ral.testing.distill import check_teacher_pass

pytestmark = pytest.mark.distributed


def test_tp2_teacher_rows_and_logits_equal_hf_beside_the_student(tmp_path):
    check_teacher_pass(tmp_path, tp=2)
