"""Prompt text per template and problem type, SFT targets, and DataConfig validation."""

from __future__ import annotations

import pytest

from megatron_ral.config.data import DataConfig
from megatron_ral.data.prompts import TYPE_SUFFIX, get_template, question_text, sft_target, user_messages
from megatron_ral.data.records import PROBLEM_TYPES, parse_record


def record(**kw):
    base = {"problem_id": 1, "problem": "  How many cars pass?  ", "data_type": "video", "problem_type": "numerical",
            "options": [], "solution": "<answer>3</answer>", "path": "a.mp4", "process": "<think>one, two, three</think>"}
    base.update(kw)
    return parse_record(base, "f.json:1")


def test_multiple_choice_carries_options_one_per_line():
    rec = record(problem="Which colour?", problem_type="multiple choice", options=["A. red", "B. blue "], solution="<answer>B</answer>")
    text = question_text(rec, get_template("think"))
    lines = text.split("\n")
    assert lines[:4] == ["Which colour?", "Options:", "A. red", "B. blue"]
    assert "<think> </think>" in lines[4] and "<answer> </answer>" in lines[4]
    assert text.endswith(TYPE_SUFFIX["multiple choice"])


@pytest.mark.parametrize("ptype", PROBLEM_TYPES)
def test_each_type_gets_its_suffix(ptype):
    opts = ["A. x", "B. y"] if ptype == "multiple choice" else []
    rec = record(problem_type=ptype, options=opts)
    for name in ("think", "answer_only"):
        text = question_text(rec, get_template(name))
        assert text.startswith("How many cars pass?")
        assert text.endswith(TYPE_SUFFIX[ptype])
        assert ("Options:" in text) == (ptype == "multiple choice")


def test_answer_only_template_has_no_reasoning_instruction():
    think = question_text(record(), get_template("think"))
    zero = question_text(record(), get_template("answer_only"))
    assert "<think>" in think and "<think>" not in zero and "<answer> </answer>" in zero


def test_messages_put_media_first():
    msgs = user_messages(record(data_type="image"), get_template("think"), system_prompt="S")
    assert msgs[0] == {"role": "system", "content": "S"}
    content = msgs[1]["content"]
    assert content[0] == {"type": "image"} and content[1]["type"] == "text"
    assert user_messages(record(), get_template("think"))[0]["role"] == "user"


def test_sft_targets():
    rec = record()
    assert sft_target(rec, get_template("think")) == "<think>one, two, three</think>\n<answer>3</answer>"
    assert sft_target(rec, get_template("answer_only")) == "<answer>3</answer>"
    with pytest.raises(ValueError, match="process"):
        sft_target(record(process=None), get_template("think"))
    with pytest.raises(ValueError, match="unknown prompt template"):
        get_template("cot")


@pytest.mark.parametrize("change,needle", [
    ({"template": "cot"}, "data.template"),
    ({"video_backend": "decord"}, "data.video_backend"),
    ({"fps": 0}, "data.fps"),
    ({"min_frames": 10, "max_frames": 4}, "min_frames"),
    ({"image_min_pixels": 10, "image_max_pixels": 5}, "image_min_pixels"),
    ({"max_failure_fraction": 1.5}, "max_failure_fraction"),
    ({"num_workers": -1}, "num_workers"),
])
def test_config_validation(change, needle):
    DataConfig().validate()
    with pytest.raises(ValueError, match=needle):
        DataConfig(**change).validate()
