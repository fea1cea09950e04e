"""The mergekit YAML schema (the subset fastmerge runs today), validated up front.

Every error names the field (and model) at fault. A mergekit field fastmerge does not run is a clear
error, never silently ignored. ``MODEL+ADAPTER`` references (PEFT LoRA) are read by ``io.lora``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError
from .io.lora import split_ref
from .methods import KNOWN_PARAMETERS, MergeMethod, get_method

DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
TOP_LEVEL = {
    "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
    "tokenizer", "slices", "modules", "chat_template", "rank_sweep",
}
UNSUPPORTED: dict[str, str] = {}  # top-level field -> why it is refused (none today)


@dataclasses.dataclass
class ModelSpec:
    """One input model: its local path and its per-model parameter settings (scalar / gradient / filters)."""

    path: str
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the base_model, appended as one more input (``MergeMethod.base_as_input``); not written back by ``to_dict``
    implicit_base: bool = False


@dataclasses.dataclass
class SourceSpec:
    """One input of an output slice: a model, the layers it contributes [start, end), its parameters."""

    path: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


@dataclasses.dataclass
class SliceSpec:
    """An output slice: its sources (the base model, if any, among them), base override and parameters."""

    sources: list[SourceSpec]
    base_model: str | None = None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ModuleSpec:
    """One module of a multi-module model (``modules: {text_decoder: ..., vision_tower: ...}``): its inputs
    as ``models`` or ``slices`` (exactly one; models as in ``MergeConfig.models``), and parameters that
    rank between its slices' and the global ones (mergekit 0.1.5's ``OutputModuleDefinition``)."""

    models: list[ModelSpec] | None = None
    slices: list[SliceSpec] | None = None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MergeConfig:
    """A validated merge configuration: either ``models`` (whole models; the base model excluded, as
    mergekit's non-base inputs) or ``slices`` (layer ranges, renumbered in the output)."""

    merge_method: str
    models: list[ModelSpec]
    base_model: str | None = None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # "union", "base" or a model path (vocabularies aligned, see fastmerge.vocab)
    tokenizer_pad_to_multiple_of: int | None = None  # ``tokenizer: {pad_to_multiple_of: N}``
    #: ``tokenizer: {tokens: {TOKEN: {source: ..., force: bool}}}``, validated, in mergekit's form
    tokenizer_tokens: dict[str, dict[str, Any]] | None = None
    source: str | None = None  # where it was read from, for messages
    slices: list[SliceSpec] | None = None
    #: cart only: one output model per rank ratio, from one factorization (OUT/rank-<value>/)
    rank_sweep: list[float] | None = None
    #: ``chat_template``: auto | a built-in name | a file | a Jinja string (io.chat_template), written into
    #: the output's tokenizer_config.json
    chat_template: str | None = None
    #: ``modules``: each module of a multi-module (vision-language) model merged from its own models or
    #: slices, by module name in config order (io.arch names each architecture's modules); ``models`` is
    #: then empty and ``slices`` None
    modules: dict[str, ModuleSpec] | None = None

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MergeConfig":
        p = Path(path)
        try:
            doc = yaml.safe_load(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"{p}: cannot read config ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        return cls.from_dict(doc, source=str(p))

    @classmethod
    def from_dict(cls, doc: Any, source: str | None = None) -> "MergeConfig":
        where = source or "config"
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: a merge config must be a mapping with 'merge_method' and 'models'")
        for key in doc:
            if key not in TOP_LEVEL:
                close = difflib.get_close_matches(str(key), sorted(TOP_LEVEL), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"{where}: unknown field '{key}'{hint}")
            if key in UNSUPPORTED and doc[key] is not None:
                raise ConfigError(f"{where}: {UNSUPPORTED[key]}")
        if "merge_method" not in doc:
            raise ConfigError(f"{where}: missing field 'merge_method'")
        method = get_method(str(doc["merge_method"]))
        tok, pad_to, tokens = _tokenizer(doc, where)
        base = doc.get("base_model")
        if base is not None:
            base = _model_ref(base, f"{where}: base_model")
        raw_models = doc.get("models")
        slices, modules = None, None
        if sum(doc.get(k) is not None for k in ("models", "slices", "modules")) > 1:
            raise ConfigError(f"{where}: give one of 'models', 'slices' or 'modules', not several")
        if doc.get("modules") is not None:
            modules = _parse_modules(doc["modules"], where, base, method)
            models: list[ModelSpec] = []
        elif doc.get("slices") is not None:
            slices = _parse_slices(doc["slices"], where)
            models = []
        else:
            models = _parse_models(raw_models, where, base, method)
        gparams = doc.get("parameters") or {}
        if not isinstance(gparams, dict):
            raise ConfigError(f"{where}: parameters: must be a mapping")
        cfg = cls(
            merge_method=method.name,
            models=models,
            base_model=base,
            parameters=dict(gparams),
            dtype=_dtype(doc.get("dtype"), f"{where}: dtype"),
            out_dtype=_dtype(doc.get("out_dtype"), f"{where}: out_dtype", fp8=True),
            tokenizer_source=tok,
            tokenizer_pad_to_multiple_of=pad_to,
            tokenizer_tokens=tokens,
            source=source,
            slices=slices,
            rank_sweep=_rank_sweep(doc.get("rank_sweep"), method, where),
            chat_template=_chat_template(doc.get("chat_template"), where),
            modules=modules,
        )
        cfg.validate()
        _check_token_models(cfg, where)
        return cfg

    def validate(self, inherited: Mapping[str, Any] | None = None) -> None:
        """Static checks (no file access): base-model rules, model count, parameter names and shapes.
        ``inherited``: parameters set above this config (a module's: the global ones), which count for the
        required ones and are checked where they are written."""
        where = self.source or "config"
        m = self.method
        if self.modules is not None:  # each module as a config of its own; its parameters rank above the global ones
            _check_names(m, [("parameters", self.parameters)], where)
            for name, mod in self.modules.items():
                MergeConfig(self.merge_method, mod.models or [], self.base_model, mod.parameters,
                            source=f"{where}: modules.{name}", slices=mod.slices).validate(inherited=self.parameters)
            return
        have = {**(inherited or {}), **self.parameters}
        groups: list[tuple[str, int]] = [("models", len(self.models))]  # (where, number of non-base inputs)
        scopes = [("parameters", self.parameters)] + [
            (f"models[{i}] ({s.path}).parameters", s.parameters) for i, s in enumerate(self.models)
        ]
        if self.slices is not None:
            groups = []
            for i, sl in enumerate(self.slices):
                base = sl.base_model or self.base_model
                if m.base_policy == "required" and not base:
                    raise ConfigError(f"{where}: merge_method '{m.name}' needs a base_model (globally or in slices[{i}])")
                if m.base_policy != "ignored" and base and base not in [s.path for s in sl.sources]:
                    raise ConfigError(f"{where}: slices[{i}]: base_model '{base}' must be one of the slice's sources")
                n = sum(1 for s in sl.sources if m.base_policy == "ignored" or s.path != base)
                groups.append((f"slices[{i}]", n))
                scopes.append((f"slices[{i}].parameters", sl.parameters))
                scopes += [(f"slices[{i}].sources[{j}] ({s.path}).parameters", s.parameters) for j, s in enumerate(sl.sources)]
        elif m.base_policy == "required" and not self.base_model:
            raise ConfigError(f"{where}: merge_method '{m.name}' needs a base_model")
        implicit = next((s.path for s in self.models if s.implicit_base), None)
        why = (f" (mergekit merges base_model '{implicit}' as one more input of '{m.name}'; list the models you mean "
               "and drop base_model)") if implicit else ""
        for gw, n in groups:
            if n < m.min_models:
                raise ConfigError(
                    f"{where}: {gw}: merge_method '{m.name}' needs at least {m.min_models} model(s) besides the base, got {n}"
                )
            if m.max_models is not None and n > m.max_models:
                raise ConfigError(
                    f"{where}: {gw}: merge_method '{m.name}' takes at most {m.max_models} model(s) besides the base, "
                    f"got {n}{why}"
                )
        specs = m.param_specs()
        _check_names(m, scopes, where)
        for name, spec in specs.items():
            if not spec.per_model and spec.default is _required() and name not in have:
                missing = [f"slices[{i}]" for i, sl in enumerate(self.slices or []) if name not in sl.parameters]
                if self.slices is None or missing:
                    raise ConfigError(f"{where}: merge_method '{m.name}' needs parameter '{name}' "
                                      f"(set parameters: {{{name}: ...}}{', or in ' + missing[0] if missing else ''})")
            if spec.per_model and spec.default is _required():
                for i, s in enumerate(self.models):
                    if name not in s.parameters and name not in have:
                        if s.implicit_base:
                            raise ConfigError(
                                f"{where}: base_model ({s.path}): missing required parameter '{name}': mergekit merges the "
                                f"base_model as one more input of '{m.name}', so it needs a '{name}' too (set it in the global "
                                "parameters or list the base among the models), or drop base_model")
                        raise ConfigError(f"{where}: models[{i}] ({s.path}): missing required parameter '{name}'")
                for i, sl in enumerate(self.slices or []):
                    base = sl.base_model or self.base_model
                    for j, s in enumerate(sl.sources):
                        if m.base_policy != "ignored" and s.path == base:
                            continue
                        if not any(name in d for d in (s.parameters, sl.parameters, have)):
                            raise ConfigError(f"{where}: slices[{i}].sources[{j}] ({s.path}): missing required parameter '{name}'")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model:
            d["base_model"] = self.base_model
        if self.modules is not None:
            d["modules"] = {name: {**_inputs_dict(mod.models or [], mod.slices),
                                   **({"parameters": mod.parameters} if mod.parameters else {})}
                            for name, mod in self.modules.items()}
        else:
            d.update(_inputs_dict(self.models, self.slices))
        for k in ("parameters", "dtype", "out_dtype", "tokenizer_source", "rank_sweep", "chat_template"):
            v = getattr(self, k)
            if v:
                d[k] = v
        if self.tokenizer_pad_to_multiple_of or self.tokenizer_tokens:
            d["tokenizer"] = {"source": d.pop("tokenizer_source"),
                              **({"tokens": self.tokenizer_tokens} if self.tokenizer_tokens else {}),
                              **({"pad_to_multiple_of": self.tokenizer_pad_to_multiple_of} if self.tokenizer_pad_to_multiple_of else {})}
        return d


def _check_names(m: MergeMethod, scopes: list[tuple[str, dict[str, Any]]], where: str) -> None:
    """Each parameter setting well formed and named as ``m`` or another mergekit method names it (a warning:
    mergekit configs carry parameters of other methods); an unknown name is an error with the closest one."""
    specs = m.param_specs()
    for scope, params in scopes:
        for name, setting in params.items():
            _check_setting(setting, f"{where}: {scope}.{name}")
            if name in specs:
                continue
            if name in KNOWN_PARAMETERS:
                warnings.warn(f"{where}: {scope}.{name}: not used by merge_method '{m.name}' (ignored)", stacklevel=3)
                continue
            close = difflib.get_close_matches(name, sorted(set(specs) | KNOWN_PARAMETERS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: {scope}: unknown parameter '{name}'{hint}")


def _inputs_dict(models: list[ModelSpec], slices: list[SliceSpec] | None) -> dict[str, Any]:
    """``{"slices": [...]}`` or ``{"models": [...]}`` in mergekit's schema (the implicit base left out)."""
    if slices is not None:
        return {"slices": [
            {"sources": [{"model": s.path, "layer_range": list(s.layer_range), "parameters": s.parameters} for s in sl.sources],
             **({"base_model": sl.base_model} if sl.base_model else {}),
             **({"parameters": sl.parameters} if sl.parameters else {})}
            for sl in slices
        ]}
    return {"models": [{"model": s.path, "parameters": s.parameters} for s in models if not s.implicit_base]}


def _parse_models(raw_models: Any, where: str, base: str | None, method: MergeMethod) -> list[ModelSpec]:
    """``models: [{model: PATH, parameters: {...}}, ...]``: the inputs besides the base (plus the base, for
    the methods that merge it as an input)."""
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError(f"{where}: 'models' (or 'slices') must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    models: list[ModelSpec] = []
    for i, m in enumerate(raw_models):
        mw = f"{where}: models[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise ConfigError(f"{mw}: each entry needs a 'model' field")
        extra = set(m) - {"model", "parameters"}
        if extra:
            raise ConfigError(f"{mw}: unknown field '{sorted(extra)[0]}'")
        path = _model_ref(m["model"], f"{mw}.model")
        params = m.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{mw}.parameters: must be a mapping")
        if base is not None and path == base and method.base_policy != "ignored":
            continue  # mergekit: a base model listed among the models is the base, not an input
        models.append(ModelSpec(path, dict(params)))
    # mergekit 0.1.5's planner (``MergePlanner.normalize_config``) appends base_model to the inputs of
    # some methods whose base policy is "ignored" (``MergeMethod.base_as_input``: karcher averages it in;
    # linear needs a ``weight`` for it; passthrough, which takes one input, refuses the config). Slices
    # are used as written. ``cart`` is fastmerge's own method and documents base_model as ignored.
    if base is not None and method.base_as_input and base not in [m.path for m in models]:
        models.append(ModelSpec(base, {}, implicit_base=True))
    return models


def _parse_modules(raw: Any, where: str, base: str | None, method: MergeMethod) -> dict[str, ModuleSpec]:
    """``modules: {NAME: {models: [...] | slices: [...], parameters: {...}}}``. Which names a model has is
    its architecture's (checked by the plan, io.arch); one merge_method merges every module, as in mergekit
    0.1.5, whose module definition has no method of its own."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: 'modules' must be a non-empty mapping {{MODULE: {{models: [...]}} or {{slices: [...]}}}}")
    out: dict[str, ModuleSpec] = {}
    for name, mod in raw.items():
        mw = f"{where}: modules.{name}"
        if not isinstance(mod, dict):
            raise ConfigError(f"{mw}: expected a mapping with 'models' or 'slices'")
        if "merge_method" in mod:
            raise ConfigError(f"{mw}: merge_method: every module is merged with the top-level merge_method (mergekit 0.1.5's "
                              "modules have models, slices and parameters only); per-module settings go in its parameters")
        extra = set(mod) - {"models", "slices", "parameters"}
        if extra:
            raise ConfigError(f"{mw}: unknown field '{sorted(extra)[0]}' (a module has models, slices, parameters)")
        if (mod.get("models") is None) == (mod.get("slices") is None):
            raise ConfigError(f"{mw}: give either 'models' or 'slices' (exactly one)")
        params = mod.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{mw}.parameters: must be a mapping")
        if mod.get("slices") is not None:
            out[str(name)] = ModuleSpec(None, _parse_slices(mod["slices"], mw), dict(params))
        else:
            out[str(name)] = ModuleSpec(_parse_models(mod["models"], mw, base, method), None, dict(params))
    return out


def _tokenizer(doc: dict[str, Any], where: str) -> tuple[str | None, int | None, dict[str, dict[str, Any]] | None]:
    """``tokenizer_source: X`` or ``tokenizer: {source: X, tokens: {...}, pad_to_multiple_of: N}`` -> (X, N,
    tokens). X is "union", "base" or a model; in the ``tokenizer`` form a missing source means mergekit's
    default, ``union``. ``tokens``: per-token embedding sources (``_token_spec``)."""
    tok, pad_to, tokens = doc.get("tokenizer_source"), None, None
    t = doc.get("tokenizer")
    if t is not None:
        if tok is not None:
            raise ConfigError(f"{where}: give either 'tokenizer_source' or 'tokenizer', not both")
        if not isinstance(t, dict):
            raise ConfigError(f"{where}: tokenizer: expected a mapping {{source: union | base | MODEL, tokens: {{...}}, "
                              "pad_to_multiple_of: N}")
        extra = set(t) - {"source", "tokens", "pad_to_multiple_of"}
        if extra:
            raise ConfigError(f"{where}: tokenizer: unknown field '{sorted(extra)[0]}'")
        raw = t.get("tokens")
        if raw is not None:
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: tokenizer.tokens: expected a mapping {{TOKEN: {{source: ..., force: bool}}}}")
            tokens = {str(k): _token_spec(v, f"{where}: tokenizer.tokens[{str(k)!r}]") for k, v in raw.items()} or None
        tok = t.get("source", "union")
        pad_to = t.get("pad_to_multiple_of")
        if pad_to is not None and (not isinstance(pad_to, int) or isinstance(pad_to, bool) or pad_to <= 0):
            raise ConfigError(f"{where}: tokenizer.pad_to_multiple_of: expected a positive integer, got {pad_to!r}")
    if tok is None:
        return None, None, None
    return _model_ref(tok, f"{where}: tokenizer_source"), pad_to, tokens


def _token_spec(v: Any, where: str) -> dict[str, Any]:
    """One ``tokenizer.tokens`` entry, in mergekit's form: ``{source: S, force: bool}``, S a model,
    ``{kind: zero}``, ``{kind: model_token, model: M, token: T}`` (or ``token_id: N``), or absent."""
    if v is None:
        v = {}
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: expected a mapping {{source: MODEL | {{kind: zero}} | {{kind: model_token, ...}}, force: bool}}")
    extra = set(v) - {"source", "force"}
    if extra:
        raise ConfigError(f"{where}: unknown field '{sorted(extra)[0]}'")
    force = v.get("force", False)
    if not isinstance(force, bool):
        raise ConfigError(f"{where}.force: expected true or false, got {force!r}")
    out: dict[str, Any] = {}
    src = v.get("source")
    if isinstance(src, dict) and "kind" in src:
        kind = src["kind"]
        allowed = {"zero": {"kind"}, "model_token": {"kind", "model", "token", "token_id"}}.get(kind)
        if allowed is None:
            raise ConfigError(f"{where}.source.kind: expected 'zero' or 'model_token', got {kind!r}")
        if set(src) - allowed:
            raise ConfigError(f"{where}.source: unknown field '{sorted(set(src) - allowed)[0]}' for kind {kind}")
        if kind == "zero":
            out["source"] = {"kind": "zero"}
        else:
            if "model" not in src:
                raise ConfigError(f"{where}.source.model: missing (kind model_token needs a model and a token or token_id)")
            if ("token" in src) == ("token_id" in src):  # mergekit: exactly one of them
                raise ConfigError(f"{where}.source: give exactly one of 'token' and 'token_id'")
            s: dict[str, Any] = {"kind": "model_token", "model": _model_ref(src["model"], f"{where}.source.model")}
            if "token" in src:
                if not isinstance(src["token"], str):
                    raise ConfigError(f"{where}.source.token: expected a string, got {src['token']!r}")
                s["token"] = src["token"]
            else:
                tid = src["token_id"]
                if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0:
                    raise ConfigError(f"{where}.source.token_id: expected a non-negative integer, got {tid!r}")
                s["token_id"] = tid
            out["source"] = s
    elif src is not None:
        out["source"] = _model_ref(src, f"{where}.source")
    if force:
        out["force"] = True
    return out


def token_source_model(spec: dict[str, Any]) -> str | None:
    """The model a ``tokenizer.tokens`` entry takes its row from (None: zero, or no source)."""
    src = spec.get("source")
    return src if isinstance(src, str) else src.get("model") if isinstance(src, dict) else None


def referenced_models(cfg: "MergeConfig") -> list[str]:
    """Every model the merge reads, once each, in config order: base_model first, then models, slices'
    sources, modules' models and slices (mergekit's ``referenced_models()``, which is an unordered set)."""
    out = [cfg.base_model] if cfg.base_model else []
    groups = [(cfg.models, cfg.slices)] + [(mod.models or [], mod.slices) for mod in (getattr(cfg, "modules", None) or {}).values()]
    for models, slices in groups:
        out += [m.path for m in models] + [s.path for sl in slices or [] for s in sl.sources]
    return list(dict.fromkeys(out))


def _check_token_models(cfg: "MergeConfig", where: str) -> None:
    """A ``tokenizer.tokens`` source must be one of the merge's models (mergekit fails on it mid-merge)."""
    if not cfg.tokenizer_tokens:
        return
    known = set(referenced_models(cfg))
    for tok, spec in cfg.tokenizer_tokens.items():
        m = token_source_model(spec)
        if m is not None and m not in known:
            field = "source.model" if isinstance(spec["source"], dict) else "source"
            raise ConfigError(f"{where}: tokenizer.tokens[{tok!r}].{field}: {m} is not one of the merge's models "
                              "(base_model, models or slices)")


def _rank_sweep(v: Any, method: MergeMethod, where: str) -> list[float] | None:
    if v is None:
        return None
    if not method.rank_sweep:
        raise ConfigError(f"{where}: rank_sweep is a cart option (merge_method is '{method.name}')")
    if (not isinstance(v, list) or not v
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1 for x in v)):
        raise ConfigError(f"{where}: rank_sweep must be a non-empty list of rank ratios in [0, 1], got {v!r}")
    return [float(x) for x in v]


def _parse_slices(raw: Any, where: str) -> list[SliceSpec]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: 'slices' must be a non-empty list of {{sources: [...]}}")
    out = []
    for i, sl in enumerate(raw):
        sw = f"{where}: slices[{i}]"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise ConfigError(f"{sw}: each slice needs a non-empty 'sources' list")
        extra = set(sl) - {"sources", "base_model", "parameters", "residual_weight"}
        if extra:
            raise ConfigError(f"{sw}: unknown field '{sorted(extra)[0]}'")
        rw = sl.get("residual_weight")
        if rw is not None:  # mergekit 0.1.5 parses it and never reads it: accepted and ignored the same way
            if not isinstance(rw, (int, float)) or isinstance(rw, bool):
                raise ConfigError(f"{sw}: residual_weight: expected a number, got {rw!r}")
            warnings.warn(f"{sw}: residual_weight is ignored (mergekit 0.1.5 accepts it and never applies it)", stacklevel=2)
        sources = []
        for j, src in enumerate(sl["sources"]):
            srw = f"{sw}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src:
                raise ConfigError(f"{srw}: each source needs 'model' and 'layer_range'")
            extra = set(src) - {"model", "layer_range", "parameters"}
            if extra:
                raise ConfigError(f"{srw}: unknown field '{sorted(extra)[0]}'")
            lr = src.get("layer_range")
            if (not isinstance(lr, (list, tuple)) or len(lr) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                    or lr[0] < 0 or lr[1] <= lr[0]):
                raise ConfigError(f"{srw}.layer_range: expected [start, end) with 0 <= start < end, got {lr!r}")
            params = src.get("parameters") or {}
            if not isinstance(params, dict):
                raise ConfigError(f"{srw}.parameters: must be a mapping")
            sources.append(SourceSpec(_model_ref(src["model"], f"{srw}.model"), (lr[0], lr[1]), dict(params)))
        lengths = {s.length for s in sources}
        if len(lengths) > 1:
            raise ConfigError(f"{sw}: all sources of a slice need the same number of layers, got {sorted(lengths)}")
        params = sl.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{sw}.parameters: must be a mapping")
        base = _model_ref(sl["base_model"], f"{sw}.base_model") if sl.get("base_model") is not None else None
        out.append(SliceSpec(sources, base, dict(params)))
    return out


def _required() -> Any:
    from .methods.base import REQUIRED

    return REQUIRED


def _model_ref(ref: Any, where: str) -> str:
    """A model reference as one string: a path, or ``MODEL+ADAPTER`` (a PEFT LoRA adapter merged in per
    tensor, ``io.lora``; mergekit's expanded form ``{model: {path: M}, lora: {path: A}}`` too)."""
    if isinstance(ref, dict) and "model" in ref:  # mergekit's expanded form {model: {path: ...}, lora: {path: ...}}
        lora = ref.get("lora")
        ref = ref["model"]
        if isinstance(ref, dict):
            ref = ref.get("path")
        if isinstance(lora, dict):
            lora = lora.get("path")
        if lora is not None:
            if not isinstance(lora, str) or not lora or not isinstance(ref, str) or not ref:
                raise ConfigError(f"{where}: expected {{model: {{path: MODEL}}, lora: {{path: ADAPTER}}}}")
            ref = f"{ref}+{lora}"
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{where}: expected a model path")
    try:
        split_ref(ref)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return ref


#: out_dtype only: FP8 output, re-quantised with the input family's block scheme (io.fp8)
FP8_OUT_DTYPES = {"float8_e4m3fn": "float8_e4m3fn", "fp8": "float8_e4m3fn", "float8_e4m3": "float8_e4m3fn"}


def _chat_template(v: Any, where: str) -> str | None:
    from .io.chat_template import check

    return check(v, where)


def _dtype(v: Any, where: str, fp8: bool = False) -> str | None:
    if v is None:
        return None
    key = str(v).removeprefix("torch.")
    if fp8 and key in FP8_OUT_DTYPES:
        return FP8_OUT_DTYPES[key]
    if key not in DTYPES:
        if fp8:
            raise ConfigError(f"{where}: unsupported dtype '{v}' (use float32, float16, bfloat16 or float8_e4m3fn)")
        raise ConfigError(f"{where}: unsupported dtype '{v}' (use float32, float16 or bfloat16)")
    return DTYPES[key]


def _check_setting(setting: Any, where: str) -> None:
    """A setting is a scalar, a gradient (list of scalars) or a list of {filter, value} conditions."""
    scalar = (int, float, bool, str)
    if isinstance(setting, scalar):
        _check_finite(setting, where)
        return
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting:
        if all(isinstance(e, scalar) for e in setting):
            for e in setting:
                _check_finite(e, where)
            return
        for c in setting:
            if not isinstance(c, dict) or "value" not in c or set(c) - {"filter", "value"}:
                raise ConfigError(f"{where}: a filter list holds entries like {{filter: mlp, value: 0.5}} and a final {{value: ...}}")
            _check_setting(c["value"], where)
        return
    raise ConfigError(f"{where}: expected a number, a list (gradient) or a filter list, got {setting!r}")


def _check_finite(value: Any, where: str) -> None:
    """A number (or a number written as a string: YAML reads ``1e400`` as one) must be finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return
    try:
        v = float(value)
    except (ValueError, OverflowError):
        return  # not a number: the method's parameter type decides (a choice, or "must be a number")
    if not math.isfinite(v):
        raise ConfigError(f"{where}: not a finite number, got {value!r}")


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """Resolve one setting for one tensor: filters by substring (first match wins, None/'*' match all),
    gradients linearly interpolated at ``t`` in [0, 1] (in float64, as mergekit), non-numeric gradients
    pick the nearest lower entry. Returns None when no filter matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(e, dict) for e in setting):
        numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        pos = t * (len(setting) - 1)
        i0 = int(pos)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = pos - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and str(f) in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t)
    return None


def load_config(config: "MergeConfig | Mapping[str, Any] | str | Path") -> "MergeConfig":
    """A MergeConfig from a MergeConfig, a dict in mergekit's schema, or a YAML path."""
    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, Mapping):
        return MergeConfig.from_dict(dict(config))
    return MergeConfig.from_yaml(config)
