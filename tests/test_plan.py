"""Config validation and plan building: parameter resolution, errors that name the field, JSON plan."""

import dataclasses
import importlib
import json
import math

import pytest
import torch

from fastmerge import plan
from fastmerge.config import MergeConfig, evaluate_setting
from fastmerge.errors import ConfigError
from fastmerge.io.index import ITEMSIZE
from fastmerge.plan import layer_index
from helpers.checkpoints import write_sharded

PLAN = importlib.import_module("fastmerge.plan")  # the module (fastmerge.plan is also the function plan)


def _cfg(fam, method="ties", **over):
    base, fts = fam
    d = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(fts[0]), "parameters": {"weight": 0.33, "density": 0.5}},
            {"model": str(fts[1]), "parameters": {"weight": [0, 0.5, 1], "density": 0.5}},
            {"model": str(fts[2]), "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0.1}]}},
        ],
        "parameters": {"density": 0.7},
        "dtype": "bfloat16",
    }
    d.update(over)
    return d


def test_evaluate_setting_gradient_and_filters():
    assert evaluate_setting([0, 1], "x", 0.25) == 0.25
    assert evaluate_setting([0.0, 0.3, 0.7, 1.0], "x", 1 / 3) == pytest.approx(0.3)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75) == 0.5
    conds = [{"filter": "mlp", "value": [0, 1]}, {"filter": "*", "value": 2}]
    assert evaluate_setting(conds, "layers.1.mlp.up", 1.0) == 1
    assert evaluate_setting(conds, "layers.1.attn", 1.0) == 2
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "attn", 0) is None


@pytest.mark.parametrize(
    "name,idx",
    [("model.layers.12.mlp.up_proj.weight", 12), ("transformer.h.3.attn.c_attn.weight", 3),
     ("encoder.layer.7.output.dense.weight", 7), ("blocks.0.norm1.weight", 0), ("model.embed_tokens.weight", None)],
)
def test_layer_index(name, idx):
    assert layer_index(name) == idx


def test_plan_resolves_gradients_filters_and_precedence(family_bf16):
    p = plan(_cfg(family_bf16))
    by = {t.name: t for t in p.tensors}
    layers = 3  # TINY has 3 layers: t = 0, 0.5, 1
    for i in range(layers):
        t = by[f"model.layers.{i}.self_attn.q_proj.weight"].params
        assert t.weight[1] == pytest.approx([0, 0.5, 1][i])  # gradient
        assert t.weight[2] == 0.1  # filter fallback
        assert t.density == (0.5, 0.5, 0.7)  # model value beats global, global beats default
        assert by[f"model.layers.{i}.mlp.up_proj.weight"].params.weight[2] == 0.5  # filter match
    # non-layer tensors are evaluated at t = 0, as mergekit does for pre- and post-layer weights
    assert by["model.embed_tokens.weight"].params.weight[1] == 0
    assert by["lm_head.weight"].params.weight[1] == 0
    assert all(t.out_dtype == "bfloat16" for t in p.tensors)
    doc = json.loads(p.dumps())
    assert doc["tensors"][0]["params"]["weight"] and doc["tensors"][0]["backend"] in ("native", "torch")
    assert set(doc["tensors"][0]["skipped"]) >= {"cuda", "triton"}


def test_plan_order_is_base_file_order(family_bf16):
    from fastmerge.io.index import CheckpointIndex

    p = plan(_cfg(family_bf16))
    assert [t.name for t in p.tensors] == list(CheckpointIndex.open(family_bf16[0]).tensors)


def test_base_listed_among_models_is_the_base(family_bf16):
    d = _cfg(family_bf16)
    d["models"].insert(0, {"model": str(family_bf16[0])})
    assert len(MergeConfig.from_dict(d).models) == 3


def test_typo_parameter_suggests(family_bf16):
    d = _cfg(family_bf16)
    d["models"][0]["parameters"]["densty"] = 0.5
    with pytest.raises(ConfigError, match="unknown parameter 'densty'.*did you mean 'density'"):
        MergeConfig.from_dict(d)


def test_parameter_of_another_method_warns(family_bf16):
    d = _cfg(family_bf16, parameters={"gamma": 0.01})
    with pytest.warns(UserWarning, match="gamma.*not used by merge_method 'ties'"):
        MergeConfig.from_dict(d)


def test_unknown_method_and_field(family_bf16):
    with pytest.raises(ConfigError, match="did you mean 'ties'"):
        MergeConfig.from_dict(_cfg(family_bf16, merge_method="tie"))
    with pytest.raises(ConfigError, match="unknown field 'base_modle'.*base_model"):
        MergeConfig.from_dict({**_cfg(family_bf16), "base_modle": "x"})


@pytest.mark.parametrize(
    "field,value,msg",
    [("slices", [{"sources": []}], "slices"), ("modules", {"a": {}}, "give one of 'models', 'slices' or 'modules'"),
     ("chat_template", "nonsense", "chat_template"),
     ("tokenizer", {"source": "union", "tokens": ["<x>"]}, "tokenizer.tokens"), ("dtype", "int8", "unsupported dtype")],
)
def test_unsupported_features_are_errors(family_bf16, field, value, msg):
    with pytest.raises(ConfigError, match=msg):
        MergeConfig.from_dict(_cfg(family_bf16, **{field: value}))


def test_missing_required_and_base(family_bf16):
    d = _cfg(family_bf16)
    del d["models"][0]["parameters"]["weight"]
    with pytest.raises(ConfigError, match="missing required parameter 'weight'"):
        MergeConfig.from_dict(d)
    d = _cfg(family_bf16)
    del d["base_model"]
    with pytest.raises(ConfigError, match="needs a base_model"):
        MergeConfig.from_dict(d)


def test_density_error_names_tensor(family_bf16):
    d = _cfg(family_bf16)
    d["models"][2]["parameters"]["density"] = [{"filter": "lm_head", "value": 1.5}, {"value": 0.5}]
    with pytest.raises(ConfigError, match="lm_head.weight.*density"):
        plan(d)


def test_tensor_free_params_is_declared_only_where_make_params_ignores_the_context():
    """``tensor_free_params`` lets a plan resolve plain settings once for all tensors: a method that reads its
    ParamContext (the tensor's name or the seed) in make_params must not declare it."""
    import ast
    import inspect
    import textwrap

    from fastmerge.methods import list_methods

    def reads_context(fn) -> bool:
        f = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
        ctx = f.args.args[-1].arg
        return any(isinstance(n, ast.Name) and n.id == ctx for stmt in f.body for n in ast.walk(stmt))

    free = {m.name for m in list_methods() if m.tensor_free_params}
    assert {"linear", "ties", "task_arithmetic"} <= free
    readers = {m.name for m in list_methods() if reads_context(type(m).make_params)}
    assert {"dare_ties", "della", "cart"} <= readers  # the check sees a read where there is one
    assert not free & readers


@pytest.mark.parametrize("method", ["ties", "linear", "dare_ties", "task_arithmetic"])
def test_plan_with_shared_params_equals_plan_resolved_per_tensor(family_bf16, monkeypatch, method):
    """The plan-wide Params of a tensor-free method (plain settings, resolved once) are the Params a per-tensor
    resolution gives: same plan JSON and digest with the shortcut off; one shared object with it on."""
    base, fts = family_bf16
    doc = {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
           "models": [{"model": str(p), "parameters": {"weight": 0.4, "density": 0.6}} for p in fts]}
    if method == "linear":
        doc = {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 0.4}} for p in [base, *fts]]}
    fast = plan(doc)
    from fastmerge.methods import get_method

    monkeypatch.setattr(type(get_method(method)), "tensor_free_params", False)
    slow = plan(doc)
    assert fast.to_json() == slow.to_json()
    assert fast.digest() == slow.digest()
    ids = {id(t.params) for t in fast.tensors}
    if get_method(method).name == "dare_ties":
        assert len(ids) == len(fast.tensors)  # keyed by the tensor name: one each
    else:
        assert len(ids) == 1


def _same_plans(a, b) -> None:
    assert [dataclasses.astuple(t) for t in a.tensors] == [dataclasses.astuple(t) for t in b.tensors]
    assert [type(t.sources) for t in a.tensors] == [type(t.sources) for t in b.tensors]
    assert a.to_json() == b.to_json() and a.digest() == b.digest()


def _lean_calls(monkeypatch) -> list:
    real, calls = PLAN._lean_rest, []

    def spy(*a, **k):
        calls.append(real(*a, **k))
        return calls[-1]

    monkeypatch.setattr(PLAN, "_lean_rest", spy)
    return calls


@pytest.mark.parametrize("case", ["ties", "linear", "compat", "fp32_out", "gradient", "per_tensor"])
def test_lean_whole_model_plan_equals_the_plan_of_add(family_bf16, monkeypatch, case):
    """A whole-model merge with plain parameters plans the tensors after the first from the input tables side by
    side (``plan._lean_rest``): the same TensorPlans (every field, sources as lists), JSON and digest as with
    every tensor through ``add``; and where parameters vary by tensor, ``add`` plans them all."""
    base, fts = family_bf16
    doc = {"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
           "models": [{"model": str(p), "parameters": {"weight": 0.4, "density": 0.6}} for p in fts]}
    options = {}
    if case == "linear":
        doc = {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 0.4}} for p in [base, *fts]]}
    elif case == "compat":
        options = {"mergekit_compat": True}
    elif case == "fp32_out":
        doc["dtype"] = "float32"
    elif case == "gradient":
        doc["models"][0]["parameters"]["weight"] = [0.1, 0.9]
    elif case == "per_tensor":
        doc["merge_method"] = "dare_ties"
    calls = _lean_calls(monkeypatch)
    lean = plan(doc, **options)
    assert [c is not None for c in calls] == [case not in ("gradient", "per_tensor")]
    # the columns the plan hands over (PlanColumns) are its rows' own, field by field
    fields = [f.name for f in dataclasses.fields(PLAN.TensorPlan)] + ["out_tensor"]
    made = vars(lean.columns)
    assert set(fields) <= set(made) if calls[0] is not None else "compute_dtype" not in made
    for f in fields:
        assert getattr(lean.columns, f) == [getattr(t, f) for t in lean.tensors], f
    assert all(a is b for a, b in zip(lean.columns.params, [t.params for t in lean.tensors]))
    assert lean.columns.inputs == PLAN.PlanColumns(lean.tensors).inputs is not None
    fresh = PLAN.PlanColumns(lean.tensors)  # columns taken from the rows, nothing known
    assert fresh.out_nbytes == lean.columns.out_nbytes and fresh.in_dtype == lean.columns.in_dtype
    # each column the plan knows holds one value (PlanColumns.one) holds it in every row; a plain whole-model merge
    # knows its parameters, transforms, output and input dtypes (the family: one header of one dtype)
    known = {k: lean.columns.one(k) for k in fields + ["in_dtype"] if lean.columns.one(k) is not PLAN.PlanColumns.VARIES}
    for k, v in known.items():
        assert all(x is v or x == v for x in getattr(fresh, k)), k
    if calls[0] is not None:
        assert {"params", "input_transform", "out_quant", "out_dtype", "in_dtype", "backend", "compute_dtype"} <= set(known)
    else:
        assert known == {} and fresh.one("params") is PLAN.PlanColumns.VARIES
    # the engine's choice, its runs and the digest are the same with what the plan knows and with the columns alone
    from fastmerge.engine import stream

    kern = lean.method.native
    asked = lambda: (stream.batches(lean, kern is not None and kern.elementwise, kern is not None and kern.segments is not None),  # noqa: E731
                     stream.RawIO.not_supported_reasons(lean), lean.digest())
    with_known = asked()
    vars(lean).pop("_columns")
    assert asked() == with_known and lean.columns.one("params") is PLAN.PlanColumns.VARIES
    # each tensor's out_tensor is the very object its shard lists (build_plan fills the memos column by column)
    shard_outs = [o for s in lean.shards for o in s.tensors]
    assert len(shard_outs) == len(lean.tensors) and all(t.out_tensor is o for t, o in zip(lean.tensors, shard_outs))
    assert all(o.nbytes == math.prod(t.shape) * ITEMSIZE[t.out_dtype] for t, o in zip(lean.tensors, shard_outs))
    monkeypatch.setattr(PLAN, "LEAN_WHOLE_MODELS", False)
    _same_plans(lean, plan(doc, **options))


def _model(d, tensors, shards):
    """A bf16 checkpoint in ``shards`` (lists of names): its tensor order is by shard, then by name."""
    write_sharded(d, {n: torch.ones(shape, dtype=torch.bfloat16) for n, shape in tensors.items()}, shards)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                               "num_hidden_layers": 2}))
    return d


def test_lean_plan_falls_back_to_add_on_other_orders_and_shapes(tmp_path, monkeypatch):
    """Another tensor order in one input: ``add`` plans every tensor (the same plan as with the lean path off);
    a shape that differs: ``add``'s error, naming the tensor and both models."""
    from fastmerge.errors import ShapeMismatchError

    spec = {f"model.layers.{i}.mlp.w{j}.weight": (3, 5) for i in range(2) for j in range(3)} | {"model.norm.weight": (5,)}
    layers = [n for n in spec if n != "model.norm.weight"]
    base = _model(tmp_path / "base", spec, [layers, ["model.norm.weight"]])
    other = _model(tmp_path / "reordered", spec, [["model.norm.weight"], layers])
    doc = {"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
           "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.5}} for p in (base, other)]}
    calls = _lean_calls(monkeypatch)
    got = plan(doc)
    assert calls == [None]
    monkeypatch.setattr(PLAN, "LEAN_WHOLE_MODELS", False)
    _same_plans(got, plan(doc))
    monkeypatch.setattr(PLAN, "LEAN_WHOLE_MODELS", True)
    bad = _model(tmp_path / "bad", spec | {"model.norm.weight": (6,)}, [layers, ["model.norm.weight"]])
    doc["models"][1]["model"] = str(bad)
    with pytest.raises(ShapeMismatchError, match=r"model.norm.weight.*\[6\].*\[5\]"):
        plan(doc)


def test_plan_columns_follow_the_tensor_list(family_bf16):
    """``MergePlan.columns``: each column taken once from the plan's tensor list and kept; another list (a plan
    replaced, or its list reassigned) gets columns of its own."""
    base, fts = family_bf16
    p = plan({"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in [base, *fts]]})
    cols = p.columns
    assert cols is p.columns and cols.out_dtype is p.columns.out_dtype  # taken once
    assert cols.name == [t.name for t in p.tensors] and cols.in_bytes == [t.in_bytes for t in p.tensors]  # memos too
    assert cols.inputs == [[t.sources[k] for t in p.tensors] for k in range(1 + len(fts))]  # no base: the sources, model by model
    assert p.restricted([s.filename for s in p.shards]).columns is cols  # all of it: the same list, the same columns
    assert p.restricted([p.shards[0].filename]).columns.name == [t.name for t in p.shards[0].tensors]
    q = dataclasses.replace(p, tensors=p.tensors[:3])
    assert q.columns.name == [t.name for t in p.tensors[:3]]
    p.tensors = list(reversed(p.tensors))
    assert p.columns is not cols and p.columns.name == list(reversed(cols.name))
    with pytest.raises(AttributeError):
        cols.no_such_field  # noqa: B018
