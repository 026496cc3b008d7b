"""How far the pixel-size path moves the encoder's embeddings, measured on train tiles, never val.

    DATA=../shared/data python scripts/resample_check.py [--model encoder:pathvlm-demo] [--limit N] [--json out.json]

Two kinds of input, each embedded by the real plain-image path (`pooled_image_embeddings`):

1. **Soft tiles**: every CRC *train* thumbnail (108 px, ~1.04 um/px), as is (the reference), and a
   224 px bicubic copy stated to be 0.5 um/px (how `scripts/demo_eval.py` writes its rescaled
   check), given its pixel size so the pipeline resamples it back to the encoder's tile scale
   (``--mpp 0.5``), and the same copy fed to the 224 px encoder input with no resampling.
2. **Sharp tiles**: real 0.5 um/px pixels, the NCT-CRC-HE-100K reference tiles and 224 px
   level-0 tiles with tissue from the CMU-1 slide (0.499 um/px), through ``--mpp 0.5`` (the
   reference here) and fed directly.

For each route it prints the mean and smallest cosine to the reference embedding, how often the
zero-shot label (CRC prompts) agrees with the reference's, and on the labelled soft tiles the
balanced accuracy. A route that equals the reference on the soft copies but moves sharp tiles
passes the rescaled check only because those copies were upsampled from thumbnails.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

CMU = "wsi/CMU-1-Small-Region.svs"
SHARP_MPP = 0.5  # NCT-CRC-HE tiles; CMU-1 records 0.499
MAX_SHARP = 80


def _sharp_tiles(data: Path, crc_rows: list[dict], limit: int) -> list:
    """The 0.5 um/px reference tiles, then CMU-1's level-0 tissue tiles: ``limit`` in all."""
    from pathvlm.slide import open_slide

    tiles = [_rgb(data / "crc_tiles" / r["path"]) for r in crc_rows if r["split"] == "reference"][:limit]
    with open_slide(data / CMU) as slide:
        w, h = slide.dimensions
        cells = ((x, y) for y in range(0, h - 224, 224) for x in range(0, w - 224, 224))
        while len(tiles) < limit and (cell := next(cells, None)) is not None:
            tile = slide.read_region(cell, 0, (224, 224))
            if np.asarray(tile.convert("L")).mean() < 200:  # tissue, not glass
                tiles.append(tile)
    return tiles


def _rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def run(data: Path, model_name: str, limit: int = 0) -> dict:
    """The comparison (see the module docstring); ``limit`` > 0: at most that many tiles of each kind."""
    from PIL import Image

    from pathvlm.embed import pooled_image_embeddings
    from pathvlm.encoders import native_tile_size
    from pathvlm.eval.common import load_eval_model
    from pathvlm.eval.metrics import balanced_accuracy, confusion_matrix
    from pathvlm.zeroshot import ZeroShotClassifier

    model = load_eval_model(model_name)
    enc, transform = model.encoder, model.transform
    size, tile_mpp = native_tile_size(enc), getattr(enc, "tile_mpp", None)
    if not tile_mpp:
        raise SystemExit(f"{model_name}: its encoder records no tile scale (tile_mpp), so there is no "
                         "resampling route to check")
    zs = ZeroShotClassifier(model.model, prompts="crc_tissue")
    with (data / "crc_tiles" / "index.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    train = [r for r in rows if r["split"] == "train"][: limit or None]
    soft = [_rgb(data / "crc_tiles" / r["path"]) for r in train]
    copies = [im.resize((224, 224), Image.Resampling.BICUBIC) for im in soft]
    sharp = _sharp_tiles(data, rows, limit or MAX_SHARP)
    labels = np.array([zs.classes.index(r["label"]) for r in train])

    def embed(images, mpp=None, whole=False):
        return pooled_image_embeddings(images, enc, transform, None if whole else size,
                                       mpp=mpp, target_mpp=tile_mpp if mpp else None).numpy()

    def predict(emb):
        return zs.logits_from_embeddings(emb).argmax(1)

    def compare(ref, emb, with_labels=False):
        cos = (ref * emb).sum(1)
        out = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
               "label_agreement": float(np.mean(predict(ref) == predict(emb)))}
        if with_labels:
            cm = confusion_matrix(labels, predict(emb), len(zs.classes))
            out["balanced_accuracy"] = balanced_accuracy(cm)  # over the classes present
        return out

    native = embed(soft)
    sharp_ref = embed(sharp, mpp=SHARP_MPP)
    return {
        "model": model.name, "weights_hash": model.weights_hash, "tile_mpp": tile_mpp, "tile_size": size,
        "soft_tiles": len(soft), "sharp_tiles": len(sharp),
        "soft": {"native (reference)": compare(native, native, True),
                 "224 px copy, --mpp 0.5 (resampled to the tile scale)": compare(native, embed(copies, mpp=0.5), True),
                 "224 px copy fed to the input directly": compare(native, embed(copies, whole=True), True)},
        "sharp": {"--mpp 0.5 (reference)": compare(sharp_ref, sharp_ref),
                  "fed to the input directly": compare(sharp_ref, embed(sharp, whole=True))},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DATA", os.environ.get(
        "PATHVLM_DATA", "../shared/data"))))
    parser.add_argument("--model", default="encoder:pathvlm-demo", help="a model name or folder, or encoder:<name>")
    parser.add_argument("--limit", type=int, default=0, help="at most N tiles of each kind (0: every train tile, "
                        f"{MAX_SHARP} sharp tiles)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    missing = [p for p in ("crc_tiles/index.csv", CMU) if not (args.data / p).is_file()]
    if missing:
        print(f"{args.data}: missing {', '.join(missing)} (set DATA or PATHVLM_DATA)", file=sys.stderr)
        return 2
    result = run(args.data, args.model, args.limit)
    for group in ("soft", "sharp"):
        print(f"{group} tiles ({result[f'{group}_tiles']}):")
        for route, r in result[group].items():
            bacc = f"  balanced accuracy {r['balanced_accuracy']:.3f}" if "balanced_accuracy" in r else ""
            print(f"  {route:55s} cosine mean {r['cosine_mean']:.4f} min {r['cosine_min']:.4f}  "
                  f"label agreement {r['label_agreement']:.3f}{bacc}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
