"""pytest setup for the benchmarks in bench/ (``pytest bench``; see bench/README.md).

Collects ``bench_*.py`` here without touching the project's ``python_files``, decides smoke vs full mode,
stamps every benchmark with the machine it ran on, and, as tests/conftest.py does, fails a run that is
missing fastmerge._C, triton or mergekit (``FASTMERGE_ALLOW_MISSING=1`` lets such benchmarks skip).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import os
import platform
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# fastmerge importable without installing it; an installed fastmerge wins (the source tree alone has no
# native extension and no fastmerge.kernels: kernels/ is mapped there at install time).
if importlib.util.find_spec("fastmerge") is None and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))  # tests/helpers importable as `helpers`

from helpers.interpret import interpret_without_gpu  # noqa: E402

interpret_without_gpu()  # before any bench module imports a triton kernel (bench_mloss, bench_kernels run them)

from benchlib import full_mode  # noqa: E402
from helpers import requirements  # noqa: E402


def pytest_sessionstart(session):
    requirements.check_session()  # `pytest bench` alone: same rule as tests/conftest.py


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A benchmark skipped because fastmerge._C, triton or mergekit is missing fails (FASTMERGE_ALLOW_MISSING=1
    lets it skip), as in tests/."""
    outcome = yield
    requirements.skip_to_failure(item, outcome.get_result())


def pytest_collect_file(file_path: Path, parent):
    # Explicit paths (`pytest bench/bench_end_to_end.py`) are collected by pytest itself already.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def bench_dir() -> Path:
    return Path(os.environ.get("FASTMERGE_BENCH_DIR") or REPO / "bench" / "out")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    import psutil
    import torch

    import fastmerge
    from fastmerge import _native

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "fastmerge": fastmerge.__version__,
        "fastmerge_native_cpu_ext": bool(_native.HAS_CPU_EXT),
        "mergekit": _version("mergekit"),
        "transformers": _version("transformers"),
        "safetensors": _version("safetensors"),
    }


@pytest.fixture(scope="session")
def bench_full(request) -> bool:
    return full_mode(request.config)


@pytest.fixture(scope="session", name="bench_dir")
def _bench_dir() -> Path:
    d = bench_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def machine() -> dict:
    return machine_info()


@pytest.fixture(autouse=True)
def _record_machine(request, machine):
    """Every benchmark's saved JSON carries the machine, the versions, the date and the mode."""
    if "benchmark" in request.fixturenames:
        bm = request.getfixturevalue("benchmark")
        bm.extra_info.update({f"machine.{k}": v for k, v in machine.items()})
        bm.extra_info["mode"] = "full" if full_mode(request.config) else "smoke"
    yield


def pytest_report_header(config):
    mode = "full (FASTMERGE_BENCH_FULL=1)" if full_mode(config) else "smoke (tiny family, 1 round)"
    return [f"fastmerge bench: {mode}; cache {bench_dir()}"]


@pytest.fixture(scope="module")
def timed(request) -> bool:
    """Whether this run measures (``--benchmark-enable``) or is the CI smoke run (``--benchmark-disable``):
    per-tensor benches pick their tensor shape and rounds from it."""
    cfg = request.config
    return not (cfg.getoption("benchmark_disable", False) and not cfg.getoption("benchmark_enable", False))



@pytest.fixture(scope="module", autouse=True)
def _write_module_table(request, machine, bench_dir):
    """After a bench module that defines ``write_table(machine, bench_dir) -> Path | None`` (None: nothing
    was measured), write its table once."""
    yield
    write = getattr(request.module, "write_table", None)
    if write is not None and (path := write(machine, bench_dir)) is not None:
        print(f"\nfastmerge bench: table written to {path}")
