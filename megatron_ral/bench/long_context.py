"""Peak memory per rank and time of one RAL update on long sequences, without and with context parallelism.

For each sequence length T and CP size C, a fresh gloo world of C processes (CPU) builds the 'tiny' test model
(hidden 64, 4 query / 2 KV heads of dim 16, 3 layers, untied; the same seeded weights every time; local layer
spec) and runs, on one text-only sequence of T tokens whose last R are the response:

1. the old pass: a no-grad forward with the attention capture keeping p_old (the "qk" store: Q rows + K);
2. one warm-up update on a short sequence (thread pools, allocator), then
3. the measured update: forward with the gradient capture of the last layer's attention rows (each CP rank
   the rows of the response tokens it holds, against the all-gathered keys), the per-token loss at the
   response positions, the RAL term A * JSD(p_theta || p_old) plus -A * log-prob, and the backward.

Peak memory is the rise of each process's resident set during step 3 (the kernel's peak counter VmHWM is
reset through /proc/self/clear_refs just before it; glibc is told at start-up to serve allocations above
64 KiB by mmap and to give memory back on free, so the resident set follows live tensors); the model, the
stored p_old and the interpreter are in the baseline. "Per rank" is the largest over the C processes.
Time is the wall clock of step 3 (the slowest rank). The machine's other load is reported (1-minute load
average): on a shared machine the times are indicative, the memory is not affected.

Used by ``tools/bench/long_context.py``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass

from megatron_ral.bench.attention_capture import mem_status, reset_peak
from megatron_ral.cli.arguments import ToolParser
from megatron_ral.cli.entry import prog_name, run_main

MIB = 2**20


@dataclass(frozen=True)
class CaseSpec:
    """One measurement: T tokens (the last ``rows`` the response) split over ``cp`` ranks."""

    length: int
    cp: int
    rows: int = 256
    query_block: int = 512
    workspace_mib: int = 16
    threads: int = 1
    seed: int = 0


def _allocator_follows_tensors() -> None:
    """glibc: allocations above 64 KiB by mmap, memory returned on free (see the module docstring)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 0)      # M_TRIM_THRESHOLD


def _rank_case(spec_json: str) -> dict:
    """One rank of one case (runs in a process of :func:`megatron_ral.testing.spawn.run_distributed`)."""
    import torch

    _allocator_follows_tensors()
    spec = CaseSpec(**json.loads(spec_json))
    torch.set_num_threads(spec.threads)

    from megatron_ral.attention.capture import (
        AttentionCapture,
        CaptureConfig,
        response_layout,
    )
    from megatron_ral.attention.old_policy import OldPolicyConfig, make_old_policy_store
    from megatron_ral.attention.policy import ChunkConfig
    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.models.qwen25vl.core_attention import LocalCoreAttention
    from megatron_ral.platform import initialize
    from megatron_ral.rl import losses as L
    from megatron_ral.testing.models import seeded_megatron_model

    parallel = ParallelConfig(context_parallel_size=spec.cp)
    info = initialize(parallel, seed=1)
    model = seeded_megatron_model("tiny", seed=spec.seed, parallel=parallel)
    for layer in model.language_model.decoder.layers:
        core = layer.self_attention.core_attention
        if isinstance(core, LocalCoreAttention):
            core.query_block = spec.query_block
    model.train()
    capture = AttentionCapture(model, CaptureConfig(chunk=ChunkConfig(workspace_bytes=spec.workspace_mib * MIB)))
    adv = torch.tensor([1.0])

    def inputs(length: int):
        gen = torch.Generator().manual_seed(spec.seed + length)
        ids = torch.randint(0, 900, (1, length), generator=gen)
        rows = min(spec.rows, length // 2)
        plen = length - rows
        return {
            "input_ids": ids,
            "position_ids": torch.arange(length).expand(3, 1, length).clone(),
            "labels": torch.roll(ids, -1, dims=1),
            "loss_index": (plen - 1 + torch.arange(rows))[None],
        }, response_layout([plen], [rows])

    def old_pass(batch, layout, store):
        with torch.no_grad(), capture.capture(layout, grad=False, keep_rows=False, keep_qk=True) as res:
            model(**batch)
        store.put(0, res.qk)

    def update(batch, layout, store):
        with capture.capture(layout, grad=True) as res:
            token_loss = model(**batch)
        p_old = store.get(0)
        attn = res.per_row(L.attention_loss(res.rows, p_old, adv, "jsd"))
        loss = (adv[:, None] * token_loss).mean() + attn.mean()
        loss.backward()
        model.zero_grad()
        return float(loss.detach())

    warm_batch, warm_layout = inputs(min(1024, spec.length))
    warm_store = make_old_policy_store(OldPolicyConfig(mode="qk"))
    old_pass(warm_batch, warm_layout, warm_store)
    update(warm_batch, warm_layout, warm_store)
    del warm_store

    batch, layout = inputs(spec.length)
    store = make_old_policy_store(OldPolicyConfig(mode="qk"))
    old_pass(batch, layout, store)
    torch.distributed.barrier()
    exact = reset_peak()
    base = mem_status()["VmRSS"]
    t0 = time.perf_counter()
    loss = update(batch, layout, store)
    seconds = time.perf_counter() - t0
    peak = mem_status()["VmHWM"]
    torch.distributed.barrier()
    return {"rank": info.rank, "update_s": seconds, "peak_extra_bytes": peak - base, "peak_rss_bytes": peak,
            "baseline_rss_bytes": base, "store_bytes": store.nbytes(), "loss": loss,
            "peak_method": "VmHWM reset via clear_refs" if exact else "VmHWM since start (no reset available)"}


def measure_case(spec: CaseSpec, timeout: float = 3600.0) -> dict:
    """One case in a fresh world of ``spec.cp`` processes: the largest peak and the slowest rank's time."""
    from megatron_ral.testing.spawn import run_distributed

    ranks = run_distributed(_rank_case, spec.cp, json.dumps(asdict(spec)), timeout=timeout,
                            env={"OMP_NUM_THREADS": str(spec.threads), "MKL_NUM_THREADS": str(spec.threads)})
    worst = max(ranks, key=lambda r: r["peak_extra_bytes"])
    return {"T": spec.length, "CP": spec.cp, "R": min(spec.rows, spec.length // 2),
            "update_s": round(max(r["update_s"] for r in ranks), 3),
            "peak_extra_mib_per_rank": round(worst["peak_extra_bytes"] / MIB, 1),
            "peak_extra_mib_by_rank": [round(r["peak_extra_bytes"] / MIB, 1) for r in ranks],
            "peak_rss_mib_per_rank": round(max(r["peak_rss_bytes"] for r in ranks) / MIB, 1),
            "p_old_store_mib_by_rank": [round(r["store_bytes"] / MIB, 2) for r in ranks],
            "loss": ranks[0]["loss"], "peak_method": worst["peak_method"],
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def summarise(cases: list[dict], lengths: list[int], cps: list[int]) -> dict:
    """Ratios CP=c / CP=1 of the peak per rank at each T, the growth of each CP size's peak per doubling of
    T, and the goal checks (peak at CP=2 <= 0.6 x CP=1 for T >= 16k; growth no worse than linear, the
    blocked/flash attention's own)."""
    by = {(c["T"], c["CP"]): c for c in cases if "peak_extra_mib_per_rank" in c}
    ratios, growth = [], []
    for t in lengths:
        one = by.get((t, 1))
        for cp in cps:
            got = by.get((t, cp))
            if cp > 1 and one and got:
                ratios.append({"T": t, "CP": cp, "peak_ratio": round(got["peak_extra_mib_per_rank"] /
                                                                     one["peak_extra_mib_per_rank"], 3),
                               "time_ratio": round(got["update_s"] / one["update_s"], 3)})
    for cp in cps:
        ts = [t for t in lengths if (t, cp) in by]
        for a, b in zip(ts, ts[1:]):
            growth.append({"CP": cp, "T": [a, b], "length_ratio": round(b / a, 3),
                           "peak_growth": round(by[(b, cp)]["peak_extra_mib_per_rank"] /
                                                by[(a, cp)]["peak_extra_mib_per_rank"], 3)})
    goal = [r for r in ratios if r["CP"] == 2 and r["T"] >= 16384]
    return {
        "ratios": ratios, "growth": growth,
        "goal_peak_cp2_le_0.6x_at_16k_plus": (all(r["peak_ratio"] <= 0.6 for r in goal) if goal else None),
        "goal_growth_at_most_linear": (all(g["peak_growth"] <= g["length_ratio"] * 1.05 for g in growth)
                                       if growth else None),
    }


def run_benchmark(lengths: list[int], cps: list[int], rows: int, query_block: int, workspace_mib: int,
                  threads: int, budget_s: float | None = None, log=None) -> dict:
    """Every (T, CP) case, shortest first; stops starting new lengths once ``budget_s`` is spent."""
    cases, t_start = [], time.perf_counter()
    for t in sorted(lengths):
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            for cp in cps:
                cases.append({"T": t, "CP": cp, "status": "not run", "reason": f"time budget of {budget_s:.0f} s spent"})
            continue
        for cp in cps:
            spec = CaseSpec(t, cp, rows, query_block, workspace_mib, threads)
            try:
                case = {"status": "ok", **measure_case(spec)}
            except RuntimeError as e:
                case = {"T": t, "CP": cp, "status": "failed", "error": str(e).splitlines()[-1][:300]}
            cases.append(case)
            if log:
                log(json.dumps(case))
    return {"model": "tiny (hidden 64, 4 heads / 2 KV heads of dim 16, 3 layers)", "rows": rows,
            "query_block": query_block, "capture_workspace_mib": workspace_mib, "threads": threads,
            "cases": cases, "summary": summarise(cases, sorted(lengths), cps)}


# --- the command (tools/bench/long_context.py) -------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = ToolParser(prog=prog_name("long_context.py"), description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768], help="sequence lengths T")
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2], help="context-parallel sizes (processes per case)")
    ap.add_argument("--rows", type=int, default=256, help="response tokens R (the captured rows)")
    ap.add_argument("--query-block", type=int, default=512, help="queries per block of the CP core attention")
    ap.add_argument("--workspace-mib", type=int, default=16, help="attention-capture chunk workspace budget")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new length after this many seconds (default: run all)")
    ap.add_argument("--json", action="store_true", help="one JSON object (the default prints it indented)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if min(args.cp) < 1 or any(t % (2 * c) for t in args.lengths for c in args.cp):
        ap.error("--lengths must be multiples of 2 x every --cp value (>= 1)")
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run_benchmark(args.lengths, args.cp, args.rows, args.query_block, args.workspace_mib, args.threads,
                           args.budget_s, log)
    text = json.dumps(result) if args.json else json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    return 0


def cli() -> None:
    """``python tools/bench/long_context.py`` and ``python -m megatron_ral.bench.long_context``."""
    run_main(prog_name("long_context.py"), main)


if __name__ == "__main__":
    cli()
