"""Stain handling in numpy: Macenko and Reinhard normalisation, RandStainNA sampling, HED jitter.

Macenko (Macenko et al., ISBI 2009): each tile's H&E stain vectors and stain amounts are
estimated from its optical densities and the tile is re-rendered with a reference's stain vectors
and amounts. Tiles with too little tissue or a degenerate fit come back unchanged, so normalising
never fails and never produces NaN.
Reinhard (Reinhard et al. 2001) in CIELAB: each tile's per-channel mean and standard deviation are
moved to a template's. The template is fitted on training images as the average of their own
statistics; RandStainNA (Shen et al., MICCAI 2022) trains on templates drawn around it with the
spread seen across those images, and infers with the average one.
`hed_jitter` is the stain augmentation training uses and the perturbation robustness is measured with.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pathvlm.errors import ModelError

log = logging.getLogger(__name__)

METHOD = "macenko"
LAB_METHOD = "reinhard"
MIN_LAB_STD = 1e-3  # a flat channel (a blank tile): its contrast is not stretched
IO = 240.0  # transmitted light intensity: brighter pixels count as glass (Macenko's reference code)
BETA = 0.15  # OD threshold per channel: below it a pixel is background, not stain
ALPHA = 1.0  # robust extreme angles: the alpha-th and (100 - alpha)-th percentiles
MIN_TISSUE_FRACTION = 0.05  # fewer stained pixels than this: leave the tile alone
MIN_TISSUE_PIXELS = 100
MIN_STAIN_ANGLE = 0.05  # radians between the H and E vectors; less cannot separate two stains


def _read_arrays(data: Any, method: str, source: str, shapes: dict[str, tuple[int, ...]]) -> list[np.ndarray]:
    """The finite float arrays ``shapes`` names from a saved ``method`` reference, else ModelError."""
    if not isinstance(data, dict) or data.get("method") != method:
        raise ModelError(f"{source}: expected a {method!r} stain reference, got {data!r}")
    arrays = []
    for key, shape in shapes.items():
        try:
            value = np.asarray(data[key], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}: malformed stain reference ({key}: {exc!r})") from exc
        if value.shape != shape:
            want, got = ("x".join(map(str, dims)) for dims in (shape, value.shape))
            raise ModelError(f"{source}: {key} must be {want}, got {got or 'a scalar'}")
        if not np.isfinite(value).all():
            raise ModelError(f"{source}: stain reference has non-finite values in {key}")
        arrays.append(value)
    return arrays


@dataclass(frozen=True, eq=False)  # arrays: compare via to_dict()
class StainReference:
    """Target appearance: a [3, 2] OD stain matrix (columns H, E) and the stains' max amounts."""

    stain_matrix: np.ndarray  # [3, 2], unit columns, H first
    max_concentrations: np.ndarray  # [2]

    def normalize(self, image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
        return normalize_stain(image, self)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists for a JSON config file."""
        return {
            "method": METHOD,
            "stain_matrix": [[round(float(v), 6) for v in row] for row in self.stain_matrix],
            "max_concentrations": [round(float(v), 6) for v in self.max_concentrations],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "stain_norm") -> StainReference:
        """Inverse of `to_dict`; a malformed entry is a ModelError naming ``source``."""
        matrix, max_c = _read_arrays(data, METHOD, source,
                                     {"stain_matrix": (3, 2), "max_concentrations": (2,)})
        if not (max_c > 0).all():
            raise ModelError(f"{source}: stain reference has non-positive max_concentrations")
        return cls(matrix, max_c)


# the widely used reference of Macenko's and HEnorm's code, for callers without their own data
DEFAULT_REFERENCE = StainReference(
    np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]), np.array([1.9705, 1.0308])
)


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 RGB image, got {arr.dtype} {arr.shape}")
    return arr


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 RGB -> [..., 3] optical density -log((I + 1) / IO)."""
    return -np.log((rgb.astype(np.float32) + 1.0) / IO)


def _tissue(od: np.ndarray) -> np.ndarray:
    """[N] mask of stained pixels: every channel's OD at least BETA."""
    return (od >= BETA).all(axis=1)


def _stain_matrix(od: np.ndarray) -> np.ndarray | None:
    """[N, 3] tissue ODs -> [3, 2] unit stain vectors (H, E), or None when they cannot be told apart."""
    od = od.astype(np.float64)
    eigvals, eigvecs = np.linalg.eigh(np.cov(od.T))  # ascending
    if not np.isfinite(eigvals).all() or eigvals[-1] < 1e-6:  # no spread: one flat colour
        return None
    plane = eigvecs[:, [2, 1]]  # [3, 2] the two largest directions
    # ODs are positive, so the first axis is made to point into them: then every angle lies in
    # (-pi/2, pi/2) and the percentiles never straddle the +-pi wrap
    if plane[:, 0].sum() < 0:
        plane[:, 0] *= -1
    proj = od @ plane  # [N, 2]
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [ALPHA, 100.0 - ALPHA])
    if hi - lo < MIN_STAIN_ANGLE:
        return None
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    # haematoxylin absorbs more red than eosin does
    matrix = np.stack([v_lo, v_hi] if v_lo[0] > v_hi[0] else [v_hi, v_lo], axis=1)  # [3, 2]
    if (matrix < -0.05).any():  # a stain with clearly negative absorbance is no stain
        return None
    return matrix


def _fit(od_tissue: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Tissue ODs -> (stain matrix [3, 2], its pseudo-inverse [2, 3], 99th-pct amounts [2])."""
    matrix = _stain_matrix(od_tissue)
    if matrix is None:
        return None
    pinv = np.linalg.pinv(matrix)  # least-squares concentrations: C = OD @ pinv.T
    max_c = np.percentile(od_tissue @ pinv.T, 99, axis=0)
    if not (np.isfinite(pinv).all() and (max_c > 1e-3).all()):
        return None
    return matrix, pinv, max_c


def fit_reference(
    images: Iterable[Image.Image | np.ndarray], max_images: int = 64, max_pixels: int = 500_000,
    seed: int = 0,
) -> StainReference:
    """A StainReference from the pooled tissue pixels of (the first ``max_images``) images.

    Pixels are subsampled with a seeded generator down to ``max_pixels``, so the same images give
    the same reference. Raises ModelError when the images hold too little stained tissue.
    """
    pooled, n_images = [], 0
    for image in images:
        if n_images >= max_images:
            break
        od = optical_density(_as_rgb_array(image).reshape(-1, 3))
        pooled.append(od[_tissue(od)])
        n_images += 1
    od = np.concatenate(pooled) if pooled else np.zeros((0, 3), np.float32)
    if len(od) > max_pixels:
        od = od[np.sort(np.random.default_rng(seed).choice(len(od), max_pixels, replace=False))]
    fit = _fit(od) if len(od) >= MIN_TISSUE_PIXELS else None
    if fit is None:
        raise ModelError(
            f"cannot fit a Macenko stain reference: {len(od)} stained pixels in {n_images} images "
            "are too few or hold only one stain"
        )
    matrix, _, max_c = fit
    log.info("fitted a Macenko stain reference on %d images (%d stained pixels)", n_images, len(od))
    return StainReference(matrix, max_c)


def normalize_stain(
    image: Image.Image | np.ndarray, reference: StainReference = DEFAULT_REFERENCE
) -> Image.Image | np.ndarray:
    """Re-render an H&E image in the reference's stains; PIL in -> PIL out, array in -> array out.

    A tile with under MIN_TISSUE_FRACTION stained pixels, or whose two stains cannot be separated,
    is returned unchanged (the very object passed in).
    """
    rgb = _as_rgb_array(image)
    h, w, _ = rgb.shape
    od = optical_density(rgb.reshape(-1, 3))  # [N, 3]
    tissue = _tissue(od)
    n_tissue = int(tissue.sum())
    if n_tissue < max(MIN_TISSUE_PIXELS, MIN_TISSUE_FRACTION * len(od)):
        return image
    fit = _fit(od[tissue])
    if fit is None:
        return image
    _, pinv, max_c = fit
    conc = od @ pinv.T.astype(np.float32)  # [N, 2]
    conc *= (reference.max_concentrations / max_c).astype(np.float32)
    out = IO * np.exp(-conc @ reference.stain_matrix.T.astype(np.float32))  # [N, 3]
    if not np.isfinite(out).all():
        return image
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(h, w, 3)
    return Image.fromarray(out) if isinstance(image, Image.Image) else out


@dataclass(frozen=True, eq=False)  # arrays: compare via to_dict()
class LabReference:
    """A Reinhard template in CIELAB and how much it varies over the images it was fitted on.

    ``mean[0]`` / ``mean[1]``: the average over images of each image's per-channel (L, a, b) mean
    and standard deviation; ``spread``: their standard deviations across images.
    """

    mean: np.ndarray  # [2, 3]: (channel means, channel stds)
    spread: np.ndarray  # [2, 3]

    def normalize(self, image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
        """Reinhard transfer to the average template; PIL in -> PIL out, uint8 array in -> out."""
        rgb = _as_rgb_array(image)
        out = np.round(reinhard(rgb.astype(np.float32) / 255.0, self.mean) * 255).astype(np.uint8)
        return Image.fromarray(out) if isinstance(image, Image.Image) else out

    def sample(self, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
        """A random [2, 3] template: Gaussian around ``mean`` with ``scale`` x ``spread`` (stds >= 0)."""
        target = rng.normal(self.mean, scale * self.spread)
        target[1] = np.maximum(target[1], MIN_LAB_STD)
        return target

    def to_dict(self) -> dict[str, Any]:
        return {"method": LAB_METHOD,
                "mean": [[round(float(v), 6) for v in row] for row in self.mean],
                "spread": [[round(float(v), 6) for v in row] for row in self.spread]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "stain_norm") -> LabReference:
        mean, spread = _read_arrays(data, LAB_METHOD, source, {"mean": (2, 3), "spread": (2, 3)})
        if not ((spread >= 0).all() and (mean[1] > 0).all()):
            raise ModelError(f"{source}: stain reference has negative spreads or non-positive stds")
        return cls(mean, spread)


def lab_statistics(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] float RGB in [0, 1] -> [2, 3]: per-channel CIELAB mean and standard deviation."""
    from skimage.color import rgb2lab

    lab = rgb2lab(rgb).reshape(-1, 3)
    return np.stack([lab.mean(0), lab.std(0)])


def reinhard(rgb: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Move each CIELAB channel of ``rgb`` ([H, W, 3] float in [0, 1]) to ``target`` [2, 3]
    (means, stds); float RGB in [0, 1] out. A flat channel is shifted, not stretched."""
    from skimage.color import lab2rgb, rgb2lab

    lab = rgb2lab(rgb)
    mean, std = lab.reshape(-1, 3).mean(0), lab.reshape(-1, 3).std(0)
    gain = np.where(std > MIN_LAB_STD, target[1] / np.maximum(std, MIN_LAB_STD), 1.0)
    lab = (lab - mean) * gain + target[0]
    lab[..., 0] = np.clip(lab[..., 0], 0.0, 100.0)
    with warnings.catch_warnings():  # out-of-gamut colours are clipped, which is what we want
        warnings.filterwarnings("ignore", message=".*negative Z values", category=UserWarning)
        return np.clip(lab2rgb(lab), 0.0, 1.0)


def fit_lab_reference(images: Iterable[Image.Image | np.ndarray], max_images: int = 64) -> LabReference:
    """The Reinhard template (and its spread) of (the first ``max_images``) images."""
    stats = [lab_statistics(_as_rgb_array(im).astype(np.float32) / 255.0)
             for _, im in zip(range(max_images), images)]
    if len(stats) < 2:
        raise ModelError(f"a Reinhard stain reference needs at least 2 images, got {len(stats)}")
    stats = np.stack(stats)  # [N, 2, 3]
    log.info("fitted a Reinhard (LAB) stain reference on %d images", len(stats))
    return LabReference(stats.mean(0), stats.std(0))


STAIN_METHODS = {METHOD: StainReference, LAB_METHOD: LabReference}


def stain_reference_from_dict(data: Any, source: str = "stain_norm") -> StainReference | LabReference:
    """The saved stain reference of either method; an unknown or malformed one is a ModelError."""
    method = data.get("method") if isinstance(data, dict) else None
    if method not in STAIN_METHODS:
        raise ModelError(f"{source}: unknown stain reference method {method!r} "
                         f"(known: {', '.join(STAIN_METHODS)})")
    return STAIN_METHODS[method].from_dict(data, source)


class StainNormalizer:
    """Picklable callable form of a reference's ``normalize`` for transform pipelines and datasets."""

    def __init__(self, reference: StainReference | LabReference):
        self.reference = reference

    def __call__(self, image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
        return self.reference.normalize(image)

    def __repr__(self) -> str:
        return f"StainNormalizer(method={self.reference.to_dict()['method']!r})"


def reference_images(paths: Sequence[str], max_images: int = 64, seed: int = 0) -> list[str]:
    """A deterministic, seeded subset of ``max_images`` of the distinct paths (sorted)."""
    unique = sorted(set(paths))
    if len(unique) <= max_images:
        return unique
    picks = np.random.default_rng(seed).choice(len(unique), max_images, replace=False)
    return [unique[i] for i in sorted(picks)]


def hed_jitter(rgb: np.ndarray, rng: np.random.Generator, scale: float, bias: float) -> np.ndarray:
    """HED stain jitter (Tellez et al. 2018): each of the haematoxylin, eosin and DAB optical
    densities (skimage's `rgb2hed` units) is multiplied by U(1 - scale, 1 + scale) and shifted by
    U(-bias, bias). [H, W, 3] float RGB in [0, 1] -> the same."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    alpha = rng.uniform(1 - scale, 1 + scale, size=3)
    beta = rng.uniform(-bias, bias, size=3)
    return np.clip(hed2rgb(hed * alpha + beta), 0.0, 1.0)
