"""The files an output folder carries beside its weights (``config.json``, tokenizer, the merge config)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FastMergeError
from ..vocab import TOKENIZER_FILES, model_root

if TYPE_CHECKING:
    from ..plan import MergePlan


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
            for k in [k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in doc] or ["num_hidden_layers"]:
                doc[k] = plan.out_layers
        if plan.tokenizer is not None:  # the output vocabulary sets the embedding rows (mergekit's _update_config_vocab)
            nested = "vocab_size" not in doc and isinstance(doc.get("text_config"), dict) and "vocab_size" in doc["text_config"]
            (doc["text_config"] if nested else doc)["vocab_size"] = plan.tokenizer.n_rows
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
    import yaml

    (tmp / "fastmerge_config.yml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
