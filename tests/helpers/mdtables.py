"""Read the markdown tables the lab writes (``| a | b |`` rows under a ``## heading``) back as numbers."""

from __future__ import annotations


def table(text: str, heading: str) -> dict[str, list[str]]:
    """The first table after the first ``#`` line containing ``heading``: first cell -> the other cells
    (the header row included under its own first cell; the ``|---|`` row skipped)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and heading in line)
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if set(cells[0]) <= set("-: "):
            continue
        rows[cells[0]] = cells[1:]
    assert rows, f"no table under '{heading}'"
    return rows


def num(cell: str) -> float:
    return float(cell.replace(",", "").replace("+", ""))
