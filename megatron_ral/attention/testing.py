"""References for the capture tests: HF eager attention rows, prompt + response sequences, a RAL-style loss.

``hf_attention_rows`` is the independent reference of the whole capture: transformers' eager
``Qwen2_5_VLForConditionalGeneration`` with ``output_attentions=True``, last layer, mean over heads,
row of response token t restricted to positions i < t and renormalised (paper Eq. 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_ral.attention.divergence import aggregate_tokens, jsd
from megatron_ral.attention.layout import RowLayout
from megatron_ral.inference.prompts import PromptInput

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def random_response(length: int, seed: int, vocab: int = 900) -> list[int]:
    """``length`` seeded text-token ids (below the tiny tokenizer's special tokens)."""
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def with_response(prompt: PromptInput, response_ids: list[int]) -> PromptInput:
    """The prompt followed by the response tokens (same vision inputs)."""
    ids = torch.cat([prompt.input_ids, torch.as_tensor(response_ids, dtype=torch.long)])
    return PromptInput(ids, **{k: getattr(prompt, k) for k in VISION_KEYS})


def model_inputs(seq: PromptInput) -> dict:
    """Keyword inputs of Qwen25VLModel for one unpadded sequence (batch of 1)."""
    out = {"input_ids": seq.input_ids[None]}
    out.update({k: getattr(seq, k) for k in VISION_KEYS if getattr(seq, k) is not None})
    return out


def padded_batch(seqs: list[PromptInput], padding_side: str, pad_id: int) -> dict:
    """Keyword inputs of a padded batch of sequences (vision inputs concatenated in row order) with
    its (B, S) padding mask as ``attention_mask``."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(length - len(s), length) if padding_side == "left" else slice(0, len(s))
        ids[b, sl] = s.input_ids
        mask[b, sl] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    for key in VISION_KEYS:
        parts = [getattr(s, key) for s in seqs if getattr(s, key) is not None]
        if parts:
            out[key] = torch.cat(parts)
    return out


@torch.no_grad()
def hf_attention_rows(hf_model, prompt: PromptInput, response_ids: list[int]) -> Tensor:
    """float64 [R, T]: HF eager last-layer attention, head mean, row P+r renormalised over i < P+r."""
    seq = with_response(prompt, response_ids)
    cfg = hf_model.config
    ids = seq.input_ids[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "mm_token_type_ids": (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()}
    inputs.update({k: getattr(seq, k) for k in VISION_KEYS if getattr(seq, k) is not None})
    att = hf_model(**inputs, output_attentions=True).attentions[-1][0].double()  # [heads, T, T]
    mean = att.mean(0)
    plen, num = len(prompt), len(response_ids)
    rows = torch.zeros(num, len(seq), dtype=torch.float64)
    for r in range(num):
        t = plen + r
        rows[r, :t] = mean[t, :t] / mean[t, :t].sum()
    return rows


def ral_loss(p: Tensor, p_old: Tensor, layout: RowLayout, advantages: Tensor | None = None) -> Tensor:
    """Token-mean of A_b * JSD(p || p_old) over the valid rows (paper Eq. 3 with sequence advantages)."""
    mask = layout.policy_key_mask(p.shape[-1]).to(p.device)
    per_token = jsd(p, p_old, mask)
    weights = None if advantages is None else advantages.to(p.dtype)[:, None].expand_as(per_token)
    row_mask = None if layout.row_valid is None else layout.row_valid.to(p.device)
    return aggregate_tokens(per_token, row_mask, "token_mean", weights)
