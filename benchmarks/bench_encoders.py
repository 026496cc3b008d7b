"""Foundation encoder throughput on this CPU (not a test): tiles/s and peak RSS per ViT family.

    .venv/bin/python benchmarks/bench_encoders.py [--threads 2] [--batch 32] [--batches 1]

Each encoder runs in a fresh process (so its peak RSS is its own): the registered architecture
is built with random weights (`build_foundation`; the shipped `pathvlm-demo` through
`create_encoder`), one warm-up batch of 2 tiles, then ``--batches`` timed batches of ``--batch``
224 px tiles through `encode_image`. Weights are random, so nothing is downloaded; the forward
cost is that of the real model. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (family label, registered encoder): one representative per ViT size
MODELS = [
    ("demo (EfficientNet-Lite0, 224 px)", "pathvlm-demo"),
    ("ViT-S/16", "kaiko-vits16"),
    ("ViT-B/16", "kaiko-vitb16"),
    ("ViT-L/16", "uni"),
    ("ViT-H/14", "virchow2"),
    ("ViT-g/14", "h-optimus-0"),
]


def run_one(name: str, threads: int, batch: int, batches: int) -> dict:
    """In this process: build ``name``, time ``batches`` batches, report tiles/s and peak RSS."""
    import resource

    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    if name == "pathvlm-demo":
        from pathvlm.encoders import create_encoder, input_size

        encoder, _ = create_encoder(name, device="cpu")
        size = input_size(encoder)
    else:
        from pathvlm.encoders import build_foundation, get_foundation_spec

        spec = get_foundation_spec(name)
        encoder = build_foundation(spec)
        size = spec.input_size
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in encoder.parameters())
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        encoder.encode_image(x[:2])  # warm-up: allocator, kernels
        start = time.perf_counter()
        for _ in range(batches):
            dim = encoder.encode_image(x).shape[1]
        elapsed = time.perf_counter() - start
    return {"encoder": name, "params_m": params / 1e6, "dim": dim, "input": size,
            "tiles_per_s": batch * batches / elapsed, "build_s": build_s,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--only", help="comma-separated encoder names (default: all families)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.threads, args.batch, args.batches)))
        return
    wanted = set(args.only.split(",")) if args.only else None
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    print("| family | encoder | params (M) | dim | input px | tiles/s | peak RSS (GB) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, name in MODELS:
        if wanted and name not in wanted:
            continue
        out = subprocess.run([sys.executable, __file__, "--child", name, "--threads",
                              str(args.threads), "--batch", str(args.batch), "--batches",
                              str(args.batches)], env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"| {label} | {name} | failed: {out.stderr.strip().splitlines()[-1]} |||||")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {label} | {name} | {r['params_m']:.0f} | {r['dim']} | {r['input']} | "
              f"{r['tiles_per_s']:.2f} | {r['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
