"""Test setup. TRITON_INTERPRET must be set before anything imports triton kernels (GPU-less machines).

A run requires fastmerge._C, triton and mergekit: missing ones stop it at session start, and a test
skipped for one of them fails (``FASTMERGE_ALLOW_MISSING=1`` lets them skip; see helpers/requirements.py).
GPU lanes (``@pytest.mark.gpu``, no CUDA device) skip.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers importable as `helpers`

from helpers.interpret import interpret_without_gpu  # noqa: E402

interpret_without_gpu()

import pytest  # noqa: E402
import torch  # noqa: E402

from fastmerge import _native  # noqa: E402
from helpers import requirements  # noqa: E402
from fastmerge.testing import LlamaShape, make_family  # noqa: E402

TINY = LlamaShape(hidden=64, layers=3, intermediate=176, vocab=301, heads=4)


def pytest_sessionstart(session):
    requirements.check_session()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    requirements.skip_to_failure(item, outcome.get_result())


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


def available_backends() -> list[str]:
    out = ["torch"]
    if _native.HAS_CPU_EXT or requirements.required():  # required: a missing _C fails, never vanishes
        out.append("native")
    return out


@pytest.fixture(params=available_backends())
def backend(request):
    return request.param


@pytest.fixture(scope="session")
def family_bf16(tmp_path_factory):
    """base + 3 fine-tunes, bf16, ~20 KB shards (several shards each)."""
    root = tmp_path_factory.mktemp("fam_bf16")
    return make_family(root, TINY, n_finetunes=3, dtype="bfloat16", shard_bytes=40_000)


@pytest.fixture(scope="session")
def family_fp32(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam_fp32")
    return make_family(root, TINY, n_finetunes=3, dtype="float32", shard_bytes=80_000)
