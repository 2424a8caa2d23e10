"""Run a function in N local processes joined by gloo on a free loopback port (tests, small tools)."""

from __future__ import annotations

import io
import os
import queue
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from megatron_ral.platform.launch_env import free_port


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any, env: dict) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        out = fn(*args)
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        from megatron_ral.platform import runtime

        try:
            runtime.destroy()
        except Exception:  # noqa: BLE001
            pass


# Imported once by the fork server, so that each rank starts without paying for them again.
_PRELOAD = ["torch", "megatron_ral.platform", "megatron.core", "megatron.core.models.gpt",
            "megatron.core.pipeline_parallel", "megatron.core.dist_checkpointing"]


def _context() -> mp.context.BaseContext:
    """forkserver on Linux: ranks are forked from a clean server process that preloaded torch and
    megatron-core (fast, and safe even when this process has threads or an initialised process group,
    which would make a plain fork hang); spawn elsewhere. MEGATRON_RAL_START_METHOD overrides."""
    method = os.environ.get("MEGATRON_RAL_START_METHOD")
    if method is None:
        method = "forkserver" if sys.platform == "linux" else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_distributed(
    fn: Callable, world_size: int, *args: Any, timeout: float = 600.0, env: dict | None = None
) -> list[Any]:
    """Call ``fn(*args)`` in ``world_size`` spawned processes; return each rank's result, rank order.

    Ranks come from a fork server on Linux (see ``_context``). Each process gets
    RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for a free port on 127.0.0.1;
    ``fn`` (a module-level function) calls ``megatron_ral.platform.initialize`` itself. Results travel
    through ``torch.save``. If any rank fails, all are stopped and a RuntimeError carries the tracebacks.
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, dict(env or {})), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) + len(failures) < world_size:
            try:
                rank, ok, payload = results.get(timeout=1.0)
            except queue.Empty:
                crashed = [i for i, p in enumerate(procs)
                           if p.exitcode not in (None, 0) and i not in outputs and i not in failures]
                if crashed:
                    failures.update({i: f"process exited with code {procs[i].exitcode}" for i in crashed})
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"distributed run timed out after {timeout:.0f}s")
                continue
            if ok:
                outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                failures[rank] = payload
                break
    finally:
        for p in procs:
            p.join(timeout=30 if not failures else 2)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        rank, tb = sorted(failures.items())[0]
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{tb}")
    return [outputs[r] for r in range(world_size)]
