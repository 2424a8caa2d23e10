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
