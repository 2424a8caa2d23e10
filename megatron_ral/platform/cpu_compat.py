"""Let megatron-core run on a machine without CUDA (CPU tensors, gloo collectives).

megatron-core 0.16 assumes CUDA throughout: ``device="cuda"`` literals and ``torch.cuda.current_device()``
as tensor-factory arguments (schedules, p2p, DDP buffers, checkpoint writers, gradient clipping),
``torch.cuda`` RNG state in its RNG tracker, ``torch.cuda.synchronize()`` in the checkpoint writer, and
``param.type() == 'torch.cuda.FloatTensor'`` checks in the optimizers. On a machine where
``torch.cuda.is_available()`` is false, :func:`install` does exactly this and nothing else; with CUDA
present it does nothing at all, so the GPU path is untouched:

1. Every ``megatron.core.*`` module (already imported, or imported later) sees, under its global name
   ``torch``, a thin proxy of the torch module that differs in two ways: tensor factories given a CUDA
   ``device=`` create CPU tensors, and none pins memory (that needs a CUDA driver; megatron's per-CP-rank
   slicing of the M-RoPE table asks for a pinned CPU tensor); and ``torch.cuda`` is a namespace whose
   ``current_device()`` is the CPU device, whose RNG calls (``get_rng_state``/``set_rng_state``/``manual_seed``) act on the CPU generator
   (so megatron's RNG tracker really forks streams per TP rank) and whose ``synchronize()`` is a no-op.
   Everything else is torch itself. No module outside megatron.core sees the proxy.
2. megatron-core's tracker helpers ``_get_cuda_rng_state``/``_set_cuda_rng_state`` use the CPU generator.
3. ``Tensor.cuda()`` returns the tensor itself, and ``Tensor.type()`` (no argument) called from
   megatron-core code reports a CPU floating tensor under its CUDA type name, so the optimizers' and the
   gradient clipper's type checks accept CPU parameters. Called from anywhere else it is unchanged.

Everything is idempotent and reversible (:func:`uninstall`, used by tests).
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
import types
from typing import Any

import torch

_PREFIX = "megatron.core"
_FACTORIES = frozenset(
    {"zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint", "as_tensor",
     "zeros_like", "ones_like", "empty_like", "full_like", "empty_strided"}
)

_lock = threading.Lock()
_saved: dict[str, Any] = {}
_patched_modules: list[types.ModuleType] = []


def _is_cuda(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.split(":")[0] == "cuda"
    return False


class _CudaNamespaceOnCpu:
    """``torch.cuda`` as megatron-core sees it on a CPU machine."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None


def _cpu_factory(fn: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        # pinned host memory needs a CUDA driver (megatron's M-RoPE CP slicing asks for it on a CPU tensor)
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    factory.__name__ = getattr(fn, "__name__", "factory")
    return factory


class _TorchOnCpu(types.ModuleType):
    """The ``torch`` module as megatron-core sees it on a CPU machine (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaNamespaceOnCpu()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        setattr(self, name, attr)  # cache: later lookups are plain attribute hits
        return attr


_PROXY: _TorchOnCpu | None = None


def _patch_module(mod: types.ModuleType) -> None:
    if getattr(mod, "torch", None) is torch:
        mod.torch = _PROXY
        _patched_modules.append(mod)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Gives modules of megatron.core imported after :func:`install` the proxy as well."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if not fullname.startswith(_PREFIX):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original_exec = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            original_exec(module)
            if _saved:
                _patch_module(module)

        spec.loader = _LoaderWrapper(loader, exec_module)
        return spec


class _LoaderWrapper(importlib.abc.Loader):
    def __init__(self, inner: Any, exec_module: Any) -> None:
        self._inner, self._exec = inner, exec_module

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._exec(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
}


def _tensor_cuda_on_cpu(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **_: Any):
    return self


def _get_rng_state_cpu(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state_cpu(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def is_installed() -> bool:
    return bool(_saved)


def install() -> bool:
    """Apply the compatibility changes if CUDA is absent. Returns True when they are active."""
    global _PROXY
    if torch.cuda.is_available():
        return False
    with _lock:
        if _saved:
            return True
        _PROXY = _PROXY or _TorchOnCpu()
        original_type = torch.Tensor.type

        def tensor_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if caller.startswith(_PREFIX):
                    return _CUDA_TYPE_NAMES[self.dtype]
            return original_type(self, *args, **kwargs)

        _saved["Tensor.type"] = original_type
        torch.Tensor.type = tensor_type
        _saved["Tensor.cuda"] = torch.Tensor.cuda
        torch.Tensor.cuda = _tensor_cuda_on_cpu

        import megatron.core.tensor_parallel.random as rnd

        _saved["rng.get"], _saved["rng.set"] = rnd._get_cuda_rng_state, rnd._set_cuda_rng_state
        rnd._get_cuda_rng_state, rnd._set_cuda_rng_state = _get_rng_state_cpu, _set_rng_state_cpu
        for name, mod in list(sys.modules.items()):
            if name.startswith(_PREFIX) and mod is not None:
                _patch_module(mod)
        finder = _PatchOnImport()
        sys.meta_path.insert(0, finder)
        _saved["finder"] = finder
        return True


def uninstall() -> None:
    """Undo :func:`install` (for tests)."""
    with _lock:
        if not _saved:
            return
        torch.Tensor.type = _saved.pop("Tensor.type")
        torch.Tensor.cuda = _saved.pop("Tensor.cuda")
        import megatron.core.tensor_parallel.random as rnd

        rnd._get_cuda_rng_state, rnd._set_cuda_rng_state = _saved.pop("rng.get"), _saved.pop("rng.set")
        sys.meta_path.remove(_saved.pop("finder"))
        for mod in _patched_modules:
            if getattr(mod, "torch", None) is _PROXY:
                mod.torch = torch
        _patched_modules.clear()
        _saved.clear()
