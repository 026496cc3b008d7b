"""Evaluation embeddings are kept on disk per (weights, tile scale, files, perturbation)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import pathvlm.embed
from pathvlm.eval.common import ImageSequence, Perturbation, embed_dataset


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("PATHVLM_CACHE", str(tmp_path / "cache"))
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (40, 40), (i * 60, 100, 200)).save(p)
        paths.append(str(p))
    return paths


def _encoder(weights="abc123"):
    return SimpleNamespace(weights_hash=weights, tile_size=32, tile_mpp=1.0, preprocess_cfg={"size": 32},
                           random_weights=False)


def test_second_embedding_of_the_same_files_is_read_back_and_changes_invalidate(files, monkeypatch):
    calls = []

    def fake(images, encoder, transform, size, batch_size, progress=False, **scale):
        calls.append(len(images))
        return torch.arange(len(images) * 4, dtype=torch.float32).reshape(len(images), 4) + len(calls)

    monkeypatch.setattr(pathvlm.embed, "pooled_image_embeddings", fake)
    first = embed_dataset(_encoder(), lambda im: im, ImageSequence(files))
    again = embed_dataset(_encoder(), lambda im: im, ImageSequence(files))
    assert len(calls) == 1 and np.array_equal(first, again)
    embed_dataset(_encoder("other"), lambda im: im, ImageSequence(files))  # other weights
    assert len(calls) == 2
    bf16 = _encoder()
    bf16.precision = "bf16"
    embed_dataset(bf16, lambda im: im, ImageSequence(files))  # other precision
    assert len(calls) == 3
    embed_dataset(_encoder(), lambda im: im, ImageSequence(files, Perturbation(1.5, 0.0, 0)))
    assert len(calls) == 4  # a perturbed view is another set of embeddings
    os.utime(files[0], ns=(1, 1))  # the file changed
    embed_dataset(_encoder(), lambda im: im, ImageSequence(files))
    assert len(calls) == 5
    monkeypatch.setenv("PATHVLM_EMBED_CACHE", "0")
    embed_dataset(_encoder(), lambda im: im, ImageSequence(files))
    assert len(calls) == 6
    random = _encoder()
    random.random_weights = True
    monkeypatch.delenv("PATHVLM_EMBED_CACHE")
    embed_dataset(random, lambda im: im, ImageSequence(files))
    embed_dataset(random, lambda im: im, ImageSequence(files))
    assert len(calls) == 8  # random weights are never cached


def test_training_bags_are_embedded_once_across_stages(files, monkeypatch):
    """align and instruct embed the same images with the same encoder: the second stage reads the
    bags back; other weights or a changed file embed again."""
    import pathvlm.model.inputs
    from pathvlm.train.vlm_task import embed_inputs_once

    calls = []

    def fake(path, encoder, transform, tile):
        calls.append(path)
        feats = torch.full((3, 4), float(len(calls)))
        return [SimpleNamespace(bag=SimpleNamespace(features=feats))]

    monkeypatch.setattr(pathvlm.model.inputs, "resolve_inputs", fake)

    def vlm(weights="abc123", random=False):
        encoder = _encoder(weights)
        encoder.random_weights = random
        return SimpleNamespace(encoder=encoder, transform=None, in_dim=4,
                               cfg=SimpleNamespace(tile_mpp=1.0, tile_size=32))

    first = embed_inputs_once(vlm(), files)
    assert len(calls) == 3
    again = embed_inputs_once(vlm(), files + files[:1])  # another stage, a repeated image
    assert len(calls) == 3 and all(torch.equal(first[p], again[p]) for p in files)
    embed_inputs_once(vlm("other"), files)
    assert len(calls) == 6
    os.utime(files[1], ns=(1, 1))
    embed_inputs_once(vlm(), files)
    assert calls[6:] == [files[1]]
    embed_inputs_once(vlm(random=True), files)  # random weights are never cached
    embed_inputs_once(vlm(random=True), files)
    assert len(calls) == 7 + 6


def test_bag_cache_skips_manifests_and_rereads_nothing_unreadable(files, tmp_path, monkeypatch):
    import pathvlm.model.inputs
    from pathvlm.embed_cache import cache_path, encoder_key, file_stamp
    from pathvlm.train.vlm_task import BAG_CACHE_VERSION, embed_inputs_once

    calls = []

    def fake(path, encoder, transform, tile):
        calls.append(path)
        return [SimpleNamespace(bag=SimpleNamespace(features=torch.ones(2, 4)))]

    monkeypatch.setattr(pathvlm.model.inputs, "resolve_inputs", fake)
    model = SimpleNamespace(encoder=_encoder(), transform=None, in_dim=4,
                            cfg=SimpleNamespace(tile_mpp=1.0, tile_size=32))
    manifest = tmp_path / "case.yaml"  # its slides can change while its own stamp does not
    manifest.write_text("slides: []\n")
    embed_inputs_once(model, [str(manifest)])
    embed_inputs_once(model, [str(manifest)])
    assert calls == [str(manifest)] * 2

    embed_inputs_once(model, files[:1])
    bag = cache_path("bags", [BAG_CACHE_VERSION, *encoder_key(model.encoder), 1.0, 32, file_stamp(files[0])])
    assert bag.is_file() and not list(bag.parent.glob("*.tmp.npy"))
    bag.write_bytes(b"not an array")  # a torn or foreign file is a miss, never an error
    embed_inputs_once(model, files[:1])
    np.save(bag, np.ones((2, 7), np.float32))  # another width than the model's: embedded again
    embed_inputs_once(model, files[:1])
    assert calls[2:] == files[:1] * 3
