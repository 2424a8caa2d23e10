"""docker/install.sh --dry-run: for the image docker/Dockerfile names (CUDA 13) and an older CUDA 12 image it
plans DALI of the image's CUDA major version, megatron-core at the tested pin, and keeps the image's torch;
detected from this environment it reads torch's own CUDA version; bad input is one line and exit 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docker" / "install.sh"

pytestmark = pytest.mark.e2e

# What NGC PyTorch images bring (NVIDIA's release notes): CUDA, Python, torch.
IMAGES = {
    "nvcr.io/nvidia/pytorch:25.10-py3": ("13.0", "3.12", "2.9.0a0+145a3a7bda"),
    "nvcr.io/nvidia/pytorch:25.01-py3": ("12.8", "3.12", "2.6.0a0+ecf3bae40a"),
}


def _pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def _dry_run(*flags: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *flags], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": python, "HOME": str(ROOT)})


def _installs(out: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("install: ")]


def _dockerfile_base() -> str:
    m = re.search(r"^ARG BASE=(\S+)$", (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    assert m, "docker/Dockerfile names no ARG BASE"
    return m.group(1)


@pytest.mark.parametrize("image", ["dockerfile", "nvcr.io/nvidia/pytorch:25.01-py3"])
def test_plan_for_an_image(image):
    image = _dockerfile_base() if image == "dockerfile" else image
    assert image in IMAGES, f"add {image}'s CUDA/Python/torch versions to IMAGES"
    cuda, py, torch_version = IMAGES[image]
    out = _dry_run("--cuda", cuda, "--python", py, "--torch", torch_version)
    assert out.returncode == 0, out.stderr
    pins = _pins()
    dali_version = next(v for k, v in pins.items() if k.startswith("nvidia-dali-cuda"))
    flavour = {"12": "nvidia-dali-cuda120", "13": "nvidia-dali-cuda130"}[cuda.split(".")[0]]
    assert _installs(out.stdout) == [f"megatron-core=={pins['megatron-core']}", f"{flavour}=={dali_version}", "av",
                                     f"-e {ROOT}"]
    assert pins["megatron-core"] == "0.16.1"
    assert f"torch {torch_version} (kept)" in out.stdout and f"torch=={torch_version}" in out.stdout
    assert f"Python {py} (from --python), CUDA {cuda} (from --cuda)" in out.stdout
    command = next(line for line in out.stdout.splitlines() if line.startswith("command: "))
    assert "torch" not in command.replace("megatron", "") and f"{flavour}==" in command
    assert out.stdout.rstrip().endswith("dry run: nothing installed")


def test_the_dockerfile_runs_the_script():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "RUN bash docker/install.sh" in text and "COPY docker/install.sh" in text and "constraints.txt" in text
    assert "pip install" not in text.split("FROM", 1)[1]          # every install step is in the script


def test_plan_detected_from_this_environment():
    from importlib.metadata import version

    import torch

    out = _dry_run()
    assert out.returncode == 0, out.stderr
    assert f"torch {version('torch')} (kept)" in out.stdout
    if torch.version.cuda:
        major = torch.version.cuda.split(".")[0]
        assert "(from torch.version.cuda)" in out.stdout
        assert any(i.startswith(f"nvidia-dali-cuda{major}0==") for i in _installs(out.stdout))
    assert re.search(r"keep: \d+ packages", out.stdout)


@pytest.mark.parametrize("flags, message", [
    (["--cuda", "11.8", "--torch", "2.1.0"], "CUDA 11.8"),
    (["--cuda", "thirteen", "--torch", "2.1.0"], "--cuda 'thirteen'"),
    (["--python", "3.9", "--cuda", "12.8", "--torch", "2.1.0"], "Python 3.9"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_input_is_one_line(flags, message):
    out = _dry_run(*flags)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("install.sh: error:") and message in lines[0], out.stderr
