"""Merges that outgrow one process: ranks of a ``torchrun`` job, and resuming an interrupted merge.

``merge(build, out, options)`` is how ``fastmerge.merge`` (and ``fastmerge merge``) runs a plan. In one
process it is the engine selector's choice run over the plan's shards; under ``torchrun`` (``WORLD_SIZE``
> 1 in the environment, or a process group the caller initialised) every rank runs it over its share:

1. every rank builds the plan from the headers and the ranks compare ``MergePlan.digest()`` (gloo
   ``all_gather_object``): a rank that cannot build it, or builds another one (other files on another
   node, another fastmerge), stops every rank with one line naming it and its host;
2. rank 0 prepares the shared temporary folder beside OUT, named by the digest
   (``.OUT.fastmerge-tmp-<digest12>``) so every rank and a later ``--resume`` find it, and writes a marker
   in it that every rank must see (a multi-node job needs OUT on a shared filesystem);
3. ``--resume``: the shards an interrupted run recorded in its manifests are re-hashed (split over the
   ranks) and kept when name, size, header and checksum (io.checksum) match this plan; the rest is redone;
4. the shards left are split over the ranks by input bytes (``partition``: longest first onto the least
   loaded rank, ties to the lower rank); each rank runs the selected engine (stream or gpu) on the plan
   ``restricted`` to its shards: a ``session.Part`` writes them into the shared folder and appends each
   completed shard to the rank's manifest;
5. the ranks report through the process group's store (no collective waits while others still merge):
   a failure (exception, Ctrl-C, a rank that stops answering) stops every rank with one line naming the
   rank, its host and the tensor; rank 0 then writes the index and side files and renames the folder to
   OUT, and every rank returns once that is done.

Output bytes do not depend on the number of ranks: every tensor's bytes depend only on the plan (the
random methods' generator is keyed by seed, tensor name, model and element), and a shard is written
whole by one rank. Without ``--resume`` an existing temporary folder of the same plan is never reused:
the merge stops and names it. A failure leaves OUT untouched; completed shards stay in the temporary
folder for ``--resume`` (it is removed when none had completed).

The sweep and layerwise engines write their outputs in one pass of one process: they refuse ranks and
``--resume`` with one line. Nothing here imports torch for a one-process merge (the native engine stays
torch-free).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import _native
from .._memo import gc_frozen
from ..errors import FastMergeError, OutputError
from ..io.checksum import algorithm_of, file_checksum
from ..io.side_files import write_side_files
from ..io.writer import commit_dir, write_index
from .session import MergeReport, Part, peak_rss_mb

#: the shared temporary folder beside OUT of the plan with this digest
TMP_FORMAT = ".{name}.fastmerge-tmp-{digest}"
#: in it: which plan made it, each run's per-rank manifests, the shared-filesystem markers
PLAN_FILE = ".fastmerge-plan.json"
MANIFEST_GLOB = ".fastmerge-manifest-*.jsonl"
MARKER_FORMAT = ".fastmerge-shared-{nonce}"
#: seconds a collective of the setup (plan digests, resume checks) may wait for the slowest rank
SETUP_TIMEOUT_ENV, SETUP_TIMEOUT_S = "FASTMERGE_DIST_TIMEOUT", 1800
#: seconds without a heartbeat after which a rank counts as lost (it died without saying so)
HEARTBEAT_ENV, HEARTBEAT_S = "FASTMERGE_DIST_HEARTBEAT", 120
#: engines that can run a share of a plan (the others write their outputs in one pass of one process)
SHARDABLE = ("gpu", "native", "torch")


def tmp_dir_for(out: Path, digest: str) -> Path:
    return out.parent / TMP_FORMAT.format(name=out.name, digest=digest[:12])


# ------------------------------------------------------------------------------------------------
# the partition


@dataclasses.dataclass
class Partition:
    """Which rank writes which shard: ``ranks[r]`` = shard indices (ascending: plan order, so each rank
    reads its inputs front to back), ``loads[r]`` = the bytes they weigh."""

    world_size: int
    ranks: list[list[int]]
    loads: list[int]

    @property
    def imbalance(self) -> float:
        """The largest load over the mean (1.0: perfect; the merge takes as long as the largest)."""
        total = sum(self.loads)
        return max(self.loads) * self.world_size / total if total else 1.0

    def rank_of(self) -> dict[int, int]:
        return {i: r for r, shards in enumerate(self.ranks) for i in shards}


def partition(weights: Sequence[int], world_size: int) -> Partition:
    """Longest-processing-time first: shards by decreasing weight (ties: plan order) onto the least
    loaded rank (ties: the lower rank). Deterministic: every rank computes the same partition. Within
    4/3 of the best possible largest load; embeddings and heads (the largest shards) go first."""
    if world_size < 1:
        raise FastMergeError(f"world size must be at least 1, got {world_size}")
    import heapq

    ranks: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    heap = [(0, r) for r in range(world_size)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, r = heapq.heappop(heap)
        ranks[r].append(i)
        loads[r] = load + weights[i]
        heapq.heappush(heap, (loads[r], r))
    return Partition(world_size, [sorted(x) for x in ranks], loads)


def shard_weights(plan: Any, shards: Sequence[Any] | None = None) -> list[int]:
    """What a shard costs: the input bytes its tensors read (reading dominates a merge)."""
    in_bytes = {t.name: t.in_bytes for t in plan.tensors}
    return [sum(in_bytes.get(t.name, 0) for t in s.tensors) for s in (plan.shards if shards is None else shards)]


def explain(plan: Any, world_size: int) -> list[str]:
    """``fastmerge plan --explain --world-size N``: which rank writes which shard, and the balance."""
    w = shard_weights(plan)
    p = partition(w, world_size)
    out_b = [sum(t.nbytes for t in s.tensors) for s in plan.shards]
    lines = [f"partition over {world_size} rank(s) by input bytes: largest load {max(p.loads) / 1e9:.2f} GB, "
             f"mean {sum(p.loads) / world_size / 1e9:.2f} GB (imbalance {p.imbalance:.3f}); "
             f"{len(plan.shards)} shard(s)"]
    for r, idx in enumerate(p.ranks):
        names = ", ".join(plan.shards[i].filename for i in idx) if len(idx) <= 4 else \
            f"{plan.shards[idx[0]].filename} ... {plan.shards[idx[-1]].filename}"
        lines.append(f"  rank {r}: {len(idx)} shard(s), {p.loads[r] / 1e9:.2f} GB in, "
                     f"{sum(out_b[i] for i in idx) / 1e9:.2f} GB out" + (f": {names}" if idx else " (idle)"))
    if len(plan.shards) < world_size:
        lines.append(f"  note: {len(plan.shards)} shard(s) for {world_size} ranks: a smaller --out-shard-size "
                     "gives every rank work")
    return lines


# ------------------------------------------------------------------------------------------------
# the ranks


class _One:
    """A one-process run: the same calls as ``_Group``, answered locally."""

    rank, world_size, created = 0, 1, False

    def __init__(self) -> None:
        self.host = socket.gethostname()

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def report(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        return [payload]

    def wait_commit(self) -> dict[str, Any]:
        raise AssertionError("rank 0 commits")

    def set_commit(self, result: dict[str, Any]) -> None:
        pass

    def watch(self) -> None:
        pass

    def stop_watch(self) -> None:
        pass

    def close(self, ok: bool = True) -> None:
        pass


def requested() -> bool:
    """A ``torchrun`` launch (``WORLD_SIZE`` > 1), or a process group of several ranks already set up."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return True
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return False


class _Group:
    """This rank in a torch.distributed job: gloo collectives for the setup (nccl beside it for
    ``--device cuda``, one GPU per local rank), the job's key-value store for the rest."""

    def __init__(self, device: str) -> None:
        import datetime

        import torch
        import torch.distributed as dist

        self.dist = dist
        self.host = socket.gethostname()
        self.created = False
        timeout = datetime.timedelta(seconds=float(os.environ.get(SETUP_TIMEOUT_ENV, SETUP_TIMEOUT_S)))
        if not dist.is_initialized():
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if k not in os.environ]
            if missing:
                raise FastMergeError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but {', '.join(missing)} not set: "
                                     "launch with torchrun (see README, Multi-GPU and multi-node)")
            if device == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                backend = "cpu:gloo,cuda:nccl"
            else:
                backend = "gloo"
            dist.init_process_group(backend, timeout=timeout)
            self.created = True
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.store = dist.distributed_c10d._get_default_store()
        self.prefix = ""
        self._hb_s = float(os.environ.get(HEARTBEAT_ENV, HEARTBEAT_S))
        self._stop = threading.Event()
        self._watching = False
        self._thread: threading.Thread | None = None
        self.hosts: list[str] = []  # by rank, once the setup gathered them
        self.lost: str | None = None  # why this rank stopped waiting: another rank failed or went silent
        self.dead: set[int] = set()  # ranks that never reported (killed, lost)

    # -- setup collectives (gloo, with the process group's timeout) ----------------------------------
    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- the store: results and failures without waiting in a collective -----------------------------
    def _key(self, what: str) -> str:
        return f"fastmerge/{self.prefix}/{what}"

    def _set(self, what: str, value: Any) -> None:
        self.store.set(self._key(what), json.dumps(value))

    def _get(self, what: str) -> Any:
        return json.loads(self.store.get(self._key(what)))

    def _has(self, what: str) -> bool:
        return self.store.check([self._key(what)])

    def watch(self) -> None:
        """Start the heartbeat thread: it beats for this rank, and interrupts the main thread (as Ctrl-C
        would) when another rank has failed or stopped beating (killed, node lost)."""
        self._set(f"hb/{self.rank}", 0)
        self._watching = True
        self._thread = threading.Thread(target=self._watch, name="fastmerge-dist-watch", daemon=True)
        self._thread.start()

    def stop_watch(self) -> None:
        """Stop interrupting (the heartbeat goes on until ``close``: rank 0 still commits)."""
        self._watching = False

    def _check_others(self, seen: dict[int, tuple[Any, float]]) -> str | None:
        if self._has("failed"):
            return self._get("failed")
        now = time.monotonic()
        for r in range(self.world_size):
            if r == self.rank or self._has(f"done/{r}"):
                continue
            v = self._get(f"hb/{r}") if self._has(f"hb/{r}") else None
            last = seen.get(r)
            if last is None or last[0] != v:
                seen[r] = (v, now)
            elif now - last[1] > self._hb_s:
                host = f" on {self.hosts[r]}" if r < len(self.hosts) else ""
                return f"rank {r}{host} stopped answering for {self._hb_s:.0f} s (killed, out of memory or its node lost)"
        return None

    def _watch(self) -> None:
        import _thread

        seen: dict[int, tuple[Any, float]] = {}
        beat = 0
        period = min(1.0, self._hb_s / 4)
        while not self._stop.wait(period):
            try:
                beat += 1
                self._set(f"hb/{self.rank}", beat)
                why = self._check_others(seen) if self._watching else None
            except Exception as e:  # the store is gone: its host (rank 0 or the launcher) died
                why = f"lost the job's store ({type(e).__name__}: rank 0 or torchrun stopped)"
            if why is not None and self._watching:
                self.lost = why
                self._watching = False
                _thread.interrupt_main()

    def report(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """Post this rank's result and wait for every rank's (or the first failure, or a lost rank)."""
        self._set(f"done/{self.rank}", payload)
        if not payload["ok"] and not self._has("failed"):
            self._set("failed", payload["error"])
        results: dict[int, dict[str, Any]] = {}
        seen: dict[int, tuple[Any, float]] = {}
        deadline = None if payload["ok"] else time.monotonic() + 30  # a failed rank waits a little for the others
        while True:
            try:
                for r in range(self.world_size):
                    if r not in results and self._has(f"done/{r}"):
                        results[r] = self._get(f"done/{r}")
                if len(results) == self.world_size:
                    return [results[r] for r in range(self.world_size)]
                if payload["ok"]:
                    why = self._check_others(seen)
                    if why is not None:
                        return self._missing(results, why)
            except Exception as e:
                return self._missing(results, f"lost the job's store ({type(e).__name__}: rank 0 or torchrun stopped)")
            if deadline is not None and time.monotonic() > deadline:
                return self._missing(results, "did not stop in 30 s")
            time.sleep(0.05)

    def _missing(self, results: dict[int, dict[str, Any]], why: str) -> list[dict[str, Any]]:
        """Every rank's result, ``why`` standing in for those that never reported."""
        self.dead = set(range(self.world_size)) - set(results)
        return [results.get(r, {"ok": False, "rank": r, "error": why, "stopped": True}) for r in range(self.world_size)]

    def set_commit(self, result: dict[str, Any]) -> None:
        self._set("commit", result)

    def wait_commit(self) -> dict[str, Any]:
        seen: dict[int, tuple[Any, float]] = {}
        while True:
            try:
                if self._has("commit"):
                    return self._get("commit")
                v = self._get("hb/0") if self._has("hb/0") else None
                last = seen.get(0)
                now = time.monotonic()
                if last is None or last[0] != v:
                    seen[0] = (v, now)
                elif now - last[1] > self._hb_s:
                    return {"ok": False, "error": f"rank 0 stopped answering while committing for {self._hb_s:.0f} s"}
            except Exception as e:
                return {"ok": False, "error": f"lost the job's store while rank 0 committed ({type(e).__name__})"}
            time.sleep(0.05)

    def close(self, ok: bool = True) -> None:
        """Leave the job: rank 0 (the store's host when torchrun is not the launcher) waits until every
        other rank has read what it needs (at most 60 s; 5 s after a failure), then the group goes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.prefix:
            try:
                if self.rank != 0:
                    self._set(f"bye/{self.rank}", 1)
                else:
                    end = time.monotonic() + (60 if ok else 5)
                    live = [r for r in range(1, self.world_size) if r not in self.dead]
                    while time.monotonic() < end and not all(self._has(f"bye/{r}") for r in live):
                        time.sleep(0.05)
            except Exception:  # noqa: BLE001 - the store is gone already: nothing to wait for
                pass
        if self.created and self.dist.is_initialized():
            self.dist.destroy_process_group()
            self.created = False


# ------------------------------------------------------------------------------------------------
# the shared temporary folder and its manifests


def _read_claims(tmp: Path, digest: str) -> dict[str, dict[str, Any]]:
    """The completed shards the manifests in ``tmp`` record for ``digest`` (last line per shard wins)."""
    claims: dict[str, dict[str, Any]] = {}
    for m in sorted(tmp.glob(MANIFEST_GLOB)):
        try:
            lines = m.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the crash
            if isinstance(d, dict) and d.get("digest") == digest and isinstance(d.get("shard"), str):
                claims[d["shard"]] = d
    return claims


def _verify(tmp: Path, shard: Any, claim: dict[str, Any]) -> str | None:
    """None when the shard file in ``tmp`` is the complete one ``claim`` describes, else why not."""
    f = tmp / shard.filename
    head = shard.header_bytes()
    size = len(head) + sum(t.nbytes for t in shard.tensors)
    if claim.get("header_sha256") != shard.header_sha256() or claim.get("size") != size:
        return "another layout"
    try:
        if f.stat().st_size != size:
            return "size"
        algorithm = algorithm_of(claim.get("hash"))
        if algorithm is None or (algorithm == "xxh64" and not _native.HAS_CPU_EXT):
            return "no checksum this process can check"
        if file_checksum(f, algorithm) != claim["hash"]:
            return "checksum"
    except OSError:
        return "missing"
    return None


def _prepare(plan: Any, out: Path, digest: str, resume: bool, world_size: int) -> dict[str, Any]:
    """Rank 0: the shared temporary folder made (or, with ``--resume``, found) and the marker written.
    Returns what every rank needs: {ok, error | tmp, nonce, claims, note}."""
    tmp = tmp_dir_for(out, digest)
    note = None
    try:
        others = [d for d in out.parent.glob(TMP_FORMAT.format(name=out.name, digest="*"))
                  if d != tmp and (d / PLAN_FILE).is_file()]
        if tmp.exists():
            if not resume:
                return {"ok": False, "error": f"{tmp}: an interrupted merge of this same plan left its shards here; "
                                              "pass --resume to continue it, or remove that folder to start over"}
            try:
                recorded = json.loads((tmp / PLAN_FILE).read_text(encoding="utf-8")).get("digest")
            except (OSError, json.JSONDecodeError):
                recorded = None
            if recorded != digest:
                return {"ok": False, "error": f"{tmp}: not made by this plan (no readable {PLAN_FILE}); remove it "
                                              "to start over"}
            claims = _read_claims(tmp, digest)
        else:
            if resume and others:
                return {"ok": False, "error": f"--resume: the interrupted merge beside {out} ({others[0].name}) was made "
                                              "by a different plan (config, options, inputs or fastmerge version "
                                              "changed); rerun with the same ones, or remove it to start over"}
            if resume:
                note = f"--resume: no interrupted merge of this plan beside {out}; starting from the beginning"
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            (tmp / PLAN_FILE).write_text(json.dumps({
                "digest": digest, "out": str(out), "shards": len(plan.shards), "world_size": world_size,
                "method": plan.method.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }, indent=1), encoding="utf-8")
            claims = {}
        nonce = uuid.uuid4().hex[:12]
        (tmp / MARKER_FORMAT.format(nonce=nonce)).write_text(socket.gethostname(), encoding="utf-8")
    except OSError as e:
        return {"ok": False, "error": f"{getattr(e, 'filename', None) or out.parent}: cannot create the output's "
                                      f"temporary folder ({e.strerror or e})"}
    return {"ok": True, "tmp": str(tmp), "nonce": nonce, "claims": claims, "note": note, "fresh": not claims}


def _cleanup_run_files(tmp: Path) -> None:
    for pattern in (MANIFEST_GLOB, MARKER_FORMAT.format(nonce="*"), PLAN_FILE):
        for f in tmp.glob(pattern):
            f.unlink(missing_ok=True)


def _say(line: str) -> None:
    print(f"fastmerge: {line}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# the run


def merge(build: Callable[[], Any], out: str | Path, options: Any, select: Callable[[Any], Any]) -> Any:
    """Build the plan (``build()``) and produce ``out``: in this process, or as this rank of a
    ``torchrun`` job (see the module docstring), on the engine ``select(plan)`` picks. Returns the
    engine's report (sweep, layerwise) or a ``MergeReport`` with totals over every rank."""
    out = Path(out)
    if not requested():
        return _one_process(build(), out, select)
    from ..backends import resolve_device

    group = _Group(resolve_device(options.device))
    ok = False
    try:
        try:
            plan, err = build(), None
        except Exception as e:  # noqa: BLE001 - reported to every rank
            plan, err = None, str(e) or type(e).__name__
        mine = (group.host, None, err) if plan is None else (group.host, plan.digest(), None)
        views = group.all_gather(mine)
        errors = [(r, h, e) for r, (h, _, e) in enumerate(views) if e is not None]
        if errors:
            if len({e for _, _, e in errors}) == 1 and len(errors) == group.world_size:
                raise FastMergeError(errors[0][2])  # the same error everywhere: one plain line
            r, h, e = errors[0]
            raise FastMergeError(f"rank {r} on {h} cannot build the plan: {e}")
        digests = {d for _, d, _ in views}
        if len(digests) > 1:
            ref = views[0][1]
            r, (h, d, _) = next((r, v) for r, v in enumerate(views) if v[1] != ref)
            raise FastMergeError(
                f"ranks disagree on the plan: rank 0 on {views[0][0]} has digest {ref[:12]}, rank {r} on {h} has "
                f"{d[:12]} (different input files, config, options or fastmerge version on different nodes)")
        engine, _ = select(plan)
        if engine.name not in SHARDABLE:
            raise FastMergeError(f"the {engine.name} engine writes its output(s) in one pass of one process: run it "
                                 f"without torchrun (this job has WORLD_SIZE={group.world_size})")
        report = _run(group, plan, engine, out)
        ok = True
        return report
    finally:
        group.close(ok)


@gc_frozen
def _one_process(plan: Any, out: Path, select: Any) -> Any:
    """``merge`` in this process, from the engine's choice on: with the plan's objects (~10 per tensor, 200k for a MoE
    model, built while the collector was paused) frozen first: the first collection after the build, which
    ``select`` set off, scanned them all (~20 ms on moe-small)."""
    engine, _ = select(plan)
    if engine.name not in SHARDABLE:
        if plan.options.resume:
            raise FastMergeError(f"--resume: the {engine.name} engine writes its output(s) in one pass and cannot "
                                 "resume; rerun without --resume")
        return engine.run(plan, out)
    return _run(_One(), plan, engine, out)


@gc_frozen
def _run(group: Any, plan: Any, engine: Any, out: Path) -> MergeReport:
    t0 = time.perf_counter()
    rank, world = group.rank, group.world_size
    digest = plan.digest()
    resume = plan.options.resume
    # -- 1. the shared folder, seen by every rank --------------------------------------------------
    state = group.broadcast(_prepare(plan, out, digest, resume, world) if rank == 0 else None)
    if not state["ok"]:
        raise OutputError(state["error"]) if rank == 0 or world == 1 else FastMergeError(state["error"])
    tmp, nonce = Path(state["tmp"]), state["nonce"]
    group.prefix = nonce
    if rank == 0 and state["note"]:
        _say(state["note"])
    seen = (tmp / MARKER_FORMAT.format(nonce=nonce)).is_file()
    hosts = group.all_gather((group.host, seen))
    group.hosts = [h for h, _ in hosts]
    blind = [(r, h) for r, (h, ok) in enumerate(hosts) if not ok]
    if blind:
        if rank == 0:  # this run's marker goes; a folder holding no finished shard (made by this run) too
            (tmp / MARKER_FORMAT.format(nonce=nonce)).unlink(missing_ok=True)
            if state.get("fresh"):
                shutil.rmtree(tmp, ignore_errors=True)
        who = ", ".join(f"rank {r} on {h}" for r, h in blind[:4]) + (" ..." if len(blind) > 4 else "")
        raise OutputError(f"{out.resolve().parent} is not shared by every rank: {who} cannot see {tmp.name} that rank 0 on "
                          f"{hosts[0][0]} created there; multi-node merges need OUT on a filesystem every node mounts "
                          "(NFS, Lustre, GPFS, ...)")
    # -- 2. resume: re-hash the claimed shards, split over the ranks ----------------------------------
    claims: dict[str, Any] = state["claims"]
    claimed = [s for s in plan.shards if s.filename in claims]
    check = partition([sum(t.nbytes for t in s.tensors) for s in claimed], world).ranks[rank]
    verdicts = {claimed[i].filename: _verify(tmp, claimed[i], claims[claimed[i].filename]) for i in check}
    kept: set[str] = set()
    redone: dict[str, str] = {}
    for part in group.all_gather(verdicts):
        for name, why in part.items():
            (redone.__setitem__(name, why) if why else kept.add(name))
    if rank == 0 and resume and claims:
        extra = f"; redone: {', '.join(f'{n} ({w})' for n, w in sorted(redone.items())[:3])}" if redone else ""
        _say(f"--resume: {len(kept)} of {len(plan.shards)} shard(s) complete in {tmp.name}, kept"
             f"{extra}; merging the other {len(plan.shards) - len(kept)}")
    # -- 3. this rank's share -----------------------------------------------------------------------
    todo = [s for s in plan.shards if s.filename not in kept]
    # one process: every shard left (the weights are a pass over every tensor: 20k-45k of a MoE model)
    share = ([s.filename for s in todo] if world == 1
             else [todo[i].filename for i in partition(shard_weights(plan, todo), world).ranks[rank]])
    part = Part(tmp, tmp / f".fastmerge-manifest-{nonce}-{rank:05d}.jsonl", digest)
    sub = plan.restricted(share, part, progress=plan.options.progress and rank == 0)
    group.watch()
    report, exc, interrupted = None, None, False
    try:
        if share:
            report = engine.run(sub, out)
    except KeyboardInterrupt:
        interrupted = True
    except Exception as e:  # noqa: BLE001 - every failure is reported to the other ranks
        exc = e
    finally:
        group.stop_watch()
    lost = getattr(group, "lost", None)
    ok = report is not None or (not share and exc is None and not interrupted)
    payload = {"ok": ok, "rank": rank, "host": group.host, "tensor": part.current,
               "error": None if ok else ("interrupted" if interrupted else (str(exc).strip() or type(exc).__name__)),
               "stopped": bool(interrupted and lost),  # stopped because of another rank: not the cause
               # the engine's own count where its report has one (a sum over the plan is 20k-45k steps for a MoE model)
               "bytes_read": (report.bytes_read if isinstance(getattr(report, "bytes_read", None), int) else sub.in_bytes)
               if report is not None else 0,
               "bytes_written": report.bytes_written if report is not None else 0,
               "merge_s": report.merge_s if report is not None else 0.0, "rss": peak_rss_mb(),
               "backends": report.backends if report is not None else {}}
    results = group.report(payload)
    if any(not x["ok"] for x in results):
        _fail(group, results, payload, exc, interrupted, tmp, out, digest)
    # -- 4. rank 0 commits ----------------------------------------------------------------------------
    if rank == 0:
        try:
            _commit(plan, tmp, out, digest)
            result = {"ok": True}
        except BaseException as e:
            result = {"ok": False, "error": str(e) or type(e).__name__}
            group.set_commit(result)
            raise
        group.set_commit(result)
    else:
        result = group.wait_commit()
        if not result["ok"]:
            raise FastMergeError(f"rank 0 could not commit {out}: {result['error']}")
    counts: dict[str, int] = {}
    for x in results:
        for k, v in x["backends"].items():
            counts[k] = counts.get(k, 0) + v
    return MergeReport(
        out_dir=str(out), tensors=len(plan.tensors), bytes_read=sum(x["bytes_read"] for x in results),
        bytes_written=sum(x["bytes_written"] for x in results), wall_s=time.perf_counter() - t0,
        merge_s=max(x["merge_s"] for x in results), peak_rss_mb=max(x["rss"] for x in results), backends=counts,
        engine=engine.name, world_size=world, rank=rank, kept_shards=len(kept),
    )


def _fail(group: Any, results: list[dict[str, Any]], mine: dict[str, Any], exc: BaseException | None,
          interrupted: bool, tmp: Path, out: Path, digest: str) -> None:
    """Every rank stops with one line: the cause (rank, host, tensor, error), and what became of the
    temporary folder (removed when no shard had completed, else kept for --resume)."""
    n_done = len(_read_claims(tmp, digest)) if tmp.exists() else 0
    if n_done == 0:
        if group.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        tail = f"nothing was left at {out}"
    else:
        tail = (f"nothing was left at {out}; {n_done} completed shard(s) are kept in {tmp}: rerun with --resume "
                "to continue, or remove that folder")
    if group.world_size == 1:  # one process: the exception itself, as before, with the resume note
        if interrupted:
            if n_done:
                _say(f"interrupted; {tail}")
            raise KeyboardInterrupt
        assert exc is not None
        if n_done == 0:
            raise exc
        if isinstance(exc, FastMergeError):
            text = str(exc).split("; nothing was left at")[0]
            try:
                new = type(exc)(f"{text}; {tail}")
            except Exception:  # noqa: BLE001 - an exception type with another constructor
                new = FastMergeError(f"{text}; {tail}")
            raise new from None
        _say(tail)
        raise exc
    failed = [x for x in results if not x["ok"]]
    cause = next((x for x in failed if not x.get("stopped")), None)
    if cause is None:  # every failure was a rank stopping for another: the reason they saw
        msg = group.lost or failed[0]["error"]
    else:
        where = f"rank {cause['rank']}" + (f" on {cause['host']}" if cause.get("host") else "")
        where += f", tensor '{cause['tensor']}'" if cause.get("tensor") else ""
        msg = f"{where}: {cause['error']}"
    raise FastMergeError(f"{msg.split('; nothing was left at')[0]} (every rank stopped); {tail}")


def _commit(plan: Any, tmp: Path, out: Path, digest: str) -> None:
    """Rank 0, every share done: check every shard is there and whole, write the index and the side
    files, drop the run's bookkeeping, rename the folder to OUT."""
    claims = _read_claims(tmp, digest)
    try:
        for s in plan.shards:
            size = len(s.header_bytes()) + sum(t.nbytes for t in s.tensors)
            c = claims.get(s.filename)
            if c is None or c.get("size") != size or (tmp / s.filename).stat().st_size != size:
                raise OutputError(f"{tmp / s.filename}: shard missing or incomplete after every rank finished")
        write_index(tmp, plan.shards)
        write_side_files(plan, tmp)
        _cleanup_run_files(tmp)
        commit_dir(tmp, out, plan.options.overwrite)
    except OSError as e:
        raise OutputError(f"{getattr(e, 'filename', None) or out}: I/O error ({e.strerror or e}) while committing; "
                          f"the shards stay in {tmp}: rerun with --resume") from None
