"""Parity with mergekit 0.1.5 for ``modules`` (vision-language models), side by side on generated
Mistral3-, Gemma3-, Qwen2-VL- and Qwen2.5-VL-shaped bf16 families (base + 2 fine-tunes,
fastmerge.testing): each module from its own models or slices and parameters, layer counts changed by
slices, gradients over a module's own layers, filter lists; the plain ``models`` syntax on the Mistral3
family too (mergekit turns it into one module entry per module of the architecture).

Under ``--mergekit-compat`` every tensor is bitwise equal (asserted) and so is every layer count in
config.json. In default mode (fp32 math, one rounding) bf16 TIES differs by design, as in
tests/parity/test_parity_mergekit.py (measured on a Qwen2-VL TIES merge of base + 2 fine-tunes: 87% of
the elements bitwise equal). Where fastmerge's config.json differs on purpose: Qwen2-VL text slices set
``text_config.num_hidden_layers`` as well as the top-level count (mergekit 0.1.5 leaves the nested one
stale), and a sliced module's per-layer lists (Gemma3's ``layer_types``) follow its layers
(tests/test_modules.py). Not compared: a gradient inside Qwen2-VL's projector, which mergekit 0.1.5's
architecture file gives two "layers" whose names carry no index, so each merger tensor is planned twice,
at t = 0 and at t = 1; fastmerge plans it once, at t = 0, as every other non-layer tensor.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from typing import Callable

import pytest

from fastmerge.testing import Gemma3VLShape, Mistral3Shape, Qwen25VLShape, Qwen2VLShape, make_family
from helpers.parity import ParityRuns, assert_bit_exact, compare_models, load_model

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(importlib.util.find_spec("mergekit") is None, reason="mergekit==0.1.5 is not installed"),
]

M3 = Mistral3Shape(hidden=64, layers=4, intermediate=96, heads=4, kv_heads=2, vocab=128, vision_hidden=32,
                   vision_layers=3, vision_intermediate=48, vision_heads=2, patch=4)
QVL = Qwen2VLShape(hidden=64, layers=4, intermediate=96, heads=4, kv_heads=2, vocab=128, vision_embed=32, vision_depth=3)
G3 = Gemma3VLShape(hidden=64, layers=4, intermediate=96, heads=4, kv_heads=2, head_dim=16, vocab=128, vision_hidden=32,
                   vision_layers=3, vision_intermediate=48, vision_heads=2)
Q25 = Qwen25VLShape(hidden=64, layers=4, intermediate=96, heads=4, kv_heads=2, vocab=128, vision_embed=32, vision_depth=3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("modules_parity")
    fams = {
        "mistral3": make_family(root / "mistral3", M3, n_finetunes=2, dtype="bfloat16"),
        "qwen2vl": make_family(root / "qwen2vl", QVL, n_finetunes=2, dtype="bfloat16"),
        "qwen25vl": make_family(root / "qwen25vl", Q25, n_finetunes=2, dtype="bfloat16"),
        "gemma3": make_family(root / "gemma3", G3, n_finetunes=2, dtype="bfloat16"),
    }
    return ParityRuns(fams, root / "out")


def _src(model, lr, **params):
    return {"model": str(model), "layer_range": list(lr), **({"parameters": params} if params else {})}


def _mistral3_ties(fams):
    """TIES: the text decoder as 0-3 + 2-4 (5 layers; ft1's weight per source, a density gradient on the
    second slice), the vision tower from whole models with its own density and a weight gradient over its
    3 layers, the projector with a filter list."""
    base, (ft1, ft2) = fams["mistral3"]
    return {
        "merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5, "weight": 0.5},
        "modules": {
            "text_decoder": {"slices": [
                {"sources": [_src(base, (0, 3)), _src(ft1, (0, 3), weight=0.9), _src(ft2, (0, 3))]},
                {"sources": [_src(base, (2, 4)), _src(ft1, (2, 4)), _src(ft2, (2, 4))], "parameters": {"density": [0.3, 0.8]}},
            ]},
            "vision_tower": {"models": [{"model": str(ft1)}, {"model": str(ft2), "parameters": {"weight": [0.1, 0.6]}}],
                             "parameters": {"density": 0.8}},
            "multi_modal_projector": {"models": [{"model": str(ft1)}, {"model": str(ft2)}],
                                      "parameters": {"weight": [{"filter": "linear_1", "value": 0.2}, {"value": 0.7}]}},
        },
    }


def _qwen2vl_task_arithmetic(fams):
    """task_arithmetic: the text decoder from whole models, the vision blocks as 0-2 + 1-3 (4 from 3), the
    projector from ft2 alone, with module parameters over global ones."""
    base, (ft1, ft2) = fams["qwen2vl"]
    return {
        "merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"weight": 0.5},
        "modules": {
            "text_decoder": {"models": [{"model": str(ft1), "parameters": {"weight": [0.2, 1.0]}}, {"model": str(ft2)}]},
            "vision_tower": {"slices": [
                {"sources": [_src(base, (0, 2)), _src(ft1, (0, 2)), _src(ft2, (0, 2), weight=0.3)]},
                {"sources": [_src(base, (1, 3)), _src(ft1, (1, 3))], "parameters": {"weight": 0.9}},
            ]},
            "multi_modal_projector": {"models": [{"model": str(ft2)}], "parameters": {"weight": 0.8}},
        },
    }


def _qwen25vl_linear(fams):
    """linear (no base): the text decoder as 0-3 + 1-4 (6 layers, counted in ``text_config``), the vision
    tower and projector from whole models, weights per module."""
    base, (ft1, ft2) = fams["qwen25vl"]
    return {
        "merge_method": "linear", "parameters": {"weight": 0.5},
        "modules": {
            "text_decoder": {"slices": [{"sources": [_src(ft1, (0, 3)), _src(ft2, (0, 3), weight=0.2)]},
                                        {"sources": [_src(ft2, (1, 4)), _src(base, (1, 4))]}]},
            "vision_tower": {"models": [{"model": str(ft1)}, {"model": str(base)}], "parameters": {"weight": [0.3, 0.9]}},
            "multi_modal_projector": {"models": [{"model": str(ft2), "parameters": {"weight": 1.0}}]},
        },
    }


def _gemma3_dare_linear(fams):
    """dare_linear with density 1 (nothing dropped, so no random draw to compare): tied embeddings (no
    lm_head, which mergekit's architecture marks optional), the vision tower as 1-3 + 0-3 (5 layers; its
    post-layernorm from the last slice), the text decoder and projector from whole models."""
    base, (ft1, ft2) = fams["gemma3"]
    return {
        "merge_method": "dare_linear", "base_model": str(base), "parameters": {"weight": 0.6, "density": 1.0},
        "modules": {
            "text_decoder": {"models": [{"model": str(ft1)}, {"model": str(ft2), "parameters": {"weight": [0.2, 0.8]}}]},
            "vision_tower": {"slices": [
                {"sources": [_src(base, (1, 3)), _src(ft1, (1, 3))]},
                {"sources": [_src(base, (0, 3)), _src(ft2, (0, 3), weight=0.4)], "parameters": {"weight": 0.9}},
            ]},
            "multi_modal_projector": {"models": [{"model": str(ft2)}], "parameters": {"weight": 0.3}},
        },
    }


def _mistral3_models(fams):
    """No ``modules``: mergekit gives every module of the architecture the same models, so a gradient runs
    over each module's own layers (the vision tower's 3, the text decoder's 4)."""
    base, (ft1, ft2) = fams["mistral3"]
    return {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.6},
            "models": [{"model": str(ft1), "parameters": {"weight": [0.1, 0.9]}}, {"model": str(ft2), "parameters": {"weight": 0.7}}]}


@dataclass(frozen=True)
class Case:
    id: str
    doc: Callable
    layer_keys: tuple[str, ...]  # config.json keys holding module layer counts, dotted
    layers: tuple[int, ...]  # their values in the output


CASES = [
    Case("mistral3-ties-modules", _mistral3_ties, ("text_config.num_hidden_layers", "vision_config.num_hidden_layers"), (5, 3)),
    Case("qwen2vl-task-arithmetic-modules", _qwen2vl_task_arithmetic, ("num_hidden_layers", "vision_config.depth"), (4, 4)),
    Case("qwen25vl-linear-modules", _qwen25vl_linear, ("text_config.num_hidden_layers", "vision_config.depth"), (6, 3)),
    Case("gemma3-dare-linear-modules", _gemma3_dare_linear, ("text_config.num_hidden_layers", "vision_config.num_hidden_layers"),
         (4, 5)),
    Case("mistral3-ties-models", _mistral3_models, ("text_config.num_hidden_layers", "vision_config.num_hidden_layers"), (4, 3)),
]


def _get(doc, key):
    for k in key.split("."):
        doc = doc[k]
    return doc


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_modules_bit_exact_with_mergekit_compat(runs, case):
    mk, fm = runs.mergekit(case), runs.fastmerge(case, compat=True)
    got, want = load_model(fm), load_model(mk)
    assert_bit_exact(compare_models(got, want), f"{case.id} (compat)")
    fm_cfg, mk_cfg = (json.loads((p / "config.json").read_text()) for p in (fm, mk))
    for key, n in zip(case.layer_keys, case.layers):
        assert _get(fm_cfg, key) == _get(mk_cfg, key) == n, key
