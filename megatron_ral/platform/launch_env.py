"""Who am I in the job: rank, world size, local rank and rendezvous address from the launcher.

Three launchers are understood, in this order of precedence:

* ``torchrun`` (or any launcher that exports ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``);
* SLURM ``srun`` started one task per GPU, with no torchrun inside: ``SLURM_PROCID``,
  ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the first host of ``SLURM_JOB_NODELIST`` (``SLURM_NODELIST``)
  become rank, world size, local rank and master address; the port is ``MASTER_PORT`` if set, else
  ``20000 + SLURM_JOB_ID % 20000`` so that two jobs sharing a node do not collide;
* nothing: a single process on 127.0.0.1 with a free port.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"

    def export(self, environ: dict | None = None) -> None:
        """Write the torch.distributed ``env://`` variables."""
        environ = os.environ if environ is None else environ
        environ["RANK"] = str(self.rank)
        environ["WORLD_SIZE"] = str(self.world_size)
        environ["LOCAL_RANK"] = str(self.local_rank)
        environ["MASTER_ADDR"] = self.master_addr
        environ["MASTER_PORT"] = str(self.master_port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_BRACKET = re.compile(r"\[([^\]]*)\]")


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``"gpu[003-005,9],cpu1"`` -> ``"gpu003"``.

    Handles several bracket groups (``"r[1-2]-n[08-09]"`` -> ``"r1-n08"``) and keeps zero padding.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM node list")
    # The first top-level comma ends the first entry (commas inside brackets don't count).
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end]

    def first_of_group(m: re.Match) -> str:
        first = m.group(1).split(",")[0]
        return first.split("-")[0]

    return _BRACKET.sub(first_of_group, entry)


def _int(environ: Mapping[str, str], key: str) -> int:
    value = environ[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def rank_and_world(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """This process's (rank, world size) from the launcher's variables, with the precedence of
    :func:`resolve_launch_env` and without touching the network; (0, 1) for a lone process or
    unreadable variables (this is asked on the error path, which must not fail itself)."""
    environ = os.environ if environ is None else environ
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in environ and world_key in environ:
            try:
                return int(environ[rank_key]), int(environ[world_key])
            except ValueError:
                return 0, 1
    return 0, 1


def local_rank_from_env(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank on its node, by the precedence of :func:`resolve_launch_env`: torchrun's
    ``LOCAL_RANK`` (``RANK`` when a launcher exports ``RANK``/``WORLD_SIZE`` without it), else SLURM's
    ``SLURM_LOCALID``, else 0. Reads only variables (no rendezvous side effects), so data-loader
    workers can call it: they inherit the variables (``initialize`` exports them under SLURM)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else _int(environ, "RANK")
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
    return 0


def resolve_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read the launcher's variables (see the module docstring for the precedence)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
        local = local_rank_from_env(environ)
        addr = environ.get("MASTER_ADDR", "127.0.0.1")
        port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 29500
        return LaunchEnv(rank, world, local, addr, port, "torchrun")
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("SLURM_PROCID is set but neither SLURM_JOB_NODELIST nor SLURM_NODELIST is")
        rank, world = _int(environ, "SLURM_PROCID"), _int(environ, "SLURM_NTASKS")
        local = local_rank_from_env(environ)
        addr = environ.get("MASTER_ADDR") or first_slurm_host(nodelist)
        if "MASTER_PORT" in environ:
            port = _int(environ, "MASTER_PORT")
        else:
            job = int(environ.get("SLURM_JOB_ID", "0") or 0)
            port = 20000 + job % 20000
        return LaunchEnv(rank, world, local, addr, port, "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single")
