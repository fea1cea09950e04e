"""fastmerge: fast, streaming, mergekit-compatible model merging.

    fastmerge.merge("config.yml", "out/")                          # checkpoints on disk
    fastmerge.merge_tensors("ties", [a, b], base, weight=0.5, density=0.5)
    fastmerge.merge_state_dicts("linear", [sd1, sd2], weight=[0.3, 0.7])
"""

__version__ = "0.1.0"

from .api import merge, merge_state_dicts, merge_tensors, plan  # noqa: E402
from .config import MergeConfig  # noqa: E402
from .errors import FastMergeError  # noqa: E402
from .runner import MergeReport  # noqa: E402

__all__ = ["merge", "plan", "merge_tensors", "merge_state_dicts", "MergeConfig", "MergeReport", "FastMergeError", "__version__"]
