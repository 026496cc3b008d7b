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

from pathvlm.case import CaseError
from pathvlm.errors import ConfigError, PathVLMError, SlideError
from pathvlm.model.inputs import left_out_note, scale_notes
from pathvlm.ui import report as rep
from pathvlm.ui import viz
from pathvlm.ui.audit import AuditLog, slide_fingerprint
from pathvlm.ui.deploy import MANIFEST_SUFFIXES, DeployConfig, SlideAccess
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
MAX_MANIFEST_BYTES = 256 << 10


def problem(exc: Exception) -> str:
    """One readable line for the status box; server paths are left out (the caller names the file)."""
    if isinstance(exc, ValidationError):
        return "; ".join(e["msg"] for e in exc.errors())
    if isinstance(exc, SlideError):
        return exc.reason
    if isinstance(exc, CaseError):
        return f"{exc.entry}: {exc.problem}"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return " ".join(str(exc).split())


def _echo(text: str, limit: int = 80) -> str:
    """A user's path text, shortened and printable, to name it back in a message."""
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Handlers:
    """Shared, read-mostly parts of the app (model, slide cache, zero-shot prompt encodings).

    Every handler that takes a ``Session`` also takes ``user`` (the login, None without auth): a
    state made under one login is never read under another (see ``own``).
    """

    def __init__(self, model: Any, max_new_tokens: int = 128, cache_size: int = 64,
                 generation: dict[str, Any] | None = None, deploy: DeployConfig | None = None,
                 audit: AuditLog | None = None):
        self.model = model
        self.gate = ModelGate(model)
        self.deploy = deploy or DeployConfig()
        self.access = SlideAccess(self.deploy.slide_roots, self.deploy.examples)
        self.cache = SlideCache(cache_size, int(self.deploy.max_cache_mb * 2**20))
        self.audit = audit
        self.classifiers: dict[str, Any] = {}
        self.gen = {"max_new_tokens": max_new_tokens, **(generation or {})}

    def own(self, session: Session | None, user: str | None) -> Session:
        """``session`` when it belongs to ``user`` (or to nobody yet), else a fresh one."""
        if session is None:
            return Session(owner=user)
        if session.owner is None:
            session.owner = user
        elif session.owner != user:
            log.warning("a request of %r carried the state of another login; given a fresh one", user)
            return Session(owner=user)
        return session

    def _audit(self, event: str, user: str | None, slides: list[str], ok: bool, **extra: Any) -> None:
        if self.audit is not None:
            self.audit.record(event, user, slides, ok, **extra)

    # -- slides -----------------------------------------------------------------------------
    def open(self, upload: str | None, path: str | None, stain: str | None, session: Session,
             progress: Any = None, user: str | None = None, mpp: float | None = None
             ) -> tuple[Session, str, Any, Any, str]:
        """Open an uploaded file, an example or a server path under a slide root (a slide, an
        image or a case manifest), add it to the case and show it; ``mpp`` is the pixel size of
        an image that records none (the status says what was assumed)."""
        original = self.own(session, user)
        session = copy.deepcopy(original)
        text = (path or "").strip()
        if not upload and not text:
            return session, "", None, self.slide_names(session), "Choose a file or enter a path."
        shown, tried = (Path(upload).name if upload else _echo(text)), []
        try:
            src = Path(upload) if upload else self.access.resolve(text)
            shown = src.name
            if progress is not None:
                progress(0.0, desc="opening and embedding")
            if src.suffix.lower() in MANIFEST_SUFFIXES:
                prepared, cached = self._open_manifest(src, session, bool(upload), tried)
                status = f"Opened case {src.stem} ({len(session.slides)} slides)"
                status += "".join(f". Note: {n}" for n in session.left_out)
            else:
                prepared, cached = self._add_slide(session, src, stain, tried, mpp=mpp or None)
                status = f"Opened {prepared.name}"
        except (PathVLMError, ValidationError, OSError) as exc:
            self._audit("open", user, tried, False)
            return (original, "", None, self.slide_names(original),
                    f"Could not open {shown}: {problem(exc)}")
        self._audit("open", user, tried, True)
        session.zeroshot, session.region = None, None
        status += " (from cache)" if cached else ""
        status += "".join(f". Note: {n}" for n in scale_notes(prepared.inputs, "the pixel-size field"))
        return session, info_markdown(prepared), prepared.outlined, self.slide_names(session), status

    def open_example(self, name: str | None, stain: str | None, session: Session, progress: Any = None,
                     user: str | None = None) -> tuple[Session, str, Any, Any, str]:
        """Open one of the listed examples by its file name."""
        if name and name not in self.deploy.examples:
            session = self.own(session, user)
            return (session, "", None, self.slide_names(session),
                    f"Could not open {_echo(name)}: not one of this server's examples")
        return self.open(None, name, stain, session, progress, user)

    def _add_slide(self, session: Session, src: Path, stain: str | None, tried: list[str],
                   activate: bool = True, mpp: float | None = None) -> tuple[Any, bool]:
        """Prepare ``src`` (within the session's and the server's limits) and put it in the case;
        its fingerprint is appended to ``tried`` for the audit log."""
        d = self.deploy
        names = [s.name for s in session.slides]
        if src.stem not in names and len(session.slides) >= d.max_session_slides:
            raise ConfigError(f"this session's case already holds {len(session.slides)} slides, the "
                              "limit on this server; start a new session (a new browser tab)")
        fingerprint = slide_fingerprint(src)
        tried.append(fingerprint)
        prepared, key, cached = prepare_slide(self.model, src, self.cache, max_pixels=d.max_pixels,
                                              mpp=mpp)
        held = sum(self.cache.nbytes(s.key) for s in session.slides if s.name != prepared.name)
        held += self.cache.nbytes(key)
        if held > d.max_session_feature_mb * 2**20:
            raise ConfigError(f"with this slide the session's case would hold {held / 2**20:.0f} MB of "
                              f"features, above this server's {d.max_session_feature_mb:g} MB a session")
        slide = CaseSlide(key, prepared.name, prepared.path, (stain or "H&E").strip() or "H&E", fingerprint)
        if prepared.name in names:
            session.slides[names.index(prepared.name)] = slide
        else:
            session.slides.append(slide)
        _normalise_stains(session)
        if activate:
            session.active = [s.name for s in session.slides].index(prepared.name)
        return prepared, cached

    def _open_manifest(self, src: Path, session: Session, uploaded: bool, tried: list[str]
                       ) -> tuple[Any, bool]:
        """Every slide of a case manifest, or none; the case replaces the session's slides, chat
        and ancillary results. Paths in it obey the slide roots like the path box."""
        from pathvlm.case import load_case

        if src.stat().st_size > MAX_MANIFEST_BYTES:
            raise ConfigError(f"a case manifest may be at most {MAX_MANIFEST_BYTES >> 10} KiB")
        case = load_case(src, resolve_slide=self.access.manifest_resolver(uploaded))
        if len(case.slides) > self.deploy.max_session_slides:
            raise ConfigError(f"the case has {len(case.slides)} slides; this server allows "
                              f"{self.deploy.max_session_slides} a session")
        work = Session(owner=session.owner)
        first, cached_all = None, True
        for i, ref in enumerate(case.slides):
            try:
                prepared, cached = self._add_slide(work, Path(ref.path), ref.stain, tried, activate=first is None,
                                                   mpp=ref.mpp)
            except SlideError as exc:  # unreadable or too coarse: the case goes on without it, and says so
                work.left_out.append(left_out_note(ref, case, exc))
                continue
            except PathVLMError as exc:
                raise CaseError(src.name, f"slides[{i}] ({ref.name})", problem(exc)) from None
            first, cached_all = first or prepared, cached_all and cached
        if first is None:
            raise CaseError(src.name, "slides", "no slide could be read (" + "; ".join(work.left_out) + ")")
        work.ancillary = [r.model_dump(mode="json", exclude_none=True) for r in case.ancillary_results]
        session.__dict__.update(work.__dict__)
        return first, cached_all

    def slide_names(self, session: Session) -> Any:
        import gradio as gr

        names = [f"{s.name} [{s.stain}]" for s in session.slides]
        value = names[session.active] if session.active is not None and names else None
        return gr.update(choices=names, value=value)

    def switch(self, choice: str | None, session: Session, user: str | None = None
               ) -> tuple[Session, str, Any]:
        session = self.own(session, user)
        names = [f"{s.name} [{s.stain}]" for s in session.slides]
        if choice not in names:
            return session, "", None
        session = copy.deepcopy(session)
        session.active, session.zeroshot, session.region = names.index(choice), None, None
        try:
            prepared = self.active(session)
        except PathVLMError as exc:  # dropped out of the cache: say so where the info would be
            return session, f"**{problem(exc)}**", None
        return session, info_markdown(prepared), prepared.outlined

    def active(self, session: Session) -> Any:
        if session is None or session.active is None:
            raise ConfigError("open a slide or image first")
        s = session.slides[session.active]
        prepared = self.cache.get(s.key)
        if prepared is None:
            raise ConfigError(f"{s.name}: the slide dropped out of the server's cache; open it again")
        return prepared

    # -- viewer -----------------------------------------------------------------------------
    def view(self, source: str, cls: str | None, opacity: float, session: Session,
             user: str | None = None) -> tuple[Any, str]:
        """The active thumbnail with the chosen heatmap over it."""
        session = self.own(session, user)
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

    def region(self, xy: tuple[float, float], session: Session, user: str | None = None
               ) -> tuple[Session, Any, str]:
        """Full-resolution crop around a click on the thumbnail."""
        session = self.own(session, user)
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
                raise ConfigError(f"{s.name}: the slide dropped out of the server's cache; open it again")
            item = copy.copy(prepared.inputs[0])
            item.stain = s.stain
            inputs.append(item)
        return inputs

    def ask(self, question: str, scope: str, use_region: bool, session: Session, user: str | None = None
            ) -> Iterator[tuple[list[dict[str, str]], list, Session, str, str]]:
        """Stream the answer into the chat; afterwards show the tiles it drew on."""
        session = copy.deepcopy(self.own(session, user))
        question = (question or "").strip()
        if not question:
            yield session.history, [], session, "", "Type a question."
            return
        history = list(session.history)
        used = [s.fingerprint for s in session.slides] if scope == "whole case" else \
            [session.slides[session.active].fingerprint] if session.active is not None else []
        try:
            inputs = self.chat_input(session, scope, use_region)
            # case-fact questions are answered from the case tab: slides, stains, entered results
            case = rep.build_case(session) if session.slides else None
            pieces, attention = self.gate.stream(inputs, question, history, case=case, **self.gen)
        except (PathVLMError, ValidationError, OSError) as exc:
            self._audit("ask", user, used, False, question=question)
            yield history, [], session, question, f"Could not answer: {problem(exc)}"
            return
        self._audit("ask", user, used, True, question=question, scope=scope, region=bool(use_region))
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
        return self._crops(session, top_rows(attention, 6))

    def _crops(self, session: Session, rows: list[dict[str, Any]]) -> list:
        """Gallery crops (image, caption) of tile rows ({slide, x, y, ...}) of the session's slides."""
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

    def clear(self, session: Session, user: str | None = None) -> tuple[list, list, Session]:
        session = copy.deepcopy(self.own(session, user))
        session.history, session.attention = [], []
        return [], [], session

    # -- zero-shot --------------------------------------------------------------------------
    def zeroshot(self, classes: str, preset: str, session: Session, user: str | None = None
                 ) -> tuple[Any, Any, Session, str]:
        import gradio as gr

        from pathvlm.zeroshot import ZeroShotClassifier

        session = self.own(session, user)
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
    def add_ancillary(self, test: str, target: str, result: str, session: Session,
                      user: str | None = None) -> tuple[Session, str, str]:
        from pathvlm.case import AncillaryResult

        session = self.own(session, user)
        try:
            entry = AncillaryResult(test=test, target=target, result=result).model_dump(mode="json")
        except ValidationError as exc:
            return session, ancillary_markdown(session), f"Ancillary result not added: {problem(exc)}"
        session = copy.deepcopy(session)
        session.ancillary.append({k: v for k, v in entry.items() if v is not None})
        return session, ancillary_markdown(session), f"Added {entry['test']} {entry['target']}"

    def report(self, kind: str, procedure: str | None, site: str | None, size_cm: float | None,
               nodes_examined: float | None, nodes_positive: float | None, session: Session,
               min_confidence: float | str | None = None, user: str | None = None
               ) -> tuple[str, Any, Any, Any, Any, Session, str]:
        """Draft over the session's slides; ``min_confidence`` empty: the threshold chosen on val."""
        import gradio as gr

        session = copy.deepcopy(self.own(session, user))
        used = [s.fingerprint for s in session.slides]
        try:
            threshold = _threshold(min_confidence)
            clinical = rep.clinical_from_form(kind, procedure, site, size_cm, nodes_examined, nodes_positive)
            report = self.gate.run(lambda: rep.draft_for_session(
                self.model, session, self.cache, kind, clinical, self.classifiers,
                min_confidence=threshold))
        except (PathVLMError, ValidationError) as exc:
            self._audit("report", user, used, False, kind=kind)
            return ("", None, None, None, gr.update(), session,
                    f"Could not draft the report: {problem(exc)}")
        self._audit("report", user, used, True, kind=kind)
        from pathvlm.reports import render_report

        paths = rep.write_downloads(report, Path(tempfile.mkdtemp(prefix="pathvlm-report-")))
        session.report = report
        return (render_report(report, "md"), str(paths["json"]), str(paths["md"]), str(paths["fhir"]),
                gr.update(choices=rep.evidence_choices(report), value=None), session,
                f"Drafted {kind} over {len(session.slides)} slide(s)")

    def field_tiles(self, choice: str | None, session: Session, user: str | None = None) -> list:
        """The tiles the picked field, entity or tissue class cites, as gallery crops."""
        session = self.own(session, user)
        report = getattr(session, "report", None)
        if not choice or report is None:
            return []
        crops = self._crops(session, rep.evidence_rows(report, choice))
        return [(im, f"{choice} - {cap.split(' w=')[0]}") for im, cap in crops]


def _threshold(text: float | str | None) -> float | None:
    """The app's minimum-confidence box: empty = the calibrated default, else a number in [0, 1]."""
    from pathvlm.errors import ConfigError

    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"minimum confidence {text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"minimum confidence must be between 0 and 1, got {value}")
    return value


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
