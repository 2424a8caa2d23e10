"""``megatron-ral-plan-memory --student 7b [--teacher 32b] --tp T --pp P --cp C --dp D ...`` (tools/plan_memory.py).

Prints the per-rank memory of a run (one column per pipeline stage) and whether it fits; ``--gpus N`` lists
the layouts of N GPUs instead, best first. The formulas are in megatron_ral.rl.memory_plan and
megatron_ral.models.qwen25vl.memory; nothing here imports torch.
"""

from __future__ import annotations

import json
from typing import NoReturn, Sequence

from megatron_ral.cli import input_checks as check
from megatron_ral.cli.arguments import ToolParser, add_json
from megatron_ral.cli.entry import prog_name, run_main
from megatron_ral.errors import UsageError
from megatron_ral.models.qwen25vl.arch import UnsupportedCheckpointError
from megatron_ral.models.qwen25vl.memory import PRESETS, load_shape, tokens_per_frame
from megatron_ral.rl.memory_plan import GIB, Layout, MemoryPlan, Settings, Workload, layout_problems, plan_memory

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DEFAULT_PIXELS = 128 * 28 * 28  # data.video_max_pixels (the paper's video frames)


def parser() -> ToolParser:
    p = ToolParser(prog=prog_name("plan_memory.py"), description=(
        "Per-rank device memory of a GRPO / RAL / distillation run (weights, gradients, optimizer state, reference,\n"
        "teacher, p_old store, KV cache, activations with and without recompute) and whether it fits.\n"
        f"Models: a preset ({', '.join(PRESETS)}: the released Qwen2.5-VL shapes), an HF directory or its config.json."))
    p.add_argument("--student", required=True, help="the trained model: preset, HF directory or config.json")
    p.add_argument("--teacher", default=None, help="distillation teacher (same forms); omitted: no teacher")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (teacher too)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size (teacher too)")
    p.add_argument("--cp", type=int, default=1, help="context parallel size")
    p.add_argument("--dp", type=int, default=1, help="data parallel size")
    p.add_argument("--pp-split", default=None, help="student layers per pipeline stage, comma-separated "
                                                      "(default: balanced)")
    p.add_argument("--teacher-pp-split", default=None, help="teacher layers per pipeline stage (default: balanced)")
    p.add_argument("--gpus", type=int, default=None, help="list the layouts of this many GPUs (ignores "
                                                           "--tp/--pp/--cp/--dp)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="with --gpus: largest TP (one node)")
    p.add_argument("--top", type=int, default=10, help="with --gpus: layouts shown")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU, GiB")
    p.add_argument("--reserve-gib", type=float, default=4.0, help="per GPU memory not available to tensors "
                                                                  "(CUDA context, NCCL, fragmentation), GiB")
    p.add_argument("--frames", type=int, default=128, help="video frames per prompt (0: no video)")
    p.add_argument("--pixels-per-frame", type=int, default=DEFAULT_PIXELS,
                   help="pixels of one frame after resizing (128*28*28 = 100352 is data.video_max_pixels)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="text tokens of a prompt (template, question)")
    p.add_argument("--response-len", type=int, default=512, help="response length R (generation.max_new_tokens)")
    p.add_argument("--rollouts", type=int, default=8, help="responses per prompt G (algorithm.rollouts_per_prompt)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per step, global "
                                                                   "(training.prompts_per_step)")
    p.add_argument("--minibatches", type=int, default=2, help="mini-batches per rollout batch (algorithm."
                                                              "updates_per_rollout / epochs_per_rollout)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per micro-batch "
                                                                   "(training.micro_batch_size)")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16", help="parameter / activation dtype")
    p.add_argument("--spec", choices=("te", "local"), default="te", help="layer spec (te: Transformer Engine, GPU)")
    p.add_argument("--sequence-parallel", action="store_true", help="sequence parallelism (TE spec, TP > 1)")
    p.add_argument("--no-distributed-optimizer", action="store_true",
                   help="optimizer state not sharded over DP x CP (parallel.use_distributed_optimizer false)")
    p.add_argument("--reference", choices=("device", "host", "none"), default="device",
                   help="reference weights: device, host (algorithm.reference_placement) or none (kl_beta 0)")
    p.add_argument("--old-policy-store", choices=("qk", "rows", "none"), default="qk",
                   help="p_old store (algorithm.old_policy_store); none: GRPO without the attention loss")
    p.add_argument("--old-policy-offload", action="store_true", help="p_old and teacher rows in host memory "
                                                                      "(algorithm.old_policy_offload)")
    p.add_argument("--kv-cache-tokens", type=int, default=65536, help="KV-cache budget per rank "
                                                                      "(generation.kv_cache_tokens)")
    p.add_argument("--no-teacher-logits", action="store_true", help="distillation without the logit term "
                                                                    "(gkd_mu 0): no teacher logits")
    add_json(p, "the plan")
    return p


def _split(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text}: expected comma-separated integers, e.g. 14,14") from None


def _model(spec: str | None, flag: str):
    if spec is None:
        return None
    try:
        return load_shape(spec)
    except UnsupportedCheckpointError as e:
        raise UsageError(f"{flag}: {e}") from None


def _inputs(args) -> tuple[Workload, Settings]:
    for flag, value, low in (("--tp", args.tp, 1), ("--pp", args.pp, 1), ("--cp", args.cp, 1), ("--dp", args.dp, 1),
                             ("--frames", args.frames, 0), ("--prompt-tokens", args.prompt_tokens, 0),
                             ("--response-len", args.response_len, 1), ("--rollouts", args.rollouts, 1),
                             ("--prompts-per-step", args.prompts_per_step, 1), ("--minibatches", args.minibatches, 1),
                             ("--micro-batch-size", args.micro_batch_size, 1), ("--kv-cache-tokens",
                                                                                args.kv_cache_tokens, 1),
                             ("--gpus-per-node", args.gpus_per_node, 1), ("--top", args.top, 1),
                             ("--reserve-gib", args.reserve_gib, 0)):
        check.at_least(value, low, flag)
    if args.gpu_mem_gib <= args.reserve_gib:
        raise UsageError(f"--gpu-mem-gib {args.gpu_mem_gib}: must exceed --reserve-gib {args.reserve_gib}")
    if args.frames and tokens_per_frame(args.pixels_per_frame) < 1:
        raise UsageError(f"--pixels-per-frame {args.pixels_per_frame}: below one 28x28 cell (784 pixels)")
    if args.sequence_parallel and (args.spec != "te" or args.tp < 2):
        raise UsageError("--sequence-parallel: needs --spec te and --tp > 1")
    work = Workload(frames=args.frames, pixels_per_frame=args.pixels_per_frame, response_len=args.response_len,
                    rollouts=args.rollouts, prompt_tokens=args.prompt_tokens, prompts_per_step=args.prompts_per_step,
                    minibatches=args.minibatches, micro_batch_size=args.micro_batch_size)
    settings = Settings(dtype_bytes=DTYPE_BYTES[args.dtype], spec=args.spec, sequence_parallel=args.sequence_parallel,
                        distributed_optimizer=not args.no_distributed_optimizer, reference=args.reference,
                        old_policy_store=args.old_policy_store, old_policy_offload=args.old_policy_offload,
                        kv_cache_tokens=args.kv_cache_tokens, gkd=not args.no_teacher_logits,
                        reserve_gib=args.reserve_gib)
    return work, settings


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


ROWS = [
    ("resident", "weights", "weights (+ vision tower on stage 0)"),
    ("resident", "gradients", "gradients (fp32 buffer)"),
    ("resident", "optimizer", "optimizer state (Adam)"),
    ("resident", "reference", "reference weights"),
    ("resident", "teacher", "teacher weights"),
    ("resident", "p_old_store", "p_old store"),
    ("resident", "teacher_store", "teacher rows store"),
    ("phases", "generation", "generation: KV cache + prefill"),
    ("phases", "vision", "vision tower + features"),
    ("phases", "old_ref_pass", "old / reference pass"),
    ("phases", "teacher_pass", "teacher pass"),
    ("activations", "micro_batch", "activations per micro-batch"),
    ("activations", "micro_batch_recompute", "  with full recompute"),
    ("in_flight", None, "micro-batches in flight (1F1B)"),
    ("activations", "update", "update activations"),
    ("activations", "update_recompute", "  with full recompute"),
    ("phases", "update", "update total (+ capture, logits)"),
    ("phases", "update_recompute", "  with full recompute"),
]


def render(plan: MemoryPlan) -> str:
    """The plan as a table: one row per item, one column per pipeline stage, GiB."""
    lay, w, seq = plan.layout, plan.workload, plan.sequence
    head = (f"{plan.student}" + (f" + teacher {plan.teacher}" if plan.teacher else "") +
            f": TP {lay.tp} x PP {lay.pp} x CP {lay.cp} x DP {lay.dp} = {lay.world} GPUs of "
            f"{plan.gpu_bytes / GIB:g} GiB ({plan.usable_bytes / GIB:g} usable)")
    lines = [head]
    if plan.errors:
        lines += [f"does not run: {e}" for e in plan.errors]
        return "\n".join(lines)
    lines.append(
        f"sequence: {w.frames} frames x {w.pixels_per_frame} px -> {seq.video_tokens} video tokens, prompt "
        f"{seq.prompt_len}, T = {seq.length} (per CP rank {seq.local_tokens} tokens, {seq.local_rows} response rows); "
        f"{plan.samples_per_rank} samples per rank, {plan.micro_batches} micro-batches per mini-batch; generation: "
        f"{plan.gen_rows} response rows per KV-cache chunk")
    names = [f"stage {st.stage} ({st.layers}" + (f"+{st.teacher_layers}" if plan.teacher else "") + " layers)"
             for st in plan.stages]
    width = max(12, *(len(n) for n in names))
    label_w = 38
    lines.append(f"{'per rank, GiB':<{label_w}}" + "".join(f"{n:>{width + 2}}" for n in names))

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<{label_w}}" + "".join(f"{v:>{width + 2}}" for v in values))

    for group, key, label in ROWS:
        if key is None:
            row(label, [str(getattr(st, group)) for st in plan.stages])
            continue
        values = [getattr(st, group).get(key) for st in plan.stages]
        if all(v is None for v in values):
            continue
        if group == "resident" and all(not v for v in values):
            continue
        row(label, ["-" if v is None else _gib(v) for v in values])
        if key == "teacher_store":
            row("= resident", [_gib(st.resident_total()) for st in plan.stages])
    for recompute, label in ((False, "peak"), (True, "peak, full recompute")):
        row(label, [f"{_gib(st.peak(recompute)[0])} {st.peak(recompute)[1].replace('_recompute', '')}"
                    for st in plan.stages])
    host = [sum(st.host.values()) for st in plan.stages]
    if any(host):
        row("host memory", [_gib(h) for h in host])
    fits = {r: "yes" if plan.fits(r) else "no" for r in (False, True)}
    lines.append(f"fits in {plan.usable_bytes / GIB:g} GiB: {fits[False]} without recompute, "
                 f"{fits[True]} with full recompute")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def search(student, teacher, gpus: int, per_node: int, work: Workload, settings: Settings, gpu_gib: float,
           split: tuple[int, ...] | None, tsplit: tuple[int, ...] | None) -> list[MemoryPlan]:
    """Every TP x PP x CP x DP = ``gpus`` layout that runs (TP within a node), best first: fits without
    recompute, then with it, each by more data parallelism, fewer pipeline stages, less CP, less TP; then
    the layouts that do not fit, the smallest peak (with recompute) first."""
    plans = []
    for tp in (d for d in range(1, min(gpus, per_node) + 1) if gpus % d == 0):
        for pp in (d for d in range(1, gpus // tp + 1) if (gpus // tp) % d == 0):
            for cp in (d for d in range(1, gpus // (tp * pp) + 1) if (gpus // (tp * pp)) % d == 0):
                lay = Layout(tp=tp, pp=pp, cp=cp, dp=gpus // (tp * pp * cp),
                             pp_split=split if split and len(split) == pp else None,
                             teacher_pp_split=tsplit if tsplit and len(tsplit) == pp else None)
                if layout_problems(student, teacher, lay, work):
                    continue
                plan = plan_memory(student, teacher, lay, work, settings, gpu_gib)
                if not plan.errors:
                    plans.append(plan)

    def key(p: MemoryPlan):
        lay = p.layout
        if p.fits(False) or p.fits(True):
            return (0 if p.fits(False) else 1, -lay.dp, lay.pp, lay.cp, lay.tp)
        return (2, p.peak(True), 0, 0, 0)  # none fits: the closest first

    return sorted(plans, key=key)


def render_search(plans: list[MemoryPlan], gpus: int, top: int) -> str:
    if not plans:
        return f"no layout of {gpus} GPUs splits these models"
    p0 = plans[0]
    lines = [f"{p0.student}" + (f" + teacher {p0.teacher}" if p0.teacher else "") +
             f", {gpus} GPUs of {p0.gpu_bytes / GIB:g} GiB ({p0.usable_bytes / GIB:g} usable), T = {p0.sequence.length}",
             f"{'TP':>3} {'PP':>3} {'CP':>3} {'DP':>3}  {'peak GiB':>9} {'fits':>4}  {'recompute':>9} {'fits':>4}"]
    for p in plans[:top]:
        lay = p.layout
        lines.append(f"{lay.tp:>3} {lay.pp:>3} {lay.cp:>3} {lay.dp:>3}  {_gib(p.peak(False)):>9} "
                     f"{'yes' if p.fits(False) else 'no':>4}  {_gib(p.peak(True)):>9} {'yes' if p.fits(True) else 'no':>4}")
    if len(plans) > top:
        lines.append(f"({len(plans) - top} more; --top N shows them)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    work, settings = _inputs(args)
    student = _model(args.student, "--student")
    teacher = _model(args.teacher, "--teacher")
    split = _split(args.pp_split, "--pp-split")
    tsplit = _split(args.teacher_pp_split, "--teacher-pp-split")
    if args.gpus is not None:
        check.at_least(args.gpus, 1, "--gpus")
        plans = search(student, teacher, args.gpus, args.gpus_per_node, work, settings, args.gpu_mem_gib, split, tsplit)
        if args.json:
            print(json.dumps({"gpus": args.gpus, "layouts": [p.to_dict() for p in plans[:args.top]]}))
        else:
            print(render_search(plans, args.gpus, args.top))
        return 0
    layout = Layout(tp=args.tp, pp=args.pp, cp=args.cp, dp=args.dp, pp_split=split, teacher_pp_split=tsplit)
    problems = layout_problems(student, teacher, layout, work)
    if problems:
        raise UsageError(f"layout: {problems[0]}")
    for flag, given, model in (("--pp-split", split, student), ("--teacher-pp-split", tsplit, teacher)):
        if given is not None and model is not None and (len(given) != args.pp or sum(given) != model.num_layers
                                                        or min(given) < 0):
            raise UsageError(f"{flag} {','.join(map(str, given))}: needs {args.pp} non-negative entries summing to "
                             f"{model.num_layers} ({model.name})")
    plan = plan_memory(student, teacher, layout, work, settings, args.gpu_mem_gib)
    if args.json:
        print(json.dumps(plan.to_dict()))
    else:
        print(render(plan))
    return 0


def cli() -> NoReturn:
    run_main(prog_name("plan_memory.py"), main)

