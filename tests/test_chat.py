"""Chat that answers the question asked: the router, exact case facts, refusals, the differential the
report reads, next steps from the marker rules, streaming; the shipped model on the issue's questions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathvlm.case import AncillaryResult, Case, SlideRef
from pathvlm.chat import ChatAssistant, ChatConfig, case_facts, route_question
from pathvlm.data import dialogue as dlg
from pathvlm.model import ModelConfig, build_model
from pathvlm.reports.tables import ENTITY_PANELS
from tests.test_vlm import TINY_LLM

ISSUE = {"describe": "Describe the growth pattern in this image.",
         "next_steps": "What would you do next to confirm the diagnosis?",
         "facts": "Which slide shows the immunostain?"}


@pytest.mark.parametrize("question,kind,detail", [
    (ISSUE["describe"], "describe", "growth_pattern"),
    (ISSUE["next_steps"], "next_steps", None),
    (ISSUE["facts"], "facts", "immunostain"),
    ("What do you see on this slide?", "describe", None),
    ("Which stains would help here?", "next_steps", None),
    ("What stains were done?", "facts", "stains"),
    ("Was cyclin D1 done?", "facts", "marker_result"),
    ("Is there a Ki-67 slide?", "facts", "marker_slide"),
    ("Which part is slide A2 from?", "facts", "parts"),
    ("Which ancillary results are available?", "facts", "results"),
    ("What is the prognosis?", "out_of_scope", "prognosis"),
    ("Should we give R-CHOP?", "out_of_scope", "treatment"),
    ("What is the patient's name?", "out_of_scope", "identity"),
    ("What Ann Arbor stage is this?", "out_of_scope", "clinical"),
    ("And the second most likely?", "followup", "second"),
    ("Why not follicular lymphoma?", "followup", "why_not"),
    ("How would you tell these two apart?", "next_steps", "separate"),
    ("Is this a lymphoma?", "classify", None),
    ("What is in the zoomed region?", "region", None),
    ("Is there enough tissue to assess?", "adequacy", None),
    ("Which option best describes this image?\nA. x\nB. y\nAnswer with the option and its letter.", "closed", None),
    ("Does this image show FL? Say what it shows, then answer yes or no.", "closed", None),
])
def test_router_sends_each_question_to_its_type(question, kind, detail):
    route = route_question(question, [{"role": "assistant", "content": "Most consistent with ..."}], ["A1", "A2"])
    assert (route.kind, route.detail) == (kind, detail)


def test_router_reads_every_training_template_as_its_own_type():
    want = {"describe": "describe", "growth_pattern": "describe", "cell_size": "describe", "cytology": "describe",
            "classify": "classify", "next_steps": "next_steps", "region": "region", "adequacy": "adequacy",
            "second": "followup", "why_not": "followup", "separate": "next_steps"}
    for key, questions in dlg.QUESTIONS.items():
        for q in questions:
            text = q.format(subject="lymph node biopsy", name="mantle cell lymphoma")
            assert route_question(text, [{"role": "assistant", "content": "x"}]).kind == want[key], text
    for kind, (questions, _) in dlg.OUT_OF_SCOPE.items():
        for q in questions:
            assert (route_question(q).kind, route_question(q).detail) == ("out_of_scope", kind), q
    for kind, questions in dlg.FACT_QUESTIONS.items():
        for q in questions:
            r = route_question(q.format(marker="CD5", slide="A1"), slide_names=["A1"])
            assert (r.kind, r.detail) == ("facts", kind), q


# -- with a tiny random model (structure and honesty, not quality) ------------------------------
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(encoder="openclip:pathvlm-tiny", n_tokens=4, hidden_dim=32, llm_config=TINY_LLM,
                                   max_case_tokens=8, tile_mpp=4.0, tile_size=64))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("chat_imgs")
    rng = np.random.default_rng(0)
    out = []
    for i in range(4):
        path = root / f"field{i}.png"
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(path)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def case(images, ihc_png) -> Case:
    return Case(id="c1", slides=[SlideRef(path=images[0], stain="H&E", part="A"),
                                 SlideRef(path=ihc_png, stain="IHC:cyclin D1", part="A")],
                clinical={"specimen_type": "Lymph node(s)"},
                ancillary_results=[AncillaryResult(test="IHC", target="CD5", result="positive"),
                                   AncillaryResult(test="IHC", target="CD23", result="negative")])


def _no_llm(monkeypatch, model):
    def boom(*a, **k):
        raise AssertionError("the LLM was asked")
    monkeypatch.setattr(model, "generate_ids", boom)


def test_case_facts_come_from_the_manifest_not_the_pixels(model, case, monkeypatch):
    _no_llm(monkeypatch, model)
    monkeypatch.setattr("pathvlm.model.inputs.resolve_inputs", lambda *a, **k: pytest.fail("pixels read"))
    assert model.ask(case, ISSUE["facts"]) == "The immunostain or special stain is ihc (IHC:cyclin D1, part A)."
    assert model.ask(case, "What is the CD23 result?") == "CD23 negative (IHC), as entered in the case."
    assert model.ask(case, "Was CD10 done?") == "No CD10 result has been entered for this case."
    assert model.ask(case, "How many slides are there?").startswith("The case has 2 slides: field0 (H&E, part A)")
    pieces = list(model.stream(case, "Which slide is the H&E?"))
    assert len(pieces) > 3 and "".join(pieces) == "The H&E slide is field0 (H&E, part A)."
    assert model.last_attention == []


def test_out_of_scope_is_refused_and_text_only_prompts_are_not_routed(model, images, monkeypatch):
    assert model.ask(images[0], "How should this patient be treated?") == dlg.refusal("treatment")
    asked = []
    monkeypatch.setattr(model, "generate_ids", lambda *a, **k: asked.append(a) or torch.zeros(1, 1, dtype=torch.long))
    model.ask(None, "What is the prognosis?")  # report narratives ask with no input
    model.ask(images[0], "What is the prognosis?", route=False)
    assert len(asked) == 2


def test_chat_top_entity_is_the_report_top_entity(model, images, case):
    assistant = ChatAssistant(model, ChatConfig(domain="lymphoma"))
    for inp, c in [*((p, None) for p in images), (case, None)]:
        report = model.draft_report(inp, "lymphoma", case=c)
        reply = assistant.reply(inp, "What is the most likely diagnosis?", case=c)
        top = report.morphologic_differential[0].entity
        assert reply.differential[0][0] == top
        assert model.last_attention and model.last_attention[0]["attention"].numel()  # for the app's tiles
        assert reply.text.startswith(f"Most consistent with {top} (")
        assert "Morphologic impression only: confirm with" in reply.text


def test_next_steps_separate_the_report_top_two(model, images, case):
    assistant = ChatAssistant(model, ChatConfig(domain="lymphoma"))
    for inp in (images[1], case):
        diff = model.draft_report(inp, "lymphoma").morphologic_differential
        text = assistant.reply(inp, ISSUE["next_steps"]).text
        a, b = diff[0].entity, diff[1].entity
        assert text.startswith(f"To separate {a} from {b}:") or "already cover" in text
        entered = {r.target for r in case_facts(inp).results}
        markers = [m for m, _, _ in dlg.separating_tests(a, b) if m not in entered]
        assert not markers or any(f"{m} (" in text for m in markers)
    assert "Already entered: CD5 positive (IHC); CD23 negative (IHC)." in assistant.reply(case, ISSUE["next_steps"]).text


def test_follow_ups_read_the_same_differential(model, images):
    assistant = ChatAssistant(model, ChatConfig(domain="lymphoma"))
    first = assistant.reply(images[2], "What is your differential diagnosis?")
    history = [{"role": "user", "content": "What is your differential diagnosis?"},
               {"role": "assistant", "content": first.text}]
    (top, _), (second, p2) = first.differential[:2]
    assert assistant.reply(images[2], "And the second most likely?", history).text.startswith(
        f"The second most likely is {second} at {p2:.0%}")
    other = next(e for e in ENTITY_PANELS if e not in (top,) and e in dict(first.differential))
    why = assistant.reply(images[2], f"Why not {other}?", history).text
    assert why.startswith(f"{other} is less likely here: the field looks more like {top}")
    assert assistant.reply(images[2], "Why not a unicorn?", history).text.startswith("unicorn is not among")


def test_closed_questions_about_scored_classes_follow_the_scores_in_any_option_order(model, images, monkeypatch):
    from pathvlm.data.questions import mc_question, parse_choice, parse_yesno, yesno_question

    _no_llm(monkeypatch, model)  # decided by the scores: the LLM is never asked
    assistant = ChatAssistant(model)
    for image in images[:2]:
        ranked = assistant.reply(image, "What is the most likely diagnosis of this lymphoma?").differential
        prob = dict(ranked)
        entities = [e for e, _ in ranked[:4]][::-1]  # the best last
        best = max(entities, key=lambda e: prob[e])
        picks = set()
        for shift in range(len(entities)):  # every option order names the same entity
            options = entities[shift:] + entities[:shift]
            answer = model.ask(image, mc_question(options))
            i = parse_choice(answer, options)
            assert answer == f"{options[i]} ({'ABCD'[i]}).", answer
            picks.add(options[i])
        assert picks == {best}
        top = ranked[0][0]
        assert parse_yesno(model.ask(image, yesno_question(top))) is True
        other = next(e for e in entities if e != top)
        no = model.ask(image, yesno_question(other))
        assert parse_yesno(no) is False and no.startswith(f"The image shows {top}")
    # colorectal tissue options (prompt-set names) are scored by the tissue head
    tissue = ["adipose tissue", "mucus", "smooth muscle", "colorectal adenocarcinoma epithelium"]
    reply = assistant.reply(images[0], mc_question(tissue))
    assert reply.domain == "tissue" and reply.route.detail == "scores"
    prob = dict(reply.differential)
    keys = ["ADI", "MUC", "MUS", "TUM"]
    assert reply.text.startswith(tissue[max(range(4), key=lambda i: prob[keys[i]])])


def test_closed_questions_about_anything_else_go_to_the_model(model, images):
    assert model.chat.reply(images[0], "Is there necrosis? Answer yes or no.").text is None
    assert model.chat.reply(images[0], "Which is present?\nA. mitoses\nB. granulomas").text is None


def test_describe_goes_to_the_model_and_streams(model, images):
    pieces = list(model.stream(images[3], ISSUE["describe"], max_new_tokens=6, min_new_tokens=6))
    assert len(pieces) >= 1 and model.last_attention  # the slide was looked at
    assert model.chat.reply(images[3], ISSUE["describe"]).text is None


def test_app_slide_inputs_give_facts_by_name_and_stain(model, images):
    from pathvlm.model.inputs import resolve_inputs

    inputs = resolve_inputs(images[:2], model.encoder, model.transform)
    inputs[1].stain = "IHC:CD20"
    facts = case_facts(inputs)
    assert [s.label() for s in facts.slides] == ["field0 (H&E)", "field1 (IHC:CD20)"]
    assert model.ask(inputs, "Which slide is stained for CD20?") == "CD20 is on slide field1 (IHC:CD20)."


# -- the shipped model ------------------------------------------------------------------------
@pytest.mark.llm
@pytest.mark.slow
def test_shipped_model_answers_the_issue_questions_in_their_own_form(shared_data, ihc_png):
    import pathvlm
    from pathvlm.case import load_case
    from pathvlm.resources import resource_file

    case = load_case(resource_file("cases", "lymphoma_case"))  # the issue's case, as shipped
    image = case.slides[0].path
    model = pathvlm.load_model("demo")
    describe = model.ask(image, ISSUE["describe"], max_new_tokens=48)
    assert not describe.startswith(("To separate", "Most consistent", "I can't"))
    assert any(w in describe.lower() for w in ("growth", "diffuse", "nodular", "follic", "sheets", "pattern"))
    steps = model.ask(image, ISSUE["next_steps"])
    diff = model.draft_report(image, "lymphoma").morphologic_differential
    a, b = diff[0].entity, diff[1].entity
    assert steps.startswith(f"To separate {a} from {b}:")
    assert any(f"{m} (" in steps for m, _, _ in dlg.separating_tests(a, b))
    assert model.ask(case, ISSUE["facts"]) == "The immunostain or special stain is ihc (IHC:cyclin D1, part A)."


def test_auto_domain_is_lymphoma_when_the_lymphoma_prompts_outscore_every_tissue_prompt(model):
    from pathvlm.scoring import HeadScores, SlideScores

    def slide(stain, lym_logits, crc_logits, crc_probs):
        s = SlideScores("s", stain, "s.png", np.zeros((1, 2)))
        s.heads["lymphoma_entity"] = HeadScores("lymphoma_entity", ["CLL", "FL", "MCL"], np.array(lym_logits),
                                                np.full(3, 1 / 3), np.zeros((1, 3)), True)
        s.heads["crc_tissue"] = HeadScores("crc_tissue", ["DEB", "LYM", "TUM"], np.array(crc_logits),
                                           np.array(crc_probs), np.zeros((1, 3)), True)
        return s

    chat = model.chat
    # a lymphoma field read as "debris" by the tissue head alone: the joint zero-shot says lymphoid
    lymphoma_image = slide("H&E", [9.0, 8.0, 7.0], [8.5, 8.0, 1.0], [0.5, 0.4, 0.1])
    assert chat._lymphoid([lymphoma_image])
    crc_tile = slide("H&E", [5.0, 4.0, 3.0], [2.0, 1.0, 9.0], [0.1, 0.1, 0.8])
    assert not chat._lymphoid([crc_tile])
    assert chat._lymphoid([slide("H&E", [1.0, 1.0, 1.0], [2.0, 9.0, 1.0], [0.1, 0.8, 0.1])])  # lymphoid tissue
    # averaged over the H&E slides; an immunostain does not vote
    assert not chat._lymphoid([crc_tile, lymphoma_image])  # margins -4 and +0.5
    assert not chat._lymphoid([crc_tile, slide("IHC:CD20", [99.0, 0, 0], [0, 0, 0], [1 / 3] * 3)])


def test_a_question_naming_colorectal_tissue_keeps_the_tissue_domain(model):
    chat = model.chat
    assert chat._domain("Which colorectal tissue category does this image show?", None, None) == "tissue"
    assert chat._domain("What tissue type is this?", None, None) == "tissue"
    assert chat._domain("Is this follicular lymphoma?", None, None) == "lymphoma"  # the entity wins
    assert chat._domain("What do you see?", None, None) == "auto"  # else the scores decide
