"""Config overrides of a tiny checkpoint, given in Hugging Face's own terms, checked key by key.

:func:`normalize_overrides` takes what a user would copy from a Qwen2.5-VL ``config.json``: the nested
layout of transformers 5 (``text_config`` / ``vision_config``) or the flat released one (text keys at the
top level), M-RoPE sections as ``rope_scaling.mrope_section`` or ``rope_parameters.mrope_section`` (or the
presets' shorthand ``text_config.mrope_section``), ``rope_theta`` at the top, in ``text_config`` or in
``rope_parameters``, ``torch_dtype`` for ``dtype``, the released vision names ``in_chans`` and
``spatial_patch_size``. It returns the presets' form (``text_config`` with ``mrope_section`` and
``rope_theta``, ``vision_config``, top-level keys) and refuses, with one line naming the key:

* a key transformers' Qwen2.5-VL config does not have (with the closest known name);
* a value of the wrong type (an integer field given a string, ...);
* a size that is not positive, and rope scaling other than M-RoPE.

Keys the tiny checkpoint defines itself are dropped and reported back (so the tool can say so): the
special-token ids (the tiny tokenizer assigns them), ``architectures``, ``model_type``,
``transformers_version``, ``_name_or_path``. Cross-field rules (head counts, section sums) are checked by
:func:`check_sizes` on the merged config.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

from megatron_ral.errors import UserError

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
MODEL_TYPES = {"top": ("qwen2_5_vl",), "text": ("qwen2_5_vl", "qwen2_5_vl_text"),
               "vision": ("qwen2_5_vl", "qwen2_5_vl_vision")}
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "image_token_id", "video_token_id",
                 "vision_start_token_id", "vision_end_token_id", "vision_token_id")
DROPPED_KEYS = ("transformers_version", "_name_or_path")
ROPE_KEYS = ("rope_scaling", "rope_parameters", "rope_theta", "mrope_section")
VISION_ALIASES = {"in_chans": "in_channels", "spatial_patch_size": "patch_size"}
# Text keys transformers accepts beyond its text config's defaults.
EXTRA_TEXT_KEYS = {"tie_word_embeddings": False}
DTYPES = ("float32", "bfloat16", "float16")
POSITIVE = {
    "text": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "max_position_embeddings"),
    "vision": ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
               "spatial_merge_size", "temporal_patch_size", "window_size", "tokens_per_second"),
}


PRESETS: dict[str, dict[str, Any]] = {
    # Test model: GQA 2:1, head_dim 16 (mrope sections sum to 8), 3 layers (uneven PP split), untied.
    "tiny": {
        "text_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096,
            "rope_theta": 1000000.0,
            "mrope_section": [2, 3, 3],
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "fullatt_block_indexes": [1],
        },
        "tie_word_embeddings": False,
    },
    # Benchmark / quickstart model: GQA 4:1, head_dim 32 (sections sum to 16), 4 layers, tied.
    "small": {
        "text_config": {
            "hidden_size": 256,
            "intermediate_size": 688,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "mrope_section": [4, 6, 6],
        },
        "vision_config": {
            "depth": 4,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "fullatt_block_indexes": [1, 3],
        },
        "tie_word_embeddings": True,
    },
}

# Vision settings shared by every preset (the released values).
VISION_COMMON = {
    "hidden_act": "silu",
    "in_channels": 3,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 112,
    "tokens_per_second": 2,
}


class TinyConfigError(UserError, ValueError):
    """A config override the tiny checkpoint cannot use (the message names the key)."""


# The keys of transformers' Qwen2.5-VL configs with a value of their type (transformers' defaults; a
# unit test compares these tables with the installed transformers). Written out so that checking a
# --config-json file does not import transformers and torch.
_COMMON = {"transformers_version": "", "architectures": None, "output_hidden_states": False, "return_dict": True,
           "dtype": None, "chunk_size_feed_forward": 0, "is_encoder_decoder": False, "id2label": {},
           "label2id": {}, "problem_type": None, "_name_or_path": "", "model_type": "", "output_attentions": False}
_TEXT = {"vocab_size": 0, "hidden_size": 0, "intermediate_size": 0, "num_hidden_layers": 0,
         "num_attention_heads": 0, "num_key_value_heads": 0, "hidden_act": "", "max_position_embeddings": 0,
         "initializer_range": 0.0, "rms_norm_eps": 0.0, "use_cache": True, "use_sliding_window": False,
         "sliding_window": None, "max_window_layers": 0, "layer_types": [], "attention_dropout": 0.0,
         "rope_parameters": {}, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None}
_VISION = {"depth": 0, "hidden_size": 0, "hidden_act": "", "intermediate_size": 0, "num_heads": 0, "in_channels": 0,
           "patch_size": 0, "spatial_merge_size": 0, "temporal_patch_size": 0, "tokens_per_second": 0,
           "window_size": 0, "out_hidden_size": 0, "fullatt_block_indexes": [], "initializer_range": 0.0,
           "rope_parameters": {}}
_TOP = {"image_token_id": 0, "video_token_id": 0, "vision_start_token_id": 0, "vision_end_token_id": 0,
        "tie_word_embeddings": False}
KNOWN_KEYS = {"top": {**_COMMON, **_TOP}, "text": {**_COMMON, **_TEXT}, "vision": {**_COMMON, **_VISION}}


def _defaults() -> dict[str, dict[str, Any]]:
    return KNOWN_KEYS


def _fail(source: str, key: str, rule: str) -> TinyConfigError:
    return TinyConfigError(f"{source}: {key}: {rule}")


def _check_type(source: str, key: str, value: Any, default: Any) -> None:
    """``value`` has the JSON type of transformers' default (numbers: int fields want integers)."""
    if default is None:
        return
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    elif isinstance(default, (list, tuple)):
        ok, want = isinstance(value, list), "a list"
    elif isinstance(default, dict):
        ok, want = isinstance(value, dict), "an object"
    else:
        return
    if not ok:
        raise _fail(source, key, f"expected {want}, got {value!r}")


def _unknown(source: str, key: str, name: str, known: list[str]) -> TinyConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return _fail(source, key, f"unknown key for a Qwen2.5-VL config{hint}")


def _int_list(source: str, key: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise _fail(source, key, f"expected a list of positive integers, got {value!r}")
    return list(value)


def _number(source: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise _fail(source, key, f"expected a positive number, got {value!r}")
    return float(value)


def _rope(source: str, where: str, key: str, value: Any, text: dict) -> None:
    """Fold one rope key of the top level or text_config into text's mrope_section / rope_theta."""
    full = f"{where}{key}"
    if key == "rope_theta":
        text["rope_theta"] = _number(source, full, value)
        return
    if key == "mrope_section":
        text["mrope_section"] = _int_list(source, full, value)
        return
    if value is None:
        return
    if not isinstance(value, dict):
        raise _fail(source, full, f"expected an object, got {value!r}")
    for sub, v in value.items():
        if sub in ("type", "rope_type"):
            if v not in ("mrope", "default"):
                raise _fail(source, f"{full}.{sub}", f"only M-RoPE is supported ('mrope' / 'default'), got {v!r}")
        elif sub == "mrope_section":
            text["mrope_section"] = _int_list(source, f"{full}.{sub}", v)
        elif sub == "rope_theta":
            text["rope_theta"] = _number(source, f"{full}.{sub}", v)
        elif sub == "mrope_interleaved" and v is False:
            pass
        else:
            raise _fail(source, f"{full}.{sub}", "not supported (Qwen2.5-VL uses plain M-RoPE: type, mrope_section, "
                                                 "rope_theta)")


def _dtype(source: str, key: str, value: Any, top: dict) -> None:
    """dtype / torch_dtype (top level or a sub-config: they must agree) into ``top["dtype"]``."""
    if value not in DTYPES:
        raise _fail(source, key, f"expected one of {list(DTYPES)}, got {value!r}")
    if top.get("dtype", value) != value:
        raise _fail(source, key, f"{value!r} disagrees with dtype {top['dtype']!r} given elsewhere")
    top["dtype"] = value


def _section(source: str, kind: str, data: dict, out: dict, top: dict, dropped: list[str], prefix: str) -> None:
    """Check the keys of one sub-config (``kind`` text / vision) into ``out`` (its dtype into ``top``)."""
    defaults = _defaults()[kind]
    if kind == "text":
        defaults = {**EXTRA_TEXT_KEYS, **defaults}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key in TOKEN_ID_KEYS or key in DROPPED_KEYS or key == "architectures":
            dropped.append(full)
            continue
        if key == "model_type":
            if value not in MODEL_TYPES[kind]:
                raise _fail(source, full, f"expected one of {list(MODEL_TYPES[kind])}, got {value!r}")
            continue
        if kind == "text" and key in ROPE_KEYS:
            _rope(source, prefix, key, value, out)
            continue
        if kind == "vision" and key in VISION_ALIASES:
            name = VISION_ALIASES[key]
            if name in data and data[name] != value:
                raise _fail(source, full, f"{value!r} disagrees with {prefix}{name} = {data[name]!r}")
            key, full = name, f"{prefix}{name}"
        if key in ("dtype", "torch_dtype"):
            if value is not None:
                _dtype(source, full, value, top)
            continue
        if key not in defaults:
            raise _unknown(source, full, key, sorted(defaults))
        _check_type(source, full, value, defaults[key])
        if key in POSITIVE[kind] and value <= 0:
            raise _fail(source, full, f"must be >= 1, got {value}")
        out[key] = value


def normalize_overrides(data: Any, source: str = "config overrides") -> tuple[dict, list[str]]:
    """(overrides in the presets' form, keys dropped because the tiny checkpoint sets them itself)."""
    if not isinstance(data, dict):
        raise TinyConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    defaults = _defaults()
    text: dict = {}
    vision: dict = {}
    top: dict = {}
    dropped: list[str] = []
    flat_text = {}
    for key, value in data.items():
        if key == "text_config":
            if not isinstance(value, dict):
                raise _fail(source, key, f"expected an object, got {value!r}")
            _section(source, "text", value, text, top, dropped, "text_config.")
        elif key == "vision_config":
            if not isinstance(value, dict):
                raise _fail(source, key, f"expected an object, got {value!r}")
            _section(source, "vision", value, vision, top, dropped, "vision_config.")
        elif key in TOKEN_ID_KEYS or key in DROPPED_KEYS:
            dropped.append(key)
        elif key == "architectures":
            if not isinstance(value, list) or ARCHITECTURE not in value:
                raise _fail(source, key, f"expected [{ARCHITECTURE!r}], got {value!r}")
            dropped.append(key)
        elif key == "model_type":
            if value not in MODEL_TYPES["top"]:
                raise _fail(source, key, f"this tool writes Qwen2.5-VL ('qwen2_5_vl'), got {value!r}")
        elif key in ("dtype", "torch_dtype"):
            _dtype(source, key, value, top)
        elif key in defaults["top"]:
            _check_type(source, key, value, defaults["top"][key])
            top[key] = value
        elif key in defaults["text"] or key in ROPE_KEYS:
            flat_text[key] = value  # the released flat layout: text keys at the top level
        else:
            known = sorted(set(defaults["top"]) | set(defaults["text"]) | {"text_config", "vision_config"})
            raise _unknown(source, key, key, known)
    flat: dict = {}
    _section(source, "text", flat_text, flat, top, dropped, "")
    for key, value in flat.items():
        if key in text and text[key] != value:
            raise _fail(source, key, f"{value!r} disagrees with text_config.{key} = {text[key]!r}")
        text.setdefault(key, value)
    out = dict(top)
    if text:
        out["text_config"] = text
    if vision:
        out["vision_config"] = vision
    return out, dropped


def check_sizes(text: dict, vision: dict, source: str) -> None:
    """Cross-field rules of the merged text / vision settings (presets' form)."""
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    kv = text.get("num_key_value_heads", heads)
    if hidden % heads:
        raise _fail(source, "text_config.hidden_size", f"{hidden} is not divisible by num_attention_heads {heads}")
    if heads % kv:
        raise _fail(source, "text_config.num_attention_heads",
                    f"{heads} is not divisible by num_key_value_heads {kv}")
    layers = text["num_hidden_layers"]
    if "layer_types" in text and len(text["layer_types"]) != layers:
        raise _fail(source, "text_config.layer_types", f"has {len(text['layer_types'])} entries for "
                                                        f"num_hidden_layers {layers}")
    head_dim = hidden // heads
    section = text["mrope_section"]
    if len(section) != 3:
        raise _fail(source, "mrope_section", f"needs 3 entries (temporal, height, width), got {section}")
    if sum(section) * 2 != head_dim:
        raise _fail(source, "mrope_section", f"{section} must sum to head_dim/2 = {head_dim // 2} "
                                             f"(hidden_size {hidden} / {heads} heads / 2)")
    if vision["hidden_size"] % vision["num_heads"]:
        raise _fail(source, "vision_config.hidden_size",
                    f"{vision['hidden_size']} is not divisible by num_heads {vision['num_heads']}")
    if vision.get("out_hidden_size", hidden) != hidden:
        raise _fail(source, "vision_config.out_hidden_size",
                    f"{vision['out_hidden_size']} must equal the text hidden_size {hidden} (the merger feeds the LM)")
    if vision.get("in_channels", 3) != 3:
        raise _fail(source, "vision_config.in_channels", "must be 3 (the processor writes RGB patches)")
    bad = [i for i in vision.get("fullatt_block_indexes", []) if not 0 <= i < vision["depth"]]
    if bad:
        raise _fail(source, "vision_config.fullatt_block_indexes", f"{bad} outside 0..depth-1 = {vision['depth'] - 1}")
    unit = vision["patch_size"] * vision["spatial_merge_size"]
    if vision["window_size"] % unit:
        raise _fail(source, "vision_config.window_size",
                    f"{vision['window_size']} must be a multiple of patch_size x spatial_merge_size = {unit}")


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_spec(preset: str, overrides: Any, source: str = "config overrides") -> tuple[dict, dict, dict]:
    """(text, vision, top-level) settings of ``preset`` with ``overrides`` (HF keys) merged and checked."""
    if preset not in PRESETS:
        raise TinyConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    normalized, _ = normalize_overrides(overrides or {}, source)
    spec = _merge(PRESETS[preset], normalized)
    text = dict(spec.pop("text_config"))
    vision = _merge(VISION_COMMON, spec.pop("vision_config"))
    vision.setdefault("out_hidden_size", text["hidden_size"])
    check_sizes(text, vision, source)
    return text, vision, spec
