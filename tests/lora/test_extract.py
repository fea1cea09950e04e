"""fastmerge extract-lora: adapters PEFT loads, reconstruction error vs the optimal truncated SVD, mergekit's
rules (modules_to_save, regexes, ranks), the command line and its errors. Generated models only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastmerge import cli
from fastmerge.errors import OutputError
from fastmerge.lora import extract_lora
from fastmerge.testing import LlamaShape, make_family

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    base, fts = make_family(root, LlamaShape(hidden=128, layers=2, intermediate=344, vocab=200, heads=4), n_finetunes=1,
                            dtype="float32")
    return base, fts[0]


def _sd(p: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(p.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("svd,threads", [("krylov", 2), ("krylov", 1), ("randomized", 1), ("exact", 1)])
def test_extract_then_peft_load_and_reconstruction_error(fam, tmp_path, svd, threads):
    base, ft = fam
    k = 12  # randomized: l = 24 < 128/2, krylov: 5 blocks of 6 = 30 < 64: the sketch runs on every matrix
    rep = extract_lora(ft, base, tmp_path / "ad", max_rank=k, svd=svd, threads=threads, batch_bytes=128 * 344 * 4 * 3)
    assert rep.svd == svd and rep.max_rank == k and rep.factored == 14
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == k and cfg["lora_alpha"] == k and sorted(cfg["modules_to_save"]) == sorted(
        ["embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm", "norm"])
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    # PEFT loads it onto the base and merges it: the fine-tune's rank-k approximation, full tensors exact
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "ad").merge_and_unload().state_dict()
    b, f = _sd(base), _sd(ft)
    for name in f:
        if name.endswith("norm.weight") or "embed" in name or "lm_head" in name:
            assert torch.equal(merged[name], f[name]), name
            continue
        d = f[name] - b[name]
        s = torch.linalg.svdvals(d)
        optimal = s[k:].square().sum().sqrt()
        err = (f[name] - merged[name]).norm()
        assert err <= 1.02 * optimal, (name, float(err / optimal))


def test_extract_recovers_an_exact_low_rank_adapter_and_ranks_by_sv_epsilon(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
                                   vocab_size=50, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                             peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "up_proj", "embed_tokens"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_()
    pm.merge_and_unload().save_pretrained(tmp_path / "ft")
    rep = extract_lora(tmp_path / "ft", tmp_path / "base", tmp_path / "ad", max_rank=16, sv_epsilon=1e-3, embed_lora=True)
    assert rep.ranks["model.layers.0.self_attn.q_proj"] == 3 and rep.ranks["model.embed_tokens"] == 3
    assert rep.ranks["model.layers.0.self_attn.k_proj"] == 1  # unchanged: rank >= 1 kept, as PEFT needs
    doc = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert doc["r"] == 3 and doc["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 1
    ad = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert ad["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (3, 50)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "ad").merge_and_unload().state_dict()
    want = _sd(tmp_path / "ft")
    for k, v in want.items():
        torch.testing.assert_close(merged[k], v, atol=2e-5, rtol=1e-4)


def test_include_exclude_save_module_and_cli(fam, tmp_path, capsys):
    base, ft = fam
    rc = cli.main(["extract-lora", "--model", str(ft), "--base-model", str(base), "--out-path", str(tmp_path / "ad"),
                   "--max-rank", "4", "-i", "self_attn", "-e", "layers\\.1\\.self_attn\\.v_proj",
                   "--save-module", "o_proj", "--skip-undecomposable", "--threads", "1"])
    assert rc == 0 and "extracted" in capsys.readouterr().out
    doc = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    ad = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    # v_proj of layer 1 excluded: target_modules names the v_proj it did factor in full
    assert sorted(doc["target_modules"]) == ["k_proj", "model.layers.0.self_attn.v_proj", "q_proj"]
    assert "base_model.model.model.layers.1.self_attn.o_proj.weight" in ad  # --save-module: full rank
    assert not any("mlp" in k or "norm" in k for k in ad)
    assert "o_proj" in doc["modules_to_save"] and "embed_tokens" in doc["modules_to_save"]
    # refused: an existing output, one line and exit 2
    rc = cli.main(["extract-lora", "--model", str(ft), "--base-model", str(base), "--out-path", str(tmp_path / "ad")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "output exists" in err and len(err.splitlines()) == 1
    with pytest.raises(OutputError):
        extract_lora(ft, base, ft / "inside")
