"""Turn what a user asks about (slide, image, feature file, bag, case, list) into feature bags.

A single slide or image is a case of one. Pixels are encoded only when no cached features are
given, and that needs the model's encoder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pathvlm.errors import ModelError, SlideError, reason_without_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
CASE_SUFFIXES = {".yaml", ".yml", ".json"}


class SlideInputs(list):
    """The SlideInputs of a request, plus ``left_out``: one line for each slide of a case that
    could not be read (named, with why), so the case goes on without it and says so."""

    def __init__(self, items: Any = (), left_out: list[str] | None = None):
        super().__init__(items)
        self.left_out = list(left_out or [])


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
            raise SlideError(path, f"cannot read image ({reason_without_path(exc, path)})") from exc
        return [SlideInput(_embed_image(image, encoder, transform, tile, mpp, path), path.stem, stain, part,
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


def _embed_image(image: Any, encoder: Any, transform: Any, tile: Any, mpp: float | None,
                 name: Any = "image") -> Any:
    from pathvlm.embed import embed_image
    from pathvlm.slide.tiling import upsample_refusal

    tile = _tile(tile)
    refusal = mpp and upsample_refusal(mpp, tile.mpp, tile.max_upsample)
    if refusal:
        raise SlideError(name, refusal)
    return embed_image(image.convert("RGB"), encoder, transform, size=tile.size, image_mpp=mpp,
                       target_mpp=tile.mpp)


def left_out_note(ref: Any, case: Any, exc: SlideError) -> str:
    """The line that says a case's slide was left out, and why (no server path: the app shows it)."""
    return f"slide {ref.name or Path(ref.path).name} left out of case {case.id}: {exc.reason}"


def _from_case(case: Any, encoder: Any, transform: Any, tile: Any = None,
               mpp: float | None = None) -> SlideInputs:
    """Every readable slide of ``case``; one that cannot be read (corrupt, too coarse to tile) is
    left out with a logged reason in ``left_out``. When none can be read the case cannot be
    answered: ModelError naming every file."""
    out = SlideInputs()
    for ref in case.slides:
        ref_mpp = getattr(ref, "mpp", None) or mpp  # the manifest's entry wins over the call's
        try:
            items = _from_path(Path(ref.path), encoder, transform, ref.stain, ref.part, tile, ref_mpp)
        except SlideError as exc:
            note = left_out_note(ref, case, exc)
            log.warning("%s", note)
            out.left_out.append(note)
            continue
        for item in items:
            item.name = ref.name
            out.append(item)
    if case.slides and not out:
        raise ModelError(f"case {case.id}: no slide could be read (" + "; ".join(out.left_out) + ")")
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
        out = SlideInputs(left_out=getattr(input, "left_out", []))
        for item in input:
            part = resolve_inputs(item, encoder, transform, tile, mpp)
            out.extend(part)
            out.left_out.extend(getattr(part, "left_out", []))
        return out
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
    """One line naming the plain images that came without a pixel size and the scale assumed
    (``how`` says where to give one), then one per case slide left out (`SlideInputs`)."""
    from pathvlm.embed import assumed_scale_note

    left_out = list(getattr(slides, "left_out", []))
    assumed = [s for s in slides if s.bag.attrs.get("mpp_assumed")]
    if not assumed:
        return left_out
    names = [s.name or Path(s.source).name for s in assumed]
    return [assumed_scale_note(names, assumed[0].bag.attrs.get("mpp") or None, how), *left_out]
