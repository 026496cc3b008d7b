"""Class descriptions (configs/classes/*.yaml): names, caption variants and zero-shot prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pathvlm.errors import ConfigError


@dataclass(frozen=True)
class ClassInfo:
    """One class: its label as in the data index, a readable name and interchangeable captions."""

    label: str
    name: str
    captions: tuple[str, ...]
    synonyms: tuple[str, ...] = ()
    confirm: str | None = None  # ancillary tests that an entity assignment needs


@dataclass(frozen=True)
class ClassSet:
    """All classes of one task, in file order, plus the prompt templates ("... {name} ...")."""

    name: str
    subject: str
    templates: tuple[str, ...]
    classes: tuple[ClassInfo, ...] = field(default_factory=tuple)
    path: str = ""

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.classes]

    def get(self, label: str) -> ClassInfo:
        for info in self.classes:
            if info.label == label:
                return info
        raise ConfigError(f"{self.path}: label {label!r} is not described (known: {', '.join(self.labels)})")

    def prompts(self, label: str) -> list[str]:
        """Zero-shot prompts for one class: every template with the name and each synonym."""
        info = self.get(label)
        names = [info.name, *info.synonyms]
        return [t.format(name=n) for t in self.templates for n in names]


def load_class_set(path: str | Path) -> ClassSet:
    """Read a class description YAML; missing fields or empty caption lists raise ConfigError."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read class descriptions ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("classes"), dict) or not data["classes"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty 'classes' section")
    templates = data.get("templates") or ["an H&E image of {name}."]
    if not all(isinstance(t, str) and "{name}" in t for t in templates):
        raise ConfigError(f"{path}: every template must be a string containing {{name}}")
    classes = []
    for label, entry in data["classes"].items():
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("captions"):
            raise ConfigError(f"{path}: class {label!r} needs 'name' and a non-empty 'captions' list")
        unknown = set(entry) - {"name", "captions", "synonyms", "confirm"}
        if unknown:
            raise ConfigError(f"{path}: class {label!r} has unknown key(s) {', '.join(sorted(unknown))}")
        classes.append(ClassInfo(
            label=str(label), name=str(entry["name"]),
            captions=tuple(str(c) for c in entry["captions"]),
            synonyms=tuple(str(s) for s in entry.get("synonyms") or ()),
            confirm=entry.get("confirm"),
        ))
    return ClassSet(
        name=str(data.get("name", path.stem)), subject=str(data.get("subject", "tissue")),
        templates=tuple(templates), classes=tuple(classes), path=str(path),
    )
