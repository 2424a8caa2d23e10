"""The model's selective output layer (``loss_index``: logits and loss at the response positions only)
equals the full path's per-token loss gathered at those positions, with the same parameter gradients, for
the untied and the tied (output layer = embedding) presets, at temperature 1 and 0.7."""

import pytest
import torch

from megatron_ral.testing.attention import padded_batch, random_response, with_response
from megatron_ral.config.schema import ParallelConfig
from megatron_ral.testing.inference import standard_prompts
from megatron_ral.testing.models import seeded_megatron_model
from megatron_ral.platform import destroy, initialize


@pytest.fixture(scope="module", autouse=True)
def platform():
    initialize(ParallelConfig(), seed=0)
    yield
    destroy()


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_loss_at_selected_positions_equals_full_path(preset, temperature):
    model = seeded_megatron_model(preset, seed=5)
    prompts = standard_prompts()
    seqs = [with_response(prompts[k], random_response(n, seed=i)) for i, (k, n) in enumerate([("video", 5), ("image", 3), ("text", 7)])]
    batch = padded_batch(seqs, "right", pad_id=0)
    ids = batch["input_ids"]
    labels = torch.zeros_like(ids)
    labels[:, :-1] = ids[:, 1:]
    plens = [len(prompts[k]) for k in ("video", "image", "text")]
    rlens = [5, 3, 7]
    index = torch.stack([(torch.tensor(p) - 1 + torch.arange(max(rlens))).clamp(max=ids.shape[1] - 1) for p in plens])
    valid = torch.arange(max(rlens))[None] < torch.tensor(rlens)[:, None]

    grads, losses = [], []
    for selective in (False, True):
        model.zero_grad()
        kwargs = {"loss_index": index} if selective else {}
        loss = model(**batch, labels=labels, temperature=temperature, **kwargs)
        if not selective:
            loss = loss.gather(1, index)
        assert loss.shape == index.shape
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        loss.sum().backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and any("output_layer" in n or "word_embeddings" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_return_logits_gives_the_loss_and_the_unscaled_logits_it_came_from(preset, temperature):
    """``return_logits``: the same per-token loss, beside the vocab-parallel logits at the response positions
    (the full path's logits gathered there, not divided by T), whose graph reaches the parameters; the loss
    is -log_softmax(logits / T) at the labels (float64 reference)."""
    model = seeded_megatron_model(preset, seed=6)
    prompts = standard_prompts()
    seqs = [with_response(prompts[k], random_response(n, seed=10 + i))
            for i, (k, n) in enumerate([("image", 4), ("text", 6)])]
    batch = padded_batch(seqs, "right", pad_id=0)
    ids = batch["input_ids"]
    labels = torch.zeros_like(ids)
    labels[:, :-1] = ids[:, 1:]
    index = torch.stack([(torch.tensor(len(prompts[k])) - 1 + torch.arange(6)).clamp(max=ids.shape[1] - 1)
                         for k in ("image", "text")])
    with torch.no_grad():
        full = model(**batch)                                        # (B, S, V) logits, unscaled
        plain = model(**batch, labels=labels, temperature=temperature, loss_index=index)
    loss, logits = model(**batch, labels=labels, temperature=temperature, loss_index=index, return_logits=True)
    assert logits.shape == (*index.shape, model.padded_vocab_size)
    torch.testing.assert_close(loss.detach(), plain, rtol=0, atol=0)
    torch.testing.assert_close(logits.detach(), full.gather(1, index[..., None].expand(-1, -1, full.shape[-1])),
                               rtol=1e-6, atol=1e-6)
    log_probs = torch.log_softmax(logits.detach().double() / temperature, dim=-1)
    ref = -log_probs.gather(-1, labels.gather(1, index)[..., None])[..., 0]
    torch.testing.assert_close(loss.detach().double(), ref, rtol=1e-5, atol=1e-5)
    model.zero_grad()
    logits.logsumexp(-1).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "output_layer" in n
               or "word_embeddings" in n)
