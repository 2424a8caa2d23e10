"""The pieces ``train.py``'s loop calls: build a run, resume, one training step, evaluate, save, report.

A :class:`Run` holds what was built once (model chunks, optimizer, schedule, reference, data, step
contexts) and the little state that changes (the count of consecutive skipped steps).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ral.errors import UserError

log = logging.getLogger("megatron_ral.train")

CONSOLE_KEYS = ("reward/total", "reward/accuracy", "reward/format", "loss/sft", "loss/policy", "loss/kl",
                "loss/attn", "attn/jsd_old", "distill/gkd", "distill/attn_jsd_teacher", "response/length_mean",
                "perf/step_s")


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class TrainingStopped(UserError):
    """The run cannot continue (e.g. too many consecutive non-finite steps); the last good checkpoint stays.
    Every rank reaches it at the same step (the skip decision is all-reduced)."""

    same_on_every_rank = True


@dataclass
class Run:
    cfg: object
    info: object
    model_chunks: list
    model: object
    optimizer: object
    scheduler: object
    data: object
    hf_dir: str
    save_dir: str
    weights_source: str
    total_steps: int
    dp_rank: int
    dp_size: int
    dp_group: object
    rl: object = None                  # RLContext (RL algorithms)
    passes: object = None              # PassContext (SFT)
    packing: object = None             # PackingSettings of the training passes (None: padded micro-batches)
    consecutive_skips: int = 0
    last_saved_step: int = -1
    loader_iter: object = None
    extra: dict = field(default_factory=dict)


def _owners(info) -> tuple[bool, bool]:
    """(rollout owner: model-parallel rank 0 of the DP group, loss owner: TP rank 0 of the last stage), both
    on context-parallel rank 0 only (the CP ranks of a group hold the same rollouts and, reduced over the
    group, the same losses)."""
    from megatron.core import parallel_state as ps

    tp0 = ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    return tp0 and ps.is_pipeline_first_stage(ignore_virtual=True), tp0 and ps.is_pipeline_last_stage(ignore_virtual=True)


def old_policy_config(algorithm):
    """The p_old store of the RAL term: algorithm.old_policy_store, old_policy_dtype, old_policy_offload."""
    from megatron_ral.attention.old_policy import OldPolicyConfig

    return OldPolicyConfig(mode=algorithm.old_policy_store, dtype=algorithm.old_policy_dtype,
                           offload=algorithm.old_policy_offload)


def build(cfg, info) -> Run:
    """Model (DDP), reference weights, optimizer + LR schedule, processor and loaders of this rank (and the
    distillation teacher for ral_distill)."""
    from megatron.core import parallel_state as ps

    from megatron_ral.attention.capture import AttentionCapture
    from megatron_ral.inference.loading import hf_files_dir, stop_token_ids
    from megatron_ral.rl import build as B
    from megatron_ral.rl.reference import ReferenceWeights
    from megatron_ral.rl.consistency import LogprobDiffWarning
    from megatron_ral.rl.dynamic_sampling import GroupFilter
    from megatron_ral.rl.rollout import RolloutSettings, load_reward_function
    from megatron_ral.rl.schedule import PassContext
    from megatron_ral.rl.step import RLContext
    from megatron_ral.rl.update import LossSettings

    run_dir = Path(cfg.training.run_dir)
    weights = B.initial_weights(cfg.model, run_dir)
    hf_dir = str(hf_files_dir(weights)) if not cfg.model.hf_path else cfg.model.hf_path
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    dp_group = ps.get_data_parallel_group()
    # the teacher first: an incompatible one is refused before anything of the student is built
    dtype = B.resolve_dtype(cfg.model.dtype)
    teacher = build_teacher_setup(cfg, hf_dir, dtype) if cfg.algorithm.name == "ral_distill" else None
    chunks, model = B.build_policy(cfg, cfg.parallel, weights)
    data = B.build_data(cfg, hf_dir, dp_rank, dp_size)
    total = B.planned_steps(cfg, len(data.train.index))
    optimizer, scheduler = B.build_optimizer(cfg.optimizer, chunks, dtype, cfg.parallel.use_distributed_optimizer,
                                             B.total_optimizer_steps(cfg.algorithm, total))
    run = Run(cfg=cfg, info=info, model_chunks=chunks, model=model, optimizer=optimizer, scheduler=scheduler,
              data=data, hf_dir=hf_dir, save_dir=cfg.checkpoint.save_dir or str(run_dir / "checkpoints"),
              weights_source=str(weights), total_steps=total, dp_rank=dp_rank, dp_size=dp_size, dp_group=dp_group)
    a = cfg.algorithm
    run.packing = packing_settings(cfg, model)
    log.info("training passes: packing %s", "none" if run.packing is None else
             f"{run.packing.kind} (at most {run.packing.max_tokens} tokens per micro-batch)")
    if a.name == "sft":
        run.passes = PassContext(model=chunks)
        return run
    use_attention = a.name in ("ral", "ral_distill") and a.lambda_attn > 0
    tokenizer = data.processor.tokenizer
    rollout_owner, loss_owner = _owners(info)
    run.rl = RLContext(
        passes=PassContext(model=chunks, capture=AttentionCapture(chunks[0]),
                           temperature=cfg.generation.temperature or 1.0),
        model=model, optimizer=optimizer, scheduler=scheduler,
        rollout=RolloutSettings(generation=cfg.generation, group_size=a.rollouts_per_prompt, seed=cfg.training.seed,
                                template=cfg.data.template, accuracy_weight=a.reward_accuracy_weight,
                                format_weight=a.reward_format_weight, adv_eps=a.adv_eps,
                                reward_function=load_reward_function(a.reward_function)),
        loss=LossSettings.from_config(a, cfg.generation, use_attention),
        tokenizer=tokenizer, stop_token_ids=stop_token_ids(hf_dir, tokenizer),
        suppress_token_ids=[model.image_token_id, model.video_token_id], pad_token_id=data.processor.pad_token_id,
        updates_per_rollout=a.updates_per_rollout, epochs_per_rollout=a.epochs_per_rollout,
        micro_batch_size=cfg.training.micro_batch_size, group_filter=GroupFilter.from_config(a),
        packing=run.packing,
        reference=(ReferenceWeights(chunks, a.reference_placement, source=str(weights)) if a.kl_beta > 0 else None),
        old_policy=old_policy_config(a) if use_attention else None,
        logprob_warning=LogprobDiffWarning.for_dtype(a.logprob_diff_warn, DTYPE_NAMES[dtype]),
        teacher=teacher,
        dp_rank=dp_rank, dp_size=dp_size, dp_group=dp_group, tp_group=ps.get_tensor_model_parallel_group(),
        cp_group=ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None,
        rollout_owner=rollout_owner, loss_owner=loss_owner, term_grad_interval=cfg.logging.term_grad_norm_interval,
    )
    return run


def packing_settings(cfg, model):
    """The training passes' packing (``training.packing`` resolved for this model's layer spec), None for
    padded micro-batches."""
    from megatron_ral.rl.packing import PackingSettings, resolve_packing

    cp = cfg.parallel.context_parallel_size
    try:
        kind = resolve_packing(cfg.training.packing, cfg.algorithm.name, model.backend, cp)
    except ValueError as e:
        raise UserError(str(e)) from None
    if kind == "none":
        return None
    return PackingSettings(kind, cfg.training.max_tokens_per_micro_batch, model.rope_config,
                           pad_to_multiple=2 * cp if cp > 1 else 1)


def build_teacher_setup(cfg, student_hf_dir: str, dtype):
    """The distillation teacher (checked against the student, built on this rank's stage) and what the loss
    keeps of it: p_phi rows like p_old when gamma_attn > 0, GKD targets when gkd_mu > 0."""
    from megatron.core import parallel_state as ps

    from megatron_ral.distill.teacher import TeacherConfig, build_teacher
    from megatron_ral.rl.teacher_phase import TeacherSetup
    from megatron_ral.rl.update import LossSettings

    a = cfg.algorithm
    teacher = build_teacher(TeacherConfig.from_config(a), cfg.parallel, student_hf_dir, cfg.training.run_dir,
                            dtype=dtype, backend=cfg.model.layer_spec, attention_backend=cfg.model.attention_backend,
                            rope_text_after_vision=cfg.model.rope_text_after_vision)
    settings = LossSettings.from_config(a, cfg.generation, use_attention=False)
    return TeacherSetup(
        teacher=teacher,
        rows=old_policy_config(a) if a.gamma_attn > 0 else None,
        gkd=settings.gkd if a.gkd_mu > 0 else None, temperature=cfg.generation.temperature or 1.0,
        tp_group=ps.get_tensor_model_parallel_group())


# ---------------------------------------------------------------------------------------------- resume
def _gather_loader_states(run: Run) -> list:
    states = [None] * run.dp_size
    dist.all_gather_object(states, run.data.train.state_dict(), group=run.dp_group)
    return states


def loader_state_for(states: list, rank: int, world: int) -> dict:
    """This DP rank's loader position from the saved positions of every DP rank.

    Same DP size: its own state. Another DP size: every rank restarts at the earliest global position
    not yet consumed by all saved ranks (global position = position x DP + rank within an epoch), so a
    few records may be seen twice but none is skipped."""
    if len(states) == world:
        return states[rank]
    old_world = len(states)
    epoch = min(int(s["epoch"]) for s in states)
    consumed = min(int(s["position"]) * old_world + r if int(s["epoch"]) == epoch else 1 << 62
                   for r, s in enumerate(states))
    position = max(0, -(-(consumed - rank) // world))
    return {"epoch": epoch, "position": position}


def maybe_resume(run: Run, ckpt, cfg) -> int:
    """Load the newest complete checkpoint of the run (at any layout); returns the last completed step."""
    from megatron_ral.checkpoint.rng_state import restore_rng_state

    if not cfg.checkpoint.resume or ckpt.latest() is None:
        return 0
    loaded = ckpt.load(None, run.model_chunks, run.optimizer, run.scheduler)
    state = loaded.state
    if state.get("algorithm") not in (None, cfg.algorithm.name):
        raise UserError(f"checkpoint.resume: {loaded.path} was written by a '{state['algorithm']}' run, this run is "
                        f"'{cfg.algorithm.name}' (use another checkpoint.save_dir, or checkpoint.resume=false)")
    source = state.get("reference_source")
    if source and source != run.weights_source:
        log.warning("resuming: the checkpoint's reference weights came from %s, this run's from %s",
                    source, run.weights_source)
    run.data.train.load_state_dict(loader_state_for(state.get("loaders", [{}]), run.dp_rank, run.dp_size))
    run.consecutive_skips = int(state.get("consecutive_skips", 0))
    if loaded.rank_state is not None:
        restore_rng_state(loaded.rank_state)
    else:
        log.warning("resuming at another parallel layout: random-number streams restart (results are not "
                    "bit-identical to an uninterrupted run)")
    run.last_saved_step = loaded.step
    log.info("resumed from %s (step %d)", loaded.path, loaded.step)
    return loaded.step


def save(run: Run, ckpt, step: int) -> None:
    from megatron_ral.checkpoint.rng_state import capture_rng_state

    if step == run.last_saved_step:
        return
    state = {"step": step, "algorithm": run.cfg.algorithm.name, "loaders": _gather_loader_states(run),
             "reference_source": run.weights_source, "consecutive_skips": run.consecutive_skips,
             "total_steps": run.total_steps}
    path = ckpt.save(step, run.model_chunks, run.optimizer, run.scheduler, state=state, rank_state=capture_rng_state())
    run.last_saved_step = step
    log.info("saved checkpoint %s", path)


# ---------------------------------------------------------------------------------------------- steps
def _next_batch(run: Run):
    if run.loader_iter is None:
        run.loader_iter = iter(run.data.train)
    try:
        return next(run.loader_iter)
    except StopIteration:  # the loader cycles epochs; it ends only when it has no records at all
        raise UserError("data.train_files: the training loader ran out of records") from None


def _check_failures(run: Run) -> None:
    """The data-failure stop rule over every data-parallel rank: the recent failures and draws of all
    shards summed (each rank's loader only counts), so every rank stops at the same step, with one message."""
    from megatron_ral.data.failures import raise_if_too_many

    failed, span = run.data.train.tracker.recent()
    gathered = [None] * run.dp_size
    dist.all_gather_object(gathered, (failed, span), group=run.dp_group)
    raise_if_too_many([f for fs, _ in gathered for f in fs], sum(n for _, n in gathered),
                      run.data.train.tracker.max_fraction, shared=True)


def _data_metrics(run: Run) -> dict:
    from megatron_ral.rl.metrics import MetricSums

    _check_failures(run)
    sums = MetricSums()
    rollout_owner, _ = _owners(run.info)
    if rollout_owner:
        m = run.data.train.metrics()
        sums.add("data/skipped", m.get("data/skipped_total", 0.0), 0.0)
        sums.add("data/samples", m.get("data/samples_total", 0.0), 0.0)
    total = sums.all_reduce()
    return {"data/skipped": total.total("data/skipped"), "data/samples": total.total("data/samples")}


def _sft_step(run: Run, batch):
    import time

    from megatron_ral.rl.metrics import MetricSums
    from megatron_ral.rl.sft import sft_step
    from megatron_ral.rl.step import loss_scale_metrics

    t0 = time.perf_counter()
    outcome, sums = sft_step(run.passes, batch, run.optimizer, run.scheduler, run.cfg.training.micro_batch_size,
                             run.data.processor.pad_token_id, run.dp_group, packing=run.packing)
    _, loss_owner = _owners(run.info)
    owned = MetricSums()
    if loss_owner:
        owned.merge(sums)
    total = owned.all_reduce()
    failed = not outcome.stepped and not outcome.loss_scale_skipped
    metrics = {"loss/sft": total.total("loss/sft"), "train/grad_norm": outcome.grad_norm, "train/lr": outcome.lr,
               "train/skipped_updates": 1.0 if failed else 0.0,
               **loss_scale_metrics(run.optimizer, int(outcome.loss_scale_skipped), outcome.loss_scale),
               "perf/step_s": time.perf_counter() - t0}
    return metrics, (1, int(failed), int(outcome.loss_scale_skipped))


def train_step(run: Run, cfg, step: int) -> dict:
    """One step (SFT or RL); counts non-finite skips and stops after too many in a row.

    A step with at least one update resets the count; a step whose updates all failed (non-finite loss or
    gradient) adds one; a step whose updates were all fp16 loss-scale overflows (the scaler backs off and
    the next step retries) leaves it as it is."""
    from megatron_ral.rl.step import rl_step

    batch = _next_batch(run)
    if cfg.algorithm.name == "sft":
        metrics, (updates, failed, scale_skips) = _sft_step(run, batch)
    else:
        result = rl_step(run.rl, batch, step, next_batch=lambda: _next_batch(run))
        metrics = result.metrics
        updates, failed, scale_skips = result.updates, result.skipped_updates, result.loss_scale_skips
        run.extra["samples"] = result.samples
    metrics.update(_data_metrics(run))
    if updates - failed - scale_skips > 0:
        run.consecutive_skips = 0
    elif failed:
        run.consecutive_skips += 1
        log.warning("step %d: non-finite loss or gradient, no update (%d in a row)", step, run.consecutive_skips)
        if run.consecutive_skips >= cfg.training.max_consecutive_skips:
            raise TrainingStopped(
                f"training.max_consecutive_skips: {run.consecutive_skips} steps in a row had a non-finite loss or "
                f"gradient (lower optimizer.lr or check the data); the last good checkpoint is kept in {run.save_dir}")
    else:
        log.info("step %d: fp16 gradient overflow, no update (loss scale now %s)", step,
                 _fmt(metrics.get("train/loss_scale", math.nan)))
    return metrics


def evaluate_now(run: Run, cfg) -> dict:
    """eval/* metrics on data.eval_files (greedy)."""
    import dataclasses

    from megatron_ral.inference.loading import stop_token_ids
    from megatron_ral.rl.build import eval_loader
    from megatron_ral.rl.evaluate import evaluate

    loader = eval_loader(run.data, cfg, run.dp_rank, run.dp_size)
    if loader is None:
        return {}
    rollout_owner, _ = _owners(run.info)
    tok = run.data.processor.tokenizer
    gen = dataclasses.replace(cfg.generation, temperature=0.0)
    result = evaluate(run.model_chunks[0].module if hasattr(run.model_chunks[0], "module") else run.model_chunks[0],
                      loader, tok, gen, template=cfg.data.template, stop_token_ids=stop_token_ids(run.hf_dir, tok),
                      suppress_token_ids=[run.model.image_token_id, run.model.video_token_id],
                      image_token_id=run.model.image_token_id, video_token_id=run.model.video_token_id,
                      accuracy_weight=cfg.algorithm.reward_accuracy_weight,
                      format_weight=cfg.algorithm.reward_format_weight, owner=rollout_owner)
    return result.metrics()


# ---------------------------------------------------------------------------------------------- console
def progress_bar(run: Run, start: int):
    from megatron_ral.logging.progress import progress_enabled

    import sys

    if run.info.rank != 0 or not (run.cfg.logging.progress and progress_enabled()) or not sys.stderr.isatty():
        return None  # not a terminal (CI, SLURM logs): the log lines every logging.log_interval steps report
    from tqdm.auto import tqdm

    return tqdm(total=run.total_steps, initial=start - 1, desc=run.cfg.algorithm.name, unit="step", dynamic_ncols=True,
                leave=False, mininterval=1.0)


def _fmt(v: float) -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4g}"


def report(run: Run, cfg, bar, step: int, metrics: dict) -> None:
    if run.info.rank != 0:
        return
    shown = {k.split("/")[-1]: _fmt(metrics[k]) for k in CONSOLE_KEYS if k in metrics}
    if bar is not None:
        bar.update(1)
        bar.set_postfix(shown, refresh=False)
    if step % cfg.logging.log_interval == 0 or step == run.total_steps:
        line = " ".join(f"{k}={v}" for k, v in shown.items())
        evals = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if k in ("eval/accuracy", "eval/format"))
        log.info("step %d/%d %s %s", step, run.total_steps, line, evals)


def report_eval(run: Run, metrics: dict) -> None:
    if run.info.rank == 0 and metrics:
        log.info("evaluation: accuracy=%s format=%s over %d records", _fmt(metrics.get("eval/accuracy", 0.0)),
                 _fmt(metrics.get("eval/format", 0.0)), int(metrics.get("eval/count", 0)))
