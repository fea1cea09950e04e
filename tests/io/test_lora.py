"""model+lora inputs (fastmerge.io.lora): PEFT adapters merged per tensor, checked against PEFT's own
``merge_and_unload()`` on generated tiny LLaMA models; bad adapters are one-line errors with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastmerge
from fastmerge.errors import CheckpointError, ConfigError, ShapeMismatchError

transformers = pytest.importorskip("transformers")  # test extras (mergekit depends on it; peft in .[test])
peft = pytest.importorskip("peft")

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96, tie_word_embeddings=False)


def _model(seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(dtype)


def make_model(root: Path, seed: int = 0, dtype=torch.float32) -> Path:
    _model(seed, dtype).save_pretrained(root)
    return root


def make_adapter(root: Path, base: Path, seed: int = 1, dtype=torch.float32, **lora_kw) -> Path:
    """A PEFT LoRA adapter for ``base`` with random nonzero B (PEFT initialises B to zero)."""
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=dtype)
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    kw.update(lora_kw)
    pm = peft.get_peft_model(model, peft.LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(root)
    return root


def peft_merged(base: Path, adapter: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=dtype)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def out_tensors(out: Path) -> dict[str, torch.Tensor]:
    res = {}
    for f in sorted(out.glob("*.safetensors")):
        res.update(load_file(f))
    return res


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_model(root / "base")
    full = make_adapter(root / "ad_full", base, seed=1, r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], modules_to_save=["lm_head"],
                        rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3})
    rs = make_adapter(root / "ad_rslora", base, seed=2, r=8, lora_alpha=4, use_rslora=True)
    return root, base, full, rs


@pytest.mark.parametrize("which", ["ad_full", "ad_rslora"])
def test_model_plus_lora_matches_peft_merge_and_unload_fp32(fam, tmp_path, which):
    root, base, *_ = fam
    ad = root / which
    want = peft_merged(base, ad)
    cfg = {"merge_method": "passthrough", "models": [{"model": f"{base}+{ad}"}]}
    rep = fastmerge.merge(cfg, tmp_path / "out", progress=False)
    assert rep.engine == "torch"  # the native engine refuses plans with LoRA updates
    got = out_tensors(tmp_path / "out")
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k  # fp32: bit-identical
    changed = [k for k in want if not torch.equal(want[k], load_file(base / "model.safetensors")[k])]
    if which == "ad_full":  # embedding LoRA, modules_to_save, rank/alpha patterns
        assert any("embed_tokens" in k for k in changed) and "lm_head.weight" in changed and len(changed) >= 8
    else:
        assert len(changed) == 6


def test_model_plus_lora_bf16_within_rounding(tmp_path):
    base = make_model(tmp_path / "base", dtype=torch.bfloat16)
    ad = make_adapter(tmp_path / "ad", base, dtype=torch.bfloat16, target_modules=["q_proj", "up_proj", "lm_head"])
    want = peft_merged(base, ad, dtype=torch.bfloat16)
    fastmerge.merge({"merge_method": "linear", "models": [{"model": f"{base}+{ad}", "parameters": {"weight": 1.0}}]},
                    tmp_path / "out", progress=False)
    got = out_tensors(tmp_path / "out")
    for k in want:
        assert got[k].dtype == torch.bfloat16
        # PEFT adds the fp32 delta in place (one rounding), as fastmerge: equal, at most one bf16 ulp apart
        d = (got[k].float() - want[k].float()).abs()
        ulp = want[k].float().abs().clamp_min(1e-30) * 2.0 ** -7
        assert bool((d <= ulp).all()), k
    assert torch.equal(got["lm_head.weight"], want["lm_head.weight"])


def test_fan_in_fan_out_and_lora_bias_gpt2(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=5, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                                    lora_bias=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_()
    pm.save_pretrained(tmp_path / "ad")
    m = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    want = peft.PeftModel.from_pretrained(m, tmp_path / "ad").merge_and_unload().state_dict()
    fastmerge.merge({"merge_method": "passthrough", "models": [f"{tmp_path / 'base'}+{tmp_path / 'ad'}"]},
                    tmp_path / "out", progress=False)
    got = out_tensors(tmp_path / "out")
    for k, v in got.items():
        assert torch.equal(v, want[k]), k
    k = "transformer.h.0.attn.c_attn.bias"  # lora_bias: bias += scale * lora_B.bias
    assert not torch.equal(got[k], load_file(tmp_path / "base" / "model.safetensors")[k])


def test_ties_of_several_model_plus_lora_equals_ties_of_peft_merged_models(fam, tmp_path):
    """A YAML with three model+lora inputs (two adapters on the base, one on another model, one as base_model)
    merged with ties = the same merge of the models PEFT merged and saved."""
    root, base, full, rs = fam
    ft = make_model(tmp_path / "ft", seed=5)
    ad_ft = make_adapter(tmp_path / "ad_ft", ft, seed=6)
    ad_b = make_adapter(tmp_path / "ad_b", base, seed=7, target_modules=["k_proj", "o_proj"])
    plain = {}
    for name, (m, a) in {"m1": (base, full), "m2": (base, rs), "m3": (ft, ad_ft), "b": (base, ad_b)}.items():
        plain[name] = tmp_path / name
        model = transformers.LlamaForCausalLM.from_pretrained(m)
        peft.PeftModel.from_pretrained(model, a).merge_and_unload().save_pretrained(plain[name])

    def cfg(refs):
        return (f"merge_method: ties\nbase_model: {refs['b']}\nmodels:\n"
                + "".join(f"  - model: {refs[k]}\n    parameters: {{weight: {w}, density: 0.5}}\n"
                          for k, w in (("m1", 0.5), ("m2", 0.3), ("m3", 0.4)))
                + "parameters: {normalize: true}\ndtype: float32\n")

    refs = {"m1": f"{base}+{full}", "m2": f"{base}+{rs}", "m3": f"{ft}+{ad_ft}", "b": f"{base}+{ad_b}"}
    (tmp_path / "lora.yml").write_text(cfg(refs))
    (tmp_path / "plain.yml").write_text(cfg({k: str(v) for k, v in plain.items()}))
    plan = fastmerge.plan(str(tmp_path / "lora.yml"))
    doc = json.loads(plan.dumps())
    q = next(t for t in doc["tensors"] if t["name"] == "model.layers.0.self_attn.q_proj.weight")
    assert [len(x) for x in q["lora"]] == [0, 1, 1, 1]  # base's adapter: k/o only
    assert q["lora"][1][0]["rank"] == 4 and q["lora"][2][0]["rank"] == 8 and q["lora"][3][0]["scale"] == 2.0
    assert q["lora"][2][0]["scale"] == pytest.approx(4 / 8 ** 0.5)  # rslora
    fastmerge.merge(str(tmp_path / "lora.yml"), tmp_path / "o1", progress=False, threads=1)
    fastmerge.merge(str(tmp_path / "plain.yml"), tmp_path / "o2", progress=False, threads=1)
    a, b = out_tensors(tmp_path / "o1"), out_tensors(tmp_path / "o2")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "o1" / "config.json").read_text())["num_hidden_layers"] == 2


def test_slices_and_tokenizer_source_paths_accept_model_plus_lora(fam, tmp_path):
    root, base, full, rs = fam
    cfg = {"merge_method": "passthrough",
           "slices": [{"sources": [{"model": f"{base}+{rs}", "layer_range": [1, 2]}]},
                      {"sources": [{"model": {"model": {"path": str(base)}, "lora": {"path": str(full)}}, "layer_range": [0, 1]}]}]}
    fastmerge.merge(cfg, tmp_path / "out", progress=False)
    got = out_tensors(tmp_path / "out")
    w_rs, w_full = peft_merged(base, rs), peft_merged(base, full)
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], w_rs["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(got["model.layers.1.self_attn.v_proj.weight"], w_full["model.layers.0.self_attn.v_proj.weight"])
    assert torch.equal(got["lm_head.weight"], w_full["lm_head.weight"])  # heads from the last slice
    assert torch.equal(got["model.embed_tokens.weight"], w_rs["model.embed_tokens.weight"])  # embeddings from the first


def test_the_native_engine_refuses_lora_plans_with_a_reason(fam):
    from fastmerge import engine

    root, base, full, rs = fam
    plan = fastmerge.plan({"merge_method": "linear", "models": [{"model": f"{base}+{rs}", "parameters": {"weight": 1.0}}]})
    why = engine.explain(plan)
    assert "LoRA adapter (model+lora)" in why["native"][0] and why["torch"] == []


# -- bad input: one line each, nothing written --------------------------------------------------------------


def _bad(tmp_path, ref: str, exc=CheckpointError) -> str:
    out = tmp_path / "out"
    with pytest.raises(exc) as e:
        fastmerge.merge({"merge_method": "passthrough", "models": [ref]}, out, progress=False)
    assert not out.exists() and "\n" not in str(e.value)
    return str(e.value)


def test_adapter_whose_shapes_do_not_match_the_model(fam, tmp_path):
    root, base, full, rs = fam
    torch.manual_seed(0)
    other = tmp_path / "other"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, "intermediate_size": 48})).save_pretrained(other)
    ad = make_adapter(tmp_path / "ad", other)
    msg = _bad(tmp_path, f"{base}+{ad}", ShapeMismatchError)
    assert "adapter_model.safetensors" in msg and "down_proj" in msg and "[32, 64]" in msg


def test_missing_adapter_config(fam, tmp_path):
    root, base, full, rs = fam
    ad = tmp_path / "ad"
    shutil.copytree(rs, ad)
    (ad / "adapter_config.json").unlink()
    msg = _bad(tmp_path, f"{base}+{ad}")
    assert "adapter_config.json: missing" in msg


def test_adapter_for_modules_the_model_lacks(fam, tmp_path):
    root, base, full, rs = fam
    torch.manual_seed(0)
    deeper = tmp_path / "deeper"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, "num_hidden_layers": 3})).save_pretrained(deeper)
    ad = make_adapter(tmp_path / "ad", deeper)
    msg = _bad(tmp_path, f"{base}+{ad}")
    assert "model.layers.2." in msg and "does not have" in msg


@pytest.mark.parametrize("field,value,words", [
    ("use_dora", True, "use_dora: DoRA"),
    ("peft_type", "LOHA", "peft_type 'LOHA' is not supported"),
    ("r", 3, "r = 3 but"),
    ("rank_pattern", {"q_proj": 2}, "rank_pattern['q_proj'] = 2"),
])
def test_unsupported_or_inconsistent_adapter_config(fam, tmp_path, field, value, words):
    root, base, full, rs = fam
    ad = tmp_path / "ad"
    shutil.copytree(rs, ad)
    doc = json.loads((ad / "adapter_config.json").read_text())
    doc[field] = value
    (ad / "adapter_config.json").write_text(json.dumps(doc))
    msg = _bad(tmp_path, f"{base}+{ad}")
    assert words in msg and "adapter_config.json" in msg


def test_dora_magnitude_tensor_and_missing_weights_and_bad_refs(fam, tmp_path):
    root, base, full, rs = fam
    ad = tmp_path / "ad"
    shutil.copytree(rs, ad)
    sd = load_file(ad / "adapter_model.safetensors")
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
    save_file(sd, ad / "adapter_model.safetensors")
    assert "lora_magnitude_vector' is not a plain LoRA factor" in _bad(tmp_path, f"{base}+{ad}")
    (ad / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors: missing" in _bad(tmp_path, f"{base}+{ad}")
    assert "not found" in _bad(tmp_path, f"{base}+{tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match="one '\\+'"):
        fastmerge.plan({"merge_method": "passthrough", "models": [f"{base}+a+b"]})


def test_cli_error_is_one_line(fam, tmp_path, capsys):
    from fastmerge import cli

    root, base, full, rs = fam
    (tmp_path / "c.yml").write_text(f"merge_method: passthrough\nmodels:\n  - model: {base}+{tmp_path / 'missing'}\n")
    rc = cli.main(["merge", str(tmp_path / "c.yml"), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "missing" in err and not (tmp_path / "out").exists()


def test_a_folder_named_with_a_plus_is_a_plain_path(fam, tmp_path):
    root, base, full, rs = fam
    odd = tmp_path / "a+b"
    shutil.copytree(base, odd)
    fastmerge.merge({"merge_method": "passthrough", "models": [str(odd)]}, tmp_path / "out", progress=False)
    assert torch.equal(out_tensors(tmp_path / "out")["lm_head.weight"], load_file(base / "model.safetensors")["lm_head.weight"])


def test_row_blocks_give_the_same_bytes(fam, tmp_path, monkeypatch):
    """Large tensors are merged in row blocks of fp32 delta (BLOCK_BYTES): same result as one block."""
    from fastmerge.io import lora

    root, base, full, rs = fam
    want = peft_merged(base, full)
    monkeypatch.setattr(lora, "BLOCK_BYTES", 3 * 32 * 4)  # 3 rows of a 32-wide tensor per block
    fastmerge.merge({"merge_method": "passthrough", "models": [f"{base}+{full}"]}, tmp_path / "out", progress=False)
    got = out_tensors(tmp_path / "out")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
