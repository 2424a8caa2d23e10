"""The training checkpoint: model, optimizer, LR scheduler, train state and per-rank state, written
all-or-nothing in Megatron-LM's directory layout and loadable at another TP/PP/DP layout.

    ckpt = TrainCheckpointer(save_dir, keep_last=2, hf_dir=hf_dir)
    ckpt.save(step, model, optimizer, scheduler, state={...}, rank_state=capture_rng_state())   # every rank
    path = ckpt.latest()                                                  # newest complete checkpoint or None
    got = ckpt.load(path, model, optimizer, scheduler)                    # every rank
    got.step, got.state, got.rank_state, got.layout_changed

On disk::

    save_dir/
      iter_0000020/                       one megatron-core torch_dist checkpoint:
        __<rank>_<n>.distcp, .metadata      model tensors (the keys of model_io.save_model_weights, so the
                                            converters and load_model_weights read it as a model checkpoint),
                                            optimizer.state.{param,exp_avg,exp_avg_sq}.<model key> (global
                                            shapes), and one `rank_state` object per global rank
        common.pt                           train state, step, layout, scheduler, optimizer hyper-parameters
        metadata.json                       megatron's backend names
        config.json, tokenizer*, ...        the HF side files (the directory converts to HF as it is)
        run_config.yaml                     the run's resolved configuration (when the trainer gives it)
      iter_0000030.tmp/                   a save in progress, or one that crashed: never read, removed by
                                          the next save
      latest_checkpointed_iteration.txt   "20": written last, atomically

A save writes ``iter_N.tmp``; when every rank has finished, rank 0 renames it to ``iter_N``, replaces
the pointer, then deletes the checkpoints beyond the `keep_last` newest. A crash at any point leaves the
previous complete checkpoint in place and named by the pointer.

Optimizer state. megatron-core's DistributedOptimizer is saved in its ``fully_reshardable`` format: each
data-parallel rank's slice of the flat optimizer buffers is gathered over the DP group (into host memory)
and written per parameter, in the model parameter's own global layout. A checkpoint is thus independent
of TP, PP and DP, like the non-distributed optimizers' format (which is per parameter by construction).
The price is host memory at save and load: each rank transiently holds the fp32 parameter and both Adam
moments of its whole TP/PP model shard (12 bytes per parameter of the shard). The other formats do not
fit: ``dp_reshardable`` (Megatron-LM's default, no gather) resumes only at the same TP/PP, and
``fully_sharded_model_space`` (megatron-core 0.16's nominal default, parallel and reshardable) stores
``flattened_range`` tensors that megatron-core 0.16 no longer accepts (it raises on save).

Per-rank state (`rank_state`, e.g. `rng_state.capture_rng_state()`) is one object per global rank and is
returned only when the checkpoint is loaded at the layout that saved it (same world size, TP, PP, CP, DP
and number of model chunks); otherwise it is dropped (`layout_changed`), since rank r of one layout has
nothing to do with rank r of another.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from megatron_ral.checkpoint.convert import CheckpointMismatchError
from megatron_ral.checkpoint.dist_ckpt_io import DistCheckpointReader
from megatron_ral.checkpoint.model_io import apply_model_state, model_load_request
from megatron_ral.checkpoint.output_dir import copy_hf_side_files
from megatron_ral.checkpoint.run_config import write_checkpoint_config
from megatron_ral.checkpoint.run_dir import (
    commit,
    is_complete,
    iteration_dir_name,
    latest_checkpoint,
    prune,
    remove_stale,
)
from megatron_ral.checkpoint.safetensors_io import CheckpointFileError

FORMAT_VERSION = 1
OPTIMIZER_SHARDING = "fully_reshardable"
_TRAIN_KEY = "train_checkpoint"


@dataclass
class LoadedCheckpoint:
    path: Path  # the iteration directory that was loaded
    step: int
    state: dict  # the `state` given to save (identical on every rank)
    rank_state: object | None  # this rank's `rank_state`; None when the layout changed
    layout_changed: bool
    saved_layout: dict


@dataclass
class CheckpointInfo:
    """What a training checkpoint says about itself, read without a model (`TrainCheckpointer.peek`)."""

    path: Path
    step: int
    state: dict
    layout: dict
    has_optimizer: bool
    has_scheduler: bool


def _rank() -> int:
    return torch.distributed.get_rank()


def _barrier() -> None:
    torch.distributed.barrier()


def _chunks(model) -> list:
    """Megatron's model chunks, each unwrapped from DistributedDataParallel / Float16Module."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    out = []
    for chunk in chunks:
        while isinstance(chunk, (DistributedDataParallel, Float16Module, torch.nn.parallel.DistributedDataParallel)):
            chunk = chunk.module
        out.append(chunk)
    return out


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def current_layout(num_chunks: int = 1) -> dict:
    """This run's parallel layout, as recorded in a checkpoint."""
    from megatron.core import parallel_state as ps

    return {
        "world_size": torch.distributed.get_world_size(),
        "tensor_parallel": ps.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
        "context_parallel": ps.get_context_parallel_world_size(),
        "data_parallel": ps.get_data_parallel_world_size(),
        "model_chunks": num_chunks,
    }


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(isinstance(o, DistributedOptimizer) for o in parts)


def _materialize_optimizer_state(optimizer) -> None:
    """A DistributedOptimizer over torch's own Adam (no Apex / Transformer Engine, e.g. on CPU) has no state
    before its first step, and megatron-core 0.16's ``state_dict()``, which save and load requests call,
    then fails on the missing step count. Give it the zero state Adam starts from (what its first step
    would create); a load overwrites it."""
    from megatron.core.optimizer import distrib_optimizer

    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return
    for part in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if isinstance(part, distrib_optimizer.DistributedOptimizer) and len(part.optimizer.state) == 0 \
                and part.init_state_fn is not None:
            part.init_state_fn(part.optimizer, part.config)
            for st in part.optimizer.state.values():
                st.setdefault("step", torch.tensor(0.0))


def _load_optimizer(optimizer, loaded) -> None:
    """``optimizer.load_state_dict(loaded)``, working around two faults of megatron-core 0.16's load of a
    DistributedOptimizer over torch's own Adam (fully_reshardable): the parameter-state copy also copies
    the per-parameter step count, from a source that has none (KeyError), and all parameters are given
    one shared step tensor, which torch's Adam then increments once per parameter on the next step
    (wrong bias correction). The step count comes with the hyper-parameters: set aside while the
    parameter state is copied, then given back to each parameter as its own tensor."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    if len(parts) > 1 or not isinstance(parts[0], DistributedOptimizer) or \
            not any("step" in st for st in parts[0].optimizer.state.values()):
        optimizer.load_state_dict(loaded)
        return
    part = parts[0]
    if loaded.get("param_state_sharding_type") != OPTIMIZER_SHARDING:
        raise CheckpointMismatchError(f"optimizer state sharded as {loaded.get('param_state_sharding_type')!r}, "
                                      f"expected {OPTIMIZER_SHARDING!r}")
    param_state = loaded.pop("param_state")
    del loaded["param_state_sharding_type"]
    part.load_state_dict(loaded)  # hyper-parameters, step count, grad scaler
    steps = {p: st.pop("step") for p, st in part.optimizer.state.items() if "step" in st}
    try:
        part.load_parameter_state_from_fully_reshardable(param_state)
    finally:
        for p, step in steps.items():
            part.optimizer.state[p]["step"] = step.detach().clone()


def _optimizer_metadata(distributed: bool) -> dict:
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if distributed:
        metadata["distrib_optim_sharding_type"] = OPTIMIZER_SHARDING
    return metadata


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


def _save_strategy():
    """torch_dist, with the writes of data-parallel replicas spread over the DP ranks."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), _dp_group())


def _load_strategy(directory: Path):
    """torch_dist, each replicated tensor read once per DP group and exchanged."""
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(directory)), _dp_group())


def _rank_state_object(value):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world = torch.distributed.get_world_size()
    return ShardedObject("rank_state", value, (world,), (_rank(),), replica_id=0)


def _check_request(request: dict, reader: DistCheckpointReader) -> None:
    """Every tensor the load asks for is stored with the global shape asked for (a checkpoint of another
    model is one clear error, before megatron-core's load)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def tensors():
        for sh in nested_values(request):
            if isinstance(sh, ShardedTensorFactory):  # e.g. SwiGLU's fc1: stored under its own key
                built = sh.build()
                yield from (x for x in ([built] if isinstance(built, ShardedTensor) else nested_values(built))
                            if isinstance(x, ShardedTensor))
            elif isinstance(sh, ShardedTensor):
                yield sh

    missing, wrong = set(), {}
    for sh in tensors():
        if sh.key not in reader:
            missing.add(sh.key)
        elif reader.shape(sh.key) != tuple(sh.global_shape):
            wrong[sh.key] = (reader.shape(sh.key), tuple(sh.global_shape))
    if missing or wrong:
        details = [f"missing {sorted(missing)[:4]}"] if missing else []
        details += [f"{k}: stored {a}, model {b}" for k, (a, b) in sorted(wrong.items())[:4]]
        raise CheckpointMismatchError(f"{reader.directory}: does not match this model ({len(missing)} tensors "
                                      f"missing, {len(wrong)} of another shape): {'; '.join(details)}")


def _read_meta(directory: Path) -> dict:
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(str(directory))
    except Exception as e:  # truncated or foreign common.pt
        raise CheckpointFileError(f"{directory / 'common.pt'}: cannot read ({e})") from None
    meta = common.get(_TRAIN_KEY) if isinstance(common, dict) else None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointFileError(f"{directory}: not a training checkpoint (no train state in common.pt); "
                                  f"a model-only checkpoint loads with model_io.load_model_weights")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointFileError(f"{directory}: training checkpoint format {meta.get('format')!r}, "
                                  f"this version reads format {FORMAT_VERSION}")
    return meta


class TrainCheckpointer:
    """Saves and loads training checkpoints under one directory (see the module docstring).

    save_dir: the run's checkpoint directory (``iter_*`` directories and the pointer file).
    keep_last: complete checkpoints kept (>= 1); older ones are deleted once a newer one is complete.
    hf_dir: an HF directory whose config/tokenizer/processor files are copied into every checkpoint, so
        that it converts to HF (tools/convert_megatron_to_hf.py) without further arguments.
    run_config: the run's resolved configuration (``to_dict(cfg)``), written into every checkpoint as
        ``run_config.yaml`` (see `run_config`).
    """

    def __init__(self, save_dir: str | os.PathLike, keep_last: int = 2, hf_dir: str | os.PathLike | None = None,
                 run_config: Mapping[str, Any] | None = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (got {keep_last})")
        self.save_dir = Path(save_dir)
        self.keep_last = keep_last
        self.hf_dir = Path(hf_dir) if hf_dir is not None else None
        self.run_config = run_config

    # -- directory queries (any process, no collectives) --------------------------------------------------

    def latest(self) -> Path | None:
        """The newest complete checkpoint (the one the pointer names, see `latest_checkpoint`), or None."""
        return latest_checkpoint(self.save_dir)

    def resolve(self, path: str | os.PathLike | None = None) -> Path:
        """The iteration directory to load: `path` itself when it is one, the latest complete checkpoint of
        `path` (or of save_dir when None) when it is a run directory."""
        base = Path(path) if path is not None else self.save_dir
        if is_complete(base):
            return base
        found = latest_checkpoint(base)
        if found is None:
            raise CheckpointFileError(f"{base}: no complete checkpoint (neither a torch_dist checkpoint nor a "
                                      f"directory of complete iter_* checkpoints)")
        return found

    def peek(self, path: str | os.PathLike | None = None) -> CheckpointInfo:
        """Step, train state and layout of a checkpoint, without a model or collectives."""
        directory = self.resolve(path)
        meta = _read_meta(directory)
        return CheckpointInfo(directory, meta["step"], meta["state"], meta["layout"], meta["has_optimizer"],
                              meta["has_scheduler"])

    # -- save / load (collective: every rank calls them) ---------------------------------------------------

    def save(self, step: int, model, optimizer=None, scheduler=None, state: dict | None = None,
             rank_state=None) -> Path:
        """Write checkpoint `step` (collective). `state` must be identical on every rank (rank 0's copy is
        stored); `rank_state` is this rank's own picklable object. Returns the iteration directory.

        Call it between optimizer steps, when the parameters are those the optimizer last produced (with
        megatron's overlapped parameter all-gather, force the gather first)."""
        from megatron.core import dist_checkpointing

        if int(step) < 0:
            raise ValueError(f"step must be >= 0 (got {step})")
        step = int(step)
        chunks = _chunks(model)
        final = self.save_dir / iteration_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            remove_stale(self.save_dir)
            tmp.mkdir()
        _barrier()

        distributed = optimizer is not None and _is_distributed_optimizer(optimizer)
        sharded = {_model_key(i, len(chunks)): c.sharded_state_dict() for i, c in enumerate(chunks)}
        if optimizer is not None:
            _materialize_optimizer_state(optimizer)
            sharded["optimizer"] = optimizer.sharded_state_dict(sharded, metadata=_optimizer_metadata(distributed))
        if scheduler is not None:
            sharded["scheduler"] = scheduler.state_dict()
        sharded["rank_state"] = _rank_state_object(rank_state)
        sharded[_TRAIN_KEY] = {
            "format": FORMAT_VERSION,
            "step": step,
            "state": state if state is not None else {},
            "layout": current_layout(len(chunks)),
            "has_optimizer": optimizer is not None,
            "distributed_optimizer": distributed,
            "optimizer_sharding": OPTIMIZER_SHARDING if distributed else None,
            "has_scheduler": scheduler is not None,
        }
        dist_checkpointing.save(sharded, str(tmp), sharded_strategy=_save_strategy())
        if _rank() == 0 and self.hf_dir is not None:
            copy_hf_side_files(self.hf_dir, tmp)
        if _rank() == 0 and self.run_config is not None:  # after the side files: replaces a copied older one
            write_checkpoint_config(tmp, self.run_config)
        _barrier()  # every rank has written its part
        if _rank() == 0:
            commit(tmp, final, step)
            prune(self.save_dir, step, self.keep_last)
        _barrier()
        return final

    def load(self, path: str | os.PathLike | None, model, optimizer=None, scheduler=None) -> LoadedCheckpoint:
        """Load a checkpoint into `model` (and `optimizer`, `scheduler` when given) at this run's layout
        (collective). `path`: an iteration directory, or a run directory (its latest checkpoint; None:
        save_dir's)."""
        from megatron.core import dist_checkpointing

        directory = self.resolve(path)
        meta = _read_meta(directory)
        chunks = _chunks(model)
        layout = current_layout(len(chunks))
        changed = layout != meta["layout"]
        if optimizer is not None:
            if not meta["has_optimizer"]:
                raise CheckpointMismatchError(f"{directory}: saved without optimizer state")
            distributed = _is_distributed_optimizer(optimizer)
            if distributed != meta["distributed_optimizer"]:
                raise CheckpointMismatchError(
                    f"{directory}: saved with use_distributed_optimizer={meta['distributed_optimizer']}; "
                    f"resume with the same setting")
        if scheduler is not None and not meta["has_scheduler"]:
            raise CheckpointMismatchError(f"{directory}: saved without LR scheduler state")

        reader = DistCheckpointReader(directory)
        request = {_model_key(i, len(chunks)): model_load_request(c, reader.object_keys())
                   for i, c in enumerate(chunks)}
        if optimizer is not None:
            _materialize_optimizer_state(optimizer)
            request["optimizer"] = optimizer.sharded_state_dict(
                request, is_loading=True, metadata=_optimizer_metadata(meta["distributed_optimizer"]))
        if not changed:
            request["rank_state"] = _rank_state_object(None)
        _check_request(request, reader)
        loaded = dist_checkpointing.load(request, str(directory), sharded_strategy=_load_strategy(directory))

        for i, chunk in enumerate(chunks):
            apply_model_state(chunk, loaded[_model_key(i, len(chunks))], directory)
        if optimizer is not None:
            _load_optimizer(optimizer, loaded["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(loaded["scheduler"])
        return LoadedCheckpoint(
            path=directory,
            step=meta["step"],
            state=meta["state"],
            rank_state=None if changed else loaded["rank_state"],
            layout_changed=changed,
            saved_layout=meta["layout"],
        )
