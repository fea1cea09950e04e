"""`modules`: each module of a vision-language model (text decoder, vision tower, projector) merged from
its own models or slices and parameters, tensors assigned to modules by the architecture's names
(io.arch); expected values from the torch reference on the generated files; bad configs and inputs
fail with one line before anything is written."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmerge import merge, merge_tensors, plan
from fastmerge.config import MergeConfig
from fastmerge.errors import CheckpointError, ConfigError
from fastmerge.testing import (MODERN_GEMMA3, MODERN_LLAVA, MODERN_QWEN_VL, Gemma3VLShape, LlamaShape, Mistral3Shape, Qwen2VLShape,
                               Qwen25VLShape, make_family)
from helpers.parity import load_model

M3 = Mistral3Shape(hidden=32, layers=4, intermediate=48, heads=2, kv_heads=1, vocab=64, vision_hidden=16,
                   vision_layers=3, vision_intermediate=24, vision_heads=2, patch=2)
QVL = Qwen2VLShape(hidden=32, layers=3, intermediate=48, heads=2, kv_heads=1, vocab=64, vision_embed=16, vision_depth=2)
TEXT = "language_model.model.layers.{}.mlp.up_proj.weight"
VISION = "vision_tower.transformer.layers.{}.attention.q_proj.weight"


@pytest.fixture(scope="module")
def m3(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("mistral3"), M3, n_finetunes=2, dtype="float32", shard_bytes=40_000)


@pytest.fixture(scope="module")
def qvl(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("qwen2vl"), QVL, n_finetunes=2, dtype="float32", shard_bytes=40_000)


def _per_module(fam):
    """TIES everywhere (one method per merge, as mergekit 0.1.5): the text decoder as two slices (6 output
    layers from 4: 0-2 then 1-3, ft1 weighted per source), the vision tower from whole models with its own
    density, the projector from the base alone (ft1 at weight 0)."""
    base, (ft1, ft2) = fam
    b, f1, f2 = str(base), str(ft1), str(ft2)
    return {
        "merge_method": "ties",
        "base_model": b,
        "parameters": {"density": 0.5, "weight": 0.5},
        "modules": {
            "text_decoder": {"slices": [
                {"sources": [{"model": b, "layer_range": [0, 3]}, {"model": f1, "layer_range": [0, 3], "parameters": {"weight": 0.9}},
                             {"model": f2, "layer_range": [0, 3]}]},
                {"sources": [{"model": b, "layer_range": [1, 4]}, {"model": f1, "layer_range": [1, 4]},
                             {"model": f2, "layer_range": [1, 4]}], "parameters": {"density": 0.7}},
            ]},
            "vision_tower": {"models": [{"model": f1}, {"model": f2, "parameters": {"weight": 0.2}}], "parameters": {"density": 0.8}},
            "multi_modal_projector": {"models": [{"model": f1, "parameters": {"weight": 0.0}}]},
        },
    }


def _ties(models, name, weight, density):
    base, fts = models[0], models[1:]
    return merge_tensors("ties", [m[name] for m in fts], base[name], backend="torch", weight=weight, density=density)


def test_each_module_from_its_own_inputs_and_parameters(tmp_path, m3):
    base, (ft1, ft2) = m3
    merge(_per_module(m3), tmp_path / "out", progress=False)
    got = load_model(tmp_path / "out")
    b, f1, f2 = (load_model(p) for p in (base, ft1, ft2))
    srcs = [b, f1, f2]
    # text decoder: output layer i from input layer (0, 1, 2, 1, 2, 3)[i]; slice 0 ft1 weight 0.9, slice 1 density 0.7
    for out_i, src_i in enumerate([0, 1, 2, 1, 2, 3]):
        w, d = ([0.9, 0.5], [0.5, 0.5]) if out_i < 3 else ([0.5, 0.5], [0.7, 0.7])
        want = _ties(srcs, TEXT.format(src_i), w, d)
        assert torch.equal(got[TEXT.format(out_i)], want), out_i
    assert not any(k.startswith("language_model.model.layers.6.") for k in got)
    # vision tower: every layer as the input's, the module's density over the global one
    for i in range(M3.vision_layers):
        assert torch.equal(got[VISION.format(i)], _ties(srcs, VISION.format(i), [0.5, 0.2], [0.8, 0.8]))
    assert torch.equal(got["vision_tower.patch_conv.weight"], _ties(srcs, "vision_tower.patch_conv.weight", [0.5, 0.2], [0.8, 0.8]))
    # projector: the base (its only fine-tune weighted 0)
    for n in [n for n in b if n.startswith("multi_modal_projector.")]:
        assert torch.equal(got[n], b[n]), n
    emb, head = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
    assert torch.equal(got[emb], _ties(srcs, emb, [0.9, 0.5], [0.5, 0.5]))  # from the first text slice
    assert torch.equal(got[head], _ties(srcs, head, [0.5, 0.5], [0.7, 0.7]))  # from the last
    n_text = 6 * 9 + 3
    n_vision = 2 + 9 * M3.vision_layers
    assert len(got) == n_text + n_vision + 4
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 6 and cfg["vision_config"]["num_hidden_layers"] == M3.vision_layers


def test_default_and_torch_backends_agree_per_module(tmp_path, m3):
    """The per-tensor backends the plan picks (native here) give the torch reference's bytes on every module."""
    merge(_per_module(m3), tmp_path / "auto", progress=False)
    merge(_per_module(m3), tmp_path / "torch", progress=False, backend="torch")
    a, t = load_model(tmp_path / "auto"), load_model(tmp_path / "torch")
    assert sorted(a) == sorted(t) and all(torch.equal(a[k], t[k]) for k in a)


def test_parameter_precedence_source_slice_module_global(m3):
    base, (ft1, ft2) = m3
    cfg = _per_module(m3)
    cfg["parameters"] = {"density": 0.5, "weight": 0.5}
    cfg["modules"]["vision_tower"]["parameters"] = {"density": [{"filter": "feed_forward", "value": 0.9}], "weight": [0.1, 0.3]}
    by = {t.name: t.params for t in plan(cfg).tensors}
    # a module filter that does not match falls through to the global value; a matching one wins
    assert by[VISION.format(0)].density == (0.5, 0.5)
    assert by["vision_tower.transformer.layers.0.feed_forward.up_proj.weight"].density == (0.9, 0.9)
    # the module's gradient runs over the module's own layers (3: t = 0, 0.5, 1); ft2's own weight wins
    assert [by[VISION.format(i)].weight[0] for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert by[VISION.format(2)].weight[1] == 0.2
    # text: source (0.9) > slice (density 0.7) > global
    assert by[TEXT.format(0)].weight == (0.9, 0.5) and by[TEXT.format(3)].density == (0.7, 0.7)


def test_plain_models_on_a_multi_module_model_run_per_module(m3):
    """``models`` without ``modules``: every module gets the same models (mergekit's reading), and a gradient
    runs over each module's own layers: t = 0, 1/2, 1 on the 3 vision layers, 0, 1/3, 2/3, 1 on the 4 text ones."""
    base, (ft1, ft2) = m3
    cfg = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5},
           "models": [{"model": str(ft1), "parameters": {"weight": [0.0, 0.6]}}, {"model": str(ft2), "parameters": {"weight": 0.5}}]}
    by = {t.name: t.params for t in plan(cfg).tensors}
    assert [by[VISION.format(i)].weight[0] for i in range(3)] == pytest.approx([0.0, 0.3, 0.6])
    assert [by[TEXT.format(i)].weight[0] for i in range(4)] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert len(by) == len(load_model(base))


def test_plan_order_modules_in_config_order(m3):
    cfg = _per_module(m3)
    cfg["modules"] = dict(reversed(list(cfg["modules"].items())))
    names = [t.name for t in plan(cfg).tensors]
    first = {m: next(i for i, n in enumerate(names) if n.startswith(m))
             for m in ("multi_modal_projector.", "vision_tower.", "language_model.")}
    assert first["multi_modal_projector."] < first["vision_tower."] < first["language_model."]
    text = [n for n in names if n.startswith("language_model.")]
    assert text[0] == "language_model.model.embed_tokens.weight" and text[-2:] == ["language_model.model.norm.weight",
                                                                                     "language_model.lm_head.weight"]
    assert len(names) == len(set(names))


def test_qwen2_vl_merger_is_the_projector_not_the_vision_tower(tmp_path, qvl):
    """Qwen2-VL nests the projector (``visual.merger.``) inside the vision tower's prefix (``visual.``): the
    longer prefix wins, so the merger takes the projector's parameters; vision blocks and text layers
    renumbered by slices."""
    base, (ft1, ft2) = qvl
    b, f1, f2 = str(base), str(ft1), str(ft2)
    cfg = {
        "merge_method": "linear",
        "modules": {
            "text_decoder": {"slices": [{"sources": [{"model": f1, "layer_range": [0, 3]}, {"model": f2, "layer_range": [0, 3]}]},
                                        {"sources": [{"model": f1, "layer_range": [2, 3]}, {"model": f2, "layer_range": [2, 3]}]}],
                             "parameters": {"weight": 0.5}},
            "vision_tower": {"slices": [{"sources": [{"model": f2, "layer_range": [1, 2]}]},
                                        {"sources": [{"model": f1, "layer_range": [0, 2]}]}], "parameters": {"weight": 1.0}},
            "multi_modal_projector": {"models": [{"model": b, "parameters": {"weight": 1.0}}]},
        },
    }
    merge(cfg, tmp_path / "out", progress=False)
    got = load_model(tmp_path / "out")
    mb, m1, m2 = (load_model(p) for p in (base, ft1, ft2))
    merger = [n for n in mb if n.startswith("visual.merger.")]
    assert len(merger) == 6 and all(torch.equal(got[n], mb[n]) for n in merger)
    blk = "visual.blocks.{}.attn.qkv.weight"
    for out_i, (src, src_i) in enumerate([(m2, 1), (m1, 0), (m1, 1)]):
        assert torch.equal(got[blk.format(out_i)], src[blk.format(src_i)])
    assert torch.equal(got["visual.patch_embed.proj.weight"], m2["visual.patch_embed.proj.weight"])  # first vision slice
    q = "model.layers.2.self_attn.q_proj.bias"
    assert torch.equal(got[q], merge_tensors("linear", [m1[q], m2[q]], backend="torch", weight=[0.5, 0.5]))
    assert torch.equal(got["model.layers.3.self_attn.q_proj.bias"], got[q])  # text layer 2 again as layer 3
    assert len(got) == len(mb) + 12 + 12  # one vision block and one text layer more than the inputs
    cfg_out = json.loads((tmp_path / "out" / "config.json").read_text())
    # Qwen2-VL counts its text layers at the top level and in text_config: both follow the output
    assert cfg_out["vision_config"]["depth"] == 3 and cfg_out["num_hidden_layers"] == cfg_out["text_config"]["num_hidden_layers"] == 4


def test_gemma3_text_slices_rebuild_its_per_layer_config(tmp_path):
    """Gemma3 lists each text layer's attention kind in ``text_config.layer_types``, and transformers refuses
    a config whose list and layer count differ: text slices 0-3 + 1-3 give 5 layers of kinds 0, 1, 2, 1, 2.
    Embeddings are tied: no lm_head in, none out."""
    import transformers

    shape = Gemma3VLShape(hidden=32, layers=4, intermediate=48, heads=2, kv_heads=1, head_dim=16, vocab=64, vision_hidden=16,
                          vision_layers=2, vision_intermediate=24, vision_heads=2)
    base, (ft1,) = make_family(tmp_path / "fam", shape, n_finetunes=1, dtype="float32")
    src = [{"model": str(ft1), "layer_range": [0, 3]}], [{"model": str(ft1), "layer_range": [1, 3]}]
    cfg = {"merge_method": "linear", "parameters": {"weight": 1.0},
           "modules": {"text_decoder": {"slices": [{"sources": src[0]}, {"sources": src[1]}]},
                       "vision_tower": {"models": [str(base)]}, "multi_modal_projector": {"models": [str(ft1)]}}}
    merge(cfg, tmp_path / "out", progress=False)
    kinds = json.loads((base / "config.json").read_text())["text_config"]["layer_types"]
    out = json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]
    assert out["num_hidden_layers"] == 5 and out["layer_types"] == [kinds[i] for i in (0, 1, 2, 1, 2)]
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").text_config.num_hidden_layers == 5
    got, f1 = load_model(tmp_path / "out"), load_model(ft1)
    assert not any("lm_head" in n for n in got)
    n = "language_model.model.layers.{}.self_attn.q_norm.weight"
    assert torch.equal(got[n.format(4)], f1[n.format(2)]) and torch.equal(got[n.format(3)], f1[n.format(1)])


SMALL = dict(hidden=32, layers=4, intermediate=48, heads=2, kv_heads=1, vocab=64)
MODERN_CASES = [
    (Mistral3Shape(**SMALL, vision_hidden=16, vision_layers=3, vision_intermediate=24, vision_heads=2, patch=2), MODERN_LLAVA),
    (Gemma3VLShape(**SMALL, head_dim=16, vision_hidden=16, vision_layers=3, vision_intermediate=24, vision_heads=2), MODERN_GEMMA3),
    (Qwen2VLShape(**SMALL, vision_embed=16, vision_depth=3), MODERN_QWEN_VL),
    (Qwen25VLShape(**SMALL, vision_embed=16, vision_depth=3), MODERN_QWEN_VL),
]


@pytest.mark.parametrize("shape,rules", MODERN_CASES, ids=[type(s).__name__ for s, _ in MODERN_CASES])
def test_names_transformers_saves_merge_as_the_earlier_ones(tmp_path, shape, rules):
    """transformers >= 4.52 saves these models as ``model.language_model.layers.N``, ``model.visual...``,
    ``lm_head`` (mergekit 0.1.5 knows only the earlier names): the same family under either naming gives the
    same merge, tensor for tensor under the new names, with ``modules`` (slices renumbering text and vision
    layers) and with plain ``models``."""
    import dataclasses

    old = make_family(tmp_path / "old", shape, n_finetunes=1, dtype="float32")
    new = make_family(tmp_path / "new", dataclasses.replace(shape, modern=True), n_finetunes=1, dtype="float32")

    def configs(fam):
        base, (ft1,) = fam
        sl = [{"sources": [{"model": str(base), "layer_range": [0, 2]}, {"model": str(ft1), "layer_range": [0, 2]}]},
              {"sources": [{"model": str(base), "layer_range": [1, 3]}, {"model": str(ft1), "layer_range": [1, 3]}]}]
        return [
            {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5, "weight": [0.2, 1.0]},
             "modules": {"text_decoder": {"slices": sl}, "vision_tower": {"slices": sl, "parameters": {"density": 0.8}},
                         "multi_modal_projector": {"models": [str(ft1)]}}},
            {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5, "weight": [0.2, 1.0]},
             "models": [str(ft1)]},
        ]

    def renamed(name):
        o, n = next(((o, n) for o, n in rules if name.startswith(o)), ("", ""))
        return n + name[len(o):]

    for k, (c_old, c_new) in enumerate(zip(configs(old), configs(new))):
        merge(c_old, tmp_path / f"o{k}", progress=False)
        merge(c_new, tmp_path / f"n{k}", progress=False)
        a, b = load_model(tmp_path / f"o{k}"), load_model(tmp_path / f"n{k}")
        assert sorted(renamed(n) for n in a) == sorted(b)
        assert all(torch.equal(a[n], b[renamed(n)]) for n in a)
        ca, cb = (json.loads((tmp_path / f"{x}{k}" / "config.json").read_text()) for x in "on")
        assert ca == cb
    assert len(load_model(tmp_path / "n0")) > len(load_model(new[0]))  # the slices added a vision layer (4 from 3)


# ------------------------------------------------------------------------------------------------ bad input


def _add_tensor(src, dst, name):
    """A copy of model folder ``src`` at ``dst`` with one more tensor ``name`` in its (single) shard."""
    import shutil

    shutil.copytree(src, dst)
    files = sorted(dst.glob("*.safetensors"))
    assert len(files) == 1 and not (dst / "model.safetensors.index.json").exists()
    t = load_file(files[0])
    t[name] = torch.zeros(4)
    save_file(t, files[0])
    return dst


@pytest.fixture(scope="module")
def m3_single(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("mistral3_single"), M3, n_finetunes=1, dtype="float32", shard_bytes=10**9)


@pytest.mark.parametrize("edit,err,msg", [
    (lambda c: c["modules"].update(audio_tower={"models": c["modules"]["vision_tower"]["models"]}), ConfigError,
     r"modules\.audio_tower: Mistral3ForConditionalGeneration has no module 'audio_tower' \(its modules: text_decoder, "),
    (lambda c: c["modules"].pop("vision_tower"), ConfigError,
     r"module 'vision_tower' of Mistral3ForConditionalGeneration is not configured \(\d+ tensors, e\.g\. 'vision_tower\."
     r".*add modules\.vision_tower"),
    (lambda c: c["modules"]["text_decoder"]["slices"][1]["sources"][0].update(layer_range=[2, 4]), ConfigError,
     "same number of layers"),
    (lambda c: [s.update(layer_range=[3, 6]) for s in c["modules"]["text_decoder"]["slices"][1]["sources"]], CheckpointError,
     r"modules\.text_decoder\.slices\[1\] asks for layer 4 of text_decoder, which this model does not have"),
    (lambda c: c["modules"]["text_decoder"]["slices"][0]["sources"].pop(0), ConfigError,
     r"modules\.text_decoder: slices\[0\]: base_model .* must be one of the slice's sources"),
])
def test_bad_modules_fail_in_one_line_and_write_nothing(tmp_path, m3, edit, err, msg):
    cfg = _per_module(m3)
    edit(cfg)
    out = tmp_path / "out"
    with pytest.raises(err, match=msg) as e:
        merge(cfg, out, progress=False)
    assert "\n" not in str(e.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_tensor_of_no_module_is_named(tmp_path, m3_single):
    base, (ft1,) = m3_single
    odd = _add_tensor(ft1, tmp_path / "odd", "image_newline")
    cfg = {"merge_method": "linear", "parameters": {"weight": 0.5},
           "modules": {m: {"models": [str(base), str(odd)]} for m in ("text_decoder", "vision_tower", "multi_modal_projector")}}
    with pytest.raises(CheckpointError, match=r"odd: tensor 'image_newline' belongs to no module of Mistral3ForConditionalGeneration"):
        plan(cfg)


def test_module_tensor_only_in_one_input_is_named(tmp_path, m3_single):
    base, (ft1,) = m3_single
    odd = _add_tensor(ft1, tmp_path / "odd", "vision_tower.extra.weight")
    cfg = {"merge_method": "linear", "parameters": {"weight": 0.5},
           "modules": {m: {"models": [str(base), str(odd)]} for m in ("text_decoder", "vision_tower", "multi_modal_projector")}}
    with pytest.raises(CheckpointError, match=r"odd: tensor 'vision_tower\.extra\.weight' is not in .*base"):
        plan(cfg)


def test_modules_on_a_single_module_architecture(tmp_path):
    base, (ft1,) = make_family(tmp_path, LlamaShape(hidden=16, layers=2, intermediate=24, vocab=32, heads=2), n_finetunes=1)
    cfg = {"merge_method": "linear", "parameters": {"weight": 0.5}, "modules": {"text_decoder": {"models": [str(base), str(ft1)]}}}
    with pytest.raises(ConfigError, match="'modules' needs a multi-module architecture, and .* names LlamaForCausalLM"):
        plan(cfg)


@pytest.mark.parametrize("modules,msg", [
    ({"text_decoder": {}}, r"modules\.text_decoder: give either 'models' or 'slices'"),
    ({"text_decoder": {"models": ["a"], "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]}},
     r"modules\.text_decoder: give either 'models' or 'slices'"),
    ({"text_decoder": {"models": ["a"], "merge_method": "ties"}}, r"modules\.text_decoder: merge_method: every module is merged"),
    ({"text_decoder": {"models": ["a"], "weight": 1}}, r"modules\.text_decoder: unknown field 'weight'"),
    ({"text_decoder": {"models": [{"model": "a", "parameters": {"wieght": 1}}]}}, r"modules\.text_decoder: models\[0\] .*'wieght'"),
    ({"text_decoder": {"models": ["a"], "parameters": "x"}}, r"modules\.text_decoder\.parameters: must be a mapping"),
    ({"text_decoder": {"models": ["a"]}}, r"modules\.text_decoder: models\[0\] \(a\): missing required parameter 'weight'"),
    ([], "'modules' must be a non-empty mapping"),
])
def test_module_config_errors(modules, msg):
    with pytest.raises(ConfigError, match=msg):
        MergeConfig.from_dict({"merge_method": "linear", "modules": modules})


def test_modules_with_models_or_slices_is_refused():
    with pytest.raises(ConfigError, match="give one of 'models', 'slices' or 'modules'"):
        MergeConfig.from_dict({"merge_method": "linear", "parameters": {"weight": 1}, "models": ["a"],
                               "modules": {"text_decoder": {"models": ["a"]}}})


def test_config_round_trip(m3):
    cfg = MergeConfig.from_dict(_per_module(m3))
    again = MergeConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict() and list(again.modules) == ["text_decoder", "vision_tower", "multi_modal_projector"]
    assert again.modules["vision_tower"].parameters == {"density": 0.8}


def test_top_level_slices_on_a_multi_module_model_are_refused(tmp_path, m3):
    """One layer numbering over the whole checkpoint would interleave text and vision layers (both are
    ``...layers.N.``); mergekit 0.1.5 refuses it as well."""
    base, (ft1, ft2) = m3
    cfg = {"merge_method": "linear", "parameters": {"weight": 1.0},
           "slices": [{"sources": [{"model": str(ft1), "layer_range": [0, 2]}]}]}
    with pytest.raises(ConfigError, match=r"slices: Mistral3ForConditionalGeneration has several modules \(text_decoder, "
                                          r"vision_tower, multi_modal_projector\); give each module's slices under modules"):
        merge(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_side_files_name_every_module_input(tmp_path, m3):
    """The model card lists the modules' models (the base as the base), and fastmerge_config.yml keeps the
    modules as written."""
    import yaml

    base, (ft1, ft2) = m3
    merge(_per_module(m3), tmp_path / "out", progress=False, write_model_card=True)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"using {base} as a base" in card and f"* {ft1}\n" in card and f"* {ft2}\n" in card and f"* {base}\n" not in card
    saved = yaml.safe_load((tmp_path / "out" / "fastmerge_config.yml").read_text())
    assert saved == MergeConfig.from_dict(_per_module(m3)).to_dict() and list(saved["modules"])[0] == "text_decoder"


def test_parameter_warnings_name_where_the_parameter_is_written():
    """A global parameter the method does not use is reported once, as global; a module's as the module's."""
    cfg = {"merge_method": "linear", "parameters": {"weight": 1, "density": 0.5},
           "modules": {"text_decoder": {"models": ["a"]}, "vision_tower": {"models": ["a"], "parameters": {"epsilon": 0.1}}}}
    with pytest.warns(UserWarning) as rec:
        MergeConfig.from_dict(cfg)
    assert sorted(str(w.message) for w in rec) == [
        "config: modules.vision_tower: parameters.epsilon: not used by merge_method 'linear' (ignored)",
        "config: parameters.density: not used by merge_method 'linear' (ignored)"]
    cfg["modules"]["vision_tower"]["parameters"] = {"wieght": 1}
    with pytest.raises(ConfigError, match=r"modules\.vision_tower: parameters: unknown parameter 'wieght' \(did you mean 'weight'\?\)"):
        MergeConfig.from_dict(cfg)


def test_mixed_architectures_are_named_before_modules(tmp_path, m3):
    """A LLaMA among the inputs of a Mistral3 merge: the architecture check names it (not a module error)."""
    base, (ft1, ft2) = m3
    llama, _ = make_family(tmp_path, LlamaShape(hidden=16, layers=2, intermediate=24, vocab=32, heads=2), n_finetunes=0)
    cfg = _per_module(m3)
    cfg["modules"]["vision_tower"]["models"][1]["model"] = str(llama)
    with pytest.raises(ConfigError, match=r"architecture LlamaForCausalLM .* differs from .*Mistral3ForConditionalGeneration"):
        plan(cfg)
