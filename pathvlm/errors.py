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
        self.reason = one_line(reason)  # a corrupt file's bytes can end up in a library's message
        super().__init__(f"{one_line(self.path)}: {self.reason}")


def one_line(text: object) -> str:
    """``text`` on one line: control characters and runs of whitespace become one space."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in str(text)).split())


def reason_without_path(exc: BaseException, path: str | Path) -> str:
    """A library's message about ``path`` with the full path cut to the file name (PIL repeats it;
    the SlideError already names the file, and the app must not show server paths)."""
    return str(exc).replace(str(path), Path(path).name).strip() or type(exc).__name__


class ModelError(PathVLMError):
    """A model cannot be built or loaded (unknown name, missing weights, key mismatch)."""


class DependencyError(PathVLMError):
    """An optional dependency or hardware capability (e.g. CUDA) is missing."""
