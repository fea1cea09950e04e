"""chat_template (io.chat_template) and residual_weight (accepted and ignored, as mergekit 0.1.5)."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest

import fastmerge
from fastmerge.errors import ConfigError
from fastmerge.io import chat_template as ct
from fastmerge.testing import LlamaShape, make_family

SHAPE = LlamaShape(hidden=32, layers=2, intermediate=48, vocab=64, heads=2)
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctfam")
    base, fts = make_family(root, SHAPE, n_finetunes=2)
    return base, fts


def cfg(base, fts, **extra):
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in fts], **extra}


def written(out: Path) -> str | None:
    return json.loads((out / "tokenizer_config.json").read_text()).get("chat_template")


def render(template: str, messages, gen: bool) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # transformers' settings

    def fail(msg):
        raise ValueError(msg)

    env.globals["raise_exception"] = fail
    return env.from_string(template).render(messages=messages, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("name", sorted(ct.BUILTIN))
def test_builtin_templates_render_as_mergekits(name):
    theirs = ct.mergekit_builtin(name)
    assert theirs is not None
    conv = CONV[1:] if name in ("mistral",) else CONV
    for gen in (False, True):
        if name == "mistral" and gen:
            continue
        a, b = render(ct.BUILTIN[name], conv, gen), render(theirs, conv, gen)
        assert "".join(a.split()) == "".join(b.split()), (name, a, b)  # mergekit's files render stray whitespace


@pytest.mark.parametrize("value", ["chatml", "llama3"])
def test_builtin_name_written(fam, tmp_path, value):
    base, fts = fam
    fastmerge.merge(cfg(base, fts, chat_template=value), tmp_path / "o", progress=False)
    assert written(tmp_path / "o") == ct.BUILTIN[value]
    fastmerge.merge(cfg(base, fts, chat_template=value), tmp_path / "c", progress=False, mergekit_compat=True)
    assert written(tmp_path / "c") == ct.mergekit_builtin(value)  # byte for byte under --mergekit-compat


def test_jinja_string_and_file(fam, tmp_path):
    base, fts = fam
    tpl = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    fastmerge.merge(cfg(base, fts, chat_template=tpl), tmp_path / "s", progress=False)
    assert written(tmp_path / "s") == tpl
    f = tmp_path / "t.jinja"
    f.write_text(tpl + "{# file #}")
    fastmerge.merge(cfg(base, fts, chat_template=str(f)), tmp_path / "f", progress=False)
    assert written(tmp_path / "f") == tpl + "{# file #}"


def test_auto_takes_the_plurality(fam, tmp_path):
    base, fts = fam
    models = []
    for i, (p, tpl) in enumerate([(base, "{{ 'A' }} template A ......"), (fts[0], "{{ 'B' }} template B ......"),
                                  (fts[1], "{{ 'B' }} template B ......")]):
        q = tmp_path / f"m{i}"
        q.mkdir()
        for x in p.iterdir():
            (q / x.name).write_bytes(x.read_bytes())
        doc = json.loads((q / "tokenizer_config.json").read_text())
        doc["chat_template"] = tpl + "\n"
        (q / "tokenizer_config.json").write_text(json.dumps(doc))
        models.append(q)
    (models[0] / "chat_template.jinja").write_text("{{ 'B' }} template B ......")  # the .jinja file wins over the config
    fastmerge.merge(cfg(models[0], models[1:], chat_template="auto"), tmp_path / "o", progress=False)
    assert written(tmp_path / "o") == "{{ 'B' }} template B ......"
    assert not (tmp_path / "o" / "chat_template.jinja").exists()
    # no input with a template: nothing written
    fastmerge.merge(cfg(base, fts, chat_template="auto"), tmp_path / "n", progress=False)
    assert written(tmp_path / "n") is None


@pytest.mark.parametrize("bad", ["nonsense", "{{ short }}", 3])
def test_invalid_template_is_a_config_error(fam, bad):
    base, fts = fam
    with pytest.raises(ConfigError, match="chat_template"):
        fastmerge.plan(cfg(base, fts, chat_template=bad))


def test_residual_weight_accepted_and_ignored_as_mergekit(fam, tmp_path):
    base, _ = fam
    sl = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(base), "layer_range": [0, 2]}]}]}
    fastmerge.merge(sl, tmp_path / "a", progress=False)
    sl["slices"][0]["residual_weight"] = 0.5
    with pytest.warns(UserWarning, match="residual_weight is ignored"):
        fastmerge.merge(sl, tmp_path / "b", progress=False)
    a, b = (tmp_path / "a" / "model.safetensors").read_bytes(), (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b
    sl["slices"][0]["residual_weight"] = "x"
    with pytest.raises(ConfigError, match="residual_weight"):
        fastmerge.plan(sl)
