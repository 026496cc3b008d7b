"""Event handlers of the app: plain functions over (inputs, Session) -> outputs, no layout."""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from pathvlm.errors import ConfigError, PathVLMError
from pathvlm.ui import report as rep
from pathvlm.ui import viz
from pathvlm.ui.state import (
    CaseSlide,
    ModelGate,
    Session,
    SlideCache,
    info_markdown,
    prepare_slide,
    top_rows,
)

log = logging.getLogger(__name__)

HEAT_SOURCES = ("none", "attention (last answer)", "zero-shot class")


def problem(exc: Exception) -> str:
    """One readable line for the status box."""
    if isinstance(exc, ValidationError):
        return "; ".join(e["msg"] for e in exc.errors())
    return str(exc)


class Handlers:
    """Shared, read-mostly parts of the app (model, slide cache, zero-shot prompt encodings)."""

    def __init__(self, model: Any, max_new_tokens: int = 128, cache_size: int = 16,
                 generation: dict[str, Any] | None = None):
        self.model = model
        self.gate = ModelGate(model)
        self.cache = SlideCache(cache_size)
        self.classifiers: dict[str, Any] = {}
        self.gen = {"max_new_tokens": max_new_tokens, **(generation or {})}

    # -- slides -----------------------------------------------------------------------------
    def open(self, upload: str | None, path: str | None, stain: str | None, session: Session,
             progress: Any = None) -> tuple[Session, str, Any, Any, str]:
        """Open an uploaded file or a server path, add it to the case and show it."""
        original = session if session is not None else Session()
        session = copy.deepcopy(original)
        src = upload or (path or "").strip()
        if not src:
            return session, "", None, self.slide_names(session), "Choose a file or enter a path."
        try:
            if progress is not None:
                progress(0.0, desc="opening and embedding")
            # no lock: embedding touches only the encoder, so chat in other sessions goes on
            prepared, key, cached = prepare_slide(self.model, src, self.cache)
            slide = CaseSlide(key, prepared.name, prepared.path, (stain or "H&E").strip() or "H&E")
            names = [s.name for s in session.slides]
            if prepared.name in names:
                session.slides[names.index(prepared.name)] = slide
            else:
                session.slides.append(slide)
            _normalise_stains(session)
        except (PathVLMError, ValidationError, OSError) as exc:
            return (original, "", None, self.slide_names(original),
                    f"Could not open {Path(src).name}: {problem(exc)}")
        session.active = [s.name for s in session.slides].index(prepared.name)
        session.zeroshot, session.region = None, None
        status = f"Opened {prepared.name}" + (" (from cache)" if cached else "")
        return session, info_markdown(prepared), prepared.outlined, self.slide_names(session), status

    def slide_names(self, session: Session) -> Any:
        import gradio as gr

        names = [f"{s.name} [{s.stain}]" for s in session.slides]
        value = names[session.active] if session.active is not None and names else None
        return gr.update(choices=names, value=value)

    def switch(self, choice: str | None, session: Session) -> tuple[Session, str, Any]:
        names = [f"{s.name} [{s.stain}]" for s in session.slides]
        if choice not in names:
            return session, "", None
        session = copy.deepcopy(session)
        session.active, session.zeroshot, session.region = names.index(choice), None, None
        prepared = self.active(session)
        return session, info_markdown(prepared), prepared.outlined

    def active(self, session: Session) -> Any:
        if session is None or session.active is None:
            raise ConfigError("open a slide or image first")
        s = session.slides[session.active]
        prepared = self.cache.get(s.key)
        if prepared is None:
            raise ConfigError(f"{s.path}: the slide dropped out of the cache; open it again")
        return prepared

    # -- viewer -----------------------------------------------------------------------------
    def view(self, source: str, cls: str | None, opacity: float, session: Session) -> tuple[Any, str]:
        """The active thumbnail with the chosen heatmap over it."""
        try:
            prepared = self.active(session)
        except PathVLMError as exc:
            return None, problem(exc)
        scores = coords = None
        if source == HEAT_SOURCES[1]:
            att = next((a for a in session.attention if a["name"] == prepared.name), None)
            if att is None:
                return prepared.outlined, "Ask a question about this slide first."
            scores, coords = att["attention"].float().mean(0).numpy(), np.asarray(att["coords"])
        elif source == HEAT_SOURCES[2]:
            zs = session.zeroshot
            if zs is None or cls not in zs.classes:
                return prepared.outlined, "Run zero-shot on this slide and pick a class first."
            scores, coords = zs.tile_probs[:, zs.classes.index(cls)], zs.coords
        if scores is None:
            return prepared.outlined, ""
        grid = viz.score_grid(coords, scores, tuple(prepared.info["dimensions"]), prepared.thumb.size,
                              prepared.extent)
        return viz.overlay(prepared.outlined, grid, opacity, normalise=source == HEAT_SOURCES[1]), ""

    def region(self, xy: tuple[float, float], session: Session) -> tuple[Session, Any, str]:
        """Full-resolution crop around a click on the thumbnail."""
        try:
            prepared = self.active(session)
            with rep_open(prepared.path) as slide:
                image, origin = viz.region_at(slide, xy, prepared.thumb.size)
        except (PathVLMError, OSError) as exc:
            return session, None, problem(exc)
        session = copy.deepcopy(session)
        session.region = (session.active, *origin)
        return session, image, f"Region of {prepared.name} at level-0 ({origin[0]}, {origin[1]})"

    # -- chat -------------------------------------------------------------------------------
    def chat_input(self, session: Session, scope: str, use_region: bool) -> Any:
        if not session.slides:
            return None
        if use_region and session.region is not None:
            idx, x, y = session.region
            prepared = self.cache.get(session.slides[idx].key)
            if prepared is not None:
                with rep_open(prepared.path) as slide:
                    return slide.read_region((x, y), 0, (min(viz.REGION_SIZE, slide.dimensions[0]),
                                                         min(viz.REGION_SIZE, slide.dimensions[1])))
        chosen = session.slides if scope == "whole case" else [session.slides[session.active]]
        inputs = []
        for s in chosen:
            prepared = self.cache.get(s.key)
            if prepared is None:
                raise ConfigError(f"{s.path}: the slide dropped out of the cache; open it again")
            item = copy.copy(prepared.inputs[0])
            item.stain = s.stain
            inputs.append(item)
        return inputs

    def ask(self, question: str, scope: str, use_region: bool, session: Session
            ) -> Iterator[tuple[list[dict[str, str]], list, Session, str, str]]:
        """Stream the answer into the chat; afterwards show the tiles it drew on."""
        session = copy.deepcopy(session) if session is not None else Session()
        question = (question or "").strip()
        if not question:
            yield session.history, [], session, "", "Type a question."
            return
        history = list(session.history)
        try:
            inputs = self.chat_input(session, scope, use_region)
            # case-fact questions are answered from the case tab: slides, stains, entered results
            case = rep.build_case(session) if session.slides else None
            pieces, attention = self.gate.stream(inputs, question, history, case=case, **self.gen)
        except (PathVLMError, ValidationError, OSError) as exc:
            yield history, [], session, question, f"Could not answer: {problem(exc)}"
            return
        answer = ""
        shown = history + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        for piece in pieces:
            answer += piece
            shown[-1]["content"] = answer
            yield shown, [], session, "", "answering..."
        session.history = shown
        if attention and not use_region:
            session.attention = attention
        gallery = self.tiles_gallery(session, attention) if not use_region else []
        yield shown, gallery, session, "", "done"

    def tiles_gallery(self, session: Session, attention: list[dict[str, Any]]) -> list:
        rows = top_rows(attention, 6)
        by_name = {s.name: s for s in session.slides}
        out = []
        for name in dict.fromkeys(r["slide"] for r in rows):
            s = by_name.get(name)
            prepared = self.cache.get(s.key) if s else None
            if prepared is None:
                continue
            with rep_open(prepared.path) as slide:
                out += viz.tile_crops(slide, [r for r in rows if r["slide"] == name], prepared.extent)
        return out

    def clear(self, session: Session) -> tuple[list, list, Session]:
        session = copy.deepcopy(session) if session is not None else Session()
        session.history, session.attention = [], []
        return [], [], session

    # -- zero-shot --------------------------------------------------------------------------
    def zeroshot(self, classes: str, preset: str, session: Session) -> tuple[Any, Any, Session, str]:
        import gradio as gr

        from pathvlm.zeroshot import ZeroShotClassifier

        try:
            prepared = self.active(session)
            if preset and preset != "custom":
                clf = self.gate.run(lambda: rep.classifier(self.model, preset, self.classifiers))
            else:
                names = [c.strip() for c in (classes or "").split(",") if c.strip()]
                if len(names) < 2:
                    raise ConfigError("give at least two class names, separated by commas")
                clf = self.gate.run(lambda: ZeroShotClassifier(self.model, names, progress=False))
            result = clf.predict_features(prepared.bag)
        except (PathVLMError, ValidationError) as exc:
            return None, gr.update(), session, f"Zero-shot failed: {problem(exc)}"
        session = copy.deepcopy(session)
        session.zeroshot = result
        probs = {c: float(p) for c, p in zip(result.classes, result.probs)}
        return probs, gr.update(choices=result.classes, value=result.label), session, \
            f"{prepared.name}: {result.label}"

    # -- case and report --------------------------------------------------------------------
    def add_ancillary(self, test: str, target: str, result: str, session: Session
                      ) -> tuple[Session, str, str]:
        from pathvlm.case import AncillaryResult

        try:
            entry = AncillaryResult(test=test, target=target, result=result).model_dump(mode="json")
        except ValidationError as exc:
            return session, ancillary_markdown(session), f"Ancillary result not added: {problem(exc)}"
        session = copy.deepcopy(session)
        session.ancillary.append({k: v for k, v in entry.items() if v is not None})
        return session, ancillary_markdown(session), f"Added {entry['test']} {entry['target']}"

    def report(self, kind: str, procedure: str | None, site: str | None, size_cm: float | None,
               nodes_examined: float | None, nodes_positive: float | None, session: Session
               ) -> tuple[str, Any, Any, Any, Session, str]:
        session = copy.deepcopy(session) if session is not None else Session()
        try:
            clinical = rep.clinical_from_form(kind, procedure, site, size_cm, nodes_examined, nodes_positive)
            report = self.gate.run(lambda: rep.draft_for_session(self.model, session, self.cache, kind,
                                                                 clinical, self.classifiers))
        except (PathVLMError, ValidationError) as exc:
            return "", None, None, None, session, f"Could not draft the report: {problem(exc)}"
        from pathvlm.reports import render_report

        paths = rep.write_downloads(report, Path(tempfile.mkdtemp(prefix="pathvlm-report-")))
        session.report = report
        return (render_report(report, "md"), str(paths["json"]), str(paths["md"]), str(paths["fhir"]),
                session, f"Drafted {kind} over {len(session.slides)} slide(s)")


def _normalise_stains(session: Session) -> None:
    """Stain labels in the case's canonical form; a bad label raises before the slide is kept."""
    from pathvlm.case import SlideRef

    for s in session.slides:
        s.stain = SlideRef(path=Path(s.path), stain=s.stain).stain


def rep_open(path: str) -> Any:
    from pathvlm.slide import open_slide

    return open_slide(Path(path))


def ancillary_markdown(session: Session) -> str:
    if not session.ancillary:
        return "_no ancillary results_"
    rows = "\n".join(f"| {r['test']} | {r['target']} | {r['result']} |" for r in session.ancillary)
    return "| test | target | result |\n|---|---|---|\n" + rows
