"""Patch embedding: stream tissue tiles through an encoder and cache one feature file per slide.

`embed_slides` runs a batch (folders, list files, globs; shards and torchrun/accelerate ranks;
resume; per-slide failures reported, not fatal). `embed_slide` / `embed_image` return a FeatureBag
in memory for one slide or one plain image (chat and zero-shot use them).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pathvlm.config import from_dict
from pathvlm.encoders.patch_encoder import views_problem
from pathvlm.encoders.registry import DEFAULT_ENCODER
from pathvlm.errors import ConfigError, PathVLMError, SlideError
from pathvlm.features import FeatureBag, is_complete, write_features

log = logging.getLogger(__name__)

DEFAULT_TILE_MPP = 0.5  # tile scale for an encoder that records none

SLIDE_SUFFIXES = {
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".bif",
    ".dcm",
    ".svslide",
    ".png",
    ".jpg",
    ".jpeg",
}


@dataclass
class EmbedConfig:
    """Settings of an embedding run (the CLI fills it; library callers build it directly)."""

    encoder: str = DEFAULT_ENCODER  # the default model's encoder
    weights: str | None = None  # a foundation encoder's hub folder or weights file (None: hub)
    mpp: float | None = None  # um/px of each tile; None: the encoder's tile_mpp, else 0.5
    size: int | None = None  # tile side in output pixels; None: the encoder's tile (input) size
    slide_mpp: float | None = None  # resolution for files that do not record one
    batch_size: int = 64
    num_workers: int = 2
    shard: str | None = None  # "i/n", 0-based
    device: str | None = None  # None: CUDA when available
    precision: str = "auto"  # encoder precision: auto | fp32 | bf16 | fp16 (pathvlm.precision)
    progress: bool = True
    tissue: dict[str, Any] = field(default_factory=dict)  # TissueConfig overrides
    tile: dict[str, Any] = field(
        default_factory=dict
    )  # other TileConfig fields (min_tissue, stride)


@dataclass
class EmbedResult:
    """What happened to each slide of a run."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # already complete
    failed: list[tuple[str, str]] = field(default_factory=list)  # (slide path, reason)
    n_tiles: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


# ---------------------------------------------------------------- inputs, shards, ranks


def collect_slides(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand slide paths, folders (non-recursive), ``.txt`` list files and globs; sorted, unique.

    A path that does not exist is kept, so the run reports it as a failure instead of dropping it.
    """
    found: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found += [
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
            ]
        elif path.suffix.lower() == ".txt" and path.is_file():
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    entry = Path(line)
                    found.append(entry if entry.is_absolute() else path.parent / entry)
        elif any(ch in text for ch in "*?[") and not path.exists():
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise ConfigError(f"{text}: glob matched no files")
            found += [Path(m) for m in matches if Path(m).is_file()]
        else:
            found.append(path)
    unique = {str(p.resolve()) if p.exists() else str(p.absolute()): p for p in found}
    return [Path(key) for key in sorted(unique)]


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"i/n"`` (0-based) -> (i, n); None -> (0, 1)."""
    if shard is None:
        return 0, 1
    try:
        index, count = (int(v) for v in shard.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {shard!r}: expected i/n, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {shard!r}: need 0 <= i < n")
    return index, count


def process_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun / accelerate environment variables, else (0, 1)."""
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")):
        if rank_key in os.environ and world_key in os.environ:
            rank, world = int(os.environ[rank_key]), int(os.environ[world_key])
            if world >= 1 and 0 <= rank < world:
                return rank, world
    return 0, 1


def select_shard(
    slides: Sequence[Path], shard: str | None, rank: tuple[int, int] | None = None
) -> list[Path]:
    """This process's share: the ``i::n`` shard, then split again over ranks. Disjoint and complete."""
    index, count = parse_shard(shard)
    mine = list(slides)[index::count]
    r, world = rank if rank is not None else process_rank()
    return mine[r::world]


# ---------------------------------------------------------------- tile reading


class TileDataset(Dataset):
    """Tiles of one slide as transformed tensors. Each worker process opens its own slide handle."""

    def __init__(
        self,
        slide_path: Path,
        slide_mpp: float | None,
        grid: Any,
        transform: Any,
        slide: Any = None,
    ):
        self.slide_path = slide_path
        self.slide_mpp = slide_mpp
        self.grid = grid
        self.transform = transform
        self._slide = slide  # only used in the main process (num_workers=0)
        self._owner = os.getpid() if slide is not None else None

    def __len__(self) -> int:
        return len(self.grid.coords)

    def _handle(self) -> Any:
        if self._slide is None or self._owner != os.getpid():
            from pathvlm.slide import open_slide

            # OpenSlide handles must not be shared across fork: open one per worker
            self._slide = open_slide(self.slide_path, mpp=self.slide_mpp)
            self._owner = os.getpid()
        return self._slide

    def __getitem__(self, i: int) -> torch.Tensor:
        from pathvlm.slide import read_tile

        return self.transform(read_tile(self._handle(), self.grid, i))  # [3, H, W]


def _loader_batches(loader: DataLoader, slide_path: Path) -> Iterator[torch.Tensor]:
    """Iterate a DataLoader, turning a worker's read failure into one SlideError line."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (PathVLMError, OSError, RuntimeError, ValueError) as exc:
            last = [ln for ln in str(exc).splitlines() if ln.strip()]
            raise SlideError(slide_path, f"cannot read tiles: {last[-1] if last else exc}") from exc
        yield batch


def _worker_init(_worker_id: int) -> None:
    # readers decode and resize on one thread each, leaving the other cores to the encoder
    torch.set_num_threads(1)


def make_tile_loader(
    dataset: Dataset, batch_size: int, num_workers: int, device: torch.device
) -> DataLoader:
    """The DataLoader embedding uses: in-order batches, worker processes read ahead."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )


def encode_tiles(
    encoder: Any,
    dataset: Dataset,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "tiles",
    slide_path: Path | None = None,
) -> torch.Tensor:
    """Encode every item of ``dataset`` -> float32 [N, D] on CPU; workers read while we encode."""
    from tqdm.auto import tqdm

    device = encoder.device
    loader = make_tile_loader(dataset, batch_size, num_workers, device)
    out: list[torch.Tensor] = []
    bar = tqdm(total=len(dataset), desc=desc, unit="tile", leave=False, disable=not progress)
    # the encoder runs in its own precision (PatchEncoder.set_precision) and returns fp32
    with torch.inference_mode():
        for batch in _loader_batches(loader, slide_path or Path(desc)):
            feats = encoder.encode_image(batch.to(device, non_blocking=True))  # [B, D]
            out.append(feats.float().cpu())
            bar.update(len(batch))
    bar.close()
    if not out:
        return torch.zeros(0, encoder.embed_dim, dtype=torch.float32)
    return torch.cat(out)


# ---------------------------------------------------------------- one slide / one image


def encoder_precision(encoder: Any) -> str:
    """The precision an encoder computes in (what feature files record); fp32 if it does not say."""
    return str(getattr(encoder, "precision", "fp32"))


def _tissue_json(tissue_cfg: Any) -> str:
    data = (
        dataclasses.asdict(tissue_cfg) if dataclasses.is_dataclass(tissue_cfg) else dict(tissue_cfg)
    )
    return json.dumps(data, sort_keys=True, default=str)


def embed_slide(
    slide: Any,
    encoder: Any,
    transform: Any,
    tile_cfg: Any,
    tissue_cfg: Any,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
) -> FeatureBag:
    """Tile one open Slide and encode its tissue tiles, in memory.

    Returns:
        FeatureBag with features [N, D], coords [N, 2] (level-0 x, y) and the feature-file attrs.
    """
    from pathvlm import __version__
    from pathvlm.slide import tile_slide

    grid = tile_slide(slide, tile_cfg, tissue_cfg)
    n = len(grid.coords)
    if n == 0:
        log.warning("%s: no tissue found, 0 tiles", slide.path)
    slide_mpp = slide.mpp[0] if getattr(slide, "mpp", None) else None
    dataset = TileDataset(
        Path(slide.path), slide_mpp, grid, transform, slide=slide if num_workers == 0 else None
    )
    feats = encode_tiles(
        encoder,
        dataset,
        batch_size,
        num_workers if n else 0,
        progress,
        desc=Path(slide.path).name,
        slide_path=Path(slide.path),
    )
    attrs = {
        "encoder": encoder.name,
        "encoder_weights_hash": encoder.weights_hash,
        "precision": encoder_precision(encoder),
        "feature_dim": int(encoder.embed_dim),
        "mpp": float(grid.mpp),
        "patch_size": int(grid.size),
        "level": int(grid.level),
        "level_size": int(grid.level_size),
        "tissue_config": _tissue_json(tissue_cfg),
        "slide_path": str(slide.path),
        "pathvlm_version": __version__,
    }
    coords = torch.as_tensor(np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2))
    return FeatureBag(feats, coords, attrs)


def embed_image(
    image: Any,
    encoder: Any,
    transform: Any,
    size: int = 224,
    image_mpp: float | None = None,
    target_mpp: float | None = None,
    batch_size: int = 64,
) -> FeatureBag:
    """Encode one plain PIL image as a small bag of tiles (cut by `image_tiles`); each tile's
    feature is the mean over the encoder's ``test_views`` (`tile_views`).

    ``image_mpp``: the image's own um/px; ``target_mpp``: the scale tiles are cut at (the
    model's ``tile_mpp``). With both, tiles are resampled to the target scale; without
    ``image_mpp`` the image is taken to be at the target scale already, and the bag's attrs say
    so (``mpp_assumed``). Coords are (x, y) in the image's own pixels.
    """
    from pathvlm import __version__

    image = image.convert("RGB")
    tiles, coords = image_tiles(image, size, image_mpp, target_mpp)
    views = encoder_views(encoder)
    step = max(1, batch_size // views)  # tiles a batch; their views are built batch by batch
    parts = []
    with torch.inference_mode():
        for i in range(0, len(tiles), step):
            chunk = tiles[i : i + step]
            x = torch.stack([transform(v) for t in chunk for v in tile_views(t, views)])
            emb = encoder.encode_image(x.to(encoder.device)).float().cpu()
            parts.append(emb.reshape(len(chunk), views, -1).mean(dim=1))  # each tile: the mean of its views
    feats = torch.cat(parts)
    attrs = {
        "encoder": encoder.name,
        "encoder_weights_hash": encoder.weights_hash,
        "precision": encoder_precision(encoder),
        "feature_dim": int(encoder.embed_dim),
        "patch_size": size,
        "mpp": float(target_mpp or image_mpp or 0.0),
        "image_mpp": float(image_mpp or target_mpp or 0.0),  # the pixel size used (or assumed)
        "mpp_assumed": image_mpp is None,
        "test_views": views,
        "pathvlm_version": __version__,
    }
    return FeatureBag(feats, torch.tensor(coords, dtype=torch.int64).reshape(-1, 2), attrs)


def assumed_scale_note(names: Sequence[str], tile_mpp: float | None,
                       how: str = "--mpp / mpp=") -> str:
    """The line every output shows when plain images came without a pixel size; ``how`` says
    where to give one."""
    scale = f"{tile_mpp:g} um/px (the encoder's tile scale)" if tile_mpp else "native pixels"
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"pixel size unknown for {shown}: assumed {scale}; give its own ({how}) if it differs"


def _tile_origins(length: int, size: int) -> list[int]:
    if length <= size:
        return [0]
    pos = list(range(0, length - size + 1, size))
    return pos if pos[-1] == length - size else [*pos, length - size]


def image_tiles(
    image: Any, size: int, mpp: float | None = None, target_mpp: float | None = None
) -> tuple[list[Any], list[tuple[int, int]]]:
    """A PIL image cut into ``size`` x ``size`` tiles at ``target_mpp``, and their (x, y) in the
    image's own pixels.

    Every path that turns a plain image into tiles (chat, zero-shot, evaluation, reports) cuts it
    here, the same way. With the image's pixel size ``mpp`` and the encoder's ``target_mpp``,
    each tile covers ``size * target_mpp / mpp`` image pixels and is read through the slide
    backend (`ImageSlide.read_at_mpp`), resampled as whole-slide tiles are; without them the
    image is taken to be at the target scale (native pixels). The last row/column is shifted
    inward so every pixel is covered without padding; an image no larger than one tile is one
    tile, clipped, that the encoder transform resizes.
    """
    if not mpp or not target_mpp or abs(mpp / target_mpp - 1) < 1e-6:
        span = size
    else:
        span = max(1, round(size * target_mpp / mpp))  # image pixels per tile
    coords = [(x, y) for y in _tile_origins(image.height, span) for x in _tile_origins(image.width, span)]
    if span == size:
        # clipped at the border so a thin image is not padded with black
        tiles = [image.crop((x, y, min(x + size, image.width), min(y + size, image.height)))
                 for x, y in coords]
        return tiles, coords
    from pathvlm.slide.base import resize_exact
    from pathvlm.slide.image_backend import ImageSlide

    slide = ImageSlide.from_image(image, mpp)
    tiles = []
    for x, y in coords:
        w, h = min(span, image.width - x), min(span, image.height - y)
        if (w, h) == (span, span):
            tiles.append(slide.read_at_mpp((x, y), (size, size), target_mpp))
        else:  # a clipped tile: the same scale, fewer pixels
            out = (max(1, round(w * mpp / target_mpp)), max(1, round(h * mpp / target_mpp)))
            tiles.append(resize_exact(slide.read_region((x, y), 0, (w, h)), out))
    return tiles, coords


# The views a plain image's tiles are seen in at test time (``PatchEncoder.test_views``): tissue
# has no up, down, left or right, so the encoder's embeddings of a tile's turns and mirror images
# are equally valid and their mean is steadier than any one. 1: as is; 2: and its left-right
# mirror; 4: and its top-bottom mirror and half turn; 8: every turn and mirror of the square.
# (PIL Image.Transpose names of the views after the tile itself)
_VIEW_OPS = ("FLIP_LEFT_RIGHT", "FLIP_TOP_BOTTOM", "ROTATE_180", "ROTATE_90", "ROTATE_270", "TRANSPOSE",
             "TRANSVERSE")


def encoder_views(encoder: Any) -> int:
    """How many views of each plain-image tile ``encoder`` averages (1 when it records none)."""
    return int(getattr(encoder, "test_views", None) or 1)


def tile_views(tile: Any, n: int) -> list[Any]:
    """The first ``n`` (one of TEST_VIEWS) turns and mirror images of a PIL tile, itself first.
    The first 2 and 4 are each closed under composition. A tile that is not square (an image's
    clipped edge) turned a quarter is a different shape, which the encoder transform resizes."""
    from PIL import Image

    if problem := views_problem(n):
        raise ConfigError(problem)
    return [tile] + [tile.transpose(Image.Transpose[op]) for op in _VIEW_OPS[: n - 1]]


def pooled_image_embeddings(
    images: Sequence[Any],
    encoder: Any,
    transform: Any,
    size: int | None,
    batch_size: int = 64,
    device: torch.device | None = None,
    progress: bool = False,
    desc: str = "embedding",
    load: Any = None,
    mpp: float | Sequence[float | None] | None = None,
    target_mpp: float | None = None,
) -> torch.Tensor:
    """[N, D] L2-normalised image embeddings: the mean of each image's tile embeddings.

    ``images[i]`` is a PIL image, or what ``load`` turns into one. An image larger than one
    ``size`` tile is cut by `image_tiles` (the cells keep the scale the encoder was trained at, as
    in chat) instead of being shrunk to one input; its unit tile embeddings are averaged and
    re-normalised. ``mpp`` (one value, or one per image; None = unknown) is the images' own
    pixel size, resampled to ``target_mpp`` (the encoder's tile scale) when both are known.
    ``size=None`` embeds each image whole (slide tiles, already cut, one view each, as
    `embed_slide` does). Otherwise each tile is seen in the encoder's ``test_views`` turns and
    mirror images (`tile_views`), averaged with its tiles. Tiles of many images share batches.
    """
    from tqdm.auto import tqdm

    device = device or getattr(encoder, "device", None) or next(encoder.parameters()).device
    load = load or (lambda item: item)
    sums: list[torch.Tensor] = []
    pending: list[tuple[int, Any]] = []  # (image index, tile)

    def flush() -> None:
        x = torch.stack([transform(t) for _, t in pending]).to(device)
        with torch.inference_mode():
            emb = torch.nn.functional.normalize(encoder.encode_image(x).float(), dim=-1).cpu()
        for (owner, _), e in zip(pending, emb):
            if owner == len(sums):
                sums.append(torch.zeros_like(e))
            sums[owner] += e
        pending.clear()

    per_image = list(mpp) if isinstance(mpp, Sequence) else [mpp] * len(images)
    if len(per_image) != len(images):
        raise ValueError(f"{len(per_image)} mpp values for {len(images)} images")
    if target_mpp is None and any(m is not None for m in per_image):
        raise ConfigError(
            f"encoder {getattr(encoder, 'name', '?')} records no tile scale (tile_mpp), so images "
            "given with a pixel size cannot be resampled; use a model, or an encoder saved with "
            "tile_mpp"
        )
    views = 1 if size is None else encoder_views(encoder)
    for i in tqdm(range(len(images)), desc=desc, disable=not progress):
        image = load(images[i]).convert("RGB")
        tiles = [image] if size is None else image_tiles(image, size, per_image[i], target_mpp)[0]
        pending += [(i, v) for t in tiles for v in tile_views(t, views)]
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    if not sums:
        return torch.zeros(0, 0)
    return torch.nn.functional.normalize(torch.stack(sums), dim=-1)  # [N, D]


# ---------------------------------------------------------------- many slides


def _resume_key(slide_path: Path, encoder: Any, tile_cfg: Any, tissue_cfg: Any,
                precision: str | None = None) -> dict[str, Any]:
    stat = slide_path.stat()
    return {
        "encoder": encoder.name,
        "encoder_weights_hash": encoder.weights_hash,
        # bf16 features are not fp32 features: a precision change is a different run
        "precision": precision or encoder_precision(encoder),
        "mpp": float(tile_cfg.mpp),
        "patch_size": int(tile_cfg.size),
        # max_upsample only refuses slides: the features of a slide it accepts do not depend on it
        "tile_config": _tissue_json({k: v for k, v in dataclasses.asdict(tile_cfg).items() if k != "max_upsample"}),
        "tissue_config": _tissue_json(tissue_cfg),
        "slide_size": int(stat.st_size),
        "slide_mtime_ns": int(stat.st_mtime_ns),
    }


def _complete_by_record(
    slides: Sequence[Path], out_dir: Path, cfg: EmbedConfig, tissue_cfg: Any
) -> list[Path] | None:
    """Every slide's feature file when all are complete for the encoder as its saved config
    records it, else None. A re-run of a finished batch then never builds the encoder (its
    start-up dominates a small slide). Only files newer than every encoder file count, so
    weights replaced under an unchanged config are never mistaken for the recorded ones."""
    from pathvlm.encoders.registry import read_encoder_record
    from pathvlm.slide import TileConfig

    record = read_encoder_record(cfg.encoder)
    if record is None or not slides or len({p.stem for p in slides}) != len(slides):
        return None
    mpp = cfg.mpp or record.tile_mpp or DEFAULT_TILE_MPP
    tile_cfg = from_dict(TileConfig, {**cfg.tile, "mpp": mpp, "size": cfg.size or record.tile_size},
                         prefix="tile")
    newest = record.newest_mtime_ns()
    from pathvlm.precision import resolve_for

    # what the encoder would run in (PatchEncoder.set_precision makes the same choice)
    precision = resolve_for(cfg.precision, cfg.device, not record.reduced_precision_note, f"encoder {cfg.encoder}",
                            record.reduced_precision_note)
    outs = []
    for slide_path in slides:
        out_path = out_dir / f"{slide_path.stem}.h5"
        if not (slide_path.is_file() and out_path.is_file()) or out_path.stat().st_mtime_ns <= newest:
            return None
        if not is_complete(out_path, _resume_key(slide_path, record, tile_cfg, tissue_cfg, precision)):
            return None
        outs.append(out_path)
    return outs


def encoder_tile_scale(encoder: Any, mpp: float | None = None,
                       size: int | None = None) -> tuple[float, int]:
    """(um/px, tile px) to cut slides at: what was asked, else the scale the encoder was trained
    at (``tile_mpp``, ``tile_size``: `native_tile_size`), else 0.5 um/px and its input."""
    from pathvlm.encoders import native_tile_size

    return (float(mpp or getattr(encoder, "tile_mpp", None) or DEFAULT_TILE_MPP),
            int(size or native_tile_size(encoder)))


def embed_slides(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    cfg: EmbedConfig | None = None,
    encoder_and_transform: tuple[Any, Any] | None = None,
) -> EmbedResult:
    """Embed many slides into ``out_dir/<stem>.h5``; completed slides are skipped.

    Args:
        inputs: slide paths, folders, ``.txt`` list files or globs.
        out_dir: where feature files go.
        cfg: run settings; shard and torchrun/accelerate rank pick this process's share.
        encoder_and_transform: an already built (encoder, transform), else ``cfg.encoder`` is created.

    Returns:
        EmbedResult; bad slides are listed in ``failed`` and do not stop the others.
    """
    from tqdm.auto import tqdm

    from pathvlm.encoders import create_encoder
    from pathvlm.slide import TileConfig, TissueConfig, open_slide

    cfg = cfg or EmbedConfig()
    out_dir = Path(out_dir)
    slides = select_shard(collect_slides(inputs), cfg.shard)
    tissue_cfg = from_dict(TissueConfig, cfg.tissue, prefix="tissue")
    if encoder_and_transform is None and cfg.weights is None:
        done = _complete_by_record(slides, out_dir, cfg, tissue_cfg)
        if done is not None:
            log.info("all %d slides complete for %s, skipped", len(done), cfg.encoder)
            return EmbedResult(skipped=done)
    encoder, transform = encoder_and_transform or create_encoder(
        cfg.encoder, device=cfg.device, weights=cfg.weights, precision=cfg.precision)
    if encoder_and_transform is not None and hasattr(encoder, "set_precision"):
        encoder.set_precision(cfg.precision)
    if getattr(encoder, "random_weights", False):
        log.warning("encoder %s has random weights (seeded, for tests and benchmarks): its features "
                    "carry no tissue information", encoder.name)
    mpp, size = encoder_tile_scale(encoder, cfg.mpp, cfg.size)
    log.info("encoder %s (weights %s): %d px tiles at %g um/px", encoder.name, encoder.weights_hash,
             size, mpp)
    tile_cfg = from_dict(TileConfig, {**cfg.tile, "mpp": mpp, "size": size}, prefix="tile")
    result = EmbedResult()
    seen: dict[str, Path] = {}
    for slide_path in tqdm(slides, desc="slides", unit="slide", disable=not cfg.progress):
        out_path = out_dir / f"{slide_path.stem}.h5"
        if slide_path.stem in seen:
            reason = f"output name {out_path.name} already used by {seen[slide_path.stem]}"
            result.failed.append((str(slide_path), reason))
            log.error("%s: %s", slide_path, reason)
            continue
        seen[slide_path.stem] = slide_path
        try:
            if not slide_path.is_file():
                raise SlideError(slide_path, "file not found")
            key = _resume_key(slide_path, encoder, tile_cfg, tissue_cfg)
            if is_complete(out_path, key):
                log.info("%s: complete, skipped", out_path)
                result.skipped.append(out_path)
                continue
            with open_slide(slide_path, mpp=cfg.slide_mpp) as slide:
                bag = embed_slide(
                    slide,
                    encoder,
                    transform,
                    tile_cfg,
                    tissue_cfg,
                    cfg.batch_size,
                    cfg.num_workers,
                    cfg.progress,
                )
            write_features(out_path, bag.features, bag.coords, {**bag.attrs, **key})
        except PathVLMError as exc:
            result.failed.append((str(slide_path), str(exc)))
            log.error("%s", exc)
            continue
        result.written.append(out_path)
        result.n_tiles[str(slide_path)] = len(bag)
    return result
