"""fastmerge._native gives libgomp a short spin count while _C loads it, unless the user chose one, and
leaves the environment as it found it (bench/RESULTS.md: the A/B behind the value)."""

import json
import os
import subprocess
import sys

import pytest

CHILD = (
    "import json, os\n"
    "from fastmerge import _native\n"
    "print(json.dumps({'applied': _native.OMP_SPINCOUNT, 'env': os.environ.get('GOMP_SPINCOUNT'),\n"
    "                  'loaded': _native.HAS_CPU_EXT, 'report': _native.report()['omp_spincount']}))\n"
)


def child(tmp_path, **env) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    e.update(env)
    # cwd outside the repository: the child must import the installed package, with its extension
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=e, cwd=tmp_path, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_short_spin_while_loading_then_environment_restored(tmp_path):
    r = child(tmp_path)
    if not r["loaded"]:
        pytest.skip("fastmerge._C not built")
    assert r["applied"] == "2000" and r["report"] == "2000"
    assert r["env"] is None  # removed again: children of the process do not inherit it


@pytest.mark.parametrize("var", ["GOMP_SPINCOUNT", "OMP_WAIT_POLICY"])
def test_user_openmp_settings_are_left_alone(tmp_path, var):
    value = "123" if var == "GOMP_SPINCOUNT" else "PASSIVE"
    r = child(tmp_path, **{var: value})
    assert r["applied"] is None and r["report"] is None
    if var == "GOMP_SPINCOUNT":
        assert r["env"] == "123"


def test_a_libgomp_loaded_first_is_reported_not_claimed(tmp_path):
    """torch imported first: its libgomp is loaded, read its settings then, and _C shares it; fastmerge says so
    (``fastmerge env``) instead of reporting a spin count it did not apply."""
    e = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env_report = "__import__('fastmerge.env').env.report()['omp_spincount']"
    code = ("import os, torch\npre = os.path.exists('/proc/self/maps') and 'libgomp' in open('/proc/self/maps').read()\n"
            + CHILD.replace("_native.report()['omp_spincount']", env_report)
            .replace("'report':", "'pre': pre, 'preloaded': _native.report()['libgomp_preloaded'], 'report':"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=tmp_path, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if not r["loaded"] or not r["pre"]:
        pytest.skip("fastmerge._C not built, or importing torch loads no libgomp here")
    assert r["preloaded"] is True and r["applied"] is None and r["env"] is None
    assert "loaded before it" in r["report"]
