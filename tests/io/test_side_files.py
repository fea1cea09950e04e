"""The files beside the weights: what is copied from which model, and config.json made to match the
output (per-layer lists following the slices), checked by loading the output with transformers."""

from __future__ import annotations

import json

import pytest
import torch

from fastmerge import merge

transformers = pytest.importorskip("transformers")  # a test extra (mergekit depends on it)


def _qwen2(root, seed):
    """A tiny Qwen2 with a ``layer_types`` list (full attention below ``max_window_layers``, sliding above)."""
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96, use_sliding_window=True, max_window_layers=2,
                                   sliding_window=8)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg)
    model.save_pretrained(root, safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    a, b = _qwen2(root / "a", 0), _qwen2(root / "b", 1)
    (a / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9], "temperature": 0.6}))
    (a / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return a, b


def test_generation_config_and_chat_template_are_copied(qwen, tmp_path):
    a, b = qwen
    doc = {"merge_method": "linear", "base_model": str(a),
           "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}
    merge(doc, tmp_path / "o", progress=False)
    for name in ("generation_config.json", "chat_template.json"):
        assert (tmp_path / "o" / name).read_bytes() == (a / name).read_bytes(), name


def test_slices_output_has_per_layer_lists_that_follow_the_slices_and_loads(qwen, tmp_path):
    a, b = qwen
    # layers 0-1 of a, then 3-3 of b, then 2-3 of a: 5 layers, sources [0, 1, 3, 2, 3]
    doc = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(b), "layer_range": [3, 4]}]},
        {"sources": [{"model": str(a), "layer_range": [2, 4]}]},
    ]}
    merge(doc, tmp_path / "s", progress=False)
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    src = json.loads((a / "config.json").read_text())["layer_types"]
    assert cfg["num_hidden_layers"] == 5
    assert cfg["layer_types"] == [src[i] for i in (0, 1, 3, 2, 3)]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s")  # refuses a mismatched layer_types
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 96) and torch.isfinite(logits).all()


# The architectures people merge, from transformers' own config classes: a plain merge and a slices merge
# of each, loaded back by transformers (nothing missing, nothing unexpected) and run forward once.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "max_window_layers": 2, "sliding_window": 8}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "sliding_window": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch_pair(request, tmp_path_factory):
    config_cls, model_cls, extra = ARCHITECTURES[request.param]
    if not hasattr(transformers, config_cls) or not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    cfg = getattr(transformers, config_cls)(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=96, **extra)
    root = tmp_path_factory.mktemp(request.param)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        getattr(transformers, model_cls)(cfg).save_pretrained(root / str(seed), safe_serialization=True)
        paths.append(root / str(seed))
    return request.param, paths[0], paths[1]


def _load_and_run(out):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 96) and torch.isfinite(logits).all()
    return model


def _layer(model, i):
    return dict(model.model.layers[i].named_parameters())


@pytest.mark.parametrize("kind", ["plain", "slices"])
def test_transformers_architectures_merge_load_and_run(arch_pair, kind, tmp_path):
    name, a, b = arch_pair
    if kind == "plain":
        doc = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                                    {"model": str(b), "parameters": {"weight": 0.5}}]}
    else:  # layers 0-1 of a, 3 of b, 2-3 of a
        doc = {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(b), "layer_range": [3, 4]}]},
            {"sources": [{"model": str(a), "layer_range": [2, 4]}]},
        ]}
    merge(doc, tmp_path / "o", progress=False)
    model = _load_and_run(tmp_path / "o")
    if kind == "slices":
        assert model.config.num_hidden_layers == 5
        ma = transformers.AutoModelForCausalLM.from_pretrained(a)
        mb = transformers.AutoModelForCausalLM.from_pretrained(b)
        for out_layer, (src, i) in enumerate([(ma, 0), (ma, 1), (mb, 3), (ma, 2), (ma, 3)]):
            got, want = _layer(model, out_layer), _layer(src, i)
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in got), (name, out_layer)
