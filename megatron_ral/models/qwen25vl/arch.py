"""The shape facts of a Qwen2.5-VL checkpoint that the converters need, read from its HF config.json."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_ral.errors import UserError

class UnsupportedCheckpointError(UserError, ValueError):
    """The checkpoint is not a Qwen2.5-VL model this code understands."""


SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)
SUPPORTED_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",)


@dataclass(frozen=True)
class Qwen25VLArch:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    vision_depth: int

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim


def load_hf_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise UnsupportedCheckpointError(f"{path}: config.json not found; a Qwen2.5-VL HF config is required")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnsupportedCheckpointError(f"{path}: not valid JSON ({e})") from None


def arch_from_config(cfg: dict, source: str = "config.json") -> Qwen25VLArch:
    """Validate that `cfg` (an HF config.json dict) is Qwen2.5-VL and extract the converter's shape facts.

    Accepts the nested (transformers 5: text_config / vision_config) and the flat (released, transformers 4)
    layouts.
    """
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        raise UnsupportedCheckpointError(
            f"{source}: unsupported architecture (model_type={model_type!r}, architectures={archs}); "
            f"this converter handles Qwen2.5-VL only (model_type 'qwen2_5_vl', "
            f"architectures {list(SUPPORTED_ARCHITECTURES)})")
    text = dict(cfg)
    text.update(cfg.get("text_config") or {})
    vision = cfg.get("vision_config") or {}
    try:
        hidden = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        groups = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or hidden // heads)
        arch = Qwen25VLArch(
            num_layers=int(text["num_hidden_layers"]),
            hidden_size=hidden,
            ffn_hidden_size=int(text["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=groups,
            head_dim=head_dim,
            vocab_size=int(text["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision_depth=int(vision.get("depth", 32)),
        )
    except KeyError as e:
        raise UnsupportedCheckpointError(f"{source}: missing config key {e}") from None
    except (TypeError, ValueError) as e:
        raise UnsupportedCheckpointError(f"{source}: a size in the config is not an integer ({e})") from None
    if heads % groups:
        raise UnsupportedCheckpointError(f"{source}: num_attention_heads {heads} not divisible by KV heads {groups}")
    return arch
