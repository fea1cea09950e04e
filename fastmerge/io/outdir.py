"""What is at OUT and beside it: the files ``--overwrite`` may replace, and the temporary folders that
interrupted merges left.

``--overwrite`` replaces only an earlier fastmerge output: a folder holding ``fastmerge_config.yml`` and
nothing but the files a fastmerge output holds (weights, index, config.json, generation_config.json,
tokenizer files, a model card fastmerge wrote). Anything else (a user's notes, a model fastmerge did not
write, an empty folder's neighbours) makes it refuse, naming those files: it never removes what it did
not write.

A merge killed by SIGKILL (or a power cut) leaves its temporary folder ``.OUT.fastmerge-tmp-*`` beside
OUT; ``stale_temp_dirs`` lists them so that the next merge to that OUT can name them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

#: the files of a fastmerge output besides the weight shards
OWN_FILES = frozenset({
    "config.json", "generation_config.json", "fastmerge_config.yml", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
})
SHARD_RE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
MARKER = "fastmerge_config.yml"


def foreign_files(out: Path) -> list[str]:
    """The entries of the existing folder ``out`` that fastmerge did not write (sorted); empty when ``out``
    is an earlier fastmerge output (or an empty folder). Without ``fastmerge_config.yml`` nothing there
    counts as fastmerge's: a model folder chosen as OUT by mistake is never replaced."""
    from .side_files import CARD_MARKER

    names = sorted(p.name for p in Path(out).iterdir())
    if names and MARKER not in names:
        return names
    bad = []
    for n in names:
        p = Path(out) / n
        if p.is_file() and not p.is_symlink() and (n in OWN_FILES or SHARD_RE.fullmatch(n)):
            continue
        if n == "README.md" and p.is_file() and _is_our_card(p, CARD_MARKER):
            continue
        bad.append(n + ("/" if p.is_dir() else ""))
    return bad


def _is_our_card(p: Path, marker: str) -> bool:
    try:
        with open(p, encoding="utf-8", errors="replace") as f:
            return marker in f.read(4096)
    except OSError:
        return False


def refuse_foreign(out: Path) -> str | None:
    """One line refusing to replace ``out`` when it holds files fastmerge did not write; None when it may."""
    bad = foreign_files(out)
    if not bad:
        return None
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    why = "it is not a fastmerge output (no fastmerge_config.yml)" if MARKER not in {p.name for p in out.iterdir()} \
        else "it holds files fastmerge did not write"
    return (f"{out}: --overwrite replaces only an earlier fastmerge output, and {why}: {shown}; move them away "
            "or choose another OUT")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A new folder beside ``out`` (``.OUT.tmp-*``, made with its parent) to write a small output into: when
    the block ends normally it replaces ``out`` (an existing ``out`` is removed first: the caller has checked
    it may be), on any exception, Ctrl-C included, it is removed. The adapter writers use it; merges go
    through ``engine.session``, which also resumes."""
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stale_temp_dirs(out: Path) -> list[Path]:
    """Temporary folders of earlier merges to ``out`` that were killed before they could clean up
    (``.OUT.fastmerge-tmp-*``), oldest first."""
    out = Path(out)
    try:
        found = [p for p in out.parent.glob(f".{glob_escape(out.name)}.fastmerge-tmp-*") if p.is_dir()]
    except OSError:
        return []
    return sorted(found, key=lambda p: p.stat().st_mtime)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)
