"""The files an output folder carries beside its weights (``config.json``, tokenizer, the merge config)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FastMergeError
from ..vocab import TOKENIZER_FILES, model_root

if TYPE_CHECKING:
    from ..plan import MergePlan


#: files of the model (not of its tokenizer) copied from the model whose config.json the output takes
MODEL_FILES = ("generation_config.json",)
#: config.json lists with one entry per layer are found by their length; these lists never are
NOT_PER_LAYER = frozenset({"architectures"})


def layer_sources(plan: "MergePlan") -> list[int | None]:
    """For each output layer of a slices plan, the layer of the input it is made from (the slice's
    reference model: its base, else its first source), read from the tensors' input names."""
    from .index import layer_index

    src: list[int | None] = [None] * (plan.out_layers or 0)
    for t in plan.tensors:
        if t.layer is not None and t.layer < len(src) and src[t.layer] is None:
            first = t.base if t.base is not None else t.sources[0]
            src[t.layer] = layer_index(first.name)
    return src


def _follow_slices(doc: dict, n_src: int, src: list[int | None]) -> None:
    """Every per-layer list in ``doc`` (``layer_types``, ``no_rope_layers``..., nested configs too: a
    list of exactly ``n_src`` entries) rebuilt for the output layers; transformers refuses a config whose
    ``layer_types`` does not match ``num_hidden_layers``."""
    if any(i is None or not 0 <= i < n_src for i in src):
        return  # an output layer not taken from a layer of the donor's numbering: nothing to follow
    for k, v in list(doc.items()):
        if isinstance(v, dict):
            inner = next((v[x] for x in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(v.get(x), int)), None)
            if inner == n_src:  # a nested text config with the same layers (VLMs)
                for x in ("num_hidden_layers", "n_layer", "num_layers"):
                    if x in v:
                        v[x] = len(src)
                _follow_slices(v, n_src, src)
        elif isinstance(v, list) and len(v) == n_src and n_src > 1 and k not in NOT_PER_LAYER:
            doc[k] = [v[i] for i in src]


def write_side_files(plan: "MergePlan", tmp: Path, config: Any = None) -> None:
    """Write the files beside the weights into ``tmp``: ``config.json`` (dtype, layer count and vocabulary
    size updated), the tokenizer (copied, or rebuilt by ``tokenizer_source``) and ``fastmerge_config.yml``.
    ``config``: the merge config to record (default: the plan's; a rank sweep records each output's)."""
    cfg = plan.config if config is None else config
    ref_root = plan.ref_root
    src_cfg = ref_root / "config.json"
    if src_cfg.is_file():
        doc = json.loads(src_cfg.read_text(encoding="utf-8"))
        out_dtype = cfg.out_dtype or cfg.dtype
        if out_dtype:
            keys = [k for k in ("torch_dtype", "dtype") if k in doc] or ["torch_dtype"]
            for k in keys:
                doc[k] = out_dtype
        if plan.out_layers is not None:  # slices: the output has its own number of layers
            n_src = next((doc[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(doc.get(k), int)), None)
            for k in [k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in doc] or ["num_hidden_layers"]:
                doc[k] = plan.out_layers
            if n_src:
                _follow_slices(doc, n_src, layer_sources(plan))
        for key, src in (plan.module_layers or {}).items():  # modules given as slices: each one's own layers
            *outer, last = key.split(".")
            d = doc
            for k in outer:  # set where the (nested) config exists: a lone {"num_hidden_layers": n} would not load
                d = d.get(k) if isinstance(d, dict) else None
            if not isinstance(d, dict):
                continue
            n_src, d[last] = d.get(last), len(src)
            if isinstance(n_src, int) and n_src > 1 and all(0 <= i < n_src for i in src):
                for k, v in list(d.items()):  # this config's per-layer lists (Gemma3's text_config.layer_types)
                    if isinstance(v, list) and len(v) == n_src and k not in NOT_PER_LAYER:
                        d[k] = [v[i] for i in src]
        if plan.tokenizer is not None:  # the output vocabulary sets the embedding rows (mergekit's _update_config_vocab)
            nested = "vocab_size" not in doc and isinstance(doc.get("text_config"), dict) and "vocab_size" in doc["text_config"]
            (doc["text_config"] if nested else doc)["vocab_size"] = plan.tokenizer.n_rows
        from .fp8 import fix_config

        fix_config(doc, plan)  # FP8 inputs: quantization_config kept for an FP8 output, else removed
        (tmp / "config.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if plan.tokenizer is not None:
        # tokenizer_source: always written, as mergekit saves the tokenizer it built whatever --copy-tokenizer says
        tok = plan.tokenizer
        for name in tok.files():
            if name in tok.rewritten:
                (tmp / name).write_text(tok.rewritten[name], encoding="utf-8")
            else:
                shutil.copyfile(tok.source / name, tmp / name)
    elif plan.options.copy_tokenizer:
        src = ref_root
        if cfg.tokenizer_source and cfg.tokenizer_source != "base":
            src = model_root(cfg.tokenizer_source)
            if not src.is_dir():
                raise FastMergeError(f"tokenizer_source: {src} is not a local model folder")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
    if getattr(cfg, "chat_template", None):
        from . import chat_template

        roots = [model_root(p) for p in model_paths(cfg)]
        text = chat_template.resolve(cfg.chat_template, roots, plan.options.mergekit_compat)
        if text is not None and not chat_template.write(tmp, text):
            import warnings

            warnings.warn("chat_template: the output has no tokenizer_config.json (no tokenizer copied); not written", stacklevel=2)
    for name in MODEL_FILES:  # generation defaults (stop tokens, sampling): the config.json donor's
        if (ref_root / name).is_file():
            shutil.copyfile(ref_root / name, tmp / name)
    import yaml

    config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    (tmp / "fastmerge_config.yml").write_text(config_yaml, encoding="utf-8")
    if getattr(plan.options, "write_model_card", False):
        (tmp / "README.md").write_text(model_card(plan, config_yaml, out_name(tmp)), encoding="utf-8")


#: mergekit 0.1.5's model card (mergekit/card.py), with fastmerge named as the tool that made the merge
CARD_TEMPLATE = """---
{metadata}
---
# {name}

This is a merge of pre-trained language models created using fastmerge, a
[mergekit](https://github.com/cg123/mergekit)-compatible merger.

## Merge Details
### Merge Method

This model was merged using the {merge_method} merge method{base_text}.

### Models Merged

The following models were included in the merge:
{model_list}

### Configuration

The following YAML configuration was used to produce this model:

```yaml
{config_yaml}
```
"""
#: a model card fastmerge wrote says so in this line (``--overwrite`` replaces only what fastmerge wrote)
CARD_MARKER = "created using fastmerge"


def out_name(tmp: Path) -> str:
    """The output folder's name, from its temporary folder's (``.OUT.fastmerge-tmp-XXXX``)."""
    m = re.fullmatch(r"\.(.+)\.fastmerge-tmp-[^.]*", tmp.name)
    return m.group(1) if m else tmp.name


def model_paths(cfg: Any) -> list[str]:
    """Every model a merge config reads, once each, in config order: the base, then the models and slices'
    sources (of each module, for ``modules``)."""
    groups = [(cfg.models, cfg.slices)] + [(m.models or [], m.slices) for m in (getattr(cfg, "modules", None) or {}).values()]
    out = [cfg.base_model] if cfg.base_model else []
    for models, slices in groups:
        out += [m.path for m in models if not m.implicit_base] + [src.path for sl in slices or [] for src in sl.sources]
    return list(dict.fromkeys(out))


def model_card(plan: "MergePlan", config_yaml: str, name: str) -> str:
    """mergekit's README.md for a merged model: the method (linked to its paper), the base, the models, the
    config. Model references are local paths (fastmerge never downloads), so no Hub links or ``base_model``
    metadata are written."""
    import yaml

    cfg, m = plan.config, plan.method
    base = None if m.base_policy == "ignored" else cfg.base_model  # mergekit: slerp's base is not "a base"
    paths: list[str] = []
    for p in model_paths(cfg):
        if p not in paths and p != base:
            paths.append(p)
    url = getattr(m, "paper_url", "") or ""
    return CARD_TEMPLATE.format(
        metadata=yaml.dump({"base_model": [], "tags": ["mergekit", "merge", "fastmerge"], "library_name": "transformers"}),
        name=name,
        merge_method=f"[{m.name}]({url})" if url else m.name,
        base_text=f" using {base} as a base" if base else "",
        model_list="\n".join(f"* {p}" for p in paths),
        config_yaml=config_yaml,
    )
