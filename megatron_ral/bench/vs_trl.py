"""Throughput of one GRPO step: this package's trainer against TRL's GRPOTrainer, same work on both sides.

    assets = make_assets(root)                        # small-preset checkpoint (HF + Megatron), image records
    ours = run_ours(assets, settings, warmup, steps)  # each side in its own process (see tools/bench/vs_trl.py)
    trl = run_trl(assets, settings, warmup, steps)
    summary = compare([ours], [trl], settings)

Both sides: the same fp32 weights, the same image prompts in the same order (P per step), the same
reward (``rl.rewards.score``), G, temperature, max new tokens, KL beta, clip range, loss aggregation,
optimizer steps per rollout batch and learning rate, one process on the CPU with the same number of
torch threads. By default the stop tokens are never sampled on either side, so every response is
exactly ``max_new_tokens`` long and both sides generate, score and train on the same number of tokens
(a random model's stop rate would otherwise make the work differ by chance).

A step is one rollout batch: data, generation, scoring, old-policy pass (when the updates reuse the
rollouts), reference pass, ``updates_per_rollout`` optimizer steps. Reported per side: prompts/s over
the measured steps (after ``warmup`` steps) in wall time and in this process's CPU time (the machine
may be shared; with one thread, CPU time is what the step itself cost), and the phase breakdown.

TRL's phases are timed by wrapping its own methods: ``_generate`` (tokenization, HF generate, decode),
``_calculate_rewards``, the no-grad ``_get_per_token_logps_and_entropies`` calls (old pass: policy,
reference pass: reference model), the rest of ``_generate_and_score_completions`` (processor call for the
loss inputs, padding, advantages) and everything else of the step (data loading, the loss forward and
backward passes, optimizer steps) as ``update``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from megatron_ral.bench.trl_peer import GRPOSettings
from megatron_ral.cli.entry import run_main
from megatron_ral.errors import UserError


@dataclass(frozen=True)
class Assets:
    hf_dir: str
    mcore_dir: str
    records_file: str
    media_root: str


def make_assets(root: str | os.PathLike, preset: str = "small", records: int = 64, image_size: int = 224,
                seed: int = 0) -> Assets:
    """A random ``preset`` Qwen2.5-VL checkpoint (HF, and converted to Megatron), and ``records`` synthetic
    image records (square images of ``image_size`` pixels), written once under ``root``."""
    from megatron_ral.checkpoint.convert import hf_to_megatron
    from megatron_ral.data.synthetic import SyntheticSpec, make_synthetic_dataset
    from megatron_ral.tiny.checkpoint import make_tiny_checkpoint

    root = Path(root)
    hf, mcore, data = root / f"hf_{preset}", root / f"mcore_{preset}", root / f"images_{image_size}_{records}"
    if not (hf / "config.json").is_file():
        make_tiny_checkpoint(hf, preset=preset, seed=seed)
    if not (mcore / "metadata.json").is_file():
        hf_to_megatron(hf, mcore, overwrite=True, progress=False)
    if not (data / "train.json").is_file():
        spec = SyntheticSpec(height=image_size, width=image_size, image_fraction=1.0, heldout_fraction=0.0)
        make_synthetic_dataset(str(data), records, seed=seed, spec=spec)
    return Assets(str(hf), str(mcore), str(data / "train.json"), str(data))


def _stop_ids(hf_dir: str) -> list[int]:
    from transformers import AutoTokenizer

    from megatron_ral.inference.loading import stop_token_ids

    return [int(i) for i in stop_token_ids(hf_dir, AutoTokenizer.from_pretrained(hf_dir))]


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _summary(step_wall: list[float], step_cpu: list[float], prompts_per_step: int, phases: list[dict],
             lengths: list[float]) -> dict:
    wall, cpu = sum(step_wall), sum(step_cpu)
    n = len(step_wall)
    out = {
        "measured_steps": n,
        "prompts_per_s": prompts_per_step * n / wall,
        "prompts_per_cpu_s": prompts_per_step * n / cpu,
        "step_s_mean": wall / n, "step_s_median": statistics.median(step_wall),
        "step_cpu_s_mean": cpu / n, "step_s": [round(x, 3) for x in step_wall],
        "response_length_mean": sum(lengths) / len(lengths) if lengths else float("nan"),
    }
    keys = sorted({k for p in phases for k in p})
    out["phases_s_mean"] = {k: sum(p.get(k, 0.0) for p in phases) / n for k in keys}
    return out


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------- ours
def run_ours(assets: Assets, s: GRPOSettings, warmup: int, steps: int, micro_batch_size: int | None = None,
             run_dir: str = "runs/vs_trl/ours", allow_stop: bool = False) -> dict:
    """``steps`` measured RL steps (after ``warmup``) of our trainer (``rl.trainer.build`` + ``rl.step.rl_step``)."""
    from megatron_ral.bench.trl_peer import our_config
    from megatron_ral.config import validate
    from megatron_ral.platform import destroy, initialize
    from megatron_ral.rl import trainer as T
    from megatron_ral.rl.step import rl_step

    mbs = micro_batch_size or s.sequences_per_minibatch
    cfg = our_config(s, assets.mcore_dir, assets.records_file, assets.media_root, mbs, run_dir, hf_dir=assets.hf_dir)
    validate(cfg, world_size=1, cuda_available=torch.cuda.is_available())
    load_before = _load()
    t0 = time.perf_counter()
    info = initialize(cfg.parallel, seed=cfg.training.seed)
    try:
        run = T.build(cfg, info)
        if not allow_stop:   # responses of exactly max_new_tokens (see the module docstring)
            run.rl.suppress_token_ids = list(run.rl.suppress_token_ids) + _stop_ids(assets.hf_dir)
        setup_s = time.perf_counter() - t0
        loader = iter(run.data.train)
        walls, cpus, phases, lengths = [], [], [], []
        for step in range(1, warmup + steps + 1):
            w0, c0 = _clock()
            batch = next(loader)
            data_s = time.perf_counter() - w0
            result = rl_step(run.rl, batch, step)
            w1, c1 = _clock()
            if step <= warmup:
                continue
            m = result.metrics
            parts = {"data": data_s, "generate_and_score": m["perf/gen_s"], "old_pass": m["perf/old_pass_s"],
                     "ref_pass": m["perf/ref_pass_s"], "update": m["perf/update_s"]}
            parts["other"] = (w1 - w0) - sum(parts.values())
            walls.append(w1 - w0)
            cpus.append(c1 - c0)
            phases.append(parts)
            lengths.append(m["response/length_mean"])
        out = _summary(walls, cpus, s.prompts_per_step, phases, lengths)
        out.update({"setup_s": setup_s, "threads": torch.get_num_threads(), "micro_batch_size": mbs,
                    "load_avg_before": load_before, "load_avg_after": _load(),
                    "optimizer": "megatron-core Adam (distributed optimizer, DP=1)",
                    "last_step_metrics": {k: result.metrics[k] for k in ("reward/total", "loss/policy", "loss/kl",
                                                                         "train/grad_norm")}})
        return out
    finally:
        destroy()


# ---------------------------------------------------------------------------------------------- TRL
def _timed_trainer_class():
    """GRPOTrainer with its phases timed (wrapping its own methods; nothing else changes)."""
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        def __init__(self, *args, **kwargs):
            self.rollout_phases: list[dict] = []
            self.rollout_lengths: list[float] = []
            super().__init__(*args, **kwargs)

        def _add(self, key: str, seconds: float) -> None:
            if self.rollout_phases:
                self.rollout_phases[-1][key] = self.rollout_phases[-1].get(key, 0.0) + seconds

        def _generate_and_score_completions(self, inputs):
            if not self.model.training:
                return super()._generate_and_score_completions(inputs)
            self.rollout_phases.append({})
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self._add("rollout_total", time.perf_counter() - t0)
            self.rollout_lengths.append(float(out["completion_mask"].sum(dim=1).float().mean()))
            return out

        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            self._add("generate", time.perf_counter() - t0)
            return out

        def _calculate_rewards(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super()._calculate_rewards(*args, **kwargs)
            self._add("score", time.perf_counter() - t0)
            return out

        def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
            if torch.is_grad_enabled():   # the loss forward (inside the update)
                return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
            t0 = time.perf_counter()
            out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
            self._add("ref_pass" if model is self.ref_model else "old_pass", time.perf_counter() - t0)
            return out

    return TimedGRPOTrainer


def _step_clock_callback(stamps: list):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            stamps.append(_clock())

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(_clock())

    return StepClock()


def run_trl(assets: Assets, s: GRPOSettings, warmup: int, steps: int, output_dir: str = "runs/vs_trl/trl",
            allow_stop: bool = False, attn_implementation: str = "sdpa") -> dict:
    """``steps`` measured rollout batches (after ``warmup``) of TRL's GRPOTrainer on the same work
    (``attn_implementation``: transformers' attention for the policy and reference; sdpa is its default)."""
    from megatron_ral.bench import trl_peer

    trl = trl_peer.require_trl()
    load_before = _load()
    t0 = time.perf_counter()
    rollouts = warmup + steps
    records = trl_peer.read_records(assets.records_file)
    needed = rollouts * s.prompts_per_step
    if len(records) < needed:
        raise ValueError(f"{assets.records_file}: {len(records)} records, {needed} needed")
    rows = trl_peer.trl_rows(records[:needed], assets.media_root, s.template)
    model = trl_peer.load_hf_policy(assets.hf_dir, attn_implementation=attn_implementation)
    stamps: list[tuple[float, float]] = []
    suppress = [model.config.image_token_id, model.config.video_token_id]
    if not allow_stop:
        suppress += _stop_ids(assets.hf_dir)
    trainer = trl_peer.build_trainer(
        model, s, rows, output_dir, max_steps=rollouts * s.updates_per_rollout, trainer_cls=_timed_trainer_class(),
        callbacks=[_step_clock_callback(stamps)], suppress_token_ids=suppress)
    setup_s = time.perf_counter() - t0
    trainer.train()
    u = s.updates_per_rollout
    if len(stamps) != 1 + rollouts * u or len(trainer.rollout_phases) != rollouts:
        raise RuntimeError(f"TRL ran {len(stamps) - 1} optimizer steps and {len(trainer.rollout_phases)} rollouts, "
                           f"expected {rollouts * u} and {rollouts}")
    walls, cpus, phases = [], [], []
    for k in range(warmup, rollouts):
        (w0, c0), (w1, c1) = stamps[k * u], stamps[(k + 1) * u]
        p = dict(trainer.rollout_phases[k])
        total = p.pop("rollout_total")
        named = {"generate_and_score": p.get("generate", 0.0) + p.get("score", 0.0),
                 "old_pass": p.get("old_pass", 0.0), "ref_pass": p.get("ref_pass", 0.0)}
        named["rollout_other"] = total - sum(named.values())
        named["update"] = (w1 - w0) - total
        walls.append(w1 - w0)
        cpus.append(c1 - c0)
        phases.append(named)
    out = _summary(walls, cpus, s.prompts_per_step, phases, trainer.rollout_lengths[warmup:])
    out.update({"setup_s": setup_s, "threads": torch.get_num_threads(), "trl_version": trl.__version__,
                "attn_implementation": trainer.model.config._attn_implementation,
                "load_avg_before": load_before, "load_avg_after": _load(),
                "optimizer": f"torch AdamW ({trainer.args.optim})",
                "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
                "steps_per_generation": trainer.args.steps_per_generation,
                "num_iterations": trainer.args.num_iterations, "loss_type": trainer.args.loss_type})
    return out


def compare(ours_runs: list[dict], trl_runs: list[dict], s: GRPOSettings, goal: float = 1.5) -> dict:
    """The side-by-side summary over repeated runs of each side (alternating, each in a fresh process):
    the best run of each (the least disturbed on a shared machine) and ours / TRL in wall and CPU time."""
    ours = max(ours_runs, key=lambda r: r["prompts_per_s"])
    trl = max(trl_runs, key=lambda r: r["prompts_per_s"])
    ratio = ours["prompts_per_s"] / trl["prompts_per_s"]
    ratio_cpu = ours["prompts_per_cpu_s"] / trl["prompts_per_cpu_s"]
    runs = {name: {"prompts_per_s": [round(r["prompts_per_s"], 4) for r in rs],
                   "prompts_per_cpu_s": [round(r["prompts_per_cpu_s"], 4) for r in rs]}
            for name, rs in (("megatron_ral", ours_runs), ("trl", trl_runs))}
    return {"settings": asdict(s), "megatron_ral": ours, "trl": trl, "runs": runs,
            "speedup_prompts_per_s": round(ratio, 3), "speedup_prompts_per_cpu_s": round(ratio_cpu, 3),
            "goal": f"ours >= {goal}x TRL prompts/s", "goal_met": ratio >= goal}


# --- the command (tools/bench/vs_trl.py) ----------------------------------

PARTS = ("loss", "ours", "trl")


def parse_args(argv):
    from megatron_ral.bench.trl_peer import LOSS_TYPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", default=None, help="assets and run directories; a temporary directory when not given")
    p.add_argument("--preset", default="small", choices=["tiny", "small"], help="tiny-checkpoint preset of both sides")
    p.add_argument("--records", type=int, default=64, help="synthetic image records written")
    p.add_argument("--image-size", type=int, default=224, help="side of the square synthetic images (pixels)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per rollout batch (P)")
    p.add_argument("--group", type=int, default=8, help="responses per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="response length cap")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    p.add_argument("--updates", type=int, default=2, help="optimizer steps per rollout batch")
    p.add_argument("--epochs", type=int, default=1, help="passes over the rollout batch (updates = mini-batches x epochs)")
    p.add_argument("--kl-beta", type=float, default=0.04, help="weight of the k3 KL term to the reference")
    p.add_argument("--clip-eps", type=float, default=0.2, help="clip range of the ratio (both sides)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate")
    p.add_argument("--loss-aggregation", default="seq_mean_token_mean", choices=sorted(LOSS_TYPES),
                   help="our token aggregation; TRL gets the matching loss_type")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="our micro-batch; a whole mini-batch when not given, as TRL's per-device batch")
    p.add_argument("--warmup", type=int, default=1, help="rollout batches left out of the figures")
    p.add_argument("--steps", type=int, default=3, help="measured rollout batches")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each side")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each side, alternating (the best of each is compared; all are listed)")
    p.add_argument("--trl-attn", default="sdpa", choices=["sdpa", "eager"],
                   help="transformers attention of TRL's policy and reference (sdpa: transformers' default)")
    p.add_argument("--allow-stop", action="store_true",
                   help="let responses stop at a stop token (default: exactly max-new-tokens on both sides)")
    p.add_argument("--loss-prompts", type=int, default=2, help="prompts of the loss-equality batch")
    p.add_argument("--loss-group", type=int, default=4, help="responses per prompt of the loss-equality batch")
    p.add_argument("--loss-max-new-tokens", type=int, default=32, help="response length cap of the loss-equality batch")
    p.add_argument("--loss-micro-batch-size", type=int, default=3, help="our micro-batches of the loss batch")
    p.add_argument("--seed", type=int, default=0, help="weights, data and sampling seed")
    p.add_argument("--skip-throughput", action="store_true", help="only the loss-equality check")
    p.add_argument("--skip-loss", action="store_true", help="only the throughput comparison")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--part", choices=PARTS, default=None, help=argparse.SUPPRESS)  # one side, in a child process
    return p.parse_args(argv)


def settings(args):
    from megatron_ral.bench.trl_peer import GRPOSettings

    s = GRPOSettings(prompts_per_step=args.prompts, group_size=args.group, updates_per_rollout=args.updates,
                     epochs_per_rollout=args.epochs, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, kl_beta=args.kl_beta, clip_eps=args.clip_eps, lr=args.lr,
                     loss_aggregation=args.loss_aggregation, seed=args.seed)
    s.check()
    return s


def run_part(args) -> dict:
    """One part in this process (the parent starts one process per part)."""
    import torch

    import megatron_ral.bench.vs_trl as B

    torch.set_num_threads(args.threads)
    assets = B.make_assets(args.work, args.preset, args.records, args.image_size, args.seed)
    s = settings(args)
    if args.part == "ours":
        return B.run_ours(assets, s, args.warmup, args.steps, args.micro_batch_size,
                          run_dir=os.path.join(args.work, "run_ours"), allow_stop=args.allow_stop)
    if args.part == "trl":
        return B.run_trl(assets, s, args.warmup, args.steps, output_dir=os.path.join(args.work, "run_trl"),
                         allow_stop=args.allow_stop, attn_implementation=args.trl_attn)
    from megatron_ral.bench.trl_parity import LossCase, compare_losses
    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.platform import destroy, initialize

    loss_s = replace(s, prompts_per_step=args.loss_prompts, group_size=args.loss_group,
                     max_new_tokens=args.loss_max_new_tokens)
    initialize(ParallelConfig(), seed=args.seed)
    try:
        return compare_losses(LossCase(assets.hf_dir, assets.mcore_dir, assets.records_file, assets.media_root,
                                       micro_batch_size=args.loss_micro_batch_size, seed=args.seed), loss_s)
    finally:
        destroy()


def child_argv(args) -> list[str]:
    """The parsed flags again, for a child process (everything but the parent-only ones)."""
    out = []
    for key, value in vars(args).items():
        if key in ("work", "out", "part", "skip_throughput", "skip_loss", "repeats"):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out += [flag] if value else []
        elif value is not None:
            out += [flag, str(value)]
    return out


def child(args, part: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TRL_EXPERIMENTAL_SILENCE="1", WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = os.path.join(args.work, f"{part}.log")
    cmd = [sys.executable, "-m", "megatron_ral.bench.vs_trl", *child_argv(args), "--work", args.work, "--part", part]
    print(f"vs_trl: running {part} (log: {log})", file=sys.stderr, flush=True)
    with open(log, "w") as err:
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    if done.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"the {part} part failed (exit {done.returncode}); end of {log}:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from megatron_ral.bench.trl_peer import require_trl

    require_trl()
    if args.part is not None:
        print(json.dumps(run_part(args)))
        return 0
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="vs_trl_")
        args.work = tmp.name
    try:
        import megatron_ral.bench.vs_trl as B

        s = settings(args)
        B.make_assets(args.work, args.preset, args.records, args.image_size, args.seed)
        needed = (args.warmup + args.steps) * args.prompts
        if not args.skip_throughput and args.records < needed:
            raise UserError(f"--records {args.records}: the throughput part needs (warmup + steps) x prompts = {needed}")
        result = {"command": "python tools/bench/vs_trl.py " + " ".join(argv)}
        if not args.skip_loss:
            result["loss_equality"] = child(args, "loss")
        if not args.skip_throughput:
            ours, trl = [], []
            for _ in range(args.repeats):
                ours.append(child(args, "ours"))
                trl.append(child(args, "trl"))
            result["throughput"] = B.compare(ours, trl, s)
        else:
            result["settings"] = asdict(s)
    finally:
        if tmp is not None:
            tmp.cleanup()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def cli() -> None:
    """``python tools/bench/vs_trl.py`` and ``python -m megatron_ral.bench.vs_trl``."""
    run_main("vs_trl.py", main)


if __name__ == "__main__":
    cli()
