"""Step-time breakdown of GRPO and RAL on the same model and batches (tools/bench/rl_step.py).

Both algorithms start from the same seeded weights and read the same records in the same order, with
the same sampling seeds; each runs ``warmup`` unmeasured steps then ``steps`` measured ones, in one
process, one after the other. With ``repeats`` > 1 the pair runs again in alternating order (GRPO first,
then RAL first, ...) and the medians are over every measured step of every repeat. Reported per
algorithm: the median seconds of each phase (generate, old pass, reference pass, updates) and of the
whole step, the mean response length (so a difference in generated length is visible), and the ratio
RAL / GRPO of the step time (goal: <= 1.25).

GRPO here is the same trainer with the attention term off (``algorithm.name: grpo``); it still keeps the
old pass (updates_per_rollout >= 2 needs old log-probs) and the no-grad attention diagnostics, so the
difference is what the RAL term costs: p_old kept from the old pass and the attention rows with their
backward in every update.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from megatron_ral.cli import input_checks as check
from megatron_ral.cli.arguments import ToolParser
from megatron_ral.cli.entry import prog_name, run_main

PHASES = ("perf/gen_s", "perf/old_pass_s", "perf/ref_pass_s", "perf/update_s", "perf/step_s")


def _assets(root: Path, preset: str, config_overrides: dict | None, records: int, seed: int) -> dict:
    from megatron_ral.checkpoint.convert import hf_to_megatron
    from megatron_ral.data.synthetic import make_synthetic_dataset
    from megatron_ral.tiny.checkpoint import make_tiny_checkpoint

    make_tiny_checkpoint(root / "hf", preset=preset, seed=seed, config_overrides=config_overrides)
    hf_to_megatron(root / "hf", root / "mcore", progress=False)
    make_synthetic_dataset(str(root / "data"), records, seed=seed)
    return {"hf": str(root / "hf"), "mcore": str(root / "mcore"), "data": str(root / "data")}


def _config(assets: dict, run_dir: Path, algorithm: str, args) -> "object":
    from megatron_ral.config import load_config, validate
    from megatron_ral.config.data import DataConfig

    data = Path(assets["data"])
    overrides = [
        f"model.load={assets['mcore']}", "model.dtype=fp32",
        f"data.train_files=[{data / 'train.json'}]", f"data.media_root={data}", "data.num_workers=0",
        "data.shuffle=false", f"data.min_frames={min(DataConfig.min_frames, args.max_frames)}", f"data.max_frames={args.max_frames}",
        f"data.video_min_pixels={args.pixels}", f"data.video_max_pixels={args.pixels}",
        f"data.image_min_pixels={args.pixels}", f"data.image_max_pixels={args.pixels}",
        f"algorithm.name={algorithm}", f"algorithm.rollouts_per_prompt={args.group_size}",
        f"algorithm.updates_per_rollout={args.updates}", "algorithm.kl_beta=0.04",
        "algorithm.reward_function=megatron_ral.bench.rl_step:length_reward",
        f"generation.max_new_tokens={args.max_new_tokens}", "generation.temperature=1.0",
        f"training.prompts_per_step={args.prompts}", f"training.micro_batch_size={args.micro_batch_size}",
        f"training.train_steps={args.warmup + args.steps}", f"training.run_dir={run_dir}",
        "training.eval_at_end=false", "logging.wandb_mode=disabled", "logging.progress=false",
    ]
    return validate(load_config(None, overrides), world_size=1)


def length_reward(response: str, record, template: str) -> float:
    """A reward that varies between random responses (share of ASCII letters), so that advantages are
    not all zero and every loss term runs (the Video-R1 reward of an untrained model is always 0)."""
    text = response[:64]
    return sum(c.isascii() and c.isalpha() for c in text) / max(len(text), 1)


def _run(cfg, info, warmup: int) -> list[dict]:
    from megatron_ral.rl import trainer as T

    run = T.build(cfg, info)
    rows = [T.train_step(run, cfg, step) for step in range(1, run.total_steps + 1)]
    return rows[warmup:]


def _summary(measured: list[dict]) -> dict:
    out = {k.split("/")[1]: statistics.median(r[k] for r in measured) for k in PHASES}
    out["response_length_mean"] = statistics.mean(r["response/length_mean"] for r in measured)
    out["steps"] = len(measured)
    return out


def run_rl_step_benchmark(args) -> dict:
    """GRPO and RAL step times side by side (see the module docstring); ``args`` from tools/bench/rl_step.py."""
    import torch

    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.platform import destroy, initialize

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assets = _assets(root, args.preset, args.config_json, args.records, args.seed)
        info = initialize(ParallelConfig(), seed=args.seed)
        try:
            rows = {"grpo": [], "ral": []}
            for repeat in range(args.repeats):
                # alternate the order (GRPO first, then RAL first, ...) so that drift in the machine's load
                # or warm caches does not favour the algorithm that always runs second
                order = ("grpo", "ral") if repeat % 2 == 0 else ("ral", "grpo")
                for algorithm in order:
                    torch.manual_seed(args.seed)
                    run_dir = root / f"{algorithm}_{repeat}"
                    rows[algorithm] += _run(_config(assets, run_dir, algorithm, args), info, args.warmup)
        finally:
            destroy()
        results = {algorithm: _summary(r) for algorithm, r in rows.items()}
    ratio = results["ral"]["step_s"] / results["grpo"]["step_s"]
    return {
        "setup": {"preset": args.preset, "config_json": args.config_json, "prompts": args.prompts,
                  "group_size": args.group_size, "updates_per_rollout": args.updates,
                  "max_new_tokens": args.max_new_tokens,
                  "repeats": args.repeats, "threads": torch.get_num_threads()},
        "grpo": results["grpo"], "ral": results["ral"],
        "ral_over_grpo_step": ratio,
        "ral_extra_update_s": results["ral"]["update_s"] - results["grpo"]["update_s"],
        "goal_ral_le_1.25x_grpo": ratio <= 1.25,
    }


# --- the command (tools/bench/rl_step.py) ---------------------------------

def add_step_flags(p, preset_help: str, config_help: str, variants: str) -> None:
    """The flags the step benchmarks share (``rl_step``, ``distill_step``): workload, model and repetition;
    ``variants`` names what one repeat runs (for the help texts)."""
    p.add_argument("--preset", default="small", choices=["tiny", "small"], help=preset_help)
    p.add_argument("--config-json", default=None, help=config_help)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="responses per prompt (G)")
    p.add_argument("--updates", type=int, default=2, help="optimizer steps per rollout batch")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length cap")
    p.add_argument("--max-frames", type=int, default=8, help="frames per video")
    p.add_argument("--pixels", type=int, default=12544, help="pixels per frame / image")
    p.add_argument("--records", type=int, default=40, help="synthetic records written")
    p.add_argument("--steps", type=int, default=3, help=f"measured steps per {variants.split('/')[0].strip()} run")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps per run")
    p.add_argument("--repeats", type=int, default=1,
                   help=f"runs of the {variants} pair, in alternating order; medians over all of them")
    p.add_argument("--seed", type=int, default=0, help="weights, data and sampling seed")


def check_step_flags(args) -> None:
    """One-line errors for the shared flags (``add_step_flags``); the thread count from OMP_NUM_THREADS."""
    args.config_json = check.json_text(args.config_json, "--config-json") if args.config_json else None
    for flag in ("prompts", "group_size", "updates", "micro_batch_size", "max_new_tokens", "records", "steps",
                 "repeats"):
        check.at_least(getattr(args, flag), 1, f"--{flag.replace('_', '-')}")
    check.at_least(args.max_frames, 2, "--max-frames")  # a video is at least one temporal patch of 2 frames
    check.at_least(args.warmup, 0, "--warmup")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))


def main(argv: list[str] | None = None) -> int:
    p = ToolParser(prog=prog_name("rl_step.py"), description=__doc__)
    add_step_flags(p, "tiny-checkpoint preset", "HF config overrides merged into the preset, e.g. 7B proportions",
                   "GRPO / RAL")
    args = p.parse_args(argv)
    check_step_flags(args)
    print(json.dumps(run_rl_step_benchmark(args)))
    return 0


def cli() -> None:
    """``python tools/bench/rl_step.py`` and ``python -m megatron_ral.bench.rl_step``."""
    run_main(prog_name("rl_step.py"), main)


if __name__ == "__main__":
    cli()
