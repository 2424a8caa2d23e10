"""Device memory of one rank of a GRPO / RAL / distillation run, before the job starts (no torch).

    plan = plan_memory(load_shape("7b"), load_shape("32b"), Layout(tp=4, pp=2, dp=1),
                       Workload(frames=128, response_len=1024, rollouts=8), Settings(), gpu_gib=80)
    plan.fits(recompute=True), plan.stages[-1].peak(recompute=False)

A rank's memory is what it holds for the whole run (resident) plus the largest of what one phase of a step
adds (transient); ranks differ by pipeline stage only (the data-parallel shards of the optimizer differ by
a few padding elements: the largest is taken).

Resident, per rank of stage s (b: parameter / activation bytes, 2 for bf16):
  weights          the stage's LM parameters (in the distributed optimizer's padded buffer) x b, plus the
                   frozen vision tower on the first stage
  gradients        megatron DDP's gradient buffer, fp32 (``grad_reduce_in_fp32``): trainable elements x 4
  optimizer        Adam's two moments in fp32 (8 bytes per element) plus the fp32 main copy when b < 4,
                   sharded over DP x CP by the distributed optimizer (megatron's bucket layout: each
                   parameter starts on a multiple of 64 elements, each bucket is padded to lcm(DP x CP,
                   128), a tied embedding split over pipeline stages gets its own bucket)
  reference        a copy of the trainable weights (placement "device"; "host" keeps it in host memory)
  teacher          the teacher's stage (same TP and PP, its own layer split) and vision tower, no
                   gradients or optimizer state
  p_old store      last stage, the rollout batch's samples of this rank: "qk" keeps the captured rows' Q
                   (R x H / TP x d) and the whole K (T x H_kv / TP x d) in b bytes, "rows" the rows (R x T,
                   bf16); ``old_policy_offload`` moves it to host memory
  teacher store    the teacher's rows, kept the same way (teacher shapes)

Transient, the largest of the step's phases:
  generation       KV cache (rows x (P + R - 1) tokens of the stage's layers; rows per chunk from the
                   ``generation.kv_cache_tokens`` budget), the prefill of the chunk's prompts (one layer at a
                   time, no grad; its vision tower pass on the first stage), one layer's K/V copy when the
                   prompt row is repeated G times, the decode logits (last stage)
  vision           the tower on the rank's prompts of the step (split over CP), then their features, which
                   the first stage keeps through the passes and the updates
  old/ref pass     no-grad forward of a micro-batch, one parameter of swap scratch (reference on device)
  teacher pass     the teacher's no-grad forward and its vision tower
  update           activations of the micro-batches in flight (1F1B: PP - s on stage s, at most the
                   micro-batches of a mini-batch), the output layer on the response tokens, the attention
                   capture (rows p, the divergence's saved tensors, the workspace), p_old of the micro-batch,
                   the teacher's rows and logits of the micro-batch; "with recompute": megatron's full
                   recompute (layer inputs kept, one layer rebuilt at a time; the last layer kept whole when
                   the attention loss needs the capture's gradient)

A rank fits when every stage's peak stays below the GPU memory minus ``reserve_gib`` (CUDA context, NCCL
buffers, allocator fragmentation). Sequence: P = text tokens + video tokens + 2 (vision start/end),
T = P + R; context parallelism pads T to a multiple of 2 CP and gives each rank T / CP tokens and the
response rows of its two load-balanced chunks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from megatron_ral.models.qwen25vl.memory import (
    FP32,
    ModelShape,
    ParamEntry,
    final_norm_bytes,
    kv_cache_bytes_per_token,
    layer_activation_bytes,
    layer_transient_bytes,
    lm_stage_parameters,
    output_layer_bytes,
    stage_layer_counts,
    video_patches,
    video_tokens,
)

GIB = 2**30
MIB = 2**20
VISION_MARKERS = 2  # <|vision_start|>, <|vision_end|>
# Tensors of R x T (fp32) the attention capture and the divergence keep for backward: the rows, the counted rows
# and their p_old gathered for the loss, their gradient (the fused JSD keeps no temporaries; the capture's peak
# above a plain update measured 3.3 R x T with it, 5.1 before, tests/unit/test_memory_plan.py's case), and at
# most this many more while the capture's forward runs (its workspace, bounded by CaptureConfig's workspace_bytes).
CAPTURE_KEPT_ROWS = 4
CAPTURE_WORKSPACE_ROWS = 5
DEFAULT_WORKSPACE = 256 * MIB  # attention.policy.ChunkConfig.workspace_bytes
REFERENCE = ("device", "host", "none")
STORES = ("qk", "rows", "none")


@dataclass(frozen=True)
class Layout:
    """Parallel sizes; the world is TP x PP x CP x DP. Layer splits default to the provider's balanced one."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    pp_split: tuple[int, ...] | None = None
    teacher_pp_split: tuple[int, ...] | None = None

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


@dataclass(frozen=True)
class Workload:
    """One RL step: ``prompts_per_step`` prompts (global), each a video of ``frames`` frames of
    ``pixels_per_frame`` pixels plus ``prompt_tokens`` text tokens, sampled ``rollouts`` times up to
    ``response_len`` tokens; the updates split the rollout batch into ``minibatches`` mini-batches of
    micro-batches of ``micro_batch_size`` sequences."""

    frames: int = 128
    pixels_per_frame: int = 128 * 28 * 28
    response_len: int = 1024
    rollouts: int = 8
    prompt_tokens: int = 256
    prompts_per_step: int = 8
    minibatches: int = 2
    micro_batch_size: int = 1


@dataclass(frozen=True)
class Settings:
    """What the run keeps and how (config keys in brackets).

    dtype_bytes: parameter and activation bytes (2: bf16 [model.dtype]); spec: "te" (GPU) or "local"
    [model.layer_spec]; distributed_optimizer [parallel.use_distributed_optimizer]; reference: "device",
    "host" [algorithm.reference_placement] or "none" (kl_beta 0); old_policy_store: "qk", "rows"
    [algorithm.old_policy_store] or "none" (GRPO); old_policy_offload [algorithm.old_policy_offload];
    kv_cache_tokens [generation.kv_cache_tokens]; gkd: the teacher's logits are computed (distillation
    with mu > 0); reserve_gib: memory a rank cannot use for tensors."""

    dtype_bytes: int = 2
    spec: str = "te"
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    reference: str = "device"
    old_policy_store: str = "qk"
    old_policy_offload: bool = False
    kv_cache_tokens: int = 65536
    capture_workspace_bytes: int = DEFAULT_WORKSPACE
    gkd: bool = True
    reserve_gib: float = 4.0


# ------------------------------------------------------------------------------ megatron's buffers
def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def ddp_buckets(params: list[ParamEntry], dp_cp: int, distributed_optimizer: bool
                ) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """megatron-core's gradient (and, with the distributed optimizer, parameter) buffer of the trainable
    ``params`` (``overlap_grad_reduce=False``: one bucket, plus one for a tied embedding split over pipeline
    stages): [(bucket start, bucket end, [(param start, param end), ...])] in buffer order (parameters
    reversed). With the distributed optimizer each parameter starts on a multiple of 64 elements and each
    bucket ends on a multiple of lcm(DP x CP, 128)."""
    trainable = [p for p in params if p.trainable]
    align = 64 if distributed_optimizer else 1
    end_multiple = math.lcm(dp_cp, 128) if distributed_optimizer else 1
    buckets: list[tuple[int, int, list[tuple[int, int]]]] = []
    start = cursor = 0
    ranges: list[tuple[int, int]] = []

    def close(at: int) -> int:
        nonlocal start, ranges
        end = _pad(at, end_multiple)
        buckets.append((start, end, ranges))
        start, ranges = end, []
        return end

    for p in reversed(trainable):
        cursor = _pad(cursor, align)
        own = p.shared_embedding and distributed_optimizer
        if own and ranges:
            cursor = close(cursor)
        ranges.append((cursor, cursor + p.numel))
        cursor += p.numel
        if own:
            cursor = close(cursor)
    if ranges:
        close(cursor)
    return buckets


def buffer_elements(params: list[ParamEntry], dp_cp: int, distributed_optimizer: bool) -> int:
    """Elements of the gradient buffer (and of the parameter buffer with the distributed optimizer)."""
    buckets = ddp_buckets(params, dp_cp, distributed_optimizer)
    return buckets[-1][1] if buckets else 0


def optimizer_shard_elements(params: list[ParamEntry], dp_cp: int, distributed_optimizer: bool) -> list[int]:
    """Parameter elements whose optimizer state each DP x CP rank holds (all of them without the distributed
    optimizer; with it, each bucket's r-th 1 / (DP x CP) slice, padding excluded)."""
    if not distributed_optimizer:
        total = sum(p.numel for p in params if p.trainable)
        return [total] * dp_cp
    out = [0] * dp_cp
    for b0, b1, ranges in ddp_buckets(params, dp_cp, True):
        size = (b1 - b0) // dp_cp
        for r in range(dp_cp):
            lo, hi = b0 + r * size, b0 + (r + 1) * size
            out[r] += sum(max(0, min(hi, e) - max(lo, s)) for s, e in ranges)
    return out


def dtype_groups(params: list[ParamEntry], settings: Settings) -> list[tuple[int, list[ParamEntry]]]:
    """The trainable parameters by storage dtype (bytes), as megatron's DDP gives each dtype its own buffer. Every
    parameter, the local spec's norm weights included, takes the model dtype (the provider casts the norms: a
    16-bit model with fp32 norms made the distributed optimizer pair parameters with the wrong state at save)."""
    trainable = [p for p in params if p.trainable]
    return [(settings.dtype_bytes, trainable)] if trainable else []


@dataclass(frozen=True)
class TrainableMemory:
    """One rank's trainable parameters as megatron-core keeps them: parameter bytes, gradient buffer elements
    (fp32), and per data-parallel rank the optimizer's moment elements and fp32 main-copy elements."""

    param_bytes: int
    grad_elements: int
    moments: list[int]
    main_copies: list[int]

    def optimizer_bytes(self, rank: int) -> int:
        return 2 * FP32 * self.moments[rank] + FP32 * self.main_copies[rank]


def trainable_memory(params: list[ParamEntry], settings: Settings, dp_cp: int) -> TrainableMemory:
    dist = settings.distributed_optimizer
    param_bytes = grad = 0
    moments, main = [0] * dp_cp, [0] * dp_cp
    for nbytes, group in dtype_groups(params, settings):
        elements = buffer_elements(group, dp_cp, dist)
        grad += elements
        param_bytes += (elements if dist else sum(p.numel for p in group)) * nbytes
        for r, n in enumerate(optimizer_shard_elements(group, dp_cp, dist)):
            moments[r] += n
            if nbytes < FP32:
                main[r] += n
    return TrainableMemory(param_bytes, grad, moments, main)


# --------------------------------------------------------------------------------- sequence facts
@dataclass(frozen=True)
class Sequence:
    """Token counts of one rollout sequence: video tokens, prompt P, T = P + R, T padded for CP, the tokens
    and the most response rows one CP rank holds, and the vision patches of its video."""

    video_tokens: int
    prompt_len: int
    length: int
    padded_length: int
    local_tokens: int
    local_rows: int
    patches: int


def response_rows_per_cp_rank(length: int, padded: int, response: int, cp: int) -> list[int]:
    """Response rows each CP rank holds under megatron's load-balanced split (2 CP chunks, rank i holding
    chunks i and 2 CP - 1 - i) of a sequence whose last ``response`` of ``length`` tokens are the response."""
    if cp == 1:
        return [response]
    chunk = padded // (2 * cp)
    lo, hi = length - response, length
    rows = []
    for i in range(cp):
        n = 0
        for c in (i, 2 * cp - 1 - i):
            n += max(0, min(hi, (c + 1) * chunk) - max(lo, c * chunk))
        rows.append(n)
    return rows


def sequence(shape: ModelShape, work: Workload, cp: int) -> Sequence:
    vt = video_tokens(work.frames, work.pixels_per_frame, shape.vision.temporal_patch) if work.frames else 0
    prompt = work.prompt_tokens + vt + (VISION_MARKERS if vt else 0)
    length = prompt + work.response_len
    padded = _pad(length, 2 * cp) if cp > 1 else length
    rows = max(response_rows_per_cp_rank(length, padded, work.response_len, cp))
    patches = video_patches(shape, work.frames, work.pixels_per_frame) if work.frames else 0
    return Sequence(vt, prompt, length, padded, padded // cp, rows, patches)


# ------------------------------------------------------------------------------- phase formulas
def update_activation_bytes(shape: ModelShape, tp: int, layers: int, tokens: int, rows: int, *, first: bool,
                            last: bool, in_flight: int, micro_batch: int, settings: Settings, recompute: bool,
                            keep_last_layer: bool, cp_gathered_keys: int = 0) -> int:
    """Activations of one rank's stage during the update's forward + backward (no capture, no vision):
    ``in_flight`` micro-batches of ``micro_batch`` sequences of ``tokens`` local tokens through ``layers``
    layers, and on the last stage the final norm and the output layer on ``rows`` response tokens.
    ``cp_gathered_keys``: key tokens a layer's all-gathered K and V add (local spec under CP)."""
    b = settings.dtype_bytes
    per_layer = layer_activation_bytes(shape, tp, b, settings.spec, settings.sequence_parallel)
    per_layer_tokens = per_layer * tokens + 2 * cp_gathered_keys * (shape.kv_heads // tp) * shape.head_dim * b
    if recompute and layers:
        kept = 1 if (keep_last_layer and last) else 0
        inputs = (layers - kept) * tokens * shape.hidden * b
        total = in_flight * micro_batch * (inputs + kept * per_layer_tokens) + micro_batch * per_layer_tokens
    else:
        total = in_flight * micro_batch * layers * per_layer_tokens
    if last:
        kept_out, transient_out = output_layer_bytes(shape, tp, b)
        total += micro_batch * (tokens * final_norm_bytes(shape, b, settings.spec) + rows * (kept_out + transient_out))
    return total


def capture_bytes(shape: ModelShape, tp: int, rows: int, keys: int, micro_batch: int, settings: Settings) -> int:
    """The attention capture and its divergence during an update (last stage): the kept R x T fp32 tensors,
    the gathered query rows, the per-head log-sum-exp and the forward workspace."""
    kept = CAPTURE_KEPT_ROWS * rows * keys * FP32
    q_rows = rows * (shape.heads // tp) * shape.head_dim * settings.dtype_bytes + rows * (shape.heads // tp) * FP32
    workspace = min(settings.capture_workspace_bytes, CAPTURE_WORKSPACE_ROWS * rows * keys * FP32)
    return micro_batch * (kept + q_rows) + workspace


def store_bytes_per_sample(shape: ModelShape, tp: int, mode: str, rows: int, keys: int, dtype_bytes: int) -> int:
    """One sample in the p_old (or teacher rows) store on one rank (attention.old_policy)."""
    if mode == "rows":
        return rows * keys * 2  # bf16 rows, replicated over TP
    if mode == "qk":
        return (rows * shape.heads + keys * shape.kv_heads) * shape.head_dim // tp * dtype_bytes
    return 0


def vision_encode_bytes(shape: ModelShape, patches: int, dtype_bytes: int) -> int:
    """A no-grad tower pass over ``patches`` patches: their fp32 input and its cast, the widest block."""
    v = shape.vision
    return patches * (v.input_bytes_per_patch(dtype_bytes) + v.forward_bytes_per_patch(dtype_bytes))


def vision_feature_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    return tokens * shape.vision.out_hidden * dtype_bytes


def generation_bytes(shape: ModelShape, tp: int, layers: int, seq: Sequence, work: Workload, prompts: int,
                     settings: Settings, *, first: bool, last: bool) -> tuple[int, int, str | None]:
    """(bytes, rows per chunk, error) of generating ``rollouts`` responses for ``prompts`` prompts on one rank:
    KV cache + the larger of the prefill and its vision pass + one layer's K/V copy + the decode logits."""
    b = settings.dtype_bytes
    per_row = seq.prompt_len + max(work.response_len - 1, 0)
    if per_row > settings.kv_cache_tokens:
        return 0, 0, (f"one response needs {per_row} KV-cache tokens, more than kv_cache_tokens "
                      f"{settings.kv_cache_tokens} (generation.kv_cache_tokens)")
    rows = min(work.rollouts * max(prompts, 1), settings.kv_cache_tokens // per_row)
    chunk_prompts = max(1, -(-rows // work.rollouts))
    kv = rows * per_row * kv_cache_bytes_per_token(shape, tp, layers, b)
    copy = rows * per_row * kv_cache_bytes_per_token(shape, tp, 1, b) if layers else 0
    prefill = chunk_prompts * seq.prompt_len * layer_transient_bytes(shape, tp, b) if layers else 0
    if first:  # the tower runs first; its features stay until the prompt is embedded
        features = vision_feature_bytes(shape, chunk_prompts * seq.video_tokens, b)
        prefill = max(prefill + features, vision_encode_bytes(shape, chunk_prompts * seq.patches, b) + features)
    logits = rows * (shape.padded_vocab(tp) // tp) * (b + FP32) if last else 0
    return kv + max(prefill, copy) + logits, rows, None


# -------------------------------------------------------------------------------------- the plan
@dataclass
class StagePlan:
    """One pipeline stage's rank: resident bytes by item, transient bytes by phase, host bytes."""

    stage: int
    layers: int
    teacher_layers: int
    in_flight: int = 1
    resident: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    activations: dict[str, int] = field(default_factory=dict)

    def resident_total(self) -> int:
        return sum(self.resident.values())

    def peak(self, recompute: bool) -> tuple[int, str]:
        """(peak bytes, the phase that sets it)."""
        skip = "update" if recompute else "update_recompute"
        phase, top = max(((k, v) for k, v in self.phases.items() if k != skip), key=lambda kv: kv[1],
                         default=("none", 0))
        return self.resident_total() + top, phase


@dataclass
class MemoryPlan:
    student: str
    teacher: str | None
    layout: Layout
    workload: Workload
    settings: Settings
    gpu_bytes: int
    sequence: Sequence
    samples_per_rank: int
    micro_batches: int
    gen_rows: int
    stages: list[StagePlan]
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def usable_bytes(self) -> int:
        return self.gpu_bytes - int(self.settings.reserve_gib * GIB)

    def peak(self, recompute: bool) -> int:
        return max(s.peak(recompute)[0] for s in self.stages)

    def fits(self, recompute: bool) -> bool:
        return not self.errors and self.peak(recompute) <= self.usable_bytes

    def to_dict(self) -> dict:
        def stage(s: StagePlan) -> dict:
            return {"stage": s.stage, "layers": s.layers, "teacher_layers": s.teacher_layers, "in_flight": s.in_flight,
                    "resident": dict(s.resident), "phases": dict(s.phases), "activations": dict(s.activations),
                    "host": dict(s.host), "peak": s.peak(False)[0], "peak_phase": s.peak(False)[1],
                    "peak_recompute": s.peak(True)[0], "peak_recompute_phase": s.peak(True)[1]}

        return {
            "student": self.student, "teacher": self.teacher,
            "layout": asdict(self.layout) | {"world": self.layout.world},
            "workload": asdict(self.workload), "settings": asdict(self.settings),
            "sequence": asdict(self.sequence), "samples_per_rank": self.samples_per_rank,
            "micro_batches_per_minibatch": self.micro_batches, "generation_rows_per_chunk": self.gen_rows,
            "gpu_bytes": self.gpu_bytes, "usable_bytes": self.usable_bytes,
            "peak": self.peak(False), "peak_recompute": self.peak(True),
            "fits": self.fits(False), "fits_recompute": self.fits(True),
            "stages": [stage(s) for s in self.stages], "notes": list(self.notes), "errors": list(self.errors),
        }


def layout_problems(student: ModelShape, teacher: ModelShape | None, layout: Layout, work: Workload) -> list[str]:
    """Why a layout cannot run (empty when it can)."""
    out = []
    for name, v in (("tp", layout.tp), ("pp", layout.pp), ("cp", layout.cp), ("dp", layout.dp)):
        if v < 1:
            out.append(f"{name} {v} must be >= 1")
    if out:
        return out
    for model in (student, teacher):
        if model is None:
            continue
        why = model.check_tp(layout.tp)
        if why:
            out.append(why)
        if model.num_layers < layout.pp:
            out.append(f"{model.name}: {layout.pp} pipeline stages need at least {layout.pp} layers "
                       f"(it has {model.num_layers})")
    return out


def _stage_bytes(params: list[ParamEntry], b: int) -> int:
    return sum(p.numel for p in params) * b


def plan_memory(student: ModelShape, teacher: ModelShape | None, layout: Layout, work: Workload,
                settings: Settings = Settings(), gpu_gib: float = 80.0) -> MemoryPlan:
    """The per-rank memory plan (module docstring). Errors (a layout that cannot split the model, a KV
    budget below one response) are listed in ``plan.errors``; such a plan does not fit."""
    if settings.reference not in REFERENCE:
        raise ValueError(f"reference must be one of {REFERENCE}, got {settings.reference!r}")
    if settings.old_policy_store not in STORES:
        raise ValueError(f"old_policy_store must be one of {STORES}, got {settings.old_policy_store!r}")
    tp, pp, cp, dp = layout.tp, layout.pp, layout.cp, layout.dp
    b = settings.dtype_bytes
    errors = layout_problems(student, teacher, layout, work)
    seq = sequence(student, work, cp)
    samples = -(-work.prompts_per_step * work.rollouts // dp)
    prompts_rank = -(-work.prompts_per_step // dp)
    prompts_gen = -(-work.prompts_per_step // (dp * cp))  # CP ranks generate as extra data-parallel ranks
    micro = max(1, -(-samples // (work.minibatches * work.micro_batch_size)))
    plan = MemoryPlan(student=student.name, teacher=teacher.name if teacher else None, layout=layout,
                      workload=work, settings=settings, gpu_bytes=int(gpu_gib * GIB), sequence=seq,
                      samples_per_rank=samples, micro_batches=micro, gen_rows=0, stages=[], errors=errors)
    if errors:
        return plan
    split = list(layout.pp_split) if layout.pp_split else None
    tsplit = list(layout.teacher_pp_split) if layout.teacher_pp_split else None
    try:
        counts = stage_layer_counts(student.num_layers, pp, split)
        tcounts = stage_layer_counts(teacher.num_layers, pp, tsplit) if teacher else [0] * pp
    except ValueError as e:
        plan.errors.append(str(e))
        return plan
    store_mode = settings.old_policy_store
    teacher_store_mode = store_mode if store_mode != "none" else "qk"
    vision_tokens_rank = prompts_rank * seq.video_tokens
    cp_keys = (seq.padded_length - seq.local_tokens) if (cp > 1 and settings.spec == "local") else 0
    for s in range(pp):
        first, last = s == 0, s == pp - 1
        st = StagePlan(stage=s, layers=counts[s], teacher_layers=tcounts[s])
        lm = lm_stage_parameters(student, tp, pp, s, split)
        trainable = [p for p in lm if p.trainable]
        mem = trainable_memory(trainable, settings, dp * cp)
        st.resident["weights"] = mem.param_bytes + (student.vision.num_parameters() * b if first else 0)
        st.resident["gradients"] = mem.grad_elements * FP32
        st.resident["optimizer"] = max(mem.optimizer_bytes(r) for r in range(dp * cp))
        ref = sum(sum(p.numel for p in g) * nbytes for nbytes, g in dtype_groups(trainable, settings))
        st.resident["reference"] = ref if settings.reference == "device" else 0
        if settings.reference == "host":
            st.host["reference"] = ref
        if teacher is not None:
            tparams = lm_stage_parameters(teacher, tp, pp, s, tsplit)
            st.resident["teacher"] = _stage_bytes(tparams, b) + (teacher.vision.num_parameters() * b if first else 0)
        keys = seq.padded_length
        rows = seq.local_rows
        if last and store_mode != "none":
            size = samples * store_bytes_per_sample(student, tp, store_mode, rows, keys, b)
            (st.host if settings.old_policy_offload else st.resident)["p_old_store"] = size
        if last and teacher is not None:
            size = samples * store_bytes_per_sample(teacher, tp, teacher_store_mode, rows, keys, b)
            (st.host if settings.old_policy_offload else st.resident)["teacher_store"] = size

        # --- phases
        gen, gen_rows, gen_error = generation_bytes(student, tp, counts[s], seq, work, prompts_gen, settings,
                                                    first=first, last=last)
        if gen_error and gen_error not in plan.errors:
            plan.errors.append(gen_error)
        plan.gen_rows = gen_rows
        st.phases["generation"] = gen
        features = vision_feature_bytes(student, vision_tokens_rank, b) if first else 0
        if first and seq.patches:
            st.phases["vision"] = vision_encode_bytes(student, -(-prompts_rank * seq.patches // cp), b) + features
        mb = work.micro_batch_size
        largest = max((p.numel for p in trainable), default=0) * b
        fwd = mb * seq.local_tokens * layer_transient_bytes(student, tp, b) if counts[s] else 0
        out_kept, out_transient = output_layer_bytes(student, tp, b)
        logits = mb * rows * out_transient if last else 0
        st.phases["old_ref_pass"] = features + fwd + logits + (largest if settings.reference == "device" else 0)
        if teacher is not None:
            tfwd = mb * seq.local_tokens * layer_transient_bytes(teacher, tp, b) if tcounts[s] else 0
            tlogits = mb * rows * output_layer_bytes(teacher, tp, b)[1] if (last and settings.gkd) else 0
            tvision = 0
            if first and seq.patches:
                tvision = (vision_encode_bytes(teacher, -(-prompts_rank * seq.patches // cp), b)
                           + vision_feature_bytes(teacher, vision_tokens_rank, b))
            st.phases["teacher_pass"] = features + max(tfwd + tlogits, tvision)
        in_flight = min(pp - s, micro)
        use_capture = store_mode != "none" or teacher is not None
        extra = features + largest
        if last:
            if use_capture:
                extra += capture_bytes(student, tp, rows, keys, mb, settings)
            if store_mode != "none":
                extra += mb * rows * keys * FP32  # p_old of the micro-batch, fp32
            if teacher is not None:
                extra += mb * rows * keys * FP32  # the teacher's rows
                if settings.gkd:
                    extra += mb * rows * (teacher.padded_vocab(tp) // tp) * b
        st.in_flight = in_flight
        for name, recompute in (("update", False), ("update_recompute", True)):
            def act(n: int) -> int:
                return update_activation_bytes(student, tp, counts[s], seq.local_tokens, rows, first=first,
                                               last=last, in_flight=n, micro_batch=mb, settings=settings,
                                               recompute=recompute, keep_last_layer=use_capture,
                                               cp_gathered_keys=cp_keys)
            st.activations[name.replace("update", "micro_batch")] = act(1)
            st.activations[name] = act(in_flight)
            st.phases[name] = act(in_flight) + extra
        plan.stages.append(st)
    if store_mode != "none" or teacher is not None:
        plan.notes.append("'with recompute' keeps the last layer whole (the attention capture needs its graph); the "
                          "trainer refuses model.recompute_granularity=full with the capture today")
    if cp > 1 and settings.spec == "te":
        plan.notes.append("CP under the TE spec: TE's ring attention keeps only the local K/V")
    return plan
