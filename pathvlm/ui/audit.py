"""The app's audit trail: one JSON line per open / ask / report, with no path and no question text
unless asked for; slides are named by a fingerprint of their bytes, not by where they lie."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

from pathvlm.errors import ConfigError

log = logging.getLogger(__name__)

HEADER_BYTES = 64 << 10


def slide_fingerprint(path: str | Path) -> str:
    """sha256 of the file size and its first 64 KiB (short): the same file gives the same value
    wherever it lies and whatever it is called; the path and name are not part of it."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        h.update(str(path.stat().st_size).encode())
        with open(path, "rb") as f:
            h.update(f.read(HEADER_BYTES))
    except OSError:
        return "unreadable"
    return h.hexdigest()[:16]


def model_weights_hash(model: Any) -> str:
    """A short sha256 over every parameter and buffer of ``model`` (computed once per app)."""
    from pathvlm.encoders.patch_encoder import state_dict_hash

    return state_dict_hash(model.state_dict())


class AuditLog:
    """Appends JSON lines to ``path`` (thread-safe, flushed per line)."""

    def __init__(self, path: str | Path, model_name: str, weights_hash: str, with_text: bool = False):
        self.path = Path(path)
        self.model_name, self.weights_hash, self.with_text = model_name, weights_hash, with_text
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise ConfigError(f"--audit-log {self.path}: cannot write ({exc.strerror or exc})") from None

    def record(self, event: str, user: str | None, slides: list[str], ok: bool,
               question: str | None = None, **extra: Any) -> None:
        """One line: UTC time, event, user, slide fingerprints, model, weights hash, outcome."""
        row: dict[str, Any] = {
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "event": event, "user": user, "slides": slides, "model": self.model_name,
            "weights_hash": self.weights_hash, "ok": ok, **extra}
        if self.with_text and question is not None:
            row["question"] = question
        line = json.dumps(row, ensure_ascii=False)
        with self._lock:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            except OSError as exc:  # a full disk must not take the app down; the operator sees it
                log.error("audit log %s: cannot write (%s)", self.path, exc)
