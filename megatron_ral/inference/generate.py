"""Batched generation on the megatron Qwen2.5-VL model: G responses per prompt from one prefill.

    responses = generate(model, prompts, GenerationConfig(...), num_samples=8, seed=step,
                         stop_token_ids=[im_end, endoftext])
    responses[i][j]  # Response j of prompt i

Every rank of a model-parallel group calls this with the same prompts. Per chunk of prompts (sized
to the KV-cache token budget): the vision tower encodes each prompt once, the prompts are
prefilled together, the cache rows are repeated G times, then one-token decode steps run until
every row has produced a stop token or max_new_tokens. Rows that finish are dropped from the batch
once enough of them accumulate (their cache rows are freed and later steps skip them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from megatron_ral.inference.attention import rotated_cache_supported
from megatron_ral.inference.kv_cache import Chunk, plan_chunks
from megatron_ral.inference.pipeline import StageComm
from megatron_ral.inference.prompts import PromptInput
from megatron_ral.inference.sampling import SamplingParams, row_generator, sample_tokens
from megatron_ral.inference.session import DecodeSession

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass
class Response:
    """One generated response. ``token_ids`` are the generated tokens only (a stop token, when one
    ended the response, is included); ``logprobs`` their log-probs under softmax(logits / T)."""

    prompt_index: int
    sample_index: int
    prompt_length: int
    token_ids: torch.Tensor
    logprobs: torch.Tensor
    finish_reason: str

    @property
    def length(self) -> int:
        return int(self.token_ids.numel())


@dataclass
class GenerationStats:
    """Timings of a generate() call (filled in when passed in): wall clock, and this process's CPU
    time (``*_cpu_seconds``, insensitive to other processes sharing the cores)."""

    prefill_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    generated_tokens: int = 0
    total_seconds: float = 0.0
    chunks: int = 0
    prefill_cpu_seconds: float = 0.0
    step_cpu_seconds: list[float] = field(default_factory=list)
    total_cpu_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.total_seconds if self.total_seconds > 0 else 0.0


def default_stop_token_ids(hf_config) -> list[int]:
    """EOS ids of an HF Qwen2.5-VL config (top level and text config)."""
    ids: list[int] = []
    for cfg in (hf_config, getattr(hf_config, "text_config", None)):
        eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        for i in ([eos] if isinstance(eos, int) else list(eos or [])):
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def _data_parallel_rank() -> int:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_rank()
    return 0


def _compact_due(dead: int, batch: int) -> bool:
    """Drop finished rows once they are at least an eighth of the batch (a row copy of the whole
    cache costs about one decode step's attention)."""
    return dead > 0 and dead * 8 >= batch


@torch.no_grad()
def _generate_chunk(model, comm: StageComm, prompts: list[PromptInput], chunk: Chunk, params: SamplingParams,
                    max_new_tokens: int, stop: torch.Tensor, suppress: torch.Tensor | None, seed: int,
                    stats: GenerationStats, prompt_keys: list[int] | None = None) -> list[Response]:
    session = DecodeSession(model, comm)
    t0, c0 = time.perf_counter(), time.process_time()
    logits = session.prefill([prompts[i] for i in chunk.prompts], max_new_tokens)
    stats.prefill_seconds += time.perf_counter() - t0
    stats.prefill_cpu_seconds += time.process_time() - c0

    row_prompt = [p for p, s in zip(chunk.prompts, chunk.samples) for _ in s]
    row_sample = [j for s in chunk.samples for j in s]
    index = [k for k, s in enumerate(chunk.samples) for _ in s]
    if len(index) != len(chunk.prompts) or index != list(range(len(index))):
        session.select_rows(index)
        if logits is not None:
            logits = logits[torch.as_tensor(index, device=logits.device)]
    rows = len(index)
    gens = None
    if not params.is_greedy:
        if prompt_keys is not None:
            gens = [row_generator(seed, prompt_keys[row_prompt[r]], row_sample[r], device=session.device)
                    for r in range(rows)]
        else:
            dp = _data_parallel_rank()
            gens = [row_generator(seed, dp, row_prompt[r], row_sample[r], device=session.device) for r in range(rows)]

    tokens: list[list[int]] = [[] for _ in range(rows)]
    logps: list[list[float]] = [[] for _ in range(rows)]
    finish: list[str | None] = [None] * rows
    slots = list(range(rows))  # response row held by each session row
    stop_ids = set(stop.tolist())
    for step in range(max_new_tokens):
        t_step, c_step = time.perf_counter(), time.process_time()
        packed = None
        if comm.is_last:
            tok, lp = sample_tokens(logits, params, [gens[r] for r in slots] if gens is not None else None,
                                    suppress=suppress)
            packed = torch.stack([tok.double(), lp.double()], dim=1)
        packed = comm.broadcast_from_last(packed, (len(slots), 2), torch.float64, session.device)
        tok = packed[:, 0].long()
        # the one host read of a decode step: the sampled tokens and their log-probs
        pairs = packed.tolist()
        tok_list, lp_list = [int(t) for t, _ in pairs], [lp for _, lp in pairs]
        is_stop = [t in stop_ids for t in tok_list]
        live = []
        for j, r in enumerate(slots):
            if finish[r] is not None:
                continue
            tokens[r].append(tok_list[j])
            logps[r].append(lp_list[j])
            if is_stop[j]:
                finish[r] = FINISH_STOP
            elif len(tokens[r]) >= max_new_tokens:
                finish[r] = FINISH_LENGTH
            else:
                live.append(j)
        stats.generated_tokens += sum(1 for r in slots if len(tokens[r]) == step + 1)
        if not live:
            break
        if _compact_due(len(slots) - len(live), len(slots)):
            session.select_rows(live)
            slots = [slots[j] for j in live]
            tok = tok[torch.as_tensor(live, device=tok.device)]
        logits = session.step(tok)
        stats.step_seconds.append(time.perf_counter() - t_step)
        stats.step_cpu_seconds.append(time.process_time() - c_step)

    out = []
    for r in range(rows):
        out.append(Response(
            prompt_index=row_prompt[r], sample_index=row_sample[r], prompt_length=len(prompts[row_prompt[r]]),
            token_ids=torch.tensor(tokens[r], dtype=torch.long),
            logprobs=torch.tensor(logps[r], dtype=torch.float32),
            finish_reason=finish[r] or FINISH_LENGTH,
        ))
    return out


def generate(
    model,
    prompts: list[PromptInput],
    config,
    *,
    num_samples: int = 1,
    seed: int = 0,
    stop_token_ids: list[int] | None = None,
    greedy: bool = False,
    suppress_token_ids: list[int] | None = None,
    stats: GenerationStats | None = None,
    comm: StageComm | None = None,
    prompt_keys: list[int] | None = None,
) -> list[list[Response]]:
    """Generate ``num_samples`` responses for each prompt with the model of this rank's stage.

    ``config``: a GenerationConfig (temperature, top_p, top_k, max_new_tokens, kv_cache_tokens).
    ``greedy`` (or temperature 0) takes the argmax. ``seed`` with the data-parallel rank, prompt
    index and sample index seeds each response's sampler. ``stop_token_ids`` default to the
    model's EOS ids. ``prompt_keys`` (one integer per prompt, e.g. its index in the global batch) replace
    the (data-parallel rank, prompt index) pair in the seeds, so that a prompt's samples do not depend on
    which rank generates them. ``suppress_token_ids`` are never sampled (e.g. the image/video placeholder ids,
    which a response must not contain when it is fed back with the prompt's vision features). The
    model runs in eval mode (restored afterwards). Returns [prompt][sample] Responses on every rank
    of the group.
    """
    if config.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {config.max_new_tokens}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    params = SamplingParams.from_config(config, greedy=greedy)
    comm = comm or StageComm.from_parallel_state()
    stats = stats if stats is not None else GenerationStats()
    if stop_token_ids is None:
        stop_token_ids = default_stop_token_ids(model.hf_config)
    stop = torch.tensor(sorted(set(int(i) for i in stop_token_ids)), dtype=torch.long)
    suppress = (torch.tensor(sorted(set(int(i) for i in suppress_token_ids)), dtype=torch.long)
                if suppress_token_ids else None)
    prompts = [p if isinstance(p, PromptInput) else PromptInput.from_inputs(p) for p in prompts]
    if prompt_keys is not None and len(prompt_keys) != len(prompts):
        raise ValueError(f"{len(prompt_keys)} prompt keys for {len(prompts)} prompts")
    # padded rows need a core attention that applies the padding mask (the project's decode attention
    # does for every spec; TE's own, used only when a capture hook is set, does not)
    rotated = rotated_cache_supported(model)
    allow_padding = rotated or getattr(model, "backend", "local") != "te"
    if model.config.context_parallel_size > 1 and not rotated:
        raise NotImplementedError("generation under context parallelism needs the decode attention (no capture hook "
                                  "set on the last layer, attention_dropout 0): each CP rank generates on its own")
    chunks = plan_chunks([len(p) for p in prompts], num_samples, config.max_new_tokens, config.kv_cache_tokens,
                         allow_padding=allow_padding)
    results: list[list[Response | None]] = [[None] * num_samples for _ in prompts]
    was_training = model.training
    model.eval()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        for chunk in chunks:
            for resp in _generate_chunk(model, comm, prompts, chunk, params, config.max_new_tokens, stop, suppress,
                                        seed, stats, prompt_keys):
                results[resp.prompt_index][resp.sample_index] = resp
    finally:
        model.train(was_training)
    stats.total_seconds += time.perf_counter() - t0
    stats.total_cpu_seconds += time.process_time() - c0
    stats.chunks += len(chunks)
    return results
