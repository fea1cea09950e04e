"""``fastmerge extract-lora`` (mergekit-extract-lora's flags) and ``fastmerge merge-adapters`` (PEFT's
add_weighted_adapter): argparse only until a command runs."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("extract-lora", help="a fine-tune minus its base as a PEFT LoRA adapter (mergekit-extract-lora)",
                       description="Extract model - base_model as a PEFT LoRA adapter, tensor by tensor, with the batched "
                                   "randomized SVD (mergekit-extract-lora's flags).")
    p.add_argument("--model", required=True, help="fine-tuned model path")
    p.add_argument("--base-model", required=True, help="base model path")
    p.add_argument("--out-path", required=True, help="output folder for the adapter")
    p.add_argument("--max-rank", type=int, default=128, help="maximum rank of each module (default: %(default)s)")
    p.add_argument("--sv-epsilon", type=float, default=0.0, help="drop singular values <= this (default: %(default)s)")
    p.add_argument("--embed-lora", action=argparse.BooleanOptionalAction, default=False,
                   help="factor embeddings too (default: saved whole in modules_to_save)")
    p.add_argument("--distribute-scale", action=argparse.BooleanOptionalAction, default=True,
                   help="A = sqrt(S) V^T, B = U sqrt(S) (else A = S V^T, B = U) (default: on)")
    p.add_argument("--save-module", dest="save_modules", action="append", default=[], metavar="NAME",
                   help="save this module at full rank (repeatable)")
    p.add_argument("--exclude-regex", "-e", dest="exclude_regexes", action="append", default=[], metavar="RE",
                   help="skip modules matching RE (repeatable)")
    p.add_argument("--include-regex", "-i", dest="include_regexes", action="append", default=[], metavar="RE",
                   help="only modules matching RE (repeatable)")
    p.add_argument("--skip-undecomposable", action="store_true", help="do not save non-matrix modules (norms) at full rank")
    p.add_argument("--svd", default="krylov", choices=["krylov", "randomized", "exact"],
                   help="krylov (default: batched block Krylov, 2.4x fewer flops than randomized at 1.011x the optimal "
                        "error on full-rank noise deltas), randomized (subspace iteration, 1.008x) or exact "
                        "(torch.linalg.svd, as mergekit)")
    p.add_argument("--krylov-block", type=int, default=None,
                   help="krylov: columns per block (default: rank/2; larger is slower and more accurate)")
    p.add_argument("--krylov-iters", type=int, default=4,
                   help="krylov: iterations (default: %(default)s; 3 is 20%% faster, up to 1.025x the optimal error)")
    p.add_argument("--power-iters", type=int, default=2, help="randomized: power iterations (default: %(default)s)")
    p.add_argument("--oversample", type=int, default=None,
                   help="randomized: extra sketch columns (default: max(10, rank): 10 is faster, less accurate)")
    p.add_argument("--seed", type=int, default=0, help="randomized SVD test matrix seed (default: %(default)s)")
    p.add_argument("--threads", "-j", "--num-threads", type=int, default=0,
                   help="worker threads, each factoring one batch of same-shape modules on one core (default: 0 = all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    # mergekit flags with nothing to do here
    for flag in ("--cuda", "--lazy-unpickle", "--low-cpu-memory", "--trust-remote-code", "--no-lazy-unpickle",
                 "--copy-tokenizer", "--no-copy-tokenizer", "--safe-serialization", "--allow-crimes"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)


    p = sub.add_parser("merge-adapters", help="combine PEFT LoRA adapters into one (PEFT's add_weighted_adapter)",
                       description="Combine PEFT LoRA adapters as PEFT's add_weighted_adapter does, on the adapter files.")
    p.add_argument("adapters", nargs="+", help="adapter folders (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--weights", "-w", type=float, nargs="+", required=True, help="one weight per adapter")
    p.add_argument("--out-path", required=True, help="output adapter folder")
    p.add_argument("--combination-type", default="svd",
                   choices=["svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                            "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd"], help="(default: %(default)s)")
    p.add_argument("--svd-rank", type=int, default=None, help="rank of the *svd types (default: the largest input r)")
    p.add_argument("--svd-clamp", type=float, default=None, help="clamp the factors at this quantile")
    p.add_argument("--density", type=float, default=None, help="kept fraction for ties / dare / magnitude_prune types")
    p.add_argument("--majority-sign-method", default="total", choices=["total", "frequency"])
    p.add_argument("--svd", default="krylov", choices=["krylov", "randomized", "exact"],
                   help="SVD of the dense *_svd types: krylov (default: block Krylov), randomized (subspace iteration) or "
                        "exact (torch.linalg.svd, as PEFT); svd itself is exact from the factors")
    p.add_argument("--seed", type=int, default=None, help="seed of the DARE masks")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(a: argparse.Namespace) -> int:
    if a.cmd == "extract-lora":
        if "numpy" not in sys.modules:
            # one BLAS thread per worker (extract's docstring), set before numpy loads OpenBLAS: it then starts
            # no thread pool, whose idle threads spun for 1-3 % of an extraction's CPU time under threadpoolctl
            os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        from .extract import extract_lora

        rep = extract_lora(a.model, a.base_model, a.out_path, max_rank=a.max_rank, sv_epsilon=a.sv_epsilon,
                           embed_lora=a.embed_lora, save_modules=a.save_modules, include_regexes=a.include_regexes,
                           exclude_regexes=a.exclude_regexes, skip_undecomposable=a.skip_undecomposable,
                           distribute_scale=a.distribute_scale, svd=a.svd, power_iters=a.power_iters, oversample=a.oversample,
                           krylov_block=a.krylov_block, krylov_iters=a.krylov_iters, seed=a.seed, threads=a.threads,
                           overwrite=a.overwrite)
        print(rep.summary())
        return 0
    if a.cmd == "merge-adapters":
        from .adapters import merge_adapters

        rep = merge_adapters(a.adapters, a.weights, a.out_path, combination_type=a.combination_type, svd_rank=a.svd_rank,
                             svd_clamp=a.svd_clamp, density=a.density, majority_sign_method=a.majority_sign_method,
                             svd=a.svd, seed=a.seed, overwrite=a.overwrite)
        print(rep.summary())
        return 0
    raise AssertionError(a.cmd)
