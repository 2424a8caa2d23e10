"""Which teachers can score the student's sequences (distill.compat), and the teacher layouts config
validation refuses (config.validate), each with one line naming the teacher and the first difference.

The student is a generated tiny checkpoint's HF files; each incompatible teacher is a copy with one thing
changed in its config, tokenizer or template files (weights are not read)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megatron_ral.config import Config, ConfigError, validate
from megatron_ral.distill.compat import TeacherMismatch, check_teacher_compatible, differences

SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "preprocessor_config.json")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from megatron_ral.tiny.checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("compat")
    make_tiny_checkpoint(root / "student", preset="tiny", seed=0)
    make_tiny_checkpoint(root / "larger", preset="small", seed=1)
    return root


def _variant(root: Path, name: str, edit) -> Path:
    """A copy of the student's HF files with ``edit(dir)`` applied."""
    out = root / name
    if not out.exists():
        out.mkdir()
        for f in SIDE_FILES:
            shutil.copy2(root / "student" / f, out / f)
        edit(out)
    return out


def _edit_json(name: str, change):
    def edit(d: Path) -> None:
        data = json.loads((d / name).read_text())
        change(data)
        (d / name).write_text(json.dumps(data))
    return edit


def test_a_larger_teacher_with_the_same_tokenizer_and_patching_is_compatible(dirs):
    assert differences(dirs / "student", dirs / "larger") == []
    check_teacher_compatible(dirs / "student", dirs / "larger")


CASES = {
    "vocab": (_edit_json("config.json", lambda c: c["text_config"].update(vocab_size=1152)), "vocab_size is 1152"),
    "merge": (_edit_json("config.json", lambda c: c["vision_config"].update(spatial_merge_size=1)),
              "vision_config.spatial_merge_size is 1"),
    "patch": (_edit_json("config.json", lambda c: c["vision_config"].update(patch_size=16)),
              "vision_config.patch_size is 16"),
    "temporal": (_edit_json("config.json", lambda c: c["vision_config"].update(temporal_patch_size=1)),
                 "vision_config.temporal_patch_size is 1"),
    "tps": (_edit_json("config.json", lambda c: c["vision_config"].update(tokens_per_second=4)),
            "vision_config.tokens_per_second is 4"),
    "image_pad": (_edit_json("config.json", lambda c: c.update(image_token_id=5)), "image_token_id is 5"),
    "eos": (_edit_json("generation_config.json", lambda c: c.update(eos_token_id=[7])), "eos_token_id is [7]"),
    "tokenizer": (_edit_json("tokenizer.json", lambda t: t["model"]["vocab"].update(
        {k: v for k, v in [(list(t["model"]["vocab"])[0], 999), (list(t["model"]["vocab"])[999], 0)]})),
        "the tokenizer vocabulary: token"),
    "im_end": (_edit_json("tokenizer.json", lambda t: [a.update(id=a["id"] + 1) for a in t["added_tokens"]
                                                        if a["content"] in ("<|im_end|>", "<|object_ref_start|>")]),
               "the tokenizer's added tokens"),
    "template": (lambda d: (d / "chat_template.jinja").write_text("{{ messages }}"), "the chat template differs"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_incompatible_teachers_are_refused_with_one_line_naming_the_first_difference(dirs, case):
    edit, expected = CASES[case]
    teacher = _variant(dirs, case, edit)
    with pytest.raises(TeacherMismatch) as err:
        check_teacher_compatible(dirs / "student", teacher, "algorithm.teacher_hf_path")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("config error: algorithm.teacher_hf_path: the teacher ") and str(teacher) in message
    assert expected in message, message


def test_released_flat_config_layout_is_read_like_the_nested_one(dirs):
    """The released config.json keeps text keys at the top and names the patch size spatial_patch_size."""
    def flatten(d: Path) -> None:
        c = json.loads((d / "config.json").read_text())
        text = c.pop("text_config")
        c.update({k: v for k, v in text.items() if k not in ("model_type", "dtype")})
        c["vision_config"]["spatial_patch_size"] = c["vision_config"].pop("patch_size")
        (d / "config.json").write_text(json.dumps(c))
    assert differences(dirs / "student", _variant(dirs, "flat", flatten)) == []


# ----------------------------------------------------------------------------------------- config validation
def _teacher_dir(root: Path, name: str, layers: int, heads: int, kv: int) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"text_config": {
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv}}))
    return d


def _distill_cfg(teacher: Path | str = "", load: str = "", tp: int = 1, pp: int = 1, **alg) -> Config:
    cfg = Config()
    cfg.model.load = "unused"
    cfg.algorithm.name = "ral_distill"
    cfg.algorithm.teacher_hf_path = str(teacher)
    cfg.algorithm.teacher_load = load
    for k, v in alg.items():
        setattr(cfg.algorithm, k, v)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    return cfg


def _refused(cfg: Config) -> str:
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    return str(err.value)


def test_teacher_layouts_the_teacher_cannot_take_are_refused(tmp_path):
    t = _teacher_dir(tmp_path, "t", layers=6, heads=12, kv=3)
    validate(_distill_cfg(t, tp=3, pp=2))                                  # 12 and 3 heads split in 3, 6 layers in 2
    validate(_distill_cfg(t, pp=4))                                        # balanced 2,2,1,1
    validate(_distill_cfg(t, pp=2, teacher_pipeline_layer_split=[5, 1]))
    msg = _refused(_distill_cfg(t, tp=2))
    assert msg.startswith("config error: algorithm.teacher_hf_path: the teacher") and "3 KV heads" in msg and "TP=2" in msg
    assert "teacher_pipeline_layer_split: must sum to the teacher's number of layers (6" in \
        _refused(_distill_cfg(t, pp=2, teacher_pipeline_layer_split=[3, 2]))
    assert "one entry per pipeline stage (PP=2)" in _refused(_distill_cfg(t, pp=2, teacher_pipeline_layer_split=[6]))
    assert "teacher_pipeline_layer_split: every stage" in _refused(_distill_cfg(t, pp=2, teacher_pipeline_layer_split=[6, 0]))
    assert "fewer than the 8 pipeline stages" in _refused(_distill_cfg(t, pp=8))


def test_teacher_load_config_is_found_in_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    _teacher_dir(run, "iter_0000004", layers=4, heads=8, kv=2)
    msg = _refused(_distill_cfg(load=str(run), tp=4))
    assert msg.startswith("config error: algorithm.teacher_load: the teacher") and "iter_0000004" in msg


def test_distillation_needs_a_teacher_and_a_term(tmp_path):
    t = _teacher_dir(tmp_path, "t", layers=2, heads=2, kv=2)
    assert "needs a teacher" in _refused(_distill_cfg())
    assert "algorithm.gkd_mu: ral_distill needs gkd_mu > 0 or gamma_attn > 0" in \
        _refused(_distill_cfg(t, gkd_mu=0.0, gamma_attn=0.0))
    validate(_distill_cfg(t, gkd_mu=0.0, gamma_attn=0.5))
    assert "algorithm.teacher_placement" in _refused(_distill_cfg(t, teacher_placement="gpu"))
