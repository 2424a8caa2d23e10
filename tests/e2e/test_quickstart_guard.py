"""The quickstart's output directory guard (examples/out_dir_guard.sh): it never deletes what it did not
create. The real quickstart refuses a non-empty foreign directory before doing anything else and leaves
it untouched; the guard's other cases run on the sourced helper (no venv, no model)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
GUARD = ROOT / "examples" / "out_dir_guard.sh"
MARKER = ".megatron_ral_example_output"


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*"))}


def _foreign(tmp_path: Path) -> Path:
    d = tmp_path / "mydir"
    (d / "sub").mkdir(parents=True)
    (d / "keep.txt").write_text("keep\n")
    (d / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return d


@pytest.mark.parametrize("how", ["--out", "OUT="])
def test_quickstart_refuses_foreign_directory(tmp_path, how):
    d = _foreign(tmp_path)
    before = _tree(d)
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    args = ["bash", str(ROOT / "examples" / "quickstart.sh")]
    if how == "--out":
        args += ["--out", str(d)]
    else:
        env["OUT"] = str(d)
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        f"quickstart.sh: error: --out {d}: exists, is not empty and was not created by this script; nothing was "
        f"changed (choose another directory, or --force to delete its contents)"]
    assert "[setup]" not in r.stdout  # refused before anything ran
    assert _tree(d) == before


def _guard(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    code = f'set -euo pipefail; source "{GUARD}"; out_dir_parse_args runs/x "$@"; {script}'
    return subprocess.run(["bash", "-c", code, "quickstart.sh", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def test_guard_claims_new_and_own_directories(tmp_path):
    d = tmp_path / "a" / "b"
    r = _guard('out_dir_claim "$OUT" "$FORCE"; echo "$OUT"', tmp_path, "--out", "a/b")  # relative to the cwd
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(d) and os.listdir(d) == [MARKER]
    (d / "old_output.pt").write_bytes(b"x")  # a previous run's output: ours, emptied on the next run
    r = _guard('out_dir_claim "$OUT" "$FORCE"', tmp_path, "--out", str(d))
    assert r.returncode == 0, r.stderr
    assert os.listdir(d) == [MARKER]
    e = tmp_path / "empty"
    e.mkdir()
    assert _guard('out_dir_claim "$OUT" "$FORCE"', tmp_path, "--out", str(e)).returncode == 0
    assert os.listdir(e) == [MARKER]


def test_guard_force_and_refusals(tmp_path):
    d = _foreign(tmp_path)
    r = _guard('out_dir_claim "$OUT" "$FORCE"', tmp_path, "--out", str(d), "--force")
    assert r.returncode == 0, r.stderr
    assert os.listdir(d) == [MARKER]
    f = tmp_path / "a_file"
    f.write_text("x")
    for target, message in [(str(f), "exists and is not a directory"),
                            (str(ROOT), "is the repository or one of its parent directories"),
                            (str(ROOT.parent), "is the repository or one of its parent directories"),
                            ("/", "refusing to use / or the home directory")]:
        r = _guard('out_dir_claim "$OUT" "$FORCE"', tmp_path, "--out", target, "--force")
        assert r.returncode == 2 and message in r.stderr, (target, r.stderr)
    assert f.read_text() == "x"
    r = _guard("true", tmp_path, "--bogus")
    assert r.returncode == 2 and "unknown argument: --bogus" in r.stderr
    r = _guard('echo "$OUT"', tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == str(ROOT / "runs" / "x")
