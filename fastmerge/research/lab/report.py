"""Markdown tables and plot helpers for the lab's results (matplotlib with the non-interactive Agg backend)."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Sequence


def fmt_pct(x: float | None, digits: int = 2) -> str:
    """A fraction in [0, 1] as a percentage string ("97.50"); "-" for None."""
    return "-" if x is None else f"{100.0 * x:.{digits}f}"


def verdict(ours: float, other: float, claim: str) -> str:
    """"agrees" / "DISAGREES" with ``claim`` (that ``ours`` > ``other``), or a tie, for the findings lists."""
    if ours > other:
        return f"agrees with the paper ({claim})"
    if ours < other:
        return f"DISAGREES with the paper ({claim})"
    return f"a tie: neither agrees nor disagrees with the paper ({claim})"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_table(path: str | Path, title: str, sections: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]],
                notes: Sequence[str] = (), images: Sequence[str] = (), command: str = "", seconds: float | None = None,
                smoke: bool = False) -> Path:
    """Write ``path`` (markdown): ``title``, then per section (subtitle, header, rows) a table, the
    ``images`` (relative file names), the ``notes`` as a list, and how it was produced."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    if smoke:
        lines += ["**Smoke run** (tiny models, 1-2 epochs): the numbers are meaningless, only the pipeline is checked.", ""]
    for sub, header, rows in sections:
        if sub:
            lines += [f"## {sub}", ""]
        lines += [md_table(header, rows), ""]
    for im in images:
        lines += [f"![{Path(im).stem}]({im})", ""]
    if notes:
        lines += ["## Findings", ""] + [f"- {n}" for n in notes] + [""]
    produced = f"Produced by `{command}`" if command else "Produced by the lab"
    if seconds is not None:
        produced += f" in {seconds:.0f} s"
    produced += f" (torch CPU, {platform.machine()}, {time.strftime('%Y-%m-%d')}); every run is seeded and reproducible."
    lines += [produced, ""]
    p.write_text("\n".join(lines))
    return p


def pyplot():
    """matplotlib.pyplot with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
