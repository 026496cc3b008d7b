"""`pathvlm train clip` and `pathvlm train mil` end to end through the CLI on tiny models and data."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathvlm.cli import main
from tests.train_helpers import train_losses, write_mil_labels

REPO = Path(__file__).resolve().parents[1]
CRC_YAML = REPO / "configs" / "classes" / "crc_tissue.yaml"


def _clip_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "train", "clip", "-c", str(REPO / "configs" / "train" / "clip_crc.yaml"),
            f"train.out_dir={out}", f"data.train={data / 'pairs_train.jsonl'}", f"data.val={data / 'pairs_val.jsonl'}",
            f"data.classes={CRC_YAML}", "model.encoder=openclip:pathvlm-tiny", "train.batch_size=8",
            "train.log_every=1", "optim.lr=0.002", "optim.warmup_steps=2", "train.cpu=true", *extra]


def _initial_tiny_state() -> dict[str, torch.Tensor]:
    from accelerate.utils import set_seed

    from pathvlm.encoders import create_encoder

    set_seed(0)  # the loop seeds before it builds the task, and the task inits with that seed
    encoder, _ = create_encoder("openclip:pathvlm-tiny", device="cpu", init_seed=0)
    return {k: v.clone() for k, v in encoder.model.state_dict().items()}


def test_clip_learns_locks_text_resumes_and_reloads(pairs_dir, tmp_path):
    from safetensors.torch import load_file

    from pathvlm.encoders import create_encoder

    run = tmp_path / "run"
    args = _clip_args(pairs_dir, run, "train.steps=24", "train.save_every=12", "train.eval_every=12",
                      "model.lock_text=true", "model.lock_image=false")
    assert main(args) == 0
    losses = train_losses(run)
    assert np.mean([losses[s] for s in range(20, 25)]) < 0.85 * np.mean([losses[s] for s in range(1, 6)])
    for name in ("config.yaml", "meta.json", "loss_curve.png", "encoder/open_clip_model.safetensors"):
        assert (run / name).is_file(), name
    with (run / "metrics.csv").open() as fh:
        assert [r["step"] for r in csv.DictReader(fh) if r.get("val/zeroshot_acc")] == ["12", "24"]

    start, final = _initial_tiny_state(), load_file(str(run / "encoder" / "open_clip_model.safetensors"))
    text_keys = [k for k in start if not k.startswith("visual.") and k != "logit_scale"]
    assert text_keys and all(torch.equal(start[k], final[k]) for k in text_keys)  # frozen: bit-identical
    assert not torch.equal(start["visual.conv1.weight"], final["visual.conv1.weight"])

    # kill after step 12's checkpoint: the step-24 checkpoint and final weights never got written
    shutil.rmtree(run / "checkpoints" / "step_0000024")
    shutil.rmtree(run / "encoder")
    assert main(args) == 0
    resumed = train_losses(run)
    for step in range(13, 25):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5), step
    again = load_file(str(run / "encoder" / "open_clip_model.safetensors"))
    assert all(torch.allclose(final[k], again[k], atol=1e-6) for k in final)

    encoder, transform = create_encoder(f"local-dir:{run / 'encoder'}", device="cpu")
    assert all(torch.equal(encoder.model.state_dict()[k], again[k]) for k in again)
    image = Image.open(next((pairs_dir.parent / "imgs" / "LYM").glob("*.png")))
    assert encoder.encode_image(transform(image)[None]).shape == (1, 32)


def test_clip_lock_image_keeps_the_vision_tower(pairs_dir, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    assert main(_clip_args(pairs_dir, run, "train.steps=2", "train.eval_every=0", "train.save_every=0",
                           "model.lock_image=true", "model.lock_text=false")) == 0
    start, final = _initial_tiny_state(), load_file(str(run / "encoder" / "open_clip_model.safetensors"))
    visual = [k for k in start if k.startswith("visual.")]
    assert all(torch.equal(start[k], final[k]) for k in visual)
    assert not torch.equal(start["token_embedding.weight"], final["token_embedding.weight"])


def test_train_bad_config_is_one_line_exit_2(pairs_dir, tmp_path, capsys):
    assert main(_clip_args(pairs_dir, tmp_path / "r", "train.stepz=3")) == 2
    err = capsys.readouterr().err.strip()
    assert "train.stepz" in err and len(err.splitlines()) == 1
    assert main(["-q", "train", "clip", "model.encoder=openclip:pathvlm-tiny", f"train.out_dir={tmp_path / 'r2'}"]) == 2
    assert "data.train" in capsys.readouterr().err


def test_mil_learns_slide_labels_and_reloads(tmp_path):
    pytest.importorskip("pathvlm.model.aggregators", reason="pathvlm.model aggregators have not landed yet")
    from pathvlm.features import load_features
    from pathvlm.train.mil_task import collate_bags, load_mil_classifier

    labels = write_mil_labels(tmp_path)
    run = tmp_path / "run"
    assert main(["-q", "train", "mil", "-c", str(REPO / "configs" / "train" / "mil.yaml"), f"train.out_dir={run}",
                 f"data.labels={labels}", "train.steps=30", "train.batch_size=4", "train.log_every=1",
                 "train.eval_every=30", "train.save_every=30", "optim.lr=0.01", "optim.warmup_steps=2",
                 "model.hidden_dim=16", "train.cpu=true"]) == 0
    losses = train_losses(run)
    assert np.mean([losses[s] for s in range(26, 31)]) < 0.6 * np.mean([losses[s] for s in range(1, 6)])
    with (run / "metrics.csv").open() as fh:
        final = [r for r in csv.DictReader(fh) if r.get("val/bacc")][-1]
    assert float(final["val/bacc"]) == 1.0
    model = load_mil_classifier(run)
    feats, mask, _ = collate_bags([(load_features(tmp_path / "TUM_7.h5").features, 0)])
    with torch.no_grad():
        logits, attention = model(feats, mask)
    assert model.labels[int(logits.argmax())] == "TUM" and attention.shape[-1] == feats.shape[1]


def test_clip_runs_on_real_crc_tiles(shared_data, tmp_path):
    index = shared_data / "crc_tiles" / "index.csv"
    if not index.exists():
        pytest.skip(f"{index} missing")
    with index.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] in ("train", "val")]
    keep = [r for label in ("ADI", "LYM", "TUM") for split, n in (("train", 6), ("val", 2))
            for r in [r for r in rows if r["label"] == label and r["split"] == split][:n]]
    mini = tmp_path / "index.csv"
    mini.write_text("path,label,split\n" + "".join(f"{index.parent / r['path']},{r['label']},{r['split']}\n" for r in keep))
    assert main(["-q", "data", "build", str(mini), "--classes", str(CRC_YAML), "-o", str(tmp_path / "data"),
                 "--tasks", ""]) == 0
    run = tmp_path / "run"
    assert main(_clip_args(tmp_path / "data", run, "train.steps=3", "train.eval_every=0", "train.save_every=0")) == 0
    with (run / "metrics.csv").open() as fh:
        final = [r for r in csv.DictReader(fh) if r.get("val/zeroshot_acc")]
    assert len(final) == 1 and 0.0 <= float(final[0]["val/zeroshot_acc"]) <= 1.0


def test_unicl_loss_is_clip_for_distinct_groups_and_pools_same_label_positives():
    import open_clip

    from pathvlm.train.clip_task import UniClLoss

    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    clip = open_clip.ClipLoss()(img, txt, scale)
    assert torch.allclose(UniClLoss()(img, txt, scale, torch.arange(6)), clip, atol=1e-6)
    # two images of one label: which of the label's captions is "theirs" does not matter under
    # unicl (both are positives of both), while the CLIP loss changes
    groups = torch.tensor([0, 0, 1, 2, 3, 4])
    txt_diff = txt.clone()  # two different captions of one label: unicl treats them alike too
    loss = UniClLoss()(img, txt_diff, scale, groups)
    assert torch.allclose(loss, UniClLoss()(img, txt_diff[[1, 0, 2, 3, 4, 5]], scale, groups), atol=1e-6)
    clip_loss = open_clip.ClipLoss()
    assert not torch.allclose(clip_loss(img, txt_diff, scale),
                              clip_loss(img, txt_diff[[1, 0, 2, 3, 4, 5]], scale), atol=1e-3)


def test_native_crops_keep_the_tile_scale():
    from pathvlm.train.augment import TrainTransform
    from pathvlm.train.config import AugmentConfig

    cfg = AugmentConfig(crop="native", native_min=1.0, native_max=1.0, flip=False, rot90=False,
                        stain_jitter=0.0, stain_bias=0.0, brightness=0.0)
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    transform = TrainTransform(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), cfg)
    crop = transform._crop(big, np.random.default_rng(1))
    assert crop.size == (32, 32)
    # a 32 px crop of native pixels, not the downscaled field: it is found verbatim in the image
    arr, patch = np.asarray(big), np.asarray(crop)
    hits = [(y, x) for y in range(300 - 31) for x in range(400 - 31)
            if (arr[y, x] == patch[0, 0]).all() and (arr[y:y + 32, x:x + 32] == patch).all()]
    assert len(hits) == 1
    area = TrainTransform(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), AugmentConfig(scale_min=1.0))
    assert np.asarray(area._crop(big, np.random.default_rng(1))).shape == (32, 32, 3)
    # a crop never exceeds a small image: the whole tile is used
    small = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    wide = TrainTransform(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), AugmentConfig(crop="native", native_min=2.0, native_max=2.0))
    assert wide._crop(small, np.random.default_rng(1)).size == (32, 32)


def test_frozen_minilm_is_run_once_per_caption_and_gives_the_same_loss(pairs_dir, tmp_path):
    from pathvlm.data import read_pairs
    from pathvlm.train import load_stage_config
    from pathvlm.train.clip_task import ClipTask

    args = _clip_args(pairs_dir, tmp_path / "run", "model.encoder=openclip:pathvlm-rn10t-minilm",
                      "model.lock_text=true", "model.train_text_proj=true", "model.loss=unicl", "data.val=")
    cfg = load_stage_config("clip", args[4], args[5:])
    task = ClipTask(cfg)
    captions = {r["text"] for r in read_pairs(pairs_dir / "pairs_train.jsonl")}
    assert task.text_cache is not None and set(task.text_cache[0]) == captions
    items = [task.train_dataset()[(i, 0)] for i in (0, 1, 12, 25)]
    images, rows, groups = task.collate(items)
    assert rows.tolist() == [task.text_cache[0][text] for _, text, _ in items]
    task.model.eval()  # the uncached path below must not draw dropout either
    cached = task.training_step((images, rows, groups))["contrastive"]
    tokens = task.encoder.tokenizer()([text for _, text, _ in items])
    task.text_cache = None
    plain = task.training_step((images, tokens, groups))["contrastive"]
    assert torch.allclose(cached, plain, atol=1e-5)
    cached.backward()  # the projection still learns through the cache
    assert task.encoder.model.text.proj.weight.grad.abs().sum() > 0
    # a trainable text tower is not cached
    assert ClipTask(load_stage_config("clip", args[4], [*args[5:], "model.lock_text=false"])).text_cache is None
