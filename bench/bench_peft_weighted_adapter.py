"""PEFT's ``add_weighted_adapter(..., combination_type="ties_svd")``: stock PEFT vs ``fastmerge.integrations.peft``
enabled, side by side in one process (run by hand, not collected; run it from outside the repository):

    python bench/bench_peft_weighted_adapter.py [--layers 16] [--adapters 8] [--rounds 3] [--ctype ties_svd]

The model is a 1B-shaped LLaMA built by transformers from a config (hidden 2048, intermediate 5632, 32 heads,
vocab 32000; random init, nothing downloaded), ``--layers`` of it; ``--adapters`` LoRA adapters, r = 16 on
q, k, v, o, gate, up, down, with random A and B (B nonzero, so every ΔW is a real rank-16 matrix). Each round
runs stock PEFT and the enabled version (alternating which goes first) from the same seed, then deletes the
new adapters; the times are medians over the rounds. Accuracy: for every module, the Frobenius error of the
fast result against the merged ΔW (recorded as it enters the Krylov SVD, the same ΔW PEFT truncates) over
stock PEFT's error (its full SVD: the optimal truncation).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ctype", default="ties_svd")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    a = ap.parse_args()

    import peft
    import torch
    import transformers

    import fastmerge.ops.krylov_svd as ks
    from fastmerge.integrations import peft as fpeft

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    model = transformers.LlamaForCausalLM(cfg)
    lcfg = dict(r=a.rank, lora_alpha=2 * a.rank,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(model, peft.LoraConfig(**lcfg), adapter_name="a0")
    names = [f"a{i}" for i in range(a.adapters)]
    for n in names[1:]:
        pm.add_adapter(n, peft.LoraConfig(**lcfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    weights = [1.0 / a.adapters + 0.05 * i for i in range(a.adapters)]
    print(f"model: {a.layers} layers of hidden {a.hidden}, intermediate {a.intermediate}; {a.adapters} adapters r = {a.rank}; "
          f"{a.ctype} density {a.density}; torch {torch.__version__}, peft {peft.__version__}, threads "
          f"{torch.get_num_threads()}, cores {os.cpu_count()}", flush=True)

    def factors(name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {mn: (m.lora_A[name].weight.detach().clone(), m.lora_B[name].weight.detach().clone())
                for mn, m in pm.named_modules() if hasattr(m, "lora_A") and name in m.lora_A}

    times: dict[str, list[float]] = {"peft": [], "fastmerge": []}
    seen: list[torch.Tensor] = []
    real = ks.krylov_svd
    for r in range(a.rounds):
        for which in (["peft", "fastmerge"] if r % 2 == 0 else ["fastmerge", "peft"]):
            out = f"{which}_{r}"
            torch.manual_seed(5)
            if which == "fastmerge" and r == 0:  # record the merged ΔW entering the SVD for the accuracy check
                def record(x, k, **kw):
                    seen.append(x.detach().clone())
                    return real(x, k, **kw)
                ks.krylov_svd = record
            t = time.perf_counter()
            with fpeft.patched() if which == "fastmerge" else _null():
                pm.add_weighted_adapter(names, weights, out, combination_type=a.ctype, density=a.density)
            times[which].append(time.perf_counter() - t)
            ks.krylov_svd = real
            print(f"round {r + 1} {which}: {times[which][-1]:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
        if r == 0:
            ref, fast = factors("peft_0"), factors("fastmerge_0")
            ratios = []
            for (mn, (fa, fb)), m in zip(fast.items(), seen):
                ra, rb = ref[mn]
                ratios.append(float((m - fb @ fa).norm() / (m - rb @ ra).norm()))
            print(f"error / PEFT's full-SVD error over {len(ratios)} modules: max {max(ratios):.4f}, median "
                  f"{statistics.median(ratios):.4f}", flush=True)
        for n in (f"peft_{r}", f"fastmerge_{r}"):
            pm.delete_adapter(n)
    mp, mf = statistics.median(times["peft"]), statistics.median(times["fastmerge"])
    print(f"median: stock PEFT {mp:.1f} s, fastmerge enabled {mf:.1f} s: {mp / mf:.1f}x "
          f"(per round {[round(p / f, 1) for p, f in zip(times['peft'], times['fastmerge'])]})")


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
