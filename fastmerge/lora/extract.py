"""``fastmerge extract-lora``: a fine-tune's task vector as a PEFT LoRA adapter, mergekit-extract-lora's
command line and output, streamed tensor by tensor with the batched randomized SVD.

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

SVD: ``svd="krylov"`` (default) runs ``ops.krylov_svd`` (block Krylov, l = k/2 columns per block, 4
iterations: 10 products of 64 columns with each task vector at k = 128) batched over same-shape task vectors
(the layers' q_proj together, ...); on the 168M benchmark family's full-rank noise deltas, the worst case for
a sketch, every module is within 1.011x of the optimal error (bench/RESULTS.md). ``svd="randomized"``:
``ops.randomized_svd`` (subspace iteration, l = k + ``oversample`` (default max(10, k)) columns,
``power_iters`` (2) power iterations: 12 products of 256 columns, within 1.008x). Both fall back to the exact
SVD where a sketch would not be cheaper (Krylov space or sketch ≥ min(m, n)/2). ``svd="exact"``:
``torch.linalg.svd`` as mergekit.

Parallelism: batches of at most ``batch_bytes`` of fp32 task vectors are factored by ``threads`` worker
threads at once, each with one intra-op thread (torch releases the GIL): on the 2-core machine the
OpenMP barriers of two threads per operation cost more than they gave, busy or not (bench/RESULTS.md).
The main thread writes the full tensors while the first batches run, then each batch's factors in order,
in the fine-tune's dtype, into a temporary folder beside ``out_path``, renamed into place at the end.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import json
import os
import re
import shutil
import struct
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from .._lazy import torch
from ..errors import CheckpointError, ConfigError, OutputError
from ..io.index import CheckpointIndex, TensorInfo
from ..io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX
from ..io.outdir import staged
from ..vocab import is_vocab_tensor

#: input embeddings (nn.Embedding in transformers): factored transposed, as PEFT's LoRA Embedding layer
INPUT_EMBED_RE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|shared)\.weight$"
                            r"|^backbone\.embeddings\.weight$")
ST_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
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
    """Tensors appended one by one to a data file; ``close`` writes header + data as one safetensors file."""

    def __init__(self, path: Path):
        self.path = path
        self.data = open(str(path) + ".data", "wb")
        self.header: dict[str, Any] = {}
        self.pos = 0

    def add(self, name: str, t: Any) -> None:
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        dt = str(t.dtype).removeprefix("torch.")
        self.header[name] = {"dtype": ST_DTYPE[dt], "shape": list(t.shape), "data_offsets": [self.pos, self.pos + nbytes]}
        if nbytes:
            self.data.write(t.reshape(-1).view(torch.uint8).numpy().data)  # 1-D: stride 1 even for size-1 dims; no copy
        self.pos += nbytes

    def close(self) -> None:
        self.data.close()
        head = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(self.path, "wb") as f, open(str(self.path) + ".data", "rb") as d:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            f.flush()
            _append(d, f, self.pos)
        os.unlink(str(self.path) + ".data")


def _append(src: Any, dst: Any, nbytes: int) -> None:
    """Copy ``nbytes`` of ``src`` to ``dst`` at their file positions, in the kernel (copy_file_range: no pass
    through Python's buffers) where the OS and file system allow it, else with ``shutil.copyfileobj``."""
    done = 0
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
    if done < nbytes:
        src.seek(done)
        shutil.copyfileobj(src, dst, 16 << 20)


def _factor(deltas: Any, k: int, svd: str, power_iters: int, seed: int, oversample: int | None = None,
            krylov_block: int | None = None, krylov_iters: int = 4) -> tuple[Any, Any, Any, str]:
    """Top-k SVD of a batch (B, m, n): U (B, m, k), S (B, k), V (B, n, k) and which SVD ran."""
    from ..ops.krylov_svd import krylov_svd
    from ..ops.randomized_svd import EXACT_ABOVE, auto_oversample, randomized_svd

    r = min(deltas.shape[-2:])
    k = min(k, r)
    if svd == "krylov":
        return krylov_svd(deltas, k, block=krylov_block, iters=krylov_iters, seed=seed)
    if svd == "exact" or k + auto_oversample(k, oversample) >= EXACT_ABOVE * r:
        u, s, vh = torch.linalg.svd(deltas, full_matrices=False)
        return u[..., :k], s[..., :k], vh[..., :k, :].mT, "exact"
    u, s, v = randomized_svd(deltas, k, oversample=oversample, power_iters=power_iters, seed=seed)
    return u, s, v, "randomized"


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
                loras.append(_Lora(mod, w, bw, INPUT_EMBED_RE.search(w.name) is not None, bias))
            elif not skip_undecomposable:
                full += list(parts.values())
                if last not in modules_to_save:
                    modules_to_save.append(last)

    from ..io.reader import ModelReader

    readers = {"ft": ModelReader(ft), "base": ModelReader(base)}
    read_lock = threading.Lock()  # ModelReader keeps an LRU of open files: one reader call at a time

    def read(which: str, info: TensorInfo) -> Any:
        with read_lock:
            return readers[which].get(info)

    def factor_batch(batch: list[_Lora], transpose: bool, m: int, n: int) -> tuple[list[tuple[str, Any]], dict[str, int], str, float]:
        """One batch on a worker thread: Δ in fp32, its SVD, the factors in the output dtype."""
        d = torch.empty((len(batch), m, n), dtype=torch.float32)
        for i, lo in enumerate(batch):
            x, y = read("ft", lo.weight), read("base", lo.base)
            di = d[i].T if transpose else d[i]
            di.copy_(x)  # bf16 -> fp32 once, then the fp32 subtraction in place (no full-size temporaries)
            di.sub_(y)
            del x, y
        ts = time.perf_counter()
        u, s, v, kind = _factor(d, max_rank, svd, power_iters, seed, oversample, krylov_block, krylov_iters)
        took = time.perf_counter() - ts
        del d
        tensors: list[tuple[str, Any]] = []
        rk: dict[str, int] = {}
        for i, lo in enumerate(batch):
            k = s.shape[-1]
            if sv_epsilon > 0:
                k = max(1, min(k, int((s[i] > sv_epsilon).sum())))
            sq = s[i, :k].sqrt() if distribute_scale else s[i, :k]
            a = (v[i, :, :k] * sq).T  # (k, n)
            bm = u[i, :, :k] * sq if distribute_scale else u[i, :, :k]  # (m, k)
            dt = torch.promote_types(getattr(torch, lo.weight.dtype), getattr(torch, lo.base.dtype))
            if transpose:
                tensors += [(f"{PREFIX}{lo.module}.lora_embedding_A", a.to(dt)), (f"{PREFIX}{lo.module}.lora_embedding_B", bm.to(dt))]
            else:
                tensors += [(f"{PREFIX}{lo.module}.lora_A.weight", a.to(dt)), (f"{PREFIX}{lo.module}.lora_B.weight", bm.to(dt))]
            if lo.bias is not None:
                db = read("ft", lo.bias[0]).float() - read("base", lo.bias[1]).float()
                tensors.append((f"{PREFIX}{lo.module}.lora_B.bias", db.to(dt)))
            rk[lo.module] = k
        return tensors, rk, kind, took

    ranks: dict[str, int] = {}
    kinds: set[str] = set()
    svd_s = 0.0
    workers = threads or os.cpu_count() or 1
    saved_threads = torch.get_num_threads()
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fastmerge-extract")
    torch.set_num_threads(1)  # process-wide while extracting (parallel over batches instead); restored after
    try:
        with staged(out) as tmp:
            w = _SafetensorsStream(tmp / ADAPTER_WEIGHTS)
            jobs = []
            groups: dict[tuple, list[_Lora]] = {}
            for lo in loras:
                groups.setdefault((lo.weight.shape, lo.transpose), []).append(lo)
            for (shape, transpose), items in groups.items():
                m, n = (shape[1], shape[0]) if transpose else shape
                per = max(1, batch_bytes // (4 * m * n))
                jobs += [(items[b0:b0 + per], transpose, m, n) for b0 in range(0, len(items), per)]
            # at most workers + 1 batches in flight (bounded memory); results written in submission order
            pending: collections.deque = collections.deque()
            it = iter(jobs)
            for job in itertools.islice(it, workers + 1):
                pending.append(pool.submit(factor_batch, *job))
            for info in full:  # written while the first batches run
                w.add(PREFIX + info.name, read("ft", info))
            while pending:
                tensors, rk, kind, took = pending.popleft().result()
                for job in itertools.islice(it, 1):
                    pending.append(pool.submit(factor_batch, *job))
                for name, t in tensors:
                    w.add(name, t)
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
        torch.set_num_threads(saved_threads)
    kind = "+".join(sorted(kinds, reverse=True)) or svd
    return ExtractReport(str(out), len(ranks), len(full), max(ranks.values(), default=0), kind,
                         time.perf_counter() - t0, svd_s, ranks, workers)
