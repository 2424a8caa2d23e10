"""Start N copies of a command the way ``srun`` starts the tasks of a job step, without SLURM.

Each task is a plain process (no torchrun) with ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
``SLURM_JOB_NODELIST=localhost`` and a free ``MASTER_PORT``; all of them, and every process they start
(data-loader workers, checkpoint writers), share one new process group, so that
``tasks.signal(SIGTERM)`` reaches them all at once, as SLURM's ``--signal`` / ``scancel --signal`` does.

    tasks = SrunTasks.start_rendezvoused(cmd, ntasks=2, env=env, log_dir=tmp)   # retried if the port was taken
    tasks.signal(signal.SIGTERM)
    codes = tasks.wait(timeout=300)        # exit codes in task order
    tasks.log(0)                           # task 0's stdout + stderr
    tasks.live_members()                   # pids of the group still running (zombies excluded)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_ral.platform.launch_env import free_port


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes of process group `pgid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


@dataclass
class SrunTasks:
    procs: list
    log_paths: list
    pgid: int

    @classmethod
    def start(cls, cmd: list[str], ntasks: int, env: dict, log_dir: str | os.PathLike, name: str = "task",
              job_id: int | None = None) -> "SrunTasks":
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        procs, logs = [], []
        for rank in range(ntasks):
            task_env = dict(env)
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
                task_env.pop(key, None)
            task_env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(rank),
                            SLURM_JOB_NODELIST="localhost", SLURM_NODELIST="localhost", MASTER_PORT=str(port))
            if job_id is not None:
                task_env["SLURM_JOB_ID"] = str(job_id)
            path = log_dir / f"{name}.{rank}.log"
            with open(path, "w") as out:
                # task 0 leads a new process group (not a new session: the others must be able to join it)
                group = 0 if rank == 0 else procs[0].pid
                procs.append(subprocess.Popen(cmd, env=task_env, stdout=out, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, process_group=group))
            logs.append(path)
        return cls(procs, logs, procs[0].pid)

    @classmethod
    def start_rendezvoused(cls, cmd: list[str], ntasks: int, env: dict, log_dir: str | os.PathLike,
                           name: str = "task", ready: str = "platform:", tries: int = 3,
                           timeout: float = 600) -> "SrunTasks":
        """`start`, then wait until task 0's log shows `ready` (the rendezvous is done). When a task fails
        because the free port was taken meanwhile (another job on a shared machine), start again on
        another port, up to `tries` times. Returns the tasks (possibly already exited for another reason)."""
        for attempt in range(tries):
            tasks = cls.start(cmd, ntasks, env, log_dir, name=name)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if ready in tasks.log(0):
                    return tasks
                if any(p.poll() is not None for p in tasks.procs):
                    break
                time.sleep(0.2)
            else:
                return tasks
            logs = "".join(tasks.log(r) for r in range(ntasks))
            if "EADDRINUSE" not in logs and "address already in use" not in logs or attempt == tries - 1:
                return tasks
            tasks.kill()
        return tasks

    def signal(self, sig: int = signal.SIGTERM) -> None:
        os.killpg(self.pgid, sig)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in self.procs:
            p.wait()

    def live_members(self, settle_s: float = 10.0) -> list[int]:
        """The group's live processes once the tasks have exited, after waiting up to `settle_s` for
        stragglers (e.g. multiprocessing's resource tracker) to go."""
        deadline = time.monotonic() + settle_s
        members = group_members(self.pgid)
        while members and time.monotonic() < deadline:
            time.sleep(0.2)
            members = group_members(self.pgid)
        return members

    def log(self, rank: int) -> str:
        return Path(self.log_paths[rank]).read_text(errors="replace")


__all__ = ["SrunTasks", "group_members"]
