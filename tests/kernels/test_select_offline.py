"""The selection's kernels (``kernels/select_bracket.py``) compiled for sm_90 on this machine, no GPU needed
(``fastmerge.kernels.offline``, ``SELECT_VARIANTS``).

The count pass is the one full read of the selection, so it must stream like the merge: on a full tile
base and every model row are read with one 16-byte (``v4.b32``, 8 bf16 per thread, T ≤ 4) or 8-byte
(``v2.b32``, T > 4) load per thread (base once per tile, not once per model: T + 1 vector loads), no
unpredicated 2-byte access, the edge tiles' masked path loads each row once, the only stores are the
masked candidate scatter (``b32`` keys), no spills, ≤ 128 registers (2 CTAs of 256 threads per SM). The
per-query select kernels (bracket on the sample, finish on the candidates) must not spill either.

Skipped where triton's NVIDIA backend (its bundled ptxas) is missing. The compile runs in a subprocess:
the test session sets ``TRITON_INTERPRET=1``, which replaces ``@triton.jit`` kernels by interpreted ones.
"""

import pytest

from fastmerge.kernels.offline import SELECT_VARIANTS
from helpers.offline import offline_builds, ptxas_available

pytestmark = pytest.mark.skipif(not ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not available")

COUNT = [n for n in SELECT_VARIANTS if n.startswith("select_count")]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return offline_builds(tmp_path_factory, "sm90sel", SELECT_VARIANTS)


@pytest.mark.parametrize("name", COUNT)
def test_count_pass_reads_base_once_per_tile_with_vector_loads(builds, name):
    b = builds[name]
    per_thread = b["block"] // 256
    vec = {8: "v4.b32", 4: "v2.b32"}[per_thread]
    rows = b["T"] + 1
    assert b["loads"].get(vec, 0) == rows, f"{name}: {b['loads']} (want {rows} × {vec}: base once, then each model)"
    assert "b16" not in b["loads"], f"{name}: unmasked 2-byte loads {b['loads']}"
    assert b["masked_loads"].get("b16", 0) == rows * per_thread, f"{name}: masked {b['masked_loads']}"
    assert b["stores"] == {}, f"{name}: unpredicated stores {b['stores']}"
    assert set(b["masked_stores"]) == {"b32"}, f"{name}: stores {b['masked_stores']} (want the masked key scatter only)"


@pytest.mark.parametrize("name", list(SELECT_VARIANTS))
def test_no_spills_and_two_ctas_per_sm(builds, name):
    b = builds[name]
    assert b["stack"] == 0 and b["spill_stores"] == 0 and b["spill_loads"] == 0, f"{name}: {b}"
    assert b["regs"] <= 128, f"{name}: {b['regs']} registers (> 128: fewer than 2 CTAs of 256 threads per SM)"


@pytest.mark.parametrize("name", [n for n in SELECT_VARIANTS if n.startswith("select_tiles_count")])
def test_exact_k_count_pass_still_reads_each_row_once(builds, name):
    """Recording each tile's candidates for exact-k (``TILES``) adds scalar stores, not loads: base and every
    model still come in once per tile as full vectors (the tie counts then need no read of the data)."""
    b = builds[name]
    vec = {8: "v4.b32", 4: "v2.b32"}[b["block"] // 256]
    assert b["loads"].get(vec, 0) == b["T"] + 1, f"{name}: {b['loads']}"
    assert "b16" not in b["loads"], f"{name}: unmasked 2-byte loads {b['loads']}"


@pytest.mark.parametrize("name", [n for n in SELECT_VARIANTS if n.startswith("select_radix")])
def test_radix_pass_reads_base_once_per_tile_for_every_model(builds, name):
    """The radix passes (row chunks, missed brackets): one tile's base is loaded once and kept for the T models
    (the former loop over models loaded it again for each: 2 load sites, base's executed T times)."""
    b = builds[name]
    per_thread = b["block"] // 256
    rows = b["T"] + 1
    assert b["masked_loads"].get("b16", 0) == rows * per_thread, f"{name}: masked {b['masked_loads']} (want {rows} rows)"
