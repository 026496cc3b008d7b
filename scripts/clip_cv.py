"""Choose a clip-stage recipe without touching the validation split: k-fold CV on the train split.

    DATA=../shared/data python scripts/clip_cv.py -c configs/train/clip_demo.yaml \
        --out runs/cv/base [--folds 3] [key.sub=value ...]

Only rows whose split is ``train`` are read. They are dealt into folds stratified by label and
disjoint by case (lymphoma: specimen, the two regions of sj-05-6124 together; CRC and PCam: image,
as neither marks its slides). For each fold the clip stage trains on the other folds' pairs (built
as `pathvlm data build` builds them, mixed as `make demo-model` mixes them: the CRC and lymphoma
pairs repeated ``--repeat-small`` times beside the PCam pairs) and the encoder is scored on the
held-out fold of the sets named by ``--score``: zero-shot with the prompt file, zero-shot on perturbed
held-out images (``ROBUST``: CRC resampled to 224 px at 0.5 um/px, rescaled x0.75 / x1.5, stain
jitter), zero-shot with 2, 4 and 8 test-time views (``VIEWS``: each tile's turns and mirror images
averaged), and a linear probe fitted on the training folds. The summary pools the held-out predictions of all folds into one
confusion matrix per evaluation (balanced accuracy over every train specimen) and lists the
per-fold values. A fold already scored is not retrained, so a killed run picks up where it stopped;
a fold whose encoder is trained but lacks some scores (an older run) gets only the missing ones.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

# short name -> (dataset folder in DATA, class YAML stem, prompt file stem, case pattern)
SETS = {"lymphoma": ("lymphoma_nia", "lymphoma", "lymphoma", "^(sj-05-6124)"),
        "crc": ("crc_tiles", "crc_tissue", "crc_tissue", ""),
        "pcam": ("pcam", "lymph_node", "lymph_node_metastasis", "")}
SMALL = ("lymphoma", "crc")  # the few-hundred-image sets that `make demo-model` repeats beside PCam
# Zero-shot on perturbed held-out images, scored beside the clean figure (MODEL_CARD's robustness rows):
# kind -> ZeroShotEvalConfig fields. "mpp0.5_224px" scores copies of the held-out tiles resampled to
# 224 px and given as 0.5 um/px (NCT-CRC-HE's published scale), which the encoder resamples back.
ROBUST = {"crc": {"zeroshot_mpp0.5_224px": {"mpp": 0.5}, "zeroshot_mpp0.75": {"resize_mpp_factor": 0.75},
                  "zeroshot_mpp1.5": {"resize_mpp_factor": 1.5}, "zeroshot_stain0.05": {"stain_jitter": 0.05}},
          "pcam": {"zeroshot_stain0.05": {"stain_jitter": 0.05}}}
# Zero-shot with test-time views (`pathvlm.embed.tile_views`: each tile's turns and mirror images
# averaged): base kind -> its fields; scored as "<base>_views<n>" for every n in VIEW_COUNTS from one
# pass per view (the views are nested: n views are the first n of the eight).
VIEWS = {"crc": {"zeroshot": {}, "zeroshot_mpp0.5_224px": {"mpp": 0.5}}, "pcam": {"zeroshot": {}}}
VIEW_COUNTS = (2, 4, 8)


def _write_fold_index(rows, folds: list[int], fold: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "specimen", "split"])
        for row, f in zip(rows, folds):
            writer.writerow([row.image, row.label, row.specimen or "", "val" if f == fold else "train"])


def _subsample(rows, folds: list[int], per_class: int, seed: int) -> tuple[list, list[int]]:
    """At most ``per_class`` rows of each (label, fold), seeded: what a large set is scored on."""
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (row, f) in enumerate(zip(rows, folds)):
        groups.setdefault((row.label, f), []).append(i)
    keep = sorted(i for idx in groups.values()
                  for i in (idx if len(idx) <= per_class else rng.choice(idx, per_class, replace=False)))
    return [rows[i] for i in keep], [folds[i] for i in keep]


def _resampled_fold_index(index: Path, copies: Path, path: Path) -> Path:
    """``index`` with every image replaced by its 224 px, 0.5 um/px copy (shared by the folds)."""
    from pathvlm.eval.common import write_resampled_copies

    with index.open() as fh:
        rows = [(r["path"], r["label"], r["split"]) for r in csv.DictReader(fh)]
    return write_resampled_copies(rows, copies, index=path)


def _prepare_fold(data: Path, fold_dir: Path, fold: int, k: int, seed: int, sets: list[str],
                  repeat_small: int, score_per_class: int = 0) -> dict[str, Path]:
    """Fold index CSVs and the training pairs of every set; returns {set: index path to score}.

    With ``score_per_class`` the scored index holds at most that many rows per class of the
    held-out fold and of the training folds (the linear probe's training rows); training pairs
    always use every row of the training folds."""
    from pathvlm.data.builders import BuildConfig, assign_folds, build_datasets, read_index

    indexes, pairs = {}, []
    for short in sets:
        folder, classes, _, case_pattern = SETS[short]
        rows = [r for r in read_index(data / folder / "index.csv") if r.split == "train"]
        folds = assign_folds(rows, k, seed, case_pattern)
        index = fold_dir / f"index_{short}.csv"
        _write_fold_index(rows, folds, fold, index)
        if score_per_class:
            scored = fold_dir / f"index_{short}_scored.csv"
            _write_fold_index(*_subsample(rows, folds, score_per_class, seed), fold, scored)
        cfg = BuildConfig(classes=f"configs/classes/{classes}.yaml", tasks=(), case_pattern=case_pattern,
                          seed=seed)
        build_datasets(index, fold_dir / f"data_{short}", cfg)
        text = (fold_dir / f"data_{short}" / "pairs_train.jsonl").read_text()
        pairs.append(text * (repeat_small if short in SMALL and "pcam" in sets else 1))
        indexes[short] = fold_dir / f"index_{short}_scored.csv" if score_per_class else index
        if short == "crc":
            indexes["crc@224"] = _resampled_fold_index(indexes[short], fold_dir.parent / "crc_224",
                                                       fold_dir / "index_crc_224.csv")
    (fold_dir / "pairs_train.jsonl").write_text("".join(pairs))
    return indexes


def _score_fold(encoder_dir: Path, indexes: dict[str, Path], fold_dir: Path, score: list[str],
                done: dict | None = None, kinds: list[str] | None = None) -> dict:
    """Every evaluation of ``score`` that ``done`` (an earlier scores.json) lacks, merged into it."""
    from pathvlm.eval.common import load_eval_model
    from pathvlm.eval.linear_probe import LinearProbeConfig, run_linear_probe
    from pathvlm.eval.zeroshot_eval import ZeroShotEvalConfig, run_zeroshot_eval

    out = {k: dict(v) if isinstance(v, dict) else v for k, v in (done or {}).items()}
    model = None
    for short in score:
        index, have = indexes[short], out.setdefault(short, {})
        prompts = f"configs/prompts/{SETS[short][2]}.json"
        for kind in _kinds(short, kinds):
            if kind in have:
                continue
            model = model or load_eval_model(f"encoder:local-dir:{encoder_dir}")
            view_base = _view_kinds(short).get(kind)
            if view_base is not None:
                fields = VIEWS[short][view_base]
                source = indexes["crc@224"] if "mpp" in fields else index
                have.update(_views_scores(model, source, prompts, fields.get("mpp"), view_base))
                continue
            if kind == "linear_probe":
                r = run_linear_probe(model, LinearProbeConfig(train=str(index), test=str(index), train_split="train",
                                                              test_split="val", n_boot=0), fold_dir / f"lp_{short}.json")
            else:
                fields = ROBUST.get(short, {}).get(kind, {})
                source = indexes["crc@224"] if "mpp" in fields else index
                r = run_zeroshot_eval(model, source, ZeroShotEvalConfig(prompts=prompts, split="val", n_boot=0, **fields),
                                      fold_dir / f"{kind.replace('zeroshot', 'zs')}_{short}.json")
            have[kind] = {"balanced_accuracy": r["balanced_accuracy"], "confusion": r["confusion_matrix"]}
    return out


def _kinds(short: str, only: list[str] | None = None) -> list[str]:
    """The evaluations of set ``short`` (those named in ``only``, when given)."""
    every = ["zeroshot", "linear_probe", *ROBUST.get(short, {}), *_view_kinds(short)]
    return [k for k in every if not only or k in only]


def _view_kinds(short: str) -> dict[str, str]:
    """``"<base>_views<n>"`` -> its base kind, for every view evaluation of set ``short``."""
    return {f"{base}_views{n}": base for base in VIEWS.get(short, {}) for n in VIEW_COUNTS}


def _views_scores(model, source: Path, prompts: str, mpp: float | None, base: str) -> dict:
    """``{"<base>_views<n>": score}`` for n in VIEW_COUNTS: the held-out images embedded once in each
    of the eight views of `tile_views`, the first n views' unit embeddings summed. For one-tile
    images (CRC, PCam) that is exactly what an encoder with ``test_views = n`` computes."""
    import torch

    from pathvlm.embed import pooled_image_embeddings, tile_views
    from pathvlm.encoders import native_tile_size
    from pathvlm.eval.common import ImageSequence
    from pathvlm.eval.datasets import load_dataset, match_classes
    from pathvlm.eval.metrics import classification_metrics
    from pathvlm.zeroshot import ZeroShotClassifier, make_prompt_set

    data = load_dataset(source, "val")
    prompt_set = make_prompt_set(prompts)
    label_map = match_classes(data.labels, prompt_set)
    prompt_set = prompt_set.subset([k for k in prompt_set.names if k in set(label_map.values())])
    clf = ZeroShotClassifier(model.model, prompts=prompt_set, transform=model.transform)
    images, mpps = ImageSequence(data.paths), data.image_mpps(mpp)
    per_view, recorded = [], model.encoder.test_views
    model.encoder.test_views = 1  # each pass below is one view
    try:
        for k in range(max(VIEW_COUNTS)):
            def seen(tile, k=k):
                return model.transform(tile_views(tile, max(VIEW_COUNTS))[k])
            per_view.append(pooled_image_embeddings(images, model.encoder, seen, native_tile_size(model.encoder),
                                                    64, clf._device(), False, mpp=mpps, target_mpp=clf.tile_mpp))
    finally:
        model.encoder.test_views = recorded
    y_true = np.array([clf.classes.index(label_map[lab]) for lab in data.labels])
    out = {}
    for n in VIEW_COUNTS:
        emb = torch.nn.functional.normalize(torch.stack(per_view[:n]).sum(0), dim=-1)
        logits = clf.logits_from_embeddings(emb)
        r = classification_metrics(y_true, logits.argmax(1), clf.classes, None)
        out[f"{base}_views{n}"] = {"balanced_accuracy": r["balanced_accuracy"], "confusion": r["confusion_matrix"]}
    return out


def _pooled(per_fold: list[dict], short: str, kind: str) -> dict:
    """Sum the folds' confusion matrices (aligned by label name) -> pooled balanced accuracy."""
    from pathvlm.eval.metrics import balanced_accuracy

    labels = sorted({lab for f in per_fold for lab in f[short][kind]["confusion"]["labels"]})
    total = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for f in per_fold:
        cm = f[short][kind]["confusion"]
        idx = [labels.index(lab) for lab in cm["labels"]]
        total[np.ix_(idx, idx)] += np.array(cm["counts"], dtype=np.int64)
    values = [f[short][kind]["balanced_accuracy"] for f in per_fold]
    return {"pooled_balanced_accuracy": balanced_accuracy(total), "fold_balanced_accuracy": values,
            "fold_mean": float(np.mean(values)), "labels": labels, "confusion": total.tolist()}


def run(config: str, out: Path, data: Path, k: int, seed: int, overrides: list[str],
        sets: list[str] | None = None, score: list[str] | None = None, repeat_small: int = 1,
        score_per_class: int = 0, kinds: list[str] | None = None, only_folds: list[int] | None = None) -> dict:
    from pathvlm.train import train_stage

    sets = sets or ["lymphoma", "crc"]
    score = score or sets
    # what a fold's encoder and scores stand for: a resumed run reuses them only for the same recipe
    recipe = {"config": config, "overrides": overrides, "folds": k, "seed": seed, "sets": sets,
              "repeat_small": repeat_small, "score_per_class": score_per_class}
    per_fold = []
    for fold in range(k):
        if only_folds is not None and fold not in only_folds:
            continue
        fold_dir = out / f"fold{fold}"
        scores, stamp = fold_dir / "scores.json", fold_dir / "recipe.json"
        if stamp.is_file() and json.loads(stamp.read_text()) != recipe:
            raise SystemExit(f"{fold_dir}: made by another recipe ({stamp}); use another --out")
        done = json.loads(scores.read_text()) if scores.is_file() else {}
        if all(kind in done.get(short, {}) for short in score for kind in _kinds(short, kinds)):
            per_fold.append(done)
            continue
        indexes = _prepare_fold(data, fold_dir, fold, k, seed, sets, repeat_small, score_per_class)
        stamp.write_text(json.dumps(recipe, indent=2))
        t0 = time.perf_counter()
        run_dir = fold_dir / "clip"
        train_minutes = None
        if (run_dir / "encoder" / "open_clip_model.safetensors").is_file() and (run_dir / "meta.json").is_file():
            print(f"fold {fold}: reusing the trained encoder in {run_dir / 'encoder'}", flush=True)
        else:
            run_dir = train_stage("clip", config, [*overrides, f"train.out_dir={run_dir}",
                                                   f"data.train={fold_dir / 'pairs_train.jsonl'}", "data.val="])
            train_minutes = (time.perf_counter() - t0) / 60
            done = {}  # scores of an earlier encoder of this fold are not this one's
        result = _score_fold(run_dir / "encoder", indexes, fold_dir, score, done, kinds)
        if train_minutes is not None or "train_minutes" not in result:
            result["train_minutes"] = train_minutes  # None: trained by an earlier, interrupted run
        scores.write_text(json.dumps(result, indent=2))
        per_fold.append(result)
        print(f"fold {fold}: " + ", ".join(f"{s} {kind} {v[kind]['balanced_accuracy']:.3f}"
                                           for s, v in result.items() if s in SETS for kind in v), flush=True)
    summary = {"config": config, "overrides": overrides, "folds": k, "only_folds": only_folds, "seed": seed, "sets": sets,
               "repeat_small": repeat_small, "score_per_class": score_per_class,
               "train_minutes": [f["train_minutes"] for f in per_fold],
               **{f"{s}_{kind}": _pooled(per_fold, s, kind) for s in score for kind in _kinds(s)
                  if all(kind in f.get(s, {}) for f in per_fold)}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for key, value in summary.items():
        if isinstance(value, dict):
            folds = " ".join(f"{v:.3f}" for v in value["fold_balanced_accuracy"])
            print(f"{key:24s} pooled {value['pooled_balanced_accuracy']:.3f}  folds {folds}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="clip stage YAML")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DATA", os.environ.get(
        "PATHVLM_DATA", "../shared/data"))))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="fold assignment and pair sampling")
    parser.add_argument("--sets", default="lymphoma,crc",
                        help=f"comma-separated sets whose train folds train the encoder (of {', '.join(SETS)})")
    parser.add_argument("--score", default="", help="comma-separated sets scored on their held-out folds "
                        "(default: every set in --sets)")
    parser.add_argument("--repeat-small", type=int, default=1,
                        help="repeat the CRC and lymphoma pairs this many times when PCam is in --sets "
                        "(make demo-model uses 8)")
    parser.add_argument("--score-per-class", type=int, default=0,
                        help="score on at most N images a class of each fold (seeded; 0 = all): "
                        "PCam's 5,000-patch folds take ~10 min each to embed on 2 cores")
    parser.add_argument("--kinds", default="", help="comma-separated evaluations to score (default: all; "
                        "e.g. zeroshot,zeroshot_views8,linear_probe)")
    parser.add_argument("--only-folds", default="", help="comma-separated folds to run (default: all); "
                        "the summary pools those folds only")
    parser.add_argument("overrides", nargs="*", help="key.sub=value for the clip stage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not (args.data / "lymphoma_nia" / "index.csv").is_file():
        print(f"{args.data}: no lymphoma_nia/index.csv (set DATA or PATHVLM_DATA)", file=sys.stderr)
        return 2
    sets = [s for s in args.sets.split(",") if s]
    score = [s for s in args.score.split(",") if s] or sets
    unknown = sorted(set(sets + score) - set(SETS))
    if unknown or not set(score) <= set(sets):
        print(f"--sets/--score: unknown {unknown} or scored set not trained on (sets: {', '.join(SETS)})",
              file=sys.stderr)
        return 2
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - {k for s in score for k in _kinds(s)})
    only = [int(f) for f in args.only_folds.split(",") if f.strip().isdigit()]
    if unknown or len(only) != len([f for f in args.only_folds.split(",") if f]) or any(
            f >= args.folds for f in only):
        print(f"--kinds: unknown {unknown} (of {', '.join(dict.fromkeys(k for s in score for k in _kinds(s)))}) "
              f"or --only-folds {args.only_folds!r} not folds of 0..{args.folds - 1}", file=sys.stderr)
        return 2
    run(args.config, args.out, args.data, args.folds, args.seed, args.overrides, sets, score, args.repeat_small,
        args.score_per_class, kinds or None, only or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
