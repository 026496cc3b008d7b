"""Defaults never embed with random weights; random-init encoders are seeded; re-runs resume fast."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import warnings

import torch
import yaml

from pathvlm.cli import main
from pathvlm.embed import EmbedConfig, embed_slides
from pathvlm.encoders import create_encoder, list_encoders
from pathvlm.encoders.registry import DEFAULT_ENCODER, read_encoder_record

TINY = "openclip:pathvlm-tiny"
FAST = {"mpp": 2.0, "size": 64, "batch_size": 16, "num_workers": 0, "device": "cpu", "progress": False}
HASH_CODE = (
    "from pathvlm.encoders import create_encoder; "
    "print(create_encoder('openclip:pathvlm-tiny', device='cpu')[0].weights_hash)"
)


def _cli(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pathvlm.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)
    return proc, time.perf_counter() - start


def test_embed_defaults_to_the_default_models_encoder():
    from pathvlm.model.loading import _MODELS

    config = yaml.safe_load((_MODELS["demo"] / "config.yaml").read_text())
    assert EmbedConfig().encoder == DEFAULT_ENCODER == config["encoder"]
    entry = next(e for e in list_encoders(details=True) if e.name == DEFAULT_ENCODER)
    assert not entry.random_weights
    record = read_encoder_record(DEFAULT_ENCODER)
    assert record is not None and record.tile_mpp == config["tile_mpp"]
    assert record.tile_size == config["tile_size"]


def test_random_init_is_seeded_and_hash_stable_across_processes():
    hashes = [subprocess.run([sys.executable, "-c", HASH_CODE], capture_output=True, text=True,
                             check=True, timeout=300).stdout.strip() for _ in range(2)]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    encoder, _ = create_encoder(TINY, device="cpu")
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    assert hashes[0] == hashes[1] == encoder.weights_hash
    assert encoder.random_weights


def test_random_encoders_say_so_when_listed_and_used(capsys, caplog, wsi_dir, tmp_path):
    assert main(["list", "encoders"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for entry in list_encoders(details=True):
        assert ("random weights" in rows[entry.name]) == entry.random_weights
    assert "random weights" in rows[TINY] and "random weights" not in rows[DEFAULT_ENCODER]
    with caplog.at_level(logging.WARNING, logger="pathvlm.embed"):
        result = embed_slides([wsi_dir / "CMU-1-Small-Region.svs"], tmp_path,
                              EmbedConfig(encoder=TINY, **FAST))
    assert result.ok and "random weights" in caplog.text


def test_cli_leaves_no_warning_filters_behind():
    before = list(warnings.filters)
    env = {k: os.environ.get(k) for k in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    assert main(["list", "encoders"]) == 0
    assert warnings.filters == before
    assert {k: os.environ.get(k) for k in env} == env


def test_ordinary_cli_call_is_quiet_and_verbose_is_not(tmp_path):
    from PIL import Image

    image = tmp_path / "tile.png"
    Image.new("RGB", (112, 112), (200, 120, 170)).save(image)
    args = ("zeroshot", str(image), "--classes", "tumour,stroma", "--model", f"encoder:{DEFAULT_ENCODER}")
    quiet, _ = _cli(*args)
    assert quiet.returncode == 0, quiet.stderr
    assert "LOAD REPORT" not in quiet.stderr and "FutureWarning" not in quiet.stderr
    assert "Loading weights" not in quiet.stderr
    verbose, _ = _cli("-v", *args)
    assert verbose.returncode == 0 and "LOAD REPORT" in verbose.stderr


def test_rerun_of_a_finished_slide_skips_it_in_under_half_the_time(wsi_dir, tmp_path):
    slide = str(wsi_dir / "CMU-1-Small-Region.svs")
    first, t_first = _cli("-q", "embed", slide, "--out", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert "embedded 1, skipped 0" in first.stdout
    again, t_again = _cli("embed", slide, "--out", str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert "embedded 0, skipped 1" in again.stdout
    assert "weights " not in again.stderr  # the encoder was never built
    print(f"embed CMU-1-Small-Region: first {t_first:.1f} s, re-run {t_again:.1f} s")
    assert t_again < t_first / 2


def test_record_fast_path_only_trusts_unchanged_encoder_files(wsi_dir, tmp_path, monkeypatch):
    from pathvlm import encoders

    encoder, _ = create_encoder(TINY, device="cpu")
    encoder.save(tmp_path / "enc")
    name = f"local-dir:{tmp_path / 'enc'}"
    cfg = EmbedConfig(encoder=name, **FAST)
    slide = wsi_dir / "CMU-1-Small-Region.svs"
    first = embed_slides([slide], tmp_path / "out", cfg)
    assert len(first.written) == 1

    built = []
    real_create = encoders.create_encoder

    def counting_create(*args, **kwargs):
        built.append(args[0])
        return real_create(*args, **kwargs)

    monkeypatch.setattr(encoders, "create_encoder", counting_create)
    assert len(embed_slides([slide], tmp_path / "out", cfg).skipped) == 1 and built == []
    # new weights under the old config (which still records the old hash): never trusted
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)
    from safetensors.torch import save_file

    weights = tmp_path / "enc" / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(weights))
    later = time.time() + 5
    os.utime(weights, (later, later))
    redo = embed_slides([slide], tmp_path / "out", cfg)
    assert built == [name] and len(redo.written) == 1
