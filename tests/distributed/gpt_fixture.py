"""A tiny megatron-core GPTModel trained one step through the real schedules, for platform tests."""

from __future__ import annotations

import torch

VOCAB, SEQ, HIDDEN, HEADS, GROUPS, LAYERS, MBS, NUM_MB = 64, 16, 32, 4, 2, 4, 2, 2


def build_model(layer_split: list[int] | None = None):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    kwargs = {}
    if layer_split is not None and pp > 1:
        kwargs = dict(num_layers_in_first_pipeline_stage=layer_split[0],
                      num_layers_in_last_pipeline_stage=layer_split[-1])
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        ffn_hidden_size=2 * HIDDEN, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        normalization="RMSNorm", add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        pipeline_dtype=torch.float32, tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=pp, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False, **kwargs,
    )
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
    )
    return model


def batches(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(NUM_MB):
        tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
        out.append(dict(tokens=tokens[:, :-1], labels=tokens[:, 1:],
                        position_ids=torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ)))
    return out


def forward_backward(model, data: list[dict], forward_only: bool = False):
    """Run megatron's schedule (1F1B when PP > 1); returns the mean loss on the last stage, else None."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(it, m):
        b = next(it)
        out = m(b["tokens"], b["position_ids"], None, labels=b["labels"])

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place

        return out, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(data), model=[model], num_microbatches=len(data),
        seq_length=SEQ, micro_batch_size=MBS, forward_only=forward_only,
    )
    if losses:
        return torch.stack([x["loss"] for x in losses]).mean().item()
    return None


def logits(model, data: list[dict]) -> torch.Tensor | None:
    """Forward-only through the schedule, collecting last-stage logits for every micro-batch."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    collected = []

    def forward_step(it, m):
        b = next(it)
        out = m(b["tokens"], b["position_ids"], None)

        def keep(output_tensor):
            if parallel_state.is_pipeline_last_stage():
                full = gather_from_tensor_model_parallel_region(output_tensor)
                collected.append(full.detach().clone())
            return output_tensor.float().sum() * 0.0, {}

        return out, keep

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(data), model=[model], num_microbatches=len(data),
            seq_length=SEQ, micro_batch_size=MBS, forward_only=True,
        )
    return torch.cat(collected) if collected else None


def save(model, path: str) -> None:
    import os

    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), path)


def load(model, path: str) -> None:
    from megatron.core import dist_checkpointing

    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))


def grads_into_params(model) -> None:
    """Replace every parameter by its gradient, so that a dist checkpoint of the model stores gradients
    in the layout-free global format (and can be compared across TP/PP layouts)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))


def sgd_step(model, lr: float = 0.5) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
