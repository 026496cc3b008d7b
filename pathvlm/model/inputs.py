"""Turn what a user asks about (slide, image, feature file, bag, case, list) into feature bags.

A single slide or image is a case of one. Pixels are encoded only when no cached features are
given, and that needs the model's encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pathvlm.errors import ModelError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
CASE_SUFFIXES = {".yaml", ".yml", ".json"}


@dataclass
class SlideInput:
    """One slide's features plus the labels its prompt marker shows."""

    bag: Any  # FeatureBag (features [N, D], coords [N, 2])
    name: str | None
    stain: str | None = None
    part: str | None = None
    source: str = "<input>"


def _need_encoder(encoder: Any, what: str) -> None:
    if encoder is None:
        raise ModelError(f"{what}: this model has no patch encoder; pass cached features (.h5) instead")


def _tile(tile: Any) -> Any:
    """The TileConfig to cut slides and images with (None: its defaults)."""
    from pathvlm.slide import TileConfig

    return tile or TileConfig()


def _from_path(path: Path, encoder: Any, transform: Any, stain: str | None = None,
               part: str | None = None, tile: Any = None, mpp: float | None = None) -> list[SlideInput]:
    suffix = path.suffix.lower()
    if suffix == ".h5":
        from pathvlm.features import load_features

        bag = load_features(path)
        return [SlideInput(bag, path.stem, stain or bag.attrs.get("stain"), part, str(path))]
    if suffix in CASE_SUFFIXES:
        from pathvlm.case import load_case

        return _from_case(load_case(path), encoder, transform, tile, mpp)
    if not path.exists():
        raise ModelError(f"{path}: file not found")
    _need_encoder(encoder, str(path))
    if suffix in IMAGE_SUFFIXES:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise ModelError(f"{path}: cannot read image ({exc})") from exc
        return [SlideInput(_embed_image(image, encoder, transform, tile, mpp), path.stem, stain, part,
                           str(path))]
    from pathvlm.slide import open_slide

    with open_slide(path, mpp=mpp) as slide:  # a resolution the file records wins
        return [_from_slide(slide, encoder, transform, stain, part, tile)]


def _from_slide(slide: Any, encoder: Any, transform: Any, stain: str | None = None,
                part: str | None = None, tile: Any = None) -> SlideInput:
    from pathvlm.embed import embed_slide
    from pathvlm.slide import TissueConfig

    _need_encoder(encoder, str(slide.path))
    bag = embed_slide(slide, encoder, transform, _tile(tile), TissueConfig())
    return SlideInput(bag, slide.name, stain, part, str(slide.path))


def _embed_image(image: Any, encoder: Any, transform: Any, tile: Any, mpp: float | None) -> Any:
    from pathvlm.embed import embed_image

    tile = _tile(tile)
    return embed_image(image.convert("RGB"), encoder, transform, size=tile.size, image_mpp=mpp,
                       target_mpp=tile.mpp)


def _from_case(case: Any, encoder: Any, transform: Any, tile: Any = None,
               mpp: float | None = None) -> list[SlideInput]:
    out = []
    for ref in case.slides:
        ref_mpp = getattr(ref, "mpp", None) or mpp  # the manifest's entry wins over the call's
        for item in _from_path(Path(ref.path), encoder, transform, ref.stain, ref.part, tile, ref_mpp):
            item.name = ref.name
            out.append(item)
    return out


def resolve_inputs(input: Any, encoder: Any = None, transform: Any = None,
                   tile: Any = None, mpp: float | None = None) -> list[SlideInput]:
    """Feature bags of every slide in ``input`` (None or [] -> no slide).

    ``tile`` (a TileConfig; None = its defaults) sets how slides and images are cut for the
    encoder. ``mpp``: um/px of plain images (and of slide files that record none); images are
    resampled from it to ``tile.mpp``. A case entry's own ``mpp`` wins. Without one, an image is
    taken to be at the tile scale and its bag says so (`scale_notes`).
    """
    if mpp is not None and not mpp > 0:
        raise ModelError(f"mpp must be a positive number, got {mpp}")
    from pathvlm.features import FeatureBag

    if input is None:
        return []
    if isinstance(input, SlideInput):
        return [input]
    if isinstance(input, FeatureBag):
        name = input.path.stem if input.path else None
        return [SlideInput(input, name, input.attrs.get("stain"), None, str(input.path or "<features>"))]
    if isinstance(input, torch.Tensor):
        if input.dim() != 2:
            raise ModelError(f"a feature tensor must be [N, D], got shape {tuple(input.shape)}")
        coords = torch.zeros(input.shape[0], 2, dtype=torch.int64)
        return [SlideInput(FeatureBag(input, coords), None, source="<tensor>")]
    if isinstance(input, (str, Path)):
        return _from_path(Path(input), encoder, transform, tile=tile, mpp=mpp)
    if isinstance(input, (list, tuple)):
        return [s for item in input for s in resolve_inputs(item, encoder, transform, tile, mpp)]
    from pathvlm.case import Case

    if isinstance(input, Case):
        return _from_case(input, encoder, transform, tile, mpp)
    if hasattr(input, "read_region") and hasattr(input, "path"):  # a pathvlm Slide
        return [_from_slide(input, encoder, transform, tile=tile)]
    from PIL import Image

    if isinstance(input, Image.Image):
        _need_encoder(encoder, "image")
        return [SlideInput(_embed_image(input, encoder, transform, tile, mpp), None, source="<image>")]
    raise ModelError(f"cannot ask about a {type(input).__name__}: give a slide, image, feature file, "
                     "FeatureBag, Case or a list of these")


def scale_notes(slides: list[SlideInput], how: str = "--mpp / mpp=") -> list[str]:
    """One line naming the plain images that came without a pixel size and the scale assumed;
    ``how`` says where to give one."""
    from pathvlm.embed import assumed_scale_note

    assumed = [s for s in slides if s.bag.attrs.get("mpp_assumed")]
    if not assumed:
        return []
    names = [s.name or Path(s.source).name for s in assumed]
    return [assumed_scale_note(names, assumed[0].bag.attrs.get("mpp") or None, how)]
