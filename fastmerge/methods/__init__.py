"""The registry: one explicit line per method (no registration by import side effect)."""

from __future__ import annotations

import difflib

from ..errors import ConfigError
from .base import MergeMethod, ParamSpec
from .linear import Linear
from .task_arithmetic import TaskArithmetic
from .ties import Ties
from .dare import DareLinear, DareTies
from .breadcrumbs import Breadcrumbs, BreadcrumbsTies
from .della import Della, DellaLinear
from .sce import Sce
from .arcee_fusion import ArceeFusion
from .ram import Ram, RamPlusTL
from .passthrough import Passthrough
from .slerp import Slerp
from .nuslerp import Nuslerp
from .multislerp import Multislerp
from .karcher import Karcher
from .model_stock import ModelStock
from .nearswap import Nearswap
from .cart import Cart
from .m_ties import MTies

REGISTRY: dict[str, MergeMethod] = {
    "linear": Linear(),
    "task_arithmetic": TaskArithmetic(),
    "ties": Ties(),
    "dare_linear": DareLinear(),
    "dare_ties": DareTies(),
    "breadcrumbs": Breadcrumbs(),
    "breadcrumbs_ties": BreadcrumbsTies(),
    "della": Della(),
    "della_linear": DellaLinear(),
    "sce": Sce(),
    "arcee_fusion": ArceeFusion(),
    "ram": Ram(),
    "ramplus_tl": RamPlusTL(),
    "passthrough": Passthrough(),
    "slerp": Slerp(),
    "nuslerp": Nuslerp(),
    "multislerp": Multislerp(),
    "karcher": Karcher(),
    "model_stock": ModelStock(),
    "nearswap": Nearswap(),
    "cart": Cart(),
    "m_ties": MTies(),
}

#: Every parameter name a mergekit 0.1.5 method (or a fastmerge method) accepts. A name in this set that
#: the chosen method does not use is a warning (mergekit configs carry such parameters); a name outside
#: it is an error with a suggestion (a typo).
KNOWN_PARAMETERS: frozenset[str] = frozenset(
    {
        "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "t",
        "nuslerp_flatten", "nuslerp_row_wise", "normalize_weights", "eps", "max_iter", "tol",
        "select_topk", "filter_wise", "r", "alpha", "scale", "election", "selection",
    }
)


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; a ConfigError suggesting the closest name otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"merge_method: unknown method '{name}'{hint}; available: {', '.join(sorted(REGISTRY))}"
        ) from None


def list_methods() -> list[MergeMethod]:
    return [REGISTRY[k] for k in sorted(REGISTRY)]


__all__ = ["MergeMethod", "ParamSpec", "REGISTRY", "KNOWN_PARAMETERS", "get_method", "list_methods"]
