"""cart: hand-computed cases of the exact-SVD specification, identities, tensor selection, parameter
validation, the randomized default against exact CART, and an engine merge of a tiny family."""

import warnings

import pytest
import torch

import fastmerge
from fastmerge import merge_tensors
from fastmerge.errors import BackendUnavailableError, ConfigError
from fastmerge.methods import get_method
from fastmerge.methods.base import ParamContext
from fastmerge.methods.cart import DEFAULT_TARGETS, CartParams, matches_targets

method = get_method("cart")
ref = method.reference
EXACT = CartParams(svd="exact")


def embed(diag, m=3, n=4):
    """A m×n matrix with ``diag`` on its diagonal: its SVD is read off by hand."""
    out = torch.zeros(m, n)
    for i, d in enumerate(diag):
        out[i, i] = d
    return out


A = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.5, 0.0, -0.5, 1.0], [-2.0, 0.75, 1.0, -1.25]])
# Centered deltas summing to zero: diag(3, 1), diag(−1, −2), diag(−2, 1)
DELTAS = [embed([3.0, 1.0]), embed([-1.0, -2.0]), embed([-2.0, 1.0])]
XS = [A + d for d in DELTAS]


def test_rank1_by_hand():
    # SVD_1 keeps the largest |entry| of each diagonal delta: diag(3,0), diag(0,−2), diag(−2,0); sum diag(1, −2)
    for lam in (1.0, 0.5):
        got = ref(XS, None, CartParams(rank=1, lambda_=lam, svd="exact"))
        want = A + lam * embed([1.0, -2.0])
        assert (got - want).abs().max() < 1e-6


def test_energy_by_hand():
    # energies (s²): 9,1 (0.9 in the top one), 4,1 (0.8), 4,1 (0.8). At 0.85: k = 1, 2, 2
    # → diag(3, 0) + diag(−1, −2) + diag(−2, 1) = diag(0, −1)
    got = ref(XS, None, CartParams(energy=0.85, svd="exact"))
    assert (got - (A + embed([0.0, -1.0]))).abs().max() < 1e-6
    got = ref(XS, None, CartParams(energy=0.85))  # randomized: 3×4 is too small to sketch, exact runs
    assert (got - (A + embed([0.0, -1.0]))).abs().max() < 1e-6


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_k0_gives_weight_average(svd):
    xs = [torch.randn(21, 34) for _ in range(3)]
    avg = (xs[0] + xs[1] + xs[2]) / 3
    got = ref(xs, None, CartParams(rank_ratio=0.0, lambda_=2.0, svd=svd))
    assert (got - avg).abs().max() < 1e-6


@pytest.mark.parametrize("lam", [1.0, 2.0])
def test_full_rank_gives_weight_average(lam):
    # Σ_t (θ_t − θ_avg) = 0: with every singular triplet kept the update vanishes, for any λ
    xs = [torch.randn(17, 29) for _ in range(4)]
    avg = sum(xs) / 4
    for p in (CartParams(rank_ratio=1.0, lambda_=lam, svd="exact"), CartParams(rank_ratio=1.0, lambda_=lam)):
        assert (ref(xs, None, p) - avg).abs().max() < 1e-4 * lam


def test_two_models_give_weight_average():
    # T = 2: Δ_2 = −Δ_1, so SVD_k(Δ_1) + SVD_k(Δ_2) = 0 at every k (distinct singular values)
    xs = [torch.randn(19, 23) for _ in range(2)]
    got = ref(xs, None, CartParams(rank=3, lambda_=1.7, svd="exact"))
    # two separate SVDs (of Δ and −Δ) cancel up to fp32 rounding of rank-3 terms with entries ~3: ~1e-5
    assert (got - (xs[0] + xs[1]) / 2).abs().max() < 1e-4


def test_identical_models_and_single_model():
    x = torch.randn(12, 30)
    assert (ref([x, x, x], None, EXACT) - x).abs().max() < 1e-6
    assert torch.equal(ref([x], None, EXACT), x)
    assert torch.equal(ref([x], None, CartParams()), x)


def test_not_selected_tensors_are_averaged():
    xs = [torch.randn(40, 50) for _ in range(3)]
    avg = sum(xs) / 3
    emb = merge_tensors("cart", xs, tensor_name="model.embed_tokens.weight")
    head = merge_tensors("cart", xs, tensor_name="lm_head.dense.weight")  # '!lm_head' wins over 'dense'
    vec = [torch.randn(50) for _ in range(3)]
    norm = merge_tensors("cart", vec, tensor_name="model.layers.0.mlp.norm.weight")  # 1-D: never low-rank
    assert (emb - avg).abs().max() < 1e-6 and (head - avg).abs().max() < 1e-6
    assert (norm - sum(vec) / 3).abs().max() < 1e-6
    q = merge_tensors("cart", xs, tensor_name="model.layers.0.self_attn.q_proj.weight", svd="exact", rank=2)
    assert (q - avg).abs().max() > 1e-2  # selected: the low-rank update is there


def test_matches_targets():
    assert matches_targets("model.layers.3.self_attn.q_proj.weight", DEFAULT_TARGETS)
    assert matches_targets("transformer.h.0.attn.c_attn.weight", DEFAULT_TARGETS)
    assert matches_targets("visual.transformer.resblocks.0.attn.in_proj_weight", DEFAULT_TARGETS)
    assert matches_targets("encoder.layer.0.attention.self.query.weight", DEFAULT_TARGETS)
    assert not matches_targets("model.embed_tokens.weight", DEFAULT_TARGETS)
    assert not matches_targets("lm_head.weight", DEFAULT_TARGETS)
    assert not matches_targets("bert.pooler.dense.weight", DEFAULT_TARGETS)
    assert matches_targets("anything", "*") and not matches_targets("x.lm_head", "*,!lm_head")
    assert matches_targets("a.up_proj", " gate_proj , up_proj ") and not matches_targets("a.q_proj", "up_proj")


@pytest.mark.parametrize(
    "params,msg",
    [
        ({"rank_ratio": 1.5}, "rank_ratio"),
        ({"rank_ratio": -0.1}, "rank_ratio"),
        ({"rank": -1}, "rank"),
        ({"energy": 1.2}, "energy"),
        ({"oversample": -3}, "oversample"),
        ({"power_iters": 50}, "power_iters"),
        ({"svd": "lanczos"}, "svd"),
        ({"targets": "!lm_head"}, "targets"),
    ],
)
def test_invalid_parameters(params, msg):
    with pytest.raises(ConfigError, match=msg):
        merge_tensors("cart", [torch.randn(8, 8), torch.randn(8, 8)], **params)


def spectrum_family(m, n, T, seed):
    """T fine-tunes of one base whose centered deltas have a slowly decaying (1/i) spectrum."""
    g = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(m, n, generator=g)
    r = min(m, n)
    sig = 1.0 / torch.arange(1, r + 1, dtype=torch.float32)
    xs = []
    for _ in range(T):
        u = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
        v = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
        tau = (u * sig) @ v.T
        xs.append(base + tau * (0.05 * base.norm() / tau.norm()))
    return xs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backend_matches_reference(backend, dtype):
    xs = [x.to(dtype) for x in spectrum_family(67, 129, 3, seed=1)]  # odd sizes
    name = "model.layers.1.mlp.up_proj.weight"
    if backend != "torch":  # cart runs on the torch backend (its reference is the fast path): a clear refusal
        with pytest.raises(BackendUnavailableError, match="cart"):
            merge_tensors("cart", xs, backend=backend, tensor_name=name)
        return
    got = merge_tensors("cart", xs, backend=backend, tensor_name=name, svd="exact", rank_ratio=0.1, **{"lambda": 1.5})
    shared = {spec.name: spec.default for spec in method.params}
    shared.update({"rank_ratio": 0.1, "lambda": 1.5, "svd": "exact"})
    p = method.make_params({}, shared, ParamContext(name, 0))
    assert got.dtype == dtype
    assert torch.equal(got, ref(xs, None, p).to(dtype))
    # the default (randomized) path against the exact specification
    fast = merge_tensors("cart", xs, backend=backend, tensor_name=name, rank_ratio=0.1, out_dtype=torch.float32,
                         **{"lambda": 1.5})
    exact = ref(xs, None, p)
    assert float(torch.linalg.norm(fast - exact) / torch.linalg.norm(exact)) < 1e-2


def test_randomized_is_deterministic_per_tensor_and_seed():
    xs = spectrum_family(48, 96, 3, seed=2)
    a = merge_tensors("cart", xs, tensor_name="layers.0.mlp.fc1.weight", seed=1)
    b = merge_tensors("cart", xs, tensor_name="layers.0.mlp.fc1.weight", seed=1)
    c = merge_tensors("cart", xs, tensor_name="layers.0.mlp.fc1.weight", seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # another sketch: close, not identical
    assert float(torch.linalg.norm(a - c) / torch.linalg.norm(a)) < 1e-2


def test_engine_merge_matches_per_tensor_reference(tmp_path, family_fp32):
    _, fts = family_fp32
    doc = {
        "merge_method": "cart",
        "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in fts],
        "parameters": {"rank_ratio": [0.05, 0.2], "svd": "exact", "lambda": 1.2},
    }
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        plan = fastmerge.plan(doc)
    assert any("weight" in str(x.message) and "not used" in str(x.message) for x in w)  # CART averages uniformly
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastmerge.merge(doc, out, progress=False)
    from safetensors import safe_open

    from fastmerge.io.reader import ModelReader

    merged = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            merged.update({k: h.get_tensor(k) for k in h.keys()})
    readers = [ModelReader(ix) for ix in plan.indexes.values()]
    n_low = 0
    for tp in plan.tensors:
        xs = [next(r for r in readers if r.index.tensors.get(tp.name) is s).get(s) for s in tp.sources]
        want = ref(xs, None, tp.params)
        n_low += int(tp.params.selected and len(tp.shape) == 2)
        assert torch.equal(merged[tp.name], want.to(merged[tp.name].dtype)), tp.name
    assert n_low == 3 * 7  # 3 layers × (q, k, v, o, gate, up, down)
    # the gradient reached the tensors: layer 0 at 0.05, layer 2 (the last) at 0.2
    by_name = {t.name: t for t in plan.tensors}
    assert by_name["model.layers.0.mlp.up_proj.weight"].params.rank_ratio == pytest.approx(0.05)
    assert by_name["model.layers.2.mlp.up_proj.weight"].params.rank_ratio == pytest.approx(0.2)
