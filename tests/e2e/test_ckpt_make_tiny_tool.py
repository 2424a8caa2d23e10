"""tools/make_tiny_checkpoint.py end to end: flags, --config-json, the result loads in transformers offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_tiny_checkpoint.py"


def test_tool_writes_loadable_checkpoint(tmp_path):
    overrides = tmp_path / "over.json"
    overrides.write_text(json.dumps({"text_config": {"intermediate_size": 96}, "vision_config": {"depth": 4}}))
    out = tmp_path / "ckpt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(TOOL), "--out", str(out), "--preset", "tiny", "--seed", "7",
                    "--config-json", str(overrides)], check=True, env=env, timeout=300)
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "video_preprocessor_config.json", "generation_config.json"]:
        assert (out / name).is_file(), name

    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out))
    assert model.config.text_config.intermediate_size == 96 and model.config.vision_config.depth == 4
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("<|im_start|>user\nhello<|im_end|>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_tool_rejects_unknown_preset(tmp_path):
    res = subprocess.run([sys.executable, str(TOOL), "--out", str(tmp_path / "x"), "--preset", "huge"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_tool_takes_hf_config_keys_and_names_the_ones_it_sets_itself(tmp_path):
    """A released-style (flat) config: its M-RoPE sections are used, its token ids are reported as unused."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "rope_scaling": {"type": "mrope", "mrope_section": [4, 4, 4]},
                               "image_token_id": 151655, "vision_config": {"out_hidden_size": 96}}))
    out = tmp_path / "ckpt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(TOOL), "--out", str(out), "--config-json", str(cfg), "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"out": str(out), "preset": "tiny", "seed": 0}
    assert res.stderr.strip().splitlines() == [
        "note: image_token_id from --config-json not used: the tiny checkpoint sets them itself "
        "(special-token ids come from its tokenizer)"]
    written = json.loads((out / "config.json").read_text())
    assert written["text_config"]["rope_parameters"]["mrope_section"] == [4, 4, 4]
    assert written["text_config"]["hidden_size"] == 96 and written["image_token_id"] != 151655
