"""Next-token sampling: temperature, top-k, top-p (nucleus) and greedy, with one RNG per response.

Each response row owns a ``torch.Generator`` seeded from (seed, data-parallel rank, prompt index,
sample index), so a response's tokens do not depend on which other rows share its batch, on how a
batch is split to fit the KV cache, or on the tensor/pipeline layout: a run is reproducible.

Sampling uses the exponential race: with q_i ~ Exp(1) independent, argmax_i p_i / q_i is
distributed as Categorical(p).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 (or ``greedy``) = argmax; top_k 0 = off; top_p 1 = off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0

    @classmethod
    def from_config(cls, config, greedy: bool = False) -> "SamplingParams":
        """From a GenerationConfig (temperature / top_p / top_k)."""
        return cls(temperature=float(config.temperature), top_p=float(config.top_p), top_k=int(config.top_k),
                   greedy=greedy)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed mixed from ``seed`` and integer keys (splitmix64 chain)."""
    h = _splitmix64(int(seed) & _MASK64)
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h & ((1 << 63) - 1)


def row_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(row_seed(seed, *keys))
    return gen


def scaled_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) in fp32 (T = 1 when temperature is 0, i.e. greedy)."""
    t = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits.float() / t, dim=-1)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampled from: softmax(logits / T) restricted to the top-k logits, then to the
    smallest set of most likely tokens whose mass reaches top_p (the token crossing top_p is kept),
    renormalised. (B, V) fp32."""
    scaled = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None = None,
    suppress: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits`` (B, V); the ids in ``suppress`` are never chosen.

    Returns (tokens (B,) long, log-probs (B,) fp32). The log-prob is log softmax(logits / T) at the
    chosen token (the temperature-scaled model distribution over the whole vocabulary, before top-k /
    top-p truncation and before suppression; T = 1 for greedy), which is what a trainer recomputes as
    the old log-prob.
    """
    logp = scaled_log_probs(logits, params.temperature)
    if suppress is not None:
        logits = logits.index_fill(-1, suppress.to(logits.device), float("-inf"))
    if params.is_greedy:
        tokens = torch.argmax(logits, dim=-1)
    else:
        if generators is None or len(generators) != logits.shape[0]:
            raise ValueError("sampling needs one torch.Generator per row")
        probs = filtered_probs(logits, params)
        race = torch.empty_like(probs)
        for row, gen in enumerate(generators):
            race[row].exponential_(generator=gen)
        tokens = torch.argmax(probs / race, dim=-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
