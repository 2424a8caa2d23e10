"""The training run's vision budgets written into an HF directory's processor configs.

An exported checkpoint should be fed the inputs it was trained on: ``AutoProcessor.from_pretrained(export)``
must resize images and sample videos as the run's ``data`` section did. What HF's Qwen2-VL processors can
express is written; the rest is listed in :data:`NOT_EXPRESSIBLE` (README: "Export").

    preprocessor_config.json (image processor)   size.shortest_edge / longest_edge = data.image_min/max_pixels
    video_preprocessor_config.json               size = data.video_min/max_pixels, fps = data.fps,
                                                 min_frames / max_frames, do_sample_frames = true,
                                                 cap_pixels_per_frame = true, max_video_tokens from
                                                 data.video_total_pixels (HF's budget is 0.9 x tokens x 28 x 28)
    processor_config.json                        the same, in its nested image_processor / video_processor

Files only: no torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

CELL = 28 * 28  # pixels of one LM token (a 2 x 2 merge of 14 x 14 patches)
IMAGE_FILE = "preprocessor_config.json"
VIDEO_FILE = "video_preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"

# What the run's data settings decide that HF's processor configs cannot say.
NOT_EXPRESSIBLE = (
    "data.max_video_tokens (fewer frames for long videos under an LM-token budget)",
    "data.video_backend / dali_device / video_untagged_matrix (decoder and colour matrix of untagged streams)",
    "data.template / system_prompt (the prompt text; the chat template is exported unchanged)",
    "data.video_total_pixels when it is not 0.9 x N x 28 x 28 for a whole N (rounded to the nearest N)",
)


def image_settings(data: Mapping[str, Any]) -> dict:
    return {"size": {"shortest_edge": int(data["image_min_pixels"]), "longest_edge": int(data["image_max_pixels"])}}


def video_settings(data: Mapping[str, Any]) -> dict:
    return {"size": {"shortest_edge": int(data["video_min_pixels"]), "longest_edge": int(data["video_max_pixels"])},
            "fps": float(data["fps"]), "min_frames": int(data["min_frames"]), "max_frames": int(data["max_frames"]),
            "do_sample_frames": True, "cap_pixels_per_frame": True,
            "max_video_tokens": max(1, round(int(data["video_total_pixels"]) / (0.9 * CELL)))}


def _update_json(path: Path, update) -> bool:
    if not path.is_file():
        return False
    doc = json.loads(path.read_text())
    update(doc)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return True


def write_vision_budgets(hf_dir: str | os.PathLike, data: Mapping[str, Any]) -> list[str]:
    """Write the run's ``data`` settings (a ``to_dict(cfg)["data"]`` mapping) into the processor configs of
    ``hf_dir``; returns the names of the files changed. Image-only keys drop the legacy min/max_pixels."""
    hf_dir = Path(hf_dir)
    image, video = image_settings(data), video_settings(data)

    def apply(doc: dict, values: dict) -> None:
        for legacy in ("min_pixels", "max_pixels"):
            doc.pop(legacy, None)
        doc.update(values)

    changed = []
    if _update_json(hf_dir / IMAGE_FILE, lambda d: apply(d, image)):
        changed.append(IMAGE_FILE)
    if _update_json(hf_dir / VIDEO_FILE, lambda d: apply(d, video)):
        changed.append(VIDEO_FILE)

    def nested(doc: dict) -> None:
        if isinstance(doc.get("image_processor"), dict):
            apply(doc["image_processor"], image)
        if isinstance(doc.get("video_processor"), dict):
            apply(doc["video_processor"], video)

    if _update_json(hf_dir / PROCESSOR_FILE, nested):
        changed.append(PROCESSOR_FILE)
    return changed


__all__ = ["NOT_EXPRESSIBLE", "image_settings", "video_settings", "write_vision_budgets"]
