"""FS-Merge SuperNets: fold == merged stream, exact initialisations, parameter counts, where gradients go.

The folded model is run through ``spec.forward`` (the plain architecture, checked against the lab's
TinyViT module and, where installed, Hugging Face's CLIP / BERT), the SuperNet through its own factor
arithmetic; they agree to fp32 rounding for random (non-initial) M, U and LayerNorms.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastmerge.research.fsmerge import (BertSpec, MLPSpec, ViTSpec, ViTSuperNet, build_supernet, canonical_fp32,
                               expected_learnable, features, fold, fold_linear)
from fastmerge.research.fsmerge.arch import TIMM_VIT
from fastmerge.research.fsmerge import supernet as supernet_mod
from fastmerge.research.fsmerge.supernet import BertSuperNet, Factor, MLPSuperNet
from fastmerge.research.lab.models import TinyViT
from fsm_models import bert_inputs, bert_sd, mlp_sd, perturb, vit_sd

RANKS = [0, 2, "full"]


@pytest.fixture(params=["factors", "dense"])
def apply(request, monkeypatch):
    """Both ways a diagonal + low-rank factor is applied: as factors (wide layers) and through its dense
    blocks (layers up to ``DENSE_APPLY_MAX_D`` wide): the tests' layers are tiny, so force each."""
    monkeypatch.setattr(supernet_mod, "DENSE_APPLY_MAX_D", 0 if request.param == "factors" else 10**9)
    return request.param


def _folded_features(spec, sds, sn, x):
    return features(spec, canonical_fp32(spec, fold(sn, sds).state_dict), x)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    # fp32 rounding of a few chained GEMMs on O(1) values: 1e-5 relative to the output scale
    a, b = a.detach(), b.detach()
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= rel * scale, float((a - b).abs().max())


def _check_fold(spec, sds, sn, x) -> None:
    """The saved (fp32) fold against the fp32 SuperNet, and the float64 fold against the float64
    SuperNet: the identity itself, with no rounding to hide behind (1e-10 relative)."""
    _close(_folded_features(spec, sds, sn, x), sn(x)[0])
    sn64 = copy.deepcopy(sn).double()
    x64 = {k: v for k, v in x.items()} if isinstance(x, dict) else x.double()
    _close(features(spec, sn64.fold_canonical(), x64), sn64(x64)[0], rel=1e-10)


def _scale(rank) -> float:
    # dense d×d blocks perturbed entry-wise grow like √d: a third of the diagonal/low-rank scale
    return 0.1 if rank == "full" else 0.3


# --------------------------------------------------------------------------------------- fold == SuperNet


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("n", [2, 3])
def test_mlp_fold_equals_supernet(rank, n, apply):
    sds = [mlp_sd(s) for s in range(n)]
    spec = MLPSpec.from_state_dict(sds[0])
    sn = build_supernet(spec, sds, rank=rank, init="random", seed=1)
    perturb(sn, 2, _scale(rank))
    x = torch.randn(7, 10)
    assert sn(x)[1].shape == (7, n, 9)
    _check_fold(spec, sds, sn, x)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("n", [2, 3])
def test_vit_fold_equals_supernet(rank, n, apply):
    sds = [vit_sd(s) for s in range(n)]
    spec = ViTSpec.from_state_dict(sds[0], heads=3, patch=2)
    sn = build_supernet(spec, sds, rank=rank, init="first")
    perturb(sn, 3, _scale(rank))
    x = torch.randn(4, 1, 8, 8)
    g, rec = sn(x)
    assert rec.shape == (4, n, 12)
    _check_fold(spec, sds, sn, x)
    # and the folded state dict runs in the lab's own module, heads kept from model 1
    m = TinyViT(image=8, patch=2, dim=12, depth=2, heads=3, mlp_ratio=2.0, n_classes=5)
    folded = fold(sn, sds)
    assert sorted(folded.dropped) == ["head.bias", "head.weight"]
    m.load_state_dict({**folded.state_dict, "head.weight": sds[0]["head.weight"], "head.bias": sds[0]["head.bias"]})
    with torch.no_grad():
        _close(m.features(x), g)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("n", [2, 3])
def test_bert_fold_equals_supernet(rank, n, apply):
    sds = [bert_sd(s) for s in range(n)]
    spec = BertSpec.from_state_dict(sds[0], heads=3)
    sn = build_supernet(spec, sds, rank=rank, init="first")
    perturb(sn, 4, _scale(rank))
    x = bert_inputs(5)
    assert sn(x)[1].shape == (3, n, 12)
    _check_fold(spec, sds, sn, x)


def test_bert_values_use_m_v_not_m_k():
    # the official BERT code applies M_k to the values in the forward but folds M_v (spec §2.4): with
    # M_k != M_v that breaks fold == SuperNet, so make them differ wildly and check the two streams agree
    sds = [bert_sd(s) for s in range(2)]
    spec = BertSpec.from_state_dict(sds[0], heads=3)
    sn = build_supernet(spec, sds, rank=0, init="first")
    with torch.no_grad():
        sn.f("b0_m_v").diag.mul_(-3.0)
    _check_fold(spec, sds, sn, bert_inputs(6))


@pytest.mark.parametrize("kind", ["merge", "unmerge"])
@pytest.mark.parametrize("rank", [0, 3])
def test_factor_paths_agree(kind, rank, monkeypatch):
    # Σ_k x_k ⊙ m^k + (x A) B (the factor path) == x · blocks (the dense path), values and gradients
    f = Factor(kind, 3, 6, rank)
    perturb(f, 1, 1.0)
    x = torch.randn(4, 3, 6) if kind == "merge" else torch.randn(4, 6)
    outs, grads = [], []
    for limit in (0, 10**9):
        monkeypatch.setattr(supernet_mod, "DENSE_APPLY_MAX_D", limit)
        f.zero_grad()
        y = f(x)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outs.append(y.detach())
        grads.append([p.grad.clone() for p in f.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    blocks = f.blocks().float()
    ref = sum(x[:, k] @ blocks[k] for k in range(3)) if kind == "merge" else torch.stack([x @ blocks[k] for k in range(3)], 1)
    torch.testing.assert_close(outs[0], ref, rtol=1e-5, atol=1e-5)


def test_fold_linear_by_hand():
    # n = 2, 1x1 "layers": W* = M_1 W_1 U_1 + M_2 W_2 U_2, b* = b_1 M_1 + b_2 M_2
    w = torch.tensor([[[2.0]], [[3.0]]])
    b = torch.tensor([[1.0], [-1.0]])
    m = torch.tensor([[[0.5]], [[0.25]]])
    u = torch.tensor([[[4.0]], [[2.0]]])
    wf, bf = fold_linear(w, b, m, u)
    assert wf.item() == 0.5 * 2 * 4 + 0.25 * 3 * 2 and bf.item() == 0.5 - 0.25


def test_theorem_h3_any_target_is_reachable():
    # App. H, Thm H.3(1): with W_A invertible, M = (W* W_A^{-1}, 0), U = (I; I) folds to any W*
    g = torch.Generator().manual_seed(0)
    wa, wb, target = (torch.randn(5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    m = torch.stack([(target @ torch.linalg.inv(wa)).T, torch.zeros(5, 5, dtype=torch.float64)])
    u = torch.eye(5, dtype=torch.float64).expand(2, 5, 5)
    wf, _ = fold_linear(torch.stack([wa, wb]), None, m, u)
    torch.testing.assert_close(wf, target, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------- initialisations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["mlp", "vit", "bert"])
def test_first_init_folds_to_model_one_exactly(arch, dtype):
    if arch == "mlp":
        sds = [mlp_sd(s, dtype=dtype) for s in range(3)]
        spec, rank = MLPSpec.from_state_dict(sds[0]), "full"
    elif arch == "vit":
        sds = [vit_sd(s, dtype=dtype) for s in range(3)]
        spec, rank = ViTSpec.from_state_dict(sds[0], heads=3, patch=2), 2
    else:
        sds = [{k: v.to(dtype) for k, v in bert_sd(s).items()} for s in range(3)]
        spec, rank = BertSpec.from_state_dict(sds[0], heads=3), 2
    folded = fold(build_supernet(spec, sds, rank=rank, init="first"), sds)
    for k, v in folded.state_dict.items():
        assert v.dtype == sds[0][k].dtype and torch.equal(v, sds[0][k]), k
    for u in folded.unmerge:
        assert torch.equal(u, torch.eye(u.shape[0]))


def test_first_init_anchor_picks_the_model():
    sds = [vit_sd(s) for s in range(3)]
    spec = ViTSpec.from_state_dict(sds[0], heads=3, patch=2)
    folded = fold(build_supernet(spec, sds, rank=1, init="first", anchor=2), sds)
    assert all(torch.equal(v, sds[2][k]) for k, v in folded.state_dict.items() if not k.startswith("head"))


def test_first_init_reconstructs_model_one_everywhere():
    # the SuperNet output at "first" init is (f¹, f¹, …): every task block holds model 1's features
    sds = [vit_sd(s) for s in range(2)]
    spec = ViTSpec.from_state_dict(sds[0], heads=3, patch=2)
    sn = build_supernet(spec, sds, rank=2, init="first")
    x = torch.randn(3, 1, 8, 8)
    f1 = features(spec, canonical_fp32(spec, sds[0]), x)
    _, rec = sn(x)
    _close(rec[:, 0], f1)
    _close(rec[:, 1], f1)


def test_average_init_folds_to_the_weight_average():
    sds = [mlp_sd(s) for s in range(2)]
    spec = MLPSpec.from_state_dict(sds[0])
    folded = fold(build_supernet(spec, sds, rank=0, init="average"), sds)
    for k, v in folded.state_dict.items():
        torch.testing.assert_close(v, (sds[0][k] + sds[1][k]) / 2, rtol=0, atol=1e-7)


def test_merging_a_model_with_itself_returns_it():
    sd = vit_sd(7)
    spec = ViTSpec.from_state_dict(sd, heads=3, patch=2)
    for init in ("first", "average"):
        folded = fold(build_supernet(spec, [sd, sd], rank=2, init=init), [sd, sd])
        for k, v in folded.state_dict.items():
            # average: (w + w)/2 in float64 is w exactly
            assert torch.equal(v, sd[k]), (init, k)
        assert folded.dropped == []  # the heads agree too, so they are kept


# --------------------------------------------------------------------------------------- counts and gradients


def _meta_vit_b16(n: int, rank: int) -> ViTSuperNet:
    d, dff, depth, t, d_out = 768, 3072, 12, 197, 512
    c = {"patch.w": torch.empty(d, 3 * 16 * 16, device="meta"), "cls": torch.empty(d, device="meta"),
         "pos": torch.empty(t, d, device="meta"), "proj.w": torch.empty(d_out, d, device="meta")}
    for ln in ["ln_pre", "ln_post"] + [f"b{i}.ln{j}" for i in range(depth) for j in (1, 2)]:
        c[f"{ln}.w"] = c[f"{ln}.b"] = torch.empty(d, device="meta")
    for i in range(depth):
        for x in ("q", "k", "v", "o"):
            c[f"b{i}.{x}.w"], c[f"b{i}.{x}.b"] = torch.empty(d, d, device="meta"), torch.empty(d, device="meta")
        c[f"b{i}.fc1.w"], c[f"b{i}.fc1.b"] = torch.empty(dff, d, device="meta"), torch.empty(dff, device="meta")
        c[f"b{i}.fc2.w"], c[f"b{i}.fc2.b"] = torch.empty(d, dff, device="meta"), torch.empty(d, device="meta")
    spec = ViTSpec(dim=d, depth=depth, heads=12, patch=16, act="quick_gelu", layout="hf_clip")
    return ViTSuperNet(spec, [c] * n, rank)


@pytest.mark.parametrize("n,rank,millions", [(4, 32, 60.03), (3, 28, 42.06), (2, 16, 18.16), (4, 0, 0.64)])
def test_vit_b16_learnable_counts_match_the_paper(n, rank, millions):
    # spec §2.5 (paper Tables 7, 17, 19): 60.03M, 42.06M, 18.16M, and 0.64M for the diagonal
    sn = _meta_vit_b16(n, rank)
    count = sn.n_learnable()
    assert round(count / 1e6, 2) == millions
    assert count == expected_learnable("vit", n, 768, 12, rank, d_ff=3072, d_out=512)
    assert len(sn.factors) == 1 + 10 * 12 + 3 and len(sn.norms) == 2 * 12 + 2
    # frozen: n copies of the ViT-B-16 backbone, never learnable
    assert sn.n_frozen() > n * 85_000_000


def test_factor_counts_by_formula():
    # App. C: a square layer of width d costs 2(n·r·d + n·d + r·d) learnable (M and U) with low rank,
    # 2·n·d² full
    n, d, r = 3, 10, 4
    assert Factor("merge", n, d, r).n_params() + Factor("unmerge", n, d, r).n_params() == 2 * (n * r * d + n * d + r * d)
    assert Factor("merge", n, d, "full").n_params() + Factor("unmerge", n, d, "full").n_params() == 2 * n * d * d
    sds = [mlp_sd(s) for s in range(2)]
    sn = build_supernet(MLPSpec.from_state_dict(sds[0]), sds, rank="full", init="random")
    assert sn.n_learnable() == sum(2 * 2 * w * w for w in (16, 12, 9))


def test_bert_count_formula():
    sds = [bert_sd(s) for s in range(2)]
    sn = build_supernet(BertSpec.from_state_dict(sds[0], heads=3), sds, rank=2, init="first")
    assert isinstance(sn, BertSuperNet)
    # hidden rank r·d_ff/d = 2·20/12 -> 3 (rounded), the formula uses the same integer
    assert sn.f("b0_m_1").rank == 3
    assert sn.n_learnable() == expected_learnable("bert", 2, 12, 2, 2, d_ff=20) + 2 * 2 * (3 * (2 * 20 + 20) - 2 * 20 // 12 * (2 * 20 + 20))


@pytest.mark.parametrize("arch", ["mlp", "vit", "bert"])
def test_gradients_reach_only_factors_and_layernorms(arch):
    if arch == "mlp":
        sds = [mlp_sd(s) for s in range(2)]
        sn, x = build_supernet(MLPSpec.from_state_dict(sds[0]), sds, rank=2, init="first"), torch.randn(5, 10)
    elif arch == "vit":
        sds = [vit_sd(s) for s in range(2)]
        sn, x = build_supernet(ViTSpec.from_state_dict(sds[0], heads=3, patch=2), sds, rank=2, init="first"), torch.randn(5, 1, 8, 8)
    else:
        sds = [bert_sd(s) for s in range(2)]
        sn, x = build_supernet(BertSpec.from_state_dict(sds[0], heads=3), sds, rank=2, init="first"), bert_inputs(1)
    perturb(sn, 9, 0.05)
    _, rec = sn(x)
    rec.square().sum().backward()
    names = [n for n, _ in sn.named_parameters()]
    assert names and all(n.startswith(("factors.", "norms.")) for n in names)
    for n, p in sn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    for n, b in sn.named_buffers():
        assert not b.requires_grad and b.grad is None, n
    assert isinstance(sn, (MLPSuperNet, ViTSuperNet, BertSuperNet))


def test_routing_sends_no_gradient_to_other_tasks_blocks():
    from fastmerge.research.fsmerge.train import make_targets

    sds = [vit_sd(s) for s in range(2)]
    spec = ViTSpec.from_state_dict(sds[0], heads=3, patch=2)
    sn = build_supernet(spec, sds, rank=2, init="first")
    perturb(sn, 1, 0.05)
    x = torch.randn(4, 1, 8, 8)
    tg = make_targets(spec, [canonical_fp32(spec, s) for s in sds], [x, x[:0]], routed=True)
    assert tg.task.tolist() == [0, 0, 0, 0]
    idx = torch.arange(4)
    tg.loss(sn(x)[1], idx).backward()
    u = sn.f("u_final")
    assert u.diag.grad[1].abs().max() == 0 and u.b.grad[:, 1].abs().max() == 0
    assert u.diag.grad[0].abs().max() > 0


# --------------------------------------------------------------------------------------- layouts, errors


def test_layout_roundtrip_keeps_keys_shapes_dtypes():
    sd = vit_sd(1, dtype=torch.bfloat16)
    spec = ViTSpec.from_state_dict(sd, heads=3, patch=2)
    canon = spec.to_canonical(sd)
    assert canon["b0.q.w"].shape == (12, 12) and canon["cls"].shape == (12,) and canon["pos"].shape == (17, 12)
    back = TIMM_VIT.from_canonical(canon, sd, 2)
    assert set(back) == set(sd) - {"head.weight", "head.bias"}
    assert all(torch.equal(back[k], sd[k]) and back[k].dtype == torch.bfloat16 for k in back)


def test_hf_layouts_match_transformers():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                              image_size=8, patch_size=2, num_channels=3, projection_dim=12, hidden_act="quick_gelu")
    clip = [tr.CLIPVisionModelWithProjection(cfg).eval() for _ in range(2)]
    sds = [m.state_dict() for m in clip]
    spec = ViTSpec.from_state_dict(sds[0], heads=4, patch=2, layout="hf_clip", eps=cfg.layer_norm_eps, act="quick_gelu")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        _close(features(spec, canonical_fp32(spec, sds[0]), x), clip[0](pixel_values=x).image_embeds)
    sn = build_supernet(spec, sds, rank=2, init="first")
    perturb(sn, 2)
    clip[0].load_state_dict(fold(sn, sds).state_dict)  # strict: every key, the original shapes
    with torch.no_grad():
        _close(clip[0](pixel_values=x).image_embeds, sn(x)[0])

    bc = tr.BertConfig(vocab_size=23, hidden_size=12, num_hidden_layers=2, num_attention_heads=3, intermediate_size=20,
                       max_position_embeddings=11)
    bert = tr.BertModel(bc).eval()
    bsd = bert.state_dict()
    bspec = BertSpec.from_state_dict(bsd, heads=3)
    inp = bert_inputs(3)
    with torch.no_grad():
        _close(features(bspec, canonical_fp32(bspec, bsd), inp), bert(**inp).pooler_output)


def test_errors():
    sds = [mlp_sd(s) for s in range(2)]
    spec = MLPSpec.from_state_dict(sds[0])
    with pytest.raises(ValueError, match="unknown init"):
        build_supernet(spec, sds, init="best")
    with pytest.raises(ValueError, match="rank"):
        build_supernet(spec, sds, rank=-1)
    with pytest.raises(ValueError, match="MLPs only"):
        v = [vit_sd(s) for s in range(2)]
        build_supernet(ViTSpec.from_state_dict(v[0], heads=3, patch=2), v, rank="full", init="zipit", data=torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="rank='full'"):
        build_supernet(spec, sds, rank=2, init="zipit", data=torch.randn(4, 10))
    with pytest.raises(ValueError, match="'l1.w' is"):
        build_supernet(spec, [sds[0], mlp_sd(3, dims=(10, 16, 13, 9))])
    with pytest.raises(ValueError, match="anchor"):
        build_supernet(spec, sds, anchor=2)
