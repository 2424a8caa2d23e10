"""Build this rank's model stage from a megatron distributed checkpoint and load its weights.

The checkpoint directory (tools/convert_hf_to_megatron.py output, or a training run's iteration
directory) carries the HF config, tokenizer and processor files beside the torch_dist files; the
model is built from that config and megatron-core reshards the weights to the current TP/PP layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def hf_files_dir(ckpt: str | os.PathLike) -> Path:
    """The directory holding config.json for ``ckpt`` (itself, its dist dir, or a parent); a checkpoint
    without one raises a user error naming it."""
    from megatron_ral.checkpoint.locate import find_hf_config_dir, resolve_dist_dir

    return find_hf_config_dir(resolve_dist_dir(ckpt), ckpt)


def load_model(ckpt: str | os.PathLike, parallel=None, *, dtype: torch.dtype | None = None,
               backend: str = "auto", **build_kwargs):
    """The Qwen25VLModel of this rank (megatron parallel state initialised), weights from ``ckpt``,
    in eval mode. Loading goes through ``checkpoint.model_io.load_model_weights``, which also accepts a
    checkpoint written without the per-module state objects of the other layer spec (e.g. a converted
    checkpoint loaded with the Transformer Engine spec)."""
    from megatron_ral.checkpoint.model_io import load_model_weights
    from megatron_ral.models.qwen25vl.provider import build_model

    model = build_model(str(hf_files_dir(ckpt)), parallel, backend=backend, dtype=dtype, **build_kwargs)
    load_model_weights(model, ckpt)
    return model.eval()


def stop_token_ids(model_dir: str | os.PathLike, tokenizer=None) -> list[int]:
    """Stop ids: generation_config.json's eos_token_id, else config.json's, plus <|im_end|> and
    <|endoftext|> when the tokenizer knows them."""
    model_dir = Path(model_dir)
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                ids += [eos] if isinstance(eos, int) else list(eos)
                break
    if tokenizer is not None:
        for tok in ("<|im_end|>", "<|endoftext|>"):
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is not None and i != tokenizer.unk_token_id:
                ids.append(i)
    return sorted(set(int(i) for i in ids))
