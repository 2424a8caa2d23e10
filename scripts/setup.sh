#!/usr/bin/env bash
# Create or update the development venv at .venv (repository root) and install everything, torch first.
#
#   bash scripts/setup.sh            # idempotent: a no-op when .venv is up to date
#   PYTHON=python3.11 bash scripts/setup.sh
#
# torch/torchvision are pinned and installed before anything that depends on torch; otherwise pip
# resolves an unpinned torch and downloads a multi-GB build. The stamp file records a hash of the
# files that define the environment, so a changed setup.py triggers a reinstall.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
TORCH_PIN="${TORCH_PIN:-torch==2.14.1}"
TORCHVISION_PIN="${TORCHVISION_PIN:-torchvision==0.29.1}"
MCORE_PIN="${MCORE_PIN:-megatron-core==0.16.1}"

stamp_of() {
  cat setup.py scripts/setup.sh | sha256sum | cut -d' ' -f1
}
STAMP="$VENV/.megatron_ral_stamp"
want="$(stamp_of)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "[setup] .venv is up to date"
  exit 0
fi

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  echo "[setup] error: need Python >= 3.10 (found $("$PYTHON" --version 2>&1))" >&2
  exit 2
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating venv at $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# pip's notes about this machine's local package indexes and setuptools' editable-install banner are noise.
NOISE='is ignored|BuildBackendWarning|^  !!|^ *[*]+$|Please be careful with folders|name as your package|^ *$|with strategy, WheelFile'
pip_install() {
  local out rc=0
  out=$("${PIP[@]}" install -q "$@" 2>&1) || rc=$?
  grep -vE "$NOISE" <<<"$out" || true
  if [[ $rc -ne 0 ]]; then
    echo "[setup] error: pip install $* failed (exit $rc)" >&2
    exit 1
  fi
}
echo "[setup] upgrading pip"
pip_install --upgrade pip
echo "[setup] installing $TORCH_PIN $TORCHVISION_PIN (first, pinned)"
pip_install "$TORCH_PIN" "$TORCHVISION_PIN"
"$VENV/bin/python" -c "import torch, torchvision" || { echo "[setup] error: torch/torchvision failed to import" >&2; exit 1; }
echo "[setup] installing megatron_ral (editable) with $MCORE_PIN and the [video,test] extras"
# The torch pins are repeated so that no dependency can move torch away from the pinned build.
pip_install -e ".[video,test]" "$MCORE_PIN" "$TORCH_PIN" "$TORCHVISION_PIN"
"$VENV/bin/python" - <<'PY'
import importlib, sys
missing = []
for mod in ["megatron_ral", "torch", "torchvision", "megatron.core", "transformers", "safetensors", "psutil", "yaml", "av", "nvidia.dali", "pytest"]:
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - report every failure
        missing.append(f"{mod}: {e}")
if missing:
    print("[setup] error: imports failed:\n  " + "\n  ".join(missing), file=sys.stderr)
    sys.exit(1)
import torch, megatron.core, transformers
print(f"[setup] ok: torch {torch.__version__}, megatron-core {megatron.core.__version__}, transformers {transformers.__version__}")
PY
echo "$want" > "$STAMP"
