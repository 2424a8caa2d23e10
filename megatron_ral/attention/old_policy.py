"""Storage of the old attention policy p_old (rollout-time weights) for the RAL loss.

RAL needs p_old for every mini-batch update after the weights have moved (paper Eq. 3), so it is
captured once, in the no-grad "old" pass over the rollouts, and kept until the rollout batch is
consumed. Two interchangeable stores behind one interface (``put`` a capture, ``get`` the rows):

``"rows"``  keeps the rows p_old [B, R, T] themselves, in bf16/fp16/fp32: R x T values per sample,
            replicated on every TP rank.
``"qk"``    keeps the last layer's post-RoPE Q of the captured rows and K of the whole sequence, in
            their own dtype, and recomputes p_old (no grad) when asked: R x H_local x d + T x H_kv_local x d
            values per sample, i.e. divided by the TP size.

Default: ``"qk"``. Measured with ``tools/bench/attention_capture.py`` (7B layout: H=28, H_kv=4, d=128,
bf16 storage), bytes of rows-bf16 over bytes of qk per sample and rank:
  * memory: R=256: 0.27-0.47x at TP=1 but 1.1-1.9x at TP=4; R=1024: 0.44x (T=2k), 1.07x (8k),
    1.39x (16k), 1.64x (32k) at TP=1 and 1.8-6.6x at TP=4; R=4096: 1.8-4.3x at TP=1, 7-17x at TP=4.
    Q/K shrink with the TP size, rows do not (they are replicated), and packed streams make rows
    R x T_packed. Rows are smaller only for short responses at TP=1.
  * exactness: recomputing from Q/K reproduces p_theta bit for bit at theta = theta_old (same code,
    chunking and device; the model forward giving the same Q/K), so the first update's attention
    gradient is exactly 0, as the method intends. Rows stored in bf16 give a
    spurious gradient at theta = theta_old whose norm was 23% of the gradient after a 1% change of the
    queries (fp16 rows: 3%; T=2k, R=256): noise of the same order as the signal RAL acts on.
  * cost: one no-grad capture forward per mini-batch, about a third of the capture's forward+backward
    and small against the model forward.
Use ``mode="rows"`` (``dtype="auto"`` or ``"fp32"`` for exact rows) when responses are short and TP=1.
Either store can live in host memory (``offload=True``; pinned when CUDA is present) between phases.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Hashable

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ral.attention.layout import RowLayout
from megatron_ral.attention.policy import ChunkConfig, attention_policy

STORE_MODES = ("qk", "rows")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class OldPolicyConfig:
    """How p_old is kept between the old pass and the updates.

    Attributes:
        mode: "qk" (store Q rows + K, recompute) or "rows" (store p_old).
        dtype: storage dtype name ("bf16", "fp16", "fp32", "fp64"); "auto" keeps what the old pass gives:
            Q/K in their own dtype, rows in the dtype they are computed in (fp32, or fp64 from fp64 Q/K),
            so p_old is exact; None keeps Q/K in their own dtype ("qk") or uses bf16 ("rows"; bf16 keeps
            fp32's range, fp16 underflows below 6e-8).
        offload: keep the stored tensors in host memory.
        pin_memory: pin the host copies (only when CUDA is available).
    """

    mode: str = "qk"
    dtype: str | None = None
    offload: bool = False
    pin_memory: bool = True

    def __post_init__(self) -> None:
        if self.mode not in STORE_MODES:
            raise ValueError(f"old_policy.mode must be one of {STORE_MODES}, got {self.mode!r}")
        if self.dtype is not None and self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"old_policy.dtype must be one of {tuple(_DTYPES)}, 'auto' or None, got {self.dtype!r}")


@dataclass
class CapturedQK:
    """What the capture hook sees: post-RoPE q rows [R, B, H_local, d], k [T, B, H_kv_local, d], layout."""

    q: Tensor
    k: Tensor
    layout: RowLayout
    softmax_scale: float | None = None


@dataclass
class _Entry:
    tensors: dict[str, Tensor]
    layout: RowLayout | None = None
    softmax_scale: float | None = None
    extra: dict = field(default_factory=dict)


def _pinned_ok() -> bool:
    return torch.cuda.is_available()


def _to(t: Tensor, device: torch.device | str | None, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` on ``device`` (default: where it is stored). Reading an offloaded tensor on the host first
    waits for its asynchronous copy; a copy back to the GPU is ordered on the stream anyway."""
    device = torch.device(device) if device is not None else t.device
    event = getattr(t, "_copy_done", None)
    if event is not None and device.type == "cpu":
        event.synchronize()
    return t.to(device=device, dtype=dtype or t.dtype, non_blocking=True)


class OldPolicyStore(abc.ABC):
    """Keeps p_old per key (e.g. a micro-batch id) from the old pass until the updates need it."""

    def __init__(self, config: OldPolicyConfig, tp_group: dist.ProcessGroup | None = None,
                 chunk: ChunkConfig = ChunkConfig()) -> None:
        self.config = config
        self.tp_group = tp_group
        self.chunk = chunk
        self._entries: dict[Hashable, _Entry] = {}

    def _keep(self, t: Tensor, dtype: torch.dtype | None) -> Tensor:
        t = t.detach()
        dtype = dtype or t.dtype
        if not self.config.offload:
            return t.to(dtype=dtype, copy=True)
        pin = self.config.pin_memory and _pinned_ok()
        host = torch.empty(t.shape, dtype=dtype, device="cpu", pin_memory=pin)
        host.copy_(t, non_blocking=pin)
        if pin and t.is_cuda:
            # The device-to-host copy is asynchronous: a later read on the host waits for this event.
            host._copy_done = torch.cuda.Event()
            host._copy_done.record(torch.cuda.current_stream(t.device))
        return host

    def _storage_dtype(self, default: torch.dtype | None) -> torch.dtype | None:
        if self.config.dtype == "auto":
            return None  # as given
        return _DTYPES[self.config.dtype] if self.config.dtype is not None else default

    @abc.abstractmethod
    def put(self, key: Hashable, capture: CapturedQK) -> None:
        """Record p_old for ``key`` from a capture made with the old weights (call under no_grad)."""

    @abc.abstractmethod
    def get(self, key: Hashable, device: torch.device | str | None = None) -> Tensor:
        """p_old [B, R, T] in float32 (float64 if stored so) on ``device``, without grad."""

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def pop(self, key: Hashable) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def nbytes(self) -> int:
        """Bytes held by the stored tensors (layouts excluded: they are O(B x (R + T)) integers)."""
        return sum(t.numel() * t.element_size() for e in self._entries.values() for t in e.tensors.values())


class RowStore(OldPolicyStore):
    """Stores the rows p_old themselves (bf16 when no dtype is given; "auto": as computed)."""

    def put(self, key: Hashable, capture: CapturedQK) -> None:
        with torch.no_grad():
            p = attention_policy(capture.q, capture.k, capture.layout, capture.softmax_scale,
                                 self.tp_group, self.chunk)
        self.put_rows(key, p)

    def put_rows(self, key: Hashable, rows: Tensor) -> None:
        """Store already computed rows [B, R, T]."""
        self._entries[key] = _Entry({"rows": self._keep(rows, self._storage_dtype(torch.bfloat16))})

    def get(self, key: Hashable, device: torch.device | str | None = None) -> Tensor:
        rows = self._entries[key].tensors["rows"]
        out_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        return _to(rows, device, out_dtype)


class QKStore(OldPolicyStore):
    """Stores Q rows and K and recomputes p_old on request."""

    def put(self, key: Hashable, capture: CapturedQK) -> None:
        dtype = self._storage_dtype(None)
        self._entries[key] = _Entry(
            {"q": self._keep(capture.q, dtype), "k": self._keep(capture.k, dtype)},
            layout=capture.layout.to("cpu") if self.config.offload else capture.layout,
            softmax_scale=capture.softmax_scale,
        )

    def get(self, key: Hashable, device: torch.device | str | None = None) -> Tensor:
        e = self._entries[key]
        q, k = e.tensors["q"], e.tensors["k"]
        with torch.no_grad():
            return attention_policy(_to(q, device), _to(k, device), e.layout, e.softmax_scale, self.tp_group,
                                    self.chunk)


def make_old_policy_store(config: OldPolicyConfig, tp_group: dist.ProcessGroup | None = None,
                          chunk: ChunkConfig = ChunkConfig()) -> OldPolicyStore:
    """The store selected by ``config.mode``."""
    cls = QKStore if config.mode == "qk" else RowStore
    return cls(config, tp_group, chunk)


def stored_values_per_sample(mode: str, rows: int, keys: int, heads: int, kv_heads: int, head_dim: int,
                             tp: int = 1) -> int:
    """Number of stored values per sample per TP rank: rows R*T (replicated), qk (R*H + T*H_kv)*d/TP."""
    if mode == "rows":
        return rows * keys
    if mode == "qk":
        return (rows * heads + keys * kv_heads) * head_dim // tp
    raise ValueError(f"unknown mode {mode!r}")
