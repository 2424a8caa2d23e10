"""What an SFT -> RL run achieved, from the runs' metrics.jsonl files (the quickstart's summary.json).

    python -m megatron_ral.cli.summary --sft RUN_DIR --rl RUN_DIR --train DATA/train.json --heldout DATA/test.json \
        --checkpoint CKPT --hf-export DIR --out summary.json [--started EPOCH_SECONDS] [--teacher RUN_DIR] [--curves curves.png]

Held-out accuracies are the trainers' own ``eval/accuracy`` (greedy, the reward parser): the base model
before SFT (the SFT run's evaluation at step 0), after SFT and after RL (each run's last evaluation). The
reward curve is the RL run's ``reward/total`` per step: the means of its first and last quarter of steps.
With ``--teacher`` (a distillation run: the teacher's SFT run) also the teacher's held-out accuracy and the
means of the first and last quarter of the RL run's ``distill/attn_jsd_teacher`` and ``distill/gkd``.
``--curves``: both runs' training curves (reward, held-out accuracy, attention JSD, vision mass) as a PNG.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from megatron_ral.cli.arguments import ToolParser
from megatron_ral.cli.entry import run_main
from megatron_ral.errors import UsageError


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{run_dir}: no metrics.jsonl (did the run finish?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _evals(rows: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]


def quarter_means(values: list[float]) -> tuple[float, float]:
    """Means of the first and the last quarter (at least one value each)."""
    if not values:
        return float("nan"), float("nan")
    q = max(1, len(values) // 4)
    return sum(values[:q]) / q, sum(values[-q:]) / q


def summarize(sft_dir, rl_dir, train_records: list, heldout_records: list, **paths) -> dict:
    from megatron_ral.rl.evaluate import chance_accuracy

    sft, rl = read_metrics(sft_dir), read_metrics(rl_dir)
    sft_evals, rl_evals = _evals(sft), _evals(rl)
    base = [a for step, a in sft_evals if step == 0]
    if not base or len(sft_evals) < 2 or not rl_evals:
        raise UsageError("the runs lack evaluations: the SFT run needs training.eval_at_start and eval_at_end, "
                         "the RL run eval_at_end")
    rewards = [r["reward/total"] for r in rl if "reward/total" in r]
    first, last = quarter_means(rewards)
    return {
        "accuracy_base": base[0],
        "accuracy_sft": sft_evals[-1][1],
        "accuracy_rl": rl_evals[-1][1],
        "chance_accuracy": chance_accuracy(heldout_records, train_records),
        "heldout_records": len(heldout_records),
        "rl_eval_curve": [{"step": s, "accuracy": a} for s, a in rl_evals],
        "reward_first_quarter": first,
        "reward_last_quarter": last,
        "rl_steps": len(rewards),
        **{k: str(v) for k, v in paths.items()},
    }


def summarize_teacher(teacher_dir, rl_dir) -> dict:
    """The teacher's held-out accuracy (its run's last evaluation) and how close the student came to it:
    the first- and last-quarter means of the distillation run's divergences to the teacher."""
    evals = _evals(read_metrics(teacher_dir))
    if not evals:
        raise UsageError(f"{teacher_dir}: the teacher's run has no evaluation (training.eval_at_end)")
    rl = read_metrics(rl_dir)
    out = {"accuracy_teacher": evals[-1][1], "teacher_run_dir": str(Path(teacher_dir).resolve())}
    for key, name in (("distill/attn_jsd_teacher", "attn_jsd_teacher"), ("distill/gkd", "gkd")):
        values = [r[key] for r in rl if key in r]
        if not values:
            raise UsageError(f"{rl_dir}: no {key} in metrics.jsonl (not a distillation run?)")
        out[f"{name}_first_quarter"], out[f"{name}_last_quarter"] = quarter_means(values)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = ToolParser(prog="python -m megatron_ral.cli.summary", description=__doc__.split("\n\n")[0])
    p.add_argument("--sft", required=True, help="the SFT run directory")
    p.add_argument("--rl", required=True, help="the RL run directory")
    p.add_argument("--train", required=True, help="the training records (for the chance accuracy)")
    p.add_argument("--heldout", required=True, help="the held-out records")
    p.add_argument("--checkpoint", required=True, help="the final Megatron checkpoint")
    p.add_argument("--hf-export", required=True, help="the final checkpoint in Hugging Face format")
    p.add_argument("--out", required=True, help="summary JSON file to write")
    p.add_argument("--started", type=float, default=None, help="start time (seconds since the epoch)")
    p.add_argument("--teacher", default=None, help="the teacher's run directory (a distillation run's summary)")
    p.add_argument("--curves", default=None, help="PNG of the runs' training curves to write")
    args = p.parse_args(argv)
    train = json.loads(Path(args.train).read_text())
    heldout = json.loads(Path(args.heldout).read_text())
    from megatron_ral.checkpoint.locate import resolve_dist_dir

    out = summarize(args.sft, args.rl, train, heldout, hf_export_dir=Path(args.hf_export).resolve(),
                    checkpoint_dir=resolve_dist_dir(args.checkpoint).resolve(), heldout_data=Path(args.heldout).resolve(),
                    run_dir=Path(args.rl).resolve(), sft_run_dir=Path(args.sft).resolve())
    if args.teacher is not None:
        out.update(summarize_teacher(args.teacher, args.rl))
    if args.started is not None:
        out["wall_seconds"] = round(time.time() - args.started, 1)
    if args.curves is not None:
        from megatron_ral.logging.plots import plot_curves

        out["curves"] = str(plot_curves(args.curves, {"SFT": read_metrics(args.sft), "RL": read_metrics(args.rl)})
                            .resolve())
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    run_main("python -m megatron_ral.cli.summary", main)
