"""Parity of ``tokenizer_source`` with mergekit 0.1.5, side by side on generated models whose vocabularies
differ (mergekit-yaml with ``tokenizer_source`` / ``tokenizer:`` on the same folders, in-process).

Families (hidden 64, 4 layers, 320-row base; rows drawn per token, so a token's row agrees across
models whatever its id):
- ``wl`` (fp32, WordLevel): base 320 tokens; ft1 = base + 10 extra tokens (330 rows); ft2 = the base's
  tokens with ids permuted; ft3 = the base without 5 tokens, plus 5 of ft1's extras.
- ``bpe`` (bf16, BPE with merges): the same, and the base tokenizer also has 4 added tokens beyond its
  320 rows, which mergekit strips from the base tokenizer (``get_stripped_tokenizer``).
The cases cover donor rows (tokens of one model), base rows, means (no base, or the base lacks the
token), zero rows (no input has the token), padding rows (``pad_to_multiple_of``), permuted ids, the
base merged as an input (karcher, linear), scalar / gradient / filter weights.

Measured (torch 2.13, CPU, 7 cases, 242,240-250,432 elements each; the file runs in ~25 s here):
- ``mergekit_compat=True``: every element of every tensor bitwise equal (asserted), embeddings and heads
  included: the same rows, the same means (summed in input order in the compute dtype), the same padding.
- default mode: the remap differs from compat only in taking means in fp32 and rounding once. fp32
  cases (ties, linear, slerp): the vocabulary tensors are 100% bitwise equal to mergekit's (asserted:
  >= 99.9% within 1 ulp); bf16 cases differ from mergekit exactly as the method's own default mode does
  (mergekit rounds every step to bf16): bitwise-equal elements ties 87%, task_arithmetic 93%, karcher 28%
  (all tensors alike, vocabulary or not), linear 100% (mergekit accumulates linear in fp32 too).
  Reported with ``-s``, not bounded.
- layout: the same tensor names, shapes, dtypes, config.json ``vocab_size`` and dtype; both output
  tokenizers load offline with transformers to the same vocabulary (and fastmerge's reader agrees).
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from fastmerge.testing import LlamaShape, make_vocab_family, vocab_tokens
from fastmerge.vocab import read_vocab
from helpers.parity import ParityRuns, compare_models, config_dtype, describe, load_model, ulp_distance

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(importlib.util.find_spec("mergekit") is None, reason="mergekit==0.1.5 is not installed"),
]

SHAPE = LlamaShape(hidden=64, layers=4, intermediate=176, vocab=320, heads=4)
GRADIENT = [0, 0.3, 0.7, 1]
FILTER = [{"filter": "mlp", "value": 0.5}, {"value": 0.1}]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tensors of <= 21k elements: a second torch thread gains nothing on a loaded 2-core machine and
    its OpenMP barriers made merges 10-20x slower there (see test_parity_misc.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _vocabs(kind: str) -> dict[str, list[str]]:
    v = vocab_tokens(330, kind)
    perm = v[:3] + random.Random(0).sample(v[3:320], 317)
    dropped = set(v[10:15])
    return {
        "base": v[:320] + (v[320:324] if kind == "bpe" else []),  # bpe: 4 added tokens beyond the 320 rows
        "ft1": v[:330],
        "ft2": perm,
        "ft3": [t for t in v[:320] if t not in dropped] + v[325:330],
    }


@pytest.fixture(scope="session")
def vocab_families(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("parity_tok_families")
    return {
        "wl": make_vocab_family(root / "wl", SHAPE, _vocabs("wordlevel"), dtype="float32", kind="wordlevel",
                                shard_bytes=120_000),
        "bpe": make_vocab_family(root / "bpe", SHAPE, _vocabs("bpe"), dtype="bfloat16", kind="bpe", shard_bytes=60_000,
                                 rows={"base": 320}, n_added={"base": 4}),
    }


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    family: str  # "wl" (fp32) | "bpe" (bf16)
    source: str  # "base" | a model name
    models: tuple = ("ft1", "ft2", "ft3")
    base: bool = True
    weights: tuple = ()  # per model, or () for none
    params: dict = field(default_factory=dict, hash=False)
    pad_to: int | None = None

    @property
    def dtype(self) -> str:
        return "float32" if self.family == "wl" else "bfloat16"

    def doc(self, fams) -> dict:
        f = fams[self.family]
        models = [{"model": str(f[m])} for m in self.models]
        for m, w in zip(models, self.weights):
            m["parameters"] = dict(w)
        doc: dict = {"merge_method": self.method, "models": models, "dtype": self.dtype}
        if self.base:
            doc["base_model"] = str(f["base"])
        if self.params:
            doc["parameters"] = dict(self.params)
        src = self.source if self.source == "base" else str(f[self.source])
        if self.pad_to:
            doc["tokenizer"] = {"source": src, "pad_to_multiple_of": self.pad_to}
        else:
            doc["tokenizer_source"] = src
        return doc


CASES = [
    Case("ties-bf16-base-stripped", "ties", "bpe", "base",
         weights=({"weight": 0.4, "density": 0.5}, {"weight": 0.3, "density": 0.5}, {"weight": 0.3, "density": 0.7})),
    Case("ties-fp32-ft1-gradient", "ties", "wl", "ft1",
         weights=({"weight": 0.4}, {"weight": GRADIENT}, {"weight": 0.3}), params={"density": 0.5}),
    Case("task_arithmetic-bf16-ft1-filter-pad64", "task_arithmetic", "bpe", "ft1",
         weights=({"weight": FILTER}, {"weight": 0.5}, {"weight": 0.2}), pad_to=64),
    Case("linear-fp32-nobase-ft3-means", "linear", "wl", "ft3", base=False,
         weights=({"weight": 1.0}, {"weight": GRADIENT}, {"weight": FILTER})),
    Case("karcher-bf16-base-input-ft1", "karcher", "bpe", "ft1"),
    # the base merged as a third input of linear, weighted by the global weight
    Case("linear-bf16-base-input-ft2", "linear", "bpe", "ft2", models=("ft1", "ft2"),
         weights=({"weight": GRADIENT},), params={"weight": 0.5}),
    # ft1's 10 extra tokens are in neither input: zero rows
    Case("slerp-fp32-permuted-zero-rows", "slerp", "wl", "ft1", models=("ft2",), params={"t": GRADIENT}),
]
CASE_BY_ID = {c.id: c for c in CASES}


@pytest.fixture(scope="session")
def tok_outputs(vocab_families, tmp_path_factory) -> ParityRuns:
    return ParityRuns(vocab_families, tmp_path_factory.mktemp("parity_tok_out"))


def _params(cases):
    return [pytest.param(c.id, id=c.id) for c in cases]


def _diffs(outputs: ParityRuns, case: Case, compat: bool):
    fm, mk = load_model(outputs.fastmerge(case, compat)), load_model(outputs.mergekit(case))
    return fm, mk, compare_models(fm, mk)


@pytest.mark.parametrize("case_id", _params(CASES))
def test_compat_bit_exact(tok_outputs, case_id):
    c = CASE_BY_ID[case_id]
    fm, mk, diffs = _diffs(tok_outputs, c, compat=True)
    within = min(float((ulp_distance(fm[n], mk[n]) <= 1).float().mean()) for n in mk)
    print(f"\n{case_id} (mergekit_compat=True): worst tensor {within:.4%} within 1 ulp; {describe(diffs)}")
    assert within >= 0.999, describe(diffs)
    assert all(d.equal == d.numel for d in diffs), f"{case_id}: not bit-exact\n{describe(diffs)}"


@pytest.mark.parametrize("case_id", _params(CASES))
def test_default_mode(tok_outputs, case_id):
    c = CASE_BY_ID[case_id]
    fm, mk, diffs = _diffs(tok_outputs, c, compat=False)
    vocab = [d for d in diffs if d.name in VOCAB_TENSORS]
    print(f"\n{case_id} (default mode): {describe(diffs, limit=3)}\n  vocabulary tensors: {describe(vocab, limit=2)}")
    if c.dtype == "float32":  # the remap adds no rounding of its own in fp32 (copies; fp32 means, as mergekit)
        for n in VOCAB_TENSORS:
            share = float((ulp_distance(fm[n], mk[n]) <= 1).float().mean())
            assert share >= 0.999, f"{case_id} {n}: {share:.4%} within 1 ulp\n{describe(vocab)}"


@pytest.mark.parametrize("case_id", _params(CASES))
def test_layout_and_tokenizer(tok_outputs, case_id):
    from transformers import AutoTokenizer

    c = CASE_BY_ID[case_id]
    fm_dir, mk_dir = tok_outputs.fastmerge(c, True), tok_outputs.mergekit(c)
    fm, mk = load_model(fm_dir), load_model(mk_dir)
    assert sorted(fm) == sorted(mk)
    assert all((fm[n].dtype, fm[n].shape) == (mk[n].dtype, mk[n].shape) for n in mk)
    fm_cfg, mk_cfg = (json.loads((d / "config.json").read_text()) for d in (fm_dir, mk_dir))
    assert fm_cfg["vocab_size"] == mk_cfg["vocab_size"] == mk["model.embed_tokens.weight"].shape[0]
    assert config_dtype(fm_dir) == config_dtype(mk_dir)
    want = AutoTokenizer.from_pretrained(str(mk_dir)).get_vocab()
    assert AutoTokenizer.from_pretrained(str(fm_dir)).get_vocab() == want
    assert read_vocab(fm_dir) == want


def test_generated_tokenizers_load_offline_as_read(vocab_families):
    """mergekit reads every tokenizer through transformers: the generated ones load offline, and
    fastmerge's own reader gives the same ids (the base's 4 added tokens included, before stripping)."""
    from transformers import AutoTokenizer

    for fam in vocab_families.values():
        for path in fam.values():
            assert read_vocab(path) == AutoTokenizer.from_pretrained(str(path)).get_vocab(), path
    assert len(read_vocab(vocab_families["bpe"]["base"])) == 324
