"""A case: the slides of one patient specimen, its clinical input and entered ancillary results.

One slide is a case of one (`Case.from_inputs`). Manifests are YAML or JSON (`load_case`); any
problem is one `CaseError` naming the file, the entry and the problem, and nothing is returned.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pathvlm.errors import ConfigError, PathVLMError, one_line
from pathvlm.reports import ancillary
from pathvlm.resources import expand_data_path, not_found_message, resolve_resource

ROLES = ("tumor", "lymph_node", "margin", "normal", "other")
_STAIN = re.compile(r"^(?P<kind>IHC|special)\s*:\s*(?P<what>\S.*)$", re.IGNORECASE)


class CaseError(ConfigError):
    """A manifest problem: names the file, the entry and the problem."""

    def __init__(self, path: str | Path, entry: str, problem: str):
        self.path, self.entry, self.problem = str(path), one_line(entry), one_line(problem)
        super().__init__(f"{one_line(self.path)}: {self.entry}: {self.problem}")


def normalize_stain(text: str) -> str:
    """'H&E', 'IHC:<marker>' or 'special:<stain>' in canonical spelling; ValueError otherwise."""
    stripped = text.strip()
    if stripped.upper() in ("H&E", "HE"):
        return "H&E"
    m = _STAIN.match(stripped)
    if m is None:
        raise ValueError(f"unknown stain syntax {text!r}; use 'H&E', 'IHC:<marker>' or "
                         "'special:<stain>'")
    kind = "IHC" if m["kind"].upper() == "IHC" else "special"
    return f"{kind}:{m['what'].strip()}"


class SlideRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Path
    stain: str = "H&E"
    part: str | None = Field(default=None, description="part/block label, e.g. 'A3'")
    role: Literal[ROLES] | None = None  # type: ignore[valid-type]
    mpp: float | None = Field(default=None, gt=0, description="um/px of a plain image (tile, photo); "
                              "a resolution the slide file records wins")

    @field_validator("stain")
    @classmethod
    def _check_stain(cls, v: str) -> str:
        return normalize_stain(v)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def marker(self) -> str | None:
        return self.stain.split(":", 1)[1] if self.stain.startswith("IHC:") else None

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "stain": self.stain,
                "part": self.part, "role": self.role, "mpp": self.mpp}


class AncillaryResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    test: str
    target: str
    result: Literal[ancillary.RESULTS]  # type: ignore[valid-type]
    value: str | float | None = None
    note: str | None = None

    @field_validator("test")
    @classmethod
    def _known_test(cls, v: str) -> str:
        test = ancillary.canonical_test(v)
        if test is None:
            raise ValueError(f"unknown test {v!r}; known: {', '.join(ancillary.TESTS)}")
        return test

    @field_validator("target")
    @classmethod
    def _known_target(cls, v: str) -> str:
        target = ancillary.canonical_target(v)
        if target is None:
            raise ValueError(f"unknown target {v!r} (see pathvlm.reports.ancillary.TARGETS)")
        return target

    @model_validator(mode="after")
    def _value_given(self) -> AncillaryResult:
        if (self.result == "value") != (self.value is not None):
            raise ValueError("give 'value' exactly when result is 'value'")
        return self


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    slides: list[SlideRef] = Field(min_length=1)
    clinical: dict[str, Any] = Field(default_factory=dict)
    ancillary_results: list[AncillaryResult] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_and_known(self) -> Case:
        seen: dict[str, int] = {}
        for i, s in enumerate(self.slides):
            for key in (str(s.path), s.name):
                if key in seen and seen[key] != i:
                    how = "" if key == str(s.path) else ", same slide name"
                    raise ValueError(f"slides[{i}] ({s.path}) duplicates slides[{seen[key]}]{how}")
                seen[key] = i
        from pathvlm.reports.schemas import get_report_type, list_report_types

        known = {f for t in list_report_types() for f in get_report_type(t).field_names}
        unknown = sorted(set(self.clinical) - known)
        if unknown:
            raise ValueError(f"clinical: unknown field(s) {', '.join(unknown)}")
        return self

    @classmethod
    def from_inputs(cls, paths: Sequence[str | Path], case_id: str | None = None,
                    stain: str = "H&E") -> Case:
        """A case of the given slide/image files (all `stain`), id from the first file."""
        for p in paths:
            if not Path(p).exists():
                raise CaseError(p, "input", "file not found")
        try:
            return cls(id=case_id or Path(paths[0]).stem,
                       slides=[SlideRef(path=Path(p), stain=stain) for p in paths])
        except ValidationError as exc:
            raise _as_case_error("inputs", {"slides": [str(p) for p in paths]}, exc) from None
        except IndexError:
            raise CaseError("inputs", "slides", "no input given") from None

    def slide(self, name: str) -> SlideRef:
        for s in self.slides:
            if s.name == name:
                return s
        raise KeyError(name)


def _entry_name(data: Any, loc: Sequence[Any]) -> str:
    parts, node = [], data
    for item in loc:
        parts.append(f"[{item}]" if isinstance(item, int) else f".{item}")
        node = node[item] if isinstance(node, (dict, list)) and _has(node, item) else None
    name = "".join(parts).lstrip(".") or "manifest"
    if len(loc) >= 2 and loc[0] == "slides" and isinstance(data, dict):
        slide = data["slides"][loc[1]] if _has(data.get("slides"), loc[1]) else None
        if isinstance(slide, dict) and "path" in slide:
            name += f" ({slide['path']})"
    return name


def _has(node: Any, key: Any) -> bool:
    if isinstance(node, list):
        return isinstance(key, int) and 0 <= key < len(node)
    return isinstance(node, dict) and key in node


def _as_case_error(path: str | Path, data: Any, exc: ValidationError) -> CaseError:
    err = exc.errors()[0]
    loc = list(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if not loc and msg.startswith("slides["):  # case-level check that names its slide
        entry, _, msg = msg.partition(" duplicates ")
        return CaseError(path, entry, f"duplicate slide (same as {msg})")
    if not loc and msg.startswith("clinical:"):
        return CaseError(path, "clinical", msg.removeprefix("clinical: "))
    return CaseError(path, _entry_name(data, loc), msg)


def load_case(path: str | Path, resolve_slide: Callable[[Path, Path], Path] | None = None) -> Case:
    """Read a YAML/JSON case manifest (a file or a packaged example: ``pathvlm list cases``).

    Slide paths may start with ``$PATHVLM_DATA/`` (the data folder, see
    ``pathvlm.resources.data_dir``) or ``$SKIMAGE_DATA/``; other relative paths resolve against
    the manifest's folder.

    Args:
        resolve_slide: ``(path as written, manifest folder) -> real path``, raising a
            ``PathVLMError`` for a path that may not be opened (the app's slide roots); it runs
            before the file is looked for, so a refusal says nothing about the file.
    """
    path = Path(path)
    if not path.exists():
        try:
            path = resolve_resource("cases", path)
        except ConfigError:
            raise CaseError(path, "manifest", f"cannot read: {not_found_message('cases')}") from None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CaseError(path, "manifest", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CaseError(path, "manifest", f"not UTF-8 text (byte {exc.start})") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise CaseError(path, "manifest", f"invalid {kind}: {' '.join(str(exc).split())}") \
            from None
    except RecursionError:
        raise CaseError(path, "manifest", "nested too deeply") from None
    if not isinstance(data, dict):
        raise CaseError(path, "manifest", "expected a mapping with 'id' and 'slides'")
    data.setdefault("id", path.stem.removesuffix(".case"))
    try:
        case = Case.model_validate(data)
    except ValidationError as exc:
        raise _as_case_error(path, data, exc) from None
    except RecursionError:
        raise CaseError(path, "manifest", "nested too deeply") from None
    for i, s in enumerate(case.slides):
        try:
            given = expand_data_path(s.path)
        except ConfigError as exc:
            raise CaseError(path, f"slides[{i}]", str(exc)) from None
        if resolve_slide is not None:
            try:
                resolved = resolve_slide(given, path.parent)
            except PathVLMError as exc:
                raise CaseError(path, f"slides[{i}] ({s.path})", str(exc)) from None
        else:
            try:
                resolved = given if given.is_absolute() else (path.parent / given).resolve()
            except (OSError, ValueError) as exc:  # a NUL byte, a symlink loop
                raise CaseError(path, f"slides[{i}] ({s.path})", f"not a usable path ({exc})") from None
        try:
            found = resolved.exists()
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte
            found = False
        if not found:
            raise CaseError(path, f"slides[{i}] ({s.path})", f"slide file not found: {resolved}")
        s.path = resolved
    try:  # duplicates may only show once relative paths are resolved
        return Case.model_validate(case.model_dump())
    except ValidationError as exc:
        raise _as_case_error(path, case.model_dump(mode="json"), exc) from None
