"""One process's random-number-generator state, captured and restored (the per-rank part of a resume).

    s = capture_rng_state()      # python random, numpy, torch CPU, CUDA (when present), megatron's tracker
    ...
    restore_rng_state(s)         # the same draws follow as after the capture

Megatron's CUDA RNG tracker holds the named streams that tensor-parallel code forks into (e.g. the
model-parallel stream that differs per TP rank); on a machine without CUDA the platform's compatibility
layer backs them with the CPU generator, and they are captured the same way. Graph-safe tracker states
(torch.Generator objects, CUDA graphs) are stored as plain state tensors and converted back on restore.
The state is a plain dict of picklable values, meant for one rank: restoring it on another rank of
another layout is legal but reproduces nothing in particular.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def _tracker():
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker()


def _as_tensor(state):
    if isinstance(state, torch.Tensor):
        return state.clone()
    from megatron.core.tensor_parallel.random import convert_cuda_rng_state

    return convert_cuda_rng_state(state, to_graphable=False).clone()


def capture_rng_state() -> dict:
    """This process's generator states: python ``random``, numpy, torch CPU, the current CUDA device (when
    CUDA is available) and megatron's CUDA RNG tracker streams."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {name: _as_tensor(s) for name, s in _tracker().get_states().items()},
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Set every generator captured by :func:`capture_rng_state` back to its captured state."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = _tracker()
    current = tracker.get_states()
    graph_safe = any(isinstance(s, torch.Generator) for s in current.values())
    restored = {}
    for name, s in state["tracker"].items():
        if graph_safe:
            from megatron.core.tensor_parallel.random import convert_cuda_rng_state

            restored[name] = convert_cuda_rng_state(s, to_graphable=True)
        else:
            restored[name] = s.clone()
    tracker.set_states(restored)
