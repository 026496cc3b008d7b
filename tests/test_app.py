"""The Gradio app end to end through gradio_client against a launched server with a tiny model."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")

from pathvlm.errors import ConfigError
from pathvlm.model import ModelConfig, build_model
from pathvlm.ui.deploy import OUTSIDE

TINY_LLM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
GEN = {"min_new_tokens": 6}


def tiny_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(encoder="openclip:pathvlm-tiny", n_tokens=4, hidden_dim=32,
                                   llm_config=TINY_LLM, tile_size=32))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def app_url(model):
    from pathvlm.ui import build_demo, launch_demo

    demo = build_demo(model, max_new_tokens=6, generation=GEN)
    port = free_port()
    launch_demo(demo, port=port, block=False, max_file_size="5mb")
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def client(url, tmp_path):
    return gradio_client.Client(url, download_files=str(tmp_path), verbose=False)


def open_file(c, path, stain="H&E"):
    info, _viewer, _names, status = c.predict(gradio_client.handle_file(str(path)), "", stain,
                                              api_name="/open")
    return info, status


def text(message) -> str:
    """A chat message's text (gradio returns content as a list of typed parts)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def ask(c, question):
    job = c.submit(question, "active slide", False, api_name="/ask")
    job.result()
    return job.outputs()


def test_open_ask_stream_report_download(app_url, ihc_png, tmp_path):
    c = client(app_url, tmp_path)
    info, status = open_file(c, ihc_png)
    assert status.startswith("Opened ihc") and "512 x 512 px" in info and "tiles embedded: 256" in info
    assert "pixel size unknown for ihc: assumed 0.5 um/px" in status  # no pixel size given
    assert open_file(c, ihc_png)[1].startswith("Opened ihc (from cache)")  # same file + encoder: no re-embedding

    outputs = ask(c, "What tissue is this?")
    chats = [o[0] for o in outputs]
    assert len(outputs) >= 3  # streamed: several partial answers before the last one
    final = chats[-1]
    assert [m["role"] for m in final] == ["user", "assistant"]
    assert text(final[0]) == "What tissue is this?"
    partial = [text(m[-1]) for m in chats[:-1] if len(m) == 2]
    assert all(text(final[-1]).startswith(p) for p in partial)
    assert len(outputs[-1][1]) == 6  # gallery of the top attended tiles
    assert outputs[-1][-1] == "done"
    second = ask(c, "And the stroma?")[-1][0]  # multi-turn: history kept in the session
    assert [text(m) for m in second[::2]] == ["What tissue is this?", "And the stroma?"]

    md, js, md_file, fhir, _evidence_pick, status = c.predict("Right hemicolectomy", "Cecum", 3.5, 14, 2,
                                              api_name="/report_colorectal_resection")
    assert status.startswith("Drafted colorectal_resection"), status
    report = json.loads(Path(js).read_text(encoding="utf-8"))
    assert report["report_type"] == "colorectal_resection"
    assert report["fields"]["procedure"]["value"] == "Right hemicolectomy"
    assert report["fields"]["lymph_nodes_examined_count"]["value"] == 14
    assert "DRAFT" in md and "Right hemicolectomy" in Path(md_file).read_text(encoding="utf-8")
    assert json.loads(Path(fhir).read_text(encoding="utf-8"))["resourceType"]


def test_two_clients_do_not_share_state(app_url, ihc_png, tmp_path):
    other = tmp_path / "other.png"
    Image.open(ihc_png).convert("RGB").crop((0, 0, 256, 256)).save(other)
    a, b = client(app_url, tmp_path / "a"), client(app_url, tmp_path / "b")
    results = {}

    def run(name, c, path, question):
        open_file(c, path)
        results[name] = ask(c, question)[-1][0]

    threads = [threading.Thread(target=run, args=("a", a, ihc_png, "question from A")),
               threading.Thread(target=run, args=("b", b, other, "question from B"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [text(m) for m in results["a"][::2]] == ["question from A"]
    assert [text(m) for m in results["b"][::2]] == ["question from B"]
    _, js_a, *_ = a.predict("", "", None, None, None, api_name="/report_colorectal_biopsy")
    _, js_b, *_ = b.predict("", "", None, None, None, api_name="/report_colorectal_biopsy")
    slides_a = [s["name"] for s in json.loads(Path(js_a).read_text(encoding="utf-8"))["slides"]]
    slides_b = [s["name"] for s in json.loads(Path(js_b).read_text(encoding="utf-8"))["slides"]]
    assert slides_a == ["ihc"] and slides_b == ["other"]


def test_bad_file_is_a_clear_message_and_nothing_breaks(app_url, ihc_png, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    c = client(app_url, tmp_path)
    info, status = open_file(c, bad)
    assert status.startswith("Could not open broken.png:") and "broken.png" in status and info == ""
    _, _, _, status = c.predict(None, str(tmp_path / "missing.svs"), "H&E", api_name="/open")
    assert OUTSIDE in status and "not found" not in status  # no slide roots: server paths refused
    _, js, *_, status = c.predict("", "", None, None, None, api_name="/report_lymphoma")
    assert js is None and "open a slide or image first" in status
    assert open_file(c, ihc_png)[1].startswith("Opened ihc")  # the session still works
    _, _, _, status = c.predict(None, "", "not-a-stain??", api_name="/open")
    assert status == "Choose a file or enter a path."


def test_heatmaps_region_zeroshot_and_case(model, ihc_png, tmp_path):
    from pathvlm.ui.deploy import DeployConfig
    from pathvlm.ui.handlers import HEAT_SOURCES, Handlers
    from pathvlm.ui.state import Session

    h = Handlers(model, max_new_tokens=4, generation=GEN,
                 deploy=DeployConfig(slide_roots=(ihc_png.parent, tmp_path)))
    s = h.open(None, str(ihc_png), "H&E", Session())[0]
    assert "Ask a question" in h.view(HEAT_SOURCES[1], None, 0.5, s)[1]
    for out in h.ask("Where is the tumour?", "active slide", False, s):
        pass
    s = out[2]
    plain = h.view(HEAT_SOURCES[0], None, 0.5, s)[0]
    heat, msg = h.view(HEAT_SOURCES[1], None, 0.5, s)
    assert msg == "" and heat.size == plain.size and heat.tobytes() != plain.tobytes()
    assert h.view(HEAT_SOURCES[1], None, 0.0, s)[0].tobytes() == plain.tobytes()  # opacity 0
    probs, _, s, status = h.zeroshot("", "colorectal tissue", s)
    assert set(probs) == {"ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"}
    assert abs(sum(probs.values()) - 1) < 1e-5
    zs_heat, msg = h.view(HEAT_SOURCES[2], "TUM", 0.6, s)
    assert msg == "" and zs_heat.tobytes() != plain.tobytes()
    assert "at least two" in h.zeroshot("tumour", "custom", s)[3]
    s, region, status = h.region((500, 10), s)  # near the top-right corner: clamped inside
    assert region.size == (512, 512) and "(0, 0)" in status
    answers = list(h.ask("What is in this region?", "active slide", True, s))
    assert answers[-1][-1] == "done"
    # a case: a second slide with an IHC stain, an ancillary result, chat and report over both
    ihc_b = tmp_path / "block_b.png"
    Image.open(ihc_png).convert("RGB").crop((128, 128, 384, 384)).save(ihc_b)
    s = h.open(None, str(ihc_b), "IHC: CD20", s)[0]
    assert [(x.name, x.stain) for x in s.slides] == [("ihc", "H&E"), ("block_b", "IHC:CD20")]
    s, _, status = h.add_ancillary("IHC", "CD20", "positive", s)
    assert status == "Added IHC CD20"
    assert "not added" in h.add_ancillary("IHC", "CD20", "maybe", s)[2]
    *_, final = h.ask("Summarise the case.", "whole case", False, s)
    assert final[-1] == "done"
    # case facts come from the case tab (slides, stains, entered results), not from the pixels
    *_, final = h.ask("Which slide shows the immunostain?", "active slide", False, s)
    assert final[0][-1]["content"] == "The immunostain or special stain is block_b (IHC:CD20)."
    *_, final = h.ask("What is the CD20 result?", "active slide", True, s)  # also with a zoomed region
    assert final[0][-1]["content"] == "CD20 positive (IHC), as entered in the case."
    _, js, _, _, pick, s, status = h.report("lymphoma", "Excisional biopsy", "cervical lymph node",
                                            None, None, None, s, 0.5)
    data = json.loads(Path(js).read_text(encoding="utf-8"))
    assert data["min_confidence"] == 0.5  # the app's control reaches the report
    # clicking a differential entity shows the tiles it cites, and only those
    entity = next(c for c in pick["choices"] if c.startswith("differential: "))
    cited = next(d for d in data["morphologic_differential"]
                 if d["entity"] == entity.split(": ", 1)[1])["evidence"]
    gallery = h.field_tiles(entity, s)
    assert len(gallery) == sum(len(ev["tiles"]) for ev in cited) > 0
    assert h.field_tiles(None, s) == []
    assert "between 0 and 1" in h.report("lymphoma", "", "", None, None, None, s, "1.5")[-1]
    assert data["ancillary_results"][0]["target"] == "CD20"
    assert data["fields"]["procedure"]["value"] == "Excisional biopsy"


def test_answer_status_done_survives_the_viewer_refresh_chained_after_it(model, ihc_png):
    """The viewer refresh that follows an answer wrote "" into the status ~0.2 s after "done"
    (the browser test then saw an empty status); with nothing to say it now leaves it alone."""
    from pathvlm.ui import build_demo
    from pathvlm.ui.deploy import DeployConfig
    from pathvlm.ui.handlers import HEAT_SOURCES
    from pathvlm.ui.state import SessionStore

    demo = build_demo(model, max_new_tokens=6, generation=GEN,
                      deploy=DeployConfig(slide_roots=(ihc_png.parent,)))
    fns = {f.name: f.fn for f in demo.fns.values()}
    store, *_, status = fns["_open"](None, str(ihc_png), "H&E", None, SessionStore(), None, None)
    assert "Opened ihc" in status
    *_, (_, _, store, _, status) = fns["ask"]("What tissue is this?", "active slide", False, store, None)
    assert status == "done"
    image, status = fns["_view_after_answer"](HEAT_SOURCES[0], None, 0.5, store, None)
    assert image is not None and status == {"__type__": "update"}  # gr.update(): status unchanged
    # a message the viewer does have still replaces it; the heat controls' own refresh still clears it
    assert fns["_view_after_answer"](HEAT_SOURCES[2], "TUM", 0.5, store, None)[1] != {"__type__": "update"}
    assert fns["view"](HEAT_SOURCES[0], None, 0.5, store, None)[1] == ""


def test_auth_must_be_user_colon_password(model):
    from pathvlm.ui import build_demo, launch_demo

    with pytest.raises(ConfigError, match="user:password"):
        launch_demo(build_demo(model), auth="nopassword", block=False)
