"""FP8 checkpoints (io.fp8): block-scaled / per-channel / per-tensor dequantisation, scales paired and never
merged, bf16 output by default, FP8 re-quantised output, mixed families, one-line scale errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fastmerge
import fastmerge.engine
from fastmerge.errors import ConfigError, ShapeMismatchError
from fastmerge.io import fp8
from fastmerge.testing import DeepSeekV3Shape, Qwen3MoeShape, fp8_quantized, make_family
from helpers.kernel_cases import DEV, needs_triton

BLOCK = (128, 128)
#: DeepSeek-V3-shaped, tiny: partial last blocks in both dimensions (200 = 128 + 72, 136 = 128 + 8)
SHAPE = DeepSeekV3Shape(hidden=200, layers=3, first_k_dense=1, intermediate=300, moe_intermediate=136, experts=4,
                        heads=2, q_lora_rank=96, kv_lora_rank=64, qk_nope=16, qk_rope=8, v_head=16, vocab=300)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8fam")
    base, fts = make_family(root, SHAPE, n_finetunes=2, fp8_block=BLOCK, shard_bytes=1_000_000)
    return root, base, fts


def load(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(path).glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def dequantised_copy(src: Path, dst: Path, dtype=torch.float32) -> Path:
    """``src`` with every FP8 weight replaced by its exact fp32 dequantisation (scales dropped)."""
    sd = load(src)
    out = {}
    for k, v in sd.items():
        if k.endswith("_scale_inv"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            v = fp8.dequantize(v, sd[k + "_scale_inv"], "block", BLOCK).to(dtype)
        out[k] = v.contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def cfg(method: str, base: Path, fts: list[Path], **extra) -> dict:
    if method == "linear":  # base_model would be one more input (mergekit's rule): list it
        return {"merge_method": method, "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in [base, *fts]], **extra}
    params = {"weight": 0.5, "density": 0.5}
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(f), "parameters": params} for f in fts], **extra}


# -- the math ---------------------------------------------------------------------------------------


def test_dequantize_is_the_blockwise_product():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 200, generator=g) * 40).to(torch.float8_e4m3fn)
    s = torch.rand(3, 2, generator=g) + 0.1
    got = fp8.dequantize(w, s, "block", BLOCK)
    ref = torch.empty(300, 200)
    for i in range(3):
        for j in range(2):
            ref[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float() * s[i, j]
    assert torch.equal(got, ref)
    # per channel, per tensor
    sc = torch.rand(300, 1, generator=g)
    assert torch.equal(fp8.dequantize(w, sc, "channel"), w.float() * sc)
    assert torch.equal(fp8.dequantize(w, torch.tensor([0.5]), "tensor"), w.float() * 0.5)


@pytest.mark.parametrize("shape", [(300, 200), (128, 128), (5, 7), (129, 1)])
def test_quantize_dequantize_round_trip_error_bound(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 0.02
    x[0, 0] = 0.3  # one outlier: its block's scale follows it
    q, s = fp8.quantize_blocks(x, BLOCK)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    y = fp8.dequantize(q, s, "block", BLOCK)
    # e4m3: 3 mantissa bits -> half an ulp is 2^-4 relative for normals; subnormals: 2^-10 absolute (x scale)
    per_elem_scale = fp8._per_block(torch.ones(shape), s, BLOCK, "mul")
    bound = x.abs() * 2.0 ** -4 + per_elem_scale * 2.0 ** -10
    assert bool(((y - x).abs() <= bound).all())
    # every block's amax lands on 448
    assert float(q.float().abs().max()) == 448.0


def test_zero_block_gets_scale_one():
    x = torch.zeros(200, 130)
    x[:128, :128] = 1.0
    q, s = fp8.quantize_blocks(x, BLOCK)
    assert s[0, 0] == 1.0 / 448 and s[1, 1] == 1.0 and torch.equal(fp8.dequantize(q, s, "block", BLOCK), x)


# -- reading and merging ---------------------------------------------------------------------------


def test_family_layout(fam):
    _, base, _ = fam
    sd = load(base)
    w = "model.layers.1.mlp.experts.0.down_proj.weight"
    assert sd[w].dtype == torch.float8_e4m3fn and sd[w + "_scale_inv"].shape == (2, 2)
    assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert "model.layers.1.mlp.gate.weight_scale_inv" not in sd
    assert json.loads((base / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]


def test_plan_pairs_scales_and_never_merges_them(fam):
    _, base, fts = fam
    plan = fastmerge.plan(cfg("ties", base, fts))
    names = [t.name for t in plan.tensors]
    assert not any(n.endswith("_scale_inv") for n in names)
    n_fp8 = sum(1 for n, s in SHAPE.tensors() if fp8_quantized(n, s))
    assert len(names) == len(SHAPE.tensors()) and n_fp8 > 10
    t = next(t for t in plan.tensors if t.name == "model.layers.0.mlp.down_proj.weight")
    assert t.out_dtype == "bfloat16" and t.input_transform.summary()["fp8"][0]["kind"] == "block"
    j = json.loads(plan.dumps())
    row = next(r for r in j["tensors"] if r["name"] == t.name)
    assert row["fp8"][1]["scale"] == t.name + "_scale_inv"
    plan.digest()  # hashes the transforms (no absolute paths in their repr)


@pytest.mark.parametrize("method", ["ties", "linear", "task_arithmetic"])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_fp8_merge_equals_merge_of_dequantised_copies(fam, tmp_path, method, backend):
    root, base, fts = fam
    copies = [dequantised_copy(p, root / "deq" / p.name) if not (root / "deq" / p.name).exists() else root / "deq" / p.name
              for p in [base, *fts]]
    a = fastmerge.merge(cfg(method, base, fts, out_dtype="bfloat16"), tmp_path / "a", threads=2, progress=False, backend=backend)
    fastmerge.merge(cfg(method, copies[0], copies[1:], out_dtype="bfloat16"), tmp_path / "b", threads=2, progress=False,
                        backend=backend)
    assert a.engine == backend  # native: the kernels read the FP8 bytes (engine.stream.RawIO); torch: dequantised in torch
    sa, sb = load(tmp_path / "a"), load(tmp_path / "b")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties", "sce", "task_arithmetic"])
def test_native_engine_dequantises_in_the_kernels(fam, tmp_path, monkeypatch, method):
    """The native engine passes the FP8 bytes and scales to the kernels (no torch, no fp32 copy): the same bytes as
    the torch engine, which dequantises in torch (io.fp8.dequantize) and runs the same kernels."""
    _, base, fts = fam
    c = cfg(method, base, fts)
    if method == "sce":
        c["models"] = [{"model": m["model"]} for m in c["models"]]
    if method.startswith("breadcrumbs"):
        c["models"] = [{**m, "parameters": {**m["parameters"], "gamma": 0.01}} for m in c["models"]]
    plan = fastmerge.plan(c)
    assert fastmerge.engine.explain(plan)["native"] == []
    calls = []
    real = fp8.dequantize
    monkeypatch.setattr(fp8, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = fastmerge.merge(c, tmp_path / "n", threads=2, progress=False)
    assert r.engine == "native" and not calls
    monkeypatch.setenv("FASTMERGE_FASTPATH", "0")  # the torch engine: dequantised in torch, then the same kernels
    r = fastmerge.merge(c, tmp_path / "t", threads=2, progress=False)
    assert r.engine == "torch" and calls and r.backends == {"native": len(plan.tensors)}
    sn, st = load(tmp_path / "n"), load(tmp_path / "t")
    assert sn.keys() == st.keys()
    for k in sn:
        assert torch.equal(sn[k], st[k]), k


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_native_engine_reads_16_bit_scales(tmp_path, scale_dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 200, generator=g) * 0.02
    q, s = fp8.quantize_blocks(x, BLOCK)
    s = s.to(scale_dtype)
    d = tmp_path / "m"
    d.mkdir()
    save_file({"a.weight": q, "a.weight_scale_inv": s}, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"architectures": ["X"], "quantization_config": {
        "quant_method": "fp8", "weight_block_size": [128, 128]}}))
    c = {"merge_method": "linear", "models": [{"model": str(d), "parameters": {"weight": 1.0}}], "out_dtype": "float32"}
    r = fastmerge.merge(c, tmp_path / "o", threads=1, progress=False)
    assert r.engine == "native"
    assert torch.equal(load(tmp_path / "o")["a.weight"], fp8.dequantize(q, s, "block", BLOCK))


def test_fp8_output_requantised_in_torch_on_the_torch_engine(fam):
    _, base, fts = fam
    plan = fastmerge.plan(cfg("ties", base, fts, out_dtype="float8_e4m3fn"))
    assert "re-quantised" in fastmerge.engine.explain(plan)["native"][0]


def test_bf16_output_by_default_drops_quantization_config(fam, tmp_path):
    _, base, fts = fam
    fastmerge.merge(cfg("ties", base, fts), tmp_path / "o", threads=2, progress=False)
    sd = load(tmp_path / "o")
    assert all(v.dtype == torch.bfloat16 for v in sd.values()) and not any("scale" in k for k in sd)
    doc = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "quantization_config" not in doc and doc["torch_dtype"] == "bfloat16"


def test_mixed_family(fam, tmp_path):
    """One FP8 model, one bf16 model, either order: the FP8 one is read as its dequantised copy."""
    root, base, fts = fam
    bf = dequantised_copy(fts[0], tmp_path / "ft1_bf16", torch.bfloat16)
    deq_base = dequantised_copy(base, tmp_path / "base_f32")
    deq_ft2 = dequantised_copy(fts[1], tmp_path / "ft2_f32")
    for order in ([bf, fts[1]], [fts[1], bf]):
        fastmerge.merge(cfg("ties", base, order, out_dtype="bfloat16"), tmp_path / "m", threads=2, progress=False, overwrite=True)
        ref_order = [bf, deq_ft2] if order[0] == bf else [deq_ft2, bf]
        fastmerge.merge(cfg("ties", deq_base, ref_order, out_dtype="bfloat16"), tmp_path / "r", threads=2, progress=False,
                        overwrite=True)
        sm, sr = load(tmp_path / "m"), load(tmp_path / "r")
        assert sm.keys() == sr.keys()
        assert all(torch.equal(sm[k], sr[k]) for k in sm)
    # a bf16 base with FP8 fine-tunes
    fastmerge.merge(cfg("linear", bf, fts), tmp_path / "lin", threads=2, progress=False)
    assert all(v.dtype == torch.bfloat16 for v in load(tmp_path / "lin").values())


def test_fp8_output_requantised_with_scales(fam, tmp_path):
    _, base, fts = fam
    fastmerge.merge(cfg("ties", base, fts, out_dtype="float8_e4m3fn"), tmp_path / "q", threads=2, progress=False)
    fastmerge.merge(cfg("ties", base, fts), tmp_path / "f", threads=2, progress=False, backend="torch")
    sq, sf = load(tmp_path / "q"), load(tmp_path / "f")
    doc = json.loads((tmp_path / "q" / "config.json").read_text())
    assert doc["quantization_config"]["weight_block_size"] == [128, 128] and doc["torch_dtype"] == "bfloat16"
    for name, shape in SHAPE.tensors():
        if fp8_quantized(name, shape):
            assert sq[name].dtype == torch.float8_e4m3fn
            s = sq[name + "_scale_inv"]
            assert s.dtype == torch.float32 and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
            y = fp8.dequantize(sq[name], s, "block", BLOCK)
            x = sf[name].float()
            scale = fp8._per_block(torch.ones(shape), s, BLOCK, "mul")
            # the fp32 merge rounded once to FP8 vs once to bf16: within both half-ulps
            assert bool(((y - x).abs() <= x.abs() * (2.0 ** -4 + 2.0 ** -8) + scale * 2.0 ** -9).all()), name
        else:
            assert sq[name].dtype == torch.bfloat16 and torch.equal(sq[name], sf[name]), name
    # the output loads where the inputs load: it merges again as an FP8 input
    fastmerge.merge({"merge_method": "linear", "models": [{"model": str(tmp_path / "q"), "parameters": {"weight": 1.0}}]},
                    tmp_path / "again", threads=2, progress=False)
    assert torch.equal(load(tmp_path / "again")["model.layers.0.mlp.up_proj.weight"].float(),
                       fp8.dequantize(sq["model.layers.0.mlp.up_proj.weight"], sq["model.layers.0.mlp.up_proj.weight_scale_inv"],
                                      "block", BLOCK).bfloat16().float())


def test_out_fp8_needs_fp8_inputs(tmp_path):
    base, fts = make_family(tmp_path, fastmerge.testing.LlamaShape(hidden=32, layers=1, intermediate=48, vocab=50, heads=2),
                            n_finetunes=1)
    with pytest.raises(ConfigError, match="no input has FP8 weights"):
        fastmerge.plan(cfg("ties", base, fts, out_dtype="float8_e4m3fn"))


def test_scale_shape_mismatch_is_one_line(fam, tmp_path):
    _, base, _ = fam
    sd = load(base)
    w = "model.layers.0.mlp.gate_proj.weight"
    sd[w + "_scale_inv"] = torch.ones(2, 5)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_text((base / "config.json").read_text())
    with pytest.raises(ShapeMismatchError) as e:
        fastmerge.plan(cfg("linear", bad, [bad]))
    msg = str(e.value)
    assert "\n" not in msg and f"'{w}_scale_inv'" in msg and f"'{w}'" in msg and "[3, 2]" in msg


def test_per_tensor_and_per_channel_scales(tmp_path):
    """compressed-tensors' layout: ``weight_scale`` of one element or one per row, no weight_block_size."""
    g = torch.Generator().manual_seed(3)
    models = []
    for i, kind in enumerate(("tensor", "channel")):
        x = torch.randn(64, 48, generator=g) * 0.02
        if kind == "tensor":
            s = x.abs().amax().reshape(1) / 448
            q = (x / s).to(torch.float8_e4m3fn)
        else:
            q, s = fp8.quantize_rows(x)
        d = tmp_path / kind
        d.mkdir()
        save_file({"a.weight": q, "a.weight_scale": s.contiguous(), "a.input_scale": torch.ones(1),
                   "n.weight": torch.ones(48, dtype=torch.bfloat16)}, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({"architectures": ["X"], "quantization_config": {
            "quant_method": "compressed-tensors", "format": "float-quantized"}}))
        models.append((d, fp8.dequantize(q, s, kind)))
    plan = fastmerge.plan({"merge_method": "linear", "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d, _ in models]})
    assert sorted(t.name for t in plan.tensors) == ["a.weight", "n.weight"]  # scales and input scales are companions
    fastmerge.merge({"merge_method": "linear", "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d, _ in models],
                     "out_dtype": "float32"}, tmp_path / "o", threads=1, progress=False)
    got = load(tmp_path / "o")["a.weight"]
    assert torch.equal(got, (models[0][1] + models[1][1]) / 2)


def test_compat_mode_dequantises_before_the_cast(fam, tmp_path):
    _, base, fts = fam
    plan = fastmerge.plan(cfg("ties", base, fts), mergekit_compat=True)
    assert {t.compute_dtype for t in plan.tensors} == {"bfloat16"}
    fastmerge.merge(cfg("ties", base, fts), tmp_path / "c", threads=2, progress=False, mergekit_compat=True)
    sd = load(tmp_path / "c")
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all() for v in sd.values())


def test_qwen3_moe_shape_family(tmp_path):
    sh = Qwen3MoeShape(hidden=32, layers=2, moe_intermediate=16, experts=128, heads=4, kv_heads=2, head_dim=8, vocab=64)
    assert len(sh.tensors()) == 3 + 2 * (128 * 3 + 9)  # embed, norm, head; per layer 128 experts x 3 + 9
    base, fts = make_family(tmp_path, sh, n_finetunes=1)
    r = fastmerge.merge(cfg("ties", base, fts), tmp_path / "o", threads=2, progress=False)
    assert r.tensors == len(sh.tensors())


# -- the GPU engine: FP8 bytes uploaded, dequantised on the device (kernels.fp8) --------------------------


@needs_triton
@pytest.mark.parametrize("method,elems", [("linear", None), ("ties", 20_000)], ids=["linear", "ties-row-chunks"])
def test_gpu_engine_dequantises_on_the_device(fam, tmp_path, monkeypatch, method, elems):
    """The GPU engine (on the CPU here: kernels interpreted) writes the bytes of the CPU engine; the FP8 inputs
    never pass through io.fp8.dequantize (the host fp32 copy). With room for 20k elements per slot the 60k-element
    tensors run in row chunks, each dequantised from its first element's place in the scales, the others in
    batches (a whole-tensor ties run took 2 min interpreted on the 2-core machine and adds no path)."""
    from fastmerge import backends
    from fastmerge.engine import gpu

    if DEV == "cpu":
        monkeypatch.setattr(backends, "resolve_device", lambda device: "cuda" if device == "cuda" else "cpu")
    _, base, fts = fam
    c = cfg(method, base, fts, out_dtype="bfloat16")
    fastmerge.merge(c, tmp_path / "cpu", threads=2, progress=False)
    plan = fastmerge.plan(c, tmp_path / "gpu", progress=False, device="cuda")
    assert fastmerge.engine.explain(plan)["gpu"] == []
    calls = []
    real = fp8.dequantize
    monkeypatch.setattr(fp8, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    # fp32 rows of base + 2 models, bf16 output, and room for the kernels' per-element scratch
    kw = {} if elems is None else {"max_gpu_memory": gpu.RESERVE_BYTES + 2 * elems * (3 * 4 + 2 + 16)}
    rep = gpu.execute_cuda(plan, tmp_path / "gpu", device=DEV, **kw)
    assert not calls
    if elems is not None:
        assert rep.chunked_tensors > 0, rep.summary()
    sa, sb = load(tmp_path / "cpu"), load(tmp_path / "gpu")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_gpu_engine_refuses_fp8_outputs(fam):
    _, base, fts = fam
    plan = fastmerge.plan(cfg("ties", base, fts, out_dtype="float8_e4m3fn"))
    assert fastmerge.engine._fp8_reasons(plan, "gpu") == ["FP8 outputs are re-quantised by the CPU streaming engine only"]


def test_fp8_index_of_a_twin_equals_its_own_pairing(fam, tmp_path, monkeypatch):
    """A fine-tune whose headers are byte-identical to the base's (a twin, ``CheckpointIndex.twin``) takes the base's
    pairing and classification with its own rows: the same Fp8Index as its own parse gives; and with another
    quantization config it is classified on its own (here: 64x64 blocks, which its scales do not fit)."""
    import shutil

    from fastmerge.io.index import CheckpointIndex

    _, base, fts = fam
    headers: dict = {}
    a, b = CheckpointIndex.open(base, headers), CheckpointIndex.open(fts[0], headers)
    assert b.twin is a and a.twin is None
    fp8.Fp8Index.of(a)
    with monkeypatch.context() as m:  # the twin classifies nothing itself
        m.setattr(fp8, "_classify", lambda *args: pytest.fail("a twin's scales classified again"))
        got = fp8.Fp8Index.of(b)
    want = fp8.Fp8Index.of(CheckpointIndex.open(fts[0]))  # opened alone: no twin, its own classification
    assert got is not fp8.Fp8Index.of(a) and (got.quant, got.block, got.companions) == (want.quant, want.block, want.companions)
    assert got.dequant.keys() == want.dequant.keys() and len(got.dequant) > 10
    for name, d in got.dequant.items():
        w = want.dequant[name]
        assert (d.kind, d.block, d.weight, d.scale) == (w.kind, w.block, w.weight, w.scale)
        assert d.weight is b.tensors[name] and d.weight.file.parent == fts[0]  # this model's own rows
    other = tmp_path / "other"
    shutil.copytree(fts[0], other)
    doc = json.loads((other / "config.json").read_text())
    doc["quantization_config"]["weight_block_size"] = [64, 64]
    (other / "config.json").write_text(json.dumps(doc))
    c = CheckpointIndex.open(other, headers)
    assert c.twin is a
    with pytest.raises(ShapeMismatchError):
        fp8.Fp8Index.of(c)
