"""Benchmark the attention-policy capture against the eager all-heads reference; prints one JSON object.

    python tools/bench/attention_capture.py [--lengths 2048 8192 16384] [--rows 256 1024] [--head-dim 128]
        [--eager-cap-gib 8] [--repeats 2] [--out FILE.json]
"""

from __future__ import annotations

import json
import sys

from megatron_ral.arguments import ToolParser
from megatron_ral.attention.benchmark import run_benchmark
from megatron_ral.entry import prog_name, run_main


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


if __name__ == "__main__":
    run_main(prog_name("attention_capture.py"), main)
