"""Zero-shot classification: class prompts vs image, tile or slide embeddings (CLIP, MI-Zero).

Text side: every class synonym x template is encoded, L2-normalised, averaged per class and
re-normalised (prompt ensembling). Slides and feature files are scored tile by tile and pooled
into one slide prediction with top-k mean pooling of the per-class tile logits.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathvlm.embed import assumed_scale_note
from pathvlm.errors import ConfigError, ModelError, PathVLMError, SlideError
from pathvlm.resources import resolve_resource

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = (
    "an H&E image of {}.",
    "a histopathology image of {}.",
    "an H&E stained image of {}.",
    "a photomicrograph of {}.",
    "{}, H&E.",
    "a microscopic image of {}.",
)
DEFAULT_LOGIT_SCALE = 100.0
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
FEATURE_SUFFIXES = {".h5", ".hdf5"}
# formats opened as whole slides (tiled) rather than as one image
SLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif", ".dcm"}

# (encoder name, weights hash, parameter versions, prompt-set hash) -> [C, D] class embeddings
_TEXT_CACHE: dict[tuple[str, str, int, str], torch.Tensor] = {}


def _param_versions(encoder: Any) -> int:
    """Sum of the parameters' in-place write counters: changes when an optimiser steps.

    ``weights_hash`` is computed once at load, so without this a classifier built during
    training would reuse text embeddings of older weights.
    """
    params = encoder.parameters() if hasattr(encoder, "parameters") else ()
    return sum(p._version for p in params)


@dataclass
class PromptSet:
    """Class key -> synonyms, and the templates each synonym is put into."""

    classes: dict[str, list[str]]
    templates: list[str]
    source: str = "inline"

    @property
    def names(self) -> list[str]:
        return list(self.classes)

    def prompts(self, cls: str) -> list[str]:
        return [t.format(s) for s in self.classes[cls] for t in self.templates]

    def digest(self) -> str:
        blob = json.dumps({"classes": self.classes, "templates": self.templates}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def subset(self, keys: Sequence[str]) -> PromptSet:
        return PromptSet({k: self.classes[k] for k in keys}, self.templates, self.source)

    def to_dict(self) -> dict[str, Any]:
        return {"classes": self.classes, "templates": self.templates, "source": self.source}


def load_prompts(path: str | Path) -> PromptSet:
    """Read a CONCH-style prompt file: ``{"classes": {key: [synonyms]}, "templates": [...]}``.

    ``path`` is a file or a packaged prompt set's name (``"crc_tissue"``; ``pathvlm list prompts``).
    """
    path = resolve_resource("prompts", path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read prompt file ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: prompt file is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("classes"), dict):
        raise ConfigError(f"{path}: prompt file needs a 'classes' object of class -> synonyms")
    return make_prompt_set(data["classes"], data.get("templates"), source=str(path))


def make_prompt_set(
    classes: Sequence[str] | dict[str, Sequence[str]] | str | Path,
    templates: Sequence[str] | None = None,
    source: str = "inline",
) -> PromptSet:
    """Accepted class specs (names, dict of synonyms, prompt-file path) -> a PromptSet."""
    if isinstance(classes, (str, Path)) and Path(classes).suffix == ".json":
        prompt_set = load_prompts(classes)
        return (
            PromptSet(prompt_set.classes, list(templates), prompt_set.source)
            if templates
            else prompt_set
        )
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    if isinstance(classes, dict):
        table = {}
        for key, syn in classes.items():
            syn = [syn] if isinstance(syn, str) else list(syn)
            if not syn or not all(isinstance(s, str) and s.strip() for s in syn):
                raise ConfigError(
                    f"{source}: class {key!r} needs a non-empty list of synonym strings"
                )
            table[str(key)] = syn
    else:
        table = {str(c): [str(c)] for c in classes}
    if len(table) < 2:
        raise ConfigError(f"{source}: zero-shot needs at least two classes, got {list(table)}")
    templates = list(templates) if templates else list(DEFAULT_TEMPLATES)
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ConfigError(f"{source}: template {t!r} must contain exactly one '{{}}'")
    return PromptSet(table, templates, source)


def _resolve_encoder(model: Any) -> tuple[Any, Callable | None, float]:
    """PathVLM or PatchEncoder -> (encoder, image transform or None, logit scale)."""
    encoder = getattr(model, "encoder", None)
    encoder = model if encoder is None else encoder
    if not hasattr(encoder, "encode_image"):
        raise ModelError(f"{type(model).__name__} is neither a PathVLM nor a PatchEncoder")
    if not getattr(encoder, "has_text", False):
        raise ModelError(
            f"encoder {getattr(encoder, 'name', type(encoder).__name__)} has no text tower, so it "
            "cannot do zero-shot classification; use a CLIP-style encoder (e.g. the demo model, "
            "QuiltNet) or train a linear probe (`pathvlm eval linear-probe`)"
        )
    transform = getattr(model, "transform", None) or getattr(encoder, "transform", None)
    scale = DEFAULT_LOGIT_SCALE
    inner = getattr(encoder, "model", encoder)
    logit_scale = getattr(inner, "logit_scale", None)
    if isinstance(logit_scale, torch.Tensor):
        scale = float(logit_scale.detach().exp().clamp(max=100.0))
    return encoder, transform, scale


def tile_scale(model: Any) -> float | None:
    """The um/px a model's encoder sees tiles at: a PathVLM's ``cfg.tile_mpp``, else what the
    encoder records (``PatchEncoder.tile_mpp``), else None."""
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "tile_mpp", None):
        return float(cfg.tile_mpp)
    encoder = getattr(model, "encoder", None) or model
    return float(encoder.tile_mpp) if getattr(encoder, "tile_mpp", None) else None


def encode_prompt_set(encoder: Any, prompt_set: PromptSet) -> torch.Tensor:
    """[C, D] class embeddings: mean of L2-normalised prompt embeddings, re-normalised. Cached."""
    key = (
        str(getattr(encoder, "name", id(encoder))),
        str(getattr(encoder, "weights_hash", id(encoder))),
        _param_versions(encoder),
        prompt_set.digest(),
    )
    if key in _TEXT_CACHE:
        return _TEXT_CACHE[key]
    rows = []
    with torch.inference_mode():
        for cls in prompt_set.names:
            emb = encoder.encode_text(prompt_set.prompts(cls)).float()  # [T, D]
            emb = torch.nn.functional.normalize(emb, dim=-1).mean(dim=0)
            rows.append(torch.nn.functional.normalize(emb, dim=-1))
    class_emb = torch.stack(rows).cpu()  # [C, D]
    _TEXT_CACHE[key] = class_emb
    return class_emb


def seed_prompt_embeddings(encoder: Any, prompt_set: PromptSet, class_emb: Any) -> None:
    """Put stored [C, D] class embeddings (e.g. from a calibration file fitted with this encoder
    and prompt set) into the cache, so the text tower need not run at load."""
    emb = torch.as_tensor(np.asarray(class_emb, dtype=np.float32))
    if emb.shape[0] != len(prompt_set.names):
        raise ModelError(f"stored prompt embeddings have {emb.shape[0]} rows, the prompt set "
                         f"{len(prompt_set.names)} classes")
    key = (str(getattr(encoder, "name", id(encoder))),
           str(getattr(encoder, "weights_hash", id(encoder))), _param_versions(encoder),
           prompt_set.digest())
    _TEXT_CACHE.setdefault(key, torch.nn.functional.normalize(emb, dim=-1))


def topk_pool(tile_logits: np.ndarray, k: int) -> np.ndarray:
    """MI-Zero pooling: per class, the mean of its k highest tile logits. [N, C] -> [C]."""
    tile_logits = np.asarray(tile_logits, dtype=np.float64)
    k = max(1, min(int(k), tile_logits.shape[0]))
    top = -np.sort(-tile_logits, axis=0)[:k]  # [k, C], largest first per class
    return top.mean(axis=0)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class SlideZeroShot:
    """Per-tile scores of one slide or feature file and the pooled slide prediction."""

    name: str
    classes: list[str]
    coords: np.ndarray  # [N, 2] level-0 (x, y)
    tile_logits: np.ndarray  # [N, C]
    top_k: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tile_probs(self) -> np.ndarray:
        return _softmax(self.tile_logits)  # [N, C]

    @property
    def logits(self) -> np.ndarray:
        return topk_pool(self.tile_logits, self.top_k)  # [C]

    @property
    def probs(self) -> np.ndarray:
        return _softmax(self.logits)

    @property
    def label(self) -> str:
        return self.classes[int(np.argmax(self.probs))]

    def class_map(self) -> dict[str, Any]:
        """Per-tile map for heatmaps: coords [N, 2], argmax class index [N], probs [N, C]."""
        probs = self.tile_probs
        return {
            "coords": self.coords,
            "label": probs.argmax(axis=1),
            "probs": probs,
            "classes": list(self.classes),
        }


@dataclass
class ZeroShotResult:
    """One row per input (image or pooled slide); ``slides`` keeps per-tile detail by name."""

    classes: list[str]
    names: list[str]
    logits: np.ndarray  # [N, C]
    slides: dict[str, SlideZeroShot] = field(default_factory=dict)
    prompts: dict[str, Any] = field(default_factory=dict)
    # plain images by name -> {"mpp": pixel size used, "assumed": True when none was given}
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)
    tile_mpp: float | None = None  # the scale plain images were resampled to

    @property
    def notes(self) -> list[str]:
        """What the caller should be told: the scale assumed for images without a pixel size."""
        assumed = [Path(n).name for n, s in self.scales.items() if s["assumed"]]
        return [assumed_scale_note(assumed, self.tile_mpp)] if assumed else []

    @property
    def probs(self) -> np.ndarray:
        return _softmax(self.logits)  # [N, C]

    @property
    def labels(self) -> list[str]:
        return [self.classes[i] for i in self.probs.argmax(axis=1)]

    @property
    def top(self) -> list[tuple[str, float]]:
        """(predicted class, its probability) for every input."""
        probs = self.probs
        return [(self.classes[i], float(probs[n, i])) for n, i in enumerate(probs.argmax(axis=1))]

    def topk(self, k: int = 3) -> list[list[tuple[str, float]]]:
        probs = self.probs
        order = np.argsort(-probs, axis=1)[:, :k]
        return [[(self.classes[i], float(probs[n, i])) for i in row] for n, row in enumerate(order)]

    def to_dataframe(self):
        import pandas as pd

        df = pd.DataFrame(self.probs, columns=self.classes)
        df.insert(0, "label", self.labels)
        df.insert(0, "input", self.names)
        return df

    def to_dict(self) -> dict[str, Any]:
        probs = self.probs
        return {
            "classes": self.classes,
            "prompts": self.prompts,
            "tile_mpp": self.tile_mpp,
            "notes": self.notes,
            "predictions": [
                {
                    "input": n,
                    "label": lab,
                    "probs": {c: round(float(p), 6) for c, p in zip(self.classes, row)},
                    **({"mpp": self.scales[n]["mpp"], "mpp_assumed": self.scales[n]["assumed"]}
                       if n in self.scales else {}),
                }
                for n, lab, row in zip(self.names, self.labels, probs)
            ],
        }


class ZeroShotClassifier:
    """Classify images, slides and feature files against text prompts.

    Args:
        model: a PathVLM (its ``.encoder`` is used) or a PatchEncoder with a text tower.
        classes: class names, a dict class -> synonyms, or a prompt-file path.
        templates: prompt templates with one ``{}``; defaults to a pathology set.
        prompts: a prompt-file path or packaged name (``"crc_tissue"``), a PromptSet or a dict (``classes`` + ``templates``); overrides
            ``classes``.
        transform: PIL -> [3, H, W]; defaults to the model's own preprocessing.
        batch_size: images per forward pass.
        top_k: tiles pooled per class for slide predictions.
        progress: show a progress bar (None: only on runs of more than one batch).
        tile_mpp: the um/px images and slides are cut at; None: the model's (`tile_scale`).
    """

    def __init__(
        self,
        model: Any,
        classes: Any = None,
        templates: Sequence[str] | None = None,
        prompts: str | Path | dict | None = None,
        transform: Callable | None = None,
        batch_size: int = 64,
        top_k: int = 10,
        progress: bool | None = None,
        tile_mpp: float | None = None,
    ):
        self.encoder, own_transform, self.logit_scale = _resolve_encoder(model)
        self.tile_mpp = tile_mpp or tile_scale(model)
        if isinstance(prompts, PromptSet):
            self.prompt_set = prompts
        elif prompts is not None:
            if isinstance(prompts, dict):
                self.prompt_set = make_prompt_set(
                    prompts["classes"], prompts.get("templates") or templates
                )
            else:
                loaded = load_prompts(prompts)
                self.prompt_set = (PromptSet(loaded.classes, list(templates), loaded.source)
                                   if templates else loaded)
        elif classes is not None:
            self.prompt_set = make_prompt_set(classes, templates)
        else:
            raise ConfigError("zero-shot needs classes or a prompt file")
        self._transform = transform or own_transform
        self.batch_size = batch_size
        self.top_k = top_k
        self.progress = progress
        self.class_embeddings = encode_prompt_set(self.encoder, self.prompt_set)  # [C, D]

    @property
    def classes(self) -> list[str]:
        return self.prompt_set.names

    @property
    def transform(self) -> Callable:
        if self._transform is None:
            from pathvlm.encoders import build_transform

            self._transform = build_transform(self.encoder)
        return self._transform

    def _device(self) -> torch.device:
        try:
            return next(self.encoder.parameters()).device
        except (AttributeError, StopIteration):
            return torch.device("cpu")

    def logits_from_embeddings(self, embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
        """[N, D] image-space embeddings -> [N, C] scaled cosine logits."""
        emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        emb = torch.nn.functional.normalize(emb, dim=-1)
        return (self.logit_scale * emb @ self.class_embeddings.T).numpy().astype(np.float64)

    def embed_images(
        self, images: Sequence[Any], desc: str = "zero-shot", tiled: bool = True,
        mpp: float | Sequence[float | None] | None = None,
    ) -> torch.Tensor:
        """PIL images or paths -> [N, D] unit image embeddings, batched.

        ``tiled``: an image larger than the encoder's input is cut into tiles at the tile scale
        whose embeddings are averaged (`pathvlm.embed.pooled_image_embeddings`), as chat sees
        images; False embeds each image whole (slide tiles, already cut at the tile scale).
        ``mpp``: the images' own um/px (one value or one per image; None: unknown, taken to be
        the tile scale); they are resampled to ``tile_mpp``.
        """
        from pathvlm.embed import pooled_image_embeddings
        from pathvlm.encoders import native_tile_size

        show = self.progress if self.progress is not None else len(images) > self.batch_size
        emb = pooled_image_embeddings(
            images, self.encoder, self.transform, native_tile_size(self.encoder) if tiled else None,
            self.batch_size, self._device(), show, desc, load=_open_image, mpp=mpp,
            target_mpp=self.tile_mpp,
        )
        if emb.numel() == 0:
            return torch.zeros(0, int(self.class_embeddings.shape[1]))
        return emb  # [N, D]

    def predict(self, inputs: Any, mpp: float | None = None) -> ZeroShotResult:
        """Score PIL images, image paths, folders, Slides and feature files; one row per input.

        ``mpp``: um/px of the plain images (and of slide files that record none); images are
        resampled from it to the tile scale. Without it they are taken to be at the tile scale,
        and the result's ``notes`` say so.
        """
        if mpp is not None and not mpp > 0:
            raise ConfigError(f"mpp must be a positive number, got {mpp}")
        items = expand_inputs(inputs)
        names, rows, slides = [], [None] * len(items), {}
        image_idx = [i for i, (_, kind, _) in enumerate(items) if kind == "image"]
        if image_idx:
            emb = self.embed_images([items[i][2] for i in image_idx], mpp=mpp)
            for i, row in zip(image_idx, self.logits_from_embeddings(emb)):
                rows[i] = row
        for i, (name, kind, obj) in enumerate(items):
            if kind != "image":
                slide = (
                    self.predict_features(obj) if kind == "features"
                    else self.predict_slide(obj, mpp=mpp)
                )
                slides[name] = slide
                rows[i] = slide.logits
            names.append(name)
        logits = np.stack(rows) if rows else np.zeros((0, len(self.classes)))
        scales = {items[i][0]: {"mpp": mpp or self.tile_mpp, "assumed": mpp is None}
                  for i in image_idx}
        return ZeroShotResult(self.classes, names, logits, slides, self.prompt_set.to_dict(),
                              scales, self.tile_mpp)

    def predict_features(self, source: Any) -> SlideZeroShot:
        """A feature file (or FeatureBag) -> per-tile logits and a top-k pooled slide prediction."""
        from pathvlm.features import load_features

        bag = source if hasattr(source, "features") else load_features(source)
        attrs = dict(bag.attrs)
        where = str(bag.path or "features")
        own_hash = getattr(self.encoder, "weights_hash", None)
        if (
            attrs.get("encoder_weights_hash")
            and own_hash
            and attrs["encoder_weights_hash"] != own_hash
        ):
            raise ModelError(
                f"{where}: features come from encoder {attrs.get('encoder')} (weights "
                f"{attrs['encoder_weights_hash']}), not this model's "
                f"{getattr(self.encoder, 'name', '?')} ({own_hash}); "
                "re-embed the slide with this model's encoder"
            )
        elif attrs.get("encoder") and attrs["encoder"] != getattr(self.encoder, "name", None):
            log.warning(
                "%s: features come from encoder %s, zero-shot uses %s; scores are only "
                "meaningful if they share an embedding space",
                where,
                attrs["encoder"],
                getattr(self.encoder, "name", "?"),
            )
        if bag.dim != self.class_embeddings.shape[1]:
            raise ModelError(
                f"{where}: features have {bag.dim} dims, the text embeddings "
                f"{self.class_embeddings.shape[1]}"
            )
        name = Path(bag.path).stem if bag.path else "features"
        return SlideZeroShot(
            name,
            self.classes,
            bag.coords.numpy(),
            self.logits_from_embeddings(bag.features),
            self.top_k,
            meta={"encoder": attrs.get("encoder"), "source": where},
        )

    def predict_slide(
        self, slide: Any, tile_config: Any = None, tissue_config: Any = None,
        mpp: float | None = None,
    ) -> SlideZeroShot:
        """A Slide or slide path -> tiles, per-tile logits and the top-k pooled prediction.

        Tiles are cut at the tile scale and the encoder's input size unless ``tile_config``
        says otherwise; ``mpp`` is the resolution of a slide file that records none.
        """
        from pathvlm.encoders import native_tile_size
        from pathvlm.slide import TileConfig, TissueConfig, open_slide, read_tile, tile_slide

        if isinstance(slide, (str, Path)):
            slide = open_slide(slide, mpp=mpp)
        if tile_config is None:
            tile_config = (TileConfig(mpp=self.tile_mpp, size=native_tile_size(self.encoder))
                           if self.tile_mpp else TileConfig())
        grid = tile_slide(slide, tile_config, tissue_config or TissueConfig())
        n = len(grid.coords)
        if n == 0:
            raise SlideError(slide.path, "no tissue tiles found for zero-shot classification")
        tiles = _LazyTiles(slide, grid, read_tile)
        emb = self.embed_images(tiles, desc=f"zero-shot {slide.name}", tiled=False)
        return SlideZeroShot(
            slide.name,
            self.classes,
            np.asarray(grid.coords),
            self.logits_from_embeddings(emb),
            self.top_k,
            meta={"source": str(slide.path), "mpp": getattr(grid, "mpp", None)},
        )


class _LazyTiles(Sequence):
    """Tiles of a grid read on demand, so a slide never sits in memory as images."""

    def __init__(self, slide: Any, grid: Any, read_tile: Callable):
        self.slide, self.grid, self.read_tile = slide, grid, read_tile

    def __len__(self) -> int:
        return len(self.grid.coords)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.read_tile(self.slide, self.grid, i)


def _open_image(item: Any):
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    try:
        with Image.open(item) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise SlideError(item, f"cannot read image ({exc})") from exc


def expand_inputs(inputs: Any) -> list[tuple[str, str, Any]]:
    """Inputs -> [(name, kind, object)] with kind image | features | slide; folders are expanded."""
    from PIL import Image

    if (
        isinstance(inputs, (str, Path, Image.Image))
        or hasattr(inputs, "read_region")
        or hasattr(inputs, "features")
    ):
        inputs = [inputs]
    items: list[tuple[str, str, Any]] = []
    for n, item in enumerate(_iterable(inputs)):
        if isinstance(item, Image.Image):
            items.append((getattr(item, "filename", "") or f"image_{n}", "image", item))
        elif hasattr(item, "read_region"):
            items.append((str(getattr(item, "name", f"slide_{n}")), "slide", item))
        elif hasattr(item, "features") and hasattr(item, "coords"):
            items.append((Path(item.path).stem if item.path else f"features_{n}", "features", item))
        elif isinstance(item, (str, Path)):
            items.extend(_expand_path(Path(item)))
        else:
            raise PathVLMError(f"cannot classify an input of type {type(item).__name__}")
    return items


def _iterable(inputs: Any) -> Iterable:
    try:
        return list(inputs)
    except TypeError as exc:
        raise PathVLMError(
            f"inputs must be an image, path, slide, or a list of them, not {type(inputs).__name__}"
        ) from exc


def _expand_path(path: Path) -> list[tuple[str, str, Any]]:
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES | FEATURE_SUFFIXES | SLIDE_SUFFIXES
        )
        if not files:
            raise SlideError(path, "folder holds no images, slides or feature files")
        return [entry for f in files for entry in _expand_path(f)]
    if not path.exists():
        raise SlideError(path, "file not found")
    suffix = path.suffix.lower()
    if suffix in FEATURE_SUFFIXES:
        return [(str(path), "features", path)]
    if suffix in SLIDE_SUFFIXES or (suffix in {".tif", ".tiff"} and _is_pyramidal(path)):
        return [(str(path), "slide", path)]
    if suffix in IMAGE_SUFFIXES:
        return [(str(path), "image", path)]
    raise SlideError(path, f"unsupported input type {suffix or '(no suffix)'}")


def _is_pyramidal(path: Path) -> bool:
    """A multi-page (pyramidal) TIFF is a whole slide; a single-page one is a plain image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1) > 1
    except (OSError, UnidentifiedImageError):
        return True  # let the slide reader report what is wrong


def zero_shot(model: Any, inputs: Any, classes: Any = None, **kwargs: Any) -> ZeroShotResult:
    """One-call zero-shot: ``ZeroShotClassifier(model, classes, **kwargs).predict(inputs)``."""
    return ZeroShotClassifier(model, classes, **kwargs).predict(inputs)
