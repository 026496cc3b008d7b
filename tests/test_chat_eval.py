"""`pathvlm eval chat` on a tiny random model: every type is asked and checked, the checks can fail,
JSON + Markdown + answers are written, and the chat's top entity is the report's on every image."""

from __future__ import annotations

import json

import pytest

from pathvlm.chat.assistant import Reply
from pathvlm.chat.router import Route
from pathvlm.data import BuildConfig, build_datasets
from pathvlm.data import dialogue as dlg
from pathvlm.eval.chat_eval import (
    ChatEvalConfig,
    Item,
    Reference,
    check,
    fact_expectations,
    run_chat_eval,
)
from tests.test_chat import model  # noqa: F401  (the tiny random chat model fixture)
from tests.test_data_builders import LYMPHOMA_YAML, _index


@pytest.fixture(scope="module")
def val_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat_eval")
    index = _index(tmp / "imgs", specimens=2, per_specimen=2)
    build_datasets(index, tmp / "out", BuildConfig(classes=str(LYMPHOMA_YAML), val_fraction=0.5, chat_per_image=8))
    return tmp / "out" / "instruct_val.jsonl"


def test_eval_chat_scores_every_type_and_writes_its_files(model, val_file, tmp_path):  # noqa: F811 (fixture)
    cfg = ChatEvalConfig(per_type=3, cases=(), max_new_tokens=4, n_boot=50)
    result = run_chat_eval(model, [str(val_file)], cfg, {"model": "tiny"}, tmp_path / "chat.json")
    per = result["per_type"]
    assert set(per) == set(dlg.QUESTION_TYPES)
    # routed types are decided by the case, the rules and the scores: exact even with random weights
    for t in ("facts", "out_of_scope", "next_steps", "classify", "followup"):
        assert per[t]["accuracy"] == 1.0, (t, per[t])
        assert per[t]["routed_as_asked"] == 1.0
    assert per["facts"]["ci95"][0] <= per["facts"]["accuracy"] <= per["facts"]["ci95"][1]
    agreement = result["top_entity_agreement"]
    assert agreement["n"] > 0 and agreement["agree"] == agreement["n"]
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["per_type"]["facts"]["n"] == 3
    assert "| facts | 3 |" in (tmp_path / "chat.md").read_text()
    answers = [json.loads(line) for line in (tmp_path / "chat_answers.jsonl").read_text().splitlines()]
    assert len(answers) == result["n"] and all("ok" in a for a in answers)


def test_checks_fail_wrong_answers(model, val_file):  # noqa: F811 (fixture)
    facts = dlg.CaseFacts([dlg.SlideFact("A1"), dlg.SlideFact("A2", "IHC:CD5", "A")],
                          [dlg.ResultFact("IHC", "CD5", "positive")])
    assert fact_expectations("immunostain", facts, None, None) == ["A2"]
    assert fact_expectations("marker_result", facts, "CD10", None) == ["No CD10 result"]
    ref = Reference(model)
    item = Item("facts", "immunostain", "x.png", "Which slide shows the immunostain?", case=facts)
    route = Route("facts", "immunostain")
    assert check(item, "The immunostain is A2 (IHC:CD5, part A).", Reply(route, "x"), ref, model)["ok"]
    assert not check(item, "The immunostain is A1.", Reply(route, "x"), ref, model)["ok"]
    refusal = Item("out_of_scope", "prognosis", "x.png", "What is the prognosis?")
    assert check(refusal, dlg.refusal("prognosis"), Reply(Route("out_of_scope", "prognosis")), ref, model)["ok"]
    assert not check(refusal, "Most consistent with Follicular lymphoma.", Reply(Route("classify")), ref, model)["ok"]
    image = json.loads(val_file.read_text().splitlines()[0])["image"]
    reply = model.chat.reply(image, "What is the most likely lymphoma?")
    item = Item("classify", None, image, "What is the most likely lymphoma?")
    assert check(item, reply.text, reply, ref, model)["ok"]
    other = next(e for e, _ in reply.differential[1:])
    wrong = Reply(reply.route, domain="lymphoma", differential=[(other, 0.9)])
    assert not check(item, f"Most consistent with {other}.", wrong, ref, model)["ok"]


def test_adequacy_check_reads_the_verdict_and_catches_another_entity(model, val_file):  # noqa: F811
    ref = Reference(model)
    image = json.loads(val_file.read_text().splitlines()[0])["image"]
    item = Item("adequacy", None, image, "Is the sample adequate?", meta={"adequacy": "Adequate"})
    route = Route("adequacy")
    domain = model.chat.scores(image, None, item.question)[0]
    ranked = ref.ranked(item, domain)
    top, other = ranked[0][0], ranked[1][0]
    trained = dlg.adequacy_answer("Adequate", top, None, {})  # "Adequate for a morphologic impression: ..."
    assert check(item, trained, Reply(route, trained), ref, model)["ok"]
    wrong_entity = dlg.adequacy_answer("Adequate", other, None, {})
    result = check(item, wrong_entity, Reply(route, wrong_entity), ref, model)
    assert result["form"] and result["contradicts"] and not result["ok"]
    limited = dlg.adequacy_answer("Limited", top, None, {})
    assert not check(item, limited, Reply(route, limited), ref, model)["ok"]
