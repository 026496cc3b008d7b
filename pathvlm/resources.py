"""Package data (prompt sets, class files, training configs, example cases, shipped weights).

Everything is read through ``importlib.resources``, so an installed wheel finds what a checkout
does. ``resolve_resource(kind, name_or_path)`` is the one resolver: an existing file wins, else a
packaged name (``"crc_tissue"``), else one error listing the packaged names. Real data lives
outside the package: ``data_dir()`` is ``$PATHVLM_DATA`` or ``../shared/data`` beside a checkout.
"""

from __future__ import annotations

import importlib.util
import os
import re
from importlib import resources
from pathlib import Path

from pathvlm.errors import ConfigError

# kind -> (folder inside the package, accepted suffixes, what one file is, for messages)
KINDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "prompts": ("configs/prompts", (".json",), "prompt set"),
    "classes": ("configs/classes", (".yaml", ".yml"), "class description file"),
    "configs": ("configs/train", (".yaml", ".yml"), "training config"),
    "cases": ("configs/cases", (".yaml", ".yml", ".json"), "case manifest"),
}


def package_path(*parts: str) -> Path:
    """A file or folder inside the installed ``pathvlm`` package, as a real filesystem path.

    Raises:
        ConfigError: the package is not on a filesystem (zip import); pathvlm needs real files
            for its weights (safetensors are memory-mapped).
    """
    root = resources.files("pathvlm")
    if not isinstance(root, Path):  # a zipimport Traversable: weights cannot be mapped from it
        raise ConfigError(f"pathvlm is imported from {root}, not a folder; install it as a wheel "
                          "(pip install), not as a zip")
    return root.joinpath(*parts)


def _kind(kind: str) -> tuple[str, tuple[str, ...], str]:
    if kind not in KINDS:
        raise ConfigError(f"unknown resource kind {kind!r} (known: {', '.join(KINDS)})")
    return KINDS[kind]


def list_resources(kind: str) -> list[str]:
    """Packaged names of one kind (``prompts``, ``classes``, ``configs``, ``cases``), sorted."""
    folder, suffixes, _ = _kind(kind)
    base = package_path(folder)
    if not base.is_dir():
        return []
    return sorted(p.stem for p in base.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def resource_file(kind: str, name: str) -> Path:
    """The packaged file of ``kind`` called ``name`` (stem or file name); ConfigError if none."""
    folder, suffixes, what = _kind(kind)
    stem = Path(name).stem if Path(name).suffix.lower() in suffixes else name
    if stem in list_resources(kind):
        for suffix in suffixes:
            path = package_path(folder, stem + suffix)
            if path.is_file():
                return path
    raise ConfigError(f"{name}: not a packaged {what} (known: {', '.join(list_resources(kind)) or 'none'})")


def resolve_resource(kind: str, spec: str | Path) -> Path:
    """A user's ``spec`` for a prompt set, class file, training config or case, as a file path.

    An existing file is used as is; otherwise ``spec`` (``"crc_tissue"`` or ``"crc_tissue.json"``)
    names a packaged file. Anything else is one ConfigError naming ``spec`` and the known names.
    """
    _kind(kind)
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    text = str(spec)
    if os.sep not in text and "/" not in text:
        try:
            return resource_file(kind, text)
        except ConfigError:
            pass
    raise ConfigError(f"{spec}: {not_found_message(kind)}")


def not_found_message(kind: str) -> str:
    """Why a spec of ``kind`` did not resolve, with the packaged names (for wrapped errors)."""
    _folder, _suffixes, what = _kind(kind)
    known = ", ".join(list_resources(kind)) or "none"
    return f"no such file, and not a packaged {what} (known: {known}; `pathvlm list {kind}`)"


def checkout_root() -> Path | None:
    """The source checkout pathvlm is imported from (a folder with pyproject.toml and .git), or None."""
    root = package_path().parent
    if (root / "pyproject.toml").is_file() and (root / ".git").exists():
        return root
    return None


def data_dir() -> Path | None:
    """Where real data lives: ``$PATHVLM_DATA``, else ``../shared/data`` beside the checkout.

    None when neither exists (an installed package without data).
    """
    env = os.environ.get("PATHVLM_DATA")
    if env:
        return Path(env).expanduser()
    root = checkout_root()
    if root is not None and (root.parent / "shared" / "data").is_dir():
        return (root.parent / "shared" / "data").resolve()
    return None


def demo_weights_dir() -> Path:
    """The shipped ``pathvlm-demo`` model directory inside the package."""
    return package_path("model", "weights", "demo")


def _skimage_data() -> Path | None:
    spec = importlib.util.find_spec("skimage")  # its folder, without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data"
    return path if path.is_dir() else None


# roots a manifest path may start with ($NAME/... or ${NAME}/...); the environment overrides each
DATA_ROOTS = {"PATHVLM_DATA": data_dir, "SKIMAGE_DATA": _skimage_data}
_ROOT = re.compile(r"^\$(?:\{(?P<braced>\w+)\}|(?P<plain>\w+))(?=[/\\]|$)")


def expand_data_path(text: str | Path) -> Path:
    """``$PATHVLM_DATA/wsi/x.svs`` (or ``$SKIMAGE_DATA/ihc.png``) -> a path under that root.

    Paths without a known root come back unchanged. A root that is not available is one
    ConfigError saying that the data is not installed and how to point at it.
    """
    m = _ROOT.match(str(text))
    if m is None or (m["braced"] or m["plain"]) not in DATA_ROOTS:
        return Path(text)
    name = m["braced"] or m["plain"]
    root = Path(os.environ[name]).expanduser() if os.environ.get(name) else DATA_ROOTS[name]()
    if root is None:
        hint = ("set PATHVLM_DATA to the data folder (../shared/data beside a checkout is used "
                "when present)") if name == "PATHVLM_DATA" else f"set {name} or install scikit-image"
        raise ConfigError(f"{text}: the example data is not installed (${name} is unknown: {hint})")
    return root / str(text)[m.end():].lstrip("/\\")
