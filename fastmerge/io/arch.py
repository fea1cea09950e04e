"""The inputs' architectures (``config.json``'s ``architectures`` and ``model_type``), compared before a
merge: mergekit refuses to mix architectures unless ``--allow-crimes``; so does fastmerge. And the modules
of multi-module (vision-language) architectures, which ``modules:`` configs name: which tensors each
module holds, how its layers are numbered and where config.json counts them."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import ConfigError


def architecture(root: Path) -> tuple[tuple[str, ...], str | None] | None:
    """(``architectures``, ``model_type``) of the model in folder ``root``; None without a readable config.json."""
    try:
        doc = json.loads((Path(root) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    archs = doc.get("architectures")
    archs = tuple(str(a) for a in archs) if isinstance(archs, list) else ()
    mt = doc.get("model_type")
    return archs, (str(mt) if mt is not None else None)


def _describe(a: tuple[tuple[str, ...], str | None]) -> str:
    archs, mt = a
    return f"{'/'.join(archs) or '(no architectures)'} (model_type {mt})"


def check_architectures(roots: Mapping[str, Path], allow_crimes: bool) -> None:
    """One line naming the first model whose architecture or model_type differs from the first model's,
    unless ``allow_crimes``. Models without a config.json are not compared."""
    if allow_crimes:
        return
    first: tuple[str, tuple[tuple[str, ...], str | None]] | None = None
    for path, root in roots.items():
        a = architecture(root)
        if a is None:
            continue
        if first is None:
            first = (path, a)
            continue
        (p0, a0) = first
        if (a[0] and a0[0] and a[0] != a0[0]) or (a[1] and a0[1] and a[1] != a0[1]):
            raise ConfigError(f"{path}: architecture {_describe(a)} differs from {p0}'s {_describe(a0)}; mergekit "
                              "refuses this too: pass --allow-crimes (allow_crimes=True) to merge them anyway")


# ------------------------------------------------------------------------------------------------
# Multi-module models (``modules:``): which tensors belong to which module, as the Hugging Face
# checkpoints of these architectures name them: the names mergekit 0.1.5's architecture files use
# (``language_model.model.layers.N``, ``visual.blocks.N``...) and the names transformers >= 4.52 saves
# (``model.language_model.layers.N``, ``model.visual.blocks.N``, ``lm_head``...), which mergekit 0.1.5
# does not know.


@dataclass(frozen=True)
class ModuleLayout:
    """One module of a multi-module architecture. A tensor belongs to the module with the longest of all
    modules' ``prefixes`` that its name starts with. ``layers``: the prefixes of the module's layer tensors
    with ``{}`` for the index, one per naming (empty: no layers); ``layers_keys``: the config.json keys (dotted into nested
    configs) holding its number of layers, the one read first (Qwen2-VL keeps the text model's both at the
    top level and in ``text_config``: a merge that changes it sets every one present); ``post``: the
    non-layer tensors that come after the layers (taken from the last slice, as mergekit's post weights);
    every other non-layer tensor comes before."""

    name: str
    prefixes: tuple[str, ...]
    layers: tuple[str, ...] = ()
    layers_keys: tuple[str, ...] = ()
    post: tuple[str, ...] = ()

    @functools.cached_property  # compiled once per layout (a 45k-tensor checkpoint asks it for every name)
    def _layer_re(self) -> re.Pattern[str] | None:
        if not self.layers:
            return None
        heads = "|".join(re.escape(t.split("{}")[0]) for t in self.layers)
        assert all(t.endswith("{}.") for t in self.layers), self.layers
        return re.compile(f"^(?:{heads})(\\d+)\\.")

    def layer_of(self, tensor: str) -> int | None:
        """The module layer ``tensor`` belongs to, None for the module's other tensors."""
        r = self._layer_re
        m = r.match(tensor) if r is not None else None
        return int(m.group(1)) if m else None

    def with_layer(self, tensor: str, idx: int) -> str:
        """``tensor`` (a layer tensor of this module) with its layer index replaced by ``idx``."""
        m = self._layer_re.match(tensor)  # type: ignore[union-attr]
        assert m is not None, tensor
        return tensor[: m.start(1)] + str(idx) + tensor[m.end(1):]

    def num_layers(self, config: dict, tensors: Iterable[str]) -> int:
        """Its number of layers: the first of ``layers_keys`` in ``config`` (config.json), else one more
        than the largest layer index among ``tensors``; 0 without layers."""
        if not self.layers:
            return 0
        for key in self.layers_keys:
            v: Any = config
            for k in key.split("."):
                v = v.get(k) if isinstance(v, dict) else None
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                return v
        idx = [i for i in map(self.layer_of, tensors) if i is not None]
        return max(idx) + 1 if idx else 0


def _llava_like(vision: str, vision_layers: tuple[str, ...], vision_post: tuple[str, ...] = ()) -> tuple[ModuleLayout, ...]:
    """LLaVA's naming: ``language_model.`` (``model.language_model.`` and ``lm_head.`` as transformers >= 4.52
    saves it), the vision tower under ``vision`` (``model.vision_tower.``), ``multi_modal_projector.``
    (``model.multi_modal_projector.``); text and vision layer counts in ``text_config`` / ``vision_config``."""
    lm, new = "language_model.", "model.language_model."
    return (
        ModuleLayout("text_decoder", (lm, new, "lm_head."), (lm + "model.layers.{}.", new + "layers.{}."),
                     ("text_config.num_hidden_layers",),
                     (lm + "model.norm.weight", lm + "lm_head.weight", new + "norm.weight", "lm_head.weight")),
        ModuleLayout("vision_tower", (vision, "model.vision_tower."), vision_layers, ("vision_config.num_hidden_layers",), vision_post),
        ModuleLayout("multi_modal_projector", ("multi_modal_projector.", "model.multi_modal_projector.")),
    )


def _qwen2_vl(text_layers_keys: tuple[str, ...]) -> tuple[ModuleLayout, ...]:
    """Qwen2-VL's naming: the text model at the top level (``model.``, ``lm_head.``; ``model.language_model.``
    as transformers >= 4.52 saves it), the vision tower under ``visual.`` (``model.visual.``), its patch
    merger (the projector) under ``visual.merger.`` (``model.visual.merger.``)."""
    new = "model.language_model."
    return (
        ModuleLayout("text_decoder", ("model.", "lm_head."), ("model.layers.{}.", new + "layers.{}."), text_layers_keys,
                     ("model.norm.weight", new + "norm.weight", "lm_head.weight")),
        ModuleLayout("vision_tower", ("visual.", "model.visual."), ("visual.blocks.{}.", "model.visual.blocks.{}."),
                     ("vision_config.depth",)),
        ModuleLayout("multi_modal_projector", ("visual.merger.", "model.visual.merger.")),
    )


#: ``architectures[0]`` of config.json -> its modules, in mergekit 0.1.5's module names
MODULES: dict[str, tuple[ModuleLayout, ...]] = {
    "Mistral3ForConditionalGeneration": _llava_like("vision_tower.", ("vision_tower.transformer.layers.{}.",
                                                                      "model.vision_tower.transformer.layers.{}.")),
    # SigLIP's tower: ``vision_tower.vision_model.`` before transformers 5, ``model.vision_tower.`` (4.52+: with
    # ``vision_model.``) after
    "Gemma3ForConditionalGeneration": _llava_like(
        "vision_tower.", tuple(f"{p}encoder.layers.{{}}." for p in ("vision_tower.vision_model.", "model.vision_tower.vision_model.",
                                                                    "model.vision_tower.")),
        tuple(f"{p}post_layernorm.{w}" for p in ("vision_tower.vision_model.", "model.vision_tower.vision_model.", "model.vision_tower.")
              for w in ("bias", "weight"))),
    "Qwen2VLForConditionalGeneration": _qwen2_vl(("num_hidden_layers", "text_config.num_hidden_layers")),
    "Qwen2_5_VLForConditionalGeneration": _qwen2_vl(("text_config.num_hidden_layers", "num_hidden_layers")),
}


def config_doc(root: Path) -> dict:
    """config.json of the model in folder ``root`` as a dict ({} without a readable one)."""
    try:
        doc = json.loads((Path(root) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def modular_architecture(root: Path) -> str | None:
    """``architectures[0]`` of the model in ``root`` when it is one of several modules (``MODULES``), else None."""
    a = architecture(root)
    arch = a[0][0] if a and a[0] else None
    return arch if arch in MODULES else None


def module_layouts(root: Path, where: str) -> dict[str, ModuleLayout]:
    """The modules of the model in ``root`` by name; one ConfigError line when its architecture has none
    fastmerge knows."""
    a = architecture(root)
    arch = a[0][0] if a and a[0] else None
    if arch not in MODULES:
        raise ConfigError(f"{where}: 'modules' needs a multi-module architecture, and {root}'s config.json names "
                          f"{arch or 'none'} (known: {', '.join(sorted(MODULES))})")
    return {m.name: m for m in MODULES[arch]}


def module_of(tensor: str, layouts: Iterable[ModuleLayout]) -> ModuleLayout | None:
    """The module ``tensor`` belongs to: the longest matching prefix wins; None when none matches."""
    best, n = None, -1
    for m in layouts:
        for p in m.prefixes:
            if tensor.startswith(p) and len(p) > n:
                best, n = m, len(p)
    return best
