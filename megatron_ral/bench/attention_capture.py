"""Time and peak memory of the attention-policy capture against the eager reference (CPU measurement).

Each (implementation, T, R) case runs in a fresh Python subprocess so that allocations of one case
cannot hide in another. Peak memory is the rise of the process's resident set during one
forward+backward: the kernel's peak-RSS counter (VmHWM) is reset through /proc/self/clear_refs after
the inputs and the upstream gradient exist and a small warm-up ran, and the peak minus the RSS at that
point is reported. glibc is told to serve every allocation above 64 KiB by mmap and to return it on
free (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so the RSS follows live tensor memory.

Used by ``tools/bench/attention_capture.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from megatron_ral.cli.arguments import ToolParser
from megatron_ral.cli.entry import prog_name, run_main

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class CaseSpec:
    """One measurement: ``impl`` is "capture" or "eager"; R response rows at the end of T keys, batch 1."""

    impl: str
    num_keys: int
    num_rows: int
    heads: int = 28
    kv_heads: int = 4
    head_dim: int = 128
    repeats: int = 2
    workspace_mib: int = 256
    threads: int = 1
    seed: int = 0


def eager_peak_estimate_bytes(spec: CaseSpec) -> int:
    """Upper estimate of the eager reference's extra peak: about 4 live H x R x T fp32 tensors."""
    return 4 * spec.heads * spec.num_rows * spec.num_keys * 4


def mem_status() -> dict[str, int]:
    """This process's resident set and its peak (bytes) from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (False where the kernel refuses: the peak is then since start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _inputs(spec: CaseSpec):
    from megatron_ral.attention.layout import response_row_layout

    g = torch.Generator().manual_seed(spec.seed)
    t, r = spec.num_keys, spec.num_rows
    layout = response_row_layout([t - r], [t])
    q = torch.randn(r, 1, spec.heads, spec.head_dim, generator=g).requires_grad_()
    k = torch.randn(t, 1, spec.kv_heads, spec.head_dim, generator=g).requires_grad_()
    grad = torch.randn(1, r, t, generator=g)
    return q, k, layout, grad


def _runner(spec: CaseSpec):
    from megatron_ral.attention.policy import ChunkConfig, attention_policy
    from megatron_ral.attention.reference import attention_policy_reference

    if spec.impl == "capture":
        chunk = ChunkConfig(workspace_bytes=spec.workspace_mib * MIB)
        return lambda q, k, layout: attention_policy(q, k, layout, chunk=chunk)
    if spec.impl == "eager":
        return attention_policy_reference
    raise ValueError(f"unknown impl {spec.impl!r}")


def measure_case(spec: CaseSpec) -> dict:
    """Run one case in this process (call it in a fresh process): timings and peak extra memory."""
    torch.set_num_threads(spec.threads)
    fn = _runner(spec)
    # warm-up on a small problem of the same layout (thread pools, kernels), not on the measured shape
    small = CaseSpec(spec.impl, 256, 64, spec.heads, spec.kv_heads, spec.head_dim, seed=spec.seed + 1)
    q, k, layout, grad = _inputs(small)
    fn(q, k, layout).backward(grad)
    del q, k, layout, grad

    q, k, layout, grad = _inputs(spec)
    fwd_times, total_times, cpu_times = [], [], []
    peak = None
    exact_peak = reset_peak()
    base = mem_status()["VmRSS"]
    for i in range(max(1, spec.repeats)):
        q.grad = k.grad = None
        c0 = time.process_time()
        t0 = time.perf_counter()
        p = fn(q, k, layout)
        t1 = time.perf_counter()
        p.backward(grad)
        t2 = time.perf_counter()
        cpu_times.append(time.process_time() - c0)
        del p
        if i == 0:
            peak = mem_status()["VmHWM"] - base
        fwd_times.append(t1 - t0)
        total_times.append(t2 - t0)
    return {
        "fwd_s": min(fwd_times),
        "fwd_bwd_s": min(total_times),
        "fwd_bwd_s_all": [round(x, 4) for x in total_times],
        "fwd_bwd_cpu_s": min(cpu_times),
        "peak_extra_bytes": int(peak),
        "peak_extra_gib": round(peak / GIB, 4),
        "peak_method": "VmHWM reset via clear_refs" if exact_peak else "ru_maxrss (no reset available)",
        "inputs_bytes": int((q.numel() + k.numel() + grad.numel()) * 4),
    }


def measure_case_subprocess(spec: CaseSpec, timeout: float = 3600.0) -> dict:
    """``measure_case`` in a fresh interpreter with allocator settings that make RSS track tensors."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(spec.threads),
        MKL_NUM_THREADS=str(spec.threads),
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="0",
    )
    code = (
        "import json, sys\n"
        "from megatron_ral.bench.attention_capture import CaseSpec, measure_case\n"
        "spec = CaseSpec(**json.loads(sys.argv[1]))\n"
        "print('RESULT ' + json.dumps(measure_case(spec)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(spec))], env=env,
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"status": "ok", **json.loads(line[len("RESULT "):])}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"status": "failed", "returncode": proc.returncode, "error": " | ".join(tail)}


def old_policy_storage(lengths: list[int], rows: list[int], heads: int = 28, kv_heads: int = 4,
                       head_dim: int = 128, tp_sizes: tuple[int, ...] = (1, 4)) -> list[dict]:
    """Bytes per sample per rank held by each old-policy store, measured on real stores (bf16 Q/K,
    bf16 and fp16 rows) at the model's full width."""
    from megatron_ral.attention.layout import response_row_layout
    from megatron_ral.attention.old_policy import (
        CapturedQK,
        OldPolicyConfig,
        RowStore,
        make_old_policy_store,
    )

    out = []
    for t in lengths:
        for r in rows:
            if r > t:
                continue
            layout = response_row_layout([t - r], [t])
            entry = {"T": t, "R": r}
            for tp in tp_sizes:
                q = torch.zeros(r, 1, heads // tp, head_dim, dtype=torch.bfloat16)
                k = torch.zeros(t, 1, kv_heads // tp, head_dim, dtype=torch.bfloat16)
                qk = make_old_policy_store(OldPolicyConfig(mode="qk"))
                qk.put(0, CapturedQK(q, k, layout))
                entry[f"qk_bf16_tp{tp}_bytes"] = qk.nbytes()
            for name in ("bf16", "fp16"):
                rs = RowStore(OldPolicyConfig(mode="rows", dtype=name))
                rs.put_rows(0, torch.zeros(1, r, t))
                entry[f"rows_{name}_bytes"] = rs.nbytes()
            for tp in tp_sizes:
                entry[f"rows_bf16_over_qk_tp{tp}"] = round(entry["rows_bf16_bytes"] / entry[f"qk_bf16_tp{tp}_bytes"], 3)
            out.append(entry)
    return out


def old_policy_exactness(num_keys: int = 2048, num_rows: int = 256, heads: int = 28, kv_heads: int = 4,
                         head_dim: int = 32, seed: int = 0) -> dict:
    """Attention-loss gradient at theta = theta_old (should be 0) with each store, against the gradient
    after the queries moved by 1% (the signal RAL acts on), plus the time of one store ``get``."""
    from megatron_ral.attention.divergence import jsd
    from megatron_ral.attention.layout import gather_rows, response_row_layout
    from megatron_ral.attention.old_policy import (
        CapturedQK,
        OldPolicyConfig,
        make_old_policy_store,
    )
    from megatron_ral.attention.policy import attention_policy

    g = torch.Generator().manual_seed(seed)
    layout = response_row_layout([num_keys - num_rows], [num_keys])
    q_full = torch.randn(num_keys, 1, heads, head_dim, generator=g).to(torch.bfloat16)
    k = torch.randn(num_keys, 1, kv_heads, head_dim, generator=g).to(torch.bfloat16)
    q = gather_rows(q_full, layout)
    cap = CapturedQK(q, k, layout)
    res = {"T": num_keys, "R": num_rows, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
           "inputs_dtype": "bf16"}

    def grad_norm(q_now: torch.Tensor, p_old: torch.Tensor) -> float:
        qq = q_now.clone().requires_grad_()
        loss = jsd(attention_policy(qq, k, layout), p_old).mean()
        (gq,) = torch.autograd.grad(loss, (qq,))
        return float(gq.float().norm())

    for name, cfg in (("qk", OldPolicyConfig(mode="qk")), ("rows_bf16", OldPolicyConfig(mode="rows", dtype="bf16")),
                      ("rows_fp16", OldPolicyConfig(mode="rows", dtype="fp16"))):
        store = make_old_policy_store(cfg)
        with torch.no_grad():
            store.put(0, cap)
        t0 = time.perf_counter()
        p_old = store.get(0)
        res[f"{name}_get_s"] = round(time.perf_counter() - t0, 4)
        res[f"{name}_grad_norm_at_old_weights"] = grad_norm(q, p_old)
    with torch.no_grad():
        p_old = attention_policy(q, k, layout)
    moved = (q.float() * (1 + 0.01 * torch.randn(q.shape, generator=g))).to(torch.bfloat16)
    res["grad_norm_after_1pct_query_change"] = grad_norm(moved, p_old)
    return res


def run_benchmark(lengths: list[int], rows: list[int], heads: int = 28, kv_heads: int = 4, head_dim: int = 128,
                  repeats: int = 2, eager_cap_gib: float = 8.0, workspace_mib: int = 256, threads: int = 1,
                  log=None) -> dict:
    """All cases side by side, scaling in T, goal checks and old-policy storage figures (one JSON object)."""
    cases = []
    for r in rows:
        for t in lengths:
            row = {"T": t, "R": r, "loadavg_1min": round(os.getloadavg()[0], 2)}
            for impl in ("capture", "eager"):
                spec = CaseSpec(impl, t, r, heads, kv_heads, head_dim, 1, workspace_mib, threads)
                if impl == "eager" and eager_peak_estimate_bytes(spec) > eager_cap_gib * GIB:
                    est = eager_peak_estimate_bytes(spec) / GIB
                    row[impl] = {"status": "skipped",
                                 "reason": f"did not fit: estimated {est:.1f} GiB > cap {eager_cap_gib} GiB"}
                    if log:
                        log(f"T={t} R={r} {impl}: {json.dumps(row[impl])}")
            # repeats alternate between the implementations, each in a fresh process, so that a change in
            # machine load hits both alike; time = min over repeats, peak memory = max over repeats
            runs: dict[str, list[dict]] = {"capture": [], "eager": []}
            for _ in range(max(1, repeats)):
                for impl in ("capture", "eager"):
                    if impl in row:
                        continue
                    spec = CaseSpec(impl, t, r, heads, kv_heads, head_dim, 1, workspace_mib, threads)
                    runs[impl].append(measure_case_subprocess(spec))
            for impl, results in runs.items():
                if impl in row:
                    continue
                ok = [x for x in results if x.get("status") == "ok"]
                if not ok:
                    row[impl] = results[0]
                else:
                    row[impl] = {
                        "status": "ok",
                        "fwd_s": round(min(x["fwd_s"] for x in ok), 4),
                        "fwd_bwd_s": round(min(x["fwd_bwd_s"] for x in ok), 4),
                        "fwd_bwd_s_all": [round(x["fwd_bwd_s"], 4) for x in ok],
                        "fwd_bwd_cpu_s": round(min(x["fwd_bwd_cpu_s"] for x in ok), 4),
                        "fwd_bwd_cpu_s_all": [round(x["fwd_bwd_cpu_s"], 4) for x in ok],
                        "peak_extra_bytes": max(x["peak_extra_bytes"] for x in ok),
                        "peak_extra_gib": round(max(x["peak_extra_bytes"] for x in ok) / GIB, 4),
                        "peak_extra_bytes_all": [x["peak_extra_bytes"] for x in ok],
                    }
                if log:
                    log(f"T={t} R={r} {impl}: {json.dumps(row[impl])}")
            cap, eag = row["capture"], row["eager"]
            if cap.get("status") == "ok" and eag.get("status") == "ok":
                row["memory_ratio_capture_over_eager"] = round(cap["peak_extra_bytes"] / max(eag["peak_extra_bytes"], 1), 4)
                row["time_ratio_capture_over_eager"] = round(cap["fwd_bwd_cpu_s"] / eag["fwd_bwd_cpu_s"], 3)
                row["wall_time_ratio_capture_over_eager"] = round(cap["fwd_bwd_s"] / eag["fwd_bwd_s"], 3)
            cases.append(row)

    scaling = {}
    for r in rows:
        pts = [(c["T"], c["capture"]) for c in cases if c["R"] == r and c["capture"].get("status") == "ok"]
        if len(pts) >= 2:
            t0, c0 = pts[0]
            scaling[f"R={r}"] = [
                {"T": t, "T_ratio": t / t0, "time_ratio": round(c["fwd_bwd_cpu_s"] / c0["fwd_bwd_cpu_s"], 3),
                 "memory_ratio": round(c["peak_extra_bytes"] / max(c0["peak_extra_bytes"], 1), 3)}
                for t, c in pts
            ]

    compared = [c for c in cases if "memory_ratio_capture_over_eager" in c]
    goals = {
        "memory_le_1_8_of_eager": {
            "met": all(c["memory_ratio_capture_over_eager"] <= 1 / 8 for c in compared) if compared else None,
            "worst_ratio": max((c["memory_ratio_capture_over_eager"] for c in compared), default=None),
        },
        "time_le_1_5x_eager": {
            "met": all(c["time_ratio_capture_over_eager"] <= 1.5 for c in compared) if compared else None,
            "worst_ratio": max((c["time_ratio_capture_over_eager"] for c in compared), default=None),
        },
        "linear_in_T": {
            "note": "time_ratio and memory_ratio should track T_ratio (per R)",
            "worst_time_ratio_over_T_ratio": max(
                (p["time_ratio"] / p["T_ratio"] for pts in scaling.values() for p in pts), default=None),
            "worst_memory_ratio_over_T_ratio": max(
                (p["memory_ratio"] / p["T_ratio"] for pts in scaling.values() for p in pts), default=None),
        },
    }
    return {
        "benchmark": "attention_capture",
        "layout": {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "batch": 1,
                   "dtype": "float32", "model_head_dim": 128,
                   "width_note": ("head_dim scaled down from 128 for CPU time" if head_dim != 128
                                  else "full 7B head width")},
        "machine": {"device": "cpu", "threads": threads, "cpu_count": os.cpu_count(),
                    "loadavg_at_start": os.getloadavg(), "torch": torch.__version__},
        "method": {"peak_memory": "fresh subprocess per case; VmHWM reset after inputs exist; peak - RSS",
                   "time": (f"min of {repeats} forward+backward runs, each in a fresh process after a small "
                            "warm-up, alternating capture/eager; ratios and scaling use process CPU time "
                            "(single thread, robust to other load on a shared machine), wall time also given"),
                   "eager_cap_gib": eager_cap_gib, "capture_workspace_mib": workspace_mib},
        "cases": cases,
        "scaling_capture": scaling,
        "goals": goals,
        "old_policy_storage": old_policy_storage(lengths + [32768], rows + [4096], heads, kv_heads, 128),
        "old_policy_exactness": old_policy_exactness(heads=heads, kv_heads=kv_heads, head_dim=min(head_dim, 32)),
    }


__all__ = ["CaseSpec", "eager_peak_estimate_bytes", "measure_case", "measure_case_subprocess",
           "old_policy_exactness", "old_policy_storage", "run_benchmark"]


# --- the command (tools/bench/attention_capture.py) -----------------------

def main(argv: list[str] | None = None) -> int:
    ap = ToolParser(prog=prog_name("attention_capture.py"), description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384], help="sequence lengths T")
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 1024], help="response rows R")
    ap.add_argument("--heads", type=int, default=28, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=4, help="key/value heads (GQA groups)")
    ap.add_argument("--head-dim", type=int, default=128, help="scale down for CPU time (reported in the JSON)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per case (the best is reported)")
    ap.add_argument("--eager-cap-gib", type=float, default=8.0, help="skip eager cases estimated above this")
    ap.add_argument("--workspace-mib", type=int, default=256, help="capture chunk workspace budget")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)

    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run_benchmark(args.lengths, args.rows, args.heads, args.kv_heads, args.head_dim, args.repeats,
                           args.eager_cap_gib, args.workspace_mib, args.threads, log=log)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def cli() -> None:
    """``python tools/bench/attention_capture.py`` and ``python -m megatron_ral.bench.attention_capture``."""
    run_main(prog_name("attention_capture.py"), main)


if __name__ == "__main__":
    cli()
