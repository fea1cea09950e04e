"""fastmerge.research.ensemble: logit / feature ensembles against explicit averages, greedy ensembles by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastmerge.research.ensemble import FeatureEnsemble, LogitEnsemble, ensemble, greedy_ensemble, merged_head
from fastmerge.errors import ConfigError
from fastmerge.research.lab.models import MLP, TinyViT
from fastmerge.research.soups import uniform_soup


def _mlps(n=3, seed=0):
    torch.manual_seed(seed)
    return [MLP(12, [9, 7], 5).eval() for _ in range(n)]


def _x(rows=11, d=12, seed=1):
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


def test_logit_ensemble_is_the_mean_of_logits():
    ms, x = _mlps(), _x()
    want = (ms[0](x) + ms[1](x) + ms[2](x)) / 3
    torch.testing.assert_close(LogitEnsemble(ms)(x), want, rtol=1e-6, atol=1e-6)
    w = [0.2, 0.5, 0.3]
    torch.testing.assert_close(LogitEnsemble(ms, w)(x), 0.2 * ms[0](x) + 0.5 * ms[1](x) + 0.3 * ms[2](x),
                               rtol=1e-6, atol=1e-6)


def test_feature_ensemble_merged_head_explicit():
    ms, x = _mlps(), _x()
    f = (ms[0].features(x) + ms[1].features(x) + ms[2].features(x)) / 3
    W = (ms[0].head.weight + ms[1].head.weight + ms[2].head.weight) / 3
    b = (ms[0].head.bias + ms[1].head.bias + ms[2].head.bias) / 3
    torch.testing.assert_close(FeatureEnsemble(ms, head="merged")(x), f @ W.T + b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(FeatureEnsemble(ms).features(x), f, rtol=1e-6, atol=1e-6)


def test_feature_ensemble_star_uses_one_models_head():
    ms, x = _mlps(), _x()
    f = (ms[0].features(x) + ms[1].features(x) + ms[2].features(x)) / 3
    torch.testing.assert_close(FeatureEnsemble(ms, head=0)(x), ms[0].head(f), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(FeatureEnsemble(ms, head=-1)(x), ms[2].head(f), rtol=1e-6, atol=1e-6)
    own = nn.Linear(7, 4)
    torch.testing.assert_close(FeatureEnsemble(ms, head=own)(x), own(f), rtol=1e-6, atol=1e-6)


def test_vit_feature_ensemble():
    torch.manual_seed(3)
    ms = [TinyViT(8, 4, 16, 1, 2, 2.0, 10).eval() for _ in range(2)]
    x = torch.randn(5, 1, 8, 8)
    f = (ms[0].features(x) + ms[1].features(x)) / 2
    h = merged_head([m.head for m in ms])
    torch.testing.assert_close(FeatureEnsemble(ms)(x), h(f), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.weight, (ms[0].head.weight + ms[1].head.weight) / 2)


def test_linear_models_soup_equals_logit_ensemble():
    # Paper Eq. 3 = Eq. 5: without a non-linearity, averaging weights is averaging outputs.
    torch.manual_seed(5)
    x = _x()
    lin = [MLP(12, [], 5).eval() for _ in range(3)]
    soup = MLP(12, [], 5).eval()
    soup.load_state_dict(uniform_soup([m.state_dict() for m in lin]))
    torch.testing.assert_close(soup(x), LogitEnsemble(lin)(x), rtol=1e-5, atol=1e-6)


class Const(nn.Module):
    """A model whose identity the hand-made score function reads."""

    def __init__(self, i: int):
        super().__init__()
        self.i = i
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.zeros(x.shape[0], 2)


def test_greedy_ensemble_hand_computed():
    # own scores [.5, .9, .7] -> order 1, 2, 0.  {1}: .9;  {1, 2}: .88 < .9 rejected;  {1, 0}: .95 accepted.
    table = {frozenset([0]): 0.5, frozenset([1]): 0.9, frozenset([2]): 0.7, frozenset([1, 2]): 0.88,
             frozenset([1, 0]): 0.95}

    def score(m):
        ids = frozenset([m.i]) if isinstance(m, Const) else frozenset(x.i for x in m.members)
        return table[ids]

    ms = [Const(i) for i in range(3)]
    g = greedy_ensemble(ms, score, kind="logits")
    assert g.scores == [0.5, 0.9, 0.7]
    assert g.order == [1, 2, 0]
    assert g.members == [1, 0]
    assert g.history == [(2, 0.88, False), (0, 0.95, True)]
    assert g.score == 0.95
    assert isinstance(g.module, LogitEnsemble) and [m.i for m in g.module.members] == [1, 0]


def test_greedy_feature_ensemble_real_models():
    ms, x = _mlps(4), _x()
    y = ms[2](x).argmax(-1)  # labels that model 2 gets right

    def score(m):
        return float((m(x).argmax(-1) == y).float().mean())

    g = greedy_ensemble(ms, score, kind="features")
    assert g.members[0] == 2
    assert isinstance(g.module, FeatureEnsemble)
    assert g.score == score(g.module) and g.score >= g.scores[2]


def test_ensemble_errors():
    ms = _mlps(2)
    with pytest.raises(ConfigError, match="at least one model"):
        LogitEnsemble([])
    with pytest.raises(ConfigError, match="3 weights for 2"):
        LogitEnsemble(ms, [1, 1, 1])
    with pytest.raises(ConfigError, match="no features"):
        FeatureEnsemble([nn.Linear(3, 2)])
    with pytest.raises(ConfigError, match="head=2 but there are 2"):
        FeatureEnsemble(ms, head=2)
    with pytest.raises(ConfigError, match="head must be"):
        FeatureEnsemble(ms, head="first")
    with pytest.raises(ConfigError, match="kind"):
        ensemble(ms, "votes")
