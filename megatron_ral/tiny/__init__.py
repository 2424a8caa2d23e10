"""The embedded default model: seeded tiny/small Qwen2.5-VL HF checkpoints with a BPE tokenizer carrying the
Qwen special tokens and the processor configs (``checkpoint``, ``config``, ``tokenizer``), and random
checkpoints with the released shapes for benchmarks (``random_checkpoint``). Above ``checkpoint`` and ``data``,
below ``cli``.
"""
