"""The prefetching loader: worker processes give the same batches as in-process decoding, epochs
reshuffle, resuming from state_dict continues at the next record, SFT batches mask the prompt."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_ral.tiny.checkpoint import make_tiny_checkpoint
from megatron_ral.config.data import DataConfig
from megatron_ral.data.loader import VisionDataLoader
from megatron_ral.data.processor import QwenVLProcessor
from megatron_ral.data.synthetic import SyntheticSpec, make_synthetic_dataset

SMALL = dict(fps=2.0, video_min_pixels=8 * 784, video_max_pixels=16 * 784, image_min_pixels=8 * 784, image_max_pixels=16 * 784)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    proc = QwenVLProcessor.from_pretrained(str(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))))
    root = str(tmp_path_factory.mktemp("syn"))
    info = make_synthetic_dataset(root, 14, seed=1, spec=SyntheticSpec(heldout_fraction=0.0))
    return proc, root, info["train"]


def _ids(loader):
    out = []
    for batch in loader:
        out.append(([r.problem_id for r in batch.records], batch.input_ids.clone(),
                     batch.pixel_values_videos.clone() if batch.pixel_values_videos is not None else None))
    return out


def test_workers_match_in_process(setup):
    proc, root, train = setup
    a = _ids(VisionDataLoader(DataConfig(media_root=root, num_workers=0, **SMALL), proc, [train], batch_size=3, num_epochs=1))
    b = _ids(VisionDataLoader(DataConfig(media_root=root, num_workers=2, prefetch_factor=2, **SMALL), proc, [train], batch_size=3, num_epochs=1))
    assert [x[0] for x in a] == [x[0] for x in b]
    for (_, ia, pa), (_, ib, pb) in zip(a, b):
        assert torch.equal(ia, ib)
        assert (pa is None and pb is None) or torch.equal(pa, pb)
    assert sorted(i for x in a for i in x[0]) == sorted(str(r["problem_id"]) for r in json.load(open(train)))


def test_epochs_reshuffle_and_cover_all(setup):
    proc, root, train = setup
    loader = VisionDataLoader(DataConfig(media_root=root, num_workers=0, **SMALL), proc, [train], batch_size=14, num_epochs=2)
    epochs = [[r.problem_id for r in b.records] for b in loader]
    assert len(epochs) == 2 and sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_at_next_record(setup, workers):
    proc, root, train = setup
    cfg = DataConfig(media_root=root, num_workers=workers, **SMALL)
    full = [[r.problem_id for r in b.records] for b in VisionDataLoader(cfg, proc, [train], batch_size=4, num_epochs=2)]
    first = VisionDataLoader(cfg, proc, [train], batch_size=4, num_epochs=2)
    it = iter(first)
    head = [[r.problem_id for r in next(it).records] for _ in range(4)]  # crosses the epoch boundary (14 records)
    state = first.state_dict()
    rest = [[r.problem_id for r in b.records] for b in VisionDataLoader(cfg, proc, [train], batch_size=4, num_epochs=2, state=state)]
    flat = lambda xs: [i for x in xs for i in x]  # noqa: E731
    assert flat(head) + flat(rest) == flat(full)


def test_sft_batches_mask_prompt_and_padding(setup):
    proc, root, train = setup
    cfg = DataConfig(media_root=root, num_workers=0, **SMALL)
    batch = next(iter(VisionDataLoader(cfg, proc, [train], batch_size=3, mode="sft", num_epochs=1)))
    for i, rec in enumerate(batch.records):
        n = int(batch.attention_mask[i].sum())
        p = int(batch.prompt_lengths[i])
        mask = batch.loss_mask[i]
        assert mask[:p].sum() == 0 and mask[n:].sum() == 0 and bool((mask[p:n] == 1).all())
        target = proc.decode(batch.input_ids[i, p:n], skip_special_tokens=False)
        assert target == rec.process + "\n" + rec.solution + "<|im_end|>"
    # answer_only (RAL-zero): the target is the solution alone and the prompt asks for no reasoning.
    cfg = DataConfig(media_root=root, num_workers=0, template="answer_only", **SMALL)
    batch = next(iter(VisionDataLoader(cfg, proc, [train], batch_size=2, mode="sft", num_epochs=1)))
    p, n = int(batch.prompt_lengths[0]), int(batch.attention_mask[0].sum())
    assert proc.decode(batch.input_ids[0, p:n], skip_special_tokens=False) == batch.records[0].solution + "<|im_end|>"
    assert "<think>" not in proc.decode(batch.input_ids[0, :p], skip_special_tokens=False)


def test_batch_layout_for_the_model(setup):
    proc, root, train = setup
    cfg = DataConfig(media_root=root, num_workers=0, shuffle=False, **SMALL)
    batch = next(iter(VisionDataLoader(cfg, proc, [train], batch_size=6, num_epochs=1, padding_side="left")))
    # Pads expanded to exactly the vision token count of each item, in order.
    vids = [r for r in batch.records if r.data_type == "video"]
    n_vid_tokens = int((batch.input_ids == proc.video_token_id).sum())
    assert batch.video_grid_thw is not None and len(batch.video_grid_thw) == len(vids)
    assert n_vid_tokens == int(batch.video_grid_thw.prod(-1).sum()) // 4
    assert batch.pixel_values_videos.shape == (int(batch.video_grid_thw.prod(-1).sum()), 1176)
    assert batch.second_per_grid_ts.shape == (len(vids),)
    if batch.image_grid_thw is not None:
        assert int((batch.input_ids == proc.image_token_id).sum()) == int(batch.image_grid_thw.prod(-1).sum()) // 4
    # Left padding: the last column is real for every row.
    assert bool(batch.attention_mask[:, -1].all())
    assert set(batch.model_inputs()) >= {"input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}


def test_dali_gpu_decoding_caps_the_worker_processes(setup):
    """Each worker that decodes with DALI on the GPU holds its own CUDA context, NVDEC decoder and DALI
    pools: data.dali_gpu_workers bounds them (the device is only named here, nothing is decoded)."""
    proc, root, train = setup
    cpu = VisionDataLoader(DataConfig(media_root=root, num_workers=3, dali_device="cpu", **SMALL), proc, [train])
    assert cpu.worker_count() == 3 and cpu.worker_count(start=len(cpu) - 2) == 2
    gpu = VisionDataLoader(DataConfig(media_root=root, num_workers=3, dali_device="gpu", **SMALL), proc, [train])
    assert gpu.builder.decoders.uses_gpu and gpu.worker_count() == 1
    two = VisionDataLoader(DataConfig(media_root=root, num_workers=3, dali_device="gpu", dali_gpu_workers=2, **SMALL),
                           proc, [train])
    assert two.worker_count() == 2
    pyav = VisionDataLoader(DataConfig(media_root=root, num_workers=3, dali_device="gpu", video_backend="pyav",
                                       **SMALL), proc, [train])
    assert pyav.worker_count() == 3  # PyAV decodes on the CPU: no GPU state per worker
