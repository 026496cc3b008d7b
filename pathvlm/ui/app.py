"""The Gradio layout: viewer + case panel, chat, zero-shot and report tabs wired to Handlers."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage pings

from pathvlm.ui import report as rep
from pathvlm.ui.audit import AuditLog
from pathvlm.ui.deploy import DeployConfig, find_examples
from pathvlm.ui.handlers import HEAT_SOURCES, Handlers, ancillary_markdown
from pathvlm.ui.state import Session, SessionStore

CONCURRENCY = 2  # events run at once; generation shares 2 CPU cores, more only queues in torch
REPO = Path(__file__).resolve().parents[2]


def example_inputs(deploy: DeployConfig | None = None) -> dict[str, Path]:
    """Examples that exist and open on this machine, by file name: scikit-image's colon image,
    the first slides of each slide root and of ``$PATHVLM_DATA/wsi`` (``../shared/data/wsi``)."""
    roots = deploy.slide_roots if deploy is not None else ()
    env = os.environ.get("PATHVLM_DATA")
    data = Path(env) if env else REPO.parent / "shared" / "data"
    return find_examples(roots, data if data.is_dir() else None)


def build_demo(model: Any, max_new_tokens: int = 128, title: str = "pathvlm",
               generation: dict[str, Any] | None = None, deploy: DeployConfig | None = None,
               audit: AuditLog | None = None) -> Any:
    """The app as a ``gr.Blocks`` (queued); launch it with ``launch_demo`` or ``.launch()``.

    Args:
        generation: extra ``model.stream`` options (e.g. ``min_new_tokens`` in tests).
        deploy: slide roots and limits (default: no roots, the examples found on this machine).
        audit: where open / ask / report events are recorded, or None.
    """
    import gradio as gr

    deploy = deploy or DeployConfig()
    if not deploy.examples:
        deploy = replace(deploy, examples=example_inputs(deploy))
    h = Handlers(model, max_new_tokens=max_new_tokens, generation=generation, deploy=deploy, audit=audit)
    # uploads and report downloads older than a day are deleted, checked hourly
    with gr.Blocks(title=title, delete_cache=(3600, 86400)) as demo:
        c = _layout(gr, title, h)
        _wire(gr, h, c)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=64)
    demo.pathvlm_deploy = deploy  # launch_demo reads the upload limit from here
    return demo


def _layout(gr: Any, title: str, h: Handlers) -> SimpleNamespace:
    """Components, by name: viewer and case panel on top, chat / zero-shot / report / case tabs."""
    from pathvlm.reports import ancillary as anc
    from pathvlm.reports import get_report_type

    procedures = sorted({v for k in rep.REPORT_KINDS if "procedure" in get_report_type(k).field_names
                         for v in get_report_type(k).spec("procedure").values})
    c = SimpleNamespace()
    c.session = gr.State(SessionStore())
    gr.Markdown(f"# {title}\nDraft assistance for pathologists: every answer and report field is "
                "a draft to verify. Label and macro images are never shown.")
    c.status = gr.Markdown("", elem_id="status")
    with gr.Row():
        with gr.Column(scale=1):
            c.upload = gr.File(label="Slide, image or case manifest (.yaml/.json)", type="filepath",
                               elem_id="upload")
            c.path = gr.Textbox(label="...or a path under " + ", ".join(r.name for r in h.access.roots),
                                elem_id="path", visible=h.access.has_roots)
            with gr.Row():
                c.stain = gr.Textbox(label="Stain (H&E, IHC: CD20, special: PAS)", value="H&E")
                c.mpp = gr.Number(label="Pixel size, um/px (images that record none)", value=None,
                                  minimum=0, elem_id="mpp")
            c.open_btn = gr.Button("Open", variant="primary", elem_id="open")
            c.example = gr.Dropdown(list(h.deploy.examples), value=None, label="Examples (open one)",
                                    elem_id="examples", visible=bool(h.deploy.examples))
            gr.Markdown(h.deploy.limits_markdown(), elem_id="limits")
            # custom values allowed: gradio would otherwise name the choices of the session id it
            # was given in its error, even to a request of another login (the handler checks them)
            c.slide_pick = gr.Dropdown(label="Case slides", choices=[], interactive=True,
                                       allow_custom_value=True)
            c.info = gr.Markdown("")
        with gr.Column(scale=2):
            c.viewer = gr.Image(label="Thumbnail (tissue outlined; click to zoom)", type="pil",
                                interactive=False, elem_id="viewer")
            with gr.Row():
                c.heat = gr.Radio(list(HEAT_SOURCES), value=HEAT_SOURCES[0], label="Heatmap")
                c.heat_cls = gr.Dropdown(label="Zero-shot class", choices=[])
                c.opacity = gr.Slider(0, 1, value=0.45, step=0.05, label="Opacity")
            c.region = gr.Image(label="Region at full resolution", type="pil", interactive=False)
    with gr.Tabs():
        with gr.Tab("Chat"):
            c.chatbot = gr.Chatbot(label="Chat", height=360, elem_id="chatbot")
            with gr.Row():
                c.question = gr.Textbox(label="Question", scale=4, elem_id="question",
                                        placeholder="What tissue is this?")
                c.send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            with gr.Row():
                c.scope = gr.Radio(["active slide", "whole case"], value="active slide", label="Ask about")
                c.use_region = gr.Checkbox(label="Ask about the zoomed region", value=False)
                c.clear = gr.Button("Clear chat")
            c.tiles = gr.Gallery(label="Tiles the answer drew on", columns=6, height=200)
        with gr.Tab("Zero-shot"):
            c.preset = gr.Dropdown(["custom", *rep.PRESETS], value="colorectal tissue", label="Preset")
            c.classes = gr.Textbox(label="Class names (custom), comma separated",
                                   value="tumour, stroma, lymphocytes, fat")
            c.zs_btn = gr.Button("Classify", elem_id="zeroshot")
            c.probs = gr.Label(label="Probabilities", num_top_classes=10)
        with gr.Tab("Report", elem_id="report-tab"):
            with gr.Row():
                c.kind_btns = [gr.Button(k.replace("_", " "), elem_id=f"report-{k}") for k in rep.REPORT_KINDS]
            with gr.Accordion("Clinical context (optional)", open=False), gr.Row():
                c.procedure = gr.Dropdown([""] + procedures, value="", label="Procedure",
                                          allow_custom_value=True)
                c.site = gr.Textbox(label="Site(s), comma separated")
                c.size = gr.Number(label="Tumour / polyp size (cm)", value=None)
                c.examined = gr.Number(label="Nodes examined", value=None, precision=0)
                c.positive = gr.Number(label="Nodes positive", value=None, precision=0)
            c.min_conf = gr.Textbox(value="", label="Minimum confidence to fill a field, 0-1 "
                                    "(empty: the threshold chosen on val)", elem_id="min-confidence")
            c.report_md = gr.Markdown("_no report yet_", elem_id="report")
            with gr.Row():
                c.evidence_pick = gr.Dropdown([], label="Show the tiles a field cites",
                                              elem_id="evidence-pick")
                c.evidence = gr.Gallery(label="Evidence tiles", columns=6, height=200)
            with gr.Row():
                c.dl_json, c.dl_md, c.dl_fhir = (gr.File(label=x, interactive=False)
                                                 for x in ("JSON", "Markdown", "FHIR"))
        with gr.Tab("Case"):
            gr.Markdown("Open more slides above (each with its stain) to build a case; chat "
                        "over the whole case and the report use all of them.")
            with gr.Row():
                c.test = gr.Dropdown(list(anc.TESTS), label="Test", allow_custom_value=True)
                c.target = gr.Textbox(label="Target (e.g. CD20, MLH1, MYC)")
                c.result = gr.Dropdown([r for r in anc.RESULTS if r != "value"], label="Result")
                c.add = gr.Button("Add result")
            c.anc_table = gr.Markdown(ancillary_markdown(Session()))
    return c


def _as_user(gr: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(*inputs, user=login)`` as an event function. Gradio passes its request last (found by
    the annotation); the login picks that user's ``Session`` out of the state's ``SessionStore``
    on the way in, and the returned ``Session`` goes back under the same login on the way out."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name != "user"]
    params.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    default=None, annotation=gr.Request))

    def split(args: tuple[Any, ...]) -> tuple[list[Any], SessionStore, str | None]:
        user = getattr(args[-1], "username", None)
        store = next((a for a in args[:-1] if isinstance(a, SessionStore)), SessionStore())
        return [a.get(user) if isinstance(a, SessionStore) else a for a in args[:-1]], store, user

    def join(out: Any, store: SessionStore, user: str | None) -> Any:
        if isinstance(out, tuple):
            return tuple(store.put(user, o) if isinstance(o, Session) else o for o in out)
        return store.put(user, out) if isinstance(out, Session) else out

    if inspect.isgeneratorfunction(getattr(fn, "func", fn)):
        def wrapped(*args: Any) -> Any:
            inputs, store, user = split(args)
            for out in fn(*inputs, user=user):
                yield join(out, store, user)
    else:
        def wrapped(*args: Any) -> Any:
            inputs, store, user = split(args)
            return join(fn(*inputs, user=user), store, user)
    wrapped.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapped.__annotations__ = {"request": gr.Request}
    wrapped.__name__ = getattr(fn, "__name__", "handler")
    return wrapped


def _wire(gr: Any, h: Handlers, c: SimpleNamespace) -> None:
    """Events; the model-heavy ones share one concurrency group so the queue bounds CPU load.

    Events a client script needs keep an API name; the viewer's internal ones are private.
    """
    private = {"api_visibility": "private"}

    # m (pixel size) defaults to None, so API clients may leave it out
    def _open(u, p, s, m=None, sess=None, progress=gr.Progress(track_tqdm=True), user=None):  # noqa: B008
        return h.open(u, p, s, sess, progress, user=user, mpp=m)

    def _open_example(name, s, sess, progress=gr.Progress(track_tqdm=True), user=None):  # noqa: B008
        return h.open_example(name, s, sess, progress, user=user)

    def _select(sess, evt, user=None):
        return h.region(tuple(evt.index), sess, user=user)

    view = _as_user(gr, h.view)
    select = _as_user(gr, _select)
    select.__annotations__["evt"] = gr.SelectData  # a real class, so gradio injects the click

    view_in, view_out = [c.heat, c.heat_cls, c.opacity, c.session], [c.viewer, c.status]
    open_out = [c.session, c.info, c.viewer, c.slide_pick, c.status]
    c.open_btn.click(_as_user(gr, _open), [c.upload, c.path, c.stain, c.mpp, c.session], open_out,
                     api_name="open", concurrency_id="model")
    c.example.input(_as_user(gr, _open_example), [c.example, c.stain, c.session], open_out,
                    api_name="open_example", concurrency_id="model")
    c.slide_pick.input(_as_user(gr, h.switch), [c.slide_pick, c.session], [c.session, c.info, c.viewer],
                       api_name="switch")
    for ctl in (c.heat, c.heat_cls, c.opacity):
        ctl.change(view, view_in, view_out, **private)
    c.viewer.select(select, [c.session], [c.session, c.region, c.status], **private)
    chat_in, chat_out = [c.question, c.scope, c.use_region, c.session], [c.chatbot, c.tiles, c.session,
                                                                        c.question, c.status]
    ask = _as_user(gr, h.ask)

    def _view_after_answer(source, cls, opacity, sess, user=None):
        # the viewer follows the new attention; an empty message keeps the answer's "done"
        # (writing "" cleared it ~0.2 s after the answer finished)
        image, msg = h.view(source, cls, opacity, sess, user=user)
        return image, msg or gr.update()

    view_after = _as_user(gr, _view_after_answer)
    c.send.click(ask, chat_in, chat_out, api_name="ask", concurrency_id="model").then(
        view_after, view_in, view_out, **private)
    c.question.submit(ask, chat_in, chat_out, concurrency_id="model", **private).then(
        view_after, view_in, view_out, **private)
    c.clear.click(_as_user(gr, h.clear), [c.session], [c.chatbot, c.tiles, c.session], api_name="clear")
    c.zs_btn.click(_as_user(gr, h.zeroshot), [c.classes, c.preset, c.session],
                   [c.probs, c.heat_cls, c.session, c.status], api_name="zeroshot", concurrency_id="model")
    c.add.click(_as_user(gr, h.add_ancillary), [c.test, c.target, c.result, c.session],
                [c.session, c.anc_table, c.status], api_name="ancillary")
    form = [c.procedure, c.site, c.size, c.examined, c.positive, c.session, c.min_conf]
    report_out = [c.report_md, c.dl_json, c.dl_md, c.dl_fhir, c.evidence_pick, c.session, c.status]
    for kind, btn in zip(rep.REPORT_KINDS, c.kind_btns):
        btn.click(_as_user(gr, functools.partial(h.report, kind)), form, report_out,
                  api_name=f"report_{kind}", concurrency_id="model")
    c.evidence_pick.input(_as_user(gr, h.field_tiles), [c.evidence_pick, c.session], [c.evidence],
                          api_name="field_tiles")


def parse_auth(entries: list[str] | str | None, auth_file: str | Path | None = None
               ) -> list[tuple[str, str]] | None:
    """``user:password`` entries (and lines of ``auth_file``) as gradio's credential list."""
    from pathvlm.errors import ConfigError

    items = [entries] if isinstance(entries, str) else list(entries or [])
    if auth_file:
        try:
            lines = Path(auth_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"--auth-file {auth_file}: cannot read ({exc.strerror or exc})") from None
        items += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    credentials: dict[str, str] = {}
    for item in items:
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ConfigError("--auth must be user:password (each line of --auth-file too)")
        credentials[user] = password
    return list(credentials.items()) or None


def launch_demo(demo: Any, host: str = "127.0.0.1", port: int = 7860,
                auth: list[str] | str | None = None, share: bool = False, max_file_size: str | None = None,
                block: bool = True, auth_file: str | Path | None = None) -> Any:
    """Serve the app; ``auth`` is ``user:password`` (or several). Binds localhost unless told
    otherwise. ``max_file_size`` defaults to the limit of the demo's ``DeployConfig``."""
    credentials = parse_auth(auth, auth_file)
    deploy = getattr(demo, "pathvlm_deploy", None) or DeployConfig()
    limit = max_file_size or deploy.max_file_size
    return demo.launch(server_name=host, server_port=port, auth=credentials, share=share,
                       max_file_size=limit, prevent_thread_lock=not block, quiet=not block,
                       show_error=True)
