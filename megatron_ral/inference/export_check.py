"""An HF export checked against the Megatron checkpoint it came from (tools/export_hf.py).

    load_check(hf_dir, prompt)                    transformers loads the export and greedily generates a few tokens
    logits_difference(model, hf_model, prompt)    max |logit_megatron - logit_hf| over every prompt position, fp32

Both models see the same prompt: the token ids and pixel inputs the project's data pipeline built (with the
training run's budgets). The Megatron model runs its plain full forward (no KV cache); transformers its
eager attention; the Megatron model resumes text positions after a video as the installed transformers
does (:func:`transformers_rope_rule`), so that the check compares weights, not the two position rules.
Single process (TP = PP = 1): this is a check of the weights and the configs, not of a
layout.
"""

from __future__ import annotations

import os

import torch

from megatron_ral.inference.prompts import PromptInput

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def transformers_rope_rule() -> str:
    """Where the installed transformers resumes M-RoPE text positions after a video (the Megatron model's
    ``rope_text_after_vision``): "spatial_extent" from transformers 5.3 on, "max_position" before."""
    import transformers
    from packaging.version import Version

    return "spatial_extent" if Version(transformers.__version__).release >= (5, 3) else "max_position"


def load_hf(hf_dir: str | os.PathLike):
    """The export as a transformers model: fp32, eager attention, eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                              attn_implementation="eager").eval()


def hf_inputs(prompt: PromptInput, image_token_id: int, video_token_id: int) -> dict:
    """transformers' keyword inputs for one prompt (batch of 1)."""
    ids = prompt.input_ids[None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
           "mm_token_type_ids": (ids == image_token_id).int() + 2 * (ids == video_token_id).int()}
    out.update({k: getattr(prompt, k) for k in VISION_KEYS if getattr(prompt, k) is not None})
    return out


@torch.no_grad()
def hf_greedy(hf_model, prompt: PromptInput, max_new_tokens: int, stop_token_ids: list[int]) -> list[int]:
    """transformers generate() greedily on one prompt: the new token ids."""
    cfg = hf_model.config
    out = hf_model.generate(**hf_inputs(prompt, cfg.image_token_id, cfg.video_token_id), do_sample=False,
                            max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=list(stop_token_ids),
                            pad_token_id=stop_token_ids[0])
    return out[0, prompt.input_ids.numel():].tolist()


@torch.no_grad()
def megatron_logits(model, prompt: PromptInput) -> torch.Tensor:
    """(L, V) fp32 logits of the Megatron model (single stage) at every prompt position, padded vocabulary
    rows removed."""
    logits = model(input_ids=prompt.input_ids[None], runtime_gather_output=True,
                   **{k: getattr(prompt, k) for k in VISION_KEYS})
    return logits[0].float()


@torch.no_grad()
def logits_difference(model, hf_model, prompt: PromptInput) -> dict:
    """{"max_abs": max |Megatron - HF| over the prompt's positions and the vocabulary, "max_logit": the
    largest |logit| (the scale), "positions": L}."""
    cfg = hf_model.config
    ref = hf_model(**hf_inputs(prompt, cfg.image_token_id, cfg.video_token_id)).logits[0].float()
    got = megatron_logits(model, prompt)[:, : ref.shape[-1]]
    return {"max_abs": float((got - ref).abs().max()), "max_logit": float(ref.abs().max()),
            "positions": int(ref.shape[0])}


__all__ = ["transformers_rope_rule", "hf_greedy", "hf_inputs", "load_hf", "logits_difference", "megatron_logits"]
