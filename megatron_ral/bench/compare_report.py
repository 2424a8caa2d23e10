"""What each arm of the algorithm comparison achieved, from its runs' metrics.jsonl (results.json / results.md).

Per run (one arm, one seed): held-out accuracy (the trainer's greedy ``eval/accuracy`` at its last
evaluation, per task from ``eval/accuracy_by_source/*``), the reward curve, the held-out curve, the mean
``attn/vision_mass`` (attention mass of the response rows on vision tokens; logged by arms that capture
attention), and the equal-compute figures: rollout steps, optimizer steps (steps x updates per rollout batch),
generated tokens (sum over steps of ``response/length_mean`` x prompts per step x G) and wall time; the
gradient-norm diagnostic (``diag/grad_ratio/<term>``, logged every ``logging.term_grad_norm_interval``
steps: each extra loss term's gradient norm over the policy term's, weight included) averaged over the
steps that logged it; for distillation arms the teacher's share (``perf/teacher_s``), reported apart from
the equal-compute figures. Per arm: mean and sample standard deviation over seeds. ``base`` is the SFT
run's evaluation before its first step, ``sft`` its last.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

SOURCE_PREFIX = "eval/accuracy_by_source/"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; nan for none)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _evals(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "eval/accuracy" in r]


def per_task(row: dict) -> dict[str, float]:
    return {k[len(SOURCE_PREFIX):].split("/")[-1]: v for k, v in row.items() if k.startswith(SOURCE_PREFIX)}


def sft_run_figures(rows: list[dict]) -> dict[str, dict]:
    """{"base": ..., "sft": ...} from an SFT run with evaluations before the first and after the last step."""
    evals = _evals(rows)
    if len(evals) < 2 or evals[0]["step"] != 0:
        raise ValueError("the SFT run needs evaluations at start and end (training.eval_at_start, eval_at_end)")
    base, last = evals[0], evals[-1]
    return {"base": {"accuracy": base["eval/accuracy"], "format": base.get("eval/format"), "per_task": per_task(base)},
            "sft": {"accuracy": last["eval/accuracy"], "format": last.get("eval/format"), "per_task": per_task(last),
                    "optimizer_steps": max(r["step"] for r in rows)}}


def rl_run_figures(rows: list[dict], *, prompts_per_step: int, group_size: int, updates_per_rollout: int,
                   start_accuracy: float | None = None, lambda_attn: float = 0.0) -> dict:
    """An RL run's figures (see the module docstring); ``start_accuracy`` is the held-out accuracy of its
    initial checkpoint (step 0 of its held-out curve). ``loss_ratio`` = lambda_attn * mean |loss/attn| /
    mean |loss/policy| over the steps: the size of the attention term's loss against the policy term's
    (a loss ratio, not a gradient-norm ratio)."""
    steps = [r for r in rows if "reward/total" in r]
    evals = _evals(rows)
    if not steps or not evals:
        raise ValueError("the RL run has no training steps or no evaluation")
    vision = [r["attn/vision_mass"] for r in steps if "attn/vision_mass" in r]
    curve = [(0, start_accuracy)] if start_accuracy is not None else []
    curve += [(r["step"], r["eval/accuracy"]) for r in evals]
    la = _mean([abs(r["loss/attn"]) for r in steps if "loss/attn" in r])
    lp = _mean([abs(r["loss/policy"]) for r in steps if "loss/policy" in r])
    skipped = sum(r.get("train/skipped_updates", 0.0) for r in steps)
    grad = {f"grad_ratio_{t}": _mean([r[f"diag/grad_ratio/{t}"] for r in steps if f"diag/grad_ratio/{t}" in r])
            for t in GRAD_TERMS}
    grad["grad_norm_policy"] = _mean([r["diag/grad_norm/policy"] for r in steps if "diag/grad_norm/policy" in r])
    grad["diagnostic_steps"] = sum(1 for r in steps if "diag/grad_norm/policy" in r)
    teacher_s = [r["perf/teacher_s"] for r in steps if "perf/teacher_s" in r]
    return {
        **grad,
        "teacher_seconds": sum(teacher_s) if teacher_s else None,
        "distill_gkd": _mean([r.get("distill/gkd") for r in steps]),
        "distill_attn_jsd_teacher": _mean([r.get("distill/attn_jsd_teacher") for r in steps]),
        "accuracy": evals[-1]["eval/accuracy"],
        "format": evals[-1].get("eval/format"),
        "per_task": per_task(evals[-1]),
        "reward_curve": [(r["step"], r["reward/total"]) for r in steps],
        "heldout_curve": curve,
        "reward_mean_last_quarter": _mean([r["reward/total"] for r in steps[-max(1, len(steps) // 4):]]),
        "vision_mass": (sum(vision) / len(vision)) if vision else None,
        "attn_jsd_old": _mean([r.get("attn/jsd_old") for r in steps]),
        "loss_attn_abs": la,
        "loss_policy_abs": lp,
        "loss_ratio": (lambda_attn * la / lp) if (lambda_attn > 0 and la is not None and lp) else None,
        "rollout_steps": len(steps),
        "optimizer_steps": len(steps) * updates_per_rollout,
        "skipped_updates": skipped,
        "generated_tokens": sum(r.get("response/length_mean", 0.0) * prompts_per_step * group_size for r in steps),
        "step_seconds": sum(r.get("perf/step_s", 0.0) for r in steps),
    }


def band(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float, float]]:
    """(x, mean, sample std) over seeds at the x values every curve has (for ``plots.plot_bands``)."""
    common = sorted(set.intersection(*[{x for x, _ in c} for c in curves])) if curves else []
    out = []
    for x in common:
        m, s = mean_std([dict(c)[x] for c in curves])
        out.append((x, m, s))
    return out


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


GRAD_TERMS = ("attn", "gkd", "distill_attn")
SUMMARY_KEYS = ("accuracy", "format", "vision_mass", "loss_ratio", "attn_jsd_old", "generated_tokens",
                "optimizer_steps", "rollout_steps", "wall_seconds", "reward_mean_last_quarter", "grad_ratio_attn",
                "grad_ratio_gkd", "grad_ratio_distill_attn", "grad_norm_policy", "teacher_seconds",
                "distill_attn_jsd_teacher")
# optional columns of the table: (summary key, header), shown when some arm has the figure
OPTIONAL_COLUMNS = (("grad_ratio_attn", "grad attn/policy"), ("grad_ratio_gkd", "grad gkd/policy"),
                    ("grad_ratio_distill_attn", "grad attn-to-teacher/policy"), ("attn_jsd_old", "jsd_old"))


def aggregate(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """{arm: {seed: figures}} -> {arm: {key: [mean, std], "per_task": {task: [mean, std]}, "seeds": n}}."""
    out = {}
    for arm, by_seed in runs.items():
        figs = list(by_seed.values())
        row: dict = {"seeds": len(figs)}
        for key in SUMMARY_KEYS:
            vals = [f.get(key) for f in figs if f.get(key) is not None]
            if vals:
                row[key] = list(mean_std(vals))
        tasks = sorted({t for f in figs for t in f.get("per_task", {})})
        row["per_task"] = {t: list(mean_std([f["per_task"][t] for f in figs if t in f.get("per_task", {})]))
                           for t in tasks}
        out[arm] = row
    return out


def _cell(pair, digits: int = 3) -> str:
    if pair is None or pair[0] is None or (isinstance(pair[0], float) and math.isnan(pair[0])):
        return "–"
    m, s = pair
    if abs(m) >= 100:
        return f"{m:.0f} ± {s:.0f}"
    if abs(m) >= 10:
        return f"{m:.1f} ± {s:.1f}"
    if m != 0 and abs(m) < 1e-2:
        return f"{m:.2e} ± {s:.1e}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(summary: dict[str, dict], arms: list[str]) -> str:
    """The results table: one row per arm, mean ± std over seeds."""
    tasks = sorted({t for a in arms for t in summary[a].get("per_task", {})})
    optional = [(k, h) for k, h in OPTIONAL_COLUMNS if any(summary[a].get(k) for a in arms)]
    head = (["arm", "seeds", "held-out acc"] + [f"acc {t}" for t in tasks] + ["format", "vision mass"]
            + [h for _, h in optional] + ["gen tokens", "opt steps", "wall s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in arms:
        r = summary[a]
        cells = [a, str(r["seeds"]), _cell(r.get("accuracy"))]
        cells += [_cell(r["per_task"].get(t)) for t in tasks]
        cells += [_cell(r.get(k)) for k in ("format", "vision_mass", *[k for k, _ in optional],
                                             "generated_tokens", "optimizer_steps", "wall_seconds")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_NUM = re.compile(r"^(-?[0-9.e+-]+) ± ([0-9.e+-]+)$")


def parse_markdown_table(text: str) -> dict[str, dict[str, tuple[float, float] | str]]:
    """The first markdown table of ``text`` back as {arm: {column: (mean, std) or text}}."""
    rows = [ln for ln in text.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {}
    for ln in rows[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(head):
            break
        parsed = {}
        for h, c in zip(head[1:], cells[1:]):
            m = _NUM.match(c)
            parsed[h] = (float(m.group(1)), float(m.group(2))) if m else c
        out[cells[0]] = parsed
    return out


def separation(summary: dict[str, dict], arm: str, against: str, key: str = "accuracy") -> dict | None:
    """Difference of two arms' means and whether it exceeds the seed spread (|diff| > std_a + std_b)."""
    a, b = summary.get(arm, {}).get(key), summary.get(against, {}).get(key)
    if not a or not b:
        return None
    diff = a[0] - b[0]
    spread = a[1] + b[1]
    return {"arm": arm, "against": against, "key": key, "diff": diff, "spread": spread,
            "exceeds_spread": bool(abs(diff) > spread and spread > 0)}
