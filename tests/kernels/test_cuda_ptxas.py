"""The CUDA C++ kernels (csrc/cuda/*.cu) compiled for sm_90 with ``nvcc -Xptxas -v``, no GPU needed:
no kernel keeps a stack frame (local memory: the TIES merge kernel's ``float wd[32]`` took 128 bytes,
STL/LDL per element, before it recomputed w·δ' in the election's second loop) and none spills.
Skipped cleanly where nvcc is absent."""

import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


def ptxas_report(src: pathlib.Path, tmp_path) -> dict[str, dict[str, int]]:
    r = subprocess.run(
        ["nvcc", "-std=c++17", "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-v",
         f"-I{ROOT / 'csrc' / 'include'}", "-c", str(src), "-o", str(tmp_path / (src.stem + ".o"))],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out, name = {}, None
    for line in r.stderr.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            out[name] = dict(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and name in out:
            out[name]["regs"] = int(m.group(1))
    return out


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_no_stack_frame_no_spills(src, tmp_path):
    rep = ptxas_report(src, tmp_path)
    kernels = {k: v for k, v in rep.items() if "kernel" in k}
    assert kernels, f"no kernels found in the ptxas report of {src.name}"
    for name, v in kernels.items():
        assert v["stack"] == 0 and v["spill_stores"] == 0 and v["spill_loads"] == 0, f"{src.name} {name}: {v}"


def test_ties_scratch_comes_from_the_caller_and_nothing_waits():
    """No cudaMalloc/cudaFree in the CUDA C++ TIES: its scratch is a torch tensor the caller passes
    (``_native.ties``), so it is in torch's allocator statistics and the engine's memory budget, and no
    cudaFree synchronises the device when it grows. No synchronisation and no copy back to the host:
    thresholds, the exact-k cut and the rescale factors are decided on the device (torch's sync debug
    mode cannot see inside the extension, so this is checked on the source)."""
    src = (ROOT / "csrc" / "cuda" / "ties.cu").read_text()
    code = "\n".join(line.split("//")[0] for line in src.splitlines())
    for banned in ("cudaMalloc", "cudaFree", "std::mutex", "Synchronize", "cudaMemcpy", "DeviceToHost"):
        assert banned not in code, banned
    assert "ties_scratch_bytes" in code


def test_the_cuda_binding_compiles(tmp_path):
    """``csrc/bind_cuda.cpp`` (the ``scratch`` arguments and ``ties_scratch_bytes``) compiles against the
    kernel's declarations, with the CUDA toolkit's headers, without a GPU."""
    import sysconfig

    import pybind11

    r = subprocess.run(
        ["nvcc", "-std=c++17", f"-I{ROOT / 'csrc' / 'include'}", f"-I{pybind11.get_include()}",
         f"-I{sysconfig.get_paths()['include']}", "-Xcompiler", "-fPIC", "-c", str(ROOT / "csrc" / "bind_cuda.cpp"),
         "-o", str(tmp_path / "bind_cuda.o")],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
