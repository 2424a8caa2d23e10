"""A user error in a 2-rank torchrun job ends both ranks and is reported once (megatron_ral.cli.entry.run_main).

* One rank fails after torch.distributed is up while the other waits in an all-reduce for it: the failing
  rank prints its line (``rank 1: ...``) and exits 2; the waiting rank does not hang (the launcher stops
  it, or its collective fails and it prints one ``stopped`` line), and no rank prints a traceback.
* Both ranks fail alike before initialisation (a flag that does not fit the process count): rank 0
  prints the line, rank 1 stays silent, and the job ends.

A hang would show up as the subprocess timeout (the collective timeout is set far beyond it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ral.platform.launch_env import free_port

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
HANG_GUARD_S = 240

WORKER = '''
import sys
from megatron_ral.cli.entry import run_main
from megatron_ral.errors import UserError


def main(argv):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")  # env:// from torchrun (megatron's state is not needed here)
    if dist.get_rank() == 1:
        raise UserError("/data/clip_0007.mp4: this rank's sample cannot be decoded")
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for rank 1
    print("rank 0 passed the collective", file=sys.stderr)
    return 0


run_main("worker.py", main)
'''


def _torchrun(args: list[str], log_dir: Path, cwd: Path) -> tuple[subprocess.CompletedProcess, dict[int, str]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               MEGATRON_RAL_DIST_TIMEOUT_MIN="30")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MEGATRON_RAL_DEBUG"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--redirects", "3", "--log-dir", str(log_dir), *args]
    proc = subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    stderr = {int(p.parent.name): p.read_text() for p in log_dir.rglob("stderr.log")}
    assert sorted(stderr) == [0, 1], list(log_dir.rglob("*"))
    return proc, stderr


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_error_on_one_rank_ends_both(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc, stderr = _torchrun([str(script)], tmp_path / "logs", tmp_path)
    assert proc.returncode != 0
    assert "exitcode  : 2" in proc.stderr  # torchrun's report: rank 1 ended with the user-error code
    assert _lines(stderr[1]) == ["worker.py: error: rank 1: /data/clip_0007.mp4: this rank's sample cannot be decoded"]
    # Rank 0 was stopped by the launcher (nothing printed) or saw its collective fail (one line).
    rank0 = _lines(stderr[0])
    assert len(rank0) <= 1 and all(ln.startswith("worker.py: rank 0: stopped: ") for ln in rank0), rank0
    assert all("Traceback" not in s and "passed the collective" not in s for s in stderr.values())


def test_flag_error_on_every_rank_is_printed_once(tmp_path):
    proc, stderr = _torchrun([str(ROOT / "tools" / "generate.py"), "--ckpt", "/nonexistent/ckpt", "--prompt", "x"],
                             tmp_path / "logs", tmp_path)
    assert proc.returncode != 0
    assert _lines(stderr[0]) == ["generate.py: error: 2 process(es) but --tp 1 x --pp 1 = 1; run it as a single process"]
    assert _lines(stderr[1]) == []
    assert "Traceback" not in stderr[0] + stderr[1]

