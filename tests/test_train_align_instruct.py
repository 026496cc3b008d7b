"""`align` and `instruct` end to end through the CLI on a tiny PathVLM (openclip:pathvlm-tiny
encoder, a hidden-32 2-layer Llama with the SmolLM2 tokenizer) and generated tile images."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pathvlm.cli import main
from pathvlm.errors import ModelError
from pathvlm.model import ModelConfig, build_model, load_model
from pathvlm.model.processor import SLIDE_TOKEN, SlideSlot, add_slide_token, render_conversation
from tests.train_helpers import write_vlm_data

TINY_MODEL = {"encoder": "openclip:pathvlm-tiny", "n_tokens": 4, "hidden_dim": 32, "max_case_tokens": 8,
              "tile_size": 32, "llm_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                              "num_attention_heads": 4, "num_key_value_heads": 2,
                                              "tie_word_embeddings": True}}


def _metrics(run: Path) -> list[dict[str, str]]:
    import csv

    with (run / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def _train_losses(run: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in _metrics(run) if r["train/loss"]}


def _train(stage: str, cfg: dict, tmp: Path, *overrides: str) -> Path:
    path = tmp / f"{stage}_{len(list(tmp.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", stage, "-c", str(path), *overrides]) == 0
    return Path(cfg["train"]["out_dir"])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 tiles of two colour-coded classes: pairs and yes/no conversations (relative paths)."""
    return write_vlm_data(tmp_path_factory.mktemp("vlm_data"))


def _loop(out: Path, steps: int) -> dict:
    return {"out_dir": str(out), "steps": steps, "batch_size": 4, "eval_every": steps // 2,
            "save_every": steps // 2, "log_every": 2, "cpu": True}


@pytest.fixture(scope="module")
def align_cfg(data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("align") / "run"
    return {"train": _loop(out, 16), "optim": {"lr": 5e-3, "warmup_steps": 2},
            "data": {"train": str(data / "pairs.jsonl"), "val_fraction": 0.25, "max_length": 96},
            "model": TINY_MODEL}


@pytest.fixture(scope="module")
def align_run(align_cfg, tmp_path_factory) -> Path:
    return _train("align", align_cfg, tmp_path_factory.mktemp("cfg"))


@pytest.fixture(scope="module")
def instruct_run(align_run, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("instruct") / "run"
    cfg = {"train": _loop(out, 12), "optim": {"lr": 5e-3, "warmup_steps": 2}, "init": str(align_run),
           "data": {"train": str(data / "chats.jsonl"), "val_fraction": 0.25, "max_length": 96},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    return _train("instruct", cfg, tmp_path_factory.mktemp("cfg"))


def _initial_model(cfg: dict):
    """The model the align run started from: the loop seeds before the task builds it."""
    from accelerate.utils import set_seed

    set_seed(cfg["train"].get("seed", 0))
    return build_model(ModelConfig(**TINY_MODEL))


# -- chat rendering -----------------------------------------------------------------------------

def test_render_masks_all_but_assistant_turns():
    from pathvlm.model.llm import load_tokenizer

    tok = load_tokenizer("smollm2")
    slide_id = add_slide_token(tok)
    messages = [{"role": "user", "content": f"{SLIDE_TOKEN}\nWhat is it?"}, {"role": "assistant", "content": "Tumour."},
                {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes, glands."}]
    ids, labels = render_conversation(tok, messages, [SlideSlot(None, None, None, 3)], system_prompt="Be brief.")
    assert ids.shape == labels.shape and int((ids == slide_id).sum()) == 3
    kept = labels != -100
    assert torch.equal(labels[kept], ids[kept])
    assert tok.decode(ids[kept]) == "Tumour.<|im_end|>\nYes, glands.<|im_end|>\n"
    assert "Be brief." in tok.decode(ids[~kept]) and "Sure?" in tok.decode(ids[~kept])
    for bad, match in [(messages[1:], "expected role 'user'"), (messages[:3], "end with an assistant"),
                       ([messages[0], messages[0], messages[1]], "expected role 'assistant'")]:
        with pytest.raises(ModelError, match=match):
            render_conversation(tok, bad, [SlideSlot(None, None, None, 3)])


def test_base_gemma_tokenizer_gets_gemma_turns_and_masks_like_an_instruct_one():
    """A base Gemma (no chat template) is given Gemma's turn format: system text opens the first
    user turn, only the model turns (with their <end_of_turn>) are learned, generation stops there."""
    from types import SimpleNamespace

    from pathvlm.model.llm import (
        GEMMA_TEMPLATE,
        _with_template,
        ensure_chat_template,
        load_tokenizer,
    )

    tok = load_tokenizer("smollm2")  # stands in for Gemma's: same API, offline
    assert ensure_chat_template(tok, "llama").chat_template != GEMMA_TEMPLATE  # others untouched
    tok.chat_template = None
    tok.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    model = SimpleNamespace(config=SimpleNamespace(model_type="gemma3_text"),
                            generation_config=SimpleNamespace(eos_token_id=tok.eos_token_id))
    _with_template(model, tok)
    assert tok.chat_template == GEMMA_TEMPLATE
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert model.generation_config.eos_token_id == [tok.eos_token_id, eot]
    add_slide_token(tok)
    messages = [{"role": "user", "content": f"{SLIDE_TOKEN}\nWhat is it?"}, {"role": "assistant", "content": "Tumour."},
                {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes, glands."}]
    ids, labels = render_conversation(tok, messages, [SlideSlot(None, None, None, 3)], system_prompt="Be brief.")
    kept = labels != -100
    assert tok.decode(ids[kept]) == "Tumour.<end_of_turn>\nYes, glands.<end_of_turn>\n"
    prompt = tok.decode(ids[~kept])
    assert prompt.count("<start_of_turn>user\nBe brief.") == 1 and "<start_of_turn>model\n" in prompt
    assert "system" not in prompt


# -- align --------------------------------------------------------------------------------------

def test_align_loss_decreases_and_run_loads(align_run, data):
    losses = _train_losses(align_run)
    assert max(losses) == 16 and losses[16] < losses[1]
    assert any(r.get("val/loss") for r in _metrics(align_run))
    assert (align_run / "train_config.yaml").is_file()
    model = load_model(align_run)
    out = model.generate_ids(data / "t0.png", "Describe this image.", max_new_tokens=3, min_new_tokens=3)
    assert out.shape == (1, 3)


def test_align_trains_only_aggregator_and_projector(align_run, align_cfg):
    start = _initial_model(align_cfg)
    final = load_file(str(align_run / "checkpoints" / "step_0000016" / "model.safetensors"))
    changed = {name for name, value in start.state_dict().items()
               if name in final and not torch.equal(final[name], value)}  # tied lm_head is stored once
    assert all(name.startswith(("aggregator.", "projector.")) for name in changed), sorted(changed)
    assert {n for n in final if n.startswith("projector.")} <= changed
    assert len([n for n in changed if n.startswith("aggregator.")]) >= 4  # all but unused parameters
    saved = load_model(align_run, device="cpu")  # the run's own llm/ and encoder are the untouched starting weights
    for name, value in start.llm.state_dict().items():
        assert torch.equal(saved.llm.state_dict()[name], value), name
    for name, value in start.encoder.state_dict().items():
        assert torch.equal(saved.encoder.state_dict()[name], value), name


def test_align_resume_continues_with_same_loss(align_run, align_cfg, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(align_run, copy)
    shutil.rmtree(copy / "checkpoints" / "step_0000016")  # as if killed after the step-8 checkpoint
    cfg = {**align_cfg, "train": {**align_cfg["train"], "out_dir": str(copy)}}
    _train("align", cfg, tmp_path)
    before, after = _train_losses(align_run), _train_losses(copy)
    assert sorted(after) == sorted(before)
    for step in range(10, 17, 2):
        assert after[step] == pytest.approx(before[step], abs=1e-5), step
    a, b = (load_file(str(r / "projector.safetensors")) for r in (align_run, copy))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


# -- instruct -----------------------------------------------------------------------------------

def test_instruct_trains_lora_and_projector_only(instruct_run, align_run):
    losses = _train_losses(instruct_run)
    assert losses[12] < losses[1]
    start = load_model(align_run, device="cpu").state_dict()
    final = load_file(str(instruct_run / "checkpoints" / "step_0000012" / "model.safetensors"))
    lora = [k for k in final if "lora_" in k]
    assert lora and any(float(final[k].abs().max()) > 0 for k in lora if "lora_B" in k)
    for name, value in final.items():
        if "lora_" in name:
            continue
        base = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(value, start[base]) == (not name.startswith("projector.")), name


def test_instruct_adapter_loads_back_with_same_generation(instruct_run, align_run, data):
    from peft import LoraConfig, get_peft_model

    loaded = load_model(instruct_run, merge_lora=False)
    assert type(loaded.llm).__name__.startswith("PeftModel")
    # rebuild the trained model from the last checkpoint, independently of save_pretrained
    ref = load_model(align_run)
    ref.llm = get_peft_model(ref.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    state = load_file(str(instruct_run / "checkpoints" / "step_0000012" / "model.safetensors"))
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k or "embed_tokens" in k for k in missing)  # tied, stored once
    ref.eval()
    gen = {"max_new_tokens": 5, "min_new_tokens": 5}
    question = "Is this tumour? Answer yes or no."
    assert torch.equal(loaded.generate_ids(data / "t0.png", question, **gen),
                       ref.generate_ids(data / "t0.png", question, **gen))
    with torch.no_grad():
        ids = loaded.prepare(data / "t0.png", question)
        with_adapter = loaded.llm(inputs_embeds=ids).logits
        with loaded.llm.disable_adapter():
            without = loaded.llm(inputs_embeds=ids).logits
    assert not torch.allclose(with_adapter, without)  # the adapter is really applied
    # the default load folds the adapter into the LLM for inference: the same answers, faster
    merged = load_model(instruct_run)
    assert merged.lora_merged and not hasattr(merged.llm, "peft_config")
    with torch.no_grad():
        assert torch.allclose(merged.llm(inputs_embeds=merged.prepare(data / "t0.png", question)).logits,
                              with_adapter, atol=1e-4)
    assert torch.equal(merged.generate_ids(data / "t0.png", question, **gen),
                       loaded.generate_ids(data / "t0.png", question, **gen))
    with pytest.raises(ModelError, match="merge_lora=False"):  # never saved without its adapter
        merged.save_pretrained(instruct_run.parent / "merged_copy")
    assert not (instruct_run.parent / "merged_copy").exists()


def test_instruct_bad_target_module_is_one_line_error(align_run, data, tmp_path, capsys):
    cfg = {"train": _loop(tmp_path / "bad", 2), "init": str(align_run), "data": {"train": str(data / "chats.jsonl")},
           "lora": {"target_modules": ["nope_proj"]}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "instruct", "-c", str(path)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert last.startswith("error: lora.target_modules: ['nope_proj'] are not modules of this LLM")


def test_qlora_on_cpu_runs_a_few_steps(align_run, data, tmp_path):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    cfg = {"train": _loop(tmp_path / "q", 2), "optim": {"lr": 5e-3, "warmup_steps": 1}, "init": str(align_run),
           "qlora": True, "data": {"train": str(data / "chats.jsonl"), "max_length": 96},
           "lora": {"r": 4, "target_modules": ["q_proj"]}}
    run = _train("instruct", cfg, tmp_path)
    final = load_file(str(run / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert any("lora_A" in k for k in final)
    model = load_model(run)  # the saved run loads on the full-precision base
    assert model.cfg.quantization is None and (run / "adapter" / "adapter_model.safetensors").is_file()


def test_qlora_without_bitsandbytes_is_a_clear_error(align_run, data, tmp_path, monkeypatch, capsys):
    import importlib.metadata

    real = importlib.metadata.version

    def version(name):
        if name == "bitsandbytes":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    cfg = {"train": _loop(tmp_path / "q", 2), "init": str(align_run), "qlora": True,
           "data": {"train": str(data / "chats.jsonl")}}
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "instruct", "-c", str(path)]) == 2
    assert "pip install bitsandbytes" in capsys.readouterr().err


# -- the user fine-tuning script ------------------------------------------------------------------

def test_finetune_script_before_after_and_merge(instruct_run, data, tmp_path):
    from conftest import load_script

    script = load_script("finetune_lora")
    out = tmp_path / "ft"
    assert script.main(["--model", str(instruct_run), "--data", str(data / "chats.jsonl"), "--val-fraction", "0.3",
                        "--out", str(out), "--steps", "8", "--batch-size", "4", "--lr", "5e-3", "--lora-r", "4",
                        "--target-modules", "q_proj,v_proj", "--max-length", "96", "--merge", "--quiet",
                        "train.log_every=2", "train.eval_every=0", "train.save_every=0"]) == 0
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["n_val"] > 0 and report["n_closed"] == report["n_val"]
    assert set(report["before"]) == {"loss", "closed_acc"}
    assert report["after"]["loss"] < report["before"]["loss"]
    assert report["after_merged"]["loss"] == pytest.approx(report["after"]["loss"], abs=1e-3)
    merged = load_model(report["merged"])
    assert not hasattr(merged.llm, "peft_config")
