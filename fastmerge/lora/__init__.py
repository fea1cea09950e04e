"""LoRA tools beyond ``model+lora`` inputs (``fastmerge.io.lora``): extraction of a PEFT adapter from a
fine-tune (``extract``, ``fastmerge extract-lora``), adapter merging as PEFT's ``add_weighted_adapter``
(``adapters``, ``fastmerge merge-adapters``) with PEFT's ``merge_utils`` semantics (``merge_utils``)."""

from __future__ import annotations

from .adapters import AdapterMergeReport, merge_adapters
from .extract import ExtractReport, extract_lora

__all__ = ["AdapterMergeReport", "ExtractReport", "extract_lora", "merge_adapters"]
