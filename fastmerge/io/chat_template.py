"""``chat_template``: the template written into the output's ``tokenizer_config.json``, resolved as mergekit
0.1.5 resolves it.

- ``auto``: the most common template among the input models (each model's ``chat_template.jinja``, else the
  ``chat_template`` of its ``tokenizer_config.json``, a named list giving its ``default``; stripped); ties go
  to the first model in config order (base model first); no input with a template: nothing is written.
- a built-in name (``alpaca``, ``chatml``, ``llama3``, ``mistral``, ``exaone``): that template (a short name
  without ``{`` or a newline, as mergekit tests it).
- a path to an existing file (a fastmerge extension): its text.
- otherwise a Jinja string; one shorter than 20 characters or without ``{`` is refused ("Invalid chat
  template", as mergekit).

The output's ``tokenizer_config.json`` gets ``chat_template``; a ``chat_template.jinja`` / ``chat_template.json``
copied from the donor is removed (transformers prefers those files over the config's entry).

The built-in templates are fastmerge's own text for the same formats; they render the same conversations
as mergekit's (tests/io/test_chat_template.py compares the rendered prompts).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError

BUILTIN = {
    "chatml": (
        "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
        "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
        "{{- bos_token }}{%- for message in loop_messages %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{%- endif %}{%- if message['role'] == 'user' %}"
        "{%- if loop.first and system_message is defined %}{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
        "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}"
        "{%- else %}{{- raise_exception('Only user and assistant roles are supported, "
        "with the exception of an initial optional system message!') }}"
        "{%- endif %}{%- endfor %}"
    ),
    "alpaca": (
        "{{ (messages|selectattr('role', 'equalto', 'system')|list|last).content|trim "
        "if (messages|selectattr('role', 'equalto', 'system')|list) else '' }}"
        "\n\n{% for message in messages %}{% if message['role'] == 'user' %}### Instruction:\n{{ message['content']|trim -}}\n"
        "{% if not loop.last %}\n\n{% endif %}{% elif message['role'] == 'assistant' %}### Response:\n{{ message['content']|trim -}}\n"
        "{% if not loop.last %}\n\n{% endif %}{% elif message['role'] == 'user_context' %}### Input:\n{{ message['content']|trim -}}\n"
        "{% if not loop.last %}\n\n{% endif %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}### Response:\n{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "{{ '[|system|][|endofturn|]\\n' }}{% endif %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def is_builtin_name(value: str) -> bool:
    """mergekit's test for a template name: short, one line, no ``{``."""
    return len(value) < 256 and "\n" not in value and "{" not in value


def check(value: object, where: str) -> str | None:
    """The config's ``chat_template``, checked at load time (``auto``, a built-in name, an existing file, or
    a Jinja string of at least 20 characters with a ``{``)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: chat_template: expected 'auto', a template name, a file or a Jinja string, got {value!r}")
    if value == "auto" or (is_builtin_name(value) and value in BUILTIN):
        return value
    if is_builtin_name(value) and Path(value).is_file():
        return value
    if len(value) < 20 or "{" not in value:
        names = ", ".join(sorted(BUILTIN))
        raise ConfigError(f"{where}: chat_template: invalid chat template '{value}' (use auto, {names}, a file, or a Jinja string)")
    return value


def model_template(root: Path) -> str | None:
    """One model's chat template, stripped, as transformers loads it (``chat_template.jinja`` first)."""
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        t = jinja.read_text(encoding="utf-8")
        return t.strip() or None
    for name in ("tokenizer_config.json", "chat_template.json"):
        p = root / name
        if not p.is_file():
            continue
        try:
            t = json.loads(p.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        if isinstance(t, list):  # named templates: [{"name": ..., "template": ...}]
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        elif isinstance(t, dict):
            t = t.get("default")
        if isinstance(t, str) and t.strip():
            return t.strip()
    return None


def mergekit_builtin(name: str) -> str | None:
    """mergekit's own text of built-in template ``name``, read from the installed mergekit package (None: not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("mergekit")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "_data" / "chat_templates" / f"{name}.jinja"
    return p.read_text(encoding="utf-8") if p.is_file() else None


def resolve(value: str | None, model_roots: Sequence[Path], compat: bool = False) -> str | None:
    """The template text to write (None: none). ``compat`` (--mergekit-compat): a built-in name gives the
    installed mergekit's own file, byte for byte, where mergekit is installed."""
    if not value:
        return None
    if value == "auto":
        found = [t for t in (model_template(r) for r in model_roots) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if is_builtin_name(value) and value in BUILTIN:
        return (mergekit_builtin(value) if compat else None) or BUILTIN[value]
    if is_builtin_name(value) and Path(value).is_file():
        return Path(value).read_text(encoding="utf-8")
    return value


def write(tmp: Path, template: str) -> bool:
    """Set ``chat_template`` in ``tmp/tokenizer_config.json`` (False: the output has no tokenizer config)."""
    p = tmp / "tokenizer_config.json"
    if not p.is_file():
        return False
    doc = json.loads(p.read_text(encoding="utf-8"))
    doc["chat_template"] = template
    p.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name in ("chat_template.jinja", "chat_template.json"):
        (tmp / name).unlink(missing_ok=True)
    return True
