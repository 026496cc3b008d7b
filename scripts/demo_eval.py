"""Measure every number of MODEL_CARD.md's metrics table for a model (default: the shipped demo).

    DATA=../shared/data python scripts/demo_eval.py --out runs/demo_eval [--model demo]

Runs `pathvlm eval` on the validation splits of ../shared/data (never the train split, except as
the linear probe's training data): zero-shot with the robustness variants, linear probe on the
frozen image embeddings, closed-form VQA with option-order consistency, and lymphoma report
drafting; PCam (val whole, a 1,000-a-class train subset for the probes) and the CRC val tiles
resampled to the published 224 px at 0.5 um/px. Each evaluation writes its JSON into --out;
`summary.md` collects the table. Nothing here selects or tunes anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# set -> (folder in DATA, prompt file stem, VQA on it, robustness variants on it)
SETS = {"lymphoma": ("lymphoma_nia", "lymphoma", True, False), "crc": ("crc_tiles", "crc_tissue", True, True),
        "pcam": ("pcam", "lymph_node_metastasis", False, False)}
VARIANTS = {"": [], "_mpp0.75": ["--resize-mpp-factor", "0.75"], "_mpp1.5": ["--resize-mpp-factor", "1.5"],
            "_stain0.05": ["--stain-jitter", "0.05"]}
PCAM_TRAIN_PER_CLASS = 1000  # linear probe / few-shot training pool (of 5,000 a class): CPU time
FEW_SHOT_K = (1, 4, 16)


RESUME = False  # --resume: an evaluation whose JSON exists is not run again


def _pathvlm(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pathvlm.cli", "-q", *args]
    if RESUME and "--json" in args and Path(args[args.index("--json") + 1]).is_file():
        print("$ pathvlm " + " ".join(args) + "  (done earlier, kept)", flush=True)
        return
    print("$ pathvlm " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def _ci(result: dict, key: str = "balanced_accuracy") -> str:
    lo, hi = result.get("ci95", {}).get(key, [float("nan")] * 2)
    return f"{result[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _chat(data: Path, out: Path, model: str) -> list[tuple[str, str, str]]:
    """`pathvlm eval chat` on the val questions `pathvlm data build` writes (and the packaged cases)."""
    val = []
    for short, (folder, classes, vqa, _) in SETS.items():
        if not vqa:
            continue
        built = out / "chatdata" / short
        extra = ["--case-pattern", "^(sj-05-6124)"] if short == "lymphoma" else []
        _pathvlm(["data", "build", str(data / folder / "index.csv"), "--classes", classes, "-o", str(built), *extra])
        val += ["--data", str(built / "instruct_val.jsonl")]
    js = out / "chat.json"
    _pathvlm(["eval", "chat", "--model", model, *val, "--per-type", "15", "--max-new-tokens", "40",
              "--json", str(js)])
    r = json.loads(js.read_text())
    rows = [(f"chat {t} (n={e['n']})", f"{e['accuracy']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]",
             f"{e.get('accuracy_paraphrased', float('nan')):.3f} reworded") for t, e in r["per_type"].items()]
    a = r["top_entity_agreement"]
    rows.append(("chat top entity == report top entity (every val image)", f"{a['agree']}/{a['n']}", ""))
    return rows


def _pcam_index(data: Path, out: Path) -> Path:
    """PCam's val split whole and a seeded, class-balanced subset of its train split."""
    import csv
    import random

    with (data / "pcam" / "index.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    rng = random.Random(0)
    keep = [r for r in rows if r["split"] == "val"]
    for label in sorted({r["label"] for r in rows}):
        pool = [r for r in rows if r["split"] == "train" and r["label"] == label]
        keep += rng.sample(pool, min(PCAM_TRAIN_PER_CLASS, len(pool)))
    path = out / "pcam_index.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        writer.writerows([str((data / "pcam" / r["path"]).resolve()), r["label"], r["split"]] for r in keep)
    return path


def _crc_val_at_half_micron(data: Path, out: Path) -> Path:
    """The CRC val thumbnails (~1.04 um/px, 108 px) resampled to 224 px, i.e. 0.5 um/px tiles as
    NCT-CRC-HE publishes them, with an index that says so (mpp column)."""
    import csv

    from pathvlm.eval.common import write_resampled_copies

    with (data / "crc_tiles" / "index.csv").open() as fh:
        rows = [(str(data / "crc_tiles" / r["path"]), r["label"], "val") for r in csv.DictReader(fh)
                if r["split"] == "val"]
    return write_resampled_copies(rows, out / "crc_val_224")


def _paired_gap(native: Path, other: Path) -> tuple[float, float, float]:
    """Balanced accuracy of ``other`` minus ``native`` (two zero-shot evals' ``--json`` of the same
    images; their predictions CSVs matched by file stem) with its paired bootstrap 95% interval."""
    import csv

    from pathvlm.eval.metrics import paired_difference_ci
    from pathvlm.eval.report import output_paths

    native, other = output_paths(native)["predictions"], output_paths(other)["predictions"]

    def read(path: Path) -> dict[str, tuple[str, str]]:
        with path.open() as fh:
            return {Path(r["path"]).stem: (r["label"], r["predicted"]) for r in csv.DictReader(fh)}

    a, b = read(native), read(other)
    if set(a) != set(b):
        raise SystemExit(f"{other}: not the images of {native} ({len(set(a) ^ set(b))} differ)")
    keys = sorted(a)
    classes = sorted({v for k in keys for v in (*a[k], b[k][1])})
    y = [classes.index(a[k][0]) for k in keys]
    return paired_difference_ci(y, [classes.index(a[k][1]) for k in keys], [classes.index(b[k][1]) for k in keys],
                                len(classes))


def run(data: Path, out: Path, model: str, encoder: str, skip_llm: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    for short, (folder, classes, vqa, variants) in SETS.items():
        if not (data / folder / "index.csv").is_file():
            print(f"{data / folder}: missing, {short} skipped", flush=True)
            continue
        index = str(_pcam_index(data, out) if short == "pcam" else data / folder / "index.csv")
        prompts = f"configs/prompts/{classes}.json"
        for suffix, extra in VARIANTS.items() if variants else [("", [])]:
            js = out / f"zs_{short}{suffix}.json"
            _pathvlm(["eval", "zeroshot", "--model", encoder, "--data", index, "--split", "val",
                      "--prompts", prompts, "--json", str(js), *extra])
            r = json.loads(js.read_text())
            rows.append((f"zero-shot {short}{suffix.replace('_', ', ')}", _ci(r), f"{r['accuracy']:.3f}"))
        if short == "crc":  # the published scale: 224 px at 0.5 um/px, given as such
            js = out / "zs_crc_224px_mpp0.5.json"
            try:
                _pathvlm(["eval", "zeroshot", "--model", encoder, "--data",
                          str(_crc_val_at_half_micron(data, out)), "--mpp", "0.5", "--prompts", prompts,
                          "--json", str(js)])
                r = json.loads(js.read_text())
                rows.append(("zero-shot crc, val tiles at 224 px 0.5 um/px (--mpp 0.5)", _ci(r),
                             f"{r['accuracy']:.3f}"))
                diff, lo, hi = _paired_gap(out / "zs_crc.json", js)
                rows.append(("the same minus native crc (paired bootstrap over the tiles)",
                             f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]", ""))
            except subprocess.CalledProcessError as exc:  # an eval without --mpp support
                rows.append(("zero-shot crc, val tiles at 224 px 0.5 um/px (--mpp 0.5)",
                             f"not measured (exit {exc.returncode})", ""))
        probe = ["--model", encoder, "--train", index, "--test", index, "--train-split", "train",
                 "--test-split", "val"]
        js = out / f"lp_{short}.json"
        _pathvlm(["eval", "linear-probe", *probe, "--json", str(js)])
        r = json.loads(js.read_text())
        rows.append((f"linear probe {short}", _ci(r), f"{r['accuracy']:.3f}"))
        for k in FEW_SHOT_K:
            js = out / f"fs{k}_{short}.json"
            _pathvlm(["eval", "few-shot", *probe, "--k", str(k), "--json", str(js)])
            r = json.loads(js.read_text())
            rows.append((f"few-shot k={k} {short} (mean of seeds)", _ci(r), f"{r['accuracy']:.3f}"))
        if skip_llm or not vqa:
            continue
        for suffix, flag, how in (("", [], "chat"), ("_llm", ["--llm-only"], "LLM only")):
            js = out / f"vqa_{short}{suffix}.json"
            _pathvlm(["eval", "vqa", "--model", model, "--data", index, "--split", "val",
                      "--prompts", prompts, "--json", str(js), *flag])
            r = json.loads(js.read_text())
            rows.append((f"VQA {short} ({how}): accuracy (MC / yes-no); option-order consistency",
                         f"{r['accuracy']:.3f} ({r['mc_accuracy']:.3f} / {r['yesno_accuracy']:.3f})",
                         f"{r['option_order_consistency']:.3f}"))
    if not skip_llm:
        js = out / "report_lymphoma.json"
        _pathvlm(["eval", "report", "--type", "lymphoma", "--model", model, "--data",
                  str(data / "lymphoma_nia" / "index.csv"), "--split", "val", "--json", str(js)])
        r = json.loads(js.read_text())
        rows.append(("lymphoma report: top entity accuracy; ancillary wrongly filled",
                     f"{r['top_entity_accuracy']:.3f}", f"{r['ancillary_wrongly_filled_share']:.3f}"))
        rows += _chat(data, out, model)
    table = "| evaluation (val split) | balanced acc. [95% CI] or value | accuracy / second value |\n"
    table += "|---|---|---|\n" + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows)
    summary = out / "summary.md"
    summary.write_text(f"model {model}, encoder {encoder}, data {data}\n\n{table}")
    print(table)
    return summary


def model_encoder(model: str) -> str:
    """The `--model` of the encoder evaluations for a model: its run directory's own encoder, or the
    shipped demo encoder for a registered name."""
    encoder_dir = Path(model) / "encoder"
    return f"encoder:local-dir:{encoder_dir.resolve()}" if encoder_dir.is_dir() else "encoder:pathvlm-demo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DATA", os.environ.get(
        "PATHVLM_DATA", "../shared/data"))))
    parser.add_argument("--out", type=Path, default=Path("runs/demo_eval"))
    parser.add_argument("--model", default="demo", help="load_model name or run directory")
    parser.add_argument("--encoder", help="--model for the encoder evals (default: the encoder of --model: "
                        "encoder:pathvlm-demo, or encoder:local-dir:<run directory>/encoder)")
    parser.add_argument("--skip-llm", action="store_true", help="only the encoder evaluations")
    parser.add_argument("--resume", action="store_true",
                        help="keep evaluations whose JSON is already in --out (a killed run goes on)")
    parser.add_argument("--only", default="", help="comma-separated sets to evaluate (default: all)")
    args = parser.parse_args(argv)
    global RESUME
    RESUME = args.resume
    if args.only:
        for short in set(SETS) - set(args.only.split(",")):
            del SETS[short]
    if not (args.data / "lymphoma_nia" / "index.csv").is_file():
        print(f"{args.data}: no lymphoma_nia/index.csv (set DATA or PATHVLM_DATA)", file=sys.stderr)
        return 2
    run(args.data, args.out, args.model, args.encoder or model_encoder(args.model), args.skip_llm)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
