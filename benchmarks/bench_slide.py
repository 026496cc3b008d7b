"""Slide pipeline benchmark (not a test): tile reading vs encoding vs full embed, and peak memory.

    .venv/bin/python benchmarks/bench_slide.py [--slide PATH] [--encoder NAME] [--workers 2]
        [--precisions fp32,auto] [--dense] [--repeat 3] [--skip-memory]

For each precision, side by side: patches/s for (a) read+decode+resize through the DataLoader,
(b) encoder forward on ready tensors, (c) the full `embed_slide`, the ratio c / min(a, b), the
min cosine of its features to the first precision's, and the wall time of the whole
`pathvlm embed` command (a fresh process: start-up, model build, tiling, encoding, writing).
``--dense`` keeps every tile of the grid (tissue filter off). ``--mosaic N`` first writes an N x N
mosaic of the slide's own pixels as a pyramidal TIFF (real tissue at its scan resolution, mirrored
copies so the seams match) and benchmarks that larger slide, where start-up and tissue detection
weigh less than on the 1.1 x 1.5 mm CMU-1-Small-Region. Then the peak RSS of a full
`embed_slides` run (in a fresh process) on the real slide and on a synthetic 40,000 x 40,000
pyramidal TIFF, to show memory does not grow with slide size.

Peer figure: when LazySlide (PyPI ``lazyslide``) is importable, ``zs.tl.feature_extraction`` runs
on the same slide, on LazySlide's own grid of 224 px tiles at 0.5 um/px (with ``--dense`` every tile
of the slide, tissue filter off; else its tissue tiles), with the same encoder module in fp32, and
its tiles/s are printed beside pathvlm's (b) and (c) rows with their ratio to pathvlm's fp32 (b).
Without LazySlide one line says the peer is skipped (``--no-peer`` skips it too). Keep LazySlide
out of the project's environment: e.g. a side venv whose .pth adds the project's site-packages.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = REPO.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
TILE_PX, TILE_MPP = 224, 0.5  # the grid of every figure below


def write_synthetic_slide(path: Path, side: int = 40_000, tile: int = 512) -> Path:
    """Mostly blank pyramidal TIFF with two round tissue patches, written tile by tile."""
    import tifffile

    rng = np.random.default_rng(0)
    texture = rng.integers(0, 60, size=(tile, tile, 3), dtype=np.uint8)  # reused noise pattern
    blobs = [(0.3, 0.35, 0.035), (0.7, 0.6, 0.03)]  # (cx, cy, radius) as fractions of the side

    def tiles(level_side: int):
        yy, xx = np.mgrid[0:tile, 0:tile]
        blank = np.full((tile, tile, 3), 242, np.uint8)
        for ty in range(0, level_side, tile):
            for tx in range(0, level_side, tile):
                inside = np.zeros((tile, tile), bool)
                for cx, cy, r in blobs:
                    cx, cy, r = cx * level_side, cy * level_side, r * level_side
                    if abs(tx + tile / 2 - cx) < r + tile and abs(ty + tile / 2 - cy) < r + tile:
                        inside |= (xx + tx - cx) ** 2 + (yy + ty - cy) ** 2 < r * r
                if not inside.any():
                    yield blank
                    continue
                pink = np.empty((tile, tile, 3), np.uint8)
                pink[...] = (200, 110, 170)
                pink -= texture
                yield np.where(inside[..., None], pink, blank)

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        level_side = side
        while level_side >= 512:
            # reduced levels are flagged subfiletype 1, which OpenSlide's generic TIFF reader needs
            tif.write(
                tiles(level_side),
                shape=(level_side, level_side, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                subfiletype=0 if level_side == side else 1,
            )
            level_side //= 4
    return path


def write_mosaic_slide(src: Path, n: int, path: Path, tile: int = 512) -> Path:
    """An n x n mosaic of ``src``'s level 0 (alternate copies mirrored) as a pyramidal JPEG TIFF
    with its um/px in the resolution tags, so OpenSlide reads it as a slide of n^2 times the area."""
    import tifffile
    from PIL import Image

    from pathvlm.slide import open_slide

    with open_slide(src) as slide:
        w, h = slide.dimensions
        base = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
        mpp = slide.mpp[0] if slide.mpp else 0.5
    rows = []
    for r in range(n):
        row = [base[:, ::-1] if c % 2 else base for c in range(n)]
        strip = np.concatenate(row, axis=1)
        rows.append(strip[::-1] if r % 2 else strip)
    image = np.ascontiguousarray(np.concatenate(rows, axis=0))  # [n*h, n*w, 3]
    res = 1e4 / mpp  # pixels per centimetre
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        level, scale = image, 1
        while True:
            tif.write(level, tile=(tile, tile), photometric="rgb", compression="jpeg",
                      resolution=(res / scale, res / scale), resolutionunit="CENTIMETER",
                      subfiletype=0 if scale == 1 else 1)
            if max(level.shape[:2]) <= 2 * tile:
                break
            scale *= 4  # each level is a quarter of the one before, resized from it
            size = (max(1, level.shape[1] // 4), max(1, level.shape[0] // 4))
            level = np.asarray(Image.fromarray(level).resize(size, Image.Resampling.LANCZOS))
    return path


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def measure_throughput(slide_path: Path, encoder_name: str, workers: int, batch: int,
                       precision: str = "fp32", dense: bool = False, repeat: int = 1) -> dict:
    from pathvlm.embed import TileDataset, embed_slide, make_tile_loader
    from pathvlm.encoders import create_encoder
    from pathvlm.slide import TileConfig, TissueConfig, open_slide, tile_slide

    torch.manual_seed(0)  # the same (random-init) weights for every precision
    encoder, transform = create_encoder(encoder_name, vision_only=True, precision=precision)
    tile_cfg = TileConfig(mpp=TILE_MPP, size=TILE_PX, min_tissue=0.0 if dense else TileConfig.min_tissue)
    tissue_cfg = TissueConfig()
    with open_slide(slide_path) as slide:
        grid = tile_slide(slide, tile_cfg, tissue_cfg)
        n = len(grid.coords)
        slide_mpp = slide.mpp[0] if slide.mpp else None

        # (a) read + decode + resize + transform only, through the same DataLoader path
        dataset = TileDataset(slide_path, slide_mpp, grid, transform)
        loader = make_tile_loader(dataset, batch, workers, encoder.device)
        start = time.perf_counter()
        ready = [b for b in loader]
        t_read = time.perf_counter() - start

        # (b) encoder forward only, on the tensors from (a)
        # best of ``repeat`` (the machine is shared: the best run is the least disturbed one)
        with torch.inference_mode():
            encoder.encode_image(ready[0])  # warm-up
            t_enc = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                for b in ready:
                    encoder.encode_image(b.to(encoder.device))
                if encoder.device.type == "cuda":
                    torch.cuda.synchronize()
                t_enc = min(t_enc, time.perf_counter() - start)

        # (c) the full pipeline, reading overlapped with encoding
        t_full = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            bag = embed_slide(slide, encoder, transform, tile_cfg, tissue_cfg, batch, workers)
            t_full = min(t_full, time.perf_counter() - start)
    a, b, c = _rate(n, t_read), _rate(n, t_enc), _rate(n, t_full)
    return {"tiles": n, "read": a, "encode": b, "full": c, "ratio": c / min(a, b),
            "precision": encoder.precision, "features": bag.features, "coords": bag.coords,
            "slide_mpp": slide_mpp}


def import_lazyslide():
    """(lazyslide module, "") when it imports, else (None, why not)."""
    try:
        import lazyslide
        import wsidata  # noqa: F401  (its slide reader; a broken install fails here)
    except Exception as exc:  # noqa: BLE001 - ImportError, or a dependency that does not load
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return lazyslide, ""


class ArrayToPil:
    """LazySlide hands each tile to the transform as an H x W x 3 uint8 array; pathvlm's eval
    transform takes a PIL image. A class, not a lambda, so DataLoader workers can pickle it."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, tile):
        from PIL import Image

        return self.transform(Image.fromarray(np.asarray(tile, dtype=np.uint8)))


def measure_lazyslide(zs, slide_path: Path, encoder_name: str, workers: int, batch: int, dense: bool,
                      repeat: int, slide_mpp: float | None, ref: dict) -> dict:
    """LazySlide's own tiling + ``zs.tl.feature_extraction`` with pathvlm's encoder module in fp32.

    The PatchEncoder is passed as the model: it lacks LazySlide's ``get_transform``/``try_compile``,
    so LazySlide treats it as a plain callable and runs ``model(batch)``, which is
    ``encode_image`` (the call timed in (b)). Best of ``repeat``; ``ref`` (pathvlm's first
    precision) gives the feature cosine on the tiles both grids share.
    """
    from importlib.metadata import version

    from wsidata import open_wsi

    from pathvlm.encoders import create_encoder

    torch.manual_seed(0)  # the same random-init weights as pathvlm's runs
    encoder, transform = create_encoder(encoder_name, vision_only=True, precision="fp32")
    wrapped = ArrayToPil(transform)
    with torch.inference_mode():  # warm-up, as (b) had
        encoder(wrapped(np.zeros((TILE_PX, TILE_PX, 3), np.uint8))[None].to(encoder.device))
    t_extract = t_total = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        wsi = open_wsi(slide_path, store=None)  # store=None: no zarr written next to the slide
        # a slide whose reader finds no um/px gets the one pathvlm read
        mpp_kw = {} if wsi.properties.mpp or slide_mpp is None else {"slide_mpp": slide_mpp}
        if dense:  # no tissue contours: every tile of the slide's bounds, no background filter
            zs.pp.tile_tissues(wsi, TILE_PX, mpp=TILE_MPP, tissue_key=None, **mpp_kw)
        else:  # LazySlide's own tissue detection and default background filter
            zs.pp.find_tissues(wsi)
            zs.pp.tile_tissues(wsi, TILE_PX, mpp=TILE_MPP, **mpp_kw)
        mid = time.perf_counter()
        features = zs.tl.feature_extraction(
            wsi, encoder, model_name="pathvlm", transform=wrapped, device=str(encoder.device),
            amp=False, compile=False, batch_size=batch, num_workers=workers, pbar=False,
            return_features=True,
        )
        end = time.perf_counter()
        t_extract, t_total = min(t_extract, end - mid), min(t_total, end - start)
        bounds = wsi.shapes["tiles"].geometry.bounds  # level-0 px
        wsi.close()
    n = len(features)
    corners = bounds[["minx", "miny"]].to_numpy()
    side = float((bounds["maxx"] - bounds["minx"]).iloc[0]) if n else float("nan")
    # Pair each pathvlm tile with LazySlide's nearest one. The grids drift apart a little: pathvlm
    # steps by the exact level-0 extent of 224 px at 0.5 um/px (224.4 px on a 0.499 um/px scan),
    # LazySlide by that extent rounded to whole pixels; corners within 1/16 tile count as one tile.
    dist = np.abs(ref["coords"].numpy()[:, None, :] - corners[None, :, :]).max(axis=2)  # [N_ref, n]
    hit = dist.min(axis=1) <= TILE_PX / 16
    cos = offset = float("nan")
    if hit.any():
        ours = ref["features"][torch.from_numpy(hit)]
        theirs = torch.from_numpy(np.asarray(features, np.float32)[dist.argmin(axis=1)[hit]])
        cos = torch.nn.functional.cosine_similarity(ours, theirs).min().item()
        offset = float(dist.min(axis=1)[hit].max())
    return {"tiles": n, "extract": _rate(n, t_extract), "full": _rate(n, t_total), "cos": cos,
            "shared": int(hit.sum()), "offset": offset, "side": side, "version": version("lazyslide"),
            "mpp_kw": mpp_kw}


def time_embed_command(slide: Path, encoder_name: str, workers: int, batch: int, precision: str,
                       repeat: int) -> float:
    """Best wall time of the whole ``pathvlm embed`` command in a fresh process (start-up included)."""
    best = float("inf")
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "pathvlm.cli", "-q", "embed", str(slide), "--out", out,
                   "--encoder", encoder_name, "--batch-size", str(batch), "--num-workers", str(workers),
                   "--precision", precision]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
            elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"pathvlm embed failed:\n{proc.stderr[-2000:]}")
        best = min(best, elapsed)
    return best


def peak_rss_child(
    slide: Path, encoder_name: str, workers: int, batch: int, slide_mpp: float | None
) -> dict:
    """Run embed_slides in a fresh process and return its peak RSS.

    Reader workers are forked from it and mostly share its pages, so the main process is the
    number that would grow if tiles or features piled up in memory.
    """
    code = (
        "import json, resource, sys, time\n"
        "from pathvlm.embed import EmbedConfig, embed_slides\n"
        f"cfg = EmbedConfig(encoder={encoder_name!r}, batch_size={batch}, num_workers={workers}, "
        f"slide_mpp={slide_mpp!r}, progress=False)\n"
        "out = sys.argv[2]\n"
        "t = time.perf_counter(); r = embed_slides([sys.argv[1]], out, cfg); t = time.perf_counter() - t\n"
        "print(json.dumps({'tiles': sum(r.n_tiles.values()), 'failed': r.failed, 'seconds': t,\n"
        "  'self_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(slide), out],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
    if proc.returncode != 0:
        raise SystemExit(f"child failed on {slide}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_peer(peer: dict | None, error: str, why: str, precisions: list[str], runs: list[dict],
               args) -> None:
    """LazySlide's figures beside pathvlm's, or the one line that says why there are none."""
    ref = runs[0]
    if peer is None:
        reason = f"the LazySlide run failed ({error})" if error else f"lazyslide is not importable here ({why})"
        print(f"\npeer row skipped: {reason}")
        return
    grid = ("every tile of the slide (tile_tissues(tissue_key=None): no tissue filter)" if args.dense
            else "its tissue tiles (find_tissues + tile_tissues, default background filter)")
    ours = "every grid tile with any tissue in its mask" if args.dense else "tissue tiles"
    mpp_note = f"; slide_mpp={peer['mpp_kw']['slide_mpp']} given (its reader found none)" if peer["mpp_kw"] else ""
    print(f"\npeer: LazySlide {peer['version']} zs.tl.feature_extraction, fp32 (amp off), with the same "
          f"PatchEncoder module as a callable and pathvlm's transform; {peer['tiles']} tiles = {grid}, "
          f"{TILE_PX} px at {TILE_MPP} um/px ({peer['side']:g} level-0 px a side){mpp_note}; pathvlm's "
          f"grid above: {ref['tiles']} tiles ({ours}); "
          f"{args.workers} workers, batch {args.batch_size}, best of {args.repeat}")
    b = ref["encode"]
    print(f"| tiles/s, side by side | tiles | tiles/s | / pathvlm {ref['precision']} (b) forward |")
    print("|---|---|---|---|")
    rows = []
    for p, r in zip(precisions, runs):
        rows += [(f"pathvlm {p} ({r['precision']}): (b) encoder forward only", r["tiles"], r["encode"]),
                 (f"pathvlm {p} ({r['precision']}): (c) full embed", r["tiles"], r["full"])]
    steps = "tile_tissues" if args.dense else "find_tissues + tile_tissues"
    rows += [(f"LazySlide {peer['version']} fp32: open_wsi + {steps} + feature_extraction",
              peer["tiles"], peer["full"]),
             (f"LazySlide {peer['version']} fp32: feature_extraction alone", peer["tiles"], peer["extract"])]
    for label, n, rate in rows:
        print(f"| {label} | {n} | {rate:.2f} | {rate / b:.2f}x |")
    if peer["shared"]:
        print(f"LazySlide features vs pathvlm {ref['precision']} on {peer['shared']} paired tiles (corners "
              f"<= {peer['offset']:g} level-0 px apart): min cosine {peer['cos']:.5f}")
    else:
        print("LazySlide features vs pathvlm's: no tile of one grid lies on a tile of the other (its "
              "tissue tiles start at each tissue's corner), so no cosine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--encoder", default="openclip:pathvlm-vit-s-minilm")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--side", type=int, default=40_000, help="synthetic slide side in pixels")
    parser.add_argument("--precisions", default="fp32,auto", help="compared side by side, first = reference")
    parser.add_argument("--dense", action="store_true", help="every tile of the grid (tissue filter off)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure; the best is kept")
    parser.add_argument("--skip-memory", action="store_true", help="no peak-RSS runs")
    parser.add_argument("--mosaic", type=int, default=0, metavar="N",
                        help="benchmark an N x N mosaic of --slide (a larger slide of real tissue)")
    parser.add_argument("--no-peer", action="store_true", help="skip the LazySlide peer column")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.mosaic > 1:
        mosaic_dir = tempfile.TemporaryDirectory()
        start = time.perf_counter()
        args.slide = write_mosaic_slide(args.slide, args.mosaic,
                                        Path(mosaic_dir.name) / f"{args.slide.stem}-mosaic{args.mosaic}.tiff")
        print(f"{args.mosaic} x {args.mosaic} mosaic written in {time.perf_counter() - start:.1f} s")

    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"cuda {torch.cuda.is_available()}; encoder {args.encoder}; workers {args.workers}; "
        f"batch {args.batch_size}"
    )
    precisions = args.precisions.split(",")
    runs = [measure_throughput(args.slide, args.encoder, args.workers, args.batch_size, p, args.dense,
                               args.repeat) for p in precisions]
    commands = [time_embed_command(args.slide, args.encoder, args.workers, args.batch_size, p,
                                   args.repeat) for p in precisions]
    ref = runs[0]
    zs, why = (None, "--no-peer") if args.no_peer else import_lazyslide()
    peer, peer_error = None, ""
    if zs is not None:
        try:
            peer = measure_lazyslide(zs, args.slide, args.encoder, args.workers, args.batch_size,
                                     args.dense, args.repeat, ref["slide_mpp"], ref)
        except Exception as exc:  # noqa: BLE001 - a peer failure must not lose our figures
            peer_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    grid = "dense grid, every tile" if args.dense else "tissue tiles"
    print(f"\n{args.slide.name}: {ref['tiles']} tiles of 224 px at 0.5 um/px ({grid}); best of {args.repeat}")
    print("| stage | " + " | ".join(f"{p} ({r['precision']})" for p, r in zip(precisions, runs)) + " |")
    print("|---|" + "---|" * len(runs))
    for key, label in (("read", "(a) read + decode + resize (DataLoader), patches/s"),
                       ("encode", "(b) encoder forward only, patches/s"), ("full", "(c) full embed, patches/s"),
                       ("ratio", "c / min(a, b)")):
        print(f"| {label} | " + " | ".join(f"{r[key]:.2f}" for r in runs) + " |")
    print("| (b) speed-up over the first | " + " | ".join(f"{r['encode'] / ref['encode']:.2f}x" for r in runs) + " |")
    print("| (c) speed-up over the first | " + " | ".join(f"{r['full'] / ref['full']:.2f}x" for r in runs) + " |")
    cos = [torch.nn.functional.cosine_similarity(r["features"], ref["features"]).min().item() for r in runs]
    print("| min feature cosine to the first | " + " | ".join(f"{c:.5f}" for c in cos) + " |")
    print("| whole `pathvlm embed` command (tissue tiles), s | " + " | ".join(f"{t:.1f}" for t in commands) + " |")
    print("| whole command speed-up | " + " | ".join(f"{commands[0] / t:.2f}x" for t in commands) + " |")
    print_peer(peer, peer_error, why, precisions, runs, args)
    if args.skip_memory:
        return

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        big = write_synthetic_slide(Path(tmp) / "synthetic.tiff", side=args.side)
        print(
            f"\nsynthetic {args.side} x {args.side} TIFF written in {time.perf_counter() - start:.1f} s, "
            f"{big.stat().st_size / 1e6:.1f} MB on disk"
        )
        rows = [
            (
                args.slide.name,
                peak_rss_child(args.slide, args.encoder, args.workers, args.batch_size, None),
            ),
            (
                f"synthetic {args.side}^2",
                peak_rss_child(big, args.encoder, args.workers, args.batch_size, 0.5),
            ),
        ]
    print("\n| slide | tiles | seconds | peak RSS (MB) |\n|---|---|---|---|")
    for name, m in rows:
        print(f"| {name} | {m['tiles']} | {m['seconds']:.1f} | {m['self_mb']:.0f} |")
    print(
        f"\nbench process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )


if __name__ == "__main__":
    main()
