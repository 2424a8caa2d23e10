"""Core attention of the last decoder layer with a capture hook.

The hook sees exactly what core attention sees: the post-RoPE queries and keys of the layer
(megatron layout [s, b, heads_local, d] / [s, b, kv_heads_local, d]; THD packed inputs [t, heads, d]),
the attention mask and packed-sequence params, plus the softmax scale. It runs before the regular
(fast) attention kernel, whose output is returned unchanged. With no hook set the module is the
plain backend core attention.

    attn = model.last_layer_core_attention()     # None unless this rank holds the last layer
    attn.capture_hook = fn                        # fn(query=, key=, attention_mask=,
                                                  #    packed_seq_params=, softmax_scale=)

Do not combine with selective core-attention recompute when the hook needs gradients (that
region runs under no_grad and is replayed in backward).
"""

from __future__ import annotations

import math
from typing import Callable

_CACHE: dict[type, type] = {}


def capture_core_attention(base: type) -> type:
    """A subclass of the core-attention class ``base`` (same constructor) with ``capture_hook``."""
    if base in _CACHE:
        return _CACHE[base]

    class CaptureCoreAttention(base):
        capture_hook: Callable | None = None

        def capture_softmax_scale(self) -> float:
            scale = getattr(self.config, "softmax_scale", None)
            if scale is None:
                scale = 1.0 / math.sqrt(self.config.kv_channels)
            return float(scale)

        def forward(self, query, key, value, attention_mask, *args, **kwargs):
            hook = self.capture_hook
            if hook is not None:
                hook(
                    query=query,
                    key=key,
                    attention_mask=attention_mask,
                    packed_seq_params=kwargs.get("packed_seq_params"),
                    softmax_scale=self.capture_softmax_scale(),
                )
            return super().forward(query, key, value, attention_mask, *args, **kwargs)

    CaptureCoreAttention.__name__ = f"Capture{base.__name__}"
    CaptureCoreAttention.__qualname__ = CaptureCoreAttention.__name__
    _CACHE[base] = CaptureCoreAttention
    return CaptureCoreAttention
