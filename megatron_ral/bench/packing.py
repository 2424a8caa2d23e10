"""Training passes of one RAL rollout batch with each ``training.packing`` (tools/bench/packing.py; README figures).

One rollout batch (P prompts x G responses), its training passes as the trainer runs them: the old pass
(log-probs, p_old kept in the "qk" store, attention diagnostics), the reference pass (log-probs) and two
updates (one per mini-batch: forward with the attention capture, the GRPO + k3 KL + RAL loss, backward, an
optimizer step), for ``none`` (right-padded micro-batches of ``--micro-batch-size`` sequences), packed
``sequences`` and shared-prompt ``groups`` (streams of at most ``--max-tokens`` tokens). Each packing runs in
a fresh process. Reported: wall time and CPU time of the passes (their parts in CPU seconds: on a shared
machine wall time is mostly other processes'), peak resident memory of the passes above the memory before
them (the kernel's VmHWM, reset before the passes), token positions computed (padding included, summed
over the old and reference passes and the two updates, which together cover the batch once), the padding
share of ``none``, and apart the costs packing does not shrink: the LM head (the rows it computes and its
CPU seconds, output projection forward + backward; the cross-entropy after it excluded), the attention
rows' forward (``capture_fwd_s``) and the update losses' forward over them (``loss_fwd_s``: GRPO, KL, the
JSD to p_old over the counted rows, p_old recomputed from the "qk" store).

Cases (lengths seeded):

``spread``     prompts of 256..4096 vision tokens (log-spaced, in random order, images and videos alternating)
               + 64 text tokens; G responses of 32..1024 tokens drawn like sampled rollouts (log-normal around 240
               tokens, clipped at 1024 = max_new_tokens); 6 prompts, ``none`` in micro-batches of a whole
               mini-batch (24 sequences of 3 prompts: 52 % padding). Goal: ``sequences`` <= 0.6 x ``none`` when
               padding is >= 50 % of the padded tokens.
``shared_2k``  4 prompts of 2048 tokens (1984 vision + 64 text), G responses of 128..512 tokens (uniform);
               ``none`` in micro-batches of one group (8 sequences). Goal: ``groups`` <= 0.35 x ``none``.

The model is a tiny-width Qwen2.5-VL (the "tiny" preset: GQA 2:1, ``--layers`` layers, width ``--width``)
whose vocabulary keeps the 7B ratio of vocabulary to width (152064 / 3584): the tiny presets' 152k
vocabulary would make the LM head at the response positions (which packing shrinks only by the padding of
shorter responses) nearly all of a pass. Vision features are random tensors of the right shape (the frozen tower runs once per prompt outside
the passes, the same for every packing). fp32 on CPU, ``--threads`` torch threads.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

from megatron_ral.bench.attention_capture import mem_status, reset_peak
from megatron_ral.cli import input_checks as check
from megatron_ral.cli.arguments import ToolParser, add_json
from megatron_ral.cli.entry import prog_name, run_main

VOCAB_PER_WIDTH = 152064 / 3584  # Qwen2.5-VL-7B
CASES = ("spread", "shared_2k")
PACKINGS = ("none", "sequences", "groups")
DEFAULT_MBS = {"spread": 24, "shared_2k": 8}     # spread: a padded micro-batch is a whole mini-batch (3 groups)
DEFAULT_PROMPTS = {"spread": 6, "shared_2k": 4}
TEXT_BEFORE, TEXT_AFTER = 48, 16


# ---------------------------------------------------------------------------------------------- the batch
def _grid(tokens: int, video: bool) -> tuple[int, int, int]:
    """A (t, h, w) patch grid of ``tokens`` LM tokens after the 2x2 merge (t = 2 for videos when it divides)."""
    t = 2 if video and tokens % 2 == 0 else 1
    per = tokens // t
    a = max(d for d in range(1, int(math.isqrt(per)) + 1) if per % d == 0)
    return t, 2 * a, 2 * (per // a)


def case_lengths(case: str, prompts: int, group_size: int, seed: int) -> tuple[list[int], list[list[int]]]:
    """(vision tokens per prompt, response lengths [P][G]) of a case (see the module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if case == "spread":
        vision = [int(round(256 * 16 ** (i / max(prompts - 1, 1)))) // 2 * 2 for i in range(prompts)]
        vision = [vision[i] for i in torch.randperm(prompts, generator=gen).tolist()]  # in the loader's (any) order
        logn = torch.randn(prompts, group_size, generator=gen, dtype=torch.float64) * 0.8 + math.log(240)
        responses = logn.exp().round().clamp(32, 1024).long().tolist()
    elif case == "shared_2k":
        vision = [2048 - TEXT_BEFORE - TEXT_AFTER] * prompts
        responses = torch.randint(128, 513, (prompts, group_size), generator=gen).tolist()
    else:
        raise ValueError(f"unknown case {case!r}; expected one of {CASES}")
    return vision, responses


def make_batch(case: str, prompts: int, group_size: int, seed: int, image_token_id: int, video_token_id: int,
               hidden: int):
    """(RolloutBatch, per-prompt VisionEmbeddings) of a case: random text ids, vision placeholder runs with
    their grids, random responses and advantages, random vision features."""
    import torch

    from megatron_ral.inference.prompts import PromptInput
    from megatron_ral.models.qwen25vl.vision import VisionEmbeddings
    from megatron_ral.rl.batch import RolloutBatch

    vision, lengths = case_lengths(case, prompts, group_size, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    items, feats = [], []
    for p, n in enumerate(vision):
        video = p % 2 == 1
        grid = torch.tensor([_grid(n, video)])
        pad = video_token_id if video else image_token_id
        ids = torch.cat([torch.randint(0, 900, (TEXT_BEFORE,), generator=gen), torch.full((n,), pad),
                         torch.randint(0, 900, (TEXT_AFTER,), generator=gen)])
        pixels = torch.zeros(int(grid.prod()), 1)  # never read: the features are given
        if video:
            items.append(PromptInput(ids, pixel_values_videos=pixels, video_grid_thw=grid,
                                     second_per_grid_ts=torch.tensor([1.0])))
            feats.append(VisionEmbeddings(video=torch.randn(n, hidden, generator=gen) * 0.02))
        else:
            items.append(PromptInput(ids, pixel_values=pixels, image_grid_thw=grid))
            feats.append(VisionEmbeddings(image=torch.randn(n, hidden, generator=gen) * 0.02))
    responses = [[torch.randint(0, 900, (r,), generator=gen) for r in row] for row in lengths]
    rewards = torch.rand(prompts, group_size, generator=gen)
    adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
    z = torch.zeros_like(rewards)
    batch = RolloutBatch(prompts=items, records=[None] * prompts, prompt_keys=list(range(prompts)),
                         responses=responses, texts=[[""] * group_size] * prompts,
                         finish_reasons=[["stop"] * group_size] * prompts, rewards=rewards, accuracy=z, format=z,
                         advantages=adv, zero_std=torch.zeros(prompts, dtype=torch.bool))
    return batch, feats


# ---------------------------------------------------------------------------------------------- one process
class _LMHeadTimer:
    """Seconds spent in the LM head's output projection (forward, and backward through autograd hooks on its
    output and input), and the rows it computed."""

    def __init__(self, output_layer) -> None:
        self.seconds, self.rows, self._t0 = 0.0, 0, 0.0
        output_layer.register_forward_pre_hook(self._pre)
        output_layer.register_forward_hook(self._post)

    def _pre(self, module, args):
        self._t0 = CLOCK()

    def _post(self, module, args, output):
        self.seconds += CLOCK() - self._t0
        x, y = args[0], output[0] if isinstance(output, tuple) else output
        self.rows += int(x.shape[0] * x.shape[1])
        if y.requires_grad and x.requires_grad:
            start = {}
            y.register_hook(lambda g: start.__setitem__("t", CLOCK()))
            x.register_hook(lambda g: setattr(self, "seconds", self.seconds + CLOCK() - start.get("t", CLOCK())))


CLOCK = time.process_time  # the parts are timed in CPU seconds: on a shared machine wall time is mostly others'


def _timed(fn, clock: dict, key: str):
    def wrapped(*a, **k):
        t = CLOCK()
        try:
            return fn(*a, **k)
        finally:
            clock[key] = clock.get(key, 0.0) + CLOCK() - t
    return wrapped


def run_passes(case: str, packing: str, args: dict) -> dict:
    """The four training passes of the case's batch at ``packing`` in this process; the measurements."""
    import torch

    torch.set_num_threads(args["threads"])
    from megatron_ral.attention.capture import AttentionCapture
    from megatron_ral.attention.old_policy import OldPolicyConfig, make_old_policy_store
    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.models.qwen25vl.hf_weights import load_hf_weights
    from megatron_ral.models.qwen25vl.provider import build_model
    from megatron_ral.platform import destroy, initialize
    from megatron_ral.rl.packing import PackingSettings, plan_step_micro_batches
    from megatron_ral.rl.passes import old_pass
    from megatron_ral.rl.schedule import PassContext, run_pass
    from megatron_ral.rl.update import (
        LossSettings,
        minibatch_loss,
        minibatch_normalisers,
    )
    from megatron_ral.testing.models import TOKEN_IDS, hf_state_dict, tiny_hf_config

    initialize(ParallelConfig(), seed=args["seed"])
    width, vocab = args["width"], args["vocab"]
    half = width // 4 // 2  # 4 heads: M-RoPE sections over half the head dim, in the 7B's 2:3:3 proportions
    sections = [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]
    overrides = {"text_config": {"hidden_size": width, "intermediate_size": int(round(width * 18944 / 3584 / 8)) * 8,
                                 "num_hidden_layers": args["layers"], "max_position_embeddings": 32768,
                                 "mrope_section": sections},
                 "vision_config": {"out_hidden_size": width}}
    cfg = tiny_hf_config("tiny", overrides, vocab_size=vocab)
    model = build_model(cfg, dtype=torch.float32, backend="local", vision_attn_implementation="eager")
    load_hf_weights(model, hf_state_dict(cfg, seed=args["seed"]))
    batch, vision = make_batch(case, args["prompts"], args["group_size"], args["seed"], TOKEN_IDS["<|image_pad|>"],
                               TOKEN_IDS["<|video_pad|>"], width)
    settings = None if packing == "none" else PackingSettings(packing, args["max_tokens"], model.rope_config)
    t_plan = time.perf_counter()
    batch.micro_batches = plan_step_micro_batches(batch, 2, args["micro_batch_size"], TOKEN_IDS["<|endoftext|>"],
                                                  packing=settings)
    plan_s = time.perf_counter() - t_plan
    mbs = batch.micro_batches
    norms = minibatch_normalisers(mbs)
    clock: dict = {}
    capture = AttentionCapture(model)
    capture._on_forward = _timed(capture._on_forward, clock, "capture_fwd_s")  # the rows' forward (all passes)
    ctx = PassContext(model=[model], vision=vision, capture=capture)
    loss = LossSettings(kl_beta=0.04, lambda_attn=1.0, max_new_tokens=1024)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    timer = _LMHeadTimer(model.language_model.output_layer)
    store = make_old_policy_store(OldPolicyConfig(mode="qk"))
    img, vid = TOKEN_IDS["<|image_pad|>"], TOKEN_IDS["<|video_pad|>"]

    def ref_consume(mb, token_loss, result):
        batch.ref_logprobs[mb.index] = mb.token_logprobs(token_loss).detach().float()
        return None, {}

    def update_consume(mb, token_loss, result):
        logp = mb.token_logprobs(token_loss)
        out, _ = minibatch_loss(mb, logp, batch.old_logprobs[mb.index], batch.ref_logprobs[mb.index], result.rows,
                                store.get(mb.index), norms[mb.minibatch], loss)
        return out, {}

    base = mem_status()["VmRSS"]
    peak_reset = reset_peak()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    phases = {}
    t = CLOCK()
    model.eval()
    old_pass(ctx, batch, store, img, vid)  # (its p_old store and diagnostics counted in the pass)
    phases["old_s"] = CLOCK() - t
    t = CLOCK()
    run_pass(ctx, mbs, ref_consume, forward_only=True)
    phases["ref_s"] = CLOCK() - t
    t = CLOCK()
    model.train()
    for m in range(2):
        optimizer.zero_grad(set_to_none=True)
        run_pass(ctx, [mb for mb in mbs if mb.minibatch == m], _timed(update_consume, clock, "loss_fwd_s"),
                 forward_only=False, capture_kwargs=lambda mb: {"grad": True})
        optimizer.step()
    phases["updates_s"] = CLOCK() - t
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    peak = mem_status()["VmHWM"]
    positions = sum(mb.token_positions for mb in mbs)  # of one pass; the two updates together make one more
    real = sum(len(batch.prompts[r.prompt]) + int(batch.responses[r.prompt][r.sample].numel())
               for mb in mbs for r in mb.refs)
    destroy()
    return {
        "case": case, "packing": packing, "micro_batches": len(mbs), "plan_s": plan_s, "wall_s": wall, "cpu_s": cpu,
        **phases, "peak_rss_above_base_mb": (peak - base) / 2**20 if peak_reset else None,
        "peak_rss_mb": peak / 2**20, "token_positions": 3 * positions, "sequence_tokens": 3 * real,
        "padding_share": 1.0 - real / positions if packing == "none" else None,
        "lm_head_rows": timer.rows, "lm_head_s": timer.seconds, "lm_head_share": timer.seconds / cpu,
        "capture_fwd_s": clock.get("capture_fwd_s", 0.0), "loss_fwd_s": clock.get("loss_fwd_s", 0.0),
    }


def _child(argv: list[str]) -> None:
    case, packing, blob = argv
    print(json.dumps(run_passes(case, packing, json.loads(blob))))


def _run_child(case: str, packing: str, args: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args["threads"]))
    proc = subprocess.run([sys.executable, "-m", "megatron_ral.bench.packing", "--_child", case, packing,
                           json.dumps(args)], env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{case} / {packing} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict]) -> dict:
    """Per case: each packing's ratios to ``none`` (CPU time, wall time, token positions) and whether the goals
    are met (on CPU time: the measured processes run one thread each; wall time on a shared machine is mostly
    other processes')."""
    out = {}
    for case in sorted({r["case"] for r in rows}):
        by = {r["packing"]: r for r in rows if r["case"] == case}
        none = by.get("none")
        if none is None:
            continue
        s = {f"{k}_cpu_vs_none": round(by[k]["cpu_s"] / none["cpu_s"], 3) for k in by if k != "none"}
        s.update({f"{k}_wall_vs_none": round(by[k]["wall_s"] / none["wall_s"], 3) for k in by if k != "none"})
        s.update({f"{k}_positions_vs_none": round(by[k]["token_positions"] / none["token_positions"], 3)
                  for k in by if k != "none"})
        s["none_padding_share"] = round(none["padding_share"], 3)
        if case == "spread" and "sequences" in by:
            s["goal_sequences_le_0.6x_none"] = (by["sequences"]["cpu_s"] <= 0.6 * none["cpu_s"]
                                                if none["padding_share"] >= 0.5 else "n/a (padding < 50 %)")
        if case == "shared_2k" and "groups" in by:
            s["goal_groups_le_0.35x_none"] = by["groups"]["cpu_s"] <= 0.35 * none["cpu_s"]
        out[case] = s
    return out


def _table(rows: list[dict], summary: dict) -> str:
    cols = ("case", "packing", "micro_batches", "wall_s", "cpu_s", "old_s", "ref_s", "updates_s",
            "peak_rss_above_base_mb", "token_positions", "padding_share", "lm_head_rows", "lm_head_s", "lm_head_share",
            "capture_fwd_s", "loss_fwd_s")
    lines = ["  ".join(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append("-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)))
        lines.append("  ".join(cells))
    lines.append(json.dumps(summary, indent=1))
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_child":
        _child(sys.argv[2:])
        return 0
    p = ToolParser(prog=prog_name("packing.py"), description=__doc__)
    p.add_argument("--case", choices=CASES + ("all",), default="all", help="batch shape (module docstring)")
    p.add_argument("--packing", nargs="+", choices=PACKINGS, default=list(PACKINGS), help="packings to run")
    p.add_argument("--prompts", type=int, default=None, help="prompts in the rollout batch (default: 6 for spread, "
                   "4 for shared_2k)")
    p.add_argument("--group-size", type=int, default=8, help="responses per prompt (G)")
    p.add_argument("--width", type=int, default=64, help="LM hidden size (vocabulary = width x 152064 / 3584)")
    p.add_argument("--layers", type=int, default=3, help="LM decoder layers")
    p.add_argument("--max-tokens", type=int, default=8192, help="token budget of a packed stream")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per padded micro-batch of 'none' (default: 24 for spread, 8 for shared_2k)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each measured process")
    p.add_argument("--seed", type=int, default=0, help="lengths, tokens and weights seed")
    add_json(p, "the measurements")
    a = p.parse_args(argv)
    for flag in ("group_size", "width", "layers", "max_tokens", "threads"):
        check.at_least(getattr(a, flag), 1, f"--{flag.replace('_', '-')}")
    check.at_least(a.group_size, 2, "--group-size")
    for flag in ("prompts", "micro_batch_size"):
        if getattr(a, flag) is not None:
            check.at_least(getattr(a, flag), 1, f"--{flag.replace('_', '-')}")
    vocab = int(round(a.width * VOCAB_PER_WIDTH / 8)) * 8
    rows = []
    for case in (CASES if a.case == "all" else (a.case,)):
        args = {"prompts": a.prompts or DEFAULT_PROMPTS[case], "group_size": a.group_size, "width": a.width,
                "vocab": vocab,
                "layers": a.layers, "max_tokens": a.max_tokens, "threads": a.threads, "seed": a.seed,
                "micro_batch_size": a.micro_batch_size or DEFAULT_MBS[case]}
        for packing in a.packing:
            print(f"{case} / {packing} ...", file=sys.stderr, flush=True)
            rows.append(_run_child(case, packing, args))
    summary = summarise(rows)
    result = {"width": a.width, "vocab": vocab, "layers": a.layers, "group_size": a.group_size,
              "max_tokens": a.max_tokens, "threads": a.threads, "rows": rows, "summary": summary}
    print(json.dumps(result) if a.json else _table(rows, summary))
    return 0


def cli() -> None:
    """``python tools/bench/packing.py`` and ``python -m megatron_ral.bench.packing``."""
    run_main(prog_name("packing.py"), main)


if __name__ == "__main__":
    cli()
