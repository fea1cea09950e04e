"""``tokenizer_source``: reading vocabularies, the row map (hand-computed rows), configs, end-to-end merges;
and the base_model that mergekit merges as one more input of linear / karcher / passthrough.

Expected rows are written out by hand from mergekit 0.1.5's rules (fastmerge/vocab.py docstring):
own row if the model has the token; else the only holder's row; else the base's; else the mean of the
holders; else zero; padding rows = the model's mean row. Parity with mergekit itself: test_parity_tokenizer.py.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
import yaml
from safetensors import safe_open

from fastmerge import merge, plan
from fastmerge.config import MergeConfig
from fastmerge.errors import CheckpointError, ConfigError, ShapeMismatchError
from fastmerge.testing import LlamaShape, make_family, make_vocab_family, vocab_tokens, write_tokenizer
from fastmerge.vocab import RowMap, TokenRow, is_vocab_tensor, read_tokenizer, read_vocab
from fastmerge.vocab_union import AddedTokens, ModelTokens, added_entry, union_additions

SHAPE = LlamaShape(hidden=16, layers=2, intermediate=24, vocab=40, heads=2)
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _load(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _rows(*vals) -> torch.Tensor:
    """One 2-wide row per value: [[v, -v], ...] (fp32)."""
    return torch.tensor([[float(v), -float(v)] for v in vals])


# ------------------------------------------------------------------------------------------------
# the row map, by hand


def test_rows_own_base_donor():
    # output vocabulary a b c d; base has a b c, m1 has b a d (permuted, plus d), m2 has a c
    vocab = {"a": 0, "b": 1, "c": 2, "d": 3}
    members = [{"a": 0, "b": 1, "c": 2}, {"b": 0, "a": 1, "d": 2}, {"a": 0, "c": 1}]
    rm = RowMap.build(vocab, 4, members, base=0)
    base, m1, m2 = _rows(1, 2, 3), _rows(10, 20, 30), _rows(100, 200)
    got = rm.apply([base, m1, m2], compat=False)
    # b: base and m1 have it -> m2 gets the base's row 2; c: base and m2 -> m1 gets the base's 3;
    # d: only m1 -> everyone else gets m1's row 30
    assert torch.equal(got[0], _rows(1, 2, 3, 30))
    assert torch.equal(got[1], _rows(20, 10, 3, 30))
    assert torch.equal(got[2], _rows(100, 2, 200, 30))


def test_rows_mean_without_base_and_zero_for_nobody():
    vocab = {"a": 0, "b": 1, "c": 2, "e": 3}  # nobody has "e"
    members = [{"a": 0, "b": 1, "c": 2}, {"b": 0, "a": 1}, {"a": 0, "c": 1}]
    rm = RowMap.build(vocab, 4, members, base=None)
    got = rm.apply([_rows(1, 2, 3), _rows(10, 20), _rows(100, 200)], compat=False)
    # b: x0 (2) and x1 (10) -> x2 gets 6; c: x0 (3) and x2 (200) -> x1 gets 101.5; e: zero
    assert torch.equal(got[0], _rows(1, 2, 3, 0))
    assert torch.equal(got[1], _rows(20, 10, 101.5, 0))
    assert torch.equal(got[2], _rows(100, 6, 200, 0))


def test_base_without_the_token_falls_back_to_the_mean():
    vocab = {"a": 0, "z": 1}
    members = [{"a": 0}, {"a": 0, "z": 1}, {"a": 0, "z": 1}]  # the base lacks z, two others have it
    got = RowMap.build(vocab, 2, members, base=0).apply([_rows(1), _rows(2, 4), _rows(3, 8)], compat=False)
    assert torch.equal(got[0], _rows(1, 6))


def test_padding_rows_are_the_mean_row():
    vocab = {"a": 0, "b": 1, "c": 2, "d": 3}
    x = _rows(1, 2, 3, 6)
    (got,) = RowMap.build(vocab, 6, [{"a": 0, "b": 1, "c": 2, "d": 3}], base=None).apply([x], compat=False)
    assert torch.equal(got, _rows(1, 2, 3, 6, 3, 3))  # mean of 1, 2, 3, 6 = 3


def test_compat_rounds_every_step_default_once():
    # bf16 keeps 8 significant bits: spacing 2^-7 in [1, 2), 2^-9 in [1/4, 1/2). 1 + 2^-8 is a tie that
    # rounds (to even) to 1. With two holders both modes agree (halving commutes with rounding):
    vocab = {"a": 0, "z": 1}
    members = [{"a": 0}, {"a": 0, "z": 1}, {"a": 0, "z": 1}]
    xs = [torch.tensor([[0.0], [0.0]], dtype=torch.bfloat16)[:1],
          torch.tensor([[0.0], [1.0]], dtype=torch.bfloat16), torch.tensor([[0.0], [2.0**-8]], dtype=torch.bfloat16)]
    rm = RowMap.build(vocab, 2, members, base=None)
    assert float(rm.apply(xs, compat=True)[0][1, 0]) == 0.5  # (1 + 2^-8 -> 1) / 2
    assert float(rm.apply(xs, compat=False)[0][1, 0]) == 0.5  # 1.00390625 / 2: a tie, to even
    # three holders, summed in input order: compat ((1 + 2^-8) -> 1, + 2^-8 -> 1) / 3 -> bf16(1/3)
    members3 = [{"a": 0}, {"a": 0, "z": 1}, {"a": 0, "z": 1}, {"a": 0, "z": 1}]
    xs3 = xs + [torch.tensor([[0.0], [2.0**-8]], dtype=torch.bfloat16)]
    rm3 = RowMap.build(vocab, 2, members3, base=None)
    assert float(rm3.apply(xs3, compat=True)[0][1, 0]) == 0.333984375  # 1/3 -> 171 * 2^-9
    assert float(rm3.apply(xs3, compat=False)[0][1, 0]) == 0.3359375  # (1 + 2^-7) / 3 = 172 * 2^-9 exactly


def test_identity_is_a_view_and_buffers_are_used():
    vocab = {"a": 0, "b": 1}
    x, y = _rows(1, 2, 3), _rows(5, 6)  # x has a padding row beyond the vocabulary
    rm = RowMap.build(vocab, 2, [{"a": 0, "b": 1}, {"b": 0, "a": 1}], base=None)
    buf = [torch.empty(2, 2), torch.empty(2, 2)]
    gx, gy = rm.apply([x, y], compat=False, out=buf)
    assert gx.data_ptr() == x.data_ptr() and torch.equal(gx, _rows(1, 2))  # same ids: no copy
    assert gy.data_ptr() == buf[1].data_ptr() and torch.equal(gy, _rows(6, 5))
    assert rm.summary()["identity"] == [True, False]


def test_runner_buffers_only_for_inputs_that_move_and_reused():
    from fastmerge.engine.stream import _RemapBuffers

    rm = RowMap.build({"a": 0, "b": 1}, 2, [{"a": 0, "b": 1}, {"b": 0, "a": 1}], base=None)
    bufs = _RemapBuffers()
    x, y = _rows(1, 2), _rows(5, 6)
    gx, gy = bufs.apply(rm, [x, y], compat=False)
    assert gx.data_ptr() == x.data_ptr() and sorted(bufs._raw) == [1]  # the identity input is not copied
    ptr = gy.data_ptr()
    _, gy2 = bufs.apply(rm, [x, _rows(7, 8)], compat=False)  # e.g. lm_head.bias after lm_head.weight
    assert gy2.data_ptr() == ptr and torch.equal(gy2, _rows(8, 7))
    bufs.release()
    assert not bufs._raw


def test_one_dimensional_rows():
    rm = RowMap.build({"a": 0, "b": 1, "c": 2}, 3, [{"c": 0, "a": 1}, {"a": 0, "b": 1, "c": 2}], base=1)
    got = rm.apply([torch.tensor([7.0, 8.0]), torch.tensor([1.0, 2.0, 3.0])], compat=True)
    assert got[0].tolist() == [8.0, 2.0, 7.0] and got[1].tolist() == [1.0, 2.0, 3.0]


# ------------------------------------------------------------------------------------------------
# reading vocabularies (the ids AutoTokenizer(...).get_vocab() gives; checked against transformers in
# test_parity_tokenizer.py)


def test_tokenizer_json_wordlevel_and_added_ids(tmp_path):
    toks = vocab_tokens(8)  # <unk> <s> </s> t0..t4
    write_tokenizer(tmp_path, toks, n_added=2)  # t3, t4 are added tokens
    assert read_vocab(tmp_path) == {t: i for i, t in enumerate(toks)}
    doc = json.loads((tmp_path / "tokenizer.json").read_text())
    for e in doc["added_tokens"]:
        if e["content"] == "t4":
            e["id"] = 99  # tokenizers ignores the written id: next free = max(added) + 1 = 7
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    assert read_vocab(tmp_path)["t4"] == 7


def test_missing_special_tokens_are_appended(tmp_path):
    write_tokenizer(tmp_path, vocab_tokens(6), special={"unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<m>"})
    v = read_vocab(tmp_path)
    assert len(v) == 8 and v["<pad>"] == 6 and v["<m>"] == 7  # transformers' order: ..., pad, cls, mask


def test_bpe_unigram_vocab_json_vocab_txt(tmp_path):
    toks = vocab_tokens(40, "bpe")
    write_tokenizer(tmp_path / "bpe", toks, "bpe")
    assert read_vocab(tmp_path / "bpe") == {t: i for i, t in enumerate(toks)}
    assert ["a", "b"] in json.loads((tmp_path / "bpe" / "tokenizer.json").read_text())["model"]["merges"]
    uni = tmp_path / "uni"
    uni.mkdir()
    (uni / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["x", -1.0], ["y", -2.0]]},
                                                    "added_tokens": [{"id": 3, "content": "<new>"}]}))
    assert read_vocab(uni) == {"<unk>": 0, "x": 1, "y": 2, "<new>": 3}
    g = tmp_path / "gpt2"
    g.mkdir()
    (g / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (g / "added_tokens.json").write_text(json.dumps({"<x>": 3}))
    assert read_vocab(g) == {"a": 0, "b": 1, "ab": 2, "<x>": 3}
    b = tmp_path / "bert"
    b.mkdir()
    (b / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\nworld\n")
    (b / "tokenizer_config.json").write_text(json.dumps({"unk_token": "[UNK]", "mask_token": "[MASK]"}))
    assert read_vocab(b) == {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3, "[MASK]": 4}
    assert read_vocab(tmp_path) is None  # no tokenizer files at all


def _sp_model(pieces) -> bytes:
    """A SentencePiece ModelProto by hand: field 1 = SentencePiece{1: piece, 2: score (float), 3: type},
    plus a field 2 (trainer spec) the reader must skip."""
    out = b""
    for i, p in enumerate(pieces):
        raw = p.encode()
        sub = b"\x0a" + bytes([len(raw)]) + raw + b"\x15" + struct.pack("<f", -float(i)) + b"\x18\x01"
        out += b"\x0a" + bytes([len(sub)]) + sub
    return out + b"\x12\x04\x08\x96\x01\x00"[:6]


def test_sentencepiece_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(_sp_model(["<unk>", "<s>", "</s>", "\u2581the", "\u2581a"]))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    assert read_vocab(tmp_path) == {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581the": 3, "\u2581a": 4}


@pytest.mark.parametrize("name", [
    "model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight", "gpt_neox.embed_in.weight",
    "embed_out.weight", "bert.embeddings.word_embeddings.weight", "shared.weight", "encoder.embed_tokens.weight",
    "model.tok_embeddings.weight", "output.weight", "lm_head.bias", "cls.predictions.decoder.weight",
    "transformer.output_layer.weight", "backbone.embeddings.weight", "vocab_projector.bias",
])
def test_vocab_tensor_names(name):
    assert is_vocab_tensor(name)


@pytest.mark.parametrize("name", [
    "bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight",
    "model.layers.0.mlp.shared_expert.down_proj.weight", "model.norm.weight", "transformer.wpe.weight",
    "bert.encoder.layer.0.output.dense.weight", "model.layers.0.self_attn.o_proj.weight",
])
def test_not_vocab_tensor_names(name):
    assert not is_vocab_tensor(name)


# ------------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("doc,msg", [
    ({"tokenizer": {"source": "base", "tokens": {"<x>": {"source": "b"}}}}, r"tokenizer.tokens\['<x>'\].source: b is not one"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "b", "token": "t"}}}}},
     r"tokenizer.tokens\['<x>'\].source.model: b is not one"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "a", "token": "t", "token_id": 1}}}}},
     "exactly one of 'token' and 'token_id'"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "a", "token_id": -1}}}}}, "token_id"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "mean"}}}}}, "kind: expected 'zero' or 'model_token'"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "zero"}, "force": "yes"}}}}, r"\['<x>'\].force"),
    ({"tokenizer": {"tokens": {"<x>": {"sauce": "a"}}}}, "unknown field 'sauce'"),
    ({"tokenizer": {"tokens": ["<x>"]}}, "tokenizer.tokens: expected a mapping"),
    ({"tokenizer": {"source": "base", "pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
    ({"tokenizer": {"source": "base", "colour": 1}}, "unknown field 'colour'"),
    ({"tokenizer": {"source": "base"}, "tokenizer_source": "base"}, "either"),
])
def test_tokenizer_config_errors(doc, msg):
    d = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}], **doc}
    with pytest.raises(ConfigError, match=msg):
        MergeConfig.from_dict(d)


def test_tokenizer_config_forms_round_trip():
    d = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}]}
    c = MergeConfig.from_dict({**d, "tokenizer": {"source": "base", "pad_to_multiple_of": 64}})
    assert (c.tokenizer_source, c.tokenizer_pad_to_multiple_of) == ("base", 64)
    assert MergeConfig.from_dict(c.to_dict()).tokenizer_pad_to_multiple_of == 64
    assert MergeConfig.from_dict({**d, "tokenizer_source": "a"}).to_dict()["tokenizer_source"] == "a"
    assert MergeConfig.from_dict({**d, "tokenizer_source": "union"}).tokenizer_source == "union"
    c = MergeConfig.from_dict({**d, "tokenizer": {"pad_to_multiple_of": 8}})  # mergekit's default source: union
    assert (c.tokenizer_source, c.tokenizer_pad_to_multiple_of, c.tokenizer_tokens) == ("union", 8, None)
    tokens = {"<x>": {"source": {"kind": "zero"}, "force": True}, "<y>": {"source": "a"}, "<z>": {},
              "<w>": {"source": {"kind": "model_token", "model": "a", "token": "t"}}}
    c = MergeConfig.from_dict({**d, "tokenizer": {"source": "base", "tokens": tokens}})
    assert c.tokenizer_tokens == tokens
    again = MergeConfig.from_dict(c.to_dict())
    assert (again.tokenizer_source, again.tokenizer_tokens) == ("base", tokens)


# ------------------------------------------------------------------------------------------------
# base_model as one more input (mergekit's planner appends it for base-ignoring methods)


def test_karcher_linear_passthrough_get_the_base_as_an_input():
    c = MergeConfig.from_dict({"merge_method": "karcher", "base_model": "b", "models": [{"model": "x"}]})
    assert [(m.path, m.implicit_base) for m in c.models] == [("x", False), ("b", True)]
    assert c.to_dict()["models"] == [{"model": "x", "parameters": {}}]  # written back as given
    assert len(MergeConfig.from_dict(c.to_dict()).models) == 2
    listed = MergeConfig.from_dict({"merge_method": "karcher", "base_model": "b", "models": [{"model": "b"}, {"model": "x"}]})
    assert [m.path for m in listed.models] == ["b", "x"]  # listed: used where listed, not twice
    lin = MergeConfig.from_dict({"merge_method": "linear", "base_model": "b", "models": [{"model": "x"}],
                                 "parameters": {"weight": 0.5}})
    assert [m.path for m in lin.models] == ["x", "b"]
    with pytest.raises(ConfigError, match=r"base_model \(b\): missing required parameter 'weight'.*one more input"):
        MergeConfig.from_dict({"merge_method": "linear", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": 1}}]})
    with pytest.raises(ConfigError, match="at most 1 model.*got 2.*one more input"):
        MergeConfig.from_dict({"merge_method": "passthrough", "base_model": "b", "models": [{"model": "x"}]})
    cart = MergeConfig.from_dict({"merge_method": "cart", "base_model": "b", "models": [{"model": "x"}, {"model": "y"}]})
    assert [m.path for m in cart.models] == ["x", "y"]  # fastmerge's own method: base_model ignored as documented
    sl = MergeConfig.from_dict({"merge_method": "karcher", "base_model": "b",
                                "slices": [{"sources": [{"model": "x", "layer_range": [0, 1]}]}]})
    assert sl.models == []  # slices are used as written (mergekit does not append there)


def test_karcher_with_base_merges_it(tmp_path):
    base, fts = make_family(tmp_path / "fam", SHAPE, n_finetunes=1, dtype="float32", shard_bytes=10**8)
    p = plan({"merge_method": "karcher", "base_model": str(base), "models": [{"model": str(fts[0])}]})
    assert [s.file.parent for s in p.tensors[0].sources] == [fts[0], base] and p.tensors[0].base is None
    assert p.ref_root == base  # config.json from the base, as mergekit


# ------------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def vfam(tmp_path_factory):
    """base: 40 tokens; ft1: + 4 extra tokens (44 rows); ft2: the base's 40 tokens, ids permuted;
    ft3: no tokenizer files (taken to share the base's)."""
    root = tmp_path_factory.mktemp("vocab_fam")
    v = vocab_tokens(44)
    perm = v[:3] + v[3:40][::-1]
    fams = make_vocab_family(root, SHAPE, {"base": v[:40], "ft1": v, "ft2": perm, "ft3": v[:40]}, dtype="float32")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (fams["ft3"] / f).unlink()
    return fams, v


def _row(model: dict, name: str, tokens: list[str], tok: str) -> torch.Tensor:
    return model[name][tokens.index(tok)]


def test_passthrough_rows_follow_the_tokens(tmp_path, vfam):
    fams, v = vfam
    perm = v[:3] + v[3:40][::-1]
    doc = {"merge_method": "passthrough", "models": [{"model": str(fams["ft2"])}], "tokenizer_source": str(fams["ft1"])}
    merge(doc, tmp_path / "out", progress=False, copy_tokenizer=False)
    got, ft2 = _load(tmp_path / "out"), _load(fams["ft2"])
    for name in (EMB, HEAD):
        assert got[name].shape == (44, 16)
        for i, tok in enumerate(v):  # output id i = ft1's id of tok
            want = _row(ft2, name, perm, tok) if tok in perm else torch.zeros(16)  # nobody else: zero
            assert torch.equal(got[name][i], want), (name, tok)
    assert torch.equal(got["model.norm.weight"], ft2["model.norm.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 44
    # written although copy_tokenizer=False (mergekit always saves the tokenizer it built), from ft1
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (fams["ft1"] / "tokenizer.json").read_text()
    assert read_vocab(tmp_path / "out") == {t: i for i, t in enumerate(v)}


def test_linear_mean_and_donor_rows(tmp_path, vfam):
    fams, v = vfam
    perm = v[:3] + v[3:40][::-1]
    doc = {"merge_method": "linear", "models": [{"model": str(fams[n]), "parameters": {"weight": 1.0}} for n in ("ft1", "ft2")],
           "tokenizer_source": str(fams["ft1"])}
    merge(doc, tmp_path / "out", progress=False)
    got, a, b = _load(tmp_path / "out"), _load(fams["ft1"]), _load(fams["ft2"])
    for i, tok in enumerate(v):
        ra = _row(a, EMB, v, tok)
        rb = _row(b, EMB, perm, tok) if tok in perm else ra  # extra tokens: ft1 donates its row to ft2
        want = ((ra + rb) / 2).to(torch.float32)
        assert torch.allclose(got[EMB][i], want, rtol=0, atol=1e-7), tok


def test_same_tokenizers_give_the_plain_merge(tmp_path, vfam):
    fams, _ = vfam
    doc = {"merge_method": "ties", "base_model": str(fams["base"]), "dtype": "float32",
           "models": [{"model": str(fams["ft3"]), "parameters": {"weight": 0.5, "density": 0.5}}]}
    merge(doc, tmp_path / "plain", progress=False)
    merge({**doc, "tokenizer_source": "base"}, tmp_path / "tok", progress=False)
    a, b = _load(tmp_path / "plain"), _load(tmp_path / "tok")
    assert all(torch.equal(a[k], b[k]) for k in a) and sorted(a) == sorted(b)
    p = plan({**doc, "tokenizer_source": "base"})
    assert all(t.input_transform is None for t in p.tensors)  # nothing to move: plain tensors (fast path)
    assert p.to_json()["tokenizer"]["vocab_size"] == 40
    p = plan({**doc, "tokenizer_source": str(fams["ft1"])}).to_json()
    remaps = {t["name"]: t["vocab_remap"] for t in p["tensors"] if "vocab_remap" in t}
    assert sorted(remaps) == [HEAD, EMB] and remaps[EMB]["identity"] == [False, False]  # 40 -> 44 rows
    assert remaps[EMB]["defaults"] == {"copied": 0, "averaged": 0, "zero": 4}  # ft1's 4 extras: in neither input


def test_ties_base_rows_preferred_and_padding(tmp_path, vfam, backend):
    fams, v = vfam
    doc = {"merge_method": "task_arithmetic", "base_model": str(fams["base"]), "dtype": "float32",
           "models": [{"model": str(fams[n]), "parameters": {"weight": 1.0}} for n in ("ft1", "ft2")],
           "tokenizer": {"source": str(fams["ft1"]), "pad_to_multiple_of": 16}}
    merge(doc, tmp_path / "out", progress=False, backend=backend)
    got, a = _load(tmp_path / "out"), _load(fams["ft1"])
    merge(doc, tmp_path / "ref", progress=False, backend="torch")
    assert all(torch.equal(t, _load(tmp_path / "ref")[k]) for k, t in got.items())  # every backend alike
    assert got[EMB].shape == (48, 16) and json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 48
    for tok in v[40:]:  # only ft1 has them: every model uses ft1's row, base + (ft1 - ft1) + (ft1 - ft1) = ft1
        i = v.index(tok)
        assert torch.allclose(got[EMB][i], a[EMB][i], rtol=0, atol=1e-7)
    # padding rows: each model's mean row, merged: base_mean + (ft1_mean - base_mean) + (ft2_mean - base_mean)
    assert torch.equal(got[EMB][44], got[EMB][47])
    assert not torch.equal(got[EMB][44], torch.zeros(16))


def test_slices_embeddings_from_first_head_from_last(tmp_path, vfam):
    fams, v = vfam
    doc = {"merge_method": "passthrough", "tokenizer_source": "base", "base_model": str(fams["base"]),
           "slices": [{"sources": [{"model": str(fams["ft1"]), "layer_range": [0, 1]}]},
                      {"sources": [{"model": str(fams["ft2"]), "layer_range": [1, 2]}]}]}
    merge(doc, tmp_path / "out", progress=False)
    got, a, b = _load(tmp_path / "out"), _load(fams["ft1"]), _load(fams["ft2"])
    perm = v[:3] + v[3:40][::-1]
    assert got[EMB].shape == got[HEAD].shape == (40, 16)  # the base's vocabulary (ft1's is larger)
    assert all(torch.equal(got[EMB][i], _row(a, EMB, v, t)) for i, t in enumerate(v[:40]))
    assert all(torch.equal(got[HEAD][i], _row(b, HEAD, perm, t)) for i, t in enumerate(v[:40]))


def test_compat_mode_runs_in_the_compute_dtype(tmp_path, vfam):
    fams, _ = vfam
    doc = {"merge_method": "linear", "dtype": "bfloat16", "tokenizer_source": str(fams["ft1"]),
           "models": [{"model": str(fams[n]), "parameters": {"weight": 1.0}} for n in ("ft1", "ft2", "base")]}
    merge(doc, tmp_path / "c", progress=False, mergekit_compat=True)
    merge(doc, tmp_path / "d", progress=False)
    c, d = _load(tmp_path / "c"), _load(tmp_path / "d")
    assert c[EMB].dtype == d[EMB].dtype == torch.bfloat16 and c[EMB].shape == (44, 16)
    assert (c[EMB].float() - d[EMB].float()).abs().max() < 2e-3  # bf16 rounding apart


def test_errors(tmp_path, vfam):
    fams, _ = vfam
    lin = {"merge_method": "linear", "models": [{"model": str(fams[n])} for n in ("ft1", "ft2")], "parameters": {"weight": 1.0}}
    with pytest.raises(ShapeMismatchError, match="embed_tokens.*set tokenizer_source"):  # no tokenizer_source
        plan(lin)
    with pytest.raises(ConfigError, match="no tokenizer files"):
        plan({**lin, "base_model": str(fams["ft3"]), "tokenizer_source": "base"})
    with pytest.raises(ConfigError, match="no tokenizer files"):
        plan({**lin, "tokenizer_source": str(fams["ft3"])})
    with pytest.raises(ConfigError, match="not a local model folder"):
        plan({**lin, "tokenizer_source": str(tmp_path / "nowhere")})


def test_base_tokens_beyond_vocab_size_are_dropped(tmp_path):
    """A base tokenizer with more tokens than embedding rows: mergekit strips it (BPE only). Here the
    dropped tokens are merge products too ('al'...), which mergekit keeps merges for (its output would not
    load); fastmerge drops those merges as well."""
    toks = vocab_tokens(44, "bpe")
    fams = make_vocab_family(tmp_path / "f", SHAPE, {"base": toks, "ft1": toks[:40]}, dtype="float32", kind="bpe",
                             rows={"base": 40})
    doc = {"merge_method": "linear", "base_model": str(fams["base"]), "tokenizer_source": "base",
           "models": [{"model": str(fams["ft1"]), "parameters": {"weight": 1.0}}], "parameters": {"weight": 1.0}}
    merge(doc, tmp_path / "out", progress=False)
    assert read_vocab(tmp_path / "out") == {t: i for i, t in enumerate(toks[:40])}
    merges = json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and all("".join(m) in toks[:40] for m in merges)
    assert _load(tmp_path / "out")[EMB].shape == (40, 16)
    wl = make_vocab_family(tmp_path / "g", SHAPE, {"base": vocab_tokens(44), "ft1": vocab_tokens(40)}, dtype="float32",
                           rows={"base": 40})
    with pytest.raises(ConfigError, match="BPE tokenizers only"):
        plan({**doc, "base_model": str(wl["base"]), "models": [{"model": str(wl["ft1"])}]})


def test_yaml_cli_form(tmp_path, vfam):
    fams, _ = vfam
    from fastmerge import cli

    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "karcher", "base_model": str(fams["base"]), "models": [{"model": str(fams["ft1"])}],
                                   "tokenizer": {"source": "base"}}))
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 0
    assert _load(tmp_path / "out")[EMB].shape == (40, 16)
    with pytest.raises(CheckpointError):
        bad = dict(yaml.safe_load(cfg.read_text()), models=[{"model": str(tmp_path / "missing")}])
        plan(bad)


# ------------------------------------------------------------------------------------------------
# tokenizer_source: union and tokenizer.tokens (mergekit 0.1.5's build_union_tokenizer and
# PermutedVocabulary; side by side with mergekit: tests/parity/test_parity_tokenizer_union.py)


def test_added_token_ids_follow_the_tokenizers_rule():
    t = AddedTokens({"a": 0, "b": 1, "c": 2})
    t.add(added_entry("b", special=True))  # in the model vocabulary: keeps its id, becomes an added token
    t.add(added_entry("x"))
    t.add(added_entry("y"))
    assert t.vocab() == {"a": 0, "b": 1, "c": 2, "x": 3, "y": 4}
    t.mark_loaded()
    t.add(added_entry("x"))  # the same settings: ignored
    assert not t.changed
    t.add(added_entry("x", special=True))  # other settings: replaced, same id
    assert t.changed and t.vocab()["x"] == 3 and t.flags["x"]["special"] and not t.flags["x"]["normalized"]
    assert [i for i, _ in t.entries()] == [1, 3, 4]
    assert t.limited(4).vocab() == {"a": 0, "b": 1, "c": 2, "x": 3}


def test_union_order_base_then_models_regular_then_added():
    base = AddedTokens({"a": 0, "b": 1})
    m1 = AddedTokens({"a": 0, "c": 1, "b": 2, "d": 3})
    m1.add(added_entry("<x>", special=True))  # id 4
    m2 = AddedTokens({"e": 0, "c": 1, "f": 2})  # f (id 2) is beyond m2's vocab_size 2: left out
    m2.add(added_entry("<x>"))  # other settings: the first model's win
    m2.add(added_entry("<y>"))
    got = union_additions([ModelTokens(base, 2), ModelTokens(m1, 5), ModelTokens(m2, 2)], base.vocab())
    assert [e["content"] for e in got] == ["c", "d", "e", "<x>"]
    assert got[0] == added_entry("c") and got[0]["normalized"] and not got[0]["special"]
    assert got[3]["special"]  # m1's settings
    m2_all = ModelTokens(m2, 5)
    got = union_additions([ModelTokens(base, 2), m2_all], base.vocab())
    assert [e["content"] for e in got] == ["e", "c", "f", "<x>", "<y>"]


def test_read_tokenizer_settings(tmp_path):
    write_tokenizer(tmp_path, vocab_tokens(8) + ["<tool>"], n_added=1)
    t = read_tokenizer(tmp_path)
    assert t.size == 8 and t.vocab()["<tool>"] == 8
    assert t.flags["<tool>"] == added_entry("<tool>", normalized=False)  # write_tokenizer's settings
    assert t.flags["<s>"] == added_entry("<s>", special=True)


def test_rows_of_configured_tokens():
    vocab = {"a": 0, "b": 1, "c": 2, "d": 3}
    members = [{"a": 0, "b": 1, "c": 2}, {"b": 0, "a": 1, "d": 2}]  # m0 lacks d, m1 lacks c
    x0, x1 = _rows(1, 2, 3), _rows(10, 20, 30)
    tokens = {
        "a": TokenRow("f", force=True, member=1, row=2, model="m1"),  # forced: m1's row 2 everywhere
        "b": TokenRow("f", force=False, zero=True),  # both have b, not forced: own rows
        "c": TokenRow("f", force=False, zero=True),  # m1 lacks c: zero instead of m0's row
        "d": TokenRow("f", force=False, member=0, row=0, model="m0"),  # model_token: m0's row 0 for whoever lacks d
    }
    got = RowMap.build(vocab, 4, members, base=None, tokens=tokens).apply([x0, x1], compat=True)
    assert torch.equal(got[0], _rows(30, 2, 3, 1))
    assert torch.equal(got[1], _rows(30, 10, 0, 30))
    with pytest.raises(ConfigError, match=r"tokenizer.tokens\['d'\].source: missing"):
        RowMap.build(vocab, 4, members, None, {"d": TokenRow("tokenizer.tokens['d'].source", force=False)})
    with pytest.raises(ConfigError, match="not an input of this vocabulary tensor"):
        RowMap.build(vocab, 4, members, None, {"d": TokenRow("f", force=False, row=0, model="m9")})
    # a source-less entry for a token every input has, not forced: never consulted (as mergekit)
    RowMap.build(vocab, 4, members, None, {"b": TokenRow("f", force=False)})


@pytest.fixture(scope="module")
def ufam(tmp_path_factory):
    """base: 40 tokens; ft1: + 2 new tokens + added <tool>; ft2: base ids permuted + 1 new token + <tool>
    + added <img>."""
    root = tmp_path_factory.mktemp("union_fam")
    v = vocab_tokens(44)
    fams = make_vocab_family(root, SHAPE, {"base": v[:40], "ft1": v[:42] + ["<tool>"],
                                           "ft2": v[:3] + v[3:40][::-1] + [v[42], "<tool>", "<img>"]},
                             dtype="float32", n_added={"ft1": 1, "ft2": 2})
    return fams, v


def test_union_merge_by_hand(tmp_path, ufam):
    fams, v = ufam
    doc = {"merge_method": "linear", "base_model": str(fams["base"]), "dtype": "float32", "tokenizer_source": "union",
           "models": [{"model": str(fams[n]), "parameters": {"weight": 1.0}} for n in ("ft1", "ft2")],
           "parameters": {"weight": 1.0}}
    merge(doc, tmp_path / "out", progress=False, copy_tokenizer=False)
    out = read_vocab(tmp_path / "out")
    order = v[:40] + [v[40], v[41], v[42], "<tool>", "<img>"]  # base; ft1's then ft2's new tokens; added tokens
    assert out == {t: i for i, t in enumerate(order)}
    got, b, m1, m2 = (_load(p) for p in (tmp_path / "out", fams["base"], fams["ft1"], fams["ft2"]))
    perm = v[:3] + v[3:40][::-1] + [v[42], "<tool>", "<img>"]
    ft1_toks = v[:42] + ["<tool>"]
    for name in (EMB, HEAD):
        assert got[name].shape == (45, 16)
        for i, tok in enumerate(order):
            rows = {"ft1": _row(m1, name, ft1_toks, tok) if tok in ft1_toks else None,
                    "ft2": _row(m2, name, perm, tok) if tok in perm else None,
                    "base": _row(b, name, v[:40], tok) if tok in v[:40] else None}
            have = [r for r in rows.values() if r is not None]
            # missing: the only holder's row; else the base's; else the mean of the holders (in input order)
            default = have[0] if len(have) == 1 else rows["base"] if rows["base"] is not None else (rows["ft1"] + rows["ft2"]) / 2
            want = sum((r if r is not None else default) for r in (rows["base"], rows["ft1"], rows["ft2"])) / 3
            assert torch.allclose(got[name][i], want, rtol=0, atol=1e-6), (name, tok)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["vocab_size"] == 45
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.get_vocab() == out and tok.convert_ids_to_tokens(tok(f"t0 {v[41]} <img>")["input_ids"]) == ["t0", v[41], "<img>"]


def test_tokens_added_to_a_base_or_model_tokenizer(tmp_path, ufam):
    fams, v = ufam
    doc = {"merge_method": "linear", "base_model": str(fams["base"]), "dtype": "float32", "parameters": {"weight": 1.0},
           "models": [{"model": str(fams["ft1"]), "parameters": {"weight": 1.0}}],
           "tokenizer": {"source": "base", "tokens": {"<new>": {"source": {"kind": "zero"}},
                                                     v[40]: {"source": str(fams["ft1"])}}}}
    p = plan(doc)
    assert p.tokenizer.vocab == {**{t: i for i, t in enumerate(v[:40])}, "<new>": 40, v[40]: 41}
    merge(doc, tmp_path / "out", progress=False)
    got, m1 = _load(tmp_path / "out"), _load(fams["ft1"])
    assert torch.equal(got[EMB][40], torch.zeros(16))
    assert torch.allclose(got[EMB][41], m1[EMB][40], rtol=0, atol=1e-7)  # ft1's row for base and ft1, averaged 1:1
    assert read_vocab(tmp_path / "out") == p.tokenizer.vocab


@pytest.mark.parametrize("tokens,msg", [
    ({"<tool>": {"source": "@base"}}, r"tokenizer.tokens\['<tool>'\].source: .*base has no token '<tool>'"),
    ({"<q>": {"source": {"kind": "model_token", "model": "@ft1", "token": "<img>"}}},
     r"tokenizer.tokens\['<q>'\].source.token: .*ft1 has no token '<img>'"),
    ({"<q>": {"source": {"kind": "model_token", "model": "@ft1", "token_id": 43}}}, r"source.token_id: 43 is beyond"),
    ({"<q>": {}}, r"tokenizer.tokens\['<q>'\].source: missing"),
    ({"<q>": {"source": "@nowhere"}}, r"tokenizer.tokens\['<q>'\].source: .*nowhere is not one of the merge's models"),
])
def test_bad_tokens_name_the_field_and_write_nothing(tmp_path, ufam, tokens, msg):
    fams, _ = ufam

    def path(x):
        if isinstance(x, dict):
            return {k: path(y) for k, y in x.items()}
        if isinstance(x, str) and x.startswith("@"):  # "@ft1": that model's folder; "@nowhere": no model
            return str(fams[x[1:]]) if x[1:] in fams else str(tmp_path / x[1:])
        return x

    doc = {"merge_method": "linear", "base_model": str(fams["base"]), "parameters": {"weight": 1.0},
           "models": [{"model": str(fams["ft1"]), "parameters": {"weight": 1.0}}],
           "tokenizer": {"source": "union", "tokens": path(tokens)}}
    with pytest.raises(ConfigError, match=msg) as e:
        merge(doc, tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no OUT, no temp folder beside it


def test_union_needs_a_fast_base_tokenizer_to_add_tokens(tmp_path, ufam):
    fams, v = ufam
    base = tmp_path / "base"
    base.mkdir()
    for f in fams["base"].iterdir():
        if f.name != "tokenizer.json":
            (base / f.name).write_bytes(f.read_bytes())
    (base / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(v[:40])}))
    doc = {"merge_method": "linear", "base_model": str(base), "parameters": {"weight": 1.0}, "tokenizer_source": "union",
           "models": [{"model": str(fams["ft1"]), "parameters": {"weight": 1.0}}]}
    with pytest.raises(ConfigError, match="needs its tokenizer.json"):
        merge(doc, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_union_yaml_cli_compat_and_recorded_config(tmp_path, ufam):
    fams, v = ufam
    from fastmerge import cli

    tokens = {"<new>": {"source": {"kind": "model_token", "model": str(fams["ft2"]), "token": "<img>"}, "force": True}}
    doc = {"merge_method": "ties", "base_model": str(fams["base"]), "dtype": "float32",
           "models": [{"model": str(fams[n]), "parameters": {"weight": 0.5, "density": 0.5}} for n in ("ft1", "ft2")],
           "tokenizer": {"source": "union", "tokens": tokens}}
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(doc))
    assert cli.main(["merge", str(cfg), str(tmp_path / "cli"), "--no-progress", "--mergekit-compat"]) == 0
    merge(doc, tmp_path / "api", progress=False, mergekit_compat=True)
    a, b = _load(tmp_path / "cli"), _load(tmp_path / "api")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert read_vocab(tmp_path / "cli")["<new>"] == 45 and a[EMB].shape == (46, 16)
    m2 = _load(fams["ft2"])
    assert torch.equal(a[EMB][45], m2[EMB][42])  # every input's row of <new> is ft2's <img> row: ties keeps it
    recorded = MergeConfig.from_yaml(tmp_path / "cli" / "fastmerge_config.yml")
    assert (recorded.tokenizer_source, recorded.tokenizer_tokens) == ("union", tokens)


def test_union_model_without_tokenizer_shares_the_base_s(vfam):
    fams, v = vfam  # ft3 has no tokenizer files: taken to share the base's (mergekit: a warning), adds nothing
    doc = {"merge_method": "linear", "base_model": str(fams["base"]), "parameters": {"weight": 1.0}, "tokenizer_source": "union",
           "models": [{"model": str(fams[n]), "parameters": {"weight": 1.0}} for n in ("ft3", "ft1")]}
    p = plan(doc)
    assert p.tokenizer.vocab == {t: i for i, t in enumerate(v)}  # the base's 40, then ft1's 4
    remaps = {t.name: t.input_transform for t in p.tensors if t.input_transform is not None}
    # linear's inputs: ft3, ft1, then the base (mergekit merges it as one more input); only ft1 keeps its ids
    assert sorted(remaps) == [HEAD, EMB] and [remaps[EMB].is_identity(k) for k in range(3)] == [False, True, False]
