"""The merge kernels compiled for sm_90 on this machine, no GPU needed (``fastmerge.kernels.offline``).

What a GPU would run, checked where CI runs: on a full tile (inside its segment) every input row is
read with one 16-byte (``v4.b32``, 8 bf16 per thread) or 8-byte (``v2.b32``, 4 per thread: T > 4) load
per thread, the output written with one vector store, no 2-byte (``b16``) access outside the masked
edge-tile path, exactly T + 1 row loads (the consensus's second loop reuses the first's values: no
reload, no recomputation of the DARE hash), no spills, and registers that leave ≥ 2 CTAs of 256
threads per SM (≤ 128). Before this layout (T a run-time loop, tile starts unknown to the compiler)
every row load was a masked ``ld.global.b16``: 24 of them in the TIES kernel at 78 registers.

Skipped where triton's NVIDIA backend (its bundled ptxas) is missing. The compile runs in a subprocess:
the test session sets ``TRITON_INTERPRET=1``, which replaces ``@triton.jit`` kernels by interpreted ones.
"""

import pytest

from fastmerge.kernels.offline import VARIANTS
from helpers.offline import offline_builds, ptxas_available

pytestmark = pytest.mark.skipif(not ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not available")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return offline_builds(tmp_path_factory, "sm90")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_full_tiles_use_vector_loads_and_stores(builds, name):
    b = builds[name]
    per_thread = b["block"] // 256
    vec = {8: "v4.b32", 4: "v2.b32"}[per_thread]
    rows = b["T"] + (0 if name.startswith("linear") else 1)  # + base
    assert b["loads"].get(vec, 0) == rows, f"{name}: {b['loads']} (want {rows} × {vec}: one per input row)"
    assert b["stores"] == {vec: 1}, f"{name}: stores {b['stores']}"
    assert "b16" not in b["loads"] and "b16" not in b["stores"], f"{name}: unmasked 2-byte accesses {b['loads']}"
    # the masked path (edge tiles) loads each row once too: per_thread scalar loads per row
    assert b["masked_loads"].get("b16", 0) == rows * per_thread, f"{name}: masked {b['masked_loads']}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_no_spills_and_two_ctas_per_sm(builds, name):
    b = builds[name]
    assert b["stack"] == 0 and b["spill_stores"] == 0 and b["spill_loads"] == 0, f"{name}: {b}"
    assert b["regs"] <= 128, f"{name}: {b['regs']} registers (> 128: fewer than 2 CTAs of 256 threads per SM)"
