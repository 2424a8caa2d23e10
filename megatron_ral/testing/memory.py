"""Measured memory of the tiny models on CPU, the reference the memory planner's formulas are checked against.

The measurements run in a fresh process (``measure([(kind, kwargs), ...])``) with glibc's allocator told to return every
block above 64 KiB to the system at once (``MALLOC_MMAP_THRESHOLD_``), so that the resident set follows the live
tensors; the peak is the kernel's high-water mark (``VmHWM``) after resetting it (``/proc/self/clear_refs``),
minus the resident set before the measured call. Linux only.

    update   one forward + backward of a micro-batch of one sequence (``tokens`` long, loss on the last
             ``rows`` tokens through the model's selective output layer), optionally with the attention
             capture and the JSD to a p_old (the RAL term) or with megatron's full recompute; the weights'
             gradients exist beforehand (a first step allocates them)
    vision   one no-grad vision tower pass over a video of ``frames`` x ``side`` x ``side`` patches
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}


def available() -> bool:
    return Path("/proc/self/clear_refs").exists() and sys.platform == "linux"


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> int:
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _update(preset: str, tokens: int, rows: int, capture: bool, recompute: bool) -> dict:
    import torch

    from megatron_ral.attention.capture import AttentionCapture, response_layout
    from megatron_ral.rl.losses import attention_loss
    from megatron_ral.testing.models import seeded_megatron_model

    overrides = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
    model = seeded_megatron_model(preset, seed=0, **overrides)
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 900, (1, tokens), generator=gen)
    labels = torch.randint(0, 900, (1, tokens), generator=gen)
    index = torch.arange(tokens - rows, tokens)[None]
    hook = AttentionCapture(model) if capture else None
    layout = response_layout([tokens - rows], [rows])
    p_old = torch.softmax(torch.randn(1, rows, tokens, generator=gen), dim=-1)
    advantage = torch.ones(1)

    def step() -> None:
        if hook is None:
            total = model(input_ids=ids, labels=labels, loss_index=index).sum()
        else:
            with hook.capture(layout) as result:
                loss = model(input_ids=ids, labels=labels, loss_index=index)
            total = loss.sum() + attention_loss(result.rows, p_old, advantage).sum()
        total.backward()

    step()  # allocates the .grad of every weight
    model.zero_grad(set_to_none=False)
    base = _reset_peak()
    step()
    return {"peak": _status("VmHWM") - base}


def _vision(preset: str, frames: int, side: int) -> dict:
    import torch

    from megatron_ral.testing.models import PATCH_DIM, seeded_megatron_model

    model = seeded_megatron_model(preset, seed=0)
    gen = torch.Generator().manual_seed(0)
    warm = torch.randn(64, PATCH_DIM, generator=gen)
    with torch.no_grad():
        model.encode_vision(pixel_values_videos=warm, video_grid_thw=torch.tensor([[1, 8, 8]]))
    pixels = torch.randn(frames * side * side, PATCH_DIM, generator=gen)
    grid = torch.tensor([[frames, side, side]])
    base = _reset_peak()
    with torch.no_grad():
        out = model.encode_vision(pixel_values_videos=pixels, video_grid_thw=grid)
    return {"peak": _status("VmHWM") - base, "patches": int(pixels.shape[0]), "tokens": int(out.video.shape[0])}


def _run(cases: list) -> list[dict]:
    from megatron_ral.config.schema import ParallelConfig
    from megatron_ral.platform import destroy, initialize

    kinds = {"update": _update, "vision": _vision}
    initialize(ParallelConfig(), seed=0)
    try:
        return [kinds[kind](**kwargs) for kind, kwargs in cases]
    finally:
        destroy()


def measure(cases: list[tuple[str, dict]], timeout: float = 900.0) -> list[dict]:
    """Run the measurements ``[(kind, kwargs), ...]`` one after the other in one fresh process (each from its
    own reset high-water mark); returns their result dicts (bytes)."""
    env = dict(os.environ, **MALLOC_ENV)
    code = ("import json, sys\nfrom megatron_ral.testing.memory import _run\n"
            "print('RESULT ' + json.dumps(_run(json.loads(sys.argv[1]))))\n")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"memory measurements {cases} failed:\n{r.stderr[-4000:]}")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])
