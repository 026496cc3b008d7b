"""Report drafting speed and memory: warm per-report time and peak RSS for an image, a slide and
a 4-slide case; a cold `pathvlm report` call against a cold `pathvlm ask`; and N images in one
`pathvlm report` call against N separate calls.

    .venv/bin/python benchmarks/bench_report.py [--model demo] [--n-batch 18] [--quick]

Needs the real data (../shared/data or $PATHVLM_DATA): lymphoma_nia images, a PCam val patch (the
case's lymph node, given with its 0.97 um/px) and the wsi/ slides.
Warm figures: median of 3 drafts in one process after one warm-up draft; "peak RSS" is the
process high-water mark during the draft (kernel VmHWM, reset just before; Linux). Cold figures:
wall time and peak RSS (wait4 ru_maxrss) of a fresh interpreter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def warm(model_name: str, cases: list[tuple[str, str, object]]) -> None:
    from pathvlm.model import load_model
    from pathvlm.reports import render_report
    from pathvlm.reports.from_model import ReportDrafter

    t = time.perf_counter()
    drafter = ReportDrafter(load_model(model_name, device="cpu"))  # the README's numbers are CPU numbers
    print(f"model load + scorer: {time.perf_counter() - t:.1f} s, RSS {_status_mib('VmRSS'):.0f} MiB")
    print("\n| input | report | per report (s, median of 3) | peak RSS (MiB) |\n|---|---|---|---|")
    for label, kind, item in cases:
        render_report(drafter.draft(item, kind), "json")  # warm-up: first read of the file
        times, peaks = [], []
        for _ in range(3):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            t = time.perf_counter()
            render_report(drafter.draft(item, kind), "json")
            times.append(time.perf_counter() - t)
            peaks.append(_status_mib("VmHWM"))
        print(f"| {label} | {kind} | {statistics.median(times):.2f} | {max(peaks):.0f} |")


def cold(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one fresh `python -m pathvlm.cli ...`."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pathvlm.cli", "-q", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: pathvlm {' '.join(argv)}\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--n-batch", type=int, default=18, help="images for the batch comparison")
    ap.add_argument("--quick", action="store_true", help="warm figures and one cold pair only")
    args = ap.parse_args()

    from pathvlm.resources import data_dir

    data = data_dir()
    if data is None:
        raise SystemExit("real data not found: set PATHVLM_DATA or place it in ../shared/data")
    images = sorted((data / "lymphoma_nia").glob("*/*.png"))
    wsi = data / "wsi"
    # the lymph node: a real PCam H&E patch at its own scale (the DICOM fixture is a 29 um/px
    # overview, too coarse for the tile scale)
    node = next(iter(sorted((data / "pcam" / "val" / "tumor").glob("*.jpg"))), data / "pcam" / "val" / "tumor")
    slides = [wsi / "CMU-1-Small-Region.svs", wsi / "CMU-1-Small-Region-pyramid.tiff", node]
    missing = [str(p) for p in slides if not p.is_file()] + ([] if images else ["lymphoma_nia"])
    if missing:
        raise SystemExit(f"missing data: {', '.join(missing)}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_report_"))
    case = tmp / "case.yaml"
    case.write_text(yaml.safe_dump({"id": "bench-4-slides", "slides": [
        {"path": str(slides[0]), "stain": "H&E", "part": "A", "role": "tumor"},
        {"path": str(slides[1]), "stain": "H&E", "part": "B", "role": "margin"},
        {"path": str(slides[2]), "stain": "H&E", "part": "C", "role": "lymph_node", "mpp": 0.97},
        {"path": str(images[0]), "stain": "IHC:CD20", "part": "D"}]}))
    print(f"# bench_report ({os.cpu_count()} CPUs, torch threads from OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')})")
    warm(args.model, [(images[0].name, "lymphoma", str(images[0])),
                      (slides[0].name, "colorectal_biopsy", str(slides[0])),
                      ("4-slide case", "colorectal_resection", str(case))])

    img = str(images[0])
    print("\n| cold command (fresh process) | wall (s) | peak RSS (MiB) |\n|---|---|---|")
    rep = cold(["report", img, "--type", "lymphoma", "--model", args.model, "--format", "md"])
    ask = cold(["ask", img, "What tissue is this?", "--model", args.model])
    print(f"| pathvlm report IMAGE --type lymphoma | {rep[0]:.1f} | {rep[1]:.0f} |")
    print(f"| pathvlm ask IMAGE 'What tissue is this?' | {ask[0]:.1f} | {ask[1]:.0f} |")
    print(f"\nreport / ask (cold): {rep[0] / ask[0]:.2f} (target <= 2)")
    if args.quick:
        return
    batch = [str(p) for p in images[:: max(1, len(images) // args.n_batch)][: args.n_batch]]
    one, _ = cold(["report", *batch, "--type", "lymphoma", "--model", args.model,
                   "--out", str(tmp / "batch")])
    sep = 0.0
    for i, p in enumerate(batch):
        sep += cold(["report", p, "--type", "lymphoma", "--model", args.model,
                     "--out", str(tmp / f"sep{i}.json")])[0]
    print(f"\n{len(batch)} images: one `pathvlm report` call {one:.1f} s, {len(batch)} separate "
          f"calls {sep:.1f} s; ratio {one / sep:.3f} (target <= 0.25)")


if __name__ == "__main__":
    main()
