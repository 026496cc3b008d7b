"""Data builders and format readers: specimen-disjoint splits, balanced yes/no, shuffled MC, CLI."""

from __future__ import annotations

import collections
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathvlm.cli import main
from pathvlm.data import (
    BuildConfig,
    build_datasets,
    load_class_set,
    read_conversations,
    read_jsonl,
    read_mil_csv,
    read_pairs,
)
from pathvlm.data.builders import TASKS
from pathvlm.data.conversations import CHAT_TYPES
from pathvlm.data.questions import mc_question, parse_choice, parse_yesno
from pathvlm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
LYMPHOMA_YAML = REPO / "configs" / "classes" / "lymphoma.yaml"
CRC_YAML = REPO / "configs" / "classes" / "crc_tissue.yaml"


def _index(tmp_path: Path, labels=("CLL", "FL", "MCL"), specimens=4, per_specimen=3, split=None) -> Path:
    """A generated index CSV: tiny PNGs, several per specimen, like the NIA lymphoma layout."""
    rng = np.random.default_rng(0)
    rows = []
    for label in labels:
        for s in range(specimens):
            for t in range(per_specimen):
                rel = f"{label}/{label}-{s}_{t}.png"
                (tmp_path / label).mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / rel)
                row = {"path": rel, "label": label, "specimen": f"{label}-{s}"}
                if split:
                    row["split"] = split(label, s)
                rows.append(row)
    path = tmp_path / "index.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _all_records(out: Path, prefix: str) -> list[dict]:
    return [r for p in sorted(out.glob(f"{prefix}_*.jsonl")) for r in read_jsonl(p)]


def test_drawn_splits_never_share_a_specimen_and_are_deterministic(tmp_path):
    index = _index(tmp_path / "imgs")
    cfg = BuildConfig(classes=str(LYMPHOMA_YAML), val_fraction=0.25, seed=3)
    build_datasets(index, tmp_path / "a", cfg)
    build_datasets(index, tmp_path / "b", cfg)
    for name in ("pairs_train.jsonl", "pairs_val.jsonl", "instruct_train.jsonl", "instruct_val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # the CLIP pairs do not depend on which instructions are built, or how many
    build_datasets(index, tmp_path / "c", BuildConfig(classes=str(LYMPHOMA_YAML), val_fraction=0.25, seed=3,
                                                      tasks=("mc",), closed_per_image=5))
    for name in ("pairs_train.jsonl", "pairs_val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name
    splits_of = collections.defaultdict(set)
    for rec in _all_records(tmp_path / "a", "pairs"):
        splits_of[rec["specimen"]].add(rec["split"])
        assert Path(rec["image"]).is_absolute() and Path(rec["image"]).is_file()
    assert all(len(s) == 1 for s in splits_of.values())
    val_specimens = {sp for sp, s in splits_of.items() if s == {"val"}}
    assert len(val_specimens) == 3  # one of four specimens per class
    build_datasets(index, tmp_path / "c", BuildConfig(classes=str(LYMPHOMA_YAML), val_fraction=0.25, seed=4))
    other = {r["specimen"] for r in read_jsonl(tmp_path / "c" / "pairs_val.jsonl")}
    assert other != val_specimens  # the seed matters


def test_index_split_is_kept_and_checked(tmp_path):
    index = _index(tmp_path / "imgs", split=lambda label, s: "val" if s == 0 else "train")
    summary = build_datasets(index, tmp_path / "out", BuildConfig(classes=str(LYMPHOMA_YAML)))
    assert summary["splits"]["val"]["images"] == 9 and summary["splits"]["train"]["images"] == 27
    leaky = _index(tmp_path / "leaky", split=lambda label, s: "val" if s == 0 else "train")
    text = leaky.read_text().replace("CLL/CLL-1_0.png,CLL,CLL-1,train", "CLL/CLL-1_0.png,CLL,CLL-1,val")
    leaky.write_text(text)
    with pytest.raises(ConfigError, match="CLL-1"):
        build_datasets(leaky, tmp_path / "out2", BuildConfig(classes=str(LYMPHOMA_YAML)))


def _region_index(tmp_path: Path, split_of=None) -> Path:
    """Two FL cases with two regions each (like sj-05-6124-R3/-R4) and two CLL cases."""
    rows = ["path,label,specimen" + (",split" if split_of else "")]
    for specimen, label in [("c1-R1", "FL"), ("c1-R2", "FL"), ("c2-R1", "FL"), ("c2-R2", "FL"),
                            ("c3-R1", "CLL"), ("c4-R1", "CLL")]:
        (tmp_path / label).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / label / f"{specimen}.png")
        rows.append(f"{label}/{specimen}.png,{label},{specimen}" + (f",{split_of(specimen)}" if split_of else ""))
    (tmp_path / "index.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "index.csv"


def test_case_pattern_keeps_regions_of_one_case_together(tmp_path):
    index = _region_index(tmp_path / "drawn")
    for seed in range(5):
        cfg = BuildConfig(classes=str(LYMPHOMA_YAML), val_fraction=0.5, seed=seed, tasks=(), case_pattern=r"^c\d+")
        build_datasets(index, tmp_path / "out", cfg)
        split_of_case = {}
        for rec in _all_records(tmp_path / "out", "pairs"):
            case = rec["specimen"].split("-")[0]
            assert split_of_case.setdefault(case, rec["split"]) == rec["split"], (seed, case)
    given = _region_index(tmp_path / "given", split_of=lambda sp: "val" if sp in ("c1-R2", "c3-R1") else "train")
    build_datasets(given, tmp_path / "ok", BuildConfig(classes=str(LYMPHOMA_YAML), tasks=()))  # by specimen: fine
    with pytest.raises(ConfigError, match="c1"):  # but c1-R1 and c1-R2 are one case
        build_datasets(given, tmp_path / "bad", BuildConfig(classes=str(LYMPHOMA_YAML), tasks=(), case_pattern=r"^c\d+"))


def test_multiple_choice_is_shuffled_named_first_and_repeated_per_image(tmp_path):
    index = _index(tmp_path / "imgs")  # 36 images
    build_datasets(index, tmp_path / "out", BuildConfig(classes=str(LYMPHOMA_YAML), tasks=("mc",), closed_per_image=3))
    records = _all_records(tmp_path / "out", "instruct")
    assert len(records) == 3 * 36
    classes = load_class_set(LYMPHOMA_YAML)
    positions, phrasings, orders = collections.Counter(), collections.Counter(), collections.defaultdict(set)
    for rec in records:
        assert rec["options"][rec["answer_index"]] == rec["label"]
        assert rec["option_names"] == [classes.get(label).name for label in rec["options"]]
        letter = "ABCD"[rec["answer_index"]]
        question, reply = rec["messages"][0]["content"], rec["messages"][1]["content"]
        # the class name first, then the letter: the reply names the right option
        assert reply == f"{classes.get(rec['label']).name} ({letter})."
        assert parse_choice(reply, rec["option_names"]) == rec["answer_index"]
        assert f"\n{letter}. " in question or f" {letter}) " in question
        positions[rec["answer_index"]] += 1
        phrasings[f" {letter}) " in question] += 1
        orders[rec["image"]].add(tuple(rec["options"]))
    assert len(positions) == 4 and max(positions.values()) < 0.5 * len(records)
    # the three records of an image mostly differ in their options or order
    assert sum(len(o) > 1 for o in orders.values()) >= 0.9 * len(orders)
    # both phrasings are trained, one of them the exact template `pathvlm eval vqa` asks in
    assert min(phrasings.values()) >= 0.25 * len(records)
    mc_eval = next(r for r in records if " A) " in r["messages"][0]["content"])
    assert mc_eval["messages"][0]["content"].endswith(mc_question(mc_eval["option_names"]))


def test_yes_no_is_balanced_truthful_and_names_the_class_first(tmp_path):
    index = _index(tmp_path / "imgs", per_specimen=3)  # 36 images
    classes = load_class_set(LYMPHOMA_YAML)
    for per_image in (1, 2, 3):
        build_datasets(index, tmp_path / f"out{per_image}",
                       BuildConfig(classes=str(LYMPHOMA_YAML), tasks=("yesno",), closed_per_image=per_image))
        records = _all_records(tmp_path / f"out{per_image}", "instruct")
        answers = collections.Counter(r["answer"] for r in records)
        assert len(records) == 36 * per_image
        assert answers["yes"] == answers["no"] == 18 * per_image
        for rec in records:
            reply = rec["messages"][1]["content"]
            assert reply.startswith(f"The image shows {classes.get(rec['label']).name},")
            assert parse_yesno(reply) is (rec["answer"] == "yes")


def test_every_task_passes_the_conversation_reader(tmp_path):
    index = _index(tmp_path / "imgs", specimens=2, per_specimen=1)
    build_datasets(index, tmp_path / "out", BuildConfig(classes=str(LYMPHOMA_YAML), tasks=TASKS, chat_per_image=8))
    records = [r for p in sorted((tmp_path / "out").glob("instruct_*.jsonl")) for r in read_conversations(p)]
    counts = collections.Counter(r["task"] for r in records)
    per_image = BuildConfig.closed_per_image
    assert counts == {"caption": 6, "open": 6, "report": 6, "yesno": 6 * per_image, "mc": 6 * per_image,
                      **{t: 6 for t in CHAT_TYPES}}
    report = next(r for r in records if r["task"] == "report" and r["label"] == "MCL")
    assert "cyclin D1" in report["messages"][1]["content"]  # entity needs ancillary confirmation


def test_folder_source_and_unknown_label(tmp_path):
    for label in ("TUM", "ADI"):
        (tmp_path / "f" / label).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (i * 40, 10, 10)).save(tmp_path / "f" / label / f"{i}.png")
    summary = build_datasets(tmp_path / "f", tmp_path / "out", BuildConfig(classes=str(CRC_YAML), val_fraction=0.2))
    assert summary["splits"]["val"]["images"] == 2  # one image per class
    (tmp_path / "f" / "XYZ").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "f" / "XYZ" / "0.png")
    with pytest.raises(ConfigError, match="XYZ"):
        build_datasets(tmp_path / "f", tmp_path / "out", BuildConfig(classes=str(CRC_YAML)))


def test_readers_resolve_relative_paths_and_reject_bad_records(tmp_path):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "imgs/a.png", "text": "fat"}) + "\n")
    assert read_pairs(tmp_path / "pairs.jsonl")[0]["image"] == str(tmp_path / "imgs" / "a.png")
    bad = {"image": "a.png", "messages": [{"role": "user", "content": "no token"}, {"role": "assistant", "content": "x"}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ConfigError, match="<slide>"):
        read_conversations(tmp_path / "chat.jsonl")
    (tmp_path / "mil.csv").write_text("slide_id,label\ns1,TUM\n")
    with pytest.raises(ConfigError, match="features"):
        read_mil_csv(tmp_path / "mil.csv")


def test_cli_build_check_and_bad_input(tmp_path, capsys):
    index = _index(tmp_path / "imgs", specimens=2, per_specimen=2)
    assert main(["data", "build", str(index), "--classes", str(LYMPHOMA_YAML), "-o", str(tmp_path / "out")]) == 0
    assert main(["data", "check", "instruct", str(tmp_path / "out" / "instruct_train.jsonl")]) == 0
    assert "valid records" in capsys.readouterr().out
    assert main(["data", "build", str(index), "--classes", str(LYMPHOMA_YAML), "-o", str(tmp_path / "one"),
                 "--closed-per-image", "1", "--tasks", "mc"]) == 0
    assert sum(1 for _ in _all_records(tmp_path / "one", "instruct")) == 12  # one per image
    assert main(["data", "build", str(tmp_path / "missing.csv"), "--classes", str(LYMPHOMA_YAML),
                 "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.csv" in err and len(err.splitlines()) == 1


def test_real_lymphoma_index_stays_specimen_disjoint(shared_data, tmp_path):
    index = shared_data / "lymphoma_nia" / "index.csv"
    if not index.exists():
        pytest.skip(f"{index} missing")
    summary = build_datasets(index, tmp_path / "out", BuildConfig(classes=str(LYMPHOMA_YAML), tasks=()))
    assert summary["splits"]["train"]["labels"] == summary["splits"]["val"]["labels"] == ["CLL", "FL", "MCL"]
    split_of = {}
    for rec in _all_records(tmp_path / "out", "pairs"):
        assert split_of.setdefault(rec["specimen"], rec["split"]) == rec["split"]


def test_each_image_gets_a_description_and_a_named_caption(tmp_path):
    index = _index(tmp_path / "imgs", specimens=2, per_specimen=2)
    classes = load_class_set(LYMPHOMA_YAML)
    build_datasets(index, tmp_path / "out", BuildConfig(classes=str(LYMPHOMA_YAML), val_fraction=0.5))
    by_image = collections.defaultdict(list)
    for rec in _all_records(tmp_path / "out", "pairs"):
        by_image[rec["image"]].append(rec)
    assert len(by_image) == 12
    for recs in by_image.values():
        label = recs[0]["label"]
        assert [r["label"] for r in recs] == [label, label]
        description, named = (r["text"] for r in recs)
        assert description in classes.get(label).captions
        assert named in classes.prompts(label)  # a class template with the name or a synonym
    build_datasets(index, tmp_path / "plain", BuildConfig(classes=str(LYMPHOMA_YAML), val_fraction=0.5,
                                                          named_captions=0))
    assert all(r["text"] in classes.get(r["label"]).captions for r in _all_records(tmp_path / "plain", "pairs"))


def test_multiple_choice_sizes_vary_from_two_to_all_classes(tmp_path):
    index = _index(tmp_path / "imgs")
    n_classes = len(load_class_set(LYMPHOMA_YAML).classes)
    build_datasets(index, tmp_path / "out", BuildConfig(classes=str(LYMPHOMA_YAML), tasks=("mc",), mc_options=0))
    records = _all_records(tmp_path / "out", "instruct")
    sizes = collections.Counter(len(r["options"]) for r in records)
    assert set(sizes) == set(range(2, n_classes + 1))
    for rec in records:
        assert rec["options"][rec["answer_index"]] == rec["label"] and len(set(rec["options"])) == len(rec["options"])


def test_cross_validation_folds_are_stratified_case_disjoint_and_seeded(tmp_path):
    from pathvlm.data.builders import IndexRow, assign_folds, read_index

    rows = read_index(_index(tmp_path / "imgs", specimens=5))
    folds = assign_folds(rows, 3, seed=1)
    by_case = collections.defaultdict(set)
    for row, fold in zip(rows, folds):
        by_case[row.specimen].add(fold)
    assert all(len(f) == 1 for f in by_case.values())  # a specimen never spans two folds
    for label in ("CLL", "FL", "MCL"):  # 5 specimens per label over 3 folds: 2, 2, 1
        per_fold = collections.Counter(next(iter(by_case[s])) for s in by_case if s.startswith(label))
        assert sorted(per_fold.values()) == [1, 2, 2]
    assert sorted(collections.Counter(folds).values()) == [15, 15, 15]  # the singles do not pile up
    assert folds == assign_folds(rows, 3, seed=1) and folds != assign_folds(rows, 3, seed=2)
    # a case pattern keeps two regions of one case in one fold
    regions = [IndexRow(f"/x/{i}.png", "FL", f"sj-1-R{i % 2}" if i < 4 else f"sj-{i}", None) for i in range(8)]
    fold_of = assign_folds(regions, 2, case_pattern=r"^sj-\d+")
    assert len(set(fold_of[:4])) == 1
    with pytest.raises(ConfigError, match="fewer than the 6 folds"):
        assign_folds(rows, 6)
    with pytest.raises(ConfigError, match="at least 2 folds"):
        assign_folds(rows, 1)
