"""fastmerge/engine/gpu.py: the streaming engine's logic (units, batching, row chunks, the data-pass
protocol over chunks, writer order) must write the same files as ``engine.stream``, bit for bit: on the
GPU where there is one, else on the CPU (``execute_cuda(device="cpu")``, kernels interpreted). The
LLM-sized CUDA side (streams, pinned buffers, the memory bound) is in test_triton_gpu.py (``-m gpu``).

The GPU engine runs each tensor on the backend its plan chose, so its plans are built for
``device="cuda"``; without a GPU the planner is told it has one (``gpu_plans``: the Triton backend
runs interpreted, the CUDA C++ backend is unusable unless a test stands it in)."""

import json

import pytest
import torch
from safetensors import safe_open

import fastmerge
from fastmerge import backends
from fastmerge.errors import FastMergeError
from fastmerge.io.index import CheckpointIndex
from fastmerge.engine.stream import execute
from fastmerge.testing import LlamaShape, make_family
from helpers.kernel_cases import DEV, needs_triton

pytestmark = needs_triton

# 12 tensors, 64-2048 elements each: few interpreted programs per launch
SHAPE = LlamaShape(hidden=32, layers=1, intermediate=48, vocab=64, heads=2)


@pytest.fixture(autouse=True)
def gpu_plans(monkeypatch):
    if DEV == "cpu":
        monkeypatch.setattr(backends, "resolve_device", lambda device: "cuda" if device == "cuda" else "cpu")


def _gpu_plan(cfg, out, **kw):
    return fastmerge.plan(cfg, out, progress=False, copy_tokenizer=False, device="cuda", **kw)


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

    p = _gpu_plan(cfg, tmp_path / "gpu", out_shard_size=6_000)
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

    p = _gpu_plan(_config(fam, "ties", {"weight": 0.33, "density": 0.5}), tmp_path / "o")
    with pytest.raises(FastMergeError, match="max-gpu-memory"):
        gpu_runner.execute_cuda(p, tmp_path / "o", max_gpu_memory=gpu_runner.RESERVE_BYTES, device=DEV)
    with pytest.raises(FastMergeError, match="does not fit"):  # one row of the 64x32 embedding is 32 elements
        gpu_runner.execute_cuda(p, tmp_path / "o", max_gpu_memory=_budget(20), device=DEV)
    assert not (tmp_path / "o").exists()


def _cuda_in_plans(monkeypatch, min_elems: int) -> None:
    """Plans send ties tensors from ``min_elems`` elements to the CUDA C++ backend (``backends.select``'s
    size rule, lowered). Without a GPU the CUDA backend is declared usable: its units then call the same
    wrapper (``_native.ties``) on CPU tensors, i.e. the CPU kernel, with the same contract (both bit-exact
    with the reference: tests/native/test_native_ties.py)."""
    from fastmerge import _native
    from fastmerge.backends import cuda as cb

    if DEV == "cpu":
        if not _native.HAS_CPU_EXT:
            pytest.skip("the CPU stand-in needs fastmerge._C")
        monkeypatch.setattr(_native, "cuda_usable", lambda: (True, "stand-in: the CPU kernel"))
    elif not _native.cuda_usable()[0]:
        pytest.skip(f"fastmerge._C_cuda not usable: {_native.cuda_usable()[1]}")
    monkeypatch.setattr(cb, "MIN_ELEMS", min_elems)


def test_large_ties_tensors_go_to_the_cuda_kernel(fam, tmp_path, monkeypatch):
    """ties tensors the plan puts on the CUDA C++ backend run there, one per unit; the norms (under the size
    rule) stay batched on Triton. Checks the plumbing: which tensors, which rows of the slot, the
    parameters, where the output lands."""
    from fastmerge.backends import cuda as cb

    _cuda_in_plans(monkeypatch, 1000)
    calls = []
    run_into = cb.run_into

    def counted(job, out, inputs, base):
        assert all(x.numel() == out.numel() for x in inputs) and base.numel() == out.numel()
        calls.append(out.numel())
        run_into(job, out, inputs, base)

    monkeypatch.setattr(cb, "run_into", counted)
    cfg = _config(fam, "ties", {"weight": [0.3, 0.5, 0.2], "density": 0.4}, parameters={"election": "count"})
    rep = _both(cfg, tmp_path)
    assert rep.backends == {"cuda": 9, "triton": 3}  # embedding, lm_head, 4 attention, 3 MLP | 3 norms
    assert sorted(calls) == sorted([2048, 2048, 1536, 1536, 1536, 1024, 1024, 1024, 1024])


def test_cuda_tensors_too_large_for_a_slot_go_in_row_chunks_on_triton(fam, tmp_path, monkeypatch):
    from fastmerge.backends import cuda as cb

    _cuda_in_plans(monkeypatch, 1000)
    monkeypatch.setattr(cb, "run_into", lambda *a: pytest.fail("a tensor over the budget went to the CUDA kernel"))
    cfg = _config(fam, "ties", {"weight": 0.33, "density": 0.5})
    rep = _both(cfg, tmp_path, max_gpu_memory=_budget(1000))
    assert rep.chunked_tensors == 9 and rep.backends == {"triton": 12}


def test_backend_triton_keeps_ties_on_triton(fam, tmp_path, monkeypatch):
    from fastmerge.backends import cuda as cb

    _cuda_in_plans(monkeypatch, 1000)
    monkeypatch.setattr(cb, "run_into", lambda *a: pytest.fail("--backend triton called the CUDA kernel"))
    cfg = _config(fam, "ties", {"weight": 0.33, "density": 0.5})
    p = _gpu_plan(cfg, tmp_path / "gpu", backend="triton")
    from fastmerge.engine.gpu import execute_cuda

    assert execute_cuda(p, tmp_path / "gpu", device=DEV).backends == {"triton": 12}


@pytest.mark.parametrize("method,one_d", [("della", "torch"), ("della_linear", "torch"), ("ties", "chunked")])
def test_tensors_over_the_budget(fam, tmp_path, method, one_d):
    """Past slot 0: row chunks on Triton, except a 1-D tensor of a kernel that ranks within rows
    (``TritonKernel.whole_rows``: DELLA), which is one row and runs the torch reference."""
    import types

    from fastmerge.engine import gpu as gpu_runner

    params = {"weight": 0.4, "density": 0.6} | ({"epsilon": 0.1} if method.startswith("della") else {})
    p = _gpu_plan(_config(fam, method, params), tmp_path / "o")
    small = types.SimpleNamespace(cap=16)
    kinds = {tp.name: gpu_runner._unit_kind(tp, gpu_runner._kernel_job(p, tp), gpu_runner._numel(tp.shape), small)
             for tp in p.tensors}
    assert {kinds[tp.name] for tp in p.tensors if len(tp.shape) == 1} == {one_d}
    assert {kinds[tp.name] for tp in p.tensors if len(tp.shape) == 2} == {"chunked"}


def test_a_cpu_plan_is_refused(fam, tmp_path):
    p = fastmerge.plan(_config(fam, "ties", {"weight": 0.33, "density": 0.5}), tmp_path / "o", progress=False)
    from fastmerge.engine.gpu import execute_cuda

    with pytest.raises(FastMergeError, match="planned for the (native|torch) backend"):
        execute_cuda(p, tmp_path / "o", device=DEV)


# --------------------------------------------------------------------------------------------------
# synchronising calls inside a unit, counted on the CPU through a stand-in (gpu-design.md §5.2)

#: the calls that, on a CUDA device, block the host until the compute stream drains: a host→device
#: copy from pageable memory without non_blocking (``torch.tensor(..., device=)``, ``t.to(dev)``),
#: a device→host read (``.cpu()``, ``.item()``, ``.tolist()``, ``bool(t)``)
SYNC_CALLS = ("tensor(device=)", "to()", "cpu()", "item()", "tolist()", "bool()")


class _SyncCounter:
    """Counts would-be synchronising calls made while the engine runs a unit's work (``_Engine.compute``)."""

    def __init__(self, monkeypatch):
        from fastmerge.engine import gpu as g

        self.active = 0
        self.calls: dict[str, int] = {}
        self.units = 0
        counter = self

        def counted(what, real):
            def wrapper(*a, **k):
                if counter.active:
                    if what == "to()" and (k.get("non_blocking") or not _names_device(a[1:], k)):
                        return real(*a, **k)
                    if what == "tensor(device=)" and k.get("device") is None:
                        return real(*a, **k)
                    counter.calls[what] = counter.calls.get(what, 0) + 1
                return real(*a, **k)
            return wrapper

        monkeypatch.setattr(torch, "tensor", counted("tensor(device=)", torch.tensor))
        for name, what in (("to", "to()"), ("cpu", "cpu()"), ("item", "item()"), ("tolist", "tolist()"), ("__bool__", "bool()")):
            monkeypatch.setattr(torch.Tensor, name, counted(what, getattr(torch.Tensor, name)))
        real_compute = g._Engine.compute

        def compute(engine, j, fn):
            def run():
                counter.active += 1
                counter.units += 1
                try:
                    return fn()
                finally:
                    counter.active -= 1
            return real_compute(engine, j, run)

        monkeypatch.setattr(g._Engine, "compute", compute)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def _names_device(args, kwargs) -> bool:
    if "device" in kwargs:
        return True
    return any(isinstance(x, (str, torch.device)) and str(x) not in ("cpu",) or isinstance(x, torch.device)
               for x in args if not isinstance(x, torch.dtype))


def test_synchronising_calls_inside_units_are_counted(fam, tmp_path, monkeypatch):
    """The instrument: a ties merge (batches and row chunks) counted per unit. Today's kernel plans
    build their tables with blocking copies (GtaKernel/TiesKernel constructors, ``_groups``, the
    selection's ``k``, ``segment_sums``): the count is > 0, and bounded so that a regression shows."""
    from fastmerge.engine.gpu import execute_cuda

    cnt = _SyncCounter(monkeypatch)
    cfg = _config(fam, "ties", {"weight": 0.5, "density": 0.4})
    p = _gpu_plan(cfg, tmp_path / "gpu", out_shard_size=6_000)
    execute_cuda(p, tmp_path / "gpu", device=DEV, max_gpu_memory=_budget(600))
    assert cnt.units > 0
    print(f"sync calls in {cnt.units} units: {cnt.calls}")
    assert cnt.total <= 40 * cnt.units, cnt.calls


@pytest.mark.xfail(strict=True, reason="kernel plans still build device tables with blocking copies (gpu-design.md §5.2): "
                   "one pinned metadata buffer per unit with one non_blocking copy is the open fix")
def test_no_synchronising_calls_inside_units(fam, tmp_path, monkeypatch):
    from fastmerge.engine.gpu import execute_cuda

    cnt = _SyncCounter(monkeypatch)
    cfg = _config(fam, "ties", {"weight": 0.5, "density": 0.4})
    p = _gpu_plan(cfg, tmp_path / "gpu", out_shard_size=6_000)
    execute_cuda(p, tmp_path / "gpu", device=DEV, max_gpu_memory=_budget(600))
    assert cnt.units > 0 and cnt.total == 0, cnt.calls
