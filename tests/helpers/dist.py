"""Run fastmerge as the ranks of a torch.distributed job on this machine (gloo on 127.0.0.1): each rank a
``python tests/helpers/dist_worker.py`` process with torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). One process runs several merges in one process group (torch imports once)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, jobs: Sequence[Sequence[str]], *, env: dict[int, dict[str, str]] | None = None,
              cwd: dict[int, Path] | None = None, init_group: bool = True, timeout: float = 120,
              module: bool = False) -> list[tuple[int, str, str]]:
    """Start ``world`` ranks, each running the CLI argument lists ``jobs`` in turn; returns per rank
    (exit code, stdout, stderr). ``init_group``: the worker sets up the process group itself, as a library
    user would (else fastmerge does, from the environment: ``module`` runs ``python -m fastmerge`` with
    the single job, exactly as torchrun would start it)."""
    port = free_port()
    procs = []
    for r in range(world):
        e = {**os.environ, "WORLD_SIZE": str(world), "RANK": str(r), "LOCAL_RANK": str(r),
             "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "FASTMERGE_TEST_INIT_GROUP": "1" if init_group else "0", **((env or {}).get(r, {}))}
        if module:
            assert len(jobs) == 1
            cmd = [sys.executable, "-m", "fastmerge", *jobs[0]]
        else:
            cmd = [sys.executable, str(WORKER), json.dumps([list(j) for j in jobs])]
        # never the repository root as cwd or on PYTHONPATH: `python -m` puts the cwd first on sys.path, and
        # the source tree's fastmerge (no built _C, no fastmerge.kernels) would shadow the installed one
        procs.append(subprocess.Popen(cmd, env=e, cwd=str((cwd or {}).get(r, tempfile.gettempdir())), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, so, se))
    return out


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes): two outputs are the same when these are."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line]
