"""Qwen25VLModel under context parallelism equals the unsplit model: CP=2 against CP=1 (2 processes against 1)
and TP2 x CP2 against TP=2 (4 against 2), on the 'tiny' (GQA 2:1, untied) and 'small' (GQA 4:1, tied) presets.

Batches: an image prompt, a video prompt (second_per_grid_ts != 1) and a text-only pair of rows of different
lengths (right padding), every sequence of odd length (not a multiple of 2C: the model pads it). For each:
the logits (each CP rank's share, put back in global order), the per-token loss at response positions
(``loss_index``, the trainer's path) with the logits there (``return_logits``, the distillation's path) and
without ``loss_index``, and the gradient of every trainable
parameter (each CP rank's gradient is its tokens' part; summed over the CP group it is the whole gradient).
Also: a packed ``sequences`` stream of the text rows (an AttentionLayout padded to a multiple of 2C) split
over CP gives the padded rows' per-token loss, and the vision tower's features, encoded in shares over the CP
group, equal the unsplit ones.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ral.config.schema import ParallelConfig
from megatron_ral.testing.models import make_prompt
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed

PRESETS = ("tiny", "small")
SEED = 7


def batches() -> list[dict]:
    out = []
    for name, prompt, plens in (
        ("image", make_prompt([[5, ("image", (1, 4, 6)), 6]], seed=31), [9]),
        ("video", make_prompt([[3, ("video", (4, 8, 4)), 8]], seed=32, second_per_grid_ts=[0.5]), [21]),
        ("text", make_prompt([[17], [13]], seed=33, padding_side="right"), [9, 5]),
    ):
        b = prompt.model_inputs()
        ids = b["input_ids"]
        lengths = b.pop("attention_mask").sum(1).tolist()
        assert all(n % 2 == 1 for n in lengths), lengths  # odd: never a multiple of 2C
        b["attention_mask"] = prompt.attention_mask
        r = max(n - p for n, p in zip(lengths, plens))
        b["loss_index"] = (torch.tensor(plens)[:, None] - 1 + torch.arange(r)[None]).clamp(max=ids.shape[1] - 1)
        b["labels"] = torch.roll(ids, -1, dims=1)
        out.append((name, b))
    return out


def _worker(tp: int, cp: int) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ral.models.qwen25vl.context_parallel import CPShare, cp_padded_length
    from megatron_ral.platform import initialize
    from megatron_ral.testing.models import seeded_megatron_model

    parallel = ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp)
    initialize(parallel, seed=3)
    cp_group = ps.get_context_parallel_group()
    out = {"tp_rank": ps.get_tensor_model_parallel_rank(), "cp_rank": ps.get_context_parallel_rank()}
    for preset in PRESETS:
        model = seeded_megatron_model(preset, seed=SEED, parallel=parallel, vision_attn_implementation="eager")
        model.train()
        res = {}
        for name, b in batches():
            model.zero_grad()
            for p in model.parameters():
                p.grad = None
            inputs = {k: v for k, v in b.items() if k not in ("labels", "loss_index")}
            with torch.no_grad():
                logits = model(**inputs)  # (B, S'/C, V/TP): this rank's tokens
            length = b["input_ids"].shape[1]
            padded = cp_padded_length(length, cp)
            if cp > 1:
                parts = [torch.empty_like(logits) for _ in range(cp)]
                dist.all_gather(parts, logits.contiguous(), group=cp_group)
                full = torch.empty(logits.shape[0], padded, logits.shape[2])
                for r, part in enumerate(parts):
                    full[:, CPShare(cp, r, None, padded).indices()] = part
                logits = full
            all_loss = model(**inputs, labels=b["labels"])
            loss, resp_logits = model(**inputs, labels=b["labels"], loss_index=b["loss_index"], temperature=0.7,
                                      return_logits=True)
            (loss.sum() + 0.5 * all_loss.sum() + 1e-3 * resp_logits.square().sum()).backward()
            grads = {}
            for n, p in model.named_parameters():
                if p.grad is None:
                    continue
                g = p.grad.detach().clone()
                if cp > 1:
                    dist.all_reduce(g, group=cp_group)
                grads[n] = g
            res[name] = {"logits": logits[:, :length].detach(), "loss": loss.detach(), "all_loss": all_loss.detach(),
                         "resp_logits": resp_logits.detach(), "grads": grads}
        # a packed 'sequences' stream of the two text rows (padded to a multiple of 2C) gives the padded rows' loss
        from megatron_ral.models.qwen25vl.attention_layout import AttentionLayout

        text = dict(batches())["text"]
        lengths = text["attention_mask"].sum(1).tolist()
        layout = AttentionLayout.packed_sequences(lengths, pad_to_multiple=4)
        rows = [text["input_ids"][i, :n] for i, n in enumerate(lengths)]
        stream = layout.scatter(rows, dim=0)
        labels = layout.scatter([torch.roll(text["input_ids"], -1, dims=1)[i, :n] for i, n in enumerate(lengths)], dim=0)
        with torch.no_grad():
            packed = model(input_ids=stream, layout=layout, labels=labels,
                           loss_index=torch.arange(layout.length)[None])
        res["packed_text"] = [packed[0, s.start:s.end] for s in layout.spans]
        # the vision tower's work split over the CP group gives the unsplit features
        if cp > 1:
            video = make_prompt([[2, ("video", (6, 4, 8)), 2, ("video", (2, 8, 4)), 3]], seed=5)
            image = make_prompt([[2, ("image", (1, 8, 8)), ("image", (1, 4, 4)), ("image", (1, 4, 8)), 1]], seed=6)
            kw = dict(pixel_values=image.pixel_values, image_grid_thw=image.image_grid_thw,
                      pixel_values_videos=video.pixel_values_videos, video_grid_thw=video.video_grid_thw)
            split = model.encode_vision(**kw, split_over_cp=True)
            whole = model.encode_vision(**kw)
            res["vision"] = {"video": float((split.video - whole.video).abs().max()),
                             "image": float((split.image - whole.image).abs().max()),
                             "rows": (split.video.shape[0], split.image.shape[0]),
                             "scale": float(whole.video.abs().max())}
        out[preset] = res
    return out


def _by_tp(outs):
    return {o["tp_rank"]: o for o in outs if o["cp_rank"] == 0}


def _compare(ref: dict, got: dict, label: str) -> None:
    for preset in PRESETS:
        lengths = [17, 13]
        padded = ref[preset]["text"]["all_loss"]
        for i, (n, packed) in enumerate(zip(lengths, got[preset].pop("packed_text"))):
            torch.testing.assert_close(packed, padded[i, :n], rtol=1e-5, atol=1e-5, msg=f"{label} {preset} packed {i}")
        ref[preset].pop("packed_text", None)
        for name, r in ref[preset].items():
            g = got[preset][name]
            scale = max(1.0, float(r["logits"].abs().max()))
            assert float((g["logits"] - r["logits"]).abs().max()) <= 1e-5 * scale, (label, preset, name, "logits")
            for key in ("loss", "all_loss", "resp_logits"):
                torch.testing.assert_close(g[key], r[key], rtol=1e-5, atol=1e-5, msg=f"{label} {preset} {name} {key}")
            assert set(g["grads"]) == set(r["grads"]) and len(r["grads"]) >= 10
            for n, rg in r["grads"].items():
                err = float((g["grads"][n] - rg).abs().max()) / max(float(rg.abs().max()), 1e-6)
                assert err <= 1e-4, (label, preset, name, n, err)


@pytest.fixture(scope="module")
def cp1():
    return run_distributed(_worker, 1, 1, 1)[0]


def test_cp2_equals_cp1(cp1):
    outs = run_distributed(_worker, 2, 1, 2)
    for o in outs:
        for preset in PRESETS:
            v = o[preset]["vision"]
            assert v["rows"] == ((6 * 4 * 8 + 2 * 8 * 4) // 4, (64 + 16 + 32) // 4)
            assert v["video"] <= 1e-6 * max(v["scale"], 1.0) and v["image"] <= 1e-6 * max(v["scale"], 1.0), v
            o[preset].pop("vision")
    _compare(cp1, _by_tp(outs)[0], "CP=2")


def test_tp2_cp2_equals_tp2():
    ref = _by_tp(run_distributed(_worker, 2, 2, 1))
    outs = _by_tp(run_distributed(_worker, 4, 2, 2))
    for tp_rank in (0, 1):
        for preset in PRESETS:
            outs[tp_rank][preset].pop("vision")
        _compare(ref[tp_rank], outs[tp_rank], f"TP2xCP2 tp_rank {tp_rank}")
