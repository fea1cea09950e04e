"""The papers' Python tools and the lab, above the engine: CART's API (``cart``), model soups
(``soups``), ensembles (``ensemble``), the analyses (``analysis``), FS-Merge (``fsmerge``) and the
experiment lab (``lab``). They use the merge API like any caller; nothing below them imports them."""
