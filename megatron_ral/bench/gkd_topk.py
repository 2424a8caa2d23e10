"""Error of top-k + tail GKD against the exact divergence (tools/bench/gkd_topk.py; README figures).

A test batch of teacher logits from three families over a vocabulary of ``vocab`` ids, ``tokens`` positions
each, in float64:

- ``flat``: i.i.d. N(0, 1) logits (the top-k holds little mass: the worst case);
- ``peaked``: i.i.d. N(0, 4^2) logits;
- ``zipf``: logits -1.1 ln(rank) + N(0, 0.3^2) over a random permutation of the ids (a language-model-like
  long tail);

and student logits = teacher logits + N(0, ``noise``^2) (a student close to, but not at, the teacher). For
each family, divergence and k it reports the token means of the exact divergence and of the top-k + tail
one (``distill.topk``: always <= exact), their relative gap (exact - top-k) / exact, the teacher's mean top-k
mass, and the cosine between the top-k and the exact gradients w.r.t. the student's logits.
"""

from __future__ import annotations

import argparse
import json

import torch

from megatron_ral.distill.gkd import GKD_DIVERGENCES, gkd_divergence
from megatron_ral.distill.topk import gkd_topk_divergence, teacher_topk

FAMILIES = ("flat", "peaked", "zipf")


def teacher_logits(family: str, tokens: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """[tokens, vocab] float64 teacher logits of one family (module docstring)."""
    if family == "flat":
        return torch.randn(tokens, vocab, generator=gen, dtype=torch.float64)
    if family == "peaked":
        return 4.0 * torch.randn(tokens, vocab, generator=gen, dtype=torch.float64)
    if family == "zipf":
        ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
        base = -1.1 * torch.log(ranks) + 0.3 * torch.randn(tokens, vocab, generator=gen, dtype=torch.float64)
        perm = torch.stack([torch.randperm(vocab, generator=gen) for _ in range(tokens)])
        return torch.empty_like(base).scatter_(1, perm, base)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _value_and_grad(fn, student: torch.Tensor, *args) -> tuple[float, torch.Tensor]:
    x = student.clone().requires_grad_()
    v = fn(x, *args)
    (g,) = torch.autograd.grad(v.mean(), x)
    return float(v.detach().mean()), g


def topk_error_table(vocab: int = 4096, tokens: int = 32, ks=(1, 8, 64, 512), noise: float = 1.0,
                     beta: float = 0.5, temperature: float = 1.0, seed: int = 0) -> list[dict]:
    """One row per (family, divergence, k); see the module docstring for the columns."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for family in FAMILIES:
        t = teacher_logits(family, tokens, vocab, gen)
        s = t + noise * torch.randn(t.shape, generator=gen, dtype=torch.float64)
        for name in GKD_DIVERGENCES:
            exact, g_exact = _value_and_grad(gkd_divergence, s, t, name, beta, temperature)
            for k in ks:
                top = teacher_topk(t, k, temperature)
                approx, g_top = _value_and_grad(gkd_topk_divergence, s, top, name, beta, temperature)
                cos = torch.nn.functional.cosine_similarity(g_top.flatten(), g_exact.flatten(), dim=0)
                rows.append({
                    "family": family, "divergence": name, "k": k, "exact": exact, "topk": approx,
                    "rel_error": (exact - approx) / exact if exact else 0.0,
                    "teacher_topk_mass": float(top.logprobs.exp().sum(-1).mean()),
                    "grad_cos": float(cos),
                })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size of the test batch")
    p.add_argument("--tokens", type=int, default=32, help="token positions per family")
    p.add_argument("--k", type=int, nargs="+", default=[1, 8, 64, 512], help="top-k sizes to measure")
    p.add_argument("--noise", type=float, default=1.0, help="std of the student's logit offset from the teacher")
    p.add_argument("--beta", type=float, default=0.5, help="beta of the jsd divergence")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of both sides")
    p.add_argument("--seed", type=int, default=0, help="random seed of the batch")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    args = p.parse_args(argv)
    if any(not 1 <= k <= args.vocab for k in args.k):
        p.error(f"--k values must be in [1, --vocab = {args.vocab}]")
    rows = topk_error_table(args.vocab, args.tokens, tuple(args.k), args.noise, args.beta, args.temperature, args.seed)
    if args.json:
        print(json.dumps({"vocab": args.vocab, "tokens": args.tokens, "noise": args.noise, "rows": rows}))
        return 0
    print(f"{'family':8} {'divergence':11} {'k':>5} {'exact':>9} {'top-k':>9} {'rel.err':>8} {'mass':>6} {'gradcos':>7}")
    for r in rows:
        print(f"{r['family']:8} {r['divergence']:11} {r['k']:>5} {r['exact']:9.4f} {r['topk']:9.4f} "
              f"{r['rel_error']:8.2%} {r['teacher_topk_mass']:6.3f} {r['grad_cos']:7.3f}")
    return 0


def cli() -> None:
    """``python tools/bench/gkd_topk.py`` and ``python -m megatron_ral.bench.gkd_topk``."""
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
