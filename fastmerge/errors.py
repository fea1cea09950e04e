"""Exception hierarchy. Every error names the file, tensor or field it is about, in one line."""

from __future__ import annotations


class FastMergeError(Exception):
    """Base class: the CLI prints ``str(err)`` as one line and exits with code 2."""


class ConfigError(FastMergeError):
    """The merge configuration (YAML or Python arguments) is invalid."""


class CheckpointError(FastMergeError):
    """An input checkpoint is missing, malformed or inconsistent."""


class ShapeMismatchError(CheckpointError):
    """A tensor has different shapes across input models."""


class BackendUnavailableError(FastMergeError):
    """An explicitly requested backend cannot run a tensor; the message lists every reason."""


class OutputError(FastMergeError):
    """The output location is unusable (exists, inside an input, not writable)."""
