"""bf16 vs fp32 on the validation splits: `pathvlm eval zeroshot` and `linear-probe`, same encoder.

    DATA=../shared/data python scripts/precision_eval.py --out runs/precision_eval \
        [--encoder encoder:pathvlm-demo] [--precisions fp32,bf16] [--tolerance 0.005]

Runs both evaluations through the CLI once per precision on the crc and lymphoma val splits
(linear probe trained on train) and prints balanced accuracy side by side with the difference to
the first precision. Exit status 1 when any difference exceeds ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SETS = {"crc": ("crc_tiles", "crc_tissue"), "lymphoma": ("lymphoma_nia", "lymphoma")}


def _pathvlm(args: list[str]) -> float:
    cmd = [sys.executable, "-m", "pathvlm.cli", "-q", *args]
    print("$ pathvlm " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def run(data: Path, out: Path, encoder: str, precisions: list[str]) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for short, (folder, classes) in SETS.items():
        index = str(data / folder / "index.csv")
        for kind in ("zeroshot", "linear-probe"):
            row = {"eval": f"{kind} {short}"}
            for precision in precisions:
                js = out / f"{kind}_{short}_{precision}.json"
                args = (["eval", "zeroshot", "--data", index, "--split", "val",
                         "--prompts", f"configs/prompts/{classes}.json"] if kind == "zeroshot" else
                        ["eval", "linear-probe", "--train", index, "--test", index,
                         "--train-split", "train", "--test-split", "val"])
                seconds = _pathvlm([*args, "--model", encoder, "--n-boot", "200", "--json", str(js),
                                    "--precision", precision])
                row[precision] = json.loads(js.read_text())["balanced_accuracy"]
                row[f"{precision}_s"] = seconds
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DATA", os.environ.get(
        "PATHVLM_DATA", "../shared/data"))))
    parser.add_argument("--out", type=Path, default=Path("runs/precision_eval"))
    parser.add_argument("--encoder", default="encoder:pathvlm-demo")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="first = reference; bf16 by name (auto keeps the demo CNN in fp32)")
    parser.add_argument("--tolerance", type=float, default=0.005)
    args = parser.parse_args(argv)
    if not (args.data / "crc_tiles" / "index.csv").is_file():
        print(f"{args.data}: no crc_tiles/index.csv (set DATA or PATHVLM_DATA)", file=sys.stderr)
        return 2
    precisions = args.precisions.split(",")
    rows = run(args.data, args.out, args.encoder, precisions)
    ref = precisions[0]
    lines = ["| evaluation (val) | " + " | ".join(f"{p} bal. acc. (s)" for p in precisions)
             + " | " + " | ".join(f"{p} - {ref}" for p in precisions[1:]) + " |",
             "|---|" + "---|" * (2 * len(precisions) - 1)]
    worst = 0.0
    for row in rows:
        diffs = [row[p] - row[ref] for p in precisions[1:]]
        worst = max([worst, *map(abs, diffs)])
        lines.append(f"| {row['eval']} | " + " | ".join(f"{row[p]:.4f} ({row[p + '_s']:.0f})" for p in precisions)
                     + " | " + " | ".join(f"{d:+.4f}" for d in diffs) + " |")
    table = "\n".join(lines)
    (args.out / "summary.md").write_text(f"encoder {args.encoder}, data {args.data}\n\n{table}\n")
    print(table)
    print(f"largest |difference|: {worst:.4f} (tolerance {args.tolerance})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    raise SystemExit(main())
