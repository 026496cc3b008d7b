"""Labelled image sets for evaluation: a folder with one sub-folder per class, or a CSV.

CSV columns: ``path,label[,specimen][,split][,mpp]``; relative paths are resolved against the
CSV's folder. The specimen column groups images for specimen-level bootstrap resampling; ``mpp``
is an image's own um/px (empty: not known), which wins over ``--mpp``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from pathvlm.errors import ConfigError
from pathvlm.zeroshot import IMAGE_SUFFIXES, PromptSet


@dataclass
class LabeledDataset:
    """Image paths with labels; ``specimens`` is None when the source records none."""

    paths: list[Path]
    labels: list[str]
    specimens: list[str] | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)
    mpps: list[float | None] | None = None  # per-image um/px from a CSV 'mpp' column

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def classes(self) -> list[str]:
        """Labels present, in first-seen order of a sorted walk (stable across runs)."""
        return sorted(set(self.labels), key=self.labels.index)

    def subset(self, idx: list[int]) -> LabeledDataset:
        return LabeledDataset(
            [self.paths[i] for i in idx],
            [self.labels[i] for i in idx],
            [self.specimens[i] for i in idx] if self.specimens else None,
            self.source,
            dict(self.meta),
            [self.mpps[i] for i in idx] if self.mpps else None,
        )

    def image_mpps(self, default: float | None = None) -> list[float | None]:
        """Each image's um/px: its own CSV value, else ``default`` (``--mpp``), else None."""
        own = self.mpps or [None] * len(self.paths)
        return [m if m is not None else default for m in own]


def load_image_folder(root: str | Path) -> LabeledDataset:
    """``root/<class>/**/<image>``: the sub-folder name is the label."""
    root = Path(root)
    paths, labels = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(sub.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(f)
                labels.append(sub.name)
    if not paths:
        raise ConfigError(
            f"{root}: no class sub-folders with images (expected {root}/<class>/<image>)"
        )
    return LabeledDataset(paths, labels, None, str(root))


def load_csv(path: str | Path, split: str | None = None) -> LabeledDataset:
    """A CSV of ``path,label[,specimen][,split]``; ``split`` keeps only rows of that split."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read dataset CSV ({exc.strerror or exc})") from exc
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise ConfigError(f"{path}: dataset CSV needs a header with 'path' and 'label' columns")
    if split is not None:
        if "split" not in rows[0]:
            raise ConfigError(f"{path}: --split {split} given but the CSV has no 'split' column")
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise ConfigError(f"{path}: no rows with split == {split!r}")
    paths, labels, specimens, mpps = [], [], [], []
    for n, row in enumerate(rows, start=2):
        p = Path(row["path"])
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise ConfigError(f"{path}: line {n}: image {p} not found")
        if not (row["label"] or "").strip():
            raise ConfigError(f"{path}: line {n}: empty label")
        paths.append(p)
        labels.append(row["label"].strip())
        specimens.append((row.get("specimen") or "").strip())
        mpps.append(_row_mpp(path, n, row.get("mpp")))
    has_specimen = "specimen" in rows[0] and all(specimens)
    return LabeledDataset(
        paths,
        labels,
        specimens if has_specimen else None,
        str(path),
        {"split": split} if split else {},
        mpps if any(m is not None for m in mpps) else None,
    )


def _row_mpp(path: Path, line: int, text: str | None) -> float | None:
    if text is None or not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{path}: line {line}: mpp must be a positive number of um/px, got {text!r}")
    return value


def load_dataset(source: str | Path, split: str | None = None) -> LabeledDataset:
    """A class-per-sub-folder directory or a CSV file (see module docstring)."""
    source = Path(source)
    if source.is_dir():
        if split is not None:
            if (source / split).is_dir():
                return load_image_folder(source / split)
            raise ConfigError(f"{source}: --split {split} needs {source / split}/ or a CSV")
        return load_image_folder(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return load_csv(source, split)
    raise ConfigError(f"{source}: not a folder of class sub-folders nor a .csv file")


def _norm(s: str) -> str:
    return " ".join(s.replace("_", " ").replace("-", " ").lower().split())


def match_classes(labels: list[str], prompt_set: PromptSet) -> dict[str, str]:
    """Map every data label to a prompt class, by key or synonym, case-insensitively.

    Raises:
        ConfigError: a label matches no class, or matches several.
    """
    index: dict[str, set[str]] = {}
    for key, synonyms in prompt_set.classes.items():
        for name in (key, *synonyms):
            index.setdefault(_norm(name), set()).add(key)
    mapping, missing = {}, []
    for label in sorted(set(labels)):
        hits = index.get(_norm(label), set())
        if len(hits) == 1:
            mapping[label] = next(iter(hits))
        elif len(hits) > 1 and label in hits:
            mapping[label] = label
        elif hits:
            raise ConfigError(
                f"data label {label!r} matches several classes of {prompt_set.source}: "
                f"{sorted(hits)}"
            )
        else:
            missing.append(label)
    if missing:
        raise ConfigError(
            f"data labels {missing} match no class key or synonym in {prompt_set.source} "
            f"(classes: {', '.join(prompt_set.names)})"
        )
    return mapping
