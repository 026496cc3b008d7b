"""`pathvlm zeroshot` and `pathvlm eval ...` through the real CLI entry point, tiny encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathvlm.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = "encoder:openclip:pathvlm-tiny"
CRC_PROMPTS = str(REPO / "configs" / "prompts" / "crc_tissue.json")


def _synthetic(root: Path, n: int = 4) -> Path:
    """Two colour-coded classes named by prompt-file synonyms (case differs on purpose)."""
    rng = np.random.default_rng(0)
    for cls, base in (("tum", (150, 40, 120)), ("Adipose tissue", (240, 230, 235))):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            arr = np.clip(np.array(base) + rng.normal(0, 10, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


def _eval_zeroshot(data: Path, out: Path, *extra: str) -> int:
    """`pathvlm eval zeroshot` of the tiny encoder with the CRC prompt file."""
    return main(["-q", "eval", "zeroshot", "--data", str(data), "--prompts", CRC_PROMPTS,
                 "--model", TINY, "--json", str(out), *extra])


def test_eval_zeroshot_cli_writes_report(tmp_path, capsys):
    data = _synthetic(tmp_path / "data")
    out = tmp_path / "out" / "zs.json"
    rc = _eval_zeroshot(data, out, "--n-boot", "100", "--stain-jitter", "0.05")
    assert rc == 0
    res = json.loads(out.read_text())
    for key in (
        "balanced_accuracy",
        "weighted_f1",
        "per_class_recall",
        "n",
        "model",
        "prompts",
        "ece",
        "confusion_matrix",
        "ci95",
        "weights_hash",
    ):
        assert key in res, key
    assert res["n"] == 8 and res["model"] == TINY
    assert res["label_map"] == {"Adipose tissue": "ADI", "tum": "TUM"}
    assert res["competing_classes"] == ["ADI", "TUM"]  # only classes present in the data compete
    assert res["perturbation"]["stain_jitter"] == 0.05
    assert set(res["per_class_recall"]) == {"ADI", "TUM"}
    for name in ("zs.md", "zs_confusion.png", "zs_predictions.csv"):
        assert (out.parent / name).stat().st_size > 0
    assert "balanced_accuracy" in capsys.readouterr().out
    rc = _eval_zeroshot(data, tmp_path / "all.json", "--all-classes", "--n-boot", "20")
    assert rc == 0
    assert len(json.loads((tmp_path / "all.json").read_text())["competing_classes"]) == 9


def test_eval_few_shot_and_linear_probe_cli(tmp_path):
    train = _synthetic(tmp_path / "train", n=5)
    test = _synthetic(tmp_path / "test", n=3)
    out = tmp_path / "fs.json"
    assert (
        main(
            [
                "-q",
                "eval",
                "few-shot",
                "--train",
                str(train),
                "--test",
                str(test),
                "--k",
                "2",
                "--n-seeds",
                "2",
                "--model",
                TINY,
                "--json",
                str(out),
                "--n-boot",
                "50",
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["k"] == 2 and len(res["per_seed"]) == 2 and res["n"] == 6
    # colour separates the classes: even a random tiny encoder's embeddings are separable
    out = tmp_path / "lp.json"
    assert (
        main(
            [
                "-q",
                "eval",
                "linear-probe",
                "--train",
                str(train),
                "--test",
                str(test),
                "--model",
                TINY,
                "--json",
                str(out),
                "--n-boot",
                "50",
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["balanced_accuracy"] == 1.0


def test_zeroshot_cli_json(tmp_path, capsys):
    data = _synthetic(tmp_path / "data", n=2)
    assert (
        main(
            [
                "-q",
                "zeroshot",
                str(data / "tum"),
                "--classes",
                "tumour,fat,mucus",
                "--model",
                TINY,
                "--json",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["classes"] == ["tumour", "fat", "mucus"] and len(res["predictions"]) == 2
    assert sum(res["predictions"][0]["probs"].values()) == pytest.approx(1.0, abs=1e-4)


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["eval", "zeroshot", "--data", str(tmp_path / "nowhere"), "--model", TINY])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "nowhere" in err
    data = _synthetic(tmp_path / "data", n=1)
    (data / "MUC").mkdir()
    Image.new("RGB", (8, 8)).save(data / "MUC" / "x.png")
    rc = main(
        [
            "eval",
            "zeroshot",
            "--data",
            str(data),
            "--classes",
            "tum,Adipose tissue",
            "--model",
            TINY,
        ]
    )
    assert rc == 2 and "['MUC'] match no class" in capsys.readouterr().err
    rc = main(["eval", "vqa", "--data", str(data), "--model", TINY])
    assert rc == 2 and "needs a chat model" in capsys.readouterr().err


def test_eval_zeroshot_on_real_tiles(shared_data, tmp_path):
    src = shared_data / "crc_tiles" / "thumbs108"
    if not src.is_dir():
        pytest.skip(f"{src} is missing")
    for cls in ("TUM", "STR", "ADI"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for f in sorted((src / cls).iterdir())[:3]:
            (tmp_path / "data" / cls / f.name).symlink_to(f)
    out = tmp_path / "out" / "crc.json"
    assert (
        main(
            [
                "-q",
                "eval",
                "zeroshot",
                "--data",
                str(tmp_path / "data"),
                "--prompts",
                CRC_PROMPTS,
                "--model",
                TINY,
                "--json",
                str(out),
                "--n-boot",
                "100",
                "--resize-mpp-factor",
                "0.75",
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["n"] == 9 and 0.0 <= res["balanced_accuracy"] <= 1.0
    assert (out.parent / "crc_confusion.png").is_file() and (out.parent / "crc.md").is_file()


def test_lymphoma_csv_with_specimens(shared_data):
    from pathvlm.eval.datasets import load_csv, match_classes
    from pathvlm.zeroshot import load_prompts

    index = shared_data / "lymphoma_nia" / "index.csv"
    if not index.is_file():
        pytest.skip(f"{index} is missing")
    val = load_csv(index, split="val")
    assert set(val.labels) == {"CLL", "FL", "MCL"} and val.specimens is not None
    assert len(set(val.specimens)) >= 6  # 2 specimens per class
    ps = load_prompts(REPO / "configs" / "prompts" / "lymphoma.json")
    assert match_classes(val.labels, ps) == {"CLL": "CLL", "FL": "FL", "MCL": "MCL"}


def test_simpleshot_few_shot_is_stable_where_a_standardised_logistic_regression_is_not():
    """k = 1: two support images. The few-shot classifier (SimpleShot) must not turn a 0.3%
    change of the embeddings (what bf16 does) into a different classifier; the standardised
    logistic regression it replaced divides every dimension by half the support distance."""
    from pathvlm.eval.linear_probe import fit_predict, simpleshot_predict

    rng = np.random.default_rng(0)
    d, n = 256, 400
    axis = rng.normal(size=d)
    y = np.repeat([0, 1], n // 2)
    x = rng.normal(size=(n, d)) + np.outer(np.where(y == 1, 1.0, -1.0), axis) * 0.15
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    noisy = x + rng.normal(size=x.shape) * 0.003 / np.sqrt(d)  # cosine to x ~0.99999
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    flips_ss, flips_lr = [], []
    for seed in range(5):
        idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), 1) for c in (0, 1)]))
        test = np.setdiff1d(np.arange(n), idx)
        clean = simpleshot_predict(x[idx], y[idx], x[test], 2).argmax(1)
        b = simpleshot_predict(noisy[idx], y[idx], noisy[test], 2).argmax(1)
        flips_ss.append((clean != b).mean())
        a = fit_predict(x[idx], y[idx], x[test], 1.0, 2000, seed).argmax(1)
        b = fit_predict(noisy[idx], y[idx], noisy[test], 1.0, 2000, seed).argmax(1)
        flips_lr.append((a != b).mean())
        assert (clean == y[test]).mean() > 0.6
    assert max(flips_ss) < 0.02, flips_ss
    assert max(flips_lr) > 5 * max(max(flips_ss), 0.002), (flips_lr, flips_ss)  # what it replaced


def test_simpleshot_scores_and_a_class_without_support():
    from pathvlm.eval.linear_probe import simpleshot_predict

    train = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.1, 0.0]])
    probs = simpleshot_predict(train, np.array([0, 2, 0]), np.array([[1.0, 0.05, 0.0], [0.0, 1.0, 0.1]]), 3)
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1)
    assert probs[:, 1].max() == 0 and probs.argmax(1).tolist() == [0, 2]
