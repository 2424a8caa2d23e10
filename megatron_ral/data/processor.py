"""Tokenizer + chat template + vision geometry of a checkpoint directory, and prompt encoding.

The encoding is the one of transformers' Qwen2_5_VLProcessor: render the chat template, tokenize,
and replace every `<|image_pad|>` / `<|video_pad|>` by as many copies as its image/video has LM
tokens (grid_t*grid_h*grid_w / merge_size**2). The expansion is done on token ids (the pad tokens
are atomic special tokens, so this equals tokenizing the expanded text).
"""

from __future__ import annotations

import json
import os

import torch

from megatron_ral.data.geometry import VisionParams
from megatron_ral.data.pixels import VisionInput

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"


def load_chat_template(model_dir: str, tokenizer) -> str:
    """The processor's chat template (chat_template.jinja / chat_template.json), else the tokenizer's."""
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    js = os.path.join(model_dir, "chat_template.json")
    if os.path.exists(js):
        with open(js) as f:
            return json.load(f)["chat_template"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise ValueError(f"{model_dir} has no chat template")


class QwenVLProcessor:
    def __init__(self, tokenizer, params: VisionParams, chat_template: str):
        self.tokenizer = tokenizer
        self.params = params
        self.chat_template = chat_template
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_PAD, VIDEO_PAD, IM_END, ENDOFTEXT)}
        missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer lacks the Qwen2.5-VL tokens {missing}")
        self.image_token_id = ids[IMAGE_PAD]
        self.video_token_id = ids[VIDEO_PAD]
        self.im_end_id = ids[IM_END]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[ENDOFTEXT]

    @classmethod
    def from_pretrained(cls, model_dir: str) -> "QwenVLProcessor":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return cls(tokenizer, VisionParams.from_pretrained(model_dir), load_chat_template(model_dir, tokenizer))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def expand_vision_pads(self, ids: list[int], vision: list[VisionInput]) -> list[int]:
        """Replace the i-th image (video) pad token by num_tokens of the i-th image (video) input."""
        images = [v for v in vision if v.kind == "image"]
        videos = [v for v in vision if v.kind == "video"]
        n_img = sum(1 for t in ids if t == self.image_token_id)
        n_vid = sum(1 for t in ids if t == self.video_token_id)
        if n_img != len(images) or n_vid != len(videos):
            raise ValueError(
                f"prompt has {n_img} image and {n_vid} video placeholders but {len(images)} images and {len(videos)} videos were given"
            )
        m = self.params.merge_size
        counts = {self.image_token_id: iter([v.num_tokens(m) for v in images]), self.video_token_id: iter([v.num_tokens(m) for v in videos])}
        out: list[int] = []
        for t in ids:
            if t in counts:
                out.extend([t] * next(counts[t]))
            else:
                out.append(t)
        return out

    def encode_prompt(self, messages: list[dict], vision: list[VisionInput], add_generation_prompt: bool = True) -> torch.Tensor:
        """input_ids [L] of the rendered conversation with the vision pads expanded."""
        ids = self.tokenize(self.render(messages, add_generation_prompt))
        return torch.tensor(self.expand_vision_pads(ids, vision), dtype=torch.long)

    def encode_target(self, text: str) -> torch.Tensor:
        """Assistant reply tokens as the chat template closes a turn: text + <|im_end|>."""
        return torch.tensor(self.tokenize(text) + [self.im_end_id], dtype=torch.long)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
