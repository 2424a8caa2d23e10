"""The paper's comparison at small scale: base / SFT / GRPO / RAL / RAL-zero / KD / distillation over seeds.

    python tools/experiments/compare_algorithms.py --out DIR [--seeds 3]
        [--algorithms base,sft,grpo,ral,ral_zero,distill,kd] [--steps N] [--lambda-attn 0.5,1,5,...]
        [--ral-epochs2] [--jobs J] [--nproc 1|2]

One tiny checkpoint and one synthetic dataset (the default mix plus ``task_brief_small``, 30 % held out) for
the whole experiment; per seed one think-template SFT checkpoint (and an answer-only SFT for ``ral_zero``),
seed k reading the data in the order ``data.seed`` = 1234 + k gives; then every RL arm of that seed starts
from its SFT checkpoint with the same seed (so the same data order and sampling seeds), prompts per step, G,
updates per rollout batch, learning rate and step count: equal compute, reported as generated tokens,
optimizer steps and wall time per arm. Every run is ``python -m megatron_ral.train`` in a subprocess
(``--nproc 2``: torchrun with 2 gloo processes); a run that finished (``DIR/runs/<arm>/seed<k>/done.json``)
is not rerun. Outputs: ``DIR/results.json`` (every number), ``DIR/results.md`` (the table: mean ± std over
seeds), ``DIR/curves.png``, ``DIR/attention.png``.

Every RL run logs the gradient-norm diagnostic (``logging.term_grad_norm_interval``) on a few steps: each
extra loss term's gradient norm over the policy term's, the figure that says whether a row can differ from
GRPO because of its term. ``kd`` (ral_distill with gkd_mu only: lambda_attn = gamma_attn = 0) and ``distill``
(gkd_mu, gamma_attn and lambda_attn as the ``ral`` arm) learn from one teacher: the distillation quickstart's
(the ``small`` preset, SFT'd on the think template once, seed 0); its SFT and forward passes are reported
beside the equal-compute figures, not counted in them.

Extra rows behind flags: ``--ral-epochs2`` (RAL with 2 epochs over one mini-batch per rollout batch: the
attention term acts on every response after one step on the same data) and ``--lambda-attn`` (one RAL arm
per value, ``ral_lam<v>``; a trailing ``...`` continues with powers of 10 while the attention term's
gradient norm stays below half the policy term's, at most four more values).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from megatron_ral.bench import compare_report as report

ROOT = Path(__file__).resolve().parents[2]
ALL_ARMS = ("base", "sft", "grpo", "ral", "ral_zero", "distill", "kd")
DEFAULT_ARMS = ALL_ARMS
THINK_RL = ("grpo", "ral", "kd", "distill")
TEACHER_ARMS = ("kd", "distill")
TASKS = "default,task_brief_small"
DATA_SEED = 1234          # data.seed of seed 0 (the config default); seed k reads in the order of DATA_SEED + k
SWEEP_TARGET = 0.5        # the lambda sweep stops once the attention term's gradient norm is half the policy's
SWEEP_MAX_EXTRA = 4       # ... or after this many values beyond the listed ones


@dataclass
class Settings:
    """Everything an arm's run is given; the RL arms share all of it (equal compute)."""

    out: str
    seeds: list[int]
    arms: list[str]
    steps: int = 40
    records: int = 300
    sft_epochs: int = 8
    prompts_per_step: int = 8
    group_size: int = 4
    updates_per_rollout: int = 2
    rl_lr: float = 2.0e-4
    lambda_attn: float = 1.0
    eval_points: int = 3
    grad_points: int = 4
    lambda_sweep: list[float] = field(default_factory=list)
    sweep_continue: bool = False
    ral_epochs2: bool = False
    nproc: int = 1
    jobs: int = 2
    answer_tokens: int = 16
    think_tokens: int | None = None
    teacher_preset: str = "small"
    teacher_sft_epochs: int = 8
    gkd_mu: float = 1.0
    gamma_attn: float = 1.0


_RUNNING: set = set()


def _stop_children(signum, frame) -> None:
    """SIGTERM / SIGINT: end the runs this process started (each in its own session, so their data-loader
    workers go with them), then exit; their unfinished run directories are started over next time."""
    for proc in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def _run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _RUNNING.add(proc)
        try:
            proc.wait()
        finally:
            _RUNNING.discard(proc)
    if proc.returncode != 0:
        tail = "".join(open(log).readlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode} (log {log}):\n{tail}")


def _train_cmd(s: Settings, config: str, overrides: list[str]) -> list[str]:
    if s.nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(s.nproc)]
    else:
        launch = [sys.executable]
    return launch + ["-m", "megatron_ral.train", "--config", str(ROOT / "examples" / "configs" / config)] + overrides


def prepare(s: Settings) -> dict:
    """The tiny checkpoint, the dataset and the measured think length (each made once)."""
    out = Path(s.out)
    if not (out / "mcore").exists():
        _run([sys.executable, "tools/make_tiny_checkpoint.py", "--out", str(out / "hf"), "--preset", "tiny",
              "--seed", "0"], out / "logs" / "tiny.log")
        _run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf", str(out / "hf"), "--out", str(out / "mcore")],
             out / "logs" / "convert.log")
    if not (out / "data" / "train.json").exists():
        _run([sys.executable, "tools/make_synthetic_videos.py", "--out", str(out / "data"), "--n", str(s.records),
              "--seed", "0", "--heldout-fraction", "0.3", "--tasks", TASKS], out / "logs" / "data.log")
    if s.think_tokens is None:
        s.think_tokens = think_length(str(out / "hf"), str(out / "data" / "train.json"))
    if any(a in s.arms for a in TEACHER_ARMS) and not (out / "teacher_mcore").exists():
        _run([sys.executable, "tools/make_tiny_checkpoint.py", "--out", str(out / "teacher_hf"), "--preset",
              s.teacher_preset, "--seed", "1"], out / "logs" / "teacher_tiny.log")
        _run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf", str(out / "teacher_hf"), "--out",
              str(out / "teacher_mcore")], out / "logs" / "teacher_convert.log")
    return {"think_max_new_tokens": s.think_tokens, "answer_max_new_tokens": s.answer_tokens}


def think_length(hf_dir: str, train_json: str) -> int:
    """max_new_tokens for the think template: the longest ``process + solution`` of the training records in
    the model's tokens, plus room for the end token and a little sampling slack (+8)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    recs = json.loads(Path(train_json).read_text())
    return max(len(tok(r["process"] + r["solution"])["input_ids"]) for r in recs) + 8


def _data_overrides(s: Settings, template: str) -> list[str]:
    d = Path(s.out) / "data"
    tokens = s.think_tokens if template == "think" else s.answer_tokens
    return [f"data.train_files=[{d / 'train.json'}]", f"data.eval_files=[{d / 'test.json'}]", f"data.media_root={d}",
            f"data.template={template}", f"generation.max_new_tokens={tokens}"]


def run_dir(s: Settings, arm: str, seed: int) -> Path:
    return Path(s.out) / "runs" / arm / f"seed{seed}"


def _once(s: Settings, arm: str, seed: int, cmd: list[str]) -> dict:
    """Run ``cmd`` for (arm, seed) unless it finished before; returns its done.json."""
    rd = run_dir(s, arm, seed)
    done = rd / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    if rd.exists():
        shutil.rmtree(rd)  # an unfinished run starts over (its partial metrics would mix with the new ones)
    rd.mkdir(parents=True)
    t0 = time.time()
    print(f"[compare] {arm} seed {seed}: running", flush=True)
    _run(cmd, Path(s.out) / "logs" / f"{arm}_seed{seed}.log")
    info = {"arm": arm, "seed": seed, "wall_seconds": round(time.time() - t0, 1), "command": cmd}
    done.write_text(json.dumps(info, indent=1) + "\n")
    print(f"[compare] {arm} seed {seed}: done in {info['wall_seconds']:.0f} s", flush=True)
    return info


def _sft(s: Settings, arm: str, seed: int, load: Path, epochs: int, template: str, eval_at_start: bool) -> dict:
    """One SFT run (``quickstart_sft.yaml``) from ``load``, reading the data in seed ``seed``'s order."""
    ov = [f"model.load={load}", f"training.run_dir={run_dir(s, arm, seed)}", f"training.epochs={epochs}",
          f"training.seed={seed}", f"data.seed={DATA_SEED + seed}",
          f"training.eval_at_start={str(eval_at_start).lower()}", "training.eval_at_end=true"]
    return _once(s, arm, seed, _train_cmd(s, "quickstart_sft.yaml", ov + _data_overrides(s, template)))


def sft_job(s: Settings, seed: int, template: str) -> dict:
    arm = "sft" if template == "think" else "sft_zero"
    return _sft(s, arm, seed, Path(s.out) / "mcore", s.sft_epochs, template, eval_at_start=True)


def teacher_job(s: Settings) -> dict:
    """The teacher of the distillation arms: the ``small`` preset SFT'd on the think template (seed 0)."""
    return _sft(s, "teacher", 0, Path(s.out) / "teacher_mcore", s.teacher_sft_epochs, "think", eval_at_start=False)


def lambda_arm(s: Settings, lam: float) -> str:
    """The arm of the sweep's value ``lam``: the ``ral`` arm itself at its own lambda_attn (the same run)."""
    return "ral" if lam == s.lambda_attn and "ral" in s.arms else f"ral_lam{lam:g}"


def rl_arms(s: Settings, sweep: list[float] | None = None) -> dict[str, dict]:
    """{arm: its algorithm overrides and template} for every RL arm requested (``sweep``: the lambda values
    of the sweep so far; default the listed ones)."""
    arms: dict[str, dict] = {}
    common = {"algorithm.updates_per_rollout": s.updates_per_rollout, "algorithm.epochs_per_rollout": 1}
    ral = {"algorithm.name": "ral", "algorithm.lambda_attn": s.lambda_attn}
    teacher = {"algorithm.name": "ral_distill", "algorithm.gkd_mu": s.gkd_mu,
               "algorithm.teacher_load": str(run_dir(s, "teacher", 0) / "checkpoints")}
    if "grpo" in s.arms:
        arms["grpo"] = {"template": "think", "ov": {"algorithm.name": "grpo", "algorithm.lambda_attn": 0.0, **common}}
    if "ral" in s.arms:
        arms["ral"] = {"template": "think", "ov": {**ral, **common}}
    if "ral_zero" in s.arms:
        arms["ral_zero"] = {"template": "answer_only", "ov": {**ral, **common}}
    if "kd" in s.arms:
        arms["kd"] = {"template": "think", "ov": {**teacher, "algorithm.lambda_attn": 0.0, "algorithm.gamma_attn": 0.0,
                                                  **common}}
    if "distill" in s.arms:
        arms["distill"] = {"template": "think", "ov": {**teacher, "algorithm.lambda_attn": s.lambda_attn,
                                                       "algorithm.gamma_attn": s.gamma_attn, **common}}
    if s.ral_epochs2:
        arms["ral_epochs2"] = {"template": "think", "ov": {**ral, "algorithm.updates_per_rollout": s.updates_per_rollout,
                                                           "algorithm.epochs_per_rollout": s.updates_per_rollout}}
    for lam in (s.lambda_sweep if sweep is None else sweep):
        if lambda_arm(s, lam) != "ral":
            arms[lambda_arm(s, lam)] = {"template": "think", "ov": {**ral, "algorithm.lambda_attn": lam, **common}}
    return arms


def rl_job(s: Settings, arm: str, spec: dict, seed: int) -> dict:
    sft = "sft" if spec["template"] == "think" else "sft_zero"
    every = max(1, s.steps // max(1, s.eval_points))
    ov = [f"model.load={run_dir(s, sft, seed) / 'checkpoints'}", f"training.run_dir={run_dir(s, arm, seed)}",
          f"training.train_steps={s.steps}", f"training.seed={seed}", f"data.seed={DATA_SEED + seed}",
          f"training.eval_interval={every}", "training.eval_at_end=true",
          f"training.prompts_per_step={s.prompts_per_step}", f"training.micro_batch_size={s.prompts_per_step}",
          f"algorithm.rollouts_per_prompt={s.group_size}", f"optimizer.lr={s.rl_lr}", "checkpoint.save_interval=0",
          "checkpoint.save_final=false", f"logging.term_grad_norm_interval={grad_interval(s)}"]
    ov += [f"{k}={v}" for k, v in spec["ov"].items()] + _data_overrides(s, spec["template"])
    return _once(s, arm, seed, _train_cmd(s, "quickstart_ral.yaml", ov))


def grad_interval(s: Settings) -> int:
    """Steps between two gradient-norm diagnostics: ``grad_points`` of them per run."""
    return max(1, s.steps // max(1, s.grad_points))


def sweep_ratio(s: Settings, lam: float) -> float | None:
    """The attention term's gradient norm over the policy term's of the sweep arm at ``lam``: the mean over
    seeds and diagnostic steps (None when no run logged it)."""
    vals = []
    for seed in s.seeds:
        rows = report.read_metrics(run_dir(s, lambda_arm(s, lam), seed))
        vals += [r["diag/grad_ratio/attn"] for r in rows if "diag/grad_ratio/attn" in r]
    return sum(vals) / len(vals) if vals else None


def next_sweep_value(values: list[float], extra: int, ratio: float | None) -> float | None:
    """The sweep's stopping rule: after the largest of ``values`` gave the attention/policy gradient ratio
    ``ratio``, the next lambda_attn (the smallest power of 10 above it), or None to stop: the ratio reached
    ``SWEEP_TARGET``, ``SWEEP_MAX_EXTRA`` values were added already (``extra``), or nothing was measured."""
    if ratio is None or ratio >= SWEEP_TARGET or extra >= SWEEP_MAX_EXTRA:
        return None
    return 10.0 ** (math.floor(math.log10(max(values)) + 1e-9) + 1)


def run_all(s: Settings) -> dict:
    """Every run of the experiment (the finished ones skipped); returns what the collection needs."""
    t0 = time.time()
    prep = prepare(s)
    sft_templates = []
    if any(a in s.arms for a in ("base", "sft", *THINK_RL)) or s.ral_epochs2 or s.lambda_sweep:
        sft_templates.append("think")
    if "ral_zero" in s.arms:
        sft_templates.append("answer_only")
    teacher = any(a in s.arms for a in TEACHER_ARMS)
    sweep = list(s.lambda_sweep)
    sweep_log: list[dict] = []
    with ThreadPoolExecutor(max_workers=s.jobs) as pool:
        futures = [pool.submit(teacher_job, s)] if teacher else []
        futures += [pool.submit(sft_job, s, seed, t) for seed in s.seeds for t in sft_templates]
        for f in futures:
            f.result()
        arms = rl_arms(s, sweep)
        jobs = [(arm, spec, seed) for seed in s.seeds for arm, spec in arms.items()]
        list(pool.map(lambda job: rl_job(s, *job), jobs))
        # the lambda sweep's continuation: powers of 10 until the attention gradient is half the policy's
        while s.sweep_continue and sweep:
            ratio = sweep_ratio(s, max(sweep))
            sweep_log.append({"lambda_attn": max(sweep), "grad_ratio_attn": ratio})
            nxt = next_sweep_value(sweep, len(sweep) - len(s.lambda_sweep), ratio)
            if nxt is None:
                break
            sweep.append(nxt)
            print(f"[compare] lambda sweep: attention/policy gradient {ratio:.3g} < {SWEEP_TARGET} at "
                  f"lambda_attn {max(sweep[:-1]):g}: next {sweep[-1]:g}", flush=True)
            arm = lambda_arm(s, sweep[-1])
            spec = rl_arms(s, [sweep[-1]]).get(arm) or rl_arms(s, [])["ral"]
            list(pool.map(lambda seed: rl_job(s, arm, spec, seed), s.seeds))
    arms = rl_arms(s, sweep)
    return {"prepare": prep, "rl_arms": {a: v["template"] for a, v in arms.items()}, "sft_templates": sft_templates,
            "teacher": teacher, "lambda_sweep": {"values": sweep, "steps": sweep_log, "target": SWEEP_TARGET},
            "lambda_by_arm": {a: float(v["ov"].get("algorithm.lambda_attn", 0.0)) for a, v in arms.items()},
            "experiment_seconds": round(time.time() - t0, 1)}


def collect(s: Settings, meta: dict) -> dict:
    """Figures per run, the per-arm summary, the equal-compute check and the differences against the seed spread."""
    runs: dict[str, dict[int, dict]] = {}
    sft_acc: dict[tuple[str, int], float] = {}
    for template in meta["sft_templates"]:
        sarm = "sft" if template == "think" else "sft_zero"
        for seed in s.seeds:
            rd = run_dir(s, sarm, seed)
            figs = report.sft_run_figures(report.read_metrics(rd))
            wall = json.loads((rd / "done.json").read_text())["wall_seconds"]
            sft_acc[(sarm, seed)] = figs["sft"]["accuracy"]
            if template == "think":
                if "base" in s.arms:
                    runs.setdefault("base", {})[seed] = figs["base"]
                runs.setdefault("sft", {})[seed] = {**figs["sft"], "wall_seconds": wall}
            else:
                runs.setdefault("sft_zero", {})[seed] = {**figs["sft"], "wall_seconds": wall}
    lambdas = meta["lambda_by_arm"]
    for arm, template in meta["rl_arms"].items():
        sarm = "sft" if template == "think" else "sft_zero"
        upr = s.updates_per_rollout
        for seed in s.seeds:
            rd = run_dir(s, arm, seed)
            figs = report.rl_run_figures(report.read_metrics(rd), prompts_per_step=s.prompts_per_step,
                                         group_size=s.group_size, updates_per_rollout=upr,
                                         start_accuracy=sft_acc.get((sarm, seed)),
                                         lambda_attn=lambdas.get(arm, 0.0))
            figs["wall_seconds"] = json.loads((rd / "done.json").read_text())["wall_seconds"]
            runs.setdefault(arm, {})[seed] = figs
    teacher = None
    if meta["teacher"]:
        rd = run_dir(s, "teacher", 0)
        rows = report.read_metrics(rd)
        last = [r for r in rows if "eval/accuracy" in r][-1]
        teacher = {"preset": s.teacher_preset, "sft_epochs": s.teacher_sft_epochs, "accuracy": last["eval/accuracy"],
                   "format": last.get("eval/format"), "per_task": report.per_task(last),
                   "optimizer_steps": max(r["step"] for r in rows),
                   "sft_wall_seconds": json.loads((rd / "done.json").read_text())["wall_seconds"],
                   "forward_seconds_in_arms": {a: sum(f.get("teacher_seconds") or 0.0 for f in runs[a].values())
                                               for a in TEACHER_ARMS if a in runs}}
    summary = report.aggregate(runs)
    rl = list(meta["rl_arms"])
    equal = {
        "optimizer_steps": {a: sorted({runs[a][k]["optimizer_steps"] for k in runs[a]}) for a in rl},
        "rollout_steps": {a: sorted({runs[a][k]["rollout_steps"] for k in runs[a]}) for a in rl},
    }
    equal["equal"] = (len({tuple(v) for v in equal["optimizer_steps"].values()}) <= 1
                      and len({tuple(v) for v in equal["rollout_steps"].values()}) <= 1)
    comparisons = [c for c in (report.separation(summary, a, "grpo") for a in rl if a != "grpo") if c]
    own_sft = {a: ("sft" if t == "think" else "sft_zero") for a, t in meta["rl_arms"].items()}
    comparisons += [c for c in (report.separation(summary, a, own_sft[a]) for a in rl) if c]
    walls = [json.loads(p.read_text())["wall_seconds"] for p in (Path(s.out) / "runs").glob("*/seed*/done.json")]
    meta = {**meta, "runs_wall_seconds_total": round(sum(walls), 1)}
    return {"settings": asdict(s), **meta, "teacher": teacher, "runs": {a: {str(k): v for k, v in r.items()} for a, r in runs.items()},
            "summary": summary, "equal_compute": equal, "comparisons": comparisons}


def arm_order(results: dict) -> list[str]:
    order = ["base", "sft", "sft_zero", "grpo", "ral", "ral_zero", "kd", "distill", "ral_epochs2"]
    arms = [a for a in order if a in results["summary"]]
    sweep = sorted((a for a in results["summary"] if a.startswith("ral_lam")), key=lambda a: float(a[len("ral_lam"):]))
    return arms + sweep + sorted(a for a in results["summary"] if a not in arms and a not in sweep)


def write_outputs(s: Settings, results: dict) -> None:
    from megatron_ral.logging import plots

    out = Path(s.out)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    arms = arm_order(results)
    lines = [f"# Algorithm comparison at small scale ({len(s.seeds)} seeds, {s.steps} RL steps)\n",
             report.markdown_table(results["summary"], arms),
             f"\nRL arms: {s.prompts_per_step} prompts x G {s.group_size} per step, {s.updates_per_rollout} updates "
             f"per rollout batch, lr {s.rl_lr:g}, {s.steps} steps; think max_new_tokens "
             f"{results['prepare']['think_max_new_tokens']}, answer-only {results['prepare']['answer_max_new_tokens']}. "
             f"lambda_attn {s.lambda_attn:g} (ral, ral_zero, distill); gkd_mu {s.gkd_mu:g} (kd, distill), gamma_attn "
             f"{s.gamma_attn:g} (distill). Gradient columns: each term's gradient norm over the policy term's (weight "
             f"included), measured before the last update of every {grad_interval(s)}th step. "
             f"Equal compute (same optimizer and rollout steps per RL arm): {results['equal_compute']['equal']}. "
             f"Wall time: {results['experiment_seconds'] / 60:.1f} min for this invocation; the runs' own wall "
             f"times add up to {results['runs_wall_seconds_total'] / 60:.1f} min ({s.jobs} at once).\n"]
    t = results.get("teacher")
    if t:
        fwd = ", ".join(f"{a} {v / 60:.1f} min" for a, v in t["forward_seconds_in_arms"].items())
        lines.append(f"Teacher ({t['preset']} preset, think SFT {t['sft_epochs']} epochs, not counted in the equal-"
                     f"compute figures): held-out accuracy {t['accuracy']:.3f}, SFT {t['sft_wall_seconds'] / 60:.1f} "
                     f"min; its passes inside the arms (all seeds): {fwd}.\n")
    sw = results.get("lambda_sweep", {})
    if sw.get("steps"):
        steps = "; ".join(f"lambda {x['lambda_attn']:g}: {x['grad_ratio_attn']:.3g}" if x["grad_ratio_attn"] is not None
                          else f"lambda {x['lambda_attn']:g}: n/a" for x in sw["steps"])
        lines.append(f"Lambda sweep (attention/policy gradient, stop at {sw['target']}): {steps}.\n")
    lines.append("\n## Differences against the seed spread (|diff| > std_a + std_b)\n")
    for c in results["comparisons"]:
        verdict = "exceeds" if c["exceeds_spread"] else "within"
        lines.append(f"- {c['arm']} vs {c['against']}: held-out accuracy {c['diff']:+.3f} ({verdict} the spread "
                     f"{c['spread']:.3f})")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    rl = [a for a in arms if a in results["rl_arms"]]
    rewards = {a: report.band([results["runs"][a][k]["reward_curve"] for k in results["runs"][a]]) for a in rl}
    heldout = {a: report.band([[tuple(p) for p in results["runs"][a][k]["heldout_curve"]]
                               for k in results["runs"][a]]) for a in rl}
    plots.plot_bands(out / "curves.png", [("reward/total (train rollouts)", rewards),
                                          ("held-out accuracy (greedy)", heldout)])
    mass = {a: tuple(results["summary"][a]["vision_mass"]) if "vision_mass" in results["summary"][a] else None
            for a in rl}
    plots.plot_bars(out / "attention.png", "attention mass on vision tokens (response rows)", mass)


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="compare_algorithms.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="experiment directory (reused: finished runs are not rerun)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--algorithms", default=",".join(DEFAULT_ARMS), help=f"arms, from {','.join(ALL_ARMS)}")
    p.add_argument("--steps", type=int, default=Settings.steps, help="RL steps per arm")
    p.add_argument("--records", type=int, default=Settings.records, help="synthetic records (30%% held out)")
    p.add_argument("--sft-epochs", type=int, default=Settings.sft_epochs)
    p.add_argument("--prompts-per-step", type=int, default=Settings.prompts_per_step)
    p.add_argument("--group-size", type=int, default=Settings.group_size, help="G, rollouts per prompt")
    p.add_argument("--lr", type=float, default=Settings.rl_lr, help="RL learning rate")
    p.add_argument("--eval-points", type=int, default=Settings.eval_points, help="held-out evaluations per RL run")
    p.add_argument("--lambda-attn", default="",
                   help="extra RAL rows, one per value (e.g. 0.5,1,5); a trailing ... continues with powers of 10 "
                        f"until the attention term's gradient norm is {SWEEP_TARGET} of the policy's "
                        f"(at most {SWEEP_MAX_EXTRA} more)")
    p.add_argument("--lambda-ral", type=float, default=Settings.lambda_attn,
                   help="lambda_attn of the ral, ral_zero and distill arms")
    p.add_argument("--grad-points", type=int, default=Settings.grad_points,
                   help="gradient-norm diagnostics per RL run (logging.term_grad_norm_interval = steps / this)")
    p.add_argument("--teacher-preset", default=Settings.teacher_preset, choices=["tiny", "small"],
                   help="the kd / distill arms' teacher (SFT'd once on the think template)")
    p.add_argument("--teacher-sft-epochs", type=int, default=Settings.teacher_sft_epochs)
    p.add_argument("--gkd-mu", type=float, default=Settings.gkd_mu, help="GKD weight of the kd and distill arms")
    p.add_argument("--gamma-attn", type=float, default=Settings.gamma_attn,
                   help="weight of the attention JSD to the teacher (distill arm)")
    p.add_argument("--ral-epochs2", action="store_true", help="extra row: RAL with 2 epochs over one mini-batch")
    p.add_argument("--think-tokens", type=int, default=None,
                   help="max_new_tokens of the think template (default: measured from the think traces)")
    p.add_argument("--nproc", type=int, default=1, choices=(1, 2), help="processes per run (2: torchrun, gloo)")
    p.add_argument("--jobs", type=int, default=Settings.jobs, help="runs at once (each one process, one thread)")
    a = p.parse_args(argv)
    arms = [x.strip() for x in a.algorithms.split(",") if x.strip()]
    bad = [x for x in arms if x not in ALL_ARMS]
    if bad:
        p.error(f"--algorithms: unknown arm {bad[0]!r} (known: {', '.join(ALL_ARMS)})")
    if a.seeds < 1 or a.steps < 1 or a.jobs < 1:
        p.error("--seeds, --steps and --jobs must be >= 1")
    values = [v.strip() for v in a.lambda_attn.split(",") if v.strip()]
    cont = bool(values) and values[-1] == "..."
    try:
        sweep = [float(v) for v in (values[:-1] if cont else values)]
    except ValueError:
        p.error(f"--lambda-attn: numbers separated by commas, optionally ending in ... (got {a.lambda_attn!r})")
    if any(v <= 0 for v in sweep) or (cont and not sweep):
        p.error("--lambda-attn: values must be > 0, and ... needs at least one value before it")
    if a.grad_points < 1 or a.teacher_sft_epochs < 1:
        p.error("--grad-points and --teacher-sft-epochs must be >= 1")
    return Settings(out=str(Path(a.out).resolve()), seeds=list(range(a.seeds)), arms=arms, steps=a.steps,
                    records=a.records, sft_epochs=a.sft_epochs, prompts_per_step=a.prompts_per_step,
                    group_size=a.group_size, rl_lr=a.lr, lambda_attn=a.lambda_ral, eval_points=a.eval_points,
                    grad_points=a.grad_points, lambda_sweep=sweep, sweep_continue=cont, ral_epochs2=a.ral_epochs2,
                    nproc=a.nproc, jobs=a.jobs, think_tokens=a.think_tokens, teacher_preset=a.teacher_preset,
                    teacher_sft_epochs=a.teacher_sft_epochs, gkd_mu=a.gkd_mu, gamma_attn=a.gamma_attn)


# settings that change what a finished run holds; the others (which arms, seeds, extra rows, jobs) may differ
# between invocations on one directory
RUN_SETTINGS = ("steps", "records", "sft_epochs", "prompts_per_step", "group_size", "updates_per_rollout", "rl_lr",
                "lambda_attn", "eval_points", "grad_points", "nproc", "answer_tokens", "think_tokens",
                "teacher_preset", "teacher_sft_epochs", "gkd_mu", "gamma_attn")


def check_same_settings(s: Settings) -> None:
    """A directory's finished runs are reused, so they must have been made with these settings: the first
    invocation writes DIR/settings.json, a later one with other run settings is refused (one line)."""
    path = Path(s.out) / "settings.json"
    mine = {k: getattr(s, k) for k in RUN_SETTINGS}
    if path.exists():
        theirs = json.loads(path.read_text())
        for k in RUN_SETTINGS:
            if k == "think_tokens" and (mine[k] is None or theirs.get(k) is None):
                continue  # measured from the data once: the recorded value stands
            if k in theirs and theirs[k] != mine[k]:
                from megatron_ral.errors import UsageError

                raise UsageError(f"--{k.replace('_', '-')}: {s.out} holds runs made with {theirs[k]!r}, not "
                                 f"{mine[k]!r}; use another --out (finished runs are reused, so settings cannot mix)")
        if s.think_tokens is None:
            s.think_tokens = theirs.get("think_tokens")
    path.write_text(json.dumps({k: getattr(s, k) for k in RUN_SETTINGS}, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    Path(s.out).mkdir(parents=True, exist_ok=True)
    check_same_settings(s)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stop_children)
    meta = run_all(s)
    check_same_settings(s)   # records the measured think length
    results = collect(s, meta)
    write_outputs(s, results)
    print((Path(s.out) / "results.md").read_text())
    return 0


def cli() -> None:
    """``python tools/experiments/compare_algorithms.py``; a bad flag exits 2 with one line."""
    from megatron_ral.cli.entry import run_main

    run_main("compare_algorithms.py", main)
