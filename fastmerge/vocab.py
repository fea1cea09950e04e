"""``tokenizer_source``: one output vocabulary, and every input's embedding / lm_head rows moved to it.

What mergekit 0.1.5 computes (``tokenizer/build.py`` + ``tokenizer/embed.py``, established by running it
side by side, see tests/parity/test_parity_tokenizer.py and test_parity_tokenizer_union.py), and
fastmerge reproduces:

- **Output vocabulary.** ``base``: the base model's tokenizer (``base_model``, else the first model),
  without the tokens whose id is >= the base's ``vocab_size`` (config.json). ``<model>``: that model's
  whole tokenizer. ``union``: the base's, stripped, grown by the other models' tokens
  (``fastmerge.vocab_union``: which tokens, in which order, with which ids). ``tokenizer.tokens`` adds
  each of its tokens the vocabulary lacks, as a plain added token. Its size ``V = len(vocab)`` (padded
  up to ``pad_to_multiple_of`` if given) becomes the output's ``vocab_size`` and the row count of every
  vocabulary tensor; the output tokenizer files are that tokenizer's (copied; ``tokenizer.json`` and
  ``added_tokens_decoder`` rewritten when base tokens had to be dropped, which mergekit supports for
  BPE only, as here, or tokens were added, which needs a ``tokenizer.json`` here).
- **Rows, per vocabulary tensor and per input model m, for each output token t:** if m's tokenizer has
  t (with an id below m's ``vocab_size``), m's own row for t. Otherwise a default shared by the inputs:
  the donor's row when exactly one input has t; zero when none has it; the base model's row when the
  base is an input of this tensor and has t; else the mean of the rows of the inputs that have t
  (summed in input order, then divided by their count; in the compute dtype with ``mergekit_compat``,
  in fp32 otherwise). Padding rows (``V`` rounded up) get the mean of the model's first ``V`` rows.
  A token of ``tokenizer.tokens`` takes its default from its entry instead (``TokenRow``): a model's
  row of the token, a model's row of another token (``model_token``), or zero; with ``force`` every
  input gets it, whether it has the token or not. The merge method then runs on the remapped rows as
  on any tensor.
- A model without tokenizer files is taken to share the base's tokenizer (mergekit: a warning).

Which tensors are vocabulary tensors: mergekit reads ``vocabulary_axis: 0`` from its per-architecture
JSON; fastmerge is architecture-agnostic and matches names (``VOCAB_TENSOR_RE``): input embeddings
``embed_tokens`` (LLaMA, Mistral, Qwen, Gemma, T5 encoder/decoder), ``wte`` (GPT-2/J, StarCoder),
``word_embeddings`` (BERT, RoBERTa, BLOOM, Falcon, ChatGLM), ``tok_embeddings`` (InternLM2),
``embed_in`` (GPT-NeoX), ``shared`` (T5, BART), ``backbone.embeddings`` (Mamba); output heads
``lm_head`` (and ``lm_head.linear`` / ``lm_head.decoder``, weights and biases), ``embed_out``
(GPT-NeoX), ``output`` (InternLM2), ``output_layer`` (ChatGLM), ``vocab_projector`` (DistilBERT),
``cls.predictions`` (BERT MLM). A match counts only when the tensor's first dimension equals the
model's config.json ``vocab_size`` (when the config gives one): a stray name never gets remapped.

Vocabularies are read without transformers, from the files transformers reads (``vocab.json``
first, as ``AutoTokenizer(use_fast=True)``; else ``vocab.json`` + ``added_tokens.json``, ``vocab.txt``,
or a SentencePiece ``vocab.model`` / ``spiece.model``), with the ids the loaded tokenizer would
give: an added token not in the model vocabulary gets the next free id (the ``tokenizers`` rule, which
ignores the id written in the file), and the special tokens of ``tokenizer_config.json`` /
``special_tokens_map.json`` missing from the vocabulary are appended, as transformers does on load.

Deliberate differences: mergekit picks the tokenizer of a random model when there is no base_model
(``referenced_models()`` is a set), fastmerge the first listed one; a token whose id is >= its model's
``vocab_size`` crashes mergekit (KeyError) and is an absent token here; ``union`` numbers the tokens the
base lacks in one fixed order of the orders mergekit takes at random (``fastmerge.vocab_union``); a
``tokenizer.tokens`` entry that cannot give its row (an unknown model, a token its model lacks, no
source where one is needed) fails mergekit mid-merge and is a ConfigError naming the field here,
before anything is read.
"""

from __future__ import annotations

import dataclasses
import json
import re
from array import array
from pathlib import Path
from typing import Any, Callable, Sequence

from ._lazy import torch
from .errors import CheckpointError, ConfigError
from .io.lora import split_ref
from .vocab_union import FLAG_KEYS, AddedTokens, ModelTokens, add_missing, added_entry, config_added_decoder, grow
from .vocab_union import tokenizer_json_added, union_additions

#: Vocabulary tensors by name (see the module docstring for the families each name comes from).
VOCAB_TENSOR_RE = re.compile(
    r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|embed_out|shared"
    r"|lm_head(?:\.linear|\.decoder)?|output_layer|vocab_projector|cls\.predictions(?:\.decoder)?)\.(?:weight|bias)$"
    r"|^(?:output|backbone\.embeddings)\.weight$"
)

#: Files that make up a tokenizer (copied from the tokenizer source into the output).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt", "spiece.model", "chat_template.jinja",
    "chat_template.json",
)
#: transformers' named special tokens, in the order it appends the missing ones on load.
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def is_vocab_tensor(name: str) -> bool:
    """Whether ``name`` is an embedding / output-head tensor whose rows are indexed by token id."""
    return VOCAB_TENSOR_RE.search(name) is not None


# ------------------------------------------------------------------------------------------------
# reading vocabularies


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable tokenizer file ({e})") from None


def config_vocab_size(root: Path) -> int | None:
    """``vocab_size`` from a model's config.json (top level, else ``text_config``, as mergekit's
    per-architecture key for multimodal models), or None."""
    p = root / "config.json"
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    for d in (doc, doc.get("text_config") if isinstance(doc, dict) else None):
        if isinstance(d, dict) and isinstance(d.get("vocab_size"), int) and not isinstance(d["vocab_size"], bool):
            return d["vocab_size"]
    return None


def _tokenizer_json_model(doc: Any, path: Path) -> dict[str, int]:
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or "vocab" not in model:
        raise CheckpointError(f"{path}: no model.vocab in tokenizer.json")
    vocab = model["vocab"]
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], id = position
        return {str(e[0]): i for i, e in enumerate(vocab)}
    if isinstance(vocab, dict):  # BPE, WordLevel, WordPiece: {token: id}
        return {str(k): int(v) for k, v in vocab.items()}
    raise CheckpointError(f"{path}: model.vocab is neither a mapping nor a list")


def _sentencepiece_pieces(path: Path) -> list[str]:
    """The pieces of a SentencePiece ModelProto (field 1: repeated SentencePiece, whose field 1 is the
    piece string), read with a minimal protobuf wire-format walk: no sentencepiece / protobuf needed."""
    data = path.read_bytes()

    def varint(buf: bytes, i: int) -> tuple[int, int]:
        shift = val = 0
        while True:
            if i >= len(buf):
                raise CheckpointError(f"{path}: truncated SentencePiece model")
            b = buf[i]
            i += 1
            val |= (b & 0x7F) << shift
            if b < 0x80:
                return val, i
            shift += 7

    def fields(buf: bytes):
        i = 0
        while i < len(buf):
            tag, i = varint(buf, i)
            num, wt = tag >> 3, tag & 7
            if wt == 0:
                _, i = varint(buf, i)
                yield num, None
            elif wt == 1:
                i += 8
            elif wt == 2:
                n, i = varint(buf, i)
                yield num, buf[i:i + n]
                i += n
            elif wt == 5:
                i += 4
            else:
                raise CheckpointError(f"{path}: not a SentencePiece model (wire type {wt})")

    pieces = []
    for num, sub in fields(data):
        if num == 1 and sub is not None:
            piece = next((v for n, v in fields(sub) if n == 1 and v is not None), b"")
            pieces.append(piece.decode("utf-8", errors="replace"))
    return pieces


def _transformers_additions(root: Path) -> list[dict[str, Any]]:
    """Tokens transformers adds on load, in its order: ``added_tokens_decoder`` of tokenizer_config.json
    (by id) when it has one, else the legacy ``added_tokens.json``; then the named special tokens (bos,
    eos, unk, sep, pad, cls, mask), then the extra special tokens. ``special_tokens_map.json`` is read only
    without ``added_tokens_decoder``, and then overrides tokenizer_config.json (transformers 5's rules)."""
    cfg: dict[str, Any] = {}
    tc = root / "tokenizer_config.json"
    if tc.is_file():
        d = _json(tc)
        cfg = d if isinstance(d, dict) else {}
    out: list[dict[str, Any]] = []
    dec = cfg.get("added_tokens_decoder")
    if isinstance(dec, dict):
        out += [_entry(e) for _, e in sorted(dec.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)]
    else:
        stm = root / "special_tokens_map.json"
        if stm.is_file():
            d = _json(stm)
            if isinstance(d, dict):
                cfg = {**cfg, **{k: v for k, v in d.items() if v}}
        at = root / "added_tokens.json"
        if at.is_file():
            d = _json(at)
            if isinstance(d, dict):
                out += [_entry(k) for k, _ in sorted(d.items(), key=lambda kv: kv[1])]
    # the named and extra special tokens: AddedToken(special=True, normalized=False) unless the file says otherwise
    out += [_entry(cfg[k], special=True) for k in SPECIAL_KEYS if cfg.get(k)]
    for key in ("extra_special_tokens", "additional_special_tokens"):
        extra = cfg.get(key)
        if isinstance(extra, list):
            out += [_entry(e, special=True) for e in extra]
    return [e for e in out if e is not None]


def _entry(e: Any, special: bool = False) -> dict[str, Any] | None:
    """An added token from a file (a string, or a mapping with ``content`` and settings)."""
    if isinstance(e, dict):
        c = e.get("content")
        return added_entry(c, **{"special": special, **{k: e[k] for k in FLAG_KEYS if k in e}}) if isinstance(c, str) and c else None
    return added_entry(e, special=special) if isinstance(e, str) and e else None


def read_vocab(root: Path) -> dict[str, int] | None:
    """The vocabulary ``{token: id}`` that ``AutoTokenizer.from_pretrained(root).get_vocab()`` returns
    (model vocabulary + added tokens), or None when ``root`` has no tokenizer files."""
    t = read_tokenizer(root)
    return None if t is None else t.vocab()


def read_tokenizer(root: Path) -> AddedTokens | None:
    """The tokenizer ``AutoTokenizer.from_pretrained(root)`` loads, as its model vocabulary and its added
    tokens (``added_tokens_decoder``, settings included), or None when ``root`` has no tokenizer files."""
    tj = root / "tokenizer.json"
    added: list[dict[str, Any]] = []
    if tj.is_file():
        doc = _json(tj)
        model_vocab = _tokenizer_json_model(doc, tj)
        added = [x for x in (_entry(e) for e in doc.get("added_tokens") or [] if isinstance(e, dict)) if x is not None]
    elif (root / "vocab.json").is_file():  # GPT-2 style (+ merges.txt)
        model_vocab = {str(k): int(v) for k, v in _json(root / "vocab.json").items()}
    elif (root / "vocab.txt").is_file():  # BERT WordPiece: one token per line, id = line number
        lines = (root / "vocab.txt").read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        model_vocab = {}
        for i, tok in enumerate(lines):
            model_vocab[tok] = i
    else:
        sp = next((root / n for n in ("tokenizer.model", "spiece.model") if (root / n).is_file()), None)
        if sp is None:
            return None
        model_vocab = {}
        for i, piece in enumerate(_sentencepiece_pieces(sp)):
            model_vocab.setdefault(piece, i)
    table = AddedTokens(model_vocab)
    for e in added + _transformers_additions(root):
        table.add(e, replace=False)
    table.mark_loaded()
    return table


# ------------------------------------------------------------------------------------------------
# the output vocabulary


@dataclasses.dataclass
class OutputTokenizer:
    """The output tokenizer: its folder, vocabulary, row count, and rewritten files (if tokens beyond the
    base's vocab_size had to be dropped: ``{file name: new text}``; every other file is copied)."""

    source: Path
    vocab: dict[str, int]
    n_rows: int
    rewritten: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def n_vocab(self) -> int:
        return len(self.vocab)

    def files(self) -> list[str]:
        return [n for n in TOKENIZER_FILES if (self.source / n).is_file() or n in self.rewritten]


def _strip(root: Path, vocab: dict[str, int], limit: int) -> dict[str, Any]:
    """tokenizer.json / tokenizer_config.json of ``root`` (parsed) without the tokens whose id >= ``limit``
    (mergekit's ``get_stripped_tokenizer``: BPE only; merges that use a dropped token dropped too)."""
    unused = {t for t, i in vocab.items() if i >= limit}
    tj = root / "tokenizer.json"
    if not tj.is_file():
        raise ConfigError(f"tokenizer_source: base: {root} has {len(unused)} token(s) with ids >= vocab_size {limit} "
                          "and no tokenizer.json to drop them from (mergekit requires a fast BPE tokenizer here too)")
    doc = _json(tj)
    kind = (doc.get("model") or {}).get("type")
    if kind != "BPE":
        raise ConfigError(f"tokenizer_source: base: {tj} has {len(unused)} token(s) with ids >= vocab_size {limit}; "
                          f"dropping them is supported for BPE tokenizers only (this one is {kind}), as in mergekit")
    doc["added_tokens"] = [e for e in doc.get("added_tokens") or [] if e.get("id", 0) < limit]
    doc["model"]["vocab"] = {t: i for t, i in doc["model"]["vocab"].items() if t not in unused}

    def keep(m: Any) -> bool:
        parts = m.split(" ") if isinstance(m, str) else list(m)
        # mergekit checks the two parts only; a merge whose product was dropped would make the file
        # unloadable ("Token ... out of vocabulary"), so it goes too
        return not any(p in unused for p in parts) and "".join(parts) not in unused

    doc["model"]["merges"] = [m for m in doc["model"].get("merges") or [] if keep(m)]
    out: dict[str, Any] = {"tokenizer.json": doc}
    tc = root / "tokenizer_config.json"
    if tc.is_file():
        cfg = _json(tc)
        dec = cfg.get("added_tokens_decoder") if isinstance(cfg, dict) else None
        if isinstance(dec, dict):
            cfg["added_tokens_decoder"] = {k: v for k, v in dec.items() if not (str(k).isdigit() and int(k) >= limit)}
            out["tokenizer_config.json"] = cfg
    return out


def model_root(path: str) -> Path:
    """The folder of a model reference (a folder, or a checkpoint file inside one; of MODEL+ADAPTER, MODEL's)."""
    p = Path(split_ref(path)[0])
    return p.parent if p.is_file() else p


class Vocabularies:
    """The output tokenizer plus, per input model, its vocabulary limited to ids < its vocab_size.
    Built once per merge plan; ``row_map`` then describes one vocabulary tensor.

    ``models``: every model of the merge in config order (``tokenizer_source: union`` reads them all);
    ``tokens``: ``tokenizer.tokens`` as the config validated it (token -> ``{source, force}``)."""

    def __init__(self, source: str, base: str, pad_to_multiple_of: int | None = None, models: Sequence[str] = (),
                 tokens: dict[str, dict[str, Any]] | None = None):
        self.base = base
        self.tokens = dict(tokens or {})
        base_root = model_root(base)
        base_tok = read_tokenizer(base_root)
        if base_tok is None:
            raise ConfigError(f"tokenizer_source: {base} (the base model's tokenizer, used to align vocabularies) has no "
                              "tokenizer files (tokenizer.json, vocab.json, vocab.txt or tokenizer.model)")
        base_vocab = base_tok.vocab()
        limit = config_vocab_size(base_root) or len(base_vocab)
        stripped = base_tok.limited(limit)  # mergekit strips the base tokenizer
        self._base_vocab = stripped.vocab()
        self._models: dict[str, dict[str, int]] = {base: self._base_vocab}
        self._tables: dict[str, AddedTokens | None] = {base: stripped}
        if source in ("base", "union"):
            root, table = base_root, stripped
            docs = _strip(base_root, base_vocab, limit) if len(self._base_vocab) < len(base_vocab) else {}
            if source == "union":
                views = [ModelTokens(stripped, limit)]
                for m in dict.fromkeys(models):
                    t = self._table(m) if m != base else None
                    if t is not None:  # no tokenizer files: the base's (mergekit: "Assuming same as base")
                        views.append(ModelTokens(t, config_vocab_size(model_root(m)) or t.size))
                table = grow(stripped, union_additions(views, self._base_vocab))
        else:
            root = model_root(source)
            if not root.is_dir():
                raise ConfigError(f"tokenizer_source: {source} is not a local model folder")
            loaded = read_tokenizer(root)
            if loaded is None:
                raise ConfigError(f"tokenizer_source: {source} has no tokenizer files "
                                  "(tokenizer.json, vocab.json, vocab.txt or tokenizer.model)")
            table, docs = loaded.copy(), {}
        if self.tokens:
            add_missing(table, self.tokens)
        if table.changed:
            docs = _with_added(root, docs, table, source)
        rewritten = {n: json.dumps(d, ensure_ascii=False, indent=2) for n, d in docs.items()}
        out = OutputTokenizer(root, table.vocab(), 0, rewritten)
        n = out.n_vocab
        if n == 0:
            raise ConfigError(f"tokenizer_source: {out.source}: empty vocabulary")
        top = max(out.vocab.values())
        if top >= n or min(out.vocab.values()) < 0:
            raise ConfigError(f"tokenizer_source: {out.source}: token ids are not 0..{n - 1} (largest {top}); "
                              "mergekit would index rows out of range")
        out.n_rows = n if not pad_to_multiple_of else -(-n // pad_to_multiple_of) * pad_to_multiple_of
        self.output = out
        self._maps: dict[tuple, RowMap] = {}
        self._check_tokens()

    def _table(self, path: str) -> AddedTokens | None:
        if path not in self._tables:
            self._tables[path] = read_tokenizer(model_root(path))
        return self._tables[path]

    def vocab_of(self, path: str) -> dict[str, int]:
        """``path``'s tokens with ids below its config.json vocab_size (its tokenizer, else the base's)."""
        v = self._models.get(path)
        if v is None:
            t = self._table(path)
            own = self._base_vocab if t is None else t.vocab()  # mergekit: "Unable to load tokenizer ... Assuming same as base"
            limit = config_vocab_size(model_root(path)) or len(own)
            v = self._models[path] = {t: i for t, i in own.items() if i < limit}
        return v

    def _check_tokens(self) -> None:
        """``tokenizer.tokens`` sources that name a token their model lacks (mergekit: an assertion mid-merge)."""
        for tok, spec in self.tokens.items():
            src, field = spec.get("source"), f"tokenizer.tokens[{tok!r}].source"
            if isinstance(src, str) and tok not in self.vocab_of(src):
                raise ConfigError(f"{field}: {src} has no token {tok!r} (below its vocab_size) to take the row from")
            if isinstance(src, dict) and src.get("kind") == "model_token":
                m = src["model"]
                if "token" in src and src["token"] not in self.vocab_of(m):
                    raise ConfigError(f"{field}.token: {m} has no token {src['token']!r} (below its vocab_size)")
                n = config_vocab_size(model_root(m))
                if "token_id" in src and n is not None and src["token_id"] >= n:
                    raise ConfigError(f"{field}.token_id: {src['token_id']} is beyond {m}'s vocab_size {n}")

    def _token_rows(self, members: Sequence[str]) -> dict[str, "TokenRow"]:
        """``tokenizer.tokens`` in the terms of one tensor's inputs."""
        out = {}
        for tok, spec in self.tokens.items():
            src, force, field = spec.get("source"), bool(spec.get("force")), f"tokenizer.tokens[{tok!r}].source"
            if isinstance(src, dict) and src.get("kind") == "zero":
                out[tok] = TokenRow(field, force, zero=True)
                continue
            model = src if isinstance(src, str) else src.get("model") if isinstance(src, dict) else None
            if model is None:
                out[tok] = TokenRow(field, force)
                continue
            row = src.get("token_id") if isinstance(src, dict) else None
            if row is None:
                row = self.vocab_of(model)[tok if isinstance(src, str) else src["token"]]
            out[tok] = TokenRow(field, force, member=members.index(model) if model in members else None, row=row, model=model)
        return out

    def row_map(self, members: Sequence[str], base: str | None) -> "RowMap":
        """How to build the output rows of one vocabulary tensor from its inputs ``members`` (model paths,
        in the order the tensor's inputs are given to the method; ``base``: the configured base model of
        this tensor's slice, preferred as a row donor when it is one of the members)."""
        key = (tuple(members), base)
        rm = self._maps.get(key)
        if rm is None:
            rm = self._maps[key] = RowMap.build(self.output.vocab, self.output.n_rows,
                                                [self.vocab_of(m) for m in members],
                                                members.index(base) if base in members else None,
                                                self._token_rows(members))
        return rm


def _with_added(root: Path, docs: dict[str, Any], table: AddedTokens, source: str) -> dict[str, Any]:
    """The tokenizer files of ``root`` (``docs``: those already rewritten) with ``table``'s added tokens."""
    tj = docs.get("tokenizer.json")
    if tj is None:
        if not (root / "tokenizer.json").is_file():
            new = [e["content"] for _, e in table.entries() if e["content"] not in table.model][:3]
            raise ConfigError(f"tokenizer_source: {source}: adding tokens ({', '.join(map(repr, new))}, ...) to {root}'s tokenizer "
                              "needs its tokenizer.json (a fast tokenizer; this one has none)")
        tj = _json(root / "tokenizer.json")
    out = dict(docs)
    out["tokenizer.json"] = {**tj, "added_tokens": tokenizer_json_added(table.entries())}
    tc = docs.get("tokenizer_config.json")
    if tc is None and (root / "tokenizer_config.json").is_file():
        tc = _json(root / "tokenizer_config.json")
    if isinstance(tc, dict) and isinstance(tc.get("added_tokens_decoder"), dict):
        out["tokenizer_config.json"] = {**tc, "added_tokens_decoder": config_added_decoder(table.entries())}
    return out


# ------------------------------------------------------------------------------------------------
# one tensor's row map


def _ints(values: Sequence[int] = ()) -> array:
    return array("q", values)


@dataclasses.dataclass(frozen=True)
class TokenRow:
    """One ``tokenizer.tokens`` entry for one tensor: zero, or row ``row`` of input ``member`` (``model``),
    or no source (``model`` None). ``field`` names the config field for errors."""

    field: str
    force: bool
    zero: bool = False
    member: int | None = None
    row: int | None = None
    model: str | None = None

    def input_of(self) -> int:
        """The input to copy from, once the row is needed (some input lacks the token, or ``force``)."""
        if self.model is None:  # mergekit: NotImplementedError mid-merge
            raise ConfigError(f"{self.field}: missing, and the row is needed (force, or an input lacks the token): "
                              "give a model, {kind: zero} or {kind: model_token, model: M, token: T}")
        if self.member is None:  # mergekit: "requires a vocabulary weight from model ..." mid-merge
            raise ConfigError(f"{self.field}: {self.model} is not an input of this vocabulary tensor (a slice without it)")
        return self.member


@dataclasses.dataclass
class RowMap:
    """Output rows of one vocabulary tensor, for each of its M inputs (torch-free; ``apply`` runs it).

    ``own[m][r]``: input m's row for output row r, or -1. Rows some input lacks get a shared default
    (position ``dpos[r]`` in a table of ``n_default`` rows): a copy of one input's row (``copy_*``), the
    mean of several (``avg_*``: one entry per contributing (row, input), inputs in order; ``avg_count``
    per table row), or zero (neither). Rows ``n_vocab..n_rows-1`` are padding (each input's row mean).
    """

    n_vocab: int
    n_rows: int
    own: list[array]
    dpos: array  # [n_vocab] table position, or -1 when every input has the token
    n_default: int
    copy_pos: array
    copy_member: array
    copy_src: array
    avg_pos: array
    avg_member: array
    avg_src: array
    avg_count: array  # [n_default] number of contributing inputs (0 for copy / zero rows)

    @classmethod
    def build(cls, vocab: dict[str, int], n_rows: int, members: list[dict[str, int]], base: int | None,
              tokens: dict[str, TokenRow] | None = None) -> "RowMap":
        """``tokens``: ``tokenizer.tokens``' rows; they replace the rules below for their tokens (every
        input's row too, with ``force``)."""
        n = len(vocab)
        own = [_ints([-1]) * n for _ in members]
        dpos = _ints([-1]) * n
        cp, cm, cs, ap, am, asrc = (_ints() for _ in range(6))
        counts = _ints()
        tokens = tokens or {}
        for tok, r in vocab.items():
            have = [v.get(tok, -1) for v in members]
            spec = tokens.get(tok)
            forced = spec is not None and spec.force
            for m, i in enumerate(have):
                own[m][r] = -1 if forced else i
            present = [m for m, i in enumerate(have) if i >= 0]
            if len(present) == len(members) and not forced:
                continue
            pos = dpos[r] = len(counts)
            if spec is not None:  # the configured row
                counts.append(0)
                if not spec.zero:
                    cp.append(pos), cm.append(spec.input_of()), cs.append(spec.row)
                continue
            if len(present) == 1:  # the only input with this token donates its row
                cp.append(pos), cm.append(present[0]), cs.append(have[present[0]])
                counts.append(0)
            elif not present:  # nobody has it: zero
                counts.append(0)
            elif base is not None and have[base] >= 0:  # the base model's row
                cp.append(pos), cm.append(base), cs.append(have[base])
                counts.append(0)
            else:  # the mean of the inputs that have it
                for m in present:
                    ap.append(pos), am.append(m), asrc.append(have[m])
                counts.append(len(present))
        return cls(n, n_rows, own, dpos, len(counts), cp, cm, cs, ap, am, asrc, counts)

    def src_rows_needed(self, m: int) -> int:
        """Rows input ``m``'s tensor must have (1 + the largest row it is read from)."""
        top = max(self.own[m], default=-1)
        for mem, src in zip(self.copy_member, self.copy_src):
            if mem == m:
                top = max(top, src)
        for mem, src in zip(self.avg_member, self.avg_src):
            if mem == m:
                top = max(top, src)
        return top + 1

    def is_identity(self, m: int) -> bool:
        return all(i == r for r, i in enumerate(self.own[m]))

    def summary(self) -> dict[str, Any]:
        """Counts for ``fastmerge plan --json``."""
        return {
            "rows": self.n_rows, "vocab": self.n_vocab,
            "identity": [self.is_identity(m) for m in range(len(self.own))],
            "defaults": {"copied": len(self.copy_pos), "averaged": sum(1 for c in self.avg_count if c),
                         "zero": self.n_default - len(self.copy_pos) - sum(1 for c in self.avg_count if c)},
            "padding": self.n_rows - self.n_vocab,
        }

    # -- execution (torch) ---------------------------------------------------------------------

    def _prepared(self) -> dict[str, Any]:
        p = self.__dict__.get("_torch")
        if p is None:
            def t(a: array) -> torch.Tensor:
                return torch.frombuffer(bytearray(a.tobytes()), dtype=torch.int64) if len(a) else torch.empty(0, dtype=torch.int64)

            dpos = t(self.dpos)
            per = []
            for m, own in enumerate(self.own):
                o = t(own)
                has = o >= 0
                rows = torch.arange(self.n_vocab)
                miss = rows[~has]
                per.append((self.is_identity(m), rows[has], o[has], miss, dpos[miss]))
            am, cm = t(self.avg_member), t(self.copy_member)
            p = self.__dict__["_torch"] = {
                "per": per,
                "copy": [(t(self.copy_pos)[cm == m], t(self.copy_src)[cm == m]) for m in range(len(self.own))],
                "avg": [(t(self.avg_pos)[am == m], t(self.avg_src)[am == m]) for m in range(len(self.own))],
                "count": t(self.avg_count),
            }
        return p

    def apply(self, tensors: Sequence[torch.Tensor], compat: bool,
              out: Sequence[torch.Tensor] | Callable[[int, tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
              ) -> list[torch.Tensor]:
        """The remapped tensors (``n_rows`` rows each), in ``tensors``' order. ``out``: where to write
        input m's rows, ``out[m]`` or ``out(m, shape, dtype)``, asked only for the inputs that need a copy
        (an input whose ids already match is returned as a view of itself); default: new tensors.
        dtype: the promotion of the inputs' dtypes, as mergekit. Defaults (means) are summed in that
        dtype with ``compat`` (mergekit's arithmetic), in fp32 otherwise, then rounded once."""
        p = self._prepared()
        dtype = tensors[0].dtype
        for x in tensors[1:]:
            dtype = torch.promote_types(dtype, x.dtype)
        rest = tuple(tensors[0].shape[1:])
        acc = dtype if compat else torch.promote_types(dtype, torch.float32)
        table = torch.zeros((self.n_default, *rest), dtype=acc)
        for m, x in enumerate(tensors):
            pos, src = p["copy"][m]
            if len(pos):
                table[pos] = x[src].to(acc)
        for m, x in enumerate(tensors):  # input order: the order mergekit sums in
            pos, src = p["avg"][m]
            if len(pos):
                table[pos] = table[pos] + x[src].to(acc)
        count = p["count"]
        for c in sorted(set(count.tolist()) - {0}):
            sel = (count == c).nonzero().squeeze(1)
            table[sel] = table[sel] / c  # a Python scalar divisor, as mergekit's ``embed /= count``
        table = table.to(dtype)
        results = []
        for m, x in enumerate(tensors):
            identity, dst, src, miss, mpos = p["per"][m]
            if identity and self.n_rows == self.n_vocab and x.dtype == dtype and x.shape[0] >= self.n_vocab:
                results.append(x[: self.n_vocab])  # same ids: no copy (a prefix view is contiguous)
                continue
            shape = (self.n_rows, *rest)
            buf = torch.empty(shape, dtype=dtype) if out is None else out(m, shape, dtype) if callable(out) else out[m]
            if identity:
                buf[: self.n_vocab].copy_(x[: self.n_vocab])
            else:
                _gather_rows(buf, dst, x, src)
                if len(miss):
                    _gather_rows(buf, miss, table, mpos)
            if self.n_rows > self.n_vocab:  # padding rows: the mean row (mergekit, after the vocab-expansion note)
                head = buf[: self.n_vocab]
                # fp32 accumulation without an fp32 copy of the rows
                mean = head.mean(0) if compat else torch.mean(head, 0, dtype=torch.promote_types(dtype, torch.float32)).to(dtype)
                buf[self.n_vocab:] = mean
            results.append(buf)
        return results


#: Rows moved per step by ``_gather_rows``: bounds its temporary to 16 MiB (e.g. 1024 rows of a 4096-wide
#: fp32 embedding) instead of a second copy of the whole tensor.
GATHER_BYTES = 16 << 20


def _gather_rows(buf: torch.Tensor, dst: torch.Tensor, x: torch.Tensor, src: torch.Tensor) -> None:
    """``buf[dst] = x[src]`` (cast to buf's dtype) in bounded steps."""
    row_bytes = max(1, x[0].numel() * max(x.element_size(), buf.element_size()))
    step = max(1, GATHER_BYTES // row_bytes)
    for a in range(0, len(dst), step):
        buf.index_copy_(0, dst[a:a + step], x.index_select(0, src[a:a + step]).to(buf.dtype))
