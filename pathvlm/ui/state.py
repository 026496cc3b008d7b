"""What the app keeps: prepared slides (shared cache) and each browser session's own state.

The model object is shared by all sessions, so anything it leaves behind (``last_attention``) is
copied into the session while a lock is held; nothing per-user lives on the model or module.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pathvlm.errors import PathVLMError, SlideError
from pathvlm.slide.base import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)


@dataclass
class PreparedSlide:
    """A slide opened and embedded once: info, pictures and its feature bag."""

    path: str
    name: str
    info: dict[str, Any]
    thumb: Image.Image  # plain thumbnail
    outlined: Image.Image  # thumbnail with the tissue border
    inputs: list[Any]  # [SlideInput]
    extent: float  # level-0 side of one tile

    @property
    def bag(self) -> Any:
        return self.inputs[0].bag

    @property
    def feature_bytes(self) -> int:
        return sum(int(x.bag.features.nbytes) + int(np.asarray(x.bag.coords).nbytes) for x in self.inputs)

    @property
    def nbytes(self) -> int:
        """Memory this entry holds: features, coordinates and the two RGB thumbnails."""
        pictures = sum(3 * im.size[0] * im.size[1] for im in {id(self.thumb): self.thumb,
                                                              id(self.outlined): self.outlined}.values())
        return self.feature_bytes + pictures


class CacheFull(PathVLMError):
    """One prepared slide is larger than the whole cache may hold."""


class SlideCache:
    """Prepared slides keyed by file fingerprint + encoder, least recently used dropped first once
    there are more than ``max_items`` or they hold more than ``max_bytes``."""

    def __init__(self, max_items: int = 64, max_bytes: int = 2 << 30):
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, PreparedSlide] = OrderedDict()
        self._bytes: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> PreparedSlide | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, item: PreparedSlide) -> None:
        size = item.nbytes
        if size > self.max_bytes:
            raise CacheFull(f"{item.name}: its features and pictures need {size / 2**20:.0f} MB, more "
                            f"than this server keeps for all slides ({self.max_bytes / 2**20:.0f} MB)")
        with self._lock:
            self._items[key], self._bytes[key] = item, size
            self._items.move_to_end(key)
            while len(self._items) > self.max_items or self.total_bytes > self.max_bytes:
                old, _ = self._items.popitem(last=False)
                del self._bytes[old]
                log.info("slide cache: dropped %s (least recently used)", old.split("|")[0])

    @property
    def total_bytes(self) -> int:
        return sum(self._bytes.values())

    def nbytes(self, key: str) -> int:
        return self._bytes.get(key, 0)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class CaseSlide:
    key: str  # cache key
    name: str
    path: str
    stain: str = "H&E"
    fingerprint: str = ""  # audit: hash of size + header bytes, never the path


@dataclass
class Session:
    """One browser session: its slides, chat, evidence and last report (kept in gr.State)."""

    slides: list[CaseSlide] = field(default_factory=list)
    active: int | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    attention: list[dict[str, Any]] = field(default_factory=list)  # last answer's, per slide
    zeroshot: Any = None  # SlideZeroShot of the active slide
    ancillary: list[dict[str, Any]] = field(default_factory=list)
    region: tuple[int, int, int] | None = None  # slide index, level-0 x, y of the zoomed region
    report: Any = None
    owner: str | None = None  # the login that made this state; no other login may use it
    left_out: list[str] = field(default_factory=list)  # slides of the opened case that could not be read


@dataclass
class SessionStore:
    """What one browser session's ``gr.State`` holds: a ``Session`` per login, so a request that
    arrives with another login's session id reads and overwrites only its own entry."""

    by_user: dict[str | None, Session] = field(default_factory=dict)

    def get(self, user: str | None) -> Session:
        return self.by_user.get(user) or Session(owner=user)

    def put(self, user: str | None, session: Session) -> SessionStore:
        return SessionStore({**self.by_user, user: session})


def encoder_key(model: Any) -> str:
    enc = getattr(model, "encoder", None)
    if enc is None:
        return "no-encoder"
    from pathvlm.embed import encoder_views

    # a plain image's features depend on the encoder's test views
    return f"{getattr(enc, 'name', type(enc).__name__)}:{getattr(enc, 'weights_hash', '')}:{encoder_views(enc)}"


def file_fingerprint(path: Path, chunk: int = 4 << 20) -> str:
    """Name, size and a hash of the first and last 4 MiB: the same file uploaded again (new temp
    path, new mtime) is recognised, without reading a multi-gigabyte slide whole."""
    h = hashlib.sha1()
    size = path.stat().st_size
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return f"{path.name}|{size}|{h.hexdigest()}"


def open_for_app(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                 mpp: float | None = None) -> Any:
    from pathvlm.slide import open_slide

    return open_slide(Path(path), mpp=mpp, max_pixels=max_pixels)


def check_pixel_budget(slide: Any, tile_mpp: float, max_pixels: int) -> None:
    """Refuse a slide whose tile grid at ``tile_mpp`` (level 0 when the file records no mpp) has
    more than ``max_pixels`` pixels, before a thumbnail or tile is read."""
    w, h = slide.dimensions
    scale = (slide.mpp[0] / tile_mpp) * (slide.mpp[1] / tile_mpp) if slide.mpp else 1.0
    pixels = w * h * min(scale, 1.0)
    if pixels > max_pixels:
        where = f"at {tile_mpp:g} um/px" if slide.mpp else "(no mpp recorded: level 0)"
        raise SlideError(slide.path, f"{w} x {h} px is {pixels / 1e6:,.0f} Mpx {where}, above this "
                                     f"server's budget of {max_pixels / 1e6:,.0f} Mpx")


def prepare_slide(model: Any, path: str | Path, cache: SlideCache, thumb_size: int = 768,
                  max_pixels: int | None = None, mpp: float | None = None
                  ) -> tuple[PreparedSlide, str, bool]:
    """Open, outline and embed a slide or image once; returns (prepared, cache key, was cached).

    ``max_pixels``: the pixel budget (plain images decoded, slides at the embedding resolution).
    ``mpp``: the pixel size of an image (or slide file) that records none; images are resampled
    from it to the model's tile scale.
    """
    from pathvlm.model.inputs import resolve_inputs
    from pathvlm.slide import TileConfig, TissueConfig, detect_tissue
    from pathvlm.ui.viz import outline_tissue, tile_extent

    path = Path(path)
    if not path.exists():
        raise SlideError(path, "file not found")
    budget = max_pixels or DEFAULT_MAX_PIXELS
    with open_for_app(path, budget, mpp) as slide:
        key = f"{file_fingerprint(path)}|{encoder_key(model)}|{mpp}"
        hit = cache.get(key)
        if hit is not None:
            return hit, key, True
        check_pixel_budget(slide, model.cfg.tile_mpp, budget)
        info = slide.info()
        thumb = slide.thumbnail(thumb_size)
        try:
            mask = detect_tissue(slide, TissueConfig()).mask
            outlined = outline_tissue(thumb, mask)
        except PathVLMError as exc:  # a tissue-free image still opens; say why there is no outline
            log.warning("%s: no tissue outline (%s)", path, exc)
            outlined = thumb
        tile = TileConfig(mpp=model.cfg.tile_mpp, size=model.cfg.tile_size)
        inputs = resolve_inputs(path, model.encoder, model.transform, tile, mpp)
    if not inputs or inputs[0].bag.features.shape[0] == 0:
        raise SlideError(path, "no tissue tiles to embed")
    coords, attrs = np.asarray(inputs[0].bag.coords), inputs[0].bag.attrs
    # an image's tile covers tile_size * tile_mpp / image_mpp of its own pixels
    side = model.cfg.tile_size * attrs["mpp"] / attrs["image_mpp"] if attrs.get("image_mpp") else \
        model.cfg.tile_size
    prepared = PreparedSlide(str(path), path.stem, info, thumb, outlined, inputs,
                             tile_extent(coords, side))
    cache.put(key, prepared)
    return prepared, key, False


def info_markdown(p: PreparedSlide) -> str:
    i = p.info
    mpp = i.get("mpp")
    mpp_s = f"{mpp[0]:.3f} x {mpp[1]:.3f} um/px" if mpp else "not recorded"
    mag = i.get("objective_power")
    dims = i.get("dimensions") or ["?", "?"]
    return (f"**{p.name}** · vendor: {i.get('vendor') or 'none'} · mpp: {mpp_s} · magnification: "
            f"{f'{mag}x' if mag else 'not recorded'} · size: {dims[0]} x {dims[1]} px · "
            f"levels: {i.get('level_count', 1)} · tiles embedded: {p.bag.features.shape[0]}")


def top_rows(attention: list[dict[str, Any]], n: int = 6) -> list[dict[str, Any]]:
    """The ``n`` most attended tiles over the slides of one answer (mean over slide tokens)."""
    rows = []
    for a in attention:
        w = a["attention"].float().mean(0).numpy() if a["attention"].numel() else np.zeros(0)
        for i in np.argsort(-w)[:n]:
            rows.append({"slide": a["name"], "weight": float(w[i]),
                         "xy": tuple(int(v) for v in a["coords"][i])})
    return sorted(rows, key=lambda r: -r["weight"])[:n]


class ModelGate:
    """Serialises the part of a model call that writes shared model state (``last_attention``)."""

    def __init__(self, model: Any):
        self.model = model
        self.lock = threading.Lock()

    def stream(self, inputs: Any, question: str, history: list[dict[str, str]], **gen: Any
               ) -> tuple[Iterator[str], list[dict[str, Any]]]:
        """Start a streamed answer; returns (remaining pieces, this call's attention)."""
        with self.lock:
            pieces = self.model.stream(inputs, question, history, **gen)
            first = next(pieces, None)  # runs prepare(): last_attention is now this call's
            attention = [dict(a) for a in getattr(self.model, "last_attention", [])]

        def rest() -> Iterator[str]:
            if first is not None:
                yield first
                yield from pieces

        return rest(), attention

    def run(self, fn: Callable[[], Any]) -> Any:
        with self.lock:
            return fn()
