"""The Gradio layout: viewer + case panel, chat, zero-shot and report tabs wired to Handlers."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage pings

from pathvlm.ui import report as rep
from pathvlm.ui.handlers import HEAT_SOURCES, Handlers, ancillary_markdown
from pathvlm.ui.state import Session

CONCURRENCY = 2  # events run at once; generation shares 2 CPU cores, more only queues in torch
REPO = Path(__file__).resolve().parents[2]


def example_inputs() -> list[str]:
    """Inputs that exist on this machine: scikit-image's colon image, ../shared/data/wsi slides."""
    out = []
    try:
        import skimage

        ihc = Path(skimage.__file__).parent / "data" / "ihc.png"
        if ihc.exists():
            out.append(str(ihc))
    except ImportError:
        pass
    wsi = Path(os.environ.get("PATHVLM_DATA", REPO.parent / "shared" / "data")) / "wsi"
    if wsi.is_dir():
        out += sorted(str(p) for p in wsi.iterdir() if p.suffix.lower() in {".svs", ".tif", ".tiff",
                                                                              ".ndpi", ".mrxs", ".png"})[:6]
    return out


def build_demo(model: Any, max_new_tokens: int = 128, title: str = "pathvlm",
               generation: dict[str, Any] | None = None) -> Any:
    """The app as a ``gr.Blocks`` (queued); launch it with ``launch_demo`` or ``.launch()``.

    Args:
        generation: extra ``model.stream`` options (e.g. ``min_new_tokens`` in tests).
    """
    import gradio as gr

    h = Handlers(model, max_new_tokens=max_new_tokens, generation=generation)
    with gr.Blocks(title=title) as demo:
        c = _layout(gr, title)
        _wire(gr, h, c)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=64)
    return demo


def _layout(gr: Any, title: str) -> SimpleNamespace:
    """Components, by name: viewer and case panel on top, chat / zero-shot / report / case tabs."""
    from pathvlm.reports import ancillary as anc
    from pathvlm.reports import get_report_type

    procedures = sorted({v for k in rep.REPORT_KINDS if "procedure" in get_report_type(k).field_names
                         for v in get_report_type(k).spec("procedure").values})
    c = SimpleNamespace()
    c.session = gr.State(Session())
    gr.Markdown(f"# {title}\nDraft assistance for pathologists: every answer and report field is "
                "a draft to verify. Label and macro images are never shown.")
    c.status = gr.Markdown("", elem_id="status")
    with gr.Row():
        with gr.Column(scale=1):
            c.upload = gr.File(label="Slide or image", type="filepath", elem_id="upload")
            c.path = gr.Textbox(label="...or a path on the server", elem_id="path")
            c.stain = gr.Textbox(label="Stain (H&E, IHC: CD20, special: PAS)", value="H&E")
            c.open_btn = gr.Button("Open", variant="primary", elem_id="open")
            gr.Examples(example_inputs(), inputs=[c.path], label="Examples")
            c.slide_pick = gr.Dropdown(label="Case slides", choices=[], interactive=True)
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
            c.report_md = gr.Markdown("_no report yet_", elem_id="report")
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


def _wire(gr: Any, h: Handlers, c: SimpleNamespace) -> None:
    """Events; the model-heavy ones share one concurrency group so the queue bounds CPU load."""

    def _open(u, p, s, sess, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's API
        return h.open(u, p, s, sess, progress)

    def _select(sess, evt):
        return h.region(tuple(evt.index), sess)

    _select.__annotations__["evt"] = gr.SelectData  # a real class, so gradio injects the click

    view_in, view_out = [c.heat, c.heat_cls, c.opacity, c.session], [c.viewer, c.status]
    c.open_btn.click(_open, [c.upload, c.path, c.stain, c.session],
                     [c.session, c.info, c.viewer, c.slide_pick, c.status], api_name="open",
                     concurrency_id="model")
    c.slide_pick.input(h.switch, [c.slide_pick, c.session], [c.session, c.info, c.viewer],
                       api_name="switch")
    for ctl in (c.heat, c.heat_cls, c.opacity):
        ctl.change(h.view, view_in, view_out, api_name=False)
    c.viewer.select(_select, [c.session], [c.session, c.region, c.status], api_name=False)
    chat_in, chat_out = [c.question, c.scope, c.use_region, c.session], [c.chatbot, c.tiles, c.session,
                                                                        c.question, c.status]
    c.send.click(h.ask, chat_in, chat_out, api_name="ask", concurrency_id="model").then(
        h.view, view_in, view_out, api_name=False)
    c.question.submit(h.ask, chat_in, chat_out, api_name=False, concurrency_id="model").then(
        h.view, view_in, view_out, api_name=False)
    c.clear.click(h.clear, [c.session], [c.chatbot, c.tiles, c.session], api_name="clear")
    c.zs_btn.click(h.zeroshot, [c.classes, c.preset, c.session], [c.probs, c.heat_cls, c.session, c.status],
                   api_name="zeroshot", concurrency_id="model")
    c.add.click(h.add_ancillary, [c.test, c.target, c.result, c.session], [c.session, c.anc_table, c.status],
                api_name="ancillary")
    form = [c.procedure, c.site, c.size, c.examined, c.positive, c.session]
    report_out = [c.report_md, c.dl_json, c.dl_md, c.dl_fhir, c.session, c.status]
    for kind, btn in zip(rep.REPORT_KINDS, c.kind_btns):
        btn.click(lambda *a, _k=kind: h.report(_k, *a), form, report_out, api_name=f"report_{kind}",
                  concurrency_id="model")


def launch_demo(demo: Any, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
                share: bool = False, max_file_size: str = "2gb", block: bool = True) -> Any:
    """Serve the app; ``auth`` is ``user:password``. Binds localhost unless told otherwise."""
    from pathvlm.errors import ConfigError

    credentials = None
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise ConfigError("--auth must be user:password")
        credentials = (user, password)
    return demo.launch(server_name=host, server_port=port, auth=credentials, share=share,
                       max_file_size=max_file_size, prevent_thread_lock=not block, quiet=not block,
                       show_error=True)
