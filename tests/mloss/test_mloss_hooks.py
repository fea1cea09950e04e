"""M-Loss and M-TIES on torch modules: a small MLP, a gated MLP and a tiny transformer; base and
progressive modes against inputs computed by hand (explicit sub-module calls)."""

import copy

import pytest
import torch

from fastmerge.errors import ConfigError
from fastmerge.mloss import Target, find_targets, mloss_reference, module_mloss
from fastmerge.mloss.mties import m_ties_modules, m_ties_tensors

nn = torch.nn


def finetunes(base, n=3, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
        out.append(m)
    return out


def averaged(models, alpha=None):
    alpha = alpha or [1 / len(models)] * len(models)
    m = copy.deepcopy(models[0])
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(sum(a * dict(x.named_parameters())[name] for a, x in zip(alpha, models)))
    return m


def stack(models, name, attr="weight"):
    return torch.stack([getattr(dict(m.named_modules())[name], attr).detach() for m in models])


def close(a, b):
    for st in ("abs", "sq", "norm"):
        torch.testing.assert_close(a.node(st), b.node(st), rtol=1e-5, atol=1e-7)
    assert a.layer == pytest.approx(b.layer, rel=1e-5) and a.samples == b.samples


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))


# ------------------------------------------------------------------------------------------------
# MLP


def test_find_targets_mlp():
    assert find_targets(mlp(), torch.randn(2, 12)) == [Target("0", "gelu"), Target("2", "relu")]


def test_mlp_base_mode_by_hand():
    base = mlp()
    fts = finetunes(base)
    x = torch.randn(9, 12)
    res = module_mloss(fts, [x], base=base, mode="base")
    close(res.losses["0"], mloss_reference(x, stack(fts, "0"), stack(fts, "0", "bias"), act="gelu"))
    x2 = base[1](base[0](x)).detach()  # the pretrained model's input to layer 2
    close(res.losses["2"], mloss_reference(x2, stack(fts, "2"), stack(fts, "2", "bias"), act="relu"))


def test_mlp_progressive_mode_by_hand_and_batches_add():
    base = mlp()
    fts = finetunes(base)
    xs = [torch.randn(5, 12), torch.randn(7, 12)]
    res = module_mloss(fts, xs, base=base, mode="progressive")
    avg = averaged(fts)
    x = torch.cat(xs)
    close(res.losses["0"], mloss_reference(x, stack(fts, "0"), stack(fts, "0", "bias"), act="gelu"))
    x2 = avg[1](avg[0](x)).detach()  # layer 0 merged (averaged) before layer 2's input is taken
    close(res.losses["2"], mloss_reference(x2, stack(fts, "2"), stack(fts, "2", "bias"), act="relu"))
    assert res.losses["2"].samples == 12


def test_gated_mlp_target():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(8, 14, bias=False), nn.Linear(8, 14, bias=False), nn.Linear(14, 8)

        def forward(self, x):
            return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    torch.manual_seed(1)
    base = Gated()
    fts = finetunes(base, scale=0.2)
    x = torch.randn(11, 8)
    t = Target("gate", "silu", up="up")
    res = module_mloss(fts, [x], [t], base=base, alpha=[0.2, 0.3, 0.5])
    want = mloss_reference(x, stack(fts, "gate"), alpha=[0.2, 0.3, 0.5], act="gated_silu", up_weight=stack(fts, "up"))
    close(res.losses["gate"], want)
    assert find_targets(base, x) == []  # functional silu: targets must be given


# ------------------------------------------------------------------------------------------------
# a tiny transformer (CLIP-like blocks: LN → attention → LN → c_fc → QuickGELU → c_proj)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.c_fc, self.act, self.c_proj = nn.Linear(d, 40), QuickGELU(), nn.Linear(40, d)

    def mlp_input(self, h):
        n = self.ln_1(h)
        h = h + self.attn(n, n, n, need_weights=False)[0]
        return h, self.ln_2(h)

    def forward(self, h):
        h, x = self.mlp_input(h)
        return h + self.c_proj(self.act(self.c_fc(x)))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.pos = nn.Parameter(0.1 * torch.randn(6, 16))  # a non-leaf parameter (ViT's positional embedding)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, ids):
        h = self.emb(ids) + self.pos[: ids.shape[1]]
        for b in self.blocks:
            h = b(h)
        return h


def tiny():
    torch.manual_seed(2)
    return Tiny().eval()


def test_tiny_transformer_base_mode_by_hand():
    base = tiny()
    fts = finetunes(base, scale=0.05)
    ids = torch.randint(0, 30, (4, 6))
    targets = find_targets(base, ids)
    assert targets == [Target("blocks.0.c_fc", "quick_gelu"), Target("blocks.1.c_fc", "quick_gelu")]
    res = module_mloss(fts, [ids], base=base, mode="base")
    with torch.no_grad():
        h = base.emb(ids) + base.pos
        x0 = base.blocks[0].mlp_input(h)[1]
        x1 = base.blocks[1].mlp_input(base.blocks[0](h))[1]
    for name, x in (("blocks.0.c_fc", x0), ("blocks.1.c_fc", x1)):
        want = mloss_reference(x.reshape(-1, 16), stack(fts, name), stack(fts, name, "bias"), act="quick_gelu")
        close(res.losses[name], want)
        assert res.losses[name].samples == 24  # tokens are samples


def test_tiny_transformer_progressive_equals_base_mode_on_the_average():
    # progressive with the default merge (α-average) feeds every target the averaged model's input
    base = tiny()
    fts = finetunes(base, scale=0.05)
    ids = torch.randint(0, 30, (3, 6))
    alpha = [0.5, 0.25, 0.25]
    prog = module_mloss(fts, [ids], base=base, mode="progressive", alpha=alpha)
    ref = module_mloss(fts, [ids], base=averaged(fts, alpha), mode="base", alpha=alpha)
    for name in ("blocks.0.c_fc", "blocks.1.c_fc"):
        close(prog.losses[name], ref.losses[name])
    # and the second block differs from base mode on the pretrained model
    basem = module_mloss(fts, [ids], base=base, mode="base", alpha=alpha)
    assert prog.losses["blocks.1.c_fc"].layer != pytest.approx(basem.losses["blocks.1.c_fc"].layer, rel=1e-3)


# ------------------------------------------------------------------------------------------------
# M-TIES on modules


def test_m_ties_modules_base_mode_few_layers_by_hand():
    base = mlp()
    fts = finetunes(base)
    x = torch.randn(10, 12)
    res = m_ties_modules(base, fts, [x], density=0.7, epsilon=0.2, layers=["0"], mode="base")
    sd = res.merged
    bp = dict(base.named_parameters())
    src = lambda n: [dict(m.named_parameters())[n].detach() for m in fts]  # noqa: E731
    loss0 = res.losses["0"].node("sq")
    assert torch.equal(sd["0.weight"], m_ties_tensors(src("0.weight"), bp["0.weight"].detach(), row_loss=loss0,
                                                      density=0.7, epsilon=0.2))
    # layer 2 is not in ``layers``: ordinary TIES, like every bias
    for n in ("2.weight", "0.bias", "4.weight"):
        assert torch.equal(sd[n], m_ties_tensors(src(n), bp[n].detach(), density=0.7, epsilon=0.2))
    assert set(sd) == set(base.state_dict())


def test_m_ties_modules_progressive_uses_merged_layers():
    base = mlp()
    fts = finetunes(base)
    x = torch.randn(10, 12)
    res = m_ties_modules(base, fts, [x], density=0.8, epsilon=0.1)  # progressive by default
    sd = res.merged
    merged = copy.deepcopy(base)
    merged.load_state_dict(sd)
    x2 = merged[1](merged[0](x)).detach()  # the M-TIES-merged layer 0 feeds layer 2
    loss2 = mloss_reference(x2, stack(fts, "2"), stack(fts, "2", "bias"), act="relu")
    close(res.losses["2"], loss2)
    src = [dict(m.named_parameters())["2.weight"].detach() for m in fts]
    want = m_ties_tensors(src, base[2].weight.detach(), row_loss=loss2.node("sq"), density=0.8, epsilon=0.1)
    torch.testing.assert_close(sd["2.weight"], want, rtol=0, atol=0)


def test_m_ties_modules_epsilon_zero_is_rowwise_ties():
    from fastmerge import merge_tensors

    base = mlp()
    fts = finetunes(base)
    sd = m_ties_modules(base, fts, [torch.randn(6, 12)], density=0.5, epsilon=0.0, mode="base").merged
    w = [m[2].weight.detach() for m in fts]
    rows = [merge_tensors("ties", [t[r] for t in w], base[2].weight.detach()[r], weight=1.0, density=0.5,
                          out_dtype=torch.float32, backend="torch") for r in range(16)]
    assert torch.equal(sd["2.weight"], torch.stack(rows))


def test_errors():
    base = mlp()
    fts = finetunes(base)
    x = torch.randn(3, 12)
    with pytest.raises(ConfigError, match="give base="):
        module_mloss(fts, [x], mode="base")
    with pytest.raises(ConfigError, match="no module 'nope'"):
        module_mloss(fts, [x], [Target("nope", "relu")], base=base)
    with pytest.raises(ConfigError, match="mode"):
        module_mloss(fts, [x], base=base, mode="ensemble")
    with pytest.raises(ConfigError, match="no batches"):
        module_mloss(fts, [], base=base)
