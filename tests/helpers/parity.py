"""Side-by-side comparison with mergekit 0.1.5: run it in-process, load outputs, diff bit by bit / in ulps.

Shared by every parity test (tests/test_parity_*.py). mergekit is LGPL: it is only *run* here, never copied.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
for _k, _v in OFFLINE_ENV.items():  # mergekit (in-process too) must never reach the network
    os.environ.setdefault(_k, _v)


def run_mergekit(doc: dict, out: Path) -> Path:
    """``mergekit-yaml CFG OUT --no-copy-tokenizer --random-seed 42 --no-write-model-card``, in-process
    (``import mergekit`` costs ~8 s once; a subprocess per config ~10 s)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    opts = MergeOptions(copy_tokenizer=False, random_seed=42, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(doc), str(out), options=opts, config_source=yaml.safe_dump(doc))
    return out


class ParityRuns:
    """Runs each (case, tool, options) merge once per session, on first use; returns the output folder.
    A case has ``.id`` and ``.doc(families) -> config dict``."""

    def __init__(self, fams, root: Path):
        self.fams, self.root = fams, root
        self._done: dict[tuple, Path] = {}

    def mergekit(self, case) -> Path:
        key = (case.id, "mergekit")
        if key not in self._done:
            self._done[key] = run_mergekit(case.doc(self.fams), self.root / f"{case.id}.mergekit")
        return self._done[key]

    def fastmerge(self, case, compat: bool, backend: str = "auto") -> Path:
        key = (case.id, "fastmerge", compat, backend)
        if key not in self._done:
            import fastmerge

            out = self.root / f"{case.id}.fastmerge.{'compat' if compat else 'default'}.{backend}"
            fastmerge.merge(case.doc(self.fams), out, mergekit_compat=compat, backend=backend, copy_tokenizer=False,
                            progress=False, overwrite=True)
            self._done[key] = out
        return self._done[key]


INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@dataclass
class TensorDiff:
    name: str
    numel: int
    equal: int  # bitwise-equal elements
    max_ulp: int  # largest distance in units in the last place of the stored dtype
    max_abs: float
    first: str  # "index: got vs want" of the largest difference, for the failure message

    @property
    def frac(self) -> float:
        return self.equal / self.numel if self.numel else 1.0


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|ordered(a) − ordered(b)| per element, where ``ordered`` maps the IEEE bit patterns of a floating
    dtype to integers monotonically (so 1 means adjacent representable values; +0 and −0 are both 0)."""
    iv = INT_VIEW[a.dtype]
    bits = 8 * a.element_size()
    mag_mask = (1 << (bits - 1)) - 1

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().reshape(-1).view(iv).to(torch.int64)
        mag = i & mag_mask
        return torch.where(i < 0, -mag, mag)

    return (ordered(a) - ordered(b)).abs()


def tensor_diff(name: str, got: torch.Tensor, want: torch.Tensor) -> TensorDiff:
    assert got.dtype == want.dtype and got.shape == want.shape, (
        f"{name}: fastmerge {got.dtype}{list(got.shape)} vs mergekit {want.dtype}{list(want.shape)}"
    )
    iv = INT_VIEW[got.dtype]
    eq = int((got.reshape(-1).view(iv) == want.reshape(-1).view(iv)).sum())
    d = ulp_distance(got, want)
    i = int(d.argmax()) if d.numel() else 0
    g, w = got.reshape(-1).float(), want.reshape(-1).float()
    return TensorDiff(
        name, got.numel(), eq, int(d[i]) if d.numel() else 0,
        float((g - w).abs().max()) if d.numel() else 0.0,
        f"[{i}]: fastmerge {float(g[i])!r} vs mergekit {float(w[i])!r}" if d.numel() else "",
    )


def compare_models(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[TensorDiff]:
    assert sorted(got) == sorted(want), (
        f"tensor names differ: only fastmerge {sorted(set(got) - set(want))[:5]}, "
        f"only mergekit {sorted(set(want) - set(got))[:5]}"
    )
    return [tensor_diff(n, got[n], want[n]) for n in sorted(want)]


def describe(diffs: list[TensorDiff], limit: int = 6) -> str:
    bad = sorted((d for d in diffs if d.equal != d.numel), key=lambda d: (d.frac, -d.max_ulp))
    tot = sum(d.numel for d in diffs)
    eq = sum(d.equal for d in diffs)
    lines = [f"{eq}/{tot} elements bitwise equal ({eq / tot:.5%}); {len(bad)}/{len(diffs)} tensors differ"]
    for d in bad[:limit]:
        lines.append(
            f"  {d.name}: {d.numel - d.equal}/{d.numel} differ ({d.frac:.4%} equal), max {d.max_ulp} ulp, "
            f"max |diff| {d.max_abs:.3g} at {d.first}"
        )
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more tensors")
    return "\n".join(lines)


def assert_bit_exact(diffs: list[TensorDiff], what: str) -> None:
    assert all(d.equal == d.numel for d in diffs), f"{what}: not bit-exact vs mergekit 0.1.5\n{describe(diffs)}"


def assert_within_ulp(diffs: list[TensorDiff], max_ulp: int, what: str) -> None:
    worst = max(d.max_ulp for d in diffs)
    assert worst <= max_ulp, f"{what}: max {worst} ulp > {max_ulp} ulp allowed\n{describe(diffs)}"


MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def ulp_at(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` values at magnitude ``scale`` (fp32 tensor; subnormal range clamped)."""
    _, e = torch.frexp(scale.float().clamp_min(torch.finfo(dtype).tiny))  # scale = m·2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(scale, dtype=torch.float32), e - 1 - MANTISSA_BITS[dtype])


def max_operand_scale_ulps(got: torch.Tensor, want: torch.Tensor, operands: list[torch.Tensor]) -> float:
    """max |got − want| in ulps of the output dtype taken at the largest magnitude among the operands
    (base and inputs) and both results: the scale at which a chain of roundings makes its errors."""
    scale = torch.stack([t.float().abs() for t in (*operands, got, want)]).amax(0)
    d = (got.float() - want.float()).abs() / ulp_at(scale, want.dtype)
    return float(d.max()) if d.numel() else 0.0


def load_model(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint (single file or sharded with an index)."""
    files = sorted(root.glob("*.safetensors"))
    assert files, f"{root}: no .safetensors written"
    index = root / "model.safetensors.index.json"
    if index.is_file():
        listed = set(json.loads(index.read_text())["weight_map"].values())
        assert listed == {f.name for f in files}, f"{root}: index lists {sorted(listed)}, folder has {[f.name for f in files]}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                assert k not in out, f"{root}: tensor {k} stored twice"
                out[k] = h.get_tensor(k)
    return out


def config_dtype(root: Path) -> str | None:
    doc = json.loads((root / "config.json").read_text())
    return doc.get("dtype") or doc.get("torch_dtype")


