"""``tokenizer_source: union`` and ``tokenizer.tokens``: the output vocabulary grown by added tokens.

Torch-free and file-free: ``fastmerge.vocab`` reads the tokenizers and writes the files; this module holds
the rules that decide which token gets which id.

- ``AddedTokens`` is the ``tokenizers`` library's added-token table over a fixed model vocabulary, as
  ``Tokenizer.add_tokens`` changes it: a token already in the model vocabulary (or already added) keeps
  its id; a new one gets ``len(model vocabulary)``, or max(added id) + 1 once that is beyond it. Adding
  a token that is already added with other flags replaces its flags (same id); with the same flags it
  is ignored. Loading a tokenizer replays its added tokens through the same rule (ids in the file are
  not read back), so a rewritten ``tokenizer.json`` lists them by id.
- ``union_additions`` is mergekit 0.1.5's ``build_union_tokenizer``: the base tokenizer (already
  stripped to the base's vocab_size), then, in model order, every other model's tokens below its
  vocab_size that the base lacks (as plain added tokens: not special, normalized), then every model's
  added tokens below its vocab_size, the first settings of a token winning.

Order. mergekit walks the models in ``referenced_models()`` order, a Python set, and each model's tokens
in ``get_vocab()`` order, a Rust hash map's: both change from run to run, so mergekit numbers the tokens
the base lacks differently from one run to the next whenever more than one such token exists. fastmerge
takes one of those orders, every time: the models as the config lists them, each model's tokens by id.
The rows follow the tokens, so any of mergekit's runs and fastmerge's agree token by token.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

#: An added token's settings, as ``tokenizer.json`` writes them (``tokenizers.AddedToken``).
FLAG_KEYS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def added_entry(content: str, **flags: Any) -> dict[str, Any]:
    """An added token with ``tokenizers``' defaults: not special, and then normalized (a special token
    is not normalized unless the file says so)."""
    special = bool(flags.get("special", False))
    out = {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": not special,
           "special": special}
    out.update({k: bool(flags[k]) for k in FLAG_KEYS if k in flags and flags[k] is not None})
    return out


class AddedTokens:
    """The added-token table of one tokenizer (see the module docstring for the id rule)."""

    def __init__(self, model_vocab: Mapping[str, int]):
        self.model = dict(model_vocab)
        self.size = len(self.model)
        self.ids: dict[str, int] = {}
        self.flags: dict[str, dict[str, Any]] = {}
        self.top = -1  # the largest added id (kept, not searched: a union can add 150k tokens)
        self.changed = False  # whether ``add`` changed anything since construction (``mark_loaded`` resets it)

    def add(self, entry: dict[str, Any], replace: bool = True) -> None:
        """``Tokenizer.add_tokens([entry])``. ``replace=False``: a token already added is left as it is
        (transformers adding its special tokens on load)."""
        content = entry["content"]
        if not isinstance(content, str) or not content:
            return
        if content in self.ids:
            if replace and self.flags[content] != entry:
                self.flags[content] = entry
                self.changed = True
            return
        if content in self.model:
            new = self.model[content]
        elif self.ids:
            new = self.top + 1 if self.top >= self.size or self.size == 0 else self.size
        else:
            new = self.size
        self.ids[content] = new
        self.flags[content] = entry
        self.top = max(self.top, new)
        self.changed = True

    def mark_loaded(self) -> None:
        self.changed = False

    def vocab(self) -> dict[str, int]:
        out = dict(self.model)
        out.update(self.ids)
        return out

    def entries(self) -> list[tuple[int, dict[str, Any]]]:
        """(id, settings) of every added token, by id (``added_tokens_decoder``)."""
        return sorted(((i, self.flags[c]) for c, i in self.ids.items()), key=lambda e: e[0])

    def limited(self, limit: int) -> "AddedTokens":
        """This table without the tokens whose id is >= ``limit`` (mergekit's stripped base tokenizer)."""
        out = AddedTokens({t: i for t, i in self.model.items() if i < limit})
        for i, e in self.entries():
            if i < limit:
                out.ids[e["content"]], out.flags[e["content"]] = i, e
                out.top = max(out.top, i)
        return out

    def copy(self) -> "AddedTokens":
        out = AddedTokens(self.model)
        out.ids, out.flags, out.top = dict(self.ids), dict(self.flags), self.top
        return out


@dataclasses.dataclass
class ModelTokens:
    """One input's tokenizer as the union sees it: its tokens, its added tokens and its vocab_size
    (config.json's, else the size of its model vocabulary without added tokens, as mergekit)."""

    table: AddedTokens
    limit: int


def union_additions(models: Sequence[ModelTokens], base_vocab: Mapping[str, int]) -> list[dict[str, Any]]:
    """What mergekit adds to the (stripped) base tokenizer, in order. ``models``: the base first."""
    regular: dict[str, None] = {}
    added: dict[str, dict[str, Any]] = {}
    for m in models:
        vocab = m.table.vocab()
        for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            if i < m.limit:
                regular.setdefault(tok, None)
        for i, e in m.table.entries():
            if i < m.limit:
                added.setdefault(e["content"], e)
    out = [added_entry(t) for t in regular if t not in added and t not in base_vocab]
    return out + list(added.values())


def grow(table: AddedTokens, entries: Iterable[dict[str, Any]]) -> AddedTokens:
    """``table`` (copied) with ``entries`` added in order."""
    out = table.copy()
    for e in entries:
        out.add(e)
    return out


def add_missing(table: AddedTokens, tokens: Iterable[str]) -> None:
    """mergekit's ``add_tokens`` for ``tokenizer.tokens``: each token not in the vocabulary yet, as a
    plain added token."""
    for t in tokens:
        if t not in table.model and t not in table.ids:
            table.add(added_entry(t))


def tokenizer_json_added(entries: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """``tokenizer.json``'s ``added_tokens``: every added token by id (the order loading replays)."""
    return [{"id": i, "content": e["content"], **{k: e[k] for k in FLAG_KEYS}} for i, e in entries]


def config_added_decoder(entries: list[tuple[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``tokenizer_config.json``'s ``added_tokens_decoder`` (transformers' layout)."""
    return {str(i): {"content": e["content"], "lstrip": e["lstrip"], "normalized": e["normalized"], "rstrip": e["rstrip"],
                     "single_word": e["single_word"], "special": e["special"]} for i, e in entries}
