"""Bad inputs are skipped, counted per reason and exposed as metrics; too many failures stop the run
with an error naming the files; malformed JSON is reported with file:line."""

from __future__ import annotations

import json
import logging
import os

import av
import numpy as np
import pytest

from megatron_ral.tiny.checkpoint import make_tiny_checkpoint
from megatron_ral.config.data import DataConfig
from megatron_ral.data.errors import MediaError, TooManyFailuresError
from megatron_ral.data.geometry import VisionParams
from megatron_ral.data.loader import VisionDataLoader
from megatron_ral.data.media import MediaOptions, image_input, video_input
from megatron_ral.data.processor import QwenVLProcessor
from megatron_ral.data.synthetic import SyntheticSpec, make_synthetic_dataset, write_video
from megatron_ral.data.video.backend import VideoDecoders

SMALL = dict(fps=2.0, video_min_pixels=8 * 784, video_max_pixels=16 * 784, image_min_pixels=8 * 784, image_max_pixels=16 * 784)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return QwenVLProcessor.from_pretrained(str(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A small synthetic dataset plus one file of every bad kind."""
    root = str(tmp_path_factory.mktemp("media"))
    make_synthetic_dataset(root, 12, seed=3, spec=SyntheticSpec(heldout_fraction=0.0))
    with open(os.path.join(root, "train.json")) as f:
        good = json.load(f)
    frames = np.random.default_rng(0).integers(0, 256, (40, 64, 96, 3), dtype=np.uint8)
    write_video(os.path.join(root, "full.webm"), frames, 8)
    data = open(os.path.join(root, "full.webm"), "rb").read()
    open(os.path.join(root, "truncated.webm"), "wb").write(data[: len(data) // 2])
    open(os.path.join(root, "empty.webm"), "wb").close()
    open(os.path.join(root, "random.webm"), "wb").write(np.random.default_rng(1).bytes(3000))
    # A valid header followed by garbage clusters.
    open(os.path.join(root, "damaged.webm"), "wb").write(data[:2000] + np.random.default_rng(2).bytes(len(data) - 2000))
    with av.open(os.path.join(root, "zero_frames.mp4"), "w") as c:  # a container without a single frame
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()
    png = open(os.path.join(root, good_image(good)), "rb").read()
    open(os.path.join(root, "truncated.png"), "wb").write(png[: len(png) // 2])
    from PIL import Image

    Image.fromarray(np.zeros((1, 300, 3), np.uint8)).save(os.path.join(root, "sliver.png"))
    return root, good


def good_image(records):
    return next(r["path"] for r in records if r["data_type"] == "image")


BAD_VIDEOS = {
    "missing.webm": "missing_file",
    "empty.webm": "empty_file",
    "truncated.webm": "truncated",
    "random.webm": "corrupt_media",
    "zero_frames.mp4": "no_frames",
}


@pytest.mark.parametrize("backend", ["dali", "pyav"])
def test_bad_videos_raise_media_errors(media, backend):
    root, _ = media
    decoders = VideoDecoders(backend, "cpu")
    opts = MediaOptions.from_config(DataConfig(**SMALL))
    for name, reason in BAD_VIDEOS.items():
        with pytest.raises(MediaError) as err:
            video_input(os.path.join(root, name), VisionParams(), opts, decoders)
        assert err.value.reason == reason, (name, err.value)
        assert err.value.source.endswith(name)
    with pytest.raises(MediaError) as err:
        video_input(os.path.join(root, "damaged.webm"), VisionParams(), opts, decoders)
    assert err.value.reason in ("corrupt_media", "truncated")
    # A stream that fails inside the decoder (probe of a good file, bytes of a bad one) ...
    from dataclasses import replace

    from megatron_ral.data.video.probe import probe_video

    info = probe_video(os.path.join(root, "full.webm"))
    decoder = decoders.decoder(decoders.choose("vp9"))
    with pytest.raises(MediaError) as err:
        decoder.decode(replace(info, path=os.path.join(root, "random.webm"), frame_pts=None), [0, 1])
    assert err.value.reason == "corrupt_media"
    # ... and the decoder still works afterwards.
    assert decoder.decode(info, [0, 39]).shape == (2, 3, 64, 96)


def test_bad_images_raise_media_errors(media):
    root, _ = media
    opts = MediaOptions.from_config(DataConfig(**SMALL))
    for name, reason in {"truncated.png": "corrupt_media", "random.webm": "corrupt_media", "nope.png": "missing_file",
                         "empty.webm": "empty_file", "sliver.png": "bad_geometry"}.items():
        with pytest.raises(MediaError) as err:
            image_input(os.path.join(root, name), VisionParams(), opts)
        assert err.value.reason == reason, (name, err.value)


def _write_records(root, good, extra_lines):
    path = os.path.join(root, "mixed.jsonl")
    lines = [json.dumps(r) for r in good] + extra_lines
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, len(good)


def _bad_lines(good):
    base = next(r for r in good if r["data_type"] == "video")
    lines = []
    for name in list(BAD_VIDEOS) + ["damaged.webm"]:
        lines.append(json.dumps(dict(base, path=name, problem_id=f"bad-{name}")))
    lines.append(json.dumps({k: v for k, v in base.items() if k != "solution"}))  # missing field
    lines.append('{"problem": "no closing brace"')                                  # malformed JSON
    return lines


def test_loader_skips_and_counts_every_bad_input(media, processor, caplog):
    root, good = media
    path, n_good = _write_records(root, good, _bad_lines(good))
    cfg = DataConfig(media_root=root, num_workers=0, max_failure_fraction=1.0, shuffle=False, **SMALL)
    loader = VisionDataLoader(cfg, processor, [path], batch_size=4, num_epochs=1)
    with caplog.at_level(logging.WARNING, logger="megatron_ral.data.failures"):
        seen = [r.problem_id for batch in loader for r in batch.records]
    assert seen == [str(r["problem_id"]) for r in good]
    m = loader.metrics()
    assert m["data/skipped/missing_file"] == 1
    assert m["data/skipped/empty_file"] == 1
    assert m["data/skipped/truncated"] + m["data/skipped/corrupt_media"] == 3
    assert m["data/skipped/no_frames"] == 1
    assert m["data/skipped/missing_field"] == 1
    assert m["data/skipped/malformed_record"] == 1
    assert m["data/skipped_total"] == 8 and m["data/samples_total"] == n_good + 8
    malformed_line = n_good + 8
    assert any(f"{path}:{malformed_line}" in r.getMessage() and "malformed_record" in r.getMessage() for r in caplog.records)


def test_too_many_failures_stop_and_name_the_files(media, processor):
    root, good = media
    path, _ = _write_records(root, good[:4], _bad_lines(good))
    cfg = DataConfig(media_root=root, num_workers=0, max_failure_fraction=0.05, failure_window=20, shuffle=False, **SMALL)
    loader = VisionDataLoader(cfg, processor, [path], batch_size=2, num_epochs=1)
    with pytest.raises(TooManyFailuresError) as err:
        for _ in loader:
            pass
    msg = str(err.value)
    assert "data.max_failure_fraction=5.0%" in msg
    assert "missing.webm" in msg and "empty.webm" in msg


def test_endless_loader_over_a_shard_with_no_usable_record_stops(media, processor):
    """Even with every failure tolerated, an endless loader (num_epochs=None) whose shard yields nothing in a
    whole pass stops with an error naming the files instead of looping forever; a finite one just ends."""
    root, good = media
    path, n_good = _write_records(root, [], _bad_lines(good))
    assert n_good == 0
    cfg = DataConfig(media_root=root, num_workers=0, max_failure_fraction=1.0, shuffle=False, **SMALL)
    with pytest.raises(TooManyFailuresError) as err:
        next(iter(VisionDataLoader(cfg, processor, [path], batch_size=2, num_epochs=None)))
    assert "none of the 8 records" in str(err.value) and "missing.webm" in str(err.value)
    finite = VisionDataLoader(cfg, processor, [path], batch_size=2, num_epochs=2)
    assert list(finite) == [] and finite.metrics()["data/skipped_total"] == 16


def test_one_bad_file_does_not_stop_training(media, processor):
    root, good = media
    path, n_good = _write_records(root, good, [json.dumps(dict(good[0], path="missing.webm"))])
    cfg = DataConfig(media_root=root, num_workers=0, shuffle=False, **SMALL)  # default 5% over a 100-draw window
    loader = VisionDataLoader(cfg, processor, [path], batch_size=3, num_epochs=1)
    assert sum(len(b) for b in loader) == n_good
    assert loader.metrics()["data/skipped/missing_file"] == 1


def test_dali_gpu_pipeline_that_cannot_be_built_is_a_counted_failure(media, processor, monkeypatch):
    """The GPU pipeline is built inside the decoder's error handling, on the rank's device: task 7 of a
    job with one GPU per task asks for device 0 (this machine has none, so the real build fails)."""
    root, good = media
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)   # one GPU bound to this task
    for k, v in {"SLURM_PROCID": "7", "SLURM_NTASKS": "8", "SLURM_LOCALID": "7", "SLURM_JOB_NODELIST": "g1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    videos = [r for r in good if r["data_type"] == "video"][:3]
    path, _ = _write_records(root, videos, [])
    cfg = DataConfig(media_root=root, num_workers=0, max_failure_fraction=1.0, shuffle=False, dali_device="gpu",
                     video_backend="dali", **SMALL)
    decoders = VideoDecoders("dali", "gpu")
    with pytest.raises(MediaError) as err:
        video_input(os.path.join(root, videos[0]["path"]), VisionParams(), MediaOptions.from_config(cfg), decoders)
    assert err.value.reason == "decoder_failed"
    assert "DALI pipeline on gpu:0 could not be built" in err.value.detail
    loader = VisionDataLoader(cfg, processor, [path], batch_size=2, num_epochs=1)
    assert list(loader) == []
    assert loader.metrics()["data/skipped/decoder_failed"] == len(videos)
