"""The mergekit YAML schema (the subset fastmerge runs today), validated up front.

Every error names the field (and model) at fault. A mergekit feature fastmerge does not run yet
(``slices``, ``modules``, ``tokenizer`` options, ``chat_template``, LoRA ``model+lora`` references) is
a clear error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .methods import KNOWN_PARAMETERS, MergeMethod, get_method

DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
TOP_LEVEL = {
    "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
    "tokenizer", "slices", "modules", "chat_template",
}
UNSUPPORTED = {
    "slices": "'slices' (layer ranges / frankenmerges) is not supported yet; use 'models'",
    "modules": "'modules' (multi-module models) is not supported yet",
    "chat_template": "'chat_template' is not supported yet; remove it and set the template on the output",
}


@dataclasses.dataclass
class ModelSpec:
    """One input model: its local path and its per-model parameter settings (scalar / gradient / filters)."""

    path: str
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MergeConfig:
    """A validated merge configuration. ``models`` excludes the base model (mergekit's non-base inputs)."""

    merge_method: str
    models: list[ModelSpec]
    base_model: str | None = None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    source: str | None = None  # where it was read from, for messages

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
        tok = doc.get("tokenizer_source")
        if doc.get("tokenizer") is not None:
            t = doc["tokenizer"]
            if not isinstance(t, dict) or set(t) - {"source"}:
                raise ConfigError(f"{where}: tokenizer: only 'source' is supported (tokens / pad_to_multiple_of are not yet)")
            if tok is not None:
                raise ConfigError(f"{where}: give either 'tokenizer_source' or 'tokenizer', not both")
            tok = t.get("source")
        if tok is not None and str(tok) == "union":
            raise ConfigError(f"{where}: tokenizer_source: 'union' (vocabulary merging) is not supported yet; use 'base' or a model")
        base = doc.get("base_model")
        if base is not None:
            base = _model_ref(base, f"{where}: base_model")
        raw_models = doc.get("models")
        if not isinstance(raw_models, list) or not raw_models:
            raise ConfigError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
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
        gparams = doc.get("parameters") or {}
        if not isinstance(gparams, dict):
            raise ConfigError(f"{where}: parameters: must be a mapping")
        cfg = cls(
            merge_method=method.name,
            models=models,
            base_model=base,
            parameters=dict(gparams),
            dtype=_dtype(doc.get("dtype"), f"{where}: dtype"),
            out_dtype=_dtype(doc.get("out_dtype"), f"{where}: out_dtype"),
            tokenizer_source=None if tok is None else str(tok),
            source=source,
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Static checks (no file access): base-model rules, model count, parameter names and shapes."""
        where = self.source or "config"
        m = self.method
        if m.base_policy == "required" and not self.base_model:
            raise ConfigError(f"{where}: merge_method '{m.name}' needs a base_model")
        if len(self.models) < m.min_models:
            raise ConfigError(f"{where}: merge_method '{m.name}' needs at least {m.min_models} model(s) besides the base")
        if m.max_models is not None and len(self.models) > m.max_models:
            raise ConfigError(f"{where}: merge_method '{m.name}' takes at most {m.max_models} model(s) besides the base, got {len(self.models)}")
        specs = m.param_specs()
        for scope, params in [("parameters", self.parameters)] + [
            (f"models[{i}] ({s.path}).parameters", s.parameters) for i, s in enumerate(self.models)
        ]:
            for name, setting in params.items():
                _check_setting(setting, f"{where}: {scope}.{name}")
                if name in specs:
                    continue
                if name in KNOWN_PARAMETERS:
                    warnings.warn(f"{where}: {scope}.{name}: not used by merge_method '{m.name}' (ignored)", stacklevel=2)
                    continue
                close = difflib.get_close_matches(name, sorted(set(specs) | KNOWN_PARAMETERS), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"{where}: {scope}: unknown parameter '{name}'{hint}")
        for name, spec in specs.items():
            if spec.per_model and spec.default is _required():
                for i, s in enumerate(self.models):
                    if name not in s.parameters and name not in self.parameters:
                        raise ConfigError(f"{where}: models[{i}] ({s.path}): missing required parameter '{name}'")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model:
            d["base_model"] = self.base_model
        d["models"] = [{"model": s.path, "parameters": s.parameters} for s in self.models]
        for k in ("parameters", "dtype", "out_dtype", "tokenizer_source"):
            v = getattr(self, k)
            if v:
                d[k] = v
        return d


def _required() -> Any:
    from .methods.base import REQUIRED

    return REQUIRED


def _model_ref(ref: Any, where: str) -> str:
    if isinstance(ref, dict) and "model" in ref:  # mergekit's expanded form {model: {path: ...}}
        ref = ref["model"]
        if isinstance(ref, dict):
            ref = ref.get("path")
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{where}: expected a model path")
    if "+" in ref and not Path(ref).exists():
        raise ConfigError(f"{where}: '{ref}': LoRA references (model+lora) are not supported yet")
    return ref


def _dtype(v: Any, where: str) -> str | None:
    if v is None:
        return None
    key = str(v).removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(f"{where}: unsupported dtype '{v}' (use float32, float16 or bfloat16)")
    return DTYPES[key]


def _check_setting(setting: Any, where: str) -> None:
    """A setting is a scalar, a gradient (list of scalars) or a list of {filter, value} conditions."""
    scalar = (int, float, bool, str)
    if isinstance(setting, scalar):
        return
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting:
        if all(isinstance(e, scalar) for e in setting):
            return
        for c in setting:
            if not isinstance(c, dict) or "value" not in c or set(c) - {"filter", "value"}:
                raise ConfigError(f"{where}: a filter list holds entries like {{filter: mlp, value: 0.5}} and a final {{value: ...}}")
            _check_setting(c["value"], where)
        return
    raise ConfigError(f"{where}: expected a number, a list (gradient) or a filter list, got {setting!r}")


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
