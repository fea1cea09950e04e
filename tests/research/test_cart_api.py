"""fastmerge.research.cart: reverse-order truncation and routing against explicit formulas (paper §4.2), state
dicts, CART++ (``adapt``) on a tiny MLP, and the rank sweep end to end on a generated family."""

import warnings

import pytest
import torch
import yaml

import fastmerge
from fastmerge.research import cart
from fastmerge.errors import ConfigError, OutputError
from fastmerge.ops.randomized_svd import centered_factors, target_rank


def embed(diag, m=2, n=3):
    out = torch.zeros(m, n)
    for i, d in enumerate(diag):
        out[i, i] = d
    return out


A = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
DELTAS = [embed([3.0, 1.0]), embed([-1.0, -2.0]), embed([-2.0, 1.0])]  # Σ = 0: A is the weight average
XS = [A + d for d in DELTAS]


def close(a, b, tol=1e-5):
    return (a - b).abs().max() <= tol


# --------------------------------------------------------------------------------------------
# reverse order and routing


def test_reverse_order_by_hand():
    # the smallest of the 2 singular triplets: diag(0, 1), diag(−1, 0), diag(0, 1) → sum diag(−1, 2)
    got = cart.merge(XS, rank=1, order="reverse", lam=0.5)
    assert close(got, A + 0.5 * embed([-1.0, 2.0]))
    # top order for comparison: diag(3, 0) + diag(0, −2) + diag(−2, 0) = diag(1, −2)
    assert close(cart.merge(XS, rank=1, svd="exact"), A + embed([1.0, -2.0]))


def test_reverse_order_against_explicit_formula():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(23, 31, generator=g) for _ in range(4)]
    avg = sum(xs) / 4
    k, lam = 5, 1.3
    want = avg.clone()
    for x in xs:
        u, s, vh = torch.linalg.svd(x - avg, full_matrices=False)
        want += lam * (u[:, -k:] @ torch.diag(s[-k:]) @ vh[-k:])  # the k LOWEST of all 23 triplets
    assert close(cart.merge(xs, rank=k, order="reverse", lam=lam), want, 1e-4)
    # top-k and reverse-(r−k) split each Δ_t exactly, and Σ_t Δ_t = 0, so their updates cancel
    top = cart.merge(xs, rank=k, svd="exact") - avg
    rev = cart.merge(xs, rank=23 - k, order="reverse") - avg
    assert close(top, -rev, 1e-4)


def test_routing_by_hand_and_against_formula():
    # centered at θ_avg = A: R(t) = A + SVD_1(Δ_t)
    routed = cart.route(XS, rank=1, svd="exact")
    for r, d in zip(routed, [embed([3.0, 0.0]), embed([0.0, -2.0]), embed([-2.0, 0.0])]):
        assert close(r, A + d)
    # at θ_0 = base: x_t − base = diag(2.5, 1), diag(−1.5, −2), diag(−2.5, 1)
    base = A + embed([0.5, 0.0])
    routed = cart.route(XS, base=base, rank=1, svd="exact")
    for r, d in zip(routed, [embed([2.5, 0.0]), embed([0.0, -2.0]), embed([-2.5, 0.0])]):
        assert close(r, base + d)
    rev = cart.route(XS, rank=1, order="reverse")
    for r, d in zip(rev, [embed([0.0, 1.0]), embed([-1.0, 0.0]), embed([0.0, 1.0])]):
        assert close(r, A + d)
    # random: R_k(t; θ_0) = θ_0 + U_k S_k V_kᵀ of (θ_t − θ_0)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(20, 26, generator=g) for _ in range(3)]
    b = torch.randn(20, 26, generator=g)
    for r, x in zip(cart.route(xs, base=b, rank_ratio=0.2, svd="exact"), xs):
        u, s, vh = torch.linalg.svd(x - b, full_matrices=False)
        assert close(r, b + u[:, :4] @ torch.diag(s[:4]) @ vh[:4], 1e-4)


def test_option_errors():
    with pytest.raises(ConfigError, match="svd='exact'"):
        cart.merge(XS, rank=1, order="reverse", svd="randomized")
    with pytest.raises(ConfigError, match="order"):
        cart.merge(XS, rank=1, order="bottom")
    with pytest.raises(ConfigError, match="energy"):
        cart.route(XS, energy=0.5, order="reverse")
    with pytest.raises(ConfigError, match="rank_ratio"):
        cart.merge(XS, rank_ratio=2.0)


def test_state_dicts():
    g = torch.Generator().manual_seed(2)
    sds = [{
        "layers.0.mlp.fc1.weight": torch.randn(12, 20, generator=g).bfloat16(),
        "layers.0.mlp.fc1.bias": torch.randn(12, generator=g),
        "embed.weight": torch.randn(30, 12, generator=g),
    } for _ in range(3)]
    merged = cart.merge_state_dicts(sds, rank=2, svd="exact")
    xs = [sd["layers.0.mlp.fc1.weight"] for sd in sds]
    assert merged["layers.0.mlp.fc1.weight"].dtype == torch.bfloat16
    assert torch.equal(merged["layers.0.mlp.fc1.weight"], cart.merge(xs, rank=2, svd="exact").bfloat16())
    for key in ("layers.0.mlp.fc1.bias", "embed.weight"):  # not low-rank: the plain average
        assert close(merged[key], sum(sd[key] for sd in sds) / 3, 1e-6)
    routed = cart.route_state_dicts(sds, rank=2, svd="exact")
    for t, sd in enumerate(routed):
        assert torch.equal(sd["embed.weight"], sds[t]["embed.weight"])  # dense task weights kept
        want = cart.route(xs, rank=2, svd="exact")[t].bfloat16()
        assert torch.equal(sd["layers.0.mlp.fc1.weight"], want)


# --------------------------------------------------------------------------------------------
# CART++


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def mlp_tasks():
    torch.manual_seed(0)
    module = MLP()
    sds = [{k: v.detach() + 0.3 * torch.randn_like(v) for k, v in module.state_dict().items()} for _ in range(3)]
    return module, sds, [torch.randn(64, 16) for _ in range(2)]


def test_factorize_and_adapt_without_steps(mlp_tasks):
    module, sds, batches = mlp_tasks
    factors = cart.factorize(sds, rank_ratio=0.25, svd="exact")
    assert set(factors.left) == {"fc1.weight", "fc2.weight"}  # 2-D and named fc1/fc2; biases averaged
    assert factors.left["fc1.weight"].shape == (3, 32, 4) and factors.right["fc2.weight"].shape == (3, 32, 1)
    res = cart.adapt(module, factors, batches, steps=0, init=0.7)
    assert res.lambdas.shape == (2, 3) and torch.all(res.lambdas == 0.7)
    want = cart.merge_state_dicts(sds, rank_ratio=0.25, svd="exact", lam=0.7)
    got = res.state_dict()
    for k in want:
        assert close(got[k], want[k], 1e-5), k


def test_adapt_lowers_entropy_and_leaves_module_alone(mlp_tasks):
    module, sds, batches = mlp_tasks
    before = {k: v.clone() for k, v in module.state_dict().items()}
    factors = cart.factorize(sds, rank_ratio=0.25, svd="exact")
    res = cart.adapt(module, factors, batches, steps=40, lr=0.05)
    assert res.losses[-1] < res.losses[0] - 1e-3
    assert not torch.all(res.lambdas == 1.0)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    # the learned merged model really has the lower entropy
    from torch.func import functional_call

    x = torch.cat(batches)
    h = lambda sd: float(cart.entropy_loss(functional_call(module, sd, (x,))))  # noqa: E731
    assert h(res.state_dict()) < h(factors.merged(1.0))
    assert cart.adapt(module, factors, batches, steps=1, granularity="task").lambdas.shape == (1, 3)


def test_adapt_gradient_matches_finite_differences(mlp_tasks):
    module, sds, batches = mlp_tasks
    factors = cart.factorize(sds, rank_ratio=0.25, svd="exact")
    res = cart.adapt(module, factors, batches[:1], steps=1, lr=1.0, optimizer="sgd", init=1.0)
    grad = 1.0 - res.lambdas  # one SGD step of size 1 from λ = 1
    from torch.func import functional_call

    def loss(lam):
        sd = factors.merged({n: lam[res.groups[n]] for n in res.groups})
        return float(cart.entropy_loss(functional_call(module, sd, (batches[0],))))

    eps = 1e-2
    base = torch.ones_like(res.lambdas)
    for g in range(grad.shape[0]):
        for t in range(grad.shape[1]):
            hi, lo = base.clone(), base.clone()
            hi[g, t] += eps
            lo[g, t] -= eps
            fd = (loss(hi) - loss(lo)) / (2 * eps)
            assert abs(fd - float(grad[g, t])) <= 1e-3 + 2e-2 * abs(fd), (g, t, fd, float(grad[g, t]))


# --------------------------------------------------------------------------------------------
# rank sweep


def _load(d):
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _doc(fts, **params):
    return {"merge_method": "cart", "models": [{"model": str(f)} for f in fts], "parameters": params}


def test_rank_sweep_matches_single_merges(tmp_path, family_fp32):
    _, fts = family_fp32
    ratios = [0.05, 0.25]
    rep = cart.rank_sweep(_doc(fts, svd="exact", **{"lambda": 1.5}), tmp_path / "sweep", ratios, progress=False)
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["rank-0.05", "rank-0.25"]
    assert rep.lowrank_tensors == 21 and rep.tensors == 3 * 9 + 3
    for r in ratios:
        d = tmp_path / "sweep" / f"rank-{r:g}"
        single = tmp_path / f"single-{r}"
        fastmerge.merge(_doc(fts, svd="exact", rank_ratio=r, **{"lambda": 1.5}), single, progress=False)
        a, b = _load(d), _load(single)
        assert a.keys() == b.keys()
        for k in a:  # exact SVD: the top-k factors of one SVD are the factors of any smaller k
            # (the sweep sums them in one GEMM, the spec task by task: fp32 rounding apart)
            assert float((a[k] - b[k]).abs().max()) <= 1e-5 * float(b[k].abs().max()), (r, k)
        assert yaml.safe_load((d / "fastmerge_config.yml").read_text())["parameters"]["rank_ratio"] == r
        assert (d / "config.json").is_file()
    # randomized (the default): one sketch per matrix at the largest k, each output from its leading columns
    doc = _doc(fts, rank_ratio=0.5)  # the sweep replaces rank_ratio
    cart.rank_sweep(doc, tmp_path / "rsweep", [0.1, 0.2], progress=False)
    plan = fastmerge.plan(doc)
    name = "model.layers.1.self_attn.o_proj.weight"
    tp = next(t for t in plan.tensors if t.name == name)
    from fastmerge.io.reader import ModelReader

    xs = [ModelReader(ix).get(ix.tensors[name]) for ix in plan.indexes.values()]
    f = centered_factors(xs, target_rank(xs[0].shape, 0.2), seed=tp.params.seed)
    for r in (0.1, 0.2):
        got = _load(tmp_path / "rsweep" / f"rank-{r:g}")[name]
        assert torch.equal(got, f.reconstruct(1.0, target_rank(xs[0].shape, r)).to(got.dtype)), r


def test_rank_sweep_errors(tmp_path, family_fp32):
    _, fts = family_fp32
    with pytest.raises(ConfigError, match="in \\[0, 1\\]"):
        cart.rank_sweep(_doc(fts), tmp_path / "o", [0.1, 1.5], progress=False)
    with pytest.raises(ConfigError, match="twice"):
        cart.rank_sweep(_doc(fts), tmp_path / "o", [0.1, 0.1], progress=False)
    with pytest.raises(ConfigError, match="remove 'rank'"):
        cart.rank_sweep(_doc(fts, rank=4), tmp_path / "o", [0.1], progress=False)
    with pytest.raises(ConfigError, match="no rank ratios"):
        cart.rank_sweep(_doc(fts), tmp_path / "o", [], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = {"merge_method": "linear", "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in fts]}
    with pytest.raises(ConfigError, match="merge_method must be 'cart'"):
        cart.rank_sweep(lin, tmp_path / "o", [0.1], progress=False)
    (tmp_path / "o" / "rank-0.1").mkdir(parents=True)
    with pytest.raises(OutputError, match="exists"):
        cart.rank_sweep(_doc(fts), tmp_path / "o", [0.1], progress=False)
    assert list((tmp_path / "o").iterdir()) == [tmp_path / "o" / "rank-0.1"]  # nothing half-written left
