"""LoRA tools beyond ``model+lora`` inputs (``fastmerge.io.lora``): extraction of a PEFT adapter from a
fine-tune (``extract``, ``fastmerge extract-lora``)."""

from __future__ import annotations

from .extract import ExtractReport, extract_lora

__all__ = ["ExtractReport", "extract_lora"]
