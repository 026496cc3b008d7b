"""What a shared deployment allows: slide roots for server paths, examples, and resource limits.

A server path is accepted only when it resolves (``..`` and symlinks followed) to a file under a
configured slide root, or to one of the listed examples. Anything else gets one message,
``OUTSIDE``, whatever the file is or whether it exists, so the path box is no file-system oracle.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pathvlm.errors import ConfigError, PathVLMError

log = logging.getLogger(__name__)

OUTSIDE = "not available: server paths must lie under a slide root this server offers"
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".dcm", ".vms", ".svslide",
                  ".png", ".jpg", ".jpeg"}
MANIFEST_SUFFIXES = {".yaml", ".yml", ".json"}
MAX_EXAMPLES_PER_SOURCE = 6
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}


class PathRefused(PathVLMError):
    """A server path outside every slide root; the message never says more than ``OUTSIDE``."""

    def __init__(self) -> None:
        super().__init__(OUTSIDE)


@dataclass(frozen=True)
class DeployConfig:
    """Limits and roots of one app process (``app.py`` flags; ``PATHVLM_*`` environment variables).

    Attributes:
        slide_roots: folders whose files (and sub-folders) may be opened by server path.
        max_file_size: upload limit in gradio's syntax ("200mb").
        max_pixels: plain images: decoded pixels; whole slides: the tile grid's pixels at the
            model's embedding resolution (level-0 pixels when the file records no mpp).
        max_session_slides: slides one session's case may hold.
        max_session_feature_mb: cached features one session may pin.
        max_cache_mb: all sessions' prepared slides (features + thumbnails) held in memory;
            least recently used dropped first.
        audit_log: a JSON-lines file of open / ask / report events, or None.
        audit_text: also record question text in the audit log.
    """

    slide_roots: tuple[Path, ...] = ()
    max_file_size: str = "2gb"
    max_pixels: int = 100_000_000
    max_session_slides: int = 12
    max_session_feature_mb: float = 512.0
    max_cache_mb: float = 2048.0
    audit_log: Path | None = None
    audit_text: bool = False
    examples: dict[str, Path] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        parse_size(self.max_file_size)
        for name in ("max_pixels", "max_session_slides", "max_session_feature_mb", "max_cache_mb"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for root in self.slide_roots:
            if not Path(root).is_dir():
                raise ConfigError(f"slide root {root}: not a folder")

    @property
    def max_file_bytes(self) -> int:
        return parse_size(self.max_file_size)

    def limits_markdown(self) -> str:
        """The limits as one line for the UI."""
        return (f"Limits: upload {self.max_file_size}, {self.max_pixels / 1e6:g} Mpx an image or slide "
                f"(at the embedding resolution), {self.max_session_slides} slides and "
                f"{self.max_session_feature_mb:g} MB of features a session"
                + ("; the server keeps an audit log" if self.audit_log else ""))


def parse_size(text: str) -> int:
    """``"500mb"`` -> bytes (gradio's upload-limit syntax)."""
    m = _SIZE.match(str(text))
    if m is None:
        raise ConfigError(f"size {text!r}: expected a number with b, kb, mb, gb or tb (e.g. 500mb)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def roots_from_env(value: str | None = None) -> list[Path]:
    """``PATHVLM_SLIDE_ROOTS`` (``os.pathsep``-separated) as paths; empty entries skipped."""
    value = os.environ.get("PATHVLM_SLIDE_ROOTS", "") if value is None else value
    return [Path(p) for p in value.split(os.pathsep) if p.strip()]


def _real(path: str | Path) -> Path:
    """``..`` removed lexically first (so ``file/..`` never depends on what ``file`` is), then
    symlinks followed; a path that cannot be resolved is refused like one outside the roots."""
    try:
        return Path(os.path.realpath(os.path.normpath(os.fspath(path))))
    except (ValueError, OSError, UnicodeError):  # embedded NUL, undecodable names
        raise PathRefused() from None


class SlideAccess:
    """Which server paths may be opened: files under the roots, and the examples by name."""

    def __init__(self, roots: tuple[Path, ...] | list[Path] = (), examples: dict[str, Path] | None = None):
        self.roots = tuple(_real(r) for r in roots)
        self.examples = dict(examples or {})
        self._example_files = {_real(p) for p in self.examples.values()}

    @property
    def has_roots(self) -> bool:
        return bool(self.roots)

    def resolve(self, text: str | Path) -> Path:
        """The real path of ``text`` if it may be opened, else ``PathRefused``.

        A relative path is looked up under each root in turn (the first where it exists wins).
        Errors past this point (missing file inside a root, not a slide) may be specific.
        """
        raw = os.fspath(text).strip() if isinstance(text, (str, Path)) else ""
        if not raw or len(raw) > 4096 or "\x00" in raw:
            raise PathRefused()
        if raw in self.examples:
            return _real(self.examples[raw])
        if os.path.isabs(raw):
            candidates = [_real(raw)]
        else:
            candidates = [_real(root / raw) for root in self.roots]
        inside = [c for c in candidates if self.allows(c)]
        if not inside:
            raise PathRefused()
        for c in inside:
            try:
                if c.exists():
                    return c
            except (OSError, ValueError):  # e.g. a name too long for the file system
                continue
        return inside[0]

    def allows(self, real: Path) -> bool:
        """``real`` (already resolved) is an example file or lies under a root."""
        return real in self._example_files or any(real.is_relative_to(r) for r in self.roots)

    def manifest_resolver(self, uploaded: bool):
        """A ``load_case`` slide-path hook: relative paths of an uploaded manifest are looked up
        under the roots, those of a manifest on the server beside it; all must pass ``resolve``."""

        def resolve(raw: Path, base: Path) -> Path:
            if raw.is_absolute() or uploaded:
                return self.resolve(raw)
            return self.resolve(base / raw)

        return resolve


def _openable(path: Path) -> bool:
    """Cheap check that an example opens (the header only: plain images are not decoded)."""
    from pathvlm.slide import open_slide
    from pathvlm.slide.image_backend import looks_like_image

    try:
        if not path.is_file():
            return False
        if path.suffix.lower() in {".png", ".jpg", ".jpeg"}:
            return looks_like_image(path)
        open_slide(path).close()
        return True
    except (PathVLMError, OSError) as exc:
        log.info("example %s left out: %s", path, exc)
        return False


def find_examples(roots: tuple[Path, ...] | list[Path] = (), data_dir: Path | None = None) -> dict[str, Path]:
    """Example slides by file name: scikit-image's ``ihc.png``, then the first slides of each root
    and of ``<data_dir>/wsi``. Files that are missing or do not open are left out."""
    sources: list[Path] = []
    try:
        import skimage

        sources.append(Path(skimage.__file__).parent / "data" / "ihc.png")
    except ImportError:
        pass
    folders = list(roots) + ([data_dir / "wsi"] if data_dir is not None else [])
    for folder in folders:
        try:
            files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
        except OSError:
            continue
        sources += files[: MAX_EXAMPLES_PER_SOURCE * 2]
    out: dict[str, Path] = {}
    per_folder: dict[Path, int] = {}
    for path in sources:
        if per_folder.get(path.parent, 0) >= MAX_EXAMPLES_PER_SOURCE or not _openable(path):
            continue
        real = _real(path)
        if real in out.values():
            continue
        name, n = path.name, 2
        while name in out:
            name, n = f"{path.name} ({n})", n + 1
        out[name] = real
        per_folder[path.parent] = per_folder.get(path.parent, 0) + 1
    return out
