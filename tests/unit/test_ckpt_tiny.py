"""The generated tiny Qwen2.5-VL checkpoint loads offline in transformers and behaves like a real one."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from megatron_ral.tiny.checkpoint import make_tiny_checkpoint
from megatron_ral.tiny.tokenizer import SPECIAL_TOKENS


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", preset="tiny", seed=0)


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    again = make_tiny_checkpoint(tmp_path / "again", seed=0)
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    assert (tiny / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    assert (tiny / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_released_key_naming_and_shapes(tiny):
    with safe_open(str(tiny / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape() == [64, 64]
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [32, 64]
        assert f.get_slice("model.layers.0.self_attn.k_proj.bias").get_shape() == [32]
        assert f.get_slice("visual.merger.mlp.2.weight").get_shape() == [64, 128]
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    assert {k.split(".")[2] for k in keys if k.startswith("model.layers.")} == {"0", "1", "2"}
    assert not any(k.startswith("model.language_model.") or k.startswith("model.visual.") for k in keys)


def test_config_token_ids_match_tokenizer(tiny):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    cfg = AutoConfig.from_pretrained(str(tiny))
    ids = {t: tok.convert_tokens_to_ids(t) for t, _ in SPECIAL_TOKENS}
    # same relative order as the released vocabulary (151643..151664), contiguous after the base vocab
    assert list(ids.values()) == list(range(ids["<|endoftext|>"], ids["<|endoftext|>"] + len(SPECIAL_TOKENS)))
    assert cfg.image_token_id == ids["<|image_pad|>"]
    assert cfg.video_token_id == ids["<|video_pad|>"]
    assert cfg.vision_start_token_id == ids["<|vision_start|>"]
    assert cfg.vision_end_token_id == ids["<|vision_end|>"]
    assert cfg.text_config.eos_token_id == ids["<|im_end|>"] == tok.eos_token_id
    assert cfg.text_config.pad_token_id == ids["<|endoftext|>"] == tok.pad_token_id
    assert len(tok) <= cfg.text_config.vocab_size and cfg.text_config.vocab_size % 128 == 0
    text = "What is the person doing in the video? <answer>A</answer>"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.tokenize("<|vision_start|><|video_pad|><|vision_end|>") == [
        "<|vision_start|>", "<|video_pad|>", "<|vision_end|>"]


def test_tiny_config_shapes(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert (text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]) == (64, 4, 2)
    assert text["num_hidden_layers"] == 3 and cfg["tie_word_embeddings"] is False
    assert sum(text["rope_parameters"]["mrope_section"]) * 2 == 64 // 4
    assert vision["out_hidden_size"] == 64 and vision["tokens_per_second"] == 2
    assert vision["window_size"] == 112 and vision["fullatt_block_indexes"]


def _forward(ckpt, content, **media):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(ckpt), attn_implementation="eager").eval()
    proc = AutoProcessor.from_pretrained(str(ckpt))
    msgs = [{"role": "user", "content": content}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text], return_tensors="pt", **media)
    with torch.no_grad():
        logits = model(**inputs).logits
    return text, inputs, logits, model.config


def test_image_prompt_forward(tiny):
    img = Image.fromarray((np.random.RandomState(0).rand(56, 84, 3) * 255).astype(np.uint8))
    text, inputs, logits, cfg = _forward(tiny, [{"type": "image"}, {"type": "text", "text": "What is this?"}],
                                         images=[img])
    assert "<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    grid = inputs["image_grid_thw"][0]
    assert grid.tolist() == [1, 4, 6]
    assert inputs["pixel_values"].shape == (24, 3 * 2 * 14 * 14)
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == int(grid.prod()) // 4
    assert logits.shape == (1, inputs["input_ids"].shape[1], cfg.text_config.vocab_size)
    assert torch.isfinite(logits).all() and logits.std() > 0.1


def test_video_prompt_forward(tiny):
    video = torch.randint(0, 256, (4, 3, 28, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    text, inputs, logits, cfg = _forward(tiny, [{"type": "video"}, {"type": "text", "text": "What happens?"}],
                                         videos=[video])
    assert "<|vision_start|><|video_pad|><|vision_end|>What happens?" in text
    grid = inputs["video_grid_thw"][0]
    assert grid[0] == 2 and "second_per_grid_ts" in inputs
    assert int((inputs["input_ids"] == cfg.video_token_id).sum()) == int(grid.prod()) // 4
    assert torch.isfinite(logits).all()


def test_small_preset_and_overrides(tmp_path):
    from transformers import AutoConfig

    ckpt = make_tiny_checkpoint(tmp_path / "s", preset="small", seed=3,
                                config_overrides={"text_config": {"num_hidden_layers": 2},
                                                  "vision_config": {"depth": 1, "fullatt_block_indexes": [0]},
                                                  "dtype": "bfloat16"})
    cfg = AutoConfig.from_pretrained(str(ckpt))
    assert cfg.tie_word_embeddings is True
    assert cfg.text_config.num_attention_heads // cfg.text_config.num_key_value_heads == 4
    assert cfg.text_config.num_hidden_layers == 2 and cfg.text_config.hidden_size == 256
    assert cfg.vision_config.depth == 1
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert not any(k.startswith("model.layers.2.") for k in f.keys())


def test_bad_mrope_override_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="mrope_section"):
        make_tiny_checkpoint(tmp_path / "bad", config_overrides={"text_config": {"mrope_section": [2, 2, 2]}})
