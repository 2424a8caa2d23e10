"""References for the capture tests: HF eager attention rows, prompt + response sequences, a RAL-style loss.

``hf_attention_rows`` is the independent reference of the whole capture: transformers' eager
``Qwen2_5_VLForConditionalGeneration`` with ``output_attentions=True``, last layer, mean over heads,
row of response token t restricted to positions i < t and renormalised (paper Eq. 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_ral.attention.divergence import aggregate_tokens, jsd
from megatron_ral.attention.layout import RowLayout
from megatron_ral.inference.prompts import PromptInput

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def random_response(length: int, seed: int, vocab: int = 900) -> list[int]:
    """``length`` seeded text-token ids (below the tiny tokenizer's special tokens)."""
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def with_response(prompt: PromptInput, response_ids: list[int]) -> PromptInput:
    """The prompt followed by the response tokens (same vision inputs)."""
    ids = torch.cat([prompt.input_ids, torch.as_tensor(response_ids, dtype=torch.long)])
    return PromptInput(ids, **{k: getattr(prompt, k) for k in VISION_KEYS})


def model_inputs(seq: PromptInput) -> dict:
    """Keyword inputs of Qwen25VLModel for one unpadded sequence (batch of 1)."""
    out = {"input_ids": seq.input_ids[None]}
    out.update({k: getattr(seq, k) for k in VISION_KEYS if getattr(seq, k) is not None})
    return out


def padded_batch(seqs: list[PromptInput], padding_side: str, pad_id: int) -> dict:
    """Keyword inputs of a padded batch of sequences (vision inputs concatenated in row order) with
    its (B, S) padding mask as ``attention_mask``."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(length - len(s), length) if padding_side == "left" else slice(0, len(s))
        ids[b, sl] = s.input_ids
        mask[b, sl] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    for key in VISION_KEYS:
        parts = [getattr(s, key) for s in seqs if getattr(s, key) is not None]
        if parts:
            out[key] = torch.cat(parts)
    return out


@torch.no_grad()
def hf_attention_rows(hf_model, prompt: PromptInput, response_ids: list[int]) -> Tensor:
    """float64 [R, T]: HF eager last-layer attention, head mean, row P+r renormalised over i < P+r."""
    seq = with_response(prompt, response_ids)
    cfg = hf_model.config
    ids = seq.input_ids[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "mm_token_type_ids": (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()}
    inputs.update({k: getattr(seq, k) for k in VISION_KEYS if getattr(seq, k) is not None})
    att = hf_model(**inputs, output_attentions=True).attentions[-1][0].double()  # [heads, T, T]
    mean = att.mean(0)
    plen, num = len(prompt), len(response_ids)
    rows = torch.zeros(num, len(seq), dtype=torch.float64)
    for r in range(num):
        t = plen + r
        rows[r, :t] = mean[t, :t] / mean[t, :t].sum()
    return rows


def ral_loss(p: Tensor, p_old: Tensor, layout: RowLayout, advantages: Tensor | None = None) -> Tensor:
    """Token-mean of A_b * JSD(p || p_old) over the valid rows (paper Eq. 3 with sequence advantages)."""
    mask = layout.policy_key_mask(p.shape[-1]).to(p.device)
    per_token = jsd(p, p_old, mask)
    weights = None if advantages is None else advantages.to(p.dtype)[:, None].expand_as(per_token)
    row_mask = None if layout.row_valid is None else layout.row_valid.to(p.device)
    return aggregate_tokens(per_token, row_mask, "token_mean", weights)


def parallel_capture_worker(tp: int, pp: int, mc_dir: str, prompts: list[PromptInput],
                            responses: list[list[int]], scale_last_qkv: float = 1.2) -> dict:
    """One rank of a TP x PP run on a converted checkpoint (for run_distributed), returning:

    ``rows``: the rows of every (prompt, response) through megatron's forward-only pipeline schedule
    (one micro-batch each; None off the last stage); ``dump``: :func:`dump_attention` of the first
    pair (rank 0 only); ``grads``: for impl "chunked" and "reference", the local gradient shards of the
    first and last layer's ``linear_qkv`` weight held by this rank after forward + backward of the
    RAL loss (advantage-weighted JSD to the rows of the unscaled weights) through the pipeline schedule,
    with the last layer's ``linear_qkv`` weight scaled by ``scale_last_qkv``.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ral.attention.capture import AttentionCapture, response_layout
    from megatron_ral.attention.dump import capture_rows_forward, dump_attention
    from megatron_ral.models.qwen25vl.provider import balanced_layer_split
    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.inference.loading import load_model
    from megatron_ral.models.qwen25vl.provider import LMArchitecture, load_hf_config
    from megatron_ral.platform import initialize

    initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=7)
    layers = LMArchitecture.from_hf(load_hf_config(str(mc_dir))).num_layers
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              pipeline_layer_split=balanced_layer_split(layers, pp))
    model = load_model(mc_dir, parallel, dtype=torch.float32)
    batches = [model_inputs(with_response(p, r)) for p, r in zip(prompts, responses)]
    layouts = [response_layout([len(p)], [len(r)]) for p, r in zip(prompts, responses)]
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    out = {"last_stage": last, "rank": torch.distributed.get_rank()}
    p_old = capture_rows_forward(model, batches, layouts)
    out["rows"] = None if p_old is None else [p[0] for p in p_old]
    out["dump"] = dump_attention(model, prompts[0], responses[0])

    decoder = model.language_model.decoder.layers
    watched = {}
    for layer in decoder:
        if layer.layer_number in (1, layers):
            watched[f"layer{layer.layer_number}"] = layer.self_attention.linear_qkv.weight
    if last:
        with torch.no_grad():
            decoder[-1].self_attention.linear_qkv.weight.mul_(scale_last_qkv)
    advantages = [torch.tensor([0.8]), torch.tensor([-1.3])]

    def train_grads(impl):
        from megatron_ral.attention.capture import CaptureConfig

        capture = AttentionCapture(model, CaptureConfig(impl=impl))
        items = iter(range(len(batches)))
        model.zero_grad(set_to_none=True)
        losses = []

        def forward_step(data_iterator, chunk):
            i = next(data_iterator)
            with capture.capture(layouts[i], grad=True) as result:
                output = chunk(**batches[i])

            def loss_func(output_tensor):
                loss = ral_loss(result.rows, p_old[i], layouts[i], advantages[i % len(advantages)])
                losses.append(loss.detach())
                return loss + 0.0 * output_tensor.sum(), {}

            return output, loss_func

        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=items, model=[model], num_microbatches=len(batches),
            seq_length=max(b["input_ids"].shape[1] for b in batches), micro_batch_size=1, forward_only=False)
        grads = {k: (None if w.grad is None else w.grad.detach().clone()) for k, w in watched.items()}
        return {"losses": losses, "grads": grads}

    out["train"] = {impl: train_grads(impl) for impl in ("chunked", "reference")}
    return out


def check_parallel_capture(root, tp: int, pp: int, atol: float = 1e-5, grad_rtol: float = 1e-5) -> list[dict]:
    """Run :func:`parallel_capture_worker` on ``tp * pp`` gloo ranks and assert it against HF eager
    attention (rows, rank-0 dump) and the materialised reference (gradients); returns the rank outputs."""
    from megatron_ral.testing.inference import converted_checkpoint, load_hf_model, standard_prompts
    from megatron_ral.testing.spawn import run_distributed

    hf_dir, mc_dir = converted_checkpoint(root, "tiny", seed=9)
    std = standard_prompts()
    prompts = [std["image"], std["video"]]
    responses = [random_response(5, seed=11), random_response(8, seed=12)]
    hf = load_hf_model(hf_dir)
    refs = [hf_attention_rows(hf, p, r) for p, r in zip(prompts, responses)]
    outs = run_distributed(parallel_capture_worker, tp * pp, tp, pp, str(mc_dir), prompts, responses)

    last = [o for o in outs if o["last_stage"]]
    assert len(last) == tp
    for o in outs:
        if not o["last_stage"]:
            assert o["rows"] is None
            continue
        for kind, rows, ref in zip(("image", "video"), o["rows"], refs):
            diff = (rows.double() - ref).abs().max().item()
            assert diff <= atol, f"tp{tp} pp{pp} rank {o['rank']} {kind}: max abs diff to HF {diff}"
    dumps = {o["rank"]: o["dump"] for o in outs}
    assert all(d is None for r, d in dumps.items() if r != 0)
    dump = dumps[0]
    assert dump["prompt_length"] == len(prompts[0])
    assert dump["input_ids"].tolist() == prompts[0].input_ids.tolist() + responses[0]
    assert (dump["rows"].double() - refs[0]).abs().max().item() <= atol

    checked = set()
    for o in outs:
        ours, ref = o["train"]["chunked"], o["train"]["reference"]
        if o["last_stage"]:
            assert len(ours["losses"]) == len(prompts)
            for a, b in zip(ours["losses"], ref["losses"]):
                assert abs(a.item()) > 1e-6 and abs(a.item() - b.item()) <= 1e-4 * abs(b.item())
        for name, g in ours["grads"].items():
            r = ref["grads"][name]
            assert g is not None and r is not None, f"rank {o['rank']} {name}: no gradient"
            scale = r.abs().max().item()
            assert scale > 0, f"rank {o['rank']} {name}: zero gradient"
            err = (g - r).abs().max().item() / scale
            assert err <= grad_rtol, f"tp{tp} pp{pp} rank {o['rank']} {name}: relative gradient error {err}"
            checked.add(name)
    assert checked == {"layer1", f"layer{hf.config.text_config.num_hidden_layers}"}
    return outs


def run_dump_tool(repo_root, args: list[str], nproc: int = 1, expect_rc: int = 0, timeout: float = 600):
    """Run tools/dump_attention.py (plain python for nproc 1, else torchrun on a free loopback port)
    with OMP_NUM_THREADS=1 and offline HF; returns the CompletedProcess after checking the exit code."""
    import os
    import subprocess
    import sys

    from megatron_ral.platform.launch_env import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if nproc == 1:
        cmd = [sys.executable, "tools/dump_attention.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "tools/dump_attention.py", *args]
    proc = subprocess.run(cmd, cwd=str(repo_root), env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != expect_rc:
        raise AssertionError(f"exit code {proc.returncode} != {expect_rc}\n{proc.stderr[-4000:]}")
    return proc
