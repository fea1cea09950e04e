"""kernels/fp8.py: the device dequantisation of FP8 bytes, bit for bit the reference's (io.fp8.dequantize), on
every byte of both formats (NaN and inf codes included), every scale kind, odd shapes with partial blocks, row
chunks starting mid-tensor, into poisoned outputs."""

import pytest
import torch

from fastmerge.io import fp8
from helpers.kernel_cases import needs_triton

pytestmark = needs_triton

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
BLOCK = (128, 128)


def case(shape, fmt, kind, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).view(fmt)
    r = shape[0]
    c = q.numel() // r
    scale = {"block": lambda: torch.rand(-(-r // 128), -(-c // 128), generator=g) + 0.01,
             "channel": lambda: torch.rand(r, 1, generator=g) + 0.01,
             "tensor": lambda: torch.rand(1, generator=g) + 0.01, "none": lambda: None}[kind]()
    return q, scale


def bits(t):
    return t.view(torch.int32)


@pytest.mark.parametrize("fmt", [E4, E5])
def test_every_code(fmt):
    from fastmerge.kernels.fp8 import dequantize_into

    q = torch.arange(256, dtype=torch.uint8).view(fmt)
    out = torch.full((256,), float("nan"))
    dequantize_into(out, q, None, "none", str(fmt).split(".")[1], (256,))
    assert torch.equal(bits(out), bits(q.float()))


CASES = [(shape, kind) for shape in [(300, 200), (257, 131), (1030,)] for kind in ["block", "channel", "tensor", "none"]
         if kind != "block" or len(shape) == 2]  # block scales need a matrix (io.fp8 refuses others at plan time)


@pytest.mark.parametrize("fmt", [E4, E5])
@pytest.mark.parametrize("shape,kind", CASES)
def test_dequantize_into_is_the_reference(shape, fmt, kind):
    from fastmerge.kernels.fp8 import dequantize_into

    q, s = case(shape, fmt, kind, seed=len(shape) + 3 * (kind == "block"))
    ref = fp8.dequantize(q, s, kind, BLOCK if kind == "block" else None).reshape(-1)
    out = torch.full((q.numel(),), float("nan"))
    dequantize_into(out, q, s, kind, str(fmt).split(".")[1], shape, BLOCK)
    assert torch.equal(bits(out), bits(ref))
    # a row chunk: elements [a, b) of the tensor, scales placed by their flat index
    a = (shape[1] if len(shape) == 2 else 1) * 129 if shape[0] > 129 else 517
    b = q.numel() - 7
    part = torch.full((b - a,), float("nan"))
    dequantize_into(part, q.reshape(-1)[a:b], s, kind, str(fmt).split(".")[1], shape, BLOCK, first=a)
    assert torch.equal(bits(part), bits(ref[a:b]))
