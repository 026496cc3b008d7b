"""Foundation encoders offline: each published architecture with random weights, written in the
published file layout and key names, loaded back through the same weights path; errors per case.

Giant models (ViT-L and up) use a depth-reduced copy of the same blocks here; the full-size builds
are in `test_full_size_giants` (marked huge, run with PATHVLM_TEST_HUGE=1). Nothing touches a hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from pathvlm.cli import main
from pathvlm.encoders import (
    build_foundation,
    build_transform,
    create_encoder,
    get_foundation_spec,
    list_encoders,
    load_foundation,
)
from pathvlm.encoders.foundation import FOUNDATION_SPECS
from pathvlm.errors import ModelError

# small enough to build at full size on 2 CPU cores; the rest run depth-reduced (same blocks)
FULL_SIZE = {"kaiko-vits16", "ctranspath"}
BUILDABLE = [s for s in FOUNDATION_SPECS if s.family not in ("conch", "musk", "remote_code",
                                                              "open_clip")]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def reduced(spec) -> dict | None:
    """Build overrides that cut a large model to 1 block (every block type and width kept)."""
    if spec.name in FULL_SIZE:
        return None
    if spec.family in ("timm", "conch_v15"):
        return {"depth": 1}
    if spec.family == "hf_clip":
        return {"vision_config": {"num_hidden_layers": 1}, "text_config": {"num_hidden_layers": 1}}
    return {"num_hidden_layers": 1}


def _old_swin_layout(state: dict) -> dict:
    """timm's Swin keys -> the original (old timm) layout CTransPath was released in: patch
    merging at the end of a stage, plus the derived buffers the release carries."""
    import re

    out = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
           for k, v in state.items()}
    out["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    out["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    return out


class Unsafe:
    """Stands for any pickled object: loading it would import and run code."""


def write_published(spec, encoder, folder: Path) -> Path:
    """Write ``encoder``'s weights as its hub folder holds them (file names, key names, config)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in encoder.backbone.state_dict().items()}
    if spec.family.startswith("hf_"):
        encoder.backbone.save_pretrained(str(folder))  # transformers writes the published key names
        if spec.family == "hf_dinov2_reg":  # Hibou's config names its own remote-code classes
            cfg = json.loads((folder / "config.json").read_text())
            cfg.update(model_type="dinov2", architectures=["Dinov2ModelWithRegisters"],
                       auto_map={"AutoModel": "modeling_dinov2.Dinov2ModelWithRegisters"})
            (folder / "config.json").write_text(json.dumps(cfg))
        return folder
    if spec.family == "ctranspath":
        state = {"model": _old_swin_layout(state)}
    elif spec.family == "timm":
        mean, std = spec.mean_std
        (folder / "config.json").write_text(json.dumps({
            "architecture": spec.arch, "num_classes": 0,
            "pretrained_cfg": {"mean": mean, "std": std, "input_size": [3, spec.input_size] * 1}}))
    file = folder / spec.files[0]
    if file.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(file))
    else:
        torch.save(state, file)
    return folder


def _check_preprocessing(spec, encoder) -> None:
    transform = build_transform(encoder)
    colour = (10, 200, 30)
    x = transform(Image.new("RGB", (300, 260), colour))
    assert x.shape == (3, spec.input_size, spec.input_size)
    mean, std = spec.mean_std
    want = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, mean, std)])
    assert torch.allclose(x[:, 5, 5], want, atol=1e-3)


def test_registry_lists_at_least_20_pathology_encoders(capsys):
    assert main(["list", "encoders", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    foundation = [r for r in rows if r["spec"].startswith("foundation:")]
    assert len(foundation) >= 20
    for row in foundation:
        assert row["license"] and isinstance(row["gated"], bool) and row["hub_id"]
        assert row["embed_dim"] > 0 and 0.2 <= row["mpp"] <= 2 and row["input_size"] >= 224
    names = {r["name"] for r in foundation}
    assert {"uni", "uni2-h", "conch-v1", "conch-v1.5", "virchow", "virchow2", "gigapath",
            "h-optimus-0", "h-optimus-1", "h0-mini", "phikon", "phikon-v2", "gpfm",
            "pathorchestra", "ctranspath", "hibou-b", "hibou-l", "kaiko-vits16", "kaiko-vitb16",
            "kaiko-vitl14", "midnight-12k", "lunit-vits8", "plip", "quiltnet-b-32", "keep",
            "musk"} <= names
    assert len(names) == len(set(list_encoders())) - (len(rows) - len(foundation))


@pytest.mark.parametrize("spec", BUILDABLE, ids=lambda s: s.name)
def test_published_layout_loads_strictly_and_deterministically(spec, tmp_path):
    overrides = reduced(spec)
    torch.manual_seed(0)
    reference = build_foundation(spec, overrides)
    folder = write_published(spec, reference, tmp_path / spec.name)
    loaded = load_foundation(spec, folder, overrides=overrides)
    assert loaded.embed_dim == spec.embed_dim and loaded.weights_hash == reference.weights_hash
    assert loaded.weights_source and Path(loaded.weights_source).parent == folder
    x = torch.randn(2, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = loaded.encode_image(x)
        assert out.shape == (2, spec.embed_dim) and torch.isfinite(out).all()
        assert torch.allclose(out, reference.encode_image(x), atol=1e-5)
        assert torch.equal(out, loaded.encode_image(x))
        if spec.has_text:
            text = loaded.encode_text(["tumour epithelium", "adipose tissue"])
            assert text.shape == (2, spec.embed_dim) and not torch.allclose(text[0], text[1])
    _check_preprocessing(spec, loaded)


def test_uni_architecture_is_the_model_card_one():
    """The registry's UNI build equals timm's ViT-L/16 built with the card's arguments (2 blocks
    here; the full depth is built by the CLI test below)."""
    import timm

    card = timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5,
                             num_classes=0, dynamic_img_size=True, depth=2)
    ours = build_foundation(get_foundation_spec("uni"), {"depth": 2}).backbone
    assert {k: v.shape for k, v in card.state_dict().items()} == \
           {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(card.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(card(x), ours(x))


@pytest.fixture(scope="module")
def uni_dir(tmp_path_factory) -> Path:
    """A random-weight UNI hub folder: config.json + pytorch_model.bin of timm's state_dict."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16,
                              init_values=1e-5, num_classes=0, dynamic_img_size=True)
    folder = tmp_path_factory.mktemp("UNI")
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_large_patch16_224",
                                                    "num_classes": 0}))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_uni_folder_embeds_a_slide_from_the_cli(uni_dir, wsi_dir, tmp_path):
    from pathvlm.features import load_features

    slide = wsi_dir / "CMU-1-Small-Region.svs"
    out = tmp_path / "feats"
    # --mpp 4 keeps a ViT-L on 2 CPU cores to a few tiles; the default is UNI's 0.5 um/px
    rc = main(["-q", "embed", str(slide), "--encoder", "uni", "--weights", str(uni_dir),
               "--out", str(out), "--mpp", "4", "--num-workers", "0", "--batch-size", "8"])
    assert rc == 0
    bag = load_features(out / "CMU-1-Small-Region.h5")
    assert bag.dim == 1024 and len(bag) > 0 and torch.isfinite(bag.features).all()
    # the hash equals the weights' own: checked for every family in the round-trip test
    assert bag.attrs["encoder"] == "uni" and len(bag.attrs["encoder_weights_hash"]) == 16
    assert bag.attrs["mpp"] == 4.0 and bag.attrs["feature_dim"] == 1024


def test_uni_folder_with_a_renamed_tensor_fails_in_one_line(uni_dir, wsi_dir, tmp_path, capsys):
    state = torch.load(uni_dir / "pytorch_model.bin", weights_only=True)
    state["blocks.0.attn.qkv_renamed.weight"] = state.pop("blocks.0.attn.qkv.weight")
    bad = tmp_path / "UNI-bad"
    bad.mkdir()
    (bad / "config.json").write_text((uni_dir / "config.json").read_text())
    torch.save(state, bad / "pytorch_model.bin")
    del state
    rc = main(["-q", "embed", str(wsi_dir / "CMU-1-Small-Region.svs"), "--encoder", "uni",
               "--weights", str(bad), "--out", str(tmp_path / "feats")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "missing keys: blocks.0.attn.qkv.weight" in err[0]
    assert "unexpected keys: blocks.0.attn.qkv_renamed.weight" in err[0]
    assert not (tmp_path / "feats" / "CMU-1-Small-Region.h5").exists()


def test_default_tiling_scale_is_the_encoders_own():
    from pathvlm.embed import encoder_tile_scale

    for name, want in (("uni", (0.5, 224)), ("conch-v1.5", (0.5, 512)), ("ctranspath", (1.0, 224))):
        spec = get_foundation_spec(name)
        encoder = build_foundation(spec, reduced(spec))
        assert encoder_tile_scale(encoder) == want
        assert encoder_tile_scale(encoder, mpp=1.0, size=256) == (1.0, 256)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    spec = get_foundation_spec("kaiko-vits16")
    torch.manual_seed(0)
    reference = build_foundation(spec)
    return spec, reference, write_published(spec, reference, tmp_path_factory.mktemp("kaiko"))


def test_name_at_path_and_single_weights_file(small_dir):
    _spec, reference, folder = small_dir
    by_name, transform = create_encoder(f"kaiko-vits16@{folder}", device="cpu")
    by_arg, _ = create_encoder("kaiko-vits16", device="cpu", weights=folder / "model.safetensors")
    assert by_name.weights_hash == by_arg.weights_hash == reference.weights_hash
    assert transform(Image.new("RGB", (224, 224))).shape == (3, 224, 224)


def test_wrong_shape_names_the_tensor(small_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    spec, _, folder = small_dir
    state = load_file(str(folder / "model.safetensors"))
    state["pos_embed"] = torch.zeros(1, 50, 384)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelError, match=r"wrong shapes \(file vs model\): pos_embed \(1, 50, 384\) "
                                         r"vs \(1, 197, 384\)") as err:
        load_foundation(spec, tmp_path)
    assert "\n" not in str(err.value)


def test_config_of_another_architecture_is_refused(small_dir, tmp_path):
    spec, _, folder = small_dir
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224"}))
    with pytest.raises(ModelError, match="names architecture vit_base_patch16_224"):
        load_foundation(spec, tmp_path)


def test_missing_files_and_unsafe_pickles(small_dir, tmp_path):
    spec, _, _ = small_dir
    with pytest.raises(ModelError, match="no weights file for kaiko-vits16"):
        load_foundation(spec, tmp_path)
    with pytest.raises(ModelError, match="weights path not found"):
        create_encoder("kaiko-vits16", weights=tmp_path / "nope")
    # a pickle that would run code on load is refused by the weights-only unpickler
    torch.save({"pos_embed": Unsafe()}, tmp_path / "evil.bin")
    with pytest.raises(ModelError, match="cannot read weights safely"):
        load_foundation(spec, tmp_path / "evil.bin")
    with pytest.raises(ModelError, match="takes no weights"):
        create_encoder("openclip:pathvlm-tiny", weights=tmp_path)


def test_hf_model_from_a_lone_weights_file_and_wrong_config(tmp_path):
    spec = get_foundation_spec("phikon")
    torch.manual_seed(0)
    reference = build_foundation(spec)
    folder = write_published(spec, reference, tmp_path / "phikon")
    loaded = load_foundation(spec, folder / "model.safetensors")  # the card's config values
    assert loaded.weights_hash == reference.weights_hash
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "dinov2"}))
    with pytest.raises(ModelError, match="config.json is a 'dinov2' model"):
        load_foundation(spec, folder)


def test_conch_v15_resamples_the_released_position_table(tmp_path):
    from timm.layers import resample_abs_pos_embed

    spec = get_foundation_spec("conch-v1.5")
    reference = build_foundation(spec, {"depth": 1})
    state = dict(reference.backbone.state_dict())
    state["trunk.pos_embed"] = resample_abs_pos_embed(state["trunk.pos_embed"], new_size=(14, 14),
                                                      num_prefix_tokens=1, verbose=False)
    torch.save(state, tmp_path / "pytorch_model_vision.bin")
    loaded = load_foundation(spec, tmp_path, overrides={"depth": 1})
    assert loaded.backbone.trunk.pos_embed.shape == (1, 785, 1024)


@pytest.mark.parametrize("name, package", [("conch-v1", "conch"), ("musk", "musk")])
def test_author_packages_are_named_when_missing(name, package, tmp_path):
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(ModelError, match=f"authors' package `{package}`, which is not installed"):
        create_encoder(name, weights=tmp_path)


def test_remote_code_model_and_offline_hub_are_clear_errors():
    with pytest.raises(ModelError, match="never runs downloaded code"):
        create_encoder("keep")
    with pytest.raises(ModelError, match="cannot download 1aurent/.*pass --weights DIR"):
        create_encoder("kaiko-vits16")


def test_quiltnet_open_clip_layout(tmp_path):
    import open_clip

    model = open_clip.create_model("ViT-B-32")
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    encoder, _ = create_encoder("quiltnet-b-32", weights=tmp_path, device="cpu")
    assert encoder.embed_dim == 512 and encoder.tile_mpp == 0.5
    with torch.inference_mode():
        assert encoder.encode_text(["tumour"]).shape == (1, 512)


def test_text_tower_encoder_does_zero_shot_and_linear_probe_embedding(tmp_path):
    from pathvlm.eval.common import ImageSequence, embed_dataset, load_eval_model
    from pathvlm.zeroshot import ZeroShotClassifier

    spec = get_foundation_spec("plip")
    overrides = reduced(spec)
    folder = write_published(spec, build_foundation(spec, overrides), tmp_path / "plip")
    encoder = load_foundation(spec, folder, overrides=overrides)
    image = tmp_path / "tile.png"
    Image.new("RGB", (300, 300), (180, 90, 160)).save(image)
    clf = ZeroShotClassifier(encoder, classes="tumour,stroma,fat", transform=build_transform(encoder),
                             progress=False)
    result = clf.predict([str(image)])
    assert len(result.names) == 1 and result.top[0][0] in ("tumour", "stroma", "fat")
    assert result.logits.shape == (1, 3)
    emb = embed_dataset(encoder, build_transform(encoder), ImageSequence([image, image]))
    assert emb.shape == (2, 512)
    with pytest.raises(ModelError, match="no text tower"):
        ZeroShotClassifier(build_foundation(get_foundation_spec("kaiko-vits16")), classes="a,b")
    by_cli_name = load_eval_model(f"encoder:plip@{folder}", device="cpu")  # --model encoder:plip@DIR
    assert by_cli_name.encoder.weights_hash == encoder.weights_hash


def test_features_of_another_encoder_are_refused(small_dir):
    from pathvlm.features import FeatureFileError, check_same_encoder

    _, reference, _ = small_dir
    attrs = {"encoder": "uni", "encoder_weights_hash": "0123456789abcdef"}
    with pytest.raises(FeatureFileError, match="features come from encoder uni .* re-embed with "
                                               "--encoder kaiko-vits16"):
        check_same_encoder(attrs, "kaiko-vits16", reference.weights_hash, "slide.h5")
    check_same_encoder({**attrs, "encoder_weights_hash": reference.weights_hash}, "kaiko-vits16",
                       reference.weights_hash, "slide.h5")


def test_vlm_projector_input_follows_the_foundation_encoder(small_dir):
    from pathvlm.features import FeatureBag
    from pathvlm.model import ModelConfig, build_model
    from pathvlm.model.inputs import SlideInput

    _, reference, folder = small_dir
    llm = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
    vlm = build_model(ModelConfig(encoder=f"kaiko-vits16@{folder}", n_tokens=2, hidden_dim=32,
                                  llm_config=llm))
    assert vlm.in_dim == 384
    foreign = FeatureBag(torch.randn(3, 384), torch.zeros(3, 2, dtype=torch.int64),
                         {"encoder": "lunit-vits8", "encoder_weights_hash": "feedfeedfeedfeed"})
    with pytest.raises(Exception, match="features come from encoder lunit-vits8"):
        vlm.slide_embeddings([SlideInput(foreign, "s", source="s.h5")])
    own = FeatureBag(torch.randn(3, 384), torch.zeros(3, 2, dtype=torch.int64),
                     {"encoder": "kaiko-vits16", "encoder_weights_hash": reference.weights_hash})
    tokens, _ = vlm.slide_embeddings([SlideInput(own, "s", source="s.h5")])
    assert tokens.shape[0] == 2


GIANTS = [s for s in BUILDABLE if reduced(s) is not None]


@pytest.mark.huge
@pytest.mark.skipif(not os.environ.get("PATHVLM_TEST_HUGE"),
                    reason="full-size giant encoders need GBs of RAM and minutes; PATHVLM_TEST_HUGE=1")
@pytest.mark.parametrize("spec", GIANTS, ids=lambda s: s.name)
def test_full_size_giants(spec, tmp_path):
    torch.manual_seed(0)
    reference = build_foundation(spec)
    loaded = load_foundation(spec, write_published(spec, reference, tmp_path / spec.name))
    x = torch.randn(1, 3, spec.input_size, spec.input_size)
    with torch.inference_mode():
        assert torch.allclose(loaded.encode_image(x), reference.encode_image(x), atol=1e-4)
