"""fastmerge.research.soups: uniform and greedy soups, in memory and streamed from safetensors on disk."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fastmerge.errors import ConfigError
from fastmerge.research.soups import accuracy_score, greedy_soup, uniform_soup

# Four one-number "models" (the value repeated in a [2] tensor) and a held-out score chosen by hand for every
# soup value the greedy pass can produce. Worked by hand:
#   own scores: 1 -> .50, 3 -> .70, 5 -> .60, 11 -> .65      order: 3 (idx 1), 11 (idx 3), 5 (idx 2), 1 (idx 0)
#   soup {3}: .70;  + 11 -> (3+11)/2 = 7 -> .69 < .70 rejected;  + 5 -> (3+5)/2 = 4 -> .70 >= .70 accepted;
#   + 1 -> (3+5+1)/3 = 3 -> .70 >= .70 accepted.  Final soup 3.0, ingredients [1, 2, 0].
#   strict (>): + 5 -> 4 -> .70 not > .70 rejected;  + 1 -> (3+1)/2 = 2 -> .75 accepted.  Final 2.0, [1, 0].
VALUES = [1.0, 3.0, 5.0, 11.0]
TABLE = {1.0: 0.50, 3.0: 0.70, 5.0: 0.60, 11.0: 0.65, 7.0: 0.69, 4.0: 0.70, 2.0: 0.75}


def _models(dtype=torch.float32):
    return [{"w": torch.full((2,), v, dtype=dtype), "b": torch.full((3,), -v, dtype=dtype)} for v in VALUES]


def _score(calls):
    def score(sd):
        v = float(sd["w"][0])
        assert float(sd["w"][1]) == v and float(sd["b"][0]) == -v  # every tensor is averaged alike
        calls.append(v)
        return TABLE[v]
    return score


def test_greedy_soup_hand_computed():
    calls: list[float] = []
    g = greedy_soup(_models(), _score(calls))
    assert g.scores == [0.50, 0.70, 0.60, 0.65]
    assert g.order == [1, 3, 2, 0]
    assert g.ingredients == [1, 2, 0]
    assert g.history == [(3, 0.69, False), (2, 0.70, True), (0, 0.70, True)]
    assert g.score == 0.70
    assert torch.equal(g.state_dict["w"], torch.full((2,), 3.0))
    assert torch.equal(g.state_dict["b"], torch.full((3,), -3.0))
    assert calls == [1.0, 3.0, 5.0, 11.0, 7.0, 4.0, 3.0]  # N own scores, then one per candidate


def test_greedy_soup_strict_hand_computed():
    g = greedy_soup(_models(), _score([]), strict=True)
    assert g.ingredients == [1, 0]
    assert g.history == [(3, 0.69, False), (2, 0.70, False), (0, 0.75, True)]
    assert torch.equal(g.state_dict["w"], torch.full((2,), 2.0))


def test_greedy_soup_given_scores_skip_evaluations():
    calls: list[float] = []
    g = greedy_soup(_models(), _score(calls), scores=[0.50, 0.70, 0.60, 0.65])
    assert calls == [7.0, 4.0, 3.0]
    assert g.ingredients == [1, 2, 0]


def test_greedy_soup_ties_keep_input_order():
    sds = [{"w": torch.tensor([float(i)])} for i in range(3)]
    g = greedy_soup(sds, lambda sd: 1.0)  # every score equal: sorted() is stable, all accepted (>=)
    assert g.order == [0, 1, 2] and g.ingredients == [0, 1, 2]
    assert torch.equal(g.state_dict["w"], torch.tensor([1.0]))


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_greedy_soup_streams_from_disk(tmp_path, layout):
    paths = []
    for i, sd in enumerate(_models(torch.bfloat16)):  # 1, 3, 5, 11 and their means 7, 4, 3, 2 are exact in bf16
        if layout == "file":
            p = tmp_path / f"m{i}.safetensors"
            save_file(sd, str(p))
        else:
            p = tmp_path / f"m{i}"
            p.mkdir()
            save_file(sd, str(p / "model.safetensors"))
        paths.append(p)
    g = greedy_soup(paths, _score([]))
    assert g.ingredients == [1, 2, 0]
    assert g.state_dict["w"].dtype == torch.bfloat16
    assert torch.equal(g.state_dict["w"], torch.full((2,), 3.0, dtype=torch.bfloat16))


def test_uniform_soup_is_the_mean_in_fp32(tmp_path):
    g = torch.Generator().manual_seed(0)
    sds = [{"a": torch.randn(7, 5, generator=g).to(torch.bfloat16), "b": torch.randn(3, generator=g).to(torch.bfloat16)}
           for _ in range(5)]
    want = {k: (sum(sd[k].float() for sd in sds) / 5).to(torch.bfloat16) for k in ("a", "b")}
    got = uniform_soup(sds)
    for k in want:
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], want[k])
    paths = []
    for i, sd in enumerate(sds):
        save_file(sd, str(tmp_path / f"{i}.safetensors"))
        paths.append(tmp_path / f"{i}.safetensors")
    disk = uniform_soup(iter(paths), out_dtype=torch.float32)  # a one-shot iterator: one checkpoint open at a time
    for k in want:
        assert disk[k].dtype == torch.float32
        torch.testing.assert_close(disk[k], sum(sd[k].float() for sd in sds) / 5, rtol=0, atol=0)


def test_weighted_soup_by_hand():
    sds = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([4.0, 8.0])}]
    # (1·[1, 2] + 3·[4, 8]) / 4 = [13/4, 26/4]
    assert torch.equal(uniform_soup(sds, weights=[1.0, 3.0])["w"], torch.tensor([3.25, 6.5]))


def test_non_float_tensors_come_from_the_first_checkpoint():
    sds = [{"w": torch.tensor([1.0]), "n": torch.tensor(5)}, {"w": torch.tensor([3.0]), "n": torch.tensor(9)}]
    out = uniform_soup(sds)
    assert torch.equal(out["w"], torch.tensor([2.0])) and int(out["n"]) == 5


def test_soup_errors():
    with pytest.raises(ConfigError, match="no checkpoints"):
        uniform_soup([])
    with pytest.raises(ConfigError, match="lacks tensor 'b'"):
        uniform_soup([{"a": torch.ones(1), "b": torch.ones(1)}, {"a": torch.ones(1)}])
    with pytest.raises(ConfigError, match="has tensor 'c'"):
        uniform_soup([{"a": torch.ones(1)}, {"a": torch.ones(1), "c": torch.ones(1)}])
    with pytest.raises(ConfigError, match=r"shape \[2\]"):
        greedy_soup([{"a": torch.ones(1)}, {"a": torch.ones(2)}], lambda sd: 0.0)
    with pytest.raises(ConfigError, match="2 weights for more than 2 checkpoints"):
        uniform_soup([{"a": torch.ones(1)}] * 3, weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="3 weights for 2 checkpoints"):
        uniform_soup([{"a": torch.ones(1)}] * 2, weights=[1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="sum to 0"):
        uniform_soup([{"a": torch.ones(1)}] * 2, weights=[1.0, -1.0])
    with pytest.raises(ConfigError, match="3 scores for 2"):
        greedy_soup([{"a": torch.ones(1)}] * 2, lambda sd: 0.0, scores=[1, 2, 3])
    with pytest.raises(ConfigError, match="a state dict or a path"):
        uniform_soup([42])


def test_accuracy_score_with_a_loader():
    # A 2-class linear "model": class = argmax(W x). W = I predicts the larger coordinate; W = -I the smaller.
    model = torch.nn.Linear(2, 2, bias=False)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 3.0]])
    y = torch.tensor([0, 1, 0, 1])
    score = accuracy_score(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    assert score({"weight": torch.eye(2)}) == 1.0
    assert score({"weight": -torch.eye(2)}) == 0.0
    before = model.weight.detach().clone()
    g = greedy_soup([{"weight": -torch.eye(2)}, {"weight": torch.eye(2) * 3}], score)
    # own scores 0 and 1 -> start from 3I; + (-I): mean (3I - I)/2 = I still scores 1.0 -> accepted
    assert g.ingredients == [1, 0] and torch.equal(g.state_dict["weight"], torch.eye(2))
    assert torch.equal(model.weight, before)  # functional_call: the module is not modified
    same = greedy_soup([{"weight": -torch.eye(2)}, {"weight": torch.eye(2) * 3}], model=model,
                       loader=[(x[:2], y[:2]), (x[2:], y[2:])])
    assert same.ingredients == [1, 0] and same.scores == [0.0, 1.0]
    with pytest.raises(ConfigError, match="model= and loader="):
        greedy_soup([{"weight": torch.eye(2)}], model=model)
    with pytest.raises(ConfigError, match="not both"):
        greedy_soup([{"weight": torch.eye(2)}], score, model=model, loader=[(x, y)])
