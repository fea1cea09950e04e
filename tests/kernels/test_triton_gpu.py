"""The kernels and the streaming engine on a real GPU (``pytest -m gpu``; skipped without CUDA).

What the interpreter cannot show: compiled code (IEEE division, no FMA contraction, the hand-written
bf16 rounding) still equal to the torch reference bit for bit; realistic sizes (many programs, the
atomics of the selection histograms); int64 offsets past 2^31 elements; streams, pinned buffers and
the GPU memory bound of ``gpu_runner``."""

import json

import pytest
import torch

import fastmerge
from fastmerge import merge_tensors
from fastmerge.testing import LlamaShape, make_family
from helpers.kernel_cases import METHOD_CASES as CASES, assert_bits_equal

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _inputs(shape, dtype, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g) * 0.02
    return [(b + 0.002 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)], b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", sorted(CASES))
def test_compiled_kernels_equal_the_reference(method, dtype):
    xs, b = _inputs((1031, 1537), dtype, n=1 if method == "slerp" else 3)  # odd: every tile edge masked
    kw = dict(CASES[method], seed=7, tensor_name="model.layers.0.mlp.up_proj.weight")
    got = merge_tensors(method, xs, b, backend="triton", **kw)
    want = merge_tensors(method, xs, b, backend="torch", **kw)
    if method in ("slerp", "model_stock"):  # Gram sums in another order: rare rounding-tie flips
        d = (got.view(torch.int16 if dtype != torch.float32 else torch.int32).long()
             - want.view(torch.int16 if dtype != torch.float32 else torch.int32).long()).abs()
        assert int(d.max()) <= 1 and float((d == 0).float().mean()) > 0.999
    else:
        assert_bits_equal(got, want, f"{method} {dtype}")


def test_ties_rescale_and_exact_k_on_gpu():
    xs, b = _inputs((2048, 3001), torch.bfloat16)
    for sel in ("threshold", "topk"):
        kw = dict(weight=0.33, density=0.3, selection=sel)
        assert_bits_equal(merge_tensors("ties", xs, b, backend="triton", **kw),
                          merge_tensors("ties", xs, b, backend="torch", **kw), f"ties {sel}")
    kw = dict(weight=0.33, density=0.3, rescale=True)
    got, want = (merge_tensors("ties", xs, b, backend=k, **kw) for k in ("triton", "torch"))
    d = (got.view(torch.int16).long() - want.view(torch.int16).long()).abs()
    assert int(d.max()) <= 1 and float((d == 0).float().mean()) > 0.999


def test_bf16_store_rounds_to_nearest_even():
    from fastmerge.kernels._common import Segments
    from fastmerge.kernels.linear import combine

    x = torch.randn(1, 1 << 20, device="cuda") * torch.logspace(-40, 38, 1 << 20, device="cuda")
    # specials; no -0.0: a weighted sum turns it into +0.0 (as torch's reference does), not a rounding case
    x[0, :6] = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.3895314e38, 1e-45, -1e-45])
    out = torch.empty(1 << 20, dtype=torch.bfloat16, device="cuda")
    combine(x, None, out, Segments.packed([1 << 20]), torch.ones(1, 1, device="cuda"))
    want = x[0].to(torch.bfloat16)
    same = (out.view(torch.int16) == want.view(torch.int16)) | (torch.isnan(out) & torch.isnan(want))
    bad = (~same).nonzero()
    assert bad.numel() == 0, (f"{bad.numel()} differ; first at {int(bad[0])}: x={float(x[0, bad[0]])!r} "
                              f"got {float(out[bad[0]])!r} want {float(want[bad[0]])!r}")


def test_selection_equals_kthvalue_at_llm_size():
    from fastmerge.kernels._common import Segments
    from fastmerge.kernels.select import kth_largest

    xs, b = _inputs((4096, 4096), torch.bfloat16, n=2)
    x = torch.stack([t.reshape(-1) for t in xs]).cuda()
    base = b.reshape(-1).cuda()
    n = base.numel()
    k = torch.tensor([[[n // 2], [n // 10]]])
    sel = kth_largest(x, base, Segments.packed([n]), k)
    for t in range(2):
        mag = (x[t].float() - base.float()).abs()
        assert torch.equal(sel.values[0, t, 0], torch.kthvalue(mag, n - int(k[0, t, 0]) + 1).values)


@pytest.mark.slow
def test_int64_offsets_past_2_31_elements():
    """Two 1.1G-element rows (4.4 GB of bf16): the second row's elements sit past element 2^31 of the
    packed buffer, and so do the last tiles' offsets."""
    from fastmerge.kernels._common import Segments
    from fastmerge.kernels.linear import combine

    n = 1_100_000_000
    x = torch.empty((2, n), dtype=torch.bfloat16, device="cuda")
    x[0].fill_(1.5)
    x[1].fill_(-0.25)
    x[1, -1000:] = 4.0
    out = torch.full((n,), float("nan"), dtype=torch.bfloat16, device="cuda")
    combine(x, None, out, Segments.packed([n]), torch.tensor([[0.5, 2.0]], device="cuda"))
    assert float(out[0]) == 0.25 and float(out[-1001]) == 0.25 and float(out[-1]) == 8.75
    assert not bool(torch.isnan(out).any())


def _read(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    shape = LlamaShape(hidden=256, layers=4, intermediate=688, vocab=8000, heads=8)
    return make_family(tmp_path_factory.mktemp("gpu_fam"), shape, n_finetunes=3, dtype="bfloat16", shard_bytes=20_000_000)


SMALL = 20 << 20  # slot room beyond gpu_runner.RESERVE_BYTES: 1M elements x (4 bf16 rows + out) x 2 slots,
#                   under the 2.05M-element embedding and lm_head (row chunks), over the 176K-element MLP


@pytest.mark.parametrize("method,params,budget,compat", [
    ("ties", {"weight": 0.33, "density": 0.5}, None, False),
    ("ties", {"weight": 0.33, "density": 0.5}, SMALL, False),  # embedding + lm_head in row chunks
    ("dare_ties", {"weight": 0.33, "density": 0.5}, None, False),
    ("della", {"weight": 0.33, "density": 0.5}, SMALL, False),
    ("task_arithmetic", {"weight": 0.33}, None, False),
    ("task_arithmetic", {"weight": 0.33}, None, True),  # mergekit_compat: no kernel, the reference on the GPU
])
def test_gpu_runner_equals_cpu_runner(fam, tmp_path, method, params, budget, compat):
    from fastmerge.engine.gpu import RESERVE_BYTES, execute_cuda
    from fastmerge.engine.stream import execute

    base, fts = fam
    cfg = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(f), "parameters": params} for f in fts], "parameters": {"rescale": False}}
    if method == "task_arithmetic":
        cfg.pop("parameters")
    p = fastmerge.plan(cfg, tmp_path / "cpu", progress=False, copy_tokenizer=False, mergekit_compat=compat)
    execute(p, tmp_path / "cpu")
    p = fastmerge.plan(cfg, tmp_path / "gpu", progress=False, copy_tokenizer=False, device="cuda", mergekit_compat=compat)
    torch.cuda.reset_peak_memory_stats()
    budget = None if budget is None else RESERVE_BYTES + budget
    rep = execute_cuda(p, tmp_path / "gpu", max_gpu_memory=budget)
    a, b = _read(tmp_path / "cpu"), _read(tmp_path / "gpu")
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k
    if compat:
        assert rep.backends == {"torch": len(a)}
    else:  # ties tensors the plan sends to CUDA (from cuda.MIN_ELEMS) that fit whole: the CUDA C++ kernel when built
        from fastmerge import _native
        from fastmerge.backends.cuda import MIN_ELEMS

        big = sum(1 for k in a if a[k].numel() >= MIN_ELEMS)
        cuda = big if (method == "ties" and budget is None and _native.cuda_usable()[0]) else 0
        assert rep.backends == {k: v for k, v in (("cuda", cuda), ("triton", len(a) - cuda)) if v}
    if budget is not None:
        assert rep.chunked_tensors >= 2 and rep.gpu_peak_mb <= budget / 2**20, json.dumps(rep.__dict__, default=str)
