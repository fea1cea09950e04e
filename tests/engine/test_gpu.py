"""fastmerge/gpu_runner.py: the streaming engine's logic (units, batching, row chunks, the data-pass
protocol over chunks, writer order) must write the same files as ``runner.execute``, bit for bit: on the
GPU where there is one, else on the CPU (``execute_cuda(device="cpu")``, kernels interpreted). The
LLM-sized CUDA side (streams, pinned buffers, the memory bound) is in test_triton_gpu.py (``-m gpu``)."""

import json

import pytest
import torch
from safetensors import safe_open

import fastmerge
from fastmerge.errors import FastMergeError
from fastmerge.io.index import CheckpointIndex
from fastmerge.engine.stream import execute
from fastmerge.testing import LlamaShape, make_family
from helpers.kernel_cases import DEV, needs_triton

pytestmark = needs_triton

# 12 tensors, 64-2048 elements each: few interpreted programs per launch
SHAPE = LlamaShape(hidden=32, layers=1, intermediate=48, vocab=64, heads=2)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("gpu_runner_fam"), SHAPE, n_finetunes=3, dtype="bfloat16", shard_bytes=9_000)


def _read(folder):
    ix = CheckpointIndex.open(folder)
    out = {}
    for name, info in ix.tensors.items():
        with safe_open(str(info.file), framework="pt") as f:
            out[name] = f.get_tensor(name).clone()
    return out


def _config(fam, method, params, n_models=3, base=True, **extra):
    b, fts = fam
    cfg = {"merge_method": method, "models": [{"model": str(f), "parameters": dict(params)} for f in fts[:n_models]]}
    if base:
        cfg["base_model"] = str(b)
    cfg.update(extra)
    return cfg


def _budget(elems: int, rows: int = 4, in_bytes: int = 2, out_bytes: int = 2) -> int:
    """A max_gpu_memory leaving room for ``elems`` elements per slot (bf16 rows, bf16 output)."""
    from fastmerge.engine import gpu as gpu_runner

    return gpu_runner.RESERVE_BYTES + 2 * elems * (rows * in_bytes + out_bytes)


def _both(cfg, tmp_path, **kw):
    p = fastmerge.plan(cfg, tmp_path / "cpu", progress=False, copy_tokenizer=False, out_shard_size=6_000)
    execute(p, tmp_path / "cpu")
    from fastmerge.engine.gpu import execute_cuda

    p = fastmerge.plan(cfg, tmp_path / "gpu", progress=False, copy_tokenizer=False, out_shard_size=6_000)
    rep = execute_cuda(p, tmp_path / "gpu", device=DEV, **kw)
    a, b = _read(tmp_path / "cpu"), _read(tmp_path / "gpu")
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.int16), b[name].view(torch.int16)), name
    ia = json.loads((tmp_path / "cpu" / "model.safetensors.index.json").read_text())["weight_map"]
    ib = json.loads((tmp_path / "gpu" / "model.safetensors.index.json").read_text())["weight_map"]
    assert ia == ib
    return rep


@pytest.mark.parametrize("stage", [None, 3002])
def test_ties_batched(fam, tmp_path, monkeypatch, stage):
    """One launch unit for the 12 tensors; with 3002-byte staging buffers it is uploaded in ~50 pieces
    (cut inside rows and tensors, alternating between the two buffers)."""
    from fastmerge.engine import gpu as gpu_runner

    if stage:
        monkeypatch.setattr(gpu_runner, "STAGE_BYTES", stage)
    rep = _both(_config(fam, "ties", {"weight": 0.33, "density": 0.5}), tmp_path)
    assert rep.backends == {"triton": 12} and rep.units == 1 and rep.chunked_tensors == 0


def test_ties_exact_k_in_row_chunks(fam, tmp_path):
    """A 1000-element slot: the embedding, lm_head, attention and MLP matrices go in row chunks, the
    selection's three passes over every chunk first; the norms stay batched."""
    cfg = _config(fam, "ties", {"weight": [0.2, 0.6], "density": 0.4}, parameters={"selection": "topk"})
    rep = _both(cfg, tmp_path, max_gpu_memory=_budget(1000))
    assert rep.chunked_tensors == 9 and rep.backends == {"triton": 12}


@pytest.mark.parametrize("method", ["dare_ties", "della_linear"])
def test_random_masks_in_row_chunks(fam, tmp_path, method):
    """Chunks carry the index of their first element: the same masks as the whole tensor's."""
    params = {"weight": 0.4, "density": 0.6} | ({"epsilon": 0.1} if method == "della_linear" else {})
    cfg = _config(fam, method, params, parameters={"rescale": False})
    rep = _both(cfg, tmp_path, max_gpu_memory=_budget(1100, in_bytes=2))
    assert rep.chunked_tensors > 0


def test_model_stock_gram_over_chunks_and_linear_without_base(fam, tmp_path):
    rep = _both(_config(fam, "model_stock", {}), tmp_path / "ms", max_gpu_memory=_budget(1100))
    assert rep.chunked_tensors > 0
    rep = _both(_config(fam, "linear", {"weight": 1.0}, base=False), tmp_path / "lin")
    assert rep.backends == {"triton": 12}


def test_methods_without_kernels_run_the_reference(fam, tmp_path):
    rep = _both(_config(fam, "sce", {}), tmp_path)
    assert rep.backends == {"torch": 12}


def test_budget_too_small(fam, tmp_path):
    from fastmerge.engine import gpu as gpu_runner

    p = fastmerge.plan(_config(fam, "ties", {"weight": 0.33, "density": 0.5}), tmp_path / "o", progress=False)
    with pytest.raises(FastMergeError, match="max-gpu-memory"):
        gpu_runner.execute_cuda(p, tmp_path / "o", max_gpu_memory=gpu_runner.RESERVE_BYTES, device=DEV)
    with pytest.raises(FastMergeError, match="does not fit"):  # one row of the 64x32 embedding is 32 elements
        gpu_runner.execute_cuda(p, tmp_path / "o", max_gpu_memory=_budget(20), device=DEV)
    assert not (tmp_path / "o").exists()


def test_large_ties_tensors_go_to_the_cuda_kernel(fam, tmp_path, monkeypatch):
    """ties tensors from ``CUDA_MIN_ELEMS`` go to the CUDA C++ kernel, one per unit; the norms stay batched
    on Triton. On a GPU this runs ``_C_cuda``; without one the CUDA entry point is stood in by the CPU
    kernel with the same contract (both bit-exact with the reference: tests/native/test_native_ties.py),
    which checks the plumbing: which tensors, which rows of the slot, the parameters, where the output
    lands."""
    from fastmerge import _native
    from fastmerge.engine import gpu as gpu_runner

    calls = []
    if DEV == "cpu":
        if not _native.HAS_CPU_EXT:
            pytest.skip("the CPU stand-in needs fastmerge._C")

        def stand_in(out, inputs, base, w, d, normalize, lam, election, exact_k, rescale):
            assert all(x.numel() == out.numel() for x in inputs) and base.numel() == out.numel()
            calls.append(out.numel())
            _native.ties(out, inputs, base, w, d, normalize, lam, election, exact_k, 0, rescale)

        monkeypatch.setattr(_native, "ties_cuda", stand_in)
        monkeypatch.setattr(gpu_runner, "_cuda_usable", lambda dev: True)
    elif not _native.cuda_usable()[0]:
        pytest.skip(f"fastmerge._C_cuda not usable: {_native.cuda_usable()[1]}")
    monkeypatch.setattr(gpu_runner, "CUDA_MIN_ELEMS", 1000)
    cfg = _config(fam, "ties", {"weight": [0.3, 0.5, 0.2], "density": 0.4}, parameters={"election": "count"})
    rep = _both(cfg, tmp_path)
    assert rep.backends == {"cuda": 9, "triton": 3}  # embedding, lm_head, 4 attention, 3 MLP | 3 norms
    assert DEV != "cpu" or sorted(calls) == sorted([2048, 2048, 1536, 1536, 1536, 1024, 1024, 1024, 1024])


def test_backend_triton_keeps_ties_on_triton(fam, tmp_path, monkeypatch):
    from fastmerge import _native
    from fastmerge.engine import gpu as gpu_runner

    monkeypatch.setattr(gpu_runner, "_cuda_usable", lambda dev: True)
    monkeypatch.setattr(gpu_runner, "CUDA_MIN_ELEMS", 1000)
    monkeypatch.setattr(_native, "ties_cuda", lambda *a: pytest.fail("--backend triton called the CUDA kernel"))
    cfg = _config(fam, "ties", {"weight": 0.33, "density": 0.5})
    p = fastmerge.plan(cfg, tmp_path / "gpu", progress=False, copy_tokenizer=False, backend="triton")
    from fastmerge.engine.gpu import execute_cuda

    assert execute_cuda(p, tmp_path / "gpu", device=DEV).backends == {"triton": 12}
