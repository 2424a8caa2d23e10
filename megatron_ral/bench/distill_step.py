"""Step time and peak memory of RAL vs RAL + on-policy distillation on the same batches (tools/bench/distill_step.py).

The student is a tiny-checkpoint preset (``--preset``, ``--config-json``); the teacher has twice its layers
and twice its width (hidden size, MLP width, attention and KV heads: the same head dimension), its vision
tower and tokenizer. Both variants start from the same seeded weights and read the same records with the
same sampling seeds, so they generate the same rollouts; each runs ``warmup`` unmeasured steps then
``steps`` measured ones, in a fresh process of its own (started from the same fork server, so that the
memory one run leaves to the allocator does not count for the next), one after the other (``repeats`` > 1:
again, in alternating order; medians over every measured step).

Reported per variant: the median seconds of each phase (generate, old pass, reference pass, teacher,
updates) and of the step, and the peak memory of the run's process (CUDA: the largest allocation; CPU: the
largest resident set, ``ru_maxrss``, which includes the ~0.5 GiB of torch and megatron-core every process
starts with). For the distillation run also the teacher's share of the step and what
its forward FLOPs predict for it. The prediction uses the student's old pass as the yardstick: it is one
no-grad forward of the student over the same micro-batches, with the same capture, so

    predicted teacher_s = old_pass_s x F_teacher / F_student_forward

with F counted from the shapes and the step's token counts (``forward_flops``: the decoder's matmuls,
causal attention scores and values, the output layer at the response positions; the teacher's vision
tower once per prompt). The goal: the teacher pass costs at most 1.2x its prediction
(``teacher_over_flops_prediction`` <= 1.2), i.e. running the teacher adds no overhead beyond its FLOPs.
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
from megatron_ral.bench.rl_step import add_step_flags, check_step_flags
from megatron_ral.cli.entry import prog_name, run_main

PHASES = ("perf/gen_s", "perf/old_pass_s", "perf/ref_pass_s", "perf/teacher_s", "perf/update_s", "perf/step_s")


def teacher_overrides(student_hf: str | Path) -> dict:
    """HF config overrides of a teacher with twice the student's layers and width (same head dimension)."""
    text = json.loads((Path(student_hf) / "config.json").read_text())["text_config"]
    return {"text_config": {k: 2 * int(text[k]) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                          "num_attention_heads", "num_key_value_heads")}}


def _assets(root: Path, args) -> dict:
    from megatron_ral.checkpoint.convert import hf_to_megatron
    from megatron_ral.data.synthetic import make_synthetic_dataset
    from megatron_ral.tiny.checkpoint import make_tiny_checkpoint

    make_tiny_checkpoint(root / "hf", preset=args.preset, seed=args.seed, config_overrides=args.config_json)
    hf_to_megatron(root / "hf", root / "mcore", progress=False)
    teacher = teacher_overrides(root / "hf")
    if args.config_json:
        teacher = {**args.config_json, "text_config": {**args.config_json.get("text_config", {}),
                                                       **teacher["text_config"]}}
    make_tiny_checkpoint(root / "teacher_hf", preset=args.preset, seed=args.seed + 1, config_overrides=teacher)
    hf_to_megatron(root / "teacher_hf", root / "teacher_mcore", progress=False)
    make_synthetic_dataset(str(root / "data"), args.records, seed=args.seed)
    return {"hf": str(root / "hf"), "mcore": str(root / "mcore"), "teacher_hf": str(root / "teacher_hf"),
            "teacher_mcore": str(root / "teacher_mcore"), "data": str(root / "data")}


def _config(assets: dict, run_dir: Path, variant: str, args):
    from megatron_ral.config import load_config, validate
    from megatron_ral.config.data import DataConfig

    data = Path(assets["data"])
    overrides = [
        f"model.load={assets['mcore']}", "model.dtype=fp32",
        f"data.train_files=[{data / 'train.json'}]", f"data.media_root={data}", "data.num_workers=0",
        "data.shuffle=false", f"data.min_frames={min(DataConfig.min_frames, args.max_frames)}",
        f"data.max_frames={args.max_frames}",
        f"data.video_min_pixels={args.pixels}", f"data.video_max_pixels={args.pixels}",
        f"data.image_min_pixels={args.pixels}", f"data.image_max_pixels={args.pixels}",
        f"algorithm.rollouts_per_prompt={args.group_size}", f"algorithm.updates_per_rollout={args.updates}",
        "algorithm.kl_beta=0.04", "algorithm.lambda_attn=1.0",
        "algorithm.reward_function=megatron_ral.bench.rl_step:length_reward",
        f"generation.max_new_tokens={args.max_new_tokens}", "generation.temperature=1.0",
        f"training.prompts_per_step={args.prompts}", f"training.micro_batch_size={args.micro_batch_size}",
        f"training.train_steps={args.warmup + args.steps}", f"training.run_dir={run_dir}",
        "training.eval_at_end=false", "logging.wandb_mode=disabled", "logging.progress=false",
    ]
    if variant == "ral":
        overrides.append("algorithm.name=ral")
    else:
        overrides += ["algorithm.name=ral_distill", f"algorithm.teacher_load={assets['teacher_mcore']}",
                      f"algorithm.gkd_mu={args.gkd_mu}", f"algorithm.gamma_attn={args.gamma_attn}",
                      f"algorithm.gkd_top_k={args.gkd_top_k}", f"algorithm.teacher_placement={args.teacher_placement}"]
    return validate(load_config(None, overrides), world_size=1)


def _peak_gib() -> float:
    """This process's peak memory: the largest CUDA allocation, or on CPU the largest resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def forward_flops(shape, prompt_tokens: float, response_tokens: float) -> float:
    """FLOPs (2 x multiply-adds) of one no-grad forward over one prompt + response sequence, as the
    trainer's passes run it: every decoder matmul on every token, the causal attention scores and values
    (token t attends to t keys), and the output layer at the response positions only (``loss_index``)."""
    n = prompt_tokens + response_tokens
    h, f, d = shape.hidden, shape.ffn, shape.head_dim
    q, kv = shape.heads * d, shape.kv_heads * d
    matmuls = 2 * n * (h * (q + 2 * kv) + q * h + 3 * h * f)
    attention = 2 * 2 * q * n * (n + 1) / 2
    return shape.num_layers * (matmuls + attention) + 2 * h * shape.vocab * response_tokens


def vision_flops(shape, patches: float) -> float:
    """FLOPs of the vision tower over ``patches`` patches (its matmul parameters, twice, per patch)."""
    return 2 * shape.vision.num_parameters() * patches


def _step_tokens(cfg, assets: dict, steps: int) -> list[dict]:
    """Per step: the prompts' token and vision-patch counts (the loader's batches, in the training order)."""
    from megatron_ral.rl.build import build_data

    data = build_data(cfg, assets["hf"], 0, 1)
    it = iter(data.train)
    out = []
    for _ in range(steps):
        batch = next(it)
        lengths = [int(n) for n in batch.prompt_lengths]
        patches = sum(int(g.prod(dim=-1).sum()) for g in (batch.image_grid_thw, batch.video_grid_thw) if g is not None)
        out.append({"prompt_tokens": lengths, "patches": patches})
    return out


def run_variant(cfg, seed: int, warmup: int) -> dict:
    """One variant's run in this (fresh) process: its measured steps' metrics and the process's peak memory."""
    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.platform import destroy, initialize
    from megatron_ral.rl import trainer as T

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    info = initialize(ParallelConfig(), seed=seed)
    try:
        torch.manual_seed(seed)
        run = T.build(cfg, info)
        rows = [dict(T.train_step(run, cfg, step), step=step) for step in range(1, run.total_steps + 1)]
    finally:
        destroy()
    return {"rows": rows[warmup:], "peak_gib": _peak_gib()}


def _summary(measured: list[dict], peaks: list[float]) -> dict:
    out = {k.split("/")[1]: statistics.median(r.get(k, 0.0) for r in measured) for k in PHASES}
    out["response_length_mean"] = statistics.mean(r["response/length_mean"] for r in measured)
    out["peak_mem_gib"] = max(peaks)
    out["steps"] = len(measured)
    return out


def run_distill_step_benchmark(args) -> dict:
    """RAL and RAL + distillation step times and memory side by side (see the module docstring)."""
    from megatron_ral.models.qwen25vl.memory import load_shape
    from megatron_ral.testing.spawn import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assets = _assets(root, args)
        student, teacher = load_shape(assets["hf"]), load_shape(assets["teacher_hf"])
        tokens = _step_tokens(_config(assets, root / "tokens", "ral", args), assets, args.warmup + args.steps)
        rows = {"ral": [], "ral_distill": []}
        peaks = {"ral": [], "ral_distill": []}
        for repeat in range(args.repeats):
            # alternate the order so that drift in the machine's load does not favour one variant
            order = ("ral", "ral_distill") if repeat % 2 == 0 else ("ral_distill", "ral")
            for variant in order:
                cfg = _config(assets, root / f"{variant}_{repeat}", variant, args)
                out = run_distributed(run_variant, 1, cfg, args.seed, args.warmup, timeout=3600,
                                      env={"OMP_NUM_THREADS": str(torch.get_num_threads())})[0]
                rows[variant] += out["rows"]
                peaks[variant].append(out["peak_gib"])
    results = {v: _summary(rows[v], peaks[v]) for v in rows}

    # the teacher's FLOPs against the student's old pass, step by step (same sequences)
    predicted, measured_teacher, shares = [], [], []
    for r in rows["ral_distill"]:
        t = tokens[r["step"] - 1]
        resp = r["response/length_mean"]
        seqs = [(p, resp) for p in t["prompt_tokens"] for _ in range(args.group_size)]
        f_student = sum(forward_flops(student, p, n) for p, n in seqs)
        f_teacher = sum(forward_flops(teacher, p, n) for p, n in seqs) + vision_flops(teacher, t["patches"])
        predicted.append(r["perf/old_pass_s"] * f_teacher / f_student)
        measured_teacher.append(r["perf/teacher_s"])
        shares.append(f_teacher / f_student)
    teacher_s = statistics.median(measured_teacher)
    predicted_s = statistics.median(predicted)
    d, s = results["ral_distill"], results["ral"]
    return {
        "setup": {"preset": args.preset, "config_json": args.config_json, "prompts": args.prompts,
                  "group_size": args.group_size, "updates_per_rollout": args.updates,
                  "max_new_tokens": args.max_new_tokens, "gkd_mu": args.gkd_mu, "gamma_attn": args.gamma_attn,
                  "gkd_top_k": args.gkd_top_k, "teacher_placement": args.teacher_placement,
                  "repeats": args.repeats, "threads": torch.get_num_threads(),
                  "student": {"layers": student.num_layers, "hidden": student.hidden, "heads": student.heads},
                  "teacher": {"layers": teacher.num_layers, "hidden": teacher.hidden, "heads": teacher.heads}},
        "ral": s, "ral_distill": d,
        "distill_over_ral_step": d["step_s"] / s["step_s"],
        "distill_extra_peak_mem_gib": d["peak_mem_gib"] - s["peak_mem_gib"],
        "teacher_share_of_step": teacher_s / d["step_s"],
        "teacher_over_student_forward_flops": statistics.median(shares),
        "teacher_s_predicted_by_flops": predicted_s,
        "teacher_share_predicted_by_flops": predicted_s / (d["step_s"] - teacher_s + predicted_s),
        "teacher_over_flops_prediction": teacher_s / predicted_s,
        "goal_teacher_le_1.2x_flops_prediction": teacher_s / predicted_s <= 1.2,
    }


# --- the command (tools/bench/distill_step.py) ---------------------------------

def main(argv: list[str] | None = None) -> int:
    p = ToolParser(prog=prog_name("distill_step.py"), description=__doc__)
    add_step_flags(p, "the student's tiny-checkpoint preset",
                   "HF config overrides merged into the student's preset (the teacher doubles its sizes)",
                   "RAL / RAL + distillation")
    p.add_argument("--gkd-mu", type=float, default=1.0, help="algorithm.gkd_mu of the distillation run")
    p.add_argument("--gamma-attn", type=float, default=0.5, help="algorithm.gamma_attn of the distillation run")
    p.add_argument("--gkd-top-k", type=int, default=0, help="algorithm.gkd_top_k (0: exact GKD, logits per mini-batch)")
    p.add_argument("--teacher-placement", default="device", choices=["device", "host"],
                   help="algorithm.teacher_placement")
    args = p.parse_args(argv)
    check_step_flags(args)
    check.at_least(args.gkd_top_k, 0, "--gkd-top-k")
    if args.gkd_mu < 0 or args.gamma_attn < 0 or args.gkd_mu + args.gamma_attn <= 0:
        from megatron_ral.errors import UsageError

        raise UsageError("--gkd-mu / --gamma-attn: must be >= 0, and one of them > 0")
    print(json.dumps(run_distill_step_benchmark(args)))
    return 0


def cli() -> None:
    """``python tools/bench/distill_step.py`` and ``python -m megatron_ral.bench.distill_step``."""
    run_main(prog_name("distill_step.py"), main)


if __name__ == "__main__":
    cli()
