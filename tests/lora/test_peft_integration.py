"""fastmerge.integrations.peft: enable()/disable() swap PEFT's merge_utils functions (and the names
peft.tuners.lora.model imported) for fastmerge.lora.merge_utils's, with PEFT's results."""

from __future__ import annotations

import pytest
import torch

from fastmerge.integrations import peft as fpeft
from fastmerge.lora import merge_utils as fast

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft.tuners.lora import model as lora_model  # noqa: E402
from peft.utils import merge_utils as pmu  # noqa: E402

NAMES = fpeft.NAMES
ORIG = {n: getattr(pmu, n) for n in NAMES}  # captured at import, before any test enables
MODULES = (pmu, lora_model)


@pytest.fixture(autouse=True)
def _always_disabled_after():
    yield
    fpeft.disable()
    assert not fpeft.enabled()


def _assert_original():
    for mod in MODULES:
        for n in NAMES:
            assert getattr(mod, n) is ORIG[n], (mod.__name__, n)


def _assert_fast():
    for mod in MODULES:
        for n in NAMES:
            assert getattr(mod, n) is getattr(fast, n), (mod.__name__, n)


def test_enable_disable_round_trip_restores_the_exact_objects():
    _assert_original()
    assert not fpeft.enabled()
    fpeft.enable()
    assert fpeft.enabled()
    _assert_fast()
    fpeft.enable()  # idempotent
    _assert_fast()
    fpeft.disable()  # once is enough
    assert not fpeft.enabled()
    _assert_original()
    fpeft.disable()  # no-op
    _assert_original()
    assert fpeft.originals() == ORIG
    for n in NAMES:  # same signatures
        import inspect

        assert list(inspect.signature(ORIG[n]).parameters) == list(inspect.signature(getattr(fast, n)).parameters), n


def test_patched_context_returns_to_the_previous_state():
    with fpeft.patched():
        assert fpeft.enabled()
        _assert_fast()
    _assert_original()
    fpeft.enable()
    with fpeft.patched():
        _assert_fast()
    assert fpeft.enabled()  # was enabled before the block: stays enabled
    _assert_fast()
    fpeft.disable()
    _assert_original()
    with pytest.raises(RuntimeError), fpeft.patched():
        raise RuntimeError("boom")
    _assert_original()


def _tensors(seed: int, shape=(33, 17), n=3):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(shape, generator=g) for _ in range(n)]
    ts[1][:4] = ts[0][:4]  # magnitude ties across models and at the top-k threshold
    ts[2][0, :5] = 0.25
    return ts, torch.randn(n, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deterministic_functions_equal_peft_after_enable(seed):
    ts, w = _tensors(seed)
    want = {
        "task_arithmetic": ORIG["task_arithmetic"](ts, w),
        "ties_total": ORIG["ties"](ts, w, 0.4),
        "ties_frequency": ORIG["ties"](ts, w, 0.4, majority_sign_method="frequency"),
        "magnitude_prune": ORIG["magnitude_prune"](ts, w, 0.3),
        "ties_full": ORIG["ties"](ts, w, 1.0),
    }
    with fpeft.patched():
        got = {
            "task_arithmetic": pmu.task_arithmetic(ts, w),
            "ties_total": lora_model.ties(ts, w, 0.4),
            "ties_frequency": pmu.ties(ts, w, 0.4, majority_sign_method="frequency"),
            "magnitude_prune": lora_model.magnitude_prune(ts, w, 0.3),
            "ties_full": pmu.ties(ts, w, 1.0),
        }
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k].view(torch.int32), want[k].view(torch.int32)), k  # bit for bit


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_functions_use_pefts_generator_rule(name):
    """Masks from torch.bernoulli on the global generator, drawn in PEFT's order: the same seed gives PEFT's
    result; a different seed gives a different (finite, same-shape) one."""
    ts, w = _tensors(3)
    torch.manual_seed(11)
    want = ORIG[name](ts, w, 0.5)
    with fpeft.patched():
        torch.manual_seed(11)
        got = getattr(lora_model, name)(ts, w, 0.5)
        torch.manual_seed(12)
        other = getattr(pmu, name)(ts, w, 0.5)
    assert torch.equal(got, want)
    assert other.shape == want.shape and torch.isfinite(other).all() and not torch.equal(other, want)


LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def lora_pm():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm = peft.get_peft_model(model, peft.LoraConfig(**cfg), adapter_name="one")
    pm.add_adapter("two", peft.LoraConfig(**cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:  # lora_B nonzero too
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm


def _adapter_weights(pm, name: str) -> dict[str, torch.Tensor]:
    sd = pm.state_dict()
    out = {k.replace(f".{name}.", "."): v.clone() for k, v in sd.items() if f".lora_A.{name}." in k or f".lora_B.{name}." in k}
    assert out
    return out


@pytest.mark.parametrize("ctype,kw", [
    ("ties", {"density": 0.5}), ("ties", {"density": 0.5, "majority_sign_method": "frequency"}), ("linear", {}),
    ("magnitude_prune", {"density": 0.4}), ("dare_ties", {"density": 0.6}),
])  # *_svd: the Krylov SVD replaces PEFT's full one (not bit for bit): test_dense_svd_types_within_1_02x_of_pefts_full_svd
def test_add_weighted_adapter_same_adapter_with_enable(lora_pm, ctype, kw):
    tag = ctype + "_" + "_".join(map(str, kw.values())).replace(".", "")
    torch.manual_seed(5)  # the new adapter's init and DARE's masks come from the global generator
    lora_pm.add_weighted_adapter(["one", "two"], [0.7, -0.4], f"ref_{tag}", combination_type=ctype, **kw)
    with fpeft.patched():
        torch.manual_seed(5)
        lora_pm.add_weighted_adapter(["one", "two"], [0.7, -0.4], f"fast_{tag}", combination_type=ctype, **kw)
    want, got = _adapter_weights(lora_pm, f"ref_{tag}"), _adapter_weights(lora_pm, f"fast_{tag}")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert any(v.abs().sum() > 0 for k, v in got.items() if ".lora_B." in k)
    _assert_original()


# ---------------------------------------------------------------------------------------------------------
# the *_svd combinations: LoraModel._svd_generalized_task_arithmetic_weighted_adapter replaced

SVD_OWNER = lora_model.LoraModel
SVD_ORIG = SVD_OWNER._svd_generalized_task_arithmetic_weighted_adapter
BIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
           vocab_size=64, tie_word_embeddings=False)


def test_enable_replaces_the_svd_method_and_disable_restores_it():
    assert SVD_OWNER._svd_generalized_task_arithmetic_weighted_adapter is SVD_ORIG
    with fpeft.patched():
        assert SVD_OWNER._svd_generalized_task_arithmetic_weighted_adapter is fpeft.svd_weighted_adapter
    assert SVD_OWNER._svd_generalized_task_arithmetic_weighted_adapter is SVD_ORIG
    import inspect

    assert list(inspect.signature(SVD_ORIG).parameters) == list(inspect.signature(fpeft.svd_weighted_adapter).parameters)


@pytest.fixture(scope="module")
def big_pm():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**BIG))
    cfg = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj", "embed_tokens"])
    pm = peft.get_peft_model(model, peft.LoraConfig(**cfg), adapter_name="a0")
    for i in (1, 2, 3):
        pm.add_adapter(f"a{i}", peft.LoraConfig(**cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm


def _new_factors(pm, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) of adapter ``name``, in module order."""
    out = {}
    for mod_name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and name in mod.lora_A:
            out[mod_name] = (mod.lora_A[name].weight.detach().clone(), mod.lora_B[name].weight.detach().clone())
        elif hasattr(mod, "lora_embedding_A") and name in mod.lora_embedding_A:
            out[mod_name] = (mod.lora_embedding_A[name].detach().clone(), mod.lora_embedding_B[name].detach().clone())
    return out


@pytest.mark.parametrize("ctype,kw", [
    ("ties_svd", {"density": 0.5}), ("dare_ties_svd", {"density": 0.6}), ("magnitude_prune_svd", {"density": 0.4}),
    ("dare_linear_svd", {"density": 0.7}), ("ties_svd", {"density": 0.5, "svd_clamp": 0.99}),
])
def test_dense_svd_types_within_1_02x_of_pefts_full_svd(big_pm, monkeypatch, ctype, kw):
    """The same merged ΔW as PEFT (recorded as it enters the Krylov SVD; DARE: same seed, same masks), truncated
    to the same rank: Frobenius error within 1.02x of PEFT's full-SVD truncation, module by module."""
    import fastmerge.ops.krylov_svd as ks

    seen: list[tuple[torch.Tensor, str]] = []
    real = ks.krylov_svd

    def record(a, k, **kwargs):
        res = real(a, k, **kwargs)
        seen.append((a.clone(), res[3]))
        return res

    monkeypatch.setattr(ks, "krylov_svd", record)
    tag = ctype + "_" + "_".join(map(str, kw.values())).replace(".", "")
    ws = [0.9, -0.5, 0.6, 0.3]
    torch.manual_seed(5)
    big_pm.add_weighted_adapter([f"a{i}" for i in range(4)], ws, f"ref_{tag}", combination_type=ctype, svd_rank=12, **kw)
    with fpeft.patched():
        torch.manual_seed(5)
        big_pm.add_weighted_adapter([f"a{i}" for i in range(4)], ws, f"fast_{tag}", combination_type=ctype, svd_rank=12, **kw)
    want, got = _new_factors(big_pm, f"ref_{tag}"), _new_factors(big_pm, f"fast_{tag}")
    assert list(want) == list(got) and len(seen) == len(got) == 5, (len(seen), list(got))
    for (mod, (a, b)), (m, kind) in zip(got.items(), seen):
        assert kind == "krylov", mod
        ra, rb = want[mod]
        assert a.shape == ra.shape and b.shape == rb.shape, mod
        err, ref = (m - b @ a).norm(), (m - rb @ ra).norm()
        if "svd_clamp" not in kw:  # PEFT's own error is the optimal one
            opt = torch.linalg.svdvals(m)[12:].square().sum().sqrt()
            assert ref <= opt * (1 + 1e-4), mod
        assert err <= 1.02 * ref, (mod, float(err / ref))
    _assert_original()
    assert SVD_OWNER._svd_generalized_task_arithmetic_weighted_adapter is SVD_ORIG


def test_svd_type_is_exact_from_the_factors(big_pm, monkeypatch):
    """combination_type="svd": the best rank-r approximation of Σ w·s·B·A without the dense ΔW's SVD: PEFT's
    result up to rounding, and neither torch.linalg.svd of a full-size matrix nor the Krylov SVD runs."""
    ws = [0.9, -0.5, 0.6, 0.3]
    torch.manual_seed(5)
    big_pm.add_weighted_adapter([f"a{i}" for i in range(4)], ws, "ref_svd", combination_type="svd", svd_rank=20)
    sizes = []
    real_svd = torch.linalg.svd

    def spy(x, *a, **k):
        sizes.append(tuple(x.shape))
        return real_svd(x, *a, **k)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    with fpeft.patched():
        torch.manual_seed(5)
        big_pm.add_weighted_adapter([f"a{i}" for i in range(4)], ws, "fast_svd", combination_type="svd", svd_rank=20)
    assert sizes and all(max(s) <= 32 for s in sizes), sizes  # only the 4r x 4r cores
    want, got = _new_factors(big_pm, "ref_svd"), _new_factors(big_pm, "fast_svd")
    for mod in want:
        ra, rb = want[mod]
        a, b = got[mod]
        torch.testing.assert_close(b @ a, rb @ ra, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_pruning_cuts_ties_by_index_without_topk(monkeypatch, dtype):
    """``topk_ties=False`` (the *_svd path: ``ties_index_ties``, ``magnitude_prune_index_ties``): with ties at the
    k-th |x| exactly k elements are kept, every |x| above
    the threshold among them, the tied ones the first by index; no topk runs. Without ties it is PEFT's result."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randint(-6, 7, (37, 29), generator=g).float() / 4).to(dtype)  # 13 values: heavy ties everywhere
    k = int(0.45 * x.numel())
    mag = x.float().abs().reshape(-1)
    t = mag.sort(descending=True).values[k - 1]
    above, tied = (mag > t).nonzero().reshape(-1), (mag == t).nonzero().reshape(-1)
    assert above.numel() < k < above.numel() + tied.numel()  # the case: ties straddle the cut
    want = torch.zeros_like(mag, dtype=torch.bool)
    want[above] = True
    want[tied[: k - above.numel()]] = True

    def no_topk(*a, **kw):
        raise AssertionError("topk ran")

    with monkeypatch.context() as m:
        m.setattr(torch, "topk", no_topk)
        got = fast._magnitude_pruning(x, 0.45, topk_ties=False)
    assert torch.equal(got.reshape(-1) != 0, want & (x.reshape(-1) != 0))
    assert torch.equal(got.reshape(-1)[want], x.reshape(-1)[want])
    y = torch.randn(41, 23, generator=g)  # fp32 normals: no ties at the cut, so PEFT's bits
    assert torch.equal(fast._magnitude_pruning(y, 0.45, topk_ties=False), pmu.magnitude_based_pruning(y, 0.45))
