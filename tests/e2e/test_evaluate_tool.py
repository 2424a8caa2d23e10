"""tools/evaluate.py: the greedy responses it scores equal transformers' generate() on the same converted
checkpoint and the prompts the data pipeline builds from the same records, and its accuracy / format are
the reward parser's on those responses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_ral.testing.inference import converted_checkpoint, hf_generate, load_hf_model

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_NEW = 8


def test_evaluate_tool_matches_hf_generate_and_reward(tmp_path):
    from megatron_ral.config.data import DataConfig
    from megatron_ral.data.processor import QwenVLProcessor
    from megatron_ral.data.records import RecordIndex
    from megatron_ral.data.samples import SampleBuilder
    from megatron_ral.data.synthetic import make_synthetic_dataset
    from megatron_ral.inference.loading import stop_token_ids
    from megatron_ral.inference.prompts import PromptInput
    from megatron_ral.rl.rewards import score

    hf_dir, mc_dir = converted_checkpoint(tmp_path, "tiny", seed=4)
    make_synthetic_dataset(str(tmp_path / "data"), 20, seed=3)
    records = tmp_path / "data" / "test.json"
    settings = {"fps": 1.0, "max_frames": 4, "video_min_pixels": 3136, "video_max_pixels": 3136,
                "image_min_pixels": 3136, "image_max_pixels": 3136}
    overrides = [f"data.{k}={v}" for k, v in settings.items()] + ["data.num_workers=0"]
    cmd = [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--ckpt", str(mc_dir), "--data", str(records),
           "--max-new-tokens", str(MAX_NEW), "--show", "100", "--json", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    processor = QwenVLProcessor.from_pretrained(str(hf_dir))
    cfg = DataConfig(media_root=str(tmp_path / "data"), num_workers=0, **settings)
    builder = SampleBuilder(processor, cfg, "prompt")
    index = RecordIndex.build([str(records)])
    hf = load_hf_model(hf_dir)
    stops = stop_token_ids(hf_dir, processor.tokenizer)
    texts, acc, fmt = [], [], []
    for i in range(len(index)):
        sample = builder.build(index.read(i))
        v = sample.vision[0]
        grid = torch.tensor([v.grid_thw])
        kw = ({"pixel_values": v.pixel_values, "image_grid_thw": grid} if v.kind == "image" else
              {"pixel_values_videos": v.pixel_values, "video_grid_thw": grid,
               "second_per_grid_ts": torch.tensor([v.second_per_grid_ts])})
        ids = hf_generate(hf, PromptInput(sample.input_ids, **kw), MAX_NEW, stops)
        ids = ids[:-1] if ids and ids[-1] in stops else ids
        text = processor.decode(ids, skip_special_tokens=True)
        s = score(text, sample.record)
        texts.append(text), acc.append(s.accuracy), fmt.append(s.format)
    assert out["count"] == len(index) >= 2 and out["skipped"] == 0
    assert [s["response"] for s in out["samples"]] == texts
    assert out["accuracy"] == pytest.approx(sum(acc) / len(acc))
    assert out["format"] == pytest.approx(sum(fmt) / len(fmt))
