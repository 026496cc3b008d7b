"""Choose the pretrained trunk and its input size by specimen CV on the train split (frozen features).

    DATA=../shared/data python scripts/trunk_cv.py --out runs/trunk_cv [--pcam-per-class 400]

For each packaged ImageNet trunk (EfficientNet-Lite0/1/2, `pathvlm.encoders.trunks`) and input size
(112 px = a 1 um/px tile as it is; 224 px = the same tile upsampled 2x, i.e. what a 0.5 um/px tile
shows), every train image is cut into 112 px native-scale tiles (`pathvlm.embed.image_tiles`, as
chat and zero-shot cut it), each tile embedded by the frozen trunk (global average pool), and the
tiles averaged. A logistic regression is scored by k-fold CV (folds stratified by label, disjoint by
specimen via `assign_folds`; PCam and CRC have no specimen column, so their folds are by image and
optimistic). The pooled held-out balanced accuracy per set is what the choice rests on; the val
split is never read.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

SETS = {"lymphoma": ("lymphoma_nia", "^(sj-05-6124)"), "crc": ("crc_tiles", ""), "pcam": ("pcam", "")}
TILE = 112  # source pixels of one tile at the data's ~1 um/px


def _rows(data: Path, short: str, pcam_per_class: int):
    from pathvlm.data.builders import read_index

    folder, _ = SETS[short]
    rows = [r for r in read_index(data / folder / "index.csv") if r.split == "train"]
    if short == "pcam":  # a seeded, class-balanced subset keeps the CV to minutes
        rng = random.Random(0)
        keep = []
        for label in sorted({r.label for r in rows}):
            of = [r for r in rows if r.label == label]
            keep += rng.sample(of, min(pcam_per_class, len(of)))
        rows = keep
    return rows


def _features(trunk_name: str, size: int, paths: list[str]) -> np.ndarray:
    import timm
    from PIL import Image

    from pathvlm.embed import image_tiles
    from pathvlm.encoders.trunks import get_trunk, load_pretrained_trunk

    src = get_trunk(trunk_name)
    model = timm.create_model(src.timm_name, pretrained=False, num_classes=0).eval()
    load_pretrained_trunk(model, trunk_name)
    mean = torch.tensor(src.mean)[:, None, None]
    std = torch.tensor(src.std)[:, None, None]
    out = []
    for path in paths:
        with Image.open(path) as im:
            tiles, _ = image_tiles(im.convert("RGB"), TILE)
        x = torch.stack([
            (torch.from_numpy(np.asarray(t.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0)
             .permute(2, 0, 1) - mean) / std for t in tiles])  # [T, 3, S, S]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            feats = model(x).float()  # [T, C]
        out.append(feats.mean(0).numpy())
    return np.stack(out)


def _cv(features: np.ndarray, labels: list[str], folds: list[int]) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.array(labels)
    folds = np.array(folds)
    pred = np.empty_like(y)
    for f in sorted(set(folds.tolist())):
        test = folds == f
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        clf.fit(features[~test], y[~test])
        pred[test] = clf.predict(features[test])
    per_fold = [float(balanced_accuracy_score(y[folds == f], pred[folds == f])) for f in sorted(set(folds))]
    return {"pooled_bacc": float(balanced_accuracy_score(y, pred)), "per_fold": per_fold}


def main() -> None:
    from pathvlm.data.builders import assign_folds

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=os.environ.get("DATA", "../shared/data"))
    ap.add_argument("--trunks", default="efficientnet-lite0,efficientnet-lite2")
    ap.add_argument("--sizes", default="112,224")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--pcam-per-class", type=int, default=400)
    args = ap.parse_args()
    torch.manual_seed(0)
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "trunk_cv.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for short in SETS:
        rows = _rows(data, short, args.pcam_per_class)
        folds = assign_folds(rows, args.folds, 0, SETS[short][1])
        paths = [str(data / SETS[short][0] / r.image) for r in rows]
        for trunk in args.trunks.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                key = f"{short}/{trunk}/{size}"
                if key in results:
                    continue
                t0 = time.time()
                feats = _features(trunk, size, paths)
                res = _cv(feats, [r.label for r in rows], folds)
                res.update(n_images=len(rows), seconds=round(time.time() - t0, 1))
                results[key] = res
                results_path.write_text(json.dumps(results, indent=2))
                print(f"{key}: pooled balanced accuracy {res['pooled_bacc']:.3f} "
                      f"(folds {', '.join(f'{v:.2f}' for v in res['per_fold'])}; {res['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
