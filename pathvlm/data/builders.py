"""Builders: a labelled image folder or index CSV + class descriptions -> pairs and chat JSONL.

Splits follow the index's `split` column when there is one, else are drawn per class over
specimens (or single images when the index has no specimen column), never over tiles of one
specimen. Everything is seeded: the same inputs and seed give byte-identical files.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathvlm.data.classes import ClassInfo, ClassSet, load_class_set
from pathvlm.data.conversations import CHAT_TYPES, chat_turns, types_for_image
from pathvlm.data.formats import SLIDE_TOKEN, write_jsonl
from pathvlm.data.questions import LETTERS, mc_answer, mc_question, yesno_answer, yesno_question
from pathvlm.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
# chat question types (pathvlm.data.dialogue) rotate over the images, `chat_per_image` each;
# caption/open/report are the earlier single-form tasks, still available with --tasks
TASKS = (*CHAT_TYPES, "yesno", "mc", "caption", "open", "report")
DEFAULT_TASKS = (*CHAT_TYPES, "yesno", "mc")


@dataclass
class BuildConfig:
    """Options of `pathvlm data build`."""

    classes: str = ""  # class description YAML
    val_fraction: float = 0.2  # only used when the index has no split column
    seed: int = 0
    captions_per_image: int = 1
    # extra pairs per image whose text is a class template with the class name or a synonym
    # ("an H&E image of follicular lymphoma."): descriptions alone never name the class, and
    # zero-shot prompts do, so these pairs tie the names to the images
    named_captions: int = 1
    tasks: tuple[str, ...] = DEFAULT_TASKS
    # chat-type conversations per image, a window rotating over the chat types in `tasks`
    chat_per_image: int = 5
    # options per multiple-choice question; 0: a random number from 2 to all classes each time, so
    # every question size (and letter) the model may be asked is trained
    mc_options: int = 4
    # yes/no and multiple-choice records per image, each with its own option order or candidate:
    # one per image lets a small LLM score by the prior of a letter or of "yes"
    closed_per_image: int = 2
    # regex whose first match in the specimen id names the case: specimens of one case share a split
    # (e.g. "^sj-\\d+-\\d+" keeps sj-05-6124-R3 and sj-05-6124-R4 together)
    case_pattern: str = ""
    # at most this many images per class and split (a seeded sample; 0 = all): a large set such as
    # PCam's 10,000 patches can feed instruction data at a size CPU training gets through
    max_per_class: int = 0


@dataclass(frozen=True)
class IndexRow:
    image: str  # absolute path
    label: str
    specimen: str | None
    split: str | None


def read_index(source: str | Path) -> list[IndexRow]:
    """Rows of an index CSV (``path,label[,specimen][,split]``) or of a ``<label>/<image>`` folder."""
    source = Path(source)
    if source.is_dir():
        rows = [IndexRow(str(p.resolve()), p.parent.name, None, None)
                for p in sorted(source.glob("*/*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not rows:
            raise ConfigError(f"{source}: no images in <label>/ sub-folders")
        return rows
    try:
        with source.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header, raw = reader.fieldnames or [], list(reader)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read index ({exc.strerror or exc})") from exc
    if "path" not in header or "label" not in header:
        raise ConfigError(f"{source}: index needs columns path,label[,specimen][,split]")
    rows = []
    for number, r in enumerate(raw, 2):
        if not r["path"] or not r["label"]:
            raise ConfigError(f"{source}:{number}: empty path or label")
        image = (source.parent / r["path"]).resolve()
        if not image.is_file():
            raise ConfigError(f"{source}:{number}: image {image} does not exist")
        rows.append(IndexRow(str(image), r["label"], r.get("specimen") or None, r.get("split") or None))
    if not rows:
        raise ConfigError(f"{source}: no rows")
    return rows


def _case_of(specimen: str, case_pattern: str) -> str:
    if not case_pattern:
        return specimen
    try:
        match = re.search(case_pattern, specimen)
    except re.error as exc:
        raise ConfigError(f"case pattern {case_pattern!r} is not a valid regex ({exc})") from exc
    return match.group(0) if match else specimen


def assign_splits(rows: list[IndexRow], val_fraction: float, seed: int, case_pattern: str = "") -> list[IndexRow]:
    """Keep an index's own splits (checked case-disjoint) or draw train/val per class by case.

    A case is the specimen (reduced by ``case_pattern``) or, without a specimen column, the image.
    """
    group_of = {r.image: _case_of(r.specimen, case_pattern) if r.specimen else r.image for r in rows}
    has_split = [r.split is not None for r in rows]
    if all(has_split):
        seen: dict[str, str] = {}
        for r in rows:
            case = group_of[r.image]
            if r.specimen is not None and seen.setdefault(case, r.split) != r.split:
                raise ConfigError(f"specimen {r.specimen!r} (case {case!r}) appears in splits {seen[case]!r} "
                                  f"and {r.split!r}; splits must be by specimen")
        return rows
    if any(has_split):
        raise ConfigError("the index's split column is empty for some rows; fill it for all or none")
    groups_by_label: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        group = group_of[r.image]
        if group not in groups_by_label[r.label]:
            groups_by_label[r.label].append(group)
    rng = random.Random(seed)
    val_groups = set()
    for label in sorted(groups_by_label):
        groups = sorted(groups_by_label[label])
        rng.shuffle(groups)
        n_val = min(len(groups) - 1, math.ceil(val_fraction * len(groups))) if val_fraction > 0 else 0
        val_groups.update(groups[:n_val])
    return [IndexRow(r.image, r.label, r.specimen, "val" if group_of[r.image] in val_groups else "train")
            for r in rows]


def assign_folds(rows: list[IndexRow], k: int, seed: int = 0, case_pattern: str = "") -> list[int]:
    """A fold number in ``[0, k)`` for every row: stratified by label, disjoint by case.

    Within each label the cases (specimens reduced by ``case_pattern``, or single images without a
    specimen column) are shuffled with ``seed`` and dealt round-robin, so every fold holds
    ``len(cases) // k`` or one more cases of each label, and a case never spans two folds.
    """
    if k < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {k}")
    group_of = [_case_of(r.specimen, case_pattern) if r.specimen else r.image for r in rows]
    cases_by_label: dict[str, list[str]] = defaultdict(list)
    for r, group in zip(rows, group_of):
        if group not in cases_by_label[r.label]:
            cases_by_label[r.label].append(group)
    rng = random.Random(seed)
    fold_of: dict[tuple[str, str], int] = {}
    start = 0  # labels with fewer cases than folds do not all crowd into fold 0
    for label in sorted(cases_by_label):
        cases = sorted(cases_by_label[label])
        if len(cases) < k:
            raise ConfigError(f"label {label!r} has {len(cases)} case(s), fewer than the {k} folds")
        rng.shuffle(cases)
        for i, case in enumerate(cases):
            fold_of[(label, case)] = (start + i) % k
        start += len(cases)
    return [fold_of[(r.label, group)] for r, group in zip(rows, group_of)]


def _answer(info: ClassInfo, caption: str) -> str:
    text = f"{caption} These features are most consistent with {info.name}."
    if info.confirm:
        text += f" H&E alone does not establish the entity: confirm with {info.confirm}."
    return text


def _turn(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{SLIDE_TOKEN}\n{question}"}, {"role": "assistant", "content": answer}]


def _closed(task: str, info: ClassInfo, others: list[ClassInfo], cfg: BuildConfig, rng: random.Random,
            yes: bool) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """One yes/no or multiple-choice turn about an image of `info`, answered name first."""
    if task == "yesno":
        candidate = info if yes or not others else rng.choice(others)
        question = rng.choice([f"Is this {candidate.name}? Answer yes or no.", yesno_question(candidate.name)])
        return (_turn(question, yesno_answer(info.name, candidate.name)),
                {"answer": "yes" if candidate is info else "no"})
    n_options = cfg.mc_options or rng.randint(2, len(others) + 1)
    options = [info] + rng.sample(others, min(len(others), n_options - 1))
    rng.shuffle(options)
    index = options.index(info)
    names = [o.name for o in options]
    listing = "\n".join(f"{LETTERS[i]}. {name}" for i, name in enumerate(names))
    question = rng.choice([f"Which option best describes this image?\n{listing}\nAnswer with the option and its letter.",
                           mc_question(names)])
    return (_turn(question, mc_answer(info.name, index)),
            {"options": [o.label for o in options], "option_names": names, "answer_index": index})


def _instructions(row: IndexRow, info: ClassInfo, classes: ClassSet, cfg: BuildConfig,
                  rng: random.Random, yes: bool, index: int) -> list[dict[str, Any]]:
    """The chat records for one image: `chat_per_image` chat types (rotating with `index`), one per
    other open task, `closed_per_image` per closed task."""
    caption = rng.choice(info.captions)
    others = [c for c in classes.classes if c.label != info.label]
    chat_types = types_for_image(index, cfg.tasks, cfg.chat_per_image)
    out = []
    for task in cfg.tasks:
        turns: list[tuple[list[dict[str, str]], dict[str, Any]]] = []
        if task in CHAT_TYPES:
            if task in chat_types:
                turns.append(chat_turns(task, info, classes, rng))
        elif task == "caption":
            turns.append((_turn(rng.choice(["Describe this image.", "Write a caption for this H&E field.",
                                            "Describe the morphology you see."]), caption), {}))
        elif task == "open":
            question = rng.choice(["What tissue or entity is shown here?", "What is your interpretation of this field?",
                                   f"Which {classes.subject} category does this image show, and why?"])
            turns.append((_turn(question, _answer(info, caption)), {}))
        elif task in ("yesno", "mc"):
            # fresh option orders and candidates each time; yes and no alternate per image
            turns += [_closed(task, info, others, cfg, rng, yes=yes != bool(k % 2))
                      for k in range(cfg.closed_per_image)]
        elif task == "report":
            impression = f"Impression: consistent with {info.name}."
            if info.confirm:
                impression += f" Recommend confirmation with {info.confirm}."
            turns.append((_turn(f"Draft the microscopic description and impression for this {classes.subject} image.",
                                f"Microscopic description: {caption}\n{impression}"), {}))
        else:
            raise ConfigError(f"unknown instruction task {task!r} (choose from {', '.join(TASKS)})")
        out += [{"image": row.image, "messages": messages, "task": task, "label": info.label,
                 "split": row.split, **({"specimen": row.specimen} if row.specimen else {}), **extra}
                for messages, extra in turns]
    return out


def _cap_per_class(rows: list[IndexRow], cap: int, seed: int) -> list[IndexRow]:
    """A seeded sample of at most ``cap`` rows per (split, label), in the original row order."""
    rng = random.Random(f"cap-{seed}")
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[(r.split, r.label)].append(i)
    keep = set()
    for key in sorted(groups, key=str):
        idx = groups[key]
        keep.update(idx if len(idx) <= cap else rng.sample(idx, cap))
    return [r for i, r in enumerate(rows) if i in keep]


def build_datasets(source: str | Path, out_dir: str | Path, cfg: BuildConfig) -> dict[str, Any]:
    """Write ``pairs_<split>.jsonl`` and ``instruct_<split>.jsonl`` into ``out_dir``.

    Returns:
        summary with per-split counts (also written to ``summary.json``).
    """
    if not cfg.classes:
        raise ConfigError("data build needs a class description YAML (--classes)")
    classes = load_class_set(cfg.classes)
    rows = assign_splits(read_index(source), cfg.val_fraction, cfg.seed, cfg.case_pattern)
    if cfg.max_per_class > 0:
        rows = _cap_per_class(rows, cfg.max_per_class, cfg.seed)
    unknown = sorted({r.label for r in rows} - set(classes.labels))
    if unknown:
        raise ConfigError(f"{cfg.classes}: no description for label(s) {', '.join(unknown)} found in {source}")
    # two streams: the pairs do not change when instruction tasks or their counts do
    rng, chat_rng = random.Random(cfg.seed), random.Random(f"instructions-{cfg.seed}")
    # balanced yes/no: exactly half the images (rounded) get the true class as the candidate
    order = list(range(len(rows)))
    chat_rng.shuffle(order)
    yes_for = {i for rank, i in enumerate(order) if rank % 2 == 0}
    pairs: dict[str, list] = defaultdict(list)
    chats: dict[str, list] = defaultdict(list)
    for i, row in enumerate(rows):
        info = classes.get(row.label)
        n_caps = min(cfg.captions_per_image, len(info.captions))
        named = classes.prompts(row.label)  # every template x name and synonyms
        texts = rng.sample(info.captions, n_caps) + rng.sample(named, min(cfg.named_captions, len(named)))
        for text in texts:
            pairs[row.split].append({"image": row.image, "text": text, "label": row.label, "split": row.split,
                                     **({"specimen": row.specimen} if row.specimen else {})})
        if cfg.tasks:
            chats[row.split].extend(_instructions(row, info, classes, cfg, chat_rng, yes=i in yes_for, index=i))
    out_dir = Path(out_dir)
    summary: dict[str, Any] = {"source": str(Path(source).resolve()), "classes": str(Path(cfg.classes).resolve()),
                               "seed": cfg.seed, "splits": {}}
    for split in sorted(pairs):
        write_jsonl(out_dir / f"pairs_{split}.jsonl", pairs[split])
        if chats[split]:
            write_jsonl(out_dir / f"instruct_{split}.jsonl", chats[split])
        labels = sorted({p["label"] for p in pairs[split]})
        summary["splits"][split] = {"images": sum(r.split == split for r in rows), "pairs": len(pairs[split]),
                                    "instructions": len(chats[split]), "labels": labels}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("wrote %s", ", ".join(f"{s}: {v['pairs']} pairs" for s, v in summary["splits"].items()))
    return summary
