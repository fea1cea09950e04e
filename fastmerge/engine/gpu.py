"""The streaming GPU engine: ``execute_cuda(plan, out, max_gpu_memory)``, fastmerge.runner.execute on a GPU.

Data flow (one "unit" = a batch of small tensors, one tensor, or one row chunk of a huge tensor)::

    reader thread ──► pinned staging buffer k (2, reused) ──H2D, copy stream──► device input slot j (2)
      (mmap views,       packed [base; x_1..x_T] rows,                          the whole unit, assembled
       pages populated)  STAGE bytes a piece                                    piece by piece
                                                            compute stream: kernel passes + merge
                                                                     ──► device output slot j (2)
    writer thread ◄── pinned host output buffer (2, reused) ◄──D2H, copy stream──┘

- The CPU packs piece k+1 of a unit while piece k is copied, and the next unit while the GPU merges
  this one; outputs come back on their own stream while the next unit loads, and the writer thread
  writes shard files while all of that runs. Ordering is by CUDA events only: the host waits only
  for a staging buffer it wants to refill and for a host output buffer the writer still holds.
- GPU memory is bounded by ``max_gpu_memory``: 2 input slots + 2 output slots + a 512 MiB reserve
  for kernel scratch + the CUDA C++ kernel's scratch (taken from torch's allocator per call, sized by
  ``backends.cuda.scratch_bytes``) + for FP8 inputs their bytes in flight (1 per slot element) and scales.
  Slot 0 holds the largest unit, slot 1 the next-largest tensor (``_Budget``);
  units that fit slot 1 alternate between the two. A tensor group larger than slot 0 is merged in
  row chunks, every data pass (the selection of TIES/breadcrumbs, the L1 norms of a rescale, the Gram
  matrix of slerp/model_stock) running over all its chunks before the merge pass
  (``kernels.gta.GtaKernel``'s driver protocol). The default budget fits the largest tensor group
  whole (no chunking): its inputs + output, one next-largest group, the reserve.
- Nothing inside a unit blocks the host: kernel plans build their tables on the host and send them,
  with every launch's group, segment and tile tables, in one pinned buffer with one non_blocking copy
  on the compute stream (``kernels._common.HostPack``; the CPU test suite counts synchronising calls
  through a stand-in, bench/gpu_quick.sh runs units under ``torch.cuda.set_sync_debug_mode("error")``).
  The selection (k and the bracket's tables in the same kind of copy), the Gram matrices and coefficients
  of slerp/model_stock (computed on the device) and the CUDA C++ ties kernel (every decision on the
  device) do not synchronise either.
- Units run in the order of their first tensor; a batch of small tensors stays open across other units
  for ``LOOKAHEAD`` plan positions (a model's norms share a launch instead of one unit per layer), and
  the writer holds the tensors that come back early until their plan position. Packed rows are
  64-element aligned (``ALIGN``).
- A tensor larger than one slot but not than both is merged in two chunks, one per slot, resident
  through every pass: its rows cross to the device once. Larger ones are copied again for each pass
  (an exact selection cannot finish in one read of data it cannot hold: every pass needs every
  element again); selection passes alternate direction, so each starts with the chunk still resident.
- Each tensor runs on the backend the plan chose (``TensorPlan.backend``, from ``backends.select``, the
  one place that decides): "cuda" (the CUDA C++ kernel, one tensor per unit: 9-12x the Triton ties on an
  H100, bench/RESULTS.md; ``select`` leaves tensors under ``backends.cuda.MIN_ELEMS`` to Triton's
  batches), "triton" (batches of small tensors, one unit per larger one) or "torch" (the reference on
  the GPU, one at a time; a group too large for the budget runs it on the CPU).
- A tensor too large for slot 0 cannot run whole: it is merged in row chunks on Triton (a "cuda" tensor
  too), unless the method's kernel declares ``TritonKernel.whole_rows`` and the tensor is 1-D (one row:
  DELLA ranks within rows), which then runs the torch reference. Scratch per element and the batch key
  are the method's declarations too (``MergeMethod.triton``).

The same pipeline runs with ``device="cpu"`` (no streams, no pinned memory, the kernels interpreted
under ``TRITON_INTERPRET=1``): the CPU test suite checks batching, chunking, the pass protocol and the
writer's order against ``engine.stream`` bit for bit (tests/engine/test_gpu.py).
"""

from __future__ import annotations

import dataclasses
import math
import queue
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import backends
from .._lazy import torch_dtype
from ..backends import cuda as cb
from ..backends import triton as tb
from ..backends.base import MergeJob
from ..errors import BackendUnavailableError, FastMergeError
from ..io.reader import ModelReader, read_ahead_bytes
from ..kernels import interpreting
from ..plan import MergePlan, TensorPlan
from .session import MergeReport, Session, WriteThread, peak_rss_mb, torch_threads

#: bytes of one pinned staging buffer (two are allocated): large enough that a copy runs at full
#: PCIe/NVLink-C2C speed (copies of ≥ 8 MB reach ~90 % of it), small enough to pin quickly (pinning
#: costs ~0.3 s/GB) and to keep host memory flat. Units larger than this are staged in pieces.
STAGE_BYTES = 256 << 20
#: at most this many tensors share a launch: the selection histograms take 16 KB per tensor and model
MAX_BATCH_TENSORS = 512
#: a batch stops growing at this many elements (a few launches' worth of work per batch keeps the
#: copy/compute overlap fine-grained; one 4096x4096 tensor is 16.8M)
BATCH_ELEMS = 1 << 24
#: device memory kept outside the slots: tile tables, histograms, rescale partials, allocator slack
RESERVE_BYTES = 512 << 20
#: host output buffers larger than this are not pinned (D2H then goes through the driver's staging)
MAX_PINNED_OUT = 2 << 30
#: a batch of small tensors stays open across this many plan positions of other units (large tensors,
#: row-chunked ones, torch ones): a LLaMA layer is 9-12 tensors, so the norms and biases of ~5-7
#: layers share one launch unit instead of one or two tiny units per layer (gpu-design.md §3d, §5.3).
#: Their outputs come back before the large tensors between them are written: the writer holds them
#: (a copy, at most one batch: BATCH_ELEMS elements) until their plan position comes.
LOOKAHEAD = 64
#: segment starts and row strides of a packed unit are multiples of this many elements (≤ 63 padding
#: elements per segment and row, zeros, never read): every row and segment starts 128-byte aligned
#: (bf16), so the merge passes' full tiles are whole 16-byte vectors in every model's row, not only in
#: row 0 (gpu-design.md §3b.2: Triton specialises a stride's divisibility by 16 and vectorises only
#: then; a packed row of 12 norms of 4096 + 1 elements had an odd stride). The slots carry this much
#: slack per row, taken from the reserve.
ALIGN = 64


@dataclasses.dataclass
class GpuMergeReport(MergeReport):
    """``MergeReport`` plus the GPU side: peak device memory, the budget, and how the work was cut."""

    gpu_peak_mb: float = 0.0
    gpu_budget_mb: float = 0.0
    units: int = 0
    chunked_tensors: int = 0

    def summary(self) -> str:
        return super().summary() + (
            f"\n  GPU: peak {self.gpu_peak_mb:.0f} MB of a {self.gpu_budget_mb:.0f} MB budget; "
            f"{self.units} launch units, {self.chunked_tensors} tensor(s) merged in row chunks"
        )


# ------------------------------------------------------------------------------------------------
# device abstraction: CUDA streams/events, or synchronous CPU stand-ins (tests under the interpreter)


class _NullEvent:
    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: "_NullEvent") -> float:
        return 0.0


class _Dev:
    """Where units are merged. CUDA: three streams (H2D, compute, D2H), pinned host buffers, events.
    CPU: everything synchronous in the calling thread (same code path, for tests)."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.h2d = torch.cuda.Stream(self.device)
            self.comp = torch.cuda.Stream(self.device)
            self.d2h = torch.cuda.Stream(self.device)

    def event(self, timing: bool = False) -> Any:
        return torch.cuda.Event(enable_timing=timing) if self.cuda else _NullEvent()

    def host(self, nbytes: int, pin: bool = True) -> torch.Tensor:
        t = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.cuda and pin)
        return t

    def stream(self, which: str) -> Any:
        if not self.cuda:
            return _nullcontext()
        return torch.cuda.stream(getattr(self, which))

    def wait(self, which: str, event: Any) -> None:
        if self.cuda and event is not None:
            getattr(self, which).wait_event(event)

    def record(self, which: str, timing: bool = False) -> Any:
        ev = self.event(timing)
        if self.cuda:
            ev.record(getattr(self, which))
        return ev


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


# ------------------------------------------------------------------------------------------------
# units


@dataclasses.dataclass
class _Unit:
    """A launch unit: ``kind`` "batch" (tensors packed whole, one kernel plan), "cuda" (one tensor, the
    CUDA C++ kernel), "chunked" (one tensor in row chunks) or "torch" (one tensor, the reference)."""

    kind: str
    tensors: list[int]  # plan indices, plan order
    key: tuple = ()
    chunks: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (first element, numel) per chunk


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _pad(n: int) -> int:
    """``n`` elements rounded up to the packed layout's alignment (``ALIGN``)."""
    return -(-n // ALIGN) * ALIGN


def _layout(numels: Sequence[int]) -> tuple[list[int], int]:
    """(segment starts, row stride) of a packed unit: every start and the stride a multiple of ``ALIGN``."""
    starts, s = [], 0
    for n in numels:
        starts.append(s)
        s = _pad(s + n)
    return starts, max(s, ALIGN)


def _elem(dtype: str | torch.dtype) -> int:
    return (torch_dtype(dtype) if isinstance(dtype, str) else dtype).itemsize


def _in_dtypes(tp: TensorPlan) -> list[torch.dtype]:
    """The dtypes the method sees: the inputs', the compute dtype (mergekit_compat casts at load), and
    after a tokenizer remap their promotion (``vocab.RowMap.apply``), base first."""
    n = len(tp.sources) + (tp.base is not None)
    if tp.compute_dtype:
        return [torch_dtype(tp.compute_dtype)] * n
    if getattr(tp.input_transform, "before_cast", False):  # FP8 inputs: dequantised to fp32 (kernels.fp8)
        return [torch.float32] * n
    ds = ([torch_dtype(tp.base.dtype)] if tp.base is not None else []) + [torch_dtype(s.dtype) for s in tp.sources]
    if getattr(tp, "input_transform", None) is not None:
        p = ds[0]
        for d in ds[1:]:
            p = torch.promote_types(p, d)
        return [p] * n
    return ds


def _prepare(plan: MergePlan, tp: TensorPlan, tensors: list[torch.Tensor], fp8_on_device: bool = True) -> list[Any]:
    """The inputs as the method sees them (base first): a tokenizer remap applied on the CPU, after the
    compute-dtype cast, as ``runner.execute``; without a remap the cast happens in the staging copy. FP8
    inputs (``fp8_on_device``): ``kernels.fp8.Fp8Piece``s, which ``upload`` dequantises on the device."""
    if getattr(tp, "input_transform", None) is None:
        return tensors
    if fp8_on_device and _fp8_on_device(tp):
        from fastmerge.kernels import fp8

        return fp8.pieces(tp.input_transform, tensors)
    if tp.compute_dtype:
        cd = torch_dtype(tp.compute_dtype)
        tensors = [x.to(cd) for x in tensors]
    return list(getattr(tp, "input_transform", None).apply(tensors, plan.options.mergekit_compat))


def _fp8_on_device(tp: TensorPlan) -> bool:
    """FP8 inputs uploaded as their bytes and dequantised on the device (``kernels.fp8.Fp8Piece``)."""
    return bool(getattr(getattr(tp, "input_transform", None), "before_cast", False)) and not tp.compute_dtype


def _fp8_scale_bytes(tp: TensorPlan) -> int:
    """The device copies of a tensor's FP8 scales (fp32, whole: ``Fp8Piece.write`` keeps them with the unit)."""
    return sum(4 * _numel(d.scale.shape) for d in tp.input_transform.inputs
               if d is not None and d.scale is not None and d.kind != "none")


def _rows(tp: TensorPlan) -> int:
    return len(tp.sources) + (tp.base is not None)


def _kernel_job(plan: MergePlan, tp: TensorPlan) -> MergeJob:
    return MergeJob(tp.name, plan.method, tp.params, plan.options.mergekit_compat)


class _Budget:
    """Slot capacities in elements (per packed row) from the byte budget.

    Slot 0 holds the largest unit (by default a whole tensor group: the embedding); slot 1 the
    next-largest tensor (the MLP matrices) or a full batch of small ones. Units that fit slot 1
    alternate between the two (the next one loads while this one merges); larger ones use slot 0
    alone. Two full-size slots would double-buffer the embeddings too, for 2x the largest group in GPU
    memory; this way a LLaMA-8B ties merge needs the embedding's group (4.2 GB) + its output (1 GB) +
    one MLP group (0.6 GB) + the 0.5 GB reserve."""

    def __init__(self, plan: MergePlan, max_gpu_memory: int | None, dev: _Dev) -> None:
        R = max((_rows(t) for t in plan.tensors), default=1)
        ein = max((_elem(tb.stage_dtype(_in_dtypes(t))) for t in plan.tensors), default=4)
        eout = max((_elem(t.out_dtype) for t in plan.tensors), default=4)
        caps = plan.method.triton
        escr = caps.scratch_bytes(R) if caps is not None else 0  # kernel scratch per element (DELLA's ranks)
        self.rows, self.ein, self.eout = R, ein, eout
        # FP8 inputs cross as their bytes (``kernels.fp8.Fp8Piece.write``): each piece (at most one slot row) is a
        # 1-byte-per-element device temporary until it is dequantised into the slot, and each FP8 input's fp32
        # scales stay on the device with its unit (two units in flight). Counted per slot element (the
        # temporary is one row of slot 0: counting it on every element of both slots over-counts by < 1/(R·ein))
        fp8 = [t for t in plan.tensors if _fp8_on_device(t)]
        self.fp8_elem = 1 if fp8 else 0
        self.fp8_scales = 2 * max((_fp8_scale_bytes(t) for t in fp8), default=0)
        self.per_elem = R * ein + eout + escr + self.fp8_elem
        sizes = sorted({_numel(t.shape) for t in plan.tensors}, reverse=True) or [1]
        largest = max(sizes[0], BATCH_ELEMS)
        second = min(max(sizes[1] if len(sizes) > 1 else sizes[0], BATCH_ELEMS), largest)
        max_gpu_memory_given = max_gpu_memory
        if max_gpu_memory is None:
            want = (largest + second) * self.per_elem + RESERVE_BYTES + self.fp8_scales
            if dev.cuda:
                free, _ = torch.cuda.mem_get_info(dev.device)
                want = min(want, int(free * 0.9))
            max_gpu_memory = want
        self.bytes = int(max_gpu_memory)
        self.scratch = 0  # the CUDA C++ kernel's scratch (torch's allocator), on top of the reserve
        self._caps(second)
        # the tensors that will run the CUDA C++ kernel whole (those fitting slot 0): their scratch is counted
        cuda = [(_numel(t.shape), len(t.sources)) for t in plan.tensors if t.backend == "cuda"]
        self.scratch = max((cb.scratch_bytes(n, T) for n, T in cuda if n <= self.cap), default=0)
        if self.scratch:
            if max_gpu_memory_given is None:
                self.bytes += self.scratch
            self._caps(second)

    def _caps(self, second: int) -> None:
        room = (self.bytes - RESERVE_BYTES - self.scratch - self.fp8_scales) // self.per_elem  # elements over both slots
        if room < 2:
            raise FastMergeError(
                f"--max-gpu-memory {self.bytes / 2**20:.0f} MiB leaves no room for a tensor after the "
                f"{RESERVE_BYTES >> 20} MiB reserve for kernel scratch"
                + (f" and {self.scratch / 2**20:.1f} MiB for the CUDA kernel's" if self.scratch else "")
                + (f" and {self.fp8_scales / 2**20:.1f} MiB for FP8 scales" if self.fp8_scales else "")
            )
        self.cap1 = int(min(second, room // 2))
        self.cap = int(room - self.cap1)  # slot 0: elements per unit (per row of the packed buffer)


def _plan_units(plan: MergePlan, budget: _Budget) -> list[_Unit]:
    """Launch units in execution order (each unit runs when its first tensor's turn comes; a batch takes
    small tensors up to ``LOOKAHEAD`` plan positions after its first, across other units)."""
    units: list[_Unit] = []
    open_: dict[tuple, tuple[_Unit, int]] = {}  # batch key -> (open batch, its elements)
    for i, tp in enumerate(plan.tensors):
        job = _kernel_job(plan, tp)
        n = _numel(tp.shape)
        kind = _unit_kind(tp, job, n, budget)
        if kind in ("torch", "cuda"):
            units.append(_Unit(kind, [i]))
            continue
        if kind == "chunked":
            row = _numel(tp.shape[1:]) if len(tp.shape) > 1 else 1
            rows_per = max(1, budget.cap // row)
            if row > budget.cap:
                raise FastMergeError(
                    f"tensor '{tp.name}': one row of {row} elements does not fit --max-gpu-memory "
                    f"{budget.bytes / 2**20:.0f} MiB (room for {budget.cap} elements per row)"
                )
            total_rows = tp.shape[0] if len(tp.shape) > 1 else n
            a, rest = budget.cap // row, total_rows - budget.cap // row
            if 0 < rest * row <= budget.cap1:
                # two chunks, one per slot: both stay resident through every pass, uploaded once
                chunks = [(0, a * row), (a * row, rest * row)]
            else:
                chunks = [(r * row, min(rows_per, total_rows - r) * row) for r in range(0, total_rows, rows_per)]
            units.append(_Unit("chunked", [i], tb.batch_key(job), chunks))
            continue
        key = (tb.batch_key(job), tuple(_in_dtypes(tp)), tp.out_dtype, _rows(tp), tp.base is not None)
        cur, elems = open_.get(key, (None, 0))
        if (cur is None or elems + _pad(n) > min(budget.cap, BATCH_ELEMS) or len(cur.tensors) >= MAX_BATCH_TENSORS
                or i - cur.tensors[0] > LOOKAHEAD):
            cur, elems = _Unit("batch", [], key), 0
            units.append(cur)
        cur.tensors.append(i)
        open_[key] = (cur, elems + _pad(n))
    return units


def _unit_kind(tp: TensorPlan, job: MergeJob, n: int, budget: _Budget) -> str:
    """How tensor ``tp`` (``n`` elements) runs: on its planned backend ("cuda" | "triton" | "torch") when
    it fits slot 0 whole; larger, in row chunks on Triton, or on the torch reference where the method's
    Triton kernel cannot take it in chunks (a 1-D tensor of a ``whole_rows`` kernel, or no kernel)."""
    if tp.backend not in ("cuda", "triton", "torch"):
        raise BackendUnavailableError(
            f"tensor '{tp.name}': planned for the {tp.backend} backend; the GPU engine runs cuda, triton and "
            "torch (build the plan with device='cuda')"
        )
    if tp.backend == "torch":
        return "torch"
    if n <= budget.cap:
        return "cuda" if tp.backend == "cuda" else "batch"
    caps = job.method.triton
    if caps is None or tb.param_reasons(job) or (caps.whole_rows and len(tp.shape) <= 1):
        return "torch"
    return "chunked"


# ------------------------------------------------------------------------------------------------
# the engine


class _HostPool:
    """Reused host output buffers (pinned on CUDA): the writer gives them back."""

    def __init__(self, dev: _Dev, nbytes: int, count: int = 2) -> None:
        self.q: queue.Queue[torch.Tensor] = queue.Queue()
        pin = nbytes <= MAX_PINNED_OUT
        for _ in range(count):
            self.q.put(dev.host(nbytes, pin=pin))

    def take(self) -> torch.Tensor:
        return self.q.get()

    def give(self, raw: torch.Tensor) -> None:
        self.q.put(raw)


class _Writer(WriteThread):
    """Writes finished units in plan order on its own thread, after their D2H event completes.

    Units run in the order of their first tensor, so a batch that took small tensors from after a large
    unit (``LOOKAHEAD``) delivers them early: those are copied out of the pooled buffer (which goes back
    to the pool at once: holding it could starve the engine of its two host buffers) and written when
    their plan position comes."""

    thread_name = "fastmerge-gpu-write"
    order: dict[str, int] | None = None  # tensor name -> plan position (set before the first put)

    def _run(self) -> None:
        nxt = 0
        held: dict[int, tuple[str, Any, int]] = {}
        while True:
            item = self.q.get()
            if item is None:
                return
            event, views, raw, k = item
            try:
                if self.error is None:
                    if event is not None:
                        event.synchronize()
                    for name, view in views:
                        i = self.order[name] if self.order is not None else nxt
                        if i != nxt:
                            held[i] = (name, view.clone(), k)
                            continue
                        self._write(name, view, k)
                        nxt += 1
                        while nxt in held:
                            self._write(*held.pop(nxt))
                            nxt += 1
            except BaseException as e:
                self.error = e
            finally:
                if raw is not None and self.pool is not None:
                    self.pool.give(raw)

    def _write(self, name: str, view: Any, k: int) -> None:
        if self.check is not None:
            self.check(name, view)  # engine.finite: inf/NaN the merge made, warned once
        self.writers[k].write(name, view)


class _Engine:
    def __init__(self, plan: MergePlan, dev: _Dev, budget: _Budget, writer: Session, pool: _HostPool) -> None:
        self.plan, self.dev, self.budget, self.writer, self.pool = plan, dev, budget, writer, pool
        caps = (budget.cap, budget.cap1)
        self.caps = caps
        # + ALIGN per row: a unit of up to cap elements padded to the aligned layout (``_layout``)
        self.din = [torch.empty((c + ALIGN) * budget.rows * budget.ein, dtype=torch.uint8, device=dev.device) for c in caps]
        self.dout = [torch.empty((c + ALIGN) * budget.eout, dtype=torch.uint8, device=dev.device) for c in caps]
        stage = min(STAGE_BYTES, max(caps[0] * budget.rows * budget.ein, 1))
        self.stage = [dev.host(stage) for _ in range(2)]
        self.stage_done: list[Any] = [None, None]  # H2D copy out of staging buffer k finished
        self.last_h2d: Any = None
        self.slot_free: list[Any] = [None, None]  # compute that read input slot j finished
        self.out_free: list[Any] = [None, None]  # D2H out of output slot j finished
        self.k = 0  # next staging buffer
        self.j = 0  # next slot when both fit
        self.resident: list[Any] = [None, None]  # what input slot j holds: a chunk's tag, or None
        self.timers: list[tuple[Any, Any]] = []

    def slot_for(self, n: int, tag: Any = None) -> int:
        """The input/output slot of a unit of ``n`` elements per row: the slot still holding ``tag`` (a
        row chunk read again by the next pass), else alternate when it fits both."""
        if tag is not None and tag in self.resident:
            return self.resident.index(tag)
        if n > self.caps[1]:
            return 0
        j = self.j
        self.j ^= 1
        return j

    # -- upload: pack a unit's rows into staging pieces and copy them into an input slot ---------------
    def upload(self, j: int, pieces: list[tuple[int, int, torch.Tensor, int, int]], R: int, N: int,
               dtype: torch.dtype, tag: Any = None) -> torch.Tensor:
        """``pieces``: (row, offset in row, flat source, first, count): source[first:first+count] goes to
        rows[row, offset:offset+count]. Returns slot j as [R, N] of ``dtype`` (filled once the H2D
        copies recorded here complete; ``compute`` waits for them). ``tag``: names the data (a row chunk);
        if slot j still holds it, nothing is copied (a chunk is read again by every pass)."""
        es = _elem(dtype)
        flat_dev = self.din[j][: R * N * es]
        if tag is not None and self.resident[j] == tag:
            return flat_dev.view(dtype).view(R, N)
        self.resident[j] = tag
        cap = self.stage[0].numel() // es
        self.dev.wait("h2d", self.slot_free[j])  # the slot's previous unit has been merged
        buf: tuple[int, torch.Tensor] | None = None
        fill = pos = 0
        for row, off, src, first, count in sorted(pieces, key=lambda p: p[0] * N + p[1]):
            dst = row * N + off
            if hasattr(src, "write"):  # FP8 bytes (kernels.fp8.Fp8Piece): uploaded as they are, dequantised there
                if buf is not None:  # the staging buffers carry the FP8 bytes too: send what is staged first
                    self._flush(buf, flat_dev, pos, fill, es)
                    buf = None
                with self.dev.stream("h2d"):
                    src.write(flat_dev.view(dtype)[dst:dst + count], first, count, upload=self._bytes_to_device)
                    self.last_h2d = self.dev.record("h2d")
                continue
            done = 0
            while done < count:
                if buf is not None and (dst + done != pos + fill or fill == cap):
                    self._flush(buf, flat_dev, pos, fill, es)
                    buf = None
                if buf is None:
                    buf, fill, pos = self._stage_take(), 0, dst + done
                n = min(count - done, cap - fill)
                # the read: mmap'd input pages → pinned staging (with the cast, if staging is wider)
                buf[1][fill * es:(fill + n) * es].view(dtype).copy_(src[first + done:first + done + n])
                fill += n
                done += n
        if buf is not None and fill:
            self._flush(buf, flat_dev, pos, fill, es)
        return flat_dev.view(dtype).view(R, N)

    def _bytes_to_device(self, src: torch.Tensor) -> torch.Tensor:
        """``src`` (host bytes, flat uint8: a mapped FP8 range) on the device, through the pinned staging
        buffers with asynchronous copies on the H2D stream, as every other input crosses: a ``.to(device)`` of
        mapped (pageable) memory would block this thread until the copy lands, stalling the next unit's reads."""
        n = src.numel()
        out = torch.empty(n, dtype=torch.uint8, device=self.dev.device)
        cap = self.stage[0].numel()
        done = 0
        while done < n:
            k, host = self._stage_take()
            m = min(n - done, cap)
            host[:m].copy_(src[done:done + m])
            with self.dev.stream("h2d"):
                out[done:done + m].copy_(host[:m], non_blocking=True)
                self.stage_done[k] = self.last_h2d = self.dev.record("h2d")
            done += m
        return out

    def _stage_take(self) -> tuple[int, torch.Tensor]:
        k = self.k
        self.k ^= 1
        if self.stage_done[k] is not None:
            self.stage_done[k].synchronize()  # its previous H2D copy has finished: it may be refilled
        return k, self.stage[k]

    def _flush(self, buf: tuple[int, torch.Tensor], flat_dev: torch.Tensor, pos: int, n: int, es: int) -> None:
        k, host = buf
        with self.dev.stream("h2d"):
            flat_dev[pos * es:(pos + n) * es].copy_(host[: n * es], non_blocking=True)
            self.stage_done[k] = self.last_h2d = self.dev.record("h2d")

    # -- compute / download ---------------------------------------------------------------------------
    def compute(self, j: int | None, fn: Any) -> Any:
        """Run ``fn`` on the compute stream after every upload so far (the H2D stream is in order);
        ``j``: the input slot it reads (freed when it completes)."""
        self.dev.wait("comp", self.last_h2d)
        t0 = self.dev.record("comp", timing=True)
        with self.dev.stream("comp"):
            res = fn()
        t1 = self.dev.record("comp", timing=True)
        self.timers.append((t0, t1))
        if j is not None:
            self.slot_free[j] = t1
        return res

    def out_slot(self, j: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        self.dev.wait("comp", self.out_free[j])  # its previous D2H copy has finished
        return self.dout[j][: n * _elem(dtype)].view(dtype)

    def download(self, j: int, dev_out: torch.Tensor, host: torch.Tensor) -> Any:
        """D2H of ``dev_out`` (output slot j) into ``host`` after the compute; returns its event."""
        self.dev.wait("d2h", self.slot_free[j])
        with self.dev.stream("d2h"):
            host.copy_(dev_out, non_blocking=True)
            ev = self.dev.record("d2h")
        self.out_free[j] = ev
        return ev

    def gpu_seconds(self) -> float:
        """Time the compute stream was busy (the kernels' share of the wall time)."""
        if not self.dev.cuda:
            return 0.0
        torch.cuda.synchronize(self.dev.device)
        return sum(a.elapsed_time(b) for a, b in self.timers) / 1e3


def execute_cuda(plan: MergePlan, out: str | Path, max_gpu_memory: int | None = None, *, device: str = "cuda") -> GpuMergeReport:
    """Run ``plan`` on the GPU and write the merged model to ``out`` (atomically: all or nothing).

    ``max_gpu_memory``: bytes of device memory the merge may use (default: enough for the largest
    tensor group whole, at most 90 % of the free memory); smaller budgets merge large tensors in row
    chunks. ``device``: a CUDA device ("cuda", "cuda:1"); "cpu" runs the same pipeline synchronously
    on the CPU with the kernels interpreted (``TRITON_INTERPRET=1``; tests only)."""
    dev_name = device
    if torch.device(dev_name).type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("--device cuda: torch sees no usable CUDA device")
    if torch.device(dev_name).type == "cpu":
        if not interpreting():
            raise BackendUnavailableError("execute_cuda(device='cpu') needs TRITON_INTERPRET=1 (the kernels are interpreted)")
    out = Path(out)
    t0 = time.perf_counter()
    with torch_threads(plan.options.threads):
        return _execute(plan, out, t0, dev_name, max_gpu_memory)


def _execute(plan: MergePlan, out: Path, t0: float, dev_name: str, max_gpu_memory: int | None) -> GpuMergeReport:
    dev = _Dev(dev_name)
    if dev.cuda:
        torch.cuda.reset_peak_memory_stats(dev.device)
    budget = _Budget(plan, max_gpu_memory, dev)
    units = _plan_units(plan, budget)
    counts: dict[str, int] = {}
    largest = max((t.in_bytes for t in plan.tensors), default=0)
    batch_in = max((sum(plan.tensors[i].in_bytes for i in u.tensors) for u in units), default=0)
    out_bytes = max((_layout([_numel(plan.tensors[i].shape) for i in u.tensors])[1] * _elem(plan.tensors[u.tensors[0]].out_dtype)
                     if u.kind in ("batch", "cuda") else plan.tensors[u.tensors[0]].out_tensor.nbytes for u in units), default=1)
    # read-ahead of two whole units: the next one uploads while this one merges
    with Session(plan, out, reader=ModelReader, pool=lambda: _HostPool(dev, out_bytes),
                 read_ahead_bytes=read_ahead_bytes(max(largest, batch_in), 2), desc=f"fastmerge {plan.method.name} (gpu)",
                 writer_cls=_Writer, order=[i for u in units for i in u.tensors]) as session:
        session.wthread.order = {tp.name: i for i, tp in enumerate(plan.tensors)}
        wthread, pool, prefetch = session, session.pool, session.prefetch
        engine = _Engine(plan, dev, budget, wthread, pool)
        it = iter(prefetch)
        loaded: dict[int, list[torch.Tensor]] = {}
        for u in units:
            while any(i not in loaded for i in u.tensors):
                i, tensors = next(it)
                loaded[i] = tensors
            if u.kind == "torch":
                _run_torch(plan, u, loaded, engine, wthread, pool)
                counts["torch"] = counts.get("torch", 0) + 1
            elif u.kind in ("batch", "cuda"):
                _run_batch(plan, u, loaded, engine, wthread, pool)
                kind = "triton" if u.kind == "batch" else "cuda"
                counts[kind] = counts.get(kind, 0) + len(u.tensors)
            else:
                _run_chunked(plan, u, loaded, engine, wthread, pool)
                counts["triton"] = counts.get("triton", 0) + 1
            for i in u.tensors:
                del loaded[i]
                prefetch.release(i)
            session.advance(sum(plan.tensors[i].in_bytes for i in u.tensors))
    gpu_peak = torch.cuda.max_memory_allocated(dev.device) / 2**20 if dev.cuda else 0.0
    return GpuMergeReport(
        out_dir=str(out), tensors=len(plan.tensors), bytes_read=plan.in_bytes, bytes_written=session.bytes_written,
        wall_s=time.perf_counter() - t0, merge_s=engine.gpu_seconds(), peak_rss_mb=peak_rss_mb(),
        backends=counts, gpu_peak_mb=gpu_peak, gpu_budget_mb=budget.bytes / 2**20, units=len(units),
        chunked_tensors=sum(u.kind == "chunked" for u in units), engine="gpu",
    )


# ------------------------------------------------------------------------------------------------
# the three unit kinds


def _split(tp: TensorPlan, tensors: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    base = tensors[0] if tp.base is not None else None
    return base, (tensors[1:] if tp.base is not None else tensors)


def _stage_dtype(tp: TensorPlan) -> torch.dtype:
    return tb.stage_dtype(_in_dtypes(tp))


def _make_kernel(plan: MergePlan, tps: list[TensorPlan], device: torch.device) -> Any:
    ds = _in_dtypes(tps[0])
    based = ds[0] if tps[0].base is not None else None
    srcd = ds[1:] if tps[0].base is not None else ds
    return tb.make_kernel(plan.method, [t.params for t in tps], [t.shape for t in tps], device, srcd, based)


def _gap_pieces(starts: list[int], numels: list[int], N: int, R: int, dtype: torch.dtype) -> list:
    """Zero pieces for the alignment gaps of every row: the staging buffer then fills contiguously, so a
    batch still goes over in few large copies (kernels never read the gaps)."""
    ends = [a + n for a, n in zip(starts, numels)]
    nexts = starts[1:] + [N]
    zeros = torch.zeros(ALIGN, dtype=dtype)
    return [(r, e, zeros, 0, b - e) for r in range(R) for e, b in zip(ends, nexts) if b > e]


def _prepare_tables(kernel: Any, launches: list) -> None:
    """The plan's and its launches' device tables in one asynchronous copy (``GtaKernel.prepare``). The
    Gram-matrix plans (slerp, model_stock) have no ``prepare``: they bring their small tables over (and
    the Gram matrix back) themselves."""
    prepare = getattr(kernel, "prepare", None)
    if prepare is not None:
        prepare(launches)


def _out_views(tps: list[TensorPlan], host: torch.Tensor, starts: list[int]) -> list[tuple[str, torch.Tensor]]:
    """Each tensor's output in the downloaded packed row (segment s at element ``starts[s]``)."""
    views = []
    for tp, a in zip(tps, starts):
        dt = torch_dtype(tp.out_dtype)
        es = _elem(dt)
        views.append((tp.name, host[a * es:(a + _numel(tp.shape)) * es].view(dt).view(tp.shape)))
    return views


def _compat_out(plan: MergePlan, tp: TensorPlan) -> torch.dtype | None:
    """mergekit_compat on a kernel that emulates it (``TritonKernel.compat``: linear; the plan sends no other
    compat tensor to Triton): the kernel rounds to the compute dtype, then the engine to the output's."""
    if plan.options.mergekit_compat and tp.compute_dtype:
        cd = torch_dtype(tp.compute_dtype)
        return cd if cd != torch_dtype(tp.out_dtype) else None
    return None


def _run_batch(plan, u: _Unit, loaded, engine: _Engine, wthread: Session, pool: _HostPool) -> None:
    from fastmerge.kernels._common import Segments

    tps = [plan.tensors[i] for i in u.tensors]
    tp0 = tps[0]
    has_base = tp0.base is not None
    R = _rows(tp0)
    sd = _stage_dtype(tp0)
    numels = [_numel(t.shape) for t in tps]
    starts, N = _layout(numels)  # 64-aligned segment starts and row stride
    pieces = []
    for s, i in enumerate(u.tensors):
        for r, t in enumerate(_prepare(plan, tps[s], loaded[i])):
            pieces.append((r, starts[s], t.reshape(-1), 0, numels[s]))
    pieces += _gap_pieces(starts, numels, N, R, sd)
    j = engine.slot_for(N)
    rows = engine.upload(j, pieces, R, N, sd)
    odt = torch_dtype(tp0.out_dtype)
    segs = Segments(tuple(starts), tuple(numels), (0,) * len(numels), tuple(tuple(t.shape) for t in tps))
    cdt = _compat_out(plan, tp0)
    dev_out = engine.out_slot(j, N, odt)

    def work() -> None:
        base = rows[0]  # base-less methods (linear) get a dummy
        x = rows[1:] if has_base else rows
        if u.kind == "cuda":  # one tensor; asynchronous (ties.cu decides its thresholds on the device)
            n = numels[0]
            cb.run_into(_kernel_job(plan, tp0), dev_out[:n], [r[:n] for r in x], base[:n])
            return
        kernel = _make_kernel(plan, tps, engine.dev.device)
        _prepare_tables(kernel, [(segs, None)])
        for p in range(kernel.n_passes):
            kernel.data_pass(p, x, base, segs)
            kernel.end_pass(p)
        if cdt is None:
            kernel.merge(x, base, dev_out, segs)
        else:
            tmp = torch.empty(N, dtype=cdt, device=engine.dev.device)
            kernel.merge(x, base, tmp, segs)
            dev_out.copy_(tmp)

    engine.compute(j, work)
    host = pool.take()
    nb = N * _elem(odt)
    ev = engine.download(j, dev_out, host[:nb].view(odt))
    wthread.put_many(_out_views(tps, host, starts), host, event=ev)


def _run_chunked(plan, u: _Unit, loaded, engine: _Engine, wthread: Session, pool: _HostPool) -> None:
    from fastmerge.kernels._common import Segments

    i = u.tensors[0]
    tp = plan.tensors[i]
    has_base = tp.base is not None
    R = _rows(tp)
    sd = _stage_dtype(tp)
    flat = [t.reshape(-1) for t in _prepare(plan, tp, loaded[i])]
    row = _numel(tp.shape[1:]) if len(tp.shape) > 1 else 1
    odt = torch_dtype(tp.out_dtype)
    cdt = _compat_out(plan, tp)

    def segs_of(c0: int, n: int) -> Segments:
        shape = ((n // row,) + tuple(tp.shape[1:])) if len(tp.shape) > 1 else (n,)
        return Segments.packed([n], idx0=[c0], shapes=[shape])

    def make() -> Any:
        # on the compute stream: the tables' asynchronous copy is ordered before the kernels that read them
        k = _make_kernel(plan, [tp], engine.dev.device)
        _prepare_tables(k, [(segs_of(c0, n), [0]) for c0, n in u.chunks])  # every chunk's tables: one copy
        return k

    kernel = engine.compute(None, make)

    # two chunks sized to the slots (``_plan_units``) live in slot 0 and slot 1 for the whole tensor;
    # otherwise a chunk that fits slot 1 alternates, a larger one takes slot 0
    pinned = len(u.chunks) == 2 and u.chunks[0][1] <= engine.caps[0] and u.chunks[1][1] <= engine.caps[1]

    def chunk(c: int) -> tuple[int, torch.Tensor, Segments]:
        c0, n = u.chunks[c]
        tag = (i, c0, n)
        j = c if pinned else engine.slot_for(n, tag)
        Np = _layout([n])[1]  # 64-aligned row stride
        pieces = [(r, 0, f, c0, n) for r, f in enumerate(flat)] + _gap_pieces([0], [n], Np, R, sd)
        rows = engine.upload(j, pieces, R, Np, sd, tag=tag)
        return j, rows, segs_of(c0, n)

    order = list(range(len(u.chunks)))
    for p in range(kernel.n_passes):
        # the selection's histograms do not depend on the chunks' order: every other pass runs backwards,
        # so it starts with the chunk the previous pass ended with (still in its slot: not copied again);
        # the other passes (L1 norms with exact-k ranks, the merge) visit the chunks in element order
        free = getattr(kernel, "order_free", None)
        order = order[::-1] if free is not None and free(p) else list(range(len(u.chunks)))
        for c in order:
            j, rows, segs = chunk(c)
            x = rows[1:] if has_base else rows
            engine.compute(j, lambda x=x, rows=rows, segs=segs: kernel.data_pass(p, x, rows[0], segs, groups=[0]))
        engine.compute(None, lambda: kernel.end_pass(p))
    host = pool.take()
    hv = host[: tp.out_tensor.nbytes].view(odt)
    ev = None
    for c, (c0, n) in enumerate(u.chunks):
        j, rows, segs = chunk(c)
        x = rows[1:] if has_base else rows
        dev_out = engine.out_slot(j, n, odt)

        def work(x=x, rows=rows, segs=segs, dev_out=dev_out, n=n) -> None:
            if cdt is None:
                kernel.merge(x, rows[0], dev_out, segs, groups=[0])
            else:
                tmp = torch.empty(n, dtype=cdt, device=engine.dev.device)
                kernel.merge(x, rows[0], tmp, segs, groups=[0])
                dev_out.copy_(tmp)

        engine.compute(j, work)
        ev = engine.download(j, dev_out, hv[c0:c0 + n])
    wthread.put_many([(tp.name, hv.view(tp.shape))], host, event=ev if ev is not None else _NullEvent())


def _run_torch(plan, u: _Unit, loaded, engine: _Engine, wthread: Session, pool: _HostPool) -> None:
    i = u.tensors[0]
    tp = plan.tensors[i]
    tensors = loaded[i]
    if tp.compute_dtype and getattr(tp, "input_transform", None) is None:
        cd = torch_dtype(tp.compute_dtype)
        tensors = [x.to(cd) for x in tensors]
    base, inputs = _split(tp, _prepare(plan, tp, tensors, fp8_on_device=False))
    odt = torch_dtype(tp.out_dtype)
    host = pool.take()
    view = host[: tp.out_tensor.nbytes].view(odt).view(tp.shape)
    job = _kernel_job(plan, tp)
    # the reference's temporaries are ~4 fp32 copies per input: past the budget, it runs on the CPU
    on_dev = engine.dev.cuda and tp.in_bytes * 8 <= engine.budget.bytes
    backends.BACKENDS["torch"].run(job, view, inputs, base, plan.options.threads, device=str(engine.dev.device) if on_dev else "cpu")
    wthread.put_many([(tp.name, view)], host, event=_NullEvent())
