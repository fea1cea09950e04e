"""fastmerge extract-lora: adapters PEFT loads, reconstruction error vs the optimal truncated SVD, mergekit's
rules (modules_to_save, regexes, ranks), the command line and its errors. Generated models only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

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


def _pair(root: Path, base_dtype: str, ft_dtype: str, nan: float | None = None) -> tuple[Path, Path]:
    """A hand-made base and fine-tune with odd shapes: full-rank noise task vectors (the hard case), a bias, an
    input embedding (factored transposed with embed_lora) and a norm; ``nan`` poisons one entry of one weight."""
    g = torch.Generator().manual_seed(11)
    shapes = {"model.embed_tokens.weight": (53, 80), "model.layers.0.self_attn.q_proj.weight": (96, 80),
              "model.layers.0.self_attn.q_proj.bias": (96,), "model.layers.0.mlp.up_proj.weight": (203, 80),
              "model.layers.0.mlp.down_proj.weight": (80, 203), "model.norm.weight": (80,)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    ft = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    if nan is not None:
        ft["model.layers.0.mlp.up_proj.weight"][17, 5] = nan
    for name, sd, dt in (("base", base, base_dtype), ("ft", ft, ft_dtype)):
        (root / name).mkdir()
        save_file({n: t.to(getattr(torch, dt)).contiguous() for n, t in sd.items()}, root / name / "model.safetensors")
    return root / "base", root / "ft"


@pytest.mark.parametrize("base_dtype,ft_dtype", [("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "float32"),
                                                 ("bfloat16", "float32"), ("float16", "bfloat16")])
def test_numpy_path_against_the_exact_svd_and_the_torch_krylov_every_dtype(tmp_path, base_dtype, ft_dtype):
    base, ft = _pair(tmp_path, base_dtype, ft_dtype)
    k = 8
    rep = extract_lora(ft, base, tmp_path / "ad", max_rank=k, embed_lora=True, threads=2)
    assert rep.svd == "krylov" and rep.factored == 4 and set(rep.ranks.values()) == {k}
    ad, b, f = load_file(tmp_path / "ad" / "adapter_model.safetensors"), _sd(base), _sd(ft)
    out_dtype = torch.promote_types(getattr(torch, base_dtype), getattr(torch, ft_dtype))
    assert {t.dtype for t in ad.values() if t.dim() == 2} == {out_dtype}
    from fastmerge.ops.krylov_svd import krylov_svd

    for mod, transposed in [("model.embed_tokens", True), ("model.layers.0.self_attn.q_proj", False),
                            ("model.layers.0.mlp.up_proj", False), ("model.layers.0.mlp.down_proj", False)]:
        d = f[mod + ".weight"].float() - b[mod + ".weight"].float()
        if transposed:  # PEFT's embedding layout: Δᵀ ≈ B·A
            a_, b_ = ad[f"base_model.model.{mod}.lora_embedding_A"], ad[f"base_model.model.{mod}.lora_embedding_B"]
            d = d.T
        else:
            a_, b_ = ad[f"base_model.model.{mod}.lora_A.weight"], ad[f"base_model.model.{mod}.lora_B.weight"]
        opt = torch.linalg.svdvals(d.double())[k:].square().sum().sqrt()
        mine = float((d.double() - b_.double() @ a_.double()).norm() / opt)
        u, s, v, how = krylov_svd(d, k)  # the torch implementation of the same algorithm, on the same Δ
        theirs = float((d.double() - ((u * s) @ v.T).double()).norm() / opt)
        assert how == "krylov" and mine <= 1.02 and abs(mine - theirs) <= 0.01, (mod, mine, theirs)
    bias = ad["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"]
    want = (f["model.layers.0.self_attn.q_proj.bias"].float() - b["model.layers.0.self_attn.q_proj.bias"].float()).to(out_dtype)
    assert torch.equal(bias, want)  # Δbias rounded to the output dtype as torch rounds it
    assert torch.equal(ad["base_model.model.model.norm.weight"], f["model.norm.weight"])  # saved whole, byte for byte


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_task_vector_gets_nan_factors_and_a_warning_naming_it(tmp_path, bad):
    base, ft = _pair(tmp_path, "bfloat16", "bfloat16", nan=bad)
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.up_proj\.weight: .* NaN or inf"):
        extract_lora(ft, base, tmp_path / "ad", max_rank=8)
    ad = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    for key, t in ad.items():
        assert t.isnan().all() if "up_proj.lora_" in key else torch.isfinite(t).all(), key


def test_cli_extract_imports_no_torch_and_peft_loads_the_adapter(fam, tmp_path):
    """``python -m fastmerge extract-lora`` as a child process (outside the repository): no torch module is
    imported (``-X importtime`` lists every import), and PEFT applies the adapter it wrote."""
    import subprocess
    import sys

    base, ft = fam
    out = tmp_path / "ad"
    cmd = [sys.executable, "-X", "importtime", "-m", "fastmerge", "extract-lora", "--model", str(ft), "--base-model",
           str(base), "--out-path", str(out), "--max-rank", "12"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "numpy" in imported and "fastmerge.lora.extract" in imported  # the listing is real
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")], "torch was imported"
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, out).merge_and_unload().state_dict()
    b, f = _sd(base), _sd(ft)
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        d = f[name] - b[name]
        opt = torch.linalg.svdvals(d)[12:].square().sum().sqrt()
        assert (f[name] - merged[name]).norm() <= 1.02 * opt, name
    assert torch.equal(merged["model.embed_tokens.weight"], f["model.embed_tokens.weight"])
