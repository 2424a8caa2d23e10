"""megatron_ral: GRPO + Reinforced Attention Learning for Qwen2.5-VL on Megatron-Core."""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# megatron-core announces at import that it falls back to torch implementations when Transformer Engine
# and Apex are absent (always the case on CPU), and torch's extension loader that no CUDA runtime exists.
# Both are expected here and say nothing actionable; real warnings are untouched.
for _msg in (r"Transformer Engine and Apex are not installed", r"Apex is not installed"):
    _warnings.filterwarnings("ignore", message=_msg, category=UserWarning)
_logging.getLogger("torch.utils.cpp_extension").setLevel(_logging.ERROR)

# Deprecation notices that torch raises about calls megatron-core 0.16 makes internally (checkpoint IO,
# collectives) and megatron-core's notice about its own default cuda-graph scope: nothing a user of this
# package can act on, repeated on every rank.
for _msg in (
    r"Please use DTensor instead and we are deprecating ShardedTensor",
    r"`load_state_dict` is deprecated",
    r"`torch.distributed.all_gather_into_tensor` is deprecated",
    r"`torch.distributed._all_gather_base` is a private function",
    r"full scope is deprecated",
    r"`torch.distributed.reduce_scatter_tensor` is deprecated",
    # megatron-core's optimizer probes `param.grad` on its fp32 views of the parameters (optimizer.py)
    r"The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
):
    _warnings.filterwarnings("ignore", message=_msg)

# Importing the package stays light (no torch): the command-line tools check their inputs before they
# import torch, megatron-core or transformers. CPU-only filters are installed by platform.initialize.
