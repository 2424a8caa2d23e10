"""Pipeline-stage communication for generation: activations forward, sampled tokens back to all stages.

Every rank of a pipeline runs the same generation loop on the same rows. A non-first stage receives
its input hidden states (S, B, H) from the previous stage (S and B are known to every stage from the
shared loop state, so no shape exchange is needed); the last stage samples and broadcasts the tokens
over the pipeline group. Tensor-parallel ranks of a stage all hold the gathered logits and sample the
same tokens with the same per-row generators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class StageComm:
    """This rank's place in its pipeline (single stage when PP = 1 or megatron is not initialised)."""

    is_first: bool = True
    is_last: bool = True
    group: object = None
    prev_rank: int | None = None
    next_rank: int | None = None
    last_rank: int | None = None

    @classmethod
    def from_parallel_state(cls) -> "StageComm":
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
            return cls()
        if ps.get_virtual_pipeline_model_parallel_world_size() not in (None, 1):
            raise NotImplementedError("generation does not support virtual pipeline stages")
        first = ps.is_pipeline_first_stage(ignore_virtual=True)
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        return cls(
            is_first=first,
            is_last=last,
            group=ps.get_pipeline_model_parallel_group(),
            prev_rank=None if first else ps.get_pipeline_model_parallel_prev_rank(),
            next_rank=None if last else ps.get_pipeline_model_parallel_next_rank(),
            last_rank=ps.get_pipeline_model_parallel_last_rank(),
        )

    @property
    def single_stage(self) -> bool:
        return self.group is None

    def recv_activation(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buf, src=self.prev_rank)
        return buf

    def send_activation(self, tensor: torch.Tensor) -> None:
        dist.send(tensor.contiguous(), dst=self.next_rank)

    def broadcast_from_last(self, tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                            device: torch.device) -> torch.Tensor:
        """``tensor`` of the last stage on every stage (others pass None)."""
        if self.single_stage:
            return tensor
        if not self.is_last:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        else:
            tensor = tensor.contiguous()
        dist.broadcast(tensor, src=self.last_rank, group=self.group)
        return tensor
