"""FS-Merge: merging models trained from different initialisations, through a foldable SuperNet.

Paper: E. Kinderman, I. Hubara, H. Maron, D. Soudry, "Foldable SuperNets: Scalable Merging of
Transformers with Different Initializations and Tasks", https://arxiv.org/abs/2410.01483

n frozen models of one architecture sit side by side in a SuperNet; before every frozen linear layer a
learned unmerge ``U`` (d -> n·d) rebuilds each model's input, after it a learned merge ``M`` (n·d -> d)
mixes the outputs back into one d-wide stream, where activations, LayerNorms (learned), attention and
residuals run. M and U are per-model diagonals plus a rank-r term, trained on a few unlabeled inputs per
task to reconstruct each model's pre-head features; then every ``U → linear → M`` folds into one linear
``W* = Σ_k M_kᵀ W_k U_kᵀ``, giving one model of the original size (plus a d_out × d_out unmerge per task,
kept with the task heads).

    from fastmerge.research.fsmerge import ViTSpec, fs_merge, TrainConfig, save_folded
    spec = ViTSpec.from_state_dict(sd_a, heads=4, patch=2)            # timm / lab TinyViT layout
    res = fs_merge(spec, [sd_a, sd_b], [x_task_a, x_task_b], rank=12,
                   train=TrainConfig(epochs=200, lr=1e-3))
    save_folded(res.folded, "merged/")                                # safetensors, original keys

Architectures: ``MLPSpec`` (hidden ``nn.Linear`` layers), ``ViTSpec`` (pre-LN, timm / lab / HF CLIP
layouts), ``BertSpec`` (post-LN, HF ``BertModel`` layout). This package imports torch eagerly; nothing
on fastmerge's merge path imports it.
"""

from .arch import BertSpec, Layout, MLPSpec, ViTSpec, canonical_fp32, features
from .baselines import average, distill, feature_ensemble, regmean, zipit
from .fold import Folded, absorb_into_head, fold, fold_linear, save_folded
from .init import initialize, zipit_match
from .supernet import (BertSuperNet, Factor, MLPSuperNet, SuperNet, ViTSuperNet, build_supernet,
                       expected_learnable)
from .train import FSMergeResult, TrainConfig, fs_merge, fs_merge_sequential, make_targets, train_global, train_local

__all__ = [
    "MLPSpec", "ViTSpec", "BertSpec", "Layout", "canonical_fp32", "features",
    "Factor", "SuperNet", "MLPSuperNet", "ViTSuperNet", "BertSuperNet", "build_supernet", "expected_learnable",
    "initialize", "zipit_match",
    "fold", "fold_linear", "Folded", "save_folded", "absorb_into_head",
    "TrainConfig", "fs_merge", "fs_merge_sequential", "FSMergeResult", "make_targets", "train_global", "train_local",
    "average", "regmean", "zipit", "distill", "feature_ensemble",
]
