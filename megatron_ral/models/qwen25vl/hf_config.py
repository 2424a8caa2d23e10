"""The language-model facts of a Qwen2.5-VL checkpoint, read from its Hugging Face config object.

``load_hf_config`` gives a transformers ``Qwen2_5_VLConfig``; :class:`LMArchitecture` the decoder's shapes
and rotary settings; :func:`padded_vocab_size` the vocabulary padded for the tensor-parallel split.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any


VOCAB_PAD_MULTIPLE = 128


def load_hf_config(source: Any):
    """A transformers ``Qwen2_5_VLConfig`` from a checkpoint dir, a config.json path, a dict or a config."""
    from transformers import Qwen2_5_VLConfig

    if isinstance(source, Qwen2_5_VLConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no HF config.json at {path}")
        with open(path) as f:
            source = json.load(f)
    if not isinstance(source, dict):
        raise TypeError(f"cannot read a Qwen2.5-VL config from {type(source).__name__}")
    model_type = source.get("model_type")
    if model_type not in (None, "qwen2_5_vl"):
        raise ValueError(
            f"unsupported model_type {model_type!r}: this model implements Qwen2.5-VL ('qwen2_5_vl') only"
        )
    return Qwen2_5_VLConfig.from_dict(source)


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int = 1, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Smallest multiple of lcm(multiple, tp) >= vocab_size."""
    step = math.lcm(multiple, tensor_parallel_size)
    return int(math.ceil(vocab_size / step) * step)


def _rope_params(text_config) -> tuple[float, list[int]]:
    params = getattr(text_config, "rope_parameters", None) or {}
    scaling = getattr(text_config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(text_config, "rope_theta", None))
    section = params.get("mrope_section", scaling.get("mrope_section"))
    if theta is None:
        raise ValueError("HF text_config has no rope_theta")
    if section is None:
        raise ValueError("HF text_config has no mrope_section (rope_parameters / rope_scaling)")
    return float(theta), [int(s) for s in section]


@dataclass(frozen=True)
class LMArchitecture:
    """The language-model facts read from an HF Qwen2.5-VL config."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: list[int]
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str
    init_std: float = 0.02

    @classmethod
    def from_hf(cls, hf_config) -> "LMArchitecture":
        t = hf_config.text_config
        head_dim = t.hidden_size // t.num_attention_heads
        if getattr(t, "head_dim", None) not in (None, head_dim):
            raise ValueError(f"head_dim {t.head_dim} != hidden_size / num_attention_heads = {head_dim}")
        theta, section = _rope_params(t)
        if 2 * sum(section) != head_dim:
            raise ValueError(f"mrope_section {section} must sum to head_dim / 2 = {head_dim // 2}")
        if getattr(t, "use_sliding_window", False):
            raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
        return cls(
            num_layers=t.num_hidden_layers,
            hidden_size=t.hidden_size,
            ffn_hidden_size=t.intermediate_size,
            num_attention_heads=t.num_attention_heads,
            num_query_groups=t.num_key_value_heads or t.num_attention_heads,
            kv_channels=head_dim,
            rms_norm_eps=float(t.rms_norm_eps),
            rope_theta=theta,
            mrope_section=section,
            vocab_size=t.vocab_size,
            max_position_embeddings=t.max_position_embeddings,
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
            hidden_act=t.hidden_act,
            init_std=float(getattr(t, "initializer_range", 0.02)),
        )
