"""Benchmark the HF <-> Megatron converters on a random checkpoint with the real Qwen2.5-VL shapes.

Writes the random bf16 checkpoint, converts HF -> Megatron and back (each in a fresh process), checks the
round trip is bit-exact, copies the same HF files with a plain file copy for reference, and prints one JSON
object: seconds (modules imported beforehand; import time reported apart), MB/s and peak RSS of each step
(the child process's VmHWM; Linux only).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_ral.cli.arguments import ToolParser
from megatron_ral.cli.entry import prog_name, run_main

GiB = 1024**3


def _rss() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in bytes. The peak is the kernel's VmHWM of this process's own
    address space (ru_maxrss would also count the parent's RSS at fork time, which exec carries over)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _child(argv: list[str]) -> None:
    """Run one step in this fresh process and print {"seconds", "peak_rss_bytes", "base_rss_bytes", ...}."""
    step, a, b = argv
    t_import = time.perf_counter()
    if step != "copy":  # the conversions need torch (and megatron for the vocabulary padding rule); a copy does not
        import megatron_ral.models.qwen25vl.provider  # noqa: F401
        from megatron_ral.checkpoint import convert
        from megatron_ral.tiny import random_checkpoint
    import_s = time.perf_counter() - t_import
    base, _ = _rss()
    t0 = time.perf_counter()
    extra = {}
    if step == "hf_to_megatron":
        convert.hf_to_megatron(a, b)
    elif step == "megatron_to_hf":
        convert.megatron_to_hf(a, b)
    elif step == "copy":
        Path(b).mkdir(parents=True)
        for f in sorted(Path(a).iterdir()):
            if f.is_file():
                shutil.copyfile(f, Path(b) / f.name)
                with open(Path(b) / f.name, "rb+") as fh:
                    os.fsync(fh.fileno())
    elif step == "compare":
        extra["difference"] = random_checkpoint.first_difference(a, b)
    else:
        raise SystemExit(f"unknown step {step}")
    seconds = time.perf_counter() - t0
    _, peak = _rss()
    print(json.dumps({"seconds": seconds, "import_seconds": import_s, "peak_rss_bytes": peak, "base_rss_bytes": base,
                      **extra}))


def _run_step(step: str, a: Path, b: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-m", "megatron_ral.bench.convert_memory", "--_child", step, str(a), str(b)], env=env,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"step {step} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_child":
        _child(sys.argv[2:])
        return 0
    from megatron_ral.tiny.random_checkpoint import (
        REAL_SHAPES,
        real_shape_config,
        tensor_plans,
    )

    parser = ToolParser(prog=prog_name("convert_memory.py"), description=__doc__)
    parser.add_argument("--shape", default="qwen2.5-vl-3b", choices=sorted(REAL_SHAPES), help="released model shapes")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the checkpoints are written")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = parser.parse_args(argv)

    weights = sum(p.nbytes for p in tensor_plans(real_shape_config(args.shape)))
    free = shutil.disk_usage(args.workdir).free
    if free < 4.2 * weights:
        raise SystemExit(f"{args.workdir}: {free / GiB:.1f} GiB free, need ~{4.2 * weights / GiB:.1f} GiB "
                         f"(source, Megatron, converted back, copy)")
    root = Path(tempfile.mkdtemp(prefix=f"convert-bench-{args.shape}-", dir=args.workdir))
    try:
        from megatron_ral.tiny.random_checkpoint import write_random_hf_checkpoint

        t0 = time.perf_counter()
        print(f"writing random {args.shape} checkpoint ({weights / GiB:.2f} GiB) to {root / 'hf'}", file=sys.stderr)
        write_random_hf_checkpoint(root / "hf", args.shape)
        make_s = time.perf_counter() - t0
        steps = {
            "file_copy": _run_step("copy", root / "hf", root / "copy"),
            "hf_to_megatron": _run_step("hf_to_megatron", root / "hf", root / "mcore"),
            "megatron_to_hf": _run_step("megatron_to_hf", root / "mcore", root / "hf_back"),
        }
        compare = _run_step("compare", root / "hf", root / "hf_back")
        result = {"shape": args.shape, "weights_gib": round(weights / GiB, 3),
                  "megatron_ckpt_gib": round(_dir_bytes(root / "mcore") / GiB, 3),
                  "random_checkpoint_write_s": round(make_s, 1),
                  "round_trip_bit_exact": compare["difference"] is None}
        if compare["difference"]:
            result["difference"] = compare["difference"]
        for name, r in steps.items():
            result[name] = {"seconds": round(r["seconds"], 1), "import_seconds": round(r["import_seconds"], 1),
                            "MB_per_s": round(weights / 1e6 / r["seconds"], 1),
                            "peak_rss_gib": round(r["peak_rss_bytes"] / GiB, 3),
                            "rss_after_imports_gib": round(r["base_rss_bytes"] / GiB, 3)}
        copy_s = steps["file_copy"]["seconds"]
        result["slowdown_vs_copy"] = {k: round(steps[k]["seconds"] / copy_s, 2)
                                      for k in ("hf_to_megatron", "megatron_to_hf")}
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def cli() -> None:
    """``python tools/bench/convert_memory.py`` and ``python -m megatron_ral.bench.convert_memory``."""
    run_main(prog_name("convert_memory.py"), main)


if __name__ == "__main__":
    cli()
