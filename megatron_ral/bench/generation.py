"""Generation speed: this package's KV-cache generate() against transformers' generate(), side by side.

Same seeded tiny-preset weights in both models (fp32, single process, CPU or one GPU), the same batch
of ragged text prompts (left-padded for HF), greedy decoding of exactly ``max_new_tokens`` tokens
per row (no stop token). Reported per system: tokens/s (generated tokens over wall time including
prefill), prefill seconds, and the median decode-step time in a window around step 16 and step 512
(a real KV cache keeps late steps close to early ones; prefix recompute grows linearly). Each figure
is given in wall time and in this process's CPU time (the machine's cores may be shared with other
jobs; with one thread, CPU time is what the run itself cost). The two systems run one after the
other in the same process.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

from megatron_ral.cli import input_checks as check
from megatron_ral.cli.arguments import ToolParser
from megatron_ral.cli.entry import prog_name, run_main
from megatron_ral.inference.prompts import PromptInput


def _window(times: list[float], step: int, width: int) -> float | None:
    lo, hi = max(step - width // 2, 0), step + (width + 1) // 2
    part = times[lo:hi]
    return statistics.median(part) if part else None


def _prompts(batch: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[PromptInput]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=gen).tolist()
    return [PromptInput(torch.randint(0, min(vocab, 900), (n,), generator=gen)) for n in lengths]


@torch.no_grad()
def _run_hf(hf, prompts: list[PromptInput], max_new_tokens: int, pad_id: int) -> dict:
    from transformers import StoppingCriteria, StoppingCriteriaList

    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, length - len(p):] = p.input_ids
        mask[b, length - len(p):] = 1
    stamps: list[tuple[float, float]] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append((time.perf_counter(), time.process_time()))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    hf.generation_config.eos_token_id = None
    t0, c0 = time.perf_counter(), time.process_time()
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                      pad_token_id=pad_id, stopping_criteria=StoppingCriteriaList([Stamp()]))
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "tokens": out[:, length:], "total_s": total, "total_cpu_s": total_cpu,
        "prefill_s": stamps[0][0] - t0, "prefill_cpu_s": stamps[0][1] - c0,
        "steps": [b[0] - a[0] for a, b in zip(stamps, stamps[1:])],
        "steps_cpu": [b[1] - a[1] for a, b in zip(stamps, stamps[1:])],
    }


def _run_ours(model, prompts: list[PromptInput], max_new_tokens: int) -> dict:
    from megatron_ral.config.schema import GenerationConfig
    from megatron_ral.inference.generate import GenerationStats, generate

    stats = GenerationStats()
    cfg = GenerationConfig(max_new_tokens=max_new_tokens,
                           kv_cache_tokens=len(prompts) * (max(len(p) for p in prompts) + max_new_tokens))
    out = generate(model, prompts, cfg, greedy=True, stop_token_ids=[], stats=stats)
    tokens = torch.stack([r[0].token_ids for r in out])
    return {"tokens": tokens, "total_s": stats.total_seconds, "total_cpu_s": stats.total_cpu_seconds,
            "prefill_s": stats.prefill_seconds, "prefill_cpu_s": stats.prefill_cpu_seconds,
            "steps": stats.step_seconds, "steps_cpu": stats.step_cpu_seconds}


def _summary(run: dict, probe_steps: tuple[int, ...], window: int) -> dict:
    n = int(run["tokens"].numel())
    out = {"generated_tokens": n}
    for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
        total = run[f"total{suffix}_s"]
        part = {"seconds": round(total, 4), "tokens_per_s": round(n / total, 2),
                "prefill_s": round(run[f"prefill{suffix}_s"], 4)}
        for k in probe_steps:
            t = _window(run[f"steps{suffix}"], k, window)
            part[f"step_{k}_ms"] = None if t is None else round(1000 * t, 3)
        out[clock] = part
    return out


def run_generation_benchmark(
    preset: str = "small",
    config_overrides: dict | None = None,
    batch: int = 16,
    prompt_lengths: tuple[int, int] = (32, 96),
    max_new_tokens: int = 528,
    probe_steps: tuple[int, int] = (16, 512),
    window: int = 15,
    seed: int = 0,
) -> dict:
    """Run both systems once (after a short warm-up each) and return the JSON-able comparison."""
    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.models.qwen25vl.hf_weights import load_hf_weights
    from megatron_ral.models.qwen25vl.provider import build_model
    from megatron_ral.platform import destroy, initialize
    from megatron_ral.testing.models import (
        TOKEN_IDS,
        hf_reference_model,
        hf_state_dict,
        tiny_hf_config,
    )

    if max_new_tokens <= max(probe_steps) + window // 2:
        raise ValueError(f"max_new_tokens {max_new_tokens} must exceed the last probe step + window/2")
    initialize(ParallelConfig(), seed=seed)
    try:
        cfg = tiny_hf_config(preset, config_overrides)
        state = hf_state_dict(cfg, seed=seed)
        hf = hf_reference_model(cfg, state)
        model = build_model(cfg, backend="local", dtype=torch.float32, last_layer_core_attention=None)
        load_hf_weights(model, state)
        model.eval()
        del state
        prompts = _prompts(batch, *prompt_lengths, cfg.text_config.vocab_size, seed)
        pad = TOKEN_IDS["<|endoftext|>"]
        _run_hf(hf, prompts[:2], 4, pad)  # warm-up
        _run_ours(model, prompts[:2], 4)
        ours = _run_ours(model, prompts, max_new_tokens)
        ref = _run_hf(hf, prompts, max_new_tokens, pad)
    finally:
        destroy()
    same_rows = int((ours["tokens"] == ref["tokens"]).all(dim=1).sum())
    t = cfg.text_config
    mine, theirs = _summary(ours, probe_steps, window), _summary(ref, probe_steps, window)
    a, b = probe_steps
    result = {
        "model": {"preset": preset, "overrides": config_overrides or {}, "hidden_size": t.hidden_size,
                  "intermediate_size": t.intermediate_size, "layers": t.num_hidden_layers,
                  "heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads, "vocab": t.vocab_size,
                  "dtype": "float32"},
        "batch": batch, "prompt_lengths": [len(p) for p in prompts], "max_new_tokens": max_new_tokens,
        "threads": torch.get_num_threads(), "device": "cpu" if not torch.cuda.is_available() else "cuda",
        "megatron_ral": mine, "hf_transformers": theirs,
        "greedy_rows_identical": f"{same_rows}/{batch}",
    }
    for clock in ("wall", "cpu"):
        m, h = mine[clock], theirs[clock]
        ratios = {
            "speedup_tokens_per_s": round(m["tokens_per_s"] / h["tokens_per_s"], 3),
            f"megatron_ral_step_{b}_over_{a}": round(m[f"step_{b}_ms"] / m[f"step_{a}_ms"], 3),
            f"hf_step_{b}_over_{a}": round(h[f"step_{b}_ms"] / h[f"step_{a}_ms"], 3),
        }
        ratios["goals"] = {
            "tokens_per_s_ge_1.0x_hf": ratios["speedup_tokens_per_s"] >= 1.0,
            f"step_{b}_le_1.3x_step_{a}": ratios[f"megatron_ral_step_{b}_over_{a}"] <= 1.3,
        }
        result[f"ratios_{clock}"] = ratios
    return result


# --- the command (tools/bench/generation.py) ------------------------------

def main(argv: list[str] | None = None) -> int:
    p = ToolParser(prog=prog_name("generation.py"), description=__doc__)
    p.add_argument("--preset", default="small", choices=["tiny", "small"], help="tiny checkpoint preset")
    p.add_argument("--config-json", default=None,
                   help="JSON text with Hugging Face config keys merged into the preset (as make_tiny_checkpoint.py "
                        "--config-json)")
    p.add_argument("--batch", type=int, default=16, help="prompts generated together")
    p.add_argument("--min-prompt", type=int, default=32, help="shortest prompt in tokens")
    p.add_argument("--max-prompt", type=int, default=96, help="longest prompt in tokens")
    p.add_argument("--max-new-tokens", type=int, default=528, help="tokens generated per prompt")
    p.add_argument("--seed", type=int, default=0, help="prompt and weight seed")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    overrides = check.json_text(args.config_json, "--config-json") if args.config_json else None
    result = run_generation_benchmark(
        preset=args.preset, config_overrides=overrides, batch=args.batch,
        prompt_lengths=(args.min_prompt, args.max_prompt), max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(json.dumps(result))
    return 0


def cli() -> None:
    """``python tools/bench/generation.py`` and ``python -m megatron_ral.bench.generation``."""
    run_main(prog_name("generation.py"), main)


if __name__ == "__main__":
    cli()
