"""In-framework generation on the megatron Qwen2.5-VL model: KV cache, sampling, TP/PP communication.

    from megatron_ral.inference.generate import generate, Response
    from megatron_ral.inference.prompts import PromptInput

Modules: ``prompts`` (one unpadded prompt + its vision inputs), ``sampling`` (temperature / top-k /
top-p / greedy, per-response RNGs), ``kv_cache`` (megatron StaticInferenceContext, row surgery,
token-budget planning), ``pipeline`` (stage-to-stage activations, token broadcast), ``session``
(prefill + decode steps of one batch), ``attention`` (decode-time core attention for every layer spec:
grouped queries, keys rotated once in the cache), ``generate`` (the loop: G responses per prompt, stop tokens,
finished-row compaction), ``loading`` (model from a dist checkpoint). The command line is
``megatron_ral.cli.generate``, the benchmark ``megatron_ral.bench.generation``.
"""
