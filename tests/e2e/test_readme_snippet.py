"""README's "Using the library" snippet runs as written, from a directory outside the repository, on
quickstart-shaped outputs (tiny checkpoint in hf/ and mcore/, synthetic data in data/) named by OUT."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def _snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using the library"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_using_the_library_snippet_runs_as_written(tmp_path, tiny_checkpoint):
    from megatron_ral.data.synthetic import SyntheticSpec, make_synthetic_dataset

    out = tmp_path / "quickstart"
    out.mkdir()
    hf, mc = tiny_checkpoint
    (out / "hf").symlink_to(hf)
    (out / "mcore").symlink_to(mc)
    make_synthetic_dataset(str(out / "data"), 3, seed=1, spec=SyntheticSpec(image_fraction=0.0))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    r = subprocess.run([sys.executable, "-c", _snippet()], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    responses = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    assert len(responses) == 8 and all(isinstance(t, str) for t in responses)
