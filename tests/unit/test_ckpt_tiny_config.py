"""Config overrides of tiny checkpoints in Hugging Face's own keys (checkpoint.tiny_config): the known-key
table matches the installed transformers, the released flat layout, the nested layout and the tool's own
config.json all resolve to the same transformers config, and bad keys or values are refused by name."""

from __future__ import annotations

import json

import pytest

from megatron_ral.tiny.checkpoint import build_config
from megatron_ral.tiny.config import KNOWN_KEYS, TinyConfigError, normalize_overrides

NESTED = {"text_config": {"hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2,
                          "rope_parameters": {"rope_type": "default", "mrope_section": [4, 4, 4],
                                              "rope_theta": 500000.0}},
          "vision_config": {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
                            "out_hidden_size": 96, "patch_size": 14, "fullatt_block_indexes": [1]}}
# The same model as a released config.json lays it out (transformers 4: text keys at the top level).
FLAT = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rope_theta": 500000.0, "rope_scaling": {"type": "mrope", "mrope_section": [4, 4, 4]},
        "bos_token_id": 151643, "eos_token_id": 151645, "image_token_id": 151655, "vision_token_id": 151654,
        "torch_dtype": "float32", "transformers_version": "4.49.0", "use_cache": True,
        "vision_config": {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "in_chans": 3,
                          "out_hidden_size": 96, "spatial_patch_size": 14, "fullatt_block_indexes": [1]}}


def _model_dict(cfg) -> dict:
    d = cfg.to_dict()
    d.pop("transformers_version", None)
    return d


def test_known_keys_match_transformers():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )

    top = Qwen2_5_VLConfig().to_dict()
    del top["text_config"], top["vision_config"]
    reference = {"top": top, "text": Qwen2_5_VLTextConfig().to_dict(), "vision": Qwen2_5_VLVisionConfig().to_dict()}
    for kind, defaults in reference.items():
        assert set(defaults) == set(KNOWN_KEYS[kind]), kind
        for key, value in defaults.items():
            if value is not None:
                assert type(KNOWN_KEYS[kind][key]) is type(value), (kind, key)


def test_flat_nested_and_own_config_agree(tmp_path):
    nested = build_config("tiny", NESTED)
    assert _model_dict(build_config("tiny", FLAT)) == _model_dict(nested)
    assert nested.text_config.rope_parameters["mrope_section"] == [4, 4, 4]
    assert nested.text_config.rope_parameters["rope_theta"] == 500000.0
    # The tool accepts the config.json it writes and gets the same config back (special-token ids are its own).
    nested.save_pretrained(str(tmp_path))
    again = build_config("small", json.loads((tmp_path / "config.json").read_text()))
    assert _model_dict(again) == _model_dict(nested)


def test_sections_from_the_hf_keys_not_the_preset():
    """The issue's case: 7B-proportioned heads with HF's own M-RoPE sections."""
    text = {"hidden_size": 1024, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2}
    for rope in ({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
                 {"rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24]}},
                 {"mrope_section": [16, 24, 24]}):
        cfg = build_config("tiny", {"text_config": {**text, **rope}})
        assert cfg.text_config.rope_parameters["mrope_section"] == [16, 24, 24], rope


def test_dropped_keys_are_reported():
    _, dropped = normalize_overrides(FLAT, "f.json")
    assert set(dropped) == {"architectures", "bos_token_id", "eos_token_id", "image_token_id", "vision_token_id",
                            "transformers_version"}


@pytest.mark.parametrize("overrides,message", [
    ({"text_config": {"num_attention_head": 8}},
     "f.json: text_config.num_attention_head: unknown key for a Qwen2.5-VL config (did you mean 'num_attention_heads'?)"),
    ({"hiden_size": 8}, "f.json: hiden_size: unknown key for a Qwen2.5-VL config (did you mean 'hidden_size'?)"),
    ({"vision_config": {"depth": 2.5}}, "f.json: vision_config.depth: expected an integer, got 2.5"),
    ({"use_cache": "yes"}, "f.json: use_cache: expected true or false, got 'yes'"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "f.json: rope_scaling.type: only M-RoPE is supported"),
    ({"rope_scaling": {"type": "mrope", "factor": 4.0}}, "f.json: rope_scaling.factor: not supported"),
    ({"model_type": "qwen2_vl"}, "f.json: model_type: this tool writes Qwen2.5-VL ('qwen2_5_vl'), got 'qwen2_vl'"),
    ({"dtype": "float16", "text_config": {"dtype": "bfloat16"}}, "f.json: text_config.dtype: 'bfloat16' disagrees with dtype 'float16'"),
    ({"text_config": {"num_hidden_layers": 0}}, "f.json: text_config.num_hidden_layers: must be >= 1, got 0"),
    ({"text_config": {"num_key_value_heads": 3}}, "f.json: text_config.num_attention_heads: 4 is not divisible by num_key_value_heads 3"),
    ({"text_config": {"hidden_size": 96}}, "f.json: mrope_section: [2, 3, 3] must sum to head_dim/2 = 12"),
    ({"vision_config": {"out_hidden_size": 32}}, "f.json: vision_config.out_hidden_size: 32 must equal the text hidden_size 64"),
    ({"text_config": {"layer_types": ["full_attention"]}}, "f.json: text_config.layer_types: has 1 entries for num_hidden_layers 3"),
    ([1, 2], "f.json: expected a JSON object, got list"),
])
def test_bad_overrides_are_named(overrides, message):
    with pytest.raises(TinyConfigError) as exc:
        build_config("tiny", overrides, source="f.json")
    assert str(exc.value).startswith(message), str(exc.value)
