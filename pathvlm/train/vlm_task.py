"""What `align` and `instruct` share: conversations rendered once, inputs embedded once, the
caption/answer loss on assistant tokens, and evaluation (loss + closed-question accuracy).

Each distinct input (image, feature file, slide) is turned into a feature bag once with the
model's own encoder and kept in memory, so every epoch reads features, never pixels.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from pathvlm.data.formats import INPUT_KEYS
from pathvlm.data.questions import parse_choice, parse_yesno
from pathvlm.errors import ConfigError, ModelError
from pathvlm.model.processor import SlideSlot, build_messages, render, render_conversation

log = logging.getLogger(__name__)


def input_path(rec: dict[str, Any]) -> str:
    return next(rec[k] for k in INPUT_KEYS if k in rec)


# bump when tiling, tissue detection or pooling of training inputs changes: older bags are then missed
BAG_CACHE_VERSION = 1
_NOT_CACHED = {".h5", ".yaml", ".yml", ".json"}


def _bag_cache_path(key: list | None, tile: Any, path: str) -> Path | None:
    """Where an image's or slide's bag is kept, or None when it is not cached: a feature file is read
    as is, and a case manifest's bag depends on files its own stamp does not cover."""
    from pathvlm.embed_cache import cache_path, file_stamp

    if key is None or Path(path).suffix.lower() in _NOT_CACHED:
        return None
    stamp = file_stamp(path)
    return None if stamp is None else cache_path("bags", [BAG_CACHE_VERSION, *key, tile.mpp, tile.size, stamp])


def embed_inputs_once(vlm: Any, paths: list[str]) -> dict[str, torch.Tensor]:
    """features [N, D] (float32, CPU) per distinct input path, encoded with the model's encoder.

    Each image's or slide's bag is kept on disk (`pathvlm.embed_cache`), so the instruct stage and
    later fine-tunes read back what align embedded with the same encoder weights."""
    from pathvlm.embed_cache import encoder_key, load_array, save_array
    from pathvlm.model.inputs import resolve_inputs
    from pathvlm.slide import TileConfig

    tile = TileConfig(mpp=vlm.cfg.tile_mpp, size=vlm.cfg.tile_size)
    key = encoder_key(vlm.encoder) if vlm.encoder is not None else None
    out: dict[str, torch.Tensor] = {}
    unique = sorted(set(paths))
    read_back = 0
    with torch.no_grad():
        for i, path in enumerate(unique):
            cache = _bag_cache_path(key, tile, path)
            cached = load_array(cache)
            if cached is not None and cached.ndim == 2 and cached.shape[1] == vlm.in_dim:
                out[path], read_back = torch.from_numpy(cached.astype(np.float32, copy=False)), read_back + 1
                continue
            slides = resolve_inputs(path, vlm.encoder, vlm.transform, tile)
            if len(slides) != 1:
                raise ConfigError(f"{path}: a training input must be one slide, image or feature file")
            feats = slides[0].bag.features.detach().float().cpu()
            if feats.dim() != 2 or feats.shape[1] != vlm.in_dim:
                raise ConfigError(f"{path}: features have shape {tuple(feats.shape)}, the model expects "
                                  f"[N, {vlm.in_dim}]")
            out[path] = feats
            save_array(cache, feats.numpy())
            if (i + 1) % 200 == 0:
                log.info("embedded %d/%d inputs", i + 1, len(unique))
    if read_back:
        log.info("%d of %d inputs read back from the embedding cache", read_back, len(unique))
    return out


def hold_out(records: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """Split by specimen (or input file when none is given), never by record, deterministically."""
    def group(rec: dict[str, Any]) -> str:
        return str(rec.get("specimen") or input_path(rec))

    def draw(key: str) -> float:
        return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    train = [r for r in records if draw(group(r)) >= fraction]
    val = [r for r in records if draw(group(r)) < fraction]
    if not train or not val:
        raise ConfigError(f"data.val_fraction={fraction} leaves an empty train or val split "
                          f"({len({group(r) for r in records})} specimens/inputs)")
    return train, val


class ChatDataset(Dataset):
    """(index, sample_seed) -> (features [n, D], ids [L], labels [L]); n <= max_patches by a seeded draw."""

    def __init__(self, samples: list[tuple[str, torch.Tensor, torch.Tensor]], feats: dict[str, torch.Tensor],
                 max_patches: int):
        self.samples, self.feats, self.max_patches = samples, feats, max_patches

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index, seed = key
        path, ids, labels = self.samples[index]
        bag = self.feats[path]
        if self.max_patches and len(bag) > self.max_patches:
            keep = torch.randperm(len(bag), generator=torch.Generator().manual_seed(seed))[: self.max_patches]
            bag = bag[keep.sort().values]
        return bag, ids, labels


def collate_chats(items: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad features (mask True = real patch) and tokens (labels -100, attention 0)."""
    n_max, l_max = max(len(f) for f, _, _ in items), max(len(i) for _, i, _ in items)
    b, dim = len(items), items[0][0].shape[1]
    out = {"features": torch.zeros(b, n_max, dim), "feature_mask": torch.zeros(b, n_max, dtype=torch.bool),
           "input_ids": torch.full((b, l_max), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros(b, l_max, dtype=torch.long),
           "labels": torch.full((b, l_max), -100, dtype=torch.long)}
    for i, (feats, ids, labels) in enumerate(items):
        out["features"][i, : len(feats)] = feats
        out["feature_mask"][i, : len(feats)] = True
        out["input_ids"][i, : len(ids)] = ids
        out["attention_mask"][i, : len(ids)] = 1
        out["labels"][i, : len(ids)] = labels
    return out


def closed_correct(reply: str, rec: dict[str, Any]) -> bool | None:
    """Whether `reply` answers the closed question of `rec` right, read by the parsers
    `pathvlm eval vqa` uses; None when `rec` holds no closed question."""
    if rec.get("answer") in ("yes", "no"):
        return parse_yesno(reply) is (rec["answer"] == "yes")
    if isinstance(rec.get("answer_index"), int):
        options = rec.get("option_names") or rec.get("options") or []
        return parse_choice(reply, list(options)) == rec["answer_index"]
    return None


class VlmTask:
    """Task base for stages that train a PathVLM on conversations (subclasses set up the model)."""

    def __init__(self, cfg: Any, vlm: Any, records: list[dict[str, Any]], val_records: list[dict[str, Any]]):
        self.cfg, self.vlm, self.model = cfg, vlm, vlm
        self.k = vlm.tokens_per_slide(1)
        paths = [input_path(r) for r in records + val_records]
        self.feats = embed_inputs_once(vlm, paths)
        self.train_set = ChatDataset(self._render_all(records, "train"), self.feats, cfg.data.max_patches)
        self.val_samples = self._render_all(val_records[: cfg.data.max_val or None], "val")
        closed = [(input_path(r), r["messages"][0]["content"], r) for r in val_records
                  if "messages" in r and closed_correct("", r) is not None]
        # spread over the val file (it is ordered by class), not its first few images
        every = max(1, len(closed) // cfg.data.max_closed) if cfg.data.max_closed else 1
        self.closed = closed[::every][: cfg.data.max_closed]
        pad = vlm.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else vlm.tokenizer.eos_token_id)

    def messages_of(self, rec: dict[str, Any], index: int) -> list[dict[str, str]]:
        return rec["messages"]

    def _render_all(self, records: list[dict[str, Any]], split: str) -> list:
        # name None: file names can carry the label (CRC "TUM-...") and would leak it into the text
        slots = [SlideSlot(None, None, None, self.k)]
        out, cut, empty = [], 0, 0
        for i, rec in enumerate(records):
            ids, labels = render_conversation(self.vlm.tokenizer, self.messages_of(rec, i), slots,
                                              self.vlm.cfg.system_prompt)
            if len(ids) > self.cfg.data.max_length:
                ids, labels, cut = ids[: self.cfg.data.max_length], labels[: self.cfg.data.max_length], cut + 1
            if int((labels != -100).sum()) == 0:
                empty += 1
                continue
            out.append((input_path(rec), ids, labels))
        if cut or empty:
            log.warning("%s: %d samples cut at data.max_length=%d, %d dropped with no answer tokens left",
                        split, cut, self.cfg.data.max_length, empty)
        if records and not out:
            raise ConfigError(f"{split}: no sample keeps an answer token within data.max_length="
                              f"{self.cfg.data.max_length}")
        return out

    # -- Task protocol ----------------------------------------------------------------------
    def train_dataset(self) -> Dataset:
        return self.train_set

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        return collate_chats(items, self.pad_id)

    def train_lengths(self) -> list[int]:
        """Token count of each training sample (``train.group_by_length``)."""
        return [len(ids) for _, ids, _ in self.train_set.samples]

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.vlm.device
        batch = {k: v.to(device) for k, v in batch.items()}
        embeds = slide_embeds(self.vlm, batch["features"], batch["feature_mask"], self.k)
        loss, _ = lm_loss(self.vlm, batch["input_ids"], embeds, batch["attention_mask"], batch["labels"])
        return {"lm": loss}

    def evaluate(self) -> dict[str, float]:
        """Token-weighted loss on assistant tokens of the val samples; closed-question accuracy."""
        return evaluate_vlm(self.vlm, self.val_samples, self.feats, self.closed, self.k)

    def save_final(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        if (out_dir / "config.yaml").is_file():  # the stage config; config.yaml becomes the model's
            shutil.copy2(out_dir / "config.yaml", out_dir / "train_config.yaml")
        self.vlm.cfg.quantization = None  # a LoRA trained on a 4-bit base applies to the full one
        self.vlm.save_pretrained(out_dir)
        init_llm = Path(self.cfg.init) / "llm" if getattr(self.cfg, "init", "") else None
        if self.vlm.cfg.llm_config and hasattr(self.vlm.llm, "peft_config"):
            # a from-scratch LLM is part of the run, but save_pretrained writes only the adapter
            # then: copy the frozen base it started from, or write it (unload strips the LoRA
            # layers without merging; the model is not trained further after save_final)
            if init_llm is not None and init_llm.is_dir():
                shutil.copytree(init_llm, out_dir / "llm", dirs_exist_ok=True)
                return
            self.vlm.llm = self.vlm.llm.unload()
            self.vlm.llm.save_pretrained(str(out_dir / "llm"))
            self.vlm.tokenizer.save_pretrained(str(out_dir / "llm"))
        log.info("saved model to %s (pathvlm.load_model(%r))", out_dir, str(out_dir))


def lm_loss(vlm: Any, ids: torch.Tensor, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
            labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled (assistant) tokens, and their count.

    Logits are computed only from the first position that predicts a labelled token on: with a
    ~49k vocabulary the full [B, L, V] logits of the prompt and slide tokens would dominate the
    step time and memory while contributing nothing to the loss.
    """
    targets = labels[:, 1:]  # position t predicts token t + 1
    supervised = (targets != -100).any(0).nonzero()
    if len(supervised) == 0:
        raise ModelError("a batch has no assistant tokens to learn from")
    start = int(supervised[0])
    keep = ids.shape[1] - start
    out = vlm(ids, embeds, attention_mask=attention_mask, logits_to_keep=keep)
    logits = out.logits[:, :-1]  # [B, L - 1 - start, V]
    targets = targets[:, start:]
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                       ignore_index=-100)
    return loss, int((targets != -100).sum())


@torch.no_grad()
def evaluate_vlm(vlm: Any, samples: list, feats: dict[str, torch.Tensor], closed: list, k: int) -> dict[str, float]:
    device = vlm.device
    results: dict[str, float] = {}
    if samples:
        total, count = 0.0, 0
        for path, ids, labels in samples:
            embeds = slide_embeds(vlm, feats[path].to(device)[None], None, k)
            loss, n = lm_loss(vlm, ids[None].to(device), embeds, None, labels[None].to(device))
            total, count = total + float(loss) * n, count + n
        results["loss"] = total / max(count, 1)
    if closed:
        right = 0
        for path, question, rec in closed:
            reply = generate_reply(vlm, feats[path].to(device), question, k, max_new_tokens=40)
            right += bool(closed_correct(reply, rec))
        results["closed_acc"] = right / len(closed)
    return results


def slide_embeds(vlm: Any, feats: torch.Tensor, mask: torch.Tensor | None, k: int) -> torch.Tensor:
    """Projected slide tokens of a batch [B, N, D], flattened in batch order [B * k, llm_hidden]
    (the order masked_scatter fills the placeholders in)."""
    tokens, _ = vlm.aggregator(feats, mask)  # [B, K, H]
    if k < tokens.shape[1]:
        tokens = nn.functional.adaptive_avg_pool1d(tokens.transpose(1, 2), k).transpose(1, 2)
    embeds = vlm.projector(tokens)
    return embeds.reshape(-1, embeds.shape[-1])


def generate_reply(vlm: Any, feats: torch.Tensor, question: str, k: int, max_new_tokens: int = 16) -> str:
    """Greedy answer to one user turn about features [N, D] (the training prompt format)."""
    messages = build_messages(question, [SlideSlot(None, None, None, k)], None, vlm.cfg.system_prompt)
    ids = render(vlm.tokenizer, messages).to(vlm.device)
    embeds = vlm.embed_inputs(ids, slide_embeds(vlm, feats[None], None, k))
    out = vlm.run_generate(**vlm._gen_kwargs(embeds, {"max_new_tokens": max_new_tokens, "do_sample": False}))
    return vlm.tokenizer.decode(out[0], skip_special_tokens=True)


def load_records(path: str, reader: Any, what: str) -> list[dict[str, Any]]:
    if not path:
        raise ConfigError(f"the stage needs data.train ({what} JSONL)")
    return reader(path)


def split_records(cfg: Any, reader: Any, what: str) -> tuple[list, list]:
    records = load_records(cfg.data.train, reader, what)
    if cfg.data.val:
        return records, reader(cfg.data.val)
    if cfg.data.val_fraction > 0:
        return hold_out(records, cfg.data.val_fraction, cfg.train.seed)
    return records, []


def start_model(cfg: Any, quantization: str | None = None) -> Any:
    """The PathVLM a stage starts from: ``cfg.init`` (a run dir / registered name) or a fresh
    build of ``cfg.model``; ``quantization="4bit"`` loads the LLM through bitsandbytes."""
    from pathvlm.model import build_model, load_model
    from pathvlm.precision import default_device

    # on the training device from the start: the task embeds every image once before accelerate
    # places the model (a GPU unless train.cpu)
    device = torch.device("cpu") if cfg.train.cpu else default_device()
    if quantization is None:
        if cfg.init:
            return load_model(cfg.init, merge_lora=False, device=device)
        return build_model(cfg.model).to(device)
    from pathvlm.config import load_config
    from pathvlm.model.loading import _MODELS, join_llm_device, load_part
    from pathvlm.model.vlm import ModelConfig

    run = _MODELS.get(cfg.init, Path(cfg.init).expanduser()) if cfg.init else None
    model_cfg = load_config(ModelConfig, run / "config.yaml") if run else cfg.model
    vlm = build_model(model_cfg, llm=load_llm_4bit(model_cfg, run, cpu=cfg.train.cpu))
    if run is not None:
        for part in ("aggregator", "projector", "encoder"):
            if getattr(vlm, part) is not None and (run / f"{part}.safetensors").is_file():
                load_part(getattr(vlm, part), run / f"{part}.safetensors")
        if (run / "adapter").is_dir():
            from peft import PeftModel

            vlm.llm = PeftModel.from_pretrained(vlm.llm, str(run / "adapter"), is_trainable=True)
    join_llm_device(vlm)
    return vlm


def load_llm_4bit(model_cfg: Any, run: Path | None, cpu: bool) -> tuple[Any, Any]:
    """(4-bit LLM, tokenizer) from the run's own ``llm/`` or the config's LLM source (a GGUF goes
    through its dequantised cache). bitsandbytes >= 0.50 also quantises on CPU (slowly)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from pathvlm.model import llm as llm_mod

    if run is not None and (run / "llm").is_dir():
        src = str(run / "llm")
    elif model_cfg.llm_config:
        raise ConfigError("qlora quantises a pretrained LLM: start from a run (init) or set model.llm, "
                          "not model.llm_config")
    else:
        path = llm_mod._resolve(model_cfg.llm)
        src = str(llm_mod._ensure_gguf_cache(path) if path.suffix == ".gguf" else
                  path if path.exists() else model_cfg.llm)
    cuda = torch.cuda.is_available() and not cpu
    compute = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=quant,
                                                     device_map={"": 0 if cuda else "cpu"})
        tok = AutoTokenizer.from_pretrained(src)
    except OSError as exc:
        raise ModelError(f"{src}: cannot load the LLM in 4 bit ({exc})") from exc
    return model, tok
