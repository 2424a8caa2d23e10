#!/usr/bin/env bash
# Create or update the development venv at .venv (repository root) and install everything, torch first.
#
#   bash scripts/setup.sh            # idempotent: a no-op when .venv is up to date
#   PYTHON=python3.11 bash scripts/setup.sh
#   MEGATRON_RAL_EXTRAS=video,test,bench,plot bash scripts/setup.sh   # what scripts/test.sh (and CI) asks for
#
# Extras (setup.py): video,test,plot by default (plot: matplotlib, for the quickstart's curves.png); the
# test environment adds bench (TRL, for the loss-parity test against TRL's GRPOTrainer), which the library
# itself never needs. Extras accumulate: a venv set up with more extras is up to date for fewer, and a
# reinstall keeps the extras installed before.
#
# Versions come from constraints.txt (the exact tested environment; setup.py keeps ranges). torch and
# torchvision are installed first, pinned to their constraints.txt versions; otherwise pip resolves an
# unpinned torch and downloads another multi-GB build. The venv is about 7 GB: the pinned torch build
# brings its CUDA libraries even on a CPU machine. The stamp file records a hash of the files that
# define the environment (setup.py, constraints.txt, this script), so a change to any triggers a reinstall.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
CONSTRAINTS="$ROOT/constraints.txt"
pin_of() {  # the constraints.txt line of a package, e.g. torch==2.14.1
  grep -iE "^$1==" "$CONSTRAINTS" || { echo "[setup] error: $1 is not pinned in $CONSTRAINTS" >&2; exit 1; }
}
TORCH_PIN="$(pin_of torch)"
TORCHVISION_PIN="$(pin_of torchvision)"
MCORE_PIN="$(pin_of megatron-core)"
EXTRAS="${MEGATRON_RAL_EXTRAS:-video,test,plot}"
if [[ ! "$EXTRAS" =~ ^[a-z]+(,[a-z]+)*$ ]]; then
  echo "[setup] error: MEGATRON_RAL_EXTRAS must be a comma-separated list of setup.py extras, got '$EXTRAS'" >&2
  exit 2
fi

stamp_of() {
  cat setup.py constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1
}
STAMP="$VENV/.megatron_ral_stamp"   # "<hash> <extras>"
want="$(stamp_of)"
have_hash="" have_extras=""
if [[ -f "$STAMP" ]]; then
  read -r have_hash have_extras < "$STAMP" || true
fi
extras_covered() {  # every requested extra is among the installed ones
  local e
  for e in ${EXTRAS//,/ }; do
    [[ ",$have_extras," == *",$e,"* ]] || return 1
  done
}
if [[ -x "$VENV/bin/python" && "$have_hash" == "$want" ]] && extras_covered; then
  echo "[setup] .venv is up to date (extras: $have_extras)"
  exit 0
fi
if [[ -x "$VENV/bin/python" && -n "$have_extras" ]]; then
  EXTRAS="$(tr ',' '\n' <<<"$have_extras,$EXTRAS" | sort -u | paste -sd, -)"
fi

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  echo "[setup] error: need Python >= 3.10 (found $("$PYTHON" --version 2>&1))" >&2
  exit 2
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating venv at $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "[setup] installing into $VENV (about 7 GB; a few minutes on the first run)"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# pip's notes about this machine's local package indexes and setuptools' editable-install banner are noise.
NOISE='is ignored|BuildBackendWarning|^  !!|^ *[*]+$|Please be careful with folders|name as your package|^ *$|with strategy, WheelFile'
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT

progress() {  # one line per package pip collects, then a summary; warnings pass through (errors: pip_install)
  local line
  while IFS= read -r line; do
    case "$line" in
      "Collecting "*) line="${line#Collecting }"; echo "[setup]   collecting ${line%% (from *}" ;;
      "Installing collected packages:"*)
        echo "[setup]   installing $(tr ',' '\n' <<<"${line#*:}" | grep -c .) packages (unpacking the large wheels takes a while)" ;;
      "Successfully installed "*) echo "[setup]   done" ;;
      WARNING*) grep -vE "$NOISE" <<<"$line" >&2 || true ;;
    esac
  done
}
pip_install() {
  local rc=0
  "${PIP[@]}" install --progress-bar off "$@" 2>&1 | tee "$LOG" | progress || rc=$?
  if [[ $rc -ne 0 ]]; then
    grep -vE "$NOISE" "$LOG" | tail -n 40 >&2 || true
    echo "[setup] error: pip install $* failed (exit $rc)" >&2
    exit 1
  fi
}
echo "[setup] upgrading pip"
pip_install --upgrade pip
echo "[setup] installing $TORCH_PIN $TORCHVISION_PIN (first, pinned)"
pip_install -c "$CONSTRAINTS" "$TORCH_PIN" "$TORCHVISION_PIN"
"$VENV/bin/python" -c "import torch, torchvision" || { echo "[setup] error: torch/torchvision failed to import" >&2; exit 1; }
echo "[setup] installing megatron_ral (editable) with $MCORE_PIN and the [$EXTRAS] extras, versions from constraints.txt"
# The torch pins are repeated so that no dependency can move torch away from the pinned build.
pip_install -c "$CONSTRAINTS" -e ".[$EXTRAS]" "$MCORE_PIN" "$TORCH_PIN" "$TORCHVISION_PIN"
echo "[setup] checking imports"
EXTRAS="$EXTRAS" "$VENV/bin/python" - <<'PY'
import importlib, os, sys
missing = []
modules = ["megatron_ral", "torch", "torchvision", "megatron.core", "transformers", "safetensors", "psutil", "yaml"]
by_extra = {"video": ["av", "nvidia.dali"], "test": ["pytest"], "bench": ["trl"]}
for extra in os.environ["EXTRAS"].split(","):
    modules += by_extra.get(extra, [])
for mod in modules:
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
echo "$want $EXTRAS" > "$STAMP"
