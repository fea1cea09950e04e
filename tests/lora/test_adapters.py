"""Adapter merging (fastmerge.lora.merge_adapters) against PEFT's own add_weighted_adapter, and the
merge_utils functions against PEFT's. Generated models and adapters only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastmerge.errors import CheckpointError, ConfigError
from fastmerge.lora import merge_utils
from fastmerge.lora.adapters import merge_adapters

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, tie_word_embeddings=False)


def _adapter(root: Path, base: Path, seed: int, **kw) -> Path:
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    pm = peft.get_peft_model(model, peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"],
                                                        **kw}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(root / "base")
    ads = [_adapter(root / "a1", root / "base", 1), _adapter(root / "a2", root / "base", 2, lora_alpha=4),
           _adapter(root / "a3", root / "base", 3, target_modules=["q_proj", "k_proj", "embed_tokens"])]
    one = LLAMA | {"num_hidden_layers": 1}
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**one)).save_pretrained(root / "base1")
    single = [_adapter(root / f"s{i}", root / "base1", 10 + i, target_modules=["q_proj"]) for i in range(2)]
    return root, ads, single


def _peft(base: Path, ads: list[Path], weights, out: Path, seed: int | None = None, **kw) -> dict[str, torch.Tensor]:
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    pm = peft.PeftModel.from_pretrained(model, ads[0], adapter_name="a0")
    for i, a in enumerate(ads[1:], 1):
        pm.load_adapter(a, adapter_name=f"a{i}")
    if seed is not None:
        torch.manual_seed(seed)
    pm.add_weighted_adapter([f"a{i}" for i in range(len(ads))], list(weights), "m", **kw)
    pm.save_pretrained(out, selected_adapters=["m"])
    return load_file(out / "m" / "adapter_model.safetensors")


def _delta(sd: dict[str, torch.Tensor], mod: str) -> torch.Tensor:
    p = f"base_model.model.{mod}"
    if p + ".lora_A.weight" in sd:
        return sd[p + ".lora_B.weight"].float() @ sd[p + ".lora_A.weight"].float()
    return sd[p + ".lora_embedding_B"].float() @ sd[p + ".lora_embedding_A"].float()


W = [0.7, -0.4, 1.1]
MODS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.0.self_attn.k_proj", "model.embed_tokens"]


@pytest.mark.parametrize("ctype,kw", [("cat", {}), ("linear", {}), ("ties", {"density": 0.5}),
                                      ("magnitude_prune", {"density": 0.3}),
                                      ("ties", {"density": 0.6, "majority_sign_method": "frequency"})])
def test_factor_wise_types_equal_peft_bit_for_bit(fam, tmp_path, ctype, kw):
    root, ads, _ = fam
    ws = W if ctype == "cat" else W[:2]  # a3's extra modules are rank 4 too, but linear & co. keep PEFT's "one rank"
    use = ads if ctype == "cat" else ads[:2]
    want = _peft(root / "base", use, ws, tmp_path / "peft", combination_type=ctype, **kw)
    merge_adapters(use, ws, tmp_path / "fm", combination_type=ctype, **kw)
    got = load_file(tmp_path / "fm" / "adapter_model.safetensors")
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    cfg = json.loads((tmp_path / "fm" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == (12 if ctype == "cat" else 4)


@pytest.mark.parametrize("ctype", ["dare_linear", "dare_ties"])
def test_dare_types_equal_peft_merge_utils_with_the_same_seed(fam, tmp_path, ctype):
    """PEFT's add_weighted_adapter draws its new adapter's init from the global generator before the masks, so
    the masks are compared with PEFT's own functions on the factors, with the seed merge_adapters sets."""
    import math

    from peft.utils import merge_utils as pm

    root, _, single = fam
    merge_adapters(single, [0.6, -0.5], tmp_path / "fm", combination_type=ctype, density=0.4, seed=7)
    got = load_file(tmp_path / "fm" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    sds = [load_file(a / "adapter_model.safetensors") for a in single]
    ws = [0.6 * 2.0, -0.5 * 2.0]  # weight x scaling (alpha 8 / r 4)
    wa = torch.tensor([math.copysign(math.sqrt(abs(w)), w) for w in ws])
    wb = torch.tensor([math.sqrt(abs(w)) for w in ws])
    torch.manual_seed(7)
    f = getattr(pm, ctype)
    want_a = f([sd[key.format("A")] for sd in sds], wa, 0.4)
    want_b = f([sd[key.format("B")] for sd in sds], wb, 0.4)
    assert torch.equal(got[key.format("A")], want_a) and torch.equal(got[key.format("B")], want_b)
    # and PEFT's own merge is the same kind of thing: same shapes, same keep rate
    want = _peft(root / "base1", single, [0.6, -0.5], tmp_path / "peft", seed=7, combination_type=ctype, density=0.4)
    assert want[key.format("A")].shape == got[key.format("A")].shape


def test_svd_is_exact_from_the_factors(fam, tmp_path):
    root, ads, _ = fam
    want = _peft(root / "base", ads, W, tmp_path / "peft", combination_type="svd", svd_rank=12)
    merge_adapters(ads, W, tmp_path / "fm", combination_type="svd", svd_rank=12)
    got = load_file(tmp_path / "fm" / "adapter_model.safetensors")
    for mod in MODS:
        torch.testing.assert_close(_delta(got, mod), _delta(want, mod), atol=1e-5, rtol=1e-4)
    # rank 12 = every rank of Σ w·s·B·A: the exact weighted sum of the deltas
    a = [load_file(x / "adapter_model.safetensors") for x in ads]
    exact = sum(w * (2.0 if i < 2 else 2.0) * (1 if i != 1 else 0.5) * _delta(sd, MODS[0]) for i, (w, sd) in enumerate(zip(W, a)))
    torch.testing.assert_close(_delta(got, MODS[0]), exact, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ctype", ["ties_svd", "dare_linear_svd", "magnitude_prune_svd"])
def test_svd_types_against_peft(fam, tmp_path, ctype, monkeypatch):
    root, ads, single = fam
    if ctype.startswith("dare"):  # PEFT's masks depend on its init draws: compare with its functions (same seed)
        from peft.utils import merge_utils as pm

        sds = [load_file(a / "adapter_model.safetensors") for a in single]
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
        merge_adapters(single, [0.6, 0.5], tmp_path / "exact", combination_type=ctype, density=0.5, svd_rank=6,
                       svd="exact", seed=3)
        torch.manual_seed(3)
        d = pm.dare_linear([2.0 * sd[key.format("B")] @ sd[key.format("A")] for sd in sds], torch.tensor([0.6, 0.5]), 0.5)
        u, s, vh = torch.linalg.svd(d)
        got = load_file(tmp_path / "exact" / "adapter_model.safetensors")
        torch.testing.assert_close(got[key.format("B")] @ got[key.format("A")], (u[:, :6] * s[:6]) @ vh[:6], atol=1e-5, rtol=1e-4)
        return
    use, base, ws = ads, root / "base", W
    dense = []  # the dense ΔW's PEFT decomposes, caught at its torch.linalg.svd call
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda a, *x, **kw: dense.append(a.detach().clone()) or real_svd(a, *x, **kw))
    want = _peft(base, use, ws, tmp_path / "peft", seed=3, combination_type=ctype, density=0.5, svd_rank=6)
    monkeypatch.setattr(torch.linalg, "svd", real_svd)
    merge_adapters(use, ws, tmp_path / "exact", combination_type=ctype, density=0.5, svd_rank=6, svd="exact", seed=3)
    import fastmerge.ops.krylov_svd as ks

    ran = []
    real_krylov = ks.krylov_svd
    monkeypatch.setattr(ks, "krylov_svd", lambda *a, **kw: ran.append(real_krylov(*a, **kw)[3]) or real_krylov(*a, **kw))
    merge_adapters(use, ws, tmp_path / "krylov", combination_type=ctype, density=0.5, svd_rank=6, seed=3)  # the default
    monkeypatch.setattr(ks, "krylov_svd", real_krylov)
    assert ran.count("krylov") >= 3  # the block Krylov SVD, not only its exact fallback, on most modules
    merge_adapters(use, ws, tmp_path / "rand", combination_type=ctype, density=0.5, svd_rank=6, svd="randomized", seed=3)
    ex = load_file(tmp_path / "exact" / "adapter_model.safetensors")
    kr = load_file(tmp_path / "krylov" / "adapter_model.safetensors")
    rd = load_file(tmp_path / "rand" / "adapter_model.safetensors")
    for k in want:
        if "lora_A" not in k and "lora_embedding_A" not in k:
            continue
        mod = k.removeprefix("base_model.model.").split(".lora_")[0]
        torch.testing.assert_close(_delta(ex, mod), _delta(want, mod), atol=1e-4, rtol=1e-3)
        # this module's ΔW: the caught matrix whose rank-6 truncation PEFT wrote (the others are other modules')
        w = _delta(want, mod)
        d = min((m for m in dense if m.shape == w.shape), key=lambda m: float((m - w).norm()))
        optimal = (d - w).norm()
        for name, got in (("krylov", kr), ("randomized", rd)):
            assert (d - _delta(got, mod)).norm() <= 1.02 * optimal + 1e-6, (name, mod)


def test_merge_utils_match_peft():
    from peft.utils import merge_utils as pm

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(17, 9, generator=g) for _ in range(3)]
    w = torch.tensor([0.5, -0.2, 0.9])
    assert torch.equal(merge_utils.task_arithmetic(ts, w), pm.task_arithmetic(ts, w))
    assert torch.equal(merge_utils.ties(ts, w, 0.4), pm.ties(ts, w, 0.4))
    assert torch.equal(merge_utils.ties(ts, w, 0.4, "frequency"), pm.ties(ts, w, 0.4, "frequency"))
    assert torch.equal(merge_utils.magnitude_prune(ts, w, 0.3), pm.magnitude_prune(ts, w, 0.3))
    for f in ("dare_linear", "dare_ties"):
        torch.manual_seed(5)
        a = getattr(merge_utils, f)(ts, w, 0.5)
        torch.manual_seed(5)
        assert torch.equal(a, getattr(pm, f)(ts, w, 0.5)), f


def test_bad_adapter_merges(fam, tmp_path):
    root, ads, _ = fam
    with pytest.raises(ConfigError, match="one rank"):
        a4 = _adapter(tmp_path / "a4", root / "base", 4, r=8)
        merge_adapters([ads[0], a4], [1, 1], tmp_path / "o", combination_type="linear")
    with pytest.raises(ConfigError, match="needs a density"):
        merge_adapters(ads[:2], [1, 1], tmp_path / "o", combination_type="ties")
    ms = _adapter(tmp_path / "ms", root / "base", 5, modules_to_save=["lm_head"])
    with pytest.raises(CheckpointError, match="whole tensor"):
        merge_adapters([ads[0], ms], [1, 1], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_merge_adapters(fam, tmp_path, capsys):
    from fastmerge import cli

    root, ads, _ = fam
    rc = cli.main(["merge-adapters", str(ads[0]), str(ads[1]), "-w", "0.5", "0.5", "--out-path", str(tmp_path / "o"),
                   "--combination-type", "cat"])
    assert rc == 0 and "merged" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["r"] == 8
    rc = cli.main(["merge-adapters", str(ads[0]), "-w", "1", "2", "--out-path", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "one weight per adapter" in err and not (tmp_path / "o2").exists()
