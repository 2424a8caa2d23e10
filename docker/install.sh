#!/usr/bin/env bash
# Install megatron_ral into an NGC PyTorch container (docker/Dockerfile runs it; it also works in a running
# container or any CUDA Python environment that already has torch).
#
#   bash docker/install.sh                     # detect, then pip install
#   bash docker/install.sh --dry-run           # print what it would install here
#   bash docker/install.sh --dry-run --cuda 13.0 --python 3.12 --torch 2.9.0a0+145a3a7bda   # for another image
#
# What it installs, and what it keeps:
#   * the container's torch, torchvision, triton, Transformer Engine, flash-attn, apex and CUDA libraries
#     (nvidia-*, cuda-*) stay as they are: they are pinned to their installed versions for the install;
#   * megatron-core at the tested version (constraints.txt: 0.16.1, the only one tested; its wheel installs on
#     the NGC image's Python 3.12);
#   * DALI built for the container's CUDA major version: nvidia-dali-cuda130 for CUDA 13 (NGC 25.09 and
#     later), nvidia-dali-cuda120 for CUDA 12, at the tested version (constraints.txt), and PyAV;
#   * megatron_ral itself (editable, from the repository root), its other dependencies at the versions of
#     constraints.txt unless the container already has the package (then the container's version stays;
#     NGC images also pin their packages in /etc/pip/constraint.txt, which pip applies through PIP_CONSTRAINT).
# CUDA comes from torch.version.cuda (else $CUDA_VERSION, which NGC images set); --cuda/--python/--torch
# replace what is detected (for --dry-run about another image). Exit 2 with one line on bad input.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
exec "$PYTHON" - "$ROOT" "$@" <<'PY'
import argparse
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata

root, argv = sys.argv[1], sys.argv[2:]
PROG = "install.sh"
# The container's GPU stack: kept at the installed versions.
KEEP = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton|transformer-engine.*|flash-attn.*|apex"
                  r"|nvfuser.*|nvidia-(?!dali-).*|cuda-.*|cupy.*)$")
DALI = re.compile(r"^nvidia-dali-cuda\d+$")
DALI_FLAVOURS = {12: "nvidia-dali-cuda120", 13: "nvidia-dali-cuda130"}
MIN_PYTHON = (3, 10)


def fail(message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def major_minor(text, flag):
    m = re.fullmatch(r"(\d+)\.(\d+)(\.\d+)*", text or "")
    if not m:
        fail(f"{flag} {text!r}: expected MAJOR.MINOR, e.g. 13.0")
    return int(m.group(1)), int(m.group(2))


class Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)


p = Parser(prog=PROG, description="Install megatron_ral into an NGC PyTorch container, keeping its torch and TE.")
p.add_argument("--dry-run", action="store_true", help="print what would be installed, install nothing")
p.add_argument("--cuda", help="CUDA version X.Y (default: torch.version.cuda, else $CUDA_VERSION)")
p.add_argument("--python", help="Python version X.Y (default: this interpreter's)")
p.add_argument("--torch", help="the container's torch version (default: the installed one)")
args = p.parse_args(argv)

installed = {} if args.dry_run and args.torch else {norm(d.metadata["Name"]): d.version
                                                     for d in metadata.distributions() if d.metadata["Name"]}

# --- what this environment (or the image described by the flags) is ------------------------------------
python = major_minor(args.python, "--python") if args.python else sys.version_info[:2]
if python < MIN_PYTHON:
    fail(f"Python {python[0]}.{python[1]}: megatron_ral needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}")
torch_version = args.torch or installed.get("torch")
if not torch_version:
    fail("no torch in this environment: the container's torch is kept, never installed (give --torch with "
         "--dry-run to plan for another image)")
cuda_text, cuda_source = args.cuda, "--cuda"
if cuda_text is None:
    try:
        import torch  # noqa: E402

        cuda_text, cuda_source = torch.version.cuda, "torch.version.cuda"
    except ImportError:
        cuda_text = None
    if not cuda_text:
        cuda_text, cuda_source = os.environ.get("CUDA_VERSION"), "$CUDA_VERSION"
if not cuda_text:
    fail("no CUDA found (torch.version.cuda is None and $CUDA_VERSION is unset): give --cuda X.Y")
cuda = major_minor(cuda_text, cuda_source)
if cuda[0] not in DALI_FLAVOURS:
    fail(f"CUDA {cuda[0]}.{cuda[1]}: DALI wheels of the tested version exist for CUDA "
         f"{' and '.join(str(k) for k in DALI_FLAVOURS)} only")

# --- pins ----------------------------------------------------------------------------------------------
constraints_path = os.path.join(root, "constraints.txt")
pins = {}
with open(constraints_path) as f:
    for line in f:
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line.strip())
        if m:
            pins[norm(m.group(1))] = m.group(2)
dali_tested = next((v for k, v in pins.items() if DALI.match(k)), None)
if "megatron-core" not in pins or dali_tested is None:
    fail(f"{constraints_path}: megatron-core and nvidia-dali-cuda* must be pinned there")
dali = f"{DALI_FLAVOURS[cuda[0]]}=={dali_tested}"
mcore = f"megatron-core=={pins['megatron-core']}"
kept = sorted(f"{n}=={v}" for n, v in installed.items() if KEEP.match(n))
if args.torch:
    kept = [k for k in kept if not k.startswith("torch==")] + [f"torch=={args.torch}"]
project = sorted(f"{n}=={v}" for n, v in pins.items()
                 if not KEEP.match(n) and not DALI.match(n) and n not in installed)
dropped = sorted(n for n in pins if KEEP.match(n) or DALI.match(n) or n in installed)
te = next((f"{n}=={v}" for n, v in installed.items() if n.startswith("transformer-engine")), None)

other_image = args.dry_run and bool(args.python or args.torch)   # planning for an image, not this environment
print(f"{PROG}: Python {python[0]}.{python[1]}{' (from --python)' if args.python else ''}, "
      f"CUDA {cuda[0]}.{cuda[1]} (from {cuda_source}), "
      f"torch {torch_version} (kept)" + (f", {te} (kept)" if te else ""))
print(f"install: {mcore}")
print(f"install: {dali}")
print("install: av")
print(f"install: -e {root}")
print(f"keep: {len(kept)} packages of the container at their versions" + (f" ({', '.join(kept)})" if len(kept) <= 12 else ""))
print(f"constraints: {len(project)} pins of constraints.txt; not used: {len(dropped)} (the GPU stack, DALI, "
      f"and what the container already has)")
if os.environ.get("PIP_CONSTRAINT"):
    print(f"constraints: also $PIP_CONSTRAINT={os.environ['PIP_CONSTRAINT']} (the image's own pins)")

with tempfile.TemporaryDirectory() as tmp:
    keep_file, project_file = os.path.join(tmp, "keep.txt"), os.path.join(tmp, "project.txt")
    cmd = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
           "-c", keep_file, "-c", project_file, mcore, dali, "av", "-e", root]
    shown = ["python" if other_image else sys.executable] + cmd[1:6] + ["-c", "KEEP", "-c", "PROJECT"] + cmd[10:]
    print("command: " + " ".join(shown))
    if args.dry_run:
        print("dry run: nothing installed")
        sys.exit(0)
    with open(keep_file, "w") as f:
        f.write("\n".join(kept) + "\n")
    with open(project_file, "w") as f:
        f.write("\n".join(project) + "\n")
    code = subprocess.call(cmd)
    if code:
        sys.exit(code)
    after = {norm(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}
    changed = [f"{k.split('==')[0]} {k.split('==')[1]} -> {after.get(k.split('==')[0])}" for k in kept
               if after.get(k.split("==")[0]) != k.split("==")[1]]
    if changed:
        fail("the install changed the container's GPU stack: " + "; ".join(changed))
    print(f"{PROG}: installed; torch {after.get('torch')} and the container's GPU stack unchanged")
PY
