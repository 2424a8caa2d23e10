"""Memory arithmetic of the Qwen2.5-VL model (no torch): shapes, parameters per rank, activations, KV cache.

    shape = load_shape("7b")                      # a preset (3b, 7b, 32b), an HF directory or a config.json
    params = lm_stage_parameters(shape, tp=2, pp=2, stage=1)   # megatron names and sizes on one rank
    per_token = layer_activation_bytes(shape, tp=2, dtype_bytes=2)

Parameters follow megatron-core's local layer spec (the Transformer Engine spec fuses the two norms into
``linear_qkv`` / ``linear_fc1`` under other names, with the same sizes; every parameter in the model dtype), in the model's ``named_parameters`` order; the vision tower is the transformers tower (frozen, whole on every rank of
the first pipeline stage).

Activations per token and layer: what autograd keeps for the backward of one decoder layer, counted from
the tensors it saves (h hidden, a = H d / TP query width, kv = H_kv d / TP, f = ffn / TP, d head dim):

    norms:      local spec 3h per norm (input, normalised, output), Transformer Engine 2h (fused into the
                next linear: input and normalised); sequence parallelism divides them by TP
    attention:  the qkv output (a + 2 kv; v is a view of it), rotated q and k (a + kv), the output and its
                copy for the projection (2a), the rotary tables (4 d), the log-sum-exp (H / TP, fp32)
    MLP:        fc1 output (2f), silu output, product and fc2 input (3f)
    fp32 norm statistics: one per norm

    per token per layer = b (n h + 4a + 3kv + 5f + 4d) + 4 (H / TP + 2),   n = 4 (TE) or 6 (local)

with b the activation dtype size; attention saves no score matrix (flash / SDPA kernels). With full
recompute (megatron's ``recompute_granularity="full"``, one layer per checkpoint) a layer keeps only its
input (h b per token) and the backward rebuilds one layer at a time.

Video tokens follow RESEARCH.md §6: a frame of H x W pixels gives (H/28)(W/28) LM tokens after the 2x2
merge, frames are paired by the temporal patch, so F frames give ceil(F/2) (H/28)(W/28) tokens and
ceil(F/2) (H/14)(W/14) vision patches.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from megatron_ral.models.qwen25vl.arch import UnsupportedCheckpointError, arch_from_config
from megatron_ral.models.qwen25vl.hf_config import padded_vocab_size

FP32 = 4


@dataclass(frozen=True)
class VisionShape:
    """The vision tower (transformers ``Qwen2_5_VisionTransformerPretrainedModel``): ViT blocks with
    SwiGLU MLPs (biased), a patch embedding without bias and the patch merger to the LM width."""

    depth: int = 32
    hidden: int = 1280
    intermediate: int = 3420
    heads: int = 16
    patch: int = 14
    temporal_patch: int = 2
    merge: int = 2
    in_channels: int = 3
    out_hidden: int = 3584

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch * self.patch * self.patch

    @property
    def merged_dim(self) -> int:
        return self.hidden * self.merge**2

    def parameters(self) -> list[tuple[str, int]]:
        """(name, numel) of the tower's parameters, transformers' names and order."""
        h, i = self.hidden, self.intermediate
        out = [("patch_embed.proj.weight", h * self.patch_dim)]
        for b in range(self.depth):
            p = f"blocks.{b}."
            out += [(p + "norm1.weight", h), (p + "norm2.weight", h),
                    (p + "attn.qkv.weight", 3 * h * h), (p + "attn.qkv.bias", 3 * h),
                    (p + "attn.proj.weight", h * h), (p + "attn.proj.bias", h),
                    (p + "mlp.gate_proj.weight", i * h), (p + "mlp.gate_proj.bias", i),
                    (p + "mlp.up_proj.weight", i * h), (p + "mlp.up_proj.bias", i),
                    (p + "mlp.down_proj.weight", h * i), (p + "mlp.down_proj.bias", h)]
        m = self.merged_dim
        out += [("merger.ln_q.weight", h), ("merger.mlp.0.weight", m * m), ("merger.mlp.0.bias", m),
                ("merger.mlp.2.weight", self.out_hidden * m), ("merger.mlp.2.bias", self.out_hidden)]
        return out

    def num_parameters(self) -> int:
        return sum(n for _, n in self.parameters())

    def forward_bytes_per_patch(self, dtype_bytes: int) -> int:
        """Peak bytes per patch of a no-grad tower forward beyond its input: the residual stream, one
        block's normalised input, qkv, attention output and MLP (gate, up, product) alive together."""
        h, i = self.hidden, self.intermediate
        return dtype_bytes * (4 * h + 3 * h + 3 * i)

    def input_bytes_per_patch(self, dtype_bytes: int) -> int:
        """The processor's fp32 patch vectors and their copy in the tower's dtype."""
        return self.patch_dim * (FP32 + dtype_bytes)


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a Qwen2.5-VL model that its memory depends on."""

    name: str
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    vision: VisionShape = field(default_factory=VisionShape)

    def check_tp(self, tp: int) -> str | None:
        """Why ``tp`` cannot split this model (None when it can)."""
        if tp < 1:
            return f"tensor parallel size {tp} must be >= 1"
        if self.heads % tp or self.kv_heads % tp:
            return (f"{self.name}: tensor parallel size {tp} must divide the attention heads ({self.heads}) and "
                    f"the KV heads ({self.kv_heads})")
        return None

    def padded_vocab(self, tp: int) -> int:
        return padded_vocab_size(self.vocab, tp)

    def num_parameters(self) -> int:
        """All parameters of the model (LM with one embedding copy when tied, plus the vision tower)."""
        per_rank = sum(p.numel for p in lm_stage_parameters(self, 1, 1, 0))
        return per_rank + self.vision.num_parameters()


def _preset(name, layers, hidden, ffn, heads, kv_heads, vocab, tied) -> ModelShape:
    return ModelShape(name=name, num_layers=layers, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads,
                      head_dim=hidden // heads, vocab=vocab, tied=tied, vision=VisionShape(out_hidden=hidden))


# The released Qwen2.5-VL-{3B,7B,32B}-Instruct shapes (RESEARCH.md §6; the vision tower is the same for all).
PRESETS: dict[str, ModelShape] = {
    "3b": _preset("Qwen2.5-VL-3B", 36, 2048, 11008, 16, 2, 151936, True),
    "7b": _preset("Qwen2.5-VL-7B", 28, 3584, 18944, 28, 4, 152064, False),
    "32b": _preset("Qwen2.5-VL-32B", 64, 5120, 27648, 40, 8, 152064, False),
}


def shape_from_config(cfg: dict, name: str = "config.json") -> ModelShape:
    """The shape of an HF Qwen2.5-VL ``config.json`` dict (nested transformers-5 or flat released layout)."""
    arch = arch_from_config(cfg, name)
    v = dict(cfg.get("vision_config") or {})
    for alias, key in (("in_chans", "in_channels"), ("spatial_patch_size", "patch_size")):
        if alias in v and key not in v:
            v[key] = v[alias]
    d = VisionShape()
    try:
        vision = VisionShape(
            depth=int(v.get("depth", d.depth)), hidden=int(v.get("hidden_size", d.hidden)),
            intermediate=int(v.get("intermediate_size", d.intermediate)), heads=int(v.get("num_heads", d.heads)),
            patch=int(v.get("patch_size", d.patch)), temporal_patch=int(v.get("temporal_patch_size", d.temporal_patch)),
            merge=int(v.get("spatial_merge_size", d.merge)), in_channels=int(v.get("in_channels", d.in_channels)),
            out_hidden=int(v.get("out_hidden_size", arch.hidden_size)),
        )
    except (TypeError, ValueError) as e:
        raise UnsupportedCheckpointError(f"{name}: a vision_config size is not an integer ({e})") from None
    return ModelShape(name=name, num_layers=arch.num_layers, hidden=arch.hidden_size, ffn=arch.ffn_hidden_size,
                      heads=arch.num_attention_heads, kv_heads=arch.num_query_groups, head_dim=arch.head_dim,
                      vocab=arch.vocab_size, tied=arch.tie_word_embeddings, vision=vision)


def load_shape(spec: str) -> ModelShape:
    """A preset name (3b, 7b, 32b; case-insensitive, "qwen2.5-vl-" prefix allowed), an HF directory holding a
    config.json, or a config.json file."""
    key = spec.lower().removeprefix("qwen2.5-vl-").removesuffix("-instruct")
    if key in PRESETS:
        return PRESETS[key]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UnsupportedCheckpointError(
            f"{spec}: neither a preset ({', '.join(PRESETS)}) nor an HF directory / config.json file")
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsupportedCheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UnsupportedCheckpointError(f"{path}: not a JSON object")
    return replace(shape_from_config(cfg, os.fspath(path)), name=os.fspath(spec))


# ----------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamEntry:
    """One parameter tensor of one rank: its name, elements on this rank, and whether it is trained."""

    name: str
    numel: int
    trainable: bool = True
    shared_embedding: bool = False  # tied embedding split over pipeline stages (own DDP bucket)
    norm: bool = False  # an RMSNorm weight (the model dtype, like every parameter)


def stage_layer_counts(num_layers: int, pp: int, split: list[int] | None = None) -> list[int]:
    """Decoder layers per pipeline stage: ``split`` if given, else even with the extra layers on the first
    stages (the provider's ``balanced_layer_split``; megatron's even split when PP divides the layers)."""
    if split is not None:
        if len(split) != pp or sum(split) != num_layers or min(split) < 0:
            raise ValueError(f"layer split {split} must have {pp} non-negative entries summing to {num_layers}")
        return list(split)
    if pp < 1 or num_layers < pp:
        raise ValueError(f"{pp} pipeline stages need at least {pp} layers, the model has {num_layers}")
    base, extra = divmod(num_layers, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def layer_parameters(shape: ModelShape, tp: int, index: int) -> list[ParamEntry]:
    """One decoder layer on one TP rank (local spec names): norms replicated, linears split over TP."""
    h, d = shape.hidden, shape.head_dim
    qkv = (shape.heads + 2 * shape.kv_heads) * d // tp
    p = f"language_model.decoder.layers.{index}."
    return [
        ParamEntry(p + "input_layernorm.weight", h, norm=True),
        ParamEntry(p + "self_attention.linear_proj.weight", h * shape.heads * d // tp),
        ParamEntry(p + "self_attention.linear_qkv.weight", qkv * h),
        ParamEntry(p + "self_attention.linear_qkv.bias", qkv),
        ParamEntry(p + "pre_mlp_layernorm.weight", h, norm=True),
        ParamEntry(p + "mlp.linear_fc1.weight", 2 * shape.ffn // tp * h),
        ParamEntry(p + "mlp.linear_fc2.weight", h * shape.ffn // tp),
    ]


def lm_stage_parameters(shape: ModelShape, tp: int, pp: int, stage: int,
                        split: list[int] | None = None) -> list[ParamEntry]:
    """The language model's parameters on one rank of pipeline stage ``stage`` (megatron-core names and
    ``named_parameters`` order). The embedding and output layer hold padded_vocab / TP rows; a tied
    output layer is the embedding itself at PP = 1 and a second copy on the last stage at PP > 1."""
    counts = stage_layer_counts(shape.num_layers, pp, split)
    first, last = stage == 0, stage == pp - 1
    vocab_rows = shape.padded_vocab(tp) // tp
    out: list[ParamEntry] = []
    if first:
        out.append(ParamEntry("language_model.embedding.word_embeddings.weight", vocab_rows * shape.hidden,
                              shared_embedding=shape.tied and pp > 1))
    for local in range(counts[stage]):
        out += layer_parameters(shape, tp, local)
    if last:
        out.append(ParamEntry("language_model.decoder.final_layernorm.weight", shape.hidden, norm=True))
        if not shape.tied or pp > 1:
            out.append(ParamEntry("language_model.output_layer.weight", vocab_rows * shape.hidden,
                                  shared_embedding=shape.tied))
    return out


def vision_parameters(shape: ModelShape) -> list[ParamEntry]:
    """The frozen vision tower (first pipeline stage, whole on every TP rank)."""
    return [ParamEntry("vision_model." + n, k, trainable=False) for n, k in shape.vision.parameters()]


def stage_parameters(shape: ModelShape, tp: int, pp: int, stage: int, split: list[int] | None = None,
                     vision: bool = True) -> list[ParamEntry]:
    """Everything one rank of ``stage`` holds: the vision tower on the first stage, then the LM."""
    out = vision_parameters(shape) if (vision and stage == 0) else []
    return out + lm_stage_parameters(shape, tp, pp, stage, split)


# ---------------------------------------------------------------------------------------- activations
def layer_activation_bytes(shape: ModelShape, tp: int, dtype_bytes: int, spec: str = "te",
                           sequence_parallel: bool = False) -> int:
    """Bytes one decoder layer keeps for backward per token of a micro-batch (module docstring)."""
    if spec not in ("te", "local"):
        raise ValueError(f"spec must be 'te' or 'local', got {spec!r}")
    norms = (2 if spec == "te" else 3) * 2
    h = shape.hidden / (tp if sequence_parallel else 1)
    a = shape.heads * shape.head_dim / tp
    kv = shape.kv_heads * shape.head_dim / tp
    f = shape.ffn / tp
    elements = norms * h + 4 * a + 3 * kv + 5 * f + 4 * shape.head_dim
    return int(math.ceil(dtype_bytes * elements + FP32 * (shape.heads / tp + 2)))


def layer_transient_bytes(shape: ModelShape, tp: int, dtype_bytes: int) -> int:
    """Bytes per token a no-grad forward of one layer holds at its widest point (the MLP): the residual
    stream, the fc1 output, the activation and the product."""
    return int(dtype_bytes * (2 * shape.hidden + 4 * shape.ffn / tp))


def final_norm_bytes(shape: ModelShape, dtype_bytes: int, spec: str = "te") -> int:
    """Per token: the final norm's saved tensors (same count as a layer norm) and its fp32 statistic."""
    return (2 if spec == "te" else 3) * shape.hidden * dtype_bytes + FP32


def output_layer_bytes(shape: ModelShape, tp: int, dtype_bytes: int) -> tuple[int, int]:
    """(kept for backward, transient peak) per scored token: the selected hidden state and the fp32
    softmax of the vocabulary-parallel cross entropy kept; the logits and their fp32 copy transient."""
    v = shape.padded_vocab(tp) // tp
    kept = shape.hidden * dtype_bytes + v * FP32
    transient = v * (dtype_bytes + FP32)
    return kept, transient


def kv_cache_bytes_per_token(shape: ModelShape, tp: int, layers: int, dtype_bytes: int) -> int:
    """K and V of ``layers`` layers for one cached token on one TP rank."""
    return 2 * layers * (shape.kv_heads // tp) * shape.head_dim * dtype_bytes


# ---------------------------------------------------------------------------------------------- video
def tokens_per_frame(pixels_per_frame: int, merge_patch: int = 28) -> int:
    """LM tokens of one frame of ``pixels_per_frame`` pixels (H and W multiples of 28: (H/28)(W/28))."""
    return pixels_per_frame // (merge_patch * merge_patch)


def video_tokens(frames: int, pixels_per_frame: int, temporal_patch: int = 2) -> int:
    """LM tokens of a video: ceil(F / 2) (H/28)(W/28) (an odd frame count is padded by one frame)."""
    return -(-frames // temporal_patch) * tokens_per_frame(pixels_per_frame)


def video_patches(shape: ModelShape, frames: int, pixels_per_frame: int) -> int:
    """Vision patches of a video: merge^2 patches per LM token."""
    return video_tokens(frames, pixels_per_frame, shape.vision.temporal_patch) * shape.vision.merge**2
