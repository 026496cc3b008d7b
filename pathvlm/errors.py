"""Exceptions pathvlm raises on bad input; the CLI turns them into one line and exit code 2."""

from __future__ import annotations

from pathlib import Path


class PathVLMError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""


class ConfigError(PathVLMError):
    """A configuration file or override is invalid (unknown key, wrong type)."""


class SlideError(PathVLMError):
    """A slide or image cannot be opened or read.

    The message always names the file, so a batch summary can list failures one per line.
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ModelError(PathVLMError):
    """A model cannot be built or loaded (unknown name, missing weights, key mismatch)."""


class DependencyError(PathVLMError):
    """An optional dependency or hardware capability (e.g. CUDA) is missing."""
