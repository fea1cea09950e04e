"""Parity with mergekit 0.1.5 for sce, arcee_fusion, ram, ramplus_tl and passthrough, side by side.

Same generated LLaMA-shaped families (base + 3 fine-tunes, fp32 and bf16) and the same in-process
mergekit run as tests/test_parity_mergekit.py. Parameters are exercised as scalars, gradients over the
4 layers ([…] hits t = 0, 1/3, 2/3, 1) and filter lists (``mlp`` vs the rest), globally for the methods
with shared parameters and per model for passthrough's ``scale``. The fine-tunes change every element
by N(0, 0.002²), so RAM's ε is raised to 1e-3..3e-3 in some cases to make unique, shared and unchanged
elements all frequent (with ε = 1e-5 almost every element is shared by the 3 models).

Measured on these families (torch 2.13, CPU), all 17 cases:
- ``mergekit_compat=True``: 100% of the elements bitwise equal in every case (asserted), which is more
  than the target (≥ 99.9% within 1 ulp per tensor, asserted as well): the compat references run the
  same torch operations in the compute dtype, and sce's exact-k path uses the same ``torch.topk``.
- default mode (fp32 math, one rounding): fp32 compute is bit-exact for every method but sce (asserted), as
  is passthrough for bf16; sce sums its weights in fp64 and is asserted at least as accurate as mergekit
  against an fp64 oracle. bf16 compute differs by design (mergekit rounds δ, the variance, the softmax, the
  partial sums... to bf16; fastmerge rounds once), and rounding flips discrete decisions (sce's sign
  election and top-k, arcee_fusion's outlier mask, RAM's ε test), so single elements can differ by a
  whole δ. Bitwise-equal elements / worst tensor's share within 1 ulp: sce 85-92% / 97-97.6%,
  ram 93-95% / 97.8-98.2%, ramplus_tl 94-95% / 97.7-98.5%, arcee_fusion 84% / 81%: mergekit's bf16
  row KL is rounding noise (bf16 resolves p/q ≈ 1 only to 2^-8 below 1, 2^-7 above: KL values ~1e-4,
  some negative, where the fp32 KL is ~2e-6), so 19% of its q_proj mask differs from the fp32 one.
  Reported, not bounded.
- layout: identical tensor names and shapes. dtypes identical, except arcee_fusion and ramplus_tl with
  ``dtype: bfloat16`` and no ``out_dtype``: mergekit writes float32 tensors (a float32 mask / λ promotes
  its result; mergekit issue #604) while its config.json says bfloat16; fastmerge writes bfloat16, the
  dtype the config asks for. Values are compared after rounding mergekit's float32 to bfloat16 (exactly
  what fastmerge's single rounding does). With ``out_dtype: bfloat16`` (mergekit's workaround) the
  layouts are identical, checked by the ``arcee-bf16-outdtype`` case.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fastmerge
from fastmerge.io.index import CheckpointIndex
from fastmerge.io.reader import ModelReader
from fastmerge.testing import LlamaShape, make_family
from helpers.parity import ParityRuns, compare_models, config_dtype, describe, load_model, ulp_distance

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(importlib.util.find_spec("mergekit") is None, reason="mergekit==0.1.5 is not installed"),
]

SHAPE = LlamaShape(hidden=64, layers=4, intermediate=176, vocab=320, heads=4)
GRADIENT = [0, 0.3, 0.7, 1]
FILTER = [{"filter": "mlp", "value": 0.5}, {"value": 0.1}]
MIN_WITHIN_1ULP = 0.999  # per tensor, compat mode
#: mergekit 0.1.5 returns float32 from these methods whatever the compute dtype (see the module docstring)
FLOAT32_RESULT = {"arcee_fusion", "ramplus_tl"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Both tools run in this process on tensors of ≤ 20k elements, where a second torch thread gains
    nothing and, on a loaded 2-core machine, OpenMP barriers waiting for a descheduled thread made single
    merges 10-20x slower (this file, at a load average of 4: 47-56 s with 2 threads, 14 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("parity_misc_families")
    return {
        "bf16": make_family(root / "bf16", SHAPE, n_finetunes=3, dtype="bfloat16", shard_bytes=60_000),
        "fp32": make_family(root / "fp32", SHAPE, n_finetunes=3, dtype="float32", shard_bytes=120_000),
    }


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    family: str  # "bf16" | "fp32"
    dtype: str
    params: tuple = ()  # global parameters (passthrough: the model's), as (key, value) pairs
    out_dtype: str | None = None

    @property
    def n_models(self) -> int:
        return 1 if self.method in ("arcee_fusion", "passthrough") else 3

    def doc(self, fams) -> dict:
        base, fts = fams[self.family]
        models = [{"model": str(ft)} for ft in fts[: self.n_models]]
        doc: dict = {"merge_method": self.method, "models": models, "dtype": self.dtype}
        if self.method == "passthrough":
            models[0]["parameters"] = dict(self.params)
        else:
            doc["base_model"] = str(base)
            if self.params:
                doc["parameters"] = dict(self.params)
        if self.out_dtype:
            doc["out_dtype"] = self.out_dtype
        return doc

    @property
    def float32_in_mergekit(self) -> bool:
        return self.method in FLOAT32_RESULT and self.dtype != "float32" and self.out_dtype is None


CASES = [
    Case("sce-bf16", "sce", "bf16", "bfloat16"),
    Case("sce-bf16-topk", "sce", "bf16", "bfloat16", (("select_topk", 0.5),)),
    Case("sce-bf16-topk-gradient", "sce", "bf16", "bfloat16", (("select_topk", [0.1, 0.3, 0.7, 1]),)),
    Case("sce-fp32-topk-filter", "sce", "fp32", "float32", (("select_topk", FILTER), ("int8_mask", True))),
    Case("sce-fp32-topk", "sce", "fp32", "float32", (("select_topk", 0.3),)),
    Case("arcee-bf16", "arcee_fusion", "bf16", "bfloat16"),
    Case("arcee-bf16-outdtype", "arcee_fusion", "bf16", "bfloat16", out_dtype="bfloat16"),
    Case("arcee-fp32", "arcee_fusion", "fp32", "float32"),
    Case("ram-bf16", "ram", "bf16", "bfloat16"),
    Case("ram-bf16-eps-gradient", "ram", "bf16", "bfloat16", (("epsilon", [1e-5, 1e-3, 2e-3, 3e-3]),)),
    Case("ram-fp32-eps-filter", "ram", "fp32", "float32", (("epsilon", [{"filter": "mlp", "value": 3e-3}, {"value": 1e-3}]),)),
    Case("ramplus-bf16", "ramplus_tl", "bf16", "bfloat16"),
    Case("ramplus-bf16-params", "ramplus_tl", "bf16", "bfloat16", (("epsilon", 2e-3), ("r", GRADIENT), ("alpha", FILTER))),
    Case("ramplus-fp32-params", "ramplus_tl", "fp32", "float32", (("epsilon", 2e-3), ("r", 0.5), ("alpha", GRADIENT))),
    Case("passthrough-bf16-gradient", "passthrough", "bf16", "bfloat16", (("scale", GRADIENT),)),
    Case("passthrough-bf16-default", "passthrough", "bf16", "bfloat16"),
    Case("passthrough-fp32-filter", "passthrough", "fp32", "float32", (("scale", FILTER),)),
]
CASE_BY_ID = {c.id: c for c in CASES}


Outputs = ParityRuns  # each (case, tool, mode) merge once per session


@pytest.fixture(scope="session")
def outputs(families, tmp_path_factory) -> Outputs:
    return Outputs(families, tmp_path_factory.mktemp("parity_misc_out"))


def vs_mergekit(outputs: Outputs, case: Case, compat: bool) -> tuple[list, float, str]:
    """(per-tensor diffs, worst per-tensor fraction of elements within 1 ulp, report)."""
    fm = load_model(outputs.fastmerge(case, compat))
    mk = load_model(outputs.mergekit(case))
    if case.float32_in_mergekit:
        # mergekit's float32 result rounded to the configured dtype: what fastmerge's one rounding does
        mk = {n: t.to(fm[n].dtype) if t.dtype == torch.float32 else t for n, t in mk.items()}
    diffs = compare_models(fm, mk)
    within = min(float((ulp_distance(fm[n], mk[n]) <= 1).float().mean()) for n in mk)
    mode = "mergekit_compat=True" if compat else "default mode"
    return diffs, within, f"{case.id} ({mode}): worst tensor {within:.4%} within 1 ulp; {describe(diffs)}"


def ids() -> list:
    return [pytest.param(c.id, id=c.id) for c in CASES]


@pytest.mark.parametrize("case_id", ids())
def test_compat(outputs, case_id):
    diffs, within, msg = vs_mergekit(outputs, CASE_BY_ID[case_id], compat=True)
    print("\n" + msg)
    assert within >= MIN_WITHIN_1ULP, msg  # the target
    assert all(d.equal == d.numel for d in diffs), msg  # what is measured (see the module docstring)


def oracle_errors(outputs: Outputs, case: Case) -> tuple[float, float]:
    """Mean |error| of fastmerge's default mode and of mergekit against an fp64 oracle (the reference's
    mergekit arithmetic run in float64: the same exact-k selection, no rounding to speak of)."""
    p = fastmerge.plan(case.doc(outputs.fams))
    fm = load_model(outputs.fastmerge(case, False))
    mk = load_model(outputs.mergekit(case))
    readers: dict = {}
    e_fm = e_mk = 0.0
    n = 0
    for tp in p.tensors:
        vals = []
        for info in [tp.base, *tp.sources]:
            r = readers.setdefault(info.file.parent, ModelReader(CheckpointIndex.open(info.file.parent)))
            vals.append(r.get(info).double())
        oracle = p.method.reference(vals[1:], vals[0], tp.params, compat=True)
        e_fm += float((fm[tp.name].double() - oracle).abs().sum())
        e_mk += float((mk[tp.name].double() - oracle).abs().sum())
        n += oracle.numel()
    return e_fm / n, e_mk / n


@pytest.mark.parametrize("case_id", ids())
def test_default(outputs, case_id):
    c = CASE_BY_ID[case_id]
    diffs, _, msg = vs_mergekit(outputs, c, compat=False)
    print("\n" + msg)
    if c.method == "sce" and c.dtype == "float32":
        # Default-mode sce sums its matrix weights in fp64 (deterministic: torch's fp32 sum changes with its
        # thread count; the C++ kernel is bit-exact with it), so it no longer runs mergekit's fp32
        # operations: measured 99.2% of elements within 1 ulp of mergekit (worst tensor 97.4%). What is
        # asserted instead: against an fp64 oracle it is at least as accurate as mergekit (measured mean
        # |error| 1.035e-10 vs mergekit's 1.050e-10 on sce-fp32-topk).
        e_fm, e_mk = oracle_errors(outputs, c)
        assert e_fm <= e_mk, f"{msg}\nmean |error| vs fp64: fastmerge {e_fm:.4g}, mergekit {e_mk:.4g}"
    elif c.dtype == "float32" or c.method == "passthrough":  # the same fp32 operations (see docstring)
        assert all(d.equal == d.numel for d in diffs), msg


@pytest.mark.parametrize("case_id", ids())
def test_layout(outputs, case_id):
    c = CASE_BY_ID[case_id]
    fm_dir, mk_dir = outputs.fastmerge(c, compat=True), outputs.mergekit(c)
    fm, mk = load_model(fm_dir), load_model(mk_dir)
    assert sorted(fm) == sorted(mk)
    want = c.out_dtype or c.dtype
    assert {t.dtype for t in fm.values()} == {getattr(torch, want)}
    for n in mk:
        assert fm[n].shape == mk[n].shape, n
    if c.float32_in_mergekit:  # mergekit issue #604: documented, not copied
        assert {t.dtype for t in mk.values()} == {torch.float32}
    else:
        assert all(fm[n].dtype == mk[n].dtype for n in mk)
    assert config_dtype(fm_dir) == config_dtype(mk_dir) == want
