"""``fastmerge extract-lora``: a fine-tune's task vector as a PEFT LoRA adapter, mergekit-extract-lora's
command line and output, streamed tensor by tensor with the batched block Krylov SVD, in numpy: the default
``--svd krylov`` never imports torch (1.9 s of start-up, as long as the whole extraction of the 168M
benchmark family takes without it).

What is extracted (mergekit 0.1.5's ``scripts/extract_lora.py`` rules, on tensor names instead of
transformers modules, so no model class is instantiated): a module is a tensor name without its last
component (``model.layers.0.self_attn.q_proj``); its ``weight`` and ``bias`` travel together.

1. Without ``--embed-lora``, input and output embeddings (``fastmerge.vocab``'s names) go to
   ``modules_to_save`` unless an ``--exclude-regex`` matches them; so do they when the vocabularies of
   the two models differ.
2. A module in ``modules_to_save`` (``--save-module``, by full name or last component) is saved at full
   rank: the fine-tune's tensors under ``base_model.model.<name>``.
3. Else, when the include/exclude regexes (``re.search`` on the module name) let it through: a 2-D
   weight is factored, Δ = W_ft − W_base ≈ B·A at rank ``min(--max-rank, #σ > --sv-epsilon)`` (at least
   1), A = √S·Vᵀ, B = U·√S (``--no-distribute-scale``: A = S·Vᵀ, B = U); input embeddings are factored
   transposed (``lora_embedding_A/B``, PEFT's Embedding layout). A bias of a factored module is saved as
   ``lora_B.bias`` = Δbias with ``lora_bias: true`` (mergekit writes the key without the flag, which
   PEFT then ignores). Anything else (norms, 3-D tensors) is saved at full rank and its last component
   added to ``modules_to_save``, unless ``--skip-undecomposable``.

``adapter_config.json`` is mergekit's: ``r`` = the largest rank written, ``lora_alpha = r`` (scale 1),
``rank_pattern`` = ``alpha_pattern`` = every module whose rank differs, ``target_modules`` the last
components of the factored modules (full names for a component some module of which was not factored, so
PEFT wraps exactly the factored ones).

SVD: ``svd="krylov"`` (default) runs ``ops.krylov_svd`` on numpy arrays (block Krylov, l = k/2 columns per
block, 4 iterations: 10 products of 64 columns with each task vector at k = 128) batched over same-shape task vectors
(the layers' q_proj together, ...); on the 168M benchmark family's full-rank noise deltas, the worst case for
a sketch, every module is within 1.011x of the optimal error (bench/RESULTS.md). ``svd="randomized"``:
``ops.randomized_svd`` (subspace iteration, l = k + ``oversample`` (default max(10, k)) columns,
``power_iters`` (2) power iterations: 12 products of 256 columns, within 1.008x). Both fall back to the exact
SVD where a sketch would not be cheaper (Krylov space or sketch ≥ min(m, n)/2). ``svd="exact"``:
``torch.linalg.svd`` as mergekit. The randomized and exact SVDs run in torch (imported for them only), on the
same numpy task vectors (``torch.from_numpy``: no copy).

Parallelism: each group of same-shape task vectors is cut into equal batches of at most ``batch_bytes`` of
fp32, largest batches first, factored by ``threads`` worker threads at once, each with one BLAS thread (numpy
and torch release the GIL): on the busy 2-core machine two OpenBLAS threads per product ran a
2816×1024·1024×64 product at 40 GFLOP/s and one thread at 73, and the OpenMP barriers of torch's two threads
cost more than they gave, busy or not (bench/RESULTS.md). OpenBLAS is held to one thread by the command line
(``OPENBLAS_NUM_THREADS=1`` before numpy loads) or else by ``threadpoolctl`` where it is installed; torch by
``set_num_threads(1)``. Reading and writing are numpy's (``st_numpy``): inputs mapped read-only, the full
tensors (``modules_to_save``) copied byte for byte from the input files by the kernel (``copy_file_range``)
while the first batches run, then each batch's factors in order, in the promoted dtype of the two inputs
(bf16 rounded as torch rounds), into a temporary folder beside ``out_path``, renamed into place at the end.
A task vector holding NaN or inf gets NaN factors and a warning naming it (the others are unaffected).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import os
import re
import struct
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from .._lazy import torch
from ..errors import CheckpointError, ConfigError, OutputError
from ..io.index import ST_DTYPES, CheckpointIndex, TensorInfo
from ..io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX
from ..io.outdir import staged
from ..vocab import is_vocab_tensor

#: input embeddings (nn.Embedding in transformers): factored transposed, as PEFT's LoRA Embedding layer
INPUT_EMBED_RE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|shared)\.weight$"
                            r"|^backbone\.embeddings\.weight$")
ST_NAME = {v: k for k, v in ST_DTYPES.items()}  # dtype name -> safetensors' (full tensors are copied as they are)
FACTORED_DTYPES = ("float32", "float16", "bfloat16")
SVD_KINDS = ("krylov", "randomized", "exact")


@dataclasses.dataclass
class ExtractReport:
    out_path: str
    factored: int  # modules written as LoRA factors
    saved: int  # tensors saved at full rank (modules_to_save)
    max_rank: int  # r of adapter_config.json
    svd: str  # "randomized" | "exact" | "randomized+exact" (small matrices fall back)
    wall_s: float
    svd_s: float  # summed over the worker threads
    ranks: dict[str, int]
    threads: int = 1

    def summary(self) -> str:
        return (f"extracted {self.factored} LoRA modules (r = {self.max_rank}, {self.svd} SVD) and {self.saved} "
                f"full tensors -> {self.out_path} in {self.wall_s:.2f} s ({self.svd_s:.2f} s in SVD on {self.threads} threads)")


@dataclasses.dataclass
class _Lora:
    module: str
    weight: TensorInfo  # the fine-tune's
    base: TensorInfo
    transpose: bool
    bias: tuple[TensorInfo, TensorInfo] | None = None  # (fine-tune, base)


class _SafetensorsStream:
    """Tensors appended one by one to a safetensors file whose header is written last, into room reserved in
    front of the data for the longest header the announced tensors could need (every number at 20 digits,
    padded with spaces as the format allows): no second pass over the data (copying a data file behind its
    header at the end was the 168M family's last serial step, 160 MB)."""

    def __init__(self, path: Path, names: Sequence[tuple[str, int]]):
        """``names``: every tensor that may be added, with its number of dimensions."""
        big = 10 ** 19
        most = {"__metadata__": {"format": "pt"}, **{n: {"dtype": "BF16", "shape": [big] * nd, "data_offsets": [big, big]}
                                                    for n, nd in names}}
        self.room = len(json.dumps(most, separators=(",", ":")).encode()) + 8
        self.room += -self.room % 8
        self.path = path
        self.data = open(path, "wb", buffering=0)  # unbuffered: copy_file_range writes at its fd's position
        self.data.seek(8 + self.room)
        self.header: dict[str, Any] = {}
        self.pos = 0

    def add(self, name: str, x: Any, dtype: str) -> None:
        """``x``: a numpy array of ``dtype``'s values (bf16: its uint16 bits, ``st_numpy.from_f32``)."""
        from .st_numpy import as_bytes

        self._entry(name, dtype, x.shape, x.nbytes)
        _write_all(self.data, as_bytes(x))

    def add_copy(self, name: str, info: TensorInfo) -> None:
        """Tensor ``info`` as it is in its file, copied by the kernel where it can."""
        self._entry(name, info.dtype, info.shape, info.nbytes)
        with open(info.file, "rb") as src:
            src.seek(info.begin)
            _append(src, self.data, info.nbytes)

    def _entry(self, name: str, dtype: str, shape: Sequence[int], nbytes: int) -> None:
        self.header[name] = {"dtype": ST_NAME[dtype], "shape": list(shape), "data_offsets": [self.pos, self.pos + nbytes]}
        self.pos += nbytes

    def close(self) -> None:
        head = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        if len(head) > self.room:
            raise AssertionError(f"{self.path}: header of {len(head)} bytes in {self.room} reserved")  # names not announced
        self.data.seek(0)
        _write_all(self.data, memoryview(struct.pack("<Q", self.room) + head + b" " * (self.room - len(head))))
        self.data.close()


def _write_all(f: Any, view: memoryview) -> None:
    """All of ``view`` to the unbuffered file ``f`` (a raw write may take part of it)."""
    while view:
        view = view[f.write(view):]


def _append(src: Any, dst: Any, nbytes: int) -> None:
    """Copy ``nbytes`` of ``src`` to ``dst`` from their file positions, in the kernel (copy_file_range: no pass
    through Python's buffers) where the OS and file system allow it, else through a 16 MB buffer."""
    done, start = 0, src.tell()
    if hasattr(os, "copy_file_range"):
        try:
            while done < nbytes:
                n = os.copy_file_range(src.fileno(), dst.fileno(), nbytes - done)
                if n == 0:
                    break
                done += n
        except OSError:
            if done:
                raise
    src.seek(start + done)
    while done < nbytes:
        chunk = src.read(min(16 << 20, nbytes - done))
        if not chunk:
            raise CheckpointError(f"{src.name}: file ended {nbytes - done} bytes early")
        _write_all(dst, memoryview(chunk))
        done += len(chunk)


def _factor(deltas: Any, k: int, svd: str, power_iters: int, seed: int, oversample: int | None = None,
            krylov_block: int | None = None, krylov_iters: int = 4) -> tuple[Any, Any, Any, str]:
    """Top-k SVD of a numpy batch (B, m, n): U (B, m, k), S (B, k), V (B, n, k) as numpy arrays, and which SVD
    ran. Krylov in numpy; the randomized and exact SVDs in torch, on the same memory."""
    from ..ops.krylov_svd import krylov_svd

    r = min(deltas.shape[-2:])
    k = min(k, r)
    if svd == "krylov":
        return krylov_svd(deltas, k, block=krylov_block, iters=krylov_iters, seed=seed)
    from ..ops.randomized_svd import EXACT_ABOVE, auto_oversample, randomized_svd

    d = torch.from_numpy(deltas)
    if svd == "exact" or k + auto_oversample(k, oversample) >= EXACT_ABOVE * r:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        return u[..., :k].numpy(), s[..., :k].numpy(), vh[..., :k, :].mT.numpy(), "exact"
    u, s, v = randomized_svd(d, k, oversample=oversample, power_iters=power_iters, seed=seed)
    return u.numpy(), s.numpy(), v.numpy(), "randomized"


@contextlib.contextmanager
def _one_blas_thread(torch_too: bool):
    """One BLAS thread per worker while extracting (module docstring), restored after: OpenBLAS through
    threadpoolctl where it is installed (else numpy's BLAS keeps its threads), torch's intra-op threads when
    the torch SVDs run."""
    with contextlib.ExitStack() as stack:
        try:
            if os.environ.get("OPENBLAS_NUM_THREADS") != "1":  # the command line's setting (lora.cli)
                from threadpoolctl import threadpool_limits

                stack.enter_context(threadpool_limits(1, user_api="blas"))
        except ImportError:
            pass
        if torch_too:
            saved = torch.get_num_threads()
            torch.set_num_threads(1)
            stack.callback(torch.set_num_threads, saved)
        yield


def extract_lora(
    model: str | Path, base_model: str | Path, out_path: str | Path, *, max_rank: int = 128, sv_epsilon: float = 0.0,
    embed_lora: bool = False, save_modules: Sequence[str] = (), include_regexes: Sequence[str] = (),
    exclude_regexes: Sequence[str] = (), skip_undecomposable: bool = False, distribute_scale: bool = True,
    svd: str = "krylov", power_iters: int = 2, oversample: int | None = None, krylov_block: int | None = None,
    krylov_iters: int = 4, seed: int = 0, threads: int = 0, batch_bytes: int = 64 << 20, overwrite: bool = False,
) -> ExtractReport:
    """Extract ``model − base_model`` as a PEFT LoRA adapter into ``out_path`` (see the module docstring)."""
    t0 = time.perf_counter()
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ConfigError(f"--max-rank: expected a positive integer, got {max_rank!r}")
    if svd not in SVD_KINDS:
        raise ConfigError(f"--svd: expected one of {', '.join(SVD_KINDS)}, got {svd!r}")
    if krylov_iters < 0 or (krylov_block is not None and krylov_block < 1) or power_iters < 0 or threads < 0:
        raise ConfigError(f"--krylov-iters {krylov_iters}, --krylov-block {krylov_block}, --power-iters {power_iters}, "
                          f"--threads {threads}: expected counts >= 0 (block >= 1)")
    if sv_epsilon < 0:
        raise ConfigError(f"--sv-epsilon: expected >= 0, got {sv_epsilon}")
    for r in [*include_regexes, *exclude_regexes]:
        try:
            re.compile(r)
        except re.error as e:
            raise ConfigError(f"--include-regex/--exclude-regex: '{r}' is not a regular expression ({e})") from None
    ft, base = CheckpointIndex.open(model), CheckpointIndex.open(base_model)
    out = Path(out_path)
    for root in (ft.root, base.root):
        if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
            raise OutputError(f"{out}: output is inside input model folder {root} (inputs are never written)")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise OutputError(f"{out}: output exists (pass --overwrite to replace it)")

    modules_to_save = list(save_modules)
    vocab_differs = any(is_vocab_tensor(n) and n in base.tensors and base.tensors[n].shape != t.shape
                        for n, t in ft.tensors.items())
    if vocab_differs:
        embed_lora = False  # as mergekit: embeddings of a resized vocabulary go to modules_to_save

    def should_extract(mod: str) -> bool:
        if include_regexes and not any(re.search(r, mod) for r in include_regexes):
            return False
        return not any(re.search(r, mod) for r in exclude_regexes)

    mods: dict[str, dict[str, TensorInfo]] = {}
    for name, info in ft.tensors.items():
        mod, _, leaf = name.rpartition(".")
        mods.setdefault(mod, {})[leaf] = info
    loras: list[_Lora] = []
    full: list[TensorInfo] = []
    candidates: dict[str, list[str]] = {}  # last component -> 2-D weight modules
    for mod, parts in mods.items():
        w = parts.get("weight")
        last = mod.rpartition(".")[2]
        if w is not None and len(w.shape) == 2:
            candidates.setdefault(last, []).append(mod)
        if (w is not None and not embed_lora and is_vocab_tensor(w.name)
                and not any(re.search(r, mod) for r in exclude_regexes) and last not in modules_to_save):
            modules_to_save.append(last)
        if mod in modules_to_save or last in modules_to_save:
            full += list(parts.values())
        elif should_extract(mod):
            if w is not None and len(w.shape) == 2 and set(parts) <= {"weight", "bias"}:
                bw = base.tensors.get(w.name)
                if bw is None or bw.shape != w.shape:
                    have = "is missing" if bw is None else f"has shape {list(bw.shape)}"
                    raise CheckpointError(f"{base_model}: tensor '{w.name}' {have}, {model} has {list(w.shape)}")
                bias = None
                if "bias" in parts:
                    bb = base.tensors.get(parts["bias"].name)
                    if bb is None or bb.shape != parts["bias"].shape:
                        raise CheckpointError(f"{base_model}: tensor '{parts['bias'].name}' is missing or has another shape")
                    bias = (parts["bias"], bb)
                for info in (w, bw, *(bias or ())):
                    if info.dtype not in FACTORED_DTYPES:
                        raise CheckpointError(f"{info.file}: tensor '{info.name}' is {info.dtype}; extract-lora factors "
                                              f"{', '.join(FACTORED_DTYPES)} tensors (exclude the module with -e)")
                loras.append(_Lora(mod, w, bw, INPUT_EMBED_RE.search(w.name) is not None, bias))
            elif not skip_undecomposable:
                full += list(parts.values())
                if last not in modules_to_save:
                    modules_to_save.append(last)

    import numpy as np

    from .st_numpy import Reader, from_f32, promote

    reader = Reader()  # both models' files, mapped read-only; shared by the worker threads
    local = threading.local()

    def scratch(count: int) -> Any:
        """The worker's fp32 batch buffer, reused: a fresh one per batch is new memory that the kernel zeroes
        on first touch (400 MB over the 168M family's batches; page zeroing was 6-11 % of its CPU time)."""
        buf = getattr(local, "buf", None)
        if buf is None or buf.size < count:
            buf = local.buf = np.empty(count, dtype=np.float32)
        return buf

    def factor_batch(batch: list[_Lora], transpose: bool, m: int, n: int) -> tuple[list[tuple[str, Any, str]], dict[str, int], str, float]:
        """One batch on a worker thread: Δ in fp32, its SVD, the factors in the output dtype."""
        d = scratch(len(batch) * m * n)[: len(batch) * m * n].reshape(len(batch), m, n)
        base_f32 = np.empty(batch[0].base.shape, dtype=np.float32)
        for i, lo in enumerate(batch):
            di = d[i].T if transpose else d[i]
            reader.f32_into(lo.weight, di)  # widened once into the batch, then the fp32 subtraction in place
            reader.f32_into(lo.base, base_f32)
            np.subtract(di, base_f32, out=di)
        del base_f32
        ts = time.perf_counter()
        u, s, v, kind = _factor(d, max_rank, svd, power_iters, seed, oversample, krylov_block, krylov_iters)
        took = time.perf_counter() - ts
        del d
        tensors: list[tuple[str, Any, str]] = []
        rk: dict[str, int] = {}
        for i, lo in enumerate(batch):
            k = s.shape[-1]
            if not np.isfinite(s[i]).all():
                warnings.warn(f"{lo.weight.name}: {model} minus {base_model} holds NaN or inf; its LoRA factors are NaN",
                              stacklevel=1)
            if sv_epsilon > 0:
                k = max(1, min(k, int((s[i] > sv_epsilon).sum())))
            sq = np.sqrt(s[i, :k]) if distribute_scale else s[i, :k]
            a = (v[i, :, :k] * sq).T  # (k, n)
            bm = u[i, :, :k] * sq if distribute_scale else u[i, :, :k]  # (m, k)
            dt = promote(lo.weight.dtype, lo.base.dtype)
            names = ("lora_embedding_A", "lora_embedding_B") if transpose else ("lora_A.weight", "lora_B.weight")
            tensors += [(f"{PREFIX}{lo.module}.{names[0]}", from_f32(a, dt), dt),
                        (f"{PREFIX}{lo.module}.{names[1]}", from_f32(bm, dt), dt)]
            if lo.bias is not None:
                db = reader.f32(lo.bias[0]) - reader.f32(lo.bias[1])
                tensors.append((f"{PREFIX}{lo.module}.lora_B.bias", from_f32(db, dt), dt))
            rk[lo.module] = k
        return tensors, rk, kind, took

    ranks: dict[str, int] = {}
    kinds: set[str] = set()
    svd_s = 0.0
    workers = threads or os.cpu_count() or 1
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fastmerge-extract")
    try:
        with _one_blas_thread(torch_too=svd != "krylov"), staged(out) as tmp:
            names = [(PREFIX + info.name, len(info.shape)) for info in full]
            for lo in loras:
                kind = ("lora_embedding_A", "lora_embedding_B") if lo.transpose else ("lora_A.weight", "lora_B.weight")
                names += [(f"{PREFIX}{lo.module}.{kind[0]}", 2), (f"{PREFIX}{lo.module}.{kind[1]}", 2)]
                names += [(f"{PREFIX}{lo.module}.lora_B.bias", 1)] if lo.bias is not None else []
            w = _SafetensorsStream(tmp / ADAPTER_WEIGHTS, names)
            jobs = []
            groups: dict[tuple, list[_Lora]] = {}
            for lo in loras:
                groups.setdefault((lo.weight.shape, lo.transpose), []).append(lo)
            for (shape, transpose), items in groups.items():
                m, n = (shape[1], shape[0]) if transpose else shape
                most = max(1, batch_bytes // (4 * m * n))
                per = -(-len(items) // -(-len(items) // most))  # equal batches: 16 gate/up of 11.5 MB as 4 x 4, not 5+5+5+1
                jobs += [(items[b0:b0 + per], transpose, m, n) for b0 in range(0, len(items), per)]
            # largest batches first: the last to finish are short, so no worker idles long at the end (the 168M
            # family's two batches of sixteen 1024x1024 task vectors came last in file order, 1.3 s each)
            jobs.sort(key=lambda j: len(j[0]) * j[2] * j[3], reverse=True)
            # at most workers + 1 batches in flight (bounded memory); results written in submission order
            pending: collections.deque = collections.deque()
            it = iter(jobs)
            for job in itertools.islice(it, workers + 1):
                pending.append(pool.submit(factor_batch, *job))
            for info in full:  # copied while the first batches run
                w.add_copy(PREFIX + info.name, info)
            while pending:
                tensors, rk, kind, took = pending.popleft().result()
                for job in itertools.islice(it, 1):
                    pending.append(pool.submit(factor_batch, *job))
                for name, t, dt in tensors:
                    w.add(name, t, dt)
                ranks.update(rk)
                kinds.add(kind)
                svd_s += took
            w.close()
            r = max(ranks.values(), default=1)
            factored_last: dict[str, list[str]] = {}
            for mod in ranks:
                factored_last.setdefault(mod.rpartition(".")[2], []).append(mod)
            targets: list[str] = []
            for last, ms in sorted(factored_last.items()):
                targets += [last] if len(ms) == len(candidates.get(last, [])) else sorted(ms)
            different = {mod: k for mod, k in ranks.items() if k != r}
            cfg = {
                "base_model_name_or_path": str(base_model), "peft_type": "LORA", "use_rslora": False,
                "target_modules": targets, "modules_to_save": modules_to_save or None, "task_type": "CAUSAL_LM",
                "r": r, "lora_alpha": r, "rank_pattern": different, "alpha_pattern": dict(different),
                "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True, "bias": "none",
                "lora_bias": any(lo.bias is not None for lo in loras),
            }
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        reader.close()
    kind = "+".join(sorted(kinds, reverse=True)) or svd
    return ExtractReport(str(out), len(ranks), len(full), max(ranks.values(), default=0), kind,
                         time.perf_counter() - t0, svd_s, ranks, workers)
