"""PathVLM end to end on a tiny random Llama (hidden 32, 2 layers) with the SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from pathvlm.case import Case
from pathvlm.errors import ModelError
from pathvlm.features import FeatureBag, write_features
from pathvlm.model import ModelConfig, build_model, list_aggregators, load_model
from pathvlm.model.inputs import SlideInput, resolve_inputs
from pathvlm.model.processor import SLIDE_TOKEN, build_messages, render

D = 16
TINY_LLM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
GEN = {"max_new_tokens": 6, "min_new_tokens": 6}


def tiny_config(**kw) -> ModelConfig:
    base = {"feature_dim": D, "n_tokens": 4, "hidden_dim": 32, "llm_config": TINY_LLM,
            "max_case_tokens": 8}
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_config())


def bag(n: int, seed: int = 0, stain: str | None = None) -> FeatureBag:
    g = torch.Generator().manual_seed(seed)
    attrs = {"stain": stain} if stain else {}
    return FeatureBag(torch.randn(n, D, generator=g), torch.zeros(n, 2, dtype=torch.int64), attrs)


def n_placeholders(model, ids: torch.Tensor) -> int:
    return int((ids == model.slide_token_id).sum())


@pytest.mark.parametrize("aggregator", list_aggregators())
def test_every_aggregator_answers(aggregator):
    torch.manual_seed(0)
    m = build_model(tiny_config(aggregator=aggregator))
    out = m.generate_ids(bag(30), "What tissue is this?", **GEN)
    assert out.shape == (1, 6)
    assert m.last_attention[0]["attention"].shape == (4, 30)


def test_placeholders_expand_to_k_and_fill(model):
    embeds = model.prepare(bag(12), "Describe <slide> please.")
    assert model.slide_embeddings([])[1] == []  # no slide -> no slots
    slots = model.slide_embeddings(resolve_inputs(bag(12)))[1]
    ids = render(model.tokenizer, build_messages("Describe <slide> please.", slots))
    assert n_placeholders(model, ids) == 4
    assert embeds.shape == (1, ids.shape[1], 32)
    # the slide positions hold the projected slide tokens, not the pad embedding
    tokens = model.projector(model.aggregator(bag(12).features[None], None)[0][0])
    pos = (ids[0] == model.slide_token_id).nonzero()[:, 0]
    torch.testing.assert_close(embeds[0, pos], tokens)


def test_count_mismatch_is_a_clear_error(model):
    ids = render(model.tokenizer, [{"role": "user", "content": "x " + SLIDE_TOKEN * 3}])
    with pytest.raises(ModelError, match="3 <slide> placeholder tokens but 4 slide tokens"):
        model.embed_inputs(ids, torch.zeros(4, 32))
    with pytest.raises(ModelError, match="no slide was given"):
        model.prepare(None, f"what is {SLIDE_TOKEN}?")
    with pytest.raises(ModelError, match="at most once"):
        model.prepare(bag(3), f"{SLIDE_TOKEN} vs {SLIDE_TOKEN}")


def test_case_markers_and_budget(model):
    slides = [SlideInput(bag(5, 1), "A1", "H&E", "A"), SlideInput(bag(7, 2), "B1", "IHC: cyclin D1", "B"),
              SlideInput(bag(9, 3), "B2", "IHC: SOX11", "B")]
    embeds, slots = model.slide_embeddings(slides)
    assert [s.n_tokens for s in slots] == [2, 2, 2]  # budget 8 // 3 slides, below K = 4
    assert embeds.shape == (6, 32)
    assert [a["attention"].shape for a in model.last_attention] == [(2, 5), (2, 7), (2, 9)]
    text = model.tokenizer.decode(render(model.tokenizer, build_messages("Diagnosis?", slots))[0])
    assert "Slide 2 (IHC: cyclin D1, part B) B1: <slide><slide>\n" in text
    assert "Slide 3 (IHC: SOX11, part B) B2:" in text
    # one slide keeps all K tokens; 9 slides still get one each (budget exceeded, warned)
    assert model.slide_embeddings(resolve_inputs(bag(4)))[0].shape == (4, 32)
    assert model.slide_embeddings(resolve_inputs([bag(4, i) for i in range(9)]))[0].shape == (9, 32)


def test_case_object_from_feature_files(model, tmp_path):
    paths = []
    for i, stain in enumerate(["H&E", "IHC: cyclin D1"]):
        b = bag(6 + i, i)
        paths.append(write_features(tmp_path / f"s{i}.h5", b.features.numpy(), b.coords.numpy(), {}))
    case = Case(id="c1", slides=[{"path": paths[0], "stain": "H&E"},
                                 {"path": paths[1], "stain": "IHC: cyclin D1", "part": "B"}])
    model.generate_ids(case, "Compare the slides.", **GEN)
    assert [a["name"] for a in model.last_attention] == ["s0", "s1"]
    assert [a["attention"].shape[1] for a in model.last_attention] == [6, 7]
    top = model.top_tiles(3)
    assert len(top) == 3 and {t["slide"] for t in top} <= {"s0", "s1"}
    assert top[0]["weight"] >= top[1]["weight"] >= top[2]["weight"] > 0


def test_zero_tissue_slide_answers(model):
    out = model.generate_ids(bag(0), "Is there tissue?", **GEN)
    assert out.shape == (1, 6)
    assert model.last_attention[0]["attention"].shape == (4, 0)


def test_history_changes_prompt_and_answers(model):
    history = [{"role": "user", "content": "What stain is this?"},
               {"role": "assistant", "content": "H&E."}]
    a = model.generate_ids(bag(8), "And the diagnosis?", history=history, **GEN)
    b = model.generate_ids(bag(8), "And the diagnosis?", **GEN)
    assert a.shape == b.shape == (1, 6)
    # the slide goes into the first user turn, so it stays in context across turns
    msgs = build_messages("And the diagnosis?", model.slide_embeddings(resolve_inputs(bag(8)))[1], history)
    assert SLIDE_TOKEN in msgs[0]["content"] and SLIDE_TOKEN not in msgs[-1]["content"]
    with pytest.raises(ModelError, match=r"history\[0\]"):
        model.ask(bag(8), "q", history=[{"role": "robot", "content": "hi"}])


def test_deterministic_and_stream_matches_ask(model):
    a1 = model.ask(bag(8), "Describe.", **GEN)
    a2 = model.ask(bag(8), "Describe.", **GEN)
    assert a1 == a2
    assert "".join(model.stream(bag(8), "Describe.", **GEN)).strip() == a1
    with pytest.raises(ModelError, match="unknown generation option"):
        model.ask(bag(8), "Describe.", beams=3)


def test_save_load_round_trip(model, tmp_path):
    with torch.no_grad():  # make the learned parts non-trivial
        model.aggregator.empty.normal_()
    model.save_pretrained(tmp_path / "run")
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.yaml", "meta.json", "aggregator.safetensors", "projector.safetensors", "llm"} <= names
    loaded = load_model(tmp_path / "run", device="cpu")  # beside the CPU-built model
    for b in (bag(20, 5), bag(0)):
        torch.testing.assert_close(loaded.prepare(b, "Q?"), model.prepare(b, "Q?"), rtol=0, atol=0)
        assert torch.equal(loaded.generate_ids(b, "Q?", **GEN), model.generate_ids(b, "Q?", **GEN))


def test_load_errors(model, tmp_path, monkeypatch):
    from pathvlm.model import loading

    monkeypatch.setitem(loading._MODELS, "absent", tmp_path / "absent")
    with pytest.raises(ModelError, match="'absent': weights not found"):
        load_model("absent")
    with pytest.raises(ModelError, match="not a run directory"):
        load_model(tmp_path / "nowhere")
    run = model.save_pretrained(tmp_path / "run")
    state = load_file(str(run / "projector.safetensors"))
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(run / "projector.safetensors"))
    with pytest.raises(ModelError, match=r"projector.safetensors.*unexpected keys: \['extra.weight'\]"):
        load_model(run)


def test_wrong_inputs(model):
    with pytest.raises(ModelError, match=r"expects \[N, 16\]"):
        model.ask(torch.randn(3, 5), "q")
    with pytest.raises(ModelError, match="no patch encoder"):
        from PIL import Image

        model.ask(Image.new("RGB", (8, 8)), "q")
    with pytest.raises(ModelError, match="cannot ask about a dict"):
        model.ask({"x": 1}, "q")


def test_cli_ask_and_list(model, tmp_path, capsys, monkeypatch):
    from pathvlm.cli import main
    from pathvlm.model import loading

    monkeypatch.setitem(loading._MODELS, "absent", tmp_path / "absent")

    run = model.save_pretrained(tmp_path / "run")
    b = bag(10)
    h5 = write_features(tmp_path / "s.h5", b.features.numpy(), b.coords.numpy(), {})
    assert main(["ask", str(h5), "What is this?", "--model", str(run), "--max-new-tokens", "3"]) == 0
    expected = model.ask(str(h5), "What is this?", max_new_tokens=3)
    assert capsys.readouterr().out.strip() == expected
    assert main(["ask", "slide.svs", "q", "--model", str(run), "--features", str(h5),
                 "--max-new-tokens", "3"]) == 0
    assert main(["ask", str(h5), "q", "--model", "absent"]) == 2
    assert "weights not found" in capsys.readouterr().err
    assert main(["list", "aggregators"]) == 0
    assert capsys.readouterr().out.split() == list_aggregators()


def test_image_through_tiny_encoder(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    m = build_model(tiny_config(encoder="openclip:pathvlm-tiny", feature_dim=None))
    image = Image.new("RGB", (300, 200), (230, 150, 190))
    out = m.generate_ids(image, "What stain is this?", **GEN)
    assert out.shape == (1, 6)
    n_tiles = m.last_attention[0]["attention"].shape[1]
    assert n_tiles >= 1
    image.save(tmp_path / "img.png")
    assert torch.equal(m.generate_ids(tmp_path / "img.png", "What stain is this?", **GEN), out)
    run = m.save_pretrained(tmp_path / "run")
    assert (run / "encoder.safetensors").is_file()
    assert torch.equal(load_model(run, device="cpu").generate_ids(image, "What stain is this?", **GEN), out)
