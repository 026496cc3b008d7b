"""Class descriptions (pathvlm/configs/classes/*.yaml): names, caption variants and zero-shot prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pathvlm.errors import ConfigError
from pathvlm.resources import resolve_resource

ADEQUACY = ("Adequate", "Limited", "Inadequate")


@dataclass(frozen=True)
class ClassInfo:
    """One class: its label as in the data index, a readable name and interchangeable captions."""

    label: str
    name: str
    captions: tuple[str, ...]
    synonyms: tuple[str, ...] = ()
    confirm: str | None = None  # ancillary tests that an entity assignment needs
    # aspect (growth_pattern, cell_size, cytology, ...) -> its morphology in the field's vocabulary
    features: tuple[tuple[str, str], ...] = ()
    next_steps: str | None = None  # tests worth ordering when no `confirm` panel applies
    adequacy: str = "Adequate"  # what a field of this class alone says about adequacy

    def feature(self, aspect: str) -> str | None:
        return dict(self.features).get(aspect)


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
    """Read a class description YAML (a file or a packaged name: ``pathvlm list classes``).

    Missing fields or empty caption lists raise ConfigError.
    """
    path = resolve_resource("classes", path)
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
        unknown = set(entry) - {"name", "captions", "synonyms", "confirm", "features", "next_steps", "adequacy"}
        if unknown:
            raise ConfigError(f"{path}: class {label!r} has unknown key(s) {', '.join(sorted(unknown))}")
        features = entry.get("features") or {}
        if not isinstance(features, dict) or not all(isinstance(v, str) for v in features.values()):
            raise ConfigError(f"{path}: class {label!r}: 'features' must map an aspect to a text")
        if entry.get("adequacy", "Adequate") not in ADEQUACY:
            raise ConfigError(f"{path}: class {label!r}: 'adequacy' must be one of {', '.join(ADEQUACY)}")
        classes.append(ClassInfo(
            label=str(label), name=str(entry["name"]),
            captions=tuple(str(c) for c in entry["captions"]),
            synonyms=tuple(str(s) for s in entry.get("synonyms") or ()),
            confirm=entry.get("confirm"), features=tuple((str(k), v) for k, v in features.items()),
            next_steps=entry.get("next_steps"), adequacy=entry.get("adequacy", "Adequate"),
        ))
    return ClassSet(
        name=str(data.get("name", path.stem)), subject=str(data.get("subject", "tissue")),
        templates=tuple(templates), classes=tuple(classes), path=str(path),
    )
