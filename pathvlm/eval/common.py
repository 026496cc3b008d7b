"""What every eval shares: resolving ``--model``, image perturbations for robustness runs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pathvlm.errors import ConfigError, ModelError

ENCODER_PREFIX = "encoder:"


@dataclass
class EvalModel:
    """The model under evaluation and what a report needs to name it."""

    model: Any  # PathVLM or PatchEncoder
    encoder: Any
    transform: Callable | None
    name: str
    weights_hash: str

    def info(self) -> dict[str, Any]:
        from pathvlm.embed import encoder_views

        return {"model": self.name, "weights_hash": self.weights_hash, "test_views": encoder_views(self.encoder)}


def load_eval_model(spec: str, device: str | None = None, precision: str = "fp32",
                    views: int | None = None) -> EvalModel:
    """``encoder:<encoder name>`` builds a bare encoder; anything else goes to ``load_model``.

    ``precision``: the encoder's (and LLM's) inference precision, see `pathvlm.precision`.
    ``views``: test-time views of each plain-image tile (`pathvlm.embed.tile_views`); None keeps
    what the encoder records.
    """
    model = _load_eval_model(spec, device, precision)
    if views is not None:
        from pathvlm.encoders.patch_encoder import views_problem

        if problem := views_problem(views):
            raise ConfigError(problem)
        if model.encoder is None:
            raise ConfigError(f"--test-views: model {spec!r} has no patch encoder")
        model.encoder.test_views = int(views)
    return model


def _load_eval_model(spec: str, device: str | None, precision: str) -> EvalModel:
    if spec.startswith(ENCODER_PREFIX):
        from pathvlm.encoders import create_encoder

        encoder, transform = create_encoder(spec[len(ENCODER_PREFIX) :], device=device,
                                            precision=precision)
        return EvalModel(encoder, encoder, transform, spec, str(encoder.weights_hash))
    try:
        from pathvlm.model import load_model
    except ModuleNotFoundError as exc:
        if exc.name not in ("pathvlm.model", "pathvlm"):
            raise
        raise ModelError(
            f"cannot load model {spec!r}: pathvlm.model is not available in this "
            "install; use --model encoder:<encoder name>"
        ) from exc
    model = load_model(spec, precision=precision, device=device)
    encoder = getattr(model, "encoder", None)
    transform = getattr(model, "transform", None)
    whash = getattr(model, "weights_hash", None) or getattr(encoder, "weights_hash", "unknown")
    return EvalModel(model, encoder, transform, spec, str(whash))


@dataclass(frozen=True)
class Perturbation:
    """Robustness perturbation applied to every PIL image before the model's transform.

    ``scale``: pixel rescale factor emulating another microns per pixel while keeping the field
    size: x1.5 enlarges by 1.5 and centre-crops back (objects look 1.5x bigger, mpp / 1.5); x0.75
    shrinks and reflect-pads back to the original size. ``stain_sigma``: HED stain jitter
    (Tellez et al. 2018): each of the H, E, D optical densities is multiplied by U(1-s, 1+s) and
    shifted by U(-s, s), seeded per image so runs repeat.
    """

    scale: float = 1.0
    stain_sigma: float = 0.0
    seed: int = 0

    @property
    def active(self) -> bool:
        return self.scale != 1.0 or self.stain_sigma > 0

    def describe(self) -> dict[str, float]:
        return {
            "resize_mpp_factor": self.scale,
            "stain_jitter": self.stain_sigma,
            "seed": self.seed,
        }

    def __call__(self, image, index: int = 0):
        if self.scale <= 0:
            raise ConfigError(f"--resize-mpp-factor must be positive, got {self.scale}")
        if self.scale != 1.0:
            image = rescale_keep_size(image, self.scale)
        if self.stain_sigma > 0:
            image = _stain_jittered(image, self.stain_sigma, np.random.default_rng([self.seed, index]))
        return image


def rescale_keep_size(image, factor: float):
    from PIL import Image

    w, h = image.size
    nw, nh = max(1, round(w * factor)), max(1, round(h * factor))
    resized = image.resize((nw, nh), Image.Resampling.BICUBIC)
    if factor >= 1:
        left, top = (nw - w) // 2, (nh - h) // 2
        return resized.crop((left, top, left + w, top + h))
    arr = np.asarray(resized)
    pad_y, pad_x = h - nh, w - nw
    pad = ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0))
    mode = "reflect" if min(nh, nw) > max(pad_y, pad_x) // 2 + 1 else "symmetric"
    return Image.fromarray(np.pad(arr, pad, mode=mode))


def write_resampled_copies(rows: list[tuple[str, str, str]], folder, size: int = 224,
                           mpp: float = 0.5, index: Any = None) -> Any:
    """Copies of plain images resampled (bicubic) to ``size`` x ``size`` px, stated to be at ``mpp``
    um/px: how NCT-CRC-HE publishes its tiles (224 px, 0.5 um/px) made from thumbnails of them.

    ``rows``: (image path, label, split). Writes ``folder/<label>/<stem>.png`` and an index CSV
    (path, label, split, mpp; ``index``, default ``folder/index.csv``) and returns the index path.
    A copy already written is kept, so several folds share one folder."""
    import csv
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    out_rows = []
    for path, label, split in rows:
        target = folder / label / (Path(path).stem + ".png")
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(path) as im:
                resized = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            tmp = target.with_suffix(".tmp.png")
            resized.save(tmp)
            os.replace(tmp, target)
        out_rows.append([str(target.resolve()), label, split, mpp])
    index = Path(index) if index else folder / "index.csv"
    with index.open("w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label", "split", "mpp"], *out_rows])
    return index


def _stain_jittered(image, sigma: float, rng: np.random.Generator):
    from PIL import Image

    from pathvlm.stain import hed_jitter

    rgb = hed_jitter(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0, rng, sigma, sigma)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


class ImageSequence:
    """Images of a dataset opened (and perturbed) on demand, so a large set never sits in memory."""

    def __init__(self, paths: list, perturbation: Perturbation | None = None):
        self.paths = list(paths)
        self.perturbation = perturbation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        from pathvlm.zeroshot import _open_image

        image = _open_image(self.paths[i])
        if self.perturbation is not None and self.perturbation.active:
            image = self.perturbation(image, i)
        return image


def embed_dataset(
    encoder: Any,
    transform: Callable | None,
    images: ImageSequence,
    batch_size: int = 64,
    progress: bool | None = None,
    mpp: list[float | None] | None = None,
    target_mpp: float | None = None,
) -> np.ndarray:
    """[N, D] unit image embeddings of every image (tiles at the tile scale averaged, as in chat);
    ``mpp``: each image's um/px (None: taken to be ``target_mpp``)."""
    from pathvlm.embed import pooled_image_embeddings
    from pathvlm.embed_cache import load_array, save_array
    from pathvlm.encoders import build_transform, native_tile_size

    transform = transform or getattr(encoder, "transform", None) or build_transform(encoder)
    show = progress if progress is not None else len(images) > batch_size
    cache = _embedding_cache_path(encoder, images, mpp, target_mpp)
    if (cached := load_array(cache)) is not None:
        return cached
    emb = pooled_image_embeddings(images, encoder, transform, native_tile_size(encoder), batch_size,
                                  progress=show, mpp=mpp, target_mpp=target_mpp)
    out = emb.numpy() if emb.numel() else np.zeros((0, 0), dtype=np.float32)
    save_array(cache, out)
    return out


def _embedding_cache_path(encoder: Any, images: ImageSequence, mpp: list[float | None] | None = None,
                          target_mpp: float | None = None):
    """Where the embeddings of these files under this encoder are kept between evaluations
    (linear probe, few-shot k = 1, 4, 16 and their seeds embed the same images), or None when the
    encoder cannot be cached or an item is not a file (`pathvlm.embed_cache`). Beyond the encoder
    and the files, the key covers the images' pixel sizes and the perturbation."""
    from pathvlm.embed_cache import cache_path, encoder_key, file_stamp

    key = encoder_key(encoder)
    if key is None:
        return None
    files = [file_stamp(item) for item in images.paths]
    if any(f is None for f in files):
        return None
    pert = images.perturbation.describe() if images.perturbation is not None and images.perturbation.active else None
    return cache_path("embeddings", [*key, pert, files, mpp, target_mpp])


def scale_summary(paths: list, mpps: list[float | None], tile_mpp: float | None) -> dict[str, Any]:
    """What an eval report says about image scale: the tile scale images were resampled to, how
    many came with a pixel size, and a note naming those whose scale was assumed."""
    from pathlib import Path

    from pathvlm.embed import assumed_scale_note

    assumed = [Path(p).name for p, m in zip(paths, mpps) if m is None]
    given = sorted({m for m in mpps if m is not None})
    return {
        "scale": {"tile_mpp": tile_mpp, "images_with_mpp": len(mpps) - len(assumed),
                  "images_assumed": len(assumed), "mpp_values": given},
        "notes": [assumed_scale_note(assumed, tile_mpp)] if assumed else [],
    }
