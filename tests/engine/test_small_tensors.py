"""Batches of small tensors (fastmerge.engine.stream.batches): a MoE checkpoint's thousands of expert
matrices merged a run at a time (one read of each input's span, one kernel call where the method allows
it, one writer item) write the same bytes as the tensor-by-tensor loop; and ``_C.ties_segments``, the
kernel of such a run for TIES, equals the torch reference on every segment."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastmerge import _native, plan
from fastmerge.engine import session, stream
from fastmerge.engine.stream import RawIO, TorchIO, batches, execute
from fastmerge.io.index import ITEMSIZE
from fastmerge.methods import get_method
from fastmerge.methods.ties import TiesParams
from fastmerge.testing import DeepSeekV3Shape, Qwen3MoeShape, make_family
from helpers.tolerance import file_digest

pytestmark = pytest.mark.skipif(not _native.HAS_CPU_EXT, reason=f"fastmerge._C not built: {_native.LOAD_ERRORS.get('_C')}")

DEEPSEEK = DeepSeekV3Shape(hidden=32, layers=3, first_k_dense=1, intermediate=48, moe_intermediate=16, experts=8,
                           heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope=8, qk_rope=8, v_head=8, vocab=96)
QWEN = Qwen3MoeShape(hidden=32, layers=2, moe_intermediate=16, experts=8, heads=2, kv_heads=1, head_dim=16, vocab=96)


def _mixed(folder: Path) -> None:
    """Rewrite every shard of ``folder`` with its norms in float32 and its routers in float16: the runs of
    one model then change dtype mid-layer (and the file order changes: safetensors sorts by dtype)."""
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}
        for k, t in tensors.items():
            if "norm" in k:
                tensors[k] = t.float()
            elif "gate.weight" in k:
                tensors[k] = t.half()
        save_file(tensors, str(f), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def moe_family(tmp_path_factory):
    """DeepSeek-V3-shaped, base + 3 fine-tunes in several input shards; ft2 of mixed dtypes, ft3 in float16."""
    root = tmp_path_factory.mktemp("moe")
    base, fts = make_family(root / "a", DEEPSEEK, n_finetunes=2, shard_bytes=60_000)
    _mixed(fts[1])
    _, (ft_f16,) = make_family(root / "b", DEEPSEEK, n_finetunes=1, dtype="float16", shard_bytes=60_000, seed=7)
    return base, [*fts, ft_f16]


@pytest.fixture(scope="module")
def qwen_family(tmp_path_factory):
    base, fts = make_family(tmp_path_factory.mktemp("qwen"), QWEN, n_finetunes=2, shard_bytes=1_000_000)
    return base, fts


PARAMS = {
    "linear": {"weight": 0.3},
    "task_arithmetic": {"weight": 0.4, "lambda": 0.9},
    "ties": {"weight": 0.4, "density": 0.45},
    "dare_ties": {"weight": 0.4, "density": 0.6},
    "della": {"weight": 0.4, "density": 0.6, "epsilon": 0.1},
}


def _doc(fam, method: str, **extra) -> dict:
    base, fts = fam
    models = [{"model": str(f), "parameters": dict(PARAMS[method])} for f in fts]
    # parameters that differ between tensors: a gradient over the layers, and a filter on the experts
    models[0]["parameters"]["weight"] = [0.1, 0.9]
    models[1]["parameters"]["weight"] = [{"filter": "experts.3.", "value": 0.5}, {"value": 0.2}]
    d = {"merge_method": method, "models": models, **extra}
    if method != "linear":  # linear would merge the base as one more input (mergekit's rule)
        d["base_model"] = str(base)
    if method == "ties":
        d["parameters"] = {"selection": "topk"}
    return d


POISON = 0xA5  # bf16 0xA5A5 is a finite number (-2.9e-16): a byte left unwritten changes the output


@pytest.fixture
def poisoned_pool(monkeypatch):
    """Every buffer either flavour takes from its pool is filled with POISON first."""
    take, take_t = session.RawPool.take, session.TorchPool.take

    def poisoned(self, nbytes, dtype):
        raw, view, mv = take(self, nbytes, dtype)
        ctypes.memset(raw[1], POISON, nbytes)
        return raw, view, mv

    def poisoned_t(self, shape, dtype):
        raw, view = take_t(self, shape, dtype)
        raw.fill_(POISON)
        return raw, view

    monkeypatch.setattr(session.RawPool, "take", poisoned)
    monkeypatch.setattr(session.TorchPool, "take", poisoned_t)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: file_digest(p) for p in sorted(folder.iterdir())}


def _run(p, out: Path, monkeypatch, batched: bool, flavour: str = "native") -> dict[str, str]:
    with monkeypatch.context() as m:
        if not batched:
            m.setattr(stream, "SMALL_NUMEL", 0)  # every tensor a run of its own: the tensor-by-tensor loop
        execute(p, out, flavour)
    return _digests(out)


def _runs(p) -> list[list[int]]:
    k = p.method.native
    return batches(p, k.elementwise, k.segments is not None)


@pytest.mark.parametrize("method", list(PARAMS))
@pytest.mark.parametrize("out_dtype", [None, "float32"])
def test_batched_equals_tensor_by_tensor(moe_family, method, out_dtype, tmp_path, monkeypatch, poisoned_pool):
    extra = {"out_dtype": out_dtype} if out_dtype else {}
    p = plan(_doc(moe_family, method, **extra), out_shard_size="30KB", progress=False)
    assert not RawIO.not_supported_reasons(p)
    runs = _runs(p)
    # not hollow: runs of many tensors, runs whose output straddles an output shard, runs cut by parameters
    assert max(len(u) for u in runs) >= 8
    shard_of = {t.name: s.filename for s in p.shards for t in s.tensors}
    assert any(len({shard_of[p.tensors[i].name] for i in u}) > 1 for u in runs), "no run straddles an output shard"
    assert len(p.shards) > 2
    calls = []
    for io in (RawIO, TorchIO):
        monkeypatch.setattr(io, "merge_batch", _counted(io.merge_batch, calls))
    got = _run(p, tmp_path / "batched", monkeypatch, batched=True)
    assert calls and max(calls) >= 8 and sum(calls) + sum(1 for u in runs if len(u) == 1) == len(p.tensors)
    calls.clear()
    want = _run(p, tmp_path / "one-by-one", monkeypatch, batched=False)
    assert not calls
    assert got == want
    # the torch flavour: its runs (spans read as raw views, io.reader.SpanRawReader) and its tensor-by-tensor loop
    assert _run(p, tmp_path / "torch", monkeypatch, batched=True, flavour="torch") == want
    assert calls and max(calls) >= 8
    calls.clear()
    assert _run(p, tmp_path / "torch-one", monkeypatch, batched=False, flavour="torch") == want
    assert not calls


@pytest.mark.parametrize("params,out_dtype,raw_path", [({}, None, True), ({"scale": 0.5}, None, False),
                                                       ({}, "float32", False), ({"scale": [0.0, 1.0]}, None, None)],
                         ids=["copy", "scaled", "converted", "gradient"])
def test_torch_runs_take_the_kernels_raw_or_torch_path(moe_family, params, out_dtype, raw_path, tmp_path, monkeypatch,
                                                      poisoned_pool):
    """The torch flavour's runs (spans as raw views) through the kernel's raw path where it takes the run, and through
    its torch path where it declines (passthrough that scales or converts: RawIO cannot run such a plan), each equal
    to the tensor-by-tensor loop's bytes. ``raw_path`` None: a scale gradient over the layers (0 to 1): passthrough's
    kernel runs tensor by tensor, so its runs hold several Params, scale 1 (a byte copy) among others (a multiply):
    the torch path for all of such a run."""
    base, _ = moe_family
    doc = {"merge_method": "passthrough", "models": [{"model": str(base), "parameters": params}],
           **({"out_dtype": out_dtype} if out_dtype else {})}
    p = plan(doc, progress=False)
    if raw_path is not None:
        assert bool(RawIO.not_supported_reasons(p)) is not raw_path
    else:
        assert len({id(p.tensors[i].params) for u in _runs(p) for i in u}) > 2  # (not hollow: runs of several Params)
    outs = []
    run = stream.merge_run
    monkeypatch.setattr(stream, "merge_run", lambda plan_, native, tps, spans, out, offsets: outs.append(type(out).__name__)
                        or run(plan_, native, tps, spans, out, offsets))
    got = _run(p, tmp_path / "runs", monkeypatch, batched=True, flavour="torch")
    assert outs and set(outs) == ({"RawView"} if raw_path else {"Tensor"})
    assert got == _run(p, tmp_path / "one", monkeypatch, batched=False, flavour="torch")
    if raw_path is None:
        return
    with safe_open(str(next((tmp_path / "runs").glob("*.safetensors"))), framework="pt") as f, \
            safe_open(str(next(base.glob("*.safetensors"))), framework="pt") as g:
        k = next(n for n in f.keys() if "experts.3." in n and n in g.keys())
        want = (g.get_tensor(k).float() * params.get("scale", 1.0)).to(getattr(torch, out_dtype or "bfloat16"))
        assert torch.equal(f.get_tensor(k), want)


def _counted(fn, calls):
    def merge_batch(self, tps, spans, pool):
        calls.append(len(tps))
        return fn(self, tps, spans, pool)

    return merge_batch


def test_runs_follow_files_dtypes_and_parameters(moe_family):
    p = plan(_doc(moe_family, "linear"), progress=False)
    runs = _runs(p)
    assert sorted(i for u in runs for i in u) == list(range(len(p.tensors)))
    for u in runs:
        assert list(u) == list(range(u[0], u[0] + len(u)))  # consecutive, in plan order
        ts = [p.tensors[i] for i in u]
        assert len({t.out_dtype for t in ts}) == 1 and len({t.params for t in ts}) == 1
        assert sum(t.out_tensor.nbytes for t in ts) <= stream.BATCH_BYTES
        for a, b in zip(ts, ts[1:]):
            for x, y in zip(a.sources, b.sources):
                assert x.file == y.file and x.dtype == y.dtype and x.end == y.begin
    # the mixed-dtype model cuts runs where a norm (float32) or a router (float16) sits between bf16 experts
    mixed = [i for i, t in enumerate(p.tensors) if t.sources[1].dtype != "bfloat16"]
    assert mixed and all(not any(i in u and len(u) > 1 and p.tensors[u[0]].sources[1].dtype == "bfloat16"
                                 for u in runs) for i in mixed)
    # methods that neither pack nor segment still share reads and writes, whatever their parameters
    unpacked = batches(p, elementwise=False, segments=False)
    assert len(unpacked) <= len(runs)


def _batches_tensor_by_tensor(p, elementwise: bool, segments: bool) -> list[list[int]]:
    """``stream.batches``'s rule, one tensor at a time (its definition: the engine's form takes it column by column)."""
    units, prev, prev_dtype, prev_params, size = [], None, None, None, 0
    for i, t in enumerate(p.tensors):
        nbytes = t.out_tensor.nbytes
        small = (nbytes < stream.SMALL_NUMEL * ITEMSIZE[t.out_dtype] and t.backend == "native"
                 and t.input_transform is None and t.out_quant is None and not t.compute_dtype)
        ins = t.sources if t.base is None else [t.base, *t.sources]
        if small:
            if (prev is not None and size + nbytes <= stream.BATCH_BYTES and prev_dtype == t.out_dtype
                    and (not (elementwise or segments) or prev_params == t.params) and len(prev) == len(ins)
                    and all(a.end == b.begin and a.dtype == b.dtype and a.file == b.file for a, b in zip(prev, ins))):
                units[-1].append(i)
                size += nbytes
                prev = ins
                continue
            prev = ins
        else:
            prev = None
        units.append([i])
        size, prev_dtype, prev_params = nbytes, t.out_dtype, t.params
    return units


@pytest.mark.parametrize("method", ["linear", "ties", "della"])
def test_batches_equal_the_tensor_by_tensor_rule(moe_family, qwen_family, method, monkeypatch):
    """The runs ``batches`` takes column by column are the rule's, tensor by tensor: over files, dtypes, varying
    parameters, a small batch size, an input count that changes mid-plan and paths equal but not identical."""
    import dataclasses

    sizes = (stream.BATCH_BYTES, 5000)
    for fam, extra in ((moe_family, {}), (moe_family, {"out_dtype": "float32"}), (qwen_family, {})):
        p = plan(_doc(fam, method, **extra), out_shard_size="30KB", progress=False)
        longest = 0
        for bb in sizes:
            monkeypatch.setattr(stream, "BATCH_BYTES", bb)
            for flags in ((True, False), (False, True), (False, False)):
                want = _batches_tensor_by_tensor(p, *flags)
                assert list(map(list, batches(p, *flags))) == want
                longest = max(longest, *map(len, want))
        assert longest >= 8  # not hollow: runs of several tensors
        # a plan whose tensors differ in their number of inputs (the base dropped from every third tensor), and
        # whose inputs name their files by equal but distinct Path objects: the row-by-row form
        ts = [dataclasses.replace(t, base=None) if i % 3 == 0 and t.base is not None else t for i, t in enumerate(p.tensors)]
        ts = [dataclasses.replace(t, sources=[dataclasses.replace(x, file=Path(str(x.file))) for x in t.sources])
              if i % 5 == 0 else t for i, t in enumerate(ts)]
        q = dataclasses.replace(p, tensors=ts)
        assert list(map(list, batches(q, True, False))) == _batches_tensor_by_tensor(q, True, False)


def _digest_by_rows(plan_) -> str:
    """``MergePlan.digest``'s bytes taken one Python step per tensor and input (its definition: the plan's own takes
    them column by column)."""
    import dataclasses
    import hashlib
    import json
    from array import array

    from fastmerge._version import __version__

    h = hashlib.sha256()

    def put(obj) -> None:
        h.update(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())
        h.update(b"\n")

    o = plan_.options
    put({"version": __version__, "config": plan_.config.to_dict(), "device": plan_.device, "seed": o.seed,
         "compat": o.mergekit_compat, "shard_size": o.out_shard_size, "out_layers": plan_.out_layers})
    fno_eq: dict = {}
    for key, ix in sorted(plan_.indexes.items()):
        put({"model": key, "fmt": ix.fmt, "files": [[f.name, f.stat().st_size if f.exists() else -1] for f in ix.files]})
        for f in ix.files:
            fno_eq.setdefault(f, len(fno_eq))
        put({"headers": ix.header_sha256, "tensors": len(ix.tensors)})
    ts = plan_.tensors

    def table(values) -> None:
        nums: dict = {}
        rows = array("q", [nums.setdefault(v, len(nums)) for v in values])
        h.update(repr(list(nums)).encode())
        h.update(rows.tobytes())
        h.update(b"\n")

    names = [t.name for t in ts]  # names, shapes and output dtypes: in the shards' headers (hashed last)
    table([(t.compute_dtype, t.backend) for t in ts])
    ins = [(t.base, *t.sources) for t in ts]
    table([len(r) for r in ins])
    h.update(array("q", [-1 if x is None else fno_eq[x.file] for row in ins for x in row]).tobytes())
    h.update(repr([(i, k, x.name) for i, row in enumerate(ins) for k, x in enumerate(row)
                   if x is not None and x.name != names[i]]).encode())
    ptable: dict = {}
    pid: dict = {}
    for q in {id(t.params): t.params for t in ts}.values():
        d = vars(q) if hasattr(q, "__dict__") else dataclasses.asdict(q)
        pid[id(q)] = ptable.setdefault(json.dumps(d, sort_keys=True, separators=(",", ":"), default=str), len(ptable))
    h.update("\n".join(ptable).encode())
    h.update(array("q", [pid[id(t.params)] for t in ts]).tobytes())
    for t in ts:
        if t.input_transform is not None:
            for f in dataclasses.fields(t.input_transform):
                v = getattr(t.input_transform, f.name)
                for a in (v if isinstance(v, list) else [v]):
                    h.update(a.tobytes() if hasattr(a, "tobytes") else repr(a).encode())
    for sh in plan_.shards:
        h.update(hashlib.sha256(sh.header_bytes()).hexdigest().encode())
    return h.hexdigest()


def test_digest_equals_its_definition_row_by_row(moe_family, qwen_family, tmp_path):
    """The plan digest, taken column by column, hashes the bytes its row-by-row definition does: whole models in
    several shards of mixed dtypes (base or none), slices (inputs renamed), FP8 inputs (input transforms), inputs
    whose Paths are equal but not the index's own objects, and a base on some tensors only."""
    import dataclasses

    base, fts = moe_family
    sliced = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.3},
              "slices": [{"sources": [{"model": str(base), "layer_range": [1, 3]}, {"model": str(fts[0]), "layer_range": [1, 3]}]}]}
    fbase, ffts = make_family(tmp_path / "fp8", DeepSeekV3Shape(hidden=128, layers=2, first_k_dense=1, intermediate=128,
                                                                 moe_intermediate=128, experts=4, heads=2, q_lora_rank=128,
                                                                 kv_lora_rank=128, qk_nope=64, qk_rope=64, v_head=64, vocab=256),
                              n_finetunes=2, fp8_block=(128, 128), shard_bytes=300_000)
    fp8 = {"merge_method": "ties", "base_model": str(fbase), "dtype": "bfloat16",
           "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in ffts]}
    plans = [plan(_doc(moe_family, m), out_shard_size="30KB", progress=False) for m in ("linear", "ties")]
    plans += [plan(_doc(qwen_family, "ties"), progress=False), plan(sliced, progress=False), plan(fp8, progress=False)]
    assert len({len(p.shards) for p in plans}) > 1 and any(t.input_transform is not None for t in plans[-1].tensors)
    assert any(x.name != t.name for t in plans[3].tensors for x in t.sources)  # slices: inputs renamed
    for p in plans:
        assert p.digest() == _digest_by_rows(p)
    p = plans[1]
    ts = [dataclasses.replace(t, sources=[dataclasses.replace(x, file=Path(str(x.file))) for x in t.sources])
          if i % 7 == 0 else t for i, t in enumerate(p.tensors)]
    ts = [dataclasses.replace(t, base=None) if i % 5 == 0 else t for i, t in enumerate(ts)]
    q = dataclasses.replace(p, tensors=ts)
    assert q.digest() == _digest_by_rows(q) != p.digest()


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_qwen3_moe_batched_equals_tensor_by_tensor(qwen_family, method, tmp_path, monkeypatch, poisoned_pool):
    base, fts = qwen_family
    d = {"merge_method": method, "dtype": "bfloat16",
         "models": [{"model": str(f), "parameters": dict(PARAMS[method])} for f in fts]}
    if method != "linear":
        d["base_model"] = str(base)
    p = plan(d, progress=False)
    assert max(len(u) for u in _runs(p)) >= 8
    assert _run(p, tmp_path / "b", monkeypatch, True) == _run(p, tmp_path / "o", monkeypatch, False)


# ---------------------------------------------------------------------------------------------------------
# the kernel: _C.ties_segments


SIZES = [1, 2, 0, 3, 17, 1024, 1, 2051, 64, 5]


@pytest.mark.parametrize("selection", ["threshold", "topk"])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("dtypes,out_dtype", [
    ([torch.bfloat16] * 3, torch.bfloat16),
    ([torch.float32, torch.float16, torch.bfloat16], torch.float16),
    ([torch.float16, torch.bfloat16, torch.float32], torch.float32),
])
@pytest.mark.parametrize("threads", [1, 2])
def test_ties_segments_equals_reference_per_segment(selection, rescale, dtypes, out_dtype, threads):
    gen = torch.Generator().manual_seed(3)
    offsets = [0]
    for s in SIZES:
        offsets.append(offsets[-1] + s)
    n = offsets[-1]
    b = torch.randn(n, generator=gen)
    # heavily tied magnitudes (multiples of 0.25) so topk's index order matters, plus a NaN and an inf
    xs = [(b + torch.randint(-4, 5, (n,), generator=gen) * 0.25) for _ in dtypes]
    xs[0][20], xs[1][1500] = float("nan"), float("inf")
    base = b[:n].to(dtypes[-1])
    inputs = [x.to(dt) for x, dt in zip(xs, [dtypes[0], dtypes[1], dtypes[0]])]
    p = TiesParams(weight=(0.7, -0.4, 1.1), density=(0.5, 0.2, 1.0), selection=selection, rescale=rescale)
    out = torch.full((n,), float("nan"), dtype=out_dtype)
    _native.ties_segments(out, inputs, base, offsets, p.weight, p.density, p.normalize, p.lambda_, p.election,
                          selection == "topk", threads, rescale)
    ref = get_method("ties")
    for a, z in zip(offsets, offsets[1:]):
        if z == a:
            continue
        want = ref.reference([x[a:z] for x in inputs], base[a:z], p).to(out_dtype)
        got = out[a:z]
        if rescale and z - a > 64:  # torch's fp32 L1 sums are not correctly rounded (tests/native/native_cases.py)
            one = torch.full((z - a,), float("nan"), dtype=out_dtype)
            _native.ties(one, [x[a:z] for x in inputs], base[a:z], p.weight, p.density, p.normalize, p.lambda_,
                         p.election, selection == "topk", 1, rescale)
            want = one
        same = (got == want) | (got.isnan() & want.isnan())
        assert bool(same.all()), f"segment [{a}, {z}): {int((~same).sum())} elements differ"


def test_ties_segments_checks_offsets():
    x = torch.zeros(8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="offsets"):
        _native.ties_segments(x, [x], x, [0, 4], [1.0], [0.5], True)
    with pytest.raises(ValueError, match="offsets"):
        _native._C.ties_segments(x.data_ptr(), 2, [0, 6, 4, 8], [x.data_ptr()], [2], x.data_ptr(), 2, [1.0], [0.5],
                                 True, 1.0, 0, False)



# ---------------------------------------------------------------------------------------------------------
# planning at MoE scale: plain settings resolved once, equal Params shared, checks still per value


def test_plain_settings_share_one_params_and_gradients_do_not(moe_family):
    base, fts = moe_family
    plain = {"merge_method": "ties", "base_model": str(base),
             "models": [{"model": str(f), "parameters": {"weight": 0.4, "density": 0.5}} for f in fts]}
    p = plan(plain, progress=False)
    assert len({id(t.params) for t in p.tensors}) == 1  # plan_text renders it once
    # a gradient over the layers and a filter: the values still follow each tensor
    p = plan(_doc(moe_family, "ties"), progress=False)
    w = {t.name: t.params.weight for t in p.tensors}
    assert w["model.layers.0.input_layernorm.weight"][0] == pytest.approx(0.1)
    assert w["model.layers.2.input_layernorm.weight"][0] == pytest.approx(0.9)
    assert w["model.layers.1.mlp.experts.3.up_proj.weight"][1] == pytest.approx(0.5)
    assert w["model.layers.1.mlp.experts.4.up_proj.weight"][1] == pytest.approx(0.2)
    assert len({id(t.params) for t in p.tensors}) == len({t.params for t in p.tensors})


def test_a_bad_plain_value_is_still_refused(moe_family):
    from fastmerge.errors import ConfigError

    base, fts = moe_family
    bad = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(f), "parameters": {"weight": 0.4, "density": 1.5 if i else 0.5}} for i, f in enumerate(fts)]}
    with pytest.raises(ConfigError, match=r"density of model #2 \(.*ft2\)"):
        plan(bad, progress=False)


@pytest.mark.parametrize("flavour", ["native", "torch"])
def test_a_run_that_makes_inf_is_still_reported(moe_family, flavour, tmp_path, monkeypatch):
    """A run's outputs are checked for inf/NaN in one pass; where there is some, per tensor as before."""
    base, fts = moe_family
    weight = [{"filter": "experts.5.", "value": 3e38}, {"value": 0.1}]  # 3e38 x 1000 x a delta of ~0.01: inf
    d = {"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"lambda": 1000.0},
         "models": [{"model": str(f), "parameters": {"weight": weight}} for f in fts[:2]]}
    p = plan(d, progress=False)
    calls = []
    monkeypatch.setattr(RawIO if flavour == "native" else TorchIO, "merge_batch",
                        _counted((RawIO if flavour == "native" else TorchIO).merge_batch, calls))
    with pytest.warns(RuntimeWarning, match=r"tensor 'model\.layers\.\d+\.mlp\.experts\.5\..*inf or NaN"):
        execute(p, tmp_path / "out", flavour)
    assert calls and max(calls) > 1


def _swap_offsets(f: Path, a: str, b: str) -> None:
    """Swap the data offsets of tensors ``a`` and ``b`` (equal byte sizes) in ``f``'s header, in place: same
    file size, same header length, another tensor table."""
    import json
    import struct

    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8:8 + n])
    head[a]["data_offsets"], head[b]["data_offsets"] = head[b]["data_offsets"], head[a]["data_offsets"]
    new = json.dumps(head, separators=(",", ":")).encode()
    assert len(new) <= n
    f.write_bytes(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n:])


def test_digest_follows_input_headers_and_parameter_values(tmp_path):
    """The digest hashes each safetensors file's raw header and numbers the parameter values: a tensor table
    changed at equal file sizes changes it, which tensors share a Params object does not."""
    import dataclasses
    import shutil

    base, fts = make_family(tmp_path / "f", DEEPSEEK, n_finetunes=2, shard_bytes=60_000)
    doc = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in fts]}
    p = plan(doc)
    d = p.digest()
    assert all(ix.header_sha256 and len(ix.header_sha256) == len(ix.files) for ix in p.indexes.values())
    assert len({id(t.params) for t in p.tensors}) < len(p.tensors) / 10  # most tensors share one Params
    unshared = dataclasses.replace(p, tensors=[dataclasses.replace(t, params=dataclasses.replace(t.params)) for t in p.tensors])
    assert len({id(t.params) for t in unshared.tensors}) == len(p.tensors)
    assert unshared.digest() == d
    assert plan(doc).digest() == d
    # a name, a shape or an output dtype changed for one tensor: hashed through the shards' headers, which the plan
    # lays out from its tensors (here laid out again, as build_plan does)
    from fastmerge.io.writer import plan_shards

    def relaid(ts):
        return dataclasses.replace(p, tensors=ts, shards=plan_shards([t.out_tensor for t in ts], p.options.out_shard_size))

    assert relaid(list(p.tensors)).digest() == d
    for change in ({"name": p.tensors[3].name + "_"}, {"shape": (*p.tensors[3].shape, 1)}, {"out_dtype": "float32"}):
        ts = list(p.tensors)
        ts[3] = dataclasses.replace(ts[3], **change)
        assert relaid(ts).digest() != d, change
    # one value changed for one tensor
    other = dataclasses.replace(p, tensors=list(p.tensors))
    other.tensors[5] = dataclasses.replace(p.tensors[5], params=dataclasses.replace(p.tensors[5].params, density=0.25))
    assert other.digest() != d
    # two expert matrices of a copy of ft1 trade places in their file: same path and file sizes, another plan
    ft1 = tmp_path / "ft1copy"
    shutil.copytree(fts[0], ft1)
    doc1 = {**doc, "models": [{"model": str(ft1), "parameters": {"weight": 0.5, "density": 0.5}}, doc["models"][1]]}
    before = plan(doc1).digest()
    assert before != d  # the model path is in the config
    ix = plan(doc1).indexes[str(ft1)]
    a, b = [n for n, t in ix.tensors.items() if t.file == ix.files[0] and ".experts." in n][:2]
    _swap_offsets(ix.files[0], a, b)
    assert plan(doc1).digest() != before


def test_shard_header_bytes_cached_for_its_tensor_list():
    from fastmerge.io.writer import OutTensor, Shard

    ts = [OutTensor(f"t{i}", "bfloat16", (4, i + 1)) for i in range(5)]
    s = Shard("model.safetensors", ts)
    h = s.header_bytes()
    assert s.header_bytes() is h
    assert h == Shard("model.safetensors", list(ts))._header_bytes()
    s.tensors = ts[:3]  # another list: another header
    assert s.header_bytes() == Shard("x", ts[:3])._header_bytes() != h
    s.tensors.append(ts[4])  # the same list, grown
    assert s.header_bytes() == Shard("x", [*ts[:3], ts[4]])._header_bytes()
    # its sha256, kept with it and taken again when the header changes
    import hashlib

    sha = s.header_sha256()
    assert sha == hashlib.sha256(s.header_bytes()).hexdigest() and s.header_sha256() is sha
    s.tensors = ts[:2]
    assert s.header_sha256() == hashlib.sha256(Shard("x", ts[:2])._header_bytes()).hexdigest() != sha


@pytest.mark.parametrize("flavour", ["memoryview", "torch"])
def test_write_run_equals_write_per_tensor(tmp_path, flavour):
    """ShardWriter.write_run: runs crossing output shards write the bytes, shard checksums and manifests'
    inputs that ``write`` writes tensor by tensor; a run out of plan order or of the wrong size is refused
    before any byte of it is written."""
    from fastmerge.errors import FastMergeError
    from fastmerge.io.writer import OutTensor, ShardWriter, plan_shards

    g = torch.Generator().manual_seed(0)
    outs = [OutTensor(f"t{i}", "bfloat16", (3, 5 + i % 7)) for i in range(40)]
    data = [torch.randn(t.shape, generator=g).bfloat16() for t in outs]
    shards = plan_shards(outs, 200)
    assert len(shards) > 5
    done: dict[str, list] = {"one": [], "run": []}
    (tmp_path / "one").mkdir()
    (tmp_path / "run").mkdir()
    one = ShardWriter(tmp_path / "one", shards, on_shard=lambda s, n, c: done["one"].append((s.filename, n, c)))
    for t, x in zip(outs, data):
        one.write(t.name, x)
    one.finalize()
    run = ShardWriter(tmp_path / "run", shards, on_shard=lambda s, n, c: done["run"].append((s.filename, n, c)))
    for a, b in [(0, 1), (1, 13), (13, 14), (14, 40)]:  # runs of 1, 12 (over shards), 26 tensors
        flat = torch.cat([x.reshape(-1) for x in data[a:b]])
        names = [t.name for t in outs[a:b]]
        if a == 14:
            with pytest.raises(FastMergeError, match="expected tensor 't15', got 't16'"):
                run.write_run([names[0], names[2], names[1], *names[3:]], flat)
            with pytest.raises(FastMergeError, match="planned"):
                run.write_run(names, flat[:-1])
            assert run._next == 14
        run.write_run(names, flat if flavour == "torch" else memoryview(flat.view(torch.uint8).numpy()))
    run.finalize()
    assert done["run"] == done["one"] and len(done["one"]) == len(shards)
    assert _digests(tmp_path / "run") == _digests(tmp_path / "one")
    assert run.bytes_written == one.bytes_written


# segments of 65-2,048 elements select by the small counting select (csrc/cpu/select.cpp rth_largest_small),
# 64 and fewer by nth_element, 2,049 and more by the 2^11-bin counting select
SMALL_SELECT_SIZES = [64, 65, 100, 777, 2047, 2048, 2049, 300, 1500]


@pytest.mark.parametrize("data", ["wide", "tied", "constant", "nonfinite"])
@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_ties_small_select_equals_reference(data, selection):
    """TIES on segments sized around the small-tensor selection's bounds, each against the torch reference
    (every |delta| >= the k-th largest kept, the exact-k cut by index order, NaN never kept): magnitudes
    over the whole fp32 range (four counting rounds), few distinct values, one value, NaN/inf; densities
    giving k = 1, k near n/2 and k = n - 1."""
    gen = torch.Generator().manual_seed(11)
    offsets = [0]
    for s in SMALL_SELECT_SIZES:
        offsets.append(offsets[-1] + s)
    n = offsets[-1]
    base = torch.randn(n, generator=gen)
    if data == "wide":  # magnitudes 1e-30 .. 1e30: the bit patterns span almost every exponent
        xs = [base + torch.randn(n, generator=gen) * torch.pow(10.0, torch.randint(-30, 31, (n,), generator=gen).float())
              for _ in range(3)]
    elif data == "tied":
        xs = [base + torch.randint(-3, 4, (n,), generator=gen) * 0.5 for _ in range(3)]
    elif data == "constant":
        xs = [base + 0.75, base - 0.75, base + 0.75]
    else:
        xs = [base + torch.randn(n, generator=gen) for _ in range(3)]
        for x in xs:
            x[torch.randint(0, n, (n // 50,), generator=gen)] = float("nan")
            x[torch.randint(0, n, (n // 50,), generator=gen)] = float("inf")
            x[torch.randint(0, n, (n // 50,), generator=gen)] = -float("inf")
    inputs = [x.float() for x in xs]
    p = TiesParams(weight=(0.7, -0.4, 1.1), density=(0.0005, 0.5, 0.9995), selection=selection, rescale=False)
    out = torch.full((n,), float("nan"), dtype=torch.float32)
    _native.ties_segments(out, inputs, base, offsets, p.weight, p.density, p.normalize, p.lambda_, p.election,
                          selection == "topk", 1, False)
    ref = get_method("ties")
    for a, z in zip(offsets, offsets[1:]):
        want = ref.reference([x[a:z] for x in inputs], base[a:z], p).float()
        got = out[a:z]
        same = (got == want) | (got.isnan() & want.isnan())
        assert bool(same.all()), f"segment [{a}, {z}) of {data}: {int((~same).sum())} elements differ"


@pytest.mark.parametrize("flavour", ["native", "torch"])
def test_runs_of_small_tensors_read_ahead_at_least_the_floor(moe_family, flavour, tmp_path, monkeypatch):
    """The prefetcher of a merge whose largest run is a few MB gets ``READ_AHEAD_MIN`` (32 MiB), not 1.25x that run:
    one group ahead kept the reader in step with the merge, which waited on every page-table fill (0.12 of 0.45 s of
    a merge of 20k tensors of 16 KB). A merge of large tensors keeps 1.25x its largest."""
    from fastmerge.io import reader

    budgets = []

    class Spy(reader.Prefetcher):
        def __init__(self, groups, budget_bytes):
            budgets.append(budget_bytes)
            super().__init__(groups, budget_bytes)

    monkeypatch.setattr(session, "Prefetcher", Spy)
    execute(plan(_doc(moe_family, "linear"), progress=False), tmp_path / "out", flavour)
    assert budgets == [reader.READ_AHEAD_MIN] and reader.READ_AHEAD_MIN == 32 << 20
    assert reader.read_ahead_bytes(100 << 20) == int(reader.READ_AHEAD * (100 << 20))
