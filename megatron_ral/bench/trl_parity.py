"""One identical GRPO mini-batch through this package's loss and through TRL's: values and gradients.

    result = compare_losses(LossCase(hf_dir, mcore_dir, records_file, media_root), settings)

The batch: the first P image records (prompts tokenized by our loader and by TRL, checked identical),
G given responses per prompt (ordinary text tokens, seeded, lengths 1..max_new_tokens), advantages
from seeded rewards group-normalised, old log-probs = current + noise and reference log-probs =
current + noise (so that the ratio is clipped on both sides and the KL term is not zero). Both sides
get exactly these tensors; only the current log-probs and the loss are computed by each.

Ours (the trainer's own pieces): the policy as ``rl.build.build_policy`` makes it (megatron DDP over the
Megatron checkpoint), a :class:`RolloutBatch` split by ``plan_micro_batches`` into micro-batches of
``micro_batch_size`` sequences, the global normalisers of ``minibatch_normalisers``, the vision features
of ``encode_prompts_vision``, and ``run_pass`` with ``update.minibatch_loss`` as the loss of every
micro-batch: what ``update.policy_update`` runs before its optimizer step. Gradients are the DDP
buffers' (what the optimizer would step on).

TRL: a ``GRPOTrainer`` on the HF checkpoint whose ``rollout_func`` hook returns the given responses, so
that TRL itself builds the batch (``_generate_and_score_completions``: left-padded prompts,
right-padded completions, per-sequence pixel values and M-RoPE token types); its advantages, old and
reference log-probs are then replaced by the given ones and ``GRPOTrainer.compute_loss`` gives the loss,
``backward`` the gradients of the HF parameters, mapped to our layout with
``models.qwen25vl.hf_weights.local_state_from_hf`` (q/k/v interleaved per group, gate/up concatenated).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass

import torch

from megatron_ral.bench.trl_peer import LOSS_TYPES, GRPOSettings, our_config


@dataclass(frozen=True)
class LossCase:
    """Where the batch comes from and how it is split on our side."""

    hf_dir: str
    mcore_dir: str
    records_file: str
    media_root: str
    micro_batch_size: int = 2          # ours: several micro-batches; TRL: the whole mini-batch at once
    old_noise: float = 0.3             # std of old - current log-prob (clips both ways at eps 0.2)
    ref_noise: float = 0.5             # std of ref - current log-prob
    seed: int = 0


@dataclass
class GivenBatch:
    """The tensors both sides are fed, per sequence (prompt-major: prompt p's G responses together)."""

    responses: list[list[torch.Tensor]]       # [P][G] token ids
    advantages: torch.Tensor                  # [P, G]
    old: list[list[torch.Tensor]]             # [P][G] log-probs per response token
    ref: list[list[torch.Tensor]]

    def flat(self, name: str) -> list[torch.Tensor]:
        return [t for row in getattr(self, name) for t in row]


class _Ours:
    """Our policy, the batch's prompts and micro-batches; ``loss_and_grads`` per aggregation."""

    def __init__(self, case: LossCase, s: GRPOSettings):
        from megatron_ral.data.loader import VisionDataLoader
        from megatron_ral.data.processor import QwenVLProcessor
        from megatron_ral.rl.build import build_policy
        from megatron_ral.rl.rollout import prompts_of

        self.case, self.s = case, s
        self.cfg = our_config(dataclasses.replace(s, updates_per_rollout=1, epochs_per_rollout=1), case.mcore_dir,
                              case.records_file, case.media_root, case.micro_batch_size, hf_dir=case.hf_dir)
        self.chunks, self.model = build_policy(self.cfg, self.cfg.parallel, case.mcore_dir)
        self.processor = QwenVLProcessor.from_pretrained(case.hf_dir)
        loader = VisionDataLoader(self.cfg.data, self.processor, [case.records_file], batch_size=s.prompts_per_step,
                                  mode="prompt", num_epochs=1)
        self.loader_batch = next(iter(loader))
        self.prompts = prompts_of(self.loader_batch, self.model.image_token_id, self.model.video_token_id)

    def rollout_batch(self, given: GivenBatch):
        from megatron_ral.rl.batch import RolloutBatch, plan_micro_batches

        P, G = given.advantages.shape
        zeros = torch.zeros(P, G)
        batch = RolloutBatch(
            prompts=self.prompts, records=self.loader_batch.records, prompt_keys=list(range(P)),
            responses=given.responses, texts=[[""] * G for _ in range(P)], finish_reasons=[["given"] * G] * P,
            rewards=zeros, accuracy=zeros, format=zeros, advantages=given.advantages,
            zero_std=torch.zeros(P, dtype=torch.bool))
        batch.micro_batches = plan_micro_batches(batch, 1, self.case.micro_batch_size, self.processor.pad_token_id)
        return batch

    def _ctx(self):
        from megatron_ral.rl.schedule import PassContext
        from megatron_ral.rl.vision import encode_prompts_vision

        return PassContext(model=self.chunks, vision=encode_prompts_vision(self.model, self.prompts),
                           temperature=self.s.temperature)

    def current_logprobs(self, given: GivenBatch) -> list[list[torch.Tensor]]:
        """log pi_theta of every given response token (the old-policy pass), [P][G]."""
        from megatron_ral.rl.passes import old_pass

        batch = self.rollout_batch(given)
        old_pass(self._ctx(), batch, None, self.model.image_token_id, self.model.video_token_id)
        return _per_sequence(batch, batch.old_logprobs)

    def loss_and_grads(self, given: GivenBatch, aggregation: str) -> tuple[float, dict[str, torch.Tensor], dict]:
        from megatron_ral.rl.schedule import run_pass
        from megatron_ral.rl.update import (
            LossSettings,
            minibatch_loss,
            minibatch_normalisers,
        )

        s = self.s
        batch = self.rollout_batch(given)
        for mb in batch.micro_batches:
            batch.old_logprobs[mb.index] = _padded([given.old[r.prompt][r.sample] for r in mb.refs], mb)
            batch.ref_logprobs[mb.index] = _padded([given.ref[r.prompt][r.sample] for r in mb.refs], mb)
        norms = minibatch_normalisers(batch.micro_batches)[0]
        settings = LossSettings(clip_eps=s.clip_eps, kl_beta=s.kl_beta, loss_aggregation=aggregation,
                                max_new_tokens=s.max_new_tokens)

        def consume(mb, token_loss, _capture):
            return minibatch_loss(mb, mb.token_logprobs(token_loss), batch.old_logprobs[mb.index],
                                  batch.ref_logprobs[mb.index], None, None, norms, settings)

        for chunk in self.chunks:
            chunk.zero_grad_buffer()
            chunk.train()
        metrics = run_pass(self._ctx(), batch.micro_batches, consume, forward_only=False)
        loss = sum(float(m["loss/total"]) for m in metrics)
        grads = {n: p.main_grad.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        info = {"micro_batches": len(batch.micro_batches), "tokens": norms["tokens"],
                "clipped_tokens": sum(float(m["loss/clip_tokens"]) for m in metrics),
                "kl": sum(float(m.get("loss/kl", 0.0)) for m in metrics)}
        return loss, grads, info


def _padded(rows: list[torch.Tensor], mb) -> torch.Tensor:
    out = torch.zeros(len(rows), mb.response_mask.shape[1])
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def _per_sequence(batch, per_mb: dict) -> list[list[torch.Tensor]]:
    P, G = batch.advantages.shape
    out = [[None] * G for _ in range(P)]
    for mb in batch.micro_batches:
        for i, r in enumerate(mb.refs):
            out[r.prompt][r.sample] = per_mb[mb.index][i, : mb.response_lengths[i]].clone()
    return out


class _TRL:
    """A GRPOTrainer whose rollouts are the given responses; ``loss_and_grads`` per TRL loss type."""

    def __init__(self, case: LossCase, s: GRPOSettings, rows: list[dict], output_dir: str):
        self.case, self.s, self.rows, self.output_dir = case, s, rows, output_dir
        self.responses: list[list[int]] = []

    def _trainer(self, loss_type: str):
        from megatron_ral.bench import trl_peer

        s = dataclasses.replace(self.s, loss_aggregation=_aggregation_of(loss_type), updates_per_rollout=1,
                                epochs_per_rollout=1)
        model = trl_peer.load_hf_policy(self.case.hf_dir)
        responses = self.responses

        def given_rollouts(prompts, trainer):
            """TRL's rollout_func hook: TRL's own prompt tokenization, the given responses."""
            prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
            return {"prompt_ids": [list(p) for p in prompt_ids], "completion_ids": responses, "logprobs": None}

        trainer = trl_peer.build_trainer(model, s, self.rows, self.output_dir, max_steps=1,
                                         loss_type=loss_type, rollout_func=given_rollouts)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1   # what Trainer's loop sets with no accumulation
        return trainer

    def inputs(self, trainer, given: GivenBatch) -> dict:
        """TRL's own batch of the given rollouts, with the given advantages and old / ref log-probs."""
        self.responses[:] = [r.tolist() for r in given.flat("responses")]
        examples = [row for row in self.rows[: self.s.prompts_per_step] for _ in range(self.s.group_size)]
        with torch.no_grad():
            inputs = trainer._generate_and_score_completions(examples)
        width = inputs["completion_ids"].shape[1]
        inputs["advantages"] = given.advantages.reshape(-1).to(torch.float32)
        inputs["old_per_token_logps"] = _right_padded(given.flat("old"), width)
        inputs["ref_per_token_logps"] = _right_padded(given.flat("ref"), width)
        return inputs

    def current_logprobs(self, trainer, inputs) -> list[torch.Tensor]:
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, mask, inputs["completion_ids"].shape[1], num_images=inputs["num_images"],
                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                mm_token_type_ids=inputs.get("mm_token_type_ids"))
        lengths = inputs["completion_mask"].sum(dim=1).tolist()
        return [logps[i, :n] for i, n in enumerate(lengths)]

    def loss_and_grads(self, loss_type: str, given: GivenBatch) -> tuple[float, dict[str, torch.Tensor], dict]:
        trainer = self._trainer(loss_type)
        inputs = self.inputs(trainer, given)
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        return float(loss.detach()), grads, {"trainer": trainer, "inputs": inputs}


def _aggregation_of(loss_type: str) -> str:
    for agg, types in LOSS_TYPES.items():
        if loss_type in types:
            return agg
    raise ValueError(f"no aggregation of ours matches TRL loss_type {loss_type!r}")


def _right_padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def given_batch(s: GRPOSettings, vocab_text_tokens: int, seed: int) -> GivenBatch:
    """Seeded responses (ordinary tokens, varied lengths) and advantages; log-probs are set later."""
    from megatron_ral.rl.advantages import group_advantages

    gen = torch.Generator().manual_seed(seed)
    P, G = s.prompts_per_step, s.group_size
    lengths = torch.randint(1, s.max_new_tokens + 1, (P, G), generator=gen)
    lengths[0, 0] = s.max_new_tokens                      # one full-length response
    responses = [[torch.randint(0, vocab_text_tokens, (int(lengths[p, g]),), generator=gen) for g in range(G)]
                 for p in range(P)]
    rewards = torch.rand(P, G, generator=gen)
    adv = group_advantages(rewards, s.adv_eps).advantages
    return GivenBatch(responses=responses, advantages=adv, old=[], ref=[])


def with_logprobs(given: GivenBatch, current: list[list[torch.Tensor]], old_noise: float, ref_noise: float,
                  seed: int) -> GivenBatch:
    gen = torch.Generator().manual_seed(seed + 1)
    old = [[c + old_noise * torch.randn(c.shape, generator=gen) for c in row] for row in current]
    ref = [[c + ref_noise * torch.randn(c.shape, generator=gen) for c in row] for row in current]
    return dataclasses.replace(given, old=old, ref=ref)


def trl_grads_in_our_layout(model, hf_grads: dict[str, torch.Tensor], hf_model) -> dict[str, torch.Tensor]:
    """HF-named gradients -> our parameter names and layouts (zeros where HF has no gradient: frozen)."""
    from megatron_ral.models.qwen25vl.hf_weights import local_state_from_hf

    full = {n: hf_grads.get(n, torch.zeros_like(p)) for n, p in hf_model.named_parameters()}
    return local_state_from_hf(model, full)


def compare_grads(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict:
    """Max abs difference, max per-tensor relative difference |g - g'| / |g'| (Frobenius), and the
    tensor where the relative difference is largest."""
    max_abs, max_rel, worst, scale = 0.0, 0.0, "", 0.0
    for name, g in ours.items():
        ref = theirs[name].to(g.dtype)
        diff = (g - ref).abs().max().item()
        rel = ((g - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        max_abs, scale = max(max_abs, diff), max(scale, ref.abs().max().item())
        if rel > max_rel:
            max_rel, worst = rel, name
    return {"grad_tensors": len(ours), "grad_max_abs_diff": max_abs, "grad_max_abs": scale,
            "grad_max_rel_diff": max_rel, "grad_worst_tensor": worst}


def compare_losses(case: LossCase, s: GRPOSettings, loss_types: tuple[str, ...] | None = None,
                   tolerance: float = 1e-5) -> dict:
    """Our loss and gradients against TRL's on one batch, for each matching (aggregation, loss_type).

    Needs megatron's parallel state (``platform.initialize`` at world size 1) and TRL."""
    from megatron_ral.bench import trl_peer

    trl_peer.require_trl()
    loss_types = loss_types or tuple(t for types in LOSS_TYPES.values() for t in types)
    ours = _Ours(case, s)
    rows = trl_peer.trl_rows(trl_peer.read_records(case.records_file)[: s.prompts_per_step], case.media_root,
                             s.template)
    given = given_batch(s, ours.processor.tokenizer.vocab_size, case.seed)
    current = ours.current_logprobs(given)
    given = with_logprobs(given, current, case.old_noise, case.ref_noise, case.seed)

    result = {"sequences": s.prompts_per_step * s.group_size, "prompts": s.prompts_per_step,
              "group_size": s.group_size, "max_new_tokens": s.max_new_tokens, "temperature": s.temperature,
              "clip_eps": s.clip_eps, "kl_beta": s.kl_beta, "micro_batch_size_ours": case.micro_batch_size,
              "loss_types": {}}
    with tempfile.TemporaryDirectory() as out:
        peer = _TRL(case, s, rows, out)
        checked_inputs = False
        for loss_type in loss_types:
            aggregation = _aggregation_of(loss_type)
            loss_trl, grads_trl, extra = peer.loss_and_grads(loss_type, given)
            trainer, inputs = extra["trainer"], extra["inputs"]
            if not checked_inputs:
                result.update(_input_checks(ours, peer, trainer, inputs, current))
                checked_inputs = True
            loss_ours, grads_ours, info = ours.loss_and_grads(given, aggregation)
            mapped = trl_grads_in_our_layout(ours.model, grads_trl, trainer.model)
            entry = {"aggregation": aggregation, "loss_ours": loss_ours, "loss_trl": loss_trl,
                     "loss_abs_diff": abs(loss_ours - loss_trl)}
            entry.update(compare_grads(grads_ours, mapped))
            entry.update({"micro_batches_ours": info["micro_batches"], "kl_term_ours": info["kl"],
                          "clipped_token_frac": info["clipped_tokens"] / max(info["tokens"], 1.0)})
            result["loss_types"][loss_type] = entry
            del trainer, extra, grads_trl, mapped
    result["max_loss_abs_diff"] = max(e["loss_abs_diff"] for e in result["loss_types"].values())
    result["max_grad_rel_diff"] = max(e["grad_max_rel_diff"] for e in result["loss_types"].values())
    result["max_grad_abs_diff"] = max(e["grad_max_abs_diff"] for e in result["loss_types"].values())
    result["goal"] = (f"losses equal within {tolerance:g} (absolute) and gradients within {tolerance:g} "
                      "(relative, per tensor)")
    result["goal_met"] = bool(result["max_loss_abs_diff"] <= tolerance and result["max_grad_rel_diff"] <= tolerance
                              and result["prompt_ids_identical"])
    return result


def _input_checks(ours: _Ours, peer: _TRL, trainer, inputs, current: list[list[torch.Tensor]]) -> dict:
    """The prompt tokens and pixels TRL built against our loader's, and TRL's current log-probs against ours."""
    G = peer.s.group_size
    same_ids = True
    for i, prompt in enumerate(ours.prompts):
        row = i * G
        ids = inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()]
        same_ids &= bool(torch.equal(ids, prompt.input_ids))
    ours_px = torch.cat([p.pixel_values for p in ours.prompts for _ in range(G)])
    px_diff = (inputs["pixel_values"].float() - ours_px.float()).abs().max().item()
    trl_logps = peer.current_logprobs(trainer, inputs)
    flat = [c for row in current for c in row]
    lp_diff = max((a - b).abs().max().item() for a, b in zip(flat, trl_logps))
    return {"prompt_ids_identical": same_ids, "pixel_values_max_abs_diff": px_diff,
            "current_logprob_max_abs_diff": lp_diff,
            "response_tokens": int(sum(c.numel() for c in flat))}
