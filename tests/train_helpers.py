"""Tiny training data shared by the CPU and GPU training tests: colour-coded tiles with captions and
yes/no conversations, MIL feature bags, and the losses a run logged."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pathvlm.model.processor import SLIDE_TOKEN

CAPTIONS = ("Malignant glands with necrotic debris.", "Normal mucosa with goblet cells.")


def train_losses(run: Path) -> dict[int, float]:
    """step -> train/loss from a run's metrics.csv."""
    with (run / "metrics.csv").open() as fh:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")}


def write_vlm_data(root: Path) -> Path:
    """16 tiles of two colour-coded classes: pairs.jsonl and yes/no chats.jsonl (relative paths)."""
    rng = np.random.default_rng(0)
    pairs, chats = [], []
    for i in range(16):
        c = i % 2
        base = np.array([200, 60, 90] if c == 0 else [120, 90, 210], dtype=float)
        pixels = np.clip(base + rng.normal(0, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"t{i}.png")
        pairs.append({"image": f"t{i}.png", "text": CAPTIONS[c], "specimen": f"s{i}"})
        chats.append({"image": f"t{i}.png", "specimen": f"s{i}", "answer": "yes" if c == 0 else "no",
                      "messages": [{"role": "user", "content": f"{SLIDE_TOKEN}\nIs this tumour? Answer yes or no."},
                                   {"role": "assistant", "content": "Yes." if c == 0 else "No."}]})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    return root


def write_mil_labels(root: Path, dim: int = 16) -> Path:
    """16 synthetic feature bags (TUM / NORM, 2 of each held out as val) and their labels.csv."""
    from pathvlm.features import write_features

    rng = np.random.default_rng(0)
    centres = {"TUM": rng.normal(0, 1, dim), "NORM": rng.normal(0, 1, dim)}
    rows = ["slide_id,features,label,split"]
    for label, centre in centres.items():
        for i in range(8):
            n = int(rng.integers(20, 60))
            # a minority of label-specific patches among shared background patches: a real MIL signal
            feats = rng.normal(0, 1, (n, dim))
            feats[: n // 4] += 2.0 * centre
            write_features(root / f"{label}_{i}.h5", feats.astype(np.float32), np.zeros((n, 2), np.int64),
                           {"encoder": "synthetic"})
            rows.append(f"{label}_{i},{label}_{i}.h5,{label},{'val' if i >= 6 else 'train'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"
