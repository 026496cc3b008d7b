"""Chat question types in the instruction data: balance, exact case facts, follow-ups, marker logic."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from pathvlm.data import BuildConfig, build_datasets, load_class_set, read_conversations
from pathvlm.data import dialogue as dlg
from pathvlm.data.conversations import CHAT_TYPES, types_for_image
from pathvlm.errors import ConfigError
from tests.test_data_builders import CRC_YAML, LYMPHOMA_YAML, _index


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("chat")
    index = _index(tmp / "imgs", specimens=4, per_specimen=4)
    build_datasets(index, tmp / "out", BuildConfig(classes=str(LYMPHOMA_YAML)))
    return [r for p in sorted((tmp / "out").glob("instruct_*.jsonl")) for r in read_conversations(p)]


def test_each_image_gets_the_chat_window_and_types_are_balanced(records):
    by_image = collections.defaultdict(list)
    for r in records:
        by_image[r["image"]].append(r["task"])
    cfg = BuildConfig()
    for tasks in by_image.values():
        assert sum(t in CHAT_TYPES for t in tasks) == cfg.chat_per_image
        assert len(tasks) == cfg.chat_per_image + 2 * cfg.closed_per_image
    counts = collections.Counter(r["task"] for r in records if r["task"] in CHAT_TYPES)
    assert set(counts) == set(CHAT_TYPES)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert types_for_image(3, ("describe", "mc"), 5) == ["describe"]


def test_case_fact_answers_are_exactly_the_case(records):
    facts = [r for r in records if r["task"] == "facts"]
    assert facts
    for r in facts:
        case = dlg.CaseFacts.from_dict(r["case"])
        answer = r["messages"][1]["content"]
        assert answer == dlg.fact_answer(r["kind"], case, marker=r["marker"], slide=r["asked_slide"])
        assert r["messages"][0]["content"].split("\n")[1] == dlg.case_preamble(case)
        # every slide the answer names is one of the case's
        words = answer.replace("cyclin D1", "").split()
        named = {w.strip(".,;:()") for w in words} & {f"{p}{i}" for p in "ABCD" for i in range(1, 6)}
        assert named <= {s.name for s in case.slides}


def test_fact_answers_name_the_right_slide_stain_and_result():
    case = dlg.CaseFacts([dlg.SlideFact("A1", "H&E", "A"), dlg.SlideFact("A2", "IHC:cyclin D1", "A"),
                          dlg.SlideFact("B1", "H&E", "B", "lymph_node")],
                         [dlg.ResultFact("IHC", "CD5", "positive"), dlg.ResultFact("IHC", "Ki-67", "value", 20)])
    assert dlg.fact_answer("immunostain", case) == "The immunostain or special stain is A2 (IHC:cyclin D1, part A)."
    assert "A1 (H&E, part A) and B1 (H&E, part B, lymph node)" in dlg.fact_answer("he", case)
    assert dlg.fact_answer("marker_result", case, marker="cd5") == "CD5 positive (IHC), as entered in the case."
    assert dlg.fact_answer("marker_result", case, marker="CD10").startswith("No CD10 result has been entered")
    assert "A2" in dlg.fact_answer("marker_result", case, marker="cyclin D1")  # slide there, no result
    assert dlg.fact_answer("parts", case, slide="B1") == "Slide B1 is from part B."
    assert dlg.fact_answer("slides", case).startswith("The case has 3 slides:")


def test_follow_ups_refer_to_the_first_answer(records):
    classes = load_class_set(LYMPHOMA_YAML)
    follow = [r for r in records if r["task"] == "followup"]
    assert {r["kind"] for r in follow} == {"second", "why_not", "separate"}
    for r in follow:
        msgs = r["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
        top, second = (classes.get(lab) for lab in r["differential"][:2])
        assert msgs[1]["content"].startswith(f"Most consistent with {top.name};")
        assert "<slide>" not in msgs[2]["content"]
        if r["kind"] == "second":
            assert msgs[3]["content"].startswith(f"The second most likely is {second.name}")
        elif r["kind"] == "why_not":
            asked = classes.get(r["asked"]).name
            assert asked in msgs[2]["content"] and msgs[3]["content"].lower().startswith(asked.lower())
        else:
            markers = {m for m, _, _ in dlg.separating_tests(dlg.entity_of(top.label), dlg.entity_of(second.label))}
            assert any(m in msgs[3]["content"] for m in markers)


def test_refusals_descriptions_and_adequacy_take_their_own_form(records):
    for r in records:
        answer = r["messages"][-1]["content"]
        if r["task"] == "out_of_scope":
            assert answer == dlg.refusal(r["kind"])
        elif r["task"] == "describe" and r["aspect"]:
            assert answer.startswith(dlg.ASPECTS[r["aspect"]] + ":")
        elif r["task"] == "region":
            assert answer.startswith("In the zoomed region:")
        elif r["task"] == "adequacy":
            assert answer.startswith("Adequate")  # every lymphoma class is lesional tissue


def test_separating_tests_follow_the_marker_rules():
    mcl, cll, fl = (dlg.entity_of(x) for x in ("MCL", "CLL", "follicular lymphoma"))
    assert fl == "Follicular lymphoma"
    rows = {m: (a, b) for m, a, b in dlg.separating_tests(mcl, cll)}
    assert rows["cyclin D1"] == ("positive", "negative") and rows["CD23"] == ("negative", "positive")
    assert "CD5" not in rows  # both CD5 positive
    assert "BCL2" not in {m for m, _, _ in dlg.separating_tests(fl, mcl)}  # both BCL2 positive
    text = dlg.next_steps_answer(["MCL", "CLL"], [dlg.ResultFact("IHC", "cyclin D1", "positive")])
    assert text.startswith("To separate Mantle cell lymphoma from Chronic lymphocytic")
    assert "Already entered: cyclin D1 positive (IHC)." in text
    assert "cyclin D1 (" not in text  # an entered result is not suggested again
    assert dlg.next_steps_answer(["TUM"], fallback="MMR IHC").startswith("Next steps: MMR IHC.")


def test_class_file_chat_keys_are_checked(tmp_path):
    crc = load_class_set(CRC_YAML)
    assert crc.get("BACK").adequacy == "Inadequate" and crc.get("TUM").next_steps
    assert load_class_set(LYMPHOMA_YAML).get("MCL").feature("growth_pattern")
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"classes": {"X": {"name": "x", "captions": ["c"], "adequacy": "fine"}}}))
    with pytest.raises(ConfigError, match="adequacy"):
        load_class_set(bad)
    bad.write_text(json.dumps({"classes": {"X": {"name": "x", "captions": ["c"], "features": ["a"]}}}))
    with pytest.raises(ConfigError, match="features"):
        load_class_set(bad)


def test_crc_build_covers_every_type(tmp_path):
    index = _index(tmp_path / "imgs", labels=("TUM", "BACK", "ADI"), specimens=3, per_specimen=3)
    build_datasets(index, tmp_path / "out", BuildConfig(classes=str(CRC_YAML), chat_per_image=8))
    recs = [r for p in sorted((tmp_path / "out").glob("instruct_*.jsonl")) for r in read_conversations(p)]
    steps = {r["label"]: r["messages"][1]["content"] for r in recs if r["task"] == "next_steps"}
    assert "mismatch repair" in steps["TUM"] and "no ancillary test" in steps["ADI"]
    adequacy = {r["label"]: r["messages"][1]["content"] for r in recs if r["task"] == "adequacy"}
    assert adequacy["BACK"].startswith("Inadequate") and adequacy["TUM"].startswith("Adequate")
    assert Path(recs[0]["image"]).is_file()
