"""HF Qwen2.5-VL <-> Megatron-Core distributed checkpoint conversion, streaming tensor by tensor.

    hf_to_megatron(hf_dir, ckpt_dir)   # released HF checkpoint -> torch_dist checkpoint (+ HF side files)
    megatron_to_hf(ckpt_dir, hf_dir)   # torch_dist checkpoint saved at any TP/PP -> HF checkpoint

The Megatron checkpoint has the keys, global shapes and chunk layout of the model's own
``sharded_state_dict()`` (see `mapping` for names and layouts), so megatron-core loads it at any
TP/PP. Memory stays at about one layer's tensors plus a constant: tensors are read with plain file reads
(no memory maps) and written while they are produced; tensors above `max_chunk_bytes` (the embedding
and output layer) are split into row blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from megatron_ral.models.qwen25vl import mapping as M
from megatron_ral.checkpoint.dist_ckpt_io import (
    BytesSpec,
    ChunkSpec,
    DistCheckpointReader,
    TensorSpec,
    none_object_bytes,
    write_dist_checkpoint,
)
# The error types and resolve_dist_dir are re-exported here for existing imports.
from megatron_ral.checkpoint.errors import CheckpointFileError, CheckpointMismatchError, UnsupportedCheckpointError  # noqa: F401
from megatron_ral.checkpoint.locate import find_hf_config_dir, resolve_dist_dir
from megatron_ral.checkpoint.output_dir import Progress, atomic_output_dir, copy_hf_side_files
from megatron_ral.models.qwen25vl.arch import (
    Qwen25VLArch,
    arch_from_config,
    load_hf_config,
)
from megatron_ral.checkpoint.safetensors_io import (
    HFCheckpointReader,
    ShardedSafetensorsWriter,
    TensorPlan,
    element_size,
)

DEFAULT_MAX_CHUNK_BYTES = 256 * 1024**2
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclass
class ConversionResult:
    out_dir: Path
    num_tensors: int
    total_bytes: int
    seconds: float


# --- HF -> Megatron ---------------------------------------------------------------------------------

class _HFSource:
    """An HF checkpoint addressed by released names, whatever naming the files use."""

    def __init__(self, reader: HFCheckpointReader, arch: Qwen25VLArch):
        self.reader = reader
        self.actual: dict[str, str] = {}
        for name in reader.names():
            canon = M.canonical_hf_name(name)
            if canon in self.actual:
                raise CheckpointMismatchError(f"{reader.directory}: {name!r} and {self.actual[canon]!r} are the same tensor")
            self.actual[canon] = name
        expected = M.hf_names(arch)
        have = set(self.actual)
        if arch.tie_word_embeddings:
            have.discard("lm_head.weight")  # some tied checkpoints store a copy; the embedding is the source
        missing = [n for n in expected if n not in have]
        unexpected = sorted(have - set(expected))
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"{reader.directory}: tensors do not match a Qwen2.5-VL model with {arch.num_layers} layers and "
                f"{arch.vision_depth} vision blocks; missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        for name, shape in M.hf_lm_shapes(arch).items():
            got = self.shape(name)
            if got != shape:
                raise CheckpointMismatchError(f"{reader.directory}: {name} has shape {got}, config implies {shape}")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.info(self.actual[name]).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.info(self.actual[name]).dtype

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.reader.get(self.actual[name], rows)


def _row_blocks(shape: tuple[int, ...], dtype: torch.dtype, max_bytes: int) -> list[tuple[int, int]]:
    rows = shape[0]
    row_bytes = max(1, (element_size(dtype) * int(torch.Size(shape[1:]).numel())))
    step = max(1, max_bytes // row_bytes)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)] or [(0, 0)]


def _whole_tensor_spec(key: str, src: _HFSource, name: str, max_chunk_bytes: int, order: tuple, label: str
                       ) -> TensorSpec:
    """A non-stacked tensor copied as is, in row blocks when it is large."""
    shape, dtype = src.shape(name), src.dtype(name)
    spec = TensorSpec(key, shape, dtype)
    blocks = _row_blocks(shape, dtype, max_chunk_bytes) if shape else [None]
    for i, rows in enumerate(blocks):
        if rows is None:
            spec.chunks.append(ChunkSpec((), (), lambda n=name: src.get(n), label, order + (i,)))
        else:
            a, b = rows
            spec.chunks.append(ChunkSpec((a,) + (0,) * (len(shape) - 1), (b - a,) + shape[1:],
                                         lambda n=name, r=rows: src.get(n, r), label, order + (i,)))
    return spec


def _vocab_spec(key: str, src: _HFSource, name: str, padded_rows: int, max_chunk_bytes: int, order: tuple,
                label: str) -> TensorSpec:
    """Embedding / output layer: the HF rows, then zero rows up to the model's padded vocabulary size."""
    spec = _whole_tensor_spec(key, src, name, max_chunk_bytes, order, label)
    rows, cols = spec.global_shape
    if padded_rows > rows:
        dtype = spec.dtype
        spec.global_shape = (padded_rows, cols)
        spec.chunks.append(ChunkSpec((rows, 0), (padded_rows - rows, cols),
                                     lambda n=padded_rows - rows: torch.zeros(n, cols, dtype=dtype),
                                     label, order + (len(spec.chunks),)))
    return spec


def _layer_dtype(src: _HFSource, arch: Qwen25VLArch, hf_suffixes: tuple[str, ...]) -> torch.dtype:
    dtypes = {src.dtype(M.hf_layer(layer, s)) for layer in range(arch.num_layers) for s in hf_suffixes}
    if len(dtypes) != 1:
        raise CheckpointMismatchError(f"mixed dtypes {sorted(map(str, dtypes))} across layers for {hf_suffixes}")
    return dtypes.pop()


def megatron_specs(src: _HFSource, arch: Qwen25VLArch, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
                   ) -> tuple[list[TensorSpec], list[BytesSpec]]:
    """The tensors and objects of the Megatron checkpoint, each chunk produced lazily from the HF source."""
    P, L = M.LM_PREFIX, arch.num_layers
    tensors: list[TensorSpec] = []
    shapes = M.megatron_layer_shapes(arch)
    F, G = arch.ffn_hidden_size, arch.num_query_groups

    def one(ts: list[torch.Tensor]) -> torch.Tensor:
        return ts[0]

    def qkv(ts: list[torch.Tensor]) -> torch.Tensor:
        return M.qkv_to_megatron(*ts, G)

    # Per layer kind: its chunks as (row offset inside the layer, HF sources, combine). fc1 is stored as two
    # chunks (gate rows, then up rows), the way megatron's SwiGLU sharded factory stores it.
    layer_chunks = {
        M.QKV_NORM: [(0, ("input_layernorm.weight",), one)],
        M.QKV_W: [(0, tuple(f"self_attn.{x}_proj.weight" for x in "qkv"), qkv)],
        M.QKV_B: [(0, tuple(f"self_attn.{x}_proj.bias" for x in "qkv"), qkv)],
        M.PROJ_W: [(0, ("self_attn.o_proj.weight",), one)],
        M.FC1_NORM: [(0, ("post_attention_layernorm.weight",), one)],
        M.FC1_W: [(0, ("mlp.gate_proj.weight",), one), (F, ("mlp.up_proj.weight",), one)],
        M.FC2_W: [(0, ("mlp.down_proj.weight",), one)],
    }

    def produce(layer: int, sources: tuple[str, ...], combine) -> torch.Tensor:
        return combine([src.get(M.hf_layer(layer, s)) for s in sources]).unsqueeze(0)

    from megatron_ral.models.qwen25vl.provider import padded_vocab_size  # the model's rule (imports megatron)

    vocab_rows = padded_vocab_size(arch.vocab_size)
    tensors.append(_vocab_spec(P + M.EMBEDDING, src, "model.embed_tokens.weight", vocab_rows, max_chunk_bytes,
                               (0,), "embedding"))
    for k_i, kind in enumerate(M.LAYER_KINDS):
        per_layer = shapes[kind]
        chunks = layer_chunks[kind]
        dtype = _layer_dtype(src, arch, tuple(s for _, sources, _ in chunks for s in sources))
        spec = TensorSpec(P + M.LAYERS + kind, (L, *per_layer), dtype)
        for layer in range(L):
            for c_i, (row0, sources, combine) in enumerate(chunks):
                rows = (chunks[c_i + 1][0] if c_i + 1 < len(chunks) else per_layer[0]) - row0 if per_layer else None
                offsets = (layer, row0, *(0,) * (len(per_layer) - 1)) if per_layer else (layer,)
                sizes = (1, rows, *per_layer[1:]) if per_layer else (1,)
                spec.chunks.append(ChunkSpec(offsets, sizes,
                                             lambda l=layer, s=sources, c=combine: produce(l, s, c),
                                             f"layer {layer + 1}/{L}", (1, layer, k_i, c_i)))
        tensors.append(spec)
    tensors.append(_whole_tensor_spec(P + M.FINAL_NORM, src, "model.norm.weight", max_chunk_bytes, (2,), "final norm"))
    if not arch.tie_word_embeddings:
        tensors.append(_vocab_spec(P + M.OUTPUT_LAYER, src, "lm_head.weight", vocab_rows, max_chunk_bytes, (3,),
                                   "output layer"))
    for i, name in enumerate(M.hf_vision_names(arch)):
        label = "vision " + (f"block {name.split('.')[2]}" if ".blocks." in name else name.split(".")[1])
        tensors.append(_whole_tensor_spec(M.vision_megatron_key(name), src, name, max_chunk_bytes, (4, i), label))

    objects = [BytesSpec(f"{P}{M.LAYERS}{module}._extra_state/shard_{layer}_{L}", none_object_bytes)
               for layer in range(L) for module in M.EXTRA_STATE_MODULES]
    return tensors, objects


def hf_to_megatron(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
                   max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, progress: bool = True) -> ConversionResult:
    """Convert an HF Qwen2.5-VL checkpoint directory into a megatron-core torch_dist checkpoint at out_dir.

    The HF config/tokenizer/processor files are copied next to the checkpoint files. Output is written to a
    temporary sibling directory and renamed at the end; nothing is left behind on failure.
    """
    hf_dir = Path(hf_dir)
    arch = arch_from_config(load_hf_config(hf_dir), str(hf_dir / "config.json"))
    src = _HFSource(HFCheckpointReader(hf_dir), arch)
    tensors, objects = megatron_specs(src, arch, max_chunk_bytes)
    total = sum(int(torch.Size(c.sizes).numel()) * element_size(t.dtype) for t in tensors for c in t.chunks)
    bar = Progress("hf->megatron", total, enabled=progress)

    def on_chunk(spec: TensorSpec, chunk: ChunkSpec) -> None:
        bar.update(int(torch.Size(chunk.sizes).numel()) * element_size(spec.dtype), chunk.label)

    with atomic_output_dir(out_dir, overwrite) as tmp:
        write_dist_checkpoint(tmp, tensors, objects, on_chunk=on_chunk)
        copy_hf_side_files(hf_dir, tmp)
    seconds = bar.finish()
    return ConversionResult(Path(out_dir), len(tensors), total, seconds)


# --- Megatron -> HF ---------------------------------------------------------------------------------

class _MegatronSource:
    """Locates the layer tensors of a Megatron checkpoint: stacked (default) or per-layer keys, TE or local names."""

    def __init__(self, reader: DistCheckpointReader, arch: Qwen25VLArch):
        self.reader, self.arch = reader, arch
        self.layer_shapes = M.megatron_layer_shapes(arch)
        self._where: dict[str, tuple[str, bool]] = {}  # kind -> (key or key template, stacked)
        for kind in M.LAYER_KINDS:
            self._where[kind] = self._locate(kind)
        self._check(M.LM_PREFIX + M.EMBEDDING, (arch.vocab_size, arch.hidden_size), padded_rows=True)
        self._check(M.LM_PREFIX + M.FINAL_NORM, (arch.hidden_size,))
        if not arch.tie_word_embeddings:
            self._check(M.LM_PREFIX + M.OUTPUT_LAYER, (arch.vocab_size, arch.hidden_size), padded_rows=True)

    def _check(self, key: str, shape: tuple[int, ...], padded_rows: bool = False) -> None:
        if key not in self.reader:
            raise CheckpointMismatchError(f"{self.reader.directory}: tensor {key!r} missing from the checkpoint")
        got = self.reader.shape(key)
        if padded_rows and len(got) == len(shape) and got[1:] == shape[1:] and got[0] >= shape[0]:
            return  # vocabulary rows padded by the model; only the first vocab_size rows are exported
        if got != shape:
            raise CheckpointMismatchError(
                f"{self.reader.directory}: {key} has global shape {self.reader.shape(key)}, config implies {shape}")

    def _locate(self, kind: str) -> tuple[str, bool]:
        names = [kind] + ([M.LOCAL_NORM_NAMES[kind]] if kind in M.LOCAL_NORM_NAMES else [])
        shape = self.layer_shapes[kind]
        for name in names:
            key = M.LM_PREFIX + M.LAYERS + name
            if key in self.reader:
                self._check(key, (self.arch.num_layers, *shape))
                return key, True
            per_layer = M.LM_PREFIX + M.LAYERS + "{layer}." + name
            if per_layer.format(layer=0) in self.reader:
                for layer in range(self.arch.num_layers):
                    self._check(per_layer.format(layer=layer), shape)
                return per_layer, False
        raise CheckpointMismatchError(
            f"{self.reader.directory}: no tensor for {kind!r} (looked for "
            f"{[M.LM_PREFIX + M.LAYERS + n for n in names]} and per-layer keys)")

    def layer_dtype(self, kind: str) -> torch.dtype:
        key, stacked = self._where[kind]
        return self.reader.dtype(key if stacked else key.format(layer=0))

    def layer(self, kinds: tuple[str, ...], layer: int) -> dict[str, torch.Tensor]:
        """The per-layer tensors of several kinds, read in one pass."""
        regions = {}
        for kind in kinds:
            key, stacked = self._where[kind]
            shape = self.layer_shapes[kind]
            if stacked:
                regions[key] = ((layer, *(0,) * len(shape)), (1, *shape))
            else:
                regions[key.format(layer=layer)] = ((0,) * len(shape), shape)
        got = self.reader.read_many(regions)
        out = {}
        for kind, key in zip(kinds, regions):
            t = got[key]
            out[kind] = t[0] if self._where[kind][1] else t
        return out

    def row_blocks(self, key: str, rows: int) -> list[tuple[int, int]]:
        """Row ranges covering [0, rows) of a 2-D tensor, cut at the stored chunks' row boundaries when every
        chunk spans all columns (so each stored chunk is read once)."""
        shape = self.reader.shape(key)
        chunks = self.reader.chunks(key)
        if len(shape) != 2 or any(c.offsets[1] != 0 or c.sizes[1] != shape[1] for c in chunks):
            return [(0, rows)]
        cuts = {c.offsets[0] for c in chunks} | {c.offsets[0] + c.sizes[0] for c in chunks}
        bounds = sorted({0, rows} | {b for b in cuts if b < rows})
        return list(zip(bounds[:-1], bounds[1:]))


def _hf_plans(src: _MegatronSource, reader: DistCheckpointReader, arch: Qwen25VLArch
              ) -> list[TensorPlan]:
    P = M.LM_PREFIX
    shapes = M.hf_lm_shapes(arch)
    layer_kind_of = {
        "input_layernorm.weight": M.QKV_NORM,
        "self_attn.q_proj.weight": M.QKV_W, "self_attn.k_proj.weight": M.QKV_W, "self_attn.v_proj.weight": M.QKV_W,
        "self_attn.q_proj.bias": M.QKV_B, "self_attn.k_proj.bias": M.QKV_B, "self_attn.v_proj.bias": M.QKV_B,
        "self_attn.o_proj.weight": M.PROJ_W,
        "post_attention_layernorm.weight": M.FC1_NORM,
        "mlp.gate_proj.weight": M.FC1_W, "mlp.up_proj.weight": M.FC1_W,
        "mlp.down_proj.weight": M.FC2_W,
    }
    plans = [TensorPlan("model.embed_tokens.weight", reader.dtype(P + M.EMBEDDING), shapes["model.embed_tokens.weight"])]
    for layer in range(arch.num_layers):
        for n in M.HF_LAYER_NAMES:
            name = M.hf_layer(layer, n)
            plans.append(TensorPlan(name, src.layer_dtype(layer_kind_of[n]), shapes[name]))
    plans.append(TensorPlan("model.norm.weight", reader.dtype(P + M.FINAL_NORM), shapes["model.norm.weight"]))
    if not arch.tie_word_embeddings:
        plans.append(TensorPlan("lm_head.weight", reader.dtype(P + M.OUTPUT_LAYER), shapes["lm_head.weight"]))
    for name in M.hf_vision_names(arch):
        key = M.vision_megatron_key(name)
        if key not in reader:
            raise CheckpointMismatchError(f"{reader.directory}: vision tensor {key!r} missing from the checkpoint")
        plans.append(TensorPlan(name, reader.dtype(key), reader.shape(key)))
    return plans


def _hf_tensors(src: _MegatronSource, reader: DistCheckpointReader, arch: Qwen25VLArch
                ) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(HF name, tensor or row block, progress group) in plan order."""
    P = M.LM_PREFIX

    def blocks(key: str, name: str, label: str):
        shape = reader.shape(key)
        for a, b in src.row_blocks(key, arch.vocab_size):
            yield name, reader.read(key, (a, 0), (b - a, shape[1])), label

    yield from blocks(P + M.EMBEDDING, "model.embed_tokens.weight", "embedding")
    for layer in range(arch.num_layers):
        label = f"layer {layer + 1}/{arch.num_layers}"
        t = src.layer((M.QKV_NORM, M.QKV_W, M.QKV_B), layer)
        q_w, k_w, v_w = M.qkv_from_megatron(t[M.QKV_W], arch.num_attention_heads, arch.num_query_groups, arch.head_dim)
        q_b, k_b, v_b = M.qkv_from_megatron(t[M.QKV_B], arch.num_attention_heads, arch.num_query_groups, arch.head_dim)
        yield M.hf_layer(layer, "input_layernorm.weight"), t[M.QKV_NORM], label
        for x, w, b in (("q", q_w, q_b), ("k", k_w, k_b), ("v", v_w, v_b)):
            yield M.hf_layer(layer, f"self_attn.{x}_proj.weight"), w, label
            yield M.hf_layer(layer, f"self_attn.{x}_proj.bias"), b, label
        del t, q_w, k_w, v_w
        t = src.layer((M.PROJ_W, M.FC1_NORM), layer)
        yield M.hf_layer(layer, "self_attn.o_proj.weight"), t[M.PROJ_W], label
        yield M.hf_layer(layer, "post_attention_layernorm.weight"), t[M.FC1_NORM], label
        del t
        gate, up = M.fc1_from_megatron(src.layer((M.FC1_W,), layer)[M.FC1_W])
        yield M.hf_layer(layer, "mlp.gate_proj.weight"), gate, label
        yield M.hf_layer(layer, "mlp.up_proj.weight"), up, label
        del gate, up
        yield M.hf_layer(layer, "mlp.down_proj.weight"), src.layer((M.FC2_W,), layer)[M.FC2_W], label
    yield "model.norm.weight", reader.read(P + M.FINAL_NORM), "final norm"
    if not arch.tie_word_embeddings:
        yield from blocks(P + M.OUTPUT_LAYER, "lm_head.weight", "output layer")
    for name in M.hf_vision_names(arch):
        label = "vision " + (f"block {name.split('.')[2]}" if ".blocks." in name else name.split(".")[1])
        yield name, reader.read(M.vision_megatron_key(name)), label


def megatron_to_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, hf_config: str | os.PathLike | None = None,
                   overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   progress: bool = True) -> ConversionResult:
    """Convert a megatron-core torch_dist checkpoint (saved at any TP/PP) into an HF Qwen2.5-VL directory.

    The architecture comes from the HF config.json stored next to the checkpoint (or `hf_config`); its
    tokenizer/processor files are copied too. Output is released-naming sharded safetensors + index. When the
    checkpoint keeps its run's configuration (``run_config.yaml``), the processor configs carry the run's
    vision budgets (``checkpoint.vision_budgets``).
    """
    ckpt_dir = Path(ckpt_dir)
    dist_dir = resolve_dist_dir(ckpt_dir)
    cfg_dir = Path(hf_config) if hf_config is not None else find_hf_config_dir(dist_dir, ckpt_dir)
    arch = arch_from_config(load_hf_config(cfg_dir), str(cfg_dir / "config.json"))
    reader = DistCheckpointReader(dist_dir)
    src = _MegatronSource(reader, arch)
    plans = _hf_plans(src, reader, arch)
    total = sum(p.nbytes for p in plans)
    bar = Progress("megatron->hf", total, enabled=progress)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, plans, max_shard_bytes)
        try:
            for name, tensor, label in _hf_tensors(src, reader, arch):
                writer.write(name, tensor)
                bar.update(tensor.numel() * tensor.element_size(), label)
                del tensor
            writer.close()
        except BaseException:
            writer.abort()
            raise
        copy_hf_side_files(cfg_dir, tmp)
        _write_run_budgets(dist_dir, ckpt_dir, tmp)
    seconds = bar.finish()
    return ConversionResult(Path(out_dir), len(plans), total, seconds)


def _write_run_budgets(dist_dir: Path, ckpt_dir: Path, out_dir: Path) -> None:
    """The kept run configuration's vision budgets into the exported processor configs (when there is one)."""
    import yaml

    from megatron_ral.checkpoint.run_config import find_run_config
    from megatron_ral.checkpoint.vision_budgets import write_vision_budgets

    kept = find_run_config(dist_dir) or find_run_config(ckpt_dir)
    if kept is None:
        return
    data = (yaml.safe_load(kept.read_text()) or {}).get("data")
    if isinstance(data, dict):
        write_vision_budgets(out_dir, data)
