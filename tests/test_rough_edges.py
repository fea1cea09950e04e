"""What a user hit: garbage parameters accepted, architectures mixed silently, integer buffers crashing
merge_state_dicts, and messages that mislead. Each test failed on the code before its fix (the test's
docstring says how)."""

import json
import shutil

import pytest
import torch
import yaml

from fastmerge import _native, cli, merge, merge_state_dicts, merge_tensors, plan
from fastmerge.errors import ConfigError, FastMergeError, ShapeMismatchError
from fastmerge.testing import LlamaShape, make_family


def _ties(fam, **glob):
    base, fts = fam
    return {"merge_method": "ties", "base_model": str(base), "parameters": glob,
            "models": [{"model": str(f), "parameters": {"weight": 0.3, "density": 0.5}} for f in fts]}


# -- garbage in ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,value", [('"1e400"', "1e400"), ("1e400", 1e400), (".inf", float("inf")),
                                        ("-.inf", float("-inf")), (".nan", float("nan")), ('"nan"', "nan")])
def test_non_finite_parameter_is_refused_with_its_field(family_bf16, tmp_path, text, value):
    """Before: ``lambda: "1e400"`` became inf and the merge wrote inf/NaN tensors."""
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(_ties(family_bf16)).replace("parameters: {}", f"parameters:\n  lambda: {text}"))
    with pytest.raises(ConfigError, match=r"parameters\.lambda.*not a finite number"):
        plan(cfg)
    with pytest.raises(ConfigError, match="lambda.*not a finite number"):
        merge_tensors("task_arithmetic", [torch.ones(4)], torch.zeros(4), weight=1.0, **{"lambda": value})


def test_parameter_beyond_float32_and_non_numeric_are_refused_with_their_field(family_bf16):
    doc = _ties(family_bf16)
    doc["models"][1]["parameters"]["weight"] = 1e39  # finite in float64, inf in the float32 the merge computes in
    with pytest.raises(ConfigError, match=r"ft2.*'weight' is beyond float32's range"):
        plan(doc)
    doc["models"][1]["parameters"]["weight"] = "heavy"
    with pytest.raises(ConfigError, match=r"ft2.*'weight' must be a number, got 'heavy'"):
        plan(doc)


def test_different_architectures_are_refused_unless_allow_crimes(family_bf16, tmp_path, capsys):
    """Before: a LLaMA and a "Mistral" (same tensor names and shapes) merged silently."""
    base, fts = family_bf16
    mistral = tmp_path / "mistral"
    shutil.copytree(fts[0], mistral)
    c = json.loads((mistral / "config.json").read_text())
    c.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (mistral / "config.json").write_text(json.dumps(c))
    doc = {"merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                                                {"model": str(mistral), "parameters": {"weight": 0.5}}]}
    with pytest.raises(ConfigError, match=r"mistral: architecture MistralForCausalLM \(model_type mistral\) differs .*"
                                          r"LlamaForCausalLM.*--allow-crimes"):
        merge(doc, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    merge(doc, tmp_path / "o", progress=False, allow_crimes=True)
    assert (tmp_path / "o" / "model.safetensors").is_file()
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(doc))
    assert cli.yaml_main([str(cfg), str(tmp_path / "o2"), "--quiet"]) == 2
    assert "--allow-crimes" in capsys.readouterr().err
    assert cli.yaml_main([str(cfg), str(tmp_path / "o2"), "--quiet", "--allow-crimes"]) == 0


def test_merge_state_dicts_copies_integer_buffers():
    """Before: a bare TypeError from the backend on BatchNorm's ``num_batches_tracked``."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)) for _ in range(2)]
    for k, n in enumerate(nets):
        n[1].num_batches_tracked.fill_(k + 3)
    sds = [n.state_dict() for n in nets]
    out = merge_state_dicts("linear", sds, weight=[0.5, 0.5])
    assert out["1.num_batches_tracked"].dtype == torch.int64 and int(out["1.num_batches_tracked"]) == 3
    assert torch.allclose(out["0.weight"], (sds[0]["0.weight"] + sds[1]["0.weight"]) / 2)
    with pytest.raises(ConfigError, match=r"merge_tensors 'n': tensors\[0\] is torch.int64"):
        merge_tensors("linear", [torch.ones(3, dtype=torch.int64)] * 2, weight=1.0, tensor_name="n")


# -- messages that mislead ------------------------------------------------------------------------------


def test_hidden_size_mismatch_is_not_blamed_on_vocabularies(family_bf16, tmp_path):
    """Before: '... (vocabularies differ: set tokenizer_source ...)' for an embedding of another hidden size."""
    base, _ = family_bf16
    wide, _ = make_family(tmp_path / "wide", LlamaShape(hidden=128, layers=3, intermediate=176, vocab=301, heads=4),
                          n_finetunes=0, dtype="bfloat16")
    doc = {"merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                                                {"model": str(wide), "parameters": {"weight": 0.5}}]}
    with pytest.raises(ShapeMismatchError) as e:
        plan(doc)
    assert "vocabularies differ" not in str(e.value) and "hidden sizes differ" in str(e.value)


def test_missing_global_parameter_is_named(family_bf16):
    """Before: slerp without t: "parameter 't' must be a number, got <object object at 0x...>"."""
    base, fts = family_bf16
    doc = {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(base)}, {"model": str(fts[0])}]}
    with pytest.raises(ConfigError, match=r"merge_method 'slerp' needs parameter 't'") as e:
        plan(doc)
    assert "object at" not in str(e.value)


def test_per_model_check_names_the_model_path(family_bf16):
    """Before: "tensor '...': density of model #2 must be in (0, 1]" named neither the model nor its path."""
    doc = _ties(family_bf16)
    doc["models"][1]["parameters"]["density"] = 1.5
    with pytest.raises(ConfigError, match=r"density of model #2 \(.*ft2\) must be in"):
        plan(doc)


def test_env_without_a_gpu_says_no_cuda_device(monkeypatch):
    """Before: the CUDA runtime's "CUDA driver version is insufficient for CUDA runtime version"."""

    class FakeCuda:
        @staticmethod
        def is_available():
            return False, "CUDA driver version is insufficient for CUDA runtime version"

    monkeypatch.setattr(_native, "_C_cuda", FakeCuda)
    monkeypatch.setattr(_native, "_cuda_status", None)
    monkeypatch.setattr(_native, "_nvidia_driver_present", lambda: False)
    ok, why = _native.cuda_usable()
    assert not ok and why.startswith("no CUDA device")
    monkeypatch.setattr(_native, "_cuda_status", None)
    monkeypatch.setattr(_native, "_nvidia_driver_present", lambda: True)  # a driver, too old: its own words
    assert _native.cuda_usable() == (False, "CUDA driver version is insufficient for CUDA runtime version")
    monkeypatch.setattr(_native, "_cuda_status", None)


def test_plan_explain_says_a_shared_reason_once(family_bf16, tmp_path, capsys):
    """Before: the same ~150-character 'not cuda: ...; triton: ...' on every tensor line."""
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(_ties(family_bf16)))
    assert cli.main(["plan", str(cfg), "--explain"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    tensor_lines = [x for x in lines if " -> " in x]
    assert len(tensor_lines) == 30
    shared = next(x for x in lines if x.startswith("  backends skipped for every tensor: "))
    assert "needs --device cuda" in shared
    assert not any("needs --device cuda" in x for x in tensor_lines)


def test_plan_text_shows_parameters_and_slice_sources(family_bf16, tmp_path, capsys):
    """Before: the text plan listed names, shapes and backends only."""
    base, fts = family_bf16
    doc = {"merge_method": "linear", "slices": [
        {"sources": [{"model": str(fts[0]), "layer_range": [0, 2], "parameters": {"weight": 1.0}}]},
        {"sources": [{"model": str(fts[1]), "layer_range": [1, 3], "parameters": {"weight": 0.25}},
                     {"model": str(fts[0]), "layer_range": [0, 2], "parameters": {"weight": 0.75}}]},
    ]}
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(doc))
    assert cli.main(["plan", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"m0 = {fts[0]}" in out and f"m1 = {fts[1]}" in out
    assert "parameters (every tensor): normalize=True" in out
    line = next(x for x in out.splitlines() if x.startswith("  model.layers.3.mlp.up_proj.weight"))
    assert "weight=0.25,0.75" in line and line.endswith("<- m1:2 m0:1")
    line = next(x for x in out.splitlines() if x.startswith("  model.layers.0.mlp.up_proj.weight"))
    assert "weight=1" in line and line.endswith("<- m0:0")


# -- command line -----------------------------------------------------------------------------------


def _actions(parser):
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                # the merge front door's commands (bench, extract-lora, merge-adapters: their modules' own parsers)
                if name in ("merge", "plan", "methods", "env", "demo", "lab"):
                    yield from _actions(sub)
        else:
            yield a


def test_every_option_is_described_and_version(capsys):
    """Before: --backend, --copy-tokenizer, plan's flags... had no help; mergekit's flags were hidden; no --version."""
    import argparse

    from fastmerge._version import __version__

    parsers = [cli.build_parser()]
    ap = argparse.ArgumentParser()
    cli._version_flag(ap)
    cli._merge_flags(ap)
    parsers.append(ap)
    for parser in parsers:
        for a in _actions(parser):
            if a.dest in ("help", "bench_cmd") or isinstance(a, argparse._SubParsersAction):
                continue
            assert a.help and a.help != argparse.SUPPRESS, a.option_strings or a.dest
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"fastmerge {__version__}"
    with pytest.raises(SystemExit):
        cli.yaml_main(["--help"])
    text = capsys.readouterr().out
    assert "(default: cpu)" in text and "5B = 5GB = 5,000,000,000 bytes" in text and "--lazy-unpickle" in text


@pytest.mark.parametrize("text,expected", [("5B", 5 * 10**9), ("5GB", 5 * 10**9), ("500MB", 500 * 10**6),
                                           ("500M", 500 * 10**6), ("50K", 50_000), ("2GiB", 2 * 2**30), ("123", 123)])
def test_out_shard_size_units(text, expected):
    """Before: '5GB' and '500MB' were refused ("cannot parse size")."""
    from fastmerge.io.writer import parse_size

    assert parse_size(text) == expected
    with pytest.raises(FastMergeError, match="cannot parse size"):
        parse_size(text + "X")


def test_write_model_card(family_bf16, tmp_path, capsys):
    """Before: --write-model-card was accepted and nothing was written."""
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(_ties(family_bf16)))
    assert cli.yaml_main([str(cfg), str(tmp_path / "merged"), "--quiet", "--write-model-card"]) == 0
    card = (tmp_path / "merged" / "README.md").read_text()
    base, fts = family_bf16
    assert card.startswith("---\n") and "# merged\n" in card and "created using fastmerge" in card
    assert f"merge method using {base} as a base" in card and all(f"* {f}\n" in card for f in fts)
    assert "merge_method: ties" in card
    assert cli.yaml_main([str(cfg), str(tmp_path / "plain"), "--quiet"]) == 0
    assert not (tmp_path / "plain" / "README.md").exists()


# -- outputs that lose what the user had --------------------------------------------------------------


def test_overwrite_never_removes_foreign_files(family_bf16, tmp_path, capsys):
    """Before: --overwrite renamed OUT away and deleted it whole, the user's notes.txt included."""
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(_ties(family_bf16)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(["merge", str(cfg), str(out), "--overwrite", "-q"]) == 2
    err = capsys.readouterr().err
    assert "not a fastmerge output" in err and "notes.txt" in err and (out / "notes.txt").read_text() == "mine"
    # an earlier fastmerge output is replaced; a file added to it since makes the next --overwrite refuse
    (out / "notes.txt").unlink()
    assert cli.main(["merge", str(cfg), str(out), "--overwrite", "-q", "--write-model-card"]) == 0
    assert cli.main(["merge", str(cfg), str(out), "--overwrite", "-q", "--out-shard-size", "100K"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text("{}")
    assert cli.main(["merge", str(cfg), str(out), "--overwrite", "-q"]) == 2
    err = capsys.readouterr().err
    assert "holds files fastmerge did not write: eval/" in err and (out / "eval" / "scores.json").is_file()
    # the commit checks again: a foreign file that appears during the merge is kept, and the merge refused
    from fastmerge.io.writer import commit_dir

    tmp = tmp_path / ".out.fastmerge-tmp-x"
    tmp.mkdir()
    with pytest.raises(FastMergeError, match="eval/"):
        commit_dir(tmp, out, overwrite=True)
    assert (out / "eval" / "scores.json").is_file() and tmp.is_dir()


SLOW_MERGE = """
import sys, time
from fastmerge.io import writer
orig = writer.ShardWriter._append
def slow(self, si, data, count):
    time.sleep(0.1 * count)
    return orig(self, si, data, count)
writer.ShardWriter._append = slow
from fastmerge import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(family_bf16, tmp_path, sig):
    """Before: SIGTERM/SIGHUP killed the process on the spot and left .OUT.fastmerge-tmp-* behind."""
    import signal
    import subprocess
    import sys
    import time

    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(_ties(family_bf16)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, "merge", str(cfg), str(out), "-q"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.fastmerge-tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.fastmerge-tmp-*")), "the merge never started"
    time.sleep(0.3)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    signum = getattr(signal, sig)
    assert proc.returncode == 128 + signum, err
    assert f"terminated by {sig}" in err
    assert not list(tmp_path.glob(".out.fastmerge*")) and not out.exists()


def test_terminate_as_interrupt_restores_handlers_and_respects_ignored():
    import signal

    from fastmerge.engine.signals import Terminated, terminate_as_interrupt

    before_term = signal.getsignal(signal.SIGTERM)
    before_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with pytest.raises(Terminated) as e:
            with terminate_as_interrupt():
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
                signal.raise_signal(signal.SIGTERM)
        assert isinstance(e.value, KeyboardInterrupt) and e.value.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is before_term and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before_hup)


def test_a_stale_temp_folder_is_named_before_the_next_merge(family_bf16, tmp_path, capsys):
    """Before: the folder a SIGKILLed merge left was never mentioned."""
    from fastmerge.io.outdir import stale_temp_dirs

    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(_ties(family_bf16)))
    stale = tmp_path / ".out.fastmerge-tmp-0123abcd"
    stale.mkdir()
    (tmp_path / ".other.fastmerge-tmp-0123abcd").mkdir()
    assert stale_temp_dirs(tmp_path / "out") == [stale]
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "-q"]) == 0
    err = capsys.readouterr().err
    note = [x for x in err.splitlines() if ".out.fastmerge-tmp-0123abcd" in x]
    assert len(note) == 1 and "--resume" in note[0] and ".other." not in note[0]


# -- display ----------------------------------------------------------------------------------------


class _Tty:
    def __init__(self, tty):
        import io

        self.buf, self.tty = io.StringIO(), tty

    def write(self, s):
        return self.buf.write(s)

    def flush(self):
        pass

    def isatty(self):
        return self.tty


def test_progress_one_rate_on_a_terminal_and_lines_in_a_log(monkeypatch):
    """Before: the bar showed tqdm's MB/s and a second GB/s postfix; in a log, hundreds of \\r redraws."""
    from fastmerge.engine import progress

    tty = _Tty(True)
    bar = progress.make_progress(10**9, "B", "fastmerge ties", tty)
    bar.update(5 * 10**8)
    bar.refresh()
    bar.close()
    last = tty.buf.getvalue().split("\r")[-1]
    assert last.count("/s") == 1 and "B/s" in last and "GB/s" not in last
    log = _Tty(False)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    lines = progress.make_progress(2 * 10**9, "B", "fastmerge ties", log)
    assert isinstance(lines, progress.LineProgress)
    lines.every = 0.0
    lines.update(10**9)
    lines.update(10**9)
    lines.close()
    out = log.buf.getvalue()
    assert "\r" not in out and out.splitlines()[0].startswith("fastmerge ties: 1.00 GB / 2.00 GB (50%), ")


def test_summary_names_output_dtype_and_shards(family_bf16, tmp_path, capsys):
    """Before: the closing summary named neither the output dtype nor the number of shards."""
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(_ties(family_bf16)))
    assert cli.main(["merge", str(cfg), str(tmp_path / "o"), "-q", "--out-shard-size", "100K"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    n = len(json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())["weight_map"] and
            list((tmp_path / "o").glob("model-*.safetensors")))
    assert n > 1 and first.endswith(f"(bfloat16, {n} shards)"), first


# -- non-finite outputs -----------------------------------------------------------------------------


def test_nonfinite_bit_check_matches_torch():
    from fastmerge.engine.finite import CHUNK, nonfinite

    for dt in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(CHUNK + 77).to(dt)
        assert not nonfinite(memoryview(x.view(torch.uint8).numpy()), str(dt)[6:])
        for bad in (float("inf"), float("-inf"), float("nan")):
            y = x.clone()
            y[CHUNK + 5] = bad  # in the second pass
            assert nonfinite(memoryview(y.view(torch.uint8).numpy()), str(dt)[6:])
        big = torch.full((4,), torch.finfo(dt).max, dtype=dt)
        assert not nonfinite(memoryview(big.view(torch.uint8).numpy()), str(dt)[6:])


def test_warns_once_when_the_merge_makes_inf_from_finite_inputs(family_bf16, tmp_path, backend):
    """Before: a linear merge overflowing to inf wrote the inf model without a word."""
    import warnings

    base, fts = family_bf16
    doc = {"merge_method": "linear", "parameters": {"normalize": False},
           "models": [{"model": str(base), "parameters": {"weight": 3e38}}, {"model": str(fts[0]), "parameters": {"weight": 3e38}}]}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        merge(doc, tmp_path / "o", progress=False, backend=backend)
    hits = [str(x.message) for x in w if "inf or NaN" in str(x.message)]
    assert len(hits) == 1 and "although its inputs are all finite" in hits[0] and hits[0].startswith("tensor '")


def test_no_warning_when_the_inf_came_in_with_an_input(tmp_path, backend):
    import warnings

    from fastmerge.io.index import CheckpointIndex

    base, fts = make_family(tmp_path / "fam", LlamaShape(hidden=64, layers=2, intermediate=176, vocab=301, heads=4),
                            n_finetunes=1, dtype="bfloat16")
    info = CheckpointIndex.open(fts[0]).tensors["model.layers.0.mlp.up_proj.weight"]
    with open(info.file, "r+b") as f:
        f.seek(info.begin)
        f.write(b"\x80\x7f")  # bf16 +inf as its first element
    doc = {"merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                                                {"model": str(fts[0]), "parameters": {"weight": 0.5}}]}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        merge(doc, tmp_path / "o", progress=False, backend=backend)
    assert not [x for x in w if "inf or NaN" in str(x.message)]
    from safetensors.torch import load_file

    assert torch.isinf(load_file(tmp_path / "o" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]).any()
