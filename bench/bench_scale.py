"""Planning at the largest scales, without the disk for it: header-only (sparse) checkpoint families shaped
like Llama-3.1-405B and DeepSeek-V3 (671B), and ``fastmerge plan --world-size 8 / 64`` on them.

Each model is written as real safetensors shards of HF's layout (5 GB shards + index.json) whose
headers are complete and whose data sections are holes (``truncate``): a 1.3 TB model takes ~10 MB of
disk. Planning reads headers only, so it runs on these exactly as on the real checkpoints.

    python bench/bench_scale.py [--root DIR] [--models 3] [--only deepseek]

Prints, per family: tensors, bytes, the time and peak RSS of ``fastmerge plan --world-size N`` (a
child process each: its wall time includes the interpreter start), of ``build_plan`` + ``digest()`` +
``partition`` in-process, and the partition's imbalance for 8 and 64 ranks (the rows of bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ST = {"bfloat16": "BF16"}
SHARD_BYTES = 5_000_000_000


def llama_405b() -> list[tuple[str, tuple[int, ...]]]:
    h, inter, vocab, layers, kv = 16384, 53248, 128256, 126, 8 * 128
    out = [("model.embed_tokens.weight", (vocab, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "mlp.down_proj.weight", (h, inter)),
                (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                (p + "post_attention_layernorm.weight", (h,)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (kv, h))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def deepseek_v3() -> list[tuple[str, tuple[int, ...]]]:
    """DeepSeek-V3's tensors (bf16, without the FP8 checkpoint's weight_scale_inv companions): 61 layers,
    MLA attention, 3 dense layers then 58 MoE layers of 256 routed experts + 1 shared."""
    h, vocab, layers, dense, experts, moe_i, dense_i = 7168, 129280, 61, 3, 256, 2048, 18432
    out = [("model.embed_tokens.weight", (vocab, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_a_proj.weight", (1536, h)), (p + "self_attn.q_a_layernorm.weight", (1536,)),
                (p + "self_attn.q_b_proj.weight", (128 * 192, 1536)),
                (p + "self_attn.kv_a_proj_with_mqa.weight", (576, h)), (p + "self_attn.kv_a_layernorm.weight", (512,)),
                (p + "self_attn.kv_b_proj.weight", (128 * 256, 512)), (p + "self_attn.o_proj.weight", (h, 128 * 128))]
        if n < dense:
            out += [(p + "mlp.gate_proj.weight", (dense_i, h)), (p + "mlp.up_proj.weight", (dense_i, h)),
                    (p + "mlp.down_proj.weight", (h, dense_i))]
            continue
        out += [(p + "mlp.gate.weight", (experts, h)), (p + "mlp.gate.e_score_correction_bias", (experts,))]
        for e in [*range(experts), "shared"]:
            q = p + (f"mlp.experts.{e}." if e != "shared" else "mlp.shared_experts.")
            out += [(q + "gate_proj.weight", (moe_i, h)), (q + "up_proj.weight", (moe_i, h)),
                    (q + "down_proj.weight", (h, moe_i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


FAMILIES = {"llama-3.1-405b": (llama_405b, {"num_hidden_layers": 126, "vocab_size": 128256}),
            "deepseek-v3": (deepseek_v3, {"num_hidden_layers": 61, "vocab_size": 129280})}


def write_sparse_model(folder: Path, tensors: list[tuple[str, tuple[int, ...]]], config: dict) -> int:
    """HF-layout safetensors shards with full headers and hole-only data. Returns the model's bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nb = math.prod(shape) * 2
        if groups[-1] and size + nb > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nb
    wmap, total = {}, 0
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in g:
            nb = math.prod(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
            wmap[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + off)  # the data: a hole
        total += off
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": wmap}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["X"], "torch_dtype": "bfloat16", **config}))
    return total


def family(root: Path, name: str, models: int) -> tuple[list[Path], int, int]:
    make, cfg = FAMILIES[name]
    tensors = make()
    paths = []
    total = 0
    for k in range(models):
        p = root / name / ("base" if k == 0 else f"ft{k}")
        if not (p / "model.safetensors.index.json").is_file():
            total = write_sparse_model(p, tensors, cfg)
        else:
            total = json.loads((p / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        paths.append(p)
    return paths, len(tensors), total


def child_plan(cfg: Path, world: int) -> tuple[float, float, float, str]:
    """``fastmerge plan CFG --world-size N`` in a child: (wall s, CPU s, peak RSS MB, its first partition line).
    The CPU time (user + system) stands for the wall time of a quiet machine, which a shared one is not."""
    t0 = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = r0.ru_maxrss
    p = subprocess.run([sys.executable, "-m", "fastmerge", "plan", str(cfg), "--world-size", str(world)],
                       capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    rss = r1.ru_maxrss / 1024
    line = next(x for x in p.stdout.splitlines() if x.startswith("partition"))
    return wall, cpu, max(rss, before / 1024), line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "fastmerge-scale"))
    ap.add_argument("--models", type=int, default=3, help="base + fine-tunes (ties needs >= 2)")
    ap.add_argument("--only", choices=sorted(FAMILIES), default=None)
    a = ap.parse_args()
    root = Path(a.root)
    import yaml

    from fastmerge import plan as make_plan
    from fastmerge.engine.distributed import partition, shard_weights
    from fastmerge.engine.session import peak_rss_mb

    for name in [a.only] if a.only else list(FAMILIES):
        t0 = time.perf_counter()
        paths, n_tensors, nbytes = family(root, name, a.models)
        gen_s = time.perf_counter() - t0
        disk = sum(os.stat(f).st_blocks * 512 for p in paths for f in p.iterdir())
        doc = {"merge_method": "ties", "base_model": str(paths[0]), "dtype": "bfloat16",
               "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.5}} for p in paths[1:]]}
        cfg = root / f"{name}.yml"
        cfg.write_text(yaml.safe_dump(doc))
        print(f"## {name}: {n_tensors} tensors/model, {nbytes / 1e12:.2f} TB/model x {a.models} models, "
              f"{disk / 1e6:.1f} MB on disk (generated in {gen_s:.1f} s)")
        t0, c0 = time.perf_counter(), time.process_time()
        p = make_plan(cfg, None)
        t_plan, c_plan = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        digest = p.digest()
        t_digest, c_digest = time.perf_counter() - t0, time.process_time() - c0
        w = shard_weights(p)
        for world in (8, 64):
            t0 = time.perf_counter()
            part = partition(w, world)
            t_part = time.perf_counter() - t0
            wall, cpu, rss, line = child_plan(cfg, world)
            print(f"  world {world:>2}: `fastmerge plan --world-size {world}` {wall:.2f} s wall ({cpu:.2f} s CPU), "
                  f"peak RSS {rss:.0f} MB; "
                  f"partition {t_part * 1e3:.1f} ms, {len(p.shards)} shards, largest load {max(part.loads) / 1e9:.0f} GB "
                  f"of mean {sum(part.loads) / world / 1e9:.0f} GB (imbalance {part.imbalance:.3f})")
        print(f"  in-process: build_plan {t_plan:.2f} s ({c_plan:.2f} s CPU), digest {t_digest:.2f} s ({c_digest:.2f} s CPU, "
              f"{digest[:12]}), "
              f"peak RSS {peak_rss_mb():.0f} MB; {len(p.tensors)} output tensors, "
              f"{p.in_bytes / 1e12:.2f} TB to read")


if __name__ == "__main__":
    main()
