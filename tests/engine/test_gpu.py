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


#: the selection's modules (kernels/select.py, select_bracket.py: rewritten separately); their calls are
#: counted apart, so that the engine's and the kernel plans' own count is exact meanwhile
SELECTION_FILES = ("select.py", "select_bracket.py")


class _SyncCounter:
    """Counts would-be synchronising calls made while the engine runs a unit's work (``_Engine.compute``),
    by the innermost repository frame that made them: ``calls`` outside the selection's modules,
    ``selection_calls`` inside them."""

    def __init__(self, monkeypatch):
        import traceback

        from fastmerge.engine import gpu as g

        self.active = 0
        self.calls: dict[str, int] = {}
        self.selection_calls: dict[str, int] = {}
        self.units = 0
        counter = self

        def record(what):
            frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename and "/triton/" not in f.filename]
            where = counter.selection_calls if frames and frames[-1].filename.endswith(SELECTION_FILES) else counter.calls
            where[what] = where.get(what, 0) + 1

        def counted(what, real):
            def wrapper(*a, **k):
                if counter.active:
                    if what == "to()" and (k.get("non_blocking") or not _names_device(a[1:], k)):
                        return real(*a, **k)
                    if what == "tensor(device=)" and k.get("device") is None:
                        return real(*a, **k)
                    record(what)
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


def test_the_counter_sees_blocking_copies(fam, tmp_path, monkeypatch):
    """The instrument itself: a kernel plan that copies a table the blocking way inside a unit is counted."""
    from fastmerge.engine.gpu import execute_cuda
    from fastmerge.kernels import gta

    real = gta.GtaKernel.prepare

    def blocking(self, launches=()):
        real(self, launches)
        self.lam = torch.tensor([1.0] * self.G, device=self.device)[: self.G] * 0 + self.lam  # the old way

    monkeypatch.setattr(gta.GtaKernel, "prepare", blocking)
    cnt = _SyncCounter(monkeypatch)
    p = _gpu_plan(_config(fam, "task_arithmetic", {"weight": 0.5}), tmp_path / "gpu")
    execute_cuda(p, tmp_path / "gpu", device=DEV)
    assert cnt.calls.get("tensor(device=)", 0) >= 1, cnt.calls


SYNC_CASES = {
    # batches and row chunks; exact-k with rescale adds the tie counts, the L1 pass and the segment sums
    "ties": ("ties", {"weight": 0.5, "density": 0.4}, {}),
    "ties_topk_rescale": ("ties", {"weight": [0.2, 0.6, 0.3], "density": 0.4}, {"selection": "topk", "rescale": True}),
    "dare_ties": ("dare_ties", {"weight": 0.4, "density": 0.6}, {}),
    "della": ("della", {"weight": 0.4, "density": 0.6, "epsilon": 0.1}, {}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"weight": 0.4, "density": 0.6}, {}),
    "task_arithmetic": ("task_arithmetic", {"weight": 0.5}, {}),
    # the Gram pass: matrices, coefficients and group indices stay on the device
    "slerp": ("slerp", {}, {"t": 0.3}),
    "model_stock": ("model_stock", {}, {}),
}


@pytest.mark.parametrize("case", list(SYNC_CASES))
def test_no_synchronising_calls_inside_units(fam, tmp_path, monkeypatch, case):
    """Nothing the engine or a kernel plan does inside a unit blocks the host (gpu-design.md §5.2): every
    device table reaches the GPU through one pinned buffer and one non_blocking copy. The old plans made
    10-20 blocking copies per unit (weights, λ, divisors, masks, group indices, tile and segment tables)."""
    from fastmerge.engine.gpu import execute_cuda

    method, params, extra = SYNC_CASES[case]
    cnt = _SyncCounter(monkeypatch)
    cfg = _config(fam, method, params, n_models=1 if method == "slerp" else 3, **({"parameters": extra} if extra else {}))
    p = _gpu_plan(cfg, tmp_path / "gpu", out_shard_size=6_000)
    rep = execute_cuda(p, tmp_path / "gpu", device=DEV, max_gpu_memory=_budget(1000))
    assert cnt.units > 0 and rep.chunked_tensors > 0 and cnt.total == 0, cnt.calls


def test_no_synchronising_calls_in_the_selection(fam, tmp_path, monkeypatch):
    """The selection too: k and the bracket's tables in one asynchronous copy, group indices reused."""
    from fastmerge.engine.gpu import execute_cuda

    cnt = _SyncCounter(monkeypatch)
    p = _gpu_plan(_config(fam, "ties", {"weight": 0.5, "density": 0.4}), tmp_path / "gpu")
    execute_cuda(p, tmp_path / "gpu", device=DEV)
    assert cnt.units > 0 and not cnt.selection_calls, cnt.selection_calls


def test_one_metadata_copy_per_batch_unit(fam, tmp_path, monkeypatch):
    """A batch unit's tables (weights, λ, masks, stream keys, group indices, segment and tile tables of
    every pass) reach the device in ONE asynchronous copy (the old plans: one blocking copy per table)."""
    from fastmerge.engine.gpu import execute_cuda
    from fastmerge.kernels import _common

    per_unit = []
    cnt = _SyncCounter(monkeypatch)
    from fastmerge.engine import gpu as g

    counting = g._Engine.compute

    def compute(engine, j, fn):
        before = _common.HostPack.uploads
        res = counting(engine, j, fn)
        per_unit.append(_common.HostPack.uploads - before)
        return res

    monkeypatch.setattr(g._Engine, "compute", compute)
    _common._CACHE.clear()
    cfg = _config(fam, "dare_ties", {"weight": 0.4, "density": 0.6}, parameters={"rescale": True})
    p = _gpu_plan(cfg, tmp_path / "gpu")
    rep = execute_cuda(p, tmp_path / "gpu", device=DEV)
    assert rep.units == 1 and per_unit == [1] and cnt.total == 0, (per_unit, cnt.calls)


def _count_uploads(monkeypatch):
    """Bytes copied host -> device into the input slots, per call of ``_Engine._flush``."""
    from fastmerge.engine import gpu as g

    log: list[int] = []
    real = g._Engine._flush

    def flush(self, buf, flat_dev, pos, n, es):
        log.append(n * es)
        return real(self, buf, flat_dev, pos, n, es)

    monkeypatch.setattr(g._Engine, "_flush", flush)
    return log


@pytest.mark.parametrize("method,params", [("ties", {"weight": 0.5, "density": 0.4}),
                                           ("breadcrumbs_ties", {"weight": 0.4, "density": 0.6})])
def test_chunked_tensors_are_uploaded_once(fam, tmp_path, monkeypatch, method, params):
    """A tensor larger than one slot but not than both goes in two chunks, one per slot, that stay on the
    device through the selection's passes and the merge: its rows cross to the device once (the old
    engine copied every chunk again for every pass: 4x for ties)."""
    from fastmerge.engine import gpu as g

    log = _count_uploads(monkeypatch)
    units = []
    real_chunked = g._run_chunked

    def chunked(plan, u, loaded, engine, wthread, pool):
        before = sum(log)
        real_chunked(plan, u, loaded, engine, wthread, pool)
        tp = plan.tensors[u.tensors[0]]
        per_elem = tp.in_bytes // g._numel(tp.shape)  # R rows x 2 bytes
        padded = per_elem * sum(g._pad(n) for _, n in u.chunks)  # each chunk's rows, 64-aligned
        units.append((tp.name, sum(log) - before, tp.in_bytes, padded))

    monkeypatch.setattr(g, "_run_chunked", chunked)
    # slots of 1000 elements: the 1024-2048-element matrices exceed one slot; the attention and MLP
    # matrices (1024, 1536) fit two, the 2048-element embedding and lm_head do not
    rep = _both(_config(fam, method, params), tmp_path, max_gpu_memory=_budget(1000))
    assert rep.chunked_tensors == len(units) == 9
    two = [(name, sent, padded) for name, sent, size, padded in units if size <= 4 * 1536 * 2]
    assert len(two) == 7 and all(sent == padded for _, sent, padded in two), units
    # the larger ones go in 3 chunks per pass; every other selection pass runs backwards and starts with
    # the chunk still resident: fewer copies than passes x size
    for name, sent, size, padded in units:
        assert padded < size + 3 * 64 * 8 and sent < 4 * size, (name, sent, size)


def test_small_tensors_join_a_batch_across_large_ones(fam, tmp_path, monkeypatch):
    """The norms between the (row-chunked) matrices share one batch; the writer puts every tensor in plan
    order, and the files are byte-identical with the CPU engine's (bit-exact with the reference), with
    one unit per tensor (no batching) and with the torch reference on the same plan. Device and host
    output buffers are poisoned (NaN bit patterns), so an element nobody wrote shows."""
    from fastmerge.engine import gpu as g
    from fastmerge.engine.gpu import execute_cuda

    real_init, real_host = g._Engine.__init__, g._Dev.host

    def poisoned_init(self, *a, **k):
        real_init(self, *a, **k)
        for t in self.dout:
            t.fill_(0xFF)

    def poisoned_host(self, nbytes, pin=True):
        return real_host(self, nbytes, pin).fill_(0xFF)

    monkeypatch.setattr(g._Engine, "__init__", poisoned_init)
    monkeypatch.setattr(g._Dev, "host", poisoned_host)
    cfg = _config(fam, "ties", {"weight": [0.3, 0.5, 0.2], "density": 0.4})
    rep = _both(cfg, tmp_path / "look", max_gpu_memory=_budget(1000))
    # 9 chunked matrices + ONE batch of the 3 norms (they sit between the matrices in plan order)
    assert rep.chunked_tensors == 9 and rep.units == 10, rep

    monkeypatch.setattr(g, "MAX_BATCH_TENSORS", 1)
    p = _gpu_plan(cfg, tmp_path / "one", out_shard_size=6_000)
    rep1 = execute_cuda(p, tmp_path / "one", device=DEV, max_gpu_memory=_budget(1000))
    assert rep1.units == 12
    p = _gpu_plan(cfg, tmp_path / "ref", out_shard_size=6_000, backend="torch")
    assert execute_cuda(p, tmp_path / "ref", device=DEV).backends == {"torch": 12}
    a, b, c = _read(tmp_path / "look" / "gpu"), _read(tmp_path / "one"), _read(tmp_path / "ref")
    assert list(a) == list(b) == list(c)
    for name in a:
        assert torch.equal(a[name].view(torch.int16), b[name].view(torch.int16)), name
        assert torch.equal(a[name].view(torch.int16), c[name].view(torch.int16)), name


def test_a_batch_stays_open_only_within_the_lookahead(fam, tmp_path, monkeypatch):
    from fastmerge.engine import gpu as g

    monkeypatch.setattr(g, "LOOKAHEAD", 0)
    rep = _both(_config(fam, "ties", {"weight": 0.5, "density": 0.4}), tmp_path, max_gpu_memory=_budget(1000))
    assert rep.units > 10  # the norms are not adjacent in plan order: each is its own batch


def test_cuda_scratch_is_in_the_budget(fam, tmp_path, monkeypatch):
    """The CUDA C++ kernel's scratch (torch's allocator, ``backends.cuda.scratch_bytes``) of the largest
    tensor it runs whole is counted in --max-gpu-memory: the slots shrink by it; the default budget grows by it."""
    from fastmerge import _native
    from fastmerge.backends import cuda as cb
    from fastmerge.engine import gpu as g

    monkeypatch.setattr(_native, "cuda_usable", lambda: (True, "stand-in"))
    monkeypatch.setattr(cb, "MIN_ELEMS", 1000)
    cfg = _config(fam, "ties", {"weight": 0.33, "density": 0.5})
    p = _gpu_plan(cfg, tmp_path / "o")
    assert {t.backend for t in p.tensors} == {"cuda", "triton"}
    scratch = cb.scratch_bytes(2048, 3)  # the embedding and lm_head: 2048 elements, 3 models
    assert scratch >= 3 * 2049 * 8
    dev = g._Dev("cpu")
    b = g._Budget(p, _budget(4000), dev)
    assert b.scratch == scratch
    assert (b.cap + b.cap1) * b.per_elem + g.RESERVE_BYTES + scratch <= b.bytes
    assert (b.cap + b.cap1 + 1) * b.per_elem + g.RESERVE_BYTES + scratch > b.bytes
    monkeypatch.setattr(cb, "MIN_ELEMS", 1 << 20)  # nothing on the CUDA kernel: no scratch
    b0 = g._Budget(_gpu_plan(cfg, tmp_path / "o"), _budget(4000), dev)
    assert b0.scratch == 0 and b0.cap + b0.cap1 > b.cap + b.cap1


def test_packed_rows_are_64_aligned(fam, tmp_path, monkeypatch):
    """Every segment of a batch starts at a multiple of 64 elements and every packed row (batch or row
    chunk) has a stride that is a multiple of 64, so full tiles are 16-byte vectors in every model's row;
    the padding never reaches an output (byte-identical with the CPU engine)."""
    from fastmerge.kernels import gta

    seen = []
    real = gta.gta_merge

    def merge(x, base, out, segs, *a, **k):
        seen.append((x.stride(0), segs.start))
        return real(x, base, out, segs, *a, **k)

    monkeypatch.setattr(gta, "gta_merge", merge)
    rep = _both(_config(fam, "ties", {"weight": 0.5, "density": 0.4}), tmp_path, max_gpu_memory=_budget(1000))
    assert rep.chunked_tensors == 9 and len(seen) > 9
    assert any(len(starts) == 3 for _, starts in seen)  # the norms' batch: 32 elements each, starts 0, 64, 128
    for stride, starts in seen:
        assert stride % 64 == 0 and all(a % 64 == 0 for a in starts), (stride, starts)


def test_fp8_bytes_on_the_device_are_in_the_budget(tmp_path_factory, tmp_path, monkeypatch):
    """FP8 inputs cross as their bytes (``kernels.fp8.Fp8Piece.write``): each piece is a 1-byte-per-element device
    temporary until dequantised into the slot, and its fp32 scales stay on the device. Measured through the
    stand-in (every piece's bytes and scales), the slots + the largest piece + two units' scales + the reserve fit
    --max-gpu-memory; the output is the CPU engine's, byte for byte."""
    from fastmerge.engine import gpu as g
    from fastmerge.kernels import fp8 as kfp8

    b, fts = make_family(tmp_path_factory.mktemp("gpu_fp8_fam"), SHAPE, n_finetunes=2, fp8_block=(16, 16), shard_bytes=9_000)
    cfg = {"merge_method": "linear", "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in [b, *fts]],
           "out_dtype": "bfloat16"}
    seen = []  # per piece: (its bytes on the device, its scales' bytes on the device)
    real = kfp8.Fp8Piece.write

    def write(self, out, first, count, **kw):
        real(self, out, first, count, **kw)
        seen.append((count * self.q.element_size(), 0 if self._scale is None else 4 * self._scale.numel()))

    monkeypatch.setattr(kfp8.Fp8Piece, "write", write)
    mem = _budget(1200, rows=3, in_bytes=4)  # fp32 rows (FP8 dequantised), bf16 output
    rep = _both(cfg, tmp_path, max_gpu_memory=mem)
    assert seen and rep.chunked_tensors > 0, rep.summary()
    p = _gpu_plan(cfg, tmp_path / "o")
    bud = g._Budget(p, mem, g._Dev("cpu"))
    caps = p.method.triton
    slot_elem = bud.rows * bud.ein + bud.eout + (caps.scratch_bytes(bud.rows) if caps is not None else 0)
    in_flight = max(t for t, _ in seen) + 2 * max(s for _, s in seen)
    assert (bud.cap + bud.cap1) * slot_elem + in_flight + g.RESERVE_BYTES <= mem, (bud.cap, bud.cap1, slot_elem, in_flight)


@pytest.mark.parametrize("stage", [None, 1001])
def test_fp8_bytes_cross_through_the_pinned_staging(tmp_path_factory, tmp_path, monkeypatch, stage):
    """FP8 bytes cross as every other input does: through the pinned staging buffers, with non_blocking copies on
    the H2D stream. A ``.to(device)`` of the mapped (pageable) bytes would block the host until the copy lands,
    so the next unit's reads would wait on the bus. Counted through the stand-in: every piece's bytes pass
    through ``_bytes_to_device`` (in several staging pieces when the buffers are small), no uint8 tensor is sent
    to the device the blocking way, and the output is the CPU engine's, byte for byte."""
    from fastmerge.engine import gpu as g
    from fastmerge.kernels import fp8 as kfp8

    b, fts = make_family(tmp_path_factory.mktemp("gpu_fp8_stage"), SHAPE, n_finetunes=2, fp8_block=(16, 16), shard_bytes=9_000)
    cfg = {"merge_method": "ties", "base_model": str(b), "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}}
                                                                     for f in fts], "out_dtype": "bfloat16"}
    if stage is not None:
        monkeypatch.setattr(g, "STAGE_BYTES", stage)
    pieces, staged, blocking = [], [], []
    real_write, real_b2d, real_to = kfp8.Fp8Piece.write, g._Engine._bytes_to_device, torch.Tensor.to

    def write(self, out, first, count, **kw):
        pieces.append(count)
        return real_write(self, out, first, count, **kw)

    def b2d(self, src):
        staged.append(src.numel())
        return real_b2d(self, src)

    def to(t, *a, **k):
        if t.dtype == torch.uint8 and not k.get("non_blocking") and _names_device(a, k):
            blocking.append(t.numel())
        return real_to(t, *a, **k)

    monkeypatch.setattr(kfp8.Fp8Piece, "write", write)
    monkeypatch.setattr(g._Engine, "_bytes_to_device", b2d)
    monkeypatch.setattr(torch.Tensor, "to", to)
    _both(cfg, tmp_path)
    assert pieces and staged == pieces and not blocking, (pieces[:5], staged[:5], blocking[:5])
