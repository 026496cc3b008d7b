"""Eval metrics against scikit-learn, ECE and bootstrap by hand, dataset loaders, VQA scoring."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pathvlm.data.questions import letter_agrees
from pathvlm.errors import ConfigError
from pathvlm.eval.common import Perturbation
from pathvlm.eval.datasets import load_csv, load_dataset, load_image_folder, match_classes
from pathvlm.eval.metrics import (
    balanced_accuracy,
    bootstrap_ci,
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    metric_cis,
    paired_difference_ci,
    per_class_recall,
    save_confusion_png,
    weighted_f1,
)
from pathvlm.eval.vqa import VQAConfig, parse_choice, parse_yesno, run_vqa_eval
from pathvlm.zeroshot import make_prompt_set


@pytest.fixture
def fixed_labels():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 4, 60)
    y_pred = np.where(rng.random(60) < 0.6, y_true, rng.integers(0, 4, 60))
    y_pred[y_pred == 3] = 2  # class 3 is never predicted: precision edge case
    return y_true, y_pred


def test_metrics_match_sklearn(fixed_labels):
    from sklearn import metrics as skm

    y_true, y_pred = fixed_labels
    cm = confusion_matrix(y_true, y_pred, 4)
    assert (cm == skm.confusion_matrix(y_true, y_pred, labels=range(4))).all()
    assert balanced_accuracy(cm) == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    assert weighted_f1(cm) == pytest.approx(
        skm.f1_score(y_true, y_pred, average="weighted", zero_division=0)
    )
    assert per_class_recall(cm) == pytest.approx(skm.recall_score(y_true, y_pred, average=None))
    m = classification_metrics(y_true, y_pred, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred)) and m["n"] == 60


def test_balanced_accuracy_ignores_classes_absent_from_truth():
    cm = confusion_matrix([0, 0, 1], [0, 2, 1], 3)
    assert balanced_accuracy(cm) == pytest.approx(0.75)
    assert np.isnan(per_class_recall(cm)[2])


def test_ece_hand_case():
    # bin (0.8, 0.867]: two samples at 0.85 confidence, one right -> |0.5 - 0.85| * 2/4
    # bin (0.533, 0.6]: two at 0.6, both right -> |1 - 0.6| * 2/4  => ECE = 0.175 + 0.2
    probs = np.array([[0.85, 0.15], [0.85, 0.15], [0.4, 0.6], [0.6, 0.4]])
    y = np.array([0, 1, 1, 0])
    assert expected_calibration_error(probs, y, n_bins=15) == pytest.approx(0.375)
    assert expected_calibration_error(np.eye(3), [0, 1, 2]) == pytest.approx(0.0)


def test_bootstrap_contains_point_estimate(fixed_labels):
    y_true, y_pred = fixed_labels
    point = balanced_accuracy(confusion_matrix(y_true, y_pred, 4))
    cis = metric_cis(y_true, y_pred, 4, n_boot=300)
    lo, hi = cis["balanced_accuracy"]
    assert lo < point < hi and hi - lo < 0.5
    groups = [f"s{i // 6}" for i in range(60)]
    glo, ghi = metric_cis(y_true, y_pred, 4, groups=groups, n_boot=300)["accuracy"]
    assert glo <= np.mean(y_true == y_pred) <= ghi
    assert bootstrap_ci(lambda idx: 1.0, 10, n_boot=20) == (1.0, 1.0)


def test_paired_difference_ci_is_of_the_difference(fixed_labels):
    y_true, y_pred = fixed_labels
    assert paired_difference_ci(y_true, y_pred, y_pred, 4, n_boot=50) == (0.0, 0.0, 0.0)
    better = y_pred.copy()
    wrong = np.flatnonzero(better != y_true)[:3]
    better[wrong] = y_true[wrong]  # three errors mended, nothing else changed
    diff, lo, hi = paired_difference_ci(y_true, y_pred, better, 4, n_boot=300)
    cm = confusion_matrix
    assert diff == pytest.approx(balanced_accuracy(cm(y_true, better, 4)) - balanced_accuracy(cm(y_true, y_pred, 4)))
    # every resample scores both on the same items, so it can never show the mended one as worse;
    # two unpaired intervals of ~0.25 each would both straddle the other's figure
    assert 0 <= lo <= diff <= hi < 0.2
    rlo, rhi = paired_difference_ci(y_true, better, y_pred, 4, n_boot=300)[1:]
    assert (rlo, rhi) == pytest.approx((-hi, -lo))
    with pytest.raises(ValueError, match="length"):
        paired_difference_ci(y_true, y_pred[:-1], y_pred, 4)


def test_confusion_png(tmp_path):
    out = save_confusion_png(np.array([[3, 1], [0, 4]]), ["x", "y"], tmp_path / "cm.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100


def _image_tree(root, spec):
    for cls, n in spec.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / cls / f"{cls}_{i}.png")


def test_folder_and_csv_loaders(tmp_path):
    _image_tree(tmp_path / "d", {"TUM": 2, "adipose tissue": 3})
    ds = load_image_folder(tmp_path / "d")
    assert len(ds) == 5 and ds.classes == ["TUM", "adipose tissue"] and ds.specimens is None
    csv_path = tmp_path / "d" / "index.csv"
    csv_path.write_text(
        "path,label,specimen,split\nTUM/TUM_0.png,TUM,s1,train\nTUM/TUM_1.png,TUM,s2,val\n"
        "adipose tissue/adipose tissue_0.png,ADI,s3,val\n"
    )
    val = load_dataset(csv_path, split="val")
    assert [p.name for p in val.paths] == ["TUM_1.png", "adipose tissue_0.png"]
    assert val.specimens == ["s2", "s3"] and val.labels == ["TUM", "ADI"]
    with pytest.raises(ConfigError, match="no rows"):
        load_csv(csv_path, split="test")
    (tmp_path / "bad.csv").write_text("path,label\nnope.png,TUM\n")
    with pytest.raises(ConfigError, match="line 2: image .*nope.png not found"):
        load_csv(tmp_path / "bad.csv")
    with pytest.raises(ConfigError, match="no class sub-folders"):
        load_image_folder(tmp_path / "d" / "TUM")


def test_match_classes_by_key_or_synonym_case_insensitive():
    ps = make_prompt_set(
        {
            "ADI": ["adipose tissue", "ADI"],
            "TUM": ["colorectal adenocarcinoma", "TUM"],
            "STR": ["stroma"],
        }
    )
    assert match_classes(["tum", "Adipose_Tissue", "STR"], ps) == {
        "tum": "TUM",
        "Adipose_Tissue": "ADI",
        "STR": "STR",
    }
    with pytest.raises(ConfigError, match=r"\['MUC'\] match no class"):
        match_classes(["MUC", "TUM"], ps)


def test_perturbation_keeps_size_and_is_seeded():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
    for factor in (0.75, 1.5):
        out = Perturbation(scale=factor)(im)
        assert out.size == im.size and not np.array_equal(np.asarray(out), np.asarray(im))
    a = np.asarray(Perturbation(stain_sigma=0.05, seed=1)(im, 3))
    b = np.asarray(Perturbation(stain_sigma=0.05, seed=1)(im, 3))
    c = np.asarray(Perturbation(stain_sigma=0.05, seed=1)(im, 4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_parse_answers():
    opts = ["adipose tissue", "mucus", "tumour"]
    assert parse_choice("B", opts) == 1
    assert parse_choice("(C) tumour", opts) == 2
    assert parse_choice("Answer: A.", opts) == 0
    assert parse_choice("a histology image of mucus", opts) == 1
    assert parse_choice("adipose tissue or tumour", opts) is None
    assert parse_choice("D", opts) is None
    assert parse_yesno("Yes, it does.") is True and parse_yesno("no") is False
    assert parse_yesno("maybe") is None
    # the trained answer formats: the name first, the letter or yes/no last
    assert parse_choice("tumour (C).", opts) == 2
    assert parse_choice("mucus (A).", opts) == 1  # the name decides over a mismatched letter
    assert parse_choice("something else (B).", opts) == 1
    assert parse_choice("something else (D).", opts) is None
    lymph = ["lymphoma", "follicular lymphoma", "mantle cell lymphoma"]
    assert parse_choice("follicular lymphoma (B).", lymph) == 1  # not also "lymphoma"
    assert parse_yesno("The image shows mucus, so the answer is no.") is False
    assert parse_yesno("The image shows mucus, so the answer is yes.") is True
    assert parse_yesno("The image shows mucus.") is None
    assert letter_agrees("mucus (B).", opts) is True and letter_agrees("mucus (C).", opts) is False
    assert letter_agrees("B", opts) is None and letter_agrees("something else (B).", opts) is None


class OracleChat:
    """Reads the class off the pixel colour (red or blue) and answers correctly."""

    def __init__(self):
        self.calls = []

    def ask(self, image, question, **gen):
        self.calls.append(gen)
        label = "red" if np.asarray(image)[0, 0, 0] > 100 else "blue"
        if question.startswith("Does this image show"):
            return "Yes" if label in question else "No"
        listed = question.split("? ", 1)[1]
        for letter in "ABCDEFGH":
            if f"{letter}) {label}." in listed:
                return letter
        return "?"


class AlwaysA:
    def ask(self, image, question, **gen):
        return "A" if "letter" in question else "yes"


def test_vqa_eval_oracle_and_position_biased(tmp_path):
    for cls, rgb in (("red", (220, 0, 0)), ("blue", (0, 0, 220))):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), rgb).save(tmp_path / "d" / cls / f"{i}.png")
    oracle = OracleChat()
    res = run_vqa_eval(
        oracle,
        tmp_path / "d",
        VQAConfig(n_orders=2),
        {"model": "oracle"},
        json_path=tmp_path / "out" / "vqa.json",
    )
    assert res["accuracy"] == 1.0 and res["option_order_consistency"] == 1.0
    assert np.isnan(res["mc_letter_matches_name"])  # letters only: nothing named to compare
    assert all(g["do_sample"] is False for g in oracle.calls)
    assert res["n_questions"] == 4 * (2 + 2)
    assert (tmp_path / "out" / "vqa.md").is_file() and (
        tmp_path / "out" / "vqa_answers.jsonl"
    ).is_file()
    biased = run_vqa_eval(AlwaysA(), tmp_path / "d", VQAConfig(n_orders=2), {"model": "a"})
    assert biased["option_order_consistency"] == 0.0
    assert biased["mc_accuracy"] == 0.5 and biased["yesno_accuracy"] == 0.5
    assert all("route" not in g for g in oracle.calls) and res["answered_by"].startswith("chat")
    llm = OracleChat()  # --llm-only: every question reaches the LLM (the chat's routing is off)
    alone = run_vqa_eval(llm, tmp_path / "d", VQAConfig(n_orders=2, route=False), {"model": "oracle"})
    assert all(g["route"] is False for g in llm.calls) and alone["answered_by"].startswith("LLM only")
    assert "route" not in alone["decoding"]


def test_training_monitor_reads_closed_answers_like_eval_vqa():
    from pathvlm.train.vlm_task import closed_correct

    yes = {"answer": "yes"}
    assert closed_correct("The image shows mucus, so the answer is yes.", yes) is True
    assert closed_correct("Yes.", yes) is True and closed_correct("No.", yes) is False
    mc = {"options": ["ADI", "MUC", "TUM"], "option_names": ["adipose tissue", "mucus", "tumour"],
          "answer_index": 1}
    assert closed_correct("mucus (B).", mc) is True
    assert closed_correct("tumour (B).", mc) is False  # the named option counts, not the letter
    assert closed_correct("B", {"options": ["ADI", "MUC"], "answer_index": 1}) is True  # older records
    assert closed_correct("anything", {"messages": []}) is None
