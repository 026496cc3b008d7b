"""Readers for the training data formats (see data/README.md): pairs JSONL, chat JSONL, MIL CSV.

Relative paths inside a data file are resolved against the directory of that file; the
builders write absolute paths, so their output can be moved only together with the images.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathvlm.errors import ConfigError

INPUT_KEYS = ("slide", "image", "features")
SLIDE_TOKEN = "<slide>"


def _resolve(base: Path, value: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file (blank lines skipped); a bad line raises ConfigError naming it."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{number}: each line must be a JSON object")
        records.append(record)
    if not records:
        raise ConfigError(f"{path}: no records")
    return records


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(path)
    return path


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Image-text pairs: ``{"image" | "features": path, "text": str, ...}`` with paths resolved."""
    path = Path(path)
    records = read_jsonl(path)
    for number, rec in enumerate(records, 1):
        keys = [k for k in ("image", "features") if k in rec]
        if len(keys) != 1 or not isinstance(rec.get("text"), str) or not rec["text"].strip():
            raise ConfigError(f"{path}: record {number} needs exactly one of image/features and a non-empty text")
        rec[keys[0]] = _resolve(path.parent, rec[keys[0]])
    return records


def check_messages(messages: Any, where: str) -> None:
    """Roles alternate user/assistant starting with user; the first user turn holds one <slide>."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise ConfigError(f"{where}: 'messages' must be a list of at least one user and one assistant turn")
    for i, msg in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(msg, dict) or msg.get("role") != want or not isinstance(msg.get("content"), str):
            raise ConfigError(f"{where}: message {i} must be {{'role': '{want}', 'content': str}}")
    if messages[-1]["role"] != "assistant":
        raise ConfigError(f"{where}: the last message must be an assistant turn")
    if messages[0]["content"].count(SLIDE_TOKEN) != 1:
        raise ConfigError(f"{where}: the first user turn must contain {SLIDE_TOKEN} exactly once")
    if any(SLIDE_TOKEN in m["content"] for m in messages[1:]):
        raise ConfigError(f"{where}: {SLIDE_TOKEN} may only appear in the first user turn")


def read_conversations(path: str | Path) -> list[dict[str, Any]]:
    """Instruction data: ``{"slide" | "image" | "features": path, "messages": [...]}``."""
    path = Path(path)
    records = read_jsonl(path)
    for number, rec in enumerate(records, 1):
        keys = [k for k in INPUT_KEYS if k in rec]
        if len(keys) != 1:
            raise ConfigError(f"{path}: record {number} needs exactly one of {', '.join(INPUT_KEYS)}")
        rec[keys[0]] = _resolve(path.parent, rec[keys[0]])
        check_messages(rec.get("messages"), f"{path}: record {number}")
    return records


@dataclass(frozen=True)
class SlideLabel:
    slide_id: str
    features: str
    label: str
    split: str | None = None


def read_mil_csv(path: str | Path) -> list[SlideLabel]:
    """MIL labels: CSV ``slide_id,features,label[,split]``; feature paths resolved to the CSV dir."""
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            rows = list(reader)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    missing = [c for c in ("slide_id", "features", "label") if c not in header]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {', '.join(missing)} (need slide_id,features,label[,split])")
    if not rows:
        raise ConfigError(f"{path}: no rows")
    out = []
    for number, row in enumerate(rows, 2):
        if not row["slide_id"] or not row["features"] or not row["label"]:
            raise ConfigError(f"{path}:{number}: empty slide_id, features or label")
        out.append(SlideLabel(row["slide_id"], _resolve(path.parent, row["features"]), row["label"],
                              row.get("split") or None))
    return out
